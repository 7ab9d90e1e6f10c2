//! The client's token bucket (`--kube-api-qps`, `--kube-api-burst`), shared by every request of
//! one client. Unlike client-go's limiter, which serves waiting requests in arrival order, it
//! hands tokens to urgent requests first: a request made inside
//! [`with_priority`]`(Priority::Urgent, …)` (a slice write that stops traffic to a pod that
//! cannot serve) goes before ordinary ones (watches, lists, Events, leases, writes that only
//! add capacity). An ordinary request that has waited [`ORDINARY_MAX_WAIT`] goes first, so a
//! stream of urgent writes can delay a lease renewal by seconds, never starve it.
//!
//! Urgent requests go in the order of the changes they carry ([`with_class`]: the oldest
//! change a slice write makes visible goes first, so one large Service's backlog is not served
//! at the pace of one worker among several while its changes are the oldest); one that names
//! no change counts from when it arrived, and no change counts from more than
//! [`MAX_AGE_CREDIT`] before that.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::Priority;

use super::RateLimit;

/// How long an ordinary request may wait behind urgent ones before it takes the next token.
pub const ORDINARY_MAX_WAIT: Duration = Duration::from_secs(2);

/// How long a background request may wait behind everything else before it takes the next
/// token.
pub const BACKGROUND_MAX_WAIT: Duration = Duration::from_secs(30);

/// The longest one wait lasts, whatever the rate (a rate too small to wait for must not panic).
const MAX_WAIT: Duration = Duration::from_secs(3600);

/// The most an urgent request's change may predate its arrival for its place in line (a pod
/// reporting an ancient transition time does not jump ahead of everything).
pub const MAX_AGE_CREDIT: Duration = Duration::from_secs(300);

/// A request's place in the token order: its priority and, for an urgent request, when the
/// oldest change it carries happened (earlier goes first).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Class {
    /// Urgent or ordinary.
    pub priority: Priority,
    /// The oldest change the request carries, if known.
    pub since: Option<SystemTime>,
    /// An ordinary request that may wait until nothing else does (a status condition): it
    /// takes a token only when no urgent or ordinary request waits, or once it has waited
    /// [`BACKGROUND_MAX_WAIT`].
    pub background: bool,
}

impl Class {
    /// The class of background requests.
    pub const BACKGROUND: Class = Class {
        priority: Priority::Ordinary,
        since: None,
        background: true,
    };
}

impl From<Priority> for Class {
    fn from(priority: Priority) -> Self {
        Class {
            priority,
            since: None,
            background: false,
        }
    }
}

tokio::task_local! {
    static CLASS: Class;
}

/// Runs `f` with its API requests in class `p` for this client's token bucket.
pub async fn with_priority<F: Future>(p: Priority, f: F) -> F::Output {
    with_class(p.into(), f).await
}

/// Runs `f` with its API requests in class `c` for this client's token bucket.
pub async fn with_class<F: Future>(c: Class, f: F) -> F::Output {
    CLASS.scope(c, f).await
}

/// The class of the requests the current task makes now ([`Priority::Ordinary`] by default).
pub fn current_priority() -> Priority {
    current_class().priority
}

/// The whole class of the requests the current task makes now.
pub fn current_class() -> Class {
    CLASS.try_with(|c| *c).unwrap_or_default()
}

/// Milliseconds since the epoch of `c`'s change, bounded to `[arrival - MAX_AGE_CREDIT,
/// arrival]`; the arrival when it names none.
fn order_key(c: &Class, arrival: SystemTime) -> u64 {
    let floor = arrival.checked_sub(MAX_AGE_CREDIT).unwrap_or(UNIX_EPOCH);
    let t = c.since.unwrap_or(arrival).clamp(floor, arrival);
    let ms = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis();
    u64::try_from(ms).unwrap_or(u64::MAX)
}

