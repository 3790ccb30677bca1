//! The order in which a sender is told `accepted`.
//!
//! The recipient sees one sender's messages in store order, and the ids in `accepted`
//! increase in that order per (sender, recipient). Without faults the answers come in that
//! order too. With faults they may not: a send whose answer was lost (with a connection, or
//! because this gateway refused its attempt while another attempt of it was stored: an
//! earlier connection's, a dead node's write still in Redis's socket) is answered later, from
//! the gateway's dedup window, under the id it was stored with, after newer sends were
//! answered. A send without an answer may have been stored before another send only if it
//! was first transmitted before that send's last transmission. So the client tells an
//! `accepted` only when every send to the same recipient still without one was first
//! transmitted after this one's last transmission, and tells what it held in id order (each
//! followed by the `delivered` that came for it meanwhile). A send refused `unavailable` stays
//! unanswered (another attempt of it may be stored), and the client keeps resending it; while
//! the client is connected the gateway owes an answer to every send it was written (a write
//! in doubt is resolved, however long the store takes), so a hold lasts through a long store
//! outage or a node's death. It ends only while the client has no connection: `hold_max`
//! after the connection was lost or the earliest unanswered send to that recipient was last
//! transmitted, whichever came later (the client stopped reaching the gateway). The held
//! answers are then told sorted all the same, and from then on order is best effort. The JavaScript client has the same rule
//! (clients/js/README.md, "Order of `accepted`").
//!
//! Pure logic: time comes in as an argument, events go out as return values.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::Event;

/// An answer held back: its id, when its send was last transmitted, the `accepted` event
/// and the `delivered` events that came for it meanwhile.
struct HeldAnswer {
    id: u64,
    last_tx: u64,
    accepted: Event,
    delivered: Vec<Event>,
}

/// A send without `accepted`: when it was first and last transmitted (by count), and the
/// time of its last transmission.
#[derive(Clone, Copy)]
struct Unanswered {
    first_tx: u64,
    last_tx: u64,
    last_at: Instant,
}

#[derive(Default)]
pub(crate) struct AcceptedOrder {
    hold_max: Duration,
    /// Counts transmissions: what "before" means between sends.
    transmissions: u64,
    /// Per recipient: sends without `accepted`, by send number.
    unanswered: BTreeMap<String, BTreeMap<u64, Unanswered>>,
    /// Per recipient: the answers held.
    held: BTreeMap<String, Vec<HeldAnswer>>,
}

impl AcceptedOrder {
    pub(crate) fn new(hold_max: Duration) -> Self {
        AcceptedOrder {
            hold_max,
            ..Default::default()
        }
    }

    /// Send `n` to `to` was written to a connection (first time or again) at `now`.
    pub(crate) fn transmitted(&mut self, n: u64, to: &str, now: Instant) {
        self.transmissions += 1;
        let tx = self.transmissions;
        let send = self
            .unanswered
            .entry(to.to_string())
            .or_default()
            .entry(n)
            .or_insert(Unanswered {
                first_tx: tx,
                last_tx: tx,
                last_at: now,
            });
        send.last_tx = tx;
        send.last_at = now;
    }

    /// Send `n` to `to` was accepted with `event`: what to tell now, in order.
    pub(crate) fn accepted(&mut self, n: u64, to: &str, event: Event) -> Vec<Event> {
        let last_tx = self
            .unanswered
            .get_mut(to)
            .and_then(|sends| sends.remove(&n))
            .map_or(0, |u| u.last_tx);
        let id = match &event {
            Event::Accepted { id, .. } => id.parse().unwrap_or(u64::MAX),
            _ => u64::MAX,
        };
        self.held
            .entry(to.to_string())
            .or_default()
            .push(HeldAnswer {
                id,
                last_tx,
                accepted: event,
                delivered: Vec::new(),
            });
        self.release(to)
    }

    /// A `delivered` for `cid`: told after its `accepted` if that is held, else now.
    pub(crate) fn delivered(&mut self, cid: &str, event: Event) -> Option<Event> {
        for held in self.held.values_mut() {
            let found = held
                .iter_mut()
                .find(|a| matches!(&a.accepted, Event::Accepted { cid: c, .. } if c == cid));
            if let Some(answer) = found {
                answer.delivered.push(event);
                return None;
            }
        }
        Some(event)
    }

    /// When the hold on `to` runs out, without a connection since `lost_at`: `hold_max` after
    /// that or after the last transmission of the earliest unanswered send to `to` (the one
    /// that holds the others back), whichever came later.
    fn release_at(&self, to: &str, lost_at: Instant) -> Instant {
        let last_at = self
            .unanswered
            .get(to)
            .and_then(|sends| sends.values().min_by_key(|u| u.first_tx))
            .map_or(lost_at, |earliest| earliest.last_at.max(lost_at));
        last_at + self.hold_max
    }

