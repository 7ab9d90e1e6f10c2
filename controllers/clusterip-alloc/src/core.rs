//! The pure ClusterIP core: configured ranges and all Services in, the mirrored allocation
//! state, repair findings and per-Service assign plans out. No I/O here.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use rand::Rng;
use scm_allocator::{IpError, IpFamily, IpRange, Placement};
use scm_runtime::ObjectKey;

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

fn family_of_net(n: &IpNet) -> IpFamily {
    match n {
        IpNet::V4(_) => IpFamily::V4,
        IpNet::V6(_) => IpFamily::V6,
    }
}

/// A problem upstream's ClusterIP repair loop reports, as an Event on the Service.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Finding {
    /// Not an IP address.
    NotValid {
        /// The value as written.
        ip: String,
    },
    /// An address of a family no range is configured for.
    FamilyNotConfigured {
        /// The address.
        ip: IpAddr,
    },
    /// Outside every configured range.
    OutOfRange {
        /// The address.
        ip: IpAddr,
        /// The flag's CIDR of that family (`None` when ranges come from ServiceCIDRs).
        cidr: Option<IpNet>,
    },
    /// Already held by an older Service.
    Duplicate {
        /// The address.
        ip: IpAddr,
        /// Who holds it.
        holder: ObjectKey,
    },
    /// No address left for a Service that needs one.
    Full {
        /// The family's CIDRs.
        cidrs: String,
        /// The family.
        family: IpFamily,
    },
}

