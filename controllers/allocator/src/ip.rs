//! An IP range over a [`Bitmap`]: offsets map to addresses starting after the network address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use rand::Rng;

use crate::bitmap::{Bitmap, BitmapError, Snapshot};

/// IP family of a range or address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IpFamily {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl IpFamily {
    /// The family of an address.
    pub fn of(ip: &IpAddr) -> Self {
        if ip.is_ipv4() {
            IpFamily::V4
        } else {
            IpFamily::V6
        }
    }

    /// Kubernetes' spelling (`IPv4`, `IPv6`) as in `spec.ipFamilies`.
    pub fn as_k8s(&self) -> &'static str {
        match self {
            IpFamily::V4 => "IPv4",
            IpFamily::V6 => "IPv6",
        }
    }

    /// Parses Kubernetes' spelling.
    pub fn from_k8s(s: &str) -> Option<Self> {
        match s {
            "IPv4" => Some(IpFamily::V4),
            "IPv6" => Some(IpFamily::V6),
            _ => None,
        }
    }
}

impl std::fmt::Display for IpFamily {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_k8s())
    }
}

/// kube-apiserver's limit on host bits of a `--service-cluster-ip-range` (`maxCIDRBits`).
pub const MAX_CIDR_HOST_BITS: u8 = 20;

/// At most this many addresses of one range are tracked in a bitmap (128 KiB): a whole
/// `--service-cluster-ip-range` always fits. Upstream's legacy bitmap capped IPv6 ranges at
/// 65536 addresses, but kube-apiserver's current allocator (IPAddress objects) uses the whole
/// range, so we track the whole range up to this bound.
pub const MAX_TRACKED: u128 = 1 << MAX_CIDR_HOST_BITS;

/// Why an IP operation failed. Display strings follow kube-apiserver's ipallocator.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IpError {
    /// The address is outside the allocatable part of the range.
    #[error("the provided IP ({ip}) is not in the valid range. The range of valid IPs is {range}")]
    NotInRange {
        /// The address.
        ip: IpAddr,
        /// The range, as a CIDR.
        range: IpNet,
    },
    /// The address is already allocated.
    #[error("provided IP is already allocated")]
    Allocated,
    /// No address left.
    #[error("range is full")]
    Full,
    /// The range is larger than the bitmap allows (the flag's message).
    #[error(
        "specified {flag} is too large; for {bits}-bit addresses, the mask must be >= {min}",
        flag = "--service-cluster-ip-range",
        min = bits - MAX_CIDR_HOST_BITS
    )]
    TooLarge {
        /// Address bits of the family (32 or 128).
        bits: u8,
    },
    /// A snapshot from another range.
    #[error("the provided network does not match the current range")]
    Mismatched,
}

/// A range of service IPs: every address of `cidr` except the network address and, for IPv4,
/// the broadcast address. Offset `i` is the address `network + 1 + i`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpRange {
    cidr: IpNet,
    base: u128,
    bitmap: Bitmap,
    usable: u128,
}

/// Size of the static band of a ClusterIP range (KEP-3070): `min(max(16, size/16), 256)` where
/// size counts every address of the CIDR, and 0 for CIDRs of 16 addresses or fewer.
pub fn clusterip_static_band(cidr: &IpNet) -> usize {
    let host_bits = cidr.max_prefix_len() - cidr.prefix_len();
    let size: u128 = if host_bits >= 127 {
        u128::MAX
    } else {
        1u128 << host_bits
    };
    if size <= 16 {
        return 0;
    }
    (size / 16).clamp(16, 256) as usize
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u32::from(a) as u128,
        IpAddr::V6(a) => u128::from(a),
    }
}

impl IpRange {
    /// A range for a `--service-cluster-ip-range` CIDR: rejects IPv4 ranges shorter than /12 and
    /// IPv6 ranges shorter than /108, as kube-apiserver's flag validation does. Host bits are
    /// masked off.
    pub fn new(cidr: IpNet) -> Result<Self, IpError> {
        let host_bits = cidr.max_prefix_len() - cidr.prefix_len();
        if host_bits > MAX_CIDR_HOST_BITS {
            return Err(IpError::TooLarge {
                bits: cidr.max_prefix_len(),
            });
        }
        Ok(Self::new_capped(cidr))
    }

