//! The local pools' pure core: pool definitions compiled into address ranges ([`compile`]),
//! a Service's addresses decided from the pools, what is held and what is blocked
//! ([`assign`]), and each pool's status ([`pool_status`]). No I/O, no clock, no locks: the
//! provider (`local.rs`) and the pool watcher (`local/watch.rs`) execute what these return.
//!
//! The guarantees live here: an address a Service holds is kept for as long as it asks for
//! nothing else, whatever happens to the pools; an address published by anyone else or pinned
//! by another Service is never handed out automatically.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use scm_allocator::IpFamily;

use super::share::{self, Share};

/// One pool as the cluster (or the deprecated `--cloud-config` file) defines it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PoolDef {
    /// The object's name (`--cloud-config` pools: `cloud-config/<n>`).
    pub name: String,
    /// `spec.cidrs`, unparsed.
    pub cidrs: Vec<String>,
    /// `spec.serviceSelector`.
    pub service_selector: Option<LabelSelector>,
    /// `spec.namespaceSelector`.
    pub namespace_selector: Option<LabelSelector>,
    /// `spec.avoidBuggyIPs`.
    pub avoid_buggy_ips: bool,
    /// `spec.disabled`.
    pub disabled: bool,
}

/// An inclusive address range of one family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Range {
    /// First address.
    pub first: IpAddr,
    /// Last address (same family, not below `first`).
    pub last: IpAddr,
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u32::from(a) as u128,
        IpAddr::V6(a) => u128::from(a),
    }
}

fn from_u128(v: u128, like: IpAddr) -> IpAddr {
    match like {
        IpAddr::V4(_) => IpAddr::V4((v as u32).into()),
        IpAddr::V6(_) => IpAddr::V6(v.into()),
    }
}

fn buggy(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V4(a) if matches!(a.octets()[3], 0 | 255))
}

impl Range {
    /// Parses a CIDR (network and IPv4 broadcast addresses left out, as routers treat them
    /// specially; /31, /32, /127 and /128 keep every address) or an inclusive `a-b` range.
    pub fn parse(s: &str) -> Result<Range, String> {
        let s = s.trim();
        if let Some((a, b)) = s.split_once('-') {
            let first: IpAddr = a
                .trim()
                .parse()
                .map_err(|_| format!("{s:?}: {a:?} is not an IP"))?;
            let last: IpAddr = b
                .trim()
                .parse()
                .map_err(|_| format!("{s:?}: {b:?} is not an IP"))?;
            if first.is_ipv4() != last.is_ipv4() {
                return Err(format!("{s:?}: the two ends are of different families"));
            }
            if to_u128(first) > to_u128(last) {
                return Err(format!("{s:?}: the first address is above the last"));
            }
            return Ok(Range { first, last });
        }
        let net: ipnet::IpNet = s
            .parse()
            .map_err(|_| format!("{s:?} is neither a CIDR nor an a-b range"))?;
        if net.network() != net.addr() {
            return Err(format!(
                "{s:?} has host bits set (did you mean {}?)",
                net.trunc()
            ));
        }
        let (lo, hi) = (to_u128(net.network()), to_u128(net.broadcast()));
        let host_bits = net.max_prefix_len() - net.prefix_len();
        let (first, last) = match net {
            _ if host_bits <= 1 => (lo, hi),
            ipnet::IpNet::V4(_) => (lo + 1, hi - 1),
            // IPv6 has no broadcast; the subnet-router anycast address (all zeros) is skipped.
            ipnet::IpNet::V6(_) => (lo + 1, hi),
        };
        Ok(Range {
            first: from_u128(first, net.addr()),
            last: from_u128(last, net.addr()),
        })
    }

    /// The range's family.
    pub fn family(&self) -> IpFamily {
        IpFamily::of(&self.first)
    }

    /// Whether `ip` is in the range.
    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.first.is_ipv4()
            && (to_u128(self.first)..=to_u128(self.last)).contains(&to_u128(ip))
    }

    fn overlaps(&self, o: &Range) -> bool {
        self.first.is_ipv4() == o.first.is_ipv4()
            && to_u128(self.first) <= to_u128(o.last)
            && to_u128(o.first) <= to_u128(self.last)
    }

    fn size(&self) -> u128 {
        (to_u128(self.last) - to_u128(self.first)).saturating_add(1)
    }

    /// IPv4 addresses ending in .0 or .255 in the range.
    fn buggy_count(&self) -> u128 {
        if !self.first.is_ipv4() {
            return 0;
        }
        // Addresses in [0, n] ending in .0, plus those ending in .255.
        let upto = |n: u128| n / 256 + 1 + (n + 1) / 256;
        let (a, b) = (to_u128(self.first), to_u128(self.last));
        upto(b) - if a == 0 { 0 } else { upto(a - 1) }
    }
}

