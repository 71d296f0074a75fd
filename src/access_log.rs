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

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::mpsc::{self, OwnedPermit};
use tokio::sync::oneshot;

use crate::metrics::Metrics;

/// JSON field names, one place (README table: "Access log fields").
pub mod fields {
    /// string: request start, RFC 3339 UTC with milliseconds (`2023-11-14T22:13:20.123Z`).
    pub const TIME: &str = "time";
    /// number: milliseconds from admission to the last byte (tunnels: to close), microsecond precision.
    pub const DURATION_MS: &str = "duration_ms";
    /// string: the request id (also returned to the client on errors).
    pub const REQUEST_ID: &str = "request_id";
    /// string: client `ip:port` (IPv4-mapped IPv6 shown as IPv4).
    pub const CLIENT: &str = "client";
    /// string: request method (`CONNECT` for tunnels).
    pub const METHOD: &str = "method";
    /// string: absolute URL, or `host:port` for CONNECT.
    pub const TARGET: &str = "target";
    /// number: status sent to the client.
    pub const STATUS: &str = "status";
    /// number: bytes read from the client (tunnels: bytes relayed up).
    pub const BYTES_FROM_CLIENT: &str = "bytes_from_client";
    /// number: bytes written to the client (tunnels: bytes relayed down).
    pub const BYTES_TO_CLIENT: &str = "bytes_to_client";
    /// string|null: the vetted `ip:port` actually dialled (origin, or parent proxy).
    pub const RESOLVED: &str = "resolved";
    /// string|null: the `X-Kalmar-Error` kind when Kalmar generated an error.
    pub const ERROR: &str = "error";
    /// string|null: the source entry's `name`.
    pub const SOURCE: &str = "source";
    /// object|null: the source's labels; null when the source is unknown.
    pub const LABELS: &str = "labels";
    /// string|null: name of the rule that decided.
    pub const RULE: &str = "rule";
    /// string: `allow`, `deny`, `report` (allowed, would have been denied) or `none` (not evaluated).
    pub const VERDICT: &str = "verdict";
    /// string: why the verdict was reached.
    pub const REASON: &str = "reason";
    /// string: `direct`, or the parent proxy's `host:port`.
    pub const ROUTE: &str = "route";
    /// string|null: cache status (`hit`, `miss`, `revalidated`, `uncacheable`, `stale`).
    pub const CACHE: &str = "cache";
    /// string|null: response `Content-Type`.
    pub const CONTENT_TYPE: &str = "content_type";
    /// string|null: request `User-Agent`.
    pub const USER_AGENT: &str = "user_agent";
    /// string|null: request `Referer`.
    pub const REFERER: &str = "referer";
    /// string: request protocol version (`HTTP/1.1`).
    pub const HTTP_VERSION: &str = "http_version";

    /// Every field, in output order.
    pub const ALL: [&str; 22] = [
        TIME,
        DURATION_MS,
        REQUEST_ID,
        CLIENT,
        METHOD,
        TARGET,
        STATUS,
        BYTES_FROM_CLIENT,
        BYTES_TO_CLIENT,
        RESOLVED,
        ERROR,
        SOURCE,
        LABELS,
        RULE,
        VERDICT,
        REASON,
        ROUTE,
        CACHE,
        CONTENT_TYPE,
        USER_AGENT,
        REFERER,
        HTTP_VERSION,
    ];
}

/// Default queue capacity (lines).
pub const DEFAULT_BUFFER: usize = 65_536;
/// Largest accepted `access_log.buffer`.
pub const MAX_BUFFER: usize = 1 << 24;
/// The writer takes at most this many lines per batch (one write each).
pub const BATCH_LINES: usize = 1024;
/// Route value for requests that went straight to the origin.
pub const ROUTE_DIRECT: &str = "direct";

/// After a batch smaller than [`BATCH_LINES`] the writer waits this long before taking the
/// next one, so that under load lines are written many at a time. Without it, on a busy core
/// every request woke the writer (a futex wake, two context switches) and cost one `write` of
/// one line; with it the writer wakes and writes at most ~200 times a second. A line reaches
/// the file at most this much later; flushes and shutdown do not wait.
const LINGER: Duration = Duration::from_millis(5);

/// Write attempts per batch once shutdown has begun (while running the writer retries forever).
const SHUTDOWN_WRITE_ATTEMPTS: u32 = 3;
/// Longest pause between write retries.
const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(1);

/// Everything one access-log line says about a request or a tunnel.
#[derive(Debug, Clone)]
pub struct AccessRecord {
    /// Request start.
    pub time: SystemTime,
    pub duration: Duration,
    pub request_id: String,
    pub client: SocketAddr,
    /// `CONNECT` for tunnels.
    pub method: http::Method,
    /// Absolute URL, or host:port for CONNECT.
    pub target: String,
    pub status: u16,
    pub bytes_from_client: u64,
    pub bytes_to_client: u64,
    /// The vetted address actually dialled.
    pub resolved: Option<SocketAddr>,
    /// `X-Kalmar-Error` kind.
    pub error: Option<&'static str>,
    pub source_name: Option<Arc<str>>,
    /// `None` = unknown source.
    pub labels: Option<Arc<BTreeMap<String, String>>>,
    pub rule: Option<Arc<str>>,
    /// allow | deny | report | none
    pub verdict: &'static str,
    pub reason: &'static str,
    /// [`ROUTE_DIRECT`] or the parent's host:port (never credentials).
    pub route: Arc<str>,
    /// hit | miss | revalidated | uncacheable | stale
    pub cache: Option<&'static str>,
    pub content_type: Option<http::HeaderValue>,
    pub user_agent: Option<http::HeaderValue>,
    pub referer: Option<http::HeaderValue>,
    pub http_version: http::Version,
}

/// Line format, config key `access_log.format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// One JSON object per line with every field in [`fields`].
    #[default]
    Json,
    /// Squid's native `logformat squid`, byte for byte.
    Squid,
    /// Apache/NCSA combined.
    Combined,
}

/// The `[access_log]` config section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessLogConfig {
    /// Line format.
    pub format: Format,
    /// File path, or `-` for stdout.
    pub path: String,
    /// Queue capacity in lines; when full, new requests wait (see the module docs).
    pub buffer: usize,
}

