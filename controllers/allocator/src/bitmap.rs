//! The index-level allocator: a bitmap over `[0, size)` with a static lower band.

use rand::{Rng, RngExt};

/// Why an allocation failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BitmapError {
    /// The index is not in `[0, size)`.
    #[error("offset {index} out of range [0,{size}]")]
    OutOfRange {
        /// The index asked for.
        index: usize,
        /// The bitmap's size.
        size: usize,
    },
    /// The index is already allocated.
    #[error("offset {0} is already allocated")]
    Allocated(usize),
    /// Nothing left to allocate.
    #[error("range is full")]
    Full,
    /// A snapshot taken of a bitmap with another shape.
    #[error("the snapshot is for a bitmap of size {got}, this one has size {want}")]
    Mismatched {
        /// This bitmap's size.
        want: usize,
        /// The snapshot's size.
        got: usize,
    },
    /// The static band cannot be larger than the bitmap.
    #[error("static band {band} is larger than the range size {size}")]
    BandTooLarge {
        /// Requested band size.
        band: usize,
        /// The bitmap's size.
        size: usize,
    },
}

/// Which band an index belongs to (KEP-3070 / KEP-3668).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Band {
    /// The lower band `[0, static_band)`, kept for requested values as long as possible.
    Static,
    /// The upper band `[static_band, size)`, where dynamic picks land first.
    Dynamic,
}

/// A bitmap allocator over the indices `[0, size)`.
///
/// Dynamic picks ([`Bitmap::allocate_next`]) follow kube-apiserver: a random start inside the
/// upper (dynamic) band, then a linear scan with wrap-around inside that band; only when it is
/// full, the same inside the lower (static) band. Requested values ([`Bitmap::allocate`]) may
/// land anywhere. Not thread-safe by itself: the callers own one per range behind their lock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bitmap {
    words: Vec<u64>,
    size: usize,
    static_band: usize,
    count: usize,
}

/// A copy of a bitmap's allocations, to restore later or compare two states.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// The size of the bitmap it came from.
    pub size: usize,
    /// Allocation bits, 64 indices per word, index `i` at bit `i % 64` of word `i / 64`.
    pub words: Vec<u64>,
}

impl Bitmap {
    /// An empty bitmap over `[0, size)` whose lowest `static_band` indices form the static band.
    pub fn new(size: usize, static_band: usize) -> Result<Self, BitmapError> {
        if static_band > size {
            return Err(BitmapError::BandTooLarge {
                band: static_band,
                size,
            });
        }
        Ok(Bitmap {
            words: vec![0; size.div_ceil(64)],
            size,
            static_band,
            count: 0,
        })
    }

    /// Like [`Bitmap::new`], but a static band larger than `size` is cut down to `size`.
    pub fn new_clamped(size: usize, static_band: usize) -> Self {
        Bitmap {
            words: vec![0; size.div_ceil(64)],
            size,
            static_band: static_band.min(size),
            count: 0,
        }
    }

    /// Number of indices.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Size of the static lower band.
    pub fn static_band(&self) -> usize {
        self.static_band
    }

    /// The band `index` lies in.
    pub fn band_of(&self, index: usize) -> Band {
        if index < self.static_band {
            Band::Static
        } else {
            Band::Dynamic
        }
    }

    /// Allocated indices.
    pub fn used(&self) -> usize {
        self.count
    }

    /// Free indices.
    pub fn free(&self) -> usize {
        self.size - self.count
    }

    /// Whether `index` is allocated (false when out of range).
    pub fn has(&self, index: usize) -> bool {
        index < self.size && self.words[index / 64] & (1 << (index % 64)) != 0
    }

    /// Allocates a requested index.
    pub fn allocate(&mut self, index: usize) -> Result<(), BitmapError> {
        if index >= self.size {
            return Err(BitmapError::OutOfRange {
                index,
                size: self.size,
            });
        }
        if self.has(index) {
            return Err(BitmapError::Allocated(index));
        }
        self.set(index);
        Ok(())
    }

    fn set(&mut self, index: usize) {
        self.words[index / 64] |= 1 << (index % 64);
        self.count += 1;
    }

    /// Allocates a free index the way kube-apiserver picks one, or fails with `Full`.
    pub fn allocate_next<R: Rng + ?Sized>(&mut self, rng: &mut R) -> Result<usize, BitmapError> {
        if self.count >= self.size {
            return Err(BitmapError::Full);
        }
        let found = self
            .scan_band(rng, self.static_band, self.size)
            .or_else(|| self.scan_band(rng, 0, self.static_band));
        match found {
            Some(i) => {
                self.set(i);
                Ok(i)
            }
            None => Err(BitmapError::Full),
        }
    }

