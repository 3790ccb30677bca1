//! `wss://` on the public listener (SPEC section 2, issue 19): a real gateway given a
//! certificate this test makes with openssl, real TLS clients (rustls) that trust only the
//! test's CA, chat across shards (so sessions are handed to their home shard with their TLS
//! state), a message larger than a TLS record, a plain client refused, and the certificate
//! replaced on SIGHUP while a connection made before keeps working; a broken file on SIGHUP
//! keeps the certificate in use. Under both socket drivers (`io_driver = "glommio"` and
//! `"uring"`: the same sans-IO TLS layer sits between either driver's socket and the
//! connection), each in a test of its own.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::certs::{make_ca, make_cert};
use common::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

type TlsWs = tungstenite::WebSocket<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>;

/// A fresh directory per test (the tests of this file run in parallel in one process).
fn temp_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ringgate-tls-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn client_config(ca: &Path) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// A `wss://` client: TLS to 127.0.0.1 (verified against the test CA), then the upgrade.
fn connect_tls(gw: &Gateway, config: &Arc<rustls::ClientConfig>, path: &str) -> TlsWs {
    let tcp = TcpStream::connect(gw.public).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let conn = rustls::ClientConnection::new(config.clone(), name).unwrap();
    let stream = rustls::StreamOwned::new(conn, tcp);
    let url = format!("ws://{}{path}", gw.public);
    match tungstenite::client(url.as_str(), stream) {
        Ok((ws, _)) => ws,
        Err(e) => panic!("wss upgrade failed: {e}"),
    }
}

fn json(ws: &mut TlsWs) -> serde_json::Value {
    loop {
        match ws.read().expect("read") {
            tungstenite::Message::Text(t) => return serde_json::from_str(&t).unwrap(),
            tungstenite::Message::Ping(_) | tungstenite::Message::Pong(_) => {}
            other => panic!("expected text, got {other:?}"),
        }
    }
}

fn op(ws: &mut TlsWs, want: &str) -> serde_json::Value {
    let v = json(ws);
    assert_eq!(v["op"], want, "{v}");
    v
}

fn text(ws: &mut TlsWs, t: String) {
    ws.send(tungstenite::Message::text(t)).expect("send");
}

/// The certificate the server showed on this connection.
fn peer_cert(ws: &TlsWs) -> Vec<u8> {
    ws.get_ref().conn.peer_certificates().expect("certificates")[0].to_vec()
}

#[test]
fn wss_on_glommio_serves_chat_across_shards_and_reloads_its_certificate_on_sighup() {
    wss_serves_chat_across_shards_and_reloads_its_certificate_on_sighup("glommio");
}

#[test]
fn wss_on_uring_serves_chat_across_shards_and_reloads_its_certificate_on_sighup() {
    wss_serves_chat_across_shards_and_reloads_its_certificate_on_sighup("uring");
}

