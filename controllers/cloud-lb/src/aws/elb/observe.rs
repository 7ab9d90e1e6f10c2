//! Describes: everything that exists in ELBv2 for one Service, gathered into one [`Observed`]
//! value in as few calls as the API allows (load balancer lookups and tags are batched across
//! concurrent reconciles). Nothing here mutates.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use aws_sdk_elasticloadbalancingv2 as elbv2;
use k8s_openapi::api::core::v1::Service;

use super::{LbObs, Observed, ObservedLb, ObservedListener, ObservedTg, keeps};
use crate::aws::budget::OpClass;
use crate::aws::spec::{self, DesiredLb, HealthCheck};
use crate::aws::{AwsProvider, classify, is_code};
use crate::provider::ProviderError;

/// How far `AwsProvider::observe` looks beyond the load balancer, its groups and their tags.
pub enum Depth<'a> {
    /// Nothing more (deletion).
    Shallow,
    /// The targets of every group we own (host updates).
    Targets,
    /// What an ensure diffs against `desired`: the kept load balancer's listeners and
    /// attributes, the wanted groups' targets and attributes, and subnets when a load balancer
    /// is to be created for `instances`.
    Full {
        /// The desired load balancer.
        desired: &'a DesiredLb,
        /// The nodes' instance IDs.
        instances: &'a BTreeSet<String>,
    },
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

pub(crate) fn tg_obs(tg: &elbv2::types::TargetGroup) -> Option<ObservedTg> {
    Some(ObservedTg {
        arn: tg.target_group_arn()?.to_string(),
        name: tg.target_group_name()?.to_string(),
        port: tg.port(),
        health: health_of(tg),
        tags: BTreeMap::new(),
        owned: false,
        attributes: BTreeMap::new(),
        targets: BTreeSet::new(),
    })
}

