//! Access/audit log: one line per request or tunnel, in JSON, Squid-native or Apache combined
//! format, formatted and written in batches by a dedicated writer thread off the request path.
//!
//! # Why back-pressure and not dropping
//! The log is an audit trail, so it never drops a line. Each request reserves a slot in a
//! bounded queue (`access_log.buffer`, default 65,536 lines) when it is *admitted*
//! ([`AccessLog::reserve`]); writing the line later ([`LogSlot::send`]) then never blocks and
//! never fails, which is what a response body's `Drop` needs. If the writer falls so far behind
//! that the queue is full, new requests wait at admission (counted by
//! `kalmar_access_log_waits_total`) instead of losing their line; requests already in flight are
//! unaffected. The writer drains up to [`BATCH_LINES`] lines at a time, formats them into one
//! buffer and hands that to the kernel in one `write`, so at full load it costs about one
//! syscall per batch, not per request.
//!
//! # Rotation
//! `path = "-"` is stdout (the Kubernetes default). A file is opened in append mode; on SIGUSR1
//! the core calls [`AccessLog::reopen`] and the writer reopens the path before its next batch
//! (logrotate's `create` mode: rename, create, signal). Lines written between the rename and the
//! reopen land in the renamed file; none is lost.

mod combined;
mod config;
mod json;
mod record;
mod squid;
mod text;
mod writer;

use std::io::{self, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::mpsc::{self, OwnedPermit};
use tokio::sync::oneshot;

use crate::metrics::Metrics;
pub use config::{AccessLogConfig, ConfigError, Format};
pub use record::{AccessRecord, Hop, fields};
use writer::{Sink, Writer};

/// Default queue capacity (lines).
pub const DEFAULT_BUFFER: usize = 65_536;
/// Largest accepted `access_log.buffer`.
pub const MAX_BUFFER: usize = 1 << 24;
/// The writer takes at most this many lines per batch (one write each).
pub const BATCH_LINES: usize = 1024;

/// After a batch smaller than [`BATCH_LINES`] the writer waits this long before taking the
/// next one, so that under load lines are written many at a time. Without it, on a busy core
/// every request woke the writer (a futex wake, two context switches) and cost one `write` of
/// one line; with it the writer wakes and writes at most ~200 times a second. A line reaches
/// the file at most this much later; flushes and shutdown do not wait.
pub(crate) const LINGER: Duration = Duration::from_millis(5);

/// Write attempts per batch once shutdown has begun (while running the writer retries forever).
pub(crate) const SHUTDOWN_WRITE_ATTEMPTS: u32 = 3;
/// Longest pause between write retries.
pub(crate) const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(1);

/// Cheap, cloneable handle for queueing lines.
#[derive(Clone)]
pub struct AccessLog {
    tx: mpsc::Sender<Msg>,
    shared: Arc<Shared>,
}

/// A reserved place in the queue: sending the record through it never blocks and never fails.
#[must_use = "dropping a slot unsent loses the request's log line"]
pub struct LogSlot {
    permit: Option<OwnedPermit<Msg>>,
    format: Format,
}

/// The running writer; [`AccessLogTask::finish`] drains it at shutdown.
pub struct AccessLogTask {
    tx: mpsc::Sender<Msg>,
    shared: Arc<Shared>,
    thread: std::thread::JoinHandle<()>,
}

/// State shared by the handles and the writer.
pub(crate) struct Shared {
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) format: Format,
    pub(crate) reopen: AtomicBool,
    /// Set by [`AccessLogTask::finish`].
    pub(crate) close: AtomicBool,
}

/// What travels through the queue. Records travel unboxed: the queue stores them in place, so a
/// box would only add an allocation per request.
#[expect(
    clippy::large_enum_variant,
    reason = "records dominate; boxing costs a malloc each"
)]
pub(crate) enum Msg {
    Record(AccessRecord),
    /// Wakes an idle writer so that a pending reopen happens now.
    Wake,
    /// Answered once every message queued before it is written.
    Flush(oneshot::Sender<()>),
}

