//! The one test harness of service-controller-manager:
//! - the local control plane (a real etcd and kube-apiserver, `bin/controlplane`) and clients;
//! - fixtures: namespaces, Nodes and Pods whose status is set the way a kubelet would;
//! - the manager binary as a child process ([`Manager`]), or controllers in-process from one
//!   shared context base ([`InProcess`]);
//! - metric scraping ([`metrics`]: the manager's and the API server's `/metrics` as samples);
//! - Event listing ([`events`]); the AWS emulator ([`moto`]); a recording API double that
//!   asserts exact calls (`double`) and a fault-injecting proxy in front of kube-apiserver
//!   (`apiproxy`);
//! - the `make chaos` table's rows ([`chaos`]);
//! - polling with deadlines ([`wait_for`], [`wait_stable`]), never fixed sleeps.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, Namespace, Node, NodeSpec, Pod, PodCondition, PodIP, PodSpec,
    PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use tokio::process::{Child, Command};
use tokio::sync::OnceCell;

pub mod apiproxy;
pub mod chaos;
pub mod double;
pub mod events;
pub mod inprocess;
pub mod invariants;
pub mod manager;
pub mod metrics;
pub mod moto;

pub use inprocess::InProcess;
pub use manager::{Manager, https_get, leader_status, manager_binary, readyz_ok};

/// The repository root (where `bin/` and `target/` live).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."))
}

/// Upstream's kube-controller-manager running only its EndpointSlice controller against `cp`
/// (the reference the differential test, the takeover test and the benchmark compare with);
/// killed when the handle drops.
pub fn upstream_endpointslice_controller(cp: &ControlPlane) -> Result<Child> {
    upstream_controllers(cp, "endpointslice")
}

/// Upstream's kube-controller-manager running only `controllers` (its `--controllers` value,
/// e.g. `endpointslice,endpointslicemirroring`) against `cp`; killed when the handle drops.
pub fn upstream_controllers(cp: &ControlPlane, controllers: &str) -> Result<Child> {
    Command::new(tool("kube-controller-manager")?)
        .arg(format!("--kubeconfig={}", cp.kubeconfig.display()))
        .arg("--leader-elect=false")
        .arg(format!("--controllers={controllers}"))
        .arg("--secure-port=0")
        .arg("--use-service-account-credentials=false")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting kube-controller-manager")
}

/// A tool built by `make tools` into `bin/` (controlplane, kubectl, kube-controller-manager, helm).
pub fn tool(name: &str) -> Result<PathBuf> {
    let p = repo_root().join("bin").join(name);
    if p.exists() {
        Ok(p)
    } else {
        bail!("{} is missing: run `make tools` first", p.display())
    }
}

/// Options for a control plane.
#[derive(Clone, Debug)]
pub struct ControlPlaneOptions {
    /// kube-apiserver `--service-cluster-ip-range`.
    pub service_cluster_ip_range: String,
    /// kube-apiserver `--service-node-port-range`.
    pub service_node_port_range: String,
    /// Extra kube-apiserver flags.
    pub apiserver_args: Vec<String>,
}

impl Default for ControlPlaneOptions {
    fn default() -> Self {
        ControlPlaneOptions {
            service_cluster_ip_range: "10.96.0.0/16".into(),
            service_node_port_range: "30000-32767".into(),
            apiserver_args: vec![],
        }
    }
}

/// A running local control plane; stopped (and its data removed) when dropped or when the
/// test process exits, since it shuts down when its stdin closes.
pub struct ControlPlane {
    /// Admin kubeconfig path.
    pub kubeconfig: PathBuf,
    /// API server URL.
    pub server: String,
    /// Options it was started with.
    pub options: ControlPlaneOptions,
    _dir: tempfile::TempDir,
    child: Mutex<Option<std::process::Child>>,
    _stdin: Mutex<Option<std::process::ChildStdin>>,
}

