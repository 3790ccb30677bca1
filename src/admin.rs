//! The admin HTTP listener (separate port, default 127.0.0.1:9090): `/metrics`, `/healthz`,
//! `/readyz`. Runs on its own thread with a small tokio runtime (hyper), so scrapes never take
//! time from a shard; it only reads the shards' metrics and the shared drain flag.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};

use crate::metrics::{self, ShardMetrics};
use crate::shard::Shared;

pub struct Admin {
    pub shared: Arc<Shared>,
    pub metrics: Vec<Arc<ShardMetrics>>,
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
                async move { Ok::<_, Infallible>(route(&admin, req)) }
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

fn route(admin: &Admin, req: Request<Incoming>) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => Response::builder()
            .header("content-type", "text/plain; version=0.0.4")
            .body(Full::new(metrics::render(&admin.metrics).into()))
            .expect("static response"),
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/readyz") => {
            if admin.shared.draining.load(Ordering::Relaxed) {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            } else {
                text(StatusCode::OK, "ready\n")
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}
