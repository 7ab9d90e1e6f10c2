//! Local address pools (`--cloud-provider=local`): for clusters without a cloud, each Service
//! gets a stable address per IP family from pools defined as cluster-scoped
//! `LoadBalancerIPPool` objects ([`crd`]) or, deprecated, in `--cloud-config`. Nothing is
//! programmed on the network; the addresses are for a proxy or router that announces them (as
//! MetalLB would).
//!
//! The `--cloud-config` file (YAML or JSON; `pools` is deprecated, use pool objects):
//!
//! ```yaml
//! pools:                 # CIDRs; the family of each is inferred
//!   - 192.168.100.0/28
//!   - fd00:100::/120
//! ipMode: VIP            # status.loadBalancer.ingress[].ipMode: VIP (default) or Proxy
//! ```
//!
//! Decisions are pure ([`plan`]): an address a Service holds stays with it for as long as it
//! asks for nothing else, whatever happens to the pools; an address anyone else publishes
//! (another implementation's status, `spec.externalIPs`) or another Service pins is never handed
//! out. A Service asks for specific addresses with `spec.loadBalancerIP` (deprecated upstream,
//! still honoured) or the annotation [`REQUESTED_IPS_ANNOTATION`] (comma-separated, one per
//! family). An address outside every pool is a permanent error (Warning Event, no retry until
//! the Service changes); a full pool, or a pinned address someone holds, is retryable, and
//! retried as soon as another Service's load balancer is deleted or the holder lets it go.
//! Services that carry [`ALLOW_SHARED_IP_ANNOTATION`] with one key may hold one address when
//! their ports do not clash ([`share`], MetalLB's rules); the address is free again when the
//! last of them goes. State is rebuilt at the start
//! of every leadership term from the addresses Services publish, after the pools and Services
//! are listed, so a restart never reassigns. [`watch`] keeps the pools in step with their
//! objects and writes their status.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, OnceLock};

use async_trait::async_trait;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::{LoadBalancerIngress, LoadBalancerStatus, Node, Service};
use scm_allocator::IpFamily;
use scm_runtime::ControllerContext;
use serde::Deserialize;
use tracing::{info, warn};

use crate::CloudLbConfig;
use crate::provider::{CAPACITY_EXHAUSTED, LoadBalancerProvider, ProviderError};

pub mod crd;
pub mod plan;
pub mod share;
mod status;
mod watch;

use plan::{Book, Candidate, Pool, PoolDef, Refusal};
pub use share::ALLOW_SHARED_IP_ANNOTATION;

/// Annotation with the addresses a Service requests (comma-separated).
pub const REQUESTED_IPS_ANNOTATION: &str = "service-controller-manager.io/load-balancer-ips";

/// The local provider's `--cloud-config`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalCloudConfig {
    /// Address pools as CIDRs (network and IPv4 broadcast addresses are never handed out).
    /// Deprecated: `LoadBalancerIPPool` objects replace them; accepted for one release.
    #[serde(default)]
    pub pools: Vec<IpNet>,
    /// The ipMode published with each address: `VIP` or `Proxy`.
    #[serde(default)]
    pub ip_mode: Option<String>,
}

/// Why a cloud config cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LocalConfigError {
    /// Two pools overlap (an address would have two owners).
    #[error("local cloud config: pools {0} and {1} overlap")]
    Overlap(IpNet, IpNet),
    /// Unknown ipMode.
    #[error("local cloud config: ipMode must be VIP or Proxy, got {0:?}")]
    IpMode(String),
}

struct State {
    /// The file's pools (first: they are the oldest), then the objects' by creation.
    file: Vec<PoolDef>,
    objects: Vec<PoolDef>,
    pools: Vec<Pool>,
    book: Book,
}

impl State {
    fn recompile(&mut self) {
        let defs: Vec<PoolDef> = self.file.iter().chain(&self.objects).cloned().collect();
        self.pools = plan::compile(&defs);
    }
}

