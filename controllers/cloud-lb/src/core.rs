//! The controller's pure decisions: which Services it serves, whether to ensure or delete, the
//! finalizer rules, the stable node set, which node changes matter, and when to write status.
//! No I/O here; the shell feeds observed objects in and applies the answers: [`decide`] turns
//! what it observed for one Service into the [`Step`] it executes.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{LoadBalancerStatus, Node, Service};

pub mod condition;
mod decide;
pub mod targets;

pub use decide::{LastSync, Observed, Step, decide, leaves_load_balancer, refusal_key};

/// The finalizer that keeps a Service until its load balancer is gone (upstream's name).
pub const LB_FINALIZER: &str = "service.kubernetes.io/load-balancer-cleanup";
/// Nodes with this label (true or unparsable) get no load-balancer traffic.
pub const EXCLUDE_LB_LABEL: &str = "node.kubernetes.io/exclude-from-external-load-balancers";
/// The cluster autoscaler's taint on nodes it is about to delete.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";
/// First retry delay after a failed sync (upstream's minRetryDelay).
pub const MIN_RETRY_DELAY: Duration = Duration::from_secs(5);
/// Largest retry delay (upstream's maxRetryDelay).
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(300);

/// Which Services this controller serves, from `--load-balancer-class` and the default flag.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClassFilter {
    /// The `spec.loadBalancerClass` we implement, if any.
    pub class: Option<String>,
    /// Whether we also serve Services with no class (the cluster's default implementation).
    pub default_implementation: bool,
}

impl ClassFilter {
    /// True if a Service with `class` is ours. Upstream's controller serves only class-less
    /// Services; we additionally serve our configured class, and class-less ones only when told
    /// we are the default, so two implementations never fight over one Service.
    pub fn serves(&self, class: Option<&str>) -> bool {
        match class {
            None => self.default_implementation,
            Some(c) => self.class.as_deref() == Some(c),
        }
    }
}

/// What a sync must do for a Service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Create or update its load balancer (finalizer first).
    Ensure,
    /// Delete its load balancer, clear the status, then drop the finalizer.
    Cleanup,
    /// Not ours, nothing to clean: leave it alone.
    Ignore,
}

fn has_finalizer(svc: &Service) -> bool {
    svc.metadata
        .finalizers
        .as_ref()
        .is_some_and(|f| f.iter().any(|x| x == LB_FINALIZER))
}

fn is_load_balancer(svc: &Service) -> bool {
    svc.spec
        .as_ref()
        .and_then(|s| s.type_.as_deref())
        .is_some_and(|t| t == "LoadBalancer")
}

fn class_of(svc: &Service) -> Option<&str> {
    svc.spec
        .as_ref()
        .and_then(|s| s.load_balancer_class.as_deref())
}

/// Upstream's `wantsLoadBalancer`, with our class filter in place of "no class".
pub fn wants_load_balancer(svc: &Service, filter: &ClassFilter) -> bool {
    is_load_balancer(svc) && filter.serves(class_of(svc))
}

/// Decides the sync for `svc`. Mirrors upstream's `syncLoadBalancerIfNeeded`: clean up when the
/// Service no longer wants a load balancer from us or is being deleted while holding our
/// finalizer. `loadBalancerClass` is immutable on LoadBalancer Services, so a Service of a
/// foreign class can only carry our finalizer if it was ours before a type change; cleaning
/// it up then is still ours to do.
pub fn action(svc: &Service, filter: &ClassFilter) -> Action {
    let finalizer = has_finalizer(svc);
    let deleting = svc.metadata.deletion_timestamp.is_some();
    let wants = wants_load_balancer(svc, filter);
    if deleting {
        return if finalizer {
            Action::Cleanup
        } else {
            Action::Ignore
        };
    }
    if wants {
        return Action::Ensure;
    }
    // No longer (or never) ours. A class-less or our-class Service that changed type away
    // from LoadBalancer, or one with our finalizer left over, needs cleanup; status left
    // behind by us on a Service we serve also needs clearing.
    let had_ours = finalizer || (filter.serves(class_of(svc)) && has_ingress(svc));
    // A LoadBalancer Service of another implementation is never ours to clean.
    let foreign_lb = is_load_balancer(svc) && !filter.serves(class_of(svc));
    if had_ours && !foreign_lb {
        Action::Cleanup
    } else {
        Action::Ignore
    }
}

