//! Stage 7, the one connect step: route + destination in, an open connection out.
//!
//! Direct: resolve the destination, vet EVERY address against the destination guard, and
//! dial only a vetted address; nothing is resolved a second time between the check and the
//! dial (so DNS rebinding cannot slip an internal address in). Through parents: vet the
//! name's local addresses, then try the parents in order (a parent that cannot be reached is
//! marked down and the next one tried; a refusal is final), with the upstream metrics kept
//! here. Plain HTTP gets a pooled HTTP/1.1 sender, CONNECT a byte stream.

pub mod body;
pub mod pool;
pub mod replay;
pub mod resolver;
pub mod upstream;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper_util::rt::TokioIo;
use smallvec::SmallVec;
use tokio::net::TcpStream;

use crate::access_log::Hop;
use crate::acl::{AddressDenied, Host};
use crate::error::{ErrorKind, ProxyError};
use crate::metrics::{Metrics, UpstreamRetry};
use pool::{Pool, PoolKey, PooledSender, Reuse};
use resolver::{ResolveError, Resolver};
use upstream::{Attempts, HandshakeError, Parent, ParentFailure, ParentSet, ParentStream, Route};

/// Everything the connect step needs, borrowed from the process and the snapshot.
pub struct Connector<'a> {
    pub resolver: &'a Resolver,
    pub metrics: &'a Metrics,
    pub pool: &'a Arc<Pool>,
    /// `timeouts.connect`: TCP connect (and TLS to a parent), all addresses together.
    pub connect_timeout: Duration,
    /// `timeouts.upstream_response_header`: a parent's answer to our CONNECT.
    pub answer_timeout: Duration,
    /// `upstream.check_resolved_destinations`.
    pub check_resolved: bool,
}

/// What to connect to: the destination as the client named it.
pub struct Dest<'a> {
    pub host: &'a Host,
    pub port: u16,
    /// `host:port` as sent to a parent in its CONNECT.
    pub authority: &'a str,
}

/// The destination guard for one request: `Err` (403 internal-destination) for an address
/// this client may not reach.
pub type Guard<'a> = &'a (dyn Fn(IpAddr) -> Result<(), AddressDenied> + Sync);

/// How far the connect step got, filled in as it goes so that a failure is logged as
/// truthfully as a success: the hop tried last and the address it dialled.
#[derive(Debug, Default)]
pub struct Path {
    pub hop: Hop,
    pub peer: Option<SocketAddr>,
}

/// An HTTP/1.1 connection for one exchange, and what it leads to.
pub struct HttpConn<'a> {
    pub sender: PooledSender,
    via: HttpVia<'a>,
}

enum HttpVia<'a> {
    Origin(Vetted),
    Parent {
        parent: &'a Arc<Parent>,
        attempts: Attempts<'a>,
    },
}

/// The far end of a tunnel, and the bytes already read from it (a parent's early data).
pub enum TunnelStream {
    Tcp(TcpStream, Bytes),
    /// TLS to a parent proxy.
    Parent(ParentStream, Bytes),
}

/// What one parent attempt is to open.
enum Want<'d> {
    Http { reuse: Reuse },
    Tunnel { authority: &'d str },
}

/// What a parent attempt opened.
enum Opened {
    Http(PooledSender),
    Tunnel(TunnelStream),
}

/// One parent attempt's failure: try the next parent, or stop here.
enum Attempt {
    Next(ParentFailure),
    Final(ProxyError),
}

/// Addresses that passed the destination guard, in the resolver's order.
#[derive(Debug)]
pub struct Vetted {
    /// Inline for the usual one or two addresses: no allocation per request.
    pub addrs: SmallVec<[SocketAddr; 2]>,
}

// === impl Connector ===

