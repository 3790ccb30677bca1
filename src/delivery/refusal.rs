//! Why a client frame was refused, typed by where the refusal came from: the client's frame
//! ([`ClientRefusal`]), the gateway itself or the store ([`SendRefusal`], for a `send` or a
//! `publish` that was not accepted).
//!
//! A refusal is made where the gateway gives up on a frame (a frame wrong here, a shard's
//! channel is full, the store failed) and travels as this value to whoever answers it (the
//! sender's shard, the API). Turning it into the SPEC's error code, the message a client
//! reads and the API's HTTP status happens here and nowhere else.

use crate::proto::{ErrorCode, FrameError};
use crate::store::StoreError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendRefusal {
    /// The gateway cannot take the message now (a shard's channel is full, earlier writes of
    /// the pair are still in doubt, the store's queue is full): resend later, same cid.
    Busy(&'static str),
    /// The store did not make it safe: the inbox is full, the store is unreachable, or the
    /// write was superseded. Resend later, same cid.
    Store(StoreError),
}

/// Where a refusal came from (the `source` label of `ringgate_sends_refused_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalSource {
    Gateway,
    Store,
}

impl RefusalSource {
    pub const ALL: [RefusalSource; 2] = [RefusalSource::Gateway, RefusalSource::Store];

    pub fn as_str(self) -> &'static str {
        match self {
            RefusalSource::Gateway => "gateway",
            RefusalSource::Store => "store",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

impl SendRefusal {
    pub fn source(&self) -> RefusalSource {
        match self {
            SendRefusal::Busy(_) => RefusalSource::Gateway,
            SendRefusal::Store(_) => RefusalSource::Store,
        }
    }

    /// The SPEC's error code: every refusal that reaches a sender today means "not taken,
    /// resend later with the same cid".
    pub fn code(&self) -> ErrorCode {
        match self {
            SendRefusal::Busy(_) | SendRefusal::Store(_) => ErrorCode::Unavailable,
        }
    }

    /// The API's answer to a refused `POST /api/send` or `/api/publish`.
    pub fn http_status(&self) -> u16 {
        match self.code() {
            ErrorCode::Unavailable => 503,
            ErrorCode::RateLimited => 429,
            ErrorCode::TooLarge => 413,
            ErrorCode::Forbidden => 403,
            ErrorCode::Unauthorized => 401,
            ErrorCode::BadRequest | ErrorCode::UnknownOp => 400,
        }
    }

    /// The `error` frame that answers the client frame `cid`; `what`: "not accepted" for a
    /// send, "not published" for a publish.
    pub fn frame(&self, what: &str, cid: Box<str>) -> FrameError {
        FrameError {
            code: self.code(),
            message: format!("{what}: {self}"),
            cid: Some(cid),
        }
    }
}

/// A client frame that is well formed but cannot be served as it is: the client's doing,
/// answered at once; the connection stays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientRefusal {
    /// Wrong here (`bad_request`): an ack beyond what was sent, a `read` of a message never
    /// received, a binary frame, a `fetch` without a `summary`.
    BadRequest(String),
    /// A send or publish whose frame would be longer than `max_frame` (`too_large`; see
    /// `proto::message_fits`).
    TooLarge(String),
}

impl ClientRefusal {
    /// The SPEC's error code.
    pub fn code(&self) -> ErrorCode {
        match self {
            ClientRefusal::BadRequest(_) => ErrorCode::BadRequest,
            ClientRefusal::TooLarge(_) => ErrorCode::TooLarge,
        }
    }

    /// The `error` frame that answers it (`cid`: the refused frame's, when it had one).
    pub fn frame(self, cid: Option<Box<str>>) -> FrameError {
        let code = self.code();
        let (ClientRefusal::BadRequest(message) | ClientRefusal::TooLarge(message)) = self;
        FrameError { code, message, cid }
    }
}

impl std::fmt::Display for SendRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendRefusal::Busy(why) => f.write_str(why),
            SendRefusal::Store(e) => write!(f, "{e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_maps_to_unavailable_with_its_source_and_reason() {
        let busy = SendRefusal::Busy("the recipient's shard is busy, resend later");
        let full = SendRefusal::Store(StoreError::Full {
            user: "bob".into(),
            count: 3,
        });
        let down = SendRefusal::Store(StoreError::Unavailable("timeout".into()));
        for r in [&busy, &full, &down, &SendRefusal::Store(StoreError::Stale)] {
            assert_eq!(r.code(), ErrorCode::Unavailable);
            assert_eq!(r.http_status(), 503);
        }
        assert_eq!(busy.source(), RefusalSource::Gateway);
        assert_eq!(full.source(), RefusalSource::Store);
        let frame = full.frame("not accepted", "\"c1\"".into());
        assert_eq!(frame.code, ErrorCode::Unavailable);
        assert_eq!(
            frame.message,
            "not accepted: inbox of bob is full (3 messages)"
        );
        assert_eq!(frame.cid.as_deref(), Some("\"c1\""));
        assert_eq!(
            busy.frame("not published", "1".into()).message,
            "not published: the recipient's shard is busy, resend later"
        );
    }

    #[test]
    fn a_client_refusal_is_a_bad_request_with_its_reason() {
        let frame = ClientRefusal::BadRequest("ack 9 is beyond 3".into()).frame(None);
        assert_eq!(frame.code, ErrorCode::BadRequest);
        assert_eq!(frame.message, "ack 9 is beyond 3");
        assert_eq!(frame.cid, None);
    }
}