    /// A range for any CIDR (e.g. a ServiceCIDR object, which the API allows to be larger):
    /// only the first [`MAX_TRACKED`] addresses are tracked (and dynamic picks come from
    /// them; upstream picks from the whole range). Addresses of the CIDR beyond that are
    /// reported by [`IpRange::offset_of`] as untracked; [`IpRange::usable`] counts them all.
    pub fn new_capped(cidr: IpNet) -> Self {
        let cidr = cidr.trunc();
        let host_bits = cidr.max_prefix_len() - cidr.prefix_len();
        let total: u128 = if host_bits >= 127 {
            u128::MAX
        } else {
            1u128 << host_bits
        };
        let usable: u128 = match cidr {
            // Network and broadcast addresses are never allocated.
            IpNet::V4(_) => total.saturating_sub(2),
            // Only the network (subnet-router anycast) address is excluded.
            IpNet::V6(_) => total.saturating_sub(1),
        };
        let size = usable.min(MAX_TRACKED) as usize;
        let bitmap = Bitmap::new_clamped(size, clusterip_static_band(&cidr));
        IpRange {
            cidr,
            base: to_u128(cidr.network()) + 1,
            bitmap,
            usable,
        }
    }

    /// Every allocatable address of the CIDR, tracked or not.
    pub fn usable(&self) -> u128 {
        self.usable
    }

    /// The CIDR.
    pub fn cidr(&self) -> IpNet {
        self.cidr
    }

    /// The family.
    pub fn family(&self) -> IpFamily {
        match self.cidr {
            IpNet::V4(_) => IpFamily::V4,
            IpNet::V6(_) => IpFamily::V6,
        }
    }

    /// Allocatable (tracked) addresses.
    pub fn size(&self) -> usize {
        self.bitmap.size()
    }

    /// Allocated addresses.
    pub fn used(&self) -> usize {
        self.bitmap.used()
    }

    /// Free addresses.
    pub fn free(&self) -> usize {
        self.bitmap.free()
    }

    /// Size of the static band.
    pub fn static_band(&self) -> usize {
        self.bitmap.static_band()
    }

    /// The address at `offset`, if the offset is inside the range.
    pub fn ip_at(&self, offset: usize) -> Option<IpAddr> {
        if offset >= self.bitmap.size() {
            return None;
        }
        let v = self.base + offset as u128;
        Some(match self.cidr {
            IpNet::V4(_) => IpAddr::V4(Ipv4Addr::from(v as u32)),
            IpNet::V6(_) => IpAddr::V6(Ipv6Addr::from(v)),
        })
    }

    /// Where `ip` falls in this range.
    pub fn offset_of(&self, ip: IpAddr) -> Placement {
        if !self.cidr.contains(&ip) {
            return Placement::Outside;
        }
        let v = to_u128(ip);
        if v < self.base {
            return Placement::Reserved;
        }
        let off = v - self.base;
        if off < self.bitmap.size() as u128 {
            return Placement::Offset(off as usize);
        }
        if let IpNet::V4(n) = self.cidr
            && ip == IpAddr::V4(n.broadcast())
        {
            return Placement::Reserved;
        }
        Placement::Untracked
    }

    /// Whether `ip` can be allocated here at all (tracked and not reserved).
    pub fn contains(&self, ip: IpAddr) -> bool {
        matches!(self.offset_of(ip), Placement::Offset(_))
    }

    fn not_in_range(&self, ip: IpAddr) -> IpError {
        IpError::NotInRange {
            ip,
            range: self.cidr,
        }
    }

    /// Allocates a requested address.
    pub fn allocate(&mut self, ip: IpAddr) -> Result<(), IpError> {
        let Placement::Offset(off) = self.offset_of(ip) else {
            return Err(self.not_in_range(ip));
        };
        self.bitmap.allocate(off).map_err(|e| match e {
            BitmapError::Allocated(_) => IpError::Allocated,
            _ => self.not_in_range(ip),
        })
    }

    /// Allocates the next address as kube-apiserver would pick it.
    pub fn allocate_next<R: Rng + ?Sized>(&mut self, rng: &mut R) -> Result<IpAddr, IpError> {
        let off = self.bitmap.allocate_next(rng).map_err(|_| IpError::Full)?;
        self.ip_at(off).ok_or(IpError::Full)
    }

    /// Releases `ip`; returns whether it was allocated. Addresses outside are ignored.
    pub fn release(&mut self, ip: IpAddr) -> bool {
        match self.offset_of(ip) {
            Placement::Offset(off) => self.bitmap.release(off),
            _ => false,
        }
    }

