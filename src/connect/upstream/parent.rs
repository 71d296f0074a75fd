//! Parent proxy URLs as admins write them (`http://h:p`, `https://h:p`, bare `h:p`,
//! `http://user:pass@h:p`), parsed into where to connect and how to authenticate.
//!
//! ```text
//! proxy.example.org:3128                 -> http,  proxy.example.org:3128, no credentials
//! https://proxy.example.org:8443/        -> https, proxy.example.org:8443
//! http://alice:p%40ss@10.0.0.5:8080      -> http,  10.0.0.5:8080, Basic alice:p@ss
//! ```
//! Credentials never leave this module in clear text except as the `Proxy-Authorization`
//! value (marked sensitive); every other rendering shows them as `***`.

use std::fmt;
use std::sync::Arc;

use base64::Engine;
use http::HeaderValue;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::acl::{Host, normalize_host};

/// How Kalmar talks to a parent: plain TCP, or TLS to the parent itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParentScheme {
    Http,
    Https,
}

/// One parsed parent proxy URL.
#[derive(Clone, PartialEq, Eq)]
pub struct ParentUrl {
    pub scheme: ParentScheme,
    pub host: Host,
    pub port: u16,
    /// `host:port` (IPv6 in brackets): the route in logs and the metric label.
    pub label: Arc<str>,
    pub credentials: Option<Credentials>,
}

/// A configured list of parents (`upstream.parents` and the per-scheme lists), parsed
/// while the configuration is read. An empty entry (an empty environment value) is no
/// parent. Serializes with the credentials as `***`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParentList(Vec<ParentUrl>);

/// One entry of a [`ParentList`] as written: a URL, or empty.
#[derive(Deserialize)]
#[serde(try_from = "String")]
struct ParentEntry(Option<ParentUrl>);

/// A user name and password for Basic `Proxy-Authorization`. Debug shows `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    user: String,
    password: String,
}

/// Why a parent URL is not acceptable. `url` is the URL with its credentials as `***`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParentUrlError {
    #[error("empty parent URL")]
    Empty,
    #[error("{url}: unsupported scheme {scheme:?} (use http:// or https://)")]
    Scheme { url: String, scheme: String },
    #[error("{url}: no port (write host:port, e.g. proxy.example.org:3128)")]
    NoPort { url: String },
    #[error("{url}: invalid port {port:?}")]
    Port { url: String, port: String },
    #[error("{url}: invalid host: {reason}")]
    Host { url: String, reason: String },
    #[error("{url}: a parent proxy URL has no path, query or fragment (found {rest:?})")]
    Path { url: String, rest: String },
    #[error("{url}: empty user name before '@'")]
    EmptyUser { url: String },
    #[error("{url}: invalid percent-encoding in the credentials")]
    Encoding { url: String },
}

/// Credentials given as `user:password` (file or environment) that do not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expected one line \"user:password\" with a non-empty user")]
pub struct CredentialsError;

// === impl ParentScheme ===

impl ParentScheme {
    pub fn as_str(self) -> &'static str {
        match self {
            ParentScheme::Http => "http",
            ParentScheme::Https => "https",
        }
    }
}

// === impl ParentList ===

impl ParentList {
    pub fn new(urls: Vec<ParentUrl>) -> ParentList {
        ParentList(urls)
    }

    pub fn urls(&self) -> &[ParentUrl] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// These parents, or `fallback`'s when none are configured here.
    pub fn or<'a>(&'a self, fallback: &'a ParentList) -> &'a [ParentUrl] {
        if self.is_empty() {
            &fallback.0
        } else {
            &self.0
        }
    }
}

impl<'de> Deserialize<'de> for ParentList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let entries = Vec::<ParentEntry>::deserialize(d)?;
        Ok(ParentList(
            entries.into_iter().filter_map(|e| e.0).collect(),
        ))
    }
}

impl Serialize for ParentList {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(ToString::to_string))
    }
}

impl TryFrom<String> for ParentEntry {
    type Error = ParentUrlError;

    fn try_from(raw: String) -> Result<Self, Self::Error> {
        if raw.trim().is_empty() {
            return Ok(ParentEntry(None));
        }
        ParentUrl::parse(&raw).map(|url| ParentEntry(Some(url)))
    }
}

// === impl ParentUrl ===

