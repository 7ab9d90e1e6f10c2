//! The pure ClusterIP core: configured ranges and all Services in, the mirrored allocation
//! state, repair findings and per-Service assign plans out. No I/O here.
//!
//! - [`ranges`]: the configured ranges and the pool behind the ledger.
//! - [`finding`]: what the repair loops report.
//! - [`ipaddr`]: IPAddress objects: their findings and the capacity counted from them.
//! - this module: the ledger ([`Mirror`], shared with NodePorts as [`scm_allocator::Mirror`])
//!   built from all Services.
//! - [`assign`]: the assign path ([`plan`]).

use std::net::IpAddr;

use k8s_openapi::api::core::v1::Service;
use scm_allocator::shell::seniority;
pub use scm_allocator::shell::service_type;
use scm_allocator::{IpFamily, Pending};
use scm_runtime::ObjectKey;

pub mod assign;
pub mod finding;
pub mod ipaddr;
pub mod ranges;

pub use assign::{Plan, Rejection, apply, new_ips, plan};
pub use finding::{Finding, SETTLE};
pub use ipaddr::{Grace, IpAddresses};
pub use ranges::{
    ConfigError, DEFAULT_SERVICE_CIDR, RangeConfig, RangeSource, RangeSpec, Ranges, TrackedRange,
};

/// The allocation state mirrored from all Services, with what is wrong with them: the ledger
/// over the configured ranges.
pub type Mirror = scm_allocator::Mirror<Ranges, ObjectKey, Finding>;

/// The ClusterIPs a Service claims: `clusterIPs`, else `clusterIP`; nothing for ExternalName
/// (its addresses are released) or headless Services.
pub fn claimed_ips(svc: &Service) -> Vec<String> {
    let Some(spec) = svc.spec.as_ref() else {
        return vec![];
    };
    if service_type(svc) == "ExternalName" {
        return vec![];
    }
    let ips: Vec<String> = match spec.cluster_ips.as_ref().filter(|v| !v.is_empty()) {
        Some(v) => v.clone(),
        None => spec.cluster_ip.iter().cloned().collect(),
    };
    if ips.first().is_some_and(|s| s == "None") {
        return vec![];
    }
    ips.into_iter().filter(|s| !s.is_empty()).collect()
}

/// An empty state over `config`'s ranges.
pub fn empty(config: &RangeConfig) -> Mirror {
    Mirror::new(Ranges::new(config))
}

/// Builds the state from all Services. Ownership of a contested address goes to the oldest
/// Service (then by key); upstream's repair loop goes by list order, which would let a newer
/// Service "win" after a restart, so we deliberately order by age. `pending` are assignments
/// written but not yet observed; they are claimed first.
pub fn build(
    config: &RangeConfig,
    services: &[&Service],
    pending: &Pending<ObjectKey, IpAddr>,
) -> Mirror {
    build_with(config, services, pending, None)
}

