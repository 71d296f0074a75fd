//! Every way a request can fail, and the one place that turns a failure into a response.
//!
//! Each error has a stable `kind` (sent as `X-Kalmar-Error` and logged as `error`), an HTTP
//! status, and a one-line message naming the offending value. Nothing else in the crate
//! builds an error response.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

/// The response header that marks a response Kalmar generated itself.
pub const ERROR_HEADER: &str = "x-kalmar-error";
/// The request id, returned on every response Kalmar generates.
pub const REQUEST_ID_HEADER: &str = "x-kalmar-request-id";

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
    #[error("request head of {size} bytes exceeds server.max_request_header_size ({limit} bytes)")]
    HeadersTooLarge { size: usize, limit: usize },
    /// An ACL denial; `kind` is the policy's reason (unknown-source, denied, ...).
    #[error("{message}")]
    Denied { kind: &'static str, message: String },
    #[error("rate limit {limit:?} exceeded; retry after {}s", retry_after.as_secs().max(1))]
    RateLimited {
        retry_after: Duration,
        limit: String,
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
}

// === impl ProxyError ===

impl ProxyError {
    /// The stable `X-Kalmar-Error` value.
    pub fn kind(&self) -> &'static str {
        match self {
            ProxyError::Malformed(_) => "malformed-request",
            ProxyError::NotProxyRequest(_) => "not-proxy-request",
            ProxyError::MethodNotAllowed(_) => "method-not-allowed",
            ProxyError::Unsupported(_) => "unsupported",
            ProxyError::HeadersTooLarge { .. } => "headers-too-large",
            ProxyError::Denied { kind, .. } => kind,
            ProxyError::RateLimited { .. } => "rate-limited",
            ProxyError::Dns { .. } => "dns-failure",
            ProxyError::ConnectFailed { .. } => "connect-failed",
            ProxyError::ConnectTimeout { .. } => "connect-timeout",
            ProxyError::ResponseTimeout { .. } => "response-timeout",
            ProxyError::BadResponse { .. } => "bad-upstream-response",
            ProxyError::UpstreamRefused { .. } => "upstream-refused",
            ProxyError::UpstreamUnavailable(_) => "upstream-unavailable",
            ProxyError::UpstreamTimeout { .. } => "upstream-timeout",
            ProxyError::Overloaded(_) => "overloaded",
            ProxyError::ShuttingDown => "shutting-down",
            ProxyError::NotCached(_) => "not-cached",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::Malformed(_) | ProxyError::NotProxyRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::Unsupported(_) => StatusCode::NOT_IMPLEMENTED,
            ProxyError::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
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
        }
    }

    /// The response for this error: status, `X-Kalmar-Error`, request id, short text body.
    pub fn to_response<B: From<Bytes>>(&self, request_id: &str) -> Response<B> {
        error_response(self.status(), self.kind(), &self.to_string(), request_id)
    }
}

/// Build a Kalmar-generated error response. Also used for the raw-socket answers written
/// before hyper owns a connection (see `server`), so that both look the same.
pub fn error_response<B: From<Bytes>>(
    status: StatusCode,
    kind: &'static str,
    message: &str,
    request_id: &str,
) -> Response<B> {
    let body = Bytes::from(format!("{} {}: {message}\n", status.as_u16(), kind));
    let mut response = Response::new(B::from(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(ERROR_HEADER, HeaderValue::from_static(kind));
    if let Ok(id) = HeaderValue::from_str(request_id) {
        headers.insert(REQUEST_ID_HEADER, id);
    }
    response
}

/// The bytes of a complete HTTP/1.1 error response that closes the connection, for
/// answers written straight to a socket (overload, unparsable first request).
pub fn raw_error_response(status: StatusCode, kind: &'static str, message: &str) -> Vec<u8> {
    let body = format!("{} {}: {message}\n", status.as_u16(), kind);
    format!(
        "HTTP/1.1 {} {}\r\ncontent-type: text/plain; charset=utf-8\r\ncache-control: no-store\r\n{ERROR_HEADER}: {kind}\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    )
    .into_bytes()
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
            assert_eq!(r.headers()[ERROR_HEADER], e.kind());
            assert!(std::str::from_utf8(r.body()).unwrap().contains(e.kind()));
        }
    }

    #[test]
    fn raw_response_is_parseable() {
        let raw = raw_error_response(StatusCode::SERVICE_UNAVAILABLE, "overloaded", "busy");
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
    }
}
