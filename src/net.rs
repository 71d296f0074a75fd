//! Socket plumbing below both the server and the proxy: the client stream with the bytes
//! already read while checking its first request head (and Kalmar's own answer in place of
//! hyper's to a later unparsable request), the interim (1xx) responses it writes ahead of
//! hyper's, and a readiness-driven write loop.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, StatusCode};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::error::ProxyError;

/// The client side of a connection: the socket plus the bytes already read while
/// checking the first request head, which hyper reads first.
///
/// hyper answers a later request on a kept-alive connection that it cannot parse with a
/// bare `400`/`431` of its own, before Kalmar sees the request. The client stream
/// recognises that answer (a response head while no response of Kalmar's is in progress)
/// and sends Kalmar's own answer in its place, with `X-Kalmar-Error`; the connection
/// closes afterwards, as hyper intended.
pub struct ClientIo {
    prefix: Option<Bytes>,
    stream: TcpStream,
    state: Arc<ConnState>,
    /// Kalmar's answer still to be written in place of hyper's.
    replacement: Option<Bytes>,
    /// hyper's own answer is being swallowed (the connection ends after it).
    replaced: bool,
    /// Interim bytes taken from `state.interim`, not yet written.
    pending: Bytes,
}

/// Interim responses (102 Processing, 103 Early Hints) from the origin for the client's
/// request in flight. hyper's server cannot send a 1xx itself, so the connection's
/// [`ClientIo`] writes these bytes before the next bytes hyper writes, which are the head
/// of the final response: the client sees them in order, just before the final response.
/// The server puts the connection's one in every request's extensions; the forward step
/// fills it.
#[derive(Clone, Default, Debug)]
pub struct Interim(Arc<Mutex<BytesMut>>);

/// Fields never copied into a relayed interim response (hop-by-hop, RFC 9110 7.6.1).
const INTERIM_SKIPPED: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "content-length",
];

/// What the server, the request path and the client stream share about one connection.
#[derive(Debug)]
pub struct ConnState {
    /// Responses of Kalmar's in progress: from the request's context being made to the end
    /// of its body.
    active: AtomicUsize,
    /// The answer that replaced hyper's, for the connection's log line.
    rejected: Mutex<Option<ProxyError>>,
    /// `server.max_request_header_size`, to word a 431.
    header_limit: usize,
    /// The origin's 1xx answers for the request in flight.
    pub interim: Interim,
}

/// Holds one response of Kalmar's as in progress on its connection.
#[derive(Debug)]
pub struct ActiveResponse {
    state: Arc<ConnState>,
}

// === impl Interim ===

impl Interim {
    /// Queue one interim response for the client. 100 Continue is hyper's own business
    /// (it answers `Expect` itself) and 101 is never relayed.
    pub fn push(&self, status: StatusCode, headers: &HeaderMap) {
        if !status.is_informational()
            || status == StatusCode::CONTINUE
            || status == StatusCode::SWITCHING_PROTOCOLS
        {
            return;
        }
        let mut out = self.0.lock();
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(status.as_str().as_bytes());
        out.extend_from_slice(b" ");
        out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
        out.extend_from_slice(b"\r\n");
        for (name, value) in headers {
            if INTERIM_SKIPPED.contains(&name.as_str()) {
                continue;
            }
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
    }

    fn take(&self) -> Bytes {
        self.0.lock().split().freeze()
    }
}

// === impl ConnState ===

impl ConnState {
    pub fn new(header_limit: usize) -> Arc<ConnState> {
        Arc::new(ConnState {
            active: AtomicUsize::new(0),
            rejected: Mutex::new(None),
            header_limit,
            interim: Interim::default(),
        })
    }

    /// A response of Kalmar's has begun; it ends when the guard is dropped.
    pub fn response_started(self: &Arc<Self>) -> ActiveResponse {
        self.active.fetch_add(1, Ordering::AcqRel);
        ActiveResponse {
            state: self.clone(),
        }
    }

