//! ringgate-bench: load generator for the ringgate WebSocket gateway.
//!
//! `idle` opens many authenticated /ws connections and holds them (answering
//! pings) while measuring memory per connection on both sides; `echo`
//! measures frame throughput and latency over a few pipelined connections;
//! `send` measures 1:1 messaging (accepted / msg / delivered) between paired
//! users and checks that nothing accepted goes missing.
//! Loopback targets only; every phase is bounded in time.

#![recursion_limit = "512"]

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod chat;
mod echo_floor;
mod engine;
mod fanout;
mod flood;
mod floor;
mod net;
mod push;
mod redis_floor;
mod ring;
mod store;
mod sys;
mod upgrade_floor;
mod ws;

use clap::{Args, Parser, Subcommand, ValueEnum};
use engine::{Auth, Config, Loop, Mode, Route, Shared, Stats, INTERRUPTED};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

/// Longest any single phase may be asked to last.
const MAX_SECS: f64 = 86_400.0;

#[derive(Parser)]
#[command(
    name = "ringgate-bench",
    version,
    about = "Load generator for the ringgate WebSocket gateway (loopback targets only)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Open N authenticated /ws connections, hold them, measure memory per connection
    Idle(IdleArgs),
    /// Measure echo throughput and latency over C pipelined connections
    Echo(EchoArgs),
    /// 1:1 messages between paired users: accepted / delivered rates and latencies
    Send(SendArgs),
    /// Spill / replay / remove throughput of ringgate's Redis store against a real Redis
    Store(store::StoreArgs),
    /// One publisher, a room of M members: publish -> every member latency, deliveries/s
    Fanout(fanout::FanoutArgs),
    /// The kernel's floor under `fanout`: one frame to each of N loopback sockets, no gateway
    Floor(floor::FloorArgs),
    /// A polite client beside flooding ones: its send -> accepted with and without the flood
    Flood(flood::FloodArgs),
    /// Redis' floor under `store`: one dedup record and one append per message, raw pipelined
    RedisFloor(redis_floor::RedisFloorArgs),
    /// The offline push webhook: pushes/s into a receiver run here, and while it is down
    Push(push::PushArgs),
    /// The connect benchmark's floor: a server doing the least an upgrade needs (run it, then
    /// point `idle --route echo` at it)
    UpgradeFloor(upgrade_floor::UpgradeFloorArgs),
    /// The echo benchmark's floor: a server doing the least `/echo` needs, on uWebSockets'
    /// system calls (`--io epoll`) or on ringgate's uring driver's (`--io uring`)
    EchoFloor(echo_floor::EchoFloorArgs),
}

#[derive(Args, Debug)]
#[command(next_help_heading = "Common options")]
struct Common {
    /// Gateway public address (must be loopback: 127.0.0.0/8 or ::1)
    #[arg(long, default_value = "127.0.0.1:8080")]
    target: String,
    /// Users with an odd index connect here instead (another node of one cluster): with
    /// `send`, every pair then spans the two gateways (loopback only, like --target)
    #[arg(long, value_name = "ADDR")]
    odd_target: Option<String>,
    /// HS256 secret for ?token=<JWT>; without it, dev mode (?user=<id>)
    #[arg(long)]
    secret: Option<String>,
    /// Lifetime of minted tokens (exp = now + this), seconds
    #[arg(long, default_value_t = 3600, value_name = "SECS")]
    token_ttl: u64,
    /// Source addresses to bind, round-robin: "127.0.0.2-127.0.0.254", "127.0.0.2-254", lists with ","
    #[arg(long, conflicts_with = "source_ips", value_name = "RANGE")]
    sources: Option<String>,
    /// Use N source addresses starting at 127.0.0.2
    #[arg(long, value_name = "N")]
    source_ips: Option<u32>,
    /// User ids are <prefix><offset + index>
    #[arg(long, default_value = "u")]
    user_prefix: String,
    /// First user index (give concurrent processes disjoint ranges)
    #[arg(long, default_value_t = 0)]
    user_offset: u64,
    /// Adds &device=<ID> to every /ws upgrade
    #[arg(long, value_name = "ID")]
    device: Option<String>,
    /// Independent event loops (threads); connections are split evenly
    #[arg(long, default_value_t = 1, value_name = "T")]
    threads: usize,
    /// Gateway process id(s) to measure (repeat or comma-separate)
    #[arg(long, value_delimiter = ',', value_name = "PID")]
    gateway_pid: Vec<u32>,
    /// A connection not established within this many seconds fails
    #[arg(long, default_value_t = 10.0, value_name = "SECS")]
    handshake_timeout: f64,
    /// Exit 0 even when some connections failed or were lost
    #[arg(long)]
    allow_failures: bool,
    /// Also print one JSON line with all results at the end (stdout)
    #[arg(long)]
    json: bool,
    /// No per-second progress lines on stderr
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Args, Debug)]
struct IdleArgs {
    /// Connections to open
    #[arg(
        short = 'n',
        long = "connections",
        default_value_t = 1000,
        value_name = "N"
    )]
    n: usize,
    /// Max new connections per second (0 = as fast as concurrency allows)
    #[arg(long, default_value_t = 0.0, value_name = "R")]
    rate: f64,
    /// Max handshakes in flight (connect -> welcome)
    #[arg(long, default_value_t = 1000)]
    concurrency: usize,
    /// Seconds to hold the connections once all are established
    #[arg(long, default_value_t = 10.0, value_name = "SECS")]
    hold: f64,
    /// Overall bound on the run (ramp + hold), seconds
    #[arg(long, default_value_t = 300.0, value_name = "SECS")]
    timeout: f64,
    /// After the hold, keep holding while this file exists (still bounded by --timeout):
    /// several generators then hold until the last one's ramp is over (bench/scale.sh
    /// --hold-all), so all their connections are open at once
    #[arg(long, value_name = "PATH")]
    hold_while: Option<std::path::PathBuf>,
    /// End the hold as soon as every open connection got `synced` (its waiting messages all
    /// replayed and acked): a reconnect storm's length is first connect to last `synced`
    #[arg(long)]
    until_synced: bool,
    /// `ws`: authenticated ringgate connections, established at `welcome`; `echo`: plain
    /// upgrades to /echo, established at the 101, so that any WebSocket server (uWebSockets'
    /// EchoServer) can be measured the same way (bench/budgets.sh)
    #[arg(long, value_enum, default_value_t = RouteArg::Ws)]
    route: RouteArg,
    #[command(flatten)]
    common: Common,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum RouteArg {
    /// GET /echo (no auth), data frames echoed verbatim
    Echo,
    /// GET /ws (auth), {"op":"ping"} answered by {"op":"pong"}
    Ws,
}

