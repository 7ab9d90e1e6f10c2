//! The configured ranges (the flag, or ServiceCIDR objects) and the pool the ClusterIP ledger
//! marks: one sparse range per CIDR (the used addresses, whatever the CIDR's size), most
//! specific first.

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use rand::Rng;
use scm_allocator::{IpFamily, Pool, SparseRange};

use super::Finding;

/// Name of the ServiceCIDR kube-apiserver creates from its own flags.
pub const DEFAULT_SERVICE_CIDR: &str = "kubernetes";

/// Where the ranges came from; it decides the wording of out-of-range findings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangeSource {
    /// `--service-cluster-ip-range`.
    Flag,
    /// ServiceCIDR objects.
    ServiceCidrs,
}

/// One configured CIDR.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RangeSpec {
    /// The ServiceCIDR it belongs to (`None` for the flag).
    pub owner: Option<String>,
    /// The CIDR.
    pub cidr: IpNet,
    /// The ServiceCIDR is being deleted: existing IPs stay valid, no new ones come from it.
    pub terminating: bool,
}

/// Why the ranges could not be built from the flag.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// Neither one nor two CIDRs.
    #[error("--service-cluster-ip-range: expected one or two CIDRs, got {0}")]
    Count(usize),
    /// Two CIDRs of one family.
    #[error(
        "--service-cluster-ip-range[0] and --service-cluster-ip-range[1] must be of different IP family"
    )]
    SameFamily,
    /// An IPv6 range shorter than /64: kube-apiserver v1.37's IPAddress allocator refuses
    /// it (IPv4 has no limit since the bitmap allocator is gone).
    #[error(
        "--service-cluster-ip-range: shortest allowed prefix length for service CIDR is 64, got {0}"
    )]
    Ipv6TooLarge(u8),
}

/// The shortest IPv6 prefix kube-apiserver's IPAddress allocator accepts.
pub const MIN_IPV6_PREFIX: u8 = 64;

/// The configured ranges.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RangeConfig {
    /// Where they came from.
    pub source: RangeSource,
    /// The CIDRs; for the flag, the primary first.
    pub ranges: Vec<RangeSpec>,
    /// The family Services get when they do not ask for one.
    pub default_family: Option<IpFamily>,
}

impl RangeConfig {
    /// Ranges from `--service-cluster-ip-range` (one CIDR, or two of different families).
    pub fn from_flag(cidrs: &[IpNet]) -> Result<Self, ConfigError> {
        if cidrs.is_empty() || cidrs.len() > 2 {
            return Err(ConfigError::Count(cidrs.len()));
        }
        if cidrs.len() == 2 && cidrs[0].max_prefix_len() == cidrs[1].max_prefix_len() {
            return Err(ConfigError::SameFamily);
        }
        for c in cidrs {
            if let IpNet::V6(n) = c
                && n.prefix_len() < MIN_IPV6_PREFIX
            {
                return Err(ConfigError::Ipv6TooLarge(n.prefix_len()));
            }
        }
        Ok(RangeConfig {
            source: RangeSource::Flag,
            ranges: cidrs
                .iter()
                .map(|c| RangeSpec {
                    owner: None,
                    cidr: c.trunc(),
                    terminating: false,
                })
                .collect(),
            default_family: Some(family_of_net(&cidrs[0])),
        })
    }

    /// Ranges from ServiceCIDR objects. The default family is that of the `kubernetes`
    /// ServiceCIDR's first CIDR (kube-apiserver's primary range), else of the oldest object.
    pub fn from_service_cidrs(objs: &[ServiceCIDR]) -> Self {
        let mut sorted: Vec<&ServiceCIDR> = objs.iter().collect();
        sorted.sort_by(|a, b| {
            let ka = (
                a.metadata.name.as_deref() != Some(DEFAULT_SERVICE_CIDR),
                created(a),
            );
            let kb = (
                b.metadata.name.as_deref() != Some(DEFAULT_SERVICE_CIDR),
                created(b),
            );
            ka.cmp(&kb).then(a.metadata.name.cmp(&b.metadata.name))
        });
        let mut ranges = Vec::new();
        for o in sorted {
            let terminating = o.metadata.deletion_timestamp.is_some();
            for c in o
                .spec
                .as_ref()
                .and_then(|s| s.cidrs.as_ref())
                .into_iter()
                .flatten()
            {
                if let Ok(cidr) = c.parse::<IpNet>() {
                    ranges.push(RangeSpec {
                        owner: o.metadata.name.clone(),
                        cidr: cidr.trunc(),
                        terminating,
                    });
                }
            }
        }
        let default_family = ranges.first().map(|r| family_of_net(&r.cidr));
        RangeConfig {
            source: RangeSource::ServiceCidrs,
            ranges,
            default_family,
        }
    }

    /// Families with at least one range.
    pub fn families(&self) -> BTreeSet<IpFamily> {
        self.ranges.iter().map(|r| family_of_net(&r.cidr)).collect()
    }

