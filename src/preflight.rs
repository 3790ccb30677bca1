//! Host checks run before any shard starts: kernel version, io_uring availability and the
//! locked-memory limit. Each failure says what was found, what is needed and how to fix it,
//! so an operator never meets glommio's error (or a silent panic) first. Also turns a
//! glommio start error into the same kind of message. Owns nothing.

use std::fmt;

/// glommio needs 5.8 (the io_uring operations it submits).
pub const MIN_KERNEL: (u32, u32) = (5, 8);
/// glommio refuses to start an executor below this RLIMIT_MEMLOCK (`sys/uring.rs`).
pub const MIN_MEMLOCK: u64 = 512 * 1024;

/// A check that failed: what is wrong, then how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostProblem {
    pub what: String,
    pub fix: String,
}

impl fmt::Display for HostProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // One line: a log line per event, in text and in JSON.
        write!(f, "{}. Fix: {}", self.what, self.fix)
    }
}

/// The fix for a memlock limit that is too low, for the usual ways of starting a service.
fn memlock_fix(need: u64) -> String {
    format!(
        "raise the locked-memory limit to at least {} KiB (unlimited is fine): `ulimit -l unlimited` in the shell that starts ringgate, LimitMEMLOCK=infinity in its systemd unit (dist/ringgate.service), `--ulimit memlock=-1` for docker, or `* - memlock unlimited` in /etc/security/limits.conf",
        need / 1024
    )
}

/// `release` as (major, minor), e.g. "6.1.0-18-amd64" -> (6, 1).
pub fn parse_kernel(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// The kernel release is new enough for glommio.
pub fn check_kernel(release: &str) -> Result<(), HostProblem> {
    match parse_kernel(release) {
        Some(v) if v >= MIN_KERNEL => Ok(()),
        Some(_) => Err(HostProblem {
            what: format!(
                "kernel {release} is too old: ringgate (glommio, io_uring) needs Linux {}.{} or newer",
                MIN_KERNEL.0, MIN_KERNEL.1
            ),
            fix: "run on a newer kernel".into(),
        }),
        // An unknown format: let io_uring itself be the judge.
        None => Ok(()),
    }
}

/// The soft RLIMIT_MEMLOCK (`None` = unlimited) is at least glommio's minimum.
pub fn check_memlock(soft: Option<u64>) -> Result<(), HostProblem> {
    match soft {
        Some(limit) if limit < MIN_MEMLOCK => Err(HostProblem {
            what: format!(
                "the locked-memory limit (RLIMIT_MEMLOCK, `ulimit -l`) is {} KiB; io_uring (glommio) needs at least {} KiB to start a shard",
                limit / 1024,
                MIN_MEMLOCK / 1024
            ),
            fix: memlock_fix(MIN_MEMLOCK),
        }),
        _ => Ok(()),
    }
}

/// Locked memory a shard's io_uring buffers want registered: glommio registers the shard's
/// I/O memory (`io_memory`) with each of its three rings, and the kernel accounts each
/// registration against RLIMIT_MEMLOCK (unless the process has CAP_IPC_LOCK, as root does).
pub fn memlock_wanted(shards: usize, io_memory: usize) -> u64 {
    MIN_MEMLOCK.max(3 * io_memory as u64 * shards as u64)
}

/// A warning when the limit lets shards start but not register their buffers (glommio then
/// logs nothing and falls back to copying through unregistered ones): `None` when it is
/// enough, unlimited, or does not apply (root).
pub fn memlock_advice(soft: Option<u64>, wanted: u64, root: bool) -> Option<String> {
    let limit = soft?;
    if root || limit >= wanted {
        return None;
    }
    Some(format!(
        "the locked-memory limit is {} KiB: shards start, but their io_uring buffers ({} KiB for all shards) cannot be registered and I/O goes through unregistered buffers. Fix: {}",
        limit / 1024,
        wanted / 1024,
        memlock_fix(wanted)
    ))
}

/// What `io_uring_setup` failing with `errno` means here.
pub fn io_uring_problem(errno: i32) -> HostProblem {
    let err = std::io::Error::from_raw_os_error(errno);
    match errno {
        libc::ENOSYS => HostProblem {
            what: format!("io_uring is not available: io_uring_setup failed: {err}"),
            fix: "use a kernel built with CONFIG_IO_URING; in a container, a seccomp profile that allows io_uring_setup, io_uring_enter and io_uring_register (docker: --security-opt seccomp=unconfined or a profile that lists them)".into(),
        },
        libc::EPERM | libc::EACCES => HostProblem {
            what: format!("io_uring is not permitted: io_uring_setup failed: {err}"),
            fix: "set the sysctl kernel.io_uring_disabled=0 (or 1 with this user in kernel.io_uring_group); in a container, allow io_uring_setup, io_uring_enter and io_uring_register in its seccomp profile".into(),
        },
        libc::ENOMEM => HostProblem {
            what: format!("io_uring cannot allocate its ring: io_uring_setup failed: {err}"),
            fix: memlock_fix(MIN_MEMLOCK),
        },
        _ => HostProblem {
            what: format!("io_uring does not work here: io_uring_setup failed: {err}"),
            fix: "check the kernel (Linux 5.8+ with io_uring) and any seccomp profile".into(),
        },
    }
}

/// Create (and close) a one-entry io_uring: the cheapest proof that shards can start.
fn probe_io_uring() -> Result<(), HostProblem> {
    // struct io_uring_params is 120 bytes; zeroed means no flags.
    let mut params = [0u8; 120];
    // SAFETY: io_uring_setup writes at most sizeof(io_uring_params) into `params`.
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 1u32, params.as_mut_ptr()) };
    if fd < 0 {
        let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        return Err(io_uring_problem(errno));
    }
    // SAFETY: a descriptor we just got and own.
    unsafe { libc::close(fd as i32) };
    Ok(())
}

