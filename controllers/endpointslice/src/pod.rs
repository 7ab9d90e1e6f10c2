//! What the controllers read of a pod: the [`PodView`] trait over the API's `Pod` and the
//! compact [`PodRecord`] the Pod informer keeps (one per pod for the whole process, shared by
//! the EndpointSlice and Endpoints controllers), with label maps interned across pods.

use std::collections::{BTreeMap, HashSet};
use std::hash::Hash;
use std::num::NonZeroU32;
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
    /// The Ready condition's `lastTransitionTime`, in seconds since the Unix epoch (the API
    /// keeps whole seconds): what upstream's trigger-time tracker reads of a pod.
    fn ready_transition(&self) -> Option<i64>;
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
    fn ready_transition(&self) -> Option<i64> {
        (**self).ready_transition()
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
        ready_condition(self).is_some_and(|c| c.status == "True")
    }
    fn ready_transition(&self) -> Option<i64> {
        ready_condition(self)
            .and_then(|c| c.last_transition_time.as_ref())
            .map(|t| t.0.as_second())
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

fn ready_condition(pod: &Pod) -> Option<&k8s_openapi::api::core::v1::PodCondition> {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
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

/// Shares one value between records that hold equal ones: one label map between pods
/// labelled alike (the pods of one ReplicaSet), one string per namespace and per Node name, so
/// a cluster's pod records hold each distinct value once. Values no record uses any more are
/// dropped when the set has doubled since the last sweep, which keeps the cost amortised O(1).
pub struct Interner<T: ?Sized> {
    inner: Mutex<Interned<T>>,
}

struct Interned<T: ?Sized> {
    set: HashSet<Arc<T>>,
    sweep_at: usize,
}

impl<T: ?Sized> Default for Interner<T> {
    fn default() -> Self {
        Interner {
            inner: Mutex::new(Interned {
                set: HashSet::new(),
                sweep_at: 0,
            }),
        }
    }
}

/// The interner of pod label maps.
pub type LabelInterner = Interner<BTreeMap<String, String>>;

static LABELS: std::sync::LazyLock<LabelInterner> = std::sync::LazyLock::new(Default::default);
static NAMES: std::sync::LazyLock<Interner<str>> = std::sync::LazyLock::new(Default::default);

impl<T: ?Sized + Hash + Eq> Interner<T> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Interned<T>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds `shared` (not in the set yet), sweeping first when the set has doubled.
    fn insert_new(g: &mut Interned<T>, shared: Arc<T>) -> Arc<T> {
        if g.set.len() >= g.sweep_at {
            // Held only by the set: no record uses the value any more.
            g.set.retain(|v| Arc::strong_count(v) > 1);
            g.sweep_at = (g.set.len() * 2).max(1024);
        }
        g.set.insert(shared.clone());
        shared
    }

    /// Drops values no record uses any more, and returns how many distinct ones remain.
    pub fn sweep(&self) -> usize {
        let mut g = self.lock();
        g.set.retain(|v| Arc::strong_count(v) > 1);
        g.set.len()
    }
}

impl Interner<str> {
    /// The shared string equal to `s`.
    pub fn intern(&self, s: &str) -> Arc<str> {
        let mut g = self.lock();
        match g.set.get(s) {
            Some(shared) => shared.clone(),
            None => Self::insert_new(&mut g, Arc::from(s)),
        }
    }
}

impl LabelInterner {
    /// The shared map equal to `labels`.
    pub fn intern(&self, labels: BTreeMap<String, String>) -> Arc<BTreeMap<String, String>> {
        let mut g = self.lock();
        match g.set.get(&labels) {
            Some(shared) => shared.clone(),
            None => Self::insert_new(&mut g, Arc::new(labels)),
        }
    }
}

/// The part of a pod the controllers read, kept in their caches instead of the API's `Pod`
/// (which costs about 2.5 KB inline even when nearly empty). Label maps, namespaces and Node
/// names are shared between records (see [`Interner`]); the rest is boxed to its length. No
/// resourceVersion: two records that compare equal give the same endpoints, so an update that
/// changes nothing we read is not news.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRecord {
    /// `metadata.namespace`.
    pub namespace: Arc<str>,
    /// `metadata.name`.
    pub name: Box<str>,
    /// `metadata.uid`.
    pub uid: Option<Box<str>>,
    /// `metadata.labels`.
    pub labels: Arc<BTreeMap<String, String>>,
    /// `metadata.deletionTimestamp` is set.
    pub deleting: bool,
    /// `status.phase` is Succeeded or Failed.
    pub terminal: bool,
    /// The Ready condition is True.
    pub ready: bool,
    /// The Ready condition's `lastTransitionTime` in seconds since the Unix epoch. Four bytes
    /// that fit beside the flags in what was padding, so the record does not grow; a time
    /// before 1970-01-01T00:00:01Z or after 2106 reads as none (no trigger time from this pod).
    ready_since: Option<NonZeroU32>,
    /// `status.podIPs[*].ip`.
    pub pod_ips: Box<[Box<str>]>,
    /// `status.podIP`: by API validation the first of `pod_ips` when both are set, so only
    /// stored when it is not.
    pod_ip: PodIp,
    /// `spec.nodeName`.
    pub node_name: Option<Arc<str>>,
    /// `spec.hostname`.
    pub hostname: Option<Box<str>>,
    /// `spec.subdomain`.
    pub subdomain: Option<Box<str>>,
    /// Named ports of containers, then of sidecar init containers.
    pub ports: Box<[NamedPort]>,
}

