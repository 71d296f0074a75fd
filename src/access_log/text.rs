//! Byte-level text helpers shared by the formats: numbers, addresses, UTC dates, escaping.
//! Written by hand because the formatter machinery costs several times more per line.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::time::{SystemTime, UNIX_EPOCH};

/// A UTC calendar time.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Civil {
    pub(super) year: u64,
    pub(super) month: u8,
    pub(super) day: u8,
    pub(super) hour: u8,
    pub(super) minute: u8,
    pub(super) second: u8,
}

pub(super) const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// Latest representable timestamp (9999-12-31T23:59:59Z); later times are clamped to it.
pub(super) const MAX_UNIX_SECS: u64 = 253_402_300_799;

// === impl Civil ===

impl Civil {
    /// Howard Hinnant's `civil_from_days`, for `secs` already clamped to 0..=[`MAX_UNIX_SECS`].
    pub(super) fn from_unix(secs: u64) -> Civil {
        let secs = secs.min(MAX_UNIX_SECS) as i64;
        let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        Civil {
            year: year.unsigned_abs(),
            month: month as u8,
            day: day as u8,
            hour: (rem / 3600) as u8,
            minute: (rem % 3600 / 60) as u8,
            second: (rem % 60) as u8,
        }
    }
}

/// `(seconds, microseconds)` since the Unix epoch, clamped to 1970..=9999.
pub(super) fn unix_parts(time: SystemTime) -> (u64, u32) {
    match time.duration_since(UNIX_EPOCH) {
        Ok(d) if d.as_secs() <= MAX_UNIX_SECS => (d.as_secs(), d.subsec_micros()),
        Ok(_) => (MAX_UNIX_SECS, 999_999),
        Err(_) => (0, 0),
    }
}

/// `22:13:20`.
pub(super) fn push_time_of_day(out: &mut Vec<u8>, c: &Civil) {
    push_padded(out, u64::from(c.hour), 2);
    out.push(b':');
    push_padded(out, u64::from(c.minute), 2);
    out.push(b':');
    push_padded(out, u64::from(c.second), 2);
}

/// `2023-11-14T22:13:20.123Z`.
pub(super) fn put_rfc3339_millis(out: &mut Vec<u8>, secs: u64, millis: u32) {
    let c = Civil::from_unix(secs);
    push_padded(out, c.year, 4);
    out.push(b'-');
    push_padded(out, u64::from(c.month), 2);
    out.push(b'-');
    push_padded(out, u64::from(c.day), 2);
    out.push(b'T');
    push_time_of_day(out, &c);
    out.push(b'.');
    push_padded(out, u64::from(millis), 3);
    out.push(b'Z');
}

pub(super) const HEX_LOWER: &[u8; 16] = b"0123456789abcdef";
pub(super) const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

/// Decimal digits of `n` (the formatter machinery costs several times more per line).
pub(super) fn push_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

pub(super) fn decimal_len(mut n: u64) -> usize {
    let mut len = 1;
    while n >= 10 {
        n /= 10;
        len += 1;
    }
    len
}

/// `n` zero-padded to at least `width` digits (`%03d`).
pub(super) fn push_padded(out: &mut Vec<u8>, n: u64, width: usize) {
    out.resize(out.len() + width.saturating_sub(decimal_len(n)), b'0');
    push_u64(out, n);
}

/// `n` space-padded to at least `width` characters (`%6ld`).
pub(super) fn push_right(out: &mut Vec<u8>, n: u64, width: usize) {
    out.resize(out.len() + width.saturating_sub(decimal_len(n)), b' ');
    push_u64(out, n);
}

/// An address without port; IPv4-mapped IPv6 shown as IPv4.
pub(super) fn push_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                push_u64(out, u64::from(octet));
            }
        }
        IpAddr::V6(v6) => put(out, format_args!("{v6}")),
    }
}

/// `"ip:port"` / `"[v6]:port"`, quoted for JSON (the text never needs escaping).
pub(super) fn push_quoted_socket(out: &mut Vec<u8>, addr: SocketAddr) {
    out.push(b'"');
    match (addr, addr.ip().to_canonical()) {
        (_, IpAddr::V4(v4)) => {
            push_ip(out, IpAddr::V4(v4));
            out.push(b':');
            push_u64(out, u64::from(addr.port()));
        }
        (SocketAddr::V6(v6), _) => put(out, format_args!("{v6}")),
        (SocketAddr::V4(v4), _) => put(out, format_args!("{v4}")),
    }
    out.push(b'"');
}

pub(super) fn version_str(version: http::Version) -> &'static str {
    match version {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_11 => "HTTP/1.1",
        http::Version::HTTP_2 => "HTTP/2.0",
        http::Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/1.1",
    }
}

/// Formatting into a `Vec<u8>` cannot fail.
pub(super) fn put(out: &mut Vec<u8>, args: std::fmt::Arguments<'_>) {
    let _ = out.write_fmt(args);
}

/// A space-separated field, `-` when empty. Bytes outside visible ASCII, `"` and `\` are
/// percent-encoded (`%` itself is kept: URLs use it and it cannot break a field).
pub(super) fn token(out: &mut Vec<u8>, bytes: &[u8]) {
    if bytes.is_empty() {
        out.push(b'-');
        return;
    }
    let plain = !bytes.iter().fold(false, |dirty, &b| {
        dirty | !(0x21..0x7f).contains(&b) | (b == b'"') | (b == b'\\')
    });
    if plain {
        out.extend_from_slice(bytes);
        return;
    }
    let mut run = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if matches!(b, 0x21..=0x7e) && b != b'"' && b != b'\\' {
            continue;
        }
        out.extend_from_slice(&bytes[run..i]);
        out.extend_from_slice(&[
            b'%',
            HEX_UPPER[usize::from(b >> 4)],
            HEX_UPPER[usize::from(b & 0xf)],
        ]);
        run = i + 1;
    }
    out.extend_from_slice(&bytes[run..]);
}
