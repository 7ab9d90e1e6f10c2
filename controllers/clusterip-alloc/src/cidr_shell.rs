//! The kube shell of the `service-cidr` controller: subscriptions to the process's ServiceCIDR
//! and IPAddress informers, and workers (leader only) that apply [`crate::servicecidr::plan`] with resourceVersion
//! preconditions.
//!
//! Events, as upstream's `servicecidrs` controller (v1.37) emits them: only a Warning
//! `KubernetesServiceCIDRError` ("The ServiceCIDR Status can not be set to Ready=True") on the
//! ServiceCIDR when writing its Ready=True condition fails. Upstream writes that condition with
//! a server-side apply, which never conflicts; we replace the status with a resourceVersion
//! precondition, so a 409 (a stale cache, retried at once) is not such a failure and has no
//! Event. Every other failure has one (repeats fold into one Event's series).

use std::sync::Arc;

use k8s_openapi::api::networking::v1::{IPAddress, ServiceCIDR, ServiceCIDRStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::Resource;
use kube::api::{Api, PostParams};
use scm_runtime::{
    Backoff, Change, ControllerContext, Informer, ObjectKey, ReconcileError, Requeue, WorkQueue,
    WorkerConfig,
};
use tracing::{info, warn};

use crate::servicecidr::{self, CidrPlan, FINALIZER};

/// Configuration of the `service-cidr` controller.
#[derive(Clone, Debug)]
pub struct ServiceCidrConfig {
    /// `--concurrent-service-cidr-syncs`: ServiceCIDRs reconciled at once (default 5).
    pub concurrent_syncs: usize,
}

impl Default for ServiceCidrConfig {
    fn default() -> Self {
        ServiceCidrConfig {
            concurrent_syncs: 5,
        }
    }
}

/// Errors of the controller.
#[derive(Debug, thiserror::Error)]
pub enum CidrError {
    /// An API call failed (a 409 included: the key is retried from a fresh cache).
    #[error("kube API: {0}")]
    Kube(#[from] kube::Error),
}

impl ReconcileError for CidrError {
    fn metric_label(&self) -> &'static str {
        match self {
            CidrError::Kube(kube::Error::Api(s)) if s.code == 409 => "conflict",
            CidrError::Kube(_) => "kube",
        }
    }
}

struct Shared {
    cidrs: Informer<ServiceCIDR>,
    ips: Informer<IPAddress>,
}

/// Queues every terminating ServiceCIDR: an IPAddress going away may unblock its deletion.
fn queue_terminating(cidrs: &Informer<ServiceCIDR>, queue: &WorkQueue<String>) {
    for c in cidrs.list() {
        if c.metadata.deletion_timestamp.is_some()
            && let Some(n) = c.metadata.name.clone()
        {
            queue.add(n);
        }
    }
}

/// Runs `service-cidr` until `ctx.shutdown` is cancelled.
pub async fn run(ctx: ControllerContext, config: ServiceCidrConfig) -> Result<(), CidrError> {
    let queue: WorkQueue<String> = WorkQueue::new(Backoff::default());
    let cidrs = ctx.informers.service_cidrs();
    let ips = ctx.informers.ip_addresses();
    {
        let q = queue.clone();
        cidrs.subscribe(move |c| {
            // A relist: every listed object is looked at again; one deleted while the watch was
            // down needs nothing (its finalizer was ours to remove only while it existed).
            let changed = match c {
                Change::Apply(o) | Change::Delete(o) => std::slice::from_ref(o),
                Change::Relisted(list) => list.as_slice(),
            };
            for n in changed.iter().filter_map(|o| o.metadata.name.clone()) {
                q.add(n);
            }
        });
    }
    {
        let q = queue.clone();
        let cidrs = cidrs.clone();
        ips.subscribe(move |c| {
            if matches!(c, Change::Delete(_) | Change::Relisted(_)) {
                queue_terminating(&cidrs, &q);
            }
        });
    }
    if !scm_runtime::wait_for_sync(&ctx, || cidrs.is_synced() && ips.is_synced()).await {
        return Ok(());
    }
    let shared = Arc::new(Shared { cidrs, ips });
    let rctx = ctx.clone();
    let cfg = WorkerConfig {
        concurrency: config.concurrent_syncs.max(1),
        ..Default::default()
    };
    scm_runtime::run_workers(&ctx, queue.clone(), cfg, move |name: String| {
        let ctx = rctx.clone();
        let shared = shared.clone();
        async move { reconcile(&ctx, &shared, name).await }
    })
    .await;
    queue.shut_down();
    Ok(())
}

fn ready_condition(status: &str, reason: &str, message: &str) -> Condition {
    Condition {
        type_: servicecidr::CONDITION_READY.into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        last_transition_time: Time(Timestamp::now()),
        observed_generation: None,
    }
}

async fn set_condition(
    api: &Api<ServiceCIDR>,
    obj: &ServiceCIDR,
    cond: Condition,
) -> Result<(), CidrError> {
    let mut o = obj.clone();
    let status = o.status.get_or_insert_with(ServiceCIDRStatus::default);
    let conds = status.conditions.get_or_insert_with(Vec::new);
    conds.retain(|c| c.type_ != cond.type_);
    conds.push(cond);
    let name = o.metadata.name.clone().unwrap_or_default();
    // The body carries metadata.resourceVersion: a stale write gets 409 and is retried.
    api.replace_status(&name, &PostParams::default(), &o)
        .await?;
    Ok(())
}

fn is_conflict(e: &CidrError) -> bool {
    matches!(e, CidrError::Kube(kube::Error::Api(s)) if s.code == 409)
}

async fn reconcile(
    ctx: &ControllerContext,
    shared: &Shared,
    name: String,
) -> Result<Requeue, CidrError> {
    let Some(obj) = shared.cidrs.get(&ObjectKey::new("", name.as_str())) else {
        return Ok(Requeue::Done);
    };
    let all_arc = shared.cidrs.list();
    let all: Vec<&ServiceCIDR> = all_arc.iter().map(|a| a.as_ref()).collect();
    let ips_arc = shared.ips.list();
    let ips: Vec<&IPAddress> = ips_arc.iter().map(|a| a.as_ref()).collect();
    let api: Api<ServiceCIDR> = Api::all(ctx.client.clone());
    match servicecidr::plan(&obj, &all, &ips, Timestamp::now()) {
        CidrPlan::Nothing => Ok(Requeue::Done),
        CidrPlan::Live {
            add_finalizer,
            set_ready,
        } => {
            let mut current = (*obj).clone();
            if add_finalizer {
                current
                    .metadata
                    .finalizers
                    .get_or_insert_with(Vec::new)
                    .push(FINALIZER.to_string());
                // The body carries metadata.resourceVersion: a stale write gets 409.
                current = api.replace(&name, &PostParams::default(), &current).await?;
                info!(servicecidr = %name, "added finalizer");
            }
            if set_ready
                && let Err(e) = set_condition(
                    &api,
                    &current,
                    ready_condition("True", "", servicecidr::MESSAGE_READY),
                )
                .await
            {
                if !is_conflict(&e) {
                    warn!(servicecidr = %name, error = %e, "setting Ready=True failed");
                    ctx.events
                        .warning(
                            &current.object_ref(&()),
                            servicecidr::REASON_STATUS_ERROR,
                            "UpdateStatus",
                            servicecidr::MESSAGE_STATUS_ERROR.into(),
                        )
                        .await;
                }
                return Err(e);
            }
            Ok(Requeue::Done)
        }
        CidrPlan::Blocked {
            set_condition: needed,
        } => {
            if needed {
                set_condition(
                    &api,
                    &obj,
                    ready_condition(
                        "False",
                        servicecidr::REASON_TERMINATING,
                        servicecidr::MESSAGE_TERMINATING,
                    ),
                )
                .await?;
                info!(servicecidr = %name, "deletion blocked by IPAddresses");
            }
            Ok(Requeue::Done)
        }
        CidrPlan::Release { after } if !after.is_zero() => Ok(Requeue::After(after)),
        CidrPlan::Release { .. } => {
            let mut o = (*obj).clone();
            o.metadata
                .finalizers
                .get_or_insert_with(Vec::new)
                .retain(|f| f != FINALIZER);
            // Precondition on resourceVersion (in the body): a stale write gets 409.
            match api.replace(&name, &PostParams::default(), &o).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
            info!(servicecidr = %name, "removed finalizer");
            Ok(Requeue::Done)
        }
    }
}
