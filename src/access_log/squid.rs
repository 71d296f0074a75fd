//! The `squid` format: exactly Squid's native `logformat squid`.

use super::text::*;
use super::{AccessRecord, Hop};
use crate::acl::Verdict;
use crate::cache::Outcome;

/// `%ts.%03tu %6tr %>a %Ss/%03>Hs %<st %rm %ru %[un %Sh/%<a %mt`, as Squid's
/// `Log::Format::SquidNative` prints it (`"%9ld.%03d %6ld %s %s/%03d %lld %s %s %s %s/%s %s"`).
/// Like Squid, the timestamp is when the transaction ended, not when it started.
///
/// ```text
/// 1700000000.123    245 127.0.0.1 TCP_MISS/200 1234 GET http://example.com/ - HIER_DIRECT/93.184.216.34 text/html
/// ```
///
/// The user-name field carries the client pod (`namespace/name`) when the live index knows it.
pub(super) fn write_squid(rec: &AccessRecord, out: &mut Vec<u8>) {
    let end = rec.time.checked_add(rec.duration).unwrap_or(rec.time);
    let (secs, micros) = unix_parts(end);
    push_right(out, secs, 9);
    out.push(b'.');
    push_padded(out, u64::from(micros / 1000), 3);
    out.push(b' ');
    push_right(
        out,
        u64::try_from(rec.duration.as_millis()).unwrap_or(u64::MAX),
        6,
    );
    out.push(b' ');
    push_ip(out, rec.client.ip());
    out.push(b' ');
    out.extend_from_slice(squid_code(rec).as_bytes());
    out.push(b'/');
    push_padded(out, u64::from(rec.status), 3);
    out.push(b' ');
    push_u64(out, rec.bytes_to_client);
    out.push(b' ');
    token(out, rec.method.as_str().as_bytes());
    out.push(b' ');
    token(out, rec.target.as_bytes());
    // `%[un`, the user name: the client pod (`namespace/name`) when known.
    out.push(b' ');
    token(out, rec.user().as_bytes());
    out.push(b' ');
    squid_hierarchy(rec, out);
    out.push(b' ');
    // Squid logs the media type only: the value up to the first ';', tab or space.
    let media_type = rec.content_type.as_ref().map(|ct| {
        let bytes = ct.as_bytes();
        let end = bytes
            .iter()
            .position(|b| matches!(b, b';' | b' ' | b'\t'))
            .unwrap_or(bytes.len());
        &bytes[..end]
    });
    token(out, media_type.unwrap_or_default());
}

/// Squid's result code (`%Ss`).
fn squid_code(rec: &AccessRecord) -> &'static str {
    if rec.verdict == Some(Verdict::Deny) {
        return "TCP_DENIED";
    }
    if rec.method == http::Method::CONNECT {
        return if rec.resolved.is_some() || rec.status == 200 {
            "TCP_TUNNEL"
        } else {
            "NONE_NONE"
        };
    }
    match rec.cache {
        Some(Outcome::Hit) => return "TCP_HIT",
        Some(Outcome::Revalidated) => return "TCP_REFRESH_UNMODIFIED",
        Some(Outcome::Stale) => return "TCP_REFRESH_FAIL_OLD",
        _ => {}
    }
    if rec.resolved.is_none() && rec.verdict.is_none() {
        // refused before any policy decision (malformed request and the like)
        "NONE_NONE"
    } else {
        "TCP_MISS"
    }
}

/// Squid's hierarchy code and peer (`%Sh/%<a`): `HIER_DIRECT/ip`, `FIRSTUP_PARENT/peer`,
/// or `HIER_NONE/-` when nothing was forwarded.
fn squid_hierarchy(rec: &AccessRecord, out: &mut Vec<u8>) {
    let forwarded = rec.verdict != Some(Verdict::Deny)
        && rec.cache != Some(Outcome::Hit)
        && (rec.resolved.is_some() || rec.verdict.is_some());
    if let (true, Hop::Parent(parent)) = (forwarded, &rec.route) {
        out.extend_from_slice(b"FIRSTUP_PARENT/");
        // Squid prints the peer's address when connected; the configured host otherwise.
        match rec.resolved {
            Some(addr) => push_ip(out, addr.ip()),
            None => token(out, route_host(parent).as_bytes()),
        }
    } else if let (true, Some(addr)) = (forwarded, rec.resolved) {
        out.extend_from_slice(b"HIER_DIRECT/");
        push_ip(out, addr.ip());
    } else {
        out.extend_from_slice(b"HIER_NONE/-");
    }
}

/// `host` of `host:port` / `[v6]:port`.
fn route_host(route: &str) -> &str {
    let host = match route.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !host.is_empty() => host,
        _ => route,
    };
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}
