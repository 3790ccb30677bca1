//! RFC 6455 frames over caller-owned buffers.
//!
//! Decoding uses tungstenite's `FrameHeader::parse` on the bytes at hand and unmasks the payload
//! in place, so a frame that arrived whole in the shard's scratch buffer is handled without a copy.
//! Encoding writes tungstenite's `FrameHeader::format` plus the payload into the connection's
//! outbound bytes. Every rule the server enforces on client frames is here, as a close code.

use std::io::Cursor;

use tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

pub const CLOSE_NORMAL: u16 = 1000;
pub const CLOSE_GOING_AWAY: u16 = 1001;
pub const CLOSE_PROTOCOL_ERROR: u16 = 1002;
pub const CLOSE_INVALID_PAYLOAD: u16 = 1007;
pub const CLOSE_POLICY: u16 = 1008;
pub const CLOSE_TOO_BIG: u16 = 1009;
pub const CLOSE_INTERNAL: u16 = 1011;
pub const CLOSE_RESTART: u16 = 1012;
pub const CLOSE_TRY_AGAIN: u16 = 1013;
/// Refusals told in-band to a connection that authenticates in its first frame (`?auth=frame`,
/// browsers, whose WebSocket API hides the HTTP status of a refused upgrade): the token is
/// missing, invalid, expired or not valid yet (get a new one), ...
pub const CLOSE_UNAUTHORIZED: u16 = 4001;
/// ... the Origin is not allowed (permanent), ...
pub const CLOSE_FORBIDDEN: u16 = 4003;
/// ... too many connections from the address (retry after `retry_ms`), ...
pub const CLOSE_RATE_LIMITED: u16 = 4029;
/// ... the gateway is at its connection limit or draining (retry after `retry_ms`).
pub const CLOSE_UNAVAILABLE: u16 = 4503;

/// Largest control frame payload (RFC 6455 5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl Kind {
    pub fn is_control(self) -> bool {
        matches!(self, Kind::Close | Kind::Ping | Kind::Pong)
    }
    fn opcode(self) -> OpCode {
        match self {
            Kind::Continuation => OpCode::Data(Data::Continue),
            Kind::Text => OpCode::Data(Data::Text),
            Kind::Binary => OpCode::Data(Data::Binary),
            Kind::Close => OpCode::Control(Control::Close),
            Kind::Ping => OpCode::Control(Control::Ping),
            Kind::Pong => OpCode::Control(Control::Pong),
        }
    }
}

/// A client frame that breaks the protocol: the connection is closed with `code`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Violation {
    pub code: u16,
    pub reason: &'static str,
}

const fn violation(code: u16, reason: &'static str) -> Violation {
    Violation { code, reason }
}

/// A frame that cannot be taken: its violation, and its whole length (header and payload)
/// when the header could be read, so the reader can step over it and keep framing (to see the
/// peer's answering close frame). None: framing is lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadFrame {
    pub violation: Violation,
    pub frame_len: Option<u64>,
}

/// One decoded client frame; `payload` is unmasked in place inside the caller's buffer.
#[derive(Debug)]
pub struct Frame<'a> {
    pub fin: bool,
    pub kind: Kind,
    pub payload: &'a [u8],
}

/// Decode one client frame from the front of `buf`.
/// Ok(None): more bytes needed (nothing consumed). Ok(Some((frame, consumed))): a whole frame.
/// `max_payload` bounds a single frame; bigger is `1009` before any payload is buffered.
pub fn decode(buf: &mut [u8], max_payload: usize) -> Result<Option<(Frame<'_>, usize)>, BadFrame> {
    let mut cursor = Cursor::new(&*buf);
    let (header, len) = match FrameHeader::parse(&mut cursor) {
        Ok(Some(h)) => h,
        Ok(None) => return Ok(None),
        // tungstenite refuses reserved opcodes here; the length can still be read.
        Err(_) => {
            return Err(BadFrame {
                violation: violation(CLOSE_PROTOCOL_ERROR, "malformed frame header"),
                frame_len: declared_len(buf),
            })
        }
    };
    if len >> 63 == 1 {
        // RFC 6455 5.2: the most significant bit of a 64-bit length must be 0. Nothing after
        // such a header can be trusted to be framed.
        return Err(BadFrame {
            violation: violation(CLOSE_PROTOCOL_ERROR, "frame length with the top bit set"),
            frame_len: None,
        });
    }
    let header_len = cursor.position() as usize;
    let bad = |code, reason| BadFrame {
        violation: violation(code, reason),
        frame_len: declared_len(buf),
    };
    let kind = match header.opcode {
        OpCode::Data(Data::Continue) => Kind::Continuation,
        OpCode::Data(Data::Text) => Kind::Text,
        OpCode::Data(Data::Binary) => Kind::Binary,
        OpCode::Control(Control::Close) => Kind::Close,
        OpCode::Control(Control::Ping) => Kind::Ping,
        OpCode::Control(Control::Pong) => Kind::Pong,
        _ => return Err(bad(CLOSE_PROTOCOL_ERROR, "reserved opcode")),
    };
    if header.rsv1 || header.rsv2 || header.rsv3 {
        return Err(bad(
            CLOSE_PROTOCOL_ERROR,
            "reserved bits set without extension",
        ));
    }
    let Some(mask) = header.mask else {
        return Err(bad(CLOSE_PROTOCOL_ERROR, "client frames must be masked"));
    };
    if kind.is_control() && (len as usize > MAX_CONTROL_PAYLOAD || !header.is_final) {
        return Err(bad(CLOSE_PROTOCOL_ERROR, "bad control frame"));
    }
    if len > max_payload as u64 {
        return Err(bad(CLOSE_TOO_BIG, "frame exceeds max_frame"));
    }
    let len = len as usize;
    let total = header_len + len;
    if buf.len() < total {
        return Ok(None);
    }
    let payload = &mut buf[header_len..total];
    unmask(payload, mask);
    Ok(Some((
        Frame {
            fin: header.is_final,
            kind,
            payload,
        },
        total,
    )))
}

