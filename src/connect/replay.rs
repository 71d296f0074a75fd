//! A second copy of a request, for the one case where Kalmar sends a request twice: the
//! kept-alive connection it took was closed by the peer as the request went out, before any
//! answer came. A server may close an idle connection at any moment (its keep-alive timeout
//! firing while the request is on the wire), so every client that reuses connections meets
//! this race. RFC 9112 §9.3.1 allows sending again only a request with an idempotent method
//! (RFC 9110 §9.2.2); a proxy never retries any other. Such a request therefore takes only a
//! recently used connection ([`super::pool::Reuse::Recent`]).

use std::error::Error as _;
use std::io;
use std::sync::Arc;

use http::{HeaderMap, Method, Request, Uri, Version};
use http_body::Body;

use super::body::{BodyCopy, UpstreamBody};
use super::pool::Reuse;

/// The largest request body kept for sending again; a larger one is sent once.
pub const REPLAY_LIMIT: u64 = 64 * 1024;

/// Which idle connection a request with this method and body may take: any live one when it
/// may be sent again, else only a recently used one.
pub fn reuse_for(method: &Method, body: &UpstreamBody) -> Reuse {
    let small = body.is_end_stream()
        || body
            .size_hint()
            .upper()
            .is_some_and(|len| len <= REPLAY_LIMIT);
    if method.is_idempotent() && small {
        Reuse::Any
    } else {
        Reuse::Recent
    }
}

/// The head of a request as it went upstream (not its extensions: the caller hooks again
/// what it hooked into the first one), and a recording of its body.
pub struct Replay {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
    /// `None`: the body had nothing to send.
    body: Option<Arc<BodyCopy>>,
}

// === impl Replay ===

impl Replay {
    /// Copy `request`'s head (header values are shared `Bytes`, not copied) and record its
    /// body as it is sent.
    pub fn capture(request: &mut Request<UpstreamBody>) -> Replay {
        Replay {
            method: request.method().clone(),
            uri: request.uri().clone(),
            version: request.version(),
            headers: request.headers().clone(),
            body: request.body_mut().record(REPLAY_LIMIT),
        }
    }

    /// The request to send again; `None` when its body was not recorded to its end (the
    /// exchange failed while the client was still sending, or the body outgrew the limit).
    pub fn into_request(self) -> Option<Request<UpstreamBody>> {
        let body = match &self.body {
            Some(copy) => copy.replay()?,
            None => UpstreamBody::Empty,
        };
        let mut request = Request::new(body);
        *request.method_mut() = self.method;
        *request.uri_mut() = self.uri;
        *request.version_mut() = self.version;
        *request.headers_mut() = self.headers;
        Some(request)
    }
}

/// Whether hyper says the connection ended before a whole response head came (a clean
/// close; a reset is an I/O error, see [`closed_before_response`]).
pub fn ended_before_response(error: &hyper::Error) -> bool {
    error.is_incomplete_message() || error.is_closed() || error.is_canceled()
}

/// Whether `error` says the peer closed or reset the connection before a whole response
/// head came: the request may not have been seen at all.
pub fn closed_before_response(error: &hyper::Error) -> bool {
    if ended_before_response(error) {
        return true;
    }
    error
        .source()
        .and_then(|source| source.downcast_ref::<io::Error>())
        .is_some_and(|io| {
            matches!(
                io.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::BrokenPipe
            )
        })
}
