//! Stage 8 for plain HTTP: send the request to the origin in origin-form over a pooled
//! keep-alive connection and stream the response back.
//!
//! ```text
//! client -> kalmar:  GET http://example.com/a?b HTTP/1.1      Proxy-Connection: keep-alive
//! kalmar -> origin:  GET /a?b HTTP/1.1   Host: example.com    Via: 1.1 kalmar
//! ```
//! Through a parent proxy the request stays in absolute-form, with the parent's
//! credentials, over a pooled keep-alive connection to that parent:
//! ```text
//! kalmar -> parent:  GET http://example.com/a?b HTTP/1.1   Host: example.com
//!                    Proxy-Authorization: Basic YWxpY2U6cHc=   Via: 1.1 kalmar
//! ```

use std::net::SocketAddr;

use http::{Request, Response, Version};
use hyper::body::Incoming;

use super::Exchange;
use super::body::{ClientBody, UpstreamBody};
use super::headers::{RequestRewrite, rewrite_request, rewrite_response};
use crate::connect::pool::Reuse;
use crate::connect::replay::{self, Replay};
use crate::connect::upstream::{Parent, is_parent_refusal};
use crate::connect::{HttpConn, Path};
use crate::error::ProxyError;
use crate::metrics::UpstreamRetry;
use crate::net::Interim;

// === impl Exchange ===

impl Exchange<'_> {
    /// Stages 7-8 for plain HTTP: connect (a pooled connection when there is one), send the
    /// request, and hand back the response head with its body still streaming.
    pub async fn forward(
        &mut self,
        req: Request<Incoming>,
    ) -> Result<Response<ClientBody>, ProxyError> {
        let (parts, body) = req.into_parts();
        let body = UpstreamBody::from_client(body, self.ctx.bytes_from_client.clone());
        self.forward_parts(parts, body).await
    }

    /// [`Exchange::forward`] for a request head and body of Kalmar's own making (the
    /// cache's background revalidation sends one with no body).
    pub async fn forward_parts(
        &mut self,
        parts: http::request::Parts,
        body: UpstreamBody,
    ) -> Result<Response<ClientBody>, ProxyError> {
        let connector = self.connector();
        let dst = self.dest();
        let guard = |ip| self.snap.policy.check_address(&self.decision, ip);
        let reuse = replay::reuse_for(&parts.method, &body);
        let mut path = Path::default();
        let opened = connector
            .http(&self.route, &dst, &guard, reuse, &mut path)
            .await;
        self.ctx.set_path(&path);
        let mut conn = opened?;
        let interim = parts.extensions.get::<Interim>().cloned();
        let mut request = self.upstream_request(parts, body, conn.parent())?;
        if let Some(interim) = &interim {
            forward_interim(&mut request, interim);
        }

        // A pooled connection may have been closed by its peer a moment ago. hyper hands the
        // request back when it was not sent; one that went out and met only the close is
        // sent again from its copy when it may be (`replay`). Either goes once, on a fresh
        // connection, which is never retried.
        let timeout = self.snap.config.timeouts.upstream_response_header;
        let response = loop {
            let addr = conn.sender.peer;
            let copy =
                (conn.sender.reused && reuse == Reuse::Any).then(|| Replay::capture(&mut request));
            let sent = await_response(
                conn.sender.sender.try_send_request(request),
                &self.ctx.bytes_from_client,
                timeout,
            )
            .await;
            let Some(sent) = sent else {
                connector.finished(&conn, false);
                return Err(response_timeout(&conn, addr, timeout));
            };
            let mut err = match sent {
                Ok(response) => break response,
                Err(err) => err,
            };
            let again = match err.take_message() {
                Some(unsent) if conn.sender.reused => Some((unsent, UpstreamRetry::Unsent)),
                None if replay::closed_before_response(err.error()) => copy
                    .and_then(Replay::into_request)
                    .map(|copy| (copy, UpstreamRetry::Closed)),
                _ => None,
            };
            let Some((mut again, why)) = again else {
                connector.finished(&conn, false);
                return Err(upstream_error(addr, &err.into_error(), timeout));
            };
            if why == UpstreamRetry::Closed
                && let Some(interim) = &interim
            {
                forward_interim(&mut again, interim);
            }
            request = again;
            let reopened = connector.reopen(&mut conn, why, &mut path).await;
            self.ctx.set_path(&path);
            reopened?;
            set_parent_auth(&mut request, conn.parent().map(|p| &**p));
        };

        if let Some(parent) = conn.parent()
            && is_parent_refusal(response.status(), response.headers())
        {
            // The parent's own error page is not the origin's answer: say who refused.
            connector.finished(&conn, false);
            return Err(ProxyError::UpstreamRefused {
                parent: parent.label().to_string(),
                status: response.status().as_u16(),
            });
        }
        connector.finished(&conn, true);
        let (mut parts, body) = response.into_parts();
        rewrite_response(&mut parts.headers, self.snap.via.as_ref());
        parts.version = Version::HTTP_11;
        Ok(Response::from_parts(
            parts,
            ClientBody::upstream(body, conn.sender),
        ))
    }

    /// The request as it goes upstream: hop-by-hop headers rewritten, origin-form to an
    /// origin, absolute-form (with the parent's credentials) to a parent.
    fn upstream_request(
        &self,
        mut parts: http::request::Parts,
        body: UpstreamBody,
        parent: Option<&std::sync::Arc<Parent>>,
    ) -> Result<Request<UpstreamBody>, ProxyError> {
        let rewrite = RequestRewrite {
            via: self.snap.via.as_ref(),
            forwarded_for: self.snap.config.proxy.x_forwarded_for,
            client_ip: self.ctx.client_ip(),
            host: &self.target.authority,
            request_id: self
                .snap
                .request_id_header
                .as_ref()
                .map(|name| (name, self.ctx.id())),
        };
        rewrite_request(&mut parts.headers, &rewrite);
        parts.uri = match parent {
            Some(_) => self.target.absolute_form()?,
            None => self.target.origin_form(),
        };
        parts.version = Version::HTTP_11;
        let mut request = Request::from_parts(parts, body);
        if parent.is_some() {
            set_parent_auth(&mut request, parent.map(|p| &**p));
        }
        Ok(request)
    }
}

