//! The SSRF guard: classifies every destination address against the denied and allowed ranges.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

use super::prefix::PrefixMap;

/// The default `destinations.denied_cidrs`: every range that is not the public internet.
pub const DEFAULT_DENIED_CIDRS: &[&str] = &[
    "0.0.0.0/8",      // "this network"
    "10.0.0.0/8",     // RFC 1918
    "100.64.0.0/10",  // carrier-grade NAT
    "127.0.0.0/8",    // loopback
    "169.254.0.0/16", // link-local, cloud metadata (169.254.169.254)
    "172.16.0.0/12",  // RFC 1918
    "192.0.0.0/24",   // IETF protocol assignments
    "192.168.0.0/16", // RFC 1918
    "198.18.0.0/15",  // benchmarking
    "224.0.0.0/4",    // multicast
    "240.0.0.0/4",    // reserved, broadcast
    "::/128",         // unspecified
    "::1/128",        // loopback
    "fc00::/7",       // unique local
    "fe80::/10",      // link-local
    "ff00::/8",       // multicast
];

/// An address the proxy refuses to connect to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct AddressDenied {
    /// The address as it was checked (before normalisation).
    pub addr: IpAddr,
    /// The denied range that contains it (or the IPv4 address embedded in it).
    pub range: IpNet,
}

/// Which list decided about an address (for `explain`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mark {
    /// `destinations.denied_cidrs`.
    Denied,
    /// `destinations.cluster_cidrs`.
    Cluster,
    /// `destinations.allowed_cidrs`.
    Allowed,
}

/// Per-rule `allow_cidrs`.
pub(crate) type AllowList = PrefixMap<()>;

/// The compiled destination lists. The most specific matching prefix decides; at equal length an
/// allow beats a deny (it names exactly that range).
#[derive(Debug, Clone, Default)]
pub(crate) struct AddressTable {
    marks: PrefixMap<Mark>,
}

/// How one address fared, for `explain`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Classified {
    /// In no listed range: public.
    Public,
    /// Opened by `destinations.allowed_cidrs` or by the rule's `allow_cidrs`.
    Opened {
        range: IpNet,
        by_rule: bool,
    },
    Denied {
        denied: AddressDenied,
        mark: Mark,
    },
}

/// The IPv4 address embedded in an IPv6 address that some network path would turn back into IPv4:
/// IPv4-mapped `::ffff:a.b.c.d`, IPv4-compatible `::a.b.c.d` (deprecated; includes `::` and `::1`),
/// IPv4-translated `::ffff:0:a.b.c.d` (SIIT) and the NAT64 well-known prefix `64:ff9b::/96`.
pub fn embedded_ipv4(addr: Ipv6Addr) -> Option<Ipv4Addr> {
    let low = Ipv4Addr::from((u128::from(addr) & 0xffff_ffff) as u32);
    match addr.segments() {
        [0, 0, 0, 0, 0, 0xffff, _, _]
        | [0, 0, 0, 0, 0, 0, _, _]
        | [0, 0, 0, 0, 0xffff, 0, _, _]
        | [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Some(low),
        _ => None,
    }
}

/// The address a destination really is: the embedded IPv4 address of a mapped, compatible, translated
/// or NAT64 IPv6 address; `::` and `::1` stay IPv6; everything else is unchanged.
pub fn normalize_addr(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(a) if !a.is_unspecified() && !a.is_loopback() => {
            embedded_ipv4(a).map_or(addr, IpAddr::V4)
        }
        _ => addr,
    }
}

/// The forms an address is checked under: itself, and its embedded IPv4 address if any.
fn interpretations(addr: IpAddr) -> [Option<IpAddr>; 2] {
    let embedded = match addr {
        IpAddr::V6(a) => embedded_ipv4(a).map(IpAddr::V4),
        IpAddr::V4(_) => None,
    };
    [Some(addr), embedded]
}

// === impl AddressTable ===

impl AddressTable {
    /// `denied` and `cluster` deny, `allowed` opens; cidrs must already be validated.
    pub(crate) fn new(denied: &[IpNet], cluster: &[IpNet], allowed: &[IpNet]) -> Self {
        let mut marks = PrefixMap::new();
        for net in denied {
            marks.insert(*net, Mark::Denied);
        }
        for net in cluster {
            marks.insert(*net, Mark::Cluster);
        }
        for net in allowed {
            marks.insert(*net, Mark::Allowed);
        }
        Self { marks }
    }

    /// Denies `addr` if it, or the IPv4 address it embeds, falls in a denied range that no more (or
    /// equally) specific explicit allow opens.
    pub(crate) fn check(
        &self,
        addr: IpAddr,
        rule_allows: Option<&AllowList>,
    ) -> Result<(), AddressDenied> {
        match self.classify(addr, rule_allows) {
            Classified::Denied { denied, .. } => Err(denied),
            Classified::Public | Classified::Opened { .. } => Ok(()),
        }
    }

