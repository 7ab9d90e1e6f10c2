//! The shell against the recording API double and a fake provider: the exact Kubernetes API
//! calls (and where the provider calls fall between them) for the finalizer → ensure → status
//! order, the 409 → re-read → recompute loop of both writes, cleanup, and the throttle hint.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use k8s_openapi::api::core::v1::{
    LoadBalancerIngress, LoadBalancerStatus, NodeSpec, ServicePort, ServiceSpec, ServiceStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use scm_runtime::{Change, ContextBase, LeaderGate};
use serde_json::json;

use super::fake_api::{Before, FakeApi, Log, record};
use super::*;
use crate::core::LB_FINALIZER;
use crate::provider::ProviderError;

const CLASS: &str = "example.com/lb";
const T: Duration = Duration::from_secs(20);

/// A provider that logs its calls into the shared log and answers `ensure` from a script
/// (then with one fixed address).
struct FakeProvider {
    log: Log,
    ensures: Mutex<VecDeque<Result<LoadBalancerStatus, ProviderError>>>,
    deletes: Mutex<VecDeque<Result<(), ProviderError>>>,
    ensure_times: Mutex<Vec<Instant>>,
    /// The load balancer was deleted out of band: `get` finds nothing until the next ensure.
    gone: std::sync::atomic::AtomicBool,
}

fn published() -> LoadBalancerStatus {
    LoadBalancerStatus {
        ingress: Some(vec![LoadBalancerIngress {
            ip: Some("192.0.2.10".into()),
            ..Default::default()
        }]),
    }
}

impl FakeProvider {
    fn new(log: &Log, script: Vec<Result<LoadBalancerStatus, ProviderError>>) -> Arc<Self> {
        Arc::new(FakeProvider {
            log: log.clone(),
            ensures: Mutex::new(script.into()),
            deletes: Mutex::new(VecDeque::new()),
            ensure_times: Mutex::new(Vec::new()),
            gone: Default::default(),
        })
    }

    fn note(&self, call: &str, svc: &Service, nodes: Option<&[Node]>) {
        let mut line = format!("provider: {call} {}", ObjectKey::of(svc));
        if let Some(nodes) = nodes {
            let names: Vec<&str> = nodes
                .iter()
                .filter_map(|n| n.metadata.name.as_deref())
                .collect();
            line.push_str(&format!(" {names:?}"));
        }
        record(&self.log, line);
    }
}

#[async_trait]
impl LoadBalancerProvider for FakeProvider {
    fn provider_name(&self) -> &'static str {
        "fake"
    }
    fn load_balancer_name(&self, _: &str, svc: &Service) -> String {
        ObjectKey::of(svc).to_string()
    }
    async fn get(
        &self,
        _: &str,
        svc: &Service,
    ) -> Result<Option<LoadBalancerStatus>, ProviderError> {
        self.note("get", svc, None);
        let gone = self.gone.load(std::sync::atomic::Ordering::SeqCst);
        Ok((!gone).then(published))
    }
    async fn ensure(
        &self,
        _: &str,
        svc: &Service,
        nodes: &[Node],
    ) -> Result<LoadBalancerStatus, ProviderError> {
        self.note("ensure", svc, Some(nodes));
        self.gone.store(false, std::sync::atomic::Ordering::SeqCst);
        self.ensure_times
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Instant::now());
        let next = self
            .ensures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front();
        next.unwrap_or_else(|| Ok(published()))
    }
    async fn update_hosts(
        &self,
        _: &str,
        svc: &Service,
        nodes: &[Node],
    ) -> Result<(), ProviderError> {
        self.note("update_hosts", svc, Some(nodes));
        Ok(())
    }
    async fn ensure_deleted(&self, _: &str, svc: &Service) -> Result<(), ProviderError> {
        self.note("ensure_deleted", svc, None);
        let next = self
            .deletes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front();
        next.unwrap_or(Ok(()))
    }
    async fn restore(&self, _: &str, services: &[Service]) -> Result<(), ProviderError> {
        record(&self.log, format!("provider: restore {}", services.len()));
        Ok(())
    }
}

