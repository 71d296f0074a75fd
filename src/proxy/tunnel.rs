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

use std::io;
use std::net::{IpAddr, Shutdown};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::Proxy;
use super::body::ClientBody;
use super::ctx::{ROUTE_DIRECT, RequestCtx};
use super::target::Target;
use crate::connect;
use crate::error::ProxyError;
use crate::limit::TunnelPermit;
use crate::server::ClientIo;
use crate::state::Snapshot;

/// Bytes read per syscall while a burst lasts.
const BURST_BUF: usize = 64 * 1024;

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
    ctx.route = Arc::from(ROUTE_DIRECT);
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
                Ok((client, buffered)) => {
                    relay(client, origin, buffered, idle, &proxy.tracker).await
                }
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
    Ok(Response::new(ClientBody::empty()))
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
    Ok((stream, buffered))
}

/// Relay until both directions are done. Returns (client→origin, origin→client) bytes.
pub async fn relay(
    client: TcpStream,
    origin: TcpStream,
    buffered: Bytes,
    idle: Duration,
    tracker: &crate::server::Tracker,
) -> (u64, u64, TunnelEnd) {
    let start = Instant::now();
    let last_activity = AtomicU64::new(0);
    let up_bytes = AtomicU64::new(buffered.len() as u64);
    let down_bytes = AtomicU64::new(0);
    let relay = async {
        if !buffered.is_empty() {
            write_all(&origin, &buffered).await?;
        }
        tokio::try_join!(
            pipe(&client, &origin, &up_bytes, &last_activity, start),
            pipe(&origin, &client, &down_bytes, &last_activity, start),
        )
    };
    let idle_watch = async {
        loop {
            let last = Duration::from_millis(last_activity.load(Ordering::Relaxed));
            let deadline = start + last + idle;
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            tokio::time::sleep(deadline - now).await;
        }
    };
    let end = tokio::select! {
        result = relay => if result.is_ok() { TunnelEnd::Closed } else { TunnelEnd::Error },
        _ = idle_watch => TunnelEnd::IdleTimeout,
        _ = tracker.hard_stop() => TunnelEnd::Shutdown,
    };
    (
        up_bytes.load(Ordering::Relaxed),
        down_bytes.load(Ordering::Relaxed),
        end,
    )
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
        // The buffer lives only while this burst of data lasts.
        let mut buf = Vec::with_capacity(BURST_BUF);
        loop {
            buf.clear();
            match from.try_read_buf(&mut buf) {
                Ok(0) => {
                    // Peer finished sending: pass the FIN on, keep the other direction open.
                    let _ = socket2::SockRef::from(to).shutdown(Shutdown::Write);
                    return Ok(());
                }
                Ok(n) => {
                    activity.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
                    write_all(to, &buf[..n]).await?;
                    total.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
    }
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
