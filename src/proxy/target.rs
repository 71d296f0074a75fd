//! Stage 4: what the client asked for — a CONNECT authority or an absolute-form URI.
//!
//! ```text
//! CONNECT example.com:443 HTTP/1.1        -> Target { host: example.com, port: 443, Connect }
//! GET http://user@Example.COM./a?b HTTP/1.1 -> Target { host: example.com, port: 80, Http },
//!                                            forwarded as "GET /a?b" with "Host: example.com"
//! GET /a HTTP/1.1                           -> 400 not-proxy-request (origin-form: not a proxy request)
//! ```
//! The host goes through `acl::normalize_host`, so every spelling of an address (decimal,
//! hex, octal IPv4, percent-encoding, trailing dot, case) reaches the ACL as one value.

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Uri};

use crate::acl::{Host, Protocol, normalize_host};
use crate::error::ProxyError;

/// The parsed destination of one request.
#[derive(Debug, Clone)]
pub struct Target {
    pub host: Host,
    pub port: u16,
    pub protocol: Protocol,
    /// `host[:port]` as sent on the wire to the origin (Host header, CONNECT line).
    pub authority: String,
    /// Origin-form path and query for plain HTTP ("/" when empty).
    pub path_and_query: Option<PathAndQuery>,
}

// === impl Target ===

impl Target {
    pub fn from_request(method: &Method, uri: &Uri) -> Result<Target, ProxyError> {
        if method == Method::CONNECT {
            return Self::connect(uri);
        }
        match uri.scheme() {
            None => Err(ProxyError::NotProxyRequest(uri.to_string())),
            Some(s) if *s == Scheme::HTTP => Self::http(uri),
            Some(s) if *s == Scheme::HTTPS => Err(ProxyError::Unsupported(format!(
                "{uri}: https:// URLs go through a CONNECT tunnel (set HTTPS_PROXY), not a plain request"
            ))),
            Some(s) => Err(ProxyError::Unsupported(format!("URL scheme {s:?}"))),
        }
    }

    fn connect(uri: &Uri) -> Result<Target, ProxyError> {
        // CONNECT takes authority-form only: no scheme, no path.
        if uri.scheme().is_some()
            || uri
                .path_and_query()
                .is_some_and(|p| p.as_str() != "/" && !p.as_str().is_empty())
        {
            return Err(ProxyError::Malformed(format!(
                "CONNECT target {uri} is not host:port"
            )));
        }
        let authority = uri.authority().ok_or_else(|| {
            ProxyError::Malformed(format!("CONNECT target {uri} is not host:port"))
        })?;
        let port = authority.port_u16().ok_or_else(|| {
            ProxyError::Malformed(format!("CONNECT target {authority} has no port"))
        })?;
        let host = host_of(authority)?;
        Ok(Target {
            authority: wire_authority(&host, port, None),
            host,
            port,
            protocol: Protocol::Connect,
            path_and_query: None,
        })
    }

    fn http(uri: &Uri) -> Result<Target, ProxyError> {
        let authority = uri
            .authority()
            .ok_or_else(|| ProxyError::Malformed(format!("URL {uri} has no host")))?;
        if authority.port().is_some() && authority.port_u16().is_none() {
            return Err(ProxyError::Malformed(format!(
                "URL {uri} has an invalid port"
            )));
        }
        let port = authority.port_u16().unwrap_or(80);
        if port == 0 {
            return Err(ProxyError::Malformed(format!("URL {uri} has port 0")));
        }
        let host = host_of(authority)?;
        let path_and_query = Some(
            uri.path_and_query()
                .filter(|p| !p.as_str().is_empty())
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
        );
        Ok(Target {
            authority: wire_authority(&host, port, Some(80)),
            host,
            port,
            protocol: Protocol::Http,
            path_and_query,
        })
    }

    /// The URL as logged: `http://host[:port]/path?query`, no userinfo.
    pub fn log_target(&self) -> String {
        match (&self.protocol, &self.path_and_query) {
            (Protocol::Http, Some(pq)) => {
                const SCHEME: &str = "http://";
                let pq = pq.as_str();
                let mut url = String::with_capacity(SCHEME.len() + self.authority.len() + pq.len());
                url.push_str(SCHEME);
                url.push_str(&self.authority);
                url.push_str(pq);
                url
            }
            _ => self.authority.clone(),
        }
    }

