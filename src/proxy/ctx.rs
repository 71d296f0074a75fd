//! Stage 1: the per-request context every stage reads and fills in, and that becomes the
//! request's one access-log line and its metrics when the request is finished.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime};

use http::{HeaderValue, Method, Version};

use crate::access_log::{AccessRecord, LogSlot};
use crate::acl::{Decision, Identity};
use crate::metrics::Metrics;

/// The route label for requests that go straight to the origin.
pub const ROUTE_DIRECT: &str = "direct";
/// The route label when nothing was dialled.
pub const ROUTE_NONE: &str = "none";

/// [`ROUTE_DIRECT`] as a shared `Arc<str>`: a reference-count bump, not an allocation,
/// per request.
pub fn route_direct() -> Arc<str> {
    static ROUTE: std::sync::LazyLock<Arc<str>> =
        std::sync::LazyLock::new(|| Arc::from(ROUTE_DIRECT));
    ROUTE.clone()
}

/// [`ROUTE_NONE`] as a shared `Arc<str>`.
pub fn route_none() -> Arc<str> {
    static ROUTE: std::sync::LazyLock<Arc<str>> =
        std::sync::LazyLock::new(|| Arc::from(ROUTE_NONE));
    ROUTE.clone()
}

/// The client connection a request arrived on.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    pub peer: SocketAddr,
}

pub struct RequestCtx {
    pub id: String,
    pub started: Instant,
    pub time: SystemTime,
    pub client: SocketAddr,
    pub method: Method,
    pub version: Version,
    pub target: String,
    pub user_agent: Option<HeaderValue>,
    pub referer: Option<HeaderValue>,
    pub source_name: Option<Arc<str>>,
    pub labels: Option<Arc<BTreeMap<String, String>>>,
    pub rule: Option<Arc<str>>,
    pub verdict: &'static str,
    pub reason: &'static str,
    pub route: Arc<str>,
    pub resolved: Option<SocketAddr>,
    pub cache: Option<&'static str>,
    pub status: u16,
    pub content_type: Option<HeaderValue>,
    pub error: Option<&'static str>,
    /// Request-body bytes, shared with the body that counts them.
    pub bytes_from_client: Arc<AtomicU64>,
    metrics: Arc<Metrics>,
    slot: Option<LogSlot>,
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
        RequestCtx {
            id: next_request_id(),
            started: Instant::now(),
            time: SystemTime::now(),
            client: conn.peer,
            method: req.method().clone(),
            version: req.version(),
            // Filled by the target stage; a request that never gets there logs its raw URI.
            target: String::new(),
            user_agent: headers.get(http::header::USER_AGENT).map(owned_value),
            referer: headers.get(http::header::REFERER).map(owned_value),
            source_name: None,
            labels: None,
            rule: None,
            verdict: "none",
            reason: "none",
            route: route_none(),
            resolved: None,
            cache: None,
            status: 0,
            content_type: None,
            error: None,
            bytes_from_client: Arc::new(AtomicU64::new(0)),
            metrics,
            slot: Some(slot),
        }
    }

    pub fn set_identity(&mut self, id: &Identity) {
        self.source_name = id.name().map(Arc::from);
        self.labels = id.labels().cloned();
    }

    pub fn set_decision(&mut self, d: &Decision) {
        self.rule = d.rule.clone();
        self.verdict = d.verdict.as_str();
        self.reason = d.reason.as_str();
    }

    /// Keep the first error: it is the cause, later ones are consequences.
    pub fn note_error(&mut self, kind: &'static str) {
        self.error.get_or_insert(kind);
    }

    /// Write the access-log line and record metrics. Called once, when the response
    /// body is done (from its `Drop`, hence the reserved slot: sending cannot wait).
    pub fn finish(&mut self, bytes_to_client: u64) {
        let Some(slot) = self.slot.take() else { return };
        slot.send(self.take_record(bytes_to_client));
    }

    /// As [`RequestCtx::finish`], from async code that may wait for log capacity (tunnels
    /// log at close and hold no slot while open).
    pub async fn finish_async(&mut self, log: &crate::access_log::AccessLog, bytes_to_client: u64) {
        log.send(self.take_record(bytes_to_client)).await;
    }

    fn take_record(&mut self, bytes_to_client: u64) -> AccessRecord {
        let duration = self.started.elapsed();
        let bytes_from_client = self.bytes_from_client.load(Ordering::Relaxed);
        self.metrics.request_finished(
            &self.method,
            self.status,
            self.verdict,
            duration,
            bytes_from_client,
            bytes_to_client,
        );
        if let Some(cache) = self.cache {
            self.metrics.cache(cache, bytes_to_client);
        }
        AccessRecord {
            time: self.time,
            duration,
            request_id: std::mem::take(&mut self.id),
            client: self.client,
            method: self.method.clone(),
            target: std::mem::take(&mut self.target),
            status: self.status,
            bytes_from_client,
            bytes_to_client,
            resolved: self.resolved,
            error: self.error,
            source_name: self.source_name.take(),
            labels: self.labels.take(),
            rule: self.rule.take(),
            verdict: self.verdict,
            reason: self.reason,
            route: self.route.clone(),
            cache: self.cache,
            content_type: self.content_type.take(),
            user_agent: self.user_agent.take(),
            referer: self.referer.take(),
            http_version: self.version,
        }
    }

    /// A copy of this context for a tunnel, which logs when it closes. This context gives
    /// up its log slot, so the `200` that opened the tunnel writes no line of its own.
    pub fn detached_from(ctx: &mut RequestCtx) -> RequestCtx {
        ctx.slot = None;
        RequestCtx {
            id: ctx.id.clone(),
            started: ctx.started,
            time: ctx.time,
            client: ctx.client,
            method: ctx.method.clone(),
            version: ctx.version,
            target: ctx.target.clone(),
            user_agent: ctx.user_agent.clone(),
            referer: ctx.referer.clone(),
            source_name: ctx.source_name.clone(),
            labels: ctx.labels.clone(),
            rule: ctx.rule.clone(),
            verdict: ctx.verdict,
            reason: ctx.reason,
            route: ctx.route.clone(),
            resolved: ctx.resolved,
            cache: None,
            status: ctx.status,
            content_type: None,
            error: None,
            bytes_from_client: Arc::new(AtomicU64::new(0)),
            metrics: ctx.metrics.clone(),
            slot: None,
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