/// Where a record's `status.podIP` is.
#[derive(Clone, Debug, PartialEq, Eq)]
enum PodIp {
    Unset,
    FirstOfList,
    Own(Box<str>),
}

impl PodRecord {
    /// The record of a pod (the pod is consumed; strings are boxed to their length).
    pub fn from_pod(pod: Pod) -> Self {
        let deleting = pod.deleting();
        let terminal = pod.terminal();
        let ready = pod.ready();
        let ready_since = pod
            .ready_transition()
            .and_then(|t| u32::try_from(t).ok())
            .and_then(NonZeroU32::new);
        let ports: Box<[NamedPort]> = named_ports(&pod).collect();
        let meta = pod.metadata;
        let spec = pod.spec.unwrap_or_default();
        let status = pod.status.unwrap_or_default();
        let pod_ips: Box<[Box<str>]> = status
            .pod_ips
            .unwrap_or_default()
            .into_iter()
            .map(|p| p.ip.into_boxed_str())
            .collect();
        let pod_ip = match status.pod_ip {
            None => PodIp::Unset,
            Some(ip) if pod_ips.first().is_some_and(|f| **f == *ip) => PodIp::FirstOfList,
            Some(ip) => PodIp::Own(ip.into_boxed_str()),
        };
        PodRecord {
            namespace: NAMES.intern(meta.namespace.as_deref().unwrap_or_default()),
            name: meta.name.unwrap_or_default().into_boxed_str(),
            uid: meta.uid.map(String::into_boxed_str),
            labels: LABELS.intern(meta.labels.unwrap_or_default()),
            deleting,
            terminal,
            ready,
            ready_since,
            pod_ips,
            pod_ip,
            node_name: spec.node_name.as_deref().map(|n| NAMES.intern(n)),
            hostname: spec.hostname.map(String::into_boxed_str),
            subdomain: spec.subdomain.map(String::into_boxed_str),
            ports,
        }
    }

    /// The key of the pod.
    pub fn key(&self) -> scm_runtime::ObjectKey {
        scm_runtime::ObjectKey::new(&*self.namespace, &*self.name)
    }

