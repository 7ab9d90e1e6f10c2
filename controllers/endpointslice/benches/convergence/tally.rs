//! The bench's own watch on EndpointSlices: what each manager's slices hold, how many writes
//! each manager made, and when a pending readiness change became visible.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use endpointslice::common::{LABEL_MANAGED_BY, LABEL_SERVICE_NAME};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Client;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};

use crate::shape::Shape;

/// The key of [`Tally::writes`] under which changes of the Services' `status.conditions` are
/// counted (only our controller writes them: its `EndpointsReady`).
pub const CONDITIONS: &str = "(Service conditions)";

/// A slice as the bench sees it: (managed-by, service, endpoints as (pod, ready)).
pub type SliceSeen = (String, String, Vec<(String, bool)>);

/// What the watch on EndpointSlices has seen, per managed-by value.
#[derive(Default)]
pub struct Tally {
    /// slice uid -> what it holds
    pub slices: HashMap<String, SliceSeen>,
    /// Writes (slice creates, updates, deletes) seen per managed-by value.
    pub writes: HashMap<String, usize>,
    /// When the last write per managed-by value was seen.
    pub last_write: HashMap<String, Instant>,
    /// Readiness changes not visible yet: pod -> (ready wanted, when it was asked for).
    pub pending: HashMap<String, (bool, Instant)>,
    /// Change -> slice latencies of the changes that became visible.
    pub latencies: Vec<Duration>,
    /// The same, of the changes to not ready only (latency mode).
    pub removals: Vec<Duration>,
    /// Of those, the ones of the large Service's pods (where a plan spans many slices).
    pub big_removals: Vec<Duration>,
    /// And those of the small Services' pods.
    pub small_removals: Vec<Duration>,
    /// The manager whose slices close pending changes.
    pub watching_for: String,
}

/// Shared handle on the tally.
pub type Shared = Arc<Mutex<Tally>>;

/// Locks the tally (a poisoned lock still holds good counts).
pub fn lock(t: &Shared) -> MutexGuard<'_, Tally> {
    t.lock().unwrap_or_else(|e| e.into_inner())
}

impl Tally {
    /// Whether `managed_by`'s slices hold every pod of `shape` once per Service with the
    /// readiness in `ready`; and how many endpoints they hold.
    pub fn converged(
        &self,
        managed_by: &str,
        ready: &HashMap<String, bool>,
        shape: &Shape,
    ) -> (bool, usize) {
        let mut services = HashSet::new();
        let mut total = 0;
        let mut ok = true;
        for (m, svc, eps) in self.slices.values() {
            if m != managed_by {
                continue;
            }
            services.insert(svc.as_str());
            total += eps.len();
            for (pod, r) in eps {
                if ready.get(pod) != Some(r) {
                    ok = false;
                }
            }
        }
        (
            ok && total == shape.total_pods() && services.len() == shape.services(),
            total,
        )
    }

    /// Writes seen from `managed_by`.
    pub fn writes_of(&self, managed_by: &str) -> usize {
        self.writes.get(managed_by).copied().unwrap_or(0)
    }

    fn count_write(&mut self, managed_by: &str) {
        *self.writes.entry(managed_by.to_string()).or_default() += 1;
        self.last_write
            .insert(managed_by.to_string(), Instant::now());
    }
}

fn slice_view(s: &EndpointSlice) -> Option<(String, SliceSeen)> {
    let labels = s.metadata.labels.as_ref()?;
    let m = labels.get(LABEL_MANAGED_BY)?.clone();
    let svc = labels.get(LABEL_SERVICE_NAME)?.clone();
    let eps = s
        .endpoints
        .iter()
        .flatten()
        .map(|e| {
            (
                e.target_ref
                    .as_ref()
                    .and_then(|r| r.name.clone())
                    .unwrap_or_default(),
                e.conditions.as_ref().and_then(|c| c.ready) == Some(true),
            )
        })
        .collect();
    Some((s.metadata.uid.clone().unwrap_or_default(), (m, svc, eps)))
}

/// Watches the slices of `namespace` into `tally` until the process ends.
pub async fn watch_slices(client: Client, namespace: String, tally: Shared) {
    let api: Api<EndpointSlice> = Api::namespaced(client, &namespace);
    let stream = watcher(api, watcher::Config::default()).default_backoff();
    futures::pin_mut!(stream);
    let mut live = false;
    while let Some(ev) = stream.next().await {
        let Ok(ev) = ev else { continue };
        let mut t = lock(&tally);
        match ev {
            watcher::Event::InitDone => live = true,
            watcher::Event::InitApply(s) => {
                if let Some((uid, v)) = slice_view(&s) {
                    t.slices.insert(uid, v);
                }
            }
            watcher::Event::Apply(s) => {
                if let Some((uid, v)) = slice_view(&s) {
                    if live {
                        t.count_write(&v.0);
                    }
                    if v.0 == t.watching_for {
                        let now = Instant::now();
                        let mut done = Vec::new();
                        for (pod, r) in &v.2 {
                            if let Some((want, t0)) = t.pending.get(pod)
                                && want == r
                            {
                                done.push((pod.clone(), now - *t0, *want));
                            }
                        }
                        for (p, d, want) in done {
                            t.pending.remove(&p);
                            t.latencies.push(d);
                            if !want {
                                t.removals.push(d);
                                if p.starts_with("big-") {
                                    t.big_removals.push(d);
                                } else {
                                    t.small_removals.push(d);
                                }
                            }
                        }
                    }
                    t.slices.insert(uid, v);
                }
            }
            watcher::Event::Delete(s) => {
                if let Some((uid, v)) = slice_view(&s) {
                    if live {
                        t.count_write(&v.0);
                    }
                    t.slices.remove(&uid);
                }
            }
            watcher::Event::Init => {}
        }
    }
}

/// Watches the Services of `namespace` into `tally`, counting each change of a Service's
/// `status.conditions` under [`CONDITIONS`] until the process ends.
pub async fn watch_services(client: Client, namespace: String, tally: Shared) {
    let api: Api<Service> = Api::namespaced(client, &namespace);
    let stream = watcher(api, watcher::Config::default()).default_backoff();
    futures::pin_mut!(stream);
    let mut seen: HashMap<String, String> = HashMap::new();
    let conditions = |s: &Service| {
        serde_json::to_string(&s.status.as_ref().and_then(|st| st.conditions.clone()))
            .unwrap_or_default()
    };
    while let Some(ev) = stream.next().await {
        let Ok(ev) = ev else { continue };
        match ev {
            watcher::Event::InitApply(s) => {
                seen.insert(s.metadata.uid.clone().unwrap_or_default(), conditions(&s));
            }
            watcher::Event::Apply(s) => {
                let now = conditions(&s);
                let uid = s.metadata.uid.clone().unwrap_or_default();
                let before = seen.insert(uid, now.clone());
                if before.is_some_and(|b| b != now) {
                    lock(&tally).count_write(CONDITIONS);
                }
            }
            _ => {}
        }
    }
}