fn service(finalizers: &[&str], deleting: bool, ip: Option<&str>) -> Service {
    Service {
        metadata: ObjectMeta {
            namespace: Some("ns".into()),
            name: Some("web".into()),
            uid: Some("uid-web".into()),
            finalizers: (!finalizers.is_empty())
                .then(|| finalizers.iter().map(|f| f.to_string()).collect()),
            deletion_timestamp: deleting.then(|| Time(Default::default())),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("LoadBalancer".into()),
            load_balancer_class: Some(CLASS.into()),
            ports: Some(vec![ServicePort {
                port: 80,
                node_port: Some(30080),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: ip.map(|ip| ServiceStatus {
            load_balancer: Some(LoadBalancerStatus {
                ingress: Some(vec![LoadBalancerIngress {
                    ip: Some(ip.into()),
                    ..Default::default()
                }]),
            }),
            ..Default::default()
        }),
    }
}

fn node(name: &str) -> Arc<Node> {
    Arc::new(Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            provider_id: Some(format!("fake://{name}")),
            ..Default::default()
        }),
        status: None,
    })
}

/// The shell running against `api` with `cached` in its Service informer and node `a`.
struct Running {
    log: Log,
    base: ContextBase,
    services: Informer<Service>,
    _leader: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), Error>>,
}

impl Running {
    async fn start(api: &FakeApi, log: &Log, cached: Service, provider: Arc<FakeProvider>) -> Self {
        Self::start_every(api, log, cached, provider, crate::NODE_SYNC_PERIOD).await
    }

    /// [`Running::start`] with the periodic pass every `resync`.
    async fn start_every(
        api: &FakeApi,
        log: &Log,
        cached: Service,
        provider: Arc<FakeProvider>,
        resync: Duration,
    ) -> Self {
        let (gate, leader) = LeaderGate::fixed(true);
        let base = ContextBase::new(api.client(), gate);
        let ctx = base.context("cloud-lb", "service-controller");
        let services = Informer::<Service>::detached("Service", scm_runtime::informer::key_of);
        let nodes = Informer::<Node>::detached("Node", scm_runtime::informer::key_of);
        api.feed(services.clone());
        nodes.deliver(Change::Relisted(vec![node("a")]));
        services.deliver(Change::Relisted(vec![Arc::new(cached)]));
        let config = CloudLbConfig {
            cluster_name: "c".into(),
            load_balancer_class: Some(CLASS.into()),
            default_load_balancer: false,
            ..CloudLbConfig::default()
        };
        let periods = Periods { resync };
        let task = tokio::spawn(run(ctx, config, provider, services.clone(), nodes, periods));
        Running {
            log: log.clone(),
            base,
            services,
            // A dropped sender would read as "elector gone".
            _leader: leader,
            task,
        }
    }

