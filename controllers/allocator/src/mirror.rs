//! The ownership ledger both Service allocators keep beside their bitmaps: who holds each value,
//! what is wrong with each holder, and who still needs an assignment. It is rebuilt from all
//! holders at once; a contested value belongs to the oldest holder, and values written but not
//! yet observed (pending) are claimed before anything else.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Debug;
use std::hash::Hash;
use std::time::{Duration, SystemTime};

/// The allocator side of a ledger: what marks a value used or free in the bitmap(s).
pub trait Pool {
    /// What is allocated (an address, a port).
    type Value: Copy + Eq + Hash + Debug;
    /// Marks `v` used. False when this pool cannot hold it: then nobody is recorded as owner.
    fn mark(&mut self, v: Self::Value) -> bool;
    /// Marks `v` free.
    fn unmark(&mut self, v: Self::Value);
}

/// What a finding reports, worded as upstream's repair loop: an Event and a metric type.
pub trait Report {
    /// Event reason.
    fn reason(&self) -> &'static str;
    /// Event action.
    fn action(&self) -> &'static str;
    /// Event note.
    fn message(&self) -> String;
    /// The `type` label of the repair-errors counter.
    fn metric_type(&self) -> &'static str;
    /// Not reported before this time (a grace period upstream's repair loop waits out too).
    fn not_before(&self) -> Option<SystemTime> {
        None
    }
    /// How long the finding must stand before it is reported: findings that compare two
    /// watches (IPAddresses against Services) can be momentarily false while one watch is
    /// a few events behind the other.
    fn settle(&self) -> Duration {
        Duration::ZERO
    }
}

/// Values written to their owners but not yet observed, per owner.
pub type Pending<K, V> = BTreeMap<K, Vec<V>>;

/// The mirrored allocation state: a pool, who holds each of its values, findings per holder,
/// and the holders that need an assignment.
#[derive(Clone, Debug)]
pub struct Mirror<P: Pool, K, F> {
    /// The bitmap(s).
    pub pool: P,
    /// Who holds each value.
    pub owners: HashMap<P::Value, K>,
    /// Findings per holder.
    pub findings: BTreeMap<K, Vec<F>>,
    /// Holders that need an assignment (or a cleanup).
    pub needs_assign: BTreeSet<K>,
}

impl<P: Pool, K: Ord + Clone, F> Mirror<P, K, F> {
    /// An empty ledger over `pool`.
    pub fn new(pool: P) -> Self {
        Mirror {
            pool,
            owners: HashMap::new(),
            findings: BTreeMap::new(),
            needs_assign: BTreeSet::new(),
        }
    }

    /// Builds the ledger from every holder: `pending` values are claimed first, then `visit`
    /// sees the items oldest first (by `seniority`, which ends with the item's key so the order
    /// is total). Going by age rather than list order means a restart rebuilds the same owners.
    pub fn build<S: ?Sized, A: Ord>(
        pool: P,
        items: &[&S],
        pending: &Pending<K, P::Value>,
        seniority: impl Fn(&S) -> (A, K),
        mut visit: impl FnMut(&mut Self, &K, &S),
    ) -> Self {
        let mut m = Mirror::new(pool);
        for (key, values) in pending {
            for v in values {
                m.claim(*v, key);
            }
        }
        // The sort keys are dropped before the ledger grows (and each key made again as its
        // item is visited), which keeps the peak of a rebuild low.
        let mut order: Vec<&S> = items.to_vec();
        order.sort_by_cached_key(|s| seniority(s));
        for s in order {
            let (_, key) = seniority(s);
            visit(&mut m, &key, s);
        }
        m
    }

    /// Records `key` as the holder of `v` unless someone holds it or the pool refuses it.
    pub fn claim(&mut self, v: P::Value, key: &K) -> bool {
        if self.owners.contains_key(&v) || !self.pool.mark(v) {
            return false;
        }
        self.owners.insert(v, key.clone());
        true
    }

    /// Who holds `v`.
    pub fn holder(&self, v: &P::Value) -> Option<&K> {
        self.owners.get(v)
    }

    /// The values `key` holds (in no particular order).
    pub fn held_by<'a>(&'a self, key: &'a K) -> impl Iterator<Item = P::Value> + 'a {
        self.owners
            .iter()
            .filter(move |(_, k)| *k == key)
            .map(|(v, _)| *v)
    }

    /// Takes a new value from the pool with `pick` (which marks it) and records `key` as holder.
    pub fn take<E>(
        &mut self,
        key: &K,
        pick: impl FnOnce(&mut P) -> Result<P::Value, E>,
    ) -> Result<P::Value, E> {
        let v = pick(&mut self.pool)?;
        self.owners.insert(v, key.clone());
        Ok(v)
    }

    /// Frees `v` if `key` holds it.
    pub fn release(&mut self, v: P::Value, key: &K) {
        if self.owners.get(&v) == Some(key) {
            self.owners.remove(&v);
            self.pool.unmark(v);
        }
    }

    /// Records a finding about `key`.
    pub fn report(&mut self, key: &K, finding: F) {
        self.findings.entry(key.clone()).or_default().push(finding);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{PortRange, PortSpan};

    type M = Mirror<PortRange, &'static str, ()>;

    fn span() -> PortSpan {
        PortSpan {
            base: 100,
            size: 10,
        }
    }

    #[test]
    fn oldest_holder_wins_and_pending_comes_first() {
        // (age, name, port): "young" is listed first but "old" is older.
        let items: Vec<(u32, &'static str, i32)> =
            vec![(2, "young", 101), (1, "old", 101), (3, "late", 102)];
        let refs: Vec<&(u32, &'static str, i32)> = items.iter().collect();
        let pending: Pending<&'static str, i32> = [("writer", vec![102])].into();
        let m = M::build(
            PortRange::new(span()),
            &refs,
            &pending,
            |s| (s.0, s.1),
            |m, key, s| {
                if !m.claim(s.2, key) && m.holder(&s.2) != Some(key) {
                    m.report(key, ());
                }
            },
        );
        assert_eq!(m.holder(&101), Some(&"old"));
        assert_eq!(m.holder(&102), Some(&"writer"));
        assert_eq!(
            m.findings.keys().copied().collect::<Vec<_>>(),
            vec!["late", "young"]
        );
        assert_eq!(m.pool.used(), 2);
    }

    #[test]
    fn release_only_by_the_holder_and_take_records_the_owner() {
        let mut m = M::new(PortRange::new(span()));
        assert!(m.claim(105, &"a"));
        assert!(!m.claim(105, &"b"), "held values are not claimed again");
        assert!(!m.claim(5, &"b"), "the pool refuses values outside it");
        m.release(105, &"b");
        assert_eq!(m.holder(&105), Some(&"a"));
        m.release(105, &"a");
        assert_eq!((m.holder(&105), m.pool.used()), (None, 0));
        let mut rng = rand::rng();
        let v = m
            .take(&"c", |p| p.allocate_next(&mut rng).map(i32::from))
            .expect("free port");
        assert_eq!(m.held_by(&"c").collect::<Vec<_>>(), vec![v]);
        assert_eq!(m.pool.used(), 1);
    }
}