/// Whether `status.loadBalancer` has an ingress (an address or hostname is published).
pub(crate) fn has_ingress(svc: &Service) -> bool {
    svc.status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .is_some_and(|i| !i.is_empty())
}

/// The finalizer list with ours added, or `None` if it is already there.
pub fn with_finalizer(svc: &Service) -> Option<Vec<String>> {
    if has_finalizer(svc) {
        return None;
    }
    let mut f = svc.metadata.finalizers.clone().unwrap_or_default();
    f.push(LB_FINALIZER.to_string());
    Some(f)
}

/// The finalizer list with ours removed, or `None` if it was not there.
pub fn without_finalizer(svc: &Service) -> Option<Vec<String>> {
    if !has_finalizer(svc) {
        return None;
    }
    Some(
        svc.metadata
            .finalizers
            .iter()
            .flatten()
            .filter(|f| *f != LB_FINALIZER)
            .cloned()
            .collect(),
    )
}

/// Upstream's `nodeIncludedPredicate`: the exclusion label excludes when true or unparsable
/// (Go's `strconv.ParseBool` forms), includes when false or absent.
pub fn node_included(node: &Node) -> bool {
    match node
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(EXCLUDE_LB_LABEL))
    {
        None => true,
        Some(v) => parse_go_bool(v) == Some(false),
    }
}

/// Go's `strconv.ParseBool`.
pub fn parse_go_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

fn node_untainted(node: &Node) -> bool {
    !node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == TO_BE_DELETED_TAINT))
}

/// Upstream's stable node set predicate: not being deleted, not excluded, not tainted for
/// deletion. Readiness deliberately does not matter (health checks handle it).
pub fn in_stable_set(node: &Node) -> bool {
    node.metadata.deletion_timestamp.is_none() && node_included(node) && node_untainted(node)
}

/// The stable node set, sorted by name so providers and comparisons see a stable order.
pub fn stable_nodes<'a>(nodes: impl IntoIterator<Item = &'a Node>) -> Vec<Node> {
    let mut v: Vec<Node> = nodes
        .into_iter()
        .filter(|n| in_stable_set(n))
        .cloned()
        .collect();
    v.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    v
}

/// Upstream's `shouldSyncUpdatedNode`: only a change of the exclusion predicate or of
/// `spec.providerID` warrants a host sync on a node update. (Additions and deletions always
/// do; the taint and deletion timestamp are picked up at the next sync, as upstream does.)
pub fn node_update_triggers_sync(old: &Node, new: &Node) -> bool {
    node_included(old) != node_included(new) || provider_id(old) != provider_id(new)
}

fn provider_id(n: &Node) -> Option<&str> {
    n.spec.as_ref().and_then(|s| s.provider_id.as_deref())
}

/// The part of a node set that matters to a load balancer: name → providerID (upstream's
/// `nodesSufficientlyEqual` distillation).
pub type NodeFingerprint = BTreeMap<String, Option<String>>;

/// Fingerprint of `nodes` (already filtered to the stable set).
pub fn fingerprint<'a>(nodes: impl IntoIterator<Item = &'a Node>) -> NodeFingerprint {
    nodes
        .into_iter()
        .map(|n| {
            (
                n.metadata.name.clone().unwrap_or_default(),
                provider_id(n).map(str::to_string),
            )
        })
        .collect()
}

