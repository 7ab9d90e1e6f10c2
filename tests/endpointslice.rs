//! The EndpointSlice, mirroring and legacy Endpoints controllers against the real local
//! control plane. Each test runs its own controller in-process, scoped by
//! `--service-label-selector` to the Services of its own namespace, so tests run in parallel
//! on one API server without seeing each other's Services.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Result, bail};
use endpointslice::common::{
    CONTROLLER_NAME, LABEL_MANAGED_BY, LABEL_SERVICE_NAME, LABEL_SKIP_MIRROR,
    MIRRORING_CONTROLLER_NAME, UPSTREAM_CONTROLLER_NAME,
};
use endpointslice::{EndpointSliceConfig, EndpointsConfig, MirroringConfig};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Endpoints, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use scm_runtime::{ContextBase, ControllerContext, LeaderGate, Metrics};
use test_support::{
    ControlPlane, ControlPlaneOptions, NodeSpecBuilder, PodBuilder, create_node, create_pod,
    namespace, set_pod_status, wait_for,
};
use tokio_util::sync::CancellationToken;

#[path = "endpointslice/conditions.rs"]
mod conditions;
#[path = "endpointslice/legacy.rs"]
mod legacy;
#[path = "endpointslice/mirroring.rs"]
mod mirroring;
#[path = "endpointslice/service_status.rs"]
mod service_status;
#[path = "endpointslice/slices.rs"]
mod slices;
#[path = "endpointslice/trigger_time.rs"]
mod trigger_time;

const WAIT: Duration = Duration::from_secs(60);

/// A controller running in this process; stopped when dropped.
struct Running {
    shutdown: CancellationToken,
    metrics: Metrics,
    _leader: tokio::sync::watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Stops the controller and waits until it has (in-flight reconciles drained), so a test
    /// can act on the API with no write of it still to come.
    async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(30), t).await;
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn context(client: &Client, name: &str) -> (ControllerContext, Running) {
    let (gate, tx) = LeaderGate::fixed(true);
    let base = ContextBase::new(client.clone(), gate);
    let (shutdown, metrics) = (base.shutdown.clone(), base.metrics.clone());
    let ctx = base.context(name, &format!("{name}-controller"));
    (
        ctx,
        Running {
            shutdown,
            metrics,
            _leader: tx,
            task: None,
        },
    )
}

fn scope(ns: &str) -> Option<String> {
    Some(format!("scm-test={ns}"))
}

fn start_slices(client: &Client, ns: &str, mut cfg: EndpointSliceConfig) -> Running {
    cfg.shell.service_label_selector = scope(ns);
    let (ctx, r) = context(client, "endpointslice");
    tokio::spawn(async move {
        if let Err(e) = endpointslice::run(ctx, cfg).await {
            eprintln!("endpointslice controller failed: {e}");
        }
    });
    r
}

fn start_mirroring(client: &Client, ns: &str) -> Running {
    let mut cfg = MirroringConfig::default();
    cfg.shell.service_label_selector = scope(ns);
    let (ctx, mut r) = context(client, "endpointslice-mirroring");
    r.task = Some(tokio::spawn(async move {
        if let Err(e) = endpointslice::run_mirroring(ctx, cfg).await {
            eprintln!("mirroring controller failed: {e}");
        }
    }));
    r
}

fn start_endpoints(client: &Client, ns: &str) -> Running {
    let cfg = EndpointsConfig {
        service_label_selector: scope(ns),
        ..Default::default()
    };
    let (ctx, r) = context(client, "endpoints");
    tokio::spawn(async move {
        if let Err(e) = endpointslice::run_endpoints(ctx, cfg).await {
            eprintln!("endpoints controller failed: {e}");
        }
    });
    r
}

struct Env {
    client: Client,
    ns: String,
}

async fn env(prefix: &str) -> Result<Env> {
    let cp = ControlPlane::shared().await?;
    env_on(cp, prefix).await
}

