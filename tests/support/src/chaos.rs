//! The table `make chaos` prints: every failure scenario, in whichever test binary it runs
//! (`tests/faults`, `tests/cloud_lb`), appends one row to the file `SCM_CHAOS_REPORT` names
//! (nothing happens when it is unset, as in `make test`).

use std::io::Write;
use std::time::Duration;

/// The table's columns, tab-separated, in the order [`report`] writes them.
pub const HEADER: &str =
    "scenario\tfaults\toutcome\tslices-differ\tdouble-allocations\tleaked\tpanics\tconverged";

/// One scenario's outcome.
pub struct Row<'a> {
    /// What was done to the system, in a few words.
    pub scenario: &'a str,
    /// Faults injected (by a proxy, or counted by the scenario itself).
    pub faults: u64,
    /// From the first fault (or change) until every invariant held.
    pub converged_in: Duration,
    /// Whether our slices still differed from upstream's at the end; `None` where the scenario
    /// has no slices to compare (the cloud-lb scenarios).
    pub slices_differ: Option<bool>,
    /// ClusterIPs, NodePorts or load-balancer addresses held by more than one Service.
    pub doubles: usize,
    /// Cloud resources or pool addresses left without a live Service; `None` where the
    /// scenario has none to leak.
    pub leaked: Option<usize>,
    /// Panics in this process and in the managers it ran.
    pub panics: u64,
}

impl Row<'_> {
    /// Whether every invariant held.
    pub fn ok(&self) -> bool {
        self.slices_differ != Some(true)
            && self.doubles == 0
            && self.leaked.unwrap_or(0) == 0
            && self.panics == 0
    }

    /// The row as [`report`] writes it (one line, tab-separated, see [`HEADER`]).
    pub fn line(&self) -> String {
        let na = |v: Option<String>| v.unwrap_or_else(|| "-".into());
        format!(
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{:.1}s\n",
            self.scenario,
            self.faults,
            if self.ok() { "ok" } else { "FAIL" },
            na(self.slices_differ.map(|d| u8::from(d).to_string())),
            self.doubles,
            na(self.leaked.map(|l| l.to_string())),
            self.panics,
            self.converged_in.as_secs_f64()
        )
    }
}

/// Appends `row` to the chaos report, when `SCM_CHAOS_REPORT` names a file.
pub fn report(row: &Row) {
    let Ok(path) = std::env::var("SCM_CHAOS_REPORT") else {
        return;
    };
    // One write per row, so rows of scenarios running in parallel do not interleave.
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = f.write_all(row.line().as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_fails_on_any_broken_invariant_and_marks_what_was_not_checked() {
        let row = |slices_differ, doubles, leaked| Row {
            scenario: "s",
            faults: 3,
            converged_in: Duration::from_millis(1500),
            slices_differ,
            doubles,
            leaked,
            panics: 0,
        };
        assert_eq!(row(None, 0, None).line(), "s\t3\tok\t-\t0\t-\t0\t1.5s\n");
        assert_eq!(
            row(Some(false), 0, Some(0)).line(),
            "s\t3\tok\t0\t0\t0\t0\t1.5s\n"
        );
        assert!(!row(Some(true), 0, None).ok());
        assert!(!row(None, 1, None).ok());
        assert!(!row(None, 0, Some(2)).ok());
        assert_eq!(
            HEADER.split('\t').count(),
            row(None, 0, None).line().trim_end().split('\t').count()
        );
    }
}
