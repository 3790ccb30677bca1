//! `send` mode, the pure parts: cid encoding, the client `send`/`ack`
//! frames, parsing of the server's `accepted` / `delivered` / `msg` / `error`
//! frames, the per-sender in-flight table and compact sets of message
//! counters (used to find duplicates and messages accepted but never
//! received).
//!
//! A cid is an unsigned JSON integer `run_nonce << CID_CTR_BITS | counter`:
//! the nonce tells this run's messages apart from ones left over from an
//! earlier run (replayed by the gateway when the user reconnects), and the
//! counter numbers a sender's messages 0, 1, 2, ... Every sender has exactly
//! one partner, so (from, cid) is unique per recipient connection and the
//! counter alone identifies a message there.

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;
use std::borrow::Cow;
use std::collections::BTreeSet;
use std::fmt;
use std::io::Write;

/// Low bits of a cid: the per-sender counter.
pub const CID_CTR_BITS: u32 = 32;
/// The nonce keeps cids below 2^53 so that any JSON client reads them exactly.
pub const NONCE_BITS: u32 = 53 - CID_CTR_BITS;
/// Delay before a send answered `unavailable` is sent again (same cid), ns.
pub const RETRY_DELAY_NS: u64 = 100_000_000;

pub fn make_nonce(seed: u64) -> u64 {
    // Never 0, so a cid of a few small digits is never taken for ours.
    (seed % ((1 << NONCE_BITS) - 1)) + 1
}

pub fn encode_cid(nonce: u64, ctr: u64) -> u64 {
    debug_assert!(ctr < 1 << CID_CTR_BITS && nonce < 1 << NONCE_BITS);
    (nonce << CID_CTR_BITS) | ctr
}

/// The counter of a cid of this run (`None` for any other cid).
pub fn decode_cid(nonce: u64, cid: u64) -> Option<u64> {
    (cid >> CID_CTR_BITS == nonce).then_some(cid & ((1 << CID_CTR_BITS) - 1))
}

/// Prefix of a JSON string literal of the user prefix: `"` + escaped prefix
/// (no closing quote), so `to` is written without allocating per send.
pub fn json_prefix(user_prefix: &str) -> Vec<u8> {
    let mut v = serde_json::to_vec(user_prefix).expect("string to JSON");
    v.pop();
    v
}

/// `{"op":"send","to":"<prefix><to_num>","cid":<cid>,"body":{"t":<t_us>}}`
pub fn write_send(out: &mut Vec<u8>, to_prefix_json: &[u8], to_num: u64, cid: u64, t_us: u64) {
    out.extend_from_slice(b"{\"op\":\"send\",\"to\":");
    out.extend_from_slice(to_prefix_json);
    let _ = write!(out, "{to_num}\",\"cid\":{cid},\"body\":{{\"t\":{t_us}}}}}");
}

/// `{"op":"read","from":"<prefix><from_num>","id":"<id>"}`: a read receipt.
pub fn write_read(out: &mut Vec<u8>, prefix_json: &[u8], from_num: u64, id: &str) {
    out.extend_from_slice(b"{\"op\":\"read\",\"from\":");
    out.extend_from_slice(prefix_json);
    let _ = write!(out, "{from_num}\",\"id\":\"{id}\"}}");
}

/// `{"op":"ack","seq":<seq>}`
pub fn write_ack(out: &mut Vec<u8>, seq: u64) {
    let _ = write!(out, "{{\"op\":\"ack\",\"seq\":{seq}}}");
}

/// `true` when `from` is `<prefix><num>`.
pub fn from_matches(from: &str, prefix: &str, num: u64) -> bool {
    from.strip_prefix(prefix)
        .and_then(|d| {
            (!d.is_empty()
                && d.bytes().all(|b| b.is_ascii_digit())
                && (d == "0" || !d.starts_with('0')))
            .then(|| d.parse::<u64>().ok())
            .flatten()
        })
        .is_some_and(|n| n == num)
}

/// A server frame, as far as `send` mode cares.
#[derive(Deserialize, Default, Debug)]
pub struct ServerFrame<'a> {
    #[serde(borrow, default)]
    pub op: Option<Cow<'a, str>>,
    /// Only unsigned integer cids are ours; anything else reads as `None`.
    #[serde(default, deserialize_with = "uint_or_none")]
    pub cid: Option<u64>,
    #[serde(default)]
    pub seq: Option<u64>,
    #[serde(borrow, default)]
    pub from: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub code: Option<Cow<'a, str>>,
    /// The message id of a `msg` or a `read`.
    #[serde(borrow, default)]
    pub id: Option<Cow<'a, str>>,
    /// `body.t` (send instant, µs since the run's time origin) when the body
    /// is an object with an unsigned integer `t`.
    #[serde(default, deserialize_with = "body_t")]
    pub body: Option<u64>,
}