struct State {
    tokens: f64,
    last: Instant,
    next_ticket: u64,
    // Waiting urgent requests by (order key, ticket), the next first.
    urgent: VecDeque<(u64, u64)>,
    // Waiting ordinary requests in arrival order: (ticket, since).
    ordinary: VecDeque<(u64, Instant)>,
    // Waiting background requests in arrival order: (ticket, since).
    background: VecDeque<(u64, Instant)>,
}

impl State {
    /// The ticket that takes the next token: an overdue ordinary request, else an overdue
    /// background one, else the first urgent one, else the first ordinary one, else the first
    /// background one.
    fn head(&self, now: Instant) -> Option<u64> {
        let overdue = |q: &VecDeque<(u64, Instant)>, limit: Duration| {
            q.front()
                .filter(|(_, since)| now.duration_since(*since) >= limit)
                .map(|(t, since)| (*since, *t))
        };
        // Of the two overdue heads, the one waiting longer.
        let ordinary = overdue(&self.ordinary, ORDINARY_MAX_WAIT);
        let background = overdue(&self.background, BACKGROUND_MAX_WAIT);
        ordinary
            .into_iter()
            .chain(background)
            .min()
            .map(|(_, t)| t)
            .or(self.urgent.front().map(|(_, t)| *t))
            .or(self.ordinary.front().map(|(t, _)| *t))
            .or(self.background.front().map(|(t, _)| *t))
    }

    fn remove(&mut self, ticket: u64) {
        self.urgent.retain(|(_, t)| *t != ticket);
        self.ordinary.retain(|(t, _)| *t != ticket);
        self.background.retain(|(t, _)| *t != ticket);
    }
}

/// A token bucket with two classes of waiters.
pub struct Bucket {
    qps: f64,
    burst: f64,
    state: Mutex<State>,
    // Woken whenever the head may have changed: a token taken, a waiter gone.
    changed: Notify,
}

/// What a waiter does next.
enum Next {
    Took,
    Sleep(Duration),
    WaitForChange,
}

