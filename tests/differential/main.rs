//! Differential tests: every scenario in `tests/differential/scenarios/*.yaml` (Nodes,
//! Services, then steps applied to Pods and Services) runs on one real API server with our
//! EndpointSlice controller and kube-controller-manager's (`--controllers=endpointslice`) side
//! by side. Each manages its own slices (different managed-by values), so both see exactly the
//! same objects at the same moments. After every step both must converge to the same EndpointSlices,
//! endpoint for endpoint: addresses, conditions, ports, hostname, nodeName, zone, hints;
//! generated names, resourceVersions, the managed-by label and upstream's trigger-time
//! annotation are ignored.
//!
//! Deliberate difference: under `topology-mode: Auto`, which endpoints of an over-supplied
//! zone are re-hinted to another zone follows Go map order upstream (random) and sorted order
//! here, so those scenarios compare hint counts per zone instead (`hints: counts`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use endpointslice::common::{
    CONTROLLER_NAME, LABEL_MANAGED_BY, LABEL_SERVICE_NAME, UPSTREAM_CONTROLLER_NAME,
};
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use scm_runtime::{ContextBase, LeaderGate};
use serde::Deserialize;
use test_support::{
    ControlPlane, ControlPlaneOptions, NodeSpecBuilder, PodBuilder, create_node, create_pod,
    namespace, set_pod_status,
};

#[derive(Deserialize, Debug)]
struct Scenario {
    name: String,
    nodes: Vec<NodeDef>,
    services: Vec<SvcDef>,
    steps: Vec<Step>,
    #[serde(default)]
    hints: Option<String>,
}

#[derive(Deserialize, Debug)]
struct NodeDef {
    name: String,
    zone: Option<String>,
    cpu: Option<String>,
}

#[derive(Deserialize, Debug)]
struct SvcDef {
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
    spec: serde_json::Value,
}

#[derive(Deserialize, Debug, Clone)]
struct PortDef {
    name: Option<String>,
    port: i32,
}

#[derive(Deserialize, Debug, Clone)]
struct PodDef {
    name: String,
    labels: BTreeMap<String, String>,
    node: String,
    #[serde(default)]
    ports: Option<Vec<PortDef>>,
    ready: bool,
    ips: Vec<String>,
    hostname: Option<String>,
    subdomain: Option<String>,
}

#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase")]
struct GenDef {
    prefix: String,
    count: usize,
    labels: BTreeMap<String, String>,
    nodes: Vec<String>,
    ip_prefix: String,
    ready: bool,
}

#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase")]
enum Step {
    Pods(Vec<PodDef>),
    GeneratePods(GenDef),
    SetReady {
        pod: String,
        ready: bool,
    },
    DeletePod(String),
    ForceDeletePod(String),
    PatchService {
        name: String,
        patch: serde_json::Value,
    },
    DeleteService(String),
}

/// How much a converged comparison covered.
#[derive(Default, Debug)]
struct Compared {
    endpoints: usize,
    hinted: usize,
}

/// One endpoint as compared: everything but the order it sits in.
type EpView = BTreeMap<String, String>;
/// (addressType, sorted ports) -> endpoints by address.
type View = BTreeMap<(String, Vec<String>), BTreeMap<Vec<String>, EpView>>;

fn view(slices: &[EndpointSlice], hint_counts: bool) -> (View, BTreeMap<String, usize>) {
    let mut v: View = BTreeMap::new();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for s in slices {
        let mut ports: Vec<String> = s
            .ports
            .iter()
            .flatten()
            .map(|p| {
                format!(
                    "{}/{}/{}/{:?}",
                    p.name.clone().unwrap_or_default(),
                    p.port.unwrap_or(0),
                    p.protocol.clone().unwrap_or_default(),
                    p.app_protocol
                )
            })
            .collect();
        ports.sort();
        let group = v.entry((s.address_type.clone(), ports)).or_default();
        for e in s.endpoints.iter().flatten() {
            let c = e.conditions.clone().unwrap_or_default();
            let mut m = BTreeMap::new();
            m.insert("ready".into(), format!("{:?}", c.ready));
            m.insert("serving".into(), format!("{:?}", c.serving));
            m.insert("terminating".into(), format!("{:?}", c.terminating));
            m.insert("hostname".into(), format!("{:?}", e.hostname));
            m.insert("nodeName".into(), format!("{:?}", e.node_name));
            m.insert("zone".into(), format!("{:?}", e.zone));
            m.insert(
                "target".into(),
                format!(
                    "{:?}",
                    e.target_ref
                        .as_ref()
                        .map(|r| (&r.kind, &r.namespace, &r.name, &r.uid))
                ),
            );
            let hint = format!(
                "{:?}",
                e.hints.as_ref().map(|h| (
                    h.for_zones
                        .as_ref()
                        .map(|z| z.iter().map(|z| z.name.clone()).collect::<Vec<_>>()),
                    h.for_nodes
                        .as_ref()
                        .map(|z| z.iter().map(|z| z.name.clone()).collect::<Vec<_>>())
                ))
            );
            if hint_counts {
                *counts.entry(hint).or_default() += 1;
            } else {
                m.insert("hints".into(), hint);
            }
            let mut addrs = e.addresses.clone();
            addrs.sort();
            group.insert(addrs, m);
        }
    }
    (v, counts)
}