/// A pool compiled from its definition.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Pool {
    /// The definition.
    pub def: PoolDef,
    /// Its valid ranges.
    pub ranges: Vec<Range>,
    /// Invalid entries of `spec.cidrs` and selectors: the pool serves nothing while any exist.
    pub invalid: Vec<String>,
    /// Earlier pools it overlaps: it serves nothing while it does (an address has one pool).
    pub overlaps: Vec<String>,
}

impl Pool {
    /// Whether new addresses may come from this pool.
    pub fn serves(&self) -> bool {
        self.invalid.is_empty() && self.overlaps.is_empty() && !self.def.disabled
    }

    /// Whether `ip` is in one of its ranges.
    pub fn covers(&self, ip: IpAddr) -> bool {
        self.ranges.iter().any(|r| r.contains(ip))
    }

    /// Whether a Service with these labels in a namespace with these labels may draw from it.
    /// (A namespace whose labels are unknown matches no namespace selector.)
    pub fn admits(
        &self,
        svc: &BTreeMap<String, String>,
        ns: Option<&BTreeMap<String, String>>,
    ) -> bool {
        let ok = |sel: &Option<LabelSelector>, labels: Option<&BTreeMap<String, String>>| match sel
        {
            None => true,
            Some(sel) => labels.is_some_and(|l| selector_matches(sel, l) == Ok(true)),
        };
        ok(&self.def.service_selector, Some(svc)) && ok(&self.def.namespace_selector, ns)
    }
}

/// Whether `labels` match `sel` (an empty selector matches everything), or why `sel` is invalid.
pub fn selector_matches(
    sel: &LabelSelector,
    labels: &BTreeMap<String, String>,
) -> Result<bool, String> {
    let mut ok = sel
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    for e in sel.match_expressions.iter().flatten() {
        let values = e.values.clone().unwrap_or_default();
        let has = labels.get(&e.key);
        let m = match e.operator.as_str() {
            "In" if !values.is_empty() => has.is_some_and(|v| values.contains(v)),
            "NotIn" if !values.is_empty() => !has.is_some_and(|v| values.contains(v)),
            "Exists" if values.is_empty() => has.is_some(),
            "DoesNotExist" if values.is_empty() => has.is_none(),
            op => {
                return Err(format!(
                    "selector expression on {:?}: invalid operator {op:?} or values",
                    e.key
                ));
            }
        };
        ok &= m;
    }
    Ok(ok)
}

/// Compiles pool definitions, earlier first (the caller orders them: the file's pools, then
/// objects by creation). A pool that overlaps an earlier valid one serves nothing.
pub fn compile(defs: &[PoolDef]) -> Vec<Pool> {
    let mut out: Vec<Pool> = Vec::with_capacity(defs.len());
    for def in defs {
        let mut p = Pool {
            def: def.clone(),
            ..Pool::default()
        };
        for c in &def.cidrs {
            match Range::parse(c) {
                Ok(r) => p.ranges.push(r),
                Err(e) => p.invalid.push(e),
            }
        }
        if def.cidrs.is_empty() {
            p.invalid.push("spec.cidrs is empty".into());
        }
        for (what, sel) in [
            ("serviceSelector", &def.service_selector),
            ("namespaceSelector", &def.namespace_selector),
        ] {
            if let Some(Err(e)) = sel.as_ref().map(|s| selector_matches(s, &BTreeMap::new())) {
                p.invalid.push(format!("{what}: {e}"));
            }
        }
        // Overlaps within the pool itself are harmless; across pools they are not.
        for earlier in out
            .iter()
            .filter(|e| e.invalid.is_empty() && e.overlaps.is_empty())
        {
            if p.ranges
                .iter()
                .any(|r| earlier.ranges.iter().any(|o| r.overlaps(o)))
            {
                p.overlaps.push(earlier.def.name.clone());
            }
        }
        p.ranges.sort();
        out.push(p);
    }
    out
}

/// Who holds an address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    /// The Service's UID.
    pub uid: String,
    /// `namespace/name`, for messages.
    pub who: String,
    /// The pool it came from (the covering pool when it was taken), if any.
    pub origin: Option<String>,
    /// Its sharing terms, if it allows sharing.
    pub share: Option<Share>,
}

/// What our Services hold.
#[derive(Clone, Debug, Default)]
pub struct Book {
    /// Address → its holders, first taker first (more than one only when shared).
    pub held: BTreeMap<IpAddr, Vec<Holder>>,
    /// Service UID → its addresses.
    pub by_service: HashMap<String, Vec<IpAddr>>,
}

impl Book {
    /// Records `ip` for the Service (from `pool`), not shared.
    pub fn take(&mut self, ip: IpAddr, uid: &str, who: &str, pool: Option<String>) {
        self.take_shared(ip, uid, who, pool, None);
    }