pub fn parse_frame(msg: &[u8]) -> Option<ServerFrame<'_>> {
    serde_json::from_slice(msg).ok()
}

struct UintOrNone;

impl<'de> Visitor<'de> for UintOrNone {
    type Value = Option<u64>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Some(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Ok(u64::try_from(v).ok())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut s: A) -> Result<Self::Value, A::Error> {
        while s.next_element::<IgnoredAny>()?.is_some() {}
        Ok(None)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
        while m.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(None)
    }
}

fn uint_or_none<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    d.deserialize_any(UintOrNone)
}

struct BodyT;

impl<'de> Visitor<'de> for BodyT {
    type Value = Option<u64>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
        let mut t = None;
        while let Some(k) = m.next_key::<Cow<'de, str>>()? {
            if k == "t" {
                t = m.next_value_seed(UintSeed)?;
            } else {
                m.next_value::<IgnoredAny>()?;
            }
        }
        Ok(t)
    }
    // Any other body is not ours.
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut s: A) -> Result<Self::Value, A::Error> {
        while s.next_element::<IgnoredAny>()?.is_some() {}
        Ok(None)
    }
}

struct UintSeed;

impl<'de> de::DeserializeSeed<'de> for UintSeed {
    type Value = Option<u64>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(UintOrNone)
    }
}

fn body_t<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    d.deserialize_any(BodyT)
}

/// Set of counters, compact when they arrive mostly in order: everything
/// below `base` is in, plus the sparse `extra` above it.
#[derive(Default, Debug, Clone)]
pub struct CtrSet {
    base: u64,
    extra: BTreeSet<u64>,
}

impl CtrSet {
    /// Adds `x`; false when it was already there.
    pub fn insert(&mut self, x: u64) -> bool {
        if x < self.base {
            return false;
        }
        if x == self.base {
            self.base += 1;
            while self.extra.first() == Some(&self.base) {
                self.extra.pop_first();
                self.base += 1;
            }
            return true;
        }
        self.extra.insert(x)
    }

    pub fn contains(&self, x: u64) -> bool {
        x < self.base || self.extra.contains(&x)
    }

    #[allow(dead_code)] // used by tests
    pub fn len(&self) -> u64 {
        self.base + self.extra.len() as u64
    }

    /// How many members of `self` are not in `other`.
    pub fn count_not_in(&self, other: &CtrSet) -> u64 {
        // Below both bases everything is shared; only the rest is walked.
        let lo = self.base.min(other.base);
        let mut n = (lo..self.base).filter(|&x| !other.contains(x)).count() as u64;
        n += self.extra.iter().filter(|&&x| !other.contains(x)).count() as u64;
        n
    }
}

/// One send not yet accepted.
#[derive(Clone, Copy, Debug)]
pub struct Pending {
    pub ctr: u64,
    /// First send instant, ns since the run's time origin.
    pub sent_ns: u64,
    /// When to send it again after `unavailable` (0 = not scheduled).
    pub retry_at: u64,
}

/// Per-connection state of `send` mode. Heap use: at most `inflight`
/// pending entries plus the counter sets (small while traffic is in order).
#[derive(Debug)]
pub struct ChatConn {
    pub pending: Vec<Pending>,
    pub cap: usize,
    pub next_ctr: u64,
    /// Counters of this connection's sends that were accepted.
    pub accepted: CtrSet,
    /// Counters of the partner's messages received here.
    pub received: CtrSet,
    pub max_seq: u64,
    pub acked_seq: u64,
    /// A msg at or below `acked_seq` came again (a retransmit): ack again.
    pub reack: bool,
}

impl ChatConn {
    pub fn new(cap: usize) -> ChatConn {
        ChatConn {
            pending: Vec::with_capacity(cap),
            cap,
            next_ctr: 0,
            accepted: CtrSet::default(),
            received: CtrSet::default(),
            max_seq: 0,
            acked_seq: 0,
            reack: false,
        }
    }

    pub fn has_room(&self) -> bool {
        self.pending.len() < self.cap && self.next_ctr < 1 << CID_CTR_BITS
    }

    /// Takes a new counter and records its send instant.
    pub fn start(&mut self, now: u64) -> u64 {
        let ctr = self.next_ctr;
        self.next_ctr += 1;
        self.pending.push(Pending {
            ctr,
            sent_ns: now,
            retry_at: 0,
        });
        ctr
    }

