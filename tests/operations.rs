//! What an operator meets (issue 19), tried with the real binary: start-up under the limits
//! that break it, config refusals, a second gateway on the same address, the log channel,
//! /metrics checked by promtool, the Grafana dashboard's queries evaluated by a real
//! Prometheus scraping a real gateway, and the systemd unit checked by systemd-analyze.
//! promtool, prometheus, systemd-analyze, prlimit and curl are installed by tests/run.sh;
//! a missing one fails loudly with the fix.

mod common;

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The path of `cmd`, or a failure that says how to install it.
fn need(cmd: &str, package: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(cmd))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!("`{cmd}` is required by this test: install the Debian package `{package}` (apt-get install {package}); tests/run.sh installs it")
    })
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rg-ops-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `ringgate serve` on loopback under `prlimit` options; its output once it exits.
fn serve_under(prlimit: &[&str], args: &[&str]) -> std::process::Output {
    let prl = need("prlimit", "util-linux");
    let mut cmd = Command::new(prl);
    cmd.args(prlimit)
        .arg(env!("CARGO_BIN_EXE_ringgate"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--shards",
            "2",
        ])
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    // Bounded: a start that does not fail would run until killed.
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(20));
        // SAFETY: a signal to our own child (already reaped: ESRCH, harmless).
        unsafe { libc::kill(pid, libc::SIGKILL) };
    });
    let out = child.wait_with_output().unwrap();
    drop(killer);
    out
}

