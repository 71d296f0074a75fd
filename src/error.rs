//! Every way a request can fail, and the one place that turns a failure into a response.
//!
//! Each error has a stable `kind` (sent as `X-Kalmar-Error` and logged as `error`), an HTTP
//! status, and a one-line message naming the offending value. Nothing else in the crate
//! builds an error response.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

/// The response header that marks a response Kalmar generated itself.
pub const ERROR_HEADER: &str = "x-kalmar-error";
/// The request id, returned on every response Kalmar generates.
pub const REQUEST_ID_HEADER: &str = "x-kalmar-request-id";

/// The stable kinds: sent as `X-Kalmar-Error`, logged as `error`, used as metric labels.
/// The log-only kinds mark requests that ended badly after their answer had begun.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    MalformedRequest,
    NotProxyRequest,
    MethodNotAllowed,
    Unsupported,
    HeadersTooLarge,
    HeaderTimeout,
    UnknownSource,
    Denied,
    PortNotAllowed,
    InternalDestination,
    RateLimited,
    DnsFailure,
    ConnectFailed,
    ConnectTimeout,
    ResponseTimeout,
    BadUpstreamResponse,
    UpstreamRefused,
    UpstreamUnavailable,
    UpstreamTimeout,
    Overloaded,
    ShuttingDown,
    NotCached,
    InternalError,
    // Log-only: the answer had already begun.
    ClientAborted,
    UpstreamAborted,
    TunnelIdleTimeout,
    TunnelError,
    // Log-only: a tunnel closed by its ClientHello check (`src/tls`), after the `200`.
    SniMismatch,
    SniMissing,
    NotTls,
    ClientHelloInvalid,
    EchDenied,
    ClientHelloTimeout,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error(
        "this is a forward proxy: send absolute-form requests (GET http://host/path) or CONNECT host:port, not {0:?}"
    )]
    NotProxyRequest(String),
    #[error("method {0} is not allowed through this proxy")]
    MethodNotAllowed(http::Method),
    #[error("not supported: {0}")]
    Unsupported(String),
    /// A request body in a transfer coding Kalmar cannot frame (RFC 9112 6.1).
    #[error("not supported: transfer coding {0:?}")]
    UnknownCoding(String),
    #[error("request head of {size}+ bytes exceeds server.max_request_header_size ({limit} bytes)")]
    HeadersTooLarge { size: usize, limit: usize },
    #[error("more than {0} header fields")]
    TooManyHeaders(usize),
    #[error("request head not complete within {}ms", .0.as_millis())]
    HeaderTimeout(Duration),
    /// An ACL denial; `kind` is the policy's reason (unknown-source, denied, ...).
    #[error("{message}")]
    Denied { kind: ErrorKind, message: String },
    #[error("rate limit {limit:?} exceeded; retry after {}s", retry_after_secs(*.retry_after))]
    RateLimited {
        retry_after: Duration,
        limit: Arc<str>,
    },
    #[error("DNS lookup for {host:?} failed: {reason}")]
    Dns { host: String, reason: String },
    #[error("connection to {addr} failed: {reason}")]
    ConnectFailed { addr: SocketAddr, reason: String },
    #[error("connection to {addr} timed out after {}ms", timeout.as_millis())]
    ConnectTimeout { addr: SocketAddr, timeout: Duration },
    #[error("no response head from {addr} within {}ms", timeout.as_millis())]
    ResponseTimeout { addr: SocketAddr, timeout: Duration },
    #[error("bad response from {addr}: {reason}")]
    BadResponse { addr: SocketAddr, reason: String },
    #[error("parent proxy {parent} refused the request with status {status}")]
    UpstreamRefused { parent: String, status: u16 },
    #[error("no parent proxy available: {0}")]
    UpstreamUnavailable(String),
    #[error("parent proxy {parent} did not answer within {}ms", timeout.as_millis())]
    UpstreamTimeout { parent: String, timeout: Duration },
    #[error("proxy is at its connection limit ({0}); try again")]
    Overloaded(usize),
    #[error("proxy is shutting down")]
    ShuttingDown,
    /// `Cache-Control: only-if-cached` and no usable stored response (RFC 9111 5.2.1.7).
    #[error("{0} is not in the cache (the request said only-if-cached)")]
    NotCached(String),
    /// A broken invariant of Kalmar's own: never the client's fault.
    #[error("internal error: {0}")]
    Internal(&'static str),
}