static SHARED: OnceCell<ControlPlane> = OnceCell::const_new();

impl ControlPlane {
    /// Starts a control plane with `opts` and waits until `/readyz` answers.
    ///
    /// The child is a plain std process writing to files, not tied to the async runtime of the
    /// test that started it: the shared control plane outlives that test, and a Go program whose
    /// stdout or stderr pipe closes dies of SIGPIPE at its next log line.
    pub async fn start(opts: ControlPlaneOptions) -> Result<ControlPlane> {
        let bin = tool("controlplane")?;
        let dir = tempfile::Builder::new().prefix("scm-test-cp-").tempdir()?;
        let kubeconfig = dir.path().join("admin.kubeconfig");
        let out_path = dir.path().join("stdout.log");
        let err_path = dir.path().join("stderr.log");
        let mut cmd = std::process::Command::new(bin);
        cmd.arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .arg("--exit-on-stdin-close")
            .arg(format!(
                "--service-cluster-ip-range={}",
                opts.service_cluster_ip_range
            ))
            .arg(format!(
                "--service-node-port-range={}",
                opts.service_node_port_range
            ));
        for a in &opts.apiserver_args {
            cmd.arg(format!("--apiserver-arg={a}"));
        }
        cmd.stdin(Stdio::piped())
            .stdout(std::fs::File::create(&out_path)?)
            .stderr(std::fs::File::create(&err_path)?);
        let mut child = cmd.spawn().context("starting bin/controlplane")?;
        let stdin = child.stdin.take();
        let deadline = Instant::now() + Duration::from_secs(180);
        let line = loop {
            let out = std::fs::read_to_string(&out_path).unwrap_or_default();
            if let Some(l) = out
                .lines()
                .find_map(|l| l.strip_prefix("controlplane ready: "))
            {
                break l.to_string();
            }
            let exited = child.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() >= deadline {
                let _ = child.kill();
                let err = std::fs::read_to_string(&err_path).unwrap_or_default();
                let tail: Vec<&str> = err.lines().rev().take(40).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                bail!(
                    "control plane did not become ready (exit: {exited:?}); stderr tail:\n{}",
                    tail.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let server = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("server="))
            .unwrap_or_default()
            .to_string();
        Ok(ControlPlane {
            kubeconfig,
            server,
            options: opts,
            _dir: dir,
            child: Mutex::new(Some(child)),
            _stdin: Mutex::new(stdin),
        })
    }

    /// The control plane shared by every test in this test binary (default options).
    pub async fn shared() -> Result<&'static ControlPlane> {
        SHARED
            .get_or_try_init(|| ControlPlane::start(ControlPlaneOptions::default()))
            .await
    }

    /// A client authenticated as the admin (system:masters).
    pub async fn client(&self) -> Result<Client> {
        let cfg = self.config().await?;
        Ok(Client::try_from(cfg)?)
    }

    /// The admin client configuration.
    pub async fn config(&self) -> Result<Config> {
        let kc = Kubeconfig::read_from(&self.kubeconfig)?;
        Ok(Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?)
    }

    /// A client configuration that authenticates with a bearer token (e.g. a ServiceAccount's)
    /// instead of the admin certificate.
    pub async fn token_config(&self, token: &str) -> Result<Config> {
        let mut cfg = self.config().await?;
        cfg.auth_info = kube::config::AuthInfo {
            token: Some(token.to_string().into()),
            ..Default::default()
        };
        Ok(cfg)
    }

    /// Writes a kubeconfig that authenticates with `token`, for running a binary as a
    /// ServiceAccount, and returns its path.
    pub fn write_token_kubeconfig(&self, token: &str, path: &Path) -> Result<PathBuf> {
        let admin = Kubeconfig::read_from(&self.kubeconfig)?;
        let ca = admin
            .clusters
            .first()
            .and_then(|c| c.cluster.as_ref())
            .and_then(|c| c.certificate_authority_data.clone())
            .ok_or_else(|| anyhow!("admin kubeconfig has no CA data"))?;
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster:\n    server: {}\n    certificate-authority-data: {}\nusers:\n- name: token\n  user:\n    token: {}\ncontexts:\n- name: local\n  context:\n    cluster: local\n    user: token\ncurrent-context: local\n",
            self.server, ca, token
        );
        std::fs::write(path, text)?;
        Ok(path.to_path_buf())
    }

