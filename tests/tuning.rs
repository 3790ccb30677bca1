//! Tests for the host-tuning scripts in `tuning/` (check.sh, apply.sh,
//! settings.sh). They need no crate APIs: each test runs the scripts with
//! `bash` against a fake sysctl tree in a unique temp directory, using the
//! documented test hooks (RINGGATE_TUNING_SYSCTL_ROOT, _NOFILE_SOFT,
//! _NOFILE_HARD, _ETC_DIR).
//!
//! The repo root is `$RINGGATE_REPO` if set (to run this file from a scratch
//! crate), else `CARGO_MANIFEST_DIR`.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Every row check.sh prints, in order.
const ROWS: &[&str] = &[
    "fs.nr_open",
    "fs.file-max",
    "ulimit -n",
    "ulimit -Hn",
    "net.core.somaxconn",
    "net.ipv4.tcp_max_syn_backlog",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.tcp_mem",
    "net.ipv4.tcp_rmem",
    "net.ipv4.tcp_wmem",
    "net.core.netdev_max_backlog",
    "net.netfilter.nf_conntrack_max",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_tw_reuse",
];

const HOOKS: &[&str] = &[
    "RINGGATE_TUNING_SYSCTL_ROOT",
    "RINGGATE_TUNING_NOFILE_SOFT",
    "RINGGATE_TUNING_NOFILE_HARD",
    "RINGGATE_TUNING_ETC_DIR",
];

/// Values that meet every recommendation, laid out like /proc/sys
/// (multi-valued files are tab separated, as the kernel prints them).
/// Some sit exactly on the threshold, some well beyond it.
const GOOD: &[(&str, &str)] = &[
    ("fs/nr_open", "1100000"),
    ("fs/file-max", "9223372036854775807"),
    ("net/core/somaxconn", "65535"),
    ("net/ipv4/tcp_max_syn_backlog", "131072"),
    ("net/ipv4/ip_local_port_range", "1024\t65535"),
    ("net/ipv4/tcp_mem", "786432\t1048576\t1572864"),
    ("net/ipv4/tcp_rmem", "4096\t4096\t16777216"),
    ("net/ipv4/tcp_wmem", "4096\t4096\t4194304"),
    ("net/core/netdev_max_backlog", "16384"),
    ("net/netfilter/nf_conntrack_max", "2097152"),
    ("net/ipv4/tcp_fin_timeout", "15"),
    ("net/ipv4/tcp_tw_reuse", "1"),
];

const HIGH_NOFILE: &str = "1100000";

