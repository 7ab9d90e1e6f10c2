//! AWS Network Load Balancers (`--cloud-provider=aws`): one NLB per Service, one target group
//! per Service port with instance targets on the NodePort, one listener per port.
//!
//! Reconcile by diff: describe what exists (batched where the API allows), compare with
//! [`spec::desired`], mutate only what differs, so a resync of a converged Service makes no
//! mutating call. Everything is found by deterministic name and proven ours by tags
//! (`kubernetes.io/cluster/<cluster>=owned`, `kubernetes.io/service-name=<ns>/<name>`) before
//! it is changed; anything else with our name is reported, never touched.
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

pub mod budget;
pub mod coalesce;
pub mod discovery;
pub mod ec2;
pub mod security;
pub mod spec;

/// One attempt of an ELBv2 call may take this long; a hung connection must not stall a worker
/// (with `--concurrent-service-syncs=1` it would stall every Service).
pub const ATTEMPT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// A whole ELBv2 call, retries included.
pub const OPERATION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(90);

/// How long a describe waits for concurrent ones to share its call.
const COALESCE_WINDOW: std::time::Duration = std::time::Duration::from_millis(10);

fn timeouts() -> elbv2::config::timeout::TimeoutConfig {
    elbv2::config::timeout::TimeoutConfig::builder()
        .operation_attempt_timeout(ATTEMPT_TIMEOUT)
        .operation_timeout(OPERATION_TIMEOUT)
        .build()
}

/// Creates are never retried by the SDK: a retry after a lost answer would make a second load
/// balancer in emulators whose CreateLoadBalancer is not idempotent. The controller's own retry
/// looks up by name and tags first.
fn no_sdk_retry() -> elbv2::config::Builder {
    elbv2::config::Builder::default().retry_config(elbv2::config::retry::RetryConfig::disabled())
}

/// The ELBv2 SDK, re-exported for tests and benchmarks that inspect what the provider made.
pub use aws_sdk_elasticloadbalancingv2 as elbv2_sdk;

/// The EC2 SDK, re-exported for tests that set up VPCs, instances and security groups.
pub use aws_sdk_ec2 as ec2_sdk;

/// An EC2 client for an emulator at `endpoint`, like [`emulator_client`].
pub fn emulator_ec2_client(endpoint: &str, region: &str, max_attempts: u32) -> aws_sdk_ec2::Client {
    let conf = aws_sdk_ec2::Config::builder()
        .behavior_version(aws_sdk_ec2::config::BehaviorVersion::latest())
        .region(aws_sdk_ec2::config::Region::new(region.to_string()))
        .endpoint_url(endpoint)
        .credentials_provider(aws_sdk_ec2::config::Credentials::new(
            "test", "test", None, None, "static",
        ))
        .retry_config(
            aws_sdk_ec2::config::retry::RetryConfig::standard()
                .with_max_attempts(max_attempts.max(1)),
        )
        .timeout_config(timeouts())
        .build();
    aws_sdk_ec2::Client::from_conf(conf)
}

/// An ELBv2 client with static dummy credentials for an emulator at `endpoint` (tests and
/// benchmarks; production uses [`AwsProvider::new`] and the SDK's default chain).
pub fn emulator_client(endpoint: &str, region: &str, max_attempts: u32) -> elbv2::Client {
    let conf = elbv2::Config::builder()
        .behavior_version(elbv2::config::BehaviorVersion::latest())
        .region(elbv2::config::Region::new(region.to_string()))
        .endpoint_url(endpoint)
        .credentials_provider(elbv2::config::Credentials::new(
            "test", "test", None, None, "static",
        ))
        .retry_config(
            elbv2::config::retry::RetryConfig::standard().with_max_attempts(max_attempts.max(1)),
        )
        .timeout_config(timeouts())
        .build();
    elbv2::Client::from_conf(conf)
}

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;

use async_trait::async_trait;
use aws_sdk_elasticloadbalancingv2 as elbv2;
use elbv2::error::{ProvideErrorMetadata, SdkError};
use elbv2::types::{
    Action, ActionTypeEnum, IpAddressType, LoadBalancerAttribute, LoadBalancerSchemeEnum,
    LoadBalancerTypeEnum, ProtocolEnum, Tag, TargetDescription, TargetGroupAttribute,
    TargetTypeEnum,
};
use k8s_openapi::api::core::v1::{LoadBalancerIngress, LoadBalancerStatus, Node, Service};
use serde::Deserialize;
use tracing::{debug, info, warn};

use crate::provider::{LoadBalancerProvider, ProviderError};
use budget::{Budget, OpClass, RateLimits};
use spec::{DesiredLb, DesiredTargetGroup, HealthCheck, Scheme};

/// The AWS provider's `--cloud-config` file (YAML or JSON).
///
/// ```yaml
/// region: us-east-1            # else the SDK's default chain (AWS_REGION, profile, IMDS)
/// endpointURL: http://127.0.0.1:5000   # else AWS_ENDPOINT_URL / the SDK default
/// subnets: [subnet-0abc, subnet-0def]  # for Services without the subnets annotation
///                              # (else discovered by tag in the VPC)
/// vpcID: vpc-0123              # where to discover subnets (else the nodes' instances' VPC)
/// disableSecurityGroupIngress: false  # true: leave the nodes' security groups alone
/// maxAttempts: 3               # SDK attempts per call (adaptive retry of throttling and 5xx)
/// rateLimits:                  # client-side budget per operation class
///   describe: {qps: 10, burst: 40}
///   mutate:   {qps: 10, burst: 40}
///   targets:  {qps: 4,  burst: 20}
/// ```
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AwsCloudConfig {
    /// Region override.
    #[serde(default)]
    pub region: Option<String>,
    /// ELBv2 endpoint override.
    #[serde(default, rename = "endpointURL")]
    pub endpoint_url: Option<String>,
    /// Default subnet IDs or names.
    #[serde(default)]
    pub subnets: Vec<String>,
    /// VPC to discover subnets in.
    #[serde(default, rename = "vpcID")]
    pub vpc_id: Option<String>,
    /// Do not manage the nodes' security groups (cloud-provider-aws's
    /// `DisableSecurityGroupIngress`); `loadBalancerSourceRanges` is then not enforced.
    #[serde(default)]
    pub disable_security_group_ingress: bool,
    /// SDK attempts per call.
    #[serde(default)]
    pub max_attempts: Option<u32>,
    /// Client-side budgets.
    #[serde(default)]
    pub rate_limits: RateLimits,
}

