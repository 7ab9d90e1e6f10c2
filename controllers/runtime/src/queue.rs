//! A keyed work queue with client-go's semantics: a key is queued at most once, a key being
//! processed is never handed to a second worker, a key added while it is processed is handed
//! out again once `done` is called, and failures back off exponentially per key.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;

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

struct Inner<K> {
    queue: VecDeque<K>,
    dirty: HashSet<K>,
    processing: HashSet<K>,
    failures: HashMap<K, u32>,
    shut_down: bool,
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
                queue: VecDeque::new(),
                dirty: HashSet::new(),
                processing: HashSet::new(),
                failures: HashMap::new(),
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

    /// Queues `key` unless it is already waiting.
    pub fn add(&self, key: K) {
        let mut g = self.lock();
        if g.shut_down || g.dirty.contains(&key) {
            return;
        }
        g.dirty.insert(key.clone());
        if !g.processing.contains(&key) {
            g.queue.push_back(key);
            drop(g);
            self.notify.notify_one();
        }
    }

    /// Queues `key` after `delay`.
    pub fn add_after(&self, key: K, delay: Duration) {
        if delay.is_zero() {
            self.add(key);
            return;
        }
        let q = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            q.add(key);
        });
    }

    /// Queues `key` after its next backoff delay and returns that delay.
    pub fn add_rate_limited(&self, key: K) -> Duration {
        let delay = {
            let mut g = self.lock();
            let n = g.failures.entry(key.clone()).or_insert(0);
            *n = n.saturating_add(1);
            self.backoff.delay(*n)
        };
        self.add_after(key, delay);
        delay
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
        loop {
            let notified = self.notify.notified();
            {
                let mut g = self.lock();
                if g.shut_down {
                    return None;
                }
                if let Some(k) = g.queue.pop_front() {
                    g.dirty.remove(&k);
                    g.processing.insert(k.clone());
                    if !g.queue.is_empty() {
                        self.notify.notify_one();
                    }
                    return Some(k);
                }
            }
            notified.await;
        }
    }

    /// Marks `key` as processed; if it was added meanwhile it is queued again.
    pub fn done(&self, key: &K) {
        let mut g = self.lock();
        g.processing.remove(key);
        if g.dirty.contains(key) {
            g.queue.push_back(key.clone());
            drop(g);
            self.notify.notify_one();
        }
    }

    /// Keys waiting to be processed (the `workqueue_depth` metric).
    pub fn len(&self) -> usize {
        self.lock().queue.len()
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
        q.add(1);
        // Not handed to a second worker while the first still holds it.
        assert!(q.is_empty());
        q.done(&1);
        assert_eq!(q.len(), 1);
        assert_eq!(q.get().await, Some(1));
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
