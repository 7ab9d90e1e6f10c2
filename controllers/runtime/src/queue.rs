//! A keyed work queue with client-go's semantics: a key is queued at most once, a key being
//! processed is never handed to a second worker, a key added while it is processed is handed
//! out again once `done` is called, and failures back off per key. Unlike client-go's FIFO, a
//! key carries a [`Priority`]: urgent keys are handed out before ordinary ones (FIFO within a
//! class), so under a tight API budget the writes traffic needs go first.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// Per-key exponential backoff bounds, as client-go's item exponential rate limiter.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    /// Delay after the first failure.
    pub base: Duration,
    /// Upper bound of the delay.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        // client-go's DefaultControllerRateLimiter per-item part: 5 ms doubling to 1000 s.
        Backoff {
            base: Duration::from_millis(5),
            max: Duration::from_secs(1000),
        }
    }
}

impl Backoff {
    /// The delay before retry number `failures` (1 for the first retry).
    pub fn delay(&self, failures: u32) -> Duration {
        let exp = failures.saturating_sub(1).min(31);
        let d = self.base.saturating_mul(1u32 << exp);
        d.min(self.max)
    }
}

/// How long an ordinary key may wait behind urgent ones before it gets a share of hand-outs.
pub const ORDINARY_MAX_WAIT: Duration = Duration::from_secs(10);

/// While an ordinary key is overdue ([`ORDINARY_MAX_WAIT`]), this many urgent keys are handed
/// out for each ordinary one. A share, not "overdue goes first": when urgent work alone
/// exceeds the API budget, every waiting ordinary key is soon overdue, and letting each go
/// first would turn the queue back into a FIFO exactly when the order matters.
pub const URGENT_PER_OVERDUE: u32 = 3;

/// How soon a queued key is handed out: urgent keys before ordinary ones, except that an
/// ordinary key that has waited [`ORDINARY_MAX_WAIT`] gets one hand-out in
/// `1 + `[`URGENT_PER_OVERDUE`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    /// Resyncs, retries, capacity that can wait its turn.
    #[default]
    Ordinary,
    /// Work that traffic is waiting for (e.g. an endpoint that stopped serving).
    Urgent,
}

/// A key waiting to be handed out (or, while it is processed, to be queued again).
struct Waiting {
    priority: Priority,
    // When the key was added (or its delayed add came due): the start of its queue duration.
    since: Instant,
}

struct Inner<K> {
    urgent: VecDeque<K>,
    ordinary: VecDeque<K>,
    // Keys added and not handed out yet, as client-go's `dirty` set, with their class.
    dirty: HashMap<K, Waiting>,
    // Keys handed to a worker, with the class they were handed out in (a retry keeps it).
    processing: HashMap<K, Priority>,
    failures: HashMap<K, u32>,
    // Urgent keys handed out in a row while an ordinary key was overdue.
    urgent_streak: u32,
    shut_down: bool,
}

impl<K: Clone + Eq + Hash> Inner<K> {
    /// Queues a dirty key in class `p`. Urgent keys wait in the order they were first added
    /// since last handed out, not the order they were queued: a key that changed while a worker
    /// held it (a large Service under churn) queues ahead of keys that changed after it, instead
    /// of behind every key that came while it was being processed.
    fn push(&mut self, key: K, p: Priority) {
        match p {
            Priority::Urgent => {
                let since = |k: &K| self.dirty.get(k).map(|w| w.since);
                let at = match since(&key) {
                    Some(s) => self
                        .urgent
                        .partition_point(|k| since(k).is_none_or(|t| t <= s)),
                    None => self.urgent.len(),
                };
                self.urgent.insert(at, key);
            }
            Priority::Ordinary => self.ordinary.push_back(key),
        }
    }
}

/// A deduplicating work queue of object keys shared by a controller's event handlers and workers.
pub struct WorkQueue<K> {
    inner: Arc<Mutex<Inner<K>>>,
    notify: Arc<Notify>,
    backoff: Backoff,
}

