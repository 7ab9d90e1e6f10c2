//! The EndpointSlices a controller manages, as the EndpointSlice and mirroring shells both
//! keep them: an index by Service of the slices carrying our managed-by value (filtered here:
//! the process's one slice informer holds every manager's), and the generation tracker that
//! tells our own writes' echoes from news and a stale view from a current one.

use std::borrow::Borrow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use k8s_openapi::api::discovery::v1::EndpointSlice;
use scm_runtime::ObjectKey;
use scm_runtime::informer::Change;

use crate::common::{LABEL_MANAGED_BY, LABEL_SERVICE_NAME};
use crate::slice_record::{SliceMeta, SliceRecord};

/// Upstream's EndpointSliceTracker: the generation of every slice we wrote, or "deletion
/// expected", per Service. A cache showing an older generation (or a slice we deleted) is
/// stale: we wait for it to catch up instead of acting on it.
#[derive(Default)]
pub struct SliceTracker {
    by_service: Mutex<HashMap<ObjectKey, HashMap<String, i64>>>,
}

const DELETION_EXPECTED: i64 = -1;

fn uid(s: &impl SliceMeta) -> String {
    s.meta().uid.clone().unwrap_or_default()
}

fn generation(s: &impl SliceMeta) -> i64 {
    s.meta().generation.unwrap_or(0)
}

impl SliceTracker {
    fn lock(&self) -> MutexGuard<'_, HashMap<ObjectKey, HashMap<String, i64>>> {
        self.by_service.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a slice as written by us at its generation.
    pub fn update(&self, key: &ObjectKey, s: &impl SliceMeta) {
        self.lock()
            .entry(key.clone())
            .or_default()
            .insert(uid(s), generation(s));
    }

    /// Records that we deleted a slice.
    pub fn expect_deletion(&self, key: &ObjectKey, s: &impl SliceMeta) {
        self.lock()
            .entry(key.clone())
            .or_default()
            .insert(uid(s), DELETION_EXPECTED);
    }

    /// Whether a slice event is news to us (not merely the echo of our own write).
    pub fn should_sync(&self, key: &ObjectKey, s: &impl SliceMeta) -> bool {
        match self.lock().get(key).and_then(|m| m.get(&uid(s))) {
            None => true,
            Some(g) => generation(s) > *g,
        }
    }

    /// Handles a deletion event; true if it was one we expected.
    pub fn handle_deletion(&self, key: &ObjectKey, s: &impl SliceMeta) -> bool {
        let mut g = self.lock();
        match g.get_mut(key).and_then(|m| m.remove(&uid(s))) {
            Some(DELETION_EXPECTED) => true,
            Some(_) => false,
            None => false,
        }
    }

    /// Whether `slices` (what the cache shows) is older than what we wrote.
    pub fn stale(&self, key: &ObjectKey, slices: &[impl Borrow<EndpointSlice>]) -> bool {
        let g = self.lock();
        let Some(m) = g.get(key) else { return false };
        let mut seen = HashSet::new();
        for s in slices {
            let s = s.borrow();
            seen.insert(uid(s));
            if let Some(want) = m.get(&uid(s))
                && (*want == DELETION_EXPECTED || *want > generation(s))
            {
                return true;
            }
        }
        m.iter()
            .any(|(u, g)| *g != DELETION_EXPECTED && !seen.contains(u))
    }

    /// Forgets a Service.
    pub fn delete_service(&self, key: &ObjectKey) {
        self.lock().remove(key);
    }

    /// Reconciles the tracker with a relist: slices missing from the complete new list were
    /// deleted while the watch was down (their deletion events are lost), so their entries go;
    /// otherwise `stale()` would wait forever for a slice that will never be shown again.
    /// (A write made after the list was taken is forgotten too, until its event arrives; as
    /// upstream's relist, that costs at most a redundant write, never a frozen Service.)
    /// Returns the Services whose entries changed.
    pub fn retain_listed(&self, listed: &HashMap<ObjectKey, HashSet<String>>) -> Vec<ObjectKey> {
        let mut changed = Vec::new();
        self.lock().retain(|key, m| {
            let before = m.len();
            match listed.get(key) {
                Some(uids) => m.retain(|u, _| uids.contains(u)),
                None => m.clear(),
            }
            if m.len() != before {
                changed.push(key.clone());
            }
            !m.is_empty()
        });
        changed
    }
}