    /// An `accepted` for counter `ctr`: its send instant, or `None` when it
    /// was not pending (a duplicate or unknown accepted).
    pub fn accept(&mut self, ctr: u64) -> Option<u64> {
        let i = self.pending.iter().position(|p| p.ctr == ctr)?;
        let p = self.pending.swap_remove(i);
        self.accepted.insert(ctr);
        Some(p.sent_ns)
    }

    /// Schedules a resend of `ctr` at `at`; false when it is not pending.
    pub fn schedule_retry(&mut self, ctr: u64, at: u64) -> bool {
        match self.pending.iter_mut().find(|p| p.ctr == ctr) {
            Some(p) => {
                p.retry_at = at.max(1);
                true
            }
            None => false,
        }
    }

    /// Sends due again at `now` (their schedule is cleared).
    pub fn take_due(&mut self, now: u64, out: &mut Vec<Pending>) {
        for p in self.pending.iter_mut() {
            if p.retry_at != 0 && p.retry_at <= now {
                p.retry_at = 0;
                out.push(*p);
            }
        }
    }

    /// Forget a pending send that failed for good (an error other than
    /// `unavailable`); false when it was not pending.
    pub fn abandon(&mut self, ctr: u64) -> bool {
        match self.pending.iter().position(|p| p.ctr == ctr) {
            Some(i) => {
                self.pending.swap_remove(i);
                true
            }
            None => false,
        }
    }

    pub fn retries_scheduled(&self) -> bool {
        self.pending.iter().any(|p| p.retry_at != 0)
    }

    /// A `msg` with `seq` arrived (the ack goes out after the read, see `ack_due`).
    pub fn saw_seq(&mut self, seq: u64) {
        if seq <= self.acked_seq {
            self.reack = true;
        }
        self.max_seq = self.max_seq.max(seq);
    }

    /// The cumulative ack to send now: the highest seq seen, when it was not
    /// acked yet or when an already acked msg came again.
    pub fn ack_due(&mut self) -> Option<u64> {
        let due = self.max_seq > self.acked_seq || (self.reack && self.max_seq > 0);
        self.reack = false;
        due.then(|| {
            self.acked_seq = self.max_seq;
            self.max_seq
        })
    }
}

