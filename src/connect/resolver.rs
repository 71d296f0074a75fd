//! DNS: hickory's async resolver with its TTL-respecting cache, plus static `dns.hosts`.
//!
//! By default it reads `/etc/resolv.conf` (name servers, search domains, ndots — as a pod
//! sees them) and `/etc/hosts`; `dns.nameservers` replaces the name servers (tests point it
//! at a DNS server of their own on loopback).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use serde::{Deserialize, Serialize};

use crate::acl::Host;

/// `[dns]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    /// Replaces the name servers of `/etc/resolv.conf` when not empty.
    pub nameservers: Vec<Nameserver>,
    pub use_hosts_file: bool,
    pub hosts: BTreeMap<String, Vec<IpAddr>>,
    pub cache_size: u64,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

/// A name server as configured: `"10.96.0.10"`, `"10.96.0.10:53"`, `"[::1]:5353"`
/// (port 53 by default).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Nameserver(pub SocketAddr);

/// An entry of `dns.nameservers` that is not an address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?}: not an IP address or IP:PORT")]
pub struct NameserverError(String);

/// The resolver could not be built from `[dns]`; [`DnsConfigError::key`] names the key.
#[derive(Debug, thiserror::Error)]
pub enum DnsConfigError {
    #[error("empty, and /etc/resolv.conf is unusable: {0}")]
    NoSystemConfig(String),
    #[error("{0}")]
    Build(String),
}

pub struct Resolver {
    inner: TokioResolver,
    static_hosts: HashMap<String, Vec<IpAddr>>,
    timeout: Duration,
}

/// Why a name did not resolve; the message goes to the client and the log.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("no such host (NXDOMAIN)")]
    NoSuchHost,
    #[error("no addresses")]
    NoAddresses,
    #[error("lookup timed out after {}ms", .0.as_millis())]
    Timeout(Duration),
    #[error("{0}")]
    Other(String),
}

// === impl Nameserver ===

impl TryFrom<String> for Nameserver {
    type Error = NameserverError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(Nameserver(addr));
        }
        s.parse::<IpAddr>()
            .map(|ip| Nameserver(SocketAddr::new(ip, 53)))
            .map_err(|_| NameserverError(s))
    }
}

impl From<Nameserver> for String {
    fn from(ns: Nameserver) -> String {
        ns.0.to_string()
    }
}

// === impl DnsConfigError ===

impl DnsConfigError {
    /// The config key at fault.
    pub fn key(&self) -> &'static str {
        match self {
            DnsConfigError::NoSystemConfig(_) => "dns.nameservers",
            DnsConfigError::Build(_) => "dns",
        }
    }
}

// === impl Resolver ===

impl Resolver {
    pub fn new(cfg: &DnsConfig) -> Result<Resolver, DnsConfigError> {
        let (system, mut opts) = match hickory_resolver::system_conf::read_system_conf() {
            Ok(pair) => pair,
            Err(e) => {
                if cfg.nameservers.is_empty() {
                    return Err(DnsConfigError::NoSystemConfig(e.to_string()));
                }
                (ResolverConfig::default(), ResolverOpts::default())
            }
        };
        let config = if cfg.nameservers.is_empty() {
            system
        } else {
            let mut servers = Vec::new();
            for &Nameserver(addr) in &cfg.nameservers {
                let mut server = NameServerConfig::udp_and_tcp(addr.ip());
                for conn in &mut server.connections {
                    conn.port = addr.port();
                }
                servers.push(server);
            }
            // Explicit servers: no search list either, so a name means exactly that name.
            ResolverConfig::from_name_servers(servers)
        };
        opts.cache_size = cfg.cache_size;
        opts.timeout = cfg.timeout;
        opts.use_hosts_file = if cfg.use_hosts_file {
            ResolveHosts::Always
        } else {
            ResolveHosts::Never
        };
        let inner = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
            .with_options(opts)
            .build()
            .map_err(|e| DnsConfigError::Build(e.to_string()))?;
        let static_hosts = cfg
            .hosts
            .iter()
            .map(|(name, ips)| (name.trim_end_matches('.').to_ascii_lowercase(), ips.clone()))
            .collect();
        Ok(Resolver {
            inner,
            static_hosts,
            timeout: cfg.timeout,
        })
    }

    /// Every address for `host`; a literal is its own answer.
    pub async fn resolve(&self, host: &Host) -> Result<Vec<IpAddr>, ResolveError> {
        let name = match host {
            Host::Ip(ip) => return Ok(vec![*ip]),
            Host::Name(name) => name,
        };
        if let Some(ips) = self.static_hosts.get(name.as_str()) {
            return Ok(ips.clone());
        }
        // A fully qualified query unless the name is a single label, so that the
        // search list applies exactly as resolv.conf's ndots says.
        let lookup = tokio::time::timeout(self.timeout, self.inner.lookup_ip(name.as_str()))
            .await
            .map_err(|_| ResolveError::Timeout(self.timeout))?;
        match lookup {
            Ok(answer) => {
                let ips: Vec<IpAddr> = answer.iter().collect();
                if ips.is_empty() {
                    Err(ResolveError::NoAddresses)
                } else {
                    Ok(ips)
                }
            }
            Err(e) if e.is_nx_domain() => Err(ResolveError::NoSuchHost),
            Err(e) if e.is_no_records_found() => Err(ResolveError::NoAddresses),
            Err(e) => Err(ResolveError::Other(e.to_string())),
        }
    }
}