/// The Service a slice belongs to (its `kubernetes.io/service-name` label).
pub fn service_key_of(s: &impl SliceMeta) -> Option<ObjectKey> {
    let name = s.meta().labels.as_ref()?.get(LABEL_SERVICE_NAME)?;
    if name.is_empty() {
        return None;
    }
    Some(ObjectKey::new(
        s.meta().namespace.clone().unwrap_or_default(),
        name.clone(),
    ))
}

/// A slice's `managed-by` label.
pub fn managed_by(s: &impl SliceMeta) -> Option<&str> {
    s.meta()
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_MANAGED_BY))
        .map(String::as_str)
}

/// One controller's slices by Service, and by (namespace, name) to notice relabelling.
#[derive(Default)]
pub struct SliceCache {
    managers: Vec<&'static str>,
    by_service: HashMap<ObjectKey, BTreeMap<String, Arc<SliceRecord>>>,
    owner: HashMap<(String, String), ObjectKey>,
}

impl SliceCache {
    /// Slices whose managed-by value is one of `managers`.
    pub fn new(managers: Vec<&'static str>) -> Self {
        SliceCache {
            managers,
            ..Default::default()
        }
    }

    /// Whether a slice is one this cache keeps.
    pub fn keeps(&self, s: &impl SliceMeta) -> bool {
        managed_by(s).is_some_and(|m| self.managers.contains(&m))
    }

    /// The slices of one Service (including those being deleted).
    pub fn of(&self, key: &ObjectKey) -> impl Iterator<Item = &Arc<SliceRecord>> {
        self.by_service
            .get(key)
            .into_iter()
            .flat_map(|m| m.values())
    }

    /// The Services holding slices.
    pub fn services(&self) -> impl Iterator<Item = &ObjectKey> {
        self.by_service.keys()
    }

    fn insert(&mut self, key: ObjectKey, sl: Arc<SliceRecord>) -> Option<ObjectKey> {
        let name = sl.metadata.name.clone().unwrap_or_default();
        let at = (key.namespace.clone(), name.clone());
        let prev = self.owner.insert(at, key.clone()).filter(|p| *p != key);
        if let Some(p) = &prev {
            self.remove_from(p, &name);
        }
        self.by_service.entry(key).or_default().insert(name, sl);
        prev
    }

    fn remove_from(&mut self, key: &ObjectKey, name: &str) {
        if let Some(m) = self.by_service.get_mut(key) {
            m.remove(name);
            if m.is_empty() {
                self.by_service.remove(key);
            }
        }
    }

    /// Forgets a slice we deleted (its deletion event may come later).
    pub fn forget(&mut self, key: &ObjectKey, name: &str) {
        self.owner
            .remove(&(key.namespace.clone(), name.to_string()));
        self.remove_from(key, name);
    }

    /// Puts a slice we wrote into the cache at once (unless that version or a newer one is
    /// already cached), so the next reconcile need not wait for the watch to echo our own write.
    pub fn write_through(&mut self, key: &ObjectKey, sl: EndpointSlice) {
        let name = sl.metadata.name.as_deref().unwrap_or_default();
        // When the watch's echo came first, the cache holds the informer's own copy of this very
        // version: keep it, or the slice would be held twice (the informer's and ours) for as
        // long as nothing changes it, which at cold start is every slice.
        let same_or_newer_cached = self
            .by_service
            .get(key)
            .and_then(|m| m.get(name))
            .is_some_and(|c| {
                c.metadata.uid == sl.metadata.uid
                    && (generation(c) > generation(&sl)
                        || c.metadata.resource_version == sl.metadata.resource_version)
            });
        if !same_or_newer_cached {
            // Kept as the informer keeps it, so the copy holds no more than the echo will.
            self.insert(key.clone(), Arc::new(SliceRecord::from_slice(sl)));
        }
    }

    fn remove_named(&mut self, namespace: &str, name: &str) -> Option<ObjectKey> {
        let key = self
            .owner
            .remove(&(namespace.to_string(), name.to_string()))?;
        self.remove_from(&key, name);
        Some(key)
    }

