//! Where our time goes during a churn phase, from our process's own metrics (the child writes
//! its `/metrics` text to a file every 250 ms): the wait in the work queue, the sync (planning
//! and writing), and of each write the wait for a client token and the round trip. Upstream's
//! side has no such file; its figures stay empty.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

/// The file our child process writes its metrics to, if the parent asked for one.
pub const METRICS_FILE_ENV: &str = "SCM_BENCH_METRICS_FILE";

/// The write verbs (a sync's API calls; the watches are GETs).
const WRITES: [&str; 4] = ["POST", "PUT", "PATCH", "DELETE"];

/// Parent side: the file its children are told to write to.
pub fn parent_file() -> PathBuf {
    std::env::temp_dir().join(format!("scm-bench-metrics-{}", std::process::id()))
}

/// Child side: writes `encode()` to the file named by [`METRICS_FILE_ENV`] every 250 ms.
pub fn spawn_dump(encode: impl Fn() -> String + Send + 'static) {
    let Some(path) = std::env::var_os(METRICS_FILE_ENV).map(PathBuf::from) else {
        return;
    };
    tokio::spawn(async move {
        let tmp = path.with_extension("tmp");
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tick.tick().await;
            // Renamed into place so the parent never reads half a file.
            if std::fs::write(&tmp, encode()).is_ok() {
                let _ = std::fs::rename(&tmp, &path);
            }
        }
    });
}

/// Sums and counts of the series the breakdown reads, at one moment.
#[derive(Clone, Debug, Default)]
pub struct Snapshot(HashMap<String, f64>);

impl Snapshot {
    /// Reads the child's latest dump (empty if there is none).
    pub fn read() -> Self {
        let text = std::fs::read_to_string(parent_file()).unwrap_or_default();
        Snapshot(
            text.lines()
                .filter(|l| !l.starts_with('#'))
                .filter_map(|l| {
                    let (k, v) = l.rsplit_once(' ')?;
                    Some((k.to_string(), v.parse().ok()?))
                })
                .collect(),
        )
    }

    fn get(&self, series: &str) -> f64 {
        self.0.get(series).copied().unwrap_or(0.0)
    }

    fn writes(&self, family: &str, part: &str) -> f64 {
        WRITES
            .iter()
            .map(|v| self.get(&format!("{family}_{part}{{verb=\"{v}\"}}")))
            .sum()
    }
}

/// What the metrics say about one phase (the difference between two snapshots).
#[derive(Clone, Copy, Debug, Default)]
pub struct Breakdown {
    /// Syncs (keys handed to a worker).
    pub syncs: f64,
    /// Total seconds keys waited in the queue.
    pub queue_s: f64,
    /// Total seconds of syncs.
    pub work_s: f64,
    /// Write requests.
    pub writes: f64,
    /// Total seconds of slice writes, from the call to the answer (client queue included).
    pub write_s: f64,
    /// Total seconds writes waited for a client token.
    pub limiter_s: f64,
    /// Total seconds of write round trips.
    pub round_trip_s: f64,
    /// Syncs that found the cache older than our own writes and were retried later.
    pub stale: f64,
    /// Syncs whose queue wait was at most 1 ms, 10 ms, 100 ms, 1 s and 10 s (the histogram's
    /// buckets).
    pub waited_at_most: [f64; 5],
}

/// The queue-duration buckets [`Breakdown::waited_at_most`] reads.
const WAIT_BUCKETS: [&str; 5] = ["0.001", "0.01", "0.1", "1.0", "10.0"];

impl Breakdown {
    /// From `a` (before) to `b` (after), for the queue `name`.
    pub fn between(a: &Snapshot, b: &Snapshot, name: &str) -> Self {
        let d = |s: &str| b.get(s) - a.get(s);
        let q = |f: &str, p: &str| {
            d(&format!(
                "workqueue_{f}_duration_seconds_{p}{{name=\"{name}\"}}"
            ))
        };
        let w = |f: &str, p: &str| b.writes(f, p) - a.writes(f, p);
        Breakdown {
            syncs: q("work", "count"),
            queue_s: q("queue", "sum"),
            work_s: q("work", "sum"),
            writes: w("rest_client_rate_limiter_duration_seconds", "count"),
            write_s: d(&format!(
                "service_controller_manager_{name}_write_duration_seconds_sum"
            )),
            limiter_s: w("rest_client_rate_limiter_duration_seconds", "sum"),
            round_trip_s: w("rest_client_request_duration_seconds", "sum"),
            stale: d("endpoint_slice_controller_syncs_total{result=\"stale\"}"),
            waited_at_most: WAIT_BUCKETS.map(|le| {
                d(&format!(
                    "workqueue_queue_duration_seconds_bucket{{le=\"{le}\",name=\"{name}\"}}"
                ))
            }),
        }
    }

    /// One line per figure, for the report.
    pub fn describe(&self) -> String {
        let per = |s: f64, n: f64| if n > 0.0 { s / n * 1000.0 } else { 0.0 };
        let planning = (self.work_s - self.write_s).max(0.0);
        // Requests wait in kube's client queue (FIFO) for the one ahead to get its token; the
        // limiter histogram sees only the wait after leaving that queue.
        let queued = (self.write_s - self.limiter_s - self.round_trip_s).max(0.0);
        format!(
            "{:.0} syncs: queue wait {:.1} ms/sync ({:.1} s in all); sync {:.1} ms/sync ({:.1} s: \
             planning and bookkeeping {:.1} s, writing {:.1} s); {:.0} writes, each {:.1} ms: \
             {:.1} ms behind other requests in the client, {:.1} ms for its token, {:.1} ms \
             round trip; {:.0} stale-cache retries; queue wait at most 1 ms / 10 ms / 100 ms / 1 s / \
             10 s: {:.0} / {:.0} / {:.0} / {:.0} / {:.0} syncs",
            self.syncs,
            per(self.queue_s, self.syncs),
            self.queue_s,
            per(self.work_s, self.syncs),
            self.work_s,
            planning,
            self.write_s,
            self.writes,
            per(self.write_s, self.writes),
            per(queued, self.writes),
            per(self.limiter_s, self.writes),
            per(self.round_trip_s, self.writes),
            self.stale,
            self.waited_at_most[0],
            self.waited_at_most[1],
            self.waited_at_most[2],
            self.waited_at_most[3],
            self.waited_at_most[4],
        )
    }
}
