//! Prometheus metrics: Kalmar's own registry, every metric it exports, and cheap recorders for the request path.
//!
//! Every labelled child that the request path touches is resolved once, in [`Metrics::new`],
//! into arrays indexed by small enums, so recording a request is a handful of relaxed atomic
//! adds and never a label hash lookup. Label values are bounded sets only (no host names, URLs
//! or client addresses); the two open-ended inputs (denial reasons and parent proxies) are
//! capped at [`MAX_DYNAMIC_LABELS`] distinct values each, beyond which they count as `other`.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::RwLock;
use prometheus::core::Collector;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::acl::{Reason, Verdict};
use crate::cache::Outcome;
use crate::error::ErrorKind;
use crate::tls::TlsReason;

/// Metric names, one place (README table: "Metrics").
pub mod names {
    /// Counter: finished requests (CONNECT included) by method class, status class and verdict.
    pub const REQUESTS: &str = "kalmar_requests_total";
    /// Histogram: duration of non-CONNECT requests, admission to last byte sent.
    pub const REQUEST_DURATION: &str = "kalmar_request_duration_seconds";
    /// Counter: bytes read from clients (request heads and bodies, tunnel upload).
    pub const CLIENT_RECEIVED_BYTES: &str = "kalmar_client_received_bytes_total";
    /// Counter: bytes written to clients (response heads and bodies, tunnel download).
    pub const CLIENT_SENT_BYTES: &str = "kalmar_client_sent_bytes_total";
    /// Counter: requests denied, by reason (the `X-Kalmar-Error` kind of the denial).
    pub const DENIED: &str = "kalmar_denied_total";
    /// Counter: requests a `report` rule let through that would have been denied, by reason.
    pub const WOULD_DENY: &str = "kalmar_would_deny_total";
    /// Gauge: client connections currently open.
    pub const CLIENT_CONNECTIONS: &str = "kalmar_client_connections";
    /// Counter: client connections accepted.
    pub const CLIENT_CONNECTIONS_ACCEPTED: &str = "kalmar_client_connections_accepted_total";
    /// Counter: client connections refused with a fast 503 because `server.max_connections` was reached.
    pub const CLIENT_CONNECTIONS_REJECTED: &str = "kalmar_client_connections_rejected_total";
    /// Gauge: CONNECT tunnels currently open.
    pub const ACTIVE_TUNNELS: &str = "kalmar_active_tunnels";
    /// Histogram: lifetime of finished CONNECT tunnels.
    pub const TUNNEL_DURATION: &str = "kalmar_tunnel_duration_seconds";
    /// Counter: bytes relayed through CONNECT tunnels, by direction (up = client to origin).
    pub const TUNNEL_BYTES: &str = "kalmar_tunnel_bytes_total";
    /// Counter: ClientHello checks of CONNECT tunnels on a `tls.ports` port, by result (the
    /// check's reason: exact, same-rule, off, ip-literal, missing-sni-allowed, any-protocol,
    /// sni-mismatch, sni-missing, not-tls, client-hello-invalid, ech-denied,
    /// client-hello-timeout, client-closed).
    pub const TUNNEL_TLS_CHECKS: &str = "kalmar_tunnel_tls_checks_total";
    /// Histogram: TCP connect (dial) latency to origins and parents, by result.
    pub const CONNECT_DURATION: &str = "kalmar_connect_duration_seconds";
    /// Counter: DNS lookups, by result.
    pub const DNS_LOOKUPS: &str = "kalmar_dns_lookups_total";
    /// Counter: requests sent through an upstream parent proxy, by parent and result.
    pub const UPSTREAM_REQUESTS: &str = "kalmar_upstream_requests_total";
    /// Counter: requests sent again on a fresh connection because the kept-alive one they
    /// took was closed by its peer, by reason (unsent: before the request went out; closed:
    /// after it went out and before any answer, for a request that may be sent twice).
    pub const UPSTREAM_RETRIES: &str = "kalmar_upstream_retries_total";
    /// Counter: cache lookups, by cache status.
    pub const CACHE_REQUESTS: &str = "kalmar_cache_requests_total";
    /// Counter: response body bytes accounted to the cache, by cache status.
    pub const CACHE_BYTES: &str = "kalmar_cache_bytes_total";
    /// Counter: requests refused by a rate limit (429).
    pub const RATE_LIMITED: &str = "kalmar_rate_limited_total";
    /// Counter: configuration reloads (SIGHUP, file change, POST /reload), by result.
    pub const CONFIG_RELOADS: &str = "kalmar_config_reloads_total";
    /// Gauge: Unix time of the last successful configuration load or reload.
    pub const CONFIG_LAST_RELOAD_SUCCESS: &str =
        "kalmar_config_last_reload_success_timestamp_seconds";
    /// Counter: times a request had to wait for room in the full access-log queue.
    pub const ACCESS_LOG_WAITS: &str = "kalmar_access_log_waits_total";
    /// Counter: access-log lines written.
    pub const ACCESS_LOG_LINES: &str = "kalmar_access_log_lines_total";
    /// Counter: failed access-log writes or reopens (the writer retries; lines are kept).
    pub const ACCESS_LOG_WRITE_ERRORS: &str = "kalmar_access_log_write_errors_total";
    /// Gauge: always 1, labelled with the running version.
    pub const BUILD_INFO: &str = "kalmar_build_info";
    /// Gauge: objects in the live Kubernetes index, by kind (pod, namespace, node).
    pub const KUBERNETES_OBJECTS: &str = "kalmar_kubernetes_objects";
    /// Counter: Kubernetes watch or list failures that restarted a watcher, by kind.
    pub const KUBERNETES_WATCH_RESTARTS: &str = "kalmar_kubernetes_watch_restarts_total";
    /// Counter: times an address became claimed by two live pods (it is then attributed to nobody).
    pub const KUBERNETES_IP_CONFLICTS: &str = "kalmar_kubernetes_ip_conflicts_total";
    /// Gauge: addresses claimed by two or more live pods now.
    pub const KUBERNETES_CONFLICTING_IPS: &str = "kalmar_kubernetes_conflicting_ips";
    /// Gauge: seconds since every Kubernetes watch was last known in sync (0 while healthy).
    pub const KUBERNETES_SYNC_AGE: &str = "kalmar_kubernetes_sync_age_seconds";
    /// Counter: direct pod lookups for unindexed clients inside `pod_cidrs`, by result
    /// (found, not-found, cached, rate-limited, error).
    pub const KUBERNETES_DIRECT_LOOKUPS: &str = "kalmar_kubernetes_direct_lookups_total";
}

