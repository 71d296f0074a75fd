//! Request-target hosts: normalisation of names and of every numeric IPv4 spelling clients accept.

use std::borrow::Cow;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The host a client asked for, normalised by [`normalize_host`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    /// A DNS name: lowercase ASCII, no trailing dot, no percent-encoding, labels of `[a-z0-9_-]`.
    Name(String),
    /// A literal address, whatever spelling the client used for it.
    Ip(IpAddr),
}

/// Why a request-target host is not acceptable. Values are clipped to 100 characters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    #[error("empty host")]
    Empty,
    #[error("invalid percent-encoding in host {0:?}")]
    PercentEncoding(String),
    #[error("invalid character {ch:?} in host {host:?}")]
    InvalidChar { host: String, ch: char },
    #[error("empty label in host {0:?}")]
    EmptyLabel(String),
    #[error("label longer than 63 characters in host {0:?}")]
    LabelTooLong(String),
    #[error("host name of {0} characters is longer than 253")]
    NameTooLong(usize),
    #[error("invalid IPv4 address {0:?}")]
    InvalidIpv4(String),
    #[error("invalid IPv6 address {0:?}")]
    InvalidIpv6(String),
}

const MAX_NAME: usize = 253;
const MAX_LABEL: usize = 63;

/// Normalises the host part of a request target (CONNECT authority or URL host; the core has removed
/// userinfo, port and IPv6 brackets — brackets are tolerated anyway).
///
/// In order: decodes percent-encoding once (`%2e` is a dot; a `%` left after decoding is an error),
/// rejects anything but ASCII, lowercases, strips ONE trailing dot, then:
/// - a host containing `:` must be an IPv6 literal (zone ids such as `fe80::1%eth0` are rejected);
/// - a host whose last label is numeric (`2130706433`, `0x7f000001`, `0177.0.0.1`, `127.1`, `1.2.3.0x4`)
///   is an IPv4 address in the inet_aton / WHATWG URL sense: 1 to 4 parts, each decimal, `0x` hex or
///   `0`-prefixed octal, the last part filling the remaining bytes. If it does not parse, it is an error,
///   never a name (resolvers would disagree on what it means);
/// - anything else is a DNS name: labels of 1–63 characters from `[a-z0-9_-]`, at most 253 in all.
///   Non-ASCII names must arrive in their punycode form.
pub fn normalize_host(raw: &str) -> Result<Host, HostError> {
    let decoded = percent_decode(raw)?;
    let mut host: &str = &decoded;
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return parse_ipv6(inner);
    }
    if host.contains(':') {
        return parse_ipv6(host);
    }
    if let Some(stripped) = host.strip_suffix('.') {
        host = stripped;
    }
    if host.is_empty() {
        return Err(HostError::Empty);
    }
    if ends_in_number(host) {
        return parse_ipv4_numeric(host)
            .map(|a| Host::Ip(IpAddr::V4(a)))
            .ok_or_else(|| HostError::InvalidIpv4(clip(host)));
    }
    validate_name(host)?;
    Ok(Host::Name(host.to_owned()))
}

/// Parses every numeric IPv4 spelling accepted by `inet_aton` and the WHATWG URL parser: one to four
/// dot-separated parts, each decimal, hex (`0x`, digits optional) or octal (leading `0`); all parts
/// but the last are one byte, the last fills the remaining bytes (`127.1` is 127.0.0.1).
pub fn parse_ipv4_numeric(s: &str) -> Option<Ipv4Addr> {
    let mut parts = [0u64; 4];
    let mut count = 0;
    for part in s.split('.') {
        let slot = parts.get_mut(count)?;
        *slot = parse_ipv4_part(part)?;
        count += 1;
    }
    let (last, init) = parts[..count].split_last()?;
    if init.iter().any(|&p| p > 255) {
        return None;
    }
    let last_bits = 8 * (4 - init.len() as u32);
    if *last >= 1u64 << last_bits {
        return None;
    }
    let high = init
        .iter()
        .enumerate()
        .fold(0u64, |acc, (i, &p)| acc | (p << (24 - 8 * i as u32)));
    u32::try_from(high | last).ok().map(Ipv4Addr::from)
}

