//! Reading a tunnel's first bytes up to one complete TLS ClientHello, and the facts Kalmar checks in it.
//!
//! What a client sends first in a TLS tunnel, and what is looked at:
//! ```text
//! record     16 03 01 LL LL          handshake record, legacy version 3.x, length 1..=2^14
//! handshake  01 LL LL LL             client_hello, 24-bit length: may span several records
//!            03 03 <random 32>       (legacy version, random)
//!            <session id> <cipher suites> <compression methods>
//!            <extensions>            type u16, length u16, data; among them:
//!              00 00  server_name    one host_name entry (RFC 6066)
//!              00 10  ALPN           protocol names ("h2", "http/1.1")
//!              fe 0d  ECH            encrypted_client_hello: this is the outer hello
//! ```
//! The records may arrive in any number of TCP segments. [`parse`] looks at what has arrived so
//! far and says whether more is needed; [`read_client_hello`] reads until it can say yes or no,
//! bounded in time and to [`MAX_HELLO_BYTES`], and returns every byte it read so that the caller
//! forwards them unchanged. The ClientHello body and the SNI and ALPN contents are parsed with
//! `tls-parser`; records, the handshake header and the extension list are walked here (a few
//! bounds-checked slices), so that an extension `tls-parser` does not know can never make a
//! real client's hello look broken.

use std::borrow::Cow;
use std::future::Future;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::acl::{Host, normalize_host};

/// At most this many bytes are read while waiting for a complete ClientHello.
pub const MAX_HELLO_BYTES: usize = 64 * 1024;

/// Largest plaintext record (RFC 8446 5.1).
const MAX_RECORD: usize = 1 << 14;

/// Record content type of handshake messages.
const HANDSHAKE: u8 = 22;

/// Handshake message type of a ClientHello.
const CLIENT_HELLO: u8 = 1;

/// Extension types.
const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;
const EXT_ECH: u16 = 0xfe0d;

/// ALPN names kept for the log; a client offering more gets the first ones.
const MAX_ALPN: usize = 16;

/// The facts of a ClientHello that the tunnel check and the access log use.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientHello {
    /// The one `host_name` of the server_name extension, normalised as CONNECT hosts are
    /// (lower case, no trailing dot, IDNA A-label; a numeric name is an address).
    pub server_name: Option<Host>,
    /// The ALPN protocol names offered, in order (non-printable bytes escaped).
    pub alpn: Vec<String>,
    /// The encrypted_client_hello extension is present: `server_name` is the outer (public) name.
    pub ech: bool,
}

/// What the bytes seen so far are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// A prefix of a ClientHello: read more. The answer cannot change before this many bytes
    /// have arrived in all (so a client that trickles bytes does not get them parsed each time).
    NeedMore(usize),
    Hello(ClientHello),
    /// The first bytes are not a TLS handshake record.
    NotTls,
    /// It starts like TLS but is not a well-formed ClientHello.
    Invalid(Invalid),
}

/// Why bytes that start like TLS are not an acceptable ClientHello (for diagnostics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalid {
    /// A record of length 0 or above 2^14.
    RecordLength,
    /// A record other than a handshake record before the ClientHello was complete.
    Interleaved,
    /// The first handshake message is not a ClientHello.
    NotClientHello,
    /// The ClientHello is longer than [`MAX_HELLO_BYTES`].
    TooLarge,
    /// The fixed part of the ClientHello does not parse, or bytes are left over.
    Body,
    /// The extension list does not add up.
    Extensions,
    /// The same extension twice.
    DuplicateExtension,
    /// server_name with other than exactly one host name, or a name that is not a host name.
    ServerName,
    /// The ALPN extension does not parse.
    Alpn,
}

/// How reading the first bytes of a tunnel ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HelloOutcome {
    Hello(ClientHello),
    NotTls,
    Invalid(Invalid),
    /// No complete ClientHello within the timeout.
    Timeout,
    /// The client closed (or reset) its side before a complete ClientHello.
    Closed,
    /// The far end sent bytes first (only watched for when the caller asks).
    FarEndFirst,
}

/// The outcome and every byte read from the client (`buffered` included), to forward unchanged.
#[derive(Debug)]
pub struct HelloRead {
    pub outcome: HelloOutcome,
    pub bytes: Bytes,
}

// === impl Invalid ===

impl Invalid {
    pub fn as_str(self) -> &'static str {
        match self {
            Invalid::RecordLength => "record-length",
            Invalid::Interleaved => "interleaved-record",
            Invalid::NotClientHello => "not-client-hello",
            Invalid::TooLarge => "too-large",
            Invalid::Body => "body",
            Invalid::Extensions => "extensions",
            Invalid::DuplicateExtension => "duplicate-extension",
            Invalid::ServerName => "server-name",
            Invalid::Alpn => "alpn",
        }
    }
}

