//! The shell's subscriptions to the process's shared informers: Services (every change of one
//! we may act on, or remember, queues its key) and, with endpoint-aware targets, EndpointSlices
//! (a Local Service of ours is queued when the nodes holding its endpoints change).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::Service;
use scm_runtime::{Change, ControllerContext, Informer, ObjectKey, WorkQueue};
use tracing::debug;

use super::{Memory, lock};
use crate::core::{self, Action, ClassFilter};
use crate::endpoints::{self, EndpointIndex};

/// The EndpointSlice informer (the process's one) and our index of it.
pub(super) struct Endpoints {
    pub index: Arc<EndpointIndex>,
    pub slices: Informer<endpointslice::slice_record::SliceRecord>,
}

/// Subscribes to the process's EndpointSlice informer (opening no watch of our own): a Service
/// of ours with `externalTrafficPolicy: Local` is queued when the nodes holding its endpoints
/// change, so a node whose last endpoint starts terminating is deregistered at once.
pub(super) fn watch_endpoints(
    ctx: &ControllerContext,
    services: &Informer<Service>,
    filter: &ClassFilter,
    queue: &WorkQueue<ObjectKey>,
) -> Endpoints {
    let slices = endpointslice::slice_record::endpoint_slices(&ctx.informers);
    let index = Arc::new(EndpointIndex::default());
    let (services, filter, queue) = (services.clone(), filter.clone(), queue.clone());
    endpoints::watch_slices(&slices, index.clone(), move |key| {
        let local_and_ours = services.get(&key).is_some_and(|s| {
            core::targets::local_traffic(&s) && core::action(&s, &filter) == Action::Ensure
        });
        if local_and_ours {
            debug!(service = %key, "endpoint nodes changed");
            queue.add(key);
        }
    });
    Endpoints { index, slices }
}

/// Subscribes to the Service informer: every change of a Service we may act on, or remember,
/// queues its key. A relist also queues what we remember but is no longer listed (deleted while
/// the watch was down), so its load balancer is still cleaned up.
pub(super) fn watch_services(
    services: &Informer<Service>,
    filter: &ClassFilter,
    memory: &Arc<Mutex<Memory>>,
    queue: &WorkQueue<ObjectKey>,
) {
    let (filter, memory, queue) = (filter.clone(), memory.clone(), queue.clone());
    services.subscribe(move |c| {
        let wanted = |s: &Service, key: &ObjectKey| {
            let mut m = lock(&memory);
            m.note_leaving(s, key, &filter);
            core::action(s, &filter) != Action::Ignore || m.remembers(key)
        };
        match c {
            Change::Apply(s) => {
                let key = ObjectKey::of(s.as_ref());
                if wanted(s, &key) {
                    queue.add(key);
                }
            }
            Change::Delete(s) => {
                let key = ObjectKey::of(s.as_ref());
                let mut m = lock(&memory);
                m.starved.remove(&key);
                if m.remembers(&key) {
                    drop(m);
                    queue.add(key);
                }
            }
            Change::Relisted(list) => {
                let mut listed = HashSet::with_capacity(list.len());
                for s in list {
                    let key = ObjectKey::of(s.as_ref());
                    if wanted(s, &key) {
                        queue.add(key.clone());
                    }
                    listed.insert(key);
                }
                let missed: Vec<ObjectKey> = lock(&memory)
                    .services
                    .iter()
                    .filter(|(k, r)| {
                        (r.last.is_some() || r.refused.is_some() || r.left) && !listed.contains(*k)
                    })
                    .map(|(k, _)| k.clone())
                    .collect();
                for key in missed {
                    queue.add(key);
                }
            }
        }
    });
}
