//! Moving a tunnel's bytes: two directions, each copying until its source's EOF, which is
//! passed on as a half-close (the other side's write is shut); the tunnel ends when both
//! directions are done, on an error, after `tunnel_idle` without a byte in either
//! direction, or at the end of a shutdown's grace period.
//!
//! The relay holds no buffer while a tunnel is idle: a buffer is borrowed from a
//! per-thread pool for each burst of readable data and given back on `WouldBlock`.

use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// Bytes read per syscall while a burst lasts.
const BURST_BUF: usize = 64 * 1024;

/// Buffer per direction of the generic (TLS parent) relay.
const IO_BUF: usize = 16 * 1024;

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
pub async fn relay_io<S: AsyncRead + AsyncWrite + Unpin>(
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
