//! /proc readers: RSS of a process, kernel slab and TCP socket memory, CPU time.

use serde::Serialize;
use std::io;

fn read(path: &str) -> io::Result<String> {
    std::fs::read_to_string(path)
}

/// Value of a `Key:   123 kB` line, in kB.
pub fn parse_kb_field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(key)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// VmRSS of a process in bytes (`None` = self).
pub fn vm_rss_bytes(pid: Option<u32>) -> io::Result<u64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/status"),
        None => "/proc/self/status".to_string(),
    };
    let text = read(&path)?;
    parse_kb_field(&text, "VmRSS")
        .map(|kb| kb * 1024)
        .ok_or_else(|| io::Error::other(format!("no VmRSS in {path}")))
}

/// Anonymous resident memory (`RssAnon`: heap, stacks; not the binary's and libraries' pages
/// from the page cache) summed over several pids, in bytes. What a connection's state can
/// occupy; VmRSS adds file pages, which move with code paths first run and the page cache.
pub fn sum_rss_anon(pids: &[u32]) -> io::Result<u64> {
    pids.iter()
        .map(|p| {
            let path = format!("/proc/{p}/status");
            let text = read(&path)?;
            parse_kb_field(&text, "RssAnon")
                .map(|kb| kb * 1024)
                .ok_or_else(|| io::Error::other(format!("no RssAnon in {path}")))
        })
        .sum()
}

/// Sum of VmRSS over several pids, in bytes.
pub fn sum_rss(pids: &[u32]) -> io::Result<u64> {
    pids.iter().map(|&p| vm_rss_bytes(Some(p))).sum()
}

#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct KernelMem {
    pub slab_kb: u64,
    pub sunreclaim_kb: u64,
    pub tcp_inuse: u64,
    pub tcp_orphan: u64,
    pub tcp_tw: u64,
    pub tcp_alloc: u64,
    /// Pages charged to TCP socket buffers (sockstat "mem").
    pub tcp_mem_pages: u64,
}

/// Parse the `TCP:` line of /proc/net/sockstat into `k`.
pub fn parse_sockstat(text: &str, k: &mut KernelMem) {
    let Some(line) = text.lines().find(|l| l.starts_with("TCP:")) else {
        return;
    };
    let mut it = line["TCP:".len()..].split_whitespace();
    while let (Some(name), Some(val)) = (it.next(), it.next()) {
        let v = val.parse().unwrap_or(0);
        match name {
            "inuse" => k.tcp_inuse = v,
            "orphan" => k.tcp_orphan = v,
            "tw" => k.tcp_tw = v,
            "alloc" => k.tcp_alloc = v,
            "mem" => k.tcp_mem_pages = v,
            _ => {}
        }
    }
}

pub fn kernel_mem() -> KernelMem {
    let mut k = KernelMem::default();
    if let Ok(m) = read("/proc/meminfo") {
        k.slab_kb = parse_kb_field(&m, "Slab").unwrap_or(0);
        k.sunreclaim_kb = parse_kb_field(&m, "SUnreclaim").unwrap_or(0);
    }
    if let Ok(s) = read("/proc/net/sockstat") {
        parse_sockstat(&s, &mut k);
    }
    k
}

/// (utime, stime) in clock ticks from the text of /proc/PID/stat.
pub fn parse_stat_user_sys_ticks(text: &str) -> Option<(u64, u64)> {
    // The command name (field 2) may contain spaces and parentheses: fields
    // after the last ')' start at field 3 (state); utime/stime are 14 and 15.
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((utime, stime))
}

pub fn clock_ticks_per_sec() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// CPU seconds (user + system, all threads) consumed so far by the given pids.
pub fn pids_cpu_secs(pids: &[u32]) -> io::Result<f64> {
    pids_user_sys_secs(pids).map(|(user, sys)| user + sys)
}

/// CPU seconds in user space and in the kernel (all threads) consumed so far by the pids.
pub fn pids_user_sys_secs(pids: &[u32]) -> io::Result<(f64, f64)> {
    let hz = clock_ticks_per_sec() as f64;
    let (mut user, mut sys) = (0u64, 0u64);
    for p in pids {
        let path = format!("/proc/{p}/stat");
        let text = read(&path)?;
        let (u, s) = parse_stat_user_sys_ticks(&text)
            .ok_or_else(|| io::Error::other(format!("cannot parse {path}")))?;
        user += u;
        sys += s;
    }
    Ok((user as f64 / hz, sys as f64 / hz))
}