/// What a sender's and its partner's sets say at the end of a run.
pub fn missing(sender_accepted: &CtrSet, partner_received: &CtrSet) -> u64 {
    sender_accepted.count_not_in(partner_received)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cid_roundtrip_and_foreign() {
        let n = make_nonce(0xdead_beef_1234);
        assert!(n > 0 && n < 1 << NONCE_BITS);
        let cid = encode_cid(n, 12345);
        assert!(cid < 1 << 53);
        assert_eq!(decode_cid(n, cid), Some(12345));
        assert_eq!(decode_cid(n + 1, cid), None);
        assert_eq!(decode_cid(n, 7), None);
        assert_eq!(
            decode_cid(n, encode_cid(n, (1 << 32) - 1)),
            Some((1 << 32) - 1)
        );
    }

    #[test]
    fn send_and_ack_frames() {
        let mut out = Vec::new();
        write_send(&mut out, &json_prefix("u\"x"), 17, 99, 1234);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"op":"send","to":"u\"x17","cid":99,"body":{"t":1234}})
        );
        out.clear();
        write_ack(&mut out, 42);
        assert_eq!(out, br#"{"op":"ack","seq":42}"#);
    }

    #[test]
    fn parses_server_frames() {
        let f = parse_frame(br#"{"op":"accepted","cid":4294967300,"id":"99"}"#).unwrap();
        assert_eq!(
            (f.op.as_deref(), f.cid),
            (Some("accepted"), Some(4294967300))
        );
        let f = parse_frame(br#"{"op":"delivered","cid":5,"id":"9","to":"u1"}"#).unwrap();
        assert_eq!((f.op.as_deref(), f.cid), (Some("delivered"), Some(5)));
        let f = parse_frame(
            br#"{"op":"msg","seq":3,"id":"99","from":"u\"0","cid":77,"ts":1700,"body":{"x":[1,{"t":5}],"t":4321}}"#,
        )
        .unwrap();
        assert_eq!(f.op.as_deref(), Some("msg"));
        assert_eq!((f.seq, f.cid, f.body), (Some(3), Some(77), Some(4321)));
        assert_eq!(f.from.as_deref(), Some("u\"0"));
        // Foreign msgs: string cid, non-object body.
        let f =
            parse_frame(br#"{"op":"msg","seq":1,"from":"bob","cid":"c-1","body":"hi"}"#).unwrap();
        assert_eq!((f.seq, f.cid, f.body), (Some(1), None, None));
        let f = parse_frame(br#"{"op":"msg","seq":2,"cid":{"a":1},"body":null}"#).unwrap();
        assert_eq!((f.seq, f.cid, f.body), (Some(2), None, None));
        let f = parse_frame(br#"{"op":"msg","seq":2,"cid":-1,"body":{"t":-5}}"#).unwrap();
        assert_eq!((f.cid, f.body), (None, None));
        let f =
            parse_frame(br#"{"op":"error","code":"unavailable","message":"try later","cid":12}"#)
                .unwrap();
        assert_eq!(
            (f.op.as_deref(), f.code.as_deref(), f.cid),
            (Some("error"), Some("unavailable"), Some(12))
        );
        let f = parse_frame(br#"{"op":"error","code":"bad_request","message":"x"}"#).unwrap();
        assert_eq!((f.code.as_deref(), f.cid), (Some("bad_request"), None));
        assert!(parse_frame(b"not json").is_none());
        let f = parse_frame(br#"{"op":"synced","count":0}"#).unwrap();
        assert_eq!(f.op.as_deref(), Some("synced"));
    }

    #[test]
    fn from_check() {
        assert!(from_matches("u17", "u", 17));
        assert!(from_matches("u0", "u", 0));
        assert!(!from_matches("u017", "u", 17));
        assert!(!from_matches("u18", "u", 17));
        assert!(!from_matches("v17", "u", 17));
        assert!(!from_matches("u", "u", 0));
        assert!(!from_matches("u17x", "u", 17));
    }

    #[test]
    fn ctr_set_dups_and_missing() {
        let mut s = CtrSet::default();
        assert!(s.insert(0) && s.insert(2) && s.insert(5));
        assert!(!s.insert(2) && !s.insert(0), "duplicates");
        assert!(s.insert(1));
        assert_eq!(s.base, 3, "1 closes the gap up to 2");
        assert_eq!(s.len(), 4);
        assert!(s.contains(5) && !s.contains(4) && !s.contains(3));
        let mut r = CtrSet::default();
        for x in [0, 1, 5] {
            r.insert(x);
        }
        // s = {0,1,2,5}, r = {0,1,5}: 2 is missing in r.
        assert_eq!(missing(&s, &r), 1);
        assert_eq!(r.count_not_in(&s), 0);
        let mut big = CtrSet::default();
        let mut big_r = CtrSet::default();
        for x in (0..10_000).rev() {
            big.insert(x);
            if x != 4321 {
                big_r.insert(x);
            }
        }
        assert_eq!(big.len(), 10_000);
        assert!(big.extra.is_empty());
        assert_eq!(missing(&big, &big_r), 1);
        assert_eq!(missing(&big_r, &big), 0);
    }

    #[test]
    fn latency_matching_by_cid_out_of_order() {
        let mut c = ChatConn::new(3);
        assert!(c.has_room());
        let a = c.start(100);
        let b = c.start(200);
        let d = c.start(300);
        assert_eq!((a, b, d), (0, 1, 2));
        assert!(!c.has_room());
        // Accepteds may come back in any order (different shards).
        assert_eq!(c.accept(2), Some(300));
        assert_eq!(c.accept(2), None, "second accepted for the same cid");
        assert!(c.has_room());
        assert_eq!(c.start(400), 3);
        assert_eq!(c.accept(0), Some(100));
        // unavailable: resent later with the same cid; the first instant stays.
        assert!(c.schedule_retry(1, 1000));
        assert!(!c.schedule_retry(0, 1000), "already accepted");
        let mut due = Vec::new();
        c.take_due(999, &mut due);
        assert!(due.is_empty() && c.retries_scheduled());
        c.take_due(1000, &mut due);
        assert_eq!(
            due.iter().map(|p| (p.ctr, p.sent_ns)).collect::<Vec<_>>(),
            vec![(1, 200)]
        );
        assert!(!c.retries_scheduled());
        assert_eq!(c.accept(1), Some(200));
        assert_eq!(c.accept(3), Some(400));
        assert_eq!(c.accept(7), None);
        assert_eq!(c.accepted.len(), 4);
        assert!(c.pending.is_empty());
    }

    #[test]
    fn cumulative_ack_once_per_read() {
        let mut c = ChatConn::new(1);
        assert_eq!(c.ack_due(), None);
        c.saw_seq(1);
        c.saw_seq(3);
        c.saw_seq(2);
        assert_eq!(c.ack_due(), Some(3));
        assert_eq!(c.ack_due(), None);
        c.saw_seq(2); // a retransmit below the acked seq: ack again
        assert_eq!(c.ack_due(), Some(3));
        assert_eq!(c.ack_due(), None);
        c.saw_seq(4);
        assert_eq!(c.ack_due(), Some(4));
    }
}
