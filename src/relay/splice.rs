//! Linux: one direction of a TCP-to-TCP tunnel moves its bytes with `splice(2)` through a
//! pipe, socket → pipe → socket, so they never pass through a userspace buffer.
//!
//! A pipe is lent to a direction for one burst, from a small per-thread pool, exactly like
//! the copy path's buffer: borrowed when the source becomes readable, given back once the
//! source says `WouldBlock` and the pipe is empty again. If the destination blocks, the pipe
//! keeps its bytes and stays with that direction until they are written. An idle tunnel
//! holds no pipe; a pipe is closed with bytes in it only when its tunnel is ending.
//!
//! The pipe is always empty before the socket → pipe splice and is asked for no more than
//! it can hold, so `EAGAIN` there can only mean the socket has nothing more (not a full
//! pipe); on the pipe → socket side the pipe is never empty, so `EAGAIN` means the socket's
//! send buffer is full. Either clears tokio's readiness, as a `read`/`write` would. A
//! splice shorter than asked proves nothing (the pipe has a limited number of slots, one
//! per packet fragment), so a burst ends only on `EAGAIN`, unlike the copy path's.
//!
//! The caller copies a burst through its buffer instead (`None` from [`burst`]) when no
//! pipe can be had (out of file descriptors, or [`MAX_LENT_PIPES`] lent), and for good on
//! this thread when splice turns out unsupported (`EINVAL`, `ENOSYS`, `EOPNOTSUPP`) before
//! it has worked once here (bytes already in the pipe are then read out and written). It
//! also reads when splice finds nothing on a burst's first try or answers 0 (EOF): splice
//! stops at TCP urgent data, which read() steps over, and would otherwise stall there or
//! take the urgent byte followed by a FIN for the end of the stream.

use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};

use rustix::io::Errno;
use rustix::pipe::{PipeFlags, SpliceFlags, fcntl_getpipe_size, fcntl_setpipe_size, pipe_with};
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::{Burst, Moved};
use crate::net::write_all;

/// Capacity assumed when the kernel will not even say.
const DEFAULT_PIPE_SIZE: usize = 64 * 1024;

/// Empty pipes a thread keeps for the next bursts; more are closed when given back.
const SPARE_PIPES_PER_THREAD: usize = 8;

/// Pipes lent at once, process-wide. A pipe costs two file descriptors and pins the pages
/// it holds while its destination is blocked; past this, bursts copy through a buffer.
const MAX_LENT_PIPES: usize = 256;

const FLAGS: SpliceFlags = SpliceFlags::MOVE.union(SpliceFlags::NONBLOCK);

/// Whether splice works on this thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Support {
    /// Not tried yet: an "unsupported" error means fall back, for good.
    Unknown,
    /// A splice into a socket has succeeded: every error is a real one.
    Works,
    Unavailable,
}

thread_local! {
    static SUPPORT: Cell<Support> = const { Cell::new(Support::Unknown) };
    static SPARE_PIPES: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

/// Pipes lent right now, all threads.
static LENT: AtomicUsize = AtomicUsize::new(0);

struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// What was asked for, and what the kernel gave.
    asked: usize,
    capacity: usize,
}

impl Pipe {
    /// A pipe of `size` bytes (`tunnel.pipe`), or the kernel's default if it refuses.
    fn new(size: usize) -> io::Result<Pipe> {
        let (read, write) = pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?;
        let capacity = fcntl_setpipe_size(&write, size)
            .or_else(|_| fcntl_getpipe_size(&write))
            .unwrap_or(DEFAULT_PIPE_SIZE);
        Ok(Pipe {
            read,
            write,
            asked: size,
            capacity,
        })
    }
}

/// A pipe lent to one direction. Dropped empty, it goes back to this thread's spares;
/// dropped holding bytes (the tunnel is ending), it is closed.
struct Lent {
    pipe: Option<Pipe>,
    /// Bytes in the pipe, not yet written to the destination.
    held: usize,
}

