//! `upstream.direct`: the destinations that bypass the parent proxies, with the NO_PROXY
//! semantics of curl and Python (the forms admins copy from their `no_proxy`).
//!
//! ```text
//! *                      every destination (parents are then never used)
//! example.org            example.org and every name below it (a.example.org, a.b.example.org)
//! .example.org           the same (curl/Python; Go would leave out example.org itself)
//! *.example.org          the same
//! example.org:8080       as above, only for port 8080
//! 10.0.0.0/8             literal IP destinations inside the range (not names resolving there)
//! 192.0.2.7, ::1         that literal IP; [::1]:8080 and 192.0.2.7:8080 with a port
//! ```
//! Names compare case-insensitively, without a trailing dot. Matching is on the host the
//! client asked for, never on what a name resolves to, as in the clients.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::acl::{Host, normalize_host};

/// The compiled bypass list, parsed while the configuration is read (each entry on its
/// own, so that an error names `upstream.direct[i]`). Serializes as written.
#[derive(Debug, Clone, Default)]
pub struct DirectList {
    all: bool,
    entries: Vec<DirectEntry>,
    /// The non-empty entries as configured (trimmed), for `check-config`.
    written: Vec<String>,
}

/// One entry as written: empty (skipped), `*`, or a pattern.
#[derive(Deserialize)]
#[serde(try_from = "String")]
enum DirectItem {
    Empty,
    All,
    Entry(String, DirectEntry),
}

#[derive(Debug, Clone)]
struct DirectEntry {
    pattern: Pattern,
    port: Option<u16>,
}

#[derive(Debug, Clone)]
enum Pattern {
    /// `name` matches itself; `dotted` (`.name`) is the suffix of every name below it.
    Domain {
        name: String,
        dotted: String,
    },
    Net(IpNet),
}

/// An entry of `upstream.direct` that does not parse; names the entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{entry:?}: {reason}")]
pub struct DirectEntryError {
    pub entry: String,
    pub reason: String,
}

// === impl DirectList ===

impl DirectList {
    /// Parse every entry; empty entries (an empty environment value) are skipped.
    /// On error, returns the index of the bad entry with the reason.
    pub fn parse(entries: &[String]) -> Result<DirectList, (usize, DirectEntryError)> {
        let items = entries
            .iter()
            .enumerate()
            .map(|(i, raw)| DirectItem::try_from(raw.clone()).map_err(|e| (i, e)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(DirectList::from_items(items))
    }

    fn from_items(items: Vec<DirectItem>) -> DirectList {
        let mut list = DirectList::default();
        for item in items {
            match item {
                DirectItem::Empty => {}
                DirectItem::All => {
                    list.all = true;
                    list.written.push("*".into());
                }
                DirectItem::Entry(written, entry) => {
                    list.entries.push(entry);
                    list.written.push(written);
                }
            }
        }
        list
    }

    pub fn is_empty(&self) -> bool {
        !self.all && self.entries.is_empty()
    }

    /// The number of non-empty entries configured.
    pub fn len(&self) -> usize {
        self.written.len()
    }

    /// Whether `host:port` goes direct.
    pub fn matches(&self, host: &Host, port: u16) -> bool {
        if self.all {
            return true;
        }
        self.entries.iter().any(|e| {
            e.port.is_none_or(|p| p == port)
                && match (&e.pattern, host) {
                    (Pattern::Domain { name, dotted }, Host::Name(h)) => {
                        h == name || h.ends_with(dotted.as_str())
                    }
                    (Pattern::Net(net), Host::Ip(ip)) => net.contains(&canonical(*ip)),
                    _ => false,
                }
        })
    }
}

impl<'de> Deserialize<'de> for DirectList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Vec::<DirectItem>::deserialize(d).map(DirectList::from_items)
    }
}

impl Serialize for DirectList {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.written.serialize(s)
    }
}

// === impl DirectItem ===

impl TryFrom<String> for DirectItem {
    type Error = DirectEntryError;

    fn try_from(raw: String) -> Result<Self, Self::Error> {
        let entry = raw.trim();
        match entry {
            "" => Ok(DirectItem::Empty),
            "*" => Ok(DirectItem::All),
            _ => parse_entry(entry)
                .map(|parsed| DirectItem::Entry(entry.to_owned(), parsed))
                .map_err(|reason| DirectEntryError {
                    entry: entry.to_owned(),
                    reason,
                }),
        }
    }
}

