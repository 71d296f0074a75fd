//! Stage 8 for CONNECT: dial the vetted address, answer 200, then relay bytes both ways.
//!
//! ```text
//! client -> kalmar:  CONNECT example.com:443 HTTP/1.1
//! kalmar -> origin:  (TCP connect to the vetted address)
//! kalmar -> client:  HTTP/1.1 200 OK
//! ...then opaque bytes (TLS) in both directions until both sides are done...
//! ```
//! This module opens the tunnel and spawns its task; moving the bytes is `super::relay`.
//! The client's `TcpStream` is taken back out of hyper's upgraded connection so that
//! hyper's read buffer is freed: together with the relay, which holds no buffer while a
//! tunnel is idle, that keeps an idle tunnel to a few KiB.
//!
//! Through a parent proxy the far end is the parent, after its answer to our own CONNECT
//! (see `connect::upstream`); bytes the parent sent after its answer head are relayed to
//! the client first. A plain-TCP parent takes the same zero-idle-buffer relay as an origin;
//! a TLS parent takes a generic relay over the TLS stream (it holds a buffer per direction).

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::Proxy;
use super::body::ClientBody;
use super::ctx::{RequestCtx, route_direct};
use super::relay::{TunnelEnd, relay, relay_io};
use super::target::Target;
use crate::connect;
use crate::connect::upstream::{HandshakeError, ParentSet, ParentStream, connect_handshake};
use crate::error::ProxyError;
use crate::limit::TunnelPermit;
use crate::server::ClientIo;
use crate::state::Snapshot;

/// The far end of a tunnel and the bytes already read from it (a parent's early data).
enum Far {
    Tcp(TcpStream, Bytes),
    Stream(ParentStream, Bytes),
}

pub async fn open(
    proxy: &Arc<Proxy>,
    snap: &Arc<Snapshot>,
    ctx: &mut RequestCtx,
    target: &Target,
    check: impl FnMut(IpAddr) -> Result<(), ProxyError>,
    req: Request<Incoming>,
    permit: TunnelPermit,
) -> Result<Response<ClientBody>, ProxyError> {
    let vetted = connect::resolve_vetted(
        &snap.resolver,
        &proxy.metrics,
        &target.host,
        target.port,
        check,
    )
    .await?;
    let (origin, addr) =
        connect::dial(&vetted, snap.config.timeouts.connect, &proxy.metrics).await?;
    ctx.resolved = Some(addr);
    ctx.route = route_direct();
    Ok(spawn_tunnel(
        proxy,
        snap,
        ctx,
        req,
        permit,
        Far::Tcp(origin, Bytes::new()),
    ))
}

/// CONNECT through one of `parents`: dial it, send our own CONNECT with the hostname and
/// the parent's credentials, and splice once it answers 2xx. A parent that cannot be
/// reached (or closes before answering) is marked down and the next one tried: the client
/// has sent nothing yet. A refusal (407, 403, 5xx, ...) is final: 502 upstream-refused.
pub async fn open_via_parent(
    proxy: &Arc<Proxy>,
    snap: &Arc<Snapshot>,
    ctx: &mut RequestCtx,
    target: &Target,
    parents: &ParentSet,
    req: Request<Incoming>,
    permit: TunnelPermit,
) -> Result<Response<ClientBody>, ProxyError> {
    let timeouts = &snap.config.timeouts;
    let mut attempts = parents.attempts()?;
    let far = loop {
        let Some(parent) = attempts.next_parent() else {
            return Err(attempts.exhausted());
        };
        ctx.route = parent.label().clone();
        let dialled = parent
            .dial(&snap.resolver, timeouts.connect, &proxy.metrics)
            .await;
        let (stream, addr) = match dialled {
            Ok(dialled) => dialled,
            Err(failure) => {
                proxy.metrics.upstream_request(parent.label(), false);
                attempts.failed(parent, failure);
                continue;
            }
        };
        ctx.resolved = Some(addr);
        let answer = connect_handshake(
            stream,
            &target.authority,
            parent.auth(),
            timeouts.upstream_response_header,
        )
        .await;
        let refused = |e| {
            proxy.metrics.upstream_request(parent.label(), false);
            e
        };
        match answer {
            Ok((ParentStream::Plain(tcp), early)) => break Far::Tcp(tcp, early),
            Ok((stream, early)) => break Far::Stream(stream, early),
            Err(HandshakeError::Failure(failure)) => {
                proxy.metrics.upstream_request(parent.label(), false);
                attempts.failed(parent, failure);
            }
            Err(HandshakeError::Refused(status)) => {
                return Err(refused(ProxyError::UpstreamRefused {
                    parent: parent.label().to_string(),
                    status,
                }));
            }
            Err(HandshakeError::Timeout) => {
                return Err(refused(ProxyError::UpstreamTimeout {
                    parent: parent.label().to_string(),
                    timeout: timeouts.upstream_response_header,
                }));
            }
            Err(HandshakeError::Bad(reason)) => {
                return Err(refused(ProxyError::BadResponse { addr, reason }));
            }
        }
    };
    proxy.metrics.upstream_request(&ctx.route, true);
    Ok(spawn_tunnel(proxy, snap, ctx, req, permit, far))
}

