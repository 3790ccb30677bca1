//! Sockets: loopback-only targets, source-address ranges, nonblocking connect
//! with IP_BIND_ADDRESS_NO_PORT, and the open-file limit.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::os::fd::FromRawFd;

/// Most source addresses one process will rotate over.
pub const MAX_SOURCES: usize = 65_536;

/// Resolve `--target` and insist on a loopback address.
pub fn resolve_target(s: &str) -> Result<SocketAddr, String> {
    let addrs: Vec<SocketAddr> = s
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve --target {s:?}: {e}"))?
        .collect();
    let Some(first) = addrs.first().copied() else {
        return Err(format!("--target {s:?} resolved to no address"));
    };
    if let Some(bad) = addrs.iter().find(|a| !a.ip().is_loopback()) {
        return Err(format!(
            "--target {s:?} resolves to {bad}, which is not a loopback address; \
             this tool only targets 127.0.0.0/8 or ::1"
        ));
    }
    Ok(first)
}

/// `Host:` header value for a target.
pub fn host_header(t: &SocketAddr) -> String {
    match t {
        SocketAddr::V4(a) => format!("{}:{}", a.ip(), a.port()),
        SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
    }
}

fn parse_v4(s: &str) -> Result<Ipv4Addr, String> {
    s.trim()
        .parse::<Ipv4Addr>()
        .map_err(|_| format!("{s:?} is not an IPv4 address"))
}

/// Parse a `--sources` spec: comma-separated items, each an address
/// (`127.0.0.2`), a range (`127.0.0.2-127.0.0.254`) or a range whose end is
/// only the last octet (`127.0.0.2-254`). All must be in 127.0.0.0/8.
pub fn parse_sources(spec: &str) -> Result<Vec<Ipv4Addr>, String> {
    let mut out = Vec::new();
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (start, end) = match item.split_once('-') {
            None => {
                let a = parse_v4(item)?;
                (a, a)
            }
            Some((a, b)) => {
                let a = parse_v4(a)?;
                let b = b.trim();
                let b = if b.contains('.') {
                    parse_v4(b)?
                } else {
                    let last: u8 = b
                        .parse()
                        .map_err(|_| format!("bad range end {b:?} in {item:?}"))?;
                    let o = a.octets();
                    Ipv4Addr::new(o[0], o[1], o[2], last)
                };
                (a, b)
            }
        };
        let (s, e) = (u32::from(start), u32::from(end));
        if s > e {
            return Err(format!("source range {item:?} is empty (start > end)"));
        }
        for ip in [start, end] {
            if !ip.is_loopback() {
                return Err(format!("source address {ip} is not in 127.0.0.0/8"));
            }
        }
        if out.len() + (e - s) as usize + 1 > MAX_SOURCES {
            return Err(format!("more than {MAX_SOURCES} source addresses"));
        }
        out.extend((s..=e).map(Ipv4Addr::from));
    }
    if out.is_empty() {
        return Err("--sources is empty".into());
    }
    Ok(out)
}

/// `--source-ips N`: N consecutive addresses starting at 127.0.0.2.
pub fn sources_from_count(n: u32) -> Result<Vec<Ipv4Addr>, String> {
    if n == 0 || n as usize > MAX_SOURCES {
        return Err(format!("--source-ips must be 1..={MAX_SOURCES}"));
    }
    let s = u32::from(Ipv4Addr::new(127, 0, 0, 2));
    Ok((s..s + n).map(Ipv4Addr::from).collect())
}

fn last_errno() -> io::Error {
    io::Error::last_os_error()
}

