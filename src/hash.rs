//! The hash maps of a shard's hot paths: [foldhash] in place of std's SipHash-1-3.
//!
//! A `send` looks up its sender, cid, recipient, mirror and inbox in some ten maps keyed by
//! short strings; with SipHash that was ~6% of a shard's time at send 100 x 16
//! (docs/performance.md). foldhash's `fast` hasher is several times quicker on short keys
//! and, like std's, seeded at random per process (and per map), so user ids and cids cannot
//! be chosen in advance to collide: it keeps the property SipHash was there for (no
//! precomputed flooding of one bucket), not SipHash's stronger cryptographic margin, which
//! no map here needs (every key comes from an authenticated user, who can only slow its own
//! maps and is limited by the per-user send rate).

pub type FastBuildHasher = foldhash::fast::RandomState;
pub type FastMap<K, V> = std::collections::HashMap<K, V, FastBuildHasher>;
pub type FastSet<K> = std::collections::HashSet<K, FastBuildHasher>;

/// A map from ids (user ids) to small values, for maps with one entry per online user: the
/// entries sit in a slab, each id once, and a `HashTable` holds their slab indexes (4 bytes
/// and a control byte a bucket). A `HashMap<CompactString, V>` keeps whole entries in its
/// buckets, so its empty buckets (a quarter to over half of them as it grows) cost as much as
/// full ones: for the inbox mirrors' 32-byte entries at 19,000 users, 57 bytes per user
/// against ~41 here. Lookups pay one indirection more.
#[derive(Debug)]
pub struct IdMap<V, S = FastBuildHasher> {
    hasher: S,
    /// Slab indexes of `entries`, by the hash of their id (rehashed from the ids as it grows).
    index: hashbrown::HashTable<u32>,
    entries: slab::Slab<(compact_str::CompactString, V)>,
}

impl<V, S: Default> Default for IdMap<V, S> {
    fn default() -> Self {
        IdMap {
            hasher: S::default(),
            index: hashbrown::HashTable::new(),
            entries: slab::Slab::new(),
        }
    }
}

impl<V, S> IdMap<V, S> {
    /// Room for `additional` more entries without moving them. Only the entries' slab is
    /// reserved: the index's control bytes are written when it is allocated, the entries are
    /// not touched until used (see `Shard::new` on why tables are reserved).
    pub fn reserve(&mut self, additional: usize) {
        self.entries.reserve(additional);
    }

    pub fn capacity(&self) -> usize {
        self.entries.capacity()
    }
}

impl<V, S: std::hash::BuildHasher> IdMap<V, S> {
    fn find(&self, id: &str) -> Option<usize> {
        let hash = self.hasher.hash_one(id);
        let entries = &self.entries;
        (self.index.find(hash, |&i| entries[i as usize].0 == id)).map(|&i| i as usize)
    }

    pub fn get(&self, id: &str) -> Option<&V> {
        self.find(id).map(|i| &self.entries[i].1)
    }

    pub fn get_mut(&mut self, id: &str) -> Option<&mut V> {
        self.find(id).map(|i| &mut self.entries[i].1)
    }

    pub fn contains_key(&self, id: &str) -> bool {
        self.find(id).is_some()
    }

    /// Set `id`'s value; returns the one it replaced.
    pub fn insert(&mut self, id: &str, value: V) -> Option<V> {
        if let Some(old) = self.get_mut(id) {
            return Some(std::mem::replace(old, value));
        }
        let IdMap {
            hasher,
            index,
            entries,
        } = self;
        let slot = entries.insert((id.into(), value));
        let slot = u32::try_from(slot).expect("fewer than 2^32 ids");
        index.insert_unique(hasher.hash_one(id), slot, |&i| {
            hasher.hash_one(entries[i as usize].0.as_str())
        });
        None
    }

    pub fn remove(&mut self, id: &str) -> Option<V> {
        let hash = self.hasher.hash_one(id);
        let entries = &self.entries;
        let found = self
            .index
            .find_entry(hash, |&i| entries[i as usize].0 == id);
        let (slot, _) = found.ok()?.remove();
        Some(self.entries.remove(slot as usize).1)
    }

    pub fn keys(&self) -> impl Iterator<Item = &compact_str::CompactString> {
        self.entries.iter().map(|(_, (id, _))| id)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&compact_str::CompactString, &V)> {
        self.entries.iter().map(|(_, (id, value))| (id, value))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl<V, S: std::hash::BuildHasher> std::ops::Index<&str> for IdMap<V, S> {
    type Output = V;

    fn index(&self, id: &str) -> &V {
        self.get(id).expect("no entry for this id")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::hash::BuildHasherDefault;

    /// Every id hashes alike: the map still tells them apart.
    #[derive(Default)]
    struct Collide;
    impl std::hash::Hasher for Collide {
        fn finish(&self) -> u64 {
            7
        }
        fn write(&mut self, _: &[u8]) {}
    }

    /// Random inserts, replacements and removals agree with std's map, through several
    /// growths and reused slab slots.
    fn agrees_with_a_hash_map<S: std::hash::BuildHasher + Default>(ids: u64) {
        let mut rng = crate::test_rng::Rng(5);
        let mut map = IdMap::<u64, S>::default();
        let mut model = HashMap::new();
        for step in 0..4_000u64 {
            let id = format!("user{}", rng.below(ids));
            match rng.below(3) {
                0 | 1 => assert_eq!(map.insert(&id, step), model.insert(id.clone(), step)),
                _ => assert_eq!(map.remove(&id), model.remove(&id)),
            }
            assert_eq!(map.get(&id), model.get(&id));
            assert_eq!(map.len(), model.len());
        }
        for (id, value) in &model {
            assert_eq!(map[id.as_str()], *value);
            assert!(map.contains_key(id));
        }
        let mut keys: Vec<&str> = map.keys().map(|k| k.as_str()).collect();
        keys.sort_unstable();
        let mut expected: Vec<&str> = model.keys().map(|k| k.as_str()).collect();
        expected.sort_unstable();
        assert_eq!(keys, expected);
        assert!(!map.contains_key("nobody") && map.get_mut("nobody").is_none());
    }

    /// An online user's mirror state (8 bytes) takes a 32-byte slab cell: the id's niche
    /// holds slab's vacant/occupied tag (its cell is shaped like this `Result`).
    #[test]
    fn an_entry_with_an_eight_byte_value_fits_in_32_bytes() {
        let cell = std::mem::size_of::<Result<(compact_str::CompactString, [u32; 2]), usize>>();
        assert!(cell <= 32, "{cell}");
    }

    #[test]
    fn an_id_map_agrees_with_a_hash_map() {
        agrees_with_a_hash_map::<FastBuildHasher>(500);
    }

    #[test]
    fn an_id_map_tells_ids_apart_when_every_hash_collides() {
        agrees_with_a_hash_map::<BuildHasherDefault<Collide>>(40);
    }
}