impl Lent {
    fn borrow(size: usize) -> Option<Lent> {
        if LENT.fetch_add(1, Ordering::Relaxed) >= MAX_LENT_PIPES {
            LENT.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        // A spare of another size (before a reload changed `tunnel.pipe`) is closed.
        let spare = SPARE_PIPES
            .with(|spare| spare.borrow_mut().pop())
            .filter(|pipe| pipe.asked == size);
        let pipe = match spare.map_or_else(|| Pipe::new(size), Ok) {
            Ok(pipe) => pipe,
            Err(e) => {
                LENT.fetch_sub(1, Ordering::Relaxed);
                tracing::debug!(error = %e, "no pipe for splice; copying this burst");
                return None;
            }
        };
        #[cfg(test)]
        test_hooks::LENT_HERE.with(|n| n.set(n.get().wrapping_add(1)));
        Some(Lent {
            pipe: Some(pipe),
            held: 0,
        })
    }

    fn pipe(&self) -> &Pipe {
        self.pipe
            .as_ref()
            .expect("a lent pipe is only taken when dropped")
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        LENT.fetch_sub(1, Ordering::Relaxed);
        #[cfg(test)]
        let _ = test_hooks::LENT_HERE.try_with(|n| n.set(n.get().wrapping_sub(1)));
        if let Some(pipe) = self.pipe.take()
            && self.held == 0
        {
            // `try_with`: a thread being torn down just closes the pipe.
            let _ = SPARE_PIPES.try_with(|spare| {
                let mut spare = spare.borrow_mut();
                if spare.len() < SPARE_PIPES_PER_THREAD {
                    spare.push(pipe);
                }
            });
        }
    }
}

/// One burst of `from` → `to` through a lent pipe, after `from` was reported readable.
/// `None`: splice cannot be used for this burst and nothing has been read from `from`
/// since, so the caller copies it instead.
pub(super) async fn burst(
    from: &TcpStream,
    to: &TcpStream,
    moved: &Moved<'_>,
    pipe_size: usize,
) -> io::Result<Option<Burst>> {
    if SUPPORT.get() == Support::Unavailable {
        return Ok(None);
    }
    let Some(mut lent) = Lent::borrow(pipe_size) else {
        return Ok(None);
    };
    let mut first = true;
    loop {
        // The pipe is empty and asked for at most what it holds: EAGAIN is `from`'s.
        let spliced = from.try_io(Interest::READABLE, || {
            match splice_fds(from, &lent.pipe().write, lent.pipe().capacity) {
                Ok(n) => Ok(Some(n)),
                // Readable, yet nothing to splice on a burst's first try: a stale wakeup,
                // or urgent (MSG_OOB) data at the head of the queue, which splice stops at
                // and read() steps over. Keep the readiness for the copy path's read to
                // settle, either way.
                Err(e) if first && e == Errno::AGAIN => Ok(None),
                Err(e) => Err(e.into()),
            }
        });
        first = false;
        match spliced {
            // Splice also answers 0 at urgent data followed by the peer's FIN: a read()
            // tells (once per direction) whether that is really all.
            Ok(None | Some(0)) => return Ok(None),
            Ok(Some(n)) => {
                moved.arrived();
                lent.held = n;
                if !drain(&mut lent, to, moved).await? {
                    return Ok(None);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Some(Burst::Drained)),
            Err(e) if unsupported(&e) => return Ok(None),
            Err(e) => return Err(e),
        }
    }
}

/// Write all the pipe holds to `to`, counting it into `total` as it goes. `false`: splice
/// turned out unsupported; the bytes were written by a plain copy instead.
async fn drain(lent: &mut Lent, to: &TcpStream, moved: &Moved<'_>) -> io::Result<bool> {
    while lent.held > 0 {
        // Also a yield point: a burst that never blocks must not starve the thread.
        to.writable().await?;
        let spliced = to.try_io(Interest::WRITABLE, || {
            splice_fds(&lent.pipe().read, to, lent.held).map_err(io::Error::from)
        });
        match spliced {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                lent.held -= n;
                moved.delivered(n);
                SUPPORT.set(Support::Works);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if unsupported(&e) => {
                rescue(lent, to, moved).await?;
                return Ok(false);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Splice cannot write to `to` after all: read what the pipe holds and write it.
async fn rescue(lent: &mut Lent, to: &TcpStream, moved: &Moved<'_>) -> io::Result<()> {
    let mut bytes = vec![0u8; lent.held];
    let mut filled = 0;
    while filled < bytes.len() {
        match rustix::io::read(&lent.pipe().read, &mut bytes[filled..])? {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => filled += n,
        }
    }
    lent.held = 0;
    write_all(to, &bytes).await?;
    moved.delivered(bytes.len());
    Ok(())
}

/// An "unsupported" error before splice has worked on this thread switches it off here
/// (and says so); afterwards the same error is a real one.
fn unsupported(e: &io::Error) -> bool {
    let errno = Errno::from_io_error(e);
    if !matches!(errno, Some(Errno::INVAL | Errno::NOSYS | Errno::OPNOTSUPP))
        || SUPPORT.get() != Support::Unknown
    {
        return false;
    }
    SUPPORT.set(Support::Unavailable);
    tracing::info!(error = %e, "splice(2) is not usable here; tunnels copy through a buffer");
    true
}

fn splice_fds(from: impl AsFd, to: impl AsFd, len: usize) -> rustix::io::Result<usize> {
    #[cfg(test)]
    if let Some(errno) = test_hooks::injected_failure() {
        return Err(errno);
    }
    rustix::pipe::splice(from, None, to, None, len, FLAGS)
}

#[cfg(test)]
pub(super) mod test_hooks {
    use super::*;

    thread_local! {
        /// Pipes lent by this thread and not given back yet.
        pub(super) static LENT_HERE: Cell<usize> = const { Cell::new(0) };
        /// (splice calls to let through first, error for the one after).
        static FAIL: Cell<Option<(usize, Errno)>> = const { Cell::new(None) };
    }

    pub(super) fn injected_failure() -> Option<Errno> {
        match FAIL.get() {
            Some((0, errno)) => {
                FAIL.set(None);
                Some(errno)
            }
            Some((n, errno)) => {
                FAIL.set(Some((n - 1, errno)));
                None
            }
            None => None,
        }
    }

    /// Fail this thread's splice call after `skip` more with `errno`.
    pub fn fail_splice(skip: usize, errno: Errno) {
        FAIL.set(Some((skip, errno)));
    }

    /// Forget what this thread has learnt about splice (a test may run on a thread that
    /// ran another before).
    pub fn reset() {
        SUPPORT.set(Support::Unknown);
        FAIL.set(None);
    }

    pub fn splice_works() -> bool {
        SUPPORT.get() == Support::Works
    }

    pub fn splice_off() -> bool {
        SUPPORT.get() == Support::Unavailable
    }

    pub fn lent_here() -> usize {
        LENT_HERE.get()
    }

    pub fn spare_here() -> usize {
        SPARE_PIPES.with(|spare| spare.borrow().len())
    }

    pub fn close_spares() {
        SPARE_PIPES.with(|spare| spare.borrow_mut().clear());
    }

    pub const SPARE_MAX: usize = SPARE_PIPES_PER_THREAD;
}
