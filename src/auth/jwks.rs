//! JWKS: the public keys RS256 / ES256 client tokens are verified with, fetched from
//! `jwks_url` (http:// or https://).
//!
//! Who owns what: one thread (`ringgate-jwks`, its own tokio current-thread runtime, as the
//! push worker has) owns the fetching: the first fetch, before the gateway reports ready
//! ([`start`] fails naming `jwks_url` if it cannot get a key set within [`START_BUDGET`]); a
//! refresh every `jwks_refresh_ms`; and a refetch when a shard meets an unknown `kid`, at most
//! one per `jwks_refetch_min_ms` (requests in between are folded into one at the end of that
//! window, so a flood of made-up kids costs one fetch per window). A failed fetch keeps the
//! keys there were (logged, counted); a set with no usable key counts as a failure.
//!
//! Shards only read: [`Jwks::keys`] clones the `Arc` of the current [`KeySet`] under a read
//! lock held for that clone, and [`Jwks::refetch`] is a `try_send` on a channel of one. A
//! shard never waits on the network or on the fetcher; the token that asked for a refetch is
//! refused (its client retries).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use jsonwebtoken::{Algorithm, DecodingKey};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::http_url::HttpUrl;
use crate::metrics::{Counter, Gauge};

/// The first fetch may take this long, retries included, before start-up gives up.
pub const START_BUDGET: Duration = Duration::from_secs(10);
/// One fetch (connect, TLS, request, whole response) is bounded by this.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// A key set larger than this is refused (a JWKS of a few keys is a few KiB).
pub const MAX_BODY: usize = 1 << 20;

pub const JWKS_KEYS: &str = "ringgate_jwks_keys";
pub const JWKS_FETCHES: &str = "ringgate_jwks_fetches_total";
pub const JWKS_FAILURES: &str = "ringgate_jwks_refresh_failures_total";

/// What the fetcher needs (from the config keys `jwks_*`).
#[derive(Debug, Clone)]
pub struct JwksSettings {
    pub url: String,
    pub ca_file: Option<PathBuf>,
    pub refresh: Duration,
    pub refetch_min: Duration,
}

/// One usable verification key.
struct Key {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

/// The verification keys of one fetched JWKS: RSA keys (RS256) and P-256 keys (ES256) meant
/// for signatures. Immutable; replaced whole on a refresh.
pub struct KeySet {
    keys: Vec<Key>,
}

/// What a token's `kid` and `alg` find in a [`KeySet`].
pub enum Lookup<'a> {
    Found(&'a DecodingKey),
    /// The kid is there, but its key is not for this alg (e.g. ES256 with an RSA key).
    WrongAlg,
    /// No key with this kid: refetch (rate-limited) and refuse the token.
    Unknown,
    /// No kid in the token and not exactly one key for its alg.
    NoKid,
}

impl KeySet {
    /// Parse a JWKS document (`{"keys":[...]}`). Keys this gateway cannot use (other key
    /// types or curves, `use` other than `sig`, an `alg` other than RS256/ES256, bad
    /// parameters) are skipped and named in the second value; no usable key is an error.
    pub fn parse(json: &[u8]) -> Result<(KeySet, Vec<String>), String> {
        #[derive(serde::Deserialize)]
        struct Doc {
            keys: Vec<serde_json::Value>,
        }
        let doc: Doc =
            serde_json::from_slice(json).map_err(|e| format!("not a JWKS document: {e}"))?;
        let mut keys = Vec::new();
        let mut skipped = Vec::new();
        for (i, jwk) in doc.keys.iter().enumerate() {
            match parse_key(jwk) {
                Ok(key) => keys.push(key),
                Err(why) => skipped.push(format!("key {i}: {why}")),
            }
        }
        if keys.is_empty() {
            return Err(format!(
                "no usable RS256/ES256 signing key in the set ({} keys: {})",
                doc.keys.len(),
                skipped.join("; ")
            ));
        }
        Ok((KeySet { keys }, skipped))
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The key for a token with this `kid` (if any) and `alg` (RS256 or ES256).
    pub fn find(&self, kid: Option<&str>, alg: Algorithm) -> Lookup<'_> {
        match kid {
            Some(kid) => {
                let mut seen = false;
                for k in self.keys.iter().filter(|k| k.kid.as_deref() == Some(kid)) {
                    if k.alg == alg {
                        return Lookup::Found(&k.key);
                    }
                    seen = true;
                }
                if seen {
                    Lookup::WrongAlg
                } else {
                    Lookup::Unknown
                }
            }
            None => {
                let mut of_alg = self.keys.iter().filter(|k| k.alg == alg);
                match (of_alg.next(), of_alg.next()) {
                    (Some(k), None) => Lookup::Found(&k.key),
                    _ => Lookup::NoKid,
                }
            }
        }
    }
}

fn parse_key(jwk: &serde_json::Value) -> Result<Key, String> {
    let field = |name: &str| jwk.get(name).and_then(|v| v.as_str());
    if let Some(u) = field("use") {
        if u != "sig" {
            return Err(format!("use {u:?} (not sig)"));
        }
    }
    let kid = field("kid").map(str::to_string);
    let (alg, key) = match field("kty") {
        Some("RSA") => {
            let (Some(n), Some(e)) = (field("n"), field("e")) else {
                return Err("RSA key without n and e".into());
            };
            let key = DecodingKey::from_rsa_components(n, e).map_err(|e| e.to_string())?;
            (Algorithm::RS256, key)
        }
        Some("EC") => {
            let crv = field("crv").unwrap_or("");
            if crv != "P-256" {
                return Err(format!("EC curve {crv:?} (only P-256, for ES256)"));
            }
            let (Some(x), Some(y)) = (field("x"), field("y")) else {
                return Err("EC key without x and y".into());
            };
            let key = DecodingKey::from_ec_components(x, y).map_err(|e| e.to_string())?;
            (Algorithm::ES256, key)
        }
        other => return Err(format!("kty {other:?} (only RSA and EC)")),
    };
    if let Some(a) = field("alg") {
        let want = if alg == Algorithm::RS256 {
            "RS256"
        } else {
            "ES256"
        };
        if a != want {
            return Err(format!("alg {a:?} (only RS256 and ES256)"));
        }
    }
    Ok(Key { kid, alg, key })
}

/// The fetcher's counters (written by the fetcher thread only).
#[derive(Default)]
pub struct JwksMetrics {
    pub keys: Gauge,
    pub fetches: Counter,
    pub failures: Counter,
}

impl JwksMetrics {
    /// Prometheus text of the JWKS series: one key set for the whole process, so labelled
    /// `shard="process"` like the other process-wide series (`metrics` module doc).
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let series: [(&str, &str, &str, u64); 3] = [
            (
                JWKS_KEYS,
                "gauge",
                "Verification keys in the JWKS in use (RS256/ES256).",
                self.keys.get(),
            ),
            (
                JWKS_FETCHES,
                "counter",
                "JWKS fetches that replaced the key set (start, periodic refresh, unknown kid).",
                self.fetches.get(),
            ),
            (
                JWKS_FAILURES,
                "counter",
                "JWKS fetches after start that failed; the keys in use stay.",
                self.failures.get(),
            ),
        ];
        for (name, kind, help, v) in series {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{shard=\"process\"}} {v}"
            );
        }
    }
}

