//! Table tests of the ELBv2 plan: an observed state and a Service in, exactly these calls out.

mod changes;
mod listeners_tls;
mod ownership;

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::Service;

use crate::aws::elb::{LbObs, Observed, ObservedLb, ObservedListener, ObservedTg};
use crate::aws::spec::{self, Defaults, DesiredLb};

pub(super) const CLUSTER: &str = "c";

pub(super) use crate::aws::spec::tests::svc;

pub(super) fn desired(s: &Service) -> DesiredLb {
    let defaults = Defaults {
        subnets: vec!["subnet-1".into()],
    };
    spec::desired(CLUSTER, s, &defaults).expect("valid Service")
}

pub(super) fn nodes(ids: &[&str]) -> BTreeSet<String> {
    ids.iter().map(|s| s.to_string()).collect()
}

pub(super) fn targets(ids: &[&str], port: i32) -> BTreeSet<(String, i32)> {
    ids.iter().map(|s| (s.to_string(), port)).collect()
}

pub(super) fn tg_name(s: &Service, port: i32, proto: &str, node_port: i32) -> String {
    spec::target_group_name(CLUSTER, s, port, proto, node_port)
}

pub(super) const LB_ARN: &str = "arn:lb/web";

pub(super) fn tg_arn(name: &str) -> String {
    format!("arn:tg/{name}")
}

pub(super) fn listener_arn(port: i32) -> String {
    format!("arn:listener/{port}")
}

/// What ELBv2 holds once `d` was applied with `instances` as targets, plus what AWS adds
/// (an attribute and a tag we do not manage, which must stay alone).
pub(super) fn converged(d: &DesiredLb, instances: &BTreeSet<String>) -> Observed {
    let mut tags = d.tags.clone();
    tags.insert("added-by-someone".into(), "x".into());
    let mut attributes = d.lb_attributes.clone();
    attributes.insert("deletion_protection.enabled".into(), "false".into());
    Observed {
        name: d.name.clone(),
        cluster: CLUSTER.into(),
        lbs: vec![ObservedLb {
            lb: LbObs {
                arn: LB_ARN.into(),
                dns: Some("web.elb.example".into()),
                vpc: Some("vpc-1".into()),
                scheme: Some(d.scheme.as_str().into()),
                subnets: vec!["subnet-1".into()],
            },
            tags: tags.clone(),
            owned: true,
            attributes,
            listeners: d
                .listeners
                .iter()
                .map(|l| ObservedListener {
                    arn: listener_arn(l.port),
                    port: l.port,
                    protocol: l.protocol.clone(),
                    target_group: Some(tg_arn(&l.target_group)),
                    certificate: l.tls.as_ref().map(|t| t.certificate.clone()),
                    ssl_policy: l.tls.as_ref().and_then(|t| t.policy.clone()),
                })
                .collect(),
        }],
        target_groups: d
            .target_groups
            .iter()
            .map(|t| ObservedTg {
                arn: tg_arn(&t.name),
                name: t.name.clone(),
                port: Some(t.node_port),
                health: t.health.clone(),
                tags: tags.clone(),
                owned: true,
                attributes: t.attributes.clone(),
                targets: instances.iter().map(|i| (i.clone(), t.node_port)).collect(),
            })
            .collect(),
        subnets: None,
        orphans: BTreeSet::new(),
    }
}

/// Nothing exists yet; subnets were resolved for the create.
pub(super) fn nothing(d: &DesiredLb) -> Observed {
    Observed {
        name: d.name.clone(),
        cluster: CLUSTER.into(),
        subnets: Some(vec!["subnet-1".into()]),
        ..Default::default()
    }
}