impl<K> Clone for WorkQueue<K> {
    fn clone(&self) -> Self {
        WorkQueue {
            inner: self.inner.clone(),
            notify: self.notify.clone(),
            backoff: self.backoff,
        }
    }
}

impl<K: Clone + Eq + Hash + Send + 'static> WorkQueue<K> {
    /// A new, empty queue with the given per-key failure backoff.
    pub fn new(backoff: Backoff) -> Self {
        WorkQueue {
            inner: Arc::new(Mutex::new(Inner {
                urgent: VecDeque::new(),
                ordinary: VecDeque::new(),
                dirty: HashMap::new(),
                processing: HashMap::new(),
                failures: HashMap::new(),
                urgent_streak: 0,
                shut_down: false,
            })),
            notify: Arc::new(Notify::new()),
            backoff,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner<K>> {
        // A panic while holding this lock cannot leave the sets inconsistent in a way that
        // matters more than stopping, so recover the guard instead of propagating poison.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `key` as ordinary work unless it is already waiting.
    pub fn add(&self, key: K) {
        self.add_with(key, Priority::Ordinary);
    }

    /// Queues `key` ahead of every ordinary key; a key already waiting as ordinary moves up.
    pub fn add_urgent(&self, key: K) {
        self.add_with(key, Priority::Urgent);
    }

    /// Queues `key` in class `priority` unless it is already waiting; a waiting key is only
    /// ever promoted (never demoted), keeping its place in time for the queue duration.
    pub fn add_with(&self, key: K, priority: Priority) {
        let mut g = self.lock();
        if g.shut_down {
            return;
        }
        let processing = g.processing.contains_key(&key);
        if let Some(w) = g.dirty.get_mut(&key) {
            if priority > w.priority {
                w.priority = priority;
                // A key being processed sits in no deque; `done` queues it in its new class.
                if !processing {
                    // Linear, but only on a promotion, and the queue holds each key once.
                    if let Some(i) = g.ordinary.iter().position(|k| *k == key) {
                        g.ordinary.remove(i);
                    }
                    g.push(key, Priority::Urgent);
                }
            }
            return;
        }
        let since = Instant::now();
        g.dirty.insert(key.clone(), Waiting { priority, since });
        if !processing {
            g.push(key, priority);
            drop(g);
            self.notify.notify_one();
        }
    }

    /// Queues `key` after `delay`.
    pub fn add_after(&self, key: K, delay: Duration) {
        self.add_after_with(key, delay, Priority::Ordinary);
    }

    /// Queues `key` in class `priority` after `delay` (its queue duration starts then).
    pub fn add_after_with(&self, key: K, delay: Duration, priority: Priority) {
        if delay.is_zero() {
            self.add_with(key, priority);
            return;
        }
        let q = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            q.add_with(key, priority);
        });
    }

    /// Queues `key` after its next backoff delay and returns that delay.
    pub fn add_rate_limited(&self, key: K) -> Duration {
        self.add_rate_limited_with(key, Priority::Ordinary)
    }

    /// Queues `key` in class `priority` after its next backoff delay and returns that delay.
    pub fn add_rate_limited_with(&self, key: K, priority: Priority) -> Duration {
        let delay = {
            let mut g = self.lock();
            let n = g.failures.entry(key.clone()).or_insert(0);
            *n = n.saturating_add(1);
            self.backoff.delay(*n)
        };
        self.add_after_with(key, delay, priority);
        delay
    }

    /// The class `key` was handed out in, while a worker holds it (else ordinary): a failed
    /// urgent key is retried as urgent.
    pub fn class_in_process(&self, key: &K) -> Priority {
        self.lock().processing.get(key).copied().unwrap_or_default()
    }

    /// True when `key` is being processed and was added again meanwhile: what its worker
    /// read is already out of date (a writer can stop and plan again from fresher state).
    pub fn added_while_processing(&self, key: &K) -> bool {
        let g = self.lock();
        g.processing.contains_key(key) && g.dirty.contains_key(key)
    }

    /// Forgets `key`'s failure history, so its next failure starts at the base delay.
    pub fn forget(&self, key: &K) {
        self.lock().failures.remove(key);
    }

    /// How many times `key` has failed since it was last forgotten.
    pub fn failures(&self, key: &K) -> u32 {
        self.lock().failures.get(key).copied().unwrap_or(0)
    }

    /// Waits for the next key; `None` once the queue is shut down.
    pub async fn get(&self) -> Option<K> {
        self.get_timed().await.map(|(k, _)| k)
    }

    /// Waits for the next key and says how long it waited since it was added (the
    /// `workqueue_queue_duration_seconds` observation); `None` once the queue is shut down.
    pub async fn get_timed(&self) -> Option<(K, Duration)> {
        loop {
            let notified = self.notify.notified();
            {
                let mut g = self.lock();
                if g.shut_down {
                    return None;
                }
                // An overdue ordinary key gets its share: a steady stream of urgent work must
                // not starve the rest (a pod becoming ready) for good.
                let overdue = g
                    .ordinary
                    .front()
                    .and_then(|k| g.dirty.get(k))
                    .is_some_and(|w| w.since.elapsed() >= ORDINARY_MAX_WAIT);
                let ordinary_turn = overdue && g.urgent_streak >= URGENT_PER_OVERDUE;
                let next = if g.urgent.is_empty() || ordinary_turn {
                    g.urgent_streak = 0;
                    g.ordinary.pop_front().map(|k| (k, Priority::Ordinary))
                } else {
                    g.urgent_streak = if overdue { g.urgent_streak + 1 } else { 0 };
                    g.urgent.pop_front().map(|k| (k, Priority::Urgent))
                };
                if let Some((k, class)) = next {
                    let waited = g
                        .dirty
                        .remove(&k)
                        .map(|w| w.since.elapsed())
                        .unwrap_or_default();
                    g.processing.insert(k.clone(), class);
                    if !g.urgent.is_empty() || !g.ordinary.is_empty() {
                        self.notify.notify_one();
                    }
                    return Some((k, waited));
                }
            }
            notified.await;
        }
    }

    /// Marks `key` as processed; if it was added meanwhile it is queued again, in the class
    /// it was last added with.
    pub fn done(&self, key: &K) {
        let mut g = self.lock();
        g.processing.remove(key);
        if let Some(p) = g.dirty.get(key).map(|w| w.priority) {
            g.push(key.clone(), p);
            drop(g);
            self.notify.notify_one();
        }
    }

    /// Keys waiting to be processed (the `workqueue_depth` metric).
    pub fn len(&self) -> usize {
        let g = self.lock();
        g.urgent.len() + g.ordinary.len()
    }

    /// True when no key is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stops handing out keys; waiting `get` calls return `None`.
    pub fn shut_down(&self) {
        self.lock().shut_down = true;
        self.notify.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn dedups_waiting_keys() {
        let q = WorkQueue::new(Backoff::default());
        q.add("a");
        q.add("a");
        q.add("b");
        assert_eq!(q.len(), 2);
        assert_eq!(q.get().await, Some("a"));
        assert_eq!(q.get().await, Some("b"));
        assert!(q.is_empty());
    }

    #[tokio::test]
    async fn key_added_while_processing_comes_back_after_done() {
        let q = WorkQueue::new(Backoff::default());
        q.add(1);
        let k = q.get().await;
        assert_eq!(k, Some(1));
        assert!(!q.added_while_processing(&1));
        q.add(1);
        assert!(q.added_while_processing(&1));
        // Not handed to a second worker while the first still holds it.
        assert!(q.is_empty());
        q.done(&1);
        assert!(!q.added_while_processing(&1), "waiting, not processing");
        assert_eq!(q.len(), 1);
        assert_eq!(q.get().await, Some(1));
    }

    async fn drain(q: &WorkQueue<&'static str>) -> Vec<&'static str> {
        let mut out = Vec::new();
        while !q.is_empty() {
            if let Some(k) = q.get().await {
                q.done(&k);
                out.push(k);
            }
        }
        out
    }

    #[tokio::test]
    async fn urgent_keys_go_first_fifo_within_each_class() {
        let q = WorkQueue::new(Backoff::default());
        q.add("o1");
        q.add_urgent("u1");
        q.add("o2");
        q.add_with("u2", Priority::Urgent);
        q.add_with("o3", Priority::Ordinary);
        assert_eq!(q.len(), 5);
        assert_eq!(drain(&q).await, vec!["u1", "u2", "o1", "o2", "o3"]);
    }

    #[tokio::test(start_paused = true)]
    async fn overdue_ordinary_keys_get_one_hand_out_in_four_while_urgent_work_waits() {
        let q = WorkQueue::new(Backoff::default());
        q.add("o1");
        q.add("o2");
        q.add("o3");
        q.add_urgent("u0");
        tokio::time::advance(ORDINARY_MAX_WAIT - Duration::from_millis(1)).await;
        assert_eq!(q.get().await, Some("u0"), "not overdue yet: urgent first");
        for u in ["u1", "u2", "u3", "u4", "u5", "u6", "u7"] {
            q.add_urgent(u);
        }
        tokio::time::advance(Duration::from_millis(1)).await;
        // Overdue: three urgent keys, then an ordinary one, and so on; urgent work left alone
        // once the overdue keys are gone.
        assert_eq!(
            drain(&q).await,
            vec!["u1", "u2", "u3", "o1", "u4", "u5", "u6", "o2", "u7", "o3"]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn urgent_work_beyond_the_budget_still_goes_first_once_ordinary_keys_are_overdue() {
        // The case the share is for: 40 urgent and 40 ordinary keys queued, all overdue.
        let q = WorkQueue::new(Backoff::default());
        for i in 0..40 {
            q.add(format!("o{i}"));
            q.add_urgent(format!("u{i}"));
        }
        tokio::time::advance(ORDINARY_MAX_WAIT).await;
        let mut first_40 = Vec::new();
        for _ in 0..40 {
            let k = q.get().await.unwrap();
            q.done(&k);
            first_40.push(k);
        }
        let urgent = first_40.iter().filter(|k| k.starts_with('u')).count();
        assert_eq!(
            urgent, 30,
            "three in four hand-outs are urgent: {first_40:?}"
        );
    }

    #[tokio::test]
    async fn a_waiting_key_that_becomes_urgent_moves_up_once_and_is_never_demoted() {
        let q = WorkQueue::new(Backoff::default());
        q.add_urgent("u1");
        q.add("o1");
        q.add("o2");
        q.add("o3");
        q.add_urgent("o2");
        // Promoted behind the urgent keys already waiting, not duplicated.
        assert_eq!(q.len(), 4);
        // An ordinary add of an urgent key neither duplicates nor demotes it.
        q.add("u1");
        q.add_urgent("u1");
        assert_eq!(q.len(), 4);
        assert_eq!(drain(&q).await, vec!["u1", "o2", "o1", "o3"]);
    }

    #[tokio::test]
    async fn a_key_being_processed_that_turns_urgent_comes_back_once_after_done_ahead_of_ordinary()
    {
        let q = WorkQueue::new(Backoff::default());
        q.add("k");
        assert_eq!(q.get().await, Some("k"));
        q.add("o1");
        q.add("k");
        q.add_urgent("k");
        q.add_urgent("k");
        // Still not handed to a second worker while the first holds it.
        assert_eq!(q.len(), 1);
        assert_eq!(q.get().await, Some("o1"));
        q.add("o2");
        q.done(&"k");
        assert_eq!(q.len(), 2);
        q.done(&"o1");
        assert_eq!(drain(&q).await, vec!["k", "o2"]);
    }

    /// A key that turned urgent while a worker held it queues, once done, ahead of urgent keys
    /// added after it changed (not behind every key that came while it was processed).
    #[tokio::test(start_paused = true)]
    async fn an_urgent_key_requeued_on_done_keeps_its_place_in_time() {
        let q = WorkQueue::new(Backoff::default());
        q.add_urgent("big");
        assert_eq!(q.get().await, Some("big"));
        tokio::time::sleep(Duration::from_millis(10)).await;
        q.add_urgent("big"); // changed while processed
        for k in ["a", "b"] {
            tokio::time::sleep(Duration::from_millis(10)).await;
            q.add_urgent(k);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        q.done(&"big");
        tokio::time::sleep(Duration::from_millis(10)).await;
        q.add_urgent("c");
        // An ordinary key promoted later keeps its own (earlier) place too.
        assert_eq!(drain(&q).await, vec!["big", "a", "b", "c"]);
        q.add("o");
        tokio::time::sleep(Duration::from_millis(10)).await;
        q.add_urgent("d");
        q.add_urgent("o");
        assert_eq!(drain(&q).await, vec!["o", "d"]);
    }

    #[tokio::test(start_paused = true)]
    async fn get_timed_reports_the_wait_since_the_add_or_the_delayed_add_came_due() {
        let q = WorkQueue::new(Backoff::default());
        q.add("a");
        tokio::time::sleep(Duration::from_millis(300)).await;
        // A later add of a waiting key does not restart its clock.
        q.add_urgent("a");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(q.get_timed().await, Some(("a", Duration::from_millis(500))));
        q.done(&"a");
        q.add_after_with("b", Duration::from_secs(10), Priority::Urgent);
        tokio::time::sleep(Duration::from_secs(11)).await;
        // The delay is not queue time: the clock starts when the add comes due.
        assert_eq!(q.get_timed().await, Some(("b", Duration::from_secs(1))));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_urgent_key_is_retried_as_urgent() {
        let q = WorkQueue::new(Backoff {
            base: Duration::from_secs(1),
            max: Duration::from_secs(1),
        });
        q.add_urgent("u");
        assert_eq!(q.get().await, Some("u"));
        assert_eq!(q.class_in_process(&"u"), Priority::Urgent);
        let class = q.class_in_process(&"u");
        q.done(&"u");
        assert_eq!(q.class_in_process(&"u"), Priority::Ordinary);
        q.add_rate_limited_with("u", class);
        q.add("o");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(drain(&q).await, vec!["u", "o"]);
    }

    #[tokio::test]
    async fn shut_down_wakes_waiters() {
        let q: WorkQueue<u32> = WorkQueue::new(Backoff::default());
        let q2 = q.clone();
        let h = tokio::spawn(async move { q2.get().await });
        tokio::task::yield_now().await;
        q.shut_down();
        assert_eq!(h.await.ok().flatten(), None);
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let b = Backoff {
            base: Duration::from_secs(5),
            max: Duration::from_secs(300),
        };
        assert_eq!(b.delay(1), Duration::from_secs(5));
        assert_eq!(b.delay(2), Duration::from_secs(10));
        assert_eq!(b.delay(7), Duration::from_secs(300));
        assert_eq!(b.delay(100), Duration::from_secs(300));
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limited_adds_back_off_until_forgotten() {
        let q = WorkQueue::new(Backoff {
            base: Duration::from_secs(1),
            max: Duration::from_secs(60),
        });
        assert_eq!(q.add_rate_limited("k"), Duration::from_secs(1));
        assert_eq!(q.add_rate_limited("k"), Duration::from_secs(2));
        assert_eq!(q.failures(&"k"), 2);
        q.forget(&"k");
        assert_eq!(q.failures(&"k"), 0);
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(q.get().await, Some("k"));
    }
}
