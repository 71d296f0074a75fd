//! The `combined` format: Apache/NCSA combined, UTC.

use super::AccessRecord;
use super::text::*;

/// `%h %l %u %t "%r" %>s %b "%{Referer}i" "%{User-Agent}i"`, time = request start, UTC:
///
/// ```text
/// 127.0.0.1 - - [10/Oct/2000:13:55:36 +0000] "GET http://example.com/ HTTP/1.1" 200 2326 "-" "curl/8.5.0"
/// ```
pub(super) fn write_combined(rec: &AccessRecord, out: &mut Vec<u8>) {
    let (secs, _) = unix_parts(rec.time);
    let c = Civil::from_unix(secs);
    push_ip(out, rec.client.ip());
    // `%l %u`: no ident; the user is the client pod (`namespace/name`) when known.
    out.extend_from_slice(b" - ");
    token(out, rec.user().as_bytes());
    out.extend_from_slice(b" [");
    push_padded(out, u64::from(c.day), 2);
    out.push(b'/');
    out.extend_from_slice(MONTHS[usize::from(c.month - 1)].as_bytes());
    out.push(b'/');
    push_padded(out, c.year, 4);
    out.push(b':');
    push_time_of_day(out, &c);
    out.extend_from_slice(b" +0000] \"");
    token(out, rec.method.as_str().as_bytes());
    out.push(b' ');
    token(out, rec.target.as_bytes());
    out.push(b' ');
    out.extend_from_slice(version_str(rec.http_version).as_bytes());
    out.extend_from_slice(b"\" ");
    push_u64(out, u64::from(rec.status));
    out.push(b' ');
    if rec.bytes_to_client == 0 {
        out.push(b'-');
    } else {
        push_u64(out, rec.bytes_to_client);
    }
    out.push(b' ');
    quoted(out, rec.referer.as_ref().map(|v| v.as_bytes()));
    out.push(b' ');
    quoted(out, rec.user_agent.as_ref().map(|v| v.as_bytes()));
}

/// A quoted field escaped as Apache's `ap_escape_logitem` does: `\"`, `\\`, and `\xhh` for
/// control and non-ASCII bytes; `"-"` when absent.
fn quoted(out: &mut Vec<u8>, value: Option<&[u8]>) {
    out.push(b'"');
    match value {
        None => out.push(b'-'),
        Some(bytes) => {
            let mut run = 0;
            for (i, &b) in bytes.iter().enumerate() {
                let escape: &[u8] = match b {
                    b'"' => b"\\\"",
                    b'\\' => b"\\\\",
                    0x20..=0x7e => continue,
                    _ => &[
                        b'\\',
                        b'x',
                        HEX_LOWER[usize::from(b >> 4)],
                        HEX_LOWER[usize::from(b & 0xf)],
                    ],
                };
                out.extend_from_slice(&bytes[run..i]);
                out.extend_from_slice(escape);
                run = i + 1;
            }
            out.extend_from_slice(&bytes[run..]);
        }
    }
    out.push(b'"');
}
