//! The admin HTTP listener (separate port, default 127.0.0.1:9090): `/metrics`, `/healthz`,
//! `/readyz`, and the backend API (`/api/*`, bearer `api_key`). Runs on its own thread with a
//! small tokio runtime (hyper), so scrapes never take time from a shard; it reads the shards'
//! metrics and the drain flag, and asks shards questions only through the mesh. The live
//! operator page (`/ops`) and its stream (`/api/live`) are in `live`.

mod live;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};

use crate::delivery::refusal::SendRefusal;
use crate::mesh::home_shard;
use crate::metrics::{self, ShardMetrics};
use crate::shard::msg::{self, ShardMeshClient, ShardMsg};
use crate::shard::Shared;

/// Most users one presence request may ask about (SPEC section 3).
pub use crate::proto::MAX_PRESENCE_USERS;
pub use live::{LiveStreams, MAX_LIVE_STREAMS};
/// How long the API waits for a shard's answer before giving up with 503.
const SHARD_ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

pub struct Admin {
    pub shared: Arc<Shared>,
    pub metrics: Vec<Arc<ShardMetrics>>,
    pub mesh: ShardMeshClient,
    pub api_cids: ApiCids,
    pub api_refused: ApiRefused,
    /// The offline push worker's counters (None: push is off).
    pub push: Option<Arc<crate::push::PushMetrics>>,
    /// The open `/api/live` streams, bounded.
    pub live: live::LiveStreams,
}

/// Backend API requests answered with an error, by HTTP status. The API runs on the admin
/// thread, not on a shard, so these are the listener's, not a shard's.
#[derive(Default)]
pub struct ApiRefused([crate::metrics::Counter; API_STATUSES.len()]);

/// The statuses the API refuses with; 0: any other.
const API_STATUSES: [u16; 8] = [400, 401, 403, 404, 405, 413, 503, 0];
const API_REFUSED: &str = "ringgate_api_refused_total";

impl ApiRefused {
    fn count(&self, status: StatusCode) {
        if status.is_success() {
            return;
        }
        let at = API_STATUSES
            .iter()
            .position(|&s| s == status.as_u16())
            .unwrap_or(API_STATUSES.len() - 1);
        self.0[at].inc();
    }

    fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let _ = writeln!(out, "# HELP {API_REFUSED} Backend API requests answered with an error, by status (0: another status). Counted by the admin listener, which serves the API (shard=\"admin\").\n# TYPE {API_REFUSED} counter");
        for (status, n) in API_STATUSES.iter().zip(&self.0) {
            let _ = writeln!(
                out,
                "{API_REFUSED}{{shard=\"admin\",status=\"{status}\"}} {}",
                n.get()
            );
        }
    }
}

/// Cids for API requests that bring none: `api-<run>-<n>`, `run` random per process. The
/// backend's cids are deduplicated across every node and, in Redis, across restarts, so they
/// must be unique there too (a per-process counter with the time in seconds was not: two nodes,
/// or a restart, within one second gave the same cid, and the second message was dropped as a
/// duplicate of the first).
pub struct ApiCids {
    run: u64,
    next: std::sync::atomic::AtomicU64,
}

impl ApiCids {
    pub fn new() -> ApiCids {
        use std::hash::BuildHasher;
        // 64 random bits from the OS, through std's per-process hash keys.
        let run = std::collections::hash_map::RandomState::new().hash_one(std::process::id());
        ApiCids {
            run,
            next: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The next cid, as raw JSON (a string).
    fn next(&self) -> Box<str> {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        format!("\"api-{:016x}-{n}\"", self.run).into()
    }
}

impl Default for ApiCids {
    fn default() -> Self {
        Self::new()
    }
}

/// Bind now (so a bad address fails start-up), serve on a new thread.
pub fn start(addr: SocketAddr, admin: Admin) -> std::io::Result<SocketAddr> {
    let std_listener = std::net::TcpListener::bind(addr)?;
    std_listener.set_nonblocking(true)?;
    let local = std_listener.local_addr()?;
    let admin = Arc::new(admin);
    std::thread::Builder::new()
        .name("ringgate-admin".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("admin runtime");
            rt.block_on(serve(std_listener, admin));
        })?;
    Ok(local)
}

async fn serve(std_listener: std::net::TcpListener, admin: Arc<Admin>) {
    let listener = tokio::net::TcpListener::from_std(std_listener).expect("admin listener");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let io = hyper_util::rt::TokioIo::new(stream);
            let service = hyper::service::service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(route(&admin, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await;
        });
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain; charset=utf-8")
        .body(Full::new(body.into()))
        .expect("static response")
}

fn json(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(body.into()))
        .expect("static response")
}