// === impl AccessLog ===

impl AccessLog {
    /// Open the sink and start the writer thread. Fails on an invalid config or when the file
    /// cannot be opened.
    pub fn start(
        cfg: &AccessLogConfig,
        metrics: Arc<Metrics>,
    ) -> io::Result<(AccessLog, AccessLogTask)> {
        cfg.validate()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let sink = Sink::open(&cfg.path)?;
        let (tx, rx) = mpsc::channel(cfg.buffer);
        let shared = Arc::new(Shared {
            metrics,
            format: cfg.format,
            reopen: AtomicBool::new(false),
            close: AtomicBool::new(false),
        });
        let writer = Writer {
            rx,
            sink,
            shared: shared.clone(),
            closing: false,
        };
        let thread = std::thread::Builder::new()
            .name("kalmar-access-log".to_owned())
            .spawn(move || writer.run())?;
        let task = AccessLogTask {
            tx: tx.clone(),
            shared: shared.clone(),
            thread,
        };
        Ok((AccessLog { tx, shared }, task))
    }

    /// Reserve the place for one line; call at request admission. Waits only when the queue is
    /// full (counted in `kalmar_access_log_waits_total`). After shutdown the slot writes to stderr.
    pub async fn reserve(&self) -> LogSlot {
        let permit = match self.tx.clone().try_reserve_owned() {
            Ok(permit) => Some(permit),
            Err(TrySendError::Full(tx)) => {
                self.shared.metrics.access_log_wait();
                tx.reserve_owned().await.ok()
            }
            Err(TrySendError::Closed(_)) => None,
        };
        LogSlot {
            permit,
            format: self.shared.format,
        }
    }

    /// Queue one line from async code (tunnels at close); waits only when the queue is full.
    pub async fn send(&self, rec: AccessRecord) {
        self.reserve().await.send(rec);
    }

    /// Reopen the file path before the next batch (SIGUSR1). Never blocks.
    pub fn reopen(&self) {
        self.shared.reopen.store(true, Ordering::Release);
        // If the queue is full the writer is busy and sees the flag at its next batch anyway.
        let _ = self.tx.try_send(Msg::Wake);
    }

    /// Wait until every line queued before this call is written.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Flush(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// The configured line format.
    pub fn format(&self) -> Format {
        self.shared.format
    }
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog")
            .field("format", &self.shared.format)
            .field("capacity", &self.tx.capacity())
            .finish_non_exhaustive()
    }
}

// === impl LogSlot ===

impl LogSlot {
    /// Queue the record. Synchronous, never blocks, never fails: usable from `Drop`.
    pub fn send(self, rec: AccessRecord) {
        match self.permit {
            Some(permit) => {
                permit.send(Msg::Record(rec));
            }
            None => {
                // The writer has shut down: keep the line, on stderr.
                let mut line = Vec::with_capacity(512);
                self.format.write_line(&rec, &mut line);
                let _ = io::stderr().lock().write_all(&line);
            }
        }
    }
}

impl std::fmt::Debug for LogSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogSlot")
            .field("reserved", &self.permit.is_some())
            .finish()
    }
}

// === impl AccessLogTask ===

impl AccessLogTask {
    /// Stop the writer after it has written everything queued, including the lines of slots
    /// still reserved (it waits for those to be sent or dropped), and join its thread. Blocks:
    /// call it from synchronous shutdown code, or through `spawn_blocking` (never on a runtime
    /// thread whose tasks still hold slots).
    pub fn finish(self) {
        self.shared.close.store(true, Ordering::Release);
        // A full queue means the writer is busy and checks the flag after its batch.
        let _ = self.tx.try_send(Msg::Wake);
        drop(self.tx);
        if self.thread.join().is_err() {
            tracing::error!("the access-log writer thread panicked; queued lines may be lost");
        }
    }
}

impl std::fmt::Debug for AccessLogTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLogTask").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests;