/// Issue 19: at `ulimit -l 64` the gateway printed "ready", then "shard thread(s)
/// panicked" with nothing above, and exited 2. Now: refused before any shard, with the
/// limit found, the limit needed and the fix, exit 3, nothing on stdout.
#[test]
fn a_memlock_limit_too_low_is_refused_with_the_need_and_the_fix() {
    let out = serve_under(&["--memlock=65536:65536"], &[]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "stderr: {err}");
    assert!(
        err.contains("64 KiB") && err.contains("512 KiB") && err.contains("LimitMEMLOCK"),
        "{err}"
    );
    assert!(err.contains("ulimit -l"), "{err}");
    assert_eq!(text(&out.stdout), "", "no ready line on a failed start");
    // At glommio's minimum it starts (and a SIGTERM then ends it cleanly).
    let mut child = Command::new(need("prlimit", "util-linux"))
        .arg("--memlock=524288:524288")
        .arg(env!("CARGO_BIN_EXE_ringgate"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .args(["--shards", "2"])
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (ready, status) = ready_line_then_sigterm(&mut child);
    assert!(
        ready.contains("listening"),
        "no ready line at 512 KiB: {ready:?}"
    );
    assert_eq!(status.code(), Some(0));
}

/// Two gateways on one `listen` split clients between two stores: the second is refused
/// (exit 3, naming the address and the opt-in) unless `share_listen` says it is meant.
#[test]
fn a_second_gateway_on_the_same_address_is_refused_unless_sharing_is_asked_for() {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let first = Gateway::start_raw(
        &[
            "serve",
            "--listen",
            &listen,
            "--admin-listen",
            "127.0.0.1:0",
            "--shards",
            "1",
        ],
        &[],
    );
    let out = run_ringgate(
        &[
            "serve",
            "--listen",
            &listen,
            "--admin-listen",
            "127.0.0.1:0",
            "--shards",
            "1",
        ],
        &[],
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains(&listen) && err.contains("already served") && err.contains("share_listen"),
        "{err}"
    );
    // Opted in: it starts on the same port.
    let second = Gateway::start_raw(
        &[
            "serve",
            "--listen",
            &listen,
            "--admin-listen",
            "127.0.0.1:0",
            "--shards",
            "1",
            "--share-listen",
            "true",
        ],
        &[("RINGGATE_LOG_FORMAT", "text")],
    );
    assert_eq!(second.public, first.public);
    // And a host name is taken, resolved at start.
    let port2 = free_port();
    let named = Gateway::start_raw(
        &[
            "serve",
            "--listen",
            &format!("localhost:{port2}"),
            "--admin-listen",
            "127.0.0.1:0",
            "--shards",
            "1",
        ],
        &[],
    );
    assert_eq!(named.public.port(), port2);
    assert!(named.public.ip().is_loopback());
}

/// Each refused value names its key, exit 2, before anything starts.
#[test]
fn config_that_cannot_be_honoured_is_refused_naming_the_key() {
    let cases: [(&[&str], &str); 5] = [
        (&["--redis-url", "http://x"], "redis_url"),
        (&["--api-key", "x"], "api_key"),
        (
            &["--allowed-origins", "chat.example.com"],
            "allowed_origins",
        ),
        (&["--log-format", "xml"], "log_format"),
        (&["--listen", "no-such-host.invalid:8080"], "listen"),
    ];
    for (args, key) in cases {
        let mut all = vec!["serve", "--admin-listen", "127.0.0.1:0"];
        all.extend_from_slice(args);
        let out = run_ringgate(&all, &[]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(&format!("`{key}`")), "{args:?}: {err}");
    }
}

/// `allowed_origins = "*"` lets any browser in (it was matched literally: 403 for all).
#[test]
fn star_allows_any_origin() {
    let gw = Gateway::start(&["--allowed-origins", "*"]);
    let (status, _) = upgrade_status(
        gw.public,
        "/ws?user=ann",
        &["Origin: https://anything.example"],
    );
    assert_eq!(status, 101);
}

/// One log channel: stderr, every line once, no colour into a pipe; JSON on request, one
/// object per line; stdout holds only the ready line.
#[test]
fn logs_go_to_stderr_once_each_as_text_or_json() {
    let mut gw = Gateway::start(&[]);
    gw.sigterm();
    assert_eq!(gw.wait_exit(Duration::from_secs(15)), Some(0));
    let lines: Vec<String> = gw.stderr.try_iter().collect();
    assert!(!lines.is_empty());
    assert!(
        lines.iter().all(|l| !l.contains('\u{1b}')),
        "colour codes into a pipe: {lines:#?}"
    );
    let dev = lines.iter().filter(|l| l.contains("dev mode")).count();
    assert_eq!(dev, 1, "the dev-mode warning once: {lines:#?}");
    assert!(lines.iter().any(|l| l.contains("drained")), "{lines:#?}");

    let mut gw = Gateway::start(&["--log-format", "json"]);
    gw.sigterm();
    assert_eq!(gw.wait_exit(Duration::from_secs(15)), Some(0));
    let lines: Vec<String> = gw.stderr.try_iter().collect();
    assert!(lines.len() >= 3, "{lines:#?}");
    for line in &lines {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not one JSON object per line ({e}): {line}"));
        assert!(v["level"].is_string() && v["message"].is_string(), "{line}");
    }
    // A refused start is logged the same way (the config itself was fine).
    let port = free_port();
    let _holder = TcpListener::bind(("127.0.0.1", port)).unwrap();
    let out = run_ringgate(
        &[
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--admin-listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(3));
    let last = text(&out.stderr);
    let last = last.lines().last().unwrap();
    let v: serde_json::Value = serde_json::from_str(last).unwrap();
    assert_eq!(v["level"], "ERROR", "{last}");
    assert_eq!(v["exit_code"], 3, "{last}");
}

/// /metrics passes `promtool check metrics`, has the process series, a build info
/// series, no `ringgate_redis_up` without Redis, and the store reads up.
#[test]
fn metrics_pass_promtool_and_read_right_without_redis() {
    let promtool = need("promtool", "prometheus");
    let gw = Gateway::start(&[]);
    let (_ws, _) = connect_app(&gw, "ann");
    let (status, body) = gw.admin_get("/metrics");
    assert_eq!(status, 200);
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    for series in [
        "process_resident_memory_bytes{shard=\"process\"}",
        "process_cpu_seconds_total{shard=\"process\"}",
        "process_open_fds{shard=\"process\"}",
        "process_max_fds{shard=\"process\"}",
        "process_start_time_seconds{shard=\"process\"}",
        "ringgate_build_info{shard=\"process\",version=\"",
        "ringgate_store_up{shard=\"0\"} 1",
        "ringgate_store_up{shard=\"1\"} 1",
        "ringgate_send_accepted_seconds_bucket{shard=\"0\",le=\"10\"}",
    ] {
        assert!(body.contains(series), "no {series} in /metrics");
    }
    assert!(
        !body.contains("ringgate_redis_up{"),
        "redis_up without Redis"
    );
    let refused: Vec<&str> = body
        .lines()
        .filter(|l| l.starts_with("ringgate_connections_refused_total{"))
        .collect();
    assert!(!refused.is_empty());
    assert!(
        refused.iter().all(|l| !l.contains("status=")),
        "the status label repeated reason: {refused:?}"
    );
}

/// Run `query` through Prometheus' HTTP API; the result vector.
fn prom_query(api: SocketAddr, query: &str) -> Result<Vec<serde_json::Value>, String> {
    let out = Command::new(need("curl", "curl"))
        .args(["-sS", "--max-time", "5", "-G"])
        .arg(format!("http://{api}/api/v1/query"))
        .arg("--data-urlencode")
        .arg(format!("query={query}"))
        .output()
        .map_err(|e| e.to_string())?;
    let body = text(&out.stdout);
    let v: serde_json::Value =
        serde_json::from_str(&body).map_err(|e| format!("{e}: {body} {}", text(&out.stderr)))?;
    if v["status"] != "success" {
        return Err(body);
    }
    Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
}

struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Every query of dist/grafana-dashboard.json returns data from a real Prometheus that
/// scrapes a real gateway carrying some traffic.
#[test]
fn every_dashboard_query_returns_data_from_a_real_prometheus() {
    let prometheus = need("prometheus", "prometheus");
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("dist/grafana-dashboard.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    let queries: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter())
        .map(|t| t["expr"].as_str().unwrap().to_string())
        .collect();
    assert!(queries.len() >= 20, "{queries:?}");

    let gw = Gateway::start(&[]);

    let dir = scratch("prometheus");
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: ringgate\n    static_configs:\n      - targets: ['{}']\n",
            gw.admin
        ),
    )
    .unwrap();
    let api: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let _prom = Killed(
        Command::new(prometheus)
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={api}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus"),
    );
    // Scraped, and scraped often enough for rate() over 1m to have two samples.
    let scraped = eventually(Duration::from_secs(60), || {
        prom_query(api, "count_over_time(up{job=\"ringgate\"}[1m])")
            .ok()
            .and_then(|r| r.first()?["value"][1].as_str()?.parse::<f64>().ok())
            .is_some_and(|n| n >= 3.0)
    });
    assert!(
        scraped,
        "prometheus on {api} did not scrape {} three times in 60 s",
        gw.admin
    );
    let up = prom_query(api, "up{job=\"ringgate\"}").unwrap();
    assert_eq!(up[0]["value"][1], "1", "the scrape failed: {up:?}");
    // Traffic while scraped, so rates and the latency histogram have something to show.
    let (mut ann, _) = connect_app(&gw, "ann");
    let (mut bob, _) = connect_app(&gw, "bob");
    for i in 0..20 {
        send(
            &mut ann,
            "bob",
            &format!("c{i}"),
            serde_json::json!({"n": i}),
        );
        next_op(&mut ann, "accepted");
        let msg = next_op(&mut bob, "msg");
        ack(&mut bob, msg["seq"].as_u64().unwrap());
        next_op(&mut ann, "delivered");
    }
    let p99_query =
        "histogram_quantile(0.99, sum by (le) (rate(ringgate_send_accepted_seconds_bucket[5m])))";
    let p99 = || -> Option<f64> {
        prom_query(api, p99_query).ok()?.first()?["value"][1]
            .as_str()?
            .parse()
            .ok()
    };
    assert!(
        eventually(Duration::from_secs(30), || p99().is_some_and(|v| v > 0.0)),
        "the sends never showed in the p99 (last: {:?})",
        p99()
    );
    let mut empty = Vec::new();
    for q in &queries {
        match prom_query(api, q) {
            Ok(r) if !r.is_empty() => {}
            Ok(_) => empty.push(format!("{q}: no data")),
            Err(e) => empty.push(format!("{q}: {e}")),
        }
    }
    assert!(
        empty.is_empty(),
        "dashboard queries without data:\n{}",
        empty.join("\n")
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// The unit in dist/ passes `systemd-analyze verify` (with its paths pointed at this
/// checkout), and its limits are the ones tuning/check.sh asks for.
#[test]
fn the_systemd_unit_verifies_and_its_limits_pass_the_tuning_check() {
    let analyze = need("systemd-analyze", "systemd");
    let unit = std::fs::read_to_string(repo().join("dist/ringgate.service")).unwrap();
    let dir = scratch("systemd");
    let local = unit
        .replace(
            "/usr/local/share/ringgate/tuning",
            &repo().join("tuning").display().to_string(),
        )
        .replace("/usr/local/bin/ringgate", env!("CARGO_BIN_EXE_ringgate"));
    let path = dir.join("ringgate.service");
    std::fs::write(&path, local).unwrap();
    let out = Command::new(analyze)
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .unwrap();
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    // Lines about the host's other units are not this unit's business.
    let ours: Vec<&str> = said
        .lines()
        .filter(|l| l.contains("ringgate.service"))
        .collect();
    assert!(out.status.success() && ours.is_empty(), "{said}");
    let value = |key: &str| -> String {
        unit.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("no {key}= in the unit"))
            .to_string()
    };
    let nofile = value("LimitNOFILE");
    assert_eq!(value("LimitMEMLOCK"), "infinity");
    // check.sh's open-file rows, with the unit's limit as the process' limit.
    let out = Command::new("bash")
        .arg(repo().join("tuning/check.sh"))
        .env("RINGGATE_TUNING_NOFILE_SOFT", &nofile)
        .env("RINGGATE_TUNING_NOFILE_HARD", &nofile)
        .output()
        .unwrap();
    let table = text(&out.stdout);
    for row in ["ulimit -n", "ulimit -Hn"] {
        let line = table
            .lines()
            .find(|l| l.starts_with(row))
            .unwrap_or_else(|| panic!("no {row} row: {table}"));
        assert!(line.trim_end().ends_with("OK"), "{line}");
    }
    assert!(unit.contains("ExecStartPre=-/usr/local/share/ringgate/tuning/check.sh"));
    let _ = std::fs::remove_dir_all(dir);
}

/// The uring socket driver's needs are tried at start. With too little locked memory for its
/// ring and buffer ring (as a user without CAP_IPC_LOCK: root is switched to `nobody`), an
/// unset `io_driver` falls back to glommio with one warning naming why (ENOMEM), and a set
/// `io_driver = "uring"` refuses to start with the reason (exit 3).
#[test]
fn a_host_without_what_the_uring_driver_needs_falls_back_to_glommio_unless_uring_is_set() {
    let start = |driver: Option<&str>| {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let mut cmd = match root {
            true => {
                let mut c = Command::new(need("setpriv", "util-linux"));
                c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                    .arg(need("prlimit", "util-linux"));
                c
            }
            false => Command::new(need("prlimit", "util-linux")),
        };
        cmd.arg("--memlock=524288:524288")
            .arg(env!("CARGO_BIN_EXE_ringgate"))
            .args(["serve", "--listen", "127.0.0.1:0", "--admin-listen"])
            .args(["127.0.0.1:0", "--shards", "1"])
            // 32,768 ring entries pin 512 KiB: more than the limit leaves.
            .args(["--uring-recv-buffers", "32768"])
            .args(driver.map(|d| ["--io-driver", d]).into_iter().flatten())
            .env_remove("RUST_LOG")
            .env_remove("RINGGATE_IO_DRIVER")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };

    let mut child = start(Some("uring"));
    let killer_pid = child.id() as i32;
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(20));
        // SAFETY: a signal to our own child (already reaped: ESRCH, harmless).
        unsafe { libc::kill(killer_pid, libc::SIGKILL) };
    });
    let status = child.wait().unwrap();
    drop(killer);
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(3), "{err}");
    assert!(
        err.contains("io_driver = \"uring\" cannot run here") && err.contains("(os error 12)"),
        "{err}"
    );

    let mut child = start(None);
    let (ready, status) = ready_line_then_sigterm(&mut child);
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(ready.contains("listening"), "not started: {ready:?} {err}");
    assert!(
        ready.contains(" io glommio "),
        "the ready line names the driver: {ready:?}"
    );
    assert_eq!(status.code(), Some(0), "{err}");
    let fallback: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("io_driver: glommio, since the uring driver cannot run here"))
        .collect();
    assert_eq!(fallback.len(), 1, "{err}");
    // What failed first (the ring or its buffer ring) depends on what the limit leaves.
    assert!(fallback[0].contains("(os error 12)"), "{err}");
}