    /// The pod's (namespace, name), as the informer's store reads it.
    pub fn key_ref(&self) -> (&str, &str) {
        (&self.namespace, &self.name)
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
    fn ready_transition(&self) -> Option<i64> {
        self.ready_since.map(|t| i64::from(t.get()))
    }
    fn pod_ip(&self) -> Option<&str> {
        match &self.pod_ip {
            PodIp::Unset => None,
            PodIp::FirstOfList => self.pod_ips.first().map(|s| &**s),
            PodIp::Own(ip) => Some(ip),
        }
    }
    fn pod_ips(&self) -> impl Iterator<Item = &str> {
        self.pod_ips.iter().map(|s| &**s)
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

    #[test]
    fn records_share_namespace_and_node_names() {
        let pod = |name: &str| Pod {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                name: Some(name.into()),
                namespace: Some("shared-ns-test".into()),
                ..Default::default()
            },
            spec: Some(k8s_openapi::api::core::v1::PodSpec {
                node_name: Some("shared-node-test".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let (a, b) = (
            PodRecord::from_pod(pod("p1")),
            PodRecord::from_pod(pod("p2")),
        );
        assert!(Arc::ptr_eq(&a.namespace, &b.namespace));
        let (na, nb) = (a.node_name.clone(), b.node_name.clone());
        assert!(na.zip(nb).is_some_and(|(x, y)| Arc::ptr_eq(&x, &y)));
        assert_eq!(a.node_name(), Some("shared-node-test"));
    }

    #[test]
    fn ready_transition_reads_as_the_api_gave_it_and_costs_the_record_nothing() {
        use k8s_openapi::api::core::v1::{PodCondition, PodStatus};
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
        let with = |secs: Option<i64>| Pod {
            status: Some(PodStatus {
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: "True".into(),
                    last_transition_time: secs.map(|s| {
                        Time(k8s_openapi::jiff::Timestamp::from_second(s).expect("in range"))
                    }),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        };
        for secs in [Some(1_780_000_000), Some(1), None] {
            let p = with(secs);
            assert_eq!(p.ready_transition(), secs);
            assert_eq!(PodRecord::from_pod(p).ready_transition(), secs);
        }
        // Outside what four bytes hold: no trigger time rather than a wrong one.
        for secs in [-5, 0, i64::from(u32::MAX) + 1] {
            assert_eq!(
                PodRecord::from_pod(with(Some(secs))).ready_transition(),
                None
            );
        }
        // A transition alone is news: two records that differ only there are not equal.
        let (a, b) = (
            PodRecord::from_pod(with(Some(10))),
            PodRecord::from_pod(with(Some(11))),
        );
        assert_ne!(a, b);
        // The time sits in what was padding beside the flags (168 bytes before it, on 64-bit).
        assert!(std::mem::size_of::<PodRecord>() <= 168);
    }

    #[test]
    fn pod_ip_reads_as_the_api_gave_it_whether_or_not_it_leads_pod_ips() {
        use k8s_openapi::api::core::v1::{PodIP, PodStatus};
        let with = |ip: Option<&str>, ips: &[&str]| Pod {
            status: Some(PodStatus {
                pod_ip: ip.map(Into::into),
                pod_ips: Some(ips.iter().map(|i| PodIP { ip: i.to_string() }).collect()),
                ..Default::default()
            }),
            ..Default::default()
        };
        for (ip, ips) in [
            (Some("10.0.0.1"), &["10.0.0.1", "fd00::1"][..]),
            (Some("10.0.0.2"), &["10.0.0.1"][..]),
            (Some("10.0.0.3"), &[][..]),
            (None, &["10.0.0.1"][..]),
            (None, &[][..]),
        ] {
            let p = with(ip, ips);
            let r = PodRecord::from_pod(p.clone());
            assert_eq!(r.pod_ip(), p.pod_ip(), "{ip:?} {ips:?}");
            assert_eq!(
                r.pod_ips().collect::<Vec<_>>(),
                p.pod_ips().collect::<Vec<_>>()
            );
        }
    }
}