// === reading ===

/// Reads from `client`, after the `buffered` bytes already taken from it, until the bytes form a
/// complete ClientHello, are clearly not one, `timeout` passes, the client closes, or
/// `far_end_first` resolves (pass `std::future::pending()` not to watch the far end). Cancel-safe
/// reads only: whatever ended it, every byte read is in the result.
pub async fn read_client_hello<R, F>(
    client: &mut R,
    buffered: Bytes,
    timeout: Duration,
    far_end_first: F,
) -> HelloRead
where
    R: AsyncRead + Unpin,
    F: Future<Output = ()>,
{
    let mut need = match parse(&buffered) {
        Parsed::NeedMore(need) if buffered.len() < MAX_HELLO_BYTES => need,
        parsed => {
            return HelloRead {
                outcome: outcome_of(parsed),
                bytes: buffered,
            };
        }
    };
    let mut buf = BytesMut::with_capacity(buffered.len().max(2048));
    buf.extend_from_slice(&buffered);
    drop(buffered);
    let deadline = tokio::time::Instant::now() + timeout;
    let mut far_end_first = std::pin::pin!(far_end_first);
    let outcome = loop {
        let room = MAX_HELLO_BYTES - buf.len();
        if buf.capacity() == buf.len() {
            buf.reserve(buf.len().clamp(1024, room));
        }
        let mut limited = bytes::BufMut::limit(&mut buf, room);
        let read = tokio::select! {
            biased;
            read = client.read_buf(&mut limited) => read,
            () = &mut far_end_first => break HelloOutcome::FarEndFirst,
            () = tokio::time::sleep_until(deadline) => break HelloOutcome::Timeout,
        };
        match read {
            Ok(0) | Err(_) => break HelloOutcome::Closed,
            Ok(_) if buf.len() < need.min(MAX_HELLO_BYTES) => continue,
            Ok(_) => match parse(&buf) {
                Parsed::NeedMore(more) if buf.len() < MAX_HELLO_BYTES => need = more,
                parsed => break outcome_of(parsed),
            },
        }
    };
    HelloRead {
        outcome,
        bytes: buf.freeze(),
    }
}

/// A final parse result as an outcome; still `NeedMore` at the byte limit is too large.
fn outcome_of(parsed: Parsed) -> HelloOutcome {
    match parsed {
        Parsed::Hello(hello) => HelloOutcome::Hello(hello),
        Parsed::NotTls => HelloOutcome::NotTls,
        Parsed::Invalid(why) => HelloOutcome::Invalid(why),
        Parsed::NeedMore(_) => HelloOutcome::Invalid(Invalid::TooLarge),
    }
}

// === parsing ===

