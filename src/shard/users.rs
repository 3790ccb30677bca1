//! The users whose home is this shard, and which of this shard's connections each one has.
//!
//! Owned by the shard; other threads ask through the mesh (e.g. presence), never by reading
//! this map. A user with one device (the common case) costs a map entry and no other allocation.

use std::collections::HashMap;

use compact_str::CompactString;

/// Slab indices of one user's connections.
#[derive(Debug)]
enum Devices {
    One(u32),
    Many(Vec<u32>),
}

#[derive(Debug, Default)]
pub struct Users {
    map: HashMap<CompactString, Devices>,
}

impl Users {
    pub fn add(&mut self, user: &str, conn: usize) {
        let conn = conn as u32;
        match self.map.get_mut(user) {
            None => {
                self.map.insert(user.into(), Devices::One(conn));
            }
            Some(Devices::One(first)) => {
                let first = *first;
                self.map
                    .insert(user.into(), Devices::Many(vec![first, conn]));
            }
            Some(Devices::Many(list)) => list.push(conn),
        }
    }

    /// Forget one connection; the user goes once its last connection does.
    pub fn remove(&mut self, user: &str, conn: usize) {
        let conn = conn as u32;
        let gone = match self.map.get_mut(user) {
            Some(Devices::One(c)) => *c == conn,
            Some(Devices::Many(list)) => {
                list.retain(|c| *c != conn);
                if list.len() == 1 {
                    let last = list[0];
                    self.map.insert(user.into(), Devices::One(last));
                }
                false
            }
            None => false,
        };
        if gone {
            self.map.remove(user);
        }
    }

    pub fn online(&self, user: &str) -> bool {
        self.map.contains_key(user)
    }

    /// This shard's connections of `user`.
    pub fn devices(&self, user: &str) -> Vec<usize> {
        match self.map.get(user) {
            None => Vec::new(),
            Some(Devices::One(c)) => vec![*c as usize],
            Some(Devices::Many(list)) => list.iter().map(|c| *c as usize).collect(),
        }
    }

    /// Users with at least one connection.
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
        assert!(!u.online("alice"));
        u.add("alice", 3);
        u.add("alice", 9);
        u.add("bob", 4);
        assert_eq!(u.devices("alice"), vec![3, 9]);
        assert_eq!(u.len(), 2);
        u.remove("alice", 3);
        assert_eq!(u.devices("alice"), vec![9]);
        u.remove("alice", 42); // not one of hers: nothing changes
        assert!(u.online("alice"));
        u.remove("alice", 9);
        assert!(!u.online("alice"));
        assert_eq!(u.devices("alice"), Vec::<usize>::new());
        u.remove("nobody", 1);
        assert_eq!(u.len(), 1);
    }
}