async fn env_on(cp: &ControlPlane, prefix: &str) -> Result<Env> {
    let client = cp.client().await?;
    let ns = namespace(&client, prefix).await?;
    // Three nodes per test: two zones and one without a zone label.
    for (i, zone) in [Some("zone-a"), Some("zone-b"), None]
        .into_iter()
        .enumerate()
    {
        create_node(
            &client,
            NodeSpecBuilder {
                name: format!("{ns}-n{i}"),
                zone: zone.map(String::from),
                ..Default::default()
            },
        )
        .await?;
    }
    Ok(Env { client, ns })
}

impl Env {
    fn node(&self, i: usize) -> String {
        format!("{}-n{}", self.ns, i % 3)
    }

    async fn service(&self, name: &str, spec: serde_json::Value) -> Result<Service> {
        self.service_with(name, spec, serde_json::json!({})).await
    }

    async fn service_with(
        &self,
        name: &str,
        spec: serde_json::Value,
        meta: serde_json::Value,
    ) -> Result<Service> {
        let mut m = serde_json::json!({"name": name, "namespace": self.ns, "labels": {"scm-test": self.ns}});
        if let (Some(m), Some(extra)) = (m.as_object_mut(), meta.as_object()) {
            for (k, v) in extra {
                if k == "labels" {
                    if let (Some(l), Some(more)) = (
                        m.get_mut("labels").and_then(|l| l.as_object_mut()),
                        v.as_object(),
                    ) {
                        l.extend(more.clone());
                    }
                } else {
                    m.insert(k.clone(), v.clone());
                }
            }
        }
        let svc: Service =
            serde_json::from_value(serde_json::json!({"metadata": m, "spec": spec}))?;
        let api: Api<Service> = Api::namespaced(self.client.clone(), &self.ns);
        Ok(api.create(&PostParams::default(), &svc).await?)
    }

    /// Creates pod `name` on node `i % 3` with container port `http`=`port` and sets it Running.
    async fn pod(&self, i: usize, app: &str, ready: bool, port: i32) -> Result<Pod> {
        let mut b = PodBuilder::new(&self.ns, &format!("{app}-{i}"), &[("app", app)]);
        b.node_name = Some(self.node(i));
        b.ports = vec![(Some("http".into()), port, "TCP".into())];
        create_pod(&self.client, &b).await?;
        let ip = pod_ip(i);
        set_pod_status(&self.client, &self.ns, &b.name, ready, &[ip.as_str()]).await
    }

    async fn pods(&self, n: usize, app: &str, ready: bool) -> Result<()> {
        let results: Vec<Result<Pod>> = futures::stream::iter(0..n)
            .map(|i| self.pod(i, app, ready, 8080))
            .buffer_unordered(16)
            .collect()
            .await;
        for r in results {
            r?;
        }
        Ok(())
    }

    async fn set_ready(&self, name: &str, ip: &str, ready: bool) -> Result<()> {
        set_pod_status(&self.client, &self.ns, name, ready, &[ip])
            .await
            .map(|_| ())
    }

    fn slices_api(&self) -> Api<EndpointSlice> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    async fn slices_by(&self, svc: &str, managed_by: &str) -> Result<Vec<EndpointSlice>> {
        let lp = ListParams::default().labels(&format!(
            "{LABEL_SERVICE_NAME}={svc},{LABEL_MANAGED_BY}={managed_by}"
        ));
        Ok(self.slices_api().list(&lp).await?.items)
    }

    async fn slices(&self, svc: &str) -> Result<Vec<EndpointSlice>> {
        self.slices_by(svc, CONTROLLER_NAME).await
    }

