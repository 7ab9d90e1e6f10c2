//! Durable conditions on a Service (`status.conditions`), written by server-side apply on the
//! status subresource with one field manager per controller
//! (`service-controller-manager/<controller>`), so each controller owns only its own condition
//! types: `status.conditions` is a list-map keyed by `type`, and the API server merges the
//! entries of every manager. [`transition`] is the pure part (what to apply, or nothing at
//! steady state); [`apply`] is the one write, shared by every controller.
//!
//! A write happens only on a transition: a condition of ours appears, disappears, or changes
//! its status, reason or message, or the Service's generation moved past the condition's
//! `observedGeneration` (so `kubectl wait --for=condition` never reads a stale one).
//! `lastTransitionTime` moves only when the status flips. Removing all our conditions is
//! applying an empty set with our manager: server-side apply drops the fields a manager
//! stops applying.

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use tracing::debug;

use crate::ControllerContext;
use crate::metrics::ControllerLabel;

/// The prefix of every condition writer's field manager; the controller's name follows it.
pub const FIELD_MANAGER_PREFIX: &str = "service-controller-manager/";

/// How many times an apply is recomputed after a conflict before the write fails.
const ATTEMPTS: usize = 3;

/// The field manager of `controller`'s conditions.
pub fn field_manager(controller: &str) -> String {
    format!("{FIELD_MANAGER_PREFIX}{controller}")
}

/// One condition a controller wants on a Service (without the times the write fills in).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired {
    /// `type`, one of the controller's own types.
    pub type_: &'static str,
    /// `True` when `ok`, else `False`.
    pub ok: bool,
    /// CamelCase reason.
    pub reason: &'static str,
    /// Human-readable detail.
    pub message: String,
}

impl Desired {
    /// A `True` condition.
    pub fn ok(type_: &'static str, reason: &'static str, message: impl Into<String>) -> Self {
        Desired {
            type_,
            ok: true,
            reason,
            message: message.into(),
        }
    }

    /// A `False` condition.
    pub fn failed(type_: &'static str, reason: &'static str, message: impl Into<String>) -> Self {
        Desired {
            type_,
            ok: false,
            reason,
            message: message.into(),
        }
    }

    fn status(&self) -> &'static str {
        if self.ok { "True" } else { "False" }
    }
}

/// The conditions of `owned` types a controller should hold on `svc` after this reconcile:
/// `desired` (empty = none of ours, which removes them). `None` when the Service already shows
/// exactly that (steady state: no write); else the full set to apply, each keeping its
/// `lastTransitionTime` unless its status flipped.
pub fn transition(
    svc: &Service,
    owned: &[&str],
    desired: &[Desired],
    now: Timestamp,
) -> Option<Vec<Condition>> {
    let current: Vec<&Condition> = svc
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .filter(|c| owned.contains(&c.type_.as_str()))
        .collect();
    let generation = svc.metadata.generation;
    let find = |t: &str| current.iter().find(|c| c.type_ == t).copied();
    let unchanged = current.len() == desired.len()
        && desired.iter().all(|d| {
            find(d.type_).is_some_and(|c| {
                c.status == d.status()
                    && c.reason == d.reason
                    && c.message == d.message
                    && (generation.is_none() || c.observed_generation == generation)
            })
        });
    if unchanged {
        return None;
    }
    Some(
        desired
            .iter()
            .map(|d| Condition {
                type_: d.type_.to_string(),
                status: d.status().to_string(),
                reason: d.reason.to_string(),
                message: d.message.clone(),
                observed_generation: generation,
                last_transition_time: match find(d.type_) {
                    Some(c) if c.status == d.status() => c.last_transition_time.clone(),
                    _ => Time(now),
                },
            })
            .collect(),
    )
}

/// Brings the conditions of `owned` types that `ctx`'s controller holds on `svc` to `desired`:
/// nothing when the Service already shows them, else one server-side apply to the status
/// subresource with the controller's field manager (counted in
/// `service_controller_manager_condition_writes_total`), conditional on the resourceVersion it was computed from (a 409
/// re-reads the Service and recomputes; a Service gone is fine). Returns the Service as
/// written when it wrote (so a following write can be conditional on it).
pub async fn apply(
    ctx: &ControllerContext,
    svc: &Service,
    owned: &[&str],
    desired: &[Desired],
) -> Result<Option<Service>, kube::Error> {
    let ns = svc.metadata.namespace.clone().unwrap_or_default();
    let name = svc.metadata.name.clone().unwrap_or_default();
    let controller = ctx.name.as_str();
    let api: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
    let pp = PatchParams::apply(&field_manager(controller)).force();
    let mut current = std::borrow::Cow::Borrowed(svc);
    for _ in 0..ATTEMPTS {
        let Some(conditions) = transition(&current, owned, desired, Timestamp::now()) else {
            return Ok(None);
        };
        let body = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": name,
                "namespace": ns,
                "resourceVersion": current.metadata.resource_version,
            },
            "status": {"conditions": conditions},
        });
        ctx.metrics
            .condition_writes
            .get_or_create(&ControllerLabel {
                controller: controller.to_string(),
            })
            .inc();
        match api.patch_status(&name, &pp, &Patch::Apply(&body)).await {
            Ok(s) => return Ok(Some(s)),
            Err(kube::Error::Api(s)) if s.code == 404 => return Ok(None),
            Err(kube::Error::Api(s)) if s.code == 409 => {
                debug!(namespace = %ns, name, controller, "condition apply conflicted: re-reading");
                match api.get_opt(&name).await? {
                    Some(s) => current = std::borrow::Cow::Owned(s),
                    None => return Ok(None),
                }
            }
            Err(e) => return Err(e),
        }
    }
    Err(kube::Error::Api(
        kube::core::Status::failure(
            &format!("conditions of {ns}/{name} kept conflicting"),
            "Conflict",
        )
        .with_code(409)
        .boxed(),
    ))
}

mod writer;
pub use writer::Writer;

#[cfg(test)]
mod tests;
