//! The access-log record: everything one line says about a request or a tunnel, as typed
//! values (the formats turn them into text), and the JSON field names.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::acl::{PodIdentity, Reason, Verdict};
use crate::cache::Outcome;
use crate::error::ErrorKind;
use crate::tls::TlsCheck;

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
    /// string|null: tunnels: the server name (SNI) of the client's ClientHello, normalised.
    pub const SNI: &str = "sni";
    /// array|null: tunnels: the ALPN protocol names the ClientHello offered.
    pub const ALPN: &str = "alpn";
    /// string|null: the client pod, `namespace/name` (with `[kubernetes]` on).
    pub const POD: &str = "pod";
    /// string|null: the client pod's namespace.
    pub const NAMESPACE: &str = "namespace";
    /// string|null: the client pod's service account.
    pub const SERVICE_ACCOUNT: &str = "service_account";
    /// string|null: the client pod's node, or the node that is the client.
    pub const NODE: &str = "node";

    /// Every field, in output order.
    pub const ALL: [&str; 28] = [
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
        SNI,
        ALPN,
        POD,
        NAMESPACE,
        SERVICE_ACCOUNT,
        NODE,
    ];
}

/// Everything one access-log line says about a request or a tunnel. The one definition of
/// the line: a request's context holds one and fills it in stage by stage, a tunnel copies
/// it, and a connection refused before any request starts from [`AccessRecord::new`].
#[derive(Debug, Clone)]
pub struct AccessRecord {
    /// Request start.
    pub time: SystemTime,
    pub duration: Duration,
    pub request_id: String,
    pub client: SocketAddr,
    /// `CONNECT` for tunnels; `NONE` when no request could be parsed.
    pub method: http::Method,
    /// Absolute URL, or host:port for CONNECT.
    pub target: String,
    pub status: u16,
    pub bytes_from_client: u64,
    pub bytes_to_client: u64,
    /// The vetted address actually dialled.
    pub resolved: Option<SocketAddr>,
    /// `X-Kalmar-Error` kind, or a log-only kind.
    pub error: Option<ErrorKind>,
    pub source_name: Option<Arc<str>>,
    /// `None` = unknown source.
    pub labels: Option<Arc<BTreeMap<String, String>>>,
    /// The client pod, when the live index identified it (its name outlives its address).
    pub pod: Option<Arc<PodIdentity>>,
    /// The pod's node, or the node that is the client.
    pub node: Option<Arc<str>>,
    pub rule: Option<Arc<str>>,
    /// `None` = not evaluated (`none` in the log).
    pub verdict: Option<Verdict>,
    pub reason: Option<Reason>,
    pub route: Hop,
    pub cache: Option<Outcome>,
    pub content_type: Option<http::HeaderValue>,
    pub user_agent: Option<http::HeaderValue>,
    pub referer: Option<http::HeaderValue>,
    pub http_version: http::Version,
    /// Tunnels: the ClientHello's server name (normalised), when a hello with one was read.
    pub sni: Option<Box<str>>,
    /// Tunnels: the ALPN names the ClientHello offered; `None` when no hello was read.
    pub alpn: Option<Vec<String>>,
    /// Tunnels on a `tls.ports` port: the ClientHello check's outcome.
    pub tls: Option<TlsCheck>,
}

// === impl AccessRecord ===

impl AccessRecord {
    /// A record for a request from `client` that started at `time`, nothing decided yet.
    pub fn new(client: SocketAddr, time: SystemTime) -> AccessRecord {
        AccessRecord {
            time,
            duration: Duration::ZERO,
            request_id: String::new(),
            client,
            method: none_method(),
            target: String::new(),
            status: 0,
            bytes_from_client: 0,
            bytes_to_client: 0,
            resolved: None,
            error: None,
            source_name: None,
            labels: None,
            pod: None,
            node: None,
            rule: None,
            verdict: None,
            reason: None,
            route: Hop::None,
            cache: None,
            content_type: None,
            user_agent: None,
            referer: None,
            http_version: http::Version::HTTP_11,
            sni: None,
            alpn: None,
            tls: None,
        }
    }

    /// `allow`, `deny`, `report`, or `none`.
    pub fn verdict_str(&self) -> &'static str {
        self.verdict.map_or("none", |v| v.as_str())
    }

    /// The policy's reason; for a tunnel that failed its ClientHello check (closed, or
    /// relayed under a `report` rule), the check's (`sni-mismatch`, ...).
    /// The user name the text formats log (Squid's `%[un`, combined's `%u`): the client
    /// pod as `namespace/name`, empty when the client is not a known pod.
    pub fn user(&self) -> &str {
        self.pod
            .as_deref()
            .map(|p| p.full_name())
            .unwrap_or_default()
    }

    pub fn reason_str(&self) -> &'static str {
        match self.tls {
            Some(check) if check.reason.is_failure() => check.reason.as_str(),
            _ => self.reason.map_or("none", |r| r.as_str()),
        }
    }
}

/// The method logged when no request could be parsed.
fn none_method() -> http::Method {
    static NONE: std::sync::LazyLock<http::Method> =
        std::sync::LazyLock::new(|| http::Method::from_bytes(b"NONE").unwrap_or(http::Method::GET));
    NONE.clone()
}

/// Where a request went next (the connect step fills it in): nowhere yet, the origin itself, or a parent proxy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Hop {
    #[default]
    None,
    Direct,
    /// The parent's configured `host:port` (never credentials).
    Parent(Arc<str>),
}

// === impl Hop ===

impl Hop {
    /// The log spelling: `none`, `direct`, or the parent's `host:port`.
    pub fn as_str(&self) -> &str {
        match self {
            Hop::None => "none",
            Hop::Direct => "direct",
            Hop::Parent(label) => label,
        }
    }
}
