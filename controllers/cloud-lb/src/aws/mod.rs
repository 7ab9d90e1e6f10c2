//! AWS Network Load Balancers (`--cloud-provider=aws`): one NLB per Service, one target group
//! per Service port with instance targets on the NodePort, one listener per port.
//!
//! Each call is observe → plan → apply ([`elb`]): describe what exists (batched where the API
//! allows) into one value, compute from it and [`spec::desired`] the exact ELBv2 calls to make
//! (a pure function with table tests), then make them, so a resync of a converged Service makes
//! no mutating call. Everything is found by deterministic name and proven ours by tags
//! (`kubernetes.io/cluster/<cluster>=owned`, `kubernetes.io/service-name=<ns>/<name>`) before
//! it is changed; anything else with our name is reported, never touched. Errors steer by the
//! API's error code ([`errors`]), never by message text.
//!
//! Emulator-proofing (moto differs from AWS, see issue 6): we look up by name before every
//! create (moto's CreateLoadBalancer duplicates, its CreateTargetGroup fails on an existing
//! name); a changed NodePort gets a new target group rather than re-registered ports (moto keys
//! targets by instance alone); a listener protocol change is delete-then-create (moto cannot
//! ModifyListener to UDP); we never parse ARNs (moto's say `app`).
//!
//! EC2 ([`ec2`]) finds subnets for a Service that names none ([`discovery`]) and keeps the
//! nodes' security groups open to exactly the Service's `loadBalancerSourceRanges`
//! ([`security`]), as cloud-provider-aws does.

pub mod adopt;
pub mod budget;
pub mod coalesce;
pub mod config;
pub mod discovery;
pub mod dry_run;
pub mod ec2;
pub mod elb;
pub mod errors;
pub mod inventory;
pub mod security;
pub mod spec;

pub use config::{
    ATTEMPT_TIMEOUT, AwsCloudConfig, OPERATION_TIMEOUT, emulator_client, emulator_ec2_client,
};

/// The ELBv2 SDK, re-exported for tests and benchmarks that inspect what the provider made.
pub use aws_sdk_elasticloadbalancingv2 as elbv2_sdk;

/// The EC2 SDK, re-exported for tests that set up VPCs, instances and security groups.
pub use aws_sdk_ec2 as ec2_sdk;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;

use async_trait::async_trait;
use aws_sdk_elasticloadbalancingv2 as elbv2;
use k8s_openapi::api::core::v1::{LoadBalancerIngress, LoadBalancerStatus, Node, Service};
use tracing::debug;

use crate::provider::{LoadBalancerProvider, ProviderError};
use budget::{Budget, OpClass};
use config::timeouts;
use elb::observe::Depth;
use elb::{ElbPlan, LbObs, LbRef, Observed, TgRef};
pub(crate) use errors::{classify, is_code};
use spec::DesiredLb;

/// How long a describe waits for concurrent ones to share its call.
const COALESCE_WINDOW: std::time::Duration = std::time::Duration::from_millis(10);

/// A load balancer as last ensured, with its target groups' (ARN, node port).
type Known = (LbObs, Vec<(String, i32)>);

/// Network load balancers through ELBv2.
pub struct AwsProvider {
    client: elbv2::Client,
    ec2: aws_sdk_ec2::Client,
    ec2_state: ec2::Ec2State,
    vpc: Option<String>,
    manage_security_groups: bool,
    /// Ingress rules one Service may hold on the nodes' groups (`None`: no cap).
    max_rules: Option<usize>,
    budget: Budget,
    defaults: spec::Defaults,
    calls: Mutex<BTreeMap<&'static str, u64>>,
    /// Target groups (ARN, node port) of each load balancer this process last ensured, proven
    /// ours then. Host updates use them directly: 1 describe per group instead of 4 per
    /// Service. An entry is dropped when a group turns out to be gone (then the full lookup
    /// runs) and on every ensure or delete.
    known: Mutex<HashMap<String, Known>>,
    /// Groups we own that are no longer wanted but whose deletion failed, by load balancer
    /// name. Once detached they are found neither through the load balancer nor by a desired
    /// name, so they are remembered and retried on the next ensure or delete.
    orphans: Mutex<HashMap<String, BTreeSet<String>>>,
    /// Concurrent DescribeLoadBalancers-by-name lookups, batched.
    lb_lookups: coalesce::Coalescer<String, Vec<elbv2::types::LoadBalancer>>,
    /// Concurrent DescribeTags lookups, batched (`None`: the resource is gone).
    tag_lookups: coalesce::Coalescer<String, Option<BTreeMap<String, String>>>,
    /// Set in a dry run: mutating calls are recorded there instead of made.
    dry_run: std::sync::OnceLock<scm_runtime::client::dry_run::DryRun>,
}

