//! What every cloud-lb integration test uses: the serial lock, a controller in this process,
//! fixtures and polling helpers against the real local control plane.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use cloud_lb::local::{LocalCloudConfig, LocalProvider};
use cloud_lb::{
    CloudLbConfig, LoadBalancerProvider, NODE_SYNC_PERIOD, ProviderKind, run_with_provider_every,
};
use k8s_openapi::api::core::v1::{Node, Service, ServicePort, ServiceSpec};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use scm_runtime::{ContextBase, LeaderGate, Metrics};
use test_support::{ControlPlane, NodeSpecBuilder, create_node, namespace, wait_for, wait_stable};
use tokio_util::sync::CancellationToken;

pub static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
pub const T: Duration = Duration::from_secs(60);
pub const FINALIZER: &str = "service.kubernetes.io/load-balancer-cleanup";

/// A controller running in this process (a crash is `abort`).
pub struct Ctrl {
    token: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
    metrics: Metrics,
    leader: tokio::sync::watch::Sender<bool>,
}

impl Ctrl {
    pub fn start(
        client: &kube::Client,
        config: CloudLbConfig,
        provider: Arc<dyn LoadBalancerProvider>,
    ) -> Ctrl {
        Self::start_as(client, config, provider, true)
    }

    /// Starts leading or following; `set_leading` flips it later.
    pub fn start_as(
        client: &kube::Client,
        config: CloudLbConfig,
        provider: Arc<dyn LoadBalancerProvider>,
        leading: bool,
    ) -> Ctrl {
        Self::start_with(client, config, provider, leading, NODE_SYNC_PERIOD)
    }

    /// Starts leading, with the periodic pass (host comparison and existence check) every
    /// `resync`.
    pub fn start_every(
        client: &kube::Client,
        config: CloudLbConfig,
        provider: Arc<dyn LoadBalancerProvider>,
        resync: Duration,
    ) -> Ctrl {
        Self::start_with(client, config, provider, true, resync)
    }

    fn start_with(
        client: &kube::Client,
        config: CloudLbConfig,
        provider: Arc<dyn LoadBalancerProvider>,
        leading: bool,
        resync: Duration,
    ) -> Ctrl {
        // Logs with RUST_LOG=cloud_lb=debug (and --nocapture).
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let (leader, tx) = LeaderGate::fixed(leading);
        let base = ContextBase::new(client.clone(), leader);
        let (token, metrics) = (base.shutdown.clone(), base.metrics.clone());
        let ctx = base.context("cloud-lb", "service-controller");
        let task = tokio::spawn(async move {
            if let Err(e) = run_with_provider_every(ctx, config, provider, resync).await {
                eprintln!("controller stopped: {e}");
            }
        });
        Ctrl {
            token,
            task: Some(task),
            metrics,
            leader: tx,
        }
    }

    pub fn set_leading(&self, leading: bool) {
        let _ = self.leader.send(leading);
    }

    /// Reconciles completed so far.
    pub fn reconciles_done(&self) -> u64 {
        self.count("service_controller_manager_reconcile_duration_seconds_count")
    }

    /// Waits until nothing is queued or being reconciled, the same for 1 s: see
    /// [`wait_idle`].
    pub async fn wait_idle(&self) -> Result<()> {
        wait_idle(&self.metrics, "cloud-lb").await
    }

    /// Inventory sweeps completed so far (one runs at the start of each term).
    pub fn inventory_sweeps(&self) -> u64 {
        self.count("service_controller_cloud_inventory_sweeps_total")
    }

    /// The value of a metric line starting with `name` (0 when absent).
    pub fn count(&self, name: &str) -> u64 {
        Self::count_in(&self.metrics, name)
    }

    /// The controller's metrics, for reading them from another task.
    pub fn metrics(&self) -> Metrics {
        self.metrics.clone()
    }

