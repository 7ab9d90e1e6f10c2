//! The pure part of the ELBv2 half: desired state and [`Observed`] in, [`ElbPlan`] out. No
//! call is made here, so every decision (what to create, modify, switch, delete, and what never
//! to touch) is covered by table tests.
//!
//! Order of a plan: duplicates and a load balancer whose scheme changes are deleted, the load
//! balancer is created (or its attributes and tags corrected), each wanted target group is
//! created (or its health check and tags corrected) with its attributes and targets, listeners
//! no longer wanted are deleted, each wanted listener is created or switched to its group, and
//! last the groups no longer wanted are deleted, once nothing forwards to them.
//!
//! Emulator-proofing: a changed NodePort gets a new target group (its name hashes the node
//! port) rather than re-registered ports; a listener protocol change is delete-then-create
//! (moto cannot ModifyListener to UDP).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::{ElbCall, ElbPlan, LbRef, Observed, ObservedListener, TgRef, keeps};
use crate::aws::spec::{DesiredLb, Tls, subnet_mappings};
use crate::provider::ProviderError;

/// The wanted attributes whose current value differs (or is missing): what a Modify*Attributes
/// call must send, shared by load balancers and target groups so both diff the same way.
pub fn attribute_changes(
    have: &BTreeMap<String, String>,
    want: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    want.iter()
        .filter(|(k, v)| have.get(*k) != Some(*v))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The wanted tags a resource lacks or has with another value (tags others added stay).
fn tag_changes(
    have: &BTreeMap<String, String>,
    want: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    attribute_changes(have, want)
}

/// Targets per RegisterTargets or DeregisterTargets call (cloud-provider-aws's chunk size for
/// both): a large cluster's node set goes in several calls rather than one ELBv2 may refuse.
pub const MAX_TARGETS_PER_CALL: usize = 100;

/// `targets` in sorted batches of at most [`MAX_TARGETS_PER_CALL`].
fn batches(targets: BTreeSet<(String, i32)>) -> Vec<BTreeSet<(String, i32)>> {
    let all: Vec<(String, i32)> = targets.into_iter().collect();
    all.chunks(MAX_TARGETS_PER_CALL)
        .map(|c| c.iter().cloned().collect())
        .collect()
}

/// The (de)registrations that make exactly `instances` the targets of `tg` on `port`, in
/// batches of at most [`MAX_TARGETS_PER_CALL`]; every deregistration comes first.
pub fn target_changes(
    tg: &TgRef,
    port: i32,
    have: &BTreeSet<(String, i32)>,
    instances: &BTreeSet<String>,
) -> Vec<ElbCall> {
    let want: BTreeSet<(String, i32)> = instances.iter().map(|i| (i.clone(), port)).collect();
    let remove: BTreeSet<(String, i32)> = have.difference(&want).cloned().collect();
    let add: BTreeSet<(String, i32)> = want.difference(have).cloned().collect();
    let mut calls = vec![];
    for targets in batches(remove) {
        calls.push(ElbCall::DeregisterTargets {
            tg: tg.clone(),
            targets,
        });
    }
    for targets in batches(add) {
        calls.push(ElbCall::RegisterTargets {
            tg: tg.clone(),
            targets,
        });
    }
    calls
}

/// The calls that bring what `obs` saw to `d` with `instances` as targets. Errors (and plans
/// nothing) when a load balancer or a wanted target group with our name is not ours.
pub fn plan(
    d: &DesiredLb,
    obs: &Observed,
    instances: &BTreeSet<String>,
) -> Result<ElbPlan, ProviderError> {
    let primary = obs.primary()?;
    for t in &obs.target_groups {
        if !t.owned && d.target_groups.iter().any(|w| w.name == t.name) {
            return Err(ProviderError::retryable(format!(
                "a target group named {} exists but is not owned by this Service; not touching it",
                t.name
            )));
        }
    }
    let mut calls = vec![];
    for dup in obs.duplicates() {
        calls.push(ElbCall::DeleteLoadBalancer {
            arn: dup.lb.arn.clone(),
        });
    }
    let kept = primary.filter(|p| keeps(&p.lb, d.scheme));
    if let Some(p) = primary
        && kept.is_none()
    {
        // The scheme cannot change in place: replace the load balancer.
        calls.push(ElbCall::DeleteLoadBalancer {
            arn: p.lb.arn.clone(),
        });
    }
    let lb = match kept {
        Some(p) => {
            let attributes = attribute_changes(&p.attributes, &d.lb_attributes);
            if !attributes.is_empty() {
                calls.push(ElbCall::ModifyLoadBalancerAttributes {
                    lb: LbRef::Existing(p.lb.arn.clone()),
                    attributes,
                });
            }
            let tags = tag_changes(&p.tags, &d.tags);
            if !tags.is_empty() {
                calls.push(ElbCall::AddTags {
                    arn: p.lb.arn.clone(),
                    tags,
                });
            }
            LbRef::Existing(p.lb.arn.clone())
        }
        None => {
            let subnets = obs.subnets.clone().ok_or_else(|| {
                ProviderError::retryable(format!(
                    "no subnets resolved to create load balancer {}",
                    d.name
                ))
                .with_code(crate::core::condition::SUBNETS_NOT_FOUND)
            })?;
            // One address per subnet, or refused before anything is made.
            subnet_mappings(&subnets, &d.eip_allocations, &d.private_ipv4_addresses)?;
            calls.push(ElbCall::CreateLoadBalancer {
                name: d.name.clone(),
                scheme: d.scheme,
                ip_address_type: d.ip_address_type.clone(),
                subnets,
                eip_allocations: d.eip_allocations.clone(),
                private_ipv4_addresses: d.private_ipv4_addresses.clone(),
                tags: d.tags.clone(),
            });
            if !d.lb_attributes.is_empty() {
                calls.push(ElbCall::ModifyLoadBalancerAttributes {
                    lb: LbRef::Created,
                    attributes: d.lb_attributes.clone(),
                });
            }
            LbRef::Created
        }
    };

    let mut groups: HashMap<&str, TgRef> = HashMap::new();
    let mut target_groups = vec![];
    let none = (BTreeMap::new(), BTreeSet::new());
    for want in &d.target_groups {
        let found = obs.target_groups.iter().find(|t| t.name == want.name);
        let (tg, port, (have_attrs, have_targets)) = match found {
            Some(t) => {
                if t.health != want.health {
                    calls.push(ElbCall::ModifyTargetGroup {
                        arn: t.arn.clone(),
                        health: want.health.clone(),
                    });
                }
                let tags = tag_changes(&t.tags, &d.tags);
                if !tags.is_empty() {
                    calls.push(ElbCall::AddTags {
                        arn: t.arn.clone(),
                        tags,
                    });
                }
                (
                    TgRef::Existing(t.arn.clone()),
                    t.port.unwrap_or(want.node_port),
                    (&t.attributes, &t.targets),
                )
            }
            None => {
                calls.push(ElbCall::CreateTargetGroup {
                    name: want.name.clone(),
                    protocol: want.protocol.clone(),
                    port: want.node_port,
                    health: want.health.clone(),
                    tags: d.tags.clone(),
                    vpc_of: lb.clone(),
                });
                (
                    TgRef::Created(want.name.clone()),
                    want.node_port,
                    (&none.0, &none.1),
                )
            }
        };
        let attributes = attribute_changes(have_attrs, &want.attributes);
        if !attributes.is_empty() {
            calls.push(ElbCall::ModifyTargetGroupAttributes {
                tg: tg.clone(),
                attributes,
            });
        }
        calls.extend(target_changes(&tg, port, have_targets, instances));
        groups.insert(want.name.as_str(), tg.clone());
        target_groups.push((tg, port));
    }

    // A load balancer being created (or replaced) has no listeners yet.
    let existing = kept.map(|p| p.listeners.as_slice()).unwrap_or_default();
    for l in existing {
        if !d.listeners.iter().any(|w| w.port == l.port) {
            calls.push(ElbCall::DeleteListener { arn: l.arn.clone() });
        }
    }
    for want in &d.listeners {
        let Some(tg) = groups.get(want.target_group.as_str()) else {
            return Err(ProviderError::retryable(format!(
                "target group {} missing",
                want.target_group
            )));
        };
        let current = existing.iter().find(|l| l.port == want.port);
        match current {
            Some(l) if l.protocol == want.protocol => {
                let same = matches!(tg, TgRef::Existing(a) if l.target_group.as_deref() == Some(a.as_str()));
                if !same || !tls_matches(l, want.tls.as_ref()) {
                    calls.push(ElbCall::ModifyListener {
                        arn: l.arn.clone(),
                        tg: tg.clone(),
                        tls: want.tls.clone(),
                    });
                }
            }
            other => {
                // A protocol change is delete then create (ModifyListener to UDP fails in moto,
                // and a brief gap is unavoidable for a protocol change anyway).
                if let Some(l) = other {
                    calls.push(ElbCall::DeleteListener { arn: l.arn.clone() });
                }
                calls.push(ElbCall::CreateListener {
                    lb: lb.clone(),
                    port: want.port,
                    protocol: want.protocol.clone(),
                    tg: tg.clone(),
                    tls: want.tls.clone(),
                });
            }
        }
    }

    // Groups no longer wanted (a port removed, a NodePort or protocol changed): deleted once no
    // listener points at them any more. Only groups we own.
    let mut unwanted: BTreeSet<String> = obs.orphans.clone();
    for t in &obs.target_groups {
        if t.owned && !d.target_groups.iter().any(|w| w.name == t.name) {
            unwanted.insert(t.arn.clone());
        }
    }
    for (tg, _) in &target_groups {
        if let TgRef::Existing(a) = tg {
            unwanted.remove(a);
        }
    }
    calls.extend(
        unwanted
            .into_iter()
            .map(|arn| ElbCall::DeleteTargetGroup { arn }),
    );
    Ok(ElbPlan {
        calls,
        lb: Some(lb),
        target_groups,
    })
}

/// Whether a listener has the wanted certificate and, when the Service names one, policy (the
/// default policy ELBv2 chose is left alone).
fn tls_matches(l: &ObservedListener, want: Option<&Tls>) -> bool {
    match want {
        None => true,
        Some(t) => {
            l.certificate.as_deref() == Some(t.certificate.as_str())
                && t.policy
                    .as_ref()
                    .is_none_or(|p| l.ssl_policy.as_deref() == Some(p.as_str()))
        }
    }
}

/// The calls that delete everything we own for the Service: its load balancers (which takes
/// their listeners with them), then its target groups. Errors when the load balancer with our
/// name is not ours.
pub fn plan_delete(obs: &Observed) -> Result<ElbPlan, ProviderError> {
    obs.primary()?;
    let mut calls: Vec<ElbCall> = obs
        .lbs
        .iter()
        .filter(|l| l.owned)
        .map(|l| ElbCall::DeleteLoadBalancer {
            arn: l.lb.arn.clone(),
        })
        .collect();
    let mut groups = obs.orphans.clone();
    groups.extend(
        obs.target_groups
            .iter()
            .filter(|t| t.owned)
            .map(|t| t.arn.clone()),
    );
    calls.extend(
        groups
            .into_iter()
            .map(|arn| ElbCall::DeleteTargetGroup { arn }),
    );
    Ok(ElbPlan {
        calls,
        lb: None,
        target_groups: vec![],
    })
}

/// The calls of a host update: every group we own points at exactly `instances` on its port.
/// Nothing when the load balancer is gone (the next ensure recreates it).
pub fn plan_hosts(obs: &Observed, instances: &BTreeSet<String>) -> Result<ElbPlan, ProviderError> {
    let Some(lb) = obs.primary()? else {
        return Ok(ElbPlan::default());
    };
    let mut plan = ElbPlan {
        lb: Some(LbRef::Existing(lb.lb.arn.clone())),
        ..Default::default()
    };
    for t in obs.target_groups.iter().filter(|t| t.owned) {
        let Some(port) = t.port else { continue };
        let tg = TgRef::Existing(t.arn.clone());
        plan.calls
            .extend(target_changes(&tg, port, &t.targets, instances));
        plan.target_groups.push((tg, port));
    }
    Ok(plan)
}

#[cfg(test)]
mod tests;