    /// Whether `ip` is allocated.
    pub fn has(&self, ip: IpAddr) -> bool {
        match self.offset_of(ip) {
            Placement::Offset(off) => self.bitmap.has(off),
            _ => false,
        }
    }

    /// Allocated addresses in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.bitmap.iter().filter_map(|o| self.ip_at(o))
    }

    /// A copy of the allocations.
    pub fn snapshot(&self) -> (IpNet, Snapshot) {
        (self.cidr, self.bitmap.snapshot())
    }

    /// Restores a snapshot of the same CIDR.
    pub fn restore(&mut self, cidr: IpNet, snap: &Snapshot) -> Result<(), IpError> {
        if cidr.trunc() != self.cidr {
            return Err(IpError::Mismatched);
        }
        self.bitmap.restore(snap).map_err(|_| IpError::Mismatched)
    }

    /// The underlying bitmap (read-only).
    pub fn bitmap(&self) -> &Bitmap {
        &self.bitmap
    }
}

/// Where an address falls relative to a range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Not in the CIDR.
    Outside,
    /// In the CIDR but never allocatable (network or IPv4 broadcast address).
    Reserved,
    /// In the CIDR beyond the tracked part of an oversized range.
    Untracked,
    /// Allocatable, at this offset.
    Offset(usize),
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ipv4_excludes_network_and_broadcast() {
        let r = IpRange::new(net("10.0.0.0/24")).unwrap();
        assert_eq!(r.size(), 254);
        assert_eq!(r.ip_at(0), Some(ip("10.0.0.1")));
        assert_eq!(r.ip_at(253), Some(ip("10.0.0.254")));
        assert_eq!(r.ip_at(254), None);
        assert_eq!(r.offset_of(ip("10.0.0.0")), Placement::Reserved);
        assert_eq!(r.offset_of(ip("10.0.0.255")), Placement::Reserved);
        assert_eq!(r.offset_of(ip("10.0.1.1")), Placement::Outside);
        assert_eq!(r.offset_of(ip("10.0.0.10")), Placement::Offset(9));
        // 256 / 16 = 16 -> static band 16
        assert_eq!(r.static_band(), 16);
    }

    #[test]
    fn static_band_sizes_match_upstream() {
        assert_eq!(clusterip_static_band(&net("10.0.0.0/28")), 0);
        assert_eq!(clusterip_static_band(&net("10.0.0.0/27")), 16);
        assert_eq!(clusterip_static_band(&net("10.0.0.0/20")), 256);
        assert_eq!(clusterip_static_band(&net("10.0.0.0/22")), 64);
        assert_eq!(clusterip_static_band(&net("10.0.0.0/12")), 256);
        assert_eq!(clusterip_static_band(&net("fd00::/108")), 256);
        assert_eq!(clusterip_static_band(&net("fd00::/64")), 256);
        assert_eq!(clusterip_static_band(&net("fd00::/124")), 0);
    }

    #[test]
    fn flag_limits() {
        assert!(IpRange::new(net("10.0.0.0/12")).is_ok());
        let e = IpRange::new(net("10.0.0.0/11")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "specified --service-cluster-ip-range is too large; for 32-bit addresses, the mask must be >= 12"
        );
        assert!(IpRange::new(net("fd00::/108")).is_ok());
        let e = IpRange::new(net("fd00::/107")).unwrap_err();
        assert!(
            e.to_string()
                .ends_with("for 128-bit addresses, the mask must be >= 108")
        );
    }

    #[test]
    fn ipv6_flag_range_tracked_whole() {
        let r = IpRange::new(net("fd00:10::/108")).unwrap();
        assert_eq!(r.size(), (1 << 20) - 1);
        assert_eq!(r.ip_at(0), Some(ip("fd00:10::1")));
        assert_eq!(r.offset_of(ip("fd00:10::ffff")), Placement::Offset(65534));
        assert_eq!(
            r.offset_of(ip("fd00:10::f:ffff")),
            Placement::Offset((1 << 20) - 2)
        );
        assert_eq!(r.offset_of(ip("fd00:10::10:0")), Placement::Outside);
        let small = IpRange::new(net("fd00::/120")).unwrap();
        // IPv6 has no broadcast: the last address is allocatable.
        assert_eq!(small.size(), 255);
        assert!(small.contains(ip("fd00::ff")));
    }

    #[test]
    fn allocate_errors_have_upstream_messages() {
        let mut r = IpRange::new(net("10.96.0.0/16")).unwrap();
        r.allocate(ip("10.96.0.10")).unwrap();
        assert_eq!(
            r.allocate(ip("10.96.0.10")).unwrap_err().to_string(),
            "provided IP is already allocated"
        );
        assert_eq!(
            r.allocate(ip("10.97.0.10")).unwrap_err().to_string(),
            "the provided IP (10.97.0.10) is not in the valid range. The range of valid IPs is 10.96.0.0/16"
        );
        assert!(r.allocate(ip("10.96.255.255")).is_err());
        assert!(r.has(ip("10.96.0.10")));
        assert!(r.release(ip("10.96.0.10")));
        assert!(!r.release(ip("10.96.0.10")));
        assert!(r.allocate(ip("10.96.0.10")).is_ok());
    }

    #[test]
    fn tiny_ranges() {
        let mut r = IpRange::new(net("10.0.0.0/31")).unwrap();
        assert_eq!(r.size(), 0);
        let mut rng = StdRng::seed_from_u64(0);
        assert_eq!(r.allocate_next(&mut rng), Err(IpError::Full));
        let r = IpRange::new(net("10.0.0.1/32")).unwrap();
        assert_eq!(r.size(), 0);
        let mut r = IpRange::new(net("10.0.0.0/30")).unwrap();
        assert_eq!(r.allocate_next(&mut rng).ok().map(|_| r.used()), Some(1));
        r.allocate_next(&mut rng).unwrap();
        assert_eq!(r.allocate_next(&mut rng), Err(IpError::Full));
    }

    #[test]
    fn capped_range_for_large_service_cidrs() {
        let r = IpRange::new_capped(net("fd00::/64"));
        assert_eq!(r.size(), 1 << 20);
        assert_eq!(r.usable(), (1u128 << 64) - 1);
        assert_eq!(r.offset_of(ip("fd00::1:0:0")), Placement::Untracked);
        let r4 = IpRange::new_capped(net("10.0.0.0/8"));
        assert_eq!(r4.size(), 1 << 20);
        assert_eq!(r4.usable(), (1 << 24) - 2);
        assert_eq!(r4.offset_of(ip("10.255.255.255")), Placement::Reserved);
        assert_eq!(r4.offset_of(ip("10.200.0.1")), Placement::Untracked);
    }

    #[test]
    fn full_v4_range_then_static_band() {
        let mut rng = StdRng::seed_from_u64(9);
        let mut r = IpRange::new(net("192.168.0.0/24")).unwrap();
        let band = r.static_band();
        let first_static = r.ip_at(0).unwrap();
        let last_static = r.ip_at(band - 1).unwrap();
        for _ in 0..(r.size() - band) {
            let a = r.allocate_next(&mut rng).unwrap();
            assert!(
                to_u128(a) > to_u128(last_static),
                "{a} from static band too early"
            );
        }
        let a = r.allocate_next(&mut rng).unwrap();
        assert!(to_u128(a) >= to_u128(first_static) && to_u128(a) <= to_u128(last_static));
    }

    proptest! {
        /// offset <-> IP mapping is a bijection on the tracked part, for both families.
        #[test]
        fn offset_ip_roundtrip(v6: bool, prefix_extra in 0u8..=20, off: usize, a: u128) {
            let n: IpNet = if v6 {
                IpNet::V6(ipnet::Ipv6Net::new(Ipv6Addr::from(a), 108 + prefix_extra).unwrap())
            } else {
                IpNet::V4(ipnet::Ipv4Net::new(Ipv4Addr::from(a as u32), 12 + prefix_extra).unwrap())
            };
            let r = IpRange::new(n).unwrap();
            if r.size() > 0 {
                let o = off % r.size();
                let addr = r.ip_at(o).unwrap();
                prop_assert!(r.cidr().contains(&addr));
                prop_assert_eq!(r.offset_of(addr), Placement::Offset(o));
            }
            prop_assert_eq!(r.offset_of(r.cidr().network()), Placement::Reserved);
        }

        /// Dynamic picks in an IPv6 range never repeat and never hit the network address.
        #[test]
        fn ipv6_dynamic_picks_unique(seed: u64, n in 1usize..300) {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut r = IpRange::new(net("fd00:1::/120")).unwrap();
            let mut seen = std::collections::HashSet::new();
            for _ in 0..n.min(r.size()) {
                let a = r.allocate_next(&mut rng).unwrap();
                prop_assert!(a != r.cidr().network());
                prop_assert!(seen.insert(a));
                prop_assert!(r.has(a));
            }
        }
    }
}
