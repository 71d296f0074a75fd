//! Stage 0: listeners, worker threads, client connections, and graceful shutdown.
//!
//! Each worker thread runs its own single-threaded event loop and accepts from the shared
//! listening socket; a connection stays on the thread that accepted it, so the request
//! path takes no cross-thread hand-offs. The first request head on a connection is read
//! and checked here (size, syntax, slowloris deadline) so that even a request hyper could
//! not parse gets Kalmar's own error answer; after that hyper owns the connection.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use http::StatusCode;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{Notify, watch};

use crate::access_log::AccessRecord;
use crate::error::raw_error_response;
use crate::proxy::Proxy;
use crate::proxy::ctx::ConnInfo;

/// Headers accepted in one request head (beyond it: 431).
const MAX_HEADERS: usize = 128;

/// Counts what is in flight, and carries the two shutdown signals: `graceful` (stop
/// accepting, finish what is running) and `hard` (grace is over, end everything).
pub struct Tracker {
    connections: AtomicUsize,
    tunnels: AtomicUsize,
    changed: Notify,
    graceful: watch::Sender<bool>,
    hard: watch::Sender<bool>,
    pub ready: Arc<AtomicBool>,
}

pub struct ConnectionSlot {
    tracker: Arc<Tracker>,
}

pub struct TunnelSlot {
    tracker: Arc<Tracker>,
}

/// The client side of a connection: the socket plus the bytes already read while
/// checking the first request head, which hyper reads first.
pub struct ClientIo {
    prefix: Option<Bytes>,
    stream: TcpStream,
}

enum FirstHead {
    Complete(Bytes),
    Closed,
    Reject {
        status: StatusCode,
        kind: &'static str,
        message: String,
    },
}

// === impl Tracker ===

impl Tracker {
    pub fn new() -> Arc<Tracker> {
        Arc::new(Tracker {
            connections: AtomicUsize::new(0),
            tunnels: AtomicUsize::new(0),
            changed: Notify::new(),
            graceful: watch::channel(false).0,
            hard: watch::channel(false).0,
            ready: Arc::new(AtomicBool::new(false)),
        })
    }

    /// A connection slot, or None at `max` client connections. A tunnel is a client
    /// connection too (hyper has handed its socket over, so it counts separately).
    pub fn try_connection(self: &Arc<Self>, max: usize) -> Option<ConnectionSlot> {
        let mut current = self.connections.load(Ordering::Relaxed);
        loop {
            if current + self.tunnels.load(Ordering::Relaxed) >= max {
                return None;
            }
            match self.connections.compare_exchange_weak(
                current,
                current + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    return Some(ConnectionSlot {
                        tracker: self.clone(),
                    });
                }
                Err(now) => current = now,
            }
        }
    }

    pub fn tunnel_started(self: &Arc<Self>) -> TunnelSlot {
        self.tunnels.fetch_add(1, Ordering::AcqRel);
        TunnelSlot {
            tracker: self.clone(),
        }
    }

    pub fn in_flight(&self) -> usize {
        self.connections.load(Ordering::Acquire) + self.tunnels.load(Ordering::Acquire)
    }

    pub fn begin_shutdown(&self) {
        self.ready.store(false, Ordering::Release);
        self.graceful.send_replace(true);
    }

    pub fn stop_now(&self) {
        self.hard.send_replace(true);
    }

    pub fn is_shutting_down(&self) -> bool {
        *self.graceful.borrow()
    }

    /// Resolves once graceful shutdown has begun.
    pub async fn shutting_down(&self) {
        let mut rx = self.graceful.subscribe();
        let _ = rx.wait_for(|v| *v).await;
    }

    /// Resolves once the grace period is over.
    pub async fn hard_stop(&self) {
        let mut rx = self.hard.subscribe();
        let _ = rx.wait_for(|v| *v).await;
    }

    /// Resolves when no connection or tunnel is left.
    pub async fn idle(&self) {
        loop {
            let notified = self.changed.notified();
            if self.in_flight() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.tracker.connections.fetch_sub(1, Ordering::AcqRel);
        self.tracker.changed.notify_waiters();
    }
}

