//! Direct-message delivery state (SPEC sections 3 and 4), as pure logic: no sockets, no
//! threads, no clock (time is injected as `u64` milliseconds), no locks.
//!
//! # What it owns
//! * [`window::Window`]: one connection's window of unacknowledged `msg` frames: seq
//!   assignment (1, 2, 3… without gaps), cumulative acks, the retransmit/backoff schedule and
//!   the decision that the connection is dead.
//! * [`dedup::Dedup`]: one sender's `(from, cid)` dedup state, so a resent `cid` never
//!   becomes a second message (while pending, and for >= 24 h / >= 10,000 cids once accepted).
//! * [`room::RoomLog`]: one room's offsets, recovery history and publish dedup.
//! * [`ids::MessageIds`]: server message ids, and the issuer slot a shard holds to make them.
//! * [`watch::PresenceViews`] and [`watch::WatchList`]: presence that tells (`watch`).
//! * [`receipts::ReadReceipts`]: per reader, what each sender sent it and what it has told
//!   (read receipts).
//! * [`reader::Reader`]: the recipient's side of direct delivery, per device connection
//!   (inbox replay through its window, `synced`, acks, retransmits, summary and `fetch`).
//! * [`senders::Senders`]: the sender's side of direct delivery on its home shard (dedup
//!   windows, ids, connections waiting for a resent cid's answer, each answer's frame and
//!   who gets it).
//!
//! The offline inbox lives in [`crate::store`]. Everything here belongs to the user's home
//! shard and is passed by `&mut`; a message is an immutable handle `M: Clone` (the shard uses
//! `Rc<Message>`) shared by the inbox and several windows.
//!
//! # How the shard uses them today: store-first (see `shard/deliver.rs`)
//! With the embedded store every accepted message is appended to the recipient's inbox first
//! ("safe" = in the store, so `accepted` follows at once), and each device connection replays
//! the inbox through its own `Window`; the first device ack removes the entry and sends
//! `delivered`. The steps below describe the in-memory fast path (deliver before storing,
//! `accepted` on ack) that becomes worth its complexity once the store is Redis.
//!
//! # How a `send` flows through these pieces on the fast path
//! 1. `Dedup::check(cid)`: `Accepted { id }` -> answer `accepted` again with that id, deliver
//!    nothing; `Pending { id }` -> deliver nothing (the first copy is on its way; `accepted`
//!    follows when it is safe); `New` -> `Dedup::begin(cid, id, now)`.
//! 2. For every device connection of the recipient: `Window::push`; `Err(msg)` (window full) or
//!    no connection at all -> the offline inbox.
//! 3. When a device acks it (`Window::ack` returns it) or the inbox append succeeded:
//!    `Dedup::accept(cid)` and `accepted` to the sender. When the inbox refuses
//!    (`StoreError`) and no device holds it: `Dedup::forget_pending(cid)` and `error`
//!    `unavailable`; the client resends with the same cid later.
//! 4. `Window::poll` at `Window::next_deadline` retransmits; `WindowState::Expired` -> close the
//!    connection and move `Window::drain` to the inbox.

pub mod dedup;
pub mod ids;
pub mod message;
pub mod reader;
pub mod receipts;
pub mod refusal;
pub mod room;
pub mod senders;
pub mod watch;
pub mod window;

pub use dedup::{Dedup, DedupConfig, Seen};
pub use window::{AckError, Window, WindowConfig, WindowState};
