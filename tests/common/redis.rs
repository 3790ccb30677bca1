//! A real `redis-server` per test, on a free loopback port, with append-only persistence
//! (`appendfsync always`, what the README tells operators), so a test can kill it with
//! SIGKILL and start it again on the same data. [`RedisServer::start_cluster`] starts a
//! Redis Cluster of three primaries instead (made with `redis-cli --cluster create`), which
//! the same calls drive: `kill` and `restart` act on all three, `cli` follows redirections.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    children: Vec<Child>,
    /// One port per server (three in a cluster).
    ports: Vec<u16>,
    dir: PathBuf,
    cluster: bool,
}

fn require(cmd: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "`{cmd}` not found: these tests need a real Redis. Install it with \
         `sudo apt-get install redis-server` (tests/run.sh installs it by itself)."
    );
}

/// A free loopback port that stays ours across restarts (`super::restartable_port`); in a
/// cluster its bus port (+10,000, below the ephemeral range too) must be free as well.
fn free_port(with_bus: bool) -> u16 {
    if with_bus {
        super::restartable_port_with(22_000, &[10_000])
    } else {
        super::restartable_port(32_000)
    }
}

impl RedisServer {
    pub fn start() -> RedisServer {
        Self::start_with(1, false)
    }

    /// Three primaries, no replicas, every slot assigned; returns once the cluster is ok.
    pub fn start_cluster() -> RedisServer {
        Self::start_with(3, true)
    }

    fn start_with(count: usize, cluster: bool) -> RedisServer {
        require("redis-server");
        require("redis-cli");
        let ports: Vec<u16> = (0..count).map(|_| free_port(cluster)).collect();
        let dir = std::env::temp_dir().join(format!(
            "ringgate-redis-{}-{}",
            std::process::id(),
            ports[0]
        ));
        let _ = std::fs::remove_dir_all(&dir);
        for port in &ports {
            std::fs::create_dir_all(dir.join(port.to_string())).unwrap();
        }
        let mut server = RedisServer {
            children: Vec::new(),
            ports,
            dir,
            cluster,
        };
        server.restart();
        if cluster {
            let nodes: Vec<String> = server
                .ports
                .iter()
                .map(|p| format!("127.0.0.1:{p}"))
                .collect();
            let out = Command::new("redis-cli")
                .arg("--cluster")
                .arg("create")
                .args(&nodes)
                .args(["--cluster-replicas", "0", "--cluster-yes"])
                .output()
                .expect("run redis-cli --cluster create");
            assert!(
                out.status.success(),
                "redis-cli --cluster create failed: {}",
                String::from_utf8_lossy(&out.stdout)
            );
            server.wait_cluster_ok();
        }
        server
    }

    pub fn url(&self) -> String {
        if !self.cluster {
            return format!("redis://127.0.0.1:{}", self.ports[0]);
        }
        let others: Vec<String> = self.ports[1..]
            .iter()
            .map(|p| format!("node=127.0.0.1:{p}"))
            .collect();
        format!(
            "redis-cluster://127.0.0.1:{}?{}",
            self.ports[0],
            others.join("&")
        )
    }

    /// Send `signal` to every server (SIGSTOP: a Redis that is connected and never answers,
    /// the slow failure a circuit breaker is for; SIGCONT ends it).
    pub fn signal(&self, signal: i32) {
        for child in &self.children {
            // SAFETY: a signal to a child process this value owns.
            unsafe { libc::kill(child.id() as i32, signal) };
        }
    }