    /// The error whose answer replaced hyper's, if that happened.
    pub fn take_rejected(&self) -> Option<ProxyError> {
        self.rejected.lock().take()
    }
}

impl Drop for ActiveResponse {
    fn drop(&mut self) {
        self.state.active.fetch_sub(1, Ordering::AcqRel);
    }
}

// === impl ClientIo ===

impl ClientIo {
    pub fn new(prefix: Bytes, stream: TcpStream, state: Arc<ConnState>) -> ClientIo {
        ClientIo {
            prefix: Some(prefix),
            stream,
            state,
            replacement: None,
            replaced: false,
            pending: Bytes::new(),
        }
    }

    /// Write the queued interim responses, if any, before anything else.
    fn poll_interim(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if self.pending.is_empty() {
                self.pending = self.state.interim.take();
                if self.pending.is_empty() {
                    return Poll::Ready(Ok(()));
                }
            }
            let n = ready!(Pin::new(&mut self.stream).poll_write(cx, &self.pending))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.pending.advance(n);
        }
    }

    pub fn into_parts(self) -> (Option<Bytes>, TcpStream) {
        (self.prefix.filter(|p| !p.is_empty()), self.stream)
    }

    /// If `buf` is hyper's own answer to an unparsable request, take Kalmar's instead.
    fn intercept(&mut self, buf: &[u8]) {
        if self.replaced || self.state.active.load(Ordering::Acquire) != 0 {
            return;
        }
        let Some(status) = hyper_parse_error_answer(buf) else {
            return;
        };
        let err = match status {
            431 => ProxyError::HeadersTooLarge {
                size: self.state.header_limit,
                limit: self.state.header_limit,
            },
            414 => ProxyError::Malformed("request target too long".into()),
            _ => ProxyError::Malformed("cannot parse the request head".into()),
        };
        self.replacement = Some(Bytes::from(err.to_raw_response()));
        *self.state.rejected.lock() = Some(err);
        self.replaced = true;
    }

    /// Write what is left of the replacement answer.
    fn poll_replacement(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some(rest) = self.replacement.as_mut() {
            let n = ready!(Pin::new(&mut self.stream).poll_write(cx, rest))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            let _ = rest.split_to(n);
            if rest.is_empty() {
                self.replacement = None;
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// The status of `buf` if it is exactly the automatic answer hyper's server writes on a
/// parse error: a 4xx head with no body, only `content-length: 0`, `connection: close` and
/// `date`.
fn hyper_parse_error_answer(buf: &[u8]) -> Option<u16> {
    if !buf.starts_with(b"HTTP/1.1 4") || !buf.ends_with(b"\r\n\r\n") {
        return None;
    }
    let mut headers = [httparse::EMPTY_HEADER; 4];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(buf) {
        Ok(httparse::Status::Complete(n)) if n == buf.len() => {}
        _ => return None,
    }
    let only_hypers = response.headers.iter().all(|h| {
        (h.name.eq_ignore_ascii_case("content-length") && h.value == b"0")
            || (h.name.eq_ignore_ascii_case("connection") && h.value == b"close")
            || h.name.eq_ignore_ascii_case("date")
    });
    only_hypers.then_some(response.code?)
}

impl AsyncRead for ClientIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(prefix) = &mut this.prefix {
            let n = prefix.len().min(buf.remaining());
            buf.put_slice(&prefix.split_to(n));
            if prefix.is_empty() {
                this.prefix = None;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.intercept(buf);
        if this.replaced {
            ready!(this.poll_replacement(cx))?;
            return Poll::Ready(Ok(buf.len()));
        }
        ready!(this.poll_interim(cx))?;
        Pin::new(&mut this.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(first) = bufs.iter().find(|b| !b.is_empty()) {
            this.intercept(first);
        }
        if this.replaced {
            ready!(this.poll_replacement(cx))?;
            return Poll::Ready(Ok(bufs.iter().map(|b| b.len()).sum()));
        }
        ready!(this.poll_interim(cx))?;
        Pin::new(&mut this.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_replacement(cx))?;
        Pin::new(&mut this.stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_replacement(cx))?;
        Pin::new(&mut this.stream).poll_shutdown(cx)
    }
}

/// Write all of `data` to `to` without taking the stream mutably (both halves of a relay
/// share it).
pub async fn write_all(to: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        to.writable().await?;
        match to.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