/// Label names, one place.
pub mod labels {
    /// Method class: GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS, CONNECT, other.
    pub const METHOD: &str = "method";
    /// Status class: 1xx .. 5xx.
    pub const STATUS: &str = "status";
    /// Policy verdict: allow, deny, report, none.
    pub const VERDICT: &str = "verdict";
    /// Denial reason (bounded by the code base).
    pub const REASON: &str = "reason";
    /// Operation result: ok, error (the tunnel TLS check: its reason).
    pub const RESULT: &str = "result";
    /// Tunnel direction: up (client to origin), down (origin to client).
    pub const DIRECTION: &str = "direction";
    /// Configured parent proxy host:port.
    pub const PARENT: &str = "parent";
    /// Cache status: hit, miss, revalidated, uncacheable, stale, other.
    pub const CACHE_STATUS: &str = "status";
    /// Crate version.
    pub const VERSION: &str = "version";
    /// Kubernetes object kind: pod, namespace, node.
    pub const KIND: &str = "kind";
}

/// At most this many distinct values per open-ended label (reasons, parents); the rest count as `other`.
pub const MAX_DYNAMIC_LABELS: usize = 64;

/// Label value used when a value falls outside a bounded set.
pub const OTHER: &str = "other";

/// Denial reasons (`X-Kalmar-Error` kinds) whose series exist from start-up (others are added
/// on first use).
pub const KNOWN_DENY_REASONS: [&str; 5] = [
    "unknown-source",
    "denied",
    "port-not-allowed",
    "internal-destination",
    "rate-limited",
];

/// Policy reasons of report-mode verdicts whose series exist from start-up.
pub const KNOWN_REPORT_REASONS: [&str; 5] = [
    "rule",
    "default-deny",
    "unknown-source",
    "port-not-allowed",
    "internal-destination",
];

/// Verdict label values, in index order.
pub const VERDICTS: [&str; 4] = ["allow", "deny", "report", "none"];

/// Cache status label values, in index order (the last one catches anything else).
pub const CACHE_STATUSES: [&str; 6] = ["hit", "miss", "revalidated", "uncacheable", "stale", OTHER];

/// Request duration buckets (seconds): sub-millisecond proxying up to slow downloads.
const REQUEST_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];
/// Dial latency buckets (seconds): loopback to a timed-out connect.
const CONNECT_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];
/// Tunnel lifetime buckets (seconds): a quick API call up to a long-lived stream.
const TUNNEL_BUCKETS: &[f64] = &[
    0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 14400.0,
];

/// Why a request was sent again, the `reason` label of [`names::UPSTREAM_RETRIES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamRetry {
    /// The pooled connection was closed before the request went out.
    Unsent,
    /// It was closed after the request went out, before any answer came.
    Closed,
}

impl UpstreamRetry {
    pub const ALL: [UpstreamRetry; 2] = [UpstreamRetry::Unsent, UpstreamRetry::Closed];

    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamRetry::Unsent => "unsent",
            UpstreamRetry::Closed => "closed",
        }
    }
}

/// Method class, the `method` label of [`names::REQUESTS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MethodClass {
    Get,
    Head,
    Post,
    Put,
    Delete,
    Patch,
    Options,
    Connect,
    Other,
}

/// Status class, the `status` label of [`names::REQUESTS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusClass {
    Informational,
    Success,
    Redirection,
    ClientError,
    ServerError,
}

/// Everything Kalmar exports, registered in a registry of its own.
pub struct Metrics {
    registry: Registry,
    /// `[method][status][verdict]`.
    requests: [[[IntCounter; VERDICTS.len()]; StatusClass::COUNT]; MethodClass::COUNT],
    request_duration: Histogram,
    client_received_bytes: IntCounter,
    client_sent_bytes: IntCounter,
    denied: ReasonCounters,
    would_deny: ReasonCounters,
    client_connections: IntGauge,
    connections_accepted: IntCounter,
    connections_rejected: IntCounter,
    active_tunnels: IntGauge,
    tunnel_duration: Histogram,
    /// `[up, down]`.
    tunnel_bytes: [IntCounter; 2],
    /// Indexed by [`TlsReason::index`].
    tunnel_tls_checks: [IntCounter; TlsReason::ALL.len()],
    /// `[ok, error]`.
    connect_duration: [Histogram; 2],
    /// `[ok, error]`.
    dns_lookups: [IntCounter; 2],
    upstream_vec: IntCounterVec,
    upstream: RwLock<HashMap<Box<str>, ParentCounters>>,
    /// Indexed by [`UpstreamRetry`].
    upstream_retries: [IntCounter; UpstreamRetry::ALL.len()],
    cache_requests: [IntCounter; CACHE_STATUSES.len()],
    cache_bytes: [IntCounter; CACHE_STATUSES.len()],
    rate_limited: IntCounter,
    /// `[ok, error]`.
    config_reloads: [IntCounter; 2],
    config_last_reload_success: IntGauge,
    access_log_waits: IntCounter,
    access_log_lines: IntCounter,
    access_log_write_errors: IntCounter,
}

