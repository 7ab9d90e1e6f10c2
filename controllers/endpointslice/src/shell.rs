//! What the three shells share: the parsed `--service-label-selector`, the work queue with its
//! backoff and batching, the "every index has its first list" gate before workers start, the
//! process-wide Pod informer, and one way of folding Service changes into an index.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Service};
use kube::core::{Expression, Selector, SelectorExt};

use scm_runtime::informer::{Change, Informer};
use scm_runtime::{
    Backoff, ControllerContext, Informers, ObjectKey, Priority, Requeue, WorkQueue, WorkerConfig,
    run_workers,
};

use crate::Error;
use crate::cache::PodServiceIndex;
use crate::common::PodRecord;
use crate::metrics::SliceMetrics;
use crate::slice_record::SliceRecord;
use crate::slice_store::Slices;

/// Checks a flag's value is within `lo..=hi`, as kube-controller-manager validates them.
pub fn check_range(flag: &str, value: usize, lo: usize, hi: usize) -> Result<(), Error> {
    if (lo..=hi).contains(&value) {
        return Ok(());
    }
    Err(Error::Config(format!(
        "--{flag} must be between {lo} and {hi}, got {value}"
    )))
}

/// Checks a worker count flag is at least 1.
pub fn check_workers(flag: &str, value: usize) -> Result<(), Error> {
    if value < 1 {
        return Err(Error::Config(format!("--{flag} must be at least 1")));
    }
    Ok(())
}

/// The process's Pod informer, as compact records. The EndpointSlice and Endpoints
/// controllers both ask through here, so they ask with the same functions and share one watch.
pub fn pods(informers: &Informers) -> Informer<PodRecord> {
    informers.kind::<Pod, PodRecord>(PodRecord::from_pod, PodRecord::key_ref)
}

/// `--service-label-selector`, parsed once at start: the Services a controller serves.
#[derive(Clone, Debug, Default)]
pub struct ServiceFilter(Option<Selector>);

impl ServiceFilter {
    /// Parses the flag's value (None or blank: every Service). Supports the API server's
    /// set-based syntax: `k=v`, `k==v`, `k!=v`, `k`, `!k`, `k in (a,b)`, `k notin (a,b)`.
    pub fn parse(s: Option<&str>) -> Result<Self, Error> {
        let Some(s) = s.map(str::trim).filter(|s| !s.is_empty()) else {
            return Ok(ServiceFilter(None));
        };
        let mut sel = Selector::default();
        for term in split_terms(s) {
            let e = parse_term(term.trim()).ok_or_else(|| {
                Error::Config(format!(
                    "--service-label-selector: cannot parse {term:?} in {s:?}"
                ))
            })?;
            sel.extend([e]);
        }
        Ok(ServiceFilter(Some(sel)))
    }

    /// Whether the Service is in scope.
    pub fn accepts(&self, svc: &Service) -> bool {
        match &self.0 {
            None => true,
            Some(sel) => match &svc.metadata.labels {
                Some(l) => sel.matches(l),
                None => sel.matches(&Default::default()),
            },
        }
    }
}

