//! The target table: policy, flag, nodes and endpoints in; target names out.

use super::*;
use k8s_openapi::api::core::v1::{NodeSpec, ServiceSpec, Taint};
use k8s_openapi::api::discovery::v1::EndpointConditions;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

fn svc(policy: &str) -> Service {
    Service {
        spec: Some(ServiceSpec {
            type_: Some("LoadBalancer".into()),
            external_traffic_policy: Some(policy.into()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Node `name`, cordoned when it ends in `!`.
fn node(spec: &str) -> Arc<Node> {
    let (name, cordon) = match spec.strip_suffix('!') {
        Some(n) => (n, true),
        None => (spec, false),
    };
    Arc::new(Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            unschedulable: cordon.then_some(true),
            ..Default::default()
        }),
        status: None,
    })
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

struct Row {
    what: &'static str,
    policy: &'static str,
    aware: bool,
    nodes: &'static [&'static str],
    ready: &'static [&'static str],
    serving: &'static [&'static str],
    want: &'static [&'static str],
}

const ROWS: &[Row] = &[
    Row {
        what: "flag off: Local keeps upstream's whole stable set",
        policy: "Local",
        aware: false,
        nodes: &["a", "b", "c!"],
        ready: &["a"],
        serving: &["a"],
        want: &["a", "b", "c"],
    },
    Row {
        what: "flag off: Cluster keeps cordoned nodes (upstream)",
        policy: "Cluster",
        aware: false,
        nodes: &["a", "b!"],
        ready: &[],
        serving: &[],
        want: &["a", "b"],
    },
    Row {
        what: "Local: only nodes with a ready endpoint",
        policy: "Local",
        aware: true,
        nodes: &["a", "b", "c"],
        ready: &["a", "c"],
        serving: &["a", "c"],
        want: &["a", "c"],
    },
    Row {
        what: "Local: a node whose last endpoint terminates (still serving) is dropped",
        policy: "Local",
        aware: true,
        nodes: &["a", "b"],
        ready: &["a"],
        serving: &["a", "b"],
        want: &["a"],
    },
    Row {
        what: "Local: an endpoint on a node outside the stable set adds nothing",
        policy: "Local",
        aware: true,
        nodes: &["a", "b"],
        ready: &["a", "gone"],
        serving: &["a", "gone"],
        want: &["a"],
    },
    Row {
        what: "Local: a cordoned node with a ready endpoint goes when others have one",
        policy: "Local",
        aware: true,
        nodes: &["a!", "b"],
        ready: &["a", "b"],
        serving: &["a", "b"],
        want: &["b"],
    },
    Row {
        what: "Local: only cordoned nodes hold ready endpoints: they stay",
        policy: "Local",
        aware: true,
        nodes: &["a!", "b"],
        ready: &["a"],
        serving: &["a"],
        want: &["a"],
    },
    Row {
        what: "Local: no ready endpoint anywhere: nodes still serving terminating ones",
        policy: "Local",
        aware: true,
        nodes: &["a", "b", "c"],
        ready: &[],
        serving: &["b"],
        want: &["b"],
    },
    Row {
        what: "Local: no endpoint at all: upstream's stable set",
        policy: "Local",
        aware: true,
        nodes: &["a", "b!"],
        ready: &[],
        serving: &[],
        want: &["a", "b"],
    },
    Row {
        what: "Cluster: cordoned nodes are drained",
        policy: "Cluster",
        aware: true,
        nodes: &["a", "b!", "c"],
        ready: &["b"],
        serving: &["b"],
        want: &["a", "c"],
    },
    Row {
        what: "Cluster: every node cordoned: they all stay",
        policy: "Cluster",
        aware: true,
        nodes: &["a!", "b!"],
        ready: &[],
        serving: &[],
        want: &["a", "b"],
    },
    Row {
        what: "no nodes: none",
        policy: "Local",
        aware: true,
        nodes: &[],
        ready: &["a"],
        serving: &["a"],
        want: &[],
    },
];

#[test]
fn target_table() {
    for r in ROWS {
        let nodes: Vec<Arc<Node>> = r.nodes.iter().map(|n| node(n)).collect();
        let eps = EndpointNodes {
            ready: set(r.ready),
            serving: set(r.serving),
        };
        let got: Vec<String> = targets(&svc(r.policy), &nodes, Some(&eps), r.aware)
            .iter()
            .filter_map(|n| n.metadata.name.clone())
            .collect();
        assert_eq!(got, r.want, "{}", r.what);
    }
}

#[test]
fn no_endpoints_known_is_no_endpoints() {
    let nodes = vec![node("a"), node("b")];
    let got = targets(&svc("Local"), &nodes, None, true);
    assert_eq!(got.len(), 2);
}

fn ep(
    node: Option<&str>,
    ready: Option<bool>,
    serving: Option<bool>,
    term: Option<bool>,
) -> Endpoint {
    Endpoint {
        addresses: vec!["10.0.0.1".into()],
        node_name: node.map(str::to_string),
        conditions: Some(EndpointConditions {
            ready,
            serving,
            terminating: term,
        }),
        ..Default::default()
    }
}

#[test]
fn endpoint_conditions_as_the_api_defines_them() {
    let mut e = EndpointNodes::default();
    e.add(&ep(Some("ready"), Some(true), Some(true), Some(false)));
    // Unset conditions: ready and serving, not terminating.
    e.add(&ep(Some("unknown"), None, None, None));
    // Terminating but still serving (as the EndpointSlice controller writes a deleting pod).
    e.add(&ep(Some("draining"), Some(false), Some(true), Some(true)));
    // A writer that says ready and terminating at once: terminating wins.
    e.add(&ep(Some("odd"), Some(true), Some(true), Some(true)));
    // Not ready, serving unset (an older writer): not serving either.
    e.add(&ep(Some("notready"), Some(false), None, None));
    e.add(&ep(None, Some(true), Some(true), Some(false)));
    assert_eq!(e.ready, set(&["ready", "unknown"]));
    assert_eq!(e.serving, set(&["draining", "odd", "ready", "unknown"]));
    let merged = EndpointNodes::merge([
        &e,
        &EndpointNodes {
            ready: set(&["x"]),
            serving: set(&["x"]),
        },
    ]);
    assert!(merged.ready.contains("x") && merged.ready.contains("ready"));
}

#[test]
fn drain_changes_are_cordon_and_the_autoscaler_taint() {
    let a = node("a");
    assert!(!drain_changed(&a, &a));
    assert!(drain_changed(&a, &node("a!")));
    let mut tainted = (*a).clone();
    tainted.spec.get_or_insert_default().taints = Some(vec![Taint {
        key: crate::core::TO_BE_DELETED_TAINT.into(),
        effect: "NoSchedule".into(),
        ..Default::default()
    }]);
    assert!(drain_changed(&a, &tainted));
    assert!(!local_traffic(&svc("Cluster")) && local_traffic(&svc("Local")));
}
