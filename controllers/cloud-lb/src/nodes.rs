//! Node changes that matter to load balancers, and the node-sync passes they trigger.
//!
//! Only additions, deletions and changes of the exclusion label or providerID trigger a pass
//! (upstream's `shouldSyncUpdatedNode`); a pass queues every served Service once, batched over
//! [`crate::NODE_SYNC_DEBOUNCE`] and at least every [`crate::NODE_SYNC_PERIOD`]. Each Service's
//! reconcile then compares the node set it last synced and updates hosts only where it differs.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use k8s_openapi::api::core::v1::Node;
use scm_runtime::{Change, Informer, ObjectKey};
use tokio::sync::Notify;

use crate::core;

/// Subscribes to the Node informer: `dirty` is notified whenever the node set may have changed
/// in a way a load balancer cares about (including across a relist). With `drain`
/// (endpoint-aware targets), cordoning and the autoscaler's taint matter too.
pub(crate) fn watch_nodes(nodes: &Informer<Node>, dirty: Arc<Notify>, drain: bool) {
    let matters = move |old: &Node, new: &Node| {
        core::node_update_triggers_sync(old, new)
            || (drain && core::targets::drain_changed(old, new))
    };
    // The previous state of each node, to tell which updates matter (the informer hands over
    // only the new one). The Arcs are the informer's own.
    let mut seen: HashMap<String, Arc<Node>> = HashMap::new();
    nodes.subscribe(move |c| match c {
        Change::Apply(n) => {
            let name = n.metadata.name.clone().unwrap_or_default();
            let trigger = seen.get(&name).is_none_or(|old| matters(old, n));
            seen.insert(name, n.clone());
            if trigger {
                dirty.notify_one();
            }
        }
        Change::Delete(n) => {
            seen.remove(n.metadata.name.as_deref().unwrap_or_default());
            dirty.notify_one();
        }
        Change::Relisted(list) => {
            let fresh: HashMap<String, Arc<Node>> = list
                .iter()
                .map(|n| (n.metadata.name.clone().unwrap_or_default(), n.clone()))
                .collect();
            let changed = fresh.len() != seen.len()
                || fresh
                    .iter()
                    .any(|(k, n)| seen.get(k).is_none_or(|o| matters(o, n)));
            seen = fresh;
            if changed {
                dirty.notify_one();
            }
        }
    });
}

/// The stable node set (sorted by name) from the informer's store.
pub(crate) fn stable_nodes(nodes: &Informer<Node>) -> Vec<Arc<Node>> {
    let mut v: Vec<Arc<Node>> = nodes
        .list()
        .into_iter()
        .filter(|n| core::in_stable_set(n))
        .collect();
    v.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    v
}

/// The node-sync pass in progress, for `service_controller_nodesync_latency_seconds`: when it
/// was queued and the Services it still waits for. A pass queued while another is unfinished
/// joins it (keeping the earlier start), so a slow pass shows as one long observation rather
/// than disappearing.
#[derive(Default)]
pub(crate) struct NodeSyncPass {
    inner: Mutex<PassState>,
}

#[derive(Default)]
struct PassState {
    started: Option<Instant>,
    waiting: HashSet<ObjectKey>,
}

impl NodeSyncPass {
    fn lock(&self) -> std::sync::MutexGuard<'_, PassState> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A pass queued `keys`.
    pub fn begin(&self, keys: &[ObjectKey]) {
        let mut p = self.lock();
        if keys.is_empty() && p.waiting.is_empty() {
            return;
        }
        p.started.get_or_insert_with(Instant::now);
        p.waiting.extend(keys.iter().cloned());
    }

    /// Called after every reconcile: the pass (as upstream measures it, across all Services)
    /// ends when the last Service it queued has been reconciled; its duration is returned.
    pub fn reconciled(&self, key: &ObjectKey) -> Option<f64> {
        let mut p = self.lock();
        if p.waiting.remove(key) && p.waiting.is_empty() {
            return p.started.take().map(|s| s.elapsed().as_secs_f64());
        }
        None
    }

    /// Leadership lost: in-flight reconciles were dropped, so the pass will not finish.
    pub fn abandon(&self) {
        *self.lock() = PassState::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn node(name: &str, labels: &[(&str, &str)]) -> Arc<Node> {
        Arc::new(Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..Default::default()
            },
            ..Default::default()
        })
    }

    #[test]
    fn only_changes_that_matter_notify_including_across_a_relist() {
        let inf = Informer::<Node>::detached("Node", scm_runtime::informer::key_of);
        let dirty = Arc::new(Notify::new());
        watch_nodes(&inf, dirty.clone(), false);
        // A notification with no waiter is kept as a permit: one poll takes it.
        let fired = || dirty.notified().now_or_never().is_some();
        inf.deliver(Change::Relisted(vec![node("a", &[])]));
        assert!(fired(), "first list");
        inf.deliver(Change::Apply(node("a", &[("team", "blue")])));
        assert!(!fired(), "an unrelated label");
        inf.deliver(Change::Apply(node(
            "a",
            &[(core::EXCLUDE_LB_LABEL, "true")],
        )));
        assert!(fired(), "excluded");
        inf.deliver(Change::Relisted(vec![node(
            "a",
            &[(core::EXCLUDE_LB_LABEL, "true")],
        )]));
        assert!(!fired(), "a relist with nothing new");
        // b came and went while the watch was down; a was deleted meanwhile.
        inf.deliver(Change::Relisted(vec![]));
        assert!(fired(), "a deletion missed while the watch was down");
    }

    #[test]
    fn cordoning_notifies_only_with_endpoint_aware_targets() {
        for drain in [false, true] {
            let inf = Informer::<Node>::detached("Node", scm_runtime::informer::key_of);
            let dirty = Arc::new(Notify::new());
            watch_nodes(&inf, dirty.clone(), drain);
            let fired = || dirty.notified().now_or_never().is_some();
            inf.deliver(Change::Relisted(vec![node("a", &[])]));
            assert!(fired(), "first list");
            let mut cordoned = (*node("a", &[])).clone();
            cordoned.spec.get_or_insert_default().unschedulable = Some(true);
            inf.deliver(Change::Apply(Arc::new(cordoned)));
            // Upstream ignores cordoning (readiness and schedulability are the health
            // check's business); drain deregisters the node at once.
            assert_eq!(fired(), drain, "cordoned, drain={drain}");
        }
    }

    #[test]
    fn a_pass_is_observed_once_when_its_last_service_is_done() {
        let p = NodeSyncPass::default();
        let (a, b) = (ObjectKey::new("ns", "a"), ObjectKey::new("ns", "b"));
        p.begin(&[a.clone(), b.clone()]);
        assert_eq!(p.reconciled(&a), None);
        // A second pass joins the first.
        p.begin(std::slice::from_ref(&a));
        assert_eq!(p.reconciled(&b), None);
        assert!(p.reconciled(&a).is_some());
        assert_eq!(p.reconciled(&a), None, "observed once");
        p.begin(std::slice::from_ref(&a));
        p.abandon();
        assert_eq!(p.reconciled(&a), None, "abandoned");
    }
}