/// Header and payload length of the frame at the front of `buf`, read from its header alone
/// (RFC 6455 5.2); None if the header is cut short or its 64-bit length has the top bit set.
fn declared_len(buf: &[u8]) -> Option<u64> {
    let second = *buf.get(1)?;
    let mask_len = if second & 0x80 != 0 { 4 } else { 0 };
    let (len, ext_len) = match second & 0x7f {
        126 => (
            u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?) as u64,
            2,
        ),
        127 => (u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?), 8),
        n => (n as u64, 0),
    };
    if len >> 63 == 1 {
        return None;
    }
    (2 + ext_len + mask_len as u64).checked_add(len)
}

/// XOR the payload with the 4-byte mask, a word at a time where possible.
pub fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    let word = u32::from_ne_bytes(mask) as u64;
    let wide = word | (word << 32);
    let mut chunks = payload.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let v = u64::from_ne_bytes(chunk.try_into().unwrap()) ^ wide;
        chunk.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

/// Append one unmasked (server) frame with `fin` set.
pub fn encode(kind: Kind, payload: &[u8], out: &mut Vec<u8>) {
    let header = FrameHeader {
        is_final: true,
        opcode: kind.opcode(),
        ..FrameHeader::default()
    };
    out.reserve(header.len(payload.len() as u64) + payload.len());
    header
        .format(payload.len() as u64, out)
        .expect("writing to a Vec cannot fail");
    out.extend_from_slice(payload);
}