/// Splits on commas outside parentheses.
fn split_terms(s: &str) -> Vec<&str> {
    let (mut out, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn valid_word(w: &str) -> bool {
    !w.is_empty()
        && w.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

fn valid_value(w: &str) -> bool {
    w.is_empty() || valid_word(w)
}

fn parse_term(t: &str) -> Option<Expression> {
    if let Some(open) = t.find('(') {
        let inner = t.strip_suffix(')')?.get(open + 1..)?;
        let values = inner
            .split(',')
            .map(str::trim)
            .map(|v| valid_value(v).then(|| v.to_string()))
            .collect::<Option<_>>()?;
        let mut head = t[..open].split_whitespace();
        let (key, op) = (head.next()?, head.next()?);
        if head.next().is_some() || !valid_word(key) {
            return None;
        }
        return match op {
            "in" => Some(Expression::In(key.into(), values)),
            "notin" => Some(Expression::NotIn(key.into(), values)),
            _ => None,
        };
    }
    if let Some(k) = t.strip_prefix('!') {
        let k = k.trim();
        return valid_word(k).then(|| Expression::DoesNotExist(k.into()));
    }
    for (op, neg) in [("!=", true), ("==", false), ("=", false)] {
        if let Some((k, v)) = t.split_once(op) {
            let (k, v) = (k.trim(), v.trim());
            if !valid_word(k) || !valid_value(v) {
                return None;
            }
            return Some(if neg {
                Expression::NotEqual(k.into(), v.into())
            } else {
                Expression::Equal(k.into(), v.into())
            });
        }
    }
    valid_word(t).then(|| Expression::Exists(t.into()))
}

/// Whether a Service update changes anything the controllers read: a status-only write (the
/// load-balancer controller's `status.loadBalancer`) or a finalizer change is not news.
pub fn service_changed(old: &Service, new: &Service) -> bool {
    let (o, n) = (&old.metadata, &new.metadata);
    old.spec != new.spec
        || o.uid != n.uid
        || o.labels != n.labels
        || o.annotations != n.annotations
        || o.deletion_timestamp.is_some() != n.deletion_timestamp.is_some()
}

/// A Service index a shell keeps: put, remove and list keys.
pub trait ServiceStore {
    /// Inserts or replaces; returns the previous version.
    fn put(&mut self, svc: Arc<Service>) -> Option<Arc<Service>>;
    /// Removes; returns the removed version.
    fn remove(&mut self, key: &ObjectKey) -> Option<Arc<Service>>;
    /// Every key held.
    fn keys(&self) -> Vec<ObjectKey>;
}

impl ServiceStore for PodServiceIndex {
    fn put(&mut self, svc: Arc<Service>) -> Option<Arc<Service>> {
        self.put_service(svc)
    }
    fn remove(&mut self, key: &ObjectKey) -> Option<Arc<Service>> {
        self.remove_service(key)
    }
    fn keys(&self) -> Vec<ObjectKey> {
        self.services.keys().cloned().collect()
    }
}

impl ServiceStore for HashMap<ObjectKey, Arc<Service>> {
    fn put(&mut self, svc: Arc<Service>) -> Option<Arc<Service>> {
        self.insert(ObjectKey::of(svc.as_ref()), svc)
    }
    fn remove(&mut self, key: &ObjectKey) -> Option<Arc<Service>> {
        HashMap::remove(self, key)
    }
    fn keys(&self) -> Vec<ObjectKey> {
        HashMap::keys(self).cloned().collect()
    }
}

/// Folds one Service change into `store`, as a watch with the label selector would have shown
/// it (a Service leaving the selection is a deletion), and returns the keys to reconcile.
pub fn apply_service_change(
    filter: &ServiceFilter,
    store: &mut impl ServiceStore,
    c: &Change<Service>,
) -> Vec<ObjectKey> {
    match c {
        Change::Apply(svc) => {
            let key = ObjectKey::of(svc.as_ref());
            if !filter.accepts(svc) {
                return store.remove(&key).map(|_| key).into_iter().collect();
            }
            match store.put(svc.clone()) {
                Some(old) if !service_changed(&old, svc) => vec![],
                _ => vec![key],
            }
        }
        Change::Delete(svc) => {
            let key = ObjectKey::of(svc.as_ref());
            store.remove(&key);
            vec![key]
        }
        Change::Relisted(list) => {
            let mut keys: HashSet<ObjectKey> = store.keys().into_iter().collect();
            for k in keys.iter() {
                store.remove(k);
            }
            for svc in list.iter().filter(|s| filter.accepts(s)) {
                keys.insert(ObjectKey::of(svc.as_ref()));
                store.put(svc.clone());
            }
            keys.into_iter().collect()
        }
    }
}

/// What every shell is configured with.
#[derive(Clone, Debug)]
pub struct ShellConfig {
    /// Workers: the controller's `--concurrent-*-syncs` (default 5).
    pub concurrent_syncs: usize,
    /// How long pod- (or Endpoints-) driven changes are batched (default 0: not at all).
    pub batch_period: Duration,
    /// `--service-label-selector`: only Services matching it are served (None: all).
    pub service_label_selector: Option<String>,
}

impl Default for ShellConfig {
    fn default() -> Self {
        ShellConfig {
            concurrent_syncs: 5,
            batch_period: Duration::ZERO,
            service_label_selector: None,
        }
    }
}

/// What the EndpointSlice and mirroring shells hold: the base, their settings, their own index
/// (`St`), our slices with their tracker, and the slice metrics.
pub struct SliceShell<C, St> {
    /// Context, queue, filter and sync gate.
    pub base: ShellBase,
    /// The controller's settings.
    pub cfg: C,
    /// The controller's own index. Lock order: this, then the slice cache.
    pub state: Mutex<St>,
    /// Our slices and the generation tracker; every write goes through [`Slices::write`].
    pub slices: Slices,
    /// The controller's slice metrics.
    pub metrics: SliceMetrics,
}

impl<C, St: Default> SliceShell<C, St> {
    /// A shell over the slices of `managers`, its metrics registered under `subsystem`.
    pub fn new(
        ctx: &ControllerContext,
        shell: &ShellConfig,
        caches: usize,
        cfg: C,
        managers: Vec<&'static str>,
        subsystem: &str,
    ) -> Result<Arc<Self>, Error> {
        Ok(Arc::new(SliceShell {
            base: ShellBase::new(ctx.clone(), shell, caches)?,
            cfg,
            state: Mutex::new(St::default()),
            slices: Slices::new(managers),
            metrics: SliceMetrics::register(&ctx.metrics, subsystem, &ctx.name),
        }))
    }

    /// The controller's index, locked.
    pub fn state(&self) -> MutexGuard<'_, St> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The parts every shell has: its context, queue, batching and the first-list gate.
pub struct ShellBase {
    /// The controller's context.
    pub ctx: ControllerContext,
    /// Service keys (Endpoints keys for mirroring) to reconcile.
    pub queue: WorkQueue<ObjectKey>,
    /// The Services in scope.
    pub services: ServiceFilter,
    batch_period: Duration,
    concurrency: usize,
    synced: Mutex<HashSet<&'static str>>,
    caches: usize,
}

impl ShellBase {
    /// A base for a shell whose workers wait for `caches` indexes' first lists.
    pub fn new(ctx: ControllerContext, cfg: &ShellConfig, caches: usize) -> Result<Self, Error> {
        Ok(ShellBase {
            ctx,
            queue: WorkQueue::new(Backoff {
                // Upstream starts at 1 s; a stale cache clears in milliseconds, so we retry
                // sooner.
                base: Duration::from_millis(50),
                max: Duration::from_secs(1000),
            }),
            services: ServiceFilter::parse(cfg.service_label_selector.as_deref())?,
            batch_period: cfg.batch_period,
            concurrency: cfg.concurrent_syncs,
            synced: Mutex::new(HashSet::new()),
            caches,
        })
    }

    /// Queues a key now.
    pub fn add(&self, key: ObjectKey) {
        self.queue.add(key);
    }

    /// Queues a key after the batch period (pod-driven changes).
    pub fn add_batched(&self, key: ObjectKey) {
        self.add_batched_with(key, Priority::Ordinary);
    }

    /// Queues a key in class `priority` after the batch period: urgent keys are batched as
    /// long as ordinary ones, then go ahead of them.
    pub fn add_batched_with(&self, key: ObjectKey, priority: Priority) {
        self.queue.add_after_with(key, self.batch_period, priority);
    }

    /// Queues keys now, each in its class.
    pub fn add_all_with(&self, keys: Vec<(ObjectKey, Priority)>) {
        keys.into_iter()
            .for_each(|(k, p)| self.queue.add_with(k, p));
    }

    /// Queues keys after the batch period, each in its class.
    pub fn add_all_batched_with(&self, keys: Vec<(ObjectKey, Priority)>) {
        keys.into_iter()
            .for_each(|(k, p)| self.add_batched_with(k, p));
    }

    /// Queues keys now.
    pub fn add_all(&self, keys: Vec<ObjectKey>) {
        keys.into_iter().for_each(|k| self.queue.add(k));
    }

    /// Queues keys after the batch period.
    pub fn add_all_batched(&self, keys: Vec<ObjectKey>) {
        keys.into_iter().for_each(|k| self.add_batched(k));
    }

    /// Folds a Service change into `store` (see [`apply_service_change`]); a relist marks the
    /// Service index synced. Returns the keys to queue.
    pub fn fold_services(
        &self,
        store: &mut impl ServiceStore,
        c: &Change<Service>,
    ) -> Vec<ObjectKey> {
        let keys = apply_service_change(&self.services, store, c);
        self.synced_on_relist("services", c);
        keys
    }

    /// Folds a pod change into the index; a relist marks the pod index synced. Returns the
    /// Services to queue, urgent where the change stops traffic to a pod that cannot serve.
    pub fn fold_pods(
        &self,
        idx: &mut PodServiceIndex,
        c: &Change<PodRecord>,
    ) -> Vec<(ObjectKey, Priority)> {
        let keys = idx.apply_pod_change_by_priority(c);
        self.synced_on_relist("pods", c);
        keys
    }

    /// Folds a slice change into our slices; a relist marks them synced. Returns the keys to
    /// queue.
    pub fn fold_slices(&self, slices: &Slices, c: &Change<SliceRecord>) -> Vec<ObjectKey> {
        let keys = slices.apply_change(c);
        self.synced_on_relist("slices", c);
        keys
    }

    /// Marks the index `name` synced if `c` is a relist.
    pub fn synced_on_relist<T>(&self, name: &'static str, c: &Change<T>) {
        if matches!(c, Change::Relisted(_)) {
            self.mark_synced(name);
        }
    }

    /// Records that the index `name` holds its first list.
    pub fn mark_synced(&self, name: &'static str) {
        self.synced
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name);
    }

    fn all_synced(&self) -> bool {
        self.synced.lock().unwrap_or_else(|e| e.into_inner()).len() >= self.caches
    }

    /// [`Self::work`] with `reconcile(shared, key)` for each key.
    pub async fn serve<S, F, Fut>(&self, shared: Arc<S>, reconcile: F)
    where
        S: Send + Sync + 'static,
        F: Fn(Arc<S>, ObjectKey) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = Result<Requeue, Error>> + Send + 'static,
    {
        self.work(move |k| reconcile(shared.clone(), k)).await
    }

    /// Waits for every index's first list (acting on a partial view could delete what is
    /// merely not listed yet), then runs `reconcile` over the queue while leading, until
    /// shutdown.
    pub async fn work<F, Fut>(&self, reconcile: F)
    where
        F: Fn(ObjectKey) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = Result<Requeue, Error>> + Send + 'static,
    {
        if !scm_runtime::wait_for_sync(&self.ctx, || self.all_synced()).await {
            return;
        }
        run_workers(
            &self.ctx,
            self.queue.clone(),
            WorkerConfig {
                concurrency: self.concurrency,
                ..Default::default()
            },
            reconcile,
        )
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ServiceSpec, ServiceStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn svc(name: &str, labels: &[(&str, &str)]) -> Arc<Service> {
        Arc::new(Service {
            metadata: ObjectMeta {
                namespace: Some("a".into()),
                name: Some(name.into()),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..Default::default()
            },
            spec: Some(ServiceSpec::default()),
            ..Default::default()
        })
    }

    #[test]
    fn selector_syntax() {
        let f = ServiceFilter::parse(Some("scm-test=a, tier in (fe,be),!legacy")).unwrap();
        assert!(f.accepts(&svc("x", &[("scm-test", "a"), ("tier", "fe")])));
        assert!(!f.accepts(&svc("x", &[("scm-test", "a"), ("tier", "db")])));
        assert!(!f.accepts(&svc(
            "x",
            &[("scm-test", "a"), ("tier", "fe"), ("legacy", "")]
        )));
        assert!(!f.accepts(&svc("x", &[])));
        let f = ServiceFilter::parse(Some("env!=prod,team")).unwrap();
        assert!(f.accepts(&svc("x", &[("team", "t")])));
        assert!(!f.accepts(&svc("x", &[("team", "t"), ("env", "prod")])));
        assert!(ServiceFilter::parse(None).unwrap().accepts(&svc("x", &[])));
        assert!(
            ServiceFilter::parse(Some("  "))
                .unwrap()
                .accepts(&svc("x", &[]))
        );
    }

    #[test]
    fn bad_selector_is_a_config_error() {
        for bad in ["a=b=c", "a in b", "in (x)", "a in (b", "a b", "=x", "a=(b)"] {
            let r = ServiceFilter::parse(Some(bad));
            assert!(
                matches!(r, Err(Error::Config(ref m)) if m.contains("--service-label-selector")),
                "{bad}: {r:?}"
            );
        }
    }

    #[test]
    fn status_only_changes_are_not_news_and_leaving_the_selection_is_a_deletion() {
        let f = ServiceFilter::parse(Some("scm=1")).unwrap();
        let mut store: HashMap<ObjectKey, Arc<Service>> = HashMap::new();
        let a = svc("a", &[("scm", "1")]);
        let k = ObjectKey::new("a", "a");
        assert_eq!(
            apply_service_change(&f, &mut store, &Change::Relisted(vec![a.clone()])),
            vec![k.clone()]
        );
        // The load-balancer controller writes status: nothing to reconcile.
        let mut with_status = (*a).clone();
        with_status.status = Some(ServiceStatus::default());
        with_status.metadata.resource_version = Some("2".into());
        assert!(
            apply_service_change(&f, &mut store, &Change::Apply(Arc::new(with_status))).is_empty()
        );
        // A relabel out of scope removes it, as a selector watch would have.
        let out = svc("a", &[("scm", "2")]);
        assert_eq!(
            apply_service_change(&f, &mut store, &Change::Apply(out.clone())),
            vec![k.clone()]
        );
        assert!(store.is_empty());
        assert!(apply_service_change(&f, &mut store, &Change::Apply(out)).is_empty());
    }

    #[tokio::test]
    async fn batched_urgent_keys_wait_the_batch_period_then_go_first() {
        let cfg = kube::Config::new("http://127.0.0.1:9".parse().expect("uri"));
        let client = kube::Client::try_from(cfg).expect("client");
        let (gate, _tx) = scm_runtime::LeaderGate::fixed(true);
        let ctx = scm_runtime::ContextBase::new(client, gate).context("es", "es");
        let shell = ShellConfig {
            batch_period: Duration::from_secs(1),
            ..Default::default()
        };
        let base = ShellBase::new(ctx, &shell, 1).expect("base");
        let (a, b, c) = (
            ObjectKey::new("n", "a"),
            ObjectKey::new("n", "b"),
            ObjectKey::new("n", "c"),
        );
        base.add(a.clone());
        base.add_all_batched_with(vec![
            (b.clone(), Priority::Ordinary),
            (c.clone(), Priority::Urgent),
        ]);
        assert_eq!(base.queue.len(), 1, "batched keys wait the batch period");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while base.queue.len() < 3 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "batched keys never came"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut got = Vec::new();
        while !base.queue.is_empty() {
            got.extend(base.queue.get().await);
        }
        assert_eq!(got, vec![c, a, b]);
    }
}
