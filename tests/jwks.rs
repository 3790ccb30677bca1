//! RS256 / ES256 tokens verified with the keys of a JWKS URL, end to end: RSA and P-256 keys
//! made with openssl, tokens signed with jsonwebtoken, a JWKS server in this test on a free
//! loopback port (plain HTTP, or HTTPS with a CA made with openssl) that counts the requests
//! it answers and can swap its key set or go down, and a real gateway process.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| {
        panic!(
            "cannot run {cmd:?}: {e}. These tests need openssl: `sudo apt-get install openssl` \
             (tests/run.sh installs it by itself)"
        )
    });
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A scratch directory, removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let dir = std::env::temp_dir().join(format!("ringgate-jwks-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Dir(dir)
    }

    fn path(&self, file: &str) -> String {
        self.0.join(file).to_str().unwrap().to_string()
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A signing key made with openssl, and its kid.
struct Key {
    alg: Algorithm,
    kid: String,
    key: EncodingKey,
}

impl Key {
    fn rsa(dir: &Dir, kid: &str) -> Key {
        let (pem, der) = (
            dir.path(&format!("{kid}.pem")),
            dir.path(&format!("{kid}.der")),
        );
        run(Command::new("openssl").args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            &pem,
        ]));
        // PKCS#1 DER: what jsonwebtoken's RSA key takes without its `use_pem` feature.
        run(Command::new("openssl").args([
            "rsa",
            "-in",
            &pem,
            "-traditional",
            "-outform",
            "DER",
            "-out",
            &der,
        ]));
        Key {
            alg: Algorithm::RS256,
            kid: kid.into(),
            key: EncodingKey::from_rsa_der(&std::fs::read(&der).unwrap()),
        }
    }

    fn p256(dir: &Dir, kid: &str) -> Key {
        let (pem, der) = (
            dir.path(&format!("{kid}.pem")),
            dir.path(&format!("{kid}.der")),
        );
        run(Command::new("openssl").args([
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            &pem,
        ]));
        run(Command::new("openssl").args([
            "pkcs8", "-topk8", "-nocrypt", "-in", &pem, "-outform", "DER", "-out", &der,
        ]));
        Key {
            alg: Algorithm::ES256,
            kid: kid.into(),
            key: EncodingKey::from_ec_der(&std::fs::read(&der).unwrap()),
        }
    }

    /// The public half as a JWK (what an identity provider publishes).
    fn jwk(&self) -> serde_json::Value {
        let mut jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&self.key, self.alg).unwrap();
        jwk.common.key_id = Some(self.kid.clone());
        serde_json::to_value(jwk).unwrap()
    }

    /// A token for `sub`, valid for ten minutes, with this key's kid (or `kid`).
    fn token(&self, sub: &str) -> String {
        self.token_as(sub, &self.kid)
    }

    fn token_as(&self, sub: &str, kid: &str) -> String {
        let mut header = Header::new(self.alg);
        header.kid = Some(kid.into());
        let claims = serde_json::json!({"sub": sub, "exp": ringgate::auth::now_unix() + 600});
        jsonwebtoken::encode(&header, &claims, &self.key).unwrap()
    }
}

fn jwks(keys: &[&Key]) -> String {
    serde_json::json!({"keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>()}).to_string()
}

/// What the JWKS server answers: the document, or 503 while `body` is None.
struct State {
    body: Option<String>,
    requests: usize,
}

/// A JWKS server on a free loopback port: one request per connection, answered from `state`.
struct JwksServer {
    port: u16,
    state: Arc<Mutex<State>>,
}

impl JwksServer {
    fn start(body: &str, tls: Option<Arc<rustls::ServerConfig>>) -> JwksServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(State {
            body: Some(body.into()),
            requests: 0,
        }));
        let shared = state.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                match &tls {
                    None => serve_one(stream, &shared),
                    Some(config) => {
                        let conn = rustls::ServerConnection::new(config.clone()).unwrap();
                        let mut tls = rustls::StreamOwned::new(conn, stream);
                        serve_one(&mut tls, &shared);
                        tls.conn.send_close_notify();
                        let _ = tls.flush();
                    }
                }
            }
        });
        JwksServer { port, state }
    }

    fn url(&self, scheme: &str) -> String {
        format!("{scheme}://127.0.0.1:{}/.well-known/jwks.json", self.port)
    }

    fn requests(&self) -> usize {
        self.state.lock().unwrap().requests
    }

    fn serve(&self, body: Option<String>) {
        self.state.lock().unwrap().body = body;
    }
}

