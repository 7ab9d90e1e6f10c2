//! The configured ranges (the flag, or ServiceCIDR objects) and the pool of bitmaps the
//! ClusterIP ledger marks: one per CIDR, most specific first.

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use rand::Rng;
use scm_allocator::{IpError, IpFamily, IpRange, Placement, Pool};

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
    /// A range too large for the bitmap.
    #[error(transparent)]
    TooLarge(#[from] IpError),
}

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
            IpRange::new(*c)?;
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
        IpRange::new_capped(r.cidr).ip_at(0)
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
    /// The allocations in the tracked part.
    pub alloc: IpRange,
    /// Addresses held beyond the tracked part of an oversized ServiceCIDR.
    pub untracked: usize,
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
}

impl Ranges {
    /// Empty ranges as `config` describes them.
    pub fn new(config: &RangeConfig) -> Self {
        let mut ranges: Vec<TrackedRange> = config
            .ranges
            .iter()
            .map(|spec| TrackedRange {
                spec: spec.clone(),
                alloc: match config.source {
                    RangeSource::Flag => {
                        IpRange::new(spec.cidr).unwrap_or_else(|_| IpRange::new_capped(spec.cidr))
                    }
                    RangeSource::ServiceCidrs => IpRange::new_capped(spec.cidr),
                },
                untracked: 0,
            })
            .collect();
        // Longest prefix first, as upstream's MetaAllocator picks the most specific CIDR.
        ranges.sort_by_key(|r| std::cmp::Reverse(r.spec.cidr.prefix_len()));
        Ranges {
            source: config.source,
            default_family: config.default_family,
            ranges,
        }
    }

    /// Index of the range that tracks `ip`, and where it falls in it.
    pub fn locate(&self, ip: IpAddr) -> Option<(usize, Placement)> {
        let mut fallback = None;
        for (i, r) in self.ranges.iter().enumerate() {
            match r.alloc.offset_of(ip) {
                p @ Placement::Offset(_) => return Some((i, p)),
                p @ Placement::Untracked if fallback.is_none() => fallback = Some((i, p)),
                _ => {}
            }
        }
        fallback
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

    /// Per-CIDR (allocated, available) for the capacity gauges; available counts the whole
    /// CIDR, tracked or not (saturating for huge IPv6 CIDRs).
    pub fn capacity(&self) -> Vec<(IpNet, usize, usize)> {
        self.ranges
            .iter()
            .map(|r| {
                let used = r.alloc.used() + r.untracked;
                let free = r.alloc.usable().saturating_sub(used as u128);
                (
                    r.spec.cidr,
                    used,
                    usize::try_from(free).unwrap_or(usize::MAX),
                )
            })
            .collect()
    }
}

/// Addresses in a range's bitmap, or counted as untracked beyond an oversized one; an address
/// outside every range is still recorded as held (by the ledger) but marks nothing.
impl Pool for Ranges {
    type Value = IpAddr;

    fn mark(&mut self, ip: IpAddr) -> bool {
        match self.locate(ip) {
            Some((i, Placement::Offset(_))) => {
                let _ = self.ranges[i].alloc.allocate(ip);
            }
            Some((i, _)) => self.ranges[i].untracked += 1,
            None => {}
        }
        true
    }

    fn unmark(&mut self, ip: IpAddr) {
        match self.locate(ip) {
            Some((i, Placement::Offset(_))) => {
                self.ranges[i].alloc.release(ip);
            }
            Some((i, _)) => self.ranges[i].untracked = self.ranges[i].untracked.saturating_sub(1),
            None => {}
        }
    }
}
