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

use std::future::Future;

use tokio::time::Instant;

use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, PostParams, Preconditions};
use scm_runtime::ObjectKey;
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
}

/// How a plan ended when no call failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Written {
    /// Every write was made.
    All,
    /// A create was refused because the namespace is being terminated; the rest was skipped.
    NamespaceTerminating,
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
        for c in w.create.iter().filter(|_| create) {
            let t = Instant::now();
            match api.create(ns, c).await {
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
        for u in w.update {
            let t = Instant::now();
            let updated = api.replace(ns, u).await.map_err(Error::Kube)?;
            self.tracker.update(key, &updated);
            metrics.wrote("update", t.elapsed());
            self.cache().write_through(key, updated);
        }
        for d in w.delete {
            let name = d.metadata.name.as_deref().unwrap_or_default();
            let t = Instant::now();
            match api.delete(ns, name, d.metadata.uid.clone()).await {
                Ok(()) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(Error::Kube(e)),
            }
            self.tracker.expect_deletion(key, d);
            metrics.wrote("delete", t.elapsed());
            self.cache().forget(key, name);
        }
        Ok(Written::All)
    }
}

#[cfg(test)]
mod tests;
