//! What the controllers read of a pod: the [`PodView`] trait over the API's `Pod` and the
//! compact [`PodRecord`] the Pod informer keeps (one per pod for the whole process, shared by
//! the EndpointSlice and Endpoints controllers), with label maps interned across pods.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::Pod;

/// What the cores read of a pod. Implemented by the API's `Pod` (tests, differential checks)
/// and by the compact [`PodRecord`] the caches keep, so both give the same endpoints.
pub trait PodView {
    /// `metadata.namespace`.
    fn namespace(&self) -> Option<&str>;
    /// `metadata.name`.
    fn name(&self) -> Option<&str>;
    /// `metadata.uid`.
    fn uid(&self) -> Option<&str>;
    /// Whether `metadata.deletionTimestamp` is set.
    fn deleting(&self) -> bool;
    /// Whether `status.phase` is Succeeded or Failed.
    fn terminal(&self) -> bool;
    /// Whether the Ready condition is True.
    fn ready(&self) -> bool;
    /// `status.podIP`.
    fn pod_ip(&self) -> Option<&str>;
    /// `status.podIPs[*].ip`, in order.
    fn pod_ips(&self) -> impl Iterator<Item = &str>;
    /// `spec.nodeName`.
    fn node_name(&self) -> Option<&str>;
    /// `spec.hostname`.
    fn hostname(&self) -> Option<&str>;
    /// `spec.subdomain`.
    fn subdomain(&self) -> Option<&str>;
    /// The first container port named `name` with protocol `proto`: containers first, then
    /// restartable (sidecar) init containers, as upstream's `FindPort`.
    fn named_port(&self, name: &str, proto: &str) -> Option<i32>;
}

impl<T: PodView + ?Sized> PodView for &T {
    fn namespace(&self) -> Option<&str> {
        (**self).namespace()
    }
    fn name(&self) -> Option<&str> {
        (**self).name()
    }
    fn uid(&self) -> Option<&str> {
        (**self).uid()
    }
    fn deleting(&self) -> bool {
        (**self).deleting()
    }
    fn terminal(&self) -> bool {
        (**self).terminal()
    }
    fn ready(&self) -> bool {
        (**self).ready()
    }
    fn pod_ip(&self) -> Option<&str> {
        (**self).pod_ip()
    }
    fn pod_ips(&self) -> impl Iterator<Item = &str> {
        (**self).pod_ips()
    }
    fn node_name(&self) -> Option<&str> {
        (**self).node_name()
    }
    fn hostname(&self) -> Option<&str> {
        (**self).hostname()
    }
    fn subdomain(&self) -> Option<&str> {
        (**self).subdomain()
    }
    fn named_port(&self, name: &str, proto: &str) -> Option<i32> {
        (**self).named_port(name, proto)
    }
}

impl PodView for Pod {
    fn namespace(&self) -> Option<&str> {
        self.metadata.namespace.as_deref()
    }
    fn name(&self) -> Option<&str> {
        self.metadata.name.as_deref()
    }
    fn uid(&self) -> Option<&str> {
        self.metadata.uid.as_deref()
    }
    fn deleting(&self) -> bool {
        self.metadata.deletion_timestamp.is_some()
    }
    fn terminal(&self) -> bool {
        matches!(
            self.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Succeeded") | Some("Failed")
        )
    }
    fn ready(&self) -> bool {
        self.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
            .is_some_and(|c| c.status == "True")
    }
    fn pod_ip(&self) -> Option<&str> {
        self.status.as_ref().and_then(|s| s.pod_ip.as_deref())
    }
    fn pod_ips(&self) -> impl Iterator<Item = &str> {
        self.status
            .as_ref()
            .and_then(|s| s.pod_ips.as_ref())
            .into_iter()
            .flatten()
            .map(|p| p.ip.as_str())
    }
    fn node_name(&self) -> Option<&str> {
        self.spec.as_ref().and_then(|s| s.node_name.as_deref())
    }
    fn hostname(&self) -> Option<&str> {
        self.spec.as_ref().and_then(|s| s.hostname.as_deref())
    }
    fn subdomain(&self) -> Option<&str> {
        self.spec.as_ref().and_then(|s| s.subdomain.as_deref())
    }
    fn named_port(&self, name: &str, proto: &str) -> Option<i32> {
        named_ports(self)
            .find(|p| p.name == name && p.protocol.as_deref().unwrap_or("TCP") == proto)
            .map(|p| p.port)
    }
}

/// A named container port (unnamed ports are never looked up by name, so never kept).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamedPort {
    /// Port name.
    pub name: String,
    /// containerPort.
    pub port: i32,
    /// Protocol as given (None reads as TCP).
    pub protocol: Option<String>,
}

fn named_ports(pod: &Pod) -> impl Iterator<Item = NamedPort> + '_ {
    let spec = pod.spec.as_ref();
    let main = spec.into_iter().flat_map(|s| s.containers.iter());
    let sidecars = spec
        .and_then(|s| s.init_containers.as_ref())
        .into_iter()
        .flatten()
        .filter(|c| c.restart_policy.as_deref() == Some("Always"));
    main.chain(sidecars)
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| {
            p.name.as_ref().map(|n| NamedPort {
                name: n.clone(),
                port: p.container_port,
                protocol: p.protocol.clone(),
            })
        })
}

/// Shares one label map between pods labelled alike (the pods of one ReplicaSet), so a
/// cluster's pod records hold each distinct label set once. Maps no record uses any more are
/// dropped when the set has doubled since the last sweep, which keeps the cost amortised O(1).
#[derive(Default)]
pub struct LabelInterner {
    inner: Mutex<Interned>,
}

