//! Local address pools (`--cloud-provider=local`): for clusters without a cloud, each Service
//! gets a stable address per IP family from pools in `--cloud-config`, allocated with the
//! shared allocator core (`scm-allocator`). Nothing is programmed on the network; the
//! addresses are for a proxy or router that announces them (as MetalLB would).
//!
//! The `--cloud-config` file (YAML or JSON):
//!
//! ```yaml
//! pools:                 # CIDRs; the family of each is inferred
//!   - 192.168.100.0/28
//!   - fd00:100::/120
//! ipMode: VIP            # status.loadBalancer.ingress[].ipMode: VIP (default) or Proxy
//! ```
//!
//! A Service asks for specific addresses with `spec.loadBalancerIP` (deprecated upstream, still
//! honoured) or the annotation [`REQUESTED_IPS_ANNOTATION`] (comma-separated, one per family).
//! An address outside every pool, or held by another Service, is a permanent error (Warning
//! Event, no retry until the Service changes); a full pool is retryable, and retried as soon as
//! another Service's load balancer is deleted (which frees an address). State is rebuilt at start from the addresses Services already publish,
//! so a restart never reassigns.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Mutex;

use async_trait::async_trait;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::{LoadBalancerIngress, LoadBalancerStatus, Node, Service};
use scm_allocator::{IpError, IpFamily, IpRange};
use serde::Deserialize;
use tracing::{info, warn};

use crate::provider::{CAPACITY_EXHAUSTED, LoadBalancerProvider, ProviderError};

/// Annotation with the addresses a Service requests (comma-separated).
pub const REQUESTED_IPS_ANNOTATION: &str = "service-controller-manager.io/load-balancer-ips";

/// The local provider's `--cloud-config`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalCloudConfig {
    /// Address pools as CIDRs (network and IPv4 broadcast addresses are never handed out).
    pub pools: Vec<IpNet>,
    /// The ipMode published with each address: `VIP` or `Proxy`.
    #[serde(default)]
    pub ip_mode: Option<String>,
}

/// Why a cloud config cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LocalConfigError {
    /// No pool at all.
    #[error("local cloud config: no pools")]
    NoPools,
    /// Two pools overlap (an address would have two owners).
    #[error("local cloud config: pools {0} and {1} overlap")]
    Overlap(IpNet, IpNet),
    /// Unknown ipMode.
    #[error("local cloud config: ipMode must be VIP or Proxy, got {0:?}")]
    IpMode(String),
}

struct State {
    cidrs: Vec<IpNet>,
    pools: Vec<IpRange>,
    /// Service UID → its addresses (one per family).
    by_service: HashMap<String, Vec<IpAddr>>,
    /// Address → `namespace/name` holding it (for messages).
    holder: BTreeMap<IpAddr, String>,
}

/// Addresses from local pools.
pub struct LocalProvider {
    state: Mutex<State>,
    ip_mode: String,
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

impl State {
    fn pool_for(&mut self, ip: IpAddr) -> Option<&mut IpRange> {
        self.pools.iter_mut().find(|p| p.contains(ip))
    }

    fn release_all(&mut self, uid: &str) -> Vec<IpAddr> {
        let ips = self.by_service.remove(uid).unwrap_or_default();
        for ip in &ips {
            if let Some(p) = self.pool_for(*ip) {
                p.release(*ip);
            }
            self.holder.remove(ip);
        }
        ips
    }

    fn take(&mut self, ip: IpAddr, who: &str) -> Result<(), ProviderError> {
        let holder = self.holder.get(&ip).cloned();
        let Some(pool) = self.pool_for(ip) else {
            return Err(ProviderError::permanent(format!(
                "requested address {ip} is outside every local pool"
            )));
        };
        match pool.allocate(ip) {
            Ok(()) => {
                self.holder.insert(ip, who.to_string());
                Ok(())
            }
            Err(IpError::Allocated) => Err(ProviderError::permanent(format!(
                "requested address {ip} is already used by {}",
                holder.as_deref().unwrap_or("another Service")
            ))),
            Err(e) => Err(ProviderError::permanent(format!(
                "requested address {ip}: {e}"
            ))),
        }
    }

