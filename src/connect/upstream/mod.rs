//! Stage 7 via a parent proxy: which route a destination takes (direct or through the
//! institution's parents), the parents' health, dialling a parent (TCP or TLS), and the
//! CONNECT handshake with it.
//!
//! ```text
//! kalmar -> parent:  CONNECT example.com:443 HTTP/1.1        (the name, not an address:
//!                    Host: example.com:443                     the parent's policy and DNS apply)
//!                    Proxy-Authorization: Basic YWxpY2U6cHc=
//! parent -> kalmar:  HTTP/1.1 200 Connection established     (anything else: 502 upstream-refused)
//! ...then the parent socket is a plain byte pipe to the origin...
//! ```
//! A parent whose connect fails (refused, unreachable, timed out, TLS handshake failed) is
//! marked down for `upstream.down_backoff` and the next one is tried; a parent that answers
//! with a refusal is not retried elsewhere (the answer is the institution's decision).

mod config;
pub mod direct;
pub mod parent;

pub use self::config::{Selection, UpstreamConfig, UpstreamConfigError};

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::HeaderValue;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::acl::{Host, Protocol};
use crate::connect::resolver::Resolver;
use crate::error::ProxyError;
use crate::metrics::Metrics;
use direct::DirectList;
use parent::ParentUrl;

/// Largest CONNECT response head accepted from a parent.
const MAX_PARENT_HEAD: usize = 16 * 1024;

/// The compiled `[upstream]` section, part of the reloadable snapshot.
pub struct Upstream {
    http: ParentSet,
    https: ParentSet,
    direct: DirectList,
    pub check_resolved: bool,
}

/// The parents for one kind of request, in configured order.
pub struct ParentSet {
    parents: Vec<Arc<Parent>>,
    selection: Selection,
    next: AtomicUsize,
}

/// One configured parent, with its health.
pub struct Parent {
    pub url: ParentUrl,
    /// Pool key: `scheme://host:port`, so a scheme change on reload never reuses a connection.
    pub pool_key: Arc<str>,
    auth: Option<HeaderValue>,
    tls: Option<TlsConnector>,
    backoff: Duration,
    down_until: Mutex<Option<Instant>>,
}

/// Where a request goes, decided after the ACL.
pub enum Route<'a> {
    Direct(DirectReason),
    Parents(&'a ParentSet),
}

/// Why a request goes straight to the origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirectReason {
    /// No parent is configured for this kind of request.
    NoParents,
    /// The destination is in `upstream.direct`.
    Bypass,
}

/// Candidates for one request: the parents that are up, in the order to try them.
pub struct Attempts<'a> {
    order: Vec<&'a Arc<Parent>>,
    at: usize,
    failures: Vec<(Arc<str>, ParentFailure)>,
}

/// Why a parent could not be used before anything was sent to it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ParentFailure {
    #[error("connect to {addr} failed: {reason}")]
    Connect { addr: String, reason: String },
    #[error("connect timed out after {}ms", .0.as_millis())]
    Timeout(Duration),
    #[error("TLS handshake failed: {0}")]
    Tls(String),
    #[error("DNS lookup failed: {0}")]
    Dns(String),
    #[error("closed the connection before answering the CONNECT")]
    Closed,
}

/// How a CONNECT to a parent went wrong after the parent was reached.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("parent answered the CONNECT with {0}")]
    Refused(u16),
    #[error("no answer to the CONNECT")]
    Timeout,
    #[error("{0}")]
    Bad(String),
    #[error(transparent)]
    Failure(ParentFailure),
}

/// A connection to a parent: plain TCP or TLS to the parent itself.
pub enum ParentStream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

// === impl Upstream ===

impl Upstream {
    /// Direct, or the parents for this kind of request.
    pub fn route(&self, host: &Host, port: u16, protocol: Protocol) -> Route<'_> {
        let set = match protocol {
            Protocol::Http => &self.http,
            Protocol::Connect => &self.https,
        };
        if set.parents.is_empty() {
            Route::Direct(DirectReason::NoParents)
        } else if self.direct.matches(host, port) {
            Route::Direct(DirectReason::Bypass)
        } else {
            Route::Parents(set)
        }
    }

    /// Every configured parent label (metrics are pre-created for them).
    pub fn labels(&self) -> impl Iterator<Item = &str> {
        self.http
            .parents
            .iter()
            .chain(&self.https.parents)
            .map(|p| &*p.url.label)
    }
}

// === impl ParentSet ===