// === impl ErrorKind ===

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::MalformedRequest => "malformed-request",
            ErrorKind::NotProxyRequest => "not-proxy-request",
            ErrorKind::MethodNotAllowed => "method-not-allowed",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::HeadersTooLarge => "headers-too-large",
            ErrorKind::HeaderTimeout => "header-timeout",
            ErrorKind::UnknownSource => "unknown-source",
            ErrorKind::Denied => "denied",
            ErrorKind::PortNotAllowed => "port-not-allowed",
            ErrorKind::InternalDestination => "internal-destination",
            ErrorKind::RateLimited => "rate-limited",
            ErrorKind::DnsFailure => "dns-failure",
            ErrorKind::ConnectFailed => "connect-failed",
            ErrorKind::ConnectTimeout => "connect-timeout",
            ErrorKind::ResponseTimeout => "response-timeout",
            ErrorKind::BadUpstreamResponse => "bad-upstream-response",
            ErrorKind::UpstreamRefused => "upstream-refused",
            ErrorKind::UpstreamUnavailable => "upstream-unavailable",
            ErrorKind::UpstreamTimeout => "upstream-timeout",
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::ShuttingDown => "shutting-down",
            ErrorKind::NotCached => "not-cached",
            ErrorKind::InternalError => "internal-error",
            ErrorKind::ClientAborted => "client-aborted",
            ErrorKind::UpstreamAborted => "upstream-aborted",
            ErrorKind::TunnelIdleTimeout => "tunnel-idle-timeout",
            ErrorKind::TunnelError => "tunnel-error",
            ErrorKind::SniMismatch => "sni-mismatch",
            ErrorKind::SniMissing => "sni-missing",
            ErrorKind::NotTls => "not-tls",
            ErrorKind::ClientHelloInvalid => "client-hello-invalid",
            ErrorKind::EchDenied => "ech-denied",
            ErrorKind::ClientHelloTimeout => "client-hello-timeout",
        }
    }

    /// Refusals by the access policy, the address guard and the tunnel ClientHello check:
    /// counted in `kalmar_denied_total` (rate limits have their own counter).
    pub fn is_denial(self) -> bool {
        matches!(
            self,
            ErrorKind::UnknownSource
                | ErrorKind::Denied
                | ErrorKind::PortNotAllowed
                | ErrorKind::InternalDestination
                | ErrorKind::SniMismatch
                | ErrorKind::SniMissing
                | ErrorKind::NotTls
                | ErrorKind::ClientHelloInvalid
                | ErrorKind::EchDenied
                | ErrorKind::ClientHelloTimeout
        )
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

// === impl ProxyError ===

impl ProxyError {
    /// The stable `X-Kalmar-Error` value.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ProxyError::Malformed(_) => ErrorKind::MalformedRequest,
            ProxyError::NotProxyRequest(_) => ErrorKind::NotProxyRequest,
            ProxyError::MethodNotAllowed(_) => ErrorKind::MethodNotAllowed,
            ProxyError::Unsupported(_) | ProxyError::UnknownCoding(_) => ErrorKind::Unsupported,
            ProxyError::HeadersTooLarge { .. } | ProxyError::TooManyHeaders(_) => {
                ErrorKind::HeadersTooLarge
            }
            ProxyError::HeaderTimeout(_) => ErrorKind::HeaderTimeout,
            ProxyError::Denied { kind, .. } => *kind,
            ProxyError::RateLimited { .. } => ErrorKind::RateLimited,
            ProxyError::Dns { .. } => ErrorKind::DnsFailure,
            ProxyError::ConnectFailed { .. } => ErrorKind::ConnectFailed,
            ProxyError::ConnectTimeout { .. } => ErrorKind::ConnectTimeout,
            ProxyError::ResponseTimeout { .. } => ErrorKind::ResponseTimeout,
            ProxyError::BadResponse { .. } => ErrorKind::BadUpstreamResponse,
            ProxyError::UpstreamRefused { .. } => ErrorKind::UpstreamRefused,
            ProxyError::UpstreamUnavailable(_) => ErrorKind::UpstreamUnavailable,
            ProxyError::UpstreamTimeout { .. } => ErrorKind::UpstreamTimeout,
            ProxyError::Overloaded(_) => ErrorKind::Overloaded,
            ProxyError::ShuttingDown => ErrorKind::ShuttingDown,
            ProxyError::NotCached(_) => ErrorKind::NotCached,
            ProxyError::Internal(_) => ErrorKind::InternalError,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::Malformed(_) | ProxyError::NotProxyRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::Unsupported(_) | ProxyError::UnknownCoding(_) => {
                StatusCode::NOT_IMPLEMENTED
            }
            ProxyError::HeadersTooLarge { .. } | ProxyError::TooManyHeaders(_) => {
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
            }
            ProxyError::HeaderTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            // Denials are 403, never 407: clients read 407 as a credentials prompt.
            ProxyError::Denied { .. } => StatusCode::FORBIDDEN,
            ProxyError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::Dns { .. }
            | ProxyError::ConnectFailed { .. }
            | ProxyError::BadResponse { .. }
            | ProxyError::UpstreamRefused { .. }
            | ProxyError::UpstreamUnavailable(_) => StatusCode::BAD_GATEWAY,
            ProxyError::Overloaded(_) | ProxyError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::ConnectTimeout { .. }
            | ProxyError::ResponseTimeout { .. }
            | ProxyError::UpstreamTimeout { .. }
            | ProxyError::NotCached(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The response for this error: status, `X-Kalmar-Error`, request id, short text body,
    /// and the error's own extra headers (`Retry-After` for a rate limit). Every answer
    /// Kalmar generates is made here.
    pub fn to_response<B: From<Bytes>>(&self, request_id: &str) -> Response<B> {
        let status = self.status();
        let kind = self.kind().as_str();
        let body = Bytes::from(format!("{} {kind}: {self}\n", status.as_u16()));
        let mut response = Response::new(B::from(body));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        headers.insert(ERROR_HEADER, HeaderValue::from_static(kind));
        if !request_id.is_empty()
            && let Ok(id) = HeaderValue::from_str(request_id)
        {
            headers.insert(REQUEST_ID_HEADER, id);
        }
        if let ProxyError::RateLimited { retry_after, .. } = self {
            headers.insert(header::RETRY_AFTER, retry_after_secs(*retry_after).into());
        }
        if self.ends_connection() {
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }

    /// After a request whose framing could not be trusted, the connection is closed: where
    /// its body ends, and so where a next request would begin, is unknown.
    pub fn ends_connection(&self) -> bool {
        matches!(
            self,
            ProxyError::Malformed(_)
                | ProxyError::UnknownCoding(_)
                | ProxyError::HeadersTooLarge { .. }
                | ProxyError::TooManyHeaders(_)
                | ProxyError::HeaderTimeout(_)
        )
    }

    /// The bytes of [`ProxyError::to_response`] as a complete HTTP/1.1 response that closes
    /// the connection, for answers written straight to a socket before hyper owns it
    /// (overload, an unparsable or too slow first request head).
    pub fn to_raw_response(&self) -> Vec<u8> {
        let response: Response<Bytes> = self.to_response("");
        let status = response.status();
        let mut out = format!(
            "HTTP/1.1 {} {}\r\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or("")
        )
        .into_bytes();
        for (name, value) in response.headers() {
            if name == header::CONNECTION {
                continue;
            }
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        let body = response.body();
        out.extend_from_slice(
            format!(
                "connection: close\r\ncontent-length: {}\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        );
        out.extend_from_slice(body);
        out
    }
}

/// `Retry-After` seconds: at least 1, so a client never retries at once.
fn retry_after_secs(wait: Duration) -> u64 {
    wait.as_secs().max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_a_status_and_header() {
        let errors = [
            ProxyError::Malformed("x".into()),
            ProxyError::HeadersTooLarge { size: 2, limit: 1 },
            ProxyError::Overloaded(1),
            ProxyError::Dns {
                host: "a".into(),
                reason: "NXDOMAIN".into(),
            },
        ];
        for e in errors {
            let r: Response<Bytes> = e.to_response("id-1");
            assert_eq!(r.status(), e.status());
            assert_eq!(r.headers()[ERROR_HEADER], e.kind().as_str());
            assert!(
                std::str::from_utf8(r.body())
                    .unwrap()
                    .contains(e.kind().as_str())
            );
        }
    }

    #[test]
    fn raw_response_is_parseable() {
        let raw = ProxyError::Overloaded(7).to_raw_response();
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut resp = httparse::Response::new(&mut headers);
        let n = resp.parse(&raw).unwrap().unwrap();
        assert_eq!(resp.code, Some(503));
        let len: usize = resp
            .headers
            .iter()
            .find(|h| h.name == "content-length")
            .map(|h| std::str::from_utf8(h.value).unwrap().parse().unwrap())
            .unwrap();
        assert_eq!(raw.len() - n, len);
        assert!(
            resp.headers
                .iter()
                .any(|h| h.name == ERROR_HEADER && h.value == b"overloaded")
        );
    }

    #[test]
    fn rate_limit_answers_carry_retry_after() {
        let e = ProxyError::RateLimited {
            retry_after: Duration::from_millis(200),
            limit: "pods".into(),
        };
        let r: Response<Bytes> = e.to_response("id-2");
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
    }
}
