//! DNS: hickory's async resolver with its TTL-respecting cache, plus static `dns.hosts`.
//!
//! By default it reads `/etc/resolv.conf` (name servers, search domains, ndots — as a pod
//! sees them) and `/etc/hosts`; `dns.nameservers` replaces the name servers (tests point it
//! at a DNS server of their own on loopback).

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;

use crate::acl::Host;
use crate::config::{ConfigError, DnsConfig, parse_nameserver};

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

// === impl Resolver ===

impl Resolver {
    pub fn new(cfg: &DnsConfig) -> Result<Resolver, ConfigError> {
        let (system, mut opts) = match hickory_resolver::system_conf::read_system_conf() {
            Ok(pair) => pair,
            Err(e) => {
                if cfg.nameservers.is_empty() {
                    return Err(ConfigError::Invalid {
                        key: "dns.nameservers".into(),
                        message: format!("empty, and /etc/resolv.conf is unusable: {e}"),
                    });
                }
                (ResolverConfig::default(), ResolverOpts::default())
            }
        };
        let config = if cfg.nameservers.is_empty() {
            system
        } else {
            let mut servers = Vec::new();
            for ns in &cfg.nameservers {
                let addr = parse_nameserver(ns).map_err(|message| ConfigError::Invalid {
                    key: "dns.nameservers".into(),
                    message,
                })?;
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
            .map_err(|e| ConfigError::Invalid {
                key: "dns".into(),
                message: e.to_string(),
            })?;
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