    /// Origin-form URI for the request line to an origin.
    pub fn origin_form(&self) -> Uri {
        let pq = self
            .path_and_query
            .clone()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        Uri::from(pq)
    }

    /// Absolute-form URI for the request line to a parent proxy.
    pub fn absolute_form(&self) -> Result<Uri, ProxyError> {
        let pq = self
            .path_and_query
            .clone()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        Uri::builder()
            .scheme(Scheme::HTTP)
            .authority(self.authority.as_str())
            .path_and_query(pq)
            .build()
            .map_err(|e| {
                ProxyError::Malformed(format!("cannot rebuild URL for {}: {e}", self.authority))
            })
    }

    /// The host as a DNS name or literal, for resolving.
    pub fn host_str(&self) -> String {
        match &self.host {
            Host::Name(n) => n.clone(),
            Host::Ip(ip) => ip.to_string(),
        }
    }
}

/// The request's framing and `Host`, checked before anything is forwarded (RFC 9112 3.2,
/// 6.1): hyper parses the syntax, these are the MUSTs it leaves to the application.
///
/// ```text
/// Host: a.example / Host: b.example          -> 400 (more than one Host)
/// Host: a b                                  -> 400 (not a valid authority)
/// Content-Length: 5 + Transfer-Encoding: chunked -> 400 (smuggling: never forwarded)
/// Transfer-Encoding: br, chunked             -> 501 (a coding Kalmar does not know)
/// ```
pub fn check_framing(headers: &http::HeaderMap) -> Result<(), ProxyError> {
    let mut hosts = headers.get_all(http::header::HOST).iter();
    if let Some(host) = hosts.next() {
        if hosts.next().is_some() {
            return Err(ProxyError::Malformed(
                "more than one Host header field".into(),
            ));
        }
        let valid = std::str::from_utf8(host.as_bytes())
            .ok()
            .filter(|h| !h.is_empty())
            .is_some_and(|h| {
                !h.contains('@') && h.parse::<Authority>().is_ok_and(|a| a.as_str() == h)
            });
        if !valid {
            return Err(ProxyError::Malformed(format!(
                "invalid Host header field {:?}",
                String::from_utf8_lossy(host.as_bytes())
            )));
        }
    }
    let codings = headers.get_all(http::header::TRANSFER_ENCODING);
    if codings.iter().next().is_none() {
        return Ok(());
    }
    if headers.contains_key(http::header::CONTENT_LENGTH) {
        return Err(ProxyError::Malformed(
            "both Transfer-Encoding and Content-Length: the message length is ambiguous".into(),
        ));
    }
    for value in codings {
        let text = String::from_utf8_lossy(value.as_bytes());
        for coding in text.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            // The registered codings (RFC 9112 7, IANA), parameters aside.
            let name = coding.split(';').next().unwrap_or("").trim();
            const KNOWN: [&str; 6] = [
                "chunked",
                "compress",
                "deflate",
                "gzip",
                "x-compress",
                "x-gzip",
            ];
            if !KNOWN.iter().any(|k| name.eq_ignore_ascii_case(k)) {
                return Err(ProxyError::UnknownCoding(name.to_owned()));
            }
        }
    }
    Ok(())
}

/// The host part of an authority with userinfo and IPv6 brackets removed, normalised.
fn host_of(authority: &Authority) -> Result<Host, ProxyError> {
    // `Authority::host()` already drops userinfo and the port, and keeps IPv6 brackets.
    let raw = authority.host();
    let raw = raw
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(raw);
    normalize_host(raw).map_err(|e| ProxyError::Malformed(format!("host {raw:?}: {e}")))
}

/// `host[:port]` in canonical spelling: the port is left out when it is the scheme default.
/// Built in one allocation of the right size (this runs for every request).
fn wire_authority(host: &Host, port: u16, default_port: Option<u16>) -> String {
    let mut out = String::with_capacity(48);
    match host {
        Host::Name(n) => out.push_str(n),
        Host::Ip(std::net::IpAddr::V4(v4)) => push_ipv4(&mut out, *v4),
        Host::Ip(std::net::IpAddr::V6(v6)) => {
            use std::fmt::Write;
            let _ = write!(out, "[{v6}]");
        }
    }
    if Some(port) != default_port {
        out.push(':');
        out.push_str(itoa::Buffer::new().format(port));
    }
    out
}

