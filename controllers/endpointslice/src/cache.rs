//! Caches the shells keep on every replica: a watch loop that hands out whole relists and
//! single changes, Pods trimmed to what endpoints are computed from, and a Service/Pod index
//! by (namespace, label) so that a pod event finds its Services (and a Service its pods)
//! without scanning every object.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Debug;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Container, Pod, PodCondition, PodSpec, PodStatus, Service};
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use scm_runtime::ObjectKey;

/// One change seen by a watch.
pub enum Change<K> {
    /// An object was added or modified.
    Apply(K),
    /// An object was deleted (or left the watch's selection).
    Delete(K),
    /// The watch (re)listed: this is the complete set.
    Relisted(Vec<K>),
}

/// Runs a watch until `shutdown`, calling `f` for every change. Every object goes through
/// `prep` (trimming) as it arrives, before a relist is buffered, so the full objects of a
/// large list are never all held at once. Watch errors are logged and retried with
/// kube-runtime's default backoff, so one bad moment never stops the cache.
pub async fn watch<K, P, F>(
    api: Api<K>,
    cfg: watcher::Config,
    shutdown: CancellationToken,
    prep: P,
    mut f: F,
) where
    K: kube::Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    P: Fn(K) -> K,
    F: FnMut(Change<K>),
{
    let stream = watcher(api, cfg).default_backoff();
    futures::pin_mut!(stream);
    let mut buf: Vec<K> = Vec::new();
    loop {
        let ev = tokio::select! {
            _ = shutdown.cancelled() => return,
            ev = stream.next() => ev,
        };
        match ev {
            None => return,
            Some(Err(e)) => {
                warn!(kind = std::any::type_name::<K>(), error = %e, "watch error; retrying")
            }
            Some(Ok(watcher::Event::Init)) => buf.clear(),
            Some(Ok(watcher::Event::InitApply(o))) => buf.push(prep(o)),
            Some(Ok(watcher::Event::InitDone)) => f(Change::Relisted(std::mem::take(&mut buf))),
            Some(Ok(watcher::Event::Apply(o))) => f(Change::Apply(prep(o))),
            Some(Ok(watcher::Event::Delete(o))) => f(Change::Delete(prep(o))),
        }
    }
}

/// Keeps only what endpoints are computed from: identity, labels, deletion, node, hostname,
/// subdomain, container ports, phase, IPs and the Ready condition. Everything else
/// (managedFields, most of spec and status) is dropped before the pod reaches the store.
pub fn trim_pod(pod: Pod) -> Pod {
    let meta = pod.metadata;
    let spec = pod.spec.unwrap_or_default();
    let status = pod.status.unwrap_or_default();
    let trim_container = |c: Container| Container {
        name: c.name,
        ports: c.ports,
        restart_policy: c.restart_policy,
        ..Default::default()
    };
    Pod {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: meta.name,
            namespace: meta.namespace,
            uid: meta.uid,
            labels: meta.labels,
            deletion_timestamp: meta.deletion_timestamp,
            resource_version: meta.resource_version,
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: spec.node_name,
            hostname: spec.hostname,
            subdomain: spec.subdomain,
            containers: spec
                .containers
                .into_iter()
                .filter(|c| c.ports.as_ref().is_some_and(|p| !p.is_empty()))
                .map(trim_container)
                .collect(),
            init_containers: spec.init_containers.map(|ics| {
                ics.into_iter()
                    .filter(|c| c.restart_policy.as_deref() == Some("Always"))
                    .map(trim_container)
                    .collect()
            }),
            ..Default::default()
        }),
        status: Some(PodStatus {
            phase: status.phase,
            pod_ip: status.pod_ip,
            pod_ips: status.pod_ips,
            conditions: status.conditions.map(|cs| {
                cs.into_iter()
                    .filter(|c| c.type_ == "Ready")
                    .map(|c| PodCondition {
                        type_: c.type_,
                        status: c.status,
                        ..Default::default()
                    })
                    .collect()
            }),
            ..Default::default()
        }),
    }
}

/// Drops managedFields from any object.
pub fn trim_meta<K: kube::Resource>(mut o: K) -> K {
    o.meta_mut().managed_fields = None;
    o
}

/// Drops managedFields and status from a Service; nothing we compute reads them.
pub fn trim_service(mut svc: Service) -> Service {
    svc.metadata.managed_fields = None;
    svc.status = None;
    svc
}

/// Whether two trimmed pods differ in anything but their resourceVersion.
pub fn pod_changed(a: &Pod, b: &Pod) -> bool {
    let strip = |p: &Pod| {
        let mut p = p.clone();
        p.metadata.resource_version = None;
        p
    };
    strip(a) != strip(b)
}

type LabelKey = (String, String, String);