fn repo() -> PathBuf {
    std::env::var_os("RINGGATE_REPO")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// A unique scratch directory under the system temp dir, removed on drop.
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new(tag: &str) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!(
            "ringgate-tuning-{tag}-{}-{nanos}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&dir).expect("create scratch dir");
        Scratch { dir }
    }

    /// A fake sysctl root holding all-good values.
    fn good_root(tag: &str) -> Self {
        let s = Scratch::new(tag);
        for (rel, val) in GOOD {
            s.write(rel, val);
        }
        s
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    fn write(&self, rel: &str, val: &str) {
        let p = self.path(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, format!("{val}\n")).unwrap();
    }

    fn read(&self, rel: &str) -> String {
        fs::read_to_string(self.path(rel)).unwrap()
    }

    /// Relative path -> content of every file below the directory.
    fn snapshot(&self) -> BTreeMap<PathBuf, String> {
        fn walk(dir: &Path, base: &Path, out: &mut BTreeMap<PathBuf, String>) {
            for e in fs::read_dir(dir).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    walk(&p, base, out);
                } else {
                    let rel = p.strip_prefix(base).unwrap().to_path_buf();
                    out.insert(rel, fs::read_to_string(&p).unwrap());
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(&self.dir, &self.dir, &mut out);
        out
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Runs `bash <script> <args>` from the repo root with the hooks cleared,
/// then `env` applied.
fn run_script(script: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new("bash");
    cmd.arg(script).args(args).current_dir(repo());
    for h in HOOKS {
        cmd.env_remove(h);
    }
    cmd.envs(env.iter().copied());
    cmd.output().expect("run bash")
}

fn run(script: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    run_script(&repo().join("tuning").join(script), args, env)
}

/// Hook environment for a fake root and high open-file limits.
fn fake_env(root: &Scratch) -> Vec<(&'static str, String)> {
    vec![
        (
            "RINGGATE_TUNING_SYSCTL_ROOT",
            root.dir.to_str().unwrap().to_string(),
        ),
        ("RINGGATE_TUNING_NOFILE_SOFT", HIGH_NOFILE.to_string()),
        ("RINGGATE_TUNING_NOFILE_HARD", HIGH_NOFILE.to_string()),
    ]
}

fn run_fake(script: &str, args: &[&str], root: &Scratch, extra: &[(&str, &str)]) -> Output {
    let env = fake_env(root);
    let mut all: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    all.extend_from_slice(extra);
    run(script, args, &all)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| stdout(&o).trim() == "0")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn describe(o: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}--- stderr\n{}",
        o.status.code(),
        stdout(o),
        stderr(o)
    )
}

/// (row name, whole line, status = last column) for every table row.
fn rows(out: &str) -> Vec<(&'static str, String, String)> {
    out.lines()
        .filter_map(|line| {
            let name = ROWS.iter().find(|n| {
                line.strip_prefix(**n)
                    .is_some_and(|rest| rest.starts_with([' ', '\t']))
            })?;
            let status = line.split_whitespace().last()?.to_string();
            Some((*name, line.to_string(), status))
        })
        .collect()
}

/// Asserts one row per setting and returns name -> (line, status).
fn table(o: &Output) -> BTreeMap<&'static str, (String, String)> {
    let out = stdout(o);
    let rs = rows(&out);
    assert_eq!(
        rs.len(),
        ROWS.len(),
        "expected one row per setting\n{}",
        describe(o)
    );
    let map: BTreeMap<_, _> = rs.into_iter().map(|(n, l, s)| (n, (l, s))).collect();
    assert_eq!(map.len(), ROWS.len(), "duplicate rows\n{}", describe(o));
    for (name, (_, status)) in &map {
        assert!(
            status == "OK" || status == "SHORT",
            "row {name} has status {status:?}\n{}",
            describe(o)
        );
    }
    map
}

#[test]
fn check_all_good_exits_0_and_every_row_ok() {
    let root = Scratch::good_root("good");
    let o = run_fake("check.sh", &[], &root, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", describe(&o));
    for (name, (line, status)) in table(&o) {
        assert_eq!(status, "OK", "row {name}: {line}");
    }
}

#[test]
fn check_short_somaxconn_exits_1_and_only_that_row_is_short() {
    let root = Scratch::good_root("somaxconn");
    root.write("net/core/somaxconn", "128");
    let o = run_fake("check.sh", &[], &root, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", describe(&o));
    for (name, (line, status)) in table(&o) {
        let want = if name == "net.core.somaxconn" {
            "SHORT"
        } else {
            "OK"
        };
        assert_eq!(status, want, "row {name}: {line}");
    }
    let t = table(&o);
    assert!(
        t["net.core.somaxconn"].0.contains("128"),
        "{}",
        describe(&o)
    );
}

#[test]
fn check_conntrack_absent_is_na_and_does_not_fail() {
    let root = Scratch::good_root("noconntrack");
    fs::remove_dir_all(root.path("net/netfilter")).unwrap();
    let o = run_fake("check.sh", &[], &root, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", describe(&o));
    let t = table(&o);
    let (line, status) = &t["net.netfilter.nf_conntrack_max"];
    assert_eq!(status, "OK", "{line}");
    assert!(line.contains("n/a (conntrack not loaded)"), "{line}");
}

#[test]
fn check_missing_required_sysctl_is_short() {
    let root = Scratch::good_root("missing");
    fs::remove_file(root.path("net/ipv4/tcp_mem")).unwrap();
    let o = run_fake("check.sh", &[], &root, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", describe(&o));
    assert_eq!(table(&o)["net.ipv4.tcp_mem"].1, "SHORT");
}

#[test]
fn check_judges_the_documented_field_of_multi_valued_sysctls() {
    // tcp_mem: only the max (3rd) field counts; rmem/wmem: only the default
    // (2nd) field, which must be small; port range: its width.
    let root = Scratch::good_root("fields");
    root.write("net/ipv4/tcp_mem", "1\t2\t1572864");
    root.write("net/ipv4/tcp_rmem", "4096\t131072\t16777216");
    root.write("net/ipv4/tcp_wmem", "4096\t2048\t1024");
    root.write("net/ipv4/ip_local_port_range", "32768\t60999");
    let o = run_fake("check.sh", &[], &root, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", describe(&o));
    let t = table(&o);
    assert_eq!(t["net.ipv4.tcp_mem"].1, "OK");
    assert_eq!(t["net.ipv4.tcp_rmem"].1, "SHORT");
    assert_eq!(t["net.ipv4.tcp_wmem"].1, "OK");
    assert_eq!(t["net.ipv4.ip_local_port_range"].1, "SHORT");
    assert!(t["net.ipv4.ip_local_port_range"].0.contains("28232 ports"));
}

#[test]
fn check_nofile_overrides_are_judged() {
    let root = Scratch::good_root("nofile");
    let o = run_fake(
        "check.sh",
        &[],
        &root,
        &[
            ("RINGGATE_TUNING_NOFILE_SOFT", "20000"),
            ("RINGGATE_TUNING_NOFILE_HARD", "unlimited"),
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{}", describe(&o));
    let t = table(&o);
    assert_eq!(t["ulimit -n"].1, "SHORT");
    assert_eq!(t["ulimit -Hn"].1, "OK");
}

#[test]
fn check_quiet_prints_only_short_rows() {
    let root = Scratch::good_root("quiet");
    // The kernel default (2: loopback only) is fine for a gateway; 0 is not.
    root.write("net/ipv4/tcp_tw_reuse", "2");
    let o = run_fake("check.sh", &["--quiet"], &root, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", describe(&o));
    root.write("net/ipv4/tcp_tw_reuse", "0");
    let o = run_fake("check.sh", &["--quiet"], &root, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", describe(&o));
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{}", describe(&o));
    assert!(lines[0].starts_with("net.ipv4.tcp_tw_reuse"), "{out}");
    assert!(lines[0].ends_with("SHORT"), "{out}");

    let good = Scratch::good_root("quiet-good");
    let o = run_fake("check.sh", &["--quiet"], &good, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", describe(&o));
    assert_eq!(stdout(&o).trim(), "", "{}", describe(&o));
}

#[test]
fn check_against_real_proc_sys_exit_code_matches_rows() {
    let o = run("check.sh", &[], &[]);
    let t = table(&o);
    let any_short = t.values().any(|(_, s)| s == "SHORT");
    let want = if any_short { 1 } else { 0 };
    assert_eq!(o.status.code(), Some(want), "{}", describe(&o));
}

#[test]
fn check_usage_errors_exit_2() {
    let o = run("check.sh", &["--bogus"], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", describe(&o));
    assert!(stderr(&o).contains("Usage:"), "{}", describe(&o));

    let o = run("check.sh", &[], &[("RINGGATE_TUNING_NOFILE_SOFT", "lots")]);
    assert_eq!(o.status.code(), Some(2), "{}", describe(&o));

    let o = run("check.sh", &["--help"], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", describe(&o));
    assert!(stdout(&o).contains("RINGGATE_TUNING_SYSCTL_ROOT"));
}

#[test]
fn apply_dry_run_prints_only_needed_commands_and_changes_nothing() {
    let root = Scratch::good_root("dry");
    root.write("net/core/somaxconn", "128");
    let before = root.snapshot();
    let o = run_fake("apply.sh", &["--dry-run"], &root, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", describe(&o));
    let out = stdout(&o);
    let commands: Vec<&str> = out
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .collect();
    assert_eq!(
        commands,
        vec!["sysctl -w net.core.somaxconn=65535"],
        "{}",
        describe(&o)
    );
    assert!(out.contains("already ok: fs.nr_open"), "{out}");
    assert!(out.contains("already ok: ulimit -Hn"), "{out}");
    assert_eq!(root.snapshot(), before, "dry run modified the fake root");
}

#[test]
fn apply_dry_run_never_lowers_better_values() {
    let root = Scratch::good_root("merge");
    root.write("net/ipv4/tcp_mem", "900000\t1000000\t1200000");
    root.write("net/ipv4/tcp_rmem", "4096\t131072\t33554432");
    root.write("net/ipv4/ip_local_port_range", "2000\t65535");
    root.write("net/ipv4/tcp_fin_timeout", "60");
    let o = run_fake("apply.sh", &["--dry-run"], &root, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", describe(&o));
    let out = stdout(&o);
    for want in [
        "sysctl -w \"net.ipv4.tcp_mem=900000 1048576 1572864\"",
        "sysctl -w \"net.ipv4.tcp_rmem=4096 4096 33554432\"",
        "sysctl -w \"net.ipv4.ip_local_port_range=1024 65535\"",
        "sysctl -w net.ipv4.tcp_fin_timeout=15",
    ] {
        assert!(out.lines().any(|l| l == want), "missing {want:?}\n{out}");
    }
    // file-max is far above the recommendation (and above i64 parsing of
    // naive scripts): left alone.
    assert!(out.contains("already ok: fs.file-max"), "{out}");
    assert!(!out.contains("fs.file-max="), "{out}");
}

#[test]
fn apply_dry_run_persist_prints_config_files_and_writes_nothing() {
    let root = Scratch::good_root("persist");
    root.write("net/core/somaxconn", "128");
    let etc = Scratch::new("persist-etc");
    let etc_dir = etc.dir.join("etc");
    let before = root.snapshot();
    let o = run_fake(
        "apply.sh",
        &["--dry-run", "--persist"],
        &root,
        &[("RINGGATE_TUNING_ETC_DIR", etc_dir.to_str().unwrap())],
    );
    assert_eq!(o.status.code(), Some(0), "{}", describe(&o));
    let out = stdout(&o);
    let sysctl_file = format!("{}/sysctl.d/90-ringgate.conf", etc_dir.display());
    let limits_file = format!("{}/security/limits.d/90-ringgate.conf", etc_dir.display());
    assert!(out.contains(&sysctl_file), "{out}");
    assert!(out.contains(&limits_file), "{out}");
    for want in [
        "fs.nr_open = 1100000",
        "fs.file-max = 9223372036854775807",
        "net.core.somaxconn = 65535",
        "net.ipv4.tcp_mem = 786432 1048576 1572864",
        "net.ipv4.tcp_rmem = 4096 4096 16777216",
        "-net.netfilter.nf_conntrack_max = 2097152",
        "*    hard nofile 1100000",
        "root soft nofile 1100000",
        "LimitNOFILE=1100000",
    ] {
        assert!(out.contains(want), "missing {want:?}\n{out}");
    }
    assert!(!etc_dir.exists(), "dry run created {}", etc_dir.display());
    assert_eq!(root.snapshot(), before, "dry run modified the fake root");
}

#[test]
fn apply_writes_fake_root_and_second_run_is_all_already_ok() {
    let root = Scratch::good_root("real");
    root.write("net/core/somaxconn", "128");
    root.write("net/ipv4/tcp_wmem", "4096\t16384\t4194304");
    let etc = Scratch::new("real-etc");
    let etc_dir = etc.dir.to_str().unwrap().to_string();
    let extra = [("RINGGATE_TUNING_ETC_DIR", etc_dir.as_str())];
    let o = run_fake("apply.sh", &["--persist"], &root, &extra);
    if !is_root() {
        // Not root: the real mode must refuse clearly and change nothing.
        assert_eq!(o.status.code(), Some(1), "{}", describe(&o));
        assert!(
            stderr(&o).contains("must be run as root"),
            "{}",
            describe(&o)
        );
        assert_eq!(root.read("net/core/somaxconn").trim(), "128");
        return;
    }
    assert_eq!(o.status.code(), Some(0), "{}", describe(&o));
    assert_eq!(root.read("net/core/somaxconn").trim(), "65535");
    assert_eq!(root.read("net/ipv4/tcp_wmem").trim(), "4096 4096 16777216");
    assert_eq!(root.read("fs/nr_open").trim(), "1100000");
    let conf = fs::read_to_string(etc.path("sysctl.d/90-ringgate.conf")).unwrap();
    assert!(conf.contains("net.core.somaxconn = 65535\n"), "{conf}");
    let limits = fs::read_to_string(etc.path("security/limits.d/90-ringgate.conf")).unwrap();
    assert!(limits.contains("hard nofile 1100000"), "{limits}");

    let check = run_fake("check.sh", &[], &root, &[]);
    assert_eq!(check.status.code(), Some(0), "{}", describe(&check));

    let before = root.snapshot();
    let again = run_fake("apply.sh", &[], &root, &[]);
    assert_eq!(again.status.code(), Some(0), "{}", describe(&again));
    let out = stdout(&again);
    assert!(
        !out.lines().any(|l| l.starts_with('+')),
        "second run changed something\n{out}"
    );
    assert_eq!(out.matches("already ok:").count(), ROWS.len(), "{out}");
    assert_eq!(root.snapshot(), before);
}

#[test]
fn apply_as_non_root_fails_clearly() {
    // Copy the scripts somewhere any user can read, then drop privileges
    // with setpriv when we are root (or run directly when we are not).
    let tmp = Scratch::new("nonroot");
    for f in ["check.sh", "apply.sh", "settings.sh"] {
        fs::copy(repo().join("tuning").join(f), tmp.path(f)).unwrap();
    }
    let o = if is_root() {
        let has_setpriv = Command::new("setpriv")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !has_setpriv {
            eprintln!("skipped: running as root and setpriv is not installed");
            return;
        }
        Command::new("chmod")
            .args(["-R", "a+rX"])
            .arg(&tmp.dir)
            .status()
            .unwrap();
        let mut cmd = Command::new("setpriv");
        cmd.args([
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            "bash",
        ])
        .arg(tmp.path("apply.sh"))
        .current_dir(&tmp.dir);
        for h in HOOKS {
            cmd.env_remove(h);
        }
        cmd.output().unwrap()
    } else {
        run_script(&tmp.path("apply.sh"), &[], &[])
    };
    assert_eq!(o.status.code(), Some(1), "{}", describe(&o));
    assert!(
        stderr(&o).contains("must be run as root"),
        "{}",
        describe(&o)
    );
}

#[test]
fn apply_unknown_flag_exits_2_with_usage() {
    let o = run("apply.sh", &["--force"], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", describe(&o));
    let err = stderr(&o);
    assert!(err.contains("unknown argument: --force"), "{err}");
    assert!(err.contains("Usage: tuning/apply.sh"), "{err}");
    assert!(stdout(&o).is_empty(), "{}", describe(&o));
}