fn serve_one<S: Read + Write>(mut stream: S, state: &Mutex<State>) {
    let mut reader = BufReader::new(&mut stream);
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() || request_line.is_empty() {
        return; // e.g. a TLS handshake the client gave up on
    }
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) if line == "\r\n" => break,
            Ok(_) => {}
        }
    }
    assert!(request_line.starts_with("GET /.well-known/jwks.json HTTP/1.1"));
    let body = {
        let mut s = state.lock().unwrap();
        s.requests += 1;
        s.body.clone()
    };
    let response = match body {
        Some(b) => format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b}",
            b.len()
        ),
        None => "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            .to_string(),
    };
    let _ = stream.write_all(response.as_bytes());
    let _ = stream.flush();
}

/// Connect with `token`: the welcome's user, or the refusal's status and body.
fn attempt(gw: &Gateway, token: &str) -> Result<String, (u16, String)> {
    match connect_with(gw, "/ws", &[("authorization", &format!("Bearer {token}"))]) {
        Ok(mut ws) => {
            let welcome = recv_json(&mut ws);
            assert_eq!(welcome["op"], "welcome", "{welcome}");
            Ok(welcome["user"].as_str().unwrap().to_string())
        }
        Err(tungstenite::Error::Http(response)) => Err((
            response.status().as_u16(),
            String::from_utf8_lossy(response.body().as_deref().unwrap_or_default()).to_string(),
        )),
        Err(e) => panic!("upgrade: {e}"),
    }
}

/// The refusal of `token`: 401 with an "invalid token" body; returns the body.
fn refused(gw: &Gateway, token: &str) -> String {
    match attempt(gw, token) {
        Ok(user) => panic!("token accepted as {user}"),
        Err((status, body)) => {
            assert_eq!(status, 401, "{body}");
            assert!(body.contains("invalid token"), "{body}");
            body
        }
    }
}