impl AwsProvider {
    /// A provider from the SDK's default chain (credentials, region, `AWS_ENDPOINT_URL`) with
    /// `cfg`'s overrides.
    pub async fn new(cfg: AwsCloudConfig) -> Self {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
        if let Some(r) = &cfg.region {
            loader = loader.region(aws_config::Region::new(r.clone()));
        }
        if let Some(u) = &cfg.endpoint_url {
            loader = loader.endpoint_url(u.clone());
        }
        // Adaptive retry: on top of our fixed per-class budget, the SDK's client-side rate
        // limiter slows down after throttling answers and recovers gradually.
        loader = loader.retry_config(
            aws_config::retry::RetryConfig::adaptive()
                .with_max_attempts(cfg.max_attempts.unwrap_or(3).max(1)),
        );
        let shared = loader.timeout_config(timeouts()).load().await;
        Self::with_clients(
            elbv2::Client::new(&shared),
            aws_sdk_ec2::Client::new(&shared),
            cfg,
        )
    }

    /// A provider talking ELBv2 and EC2 to an emulator at `endpoint` with dummy credentials
    /// (tests and benchmarks).
    pub fn for_emulator(
        endpoint: &str,
        region: &str,
        max_attempts: u32,
        cfg: AwsCloudConfig,
    ) -> Self {
        Self::with_clients(
            emulator_client(endpoint, region, max_attempts),
            emulator_ec2_client(endpoint, region, max_attempts),
            cfg,
        )
    }

    /// A provider around existing clients.
    pub fn with_clients(
        client: elbv2::Client,
        ec2: aws_sdk_ec2::Client,
        cfg: AwsCloudConfig,
    ) -> Self {
        AwsProvider {
            client,
            ec2,
            ec2_state: ec2::Ec2State::default(),
            vpc: cfg.vpc_id,
            manage_security_groups: !cfg.disable_security_group_ingress,
            max_rules: match cfg.max_rules_per_service {
                None => Some(spec::tenant::DEFAULT_MAX_RULES_PER_SERVICE),
                Some(0) => None,
                Some(n) => Some(n),
            },
            budget: Budget::new(cfg.rate_limits),
            defaults: spec::Defaults {
                subnets: cfg.subnets,
            },
            calls: Mutex::new(BTreeMap::new()),
            known: Mutex::new(HashMap::new()),
            orphans: Mutex::new(HashMap::new()),
            lb_lookups: coalesce::Coalescer::new(COALESCE_WINDOW, 20),
            tag_lookups: coalesce::Coalescer::new(COALESCE_WINDOW, 20),
            dry_run: std::sync::OnceLock::new(),
        }
    }

    fn forget(&self, lb_name: &str) {
        self.known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(lb_name);
    }

    /// ELBv2 and EC2 calls made so far, by operation name (for metrics and the benchmark).
    pub fn call_counts(&self) -> BTreeMap<&'static str, u64> {
        self.calls.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    async fn before(&self, class: OpClass, op: &'static str) {
        self.budget.acquire(class).await;
        *self
            .calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(op)
            .or_default() += 1;
    }

    /// Groups of `lb_name` whose deletion failed earlier.
    fn orphans_of(&self, lb_name: &str) -> BTreeSet<String> {
        self.orphans
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(lb_name)
            .cloned()
            .unwrap_or_default()
    }

    fn remember_orphan(&self, lb_name: &str, arn: &str) {
        self.orphans
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(lb_name.to_string())
            .or_default()
            .insert(arn.to_string());
    }

    fn orphan_deleted(&self, lb_name: &str, arn: &str) {
        let mut orphans = self.orphans.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(set) = orphans.get_mut(lb_name) {
            set.remove(arn);
            if set.is_empty() {
                orphans.remove(lb_name);
            }
        }
    }