impl Finding {
    /// Event reason, as upstream.
    pub fn reason(&self) -> &'static str {
        match self {
            Finding::NotValid { .. } | Finding::FamilyNotConfigured { .. } => "ClusterIPNotValid",
            Finding::OutOfRange { .. } => "ClusterIPOutOfRange",
            Finding::Duplicate { .. } => "ClusterIPAlreadyAllocated",
            Finding::Full { .. } => "ServiceCIDRFull",
        }
    }

    /// Event action, as upstream.
    pub fn action(&self) -> &'static str {
        match self {
            Finding::NotValid { .. } | Finding::FamilyNotConfigured { .. } => "ClusterIPValidation",
            _ => "ClusterIPAllocation",
        }
    }

    /// The `type` label of `apiserver_clusterip_repair_ip_errors_total`.
    pub fn metric_type(&self) -> &'static str {
        match self {
            Finding::NotValid { .. } | Finding::FamilyNotConfigured { .. } => "invalid",
            Finding::OutOfRange { .. } => "outOfRange",
            Finding::Duplicate { .. } => "duplicate",
            Finding::Full { .. } => "full",
        }
    }

    /// Event note, worded as upstream's repair loops (repair.go for the flag, repairip.go for
    /// ServiceCIDRs). Upstream prints `<nil>` for an unparsable IP; we print what was written.
    pub fn message(&self) -> String {
        match self {
            Finding::NotValid { ip } => {
                format!("Cluster IP {ip} is not a valid IP; please recreate service")
            }
            Finding::FamilyNotConfigured { ip } => format!(
                "Cluster IP {ip}({}) is of ip family that is no longer configured on cluster; please recreate service",
                IpFamily::of(ip)
            ),
            Finding::OutOfRange { ip, cidr: Some(c) } => format!(
                "Cluster IP [{}]:{ip} is not within the service CIDR {c}; please recreate service",
                IpFamily::of(ip)
            ),
            Finding::OutOfRange { ip, cidr: None } => format!(
                "Cluster IP [{}]: {ip} is not within any configured Service CIDR; please recreate service",
                IpFamily::of(ip)
            ),
            Finding::Duplicate { ip, .. } => format!(
                "Cluster IP [{}]:{ip} was assigned to multiple services; please recreate service",
                IpFamily::of(ip)
            ),
            Finding::Full { cidrs, family } => format!(
                "Service CIDR {cidrs} is full; you must widen the CIDR in order to create new services for Cluster IP [{family}]:"
            ),
        }
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

/// The allocation state mirrored from all Services, with what is wrong with them.
#[derive(Clone, Debug)]
pub struct Mirror {
    /// Where the ranges came from.
    pub source: RangeSource,
    /// Default family for Services that do not ask.
    pub default_family: Option<IpFamily>,
    /// Ranges, most specific first within a family.
    pub ranges: Vec<TrackedRange>,
    /// Who holds each address.
    pub owners: HashMap<IpAddr, ObjectKey>,
    /// Findings per Service.
    pub findings: BTreeMap<ObjectKey, Vec<Finding>>,
    /// Services that need an assignment (or a type-change cleanup).
    pub needs_assign: BTreeSet<ObjectKey>,
}

/// Service `type`, defaulted to ClusterIP as the API server defaults it.
pub fn service_type(svc: &Service) -> &str {
    svc.spec
        .as_ref()
        .and_then(|s| s.type_.as_deref())
        .unwrap_or("ClusterIP")
}

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

impl Mirror {
    /// An empty state over `config`'s ranges.
    pub fn empty(config: &RangeConfig) -> Self {
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
        Mirror {
            source: config.source,
            default_family: config.default_family,
            ranges,
            owners: HashMap::new(),
            findings: BTreeMap::new(),
            needs_assign: BTreeSet::new(),
        }
    }

    /// Builds the state from all Services. Ownership of a contested address goes to the
    /// oldest Service (then by key); upstream's repair loop goes by list order, which would
    /// let a newer Service "win" after a restart, so we deliberately order by age.
    /// `pending` are assignments written but not yet observed; they are claimed first.
    pub fn build(
        config: &RangeConfig,
        services: &[&Service],
        pending: &BTreeMap<ObjectKey, Vec<IpAddr>>,
    ) -> Self {
        let mut m = Mirror::empty(config);
        let mut sorted: Vec<&Service> = services.to_vec();
        sorted.sort_by_cached_key(|s| {
            (
                s.metadata.creation_timestamp.as_ref().map(|t| t.0),
                ObjectKey::of(*s),
            )
        });
        for (key, ips) in pending {
            for ip in ips {
                m.claim(*ip, key);
            }
        }
        let kube_ip = config.kubernetes_service_ip();
        let kube_key = ObjectKey::new("default", "kubernetes");
        for svc in sorted {
            let key = ObjectKey::of(svc);
            for raw in claimed_ips(svc) {
                if let Some(f) = m.observe(&raw, &key) {
                    m.findings.entry(key.clone()).or_default().push(f);
                }
            }
            if needs_assignment(svc) {
                m.needs_assign.insert(key);
            }
        }
        // The first usable IP stays reserved for default/kubernetes even before it exists.
        if let Some(ip) = kube_ip
            && !m.owners.contains_key(&ip)
        {
            m.claim(ip, &kube_key);
        }
        m
    }

    /// Index of the range that tracks `ip`, and where it falls in it.
    fn locate(&self, ip: IpAddr) -> Option<(usize, Placement)> {
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

    /// Records `key` as the holder of `ip` (no checks beyond the bitmap).
    fn claim(&mut self, ip: IpAddr, key: &ObjectKey) {
        if self.owners.contains_key(&ip) {
            return;
        }
        match self.locate(ip) {
            Some((i, Placement::Offset(_))) => {
                let _ = self.ranges[i].alloc.allocate(ip);
            }
            Some((i, _)) => self.ranges[i].untracked += 1,
            None => {}
        }
        self.owners.insert(ip, key.clone());
    }

    /// Marks one observed address as used, or says what is wrong with it.
    fn observe(&mut self, raw: &str, key: &ObjectKey) -> Option<Finding> {
        let Ok(ip) = raw.parse::<IpAddr>() else {
            return Some(Finding::NotValid {
                ip: raw.to_string(),
            });
        };
        let fam = IpFamily::of(&ip);
        // repair.go (flag ranges) reports a family without a range as not valid; repairip.go
        // (ServiceCIDRs) has no such check and reports the address as out of range below.
        if self.source == RangeSource::Flag && !self.ranges.iter().any(|r| r.alloc.family() == fam)
        {
            return Some(Finding::FamilyNotConfigured { ip });
        }
        if let Some(holder) = self.owners.get(&ip) {
            if holder == key {
                return None;
            }
            return Some(Finding::Duplicate {
                ip,
                holder: holder.clone(),
            });
        }
        match self.locate(ip) {
            Some(_) => {
                self.claim(ip, key);
                None
            }
            None => Some(Finding::OutOfRange {
                ip,
                cidr: match self.source {
                    RangeSource::Flag => self
                        .ranges
                        .iter()
                        .find(|r| r.alloc.family() == fam)
                        .map(|r| r.spec.cidr),
                    RangeSource::ServiceCidrs => None,
                },
            }),
        }
    }

    /// Families this state can allocate from.
    pub fn families(&self) -> BTreeSet<IpFamily> {
        self.ranges.iter().map(|r| r.alloc.family()).collect()
    }

    /// Picks a free address of `family` as kube-apiserver would (most specific non-terminating
    /// range first) and records `key` as its holder.
    pub fn allocate_next<R: Rng + ?Sized>(
        &mut self,
        family: IpFamily,
        key: &ObjectKey,
        rng: &mut R,
    ) -> Result<IpAddr, Finding> {
        for i in 0..self.ranges.len() {
            let r = &mut self.ranges[i];
            if r.alloc.family() != family || r.spec.terminating {
                continue;
            }
            if let Ok(ip) = r.alloc.allocate_next(rng) {
                self.owners.insert(ip, key.clone());
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

    /// Frees `ip` if `key` holds it.
    pub fn release(&mut self, ip: IpAddr, key: &ObjectKey) {
        if self.owners.get(&ip) == Some(key) {
            self.owners.remove(&ip);
            match self.locate(ip) {
                Some((i, Placement::Offset(_))) => {
                    self.ranges[i].alloc.release(ip);
                }
                Some((i, _)) => {
                    self.ranges[i].untracked = self.ranges[i].untracked.saturating_sub(1)
                }
                None => {}
            }
        }
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

/// What to write to a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Nothing to do.
    Nothing,
    /// Set these fields (the whole ClusterIP-related set, as kube-apiserver would store it).
    Assign {
        /// `spec.clusterIPs` (and `spec.clusterIP` = first).
        cluster_ips: Vec<String>,
        /// `spec.ipFamilies`.
        ip_families: Vec<String>,
        /// `spec.ipFamilyPolicy`.
        ip_family_policy: String,
    },
    /// An ExternalName Service still carrying ClusterIP fields: drop them (what upstream's
    /// strategy does on a type change to ExternalName).
    Clear,
    /// The Service cannot be served as it is.
    Reject(Rejection),
}

/// Why a Service cannot get its ClusterIPs; worded as kube-apiserver's validation errors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// `Service "name" is invalid: field: Invalid value: ...: detail`, or the internal error.
    pub message: String,
    /// The range is full (an Event `ServiceCIDRFull` rather than an invalid Service).
    pub full: Option<Finding>,
}

impl Rejection {
    /// Event reason: ServiceCIDRFull, or ours for an invalid Service (upstream returns these
    /// to the client instead of recording them).
    pub fn reason(&self) -> &'static str {
        match &self.full {
            Some(f) => f.reason(),
            None => "ClusterIPAllocationFailed",
        }
    }
}

fn invalid(name: &str, errs: &[(String, String, String)]) -> Rejection {
    let parts: Vec<String> = errs
        .iter()
        .map(|(path, value, detail)| format!("{path}: Invalid value: {value}: {detail}"))
        .collect();
    let body = if parts.len() == 1 {
        parts[0].clone()
    } else {
        format!("[{}]", parts.join(", "))
    };
    Rejection {
        message: format!("Service \"{name}\" is invalid: {body}"),
        full: None,
    }
}

fn quoted(s: &str) -> String {
    format!("\"{s}\"")
}

fn quoted_list(v: &[String]) -> String {
    format!(
        "[]string{{{}}}",
        v.iter().map(|s| quoted(s)).collect::<Vec<_>>().join(", ")
    )
}

/// Decides the ClusterIP fields for a Service that needs them, following kube-apiserver's
/// create path (`initIPFamilyFields` then `allocClusterIPs`), and allocates in `mirror`.
pub fn plan<R: Rng + ?Sized>(mirror: &mut Mirror, svc: &Service, rng: &mut R) -> Plan {
    if !needs_assignment(svc) {
        return Plan::Nothing;
    }
    let Some(spec) = svc.spec.as_ref() else {
        return Plan::Nothing;
    };
    if service_type(svc) == "ExternalName" {
        return Plan::Clear;
    }
    let key = ObjectKey::of(svc);
    let name = svc.metadata.name.clone().unwrap_or_default();
    let configured = mirror.families();
    let mut cluster_ips: Vec<String> = spec
        .cluster_ips
        .clone()
        .filter(|v| !v.is_empty())
        .or_else(|| {
            spec.cluster_ip
                .clone()
                .filter(|s| !s.is_empty())
                .map(|s| vec![s])
        })
        .unwrap_or_default();
    let selectorless = spec.selector.as_ref().is_none_or(|s| s.is_empty());
    let headless = cluster_ips.first().is_some_and(|s| s == "None");
    let policy = match spec.ip_family_policy.clone() {
        Some(p) => p,
        None if headless && selectorless => "RequireDualStack".into(),
        None => "SingleStack".into(),
    };
    let mut families: Vec<IpFamily> = Vec::new();
    let mut errs: Vec<(String, String, String)> = Vec::new();
    for (i, f) in spec.ip_families.iter().flatten().enumerate() {
        match IpFamily::from_k8s(f) {
            Some(fam) => families.push(fam),
            None => errs.push((
                format!("spec.ipFamilies[{i}]"),
                quoted(f),
                "must be 'IPv4' or 'IPv6'".into(),
            )),
        }
    }
    if policy == "SingleStack" {
        if cluster_ips.len() == 2 {
            errs.push((
                "spec.ipFamilyPolicy".into(),
                quoted(&policy),
                "must be 'RequireDualStack' or 'PreferDualStack' when multiple cluster IPs are specified".into(),
            ));
        }
        if families.len() == 2 {
            errs.push((
                "spec.ipFamilyPolicy".into(),
                quoted(&policy),
                "must be 'RequireDualStack' or 'PreferDualStack' when multiple IP families are specified".into(),
            ));
        }
    }
    for (i, raw) in cluster_ips.iter().enumerate() {
        if raw == "None" {
            break;
        }
        let Ok(ip) = raw.parse::<IpAddr>() else {
            errs.push((
                format!("spec.clusterIPs[{i}]"),
                quoted(raw),
                "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)".into(),
            ));
            continue;
        };
        let fam = IpFamily::of(&ip);
        if i >= families.len() {
            if configured.contains(&fam) {
                families.push(fam);
            } else {
                errs.push((
                    format!("spec.clusterIPs[{i}]"),
                    quoted_list(&cluster_ips),
                    format!("{fam} is not configured on this cluster"),
                ));
            }
        }
    }
    if !errs.is_empty() {
        return Plan::Reject(invalid(&name, &errs));
    }
    if headless && selectorless {
        // Upstream's headless-selectorless special case: any families are allowed, even ones the cluster
        // lacks, and non-SingleStack policies get the other family appended.
        if families.is_empty() {
            families.extend(mirror.default_family);
        }
        if families.len() == 1 && policy != "SingleStack" {
            families.push(match families[0] {
                IpFamily::V4 => IpFamily::V6,
                IpFamily::V6 => IpFamily::V4,
            });
        }
        return Plan::Assign {
            cluster_ips: vec!["None".into()],
            ip_families: families.iter().map(|f| f.as_k8s().to_string()).collect(),
            ip_family_policy: policy,
        };
    }
    if policy == "RequireDualStack" && configured.len() < 2 {
        errs.push((
            "spec.ipFamilyPolicy".into(),
            quoted(&policy),
            "this cluster is not configured for dual-stack services".into(),
        ));
    }
    for (i, fam) in families.iter().enumerate() {
        if !configured.contains(fam) {
            errs.push((
                format!("spec.ipFamilies[{i}]"),
                quoted(fam.as_k8s()),
                "not configured on this cluster".into(),
            ));
        }
    }
    if !errs.is_empty() {
        return Plan::Reject(invalid(&name, &errs));
    }
    if families.is_empty() {
        match mirror.default_family {
            Some(f) => families.push(f),
            None => {
                return Plan::Reject(Rejection {
                    message: format!(
                        "Internal error occurred: failed to allocate a serviceIP for Service \"{name}\": no Service CIDR is configured"
                    ),
                    full: None,
                });
            }
        }
    }
    if policy != "SingleStack" && families.len() == 1 && configured.len() == 2 {
        let other = match families[0] {
            IpFamily::V4 => IpFamily::V6,
            IpFamily::V6 => IpFamily::V4,
        };
        families.push(other);
    }
    if headless {
        return Plan::Assign {
            cluster_ips,
            ip_families: families.iter().map(|f| f.as_k8s().to_string()).collect(),
            ip_family_policy: policy,
        };
    }
    // Requested addresses: the mirror claimed each for its oldest requester; anyone else is
    // refused as kube-apiserver refuses the create.
    for raw in &cluster_ips {
        let Ok(ip) = raw.parse::<IpAddr>() else {
            continue;
        };
        let problem = match mirror.owners.get(&ip) {
            Some(holder) if *holder == key => None,
            Some(_) => Some(IpError::Allocated.to_string()),
            None => Some(
                IpError::NotInRange {
                    ip,
                    range: mirror
                        .ranges
                        .iter()
                        .find(|r| r.alloc.family() == IpFamily::of(&ip))
                        .map(|r| r.spec.cidr)
                        .unwrap_or_else(|| IpNet::from(ip)),
                }
                .to_string(),
            ),
        };
        if let Some(p) = problem {
            return Plan::Reject(invalid(
                &name,
                &[(
                    "spec.clusterIPs".into(),
                    quoted_list(&cluster_ips),
                    format!("failed to allocate IP {raw}: {p}"),
                )],
            ));
        }
    }
    // Allocate what is missing, in ipFamilies order.
    let mut allocated = Vec::new();
    for (i, fam) in families.iter().enumerate() {
        if i < cluster_ips.len() {
            continue;
        }
        // An address already held for this Service (the default/kubernetes reservation, or
        // an earlier attempt whose write is not observed yet) is reused, not leaked.
        let held = mirror
            .owners
            .iter()
            .filter(|(ip, k)| **k == key && IpFamily::of(ip) == *fam)
            .map(|(ip, _)| *ip)
            .filter(|ip| {
                !cluster_ips
                    .iter()
                    .any(|c| c.parse::<IpAddr>().ok() == Some(*ip))
            })
            .min();
        if let Some(ip) = held {
            cluster_ips.push(ip.to_string());
            continue;
        }
        match mirror.allocate_next(*fam, &key, rng) {
            Ok(ip) => {
                allocated.push(ip);
                cluster_ips.push(ip.to_string());
            }
            Err(full) => {
                for ip in allocated {
                    mirror.release(ip, &key);
                }
                return Plan::Reject(Rejection {
                    message: format!(
                        "Internal error occurred: failed to allocate a serviceIP for Service \"{name}\": range is full"
                    ),
                    full: Some(full),
                });
            }
        }
    }
    Plan::Assign {
        cluster_ips,
        ip_families: families.iter().map(|f| f.as_k8s().to_string()).collect(),
        ip_family_policy: policy,
    }
}

/// The addresses an Assign plan newly allocated (those not already on the Service).
pub fn new_ips(svc: &Service, plan: &Plan) -> Vec<IpAddr> {
    let Plan::Assign { cluster_ips, .. } = plan else {
        return vec![];
    };
    let had: BTreeSet<String> = claimed_ips(svc).into_iter().collect();
    cluster_ips
        .iter()
        .filter(|s| !had.contains(*s))
        .filter_map(|s| s.parse().ok())
        .collect()
}

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;
