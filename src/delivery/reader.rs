//! The recipient's side of direct delivery, as a machine: one [`Reader`] per device
//! connection on the user's home shard. It replays the user's inbox through the connection's
//! window (own seq, cumulative acks, retransmit with backoff, expiry), says `synced` once the
//! first replay caught up, and serves a big inbox as a `summary`, then `fetch`es, then a
//! `replay` that steps over what `fetch` sent. No sockets, no clock, no metrics: the time comes
//! with each input, the inbox is read through a shared reference, and what to write, what was
//! acked and what to refuse come back for the shard (`shard/deliver.rs`) to perform, in order.
//! Removing acked entries from the inbox is the shard's: the first device's ack wins. Every
//! other device of the user that had not been sent the entry yet is *owed* it
//! ([`Reader::owe`]): it gets it in inbox order like an entry still there, so each connected
//! device gets every message (SPEC section 2), whichever device acks first.
//!
//! Memory: an idle connection holds 16 bytes inline (its last seq and whether it synced); the
//! rest ([`Flight`]) is a box that exists only while `msg` frames are in flight, a summary is
//! pending or the first replay has not caught up.

use std::collections::{BTreeMap, BTreeSet};

use crate::hash::FastMap;
use std::fmt;
use std::rc::Rc;

use compact_str::CompactString;

use crate::delivery::{AckError, Window, WindowConfig, WindowState};
use crate::proto;
use crate::store::memory::SenderSummary;
use crate::store::{Inbox, InboxSeq, MemoryInbox, StoredMessage};

/// One in-flight `msg`: its inbox position and content (for retransmits).
pub type Sent = (InboxSeq, Rc<StoredMessage>);

/// Entries `fetch` looks at per inbox read.
const FETCH_PAGE: usize = 256;

/// One connection's delivery state; see the module documentation.
pub struct Reader(State);

enum State {
    /// Nothing in flight: all this connection was given has left the inbox (the first ack
    /// removes an entry), so reading the inbox from the start again yields exactly what it has
    /// not seen.
    Idle {
        /// Last `msg` seq sent on this connection (seq never restarts on a connection).
        last_seq: u64,
        /// The inbox replay reached its end once and `synced` was sent.
        synced: bool,
    },
    Busy(Box<Flight>),
}

// The inline part of a connection's delivery state is what every idle connection pays.
const _: () = assert!(std::mem::size_of::<Reader>() == 16);

/// A connection's delivery state while `msg` frames are in flight (or before `synced`).
struct Flight {
    /// In-flight `msg` frames.
    window: Window<Sent>,
    /// Last inbox entry pushed into the window.
    cursor: InboxSeq,
    /// Entries replayed before `synced` (the count `synced` reports).
    replayed: u64,
    /// A big inbox at connect: its `summary` was sent and the replay waits for `replay`;
    /// meanwhile `fetch` reads one sender at a time (per sender: the last entry looked at).
    summary: Option<FastMap<CompactString, InboxSeq>>,
    /// Entries `fetch` sent that are not acked yet: the replay steps over them.
    fetched: BTreeSet<InboxSeq>,
    /// Entries another device acked (so they left the inbox) before this one was sent them:
    /// sent in inbox order among the entries still there.
    owed: BTreeMap<InboxSeq, Rc<StoredMessage>>,
    synced: bool,
}

/// What the shard writes to the connection, in this order.
#[derive(Debug, PartialEq)]
pub enum Write {
    /// A `msg` frame newly in the window; `replayed`: part of the replay before `synced`.
    Msg {
        seq: u64,
        msg: Rc<StoredMessage>,
        replayed: bool,
    },
    /// A big inbox: per sender, what waits (instead of the replay).
    Summary(Vec<SenderSummary>),
    /// The replay caught up, after `replayed` messages.
    Synced { replayed: u64 },
    /// The end of a `fetch` of `from`: `count` messages sent, `more` waiting.
    Fetched {
        from: CompactString,
        count: usize,
        more: bool,
    },
}

/// What the connection's deadline brought.
#[derive(Debug, Default, PartialEq)]
pub struct Polled {
    /// `msg` frames to write again (same seq, same bytes).
    pub resend: Vec<(u64, Rc<StoredMessage>)>,
    /// The client used up a message's retransmits: close it. How many messages were in flight
    /// (they stay in the inbox: the user's next connection replays them).
    pub expired: Option<usize>,
}

/// A frame that is well formed but wrong here (the shard answers `bad_request`).
#[derive(Debug, PartialEq)]
pub enum Refusal {
    AckAhead { upto: u64, last: u64 },
    FetchWithoutSummary,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::AckAhead { upto, last } => write!(
                f,
                "ack {upto} is beyond the last seq sent on this connection ({last})"
            ),
            Refusal::FetchWithoutSummary => {
                f.write_str("`fetch` follows a `summary` (and comes before `replay`)")
            }
        }
    }
}

