//! Minimal client side of RFC 6455: the upgrade request, parsing and checking
//! the server's response, masked frame encoding and unmasked frame decoding.
//! Everything here is pure (no I/O) so it is unit tested below.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use sha1::{Digest, Sha1};
use std::fmt::Write as _;

pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Close code reported when a close frame carries no status (RFC 6455 7.4.1).
pub const CLOSE_NO_STATUS: u16 = 1005;

const WS_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Largest response head (status line + headers) accepted before giving up.
pub const MAX_RESPONSE_HEAD: usize = 16 * 1024;

/// splitmix64: used to derive Sec-WebSocket-Key values from a nonce so the
/// key never has to be stored per connection.
pub fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Sec-WebSocket-Key (base64 of 16 bytes, always 24 ASCII bytes) for a nonce.
pub fn key_from_nonce(nonce: u64) -> [u8; 24] {
    let mut raw = [0u8; 16];
    raw[..8].copy_from_slice(&splitmix64(nonce).to_le_bytes());
    raw[8..].copy_from_slice(&splitmix64(nonce ^ 0x5555_5555_5555_5555).to_le_bytes());
    let mut out = [0u8; 24];
    let n = B64
        .encode_slice(raw, &mut out)
        .expect("16 bytes encode to 24");
    debug_assert_eq!(n, 24);
    out
}

/// Expected Sec-WebSocket-Accept for a Sec-WebSocket-Key.
pub fn accept_for_key(key: &[u8]) -> String {
    let mut h = Sha1::new();
    h.update(key);
    h.update(WS_GUID.as_bytes());
    B64.encode(h.finalize())
}

/// Percent-encode a query component (RFC 3986 unreserved characters pass).
pub fn pct_encode(s: &str, out: &mut String) {
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
}

