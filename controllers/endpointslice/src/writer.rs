//! The one EndpointSlice writer, used by the EndpointSlice and the mirroring controllers: it
//! applies a plan's creates, updates and deletes (in that order, so ready endpoints never dip
//! mid-plan) and keeps the slice cache and the generation tracker in step with every write.
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
//! - With `interrupt`, the writer stops between two calls once the owner has changed again
//!   (where stopping leaves no endpoint the plan keeps ready missing), so the caller plans the
//!   rest from fresher state: under a saturated budget each write then carries every change
//!   up to its turn instead of the state when the plan began, and slices not yet written in
//!   this pass (`written`) go first, so an owner that keeps changing gets every slice written
//!   in turn.

use std::collections::HashSet;
use std::future::Future;

use tokio::time::Instant;

use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, PostParams, Preconditions};
use scm_runtime::ObjectKey;
use scm_runtime::client::with_priority;
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
        let mut written = Vec::new();
        for (i, (p, op)) in ordered.ops.iter().enumerate() {
            let t = Instant::now();
            match *op {
                Op::Create(c) => match with_priority(*p, api.create(ns, c)).await {
                    Ok(created) => {
                        self.tracker.update(key, &created);
                        metrics.wrote("create", t.elapsed());
                        written.extend(created.metadata.name.clone());
                        self.cache().write_through(key, created);
                    }
                    Err(e) if namespace_terminating(&e) => {
                        debug!(owner = %key, "namespace is being terminated; no slices created");
                        return Ok(Written::NamespaceTerminating);
                    }
                    Err(e) => return Err(Error::Kube(e)),
                },
                Op::Update(u) => {
                    let updated = with_priority(*p, api.replace(ns, u))
                        .await
                        .map_err(Error::Kube)?;
                    self.tracker.update(key, &updated);
                    metrics.wrote("update", t.elapsed());
                    written.extend(updated.metadata.name.clone());
                    self.cache().write_through(key, updated);
                }
                Op::Delete(d) => {
                    let name = d.metadata.name.as_deref().unwrap_or_default();
                    match with_priority(*p, api.delete(ns, name, d.metadata.uid.clone())).await {
                        Ok(()) => {}
                        Err(kube::Error::Api(s)) if s.code == 404 => {}
                        Err(e) => return Err(Error::Kube(e)),
                    }
                    self.tracker.expect_deletion(key, d);
                    metrics.wrote("delete", t.elapsed());
                    written.push(name.to_string());
                    self.cache().forget(key, name);
                }
            }
            let more = i + 1 < ordered.ops.len();
            if more && w.interrupt.is_some_and(|f| f()) && ordered.can_stop_after(i + 1) {
                return Ok(Written::Interrupted(written));
            }
        }
        let deferred = ordered.deferred;
        Ok(if deferred {
            Written::Deferred
        } else {
            Written::All
        })
    }
}

#[cfg(test)]
mod tests;