/// The user's inbox, as a pump or a fetch reads it.
#[derive(Clone, Copy)]
pub struct InboxView<'a> {
    pub inbox: &'a MemoryInbox,
    pub user: &'a str,
}

impl Default for Reader {
    fn default() -> Self {
        Reader(State::Idle {
            last_seq: 0,
            synced: false,
        })
    }
}

impl Flight {
    fn resume(cfg: WindowConfig, last_seq: u64, synced: bool) -> Box<Self> {
        Box::new(Flight {
            window: Window::resume(cfg, last_seq),
            cursor: 0,
            replayed: 0,
            summary: None,
            fetched: BTreeSet::new(),
            owed: BTreeMap::new(),
            synced,
        })
    }
}

impl Reader {
    /// `synced` was sent.
    pub fn synced(&self) -> bool {
        match &self.0 {
            State::Idle { synced, .. } => *synced,
            State::Busy(f) => f.synced,
        }
    }

    #[cfg(test)]
    fn last_seq(&self) -> u64 {
        match &self.0 {
            State::Idle { last_seq, .. } => *last_seq,
            State::Busy(f) => f.window.last_seq(),
        }
    }

    fn flight(&self) -> Option<&Flight> {
        match &self.0 {
            State::Idle { .. } => None,
            State::Busy(f) => Some(f),
        }
    }

    fn flight_mut(&mut self) -> Option<&mut Flight> {
        match &mut self.0 {
            State::Idle { .. } => None,
            State::Busy(f) => Some(f),
        }
    }

    /// The flight, begun now if there is none.
    fn begin(&mut self, cfg: WindowConfig) -> &mut Flight {
        if let State::Idle { last_seq, synced } = self.0 {
            self.0 = State::Busy(Flight::resume(cfg, last_seq, synced));
        }
        self.flight_mut().expect("begun above")
    }

    /// When the next retransmit or expiry is due.
    pub fn next_deadline(&self) -> Option<u64> {
        self.flight().and_then(|f| f.window.next_deadline())
    }

    /// `msg` frames sent and not yet acked.
    pub fn in_flight(&self) -> usize {
        self.flight().map_or(0, |f| f.window.len())
    }

    /// Another device acked inbox entry `inbox_seq` first, so it left the inbox: unless this
    /// connection has it in flight already, it is sent the entry anyway, in its inbox order
    /// (the shard pumps after). Returns how many entries this connection is owed now.
    pub fn owe(&mut self, cfg: WindowConfig, inbox_seq: InboxSeq, msg: Rc<StoredMessage>) -> usize {
        // In flight, or the replay passed it (it was sent, and acked if not in flight).
        let has_it = self.flight().is_some_and(|f| {
            f.cursor >= inbox_seq || f.window.in_flight().any(|(s, _)| *s == inbox_seq)
        });
        if has_it {
            return self.owed();
        }
        let f = self.begin(cfg);
        f.owed.insert(inbox_seq, msg);
        f.owed.len()
    }

    /// Inbox entry `inbox_seq` entered the inbox below this connection's cursor, never sent
    /// on it (a live entry's position passed it: `InboxMirror::live_high`): the replay, which
    /// only reads past the cursor, would step over it for good, so it is owed, sent in inbox
    /// order like an entry another device acked. An idle connection reads the inbox from the
    /// start again and a cursor below it gets to it: neither is owed it. Returns how many
    /// entries this connection is owed now.
    pub fn owe_passed(&mut self, inbox_seq: InboxSeq, msg: Rc<StoredMessage>) -> usize {
        if let Some(f) = self.flight_mut() {
            // Big-inbox mode: a `fetch` of its sender that looked past it looks again from
            // it (the replay, still at the start, reads it anyway).
            let looked_at = f.summary.as_mut().and_then(|c| c.get_mut(&msg.from));
            if let Some(looked_at) = looked_at.filter(|at| **at >= inbox_seq) {
                *looked_at = inbox_seq.saturating_sub(1);
            }
            let has_it = f.window.in_flight().any(|(s, _)| *s == inbox_seq);
            if f.cursor >= inbox_seq && !has_it && !f.fetched.contains(&inbox_seq) {
                f.owed.insert(inbox_seq, msg);
            }
        }
        self.owed()
    }

    /// The furthest inbox position this connection was sent or is owed (0 when idle: it
    /// reads the inbox from the start again). An entry placed for it later must go past it.
    pub fn furthest(&self) -> InboxSeq {
        let Some(f) = self.flight() else {
            return 0;
        };
        let fetched = f.summary.iter().flat_map(|by_sender| by_sender.values());
        let owed = f.owed.last_key_value().map(|(seq, _)| seq);
        (fetched.chain(owed).chain(f.fetched.last()))
            .fold(f.cursor, |furthest, seq| furthest.max(*seq))
    }

    /// Entries owed to this connection (see [`Reader::owe`]).
    pub fn owed(&self) -> usize {
        self.flight().map_or(0, |f| f.owed.len())
    }