    /// The host update of groups remembered from the last ensure: per group, describe its
    /// targets and (de)register the difference. A group that is gone fails with
    /// `TargetGroupNotFound`.
    async fn update_known_targets(
        &self,
        name: &str,
        groups: &[(String, i32)],
        instances: &BTreeSet<String>,
    ) -> Result<(), ProviderError> {
        let obs = Observed {
            name: name.to_string(),
            ..Default::default()
        };
        for (arn, port) in groups {
            let have = self.describe_targets(arn, *port).await?;
            let tg = TgRef::Existing(arn.clone());
            let plan = ElbPlan {
                calls: elb::target_changes(&tg, *port, &have, instances),
                ..Default::default()
            };
            self.apply(&plan, &obs).await?;
        }
        Ok(())
    }

    /// Refuses a Service whose rules on the nodes' groups would exceed the per-Service cap.
    /// With `health_cidrs` empty (before the load balancer's subnets are known) it counts a
    /// lower bound, so a Service over the cap is refused before any call.
    pub(crate) fn check_rule_cap(
        &self,
        d: &DesiredLb,
        health_cidrs: BTreeSet<ipnet::IpNet>,
    ) -> Result<(), ProviderError> {
        match self.max_rules {
            Some(cap) if self.manage_security_groups => {
                let t = ec2::traffic(d, health_cidrs);
                spec::tenant::check_rule_cap(security::rules_needed(&t), cap)
            }
            _ => Ok(()),
        }
    }

    async fn ensure_lb(
        &self,
        cluster: &str,
        service: &Service,
        nodes: &[Node],
    ) -> Result<LoadBalancerStatus, ProviderError> {
        let d = spec::desired(cluster, service, &self.defaults)?;
        self.check_rule_cap(&d, BTreeSet::new())?;
        let instances = spec::instance_ids(&spec::target_nodes(service, nodes)?);
        if let Some(name) = adopt::adopted_name(service)? {
            self.adopt_check(cluster, service, &name, d.scheme).await?;
            let applied = self.apply_adopted(cluster, service, &d, &instances).await?;
            return self.finish_ensure(cluster, &d, applied, &instances).await;
        }
        let tg_names: Vec<String> = d.target_groups.iter().map(|t| t.name.clone()).collect();
        let obs = self
            .observe(
                cluster,
                service,
                &d.name,
                &tg_names,
                // A Service showing an address most likely has its load balancer already.
                has_ingress(service),
                Depth::Full {
                    desired: &d,
                    instances: &instances,
                },
            )
            .await?;
        let plan = elb::plan(&d, &obs, &instances)?;
        debug!(lb = %d.name, calls = ?plan.operations(), "ELBv2 plan");
        self.forget(&d.name);
        let applied = self.apply(&plan, &obs).await?;
        self.finish_ensure(cluster, &d, applied, &instances).await
    }

    /// After the ELBv2 plan: the nodes' security groups, and the status to publish.
    async fn finish_ensure(
        &self,
        cluster: &str,
        d: &DesiredLb,
        applied: elb::apply::Applied,
        instances: &BTreeSet<String>,
    ) -> Result<LoadBalancerStatus, ProviderError> {
        let lb = applied
            .lb
            .ok_or_else(|| ProviderError::retryable("no load balancer after applying the plan"))?;
        self.ensure_security(cluster, &d.name, &lb, Some(d), instances)
            .await?;
        let status = status_of(&lb);
        self.known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(d.name.clone(), (lb, applied.target_groups));
        Ok(status)
    }

