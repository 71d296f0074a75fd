//! Stage 8 for CONNECT: dial the vetted address, answer 200, then relay bytes both ways.
//!
//! ```text
//! client -> kalmar:  CONNECT example.com:443 HTTP/1.1
//! kalmar -> origin:  (TCP connect to the vetted address)
//! kalmar -> client:  HTTP/1.1 200 OK
//! ...then opaque bytes (TLS) in both directions until both sides are done...
//! ```
//! The relay holds no buffer while a tunnel is idle: a buffer is taken for each burst of
//! readable data and dropped on `WouldBlock`, and the client's `TcpStream` is taken back
//! out of hyper's upgraded connection so that hyper's read buffer is freed too. That keeps
//! an idle tunnel to a few KiB. Half-close: one side's EOF shuts the other side's write;
//! the tunnel ends when both directions are done, on an error, or after `tunnel_idle`.
//!
//! Through a parent proxy the far end is the parent, after its answer to our own CONNECT
//! (see `connect::upstream`); bytes the parent sent after its answer head are relayed to
//! the client first. A plain-TCP parent takes the same zero-idle-buffer relay as an origin;
//! a TLS parent takes a generic relay over the TLS stream (it holds a buffer per direction).

use std::io;
use std::net::{IpAddr, Shutdown};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::Proxy;
use super::body::ClientBody;
use super::ctx::{RequestCtx, route_direct};
use super::target::Target;
use crate::connect;
use crate::connect::upstream::{HandshakeError, ParentSet, ParentStream, connect_handshake};
use crate::error::ProxyError;
use crate::limit::TunnelPermit;
use crate::server::ClientIo;
use crate::state::Snapshot;

/// Bytes read per syscall while a burst lasts.
const BURST_BUF: usize = 64 * 1024;

/// Buffer per direction of the generic (TLS parent) relay.
const IO_BUF: usize = 16 * 1024;

/// The far end of a tunnel and the bytes already read from it (a parent's early data).
enum Far {
    Tcp(TcpStream, Bytes),
    Stream(ParentStream, Bytes),
}

/// How a tunnel ended, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelEnd {
    Closed,
    IdleTimeout,
    Error,
    Shutdown,
}

impl TunnelEnd {
    pub fn as_error(self) -> Option<&'static str> {
        match self {
            TunnelEnd::Closed => None,
            TunnelEnd::IdleTimeout => Some("tunnel-idle-timeout"),
            TunnelEnd::Error => Some("tunnel-error"),
            TunnelEnd::Shutdown => Some("shutting-down"),
        }
    }
}

pub async fn open(
    proxy: &Arc<Proxy>,
    snap: &Arc<Snapshot>,
    ctx: &mut RequestCtx,
    target: &Target,
    check: impl FnMut(IpAddr) -> Result<(), ProxyError>,
    req: Request<Incoming>,
    permit: TunnelPermit,
) -> Result<Response<ClientBody>, ProxyError> {
    let vetted = connect::resolve_vetted(
        &snap.resolver,
        &proxy.metrics,
        &target.host,
        target.port,
        check,
    )
    .await?;
    let (origin, addr) =
        connect::dial(&vetted, snap.config.timeouts.connect, &proxy.metrics).await?;
    ctx.resolved = Some(addr);
    ctx.route = route_direct();
    Ok(spawn_tunnel(
        proxy,
        snap,
        ctx,
        req,
        permit,
        Far::Tcp(origin, Bytes::new()),
    ))
}

