//! The kube shell of the `service-cidr` controller: caches of ServiceCIDRs and IPAddresses,
//! and workers (leader only) that apply [`crate::servicecidr::plan`] with resourceVersion
//! preconditions.

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::networking::v1::{IPAddress, ServiceCIDR, ServiceCIDRStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use scm_runtime::{Backoff, ControllerContext, ReconcileError, Requeue, WorkQueue, WorkerConfig};
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
    cidrs: Store<ServiceCIDR>,
    ips: Store<IPAddress>,
}

/// Runs `service-cidr` until `ctx.shutdown` is cancelled.
pub async fn run(ctx: ControllerContext, config: ServiceCidrConfig) -> Result<(), CidrError> {
    let queue: WorkQueue<String> = WorkQueue::new(Backoff::default());
    let (cidr_reader, cidr_writer) = reflector::store::<ServiceCIDR>();
    let (ip_reader, ip_writer) = reflector::store::<IPAddress>();
    let cidr_stream = reflector::reflector(
        cidr_writer,
        watcher(
            Api::<ServiceCIDR>::all(ctx.client.clone()),
            watcher::Config::default(),
        ),
    )
    .default_backoff();
    let ip_stream = reflector::reflector(
        ip_writer,
        watcher(
            Api::<IPAddress>::all(ctx.client.clone()),
            watcher::Config::default(),
        ),
    )
    .default_backoff();
    let mut tasks = tokio::task::JoinSet::new();
    {
        let q = queue.clone();
        tasks.spawn(async move {
            let mut s = std::pin::pin!(cidr_stream);
            while let Some(ev) = s.next().await {
                match ev {
                    Ok(
                        watcher::Event::Apply(o)
                        | watcher::Event::InitApply(o)
                        | watcher::Event::Delete(o),
                    ) => {
                        if let Some(n) = o.metadata.name {
                            q.add(n);
                        }
                    }
                    Ok(_) => {}
                    Err(e) => warn!(error = %e, "servicecidr watch error"),
                }
            }
        });
    }
    {
        let q = queue.clone();
        let cidrs = cidr_reader.clone();
        tasks.spawn(async move {
            let mut s = std::pin::pin!(ip_stream);
            while let Some(ev) = s.next().await {
                match ev {
                    // An IPAddress going away may unblock a terminating ServiceCIDR.
                    Ok(watcher::Event::Delete(_) | watcher::Event::InitDone) => {
                        for c in cidrs.state() {
                            if c.metadata.deletion_timestamp.is_some()
                                && let Some(n) = c.metadata.name.clone()
                            {
                                q.add(n);
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(e) => warn!(error = %e, "ipaddress watch error"),
                }
            }
        });
    }
    let synced = async {
        cidr_reader.wait_until_ready().await.is_ok() && ip_reader.wait_until_ready().await.is_ok()
    };
    tokio::select! {
        _ = ctx.shutdown.cancelled() => { tasks.abort_all(); return Ok(()) }
        ok = synced => if !ok { tasks.abort_all(); return Ok(()) },
    }
    ctx.ready.mark_ready();
    info!(controller = %ctx.name, "caches synced");
    let shared = Arc::new(Shared {
        cidrs: cidr_reader,
        ips: ip_reader,
    });
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
    tasks.abort_all();
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

async fn reconcile(
    ctx: &ControllerContext,
    shared: &Shared,
    name: String,
) -> Result<Requeue, CidrError> {
    let Some(obj) = shared.cidrs.get(&ObjectRef::new(&name)) else {
        return Ok(Requeue::Done);
    };
    let all_arc = shared.cidrs.state();
    let all: Vec<&ServiceCIDR> = all_arc.iter().map(|a| a.as_ref()).collect();
    let ips_arc = shared.ips.state();
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
            if set_ready {
                set_condition(
                    &api,
                    &current,
                    ready_condition("True", "", servicecidr::MESSAGE_READY),
                )
                .await?;
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