    /// Random start in `[lo, hi)`, then the first free index at or after it, wrapping once.
    fn scan_band<R: Rng + ?Sized>(&self, rng: &mut R, lo: usize, hi: usize) -> Option<usize> {
        if lo >= hi {
            return None;
        }
        let start = rng.random_range(lo..hi);
        self.first_free(start, hi)
            .or_else(|| self.first_free(lo, start))
    }

    /// The first free index in `[from, to)`, a word at a time.
    fn first_free(&self, from: usize, to: usize) -> Option<usize> {
        let mut i = from;
        while i < to {
            let w = i / 64;
            // Bits below `i` in this word count as taken so the search starts at `i`.
            let mask = !0u64 << (i % 64);
            let free = !self.words[w] & mask;
            if free != 0 {
                let at = w * 64 + free.trailing_zeros() as usize;
                return (at < to).then_some(at);
            }
            i = (w + 1) * 64;
        }
        None
    }

    /// Frees `index`; returns whether it was allocated.
    pub fn release(&mut self, index: usize) -> bool {
        if !self.has(index) {
            return false;
        }
        self.words[index / 64] &= !(1 << (index % 64));
        self.count -= 1;
        true
    }

    /// Allocated indices in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.words.iter().enumerate().flat_map(|(w, &word)| {
            let mut bits = word;
            std::iter::from_fn(move || {
                if bits == 0 {
                    return None;
                }
                let b = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                Some(w * 64 + b)
            })
        })
    }

    /// A copy of the allocations.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            size: self.size,
            words: self.words.clone(),
        }
    }

    /// Replaces the allocations with a snapshot of a bitmap of the same size.
    pub fn restore(&mut self, snap: &Snapshot) -> Result<(), BitmapError> {
        if snap.size != self.size || snap.words.len() != self.words.len() {
            return Err(BitmapError::Mismatched {
                want: self.size,
                got: snap.size,
            });
        }
        self.words.copy_from_slice(&snap.words);
        // Bits past `size` in the last word would be phantom allocations; drop them.
        if !self.size.is_multiple_of(64)
            && let Some(last) = self.words.last_mut()
        {
            *last &= (1u64 << (self.size % 64)) - 1;
        }
        self.count = self.words.iter().map(|w| w.count_ones() as usize).sum();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn allocate_requested_then_taken_and_out_of_range() {
        let mut b = Bitmap::new(10, 2).unwrap();
        assert_eq!(b.allocate(3), Ok(()));
        assert_eq!(b.allocate(3), Err(BitmapError::Allocated(3)));
        assert_eq!(
            b.allocate(10),
            Err(BitmapError::OutOfRange {
                index: 10,
                size: 10
            })
        );
        assert!(b.has(3));
        assert!(!b.has(4));
        assert!(!b.has(99));
        assert_eq!((b.used(), b.free()), (1, 9));
    }

    #[test]
    fn band_larger_than_size_is_rejected() {
        assert!(matches!(
            Bitmap::new(4, 5),
            Err(BitmapError::BandTooLarge { .. })
        ));
    }

    #[test]
    fn dynamic_picks_fill_upper_band_before_static_band() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut b = Bitmap::new(100, 16).unwrap();
        for _ in 0..84 {
            let i = b.allocate_next(&mut rng).unwrap();
            assert!(
                i >= 16,
                "picked {i} from the static band while the upper band had room"
            );
        }
        for _ in 0..16 {
            let i = b.allocate_next(&mut rng).unwrap();
            assert!(i < 16);
        }
        assert_eq!(b.allocate_next(&mut rng), Err(BitmapError::Full));
        assert_eq!(b.free(), 0);
    }

    #[test]
    fn zero_band_and_empty_bitmap() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut b = Bitmap::new(3, 0).unwrap();
        let mut got: Vec<_> = (0..3).map(|_| b.allocate_next(&mut rng).unwrap()).collect();
        got.sort();
        assert_eq!(got, vec![0, 1, 2]);
        let mut e = Bitmap::new(0, 0).unwrap();
        assert_eq!(e.allocate_next(&mut rng), Err(BitmapError::Full));
    }

    #[test]
    fn full_static_band_only_lower_half_left() {
        // Requested values may fill the upper band; dynamic picks then use the static band.
        let mut rng = StdRng::seed_from_u64(3);
        let mut b = Bitmap::new(130, 2).unwrap();
        for i in 2..130 {
            b.allocate(i).unwrap();
        }
        let a = b.allocate_next(&mut rng).unwrap();
        let c = b.allocate_next(&mut rng).unwrap();
        let mut got = [a, c];
        got.sort();
        assert_eq!(got, [0, 1]);
    }

    #[test]
    fn snapshot_restore_roundtrip_and_mismatch() {
        let mut b = Bitmap::new(70, 4).unwrap();
        b.allocate(0).unwrap();
        b.allocate(69).unwrap();
        let s = b.snapshot();
        let mut c = Bitmap::new(70, 4).unwrap();
        c.restore(&s).unwrap();
        assert_eq!(b, c);
        assert_eq!(c.iter().collect::<Vec<_>>(), vec![0, 69]);
        let mut d = Bitmap::new(71, 4).unwrap();
        assert!(matches!(d.restore(&s), Err(BitmapError::Mismatched { .. })));
        // Stray bits past the end are not counted.
        let mut bad = s.clone();
        bad.words[1] |= 1 << 63;
        c.restore(&bad).unwrap();
        assert_eq!(c.used(), 2);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Next,
        Alloc(usize),
        Release(usize),
    }

    fn op(size: usize) -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => Just(Op::Next),
            1 => (0..size + 2).prop_map(Op::Alloc),
            2 => (0..size + 2).prop_map(Op::Release),
        ]
    }

    proptest! {
        /// Against a set model: no index is ever handed out twice, release makes an index
        /// allocatable again, counts stay exact, and a dynamic pick comes from the static band
        /// only when the dynamic band is full.
        #[test]
        fn behaves_like_a_set(size in 0usize..200, band_frac in 0usize..=100, seed: u64,
                              ops in proptest::collection::vec(op(200), 0..400)) {
            let band = size * band_frac / 100;
            let mut rng = StdRng::seed_from_u64(seed);
            let mut b = Bitmap::new(size, band).unwrap();
            let mut model = std::collections::BTreeSet::new();
            for o in ops {
                match o {
                    Op::Next => {
                        let upper_full = (band..size).all(|i| model.contains(&i));
                        match b.allocate_next(&mut rng) {
                            Ok(i) => {
                                prop_assert!(i < size);
                                prop_assert!(model.insert(i), "index {} handed out twice", i);
                                if i < band { prop_assert!(upper_full); }
                            }
                            Err(e) => {
                                prop_assert_eq!(e, BitmapError::Full);
                                prop_assert_eq!(model.len(), size);
                            }
                        }
                    }
                    Op::Alloc(i) => {
                        let r = b.allocate(i);
                        if i >= size {
                            let out_of_range = matches!(r, Err(BitmapError::OutOfRange { .. }));
                            prop_assert!(out_of_range);
                        } else if model.contains(&i) {
                            prop_assert_eq!(r, Err(BitmapError::Allocated(i)));
                        } else {
                            prop_assert_eq!(r, Ok(()));
                            model.insert(i);
                        }
                    }
                    Op::Release(i) => {
                        prop_assert_eq!(b.release(i), model.remove(&i));
                        if i < size { prop_assert!(b.allocate(i).is_ok()); prop_assert!(b.release(i)); }
                    }
                }
                prop_assert_eq!(b.used(), model.len());
                prop_assert_eq!(b.free(), size - model.len());
            }
            prop_assert_eq!(b.iter().collect::<Vec<_>>(), model.iter().copied().collect::<Vec<_>>());
        }

        /// Dynamic picks alone fill the whole range exactly once each, then report Full.
        #[test]
        fn fills_exactly(size in 0usize..300, band in 0usize..64, seed: u64) {
            let band = band.min(size);
            let mut rng = StdRng::seed_from_u64(seed);
            let mut b = Bitmap::new(size, band).unwrap();
            let mut seen = vec![false; size];
            for n in 0..size {
                let i = b.allocate_next(&mut rng).unwrap();
                prop_assert!(!seen[i]);
                seen[i] = true;
                // Band order: the first size-band picks are all in the upper band.
                if n < size - band { prop_assert!(i >= band); }
            }
            prop_assert_eq!(b.allocate_next(&mut rng), Err(BitmapError::Full));
        }
    }
}
