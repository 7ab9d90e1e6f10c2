//! Coalescing of lookups from concurrent reconciles into batched describe calls
//! (DescribeLoadBalancers takes 20 names, DescribeTags 20 ARNs): the first caller of an idle
//! coalescer waits a short window, then executes everything queued meanwhile in batches of
//! `max` keys and hands each caller its own result.

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::oneshot;

use crate::provider::ProviderError;

type Waiter<K, V> = (K, oneshot::Sender<Result<V, ProviderError>>);

struct State<K, V> {
    pending: Vec<Waiter<K, V>>,
    flushing: bool,
}

struct FlushGuard<'a, K, V> {
    owner: &'a Coalescer<K, V>,
    armed: bool,
}

impl<K, V> Drop for FlushGuard<'_, K, V> {
    fn drop(&mut self) {
        if self.armed {
            let mut st = self.owner.state.lock().unwrap_or_else(|e| e.into_inner());
            st.flushing = false;
            st.pending.clear();
        }
    }
}

/// Batches keys of concurrent callers into calls of at most `max` keys.
pub struct Coalescer<K, V> {
    state: Mutex<State<K, V>>,
    window: Duration,
    max: usize,
}

impl<K: Clone, V> Coalescer<K, V> {
    /// A coalescer waiting `window` for company before each batch of up to `max` keys.
    pub fn new(window: Duration, max: usize) -> Self {
        Coalescer {
            state: Mutex::new(State {
                pending: Vec::new(),
                flushing: false,
            }),
            window,
            max: max.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<K, V>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The result for `key`. `exec` gets a batch of keys and must return one result per key,
    /// in order; every caller passes an equivalent `exec` (whichever caller flushes runs it).
    pub async fn call<F, Fut>(&self, key: K, exec: F) -> Result<V, ProviderError>
    where
        F: Fn(Vec<K>) -> Fut,
        Fut: Future<Output = Vec<Result<V, ProviderError>>>,
    {
        let (tx, rx) = oneshot::channel();
        let flusher = {
            let mut st = self.lock();
            st.pending.push((key, tx));
            !std::mem::replace(&mut st.flushing, true)
        };
        if flusher {
            // If this caller's future is dropped mid-flush (its reconcile abandoned), nobody
            // would flush again: the guard hands the role back and fails the waiters (their
            // reconciles retry) instead of leaving them hanging.
            let mut guard = FlushGuard {
                owner: self,
                armed: true,
            };
            loop {
                tokio::time::sleep(self.window).await;
                let batch: Vec<Waiter<K, V>> = {
                    let mut st = self.lock();
                    if st.pending.is_empty() {
                        st.flushing = false;
                        guard.armed = false;
                        break;
                    }
                    let n = st.pending.len().min(self.max);
                    st.pending.drain(..n).collect()
                };
                let keys: Vec<K> = batch.iter().map(|(k, _)| k.clone()).collect();
                let mut results = exec(keys).await.into_iter();
                for (_, tx) in batch {
                    let r = results.next().unwrap_or_else(|| {
                        Err(ProviderError::retryable(
                            "batched lookup returned too few results",
                        ))
                    });
                    // A caller that went away (its reconcile was dropped) needs no answer.
                    let _ = tx.send(r);
                }
            }
        }
        rx.await
            .unwrap_or_else(|_| Err(ProviderError::retryable("batched lookup was abandoned")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(start_paused = true)]
    async fn concurrent_callers_share_batches_of_at_most_max() {
        let c = Arc::new(Coalescer::<u32, u32>::new(Duration::from_millis(10), 4));
        let calls = Arc::new(AtomicUsize::new(0));
        let mut tasks = vec![];
        for k in 0..10u32 {
            let c = c.clone();
            let calls = calls.clone();
            tasks.push(tokio::spawn(async move {
                c.call(k, |keys: Vec<u32>| {
                    let calls = calls.clone();
                    async move {
                        assert!(keys.len() <= 4, "{keys:?}");
                        calls.fetch_add(1, Ordering::SeqCst);
                        keys.into_iter().map(|k| Ok(k * 10)).collect()
                    }
                })
                .await
            }));
        }
        for (k, t) in tasks.into_iter().enumerate() {
            let v = t.await.expect("task").expect("result");
            assert_eq!(v, k as u32 * 10, "each caller gets its own answer");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 3, "10 keys in batches of 4");
        // Idle again: a lone caller still gets served.
        let v = c
            .call(7, |keys: Vec<u32>| async move {
                keys.into_iter().map(|k| Ok(k + 1)).collect()
            })
            .await
            .expect("served");
        assert_eq!(v, 8);
    }

    #[tokio::test(start_paused = true)]
    async fn an_abandoned_flusher_does_not_wedge_the_coalescer() {
        let c = Arc::new(Coalescer::<u32, u32>::new(Duration::from_millis(10), 20));
        let c1 = c.clone();
        // The flusher never finishes its call and is then dropped.
        let stuck = tokio::spawn(async move {
            c1.call(1, |_keys: Vec<u32>| {
                std::future::pending::<Vec<Result<u32, ProviderError>>>()
            })
            .await
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        stuck.abort();
        let _ = stuck.await;
        let v = c
            .call(2, |keys: Vec<u32>| async move {
                keys.into_iter().map(Ok).collect()
            })
            .await
            .expect("a new flusher takes over");
        assert_eq!(v, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn per_key_errors_stay_per_key() {
        let c = Arc::new(Coalescer::<u32, u32>::new(Duration::from_millis(5), 20));
        let exec = |keys: Vec<u32>| async move {
            keys.into_iter()
                .map(|k| {
                    if k % 2 == 0 {
                        Ok(k)
                    } else {
                        Err(ProviderError::retryable(format!("odd {k}")))
                    }
                })
                .collect::<Vec<_>>()
        };
        let (a, b) = tokio::join!(c.call(2, exec), c.call(3, exec));
        assert_eq!(a.expect("even"), 2);
        assert!(b.is_err_and(|e| e.to_string().contains("odd 3")));
    }
}