/// Normalises a status for comparison: absent, empty and `[]` ingress are the same.
fn normalized(s: Option<&LoadBalancerStatus>) -> Vec<serde_json::Value> {
    s.and_then(|s| s.ingress.as_ref())
        .map(|v| {
            v.iter()
                .map(|i| serde_json::to_value(i).unwrap_or(serde_json::Value::Null))
                .collect()
        })
        .unwrap_or_default()
}

/// True if `desired` differs from the Service's current `status.loadBalancer` (ip, hostname,
/// ipMode, ports), i.e. a status write is needed.
pub fn status_differs(svc: &Service, desired: &LoadBalancerStatus) -> bool {
    let current = svc.status.as_ref().and_then(|s| s.load_balancer.as_ref());
    normalized(current) != normalized(Some(desired))
}

/// The Service fields a provider's `ensure` depends on; a change of any (or of the node set)
/// means the Service must be ensured again. Mirrors upstream's `needsUpdate`, which also lets
/// a Permanent error be retried once the user fixes the Service.
pub fn spec_fingerprint(svc: &Service) -> String {
    let spec = svc.spec.as_ref();
    let v = serde_json::json!({
        "uid": svc.metadata.uid,
        "annotations": svc.metadata.annotations,
        "type": spec.and_then(|s| s.type_.clone()),
        "class": spec.and_then(|s| s.load_balancer_class.clone()),
        "ports": spec.and_then(|s| s.ports.clone()),
        "sourceRanges": spec.and_then(|s| s.load_balancer_source_ranges.clone()),
        "lbIP": spec.and_then(|s| s.load_balancer_ip.clone()),
        "etp": spec.and_then(|s| s.external_traffic_policy.clone()),
        "hcnp": spec.and_then(|s| s.health_check_node_port),
        "families": spec.and_then(|s| s.ip_families.clone()),
        "affinity": spec.and_then(|s| s.session_affinity.clone()),
        "externalIPs": spec.and_then(|s| s.external_ips.clone()),
    });
    v.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        LoadBalancerIngress, NodeSpec, ServiceSpec, ServiceStatus, Taint,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

    fn svc(type_: &str, class: Option<&str>, finalizer: bool, deleting: bool) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some("s".into()),
                namespace: Some("ns".into()),
                finalizers: finalizer.then(|| vec![LB_FINALIZER.to_string()]),
                deletion_timestamp: deleting.then(|| Time(Default::default())),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                type_: Some(type_.into()),
                load_balancer_class: class.map(str::to_string),
                ..Default::default()
            }),
            status: None,
        }
    }

    fn filter(class: Option<&str>, default: bool) -> ClassFilter {
        ClassFilter {
            class: class.map(str::to_string),
            default_implementation: default,
        }
    }

    #[test]
    fn class_filtering() {
        let ours = filter(Some("example.com/lb"), false);
        assert!(!ours.serves(None));
        assert!(ours.serves(Some("example.com/lb")));
        assert!(!ours.serves(Some("service.k8s.aws/nlb")));
        let default = filter(None, true);
        assert!(default.serves(None));
        assert!(!default.serves(Some("example.com/lb")));
        let both = filter(Some("x"), true);
        assert!(both.serves(None) && both.serves(Some("x")) && !both.serves(Some("y")));
    }

    #[test]
    fn actions() {
        let f = filter(Some("ours"), true);
        assert_eq!(
            action(&svc("LoadBalancer", None, false, false), &f),
            Action::Ensure
        );
        assert_eq!(
            action(&svc("LoadBalancer", Some("ours"), false, false), &f),
            Action::Ensure
        );
        assert_eq!(
            action(&svc("LoadBalancer", Some("other"), false, false), &f),
            Action::Ignore
        );
        // A foreign-class Service is never touched, even with a stray finalizer.
        assert_eq!(
            action(&svc("LoadBalancer", Some("other"), true, false), &f),
            Action::Ignore
        );
        assert_eq!(
            action(&svc("ClusterIP", None, false, false), &f),
            Action::Ignore
        );
        assert_eq!(
            action(&svc("ClusterIP", None, true, false), &f),
            Action::Cleanup
        );
        assert_eq!(
            action(&svc("LoadBalancer", None, true, true), &f),
            Action::Cleanup
        );
        assert_eq!(
            action(&svc("LoadBalancer", None, false, true), &f),
            Action::Ignore
        );
        // Not the default: a class-less LoadBalancer Service is someone else's.
        let only_class = filter(Some("ours"), false);
        assert_eq!(
            action(&svc("LoadBalancer", None, false, false), &only_class),
            Action::Ignore
        );
    }

    #[test]
    fn leftover_status_without_finalizer_is_cleared() {
        let f = filter(None, true);
        let mut s = svc("NodePort", None, false, false);
        s.status = Some(ServiceStatus {
            load_balancer: Some(LoadBalancerStatus {
                ingress: Some(vec![LoadBalancerIngress {
                    ip: Some("1.2.3.4".into()),
                    ..Default::default()
                }]),
            }),
            ..Default::default()
        });
        assert_eq!(action(&s, &f), Action::Cleanup);
    }

    #[test]
    fn finalizer_edits() {
        let mut s = svc("LoadBalancer", None, false, false);
        s.metadata.finalizers = Some(vec!["other".into()]);
        let added = with_finalizer(&s);
        assert_eq!(
            added,
            Some(vec!["other".to_string(), LB_FINALIZER.to_string()])
        );
        s.metadata.finalizers = added;
        assert_eq!(with_finalizer(&s), None);
        assert_eq!(without_finalizer(&s), Some(vec!["other".to_string()]));
    }

    fn node(name: &str, labels: &[(&str, &str)], taint: bool, deleting: bool) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                deletion_timestamp: deleting.then(|| Time(Default::default())),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                provider_id: Some(format!("aws:///us-east-1a/i-{name}")),
                taints: taint.then(|| {
                    vec![Taint {
                        key: TO_BE_DELETED_TAINT.into(),
                        effect: "NoSchedule".into(),
                        ..Default::default()
                    }]
                }),
                ..Default::default()
            }),
            status: None,
        }
    }

    #[test]
    fn stable_node_set() {
        let nodes = vec![
            node("c", &[], false, false),
            node("a", &[], false, false),
            node("excluded", &[(EXCLUDE_LB_LABEL, "true")], false, false),
            node("garbage", &[(EXCLUDE_LB_LABEL, "yes-please")], false, false),
            node("included", &[(EXCLUDE_LB_LABEL, "false")], false, false),
            node("tainted", &[], true, false),
            node("deleting", &[], false, true),
        ];
        let names: Vec<_> = stable_nodes(&nodes)
            .into_iter()
            .filter_map(|n| n.metadata.name)
            .collect();
        // NotReady nodes (no status at all here) stay in.
        assert_eq!(names, vec!["a", "c", "included"]);
    }

    #[test]
    fn node_update_triggers() {
        let a = node("a", &[], false, false);
        let mut b = a.clone();
        b.metadata
            .labels
            .get_or_insert_default()
            .insert("unrelated".into(), "x".into());
        assert!(!node_update_triggers_sync(&a, &b));
        let tainted = node("a", &[], true, false);
        assert!(!node_update_triggers_sync(&a, &tainted));
        let excluded = node("a", &[(EXCLUDE_LB_LABEL, "")], false, false);
        assert!(node_update_triggers_sync(&a, &excluded));
        let mut moved = a.clone();
        moved.spec.get_or_insert_default().provider_id = Some("aws:///x/i-other".into());
        assert!(node_update_triggers_sync(&a, &moved));
        assert_ne!(fingerprint(&[a]), fingerprint(&[moved]));
    }

    #[test]
    fn status_diff_sees_ip_mode() {
        let mut s = svc("LoadBalancer", None, true, false);
        let want = LoadBalancerStatus {
            ingress: Some(vec![LoadBalancerIngress {
                ip: Some("10.0.0.1".into()),
                ip_mode: Some("VIP".into()),
                ..Default::default()
            }]),
        };
        assert!(status_differs(&s, &want));
        assert!(!status_differs(&s, &LoadBalancerStatus::default()));
        assert!(!status_differs(
            &s,
            &LoadBalancerStatus {
                ingress: Some(vec![])
            }
        ));
        let mut other_mode = want.clone();
        if let Some(i) = other_mode.ingress.as_mut().and_then(|v| v.first_mut()) {
            i.ip_mode = Some("Proxy".into());
        }
        s.status = Some(ServiceStatus {
            load_balancer: Some(other_mode),
            ..Default::default()
        });
        assert!(status_differs(&s, &want));
        s.status = Some(ServiceStatus {
            load_balancer: Some(want.clone()),
            ..Default::default()
        });
        assert!(!status_differs(&s, &want));
    }

    #[test]
    fn backoff_bounds_match_upstream() {
        let b = scm_runtime::Backoff {
            base: MIN_RETRY_DELAY,
            max: MAX_RETRY_DELAY,
        };
        assert_eq!(b.delay(1), Duration::from_secs(5));
        assert_eq!(b.delay(2), Duration::from_secs(10));
        assert_eq!(b.delay(10), Duration::from_secs(300));
    }

    use proptest::prelude::*;

    proptest! {
        /// Whatever the configuration, a Service of a class we do not serve is never ensured,
        /// and one that is neither ours nor carrying our finalizer is never cleaned up.
        #[test]
        fn never_touches_foreign_classes(
            our in proptest::option::of("[a-c]"),
            default in any::<bool>(),
            class in proptest::option::of("[a-c]"),
            lb in any::<bool>(),
            fin in any::<bool>(),
            del in any::<bool>(),
        ) {
            let f = filter(our.as_deref(), default);
            let s = svc(if lb { "LoadBalancer" } else { "ClusterIP" }, class.as_deref(), fin, del);
            let a = action(&s, &f);
            if a == Action::Ensure {
                prop_assert!(f.serves(class.as_deref()) && lb && !del);
            }
            if a == Action::Cleanup {
                prop_assert!(fin);
                prop_assert!(!lb || f.serves(class.as_deref()) || del);
            }
        }

        /// Adding then removing our finalizer restores the others, in order.
        #[test]
        fn finalizer_round_trip(others in proptest::collection::vec("[a-z./-]{1,12}", 0..4)) {
            let mut s = svc("LoadBalancer", None, false, false);
            s.metadata.finalizers = Some(others.iter().filter(|f| *f != LB_FINALIZER).cloned().collect());
            let before = s.metadata.finalizers.clone();
            s.metadata.finalizers = with_finalizer(&s);
            prop_assert!(with_finalizer(&s).is_none());
            s.metadata.finalizers = without_finalizer(&s);
            prop_assert_eq!(s.metadata.finalizers, before);
        }
    }

    #[test]
    fn go_bools() {
        for t in ["1", "t", "T", "true", "TRUE", "True"] {
            assert_eq!(parse_go_bool(t), Some(true));
        }
        for f in ["0", "f", "F", "false", "FALSE", "False"] {
            assert_eq!(parse_go_bool(f), Some(false));
        }
        assert_eq!(parse_go_bool("yes"), None);
        assert_eq!(parse_go_bool(""), None);
    }

    #[test]
    fn spec_fingerprint_tracks_annotations_and_ports() {
        let a = svc("LoadBalancer", None, true, false);
        let mut b = a.clone();
        assert_eq!(spec_fingerprint(&a), spec_fingerprint(&b));
        b.metadata
            .annotations
            .get_or_insert_default()
            .insert("x".into(), "y".into());
        assert_ne!(spec_fingerprint(&a), spec_fingerprint(&b));
        // Our own finalizer write must not look like a change that needs another ensure.
        let mut c = a.clone();
        c.metadata.finalizers = None;
        c.metadata.resource_version = Some("42".into());
        assert_eq!(spec_fingerprint(&a), spec_fingerprint(&c));
    }
}