/// The origin's 1xx answers go to the client ahead of the final response.
fn forward_interim(request: &mut Request<UpstreamBody>, interim: &Interim) {
    let interim = interim.clone();
    hyper::ext::on_informational(request, move |res| {
        interim.push(res.status(), res.headers())
    });
}

/// `Proxy-Authorization` for the parent the request goes to (none to an origin: the
/// client's own credentials for Kalmar were already removed as hop-by-hop).
fn set_parent_auth(request: &mut Request<UpstreamBody>, parent: Option<&Parent>) {
    match parent.and_then(Parent::auth) {
        Some(auth) => {
            request
                .headers_mut()
                .insert(http::header::PROXY_AUTHORIZATION, auth.clone());
        }
        None => {
            request
                .headers_mut()
                .remove(http::header::PROXY_AUTHORIZATION);
        }
    }
}

/// No response head in time: a parent's silence is the parent's, an origin's is the origin's.
fn response_timeout(
    conn: &HttpConn<'_>,
    addr: SocketAddr,
    timeout: std::time::Duration,
) -> ProxyError {
    match conn.parent() {
        Some(parent) => ProxyError::UpstreamTimeout {
            parent: parent.label().to_string(),
            timeout,
        },
        None => ProxyError::ResponseTimeout { addr, timeout },
    }
}

/// Wait for the response head. The timeout counts time without progress: while the
/// client's body is still flowing upstream, the origin is not late yet.
async fn await_response<F: std::future::Future>(
    send: F,
    uploaded: &std::sync::atomic::AtomicU64,
    timeout: std::time::Duration,
) -> Option<F::Output> {
    let mut send = std::pin::pin!(send);
    let mut seen = uploaded.load(std::sync::atomic::Ordering::Relaxed);
    loop {
        tokio::select! {
            out = &mut send => return Some(out),
            _ = tokio::time::sleep(timeout) => {
                let now = uploaded.load(std::sync::atomic::Ordering::Relaxed);
                if now == seen {
                    return None;
                }
                seen = now;
            }
        }
    }
}

fn upstream_error(addr: SocketAddr, e: &hyper::Error, timeout: std::time::Duration) -> ProxyError {
    if e.is_timeout() {
        ProxyError::ResponseTimeout { addr, timeout }
    } else if replay::ended_before_response(e) {
        ProxyError::BadResponse {
            addr,
            reason: "connection closed before a complete response head".into(),
        }
    } else {
        ProxyError::BadResponse {
            addr,
            reason: e.to_string(),
        }
    }
}
