//! Condition writes off a reconcile's path: the latest wanted set per Service, applied by one
//! task in the client's background class (after every urgent and ordinary request waiting,
//! or once it has waited 30 s). A wish for a key not yet written replaces the older
//! one (only the newest matters), and one task writes keys in turn, so an older set can never
//! land after a newer one. The reconcile that computed the set does not wait for it, so its
//! own writes (an EndpointSlice traffic waits for) are not held back by it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::jiff::Timestamp;
use tokio::sync::Notify;
use tracing::warn;

use super::{Desired, apply, transition};
use crate::client::{Class, with_class};
use crate::{ControllerContext, ObjectKey};

/// What is wanted for one Service, and how many writes of it failed.
type Wish = (Service, Vec<Desired>, u32);

/// How many times a failed write is tried again (a second apart, then two, ...).
const RETRIES: u32 = 5;

#[derive(Default)]
struct Pending {
    order: VecDeque<ObjectKey>,
    wishes: HashMap<ObjectKey, Wish>,
}

/// A controller's queue of condition writes (see the module).
#[derive(Clone)]
pub struct Writer {
    pending: Arc<Mutex<Pending>>,
    notify: Arc<Notify>,
}

impl Writer {
    /// Starts the writing task of `ctx`'s controller for its `owned` types; it ends with
    /// `ctx.shutdown`.
    pub fn start(ctx: &ControllerContext, owned: &'static [&'static str]) -> Writer {
        let w = Writer {
            pending: Arc::default(),
            notify: Arc::new(Notify::new()),
        };
        let (task, ctx) = (w.clone(), ctx.clone());
        tokio::spawn(async move { task.run(ctx, owned).await });
        w
    }

    /// Wants `desired` of this writer's types on `svc` (empty: none). Nothing is queued when
    /// `svc` already shows it and no older wish for it is pending.
    pub fn set(&self, svc: &Service, owned: &[&str], desired: Vec<Desired>) {
        let key = ObjectKey::of(svc);
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if !p.wishes.contains_key(&key)
            && transition(svc, owned, &desired, Timestamp::now()).is_none()
        {
            return;
        }
        if p.wishes
            .insert(key.clone(), (svc.clone(), desired, 0))
            .is_none()
        {
            p.order.push_back(key);
        }
        drop(p);
        self.notify.notify_one();
    }

    fn next(&self) -> Option<(ObjectKey, Wish)> {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let key = p.order.pop_front()?;
        let wish = p.wishes.remove(&key)?;
        Some((key, wish))
    }

    async fn run(self, ctx: ControllerContext, owned: &'static [&'static str]) {
        loop {
            while let Some((key, (svc, desired, failed))) = self.next() {
                if ctx.shutdown.is_cancelled() {
                    return;
                }
                // Only the leader writes; a wish made while leading is dropped with the term
                // (the next leader's reconciles compute it again).
                if !ctx.leader.is_leader() {
                    continue;
                }
                // In the client's background class: a condition trails the writes it reports on
                // (a cold start's slices first), taking a token only when nothing else waits, or
                // after 30 s.
                let write = apply(&ctx, &svc, owned, &desired);
                if let Err(e) = with_class(Class::BACKGROUND, write).await {
                    warn!(service = %key, controller = %ctx.name, error = %e, "could not write the Service's conditions");
                    if failed < RETRIES {
                        tokio::time::sleep(std::time::Duration::from_secs(u64::from(failed) + 1))
                            .await;
                        // Again, unless a newer wish came meanwhile.
                        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
                        if !p.wishes.contains_key(&key) {
                            p.wishes.insert(key.clone(), (svc, desired, failed + 1));
                            p.order.push_back(key);
                        }
                    }
                }
            }
            tokio::select! {
                _ = self.notify.notified() => {}
                _ = ctx.shutdown.cancelled() => return,
            }
        }
    }
}