/// CPU seconds (all threads, those that exited included) of the given pids at nanosecond
/// resolution: each process' CPU-time clock (`clock_getcpuclockid`), for spans too short for
/// the 10 ms ticks of `/proc/<pid>/stat` (a connect ramp of a third of a second).
pub fn pids_cpu_secs_fine(pids: &[u32]) -> io::Result<f64> {
    let mut secs = 0.0;
    for &p in pids {
        let mut clock: libc::clockid_t = 0;
        // SAFETY: a valid out-pointer.
        let rc = unsafe { libc::clock_getcpuclockid(p as libc::pid_t, &mut clock) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: the clock was just given for this pid; a valid out-pointer.
        if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
            return Err(io::Error::last_os_error());
        }
        secs += ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9;
    }
    Ok(secs)
}

/// CPU seconds (user + system, all threads) of this process, µs resolution.
pub fn self_cpu_secs() -> f64 {
    rusage_cpu_secs(libc::RUSAGE_SELF)
}

/// CPU seconds (user + system) of the calling thread, µs resolution.
pub fn thread_cpu_secs() -> f64 {
    rusage_cpu_secs(libc::RUSAGE_THREAD)
}

fn rusage_cpu_secs(who: libc::c_int) -> f64 {
    // SAFETY: zeroed rusage is a valid out-parameter.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer.
    if unsafe { libc::getrusage(who, &mut ru) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Fail early with a clear message when a --gateway-pid cannot be read.
pub fn check_pids(pids: &[u32]) -> Result<(), String> {
    for &p in pids {
        vm_rss_bytes(Some(p))
            .map_err(|e| format!("--gateway-pid {p}: cannot read /proc/{p}/status: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_and_meminfo_fields() {
        let status =
            "Name:\tringgate\nVmPeak:\t  9999 kB\nVmRSS:\t   12345 kB\nRssAnon:\t 100 kB\n";
        assert_eq!(parse_kb_field(status, "VmRSS"), Some(12345));
        assert_eq!(parse_kb_field(status, "RssAnon"), Some(100));
        assert_eq!(parse_kb_field(status, "VmSwap"), None);
        let meminfo = "MemTotal:       24684000 kB\nSlab:             212340 kB\nSReclaimable:     99000 kB\nSUnreclaim:       113340 kB\n";
        assert_eq!(parse_kb_field(meminfo, "Slab"), Some(212340));
        assert_eq!(parse_kb_field(meminfo, "SUnreclaim"), Some(113340));
    }

    #[test]
    fn sockstat() {
        let s = "sockets: used 339\nTCP: inuse 5 orphan 1 tw 2 alloc 7 mem 3\nUDP: inuse 0 mem 0\n";
        let mut k = KernelMem::default();
        parse_sockstat(s, &mut k);
        assert_eq!(
            (
                k.tcp_inuse,
                k.tcp_orphan,
                k.tcp_tw,
                k.tcp_alloc,
                k.tcp_mem_pages
            ),
            (5, 1, 2, 7, 3)
        );
    }

    #[test]
    fn stat_cpu() {
        let s = "4242 (ring gate) (x)) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 17 0 0 20 0 3 0 100 1000 50 18446744073709551615";
        assert_eq!(parse_stat_user_sys_ticks(s), Some((250, 17)));
        assert_eq!(parse_stat_user_sys_ticks("garbage"), None);
        // Our own stat parses.
        let me = std::fs::read_to_string("/proc/self/stat").unwrap();
        assert!(parse_stat_user_sys_ticks(&me).is_some());
        assert!(vm_rss_bytes(None).unwrap() > 0);
    }

    #[test]
    fn fine_cpu_time() {
        // Our own process' CPU time, read finely, grows with work (bounded wait, no timing
        // asserted) ...
        let me = std::process::id();
        let before = pids_cpu_secs_fine(&[me]).unwrap();
        let give_up = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut x = 0u64;
        while pids_cpu_secs_fine(&[me]).unwrap() - before < 0.02 {
            assert!(std::time::Instant::now() < give_up, "CPU time did not grow");
            for _ in 0..10_000 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
        }
        // ... and lies between two reads of getrusage's count of the same CPU (a tick of
        // slack for the two clocks' rounding).
        let (low, fine, high) = (
            self_cpu_secs(),
            pids_cpu_secs_fine(&[me]).unwrap(),
            self_cpu_secs(),
        );
        assert!(
            low - 0.011 <= fine && fine <= high + 0.011,
            "{low} <= {fine} <= {high}"
        );
    }
}
