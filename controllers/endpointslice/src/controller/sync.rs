//! One reconcile of one Service: snapshot the indexes, plan with the core, apply the plan.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use tracing::{debug, warn};

use scm_runtime::conditions::{self, Desired};
use scm_runtime::{ObjectKey, Requeue};

use super::{Shared, service_ref};
use crate::Error;
use crate::common::*;
use crate::metrics::{ChangedLabels, ControllerLabel};
use crate::slice_store::managed_by;
use crate::slices::trigger_time::{self, SeenTimes};
use crate::slices::{self, SliceInput, condition};
use crate::topology::{self, ZoneRatios};
use crate::writer::{Interrupt, SliceWrites, Written};

/// What a reconcile copies out of the caches (so no lock is held across awaits).
struct Snapshot {
    svc: Option<Arc<Service>>,
    pods: Vec<Arc<PodRecord>>,
    nodes: HashMap<String, Option<String>>,
    // Shared with the cache: the core borrows them, so a large Service's slices are not
    // copied for every reconcile.
    existing: Vec<Arc<EndpointSlice>>,
    zone_ratios: ZoneRatios,
    hints_populated: bool,
    seen: Option<Arc<SeenTimes>>,
}

fn snapshot(s: &Shared, key: &ObjectKey) -> Snapshot {
    let st = s.state();
    let svc = st.idx.services.get(key).cloned();
    let pods = svc
        .as_ref()
        .and_then(|svc| svc.spec.as_ref().and_then(|sp| sp.selector.clone()))
        .map(|sel| st.idx.pods_for(&key.namespace, &sel))
        .unwrap_or_default();
    let nodes = pods
        .iter()
        .filter_map(|p| p.node_name.as_deref())
        .filter_map(|n| st.nodes.get(n).map(|t| (n.to_string(), t.zone.clone())))
        .collect();
    let existing = s.slices.current(key);
    Snapshot {
        svc,
        pods,
        nodes,
        existing,
        zone_ratios: st.zone_ratios.clone(),
        hints_populated: st.hints_populated.contains(key),
        seen: st.trigger_times.seen(key),
    }
}

/// How one plan of a pass ended.
enum Step {
    /// The reconcile is over.
    Done(Requeue),
    /// The Service changed while its plan was being written; these slices were written.
    Interrupted(Vec<String>),
}

/// Plans and writes until the Service's slices match what it was when the last plan was made.
/// A plan is made again whenever the Service (or its pods) changed while the previous one was
/// being written: under a saturated client budget each write waits for its token, and a write
/// planned from state seconds old would have to be made again for the changes since. Slices
/// already written in this pass go last in each new plan; once a plan holds nothing else, the
/// rest waits for the next sync (the key is queued again, as it changed).
pub(super) async fn reconcile(s: Arc<Shared>, key: ObjectKey) -> Result<Requeue, Error> {
    let mut pass: HashSet<String> = HashSet::new();
    // Each plan of a pass writes at least one slice not written before in it; bound it anyway.
    let mut plans_left = MAX_PLANS_PER_PASS;
    loop {
        match sync_once(&s, &key, &pass, plans_left > 1).await? {
            Step::Done(r) => return Ok(r),
            Step::Interrupted(names) => {
                s.metrics.sync("interrupted");
                pass.extend(names);
                plans_left -= 1;
            }
        }
    }
}

/// The most plans one reconcile makes before it leaves the rest to the next sync.
const MAX_PLANS_PER_PASS: usize = 256;

/// A plan is made again only once it is this many times as old as making it took (planning
/// then costs at most about a tenth of the pass).
const REPLAN_AFTER_COSTS: u32 = 10;