/// What we saw of an existing load balancer.
#[derive(Clone, Debug)]
struct LbObs {
    arn: String,
    dns: Option<String>,
    vpc: Option<String>,
    scheme: Option<String>,
    subnets: Vec<String>,
}

/// What we saw of an existing target group.
#[derive(Clone, Debug)]
struct TgObs {
    arn: String,
    name: String,
    port: Option<i32>,
    health: HealthCheck,
}

/// A load balancer as last ensured, with its target groups' (ARN, node port).
type Known = (LbObs, Vec<(String, i32)>);

/// What exists for one Service.
struct Observed {
    lb: Option<LbObs>,
    tgs: Vec<TgObs>,
    tags: HashMap<String, BTreeMap<String, String>>,
}

/// Network load balancers through ELBv2.
pub struct AwsProvider {
    client: elbv2::Client,
    ec2: aws_sdk_ec2::Client,
    ec2_state: ec2::Ec2State,
    vpc: Option<String>,
    manage_security_groups: bool,
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
}

fn classify<E>(op: &'static str, e: SdkError<E>) -> ProviderError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let code = e.code().unwrap_or("").to_string();
    let status = e.raw_response().map(|r| r.status().as_u16());
    // The API's code and message when there is one (short enough for an Event); the full
    // error chain only for transport failures.
    let msg = match (e.code(), e.message()) {
        (Some(c), Some(m)) => format!("{op}: {c}: {m}"),
        (Some(c), None) => format!("{op}: {c}"),
        _ => format!("{op}: {}", elbv2::error::DisplayErrorContext(&e)),
    };
    let err = match code.as_str() {
        "Throttling"
        | "ThrottlingException"
        | "RequestLimitExceeded"
        | "TooManyRequestsException" => throttled(msg),
        // The request itself is wrong for this Service: retrying cannot help until it changes.
        "ValidationError"
        | "InvalidConfigurationRequest"
        | "UnsupportedProtocol"
        | "InvalidSubnet"
        | "SubnetNotFound"
        | "InvalidScheme"
        | "AvailabilityZoneNotSupported" => ProviderError::permanent(msg),
        _ if status == Some(429) => throttled(msg),
        _ => ProviderError::retryable(msg),
    };
    let err = if code.is_empty() {
        err
    } else {
        err.with_code(code)
    };
    err.with_source(e)
}

/// A throttle with no hint: AWS APIs send no Retry-After, so the controller's backoff decides.
fn throttled(message: String) -> ProviderError {
    ProviderError::Throttled {
        message,
        code: None,
        retry_after: None,
        source: None,
    }
}

fn is_code<E: ProvideErrorMetadata>(e: &SdkError<E>, codes: &[&str]) -> bool {
    e.code().is_some_and(|c| codes.contains(&c))
}

fn health_of(tg: &elbv2::types::TargetGroup) -> HealthCheck {
    let protocol = tg
        .health_check_protocol()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    HealthCheck {
        path: if protocol == "TCP" {
            None
        } else {
            tg.health_check_path().map(str::to_string)
        },
        protocol,
        port: tg.health_check_port().unwrap_or("").to_string(),
        interval: tg.health_check_interval_seconds().unwrap_or(0),
        timeout: tg.health_check_timeout_seconds().unwrap_or(0),
        healthy: tg.healthy_threshold_count().unwrap_or(0),
        unhealthy: tg.unhealthy_threshold_count().unwrap_or(0),
    }
}

fn tg_obs(tg: &elbv2::types::TargetGroup) -> Option<TgObs> {
    Some(TgObs {
        arn: tg.target_group_arn()?.to_string(),
        name: tg.target_group_name()?.to_string(),
        port: tg.port(),
        health: health_of(tg),
    })
}

fn lb_obs(lb: &elbv2::types::LoadBalancer) -> Option<LbObs> {
    Some(LbObs {
        arn: lb.load_balancer_arn()?.to_string(),
        dns: lb.dns_name().map(str::to_string),
        vpc: lb.vpc_id().map(str::to_string),
        scheme: lb.scheme().map(|s| s.as_str().to_string()),
        subnets: lb
            .availability_zones()
            .iter()
            .filter_map(|z| z.subnet_id().map(str::to_string))
            .collect(),
    })
}

fn tags_vec(tags: &BTreeMap<String, String>) -> Vec<Tag> {
    tags.iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build())
        .collect()
}