/// [`build`], with the API server's IPAddress objects when it keeps them ([`ipaddr::active`]):
/// then an address belongs to the Service its IPAddress names (claimed right after `pending`),
/// upstream's IPAddress findings are added (IPAddress ones filed under [`ipaddr::key_of`]),
/// and capacity is counted from the IPAddresses.
pub fn build_with(
    config: &RangeConfig,
    services: &[&Service],
    pending: &Pending<ObjectKey, IpAddr>,
    ips: Option<&IpAddresses<'_>>,
) -> Mirror {
    let ips = ips.filter(|i| ipaddr::active(i));
    // Comparing two watches is only meaningful while both are current.
    let compare = ips.is_some_and(|i| i.current);
    let index = ips.map(|i| ipaddr::Index::new(i, services));
    let ranges = Ranges::new(config);
    let mut claims = pending.clone();
    if let Some(ix) = &index {
        let mut taken: std::collections::HashSet<IpAddr> =
            pending.values().flatten().copied().collect();
        // Only addresses in our ranges: one outside them stays a finding of its Service.
        for (ip, key) in ix.owners() {
            if ranges.locate(ip).is_some() && taken.insert(ip) {
                claims.entry(key).or_default().push(ip);
            }
        }
    }
    // Where the API server keeps IPAddresses its repair loop is repairip.go, whose checks and
    // wording apply whatever the ranges come from; repair.go's only on the bitmap path.
    let repairip = index.is_some();
    let mut m = Mirror::build(ranges, services, &claims, seniority, |m, key, svc| {
        for raw in claimed_ips(svc) {
            let found = observe(m, &raw, key, repairip);
            let found = match (found, &index, raw.parse::<IpAddr>()) {
                (None, Some(ix), Ok(ip)) if compare => ix.check_service(svc, ip),
                (f, _, _) => f,
            };
            if let Some(f) = found {
                m.report(key, f);
            }
        }
        if needs_assignment(svc) {
            m.needs_assign.insert(key.clone());
        }
    });
    // The first usable IP stays reserved for default/kubernetes even before it exists.
    if let Some(ip) = config.kubernetes_service_ip() {
        m.claim(ip, &ObjectKey::new("default", "kubernetes"));
    }
    if let (Some(ips), Some(ix)) = (ips, &index) {
        for o in ips.objects.iter().filter(|_| compare) {
            if let Some(f) = ix.check_ip(o, ips.grace) {
                m.report(&ipaddr::key_of(o), f);
            }
        }
        m.pool.counted = Some(ipaddr::count(&m.pool, ips));
    }
    m
}

/// Marks one observed address as used, or says what is wrong with it; `repairip` words it as
/// repairip.go (also whenever ranges come from ServiceCIDRs), else as repair.go.
fn observe(m: &mut Mirror, raw: &str, key: &ObjectKey, repairip: bool) -> Option<Finding> {
    let repairip = repairip || m.pool.source == RangeSource::ServiceCidrs;
    let Ok(ip) = raw.parse::<IpAddr>() else {
        return Some(Finding::NotValid {
            ip: raw.to_string(),
            service_cidrs: repairip,
        });
    };
    let fam = IpFamily::of(&ip);
    // repair.go reports a family without a range as not valid; repairip.go has no such check
    // and reports the address as out of range below.
    if !repairip && !m.pool.families().contains(&fam) {
        return Some(Finding::FamilyNotConfigured { ip });
    }
    if let Some(holder) = m.holder(&ip) {
        if holder == key {
            return None;
        }
        return Some(Finding::Duplicate {
            ip,
            holder: holder.clone(),
        });
    }
    if m.pool.locate(ip).is_some() {
        m.claim(ip, key);
        return None;
    }
    Some(Finding::OutOfRange {
        ip,
        // repairip.go names no CIDR ("not within any configured Service CIDR").
        cidr: if repairip {
            None
        } else {
            m.pool
                .ranges
                .iter()
                .find(|r| r.alloc.family() == fam)
                .map(|r| r.spec.cidr)
        },
    })
}

/// Whether a Service lacks something a non-allocating API server left empty: a ClusterIP it
/// needs, or ExternalName addresses to drop. Services a stock kube-apiserver stored never do.
pub fn needs_assignment(svc: &Service) -> bool {
    let Some(spec) = svc.spec.as_ref() else {
        return false;
    };
    let ips = spec.cluster_ips.clone().unwrap_or_default();
    let ip = spec.cluster_ip.clone().unwrap_or_default();
    if service_type(svc) == "ExternalName" {
        return !ips.is_empty() || !ip.is_empty();
    }
    if ip == "None" || ips.first().is_some_and(|s| s == "None") {
        // Headless: no address, but the family fields kube-apiserver defaults.
        return spec.ip_families.as_ref().is_none_or(|f| f.is_empty())
            || spec.ip_family_policy.is_none();
    }
    if ip.is_empty() && ips.is_empty() {
        return true;
    }
    // A requested address on an API that does not default the family fields.
    if spec.ip_families.as_ref().is_none_or(|f| f.is_empty()) || spec.ip_family_policy.is_none() {
        return true;
    }
    // A policy changed to RequireDualStack on an API that does not upgrade the Service.
    spec.ip_family_policy.as_deref() == Some("RequireDualStack") && ips.len() < 2
}

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;