#[derive(Args, Debug)]
struct EchoArgs {
    /// Connections
    #[arg(
        short = 'c',
        long = "connections",
        default_value_t = 100,
        value_name = "C"
    )]
    c: usize,
    /// Payload bytes per message (/echo route; /ws always sends {"op":"ping"})
    #[arg(short = 's', long = "size", default_value_t = 64, value_name = "S")]
    size: usize,
    /// Messages outstanding per connection (pipelining depth)
    #[arg(long, default_value_t = 1, value_name = "K")]
    inflight: usize,
    /// Measured window, seconds
    #[arg(long, default_value_t = 10.0, value_name = "SECS")]
    duration: f64,
    /// Traffic before the measured window, seconds
    #[arg(long, default_value_t = 2.0, value_name = "SECS")]
    warmup: f64,
    /// Route to exercise
    #[arg(long, value_enum, default_value_t = RouteArg::Echo)]
    route: RouteArg,
    /// Send binary frames instead of text (/echo route)
    #[arg(long)]
    binary: bool,
    /// Max handshakes in flight while connecting
    #[arg(long, default_value_t = 1000)]
    concurrency: usize,
    /// Bound on the connect phase, seconds
    #[arg(long, default_value_t = 30.0, value_name = "SECS")]
    timeout: f64,
    #[command(flatten)]
    common: Common,
}

#[derive(Args, Debug)]
struct SendArgs {
    /// Users (one connection each), even: user 2k and 2k+1 send to each other
    #[arg(long, default_value_t = 100, value_name = "U")]
    users: usize,
    /// Sends per user without `accepted`
    #[arg(long, default_value_t = 16, value_name = "K")]
    inflight: usize,
    /// Send a read receipt (`read`) for every N-th message received (0 = none); `read`
    /// frames received (the sender's and the reader's devices are both told) are counted
    #[arg(long, default_value_t = 0, value_name = "N")]
    read_every: u64,
    /// Total sends per second across all users (0 = as fast as the window allows)
    #[arg(long, default_value_t = 0.0, value_name = "R")]
    rate: f64,
    /// Measured window, seconds
    #[arg(long, default_value_t = 10.0, value_name = "SECS")]
    duration: f64,
    /// Traffic before the measured window, seconds
    #[arg(long, default_value_t = 2.0, value_name = "SECS")]
    warmup: f64,
    /// After the window: at most this long to wait for outstanding accepteds and msgs
    #[arg(long, default_value_t = 10.0, value_name = "SECS")]
    grace: f64,
    /// Max handshakes in flight while connecting
    #[arg(long, default_value_t = 1000)]
    concurrency: usize,
    /// Bound on the connect phase, seconds
    #[arg(long, default_value_t = 30.0, value_name = "SECS")]
    timeout: f64,
    #[command(flatten)]
    common: Common,
}

fn secs(name: &str, v: f64, allow_zero: bool) -> Result<Duration, String> {
    if !v.is_finite() || v < 0.0 || (!allow_zero && v == 0.0) || v > MAX_SECS {
        return Err(format!(
            "--{name} must be {} {MAX_SECS} seconds",
            if allow_zero {
                "between 0 and"
            } else {
                "above 0 and at most"
            }
        ));
    }
    Ok(Duration::from_secs_f64(v))
}

fn ns(d: Duration) -> u64 {
    d.as_nanos() as u64
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// Connections per (source, target) pair above which the generator notes that connects slow
/// down: each searches the ephemeral ports for a free 4-tuple, longer as more are open. Measured
/// at two points only (a reconnect storm, 19,000 users: 3.4x as long from one address as from
/// 16, ~1,200 each); 4,096 between them is a judgement.
const SLOW_PORT_SEARCH: u64 = 4_096;

/// Shared validation and configuration of both subcommands.
fn build_config(
    c: &Common,
    route: Route,
    mode: Mode,
    nodelay: bool,
    total: usize,
) -> Result<Config, String> {
    let target = net::resolve_target(&c.target)?;
    let odd_target = c
        .odd_target
        .as_deref()
        .map(net::resolve_target)
        .transpose()?;
    let sources = match (&c.sources, c.source_ips) {
        (Some(s), _) => net::parse_sources(s)?,
        (None, Some(n)) => net::sources_from_count(n)?,
        (None, None) => Vec::new(),
    };
    if !sources.is_empty() && !net::ip_is_v4(&target) {
        return Err("--sources/--source-ips need an IPv4 target (127.0.0.0/8)".into());
    }
    if c.threads == 0 || c.threads > 256 {
        return Err("--threads must be 1..=256".into());
    }
    let handshake_timeout = secs("handshake-timeout", c.handshake_timeout, false)?;
    let limit = net::raise_nofile_limit();
    net::check_fd_budget(total, limit, c.threads)?;
    let per_pair = total.div_ceil(sources.len().max(1)) as u64;
    match net::ephemeral_port_count() {
        Some(ports) if per_pair > ports => eprintln!(
            "warning: ~{per_pair} connections per source address exceed the {ports} \
             ephemeral ports of one (source, target) pair; add --source-ips / --sources"
        ),
        _ if per_pair > SLOW_PORT_SEARCH => eprintln!(
            "note: ~{per_pair} connections per source address: the kernel's search for a free \
             ephemeral port slows every connect; add --source-ips / --sources"
        ),
        _ => {}
    }
    sys::check_pids(&c.gateway_pid)?;
    let auth = match &c.secret {
        None => Auth::Dev,
        Some(s) => Auth::Jwt {
            key: jsonwebtoken::EncodingKey::from_secret(s.as_bytes()),
            ttl_secs: c.token_ttl,
        },
    };
    Ok(Config {
        host: net::host_header(&target),
        target,
        odd_target,
        sources,
        route,
        auth,
        user_prefix: c.user_prefix.clone(),
        user_offset: c.user_offset,
        device: c.device.clone(),
        handshake_timeout,
        nodelay,
        mode,
        base: Instant::now(),
        base_mono_ns: monotonic_ns(),
    })
}

/// Split `total` connections over the loops.
fn make_loops(
    cfg: &Arc<Config>,
    shared: &Arc<Shared>,
    total: usize,
    threads: usize,
    concurrency: usize,
    rate: f64,
) -> Result<Vec<Loop>, String> {
    let threads = threads.min(total.max(1));
    let per_conc = concurrency.max(1).div_ceil(threads);
    let per_rate = rate / threads as f64;
    let mut first = 0u64;
    let mut loops = Vec::with_capacity(threads);
    for i in 0..threads {
        let count = total / threads + usize::from(i < total % threads);
        let lp = Loop::new(
            cfg.clone(),
            shared.clone(),
            first,
            count,
            per_conc,
            per_rate,
        )
        .map_err(|e| format!("cannot create event loop: {e}"))?;
        loops.push(lp);
        first += count as u64;
    }
    Ok(loops)
}

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Relaxed);
}

fn install_sigint() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t);
    }
}

fn sleep_until(cfg: &Config, t_ns: u64) {
    let now = ns(cfg.base.elapsed());
    if t_ns > now {
        std::thread::sleep(Duration::from_nanos(t_ns - now));
    }
}

/// CLOCK_MONOTONIC in ns: one clock for every process on the host.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn now_ns(cfg: &Config) -> u64 {
    ns(cfg.base.elapsed())
}

fn sources_text(cfg: &Config) -> String {
    match cfg.sources.len() {
        0 => "default".into(),
        n => n.to_string(),
    }
}

fn map_json<K: ToString>(m: &BTreeMap<K, u64>) -> Value {
    Value::Object(m.iter().map(|(k, v)| (k.to_string(), json!(v))).collect())
}