pub(crate) fn lb_obs(lb: &elbv2::types::LoadBalancer) -> Option<LbObs> {
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

/// Whether `tags` prove a resource is `svc`'s in `cluster`.
pub(crate) fn owned_by(tags: &BTreeMap<String, String>, cluster: &str, svc: &Service) -> bool {
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

/// Load balancers as found, oldest first (which one is kept when an emulator duplicated).
fn sorted_lbs(mut raw: Vec<elbv2::types::LoadBalancer>) -> Vec<ObservedLb> {
    raw.sort_by_key(|l| l.created_time().map(|t| (t.secs(), t.subsec_nanos())));
    raw.iter()
        .filter_map(lb_obs)
        .map(|lb| ObservedLb {
            lb,
            ..Default::default()
        })
        .collect()
}

fn attributes_of<'a>(
    attrs: impl Iterator<Item = (Option<&'a str>, Option<&'a str>)>,
) -> BTreeMap<String, String> {
    attrs
        .filter_map(|(k, v)| Some((k?.to_string(), v.unwrap_or("").to_string())))
        .collect()
}

impl AwsProvider {
    /// Everything that exists for `svc`: the load balancers named `name`, the groups attached
    /// to the one we keep plus `tg_names` not among them (groups a crash left unattached, or
    /// that moto does not report as attached), all their tags in one batched call, and what
    /// `depth` asks for. When the name is taken by a load balancer we do not own, nothing more
    /// is described (the plan refuses to touch it).
    pub(crate) async fn observe(
        &self,
        cluster: &str,
        svc: &Service,
        name: &str,
        tg_names: &[String],
        likely_exists: bool,
        depth: Depth<'_>,
    ) -> Result<Observed, ProviderError> {
        let mut lbs = sorted_lbs(self.find_lbs(name, likely_exists).await?);
        let mut tags = HashMap::new();
        if lbs.len() > 1 {
            // Which one is ours decides whose groups to look at.
            let arns: Vec<String> = lbs.iter().map(|l| l.lb.arn.clone()).collect();
            tags = self.tags(&arns).await?;
            mark_lbs(&mut lbs, &tags, cluster, svc);
        }
        let attached_to = match lbs.as_slice() {
            [one] => Some(one.lb.arn.clone()),
            _ => lbs.iter().find(|l| l.owned).map(|l| l.lb.arn.clone()),
        };
        let mut tgs = match &attached_to {
            Some(arn) => self.attached_tgs(arn).await?,
            None => vec![],
        };
        let known: BTreeSet<String> = tgs.iter().map(|t| t.name.clone()).collect();
        let missing: Vec<String> = tg_names
            .iter()
            .filter(|n| !known.contains(*n))
            .cloned()
            .collect();
        tgs.extend(self.tgs_by_name(&missing).await?);
        let mut arns: Vec<String> = match lbs.as_slice() {
            [one] => vec![one.lb.arn.clone()],
            _ => vec![],
        };
        arns.extend(tgs.iter().map(|t| t.arn.clone()));
        tags.extend(self.tags(&arns).await?);
        mark_lbs(&mut lbs, &tags, cluster, svc);
        for t in &mut tgs {
            t.tags = tags.get(&t.arn).cloned().unwrap_or_default();
            t.owned = tags.get(&t.arn).is_some_and(|g| owned_by(g, cluster, svc));
        }
        let mut obs = Observed {
            name: name.to_string(),
            cluster: cluster.to_string(),
            lbs,
            target_groups: tgs,
            subnets: None,
            orphans: self.orphans_of(name),
        };
        let Ok(primary) = obs.primary() else {
            return Ok(obs);
        };
        let primary = primary.map(|p| p.lb.clone());
        match depth {
            Depth::Shallow => {}
            Depth::Targets => {
                if primary.is_some() {
                    for t in obs.target_groups.iter_mut().filter(|t| t.owned) {
                        if let Some(port) = t.port {
                            t.targets = self.describe_targets(&t.arn, port).await?;
                        }
                    }
                }
            }
            Depth::Full { desired, instances } => {
                let kept = primary.filter(|p| keeps(p, desired.scheme));
                if let Some(lb) = &kept {
                    let listeners = self.describe_listeners(&lb.arn).await?;
                    let attributes = if desired.lb_attributes.is_empty() {
                        BTreeMap::new()
                    } else {
                        self.describe_lb_attributes(&lb.arn).await?
                    };
                    if let Some(p) = obs.lbs.iter_mut().find(|l| l.lb.arn == lb.arn) {
                        p.listeners = listeners;
                        p.attributes = attributes;
                    }
                }
                for t in obs.target_groups.iter_mut().filter(|t| t.owned) {
                    let Some(want) = desired.target_groups.iter().find(|w| w.name == t.name) else {
                        continue;
                    };
                    if !want.attributes.is_empty() {
                        t.attributes = self.describe_tg_attributes(&t.arn).await?;
                    }
                    let port = t.port.unwrap_or(want.node_port);
                    t.targets = self.describe_targets(&t.arn, port).await?;
                }
                if kept.is_none() {
                    obs.subnets = Some(self.subnets_for(cluster, desired, instances).await?);
                }
            }
        }
        Ok(obs)
    }

    /// Our load balancer for `svc` if it exists (the oldest we own); one with our name that we
    /// do not own is an error: never touch it.
    pub(crate) async fn find_owned_lb(
        &self,
        cluster: &str,
        svc: &Service,
        name: &str,
    ) -> Result<Option<LbObs>, ProviderError> {
        let mut lbs = sorted_lbs(self.find_lbs(name, true).await?);
        if lbs.is_empty() {
            return Ok(None);
        }
        let arns: Vec<String> = lbs.iter().map(|l| l.lb.arn.clone()).collect();
        let tags = self.tags(&arns).await?;
        mark_lbs(&mut lbs, &tags, cluster, svc);
        let obs = Observed {
            name: name.to_string(),
            cluster: cluster.to_string(),
            lbs,
            ..Default::default()
        };
        Ok(obs.primary()?.map(|p| p.lb.clone()))
    }

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
    pub(crate) async fn tags(
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
                    let tags = attributes_of(d.tags().iter().map(|t| (t.key(), t.value())));
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

    /// Target groups attached to the load balancer (through its listeners).
    async fn attached_tgs(&self, lb_arn: &str) -> Result<Vec<ObservedTg>, ProviderError> {
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
    async fn tgs_by_name(&self, names: &[String]) -> Result<Vec<ObservedTg>, ProviderError> {
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

    /// The load balancer's listeners.
    async fn describe_listeners(
        &self,
        lb_arn: &str,
    ) -> Result<Vec<ObservedListener>, ProviderError> {
        self.before(OpClass::Describe, "DescribeListeners").await;
        let cur = self
            .client
            .describe_listeners()
            .load_balancer_arn(lb_arn)
            .send()
            .await
            .map_err(|e| classify("DescribeListeners", e))?;
        let mut out = vec![];
        for l in cur.listeners() {
            let (Some(arn), Some(port)) = (l.listener_arn(), l.port()) else {
                continue;
            };
            let target_group = l.default_actions().first().and_then(|a| {
                a.target_group_arn().map(str::to_string).or_else(|| {
                    a.forward_config()?
                        .target_groups()
                        .first()?
                        .target_group_arn()
                        .map(str::to_string)
                })
            });
            out.push(ObservedListener {
                arn: arn.to_string(),
                port,
                protocol: l
                    .protocol()
                    .map(|p| p.as_str().to_string())
                    .unwrap_or_default(),
                target_group,
                certificate: l
                    .certificates()
                    .iter()
                    .find(|c| c.is_default() != Some(false))
                    .and_then(|c| c.certificate_arn())
                    .map(str::to_string),
                ssl_policy: l.ssl_policy().map(str::to_string),
            });
        }
        Ok(out)
    }

    async fn describe_lb_attributes(
        &self,
        arn: &str,
    ) -> Result<BTreeMap<String, String>, ProviderError> {
        self.before(OpClass::Describe, "DescribeLoadBalancerAttributes")
            .await;
        let cur = self
            .client
            .describe_load_balancer_attributes()
            .load_balancer_arn(arn)
            .send()
            .await
            .map_err(|e| classify("DescribeLoadBalancerAttributes", e))?;
        Ok(attributes_of(
            cur.attributes().iter().map(|a| (a.key(), a.value())),
        ))
    }

    async fn describe_tg_attributes(
        &self,
        arn: &str,
    ) -> Result<BTreeMap<String, String>, ProviderError> {
        self.before(OpClass::Describe, "DescribeTargetGroupAttributes")
            .await;
        let cur = self
            .client
            .describe_target_group_attributes()
            .target_group_arn(arn)
            .send()
            .await
            .map_err(|e| classify("DescribeTargetGroupAttributes", e))?;
        Ok(attributes_of(
            cur.attributes().iter().map(|a| (a.key(), a.value())),
        ))
    }

    /// The group's targets as (instance, port); a target without a port is on `port`.
    pub(crate) async fn describe_targets(
        &self,
        tg_arn: &str,
        port: i32,
    ) -> Result<BTreeSet<(String, i32)>, ProviderError> {
        self.before(OpClass::Describe, "DescribeTargetHealth").await;
        let cur = self
            .client
            .describe_target_health()
            .target_group_arn(tg_arn)
            .send()
            .await
            .map_err(|e| classify("DescribeTargetHealth", e))?;
        Ok(cur
            .target_health_descriptions()
            .iter()
            .filter_map(|d| {
                let t = d.target()?;
                Some((t.id()?.to_string(), t.port().unwrap_or(port)))
            })
            .collect())
    }
}

/// Sets each load balancer's tags and ownership from `tags` (those without tags stay unowned).
fn mark_lbs(
    lbs: &mut [ObservedLb],
    tags: &HashMap<String, BTreeMap<String, String>>,
    cluster: &str,
    svc: &Service,
) {
    for l in lbs {
        if let Some(t) = tags.get(&l.lb.arn) {
            l.owned = owned_by(t, cluster, svc);
            l.tags = t.clone();
        }
    }
}