impl Connector<'_> {
    /// A sender for one plain-HTTP exchange along `route`: a pooled one when there is one
    /// that `reuse` allows.
    pub async fn http<'r>(
        &self,
        route: &Route<'r>,
        dst: &Dest<'_>,
        guard: Guard<'_>,
        reuse: Reuse,
        path: &mut Path,
    ) -> Result<HttpConn<'r>, ProxyError> {
        match route {
            Route::Direct(_) => {
                let vetted = resolve_vetted(self.resolver, self.metrics, dst, guard).await?;
                path.hop = Hop::Direct;
                let sender = self.origin_sender(&vetted, reuse, path).await?;
                Ok(HttpConn {
                    sender,
                    via: HttpVia::Origin(vetted),
                })
            }
            Route::Parents(parents) => {
                let mut attempts = self.parent_attempts(parents, dst, guard).await?;
                let (sender, parent) = self.next_parent_sender(&mut attempts, reuse, path).await?;
                Ok(HttpConn {
                    sender,
                    via: HttpVia::Parent { parent, attempts },
                })
            }
        }
    }

    /// A fresh connection in place of a pooled one that the peer had closed (`why`: before
    /// the request went out, or before its answer came): the same origin, or the same
    /// parent and then the next ones.
    pub async fn reopen(
        &self,
        conn: &mut HttpConn<'_>,
        why: UpstreamRetry,
        path: &mut Path,
    ) -> Result<(), ProxyError> {
        self.metrics.upstream_retry(why);
        match &mut conn.via {
            HttpVia::Origin(vetted) => {
                conn.sender = self.origin_sender(vetted, Reuse::Fresh, path).await?;
            }
            HttpVia::Parent { parent, attempts } => {
                let fresh = match self.parent_sender(parent, Reuse::Fresh, path).await {
                    Ok(sender) => (sender, *parent),
                    Err(failure) => {
                        self.parent_failed(attempts, parent, failure);
                        self.next_parent_sender(attempts, Reuse::Fresh, path)
                            .await?
                    }
                };
                (conn.sender, *parent) = fresh;
            }
        }
        Ok(())
    }

    /// Record how an HTTP exchange through a parent ended (a no-op for an origin).
    pub fn finished(&self, conn: &HttpConn<'_>, ok: bool) {
        if let Some(parent) = conn.parent() {
            self.metrics.upstream_request(parent.label(), ok);
        }
    }

    /// A byte stream to the destination for a CONNECT tunnel: a TCP connection to a vetted
    /// address, or a parent after it accepted our own CONNECT.
    pub async fn tunnel(
        &self,
        route: &Route<'_>,
        dst: &Dest<'_>,
        guard: Guard<'_>,
        path: &mut Path,
    ) -> Result<TunnelStream, ProxyError> {
        let parents = match route {
            Route::Direct(_) => {
                let vetted = resolve_vetted(self.resolver, self.metrics, dst, guard).await?;
                path.hop = Hop::Direct;
                let (stream, addr) = dial(&vetted, self.connect_timeout, self.metrics).await?;
                path.peer = Some(addr);
                return Ok(TunnelStream::Tcp(stream, Bytes::new()));
            }
            Route::Parents(parents) => parents,
        };
        let mut attempts = self.parent_attempts(parents, dst, guard).await?;
        let want = Want::Tunnel {
            authority: dst.authority,
        };
        let (opened, parent) = self.through_parents(&mut attempts, &want, path).await?;
        let Opened::Tunnel(stream) = opened else {
            return Err(ProxyError::Internal(
                "a parent attempt opened the wrong kind of connection",
            ));
        };
        self.metrics.upstream_request(parent.label(), true);
        Ok(stream)
    }

    /// The parents to try for `dst`, once the destination's local addresses passed the guard.
    async fn parent_attempts<'p>(
        &self,
        parents: &'p ParentSet,
        dst: &Dest<'_>,
        guard: Guard<'_>,
    ) -> Result<Attempts<'p>, ProxyError> {
        vet_for_parent(
            self.resolver,
            self.metrics,
            dst.host,
            self.check_resolved,
            guard,
        )
        .await?;
        parents.attempts()
    }

    async fn next_parent_sender<'p>(
        &self,
        attempts: &mut Attempts<'p>,
        reuse: Reuse,
        path: &mut Path,
    ) -> Result<(PooledSender, &'p Arc<Parent>), ProxyError> {
        let want = Want::Http { reuse };
        match self.through_parents(attempts, &want, path).await? {
            (Opened::Http(sender), parent) => Ok((sender, parent)),
            _ => Err(ProxyError::Internal(
                "a parent attempt opened the wrong kind of connection",
            )),
        }
    }

    /// The one parent loop: try each parent that is up, in order. A parent that could not
    /// be used is marked down and the next one tried; a final failure ends the loop.
    /// Failures are counted here; successes by the caller, which knows when the exchange
    /// really succeeded.
    async fn through_parents<'p>(
        &self,
        attempts: &mut Attempts<'p>,
        want: &Want<'_>,
        path: &mut Path,
    ) -> Result<(Opened, &'p Arc<Parent>), ProxyError> {
        while let Some(parent) = attempts.next_parent() {
            path.hop = Hop::Parent(parent.label().clone());
            let attempt = match want {
                Want::Http { reuse } => self
                    .parent_sender(parent, *reuse, path)
                    .await
                    .map(Opened::Http)
                    .map_err(Attempt::Next),
                Want::Tunnel { authority } => self
                    .parent_tunnel(parent, authority, path)
                    .await
                    .map(Opened::Tunnel),
            };
            match attempt {
                Ok(opened) => return Ok((opened, parent)),
                Err(Attempt::Next(failure)) => self.parent_failed(attempts, parent, failure),
                Err(Attempt::Final(error)) => {
                    self.metrics.upstream_request(parent.label(), false);
                    return Err(error);
                }
            }
        }
        Err(attempts.exhausted())
    }

    /// Dial `parent` and ask it for a tunnel to `authority` with our own CONNECT.
    async fn parent_tunnel(
        &self,
        parent: &Parent,
        authority: &str,
        path: &mut Path,
    ) -> Result<TunnelStream, Attempt> {
        let (stream, addr) = parent
            .dial(self.resolver, self.connect_timeout, self.metrics)
            .await
            .map_err(Attempt::Next)?;
        path.peer = Some(addr);
        let answer =
            upstream::connect_handshake(stream, authority, parent.auth(), self.answer_timeout)
                .await;
        let label = || parent.label().to_string();
        match answer {
            Ok((ParentStream::Plain(tcp), early)) => Ok(TunnelStream::Tcp(tcp, early)),
            Ok((stream, early)) => Ok(TunnelStream::Parent(stream, early)),
            Err(HandshakeError::Failure(failure)) => Err(Attempt::Next(failure)),
            Err(HandshakeError::Refused(status)) => {
                Err(Attempt::Final(ProxyError::UpstreamRefused {
                    parent: label(),
                    status,
                }))
            }
            Err(HandshakeError::Timeout) => Err(Attempt::Final(ProxyError::UpstreamTimeout {
                parent: label(),
                timeout: self.answer_timeout,
            })),
            Err(HandshakeError::Bad(reason)) => {
                Err(Attempt::Final(ProxyError::BadResponse { addr, reason }))
            }
        }
    }

    fn parent_failed(&self, attempts: &mut Attempts<'_>, parent: &Parent, failure: ParentFailure) {
        self.metrics.upstream_request(parent.label(), false);
        attempts.failed(parent, failure);
    }

    /// An idle pooled connection to one of the vetted addresses, or a new one.
    async fn origin_sender(
        &self,
        vetted: &Vetted,
        reuse: Reuse,
        path: &mut Path,
    ) -> Result<PooledSender, ProxyError> {
        if reuse != Reuse::Fresh {
            for addr in &vetted.addrs {
                if let Some(conn) = self.pool.checkout(&PoolKey::Origin(*addr), reuse) {
                    path.peer = Some(conn.peer);
                    return Ok(conn);
                }
            }
        }
        // Dialling and the handshake are the large, rarer part (kept-alive connections are
        // reused): boxed so that they do not grow every request's future.
        let (stream, addr) = Box::pin(dial(vetted, self.connect_timeout, self.metrics)).await?;
        path.peer = Some(addr);
        let sender = Box::pin(handshake(stream, addr.to_string()))
            .await
            .map_err(|reason| ProxyError::ConnectFailed { addr, reason })?;
        Ok(self.pool.fresh(PoolKey::Origin(addr), addr, sender))
    }

    /// An idle pooled connection to `parent`, or a new one (TCP, or TLS for an https parent).
    async fn parent_sender(
        &self,
        parent: &Parent,
        reuse: Reuse,
        path: &mut Path,
    ) -> Result<PooledSender, ParentFailure> {
        let key = PoolKey::Parent(parent.pool_key.clone());
        if let Some(conn) = self.pool.checkout(&key, reuse) {
            path.peer = Some(conn.peer);
            return Ok(conn);
        }
        let (stream, addr) =
            Box::pin(parent.dial(self.resolver, self.connect_timeout, self.metrics)).await?;
        path.peer = Some(addr);
        let sender = Box::pin(handshake(stream, parent.label().to_string()))
            .await
            .map_err(|reason| ParentFailure::Connect {
                addr: addr.to_string(),
                reason,
            })?;
        Ok(self.pool.fresh(key, addr, sender))
    }
}

