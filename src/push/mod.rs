//! Offline push (SPEC 4): a direct message stored for a user with no connected device on any
//! node is POSTed to `push_webhook_url`, batched, HMAC-signed, at least once, so the
//! application can send a mobile notification.
//!
//! Who owns what: shards decide that a push is due (the embedded store: the recipient's home
//! shard stored it and holds no device of the user; Redis: the append script found the user's
//! directory entry empty, answered to the one shard that made the append, so one node per
//! message) and hand a [`PushItem`] to the worker through [`PushLink::offer`], which never
//! blocks: past `push_queue_max` waiting items the item is dropped and counted on the shard.
//! The worker thread (its own tokio current-thread runtime, like the Redis thread) owns the
//! queue ([`queue::PushQueue`]: delay, batches, backoff), the POSTs ([`http`]) and its
//! counters (`shard="push"`). It knows nothing of shards, connections or the config file.
//!
//! Cancel: an item waits `push_delay_ms` before it is sent; an ack meanwhile cancels it. With
//! the embedded store the shard that queued it sends a cancel when a device acks it (the
//! shard remembers the ids it queued, a bounded set); with Redis the worker checks each
//! entry is still in the inbox (XRANGE) right before each POST. What remains: an ack that
//! lands while its POST is in flight (at most `push_timeout_ms`) does not stop it.

pub mod http;
pub mod queue;

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use compact_str::CompactString;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use crate::config::PushConfig;
use crate::metrics::Counter;
use crate::store::redis::RedisSettings;
use crate::store::InboxSeq;
use queue::{Next, PushQueue};

/// One notification to send: what the payload says of one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushItem {
    /// The recipient.
    pub user: CompactString,
    pub from: CompactString,
    /// The message id (stable: the receiver's dedup key).
    pub id: u64,
    /// The sender's cid, raw JSON text.
    pub cid: Box<str>,
    pub ts: u64,
    pub msg_type: Option<Box<str>>,
    /// The body, raw JSON text.
    pub body: Box<str>,
    /// With Redis: the inbox entry, checked before each POST (gone = acked: not sent).
    pub seq: Option<InboxSeq>,
}

impl PushItem {
    /// The notification of a message stored for a user with no device anywhere (`seq`: its
    /// inbox entry, with Redis); none for a read receipt, which is no message to notify about.
    pub fn for_message(
        msg: &crate::delivery::message::Message,
        seq: Option<InboxSeq>,
    ) -> Option<Self> {
        if crate::proto::receipt_sender(&msg.cid).is_some() {
            return None;
        }
        Some(PushItem {
            user: msg.to.clone(),
            from: msg.from.clone(),
            id: msg.id,
            cid: msg.cid.as_str().into(),
            ts: msg.ts,
            msg_type: msg.msg_type.clone(),
            body: msg.body.as_ref().into(),
            seq,
        })
    }
}

enum PushMsg {
    Item(Box<PushItem>),
    /// A device acked message `id` (embedded store).
    Cancel(u64),
}

/// The worker's counters and the queue depth the shards bound it by.
#[derive(Default)]
pub struct PushMetrics {
    /// Items offered and not yet sent, cancelled or lost (shards add, the worker subtracts).
    depth: AtomicUsize,
    pub sent: Counter,
    pub posts: Counter,
    pub failures: Counter,
    pub cancelled: Counter,
    pub lost: Counter,
}

pub const PUSH_SENT: &str = "ringgate_push_sent_total";
pub const PUSH_POSTS: &str = "ringgate_push_posts_total";
pub const PUSH_FAILURES: &str = "ringgate_push_failures_total";
pub const PUSH_CANCELLED: &str = "ringgate_push_cancelled_total";
pub const PUSH_LOST: &str = "ringgate_push_lost_total";
pub const PUSH_QUEUE_DEPTH: &str = "ringgate_push_queue_depth";

impl PushMetrics {
    pub fn depth(&self) -> usize {
        self.depth.load(Ordering::Relaxed)
    }

    fn done(&self, n: usize) {
        self.depth.fetch_sub(n, Ordering::Relaxed);
    }

