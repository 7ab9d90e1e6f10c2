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

use std::collections::HashSet;
use std::future::Future;

use tokio::time::Instant;

use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, PostParams, Preconditions};
use scm_runtime::client::with_priority;
use scm_runtime::{ObjectKey, Priority};
use tracing::debug;

use crate::Error;
use crate::metrics::SliceMetrics;
use crate::slice_store::Slices;

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
}

/// The addresses of a slice's ready endpoints.
fn ready_addresses(s: &EndpointSlice) -> impl Iterator<Item = &str> {
    s.endpoints
        .iter()
        .flatten()
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
        .flat_map(|e| e.addresses.iter().map(String::as_str))
}

/// Which of a plan's writes traffic waits for, as (create, update, delete) priorities: an
/// update or delete that takes away a ready address no slice keeps ready after the plan (an
/// endpoint that stopped serving), and the creates of a Service that has no slice yet.
fn priorities(w: &SliceWrites<'_>) -> (Priority, Vec<Priority>, Vec<Priority>) {
    let Some(before) = w.before else {
        return (
            Priority::Ordinary,
            vec![Priority::Ordinary; w.update.len()],
            vec![Priority::Ordinary; w.delete.len()],
        );
    };
    let name = |s: &EndpointSlice| s.metadata.name.clone().unwrap_or_default();
    let touched: HashSet<String> = w.update.iter().chain(w.delete).map(name).collect();
    let ready_after: HashSet<&str> = w
        .create
        .iter()
        .chain(w.update)
        .chain(
            before
                .iter()
                .copied()
                .filter(|b| !touched.contains(&name(b))),
        )
        .flat_map(ready_addresses)
        .collect();
    let drops_ready = |s: &EndpointSlice| {
        if ready_addresses(s).any(|a| !ready_after.contains(a)) {
            Priority::Urgent
        } else {
            Priority::Ordinary
        }
    };
    let update = w
        .update
        .iter()
        .map(|u| {
            before
                .iter()
                .find(|b| b.metadata.name == u.metadata.name)
                .map_or(Priority::Ordinary, |b| drops_ready(b))
        })
        .collect();
    let delete = w.delete.iter().map(drops_ready).collect();
    let create = if before.is_empty() {
        Priority::Urgent
    } else {
        Priority::Ordinary
    };
    (create, update, delete)
}

/// How a plan ended when no call failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Written {
    /// Every write was made.
    All,
    /// A create was refused because the namespace is being terminated; the rest was skipped.
    NamespaceTerminating,
    /// Only the urgent writes were made (`defer_ordinary`); the owner needs another sync.
    Deferred,
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
        let (create_p, update_p, delete_p) = priorities(&w);
        let urgent = |p: &Priority| *p == Priority::Urgent;
        let creates_ordinary = create && !w.create.is_empty() && !urgent(&create_p);
        let mixed = update_p.iter().chain(&delete_p).any(urgent)
            && (creates_ordinary || !update_p.iter().chain(&delete_p).all(urgent));
        // Urgent updates and deletes only take away addresses no slice keeps ready, so making
        // them without the plan's creates cannot make a ready endpoint dip.
        let deferred = w.defer_ordinary && mixed;
        let mut updates: Vec<(Priority, &EndpointSlice)> =
            update_p.into_iter().zip(w.update).collect();
        let mut deletes: Vec<(Priority, &EndpointSlice)> =
            delete_p.into_iter().zip(w.delete).collect();
        if deferred {
            updates.retain(|(p, _)| urgent(p));
            deletes.retain(|(p, _)| urgent(p));
        }
        for c in w.create.iter().filter(|_| create && !deferred) {
            let t = Instant::now();
            match with_priority(create_p, api.create(ns, c)).await {
                Ok(created) => {
                    self.tracker.update(key, &created);
                    metrics.wrote("create", t.elapsed());
                    self.cache().write_through(key, created);
                }
                Err(e) if namespace_terminating(&e) => {
                    debug!(owner = %key, "namespace is being terminated; no slices created");
                    return Ok(Written::NamespaceTerminating);
                }
                Err(e) => return Err(Error::Kube(e)),
            }
        }
        // Urgent updates first (stable): the rest of the plan may wait behind the budget.
        updates.sort_by_key(|(p, _)| std::cmp::Reverse(*p));
        for (p, u) in updates {
            let t = Instant::now();
            let updated = with_priority(p, api.replace(ns, u))
                .await
                .map_err(Error::Kube)?;
            self.tracker.update(key, &updated);
            metrics.wrote("update", t.elapsed());
            self.cache().write_through(key, updated);
        }
        for (p, d) in deletes {
            let name = d.metadata.name.as_deref().unwrap_or_default();
            let t = Instant::now();
            match with_priority(p, api.delete(ns, name, d.metadata.uid.clone())).await {
                Ok(()) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(Error::Kube(e)),
            }
            self.tracker.expect_deletion(key, d);
            metrics.wrote("delete", t.elapsed());
            self.cache().forget(key, name);
        }
        Ok(if deferred {
            Written::Deferred
        } else {
            Written::All
        })
    }
}

#[cfg(test)]
mod tests;