/// One part of a numeric IPv4 spelling, bounded to 32 bits.
fn parse_ipv4_part(part: &str) -> Option<u64> {
    let (digits, radix) =
        if let Some(hex) = part.strip_prefix("0x").or_else(|| part.strip_prefix("0X")) {
            (hex, 16)
        } else if part.len() > 1 && part.starts_with('0') {
            (&part[1..], 8)
        } else {
            (part, 10)
        };
    if digits.is_empty() {
        // "0x" is 0 for the URL parser; a bare empty part ("1..2") is not a number.
        return (radix == 16).then_some(0);
    }
    let mut value: u64 = 0;
    for c in digits.chars() {
        let d = u64::from(c.to_digit(radix)?);
        value = value.checked_mul(u64::from(radix))?.checked_add(d)?;
        if value > u64::from(u32::MAX) {
            return None;
        }
    }
    Some(value)
}

/// The WHATWG "ends in a number" test: is the last label all digits, or `0x` and hex digits?
fn ends_in_number(host: &str) -> bool {
    let last = host.rsplit('.').next().unwrap_or(host);
    if !last.is_empty() && last.bytes().all(|b| b.is_ascii_digit()) {
        return true;
    }
    last.strip_prefix("0x")
        .is_some_and(|hex| hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn parse_ipv6(s: &str) -> Result<Host, HostError> {
    s.parse::<Ipv6Addr>()
        .map(|a| Host::Ip(IpAddr::V6(a)))
        .map_err(|_| HostError::InvalidIpv6(clip(s)))
}

/// Checks DNS-name syntax; `host` is already lowercase ASCII without a trailing dot.
pub(crate) fn validate_name(host: &str) -> Result<(), HostError> {
    if host.len() > MAX_NAME {
        return Err(HostError::NameTooLong(host.len()));
    }
    for label in host.split('.') {
        validate_label(label, host)?;
    }
    Ok(())
}

pub(crate) fn validate_label(label: &str, host: &str) -> Result<(), HostError> {
    if label.is_empty() {
        return Err(HostError::EmptyLabel(clip(host)));
    }
    if label.len() > MAX_LABEL {
        return Err(HostError::LabelTooLong(clip(host)));
    }
    if let Some(ch) = label
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-' || *c == '_'))
    {
        return Err(HostError::InvalidChar {
            host: clip(host),
            ch,
        });
    }
    Ok(())
}

/// Decodes `%XX` escapes once, requires ASCII, and lowercases.
fn percent_decode(raw: &str) -> Result<Cow<'_, str>, HostError> {
    // Nearly every host is already plain lower-case ASCII: nothing to decode or copy.
    if raw
        .bytes()
        .all(|b| b.is_ascii() && b != b'%' && !b.is_ascii_uppercase())
    {
        return Ok(Cow::Borrowed(raw));
    }
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            // Exactly two hex digits (from_str_radix alone would take a sign).
            let hex = bytes
                .get(i + 1..i + 3)
                .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| HostError::PercentEncoding(clip(raw)))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    if let Some(&bad) = out.iter().find(|b| !b.is_ascii()) {
        let ch = std::str::from_utf8(&out)
            .ok()
            .and_then(|s| s.chars().find(|c| !c.is_ascii()))
            .unwrap_or(char::from(bad));
        return Err(HostError::InvalidChar {
            host: clip(raw),
            ch,
        });
    }
    out.make_ascii_lowercase();
    // All bytes are ASCII here, so this cannot fail.
    String::from_utf8(out)
        .map(Cow::Owned)
        .map_err(|_| HostError::PercentEncoding(clip(raw)))
}

/// Clips a client-supplied value for error messages and logs.
pub(crate) fn clip(s: &str) -> String {
    const MAX: usize = 100;
    match s.char_indices().nth(MAX) {
        Some((at, _)) => format!("{}…", &s[..at]),
        None => s.to_owned(),
    }
}

// === impl Host ===

impl Host {
    pub fn as_name(&self) -> Option<&str> {
        match self {
            Host::Name(n) => Some(n),
            Host::Ip(_) => None,
        }
    }

    pub fn ip(&self) -> Option<IpAddr> {
        match self {
            Host::Name(_) => None,
            Host::Ip(ip) => Some(*ip),
        }
    }
}