/// Decrements [`names::CLIENT_CONNECTIONS`] when dropped.
#[must_use = "the connection gauge drops back as soon as the guard is dropped"]
#[derive(Debug)]
pub struct ConnectionGuard {
    gauge: IntGauge,
}

/// Decrements [`names::ACTIVE_TUNNELS`] when dropped.
#[must_use = "the tunnel gauge drops back as soon as the guard is dropped"]
#[derive(Debug)]
pub struct TunnelGuard {
    gauge: IntGauge,
}

/// A counter vector over an open-ended but code-bounded `reason` label: known values resolved
/// up front, others on first use, capped at [`MAX_DYNAMIC_LABELS`].
struct ReasonCounters {
    vec: IntCounterVec,
    known: Box<[(&'static str, IntCounter)]>,
    dynamic: RwLock<HashMap<&'static str, IntCounter>>,
}

/// The resolved counters of one parent proxy; hold one per configured parent to skip the map lookup.
#[derive(Debug, Clone)]
pub struct ParentCounters {
    ok: IntCounter,
    error: IntCounter,
}

// === impl MethodClass ===

impl MethodClass {
    /// Number of classes.
    pub const COUNT: usize = 9;
    /// All classes, in index order.
    pub const ALL: [MethodClass; Self::COUNT] = [
        Self::Get,
        Self::Head,
        Self::Post,
        Self::Put,
        Self::Delete,
        Self::Patch,
        Self::Options,
        Self::Connect,
        Self::Other,
    ];

    /// Classify a request method; extension methods are `other`.
    pub fn of(method: &http::Method) -> Self {
        match *method {
            http::Method::GET => Self::Get,
            http::Method::HEAD => Self::Head,
            http::Method::POST => Self::Post,
            http::Method::PUT => Self::Put,
            http::Method::DELETE => Self::Delete,
            http::Method::PATCH => Self::Patch,
            http::Method::OPTIONS => Self::Options,
            http::Method::CONNECT => Self::Connect,
            _ => Self::Other,
        }
    }

    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Get => "GET",
            Self::Head => "HEAD",
            Self::Post => "POST",
            Self::Put => "PUT",
            Self::Delete => "DELETE",
            Self::Patch => "PATCH",
            Self::Options => "OPTIONS",
            Self::Connect => "CONNECT",
            Self::Other => OTHER,
        }
    }
}

// === impl StatusClass ===

impl StatusClass {
    /// Number of classes.
    pub const COUNT: usize = 5;
    /// All classes, in index order.
    pub const ALL: [StatusClass; Self::COUNT] = [
        Self::Informational,
        Self::Success,
        Self::Redirection,
        Self::ClientError,
        Self::ServerError,
    ];

    /// Classify a status code; anything below 200 is `1xx`, anything from 500 up is `5xx`.
    pub fn of(status: u16) -> Self {
        match status {
            0..=199 => Self::Informational,
            200..=299 => Self::Success,
            300..=399 => Self::Redirection,
            400..=499 => Self::ClientError,
            _ => Self::ServerError,
        }
    }

    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Informational => "1xx",
            Self::Success => "2xx",
            Self::Redirection => "3xx",
            Self::ClientError => "4xx",
            Self::ServerError => "5xx",
        }
    }
}

// === impl Metrics ===

impl Metrics {
    /// Build the registry, register every metric, pre-resolve every bounded label combination
    /// (so all series exist at 0 from the first scrape) and set `kalmar_build_info`.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let r = &registry;

