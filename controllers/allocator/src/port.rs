//! A port range over a [`Bitmap`]: offset `i` is port `base + i`.

use std::str::FromStr;

use rand::Rng;

use crate::bitmap::{Bitmap, BitmapError, Snapshot};

/// Size of the static band of a NodePort range (KEP-3668): `min(max(16, size/32), 128)`, and 0
/// for ranges of 16 ports or fewer.
pub fn nodeport_static_band(size: usize) -> usize {
    if size <= 16 {
        return 0;
    }
    (size / 32).clamp(16, 128)
}

/// An inclusive port span, parsed like kube-apiserver's `--service-node-port-range`
/// (`30000-32767`, `30000+2767`, or a single port).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortSpan {
    /// First port.
    pub base: u16,
    /// Number of ports (at least 1).
    pub size: u32,
}

impl PortSpan {
    /// Last port of the span.
    pub fn last(&self) -> u16 {
        (self.base as u32 + self.size - 1) as u16
    }

    /// Whether `port` lies in the span.
    pub fn contains(&self, port: i64) -> bool {
        port >= self.base as i64 && port <= self.last() as i64
    }
}

impl std::fmt::Display for PortSpan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.base, self.last())
    }
}

/// Why a port span did not parse (messages as apimachinery's `PortRange.Set`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PortSpanError {
    /// Not a number, or an unknown notation.
    #[error("unable to parse port range: {0}")]
    Syntax(String),
    /// A bound above 65535.
    #[error("the port range cannot be greater than 65535: {0}")]
    TooHigh(String),
    /// End before start.
    #[error("end port cannot be less than start port: {0}")]
    Reversed(String),
    /// Empty (we need at least one port; upstream accepts an empty range and allocates nothing).
    #[error("the port range is empty")]
    Empty,
}

impl FromStr for PortSpan {
    type Err = PortSpanError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let v = s.trim();
        if v.is_empty() {
            return Err(PortSpanError::Empty);
        }
        let num = |t: &str| -> Result<u64, PortSpanError> {
            t.trim()
                .parse::<u64>()
                .map_err(|_| PortSpanError::Syntax(v.to_string()))
        };
        let (low, high) = match (v.find('-'), v.find('+')) {
            (None, None) => {
                let p = num(v)?;
                (p, p)
            }
            (Some(i), None) => (num(&v[..i])?, num(&v[i + 1..])?),
            (None, Some(i)) => {
                let l = num(&v[..i])?;
                (l, l.saturating_add(num(&v[i + 1..])?))
            }
            _ => return Err(PortSpanError::Syntax(v.to_string())),
        };
        if low > 65535 || high > 65535 {
            return Err(PortSpanError::TooHigh(v.to_string()));
        }
        if high < low {
            return Err(PortSpanError::Reversed(v.to_string()));
        }
        Ok(PortSpan {
            base: low as u16,
            size: (high - low + 1) as u32,
        })
    }
}

/// Why a port operation failed. Display strings follow kube-apiserver's portallocator.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PortError {
    /// Outside the range.
    #[error("provided port is not in the valid range. The range of valid ports is {0}")]
    NotInRange(PortSpan),
    /// Already allocated.
    #[error("provided port is already allocated")]
    Allocated,
    /// No port left.
    #[error("range is full")]
    Full,
    /// A snapshot of another range.
    #[error("the provided port range does not match the current port range")]
    Mismatched,
}

/// Node ports as a ledger's pool ([`crate::Mirror`]): values are `spec.ports[].nodePort`.
impl crate::mirror::Pool for PortRange {
    type Value = i32;

    fn mark(&mut self, port: i32) -> bool {
        self.allocate(i64::from(port)).is_ok()
    }

    fn unmark(&mut self, port: i32) {
        self.release(i64::from(port));
    }
}

/// A range of node ports with kube-apiserver's allocation semantics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortRange {
    span: PortSpan,
    bitmap: Bitmap,
}

impl PortRange {
    /// An empty allocator over `span` with the KEP-3668 static band.
    pub fn new(span: PortSpan) -> Self {
        let size = span.size as usize;
        PortRange {
            span,
            bitmap: Bitmap::new_clamped(size, nodeport_static_band(size)),
        }
    }

    /// The span.
    pub fn span(&self) -> PortSpan {
        self.span
    }

    /// Number of ports.
    pub fn size(&self) -> usize {
        self.bitmap.size()
    }

    /// Allocated ports.
    pub fn used(&self) -> usize {
        self.bitmap.used()
    }

    /// Free ports.
    pub fn free(&self) -> usize {
        self.bitmap.free()
    }

    /// Size of the static band (the lowest ports).
    pub fn static_band(&self) -> usize {
        self.bitmap.static_band()
    }

    fn offset(&self, port: i64) -> Option<usize> {
        self.span
            .contains(port)
            .then(|| (port - self.span.base as i64) as usize)
    }