impl Drop for TunnelSlot {
    fn drop(&mut self) {
        self.tracker.tunnels.fetch_sub(1, Ordering::AcqRel);
        self.tracker.changed.notify_waiters();
    }
}

// === impl ClientIo ===

impl ClientIo {
    pub fn into_parts(self) -> (Option<Bytes>, TcpStream) {
        (self.prefix.filter(|p| !p.is_empty()), self.stream)
    }
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
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

// === accept loop and connections ===

/// Accept on `listener` until graceful shutdown begins.
pub async fn accept_loop(proxy: Arc<Proxy>, listener: tokio::net::TcpListener) {
    let tracker = proxy.tracker.clone();
    loop {
        let accepted = tokio::select! {
            biased;
            _ = tracker.shutting_down() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let max = proxy.state.load().config.server.max_connections;
                match tracker.try_connection(max) {
                    Some(slot) => {
                        tokio::spawn(serve_connection(proxy.clone(), stream, peer, slot));
                    }
                    None => reject_overloaded(&proxy, stream, peer, max),
                }
            }
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Beyond `server.max_connections`: a fast 503 without reading the request.
fn reject_overloaded(proxy: &Arc<Proxy>, stream: TcpStream, peer: SocketAddr, max: usize) {
    proxy.metrics.connection_rejected();
    let message = format!("proxy is at its connection limit ({max}); try again");
    let _ = stream.try_write(&raw_error_response(
        StatusCode::SERVICE_UNAVAILABLE,
        "overloaded",
        &message,
    ));
    let _ = socket2::SockRef::from(&stream).shutdown(std::net::Shutdown::Write);
    log_rejected(
        proxy,
        peer,
        StatusCode::SERVICE_UNAVAILABLE,
        "overloaded",
        Instant::now(),
        SystemTime::now(),
    );
}

async fn serve_connection(
    proxy: Arc<Proxy>,
    stream: TcpStream,
    peer: SocketAddr,
    slot: ConnectionSlot,
) {
    let _slot = slot;
    let _metrics_guard = proxy.metrics.connection_opened();
    let config = proxy.state.load().config.clone();
    let _ = stream.set_nodelay(true);
    let header_limit = config.server.max_request_header_size.as_u64() as usize;

    let (started, time) = (Instant::now(), SystemTime::now());
    // A client that has not sent a complete request yet has nothing in flight: on shutdown
    // it is closed at once instead of holding the drain for the whole header timeout.
    let first_head = tokio::select! {
        head = read_first_head(&stream, header_limit, config.timeouts.request_header) => head,
        _ = proxy.tracker.shutting_down() => FirstHead::Closed,
    };
    let prefix = match first_head {
        FirstHead::Complete(prefix) => prefix,
        FirstHead::Closed => return,
        FirstHead::Reject {
            status,
            kind,
            message,
        } => {
            tracing::debug!(%peer, kind, %message, "rejected first request");
            let _ = crate::proxy::relay::write_all(
                &stream,
                &raw_error_response(status, kind, &message),
            )
            .await;
            let _ = socket2::SockRef::from(&stream).shutdown(std::net::Shutdown::Write);
            log_rejected(&proxy, peer, status, kind, started, time);
            return;
        }
    };

    let io = TokioIo::new(ClientIo {
        prefix: Some(prefix),
        stream,
    });
    let conn_info = ConnInfo { peer };
    let service = {
        let proxy = proxy.clone();
        service_fn(move |req| {
            let proxy = proxy.clone();
            async move { Ok::<_, std::convert::Infallible>(proxy.handle(req, &conn_info).await) }
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        // hyper's head timer starts when it begins waiting for the next request, so on a
        // kept-alive connection it bounds idle time plus head time.
        .header_read_timeout(config.timeouts.client_idle)
        .max_header_size(header_limit)
        .max_headers(MAX_HEADERS)
        .max_buf_size(header_limit.max(8192) * 2);
    let conn = builder.serve_connection(io, service).with_upgrades();
    let mut conn = std::pin::pin!(conn);
    let tracker = proxy.tracker.clone();
    tokio::select! {
        result = conn.as_mut() => log_connection_end(peer, result),
        _ = tracker.shutting_down() => {
            // Finish the request in flight, then close instead of keeping alive.
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                result = conn.as_mut() => log_connection_end(peer, result),
                _ = tracker.hard_stop() => {}
            }
        }
    }
}

fn log_connection_end(peer: SocketAddr, result: Result<(), hyper::Error>) {
    if let Err(e) = result {
        // Header timeouts, resets, and hyper's own 400/431 answers to later requests.
        tracing::debug!(%peer, error = %e, "client connection ended with an error");
    }
}

/// Read until the first request head is complete, rejecting it early when it is too large,
/// malformed, or too slow (slowloris).
async fn read_first_head(stream: &TcpStream, limit: usize, timeout: Duration) -> FirstHead {
    let mut buf = BytesMut::with_capacity(4096);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let readable = tokio::time::timeout_at(deadline, stream.readable()).await;
        match readable {
            Err(_) => {
                return if buf.is_empty() {
                    FirstHead::Closed
                } else {
                    FirstHead::Reject {
                        status: StatusCode::REQUEST_TIMEOUT,
                        kind: "header-timeout",
                        message: format!(
                            "request head not complete within {}ms",
                            timeout.as_millis()
                        ),
                    }
                };
            }
            Ok(Err(_)) => return FirstHead::Closed,
            Ok(Ok(())) => {}
        }
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(buf.capacity().min(limit + 1));
        }
        match stream.try_read_buf(&mut buf) {
            Ok(0) => return FirstHead::Closed,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(_) => return FirstHead::Closed,
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(&buf) {
            Ok(httparse::Status::Complete(head_len)) => {
                if head_len > limit {
                    return too_large(head_len, limit);
                }
                return FirstHead::Complete(buf.freeze());
            }
            Ok(httparse::Status::Partial) if buf.len() > limit => {
                return too_large(buf.len(), limit);
            }
            Ok(httparse::Status::Partial) => {}
            Err(httparse::Error::TooManyHeaders) => {
                return FirstHead::Reject {
                    status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    kind: "headers-too-large",
                    message: format!("more than {MAX_HEADERS} header fields"),
                };
            }
            Err(e) => {
                return FirstHead::Reject {
                    status: StatusCode::BAD_REQUEST,
                    kind: "malformed-request",
                    message: format!("cannot parse request head: {e}"),
                };
            }
        }
    }
}

fn too_large(size: usize, limit: usize) -> FirstHead {
    FirstHead::Reject {
        status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        kind: "headers-too-large",
        message: format!(
            "request head of {size}+ bytes exceeds server.max_request_header_size ({limit} bytes)"
        ),
    }
}

/// Access-log line for a connection rejected before a request could be parsed.
fn log_rejected(
    proxy: &Arc<Proxy>,
    peer: SocketAddr,
    status: StatusCode,
    kind: &'static str,
    started: Instant,
    time: SystemTime,
) {
    let log = proxy.log.clone();
    let duration = started.elapsed();
    proxy.metrics.request_finished(
        &http::Method::from_bytes(b"NONE").unwrap_or_default(),
        status.as_u16(),
        "none",
        duration,
        0,
        0,
    );
    let record = AccessRecord {
        time,
        duration,
        request_id: String::new(),
        client: peer,
        method: http::Method::from_bytes(b"NONE").unwrap_or_default(),
        target: "-".into(),
        status: status.as_u16(),
        bytes_from_client: 0,
        bytes_to_client: 0,
        resolved: None,
        error: Some(kind),
        source_name: None,
        labels: None,
        rule: None,
        verdict: "none",
        reason: "none",
        route: crate::proxy::ctx::route_none(),
        cache: None,
        content_type: None,
        user_agent: None,
        referer: None,
        http_version: http::Version::HTTP_11,
    };
    tokio::spawn(async move { log.send(record).await });
}