    pub(crate) fn classify(&self, addr: IpAddr, rule_allows: Option<&AllowList>) -> Classified {
        let mut result = Classified::Public;
        for form in interpretations(addr).into_iter().flatten() {
            match self.marks.longest(form) {
                None => {}
                Some((range, Mark::Allowed)) => {
                    result = Classified::Opened {
                        range,
                        by_rule: false,
                    }
                }
                Some((range, &mark)) => {
                    let opened = rule_allows
                        .and_then(|allows| allows.longest(form))
                        .filter(|(open, _)| open.prefix_len() >= range.prefix_len());
                    match opened {
                        Some((open, _)) => {
                            result = Classified::Opened {
                                range: open,
                                by_rule: true,
                            }
                        }
                        None => {
                            return Classified::Denied {
                                denied: AddressDenied { addr, range },
                                mark,
                            };
                        }
                    }
                }
            }
        }
        result
    }
}

// === impl AddressDenied ===

impl fmt::Display for AddressDenied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.addr)?;
        if let (IpAddr::V6(a), IpNet::V4(_)) = (self.addr, self.range)
            && let Some(v4) = embedded_ipv4(a)
        {
            write!(f, " (IPv4 {v4})")?;
        }
        write!(
            f,
            " is in the internal range {}, which this proxy does not connect to; \
             in-cluster destinations belong in the client's NO_PROXY",
            self.range
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    fn net(s: &str) -> IpNet {
        s.parse().expect("test prefix")
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| net(s)).collect()
    }

    fn default_table() -> AddressTable {
        AddressTable::new(&nets(DEFAULT_DENIED_CIDRS), &[], &[])
    }

    /// `None`: allowed; `Some(range)`: denied by that range.
    fn check(table: &AddressTable, addr: &str, allows: Option<&AllowList>) -> Option<IpNet> {
        table.check(ip(addr), allows).err().map(|d| {
            assert_eq!(d.addr, ip(addr));
            d.range
        })
    }

    #[test]
    fn default_list_parses_completely() {
        assert_eq!(nets(DEFAULT_DENIED_CIDRS).len(), 16);
        for n in nets(DEFAULT_DENIED_CIDRS) {
            assert_eq!(n, n.trunc(), "{n} has host bits");
        }
    }

    #[test]
    fn boundaries_of_every_default_range() {
        let table = default_table();
        // (address, denied by) — first, last and just outside of every range.
        let cases: &[(&str, Option<&str>)] = &[
            ("0.0.0.0", Some("0.0.0.0/8")),
            ("0.255.255.255", Some("0.0.0.0/8")),
            ("1.0.0.0", None),
            ("9.255.255.255", None),
            ("10.0.0.0", Some("10.0.0.0/8")),
            ("10.255.255.255", Some("10.0.0.0/8")),
            ("11.0.0.0", None),
            ("100.63.255.255", None),
            ("100.64.0.0", Some("100.64.0.0/10")),
            ("100.127.255.255", Some("100.64.0.0/10")),
            ("100.128.0.0", None),
            ("126.255.255.255", None),
            ("127.0.0.0", Some("127.0.0.0/8")),
            ("127.0.0.1", Some("127.0.0.0/8")),
            ("127.255.255.255", Some("127.0.0.0/8")),
            ("128.0.0.0", None),
            ("169.253.255.255", None),
            ("169.254.0.0", Some("169.254.0.0/16")),
            ("169.254.169.254", Some("169.254.0.0/16")),
            ("169.254.255.255", Some("169.254.0.0/16")),
            ("169.255.0.0", None),
            ("172.15.255.255", None),
            ("172.16.0.0", Some("172.16.0.0/12")),
            ("172.31.255.255", Some("172.16.0.0/12")),
            ("172.32.0.0", None),
            ("191.255.255.255", None),
            ("192.0.0.0", Some("192.0.0.0/24")),
            ("192.0.0.255", Some("192.0.0.0/24")),
            ("192.0.1.0", None),
            ("192.167.255.255", None),
            ("192.168.0.0", Some("192.168.0.0/16")),
            ("192.168.255.255", Some("192.168.0.0/16")),
            ("192.169.0.0", None),
            ("198.17.255.255", None),
            ("198.18.0.0", Some("198.18.0.0/15")),
            ("198.19.255.255", Some("198.18.0.0/15")),
            ("198.20.0.0", None),
            ("223.255.255.255", None),
            ("224.0.0.0", Some("224.0.0.0/4")),
            ("239.255.255.255", Some("224.0.0.0/4")),
            ("240.0.0.0", Some("240.0.0.0/4")),
            ("255.255.255.255", Some("240.0.0.0/4")),
            ("8.8.8.8", None),
            ("::", Some("::/128")),
            ("::1", Some("::1/128")),
            // ::2 is IPv4-compatible 0.0.0.2.
            ("::2", Some("0.0.0.0/8")),
            ("fbff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", None),
            ("fc00::", Some("fc00::/7")),
            ("fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", Some("fc00::/7")),
            ("fe00::", None),
            ("fe7f:ffff:ffff:ffff:ffff:ffff:ffff:ffff", None),
            ("fe80::", Some("fe80::/10")),
            ("febf:ffff:ffff:ffff:ffff:ffff:ffff:ffff", Some("fe80::/10")),
            ("fec0::", None),
            ("feff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", None),
            ("ff00::", Some("ff00::/8")),
            ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", Some("ff00::/8")),
            ("2001:4860:4860::8888", None),
        ];
        for (addr, want) in cases {
            assert_eq!(check(&table, addr, None), want.map(net), "{addr}");
        }
    }

    #[test]
    fn ipv6_forms_embedding_ipv4_are_checked_as_ipv4() {
        let table = default_table();
        let cases: &[(&str, Option<&str>)] = &[
            ("::ffff:127.0.0.1", Some("127.0.0.0/8")),
            ("::ffff:7f00:1", Some("127.0.0.0/8")),
            ("::ffff:169.254.169.254", Some("169.254.0.0/16")),
            ("::ffff:10.0.0.1", Some("10.0.0.0/8")),
            ("::ffff:8.8.8.8", None),
            ("::127.0.0.1", Some("127.0.0.0/8")),
            ("::10.0.0.1", Some("10.0.0.0/8")),
            ("::8.8.8.8", None),
            ("::ffff:0:127.0.0.1", Some("127.0.0.0/8")),
            ("64:ff9b::127.0.0.1", Some("127.0.0.0/8")),
            ("64:ff9b::7f00:1", Some("127.0.0.0/8")),
            ("64:ff9b::a9fe:a9fe", Some("169.254.0.0/16")),
            ("64:ff9b::192.168.1.1", Some("192.168.0.0/16")),
            ("64:ff9b::8.8.8.8", None),
            ("64:ff9b:0:0:0:1:7f00:1", None),
        ];
        for (addr, want) in cases {
            assert_eq!(check(&table, addr, None), want.map(net), "{addr}");
        }
    }

    #[test]
    fn normalize_addr_unwraps_embedded_ipv4_but_keeps_v6_loopback() {
        let cases = [
            ("::ffff:1.2.3.4", "1.2.3.4"),
            ("::1.2.3.4", "1.2.3.4"),
            ("64:ff9b::1.2.3.4", "1.2.3.4"),
            ("::ffff:0:1.2.3.4", "1.2.3.4"),
            ("::1", "::1"),
            ("::", "::"),
            ("2001:db8::1", "2001:db8::1"),
            ("1.2.3.4", "1.2.3.4"),
        ];
        for (addr, want) in cases {
            assert_eq!(normalize_addr(ip(addr)), ip(want), "{addr}");
        }
    }

    #[test]
    fn explicit_allows_open_exactly_what_they_name() {
        let table = AddressTable::new(
            &nets(DEFAULT_DENIED_CIDRS),
            &nets(&["10.96.0.0/12", "10.244.0.0/16"]),
            &nets(&[
                "169.254.169.254/32",
                "10.0.0.0/8",
                "0.0.0.0/0",
                "fd00:1::/64",
            ]),
        );
        let rule: AllowList = [(net("10.96.5.0/24"), ()), (net("127.0.0.0/8"), ())]
            .into_iter()
            .collect();
        let cases: &[(&str, Option<&AllowList>, Option<&str>)] = &[
            ("169.254.169.254", None, None),
            ("169.254.169.253", None, Some("169.254.0.0/16")),
            ("169.254.169.255", None, Some("169.254.0.0/16")),
            ("::ffff:169.254.169.254", None, None),
            ("10.1.2.3", None, None),
            ("10.96.0.0", None, Some("10.96.0.0/12")),
            ("10.111.255.255", None, Some("10.96.0.0/12")),
            ("10.112.0.0", None, None),
            ("10.244.1.1", None, Some("10.244.0.0/16")),
            ("127.0.0.1", None, Some("127.0.0.0/8")),
            ("192.168.1.1", None, Some("192.168.0.0/16")),
            ("fd00:1::5", None, None),
            ("fd00:2::5", None, Some("fc00::/7")),
            // The rule's allow_cidrs: more specific than the cluster range, equal to loopback's.
            ("10.96.5.7", Some(&rule), None),
            ("10.96.6.7", Some(&rule), Some("10.96.0.0/12")),
            ("127.0.0.1", Some(&rule), None),
            ("::ffff:127.0.0.1", Some(&rule), None),
            ("::1", Some(&rule), Some("::1/128")),
        ];
        for (addr, allows, want) in cases {
            assert_eq!(check(&table, addr, *allows), want.map(net), "{addr}");
        }
    }

    #[test]
    fn denial_message_names_address_range_and_no_proxy() {
        let d = AddressDenied {
            addr: ip("10.1.2.3"),
            range: net("10.0.0.0/8"),
        };
        let msg = d.to_string();
        assert!(
            msg.contains("10.1.2.3") && msg.contains("10.0.0.0/8") && msg.contains("NO_PROXY"),
            "{msg}"
        );
        let d = AddressDenied {
            addr: ip("64:ff9b::7f00:1"),
            range: net("127.0.0.0/8"),
        };
        assert!(
            d.to_string()
                .starts_with("64:ff9b::7f00:1 (IPv4 127.0.0.1) is in"),
            "{d}"
        );
    }
}
