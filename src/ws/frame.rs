//! RFC 6455 frames over caller-owned buffers.
//!
//! Decoding reads the header from the bytes at hand and unmasks the payload in place, so a frame
//! that arrived whole in the shard's scratch buffer is handled without a copy. Encoding writes
//! the header and the payload into the connection's outbound bytes. tungstenite's own header
//! codec is the reference the tests compare against. Every rule the server enforces on client
//! frames is here, as a close code.

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
    /// The frame opcode (RFC 6455 5.2).
    fn opcode(self) -> u8 {
        match self {
            Kind::Continuation => 0,
            Kind::Text => 1,
            Kind::Binary => 2,
            Kind::Close => 8,
            Kind::Ping => 9,
            Kind::Pong => 10,
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
    let Some(header) = Header::read(buf) else {
        return Ok(None);
    };
    if header.payload_len >> 63 == 1 {
        // RFC 6455 5.2: the most significant bit of a 64-bit length must be 0. Nothing after
        // such a header can be trusted to be framed.
        return Err(BadFrame {
            violation: violation(CLOSE_PROTOCOL_ERROR, "frame length with the top bit set"),
            frame_len: None,
        });
    }
    let bad = |code, reason| BadFrame {
        violation: violation(code, reason),
        frame_len: Some(header.header_len as u64 + header.payload_len),
    };
    let kind = match header.opcode {
        0 => Kind::Continuation,
        1 => Kind::Text,
        2 => Kind::Binary,
        8 => Kind::Close,
        9 => Kind::Ping,
        10 => Kind::Pong,
        _ => return Err(bad(CLOSE_PROTOCOL_ERROR, "reserved opcode")),
    };
    if header.rsv != 0 {
        return Err(bad(
            CLOSE_PROTOCOL_ERROR,
            "reserved bits set without extension",
        ));
    }
    let Some(mask) = header.mask else {
        return Err(bad(CLOSE_PROTOCOL_ERROR, "client frames must be masked"));
    };
    if kind.is_control() && (header.payload_len > MAX_CONTROL_PAYLOAD as u64 || !header.fin) {
        return Err(bad(CLOSE_PROTOCOL_ERROR, "bad control frame"));
    }
    if header.payload_len > max_payload as u64 {
        return Err(bad(CLOSE_TOO_BIG, "frame exceeds max_frame"));
    }
    let total = header.header_len + header.payload_len as usize;
    if buf.len() < total {
        return Ok(None);
    }
    let payload = &mut buf[header.header_len..total];
    unmask(payload, mask);
    Ok(Some((
        Frame {
            fin: header.fin,
            kind,
            payload,
        },
        total,
    )))
}

/// A frame header (RFC 6455 5.2) as read from the front of a buffer, before any rule is
/// checked. Read here rather than by tungstenite's `FrameHeader::parse`, which goes through
/// `io::Read` on a cursor: that parse was 3% of a shard's CPU echoing 64-byte text at 16 in
/// flight (docs/performance.md, "Frame headers without tungstenite").
struct Header {
    fin: bool,
    /// The three reserved bits, in place.
    rsv: u8,
    opcode: u8,
    mask: Option<[u8; 4]>,
    payload_len: u64,
    header_len: usize,
}

impl Header {
    /// None: the header is not all there yet.
    fn read(buf: &[u8]) -> Option<Header> {
        let [first, second, ..] = *buf else {
            return None;
        };
        let (payload_len, at) = match second & 0x7f {
            126 => (
                u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?) as u64,
                4,
            ),
            127 => (u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?), 10),
            n => (n as u64, 2),
        };
        let (mask, header_len) = match second & 0x80 {
            0 => (None, at),
            _ => (Some(buf.get(at..at + 4)?.try_into().ok()?), at + 4),
        };
        Some(Header {
            fin: first & 0x80 != 0,
            rsv: first & 0x70,
            opcode: first & 0x0f,
            mask,
            payload_len,
            header_len,
        })
    }
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
    let len = payload.len();
    out.reserve(10 + len);
    out.push(0x80 | kind.opcode());
    if len < 126 {
        out.push(len as u8);
    } else if len <= 0xffff {
        out.push(126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
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
    use std::io::Cursor;
    use tungstenite::protocol::frame::coding::{Control, Data, OpCode};
    use tungstenite::protocol::frame::FrameHeader;

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

    /// The header reader agrees with tungstenite's on every field and on where the header
    /// ends, for random bytes cut at every length: not there yet, reserved opcode (which
    /// tungstenite refuses while reading), or the same header.
    #[test]
    fn headers_read_as_tungstenites_parser_reads_them() {
        let mut rng = crate::test_rng::Rng(0x5eed_f4a3);
        for round in 0..20_000 {
            let mut bytes = [0u8; 14];
            for b in &mut bytes {
                *b = rng.next() as u8;
            }
            // Every length form, often: 7-bit, 16-bit and 64-bit (top bit clear or set).
            bytes[1] = (bytes[1] & 0x80) | [5, 125, 126, 127][round % 4];
            if round % 8 == 3 {
                bytes[2] &= 0x7f;
            }
            for cut in 0..=bytes.len() {
                let ours = Header::read(&bytes[..cut]);
                let mut cursor = Cursor::new(&bytes[..cut]);
                let theirs = FrameHeader::parse(&mut cursor);
                let at = format!("bytes {:02x?} cut {cut}", &bytes[..cut]);
                match (ours, theirs) {
                    (None, Ok(None)) => {}
                    (Some(h), Err(_)) => assert!(
                        matches!(h.opcode, 3..=7 | 11..=15),
                        "tungstenite refused a header with opcode {}: {at}",
                        h.opcode
                    ),
                    (Some(h), Ok(Some((t, len)))) => {
                        let opcode = match t.opcode {
                            OpCode::Data(Data::Continue) => 0,
                            OpCode::Data(Data::Text) => 1,
                            OpCode::Data(Data::Binary) => 2,
                            OpCode::Control(Control::Close) => 8,
                            OpCode::Control(Control::Ping) => 9,
                            OpCode::Control(Control::Pong) => 10,
                            other => panic!("tungstenite took opcode {other:?}: {at}"),
                        };
                        let rsv = [(t.rsv1, 0x40), (t.rsv2, 0x20), (t.rsv3, 0x10)]
                            .iter()
                            .filter(|(set, _)| *set)
                            .fold(0, |acc, (_, bit)| acc | bit);
                        assert_eq!(
                            (h.fin, h.rsv, h.opcode, h.mask, h.payload_len, h.header_len),
                            (
                                t.is_final,
                                rsv,
                                opcode,
                                t.mask,
                                len,
                                cursor.position() as usize
                            ),
                            "{at}"
                        );
                    }
                    (ours, theirs) => panic!(
                        "read {:?}, tungstenite {theirs:?}: {at}",
                        ours.map(|h| h.header_len)
                    ),
                }
            }
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