    /// Folds one change of the process's slice informer in (slices of other managers are
    /// skipped, and one relabelled away from us counts as deleted, as a watch with a label
    /// selector would show it); returns the Services to reconcile.
    pub fn apply_change(
        &mut self,
        c: &Change<SliceRecord>,
        tracker: &SliceTracker,
    ) -> Vec<ObjectKey> {
        match c {
            Change::Apply(sl) if self.keeps(sl) => {
                let Some(key) = service_key_of(sl) else {
                    return vec![];
                };
                let news = tracker.should_sync(&key, sl);
                let mut out: Vec<ObjectKey> =
                    self.insert(key.clone(), sl.clone()).into_iter().collect();
                if news {
                    out.push(key);
                }
                out
            }
            Change::Apply(sl) | Change::Delete(sl) => {
                let ns = sl.metadata.namespace.as_deref().unwrap_or_default();
                let name = sl.metadata.name.as_deref().unwrap_or_default();
                let Some(key) = self.remove_named(ns, name).or_else(|| {
                    // A deletion of a slice we never cached (or already forgot).
                    matches!(c, Change::Delete(_))
                        .then(|| service_key_of(sl))
                        .flatten()
                        .filter(|_| self.keeps(sl))
                }) else {
                    return vec![];
                };
                if tracker.handle_deletion(&key, sl) {
                    vec![]
                } else {
                    vec![key]
                }
            }
            Change::Relisted(list) => {
                let mut keys: HashSet<ObjectKey> = self.by_service.keys().cloned().collect();
                self.by_service.clear();
                self.owner.clear();
                let mut listed: HashMap<ObjectKey, HashSet<String>> = HashMap::new();
                for sl in list {
                    if !self.keeps(sl) {
                        continue;
                    }
                    if let Some(key) = service_key_of(sl) {
                        keys.insert(key.clone());
                        listed.entry(key.clone()).or_default().insert(uid(sl));
                        self.insert(key, sl.clone());
                    }
                }
                keys.extend(tracker.retain_listed(&listed));
                keys.into_iter().collect()
            }
        }
    }
}

/// The cache and tracker together, as a shell holds them.
#[derive(Default)]
pub struct Slices {
    cache: Mutex<SliceCache>,
    /// Generations of our writes.
    pub tracker: SliceTracker,
}

impl Slices {
    /// Slices managed by one of `managers`.
    pub fn new(managers: Vec<&'static str>) -> Self {
        Slices {
            cache: Mutex::new(SliceCache::new(managers)),
            tracker: SliceTracker::default(),
        }
    }

    /// The cache, locked.
    pub fn cache(&self) -> MutexGuard<'_, SliceCache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Folds an informer change in; returns the Services to reconcile.
    pub fn apply_change(&self, c: &Change<SliceRecord>) -> Vec<ObjectKey> {
        self.cache().apply_change(c, &self.tracker)
    }