/// What the shards and the fetcher share.
struct Inner {
    current: RwLock<Arc<KeySet>>,
    metrics: JwksMetrics,
}

/// The shards' end: the current key set and the refetch request. Dropping it stops the
/// fetcher thread.
pub struct Jwks {
    inner: Arc<Inner>,
    refetch: Sender<()>,
}

impl Jwks {
    /// The key set in use (an `Arc` clone; the lock is held only for that).
    pub fn keys(&self) -> Arc<KeySet> {
        self.inner
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Ask for a refetch (an unknown kid). Never waits: one request pending is enough.
    pub fn refetch(&self) {
        match self.refetch.try_send(()) {
            Ok(()) | Err(TrySendError::Full(())) | Err(TrySendError::Disconnected(())) => {}
        }
    }

    pub fn metrics(&self) -> &JwksMetrics {
        &self.inner.metrics
    }

    /// A fixed key set with no fetcher (tests: refetch requests go nowhere).
    pub fn fixed(keys: KeySet) -> Jwks {
        let (tx, _rx) = crossbeam_channel::bounded(1);
        Jwks {
            inner: Arc::new(Inner {
                metrics: JwksMetrics::default(),
                current: RwLock::new(Arc::new(keys)),
            }),
            refetch: tx,
        }
    }
}

/// The TLS client settings: the certificates in `ca_file` (PEM) as the only roots, or the
/// system's. rustls with the ring provider.
pub fn tls_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            for cert in certs {
                let cert = cert.map_err(|e| format!("{}: {e}", path.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
            }
            if roots.is_empty() {
                return Err(format!("{}: no PEM certificate in it", path.display()));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(format!(
                    "no system root certificates found ({:?}); set jwks_ca_file",
                    found.errors
                ));
            }
        }
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())
        .map(|b| b.with_root_certificates(roots).with_no_client_auth())
}

/// How the fetcher reaches the key set.
struct Client {
    source: HttpUrl,
    tls: Option<tokio_rustls::TlsConnector>,
}

impl Client {
    fn new(settings: &JwksSettings) -> Result<Client, String> {
        let source = HttpUrl::parse(&settings.url)?;
        let tls = if source.tls {
            let config = tls_config(settings.ca_file.as_deref())?;
            Some(tokio_rustls::TlsConnector::from(Arc::new(config)))
        } else {
            None
        };
        Ok(Client { source, tls })
    }