    fn log(&self) -> Vec<String> {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits until the log holds a line starting with `prefix`; the log then.
    async fn wait_for(&self, prefix: &str) -> Vec<String> {
        let deadline = Instant::now() + T;
        loop {
            let log = self.log();
            if log.iter().any(|l| l.starts_with(prefix)) {
                return log;
            }
            assert!(Instant::now() < deadline, "no {prefix:?} in {log:#?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until the first node-sync pass has reconciled every Service it queued, so every
    /// call it would make is in the log.
    async fn wait_node_pass(&self) {
        let deadline = Instant::now() + T;
        let name = "service_controller_nodesync_latency_seconds_count";
        loop {
            let text = self.base.metrics.encode();
            let done = text
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().last()?.parse::<u64>().ok())
                .unwrap_or(0);
            if done >= 1 {
                return;
            }
            assert!(Instant::now() < deadline, "no node-sync pass finished");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn stop(self) {
        self.base.shutdown.cancel();
        self.task.abort();
    }
}

fn lines(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn finalizer_then_ensure_then_status() {
    let log = Log::default();
    let svc = service(&[], false, None);
    let api = FakeApi::start(&svc, 1, log.clone()).await;
    let mut cached = svc.clone();
    cached.metadata.resource_version = Some("1".into());
    let provider = FakeProvider::new(&log, vec![]);
    let r = Running::start(&api, &log, cached, provider).await;
    let got = r.wait_for("api: APPLY services/web/status").await;
    let want = lines(&[
        "provider: restore 1",
        "api: event EnsuringLoadBalancer",
        "api: PATCH services/web rv=1 -> 200",
        "provider: ensure ns/web [\"a\"]",
        "api: event EnsuredLoadBalancer",
        "api: PATCH services/web/status rv=2 -> 200",
        // LoadBalancerReady=True, on the copy the status write returned.
        "api: APPLY services/web/status rv=3 -> 200",
    ]);
    assert_eq!(got, want);
    // The node-sync pass that the first node list started finds everything in sync: no call.
    r.wait_node_pass().await;
    assert_eq!(r.log(), want);
    let now = api.service();
    assert_eq!(
        now.metadata.finalizers,
        Some(vec![LB_FINALIZER.to_string()])
    );
    assert!(!core::status_differs(&now, &published()));
    r.stop();
}

#[tokio::test]
async fn a_relist_without_a_remembered_service_deletes_its_load_balancer() {
    let log = Log::default();
    let svc = service(&[], false, None);
    let api = FakeApi::start(&svc, 1, log.clone()).await;
    let mut cached = svc.clone();
    cached.metadata.resource_version = Some("1".into());
    let provider = FakeProvider::new(&log, vec![]);
    let r = Running::start(&api, &log, cached, provider).await;
    let before = r.wait_for("api: APPLY services/web/status").await;
    // The watch was down while someone removed our finalizer and deleted the Service; the
    // new list no longer has it.
    r.services.deliver(Change::Relisted(vec![]));
    let got = r.wait_for("provider: ensure_deleted").await;
    assert_eq!(got[..before.len()], before[..]);
    assert_eq!(
        got[before.len()..],
        lines(&["provider: ensure_deleted ns/web"])[..]
    );
    r.stop();
}

#[tokio::test]
async fn a_failed_delete_of_a_vanished_service_is_retried() {
    let log = Log::default();
    let svc = service(&[], false, None);
    let api = FakeApi::start(&svc, 1, log.clone()).await;
    let mut cached = svc.clone();
    cached.metadata.resource_version = Some("1".into());
    let provider = FakeProvider::new(&log, vec![]);
    provider
        .deletes
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push_back(Err(ProviderError::retryable("cloud unavailable")));
    let r = Running::start(&api, &log, cached, provider).await;
    r.wait_for("api: APPLY services/web/status").await;
    r.services.deliver(Change::Relisted(vec![]));
    // The first delete fails; the retry (after the backoff) must still know what to delete.
    let deadline = Instant::now() + T;
    loop {
        let log = r.log();
        let deletes = log
            .iter()
            .filter(|l| l.starts_with("provider: ensure_deleted ns/web"))
            .count();
        if deletes == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "not retried: {log:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    r.stop();
}

#[tokio::test]
async fn conflicts_re_read_and_recompute_both_writes() {
    let log = Log::default();
    // Someone added their own finalizer after our cache saw the Service (cache at 4, API at 5).
    let svc = service(&["example.com/theirs"], false, None);
    let api = FakeApi::start(&svc, 5, log.clone()).await;
    let mut cached = service(&[], false, None);
    cached.metadata.resource_version = Some("4".into());
    // And someone labels it between our finalizer write and our status write.
    api.edit_before(
        Before::StatusPatch,
        json!({"metadata": {"labels": {"team": "blue"}}}),
    );
    let provider = FakeProvider::new(&log, vec![]);
    let r = Running::start(&api, &log, cached, provider).await;
    let got = r
        .wait_for("api: APPLY services/web/status rv=8 -> 200")
        .await;
    let want = lines(&[
        "provider: restore 1",
        "api: event EnsuringLoadBalancer",
        "api: PATCH services/web rv=4 -> 409",
        "api: GET services/web",
        "api: PATCH services/web rv=5 -> 200",
        "provider: ensure ns/web [\"a\"]",
        "api: event EnsuredLoadBalancer",
        "api: PATCH services/web/status rv=6 -> 409",
        "api: GET services/web",
        "api: PATCH services/web/status rv=7 -> 200",
        "api: APPLY services/web/status rv=8 -> 200",
    ]);
    assert_eq!(got, want);
    r.wait_node_pass().await;
    assert_eq!(r.log(), want);
    // The recomputed writes kept what the others wrote.
    let now = api.service();
    assert_eq!(
        now.metadata.finalizers,
        Some(vec![
            "example.com/theirs".to_string(),
            LB_FINALIZER.to_string()
        ])
    );
    assert_eq!(
        now.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("team").cloned()),
        Some("blue".into())
    );
    assert!(!core::status_differs(&now, &published()));
    r.stop();
}

#[tokio::test]
async fn cleanup_deletes_then_clears_status_then_drops_the_finalizer() {
    let log = Log::default();
    let svc = service(
        &[LB_FINALIZER, "example.com/theirs"],
        true,
        Some("192.0.2.10"),
    );
    let api = FakeApi::start(&svc, 3, log.clone()).await;
    let mut cached = svc.clone();
    cached.metadata.resource_version = Some("3".into());
    let provider = FakeProvider::new(&log, vec![]);
    let r = Running::start(&api, &log, cached, provider).await;
    let got = r.wait_for("api: event DeletedLoadBalancer").await;
    assert_eq!(
        got,
        lines(&[
            "provider: restore 1",
            "provider: get ns/web",
            "api: event DeletingLoadBalancer",
            "provider: ensure_deleted ns/web",
            "api: PATCH services/web/status rv=3 -> 200",
            "api: PATCH services/web rv=4 -> 200",
            "api: event DeletedLoadBalancer",
        ])
    );
    let now = api.service();
    assert_eq!(
        now.metadata.finalizers,
        Some(vec!["example.com/theirs".to_string()])
    );
    assert!(!core::status_differs(&now, &LoadBalancerStatus::default()));
    r.stop();
}

#[tokio::test]
async fn a_throttle_hint_holds_the_retry_back() {
    // Longer than the first backoff delay (5 s), so only the hint can explain the wait.
    let hint = Duration::from_secs(7);
    assert!(hint > core::MIN_RETRY_DELAY);
    let log = Log::default();
    let svc = service(&[], false, None);
    let api = FakeApi::start(&svc, 1, log.clone()).await;
    let mut cached = svc.clone();
    cached.metadata.resource_version = Some("1".into());
    let throttled = ProviderError::Throttled {
        message: "Rate exceeded".into(),
        code: Some("Throttling".into()),
        retry_after: Some(hint),
        source: None,
    };
    let provider = FakeProvider::new(&log, vec![Err(throttled)]);
    let r = Running::start(&api, &log, cached, provider.clone()).await;
    r.wait_for("api: event SyncLoadBalancerFailed").await;
    let deadline = Duration::from_secs(30);
    let log = {
        let start = Instant::now();
        loop {
            let log = r.log();
            if log
                .iter()
                .any(|l| l.starts_with("api: PATCH services/web/status"))
            {
                break log;
            }
            assert!(start.elapsed() < deadline, "never retried: {log:#?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let times = provider
        .ensure_times
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    assert_eq!(times.len(), 2, "{log:#?}");
    let gap = times[1] - times[0];
    assert!(
        gap >= hint,
        "retried after {gap:?}, before the hint of {hint:?}"
    );
    r.stop();
}

/// Issue 12 defect 4, the exact calls: the periodic pass asks the provider whether the load
/// balancer exists (and writes nothing while it does); once it is gone, a Normal Event says so
/// and the ensure recreates it.
#[tokio::test]
async fn the_periodic_pass_recreates_a_load_balancer_deleted_out_of_band() {
    let log = Log::default();
    let svc = service(&[], false, None);
    let api = FakeApi::start(&svc, 1, log.clone()).await;
    let mut cached = svc.clone();
    cached.metadata.resource_version = Some("1".into());
    let provider = FakeProvider::new(&log, vec![]);
    let r = Running::start_every(
        &api,
        &log,
        cached,
        provider.clone(),
        Duration::from_millis(200),
    )
    .await;
    let first = r.wait_for("api: APPLY services/web/status").await;
    // A few passes with the load balancer in place: one `get` each, nothing else.
    let deadline = Instant::now() + T;
    while r.log().len() < first.len() + 2 {
        assert!(
            Instant::now() < deadline,
            "no periodic check in {:#?}",
            r.log()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    provider
        .gone
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let deadline = Instant::now() + T;
    let got = loop {
        let log = r.log();
        if let Some(i) = log
            .iter()
            .position(|l| l == "api: event RecreatingLoadBalancer")
            && log.len() >= i + 4
        {
            break (log, i);
        }
        assert!(Instant::now() < deadline, "no recreate in {:#?}", r.log());
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let (log, i) = got;
    assert_eq!(log[..first.len()], first[..]);
    assert!(
        log[first.len()..i]
            .iter()
            .all(|l| l == "provider: get ns/web"),
        "only existence checks before the deletion: {log:#?}"
    );
    assert_eq!(
        log[i - 1..i + 4],
        lines(&[
            "provider: get ns/web",
            "api: event RecreatingLoadBalancer",
            "api: event EnsuringLoadBalancer",
            "provider: ensure ns/web [\"a\"]",
            "api: event EnsuredLoadBalancer",
        ])[..],
        "{log:#?}"
    );
    r.stop();
}