fn map_text<K: ToString>(m: &BTreeMap<K, u64>) -> String {
    if m.is_empty() {
        return "none".into();
    }
    m.iter()
        .map(|(k, v)| format!("{}={v}", k.to_string()))
        .collect::<Vec<_>>()
        .join(" ")
}

fn pct(h: &Histogram<u64>, q: f64, div: f64) -> f64 {
    if h.is_empty() {
        0.0
    } else {
        h.value_at_quantile(q) as f64 / div
    }
}

fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let m = s.len() / 2;
    if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    }
}

fn per_conn(delta_bytes: i64, conns: u64) -> Option<f64> {
    (conns > 0).then(|| delta_bytes as f64 / conns as f64)
}

fn opt_f(v: Option<f64>, unit: &str) -> String {
    v.map_or("n/a".into(), |x| format!("{x:.0} {unit}"))
}

/// One thread per loop: connect everything, then serve until `deadline` (or stop). Each
/// waits twice on the returned barrier (loops ready, go) so the caller can take a baseline
/// in between.
fn spawn_serving(
    loops: Vec<Loop>,
    shared: &Arc<Shared>,
    deadline: u64,
) -> (Vec<std::thread::JoinHandle<Stats>>, Arc<Barrier>) {
    let barrier = Arc::new(Barrier::new(loops.len() + 1));
    let handles = loops
        .into_iter()
        .map(|mut lp| {
            let (barrier, shared) = (barrier.clone(), shared.clone());
            std::thread::spawn(move || {
                lp.prefault();
                barrier.wait(); // loops ready; the caller may take a baseline
                barrier.wait(); // go
                lp.ramp(deadline);
                shared.ramp_done.fetch_add(1, Relaxed);
                lp.serve(deadline);
                lp.close_all();
                lp.stats
            })
        })
        .collect();
    (handles, barrier)
}

fn join_threads(handles: Vec<std::thread::JoinHandle<Stats>>) -> Stats {
    let mut total: Option<Stats> = None;
    for h in handles {
        let s = h.join().expect("event loop thread panicked");
        match total.as_mut() {
            None => total = Some(s),
            Some(t) => t.merge(&s),
        }
    }
    total.expect("at least one loop")
}

