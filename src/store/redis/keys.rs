//! Where things live in Redis: the key and channel names (layout in the module doc).

use super::RedisSettings;

/// A room's keys: `rh:` its history (a stream whose ids are `0-<offset>`), `rd:` its
/// counter (`~last`) and publish dedup (`<from>|<cid>` -> `<id> <offset>`), `rn:` the node
/// runs with members.
pub(super) fn room_keys(keys: &mut Vec<String>, p: &str, room: &str) {
    keys.push(format!("{p}rh:{room}"));
    keys.push(format!("{p}rd:{room}"));
    keys.push(format!("{p}rn:{room}"));
}

/// `<prefix>loc:<user>`: the runs of nodes that hold a device of `user` (a set).
pub(super) fn location_key(settings: &RedisSettings, user: &str) -> String {
    format!("{}loc:{user}", settings.key_prefix)
}

/// `<prefix>node:<run>`: this node run's lease (exists while the node is alive).
pub(super) fn lease_key(settings: &RedisSettings) -> String {
    format!("{}node:{}", settings.key_prefix, settings.node)
}

/// `<prefix>ch:<run>`: the pub/sub channel a node run listens on.
pub fn channel_name(settings: &RedisSettings) -> String {
    format!("{}ch:{}", settings.key_prefix, settings.node)
}