/// Append an HTTP/1.1 upgrade request to `out`.
pub fn write_request(out: &mut Vec<u8>, host: &str, path_and_query: &str, key: &[u8; 24]) {
    out.extend_from_slice(b"GET ");
    out.extend_from_slice(path_and_query.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    out.extend_from_slice(host.as_bytes());
    out.extend_from_slice(b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: ");
    out.extend_from_slice(key);
    out.extend_from_slice(b"\r\nSec-WebSocket-Version: 13\r\n\r\n");
}

/// Parsed response head.
#[derive(Debug, PartialEq, Eq)]
pub struct Response<'a> {
    pub status: u16,
    /// Bytes of status line + headers + blank line; frames may follow.
    pub head_len: usize,
    pub upgrade_websocket: bool,
    pub connection_upgrade: bool,
    pub accept: Option<&'a [u8]>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum ResponseParse<'a> {
    Incomplete,
    Done(Response<'a>),
    Invalid(&'static str),
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

fn trim(mut s: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = s {
        if first.is_ascii_whitespace() {
            s = rest;
        } else {
            break;
        }
    }
    while let [rest @ .., last] = s {
        if last.is_ascii_whitespace() {
            s = rest;
        } else {
            break;
        }
    }
    s
}

fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| trim(t).eq_ignore_ascii_case(token))
}

/// Parse an HTTP/1.x response head from the start of `buf`.
pub fn parse_response(buf: &[u8]) -> ResponseParse<'_> {
    let Some(head_len) = find_head_end(buf) else {
        if buf.len() > MAX_RESPONSE_HEAD {
            return ResponseParse::Invalid("head_too_large");
        }
        if buf.len() >= 5 && !buf.starts_with(b"HTTP/") {
            return ResponseParse::Invalid("not_http");
        }
        return ResponseParse::Incomplete;
    };
    if head_len > MAX_RESPONSE_HEAD {
        return ResponseParse::Invalid("head_too_large");
    }
    let head = &buf[..head_len - 4];
    let mut lines = head
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let status_line = lines.next().unwrap_or(b"");
    // "HTTP/1.1 101 Switching Protocols"
    if !status_line.starts_with(b"HTTP/1.") || status_line.len() < 12 || status_line[8] != b' ' {
        return ResponseParse::Invalid("bad_status_line");
    }
    let code = &status_line[9..12];
    if !code.iter().all(u8::is_ascii_digit) || status_line.get(12).is_some_and(|&b| b != b' ') {
        return ResponseParse::Invalid("bad_status_line");
    }
    let status =
        (code[0] - b'0') as u16 * 100 + (code[1] - b'0') as u16 * 10 + (code[2] - b'0') as u16;
    let mut resp = Response {
        status,
        head_len,
        upgrade_websocket: false,
        connection_upgrade: false,
        accept: None,
    };
    for line in lines {
        if line.is_empty() {
            continue;
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            return ResponseParse::Invalid("bad_header");
        };
        let name = trim(&line[..colon]);
        let value = trim(&line[colon + 1..]);
        if name.eq_ignore_ascii_case(b"upgrade") {
            resp.upgrade_websocket = value.eq_ignore_ascii_case(b"websocket");
        } else if name.eq_ignore_ascii_case(b"connection") {
            resp.connection_upgrade = has_token(value, b"upgrade");
        } else if name.eq_ignore_ascii_case(b"sec-websocket-accept") {
            resp.accept = Some(value);
        }
    }
    ResponseParse::Done(resp)
}

/// Check a 101 response against the key that was sent.
pub fn check_upgrade(resp: &Response<'_>, key: &[u8]) -> Result<(), &'static str> {
    if resp.status != 101 {
        return Err("status");
    }
    if !resp.upgrade_websocket {
        return Err("missing_upgrade_header");
    }
    if !resp.connection_upgrade {
        return Err("missing_connection_upgrade");
    }
    match resp.accept {
        None => Err("missing_accept"),
        Some(a) if a == accept_for_key(key).as_bytes() => Ok(()),
        Some(_) => Err("bad_accept"),
    }
}

/// XOR `data` with the 4-byte mask, as if `data` started at offset 0 of the payload.
pub fn apply_mask(data: &mut [u8], mask: [u8; 4]) {
    let m4 = u32::from_ne_bytes(mask) as u64;
    let m8 = m4 | (m4 << 32);
    let mut chunks = data.chunks_exact_mut(8);
    for c in &mut chunks {
        let v = u64::from_ne_bytes((&*c).try_into().unwrap()) ^ m8;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    // The chunked part is a multiple of 8, hence of 4: the tail restarts at mask[0].
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

/// Append a masked client frame.
pub fn encode_frame(out: &mut Vec<u8>, fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    out.push(((fin as u8) << 7) | (opcode & 0x0F));
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= u16::MAX as usize {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    let start = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[start..], mask);
}

/// Wire length of an unmasked (server) frame carrying `payload` bytes.
pub fn server_frame_len(payload: usize) -> usize {
    let head = if payload < 126 {
        2
    } else if payload <= u16::MAX as usize {
        4
    } else {
        10
    };
    head + payload
}

/// Append a masked close frame; `code` None sends an empty close body.
pub fn encode_close(out: &mut Vec<u8>, code: Option<u16>, mask: [u8; 4]) {
    match code {
        Some(c) => encode_frame(out, true, OP_CLOSE, &c.to_be_bytes(), mask),
        None => encode_frame(out, true, OP_CLOSE, &[], mask),
    }
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHead {
    pub fin: bool,
    pub rsv: u8,
    pub opcode: u8,
    pub mask: Option<[u8; 4]>,
    pub head_len: usize,
    pub payload_len: u64,
}

/// Decode a frame header at the start of `buf`; None when more bytes are needed.
pub fn parse_frame_head(buf: &[u8]) -> Option<FrameHead> {
    if buf.len() < 2 {
        return None;
    }
    let b0 = buf[0];
    let b1 = buf[1];
    let masked = b1 & 0x80 != 0;
    let (payload_len, mut pos) = match b1 & 0x7F {
        126 => {
            if buf.len() < 4 {
                return None;
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as u64, 4)
        }
        127 => {
            if buf.len() < 10 {
                return None;
            }
            (u64::from_be_bytes(buf[2..10].try_into().unwrap()), 10)
        }
        n => (n as u64, 2),
    };
    let mask = if masked {
        if buf.len() < pos + 4 {
            return None;
        }
        let m = [buf[pos], buf[pos + 1], buf[pos + 2], buf[pos + 3]];
        pos += 4;
        Some(m)
    } else {
        None
    };
    Some(FrameHead {
        fin: b0 & 0x80 != 0,
        rsv: (b0 >> 4) & 0x7,
        opcode: b0 & 0x0F,
        mask,
        head_len: pos,
        payload_len,
    })
}

/// Protocol checks a client applies to every server frame.
pub fn validate_server_frame(h: &FrameHead, max_payload: u64) -> Result<(), &'static str> {
    if h.mask.is_some() {
        return Err("masked_server_frame");
    }
    if h.rsv != 0 {
        return Err("rsv_bits_set");
    }
    match h.opcode {
        OP_CONT | OP_TEXT | OP_BINARY => {}
        OP_CLOSE | OP_PING | OP_PONG => {
            if !h.fin {
                return Err("fragmented_control_frame");
            }
            if h.payload_len > 125 {
                return Err("control_frame_too_long");
            }
        }
        _ => return Err("reserved_opcode"),
    }
    if h.payload_len > max_payload {
        return Err("frame_too_large");
    }
    Ok(())
}

/// Close code carried by a close frame payload.
pub fn close_code(payload: &[u8]) -> u16 {
    if payload.len() >= 2 {
        u16::from_be_bytes([payload[0], payload[1]])
    } else {
        CLOSE_NO_STATUS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unmask_client_frame(buf: &[u8]) -> (FrameHead, Vec<u8>) {
        let h = parse_frame_head(buf).expect("complete head");
        let mut p = buf[h.head_len..h.head_len + h.payload_len as usize].to_vec();
        apply_mask(&mut p, h.mask.expect("client frames are masked"));
        (h, p)
    }

    #[test]
    fn a_server_frame_s_wire_length_counts_its_header() {
        for n in [0, 125, 126, 65_535, 65_536] {
            let head = parse_frame_head(&{
                let mut out = Vec::new();
                encode_frame(&mut out, true, OP_TEXT, &vec![b'x'; n], [0; 4]);
                out
            })
            .unwrap()
            .head_len;
            // A client frame's head carries 4 mask bytes more than the server's.
            assert_eq!(server_frame_len(n), head - 4 + n, "{n}");
        }
    }

    #[test]
    fn rfc_accept_example() {
        // RFC 6455 section 1.3.
        assert_eq!(
            accept_for_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn keys_are_valid_base64_of_16_bytes_and_distinct() {
        let a = key_from_nonce(1);
        let b = key_from_nonce(2);
        assert_ne!(a, b);
        assert_eq!(B64.decode(a).unwrap().len(), 16);
        assert_eq!(key_from_nonce(1), a, "deterministic");
    }

    #[test]
    fn request_format() {
        let mut out = Vec::new();
        let key = key_from_nonce(7);
        write_request(&mut out, "127.0.0.1:8080", "/ws?user=u1", &key);
        let s = String::from_utf8(out).unwrap();
        assert!(s.starts_with("GET /ws?user=u1 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"));
        assert!(s.contains("\r\nUpgrade: websocket\r\n"));
        assert!(s.contains("\r\nConnection: Upgrade\r\n"));
        assert!(s.contains(&format!(
            "\r\nSec-WebSocket-Key: {}\r\n",
            std::str::from_utf8(&key).unwrap()
        )));
        assert!(s.ends_with("Sec-WebSocket-Version: 13\r\n\r\n"));
    }

    #[test]
    fn pct_encoding() {
        let mut s = String::new();
        pct_encode("a b&c=d/é~x", &mut s);
        assert_eq!(s, "a%20b%26c%3Dd%2F%C3%A9~x");
    }

    #[test]
    fn parse_101_with_trailing_frame() {
        let key = b"dGhlIHNhbXBsZSBub25jZQ==";
        let mut buf = b"HTTP/1.1 101 Switching Protocols\r\nupgrade:  WebSocket \r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n".to_vec();
        let head = buf.len();
        buf.extend_from_slice(&[0x81, 0x02, b'h', b'i']);
        match parse_response(&buf) {
            ResponseParse::Done(r) => {
                assert_eq!(r.status, 101);
                assert_eq!(r.head_len, head);
                assert!(r.upgrade_websocket && r.connection_upgrade);
                assert_eq!(check_upgrade(&r, key), Ok(()));
                assert_eq!(
                    check_upgrade(&r, b"AAAAAAAAAAAAAAAAAAAAAA=="),
                    Err("bad_accept")
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn parse_incomplete_and_errors() {
        let full = b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n";
        for cut in 0..full.len() {
            assert_eq!(
                parse_response(&full[..cut]),
                ResponseParse::Incomplete,
                "cut {cut}"
            );
        }
        match parse_response(full) {
            ResponseParse::Done(r) => {
                assert_eq!(r.status, 401);
                assert_eq!(check_upgrade(&r, b"x"), Err("status"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            parse_response(b"SSH-2.0-OpenSSH\r\n"),
            ResponseParse::Invalid("not_http")
        );
        assert_eq!(
            parse_response(b"HTTP/1.1 1x1 Nope\r\n\r\n"),
            ResponseParse::Invalid("bad_status_line")
        );
        let huge = vec![b'H'; MAX_RESPONSE_HEAD + 1];
        let mut h = b"HTTP/1.1 200 OK\r\nX: ".to_vec();
        h.extend_from_slice(&huge);
        assert_eq!(parse_response(&h), ResponseParse::Invalid("head_too_large"));
        let no_accept = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n";
        match parse_response(no_accept) {
            ResponseParse::Done(r) => assert_eq!(check_upgrade(&r, b"k"), Err("missing_accept")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn mask_roundtrip_all_lengths() {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        for len in 0..40 {
            let data: Vec<u8> = (0..len as u8).collect();
            let mut m = data.clone();
            apply_mask(&mut m, mask);
            for (i, (&a, &b)) in data.iter().zip(m.iter()).enumerate() {
                assert_eq!(a ^ mask[i % 4], b);
            }
            apply_mask(&mut m, mask);
            assert_eq!(m, data);
        }
    }

    #[test]
    fn rfc_masked_hello() {
        // RFC 6455 5.7: a single-frame masked text message "Hello".
        let mut out = Vec::new();
        encode_frame(&mut out, true, OP_TEXT, b"Hello", [0x37, 0xfa, 0x21, 0x3d]);
        assert_eq!(
            out,
            [0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58]
        );
    }

    #[test]
    fn encode_lengths_and_decode_back() {
        for &len in &[0usize, 1, 125, 126, 127, 65535, 65536, 70000] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let mut out = Vec::new();
            encode_frame(&mut out, true, OP_BINARY, &payload, [1, 2, 3, 4]);
            let expected_head = match len {
                0..=125 => 6,
                126..=65535 => 8,
                _ => 14,
            };
            let (h, p) = unmask_client_frame(&out);
            assert_eq!(h.head_len, expected_head);
            assert_eq!(h.payload_len as usize, len);
            assert!(h.fin);
            assert_eq!(h.opcode, OP_BINARY);
            assert_eq!(p, payload);
            assert_eq!(out.len(), expected_head + len);
            // Every strict prefix of the head is incomplete.
            for cut in 0..expected_head {
                assert!(parse_frame_head(&out[..cut]).is_none());
            }
        }
    }

    #[test]
    fn close_frames() {
        let mut out = Vec::new();
        encode_close(&mut out, Some(1000), [9, 8, 7, 6]);
        let (h, p) = unmask_client_frame(&out);
        assert_eq!(h.opcode, OP_CLOSE);
        assert_eq!(close_code(&p), 1000);
        out.clear();
        encode_close(&mut out, None, [9, 8, 7, 6]);
        let (_, p) = unmask_client_frame(&out);
        assert_eq!(close_code(&p), CLOSE_NO_STATUS);
    }

    #[test]
    fn decode_server_frames() {
        // Unmasked text "Hello", then a fragmented "Hel" + "lo", then a ping.
        let f = [0x81u8, 0x05, b'H', b'e', b'l', b'l', b'o'];
        let h = parse_frame_head(&f).unwrap();
        assert_eq!(
            (h.fin, h.opcode, h.head_len, h.payload_len),
            (true, OP_TEXT, 2, 5)
        );
        assert_eq!(validate_server_frame(&h, 1 << 20), Ok(()));
        let first = parse_frame_head(&[0x01, 0x03, b'H', b'e', b'l']).unwrap();
        assert!(!first.fin && first.opcode == OP_TEXT);
        let cont = parse_frame_head(&[0x80, 0x02, b'l', b'o']).unwrap();
        assert!(cont.fin && cont.opcode == OP_CONT);
        let ping = parse_frame_head(&[0x89, 0x00]).unwrap();
        assert_eq!(validate_server_frame(&ping, 10), Ok(()));
        // 16-bit and 64-bit lengths.
        let h16 = parse_frame_head(&[0x82, 126, 0x01, 0x00]).unwrap();
        assert_eq!((h16.head_len, h16.payload_len), (4, 256));
        let h64 = parse_frame_head(&[0x82, 127, 0, 0, 0, 0, 0, 1, 0, 0]).unwrap();
        assert_eq!((h64.head_len, h64.payload_len), (10, 65536));
        assert_eq!(validate_server_frame(&h64, 1000), Err("frame_too_large"));
    }

    #[test]
    fn server_frame_violations() {
        let masked = parse_frame_head(&[0x81, 0x81, 1, 2, 3, 4, 5]).unwrap();
        assert_eq!(
            validate_server_frame(&masked, 100),
            Err("masked_server_frame")
        );
        let rsv = parse_frame_head(&[0xC1, 0x00]).unwrap();
        assert_eq!(validate_server_frame(&rsv, 100), Err("rsv_bits_set"));
        let frag_ping = parse_frame_head(&[0x09, 0x00]).unwrap();
        assert_eq!(
            validate_server_frame(&frag_ping, 100),
            Err("fragmented_control_frame")
        );
        let long_ping = parse_frame_head(&[0x89, 126, 0, 126]).unwrap();
        assert_eq!(
            validate_server_frame(&long_ping, 1000),
            Err("control_frame_too_long")
        );
        let reserved = parse_frame_head(&[0x83, 0x00]).unwrap();
        assert_eq!(
            validate_server_frame(&reserved, 100),
            Err("reserved_opcode")
        );
    }
}