/// An invalid `[access_log]` setting.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("access_log.buffer = {0}: must be between 1 and {MAX_BUFFER}")]
    Buffer(usize),
    #[error("access_log.path = \"\": must be a file path or \"-\" for stdout")]
    EmptyPath,
}

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
struct Shared {
    metrics: Arc<Metrics>,
    format: Format,
    reopen: AtomicBool,
    /// Set by [`AccessLogTask::finish`].
    close: AtomicBool,
}

/// What travels through the queue. Records travel unboxed: the queue stores them in place, so a
/// box would only add an allocation per request.
#[expect(
    clippy::large_enum_variant,
    reason = "records dominate; boxing costs a malloc each"
)]
enum Msg {
    Record(AccessRecord),
    /// Wakes an idle writer so that a pending reopen happens now.
    Wake,
    /// Answered once every message queued before it is written.
    Flush(oneshot::Sender<()>),
}

/// Where lines go.
enum Sink {
    /// A duplicate of fd 1 (unbuffered: one `write` per batch).
    Stdout(File),
    File {
        path: PathBuf,
        file: File,
    },
}

/// The writer thread's state.
struct Writer {
    rx: mpsc::Receiver<Msg>,
    sink: Sink,
    shared: Arc<Shared>,
    closing: bool,
}

/// Writes `{"a":1,"b":...` with the commas in the right places.
struct JsonObject<'a> {
    out: &'a mut Vec<u8>,
    first: bool,
}

/// A UTC calendar time.
#[derive(Debug, PartialEq, Eq)]
struct Civil {
    year: u64,
    month: u8,
    day: u8,
    hour: u8,
    minute: u8,
    second: u8,
}

// === impl AccessLogConfig ===

impl Default for AccessLogConfig {
    fn default() -> Self {
        AccessLogConfig {
            format: Format::Json,
            path: "-".to_owned(),
            buffer: DEFAULT_BUFFER,
        }
    }
}

impl AccessLogConfig {
    /// Check the values serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.buffer == 0 || self.buffer > MAX_BUFFER {
            return Err(ConfigError::Buffer(self.buffer));
        }
        if self.path.is_empty() {
            return Err(ConfigError::EmptyPath);
        }
        Ok(())
    }
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

// === impl Sink ===

impl Sink {
    fn open(path: &str) -> io::Result<Sink> {
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
    fn run(mut self) {
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

// === impl Format ===

impl Format {
    /// Append one line for `rec`, newline included. Every value is escaped so that no input can
    /// break the line or start a new one.
    pub fn write_line(self, rec: &AccessRecord, out: &mut Vec<u8>) {
        out.reserve(512);
        match self {
            Format::Json => write_json(rec, out),
            Format::Squid => write_squid(rec, out),
            Format::Combined => write_combined(rec, out),
        }
        out.push(b'\n');
    }

    /// Config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Squid => "squid",
            Format::Combined => "combined",
        }
    }
}

// --- JSON

fn write_json(rec: &AccessRecord, out: &mut Vec<u8>) {
    let mut o = JsonObject::new(out);
    let (secs, micros) = unix_parts(rec.time);
    o.key(fields::TIME);
    o.out.push(b'"');
    put_rfc3339_millis(o.out, secs, micros / 1000);
    o.out.push(b'"');
    o.key(fields::DURATION_MS);
    let us = u64::try_from(rec.duration.as_micros()).unwrap_or(u64::MAX);
    push_u64(o.out, us / 1000);
    o.out.push(b'.');
    push_padded(o.out, us % 1000, 3);
    o.str(fields::REQUEST_ID, &rec.request_id);
    o.key(fields::CLIENT);
    push_quoted_socket(o.out, rec.client);
    o.str(fields::METHOD, rec.method.as_str());
    o.str(fields::TARGET, &rec.target);
    o.key(fields::STATUS);
    push_u64(o.out, u64::from(rec.status));
    o.key(fields::BYTES_FROM_CLIENT);
    push_u64(o.out, rec.bytes_from_client);
    o.key(fields::BYTES_TO_CLIENT);
    push_u64(o.out, rec.bytes_to_client);
    o.key(fields::RESOLVED);
    match rec.resolved {
        Some(addr) => push_quoted_socket(o.out, addr),
        None => o.null(),
    }
    o.opt_str(fields::ERROR, rec.error);
    o.opt_str(fields::SOURCE, rec.source_name.as_deref());
    o.key(fields::LABELS);
    match &rec.labels {
        Some(labels) => {
            o.out.push(b'{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    o.out.push(b',');
                }
                json_string(o.out, k.as_bytes());
                o.out.push(b':');
                json_string(o.out, v.as_bytes());
            }
            o.out.push(b'}');
        }
        None => o.null(),
    }
    o.opt_str(fields::RULE, rec.rule.as_deref());
    o.str(fields::VERDICT, rec.verdict);
    o.str(fields::REASON, rec.reason);
    o.str(fields::ROUTE, &rec.route);
    o.opt_str(fields::CACHE, rec.cache);
    o.opt_header(fields::CONTENT_TYPE, rec.content_type.as_ref());
    o.opt_header(fields::USER_AGENT, rec.user_agent.as_ref());
    o.opt_header(fields::REFERER, rec.referer.as_ref());
    o.str(fields::HTTP_VERSION, version_str(rec.http_version));
    o.out.push(b'}');
}

// === impl JsonObject ===

impl<'a> JsonObject<'a> {
    fn new(out: &'a mut Vec<u8>) -> Self {
        out.push(b'{');
        JsonObject { out, first: true }
    }

    /// Field names are plain ASCII constants: no escaping needed.
    fn key(&mut self, key: &str) {
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
        self.out.push(b'"');
        self.out.extend_from_slice(key.as_bytes());
        self.out.extend_from_slice(b"\":");
    }

    fn null(&mut self) {
        self.out.extend_from_slice(b"null");
    }

    fn str(&mut self, key: &str, value: &str) {
        self.key(key);
        json_string(self.out, value.as_bytes());
    }

    fn opt_str(&mut self, key: &str, value: Option<&str>) {
        match value {
            Some(v) => self.str(key, v),
            None => {
                self.key(key);
                self.null();
            }
        }
    }

    fn opt_header(&mut self, key: &str, value: Option<&http::HeaderValue>) {
        match value {
            Some(v) => {
                self.key(key);
                json_string(self.out, v.as_bytes());
            }
            None => {
                self.key(key);
                self.null();
            }
        }
    }
}

