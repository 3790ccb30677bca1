//! Limits per source address: new connections per second and open WebSocket connections.
//!
//! Shared by the shards (the one piece of limit state that is): with SO_REUSEPORT the kernel
//! spreads one address's connections over every shard by their ports, so a per-shard count
//! would let an address open `shards` times its limit. The table is split in stripes, each
//! behind its own mutex, touched once at accept, once at upgrade and once at close: never per
//! frame.
//!
//! An address is an IPv4 address, or the /64 prefix of an IPv6 one (a host usually owns a
//! whole /64, so per-address limits there would be no limit at all).
//!
//! Bounded: an entry exists while its address has open connections (at most
//! `max_connections` of those) or its connect bucket is not full again (a few seconds after
//! its last connect). Past [`IDLE_ENTRIES`] of the latter, full buckets are swept and then,
//! if still needed, idle entries forgotten (their next connect starts a full bucket; counted).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

use super::{Bucket, Rate};

const STRIPES: usize = 64;
/// Entries without open connections kept per table (beyond those with some).
pub const IDLE_ENTRIES: usize = 1 << 16;

/// An address as the table keys it; 0 = unknown (the connection is not limited by address).
pub type IpKey = u64;

/// IPv4 (also IPv4-mapped IPv6) in `ffff:ffff::/32` (multicast, never a TCP source), IPv6 by
/// its /64 prefix; `::/64` (loopback `::1`) becomes 1 so that 0 stays "unknown".
pub fn ip_key(addr: IpAddr) -> IpKey {
    let v6 = match addr {
        IpAddr::V4(v4) => return 0xffff_ffff_0000_0000 | u64::from(u32::from(v4)),
        IpAddr::V6(v6) => v6,
    };
    if let Some(v4) = v6.to_ipv4_mapped() {
        return ip_key(IpAddr::V4(v4));
    }
    ((u128::from(v6) >> 64) as u64).max(1)
}

#[derive(Debug, Default)]
struct Entry {
    connects: Bucket,
    open: u32,
}

/// One stripe: its entries and how many of them have no open connection.
#[derive(Debug, Default)]
struct Stripe {
    entries: HashMap<IpKey, Entry>,
    idle: usize,
}

/// What a new connection from an address was told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Connect {
    /// Too many new connections: retry after this many milliseconds.
    pub refused_for_ms: Option<u64>,
    /// Idle entries forgotten to keep the table bounded.
    pub forgotten: usize,
}

#[derive(Debug)]
pub struct IpLimits {
    connects: Option<Rate>,
    /// 0 = no limit on open connections.
    max_open: u32,
    stripes: Box<[Mutex<Stripe>]>,
}

impl IpLimits {
    pub fn new(connects: Option<Rate>, max_open: u32) -> Self {
        IpLimits {
            connects,
            max_open,
            stripes: (0..STRIPES).map(|_| Mutex::default()).collect(),
        }
    }

    fn stripe(&self, key: IpKey) -> std::sync::MutexGuard<'_, Stripe> {
        let index = (key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 58) as usize % STRIPES;
        // A poisoned stripe only means another shard panicked mid-update of a counter.
        self.stripes[index]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// A socket from `key` was accepted at `now_ms` (the shards' shared monotonic clock).
    pub fn on_connect(&self, key: IpKey, now_ms: u64) -> Connect {
        let mut told = Connect {
            refused_for_ms: None,
            forgotten: 0,
        };
        let (Some(rate), true) = (self.connects, key != 0) else {
            return told;
        };
        let now_us = now_ms * 1000;
        let mut stripe = self.stripe(key);
        if !stripe.entries.contains_key(&key) {
            told.forgotten = stripe.make_room(now_us);
            stripe.idle += 1;
        }
        let entry = stripe.entries.entry(key).or_default();
        told.refused_for_ms = entry.connects.take(now_us, rate).err();
        told
    }

    /// Milliseconds until `key` may open a new connection (0 = now).
    pub fn connect_retry_ms(&self, key: IpKey, now_ms: u64) -> u64 {
        let (Some(rate), true) = (self.connects, key != 0) else {
            return 0;
        };
        let stripe = self.stripe(key);
        let Some(entry) = stripe.entries.get(&key) else {
            return 0;
        };
        let mut bucket = entry.connects;
        match bucket.take(now_ms * 1000, rate) {
            Ok(()) => 0,
            Err(ms) => ms,
        }
    }

    /// A connection from `key` upgraded: false (and nothing counted) when the address already
    /// has `max_open` open connections.
    pub fn open(&self, key: IpKey) -> bool {
        if self.max_open == 0 || key == 0 {
            return true;
        }
        let mut stripe = self.stripe(key);
        let Stripe { entries, idle } = &mut *stripe;
        let entry = entries.entry(key).or_insert_with(|| {
            *idle += 1;
            Entry::default()
        });
        if entry.open >= self.max_open {
            return false;
        }
        if entry.open == 0 {
            *idle -= 1;
        }
        entry.open += 1;
        true
    }

    /// An upgraded connection from `key` closed (exactly once per successful [`open`]). An
    /// entry left without open connections stays while a connect rate may still need its
    /// bucket (swept later, see [`Stripe::make_room`]).
    ///
    /// [`open`]: IpLimits::open
    pub fn close(&self, key: IpKey) {
        if self.max_open == 0 || key == 0 {
            return;
        }
        let mut stripe = self.stripe(key);
        let Stripe { entries, idle } = &mut *stripe;
        let Some(entry) = entries.get_mut(&key) else {
            return;
        };
        if entry.open == 0 {
            return;
        }
        entry.open -= 1;
        if entry.open > 0 {
            return;
        }
        if self.connects.is_none() {
            entries.remove(&key);
        } else {
            *idle += 1;
        }
    }

