//! The table the bench prints: one row per figure, ours against upstream's, with the ratio.

use crate::shape::{Mode, Shape};
use crate::side::{CHANGES_PER_SEC, Figures, STEADY_SECONDS};

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}", a / b)
    } else {
        "-".into()
    }
}

fn row(name: &str, a: String, b: String, r: String) {
    println!("{name:<48} {a:>14} {b:>14} {r:>8}");
}

fn secs(name: &str, a: f64, b: f64) {
    row(name, format!("{a:.1}"), format!("{b:.1}"), ratio(a, b));
}

fn ms(name: &str, a: f64, b: f64) {
    row(
        name,
        format!("{:.0}", a * 1e3),
        format!("{:.0}", b * 1e3),
        ratio(a, b),
    );
}

fn count(name: &str, a: usize, b: usize) {
    row(
        name,
        a.to_string(),
        b.to_string(),
        ratio(a as f64, b as f64),
    );
}

fn mib(name: &str, a: f64, b: f64) {
    row(name, format!("{a:.0}"), format!("{b:.0}"), ratio(a, b));
}

/// Prints the comparison of `ours` and `up` on `shape`.
pub fn print(shape: &Shape, ours: &Figures, up: &Figures) {
    println!();
    println!("EndpointSlice controller: {}", shape.describe());
    println!(
        "{:<48} {:>14} {:>14} {:>8}",
        "figure", "ours", "upstream", "ratio"
    );
    secs(
        "cold start: time to converge (s)",
        ours.cold.converge.as_secs_f64(),
        up.cold.converge.as_secs_f64(),
    );
    count(
        &format!("cold start: writes (minimum {})", shape.minimum_slices()),
        ours.cold.writes,
        up.cold.writes,
    );
    if shape.mode == Mode::Default {
        row(
            &format!("steady state: writes in {STEADY_SECONDS} s"),
            ours.flips.steady_writes.to_string(),
            up.flips.steady_writes.to_string(),
            "-".into(),
        );
        count(
            &format!(
                "{} readiness flips ({CHANGES_PER_SEC}/s): writes",
                ours.flips.changes
            ),
            ours.flips.change_writes,
            up.flips.change_writes,
        );
        ms(
            "flip -> slice latency p50 (ms)",
            ours.flips.p50.as_secs_f64(),
            up.flips.p50.as_secs_f64(),
        );
        ms(
            "flip -> slice latency p99 (ms)",
            ours.flips.p99.as_secs_f64(),
            up.flips.p99.as_secs_f64(),
        );
    }
    if shape.mode == Mode::Latency {
        latency(ours, up);
    }
    mib("peak RSS (MiB)", ours.peak_rss_mb, up.peak_rss_mb);
    secs("CPU (s)", ours.cpu_s, up.cpu_s);
    if shape.mode == Mode::Envelope {
        let (a, b) = (&ours.restart, &up.restart);
        row(
            "restart: writes until stable (minimum 0)",
            a.writes.to_string(),
            b.writes.to_string(),
            "-".into(),
        );
        secs(
            "restart: time until stable (s)",
            a.settle.as_secs_f64(),
            b.settle.as_secs_f64(),
        );
        ms(
            "restart: then a readiness change shows (ms)",
            a.canary.as_secs_f64(),
            b.canary.as_secs_f64(),
        );
        mib("restart: peak RSS (MiB)", a.peak_rss_mb, b.peak_rss_mb);
        secs("restart: CPU (s)", a.cpu_s, b.cpu_s);
    }
}

/// The latency mode's rows: flip -> slice percentiles at 1000 QPS, then at the default budget.
fn latency(ours: &Figures, up: &Figures) {
    use crate::side::latency::{DEFAULT_QPS, HIGH_QPS, Percentiles};
    let (a, b) = (&ours.latency, &up.latency);
    let rows = |what: &str, x: &Percentiles, y: &Percentiles| {
        for (p, u, v) in [
            ("p50", x.p50, y.p50),
            ("p90", x.p90, y.p90),
            ("p99", x.p99, y.p99),
            ("max", x.max, y.max),
        ] {
            ms(
                &format!("{what} {p} (ms)"),
                u.as_secs_f64(),
                v.as_secs_f64(),
            );
        }
    };
    let high = format!("qps {HIGH_QPS}: flip -> slice");
    count(&format!("{high}: flips"), a.high.n, b.high.n);
    rows(&high, &a.high, &b.high);
    rows(
        &format!("qps {HIGH_QPS}: not ready ->"),
        &a.high_removals,
        &b.high_removals,
    );
    count(
        &format!("qps {HIGH_QPS}: churn writes"),
        a.high_writes,
        b.high_writes,
    );
    let (q, burst) = DEFAULT_QPS;
    let low = format!("qps {q}/{burst}: flip -> slice");
    count(&format!("{low}: flips"), a.budget.n, b.budget.n);
    rows(&low, &a.budget, &b.budget);
    rows(
        &format!("qps {q}/{burst}: not ready ->"),
        &a.budget_removals,
        &b.budget_removals,
    );
    count(
        &format!("qps {q}/{burst}: flips over 30 s"),
        a.budget.over_30s,
        b.budget.over_30s,
    );
    count(
        &format!("qps {q}/{burst}: churn + restart writes"),
        a.budget_writes,
        b.budget_writes,
    );
    println!("\nWhere our time went (our metrics; totals over each churn phase):");
    println!("- qps {HIGH_QPS}: {}", a.high_breakdown.describe());
    println!("- qps {q}/{burst}: {}", a.budget_breakdown.describe());
}
