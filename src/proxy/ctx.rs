//! Stage 1: the per-request context every stage reads and fills in. It holds the request's
//! access-log record itself, so the line and the metrics come from one value, once, when
//! the request is finished (the response body is done, or the tunnel closed).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime};

use http::HeaderValue;

use crate::access_log::{AccessLog, AccessRecord, LogSlot};
use crate::acl::{Decision, Identity, Reason, Verdict};
use crate::connect::Path;
use crate::error::{ErrorKind, ProxyError};
use crate::metrics::Metrics;
use crate::net::{ActiveResponse, ConnState};

/// The client connection a request arrived on.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub state: Arc<ConnState>,
}

pub struct RequestCtx {
    /// The line this request will log; stages fill it in as they learn.
    pub record: AccessRecord,
    pub started: Instant,
    /// Request-body bytes, shared with the body that counts them.
    pub bytes_from_client: Arc<AtomicU64>,
    metrics: Arc<Metrics>,
    slot: Option<LogSlot>,
    /// Marks this request's response as in progress on its connection until the context
    /// is done (see `net::ClientIo`).
    _active: Option<ActiveResponse>,
}

// === impl RequestCtx ===

impl RequestCtx {
    pub fn new(
        conn: &ConnInfo,
        req: &http::Request<hyper::body::Incoming>,
        metrics: Arc<Metrics>,
        slot: LogSlot,
    ) -> RequestCtx {
        let headers = req.headers();
        let mut record = AccessRecord::new(conn.peer, SystemTime::now());
        record.request_id = next_request_id();
        record.method = req.method().clone();
        record.http_version = req.version();
        record.user_agent = headers.get(http::header::USER_AGENT).map(owned_value);
        record.referer = headers.get(http::header::REFERER).map(owned_value);
        RequestCtx {
            record,
            started: Instant::now(),
            bytes_from_client: Arc::new(AtomicU64::new(0)),
            metrics,
            slot: Some(slot),
            _active: Some(conn.state.response_started()),
        }
    }

    /// A connection refused before any request could be read (overload, an unparsable or
    /// too slow first head): the line says what was answered. Logs through `finish_async`.
    pub fn rejected(
        peer: SocketAddr,
        started: Instant,
        time: SystemTime,
        metrics: Arc<Metrics>,
    ) -> RequestCtx {
        let mut record = AccessRecord::new(peer, time);
        record.target = "-".into();
        RequestCtx {
            record,
            started,
            bytes_from_client: Arc::new(AtomicU64::new(0)),
            metrics,
            slot: None,
            _active: None,
        }
    }

    pub fn id(&self) -> &str {
        &self.record.request_id
    }

    pub fn client_ip(&self) -> std::net::IpAddr {
        self.record.client.ip()
    }

    pub fn set_identity(&mut self, id: &Identity) {
        self.record.source_name = id.name().map(Arc::from);
        self.record.labels = id.labels().cloned();
        self.record.pod = id.as_pod().cloned();
        self.record.node = match (id.as_pod(), id.as_node()) {
            (Some(pod), _) => pod.node.clone(),
            (None, Some(node)) => Some(node.name.clone()),
            (None, None) => None,
        };
    }

    pub fn set_decision(&mut self, d: &Decision) {
        self.record.rule = d.rule.clone();
        self.record.verdict = Some(d.verdict);
        self.record.reason = Some(d.reason);
    }

    /// Where the connect step got to (also when it failed).
    pub fn set_path(&mut self, path: &Path) {
        self.record.route = path.hop.clone();
        if path.peer.is_some() {
            self.record.resolved = path.peer;
        }
    }

    /// The request ends with `err`'s answer. A denial found after the decision (every
    /// address of the name is internal) is logged as the deny it was answered with.
    pub fn failed(&mut self, err: &ProxyError) {
        let kind = err.kind();
        self.note_error(kind);
        if kind == ErrorKind::InternalDestination {
            self.record.verdict = Some(Verdict::Deny);
            self.record.reason = Some(Reason::InternalDestination);
        }
    }

    /// Keep the first error: it is the cause, later ones are consequences.
    pub fn note_error(&mut self, kind: ErrorKind) {
        self.record.error.get_or_insert(kind);
    }

    /// Write the access-log line and record metrics. Called once, when the response
    /// body is done (from its `Drop`, hence the reserved slot: sending cannot wait).
    pub fn finish(&mut self, bytes_to_client: u64) {
        let Some(slot) = self.slot.take() else { return };
        slot.send(self.take_record(bytes_to_client));
    }