/// A JSON string: `"` and `\` escaped, control bytes as `\n`/`\u00XX`, invalid UTF-8 as U+FFFD.
fn json_string(out: &mut Vec<u8>, bytes: &[u8]) {
    out.push(b'"');
    // Fast path (nearly every value): plain ASCII, nothing to escape. `fold` rather than `any`
    // so that the check vectorizes.
    let plain = !bytes.iter().fold(false, |dirty, &b| {
        dirty | !(0x20..0x7f).contains(&b) | (b == b'"') | (b == b'\\')
    });
    if plain {
        out.extend_from_slice(bytes);
        out.push(b'"');
        return;
    }
    for chunk in bytes.utf8_chunks() {
        let valid = chunk.valid().as_bytes();
        let mut run = 0;
        for (i, &b) in valid.iter().enumerate() {
            let escape: &[u8] = match b {
                b'"' => b"\\\"",
                b'\\' => b"\\\\",
                b'\n' => b"\\n",
                b'\r' => b"\\r",
                b'\t' => b"\\t",
                0..0x20 | 0x7f => &[
                    b'\\',
                    b'u',
                    b'0',
                    b'0',
                    HEX_LOWER[usize::from(b >> 4)],
                    HEX_LOWER[usize::from(b & 0xf)],
                ],
                _ => continue,
            };
            out.extend_from_slice(&valid[run..i]);
            out.extend_from_slice(escape);
            run = i + 1;
        }
        out.extend_from_slice(&valid[run..]);
        if !chunk.invalid().is_empty() {
            out.extend_from_slice("\u{FFFD}".as_bytes());
        }
    }
    out.push(b'"');
}

// --- Squid native

/// `%ts.%03tu %6tr %>a %Ss/%03>Hs %<st %rm %ru %[un %Sh/%<a %mt`, as Squid's
/// `Log::Format::SquidNative` prints it (`"%9ld.%03d %6ld %s %s/%03d %lld %s %s %s %s/%s %s"`).
/// Like Squid, the timestamp is when the transaction ended, not when it started.
///
/// ```text
/// 1700000000.123    245 127.0.0.1 TCP_MISS/200 1234 GET http://example.com/ - HIER_DIRECT/93.184.216.34 text/html
/// ```
fn write_squid(rec: &AccessRecord, out: &mut Vec<u8>) {
    let end = rec.time.checked_add(rec.duration).unwrap_or(rec.time);
    let (secs, micros) = unix_parts(end);
    push_right(out, secs, 9);
    out.push(b'.');
    push_padded(out, u64::from(micros / 1000), 3);
    out.push(b' ');
    push_right(
        out,
        u64::try_from(rec.duration.as_millis()).unwrap_or(u64::MAX),
        6,
    );
    out.push(b' ');
    push_ip(out, rec.client.ip());
    out.push(b' ');
    out.extend_from_slice(squid_code(rec).as_bytes());
    out.push(b'/');
    push_padded(out, u64::from(rec.status), 3);
    out.push(b' ');
    push_u64(out, rec.bytes_to_client);
    out.push(b' ');
    token(out, rec.method.as_str().as_bytes());
    out.push(b' ');
    token(out, rec.target.as_bytes());
    out.extend_from_slice(b" - ");
    squid_hierarchy(rec, out);
    out.push(b' ');
    // Squid logs the media type only: the value up to the first ';', tab or space.
    let media_type = rec.content_type.as_ref().map(|ct| {
        let bytes = ct.as_bytes();
        let end = bytes
            .iter()
            .position(|b| matches!(b, b';' | b' ' | b'\t'))
            .unwrap_or(bytes.len());
        &bytes[..end]
    });
    token(out, media_type.unwrap_or_default());
}

/// Squid's result code (`%Ss`).
fn squid_code(rec: &AccessRecord) -> &'static str {
    if rec.verdict == "deny" {
        return "TCP_DENIED";
    }
    if rec.method == http::Method::CONNECT {
        return if rec.resolved.is_some() || rec.status == 200 {
            "TCP_TUNNEL"
        } else {
            "NONE_NONE"
        };
    }
    match rec.cache {
        Some("hit") => return "TCP_HIT",
        Some("revalidated") => return "TCP_REFRESH_UNMODIFIED",
        Some("stale") => return "TCP_REFRESH_FAIL_OLD",
        _ => {}
    }
    if rec.resolved.is_none() && rec.verdict == "none" {
        // refused before any policy decision (malformed request and the like)
        "NONE_NONE"
    } else {
        "TCP_MISS"
    }
}

/// Squid's hierarchy code and peer (`%Sh/%<a`): `HIER_DIRECT/ip`, `FIRSTUP_PARENT/peer`,
/// or `HIER_NONE/-` when nothing was forwarded.
fn squid_hierarchy(rec: &AccessRecord, out: &mut Vec<u8>) {
    let forwarded = rec.verdict != "deny"
        && rec.cache != Some("hit")
        && (rec.resolved.is_some() || rec.verdict != "none");
    if forwarded && &*rec.route != ROUTE_DIRECT {
        out.extend_from_slice(b"FIRSTUP_PARENT/");
        // Squid prints the peer's address when connected; the configured host otherwise.
        match rec.resolved {
            Some(addr) => push_ip(out, addr.ip()),
            None => token(out, route_host(&rec.route).as_bytes()),
        }
    } else if let (true, Some(addr)) = (forwarded, rec.resolved) {
        out.extend_from_slice(b"HIER_DIRECT/");
        push_ip(out, addr.ip());
    } else {
        out.extend_from_slice(b"HIER_NONE/-");
    }
}

/// `host` of `host:port` / `[v6]:port`.
fn route_host(route: &str) -> &str {
    let host = match route.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !host.is_empty() => host,
        _ => route,
    };
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

/// A space-separated field, `-` when empty. Bytes outside visible ASCII, `"` and `\` are
/// percent-encoded (`%` itself is kept: URLs use it and it cannot break a field).
fn token(out: &mut Vec<u8>, bytes: &[u8]) {
    if bytes.is_empty() {
        out.push(b'-');
        return;
    }
    let plain = !bytes.iter().fold(false, |dirty, &b| {
        dirty | !(0x21..0x7f).contains(&b) | (b == b'"') | (b == b'\\')
    });
    if plain {
        out.extend_from_slice(bytes);
        return;
    }
    let mut run = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if matches!(b, 0x21..=0x7e) && b != b'"' && b != b'\\' {
            continue;
        }
        out.extend_from_slice(&bytes[run..i]);
        out.extend_from_slice(&[
            b'%',
            HEX_UPPER[usize::from(b >> 4)],
            HEX_UPPER[usize::from(b & 0xf)],
        ]);
        run = i + 1;
    }
    out.extend_from_slice(&bytes[run..]);
}

