//! Moving a tunnel's bytes: two directions, each moving bytes until its source's EOF,
//! which is passed on as a half-close (the other side's write is shut); the tunnel ends
//! when both directions are done, on an error, after `tunnel_idle` without a byte in
//! either direction, or at the end of a shutdown's grace period.
//!
//! Between two plain TCP sockets (an origin, or a plain-TCP parent) each burst of readable
//! data is, on Linux, spliced socket → pipe → socket (`tunnel.relay = "splice"`, the
//! default; see `relay::splice`), so the bytes never pass through user space; elsewhere,
//! with `"copy"`, or when splice cannot be used, it is copied through a buffer. Either
//! way the pipe or buffer is borrowed from a per-thread pool for the burst only and given
//! back once the source says `WouldBlock`: an idle tunnel holds neither.
//!
//! Both sockets get `TCP_NOTSENT_LOWAT` (`tunnel.notsent_lowat`): the destination counts as
//! writable only while little of what was written is still unsent, so a direction stalls
//! on its destination instead of forwarding every segment the moment it arrives. What the
//! source sends meanwhile waits in the kernel, and the next burst takes it in one go. That
//! is what the peers pay for (README, Performance: what a relay does to its peers).
//!
//! A TLS parent takes [`relay_io`], a plain copy over the TLS stream with a buffer per
//! direction.

use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::error::ErrorKind;
use crate::net::write_all;

mod config;
#[cfg(target_os = "linux")]
mod splice;

pub use self::config::{RelayMode, RelaySettings, TunnelConfig, TunnelConfigError};

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
    pub fn as_error(self) -> Option<ErrorKind> {
        match self {
            TunnelEnd::Closed => None,
            TunnelEnd::IdleTimeout => Some(ErrorKind::TunnelIdleTimeout),
            TunnelEnd::Error => Some(ErrorKind::TunnelError),
            TunnelEnd::Shutdown => Some(ErrorKind::ShuttingDown),
        }
    }
}

/// What one direction has moved: its byte count, and the tunnel's last activity
/// (milliseconds since `start`, shared by both directions for the idle timeout).
struct Moved<'a> {
    total: &'a AtomicU64,
    activity: &'a AtomicU64,
    start: Instant,
}

impl Moved<'_> {
    /// Bytes have arrived from the source.
    fn arrived(&self) {
        self.activity
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Bytes have been written to the destination.
    fn delivered(&self, n: usize) {
        self.total.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Relay until both directions are done. Returns (client→origin, origin→client) bytes.
/// `buffered` goes to the origin first, `early` (a parent's bytes after its head) to the
/// client first.
pub async fn relay(
    client: TcpStream,
    origin: TcpStream,
    (buffered, early): (Bytes, Bytes),
    idle: Duration,
    settings: RelaySettings,
    tracker: &crate::tracker::Tracker,
) -> (u64, u64, TunnelEnd) {
    tune(&client, settings.client_nodelay, &settings);
    tune(&origin, settings.origin_nodelay, &settings);
    let start = Instant::now();
    let last_activity = AtomicU64::new(0);
    let up_bytes = AtomicU64::new(buffered.len() as u64);
    let down_bytes = AtomicU64::new(early.len() as u64);
    let (mut buffered, mut early) = (Some(buffered), Some(early));
    let up = Moved {
        total: &up_bytes,
        activity: &last_activity,
        start,
    };
    let down = Moved {
        total: &down_bytes,
        ..up
    };
    let relay = async {
        // Written, then dropped: nothing but the sockets lives on while the tunnel idles.
        if let Some(bytes) = buffered.take().filter(|b| !b.is_empty()) {
            write_all(&origin, &bytes).await?;
        }
        if let Some(bytes) = early.take().filter(|b| !b.is_empty()) {
            write_all(&client, &bytes).await?;
        }
        tokio::try_join!(
            pipe(&client, &origin, &up, &settings),
            pipe(&origin, &client, &down, &settings),
        )
    };
    let end = run_until_end(relay, start, &last_activity, idle, tracker).await;
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
    (buffered, early): (Bytes, Bytes),
    idle: Duration,
    settings: RelaySettings,
    tracker: &crate::tracker::Tracker,
) -> (u64, u64, TunnelEnd) {
    tune(&client, settings.client_nodelay, &settings);
    let start = Instant::now();
    let last_activity = AtomicU64::new(0);
    let up_bytes = AtomicU64::new(buffered.len() as u64);
    let down_bytes = AtomicU64::new(early.len() as u64);
    let up = Moved {
        total: &up_bytes,
        activity: &last_activity,
        start,
    };
    let down = Moved {
        total: &down_bytes,
        ..up
    };
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
            pipe_io(&mut client_rd, &mut origin_wr, &up),
            pipe_io(&mut origin_rd, &mut client_wr, &down),
        )
    };
    let end = run_until_end(relay, start, &last_activity, idle, tracker).await;
    (
        up_bytes.load(Ordering::Relaxed),
        down_bytes.load(Ordering::Relaxed),
        end,
    )
}

