//! Convergence benchmark (not a test; prints a report). On a fresh local control plane it
//! loads Nodes, Services and Ready pods, then runs, one after the other on the same objects,
//! our EndpointSlice controller (this binary re-run as a child process, so built with the same
//! profile: `cargo bench` builds it in release; client limited to 20 QPS / 30 burst like the
//! manager's defaults) and kube-controller-manager with only its EndpointSlice controller
//! (an optimised Go build, default QPS 20 / burst 30).
//!
//! Modes (`SCM_BENCH_MODE`):
//! - `default`: 2,000 Services of 5 pods and one of 10,000 over 50 Nodes. For each side: time
//!   to converge from a cold start, API writes (and the minimum needed), writes at steady
//!   state, p50/p99 latency from a pod readiness change to the slice showing it under 100
//!   changes per second, peak RSS and CPU seconds; then the ratios.
//! - `envelope`: the Kubernetes scalability envelope, 5,000 Nodes, 150,000 Pods and 10,000
//!   Services (9,990 of 12 pods, 10 of 3,012). For each side: cold start (time, writes, peak
//!   RSS, CPU), then a restart once converged: writes until stable (minimum 0), how long until
//!   stable, the latency of one readiness change after that, and the restarted process's peak
//!   RSS and CPU. `SCM_BENCH_SCALE=0.02` scales the Node and Service counts for a smoke run.
//! - `latency`: the default mode's objects (`SCM_BENCH_SCALE` scales them for a smoke run).
//!   Each side cold-starts at `--kube-api-qps=1000 --kube-api-burst=1000`, takes 1,000
//!   readiness flips at 100/s (flip -> slice p50/p90/p99/max, all flips and flips to not ready),
//!   is restarted at the default 20/30 and takes the same churn again, which saturates that
//!   budget: the p99 of "became not ready -> not ready in the slice" there is what the
//!   urgent-first queue is for. Where our time goes is in our `workqueue_*_duration_seconds`.
//!
//! `SCM_BENCH_SIDES=ours` runs only our side and prints its figures (for iterating on ours).
//!
//! Writes are counted as EndpointSlice watch events per managed-by value, so a no-op update
//! (which the API server does not persist) is not counted for either side.
//!
//! Run: `cargo bench -p endpointslice --bench convergence` (needs `make tools` for bin/).

mod load;
mod report;
mod shape;
mod side;
mod tally;

use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Result;
use endpointslice::common::{CONTROLLER_NAME, LABEL_MANAGED_BY, UPSTREAM_CONTROLLER_NAME};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, ListParams};
use scm_runtime::client::{RateLimit, rate_limited_client};
use scm_runtime::{ContextBase, LeaderGate};
use test_support::{ControlPlane, ControlPlaneOptions};

use shape::Shape;
use side::Side;
use tally::Tally;

const NS: &str = "bench";

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
    // The parent sets SCM_BENCH_QPS/SCM_BENCH_BURST in latency mode; the manager's defaults
    // otherwise.
    let env = |k: &str, d: u32| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let client = rate_limited_client(
        cfg,
        RateLimit {
            qps: f64::from(env("SCM_BENCH_QPS", 20)),
            burst: env("SCM_BENCH_BURST", 30),
        },
    )?;
    let (gate, _tx) = LeaderGate::fixed(true);
    let ctx = ContextBase::new(client, gate).context("endpointslice", "endpointslice-controller");
    let metrics = ctx.metrics.clone();
    side::breakdown::spawn_dump(move || metrics.encode());
    endpointslice::run(ctx, endpointslice::EndpointSliceConfig::default()).await?;
    Ok(())
}

fn profile() -> &'static str {
    if cfg!(debug_assertions) {
        "debug assertions on (not a release build)"
    } else {
        "release"
    }
}

async fn bench() -> Result<()> {
    let shape = Shape::from_env()?;
    let t = Instant::now();
    eprintln!(
        "{:?} mode: {}; ours: {}",
        shape.mode,
        shape.describe(),
        profile()
    );
    let cp = ControlPlane::start(ControlPlaneOptions::default()).await?;
    let client = cp.client().await?;
    let mut ready = load::load(&client, NS, &shape).await?;
    eprintln!("loaded in {:.1?}", t.elapsed());
    let tally = Arc::new(Mutex::new(Tally::default()));
    tokio::spawn(tally::watch_slices(
        client.clone(),
        NS.to_string(),
        tally.clone(),
    ));
    tokio::spawn(tally::watch_services(
        client.clone(),
        NS.to_string(),
        tally.clone(),
    ));

    let exe = std::env::current_exe()?;
    // Our child's metrics, for the latency mode's breakdown.
    let metrics_file = side::breakdown::parent_file();
    let spawn_ours = || -> Result<tokio::process::Child> {
        let mut cmd = match std::env::var("SCM_BENCH_WRAP") {
            Ok(w) => {
                let mut c = tokio::process::Command::new(w);
                c.arg(&exe);
                c
            }
            Err(_) => tokio::process::Command::new(&exe),
        };
        if shape.mode == shape::Mode::Latency {
            let (qps, burst) = side::latency::budget();
            cmd.env("SCM_BENCH_QPS", qps.to_string())
                .env("SCM_BENCH_BURST", burst.to_string());
        }
        Ok(cmd
            .env("SCM_BENCH_CHILD_KUBECONFIG", &cp.kubeconfig)
            .env(side::breakdown::METRICS_FILE_ENV, &metrics_file)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?)
    };
    let ours = Side {
        client: &client,
        tally: &tally,
        ns: NS,
        shape: &shape,
        managed_by: CONTROLLER_NAME,
        spawn: &spawn_ours,
    }
    .run(&mut ready, 0x9E3779B97F4A7C15)
    .await?;
    if std::env::var("SCM_BENCH_SIDES").as_deref() == Ok("ours") {
        cp.stop().await;
        println!("ours only ({}): {ours:#?}", shape.describe());
        return Ok(());
    }
    // Remove our slices so upstream's informers do not cache them too.
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), NS);
    slices
        .delete_collection(
            &DeleteParams::default(),
            &ListParams::default().labels(&format!("{LABEL_MANAGED_BY}={CONTROLLER_NAME}")),
        )
        .await?;

    let spawn_upstream = || {
        if shape.mode == shape::Mode::Latency {
            side::latency::upstream(&cp)
        } else {
            test_support::upstream_endpointslice_controller(&cp)
        }
    };
    let up = Side {
        client: &client,
        tally: &tally,
        ns: NS,
        shape: &shape,
        managed_by: UPSTREAM_CONTROLLER_NAME,
        spawn: &spawn_upstream,
    }
    .run(&mut ready, 0xD1B54A32D192ED03)
    .await?;
    cp.stop().await;

    report::print(&shape, &ours, &up);
    println!(
        "(ours: {}; writes counted from the EndpointSlice watch; total run {:.0?})",
        profile(),
        t.elapsed()
    );
    Ok(())
}
