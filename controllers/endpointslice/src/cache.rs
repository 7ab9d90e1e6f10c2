//! The Service/Pod index the EndpointSlice and Endpoints shells keep: Services and the shared
//! pod records by (namespace, label), so that a pod event finds its Services (and a Service
//! its pods) without scanning every object.

use std::borrow::Borrow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Service;
use scm_runtime::informer::Change;
use scm_runtime::{ObjectKey, Priority};

use crate::common::PodRecord;

mod urgency;
pub use urgency::pod_change_priority;

type LabelKey = (String, String, String);

fn selector_of(svc: &Service) -> Option<BTreeMap<String, String>> {
    svc.spec.as_ref().and_then(|s| s.selector.clone())
}

/// A pod record in a per-namespace set, hashed and compared by name (unique in a namespace),
/// so a set of records is also a map from name to record without a second copy of the name.
#[derive(Clone, Debug)]
struct ByName(Arc<PodRecord>);

impl PartialEq for ByName {
    fn eq(&self, o: &Self) -> bool {
        self.0.name == o.0.name
    }
}

impl Eq for ByName {}

impl Hash for ByName {
    fn hash<H: Hasher>(&self, h: &mut H) {
        // As `str` hashes, which `Borrow<str>` requires.
        (*self.0.name).hash(h)
    }
}

impl Borrow<str> for ByName {
    fn borrow(&self) -> &str {
        &self.0.name
    }
}

/// Services and pod records with a label index both ways. The pod side holds pointers to the
/// informer's records only: no name or key is copied per pod.
#[derive(Default)]
pub struct PodServiceIndex {
    /// Services by key.
    pub services: HashMap<ObjectKey, Arc<Service>>,
    /// Pods by namespace, then name.
    pods_by_ns: HashMap<Arc<str>, HashSet<ByName>>,
    pods_by_label: HashMap<LabelKey, HashSet<ByName>>,
    // A Service is indexed under the first pair of its selector; empty selectors separately.
    svcs_by_label: HashMap<LabelKey, HashSet<String>>,
    svcs_select_all: HashMap<String, HashSet<String>>,
}

fn matches(sel: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    sel.iter().all(|(k, v)| labels.get(k) == Some(v))
}

