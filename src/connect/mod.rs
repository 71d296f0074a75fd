//! Stage 7: resolve the destination, vet EVERY address, and dial only a vetted address.
//!
//! The resolved list is checked address by address against the destination guard; a
//! denied address is never dialled, and nothing is resolved a second time between the
//! check and the dial (so DNS rebinding cannot slip an internal address in).

pub mod pool;
pub mod resolver;
pub mod upstream;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use smallvec::SmallVec;
use tokio::net::TcpStream;

use crate::error::ProxyError;
use crate::metrics::Metrics;
use resolver::{ResolveError, Resolver};

/// Addresses that passed the destination guard, in the resolver's order.
#[derive(Debug)]
pub struct Vetted {
    /// Inline for the usual one or two addresses: no allocation per request.
    pub addrs: SmallVec<[SocketAddr; 2]>,
}

/// Resolve `host` and keep the addresses `check` accepts. If DNS fails: 502 dns-failure;
/// if every address is denied: the first denial (403 internal-destination).
pub async fn resolve_vetted(
    resolver: &Resolver,
    metrics: &Metrics,
    host: &crate::acl::Host,
    port: u16,
    mut check: impl FnMut(IpAddr) -> Result<(), ProxyError>,
) -> Result<Vetted, ProxyError> {
    if let crate::acl::Host::Ip(ip) = host {
        check(*ip)?;
        return Ok(Vetted {
            addrs: smallvec::smallvec![SocketAddr::new(*ip, port)],
        });
    }
    let ips = match resolver.resolve(host).await {
        Ok(ips) => {
            metrics.dns_lookup(true);
            ips
        }
        Err(e) => {
            metrics.dns_lookup(false);
            return Err(dns_error(host, e));
        }
    };
    let mut first_denial = None;
    let mut addrs = SmallVec::with_capacity(ips.len());
    for ip in ips {
        match check(ip) {
            Ok(()) => addrs.push(SocketAddr::new(ip, port)),
            Err(e) => {
                first_denial.get_or_insert(e);
            }
        }
    }
    match (addrs.is_empty(), first_denial) {
        (true, Some(denial)) => Err(denial),
        (true, None) => Err(dns_error(host, ResolveError::NoAddresses)),
        _ => Ok(Vetted { addrs }),
    }
}

/// For a parent route the parent dials, so there is no address to pin; but every address
/// the name has *locally* must pass the guard (one denied address denies: the parent may
/// pick any of them), so that chaining cannot reach an internal host. With `resolve` off
/// only literal IPs are checked. A name that does not resolve here is left to the parent,
/// whose own DNS may know it.
pub async fn vet_for_parent(
    resolver: &Resolver,
    metrics: &Metrics,
    host: &crate::acl::Host,
    resolve: bool,
    mut check: impl FnMut(IpAddr) -> Result<(), ProxyError>,
) -> Result<(), ProxyError> {
    match host {
        crate::acl::Host::Ip(ip) => check(*ip),
        crate::acl::Host::Name(_) if !resolve => Ok(()),
        crate::acl::Host::Name(_) => match resolver.resolve(host).await {
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

fn dns_error(host: &crate::acl::Host, e: ResolveError) -> ProxyError {
    let host = match host {
        crate::acl::Host::Name(n) => n.clone(),
        crate::acl::Host::Ip(ip) => ip.to_string(),
    };
    ProxyError::Dns {
        host,
        reason: e.to_string(),
    }
}

/// Dial the vetted addresses in order until one answers, within `timeout` in total.
pub async fn dial(
    vetted: &Vetted,
    timeout: Duration,
    metrics: &Metrics,
) -> Result<(TcpStream, SocketAddr), ProxyError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last_err = None;
    for &addr in &vetted.addrs {
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
                last_err = Some(ProxyError::ConnectFailed {
                    addr,
                    reason: e.to_string(),
                });
            }
            Err(_) => {
                metrics.dial(started.elapsed(), false);
                return Err(ProxyError::ConnectTimeout { addr, timeout });
            }
        }
    }
    Err(last_err.unwrap_or_else(|| ProxyError::Malformed("no address to dial".into())))
}