        let requests_vec = register(
            r,
            counter_vec(
                names::REQUESTS,
                "Finished requests (CONNECT included) by method class, status class and verdict.",
                &[labels::METHOD, labels::STATUS, labels::VERDICT],
            ),
        );
        let requests = std::array::from_fn(|m| {
            std::array::from_fn(|s| {
                std::array::from_fn(|v| {
                    requests_vec.with_label_values(&[
                        MethodClass::ALL[m].as_str(),
                        StatusClass::ALL[s].as_str(),
                        VERDICTS[v],
                    ])
                })
            })
        });
        let request_duration = register(
            r,
            histogram(
                names::REQUEST_DURATION,
                "Duration of non-CONNECT requests from admission to the last byte sent.",
                REQUEST_BUCKETS,
            ),
        );
        let client_received_bytes = register(
            r,
            counter(
                names::CLIENT_RECEIVED_BYTES,
                "Bytes read from clients (request heads and bodies, tunnel upload).",
            ),
        );
        let client_sent_bytes = register(
            r,
            counter(
                names::CLIENT_SENT_BYTES,
                "Bytes written to clients (response heads and bodies, tunnel download).",
            ),
        );
        let denied = ReasonCounters::new(
            register(
                r,
                counter_vec(
                    names::DENIED,
                    "Requests denied, by reason (the X-Kalmar-Error kind).",
                    &[labels::REASON],
                ),
            ),
            &KNOWN_DENY_REASONS,
        );
        let would_deny = ReasonCounters::new(
            register(
                r,
                counter_vec(
                    names::WOULD_DENY,
                    "Requests a report-mode rule let through that would have been denied, by reason.",
                    &[labels::REASON],
                ),
            ),
            &KNOWN_REPORT_REASONS,
        );
        let client_connections = register(
            r,
            gauge(
                names::CLIENT_CONNECTIONS,
                "Client connections currently open.",
            ),
        );
        let connections_accepted = register(
            r,
            counter(
                names::CLIENT_CONNECTIONS_ACCEPTED,
                "Client connections accepted.",
            ),
        );
        let connections_rejected = register(
            r,
            counter(
                names::CLIENT_CONNECTIONS_REJECTED,
                "Client connections refused with 503 because server.max_connections was reached.",
            ),
        );
        let active_tunnels = register(
            r,
            gauge(names::ACTIVE_TUNNELS, "CONNECT tunnels currently open."),
        );
        let tunnel_duration = register(
            r,
            histogram(
                names::TUNNEL_DURATION,
                "Lifetime of finished CONNECT tunnels.",
                TUNNEL_BUCKETS,
            ),
        );
        let tunnel_bytes_vec = register(
            r,
            counter_vec(
                names::TUNNEL_BYTES,
                "Bytes relayed through CONNECT tunnels, by direction (up = client to origin).",
                &[labels::DIRECTION],
            ),
        );
        let tunnel_bytes = [
            tunnel_bytes_vec.with_label_values(&["up"]),
            tunnel_bytes_vec.with_label_values(&["down"]),
        ];
        let tls_checks_vec = register(
            r,
            counter_vec(
                names::TUNNEL_TLS_CHECKS,
                "ClientHello checks of CONNECT tunnels on a tls.ports port, by result.",
                &[labels::RESULT],
            ),
        );
        let tunnel_tls_checks = std::array::from_fn(|i| {
            tls_checks_vec.with_label_values(&[TlsReason::ALL[i].as_str()])
        });
        let connect_vec = register(
            r,
            histogram_vec(
                names::CONNECT_DURATION,
                "TCP connect (dial) latency to origins and parent proxies, by result.",
                &[labels::RESULT],
                CONNECT_BUCKETS,
            ),
        );
        let connect_duration = [
            connect_vec.with_label_values(&["ok"]),
            connect_vec.with_label_values(&["error"]),
        ];
        let dns_vec = register(
            r,
            counter_vec(
                names::DNS_LOOKUPS,
                "DNS lookups, by result.",
                &[labels::RESULT],
            ),
        );
        let dns_lookups = [
            dns_vec.with_label_values(&["ok"]),
            dns_vec.with_label_values(&["error"]),
        ];
        let upstream_vec = register(
            r,
            counter_vec(
                names::UPSTREAM_REQUESTS,
                "Requests sent through an upstream parent proxy, by parent and result.",
                &[labels::PARENT, labels::RESULT],
            ),
        );
        let retries_vec = register(
            r,
            counter_vec(
                names::UPSTREAM_RETRIES,
                "Requests sent again on a fresh connection after the kept-alive one was closed by its peer, by reason.",
                &[labels::REASON],
            ),
        );
        let upstream_retries =
            UpstreamRetry::ALL.map(|why| retries_vec.with_label_values(&[why.as_str()]));
        let cache_requests_vec = register(
            r,
            counter_vec(
                names::CACHE_REQUESTS,
                "Cache lookups, by cache status.",
                &[labels::CACHE_STATUS],
            ),
        );
        let cache_requests =
            std::array::from_fn(|i| cache_requests_vec.with_label_values(&[CACHE_STATUSES[i]]));
        let cache_bytes_vec = register(
            r,
            counter_vec(
                names::CACHE_BYTES,
                "Response body bytes accounted to the cache, by cache status.",
                &[labels::CACHE_STATUS],
            ),
        );
        let cache_bytes =
            std::array::from_fn(|i| cache_bytes_vec.with_label_values(&[CACHE_STATUSES[i]]));
        let rate_limited = register(
            r,
            counter(
                names::RATE_LIMITED,
                "Requests refused by a rate limit (429).",
            ),
        );
        let reloads_vec = register(
            r,
            counter_vec(
                names::CONFIG_RELOADS,
                "Configuration reloads (SIGHUP, file change, POST /reload), by result.",
                &[labels::RESULT],
            ),
        );
        let config_reloads = [
            reloads_vec.with_label_values(&["ok"]),
            reloads_vec.with_label_values(&["error"]),
        ];
        let config_last_reload_success = register(
            r,
            gauge(
                names::CONFIG_LAST_RELOAD_SUCCESS,
                "Unix time of the last successful configuration load or reload.",
            ),
        );
        config_last_reload_success.set(unix_now());
        let access_log_waits = register(
            r,
            counter(
                names::ACCESS_LOG_WAITS,
                "Times a request waited for room in the full access-log queue (back-pressure).",
            ),
        );
        let access_log_lines = register(
            r,
            counter(names::ACCESS_LOG_LINES, "Access-log lines written."),
        );
        let access_log_write_errors = register(
            r,
            counter(
                names::ACCESS_LOG_WRITE_ERRORS,
                "Failed access-log writes or reopens (the writer retries; lines are kept).",
            ),
        );
        let build_info = register(
            r,
            gauge_vec(
                names::BUILD_INFO,
                "Always 1, labelled with the running Kalmar version.",
                &[labels::VERSION],
            ),
        );
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);

        Metrics {
            registry,
            requests,
            request_duration,
            client_received_bytes,
            client_sent_bytes,
            denied,
            would_deny,
            client_connections,
            connections_accepted,
            connections_rejected,
            active_tunnels,
            tunnel_duration,
            tunnel_bytes,
            tunnel_tls_checks,
            connect_duration,
            dns_lookups,
            upstream_vec,
            upstream: RwLock::new(HashMap::new()),
            upstream_retries,
            cache_requests,
            cache_bytes,
            rate_limited,
            config_reloads,
            config_last_reload_success,
            access_log_waits,
            access_log_lines,
            access_log_write_errors,
        }
    }

    /// The registry, for modules that register metrics of their own (names in [`names`] first).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Prometheus text exposition (format 0.0.4) of everything registered.
    pub fn encode(&self) -> String {
        match TextEncoder::new().encode_to_string(&self.registry.gather()) {
            Ok(text) => text,
            Err(error) => {
                tracing::error!(%error, "encoding metrics failed");
                String::new()
            }
        }
    }

    /// One finished request or tunnel (call once, when its access-log line is written).
    /// `verdict` outside allow|deny|report counts as `none`; CONNECT durations are left to
    /// [`Metrics::tunnel_finished`] so tunnels do not swamp the request-duration histogram.
    pub fn request_finished(
        &self,
        method: &http::Method,
        status: u16,
        verdict: Option<Verdict>,
        duration: Duration,
        bytes_from_client: u64,
        bytes_to_client: u64,
    ) {
        let m = MethodClass::of(method);
        let s = StatusClass::of(status) as usize;
        let v = verdict_index(verdict);
        self.requests[m as usize][s][v].inc();
        if m != MethodClass::Connect {
            self.request_duration.observe(duration.as_secs_f64());
        }
        if bytes_from_client > 0 {
            self.client_received_bytes.inc_by(bytes_from_client);
        }
        if bytes_to_client > 0 {
            self.client_sent_bytes.inc_by(bytes_to_client);
        }
    }

    /// One denial, by its `X-Kalmar-Error` kind. Reasons outside [`KNOWN_DENY_REASONS`] get a
    /// series on first use, up to [`MAX_DYNAMIC_LABELS`]; beyond that they count as `other`.
    pub fn denied(&self, kind: ErrorKind) {
        self.denied.inc(kind.as_str());
    }

    /// One request that a `report` rule let through but would have denied, by policy reason
    /// (same capping as [`Metrics::denied`]).
    pub fn denied_report(&self, reason: Reason) {
        self.would_deny.inc(reason.as_str());
    }

    /// A tunnel that failed its ClientHello check under a `report` rule, by the check's reason
    /// (same counter and capping as [`Metrics::denied_report`]).
    pub fn denied_report_tls(&self, reason: TlsReason) {
        self.would_deny.inc(reason.as_str());
    }

    /// One tunnel's ClientHello check, by its reason.
    pub fn tunnel_tls_check(&self, reason: TlsReason) {
        if let Some(counter) = self.tunnel_tls_checks.get(reason.index()) {
            counter.inc();
        }
    }

    /// A client connection was accepted; the returned guard keeps it in the open-connections gauge.
    pub fn connection_opened(&self) -> ConnectionGuard {
        self.connections_accepted.inc();
        self.client_connections.inc();
        ConnectionGuard {
            gauge: self.client_connections.clone(),
        }
    }

    /// A client was refused because `server.max_connections` was reached.
    pub fn connection_rejected(&self) {
        self.connections_rejected.inc();
    }

    /// A tunnel was established; the returned guard keeps it in the active-tunnels gauge.
    pub fn tunnel_opened(&self) -> TunnelGuard {
        self.active_tunnels.inc();
        TunnelGuard {
            gauge: self.active_tunnels.clone(),
        }
    }

    /// A tunnel closed after `duration`, having relayed `bytes_up` (client to origin) and `bytes_down`.
    pub fn tunnel_finished(&self, duration: Duration, bytes_up: u64, bytes_down: u64) {
        self.tunnel_duration.observe(duration.as_secs_f64());
        if bytes_up > 0 {
            self.tunnel_bytes[0].inc_by(bytes_up);
        }
        if bytes_down > 0 {
            self.tunnel_bytes[1].inc_by(bytes_down);
        }
    }

    /// One TCP connect attempt to an origin or a parent.
    pub fn dial(&self, duration: Duration, ok: bool) {
        self.connect_duration[result_index(ok)].observe(duration.as_secs_f64());
    }

    /// One DNS lookup (cache hits of the resolver included).
    pub fn dns_lookup(&self, ok: bool) {
        self.dns_lookups[result_index(ok)].inc();
    }

    /// One request or tunnel sent through the parent proxy `parent` (configured host:port).
    pub fn upstream_request(&self, parent: &str, ok: bool) {
        let hit = self
            .upstream
            .read()
            .get(parent)
            .map(|counters| counters.record(ok))
            .is_some();
        if !hit {
            self.parent(parent).record(ok);
        }
    }

    /// One request sent again on a fresh connection.
    pub fn upstream_retry(&self, why: UpstreamRetry) {
        self.upstream_retries[why as usize].inc();
    }

    /// The counters of one parent proxy, created on first use (at most [`MAX_DYNAMIC_LABELS`]
    /// parents, then `other`). Call it once per configured parent at (re)load to pre-create
    /// its series and to record without the map lookup.
    pub fn parent(&self, parent: &str) -> ParentCounters {
        if let Some(counters) = self.upstream.read().get(parent) {
            return counters.clone();
        }
        let mut map = self.upstream.write();
        let label = if map.len() < MAX_DYNAMIC_LABELS || map.contains_key(parent) {
            parent
        } else {
            OTHER
        };
        map.entry(label.into())
            .or_insert_with(|| ParentCounters {
                ok: self.upstream_vec.with_label_values(&[label, "ok"]),
                error: self.upstream_vec.with_label_values(&[label, "error"]),
            })
            .clone()
    }

    /// One cache decision and the body bytes it accounts for (served for hits, fetched for misses).
    pub fn cache(&self, outcome: Outcome, bytes: u64) {
        let i = cache_index(outcome);
        self.cache_requests[i].inc();
        if bytes > 0 {
            self.cache_bytes[i].inc_by(bytes);
        }
    }

    /// One request refused by a rate limit.
    pub fn rate_limited(&self) {
        self.rate_limited.inc();
    }

    /// One configuration reload attempt (SIGHUP, file change or POST /reload).
    pub fn config_reload(&self, ok: bool) {
        self.config_reloads[result_index(ok)].inc();
        if ok {
            self.config_last_reload_success.set(unix_now());
        }
    }

    /// A request found the access-log queue full and waits for room.
    pub fn access_log_wait(&self) {
        self.access_log_waits.inc();
    }

    /// The access-log writer wrote `lines` lines.
    pub fn access_log_written(&self, lines: u64) {
        self.access_log_lines.inc_by(lines);
    }

    /// The access-log writer failed a write or a reopen.
    pub fn access_log_write_error(&self) {
        self.access_log_write_errors.inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

// === impl ConnectionGuard ===

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

// === impl TunnelGuard ===

impl Drop for TunnelGuard {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

// === impl ReasonCounters ===

impl ReasonCounters {
    fn new(vec: IntCounterVec, known: &[&'static str]) -> Self {
        let known = known
            .iter()
            .map(|reason| (*reason, vec.with_label_values(&[*reason])))
            .collect();
        ReasonCounters {
            vec,
            known,
            dynamic: RwLock::new(HashMap::new()),
        }
    }

    fn inc(&self, reason: &'static str) {
        if let Some((_, counter)) = self.known.iter().find(|(known, _)| *known == reason) {
            counter.inc();
            return;
        }
        if let Some(counter) = self.dynamic.read().get(reason) {
            counter.inc();
            return;
        }
        let mut map = self.dynamic.write();
        let label = if map.len() < MAX_DYNAMIC_LABELS {
            reason
        } else {
            OTHER
        };
        map.entry(label)
            .or_insert_with(|| self.vec.with_label_values(&[label]))
            .inc();
    }
}

// === impl ParentCounters ===

impl ParentCounters {
    /// Count one request through this parent.
    pub fn record(&self, ok: bool) {
        if ok {
            self.ok.inc();
        } else {
            self.error.inc();
        }
    }
}

// --- helpers: the metric definitions are static, so a failure here is a programming error
// caught by the unit tests, never something input can trigger.

fn counter(name: &str, help: &str) -> IntCounter {
    IntCounter::with_opts(Opts::new(name, help)).expect("static counter definition")
}

fn counter_vec(name: &str, help: &str, label_names: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), label_names).expect("static counter definition")
}

fn gauge(name: &str, help: &str) -> IntGauge {
    IntGauge::with_opts(Opts::new(name, help)).expect("static gauge definition")
}

fn gauge_vec(name: &str, help: &str, label_names: &[&str]) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), label_names).expect("static gauge definition")
}

