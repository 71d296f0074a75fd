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

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http::{Request, Response, Version};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use super::Proxy;
use super::body::{ClientBody, UpstreamBody};
use super::ctx::{RequestCtx, route_direct};
use super::headers::{RequestRewrite, rewrite_request, rewrite_response};
use super::target::Target;
use crate::connect::pool::{PoolKey, PooledSender};
use crate::connect::upstream::{Parent, ParentFailure, ParentSet, Route, is_parent_refusal};
use crate::connect::{self, Vetted};
use crate::error::ProxyError;
use crate::state::Snapshot;

pub async fn forward(
    proxy: &Arc<Proxy>,
    snap: &Arc<Snapshot>,
    ctx: &mut RequestCtx,
    target: &Target,
    check: impl FnMut(IpAddr) -> Result<(), ProxyError>,
    req: Request<Incoming>,
) -> Result<Response<ClientBody>, ProxyError> {
    let config = &snap.config;
    let vetted = connect::resolve_vetted(
        &snap.resolver,
        &proxy.metrics,
        &target.host,
        target.port,
        check,
    )
    .await?;

    let (mut parts, body) = req.into_parts();
    rewrite_request(&mut parts.headers, &request_rewrite(snap, ctx, target));
    parts.uri = target.origin_form();
    parts.version = Version::HTTP_11;
    let mut request = Request::from_parts(
        parts,
        UpstreamBody::from_client(body, ctx.bytes_from_client.clone()),
    );
    ctx.route = route_direct();

    // A pooled connection may have been closed by the origin a moment ago; hyper hands the
    // request back when it was not sent, and then one fresh connection is tried.
    let mut conn = checkout_or_dial(proxy, snap, &vetted, true).await?;
    ctx.resolved = Some(addr_of(&conn));
    let timeout = config.timeouts.upstream_response_header;
    let response = loop {
        let addr = addr_of(&conn);
        match await_response(
            conn.sender.try_send_request(request),
            &ctx.bytes_from_client,
            timeout,
        )
        .await
        .ok_or(ProxyError::ResponseTimeout { addr, timeout })?
        {
            Ok(response) => break response,
            Err(mut err) => match err.take_message() {
                Some(unsent) if conn.reused => {
                    request = unsent;
                    conn = checkout_or_dial(proxy, snap, &vetted, false).await?;
                    ctx.resolved = Some(addr_of(&conn));
                }
                _ => return Err(upstream_error(addr, &err.into_error(), timeout)),
            },
        }
    };

    let (mut parts, body) = response.into_parts();
    rewrite_response(&mut parts.headers, snap.via.as_ref());
    parts.version = Version::HTTP_11;
    Ok(Response::from_parts(
        parts,
        ClientBody::upstream(body, conn),
    ))
}

/// Send the request through one of `parents`. A parent whose connect fails is marked down
/// and the next one tried (the request has not been sent); once sent, a failure is final.
/// How the request's headers change on the way out, for any route.
fn request_rewrite<'a>(
    snap: &'a Snapshot,
    ctx: &'a RequestCtx,
    target: &'a Target,
) -> RequestRewrite<'a> {
    RequestRewrite {
        via: snap.via.as_ref(),
        forwarded_for: snap.config.proxy.x_forwarded_for,
        client_ip: ctx.client.ip(),
        host: &target.authority,
        request_id: snap
            .request_id_header
            .as_ref()
            .map(|name| (name, ctx.id.as_str())),
    }
}

/// The exchange with whatever the route says: the origin itself, or a parent proxy.
pub async fn exchange(
    proxy: &Arc<Proxy>,
    snap: &Arc<Snapshot>,
    ctx: &mut RequestCtx,
    target: &Target,
    route: &Route<'_>,
    check: impl FnMut(IpAddr) -> Result<(), ProxyError>,
    req: Request<Incoming>,
) -> Result<Response<ClientBody>, ProxyError> {
    match route {
        Route::Direct(_) => forward(proxy, snap, ctx, target, check, req).await,
        // Boxed: hyper moves the whole request future into place for every request, so
        // the less common route's state lives on the heap, only when it is taken.
        Route::Parents(parents) => {
            Box::pin(forward_via_parent(proxy, snap, ctx, target, parents, req)).await
        }
    }
}