    /// Prometheus text of the worker's series (label `shard="push"`: not a shard's).
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let series: [(&str, &str, &str, u64); 6] = [
            (PUSH_SENT, "counter", "Messages the push webhook accepted (2xx).", self.sent.get()),
            (PUSH_POSTS, "counter", "Webhook POSTs answered 2xx (one per batch).", self.posts.get()),
            (PUSH_FAILURES, "counter", "Webhook POSTs that failed (error status, connect error, timeout); the batch is retried with backoff.", self.failures.get()),
            (PUSH_CANCELLED, "counter", "Pushes not sent because the message was acked first (with Redis: its inbox entry was gone at the check before the POST, also when the age or count cap removed it).", self.cancelled.get()),
            (PUSH_LOST, "counter", "Pushes still queued when the drain budget ran out at shutdown (the messages stay in the inbox).", self.lost.get()),
            (PUSH_QUEUE_DEPTH, "gauge", "Pushes waiting (all shards together; bounded by push_queue_max).", self.depth() as u64),
        ];
        for (name, kind, help, v) in series {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{shard=\"push\"}} {v}"
            );
        }
    }
}

/// A shard's end: offers items, cancels acked ones. Owned by one shard.
///
/// The bound is a shared counter of items not yet done (shards add, the worker subtracts
/// once an item is sent, cancelled or lost), not a bounded channel: the worker takes items
/// out of the channel into its queue at once (to batch them and see cancels), so a channel's
/// bound would not count what it holds. The channel itself is then unbounded in type,
/// bounded in fact (items by the counter, cancels by `watched`).
pub struct PushLink {
    tx: Sender<PushMsg>,
    metrics: Arc<PushMetrics>,
    queue_max: usize,
    /// Embedded store: ids this shard queued, so that an ack cancels them; oldest first,
    /// bounded by twice the queue (an older id has long left the worker's queue).
    watched: HashSet<u64>,
    order: VecDeque<u64>,
    drops: LogEvery,
}

impl PushLink {
    /// Hand `item` to the worker without waiting; false when the queue is full (dropped: the
    /// caller counts it). `watch`: remember its id for [`PushLink::acked`].
    pub fn offer(&mut self, item: PushItem, watch: bool) -> bool {
        if self.metrics.depth.fetch_add(1, Ordering::Relaxed) >= self.queue_max {
            self.metrics.depth.fetch_sub(1, Ordering::Relaxed);
            if let Some(n) = self.drops.tick() {
                tracing::warn!(
                    dropped = n,
                    queue_max = self.queue_max,
                    "push: queue full, notifications dropped (the messages stay in the inbox)"
                );
            }
            return false;
        }
        let id = item.id;
        if self.tx.send(PushMsg::Item(Box::new(item))).is_err() {
            self.metrics.depth.fetch_sub(1, Ordering::Relaxed);
            return false; // the worker has exited (shutdown)
        }
        if watch {
            if self.order.len() >= 2 * self.queue_max {
                if let Some(old) = self.order.pop_front() {
                    self.watched.remove(&old);
                }
            }
            self.watched.insert(id);
            self.order.push_back(id);
        }
        true
    }

    /// Message `id` left the inbox by an ack: cancel its push if this shard queued one.
    pub fn acked(&mut self, id: u64) {
        if self.watched.remove(&id) {
            let _ = self.tx.send(PushMsg::Cancel(id));
        }
    }
}

/// At most one log line per period, with the count since the last one.
struct LogEvery {
    period: Duration,
    last: Option<Instant>,
    count: u64,
}

impl LogEvery {
    fn new(period: Duration) -> Self {
        LogEvery {
            period,
            last: None,
            count: 0,
        }
    }

    /// Count one event; Some(count) when a line is due.
    fn tick(&mut self) -> Option<u64> {
        self.count += 1;
        let now = Instant::now();
        if self
            .last
            .is_some_and(|l| now.duration_since(l) < self.period)
        {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.count))
    }
}

/// The running worker: stop it once the shards have exited.
pub struct PushWorker {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl PushWorker {
    /// Let the worker flush what it holds (until its drain budget ends), then wait for it.
    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
    }
}

