//! Latency mode: where readiness-to-slice time goes when the API budget is not the limit, and
//! which changes wait when it is. Each side runs twice on the loaded objects: first at
//! `--kube-api-qps=1000 --kube-api-burst=1000` (readiness churn, flip -> slice p50/p90/p99/max),
//! then restarted at the default 20/30, which churn saturates (the p99 of "pod became not ready
//! -> its endpoint not ready in the slice", the removal traffic is waiting for).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use test_support::ControlPlane;
use tokio::process::Child;

use super::breakdown::{Breakdown, Snapshot};
use super::{CHANGE_SECONDS, CHANGES_PER_SEC, Side, Xorshift};
use crate::tally::lock;

/// Client QPS and burst of the unthrottled phase (both sides).
pub const HIGH_QPS: u32 = 1000;
/// The default client budget (both sides' defaults).
pub const DEFAULT_QPS: (u32, u32) = (20, 30);

/// Whether the next side process starts with [`HIGH_QPS`] (else [`DEFAULT_QPS`]).
static HIGH: AtomicBool = AtomicBool::new(true);

/// The client QPS and burst the next side process starts with.
pub fn budget() -> (u32, u32) {
    if HIGH.load(Ordering::SeqCst) {
        (HIGH_QPS, HIGH_QPS)
    } else {
        DEFAULT_QPS
    }
}