impl ParentUrl {
    pub fn parse(raw: &str) -> Result<ParentUrl, ParentUrlError> {
        let s = raw.trim();
        if s.is_empty() {
            return Err(ParentUrlError::Empty);
        }
        let url = redact(s);
        let (scheme, rest) = match s.find("://") {
            Some(i) => (s[..i].to_ascii_lowercase(), &s[i + 3..]),
            None => ("http".to_owned(), s),
        };
        let scheme = match scheme.as_str() {
            "http" => ParentScheme::Http,
            "https" => ParentScheme::Https,
            _ => return Err(ParentUrlError::Scheme { url, scheme }),
        };
        // Userinfo ends at the LAST '@': unencoded '@', ':' or '/' in a password still work.
        let (userinfo, after) = match rest.rfind('@') {
            Some(i) => (Some(&rest[..i]), &rest[i + 1..]),
            None => (None, rest),
        };
        let end = after.find(['/', '?', '#']).unwrap_or(after.len());
        let (authority, tail) = after.split_at(end);
        if !tail.is_empty() && tail != "/" {
            return Err(ParentUrlError::Path {
                url,
                rest: tail.to_owned(),
            });
        }
        let (host_raw, port_raw) = split_host_port(authority)
            .ok_or_else(|| ParentUrlError::NoPort { url: url.clone() })?;
        let port = match port_raw.parse::<u16>() {
            Ok(p) if p != 0 => p,
            _ => {
                return Err(ParentUrlError::Port {
                    url,
                    port: port_raw.to_owned(),
                });
            }
        };
        let host = normalize_host(host_raw).map_err(|e| ParentUrlError::Host {
            url: url.clone(),
            reason: e.to_string(),
        })?;
        let credentials = match userinfo {
            None => None,
            Some(info) => {
                let (user, password) = info.split_once(':').unwrap_or((info, ""));
                let decode =
                    |s| percent_decode(s).ok_or(ParentUrlError::Encoding { url: url.clone() });
                let user = decode(user)?;
                if user.is_empty() {
                    return Err(ParentUrlError::EmptyUser { url });
                }
                Some(Credentials {
                    user,
                    password: decode(password)?,
                })
            }
        };
        let label = match &host {
            Host::Name(n) => format!("{n}:{port}"),
            Host::Ip(std::net::IpAddr::V6(v6)) => format!("[{v6}]:{port}"),
            Host::Ip(ip) => format!("{ip}:{port}"),
        };
        Ok(ParentUrl {
            scheme,
            host,
            port,
            label: Arc::from(label),
            credentials,
        })
    }
}

impl fmt::Debug for ParentUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl fmt::Display for ParentUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let auth = if self.credentials.is_some() {
            "***@"
        } else {
            ""
        };
        write!(f, "{}://{auth}{}", self.scheme.as_str(), self.label)
    }
}

// === impl Credentials ===

impl Credentials {
    /// `user:password` as found in `upstream.credentials_file` or `credentials_env`
    /// (taken literally, no percent-decoding; surrounding whitespace is ignored).
    pub fn parse_pair(text: &str) -> Result<Credentials, CredentialsError> {
        let line = text.trim();
        match line.split_once(':') {
            Some((user, password)) if !user.is_empty() && !line.contains('\n') => Ok(Credentials {
                user: user.to_owned(),
                password: password.to_owned(),
            }),
            _ => Err(CredentialsError),
        }
    }

