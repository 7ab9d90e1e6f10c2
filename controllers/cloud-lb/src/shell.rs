//! The thin kube shell: subscriptions to the process's Service and Node informers (on every
//! replica), a work queue of Service keys with per-Service backoff (5 s to 300 s), and workers
//! (only while leading) that gather an [`Observed`] for a key, ask [`core::decide`] for the
//! [`Step`], and execute it (in [`crate::steps`]).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Service};
use kube::api::{Api, ListParams};
use scm_runtime::{
    Backoff, ControllerContext, Informer, ObjectKey, Requeue, WorkQueue, WorkerConfig,
};
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::core::{self, Action, ClassFilter, LastSync, Observed, Step};
use crate::metrics::LbMetrics;
use crate::nodes::{self, NodeSyncPass};
use crate::provider::{CAPACITY_EXHAUSTED, LoadBalancerProvider};
use crate::{CloudLbConfig, Error, NODE_SYNC_DEBOUNCE};

mod watch;

use watch::{Endpoints, watch_endpoints, watch_services};

#[cfg(test)]
mod fake_api;
#[cfg(test)]
mod tests;

/// What the shell remembers of one Service (in one record, so it is forgotten in one place).
#[derive(Default)]
pub(crate) struct Record {
    /// What we last did successfully in this leadership term.
    pub last: Option<LastSync>,
    /// The spec fingerprint whose ensure failed permanently: no retry until it changes.
    pub parked: Option<String>,
    /// No provider call before this (the cloud's throttle hint).
    pub not_before: Option<Instant>,
    /// A periodic pass asked to check that its load balancer still exists.
    pub verify: bool,
    /// The periodic pass's answer for all Services at once, if it got one (else the key's
    /// reconcile asks the provider's `get` itself).
    pub found: Option<bool>,
    /// Refused as served by another controller, decided from this [`core::refusal_key`].
    pub refused: Option<String>,
    /// Seen to stop being a LoadBalancer with our finalizer on (on any replica, leading or
    /// not): still ours to clean up if it comes back in another class.
    pub left: bool,
}

impl Record {
    fn is_empty(&self) -> bool {
        // `verify` alone is nothing to keep: only remembered Services are verified.
        self.last.is_none()
            && self.parked.is_none()
            && self.not_before.is_none()
            && self.refused.is_none()
            && !self.left
    }
}

/// The shell's memory: one record per Service, and the leadership term it belongs to.
#[derive(Default)]
pub(crate) struct Memory {
    services: HashMap<ObjectKey, Record>,
    /// Bumped whenever leadership is lost: another replica may have changed the cloud since.
    term: u64,
    /// The term in which the provider was last restored.
    restored: Option<u64>,
    /// Services whose last ensure found no capacity left ([`CAPACITY_EXHAUSTED`]): queued
    /// again as soon as another Service's load balancer is deleted.
    starved: HashSet<ObjectKey>,
    /// Deletions that may have freed capacity (successful cleanups), counted.
    releases: u64,
}

impl Memory {
    fn remembers(&self, key: &ObjectKey) -> bool {
        self.services
            .get(key)
            .is_some_and(|r| r.last.is_some() || r.refused.is_some() || r.left)
    }

    /// Keeps [`Record::left`] in step with what the informer shows of `svc`: set when it stops
    /// being a LoadBalancer with our finalizer, cleared once it is one of ours again.
    fn note_leaving(&mut self, svc: &Service, key: &ObjectKey, filter: &ClassFilter) {
        if core::leaves_load_balancer(svc) {
            self.edit(key, |r| r.left = true);
        } else if core::action(svc, filter) == Action::Ensure && self.services.contains_key(key) {
            self.edit(key, |r| r.left = false);
        }
    }

    /// Edits `key`'s record, dropping it once it holds nothing.
    pub fn edit<R>(&mut self, key: &ObjectKey, f: impl FnOnce(&mut Record) -> R) -> R {
        let rec = self.services.entry(key.clone()).or_default();
        let r = f(rec);
        if rec.is_empty() {
            self.services.remove(key);
        }
        r
    }