/// The socket options `[tunnel]` asks for; a refusal is logged, never fatal (the tunnel
/// works with the kernel's defaults). Accept and dial (`connect::dial_first`) already set
/// `TCP_NODELAY` on every socket, so it is only touched here to turn it off: no system
/// call per tunnel for what is already true.
fn tune(stream: &TcpStream, nodelay: bool, settings: &RelaySettings) {
    let sock = socket2::SockRef::from(stream);
    let mut result = Ok(());
    if !nodelay {
        result = sock.set_tcp_nodelay(false);
    }
    if settings.send_buffer > 0 {
        result = result.and(sock.set_send_buffer_size(settings.send_buffer));
    }
    if settings.recv_buffer > 0 {
        result = result.and(sock.set_recv_buffer_size(settings.recv_buffer));
    }
    #[cfg(target_os = "linux")]
    if settings.notsent_lowat > 0 {
        result = result.and(sock.set_tcp_notsent_lowat(settings.notsent_lowat));
    }
    if let Err(e) = result {
        tracing::debug!(error = %e, "a [tunnel] socket option was refused");
    }
}

/// Drive `relay` until both directions are done, or an error, the idle timeout, or the end
/// of the shutdown grace, whichever comes first (for both relays alike).
async fn run_until_end<T>(
    relay: impl std::future::Future<Output = io::Result<T>>,
    start: Instant,
    last_activity: &AtomicU64,
    idle: Duration,
    tracker: &crate::tracker::Tracker,
) -> TunnelEnd {
    tokio::select! {
        result = relay => if result.is_ok() { TunnelEnd::Closed } else { TunnelEnd::Error },
        _ = idle_watch(start, last_activity, idle) => TunnelEnd::IdleTimeout,
        _ = tracker.hard_stop() => TunnelEnd::Shutdown,
    }
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
    moved: &Moved<'_>,
) -> io::Result<()> {
    let mut buf = vec![0u8; IO_BUF];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            let _ = to.shutdown().await;
            return Ok(());
        }
        moved.arrived();
        to.write_all(&buf[..n]).await?;
        to.flush().await?;
        moved.delivered(n);
    }
}

/// How a burst of readable data ended.
enum Burst {
    /// The source has nothing more for now: wait until it is readable again.
    Drained,
    /// The source has finished sending.
    Eof,
}

/// Copy `from` → `to` until EOF, then shut `to`'s write side (half-close). Each burst of
/// readable data is spliced (`"splice"`, Linux) or else copied through a borrowed buffer.
async fn pipe(
    from: &TcpStream,
    to: &TcpStream,
    moved: &Moved<'_>,
    settings: &RelaySettings,
) -> io::Result<()> {
    loop {
        from.readable().await?;
        let burst = match settings.mode {
            #[cfg(target_os = "linux")]
            RelayMode::Splice => match splice::burst(from, to, moved, settings.pipe).await? {
                Some(burst) => burst,
                None => copy_burst(from, to, moved, settings.buffer).await?,
            },
            _ => copy_burst(from, to, moved, settings.buffer).await?,
        };
        if let Burst::Eof = burst {
            // Peer finished sending: pass the FIN on, keep the other direction open.
            let _ = socket2::SockRef::from(to).shutdown(Shutdown::Write);
            return Ok(());
        }
    }
}

