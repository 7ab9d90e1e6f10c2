//! The pure ServiceCIDR controller core (kube-controller-manager's `service-cidr-controller`):
//! keep the protection finalizer on live ServiceCIDRs with `Ready=True`; on deletion, hold the
//! finalizer while IPAddresses allocated by kube-apiserver would be orphaned, and otherwise
//! release it once the grace period has passed.

use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;
use k8s_openapi::api::networking::v1::{IPAddress, ServiceCIDR};
use k8s_openapi::jiff::Timestamp;

/// The finalizer that protects a ServiceCIDR.
pub const FINALIZER: &str = "networking.k8s.io/service-cidr-finalizer";
/// The condition type.
pub const CONDITION_READY: &str = "Ready";
/// Reason while deletion is blocked.
pub const REASON_TERMINATING: &str = "Terminating";
/// Message while deletion is blocked.
pub const MESSAGE_TERMINATING: &str = "There are still IPAddresses referencing the ServiceCIDR, please remove them or create a new ServiceCIDR";
/// Message of the Ready condition.
pub const MESSAGE_READY: &str = "Kubernetes Service CIDR is ready";
/// Reason of the Warning Event when the Ready=True condition cannot be written (upstream's).
pub const REASON_STATUS_ERROR: &str = "KubernetesServiceCIDRError";
/// Note of that Event (upstream's).
pub const MESSAGE_STATUS_ERROR: &str = "The ServiceCIDR Status can not be set to Ready=True";
/// Label naming who manages an IPAddress.
pub const LABEL_MANAGED_BY: &str = "ipaddress.kubernetes.io/managed-by";
/// The manager of IPAddresses kube-apiserver allocates for Services.
pub const IPALLOCATOR_MANAGER: &str = "ipallocator.k8s.io";
/// How long after the deletion timestamp the finalizer may go, so that allocators have seen
/// the deletion before it disappears (upstream's `deletionGracePeriod`).
pub const DELETION_GRACE_PERIOD: Duration = Duration::from_secs(10);

/// What the controller must do for one ServiceCIDR.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CidrPlan {
    /// Live: ensure the finalizer and the condition (status, reason, message).
    Live {
        /// The finalizer is missing.
        add_finalizer: bool,
        /// The Ready condition needs writing.
        set_ready: bool,
    },
    /// Being deleted but IPAddresses would be orphaned: set Ready=False/Terminating if needed.
    Blocked {
        /// The condition needs writing.
        set_condition: bool,
    },
    /// Being deleted and nothing depends on it: remove the finalizer after this long.
    Release {
        /// Time left in the grace period (zero: now).
        after: Duration,
    },
    /// Nothing to do (being deleted without our finalizer).
    Nothing,
}

fn cidrs(o: &ServiceCIDR) -> Vec<IpNet> {
    o.spec
        .as_ref()
        .and_then(|s| s.cidrs.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|c| c.parse::<IpNet>().ok())
        .map(|c| c.trunc())
        .collect()
}

fn has_finalizer(o: &ServiceCIDR) -> bool {
    o.metadata
        .finalizers
        .as_ref()
        .is_some_and(|f| f.iter().any(|x| x == FINALIZER))
}

fn condition_matches(o: &ServiceCIDR, status: &str, reason: &str, message: &str) -> bool {
    o.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == CONDITION_READY))
        .is_some_and(|c| c.status == status && c.reason == reason && c.message == message)
}

/// Names of ServiceCIDRs (other than none) with a CIDR that contains `addr`.
fn containing_addr<'a>(all: &'a [&ServiceCIDR], addr: IpAddr) -> Vec<&'a str> {
    all.iter()
        .filter(|o| cidrs(o).iter().any(|c| c.contains(&addr)))
        .filter_map(|o| o.metadata.name.as_deref())
        .collect()
}

/// Whether deleting `target` leaves no kube-apiserver IPAddress without a ServiceCIDR.
pub fn can_delete(target: &ServiceCIDR, all: &[&ServiceCIDR], ips: &[&IPAddress]) -> bool {
    let name = target.metadata.name.as_deref().unwrap_or_default();
    // Every CIDR also covered by another ServiceCIDR (equal or larger): nothing is orphaned.
    let has_parent = cidrs(target).iter().all(|c| {
        let parents: Vec<&str> = all
            .iter()
            .filter(|o| cidrs(o).iter().any(|p| p.contains(c)))
            .filter_map(|o| o.metadata.name.as_deref())
            .collect();
        !(parents.is_empty() || parents == [name])
    });
    if has_parent {
        return true;
    }
    for ip in ips {
        let managed = ip
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(LABEL_MANAGED_BY))
            .is_some_and(|v| v == IPALLOCATOR_MANAGER);
        if !managed {
            continue;
        }
        let Some(addr) = ip
            .metadata
            .name
            .as_deref()
            .and_then(|n| n.parse::<IpAddr>().ok())
        else {
            continue;
        };
        if !cidrs(target).iter().any(|c| c.contains(&addr)) {
            continue;
        }
        if containing_addr(all, addr) == [name] {
            return false;
        }
    }
    true
}