fn owned_by(tags: &BTreeMap<String, String>, cluster: &str, svc: &Service) -> bool {
    let want = format!(
        "{}/{}",
        svc.metadata.namespace.as_deref().unwrap_or(""),
        svc.metadata.name.as_deref().unwrap_or("")
    );
    tags.get(&spec::cluster_tag_key(cluster))
        .map(String::as_str)
        == Some("owned")
        && tags.get(spec::SERVICE_TAG) == Some(&want)
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
            budget: Budget::new(cfg.rate_limits),
            defaults: spec::Defaults {
                subnets: cfg.subnets,
            },
            calls: Mutex::new(BTreeMap::new()),
            known: Mutex::new(HashMap::new()),
            orphans: Mutex::new(HashMap::new()),
            lb_lookups: coalesce::Coalescer::new(COALESCE_WINDOW, 20),
            tag_lookups: coalesce::Coalescer::new(COALESCE_WINDOW, 20),
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

    /// Load balancers named `name` (moto may hold several; AWS at most one).
    /// Load balancers named `name` (moto may hold several; AWS at most one). When the
    /// caller expects it to exist, the lookup is coalesced with concurrent ones into one
    /// DescribeLoadBalancers of up to 20 names (a missing name fails such a call, so lookups
    /// likely to miss, e.g. before a first create, go alone).
    async fn find_lbs(
        &self,
        name: &str,
        likely_exists: bool,
    ) -> Result<Vec<elbv2::types::LoadBalancer>, ProviderError> {
        if likely_exists {
            self.lb_lookups
                .call(name.to_string(), |names| self.describe_lbs_batch(names))
                .await
        } else {
            self.describe_lbs_one(name).await
        }
    }

    async fn describe_lbs_one(
        &self,
        name: &str,
    ) -> Result<Vec<elbv2::types::LoadBalancer>, ProviderError> {
        self.before(OpClass::Describe, "DescribeLoadBalancers")
            .await;
        match self
            .client
            .describe_load_balancers()
            .names(name)
            .send()
            .await
        {
            Ok(out) => Ok(out.load_balancers().to_vec()),
            Err(e) if is_code(&e, &["LoadBalancerNotFound"]) => Ok(vec![]),
            Err(e) => Err(classify("DescribeLoadBalancers", e)),
        }
    }

    async fn describe_lbs_batch(
        &self,
        names: Vec<String>,
    ) -> Vec<Result<Vec<elbv2::types::LoadBalancer>, ProviderError>> {
        if names.len() == 1 {
            return vec![self.describe_lbs_one(&names[0]).await];
        }
        self.before(OpClass::Describe, "DescribeLoadBalancers")
            .await;
        match self
            .client
            .describe_load_balancers()
            .set_names(Some(names.clone()))
            .send()
            .await
        {
            Ok(out) => names
                .iter()
                .map(|n| {
                    Ok(out
                        .load_balancers()
                        .iter()
                        .filter(|l| l.load_balancer_name() == Some(n.as_str()))
                        .cloned()
                        .collect())
                })
                .collect(),
            Err(e) if is_code(&e, &["LoadBalancerNotFound"]) => {
                let mut out = Vec::with_capacity(names.len());
                for n in &names {
                    out.push(self.describe_lbs_one(n).await);
                }
                out
            }
            Err(e) => {
                let err = classify("DescribeLoadBalancers", e);
                names.iter().map(|_| Err(err.clone())).collect()
            }
        }
    }

    /// Tags of any number of ARNs; absent resources are left out (nothing proves them ours).
    /// Lookups are coalesced across concurrent reconciles into DescribeTags calls of up to 20
    /// ARNs, the API's limit.
    async fn tags(
        &self,
        arns: &[String],
    ) -> Result<HashMap<String, BTreeMap<String, String>>, ProviderError> {
        let lookups = arns.iter().map(|a| {
            self.tag_lookups
                .call(a.clone(), |batch| self.describe_tags_batch(batch))
        });
        let mut out = HashMap::new();
        for (arn, r) in arns.iter().zip(futures::future::join_all(lookups).await) {
            if let Some(tags) = r? {
                out.insert(arn.clone(), tags);
            }
        }
        Ok(out)
    }

    async fn describe_tags_batch(
        &self,
        arns: Vec<String>,
    ) -> Vec<Result<Option<BTreeMap<String, String>>, ProviderError>> {
        self.before(OpClass::Describe, "DescribeTags").await;
        let r = self
            .client
            .describe_tags()
            .set_resource_arns(Some(arns.clone()))
            .send()
            .await;
        match r {
            Ok(r) => {
                let mut found: HashMap<String, BTreeMap<String, String>> = HashMap::new();
                for d in r.tag_descriptions() {
                    let Some(arn) = d.resource_arn() else {
                        continue;
                    };
                    let tags = d
                        .tags()
                        .iter()
                        .filter_map(|t| {
                            Some((t.key()?.to_string(), t.value().unwrap_or("").to_string()))
                        })
                        .collect();
                    found.insert(arn.to_string(), tags);
                }
                arns.iter().map(|a| Ok(found.remove(a))).collect()
            }
            // One resource deleted meanwhile fails the whole call: ask one by one, so only
            // the missing one counts as absent.
            Err(e)
                if is_code(&e, &["LoadBalancerNotFound", "TargetGroupNotFound"])
                    && arns.len() > 1 =>
            {
                let mut out = Vec::with_capacity(arns.len());
                for a in arns {
                    let one = Box::pin(self.describe_tags_batch(vec![a])).await;
                    out.extend(one);
                }
                out
            }
            Err(e) if is_code(&e, &["LoadBalancerNotFound", "TargetGroupNotFound"]) => {
                vec![Ok(None)]
            }
            Err(e) => {
                let err = classify("DescribeTags", e);
                arns.iter().map(|_| Err(err.clone())).collect()
            }
        }
    }

    /// Our load balancer for `svc` if it exists. Several owned ones (an emulator that
    /// duplicates on create) are collapsed to the oldest; the rest are deleted. One with our
    /// name that we do not own is an error: never touch it.
    async fn find_owned_lb(
        &self,
        cluster: &str,
        svc: &Service,
        name: &str,
    ) -> Result<Option<LbObs>, ProviderError> {
        let mut lbs = self.find_lbs(name, true).await?;
        if lbs.is_empty() {
            return Ok(None);
        }
        lbs.sort_by_key(|l| l.created_time().map(|t| (t.secs(), t.subsec_nanos())));
        let arns: Vec<String> = lbs
            .iter()
            .filter_map(|l| l.load_balancer_arn().map(str::to_string))
            .collect();
        let tags = self.tags(&arns).await?;
        let mut owned: Vec<LbObs> = lbs
            .iter()
            .filter_map(lb_obs)
            .filter(|o| tags.get(&o.arn).is_some_and(|t| owned_by(t, cluster, svc)))
            .collect();
        if owned.is_empty() {
            return Err(ProviderError::retryable(format!(
                "a load balancer named {name} exists but is not tagged as owned by cluster {cluster} and this Service; not touching it"
            )));
        }
        let keep = owned.remove(0);
        for dup in owned {
            warn!(lb = %name, arn = %dup.arn, "deleting duplicate load balancer");
            self.delete_lb_arn(&dup.arn).await?;
        }
        Ok(Some(keep))
    }

    /// Everything that exists for `svc` in as few describes as the API allows: the load
    /// balancer by name, the groups attached to it plus `tg_names` not among them (groups a
    /// crash left unattached, or that moto does not report as attached), and all their tags in
    /// one batched call. A load balancer with our name that we do not own is an error; a
    /// retryable one, since the conflict can be resolved without changing the Service.
    async fn observe(
        &self,
        cluster: &str,
        svc: &Service,
        name: &str,
        tg_names: &[String],
        likely_exists: bool,
    ) -> Result<Observed, ProviderError> {
        let lbs = self.find_lbs(name, likely_exists).await?;
        let lb = if lbs.len() > 1 {
            self.find_owned_lb(cluster, svc, name).await?
        } else {
            lbs.first().and_then(lb_obs)
        };
        let mut tgs = match &lb {
            Some(l) => self.attached_tgs(&l.arn).await?,
            None => vec![],
        };
        let known: BTreeSet<String> = tgs.iter().map(|t| t.name.clone()).collect();
        let missing: Vec<String> = tg_names
            .iter()
            .filter(|n| !known.contains(*n))
            .cloned()
            .collect();
        tgs.extend(self.tgs_by_name(&missing).await?);
        let mut arns: Vec<String> = lb.iter().map(|l| l.arn.clone()).collect();
        arns.extend(tgs.iter().map(|t| t.arn.clone()));
        let tags = self.tags(&arns).await?;
        if let Some(l) = &lb
            && !tags.get(&l.arn).is_some_and(|t| owned_by(t, cluster, svc))
        {
            return Err(ProviderError::retryable(format!(
                "a load balancer named {name} exists but is not tagged as owned by cluster {cluster} and this Service; not touching it"
            )));
        }
        Ok(Observed { lb, tgs, tags })
    }

    async fn delete_lb_arn(&self, arn: &str) -> Result<(), ProviderError> {
        self.before(OpClass::Mutate, "DeleteLoadBalancer").await;
        match self
            .client
            .delete_load_balancer()
            .load_balancer_arn(arn)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_code(&e, &["LoadBalancerNotFound"]) => Ok(()),
            Err(e) => Err(classify("DeleteLoadBalancer", e)),
        }
    }

    async fn create_lb(&self, d: &DesiredLb, subnets: Vec<String>) -> Result<LbObs, ProviderError> {
        self.before(OpClass::Mutate, "CreateLoadBalancer").await;
        let scheme = match d.scheme {
            Scheme::Internal => LoadBalancerSchemeEnum::Internal,
            Scheme::InternetFacing => LoadBalancerSchemeEnum::InternetFacing,
        };
        let out = self
            .client
            .create_load_balancer()
            .name(&d.name)
            .r#type(LoadBalancerTypeEnum::Network)
            .scheme(scheme)
            .ip_address_type(IpAddressType::from(d.ip_address_type.as_str()))
            .set_subnets(Some(subnets))
            .set_tags(Some(tags_vec(&d.tags)))
            .customize()
            .config_override(no_sdk_retry())
            .send()
            .await
            .map_err(|e| classify("CreateLoadBalancer", e))?;
        let lb = out
            .load_balancers()
            .first()
            .and_then(lb_obs)
            .ok_or_else(|| {
                ProviderError::retryable("CreateLoadBalancer returned no load balancer")
            })?;
        info!(lb = %d.name, arn = %lb.arn, "created load balancer");
        Ok(lb)
    }

    /// Target groups attached to the load balancer (through its listeners).
    async fn attached_tgs(&self, lb_arn: &str) -> Result<Vec<TgObs>, ProviderError> {
        self.before(OpClass::Describe, "DescribeTargetGroups").await;
        match self
            .client
            .describe_target_groups()
            .load_balancer_arn(lb_arn)
            .send()
            .await
        {
            Ok(out) => Ok(out.target_groups().iter().filter_map(tg_obs).collect()),
            Err(e) if is_code(&e, &["LoadBalancerNotFound", "TargetGroupNotFound"]) => Ok(vec![]),
            Err(e) => Err(classify("DescribeTargetGroups", e)),
        }
    }

    /// Target groups by name; one call when all exist, else one per name (the API fails the
    /// whole request if any name is missing).
    async fn tgs_by_name(&self, names: &[String]) -> Result<Vec<TgObs>, ProviderError> {
        if names.is_empty() {
            return Ok(vec![]);
        }
        self.before(OpClass::Describe, "DescribeTargetGroups").await;
        match self
            .client
            .describe_target_groups()
            .set_names(Some(names.to_vec()))
            .send()
            .await
        {
            Ok(out) => return Ok(out.target_groups().iter().filter_map(tg_obs).collect()),
            Err(e) if is_code(&e, &["TargetGroupNotFound"]) => {}
            Err(e) => return Err(classify("DescribeTargetGroups", e)),
        }
        if names.len() == 1 {
            return Ok(vec![]);
        }
        let mut found = vec![];
        for n in names {
            self.before(OpClass::Describe, "DescribeTargetGroups").await;
            match self.client.describe_target_groups().names(n).send().await {
                Ok(out) => found.extend(out.target_groups().iter().filter_map(tg_obs)),
                Err(e) if is_code(&e, &["TargetGroupNotFound"]) => {}
                Err(e) => return Err(classify("DescribeTargetGroups", e)),
            }
        }
        Ok(found)
    }

    async fn create_tg(
        &self,
        d: &DesiredTargetGroup,
        vpc: Option<&str>,
        tags: &BTreeMap<String, String>,
    ) -> Result<TgObs, ProviderError> {
        self.before(OpClass::Mutate, "CreateTargetGroup").await;
        let hc = &d.health;
        let out = self
            .client
            .create_target_group()
            .name(&d.name)
            .protocol(ProtocolEnum::from(d.protocol.as_str()))
            .port(d.node_port)
            .set_vpc_id(vpc.map(str::to_string))
            .target_type(TargetTypeEnum::Instance)
            .health_check_protocol(ProtocolEnum::from(hc.protocol.as_str()))
            .health_check_port(&hc.port)
            .set_health_check_path(hc.path.clone())
            .health_check_interval_seconds(hc.interval)
            .health_check_timeout_seconds(hc.timeout)
            .healthy_threshold_count(hc.healthy)
            .unhealthy_threshold_count(hc.unhealthy)
            .set_tags(Some(tags_vec(tags)))
            .customize()
            .config_override(no_sdk_retry())
            .send()
            .await
            .map_err(|e| classify("CreateTargetGroup", e))?;
        out.target_groups()
            .first()
            .and_then(tg_obs)
            .ok_or_else(|| ProviderError::retryable("CreateTargetGroup returned no target group"))
    }

    async fn modify_health(&self, arn: &str, hc: &HealthCheck) -> Result<(), ProviderError> {
        self.before(OpClass::Mutate, "ModifyTargetGroup").await;
        self.client
            .modify_target_group()
            .target_group_arn(arn)
            .health_check_protocol(ProtocolEnum::from(hc.protocol.as_str()))
            .health_check_port(&hc.port)
            .set_health_check_path(hc.path.clone())
            .health_check_interval_seconds(hc.interval)
            .health_check_timeout_seconds(hc.timeout)
            .healthy_threshold_count(hc.healthy)
            .unhealthy_threshold_count(hc.unhealthy)
            .send()
            .await
            .map_err(|e| classify("ModifyTargetGroup", e))?;
        Ok(())
    }

    async fn ensure_tg_attributes(
        &self,
        arn: &str,
        want: &BTreeMap<String, String>,
    ) -> Result<(), ProviderError> {
        if want.is_empty() {
            return Ok(());
        }
        self.before(OpClass::Describe, "DescribeTargetGroupAttributes")
            .await;
        let cur = self
            .client
            .describe_target_group_attributes()
            .target_group_arn(arn)
            .send()
            .await
            .map_err(|e| classify("DescribeTargetGroupAttributes", e))?;
        let have = cur
            .attributes()
            .iter()
            .filter_map(|a| Some((a.key()?, a.value().unwrap_or(""))));
        let changes: Vec<TargetGroupAttribute> = attribute_changes(have, want)
            .map(|(k, v)| TargetGroupAttribute::builder().key(k).value(v).build())
            .collect();
        if changes.is_empty() {
            return Ok(());
        }
        self.before(OpClass::Mutate, "ModifyTargetGroupAttributes")
            .await;
        self.client
            .modify_target_group_attributes()
            .target_group_arn(arn)
            .set_attributes(Some(changes))
            .send()
            .await
            .map_err(|e| classify("ModifyTargetGroupAttributes", e))?;
        Ok(())
    }

    async fn ensure_lb_attributes(
        &self,
        arn: &str,
        want: &BTreeMap<String, String>,
    ) -> Result<(), ProviderError> {
        if want.is_empty() {
            return Ok(());
        }
        self.before(OpClass::Describe, "DescribeLoadBalancerAttributes")
            .await;
        let cur = self
            .client
            .describe_load_balancer_attributes()
            .load_balancer_arn(arn)
            .send()
            .await
            .map_err(|e| classify("DescribeLoadBalancerAttributes", e))?;
        let have = cur
            .attributes()
            .iter()
            .filter_map(|a| Some((a.key()?, a.value().unwrap_or(""))));
        let changes: Vec<LoadBalancerAttribute> = attribute_changes(have, want)
            .map(|(k, v)| LoadBalancerAttribute::builder().key(k).value(v).build())
            .collect();
        if changes.is_empty() {
            return Ok(());
        }
        self.before(OpClass::Mutate, "ModifyLoadBalancerAttributes")
            .await;
        self.client
            .modify_load_balancer_attributes()
            .load_balancer_arn(arn)
            .set_attributes(Some(changes))
            .send()
            .await
            .map_err(|e| classify("ModifyLoadBalancerAttributes", e))?;
        Ok(())
    }

    /// Adds or corrects tags we want; never removes tags (others may have added them).
    async fn ensure_tags(
        &self,
        arn: &str,
        have: Option<&BTreeMap<String, String>>,
        want: &BTreeMap<String, String>,
    ) -> Result<(), ProviderError> {
        let missing: BTreeMap<String, String> = want
            .iter()
            .filter(|(k, v)| have.and_then(|h| h.get(*k)) != Some(*v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        self.before(OpClass::Mutate, "AddTags").await;
        self.client
            .add_tags()
            .resource_arns(arn)
            .set_tags(Some(tags_vec(&missing)))
            .send()
            .await
            .map_err(|e| classify("AddTags", e))?;
        Ok(())
    }

    /// Registers and deregisters so that exactly `instances` are targets on `port`.
    async fn ensure_targets(
        &self,
        tg_arn: &str,
        port: i32,
        instances: &BTreeSet<String>,
    ) -> Result<(), ProviderError> {
        self.before(OpClass::Describe, "DescribeTargetHealth").await;
        let cur = self
            .client
            .describe_target_health()
            .target_group_arn(tg_arn)
            .send()
            .await
            .map_err(|e| classify("DescribeTargetHealth", e))?;
        let have: BTreeSet<(String, i32)> = cur
            .target_health_descriptions()
            .iter()
            .filter_map(|d| {
                let t = d.target()?;
                Some((t.id()?.to_string(), t.port().unwrap_or(port)))
            })
            .collect();
        let want: BTreeSet<(String, i32)> = instances.iter().map(|i| (i.clone(), port)).collect();
        let remove: Vec<TargetDescription> = have
            .difference(&want)
            .map(|(id, p)| TargetDescription::builder().id(id).port(*p).build())
            .collect();
        let add: Vec<TargetDescription> = want
            .difference(&have)
            .map(|(id, p)| TargetDescription::builder().id(id).port(*p).build())
            .collect();
        // Deregister first: an emulator keyed by instance alone would otherwise drop the new
        // registration when the old port is removed.
        if !remove.is_empty() {
            self.before(OpClass::Targets, "DeregisterTargets").await;
            match self
                .client
                .deregister_targets()
                .target_group_arn(tg_arn)
                .set_targets(Some(remove))
                .send()
                .await
            {
                Ok(_) => {}
                Err(e) if is_code(&e, &["InvalidTarget"]) => {}
                Err(e) => return Err(classify("DeregisterTargets", e)),
            }
        }
        if !add.is_empty() {
            self.before(OpClass::Targets, "RegisterTargets").await;
            self.client
                .register_targets()
                .target_group_arn(tg_arn)
                .set_targets(Some(add))
                .send()
                .await
                .map_err(|e| classify("RegisterTargets", e))?;
        }
        Ok(())
    }

    async fn delete_tg(&self, arn: &str) -> Result<(), ProviderError> {
        self.before(OpClass::Mutate, "DeleteTargetGroup").await;
        match self
            .client
            .delete_target_group()
            .target_group_arn(arn)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_code(&e, &["TargetGroupNotFound"]) => Ok(()),
            Err(e) => Err(classify("DeleteTargetGroup", e)),
        }
    }

    async fn ensure_listeners(
        &self,
        lb_arn: &str,
        d: &DesiredLb,
        tg_arns: &HashMap<String, String>,
    ) -> Result<(), ProviderError> {
        self.before(OpClass::Describe, "DescribeListeners").await;
        let cur = self
            .client
            .describe_listeners()
            .load_balancer_arn(lb_arn)
            .send()
            .await
            .map_err(|e| classify("DescribeListeners", e))?;
        let mut existing: BTreeMap<i32, (String, String, Option<String>)> = BTreeMap::new();
        for l in cur.listeners() {
            let (Some(arn), Some(port)) = (l.listener_arn(), l.port()) else {
                continue;
            };
            let proto = l
                .protocol()
                .map(|p| p.as_str().to_string())
                .unwrap_or_default();
            let tg = l.default_actions().first().and_then(|a| {
                a.target_group_arn().map(str::to_string).or_else(|| {
                    a.forward_config()?
                        .target_groups()
                        .first()?
                        .target_group_arn()
                        .map(str::to_string)
                })
            });
            existing.insert(port, (arn.to_string(), proto, tg));
        }
        let wanted_ports: BTreeSet<i32> = d.listeners.iter().map(|l| l.port).collect();
        for (port, (arn, _, _)) in &existing {
            if !wanted_ports.contains(port) {
                self.delete_listener(arn).await?;
            }
        }
        for l in &d.listeners {
            let Some(tg_arn) = tg_arns.get(&l.target_group) else {
                return Err(ProviderError::retryable(format!(
                    "target group {} missing",
                    l.target_group
                )));
            };
            let forward = Action::builder()
                .r#type(ActionTypeEnum::Forward)
                .target_group_arn(tg_arn)
                .build();
            match existing.get(&l.port) {
                Some((_, proto, tg))
                    if proto == &l.protocol && tg.as_deref() == Some(tg_arn.as_str()) => {}
                Some((arn, proto, _)) if proto == &l.protocol => {
                    self.before(OpClass::Mutate, "ModifyListener").await;
                    self.client
                        .modify_listener()
                        .listener_arn(arn)
                        .default_actions(forward)
                        .send()
                        .await
                        .map_err(|e| classify("ModifyListener", e))?;
                }
                other => {
                    // A protocol change is delete then create (ModifyListener to UDP fails in
                    // moto, and a brief gap is unavoidable for a protocol change anyway).
                    if let Some((arn, _, _)) = other {
                        self.delete_listener(arn).await?;
                    }
                    self.before(OpClass::Mutate, "CreateListener").await;
                    self.client
                        .create_listener()
                        .load_balancer_arn(lb_arn)
                        .port(l.port)
                        .protocol(ProtocolEnum::from(l.protocol.as_str()))
                        .default_actions(forward)
                        .send()
                        .await
                        .map_err(|e| classify("CreateListener", e))?;
                }
            }
        }
        Ok(())
    }

    async fn delete_listener(&self, arn: &str) -> Result<(), ProviderError> {
        self.before(OpClass::Mutate, "DeleteListener").await;
        match self.client.delete_listener().listener_arn(arn).send().await {
            Ok(_) => Ok(()),
            Err(e) if is_code(&e, &["ListenerNotFound"]) => Ok(()),
            Err(e) => Err(classify("DeleteListener", e)),
        }
    }

    /// Everything we own for `svc`: the load balancer (if any) and target groups found through
    /// it or by their deterministic names (a crash can leave groups not yet attached).
    async fn owned_resources(
        &self,
        cluster: &str,
        svc: &Service,
    ) -> Result<(Option<LbObs>, Vec<TgObs>), ProviderError> {
        let name = spec::load_balancer_name(cluster, svc);
        let Observed { lb, mut tgs, tags } = self
            .observe(
                cluster,
                svc,
                &name,
                &spec::target_group_names(cluster, svc),
                true,
            )
            .await?;
        tgs.retain(|t| {
            tags.get(&t.arn)
                .is_some_and(|tg| owned_by(tg, cluster, svc))
        });
        Ok((lb, tgs))
    }

    fn take_orphans(&self, lb_name: &str) -> BTreeSet<String> {
        self.orphans
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(lb_name)
            .unwrap_or_default()
    }

    /// Deletes `arns` (groups proven ours); those that fail are remembered for the next try
    /// and the first failure is returned.
    async fn delete_tgs_or_remember(
        &self,
        lb_name: &str,
        arns: BTreeSet<String>,
    ) -> Result<(), ProviderError> {
        let mut first_err = None;
        let mut failed = BTreeSet::new();
        for arn in arns {
            // AWS keeps a group "in use" briefly after its load balancer or listener is gone.
            if let Err(e) = self.delete_tg(&arn).await {
                failed.insert(arn);
                first_err.get_or_insert(e);
            }
        }
        if !failed.is_empty() {
            self.orphans
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(lb_name.to_string())
                .or_default()
                .extend(failed);
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    async fn delete_all(&self, cluster: &str, svc: &Service) -> Result<(), ProviderError> {
        let name = spec::load_balancer_name(cluster, svc);
        let (lb, tgs) = self.owned_resources(cluster, svc).await?;
        if let Some(lb) = &lb {
            // Rules first: once the load balancer is gone, nothing says which VPC they are in.
            self.ensure_security(cluster, &name, lb, None, &BTreeSet::new())
                .await?;
            // Deleting the load balancer deletes its listeners.
            self.delete_lb_arn(&lb.arn).await?;
            info!(arn = %lb.arn, "deleted load balancer");
        }
        let mut arns = self.take_orphans(&name);
        arns.extend(tgs.into_iter().map(|t| t.arn));
        self.delete_tgs_or_remember(&name, arns).await
    }
}

#[async_trait]
impl LoadBalancerProvider for AwsProvider {
    fn provider_name(&self) -> &'static str {
        "aws"
    }

    fn load_balancer_name(&self, cluster: &str, service: &Service) -> String {
        spec::load_balancer_name(cluster, service)
    }

    fn implemented_elsewhere(&self, service: &Service) -> bool {
        spec::is_external(service)
    }

    async fn get(
        &self,
        cluster: &str,
        service: &Service,
    ) -> Result<Option<LoadBalancerStatus>, ProviderError> {
        let name = spec::load_balancer_name(cluster, service);
        Ok(self
            .find_owned_lb(cluster, service, &name)
            .await?
            .map(|lb| status_of(&lb)))
    }

    async fn ensure(
        &self,
        cluster: &str,
        service: &Service,
        nodes: &[Node],
    ) -> Result<LoadBalancerStatus, ProviderError> {
        let d = spec::desired(cluster, service, &self.defaults)?;
        let instances = spec::instance_ids(nodes);
        let desired_tgs: Vec<String> = d.target_groups.iter().map(|t| t.name.clone()).collect();
        let Observed {
            lb: mut found,
            tgs,
            mut tags,
        } = self
            .observe(
                cluster,
                service,
                &d.name,
                &desired_tgs,
                // A Service showing an address most likely has its load balancer already.
                has_ingress(service),
            )
            .await?;
        if let Some(cur) = &found
            && cur
                .scheme
                .as_deref()
                .is_some_and(|s| s != d.scheme.as_str())
        {
            // The scheme cannot change in place: replace the load balancer.
            info!(lb = %d.name, "scheme changed: replacing load balancer");
            self.delete_lb_arn(&cur.arn).await?;
            found = None;
        }
        let lb = match found {
            Some(lb) => lb,
            None => {
                let subnets = self.subnets_for(cluster, &d, &instances).await?;
                let lb = self.create_lb(&d, subnets).await?;
                tags.insert(lb.arn.clone(), d.tags.clone());
                lb
            }
        };
        self.ensure_lb_attributes(&lb.arn, &d.lb_attributes).await?;
        self.ensure_tags(&lb.arn, tags.get(&lb.arn), &d.tags)
            .await?;
        for t in &tgs {
            let owned = tags
                .get(&t.arn)
                .is_some_and(|tg| owned_by(tg, cluster, service));
            if !owned && d.target_groups.iter().any(|w| w.name == t.name) {
                return Err(ProviderError::retryable(format!(
                    "a target group named {} exists but is not owned by this Service; not touching it",
                    t.name
                )));
            }
        }
        self.forget(&d.name);
        let mut tg_arns: HashMap<String, String> = HashMap::new();
        let mut known: Vec<(String, i32)> = vec![];
        for want in &d.target_groups {
            let tg = match tgs.iter().find(|t| t.name == want.name) {
                Some(t) => {
                    if t.health != want.health {
                        debug!(tg = %t.name, have = ?t.health, want = ?want.health, "health check differs");
                        self.modify_health(&t.arn, &want.health).await?;
                    }
                    self.ensure_tags(&t.arn, tags.get(&t.arn), &d.tags).await?;
                    t.clone()
                }
                None => self.create_tg(want, lb.vpc.as_deref(), &d.tags).await?,
            };
            self.ensure_tg_attributes(&tg.arn, &want.attributes).await?;
            let port = tg.port.unwrap_or(want.node_port);
            self.ensure_targets(&tg.arn, port, &instances).await?;
            known.push((tg.arn.clone(), port));
            tg_arns.insert(want.name.clone(), tg.arn);
        }
        self.ensure_listeners(&lb.arn, &d, &tg_arns).await?;
        // Groups no longer wanted (a port removed, a NodePort changed): delete once no
        // listener points at them any more. Only groups we own.
        let mut unwanted: BTreeSet<String> = self.take_orphans(&d.name);
        for t in &tgs {
            let wanted = d.target_groups.iter().any(|w| w.name == t.name);
            let owned = tags
                .get(&t.arn)
                .is_some_and(|tg| owned_by(tg, cluster, service));
            if !wanted && owned {
                unwanted.insert(t.arn.clone());
            }
        }
        let wanted_arns: BTreeSet<&String> = tg_arns.values().collect();
        unwanted.retain(|a| !wanted_arns.contains(a));
        self.delete_tgs_or_remember(&d.name, unwanted).await?;
        self.ensure_security(cluster, &d.name, &lb, Some(&d), &instances)
            .await?;
        let status = status_of(&lb);
        self.known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(d.name.clone(), (lb, known));
        Ok(status)
    }

    async fn update_hosts(
        &self,
        cluster: &str,
        service: &Service,
        nodes: &[Node],
    ) -> Result<(), ProviderError> {
        let name = spec::load_balancer_name(cluster, service);
        let instances = spec::instance_ids(nodes);
        let cached = self
            .known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&name)
            .cloned();
        if let Some((lb, groups)) = cached {
            let mut stale = false;
            for (arn, port) in &groups {
                match self.ensure_targets(arn, *port, &instances).await {
                    Ok(()) => {}
                    Err(e) if e.has_code("TargetGroupNotFound") => {
                        stale = true;
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
            if !stale {
                return self
                    .update_host_security(cluster, service, &name, &lb, &instances)
                    .await;
            }
            debug!(lb = %name, "remembered target groups are gone: looking up again");
            self.forget(&name);
        }
        // Groups a listener was moved to are not always reported as attached (moto's
        // ModifyListener does not record the association): look those up by name too.
        let desired_tgs: Vec<String> = spec::desired(cluster, service, &self.defaults)
            .map(|d| d.target_groups.into_iter().map(|t| t.name).collect())
            .unwrap_or_default();
        let Observed { lb, tgs, tags } = self
            .observe(cluster, service, &name, &desired_tgs, true)
            .await?;
        let Some(lb) = lb else {
            return Ok(());
        };
        for t in tgs {
            if !tags
                .get(&t.arn)
                .is_some_and(|tg| owned_by(tg, cluster, service))
            {
                continue;
            }
            let Some(port) = t.port else { continue };
            self.ensure_targets(&t.arn, port, &instances).await?;
        }
        self.update_host_security(cluster, service, &name, &lb, &instances)
            .await
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
        self.forget(&spec::load_balancer_name(cluster, service));
        self.delete_all(cluster, service).await
    }
}

impl AwsProvider {
    /// The security-group part of a host update: skipped when the new nodes bring no group
    /// beyond those already open for this load balancer.
    async fn update_host_security(
        &self,
        cluster: &str,
        service: &Service,
        name: &str,
        lb: &LbObs,
        instances: &BTreeSet<String>,
    ) -> Result<(), ProviderError> {
        if self.security_current(name, instances).await? {
            return Ok(());
        }
        let d = spec::desired(cluster, service, &self.defaults)?;
        self.ensure_security(cluster, name, lb, Some(&d), instances)
            .await
    }
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

/// The wanted attributes whose current value differs (or is missing): what a Modify*Attributes
/// call must send, shared by load balancers and target groups so both diff the same way.
fn attribute_changes<'a>(
    have: impl Iterator<Item = (&'a str, &'a str)>,
    want: &'a BTreeMap<String, String>,
) -> impl Iterator<Item = (&'a String, &'a String)> {
    let have: BTreeMap<&str, &str> = have.collect();
    want.iter()
        .filter(move |(k, v)| have.get(k.as_str()) != Some(&v.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cloud_config_reads_every_documented_key() {
        let cfg: AwsCloudConfig = serde_yaml::from_str(
            r#"
region: us-east-1
endpointURL: http://127.0.0.1:5000
subnets: [subnet-0abc, public-b]
vpcID: vpc-0123
disableSecurityGroupIngress: true
maxAttempts: 3
rateLimits:
  describe: {qps: 10, burst: 40}
  ec2Describe: {qps: 5, burst: 10}
  ec2Mutate: {qps: 1, burst: 2}
"#,
        )
        .expect("documented keys parse");
        assert_eq!(cfg.vpc_id.as_deref(), Some("vpc-0123"));
        assert!(cfg.disable_security_group_ingress);
        assert_eq!(cfg.subnets, vec!["subnet-0abc", "public-b"]);
        assert_eq!(cfg.rate_limits.ec2_mutate.burst, 2);
        // Unset classes keep their defaults.
        assert_eq!(
            cfg.rate_limits.targets,
            budget::RateLimits::default().targets
        );
        assert!(serde_yaml::from_str::<AwsCloudConfig>("vpcId: vpc-1").is_err());
    }

    #[test]
    fn attribute_changes_sends_only_missing_or_different_values() {
        let want: BTreeMap<String, String> = [
            ("a".to_string(), "1".to_string()),
            ("b".to_string(), "2".to_string()),
            ("c".to_string(), "3".to_string()),
        ]
        .into();
        let have = [("a", "1"), ("b", "x"), ("z", "9")];
        let got: Vec<(&String, &String)> = attribute_changes(have.into_iter(), &want).collect();
        let got: Vec<(&str, &str)> = got.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(got, vec![("b", "2"), ("c", "3")]);
    }
}