/// Create a nonblocking TCP socket, optionally bind it to `src` (port chosen
/// at connect time thanks to IP_BIND_ADDRESS_NO_PORT) and start connecting.
/// Errors carry the failing step: ("socket"|"bind"|"connect", error).
pub fn connect_nonblocking(
    target: SocketAddr,
    src: Option<Ipv4Addr>,
    nodelay: bool,
) -> Result<mio::net::TcpStream, (&'static str, io::Error)> {
    let family = match target {
        SocketAddr::V4(_) => libc::AF_INET,
        SocketAddr::V6(_) => libc::AF_INET6,
    };
    // SAFETY: plain socket(2) call; the fd is owned by the TcpStream below.
    let fd = unsafe {
        libc::socket(
            family,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(("socket", last_errno()));
    }
    // SAFETY: fd is a fresh socket we own; dropping the stream closes it.
    let std_stream = unsafe { std::net::TcpStream::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    let setopt = |level, name| {
        // SAFETY: valid fd, pointer to a c_int of the stated size.
        unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                &one as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        }
    };
    if nodelay && setopt(libc::IPPROTO_TCP, libc::TCP_NODELAY) != 0 {
        return Err(("setsockopt", last_errno()));
    }
    if let Some(ip) = src {
        if !matches!(target, SocketAddr::V4(_)) {
            return Err(("bind", io::Error::from_raw_os_error(libc::EAFNOSUPPORT)));
        }
        if setopt(libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT) != 0 {
            return Err(("setsockopt", last_errno()));
        }
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(ip).to_be(),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: sin is a valid sockaddr_in for the stated length.
        let r = unsafe {
            libc::bind(
                fd,
                &sin as *const libc::sockaddr_in as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(("bind", last_errno()));
        }
    }
    let r = match target {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*a.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: valid sockaddr_in.
            unsafe {
                libc::connect(
                    fd,
                    &sin as *const libc::sockaddr_in as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            }
        }
        SocketAddr::V6(a) => {
            // SAFETY: zeroed sockaddr_in6 is valid; fields filled below.
            let mut sin6: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr.s6_addr = a.ip().octets();
            sin6.sin6_scope_id = a.scope_id();
            // SAFETY: valid sockaddr_in6.
            unsafe {
                libc::connect(
                    fd,
                    &sin6 as *const libc::sockaddr_in6 as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
                )
            }
        }
    };
    if r != 0 {
        let e = last_errno();
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(("connect", e));
        }
    }
    Ok(mio::net::TcpStream::from_std(std_stream))
}

/// Raise the soft RLIMIT_NOFILE to the hard limit; returns the soft limit now in force.
pub fn raise_nofile_limit() -> u64 {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: rl is a valid out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } != 0 {
        return 1024;
    }
    if rl.rlim_cur < rl.rlim_max {
        let want = libc::rlimit {
            rlim_cur: rl.rlim_max,
            rlim_max: rl.rlim_max,
        };
        // SAFETY: valid pointer.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } == 0 {
            rl.rlim_cur = rl.rlim_max;
        }
    }
    rl.rlim_cur
}

/// File descriptors kept free for stdio, epoll, /proc reads, the allocator...
pub fn fd_margin(threads: usize) -> u64 {
    64 + 4 * threads as u64
}

/// Error text when `n` connections cannot fit under the open-file limit.
pub fn check_fd_budget(n: usize, limit: u64, threads: usize) -> Result<(), String> {
    let usable = limit.saturating_sub(fd_margin(threads));
    if n as u64 > usable {
        return Err(format!(
            "{n} connections need {n} file descriptors but this process may open at most \
             {limit} (RLIMIT_NOFILE) and keeps {} spare, so at most {usable} connections fit. \
             Run several ringgate-bench processes side by side, each with at most {usable} \
             connections, distinct --user-offset values (e.g. 0, {usable}, {}...) and distinct \
             --sources ranges, and add their results up.",
            fd_margin(threads),
            2 * usable
        ));
    }
    Ok(())
}

/// Local ephemeral port range (ip_local_port_range).
pub fn ephemeral_port_count() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut it = s.split_whitespace().map(|x| x.parse::<u64>().ok());
    let (lo, hi) = (it.next()??, it.next()??);
    Some(hi.saturating_sub(lo) + 1)
}

