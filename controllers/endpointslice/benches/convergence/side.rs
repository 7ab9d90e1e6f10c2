//! One side of the comparison (our controller or upstream's) measured on the loaded objects:
//! cold start, steady state, readiness flips and a restart.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kube::Client;
use test_support::set_pod_status_at;
use tokio::process::Child;

use crate::shape::{Mode, Shape};
use crate::tally::{CONDITIONS, Shared, lock};

pub mod breakdown;
pub mod latency;

/// Pod readiness changes per second in the flip phase.
pub const CHANGES_PER_SEC: usize = 100;
/// Seconds of readiness changes.
pub const CHANGE_SECONDS: u64 = 10;
/// Seconds watched for writes once converged.
pub const STEADY_SECONDS: u64 = 20;
/// After a restart, the side is stable once it made no write for this long...
const QUIET: Duration = Duration::from_secs(30);
/// ...and its process used less than [`IDLE_CPU_S`] of CPU over this window.
const CPU_WINDOW: Duration = Duration::from_secs(10);
const IDLE_CPU_S: f64 = 0.2;

/// Peak RSS (MiB) and CPU seconds (user + system) of process `pid` so far.
pub fn proc_usage(pid: u32) -> (f64, f64) {
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

/// Figures of a cold start.
#[derive(Debug, Default)]
pub struct Cold {
    /// Time from the process start to every pod showing with the right readiness.
    pub converge: Duration,
    /// Writes until then.
    pub writes: usize,
}

/// Figures of the steady state and the readiness flips (default mode).
#[derive(Debug, Default)]
pub struct Flips {
    /// Writes in [`STEADY_SECONDS`] once converged.
    pub steady_writes: usize,
    /// Writes caused by the flips.
    pub change_writes: usize,
    /// Flips made.
    pub changes: usize,
    /// Flip -> slice latency percentiles.
    pub p50: Duration,
    /// 99th percentile.
    pub p99: Duration,
}

/// Figures of a restart once converged (envelope mode).
#[derive(Debug, Default)]
pub struct Restart {
    /// Writes from the restart until stable, not counting the canary change's one.
    pub writes: usize,
    /// From the restart until its last write or, if later, until its process went idle
    /// (under 2% of a core over 10 s), as seen once it was quiet for 30 s.
    pub settle: Duration,
    /// Latency of one readiness change made once stable (proves the restarted side is live).
    pub canary: Duration,
    /// Peak RSS (MiB) of the restarted process.
    pub peak_rss_mb: f64,
    /// CPU seconds of the restarted process.
    pub cpu_s: f64,
}

/// Everything measured of one side.
#[derive(Debug, Default)]
pub struct Figures {
    /// Cold start.
    pub cold: Cold,
    /// Steady state and flips (default mode).
    pub flips: Flips,
    /// Restart (envelope mode).
    pub restart: Restart,
    /// High-QPS and default-budget churn (latency mode).
    pub latency: latency::Latency,
    /// Peak RSS (MiB) of the cold-started process.
    pub peak_rss_mb: f64,
    /// CPU seconds of the cold-started process.
    pub cpu_s: f64,
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

/// One side: who writes its slices and how to start it.
pub struct Side<'a> {
    /// Admin client (for readiness changes).
    pub client: &'a Client,
    /// The bench's slice watch.
    pub tally: &'a Shared,
    /// Namespace of the objects.
    pub ns: &'a str,
    /// What was loaded.
    pub shape: &'a Shape,
    /// The side's `endpointslice.kubernetes.io/managed-by` value.
    pub managed_by: &'a str,
    /// Starts the side's process.
    pub spawn: &'a dyn Fn() -> Result<Child>,
}

impl Side<'_> {
    fn writes(&self) -> usize {
        lock(self.tally).writes_of(self.managed_by)
    }

    /// Condition writes seen on the Services (ours only: upstream writes none).
    fn condition_writes(&self) -> usize {
        lock(self.tally).writes_of(CONDITIONS)
    }

    /// Runs the side through the mode's phases; `ready` is every pod's readiness, updated
    /// with the changes made.
    pub async fn run(&self, ready: &mut HashMap<String, bool>, seed: u64) -> Result<Figures> {
        let mut child = (self.spawn)()?;
        let pid = child.id().context("child pid")?;
        let mut f = Figures {
            cold: self.cold(&mut child, ready).await?,
            ..Default::default()
        };
        eprintln!(
            "  {}: converged in {:.1?} with {} writes, {} Service condition writes",
            self.managed_by,
            f.cold.converge,
            f.cold.writes,
            self.condition_writes()
        );
        self.settle_conditions().await;
        if self.shape.mode == Mode::Default {
            f.flips = self.flips(ready, seed).await?;
        }
        (f.peak_rss_mb, f.cpu_s) = proc_usage(pid);
        eprintln!(
            "  {}: peak RSS {:.0} MiB, CPU {:.1} s",
            self.managed_by, f.peak_rss_mb, f.cpu_s
        );
        if self.shape.mode == Mode::Envelope {
            let (r, c) = self.restart(child, ready).await?;
            f.restart = r;
            child = c;
        }
        if self.shape.mode == Mode::Latency {
            let (l, c) = self.latency(child, ready, seed).await?;
            f.latency = l;
            child = c;
        }
        let _ = child.kill().await;
        let _ = child.wait().await;
        Ok(f)
    }

    async fn cold(&self, child: &mut Child, ready: &HashMap<String, bool>) -> Result<Cold> {
        let start = Instant::now();
        {
            let mut t = lock(self.tally);
            t.watching_for = self.managed_by.to_string();
            t.writes.remove(self.managed_by);
            t.writes.remove(CONDITIONS);
            t.latencies.clear();
            t.pending.clear();
        }
        // Checking 150,000 endpoints takes a while: poll the envelope less often.
        let (poll, limit) = match self.shape.mode {
            Mode::Default | Mode::Latency => (Duration::from_millis(50), Duration::from_secs(900)),
            Mode::Envelope => (Duration::from_millis(500), Duration::from_secs(3600)),
        };
        let mut last_report = Instant::now();
        loop {
            let (ok, total) = lock(self.tally).converged(self.managed_by, ready, self.shape);
            if ok {
                break;
            }
            if start.elapsed() > limit {
                bail!(
                    "{} did not converge in {limit:?} ({total} endpoints seen)",
                    self.managed_by
                );
            }
            if let Ok(Some(st)) = child.try_wait() {
                bail!("{} exited early: {st}", self.managed_by);
            }
            if last_report.elapsed() > Duration::from_secs(60) {
                last_report = Instant::now();
                eprintln!(
                    "  {}: {total} endpoints, {} writes after {:.0?}",
                    self.managed_by,
                    self.writes(),
                    start.elapsed()
                );
            }
            tokio::time::sleep(poll).await;
        }
        Ok(Cold {
            converge: start.elapsed(),
            writes: self.writes(),
        })
    }

    /// Waits until no Service condition write has been seen for 3 s (at most 10 minutes): ours
    /// writes `EndpointsReady=True` once per Service after its slices, at ordinary priority,
    /// so those writes trail the slices' convergence; the phases after the cold start (steady
    /// state, churn) then count only what they cause.
    async fn settle_conditions(&self) {
        let (start, quiet) = (Instant::now(), Duration::from_secs(3));
        let (mut last, mut since) = (self.condition_writes(), Instant::now());
        while since.elapsed() < quiet && start.elapsed() < Duration::from_secs(600) {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let now = self.condition_writes();
            if now != last {
                (last, since) = (now, Instant::now());
            }
        }
        eprintln!(
            "  {}: {last} Service condition writes in all, the last {:.1?} after the slices converged",
            self.managed_by,
            since.duration_since(start),
        );
    }

    async fn flips(&self, ready: &mut HashMap<String, bool>, seed: u64) -> Result<Flips> {
        let m = self.managed_by;
        let cold_writes = self.writes();
        let cold_conditions = self.condition_writes();
        tokio::time::sleep(Duration::from_secs(STEADY_SECONDS)).await;
        let steady_writes = self.writes() - cold_writes;
        eprintln!(
            "  {m}: {steady_writes} writes, {} Service condition writes in {STEADY_SECONDS} s at steady state",
            self.condition_writes() - cold_conditions
        );
        let mut rng = Xorshift(seed);
        let before = self.writes();
        let n = CHANGES_PER_SEC * CHANGE_SECONDS as usize;
        let period = Duration::from_secs(1) / CHANGES_PER_SEC as u32;
        let mut tick = tokio::time::interval(period);
        let mut flips = Vec::new();
        for _ in 0..n {
            tick.tick().await;
            // Never flip a pod whose previous flip is not visible yet: flipping it back could
            // cancel a write that was never needed, and no event would ever close the sample.
            let i = loop {
                let i = (rng.next() % self.shape.total_pods() as u64) as usize;
                if !lock(self.tally)
                    .pending
                    .contains_key(&self.shape.pod_name(i))
                {
                    break i;
                }
            };
            flips.push(self.flip(i, ready));
        }
        for f in flips {
            f.await??;
        }
        self.wait_pending(Duration::from_secs(300)).await?;
        // Let trailing writes land before counting.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let change_writes = self.writes() - before;
        let mut lat = lock(self.tally).latencies.clone();
        lat.sort();
        let pct = |p: f64| {
            lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
                .copied()
                .unwrap_or_default()
        };
        Ok(Flips {
            steady_writes,
            change_writes,
            changes: n,
            p50: pct(0.50),
            p99: pct(0.99),
        })
    }

    /// Flips pod `i`'s readiness (recorded as pending until a slice shows it).
    fn flip(
        &self,
        i: usize,
        ready: &mut HashMap<String, bool>,
    ) -> tokio::task::JoinHandle<Result<()>> {
        let name = self.shape.pod_name(i);
        let want = !ready.get(&name).copied().unwrap_or(true);
        ready.insert(name.clone(), want);
        lock(self.tally)
            .pending
            .insert(name.clone(), (want, Instant::now()));
        let c = self.client.clone();
        let ip = self.shape.pod_ip(i);
        let ns = self.ns.to_string();
        tokio::spawn(async move {
            // As a kubelet does, the flip carries its transition time.
            let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now(),
            );
            set_pod_status_at(&c, &ns, &name, want, &[ip.as_str()], Some(now))
                .await
                .map(|_| ())
        })
    }

    async fn wait_pending(&self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            let left = lock(self.tally).pending.len();
            if left == 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{}: {left} readiness changes never showed up",
                    self.managed_by
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the converged process, starts a new one and counts its writes until it is stable
    /// (none are needed); then proves it is live with one readiness change.
    async fn restart(
        &self,
        mut old: Child,
        ready: &mut HashMap<String, bool>,
    ) -> Result<(Restart, Child)> {
        let m = self.managed_by;
        let _ = old.kill().await;
        let _ = old.wait().await;
        let base = self.writes();
        let base_conditions = self.condition_writes();
        let start = Instant::now();
        let mut child = (self.spawn)()?;
        let pid = child.id().context("restarted child pid")?;
        let mut cpu: VecDeque<(Instant, f64)> = VecDeque::new();
        // Since when the process has been idle without a break.
        let mut idle_since: Option<Instant> = None;
        let settle = loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if let Ok(Some(st)) = child.try_wait() {
                bail!("{m} exited after the restart: {st}");
            }
            let now = Instant::now();
            cpu.push_back((now, proc_usage(pid).1));
            while cpu.len() > 2 && now - cpu[1].0 >= CPU_WINDOW {
                cpu.pop_front();
            }
            let (t0, c0) = cpu[0];
            let idle = now - t0 >= CPU_WINDOW && cpu[cpu.len() - 1].1 - c0 < IDLE_CPU_S;
            idle_since = if idle { idle_since.or(Some(t0)) } else { None };
            let last = lock(self.tally)
                .last_write
                .get(m)
                .copied()
                .filter(|t| *t > start)
                .unwrap_or(start);
            let quiet = now - last >= QUIET && now - start >= QUIET;
            if let (true, Some(since)) = (quiet, idle_since) {
                // Settled at its last write or when it went idle, whichever came later.
                break (last.max(since)) - start;
            }
            if quiet && now - start > Duration::from_secs(900) {
                eprintln!("  {m}: no writes but still busy 15 min after the restart; going on");
                // Not stable: report the whole wait, a lower bound.
                break now - start;
            }
            if now - start > Duration::from_secs(3600) {
                bail!("{m} still writing an hour after the restart");
            }
        };
        let before_canary = self.writes() - base;
        eprintln!(
            "  {m}: restart stable after {settle:.1?} with {before_canary} writes, {} Service condition writes",
            self.condition_writes() - base_conditions
        );
        let canary_at = Instant::now();
        self.flip(0, ready).await??;
        self.wait_pending(Duration::from_secs(300)).await?;
        let canary = canary_at.elapsed();
        // Writes trailing the canary's would be the restart's too.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let (peak_rss_mb, cpu_s) = proc_usage(pid);
        let writes = (self.writes() - base).saturating_sub(1);
        eprintln!(
            "  {m}: after the restart {writes} writes, canary {canary:.1?}, peak RSS {peak_rss_mb:.0} MiB, CPU {cpu_s:.1} s"
        );
        Ok((
            Restart {
                writes,
                settle,
                canary,
                peak_rss_mb,
                cpu_s,
            },
            child,
        ))
    }
}