    /// Polls until `check` accepts our slices of `svc`; returns them.
    async fn wait_slices<F>(&self, svc: &str, what: &str, check: F) -> Result<Vec<EndpointSlice>>
    where
        F: Fn(&[EndpointSlice]) -> bool,
    {
        let mut last = Vec::new();
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Ok(s) = self.slices(svc).await {
                if check(&s) {
                    return Ok(s);
                }
                last = s;
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "timed out waiting for {what}; last slices: {}",
                    summary(&last)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Env {
    /// Like [`Env::wait_slices`], then waits until our slices of `svc` stop changing (the same
    /// names and resourceVersions for 1 s) and still pass `check`: a sync writes its creates,
    /// updates and deletes one by one, so a state that passes `check` can be the middle of a
    /// sync (e.g. a new slice made, the placeholder not yet deleted).
    async fn wait_slices_settled<F>(
        &self,
        svc: &str,
        what: &str,
        check: F,
    ) -> Result<Vec<EndpointSlice>>
    where
        F: Fn(&[EndpointSlice]) -> bool,
    {
        self.wait_slices(svc, what, &check).await?;
        let versions = |s: &[EndpointSlice]| -> BTreeMap<String, String> {
            s.iter()
                .map(|s| {
                    (
                        s.metadata.name.clone().unwrap_or_default(),
                        s.metadata.resource_version.clone().unwrap_or_default(),
                    )
                })
                .collect()
        };
        let settled = test_support::wait_stable(
            &format!("{what}, settled"),
            WAIT,
            Duration::from_millis(200),
            5,
            || async {
                let s = self.slices(svc).await.ok()?;
                check(&s).then(|| versions(&s))
            },
        )
        .await?;
        let s = self.slices(svc).await?;
        if versions(&s) != settled {
            bail!("{what}: our slices changed again after settling");
        }
        Ok(s)
    }
}

fn pod_ip(i: usize) -> String {
    format!(
        "10.{}.{}.{}",
        100 + (i >> 16) % 100,
        (i >> 8) & 255,
        i & 255
    )
}

#[derive(Clone, Debug, PartialEq)]
struct Ep {
    addresses: Vec<String>,
    ready: Option<bool>,
    serving: Option<bool>,
    terminating: Option<bool>,
    node: Option<String>,
    zone: Option<String>,
    hostname: Option<String>,
    hint_zones: Option<Vec<String>>,
    ports: Vec<(String, i32)>,
}

/// Endpoints by pod name across slices.
fn endpoints(slices: &[EndpointSlice]) -> BTreeMap<String, Ep> {
    let mut out = BTreeMap::new();
    for s in slices {
        let ports: Vec<(String, i32)> = s
            .ports
            .iter()
            .flatten()
            .map(|p| (p.name.clone().unwrap_or_default(), p.port.unwrap_or(0)))
            .collect();
        for e in s.endpoints.iter().flatten() {
            let c = e.conditions.clone().unwrap_or_default();
            let name = e
                .target_ref
                .as_ref()
                .and_then(|r| r.name.clone())
                .unwrap_or_default();
            out.insert(
                name,
                Ep {
                    addresses: e.addresses.clone(),
                    ready: c.ready,
                    serving: c.serving,
                    terminating: c.terminating,
                    node: e.node_name.clone(),
                    zone: e.zone.clone(),
                    hostname: e.hostname.clone(),
                    hint_zones: e
                        .hints
                        .as_ref()
                        .and_then(|h| h.for_zones.as_ref())
                        .map(|z| z.iter().map(|z| z.name.clone()).collect()),
                    ports: ports.clone(),
                },
            );
        }
    }
    out
}

fn summary(slices: &[EndpointSlice]) -> String {
    let eps = endpoints(slices);
    format!("{} slices, endpoints {:?}", slices.len(), eps)
}

fn total_endpoints(slices: &[EndpointSlice]) -> usize {
    slices
        .iter()
        .map(|s| s.endpoints.as_ref().map_or(0, Vec::len))
        .sum()
}

fn ready_count(slices: &[EndpointSlice]) -> usize {
    endpoints(slices)
        .values()
        .filter(|e| e.ready == Some(true))
        .count()
}

fn basic_spec(extra: serde_json::Value) -> serde_json::Value {
    let mut spec = serde_json::json!({
        "selector": {"app": "web"},
        "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}],
    });
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        s.extend(e.clone());
    }
    spec
}