/// The soft RLIMIT_MEMLOCK in bytes (`None` = unlimited).
pub fn memlock_soft() -> Option<u64> {
    soft_limit(libc::RLIMIT_MEMLOCK).filter(|&n| n != libc::RLIM_INFINITY)
}

/// The soft RLIMIT_NOFILE (`RLIM_INFINITY` when unlimited; `None` if it cannot be read).
pub fn open_files_soft() -> Option<u64> {
    soft_limit(libc::RLIMIT_NOFILE)
}

fn soft_limit(resource: libc::__rlimit_resource_t) -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct we own.
    (unsafe { libc::getrlimit(resource, &mut lim) } == 0).then_some(lim.rlim_cur)
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Every host check, in the order an operator should fix them.
pub fn check_host() -> Result<(), HostProblem> {
    check_kernel(&kernel_release())?;
    check_memlock(memlock_soft())?;
    probe_io_uring()
}

/// A shard's executor failed to start: glommio's error with the likely fix.
pub fn shard_start_problem(shard: usize, error: &str) -> HostProblem {
    let lower = error.to_ascii_lowercase();
    let fix = if lower.contains("memlock") || lower.contains("cannot allocate memory") {
        memlock_fix(MIN_MEMLOCK)
    } else if lower.contains("operation not permitted")
        || lower.contains("function not implemented")
    {
        io_uring_problem(libc::EPERM).fix
    } else if lower.contains("cpu") {
        "check `shards` against the CPUs this process may use (taskset, cgroup cpuset)".into()
    } else {
        "see the error above; the README section \"Operating it\" lists what ringgate needs".into()
    };
    HostProblem {
        what: format!("shard {shard} could not start its io_uring executor: {error}"),
        fix,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions_are_judged() {
        assert_eq!(parse_kernel("6.1.0-18-amd64"), Some((6, 1)));
        assert_eq!(parse_kernel("5.8"), Some((5, 8)));
        assert!(check_kernel("5.8.0").is_ok());
        assert!(check_kernel("6.18.44-fc").is_ok());
        let old = check_kernel("5.4.0-150-generic").unwrap_err().to_string();
        assert!(old.contains("5.4.0") && old.contains("5.8"), "{old}");
        assert!(check_kernel("weird").is_ok());
    }

    #[test]
    fn memlock_below_glommio_minimum_is_refused_with_the_need() {
        assert!(check_memlock(None).is_ok());
        assert!(check_memlock(Some(MIN_MEMLOCK)).is_ok());
        let low = check_memlock(Some(64 * 1024)).unwrap_err().to_string();
        assert!(low.contains("64 KiB") && low.contains("512 KiB"), "{low}");
        assert!(
            low.contains("LimitMEMLOCK") && low.contains("ulimit -l"),
            "{low}"
        );
    }

    #[test]
    fn a_limit_too_low_for_registered_buffers_is_a_warning() {
        let want = memlock_wanted(2, 1 << 20);
        assert_eq!(want, 6 << 20);
        assert!(memlock_advice(None, want, false).is_none());
        assert!(memlock_advice(Some(want), want, false).is_none());
        assert!(memlock_advice(Some(1 << 20), want, true).is_none());
        let warn = memlock_advice(Some(1 << 20), want, false).unwrap();
        assert!(
            warn.contains("1024 KiB") && warn.contains("6144 KiB"),
            "{warn}"
        );
    }

    #[test]
    fn io_uring_errors_name_a_fix() {
        assert!(io_uring_problem(libc::EPERM)
            .fix
            .contains("io_uring_disabled"));
        assert!(io_uring_problem(libc::ENOSYS).fix.contains("seccomp"));
        assert!(shard_start_problem(1, "memlock limit too low")
            .to_string()
            .contains("ulimit -l"));
    }
}
