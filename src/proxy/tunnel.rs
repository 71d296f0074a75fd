//! Stage 8 for CONNECT: dial the vetted address, answer 200, then relay bytes both ways.
//!
//! ```text
//! client -> kalmar:  CONNECT example.com:443 HTTP/1.1
//! kalmar -> origin:  (TCP connect to the vetted address)
//! kalmar -> client:  HTTP/1.1 200 OK
//! ...then opaque bytes (TLS) in both directions until both sides are done...
//! ```
//! This module opens the tunnel (the far end comes from the one connect step,
//! `connect::Connector::tunnel`) and spawns its task. On a `tls.ports` port the task first
//! checks the client's ClientHello (stage 8a, `super::tunnel_tls`), which may close the
//! tunnel; moving the bytes is `crate::relay`.
//! The client's `TcpStream` is taken back out of hyper's upgraded connection so that
//! hyper's read buffer is freed: together with the relay, which holds no buffer while a
//! tunnel is idle, that keeps an idle tunnel to a few KiB.
//!
//! Through a parent proxy the far end is the parent, after its answer to our own CONNECT
//! (see `connect::upstream`); bytes the parent sent after its answer head are relayed to
//! the client first. A plain-TCP parent takes the same zero-idle-buffer relay as an origin;
//! a TLS parent takes a generic relay over the TLS stream (it holds a buffer per direction).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::body::ClientBody;
use super::ctx::RequestCtx;
use super::tunnel_tls::{Inspected, Inspection};
use super::{Exchange, Proxy};
use crate::connect::{Path, TunnelStream};
use crate::error::ProxyError;
use crate::limit::TunnelPermit;
use crate::net::ClientIo;
use crate::relay::{RelaySettings, TunnelEnd, relay, relay_io};

// === impl Exchange ===

impl Exchange<'_> {
    /// Stages 7-8 for CONNECT: a tunnel slot for this client, the far end (an origin, or a
    /// parent that accepted our own CONNECT), then `200` and the relay in a task of its own.
    pub async fn tunnel(self, req: Request<Incoming>) -> Result<Response<ClientBody>, ProxyError> {
        let permit = self
            .snap
            .limits
            .acquire_tunnel(&self.identity, self.ctx.client_ip())?;
        let connector = self.connector();
        let dst = self.dest();
        let guard = |ip| self.snap.policy.check_address(&self.decision, ip);
        let mut path = Path::default();
        let opened = connector.tunnel(&self.route, &dst, &guard, &mut path).await;
        self.ctx.set_path(&path);
        let far = opened?;
        Ok(self.spawn_relay(req, permit, far))
    }

    /// Answer 200, then check the ClientHello (when the port is in `tls.ports`) and relay in
    /// a task of its own, which logs the tunnel when it closes.
    fn spawn_relay(
        self,
        req: Request<Incoming>,
        permit: TunnelPermit,
        far: TunnelStream,
    ) -> Response<ClientBody> {
        self.ctx.record.status = 200;
        let inspection = Inspection::new(
            self.snap,
            &self.identity,
            &self.decision,
            &self.target.host,
            self.target.port,
        );
        let mut tunnel_ctx = self.ctx.detach_tunnel();
        let idle = self.snap.config.timeouts.tunnel_idle;
        let relay_settings = self.snap.config.tunnel.settings();
        let proxy = Arc::clone(self.proxy);
        let guard = proxy.tracker.tunnel_started();
        tokio::spawn(async move {
            let _guard = guard;
            let _permit = permit;
            let metrics_guard = proxy.metrics.tunnel_opened();
            let started = Instant::now();
            let (up, down, end) = match hyper::upgrade::on(req).await {
                Ok(upgraded) => match take_client_stream(upgraded) {
                    Ok((client, buffered)) => {
                        let tunnel = Tunnel {
                            client,
                            buffered,
                            far,
                        };
                        tunnel
                            .inspect_and_relay(
                                inspection,
                                &mut tunnel_ctx,
                                &proxy,
                                (idle, relay_settings),
                            )
                            .await
                    }
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
}

/// An open tunnel after the `200`: the client's socket, the bytes hyper had read past the
/// CONNECT head, and the far end.
struct Tunnel {
    client: TcpStream,
    buffered: Bytes,
    far: TunnelStream,
}

// === impl Tunnel ===

impl Tunnel {
    /// Stage 8a, the ClientHello check (when this tunnel has one), then the relay. Returns
    /// the bytes up and down and how it ended.
    async fn inspect_and_relay(
        mut self,
        inspection: Option<Inspection>,
        ctx: &mut RequestCtx,
        proxy: &Proxy,
        (idle, settings): (Duration, RelaySettings),
    ) -> (u64, u64, TunnelEnd) {
        if let Some(inspection) = inspection {
            // A rule with `protocol = "any"` may serve a protocol whose server speaks
            // first: then the wait for the client ends as soon as the origin sends.
            let watch = inspection.any_protocol();
            let far = &self.far;
            let far_end_first = async move {
                match far {
                    TunnelStream::Tcp(_, early) | TunnelStream::Parent(_, early)
                        if watch && !early.is_empty() => {}
                    TunnelStream::Tcp(origin, _) if watch => {
                        let _ = origin.readable().await;
                    }
                    _ => std::future::pending().await,
                }
            };
            let buffered = std::mem::take(&mut self.buffered);
            let inspected = inspection
                .run(
                    &mut self.client,
                    buffered,
                    far_end_first,
                    ctx,
                    &proxy.metrics,
                )
                .await;
            match inspected {
                Inspected::Relay(bytes) => self.buffered = bytes,
                Inspected::Close { read } => return (read, 0, TunnelEnd::Closed),
            }
        }
        let Tunnel {
            client,
            buffered,
            far,
        } = self;
        let tracker = &proxy.tracker;
        match far {
            TunnelStream::Tcp(origin, early) => {
                relay(client, origin, (buffered, early), idle, settings, tracker).await
            }
            TunnelStream::Parent(origin, early) => {
                relay_io(client, origin, (buffered, early), idle, settings, tracker).await
            }
        }
    }
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
