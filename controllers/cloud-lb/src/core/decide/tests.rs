//! The decision table.

use super::*;
use crate::core::LB_FINALIZER;
use k8s_openapi::api::core::v1::{LoadBalancerIngress, ServicePort, ServiceSpec, ServiceStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

const OURS: &str = "example.com/ours";

/// A Service described by the table's columns.
#[derive(Clone, Copy)]
struct S {
    type_: &'static str,
    class: Option<&'static str>,
    finalizer: bool,
    deleting: bool,
    /// The published ingress IP, if any.
    ip: Option<&'static str>,
    port: i32,
}

const LB: S = S {
    type_: "LoadBalancer",
    class: Some(OURS),
    finalizer: true,
    deleting: false,
    ip: Some("10.0.0.1"),
    port: 80,
};

fn status(ip: Option<&str>) -> LoadBalancerStatus {
    LoadBalancerStatus {
        ingress: ip.map(|ip| {
            vec![LoadBalancerIngress {
                ip: Some(ip.into()),
                ..Default::default()
            }]
        }),
    }
}

fn service(s: S) -> Service {
    Service {
        metadata: ObjectMeta {
            namespace: Some("ns".into()),
            name: Some("svc".into()),
            uid: Some("uid-1".into()),
            finalizers: s.finalizer.then(|| vec![LB_FINALIZER.to_string()]),
            deletion_timestamp: s.deleting.then(|| Time(Default::default())),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            type_: Some(s.type_.into()),
            load_balancer_class: s.class.map(str::to_string),
            ports: Some(vec![ServicePort {
                port: s.port,
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: Some(ServiceStatus {
            load_balancer: Some(status(s.ip)),
            ..Default::default()
        }),
    }
}

fn nodes(names: &[&str]) -> NodeFingerprint {
    names.iter().map(|n| (n.to_string(), None)).collect()
}

/// What we remember: the last sync of `s` with node set `ns` and published `ip`.
fn last(s: S, ns: &[&str], ip: Option<&str>) -> Option<LastSync> {
    let svc = service(s);
    Some(LastSync {
        spec: spec_fingerprint(&svc),
        service: svc,
        nodes: nodes(ns),
        status: status(ip),
    })
}

fn observed(svc: Option<S>) -> Observed {
    Observed {
        restored: true,
        service: svc.map(service),
        nodes: nodes(&["a", "b"]),
        ..Default::default()
    }
}

#[test]
fn decision_table() {
    let filter = ClassFilter {
        class: Some(OURS.into()),
        default_implementation: false,
    };
    let fresh = S {
        finalizer: false,
        ip: None,
        ..LB
    };
    let moved = S { port: 8080, ..LB };
    let parked_spec = spec_fingerprint(&service(fresh));
    let wait = Duration::from_secs(7);
    let rows: Vec<(&str, Observed, Step)> = vec![
        (
            "first reconcile of a term restores, whatever the Service",
            Observed {
                restored: false,
                ..observed(Some(fresh))
            },
            Step::Restore,
        ),
        (
            "new Service of our class",
            observed(Some(fresh)),
            Step::Ensure,
        ),
        (
            "a class-less Service is not ours (not the default)",
            observed(Some(S {
                class: None,
                ..fresh
            })),
            Step::Ignore,
        ),
        (
            "another implementation's Service, even remembered",
            Observed {
                last: last(LB, &["a", "b"], Some("10.0.0.1")),
                ..observed(Some(S {
                    class: Some("other.example.com/lb"),
                    ..fresh
                }))
            },
            Step::Ignore,
        ),
        (
            "type changed away with our finalizer",
            observed(Some(S {
                type_: "ClusterIP",
                ..LB
            })),
            Step::Cleanup,
        ),
        (
            "back as another class's LoadBalancer with our finalizer, seen leaving (no leader \
             meanwhile; the API server cleared the status with the type)",
            Observed {
                left_our_class: true,
                ..observed(Some(S {
                    class: Some("other.example.com/lb"),
                    ip: None,
                    ..LB
                }))
            },
            Step::Cleanup,
        ),
        (
            "another class's LoadBalancer with the (shared) finalizer, never seen leaving ours",
            observed(Some(S {
                class: Some("other.example.com/lb"),
                ip: None,
                ..LB
            })),
            Step::Ignore,
        ),
        (
            "being deleted with our finalizer",
            observed(Some(S {
                deleting: true,
                ..LB
            })),
            Step::Cleanup,
        ),
        (
            "being deleted without our finalizer",
            observed(Some(S {
                deleting: true,
                finalizer: false,
                ..LB
            })),
            Step::Ignore,
        ),
        (
            "implemented elsewhere, never ours",
            Observed {
                implemented_elsewhere: true,
                ..observed(Some(fresh))
            },
            Step::Ignore,
        ),
        (
            "implemented elsewhere now, ours before (finalizer on)",
            Observed {
                implemented_elsewhere: true,
                ..observed(Some(LB))
            },
            Step::Cleanup,
        ),
        (
            "gone, remembered: delete from what we last saw",
            Observed {
                last: last(LB, &["a", "b"], Some("10.0.0.1")),
                ..observed(None)
            },
            Step::DeleteVanished,
        ),
        ("gone, nothing remembered", observed(None), Step::Forget),
        (
            "this spec failed permanently",
            Observed {
                parked: Some(parked_spec.clone()),
                ..observed(Some(fresh))
            },
            Step::Park,
        ),
        (
            "a permanent failure of another spec does not park this one",
            Observed {
                parked: Some(parked_spec.clone()),
                ..observed(Some(moved))
            },
            Step::Ensure,
        ),
        (
            "everything as last synced",
            Observed {
                last: last(LB, &["a", "b"], Some("10.0.0.1")),
                ..observed(Some(LB))
            },
            Step::InSync,
        ),
        (
            "our status write not in the cache yet, or overwritten",
            Observed {
                last: last(LB, &["a", "b"], Some("10.0.0.1")),
                ..observed(Some(S { ip: None, ..LB }))
            },
            Step::StatusOnly,
        ),
        (
            "only the node set changed",
            Observed {
                last: last(LB, &["a"], Some("10.0.0.1")),
                ..observed(Some(LB))
            },
            Step::HostsOnly {
                rewrite_status: false,
            },
        ),
        (
            "node set and status both differ",
            Observed {
                last: last(LB, &["a"], Some("10.0.0.1")),
                ..observed(Some(S {
                    ip: Some("10.0.0.9"),
                    ..LB
                }))
            },
            Step::HostsOnly {
                rewrite_status: true,
            },
        ),
        (
            "the spec changed since the last sync",
            Observed {
                last: last(LB, &["a", "b"], Some("10.0.0.1")),
                ..observed(Some(moved))
            },
            Step::Ensure,
        ),
        (
            "throttled: an ensure waits out the hint",
            Observed {
                retry_wait: Some(wait),
                ..observed(Some(fresh))
            },
            Step::Wait(wait),
        ),
        (
            "throttled: a cleanup waits too",
            Observed {
                retry_wait: Some(wait),
                ..observed(Some(S {
                    deleting: true,
                    ..LB
                }))
            },
            Step::Wait(wait),
        ),
        (
            "throttled: a status rewrite needs no cloud call",
            Observed {
                retry_wait: Some(wait),
                last: last(LB, &["a", "b"], Some("10.0.0.1")),
                ..observed(Some(S { ip: None, ..LB }))
            },
            Step::StatusOnly,
        ),
        (
            "throttled: restore still comes first",
            Observed {
                restored: false,
                retry_wait: Some(wait),
                ..observed(Some(fresh))
            },
            Step::Restore,
        ),
        (
            "periodic pass, in sync: ask whether the load balancer still exists",
            Observed {
                verify: true,
                last: last(LB, &["a", "b"], Some("10.0.0.1")),
                ..observed(Some(LB))
            },
            Step::LookUp,
        ),
        (
            "periodic pass, in sync, load balancer found",
            Observed {
                verify: true,
                found: Some(true),
                last: last(LB, &["a", "b"], Some("10.0.0.1")),
                ..observed(Some(LB))
            },
            Step::InSync,
        ),
        (
            "periodic pass, in sync, load balancer deleted out of band",
            Observed {
                verify: true,
                found: Some(false),
                last: last(LB, &["a", "b"], Some("10.0.0.1")),
                ..observed(Some(LB))
            },
            Step::Recreate,
        ),
        (
            "periodic pass, throttled: the look-up waits too",
            Observed {
                verify: true,
                retry_wait: Some(wait),
                last: last(LB, &["a", "b"], Some("10.0.0.1")),
                ..observed(Some(LB))
            },
            Step::Wait(wait),
        ),
        (
            "periodic pass while a host update is due: the update comes first",
            Observed {
                verify: true,
                last: last(LB, &["a"], Some("10.0.0.1")),
                ..observed(Some(LB))
            },
            Step::HostsOnly {
                rewrite_status: false,
            },
        ),
        (
            "a status on a Service of our class is ours (no served-elsewhere check)",
            observed(Some(S {
                finalizer: false,
                ..LB
            })),
            Step::Ensure,
        ),
    ];
    for (what, o, want) in rows {
        assert_eq!(decide(&filter, &o), want, "{what}");
    }
}

#[test]
fn default_implementation_serves_class_less_services() {
    let filter = ClassFilter {
        class: None,
        default_implementation: true,
    };
    let s = S {
        class: None,
        finalizer: false,
        ip: None,
        ..LB
    };
    assert_eq!(decide(&filter, &observed(Some(s))), Step::Ensure);
    // Leftover status of ours on a Service that is no longer a LoadBalancer is cleared.
    let left = S {
        type_: "NodePort",
        ..s
    };
    let with_status = S {
        ip: Some("1.2.3.4"),
        ..left
    };
    assert_eq!(decide(&filter, &observed(Some(left))), Step::Ignore);
    assert_eq!(decide(&filter, &observed(Some(with_status))), Step::Cleanup);
}

#[test]
fn only_provider_steps_wait() {
    let all = [
        Step::Restore,
        Step::Wait(Duration::from_secs(1)),
        Step::Ignore,
        Step::Forget,
        Step::DeleteVanished,
        Step::Cleanup,
        Step::Park,
        Step::InSync,
        Step::StatusOnly,
        Step::HostsOnly {
            rewrite_status: true,
        },
        Step::Ensure,
        Step::LookUp,
        Step::Recreate,
        Step::ServedElsewhere { warn: true },
    ];
    let calling: Vec<Step> = all.into_iter().filter(|s| s.calls_provider()).collect();
    assert_eq!(
        calling,
        vec![
            Step::DeleteVanished,
            Step::Cleanup,
            Step::HostsOnly {
                rewrite_status: true
            },
            Step::Ensure,
            Step::LookUp,
            Step::Recreate,
        ]
    );
}

/// Issue 12 defect 7: beside the cluster's own cloud-controller-manager (which serves
/// class-less Services too, with the same finalizer name), a class-less Service showing a
/// load balancer we hold no record of is only ours if our provider finds our load balancer
/// (or, gone, the status is one it would write and our finalizer is on).
#[test]
fn class_less_service_served_elsewhere() {
    let filter = ClassFilter {
        class: None,
        default_implementation: true,
    };
    let theirs = S {
        class: None,
        finalizer: false,
        ..LB
    };
    let theirs_finalized = S {
        finalizer: true,
        ..theirs
    };
    let ours_before = theirs_finalized;
    let refused = refusal_key(&service(theirs));
    let rows: Vec<(&str, Observed, Step)> = vec![
        (
            "a status we hold no record of: ask the provider first",
            observed(Some(theirs)),
            Step::LookUp,
        ),
        (
            "no load balancer of ours: served elsewhere",
            Observed {
                found: Some(false),
                ..observed(Some(theirs))
            },
            Step::ServedElsewhere { warn: true },
        ),
        (
            "the other controller's finalizer (same name) proves nothing",
            Observed {
                found: Some(false),
                ..observed(Some(theirs_finalized))
            },
            Step::ServedElsewhere { warn: true },
        ),
        (
            "a status we would not write, even if the provider recognised it, without our finalizer",
            Observed {
                found: Some(false),
                recognised: true,
                ..observed(Some(theirs))
            },
            Step::ServedElsewhere { warn: true },
        ),
        (
            "refused before, nothing changed: no look-up, no second Warning",
            Observed {
                refused: Some(refused.clone()),
                ..observed(Some(theirs))
            },
            Step::ServedElsewhere { warn: false },
        ),
        (
            "refused before, the status changed: look again, no second Warning",
            Observed {
                refused: Some(refused.clone()),
                found: Some(false),
                ..observed(Some(S {
                    ip: Some("10.0.0.2"),
                    ..theirs
                }))
            },
            Step::ServedElsewhere { warn: false },
        ),
        (
            "ours before a restart: the provider finds our load balancer (adopted)",
            Observed {
                found: Some(true),
                ..observed(Some(ours_before))
            },
            Step::Ensure,
        ),
        (
            "ours before a restart, deleted out of band meanwhile: recreated",
            Observed {
                found: Some(false),
                recognised: true,
                ..observed(Some(ours_before))
            },
            Step::Recreate,
        ),
        (
            "the other controller cleared its status: ours to serve",
            Observed {
                refused: Some(refused.clone()),
                ..observed(Some(S { ip: None, ..theirs }))
            },
            Step::Ensure,
        ),
        (
            "remembered (we wrote that status in this term): no check",
            Observed {
                last: last(ours_before, &["a", "b"], Some("10.0.0.1")),
                ..observed(Some(ours_before))
            },
            Step::InSync,
        ),
        (
            "being deleted with the (shared) finalizer and a status of unknown origin: look",
            observed(Some(S {
                deleting: true,
                ..theirs_finalized
            })),
            Step::LookUp,
        ),
        (
            "being deleted, served elsewhere: their finalizer and status are left alone",
            Observed {
                found: Some(false),
                ..observed(Some(S {
                    deleting: true,
                    ..theirs_finalized
                }))
            },
            Step::ServedElsewhere { warn: true },
        ),
        (
            "being deleted, refused before: left alone without a look-up",
            Observed {
                refused: Some(refused.clone()),
                ..observed(Some(S {
                    deleting: true,
                    ..theirs_finalized
                }))
            },
            Step::ServedElsewhere { warn: false },
        ),
        (
            "being deleted, ours (our load balancer exists): cleanup",
            Observed {
                found: Some(true),
                ..observed(Some(S {
                    deleting: true,
                    ..theirs_finalized
                }))
            },
            Step::Cleanup,
        ),
        (
            "being deleted, ours but already gone (status we would write): cleanup",
            Observed {
                found: Some(false),
                recognised: true,
                ..observed(Some(S {
                    deleting: true,
                    ..theirs_finalized
                }))
            },
            Step::Cleanup,
        ),
    ];
    for (what, o, want) in rows {
        assert_eq!(decide(&filter, &o), want, "{what}");
    }
}
