//! The demo chat page (issue 18), served on the public listener in dev mode only (no
//! `jwt_secret`, every listener on loopback), so that `cargo run --release` and a browser at
//! `http://127.0.0.1:8080/demo/` show two users chatting through the gateway itself. The files
//! are `clients/js/demo/` and the client library, embedded at build time.

/// `(path, content type, bytes)`. The page imports the library as `../src/ringgate.js`, which
/// resolves to `/src/ringgate.js` from `/demo/`.
const ASSETS: [(&str, &str, &[u8]); 3] = [
    (
        "/demo/",
        "text/html; charset=utf-8",
        include_bytes!("../../clients/js/demo/index.html"),
    ),
    (
        "/demo/demo.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../clients/js/demo/demo.js"),
    ),
    (
        "/src/ringgate.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../clients/js/src/ringgate.js"),
    ),
];

/// The whole HTTP response for `GET path`, when `path` is a demo file (`/demo` redirects).
pub fn response(path: &str) -> Option<Vec<u8>> {
    if path == "/demo" {
        return Some(
            b"HTTP/1.1 308 Permanent Redirect\r\nlocation: /demo/\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                .to_vec(),
        );
    }
    let (_, content_type, body) = ASSETS.iter().find(|(p, _, _)| *p == path)?;
    let mut out = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\ncache-control: no-store\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serves_each_asset_and_redirects_the_bare_path() {
        for (path, content_type, body) in ASSETS {
            let resp = response(path).unwrap();
            let text = String::from_utf8_lossy(&resp);
            assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{path}");
            assert!(text.contains(content_type), "{path}");
            assert!(resp.ends_with(body), "{path}");
        }
        assert!(String::from_utf8_lossy(&response("/demo").unwrap()).contains("location: /demo/"));
        assert!(response("/demo/../Cargo.toml").is_none());
        assert!(response("/ws").is_none());
    }
}