/// Short symbolic name of an errno, for failure tables.
pub fn errno_name(e: &io::Error) -> String {
    let Some(code) = e.raw_os_error() else {
        return format!("{:?}", e.kind());
    };
    let name = match code {
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::ECONNRESET => "ECONNRESET",
        libc::ECONNABORTED => "ECONNABORTED",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::EADDRNOTAVAIL => "EADDRNOTAVAIL",
        libc::EADDRINUSE => "EADDRINUSE",
        libc::EMFILE => "EMFILE",
        libc::ENFILE => "ENFILE",
        libc::ENOBUFS => "ENOBUFS",
        libc::ENOMEM => "ENOMEM",
        libc::ENETUNREACH => "ENETUNREACH",
        libc::EHOSTUNREACH => "EHOSTUNREACH",
        libc::EPIPE => "EPIPE",
        libc::EAGAIN => "EAGAIN",
        libc::EINVAL => "EINVAL",
        libc::EACCES => "EACCES",
        libc::EPERM => "EPERM",
        libc::EAFNOSUPPORT => "EAFNOSUPPORT",
        libc::ENOTCONN => "ENOTCONN",
        _ => return format!("errno{code}"),
    };
    name.to_string()
}

/// Is this address usable as a source for the target's family?
pub fn ip_is_v4(t: &SocketAddr) -> bool {
    matches!(t.ip(), IpAddr::V4(_))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_ranges() {
        let v = parse_sources("127.0.0.2-127.0.0.254").unwrap();
        assert_eq!(v.len(), 253);
        assert_eq!(v[0], Ipv4Addr::new(127, 0, 0, 2));
        assert_eq!(v[252], Ipv4Addr::new(127, 0, 0, 254));
        let short = parse_sources("127.0.0.2-254").unwrap();
        assert_eq!(short, v);
        // Crossing an octet boundary.
        let x = parse_sources("127.0.0.255-127.0.1.1").unwrap();
        assert_eq!(
            x,
            vec![
                Ipv4Addr::new(127, 0, 0, 255),
                Ipv4Addr::new(127, 0, 1, 0),
                Ipv4Addr::new(127, 0, 1, 1)
            ]
        );
        // Lists and single addresses.
        let l = parse_sources("127.0.0.5, 127.0.0.9-10").unwrap();
        assert_eq!(l.len(), 3);
        assert_eq!(l[2], Ipv4Addr::new(127, 0, 0, 10));
    }

    #[test]
    fn source_range_errors() {
        assert!(parse_sources("10.0.0.1-10.0.0.5")
            .unwrap_err()
            .contains("not in 127"));
        assert!(parse_sources("127.0.0.9-127.0.0.3")
            .unwrap_err()
            .contains("empty"));
        assert!(parse_sources("127.0.0.1-999").is_err());
        assert!(parse_sources("localhost").is_err());
        assert!(parse_sources("").is_err());
        assert!(parse_sources("127.0.0.0-127.1.0.0")
            .unwrap_err()
            .contains("more than"));
        assert!(parse_sources("127.255.255.250-128.0.0.1").is_err());
    }

    #[test]
    fn source_count() {
        let v = sources_from_count(3).unwrap();
        assert_eq!(
            v,
            vec![
                Ipv4Addr::new(127, 0, 0, 2),
                Ipv4Addr::new(127, 0, 0, 3),
                Ipv4Addr::new(127, 0, 0, 4)
            ]
        );
        assert_eq!(
            sources_from_count(300).unwrap()[299],
            Ipv4Addr::new(127, 0, 1, 45)
        );
        assert!(sources_from_count(0).is_err());
    }

    #[test]
    fn targets_must_be_loopback() {
        assert!(resolve_target("127.0.0.1:8080").is_ok());
        assert!(resolve_target("[::1]:8080").is_ok());
        assert!(resolve_target("192.168.1.1:80").is_err());
        assert!(resolve_target("8.8.8.8:53").is_err());
        assert_eq!(
            host_header(&"[::1]:9".parse().unwrap()),
            "[::1]:9".to_string()
        );
    }

    #[test]
    fn fd_budget_message() {
        assert!(check_fd_budget(100, 1024, 1).is_ok());
        let e = check_fd_budget(5000, 1024, 1).unwrap_err();
        assert!(e.contains("RLIMIT_NOFILE") && e.contains("several"));
    }
}
