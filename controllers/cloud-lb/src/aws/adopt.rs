//! Adoption of an existing NLB with make-before-break (issue 13): the annotation
//! [`ADOPT_ANNOTATION`] names a load balancer (by name or ARN) that the Service takes over,
//! keeping its DNS name, addresses and PrivateLink endpoints.
//!
//! Steps, one ensure at a time (each ensure observes again, so a crash anywhere resumes):
//! 1. refuse, with a Permanent error (Warning Event, no change, no retry until the Service
//!    changes), a load balancer that is not a network load balancer, whose scheme is not the
//!    one the Service asks for (keeping it would mean replacing it), or that is tagged for
//!    another cluster (`kubernetes.io/cluster/<other>`, or the AWS Load Balancer Controller's
//!    `elbv2.k8s.aws/cluster`) or for another Service of ours;
//! 2. tag it as ours (cluster and Service tags, AddTags: tags are only ever added);
//! 3. create our target groups beside the old ones and register the targets, with every
//!    listener change held back ([`hold_switch`]), and come back at the next retry (targets
//!    registered just now are `initial`, never healthy yet);
//! 4. once each of our groups has a healthy target ([`ready_to_switch`], DescribeTargetHealth),
//!    switch the listeners (ModifyListener in place on the same port and protocol, so the
//!    listener never goes away) and only then delete the groups the old owner's listeners
//!    forwarded to ([`leftovers`]). Until then the ensure fails as retryable with the code
//!    [`WAITING_FOR_HEALTHY_TARGETS`] and is retried with the Service's backoff.
//!
//! From then on the load balancer is the Service's, under its adopted name: updates, drift
//! repair and deletion (which deletes it, as any load balancer of ours) work as for one we made.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Service;
use tracing::{debug, info};

use super::AwsProvider;
use super::budget::OpClass;
use super::elb::apply::Applied;
use super::elb::observe::Depth;
use super::elb::{self, ElbCall, ElbPlan, Observed};
use super::errors::{classify, is_code};
use super::spec::{self, DesiredLb, Scheme};
use crate::provider::ProviderError;

/// The annotation naming the load balancer a Service adopts: its name or its ARN.
pub const ADOPT_ANNOTATION: &str = "service-controller-manager.io/adopt-load-balancer";
/// The code of a refused adoption (Permanent).
pub const ADOPTION_REFUSED: &str = "AdoptionRefused";
/// The code of the retryable error while our new targets are not healthy yet.
pub const WAITING_FOR_HEALTHY_TARGETS: &str = "AdoptionWaitingForHealthyTargets";
/// The AWS Load Balancer Controller's cluster tag.
const ALBC_CLUSTER_TAG: &str = "elbv2.k8s.aws/cluster";

fn refused(message: String) -> ProviderError {
    ProviderError::permanent(message).with_code(ADOPTION_REFUSED)
}

/// The name of the load balancer the Service adopts, if it asks for one: the annotation's
/// name, or the name inside its ARN (`…:loadbalancer/net/<name>/<id>`). A value that is no
/// ELBv2 name or load balancer ARN is refused; the type is checked once described.
pub fn adopted_name(svc: &Service) -> Result<Option<String>, ProviderError> {
    let Some(v) = svc
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ADOPT_ANNOTATION))
    else {
        return Ok(None);
    };
    let v = v.trim();
    let name = if v.starts_with("arn:") {
        let path = v.split_once(":loadbalancer/").map(|(_, p)| p);
        // `<kind>/<name>/<id>`. The kind (`net`, `app`, `gwy`) is not trusted: the type
        // DescribeLoadBalancers reports decides (moto writes `app` into every ARN).
        match path.map(|p| p.split('/').collect::<Vec<_>>()).as_deref() {
            Some([_kind, name, _id]) => name.to_string(),
            _ => {
                return Err(refused(format!(
                    "{ADOPT_ANNOTATION}: {v} is not a load balancer ARN"
                )));
            }
        }
    } else {
        v.to_string()
    };
    let valid = !name.is_empty()
        && name.len() <= 32
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.starts_with("internal-");
    if !valid {
        return Err(refused(format!(
            "{ADOPT_ANNOTATION}: {name:?} is not a load balancer name (1-32 letters, digits and inner hyphens)"
        )));
    }
    Ok(Some(name))
}

/// What adoption does with the named load balancer, as found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Already tagged as this Service's: manage it as ours.
    Ours,
    /// Free to adopt: add these tags first.
    Tag(BTreeMap<String, String>),
}