    /// GET the key set and parse it, all within `timeout`.
    async fn fetch(&self, timeout: Duration) -> Result<(KeySet, Vec<String>), String> {
        let body = match tokio::time::timeout(timeout, self.get()).await {
            Ok(r) => r?,
            Err(_) => return Err(format!("no answer within {} ms", timeout.as_millis())),
        };
        KeySet::parse(&body)
    }

    async fn get(&self) -> Result<Vec<u8>, String> {
        let tcp = tokio::net::TcpStream::connect(self.source.addr.as_str())
            .await
            .map_err(|e| format!("connect {}: {e}", self.source.addr))?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => exchange(tcp, &self.source).await,
            Some(connector) => {
                let name = rustls::pki_types::ServerName::try_from(self.source.host.clone())
                    .map_err(|e| format!("TLS server name {:?}: {e}", self.source.host))?;
                let stream = connector
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("TLS: {e}"))?;
                exchange(stream, &self.source).await
            }
        }
    }
}

/// One HTTP/1.1 GET with `Connection: close`; the body of a 200 (Content-Length, chunked or
/// to the end).
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    source: &HttpUrl,
) -> Result<Vec<u8>, String> {
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: ringgate\r\nAccept: application/json\r\nConnection: close\r\n\r\n",
        source.path, source.authority
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut raw = Vec::with_capacity(8192);
    let mut buf = [0u8; 8192];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            // A TLS peer that closes without close_notify: the framing below still decides
            // whether the body is whole.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(format!("read: {e}")),
        }
        if raw.len() > MAX_BODY + 64 * 1024 {
            return Err(format!("response larger than {MAX_BODY} bytes"));
        }
    }
    parse_response(&raw)
}

/// The body of a complete `200` response in `raw`.
pub fn parse_response(raw: &[u8]) -> Result<Vec<u8>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(raw) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err("closed before a whole response head".into()),
        Err(e) => return Err(format!("bad response: {e}")),
    };
    let code = response.code.unwrap_or(0);
    if code != 200 {
        return Err(format!("status {code}"));
    }
    let header = |name: &str| {
        response
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_ascii_lowercase())
    };
    let rest = &raw[head_len..];
    if header("transfer-encoding").is_some_and(|t| t.ends_with("chunked")) {
        return dechunk(rest);
    }
    match header("content-length") {
        Some(len) => {
            let len: usize = len.parse().map_err(|_| "bad Content-Length".to_string())?;
            if rest.len() < len {
                return Err(format!("body cut short ({} of {len} bytes)", rest.len()));
            }
            Ok(rest[..len].to_vec())
        }
        None => Ok(rest.to_vec()),
    }
}

fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let line_end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("chunked body cut short")?;
        let size_text = std::str::from_utf8(&rest[..line_end]).map_err(|_| "bad chunk size")?;
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| "bad chunk size")?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        if rest.len() < size + 2 {
            return Err("chunked body cut short".into());
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

/// Fetch the key set (retrying within [`START_BUDGET`]), then start the fetcher thread.
/// Returns only once a key set is in place: the gateway then reports ready.
pub fn start(settings: JwksSettings) -> Result<Jwks, String> {
    let fail = |why: String| format!("cannot fetch jwks_url {}: {why}", settings.url);
    let client = Client::new(&settings).map_err(fail)?;
    let (tx, rx) = crossbeam_channel::bounded::<()>(1);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<Arc<Inner>, String>>();
    let thread_settings = settings.clone();
    std::thread::Builder::new()
        .name("ringgate-jwks".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("tokio runtime: {e}")));
                    return;
                }
            };
            let inner = match runtime.block_on(first_fetch(&client)) {
                Ok(inner) => Arc::new(inner),
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(inner.clone()));
            run(&runtime, &client, &inner, &rx, &thread_settings);
        })
        .map_err(|e| fail(format!("cannot start its thread: {e}")))?;
    let inner = ready_rx
        .recv()
        .map_err(|_| fail("the fetcher thread stopped".into()))?
        .map_err(fail)?;
    Ok(Jwks { inner, refetch: tx })
}