    /// The value of a line of `metrics` starting with `name` (0 when absent).
    pub fn count_in(metrics: &Metrics, name: &str) -> u64 {
        metrics
            .encode()
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().last()?.parse().ok())
            .unwrap_or(0)
    }

    pub async fn stop(mut self) {
        self.token.cancel();
        if let Some(mut t) = self.task.take() {
            // A controller that has not stopped in time must not go on into the next step or
            // test (dropping a JoinHandle detaches the task; it does not end it).
            if tokio::time::timeout(Duration::from_secs(10), &mut t)
                .await
                .is_err()
            {
                t.abort();
                let _ = t.await;
            }
        }
    }

    pub fn crash(mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

impl Drop for Ctrl {
    // A failing test must not leave its controller running into the next one.
    fn drop(&mut self) {
        self.token.cancel();
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// Waits until `controller` (its metrics in `metrics`) has nothing queued and every key it
/// took up has finished, the same for 1 s (five readings 250 ms apart: a node-sync pass queues
/// its Services 500 ms after a node event). What a count reset or a "nothing (more) happened"
/// check needs first: a reconcile still running from an earlier step would otherwise land in
/// the window, or the check would be read before a queued Service had its turn. (A backoff
/// retry that is not due yet is not seen.)
pub async fn wait_idle(metrics: &Metrics, controller: &str) -> Result<()> {
    let line = |prefix: String| Ctrl::count_in(metrics, &prefix);
    wait_stable(
        &format!("{controller} idle"),
        T,
        Duration::from_millis(250),
        5,
        || async {
            let depth = line(format!("workqueue_depth{{name=\"{controller}\"}}"));
            let taken = line(format!("workqueue_adds_total{{name=\"{controller}\"}}"));
            let done = line(format!(
                "service_controller_manager_reconcile_duration_seconds_count{{controller=\"{controller}\"}}"
            ));
            // taken > 0: every caller waits after some work, and a misspelt metric (read as
            // 0) must not pass for idle.
            (depth == 0 && taken > 0 && taken == done).then_some(done)
        },
    )
    .await
    .map(|_| ())
}

/// A local provider with one pool.
pub fn local_pool(cidr: &str) -> Arc<dyn LoadBalancerProvider> {
    Arc::new(
        LocalProvider::new(LocalCloudConfig {
            pools: vec![cidr.parse().expect("cidr")],
            ip_mode: None,
        })
        .expect("valid pools"),
    )
}

/// The controller's configuration for the local provider, serving only `class`.
pub fn local_config(cluster: &str, class: &str) -> CloudLbConfig {
    CloudLbConfig {
        cloud_provider: ProviderKind::Local,
        cloud_config: None,
        cluster_name: cluster.into(),
        concurrent_service_syncs: 2,
        load_balancer_class: Some(class.into()),
        default_load_balancer: false,
        ..CloudLbConfig::default()
    }
}

pub async fn setup() -> Result<(kube::Client, String)> {
    let cp = ControlPlane::shared().await?;
    let client = cp.client().await?;
    // Start from no nodes: they are cluster-wide and would be targets of every test.
    let nodes: Api<Node> = Api::all(client.clone());
    for n in nodes.list(&ListParams::default()).await?.items {
        if let Some(name) = n.metadata.name {
            let _ = nodes.delete(&name, &DeleteParams::default()).await;
        }
    }
    wait_for("nodes gone", T, || {
        let nodes = nodes.clone();
        async move {
            nodes
                .list(&ListParams::default())
                .await
                .ok()
                .filter(|l| l.items.is_empty())
        }
    })
    .await?;
    let ns = namespace(&client, "cloudlb").await?;
    Ok((client, ns))
}

pub fn instance(name: &str) -> String {
    let hex: String = name.bytes().map(|b| format!("{b:02x}")).collect();
    format!("i-{hex}")
}

pub async fn node(client: &kube::Client, name: &str) -> Result<Node> {
    node_on(client, name, &instance(name)).await
}

/// A Node whose providerID names EC2 instance `id`.
pub async fn node_on(client: &kube::Client, name: &str, id: &str) -> Result<Node> {
    create_node(
        client,
        NodeSpecBuilder {
            name: name.into(),
            zone: Some("us-east-1a".into()),
            provider_id: Some(format!("aws:///us-east-1a/{id}")),
            ..Default::default()
        },
    )
    .await
}

pub fn lb_service(
    ns: &str,
    name: &str,
    class: Option<&str>,
    ports: &[(&str, i32, &str, Option<i32>)],
) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(ns.into()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("LoadBalancer".into()),
            load_balancer_class: class.map(str::to_string),
            selector: Some([("app".to_string(), name.to_string())].into()),
            ports: Some(
                ports
                    .iter()
                    .map(|(n, p, proto, np)| ServicePort {
                        name: Some(n.to_string()),
                        port: *p,
                        protocol: Some(proto.to_string()),
                        node_port: *np,
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }),
        status: None,
    }
}

pub async fn create(client: &kube::Client, svc: &Service) -> Result<Service> {
    let api: Api<Service> = Api::namespaced(
        client.clone(),
        svc.metadata.namespace.as_deref().unwrap_or("default"),
    );
    Ok(api.create(&PostParams::default(), svc).await?)
}

pub async fn get(client: &kube::Client, ns: &str, name: &str) -> Option<Service> {
    Api::<Service>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .ok()
        .flatten()
}

pub fn hostname(s: &Service) -> Option<String> {
    s.status
        .as_ref()?
        .load_balancer
        .as_ref()?
        .ingress
        .as_ref()?
        .first()?
        .hostname
        .clone()
}

pub fn ips(s: &Service) -> Vec<String> {
    s.status
        .as_ref()
        .and_then(|st| st.load_balancer.as_ref())
        .and_then(|l| l.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.clone())
        .collect()
}

pub fn has_finalizer(s: &Service) -> bool {
    s.metadata
        .finalizers
        .iter()
        .flatten()
        .any(|f| f == FINALIZER)
}

pub async fn wait_status(client: &kube::Client, ns: &str, name: &str) -> Result<Service> {
    wait_for(&format!("{ns}/{name} load balancer status"), T, || async {
        get(client, ns, name)
            .await
            .filter(|s| hostname(s).is_some() || !ips(s).is_empty())
    })
    .await
}

pub async fn events(client: &kube::Client, ns: &str, name: &str, reason: &str) -> Vec<String> {
    let api: Api<Event> = Api::namespaced(client.clone(), ns);
    api.list(&ListParams::default())
        .await
        .map(|l| {
            l.items
                .into_iter()
                .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
                .filter(|e| e.reason.as_deref() == Some(reason))
                .map(|e| e.note.unwrap_or_default())
                .collect()
        })
        .unwrap_or_default()
}

pub async fn wait_event(
    client: &kube::Client,
    ns: &str,
    name: &str,
    reason: &str,
    contains: &str,
) -> Result<String> {
    wait_for(
        &format!("{reason} event on {ns}/{name} containing {contains:?}"),
        T,
        || async {
            events(client, ns, name, reason)
                .await
                .into_iter()
                .find(|n| n.contains(contains))
        },
    )
    .await
}

pub async fn patch(
    client: &kube::Client,
    ns: &str,
    name: &str,
    p: serde_json::Value,
) -> Result<Service> {
    let api: Api<Service> = Api::namespaced(client.clone(), ns);
    Ok(api
        .patch(name, &PatchParams::default(), &Patch::Merge(&p))
        .await?)
}

pub fn node_port(s: &Service, port: i32) -> i32 {
    s.spec
        .as_ref()
        .and_then(|sp| sp.ports.as_ref())
        .and_then(|ps| ps.iter().find(|p| p.port == port))
        .and_then(|p| p.node_port)
        .unwrap_or(0)
}
