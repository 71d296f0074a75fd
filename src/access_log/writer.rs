//! The writer thread: drains the queue in batches, formats each batch into one buffer and
//! writes it with one syscall; reopens the file on request; retries failed writes.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::mpsc;

use super::{BATCH_LINES, LINGER, MAX_RETRY_BACKOFF, Msg, SHUTDOWN_WRITE_ATTEMPTS, Shared};

/// Where lines go.
pub(super) enum Sink {
    /// A duplicate of fd 1 (unbuffered: one `write` per batch).
    Stdout(File),
    File {
        path: PathBuf,
        file: File,
    },
}

/// The writer thread's state.
pub(super) struct Writer {
    pub(super) rx: mpsc::Receiver<Msg>,
    pub(super) sink: Sink,
    pub(super) shared: Arc<Shared>,
    pub(super) closing: bool,
}

// === impl Sink ===

impl Sink {
    pub(super) fn open(path: &str) -> io::Result<Sink> {
        if path == "-" {
            use std::os::fd::AsFd;
            let fd = io::stdout().as_fd().try_clone_to_owned()?;
            return Ok(Sink::Stdout(File::from(fd)));
        }
        let path = PathBuf::from(path);
        let file = open_append(&path)?;
        Ok(Sink::File { path, file })
    }

    /// Reopen the path (a no-op for stdout). On failure the old file stays in use.
    fn reopen(&mut self) -> io::Result<()> {
        match self {
            Sink::Stdout(_) => Ok(()),
            Sink::File { path, file } => {
                *file = open_append(path)?;
                Ok(())
            }
        }
    }

    fn file(&mut self) -> &mut File {
        match self {
            Sink::Stdout(file) | Sink::File { file, .. } => file,
        }
    }
}

fn open_append(path: &std::path::Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

// === impl Writer ===

impl Writer {
    /// Receive batches until the queue is closed and drained.
    pub(super) fn run(mut self) {
        let mut batch = Vec::with_capacity(BATCH_LINES);
        let mut buf = Vec::with_capacity(256 * BATCH_LINES);
        let mut flushes = Vec::new();
        loop {
            let received = self.rx.blocking_recv_many(&mut batch, BATCH_LINES);
            if received == 0 {
                break;
            }
            if !self.closing && self.shared.close.load(Ordering::Acquire) {
                // Reserved slots may still send; recv then ends once they are all used.
                self.closing = true;
                self.rx.close();
            }
            self.reopen_if_asked();
            let mut lines = 0u64;
            for msg in batch.drain(..) {
                match msg {
                    Msg::Record(rec) => {
                        self.shared.format.write_line(&rec, &mut buf);
                        lines += 1;
                    }
                    Msg::Wake => {}
                    Msg::Flush(done) => flushes.push(done),
                }
            }
            if !buf.is_empty() {
                self.write(&buf, lines);
                buf.clear();
                if buf.capacity() > 4 << 20 {
                    buf.shrink_to(256 * BATCH_LINES);
                }
            }
            let flushed = !flushes.is_empty();
            for done in flushes.drain(..) {
                let _ = done.send(());
            }
            // Let lines gather before the next receive. While this thread sleeps it has no
            // waker registered, so a request's `send` is a few atomics instead of waking a
            // thread (a futex call and a context switch on the request path, per line).
            // A full batch means the queue is busy, and a flush wants an answer: go on.
            if received < BATCH_LINES && !flushed && !self.closing {
                std::thread::sleep(LINGER);
            }
        }
    }

    fn reopen_if_asked(&mut self) {
        if self.shared.reopen.swap(false, Ordering::AcqRel)
            && let Err(error) = self.sink.reopen()
        {
            self.shared.metrics.access_log_write_error();
            tracing::error!(%error, "reopening the access log failed; still writing to the old file");
        }
    }

    /// Write one batch, retrying from where a failed write stopped: while running it retries
    /// until it succeeds (the queue fills and requests wait), during shutdown a few times.
    fn write(&mut self, buf: &[u8], lines: u64) {
        let mut written = 0;
        let mut failures = 0u32;
        let mut backoff = Duration::from_millis(10);
        while written < buf.len() {
            match self.sink.file().write(&buf[written..]) {
                Ok(0) => {
                    self.failed(&io::Error::from(io::ErrorKind::WriteZero), &mut failures);
                }
                Ok(n) => {
                    written += n;
                    failures = 0;
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => self.failed(&e, &mut failures),
            }
            if self.closing && failures >= SHUTDOWN_WRITE_ATTEMPTS {
                let lost = buf[written..].iter().filter(|b| **b == b'\n').count();
                tracing::error!(lost, "giving up on access-log lines at shutdown");
                return;
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(MAX_RETRY_BACKOFF);
            self.reopen_if_asked();
        }
        let _ = self.sink.file().flush();
        self.shared.metrics.access_log_written(lines);
    }

    fn failed(&self, error: &io::Error, failures: &mut u32) {
        self.shared.metrics.access_log_write_error();
        if *failures == 0 {
            tracing::error!(%error, "writing the access log failed; retrying, requests wait meanwhile");
        }
        *failures += 1;
    }
}