    /// `ack seq`: the entries it acknowledged, in order (the shard removes them from the inbox
    /// and reports `delivered`; then it pumps). Everything acked and the first replay done:
    /// the flight ends.
    pub fn ack(&mut self, seq: u64) -> Result<Vec<Sent>, Refusal> {
        let mut acked = Vec::new();
        let result = match &mut self.0 {
            State::Busy(f) => f.window.ack_with(seq, |_, item| acked.push(item)),
            State::Idle { last_seq, .. } if seq <= *last_seq => Ok(0),
            State::Idle { last_seq, .. } => Err(AckError::Ahead {
                upto: seq,
                last: *last_seq,
            }),
        };
        if let Some(f) = self.flight_mut().filter(|f| !f.fetched.is_empty()) {
            for (inbox_seq, _) in &acked {
                f.fetched.remove(inbox_seq);
            }
        }
        if let State::Busy(f) = &self.0 {
            if f.synced && f.window.is_empty() && f.owed.is_empty() {
                self.0 = State::Idle {
                    last_seq: f.window.last_seq(),
                    synced: true,
                };
            }
        }
        match result {
            Err(AckError::Ahead { upto, last }) => Err(Refusal::AckAhead { upto, last }),
            Ok(_) => Ok(acked),
        }
    }

    /// Fill the window from the inbox; `synced` once the replay has caught up. A big inbox
    /// (more than `summary_over` entries, for a client that wants a summary) at connect gets a
    /// `summary` instead, and the replay waits for [`Reader::replay`]. What to write is
    /// appended to `out`; true when the window filled before the inbox's end.
    pub fn pump(
        &mut self,
        cfg: WindowConfig,
        from: InboxView<'_>,
        summary_over: Option<usize>,
        now: u64,
        out: &mut Vec<Write>,
    ) -> bool {
        let InboxView { inbox, user } = from;
        let big = summary_over.is_some_and(|over| inbox.len(user) > over);
        // Nothing sent yet: idle before the first pump, or owed entries already (another
        // device acked while this one waited for its first pump).
        let first = match &self.0 {
            State::Idle { synced, .. } => !synced,
            State::Busy(f) => !f.synced && f.summary.is_none() && f.window.last_seq() == 0,
        };
        if big && first {
            out.push(Write::Summary(inbox.summarize(user, now)));
            self.begin(cfg).summary = Some(FastMap::default());
            return false;
        }
        if self.flight().is_some_and(|f| f.summary.is_some()) {
            return false; // the replay waits for `replay` (see `fetch`)
        }
        let mut caught_up = false;
        loop {
            let (cursor, room) = match self.flight() {
                Some(f) => (f.cursor, cfg.capacity as usize - f.window.len()),
                None => (0, cfg.capacity as usize),
            };
            if room == 0 {
                break;
            }
            let read = inbox.read(user, cursor, room, now);
            let owed = self.flight_mut().map(|f| &mut f.owed);
            let (batch, inbox_done) = merge_owed(read, room, owed);
            caught_up = inbox_done && self.flight().is_none_or(|f| f.owed.is_empty());
            if !batch.is_empty() {
                let f = self.begin(cfg);
                for (inbox_seq, msg) in batch {
                    if f.fetched.contains(&inbox_seq) {
                        f.cursor = inbox_seq; // sent by `fetch`, not acked yet
                        continue;
                    }
                    let Ok(seq) = f.window.push((inbox_seq, msg.clone()), now) else {
                        unreachable!("room was checked");
                    };
                    f.cursor = f.cursor.max(inbox_seq);
                    if !f.synced {
                        f.replayed += 1;
                    }
                    out.push(Write::Msg {
                        seq,
                        msg,
                        replayed: !f.synced,
                    });
                }
            }
            if caught_up {
                break;
            }
        }
        if caught_up && !self.synced() {
            let replayed = match &mut self.0 {
                State::Idle { synced, .. } => {
                    *synced = true;
                    0
                }
                State::Busy(f) => {
                    f.synced = true;
                    f.replayed
                }
            };
            out.push(Write::Synced { replayed });
        }
        !caught_up
    }