async fn sync_once(
    s: &Shared,
    key: &ObjectKey,
    pass: &HashSet<String>,
    may_interrupt: bool,
) -> Result<Step, Error> {
    let planning = Instant::now();
    let snap = snapshot(s, key);
    let Some(svc) = snap.svc else {
        return cleanup_absent(s, key, snap.existing).await.map(Step::Done);
    };
    let spec = svc.spec.clone().unwrap_or_default();
    if spec.type_.as_deref() == Some("ExternalName") || spec.selector.is_none() {
        // As upstream: a Service without selector (or ExternalName) is not ours to fill; an
        // EndpointsReady of ours from when it had one goes (no write when there is none).
        apply_condition(s, &svc, &[]).await?;
        return Ok(Step::Done(Requeue::Done));
    }
    if s.slices.tracker.stale(key, &snap.existing) {
        s.metrics.sync("stale");
        return Err(Error::StaleCache(key.to_string()));
    }
    let pods: Vec<&PodRecord> = snap.pods.iter().map(|p| p.as_ref()).collect();
    // Computed even when the sync writes nothing, so the tracker follows every change.
    let (trigger, seen) = trigger_time::trigger_time(snap.seen.as_deref(), &svc, &pods);
    let plan = {
        let node_zone = |n: &str| snap.nodes.get(n).cloned();
        let input = SliceInput {
            service: &svc,
            pods,
            node_zone: &node_zone,
            existing: snap.existing.iter().map(|s| s.as_ref()).collect(),
            max_endpoints_per_slice: s.cfg.max_endpoints_per_slice,
            controller_name: CONTROLLER_NAME,
            zone_ratios: &snap.zone_ratios,
            hints_populated: snap.hints_populated,
            trigger_time: trigger,
        };
        slices::plan(&input)
    };
    {
        let mut st = s.state();
        if plan.hints_populated {
            st.hints_populated.insert(key.clone());
        } else {
            st.hints_populated.remove(key);
        }
    }
    let sref = service_ref(&svc);
    // A later plan of the pass would repeat the first one's hint Events.
    for ev in plan.events.iter().filter(|_| pass.is_empty()) {
        if ev.warning {
            s.base
                .ctx
                .events
                .warning(&sref, &ev.reason, "UpdateHints", ev.message.clone())
                .await;
        } else {
            s.base
                .ctx
                .events
                .normal(&sref, &ev.reason, "UpdateHints", ev.message.clone())
                .await;
        }
    }
    let writes = plan.writes();
    let creates = svc.metadata.deletion_timestamp.is_none();
    let written_in_pass =
        |sl: &EndpointSlice| sl.metadata.name.as_ref().is_some_and(|n| pass.contains(n));
    if !pass.is_empty()
        && (plan.create.is_empty() || !creates)
        && plan.update.iter().chain(&plan.delete).all(written_in_pass)
    {
        // Every slice this plan touches was written in this pass already, and the Service
        // has changed since: the next sync writes them again, after other keys' turn.
        return Ok(Step::Done(Requeue::After(Duration::ZERO)));
    }
    let before: Vec<&EndpointSlice> = snap.existing.iter().map(|s| s.as_ref()).collect();
    let queue = &s.base.queue;
    // Planning again costs a plan: only once the plan is old enough for that to be a small
    // part of the time spent writing it. Under a saturated budget a write waits long for its
    // token and this holds after the first one; when tokens are free a plan of a large
    // Service is written whole, instead of planned again after every write.
    let (planned, cost) = (Instant::now(), planning.elapsed());
    // When each pod's readiness last changed: updates carrying older changes go first, in
    // the plan and for the client's tokens.
    let ages: HashMap<&str, i64> = snap
        .pods
        .iter()
        .filter_map(|p| Some((&*p.name, p.ready_transition()?)))
        .collect();
    let age = |pod: &str| ages.get(pod).copied();
    let changed =
        || planned.elapsed() >= cost * REPLAN_AFTER_COSTS && queue.added_while_processing(key);
    let w = SliceWrites {
        create: &plan.create,
        update: &plan.update,
        delete: &plan.delete,
        before: Some(&before),
        defer_ordinary: true,
        interrupt: may_interrupt.then_some(&changed as Interrupt),
        written: Some(pass),
        age: Some(&age),
    };
    let result = s
        .slices
        .write(&s.base.ctx.client, key, w, creates, &s.metrics)
        .await;
    let m = &s.metrics;
    m.added.get_or_create(&vec![]).observe(plan.added as f64);
    m.removed
        .get_or_create(&vec![])
        .observe(plan.removed as f64);
    let td = spec
        .traffic_distribution
        .clone()
        .filter(|t| topology::valid_traffic_distribution(Some(t)))
        .filter(|_| !topology::hints_annotation_enabled(&labels_of(&svc.metadata.annotations)));
    m.set_service(
        key,
        plan.desired_endpoints,
        plan.num_slices,
        plan.desired_slices,
        td.clone(),
    );
    m.changed_per_sync
        .get_or_create(&ChangedLabels {
            topology: if topology::hints_annotation_enabled(&labels_of(&svc.metadata.annotations)) {
                "Auto".into()
            } else {
                "Disabled".into()
            },
            traffic_distribution: td.unwrap_or_default(),
        })
        .observe(writes as f64);
    m.writes_per_reconcile
        .get_or_create(&ControllerLabel {
            controller: s.base.ctx.name.clone(),
        })
        .observe(writes as f64);
    let result = match result {
        Ok(Written::Interrupted(names)) => return Ok(Step::Interrupted(names)),
        other => other,
    };
    let deferred = matches!(result, Ok(Written::Deferred));
    if let Err(e) = result {
        m.sync("error");
        s.base
            .ctx
            .events
            .warning(
                &sref,
                "FailedToUpdateEndpointSlices",
                "UpdateEndpointSlices",
                format!("Error updating Endpoint Slices for Service {key}: {e}"),
            )
            .await;
        return Err(e);
    }
    if deferred {
        // The writes traffic waits for are made; the rest is planned again from the slices as
        // they are now, behind other urgent work, as ordinary work (trigger time unrecorded,
        // as for a failed write: the rest still carries it).
        return Ok(Step::Done(Requeue::After(Duration::ZERO)));
    }
    // Only once applied: a failed write is retried with the same trigger time.
    s.state().trigger_times.record(key, seen);
    // After the slices, so True never shows before the endpoints exist.
    if let Some(c) = &plan.condition {
        apply_condition(s, &svc, std::slice::from_ref(c)).await?;
    }
    if !plan.missing_nodes.is_empty() {
        m.sync("error");
        return Err(Error::NodeNotFound(format!(
            "{key}: pods {:?}",
            plan.missing_nodes
        )));
    }
    m.sync("success");
    if writes > 0 {
        debug!(service = %key, creates = plan.create.len(), updates = plan.update.len(), deletes = plan.delete.len(), "applied EndpointSlice plan");
    }
    Ok(Step::Done(Requeue::Done))
}