// --- Apache combined

/// `%h %l %u %t "%r" %>s %b "%{Referer}i" "%{User-Agent}i"`, time = request start, UTC:
///
/// ```text
/// 127.0.0.1 - - [10/Oct/2000:13:55:36 +0000] "GET http://example.com/ HTTP/1.1" 200 2326 "-" "curl/8.5.0"
/// ```
fn write_combined(rec: &AccessRecord, out: &mut Vec<u8>) {
    let (secs, _) = unix_parts(rec.time);
    let c = Civil::from_unix(secs);
    push_ip(out, rec.client.ip());
    out.extend_from_slice(b" - - [");
    push_padded(out, u64::from(c.day), 2);
    out.push(b'/');
    out.extend_from_slice(MONTHS[usize::from(c.month - 1)].as_bytes());
    out.push(b'/');
    push_padded(out, c.year, 4);
    out.push(b':');
    push_padded(out, u64::from(c.hour), 2);
    out.push(b':');
    push_padded(out, u64::from(c.minute), 2);
    out.push(b':');
    push_padded(out, u64::from(c.second), 2);
    out.extend_from_slice(b" +0000] \"");
    token(out, rec.method.as_str().as_bytes());
    out.push(b' ');
    token(out, rec.target.as_bytes());
    out.push(b' ');
    out.extend_from_slice(version_str(rec.http_version).as_bytes());
    out.extend_from_slice(b"\" ");
    push_u64(out, u64::from(rec.status));
    out.push(b' ');
    if rec.bytes_to_client == 0 {
        out.push(b'-');
    } else {
        push_u64(out, rec.bytes_to_client);
    }
    out.push(b' ');
    quoted(out, rec.referer.as_ref().map(|v| v.as_bytes()));
    out.push(b' ');
    quoted(out, rec.user_agent.as_ref().map(|v| v.as_bytes()));
}

/// A quoted field escaped as Apache's `ap_escape_logitem` does: `\"`, `\\`, and `\xhh` for
/// control and non-ASCII bytes; `"-"` when absent.
fn quoted(out: &mut Vec<u8>, value: Option<&[u8]>) {
    out.push(b'"');
    match value {
        None => out.push(b'-'),
        Some(bytes) => {
            let mut run = 0;
            for (i, &b) in bytes.iter().enumerate() {
                let escape: &[u8] = match b {
                    b'"' => b"\\\"",
                    b'\\' => b"\\\\",
                    0x20..=0x7e => continue,
                    _ => &[
                        b'\\',
                        b'x',
                        HEX_LOWER[usize::from(b >> 4)],
                        HEX_LOWER[usize::from(b & 0xf)],
                    ],
                };
                out.extend_from_slice(&bytes[run..i]);
                out.extend_from_slice(escape);
                run = i + 1;
            }
            out.extend_from_slice(&bytes[run..]);
        }
    }
    out.push(b'"');
}

// --- shared helpers

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// Latest representable timestamp (9999-12-31T23:59:59Z); later times are clamped to it.
const MAX_UNIX_SECS: u64 = 253_402_300_799;

// === impl Civil ===

impl Civil {
    /// Howard Hinnant's `civil_from_days`, for `secs` already clamped to 0..=[`MAX_UNIX_SECS`].
    fn from_unix(secs: u64) -> Civil {
        let secs = secs.min(MAX_UNIX_SECS) as i64;
        let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        Civil {
            year: year.unsigned_abs(),
            month: month as u8,
            day: day as u8,
            hour: (rem / 3600) as u8,
            minute: (rem % 3600 / 60) as u8,
            second: (rem % 60) as u8,
        }
    }
}

/// `(seconds, microseconds)` since the Unix epoch, clamped to 1970..=9999.
fn unix_parts(time: SystemTime) -> (u64, u32) {
    match time.duration_since(UNIX_EPOCH) {
        Ok(d) if d.as_secs() <= MAX_UNIX_SECS => (d.as_secs(), d.subsec_micros()),
        Ok(_) => (MAX_UNIX_SECS, 999_999),
        Err(_) => (0, 0),
    }
}

/// `2023-11-14T22:13:20.123Z`.
fn put_rfc3339_millis(out: &mut Vec<u8>, secs: u64, millis: u32) {
    let c = Civil::from_unix(secs);
    push_padded(out, c.year, 4);
    out.push(b'-');
    push_padded(out, u64::from(c.month), 2);
    out.push(b'-');
    push_padded(out, u64::from(c.day), 2);
    out.push(b'T');
    push_padded(out, u64::from(c.hour), 2);
    out.push(b':');
    push_padded(out, u64::from(c.minute), 2);
    out.push(b':');
    push_padded(out, u64::from(c.second), 2);
    out.push(b'.');
    push_padded(out, u64::from(millis), 3);
    out.push(b'Z');
}

const HEX_LOWER: &[u8; 16] = b"0123456789abcdef";
const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

/// Decimal digits of `n` (the formatter machinery costs several times more per line).
fn push_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

fn decimal_len(mut n: u64) -> usize {
    let mut len = 1;
    while n >= 10 {
        n /= 10;
        len += 1;
    }
    len
}

/// `n` zero-padded to at least `width` digits (`%03d`).
fn push_padded(out: &mut Vec<u8>, n: u64, width: usize) {
    out.resize(out.len() + width.saturating_sub(decimal_len(n)), b'0');
    push_u64(out, n);
}

/// `n` space-padded to at least `width` characters (`%6ld`).
fn push_right(out: &mut Vec<u8>, n: u64, width: usize) {
    out.resize(out.len() + width.saturating_sub(decimal_len(n)), b' ');
    push_u64(out, n);
}

/// An address without port; IPv4-mapped IPv6 shown as IPv4.
fn push_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                push_u64(out, u64::from(octet));
            }
        }
        IpAddr::V6(v6) => put(out, format_args!("{v6}")),
    }
}