// === impl HttpConn ===

impl HttpConn<'_> {
    /// The parent this exchange goes through, if any.
    pub fn parent(&self) -> Option<&Arc<Parent>> {
        match &self.via {
            HttpVia::Origin(_) => None,
            HttpVia::Parent { parent, .. } => Some(parent),
        }
    }
}

/// The HTTP/1.1 client handshake on a new connection; its driver runs in a task of its own.
async fn handshake<S>(
    stream: S,
    peer: String,
) -> Result<hyper::client::conn::http1::SendRequest<body::UpstreamBody>, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(%peer, error = %e, "upstream connection ended with an error");
        }
    });
    Ok(sender)
}

/// Resolve the destination and keep the addresses the guard accepts. If DNS fails: 502
/// dns-failure; if every address is denied: 403 internal-destination naming each of them.
pub async fn resolve_vetted(
    resolver: &Resolver,
    metrics: &Metrics,
    dst: &Dest<'_>,
    guard: Guard<'_>,
) -> Result<Vetted, ProxyError> {
    if let Host::Ip(ip) = dst.host {
        guard(*ip).map_err(|denied| internal_destination(&[denied]))?;
        return Ok(Vetted {
            addrs: smallvec::smallvec![SocketAddr::new(*ip, dst.port)],
        });
    }
    let ips = match resolver.resolve(dst.host).await {
        Ok(ips) => {
            metrics.dns_lookup(true);
            ips
        }
        Err(e) => {
            metrics.dns_lookup(false);
            return Err(dns_error(dst.host, e));
        }
    };
    let mut denials = SmallVec::<[AddressDenied; 2]>::new();
    let mut addrs = SmallVec::with_capacity(ips.len());
    for ip in ips {
        match guard(ip) {
            Ok(()) => addrs.push(SocketAddr::new(ip, dst.port)),
            Err(denied) => denials.push(denied),
        }
    }
    match (addrs.is_empty(), denials.is_empty()) {
        (true, false) => Err(internal_destination(&denials)),
        (true, true) => Err(dns_error(dst.host, ResolveError::NoAddresses)),
        _ => Ok(Vetted { addrs }),
    }
}

