//! Convergence benchmark (not a test; prints a report). On a fresh local control plane it
//! loads 2,000 Services of 5 pods and one Service of 10,000 pods over 50 nodes, then runs,
//! one after the other on the same objects, our EndpointSlice controller (this binary re-run
//! as a child process, client limited to 20 QPS / 30 burst like the manager's defaults) and
//! kube-controller-manager with only its EndpointSlice controller (default QPS), and reports
//! for each: time to converge from a cold start, API writes (and the minimum needed), writes
//! at steady state, p50/p99 latency from a pod readiness change to the slice showing it
//! under 100 changes per second, peak RSS and CPU seconds; then the ratios.
//!
//! Writes are counted as EndpointSlice watch events per managed-by value, so a no-op update
//! (which the API server does not persist) is not counted for either side.
//!
//! Run: `cargo bench -p endpointslice --bench convergence` (needs `make tools` for bin/).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use endpointslice::common::{
    CONTROLLER_NAME, LABEL_MANAGED_BY, LABEL_SERVICE_NAME, UPSTREAM_CONTROLLER_NAME,
};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use scm_runtime::client::{RateLimit, rate_limited_client};
use scm_runtime::{ContextBase, ControllerContext, LeaderGate, Metrics};
use test_support::{
    ControlPlane, ControlPlaneOptions, NodeSpecBuilder, PodBuilder, create_node, create_pod,
    set_pod_status,
};
use tokio_util::sync::CancellationToken;

const NS: &str = "bench";
const SMALL_SERVICES: usize = 2000;
const SMALL_PODS: usize = 5;
const BIG_PODS: usize = 10_000;
const NODES: usize = 50;
const CHANGES_PER_SEC: usize = 100;
const CHANGE_SECONDS: u64 = 10;
const STEADY_SECONDS: u64 = 20;

fn main() -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if let Ok(kc) = std::env::var("SCM_BENCH_CHILD_KUBECONFIG") {
        return rt.block_on(child(kc));
    }
    rt.block_on(bench())
}

/// Child mode: our EndpointSlice controller alone, as the manager would run it.
async fn child(kubeconfig: String) -> Result<()> {
    let kc = kube::config::Kubeconfig::read_from(&kubeconfig)?;
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
    let client = rate_limited_client(
        cfg,
        RateLimit {
            qps: 20.0,
            burst: 30,
        },
    )?;
    let (gate, _tx) = LeaderGate::fixed(true);
    let ctx = ContextBase::new(client, gate).context("endpointslice", "endpointslice-controller");
    endpointslice::run(ctx, endpointslice::EndpointSliceConfig::default()).await?;
    Ok(())
}

fn pod_name(i: usize) -> String {
    if i < SMALL_SERVICES * SMALL_PODS {
        format!("small-{}-{}", i / SMALL_PODS, i % SMALL_PODS)
    } else {
        format!("big-{}", i - SMALL_SERVICES * SMALL_PODS)
    }
}

fn pod_ip(i: usize) -> String {
    format!("10.{}.{}.{}", 64 + i / 65536, (i / 256) % 256, i % 256)
}

fn total_pods() -> usize {
    SMALL_SERVICES * SMALL_PODS + BIG_PODS
}

/// A slice as the bench sees it: (managed-by, service, endpoints as (pod, ready)).
type SliceSeen = (String, String, Vec<(String, bool)>);

/// What the watch on EndpointSlices has seen, per managed-by value.
#[derive(Default)]
struct Tally {
    // slice uid -> what it holds
    slices: HashMap<String, SliceSeen>,
    writes: HashMap<String, usize>,
    pending: HashMap<String, (bool, Instant)>,
    latencies: Vec<Duration>,
    watching_for: String,
}

impl Tally {
    fn converged(&self, managed_by: &str, ready: &HashMap<String, bool>) -> (bool, usize) {
        let mut services = HashSet::new();
        let mut total = 0;
        let mut ok = true;
        for (m, svc, eps) in self.slices.values() {
            if m != managed_by {
                continue;
            }
            services.insert(svc.clone());
            total += eps.len();
            for (pod, r) in eps {
                if ready.get(pod) != Some(r) {
                    ok = false;
                }
            }
        }
        (
            ok && total == total_pods() && services.len() == SMALL_SERVICES + 1,
            total,
        )
    }
}