fn api_error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    json(status, serde_json::json!({ "error": message }).to_string())
}

/// `Authorization: Bearer <api_key>`; None when allowed, else the refusal.
fn check_api_key(admin: &Admin, req: &Request<Incoming>) -> Option<Response<Full<Bytes>>> {
    let Some(key) = admin.shared.cfg.api_key.as_deref() else {
        return Some(api_error(
            StatusCode::FORBIDDEN,
            "the API is disabled: set api_key to enable it",
        ));
    };
    let given = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(crate::auth::bearer_credentials);
    let challenge = match given {
        Some(g) if constant_time_eq(g.as_bytes(), key.as_bytes()) => return None,
        Some(_) => crate::auth::BEARER_INVALID_TOKEN,
        None => crate::auth::BEARER_CHALLENGE,
    };
    // RFC 9110 section 11.6.1: a 401 says how to authenticate.
    let mut refusal = api_error(StatusCode::UNAUTHORIZED, "missing or wrong API key");
    refusal.headers_mut().insert(
        hyper::header::WWW_AUTHENTICATE,
        hyper::header::HeaderValue::from_static(challenge),
    );
    Some(refusal)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// How long `POST /api/send` waits for the message to become safe.
const API_SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(serde::Deserialize)]
struct ApiBody<'a> {
    #[serde(borrow)]
    to: Option<&'a serde_json::value::RawValue>,
    #[serde(borrow)]
    room: Option<&'a serde_json::value::RawValue>,
    #[serde(borrow)]
    cid: Option<&'a serde_json::value::RawValue>,
    #[serde(borrow)]
    body: Option<&'a serde_json::value::RawValue>,
    #[serde(borrow, rename = "type")]
    msg_type: Option<&'a serde_json::value::RawValue>,
}

/// `POST /api/send {"to","body","cid"?}`: the same semantics as a client `send` from the
/// sender `@backend` (dedup by cid, answer once safe). A missing cid gets a generated one.
async fn api_send(admin: &Admin, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let ApiRequest {
        target: to,
        body,
        cid,
        msg_type,
    } = match api_request(admin, req, Target::User).await {
        Ok(r) => r,
        Err(refused) => return *refused,
    };
    let shard = home_shard(crate::shard::deliver::BACKEND_SENDER, admin.mesh.shards());
    let (tx, rx) = tokio::sync::oneshot::channel();
    let msg = ShardMsg::Direct(msg::Direct::ApiSend {
        to: to.into(),
        cid: cid.clone(),
        body,
        msg_type,
        reply: tx,
    });
    let cid_json = cid_value(&cid);
    match ask_shard(admin, shard, msg, rx, API_SEND_TIMEOUT, &cid_json).await {
        Ok(msg::ApiOutcome::Accepted { id }) => json(
            StatusCode::OK,
            serde_json::json!({"op": "accepted", "cid": cid_json, "id": id.to_string()})
                .to_string(),
        ),
        Ok(msg::ApiOutcome::Refused(why)) => refused(&why, &cid_json),
        Err(refused) => *refused,
    }
}

/// The request's cid as JSON, to echo it in the answer.
fn cid_value(cid: &str) -> serde_json::Value {
    serde_json::from_str(cid).unwrap_or(serde_json::Value::Null)
}

/// A send or publish the shard refused: its status and code, `{"error","message","cid"}`.
fn refused(why: &SendRefusal, cid_json: &serde_json::Value) -> Response<Full<Bytes>> {
    json(
        StatusCode::from_u16(why.http_status()).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
        serde_json::json!({"error": why.code().as_str(), "message": why.to_string(), "cid": cid_json})
            .to_string(),
    )
}

/// 503 `{"error":"unavailable","message":..,"cid":..}`: retry later with the same cid.
fn unavailable(why: &str, cid_json: &serde_json::Value) -> Response<Full<Bytes>> {
    json(
        StatusCode::SERVICE_UNAVAILABLE,
        serde_json::json!({"error": "unavailable", "message": why, "cid": cid_json}).to_string(),
    )
}

