//! The one EndpointSlice writer, used by the EndpointSlice and the mirroring controllers: it
//! applies a plan's calls in waves (creates; updates; updates that move an endpoint another
//! slice gains, one at a time; deletes), up to [`MAX_IN_FLIGHT`] calls of a wave at once, so
//! ready endpoints never dip mid-plan, and keeps the slice cache and the generation tracker in
//! step with every write.
//!
//! - A create answered 403 because the namespace is being terminated ends the plan quietly:
//!   nothing can be created there any more and the namespace's deletion removes the rest.
//! - Updates are replaces carrying the resourceVersion the plan read: a concurrent change is a
//!   409 and the key is retried against fresh state.
//! - Deletes carry the uid the plan read as a precondition, so a slice deleted and recreated
//!   under the same name by someone else is never deleted by a stale plan; NotFound is done.
//! - Under a saturated client budget, a write that stops traffic to an endpoint that is no
//!   longer ready (or the first slice of a Service) takes its token before ordinary requests
//!   ([`scm_runtime::client::with_priority`]), and such updates go before the plan's others.
//!   With `defer_ordinary`, a plan holding such writes makes only them and leaves the rest to
//!   the next sync, so the owner's key is free for the next urgent change instead of held
//!   while writes that only add capacity wait for the budget.
//! - With `interrupt`, the writer starts no further call once the owner has changed again and
//!   stops when those in flight are done (where stopping leaves no endpoint the plan keeps
//!   ready missing; else it goes on), so the caller plans the
//!   rest from fresher state: under a saturated budget each write then carries every change
//!   up to its turn instead of the state when the plan began, and slices not yet written in
//!   this pass (`written`) go first, so an owner that keeps changing gets every slice written
//!   in turn.

use std::collections::HashSet;
use std::future::Future;
use std::time::{Duration, UNIX_EPOCH};

use tokio::time::Instant;

use futures::stream::{FuturesUnordered, StreamExt};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, PostParams, Preconditions};
use scm_runtime::client::{Class, with_class};
use scm_runtime::{ObjectKey, Priority};
use tracing::debug;

use crate::Error;
use crate::metrics::SliceMetrics;
use crate::slice_store::Slices;

mod order;
use order::{Op, Ordered};

/// The three calls the writer makes. `kube::Client` is the real one; tests record them.
pub trait SliceApi {
    /// Creates a slice (from `generateName`).
    fn create(
        &self,
        namespace: &str,
        slice: &EndpointSlice,
    ) -> impl Future<Output = Result<EndpointSlice, kube::Error>> + Send;
    /// Replaces a slice, carrying the resourceVersion it was read at.
    fn replace(
        &self,
        namespace: &str,
        slice: &EndpointSlice,
    ) -> impl Future<Output = Result<EndpointSlice, kube::Error>> + Send;
    /// Deletes a slice by name if it still has this uid.
    fn delete(
        &self,
        namespace: &str,
        name: &str,
        uid: Option<String>,
    ) -> impl Future<Output = Result<(), kube::Error>> + Send;
}

impl SliceApi for kube::Client {
    async fn create(&self, ns: &str, s: &EndpointSlice) -> Result<EndpointSlice, kube::Error> {
        Api::namespaced(self.clone(), ns)
            .create(&PostParams::default(), s)
            .await
    }

    async fn replace(&self, ns: &str, s: &EndpointSlice) -> Result<EndpointSlice, kube::Error> {
        let name = s.metadata.name.as_deref().unwrap_or_default();
        Api::namespaced(self.clone(), ns)
            .replace(name, &PostParams::default(), s)
            .await
    }

    async fn delete(&self, ns: &str, name: &str, uid: Option<String>) -> Result<(), kube::Error> {
        let dp = DeleteParams::default().preconditions(Preconditions {
            uid,
            resource_version: None,
        });
        Api::<EndpointSlice>::namespaced(self.clone(), ns)
            .delete(name, &dp)
            .await
            .map(|_| ())
    }
}

/// Says whether what a plan was made from is out of date (the owner changed since).
pub type Interrupt<'a> = &'a (dyn Fn() -> bool + Send + Sync);

/// When a pod (by name) last changed, in seconds since the epoch, if known.
pub type PodAge<'a> = &'a (dyn Fn(&str) -> Option<i64> + Send + Sync);

/// The writes of one plan.
#[derive(Clone, Copy, Default)]
pub struct SliceWrites<'a> {
    /// Slices to create (skipped when the owner is being deleted).
    pub create: &'a [EndpointSlice],
    /// Slices to replace.
    pub update: &'a [EndpointSlice],
    /// Slices to delete.
    pub delete: &'a [EndpointSlice],
    /// The owner's slices the plan was made from, when known: which writes stop traffic to an
    /// endpoint that is no longer ready is judged against them (unknown: every write ordinary).
    pub before: Option<&'a [&'a EndpointSlice]>,
    /// Make only the urgent writes when there are any, and say [`Written::Deferred`].
    pub defer_ordinary: bool,
    /// Asked after each call while others remain: when true (and stopping is safe), the
    /// writer stops and says [`Written::Interrupted`].
    pub interrupt: Option<Interrupt<'a>>,
    /// Slices (by name) already written in this pass: their updates go after the others'.
    pub written: Option<&'a HashSet<String>>,
    /// When a pod (by name) last changed, in seconds since the epoch: updates carrying older
    /// changes go first.
    pub age: Option<PodAge<'a>>,
}