    /// Stops the control plane now (it also stops when dropped or when the test process exits).
    pub async fn stop(&self) {
        let child = self.child.lock().unwrap_or_else(|e| e.into_inner()).take();
        // Closing stdin asks for an orderly stop that removes the data directory.
        self._stdin.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(mut c) = child {
            let deadline = Instant::now() + Duration::from_secs(15);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self._stdin.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(mut c) = self.child.lock().unwrap_or_else(|e| e.into_inner()).take() {
            // Give it a moment to clean up after the stdin close, then make sure it is gone.
            for _ in 0..100 {
                if c.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A free loopback address (`127.0.0.1:port`) for a server's `--http-address`.
pub fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr").to_string()
}

/// GETs `url`: its status and body, or `None` while nothing answers (so tests can poll).
pub async fn http_get(url: &str) -> Option<(u16, String)> {
    let r = reqwest::get(url).await.ok()?;
    let code = r.status().as_u16();
    Some((code, r.text().await.ok()?))
}

/// Polls `f` every 100 ms until it returns `Some`, or fails after `timeout` naming `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls `f` every `interval` until it returns the same value `samples` times in a row (a
/// reading that has settled), or fails after `timeout` naming `what` and the last reading.
pub async fn wait_stable<T, F, Fut>(
    what: &str,
    timeout: Duration,
    interval: Duration,
    samples: usize,
    mut f: F,
) -> Result<T>
where
    T: PartialEq + std::fmt::Debug,
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    let (mut last, mut same) = (None::<T>, 0usize);
    loop {
        if let Some(now) = f().await {
            same = if last.as_ref() == Some(&now) {
                same + 1
            } else {
                1
            };
            last = Some(now);
            if same >= samples.max(1) {
                return last.ok_or_else(|| anyhow!("no reading"));
            }
        }
        if Instant::now() >= deadline {
            bail!(
                "timed out after {timeout:?} waiting for {what} to settle; last reading {last:?}"
            );
        }
        tokio::time::sleep(interval).await;
    }
}

/// Creates a namespace with a unique name starting with `prefix` and returns its name.
pub async fn namespace(client: &Client, prefix: &str) -> Result<String> {
    let api: Api<Namespace> = Api::all(client.clone());
    let ns = Namespace {
        metadata: ObjectMeta {
            generate_name: Some(format!("{prefix}-")),
            ..Default::default()
        },
        ..Default::default()
    };
    let created = api.create(&PostParams::default(), &ns).await?;
    created
        .metadata
        .name
        .ok_or_else(|| anyhow!("namespace without name"))
}

/// A Node to create: what a test may set.
#[derive(Clone, Debug, Default)]
pub struct NodeSpecBuilder {
    /// Node name.
    pub name: String,
    /// `topology.kubernetes.io/zone` label.
    pub zone: Option<String>,
    /// `spec.providerID`.
    pub provider_id: Option<String>,
    /// Extra labels.
    pub labels: BTreeMap<String, String>,
}

/// Creates a Node and marks it Ready through the status subresource.
pub async fn create_node(client: &Client, b: NodeSpecBuilder) -> Result<Node> {
    let api: Api<Node> = Api::all(client.clone());
    let mut labels = b.labels.clone();
    labels.insert("kubernetes.io/hostname".into(), b.name.clone());
    if let Some(z) = &b.zone {
        labels.insert("topology.kubernetes.io/zone".into(), z.clone());
    }
    let node = Node {
        metadata: ObjectMeta {
            name: Some(b.name.clone()),
            labels: Some(labels),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            provider_id: b.provider_id.clone(),
            ..Default::default()
        }),
        ..Default::default()
    };
    api.create(&PostParams::default(), &node).await?;
    let status = serde_json::json!({"status": {"conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "test"}]}});
    Ok(api
        .patch_status(&b.name, &PatchParams::default(), &Patch::Merge(&status))
        .await?)
}

/// A Pod to create: what a test may set.
#[derive(Clone, Debug, Default)]
pub struct PodBuilder {
    /// Pod name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Node the pod is bound to.
    pub node_name: Option<String>,
    /// Container ports as (name, port, protocol).
    pub ports: Vec<(Option<String>, i32, String)>,
    /// `spec.hostname`.
    pub hostname: Option<String>,
    /// `spec.subdomain`.
    pub subdomain: Option<String>,
}

impl PodBuilder {
    /// A pod `name` in `namespace` with `labels`.
    pub fn new(namespace: &str, name: &str, labels: &[(&str, &str)]) -> Self {
        PodBuilder {
            name: name.into(),
            namespace: namespace.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    /// The Pod object.
    pub fn build(&self) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                namespace: Some(self.namespace.clone()),
                labels: Some(self.labels.clone()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: self.node_name.clone(),
                hostname: self.hostname.clone(),
                subdomain: self.subdomain.clone(),
                containers: vec![Container {
                    name: "app".into(),
                    image: Some("nginx".into()),
                    ports: if self.ports.is_empty() {
                        None
                    } else {
                        Some(
                            self.ports
                                .iter()
                                .map(|(n, p, proto)| ContainerPort {
                                    name: n.clone(),
                                    container_port: *p,
                                    protocol: Some(proto.clone()),
                                    ..Default::default()
                                })
                                .collect(),
                        )
                    },
                    ..Default::default()
                }],
                termination_grace_period_seconds: Some(30),
                ..Default::default()
            }),
            status: None,
        }
    }
}

/// The field managers in an object's managedFields, in order.
pub fn field_managers(meta: &ObjectMeta) -> Vec<String> {
    meta.managed_fields
        .iter()
        .flatten()
        .filter_map(|m| m.manager.clone())
        .collect()
}

/// Creates a pod.
pub async fn create_pod(client: &Client, b: &PodBuilder) -> Result<Pod> {
    let api: Api<Pod> = Api::namespaced(client.clone(), &b.namespace);
    Ok(api.create(&PostParams::default(), &b.build()).await?)
}

/// Sets a pod's status as a kubelet would: phase Running, the given IPs, and the Ready condition.
pub async fn set_pod_status(
    client: &Client,
    namespace: &str,
    name: &str,
    ready: bool,
    ips: &[&str],
) -> Result<Pod> {
    set_pod_status_at(client, namespace, name, ready, ips, None).await
}

/// [`set_pod_status`] with the Ready condition's `lastTransitionTime` (a kubelet sets it on
/// every flip; the controllers order urgent writes by it).
pub async fn set_pod_status_at(
    client: &Client,
    namespace: &str,
    name: &str,
    ready: bool,
    ips: &[&str],
    transition: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
) -> Result<Pod> {
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let ready_s = if ready { "True" } else { "False" };
    let status = PodStatus {
        phase: Some("Running".into()),
        pod_ip: ips.first().map(|s| s.to_string()),
        pod_ips: Some(ips.iter().map(|ip| PodIP { ip: ip.to_string() }).collect()),
        conditions: Some(vec![
            PodCondition {
                type_: "Ready".into(),
                status: ready_s.into(),
                last_transition_time: transition,
                ..Default::default()
            },
            PodCondition {
                type_: "ContainersReady".into(),
                status: ready_s.into(),
                ..Default::default()
            },
        ]),
        ..Default::default()
    };
    let patch = serde_json::json!({ "status": status });
    Ok(api
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?)
}