pub(crate) struct Inner {
    state: Mutex<State>,
    ip_mode: String,
    /// The cluster, once [`LoadBalancerProvider::start`] gave us a context.
    world: OnceLock<watch::World>,
    /// Pools or holdings changed: the watcher recomputes gauges and Warnings.
    changed: tokio::sync::Notify,
    /// Gauges recomputed: the status writer compares each pool object's status.
    changed_status: tokio::sync::Notify,
    /// Pools changed: the controller retries the Services waiting for capacity.
    capacity: Arc<tokio::sync::Notify>,
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Addresses from local pools.
pub struct LocalProvider {
    inner: Arc<Inner>,
}

fn key(svc: &Service) -> String {
    svc.metadata.uid.clone().unwrap_or_else(|| svc_name(svc))
}

fn svc_name(svc: &Service) -> String {
    format!(
        "{}/{}",
        svc.metadata.namespace.as_deref().unwrap_or(""),
        svc.metadata.name.as_deref().unwrap_or("")
    )
}

fn families(svc: &Service) -> Vec<IpFamily> {
    let fams: Vec<IpFamily> = svc
        .spec
        .as_ref()
        .and_then(|s| s.ip_families.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|f| IpFamily::from_k8s(f))
        .collect();
    if fams.is_empty() {
        vec![IpFamily::V4]
    } else {
        fams
    }
}

/// Addresses the Service asks for, or why the request is malformed.
fn requested(svc: &Service) -> Result<Vec<IpAddr>, ProviderError> {
    let mut raw: Vec<&str> = vec![];
    if let Some(v) = svc
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(REQUESTED_IPS_ANNOTATION))
    {
        raw.extend(v.split(',').map(str::trim).filter(|s| !s.is_empty()));
    } else if let Some(ip) = svc
        .spec
        .as_ref()
        .and_then(|s| s.load_balancer_ip.as_deref())
        .filter(|s| !s.is_empty())
    {
        raw.push(ip.trim());
    }
    let mut out = vec![];
    for r in raw {
        let ip: IpAddr = r.parse().map_err(|_| {
            ProviderError::permanent(format!(
                "requested load balancer address {r:?} is not an IP"
            ))
        })?;
        if out
            .iter()
            .any(|o: &IpAddr| IpFamily::of(o) == IpFamily::of(&ip))
        {
            return Err(ProviderError::permanent(format!(
                "more than one requested {} address",
                IpFamily::of(&ip)
            )));
        }
        out.push(ip);
    }
    Ok(out)
}

fn published(svc: &Service) -> Vec<IpAddr> {
    svc.status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|l| l.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.as_deref()?.parse().ok())
        .collect()
}

/// The provider's error for a refusal: pins that cannot ever work are permanent; a full pool, a
/// held pin and a missing pool are coded so the controller retries them as soon as an address is
/// released or a pool changes.
fn refusal_error(r: Refusal) -> ProviderError {
    match r {
        Refusal::Outside(ip) => ProviderError::permanent(format!(
            "requested address {ip} is outside every local pool that serves addresses"
        )),
        Refusal::NotAdmitted(ip, pool) => ProviderError::permanent(format!(
            "requested address {ip} is in pool {pool}, whose selectors do not admit this Service"
        )),
        Refusal::WrongFamily(ip) => ProviderError::permanent(format!(
            "requested address {ip} is not of the Service's IP families"
        )),
        Refusal::Held(ip, who) => ProviderError::retryable(format!(
            "requested address {ip} is already used by {who}; retried when it is released"
        ))
        .with_code(CAPACITY_EXHAUSTED),
        Refusal::Unshareable(ip, why) => ProviderError::retryable(format!(
            "requested address {ip} cannot be shared: {why}; retried when it is released"
        ))
        .with_code(CAPACITY_EXHAUSTED),
        Refusal::Exhausted(fam) => {
            ProviderError::retryable(format!("no free {fam} address left in the local pools"))
                .with_code(CAPACITY_EXHAUSTED)
        }
        // Coded too: a pool created for it wakes it (as a release would).
        Refusal::NoPool(fams) => ProviderError::retryable(format!(
            "no local pool serves the Service's IP families {fams:?} (or admits it)"
        ))
        .with_code(CAPACITY_EXHAUSTED),
    }
}

