//! One watch per resource kind for the whole process, fanned out to every controller's index.
//!
//! [`Informers`] is the hub the binary hands every controller (through its context). The first
//! controller that asks for a kind starts that kind's only watch; every object is trimmed once on
//! arrival (to what any controller reads), kept once in the informer's store as an `Arc`, and
//! handed to each subscriber as a [`Change`]. A subscriber keeps its own index (and shares the
//! `Arc`s, so a Service held by six controllers is in memory once).
//!
//! A relist (the first list, or a new list after the watch was down or answered 410 Gone) is
//! delivered as one [`Change::Relisted`] with the complete new set: a subscriber must reconcile
//! its whole index with it, including objects deleted while the watch was down. A subscriber
//! that arrives after the first list gets the current store as its own `Relisted` at once, so the
//! order in which controllers start does not matter.
//!
//! Subscribers run on the watch task with the subscriber list locked: they must be quick and
//! must not block (lock their index, update it, queue keys). They may read any informer's
//! store ([`Informer::get`], [`Informer::list`]).

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Endpoints, Node, Service};
use k8s_openapi::api::networking::v1::{IPAddress, ServiceCIDR};
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::ObjectKey;

pub mod store;
pub mod trim;

use store::Store;
pub use store::{KeyFn, key_of};

/// One change seen by a kind's watch, as every subscriber receives it.
#[derive(Debug)]
pub enum Change<T> {
    /// An object was added or modified.
    Apply(Arc<T>),
    /// An object was deleted. The value is the last state the watch saw.
    Delete(Arc<T>),
    /// The watch (re)listed: this is the complete set, replacing everything seen before.
    Relisted(Vec<Arc<T>>),
}

type Subscriber<T> = Box<dyn FnMut(&Change<T>) + Send>;

struct Shared<T> {
    kind: &'static str,
    store: RwLock<Store<T>>,
    synced: AtomicBool,
    relists: AtomicU64,
    /// When the watch last failed with no success since, if it is failing now.
    failing_since: Mutex<Option<Instant>>,
    subscribers: Mutex<Vec<Subscriber<T>>>,
}

/// The process's one watch of a kind: its store and its subscribers.
pub struct Informer<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Clone for Informer<T> {
    fn clone(&self) -> Self {
        Informer {
            shared: self.shared.clone(),
        }
    }
}

