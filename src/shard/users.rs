//! The users whose home is this shard, and which of this shard's connections each one has.
//!
//! Owned by the shard; other threads ask through the mesh (e.g. presence), never by reading
//! this map. Keyed by a 64-bit keyed hash of the user id, not the id itself: the id already
//! lives inline in each connection, so a slot needs no copy of it (8-byte key instead of a
//! 24-byte inline string). Two ids may share a hash, so what this returns are *candidates*: the
//! shard keeps only the connections whose user is exactly the one asked for
//! (`Shard::devices_of`).

use crate::hash::FastMap;
use std::hash::BuildHasher;

use slab::Slab;

/// Slab indexes of a user's connections.
pub type Devices = smallvec::SmallVec<[usize; 4]>;

/// Marks a map value as an index into `Users::many` rather than a connection's slab index.
const MANY: u32 = 1 << 31;

#[derive(Debug, Default)]
pub struct Users {
    /// Random per process, so ids cannot be chosen to collide.
    hasher: foldhash::fast::RandomState,
    /// Hash of a user id -> the slab index of its one connection here, or `MANY | i` for the
    /// list `many[i]`. A plain u32 value keeps a slot at 16 bytes: at 1,000,000 idle
    /// connections this map is most of the registry's memory (an enum with an inline `Vec`
    /// made each slot 40 bytes).
    map: FastMap<u64, u32>,
    /// Connection lists of the hashes with several connections (a user's devices; rare).
    many: Slab<Vec<u32>>,
}

impl Users {
    fn key(&self, user: &str) -> u64 {
        self.hasher.hash_one(user)
    }

    pub fn add(&mut self, user: &str, conn: usize) {
        let conn = u32::try_from(conn).expect("slab index below 2^31");
        debug_assert!(conn & MANY == 0);
        let key = self.key(user);
        match self.map.get_mut(&key) {
            None => {
                self.map.insert(key, conn);
            }
            Some(v) if *v & MANY == 0 => {
                let list = self.many.insert(vec![*v, conn]) as u32;
                *v = MANY | list;
            }
            Some(v) => self.many[(*v & !MANY) as usize].push(conn),
        }
    }

    /// Forget one connection; the key goes once its last connection does.
    pub fn remove(&mut self, user: &str, conn: usize) {
        let conn = conn as u32;
        let key = self.key(user);
        let Some(v) = self.map.get_mut(&key) else {
            return;
        };
        if *v & MANY == 0 {
            if *v == conn {
                self.map.remove(&key);
            }
            return;
        }
        let index = (*v & !MANY) as usize;
        let list = &mut self.many[index];
        list.retain(|c| *c != conn);
        if list.len() == 1 {
            *v = list[0];
            self.many.remove(index);
        }
    }

    /// Candidate connections of `user` (the shard checks each connection's user). Inline up
    /// to four: asked per message delivered, it allocates nothing for a user's few devices.
    pub fn candidates(&self, user: &str) -> Devices {
        match self.map.get(&self.key(user)) {
            None => Devices::new(),
            Some(v) if *v & MANY == 0 => smallvec::smallvec![*v as usize],
            Some(v) => self.many[(*v & !MANY) as usize]
                .iter()
                .map(|c| *c as usize)
                .collect(),
        }
    }

    /// Users with at least one connection (ids sharing a hash count once: a metric only).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_come_and_go() {
        let mut u = Users::default();
        assert!(u.candidates("alice").is_empty());
        u.add("alice", 3);
        u.add("alice", 9);
        u.add("bob", 4);
        assert_eq!(u.candidates("alice").as_slice(), [3, 9]);
        assert_eq!(u.len(), 2);
        u.remove("alice", 3);
        assert_eq!(u.candidates("alice").as_slice(), [9]);
        u.remove("alice", 42); // not one of hers: nothing changes
        assert_eq!(u.candidates("alice").as_slice(), [9]);
        u.remove("alice", 9);
        assert!(u.candidates("alice").is_empty());
        u.remove("nobody", 1);
        assert_eq!(u.len(), 1);
        // Three devices, the middle one leaves, then the others: lists shrink back to one.
        for c in [5, 6, 7] {
            u.add("carol", c);
        }
        u.remove("carol", 6);
        assert_eq!(u.candidates("carol").as_slice(), [5, 7]);
        u.remove("carol", 5);
        assert_eq!(u.candidates("carol").as_slice(), [7]);
        assert!(u.many.is_empty(), "a single device needs no list");
        u.remove("carol", 7);
        assert!(u.candidates("carol").is_empty());
        assert_eq!(u.candidates("bob").as_slice(), [4]);
    }
}