fn selector_of(svc: &Service) -> Option<BTreeMap<String, String>> {
    svc.spec.as_ref().and_then(|s| s.selector.clone())
}

/// Services and (trimmed) pods with a label index both ways.
#[derive(Default)]
pub struct PodServiceIndex {
    /// Services by key.
    pub services: HashMap<ObjectKey, Arc<Service>>,
    /// Pods by key.
    pub pods: HashMap<ObjectKey, Arc<Pod>>,
    pods_by_label: HashMap<LabelKey, HashSet<String>>,
    pods_by_ns: HashMap<String, HashSet<String>>,
    // A Service is indexed under the first pair of its selector; empty selectors separately.
    svcs_by_label: HashMap<LabelKey, HashSet<String>>,
    svcs_select_all: HashMap<String, HashSet<String>>,
}

fn matches(sel: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    sel.iter().all(|(k, v)| labels.get(k) == Some(v))
}

impl PodServiceIndex {
    /// Inserts or replaces a pod; returns the previous version.
    pub fn put_pod(&mut self, pod: Arc<Pod>) -> Option<Arc<Pod>> {
        let key = ObjectKey::of(pod.as_ref());
        let old = self.remove_pod(&key);
        for (k, v) in pod.metadata.labels.iter().flatten() {
            self.pods_by_label
                .entry((key.namespace.clone(), k.clone(), v.clone()))
                .or_default()
                .insert(key.name.clone());
        }
        self.pods_by_ns
            .entry(key.namespace.clone())
            .or_default()
            .insert(key.name.clone());
        self.pods.insert(key, pod);
        old
    }

    /// Removes a pod; returns it.
    pub fn remove_pod(&mut self, key: &ObjectKey) -> Option<Arc<Pod>> {
        let old = self.pods.remove(key)?;
        for (k, v) in old.metadata.labels.iter().flatten() {
            let lk = (key.namespace.clone(), k.clone(), v.clone());
            if let Some(s) = self.pods_by_label.get_mut(&lk) {
                s.remove(&key.name);
                if s.is_empty() {
                    self.pods_by_label.remove(&lk);
                }
            }
        }
        if let Some(s) = self.pods_by_ns.get_mut(&key.namespace) {
            s.remove(&key.name);
            if s.is_empty() {
                self.pods_by_ns.remove(&key.namespace);
            }
        }
        Some(old)
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
    pub fn pods_for(&self, namespace: &str, selector: &BTreeMap<String, String>) -> Vec<Arc<Pod>> {
        // Start from the smallest posting list among the selector's pairs.
        let candidates: Option<&HashSet<String>> = if selector.is_empty() {
            self.pods_by_ns.get(namespace)
        } else {
            let mut best: Option<&HashSet<String>> = None;
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
        let mut out: Vec<Arc<Pod>> = candidates
            .into_iter()
            .flatten()
            .filter_map(|n| self.pods.get(&ObjectKey::new(namespace, n.clone())))
            .filter(|p| {
                p.metadata
                    .labels
                    .as_ref()
                    .is_some_and(|l| matches(selector, l))
                    || selector.is_empty()
            })
            .cloned()
            .collect();
        out.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        out
    }

    /// Services affected by a pod changing from `old` to `new` (either may be absent).
    pub fn services_for_pod_change(&self, old: Option<&Pod>, new: Option<&Pod>) -> Vec<ObjectKey> {
        let mut out = Vec::new();
        for p in [old, new].into_iter().flatten() {
            let ns = p.metadata.namespace.clone().unwrap_or_default();
            let labels = p.metadata.labels.clone().unwrap_or_default();
            out.extend(self.services_for(&ns, &labels));
        }
        out.sort();
        out.dedup();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ServiceSpec;
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
    fn trim_drops_managed_fields_and_unused_parts() {
        let p = trim_pod(pod("a", "p", &[("app", "x")]));
        assert!(p.metadata.managed_fields.is_none());
        assert!(p.metadata.annotations.is_none());
        assert!(p.spec.as_ref().is_some_and(|s| s.containers.is_empty()));
        assert_eq!(p.metadata.labels.as_ref().map(|l| l.len()), Some(1));
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
        idx.put_pod(Arc::new(pod("a", "p1", &[("app", "web"), ("tier", "fe")])));
        idx.put_pod(Arc::new(pod("a", "p2", &[("app", "web")])));
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
        idx.put_pod(Arc::new(pod("a", "p1", &[("app", "other")])));
        assert!(idx.pods_for("a", &sel).is_empty());
        idx.remove_service(&ObjectKey::new("a", "web"));
        assert_eq!(
            idx.services_for("a", &sel),
            vec![ObjectKey::new("a", "all")]
        );
    }
}
