//! The order in which a sender is told `accepted` after a reconnect.
//!
//! The recipient sees one sender's messages in store order, and the ids in `accepted`
//! increase in that order per (sender, recipient). Without faults the answers come in that
//! order too. After a reconnect they may not: a resent cid that was stored before the drop is
//! answered from the gateway's dedup window in the order the client resends it, which can
//! differ from the order it was stored in. So after a reconnect the client remembers, per
//! recipient, which resent cids are still unanswered (the batch) and holds every `accepted`
//! to that recipient (resent or new) until each of them is answered (`accepted`, or refused:
//! a refused send was not stored, and its later acceptance is a new store); then it tells
//! the held ones sorted by id, each followed by the `delivered` that came for it meanwhile.
//! A batch never fully answered is released after `hold_max`, sorted all the same. This is
//! the JavaScript client's rule (clients/js/README.md, "Order of `accepted`").
//!
//! Pure logic: time comes in as an argument, events go out as return values.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use super::Event;

/// Answers held for one recipient.
struct Held {
    release_at: Instant,
    /// (id, the `accepted` event, the `delivered` events that came for it meanwhile)
    answers: Vec<(u64, Event, Vec<Event>)>,
}

#[derive(Default)]
pub(crate) struct AcceptedOrder {
    hold_max: Duration,
    /// Per recipient: resent sends (by number) not answered yet.
    batches: BTreeMap<String, BTreeSet<u64>>,
    held: BTreeMap<String, Held>,
}

impl AcceptedOrder {
    pub(crate) fn new(hold_max: Duration) -> Self {
        AcceptedOrder {
            hold_max,
            ..Default::default()
        }
    }

    /// Sends `resent` (number, recipient) went out again on a new connection. A batch left
    /// from an earlier connection is replaced: its unanswered sends are among these.
    pub(crate) fn resent(&mut self, resent: impl IntoIterator<Item = (u64, String)>) {
        self.batches.clear();
        for (n, to) in resent {
            self.batches.entry(to).or_default().insert(n);
        }
    }

    /// Send `n` to `to` was accepted with `event`: what to tell now.
    pub(crate) fn accepted(&mut self, n: u64, to: &str, event: Event, now: Instant) -> Vec<Event> {
        if !self.batches.contains_key(to) {
            return vec![event];
        }
        let id = match &event {
            Event::Accepted { id, .. } => id.parse().unwrap_or(u64::MAX),
            _ => u64::MAX,
        };
        let hold_max = self.hold_max;
        self.held
            .entry(to.to_string())
            .or_insert_with(|| Held {
                release_at: now + hold_max,
                answers: Vec::new(),
            })
            .answers
            .push((id, event, Vec::new()));
        self.answered(n, to)
    }

    /// Send `n` to `to` was refused for now: it was not stored, so it no longer holds the
    /// others back.
    pub(crate) fn refused(&mut self, n: u64, to: &str) -> Vec<Event> {
        if self.batches.contains_key(to) {
            self.answered(n, to)
        } else {
            Vec::new()
        }
    }

    /// A `delivered` for `cid`: told after its `accepted` if that is held, else now.
    pub(crate) fn delivered(&mut self, cid: &str, event: Event) -> Option<Event> {
        for held in self.held.values_mut() {
            let found = held.answers.iter_mut().find(
                |(_, accepted, _)| matches!(accepted, Event::Accepted { cid: c, .. } if c == cid),
            );
            if let Some((_, _, delivered)) = found {
                delivered.push(event);
                return None;
            }
        }
        Some(event)
    }

    /// The earliest time a hold runs out, if any is held.
    pub(crate) fn next_release(&self) -> Option<Instant> {
        self.held.values().map(|h| h.release_at).min()
    }

    /// Release every hold that ran out by `now`, sorted (order is best effort from then on).
    pub(crate) fn expired(&mut self, now: Instant) -> Vec<Event> {
        let due: Vec<String> = self
            .held
            .iter()
            .filter(|(_, h)| h.release_at <= now)
            .map(|(to, _)| to.clone())
            .collect();
        due.iter().flat_map(|to| self.release(to)).collect()
    }

    fn answered(&mut self, n: u64, to: &str) -> Vec<Event> {
        let Some(batch) = self.batches.get_mut(to) else {
            return Vec::new();
        };
        batch.remove(&n);
        if !batch.is_empty() {
            return Vec::new();
        }
        self.release(to)
    }

    fn release(&mut self, to: &str) -> Vec<Event> {
        self.batches.remove(to);
        let Some(mut held) = self.held.remove(to) else {
            return Vec::new();
        };
        held.answers.sort_by_key(|(id, _, _)| *id);
        let mut told = Vec::new();
        for (_, accepted, delivered) in held.answers {
            told.push(accepted);
            told.extend(delivered);
        }
        told
    }
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