impl ParentSet {
    /// The parents to try for one request, skipping those marked down. Err when every
    /// parent is down: 502 upstream-unavailable.
    pub fn attempts(&self) -> Result<Attempts<'_>, ProxyError> {
        let n = self.parents.len();
        let start = match self.selection {
            Selection::Ordered => 0,
            Selection::RoundRobin => self.next.fetch_add(1, Ordering::Relaxed) % n.max(1),
        };
        let now = Instant::now();
        let order: Vec<&Arc<Parent>> = (0..n)
            .map(|i| &self.parents[(start + i) % n])
            .filter(|p| p.is_up(now))
            .collect();
        if order.is_empty() {
            let names: Vec<&str> = self.parents.iter().map(|p| &*p.url.label).collect();
            return Err(ProxyError::UpstreamUnavailable(format!(
                "every parent is marked down after connect failures ({})",
                names.join(", ")
            )));
        }
        Ok(Attempts {
            order,
            at: 0,
            failures: Vec::new(),
        })
    }
}

// === impl Parent ===

impl Parent {
    pub fn label(&self) -> &Arc<str> {
        &self.url.label
    }

    /// The `Proxy-Authorization` value for this parent, if it has credentials.
    pub fn auth(&self) -> Option<&HeaderValue> {
        self.auth.as_ref()
    }

    fn is_up(&self, now: Instant) -> bool {
        self.down_until.lock().is_none_or(|until| now >= until)
    }

    /// Connect failed: skip this parent for `down_backoff`.
    pub fn mark_down(&self) {
        *self.down_until.lock() = Some(Instant::now() + self.backoff);
    }

    /// TCP connect (and TLS handshake for an https parent) within `timeout` in all.
    /// The parent's name is resolved without the destination guard: the admin chose it,
    /// and institutional parents often live in internal ranges.
    pub async fn dial(
        &self,
        resolver: &Resolver,
        timeout: Duration,
        metrics: &Metrics,
    ) -> Result<(ParentStream, SocketAddr), ParentFailure> {
        let deadline = tokio::time::Instant::now() + timeout;
        let ips = resolver
            .resolve(&self.url.host)
            .await
            .map_err(|e| ParentFailure::Dns(e.to_string()))?;
        let addrs = ips.into_iter().map(|ip| SocketAddr::new(ip, self.url.port));
        let (stream, addr) =
            super::dial_first(addrs, timeout, metrics)
                .await
                .map_err(|e| match e {
                    super::DialError::Failed { addr, reason } => ParentFailure::Connect {
                        addr: addr.to_string(),
                        reason,
                    },
                    super::DialError::Timeout { .. } => ParentFailure::Timeout(timeout),
                    super::DialError::NoAddress => ParentFailure::Dns("no addresses".into()),
                })?;
        let Some(tls) = &self.tls else {
            return Ok((ParentStream::Plain(stream), addr));
        };
        let name = match &self.url.host {
            Host::Name(n) => rustls::pki_types::ServerName::try_from(n.clone())
                .map_err(|e| ParentFailure::Tls(e.to_string()))?,
            Host::Ip(ip) => rustls::pki_types::ServerName::IpAddress((*ip).into()),
        };
        match tokio::time::timeout_at(deadline, tls.connect(name, stream)).await {
            Ok(Ok(tls)) => Ok((ParentStream::Tls(Box::new(tls)), addr)),
            Ok(Err(e)) => Err(ParentFailure::Tls(e.to_string())),
            Err(_) => Err(ParentFailure::Timeout(timeout)),
        }
    }
}

// === impl Attempts ===

impl<'a> Attempts<'a> {
    /// The next parent to try, or None when all were tried.
    pub fn next_parent(&mut self) -> Option<&'a Arc<Parent>> {
        let p = self.order.get(self.at).copied();
        self.at += 1;
        p
    }

    /// `parent` could not be used: mark it down and remember why.
    pub fn failed(&mut self, parent: &Parent, failure: ParentFailure) {
        parent.mark_down();
        self.failures.push((parent.label().clone(), failure));
    }

    /// Every candidate failed: 504 upstream-timeout if the last one timed out, else
    /// 502 upstream-unavailable naming each parent and why.
    pub fn exhausted(&self) -> ProxyError {
        match self.failures.last() {
            Some((parent, ParentFailure::Timeout(timeout))) => ProxyError::UpstreamTimeout {
                parent: parent.to_string(),
                timeout: *timeout,
            },
            _ => ProxyError::UpstreamUnavailable(
                self.failures
                    .iter()
                    .map(|(p, f)| format!("{p}: {f}"))
                    .collect::<Vec<_>>()
                    .join("; "),
            ),
        }
    }
}