    /// As [`RequestCtx::finish`], from async code that may wait for log capacity (tunnels
    /// log at close and hold no slot while open).
    pub async fn finish_async(&mut self, log: &AccessLog, bytes_to_client: u64) {
        log.send(self.take_record(bytes_to_client)).await;
    }

    /// The finished record, with every metric of the request recorded from it.
    fn take_record(&mut self, bytes_to_client: u64) -> AccessRecord {
        let spent = AccessRecord::new(self.record.client, self.record.time);
        let mut record = std::mem::replace(&mut self.record, spent);
        record.duration = self.started.elapsed();
        record.bytes_from_client = self.bytes_from_client.load(Ordering::Relaxed);
        record.bytes_to_client = bytes_to_client;
        let metrics = &self.metrics;
        metrics.request_finished(
            &record.method,
            record.status,
            record.verdict,
            record.duration,
            record.bytes_from_client,
            bytes_to_client,
        );
        match record.error {
            Some(ErrorKind::RateLimited) => metrics.rate_limited(),
            Some(kind) if kind.is_denial() => metrics.denied(kind),
            _ => {}
        }
        if let (Some(Verdict::Report), Some(reason)) = (record.verdict, record.reason) {
            metrics.denied_report(reason);
        }
        if let Some(check) = record.tls
            && check.verdict == Verdict::Report
        {
            metrics.denied_report_tls(check.reason);
        }
        if let Some(cache) = record.cache {
            metrics.cache(cache, bytes_to_client);
        }
        record
    }

    /// The context of a background revalidation the cache starts while serving this
    /// request: the same client, identity, decision and target, a request id of its own,
    /// and no access-log line (the client's request has its own line).
    pub fn background(&self) -> RequestCtx {
        let mut record = self.record.clone();
        record.request_id = next_request_id();
        RequestCtx {
            record,
            started: Instant::now(),
            bytes_from_client: Arc::new(AtomicU64::new(0)),
            metrics: self.metrics.clone(),
            slot: None,
            // Not a response on the client's connection.
            _active: None,
        }
    }

    /// The context of a tunnel, which logs when it closes. This context gives up its log
    /// slot, so the `200` that opened the tunnel writes no line of its own.
    pub fn detach_tunnel(&mut self) -> RequestCtx {
        self.slot = None;
        RequestCtx {
            record: self.record.clone(),
            started: self.started,
            bytes_from_client: Arc::new(AtomicU64::new(0)),
            metrics: self.metrics.clone(),
            slot: None,
            _active: None,
        }
    }
}

/// A copy of a header value for the log record, which outlives the request. A plain clone
/// would share hyper's whole read buffer (8 KiB+) until the log line is written, and make
/// hyper allocate a fresh one for the connection's next message.
pub fn owned_value(value: &HeaderValue) -> HeaderValue {
    let mut owned = HeaderValue::from_maybe_shared(bytes::Bytes::copy_from_slice(value.as_bytes()))
        .unwrap_or_else(|_| HeaderValue::from_static(""));
    owned.set_sensitive(value.is_sensitive());
    owned
}

/// A process-unique request id: a random 32-bit prefix (from the clock and pid) and a
/// counter, `pppppppp-cccccccccc` in hex (written by hand: this runs for every request).
fn next_request_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    static PREFIX: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let prefix = *PREFIX.get_or_init(|| {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        nanos ^ std::process::id().rotate_left(16)
    });
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut id = String::with_capacity(19);
    push_hex(&mut id, u64::from(prefix), 8);
    id.push('-');
    push_hex(&mut id, n, 10);
    id
}

/// The low `width` hex digits of `value`, zero-padded.
fn push_hex(out: &mut String, value: u64, width: u32) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for shift in (0..width).rev() {
        out.push(char::from(DIGITS[((value >> (shift * 4)) & 0xf) as usize]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_fixed_width_hex_and_distinct() {
        let (a, b) = (next_request_id(), next_request_id());
        assert_ne!(a, b);
        for id in [&a, &b] {
            assert_eq!(id.len(), 19, "{id}");
            assert_eq!(&id[8..9], "-");
            assert!(
                id.chars().all(|c| c == '-' || c.is_ascii_hexdigit()),
                "{id}"
            );
        }
        let mut s = String::new();
        push_hex(&mut s, 0xab, 10);
        assert_eq!(s, "00000000ab");
    }
}