fn histogram(name: &str, help: &str, buckets: &[f64]) -> Histogram {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
        .expect("static histogram definition")
}

fn histogram_vec(name: &str, help: &str, label_names: &[&str], buckets: &[f64]) -> HistogramVec {
    HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        label_names,
    )
    .expect("static histogram definition")
}

/// Register `collector`; a duplicate name is logged (the metric then simply is not exported).
fn register<C: Collector + Clone + 'static>(registry: &Registry, collector: C) -> C {
    if let Err(error) = registry.register(Box::new(collector.clone())) {
        tracing::error!(%error, "registering a metric failed");
    }
    collector
}

/// The position of a verdict in [`VERDICTS`]; `None` (not evaluated) is `none`.
fn verdict_index(verdict: Option<Verdict>) -> usize {
    match verdict {
        Some(Verdict::Allow) => 0,
        Some(Verdict::Deny) => 1,
        Some(Verdict::Report) => 2,
        None => 3,
    }
}

/// The position of a cache outcome in [`CACHE_STATUSES`].
fn cache_index(outcome: Outcome) -> usize {
    match outcome {
        Outcome::Hit => 0,
        Outcome::Miss => 1,
        Outcome::Revalidated => 2,
        Outcome::Uncacheable => 3,
        Outcome::Stale => 4,
    }
}