// === impl DirectReason ===

impl DirectReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DirectReason::NoParents => "no-parents",
            DirectReason::Bypass => "direct-list",
        }
    }
}

// === impl ParentFailure ===

impl ParentFailure {
    pub fn is_timeout(&self) -> bool {
        matches!(self, ParentFailure::Timeout(_))
    }
}

/// Send `CONNECT authority` to the parent and read its answer. On 2xx returns the stream
/// and whatever bytes the parent sent after its head (they belong to the tunnel).
pub async fn connect_handshake(
    mut stream: ParentStream,
    authority: &str,
    auth: Option<&HeaderValue>,
    timeout: Duration,
) -> Result<(ParentStream, Bytes), HandshakeError> {
    let mut head = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n").into_bytes();
    if let Some(auth) = auth {
        head.extend_from_slice(b"Proxy-Authorization: ");
        head.extend_from_slice(auth.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    let exchange = async {
        stream
            .write_all(&head)
            .await
            .map_err(|_| HandshakeError::Failure(ParentFailure::Closed))?;
        let mut buf = BytesMut::with_capacity(1024);
        loop {
            if stream
                .read_buf(&mut buf)
                .await
                .map_err(|e| HandshakeError::Bad(format!("reading the CONNECT answer: {e}")))?
                == 0
            {
                return Err(HandshakeError::Failure(ParentFailure::Closed));
            }
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut response = httparse::Response::new(&mut headers);
            match response.parse(&buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let status = response.code.unwrap_or(0);
                    if !(200..300).contains(&status) {
                        return Err(HandshakeError::Refused(status));
                    }
                    let rest = buf.split_off(n).freeze();
                    return Ok(rest);
                }
                Ok(httparse::Status::Partial) if buf.len() < MAX_PARENT_HEAD => {}
                Ok(httparse::Status::Partial) => {
                    return Err(HandshakeError::Bad(format!(
                        "CONNECT answer head larger than {MAX_PARENT_HEAD} bytes"
                    )));
                }
                Err(e) => {
                    return Err(HandshakeError::Bad(format!(
                        "unparsable CONNECT answer: {e}"
                    )));
                }
            }
        }
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok(rest)) => Ok((stream, rest)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(HandshakeError::Timeout),
    }
}

/// Whether a plain-HTTP response that came back through a parent is the parent's own
/// refusal rather than the origin's answer: always for 407; for 403 and 5xx only when the
/// proxy marked it as its own (RFC 9209 `Proxy-Status` with an `error`, Squid's
/// `X-Squid-Error`, Kalmar's `X-Kalmar-Error`) — an origin's 403 or 500 passes through.
pub fn is_parent_refusal(status: http::StatusCode, headers: &http::HeaderMap) -> bool {
    if status == http::StatusCode::PROXY_AUTHENTICATION_REQUIRED {
        return true;
    }
    if status != http::StatusCode::FORBIDDEN && !status.is_server_error() {
        return false;
    }
    headers.contains_key("x-squid-error")
        || headers.contains_key(crate::error::ERROR_HEADER)
        || headers
            .get_all("proxy-status")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.contains("error="))
}

// === impl ParentStream ===

impl AsyncRead for ParentStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ParentStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ParentStream::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ParentStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ParentStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ParentStream::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ParentStream::Plain(s) => Pin::new(s).poll_flush(cx),
            ParentStream::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ParentStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ParentStream::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ParentStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            ParentStream::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            ParentStream::Plain(s) => s.is_write_vectored(),
            ParentStream::Tls(s) => s.is_write_vectored(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_told_from_origin_answers() {
        let mut marked = http::HeaderMap::new();
        marked.insert("x-squid-error", "ERR_ACCESS_DENIED 0".parse().unwrap());
        let mut status = http::HeaderMap::new();
        status.insert(
            "proxy-status",
            "parent.example; error=destination_ip_unroutable"
                .parse()
                .unwrap(),
        );
        let plain = http::HeaderMap::new();
        let s = http::StatusCode::from_u16;
        assert!(is_parent_refusal(s(407).unwrap(), &plain));
        assert!(is_parent_refusal(s(403).unwrap(), &marked));
        assert!(is_parent_refusal(s(503).unwrap(), &status));
        assert!(!is_parent_refusal(s(403).unwrap(), &plain));
        assert!(!is_parent_refusal(s(500).unwrap(), &plain));
        assert!(!is_parent_refusal(s(404).unwrap(), &marked));
    }
}
