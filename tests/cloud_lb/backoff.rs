//! When a refused Service's backoff retries can come, from the refusals the controller counts:
//! what the "served because an address was released, not because its backoff ran out" tests
//! compare with, instead of a fixed number of seconds.
//!
//! Each retryable refusal schedules its own retry (`WorkQueue::add_rate_limited`: one timer per
//! failure) after `5 s * 2^(n-1)` (capped at 300 s), `n` counting the key's failures. A test
//! polls the refusal counter every 20 ms, so it knows each refusal happened between two polls;
//! from that it bounds the earliest moment any still-pending timer can fire. The tests release
//! the address only once that moment is [`SLACK`] away, and then require the waiting Service to
//! be served before it: a pass proves the release brought it back, and a loaded machine has
//! [`SLACK`] for the release's chain of API round trips (3 to 5 s before these bounds existed,
//! which busy CI cores could exceed).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use cloud_lb::core::{MAX_RETRY_DELAY, MIN_RETRY_DELAY};
use scm_runtime::Backoff;
use test_support::wait_for;

use crate::harness::{Ctrl, T};

/// The cloud-lb controller's retryable provider errors: the refusals of a Service that waits
/// for an address.
pub const RETRYABLE: &str = "service_controller_manager_reconcile_errors_total{controller=\"cloud-lb\",error=\"provider_retryable\"}";

/// How far away the next possible backoff retry must be when the test releases the address.
pub const SLACK: Duration = Duration::from_secs(12);

/// The refusals a controller has counted so far, each as the interval it happened in. Only one
/// Service may be refused (retryably) while it records: the `n`-th refusal is taken as that
/// Service's `n`-th failure.
pub struct Refusals {
    seen: Arc<Mutex<Vec<(Instant, Instant)>>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Refusals {
    /// Starts recording `ctrl`'s refusals (from its start: call it right after `Ctrl::start`).
    pub fn watch(ctrl: &Ctrl) -> Refusals {
        let metrics = ctrl.metrics();
        let seen: Arc<Mutex<Vec<(Instant, Instant)>>> = Arc::default();
        let log = seen.clone();
        let task = tokio::spawn(async move {
            let mut last = Instant::now();
            loop {
                let now = Instant::now();
                let n = Ctrl::count_in(&metrics, RETRYABLE) as usize;
                {
                    let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
                    while log.len() < n {
                        log.push((last, now));
                    }
                }
                last = now;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        Refusals {
            seen,
            task: Some(task),
        }
    }

    /// Refusals counted so far.
    pub fn count(&self) -> usize {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// The earliest moment at or after `at` that a retry scheduled by a refusal so far can
    /// fire, or `None` when every one has surely fired.
    pub fn next_retry_after(&self, at: Instant) -> Option<Instant> {
        let backoff = Backoff {
            base: MIN_RETRY_DELAY,
            max: MAX_RETRY_DELAY,
        };
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.iter()
            .enumerate()
            .filter_map(|(i, (from, to))| {
                let d = backoff.delay(i as u32 + 1);
                (*to + d > at).then(|| (*from + d).max(at))
            })
            .min()
    }

    /// Waits until at least `min` refusals were counted and no retry they scheduled can fire
    /// within [`SLACK`]; returns the earliest moment one can (`None`: none is pending).
    pub async fn wait_quiet(&self, min: usize) -> Result<Option<Instant>> {
        wait_for(
            &format!("{min} refusals and no backoff retry due within {SLACK:?}"),
            T * 2,
            || async {
                let now = Instant::now();
                let next = self.next_retry_after(now);
                (self.count() >= min && next.is_none_or(|t| t >= now + SLACK)).then_some(next)
            },
        )
        .await
    }
}

impl Drop for Refusals {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// Asserts that what was served at `served` (when the test saw it) came before `next_retry`,
/// the earliest backoff retry pending when the address was released at `released`.
pub fn assert_served_before_backoff(
    what: &str,
    released: Instant,
    served: Instant,
    next_retry: Option<Instant>,
) {
    if let Some(t) = next_retry {
        assert!(
            served < t,
            "{what} served {:?} after the release, not before its next backoff retry ({:?} after \
             the release): the release did not bring it back",
            served - released,
            t.saturating_duration_since(released),
        );
    }
    eprintln!(
        "{what}: served {:?} after the release; the earliest backoff retry: {:?} after it",
        served - released,
        next_retry.map(|t| t.saturating_duration_since(released)),
    );
}

#[test]
fn the_earliest_pending_retry_follows_one_timer_per_refusal() {
    let t0 = Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    // Two refusals at once, a third when the first timer (5 s) fired.
    let r = Refusals {
        seen: Arc::new(Mutex::new(vec![
            (at(0), at(20)),
            (at(0), at(20)),
            (at(5_000), at(5_020)),
        ])),
        task: None,
    };
    // Just after the third: the second refusal's 10 s timer is next, 5 s away.
    assert_eq!(r.next_retry_after(at(5_100)), Some(at(10_000)));
    // Inside the second timer's window it may fire at once.
    assert_eq!(r.next_retry_after(at(10_010)), Some(at(10_010)));
    // Past it, only the third's 20 s timer is left.
    assert_eq!(r.next_retry_after(at(10_100)), Some(at(25_000)));
    assert_eq!(r.next_retry_after(at(25_100)), None);
}