/// Wants our `EndpointsReady` on `svc` to be `desired` (empty: removed): one server-side
/// apply on a transition, nothing at steady state. Written by the controller's condition
/// writer, not awaited here: a sync's slice writes do not wait behind it for client tokens
/// (awaited, it doubled the cold start at 20 QPS).
async fn apply_condition(s: &Shared, svc: &Service, desired: &[Desired]) -> Result<(), Error> {
    let writer = s
        .state()
        .conditions
        .get_or_init(|| conditions::Writer::start(&s.base.ctx, condition::OWNED))
        .clone();
    writer.set(svc, condition::OWNED, desired.to_vec());
    Ok(())
}

/// A Service absent from our cache: deleted, or outside our scope. Only when the API server
/// confirms it is gone do we delete the slices we made for it (there may be no garbage
/// collector running, and a Service merely out of scope keeps its slices).
async fn cleanup_absent(
    s: &Shared,
    key: &ObjectKey,
    ours: Vec<Arc<EndpointSlice>>,
) -> Result<Requeue, Error> {
    s.metrics.delete_service(key);
    {
        let mut st = s.state();
        st.hints_populated.remove(key);
        st.trigger_times.forget(key);
    }
    if ours.is_empty() {
        s.slices.tracker.delete_service(key);
        return Ok(Requeue::Done);
    }
    let svcs: Api<Service> = Api::namespaced(s.base.ctx.client.clone(), &key.namespace);
    if let Some(live) = svcs.get_opt(&key.name).await.map_err(Error::Kube)? {
        let owned_by_live = ours.iter().all(|sl| {
            sl.metadata
                .owner_references
                .iter()
                .flatten()
                .any(|o| Some(&o.uid) == live.metadata.uid.as_ref())
        });
        if owned_by_live {
            return Ok(Requeue::Done);
        }
    }
    // Adopted-but-not-yet-relabelled slices stay with their owner.
    let delete: Vec<EndpointSlice> = ours
        .iter()
        .filter(|sl| managed_by(sl) == Some(CONTROLLER_NAME))
        .map(|sl| sl.as_ref().clone())
        .collect();
    let w = SliceWrites {
        delete: &delete,
        ..Default::default()
    };
    if let Err(e) = s
        .slices
        .write(&s.base.ctx.client, key, w, false, &s.metrics)
        .await
    {
        warn!(service = %key, error = %e, "could not delete slices of deleted Service");
        return Err(e);
    }
    s.slices.tracker.delete_service(key);
    Ok(Requeue::Done)
}