    async fn update_lb_hosts(
        &self,
        cluster: &str,
        service: &Service,
        nodes: &[Node],
    ) -> Result<(), ProviderError> {
        let name = spec::load_balancer_name(cluster, service);
        let instances = spec::instance_ids(&spec::target_nodes(service, nodes)?);
        // Computed once: the groups' names for a full lookup, and the rules of the
        // security-group pass (which alone needs the Service to be valid).
        let desired = spec::desired(cluster, service, &self.defaults);
        let cached = self
            .known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&name)
            .cloned();
        if let Some((lb, groups)) = cached {
            match self.update_known_targets(&name, &groups, &instances).await {
                Ok(()) => {
                    return self
                        .update_host_security(cluster, &name, &lb, &desired, &instances)
                        .await;
                }
                Err(e) if e.has_code("TargetGroupNotFound") => {
                    debug!(lb = %name, "remembered target groups are gone: looking up again");
                    self.forget(&name);
                }
                Err(e) => return Err(e),
            }
        }
        // Groups a listener was moved to are not always reported as attached (moto's
        // ModifyListener does not record the association): look those up by name too.
        let tg_names: Vec<String> = desired
            .as_ref()
            .map(|d| d.target_groups.iter().map(|t| t.name.clone()).collect())
            .unwrap_or_default();
        let obs = self
            .observe(cluster, service, &name, &tg_names, true, Depth::Targets)
            .await?;
        let plan = elb::plan_hosts(&obs, &instances)?;
        let Some(LbRef::Existing(arn)) = &plan.lb else {
            return Ok(());
        };
        let lb = obs
            .lb(arn)
            .cloned()
            .ok_or_else(|| ProviderError::retryable("planned load balancer not observed"))?;
        debug!(lb = %name, calls = ?plan.operations(), "ELBv2 host plan");
        self.apply(&plan, &obs).await?;
        self.update_host_security(cluster, &name, &lb, &desired, &instances)
            .await
    }

    async fn delete_lb(&self, cluster: &str, service: &Service) -> Result<(), ProviderError> {
        let name = spec::load_balancer_name(cluster, service);
        self.forget(&name);
        // Every group name the Service may have used: a crash can leave groups unattached.
        let obs = self
            .observe(
                cluster,
                service,
                &name,
                &spec::target_group_names(cluster, service),
                true,
                Depth::Shallow,
            )
            .await?;
        let plan = elb::plan_delete(&obs)?;
        if let Some(lb) = obs.primary()? {
            // Rules first: once the load balancer is gone, nothing says which VPC they are in.
            self.ensure_security(cluster, &name, &lb.lb, None, &BTreeSet::new())
                .await?;
        }
        debug!(lb = %name, calls = ?plan.operations(), "ELBv2 delete plan");
        self.apply(&plan, &obs).await.map(|_| ())
    }

    /// The security-group part of a host update: skipped when the new nodes bring no group
    /// beyond those already open for this load balancer.
    async fn update_host_security(
        &self,
        cluster: &str,
        name: &str,
        lb: &LbObs,
        desired: &Result<DesiredLb, ProviderError>,
        instances: &BTreeSet<String>,
    ) -> Result<(), ProviderError> {
        if self.security_current(name, instances).await? {
            return Ok(());
        }
        let d = desired.as_ref().map_err(Clone::clone)?;
        self.ensure_security(cluster, name, lb, Some(d), instances)
            .await
    }
}

