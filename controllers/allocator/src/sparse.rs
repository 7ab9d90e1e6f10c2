//! An IP range of any size whose allocations are a set of used offsets: memory follows the
//! addresses in use, not the size of the range, so a `10.0.0.0/8` or an IPv6 `/64` costs what
//! its Services cost. Same picking rules as [`crate::IpRange`] (kube-apiserver's): network
//! address and IPv4 broadcast never allocated, a static lower band (KEP-3070), dynamic picks
//! from a random start in the upper band with wrap-around, then the lower band.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use rand::{Rng, RngExt};

use crate::ip::{IpError, IpFamily, clusterip_static_band};

/// A ClusterIP range tracked as a sorted set of used offsets (offset `i` is `network + 1 + i`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SparseRange {
    cidr: IpNet,
    base: u128,
    usable: u128,
    band: u128,
    used: BTreeSet<u128>,
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u32::from(a) as u128,
        IpAddr::V6(a) => u128::from(a),
    }
}

impl SparseRange {
    /// An empty range over `cidr` (host bits masked off); any prefix length.
    pub fn new(cidr: IpNet) -> Self {
        let cidr = cidr.trunc();
        let host_bits = cidr.max_prefix_len() - cidr.prefix_len();
        let total: u128 = if host_bits >= 128 {
            u128::MAX
        } else {
            1u128 << host_bits
        };
        let usable = match cidr {
            // Network and broadcast addresses are never allocated.
            IpNet::V4(_) => total.saturating_sub(2),
            // Only the network (subnet-router anycast) address is excluded.
            IpNet::V6(_) => total.saturating_sub(1),
        };
        SparseRange {
            cidr,
            base: to_u128(cidr.network()).saturating_add(1),
            usable,
            band: (clusterip_static_band(&cidr) as u128).min(usable),
            used: BTreeSet::new(),
        }
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

    /// Every allocatable address.
    pub fn usable(&self) -> u128 {
        self.usable
    }

    /// Allocated addresses.
    pub fn used(&self) -> usize {
        self.used.len()
    }

    /// Free addresses.
    pub fn free(&self) -> u128 {
        self.usable - self.used.len() as u128
    }

    /// Size of the static band.
    pub fn static_band(&self) -> u128 {
        self.band
    }

    /// The address at `offset`, if it is inside the range.
    pub fn ip_at(&self, offset: u128) -> Option<IpAddr> {
        if offset >= self.usable {
            return None;
        }
        let v = self.base + offset;
        Some(match self.cidr {
            IpNet::V4(_) => IpAddr::V4(Ipv4Addr::from(v as u32)),
            IpNet::V6(_) => IpAddr::V6(Ipv6Addr::from(v)),
        })
    }

    /// The offset of `ip` if it can be allocated here (in the CIDR, not reserved).
    pub fn offset_of(&self, ip: IpAddr) -> Option<u128> {
        if !self.cidr.contains(&ip) {
            return None;
        }
        let off = to_u128(ip).checked_sub(self.base)?;
        (off < self.usable).then_some(off)
    }

    /// Whether `ip` can be allocated here at all.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.offset_of(ip).is_some()
    }

    /// Whether `ip` is allocated.
    pub fn has(&self, ip: IpAddr) -> bool {
        self.offset_of(ip).is_some_and(|o| self.used.contains(&o))
    }

    /// Allocates a requested address.
    pub fn allocate(&mut self, ip: IpAddr) -> Result<(), IpError> {
        let off = self.offset_of(ip).ok_or(IpError::NotInRange {
            ip,
            range: self.cidr,
        })?;
        if !self.used.insert(off) {
            return Err(IpError::Allocated);
        }
        Ok(())
    }

    /// Releases `ip`; returns whether it was allocated.
    pub fn release(&mut self, ip: IpAddr) -> bool {
        self.offset_of(ip).is_some_and(|o| self.used.remove(&o))
    }

    /// The first free offset in `[lo, hi)` at or after `start`, wrapping around to `lo`. Walks
    /// only the run of used offsets after the start, so a pick costs at most the Services in
    /// that run, never the size of the range.
    fn first_free(&self, lo: u128, hi: u128, start: u128) -> Option<u128> {
        let mut c = start;
        for &u in self.used.range(start..hi) {
            if u != c {
                break;
            }
            c += 1;
        }
        if c < hi {
            return Some(c);
        }
        let mut c = lo;
        for &u in self.used.range(lo..start) {
            if u != c {
                break;
            }
            c += 1;
        }
        (c < start).then_some(c)
    }