    /// `fetch` (after a `summary`): the next `limit` waiting messages of `sender` (at most the
    /// window's room), as `msg` frames through the window like a replay's, then `fetched`
    /// (appended to `out`).
    pub fn fetch(
        &mut self,
        sender: CompactString,
        limit: u32,
        from: InboxView<'_>,
        now: u64,
        out: &mut Vec<Write>,
    ) -> Result<(), Refusal> {
        let InboxView { inbox, user } = from;
        let Some(f) = self.flight_mut().filter(|f| f.summary.is_some()) else {
            return Err(Refusal::FetchWithoutSummary);
        };
        let cursors = f.summary.as_mut().expect("filtered above");
        let capacity = f.window.config().capacity as usize;
        let want = (limit as usize).min(capacity - f.window.len());
        let mut looked_at = cursors.get(&sender).copied().unwrap_or(0);
        let mut found = Vec::new();
        let mut at_end = false;
        'scan: while found.len() < want {
            let page = inbox.read(user, looked_at, FETCH_PAGE, now);
            if page.is_empty() {
                at_end = true;
                break;
            }
            for (inbox_seq, msg) in page {
                looked_at = inbox_seq;
                let theirs = msg.from == sender && proto::receipt_sender(&msg.cid).is_none();
                if theirs && !f.fetched.contains(&inbox_seq) {
                    found.push((inbox_seq, msg));
                    if found.len() == want {
                        break 'scan;
                    }
                }
            }
        }
        // What other devices acked of this sender's, merged in inbox order (within what the
        // scan covered: entries past it come with a later fetch).
        let bound = if at_end { InboxSeq::MAX } else { looked_at };
        let owed: Vec<InboxSeq> = f
            .owed
            .range(..=bound)
            .filter(|(_, m)| m.from == sender && proto::receipt_sender(&m.cid).is_none())
            .map(|(s, _)| *s)
            .collect();
        let mut found: Vec<(InboxSeq, Rc<StoredMessage>, bool)> = found
            .into_iter()
            .map(|(s, m)| (s, Rc::new(m), false))
            .chain(owed.iter().map(|s| (*s, f.owed[s].clone(), true)))
            .collect();
        found.sort_unstable_by_key(|(s, ..)| *s);
        let left_out = found.len() > want;
        if left_out {
            // The first inbox entry left out is looked at again by the next fetch.
            if let Some((s, ..)) = found[want..].iter().find(|(.., was_owed)| !was_owed) {
                looked_at = looked_at.min(s - 1);
            }
            found.truncate(want);
        }
        cursors.insert(sender.clone(), looked_at);
        let count = found.len();
        for (inbox_seq, msg, was_owed) in found {
            let Ok(seq) = f.window.push((inbox_seq, msg.clone()), now) else {
                unreachable!("room was checked");
            };
            match was_owed {
                true => drop(f.owed.remove(&inbox_seq)),
                false => drop(f.fetched.insert(inbox_seq)),
            }
            out.push(Write::Msg {
                seq,
                msg,
                replayed: false,
            });
        }
        out.push(Write::Fetched {
            from: sender,
            count,
            more: !at_end || left_out,
        });
        Ok(())
    }

    /// `replay` (after a `summary`): true when the replay starts now (the shard pumps: what
    /// `fetch` sent and was not acked yet is stepped over). Without a summary pending it does
    /// nothing.
    pub fn replay(&mut self) -> bool {
        self.flight_mut()
            .is_some_and(|f| f.summary.take().is_some())
    }

    /// The connection's deadline came: what to retransmit, or that the client is gone.
    pub fn poll(&mut self, now: u64) -> Polled {
        let mut out = Polled::default();
        let Some(f) = self.flight_mut() else {
            return out;
        };
        if f.window.next_deadline().is_none_or(|d| d > now) {
            return out;
        }
        let resend = &mut out.resend;
        let state = f
            .window
            .poll(now, |seq, (_, msg)| resend.push((seq, msg.clone())));
        if state == WindowState::Expired {
            out.expired = Some(f.window.drain().len());
        }
        out
    }
}