/// Append a close frame with a status code and a short reason.
pub fn encode_close(code: u16, reason: &str, out: &mut Vec<u8>) {
    let mut payload = [0u8; MAX_CONTROL_PAYLOAD];
    payload[..2].copy_from_slice(&code.to_be_bytes());
    let reason = truncate_utf8(reason, MAX_CONTROL_PAYLOAD - 2);
    payload[2..2 + reason.len()].copy_from_slice(reason.as_bytes());
    encode(Kind::Close, &payload[..2 + reason.len()], out);
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Check a client close payload (RFC 6455 5.5.1, 7.4). Returns the code to echo back.
pub fn check_close_payload(payload: &[u8]) -> Result<u16, Violation> {
    match payload.len() {
        0 => Ok(CLOSE_NORMAL),
        1 => Err(violation(CLOSE_PROTOCOL_ERROR, "close payload of one byte")),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            let valid = matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999);
            if !valid {
                return Err(violation(CLOSE_PROTOCOL_ERROR, "invalid close code"));
            }
            if std::str::from_utf8(&payload[2..]).is_err() {
                return Err(violation(
                    CLOSE_INVALID_PAYLOAD,
                    "close reason is not UTF-8",
                ));
            }
            Ok(code)
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Build a masked client frame (what a browser sends).
    pub fn client_frame(fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut out = vec![(if fin { 0x80 } else { 0 }) | opcode];
        let len = payload.len();
        if len < 126 {
            out.push(0x80 | len as u8);
        } else if len <= 0xffff {
            out.push(0x80 | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            out.push(0x80 | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
        out
    }

    #[test]
    fn decodes_masked_text_in_place() {
        let mut buf = client_frame(true, 1, b"hello, ringgate!", [1, 2, 3, 4]);
        let (f, used) = decode(&mut buf, 1024).unwrap().unwrap();
        assert_eq!(f.kind, Kind::Text);
        assert!(f.fin);
        assert_eq!(f.payload, b"hello, ringgate!");
        assert_eq!(used, buf.len());
    }

    #[test]
    fn partial_frames_need_more_bytes() {
        let whole = client_frame(true, 2, &[7u8; 300], [9, 8, 7, 6]);
        for cut in [0, 1, 2, 3, 5, 8, 100, whole.len() - 1] {
            let mut part = whole[..cut].to_vec();
            assert!(decode(&mut part, 1024).unwrap().is_none(), "cut {cut}");
        }
    }

    #[test]
    fn violations_carry_the_right_close_code() {
        let mut unmasked = vec![0x81, 0x02, b'h', b'i'];
        assert_eq!(decode(&mut unmasked, 100).unwrap_err().violation.code, 1002);
        let mut big = client_frame(true, 1, &[b'a'; 200], [1, 1, 1, 1]);
        assert_eq!(decode(&mut big, 100).unwrap_err().violation.code, 1009);
        let mut rsv = client_frame(true, 1, b"x", [1, 1, 1, 1]);
        rsv[0] |= 0x40;
        assert_eq!(decode(&mut rsv, 100).unwrap_err().violation.code, 1002);
        let mut reserved_op = client_frame(true, 3, b"x", [1, 1, 1, 1]);
        assert_eq!(
            decode(&mut reserved_op, 100).unwrap_err().violation.code,
            1002
        );
        let mut frag_ping = client_frame(false, 9, b"x", [1, 1, 1, 1]);
        assert_eq!(
            decode(&mut frag_ping, 100).unwrap_err().violation.code,
            1002
        );
        let mut long_ping = client_frame(true, 9, &[0; 126], [1, 1, 1, 1]);
        assert_eq!(
            decode(&mut long_ping, 1000).unwrap_err().violation.code,
            1002
        );
    }

    /// A bad frame whose header reads says how long it is (the reader steps over it); a
    /// 64-bit length with the top bit set cannot be stepped over.
    #[test]
    fn a_bad_frame_says_its_length_when_its_header_reads() {
        let mut unmasked = vec![0x81, 0x02, b'h', b'i'];
        assert_eq!(decode(&mut unmasked, 100).unwrap_err().frame_len, Some(4));
        let mut big = client_frame(true, 1, &[b'a'; 200], [1, 1, 1, 1]);
        assert_eq!(
            decode(&mut big[..10], 100).unwrap_err().frame_len,
            Some(208)
        );
        let mut reserved_op = client_frame(true, 3, b"xyz", [1, 1, 1, 1]);
        assert_eq!(
            decode(&mut reserved_op, 100).unwrap_err().frame_len,
            Some(9)
        );
        let mut top_bit = vec![0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 1, 1, 2, 3, 4];
        let err = decode(&mut top_bit, 100).unwrap_err();
        assert_eq!((err.violation.code, err.frame_len), (1002, None));
    }

    #[test]
    fn unmask_matches_bytewise_for_all_lengths() {
        let mask = [0xa1, 0x02, 0x73, 0xf4];
        for len in 0..40 {
            let orig: Vec<u8> = (0..len as u8).collect();
            let mut fast = orig.clone();
            unmask(&mut fast, mask);
            let slow: Vec<u8> = orig
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ mask[i % 4])
                .collect();
            assert_eq!(fast, slow);
        }
    }

    #[test]
    fn encode_uses_all_length_forms() {
        for len in [0usize, 125, 126, 65535, 65536] {
            let mut out = Vec::new();
            encode(Kind::Binary, &vec![0u8; len], &mut out);
            let mut c = Cursor::new(&out[..]);
            let (h, l) = FrameHeader::parse(&mut c).unwrap().unwrap();
            assert_eq!(l as usize, len);
            assert!(h.mask.is_none() && h.is_final);
            assert_eq!(out.len(), c.position() as usize + len);
        }
    }

    #[test]
    fn close_payload_rules() {
        assert_eq!(check_close_payload(&[]).unwrap(), 1000);
        assert!(check_close_payload(&[3]).is_err());
        assert_eq!(check_close_payload(&1001u16.to_be_bytes()).unwrap(), 1001);
        assert_eq!(
            check_close_payload(&1005u16.to_be_bytes())
                .unwrap_err()
                .code,
            1002
        );
        assert_eq!(
            check_close_payload(&999u16.to_be_bytes()).unwrap_err().code,
            1002
        );
        let mut bad_utf8 = 1000u16.to_be_bytes().to_vec();
        bad_utf8.extend_from_slice(&[0xff, 0xfe]);
        assert_eq!(check_close_payload(&bad_utf8).unwrap_err().code, 1007);
        let mut out = Vec::new();
        encode_close(1012, &"x".repeat(300), &mut out);
        assert_eq!(out.len(), 2 + 125);
    }
}
