//! Process start and stop: binds the public port once per shard (SO_REUSEPORT), starts one
//! pinned glommio executor per shard and the admin thread, and turns SIGTERM/SIGINT into a
//! graceful drain. Owns nothing after start except the join handles.

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use glommio::{LocalExecutorBuilder, Placement};

use crate::admin::{self, Admin};
use crate::clock::{MonotonicClock, TurnClock};
use crate::config::{Config, IoDriver};
use crate::metrics::ShardMetrics;
use crate::shard::{io, Shard, Shared};

/// Why the gateway did not start or did not stop cleanly; each maps to one exit code
/// ([`StartError::exit_code`], README "Operating it").
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// This host cannot run shards (kernel, io_uring, memlock), found before starting any.
    #[error("{0}")]
    Host(crate::preflight::HostProblem),
    #[error("cannot listen on {addr} (`listen`): {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("`listen` {addr} is already served by another process (another ringgate?): stop it, choose another `listen`, or set `share_listen = true` (--share-listen true) to share the port with it on purpose (SO_REUSEPORT: the kernel then splits new connections between the processes, each with its own store)")]
    AddressTaken { addr: SocketAddr },
    #[error("cannot start the admin listener on {addr} (`admin_listen`): {source}")]
    Admin {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Jwks(String),
    #[error("cannot start shard {shard}: {message}")]
    Shard { shard: usize, message: String },
    #[error("invalid config key `tls_cert`: {0}")]
    Tls(String),
    /// A shard thread panicked while running (its message is in the log above).
    #[error(
        "{count} shard thread(s) panicked while running; the panic message is in the log above"
    )]
    Panicked { count: usize },
}

impl StartError {
    /// 3: the host or the environment refused (fix the host, not the config); 4: a shard
    /// failed while running. (2 is a refused config or command line, in `cli`.)
    pub fn exit_code(&self) -> i32 {
        match self {
            StartError::Panicked { .. } => 4,
            _ => 3,
        }
    }
}

/// glommio's pool of io_uring registered buffers, per shard (its default is 10 MiB). ringgate
/// does no file DMA, yet the pool's pages became resident as connections came one at a time:
/// at 64 one-shard gateways holding a million, 589-657 B of RSS per connection with the
/// default pool, 414-525 B with 64 KiB, 359 B with 1 MiB (README, "All at once"). A burst of
/// handshakes did worse with 64 KiB (one shard, 19,000 at once: 570 B; 448 B with 10 MiB,
/// 340 B with 1 MiB), as if the pool ran out and glommio fell back to page-aligned heap
/// buffers, as it does (not traced further).
const SHARD_IO_MEMORY: usize = 1 << 20;

/// The shards' socket driver: `io_driver` as set, or, unset, the uring driver where this
/// host has what it needs and glommio (with one line saying why) where it does not. A
/// driver set explicitly that cannot run here is refused like any other host problem.
fn pick_io_driver(cfg: &Config) -> Result<IoDriver, StartError> {
    if cfg.io_driver == Some(IoDriver::Glommio) {
        return Ok(IoDriver::Glommio);
    }
    let Some(why) = crate::shard::uring::unsupported_because(cfg.uring_recv_buffers) else {
        return Ok(IoDriver::Uring);
    };
    if cfg.io_driver == Some(IoDriver::Uring) {
        return Err(StartError::Host(crate::preflight::HostProblem {
            what: format!("io_driver = \"uring\" cannot run here: {why}"),
            fix: "run on Linux 6.1 or later with io_uring allowed and enough locked memory, or set io_driver = \"glommio\"".into(),
        }));
    }
    tracing::warn!("io_driver: glommio, since the uring driver cannot run here: {why} (set io_driver = \"glommio\" to choose it and silence this)");
    Ok(IoDriver::Glommio)
}