/// CONNECT through one of `parents`: dial it, send our own CONNECT with the hostname and
/// the parent's credentials, and splice once it answers 2xx. A parent that cannot be
/// reached (or closes before answering) is marked down and the next one tried: the client
/// has sent nothing yet. A refusal (407, 403, 5xx, ...) is final: 502 upstream-refused.
pub async fn open_via_parent(
    proxy: &Arc<Proxy>,
    snap: &Arc<Snapshot>,
    ctx: &mut RequestCtx,
    target: &Target,
    parents: &ParentSet,
    req: Request<Incoming>,
    permit: TunnelPermit,
) -> Result<Response<ClientBody>, ProxyError> {
    let timeouts = &snap.config.timeouts;
    let mut attempts = parents.attempts()?;
    let far = loop {
        let Some(parent) = attempts.next_parent() else {
            return Err(attempts.exhausted());
        };
        ctx.route = parent.label().clone();
        let dialled = parent
            .dial(&snap.resolver, timeouts.connect, &proxy.metrics)
            .await;
        let (stream, addr) = match dialled {
            Ok(dialled) => dialled,
            Err(failure) => {
                proxy.metrics.upstream_request(parent.label(), false);
                attempts.failed(parent, failure);
                continue;
            }
        };
        ctx.resolved = Some(addr);
        let answer = connect_handshake(
            stream,
            &target.authority,
            parent.auth(),
            timeouts.upstream_response_header,
        )
        .await;
        let refused = |e| {
            proxy.metrics.upstream_request(parent.label(), false);
            e
        };
        match answer {
            Ok((ParentStream::Plain(tcp), early)) => break Far::Tcp(tcp, early),
            Ok((stream, early)) => break Far::Stream(stream, early),
            Err(HandshakeError::Failure(failure)) => {
                proxy.metrics.upstream_request(parent.label(), false);
                attempts.failed(parent, failure);
            }
            Err(HandshakeError::Refused(status)) => {
                return Err(refused(ProxyError::UpstreamRefused {
                    parent: parent.label().to_string(),
                    status,
                }));
            }
            Err(HandshakeError::Timeout) => {
                return Err(refused(ProxyError::UpstreamTimeout {
                    parent: parent.label().to_string(),
                    timeout: timeouts.upstream_response_header,
                }));
            }
            Err(HandshakeError::Bad(reason)) => {
                return Err(refused(ProxyError::BadResponse { addr, reason }));
            }
        }
    };
    proxy.metrics.upstream_request(&ctx.route, true);
    Ok(spawn_tunnel(proxy, snap, ctx, req, permit, far))
}

/// Answer 200 and relay in a task of its own, which logs the tunnel when it closes.
fn spawn_tunnel(
    proxy: &Arc<Proxy>,
    snap: &Arc<Snapshot>,
    ctx: &mut RequestCtx,
    req: Request<Incoming>,
    permit: TunnelPermit,
    far: Far,
) -> Response<ClientBody> {
    ctx.status = 200;

    // The tunnel writes its own log line when it closes.
    let mut tunnel_ctx = RequestCtx::detached_from(ctx);
    let idle = snap.config.timeouts.tunnel_idle;
    let proxy = proxy.clone();
    let tracker = proxy.tracker.clone();
    let guard = tracker.tunnel_started();
    tokio::spawn(async move {
        let _guard = guard;
        let _permit = permit;
        let metrics_guard = proxy.metrics.tunnel_opened();
        let started = Instant::now();
        let (up, down, end) = match hyper::upgrade::on(req).await {
            Ok(upgraded) => match take_client_stream(upgraded) {
                Ok((client, buffered)) => match far {
                    Far::Tcp(origin, early) => {
                        relay(client, origin, buffered, early, idle, &proxy.tracker).await
                    }
                    Far::Stream(origin, early) => {
                        relay_io(client, origin, buffered, early, idle, &proxy.tracker).await
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, "CONNECT upgrade returned an unexpected stream type");
                    (0, 0, TunnelEnd::Error)
                }
            },
            Err(e) => {
                tracing::debug!(error = %e, "client went away before the tunnel started");
                (0, 0, TunnelEnd::Error)
            }
        };
        drop(metrics_guard);
        proxy.metrics.tunnel_finished(started.elapsed(), up, down);
        if let Some(kind) = end.as_error() {
            tunnel_ctx.note_error(kind);
        }
        tunnel_ctx.bytes_from_client.store(up, Ordering::Relaxed);
        tunnel_ctx.finish_async(&proxy.log, down).await;
    });
    Response::new(ClientBody::empty())
}