    /// Allocates a requested port.
    pub fn allocate(&mut self, port: i64) -> Result<(), PortError> {
        let off = self.offset(port).ok_or(PortError::NotInRange(self.span))?;
        self.bitmap.allocate(off).map_err(|e| match e {
            BitmapError::Allocated(_) => PortError::Allocated,
            _ => PortError::NotInRange(self.span),
        })
    }

    /// Allocates the next port as kube-apiserver would pick it.
    pub fn allocate_next<R: Rng + ?Sized>(&mut self, rng: &mut R) -> Result<u16, PortError> {
        let off = self
            .bitmap
            .allocate_next(rng)
            .map_err(|_| PortError::Full)?;
        Ok((self.span.base as usize + off) as u16)
    }

    /// Releases `port`; returns whether it was allocated.
    pub fn release(&mut self, port: i64) -> bool {
        self.offset(port).is_some_and(|o| self.bitmap.release(o))
    }

    /// Whether `port` is allocated.
    pub fn has(&self, port: i64) -> bool {
        self.offset(port).is_some_and(|o| self.bitmap.has(o))
    }

    /// Allocated ports in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = u16> + '_ {
        let base = self.span.base as usize;
        self.bitmap.iter().map(move |o| (base + o) as u16)
    }

    /// A copy of the allocations.
    pub fn snapshot(&self) -> (PortSpan, Snapshot) {
        (self.span, self.bitmap.snapshot())
    }

    /// Restores a snapshot of the same span.
    pub fn restore(&mut self, span: PortSpan, snap: &Snapshot) -> Result<(), PortError> {
        if span != self.span {
            return Err(PortError::Mismatched);
        }
        self.bitmap.restore(snap).map_err(|_| PortError::Mismatched)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn parses_like_apimachinery() {
        let d: PortSpan = "30000-32767".parse().unwrap();
        assert_eq!((d.base, d.size, d.last()), (30000, 2768, 32767));
        assert_eq!("30000+10".parse::<PortSpan>().unwrap().size, 11);
        assert_eq!("8080".parse::<PortSpan>().unwrap().size, 1);
        assert_eq!(
            "3-1".parse::<PortSpan>().unwrap_err().to_string(),
            "end port cannot be less than start port: 3-1"
        );
        assert_eq!(
            "1-70000".parse::<PortSpan>().unwrap_err().to_string(),
            "the port range cannot be greater than 65535: 1-70000"
        );
        assert!(matches!(
            "a-b".parse::<PortSpan>(),
            Err(PortSpanError::Syntax(_))
        ));
        assert_eq!(d.to_string(), "30000-32767");
    }

    #[test]
    fn band_sizes_match_upstream() {
        assert_eq!(nodeport_static_band(16), 0);
        assert_eq!(nodeport_static_band(17), 16);
        assert_eq!(nodeport_static_band(2768), 86);
        assert_eq!(nodeport_static_band(10000), 128);
        assert_eq!(
            PortRange::new("30000-32767".parse().unwrap()).static_band(),
            86
        );
    }

    #[test]
    fn allocate_and_messages() {
        let mut r = PortRange::new("30000-30099".parse().unwrap());
        r.allocate(30005).unwrap();
        assert_eq!(
            r.allocate(30005).unwrap_err().to_string(),
            "provided port is already allocated"
        );
        assert_eq!(
            r.allocate(80).unwrap_err().to_string(),
            "provided port is not in the valid range. The range of valid ports is 30000-30099"
        );
        assert!(r.has(30005));
        assert!(r.release(30005));
        assert!(!r.has(30005));
        assert_eq!(r.iter().count(), 0);
    }

    #[test]
    fn full_range_uses_static_band_last() {
        let mut rng = StdRng::seed_from_u64(5);
        let mut r = PortRange::new("30000-30099".parse().unwrap());
        let band = r.static_band() as u16;
        for _ in 0..(100 - band) {
            assert!(r.allocate_next(&mut rng).unwrap() >= 30000 + band);
        }
        for _ in 0..band {
            assert!(r.allocate_next(&mut rng).unwrap() < 30000 + band);
        }
        assert_eq!(r.allocate_next(&mut rng), Err(PortError::Full));
    }

    proptest! {
        /// Interleaved requests, picks and releases never hand out a port twice.
        #[test]
        fn no_double_allocation(seed: u64, ops in proptest::collection::vec((0u8..3, 29990i64..30060), 0..300)) {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut r = PortRange::new("30000-30049".parse().unwrap());
            let mut model = std::collections::BTreeSet::new();
            for (kind, p) in ops {
                match kind {
                    0 => if let Ok(x) = r.allocate_next(&mut rng) { prop_assert!(model.insert(x as i64)); }
                         else { prop_assert_eq!(model.len(), 50); },
                    1 => { let ok = r.allocate(p).is_ok(); prop_assert_eq!(ok, (30000..30050).contains(&p) && model.insert(p)); }
                    _ => { prop_assert_eq!(r.release(p), model.remove(&p)); }
                }
                prop_assert_eq!(r.used(), model.len());
            }
        }
    }
}