/// Hand `msg` to `shard` and wait up to `wait` for its answer on `rx`. A full channel or no
/// answer in time is a 503 asking for a retry with the same cid.
async fn ask_shard<T>(
    admin: &Admin,
    shard: usize,
    msg: ShardMsg,
    rx: tokio::sync::oneshot::Receiver<T>,
    wait: std::time::Duration,
    cid_json: &serde_json::Value,
) -> Result<T, Box<Response<Full<Bytes>>>> {
    if admin.mesh.send(shard, msg).is_err() {
        return Err(Box::new(api_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "shard busy, retry with the same cid",
        )));
    }
    match tokio::time::timeout(wait, rx).await {
        Ok(Ok(answer)) => Ok(answer),
        _ => Err(Box::new(unavailable(
            "not confirmed in time, retry with the same cid",
            cid_json,
        ))),
    }
}

/// What `POST /api/send` and `POST /api/publish` carry.
struct ApiRequest {
    /// `to` (a user) or `room`.
    target: String,
    body: Box<str>,
    cid: Box<str>,
    /// `POST /api/send` only: the message's `type`, carried to the recipient in `msg`.
    msg_type: Option<Box<str>>,
}

/// Longest `type` of a backend message.
const MAX_TYPE_LEN: usize = 32;

/// A `type`: 1 to 32 of `a-z`, `0-9`, `_`, `-`, `.`, starting with a letter (a name the
/// application switches on, never content).
fn valid_msg_type(t: &str) -> bool {
    t.len() <= MAX_TYPE_LEN
        && t.starts_with(|c: char| c.is_ascii_lowercase())
        && t.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_-.".contains(c))
}

#[derive(Clone, Copy)]
enum Target {
    User,
    Room,
}

/// Read and check an API request body: `{"to"|"room", "body", "cid"?}`.
async fn api_request(
    admin: &Admin,
    req: Request<Incoming>,
    target: Target,
) -> Result<ApiRequest, Box<Response<Full<Bytes>>>> {
    let bytes = read_body(admin, req).await.map_err(Box::new)?;
    let (field, shape) = match target {
        Target::User => (
            "to",
            "body must be a JSON object {\"to\",\"body\",\"cid\"?}",
        ),
        Target::Room => (
            "room",
            "body must be a JSON object {\"room\",\"body\",\"cid\"?}",
        ),
    };
    let refuse = |why: &str| Box::new(api_error(StatusCode::BAD_REQUEST, why));
    let parsed = serde_json::from_slice::<ApiBody>(&bytes).map_err(|_| refuse(shape))?;
    let raw = match target {
        Target::User => parsed.to,
        Target::Room => parsed.room,
    };
    let value: Option<String> = raw.and_then(|t| serde_json::from_str(t.get()).ok());
    let Some(value) = value.filter(|t| crate::auth::valid_id(t).is_ok()) else {
        return Err(refuse(&format!("`{field}` must be a valid id")));
    };
    let body = parsed.body.ok_or_else(|| refuse("missing field `body`"))?;
    crate::proto::check_body(body.get()).map_err(refuse)?;
    let msg_type = match (parsed.msg_type, target) {
        (None, _) => None,
        (Some(_), Target::Room) => return Err(refuse("`type` is for `POST /api/send` only")),
        (Some(raw), Target::User) => {
            let t: Option<String> = serde_json::from_str(raw.get()).ok();
            match t.filter(|t| valid_msg_type(t)) {
                Some(t) => Some(t.into()),
                None => {
                    return Err(refuse(&format!(
                        "`type` must be a string of 1 to {MAX_TYPE_LEN} of a-z, 0-9, `_`, `-`, `.`, starting with a letter"
                    )))
                }
            }
        }
    };
    let cid = api_cid(parsed.cid, &admin.api_cids)?;
    let room = matches!(target, Target::Room).then_some(value.as_str());
    let from = crate::shard::deliver::BACKEND_SENDER;
    let max_frame = admin.shared.cfg.max_frame;
    if !crate::proto::message_fits(max_frame, room, from, &cid, msg_type.as_deref(), body.get()) {
        let why = format!(
            "too_large: the message's frame would be longer than max_frame ({max_frame} bytes)"
        );
        return Err(Box::new(api_error(StatusCode::PAYLOAD_TOO_LARGE, &why)));
    }
    Ok(ApiRequest {
        target: value,
        body: body.get().into(),
        cid,
        msg_type,
    })
}