#[derive(Default)]
struct Interned {
    sets: HashSet<Arc<BTreeMap<String, String>>>,
    sweep_at: usize,
}

static LABELS: std::sync::LazyLock<LabelInterner> = std::sync::LazyLock::new(Default::default);

impl LabelInterner {
    /// The shared map equal to `labels`.
    pub fn intern(&self, labels: BTreeMap<String, String>) -> Arc<BTreeMap<String, String>> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(shared) = g.sets.get(&labels) {
            return shared.clone();
        }
        if g.sets.len() >= g.sweep_at {
            // Held only by the set: no record uses the map any more.
            g.sets.retain(|m| Arc::strong_count(m) > 1);
            g.sweep_at = (g.sets.len() * 2).max(1024);
        }
        let shared = Arc::new(labels);
        g.sets.insert(shared.clone());
        shared
    }

    /// Drops maps no record uses any more, and returns how many distinct sets remain.
    pub fn sweep(&self) -> usize {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.sets.retain(|m| Arc::strong_count(m) > 1);
        g.sets.len()
    }
}

/// The part of a pod the controllers read, kept in their caches instead of the API's `Pod`
/// (which costs about 2.5 KB inline even when nearly empty). Labels are shared between pods
/// with the same label set (see [`LabelInterner`]). No resourceVersion: two records
/// that compare equal give the same endpoints, so an update that changes nothing we read is
/// not news.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRecord {
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// `metadata.uid`.
    pub uid: Option<String>,
    /// `metadata.labels`.
    pub labels: Arc<BTreeMap<String, String>>,
    /// `metadata.deletionTimestamp` is set.
    pub deleting: bool,
    /// `status.phase` is Succeeded or Failed.
    pub terminal: bool,
    /// The Ready condition is True.
    pub ready: bool,
    /// `status.podIP`.
    pub pod_ip: Option<String>,
    /// `status.podIPs[*].ip`.
    pub pod_ips: Box<[String]>,
    /// `spec.nodeName`.
    pub node_name: Option<String>,
    /// `spec.hostname`.
    pub hostname: Option<String>,
    /// `spec.subdomain`.
    pub subdomain: Option<String>,
    /// Named ports of containers, then of sidecar init containers.
    pub ports: Box<[NamedPort]>,
}

impl PodRecord {
    /// The record of a pod (the pod is consumed so its strings move rather than copy).
    pub fn from_pod(pod: Pod) -> Self {
        let deleting = pod.deleting();
        let terminal = pod.terminal();
        let ready = pod.ready();
        let ports: Box<[NamedPort]> = named_ports(&pod).collect();
        let meta = pod.metadata;
        let spec = pod.spec.unwrap_or_default();
        let status = pod.status.unwrap_or_default();
        PodRecord {
            namespace: meta.namespace.unwrap_or_default(),
            name: meta.name.unwrap_or_default(),
            uid: meta.uid,
            labels: LABELS.intern(meta.labels.unwrap_or_default()),
            deleting,
            terminal,
            ready,
            pod_ip: status.pod_ip,
            pod_ips: status
                .pod_ips
                .unwrap_or_default()
                .into_iter()
                .map(|p| p.ip)
                .collect(),
            node_name: spec.node_name,
            hostname: spec.hostname,
            subdomain: spec.subdomain,
            ports,
        }
    }

    /// The key of the pod.
    pub fn key(&self) -> scm_runtime::ObjectKey {
        scm_runtime::ObjectKey::new(self.namespace.clone(), self.name.clone())
    }
}

impl PodView for PodRecord {
    fn namespace(&self) -> Option<&str> {
        Some(&self.namespace)
    }
    fn name(&self) -> Option<&str> {
        Some(&self.name)
    }
    fn uid(&self) -> Option<&str> {
        self.uid.as_deref()
    }
    fn deleting(&self) -> bool {
        self.deleting
    }
    fn terminal(&self) -> bool {
        self.terminal
    }
    fn ready(&self) -> bool {
        self.ready
    }
    fn pod_ip(&self) -> Option<&str> {
        self.pod_ip.as_deref()
    }
    fn pod_ips(&self) -> impl Iterator<Item = &str> {
        self.pod_ips.iter().map(String::as_str)
    }
    fn node_name(&self) -> Option<&str> {
        self.node_name.as_deref()
    }
    fn hostname(&self) -> Option<&str> {
        self.hostname.as_deref()
    }
    fn subdomain(&self) -> Option<&str> {
        self.subdomain.as_deref()
    }
    fn named_port(&self, name: &str, proto: &str) -> Option<i32> {
        self.ports
            .iter()
            .find(|p| p.name == name && p.protocol.as_deref().unwrap_or("TCP") == proto)
            .map(|p| p.port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(p: &[(&str, &str)]) -> BTreeMap<String, String> {
        p.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn interner_shares_label_maps_and_forgets_unused_ones() {
        let i = LabelInterner::default();
        let a = i.intern(labels(&[("app", "web")]));
        let b = i.intern(labels(&[("app", "web")]));
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(i.sweep(), 1);
        drop(a);
        assert_eq!(i.sweep(), 1, "b still uses the map");
        drop(b);
        assert_eq!(i.sweep(), 0);
    }

    #[test]
    fn records_of_pods_labelled_alike_share_their_labels() {
        let pod = |name: &str| Pod {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                name: Some(name.into()),
                labels: Some(labels(&[("app", "shared-labels-test")])),
                ..Default::default()
            },
            ..Default::default()
        };
        let a = PodRecord::from_pod(pod("p1"));
        let b = PodRecord::from_pod(pod("p2"));
        assert!(Arc::ptr_eq(&a.labels, &b.labels));
    }
}
