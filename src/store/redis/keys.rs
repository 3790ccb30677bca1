//! Where things live in Redis: the key and channel names (layout in the module doc).
//!
//! Every key of one user carries the hash tag `{u:<user>}` and every key of one room
//! `{r:<room>}`, so that in Redis Cluster a user's inbox, directory entry and dedup windows
//! sit in one hash slot (one script call may touch them together), and so do a room's three
//! keys. The letter before the colon keeps the tag non-empty whatever the id holds: Redis
//! hashes the text between the first `{` and the next `}`, and an id starting with `}` would
//! otherwise make an empty tag, which hashes the whole key (different slots per kind). The
//! key prefix may not hold braces (checked with the config).

use super::RedisSettings;

/// `<prefix>in:{u:<user>}`: the user's inbox stream. The batch script names the user and the
/// user's directory entry from it (`location_of`, `recipient_of` in script.lua): these two
/// shapes change together.
pub(super) fn inbox_key(prefix: &str, user: &str) -> String {
    format!("{prefix}in:{{u:{user}}}")
}

/// What each sender sent `user` that a device of it acked, as a hash sender -> highest id
/// (read receipts are checked against it after a restart or on another node).
pub(super) fn received_key(prefix: &str, user: &str) -> String {
    format!("{prefix}rcv:{{u:{user}}}")
}

/// The node runs with a connection watching `user` (`watch`): told when `user`'s directory
/// entry changes.
pub(super) fn watchers_key(prefix: &str, user: &str) -> String {
    format!("{prefix}pw:{{u:{user}}}")
}

/// `<prefix>loc:{u:<user>}`: the runs of nodes that hold a device of `user` (a set).
pub(super) fn location_key(prefix: &str, user: &str) -> String {
    format!("{prefix}loc:{{u:{user}}}")
}

/// The dedup window of what `from` sent to `to`, its current generation:
/// `<prefix>dd:<len of to>:{u:<to>}:<from>`. The older generation is the same name with
/// `dd-old:` for `dd:`; the script names it from this one, only when it exists. Per pair, in
/// the recipient's slot, so the append checks it in the same call; the length makes the name
/// exact whatever the ids hold. A cid is one message, so it has one recipient: the newest
/// 10,000 cids of a pair include every one of the sender's newest 10,000 to that recipient.
pub(super) fn dedup_key(prefix: &str, to: &str, from: &str) -> String {
    format!("{prefix}dd:{}:{{u:{to}}}:{from}", to.len())
}

/// A room's keys: `rh:` its history (a stream whose ids are `0-<offset>`), `rd:` its
/// counter (`~last`) and publish dedup (`<from>|<cid>` -> `<id> <offset>`), `rn:` the node
/// runs with members.
pub(super) fn room_keys(prefix: &str, room: &str) -> [String; 3] {
    [
        format!("{prefix}rh:{{r:{room}}}"),
        format!("{prefix}rd:{{r:{room}}}"),
        room_nodes_key(prefix, room),
    ]
}

/// `<prefix>rn:{r:<room>}`: the runs of nodes with members of `room` (a set).
pub(super) fn room_nodes_key(prefix: &str, room: &str) -> String {
    format!("{prefix}rn:{{r:{room}}}")
}

/// `<prefix>node:<run>`: a node run's lease (exists while the node is alive).
pub(super) fn lease_key(prefix: &str, run: &str) -> String {
    format!("{prefix}node:{run}")
}

/// `<prefix>ids`: the message id slots, slot -> `<run>/<shard> <expiry ms>` (a hash; at most
/// `ID_SLOTS` fields, a slot's field is reused once it expired).
pub(super) fn id_slots_key(prefix: &str) -> String {
    format!("{prefix}ids")
}

/// `<prefix>ch:<run>`: the pub/sub channel a node run listens on.
pub fn channel_name(settings: &RedisSettings) -> String {
    format!("{}ch:{}", settings.key_prefix, settings.node)
}

/// The Redis Cluster hash slot of `key`.
pub(super) fn slot(key: &str) -> u16 {
    fred::util::redis_keyslot(key.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The current and the older generation, the older named as the script names it.
    fn dedup_keys(prefix: &str, to: &str, from: &str) -> (String, String) {
        let current = dedup_key(prefix, to, from);
        let older = format!("{prefix}dd-old:{}", &current[prefix.len() + "dd:".len()..]);
        (current, older)
    }

    #[test]
    fn a_users_keys_share_one_slot_whatever_the_id_holds() {
        for user in ["bob", "}x", "a}b", "{c}", "", "ü{}}"] {
            let inbox = slot(&inbox_key("rg:", user));
            assert_eq!(slot(&location_key("rg:", user)), inbox, "{user:?}");
            let (cur, old) = dedup_keys("rg:", user, "alice}{");
            assert_eq!((slot(&cur), slot(&old)), (inbox, inbox), "{user:?}");
        }
        let [h, d, n] = room_keys("rg:", "}lobby");
        assert_eq!((slot(&d), slot(&n)), (slot(&h), slot(&h)));
    }

    #[test]
    fn dedup_key_names_are_exact_for_any_pair() {
        // Without the length, ("x}:y", "z") and ("x", "y}:z") would share one name.
        assert_ne!(dedup_keys("p:", "x}:y", "z"), dedup_keys("p:", "x", "y}:z"));
        assert_eq!(
            dedup_keys("rg:", "bob", "alice").0,
            "rg:dd:3:{u:bob}:alice".to_string()
        );
    }
}