/// 403 internal-destination for every denied address of a destination (both of
/// `localhost`'s, say), so the answer does not hide one.
fn internal_destination(denials: &[AddressDenied]) -> ProxyError {
    let message = match denials {
        [one] => one.to_string(),
        many => {
            let list: Vec<String> = many
                .iter()
                .map(|d| format!("{} (in {})", d.addr, d.range))
                .collect();
            format!(
                "every address is in an internal range: {}; this proxy does not connect to \
                 internal ranges; in-cluster destinations belong in the client's NO_PROXY",
                list.join(", ")
            )
        }
    };
    ProxyError::Denied {
        kind: ErrorKind::InternalDestination,
        message,
    }
}

/// For a parent route the parent dials, so there is no address to pin; but every address
/// the name has *locally* must pass the guard (one denied address denies: the parent may
/// pick any of them), so that chaining cannot reach an internal host. With `resolve` off
/// only literal IPs are checked. A name that does not resolve here is left to the parent,
/// whose own DNS may know it.
async fn vet_for_parent(
    resolver: &Resolver,
    metrics: &Metrics,
    host: &Host,
    resolve: bool,
    guard: Guard<'_>,
) -> Result<(), ProxyError> {
    let check = |ip| guard(ip).map_err(|denied| internal_destination(&[denied]));
    match host {
        Host::Ip(ip) => check(*ip),
        Host::Name(_) if !resolve => Ok(()),
        // Boxed: only parent routes take it, so it should not size every request's future.
        Host::Name(_) => match Box::pin(resolver.resolve(host)).await {
            Ok(ips) => {
                metrics.dns_lookup(true);
                ips.into_iter().try_for_each(check)
            }
            Err(_) => {
                metrics.dns_lookup(false);
                Ok(())
            }
        },
    }
}