    /// The earliest time a hold runs out, if any is held (never while connected: `lost_at`
    /// None).
    #[cfg(test)]
    pub(crate) fn next_release(&self, lost_at: Option<Instant>) -> Option<Instant> {
        let lost_at = lost_at?;
        self.held
            .keys()
            .map(|to| self.release_at(to, lost_at))
            .min()
    }

    /// Without a connection since `lost_at` (None: connected), release every hold that ran
    /// out by `now`, sorted (order is best effort from then on).
    pub(crate) fn expired(&mut self, now: Instant, lost_at: Option<Instant>) -> Vec<Event> {
        let Some(lost_at) = lost_at else {
            return Vec::new();
        };
        let due: Vec<String> = self
            .held
            .keys()
            .filter(|to| self.release_at(to, lost_at) <= now)
            .cloned()
            .collect();
        let mut told = Vec::new();
        for to in due {
            if let Some(mut held) = self.held.remove(&to) {
                held.sort_by_key(|a| a.id);
                told.extend(held.into_iter().flat_map(tell));
            }
        }
        told
    }

    /// Tell the held answers to `to` in id order, as far as no unanswered send may have been
    /// stored before the next one (first transmitted before that one's last transmission).
    fn release(&mut self, to: &str) -> Vec<Event> {
        let earliest_unanswered = self
            .unanswered
            .get(to)
            .and_then(|sends| sends.values().map(|u| u.first_tx).min())
            .unwrap_or(u64::MAX);
        if self.unanswered.get(to).is_some_and(|s| s.is_empty()) {
            self.unanswered.remove(to);
        }
        let Some(held) = self.held.get_mut(to) else {
            return Vec::new();
        };
        held.sort_by_key(|a| a.id);
        let free = held
            .iter()
            .take_while(|a| a.last_tx < earliest_unanswered)
            .count();
        let told: Vec<Event> = held.drain(..free).flat_map(tell).collect();
        if held.is_empty() {
            self.held.remove(to);
        }
        told
    }
}