/// What `bytes`, the first bytes a client sent into a tunnel, are so far. Never panics, on
/// any input.
pub fn parse(bytes: &[u8]) -> Parsed {
    // The first three bytes tell TLS from anything else: a handshake record, version 3.0-3.4.
    match bytes {
        [] => return Parsed::NeedMore(1),
        [first, ..] if *first != HANDSHAKE => return Parsed::NotTls,
        [_, major, ..] if *major != 3 => return Parsed::NotTls,
        [_, _, minor, ..] if *minor > 4 => return Parsed::NotTls,
        _ => {}
    }
    // Walk the records, collecting the handshake bytes (borrowed while one record holds them).
    let mut message: Cow<[u8]> = Cow::Borrowed(&[]);
    let mut at = 0;
    loop {
        if let Some(done) = check_message(&message) {
            return done;
        }
        let Some(header) = bytes.get(at..at + 5) else {
            return Parsed::NeedMore(at + 5);
        };
        if header[0] != HANDSHAKE || header[1] != 3 {
            return Parsed::Invalid(Invalid::Interleaved);
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len == 0 || len > MAX_RECORD {
            return Parsed::Invalid(Invalid::RecordLength);
        }
        let (start, end) = (at + 5, at + 5 + len);
        let (fragment, partial) = match bytes.get(start..end) {
            Some(fragment) => (fragment, false),
            None => (bytes.get(start..).unwrap_or_default(), true),
        };
        message = if message.is_empty() {
            Cow::Borrowed(fragment)
        } else {
            let mut joined = message.into_owned();
            joined.extend_from_slice(fragment);
            Cow::Owned(joined)
        };
        if partial {
            // The rest of this record may complete the hello before the record ends.
            return check_message(&message).unwrap_or_else(|| {
                Parsed::NeedMore((bytes.len() + message_missing(&message)).min(end))
            });
        }
        at = end;
    }
}

/// How many more handshake bytes are needed before [`check_message`] can answer.
fn message_missing(message: &[u8]) -> usize {
    match message.get(1..4) {
        Some(len) => {
            let len = usize::from(len[0]) << 16 | usize::from(len[1]) << 8 | usize::from(len[2]);
            (4 + len).saturating_sub(message.len()).max(1)
        }
        None => 4 - message.len().min(3),
    }
}

/// The verdict on the handshake bytes collected so far, or `None` if more are needed.
fn check_message(message: &[u8]) -> Option<Parsed> {
    let (&kind, rest) = message.split_first()?;
    if kind != CLIENT_HELLO {
        return Some(Parsed::Invalid(Invalid::NotClientHello));
    }
    let len = rest.get(..3)?;
    let len = usize::from(len[0]) << 16 | usize::from(len[1]) << 8 | usize::from(len[2]);
    if len + 4 > MAX_HELLO_BYTES {
        return Some(Parsed::Invalid(Invalid::TooLarge));
    }
    let body = message.get(4..4 + len)?;
    Some(match parse_body(body) {
        Ok(hello) => Parsed::Hello(hello),
        Err(why) => Parsed::Invalid(why),
    })
}

/// The ClientHello body (after the handshake header): the fixed part with `tls-parser`, then the
/// extensions.
fn parse_body(body: &[u8]) -> Result<ClientHello, Invalid> {
    let (rest, contents) =
        tls_parser::parse_tls_handshake_client_hello(body).map_err(|_| Invalid::Body)?;
    if !rest.is_empty() {
        return Err(Invalid::Body);
    }
    let mut hello = ClientHello::default();
    let Some(mut extensions) = contents.ext else {
        return Ok(hello);
    };
    // [server_name, ALPN, ECH]: each at most once (RFC 8446 4.2), or the server and Kalmar
    // could read different ones.
    let mut seen = [false; 3];
    while !extensions.is_empty() {
        let (kind, data, rest) = split_extension(extensions).ok_or(Invalid::Extensions)?;
        extensions = rest;
        let slot = match kind {
            EXT_SERVER_NAME => 0,
            EXT_ALPN => 1,
            EXT_ECH => 2,
            _ => continue,
        };
        if std::mem::replace(&mut seen[slot], true) {
            return Err(Invalid::DuplicateExtension);
        }
        match kind {
            EXT_SERVER_NAME => hello.server_name = Some(server_name(data)?),
            EXT_ALPN => hello.alpn = alpn(data)?,
            _ => hello.ech = true,
        }
    }
    Ok(hello)
}

/// One extension: (type, data, the rest of the list).
fn split_extension(list: &[u8]) -> Option<(u16, &[u8], &[u8])> {
    let header = list.get(..4)?;
    let kind = u16::from_be_bytes([header[0], header[1]]);
    let len = usize::from(u16::from_be_bytes([header[2], header[3]]));
    let data = list.get(4..4 + len)?;
    Some((kind, data, list.get(4 + len..)?))
}

/// The one host_name of a server_name extension, normalised.
fn server_name(data: &[u8]) -> Result<Host, Invalid> {
    let parsed = tls_parser::parse_tls_extension_sni_content(data);
    let Ok((_, tls_parser::TlsExtension::SNI(entries))) = parsed else {
        return Err(Invalid::ServerName);
    };
    let mut names = entries
        .iter()
        .filter(|(kind, _)| *kind == tls_parser::SNIType::HostName);
    match (names.next(), names.next()) {
        (Some((_, name)), None) => normalize_server_name(name).ok_or(Invalid::ServerName),
        _ => Err(Invalid::ServerName),
    }
}

/// A server name as it would be written as a CONNECT host: lower case, no trailing dot, an
/// IDNA A-label (a client that sends a U-label gets it converted); anything but letters,
/// digits, `-`, `_` and dots is not a host name.
pub fn normalize_server_name(raw: &[u8]) -> Option<Host> {
    let text = std::str::from_utf8(raw).ok()?;
    let ascii: Cow<str> = if text.is_ascii() {
        Cow::Borrowed(text)
    } else {
        Cow::Owned(idna::domain_to_ascii(text).ok()?)
    };
    if ascii.is_empty()
        || !ascii
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return None;
    }
    normalize_host(&ascii).ok()
}

/// The ALPN protocol names, printable (RFC 7301 names are opaque bytes).
fn alpn(data: &[u8]) -> Result<Vec<String>, Invalid> {
    let parsed = tls_parser::parse_tls_extension_alpn_content(data);
    let Ok((rest, tls_parser::TlsExtension::ALPN(names))) = parsed else {
        return Err(Invalid::Alpn);
    };
    if !rest.is_empty() {
        return Err(Invalid::Alpn);
    }
    Ok(names
        .iter()
        .take(MAX_ALPN)
        .map(|name| name.escape_ascii().to_string())
        .collect())
}

#[cfg(test)]
mod tests;
