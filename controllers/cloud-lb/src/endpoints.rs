//! Where each Service's endpoints are, by node, from the process's one EndpointSlice informer
//! (the EndpointSlice controllers' [`endpointslice::slice_record::endpoint_slices`]; never a
//! second watch). Only kept with `--endpoint-aware-load-balancer-targets`, for
//! [`crate::core::targets`]. A change of a Service's nodes (not every slice write: an endpoint
//! moving between ready and not on the same node usually changes nothing) calls `changed`
//! with the Service's key.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use endpointslice::slice_record::SliceRecord;
use scm_runtime::{Change, Informer, ObjectKey};

use crate::core::targets::EndpointNodes;

/// The label naming a slice's Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Each Service's endpoint nodes, per slice.
#[derive(Default)]
pub(crate) struct EndpointIndex {
    inner: Mutex<Slices>,
}

#[derive(Default)]
struct Slices {
    /// Service → slice name → its nodes.
    by_service: HashMap<ObjectKey, HashMap<String, EndpointNodes>>,
    /// Slice → the Service it was filed under (a slice's label can change).
    owner: HashMap<ObjectKey, ObjectKey>,
}

impl Slices {
    fn merged(&self, svc: &ObjectKey) -> Option<EndpointNodes> {
        self.by_service
            .get(svc)
            .map(|m| EndpointNodes::merge(m.values()))
    }

    /// Files `slice` (or removes it, with `None`); the Services whose nodes changed.
    fn put(
        &mut self,
        slice: &ObjectKey,
        now: Option<(ObjectKey, EndpointNodes)>,
    ) -> Vec<ObjectKey> {
        let old = self.owner.remove(slice);
        let mut touched: Vec<ObjectKey> = old.iter().cloned().collect();
        if let Some((svc, _)) = &now
            && !touched.contains(svc)
        {
            touched.push(svc.clone());
        }
        let before: Vec<Option<EndpointNodes>> = touched.iter().map(|s| self.merged(s)).collect();
        if let Some(old) = &old
            && let Some(m) = self.by_service.get_mut(old)
        {
            m.remove(&slice.name);
            if m.is_empty() {
                self.by_service.remove(old);
            }
        }
        if let Some((svc, nodes)) = now {
            self.by_service
                .entry(svc.clone())
                .or_default()
                .insert(slice.name.clone(), nodes);
            self.owner.insert(slice.clone(), svc);
        }
        touched
            .into_iter()
            .zip(before)
            .filter(|(s, b)| self.merged(s) != *b)
            .map(|(s, _)| s)
            .collect()
    }
}

/// The Service a slice belongs to and where its endpoints are; `None` for a slice without the
/// service-name label (no Service's).
fn file(rec: &SliceRecord) -> Option<(ObjectKey, EndpointNodes)> {
    let ns = rec.metadata.namespace.as_deref()?;
    let svc = rec.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    let mut nodes = EndpointNodes::default();
    for e in rec.to_slice().endpoints.iter().flatten() {
        nodes.add(e);
    }
    Some((ObjectKey::new(ns, svc.as_str()), nodes))
}

fn slice_key(rec: &SliceRecord) -> ObjectKey {
    let (ns, name) = rec.key_ref();
    ObjectKey::new(ns, name)
}

impl EndpointIndex {
    /// Where the Service's endpoints are; `None` when it has no slice.
    pub fn of(&self, svc: &ObjectKey) -> Option<EndpointNodes> {
        self.lock().merged(svc)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slices> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies one informer change; the Services whose endpoint nodes changed.
    pub fn apply(&self, c: &Change<SliceRecord>) -> Vec<ObjectKey> {
        let mut s = self.lock();
        match c {
            Change::Apply(r) => s.put(&slice_key(r), file(r)),
            Change::Delete(r) => s.put(&slice_key(r), None),
            Change::Relisted(list) => {
                let before: HashMap<ObjectKey, EndpointNodes> = s
                    .by_service
                    .keys()
                    .filter_map(|k| Some((k.clone(), s.merged(k)?)))
                    .collect();
                *s = Slices::default();
                for r in list {
                    s.put(&slice_key(r), file(r));
                }
                let mut changed: Vec<ObjectKey> = s
                    .by_service
                    .keys()
                    .filter(|k| before.get(*k) != s.merged(k).as_ref())
                    .cloned()
                    .collect();
                changed.extend(
                    before
                        .keys()
                        .filter(|k| !s.by_service.contains_key(*k))
                        .cloned(),
                );
                changed
            }
        }
    }
}

/// Subscribes `index` to the slice informer; `changed` gets every Service whose endpoint
/// nodes changed (called under the informer's subscriber lock: it must not block).
pub(crate) fn watch_slices(
    slices: &Informer<SliceRecord>,
    index: Arc<EndpointIndex>,
    changed: impl Fn(ObjectKey) + Send + 'static,
) {
    slices.subscribe(move |c| {
        for key in index.apply(c) {
            changed(key);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointSlice};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn slice(name: &str, svc: &str, eps: &[(&str, bool, bool)]) -> Arc<SliceRecord> {
        Arc::new(SliceRecord::from_slice(EndpointSlice {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                labels: Some([(SERVICE_NAME_LABEL.to_string(), svc.to_string())].into()),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            endpoints: Some(
                eps.iter()
                    .enumerate()
                    .map(|(i, (node, ready, term))| Endpoint {
                        addresses: vec![format!("10.0.0.{i}")],
                        node_name: Some(node.to_string()),
                        conditions: Some(EndpointConditions {
                            ready: Some(*ready),
                            serving: Some(true),
                            terminating: Some(*term),
                        }),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ports: None,
        }))
    }

    #[test]
    fn services_are_told_only_when_their_nodes_change() {
        let idx = EndpointIndex::default();
        let a = ObjectKey::new("ns", "a");
        let b = ObjectKey::new("ns", "b");
        assert_eq!(
            idx.apply(&Change::Relisted(vec![slice(
                "a-1",
                "a",
                &[("n1", true, false)]
            )])),
            vec![a.clone()]
        );
        // A second ready endpoint on the same node: nothing changed.
        let two = slice("a-1", "a", &[("n1", true, false), ("n1", true, false)]);
        assert!(idx.apply(&Change::Apply(two)).is_empty());
        // Another slice of a adds n2.
        assert_eq!(
            idx.apply(&Change::Apply(slice("a-2", "a", &[("n2", true, false)]))),
            vec![a.clone()]
        );
        assert_eq!(
            idx.of(&a).map(|e| e.ready.len()),
            Some(2),
            "both slices count"
        );
        // The endpoint on n2 starts terminating: a changes.
        let term = slice("a-2", "a", &[("n2", false, true)]);
        assert_eq!(idx.apply(&Change::Apply(term)), vec![a.clone()]);
        let now = idx.of(&a).expect("a has slices");
        assert!(!now.ready.contains("n2") && now.serving.contains("n2"));
        // A slice relabelled to b moves: both change.
        let moved = slice("a-2", "b", &[("n2", true, false)]);
        let mut got = idx.apply(&Change::Apply(moved.clone()));
        got.sort_by(|x, y| x.name.cmp(&y.name));
        assert_eq!(got, vec![a.clone(), b.clone()]);
        assert_eq!(idx.apply(&Change::Delete(moved)), vec![b.clone()]);
        assert_eq!(idx.of(&b), None);
        // A relist without a's slices: a changes (to none).
        assert_eq!(idx.apply(&Change::Relisted(vec![])), vec![a.clone()]);
        assert_eq!(idx.of(&a), None);
    }
}