fn parse_entry(entry: &str) -> Result<DirectEntry, String> {
    if entry.contains('/') {
        let net: IpNet = entry
            .parse()
            .map_err(|_| "not a CIDR (write e.g. 10.0.0.0/8 or fd00::/8)".to_owned())?;
        return Ok(DirectEntry {
            pattern: Pattern::Net(net.trunc()),
            port: None,
        });
    }
    let (host, port) = split_port(entry)?;
    let host = host
        .strip_prefix("*.")
        .or_else(|| host.strip_prefix('.'))
        .unwrap_or(host);
    if host.contains('*') {
        return Err("'*' is allowed only alone or as a leading \"*.\"".into());
    }
    let pattern = match normalize_host(host).map_err(|e| e.to_string())? {
        Host::Ip(ip) => Pattern::Net(IpNet::from(canonical(ip))),
        Host::Name(name) => Pattern::Domain {
            dotted: format!(".{name}"),
            name,
        },
    };
    Ok(DirectEntry { pattern, port })
}

/// `host`, `host:port`, `[v6]`, `[v6]:port`, or a bare IPv6 literal (no port).
fn split_port(entry: &str) -> Result<(&str, Option<u16>), String> {
    let parse_port = |p: &str| match p.parse::<u16>() {
        Ok(n) if n != 0 => Ok(Some(n)),
        _ => Err(format!("invalid port {p:?}")),
    };
    if let Some(rest) = entry.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| "unclosed '[' in IPv6 literal".to_owned())?;
        return match after {
            "" => Ok((host, None)),
            _ => match after.strip_prefix(':') {
                Some(p) => Ok((host, parse_port(p)?)),
                None => Err("unexpected text after ']'".into()),
            },
        };
    }
    match entry.matches(':').count() {
        0 => Ok((entry, None)),
        1 => {
            let (host, port) = entry.split_once(':').unwrap_or((entry, ""));
            Ok((host, parse_port(port)?))
        }
        _ => Ok((entry, None)),
    }
}

/// IPv4-mapped IPv6 compares as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(entries: &[&str]) -> DirectList {
        DirectList::parse(&entries.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    fn host(s: &str) -> Host {
        normalize_host(s).unwrap()
    }

    #[test]
    fn no_proxy_semantics() {
        let l = list(&[
            "example.org",
            ".corp.test",
            "*.lab.test",
            "pinned.test:8080",
            "10.0.0.0/8",
            "192.0.2.7",
            "[2001:db8::1]:443",
            "fd00::5",
            "",
        ]);
        let table: &[(&str, u16, bool)] = &[
            ("example.org", 80, true),
            ("a.example.org", 443, true),
            ("a.b.example.org", 443, true),
            ("badexample.org", 80, false),
            ("example.org.evil.test", 80, false),
            ("corp.test", 80, true),
            ("x.corp.test", 80, true),
            ("lab.test", 443, true),
            ("x.lab.test", 443, true),
            ("pinned.test", 8080, true),
            ("pinned.test", 80, false),
            ("a.pinned.test", 8080, true),
            ("10.1.2.3", 80, true),
            ("11.1.2.3", 80, false),
            ("192.0.2.7", 443, true),
            ("192.0.2.8", 443, false),
            ("2001:db8::1", 443, true),
            ("2001:db8::1", 80, false),
            ("fd00::5", 1, true),
            ("::ffff:10.0.0.1", 80, true),
            ("other.test", 80, false),
        ];
        for (h, port, want) in table {
            assert_eq!(l.matches(&host(h), *port), *want, "{h}:{port}");
        }
        assert!(!l.is_empty());
        assert!(list(&["", " "]).is_empty());
        assert!(list(&["*"]).matches(&host("anything.test"), 1));
    }

    #[test]
    fn bad_entries_name_the_entry() {
        for (entry, want) in [
            ("10.0.0.0/33", "not a CIDR"),
            ("exa mple.org", "invalid character"),
            ("a*.example.org", "'*' is allowed only"),
            ("host:port", "invalid port"),
            ("[::1", "unclosed"),
        ] {
            let (i, e) = DirectList::parse(&["ok.test".into(), entry.into()]).unwrap_err();
            assert_eq!(i, 1);
            let msg = e.to_string();
            assert!(msg.contains(want) && msg.contains(entry), "{entry}: {msg}");
        }
    }
}