/// The client's socket and whatever hyper had already read past the CONNECT head
/// (a pipelined TLS ClientHello, say).
fn take_client_stream(
    upgraded: hyper::upgrade::Upgraded,
) -> Result<(TcpStream, Bytes), &'static str> {
    let parts = upgraded
        .downcast::<TokioIo<ClientIo>>()
        .map_err(|_| "not a ClientIo")?;
    let (prefix, stream) = parts.io.into_inner().into_parts();
    let buffered = match prefix {
        Some(prefix) if !parts.read_buf.is_empty() => {
            let mut all = Vec::with_capacity(parts.read_buf.len() + prefix.len());
            all.extend_from_slice(&parts.read_buf);
            all.extend_from_slice(&prefix);
            Bytes::from(all)
        }
        Some(prefix) => prefix,
        None => parts.read_buf,
    };
    // `read_buf` is a view into hyper's whole read buffer (8 KiB+): keep only the bytes,
    // so that an idle tunnel does not hold hyper's buffer for its lifetime.
    let buffered = if buffered.is_empty() {
        Bytes::new()
    } else {
        Bytes::copy_from_slice(&buffered)
    };
    Ok((stream, buffered))
}

/// Relay until both directions are done. Returns (client→origin, origin→client) bytes.
/// `buffered` goes to the origin first, `early` (a parent's bytes after its head) to the
/// client first.
pub async fn relay(
    client: TcpStream,
    origin: TcpStream,
    buffered: Bytes,
    early: Bytes,
    idle: Duration,
    tracker: &crate::server::Tracker,
) -> (u64, u64, TunnelEnd) {
    let start = Instant::now();
    let last_activity = AtomicU64::new(0);
    let up_bytes = AtomicU64::new(buffered.len() as u64);
    let down_bytes = AtomicU64::new(early.len() as u64);
    let (mut buffered, mut early) = (Some(buffered), Some(early));
    let relay = async {
        // Written, then dropped: nothing but the sockets lives on while the tunnel idles.
        if let Some(bytes) = buffered.take().filter(|b| !b.is_empty()) {
            write_all(&origin, &bytes).await?;
        }
        if let Some(bytes) = early.take().filter(|b| !b.is_empty()) {
            write_all(&client, &bytes).await?;
        }
        tokio::try_join!(
            pipe(&client, &origin, &up_bytes, &last_activity, start),
            pipe(&origin, &client, &down_bytes, &last_activity, start),
        )
    };
    let end = tokio::select! {
        result = relay => if result.is_ok() { TunnelEnd::Closed } else { TunnelEnd::Error },
        _ = idle_watch(start, &last_activity, idle) => TunnelEnd::IdleTimeout,
        _ = tracker.hard_stop() => TunnelEnd::Shutdown,
    };
    (
        up_bytes.load(Ordering::Relaxed),
        down_bytes.load(Ordering::Relaxed),
        end,
    )
}

/// As [`relay`], for a far end that is not a bare `TcpStream` (TLS to a parent).
async fn relay_io<S: AsyncRead + AsyncWrite + Unpin>(
    client: TcpStream,
    origin: S,
    buffered: Bytes,
    early: Bytes,
    idle: Duration,
    tracker: &crate::server::Tracker,
) -> (u64, u64, TunnelEnd) {
    let start = Instant::now();
    let last_activity = AtomicU64::new(0);
    let up_bytes = AtomicU64::new(buffered.len() as u64);
    let down_bytes = AtomicU64::new(early.len() as u64);
    let (mut client_rd, mut client_wr) = client.into_split();
    let (mut origin_rd, mut origin_wr) = tokio::io::split(origin);
    let relay = async {
        if !buffered.is_empty() {
            origin_wr.write_all(&buffered).await?;
            origin_wr.flush().await?;
        }
        if !early.is_empty() {
            client_wr.write_all(&early).await?;
        }
        tokio::try_join!(
            pipe_io(
                &mut client_rd,
                &mut origin_wr,
                &up_bytes,
                &last_activity,
                start
            ),
            pipe_io(
                &mut origin_rd,
                &mut client_wr,
                &down_bytes,
                &last_activity,
                start
            ),
        )
    };
    let end = tokio::select! {
        result = relay => if result.is_ok() { TunnelEnd::Closed } else { TunnelEnd::Error },
        _ = idle_watch(start, &last_activity, idle) => TunnelEnd::IdleTimeout,
        _ = tracker.hard_stop() => TunnelEnd::Shutdown,
    };
    (
        up_bytes.load(Ordering::Relaxed),
        down_bytes.load(Ordering::Relaxed),
        end,
    )
}