impl<T: Send + Sync + 'static> Informer<T> {
    /// An informer with no watch behind it: tests and benchmarks feed it with [`Self::deliver`].
    pub fn detached(kind: &'static str, key: KeyFn<T>) -> Self {
        Informer {
            shared: Arc::new(Shared {
                kind,
                store: RwLock::new(Store::new(key)),
                synced: AtomicBool::new(false),
                relists: AtomicU64::new(0),
                failing_since: Mutex::new(None),
                subscribers: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Adds a subscriber. If the first list is already in, it receives the current store as a
    /// [`Change::Relisted`] before this returns; otherwise it receives the first list when it
    /// arrives. Every later change follows in watch order.
    pub fn subscribe(&self, f: impl FnMut(&Change<T>) + Send + 'static) {
        let mut subs = lock(&self.shared.subscribers);
        let mut f: Subscriber<T> = Box::new(f);
        if self.is_synced() {
            f(&Change::Relisted(self.list()));
        }
        subs.push(f);
    }

    /// The object with this key, as last seen.
    pub fn get(&self, key: &ObjectKey) -> Option<Arc<T>> {
        read(&self.shared.store)
            .get(&key.namespace, &key.name)
            .cloned()
    }

    /// Every object, as last seen (in no particular order).
    pub fn list(&self) -> Vec<Arc<T>> {
        read(&self.shared.store).values().cloned().collect()
    }

    /// Whether the first list has arrived.
    pub fn is_synced(&self) -> bool {
        self.shared.synced.load(Ordering::SeqCst)
    }

    /// How many complete lists the watch has delivered (1 after the first list).
    pub fn relists(&self) -> u64 {
        self.shared.relists.load(Ordering::SeqCst)
    }

    /// How long the watch has been failing with no success in between, if it is failing.
    pub fn failing_for(&self) -> Option<Duration> {
        lock(&self.shared.failing_since).map(|t| t.elapsed())
    }

    fn note_error(&self) {
        lock(&self.shared.failing_since).get_or_insert_with(Instant::now);
    }

    fn note_success(&self) {
        *lock(&self.shared.failing_since) = None;
    }

    /// The resource kind, for logs.
    pub fn kind(&self) -> &'static str {
        self.shared.kind
    }

    /// Applies one change to the store and hands it to every subscriber. The watch task calls
    /// it; tests and benchmarks may feed an informer directly.
    pub fn deliver(&self, change: Change<T>) {
        {
            let mut store = write(&self.shared.store);
            match &change {
                Change::Apply(o) => store.insert(o.clone()),
                Change::Delete(o) => store.remove(o),
                Change::Relisted(list) => store.replace_all(list),
            }
        }
        if matches!(change, Change::Relisted(_)) {
            self.shared.relists.fetch_add(1, Ordering::SeqCst);
            self.shared.synced.store(true, Ordering::SeqCst);
        }
        let mut subs = lock(&self.shared.subscribers);
        for f in subs.iter_mut() {
            f(&change);
        }
    }
}

fn lock<X>(m: &Mutex<X>) -> std::sync::MutexGuard<'_, X> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn read<X>(m: &RwLock<X>) -> std::sync::RwLockReadGuard<'_, X> {
    m.read().unwrap_or_else(|e| e.into_inner())
}

fn write<X>(m: &RwLock<X>) -> std::sync::RwLockWriteGuard<'_, X> {
    m.write().unwrap_or_else(|e| e.into_inner())
}

/// The process's informers, one per kind, started on first use. Cheap to clone.
#[derive(Clone)]
pub struct Informers {
    hub: Arc<Hub>,
}

struct Hub {
    client: kube::Client,
    shutdown: CancellationToken,
    kinds: Mutex<HashMap<TypeId, Box<dyn Any + Send + Sync>>>,
    /// Each started informer's kind and how long its watch has been failing.
    health: Mutex<Vec<HealthProbe>>,
}

type HealthProbe = Box<dyn Fn() -> (&'static str, Option<Duration>) + Send + Sync>;

impl Informers {
    /// A hub whose watches use `client` and stop when `shutdown` is cancelled.
    pub fn new(client: kube::Client, shutdown: CancellationToken) -> Self {
        Informers {
            hub: Arc::new(Hub {
                client,
                shutdown,
                kinds: Mutex::new(HashMap::new()),
                health: Mutex::new(Vec::new()),
            }),
        }
    }

    /// The informer of kind `K`, each object turned into `T` by `prep` as it arrives. The first
    /// call starts the kind's watch (so it must run inside the tokio runtime); later calls
    /// return the same informer. Every caller of one kind must use the same `prep`: the trim
    /// is chosen once for the whole process, which is why the kinds most controllers read have
    /// named accessors below.
    ///
    /// # Panics
    /// If two callers ask for the same kind as different types `T` (a wiring bug, caught by
    /// any test that starts both controllers).
    pub fn kind<K, T>(&self, prep: fn(K) -> T, key: KeyFn<T>) -> Informer<T>
    where
        K: kube::Resource<DynamicType = ()>
            + Clone
            + DeserializeOwned
            + Debug
            + Send
            + Sync
            + 'static,
        T: Send + Sync + 'static,
    {
        let mut kinds = lock(&self.hub.kinds);
        if let Some(existing) = kinds.get(&TypeId::of::<K>()) {
            return existing
                .downcast_ref::<Informer<T>>()
                .unwrap_or_else(|| {
                    panic!(
                        "informer for {} requested as two different types",
                        K::kind(&())
                    )
                })
                .clone();
        }
        let kind: &'static str = Box::leak(K::kind(&()).into_owned().into_boxed_str());
        let informer = Informer::detached(kind, key);
        kinds.insert(TypeId::of::<K>(), Box::new(informer.clone()));
        let probe = informer.clone();
        lock(&self.hub.health).push(Box::new(move || (probe.kind(), probe.failing_for())));
        let api = Api::<K>::all(self.hub.client.clone());
        tokio::spawn(run_watch(
            api,
            informer.clone(),
            prep,
            self.hub.shutdown.clone(),
        ));
        info!(kind, "informer started");
        informer
    }

    /// The kinds whose watch has been failing, with no success in between, for longer than
    /// `bound` (with how long): a process that cannot see the cluster should say so on
    /// `/healthz` rather than look healthy while acting on an ever older view.
    pub fn stalled(&self, bound: Duration) -> Vec<(&'static str, Duration)> {
        lock(&self.hub.health)
            .iter()
            .filter_map(|h| {
                let (kind, failing) = h();
                failing.filter(|d| *d > bound).map(|d| (kind, d))
            })
            .collect()
    }

    /// Services, trimmed by [`trim::service`].
    pub fn services(&self) -> Informer<Service> {
        self.kind(trim::service, key_of)
    }

    /// Nodes, trimmed by [`trim::node`].
    pub fn nodes(&self) -> Informer<Node> {
        self.kind(trim::node, key_of)
    }

    /// Legacy Endpoints, trimmed by [`trim::meta`].
    pub fn endpoints(&self) -> Informer<Endpoints> {
        self.kind(trim::meta, key_of)
    }

    /// ServiceCIDRs, trimmed by [`trim::meta`].
    pub fn service_cidrs(&self) -> Informer<ServiceCIDR> {
        self.kind(trim::meta, key_of)
    }

    /// IPAddresses, trimmed by [`trim::meta`].
    pub fn ip_addresses(&self) -> Informer<IPAddress> {
        self.kind(trim::meta, key_of)
    }
}

/// The watch loop of one kind: buffers a relist until it is complete, then delivers it whole.
/// Errors are logged and retried with kube-runtime's default backoff, so one bad moment never
/// stops the informer.
async fn run_watch<K, T>(
    api: Api<K>,
    informer: Informer<T>,
    prep: fn(K) -> T,
    shutdown: CancellationToken,
) where
    K: kube::Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    T: Send + Sync + 'static,
{
    let stream = watcher(api, watcher::Config::default()).default_backoff();
    futures::pin_mut!(stream);
    let mut buf: Vec<Arc<T>> = Vec::new();
    loop {
        let ev = tokio::select! {
            _ = shutdown.cancelled() => return,
            ev = stream.next() => ev,
        };
        // `Init` says a list is about to be tried, not that one worked: kube's watcher emits it
        // again before every retry of a failing list, so counting it would keep a list that
        // never succeeds from ever reaching the health bound.
        if matches!(ev, Some(Ok(ref e)) if !matches!(e, watcher::Event::Init)) {
            informer.note_success();
        }
        match ev {
            None => return,
            Some(Err(e)) => {
                informer.note_error();
                warn!(kind = informer.kind(), error = %e, "watch error; retrying");
                continue;
            }
            // Drop the previous list's capacity too: it is only needed while listing.
            Some(Ok(watcher::Event::Init)) => buf = Vec::new(),
            Some(Ok(watcher::Event::InitApply(o))) => buf.push(Arc::new(prep(o))),
            Some(Ok(watcher::Event::InitDone)) => {
                let list = std::mem::take(&mut buf);
                debug!(kind = informer.kind(), objects = list.len(), "relisted");
                informer.deliver(Change::Relisted(list));
            }
            Some(Ok(watcher::Event::Apply(o))) => {
                informer.deliver(Change::Apply(Arc::new(prep(o))))
            }
            Some(Ok(watcher::Event::Delete(o))) => {
                informer.deliver(Change::Delete(Arc::new(prep(o))))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn svc(name: &str) -> Arc<Service> {
        Arc::new(Service {
            metadata: ObjectMeta {
                namespace: Some("a".into()),
                name: Some(name.into()),
                ..Default::default()
            },
            ..Default::default()
        })
    }

    fn names(list: &[Arc<Service>]) -> Vec<String> {
        let mut v: Vec<String> = list
            .iter()
            .map(|s| s.metadata.name.clone().unwrap_or_default())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn late_subscriber_gets_the_store_as_a_relist_then_changes() {
        let inf = Informer::<Service>::detached("Service", key_of);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let early = seen.clone();
        inf.subscribe(move |c| {
            lock(&early).push(format!("early:{}", describe(c)));
        });
        inf.deliver(Change::Relisted(vec![svc("x"), svc("y")]));
        let late = seen.clone();
        inf.subscribe(move |c| {
            lock(&late).push(format!("late:{}", describe(c)));
        });
        inf.deliver(Change::Delete(svc("x")));
        assert_eq!(
            *lock(&seen),
            vec![
                "early:relisted x,y",
                "late:relisted x,y",
                "early:delete x",
                "late:delete x",
            ]
        );
        assert_eq!(names(&inf.list()), vec!["y"]);
        assert!(inf.is_synced());
        assert_eq!(inf.relists(), 1);
    }

    #[test]
    fn relist_replaces_the_store_including_deletions_missed_while_down() {
        let inf = Informer::<Service>::detached("Service", key_of);
        inf.deliver(Change::Relisted(vec![svc("x"), svc("y")]));
        inf.deliver(Change::Apply(svc("z")));
        // The watch was down while x and z were deleted; the new list has only y.
        inf.deliver(Change::Relisted(vec![svc("y")]));
        assert_eq!(names(&inf.list()), vec!["y"]);
        assert!(inf.get(&ObjectKey::new("a", "x")).is_none());
        assert_eq!(inf.relists(), 2);
    }

    #[test]
    fn a_failing_watch_reports_how_long_until_it_succeeds() {
        let inf = Informer::<Service>::detached("Service", key_of);
        assert!(inf.failing_for().is_none());
        inf.note_error();
        let first = inf.failing_for().expect("failing");
        inf.note_error(); // a later error keeps the first failure's time
        assert!(inf.failing_for().expect("failing") >= first);
        inf.note_success();
        assert!(inf.failing_for().is_none());
    }

    fn describe(c: &Change<Service>) -> String {
        match c {
            Change::Apply(s) => format!("apply {}", names(std::slice::from_ref(s))[0]),
            Change::Delete(s) => format!("delete {}", names(std::slice::from_ref(s))[0]),
            Change::Relisted(l) => format!("relisted {}", names(l).join(",")),
        }
    }
}