/// Names as they are, addresses in their canonical text form (IPv6 without brackets).
impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(n) => f.write_str(n),
            Host::Ip(ip) => ip.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(s: &str) -> Host {
        Host::Ip(s.parse().expect("test address"))
    }

    fn name(s: &str) -> Host {
        Host::Name(s.to_owned())
    }

    #[test]
    fn every_numeric_ipv4_spelling_is_an_address() {
        let cases = [
            ("127.0.0.1", "127.0.0.1"),
            ("2130706433", "127.0.0.1"),
            ("0x7f000001", "127.0.0.1"),
            ("0X7F000001", "127.0.0.1"),
            ("0x7F000001", "127.0.0.1"),
            ("017700000001", "127.0.0.1"),
            ("0177.0.0.1", "127.0.0.1"),
            ("0177.0000.0000.0001", "127.0.0.1"),
            ("0x7f.0x0.0x0.0x1", "127.0.0.1"),
            ("0x7f.1", "127.0.0.1"),
            ("127.1", "127.0.0.1"),
            ("127.0.1", "127.0.0.1"),
            ("127.0x0.1", "127.0.0.1"),
            ("0177.1", "127.0.0.1"),
            ("127.0.0.1.", "127.0.0.1"),
            ("0x7f000001.", "127.0.0.1"),
            ("0", "0.0.0.0"),
            ("0x", "0.0.0.0"),
            ("0.0x.0.0", "0.0.0.0"),
            ("4294967295", "255.255.255.255"),
            ("0xffffffff", "255.255.255.255"),
            ("037777777777", "255.255.255.255"),
            ("169.254.43518", "169.254.169.254"),
            ("169.16689662", "169.254.169.254"),
            ("0xa9fea9fe", "169.254.169.254"),
            ("10.0.0.1", "10.0.0.1"),
            ("012.0.0.1", "10.0.0.1"),
            ("0x0000000000000a000001", "10.0.0.1"),
            ("1.2.3.4", "1.2.3.4"),
            ("%31%32%37.0.0.1", "127.0.0.1"),
            ("127%2e0%2e0%2e1", "127.0.0.1"),
            ("127%2E1", "127.0.0.1"),
        ];
        for (raw, want) in cases {
            assert_eq!(normalize_host(raw), Ok(v4(want)), "{raw}");
        }
    }

    #[test]
    fn numeric_hosts_that_do_not_parse_are_errors_not_names() {
        let cases = [
            "4294967296",
            "0x100000000",
            "040000000000",
            "256.0.0.1",
            "1.256.0.1",
            "1.2.256.1",
            "1.2.3.256",
            "1.2.65536",
            "1.16777216",
            "1.2.3.4.5",
            "08.0.0.1",
            "0x7g.0.0.1",
            "1..2",
            ".1.2.3",
            "foo.1",
            "example.0x10",
            "99999999999999999999999",
            "1.2.3.4..",
        ];
        for raw in cases {
            let got = normalize_host(raw);
            assert!(
                matches!(
                    got,
                    Err(HostError::InvalidIpv4(_)) | Err(HostError::EmptyLabel(_))
                ),
                "{raw}: {got:?}"
            );
        }
    }

    #[test]
    fn ipv6_literals() {
        let cases = [
            ("::1", "::1"),
            ("[::1]", "::1"),
            ("::FFFF:127.0.0.1", "::ffff:127.0.0.1"),
            ("::ffff:7f00:1", "::ffff:127.0.0.1"),
            ("64:ff9b::7f00:1", "64:ff9b::7f00:1"),
            ("0:0:0:0:0:0:0:1", "::1"),
            ("FE80::1", "fe80::1"),
            ("%3a%3a1", "::1"),
        ];
        for (raw, want) in cases {
            let want = Host::Ip(want.parse().expect("test address"));
            assert_eq!(normalize_host(raw), Ok(want), "{raw}");
        }
        for raw in [
            "fe80::1%eth0",
            "fe80::1%25eth0",
            "::1::",
            "[::1",
            "1:2:3:4:5:6:7:8:9",
            ":",
        ] {
            assert!(normalize_host(raw).is_err(), "{raw}");
        }
    }

    #[test]
    fn names_are_lowercased_decoded_and_lose_one_trailing_dot() {
        let cases = [
            ("example.com", "example.com"),
            ("Example.COM", "example.com"),
            ("example.com.", "example.com"),
            ("EXAMPLE.com.", "example.com"),
            ("ex%61mple.com", "example.com"),
            ("%45xample%2ecom", "example.com"),
            ("%45xample%2Ecom%2E", "example.com"),
            ("localhost", "localhost"),
            ("_acme-challenge.example.com", "_acme-challenge.example.com"),
            ("a-b.c", "a-b.c"),
            ("1e100.net", "1e100.net"),
            ("123.example", "123.example"),
            ("0x7f000001.example", "0x7f000001.example"),
        ];
        for (raw, want) in cases {
            assert_eq!(normalize_host(raw), Ok(name(want)), "{raw}");
        }
    }

    #[test]
    fn invalid_names() {
        let long_label = "a".repeat(64);
        let ok_label = "a".repeat(63);
        let too_long = [ok_label.as_str(); 4].join(".");
        let max_len = format!("{}.{}", [ok_label.as_str(); 3].join("."), "a".repeat(61));
        assert_eq!(max_len.len(), 253);
        assert!(normalize_host(&max_len).is_ok());
        assert!(normalize_host(&format!("{max_len}.")).is_ok());
        let cases: Vec<(&str, HostError)> = vec![
            ("", HostError::Empty),
            (".", HostError::Empty),
            (
                "example.com..",
                HostError::EmptyLabel("example.com.".into()),
            ),
            (".example.com", HostError::EmptyLabel(".example.com".into())),
            ("a..b", HostError::EmptyLabel("a..b".into())),
            (&long_label, HostError::LabelTooLong(clip(&long_label))),
            (&too_long, HostError::NameTooLong(255)),
            (
                "exa mple.com",
                HostError::InvalidChar {
                    host: "exa mple.com".into(),
                    ch: ' ',
                },
            ),
            (
                "example.com%00",
                HostError::InvalidChar {
                    host: "example.com\0".into(),
                    ch: '\0',
                },
            ),
            (
                "exa%2fmple",
                HostError::InvalidChar {
                    host: "exa/mple".into(),
                    ch: '/',
                },
            ),
            (
                "*.example.com",
                HostError::InvalidChar {
                    host: "*.example.com".into(),
                    ch: '*',
                },
            ),
            (
                "user@example.com",
                HostError::InvalidChar {
                    host: "user@example.com".into(),
                    ch: '@',
                },
            ),
            (
                "exämple.com",
                HostError::InvalidChar {
                    host: "exämple.com".into(),
                    ch: 'ä',
                },
            ),
            (
                "ex%C3%A4mple.com",
                HostError::InvalidChar {
                    host: "ex%C3%A4mple.com".into(),
                    ch: 'ä',
                },
            ),
            (
                "ex%ff",
                HostError::InvalidChar {
                    host: "ex%ff".into(),
                    ch: 'ÿ',
                },
            ),
            ("ex%2", HostError::PercentEncoding("ex%2".into())),
            ("ex%zz", HostError::PercentEncoding("ex%zz".into())),
            ("ex%+1", HostError::PercentEncoding("ex%+1".into())),
            ("%", HostError::PercentEncoding("%".into())),
            (
                "%252e",
                HostError::InvalidChar {
                    host: "%2e".into(),
                    ch: '%',
                },
            ),
        ];
        for (raw, want) in cases {
            assert_eq!(normalize_host(raw), Err(want), "{raw:?}");
        }
    }

    #[test]
    fn error_values_are_clipped() {
        let raw = format!("{}!", "a".repeat(500));
        let msg = normalize_host(&raw).expect_err("invalid").to_string();
        assert!(msg.len() < 200, "{msg}");
    }

    #[test]
    fn display() {
        assert_eq!(name("example.com").to_string(), "example.com");
        assert_eq!(v4("10.0.0.1").to_string(), "10.0.0.1");
        assert_eq!(
            normalize_host("[::1]").map(|h| h.to_string()),
            Ok("::1".into())
        );
    }
}