    /// The first usable address of the primary range: kube-apiserver gives it to
    /// `default/kubernetes`.
    pub fn kubernetes_service_ip(&self) -> Option<IpAddr> {
        let fam = self.default_family?;
        let r = self.ranges.iter().find(|r| family_of_net(&r.cidr) == fam)?;
        SparseRange::new(r.cidr).ip_at(0)
    }
}

fn created(o: &ServiceCIDR) -> Option<k8s_openapi::jiff::Timestamp> {
    o.metadata.creation_timestamp.as_ref().map(|t| t.0)
}

pub(crate) fn family_of_net(n: &IpNet) -> IpFamily {
    match n {
        IpNet::V4(_) => IpFamily::V4,
        IpNet::V6(_) => IpFamily::V6,
    }
}

/// One range with its allocations.
#[derive(Clone, Debug)]
pub struct TrackedRange {
    /// What was configured.
    pub spec: RangeSpec,
    /// Its allocations.
    pub alloc: SparseRange,
}

/// The ClusterIP pool: every configured range with its allocations.
#[derive(Clone, Debug)]
pub struct Ranges {
    /// Where the ranges came from.
    pub source: RangeSource,
    /// Default family for Services that do not ask.
    pub default_family: Option<IpFamily>,
    /// Ranges, most specific first within a family.
    pub ranges: Vec<TrackedRange>,
    /// Per range (same order), the IPAddress objects of the API server's allocator in it, when
    /// the API server keeps its allocations as IPAddresses: the capacity gauges count these.
    pub counted: Option<Vec<usize>>,
}

impl Ranges {
    /// Empty ranges as `config` describes them.
    pub fn new(config: &RangeConfig) -> Self {
        let mut ranges: Vec<TrackedRange> = config
            .ranges
            .iter()
            .map(|spec| TrackedRange {
                spec: spec.clone(),
                alloc: SparseRange::new(spec.cidr),
            })
            .collect();
        // Longest prefix first, as upstream's MetaAllocator picks the most specific CIDR.
        ranges.sort_by_key(|r| std::cmp::Reverse(r.spec.cidr.prefix_len()));
        Ranges {
            source: config.source,
            default_family: config.default_family,
            ranges,
            counted: None,
        }
    }

    /// Index of the most specific range that can hold `ip`.
    pub fn locate(&self, ip: IpAddr) -> Option<usize> {
        self.ranges.iter().position(|r| r.alloc.contains(ip))
    }

    /// Families these ranges can allocate from.
    pub fn families(&self) -> BTreeSet<IpFamily> {
        self.ranges.iter().map(|r| r.alloc.family()).collect()
    }

    /// The CIDR whose bitmap holds `ip`.
    pub fn cidr_of(&self, ip: IpAddr) -> Option<IpNet> {
        self.ranges
            .iter()
            .find(|r| r.alloc.has(ip))
            .map(|r| r.spec.cidr)
    }

    /// Picks a free address of `family` as kube-apiserver would (most specific non-terminating
    /// range first) and marks it.
    pub fn allocate_next<R: Rng + ?Sized>(
        &mut self,
        family: IpFamily,
        rng: &mut R,
    ) -> Result<IpAddr, Finding> {
        for r in &mut self.ranges {
            if r.alloc.family() != family || r.spec.terminating {
                continue;
            }
            if let Ok(ip) = r.alloc.allocate_next(rng) {
                return Ok(ip);
            }
        }
        Err(Finding::Full {
            cidrs: self
                .ranges
                .iter()
                .filter(|r| r.alloc.family() == family)
                .map(|r| r.spec.cidr.to_string())
                .collect::<Vec<_>>()
                .join(","),
            family,
        })
    }

    /// Per-CIDR (allocated, available) for the capacity gauges. Allocated counts the API
    /// server's IPAddress objects in the CIDR where it keeps them ([`Ranges::counted`]), else
    /// the Services' addresses. As kube-apiserver's gauges: available is the CIDR's usable
    /// addresses minus allocated, and a CIDR with more than `i64::MAX` addresses (IPv6 /64 or
    /// wider) has `i64::MAX` minus allocated.
    pub fn capacity(&self) -> Vec<(IpNet, usize, usize)> {
        self.ranges
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let used = match &self.counted {
                    Some(c) => c.get(i).copied().unwrap_or(0),
                    None => r.alloc.used(),
                };
                let size = r.alloc.usable().min(i64::MAX as u128);
                let free = size.saturating_sub(used as u128);
                (
                    r.spec.cidr,
                    used,
                    usize::try_from(free).unwrap_or(usize::MAX),
                )
            })
            .collect()
    }
}

/// Addresses in the most specific range that holds them; an address outside every range is
/// still recorded as held (by the ledger) but marks nothing.
impl Pool for Ranges {
    type Value = IpAddr;

    fn mark(&mut self, ip: IpAddr) -> bool {
        if let Some(i) = self.locate(ip) {
            let _ = self.ranges[i].alloc.allocate(ip);
        }
        true
    }

    fn unmark(&mut self, ip: IpAddr) {
        if let Some(i) = self.locate(ip) {
            self.ranges[i].alloc.release(ip);
        }
    }
}
