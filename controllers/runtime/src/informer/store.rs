//! An informer's store: its objects by namespace and name, with the key read from each object
//! instead of copied beside it. With 150,000 pods a map keyed by owned names held two extra
//! strings and a key per pod (about 110 bytes each); this table holds one pointer per object.

use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;

use hashbrown::HashTable;

/// Reads an object's (namespace, name); the namespace is empty for cluster-scoped objects.
pub type KeyFn<T> = for<'a> fn(&'a T) -> (&'a str, &'a str);

/// The (namespace, name) of any API object.
pub fn key_of<K: kube::Resource>(o: &K) -> (&str, &str) {
    let m = o.meta();
    (
        m.namespace.as_deref().unwrap_or_default(),
        m.name.as_deref().unwrap_or_default(),
    )
}

/// Objects by (namespace, name).
pub struct Store<T> {
    key: KeyFn<T>,
    hasher: RandomState,
    table: HashTable<Arc<T>>,
}

impl<T> Store<T> {
    /// An empty store keyed by `key`.
    pub fn new(key: KeyFn<T>) -> Self {
        Store {
            key,
            hasher: RandomState::new(),
            table: HashTable::new(),
        }
    }

    fn hash(&self, k: (&str, &str)) -> u64 {
        self.hasher.hash_one(k)
    }

    /// The object with this key.
    pub fn get(&self, namespace: &str, name: &str) -> Option<&Arc<T>> {
        let key = self.key;
        self.table.find(self.hash((namespace, name)), |o| {
            key(o) == (namespace, name)
        })
    }

    /// Inserts or replaces the object with `o`'s key.
    pub fn insert(&mut self, o: Arc<T>) {
        let (key, hasher) = (self.key, &self.hasher);
        let k = key(&o);
        let h = hasher.hash_one(k);
        match self
            .table
            .entry(h, |x| key(x) == k, |x| hasher.hash_one(key(x)))
        {
            hashbrown::hash_table::Entry::Occupied(mut e) => *e.get_mut() = o.clone(),
            hashbrown::hash_table::Entry::Vacant(e) => {
                e.insert(o.clone());
            }
        }
    }

    /// Removes the object with `o`'s key.
    pub fn remove(&mut self, o: &T) {
        let key = self.key;
        let k = key(o);
        if let Ok(e) = self.table.find_entry(self.hash(k), |x| key(x) == k) {
            e.remove();
        }
    }

    /// Replaces everything with `list`.
    pub fn replace_all(&mut self, list: &[Arc<T>]) {
        self.table = HashTable::with_capacity(list.len());
        for o in list {
            self.insert(o.clone());
        }
    }

    /// Every object, in no particular order.
    pub fn values(&self) -> impl Iterator<Item = &Arc<T>> {
        self.table.iter()
    }

    /// How many objects the store holds.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// True when the store is empty.
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    struct Obj(String, String, u32);

    fn key(o: &Obj) -> (&str, &str) {
        (&o.0, &o.1)
    }

    #[test]
    fn inserts_replaces_finds_and_removes_by_namespace_and_name() {
        let mut s = Store::new(key);
        s.insert(Arc::new(Obj("a".into(), "x".into(), 1)));
        s.insert(Arc::new(Obj("b".into(), "x".into(), 1)));
        s.insert(Arc::new(Obj("a".into(), "x".into(), 2)));
        assert_eq!(s.len(), 2);
        assert_eq!(s.get("a", "x").map(|o| o.2), Some(2));
        assert_eq!(s.get("b", "x").map(|o| o.2), Some(1));
        // (namespace, name) pairs that concatenate alike stay apart.
        assert!(s.get("", "ax").is_none() && s.get("ax", "").is_none());
        s.remove(&Obj("a".into(), "x".into(), 0));
        assert!(s.get("a", "x").is_none());
        s.replace_all(&[Arc::new(Obj("c".into(), "y".into(), 3))]);
        assert_eq!(s.values().map(|o| o.2).collect::<Vec<_>>(), vec![3]);
    }
}