    fn take_next(&mut self, fam: IpFamily, who: &str) -> Result<Option<IpAddr>, ProviderError> {
        let mut any_pool = false;
        let mut rng = rand::rng();
        for p in self.pools.iter_mut().filter(|p| p.family() == fam) {
            any_pool = true;
            match p.allocate_next(&mut rng) {
                Ok(ip) => {
                    self.holder.insert(ip, who.to_string());
                    return Ok(Some(ip));
                }
                Err(IpError::Full) => continue,
                Err(e) => return Err(ProviderError::retryable(e.to_string())),
            }
        }
        if any_pool {
            // Coded, so the controller retries as soon as another Service releases an address.
            Err(
                ProviderError::retryable(format!("no free {fam} address left in the local pools"))
                    .with_code(CAPACITY_EXHAUSTED),
            )
        } else {
            Ok(None)
        }
    }
}

impl LocalProvider {
    /// A provider over the configured pools.
    pub fn new(cfg: LocalCloudConfig) -> Result<Self, LocalConfigError> {
        if cfg.pools.is_empty() {
            return Err(LocalConfigError::NoPools);
        }
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
        Ok(LocalProvider {
            state: Mutex::new(State {
                cidrs: cfg.pools.clone(),
                pools: cfg.pools.iter().map(|c| IpRange::new_capped(*c)).collect(),
                by_service: HashMap::new(),
                holder: BTreeMap::new(),
            }),
            ip_mode,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn status(&self, ips: &[IpAddr]) -> LoadBalancerStatus {
        LoadBalancerStatus {
            ingress: Some(
                ips.iter()
                    .map(|ip| LoadBalancerIngress {
                        ip: Some(ip.to_string()),
                        ip_mode: Some(self.ip_mode.clone()),
                        ..Default::default()
                    })
                    .collect(),
            ),
        }
    }

    /// Free addresses left in all pools (for tests and metrics).
    pub fn free(&self) -> usize {
        self.lock().pools.iter().map(IpRange::free).sum()
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

    fn recognises(&self, _cluster: &str, _service: &Service, status: &LoadBalancerStatus) -> bool {
        // Addresses from our pools only (a hostname is never ours).
        let ingress = status.ingress.as_deref().unwrap_or_default();
        let st = self.lock();
        !ingress.is_empty()
            && ingress.iter().all(|i| {
                i.ip.as_deref()
                    .and_then(|ip| ip.parse::<IpAddr>().ok())
                    .is_some_and(|ip| st.cidrs.iter().any(|c| c.contains(&ip)))
            })
    }

    async fn get(
        &self,
        _cluster: &str,
        service: &Service,
    ) -> Result<Option<LoadBalancerStatus>, ProviderError> {
        let st = self.lock();
        Ok(st.by_service.get(&key(service)).map(|ips| self.status(ips)))
    }

    async fn ensure(
        &self,
        _cluster: &str,
        service: &Service,
        _nodes: &[Node],
    ) -> Result<LoadBalancerStatus, ProviderError> {
        let want_req = requested(service)?;
        let fams = families(service);
        let uid = key(service);
        let who = svc_name(service);
        let mut st = self.lock();
        if let Some(have) = st.by_service.get(&uid).cloned() {
            // Keep what we have unless the request changed: an unchanged Service keeps its
            // address for life.
            let satisfies = want_req.iter().all(|r| have.contains(r))
                && fams.iter().all(|f| {
                    have.iter().any(|h| IpFamily::of(h) == *f)
                        || !st.pools.iter().any(|p| p.family() == *f)
                });
            if satisfies {
                return Ok(self.status(&have));
            }
            let released = st.release_all(&uid);
            info!(service = %who, ?released, "requested addresses changed: reallocating");
        }
        // Validate every request before taking anything, so a refusal leaves no partial state.
        for r in &want_req {
            if !fams.contains(&IpFamily::of(r)) {
                return Err(ProviderError::permanent(format!(
                    "requested address {r} is not of the Service's IP families"
                )));
            }
        }
        let mut got: Vec<IpAddr> = vec![];
        let published = published(service);
        let result = (|| {
            for fam in &fams {
                if let Some(r) = want_req.iter().find(|r| IpFamily::of(r) == *fam) {
                    st.take(*r, &who)?;
                    got.push(*r);
                    continue;
                }
                // Prefer the address the Service already shows (e.g. lost state) if free.
                if let Some(p) = published.iter().find(|p| IpFamily::of(p) == *fam)
                    && st.take(*p, &who).is_ok()
                {
                    got.push(*p);
                    continue;
                }
                if let Some(ip) = st.take_next(*fam, &who)? {
                    got.push(ip);
                }
            }
            if got.is_empty() {
                return Err(ProviderError::permanent(format!(
                    "no local pool serves the Service's IP families {fams:?}"
                )));
            }
            Ok(())
        })();
        if let Err(e) = result {
            for ip in &got {
                if let Some(p) = st.pool_for(*ip) {
                    p.release(*ip);
                }
                st.holder.remove(ip);
            }
            return Err(e);
        }
        info!(service = %who, addresses = ?got, "allocated load balancer addresses");
        st.by_service.insert(uid, got.clone());
        Ok(self.status(&got))
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
        let released = self.lock().release_all(&key(service));
        if !released.is_empty() {
            info!(service = %svc_name(service), ?released, "released load balancer addresses");
        }
        Ok(())
    }

    async fn restore(&self, _cluster: &str, services: &[Service]) -> Result<(), ProviderError> {
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
        st.pools = st.cidrs.iter().map(|c| IpRange::new_capped(*c)).collect();
        st.by_service.clear();
        st.holder.clear();
        for svc in ordered {
            let who = svc_name(svc);
            let mut got = vec![];
            for ip in published(svc) {
                match st.take(ip, &who) {
                    Ok(()) => got.push(ip),
                    Err(e) => {
                        warn!(service = %who, %ip, error = %e, "cannot restore published address")
                    }
                }
            }
            if !got.is_empty() {
                st.by_service.insert(key(svc), got);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