    /// Records `ip` for the Service (from `pool`) with its sharing terms, beside whoever
    /// holds it already (the caller checked they may share).
    pub fn take_shared(
        &mut self,
        ip: IpAddr,
        uid: &str,
        who: &str,
        pool: Option<String>,
        share: Option<Share>,
    ) {
        let h = Holder {
            uid: uid.into(),
            who: who.into(),
            origin: pool,
            share,
        };
        let hs = self.held.entry(ip).or_default();
        match hs.iter_mut().find(|o| o.uid == uid) {
            Some(o) => *o = h,
            None => hs.push(h),
        }
        let v = self.by_service.entry(uid.into()).or_default();
        if !v.contains(&ip) {
            v.push(ip);
        }
    }

    /// Whoever holds `ip` (empty: nobody).
    pub fn holders(&self, ip: IpAddr) -> &[Holder] {
        self.held.get(&ip).map(Vec::as_slice).unwrap_or_default()
    }

    /// Whether a Service other than `uid` holds `ip`.
    pub fn held_by_other(&self, ip: IpAddr, uid: &str) -> bool {
        self.holders(ip).iter().any(|h| h.uid != uid)
    }

    /// Records the Service's current sharing terms on every address it holds.
    pub fn set_share(&mut self, uid: &str, share: Option<&Share>) {
        for ip in self.by_service.get(uid).into_iter().flatten() {
            for h in self.held.get_mut(ip).into_iter().flatten() {
                if h.uid == uid {
                    h.share = share.cloned();
                }
            }
        }
    }

    /// Forgets the Service's addresses, returning them (an address stays held while another
    /// Service shares it).
    pub fn release_all(&mut self, uid: &str) -> Vec<IpAddr> {
        let ips = self.by_service.remove(uid).unwrap_or_default();
        for ip in &ips {
            self.drop_holder(*ip, uid);
        }
        ips
    }

    fn drop_holder(&mut self, ip: IpAddr, uid: &str) {
        if let Some(hs) = self.held.get_mut(&ip) {
            hs.retain(|h| h.uid != uid);
            if hs.is_empty() {
                self.held.remove(&ip);
            }
        }
    }

    /// Forgets one of the Service's addresses.
    pub fn release(&mut self, uid: &str, ip: IpAddr) {
        self.drop_holder(ip, uid);
        if let Some(v) = self.by_service.get_mut(uid) {
            v.retain(|i| *i != ip);
            if v.is_empty() {
                self.by_service.remove(uid);
            }
        }
    }
}

/// The Service asking for addresses, as the core needs it.
#[derive(Clone, Debug, Default)]
pub struct Candidate {
    /// UID.
    pub uid: String,
    /// `namespace/name`.
    pub who: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its namespace's labels, if known.
    pub ns_labels: Option<BTreeMap<String, String>>,
    /// `spec.ipFamilies` (IPv4 when empty).
    pub families: Vec<IpFamily>,
    /// Pinned addresses (`spec.loadBalancerIP` or the annotation), at most one per family.
    pub requested: Vec<IpAddr>,
    /// What its status publishes (preferred when free: state lost, the address is not).
    pub published: Vec<IpAddr>,
    /// Its sharing terms, if it allows sharing.
    pub share: Option<Share>,
}

/// Why a Service gets no (or not all its) addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// A pinned address outside every pool (or in one that serves nothing): fix the Service.
    Outside(IpAddr),
    /// A pinned address in a pool whose selectors do not admit the Service.
    NotAdmitted(IpAddr, String),
    /// A pinned address someone else holds or publishes: retried when it is released.
    Held(IpAddr, String),
    /// A pinned address held by Services it may not share with (why): retried on release.
    Unshareable(IpAddr, String),
    /// No free address of the family in the pools the Service may use.
    Exhausted(IpFamily),
    /// No pool the Service may use serves any of its families.
    NoPool(Vec<IpFamily>),
    /// A pinned address of a family the Service does not have.
    WrongFamily(IpAddr),
}

/// What [`assign`] decided: the addresses the Service ends up with, in family order, and each
/// new one's pool.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Assignment {
    /// Every address the Service holds afterwards.
    pub addresses: Vec<IpAddr>,
    /// Newly taken, with their pool.
    pub taken: Vec<(IpAddr, String)>,
    /// Held before, released now (a pin moved, a family removed).
    pub released: Vec<IpAddr>,
}