/// `"ip:port"` / `"[v6]:port"`, quoted for JSON (the text never needs escaping).
fn push_quoted_socket(out: &mut Vec<u8>, addr: SocketAddr) {
    out.push(b'"');
    match (addr, addr.ip().to_canonical()) {
        (_, IpAddr::V4(v4)) => {
            push_ip(out, IpAddr::V4(v4));
            out.push(b':');
            push_u64(out, u64::from(addr.port()));
        }
        (SocketAddr::V6(v6), _) => put(out, format_args!("{v6}")),
        (SocketAddr::V4(v4), _) => put(out, format_args!("{v4}")),
    }
    out.push(b'"');
}

fn version_str(version: http::Version) -> &'static str {
    match version {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_11 => "HTTP/1.1",
        http::Version::HTTP_2 => "HTTP/2.0",
        http::Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/1.1",
    }
}

/// Formatting into a `Vec<u8>` cannot fail.
fn put(out: &mut Vec<u8>, args: std::fmt::Arguments<'_>) {
    let _ = out.write_fmt(args);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn record() -> AccessRecord {
        let mut labels = BTreeMap::new();
        labels.insert("namespace".to_owned(), "project-x".to_owned());
        labels.insert("network-access-external-ips".to_owned(), "true".to_owned());
        AccessRecord {
            time: UNIX_EPOCH + Duration::from_millis(1_699_999_999_878),
            duration: Duration::from_micros(245_123),
            request_id: "01HF3Z6Q8W".to_owned(),
            client: "127.0.0.1:51234".parse().expect("addr"),
            method: http::Method::GET,
            target: "http://example.com/".to_owned(),
            status: 200,
            bytes_from_client: 78,
            bytes_to_client: 1234,
            resolved: Some("93.184.216.34:80".parse().expect("addr")),
            error: None,
            source_name: Some("project-x".into()),
            labels: Some(Arc::new(labels)),
            rule: Some("external".into()),
            verdict: "allow",
            reason: "rule",
            route: ROUTE_DIRECT.into(),
            cache: Some("miss"),
            content_type: Some(http::HeaderValue::from_static("text/html; charset=utf-8")),
            user_agent: Some(http::HeaderValue::from_static("curl/8.5.0")),
            referer: None,
            http_version: http::Version::HTTP_11,
        }
    }

    /// Every optional field absent, unknown source, nothing dialled.
    fn bare_record() -> AccessRecord {
        AccessRecord {
            resolved: None,
            error: Some("bad-request"),
            source_name: None,
            labels: None,
            rule: None,
            verdict: "none",
            reason: "malformed",
            cache: None,
            content_type: None,
            user_agent: None,
            referer: None,
            status: 400,
            bytes_from_client: 0,
            bytes_to_client: 0,
            ..record()
        }
    }

    /// Values a hostile client or origin could put into a line.
    fn hostile_record() -> AccessRecord {
        let mut labels = BTreeMap::new();
        labels.insert("k\"\n".to_owned(), "v\\\r\u{0}".to_owned());
        AccessRecord {
            request_id: "id\"\n{\"injected\":1}".to_owned(),
            target: "http://evil.example/a b\"c\r\n1700000000.000 0 6.6.6.6 TCP_HIT/200 0 GET http://x/ - HIER_NONE/- -\\\u{7f}é".to_owned(),
            method: http::Method::from_bytes(b"PROPFIND").expect("method"),
            labels: Some(Arc::new(labels)),
            source_name: Some("na\tme\"".into()),
            content_type: Some(
                http::HeaderValue::from_bytes(b"text/\"x\"\xff\xfe;q=\"1\"").expect("obs-text"),
            ),
            user_agent: Some(
                http::HeaderValue::from_bytes(b"Mozilla \"quoted\" \\ \xc3\x28 \t end\\")
                    .expect("obs-text"),
            ),
            referer: Some(http::HeaderValue::from_bytes(b"\"] \"GET /x HTTP/1.1\" 200").expect("hv")),
            client: "[::ffff:10.1.2.3]:4000".parse().expect("addr"),
            ..record()
        }
    }

    fn line(format: Format, rec: &AccessRecord) -> String {
        let mut out = Vec::new();
        format.write_line(rec, &mut out);
        assert_eq!(out.iter().filter(|b| **b == b'\n').count(), 1, "one line");
        assert_eq!(out.last(), Some(&b'\n'));
        assert!(
            !out[..out.len() - 1]
                .iter()
                .any(|b| *b == b'\r' || *b == b'\n'),
            "no line break inside: {out:?}"
        );
        String::from_utf8(out).expect("every format is valid UTF-8")
    }

    fn json(rec: &AccessRecord) -> serde_json::Map<String, serde_json::Value> {
        let text = line(Format::Json, rec);
        match serde_json::from_str(&text).expect("JSON parses back") {
            serde_json::Value::Object(map) => map,
            other => panic!("not an object: {other}"),
        }
    }

    #[test]
    fn json_has_every_field_with_the_right_values() {
        let v = json(&record());
        let keys: Vec<&str> = v.keys().map(String::as_str).collect();
        let mut all = fields::ALL.to_vec();
        all.sort_unstable();
        let mut got = keys.clone();
        got.sort_unstable();
        assert_eq!(got, all);
        assert_eq!(v[fields::TIME], "2023-11-14T22:13:19.878Z");
        assert_eq!(v[fields::DURATION_MS].as_f64(), Some(245.123));
        assert_eq!(v[fields::REQUEST_ID], "01HF3Z6Q8W");
        assert_eq!(v[fields::CLIENT], "127.0.0.1:51234");
        assert_eq!(v[fields::METHOD], "GET");
        assert_eq!(v[fields::TARGET], "http://example.com/");
        assert_eq!(v[fields::STATUS], 200);
        assert_eq!(v[fields::BYTES_FROM_CLIENT], 78);
        assert_eq!(v[fields::BYTES_TO_CLIENT], 1234);
        assert_eq!(v[fields::RESOLVED], "93.184.216.34:80");
        assert!(v[fields::ERROR].is_null());
        assert_eq!(v[fields::SOURCE], "project-x");
        assert_eq!(v[fields::LABELS]["namespace"], "project-x");
        assert_eq!(v[fields::LABELS]["network-access-external-ips"], "true");
        assert_eq!(v[fields::RULE], "external");
        assert_eq!(v[fields::VERDICT], "allow");
        assert_eq!(v[fields::REASON], "rule");
        assert_eq!(v[fields::ROUTE], "direct");
        assert_eq!(v[fields::CACHE], "miss");
        assert_eq!(v[fields::CONTENT_TYPE], "text/html; charset=utf-8");
        assert_eq!(v[fields::USER_AGENT], "curl/8.5.0");
        assert!(v[fields::REFERER].is_null());
        assert_eq!(v[fields::HTTP_VERSION], "HTTP/1.1");
    }

    #[test]
    fn json_missing_fields_are_null() {
        let v = json(&bare_record());
        assert_eq!(v.len(), fields::ALL.len());
        for f in [
            fields::RESOLVED,
            fields::SOURCE,
            fields::LABELS,
            fields::RULE,
            fields::CACHE,
            fields::CONTENT_TYPE,
            fields::USER_AGENT,
            fields::REFERER,
        ] {
            assert!(v[f].is_null(), "{f}");
        }
        assert_eq!(v[fields::ERROR], "bad-request");
    }

    #[test]
    fn json_escapes_hostile_values_and_round_trips_them() {
        let rec = hostile_record();
        let v = json(&rec);
        assert_eq!(v[fields::REQUEST_ID], rec.request_id.as_str());
        assert_eq!(v[fields::TARGET], rec.target.as_str());
        assert_eq!(v[fields::METHOD], "PROPFIND");
        assert_eq!(v[fields::SOURCE], "na\tme\"");
        assert_eq!(v[fields::LABELS]["k\"\n"], "v\\\r\u{0}");
        assert_eq!(v[fields::CLIENT], "10.1.2.3:4000");
        // invalid UTF-8 becomes U+FFFD
        assert_eq!(
            v[fields::CONTENT_TYPE],
            "text/\"x\"\u{FFFD}\u{FFFD};q=\"1\""
        );
        assert_eq!(
            v[fields::USER_AGENT],
            "Mozilla \"quoted\" \\ \u{FFFD}( \t end\\"
        );
        assert!(v.get("injected").is_none());
    }

    #[test]
    fn json_string_escapes_every_control_byte() {
        let all: Vec<u8> = (0u8..=0x7f).collect();
        let mut out = Vec::new();
        json_string(&mut out, &all);
        let back: String = serde_json::from_slice(&out).expect("valid JSON string");
        assert_eq!(back.as_bytes(), &all[..]);
        assert!(!out.iter().any(|b| *b < 0x20));
    }

    #[test]
    fn squid_matches_squids_native_format() {
        let rec = record();
        assert_eq!(
            line(Format::Squid, &rec),
            "1700000000.123    245 127.0.0.1 TCP_MISS/200 1234 GET http://example.com/ - HIER_DIRECT/93.184.216.34 text/html\n"
        );
        let bare = bare_record();
        assert_eq!(
            line(Format::Squid, &bare),
            "1700000000.123    245 127.0.0.1 NONE_NONE/400 0 GET http://example.com/ - HIER_NONE/- -\n"
        );
    }

    #[test]
    fn squid_result_and_hierarchy_codes() {
        let tunnel = AccessRecord {
            method: http::Method::CONNECT,
            target: "example.com:443".to_owned(),
            resolved: Some("[2606:2800:220:1::1]:443".parse().expect("addr")),
            content_type: None,
            cache: None,
            client: "[2001:db8::7]:5000".parse().expect("addr"),
            ..record()
        };
        assert!(
            line(Format::Squid, &tunnel).ends_with(
                " 2001:db8::7 TCP_TUNNEL/200 1234 CONNECT example.com:443 - HIER_DIRECT/2606:2800:220:1::1 -\n"
            ),
            "{}",
            line(Format::Squid, &tunnel)
        );
        let denied = AccessRecord {
            verdict: "deny",
            reason: "denied",
            status: 403,
            resolved: None,
            error: Some("denied"),
            ..tunnel.clone()
        };
        assert!(
            line(Format::Squid, &denied)
                .contains(" TCP_DENIED/403 1234 CONNECT example.com:443 - HIER_NONE/- -")
        );
        let hit = AccessRecord {
            cache: Some("hit"),
            resolved: None,
            ..record()
        };
        assert!(line(Format::Squid, &hit).contains(" TCP_HIT/200 "));
        assert!(line(Format::Squid, &hit).contains(" - HIER_NONE/- text/html\n"));
        let revalidated = AccessRecord {
            cache: Some("revalidated"),
            ..record()
        };
        assert!(line(Format::Squid, &revalidated).contains(" TCP_REFRESH_UNMODIFIED/200 "));
        let parent = AccessRecord {
            route: "proxy.corp.example:3128".into(),
            resolved: None,
            ..record()
        };
        assert!(
            line(Format::Squid, &parent).contains(" - FIRSTUP_PARENT/proxy.corp.example text/html")
        );
        let parent_dialled = AccessRecord {
            route: "[2001:db8::1]:3128".into(),
            resolved: Some("[2001:db8::1]:3128".parse().expect("addr")),
            ..record()
        };
        assert!(
            line(Format::Squid, &parent_dialled)
                .contains(" - FIRSTUP_PARENT/2001:db8::1 text/html")
        );
        let dns_failure = AccessRecord {
            resolved: None,
            status: 502,
            error: Some("dns-failure"),
            content_type: None,
            ..record()
        };
        assert!(
            line(Format::Squid, &dns_failure)
                .contains(" TCP_MISS/502 1234 GET http://example.com/ - HIER_NONE/- -\n")
        );
        let no_status = AccessRecord {
            status: 0,
            ..bare_record()
        };
        assert!(line(Format::Squid, &no_status).contains(" NONE_NONE/000 "));
    }

    #[test]
    fn squid_hostile_values_stay_in_their_field() {
        let rec = hostile_record();
        let text = line(Format::Squid, &rec);
        let fields: Vec<&str> = text
            .trim_end()
            .split(' ')
            .filter(|f| !f.is_empty())
            .collect();
        assert_eq!(fields.len(), 10, "{text}");
        assert_eq!(fields[2], "10.1.2.3");
        assert_eq!(fields[5], "PROPFIND");
        assert_eq!(
            fields[6],
            "http://evil.example/a%20b%22c%0D%0A1700000000.000%200%206.6.6.6%20TCP_HIT/200%200%20GET%20http://x/%20-%20HIER_NONE/-%20-%5C%7F%C3%A9"
        );
        assert_eq!(fields[9], "text/%22x%22%FF%FE");
    }

    #[test]
    fn squid_time_is_the_end_and_elapsed_is_padded() {
        let rec = AccessRecord {
            time: UNIX_EPOCH + Duration::from_millis(1_700_000_000_000),
            duration: Duration::from_millis(3_723_004),
            ..record()
        };
        assert!(line(Format::Squid, &rec).starts_with("1700003723.004 3723004 127.0.0.1 "));
        let early = AccessRecord {
            time: UNIX_EPOCH - Duration::from_secs(5),
            duration: Duration::ZERO,
            ..record()
        };
        assert!(line(Format::Squid, &early).starts_with("        0.000      0 "));
    }

    #[test]
    fn combined_matches_apache() {
        let rec = record();
        assert_eq!(
            line(Format::Combined, &rec),
            "127.0.0.1 - - [14/Nov/2023:22:13:19 +0000] \"GET http://example.com/ HTTP/1.1\" 200 1234 \"-\" \"curl/8.5.0\"\n"
        );
        let bare = bare_record();
        assert_eq!(
            line(Format::Combined, &bare),
            "127.0.0.1 - - [14/Nov/2023:22:13:19 +0000] \"GET http://example.com/ HTTP/1.1\" 400 - \"-\" \"-\"\n"
        );
        let tunnel = AccessRecord {
            method: http::Method::CONNECT,
            target: "example.com:443".to_owned(),
            http_version: http::Version::HTTP_10,
            ..record()
        };
        assert!(
            line(Format::Combined, &tunnel)
                .contains("\"CONNECT example.com:443 HTTP/1.0\" 200 1234")
        );
    }

    #[test]
    fn combined_escapes_hostile_values() {
        let rec = hostile_record();
        let text = line(Format::Combined, &rec);
        assert!(text.starts_with("10.1.2.3 - - ["), "{text}");
        assert!(text.contains(
            "\"PROPFIND http://evil.example/a%20b%22c%0D%0A1700000000.000%200%206.6.6.6"
        ));
        assert!(text.ends_with(
            " \"\\\"] \\\"GET /x HTTP/1.1\\\" 200\" \"Mozilla \\\"quoted\\\" \\\\ \\xc3( \\x09 end\\\\\"\n"
        ), "{text}");
        // exactly 6 unescaped quotes: request, referer, user agent
        let bytes = text.as_bytes();
        let unescaped = (0..bytes.len())
            .filter(|&i| {
                bytes[i] == b'"'
                    && (i == 0 || bytes[i - 1] != b'\\' || (i >= 2 && bytes[i - 2] == b'\\'))
            })
            .count();
        assert_eq!(unescaped, 6, "{text}");
    }

    #[test]
    fn civil_time_matches_humantime() {
        let mut secs: u64 = 0;
        while secs < MAX_UNIX_SECS {
            let mut out = Vec::new();
            put_rfc3339_millis(&mut out, secs, 7);
            let expected = humantime::format_rfc3339_millis(
                UNIX_EPOCH + Duration::from_millis(secs * 1000 + 7),
            )
            .to_string();
            assert_eq!(String::from_utf8(out).expect("utf8"), expected);
            secs = secs * 3 + 86_399;
        }
        for secs in [951_782_400, 951_868_799, 1_709_164_800, 4_107_542_400] {
            let mut out = Vec::new();
            put_rfc3339_millis(&mut out, secs, 0);
            let expected = humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_secs(secs))
                .to_string();
            assert_eq!(String::from_utf8(out).expect("utf8"), expected);
        }
        let far = AccessRecord {
            time: UNIX_EPOCH + Duration::from_secs(u64::MAX / 4),
            ..record()
        };
        assert_eq!(json(&far)[fields::TIME], "9999-12-31T23:59:59.999Z");
    }

    #[test]
    fn config_defaults_and_validation() {
        let cfg: AccessLogConfig = serde_json::from_str("{}").expect("defaults");
        assert_eq!(cfg, AccessLogConfig::default());
        assert_eq!(cfg.format, Format::Json);
        assert_eq!(cfg.path, "-");
        assert_eq!(cfg.buffer, DEFAULT_BUFFER);
        let cfg: AccessLogConfig =
            serde_json::from_str(r#"{"format":"squid","path":"/var/log/x","buffer":8}"#)
                .expect("parses");
        assert_eq!(cfg.format, Format::Squid);
        assert!(serde_json::from_str::<AccessLogConfig>(r#"{"fromat":"json"}"#).is_err());
        assert!(serde_json::from_str::<AccessLogConfig>(r#"{"format":"xml"}"#).is_err());
        let round = serde_json::to_string(&cfg).expect("serializes");
        assert_eq!(
            round,
            r#"{"format":"squid","path":"/var/log/x","buffer":8}"#
        );
        let zero = AccessLogConfig {
            buffer: 0,
            ..AccessLogConfig::default()
        };
        let err = zero.validate().expect_err("0 is invalid").to_string();
        assert!(err.contains("access_log.buffer = 0"), "{err}");
        assert!(AccessLog::start(&zero, Arc::new(Metrics::new())).is_err());
        let empty = AccessLogConfig {
            path: String::new(),
            ..AccessLogConfig::default()
        };
        assert!(empty.validate().is_err());
        let missing_dir = AccessLogConfig {
            path: "/nonexistent-dir/kalmar/access.log".to_owned(),
            ..AccessLogConfig::default()
        };
        assert!(AccessLog::start(&missing_dir, Arc::new(Metrics::new())).is_err());
    }

    // --- the writer

    fn file_config(dir: &tempfile::TempDir, buffer: usize) -> (AccessLogConfig, PathBuf) {
        let path = dir.path().join("access.log");
        let cfg = AccessLogConfig {
            format: Format::Json,
            path: path.to_string_lossy().into_owned(),
            buffer,
        };
        (cfg, path)
    }

    async fn finish(task: AccessLogTask) {
        tokio::task::spawn_blocking(move || task.finish())
            .await
            .expect("join");
    }

    fn numbered(i: usize) -> AccessRecord {
        AccessRecord {
            request_id: format!("req-{i}"),
            ..record()
        }
    }

    fn ids(path: &std::path::Path) -> Vec<String> {
        let text = std::fs::read_to_string(path).expect("read log");
        text.lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).expect("each line is JSON");
                v[fields::REQUEST_ID].as_str().expect("id").to_owned()
            })
            .collect()
    }

    #[tokio::test]
    async fn writes_every_line_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cfg, path) = file_config(&dir, 16);
        let metrics = Arc::new(Metrics::new());
        let (log, task) = AccessLog::start(&cfg, metrics.clone()).expect("start");
        for i in 0..1000 {
            log.send(numbered(i)).await;
        }
        finish(task).await;
        let got = ids(&path);
        let want: Vec<String> = (0..1000).map(|i| format!("req-{i}")).collect();
        assert_eq!(got, want);
        assert!(
            metrics
                .encode()
                .contains("kalmar_access_log_lines_total 1000")
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn back_pressure_waits_and_loses_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cfg, path) = file_config(&dir, 2);
        let metrics = Arc::new(Metrics::new());
        let (log, task) = AccessLog::start(&cfg, metrics.clone()).expect("start");
        // Stall the writer: hold both slots of the queue, unsent.
        let a = log.reserve().await;
        let b = log.reserve().await;
        let waiting = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for i in 0..5 {
            let log = log.clone();
            let waiting = waiting.clone();
            tasks.push(tokio::spawn(async move {
                waiting.fetch_add(1, Ordering::SeqCst);
                let slot = log.reserve().await;
                slot.send(numbered(100 + i));
            }));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(waiting.load(Ordering::SeqCst), 5);
        assert!(
            tasks.iter().all(|t| !t.is_finished()),
            "reserve() must wait while the queue is full"
        );
        assert!(metrics.encode().contains("kalmar_access_log_waits_total 5"));
        a.send(numbered(0));
        b.send(numbered(1));
        for t in tasks {
            t.await.expect("task");
        }
        finish(task).await;
        let mut got = ids(&path);
        got.sort();
        let mut want: Vec<String> = [0, 1, 100, 101, 102, 103, 104]
            .iter()
            .map(|i| format!("req-{i}"))
            .collect();
        want.sort();
        assert_eq!(got, want);
    }

    #[tokio::test]
    async fn finish_waits_for_reserved_slots_and_late_slots_go_to_stderr() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cfg, path) = file_config(&dir, 4);
        let (log, task) = AccessLog::start(&cfg, Arc::new(Metrics::new())).expect("start");
        let slot = log.reserve().await;
        log.send(numbered(0)).await;
        let finishing = tokio::task::spawn_blocking(move || task.finish());
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !finishing.is_finished(),
            "finish waits for the reserved slot"
        );
        slot.send(numbered(1));
        finishing.await.expect("join");
        assert_eq!(ids(&path), ["req-0", "req-1"]);
        // After shutdown a slot still never fails (the line goes to stderr).
        let late = log.reserve().await;
        assert!(late.permit.is_none());
        late.send(numbered(2));
    }

    #[tokio::test]
    async fn reopen_after_rename_splits_lines_without_loss() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cfg, path) = file_config(&dir, 8);
        let rotated = dir.path().join("access.log.1");
        let (log, task) = AccessLog::start(&cfg, Arc::new(Metrics::new())).expect("start");
        for i in 0..30 {
            log.send(numbered(i)).await;
        }
        log.flush().await;
        std::fs::rename(&path, &rotated).expect("rename");
        log.reopen();
        for i in 30..50 {
            log.send(numbered(i)).await;
        }
        finish(task).await;
        let old = ids(&rotated);
        let new = ids(&path);
        assert_eq!(old, (0..30).map(|i| format!("req-{i}")).collect::<Vec<_>>());
        assert_eq!(
            new,
            (30..50).map(|i| format!("req-{i}")).collect::<Vec<_>>()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn reopen_under_concurrent_writers_loses_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cfg, path) = file_config(&dir, 64);
        let (log, task) = AccessLog::start(&cfg, Arc::new(Metrics::new())).expect("start");
        const WRITERS: usize = 8;
        const PER_WRITER: usize = 2000;
        const TOTAL: usize = WRITERS * PER_WRITER;
        const ROTATIONS: usize = 5;
        let sent = Arc::new(AtomicUsize::new(0));
        let mut writers = Vec::new();
        for w in 0..WRITERS {
            let log = log.clone();
            let sent = sent.clone();
            writers.push(tokio::spawn(async move {
                for i in 0..PER_WRITER {
                    let slot = log.reserve().await;
                    slot.send(numbered(w * PER_WRITER + i));
                    sent.fetch_add(1, Ordering::Relaxed);
                    if i % 16 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
            }));
        }
        // Rotate while the writers are mid-stream: after each sixth of the lines.
        let mut rotated = Vec::new();
        for r in 0..ROTATIONS {
            while sent.load(Ordering::Relaxed) < (r + 1) * TOTAL / (ROTATIONS + 1) {
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            let to = dir.path().join(format!("access.log.{r}"));
            std::fs::rename(&path, &to).expect("rename");
            log.reopen();
            rotated.push(to);
        }
        for w in writers {
            w.await.expect("writer");
        }
        finish(task).await;
        let mut all = Vec::new();
        let mut non_empty = 0;
        for f in rotated.iter().chain(std::iter::once(&path)) {
            let lines = ids(f);
            non_empty += usize::from(!lines.is_empty());
            all.extend(lines);
        }
        assert!(
            non_empty >= 3,
            "rotations happened under load ({non_empty} files used)"
        );
        assert_eq!(all.len(), TOTAL, "no line lost or duplicated");
        all.sort();
        all.dedup();
        assert_eq!(all.len(), TOTAL);
    }

    #[tokio::test]
    async fn reopen_failure_keeps_the_old_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).expect("mkdir");
        let path = sub.join("access.log");
        let cfg = AccessLogConfig {
            format: Format::Squid,
            path: path.to_string_lossy().into_owned(),
            buffer: 8,
        };
        let metrics = Arc::new(Metrics::new());
        let (log, task) = AccessLog::start(&cfg, metrics.clone()).expect("start");
        log.send(numbered(0)).await;
        log.flush().await;
        let moved = dir.path().join("moved");
        std::fs::rename(&sub, &moved).expect("move the directory away");
        log.reopen();
        log.send(numbered(1)).await;
        finish(task).await;
        let text = std::fs::read_to_string(moved.join("access.log")).expect("read");
        assert_eq!(text.lines().count(), 2);
        assert!(
            metrics
                .encode()
                .contains("kalmar_access_log_write_errors_total 1")
        );
    }
}