struct Side {
    slices: usize,
    view: (View, BTreeMap<String, usize>),
    labels: BTreeSet<BTreeMap<String, String>>,
}

async fn side(
    client: &Client,
    ns: &str,
    svc: &str,
    managed_by: &str,
    hint_counts: bool,
) -> Result<Side> {
    let api: Api<EndpointSlice> = Api::namespaced(client.clone(), ns);
    let lp = ListParams::default().labels(&format!(
        "{LABEL_SERVICE_NAME}={svc},{LABEL_MANAGED_BY}={managed_by}"
    ));
    let items = api.list(&lp).await?.items;
    let labels = items
        .iter()
        .map(|s| {
            let mut l = s.metadata.labels.clone().unwrap_or_default();
            l.remove(LABEL_MANAGED_BY);
            l
        })
        .collect();
    Ok(Side {
        slices: items.len(),
        view: view(&items, hint_counts),
        labels,
    })
}

/// Waits until ours and upstream's agree for every Service and keep agreeing for 1.5 s
/// (upstream delays some syncs by 1 s); fails with the last difference.
async fn converge(
    client: &Client,
    ns: &str,
    svcs: &[String],
    hint_counts: bool,
    what: &str,
) -> Result<Compared> {
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut agreed_since: Option<Instant> = None;
    loop {
        let mut diff = None;
        let mut compared = Compared::default();
        for s in svcs {
            let ours = side(client, ns, s, CONTROLLER_NAME, hint_counts).await?;
            let up = side(client, ns, s, UPSTREAM_CONTROLLER_NAME, hint_counts).await?;
            if ours.view != up.view {
                diff = Some(format!(
                    "service {s}: ours {:?}\nupstream {:?}",
                    ours.view, up.view
                ));
                break;
            }
            if ours.labels != up.labels {
                diff = Some(format!(
                    "service {s} labels: ours {:?} upstream {:?}",
                    ours.labels, up.labels
                ));
                break;
            }
            if ours.slices != up.slices {
                diff = Some(format!(
                    "service {s}: {} slices here, {} upstream",
                    ours.slices, up.slices
                ));
                break;
            }
            compared.endpoints += ours.view.0.values().map(BTreeMap::len).sum::<usize>();
            compared.hinted += ours
                .view
                .1
                .iter()
                .filter(|(k, _)| k.as_str() != "None")
                .map(|(_, n)| n)
                .sum::<usize>();
        }
        match diff {
            None => {
                let since = *agreed_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= Duration::from_millis(1500) {
                    return Ok(compared);
                }
            }
            Some(d) => {
                agreed_since = None;
                if Instant::now() >= deadline {
                    bail!("{what}: ours and upstream differ:\n{d}");
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

async fn create_pod_def(client: &Client, ns: &str, p: &PodDef) -> Result<()> {
    let labels: Vec<(&str, &str)> = p
        .labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let mut b = PodBuilder::new(ns, &p.name, &labels);
    b.node_name = Some(format!("{ns}-{}", p.node));
    b.ports = p
        .ports
        .iter()
        .flatten()
        .map(|d| (d.name.clone(), d.port, "TCP".to_string()))
        .collect();
    b.hostname = p.hostname.clone();
    b.subdomain = p.subdomain.clone();
    create_pod(client, &b).await?;
    let ips: Vec<&str> = p.ips.iter().map(String::as_str).collect();
    set_pod_status(client, ns, &p.name, p.ready, &ips).await?;
    Ok(())
}

async fn apply_step(
    client: &Client,
    ns: &str,
    step: &Step,
    ips: &mut BTreeMap<String, Vec<String>>,
) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let svcs: Api<Service> = Api::namespaced(client.clone(), ns);
    match step {
        Step::Pods(list) => {
            for p in list {
                create_pod_def(client, ns, p).await?;
                ips.insert(p.name.clone(), p.ips.clone());
            }
        }
        Step::GeneratePods(g) => {
            for i in 0..g.count {
                let p = PodDef {
                    name: format!("{}-{i}", g.prefix),
                    labels: g.labels.clone(),
                    node: g.nodes[i % g.nodes.len()].clone(),
                    ports: None,
                    ready: g.ready,
                    ips: vec![format!("{}.{}.{}", g.ip_prefix, i / 250, i % 250 + 1)],
                    hostname: None,
                    subdomain: None,
                };
                create_pod_def(client, ns, &p).await?;
                ips.insert(p.name.clone(), p.ips.clone());
            }
        }
        Step::SetReady { pod, ready } => {
            let i = ips.get(pod).cloned().unwrap_or_default();
            let refs: Vec<&str> = i.iter().map(String::as_str).collect();
            set_pod_status(client, ns, pod, *ready, &refs).await?;
        }
        Step::DeletePod(p) => {
            pods.delete(p, &DeleteParams::default()).await?;
        }
        Step::ForceDeletePod(p) => {
            pods.delete(p, &DeleteParams::default().grace_period(0))
                .await?;
        }
        Step::PatchService { name, patch } => {
            svcs.patch(name, &PatchParams::default(), &Patch::Merge(patch))
                .await?;
        }
        Step::DeleteService(name) => {
            svcs.delete(name, &DeleteParams::default()).await?;
        }
    }
    Ok(())
}

async fn run_scenario(client: &Client, sc: &Scenario) -> Result<()> {
    let ns = namespace(client, &format!("diff-{}", sc.name)).await?;
    let nodes: Api<Node> = Api::all(client.clone());
    for n in &sc.nodes {
        let name = format!("{ns}-{}", n.name);
        create_node(
            client,
            NodeSpecBuilder {
                name: name.clone(),
                zone: n.zone.clone(),
                ..Default::default()
            },
        )
        .await?;
        if let Some(cpu) = &n.cpu {
            let patch = serde_json::json!({"status": {"allocatable": {"cpu": cpu}, "capacity": {"cpu": cpu}}});
            nodes
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
        }
    }
    let api: Api<Service> = Api::namespaced(client.clone(), &ns);
    for s in &sc.services {
        let svc: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": s.name, "labels": s.labels, "annotations": s.annotations},
            "spec": s.spec,
        }))?;
        api.create(&PostParams::default(), &svc)
            .await
            .with_context(|| format!("service {}", s.name))?;
    }
    let names: Vec<String> = sc.services.iter().map(|s| s.name.clone()).collect();
    let counts = sc.hints.as_deref() == Some("counts");
    converge(
        client,
        &ns,
        &names,
        counts,
        &format!("{}: initial", sc.name),
    )
    .await?;
    let mut ips = BTreeMap::new();
    let mut most = 0;
    for (i, step) in sc.steps.iter().enumerate() {
        apply_step(client, &ns, step, &mut ips)
            .await
            .with_context(|| format!("{} step {i}", sc.name))?;
        let c = converge(
            client,
            &ns,
            &names,
            counts,
            &format!("{} after step {i} ({step:?})", sc.name),
        )
        .await?;
        eprintln!(
            "  step {i}: {} endpoints agree, {} hinted",
            c.endpoints, c.hinted
        );
        if counts && c.hinted == 0 {
            bail!("{}: no hints were produced, nothing was compared", sc.name);
        }
        most = most.max(c.endpoints);
    }
    if most == 0 {
        bail!("{}: no endpoints were ever compared", sc.name);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ours_and_upstream_agree_on_every_scenario() -> Result<()> {
    let cp = ControlPlane::start(ControlPlaneOptions::default()).await?;
    let client = cp.client().await?;
    let mut kcm = test_support::upstream_endpointslice_controller(&cp)?;
    let (gate, _tx) = LeaderGate::fixed(true);
    let base = ContextBase::new(client.clone(), gate);
    let shutdown = base.shutdown.clone();
    let ctx = base.context("endpointslice", "endpointslice-controller");
    tokio::spawn(endpointslice::run(
        ctx,
        endpointslice::EndpointSliceConfig::default(),
    ));
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/differential/scenarios");
    let mut files: Vec<_> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    files.sort();
    let mut failures = Vec::new();
    for f in &files {
        // Through JSON: serde_yaml 0.9 wants `!tags` for enums, the files use plain maps.
        let raw: serde_json::Value = serde_yaml::from_str(&std::fs::read_to_string(f)?)
            .with_context(|| f.display().to_string())?;
        let sc: Scenario = serde_json::from_value(raw).with_context(|| f.display().to_string())?;
        eprintln!("scenario {}", sc.name);
        if let Err(e) = run_scenario(&client, &sc).await {
            failures.push(format!("{e:#}"));
        }
    }
    shutdown.cancel();
    let _ = kcm.kill().await;
    cp.stop().await;
    assert!(files.len() >= 5, "scenarios missing");
    if !failures.is_empty() {
        bail!(
            "{} scenario(s) differ:\n{}",
            failures.len(),
            failures.join("\n\n")
        );
    }
    Ok(())
}