    /// Forgets everything about `key`.
    pub fn forget(&mut self, key: &ObjectKey) {
        self.services.remove(key);
    }

    /// Leadership lost: what we synced is stale; the provider must be restored again.
    fn lose_term(&mut self) {
        self.term += 1;
        self.services.retain(|_, r| {
            r.last = None;
            !r.is_empty()
        });
    }
}

/// The controller while it runs: what the workers share.
pub(crate) struct Shell {
    pub ctx: ControllerContext,
    pub config: CloudLbConfig,
    filter: ClassFilter,
    pub provider: Arc<dyn LoadBalancerProvider>,
    services: Informer<Service>,
    nodes: Informer<Node>,
    /// Where each Service's endpoints are, with `--endpoint-aware-load-balancer-targets`.
    endpoints: Option<Endpoints>,
    /// Shared with the Service subscription (which asks whether a key is remembered).
    memory: Arc<Mutex<Memory>>,
    /// One provider restore at a time; the others wait for it, then decide again.
    restoring: tokio::sync::Mutex<()>,
    queue: WorkQueue<ObjectKey>,
    pub metrics: LbMetrics,
    pass: NodeSyncPass,
}

/// The node-sync pass's period (upstream's nodeSyncPeriod), which is also when every
/// remembered load balancer is checked for existence.
pub(crate) struct Periods {
    /// Every Service is compared with the node set, and its load balancer checked, this often.
    pub resync: Duration,
}

fn lock(m: &Mutex<Memory>) -> MutexGuard<'_, Memory> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Services the controller acts on at all (to restore and to queue at a new term).
fn served(services: &Informer<Service>, filter: &ClassFilter) -> Vec<Arc<Service>> {
    services
        .list()
        .into_iter()
        .filter(|s| core::action(s, filter) != Action::Ignore)
        .collect()
}

/// Runs the controller on the given informers until `ctx.shutdown` is cancelled.
pub(crate) async fn run(
    ctx: ControllerContext,
    config: CloudLbConfig,
    provider: Arc<dyn LoadBalancerProvider>,
    services: Informer<Service>,
    nodes: Informer<Node>,
    periods: Periods,
) -> Result<(), Error> {
    let metrics = LbMetrics::register(&ctx);
    let queue: WorkQueue<ObjectKey> = WorkQueue::new(Backoff {
        base: core::MIN_RETRY_DELAY,
        max: core::MAX_RETRY_DELAY,
    });
    let filter = ClassFilter {
        class: config.load_balancer_class.clone(),
        default_implementation: config.default_load_balancer,
    };
    let memory: Arc<Mutex<Memory>> = Default::default();
    watch_services(&services, &filter, &memory, &queue);
    let node_dirty = Arc::new(Notify::new());
    nodes::watch_nodes(&nodes, node_dirty.clone(), config.endpoint_aware_targets);
    let endpoints = config
        .endpoint_aware_targets
        .then(|| watch_endpoints(&ctx, &services, &filter, &queue));
    let shell = Arc::new(Shell {
        ctx: ctx.clone(),
        config,
        filter,
        provider,
        services,
        nodes,
        endpoints,
        memory,
        restoring: tokio::sync::Mutex::new(()),
        queue: queue.clone(),
        metrics,
        pass: NodeSyncPass::default(),
    });

    let sh = shell.clone();
    let nodesync_task = async move {
        let mut tick = tokio::time::interval(periods.resync);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = node_dirty.notified() => tokio::time::sleep(NODE_SYNC_DEBOUNCE).await,
                // Only the periodic pass checks existence: node events stay cloud-read free.
                _ = tick.tick() => sh.check_existence().await,
            }
            sh.node_sync_pass();
        }
    };

    let sh = shell.clone();
    let mut gate = ctx.leader.clone();
    let leader_task = async move {
        loop {
            if !gate.wait_leading().await {
                // The elector is gone; the workers notice on their own. Never end the select.
                futures::future::pending::<()>().await;
            }
            gate.wait_lost().await;
            if gate.is_leader() {
                // wait_lost also returns when the elector goes away while the last word was
                // "leading"; that is no loss, and looping on it would spin.
                futures::future::pending::<()>().await;
            }
            sh.lose_term();
        }
    };

    let sh = shell.clone();
    let workers = async move {
        let synced = || {
            sh.services.is_synced()
                && sh.nodes.is_synced()
                && sh.endpoints.as_ref().is_none_or(|e| e.slices.is_synced())
        };
        if !scm_runtime::wait_for_sync(&sh.ctx, synced).await {
            return;
        }
        info!(controller = %sh.ctx.name, provider = sh.provider.provider_name(), "informers synced");
        let worker_cfg = WorkerConfig {
            concurrency: sh.config.concurrent_service_syncs.max(1),
            drain_timeout: Duration::from_secs(5),
        };
        let sh2 = sh.clone();
        scm_runtime::run_workers(&sh.ctx, sh.queue.clone(), worker_cfg, move |key| {
            let sh = sh2.clone();
            async move {
                let r = sh.reconcile(&key).await;
                if let Some(secs) = sh.pass.reconciled(&key) {
                    sh.metrics.nodesync_latency.observe(secs);
                }
                r
            }
        })
        .await;
    };

    // Capacity that appears without a deletion of ours (the local provider: a pool created or
    // grown) wakes the Services waiting for it, as a release does.
    let sh = shell.clone();
    let capacity = shell.provider.capacity_signal();
    let capacity_task = async move {
        let Some(signal) = capacity else {
            return futures::future::pending::<()>().await;
        };
        loop {
            signal.notified().await;
            sh.capacity_appeared();
        }
    };

    tokio::select! {
        _ = ctx.shutdown.cancelled() => {}
        _ = nodesync_task => {}
        _ = leader_task => {}
        _ = workers => {}
        _ = capacity_task => {}
    }
    queue.shut_down();
    Ok(())
}