impl Bucket {
    /// A full bucket of `limit.burst` tokens refilled at `limit.qps` a second.
    pub fn new(limit: RateLimit) -> Self {
        let burst = f64::from(limit.burst.max(1));
        Bucket {
            qps: limit.qps,
            burst,
            state: Mutex::new(State {
                tokens: burst,
                last: Instant::now(),
                next_ticket: 0,
                urgent: VecDeque::new(),
                ordinary: VecDeque::new(),
                background: VecDeque::new(),
            }),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is a few numbers and queues: a panic elsewhere cannot leave it unusable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn sleep_for(secs: f64) -> Duration {
        Duration::try_from_secs_f64(secs.max(0.0))
            .unwrap_or(MAX_WAIT)
            .min(MAX_WAIT)
    }

    /// Waits for a token in class `c`; returns how long it waited.
    pub async fn acquire(&self, c: impl Into<Class>) -> Duration {
        let c: Class = c.into();
        let start = Instant::now();
        let ticket = {
            let mut s = self.lock();
            let t = s.next_ticket;
            s.next_ticket += 1;
            match c.priority {
                Priority::Urgent => {
                    let entry = (order_key(&c, SystemTime::now()), t);
                    let at = s.urgent.partition_point(|e| *e < entry);
                    s.urgent.insert(at, entry);
                }
                Priority::Ordinary if c.background => s.background.push_back((t, start)),
                Priority::Ordinary => s.ordinary.push_back((t, start)),
            }
            t
        };
        let mut queued = Queued {
            bucket: self,
            ticket: Some(ticket),
        };
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let next = {
                let mut s = self.lock();
                let now = Instant::now();
                let elapsed = now.duration_since(s.last).as_secs_f64();
                s.last = now;
                s.tokens = (s.tokens + elapsed * self.qps).min(self.burst);
                if s.head(now) == Some(ticket) {
                    if s.tokens >= 1.0 {
                        s.tokens -= 1.0;
                        s.remove(ticket);
                        Next::Took
                    } else {
                        Next::Sleep(Self::sleep_for((1.0 - s.tokens) / self.qps))
                    }
                } else if s.ordinary.front().is_some_and(|(t, _)| *t == ticket) {
                    // Not next yet, but becomes next once overdue, which nobody else signals.
                    Next::Sleep(ORDINARY_MAX_WAIT.saturating_sub(now.duration_since(start)))
                } else if s.background.front().is_some_and(|(t, _)| *t == ticket) {
                    Next::Sleep(BACKGROUND_MAX_WAIT.saturating_sub(now.duration_since(start)))
                } else {
                    Next::WaitForChange
                }
            };
            match next {
                Next::Took => {
                    queued.ticket = None;
                    self.changed.notify_waiters();
                    return start.elapsed();
                }
                Next::Sleep(d) => {
                    tokio::select! {
                        _ = changed => {}
                        _ = tokio::time::sleep(d) => {}
                    }
                }
                Next::WaitForChange => changed.await,
            }
        }
    }
}

/// A waiter's place in the queue, given up if its request is dropped while it waits.
struct Queued<'a> {
    bucket: &'a Bucket,
    ticket: Option<u64>,
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        if let Some(t) = self.ticket.take() {
            self.bucket.lock().remove(t);
            self.bucket.changed.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn bucket(qps: f64, burst: u32) -> Arc<Bucket> {
        Arc::new(Bucket::new(RateLimit { qps, burst }))
    }

    /// Starts `n` waiters of class `p` named `name-i`, each recording its name when served.
    fn waiters(
        b: &Arc<Bucket>,
        log: &Arc<Mutex<Vec<String>>>,
        name: &str,
        p: Priority,
        n: usize,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        (0..n)
            .map(|i| {
                let (b, log, name) = (b.clone(), log.clone(), format!("{name}{i}"));
                tokio::spawn(async move {
                    b.acquire(p).await;
                    log.lock().unwrap().push(name);
                })
            })
            .collect()
    }

    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn burst_then_qps() {
        let b = bucket(10.0, 5);
        let start = Instant::now();
        for _ in 0..5 {
            b.acquire(Priority::Ordinary).await;
        }
        assert!(start.elapsed() < Duration::from_millis(1));
        for _ in 0..10 {
            b.acquire(Priority::Ordinary).await;
        }
        let e = start.elapsed();
        assert!(
            e >= Duration::from_millis(950) && e <= Duration::from_millis(1100),
            "{e:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn urgent_requests_take_tokens_before_ordinary_ones_fifo_within_a_class() {
        let b = bucket(10.0, 1);
        b.acquire(Priority::Ordinary).await; // empty the bucket
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut all = waiters(&b, &log, "o", Priority::Ordinary, 3);
        settle().await;
        all.extend(waiters(&b, &log, "u", Priority::Urgent, 3));
        settle().await;
        for h in all {
            h.await.unwrap();
        }
        let got = log.lock().unwrap().clone();
        assert_eq!(got, ["u0", "u1", "u2", "o0", "o1", "o2"]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_ordinary_request_overdue_behind_urgent_ones_goes_next() {
        // One token a second: three urgent requests would hold it for 3 s.
        let b = bucket(1.0, 1);
        b.acquire(Priority::Ordinary).await;
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut all = waiters(&b, &log, "o", Priority::Ordinary, 1);
        settle().await;
        all.extend(waiters(&b, &log, "u", Priority::Urgent, 3));
        settle().await;
        for h in all {
            h.await.unwrap();
        }
        // u0 at 1 s; o0 has waited 2 s by the next token.
        let got = log.lock().unwrap().clone();
        assert_eq!(got, ["u0", "o0", "u1", "u2"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_waiter_gives_up_its_turn() {
        let b = bucket(1.0, 1);
        b.acquire(Priority::Ordinary).await;
        let first = {
            let b = b.clone();
            tokio::spawn(async move { b.acquire(Priority::Urgent).await })
        };
        settle().await;
        let log = Arc::new(Mutex::new(Vec::new()));
        let rest = waiters(&b, &log, "o", Priority::Ordinary, 1);
        settle().await;
        first.abort();
        let start = Instant::now();
        for h in rest {
            h.await.unwrap();
        }
        assert_eq!(log.lock().unwrap().clone(), ["o0"]);
        assert!(start.elapsed() <= Duration::from_millis(1001));
    }

    #[tokio::test(start_paused = true)]
    async fn urgent_requests_go_in_the_order_of_the_changes_they_carry() {
        let b = bucket(10.0, 1);
        b.acquire(Priority::Ordinary).await; // empty the bucket
        let log = Arc::new(Mutex::new(Vec::new()));
        let now = SystemTime::now();
        let ago = |s: u64| Class {
            priority: Priority::Urgent,
            since: Some(now - Duration::from_secs(s)),
            background: false,
        };
        // Arriving in this order: no change named (counts from now), 5 s old, 20 s old, and
        // one claiming an hour (counts as MAX_AGE_CREDIT, still the oldest).
        let classes = [
            ("none", Priority::Urgent.into()),
            ("5s", ago(5)),
            ("20s", ago(20)),
            ("1h", ago(3600)),
        ];
        let mut all = vec![];
        for (name, c) in classes {
            let (b, log) = (b.clone(), log.clone());
            all.push(tokio::spawn(async move {
                b.acquire(c).await;
                log.lock().unwrap().push(name);
            }));
            settle().await;
        }
        for h in all {
            h.await.unwrap();
        }
        assert_eq!(*log.lock().unwrap(), ["1h", "20s", "5s", "none"]);
        let credit = order_key(&ago(3600), now);
        assert_eq!(credit, order_key(&ago(MAX_AGE_CREDIT.as_secs()), now));
    }

    /// A background request waits while anything else does, but not for more than
    /// BACKGROUND_MAX_WAIT.
    #[tokio::test(start_paused = true)]
    async fn background_requests_go_last_until_overdue() {
        // One token a second: forty ordinary requests hold it for forty seconds.
        let b = bucket(1.0, 1);
        b.acquire(Priority::Ordinary).await;
        let log = Arc::new(Mutex::new(Vec::new()));
        let bg = {
            let (b, log) = (b.clone(), log.clone());
            tokio::spawn(async move {
                b.acquire(Class::BACKGROUND).await;
                log.lock().unwrap().push("bg".to_string());
            })
        };
        settle().await;
        let all = waiters(&b, &log, "o", Priority::Ordinary, 40);
        settle().await;
        bg.await.unwrap();
        for h in all {
            h.await.unwrap();
        }
        let got = log.lock().unwrap().clone();
        let at = got.iter().position(|n| n == "bg").unwrap();
        // Overdue after 30 s: about 30 ordinary grants went first, not all 40, not none.
        assert!((28..=31).contains(&at), "{at}: {got:?}");
        // With nothing else waiting it goes at once.
        let t = Instant::now();
        b.acquire(Class::BACKGROUND).await;
        assert!(t.elapsed() <= Duration::from_millis(1001));
    }

    #[tokio::test(start_paused = true)]
    async fn with_priority_sets_the_class_of_the_task_s_requests() {
        assert_eq!(current_priority(), Priority::Ordinary);
        let p = with_priority(Priority::Urgent, async { current_priority() }).await;
        assert_eq!(p, Priority::Urgent);
    }

    #[tokio::test(start_paused = true)]
    async fn a_tiny_rate_waits_instead_of_panicking() {
        let b = bucket(1e-300, 1);
        b.acquire(Priority::Ordinary).await;
        let second =
            tokio::time::timeout(Duration::from_secs(10), b.acquire(Priority::Ordinary)).await;
        assert!(second.is_err(), "the second request waits for a token");
    }
}
