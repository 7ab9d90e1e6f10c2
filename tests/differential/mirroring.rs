//! Mirroring, ours against kube-controller-manager's `endpointslicemirroring` controller: hand-made
//! Endpoints of selector-less Services, of the shapes where mirroring is easy to get wrong (an
//! address in several subsets, ready in one and not ready in another; subsets whose port sets
//! overlap, repeat or come in another order; both address families in one subset; no ports;
//! labels and annotations to carry over; the skip-mirror label), then edits of each. Both run
//! against one private API server and mirror every Endpoints, each under its own managed-by
//! value, so after each step the two sets of slices must be equal slice for slice: address
//! type, ports, every endpoint (duplicates count), labels but the managed-by one, annotations,
//! owner references. Names and resourceVersions are ignored.
//!
//! kube-controller-manager's `endpoint` controller runs too, for the legacy side of the same
//! shapes: a hand-made Endpoints of such a shape that a selector Service then takes over is
//! rewritten by upstream, and our core, given that hand-made object, must plan the very
//! subsets and labels upstream wrote (and nothing once upstream's object is there).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Result, bail};
use k8s_openapi::api::core::v1::{Endpoints, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use scm_runtime::{ContextBase, LeaderGate};
use serde_json::{Value, json};
use test_support::{ControlPlane, ControlPlaneOptions, namespace};
use tokio::time::Instant;

const LABEL_MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// Our mirroring controller's managed-by value.
const OURS: &str = "endpointslicemirroring.service-controller-manager.k8s.io";
/// kube-controller-manager's.
const UPSTREAM: &str = "endpointslicemirroring-controller.k8s.io";

fn addr(ip: &str) -> Value {
    json!({"ip": ip})
}

fn port(name: &str, port: i32) -> Value {
    json!({"name": name, "port": port, "protocol": "TCP"})
}

/// The initial subsets of each selector-less Service's Endpoints, and its labels.
fn cases() -> Vec<(&'static str, Value, Value)> {
    let http = port("http", 80);
    let https = port("https", 443);
    let alt = port("alt", 8080);
    vec![
        (
            "plain",
            json!([{"addresses": [addr("10.1.0.1"), {"ip": "10.1.0.2", "hostname": "h2"}], "ports": [http]}]),
            json!({}),
        ),
        // One address ready in one subset and not ready in another with the same ports.
        (
            "split-readiness",
            json!([
                {"addresses": [addr("10.1.1.1"), addr("10.1.1.2")], "ports": [http]},
                {"notReadyAddresses": [addr("10.1.1.1")], "ports": [http]}
            ]),
            json!({}),
        ),
        // One address in several subsets with different ports, ready in one only.
        (
            "several-subsets",
            json!([
                {"addresses": [addr("10.1.2.1")], "ports": [http]},
                {"notReadyAddresses": [addr("10.1.2.1")], "ports": [https]},
                {"addresses": [addr("10.1.2.2")], "notReadyAddresses": [addr("10.1.2.1")], "ports": [alt]}
            ]),
            json!({}),
        ),
        // Overlapping port sets: a repeat in another order (with a repeated address), a subset,
        // and one sharing a single port.
        (
            "overlapping-ports",
            json!([
                {"addresses": [addr("10.1.3.1"), addr("10.1.3.2")], "ports": [http, https]},
                {"addresses": [addr("10.1.3.3")], "ports": [http]},
                {"notReadyAddresses": [addr("10.1.3.4")], "ports": [https, alt]},
                {"addresses": [addr("10.1.3.1"), addr("10.1.3.5")], "ports": [https, http]},
                {"addresses": [addr("10.1.3.6")], "notReadyAddresses": [addr("10.1.3.3")], "ports": [http]}
            ]),
            json!({"team": "a"}),
        ),
        // Many small subsets over three ports.
        (
            "many-subsets",
            Value::Array(
                (0..12)
                    .map(|i| {
                        let ports = match i % 4 {
                            0 => json!([http]),
                            1 => json!([https]),
                            2 => json!([http, alt]),
                            _ => json!([alt, http]),
                        };
                        let ip = format!("10.1.4.{}", i % 7 + 1);
                        if i % 3 == 0 {
                            json!({"notReadyAddresses": [addr(&ip)], "ports": ports})
                        } else {
                            json!({"addresses": [addr(&ip)], "ports": ports})
                        }
                    })
                    .collect(),
            ),
            json!({}),
        ),
        // Both families in one subset.
        (
            "dual",
            json!([{"addresses": [addr("10.1.5.1"), addr("fd00:1::5")], "notReadyAddresses": [addr("fd00:1::6")], "ports": [http]}]),
            json!({}),
        ),
        // Addresses without ports.
        (
            "no-ports",
            json!([{"addresses": [addr("10.1.6.1")]}]),
            json!({}),
        ),
        // Asked not to be mirrored.
        (
            "skip",
            json!([{"addresses": [addr("10.1.7.1")], "ports": [http]}]),
            json!({"endpointslice.kubernetes.io/skip-mirror": "true"}),
        ),
    ]
}

/// One slice as compared: everything but its name and versions.
fn slice_view(s: &EndpointSlice) -> String {
    let mut labels = s.metadata.labels.clone().unwrap_or_default();
    labels.remove(LABEL_MANAGED_BY);
    let annotations = s.metadata.annotations.clone().unwrap_or_default();
    let owners: Vec<(String, String, Option<bool>)> = s
        .metadata
        .owner_references
        .iter()
        .flatten()
        .map(|o| (o.kind.clone(), o.name.clone(), o.controller))
        .collect();
    let mut ports: Vec<String> = s
        .ports
        .iter()
        .flatten()
        .map(|p| {
            format!(
                "{:?}/{:?}/{:?}/{:?}",
                p.name, p.port, p.protocol, p.app_protocol
            )
        })
        .collect();
    ports.sort();
    let mut eps: Vec<String> = s
        .endpoints
        .iter()
        .flatten()
        .map(|e| {
            let c = e.conditions.clone().unwrap_or_default();
            format!(
                "{:?} ready={:?} serving={:?} terminating={:?} host={:?} node={:?} zone={:?} target={:?}",
                e.addresses,
                c.ready,
                c.serving,
                c.terminating,
                e.hostname,
                e.node_name,
                e.zone,
                e.target_ref.as_ref().map(|r| (&r.kind, &r.name))
            )
        })
        .collect();
    eps.sort();
    format!(
        "{} ports={ports:?} endpoints={eps:?} labels={labels:?} annotations={annotations:?} owners={owners:?}",
        s.address_type
    )
}

async fn side(client: &Client, ns: &str, svc: &str, managed_by: &str) -> Result<Vec<String>> {
    let lp = ListParams::default().labels(&format!(
        "{LABEL_SERVICE_NAME}={svc},{LABEL_MANAGED_BY}={managed_by}"
    ));
    let mut v: Vec<String> = Api::<EndpointSlice>::namespaced(client.clone(), ns)
        .list(&lp)
        .await?
        .items
        .iter()
        .filter(|s| s.metadata.deletion_timestamp.is_none())
        .map(slice_view)
        .collect();
    v.sort();
    Ok(v)
}

/// Waits until both sides agree for every Service and keep agreeing for 1.5 s; returns how
/// many slices were compared.
async fn converge(client: &Client, ns: &str, names: &[&str], what: &str) -> Result<usize> {
    test_support::invariants::agree_steadily(what, Duration::from_secs(60), || async {
        let mut compared = 0;
        for s in names {
            let ours = side(client, ns, s, OURS).await?;
            let up = side(client, ns, s, UPSTREAM).await?;
            if ours != up {
                return Ok(Err(format!(
                    "mirrored slices differ: {s}:\nours     {}\nupstream {}",
                    ours.join("\n         "),
                    up.join("\n         ")
                )));
            }
            compared += ours.len();
        }
        Ok(Ok(compared))
    })
    .await
}

async fn put_endpoints(
    api: &Api<Endpoints>,
    name: &str,
    subsets: Value,
    labels: Value,
    annotations: Value,
) -> Result<()> {
    let mut ep: Endpoints = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels, "annotations": annotations},
        "subsets": subsets,
    }))?;
    match api.get_opt(name).await? {
        Some(cur) => {
            ep.metadata.resource_version = cur.metadata.resource_version;
            api.replace(name, &PostParams::default(), &ep).await?;
        }
        None => {
            api.create(&PostParams::default(), &ep).await?;
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrored_slices_agree_with_upstream_on_hand_made_endpoints() -> Result<()> {
    let cp = ControlPlane::start(ControlPlaneOptions::default()).await?;
    let client = cp.client().await?;
    let mut kcm = test_support::upstream_controllers(&cp, "endpointslicemirroring,endpoint")?;
    let (gate, _tx) = LeaderGate::fixed(true);
    let base = ContextBase::new(client.clone(), gate);
    let shutdown = base.shutdown.clone();
    let ctx = base.context(
        "endpointslice-mirroring",
        "endpointslice-mirroring-controller",
    );
    tokio::spawn(endpointslice::run_mirroring(
        ctx,
        endpointslice::MirroringConfig::default(),
    ));

    let result = steps(&client).await;
    shutdown.cancel();
    let _ = kcm.kill().await;
    cp.stop().await;
    let compared = result?;
    eprintln!("compared {compared} mirrored slices");
    Ok(())
}

async fn steps(client: &Client) -> Result<usize> {
    let ns = namespace(client, "diff-mirror").await?;
    let svcs: Api<Service> = Api::namespaced(client.clone(), &ns);
    let eps: Api<Endpoints> = Api::namespaced(client.clone(), &ns);
    let cases = cases();
    let names: Vec<&str> = cases.iter().map(|c| c.0).collect();
    for (name, subsets, labels) in &cases {
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"ports": [{"name": "http", "port": 80}]},
        }))?;
        svcs.create(&PostParams::default(), &svc).await?;
        put_endpoints(
            &eps,
            name,
            subsets.clone(),
            labels.clone(),
            json!({"example.com/note": "hand-made"}),
        )
        .await?;
    }
    let mut compared = converge(client, &ns, &names, "initial").await?;
    if compared < 8 {
        bail!("initial: only {compared} slices compared");
    }

    // Edits: readiness flips, a subset dropped, ports changed, labels and annotations changed,
    // skip-mirror removed and added.
    let http = port("http", 80);
    let https = port("https", 443);
    let edits = [
        (
            "split-readiness",
            json!([{"notReadyAddresses": [addr("10.1.1.1"), addr("10.1.1.2")], "ports": [http]},
                   {"addresses": [addr("10.1.1.2")], "ports": [http]}]),
            json!({}),
        ),
        (
            "overlapping-ports",
            json!([{"addresses": [addr("10.1.3.1")], "ports": [https, http]},
                   {"addresses": [addr("10.1.3.1")], "ports": [http]}]),
            json!({"team": "b"}),
        ),
        ("several-subsets", json!([]), json!({})),
        (
            "skip",
            json!([{"addresses": [addr("10.1.7.1")], "ports": [http]}]),
            json!({}),
        ),
        (
            "plain",
            json!([{"addresses": [addr("10.1.0.1")], "ports": [http]}]),
            json!({"endpointslice.kubernetes.io/skip-mirror": "true"}),
        ),
    ];
    for (name, subsets, labels) in edits {
        put_endpoints(
            &eps,
            name,
            subsets,
            labels,
            json!({"example.com/note": "edited"}),
        )
        .await?;
    }
    compared += converge(client, &ns, &names, "after the edits").await?;

    // An Endpoints deleted, and a Service given a selector (no longer mirrored).
    eps.delete("dual", &DeleteParams::default()).await?;
    svcs.patch(
        "no-ports",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(json!({"spec": {"selector": {"app": "none"}}})),
    )
    .await?;
    compared += converge(client, &ns, &names, "after a deletion and a selector").await?;
    taken_over(client, &ns).await?;
    let mut left = BTreeMap::new();
    for n in ["dual", "no-ports"] {
        left.insert(n, side(client, &ns, n, OURS).await?.len());
    }
    if left.values().any(|n| *n != 0) {
        bail!("slices left behind: {left:?}");
    }
    Ok(compared)
}