fn run_idle(a: IdleArgs) -> Result<i32, String> {
    let c = &a.common;
    let timeout = secs("timeout", a.timeout, false)?;
    let hold = secs("hold", a.hold, true)?;
    if a.n == 0 {
        return Err("-n must be at least 1".into());
    }
    if !(a.rate >= 0.0 && a.rate.is_finite()) {
        return Err("--rate must be >= 0".into());
    }
    let route = match a.route {
        RouteArg::Ws => Route::Ws,
        RouteArg::Echo => Route::Echo,
    };
    let cfg = Arc::new(build_config(c, route, Mode::Idle, false, a.n)?);
    let shared = Arc::new(Shared::default());
    let loops = make_loops(&cfg, &shared, a.n, c.threads, a.concurrency, a.rate)?;
    let threads = loops.len();
    install_sigint();

    // The run deadline is fixed once the loops are released.
    let start_ns = now_ns(&cfg);
    let deadline = start_ns + ns(timeout);
    let (handles, barrier) = spawn_serving(loops, &shared, deadline);

    barrier.wait();
    let gen_before = sys::vm_rss_bytes(None).unwrap_or(0);
    let gw_before = sys::sum_rss(&c.gateway_pid).ok();
    let gw_anon_before = sys::sum_rss_anon(&c.gateway_pid).ok();
    let k_before = sys::kernel_mem();
    // The gateway's CPU over the ramp: what a connect costs it, whatever set the rate (its
    // CPU-time clock: the ramp is too short for 10 ms ticks).
    let gw_cpu_before = sys::pids_cpu_secs_fine(&c.gateway_pid)
        .ok()
        .filter(|_| !c.gateway_pid.is_empty());
    let go = now_ns(&cfg);
    barrier.wait();

    // Ramp: sample the established count on whole seconds for per-second rates.
    let mut ticks: Vec<u64> = Vec::new();
    let mut next_tick = go + 1_000_000_000;
    while shared.ramp_done.load(Relaxed) < threads {
        std::thread::sleep(Duration::from_millis(20));
        let now = now_ns(&cfg);
        if now >= next_tick {
            let est = shared.established.load(Relaxed);
            ticks.push(est);
            next_tick += 1_000_000_000;
            if !c.quiet {
                eprintln!(
                    "[{:6.1}s] ramp  established {est}/{}  failed {}  lost {}",
                    (now - go) as f64 / 1e9,
                    a.n,
                    shared.failed.load(Relaxed),
                    shared.lost.load(Relaxed)
                );
            }
        }
    }
    let alive_after = shared
        .established
        .load(Relaxed)
        .saturating_sub(shared.lost.load(Relaxed));
    let gw_cpu_ramp = gw_cpu_before
        .and_then(|before| Some(sys::pids_cpu_secs_fine(&c.gateway_pid).ok()? - before));
    let gen_after = sys::vm_rss_bytes(None).unwrap_or(0);
    let gw_after = sys::sum_rss(&c.gateway_pid).ok();
    let k_after = sys::kernel_mem();
    let ramp_seen = now_ns(&cfg);

    // Hold.
    let hold_end_wanted = ramp_seen + ns(hold);
    let hold_end = hold_end_wanted.min(deadline);
    let mut next_print = ramp_seen + 1_000_000_000;
    loop {
        let now = now_ns(&cfg);
        let released = a.hold_while.as_ref().is_none_or(|p| !p.exists());
        let alive = shared
            .established
            .load(Relaxed)
            .saturating_sub(shared.lost.load(Relaxed));
        let all_synced = a.until_synced && alive > 0 && shared.synced.load(Relaxed) >= alive;
        if (now >= hold_end_wanted && released)
            || all_synced
            || now >= deadline
            || INTERRUPTED.load(Relaxed)
        {
            break;
        }
        let until = if now < hold_end { hold_end } else { deadline };
        std::thread::sleep(Duration::from_nanos((until - now).min(100_000_000)));
        let now = now_ns(&cfg);
        if now >= next_print && !c.quiet {
            next_print += 1_000_000_000;
            eprintln!(
                "[{:6.1}s] hold  {:.0}/{:.0}s  alive {}  failed {}  lost {}  pings {}",
                (now - go) as f64 / 1e9,
                (now - ramp_seen) as f64 / 1e9,
                hold.as_secs_f64(),
                shared
                    .established
                    .load(Relaxed)
                    .saturating_sub(shared.lost.load(Relaxed)),
                shared.failed.load(Relaxed),
                shared.lost.load(Relaxed),
                shared.pings.load(Relaxed),
            );
        }
    }
    let held_ns = now_ns(&cfg) - ramp_seen;
    let alive_end = shared
        .established
        .load(Relaxed)
        .saturating_sub(shared.lost.load(Relaxed));
    let gen_end = sys::vm_rss_bytes(None).unwrap_or(0);
    let gw_end = sys::sum_rss(&c.gateway_pid).ok();
    let gw_anon_end = sys::sum_rss_anon(&c.gateway_pid).ok();
    let k_end = sys::kernel_mem();
    let gen_cpu = sys::self_cpu_secs();
    shared.stop.store(true, Relaxed);
    let st = join_threads(handles);
    let elapsed = (now_ns(&cfg) - start_ns) as f64 / 1e9;

    // Rates.
    let ramp_secs = st.ramp_end_ns.saturating_sub(go) as f64 / 1e9;
    let avg_rate = if ramp_secs > 0.0 {
        st.established as f64 / ramp_secs
    } else {
        0.0
    };
    let per_second: Vec<f64> = ticks
        .iter()
        .scan(0u64, |prev, &t| {
            let d = t - *prev;
            *prev = t;
            Some(d as f64)
        })
        .collect();
    let median_rate = if per_second.is_empty() {
        avg_rate
    } else {
        median(&per_second)
    };
    // Also cut short: `--hold-while`'s file still there when the run's timeout ended the hold.
    let hold_truncated = hold_end < hold_end_wanted
        || INTERRUPTED.load(Relaxed)
        || a.hold_while.as_ref().is_some_and(|p| p.exists());
    let synced = shared.synced.load(Relaxed);
    let last_synced_secs =
        (synced > 0).then(|| shared.last_synced_ns.load(Relaxed).saturating_sub(go) as f64 / 1e9);

    let gen_pc = per_conn(gen_after as i64 - gen_before as i64, alive_after);
    let gen_pc_end = per_conn(gen_end as i64 - gen_before as i64, alive_end);
    let gw = |x: Option<u64>, alive: u64| -> Option<f64> {
        per_conn(x? as i64 - gw_before? as i64, alive)
    };
    let gw_pc = gw(gw_after, alive_after);
    let gw_pc_end = gw(gw_end, alive_end);
    let gw_anon_pc_end = (gw_anon_end.zip(gw_anon_before))
        .and_then(|(end, before)| per_conn(end as i64 - before as i64, alive_end));
    let slab_pc = per_conn(
        (k_after.slab_kb as i64 - k_before.slab_kb as i64) * 1024,
        alive_after,
    );
    let sunr_pc = per_conn(
        (k_after.sunreclaim_kb as i64 - k_before.sunreclaim_kb as i64) * 1024,
        alive_after,
    );
    let hs = &st.handshake_us;
    let failures_total = st.failed + st.lost + st.not_started;
    let ok = failures_total == 0 && !INTERRUPTED.load(Relaxed);
    let first_user = c.user_offset;
    let last_user = c.user_offset + a.n as u64 - 1;

    // Text report.
    println!(
        "ringgate-bench idle  target={} route={} auth={} users={}{}..{}{} threads={} sources={}",
        cfg.host,
        route.path(),
        if c.secret.is_some() { "jwt" } else { "dev" },
        c.user_prefix,
        first_user,
        c.user_prefix,
        last_user,
        threads,
        sources_text(&cfg)
    );
    println!(
        "connections  requested {}  established {}  failed {}  lost {}  not_started {}  alive_at_end {}",
        a.n, st.established, st.failed, st.lost, st.not_started, alive_end
    );
    println!(
        "ramp         {ramp_secs:.2} s  avg {avg_rate:.1} conn/s  median {median_rate:.1} conn/s per second{}",
        if per_second.is_empty() {
            String::new()
        } else {
            format!(
                "  [{}]",
                per_second
                    .iter()
                    .map(|r| format!("{r:.0}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            )
        }
    );
    println!(
        "handshake    p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms  (connect start -> welcome)",
        pct(hs, 0.5, 1e3),
        pct(hs, 0.99, 1e3),
        hs.max() as f64 / 1e3
    );
    println!(
        "hold         {:.1} s{}  pings_answered {}  pongs_received {}  messages {} [{}]  closes_received [{}]",
        held_ns as f64 / 1e9,
        if hold_truncated { " (truncated)" } else { "" },
        st.pongs_sent,
        st.pongs_received,
        st.messages,
        map_text(&st.messages_by_op),
        map_text(&st.closes)
    );
    println!(
        "synced       {synced} of {}  last {}  (first connect -> last `synced`; `msg` acked {})",
        st.established,
        last_synced_secs.map_or("n/a".into(), |s| format!("{s:.3} s")),
        st.acks_sent
    );
    match st.welcome {
        Some(w) => println!(
            "welcome      heartbeat_ms {}  max_frame {}  user_mismatch {}  fragmented_messages {}",
            w.heartbeat_ms.map_or("?".into(), |v| v.to_string()),
            w.max_frame.map_or("?".into(), |v| v.to_string()),
            st.welcome_user_mismatch,
            st.fragmented_messages
        ),
        None => println!("welcome      none received"),
    }
    println!("failures     {}", map_text(&st.failures));
    println!("lost         {}", map_text(&st.lost_reasons));
    println!(
        "generator    rss {:.1} -> {:.1} MiB  {} per conn after ramp, {} at end of hold  cpu {:.2} s",
        mib(gen_before),
        mib(gen_after),
        opt_f(gen_pc, "B"),
        opt_f(gen_pc_end, "B"),
        gen_cpu
    );
    if !c.gateway_pid.is_empty() {
        let m = |x: Option<u64>| x.map_or("n/a".to_string(), |b| format!("{:.1}", mib(b)));
        println!(
            "gateway      pids {:?}  rss {} -> {} -> {} MiB  {} per conn after ramp, {} at end of hold \
             (anonymous: {} -> {} MiB, {} per conn at end)",
            c.gateway_pid,
            m(gw_before),
            m(gw_after),
            m(gw_end),
            opt_f(gw_pc, "B"),
            opt_f(gw_pc_end, "B"),
            m(gw_anon_before),
            m(gw_anon_end),
            opt_f(gw_anon_pc_end, "B"),
        );
    }
    println!(
        "kernel       slab {} -> {} kB ({} per conn)  sunreclaim {} -> {} kB ({} per conn)  \
         tcp inuse {} -> {}  tcp mem {} -> {} pages  (loopback: both ends' sockets count)",
        k_before.slab_kb,
        k_after.slab_kb,
        opt_f(slab_pc, "B"),
        k_before.sunreclaim_kb,
        k_after.sunreclaim_kb,
        opt_f(sunr_pc, "B"),
        k_before.tcp_inuse,
        k_after.tcp_inuse,
        k_before.tcp_mem_pages,
        k_after.tcp_mem_pages
    );
    println!(
        "result       {}  ({elapsed:.1} s)",
        if ok {
            "OK".to_string()
        } else if INTERRUPTED.load(Relaxed) {
            "INTERRUPTED".to_string()
        } else {
            format!("FAILED: {failures_total} connections failed, lost or not started")
        }
    );

    if c.json {
        let gateway = if c.gateway_pid.is_empty() {
            Value::Null
        } else {
            json!({
                "pids": c.gateway_pid,
                "rss_before": gw_before,
                "rss_after_ramp": gw_after,
                "cpu_secs_ramp": gw_cpu_ramp,
                "cpu_us_per_connect": gw_cpu_ramp
                    .map(|secs| secs * 1e6 / (st.established as f64).max(1.0)),
                "rss_end": gw_end,
                "rss_per_conn": gw_pc,
                "rss_per_conn_end": gw_pc_end,
                "anon_before": gw_anon_before,
                "anon_end": gw_anon_end,
                "anon_per_conn_end": gw_anon_pc_end,
            })
        };
        let j = json!({
            "mode": "idle",
            "target": cfg.host,
            "route": route.path(),
            "auth": if c.secret.is_some() { "jwt" } else { "dev" },
            "threads": threads,
            "sources": cfg.sources.len(),
            "user_prefix": c.user_prefix,
            "user_offset": c.user_offset,
            "requested": a.n,
            "established": st.established,
            "failed": st.failed,
            "lost": st.lost,
            "not_started": st.not_started,
            "alive_after_ramp": alive_after,
            "alive_at_end": alive_end,
            "failures": map_json(&st.failures),
            "lost_reasons": map_json(&st.lost_reasons),
            "closes_received": map_json(&st.closes),
            "ramp_secs": ramp_secs,
            "connect_rate_avg": avg_rate,
            "connect_rate_median": median_rate,
            "connect_rate_per_second": per_second,
            "handshake_ms": {
                "p50": pct(hs, 0.5, 1e3),
                "p90": pct(hs, 0.9, 1e3),
                "p99": pct(hs, 0.99, 1e3),
                "max": hs.max() as f64 / 1e3,
            },
            "hold_secs": held_ns as f64 / 1e9,
            "hold_truncated": hold_truncated,
            "pings_received": st.pings_received,
            "pings_answered": st.pongs_sent,
            "pongs_received": st.pongs_received,
            "messages_received": st.messages,
            "messages_by_op": map_json(&st.messages_by_op),
            "messages_before_welcome": st.messages_before_welcome,
            "fragmented_messages": st.fragmented_messages,
            "welcome": st.welcome,
            "welcome_user_mismatch": st.welcome_user_mismatch,
            "synced": synced,
            "last_synced_secs": last_synced_secs,
            "generator": {
                "rss_before": gen_before,
                "rss_after_ramp": gen_after,
                "rss_end": gen_end,
                "rss_per_conn": gen_pc,
                "rss_per_conn_end": gen_pc_end,
                "cpu_secs": gen_cpu,
            },
            "gateway": gateway,
            "kernel": {
                "before": k_before,
                "after_ramp": k_after,
                "end": k_end,
                "slab_per_conn": slab_pc,
                "sunreclaim_per_conn": sunr_pc,
            },
            "elapsed_secs": elapsed,
            "ok": ok,
        });
        println!("{j}");
    }
    Ok(if ok || (c.allow_failures && !INTERRUPTED.load(Relaxed)) {
        0
    } else if INTERRUPTED.load(Relaxed) {
        130
    } else {
        1
    })
}

/// Wait until every loop has connected, then start the clock `lead_ns` from now and release
/// the loops. Stops the run when nothing connected. Returns (connected, t0).
fn start_clock(barrier: &Barrier, shared: &Shared, cfg: &Config, lead_ns: u64) -> (u64, u64) {
    barrier.wait();
    barrier.wait();
    let connected = shared
        .established
        .load(Relaxed)
        .saturating_sub(shared.lost.load(Relaxed));
    if connected == 0 || INTERRUPTED.load(Relaxed) {
        shared.stop.store(true, Relaxed);
    }
    let t0 = now_ns(cfg) + lead_ns;
    shared.t0_ns.store(t0, Relaxed);
    barrier.wait();
    (connected, t0)
}

/// CPU seconds of the gateway pids (None without pids) and of this process over the measured
/// window, with the instants the samples were really taken.
/// The gateway's CPU seconds over the window (all, and in the kernel), the generator's own,
/// and when the window was actually sampled (start, end).
type CpuSample = (Option<(f64, f64)>, f64, u64, u64);

fn cpu_over_window(
    cfg: &Config,
    pids: &[u32],
    win_start: u64,
    win_end: u64,
    mut sleep_until_ns: impl FnMut(u64),
) -> CpuSample {
    sleep_until_ns(win_start);
    let gw0 = sys::pids_user_sys_secs(pids)
        .ok()
        .filter(|_| !pids.is_empty());
    let me0 = sys::self_cpu_secs();
    let t_a = now_ns(cfg);
    sleep_until_ns(win_end);
    let gw1 = sys::pids_user_sys_secs(pids)
        .ok()
        .filter(|_| !pids.is_empty());
    let me1 = sys::self_cpu_secs();
    let t_b = now_ns(cfg);
    let gw = gw0
        .zip(gw1)
        .map(|((u0, s0), (u1, s1))| (u1 + s1 - u0 - s0, s1 - s0));
    (gw, me1 - me0, t_a, t_b)
}

fn run_echo(a: EchoArgs) -> Result<i32, String> {
    let c = &a.common;
    let duration = secs("duration", a.duration, false)?;
    let warmup = secs("warmup", a.warmup, true)?;
    let connect_timeout = secs("timeout", a.timeout, false)?;
    if a.c == 0 {
        return Err("-c must be at least 1".into());
    }
    if a.inflight == 0 || a.inflight > 1 << 20 {
        return Err("--inflight must be 1..=1048576".into());
    }
    if a.size as u64 > engine::MAX_SERVER_MESSAGE {
        return Err(format!("-s must be at most {}", engine::MAX_SERVER_MESSAGE));
    }
    let (route, payload, opcode) = match a.route {
        RouteArg::Echo => {
            // Printable, so it is valid UTF-8 for text frames.
            let p: Vec<u8> = (0..a.size).map(|i| b'a' + (i % 26) as u8).collect();
            let op = if a.binary { ws::OP_BINARY } else { ws::OP_TEXT };
            (Route::Echo, p, op)
        }
        RouteArg::Ws => (Route::Ws, b"{\"op\":\"ping\"}".to_vec(), ws::OP_TEXT),
    };
    let payload_len = payload.len();
    let mode = Mode::Echo {
        payload,
        opcode,
        inflight: a.inflight,
        expect_pong: route == Route::Ws,
    };
    let cfg = Arc::new(build_config(c, route, mode, true, a.c)?);
    let shared = Arc::new(Shared::default());
    let loops = make_loops(&cfg, &shared, a.c, c.threads, a.concurrency, 0.0)?;
    let threads = loops.len();
    let barrier = Arc::new(Barrier::new(threads + 1));
    install_sigint();
    let start_ns = now_ns(&cfg);
    let connect_deadline = start_ns + ns(connect_timeout);

    let (warm_ns, dur_ns) = (ns(warmup), ns(duration));
    let handles: Vec<_> = loops
        .into_iter()
        .map(|mut lp| {
            let (barrier, shared) = (barrier.clone(), shared.clone());
            std::thread::spawn(move || {
                lp.prefault();
                barrier.wait(); // go
                lp.ramp(connect_deadline);
                barrier.wait(); // all connected
                barrier.wait(); // t0 published
                let t0 = shared.t0_ns.load(Relaxed);
                let (ws_, we) = if shared.stop.load(Relaxed) {
                    (t0, t0)
                } else {
                    (t0 + warm_ns, t0 + warm_ns + dur_ns)
                };
                lp.run_echo(t0, ws_, we);
                lp.close_all();
                lp.stats
            })
        })
        .collect();

    let (connected, t0) = start_clock(&barrier, &shared, &cfg, 10_000_000);
    let (win_start, win_end) = (t0 + warm_ns, t0 + warm_ns + dur_ns);
    let mut cpu = None;
    if !shared.stop.load(Relaxed) {
        if !c.quiet {
            eprintln!(
                "connected {connected}/{}; warmup {:.1}s, measuring {:.1}s",
                a.c,
                warmup.as_secs_f64(),
                duration.as_secs_f64()
            );
        }
        cpu = Some(cpu_over_window(
            &cfg,
            &c.gateway_pid,
            win_start,
            win_end,
            |t| sleep_until(&cfg, t),
        ));
    }
    let st = join_threads(handles);
    let elapsed = (now_ns(&cfg) - start_ns) as f64 / 1e9;
    let interrupted = INTERRUPTED.load(Relaxed);

    let window_secs = duration.as_secs_f64();
    let msgs = st.replies_in_window;
    let rate = msgs as f64 / window_secs;
    let empty = Histogram::<u64>::new(3).unwrap();
    let lat = st.latency_ns.as_ref().unwrap_or(&empty);
    let us = 1e3;
    let errors = st.failed + st.lost + st.not_started + st.bad_replies + st.unexpected_replies;
    let (gw_cpu, gw_sys, gen_cpu, sample_skew_ms) = match cpu {
        Some((g, m, a_, b_)) => (
            g.map(|(all, _)| all),
            g.map(|(_, kernel)| kernel),
            Some(m),
            Some(
                (a_.saturating_sub(win_start) as f64).max(b_.saturating_sub(win_end) as f64) / 1e6,
            ),
        ),
        None => (None, None, None, None),
    };
    let per_msg = |cpu: Option<f64>| cpu.filter(|_| msgs > 0).map(|s| s * 1e6 / msgs as f64);
    let ok = errors == 0 && msgs > 0 && !interrupted;

    println!(
        "ringgate-bench echo  target={} route={} payload={} B {} connections={} inflight={} threads={} sources={}",
        cfg.host,
        route.path(),
        payload_len,
        if opcode == ws::OP_TEXT { "text" } else { "binary" },
        a.c,
        a.inflight,
        threads,
        sources_text(&cfg)
    );
    println!(
        "connections  requested {}  connected {}  failed {}  lost {}",
        a.c, st.established, st.failed, st.lost
    );
    println!(
        "window       warmup {:.1} s  measured {:.3} s",
        warmup.as_secs_f64(),
        window_secs
    );
    println!(
        "throughput   {rate:.0} msg/s  ({msgs} replies in window, {} sent in total, {:.1} MB/s payload each way)",
        st.sent,
        rate * payload_len as f64 / 1e6
    );
    println!(
        "latency_us   p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}  mean {:.1}",
        pct(lat, 0.5, us),
        pct(lat, 0.9, us),
        pct(lat, 0.99, us),
        pct(lat, 0.999, us),
        lat.max() as f64 / us,
        if lat.is_empty() { 0.0 } else { lat.mean() / us }
    );
    println!(
        "errors       {errors}  (connect failures [{}], lost [{}], bad_replies {}, unexpected_replies {}, other_messages {}, closes_received [{}])",
        map_text(&st.failures),
        map_text(&st.lost_reasons),
        st.bad_replies,
        st.unexpected_replies,
        st.other_messages,
        map_text(&st.closes)
    );
    println!(
        "cpu          generator {}  gateway {}",
        gen_cpu.map_or("n/a".into(), |s| format!(
            "{s:.2} s ({:.2} us/msg)",
            per_msg(Some(s)).unwrap_or(0.0)
        )),
        gw_cpu.map_or(
            if c.gateway_pid.is_empty() {
                "n/a (no --gateway-pid)".into()
            } else {
                "n/a".into()
            },
            |s| format!("{s:.2} s ({:.2} us/msg)", per_msg(Some(s)).unwrap_or(0.0))
        )
    );
    println!(
        "result       {}  ({elapsed:.1} s)",
        if ok {
            "OK".to_string()
        } else if interrupted {
            "INTERRUPTED".into()
        } else {
            format!("FAILED: {errors} errors, {msgs} replies in window")
        }
    );
    if c.json {
        let j = json!({
            "mode": "echo",
            "target": cfg.host,
            "route": route.path(),
            "payload_bytes": payload_len,
            "frame": if opcode == ws::OP_TEXT { "text" } else { "binary" },
            "connections": a.c,
            "connected": st.established,
            "inflight": a.inflight,
            "threads": threads,
            "warmup_secs": warmup.as_secs_f64(),
            "duration_secs": window_secs,
            "messages": msgs,
            "msgs_per_sec": rate,
            "payload_mb_per_sec": rate * payload_len as f64 / 1e6,
            "sent": st.sent,
            "replies_total": st.replies_total,
            "latency_us": {
                "p50": pct(lat, 0.5, us),
                "p90": pct(lat, 0.9, us),
                "p99": pct(lat, 0.99, us),
                "p999": pct(lat, 0.999, us),
                "max": lat.max() as f64 / us,
                "mean": if lat.is_empty() { 0.0 } else { lat.mean() / us },
            },
            "errors": errors,
            "failed": st.failed,
            "lost": st.lost,
            "failures": map_json(&st.failures),
            "lost_reasons": map_json(&st.lost_reasons),
            "bad_replies": st.bad_replies,
            "unexpected_replies": st.unexpected_replies,
            "other_messages": st.other_messages,
            "closes_received": map_json(&st.closes),
            "pings_answered": st.pongs_sent,
            "generator_cpu_secs": gen_cpu,
            "generator_cpu_us_per_msg": per_msg(gen_cpu),
            "gateway_pids": c.gateway_pid,
            "gateway_cpu_secs": gw_cpu,
            "gateway_cpu_us_per_msg": per_msg(gw_cpu),
            "gateway_kernel_us_per_msg": per_msg(gw_sys),
            "cpu_sample_skew_ms": sample_skew_ms,
            "elapsed_secs": elapsed,
            "ok": ok,
        });
        println!("{j}");
    }
    Ok(if ok || (c.allow_failures && msgs > 0 && !interrupted) {
        0
    } else if interrupted {
        130
    } else {
        1
    })
}

fn main() {
    // Transparent huge pages would make RSS move in 2 MiB steps (the
    // allocator asks for them on its arenas) and blur bytes-per-connection.
    // SAFETY: prctl with integer arguments only.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
    // A panicking loop thread would leave the others waiting on a barrier:
    // exit the whole process instead, so every run stays bounded.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        std::process::exit(101);
    }));
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Idle(a) => run_idle(a),
        Cmd::Echo(a) => run_echo(a),
        Cmd::Send(a) => run_send(a),
        Cmd::Store(a) => store::run(a),
        Cmd::Fanout(a) => fanout::run(a),
        Cmd::Flood(a) => flood::run(a),
        Cmd::Floor(a) => floor::run(a).map(|()| 0),
        Cmd::RedisFloor(a) => redis_floor::run(a),
        Cmd::Push(a) => push::run(a),
        Cmd::UpgradeFloor(a) => upgrade_floor::run(a),
        Cmd::EchoFloor(a) => echo_floor::run(a),
    };
    match r {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("ringgate-bench: error: {e}");
            std::process::exit(2);
        }
    }
}