fn b64url(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().fold(0u32, |n, &b| (n << 8) | b as u32) << (8 * (3 - chunk.len()));
        for i in 0..=chunk.len() {
            out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// RS256 and ES256 tokens connect as their `sub` next to HS256 ones (both keys configured);
/// a token signed by a key not in the set, `alg: none`, and an HS256 token whose HMAC key is
/// the published RSA key are refused with 401.
#[test]
fn rs256_and_es256_tokens_connect_and_forgeries_are_refused() {
    let dir = Dir::new("basic");
    let (r1, e1, stranger) = (
        Key::rsa(&dir, "r1"),
        Key::p256(&dir, "e1"),
        Key::rsa(&dir, "x"),
    );
    let server = JwksServer::start(&jwks(&[&r1, &e1]), None);
    let gw = Gateway::start(&["--jwks-url", &server.url("http"), "--jwt-secret", SECRET]);
    assert_eq!(server.requests(), 1, "fetched once before ready");
    assert_eq!(gw.metric(r#"ringgate_jwks_keys{shard="process"}"#), 2);
    // SPEC 6: every series labelled `shard`, the JWKS ones (process-wide) included.
    let (_, metrics) = gw.admin_get("/metrics");
    let jwks_lines: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("ringgate_jwks_"))
        .collect();
    assert_eq!(jwks_lines.len(), 3, "{metrics}");
    for line in jwks_lines {
        assert!(line.contains("{shard=\"process\"} "), "{line}");
    }
    assert_eq!(attempt(&gw, &r1.token("alice")), Ok("alice".into()));
    assert_eq!(attempt(&gw, &e1.token("bob")), Ok("bob".into()));
    let hs = ringgate::auth::mint(SECRET, "carol", None, 60);
    assert_eq!(attempt(&gw, &hs), Ok("carol".into()));

    let body = refused(&gw, &stranger.token_as("mallory", "r1"));
    assert!(body.contains("InvalidSignature"), "{body}");
    let body = refused(&gw, &e1.token_as("mallory", "r1"));
    assert!(body.contains("not for ES256"), "{body}");
    let claims = serde_json::json!({"sub": "mallory", "exp": ringgate::auth::now_unix() + 600});
    let none = format!(
        "{}.{}.",
        b64url(br#"{"alg":"none","kid":"r1"}"#),
        b64url(claims.to_string().as_bytes())
    );
    refused(&gw, &none);
    // Algorithm confusion: HS256 "signed" with what the JWKS publishes of r1.
    let n = r1.jwk()["n"].as_str().unwrap().to_string();
    for hmac_key in [n.into_bytes(), r1.jwk().to_string().into_bytes()] {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("r1".into());
        let forged =
            jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(&hmac_key)).unwrap();
        let body = refused(&gw, &forged);
        assert!(body.contains("InvalidSignature"), "{body}");
    }
    assert_eq!(server.requests(), 1, "no kid was unknown: no refetch");
}

/// Rotation through an unknown kid: the server swaps r1 for r2; the first r2 token is refused
/// and makes one refetch, after which r2 connects and r1 is refused. A flood of made-up kids
/// then costs no fetch (one per jwks_refetch_min_ms, here 10 minutes). With no jwt_secret,
/// HS256 tokens are refused.
#[test]
fn an_unknown_kid_refetches_once_and_rotation_drops_removed_kids() {
    let dir = Dir::new("refetch");
    let (r1, r2) = (Key::rsa(&dir, "r1"), Key::rsa(&dir, "r2"));
    let server = JwksServer::start(&jwks(&[&r1]), None);
    let gw = Gateway::start(&[
        "--jwks-url",
        &server.url("http"),
        "--jwks-refetch-min-ms",
        "600000",
    ]);
    assert_eq!(attempt(&gw, &r1.token("alice")), Ok("alice".into()));
    let body = refused(&gw, &ringgate::auth::mint(SECRET, "alice", None, 60));
    assert!(body.contains("no jwt_secret"), "{body}");
    assert_eq!(server.requests(), 1);

    server.serve(Some(jwks(&[&r2])));
    let body = refused(&gw, &r2.token("bob"));
    assert!(body.contains("unknown kid"), "{body}");
    assert!(
        eventually(Duration::from_secs(10), || server.requests() == 2),
        "one refetch for the unknown kid; requests {}",
        server.requests()
    );
    assert!(
        eventually(Duration::from_secs(10), || attempt(&gw, &r2.token("bob"))
            .is_ok()),
        "the rotated-in key works after the refetch"
    );
    assert!(refused(&gw, &r1.token("alice")).contains("unknown kid"));
    assert_eq!(gw.metric(r#"ringgate_jwks_keys{shard="process"}"#), 1);
    assert_eq!(
        gw.metric(r#"ringgate_jwks_fetches_total{shard="process"}"#),
        2
    );

    for i in 0..30 {
        refused(&gw, &r2.token_as("mallory", &format!("bogus-{i}")));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        server.requests(),
        2,
        "unknown kids within jwks_refetch_min_ms make no further fetch"
    );
    assert_eq!(attempt(&gw, &r2.token("bob")), Ok("bob".into()));
}

/// The periodic refresh (jwks_refresh_ms) takes a new key without any unknown kid; a JWKS
/// that answers 503 keeps the keys in use (failures counted); back up without r1, r1 is
/// refused.
#[test]
fn the_refresh_rotates_keys_and_a_failed_refresh_keeps_them() {
    let dir = Dir::new("refresh");
    let (r1, e2) = (Key::rsa(&dir, "r1"), Key::p256(&dir, "e2"));
    let server = JwksServer::start(&jwks(&[&r1]), None);
    let gw = Gateway::start(&[
        "--jwks-url",
        &server.url("http"),
        "--jwks-refresh-ms",
        "200",
        "--jwks-refetch-min-ms",
        "600000",
    ]);
    // Two fetches that began after a change are one whole fetch of the changed set.
    let two_more = |server: &JwksServer| {
        let seen = server.requests();
        assert!(
            eventually(Duration::from_secs(10), || server.requests() >= seen + 2),
            "the JWKS is refreshed every 200 ms"
        );
    };
    server.serve(Some(jwks(&[&r1, &e2])));
    two_more(&server);
    assert_eq!(attempt(&gw, &e2.token("bob")), Ok("bob".into()));
    assert_eq!(gw.metric(r#"ringgate_jwks_keys{shard="process"}"#), 2);
    assert_eq!(
        gw.metric(r#"ringgate_jwks_refresh_failures_total{shard="process"}"#),
        0
    );

    server.serve(None);
    assert!(
        eventually(Duration::from_secs(10), || {
            gw.metric(r#"ringgate_jwks_refresh_failures_total{shard="process"}"#) >= 3
        }),
        "failed refreshes are counted"
    );
    assert_eq!(attempt(&gw, &r1.token("alice")), Ok("alice".into()));
    assert_eq!(attempt(&gw, &e2.token("bob")), Ok("bob".into()));
    assert_eq!(
        gw.metric(r#"ringgate_jwks_keys{shard="process"}"#),
        2,
        "the old keys stay"
    );

    server.serve(Some(jwks(&[&e2])));
    two_more(&server);
    assert!(refused(&gw, &r1.token("alice")).contains("unknown kid"));
    assert_eq!(attempt(&gw, &e2.token("bob")), Ok("bob".into()));
    assert_eq!(gw.metric(r#"ringgate_jwks_keys{shard="process"}"#), 1);
}

/// Run `ringgate serve` with `args`, expecting it to exit at start within `within`; returns
/// (exit code, stdout, stderr, time taken).
fn failed_start(args: &[&str], within: Duration) -> (Option<i32>, String, String, Duration) {
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ringgate"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--shards",
            "1",
        ])
        .args(args)
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if started.elapsed() > within {
            let _ = child.kill();
            let _ = child.wait();
            panic!("ringgate still running after {within:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let took = started.elapsed();
    let mut out = String::new();
    let mut err = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (code, out, err, took)
}

/// No key set, no start: a JWKS URL nobody answers, and one that answers a set with no usable
/// key, each end start-up (exit 3: the environment, not the config; never "listening") with a message naming jwks_url, after
/// the retries of the start budget (10 s).
#[test]
fn jwks_down_at_start_fails_start_naming_jwks_url() {
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let down = format!("http://127.0.0.1:{port}/.well-known/jwks.json");
    let useless = JwksServer::start(r#"{"keys":[{"kty":"oct","k":"c2VjcmV0","kid":"s"}]}"#, None);
    let useless_url = useless.url("http");
    let other = std::thread::spawn(move || {
        failed_start(&["--jwks-url", &useless_url], Duration::from_secs(40))
    });
    let (code, out, err, took) = failed_start(&["--jwks-url", &down], Duration::from_secs(40));
    assert_eq!(code, Some(3), "{err}");
    assert!(!out.contains("listening"), "{out}");
    assert!(
        err.contains(&format!("cannot fetch jwks_url {down}")) && err.contains("connect"),
        "{err}"
    );
    assert!(
        took >= Duration::from_secs(5),
        "retried for a while: {took:?}"
    );
    let (code, out, err, _) = other.join().unwrap();
    assert_eq!(code, Some(3), "{err}");
    assert!(!out.contains("listening"), "{out}");
    assert!(
        err.contains("jwks_url") && err.contains("no usable"),
        "{err}"
    );
    assert!(useless.requests() >= 2, "retried");
}

/// A CA, and a certificate for 127.0.0.1 signed by it, in `dir`.
fn make_certs(dir: &Dir) {
    common::certs::make_certs(&dir.0);
}

fn server_tls(dir: &Dir) -> Arc<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer> =
        CertificateDer::pem_file_iter(Path::new(&dir.path("server.pem")))
            .unwrap()
            .map(Result::unwrap)
            .collect();
    let key = PrivateKeyDer::from_pem_file(Path::new(&dir.path("server.key"))).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    Arc::new(config)
}

/// https:// with the test's CA in jwks_ca_file: the set is fetched over TLS and its keys
/// verify tokens. Without the CA (the system's roots) the server's certificate is not
/// trusted and start-up fails naming jwks_url. A CA file with an http:// URL is refused.
#[test]
fn https_jwks_with_a_ca_file() {
    let dir = Dir::new("tls");
    make_certs(&dir);
    let e1 = Key::p256(&dir, "e1");
    let server = JwksServer::start(&jwks(&[&e1]), Some(server_tls(&dir)));
    let url = server.url("https");
    let untrusted_url = url.clone();
    let untrusted = std::thread::spawn(move || {
        failed_start(&["--jwks-url", &untrusted_url], Duration::from_secs(40))
    });
    let ca = dir.path("ca.pem");
    let gw = Gateway::start(&["--jwks-url", &url, "--jwks-ca-file", &ca]);
    assert_eq!(attempt(&gw, &e1.token("bob")), Ok("bob".into()));
    refused(&gw, &e1.token_as("bob", "e9"));

    let (code, out, err, _) = untrusted.join().unwrap();
    assert_eq!(code, Some(3), "{err}");
    assert!(!out.contains("listening"), "{out}");
    assert!(
        err.contains("jwks_url") && err.contains("TLS") && err.contains("certificate"),
        "{err}"
    );

    let plain = run_ringgate(
        &[
            "config",
            "--jwks-url",
            &server.url("http"),
            "--jwks-ca-file",
            &ca,
        ],
        &[],
    );
    let err = String::from_utf8_lossy(&plain.stderr);
    assert_eq!(plain.status.code(), Some(2), "{err}");
    assert!(
        err.contains("`jwks_ca_file`") && err.contains("https"),
        "{err}"
    );
    let missing = run_ringgate(
        &[
            "config",
            "--jwks-url",
            &url,
            "--jwks-ca-file",
            "/nonexistent/ca.pem",
        ],
        &[],
    );
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(err.contains("`jwks_ca_file`"), "{err}");
    let bad = run_ringgate(&["config", "--jwks-url", "ftp://x/keys"], &[]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("`jwks_url`"), "{err}");
}
