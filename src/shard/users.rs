//! The users whose home is this shard, and which of this shard's connections each one has.
//!
//! Owned by the shard; other threads ask through the mesh (e.g. presence), never by reading
//! this table. One entry per connection with a session: its slab index, 4 bytes, found by a
//! keyed hash of its user id. The id itself is read from the connection (it lives inline there),
//! so the table keeps no copy of it and no hash: at 19,000 idle connections this is ~9 bytes
//! per connection, where a map from the id's hash to the index took ~29. Hence hashbrown's
//! `HashTable` (the table under std's `HashMap`, which does not let a map hash its entries
//! by something they point to).
//!
//! Every call that may grow the table is given `id_of`, the user of a registered connection:
//! growing rehashes every entry by its connection's id. So a connection stays in the slab, with
//! its user, for as long as it is registered here.

use crate::hash::FastBuildHasher;
use hashbrown::HashTable;
use std::hash::BuildHasher;

/// Slab indexes of a user's connections.
pub type Devices = smallvec::SmallVec<[usize; 4]>;

#[derive(Debug, Default)]
pub struct Users<S = FastBuildHasher> {
    /// Random per process, so ids cannot be chosen to collide.
    hasher: S,
    /// Slab indexes of the registered connections, by the hash of their user's id.
    conns: HashTable<u32>,
    /// Users with at least one registered connection (a metric).
    users: usize,
}

impl<S: BuildHasher> Users<S> {
    /// Register connection `conn` of `user`. Returns whether it is the user's first here.
    pub fn add<'a>(&mut self, user: &str, conn: usize, id_of: impl Fn(usize) -> &'a str) -> bool {
        let conn = u32::try_from(conn).expect("slab index below 2^32");
        let hash = self.hasher.hash_one(user);
        let first = !self.has_hashed(hash, user, &id_of);
        if first {
            self.users += 1;
        }
        let Users { hasher, conns, .. } = self;
        conns.insert_unique(hash, conn, |&c| hasher.hash_one(id_of(c as usize)));
        first
    }

    /// Forget connection `conn` of `user` (it may have left the slab already); `id_of` reads
    /// the user's other connections. Returns whether the user has none left here.
    pub fn remove<'a>(
        &mut self,
        user: &str,
        conn: usize,
        id_of: impl Fn(usize) -> &'a str,
    ) -> bool {
        let hash = self.hasher.hash_one(user);
        let found = self.conns.find_entry(hash, |&c| c as usize == conn);
        let registered = found.map(|entry| entry.remove()).is_ok();
        let none_left = !self.has_hashed(hash, user, &id_of);
        if registered && none_left {
            self.users -= 1;
        }
        none_left
    }

    /// The registered connections of `user`, in slab order (not the table's, which follows
    /// the per-process hash: the simulation replays a seed only if the order is the same).
    /// Inline up to four: asked per message delivered, it allocates nothing for a user's few
    /// devices.
    pub fn devices<'a>(&self, user: &str, id_of: impl Fn(usize) -> &'a str) -> Devices {
        let hash = self.hasher.hash_one(user);
        let mut devices: Devices = (self.conns.iter_hash(hash))
            .map(|&c| c as usize)
            .filter(|&c| id_of(c) == user)
            .collect();
        devices.sort_unstable();
        devices
    }

    /// `user` has a registered connection (as `devices`, without the list).
    pub fn has<'a>(&self, user: &str, id_of: impl Fn(usize) -> &'a str) -> bool {
        self.has_hashed(self.hasher.hash_one(user), user, &id_of)
    }

    fn has_hashed<'a>(&self, hash: u64, user: &str, id_of: &impl Fn(usize) -> &'a str) -> bool {
        (self.conns.iter_hash(hash)).any(|&c| id_of(c as usize) == user)
    }

    /// Users with at least one registered connection.
    pub fn len(&self) -> usize {
        self.users
    }

    pub fn is_empty(&self) -> bool {
        self.users == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::hash::BuildHasherDefault;

    /// Connections' users, as the slab would give them.
    struct Slab(HashMap<usize, &'static str>);

    impl Slab {
        fn id(&self) -> impl Fn(usize) -> &'static str + '_ {
            |c| self.0[&c]
        }
    }

    fn devices_come_and_go<S: BuildHasher>(mut u: Users<S>) {
        let mut slab = Slab(HashMap::new());
        let mut add = |u: &mut Users<S>, user, conn| {
            slab.0.insert(conn, user);
            let slab = Slab(slab.0.clone());
            u.add(user, conn, slab.id());
            slab
        };
        assert!(u.devices("alice", |_| unreachable!()).is_empty());
        add(&mut u, "alice", 9);
        add(&mut u, "alice", 3);
        let slab = add(&mut u, "bob", 4);
        assert_eq!(
            u.devices("alice", slab.id()).as_slice(),
            [3, 9],
            "slab order"
        );
        assert_eq!(u.len(), 2);
        u.remove("alice", 3, slab.id());
        assert_eq!(u.devices("alice", slab.id()).as_slice(), [9]);
        u.remove("alice", 42, slab.id()); // not one of hers: nothing changes
        u.remove("nobody", 1, slab.id());
        assert_eq!(u.devices("alice", slab.id()).as_slice(), [9]);
        assert_eq!(u.len(), 2);
        u.remove("alice", 9, slab.id());
        assert!(u.devices("alice", slab.id()).is_empty());
        assert_eq!(u.len(), 1);
        // Enough users to grow the table several times: each rehash reads ids from the slab.
        let names: Vec<&'static str> = (0..200)
            .map(|i| &*Box::leak(format!("user{i}").into_boxed_str()))
            .collect();
        let mut slab = slab;
        for (i, name) in names.iter().enumerate() {
            slab = add(&mut u, name, 100 + i);
        }
        assert_eq!(u.len(), 201);
        for (i, name) in names.iter().enumerate() {
            assert_eq!(u.devices(name, slab.id()).as_slice(), [100 + i], "{name}");
        }
        assert_eq!(u.devices("bob", slab.id()).as_slice(), [4]);
    }

    #[test]
    fn devices_come_and_go_by_user() {
        devices_come_and_go(Users::<FastBuildHasher>::default());
    }

    /// Every id hashes alike: each user still sees only its own connections.
    #[derive(Default)]
    struct Collide;
    impl std::hash::Hasher for Collide {
        fn finish(&self) -> u64 {
            7
        }
        fn write(&mut self, _: &[u8]) {}
    }

    #[test]
    fn ids_sharing_a_hash_never_see_each_others_connections() {
        devices_come_and_go(Users::<BuildHasherDefault<Collide>>::default());
    }
}
