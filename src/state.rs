//! The reloadable part of the proxy: one immutable snapshot of config and compiled policy,
//! swapped atomically. A request loads the snapshot once at its start and finishes under
//! it, whatever reloads happen meanwhile.

use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::HeaderValue;

use crate::acl::{AclConfig, Identity, Policy};
use crate::config::{Config, ConfigError};
use crate::connect::resolver::Resolver;
use crate::connect::upstream::Upstream;
use crate::kubernetes::Kubernetes;
use crate::limit::Limits;
use crate::tls::TlsPolicy;

pub struct Snapshot {
    pub config: Arc<Config>,
    pub policy: Policy,
    pub limits: Limits,
    pub resolver: Resolver,
    /// Parent proxies, their health, and the bypass list.
    pub upstream: Upstream,
    /// Pre-rendered `Via` value, or None when `proxy.via = false`.
    pub via: Option<HeaderValue>,
    /// `proxy.request_id_header`, parsed; None when off.
    pub request_id_header: Option<http::HeaderName>,
    /// `[tls]`, compiled: the ClientHello check of tunnels.
    pub tls: TlsPolicy,
}

/// Where the configuration comes from, so that a reload reads the same sources again.
#[derive(Debug, Clone, Default)]
pub struct ConfigSource {
    pub path: Option<PathBuf>,
}

/// The live snapshot, shared by every worker, and the live pod index beside it (which outlives
/// snapshots: a reload restarts its watchers only when `[kubernetes]` changed).
pub struct SharedState {
    current: ArcSwap<Snapshot>,
    pub source: ConfigSource,
    pub kubernetes: Arc<Kubernetes>,
}

// === impl Snapshot ===

impl Snapshot {
    pub fn build(config: Config) -> Result<Snapshot, ConfigError> {
        let policy = Policy::compile(&AclConfig {
            sources: &config.sources,
            rules: &config.rules,
            destinations: &config.destinations,
        })?;
        let limits = Limits::compile(&config.rate_limits)?;
        let tls = TlsPolicy::compile(&config.tls, &config.destinations.connect_ports)?;
        config
            .kubernetes
            .validate()
            .map_err(|e| ConfigError::Invalid {
                key: e.key,
                message: e.message,
            })?;
        let resolver = Resolver::new(&config.dns)?;
        let upstream = Upstream::compile(&config.upstream)?;
        let via = config
            .proxy
            .via
            .then(|| HeaderValue::from_str(&format!("1.1 {}", config.proxy.via_name)).ok())
            .flatten();
        let request_id_header = match config.proxy.request_id_header.as_str() {
            "" => None,
            name => Some(http::HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                ConfigError::invalid(
                    "proxy.request_id_header",
                    format!("{name:?} is not a valid header name"),
                )
            })?),
        };
        Ok(Snapshot {
            request_id_header,
            config: Arc::new(config),
            policy,
            limits,
            resolver,
            upstream,
            via,
            tls,
        })
    }

    /// Files whose change triggers a reload.
    pub fn watched_files(&self, source: &ConfigSource) -> Vec<PathBuf> {
        source
            .path
            .iter()
            .cloned()
            .chain(self.policy.watched_files().iter().cloned())
            .collect()
    }
}

// === impl SharedState ===

impl SharedState {
    /// Starts the Kubernetes watchers the snapshot's configuration asks for.
    pub fn new(
        snapshot: Snapshot,
        source: ConfigSource,
        kubernetes: Arc<Kubernetes>,
    ) -> Result<Arc<SharedState>, ConfigError> {
        kubernetes
            .configure(&snapshot.config.kubernetes)
            .map_err(|e| ConfigError::Invalid {
                key: e.key,
                message: e.message,
            })?;
        Ok(Arc::new(SharedState {
            current: ArcSwap::from_pointee(snapshot),
            source,
            kubernetes,
        }))
    }

    /// Stage 2, identify: live pod → static sources → node → unknown (see
    /// [`Kubernetes::identify`]).
    pub async fn identify(&self, snap: &Snapshot, client: std::net::IpAddr) -> Identity {
        self.kubernetes.identify(&snap.policy, client).await
    }

    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Read the sources again and swap in the result; on error the old snapshot stays.
    pub fn reload(&self) -> Result<Arc<Snapshot>, ConfigError> {
        let config = Config::load(self.source.path.as_deref())?;
        let mut snapshot = Snapshot::build(config)?;
        // Keep rate-limit state (open tunnels, unchanged quotas) across the swap, so a
        // reload is not a way to reset a client's budget.
        let previous = self.current.load();
        snapshot.limits = snapshot.limits.inherit(&previous.limits);
        self.kubernetes
            .configure(&snapshot.config.kubernetes)
            .map_err(|e| ConfigError::Invalid {
                key: e.key,
                message: e.message,
            })?;
        let snapshot = Arc::new(snapshot);
        self.current.store(snapshot.clone());
        Ok(snapshot)
    }
}