/// Decides a Service's addresses. `blocked` are addresses others publish or pin (address →
/// who), never given out automatically and refused to pins. Held addresses stay unless the
/// Service pins another of that family or drops the family: no pool change moves them.
pub fn assign(
    pools: &[Pool],
    book: &Book,
    blocked: &BTreeMap<IpAddr, String>,
    c: &Candidate,
) -> Result<Assignment, Refusal> {
    for r in &c.requested {
        if !c.families.contains(&IpFamily::of(r)) {
            return Err(Refusal::WrongFamily(*r));
        }
    }
    let have = book.by_service.get(&c.uid).cloned().unwrap_or_default();
    let mut a = Assignment::default();
    let free = |ip: IpAddr, taken: &[(IpAddr, String)]| {
        !book.held_by_other(ip, &c.uid)
            && !blocked.contains_key(&ip)
            && !taken.iter().any(|(t, _)| *t == ip)
    };
    // Held by others who may share it with this Service.
    let joinable = |ip: IpAddr| {
        c.share.is_some()
            && book.held_by_other(ip, &c.uid)
            && !blocked.contains_key(&ip)
            && share::check(ip, book.holders(ip), &c.uid, c.share.as_ref()).is_ok()
    };
    let usable = |p: &&Pool| p.serves() && p.admits(&c.labels, c.ns_labels.as_ref());
    for fam in &c.families {
        let cur = have.iter().copied().find(|h| IpFamily::of(h) == *fam);
        let req = c
            .requested
            .iter()
            .copied()
            .find(|r| IpFamily::of(r) == *fam);
        match (req, cur) {
            (Some(r), Some(h)) if r == h => a.addresses.push(h),
            (Some(r), _) => {
                let Some(pool) = pools.iter().filter(|p| p.serves()).find(|p| p.covers(r)) else {
                    return Err(Refusal::Outside(r));
                };
                if !usable(&pool) {
                    return Err(Refusal::NotAdmitted(r, pool.def.name.clone()));
                }
                share::check(r, book.holders(r), &c.uid, c.share.as_ref())?;
                if let Some(who) = blocked.get(&r) {
                    return Err(Refusal::Held(r, who.clone()));
                }
                a.taken.push((r, pool.def.name.clone()));
                a.addresses.push(r);
            }
            // Held and not asked to move: kept, whatever the pools say now.
            (None, Some(h)) => a.addresses.push(h),
            (None, None) => {
                let mut eligible = pools
                    .iter()
                    .filter(usable)
                    .filter(|p| p.ranges.iter().any(|r| r.family() == *fam))
                    .peekable();
                if eligible.peek().is_none() {
                    continue;
                }
                let mut chosen = None;
                // What it published before (state lost, the address was not) comes first.
                for p in c.published.iter().filter(|p| IpFamily::of(p) == *fam) {
                    if let Some(pool) = pools.iter().filter(usable).find(|q| q.covers(*p))
                        && (free(*p, &a.taken) || joinable(*p))
                    {
                        chosen = Some((*p, pool.def.name.clone()));
                    }
                }
                // A Service that allows sharing joins an address its key already shares
                // before it takes a fresh one (the lowest such, for a stable choice).
                if chosen.is_none() && c.share.is_some() {
                    chosen = book
                        .held
                        .keys()
                        .filter(|ip| IpFamily::of(ip) == *fam && joinable(**ip))
                        .find_map(|ip| {
                            pools
                                .iter()
                                .filter(usable)
                                .find(|q| q.covers(*ip))
                                .map(|q| (*ip, q.def.name.clone()))
                        });
                }
                if chosen.is_none() {
                    chosen = eligible.find_map(|p| {
                        first_free(p, *fam, |ip| free(ip, &a.taken))
                            .map(|ip| (ip, p.def.name.clone()))
                    });
                }
                let Some((ip, pool)) = chosen else {
                    return Err(Refusal::Exhausted(*fam));
                };
                a.taken.push((ip, pool));
                a.addresses.push(ip);
            }
        }
    }
    if a.addresses.is_empty() {
        return Err(Refusal::NoPool(c.families.clone()));
    }
    a.released = have
        .into_iter()
        .filter(|h| !a.addresses.contains(h))
        .collect();
    Ok(a)
}

/// The lowest address of `fam` in the pool that `free` accepts (and not .0/.255 if the pool
/// avoids them). Terminates: every address skipped is held, blocked or one of at most two
/// buggy ones in a row.
fn first_free(p: &Pool, fam: IpFamily, free: impl Fn(IpAddr) -> bool) -> Option<IpAddr> {
    for r in p.ranges.iter().filter(|r| r.family() == fam) {
        let mut v = to_u128(r.first);
        let end = to_u128(r.last);
        while v <= end {
            let ip = from_u128(v, r.first);
            if !(p.def.avoid_buggy_ips && buggy(ip)) && free(ip) {
                return Some(ip);
            }
            v += 1;
        }
    }
    None
}

#[path = "plan_report.rs"]
mod report;
pub use report::{PoolReport, pool_report, uncovered};

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