/// One burst of `from` → `to` through a buffer of `size` bytes borrowed from this thread
/// for the burst.
async fn copy_burst(
    from: &TcpStream,
    to: &TcpStream,
    moved: &Moved<'_>,
    size: usize,
) -> io::Result<Burst> {
    let mut lent = LentBuffer::borrow(size);
    let buf = &mut lent.0;
    loop {
        buf.clear();
        // A read shorter than the buffer drained the socket, so readiness is cleared
        // right away (by answering WouldBlock to `try_io`) instead of paying one more
        // read() per burst just to hear WouldBlock. Bytes that arrive meanwhile raise a
        // new readiness event, which tokio does not clear.
        let mut drained = false;
        let read = from.try_io(tokio::io::Interest::READABLE, || {
            let n = from.try_read_buf(buf)?;
            if n > 0 && n < size {
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
            Ok(0) => return Ok(Burst::Eof),
            Ok(n) => {
                moved.arrived();
                write_all(to, &buf[..n]).await?;
                moved.delivered(n);
                if drained {
                    return Ok(Burst::Drained);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Burst::Drained),
            Err(e) => return Err(e),
        }
    }
}

thread_local! {
    /// Relay buffers this thread lends for one burst at a time: idle tunnels hold none,
    /// and a busy thread reuses a few instead of allocating one per burst.
    static SPARE_BUFFERS: std::cell::RefCell<Vec<Vec<u8>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Buffers a thread keeps for reuse; more concurrent bursts allocate and free their own.
const SPARE_BUFFERS_PER_THREAD: usize = 8;

/// A buffer lent to one burst; dropped, it goes back to this thread's spares (also when
/// the tunnel ends mid-burst).
struct LentBuffer(Vec<u8>);

impl LentBuffer {
    /// Room for exactly `size` bytes: `try_read_buf` fills the capacity, and the copy
    /// path tells a drained socket by a short read. A spare of another size (from before a
    /// reload changed `tunnel.buffer`) is freed.
    fn borrow(size: usize) -> LentBuffer {
        #[cfg(test)]
        tests::LENT_BUFFERS.with(|n| n.set(n.get() + 1));
        let buf = SPARE_BUFFERS
            .with(|spare| spare.borrow_mut().pop())
            .filter(|buf| buf.capacity() == size)
            .unwrap_or_else(|| Vec::with_capacity(size));
        LentBuffer(buf)
    }
}

impl Drop for LentBuffer {
    fn drop(&mut self) {
        #[cfg(test)]
        let _ = tests::LENT_BUFFERS.try_with(|n| n.set(n.get() - 1));
        let mut buf = std::mem::take(&mut self.0);
        buf.clear();
        // `try_with`: a thread being torn down just frees it.
        let _ = SPARE_BUFFERS.try_with(|spare| {
            let mut spare = spare.borrow_mut();
            if spare.len() < SPARE_BUFFERS_PER_THREAD {
                spare.push(buf);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::task::JoinHandle;

    use super::*;
    use crate::tracker::Tracker;

    const MIB: usize = 1024 * 1024;

    thread_local! {
        /// Copy buffers lent by this thread and not given back yet.
        pub(super) static LENT_BUFFERS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    fn lent_buffers() -> usize {
        LENT_BUFFERS.get()
    }

    /// Bytes held for bursts (pipes and buffers) by this thread's relays right now.
    fn lent_anything() -> usize {
        #[cfg(target_os = "linux")]
        return lent_buffers() + lent_pipes();
        #[cfg(not(target_os = "linux"))]
        lent_buffers()
    }

    /// What a stream carries: a pseudo-random block repeated. Its length is prime, so it
    /// never lines up with read or write sizes: a lost, doubled or reordered chunk shows.
    const PERIOD: usize = 65_521;

    fn block(seed: u64) -> Arc<Vec<u8>> {
        let mut x = seed | 1;
        let bytes = (0..PERIOD)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        Arc::new(bytes)
    }

    /// Write `len` bytes of `block`'s stream (and keep the write side open).
    async fn write_stream(mut to: impl AsyncWrite + Unpin, block: Arc<Vec<u8>>, len: usize) {
        let mut sent = 0;
        while sent < len {
            let at = sent % PERIOD;
            let n = (PERIOD - at).min(len - sent).min(40_000);
            to.write_all(&block[at..at + n]).await.unwrap();
            sent += n;
        }
    }

    /// Write `len` bytes of `block`'s stream, then shut the write side.
    async fn send(mut to: impl AsyncWrite + Unpin, block: Arc<Vec<u8>>, len: usize) {
        write_stream(&mut to, block, len).await;
        to.shutdown().await.unwrap();
    }

    /// Read to EOF, `sip` bytes at most at a time, checking every byte against `block`'s
    /// stream; the count read.
    async fn receive_by(
        mut from: impl AsyncRead + Unpin,
        block: Arc<Vec<u8>>,
        sip: usize,
    ) -> usize {
        let mut buf = vec![0u8; sip];
        let mut got = 0;
        loop {
            let n = from.read(&mut buf).await.unwrap();
            if n == 0 {
                return got;
            }
            let mut at = got % PERIOD;
            let mut rest = &buf[..n];
            while !rest.is_empty() {
                let k = rest.len().min(PERIOD - at);
                assert!(
                    rest[..k] == block[at..at + k],
                    "wrong bytes near offset {got}"
                );
                rest = &rest[k..];
                at = 0;
            }
            got += n;
        }
    }

    async fn receive(from: impl AsyncRead + Unpin, block: Arc<Vec<u8>>) -> usize {
        receive_by(from, block, 100_000).await
    }

    /// A connected loopback pair: (Kalmar's end, the peer's end).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let connect = TcpStream::connect(listener.local_addr().unwrap());
        let (peer, accepted) = tokio::join!(connect, listener.accept());
        (accepted.unwrap().0, peer.unwrap())
    }

    struct Tunnel {
        /// The client's end and the origin's end of the tunnel.
        client: TcpStream,
        origin: TcpStream,
        relay: JoinHandle<(u64, u64, TunnelEnd)>,
    }

    /// The relay as `[tunnel] relay = "splice"` runs it (on Linux; a copy elsewhere).
    const SPLICE: RelaySettings = RelaySettings {
        mode: RelayMode::Splice,
        buffer: 16 * 1024,
        pipe: 256 * 1024,
        client_nodelay: true,
        origin_nodelay: true,
        send_buffer: 0,
        recv_buffer: 0,
        notsent_lowat: 0,
    };

    /// `relay = "copy"` with the shipped buffer: every test's bursts span many reads.
    const COPY: RelaySettings = RelaySettings {
        mode: RelayMode::Copy,
        ..SPLICE
    };

    /// The shipped settings: splice, and `TCP_NOTSENT_LOWAT` on both sockets.
    const SHIPPED: RelaySettings = RelaySettings {
        notsent_lowat: 16 * 1024,
        ..SPLICE
    };

    /// A copy with the low-water mark, and both sockets' buffers set by hand.
    const COPY_TUNED: RelaySettings = RelaySettings {
        notsent_lowat: 4 * 1024,
        send_buffer: 64 * 1024,
        recv_buffer: 64 * 1024,
        ..COPY
    };

    #[test]
    fn the_shipped_default_is_what_the_tests_call_shipped() {
        assert_eq!(RelaySettings::default(), SHIPPED);
    }

    #[tokio::test]
    async fn eight_mib_each_way_with_the_low_water_mark() {
        #[cfg(target_os = "linux")]
        splice::test_hooks::reset();
        both_ways(8 * MIB, SHIPPED).await;
        both_ways(8 * MIB, COPY_TUNED).await;
        assert_eq!(lent_anything(), 0);
    }

    #[tokio::test]
    async fn a_slow_reader_gets_everything_with_the_low_water_mark() {
        slow_reader(SHIPPED).await;
        slow_reader(COPY_TUNED).await;
    }

    #[tokio::test]
    async fn the_socket_options_are_set() {
        let (client_side, _client) = pair().await;
        // As accept and dial leave it.
        client_side.set_nodelay(true).unwrap();
        tune(&client_side, false, &COPY_TUNED);
        let sock = socket2::SockRef::from(&client_side);
        assert!(!sock.tcp_nodelay().unwrap());
        #[cfg(target_os = "linux")]
        assert_eq!(sock.tcp_notsent_lowat().unwrap(), 4 * 1024);
        // Linux doubles what it is asked for (bookkeeping overhead).
        assert!(sock.recv_buffer_size().unwrap() >= 64 * 1024);
        client_side.set_nodelay(true).unwrap();
        tune(&client_side, true, &SHIPPED);
        assert!(sock.tcp_nodelay().unwrap());
        #[cfg(target_os = "linux")]
        assert_eq!(sock.tcp_notsent_lowat().unwrap(), 16 * 1024);
    }

    async fn tunnel(settings: RelaySettings) -> Tunnel {
        let (client_side, client) = pair().await;
        let (origin_side, origin) = pair().await;
        let idle = Duration::from_secs(60);
        tunnel_between((client_side, client), (origin_side, origin), idle, settings)
    }

    fn tunnel_between(
        client: (TcpStream, TcpStream),
        origin: (TcpStream, TcpStream),
        idle: Duration,
        settings: RelaySettings,
    ) -> Tunnel {
        let tracker = Tracker::new();
        let (client_side, origin_side) = (client.0, origin.0);
        let relay = tokio::spawn(async move {
            relay(
                client_side,
                origin_side,
                (Bytes::new(), Bytes::new()),
                idle,
                settings,
                &tracker,
            )
            .await
        });
        Tunnel {
            client: client.1,
            origin: origin.1,
            relay,
        }
    }

    /// Pipes lent by this thread (the test's runtime is single-threaded) right now.
    #[cfg(target_os = "linux")]
    fn lent_pipes() -> usize {
        splice::test_hooks::lent_here()
    }

    /// `len` bytes each way at once, checked end to end.
    async fn both_ways(len: usize, settings: RelaySettings) {
        let Tunnel {
            client,
            origin,
            relay,
        } = tunnel(settings).await;
        let (up, down) = (block(1), block(2));
        let (client_rd, client_wr) = client.into_split();
        let (origin_rd, origin_wr) = origin.into_split();
        let ((), (), got_up, got_down, (up_bytes, down_bytes, end)) = tokio::join!(
            send(client_wr, up.clone(), len),
            send(origin_wr, down.clone(), len),
            receive(origin_rd, up),
            receive(client_rd, down),
            async { relay.await.unwrap() },
        );
        assert_eq!((got_up, got_down), (len, len));
        assert_eq!((up_bytes, down_bytes), (len as u64, len as u64));
        assert_eq!(end, TunnelEnd::Closed);
    }

    #[tokio::test]
    async fn eight_mib_each_way_at_once() {
        #[cfg(target_os = "linux")]
        splice::test_hooks::reset();
        both_ways(8 * MIB, SPLICE).await;
        #[cfg(target_os = "linux")]
        {
            assert!(splice::test_hooks::splice_works(), "the bytes were spliced");
            assert_eq!(lent_pipes(), 0);
            assert!(splice::test_hooks::spare_here() <= splice::test_hooks::SPARE_MAX);
        }
    }

    #[tokio::test]
    async fn eight_mib_each_way_at_once_in_copy_mode() {
        both_ways(8 * MIB, COPY).await;
        assert_eq!(lent_anything(), 0);
        let spare = SPARE_BUFFERS.with(|spare| spare.borrow().len());
        assert!((1..=SPARE_BUFFERS_PER_THREAD).contains(&spare), "{spare}");
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn eight_mib_each_way_at_once_when_splice_is_unsupported() {
        // Splice "unsupported" on its first use: this thread copies from then on.
        splice::test_hooks::reset();
        splice::test_hooks::fail_splice(0, rustix::io::Errno::INVAL);
        both_ways(8 * MIB, SPLICE).await;
        assert!(splice::test_hooks::splice_off());
        assert_eq!(lent_pipes(), 0);
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn splice_unsupported_towards_the_socket_still_delivers_what_the_pipe_holds() {
        // The first splice (socket → pipe) works, the second (pipe → socket) is refused:
        // the bytes already in the pipe must still arrive, in order, and copying takes
        // over. Only the client sends until then, so the order of the calls is known.
        splice::test_hooks::reset();
        splice::test_hooks::fail_splice(1, rustix::io::Errno::INVAL);
        let Tunnel {
            client,
            origin,
            relay,
        } = tunnel(SPLICE).await;
        let (up, down) = (block(3), block(4));
        let (client_rd, client_wr) = client.into_split();
        let (origin_rd, origin_wr) = origin.into_split();
        let ((), got_up) =
            tokio::join!(send(client_wr, up.clone(), 2 * MIB), receive(origin_rd, up));
        assert_eq!(got_up, 2 * MIB);
        assert!(splice::test_hooks::splice_off());
        let ((), got_down, (up_bytes, down_bytes, end)) = tokio::join!(
            send(origin_wr, down.clone(), MIB),
            receive(client_rd, down),
            async { relay.await.unwrap() },
        );
        assert_eq!(got_down, MIB);
        assert_eq!((up_bytes, down_bytes), (2 * MIB as u64, MIB as u64));
        assert_eq!(end, TunnelEnd::Closed);
        assert_eq!(lent_pipes(), 0);
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn once_splice_has_worked_its_errors_end_the_tunnel() {
        splice::test_hooks::reset();
        let Tunnel {
            mut client,
            mut origin,
            relay,
        } = tunnel(SPLICE).await;
        client.write_all(b"first").await.unwrap();
        let mut got = [0u8; 5];
        origin.read_exact(&mut got).await.unwrap();
        assert!(splice::test_hooks::splice_works());
        splice::test_hooks::fail_splice(0, rustix::io::Errno::INVAL);
        client.write_all(b"second").await.unwrap();
        let (_, _, end) = relay.await.unwrap();
        assert_eq!(end, TunnelEnd::Error);
        assert_eq!(lent_pipes(), 0);
    }

    #[tokio::test]
    async fn half_close_one_way_while_the_other_keeps_flowing() {
        half_close_one_way(SPLICE).await;
        half_close_one_way(COPY).await;
    }

    async fn half_close_one_way(settings: RelaySettings) {
        #[cfg(target_os = "linux")]
        splice::test_hooks::reset();
        let Tunnel {
            client,
            origin,
            relay,
        } = tunnel(settings).await;
        let (up, down) = (block(5), block(6));
        let (client_rd, client_wr) = client.into_split();
        let (origin_rd, mut origin_wr) = origin.into_split();
        // The client sends 1 MiB and shuts its write side while the origin is answering.
        let downloaded = tokio::spawn(receive(client_rd, down.clone()));
        let ((), (), got_up) = tokio::join!(
            write_stream(&mut origin_wr, down.clone(), 2 * MIB),
            send(client_wr, up.clone(), MIB),
            receive(origin_rd, up),
        );
        // The origin saw the EOF; the tunnel stays open for the rest of its answer.
        assert_eq!(got_up, MIB);
        assert!(!relay.is_finished());
        let mut rest = block(6).to_vec();
        rest.rotate_left(2 * MIB % PERIOD);
        send(origin_wr, Arc::new(rest), 2 * MIB).await;
        assert_eq!(downloaded.await.unwrap(), 4 * MIB);
        let (up_bytes, down_bytes, end) = relay.await.unwrap();
        assert_eq!((up_bytes, down_bytes), (MIB as u64, 4 * MIB as u64));
        assert_eq!(end, TunnelEnd::Closed);
    }

    /// A client end whose socket buffers are small, so that the relay's writes block soon.
    async fn narrow_pair() -> (TcpStream, TcpStream) {
        let (client_side, client) = pair().await;
        socket2::SockRef::from(&client_side)
            .set_send_buffer_size(16 * 1024)
            .unwrap();
        socket2::SockRef::from(&client)
            .set_recv_buffer_size(16 * 1024)
            .unwrap();
        (client_side, client)
    }

    #[tokio::test]
    async fn a_slow_reader_still_gets_everything() {
        slow_reader(SPLICE).await;
        slow_reader(COPY).await;
    }

    async fn slow_reader(settings: RelaySettings) {
        #[cfg(target_os = "linux")]
        splice::test_hooks::reset();
        let idle = Duration::from_secs(60);
        let Tunnel {
            client,
            origin,
            relay,
        } = tunnel_between(narrow_pair().await, pair().await, idle, settings);
        let down = block(7);
        let (client_rd, client_wr) = client.into_split();
        let (_origin_rd, origin_wr) = origin.into_split();
        let answer = tokio::spawn(send(origin_wr, down.clone(), 8 * MIB));

        // Nobody reads yet: the relay is stuck on the client with bytes in its pipe or
        // buffer, which it keeps.
        let waited = Instant::now();
        while lent_anything() != 1 {
            assert!(waited.elapsed() < Duration::from_secs(10), "nothing held");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(lent_anything(), 1);
        #[cfg(target_os = "linux")]
        assert_eq!(
            lent_pipes(),
            usize::from(settings.mode == RelayMode::Splice)
        );

        // Then a reader that takes small sips.
        assert_eq!(receive_by(client_rd, down, 4096).await, 8 * MIB);
        answer.await.unwrap();
        drop(client_wr);
        let (_, down_bytes, end) = relay.await.unwrap();
        assert_eq!(down_bytes, 8 * MIB as u64);
        assert_eq!(end, TunnelEnd::Closed);
        assert_eq!(lent_anything(), 0);
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_tunnel_ending_with_bytes_in_its_pipe_closes_the_pipe() {
        splice::test_hooks::reset();
        splice::test_hooks::close_spares();
        let idle = Duration::from_millis(300);
        let Tunnel {
            client,
            origin,
            relay,
        } = tunnel_between(narrow_pair().await, pair().await, idle, SPLICE);
        let (_origin_rd, origin_wr) = origin.into_split();
        let _answer = tokio::spawn(send(origin_wr, block(10), 8 * MIB));
        // Nobody reads: the relay holds a pipe with bytes in it until the idle timeout.
        let (_, _, end) = relay.await.unwrap();
        assert_eq!(end, TunnelEnd::IdleTimeout);
        assert!(splice::test_hooks::splice_works());
        assert_eq!(lent_pipes(), 0);
        assert_eq!(splice::test_hooks::spare_here(), 0, "closed, not kept");
        drop(client);
    }

    #[tokio::test]
    async fn idle_relays_hold_no_pipe_and_spares_stay_bounded() {
        idle_relays_hold_nothing(SPLICE).await;
    }

    #[tokio::test]
    async fn idle_relays_hold_no_buffer_in_copy_mode() {
        idle_relays_hold_nothing(COPY).await;
        let spare = SPARE_BUFFERS.with(|spare| spare.borrow().len());
        assert!((1..=SPARE_BUFFERS_PER_THREAD).contains(&spare), "{spare}");
    }

    async fn idle_relays_hold_nothing(settings: RelaySettings) {
        #[cfg(target_os = "linux")]
        splice::test_hooks::reset();
        let mut tunnels = Vec::new();
        for _ in 0..24 {
            tunnels.push(tunnel(settings).await);
        }
        // Every tunnel moves 512 KiB each way, all at once, then stays open and idle.
        let (up, down) = (block(8), block(9));
        let len = 512 * 1024;
        let moves = tunnels.iter_mut().map(|t| {
            let (client_rd, client_wr) = t.client.split();
            let (origin_rd, origin_wr) = t.origin.split();
            let (up, down) = (up.clone(), down.clone());
            async move {
                let (got_up, got_down, (), ()) = tokio::join!(
                    receive(origin_rd.take(len as u64), up.clone()),
                    receive(client_rd.take(len as u64), down.clone()),
                    write_stream(client_wr, up, len),
                    write_stream(origin_wr, down, len),
                );
                assert_eq!((got_up, got_down), (len, len));
            }
        });
        futures_util::future::join_all(moves).await;
        // Every byte has arrived, so every relay has given its pipe or buffer back.
        assert_eq!(lent_anything(), 0, "an idle relay holds nothing");
        #[cfg(target_os = "linux")]
        if settings.mode == RelayMode::Splice {
            assert!(splice::test_hooks::splice_works());
            assert_eq!(lent_pipes(), 0, "an idle relay holds no pipe");
            let spare = splice::test_hooks::spare_here();
            assert!(
                (1..=splice::test_hooks::SPARE_MAX).contains(&spare),
                "{spare}"
            );
        }
        for t in tunnels {
            drop((t.client, t.origin));
            assert_eq!(t.relay.await.unwrap().2, TunnelEnd::Closed);
        }
    }

    #[tokio::test]
    async fn urgent_data_does_not_wedge_a_direction() {
        urgent_data(SPLICE).await;
        urgent_data(COPY).await;
    }

    async fn urgent_data(settings: RelaySettings) {
        // Splice stops at TCP urgent data, read() steps over it (the urgent byte itself is
        // not relayed, as before): the bytes on either side of it arrive, and the EOF, also
        // when the urgent byte is followed by more bytes and the FIN.
        #[cfg(target_os = "linux")]
        splice::test_hooks::reset();
        let Tunnel {
            mut client,
            mut origin,
            relay,
        } = tunnel(settings).await;
        let mut got = Vec::new();
        // Phases: bytes, then the urgent byte; more bytes (splice is stuck at the urgent
        // byte now); another urgent byte, more bytes and the FIN.
        origin.write_all(b"abc").await.unwrap();
        socket2::SockRef::from(&origin)
            .send_out_of_band(b"!")
            .unwrap();
        read_until(&mut client, &mut got, 3).await;
        origin.write_all(b"def").await.unwrap();
        read_until(&mut client, &mut got, 6).await;
        socket2::SockRef::from(&origin)
            .send_out_of_band(b"?")
            .unwrap();
        origin.write_all(b"ghi").await.unwrap();
        origin.shutdown().await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut got))
            .await
            .expect("the rest and the EOF")
            .unwrap();
        assert_eq!(got, b"abcdefghi");
        drop(client);
        let (_, down_bytes, end) = relay.await.unwrap();
        assert_eq!((down_bytes, end), (9, TunnelEnd::Closed));
    }

    async fn read_until(from: &mut TcpStream, got: &mut Vec<u8>, len: usize) {
        let mut buf = [0u8; 16];
        while got.len() < len {
            let n = tokio::time::timeout(Duration::from_secs(5), from.read(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("stuck after {:?}", String::from_utf8_lossy(got)))
                .unwrap();
            assert!(n > 0, "EOF after {:?}", String::from_utf8_lossy(got));
            got.extend_from_slice(&buf[..n]);
        }
    }
}