/// How a plan ended when no call failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Written {
    /// Every write was made.
    All,
    /// A create was refused because the namespace is being terminated; the rest was skipped.
    NamespaceTerminating,
    /// Only the urgent writes were made (`defer_ordinary`); the owner needs another sync.
    Deferred,
    /// The owner changed while the plan was being written: the writer stopped after the
    /// slices named here (created ones by the names the server gave them).
    Interrupted(Vec<String>),
}

fn namespace_terminating(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 403 && s.message.contains("being terminated"))
}

/// The most calls of one plan in flight at once. One: measured with 8 (latency bench, default
/// budget), a large Service's calls waited for tokens with bodies planned before the wait, so
/// more of them had to be made again (664 writes against 616) and its not-ready p99 grew
/// (31 s against 27 s); it stays a bound so that can be measured again.
pub const MAX_IN_FLIGHT: usize = 1;

/// What a call returned: the slice as written, or nothing for a delete.
type CallResult = Result<Option<EndpointSlice>, kube::Error>;

/// Makes call `i` in its token-bucket class: its priority, and when the oldest change it
/// carries happened (`age`, seconds since the epoch), which orders urgent calls.
async fn call(
    api: &impl SliceApi,
    ns: &str,
    i: usize,
    (p, op): (Priority, Op<'_>),
    age: Option<i64>,
) -> (usize, Instant, CallResult) {
    let t = Instant::now();
    let class = Class {
        priority: p,
        since: age
            .and_then(|s| u64::try_from(s).ok())
            .map(|s| UNIX_EPOCH + Duration::from_secs(s)),
        ..p.into()
    };
    let r = match op {
        Op::Create(c) => with_class(class, api.create(ns, c)).await.map(Some),
        Op::Update(u) => with_class(class, api.replace(ns, u)).await.map(Some),
        Op::Delete(d) => {
            let name = d.metadata.name.as_deref().unwrap_or_default();
            match with_class(class, api.delete(ns, name, d.metadata.uid.clone())).await {
                Ok(()) => Ok(None),
                Err(kube::Error::Api(s)) if s.code == 404 => Ok(None),
                Err(e) => Err(e),
            }
        }
    };
    (i, t, r)
}

impl Slices {
    /// Applies `w` for the Service (or Endpoints) `key`. `create` is false while the owner is
    /// being deleted: nothing new is made for it, but updates and deletes still go through.
    pub async fn write(
        &self,
        api: &impl SliceApi,
        key: &ObjectKey,
        w: SliceWrites<'_>,
        create: bool,
        metrics: &SliceMetrics,
    ) -> Result<Written, Error> {
        let ns = key.namespace.as_str();
        let ordered = Ordered::new(&w, create);
        let n = ordered.ops.len();
        let mut done = vec![false; n];
        let (mut next, mut written) = (0, Vec::new());
        // Set when no further call may start: the plan is interrupted, failed, or the
        // namespace is being terminated; the calls in flight are still seen through.
        let mut halt: Option<Result<Written, Error>> = None;
        let mut interrupted = false;
        let mut in_flight = FuturesUnordered::new();
        loop {
            while halt.is_none()
                && !interrupted
                && next < n
                && in_flight.len() < MAX_IN_FLIGHT
                && ordered.may_start(next, &done, in_flight.len())
            {
                in_flight.push(call(api, ns, next, ordered.ops[next], ordered.ages[next]));
                next += 1;
            }
            let Some((i, t, r)) = in_flight.next().await else {
                if interrupted && halt.is_none() {
                    if ordered.can_stop(&done) {
                        return Ok(Written::Interrupted(written));
                    }
                    // Not here: an endpoint the plan keeps would be in no slice. Go on.
                    interrupted = false;
                    continue;
                }
                break;
            };
            let op = ordered.ops[i].1;
            match (op, r) {
                (Op::Create(_), Err(e)) if namespace_terminating(&e) => {
                    debug!(owner = %key, "namespace is being terminated; no slices created");
                    halt.get_or_insert(Ok(Written::NamespaceTerminating));
                    continue;
                }
                (_, Err(e)) => {
                    halt.get_or_insert(Err(Error::Kube(e)));
                    continue;
                }
                (Op::Delete(d), Ok(_)) => {
                    let name = d.metadata.name.as_deref().unwrap_or_default();
                    self.tracker.expect_deletion(key, d);
                    metrics.wrote("delete", t.elapsed());
                    written.push(name.to_string());
                    self.cache().forget(key, name);
                }
                (_, Ok(slice)) => {
                    let Some(slice) = slice else { continue };
                    let verb = if matches!(op, Op::Create(_)) {
                        "create"
                    } else {
                        "update"
                    };
                    self.tracker.update(key, &slice);
                    metrics.wrote(verb, t.elapsed());
                    written.extend(slice.metadata.name.clone());
                    self.cache().write_through(key, slice);
                }
            }
            done[i] = true;
            if next < n && !interrupted && w.interrupt.is_some_and(|f| f()) {
                interrupted = true;
            }
        }
        if let Some(end) = halt {
            return end;
        }
        Ok(if ordered.deferred {
            Written::Deferred
        } else {
            Written::All
        })
    }
}

#[cfg(test)]
mod tests;