impl Shell {
    pub fn memory(&self) -> MutexGuard<'_, Memory> {
        lock(&self.memory)
    }

    /// The periodic pass's existence check: one provider question for every load balancer we
    /// remember (nothing on a replica that does not lead: it remembers none); each Service's
    /// reconcile in the pass then decides with the answer.
    async fn check_existence(&self) {
        let remembered: Vec<(ObjectKey, Service)> = self
            .memory()
            .services
            .iter()
            .filter_map(|(k, r)| r.last.as_ref().map(|l| (k.clone(), l.service.clone())))
            .collect();
        if remembered.is_empty() {
            return;
        }
        let services: Vec<Service> = remembered.iter().map(|(_, s)| s.clone()).collect();
        let answer = self
            .provider
            .exist(&self.config.cluster_name, &services)
            .await;
        if let Err(e) = &answer {
            // Each Service's reconcile asks `get` itself instead.
            warn!(error = %e, "periodic existence check failed");
        }
        let found = answer.ok().filter(|v| v.len() == remembered.len());
        let mut mem = self.memory();
        for (i, (key, _)) in remembered.iter().enumerate() {
            if let Some(r) = mem.services.get_mut(key) {
                r.verify = true;
                r.found = found.as_ref().map(|v| v[i]);
            }
        }
    }

    /// Queues every Service we ensure, as one node-sync pass.
    fn node_sync_pass(&self) {
        let keys: Vec<ObjectKey> = self
            .services
            .list()
            .iter()
            .filter(|s| core::action(s, &self.filter) == Action::Ensure)
            .map(|s| ObjectKey::of(s.as_ref()))
            .collect();
        debug!(services = keys.len(), "node set pass queued");
        self.pass.begin(&keys);
        for k in keys {
            self.queue.add(k);
        }
    }

    /// Leadership lost: forget what we synced (a new term looks at every served Service again,
    /// as a freshly started upstream controller does) and queue them all for that term.
    fn lose_term(&self) {
        self.memory().lose_term();
        self.pass.abandon();
        for s in served(&self.services, &self.filter) {
            self.queue.add(ObjectKey::of(s.as_ref()));
        }
    }

    /// What the controller knows about `key` now, and the Service's targets it was computed
    /// from (the stable node set, narrowed by [`core::targets`]).
    fn observe(&self, key: &ObjectKey, found: Option<bool>) -> (Observed, Vec<Arc<Node>>) {
        let service = self.services.get(key).map(|s| s.as_ref().clone());
        let implemented_elsewhere = service
            .as_ref()
            .is_some_and(|s| self.provider.implemented_elsewhere(s));
        let recognised = service.as_ref().is_some_and(|s| {
            s.status
                .as_ref()
                .and_then(|st| st.load_balancer.as_ref())
                .is_some_and(|lb| self.provider.recognises(&self.config.cluster_name, s, lb))
        });
        let stable = nodes::stable_nodes(&self.nodes);
        let stable = match (&service, &self.endpoints) {
            (Some(svc), Some(e)) => {
                core::targets::targets(svc, &stable, e.index.of(key).as_ref(), true)
            }
            _ => stable,
        };
        let nodes = core::fingerprint(stable.iter().map(|n| n.as_ref()));
        let now = Instant::now();
        let mut mem = self.memory();
        let rec = mem.services.get(key);
        let retry_wait = rec
            .and_then(|r| r.not_before)
            .and_then(|t| t.checked_duration_since(now))
            .filter(|d| !d.is_zero());
        if retry_wait.is_none() && rec.is_some_and(|r| r.not_before.is_some()) {
            // The hint has passed: forget it.
            mem.edit(key, |r| r.not_before = None);
        }
        let rec = mem.services.get(key);
        let o = Observed {
            restored: mem.restored == Some(mem.term),
            service,
            implemented_elsewhere,
            last: rec.and_then(|r| r.last.clone()),
            parked: rec.and_then(|r| r.parked.clone()),
            nodes,
            retry_wait,
            verify: rec.is_some_and(|r| r.verify),
            found: found.or(rec.filter(|r| r.verify).and_then(|r| r.found)),
            recognised,
            refused: rec.and_then(|r| r.refused.clone()),
            left_our_class: rec.is_some_and(|r| r.left),
        };
        (o, stable)
    }

    /// One reconcile of `key`: observe, decide, execute; again after a restore.
    pub async fn reconcile(&self, key: &ObjectKey) -> Result<Requeue, Error> {
        // What the provider's `get` answered, once a step asked (decided again with it).
        let mut found = None;
        let releases = self.memory().releases;
        loop {
            let (o, nodes) = self.observe(key, found);
            let step = core::decide(&self.filter, &o);
            debug!(service = %key, ?step, "decided");
            let res = match step {
                Step::Restore => match self.restore().await {
                    Ok(()) => continue,
                    Err(e) => Err(e),
                },
                Step::LookUp if found.is_none() => match self.look_up(o.service.as_ref()).await {
                    Ok(exists) => {
                        found = Some(exists);
                        continue;
                    }
                    Err(e) => Err(e),
                },
                other => {
                    self.note_refusal(key, other, o.service.as_ref());
                    let answered = o.found.is_some();
                    let res = self.execute(key, other, o, nodes).await;
                    self.note_capacity(key, other, &res, releases);
                    if answered && res.is_ok() {
                        // Checked and acted on: nothing more until the next periodic pass (a
                        // failed recreate keeps the request, so its retry looks again).
                        self.memory().edit(key, |r| {
                            r.verify = false;
                            r.found = None;
                        });
                    }
                    res
                }
            };
            if let Err(Error::Provider(e)) = &res
                && let Some(after) = e.retry_after()
            {
                // The cloud said when to come back: the next provider call waits until then,
                // however soon the backoff hands the key out again.
                debug!(service = %key, ?after, "throttled with a hint");
                let until = Instant::now() + after;
                self.memory().edit(key, |r| r.not_before = Some(until));
            }
            return res;
        }
    }

    /// A Service refused for want of capacity waits for the next release; a release queues
    /// every waiting Service at once, since nothing about them changes when another Service
    /// goes and their backoff may be minutes away. `releases` is the count when this key's
    /// reconcile began: a release meanwhile may have come after the provider said no.
    fn note_capacity(
        &self,
        key: &ObjectKey,
        step: Step,
        res: &Result<Requeue, Error>,
        releases: u64,
    ) {
        let starved = matches!(res, Err(Error::Provider(e)) if e.has_code(CAPACITY_EXHAUSTED));
        let released = res.is_ok() && matches!(step, Step::Cleanup | Step::DeleteVanished);
        let wake: Vec<ObjectKey> = {
            let mut m = self.memory();
            m.starved.remove(key);
            if released {
                m.releases += 1;
                m.starved.drain().collect()
            } else if starved && m.releases != releases {
                vec![key.clone()]
            } else {
                if starved {
                    m.starved.insert(key.clone());
                }
                vec![]
            }
        };
        if released && !wake.is_empty() {
            debug!(service = %key, waiting = wake.len(), "capacity freed: retrying the Services waiting for it");
        }
        for k in wake {
            self.queue.add(k);
        }
    }

    /// Queues every Service waiting for capacity, and counts it as a release so that a
    /// refusal racing with it is retried too.
    fn capacity_appeared(&self) {
        let wake: Vec<ObjectKey> = {
            let mut m = self.memory();
            m.releases += 1;
            m.starved.drain().collect()
        };
        if !wake.is_empty() {
            debug!(
                waiting = wake.len(),
                "provider capacity changed: retrying the Services waiting for it"
            );
        }
        for k in wake {
            self.queue.add(k);
        }
    }

    /// Whether our load balancer for the Service exists (the provider's `get`: in AWS a
    /// coalesced DescribeLoadBalancers and DescribeTags; in the local provider, memory).
    async fn look_up(&self, svc: Option<&Service>) -> Result<bool, Error> {
        let Some(svc) = svc else {
            return Ok(false);
        };
        Ok(self
            .provider
            .get(&self.config.cluster_name, svc)
            .await?
            .is_some())
    }

    /// Keeps the record of a refusal (and the gauge of refused Services) in step with `step`.
    fn note_refusal(&self, key: &ObjectKey, step: Step, svc: Option<&Service>) {
        let now = match (step, svc) {
            (Step::ServedElsewhere { .. }, Some(s)) => Some(core::refusal_key(s)),
            _ => None,
        };
        let (was, is) = self.memory().edit(key, |r| {
            let was = r.refused.is_some();
            r.refused = now;
            (was, r.refused.is_some())
        });
        match (was, is) {
            (false, true) => {
                self.metrics.served_elsewhere.inc();
            }
            (true, false) => {
                self.metrics.served_elsewhere.dec();
            }
            _ => {}
        }
    }

    /// Once per leadership term, before any other provider call: let the provider rebuild from
    /// every served Service.
    /// The Services we serve, as the API server has them now (a quorum list, 500 a page):
    /// a new leader's watch can trail the addresses its predecessor published just before
    /// handing over, and restoring from that view could hand one of them out again.
    async fn listed_served(&self) -> Result<Vec<Service>, kube::Error> {
        let api: Api<Service> = Api::all(self.ctx.client.clone());
        let mut out = Vec::new();
        let mut lp = ListParams::default().limit(500);
        loop {
            let page = api.list(&lp).await?;
            out.extend(
                page.items
                    .into_iter()
                    .filter(|s| core::action(s, &self.filter) != Action::Ignore),
            );
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(c) => lp = lp.continue_token(&c),
                None => return Ok(out),
            }
        }
    }

    async fn restore(&self) -> Result<(), Error> {
        let _one = self.restoring.lock().await;
        let term = {
            let m = self.memory();
            if m.restored == Some(m.term) {
                return Ok(());
            }
            m.term
        };
        let served = match self.listed_served().await {
            Ok(list) => list,
            Err(e) => {
                // The informer's view may trail the previous leader's last writes; it is the
                // fallback, not the rule.
                warn!(error = %e, "could not list Services for the restore; using the cache");
                served(&self.services, &self.filter)
                    .iter()
                    .map(|s| s.as_ref().clone())
                    .collect()
            }
        };
        self.provider
            .restore(&self.config.cluster_name, &served)
            .await?;
        info!(services = served.len(), "provider state restored");
        self.memory().restored = Some(term);
        Ok(())
    }
}