/// Decides whether the Service may adopt a load balancer of `lb_type` and `scheme` carrying
/// `tags`; a refusal is a Permanent error that names no other Service.
pub fn verdict(
    name: &str,
    lb_type: Option<&str>,
    scheme: Option<&str>,
    want: Scheme,
    tags: &BTreeMap<String, String>,
    cluster: &str,
    svc: &Service,
) -> Result<Verdict, ProviderError> {
    if lb_type != Some("network") {
        return Err(refused(format!(
            "cannot adopt load balancer {name}: it is a {} load balancer, not a network load balancer",
            lb_type.unwrap_or("unknown")
        )));
    }
    if let Some(s) = scheme
        && s != want.as_str()
    {
        return Err(refused(format!(
            "cannot adopt load balancer {name}: it is {s} but the Service asks for {} (the scheme cannot change in place)",
            want.as_str()
        )));
    }
    let ours = spec::cluster_tag_key(cluster);
    let other_cluster = tags.keys().any(|k| {
        k.strip_prefix("kubernetes.io/cluster/")
            .is_some_and(|c| c != cluster)
    }) || tags.get(ALBC_CLUSTER_TAG).is_some_and(|c| c != cluster);
    if other_cluster {
        return Err(refused(format!(
            "cannot adopt load balancer {name}: it is tagged for another cluster"
        )));
    }
    let want_service = format!(
        "{}/{}",
        svc.metadata.namespace.as_deref().unwrap_or(""),
        svc.metadata.name.as_deref().unwrap_or("")
    );
    match (tags.get(&ours), tags.get(spec::SERVICE_TAG)) {
        (Some(_), Some(s)) if *s != want_service => Err(refused(format!(
            "cannot adopt load balancer {name}: it belongs to another Service"
        ))),
        (Some(v), Some(_)) if v == "owned" => Ok(Verdict::Ours),
        _ => Ok(Verdict::Tag(
            [
                (ours, "owned".to_string()),
                (spec::SERVICE_TAG.to_string(), want_service),
            ]
            .into(),
        )),
    }
}

fn listener_change(c: &ElbCall) -> bool {
    matches!(
        c,
        ElbCall::DeleteListener { .. }
            | ElbCall::CreateListener { .. }
            | ElbCall::ModifyListener { .. }
            | ElbCall::DeleteTargetGroup { .. }
    )
}

/// Whether the plan changes listeners (or deletes groups, which follows a switch).
pub fn switches(plan: &ElbPlan) -> bool {
    plan.calls.iter().any(listener_change)
}

/// The plan with every listener change (and group deletion) held back: what may happen before
/// the new targets are healthy.
pub fn hold_switch(plan: &ElbPlan) -> ElbPlan {
    ElbPlan {
        calls: plan
            .calls
            .iter()
            .filter(|c| !listener_change(c))
            .cloned()
            .collect(),
        ..plan.clone()
    }
}

/// Whether every group of `health` (its targets' states, as DescribeTargetHealth reports
/// them) has at least one healthy target; no group at all is not ready.
pub fn ready_to_switch(health: &[Vec<String>]) -> bool {
    !health.is_empty() && health.iter().all(|g| g.iter().any(|s| s == "healthy"))
}

/// The target groups the old owner left on the adopted load balancer: those its listeners
/// forward to and those attached to it, less ours. Deleted once every listener forwards to
/// ours (a group a listener still uses cannot be deleted anyway).
pub fn leftovers(obs: &Observed) -> BTreeSet<String> {
    let ours: BTreeSet<&str> = obs
        .target_groups
        .iter()
        .filter(|t| t.owned)
        .map(|t| t.arn.as_str())
        .collect();
    let forwarded = obs
        .lbs
        .iter()
        .filter(|l| l.owned)
        .flat_map(|l| l.listeners.iter())
        .filter_map(|l| l.target_group.clone());
    let attached = obs
        .target_groups
        .iter()
        .filter(|t| !t.owned)
        .map(|t| t.arn.clone());
    forwarded
        .chain(attached)
        .filter(|arn| !ours.contains(arn.as_str()))
        .collect()
}