/// The next entries for a window with `room`: what the inbox read (`read`: entries after the
/// cursor, at most `room`) merged in inbox order with what the connection is `owed`, at most
/// `room` in all; the owed entries taken leave `owed`. Also whether the inbox has nothing
/// beyond what was taken.
fn merge_owed(
    read: Vec<(InboxSeq, StoredMessage)>,
    room: usize,
    owed: Option<&mut BTreeMap<InboxSeq, Rc<StoredMessage>>>,
) -> (Vec<Sent>, bool) {
    let inbox_done = read.len() < room;
    // Owed entries past the last one read wait: inbox entries before them are not read yet.
    let bound = match read.last() {
        Some((last, _)) if !inbox_done => *last,
        _ => InboxSeq::MAX,
    };
    let mut read = read.into_iter().map(|(s, m)| (s, Rc::new(m))).peekable();
    let Some(owed) = owed.filter(|o| !o.is_empty()) else {
        return (read.collect(), inbox_done);
    };
    let mut out = Vec::with_capacity(room);
    while out.len() < room {
        let next_owed = owed
            .first_key_value()
            .map(|(s, _)| *s)
            .filter(|s| *s <= bound);
        let take_owed = match (read.peek(), next_owed) {
            (_, None) => false,
            (None, Some(_)) => true,
            (Some((r, _)), Some(o)) => o < *r,
        };
        match take_owed {
            true => out.extend(owed.pop_first()),
            false => match read.next() {
                Some(entry) => out.push(entry),
                None => break,
            },
        }
    }
    (out, inbox_done && read.peek().is_none())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::InboxLimits;

    const T: u64 = 100;
    const T0: u64 = 1_000;

    /// A window of `capacity` with `T` for the first ack and 3 retransmits (the default).
    fn cfg(capacity: u32) -> WindowConfig {
        let mut cfg = WindowConfig::default();
        (cfg.capacity, cfg.ack_timeout_ms) = (capacity, T);
        cfg
    }

    fn inbox_of(senders: &[&str]) -> MemoryInbox {
        let mut inbox = MemoryInbox::new(InboxLimits::default());
        for (i, from) in senders.iter().enumerate() {
            let msg = StoredMessage {
                id: 100 + i as u64,
                from: (*from).into(),
                cid: format!("\"c{i}\"").into(),
                ts: 0,
                body: "{}".into(),
                msg_type: None,
            };
            inbox.append("bob", msg, 0).unwrap();
        }
        inbox
    }

    fn view(inbox: &MemoryInbox) -> InboxView<'_> {
        InboxView { inbox, user: "bob" }
    }

    /// A pump of bob's inbox at `T0`: what to write, and whether the window filled.
    fn pump(
        r: &mut Reader,
        c: WindowConfig,
        inbox: &MemoryInbox,
        over: Option<usize>,
    ) -> (Vec<Write>, bool) {
        let mut out = Vec::new();
        let full = r.pump(c, view(inbox), over, T0, &mut out);
        (out, full)
    }

    fn fetch(
        r: &mut Reader,
        sender: &str,
        limit: u32,
        inbox: &MemoryInbox,
    ) -> Result<Vec<Write>, Refusal> {
        let mut out = Vec::new();
        r.fetch(sender.into(), limit, view(inbox), T0, &mut out)?;
        Ok(out)
    }

    /// The writes as (kind, seq or count, message id).
    fn brief(writes: &[Write]) -> Vec<(&'static str, u64, u64)> {
        writes
            .iter()
            .map(|w| match w {
                Write::Msg { seq, msg, replayed } => {
                    (if *replayed { "replay" } else { "msg" }, *seq, msg.id)
                }
                Write::Summary(s) => ("summary", s.len() as u64, 0),
                Write::Synced { replayed } => ("synced", *replayed, 0),
                Write::Fetched { count, more, .. } => ("fetched", *count as u64, u64::from(*more)),
            })
            .collect()
    }

    fn ids(acked: &[Sent]) -> Vec<u64> {
        acked.iter().map(|(_, m)| m.id).collect()
    }

    /// Remove what an ack released, as the shard does.
    fn remove(inbox: &mut MemoryInbox, acked: &[Sent]) {
        for (inbox_seq, _) in acked {
            assert!(inbox.remove("bob", *inbox_seq));
        }
    }

    #[test]
    fn the_replay_fills_the_window_then_syncs_once_caught_up() {
        let mut inbox = inbox_of(&["a", "a", "b"]);
        let mut r = Reader::default();
        let p = pump(&mut r, cfg(2), &inbox, None);
        assert_eq!(brief(&p.0), [("replay", 1, 100), ("replay", 2, 101)]);
        assert!(p.1);
        assert!(!r.synced());
        let acked = r.ack(2).unwrap();
        remove(&mut inbox, &acked);
        let p = pump(&mut r, cfg(2), &inbox, None);
        assert_eq!(brief(&p.0), [("replay", 3, 102), ("synced", 3, 0)]);
        assert!(!p.1);
        assert!(r.synced());
        // Once synced, new entries are plain messages and nothing syncs again.
        let acked = r.ack(3).unwrap();
        remove(&mut inbox, &acked);
        assert_eq!(r.in_flight(), 0);
        let p = pump(&mut r, cfg(2), &inbox, None);
        assert_eq!(p, (vec![], false));
    }

    #[test]
    fn an_empty_inbox_syncs_at_once_and_an_idle_reader_holds_no_flight() {
        let inbox = inbox_of(&[]);
        let mut r = Reader::default();
        let p = pump(&mut r, cfg(4), &inbox, Some(0));
        assert_eq!(brief(&p.0), [("synced", 0, 0)]);
        assert!(r.flight().is_none());
        assert_eq!(r.ack(0), Ok(vec![]));
    }

    #[test]
    fn acks_release_entries_in_order_and_the_flight_ends_with_the_last() {
        let mut inbox = inbox_of(&["a", "b", "c", "d"]);
        let mut r = Reader::default();
        pump(&mut r, cfg(8), &inbox, None);
        let acked = r.ack(2).unwrap();
        assert_eq!(ids(&acked), [100, 101]);
        remove(&mut inbox, &acked);
        assert_eq!(r.ack(1), Ok(vec![]), "old ack");
        assert_eq!(r.in_flight(), 2);
        assert_eq!(ids(&r.ack(4).unwrap()), [102, 103]);
        assert!(r.flight().is_none(), "idle again");
        assert_eq!(r.last_seq(), 4);
        // Seq continues on the connection after the flight ended.
        let mut inbox = inbox_of(&["e"]);
        let p = pump(&mut r, cfg(8), &inbox, None);
        assert_eq!(brief(&p.0), [("msg", 5, 100)]);
        let acked = r.ack(5).unwrap();
        remove(&mut inbox, &acked);
        assert_eq!(r.in_flight(), 0);
    }

    #[test]
    fn an_ack_ahead_is_refused_and_changes_nothing() {
        let inbox = inbox_of(&["a", "b"]);
        let mut r = Reader::default();
        assert_eq!(r.ack(1), Err(Refusal::AckAhead { upto: 1, last: 0 }));
        pump(&mut r, cfg(8), &inbox, None);
        let refused = r.ack(3).unwrap_err();
        assert_eq!(refused, Refusal::AckAhead { upto: 3, last: 2 });
        assert_eq!(
            refused.to_string(),
            "ack 3 is beyond the last seq sent on this connection (2)"
        );
        assert_eq!(r.in_flight(), 2);
        assert_eq!(ids(&r.ack(2).unwrap()), [100, 101]);
        // Idle, the last seq still bounds what may be acked.
        assert_eq!(r.ack(2), Ok(vec![]));
        assert_eq!(r.ack(3), Err(Refusal::AckAhead { upto: 3, last: 2 }));
    }

    #[test]
    fn retransmits_back_off_then_the_connection_expires() {
        let inbox = inbox_of(&["a"]);
        let mut r = Reader::default();
        pump(&mut r, cfg(8), &inbox, None);
        assert_eq!(r.next_deadline(), Some(T0 + T));
        assert_eq!(r.poll(T0 + T - 1), Polled::default());
        // Retransmits at T0+T, T0+3T and T0+7T (3 max), expiry at T0+15T.
        for at in [T0 + T, T0 + 3 * T, T0 + 7 * T] {
            let p = r.poll(at);
            assert_eq!(p.resend.len(), 1, "at {at}");
            assert_eq!((p.resend[0].0, p.resend[0].1.id), (1, 100));
            assert_eq!(p.expired, None);
        }
        assert_eq!(r.next_deadline(), Some(T0 + 15 * T));
        assert_eq!(r.poll(T0 + 15 * T - 1), Polled::default());
        let p = r.poll(T0 + 15 * T);
        assert_eq!((p.resend.len(), p.expired), (0, Some(1)));
        assert_eq!((r.in_flight(), r.next_deadline()), (0, None));
    }

    /// SPEC section 2: each connected device gets every message. Two devices of bob: the
    /// laptop (window 8) acks everything at once; the phone (window 2) has sent it only the
    /// first two. The laptop's acks remove entries 3..=5 from the inbox; the phone is owed
    /// them and gets them in inbox order among the entries still there.
    #[test]
    fn a_device_behind_its_window_gets_what_another_device_acked_first() {
        let mut inbox = inbox_of(&["a", "b", "c", "d", "e", "f"]);
        let (mut laptop, mut phone) = (Reader::default(), Reader::default());
        pump(&mut laptop, cfg(8), &inbox, None);
        let p = pump(&mut phone, cfg(2), &inbox, None);
        assert_eq!(brief(&p.0), [("replay", 1, 100), ("replay", 2, 101)]);
        // The laptop acks 1..=5 (not the sixth): first acks, so the entries leave the inbox.
        let acked = laptop.ack(5).unwrap();
        remove(&mut inbox, &acked);
        for (inbox_seq, msg) in &acked {
            phone.owe(cfg(2), *inbox_seq, msg.clone());
        }
        assert_eq!(
            phone.owed(),
            3,
            "the first two are in the phone's window already"
        );
        assert_eq!(
            pump(&mut phone, cfg(2), &inbox, None).0,
            vec![],
            "window full"
        );
        assert_eq!(ids(&phone.ack(2).unwrap()), [100, 101]); // gone from the inbox already
        let p = pump(&mut phone, cfg(2), &inbox, None);
        assert_eq!(brief(&p.0), [("replay", 3, 102), ("replay", 4, 103)]);
        phone.ack(4).unwrap();
        // The last owed entry (id 104) comes before the one still in the inbox (id 105).
        let p = pump(&mut phone, cfg(2), &inbox, None);
        assert_eq!(
            brief(&p.0),
            [("replay", 5, 104), ("replay", 6, 105), ("synced", 6, 0)]
        );
        let acked = phone.ack(6).unwrap();
        assert_eq!(ids(&acked), [104, 105]);
        assert!(phone.flight().is_none(), "nothing owed: idle again");
        // Owed what it has in flight: nothing more to send.
        let mut other = Reader::default();
        let inbox = inbox_of(&["a"]);
        pump(&mut other, cfg(2), &inbox, None);
        let (inbox_seq, msg) = inbox.read("bob", 0, 1, T0).pop().unwrap();
        assert_eq!(other.owe(cfg(2), inbox_seq, Rc::new(msg)), 0);
        // Owed what its replay passed and it acked (a reload can name an entry this device
        // acked itself): nothing to send again.
        let mut inbox = inbox_of(&["a", "b"]);
        let mut third = Reader::default();
        pump(&mut third, cfg(2), &inbox, None);
        let acked = third.ack(1).unwrap();
        remove(&mut inbox, &acked);
        let (inbox_seq, msg) = acked.into_iter().next().unwrap();
        assert_eq!(third.owe(cfg(2), inbox_seq, msg), 0);
        let p = pump(&mut third, cfg(2), &inbox, None);
        assert_eq!(brief(&p.0), [("synced", 2, 0)], "no msg again");
    }

    /// An entry enters the inbox below this device's cursor (a live entry's position passed
    /// it, `InboxMirror::live_high`): owed, it is sent next, before what lies past the
    /// cursor; a device whose cursor is below it, or an idle one, reads it in its place
    /// and is not owed it; one with it in flight already is not owed it again.
    #[test]
    fn an_entry_below_the_cursor_is_owed_only_to_a_device_that_passed_it() {
        let stored = |id: u64| StoredMessage {
            id,
            from: "a".into(),
            cid: format!("\"c{id}\"").into(),
            ts: 0,
            body: "{}".into(),
            msg_type: None,
        };
        let mut inbox = MemoryInbox::new(InboxLimits::default());
        for seq in [10, 30, 40] {
            assert!(inbox.insert_at("bob", seq, stored(seq), 0));
        }
        let (mut past, mut behind, mut idle) =
            (Reader::default(), Reader::default(), Reader::default());
        pump(&mut past, cfg(2), &inbox, None);
        pump(&mut behind, cfg(1), &inbox, None);
        // A reload reads the inbox again, with 20 in it.
        let reread = [10, 20, 30, 40].map(|seq| (seq, 0, stored(seq)));
        inbox.replace_user("bob", reread.into(), 0);
        let below = Rc::new(stored(20));
        assert_eq!(past.owe_passed(20, below.clone()), 1);
        assert_eq!(past.owe_passed(20, below.clone()), 1, "owed once");
        assert_eq!(
            past.owe_passed(10, Rc::new(stored(10))),
            1,
            "in flight already"
        );
        assert_eq!(
            behind.owe_passed(20, below.clone()),
            0,
            "its replay gets there"
        );
        assert_eq!(idle.owe_passed(20, below), 0, "reads from the start");
        // How far each was given (a live entry for bob goes past the furthest).
        let furthest = (past.furthest(), behind.furthest(), idle.furthest());
        assert_eq!(furthest, (30, 10, 0));
        let mut owed_ahead = Reader::default();
        pump(&mut owed_ahead, cfg(1), &inbox, None);
        owed_ahead.owe(cfg(1), 50, Rc::new(stored(50)));
        assert_eq!(owed_ahead.furthest(), 50, "owed past its cursor");
        past.ack(2).unwrap();
        let p = pump(&mut past, cfg(2), &inbox, None);
        assert_eq!(
            brief(&p.0),
            [("replay", 3, 20), ("replay", 4, 40), ("synced", 4, 0)]
        );
        behind.ack(1).unwrap();
        let p = pump(&mut behind, cfg(1), &inbox, None);
        assert_eq!(brief(&p.0), [("replay", 2, 20)]);
        let p = pump(&mut idle, cfg(4), &inbox, None);
        let sent: Vec<u64> = brief(&p.0).iter().map(|(_, _, id)| *id).collect();
        assert_eq!(sent, [10, 20, 30, 40]);
    }

    /// A device owed entries before its first pump (registered while its user's mirror
    /// loaded) still gets its summary (found by a review: it got the whole replay).
    #[test]
    fn a_device_owed_entries_before_its_first_pump_still_gets_its_summary() {
        let mut inbox = inbox_of(&["a", "b", "a", "b", "a"]);
        let mut laptop = Reader::default();
        pump(&mut laptop, cfg(8), &inbox, None);
        let mut phone = Reader::default();
        let acked = laptop.ack(1).unwrap();
        remove(&mut inbox, &acked);
        for (inbox_seq, msg) in &acked {
            phone.owe(cfg(8), *inbox_seq, msg.clone());
        }
        let p = pump(&mut phone, cfg(8), &inbox, Some(2));
        assert_eq!(brief(&p.0), [("summary", 2, 0)]);
        let w = fetch(&mut phone, "a", 8, &inbox).unwrap();
        assert_eq!(
            brief(&w),
            [
                ("msg", 1, 100),
                ("msg", 2, 102),
                ("msg", 3, 104),
                ("fetched", 3, 0)
            ]
        );
    }

    /// Big-inbox mode: an entry of b enters the inbox below where a `fetch` of b looked
    /// (a live entry's position passed it, `InboxMirror::live_high`): the next `fetch` of b
    /// sends it before b's later one, not the replay after it (a review's finding).
    #[test]
    fn a_fetch_looks_again_from_an_entry_that_entered_below_where_it_looked() {
        let entry = |id: u64, from: &str| StoredMessage {
            id,
            from: from.into(),
            cid: format!("\"c{id}\"").into(),
            ts: 0,
            body: "{}".into(),
            msg_type: None,
        };
        let at = [(10, "a"), (30, "a"), (40, "b"), (60, "b")];
        let mut inbox = MemoryInbox::new(InboxLimits::default());
        for (seq, from) in at {
            assert!(inbox.insert_at("bob", seq, entry(seq, from), 0));
        }
        let mut r = Reader::default();
        let p = pump(&mut r, cfg(8), &inbox, Some(2));
        assert_eq!(brief(&p.0), [("summary", 2, 0)]);
        let w = fetch(&mut r, "b", 1, &inbox).unwrap();
        assert_eq!(brief(&w), [("msg", 1, 40), ("fetched", 1, 1)]);
        let reread = [(10, "a"), (20, "b"), (30, "a"), (40, "b"), (60, "b")];
        let reread = reread.map(|(seq, from)| (seq, 0, entry(seq, from)));
        inbox.replace_user("bob", reread.into(), 0);
        assert_eq!(
            r.owe_passed(20, Rc::new(entry(20, "b"))),
            0,
            "the replay reads it"
        );
        let w = fetch(&mut r, "b", 2, &inbox).unwrap();
        assert_eq!(
            brief(&w),
            [("msg", 2, 20), ("msg", 3, 60), ("fetched", 2, 1)]
        );
    }

    /// A summary's `fetch` of a sender includes what it is owed of that sender, in inbox
    /// order; the replay then sends the rest.
    #[test]
    fn fetch_takes_owed_entries_of_its_sender_in_inbox_order() {
        // Entries 1..=4: a, b, a, a. Entry 1 and 3 are acked by another device first.
        let mut inbox = inbox_of(&["a", "b", "a", "a"]);
        let mut r = Reader::default();
        let p = pump(&mut r, cfg(8), &inbox, Some(2));
        assert_eq!(brief(&p.0), [("summary", 2, 0)]);
        for seq in [1, 3] {
            let (_, msg) = inbox.read("bob", seq - 1, 1, T0).pop().unwrap();
            assert!(inbox.remove("bob", seq));
            r.owe(cfg(8), seq, Rc::new(msg));
        }
        let w = fetch(&mut r, "a", 2, &inbox).unwrap();
        assert_eq!(
            brief(&w),
            [("msg", 1, 100), ("msg", 2, 102), ("fetched", 2, 1)]
        );
        let w = fetch(&mut r, "a", 2, &inbox).unwrap();
        assert_eq!(brief(&w), [("msg", 3, 103), ("fetched", 1, 0)]);
        assert!(r.replay());
        let p = pump(&mut r, cfg(8), &inbox, Some(2));
        assert_eq!(brief(&p.0), [("replay", 4, 101), ("synced", 1, 0)]);
    }

    #[test]
    fn summary_then_fetch_then_replay_steps_over_what_fetch_sent() {
        // Entries 1..=5: a, b, a, b, a.
        let mut inbox = inbox_of(&["a", "b", "a", "b", "a"]);
        let mut r = Reader::default();
        assert_eq!(
            fetch(&mut r, "a", 1, &inbox),
            Err(Refusal::FetchWithoutSummary)
        );
        let p = pump(&mut r, cfg(8), &inbox, Some(4));
        assert_eq!(brief(&p.0), [("summary", 2, 0)]);
        // Pumped again (an ack, a new message): the replay still waits.
        assert_eq!(pump(&mut r, cfg(8), &inbox, Some(4)), (vec![], false));
        let w = fetch(&mut r, "a", 2, &inbox).unwrap();
        assert_eq!(
            brief(&w),
            [("msg", 1, 100), ("msg", 2, 102), ("fetched", 2, 1)]
        );
        let w = fetch(&mut r, "a", 2, &inbox).unwrap();
        assert_eq!(brief(&w), [("msg", 3, 104), ("fetched", 1, 0)]);
        // The first fetched is acked (and leaves the inbox); the others are still in flight.
        let acked = r.ack(1).unwrap();
        remove(&mut inbox, &acked);
        assert!(r.replay());
        assert!(!r.replay(), "once");
        let p = pump(&mut r, cfg(8), &inbox, Some(4));
        assert_eq!(
            brief(&p.0),
            [("replay", 4, 101), ("replay", 5, 103), ("synced", 2, 0)]
        );
        assert_eq!(
            fetch(&mut r, "a", 1, &inbox),
            Err(Refusal::FetchWithoutSummary)
        );
    }
}
