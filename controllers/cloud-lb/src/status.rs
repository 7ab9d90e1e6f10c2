//! The controller's two writes to a Service, the finalizer and `status.loadBalancer`, through
//! one conditional-patch-with-recompute loop: every patch carries the resourceVersion it was
//! computed from, and a 409 means re-read, recompute, write again.

use k8s_openapi::api::core::v1::{LoadBalancerStatus, Service};
use kube::api::{Api, Patch, PatchParams};
use tracing::debug;

use crate::provider::ProviderError;
use crate::{Error, core};

/// How many times a write is recomputed after a conflict before the reconcile fails (and is
/// retried with backoff).
const ATTEMPTS: usize = 3;

pub(crate) fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

pub(crate) fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

/// A merge patch conditional on the copy's resourceVersion, to the Service or (with `status`)
/// its status subresource. `build` computes the patch from the current copy, or `None` when
/// nothing needs writing; on a conflict the Service is read again and the patch recomputed
/// from the newer copy (what we write depends only on the fields `build` reads).
async fn patch_recomputing(
    client: &kube::Client,
    mut svc: Service,
    what: &str,
    status: bool,
    build: impl Fn(&Service) -> Option<serde_json::Value>,
) -> Result<Service, Error> {
    let ns = svc.metadata.namespace.clone().unwrap_or_default();
    let name = svc.metadata.name.clone().unwrap_or_default();
    let api: Api<Service> = Api::namespaced(client.clone(), &ns);
    for _ in 0..ATTEMPTS {
        let Some(mut patch) = build(&svc) else {
            return Ok(svc);
        };
        patch["metadata"]["resourceVersion"] = serde_json::json!(svc.metadata.resource_version);
        let pp = PatchParams::default();
        let res = if status {
            api.patch_status(&name, &pp, &Patch::Merge(&patch)).await
        } else {
            api.patch(&name, &pp, &Patch::Merge(&patch)).await
        };
        match res {
            Ok(s) => return Ok(s),
            Err(e) if is_conflict(&e) => {
                debug!(namespace = %ns, name, write = what, "conflict: re-reading");
                svc = api.get(&name).await?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(Error::Provider(ProviderError::retryable(format!(
        "{what} write kept conflicting"
    ))))
}

/// Applies `edit` to the finalizer list (the finalizer list is all this write depends on).
async fn patch_finalizers(
    client: &kube::Client,
    svc: Service,
    edit: fn(&Service) -> Option<Vec<String>>,
) -> Result<Service, Error> {
    patch_recomputing(client, svc, "finalizer", false, |s| {
        edit(s).map(|f| serde_json::json!({"metadata": {"finalizers": f}}))
    })
    .await
}

/// Puts our finalizer on the Service (before the first cloud call, so deletion waits for us).
pub(crate) async fn add_finalizer(client: &kube::Client, svc: Service) -> Result<Service, Error> {
    patch_finalizers(client, svc, core::with_finalizer).await
}

/// Takes our finalizer off; a Service already gone is fine.
pub(crate) async fn remove_finalizer(client: &kube::Client, svc: Service) -> Result<(), Error> {
    match patch_finalizers(client, svc, core::without_finalizer).await {
        Ok(_) => Ok(()),
        Err(Error::Kube(e)) if is_not_found(&e) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Writes `status.loadBalancer` through the status subresource if it differs (the status is
/// ours alone to decide, so a conflict only means re-reading).
pub(crate) async fn write_status(
    client: &kube::Client,
    svc: Service,
    status: &LoadBalancerStatus,
) -> Result<Service, Error> {
    patch_recomputing(client, svc, "status", true, |s| {
        if !core::status_differs(s, status) {
            return None;
        }
        let ingress = match status.ingress.as_ref() {
            Some(i) if !i.is_empty() => serde_json::to_value(i).unwrap_or(serde_json::Value::Null),
            _ => serde_json::Value::Null,
        };
        Some(serde_json::json!({"status": {"loadBalancer": {"ingress": ingress}}}))
    })
    .await
}
