//! An `http://` or `https://` URL as the gateway's own small HTTP clients need it (the JWKS
//! fetcher, the push webhook): where to connect, the TLS server name, the `Host` header and
//! the request path. No user info, no fragment; a name is resolved when connecting.

/// `http[s]://host[:port][/path]`, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    pub tls: bool,
    /// `host:port` to connect to.
    pub addr: String,
    /// The host alone (no brackets, no port): TLS server name.
    pub host: String,
    /// The `Host` header: as written in the URL.
    pub authority: String,
    pub path: String,
}

impl HttpUrl {
    pub fn parse(url: &str) -> Result<HttpUrl, String> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(format!("`{url}`: must start with http:// or https://"));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.is_empty()
            || authority.contains('@')
            || authority.contains(char::is_whitespace)
        {
            return Err(format!("`{url}`: needs a host (and no user info)"));
        }
        if path.contains(char::is_whitespace) || path.contains('#') {
            return Err(format!(
                "`{url}`: the path must not hold spaces or a fragment"
            ));
        }
        let port_at = authority
            .rfind(':')
            .filter(|&i| !authority[i..].contains(']'));
        let (host, port) = match port_at {
            Some(i) => {
                let port = authority[i + 1..]
                    .parse::<u16>()
                    .map_err(|_| format!("`{url}`: bad port {:?}", &authority[i + 1..]))?;
                (&authority[..i], port)
            }
            None => (authority, if tls { 443 } else { 80 }),
        };
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if bare.is_empty() {
            return Err(format!("`{url}`: needs a host"));
        }
        Ok(HttpUrl {
            tls,
            addr: format!("{host}:{port}"),
            host: bare.to_string(),
            authority: authority.to_string(),
            path: path.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_http_and_https_with_host_port_path() {
        let s = HttpUrl::parse("https://idp.example/.well-known/jwks.json").unwrap();
        assert!(s.tls);
        assert_eq!(s.addr, "idp.example:443");
        assert_eq!(s.host, "idp.example");
        assert_eq!(s.path, "/.well-known/jwks.json");
        let s = HttpUrl::parse("http://127.0.0.1:8081").unwrap();
        assert!(!s.tls);
        assert_eq!((s.addr.as_str(), s.path.as_str()), ("127.0.0.1:8081", "/"));
        let s = HttpUrl::parse("https://[::1]:8443/k").unwrap();
        assert_eq!((s.addr.as_str(), s.host.as_str()), ("[::1]:8443", "::1"));
        assert!(HttpUrl::parse("ftp://x/").is_err());
        assert!(HttpUrl::parse("https://").is_err());
        assert!(HttpUrl::parse("http://h:99999/").is_err());
        assert!(HttpUrl::parse("http://u:p@h/").is_err());
    }
}