/// The child's first stdout line (its ready line, or "" after 20 s), then SIGTERM and its exit.
fn ready_line_then_sigterm(child: &mut std::process::Child) -> (String, std::process::ExitStatus) {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        let mut line = String::new();
        let _ = std::io::BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let ready = rx.recv_timeout(Duration::from_secs(20)).unwrap_or_default();
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    (ready, child.wait().unwrap())
}

/// A closed stdout (`ringgate serve | true`, a supervisor that went away) does not stop the
/// gateway: it says so once on stderr, serves a client, and SIGTERM still ends it with 0.
/// (The ready line was a `println!`: it panicked, "failed printing to stdout", exit 101.)
/// `ringgate token | ...` and `ringgate config --print | head` with the reader gone: the
/// command ends quietly (before, `print!` panicked on the broken pipe: exit 101).
#[test]
fn the_printing_commands_end_quietly_when_stdout_is_closed() {
    use std::os::fd::{FromRawFd, OwnedFd};
    for args in [
        &[
            "token",
            "--user",
            "alice",
            "--jwt-secret",
            "0123456789abcdef0123",
        ][..],
        &["config", "--print"][..],
    ] {
        let mut fds = [0; 2];
        // SAFETY: `pipe` fills both fds, each owned once below.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let (read_end, write_end) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        drop(read_end);
        let out = Command::new(env!("CARGO_BIN_EXE_ringgate"))
            .args(args)
            .stdout(Stdio::from(write_end))
            .stderr(Stdio::piped())
            .output()
            .expect("run ringgate");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

#[test]
fn a_closed_stdout_does_not_stop_the_gateway() {
    use std::os::fd::{FromRawFd, OwnedFd};
    let (public, admin) = (free_port(), free_port());
    let mut fds = [0; 2];
    // SAFETY: `pipe` fills both fds, each owned once below.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(read_end); // nobody reads: every write to stdout fails with EPIPE
    let mut child = Command::new(env!("CARGO_BIN_EXE_ringgate"))
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{public}"),
            "--admin-listen",
            &format!("127.0.0.1:{admin}"),
            "--shards",
            "1",
        ])
        .stdout(Stdio::from(write_end))
        .stderr(Stdio::piped())
        .env_remove("RUST_LOG")
        .spawn()
        .expect("spawn ringgate");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let mut seen = Vec::new();
    // The ready line is written once the listeners are up: its failure is said after that.
    while !seen
        .last()
        .is_some_and(|l: &String| l.contains("could not be written to stdout"))
    {
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(line) => seen.push(line),
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "no word of the closed stdout; exit {:?}; stderr: {seen:#?}",
                    child.wait().unwrap().code()
                );
            }
        }
    }
    let mut gw = Gateway {
        child,
        public: SocketAddr::from(([127, 0, 0, 1], public)),
        admin: SocketAddr::from(([127, 0, 0, 1], admin)),
        stderr: rx,
    };
    assert_eq!(gw.admin_get("/healthz").0, 200);
    let (_ws, welcome) = connect_app(&gw, "reader-gone");
    assert_eq!(welcome["user"], "reader-gone", "{welcome}");
    gw.sigterm();
    assert_eq!(gw.wait_exit(Duration::from_secs(15)), Some(0));
}