pub async fn forward_via_parent(
    proxy: &Arc<Proxy>,
    snap: &Arc<Snapshot>,
    ctx: &mut RequestCtx,
    target: &Target,
    parents: &ParentSet,
    req: Request<Incoming>,
) -> Result<Response<ClientBody>, ProxyError> {
    let config = &snap.config;
    let mut attempts = parents.attempts()?;
    let (mut parts, body) = req.into_parts();
    rewrite_request(&mut parts.headers, &request_rewrite(snap, ctx, target));
    parts.uri = target.absolute_form()?;
    parts.version = Version::HTTP_11;
    let mut request = Request::from_parts(
        parts,
        UpstreamBody::from_client(body, ctx.bytes_from_client.clone()),
    );
    let timeout = config.timeouts.upstream_response_header;
    let (response, conn, parent) = 'parents: loop {
        let Some(parent) = attempts.next_parent() else {
            return Err(attempts.exhausted());
        };
        ctx.route = parent.label().clone();
        match parent.auth() {
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
        let mut allow_pooled = true;
        loop {
            let mut conn = match checkout_or_dial_parent(proxy, snap, parent, allow_pooled).await {
                Ok(conn) => conn,
                Err(failure) => {
                    proxy.metrics.upstream_request(parent.label(), false);
                    attempts.failed(parent, failure);
                    continue 'parents;
                }
            };
            ctx.resolved = Some(conn.peer);
            let sent = await_response(
                conn.sender.try_send_request(request),
                &ctx.bytes_from_client,
                timeout,
            )
            .await;
            let Some(sent) = sent else {
                proxy.metrics.upstream_request(parent.label(), false);
                return Err(ProxyError::UpstreamTimeout {
                    parent: parent.label().to_string(),
                    timeout,
                });
            };
            match sent {
                Ok(response) => break 'parents (response, conn, parent),
                Err(mut err) => match err.take_message() {
                    // A stale pooled connection: the request was not sent, try a fresh one.
                    Some(unsent) if conn.reused => {
                        request = unsent;
                        allow_pooled = false;
                    }
                    _ => {
                        proxy.metrics.upstream_request(parent.label(), false);
                        return Err(upstream_error(conn.peer, &err.into_error(), timeout));
                    }
                },
            }
        }
    };

    let status = response.status();
    if is_parent_refusal(status, response.headers()) {
        // The parent's own error page is not the origin's answer: say who refused.
        proxy.metrics.upstream_request(parent.label(), false);
        drop(conn);
        return Err(ProxyError::UpstreamRefused {
            parent: parent.label().to_string(),
            status: status.as_u16(),
        });
    }
    proxy.metrics.upstream_request(parent.label(), true);
    let (mut parts, body) = response.into_parts();
    rewrite_response(&mut parts.headers, snap.via.as_ref());
    parts.version = Version::HTTP_11;
    Ok(Response::from_parts(
        parts,
        ClientBody::upstream(body, conn),
    ))
}

/// An idle pooled connection to `parent`, or a new one (TCP, or TLS for an https parent).
async fn checkout_or_dial_parent(
    proxy: &Arc<Proxy>,
    snap: &Snapshot,
    parent: &Parent,
    allow_pooled: bool,
) -> Result<PooledSender, ParentFailure> {
    let key = PoolKey::Parent(parent.pool_key.clone());
    if allow_pooled && let Some(conn) = proxy.pool.checkout(&key) {
        return Ok(conn);
    }
    let (stream, addr) = parent
        .dial(&snap.resolver, snap.config.timeouts.connect, &proxy.metrics)
        .await?;
    let (sender, connection) = hyper::client::conn::http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| ParentFailure::Connect {
            addr: addr.to_string(),
            reason: e.to_string(),
        })?;
    let label = parent.label().clone();
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(parent = %label, error = %e, "parent connection ended with an error");
        }
    });
    Ok(proxy.pool.fresh(key, addr, sender))
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

fn addr_of(conn: &PooledSender) -> SocketAddr {
    conn.peer
}

/// An idle pooled connection to one of the vetted addresses, or a new one.
async fn checkout_or_dial(
    proxy: &Arc<Proxy>,
    snap: &Snapshot,
    vetted: &Vetted,
    allow_pooled: bool,
) -> Result<PooledSender, ProxyError> {
    if allow_pooled {
        for addr in &vetted.addrs {
            if let Some(conn) = proxy.pool.checkout(&PoolKey::Origin(*addr)) {
                return Ok(conn);
            }
        }
    }
    // Dialling and the handshake are the large, rarer part (kept-alive connections are
    // reused): boxed so that they do not grow every request's future.
    Box::pin(dial_origin(proxy, snap, vetted)).await
}

async fn dial_origin(
    proxy: &Arc<Proxy>,
    snap: &Snapshot,
    vetted: &Vetted,
) -> Result<PooledSender, ProxyError> {
    let (stream, addr) =
        connect::dial(vetted, snap.config.timeouts.connect, &proxy.metrics).await?;
    let (sender, connection) = hyper::client::conn::http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| ProxyError::ConnectFailed {
            addr,
            reason: e.to_string(),
        })?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(%addr, error = %e, "origin connection ended with an error");
        }
    });
    Ok(proxy.pool.fresh(PoolKey::Origin(addr), addr, sender))
}

fn upstream_error(addr: SocketAddr, e: &hyper::Error, timeout: std::time::Duration) -> ProxyError {
    if e.is_timeout() {
        ProxyError::ResponseTimeout { addr, timeout }
    } else if e.is_incomplete_message() || e.is_canceled() || e.is_closed() {
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
