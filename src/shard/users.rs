//! The users whose home is this shard, and which of this shard's connections each one has.
//!
//! Owned by the shard; other threads ask through the mesh (e.g. presence), never by reading
//! this map. Keyed by a 64-bit keyed hash of the user id, not the id itself: the id already
//! lives inline in each connection, so a slot needs no copy of it (8-byte key instead of a
//! 24-byte inline string). Two ids may share a hash, so what this returns are *candidates*: the
//! shard keeps only the connections whose user is exactly the one asked for
//! (`Shard::devices_of`).

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};

/// Slab indices of one user's connections (of every user sharing this hash, rarely several).
#[derive(Debug)]
enum Devices {
    One(u32),
    Many(Vec<u32>),
}

#[derive(Debug, Default)]
pub struct Users {
    /// Random per process, so ids cannot be chosen to collide.
    hasher: RandomState,
    map: HashMap<u64, Devices>,
}

impl Users {
    fn key(&self, user: &str) -> u64 {
        self.hasher.hash_one(user)
    }

    pub fn add(&mut self, user: &str, conn: usize) {
        let conn = conn as u32;
        let key = self.key(user);
        match self.map.get_mut(&key) {
            None => {
                self.map.insert(key, Devices::One(conn));
            }
            Some(Devices::One(first)) => {
                let first = *first;
                self.map.insert(key, Devices::Many(vec![first, conn]));
            }
            Some(Devices::Many(list)) => list.push(conn),
        }
    }

    /// Forget one connection; the key goes once its last connection does.
    pub fn remove(&mut self, user: &str, conn: usize) {
        let conn = conn as u32;
        let key = self.key(user);
        let gone = match self.map.get_mut(&key) {
            Some(Devices::One(c)) => *c == conn,
            Some(Devices::Many(list)) => {
                list.retain(|c| *c != conn);
                if list.len() == 1 {
                    let last = list[0];
                    self.map.insert(key, Devices::One(last));
                }
                false
            }
            None => false,
        };
        if gone {
            self.map.remove(&key);
        }
    }

    /// Candidate connections of `user` (the shard checks each connection's user).
    pub fn candidates(&self, user: &str) -> Vec<usize> {
        match self.map.get(&self.key(user)) {
            None => Vec::new(),
            Some(Devices::One(c)) => vec![*c as usize],
            Some(Devices::Many(list)) => list.iter().map(|c| *c as usize).collect(),
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
        assert_eq!(u.candidates("alice"), vec![3, 9]);
        assert_eq!(u.len(), 2);
        u.remove("alice", 3);
        assert_eq!(u.candidates("alice"), vec![9]);
        u.remove("alice", 42); // not one of hers: nothing changes
        assert_eq!(u.candidates("alice"), vec![9]);
        u.remove("alice", 9);
        assert!(u.candidates("alice").is_empty());
        u.remove("nobody", 1);
        assert_eq!(u.len(), 1);
    }
}