fn lat_json(h: &Histogram<u64>) -> Value {
    json!({
        "p50": pct(h, 0.5, 1e3),
        "p90": pct(h, 0.9, 1e3),
        "p99": pct(h, 0.99, 1e3),
        "p999": pct(h, 0.999, 1e3),
        "max": h.max() as f64 / 1e3,
        "mean": if h.is_empty() { 0.0 } else { h.mean() / 1e3 },
        "count": h.len(),
    })
}

fn lat_text(h: &Histogram<u64>) -> String {
    format!(
        "p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}  mean {:.1}",
        pct(h, 0.5, 1e3),
        pct(h, 0.9, 1e3),
        pct(h, 0.99, 1e3),
        pct(h, 0.999, 1e3),
        h.max() as f64 / 1e3,
        if h.is_empty() { 0.0 } else { h.mean() / 1e3 }
    )
}

/// Accepted sends whose partner never received them, and sends still not
/// accepted, over all connections' end-of-run sets.
fn count_missing(sets: &[(u64, chat::CtrSet, chat::CtrSet, u64)]) -> (u64, u64) {
    let by_idx: std::collections::HashMap<u64, &chat::CtrSet> =
        sets.iter().map(|(g, _, r, _)| (*g, r)).collect();
    let empty = chat::CtrSet::default();
    let mut missing = 0;
    let mut pending = 0;
    for (g, acc, _, p) in sets {
        let recv = by_idx.get(&(g ^ 1)).copied().unwrap_or(&empty);
        missing += chat::missing(acc, recv);
        pending += p;
    }
    (missing, pending)
}