/// Answer 200 and relay in a task of its own, which logs the tunnel when it closes.
fn spawn_tunnel(
    proxy: &Arc<Proxy>,
    snap: &Arc<Snapshot>,
    ctx: &mut RequestCtx,
    req: Request<Incoming>,
    permit: TunnelPermit,
    far: Far,
) -> Response<ClientBody> {
    ctx.status = 200;

    // The tunnel writes its own log line when it closes.
    let mut tunnel_ctx = RequestCtx::detached_from(ctx);
    let idle = snap.config.timeouts.tunnel_idle;
    let proxy = proxy.clone();
    let tracker = proxy.tracker.clone();
    let guard = tracker.tunnel_started();
    tokio::spawn(async move {
        let _guard = guard;
        let _permit = permit;
        let metrics_guard = proxy.metrics.tunnel_opened();
        let started = Instant::now();
        let (up, down, end) = match hyper::upgrade::on(req).await {
            Ok(upgraded) => match take_client_stream(upgraded) {
                Ok((client, buffered)) => match far {
                    Far::Tcp(origin, early) => {
                        relay(client, origin, buffered, early, idle, &proxy.tracker).await
                    }
                    Far::Stream(origin, early) => {
                        relay_io(client, origin, buffered, early, idle, &proxy.tracker).await
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, "CONNECT upgrade returned an unexpected stream type");
                    (0, 0, TunnelEnd::Error)
                }
            },
            Err(e) => {
                tracing::debug!(error = %e, "client went away before the tunnel started");
                (0, 0, TunnelEnd::Error)
            }
        };
        drop(metrics_guard);
        proxy.metrics.tunnel_finished(started.elapsed(), up, down);
        if let Some(kind) = end.as_error() {
            tunnel_ctx.note_error(kind);
        }
        tunnel_ctx.bytes_from_client.store(up, Ordering::Relaxed);
        tunnel_ctx.finish_async(&proxy.log, down).await;
    });
    Response::new(ClientBody::empty())
}

/// The client's socket and whatever hyper had already read past the CONNECT head
/// (a pipelined TLS ClientHello, say).
fn take_client_stream(
    upgraded: hyper::upgrade::Upgraded,
) -> Result<(TcpStream, Bytes), &'static str> {
    let parts = upgraded
        .downcast::<TokioIo<ClientIo>>()
        .map_err(|_| "not a ClientIo")?;
    let (prefix, stream) = parts.io.into_inner().into_parts();
    let buffered = match prefix {
        Some(prefix) if !parts.read_buf.is_empty() => {
            let mut all = Vec::with_capacity(parts.read_buf.len() + prefix.len());
            all.extend_from_slice(&parts.read_buf);
            all.extend_from_slice(&prefix);
            Bytes::from(all)
        }
        Some(prefix) => prefix,
        None => parts.read_buf,
    };
    // `read_buf` is a view into hyper's whole read buffer (8 KiB+): keep only the bytes,
    // so that an idle tunnel does not hold hyper's buffer for its lifetime.
    let buffered = if buffered.is_empty() {
        Bytes::new()
    } else {
        Bytes::copy_from_slice(&buffered)
    };
    Ok((stream, buffered))
}