/// Plans the sync of one ServiceCIDR given all ServiceCIDRs and IPAddresses, at `now`.
pub fn plan(
    target: &ServiceCIDR,
    all: &[&ServiceCIDR],
    ips: &[&IPAddress],
    now: Timestamp,
) -> CidrPlan {
    if let Some(ts) = target.metadata.deletion_timestamp.as_ref() {
        if !has_finalizer(target) {
            return CidrPlan::Nothing;
        }
        if !can_delete(target, all, ips) {
            return CidrPlan::Blocked {
                set_condition: !condition_matches(
                    target,
                    "False",
                    REASON_TERMINATING,
                    MESSAGE_TERMINATING,
                ),
            };
        }
        let elapsed = now.duration_since(ts.0);
        let elapsed = Duration::try_from(elapsed).unwrap_or(Duration::ZERO);
        return CidrPlan::Release {
            after: DELETION_GRACE_PERIOD.saturating_sub(elapsed),
        };
    }
    // Upstream's Ready condition carries no reason; the API then stores an empty string.
    CidrPlan::Live {
        add_finalizer: !has_finalizer(target),
        set_ready: !condition_matches(target, "True", "", MESSAGE_READY),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::networking::v1::ServiceCIDRStatus;
    use k8s_openapi::api::networking::v1::{IPAddressSpec, ParentReference, ServiceCIDRSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, Time};

    fn sc(name: &str, c: &[&str], deleting_at: Option<i64>, fin: bool) -> ServiceCIDR {
        ServiceCIDR {
            metadata: ObjectMeta {
                name: Some(name.into()),
                deletion_timestamp: deleting_at.map(|s| Time(Timestamp::from_second(s).unwrap())),
                finalizers: fin.then(|| vec![FINALIZER.to_string()]),
                ..Default::default()
            },
            spec: Some(ServiceCIDRSpec {
                cidrs: Some(c.iter().map(|s| s.to_string()).collect()),
            }),
            status: None,
        }
    }

    fn ipaddr(ip: &str, managed: bool) -> IPAddress {
        IPAddress {
            metadata: ObjectMeta {
                name: Some(ip.into()),
                labels: Some(
                    [(
                        LABEL_MANAGED_BY.to_string(),
                        if managed {
                            IPALLOCATOR_MANAGER
                        } else {
                            "other"
                        }
                        .to_string(),
                    )]
                    .into(),
                ),
                ..Default::default()
            },
            spec: IPAddressSpec {
                parent_ref: ParentReference {
                    resource: "services".into(),
                    name: "x".into(),
                    ..Default::default()
                },
            },
        }
    }

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    #[test]
    fn live_cidr_needs_finalizer_and_ready() {
        let a = sc("a", &["10.0.0.0/24"], None, false);
        assert_eq!(
            plan(&a, &[&a], &[], at(100)),
            CidrPlan::Live {
                add_finalizer: true,
                set_ready: true
            }
        );
        let mut b = sc("b", &["10.0.0.0/24"], None, true);
        b.status = Some(ServiceCIDRStatus {
            conditions: Some(vec![Condition {
                type_: "Ready".into(),
                status: "True".into(),
                reason: String::new(),
                message: MESSAGE_READY.into(),
                last_transition_time: Time(at(1)),
                observed_generation: None,
            }]),
        });
        assert_eq!(
            plan(&b, &[&b], &[], at(100)),
            CidrPlan::Live {
                add_finalizer: false,
                set_ready: false
            }
        );
    }

    #[test]
    fn deletion_blocked_by_orphaned_managed_ip() {
        let a = sc("a", &["10.0.0.0/24"], Some(100), true);
        let ip = ipaddr("10.0.0.5", true);
        assert_eq!(
            plan(&a, &[&a], &[&ip], at(200)),
            CidrPlan::Blocked {
                set_condition: true
            }
        );
        // Not managed by kube-apiserver's allocator: not blocking.
        let other = ipaddr("10.0.0.5", false);
        assert_eq!(
            plan(&a, &[&a], &[&other], at(200)),
            CidrPlan::Release {
                after: Duration::ZERO
            }
        );
        // Outside the CIDR: not blocking.
        let out = ipaddr("10.9.0.5", true);
        assert!(can_delete(&a, &[&a], &[&out]));
    }

    #[test]
    fn deletion_allowed_when_another_cidr_covers() {
        let a = sc("a", &["10.0.0.0/24"], Some(100), true);
        let parent = sc("p", &["10.0.0.0/16"], None, true);
        let ip = ipaddr("10.0.0.5", true);
        assert!(can_delete(&a, &[&a, &parent], &[&ip]));
        // A sibling covering only the address also saves it.
        let sib = sc("s", &["10.0.0.0/28"], None, true);
        assert!(can_delete(&a, &[&a, &sib], &[&ip]));
    }

    #[test]
    fn grace_period_counts_from_deletion_timestamp() {
        let a = sc("a", &["10.0.0.0/24"], Some(100), true);
        assert_eq!(
            plan(&a, &[&a], &[], at(104)),
            CidrPlan::Release {
                after: Duration::from_secs(6)
            }
        );
        assert_eq!(
            plan(&a, &[&a], &[], at(200)),
            CidrPlan::Release {
                after: Duration::ZERO
            }
        );
        let gone = sc("g", &["10.0.0.0/24"], Some(100), false);
        assert_eq!(plan(&gone, &[&gone], &[], at(200)), CidrPlan::Nothing);
    }
}