    /// SIGKILL: no shutdown save, only what the append-only file already holds survives.
    pub fn kill(&mut self) {
        for mut child in self.children.drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start (again) on the same ports and data; returns once every server answers PING (and,
    /// in a cluster that was made, once the cluster is ok again).
    pub fn restart(&mut self) {
        self.kill();
        let made = self.cluster
            && self
                .dir
                .join(self.ports[0].to_string())
                .join("nodes.conf")
                .exists();
        for port in self.ports.clone() {
            let dir = self.dir.join(port.to_string());
            let mut args: Vec<String> = [
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
                dir.to_str().unwrap(),
                "--logfile",
                dir.join("redis.log").to_str().unwrap(),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            if self.cluster {
                args.extend(
                    ["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"]
                        .iter()
                        .map(|s| s.to_string()),
                );
            }
            let child = Command::new("redis-server")
                .args(&args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn redis-server");
            self.children.push(child);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        for (i, port) in self.ports.clone().into_iter().enumerate() {
            while self.cli_at(port, &["PING"]) != "PONG" {
                let exited = self.children[i].try_wait().ok().flatten();
                assert!(
                    exited.is_none() && Instant::now() < deadline,
                    "redis-server on port {port} did not answer PING ({}); its log ends:\n{}",
                    exited.map_or("still running".to_string(), |s| s.to_string()),
                    self.log_tail(port)
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if made {
            self.wait_cluster_ok();
        }
    }

    /// The last lines of one server's log, for a failure message.
    fn log_tail(&self, port: u16) -> String {
        let log = std::fs::read_to_string(self.dir.join(port.to_string()).join("redis.log"))
            .unwrap_or_else(|e| format!("(no log: {e})"));
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    fn wait_cluster_ok(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.ports.iter().all(|&p| {
            self.cli_at(p, &["CLUSTER", "INFO"])
                .contains("cluster_state:ok")
        }) {
            assert!(
                Instant::now() < deadline,
                "the Redis Cluster did not become ok"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn cli_at(&self, port: u16, args: &[&str]) -> String {
        let mut cmd = Command::new("redis-cli");
        if self.cluster {
            cmd.arg("-c");
        }
        let out = cmd
            .args(["-p", &port.to_string()])
            .args(args)
            .output()
            .expect("run redis-cli");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// One command through redis-cli; its trimmed output ("" when Redis does not answer).
    /// In a cluster it follows redirections to the server holding the key.
    pub fn cli(&self, args: &[&str]) -> String {
        self.cli_at(self.ports[0], args)
    }

    pub fn int(&self, args: &[&str]) -> i64 {
        let out = self.cli(args);
        out.parse()
            .unwrap_or_else(|_| panic!("redis-cli {args:?} answered {out:?}"))
    }

    /// Cluster only: move `slots` hash slots, with their keys, from the first primary to the
    /// second (`redis-cli --cluster reshard`: slot by slot, MIGRATING/IMPORTING then MIGRATE).
    /// Returns once done.
    pub fn move_slots(&self, slots: u32) {
        assert!(self.cluster, "move_slots needs a cluster");
        let id = |port: u16| self.cli_at(port, &["CLUSTER", "MYID"]);
        let (from, to) = (id(self.ports[0]), id(self.ports[1]));
        let out = Command::new("redis-cli")
            .args([
                "--cluster",
                "reshard",
                &format!("127.0.0.1:{}", self.ports[0]),
            ])
            .args(["--cluster-from", &from, "--cluster-to", &to])
            .args(["--cluster-slots", &slots.to_string(), "--cluster-yes"])
            .output()
            .expect("run redis-cli --cluster reshard");
        assert!(
            out.status.success(),
            "reshard failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        self.wait_cluster_ok();
    }

    /// Cluster only: start moving hash `slot` from its owner to another primary, as
    /// `redis-cli --cluster reshard` does before it moves any key (IMPORTING on the target,
    /// then MIGRATING on the owner), and stop there: the owner answers `ASK` for the slot's
    /// keys it does not hold. Returns the (owner, target) ports for `cancel_migration`.
    pub fn begin_migration(&self, slot: u16) -> (u16, u16) {
        assert!(self.cluster, "begin_migration needs a cluster");
        let owner = *self
            .ports
            .iter()
            .find(|&&p| self.owns(p, slot))
            .unwrap_or_else(|| panic!("no primary owns slot {slot}"));
        let target = *self.ports.iter().find(|&&p| p != owner).unwrap();
        let id = |port: u16| self.cli_at(port, &["CLUSTER", "MYID"]);
        let slot = slot.to_string();
        let set = |port: u16, state: &str, node: &str| {
            let out = self.cli_at(port, &["CLUSTER", "SETSLOT", &slot, state, node]);
            assert_eq!(out, "OK", "CLUSTER SETSLOT {slot} {state} on {port}");
        };
        set(target, "IMPORTING", &id(owner));
        set(owner, "MIGRATING", &id(target));
        (owner, target)
    }

    /// Cluster only: move hash `slot` with its keys to another primary, as one slot of
    /// `redis-cli --cluster reshard` does (IMPORTING, MIGRATING, MIGRATE, then the new owner
    /// told to every primary). Afterwards the old owner answers `MOVED` for the slot.
    pub fn move_slot(&self, slot: u16) {
        let (owner, target) = self.begin_migration(slot);
        let slot_text = slot.to_string();
        loop {
            let keys = self.cli_at(owner, &["CLUSTER", "GETKEYSINSLOT", &slot_text, "100"]);
            let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
            if keys.is_empty() {
                break;
            }
            let port = target.to_string();
            let mut args = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS"];
            args.extend(keys);
            let out = self.cli_at(owner, &args);
            assert_eq!(out, "OK", "MIGRATE of slot {slot}");
        }
        let id = self.cli_at(target, &["CLUSTER", "MYID"]);
        for port in self.ports.iter().copied() {
            let out = self.cli_at(port, &["CLUSTER", "SETSLOT", &slot_text, "NODE", &id]);
            assert_eq!(out, "OK", "CLUSTER SETSLOT {slot} NODE on {port}");
        }
        assert!(self.owns(target, slot), "slot {slot} moved");
    }

    /// Undo `begin_migration`: the slot stays with its owner.
    pub fn cancel_migration(&self, slot: u16, (owner, target): (u16, u16)) {
        for port in [owner, target] {
            let out = self.cli_at(port, &["CLUSTER", "SETSLOT", &slot.to_string(), "STABLE"]);
            assert_eq!(out, "OK", "CLUSTER SETSLOT {slot} STABLE on {port}");
        }
    }

    /// Whether the primary on `port` serves `slot` (by its own `CLUSTER NODES` line).
    fn owns(&self, port: u16, slot: u16) -> bool {
        let nodes = self.cli_at(port, &["CLUSTER", "NODES"]);
        let Some(me) = nodes.lines().find(|l| l.contains("myself")) else {
            return false;
        };
        me.split_whitespace().skip(8).any(|range| {
            let mut ends = range.splitn(2, '-').map(|n| n.parse::<u16>().ok());
            match (ends.next().flatten(), ends.next()) {
                (Some(lo), None) => lo == slot,
                (Some(lo), Some(Some(hi))) => (lo..=hi).contains(&slot),
                _ => false,
            }
        })
    }

    /// Keys held by each server (one entry off a cluster).
    pub fn keys_per_server(&self) -> Vec<i64> {
        self.ports
            .iter()
            .map(|&p| self.cli_at(p, &["DBSIZE"]).parse().unwrap_or(-1))
            .collect()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
