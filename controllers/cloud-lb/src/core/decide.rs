//! The controller's decision for one Service key, as a value: the shell gathers what it knows
//! into an [`Observed`], [`decide`] answers with a [`Step`], and the shell only executes it.

use std::time::Duration;

use k8s_openapi::api::core::v1::{LoadBalancerStatus, Service};

use super::{
    Action, ClassFilter, NodeFingerprint, action, spec_fingerprint, status_differs, with_finalizer,
};

/// What the controller last did successfully for a Service (its memory, lost with the
/// leadership term).
#[derive(Clone, Debug, PartialEq)]
pub struct LastSync {
    /// The Service as last handled (to clean up if it vanishes without our finalizer).
    pub service: Service,
    /// [`spec_fingerprint`] at the last ensure.
    pub spec: String,
    /// The node set at the last ensure or host update.
    pub nodes: NodeFingerprint,
    /// The status the provider returned.
    pub status: LoadBalancerStatus,
}

/// Everything [`decide`] looks at for one Service key.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// Whether the provider has been restored in this leadership term.
    pub restored: bool,
    /// The Service as cached; `None` once it is gone.
    pub service: Option<Service>,
    /// The provider's `implemented_elsewhere` for the Service (a local predicate).
    pub implemented_elsewhere: bool,
    /// What we last did for it in this term, if anything.
    pub last: Option<LastSync>,
    /// The spec fingerprint whose ensure last failed permanently, if any.
    pub parked: Option<String>,
    /// The stable node set's fingerprint now.
    pub nodes: NodeFingerprint,
    /// How long the cloud still asked us to wait (a throttle's `retry_after`), if at all.
    pub retry_wait: Option<Duration>,
}

/// What a reconcile of one Service key does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// First in a leadership term: let the provider rebuild its state, then decide again.
    Restore,
    /// The cloud throttled us and said when to come back: no provider call before then.
    Wait(Duration),
    /// Not ours: forget what we remember of its last sync (nothing to clean).
    Ignore,
    /// Gone, and nothing remembered: forget it entirely.
    Forget,
    /// Gone without our finalizer (removed by hand): delete its load balancer from the
    /// Service as last handled, then forget it.
    DeleteVanished,
    /// Delete its load balancer, clear the status, drop the finalizer.
    Cleanup,
    /// The last ensure of this very spec failed permanently: nothing until the Service changes.
    Park,
    /// Spec and node set as last synced, status in place: nothing to do.
    InSync,
    /// Spec and node set as last synced, but the status differs: rewrite it, no cloud call.
    StatusOnly,
    /// Only the node set changed: point the load balancer at the new hosts (after rewriting
    /// the status first if it differs).
    HostsOnly {
        /// Whether the status must be rewritten too.
        rewrite_status: bool,
    },
    /// Create or bring the load balancer up to date: finalizer, provider ensure, status.
    Ensure,
}

impl Step {
    /// Whether executing this step calls the provider (so a throttle hint holds it back).
    pub fn calls_provider(self) -> bool {
        matches!(
            self,
            Step::DeleteVanished | Step::Cleanup | Step::HostsOnly { .. } | Step::Ensure
        )
    }
}

/// Decides the step for one Service key (upstream's `syncService` tree with our memory of the
/// last sync): clean up what we no longer serve, park after a permanent error until the spec
/// changes, rewrite only the status or only the hosts when that is all that differs, else
/// ensure. A provider step waits out a throttle hint.
pub fn decide(filter: &ClassFilter, o: &Observed) -> Step {
    if !o.restored {
        return Step::Restore;
    }
    let step = decide_restored(filter, o);
    match o.retry_wait {
        Some(d) if step.calls_provider() && !d.is_zero() => Step::Wait(d),
        _ => step,
    }
}

fn decide_restored(filter: &ClassFilter, o: &Observed) -> Step {
    let Some(svc) = &o.service else {
        // With our finalizer a Service is only gone after we cleaned up; without it (removed
        // by hand) clean up from what we last saw, as upstream's cache does.
        return if o.last.is_some() {
            Step::DeleteVanished
        } else {
            Step::Forget
        };
    };
    let mut act = action(svc, filter);
    if act == Action::Ensure && o.implemented_elsewhere {
        // Ours before the switch (our finalizer is on): release what we made and the finalizer.
        act = if with_finalizer(svc).is_none() {
            Action::Cleanup
        } else {
            Action::Ignore
        };
    }
    match act {
        Action::Ignore => Step::Ignore,
        Action::Cleanup => Step::Cleanup,
        Action::Ensure => {
            let spec = spec_fingerprint(svc);
            if o.parked.as_deref() == Some(spec.as_str()) {
                return Step::Park;
            }
            match &o.last {
                Some(last) if last.spec == spec => {
                    let rewrite_status = status_differs(svc, &last.status);
                    match (last.nodes == o.nodes, rewrite_status) {
                        (true, false) => Step::InSync,
                        (true, true) => Step::StatusOnly,
                        (false, rewrite_status) => Step::HostsOnly { rewrite_status },
                    }
                }
                _ => Step::Ensure,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::LB_FINALIZER;
    use k8s_openapi::api::core::v1::{
        LoadBalancerIngress, ServicePort, ServiceSpec, ServiceStatus,
    };
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
                Step::Ensure
            ]
        );
    }
}