/// The request body, at most `max_frame` bytes.
async fn read_body(admin: &Admin, req: Request<Incoming>) -> Result<Bytes, Response<Full<Bytes>>> {
    use http_body_util::BodyExt;
    let limit = admin.shared.cfg.max_frame;
    match http_body_util::Limited::new(req.into_body(), limit)
        .collect()
        .await
    {
        Ok(b) => Ok(b.to_bytes()),
        Err(_) => Err(api_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body over max_frame or unreadable",
        )),
    }
}

/// The request's `cid` checked like a client's, or a generated one.
fn api_cid(
    cid: Option<&serde_json::value::RawValue>,
    generated: &ApiCids,
) -> Result<Box<str>, Box<Response<Full<Bytes>>>> {
    match cid {
        Some(c) => {
            if !crate::proto::valid_cid(c.get()) {
                return Err(Box::new(api_error(
                    StatusCode::BAD_REQUEST,
                    "`cid` must be a non-empty string or an unsigned integer",
                )));
            }
            Ok(c.get().into())
        }
        None => Ok(generated.next()),
    }
}

/// `POST /api/publish {"room","body","cid"?}`: published from `@backend` on the room's home
/// shard; answered `{"op":"accepted","cid","id","offset"}` once in the room's history.
async fn api_publish(admin: &Admin, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let ApiRequest {
        target: room,
        body,
        cid,
        ..
    } = match api_request(admin, req, Target::Room).await {
        Ok(r) => r,
        Err(refused) => return *refused,
    };
    let shard = home_shard(&room, admin.mesh.shards());
    let (tx, rx) = tokio::sync::oneshot::channel();
    let msg = ShardMsg::Room(msg::Room::ApiPublish {
        room: room.into(),
        cid: cid.clone(),
        body,
        reply: tx,
    });
    let cid_json = cid_value(&cid);
    match ask_shard(admin, shard, msg, rx, SHARD_ANSWER_TIMEOUT, &cid_json).await {
        Ok(Ok((id, offset))) => json(
            StatusCode::OK,
            serde_json::json!({"op": "accepted", "cid": cid_json, "id": id.to_string(), "offset": offset}).to_string(),
        ),
        Ok(Err(why)) => refused(&why, &cid_json),
        Err(refused) => *refused,
    }
}

/// `GET /api/presence?user=a&user=b`: `{"online":{"a":true,"b":false}}`, gathered by one
/// shard like a `presence` frame (home shards and, with Redis, the cluster directory).
async fn presence(admin: &Admin, query: &str) -> Response<Full<Bytes>> {
    let mut users: Vec<compact_str::CompactString> = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k != "user" {
            continue;
        }
        match crate::ws::upgrade::percent_decode(v) {
            Some(u) if crate::auth::valid_id(&u).is_ok() => users.push(u.into()),
            _ => return api_error(StatusCode::BAD_REQUEST, "invalid user id"),
        }
    }
    if users.is_empty() || users.len() > MAX_PRESENCE_USERS {
        return api_error(
            StatusCode::BAD_REQUEST,
            &format!("give 1 to {MAX_PRESENCE_USERS} `user` parameters"),
        );
    }
    // One shard gathers the answer (its own users, the other home shards, the directory).
    let shard = home_shard(&users[0], admin.mesh.shards());
    let (tx, rx) = tokio::sync::oneshot::channel();
    let asked = users.clone();
    if admin
        .mesh
        .send(
            shard,
            ShardMsg::Presence(msg::Presence::Api { users, reply: tx }),
        )
        .is_err()
    {
        return api_error(StatusCode::SERVICE_UNAVAILABLE, "shard busy, retry");
    }
    let mut online = serde_json::Map::new();
    match tokio::time::timeout(SHARD_ANSWER_TIMEOUT, rx).await {
        Ok(Ok(answers)) => {
            for (u, on) in asked.into_iter().zip(answers) {
                online.insert(u.to_string(), on.into());
            }
        }
        _ => {
            return api_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "shards did not answer, retry",
            )
        }
    }
    json(
        StatusCode::OK,
        serde_json::json!({ "online": online }).to_string(),
    )
}

/// The method each path answers (GET paths answer HEAD too: hyper sends the head only).
fn method_of(path: &str) -> Option<Method> {
    match path {
        "/api/send" | "/api/publish" => Some(Method::POST),
        "/api/presence" | "/api/live" | "/metrics" | "/healthz" | "/readyz" => Some(Method::GET),
        _ if live::ops_file(path).is_some() => Some(Method::GET),
        _ => None,
    }
}

