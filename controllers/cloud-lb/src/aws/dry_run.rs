//! Dry run (`--dry-run`, `plan`): the provider observes AWS as always (describes only) and
//! computes its plans, but records each mutating call of a plan instead of making it. A plan
//! that creates the load balancer or a target group stops after recording its calls: what
//! comes after (listeners' targets, the nodes' security groups, the status) needs the ARNs
//! only a real create returns.

use std::collections::BTreeSet;

use scm_runtime::client::dry_run::DryRun;

use super::AwsProvider;
use super::elb::{ElbCall, ElbPlan, LbRef, TgRef};
use super::security::Rule;
use crate::provider::ProviderError;

/// The controller name dry-run records carry.
const CONTROLLER: &str = "cloud-lb";

/// The wanted target groups (ARN, port) a dry-run plan leaves in place.
pub(crate) type DryGroups = Option<Vec<(String, i32)>>;

/// The error ending a dry-run plan that would have created something.
pub(crate) const NOT_CREATED: &str = "dry run: a new load balancer or target group is not created, so the steps after it (listener targets, security-group rules, status) are not planned";

fn tg(r: &TgRef) -> String {
    match r {
        TgRef::Existing(arn) => arn.clone(),
        TgRef::Created(name) => format!("{name} (new)"),
    }
}

fn lb(r: &LbRef) -> String {
    match r {
        LbRef::Existing(arn) => arn.clone(),
        LbRef::Created => "(new load balancer)".to_string(),
    }
}

fn pairs<'a>(m: impl IntoIterator<Item = (&'a String, &'a String)>) -> String {
    m.into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn targets(t: &BTreeSet<(String, i32)>) -> String {
    let all: Vec<String> = t.iter().map(|(i, p)| format!("{i}:{p}")).collect();
    format!("{} targets: {}", all.len(), all.join(","))
}

/// A short summary of one ELBv2 call.
pub fn summary(call: &ElbCall) -> String {
    match call {
        ElbCall::DeleteLoadBalancer { arn } => arn.clone(),
        ElbCall::CreateLoadBalancer {
            name,
            scheme,
            ip_address_type,
            subnets,
            ..
        } => format!(
            "{name} {scheme:?} {ip_address_type}, subnets {}",
            subnets.join(",")
        ),
        ElbCall::ModifyLoadBalancerAttributes { lb: l, attributes } => {
            format!("{} {}", lb(l), pairs(attributes))
        }
        ElbCall::AddTags { arn, tags } => format!("{arn} {}", pairs(tags)),
        ElbCall::CreateTargetGroup {
            name,
            protocol,
            port,
            ..
        } => format!("{name} {protocol}:{port}"),
        ElbCall::ModifyTargetGroup { arn, health } => format!(
            "{arn} health check {}:{}{}",
            health.protocol,
            health.port,
            health.path.as_deref().unwrap_or("")
        ),
        ElbCall::ModifyTargetGroupAttributes { tg: t, attributes } => {
            format!("{} {}", tg(t), pairs(attributes))
        }
        ElbCall::DeregisterTargets { tg: t, targets: x }
        | ElbCall::RegisterTargets { tg: t, targets: x } => {
            format!("{} {}", tg(t), targets(x))
        }
        ElbCall::DeleteListener { arn } => arn.clone(),
        ElbCall::CreateListener {
            lb: l,
            port,
            protocol,
            tg: t,
            ..
        } => format!("{} {protocol}:{port} -> {}", lb(l), tg(t)),
        ElbCall::ModifyListener { arn, tg: t, .. } => format!("{arn} -> {}", tg(t)),
        ElbCall::DeleteTargetGroup { arn } => arn.clone(),
    }
}

fn rules(group: &str, rules: &[Rule]) -> String {
    let all: Vec<String> = rules
        .iter()
        .map(|r| format!("{} {}-{} from {}", r.protocol, r.from, r.to, r.cidr))
        .collect();
    format!("{group}: {}", all.join(", "))
}

impl AwsProvider {
    /// The dry run this provider records into, if any.
    pub(crate) fn dry(&self) -> Option<&DryRun> {
        self.dry_run.get()
    }

    /// In a dry run, records the calls of `plan` (for load balancer `name`) and returns what
    /// [`Self::apply`] returns instead of calling: `None` outside a dry run.
    pub(crate) fn dry_apply(
        &self,
        name: &str,
        plan: &ElbPlan,
    ) -> Option<Result<DryGroups, ProviderError>> {
        let dry = self.dry()?;
        for call in &plan.calls {
            dry.record(CONTROLLER, call.operation(), "elbv2", name, &summary(call));
        }
        let creates = plan.calls.iter().any(|c| {
            matches!(
                c,
                ElbCall::CreateLoadBalancer { .. } | ElbCall::CreateTargetGroup { .. }
            )
        });
        if creates {
            return Some(Err(ProviderError::retryable(NOT_CREATED)));
        }
        let mut groups = vec![];
        for (t, port) in &plan.target_groups {
            match t {
                TgRef::Existing(arn) => groups.push((arn.clone(), *port)),
                TgRef::Created(_) => return Some(Err(ProviderError::retryable(NOT_CREATED))),
            }
        }
        Some(Ok(Some(groups)))
    }

    /// In a dry run, records a security-group change (`op` on `group`) and returns true: the
    /// caller then skips the call.
    pub(crate) fn dry_rules(&self, op: &str, group: &str, r: &[Rule]) -> bool {
        match self.dry() {
            Some(d) => {
                d.record(CONTROLLER, op, "ec2", group, &rules(group, r));
                true
            }
            None => false,
        }
    }

    /// In a dry run, records deleting an orphan (`op`, by name and ARN) and returns true.
    pub(crate) fn dry_delete(&self, op: &str, name: &str, arn: &str) -> bool {
        match self.dry() {
            Some(d) => {
                d.record(CONTROLLER, op, "elbv2", name, arn);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_summarized_with_what_they_touch() {
        let c = ElbCall::RegisterTargets {
            tg: TgRef::Existing("arn:tg".into()),
            targets: [("i-1".to_string(), 30080), ("i-2".to_string(), 30080)].into(),
        };
        assert_eq!(summary(&c), "arn:tg 2 targets: i-1:30080,i-2:30080");
        let c = ElbCall::CreateListener {
            lb: LbRef::Created,
            port: 80,
            protocol: "TCP".into(),
            tg: TgRef::Created("k8s-tg".into()),
            tls: None,
        };
        assert_eq!(summary(&c), "(new load balancer) TCP:80 -> k8s-tg (new)");
    }
}
