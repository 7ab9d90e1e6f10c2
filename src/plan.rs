//! `plan`: the manager in a dry run (`--dry-run`) that waits until it has nothing left to do,
//! prints the writes it would have made as a table, and exits. "Nothing left to do": every
//! enabled controller's caches have synced, its workers have started, and every queue has been
//! empty with nothing in flight, and no new write recorded, for [`QUIET`]. In a dry run each
//! key is reconciled once per change (no retries, no scheduled looks), so this comes once
//! every object the informers listed has been looked at.

use std::time::Duration;

use scm_runtime::Readiness;
use scm_runtime::client::dry_run::{DryRun, Record};

/// How long everything must stay idle before the plan is complete: longer than the gap
/// between a cache's sync and the first keys its shell queues (the allocators' rebuild waits
/// 50 ms), and than a reconcile's hand-off from one controller to another.
pub const QUIET: Duration = Duration::from_secs(2);

/// Waits until the dry run is complete (see the module doc), or fails after `timeout` naming
/// what was still busy.
pub async fn wait(
    dry: &DryRun,
    readiness: &Readiness,
    enabled: &[&'static str],
    timeout: Duration,
) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut quiet_since: Option<(tokio::time::Instant, usize)> = None;
    loop {
        let busy = busy(dry, readiness, enabled);
        let now = tokio::time::Instant::now();
        let count = dry.count();
        match (&busy, quiet_since) {
            (None, Some((since, n))) if n == count => {
                if now.duration_since(since) >= QUIET {
                    return Ok(());
                }
            }
            (None, _) => quiet_since = Some((now, count)),
            (Some(_), _) => quiet_since = None,
        }
        if now >= deadline {
            return Err(format!(
                "plan: not done after {timeout:?} (--plan-timeout): {}",
                busy.unwrap_or_else(|| "writes were still being planned".into())
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What is still busy, if anything.
fn busy(dry: &DryRun, readiness: &Readiness, enabled: &[&'static str]) -> Option<String> {
    let pending = readiness.pending();
    if !pending.is_empty() {
        return Some(format!("caches not synced: {}", pending.join(", ")));
    }
    let activity = dry.activity();
    let mut busy = vec![];
    for name in enabled {
        match activity.get(*name) {
            None => busy.push(format!("{name} (workers not started)")),
            Some(a) if !a.started || a.queued > 0 || a.in_flight > 0 => busy.push(format!(
                "{name} ({} queued, {} in flight)",
                a.queued, a.in_flight
            )),
            Some(_) => {}
        }
    }
    (!busy.is_empty()).then(|| format!("busy: {}", busy.join(", ")))
}

/// The plan as a table: one row per write, sorted by controller, resource and object (the
/// order within one object kept), then a summary line.
pub fn table(records: &[Record], dry: &DryRun) -> String {
    // A key reconciled again on a later change (the node set first listed, say) plans the
    // same write again: shown once, with how often.
    let mut seen: Vec<(&Record, usize)> = vec![];
    for r in records {
        match seen.iter_mut().find(|(s, _)| *s == r) {
            Some((_, n)) => *n += 1,
            None => seen.push((r, 1)),
        }
    }
    seen.sort_by(|(a, _), (b, _)| {
        (&a.controller, &a.resource, &a.object).cmp(&(&b.controller, &b.resource, &b.object))
    });
    let changes: Vec<String> = seen
        .iter()
        .map(|(r, n)| match n {
            1 => r.change.clone(),
            n => format!("{} ({n} times)", r.change),
        })
        .collect();
    let rows: Vec<&Record> = seen.iter().map(|(r, _)| *r).collect();
    let head = ["CONTROLLER", "VERB", "RESOURCE", "OBJECT", "CHANGE"];
    let cells: Vec<[&str; 5]> = rows
        .iter()
        .zip(&changes)
        .map(|(r, change)| {
            [
                r.controller.as_str(),
                r.verb.as_str(),
                r.resource.as_str(),
                r.object.as_str(),
                change.as_str(),
            ]
        })
        .collect();
    let mut width = head.map(str::len);
    for c in &cells {
        for (w, v) in width.iter_mut().zip(c) {
            *w = (*w).max(v.chars().count());
        }
    }
    let mut out = String::new();
    if cells.is_empty() {
        out.push_str("No writes: every Service is as the enabled controllers would leave it.\n");
    } else {
        for row in std::iter::once(head).chain(cells) {
            let mut line = String::new();
            for (i, v) in row.iter().enumerate() {
                if i + 1 == row.len() {
                    line.push_str(v);
                } else {
                    line.push_str(&format!("{v:<w$}   ", w = width[i]));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
    }
    let reconciled: Vec<String> = dry
        .activity()
        .iter()
        .map(|(n, a)| format!("{n} {}", a.reconciled))
        .collect();
    out.push_str(&format!(
        "\n{} write(s) planned, none made (dry run). Keys reconciled: {}.\n",
        rows.len(),
        reconciled.join(", ")
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(c: &str, v: &str, r: &str, o: &str, ch: &str) -> Record {
        Record {
            controller: c.into(),
            verb: v.into(),
            resource: r.into(),
            object: o.into(),
            change: ch.into(),
        }
    }

    #[test]
    fn the_table_is_aligned_and_sorted() {
        let dry = DryRun::new();
        let t = table(
            &[
                rec("endpointslice", "update", "endpointslices", "a/web-2", "x"),
                rec(
                    "cloud-lb",
                    "patch",
                    "services/status",
                    "a/lb",
                    "status.loadBalancer: …",
                ),
                rec("endpointslice", "update", "endpointslices", "a/web-1", "y"),
            ],
            &dry,
        );
        let lines: Vec<&str> = t.lines().collect();
        assert!(
            lines[0].starts_with("CONTROLLER      VERB     RESOURCE          OBJECT    CHANGE"),
            "{t}"
        );
        assert!(
            lines[1].starts_with("cloud-lb        patch    services/status   a/lb      "),
            "{t}"
        );
        assert!(
            lines[2].contains("a/web-1") && lines[3].contains("a/web-2"),
            "{t}"
        );
        assert!(t.contains("3 write(s) planned, none made"), "{t}");
    }

    #[test]
    fn a_write_planned_twice_is_one_row() {
        let r = rec("cloud-lb", "CreateLoadBalancer", "elbv2", "lb", "x");
        let t = table(&[r.clone(), r], &DryRun::new());
        assert_eq!(
            t.lines().filter(|l| l.starts_with("cloud-lb")).count(),
            1,
            "{t}"
        );
        assert!(
            t.contains("x (2 times)") && t.contains("1 write(s) planned"),
            "{t}"
        );
    }

    #[test]
    fn an_empty_plan_says_so() {
        let t = table(&[], &DryRun::new());
        assert!(t.starts_with("No writes"), "{t}");
    }

    #[tokio::test]
    async fn waits_for_every_controller_to_start_and_drain() {
        let dry = DryRun::new();
        let readiness = Readiness::default();
        readiness.register("endpointslice").mark_ready();
        let r = wait(
            &dry,
            &readiness,
            &["endpointslice"],
            Duration::from_millis(300),
        )
        .await;
        assert!(r.is_err_and(|e| e.contains("workers not started")));
        dry.report_activity("endpointslice", 1, 0, 0);
        let d = dry.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            d.report_activity("endpointslice", 0, 0, 1);
        });
        let start = tokio::time::Instant::now();
        wait(
            &dry,
            &readiness,
            &["endpointslice"],
            Duration::from_secs(60),
        )
        .await
        .expect("drains");
        assert!(start.elapsed() >= Duration::from_millis(500) + QUIET);
    }
}