impl PodServiceIndex {
    /// The pod with this key.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<&Arc<PodRecord>> {
        self.pods_by_ns.get(namespace)?.get(name).map(|b| &b.0)
    }

    /// How many pods the index holds.
    pub fn pod_count(&self) -> usize {
        self.pods_by_ns.values().map(HashSet::len).sum()
    }

    /// Inserts or replaces a pod (the informer's record, shared); returns the previous one.
    pub fn put_pod(&mut self, pod: Arc<PodRecord>) -> Option<Arc<PodRecord>> {
        let old = self.remove_pod(&pod.namespace, &pod.name);
        for (k, v) in pod.labels.iter() {
            self.pods_by_label
                .entry((pod.namespace.to_string(), k.clone(), v.clone()))
                .or_default()
                .insert(ByName(pod.clone()));
        }
        self.pods_by_ns
            .entry(pod.namespace.clone())
            .or_default()
            .insert(ByName(pod));
        old
    }

    /// Removes a pod; returns it.
    pub fn remove_pod(&mut self, namespace: &str, name: &str) -> Option<Arc<PodRecord>> {
        let in_ns = self.pods_by_ns.get_mut(namespace)?;
        let ByName(old) = in_ns.take(name)?;
        if in_ns.is_empty() {
            self.pods_by_ns.remove(namespace);
        }
        for (k, v) in old.labels.iter() {
            let lk = (namespace.to_string(), k.clone(), v.clone());
            if let Some(s) = self.pods_by_label.get_mut(&lk) {
                s.remove(name);
                if s.is_empty() {
                    self.pods_by_label.remove(&lk);
                }
            }
        }
        Some(old)
    }

    /// Folds one pod change in; returns the Services whose endpoints it may change. A pod
    /// update that changes nothing the records hold is not news.
    pub fn apply_pod_change(&mut self, c: &Change<PodRecord>) -> Vec<ObjectKey> {
        self.apply_pod_change_by_priority(c)
            .into_iter()
            .map(|(k, _)| k)
            .collect()
    }

    /// [`Self::apply_pod_change`], each Service with the priority the change gives it (see
    /// [`pod_change_priority`]; in a relist, the highest of its pods' changes).
    pub fn apply_pod_change_by_priority(
        &mut self,
        c: &Change<PodRecord>,
    ) -> Vec<(ObjectKey, Priority)> {
        let with = |keys: Vec<ObjectKey>, p: Priority| keys.into_iter().map(move |k| (k, p));
        match c {
            Change::Apply(p) => {
                let old = self.put_pod(p.clone());
                if old.as_deref().is_some_and(|o| *o == **p) {
                    return vec![];
                }
                let prio = pod_change_priority(old.as_deref(), Some(p));
                with(self.services_for_pod_change(old.as_deref(), Some(p)), prio).collect()
            }
            Change::Delete(p) => {
                let old = self.remove_pod(&p.namespace, &p.name);
                let prio = pod_change_priority(Some(old.as_deref().unwrap_or(p)), None);
                with(self.services_for_pod_change(old.as_deref(), Some(p)), prio).collect()
            }
            Change::Relisted(list) => {
                let fresh: HashSet<(&str, &str)> =
                    list.iter().map(|p| (&*p.namespace, &*p.name)).collect();
                let gone: Vec<Arc<PodRecord>> = self
                    .pods_by_ns
                    .values()
                    .flatten()
                    .filter(|b| !fresh.contains(&(&*b.0.namespace, &*b.0.name)))
                    .map(|b| b.0.clone())
                    .collect();
                drop(fresh);
                let mut affected: HashMap<ObjectKey, Priority> = HashMap::new();
                let mut note = |keys: Vec<ObjectKey>, p: Priority| {
                    for k in keys {
                        let e = affected.entry(k).or_default();
                        *e = (*e).max(p);
                    }
                };
                for o in gone {
                    self.remove_pod(&o.namespace, &o.name);
                    let prio = pod_change_priority(Some(&o), None);
                    note(self.services_for_pod_change(Some(&o), None), prio);
                }
                for p in list {
                    let old = self.put_pod(p.clone());
                    if old.as_deref().is_none_or(|o| *o != **p) {
                        let prio = pod_change_priority(old.as_deref(), Some(p));
                        note(self.services_for_pod_change(old.as_deref(), Some(p)), prio);
                    }
                }
                affected.into_iter().collect()
            }
        }
    }

    /// Inserts or replaces a Service; returns the previous version.
    pub fn put_service(&mut self, svc: Arc<Service>) -> Option<Arc<Service>> {
        let key = ObjectKey::of(svc.as_ref());
        let old = self.remove_service(&key);
        if let Some(sel) = selector_of(&svc) {
            match sel.iter().next() {
                Some((k, v)) => {
                    self.svcs_by_label
                        .entry((key.namespace.clone(), k.clone(), v.clone()))
                        .or_default()
                        .insert(key.name.clone());
                }
                None => {
                    self.svcs_select_all
                        .entry(key.namespace.clone())
                        .or_default()
                        .insert(key.name.clone());
                }
            }
        }
        self.services.insert(key, svc);
        old
    }

    /// Removes a Service; returns it.
    pub fn remove_service(&mut self, key: &ObjectKey) -> Option<Arc<Service>> {
        let old = self.services.remove(key)?;
        if let Some(sel) = selector_of(&old) {
            match sel.iter().next() {
                Some((k, v)) => {
                    let lk = (key.namespace.clone(), k.clone(), v.clone());
                    if let Some(s) = self.svcs_by_label.get_mut(&lk) {
                        s.remove(&key.name);
                        if s.is_empty() {
                            self.svcs_by_label.remove(&lk);
                        }
                    }
                }
                None => {
                    if let Some(s) = self.svcs_select_all.get_mut(&key.namespace) {
                        s.remove(&key.name);
                    }
                }
            }
        }
        Some(old)
    }

    /// Keys of Services whose selector matches a pod with `labels` in `namespace`.
    pub fn services_for(
        &self,
        namespace: &str,
        labels: &BTreeMap<String, String>,
    ) -> Vec<ObjectKey> {
        let mut out = Vec::new();
        let mut consider = |name: &String| {
            let key = ObjectKey::new(namespace, name.clone());
            if let Some(svc) = self.services.get(&key)
                && let Some(sel) = selector_of(svc)
                && matches(&sel, labels)
            {
                out.push(key);
            }
        };
        for (k, v) in labels {
            if let Some(names) =
                self.svcs_by_label
                    .get(&(namespace.to_string(), k.clone(), v.clone()))
            {
                names.iter().for_each(&mut consider);
            }
        }
        if let Some(names) = self.svcs_select_all.get(namespace) {
            names.iter().for_each(&mut consider);
        }
        out.sort();
        out.dedup();
        out
    }

    /// Pods in `namespace` matching `selector` (an empty selector matches all).
    pub fn pods_for(
        &self,
        namespace: &str,
        selector: &BTreeMap<String, String>,
    ) -> Vec<Arc<PodRecord>> {
        // Start from the smallest posting list among the selector's pairs.
        let candidates: Option<&HashSet<ByName>> = if selector.is_empty() {
            self.pods_by_ns.get(namespace)
        } else {
            let mut best: Option<&HashSet<ByName>> = None;
            for (k, v) in selector {
                match self
                    .pods_by_label
                    .get(&(namespace.to_string(), k.clone(), v.clone()))
                {
                    None => return Vec::new(),
                    Some(s) => {
                        if best.is_none_or(|b| s.len() < b.len()) {
                            best = Some(s);
                        }
                    }
                }
            }
            best
        };
        let mut out: Vec<Arc<PodRecord>> = candidates
            .into_iter()
            .flatten()
            .filter(|p| selector.is_empty() || matches(selector, &p.0.labels))
            .map(|p| p.0.clone())
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Services affected by a pod changing from `old` to `new` (either may be absent).
    pub fn services_for_pod_change(
        &self,
        old: Option<&PodRecord>,
        new: Option<&PodRecord>,
    ) -> Vec<ObjectKey> {
        let mut out = Vec::new();
        for p in [old, new].into_iter().flatten() {
            out.extend(self.services_for(&p.namespace, &p.labels));
        }
        out.sort();
        out.dedup();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        Container, ContainerPort, Pod, PodCondition, PodIP, PodSpec, PodStatus, ServiceSpec,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ManagedFieldsEntry, ObjectMeta};

    fn pod(ns: &str, name: &str, labels: &[(&str, &str)]) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(ns.into()),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                managed_fields: Some(vec![ManagedFieldsEntry::default()]),
                annotations: Some(
                    [("big".to_string(), "x".repeat(1000))]
                        .into_iter()
                        .collect(),
                ),
                ..Default::default()
            },
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "c".into(),
                    image: Some("nginx".into()),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn svc(ns: &str, name: &str, sel: Option<&[(&str, &str)]>) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(ns.into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                selector: sel.map(|s| {
                    s.iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn record_keeps_what_the_cores_read() {
        use crate::common::PodView;
        let mut p = pod("a", "p", &[("app", "x")]);
        p.metadata.uid = Some("u1".into());
        if let Some(spec) = p.spec.as_mut() {
            spec.node_name = Some("n1".into());
            spec.hostname = Some("h".into());
            spec.subdomain = Some("web".into());
            spec.containers[0].ports = Some(vec![
                ContainerPort {
                    name: Some("http".into()),
                    container_port: 8080,
                    ..Default::default()
                },
                ContainerPort {
                    container_port: 9,
                    ..Default::default()
                },
            ]);
            spec.init_containers = Some(vec![
                Container {
                    name: "once".into(),
                    ports: Some(vec![ContainerPort {
                        name: Some("dns".into()),
                        container_port: 53,
                        protocol: Some("UDP".into()),
                        ..Default::default()
                    }]),
                    ..Default::default()
                },
                Container {
                    name: "side".into(),
                    restart_policy: Some("Always".into()),
                    ports: Some(vec![ContainerPort {
                        name: Some("dns".into()),
                        container_port: 5353,
                        protocol: Some("UDP".into()),
                        ..Default::default()
                    }]),
                    ..Default::default()
                },
            ]);
        }
        p.status = Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some("10.0.0.1".into()),
            pod_ips: Some(vec![
                PodIP {
                    ip: "10.0.0.1".into(),
                },
                PodIP {
                    ip: "fd00::1".into(),
                },
            ]),
            conditions: Some(vec![
                PodCondition {
                    type_: "PodScheduled".into(),
                    status: "False".into(),
                    ..Default::default()
                },
                PodCondition {
                    type_: "Ready".into(),
                    status: "True".into(),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        });
        let r = PodRecord::from_pod(p.clone());
        // Everything a core reads answers the same from the record as from the pod.
        assert_eq!(r.namespace(), p.namespace());
        assert_eq!(r.name(), p.name());
        assert_eq!(r.uid(), Some("u1"));
        assert_eq!(r.deleting(), p.deleting());
        assert_eq!((r.terminal(), p.terminal()), (false, false));
        assert_eq!((r.ready(), p.ready()), (true, true));
        assert_eq!(r.pod_ip(), p.pod_ip());
        assert_eq!(
            r.pod_ips().collect::<Vec<_>>(),
            p.pod_ips().collect::<Vec<_>>()
        );
        assert_eq!(r.node_name(), Some("n1"));
        assert_eq!((r.hostname(), r.subdomain()), (Some("h"), Some("web")));
        for (name, proto, want) in [
            ("http", "TCP", Some(8080)),
            ("http", "UDP", None),
            ("dns", "UDP", Some(5353)),
            ("nope", "TCP", None),
        ] {
            assert_eq!(r.named_port(name, proto), want, "{name}/{proto}");
            assert_eq!(p.named_port(name, proto), want, "{name}/{proto}");
        }
        // Unnamed ports are never looked up, so never kept.
        assert_eq!(r.ports.len(), 2);
        assert_eq!(r.labels.len(), 1);
    }

    #[test]
    fn slice_trim_drops_managed_fields_and_spare_capacity() {
        use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};
        let mut addresses = Vec::with_capacity(4);
        addresses.push("10.0.0.1".to_string());
        let mut endpoints = Vec::with_capacity(8);
        endpoints.push(Endpoint {
            addresses,
            ..Default::default()
        });
        let s = scm_runtime::informer::trim::endpoint_slice(EndpointSlice {
            metadata: ObjectMeta {
                managed_fields: Some(vec![ManagedFieldsEntry::default()]),
                ..Default::default()
            },
            endpoints: Some(endpoints),
            ..Default::default()
        });
        assert!(s.metadata.managed_fields.is_none());
        let eps = s.endpoints.unwrap_or_default();
        assert_eq!(eps.capacity(), 1);
        assert_eq!(eps[0].addresses.capacity(), 1);
        assert_eq!(eps[0].addresses, vec!["10.0.0.1".to_string()]);
    }

    fn rec(p: Pod) -> Arc<PodRecord> {
        Arc::new(PodRecord::from_pod(p))
    }

    #[test]
    fn index_finds_services_and_pods_both_ways() {
        let mut idx = PodServiceIndex::default();
        idx.put_service(Arc::new(svc(
            "a",
            "web",
            Some(&[("app", "web"), ("tier", "fe")]),
        )));
        idx.put_service(Arc::new(svc("a", "all", Some(&[]))));
        idx.put_service(Arc::new(svc("a", "none", None)));
        idx.put_service(Arc::new(svc("b", "web", Some(&[("app", "web")]))));
        idx.put_pod(rec(pod("a", "p1", &[("app", "web"), ("tier", "fe")])));
        idx.put_pod(rec(pod("a", "p2", &[("app", "web")])));
        let l = |p: &[(&str, &str)]| {
            p.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let got = idx.services_for("a", &l(&[("app", "web"), ("tier", "fe")]));
        assert_eq!(
            got,
            vec![ObjectKey::new("a", "all"), ObjectKey::new("a", "web")]
        );
        let got = idx.services_for("a", &l(&[("app", "web")]));
        assert_eq!(got, vec![ObjectKey::new("a", "all")]);
        let sel = l(&[("app", "web"), ("tier", "fe")]);
        let pods = idx.pods_for("a", &sel);
        assert_eq!(pods.len(), 1);
        assert_eq!(idx.pods_for("a", &BTreeMap::new()).len(), 2);
        assert!(idx.pods_for("b", &sel).is_empty());
        // Relabelling moves the pod between posting lists.
        idx.put_pod(rec(pod("a", "p1", &[("app", "other")])));
        assert!(idx.pods_for("a", &sel).is_empty());
        idx.remove_service(&ObjectKey::new("a", "web"));
        assert_eq!(
            idx.services_for("a", &sel),
            vec![ObjectKey::new("a", "all")]
        );
    }
}