/// Longest wait for a shard's executor to come up (it takes milliseconds).
const SHARD_START_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Run the gateway until SIGTERM/SIGINT and the drain complete.
pub fn serve(cfg: Config) -> Result<(), StartError> {
    let started = Instant::now();
    if let Err(e) = crate::alloc::allow_huge_pages(cfg.huge_pages) {
        tracing::warn!(
            huge_pages = cfg.huge_pages,
            "the kernel refused PR_SET_THP_DISABLE ({e}): the heap follows the host's transparent huge page setting"
        );
    }
    // Before anything starts: a host that cannot run shards is told why and how to fix it.
    crate::preflight::check_host().map_err(StartError::Host)?;
    let io_driver = pick_io_driver(&cfg)?;
    let wanted = crate::preflight::memlock_wanted(cfg.shards, SHARD_IO_MEMORY);
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if let Some(advice) =
        crate::preflight::memlock_advice(crate::preflight::memlock_soft(), wanted, root)
    {
        tracing::warn!("{advice}");
    }
    // SO_REUSEPORT would let this process join another one already serving the address
    // (clients split between two stores, silently): a plain bind first finds that out.
    if cfg.listen.port() != 0 && !cfg.share_listen {
        address_free_soon(cfg.listen).map_err(|source| {
            if source.kind() == std::io::ErrorKind::AddrInUse {
                StartError::AddressTaken { addr: cfg.listen }
            } else {
                StartError::Listen {
                    addr: cfg.listen,
                    source,
                }
            }
        })?;
    }
    if cfg.dev_mode() {
        tracing::warn!("dev mode: no jwt_secret configured; clients are trusted as ?user=<id> (allowed only because every listener is on loopback); never expose this");
    }
    // The JWKS before anything else: no key set, no start (the message names jwks_url).
    let jwks = match cfg.jwks_settings() {
        Some(settings) => Some(crate::auth::jwks::start(settings).map_err(StartError::Jwks)?),
        None => None,
    };
    let auth = crate::auth::Authenticator::with_jwks(cfg.jwt_secret.as_deref(), jwks)
        .with_claims(cfg.jwt_audience.as_deref(), cfg.jwt_issuer.as_deref());
    // This run's name in Redis: decided once, here (the shards and the store are given it).
    let started_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let redis = cfg.redis_settings(&crate::store::redis::node_run_id(&cfg.node_id, started_ms));
    let redis_timeout = redis.as_ref().map(|s| s.timeout);
    let push_redis = redis.clone();
    let mut store_links = match redis {
        Some(settings) => {
            tracing::info!(
                "offline store: Redis ({}; `accepted` waits for Redis to confirm each write)",
                cfg.to_toml_redacted()
                    .lines()
                    .find_map(|l| l.strip_prefix("redis_url = "))
                    .unwrap_or("?")
            );
            crate::store::redis::start(settings, cfg.shards)
                .map_err(|e| StartError::Shard {
                    shard: 0,
                    message: format!("cannot start the Redis thread: {e}"),
                })?
                .into_iter()
                .map(Some)
                .collect()
        }
        None => {
            tracing::info!("offline store: embedded (in-process, bounded; lost on restart)");
            Vec::new()
        }
    };
    // Bind every shard's listener before starting, so a busy port fails start-up cleanly and
    // port 0 resolves to one port shared by all shards.
    let first = io::reuseport_listener(cfg.listen).map_err(|source| StartError::Listen {
        addr: cfg.listen,
        source,
    })?;
    let public = first
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .unwrap_or(cfg.listen);
    let mut listeners = vec![first];
    for _ in 1..cfg.shards {
        listeners.push(
            io::reuseport_listener(public).map_err(|source| StartError::Listen {
                addr: public,
                source,
            })?,
        );
    }
    let tls = match (&cfg.tls_cert, &cfg.tls_key) {
        (Some(cert), Some(key)) => Some(crate::tls::Tls::load(cert, key).map_err(StartError::Tls)?),
        _ => None,
    };
    let scheme = if tls.is_some() { "wss" } else { "ws" };
    let shared = Shared::with(cfg.clone(), auth, tls);
    let (mut push_links, push_worker, push_metrics) = match cfg.push.clone() {
        Some(push) => {
            tracing::info!(
                "offline push: POST to {} (batches of {}, after {} ms)",
                push.url,
                push.batch_max,
                push.delay_ms
            );
            let draining = shared.clone();
            let (links, worker, metrics) = crate::push::start(
                push,
                cfg.shards,
                push_redis,
                Box::new(move || draining.draining.load(Ordering::Relaxed)),
                cfg.drain_ms,
            )
            .map_err(|e| StartError::Shard {
                shard: 0,
                message: format!("cannot start the push worker: {e}"),
            })?;
            (
                links.into_iter().map(Some).collect(),
                Some(worker),
                Some(metrics),
            )
        }
        None => (Vec::new(), None, None),
    };
    let metrics: Vec<Arc<ShardMetrics>> = (0..cfg.shards)
        .map(|_| Arc::new(ShardMetrics::default()))
        .collect();
    if store_links.is_empty() {
        // Embedded: each shard's index is its message id slot, for good (`delivery/ids.rs`).
        metrics.iter().for_each(|m| m.id_slot_held.set(1));
    } else {
        metrics.iter().for_each(|m| m.redis_store.set(1));
    }
    let (mut meshes, mesh_client) =
        crate::mesh::build(cfg.shards).map_err(|e| StartError::Shard {
            shard: 0,
            message: format!("cannot build the mesh: {e}"),
        })?;
    let admin_addr = admin::start(
        cfg.admin_listen,
        Admin {
            shared: shared.clone(),
            metrics: metrics.clone(),
            mesh: mesh_client,
            api_cids: admin::ApiCids::new(),
            api_refused: Default::default(),
            push: push_metrics,
            live: admin::LiveStreams::new(),
        },
    )
    .map_err(|source| StartError::Admin {
        addr: cfg.admin_listen,
        source,
    })?;
    let cpus = allowed_cpus();
    let origin = Instant::now();

    let mut handles = Vec::new();
    // Each shard says it started (its io_uring executor exists) before the gateway reports
    // ready; a shard whose executor fails drops its sender unsent, and its error is joined.
    let mut started_rx = Vec::new();
    for (id, listener) in listeners.into_iter().enumerate() {
        let (started_tx, rx) = std::sync::mpsc::sync_channel::<()>(1);
        started_rx.push(rx);
        let shared = shared.clone();
        let m = metrics[id].clone();
        let mesh = meshes.remove(0);
        let store = store_links.get_mut(id).and_then(Option::take);
        let push = push_links.get_mut(id).and_then(Option::take);
        let cpu = cpus[id % cpus.len()];
        let handle = LocalExecutorBuilder::new(Placement::Fixed(cpu))
            .name(&format!("shard-{id}"))
            .io_memory(SHARD_IO_MEMORY)
            .spawn(move || async move {
                let _ = started_tx.send(());
                let clock = Box::new(TurnClock::new(MonotonicClock::with_origin(origin)));
                let mut shard = Shard::new(id, shared, m, clock);
                if let Some(link) = store {
                    shard.enable_store(link);
                }
                if let Some(link) = push {
                    shard.enable_push(link);
                }
                match io_driver {
                    IoDriver::Glommio => io::run(shard, listener, Some(mesh)).await,
                    IoDriver::Uring => io::run_uring(shard, listener, Some(mesh)).await,
                }
            })
            .map_err(|e| StartError::Shard {
                shard: id,
                message: e.to_string(),
            })?;
        handles.push(handle);
    }
    if let Some(failed) = started_rx
        .iter()
        .position(|rx| rx.recv_timeout(SHARD_START_TIMEOUT).is_err())
    {
        // Stop the shards that did start, then report the failed one's own error.
        shared.draining.store(true, Ordering::Relaxed);
        let mut error = "did not report started within 30 s".to_string();
        for (id, h) in handles.into_iter().enumerate() {
            if let Err(e) = h.join() {
                if id == failed {
                    error = e.to_string();
                }
            }
        }
        return Err(StartError::Host(crate::preflight::shard_start_problem(
            failed, &error,
        )));
    }
    watch_signals(shared.clone());
    if let Some(timeout) = redis_timeout {
        wait_for_id_slots(&metrics, timeout);
    }
    // The ready line is for whoever reads stdout; a closed stdout (`ringgate | head -1`, a
    // supervisor that went away) must not take the gateway down with it, as `println!` did.
    let ready = writeln!(
        std::io::stdout(),
        "ringgate listening on {scheme}://{public} admin http://{admin_addr} shards {} node {} io {} (ready in {} ms)",
        cfg.shards,
        cfg.node_id,
        match io_driver {
            IoDriver::Glommio => "glommio",
            IoDriver::Uring => "uring",
        },
        started.elapsed().as_millis()
    );
    if let Err(e) = ready {
        tracing::warn!("the ready line could not be written to stdout ({e}); serving anyway");
    }
    let mut panicked = 0;
    for (id, h) in handles.into_iter().enumerate() {
        if let Err(e) = h.join() {
            tracing::error!(shard = id, "shard stopped with an error: {e}");
            panicked += 1;
        }
    }
    // The shards have drained: the push worker flushes what it holds within the drain budget.
    if let Some(worker) = push_worker {
        worker.stop();
    }
    if panicked > 0 {
        return Err(StartError::Panicked { count: panicked });
    }
    tracing::info!(
        "drained, {} connections still open at exit",
        shared.host_open.load(Ordering::Relaxed)
    );
    Ok(())
}

