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

const WAIT: Duration = Duration::from_secs(60);

/// A controller running in this process; stopped when dropped.
struct Running {
    shutdown: CancellationToken,
    metrics: Metrics,
    _leader: tokio::sync::watch::Sender<bool>,
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
        },
    )
}

fn scope(ns: &str) -> Option<String> {
    Some(format!("scm-test={ns}"))
}

fn start_slices(client: &Client, ns: &str, mut cfg: EndpointSliceConfig) -> Running {
    cfg.service_label_selector = scope(ns);
    let (ctx, r) = context(client, "endpointslice");
    tokio::spawn(async move {
        if let Err(e) = endpointslice::run(ctx, cfg).await {
            eprintln!("endpointslice controller failed: {e}");
        }
    });
    r
}

fn start_mirroring(client: &Client, ns: &str) -> Running {
    let cfg = MirroringConfig {
        service_label_selector: scope(ns),
        ..Default::default()
    };
    let (ctx, r) = context(client, "endpointslice-mirroring");
    tokio::spawn(async move {
        if let Err(e) = endpointslice::run_mirroring(ctx, cfg).await {
            eprintln!("mirroring controller failed: {e}");
        }
    });
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_termination_and_deletion() -> Result<()> {
    let e = env("es-ready").await?;
    let _c = start_slices(&e.client, &e.ns, EndpointSliceConfig::default());
    e.service("web", basic_spec(serde_json::json!({}))).await?;
    e.pod(0, "web", true, 8080).await?;
    e.pod(1, "web", true, 8080).await?;
    e.pod(2, "web", false, 8080).await?;
    let s = e
        .wait_slices("web", "three endpoints", |s| endpoints(s).len() == 3)
        .await?;
    assert_eq!(s.len(), 1);
    let eps = endpoints(&s);
    let w0 = &eps["web-0"];
    assert_eq!(
        (w0.ready, w0.serving, w0.terminating),
        (Some(true), Some(true), Some(false))
    );
    assert_eq!(w0.zone.as_deref(), Some("zone-a"));
    assert_eq!(w0.node.as_deref(), Some(e.node(0).as_str()));
    assert_eq!(w0.ports, vec![("http".to_string(), 8080)]);
    assert_eq!(eps["web-1"].zone.as_deref(), Some("zone-b"));
    assert_eq!(eps["web-2"].zone, None, "node without zone label");
    assert_eq!(eps["web-2"].ready, Some(false));
    let labels = s[0].metadata.labels.clone().unwrap_or_default();
    assert_eq!(
        labels.get("scm-test"),
        Some(&e.ns),
        "Service labels carried over"
    );
    let owner = s[0].metadata.owner_references.clone().unwrap_or_default();
    assert_eq!(owner.first().map(|o| o.kind.as_str()), Some("Service"));

    // Readiness flips both ways.
    e.set_ready("web-2", &pod_ip(2), true).await?;
    e.set_ready("web-0", &pod_ip(0), false).await?;
    e.wait_slices("web", "web-2 ready, web-0 not", |s| {
        let eps = endpoints(s);
        eps.get("web-2").is_some_and(|x| x.ready == Some(true))
            && eps
                .get("web-0")
                .is_some_and(|x| x.ready == Some(false) && x.serving == Some(false))
    })
    .await?;

    // Graceful deletion: no kubelet finishes it, so the pod stays terminating.
    let pods: Api<Pod> = Api::namespaced(e.client.clone(), &e.ns);
    pods.delete("web-1", &DeleteParams::default()).await?;
    e.wait_slices("web", "web-1 terminating, still serving", |s| {
        endpoints(s).get("web-1").is_some_and(|x| {
            x.ready == Some(false) && x.serving == Some(true) && x.terminating == Some(true)
        })
    })
    .await?;
    pods.delete("web-1", &DeleteParams::default().grace_period(0))
        .await?;
    e.wait_slices("web", "web-1 gone", |s| {
        !endpoints(s).contains_key("web-1") && endpoints(s).len() == 2
    })
    .await?;

    // No pods at all: one placeholder slice with no endpoints and no ports.
    for p in ["web-0", "web-2"] {
        pods.delete(p, &DeleteParams::default().grace_period(0))
            .await?;
    }
    let s = e
        .wait_slices("web", "placeholder", |s| {
            s.len() == 1 && total_endpoints(s) == 0
        })
        .await?;
    assert!(s[0].ports.as_ref().is_none_or(Vec::is_empty));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_not_ready_addresses() -> Result<()> {
    let e = env("es-pnra").await?;
    let _c = start_slices(&e.client, &e.ns, EndpointSliceConfig::default());
    e.service(
        "web",
        basic_spec(serde_json::json!({"publishNotReadyAddresses": true})),
    )
    .await?;
    e.pod(0, "web", false, 8080).await?;
    let s = e
        .wait_slices("web", "one endpoint", |s| endpoints(s).len() == 1)
        .await?;
    let ep = &endpoints(&s)["web-0"];
    assert_eq!((ep.ready, ep.serving), (Some(true), Some(false)));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_ports_with_differing_containers() -> Result<()> {
    let e = env("es-ports").await?;
    let _c = start_slices(&e.client, &e.ns, EndpointSliceConfig::default());
    e.service("web", basic_spec(serde_json::json!({}))).await?;
    e.pod(0, "web", true, 8080).await?;
    e.pod(1, "web", true, 9090).await?;
    // A pod without the named port still gets an endpoint, in a slice without ports.
    let mut b = PodBuilder::new(&e.ns, "web-2", &[("app", "web")]);
    b.node_name = Some(e.node(2));
    create_pod(&e.client, &b).await?;
    set_pod_status(&e.client, &e.ns, "web-2", true, &[pod_ip(2).as_str()]).await?;
    let s = e
        .wait_slices("web", "three slices", |s| {
            s.len() == 3 && total_endpoints(s) == 3
        })
        .await?;
    let eps = endpoints(&s);
    assert_eq!(eps["web-0"].ports, vec![("http".to_string(), 8080)]);
    assert_eq!(eps["web-1"].ports, vec![("http".to_string(), 9090)]);
    assert!(eps["web-2"].ports.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_than_100_endpoints_are_packed() -> Result<()> {
    let e = env("es-250").await?;
    let c = start_slices(&e.client, &e.ns, EndpointSliceConfig::default());
    e.service("web", basic_spec(serde_json::json!({}))).await?;
    e.pods(250, "web", true).await?;
    let s = e
        .wait_slices("web", "250 endpoints", |s| total_endpoints(s) == 250)
        .await?;
    let mut sizes: Vec<usize> = s
        .iter()
        .map(|s| s.endpoints.as_ref().map_or(0, Vec::len))
        .collect();
    sizes.sort();
    assert_eq!(sizes.iter().sum::<usize>(), 250);
    assert!(sizes.iter().all(|n| *n <= 100), "{sizes:?}");
    assert_eq!(s.len(), 3, "{sizes:?}");
    // One readiness flip rewrites exactly one slice.
    let before: BTreeMap<String, String> = s
        .iter()
        .map(|s| {
            (
                s.metadata.name.clone().unwrap_or_default(),
                s.metadata.resource_version.clone().unwrap_or_default(),
            )
        })
        .collect();
    e.set_ready("web-17", &pod_ip(17), false).await?;
    let after = e
        .wait_slices("web", "web-17 not ready", |s| {
            endpoints(s)
                .get("web-17")
                .is_some_and(|x| x.ready == Some(false))
        })
        .await?;
    let changed = after
        .iter()
        .filter(|s| {
            before.get(s.metadata.name.as_deref().unwrap_or(""))
                != s.metadata.resource_version.as_ref()
        })
        .count();
    assert_eq!(changed, 1);
    let text = c.metrics.encode();
    assert!(
        text.contains("endpoint_slice_controller_changes_total{operation=\"create\"}"),
        "{text}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_than_1000_endpoints_and_legacy_truncation() -> Result<()> {
    let e = env("es-1100").await?;
    let _c = start_slices(
        &e.client,
        &e.ns,
        EndpointSliceConfig {
            max_endpoints_per_slice: 1000,
            ..Default::default()
        },
    );
    let _ep = start_endpoints(&e.client, &e.ns);
    e.service("web", basic_spec(serde_json::json!({}))).await?;
    e.pods(1100, "web", true).await?;
    let s = e
        .wait_slices("web", "1100 endpoints", |s| total_endpoints(s) == 1100)
        .await?;
    assert_eq!(s.len(), 2);
    assert!(
        s.iter()
            .all(|s| s.endpoints.as_ref().map_or(0, Vec::len) <= 1000)
    );
    let api: Api<Endpoints> = Api::namespaced(e.client.clone(), &e.ns);
    let ep = wait_for("truncated Endpoints", WAIT, || {
        let api = api.clone();
        async move {
            let ep = api.get_opt("web").await.ok().flatten()?;
            let n: usize = ep
                .subsets
                .iter()
                .flatten()
                .map(|s| s.addresses.as_ref().map_or(0, Vec::len))
                .sum();
            (n == 1000).then_some(ep)
        }
    })
    .await?;
    assert_eq!(
        ep.metadata
            .annotations
            .unwrap_or_default()
            .get("endpoints.kubernetes.io/over-capacity")
            .map(String::as_str),
        Some("truncated")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dual_stack_services_get_a_slice_per_family() -> Result<()> {
    let cp = ControlPlane::start(ControlPlaneOptions {
        service_cluster_ip_range: "10.96.0.0/16,fd00:10:96::/112".into(),
        ..Default::default()
    })
    .await?;
    let e = env_on(&cp, "es-dual").await?;
    let _c = start_slices(&e.client, &e.ns, EndpointSliceConfig::default());
    e.service("web", basic_spec(serde_json::json!({"ipFamilyPolicy": "RequireDualStack", "ipFamilies": ["IPv4", "IPv6"]})))
        .await?;
    let mut b = PodBuilder::new(&e.ns, "web-0", &[("app", "web")]);
    b.node_name = Some(e.node(0));
    b.ports = vec![(Some("http".into()), 8080, "TCP".into())];
    create_pod(&e.client, &b).await?;
    set_pod_status(&e.client, &e.ns, "web-0", true, &["10.1.0.5", "fd00::5"]).await?;
    let s = e
        .wait_slices("web", "one slice per family", |s| {
            s.len() == 2 && total_endpoints(s) == 2
        })
        .await?;
    let families: BTreeSet<String> = s.iter().map(|s| s.address_type.clone()).collect();
    assert_eq!(
        families,
        ["IPv4".to_string(), "IPv6".to_string()]
            .into_iter()
            .collect()
    );
    for sl in &s {
        let addr = sl
            .endpoints
            .as_ref()
            .and_then(|e| e.first())
            .map(|e| e.addresses[0].clone())
            .unwrap_or_default();
        assert_eq!(
            addr.contains(':'),
            sl.address_type == "IPv6",
            "{addr} in {}",
            sl.address_type
        );
    }
    // Dropping to single-stack removes the IPv6 slice.
    let svcs: Api<Service> = Api::namespaced(e.client.clone(), &e.ns);
    let patch = serde_json::json!({"spec": {"ipFamilyPolicy": "SingleStack", "ipFamilies": ["IPv4"], "clusterIPs": [svcs.get("web").await?.spec.and_then(|s| s.cluster_ip).unwrap_or_default()]}});
    svcs.patch("web", &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    e.wait_slices("web", "IPv4 only", |s| {
        s.len() == 1 && s[0].address_type == "IPv4"
    })
    .await?;
    drop(_c);
    cp.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headless_service_hostnames() -> Result<()> {
    let e = env("es-headless").await?;
    let _c = start_slices(&e.client, &e.ns, EndpointSliceConfig::default());
    e.service("db", serde_json::json!({"clusterIP": "None", "selector": {"app": "db"}, "ports": [{"port": 5432}]}))
        .await?;
    let mut b = PodBuilder::new(&e.ns, "db-0", &[("app", "db")]);
    b.node_name = Some(e.node(0));
    b.hostname = Some("db-0".into());
    b.subdomain = Some("db".into());
    create_pod(&e.client, &b).await?;
    set_pod_status(&e.client, &e.ns, "db-0", true, &["10.2.0.1"]).await?;
    let s = e
        .wait_slices("db", "hostname set", |s| endpoints(s).len() == 1)
        .await?;
    assert_eq!(endpoints(&s)["db-0"].hostname.as_deref(), Some("db-0"));
    let labels = s[0].metadata.labels.clone().unwrap_or_default();
    assert_eq!(
        labels
            .get("service.kubernetes.io/headless")
            .map(String::as_str),
        Some("")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zones_and_traffic_distribution_hints() -> Result<()> {
    let e = env("es-hints").await?;
    let _c = start_slices(&e.client, &e.ns, EndpointSliceConfig::default());
    e.service(
        "web",
        basic_spec(serde_json::json!({"trafficDistribution": "PreferClose"})),
    )
    .await?;
    e.pods(3, "web", true).await?;
    let s = e
        .wait_slices("web", "hints", |s| {
            let eps = endpoints(s);
            eps.len() == 3 && eps["web-0"].hint_zones.is_some()
        })
        .await?;
    let eps = endpoints(&s);
    assert_eq!(eps["web-0"].hint_zones, Some(vec!["zone-a".to_string()]));
    assert_eq!(eps["web-1"].hint_zones, Some(vec!["zone-b".to_string()]));
    assert_eq!(eps["web-2"].hint_zones, None, "no zone, no hint");
    // Removing trafficDistribution removes the hints.
    let svcs: Api<Service> = Api::namespaced(e.client.clone(), &e.ns);
    svcs.patch(
        "web",
        &PatchParams::default(),
        &Patch::Merge(&serde_json::json!({"spec": {"trafficDistribution": null}})),
    )
    .await?;
    e.wait_slices("web", "hints removed", |s| {
        endpoints(s).values().all(|x| x.hint_zones.is_none())
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selector_change_and_service_deletion() -> Result<()> {
    let e = env("es-sel").await?;
    let _c = start_slices(&e.client, &e.ns, EndpointSliceConfig::default());
    e.service("web", basic_spec(serde_json::json!({}))).await?;
    e.pods(2, "web", true).await?;
    e.pods(3, "api", true).await?;
    e.wait_slices("web", "web pods", |s| endpoints(s).len() == 2)
        .await?;
    let svcs: Api<Service> = Api::namespaced(e.client.clone(), &e.ns);
    svcs.patch(
        "web",
        &PatchParams::default(),
        &Patch::Merge(&serde_json::json!({"spec": {"selector": {"app": "api"}}})),
    )
    .await?;
    e.wait_slices("web", "api pods", |s| {
        let eps = endpoints(s);
        eps.len() == 3 && eps.keys().all(|k| k.starts_with("api-"))
    })
    .await?;
    // A pod relabelled into the selector joins.
    let pods: Api<Pod> = Api::namespaced(e.client.clone(), &e.ns);
    pods.patch(
        "web-0",
        &PatchParams::default(),
        &Patch::Merge(&serde_json::json!({"metadata": {"labels": {"app": "api"}}})),
    )
    .await?;
    e.wait_slices("web", "relabelled pod joins", |s| {
        endpoints(s).contains_key("web-0")
    })
    .await?;
    svcs.delete("web", &DeleteParams::default()).await?;
    e.wait_slices("web", "slices removed with the Service", |s| s.is_empty())
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_edits_are_restored_and_foreign_slices_untouched() -> Result<()> {
    let e = env("es-edit").await?;
    let _c = start_slices(&e.client, &e.ns, EndpointSliceConfig::default());
    let svc = e.service("web", basic_spec(serde_json::json!({}))).await?;
    e.pods(2, "web", true).await?;
    // A foreign slice for the same Service, managed by someone else.
    let foreign: EndpointSlice = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web-foreign", "namespace": e.ns, "labels": {LABEL_SERVICE_NAME: "web", LABEL_MANAGED_BY: "someone-else"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.9.9.9"]}],
    }))?;
    let foreign = e
        .slices_api()
        .create(&PostParams::default(), &foreign)
        .await?;
    let s = e
        .wait_slices("web", "two endpoints", |s| endpoints(s).len() == 2)
        .await?;
    let name = s[0].metadata.name.clone().unwrap_or_default();

    // Edit: drop all endpoints by hand. We put them back.
    let patch = serde_json::json!({"endpoints": [{"addresses": ["10.7.7.7"]}]});
    e.slices_api()
        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    e.wait_slices("web", "edit reverted", |s| {
        endpoints(s).len() == 2 && total_endpoints(s) == 2
    })
    .await?;

    // Delete by hand: recreated.
    e.slices_api()
        .delete(&name, &DeleteParams::default())
        .await?;
    e.wait_slices("web", "slice recreated", |s| endpoints(s).len() == 2)
        .await?;

    // Relabelled away from us: that slice becomes foreign, and we make our own again.
    let s = e.slices("web").await?;
    let name = s[0].metadata.name.clone().unwrap_or_default();
    let patch = serde_json::json!({"metadata": {"labels": {LABEL_MANAGED_BY: "hand"}}});
    e.slices_api()
        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    let s = e
        .wait_slices("web", "new slice of ours", |s| endpoints(s).len() == 2)
        .await?;
    assert!(
        s.iter()
            .all(|x| x.metadata.name.as_deref() != Some(name.as_str()))
    );

    // The foreign slices were never touched.
    let f = e.slices_api().get("web-foreign").await?;
    assert_eq!(
        f.metadata.resource_version,
        foreign.metadata.resource_version
    );
    assert!(
        e.slices_api().get_opt(&name).await?.is_some(),
        "relabelled slice left alone"
    );
    let _ = svc;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selector_matching_nothing_gets_placeholder_and_others_converge() -> Result<()> {
    let e = env("es-bad").await?;
    let _c = start_slices(&e.client, &e.ns, EndpointSliceConfig::default());
    e.service("empty", serde_json::json!({"selector": {"app": "nobody"}, "ports": [{"port": 80, "targetPort": "nope"}]}))
        .await?;
    e.service("web", basic_spec(serde_json::json!({}))).await?;
    e.pods(1, "web", true).await?;
    e.wait_slices("empty", "placeholder", |s| {
        s.len() == 1 && total_endpoints(s) == 0
    })
    .await?;
    e.wait_slices("web", "web converges", |s| endpoints(s).len() == 1)
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_from_upstream_without_losing_ready_endpoints() -> Result<()> {
    // Its own control plane: upstream's controller serves every namespace.
    let cp = ControlPlane::start(ControlPlaneOptions::default()).await?;
    let e = env_on(&cp, "es-takeover").await?;
    e.service("web", basic_spec(serde_json::json!({}))).await?;
    e.pods(150, "web", true).await?;
    let mut kcm = test_support::upstream_endpointslice_controller(&cp)?;
    let up = wait_for("upstream slices", Duration::from_secs(120), || {
        let f = e.slices_by("web", UPSTREAM_CONTROLLER_NAME);
        async move { f.await.ok().filter(|s| ready_count(s) == 150) }
    })
    .await?;
    assert_eq!(up.len(), 2);
    kcm.kill().await?;
    let _ = kcm.wait().await;

    // Watch the ready endpoint count over all slices of the Service while we take over.
    let min_seen = Arc::new(AtomicUsize::new(usize::MAX));
    let stop = CancellationToken::new();
    let watcher = {
        let (min_seen, stop, api, ns) =
            (min_seen.clone(), stop.clone(), e.slices_api(), e.ns.clone());
        tokio::spawn(async move {
            let _ = ns;
            while !stop.is_cancelled() {
                if let Ok(l) = api
                    .list(&ListParams::default().labels(&format!("{LABEL_SERVICE_NAME}=web")))
                    .await
                {
                    min_seen.fetch_min(ready_count(&l.items), Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let c = start_slices(
        &e.client,
        &e.ns,
        EndpointSliceConfig {
            takeover: true,
            ..Default::default()
        },
    );
    let ours = e
        .wait_slices("web", "all slices adopted", |s| ready_count(s) == 150)
        .await?;
    wait_for("no upstream slices left", WAIT, || {
        let f = e.slices_by("web", UPSTREAM_CONTROLLER_NAME);
        async move { f.await.ok().filter(|s| s.is_empty()) }
    })
    .await?;
    stop.cancel();
    let _ = watcher.await;
    assert_eq!(
        min_seen.load(Ordering::SeqCst),
        150,
        "ready endpoints dipped during takeover"
    );
    // Adoption relabels in place: the same slice names, no creates.
    let up_names: BTreeSet<_> = up.iter().filter_map(|s| s.metadata.name.clone()).collect();
    let our_names: BTreeSet<_> = ours
        .iter()
        .filter_map(|s| s.metadata.name.clone())
        .collect();
    assert_eq!(up_names, our_names);
    assert!(
        !c.metrics
            .encode()
            .contains("endpoint_slice_controller_changes_total{operation=\"create\"}")
    );
    drop(c);
    cp.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirroring_of_selectorless_services() -> Result<()> {
    let e = env("es-mirror").await?;
    let _m = start_mirroring(&e.client, &e.ns);
    e.service(
        "ext",
        serde_json::json!({"ports": [{"name": "http", "port": 80}]}),
    )
    .await?;
    let api: Api<Endpoints> = Api::namespaced(e.client.clone(), &e.ns);
    let ep: Endpoints = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "ext", "labels": {"team": "a"}},
        "subsets": [{"addresses": [{"ip": "192.0.2.1"}, {"ip": "192.0.2.2"}], "notReadyAddresses": [{"ip": "192.0.2.3"}],
                     "ports": [{"name": "http", "port": 8080}]}],
    }))?;
    api.create(&PostParams::default(), &ep).await?;
    let s = wait_for("mirrored slice", WAIT, || {
        let f = e.slices_by("ext", MIRRORING_CONTROLLER_NAME);
        async move { f.await.ok().filter(|s| total_endpoints(s) == 3) }
    })
    .await?;
    assert_eq!(s.len(), 1);
    assert_eq!(
        s[0].metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("team"))
            .map(String::as_str),
        Some("a")
    );
    let not_ready = s[0]
        .endpoints
        .iter()
        .flatten()
        .filter(|x| x.conditions.as_ref().and_then(|c| c.ready) == Some(false))
        .count();
    assert_eq!(not_ready, 1);
    assert_eq!(s[0].ports.as_ref().and_then(|p| p[0].port), Some(8080));
    // An update to the Endpoints is mirrored.
    let patch = serde_json::json!({"subsets": [{"addresses": [{"ip": "192.0.2.9"}], "ports": [{"name": "http", "port": 8080}]}]});
    api.patch("ext", &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    wait_for("mirrored update", WAIT, || {
        let f = e.slices_by("ext", MIRRORING_CONTROLLER_NAME);
        async move {
            f.await.ok().filter(|s| {
                s.len() == 1
                    && s[0].endpoints.as_ref().is_some_and(|x| {
                        x.len() == 1 && x[0].addresses == vec!["192.0.2.9".to_string()]
                    })
            })
        }
    })
    .await?;
    // skip-mirror removes the mirrored slices.
    let patch = serde_json::json!({"metadata": {"labels": {LABEL_SKIP_MIRROR: "true"}}});
    api.patch("ext", &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    wait_for("mirrored slices removed", WAIT, || {
        let f = e.slices_by("ext", MIRRORING_CONTROLLER_NAME);
        async move { f.await.ok().filter(|s| s.is_empty()) }
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_endpoints_object() -> Result<()> {
    let e = env("es-legacy").await?;
    let _ep = start_endpoints(&e.client, &e.ns);
    e.service("web", basic_spec(serde_json::json!({}))).await?;
    e.pod(0, "web", true, 8080).await?;
    e.pod(1, "web", false, 8080).await?;
    let api: Api<Endpoints> = Api::namespaced(e.client.clone(), &e.ns);
    let ep = wait_for("Endpoints with one ready, one not", WAIT, || {
        let api = api.clone();
        async move {
            let ep = api.get_opt("web").await.ok().flatten()?;
            let subsets = ep.subsets.clone().unwrap_or_default();
            let ready: usize = subsets
                .iter()
                .map(|s| s.addresses.as_ref().map_or(0, Vec::len))
                .sum();
            let nr: usize = subsets
                .iter()
                .map(|s| s.not_ready_addresses.as_ref().map_or(0, Vec::len))
                .sum();
            (ready == 1 && nr == 1).then_some(ep)
        }
    })
    .await?;
    let subsets = ep.subsets.unwrap_or_default();
    assert_eq!(subsets[0].ports.as_ref().map(|p| p[0].port), Some(8080));
    assert_eq!(
        subsets[0].addresses.as_ref().map(|a| a[0].ip.clone()),
        Some(pod_ip(0))
    );
    // Service deleted: Endpoints deleted.
    let svcs: Api<Service> = Api::namespaced(e.client.clone(), &e.ns);
    svcs.delete("web", &DeleteParams::default()).await?;
    wait_for("Endpoints removed", WAIT, || {
        let api = api.clone();
        async move {
            api.get_opt("web")
                .await
                .ok()
                .filter(|x| x.is_none())
                .map(|_| ())
        }
    })
    .await?;
    Ok(())
}