fn wss_serves_chat_across_shards_and_reloads_its_certificate_on_sighup(driver: &str) {
    let dir = temp_dir(&format!("chat-{driver}"));
    make_ca(&dir);
    make_cert(&dir, "first", "first");
    let cert = dir.join("server.pem");
    let key = dir.join("server.key");
    std::fs::copy(dir.join("first.pem"), &cert).unwrap();
    std::fs::copy(dir.join("first.key"), &key).unwrap();
    let gw = Gateway::start(&[
        "--io-driver",
        driver,
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ]);
    let config = client_config(&dir.join("ca.pem"));
    let first_der = CertificateDer::from_pem_file(dir.join("first.pem"))
        .unwrap()
        .to_vec();

    // Users homed on both shards; connect until one connection landed off its home shard
    // and was handed over with its TLS session (1/2 chance each).
    let users = [user_on("ta", 0, 2), user_on("tb", 1, 2)];
    let mut socks: Vec<TlsWs> = Vec::new();
    for round in 0.. {
        assert!(round < 20, "no connection ever landed off its home shard");
        for user in &users {
            let mut ws = connect_tls(&gw, &config, &format!("/ws?user={user}"));
            assert_eq!(op(&mut ws, "welcome")["user"], user.as_str());
            op(&mut ws, "synced");
            assert_eq!(peer_cert(&ws), first_der);
            socks.push(ws);
        }
        if gw.metric_sum("ringgate_handoffs_out_total") > 0 {
            break;
        }
    }
    // Both ways, one message larger than a TLS record (16 KiB).
    let big = "x".repeat(60_000);
    let n = socks.len();
    for (from, to, body) in [(0, 1, "hello".to_string()), (1, 0, big.clone())] {
        let (sender, recipient) = (n - 2 + from, n - 2 + to);
        let send =
            serde_json::json!({"op":"send","to":users[to],"cid":format!("c{from}"),"body":body});
        text(&mut socks[sender], send.to_string());
        assert_eq!(
            op(&mut socks[sender], "accepted")["cid"],
            format!("c{from}")
        );
        // (The recipient of the second message may hear `delivered` for its own first.)
        let msg = loop {
            let v = json(&mut socks[recipient]);
            if v["op"] != "delivered" {
                break v;
            }
        };
        assert_eq!(msg["op"], "msg", "{msg}");
        assert_eq!(msg["body"], body.as_str());
        assert_eq!(msg["from"], users[from].as_str());
        text(
            &mut socks[recipient],
            serde_json::json!({"op":"ack","seq":msg["seq"]}).to_string(),
        );
    }

    // A client that does not speak TLS gets no upgrade.
    let mut plain = TcpStream::connect(gw.public).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    plain
        .write_all(b"GET /ws?user=p HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer);
    assert!(
        !String::from_utf8_lossy(&answer).contains("101"),
        "{answer:?}"
    );

    // A new certificate on SIGHUP: new connections get it, an old one keeps chatting.
    make_cert(&dir, "second", "second");
    std::fs::copy(dir.join("second.pem"), &cert).unwrap();
    std::fs::copy(dir.join("second.key"), &key).unwrap();
    let second_der = CertificateDer::from_pem_file(dir.join("second.pem"))
        .unwrap()
        .to_vec();
    let hup = || {
        // SAFETY: signalling our own child.
        assert_eq!(unsafe { libc::kill(gw.child.id() as i32, libc::SIGHUP) }, 0);
    };
    hup();
    let mut fresh = None;
    assert!(
        eventually(Duration::from_secs(10), || {
            let ws = connect_tls(&gw, &config, "/ws?user=late");
            let reloaded = peer_cert(&ws) == second_der;
            fresh = Some(ws);
            reloaded
        }),
        "the new certificate was never served"
    );
    let mut fresh = fresh.unwrap();
    op(&mut fresh, "welcome");
    text(
        &mut socks[n - 2],
        serde_json::json!({"op":"ping"}).to_string(),
    );
    op(&mut socks[n - 2], "pong");

    // A broken file on SIGHUP: refused, logged, the second certificate stays.
    std::fs::write(&cert, "not a certificate").unwrap();
    hup();
    assert!(
        eventually(Duration::from_secs(10), || gw
            .stderr
            .try_iter()
            .any(|l| l.contains("NOT reloaded"))),
        "no error logged for the broken certificate"
    );
    let ws = connect_tls(&gw, &config, "/ws?user=later");
    assert_eq!(peer_cert(&ws), second_der);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn tls_keys_are_refused_alone_or_broken_naming_the_key() {
    let dir = temp_dir("config");
    std::fs::create_dir_all(&dir).unwrap();
    let junk = dir.join("junk.pem");
    std::fs::write(&junk, "junk").unwrap();
    let junk = junk.to_str().unwrap();
    for (args, key) in [
        (vec!["--tls-cert", junk], "tls_key"),
        (vec!["--tls-key", junk], "tls_cert"),
        (vec!["--tls-cert", junk, "--tls-key", junk], "tls_cert"),
    ] {
        let mut all = vec!["config", "--print"];
        all.extend(args);
        let out = run_ringgate(&all, &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{all:?} accepted");
        assert!(err.contains(&format!("`{key}`")), "{all:?}: {err}");
    }
}