fn result_index(ok: bool) -> usize {
    if ok { 0 } else { 1 }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_parse::{Sample, Scrape, Value};

    fn scrape(metrics: &Metrics) -> Scrape {
        let text = metrics.encode();
        Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("exposition parses")
    }

    /// Value of the sample `name` whose labels include all of `want`.
    fn value(scrape: &Scrape, name: &str, want: &[(&str, &str)]) -> f64 {
        let matching: Vec<&Sample> = scrape
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .filter(|s| want.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .collect();
        assert_eq!(matching.len(), 1, "{name} {want:?}: {matching:?}");
        match &matching[0].value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            Value::Histogram(h) => h.iter().map(|b| b.count).fold(0.0, f64::max),
            Value::Summary(_) => panic!("no summaries here"),
        }
    }

    fn histogram_count(scrape: &Scrape, name: &str, want: &[(&str, &str)]) -> f64 {
        value(scrape, name, want)
    }

    #[test]
    fn every_metric_is_exported_with_help_and_zero_series() {
        let metrics = Metrics::new();
        let text = metrics.encode();
        let all = [
            names::REQUESTS,
            names::REQUEST_DURATION,
            names::CLIENT_RECEIVED_BYTES,
            names::CLIENT_SENT_BYTES,
            names::DENIED,
            names::WOULD_DENY,
            names::CLIENT_CONNECTIONS,
            names::CLIENT_CONNECTIONS_ACCEPTED,
            names::CLIENT_CONNECTIONS_REJECTED,
            names::ACTIVE_TUNNELS,
            names::TUNNEL_DURATION,
            names::TUNNEL_BYTES,
            names::CONNECT_DURATION,
            names::DNS_LOOKUPS,
            names::CACHE_REQUESTS,
            names::CACHE_BYTES,
            names::RATE_LIMITED,
            names::CONFIG_RELOADS,
            names::CONFIG_LAST_RELOAD_SUCCESS,
            names::ACCESS_LOG_WAITS,
            names::ACCESS_LOG_LINES,
            names::ACCESS_LOG_WRITE_ERRORS,
            names::BUILD_INFO,
        ];
        for name in all {
            assert!(name.starts_with("kalmar_"), "{name}");
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "{name} has no HELP line"
            );
        }
        // upstream requests exist once a parent is configured
        assert!(!text.contains(names::UPSTREAM_REQUESTS));
        let scrape = scrape(&metrics);
        // all 9 x 5 x 4 request series exist from the start
        let requests = scrape
            .samples
            .iter()
            .filter(|s| s.metric == names::REQUESTS)
            .count();
        assert_eq!(requests, 180);
        assert_eq!(
            value(
                &scrape,
                names::BUILD_INFO,
                &[("version", env!("CARGO_PKG_VERSION"))]
            ),
            1.0
        );
    }

    #[test]
    fn counters_move_by_the_right_amounts() {
        let metrics = Metrics::new();
        let get = http::Method::GET;
        for _ in 0..3 {
            metrics.request_finished(
                &get,
                200,
                Some(Verdict::Allow),
                Duration::from_millis(3),
                10,
                1000,
            );
        }
        metrics.request_finished(
            &http::Method::CONNECT,
            200,
            Some(Verdict::Report),
            Duration::from_secs(9),
            7,
            8,
        );
        let ext = http::Method::from_bytes(b"PROPFIND").expect("valid method");
        metrics.request_finished(&ext, 403, Some(Verdict::Deny), Duration::ZERO, 0, 0);
        metrics.request_finished(&get, 0, None, Duration::ZERO, 0, 0);
        metrics.request_finished(&get, 999, None, Duration::ZERO, 0, 0);
        metrics.denied(ErrorKind::UnknownSource);
        metrics.denied(ErrorKind::UnknownSource);
        metrics.denied(ErrorKind::InternalDestination);
        metrics.denied_report(Reason::Rule);
        metrics.connection_rejected();
        metrics.dial(Duration::from_millis(1), true);
        metrics.dial(Duration::from_secs(10), false);
        metrics.dial(Duration::from_secs(10), false);
        metrics.dns_lookup(true);
        metrics.dns_lookup(false);
        metrics.upstream_request("parent.corp:3128", true);
        metrics.upstream_request("parent.corp:3128", false);
        metrics.upstream_request("parent.corp:3128", true);
        metrics.cache(Outcome::Hit, 100);
        metrics.cache(Outcome::Miss, 50);
        metrics.rate_limited();
        metrics.config_reload(true);
        metrics.config_reload(false);
        metrics.access_log_wait();
        metrics.access_log_written(12);
        metrics.access_log_write_error();
        metrics.tunnel_finished(Duration::from_secs(2), 300, 4000);

        let s = scrape(&metrics);
        let req = |m, st, v| {
            value(
                &s,
                names::REQUESTS,
                &[("method", m), ("status", st), ("verdict", v)],
            )
        };
        assert_eq!(req("GET", "2xx", "allow"), 3.0);
        assert_eq!(req("CONNECT", "2xx", "report"), 1.0);
        assert_eq!(req("other", "4xx", "deny"), 1.0);
        assert_eq!(req("GET", "1xx", "none"), 1.0);
        assert_eq!(req("GET", "5xx", "none"), 1.0);
        assert_eq!(req("POST", "2xx", "allow"), 0.0);
        // CONNECT is not in the request-duration histogram
        assert_eq!(histogram_count(&s, names::REQUEST_DURATION, &[]), 6.0);
        assert_eq!(value(&s, names::CLIENT_RECEIVED_BYTES, &[]), 37.0);
        assert_eq!(value(&s, names::CLIENT_SENT_BYTES, &[]), 3008.0);
        assert_eq!(
            value(&s, names::DENIED, &[("reason", "unknown-source")]),
            2.0
        );
        assert_eq!(
            value(&s, names::DENIED, &[("reason", "internal-destination")]),
            1.0
        );
        assert_eq!(value(&s, names::DENIED, &[("reason", "denied")]), 0.0);
        assert_eq!(value(&s, names::WOULD_DENY, &[("reason", "rule")]), 1.0);
        assert_eq!(
            value(&s, names::WOULD_DENY, &[("reason", "default-deny")]),
            0.0
        );
        assert_eq!(value(&s, names::CLIENT_CONNECTIONS_REJECTED, &[]), 1.0);
        assert_eq!(
            histogram_count(&s, names::CONNECT_DURATION, &[("result", "ok")]),
            1.0
        );
        assert_eq!(
            histogram_count(&s, names::CONNECT_DURATION, &[("result", "error")]),
            2.0
        );
        assert_eq!(value(&s, names::DNS_LOOKUPS, &[("result", "ok")]), 1.0);
        assert_eq!(value(&s, names::DNS_LOOKUPS, &[("result", "error")]), 1.0);
        let parent = |r| {
            value(
                &s,
                names::UPSTREAM_REQUESTS,
                &[("parent", "parent.corp:3128"), ("result", r)],
            )
        };
        assert_eq!(parent("ok"), 2.0);
        assert_eq!(parent("error"), 1.0);
        assert_eq!(value(&s, names::CACHE_REQUESTS, &[("status", "hit")]), 1.0);
        assert_eq!(
            value(&s, names::CACHE_REQUESTS, &[("status", "other")]),
            0.0
        );
        assert_eq!(value(&s, names::CACHE_BYTES, &[("status", "hit")]), 100.0);
        assert_eq!(value(&s, names::CACHE_BYTES, &[("status", "miss")]), 50.0);
        assert_eq!(value(&s, names::RATE_LIMITED, &[]), 1.0);
        assert_eq!(value(&s, names::CONFIG_RELOADS, &[("result", "ok")]), 1.0);
        assert_eq!(
            value(&s, names::CONFIG_RELOADS, &[("result", "error")]),
            1.0
        );
        assert!(value(&s, names::CONFIG_LAST_RELOAD_SUCCESS, &[]) > 1.6e9);
        assert_eq!(value(&s, names::ACCESS_LOG_WAITS, &[]), 1.0);
        assert_eq!(value(&s, names::ACCESS_LOG_LINES, &[]), 12.0);
        assert_eq!(value(&s, names::ACCESS_LOG_WRITE_ERRORS, &[]), 1.0);
        assert_eq!(histogram_count(&s, names::TUNNEL_DURATION, &[]), 1.0);
        assert_eq!(
            value(&s, names::TUNNEL_BYTES, &[("direction", "up")]),
            300.0
        );
        assert_eq!(
            value(&s, names::TUNNEL_BYTES, &[("direction", "down")]),
            4000.0
        );
    }

    #[test]
    fn guards_track_open_connections_and_tunnels() {
        let metrics = Metrics::new();
        let a = metrics.connection_opened();
        let b = metrics.connection_opened();
        let t = metrics.tunnel_opened();
        let s = scrape(&metrics);
        assert_eq!(value(&s, names::CLIENT_CONNECTIONS, &[]), 2.0);
        assert_eq!(value(&s, names::CLIENT_CONNECTIONS_ACCEPTED, &[]), 2.0);
        assert_eq!(value(&s, names::ACTIVE_TUNNELS, &[]), 1.0);
        drop((a, t));
        let s = scrape(&metrics);
        assert_eq!(value(&s, names::CLIENT_CONNECTIONS, &[]), 1.0);
        assert_eq!(value(&s, names::ACTIVE_TUNNELS, &[]), 0.0);
        drop(b);
        let s = scrape(&metrics);
        assert_eq!(value(&s, names::CLIENT_CONNECTIONS, &[]), 0.0);
        assert_eq!(value(&s, names::CLIENT_CONNECTIONS_ACCEPTED, &[]), 2.0);
    }

    #[test]
    fn open_ended_labels_are_capped() {
        let metrics = Metrics::new();
        for i in 0..(MAX_DYNAMIC_LABELS + 10) {
            metrics.upstream_request(&format!("parent-{i}:3128"), true);
        }
        let s = scrape(&metrics);
        let parents = s
            .samples
            .iter()
            .filter(|x| {
                x.metric == names::UPSTREAM_REQUESTS && x.labels.get("result") == Some("ok")
            })
            .count();
        assert_eq!(parents, MAX_DYNAMIC_LABELS + 1);
        assert_eq!(
            value(
                &s,
                names::UPSTREAM_REQUESTS,
                &[("parent", OTHER), ("result", "ok")]
            ),
            10.0
        );
        // an already-known parent keeps its own series after the cap
        metrics.upstream_request("parent-0:3128", true);
        let s = scrape(&metrics);
        assert_eq!(
            value(
                &s,
                names::UPSTREAM_REQUESTS,
                &[("parent", "parent-0:3128"), ("result", "ok")]
            ),
            2.0
        );
    }

    #[test]
    fn registries_are_independent() {
        let a = Metrics::new();
        let b = Metrics::new();
        a.rate_limited();
        assert_eq!(value(&scrape(&a), names::RATE_LIMITED, &[]), 1.0);
        assert_eq!(value(&scrape(&b), names::RATE_LIMITED, &[]), 0.0);
    }
}