/// A hand-made Endpoints of an unusual shape (a pod's address ready in one subset and not ready
/// in another, a stranger's address, overlapping ports), then a selector Service of that name
/// over two pods, one ready: upstream's `endpoint` controller rewrites the object, and our core
/// must plan exactly what upstream wrote from the hand-made one.
async fn taken_over(client: &Client, ns: &str) -> Result<()> {
    use endpointslice::endpoints_core::{self, EndpointsPlan};
    use k8s_openapi::api::core::v1::Pod;
    use test_support::{NodeSpecBuilder, PodBuilder, create_node, create_pod};
    let name = "taken-over";
    // Pods on a Node: upstream writes each address's nodeName, which must not be empty.
    let node = format!("{ns}-n1");
    create_node(
        client,
        NodeSpecBuilder {
            name: node.clone(),
            ..Default::default()
        },
    )
    .await?;
    let mut readiness = super::trigger::Readiness::default();
    let mut pods = Vec::new();
    for (pod, ip, ready) in [("to-a", "10.1.9.1", true), ("to-b", "10.1.9.2", false)] {
        let mut b = PodBuilder::new(ns, pod, &[("app", name)]);
        b.node_name = Some(node.clone());
        b.ports = vec![(Some("web".into()), 8080, "TCP".into())];
        create_pod(client, &b).await?;
        let since = readiness.transition(pod, ready)?;
        super::trigger::set_status(client, ns, pod, ready, &[ip.to_string()], &since).await?;
        pods.push(pod);
    }
    let eps: Api<Endpoints> = Api::namespaced(client.clone(), ns);
    let web = port("web", 8080);
    let other = port("other", 9090);
    let hand: Endpoints = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"team": "a"}},
        "subsets": [
            {"addresses": [addr("10.1.9.1"), addr("10.1.9.9")], "ports": [web, other]},
            {"notReadyAddresses": [addr("10.1.9.1")], "ports": [web]},
            {"addresses": [addr("10.1.9.2")], "notReadyAddresses": [addr("10.1.9.9")], "ports": [other, web]}
        ],
    }))?;
    let hand = eps.create(&PostParams::default(), &hand).await?;
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": 80, "targetPort": "web"}]},
    }))?;
    let svc = Api::<Service>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &svc)
        .await?;
    // The pods as the API server has them now (IPs and conditions set).
    let pod_api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let mut listed = Vec::new();
    for p in &pods {
        listed.push(pod_api.get(p).await?);
    }
    let refs: Vec<&Pod> = listed.iter().collect();
    let ours = match endpoints_core::plan(&svc, &refs, Some(&hand), None) {
        EndpointsPlan::Update(o) => o,
        other => bail!("{name}: ours would not rewrite the hand-made Endpoints: {other:?}"),
    };
    // Upstream's rewrite: its managed-by label shows it took the object over.
    let deadline = Instant::now() + Duration::from_secs(60);
    let upstream = loop {
        if let Some(e) = eps.get_opt(name).await?
            && e.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(endpoints_core::ENDPOINTS_MANAGED_BY))
                .is_some()
        {
            break e;
        }
        if Instant::now() >= deadline {
            bail!(
                "{name}: upstream never took the hand-made Endpoints over: {:?}",
                eps.get_opt(name).await?
            );
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    };
    let view = |e: &Endpoints| {
        (
            serde_json::to_value(&e.subsets).unwrap_or_default(),
            e.metadata.labels.clone().unwrap_or_default(),
        )
    };
    if view(&ours) != view(&upstream) {
        bail!(
            "{name}: from the hand-made Endpoints ours plans {:?}\nupstream wrote {:?}",
            view(&ours),
            view(&upstream)
        );
    }
    // And with upstream's object in place, ours has nothing left to change.
    super::legacy::check(client, ns, &[name.to_string()], "taken over").await?;
    Ok(())
}