    /// Allocates the next address as kube-apiserver would pick it.
    pub fn allocate_next<R: Rng + ?Sized>(&mut self, rng: &mut R) -> Result<IpAddr, IpError> {
        let (band, size) = (self.band, self.usable);
        let mut pick = None;
        if size > band {
            let start = band + rng.random_range(0..size - band);
            pick = self.first_free(band, size, start);
        }
        if pick.is_none() && band > 0 {
            let start = rng.random_range(0..band);
            pick = self.first_free(0, band, start);
        }
        let off = pick.ok_or(IpError::Full)?;
        self.used.insert(off);
        self.ip_at(off).ok_or(IpError::Full)
    }

    /// Allocated addresses in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.used.iter().filter_map(|o| self.ip_at(*o))
    }
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
    fn wide_ranges_cost_what_is_used() {
        let mut r = SparseRange::new(net("10.0.0.0/8"));
        assert_eq!(r.usable(), (1 << 24) - 2);
        assert_eq!(r.static_band(), 256);
        assert!(!r.contains(ip("10.0.0.0")) && !r.contains(ip("10.255.255.255")));
        assert!(r.contains(ip("10.200.0.1")));
        r.allocate(ip("10.200.0.1")).unwrap();
        assert_eq!(r.allocate(ip("10.200.0.1")), Err(IpError::Allocated));
        assert_eq!(r.used(), 1);
        let mut rng = StdRng::seed_from_u64(1);
        let a = r.allocate_next(&mut rng).unwrap();
        assert!(r.has(a) && r.offset_of(a).unwrap() >= 256);
        let v6 = SparseRange::new(net("fd00::/64"));
        assert_eq!(v6.usable(), (1u128 << 64) - 1);
        assert_eq!(v6.ip_at(0), Some(ip("fd00::1")));
        // Even a whole family works (never configured, but nothing overflows).
        let all = SparseRange::new(net("::/0"));
        assert_eq!(all.usable(), u128::MAX - 1);
    }

    #[test]
    fn fills_upper_band_then_static_band_then_full() {
        let mut rng = StdRng::seed_from_u64(5);
        let mut r = SparseRange::new(net("192.168.0.0/27")); // 30 usable, band 16
        assert_eq!((r.usable(), r.static_band()), (30, 16));
        for _ in 0..14 {
            let a = r.allocate_next(&mut rng).unwrap();
            assert!(
                r.offset_of(a).unwrap() >= 16,
                "{a} from the static band too early"
            );
        }
        for _ in 0..16 {
            let a = r.allocate_next(&mut rng).unwrap();
            assert!(r.offset_of(a).unwrap() < 16);
        }
        assert_eq!(r.allocate_next(&mut rng), Err(IpError::Full));
        assert!(r.release(ip("192.168.0.5")));
        assert_eq!(r.allocate_next(&mut rng), Ok(ip("192.168.0.5")));
        assert_eq!(SparseRange::new(net("10.0.0.0/31")).usable(), 0);
        let mut tiny = SparseRange::new(net("10.0.0.0/31"));
        assert_eq!(tiny.allocate_next(&mut rng), Err(IpError::Full));
    }

    proptest! {
        /// Picks never repeat, and the set agrees with a plain bitmap's view of the same range.
        #[test]
        fn picks_unique_and_match_the_bitmap_range(seed: u64, n in 1usize..300, v6: bool) {
            let cidr = if v6 { net("fd00:1::/120") } else { net("10.1.0.0/24") };
            let mut rng = StdRng::seed_from_u64(seed);
            let mut r = SparseRange::new(cidr);
            let b = crate::IpRange::new(cidr).unwrap();
            prop_assert_eq!(r.usable(), b.size() as u128);
            prop_assert_eq!(r.static_band(), b.static_band() as u128);
            let mut seen = std::collections::HashSet::new();
            for _ in 0..n.min(b.size()) {
                let a = r.allocate_next(&mut rng).unwrap();
                prop_assert!(b.contains(a));
                prop_assert!(seen.insert(a));
            }
            prop_assert_eq!(r.iter().count(), seen.len());
        }
    }
}