fn slice_view(s: &EndpointSlice) -> Option<(String, SliceSeen)> {
    let labels = s.metadata.labels.clone().unwrap_or_default();
    let m = labels.get(LABEL_MANAGED_BY)?.clone();
    let svc = labels.get(LABEL_SERVICE_NAME)?.clone();
    let eps = s
        .endpoints
        .iter()
        .flatten()
        .map(|e| {
            (
                e.target_ref
                    .as_ref()
                    .and_then(|r| r.name.clone())
                    .unwrap_or_default(),
                e.conditions.as_ref().and_then(|c| c.ready) == Some(true),
            )
        })
        .collect();
    Some((s.metadata.uid.clone().unwrap_or_default(), (m, svc, eps)))
}

async fn watch_slices(client: Client, tally: Arc<Mutex<Tally>>) {
    let api: Api<EndpointSlice> = Api::namespaced(client, NS);
    let stream = watcher(api, watcher::Config::default()).default_backoff();
    futures::pin_mut!(stream);
    let mut live = false;
    while let Some(ev) = stream.next().await {
        let Ok(ev) = ev else { continue };
        let mut t = tally.lock().unwrap_or_else(|e| e.into_inner());
        match ev {
            watcher::Event::InitDone => live = true,
            watcher::Event::InitApply(s) => {
                if let Some((uid, v)) = slice_view(&s) {
                    t.slices.insert(uid, v);
                }
            }
            watcher::Event::Apply(s) => {
                if let Some((uid, v)) = slice_view(&s) {
                    if live {
                        *t.writes.entry(v.0.clone()).or_default() += 1;
                    }
                    if v.0 == t.watching_for {
                        let now = Instant::now();
                        let mut done = Vec::new();
                        for (pod, r) in &v.2 {
                            if let Some((want, t0)) = t.pending.get(pod)
                                && want == r
                            {
                                done.push((pod.clone(), now - *t0));
                            }
                        }
                        for (p, d) in done {
                            t.pending.remove(&p);
                            t.latencies.push(d);
                        }
                    }
                    t.slices.insert(uid, v);
                }
            }
            watcher::Event::Delete(s) => {
                if let Some((uid, v)) = slice_view(&s) {
                    if live {
                        *t.writes.entry(v.0).or_default() += 1;
                    }
                    t.slices.remove(&uid);
                }
            }
            watcher::Event::Init => {}
        }
    }
}

struct Figures {
    converge: Duration,
    cold_writes: usize,
    steady_writes: usize,
    change_writes: usize,
    changes: usize,
    p50: Duration,
    p99: Duration,
    peak_rss_mb: f64,
    cpu_s: f64,
}

fn proc_usage(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm_kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat (utime, stime) are 12 and 13 after the command name.
    let ticks: f64 = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (hwm_kb / 1024.0, ticks / 100.0)
}

struct Xorshift(u64);
impl Xorshift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

