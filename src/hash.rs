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