/// kube-controller-manager with only its EndpointSlice controller, at [`budget`].
pub fn upstream(cp: &ControlPlane) -> Result<Child> {
    let (qps, burst) = budget();
    tokio::process::Command::new(test_support::tool("kube-controller-manager")?)
        .arg(format!("--kubeconfig={}", cp.kubeconfig.display()))
        .arg("--leader-elect=false")
        .arg("--controllers=endpointslice")
        .arg("--secure-port=0")
        .arg("--use-service-account-credentials=false")
        .arg(format!("--kube-api-qps={qps}"))
        .arg(format!("--kube-api-burst={burst}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting kube-controller-manager")
}

/// Latency percentiles of one churn phase.
#[derive(Debug, Default, Clone, Copy)]
pub struct Percentiles {
    /// Samples.
    pub n: usize,
    /// Median.
    pub p50: Duration,
    /// 90th percentile.
    pub p90: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// Slowest.
    pub max: Duration,
    /// Samples slower than 30 s.
    pub over_30s: usize,
}

impl Percentiles {
    fn of(mut v: Vec<Duration>) -> Self {
        v.sort();
        let pct = |p: f64| {
            v.get(((v.len() as f64 * p) as usize).min(v.len().saturating_sub(1)))
                .copied()
                .unwrap_or_default()
        };
        Percentiles {
            n: v.len(),
            p50: pct(0.50),
            p90: pct(0.90),
            p99: pct(0.99),
            max: v.last().copied().unwrap_or_default(),
            over_30s: v.iter().filter(|d| **d > Duration::from_secs(30)).count(),
        }
    }
}

/// Figures of the latency mode.
#[derive(Debug, Default)]
pub struct Latency {
    /// At [`HIGH_QPS`]: every flip -> slice.
    pub high: Percentiles,
    /// At [`HIGH_QPS`]: flips to not ready only.
    pub high_removals: Percentiles,
    /// At [`DEFAULT_QPS`]: every flip -> slice.
    pub budget: Percentiles,
    /// At [`DEFAULT_QPS`]: flips to not ready only (traffic to a pod that cannot serve).
    pub budget_removals: Percentiles,
    /// Writes during the high-QPS churn.
    pub high_writes: usize,
    /// Writes during the default-budget churn (the restart's own included).
    pub budget_writes: usize,
    /// Where our time went during the high-QPS churn (empty for upstream).
    pub high_breakdown: Breakdown,
    /// Where our time went during the default-budget churn (empty for upstream).
    pub budget_breakdown: Breakdown,
}

impl Side<'_> {
    /// The latency phases; `child` runs at [`HIGH_QPS`] and has converged. Returns the figures
    /// and the process now running (at the default budget).
    pub async fn latency(
        &self,
        mut child: Child,
        ready: &mut HashMap<String, bool>,
        seed: u64,
    ) -> Result<(Latency, Child)> {
        let m = self.managed_by;
        let mut rng = Xorshift(seed);
        let before = self.writes();
        let snap = Snapshot::read();
        let (high, high_removals) = self.churn(ready, &mut rng).await?;
        let high_writes = self.writes() - before;
        let high_breakdown = Breakdown::between(&snap, &Snapshot::read(), "endpointslice");
        if high_breakdown.syncs > 0.0 {
            eprintln!("  {m} at qps {HIGH_QPS}: {}", high_breakdown.describe());
        }
        eprintln!(
            "  {m} at qps {HIGH_QPS}: p50 {:.0?} p90 {:.0?} p99 {:.0?} max {:.0?}; removals p99 {:.0?}",
            high.p50, high.p90, high.p99, high.max, high_removals.p99
        );
        // Restart at the default budget; a canary flip proves the new process is live.
        HIGH.store(false, Ordering::SeqCst);
        let _ = child.kill().await;
        let _ = child.wait().await;
        let before = self.writes();
        child = (self.spawn)()?;
        self.flip(0, ready).await??;
        self.wait_pending(Duration::from_secs(600)).await?;
        if let Ok(Some(st)) = child.try_wait() {
            bail!("{m} exited after the restart: {st}");
        }
        let snap = Snapshot::read();
        let (budget, budget_removals) = self.churn(ready, &mut rng).await?;
        let budget_writes = self.writes() - before;
        let budget_breakdown = Breakdown::between(&snap, &Snapshot::read(), "endpointslice");
        if budget_breakdown.syncs > 0.0 {
            eprintln!(
                "  {m} at the default budget: {}",
                budget_breakdown.describe()
            );
        }
        eprintln!(
            "  {m} at qps {}/{}: p50 {:.0?} p99 {:.0?} max {:.0?}; removals p99 {:.0?}, {} of {} flips over 30 s",
            DEFAULT_QPS.0,
            DEFAULT_QPS.1,
            budget.p50,
            budget.p99,
            budget.max,
            budget_removals.p99,
            budget.over_30s,
            budget.n
        );
        HIGH.store(true, Ordering::SeqCst);
        Ok((
            Latency {
                high,
                high_removals,
                budget,
                budget_removals,
                high_writes,
                budget_writes,
                high_breakdown,
                budget_breakdown,
            },
            child,
        ))
    }

    /// [`CHANGES_PER_SEC`] readiness flips for [`CHANGE_SECONDS`], then waits for all to show.
    /// Returns the latencies of all flips and of the flips to not ready.
    async fn churn(
        &self,
        ready: &mut HashMap<String, bool>,
        rng: &mut Xorshift,
    ) -> Result<(Percentiles, Percentiles)> {
        {
            let mut t = lock(self.tally);
            t.latencies.clear();
            t.removals.clear();
            t.big_removals.clear();
            t.small_removals.clear();
        }
        let n = CHANGES_PER_SEC * CHANGE_SECONDS as usize;
        let mut tick = tokio::time::interval(Duration::from_secs(1) / CHANGES_PER_SEC as u32);
        let mut flips = Vec::new();
        for _ in 0..n {
            tick.tick().await;
            // As the default mode: never flip a pod whose previous flip is not visible yet. A
            // small (smoke) shape can run out of such pods: then this tick flips nothing.
            let pick = (0..1000).find_map(|_| {
                let i = (rng.next() % self.shape.total_pods() as u64) as usize;
                let free = !lock(self.tally)
                    .pending
                    .contains_key(&self.shape.pod_name(i));
                free.then_some(i)
            });
            if let Some(i) = pick {
                flips.push(self.flip(i, ready));
            }
        }
        for f in flips {
            f.await??;
        }
        let t0 = Instant::now();
        self.wait_pending(Duration::from_secs(600)).await?;
        eprintln!(
            "  {}: churn drained {:.1?} after the last flip",
            self.managed_by,
            t0.elapsed()
        );
        let t = lock(self.tally);
        let (big, small) = (
            Percentiles::of(t.big_removals.clone()),
            Percentiles::of(t.small_removals.clone()),
        );
        eprintln!(
            "  {}: removals p50/p99: large Service {:.0?}/{:.0?} ({} flips), small ones {:.0?}/{:.0?} ({})",
            self.managed_by, big.p50, big.p99, big.n, small.p50, small.p99, small.n,
        );
        Ok((
            Percentiles::of(t.latencies.clone()),
            Percentiles::of(t.removals.clone()),
        ))
    }
}