async fn run_side(
    client: &Client,
    tally: &Arc<Mutex<Tally>>,
    ready: &mut HashMap<String, bool>,
    managed_by: &str,
    mut child: tokio::process::Child,
    seed: u64,
) -> Result<Figures> {
    let pid = child.id().context("child pid")?;
    let start = Instant::now();
    {
        let mut t = tally.lock().unwrap_or_else(|e| e.into_inner());
        t.watching_for = managed_by.to_string();
        t.writes.remove(managed_by);
        t.latencies.clear();
        t.pending.clear();
    }
    let writes = |t: &Arc<Mutex<Tally>>| {
        t.lock()
            .unwrap_or_else(|e| e.into_inner())
            .writes
            .get(managed_by)
            .copied()
            .unwrap_or(0)
    };
    loop {
        let (ok, total) = tally
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .converged(managed_by, ready);
        if ok {
            break;
        }
        if start.elapsed() > Duration::from_secs(900) {
            bail!("{managed_by} did not converge in 15 min ({total} endpoints seen)");
        }
        if let Ok(Some(st)) = child.try_wait() {
            bail!("{managed_by} exited early: {st}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let converge = start.elapsed();
    let cold_writes = writes(tally);
    eprintln!("  {managed_by}: converged in {converge:?} with {cold_writes} writes");
    tokio::time::sleep(Duration::from_secs(STEADY_SECONDS)).await;
    let steady_writes = writes(tally) - cold_writes;
    eprintln!("  {managed_by}: {steady_writes} writes in {STEADY_SECONDS} s at steady state");
    // Readiness flips at CHANGES_PER_SEC.
    let mut rng = Xorshift(seed);
    let before = writes(tally);
    let n = CHANGES_PER_SEC * CHANGE_SECONDS as usize;
    let period = Duration::from_secs(1) / CHANGES_PER_SEC as u32;
    let mut tick = tokio::time::interval(period);
    let mut flips = Vec::new();
    for _ in 0..n {
        tick.tick().await;
        // Never flip a pod whose previous flip is not visible yet: flipping it back could
        // cancel a write that was never needed, and no event would ever close the sample.
        let (i, name) = loop {
            let i = (rng.next() % total_pods() as u64) as usize;
            let name = pod_name(i);
            if !tally
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pending
                .contains_key(&name)
            {
                break (i, name);
            }
        };
        let want = !ready.get(&name).copied().unwrap_or(true);
        ready.insert(name.clone(), want);
        tally
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pending
            .insert(name.clone(), (want, Instant::now()));
        let c = client.clone();
        let ip = pod_ip(i);
        flips.push(tokio::spawn(async move {
            set_pod_status(&c, NS, &name, want, &[ip.as_str()])
                .await
                .map(|_| ())
        }));
    }
    for f in flips {
        f.await??;
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let left = tally
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pending
            .len();
        if left == 0 {
            break;
        }
        if Instant::now() > deadline {
            bail!("{managed_by}: {left} readiness changes never showed up");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Let trailing writes land before counting.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let change_writes = writes(tally) - before;
    let mut lat = tally
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .latencies
        .clone();
    lat.sort();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    let (peak_rss_mb, cpu_s) = proc_usage(pid);
    let _ = child.kill().await;
    let _ = child.wait().await;
    Ok(Figures {
        converge,
        cold_writes,
        steady_writes,
        change_writes,
        changes: n,
        p50: pct(0.50),
        p99: pct(0.99),
        peak_rss_mb,
        cpu_s,
    })
}

async fn load(client: &Client) -> Result<HashMap<String, bool>> {
    let nss: Api<Namespace> = Api::all(client.clone());
    nss.create(
        &PostParams::default(),
        &serde_json::from_value(serde_json::json!({"metadata": {"name": NS}}))?,
    )
    .await?;
    for i in 0..NODES {
        let zone = ["zone-a", "zone-b", "zone-c"][i % 3];
        create_node(
            client,
            NodeSpecBuilder {
                name: format!("node-{i}"),
                zone: Some(zone.into()),
                ..Default::default()
            },
        )
        .await?;
    }
    let svcs: Api<Service> = Api::namespaced(client.clone(), NS);
    let mk = |name: String, app: String| -> Result<Service> {
        Ok(serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "spec": {"selector": {"app": app}, "ports": [{"port": 80, "targetPort": 8080}]},
        }))?)
    };
    let mut svc_list: Vec<Service> = (0..SMALL_SERVICES)
        .map(|i| mk(format!("small-{i}"), format!("small-{i}")))
        .collect::<Result<_>>()?;
    svc_list.push(mk("big".into(), "big".into())?);
    let results: Vec<Result<()>> = futures::stream::iter(svc_list)
        .map(|s| {
            let svcs = svcs.clone();
            async move {
                svcs.create(&PostParams::default(), &s)
                    .await
                    .map(|_| ())
                    .map_err(Into::into)
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    results.into_iter().collect::<Result<Vec<_>>>()?;
    let results: Vec<Result<()>> = futures::stream::iter(0..total_pods())
        .map(|i| {
            let client = client.clone();
            async move {
                let name = pod_name(i);
                let app = if i < SMALL_SERVICES * SMALL_PODS {
                    format!("small-{}", i / SMALL_PODS)
                } else {
                    "big".to_string()
                };
                let mut b = PodBuilder::new(NS, &name, &[("app", app.as_str())]);
                b.node_name = Some(format!("node-{}", i % NODES));
                create_pod(&client, &b).await?;
                set_pod_status(&client, NS, &name, true, &[pod_ip(i).as_str()]).await?;
                Ok(())
            }
        })
        .buffer_unordered(48)
        .collect()
        .await;
    results.into_iter().collect::<Result<Vec<_>>>()?;
    Ok((0..total_pods()).map(|i| (pod_name(i), true)).collect())
}

async fn bench() -> Result<()> {
    let t = Instant::now();
    let cp = ControlPlane::start(ControlPlaneOptions::default()).await?;
    let client = cp.client().await?;
    let mut ready = load(&client).await?;
    eprintln!(
        "loaded {} services, {} pods, {NODES} nodes in {:?}",
        SMALL_SERVICES + 1,
        total_pods(),
        t.elapsed()
    );
    let tally = Arc::new(Mutex::new(Tally::default()));
    tokio::spawn(watch_slices(client.clone(), tally.clone()));
    let minimum_cold = SMALL_SERVICES + BIG_PODS.div_ceil(100);

    let ours_child = tokio::process::Command::new(std::env::current_exe()?)
        .env("SCM_BENCH_CHILD_KUBECONFIG", &cp.kubeconfig)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .spawn()?;
    let ours = run_side(
        &client,
        &tally,
        &mut ready,
        CONTROLLER_NAME,
        ours_child,
        0x9E3779B97F4A7C15,
    )
    .await?;
    // Remove our slices so upstream's informers do not cache them too.
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), NS);
    slices
        .delete_collection(
            &DeleteParams::default(),
            &ListParams::default().labels(&format!("{LABEL_MANAGED_BY}={CONTROLLER_NAME}")),
        )
        .await?;

    let kcm = test_support::upstream_endpointslice_controller(&cp)?;
    let up = run_side(
        &client,
        &tally,
        &mut ready,
        UPSTREAM_CONTROLLER_NAME,
        kcm,
        0xD1B54A32D192ED03,
    )
    .await?;
    cp.stop().await;

    let ratio = |a: f64, b: f64| {
        if b > 0.0 {
            format!("{:.2}", a / b)
        } else {
            "-".into()
        }
    };
    println!();
    println!(
        "EndpointSlice controller: {} Services x {SMALL_PODS} pods + 1 x {BIG_PODS} pods, {NODES} nodes",
        SMALL_SERVICES
    );
    println!(
        "{:<44} {:>14} {:>14} {:>8}",
        "figure", "ours", "upstream", "ratio"
    );
    let row =
        |name: &str, a: String, b: String, r: String| println!("{name:<44} {a:>14} {b:>14} {r:>8}");
    row(
        "cold start: time to converge (s)",
        format!("{:.1}", ours.converge.as_secs_f64()),
        format!("{:.1}", up.converge.as_secs_f64()),
        ratio(ours.converge.as_secs_f64(), up.converge.as_secs_f64()),
    );
    row(
        &format!("cold start: writes (minimum {minimum_cold})"),
        ours.cold_writes.to_string(),
        up.cold_writes.to_string(),
        ratio(ours.cold_writes as f64, up.cold_writes as f64),
    );
    row(
        &format!("steady state: writes in {STEADY_SECONDS} s"),
        ours.steady_writes.to_string(),
        up.steady_writes.to_string(),
        "-".into(),
    );
    row(
        &format!("{} readiness flips: writes", ours.changes),
        ours.change_writes.to_string(),
        up.change_writes.to_string(),
        ratio(ours.change_writes as f64, up.change_writes as f64),
    );
    row(
        "flip -> slice latency p50 (ms)",
        format!("{:.0}", ours.p50.as_secs_f64() * 1e3),
        format!("{:.0}", up.p50.as_secs_f64() * 1e3),
        ratio(ours.p50.as_secs_f64(), up.p50.as_secs_f64()),
    );
    row(
        "flip -> slice latency p99 (ms)",
        format!("{:.0}", ours.p99.as_secs_f64() * 1e3),
        format!("{:.0}", up.p99.as_secs_f64() * 1e3),
        ratio(ours.p99.as_secs_f64(), up.p99.as_secs_f64()),
    );
    row(
        "peak RSS (MiB)",
        format!("{:.0}", ours.peak_rss_mb),
        format!("{:.0}", up.peak_rss_mb),
        ratio(ours.peak_rss_mb, up.peak_rss_mb),
    );
    row(
        "CPU (s)",
        format!("{:.1}", ours.cpu_s),
        format!("{:.1}", up.cpu_s),
        ratio(ours.cpu_s, up.cpu_s),
    );
    println!(
        "(writes counted from the EndpointSlice watch; total run {:?})",
        t.elapsed()
    );
    Ok(())
}