/// 405 for a known path asked with another method, with the `Allow` it takes (GET or POST:
/// the only two `method_of` gives).
fn wrong_method(allowed: &Method) -> Response<Full<Bytes>> {
    let allow = if allowed == Method::GET {
        "GET, HEAD"
    } else {
        "POST"
    };
    let mut response = text(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("use {allow} for this path\n"),
    );
    response.headers_mut().insert(
        hyper::header::ALLOW,
        hyper::header::HeaderValue::from_static(allow),
    );
    response
}

async fn route(admin: &Arc<Admin>, mut req: Request<Incoming>) -> Response<live::Body> {
    let known = method_of(req.uri().path());
    // HEAD is GET without the body (hyper leaves the body out of a HEAD answer).
    if req.method() == Method::HEAD && known == Some(Method::GET) {
        *req.method_mut() = Method::GET;
    }
    let wrong = known.filter(|m| m != req.method());
    if req.uri().path().starts_with("/api/") {
        if let Some(refusal) = check_api_key(admin, &req) {
            admin.api_refused.count(refusal.status());
            return refusal.map(live::Body::Left);
        }
        if let Some(allowed) = wrong {
            admin.api_refused.count(StatusCode::METHOD_NOT_ALLOWED);
            return wrong_method(&allowed).map(live::Body::Left);
        }
        if (req.method(), req.uri().path()) == (&Method::GET, "/api/live") {
            let response = live::live(admin);
            admin.api_refused.count(response.status());
            return response;
        }
        let response = match (req.method(), req.uri().path()) {
            (&Method::GET, "/api/presence") => {
                presence(admin, req.uri().query().unwrap_or("")).await
            }
            (&Method::POST, "/api/send") => api_send(admin, req).await,
            (&Method::POST, "/api/publish") => api_publish(admin, req).await,
            _ => api_error(StatusCode::NOT_FOUND, "no such API endpoint"),
        };
        admin.api_refused.count(response.status());
        return response.map(live::Body::Left);
    }
    if let Some(allowed) = wrong {
        return wrong_method(&allowed).map(live::Body::Left);
    }
    if req.method() == Method::GET {
        if let Some(file) = live::ops_file(req.uri().path()) {
            return file.map(live::Body::Left);
        }
    }
    let response = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => Response::builder()
            .header("content-type", "text/plain; version=0.0.4")
            .body(Full::new(
                {
                    let mut out = metrics::render(&admin.metrics);
                    admin.api_refused.render(&mut out);
                    if let Some(jwks) = admin.shared.auth.jwks() {
                        jwks.metrics().render(&mut out);
                    }
                    if let Some(push) = &admin.push {
                        push.render(&mut out);
                    }
                    admin.live.render(&mut out);
                    out
                }
                .into(),
            ))
            .expect("static response"),
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/readyz") => {
            // With Redis, a node is ready once every shard heard its channel: before that,
            // messages from other nodes reach its users only by the first resync.
            let unheard = admin.shared.cfg.redis_url.is_some()
                && admin.metrics.iter().any(|m| m.cluster_epoch.get() == 0);
            let no_ids = admin.metrics.iter().any(|m| m.id_slot_held.get() == 0);
            if admin.shared.draining.load(Ordering::Relaxed) {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            } else if unheard {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "waiting for this node's Redis channel\n",
                )
            } else if no_ids {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "waiting for a message id slot from Redis\n",
                )
            } else {
                text(StatusCode::OK, "ready\n")
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    };
    response.map(live::Body::Left)
}

#[cfg(test)]
mod tests {
    use super::ApiCids;

    /// Generated cids differ between two runs (two nodes, or a restart within the same
    /// second) and within one.
    #[test]
    fn generated_cids_are_unique_across_runs_and_within_one() {
        let (node_a, node_b) = (ApiCids::new(), ApiCids::new());
        let a: Vec<Box<str>> = (0..3).map(|_| node_a.next()).collect();
        let b: Vec<Box<str>> = (0..3).map(|_| node_b.next()).collect();
        assert!(a.iter().all(|c| !b.contains(c)), "{a:?} {b:?}");
        assert_ne!(a[0], a[1]);
        for c in &a {
            let cid: String = serde_json::from_str(c).unwrap();
            assert!(cid.starts_with("api-") && crate::proto::valid_cid(c), "{c}");
        }
    }
}