/// Resolves once nothing has moved for `idle` (activity is milliseconds since `start`).
async fn idle_watch(start: Instant, last_activity: &AtomicU64, idle: Duration) {
    loop {
        let last = Duration::from_millis(last_activity.load(Ordering::Relaxed));
        let deadline = start + last + idle;
        let now = Instant::now();
        if now >= deadline {
            return;
        }
        tokio::time::sleep(deadline - now).await;
    }
}

/// Copy `from` → `to` until EOF, then shut `to`'s write side (for TLS: close_notify).
async fn pipe_io<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    from: &mut R,
    to: &mut W,
    total: &AtomicU64,
    activity: &AtomicU64,
    start: Instant,
) -> io::Result<()> {
    let mut buf = vec![0u8; IO_BUF];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            let _ = to.shutdown().await;
            return Ok(());
        }
        activity.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
        to.write_all(&buf[..n]).await?;
        to.flush().await?;
        total.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Copy `from` → `to` until EOF, then shut `to`'s write side (half-close).
async fn pipe(
    from: &TcpStream,
    to: &TcpStream,
    total: &AtomicU64,
    activity: &AtomicU64,
    start: Instant,
) -> io::Result<()> {
    loop {
        from.readable().await?;
        // The buffer is borrowed from this thread only while a burst of data lasts.
        let mut buf = borrow_buffer();
        loop {
            buf.clear();
            // A read shorter than the buffer drained the socket, so readiness is cleared
            // right away (by answering WouldBlock to `try_io`) instead of paying one more
            // read() per burst just to hear WouldBlock. Bytes that arrive meanwhile raise a
            // new readiness event, which tokio does not clear.
            let mut drained = false;
            let read = from.try_io(tokio::io::Interest::READABLE, || {
                let n = from.try_read_buf(&mut buf)?;
                if n > 0 && n < BURST_BUF {
                    drained = true;
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Ok(n)
            });
            let read = match read {
                Err(e) if drained && e.kind() == io::ErrorKind::WouldBlock => Ok(buf.len()),
                other => other,
            };
            match read {
                Ok(0) => {
                    // Peer finished sending: pass the FIN on, keep the other direction open.
                    let _ = socket2::SockRef::from(to).shutdown(Shutdown::Write);
                    return Ok(());
                }
                Ok(n) => {
                    activity.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
                    write_all(to, &buf[..n]).await?;
                    total.fetch_add(n as u64, Ordering::Relaxed);
                    if drained {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        return_buffer(buf);
    }
}

thread_local! {
    /// Relay buffers this thread lends for one burst at a time: idle tunnels hold none,
    /// and a busy thread reuses a few instead of allocating 64 KiB per burst.
    static SPARE_BUFFERS: std::cell::RefCell<Vec<Vec<u8>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Buffers a thread keeps for reuse; more concurrent bursts allocate and free their own.
const SPARE_BUFFERS_PER_THREAD: usize = 8;

fn borrow_buffer() -> Vec<u8> {
    SPARE_BUFFERS
        .with(|spare| spare.borrow_mut().pop())
        .unwrap_or_else(|| Vec::with_capacity(BURST_BUF))
}

fn return_buffer(mut buf: Vec<u8>) {
    buf.clear();
    SPARE_BUFFERS.with(|spare| {
        let mut spare = spare.borrow_mut();
        if spare.len() < SPARE_BUFFERS_PER_THREAD {
            spare.push(buf);
        }
    });
}

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
