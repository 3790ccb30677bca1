//! `rediss://` really is TLS: a redis-server that only speaks TLS (`--port 0 --tls-port`), a
//! CA and a server certificate this test makes with openssl, and a relay between gateway and
//! Redis that records every byte the gateway sends, to show the password never crosses in
//! clear. A plain `redis://` to the same port, and `rediss://` without the test's CA, do not
//! get a working store.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

const PASSWORD: &str = "tls-test-password-7f3a";

struct TlsRedis {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start_tls_redis() -> TlsRedis {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = std::env::temp_dir().join(format!("ringgate-tls-{}-{port}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    common::certs::make_certs(&dir);
    let p = |f: &str| dir.join(f).to_str().unwrap().to_string();
    let child = Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .args([
            "--tls-cert-file",
            &p("server.pem"),
            "--tls-key-file",
            &p("server.key"),
        ])
        .args([
            "--tls-ca-cert-file",
            &p("ca.pem"),
            "--tls-auth-clients",
            "no",
        ])
        .args(["--requirepass", PASSWORD, "--save", "", "--dir", &p("")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server (apt-get install redis-server)");
    assert!(
        eventually(Duration::from_secs(10), || TcpStream::connect((
            "127.0.0.1",
            port
        ))
        .is_ok()),
        "redis-server did not listen on its TLS port"
    );
    TlsRedis { child, port, dir }
}

/// Listens on a free port and relays every connection to `to`, recording what the client side
/// sends.
fn relay(to: u16) -> (u16, Arc<Mutex<Vec<u8>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let Ok(server) = TcpStream::connect(("127.0.0.1", to)) else {
                continue;
            };
            let (mut c_read, mut s_write) =
                (client.try_clone().unwrap(), server.try_clone().unwrap());
            let record = record.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 16384];
                while let Ok(n) = c_read.read(&mut buf) {
                    if n == 0 || s_write.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    record.lock().unwrap().extend_from_slice(&buf[..n]);
                }
                let _ = s_write.shutdown(std::net::Shutdown::Write);
            });
            let (mut s_read, mut c_write) = (server, client);
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut s_read, &mut c_write);
                let _ = c_write.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    (port, seen)
}

fn ready(gw: &Gateway) -> bool {
    gw.admin_get("/readyz").0 == 200
}

#[test]
fn rediss_is_tls_end_to_end_and_the_password_never_crosses_in_clear() {
    let redis = start_tls_redis();
    let (port, seen) = relay(redis.port);
    let ca = redis.dir.join("ca.pem");
    let url = format!("rediss://:{PASSWORD}@127.0.0.1:{port}");
    let gw = Gateway::start(&["--redis-url", &url, "--redis-tls-ca", ca.to_str().unwrap()]);
    assert!(
        eventually(Duration::from_secs(15), || ready(&gw)),
        "not ready over TLS"
    );
    // A message to an offline user is stored in the TLS Redis and replayed from it.
    let (mut ann, _) = connect_app(&gw, "ann");
    send(&mut ann, "ben", "c1", serde_json::json!("over tls"));
    assert_eq!(next_op(&mut ann, "accepted")["cid"], "c1");
    let (_ben, replay) = connect_replay(&gw, "/ws?user=ben");
    assert_eq!(replay.len(), 1, "{replay:?}");
    assert_eq!(replay[0]["body"], "over tls");

    let bytes = seen.lock().unwrap().clone();
    assert!(bytes.len() > 100, "the relay saw the gateway's traffic");
    assert_eq!(
        &bytes[..2],
        &[0x16, 0x03],
        "it starts with a TLS handshake record"
    );
    let clear = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    assert!(!clear(PASSWORD.as_bytes()), "the password crossed in clear");
    assert!(
        !clear(b"AUTH") && !clear(b"auth"),
        "a command crossed in clear"
    );
}

#[test]
fn without_tls_or_without_the_ca_the_store_does_not_work() {
    let redis = start_tls_redis();
    // Plain redis:// to the TLS port: never ready.
    let plain = Gateway::start(&[
        "--redis-url",
        &format!("redis://:{PASSWORD}@127.0.0.1:{}", redis.port),
        "--redis-timeout-ms",
        "300",
    ]);
    // rediss:// trusting only the system's roots, which do not hold the test's CA: never ready.
    let untrusted = Gateway::start(&[
        "--redis-url",
        &format!("rediss://:{PASSWORD}@127.0.0.1:{}", redis.port),
        "--redis-timeout-ms",
        "300",
    ]);
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        !ready(&plain),
        "a plain connection to a TLS-only Redis worked"
    );
    assert!(
        !ready(&untrusted),
        "a certificate from an unknown CA was trusted"
    );
    // And the log says why.
    let log: Vec<String> = untrusted.stderr.try_iter().collect();
    assert!(
        log.iter()
            .any(|l| l.to_ascii_lowercase().contains("certificate")),
        "no certificate error in the log: {log:#?}"
    );
}