fn run_send(a: SendArgs) -> Result<i32, String> {
    let c = &a.common;
    let duration = secs("duration", a.duration, false)?;
    let warmup = secs("warmup", a.warmup, true)?;
    let grace = secs("grace", a.grace, true)?;
    let connect_timeout = secs("timeout", a.timeout, false)?;
    if a.users < 2 || !a.users.is_multiple_of(2) {
        return Err("--users must be even and at least 2".into());
    }
    if a.inflight == 0 || a.inflight > 4096 {
        return Err("--inflight must be 1..=4096".into());
    }
    if !(a.rate >= 0.0 && a.rate.is_finite()) {
        return Err("--rate must be >= 0".into());
    }
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    let nonce = chat::make_nonce(ws::splitmix64(seed ^ std::process::id() as u64));
    let mode = Mode::Send {
        inflight: a.inflight,
        nonce,
        to_prefix_json: chat::json_prefix(&c.user_prefix),
        read_every: a.read_every,
    };
    let cfg = Arc::new(build_config(c, Route::Ws, mode, true, a.users)?);
    let shared = Arc::new(Shared::default());
    let loops = make_loops(&cfg, &shared, a.users, c.threads, a.concurrency, 0.0)?;
    let threads = loops.len();
    let per_loop_rate = a.rate / threads as f64;
    let barrier = Arc::new(Barrier::new(threads + 1));
    install_sigint();
    let start_ns = now_ns(&cfg);
    let connect_deadline = start_ns + ns(connect_timeout);
    let (warm_ns, dur_ns, grace_ns) = (ns(warmup), ns(duration), ns(grace));
    let handles: Vec<_> = loops
        .into_iter()
        .map(|mut lp| {
            let (barrier, shared) = (barrier.clone(), shared.clone());
            std::thread::spawn(move || {
                lp.prefault();
                barrier.wait(); // go
                lp.ramp(connect_deadline);
                barrier.wait(); // all connected
                barrier.wait(); // t0 published
                let t0 = shared.t0_ns.load(Relaxed);
                let (ws_, we) = if shared.stop.load(Relaxed) {
                    (t0, t0)
                } else {
                    (t0 + warm_ns, t0 + warm_ns + dur_ns)
                };
                // The main thread ends the grace period; this is a backstop.
                let deadline = we + grace_ns + 1_000_000_000;
                lp.run_send(t0, ws_, we, per_loop_rate, deadline);
                lp.close_all();
                lp.stats
            })
        })
        .collect();

    // A moment for replays of earlier runs (before `synced`) to drain.
    let (connected, t0) = start_clock(&barrier, &shared, &cfg, 50_000_000);
    let (win_start, win_end) = (t0 + warm_ns, t0 + warm_ns + dur_ns);
    let mut cpu = None;
    let mut grace_used = 0.0;
    if !shared.stop.load(Relaxed) {
        if !c.quiet {
            eprintln!(
                "connected {connected}/{}; warmup {:.1}s, measuring {:.1}s",
                a.users,
                warmup.as_secs_f64(),
                duration.as_secs_f64()
            );
        }
        let progress = |label: &str| {
            if !c.quiet {
                eprintln!(
                    "[{:6.1}s] {label}  sent {}  accepted {}  received {}  outstanding {}",
                    (now_ns(&cfg).saturating_sub(t0)) as f64 / 1e9,
                    shared.chat_sent.load(Relaxed),
                    shared.chat_accepted.load(Relaxed),
                    shared.chat_received.load(Relaxed),
                    shared.chat_outstanding.load(Relaxed),
                );
            }
        };
        let mut next_print = t0 + 1_000_000_000;
        let mut sleep_progress = |until: u64| loop {
            let now = now_ns(&cfg);
            if now >= until || INTERRUPTED.load(Relaxed) {
                break;
            }
            std::thread::sleep(Duration::from_nanos(
                (until - now).min(next_print.saturating_sub(now)).max(1),
            ));
            if now_ns(&cfg) >= next_print {
                next_print += 1_000_000_000;
                progress("run  ");
            }
        };
        cpu = Some(cpu_over_window(
            &cfg,
            &c.gateway_pid,
            win_start,
            win_end,
            &mut sleep_progress,
        ));
        // Grace: wait for outstanding accepteds and for every accepted msg
        // to reach its recipient, at most `--grace`.
        let grace_end = win_end + grace_ns;
        loop {
            let now = now_ns(&cfg);
            let settled = shared.chat_outstanding.load(Relaxed) == 0
                && shared.chat_received.load(Relaxed) >= shared.chat_accepted.load(Relaxed);
            if settled || now >= grace_end || INTERRUPTED.load(Relaxed) {
                grace_used = now.saturating_sub(win_end) as f64 / 1e9;
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        progress("end  ");
    }
    shared.stop.store(true, Relaxed);
    let st = join_threads(handles);
    let elapsed = (now_ns(&cfg) - start_ns) as f64 / 1e9;
    let interrupted = INTERRUPTED.load(Relaxed);

    let window_secs = duration.as_secs_f64();
    let (missing, unaccepted) = count_missing(&st.chat_sets);
    let empty = Histogram::<u64>::new(3).unwrap();
    let acc_lat = st.latency_ns.as_ref().unwrap_or(&empty);
    let msg_lat = st.msg_latency_ns.as_ref().unwrap_or(&empty);
    let acc = st.accepted_in_window;
    let per_s = |n: u64| n as f64 / window_secs;
    let error_frames: u64 = st.errors_by_code.values().sum();
    let errors = st.failed
        + st.lost
        + st.not_started
        + error_frames
        + st.duplicates
        + missing
        + st.unexpected_accepted
        + st.unparsed;
    let (gw_cpu, gw_sys, gen_cpu, sample_skew_ms) = match cpu {
        Some((g, m, a_, b_)) => (
            g.map(|(all, _)| all),
            g.map(|(_, kernel)| kernel),
            Some(m),
            Some(
                (a_.saturating_sub(win_start) as f64).max(b_.saturating_sub(win_end) as f64) / 1e6,
            ),
        ),
        None => (None, None, None, None),
    };
    let per_msg = |cpu: Option<f64>| cpu.filter(|_| acc > 0).map(|s| s * 1e6 / acc as f64);
    let ok = errors == 0 && acc > 0 && !interrupted;

    println!(
        "ringgate-bench send  target={} route=/ws auth={} users={}{}..{}{} pairs={} inflight={} rate={} threads={} sources={}",
        cfg.host,
        if c.secret.is_some() { "jwt" } else { "dev" },
        c.user_prefix,
        c.user_offset,
        c.user_prefix,
        c.user_offset + a.users as u64 - 1,
        a.users / 2,
        a.inflight,
        if a.rate > 0.0 { format!("{}/s", a.rate) } else { "max".into() },
        threads,
        sources_text(&cfg)
    );
    println!(
        "connections  requested {}  connected {}  failed {}  lost {}",
        a.users, st.established, st.failed, st.lost
    );
    println!(
        "window       warmup {:.1} s  measured {:.3} s  grace used {:.2} s",
        warmup.as_secs_f64(),
        window_secs,
        grace_used
    );
    println!(
        "throughput   accepted {:.0}/s  received {:.0}/s  delivered {:.0}/s  ({} accepted, {} received, {} delivered in window; {} sent in window)",
        per_s(acc),
        per_s(st.msgs_in_window),
        per_s(st.delivered_in_window),
        acc,
        st.msgs_in_window,
        st.delivered_in_window,
        st.sent_in_window
    );
    println!(
        "totals       sent {}  resent {}  accepted {}  received {}  delivered {}  acks_sent {}",
        st.sent, st.resent, st.accepted_total, st.msgs_total, st.delivered_total, st.acks_sent
    );
    if a.read_every > 0 {
        println!(
            "receipts     sent {}  read frames received {} ({:.0}/s in window)",
            st.reads_sent,
            st.reads_total,
            per_s(st.reads_in_window)
        );
    }
    println!("accepted_us  {}  (send -> accepted)", lat_text(acc_lat));
    println!(
        "msg_us       {}  (send -> msg at the recipient)",
        lat_text(msg_lat)
    );
    println!(
        "errors       {errors}  (error frames [{}], duplicates {}, missing {}, unexpected_accepted {}, unparsed {}, connect failures [{}], lost [{}])",
        map_text(&st.errors_by_code),
        st.duplicates,
        missing,
        st.unexpected_accepted,
        st.unparsed,
        map_text(&st.failures),
        map_text(&st.lost_reasons)
    );
    println!(
        "other        unaccepted_at_end {}  abandoned {}  foreign_msgs {}  unexpected_delivered {}  messages [{}]  closes_received [{}]",
        unaccepted,
        st.abandoned,
        st.foreign_msgs,
        st.unexpected_delivered,
        map_text(&st.messages_by_op),
        map_text(&st.closes)
    );
    println!(
        "cpu          generator {}  gateway {}",
        gen_cpu.map_or("n/a".into(), |s| format!(
            "{s:.2} s ({:.2} us/accepted)",
            per_msg(Some(s)).unwrap_or(0.0)
        )),
        gw_cpu.map_or(
            if c.gateway_pid.is_empty() {
                "n/a (no --gateway-pid)".into()
            } else {
                "n/a".into()
            },
            |s| format!(
                "{s:.2} s ({:.2} us/accepted)",
                per_msg(Some(s)).unwrap_or(0.0)
            )
        )
    );
    println!(
        "result       {}  ({elapsed:.1} s)",
        if ok {
            "OK".to_string()
        } else if interrupted {
            "INTERRUPTED".into()
        } else {
            format!("FAILED: {errors} errors, {acc} accepted in window")
        }
    );
    if c.json {
        let j = json!({
            "mode": "send",
            "target": cfg.host,
            "route": "/ws",
            "auth": if c.secret.is_some() { "jwt" } else { "dev" },
            "users": a.users,
            "user_prefix": c.user_prefix,
            "user_offset": c.user_offset,
            "connected": st.established,
            "inflight": a.inflight,
            "rate": a.rate,
            "threads": threads,
            "sources": cfg.sources.len(),
            "warmup_secs": warmup.as_secs_f64(),
            "duration_secs": window_secs,
            "grace_secs": grace.as_secs_f64(),
            "grace_used_secs": grace_used,
            "accepted": acc,
            "accepted_per_sec": per_s(acc),
            "received": st.msgs_in_window,
            "received_per_sec": per_s(st.msgs_in_window),
            "delivered": st.delivered_in_window,
            "delivered_per_sec": per_s(st.delivered_in_window),
            "sent_in_window": st.sent_in_window,
            "sent": st.sent,
            "resent": st.resent,
            "accepted_total": st.accepted_total,
            "received_total": st.msgs_total,
            "delivered_total": st.delivered_total,
            "reads_sent": st.reads_sent,
            "reads_received": st.reads_total,
            "reads_received_per_sec": per_s(st.reads_in_window),
            "acks_sent": st.acks_sent,
            "accepted_latency_us": lat_json(acc_lat),
            "msg_latency_us": lat_json(msg_lat),
            "errors": errors,
            "error_frames": map_json(&st.errors_by_code),
            "duplicates": st.duplicates,
            "missing": missing,
            "unaccepted_at_end": unaccepted,
            "abandoned": st.abandoned,
            "unexpected_accepted": st.unexpected_accepted,
            "unexpected_delivered": st.unexpected_delivered,
            "foreign_msgs": st.foreign_msgs,
            "unparsed": st.unparsed,
            "msgs_without_t": st.msgs_without_t,
            "messages_by_op": map_json(&st.messages_by_op),
            "failed": st.failed,
            "lost": st.lost,
            "failures": map_json(&st.failures),
            "lost_reasons": map_json(&st.lost_reasons),
            "closes_received": map_json(&st.closes),
            "pings_answered": st.pongs_sent,
            "generator_cpu_secs": gen_cpu,
            "generator_cpu_us_per_msg": per_msg(gen_cpu),
            "gateway_pids": c.gateway_pid,
            "gateway_cpu_secs": gw_cpu,
            "gateway_cpu_us_per_msg": per_msg(gw_cpu),
            "gateway_kernel_us_per_msg": per_msg(gw_sys),
            "cpu_sample_skew_ms": sample_skew_ms,
            "elapsed_secs": elapsed,
            "ok": ok,
        });
        println!("{j}");
    }
    Ok(if ok || (c.allow_failures && acc > 0 && !interrupted) {
        0
    } else if interrupted {
        130
    } else {
        1
    })
}