/// Start the worker thread; one link per shard. `redis`: check entries there before each
/// POST. `draining`: true once shutdown started; the worker then sends without delay for
/// at most `drain_ms`.
pub fn start(
    cfg: PushConfig,
    shards: usize,
    redis: Option<RedisSettings>,
    draining: Box<dyn Fn() -> bool + Send>,
    drain_ms: u64,
) -> std::io::Result<(Vec<PushLink>, PushWorker, Arc<PushMetrics>)> {
    let target = http::Target::parse(&cfg.url)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let (tx, rx) = crossbeam_channel::unbounded();
    let metrics = Arc::new(PushMetrics::default());
    let links = (0..shards)
        .map(|_| PushLink {
            tx: tx.clone(),
            metrics: metrics.clone(),
            queue_max: cfg.queue_max,
            watched: HashSet::new(),
            order: VecDeque::new(),
            drops: LogEvery::new(Duration::from_secs(10)),
        })
        .collect();
    drop(tx);
    let stop = Arc::new(AtomicBool::new(false));
    let worker = Worker {
        queue: PushQueue::new(cfg.delay_ms, cfg.batch_max, 2 * cfg.queue_max),
        cfg,
        target,
        rx,
        metrics: metrics.clone(),
        stop: stop.clone(),
        draining,
        drain_ms,
        origin: Instant::now(),
        rng: seed(),
    };
    let thread = std::thread::Builder::new()
        .name("ringgate-push".into())
        .spawn(move || worker.run(redis))?;
    Ok((links, PushWorker { stop, thread }, metrics))
}

struct Worker {
    cfg: PushConfig,
    target: http::Target,
    rx: Receiver<PushMsg>,
    queue: PushQueue,
    metrics: Arc<PushMetrics>,
    stop: Arc<AtomicBool>,
    draining: Box<dyn Fn() -> bool + Send>,
    drain_ms: u64,
    origin: Instant,
    rng: u64,
}

/// The longest the worker waits without looking at the shutdown flags.
const POLL_MS: u64 = 100;

impl Worker {
    fn now(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    fn take(&mut self, msg: PushMsg) {
        let now = self.now();
        match msg {
            PushMsg::Item(item) => {
                if !self.queue.add(*item, now) {
                    self.metrics.cancelled.inc();
                    self.metrics.done(1);
                }
            }
            PushMsg::Cancel(id) => {
                if self.queue.cancel(id) {
                    self.metrics.cancelled.inc();
                    self.metrics.done(1);
                }
            }
        }
    }

    /// A number in [0, 1) (xorshift; jitter needs no quality).
    fn jitter(&mut self) -> f64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng >> 11) as f64 / (1u64 << 53) as f64
    }

    fn run(mut self, redis: Option<RedisSettings>) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime for the push worker");
        let _entered = runtime.enter();
        let check = redis.and_then(|s| match crate::store::redis::check_client(&s) {
            Ok(c) => Some((c, s.key_prefix)),
            Err(e) => {
                tracing::error!(error = %e, "push: no Redis client for the ack checks; acked messages may be pushed");
                None
            }
        });
        let secret = self.cfg.secret.clone().into_bytes();
        let timeout = Duration::from_millis(self.cfg.timeout_ms);
        let mut drain_until: Option<u64> = None;
        let mut failure_log = LogEvery::new(Duration::from_secs(10));
        loop {
            while let Ok(msg) = self.rx.try_recv() {
                self.take(msg);
            }
            let now = self.now();
            if drain_until.is_none() && (self.draining)() {
                drain_until = Some(now + self.drain_ms);
            }
            let stopping = self.stop.load(Ordering::Relaxed);
            if drain_until.is_some_and(|d| now >= d) || (stopping && drain_until.is_none()) {
                let lost = self.queue.clear();
                if lost > 0 {
                    self.metrics.lost.add(lost as u64);
                    self.metrics.done(lost);
                    tracing::warn!(lost, "push: drain budget over, notifications not sent (the messages stay in the inbox)");
                }
            }
            if stopping && self.queue.is_empty() {
                return;
            }
            let wait = match self.queue.next(now, drain_until.is_some()) {
                Next::Send(batch) => {
                    // Draining: no POST outlives the drain budget.
                    let timeout = match drain_until {
                        Some(d) => timeout.min(Duration::from_millis(d.saturating_sub(now).max(1))),
                        None => timeout,
                    };
                    self.send(batch, &check, &secret, timeout, &runtime, &mut failure_log);
                    continue;
                }
                Next::WaitUntil(at) => (at - now).min(POLL_MS),
                Next::Idle => POLL_MS,
            };
            match self.rx.recv_timeout(Duration::from_millis(wait.max(1))) {
                Ok(msg) => self.take(msg),
                Err(RecvTimeoutError::Timeout) => {}
                // Every shard has exited: only the stop flag is left to wait for.
                Err(RecvTimeoutError::Disconnected) => {
                    std::thread::sleep(Duration::from_millis(wait.max(1)))
                }
            }
        }
    }

    fn send(
        &mut self,
        mut batch: Vec<PushItem>,
        check: &Option<(fred::clients::Client, String)>,
        secret: &[u8],
        timeout: Duration,
        runtime: &tokio::runtime::Runtime,
        failure_log: &mut LogEvery,
    ) {
        if let Some((client, prefix)) = check {
            let entries: Vec<(&str, InboxSeq)> = batch
                .iter()
                .filter_map(|i| Some((i.user.as_str(), i.seq?)))
                .collect();
            if !entries.is_empty() {
                let stored = runtime.block_on(crate::store::redis::entries_stored(
                    client, prefix, &entries,
                ));
                let mut answers = stored.into_iter();
                let before = batch.len();
                batch.retain(|i| i.seq.is_none() || answers.next().unwrap_or(true));
                let gone = before - batch.len();
                if gone > 0 {
                    self.metrics.cancelled.add(gone as u64);
                    self.metrics.done(gone);
                }
            }
        }
        if batch.is_empty() {
            return;
        }
        let body = http::payload(&batch, self.cfg.body, self.cfg.preview_chars);
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let signature = http::sign(secret, ts, &body);
        let result = runtime.block_on(http::post(&self.target, &body, ts, &signature, timeout));
        match result {
            Ok(_) => {
                let failures = self.queue.failures();
                if failures > 0 {
                    tracing::info!(failures, "push: webhook answers again");
                }
                self.queue.sent();
                self.metrics.posts.inc();
                self.metrics.sent.add(batch.len() as u64);
                self.metrics.done(batch.len());
            }
            Err(e) => {
                self.metrics.failures.inc();
                let n = batch.len();
                let now = self.now();
                let jitter = self.jitter();
                let (wait, cancelled) = self.queue.failed(batch, now, jitter);
                if cancelled > 0 {
                    self.metrics.cancelled.add(cancelled as u64);
                    self.metrics.done(cancelled);
                }
                if let Some(failed) = failure_log.tick() {
                    tracing::warn!(error = %e, batch = n, retry_in_ms = wait, failed_posts = failed, queued = self.metrics.depth(), "push: webhook POST failed; retrying");
                }
            }
        }
    }
}