impl LocalProvider {
    /// A provider over the configured pools (more come from `LoadBalancerIPPool` objects once
    /// the controller starts it).
    pub fn new(cfg: LocalCloudConfig) -> Result<Self, LocalConfigError> {
        for (i, a) in cfg.pools.iter().enumerate() {
            for b in &cfg.pools[i + 1..] {
                if a.contains(&b.network()) || b.contains(&a.network()) {
                    return Err(LocalConfigError::Overlap(*a, *b));
                }
            }
        }
        let ip_mode = match cfg.ip_mode.as_deref() {
            None | Some("VIP") => "VIP".to_string(),
            Some("Proxy") => "Proxy".to_string(),
            Some(other) => return Err(LocalConfigError::IpMode(other.to_string())),
        };
        let file = cfg
            .pools
            .iter()
            .enumerate()
            .map(|(i, c)| PoolDef {
                name: format!("cloud-config/{i}"),
                cidrs: vec![c.to_string()],
                ..PoolDef::default()
            })
            .collect();
        let mut st = State {
            file,
            objects: vec![],
            pools: vec![],
            book: Book::default(),
        };
        st.recompile();
        Ok(LocalProvider {
            inner: Arc::new(Inner {
                state: Mutex::new(st),
                ip_mode,
                world: OnceLock::new(),
                changed: tokio::sync::Notify::new(),
                changed_status: tokio::sync::Notify::new(),
                capacity: Arc::new(tokio::sync::Notify::new()),
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.lock()
    }

    fn status(&self, ips: &[IpAddr]) -> LoadBalancerStatus {
        LoadBalancerStatus {
            ingress: Some(
                ips.iter()
                    .map(|ip| LoadBalancerIngress {
                        ip: Some(ip.to_string()),
                        ip_mode: Some(self.inner.ip_mode.clone()),
                        ..Default::default()
                    })
                    .collect(),
            ),
        }
    }

    /// Free addresses left in all pools that serve (for tests and metrics; IPv6 pools count
    /// up to `usize::MAX`).
    pub fn free(&self) -> usize {
        let blocked = self.blocked(None, None);
        let st = self.lock();
        st.pools
            .iter()
            .map(|p| {
                let r = plan::pool_report(p, &st.book, &blocked);
                r.available.0.saturating_add(r.available.1)
            })
            .fold(0usize, |a, b| {
                a.saturating_add(usize::try_from(b).unwrap_or(usize::MAX))
            })
    }

    /// Addresses others publish or pin (address → who), leaving out `except`'s own and the
    /// pins of Services that share under `key`.
    fn blocked(&self, except: Option<&str>, key: Option<&str>) -> BTreeMap<IpAddr, String> {
        match self.inner.world.get() {
            Some(w) => w.blocked(except, key),
            None => BTreeMap::new(),
        }
    }

    fn candidate(&self, svc: &Service) -> Result<Candidate, ProviderError> {
        let ns_labels = self
            .inner
            .world
            .get()
            .map(|w| w.namespace_labels(svc.metadata.namespace.as_deref().unwrap_or("")));
        Ok(Candidate {
            uid: key(svc),
            who: svc_name(svc),
            labels: svc.metadata.labels.clone().unwrap_or_default(),
            // Without a cluster to look at (unit tests), namespaces are unlabelled.
            ns_labels: ns_labels.unwrap_or_else(|| Some(BTreeMap::new())),
            families: families(svc),
            requested: requested(svc)?,
            published: published(svc),
            share: share::of(svc),
        })
    }
}

#[async_trait]
impl LoadBalancerProvider for LocalProvider {
    fn provider_name(&self) -> &'static str {
        "local"
    }

    fn load_balancer_name(&self, _cluster: &str, service: &Service) -> String {
        svc_name(service)
    }

    fn start(&self, ctx: &ControllerContext, config: &CloudLbConfig) {
        watch::start(self.inner.clone(), ctx, config);
    }

    fn capacity_signal(&self) -> Option<Arc<tokio::sync::Notify>> {
        Some(self.inner.capacity.clone())
    }

    fn recognises(&self, _cluster: &str, service: &Service, status: &LoadBalancerStatus) -> bool {
        // Addresses from our pools, or that we hold for it (a hostname is never ours).
        let ingress = status.ingress.as_deref().unwrap_or_default();
        let st = self.lock();
        let uid = key(service);
        !ingress.is_empty()
            && ingress.iter().all(|i| {
                i.ip.as_deref()
                    .and_then(|ip| ip.parse::<IpAddr>().ok())
                    .is_some_and(|ip| {
                        st.pools.iter().any(|p| p.covers(ip))
                            || st.book.holders(ip).iter().any(|h| h.uid == uid)
                    })
            })
    }

    async fn get(
        &self,
        _cluster: &str,
        service: &Service,
    ) -> Result<Option<LoadBalancerStatus>, ProviderError> {
        let st = self.lock();
        Ok(st
            .book
            .by_service
            .get(&key(service))
            .map(|ips| self.status(ips)))
    }

    async fn ensure(
        &self,
        _cluster: &str,
        service: &Service,
        _nodes: &[Node],
    ) -> Result<LoadBalancerStatus, ProviderError> {
        let c = self.candidate(service)?;
        let blocked = self.blocked(Some(&c.uid), c.share.as_ref().map(|s| s.key.as_str()));
        let mut st = self.lock();
        let a = plan::assign(&st.pools, &st.book, &blocked, &c).map_err(refusal_error)?;
        for ip in &a.released {
            st.book.release(&c.uid, *ip);
        }
        for (ip, pool) in &a.taken {
            st.book
                .take_shared(*ip, &c.uid, &c.who, Some(pool.clone()), c.share.clone());
        }
        // Ports or terms may have changed since it joined: the watcher warns on a clash.
        st.book.set_share(&c.uid, c.share.as_ref());
        // Family order, as the Service lists its families.
        if let Some(v) = st.book.by_service.get_mut(&c.uid) {
            v.clone_from(&a.addresses);
        }
        drop(st);
        if !a.taken.is_empty() || !a.released.is_empty() {
            info!(service = %c.who, addresses = ?a.addresses, taken = ?a.taken, released = ?a.released, "load balancer addresses assigned");
            self.inner.changed.notify_one();
        }
        if !a.released.is_empty() {
            // A pin moved or a family went: whoever waits for the old address may have it.
            self.inner.capacity.notify_one();
        }
        Ok(self.status(&a.addresses))
    }

    async fn update_hosts(
        &self,
        _cluster: &str,
        _service: &Service,
        _nodes: &[Node],
    ) -> Result<(), ProviderError> {
        // Nothing is programmed per node: the addresses do not depend on the node set.
        Ok(())
    }

    async fn ensure_deleted(&self, _cluster: &str, service: &Service) -> Result<(), ProviderError> {
        let released = self.lock().book.release_all(&key(service));
        if !released.is_empty() {
            info!(service = %svc_name(service), ?released, "released load balancer addresses");
            self.inner.changed.notify_one();
        }
        Ok(())
    }

    async fn restore(&self, _cluster: &str, services: &[Service]) -> Result<(), ProviderError> {
        // No decision before the pools and Services are listed: a partial view would hand out
        // what is merely not seen yet.
        if let Some(w) = self.inner.world.get() {
            w.wait_ready().await;
        }
        let mut ordered: Vec<&Service> = services.iter().collect();
        // Oldest first: if two Services claim one address, the one that had it first keeps it.
        ordered.sort_by(|a, b| {
            a.metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0)
                .cmp(&b.metadata.creation_timestamp.as_ref().map(|t| t.0))
                .then_with(|| svc_name(a).cmp(&svc_name(b)))
        });
        let mut st = self.lock();
        // Rebuild from scratch: called at the start of every leadership term, when what this
        // process remembers may be stale (another replica led meanwhile).
        st.book = Book::default();
        for svc in ordered {
            let (uid, who) = (key(svc), svc_name(svc));
            let terms = share::of(svc);
            for ip in published(svc) {
                // Sharers published one address each: they hold it together again.
                if let Err(r) = share::check(ip, st.book.holders(ip), &uid, terms.as_ref()) {
                    warn!(service = %who, %ip, refusal = ?r, "cannot restore published address: an older Service publishes it too");
                    continue;
                }
                // Whatever the pools say now: a published address never moves.
                let origin = st
                    .pools
                    .iter()
                    .find(|p| p.covers(ip))
                    .map(|p| p.def.name.clone());
                if origin.is_none() {
                    // A class-less Service's address in none of our pools cannot be told from
                    // one the cluster's own cloud-controller-manager published: not ours to
                    // hold. It stays in the status all the same (the Service is refused as
                    // served elsewhere, never renumbered).
                    if svc
                        .spec
                        .as_ref()
                        .and_then(|s| s.load_balancer_class.as_ref())
                        .is_none()
                    {
                        warn!(service = %who, %ip, "published address of a class-less Service is in no pool: left to whoever published it");
                        continue;
                    }
                    warn!(service = %who, %ip, "published address is in no pool; it stays with the Service");
                }
                st.book.take_shared(ip, &uid, &who, origin, terms.clone());
            }
        }
        drop(st);
        self.inner.changed.notify_one();
        Ok(())
    }
}

#[cfg(test)]
mod tests;