#[async_trait]
impl LoadBalancerProvider for AwsProvider {
    fn provider_name(&self) -> &'static str {
        "aws"
    }

    fn set_dry_run(&self, dry: scm_runtime::client::dry_run::DryRun) {
        let _ = self.dry_run.set(dry);
    }

    fn load_balancer_name(&self, cluster: &str, service: &Service) -> String {
        spec::load_balancer_name(cluster, service)
    }

    fn implemented_elsewhere(&self, service: &Service) -> bool {
        spec::is_external(service)
    }

    async fn exist(&self, cluster: &str, services: &[Service]) -> Result<Vec<bool>, ProviderError> {
        if services.is_empty() {
            return Ok(vec![]);
        }
        // One paged DescribeLoadBalancers (400 a page) for the whole pass instead of a lookup
        // per Service: presence of our deterministic name is enough to tell a deletion; what
        // is found is checked for ownership by the ensure that follows any change.
        let mut names = BTreeSet::new();
        let mut marker: Option<String> = None;
        loop {
            self.before(OpClass::Describe, "DescribeLoadBalancers")
                .await;
            let out = self
                .client
                .describe_load_balancers()
                .page_size(400)
                .set_marker(marker.take())
                .send()
                .await
                .map_err(|e| classify("DescribeLoadBalancers", e))?;
            names.extend(
                out.load_balancers()
                    .iter()
                    .filter_map(|l| l.load_balancer_name().map(str::to_string)),
            );
            match out.next_marker() {
                Some(m) if !m.is_empty() => marker = Some(m.to_string()),
                _ => break,
            }
        }
        Ok(services
            .iter()
            .map(|s| names.contains(&spec::load_balancer_name(cluster, s)))
            .collect())
    }

    async fn inventory(
        &self,
        cluster: &str,
    ) -> Result<Option<crate::inventory::Inventory>, ProviderError> {
        self.list_inventory(cluster).await.map(Some)
    }

    fn resource_names(&self, cluster: &str, service: &Service) -> BTreeSet<String> {
        let mut names: BTreeSet<String> = spec::target_group_names(cluster, service)
            .into_iter()
            .collect();
        names.insert(spec::load_balancer_name(cluster, service));
        names
    }

    async fn delete_orphan(
        &self,
        cluster: &str,
        orphan: &crate::inventory::Orphan,
    ) -> Result<(), ProviderError> {
        self.delete_orphan_resource(cluster, orphan).await
    }

    fn recognises(&self, cluster: &str, service: &Service, status: &LoadBalancerStatus) -> bool {
        // An NLB's DNS name is `<name>-<id>.elb.<region>.amazonaws.com`.
        let prefix = format!(
            "{}-",
            spec::load_balancer_name(cluster, service).to_ascii_lowercase()
        );
        let ingress = status.ingress.as_deref().unwrap_or_default();
        !ingress.is_empty()
            && ingress.iter().all(|i| {
                i.hostname
                    .as_deref()
                    .is_some_and(|h| h.to_ascii_lowercase().starts_with(&prefix))
            })
    }

    async fn get(
        &self,
        cluster: &str,
        service: &Service,
    ) -> Result<Option<LoadBalancerStatus>, ProviderError> {
        let name = spec::load_balancer_name(cluster, service);
        Ok(self
            .find_owned_lb(cluster, service, &name)
            .await
            .map_err(|e| scrub(e, service))?
            .map(|lb| status_of(&lb)))
    }

    fn unsupported_annotations(&self, service: &Service) -> BTreeSet<String> {
        spec::tenant::unsupported_annotations(service)
    }

    async fn ensure(
        &self,
        cluster: &str,
        service: &Service,
        nodes: &[Node],
    ) -> Result<LoadBalancerStatus, ProviderError> {
        // Errors end up in the Service's Events: never let one name another Service's resources.
        self.ensure_lb(cluster, service, nodes)
            .await
            .map_err(|e| scrub(e, service))
    }

    async fn update_hosts(
        &self,
        cluster: &str,
        service: &Service,
        nodes: &[Node],
    ) -> Result<(), ProviderError> {
        self.update_lb_hosts(cluster, service, nodes)
            .await
            .map_err(|e| scrub(e, service))
    }

    /// A new leadership term: another replica may have changed anything since this one last
    /// led, so shortcuts taken from memory (remembered target groups, security groups known to
    /// be current) are dropped; the next sync of each Service looks everything up again.
    async fn restore(&self, _cluster: &str, _services: &[Service]) -> Result<(), ProviderError> {
        self.known.lock().unwrap_or_else(|e| e.into_inner()).clear();
        self.ec2_state.forget_ensured();
        Ok(())
    }

    async fn ensure_deleted(&self, cluster: &str, service: &Service) -> Result<(), ProviderError> {
        self.delete_lb(cluster, service)
            .await
            .map_err(|e| scrub(e, service))
    }
}

/// `e` without names of other Services' resources (see [`spec::tenant::scrub_foreign_names`]).
fn scrub(e: ProviderError, svc: &Service) -> ProviderError {
    let prefix = spec::name_prefix(
        svc.metadata.namespace.as_deref().unwrap_or(""),
        svc.metadata.name.as_deref().unwrap_or(""),
    );
    spec::tenant::scrub_error(e, &prefix)
}

fn has_ingress(svc: &Service) -> bool {
    svc.status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|l| l.ingress.as_ref())
        .is_some_and(|i| !i.is_empty())
}

fn status_of(lb: &LbObs) -> LoadBalancerStatus {
    LoadBalancerStatus {
        ingress: lb.dns.as_ref().map(|d| {
            vec![LoadBalancerIngress {
                hostname: Some(d.clone()),
                ..Default::default()
            }]
        }),
    }
}