/// A seed for the jitter: std's per-process random hash keys (never 0).
fn seed() -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(0u8) | 1
}

/// A push item for unit tests (the queue's and the shard link's).
#[cfg(test)]
pub(crate) fn test_item(id: u64) -> PushItem {
    PushItem {
        user: "u".into(),
        from: "f".into(),
        id,
        cid: "\"c\"".into(),
        ts: 0,
        msg_type: None,
        body: "1".into(),
        seq: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(queue_max: usize) -> (PushLink, Receiver<PushMsg>) {
        let (tx, rx) = crossbeam_channel::unbounded();
        let link = PushLink {
            tx,
            metrics: Arc::new(PushMetrics::default()),
            queue_max,
            watched: HashSet::new(),
            order: VecDeque::new(),
            drops: LogEvery::new(Duration::from_secs(10)),
        };
        (link, rx)
    }

    use super::test_item as item;

    /// Past `queue_max` items not yet done, an offer is refused at once; once the worker is
    /// done with some, offers are taken again.
    #[test]
    fn offers_are_bounded_by_the_items_not_yet_done() {
        let (mut link, rx) = link(3);
        assert!((0..3).all(|id| link.offer(item(id), true)));
        assert!(!link.offer(item(3), true));
        assert_eq!(link.metrics.depth(), 3);
        assert_eq!(rx.try_iter().count(), 3);
        link.metrics.done(2);
        assert!(link.offer(item(4), false));
        assert_eq!(link.metrics.depth(), 2);
    }

    /// An ack cancels only what this shard queued and watches, once; the watch list keeps
    /// the newest 2 x queue_max ids.
    #[test]
    fn acks_cancel_watched_ids_once_and_the_watch_list_is_bounded() {
        let (mut link, rx) = link(2);
        link.offer(item(1), true);
        link.offer(item(2), false);
        rx.try_iter().for_each(drop);
        link.acked(1);
        link.acked(1);
        link.acked(2);
        link.acked(9);
        let cancels: Vec<u64> = rx
            .try_iter()
            .filter_map(|m| match m {
                PushMsg::Cancel(id) => Some(id),
                PushMsg::Item(_) => None,
            })
            .collect();
        assert_eq!(cancels, [1]);
        for id in 10..30 {
            link.metrics.done(link.metrics.depth());
            link.offer(item(id), true);
        }
        assert!(link.watched.len() <= 4 && link.order.len() <= 4);
        assert!(link.watched.contains(&29) && !link.watched.contains(&10));
    }
}