/// Dotted decimal, as `Ipv4Addr`'s `Display` writes it, without the formatter machinery.
fn push_ipv4(out: &mut String, ip: std::net::Ipv4Addr) {
    let mut digits = itoa::Buffer::new();
    for (i, octet) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        out.push_str(digits.format(octet));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing_musts() {
        let check = |fields: &[(&str, &str)]| {
            let mut headers = http::HeaderMap::new();
            for (name, value) in fields {
                headers.append(
                    http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                    http::HeaderValue::from_str(value).unwrap(),
                );
            }
            check_framing(&headers).map_err(|e| e.kind().as_str())
        };
        assert_eq!(check(&[("host", "a.example:8080")]), Ok(()));
        assert_eq!(check(&[]), Ok(()));
        assert_eq!(check(&[("host", "[::1]:80")]), Ok(()));
        assert_eq!(
            check(&[("host", "a"), ("host", "a")]),
            Err("malformed-request")
        );
        assert_eq!(check(&[("host", "a b")]), Err("malformed-request"));
        assert_eq!(check(&[("host", "")]), Err("malformed-request"));
        assert_eq!(check(&[("host", "a/b")]), Err("malformed-request"));
        assert_eq!(check(&[("host", "u@a")]), Err("malformed-request"));
        assert_eq!(check(&[("transfer-encoding", "chunked")]), Ok(()));
        assert_eq!(check(&[("transfer-encoding", "gzip, chunked")]), Ok(()));
        assert_eq!(
            check(&[("transfer-encoding", "chunked"), ("content-length", "5")]),
            Err("malformed-request")
        );
        assert_eq!(
            check(&[("transfer-encoding", "br, chunked")]),
            Err("unsupported")
        );
    }

    fn parse(method: &str, uri: &str) -> Result<Target, ProxyError> {
        Target::from_request(&method.parse().unwrap(), &uri.parse().unwrap())
    }

    #[test]
    fn targets() {
        let t = parse("GET", "http://user:pw@Example.COM./a?b=1").unwrap();
        assert_eq!(t.authority, "example.com");
        assert_eq!(t.port, 80);
        assert_eq!(t.origin_form(), "/a?b=1");
        assert_eq!(t.log_target(), "http://example.com/a?b=1");

        let t = parse("GET", "http://127.0.0.1:8080").unwrap();
        assert_eq!(t.authority, "127.0.0.1:8080");
        assert_eq!(t.origin_form(), "/");

        let t = parse("CONNECT", "[::1]:443").unwrap();
        assert_eq!(t.authority, "[::1]:443");
        assert!(matches!(t.host, Host::Ip(ip) if ip.is_loopback()));

        let t = parse("GET", "http://0x7f000001/").unwrap();
        assert!(matches!(t.host, Host::Ip(ip) if ip.to_string() == "127.0.0.1"));
        assert_eq!(t.authority, "127.0.0.1");

        let t = parse("GET", "http://10.200.0.255:65535/x").unwrap();
        assert_eq!(t.authority, "10.200.0.255:65535");
        assert_eq!(t.log_target(), "http://10.200.0.255:65535/x");

        let t = parse("GET", "http://[2001:DB8::1]:80/").unwrap();
        assert_eq!(t.authority, "[2001:db8::1]");
    }

    #[test]
    fn rejected_targets() {
        assert_eq!(
            parse("GET", "/index.html").unwrap_err().kind().as_str(),
            "not-proxy-request"
        );
        assert_eq!(
            parse("GET", "https://example.com/")
                .unwrap_err()
                .kind()
                .as_str(),
            "unsupported"
        );
        assert_eq!(
            parse("GET", "ftp://example.com/")
                .unwrap_err()
                .kind()
                .as_str(),
            "unsupported"
        );
        assert_eq!(
            parse("CONNECT", "example.com").unwrap_err().kind().as_str(),
            "malformed-request"
        );
        assert_eq!(
            parse("GET", "http://example.com:0/")
                .unwrap_err()
                .kind()
                .as_str(),
            "malformed-request"
        );
    }
}