    /// Open connections counted for `key` (for tests and the operator).
    pub fn open_count(&self, key: IpKey) -> u32 {
        self.stripe(key).entries.get(&key).map_or(0, |e| e.open)
    }

    /// Entries in the table.
    pub fn len(&self) -> usize {
        self.stripes
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).entries.len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Stripe {
    /// Make room for one more idle entry under the stripe's share of [`IDLE_ENTRIES`]: forget
    /// full buckets first and then, only if that is not enough, idle entries whatever their
    /// bucket (returned), down to half the share so that the scan is rare.
    fn make_room(&mut self, now_us: u64) -> usize {
        let cap = IDLE_ENTRIES / STRIPES;
        if self.idle < cap {
            return 0;
        }
        self.entries
            .retain(|_, e| e.open > 0 || !e.connects.is_full(now_us));
        self.idle = self.entries.values().filter(|e| e.open == 0).count();
        if self.idle < cap {
            return 0;
        }
        let mut excess = self.idle - cap / 2;
        let forgotten = excess;
        self.entries.retain(|_, e| {
            if e.open == 0 && excess > 0 {
                excess -= 1;
                return false;
            }
            true
        });
        self.idle -= forgotten;
        forgotten
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn v4(a: u8, b: u8) -> IpKey {
        ip_key(IpAddr::V4(Ipv4Addr::new(10, 0, a, b)))
    }

    #[test]
    fn ipv6_is_keyed_by_its_64_prefix_and_mapped_ipv4_as_ipv4() {
        let a: Ipv6Addr = "2001:db8:1:2::1".parse().unwrap();
        let b: Ipv6Addr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: Ipv6Addr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(ip_key(a.into()), ip_key(b.into()));
        assert_ne!(ip_key(a.into()), ip_key(c.into()));
        let mapped: Ipv6Addr = "::ffff:10.0.1.2".parse().unwrap();
        assert_eq!(ip_key(mapped.into()), v4(1, 2));
        assert_ne!(ip_key(Ipv6Addr::LOCALHOST.into()), 0);
        assert_ne!(ip_key(Ipv4Addr::UNSPECIFIED.into()), 0);
    }

    #[test]
    fn connects_are_limited_per_address() {
        let ips = IpLimits::new(Rate::new(10, 3), 0);
        for _ in 0..3 {
            assert_eq!(ips.on_connect(v4(0, 1), 5).refused_for_ms, None);
        }
        assert_eq!(ips.on_connect(v4(0, 1), 5).refused_for_ms, Some(100));
        assert_eq!(
            ips.connect_retry_ms(v4(0, 1), 45),
            60,
            "peeking takes nothing"
        );
        assert_eq!(ips.connect_retry_ms(v4(0, 1), 45), 60);
        assert_eq!(ips.on_connect(v4(0, 2), 5).refused_for_ms, None);
        assert_eq!(ips.on_connect(v4(0, 1), 105).refused_for_ms, None);
        // Unknown addresses are not limited.
        for _ in 0..10 {
            assert_eq!(ips.on_connect(0, 5).refused_for_ms, None);
        }
    }

    #[test]
    fn open_connections_are_limited_per_address_and_released_on_close() {
        let ips = IpLimits::new(None, 2);
        assert!(ips.open(v4(0, 1)));
        assert!(ips.open(v4(0, 1)));
        assert!(!ips.open(v4(0, 1)), "third open connection");
        assert!(ips.open(v4(0, 2)));
        ips.close(v4(0, 1));
        assert_eq!(ips.open_count(v4(0, 1)), 1);
        assert!(ips.open(v4(0, 1)));
        for _ in 0..2 {
            ips.close(v4(0, 1));
        }
        ips.close(v4(0, 2));
        assert!(ips.is_empty(), "no entry outlives its connections");
    }

    /// A million addresses connecting once each: the table stays at its bound, and an address
    /// with open connections is never forgotten.
    #[test]
    fn a_million_addresses_do_not_grow_the_table_past_its_bound() {
        let ips = IpLimits::new(Rate::new(1, 5), 10);
        let keeper = v4(255, 255);
        assert!(ips.open(keeper));
        let mut forgotten = 0;
        for i in 0..1_000_000u32 {
            let key = ip_key(IpAddr::V4(Ipv4Addr::from(0x0b00_0000 + i)));
            forgotten += ips.on_connect(key, 0).forgotten;
        }
        let len = ips.len();
        assert!(len <= IDLE_ENTRIES + 1, "{len} entries");
        assert!(
            forgotten >= 1_000_000 - IDLE_ENTRIES,
            "{forgotten} forgotten"
        );
        assert_eq!(ips.open_count(keeper), 1);
        // Ten seconds later every bucket is full: new addresses sweep them, forgetting none.
        let mut forgotten_later = 0;
        for i in 0..30_000u32 {
            let key = ip_key(IpAddr::V4(Ipv4Addr::from(0x0c00_0000 + i)));
            forgotten_later += ips.on_connect(key, 10_000).forgotten;
        }
        assert_eq!(forgotten_later, 0);
        assert!(ips.len() <= IDLE_ENTRIES + 1);
    }
}