async fn first_fetch(client: &Client) -> Result<Inner, String> {
    let started = Instant::now();
    let deadline = started + START_BUDGET;
    let mut backoff = Duration::from_millis(250);
    let mut attempts = 0;
    loop {
        attempts += 1;
        let left = deadline.saturating_duration_since(Instant::now());
        match client.fetch(left.min(FETCH_TIMEOUT)).await {
            Ok((keys, skipped)) => {
                for s in &skipped {
                    tracing::warn!("jwks_url: {s} (skipped)");
                }
                eprintln!(
                    "ringgate: JWKS: {} key(s) from {}{}",
                    keys.len(),
                    client.source.authority,
                    client.source.path
                );
                let metrics = JwksMetrics::default();
                metrics.keys.set(keys.len() as u64);
                metrics.fetches.inc();
                return Ok(Inner {
                    current: RwLock::new(Arc::new(keys)),
                    metrics,
                });
            }
            Err(e) => {
                let now = Instant::now();
                if now + backoff >= deadline {
                    return Err(format!(
                        "{e} ({attempts} attempts in {:.1} s)",
                        started.elapsed().as_secs_f64()
                    ));
                }
                tracing::warn!("jwks_url: {e}; retrying in {} ms", backoff.as_millis());
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// The fetcher's loop: a refresh every `refresh`, a refetch on request (at most one per
/// `refetch_min`), until the shards' end is dropped.
fn run(
    runtime: &tokio::runtime::Runtime,
    client: &Client,
    inner: &Inner,
    requests: &Receiver<()>,
    settings: &JwksSettings,
) {
    let mut next_refresh = Instant::now() + settings.refresh;
    let mut last_refetch: Option<Instant> = None;
    let mut pending = false;
    loop {
        let refetch_at = match (pending, last_refetch) {
            (false, _) => None,
            (true, None) => Some(Instant::now()),
            (true, Some(t)) => Some(t + settings.refetch_min),
        };
        let wake = refetch_at.map_or(next_refresh, |t| t.min(next_refresh));
        match requests.recv_deadline(wake) {
            Ok(()) => pending = true,
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        let now = Instant::now();
        let refetch_due = pending && last_refetch.is_none_or(|t| now >= t + settings.refetch_min);
        if !(refetch_due || now >= next_refresh) {
            continue;
        }
        if refetch_due {
            pending = false;
            last_refetch = Some(now);
        }
        let why = if refetch_due {
            "unknown kid"
        } else {
            "refresh"
        };
        match runtime.block_on(client.fetch(FETCH_TIMEOUT)) {
            Ok((keys, skipped)) => {
                for s in &skipped {
                    tracing::warn!("jwks_url: {s} (skipped)");
                }
                inner.metrics.keys.set(keys.len() as u64);
                inner.metrics.fetches.inc();
                *inner.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
                tracing::debug!("jwks_url: {why}: key set replaced");
            }
            Err(e) => {
                inner.metrics.failures.inc();
                tracing::warn!(
                    "jwks_url {}: {why} failed: {e}; keeping the {} key(s) in use",
                    settings.url,
                    inner.metrics.keys.get()
                );
            }
        }
        next_refresh = Instant::now() + settings.refresh;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_by_length_chunked_or_close_and_non_200_refused() {
        let by_len = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nabcdEXTRA";
        assert_eq!(parse_response(by_len).unwrap(), b"abcd");
        let chunked =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=1\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked).unwrap(), b"abcde");
        let close = b"HTTP/1.0 200 ok\r\n\r\n{\"keys\":[]}";
        assert_eq!(parse_response(close).unwrap(), b"{\"keys\":[]}");
        let short = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc";
        assert!(parse_response(short).unwrap_err().contains("cut short"));
        let cut = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab";
        assert!(parse_response(cut).is_err());
        let err = b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(parse_response(err).unwrap_err(), "status 503");
    }

    #[test]
    fn unusable_keys_are_skipped_and_an_empty_set_is_an_error() {
        let doc = br#"{"keys":[
            {"kty":"oct","k":"c2VjcmV0","kid":"sym"},
            {"kty":"EC","crv":"P-384","x":"AA","y":"AA","kid":"p384"},
            {"kty":"RSA","n":"AQAB","e":"AQAB","use":"enc","kid":"enc"},
            {"kty":"RSA","n":"AQAB","e":"AQAB","alg":"PS256","kid":"pss"},
            {"kty":"RSA","n":"AQAB","e":"AQAB","kid":"ok"}
        ]}"#;
        let (set, skipped) = KeySet::parse(doc).unwrap();
        assert_eq!(set.len(), 1);
        assert_eq!(skipped.len(), 4, "{skipped:?}");
        assert!(matches!(
            set.find(Some("ok"), Algorithm::RS256),
            Lookup::Found(_)
        ));
        assert!(matches!(
            set.find(Some("ok"), Algorithm::ES256),
            Lookup::WrongAlg
        ));
        assert!(matches!(
            set.find(Some("sym"), Algorithm::RS256),
            Lookup::Unknown
        ));
        assert!(matches!(set.find(None, Algorithm::RS256), Lookup::Found(_)));
        assert!(matches!(set.find(None, Algorithm::ES256), Lookup::NoKid));
        let none = KeySet::parse(br#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#);
        assert!(none.err().unwrap().contains("no usable"));
        assert!(KeySet::parse(b"[]").is_err());
    }
}