impl AwsProvider {
    /// Steps 1 and 2: refuses the named load balancer or tags it as the Service's. One gone
    /// while the Service already shows an address was adopted before and deleted out of band:
    /// the plan then creates a new one under that name.
    pub(crate) async fn adopt_check(
        &self,
        cluster: &str,
        svc: &Service,
        name: &str,
        want: Scheme,
    ) -> Result<(), ProviderError> {
        self.before(OpClass::Describe, "DescribeLoadBalancers")
            .await;
        let found = match self
            .client
            .describe_load_balancers()
            .names(name)
            .send()
            .await
        {
            Ok(o) => o.load_balancers().to_vec(),
            Err(e) if is_code(&e, &["LoadBalancerNotFound"]) => vec![],
            Err(e) => return Err(classify("DescribeLoadBalancers", e)),
        };
        let Some((lb, arn)) = found
            .first()
            .and_then(|l| Some((l, l.load_balancer_arn()?.to_string())))
        else {
            if super::has_ingress(svc) {
                return Ok(());
            }
            return Err(refused(format!(
                "cannot adopt load balancer {name}: no load balancer of that name"
            )));
        };
        let tags = self
            .tags(std::slice::from_ref(&arn))
            .await?
            .remove(&arn)
            .unwrap_or_default();
        let kind = lb.r#type().map(|t| t.as_str());
        let scheme = lb.scheme().map(|s| s.as_str());
        match verdict(name, kind, scheme, want, &tags, cluster, svc)? {
            Verdict::Ours => Ok(()),
            Verdict::Tag(tags) => {
                info!(lb = %name, service = ?svc.metadata.name, "adopting load balancer: tagging it as ours");
                let plan = ElbPlan {
                    calls: vec![ElbCall::AddTags { arn, tags }],
                    ..Default::default()
                };
                self.apply(&plan, &Observed::default()).await?;
                Ok(())
            }
        }
    }

    /// Steps 3 and 4 for an adopted load balancer (tagged ours by [`Self::adopt_check`]):
    /// observe and plan as for any of ours, but hold every listener change back until each of
    /// our target groups has a healthy target; then switch and delete the old owner's groups.
    pub(crate) async fn apply_adopted(
        &self,
        cluster: &str,
        svc: &Service,
        d: &DesiredLb,
        instances: &BTreeSet<String>,
    ) -> Result<Applied, ProviderError> {
        let tg_names: Vec<String> = d.target_groups.iter().map(|t| t.name.clone()).collect();
        let depth = Depth::Full {
            desired: d,
            instances,
        };
        let obs = self
            .observe(cluster, svc, &d.name, &tg_names, true, depth)
            .await?;
        let plan = elb::plan(d, &obs, instances)?;
        self.forget(&d.name);
        if !switches(&plan) {
            return self.apply(&plan, &obs).await;
        }
        let held = hold_switch(&plan);
        let ready = if held.calls.is_empty() {
            let mut health = vec![];
            for t in obs
                .target_groups
                .iter()
                .filter(|t| t.owned && tg_names.contains(&t.name))
            {
                health.push(self.target_states(&t.arn).await?);
            }
            ready_to_switch(&health)
        } else {
            // Targets registered just now are never healthy yet (ELBv2 reports them `initial`
            // until the health check's threshold has passed): look again at the next retry.
            debug!(lb = %d.name, calls = ?held.operations(), "adoption: our groups before the switch");
            self.apply(&held, &obs).await?;
            false
        };
        if !ready {
            return Err(ProviderError::retryable(format!(
                "adopting load balancer {}: waiting for the new targets to become healthy before switching its listeners",
                d.name
            ))
            .with_code(WAITING_FOR_HEALTHY_TARGETS));
        }
        let old = leftovers(&obs);
        info!(lb = %d.name, calls = ?plan.operations(), "adoption: switching listeners to our target groups");
        let applied = self.apply(&plan, &obs).await?;
        if !old.is_empty() {
            info!(lb = %d.name, groups = old.len(), "adoption: deleting the old owner's target groups");
            let delete = ElbPlan {
                calls: old
                    .into_iter()
                    .map(|arn| ElbCall::DeleteTargetGroup { arn })
                    .collect(),
                ..Default::default()
            };
            self.apply(&delete, &obs).await?;
        }
        Ok(applied)
    }

    /// The states of a group's targets (DescribeTargetHealth).
    async fn target_states(&self, arn: &str) -> Result<Vec<String>, ProviderError> {
        self.before(OpClass::Describe, "DescribeTargetHealth").await;
        let out = self
            .client
            .describe_target_health()
            .target_group_arn(arn)
            .send()
            .await
            .map_err(|e| classify("DescribeTargetHealth", e))?;
        Ok(out
            .target_health_descriptions()
            .iter()
            .filter_map(|d| Some(d.target_health()?.state()?.as_str().to_string()))
            .collect())
    }
}

#[cfg(test)]
mod tests;