    #[test]
    fn without_a_resend_batch_accepted_is_told_at_once() {
        let mut order = AcceptedOrder::new(Duration::from_secs(10));
        let now = Instant::now();
        assert_eq!(
            cids(&order.accepted(1, "bob", accepted("1", 9), now)),
            ["A1"]
        );
        assert_eq!(
            cids(&order.accepted(2, "bob", accepted("2", 5), now)),
            ["A2"]
        );
    }

    #[test]
    fn resent_answers_out_of_store_order_are_told_in_id_order() {
        // Sends 1 and 2 were stored before the drop as ids 20 and 10 (1's first write
        // failed, was revoked, and stored again later); resent in cid order, answered so.
        let mut order = AcceptedOrder::new(Duration::from_secs(10));
        let now = Instant::now();
        order.resent([(1, "bob".into()), (2, "bob".into())]);
        assert!(order.accepted(1, "bob", accepted("1", 20), now).is_empty());
        // A new send to bob, accepted meanwhile, waits too: it was stored after both.
        assert!(order.accepted(3, "bob", accepted("3", 30), now).is_empty());
        let told = order.accepted(2, "bob", accepted("2", 10), now);
        assert_eq!(cids(&told), ["A2", "A1", "A3"]);
        // The batch is over: the next answer is told as it comes.
        assert_eq!(
            cids(&order.accepted(4, "bob", accepted("4", 40), now)),
            ["A4"]
        );
    }

    #[test]
    fn other_recipients_are_not_held() {
        let mut order = AcceptedOrder::new(Duration::from_secs(10));
        let now = Instant::now();
        order.resent([(1, "bob".into())]);
        assert_eq!(
            cids(&order.accepted(2, "cat", accepted("2", 5), now)),
            ["A2"]
        );
        assert_eq!(
            cids(&order.accepted(1, "bob", accepted("1", 7), now)),
            ["A1"]
        );
    }

    #[test]
    fn ids_compare_as_numbers() {
        let mut order = AcceptedOrder::new(Duration::from_secs(10));
        let now = Instant::now();
        order.resent([(1, "bob".into()), (2, "bob".into())]);
        assert!(order.accepted(1, "bob", accepted("1", 100), now).is_empty());
        assert_eq!(
            cids(&order.accepted(2, "bob", accepted("2", 99), now)),
            ["A2", "A1"]
        );
    }

    #[test]
    fn a_refused_resend_releases_the_batch() {
        let mut order = AcceptedOrder::new(Duration::from_secs(10));
        let now = Instant::now();
        order.resent([(1, "bob".into()), (2, "bob".into())]);
        assert!(order.accepted(2, "bob", accepted("2", 8), now).is_empty());
        assert_eq!(cids(&order.refused(1, "bob")), ["A2"]);
        // Its later acceptance is a new store: told as it comes.
        assert_eq!(
            cids(&order.accepted(1, "bob", accepted("1", 9), now)),
            ["A1"]
        );
    }

    #[test]
    fn delivered_follows_its_held_accepted() {
        let mut order = AcceptedOrder::new(Duration::from_secs(10));
        let now = Instant::now();
        order.resent([(1, "bob".into()), (2, "bob".into())]);
        assert!(order.accepted(2, "bob", accepted("2", 8), now).is_empty());
        assert!(order.delivered("2", delivered("2", 8)).is_none());
        assert!(order.delivered("7", delivered("7", 3)).is_some());
        let told = order.accepted(1, "bob", accepted("1", 5), now);
        assert_eq!(cids(&told), ["A1", "A2", "D2"]);
    }

    #[test]
    fn a_batch_never_answered_is_released_sorted_after_hold_max() {
        let mut order = AcceptedOrder::new(Duration::from_secs(10));
        let start = Instant::now();
        order.resent([(1, "bob".into()), (2, "bob".into()), (3, "bob".into())]);
        assert!(order
            .accepted(3, "bob", accepted("3", 30), start)
            .is_empty());
        assert!(order
            .accepted(2, "bob", accepted("2", 20), start)
            .is_empty());
        assert_eq!(order.next_release(), Some(start + Duration::from_secs(10)));
        assert!(order.expired(start + Duration::from_secs(9)).is_empty());
        let told = order.expired(start + Duration::from_secs(10));
        assert_eq!(cids(&told), ["A2", "A3"]);
        assert_eq!(order.next_release(), None);
        // From then on answers are told as they come.
        assert_eq!(
            cids(&order.accepted(1, "bob", accepted("1", 10), start)),
            ["A1"]
        );
    }

    #[test]
    fn a_new_connection_replaces_the_batch_and_keeps_what_is_held() {
        let mut order = AcceptedOrder::new(Duration::from_secs(10));
        let now = Instant::now();
        order.resent([(1, "bob".into()), (2, "bob".into())]);
        assert!(order.accepted(2, "bob", accepted("2", 12), now).is_empty());
        // Dropped again: 1 is resent on the next connection.
        order.resent([(1, "bob".into())]);
        let told = order.accepted(1, "bob", accepted("1", 11), now);
        assert_eq!(cids(&told), ["A1", "A2"]);
    }
}