fn dns_error(host: &Host, e: ResolveError) -> ProxyError {
    let host = match host {
        Host::Name(n) => n.clone(),
        Host::Ip(ip) => ip.to_string(),
    };
    ProxyError::Dns {
        host,
        reason: e.to_string(),
    }
}

/// Why no address of a list could be dialled.
#[derive(Debug)]
pub enum DialError {
    Failed { addr: SocketAddr, reason: String },
    Timeout { addr: SocketAddr },
    NoAddress,
}

/// Dial the vetted addresses in order until one answers, within `timeout` in total.
async fn dial(
    vetted: &Vetted,
    timeout: Duration,
    metrics: &Metrics,
) -> Result<(TcpStream, SocketAddr), ProxyError> {
    dial_first(vetted.addrs.iter().copied(), timeout, metrics)
        .await
        .map_err(|e| match e {
            DialError::Failed { addr, reason } => ProxyError::ConnectFailed { addr, reason },
            DialError::Timeout { addr } => ProxyError::ConnectTimeout { addr, timeout },
            // A `Vetted` is never empty: resolve_vetted returns an error instead.
            DialError::NoAddress => ProxyError::Internal("no vetted address to dial"),
        })
}

/// The one TCP dial loop (origins and parents): each address in turn until one answers,
/// all within `timeout`; every attempt is timed in the connect histogram.
pub async fn dial_first(
    addrs: impl IntoIterator<Item = SocketAddr>,
    timeout: Duration,
    metrics: &Metrics,
) -> Result<(TcpStream, SocketAddr), DialError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last_err = DialError::NoAddress;
    for addr in addrs {
        let started = Instant::now();
        match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                metrics.dial(started.elapsed(), true);
                // Small writes (request heads, TLS records) must not wait for Nagle.
                let _ = stream.set_nodelay(true);
                return Ok((stream, addr));
            }
            Ok(Err(e)) => {
                metrics.dial(started.elapsed(), false);
                last_err = DialError::Failed {
                    addr,
                    reason: e.to_string(),
                };
            }
            Err(_) => {
                metrics.dial(started.elapsed(), false);
                return Err(DialError::Timeout { addr });
            }
        }
    }
    Err(last_err)
}