    /// The Service's slices as a reconcile reads them: not being deleted, expanded from their
    /// records (a sync's working copy; the cache keeps only the records).
    pub fn current(&self, key: &ObjectKey) -> Vec<Arc<EndpointSlice>> {
        let records: Vec<Arc<SliceRecord>> = self
            .cache()
            .of(key)
            .filter(|s| s.metadata.deletion_timestamp.is_none())
            .cloned()
            .collect();
        // Expanded outside the lock: the watch's fold waits on it.
        records.iter().map(|r| Arc::new(r.to_slice())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn slice(uid: &str, generation: i64) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                uid: Some(uid.into()),
                generation: Some(generation),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn tracker_detects_stale_views_and_echoes() {
        let t = SliceTracker::default();
        let k = ObjectKey::new("ns", "svc");
        t.update(&k, &slice("a", 2));
        assert!(
            !t.should_sync(&k, &slice("a", 2)),
            "our own write is no news"
        );
        assert!(t.should_sync(&k, &slice("a", 3)), "someone else's edit is");
        assert!(t.stale(&k, &[slice("a", 1)]), "older than our write");
        let none: &[EndpointSlice] = &[];
        assert!(t.stale(&k, none), "our slice missing from the view");
        assert!(!t.stale(&k, &[slice("a", 2)]));
        t.expect_deletion(&k, &slice("a", 2));
        assert!(t.stale(&k, &[slice("a", 2)]), "deleted slice still shown");
        assert!(!t.stale(&k, none));
        assert!(t.handle_deletion(&k, &slice("a", 2)));
        t.update(&k, &slice("b", 1));
        assert!(
            !t.handle_deletion(&k, &slice("b", 1)),
            "unexpected deletion"
        );
    }

    fn ours(name: &str, uid: &str, generation: i64) -> Arc<SliceRecord> {
        let mut s = slice(uid, generation);
        s.metadata.namespace = Some("ns".into());
        s.metadata.name = Some(name.into());
        s.metadata.labels = Some(
            [
                (LABEL_SERVICE_NAME.to_string(), "svc".to_string()),
                (LABEL_MANAGED_BY.to_string(), "us".to_string()),
            ]
            .into(),
        );
        Arc::new(SliceRecord::from_slice(s))
    }

    /// Issue 12, defect 1: one of our slices deleted while the watch was down, then a relist.
    /// Before the fix the tracker kept it, `stale()` stayed true for good and the Service never
    /// synced again.
    #[test]
    fn relist_forgets_slices_deleted_while_the_watch_was_down() {
        let s = Slices::new(vec!["us"]);
        let k = ObjectKey::new("ns", "svc");
        let (a, b, c) = (ours("a", "ua", 1), ours("b", "ub", 1), ours("c", "uc", 1));
        s.apply_change(&Change::Relisted(vec![a.clone(), b.clone(), c.clone()]));
        s.tracker.update(&k, &a);
        s.tracker.update(&k, &b);
        s.tracker.expect_deletion(&k, &c);
        assert!(s.tracker.stale(&k, &s.current(&k)), "c is still shown");
        // a and c went while the watch was down; b stays.
        let keys = s.apply_change(&Change::Relisted(vec![b.clone()]));
        assert_eq!(keys, vec![k.clone()]);
        assert!(
            !s.tracker.stale(&k, &s.current(&k)),
            "the relist is current"
        );
        assert!(
            s.tracker.should_sync(&k, &a),
            "a is forgotten: its return is news"
        );
        assert!(!s.tracker.should_sync(&k, &b), "b is still our write");
        assert!(
            !s.tracker.handle_deletion(&k, &c),
            "c's expected deletion is settled"
        );
        // Nothing of ours left at all: the Service is forgotten by the tracker.
        s.apply_change(&Change::Relisted(vec![]));
        assert!(s.tracker.lock().is_empty());
    }

    #[test]
    fn other_managers_slices_are_skipped_and_relabelling_away_is_a_deletion() {
        let s = Slices::new(vec!["us"]);
        let k = ObjectKey::new("ns", "svc");
        let a = ours("a", "ua", 1);
        let mut theirs = (*a).clone();
        theirs
            .metadata
            .labels
            .as_mut()
            .unwrap()
            .insert(LABEL_MANAGED_BY.into(), "them".into());
        let theirs = Arc::new(theirs);
        assert!(
            s.apply_change(&Change::Relisted(vec![theirs.clone()]))
                .is_empty()
        );
        assert_eq!(s.apply_change(&Change::Apply(a.clone())), vec![k.clone()]);
        assert_eq!(s.current(&k).len(), 1);
        // Relabelled to another manager: gone from our view, and news (not our deletion).
        assert_eq!(s.apply_change(&Change::Apply(theirs)), vec![k.clone()]);
        assert!(s.current(&k).is_empty());
    }

    /// A create's response handled after the watch already echoed it: before, the response's
    /// copy replaced the informer's in the cache, so every slice written at cold start was held
    /// twice (at the envelope about 80 MiB).
    #[test]
    fn a_write_whose_echo_came_first_keeps_the_informers_copy() {
        let s = Slices::new(vec!["us"]);
        let k = ObjectKey::new("ns", "svc");
        let mut echoed = (*ours("a", "ua", 1)).clone();
        echoed.metadata.resource_version = Some("7".into());
        let echoed = Arc::new(echoed);
        s.apply_change(&Change::Apply(echoed.clone()));
        s.cache().write_through(&k, echoed.to_slice());
        let held: Vec<_> = s.cache().of(&k).cloned().collect();
        assert!(
            held.len() == 1 && Arc::ptr_eq(&held[0], &echoed),
            "the informer's copy is the one held"
        );
        // A later version of ours (a label-only update keeps the generation) does replace it.
        let mut next = echoed.to_slice();
        next.metadata.resource_version = Some("8".into());
        s.cache().write_through(&k, next);
        let held = s.current(&k);
        assert_eq!(held[0].metadata.resource_version.as_deref(), Some("8"));
    }
}