fn tell(answer: HeldAnswer) -> Vec<Event> {
    let mut told = vec![answer.accepted];
    told.extend(answer.delivered);
    told
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accepted(cid: &str, id: u64) -> Event {
        Event::Accepted {
            cid: cid.into(),
            id: id.to_string(),
        }
    }

    fn delivered(cid: &str, id: u64) -> Event {
        Event::Delivered {
            cid: cid.into(),
            id: id.to_string(),
            to: "bob".into(),
        }
    }

    fn cids(events: &[Event]) -> Vec<String> {
        events
            .iter()
            .map(|e| match e {
                Event::Accepted { cid, .. } => format!("A{cid}"),
                Event::Delivered { cid, .. } => format!("D{cid}"),
                other => format!("{other:?}"),
            })
            .collect()
    }

    /// Sends transmitted in this order (a number may come again: a resend).
    fn order_with(transmitted: &[(u64, &str)], at: Instant) -> AcceptedOrder {
        let mut order = AcceptedOrder::new(Duration::from_secs(10));
        for (n, to) in transmitted {
            order.transmitted(*n, to, at);
        }
        order
    }

    #[test]
    fn answers_in_send_order_are_told_at_once() {
        let now = Instant::now();
        let mut order = order_with(&[(1, "bob"), (2, "bob")], now);
        assert_eq!(cids(&order.accepted(1, "bob", accepted("1", 9))), ["A1"]);
        assert_eq!(cids(&order.accepted(2, "bob", accepted("2", 10))), ["A2"]);
    }

    #[test]
    fn an_answer_waits_for_older_sends_then_all_are_told_by_id() {
        // 1's answer is late; it was stored before 2 and 3.
        let now = Instant::now();
        let mut order = order_with(&[(1, "bob"), (2, "bob"), (3, "bob")], now);
        assert!(order.accepted(2, "bob", accepted("2", 20)).is_empty());
        assert!(order.accepted(3, "bob", accepted("3", 30)).is_empty());
        let told = order.accepted(1, "bob", accepted("1", 10));
        assert_eq!(cids(&told), ["A1", "A2", "A3"]);
    }

    #[test]
    fn answers_to_resends_in_resend_order_are_told_in_store_order() {
        // 1 and 2 went out; 2 was stored (id 20), 1's attempt failed and its refusal was lost
        // with the connection. After the reconnect both are resent; 1 is stored now (id 30)
        // and answered first, 2 is answered from the dedup window.
        let now = Instant::now();
        let mut order = order_with(&[(1, "bob"), (2, "bob"), (1, "bob"), (2, "bob")], now);
        assert!(order.accepted(1, "bob", accepted("1", 30)).is_empty());
        assert_eq!(
            cids(&order.accepted(2, "bob", accepted("2", 20))),
            ["A2", "A1"]
        );
    }

    #[test]
    fn a_refused_send_still_holds_newer_answers() {
        // 1 was refused here (unavailable) while another attempt of it may have been stored
        // (a dead node's write): 2's answer waits until 1 is accepted.
        let now = Instant::now();
        let mut order = order_with(&[(1, "bob"), (2, "bob")], now);
        assert!(order.accepted(2, "bob", accepted("2", 8)).is_empty());
        order.transmitted(1, "bob", now);
        assert_eq!(
            cids(&order.accepted(1, "bob", accepted("1", 5))),
            ["A1", "A2"]
        );
    }

    #[test]
    fn sends_first_transmitted_later_do_not_hold_an_answer() {
        let now = Instant::now();
        let mut order = order_with(&[(1, "bob"), (2, "bob")], now);
        assert!(order.accepted(2, "bob", accepted("2", 8)).is_empty());
        order.transmitted(3, "bob", now);
        // 1 answered: 1 and 2 are told; 3 went out after both and holds neither.
        assert_eq!(
            cids(&order.accepted(1, "bob", accepted("1", 5))),
            ["A1", "A2"]
        );
        assert_eq!(cids(&order.accepted(3, "bob", accepted("3", 9))), ["A3"]);
    }

    #[test]
    fn held_answers_are_told_in_id_order_as_far_as_they_are_free() {
        // 2 resent after 3 was first sent: 3, unanswered, may have been stored before 2's
        // resend, so 2 waits for 3; 1 does not.
        let now = Instant::now();
        let mut order = order_with(&[(1, "bob"), (2, "bob"), (3, "bob"), (2, "bob")], now);
        assert!(order.accepted(2, "bob", accepted("2", 40)).is_empty());
        assert_eq!(cids(&order.accepted(1, "bob", accepted("1", 10))), ["A1"]);
        assert_eq!(
            cids(&order.accepted(3, "bob", accepted("3", 30))),
            ["A3", "A2"]
        );
    }

    #[test]
    fn other_recipients_are_not_held() {
        let now = Instant::now();
        let mut order = order_with(&[(1, "bob"), (2, "cat")], now);
        assert_eq!(cids(&order.accepted(2, "cat", accepted("2", 5))), ["A2"]);
        assert_eq!(cids(&order.accepted(1, "bob", accepted("1", 7))), ["A1"]);
    }

    #[test]
    fn ids_compare_as_numbers() {
        let now = Instant::now();
        let mut order = order_with(&[(1, "bob"), (2, "bob")], now);
        assert!(order.accepted(2, "bob", accepted("2", 100)).is_empty());
        assert_eq!(
            cids(&order.accepted(1, "bob", accepted("1", 99))),
            ["A1", "A2"]
        );
    }

    #[test]
    fn delivered_follows_its_held_accepted() {
        let now = Instant::now();
        let mut order = order_with(&[(1, "bob"), (2, "bob")], now);
        assert!(order.accepted(2, "bob", accepted("2", 8)).is_empty());
        assert!(order.delivered("2", delivered("2", 8)).is_none());
        assert!(order.delivered("7", delivered("7", 3)).is_some());
        let told = order.accepted(1, "bob", accepted("1", 5));
        assert_eq!(cids(&told), ["A1", "A2", "D2"]);
    }

    #[test]
    fn a_hold_lasts_while_connected_then_runs_out_hold_max_after_the_last_resend() {
        let start = Instant::now();
        let secs = |n| start + Duration::from_secs(n);
        let mut order = order_with(&[(1, "bob"), (2, "bob"), (3, "bob")], start);
        assert!(order.accepted(3, "bob", accepted("3", 30)).is_empty());
        assert!(order.accepted(2, "bob", accepted("2", 20)).is_empty());
        // Connected: the gateway owes 1 an answer, however long it takes.
        assert_eq!(order.next_release(None), None);
        assert!(order.expired(secs(60), None).is_empty());
        // Lost at 1 s: `hold_max` from then (1 was last written before).
        assert_eq!(order.next_release(Some(secs(1))), Some(secs(11)));
        // 1 was refused and resent at 8 s: the hold goes on past 11 s.
        order.transmitted(1, "bob", secs(8));
        assert_eq!(order.next_release(Some(secs(1))), Some(secs(18)));
        assert!(order.expired(secs(17), Some(secs(1))).is_empty());
        // No connection, and 1 not resent for `hold_max`: told sorted, best effort from then on.
        let told = order.expired(secs(18), Some(secs(1)));
        assert_eq!(cids(&told), ["A2", "A3"]);
        assert_eq!(order.next_release(Some(secs(1))), None);
        // 1 is told when it comes.
        assert_eq!(cids(&order.accepted(1, "bob", accepted("1", 10))), ["A1"]);
    }
}
