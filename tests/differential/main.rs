//! Differential tests: every scenario in `tests/differential/scenarios/*.yaml` (Nodes,
//! Services, then steps applied to Pods and Services) runs on one real API server with our
//! EndpointSlice controller and kube-controller-manager's (`--controllers=endpointslice,endpoint`) side
//! by side. Each manages its own slices (different managed-by values), so both see exactly the
//! same objects at the same moments. After every step both must converge to the same EndpointSlices,
//! endpoint for endpoint: addresses, conditions, ports, hostname, nodeName, zone, hints;
//! generated names, resourceVersions and the managed-by label are ignored, and the
//! trigger-time annotation is compared on its own terms (below).
//!
//! Deliberate difference: under `topology-mode: Auto`, which endpoints of an over-supplied
//! zone are re-hinted to another zone follows Go map order upstream (random) and sorted order
//! here, so those scenarios compare hint counts per zone instead (`hints: counts`).
//!
//! Beyond the endpoints (issue 16): the trigger-time annotation is compared where both
//! controllers necessarily saw the same change (`trigger`), and kube-controller-manager's
//! `endpoint` controller runs too, its legacy Endpoints checked against our core (`legacy`).
//! Pods get a Ready `lastTransitionTime` at each transition, as a kubelet sets it.
//!
//! Mirroring has a test of its own (`mirroring`): hand-made Endpoints of unusual shapes against
//! kube-controller-manager's `endpointslicemirroring` controller.

mod legacy;
mod mirroring;
mod trigger;

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use scm_runtime::{ContextBase, LeaderGate};
use serde::Deserialize;
use test_support::invariants::converge;
use test_support::{
    ControlPlane, ControlPlaneOptions, NodeSpecBuilder, PodBuilder, create_node, create_pod,
    namespace,
};
use trigger::{Readiness, StepKind};

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

async fn create_pod_def(
    client: &Client,
    ns: &str,
    p: &PodDef,
    readiness: &mut Readiness,
) -> Result<()> {
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
    let since = readiness.transition(&p.name, p.ready)?;
    trigger::set_status(client, ns, &p.name, p.ready, &p.ips, &since).await?;
    Ok(())
}

/// Applies a step; what it changed, for the trigger-time comparison.
async fn apply_step(
    client: &Client,
    ns: &str,
    step: &Step,
    ips: &mut BTreeMap<String, Vec<String>>,
    readiness: &mut Readiness,
) -> Result<StepKind> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let svcs: Api<Service> = Api::namespaced(client.clone(), ns);
    match step {
        Step::Pods(list) => {
            for p in list {
                create_pod_def(client, ns, p, readiness).await?;
                ips.insert(p.name.clone(), p.ips.clone());
            }
            return Ok(StepKind::PodsCreated);
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
                create_pod_def(client, ns, &p, readiness).await?;
                ips.insert(p.name.clone(), p.ips.clone());
            }
            return Ok(StepKind::PodsCreated);
        }
        Step::SetReady { pod, ready } => {
            let i = ips.get(pod).cloned().unwrap_or_default();
            let since = readiness.transition(pod, *ready)?;
            trigger::set_status(client, ns, pod, *ready, &i, &since).await?;
            return Ok(StepKind::Transition {
                pod: pod.clone(),
                at: trigger::api_time(&since)?,
            });
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
    Ok(StepKind::OneEvent)
}

/// How much a scenario compared beyond the endpoints.
#[derive(Default)]
struct Extra {
    triggers: trigger::Compared,
    endpoints_objects: usize,
}

async fn run_scenario(client: &Client, sc: &Scenario, extra: &mut Extra) -> Result<()> {
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
    let mut created = Vec::new();
    for s in &sc.services {
        let svc: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": s.name, "labels": s.labels, "annotations": s.annotations},
            "spec": s.spec,
        }))?;
        let made = api
            .create(&PostParams::default(), &svc)
            .await
            .with_context(|| format!("service {}", s.name))?;
        if let Some(t) = made.metadata.creation_timestamp.as_ref() {
            created.push((s.name.clone(), trigger::api_time(t)?));
        }
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
    let what = format!("{}: initial", sc.name);
    let none = trigger::Versions::default();
    let kind = StepKind::Created(created);
    extra.triggers += trigger::check(client, &ns, &names, &kind, &none, &what).await?;
    extra.endpoints_objects += legacy::check(client, &ns, &names, &what).await?;
    let mut ips = BTreeMap::new();
    let mut readiness = Readiness::default();
    let mut most = 0;
    for (i, step) in sc.steps.iter().enumerate() {
        let before = trigger::versions(client, &ns, &names).await?;
        let kind = apply_step(client, &ns, step, &mut ips, &mut readiness)
            .await
            .with_context(|| format!("{} step {i}", sc.name))?;
        let what = format!("{} after step {i} ({step:?})", sc.name);
        let c = converge(client, &ns, &names, counts, &what).await?;
        extra.triggers += trigger::check(client, &ns, &names, &kind, &before, &what).await?;
        extra.endpoints_objects += legacy::check(client, &ns, &names, &what).await?;
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
    // kube-controller-manager's EndpointSlice controller, and its legacy Endpoints one.
    let mut kcm = test_support::upstream_controllers(&cp, "endpointslice,endpoint")?;
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
    let mut extra = Extra::default();
    for f in &files {
        // Through JSON: serde_yaml 0.9 wants `!tags` for enums, the files use plain maps.
        let raw: serde_json::Value = serde_yaml::from_str(&std::fs::read_to_string(f)?)
            .with_context(|| f.display().to_string())?;
        let sc: Scenario = serde_json::from_value(raw).with_context(|| f.display().to_string())?;
        eprintln!("scenario {}", sc.name);
        if let Err(e) = run_scenario(&client, &sc, &mut extra).await {
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
    eprintln!(
        "compared {} trigger-time annotations by value, {} by presence, {} Endpoints objects",
        extra.triggers.values, extra.triggers.presence, extra.endpoints_objects
    );
    assert!(
        extra.triggers.values > 0 && extra.triggers.presence > 0,
        "trigger-time annotations not compared"
    );
    assert!(extra.endpoints_objects > 0, "no Endpoints object compared");
    Ok(())
}