    /// The `Proxy-Authorization` value, marked sensitive so that it is never logged.
    pub fn basic_header(&self) -> Option<HeaderValue> {
        let token = base64::engine::general_purpose::STANDARD
            .encode(format!("{}:{}", self.user, self.password));
        let mut value = HeaderValue::from_str(&format!("Basic {token}")).ok()?;
        value.set_sensitive(true);
        Some(value)
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// `raw` with any userinfo replaced by `***`, for messages and `check-config`.
pub fn redact(raw: &str) -> String {
    let Some(at) = raw.rfind('@') else {
        return raw.to_owned();
    };
    let start = raw.find("://").map(|i| i + 3).unwrap_or(0);
    if start > at {
        return raw.to_owned();
    }
    format!("{}***{}", &raw[..start], &raw[at..])
}

/// `host:port` or `[v6]:port` → (host, port); None when there is no port.
fn split_host_port(authority: &str) -> Option<(&str, &str)> {
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = after.strip_prefix(':')?;
        return Some((host, port));
    }
    let (host, port) = authority.rsplit_once(':')?;
    if host.contains(':') {
        // An unbracketed IPv6 literal: ambiguous, ask for brackets via "no port".
        return None;
    }
    Some((host, port))
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds(user: &str, password: &str) -> Option<Credentials> {
        Some(Credentials {
            user: user.into(),
            password: password.into(),
        })
    }

    #[test]
    fn accepted_forms() {
        let table: &[(&str, ParentScheme, &str, Option<Credentials>)] = &[
            (
                "proxy.example.org:3128",
                ParentScheme::Http,
                "proxy.example.org:3128",
                None,
            ),
            (
                "http://proxy.example.org:8080",
                ParentScheme::Http,
                "proxy.example.org:8080",
                None,
            ),
            (
                "HTTP://Proxy.Example.ORG:8080/",
                ParentScheme::Http,
                "proxy.example.org:8080",
                None,
            ),
            (
                "https://proxy.example.org:8443",
                ParentScheme::Https,
                "proxy.example.org:8443",
                None,
            ),
            (
                "  10.0.0.5:3128  ",
                ParentScheme::Http,
                "10.0.0.5:3128",
                None,
            ),
            ("http://[::1]:3128", ParentScheme::Http, "[::1]:3128", None),
            ("[fd00::5]:3128", ParentScheme::Http, "[fd00::5]:3128", None),
            (
                "http://alice:secret@proxy:3128",
                ParentScheme::Http,
                "proxy:3128",
                creds("alice", "secret"),
            ),
            (
                "alice:secret@proxy:3128",
                ParentScheme::Http,
                "proxy:3128",
                creds("alice", "secret"),
            ),
            (
                "https://a%40b:p%3Ass%2F@proxy:443",
                ParentScheme::Https,
                "proxy:443",
                creds("a@b", "p:ss/"),
            ),
            (
                "http://bob:p@ss:w/rd@proxy:3128",
                ParentScheme::Http,
                "proxy:3128",
                creds("bob", "p@ss:w/rd"),
            ),
            (
                "http://carol@proxy:3128",
                ParentScheme::Http,
                "proxy:3128",
                creds("carol", ""),
            ),
        ];
        for (raw, scheme, label, credentials) in table {
            let p = ParentUrl::parse(raw).unwrap_or_else(|e| panic!("{raw}: {e}"));
            assert_eq!(p.scheme, *scheme, "{raw}");
            assert_eq!(&*p.label, *label, "{raw}");
            assert_eq!(&p.credentials, credentials, "{raw}");
        }
    }

    #[test]
    fn malformed_forms() {
        let table: &[(&str, &str)] = &[
            ("", "empty parent URL"),
            ("socks5://proxy:1080", "unsupported scheme \"socks5\""),
            ("proxy.example.org", "no port"),
            ("http://proxy.example.org", "no port"),
            ("http://proxy:0", "invalid port \"0\""),
            ("http://proxy:99999", "invalid port \"99999\""),
            ("http://proxy:80a", "invalid port \"80a\""),
            ("http://::1:3128", "no port"),
            ("http://proxy:3128/path", "no path"),
            ("http://proxy:3128?x=1", "no path"),
            ("http://pro xy:3128", "invalid host"),
            ("http://:secret@proxy:3128", "empty user name"),
            ("http://al%zzice:pw@proxy:3128", "percent-encoding"),
        ];
        for (raw, want) in table {
            let err = ParentUrl::parse(raw).expect_err(raw).to_string();
            assert!(err.contains(want), "{raw}: {err}");
        }
    }

    #[test]
    fn credentials_never_show() {
        let raw = "http://alice:hunter2@proxy:3128";
        let p = ParentUrl::parse(raw).unwrap();
        assert_eq!(format!("{p:?}"), "http://***@proxy:3128");
        assert_eq!(p.to_string(), "http://***@proxy:3128");
        assert_eq!(redact(raw), "http://***@proxy:3128");
        assert_eq!(redact("a:b@proxy:1"), "***@proxy:1");
        assert_eq!(redact("http://proxy:1"), "http://proxy:1");
        let err = ParentUrl::parse("http://alice:hunter2@proxy").unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
        let header = p.credentials.unwrap().basic_header().unwrap();
        assert!(header.is_sensitive());
        assert_eq!(header, "Basic YWxpY2U6aHVudGVyMg==");
    }

    #[test]
    fn credential_pairs() {
        assert_eq!(
            Credentials::parse_pair("svc:pa:ss\n").unwrap(),
            creds("svc", "pa:ss").unwrap()
        );
        assert!(Credentials::parse_pair("nocolon").is_err());
        assert!(Credentials::parse_pair(":pw").is_err());
        assert!(Credentials::parse_pair("a:b\nc:d").is_err());
    }
}