/// With Redis, each shard issues message ids from a slot it claims there (`delivery/ids.rs`):
/// give the claims up to two Redis timeouts (connecting, then the claim) before reporting the
/// node up, so that its first sends are not refused for want of a slot. If Redis is away, the
/// node starts anyway: its sends get `unavailable` (they need Redis) and /readyz says why.
fn wait_for_id_slots(metrics: &[Arc<ShardMetrics>], timeout: std::time::Duration) {
    let deadline = Instant::now() + 2 * timeout;
    while metrics.iter().any(|m| m.id_slot_held.get() == 0) {
        if Instant::now() >= deadline {
            tracing::warn!(
                "no message id slot from Redis yet; sends get `unavailable` until one is claimed"
            );
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// First SIGTERM/SIGINT starts the drain; a second one exits at once. SIGHUP reads the TLS
/// certificate and key again (a failed reload keeps the ones in use).
fn watch_signals(shared: Arc<Shared>) {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals =
        signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP]).expect("signal handler");
    std::thread::Builder::new()
        .name("ringgate-signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if sig == SIGHUP {
                    match shared.tls.as_ref().map(|tls| tls.reload()) {
                        None => tracing::info!("SIGHUP: no tls_cert configured, nothing to reload"),
                        Some(Ok(())) => tracing::info!("SIGHUP: TLS certificate reloaded"),
                        Some(Err(e)) => tracing::error!(error = %e, "SIGHUP: TLS certificate NOT reloaded, the previous one stays in use"),
                    }
                    continue;
                }
                if shared.draining.swap(true, Ordering::Relaxed) {
                    tracing::warn!("second signal {sig}: exiting now (exit code 1)");
                    std::process::exit(1);
                }
                tracing::info!(
                    "signal {sig}: draining (close 1012), up to {} ms",
                    shared.cfg.drain_ms
                );
            }
        })
        .expect("signal thread");
}

/// CPUs this process may run on (respects taskset/cgroup cpusets).
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: plain libc call filling a zeroed cpu_set_t we own.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0 {
            let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
                .filter(|&c| libc::CPU_ISSET(c, &set))
                .collect();
            if !cpus.is_empty() {
                return cpus;
            }
        }
    }
    vec![0]
}

/// [`io::check_address_free`], asked again for up to 3 s while the address is in use: a
/// gateway killed a moment ago still holds its listener until the kernel has torn its
/// io_uring rings down, which runs after the process is gone (seen: a restart right after
/// SIGKILL refused as "already served"). A live server there is still found.
fn address_free_soon(addr: std::net::SocketAddr) -> std::io::Result<()> {
    let deadline = Instant::now() + std::time::Duration::from_secs(3);
    loop {
        match io::check_address_free(addr) {
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            other => return other,
        }
    }
}
