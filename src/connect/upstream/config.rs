//! The `[upstream]` section: its typed form (parent URLs and the bypass list are parsed
//! while the configuration is deserialized, once) and its compilation into [`Upstream`]
//! (credentials and CA files read, TLS set up, parents with their health).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio_rustls::TlsConnector;

use super::direct::DirectList;
use super::parent::{Credentials, CredentialsError, ParentList, ParentScheme, ParentUrl};
use super::{Parent, ParentSet, Upstream};

/// `[upstream]`: parent proxies and the destinations that bypass them.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Parent proxy URLs for every request (unless the per-scheme lists below are set).
    pub parents: ParentList,
    /// Parents for plain-HTTP requests (`http_proxy`); empty = `parents`.
    pub http_parents: ParentList,
    /// Parents for CONNECT tunnels (`https_proxy`); empty = `parents`.
    pub https_parents: ParentList,
    /// Destinations that bypass the parents (`no_proxy`).
    pub direct: DirectList,
    pub selection: Selection,
    #[serde(with = "humantime_serde")]
    pub down_backoff: Duration,
    pub check_resolved_destinations: bool,
    /// Extra CA certificates (PEM) for `https://` parents; empty = system roots only.
    pub ca_file: PathBuf,
    /// A file holding `user:password` for parents without credentials in their URL.
    pub credentials_file: PathBuf,
    /// The name of an environment variable holding `user:password`, likewise.
    pub credentials_env: String,
}

/// The order in which parents are tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Selection {
    /// The first parent that is up, in configured order (others are fail-over).
    Ordered,
    /// Each request starts at the next parent (load spreading), skipping those down.
    RoundRobin,
}

/// Why the `[upstream]` section cannot be used; [`UpstreamConfigError::key`] names the key.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamConfigError {
    #[error("0s: must be greater than zero")]
    ZeroBackoff,
    #[error("set either upstream.credentials_file or upstream.credentials_env, not both")]
    TwoCredentialSources,
    #[error("{}: {source}", .path.display())]
    CredentialsFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("environment variable {0:?} is not set (or not UTF-8)")]
    CredentialsEnvUnset(String),
    #[error("{source}")]
    Credentials {
        key: &'static str,
        source: CredentialsError,
    },
    #[error("{}: {reason}", .path.display())]
    CaFile { path: PathBuf, reason: String },
    #[error("{0}")]
    Tls(String),
}

// === impl UpstreamConfig ===

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            parents: ParentList::default(),
            http_parents: ParentList::default(),
            https_parents: ParentList::default(),
            direct: DirectList::default(),
            selection: Selection::Ordered,
            down_backoff: Duration::from_secs(30),
            check_resolved_destinations: true,
            ca_file: PathBuf::new(),
            credentials_file: PathBuf::new(),
            credentials_env: String::new(),
        }
    }
}

impl UpstreamConfig {
    /// Checks across keys that need no file or environment access.
    pub fn validate(&self) -> Result<(), UpstreamConfigError> {
        if self.down_backoff.is_zero() {
            return Err(UpstreamConfigError::ZeroBackoff);
        }
        if !self.credentials_file.as_os_str().is_empty() && !self.credentials_env.is_empty() {
            return Err(UpstreamConfigError::TwoCredentialSources);
        }
        Ok(())
    }
}

// === impl Selection ===

impl Selection {
    pub fn as_str(self) -> &'static str {
        match self {
            Selection::Ordered => "ordered",
            Selection::RoundRobin => "round-robin",
        }
    }
}

// === impl UpstreamConfigError ===

impl UpstreamConfigError {
    /// The config key at fault.
    pub fn key(&self) -> &'static str {
        match self {
            UpstreamConfigError::ZeroBackoff => "upstream.down_backoff",
            UpstreamConfigError::TwoCredentialSources
            | UpstreamConfigError::CredentialsEnvUnset(_) => "upstream.credentials_env",
            UpstreamConfigError::CredentialsFile { .. } => "upstream.credentials_file",
            UpstreamConfigError::Credentials { key, .. } => key,
            UpstreamConfigError::CaFile { .. } | UpstreamConfigError::Tls(_) => "upstream.ca_file",
        }
    }
}

// === impl Upstream ===

impl Upstream {
    /// Compile the `[upstream]` section: its values are already parsed; this reads the
    /// credentials and CA files and builds the parents with their health.
    pub fn compile(cfg: &UpstreamConfig) -> Result<Upstream, UpstreamConfigError> {
        cfg.validate()?;
        let shared = shared_credentials(cfg)?;
        let (http, https) = (
            cfg.http_parents.or(&cfg.parents),
            cfg.https_parents.or(&cfg.parents),
        );
        let tls = if http
            .iter()
            .chain(https)
            .any(|p| p.scheme == ParentScheme::Https)
        {
            Some(tls_connector(cfg)?)
        } else {
            None
        };
        let set = |urls: &[ParentUrl]| ParentSet {
            parents: urls
                .iter()
                .map(|url| {
                    let auth = url
                        .credentials
                        .as_ref()
                        .or(shared.as_ref())
                        .and_then(Credentials::basic_header);
                    Arc::new(Parent {
                        pool_key: Arc::from(format!("{}://{}", url.scheme.as_str(), url.label)),
                        tls: (url.scheme == ParentScheme::Https)
                            .then(|| tls.clone())
                            .flatten(),
                        auth,
                        url: url.clone(),
                        backoff: cfg.down_backoff,
                        down_until: Mutex::new(None),
                    })
                })
                .collect(),
            selection: cfg.selection,
            next: AtomicUsize::new(0),
        };
        Ok(Upstream {
            http: set(http),
            https: set(https),
            direct: cfg.direct.clone(),
            check_resolved: cfg.check_resolved_destinations,
        })
    }
}

/// `upstream.credentials_file` / `credentials_env`: one `user:password` for every parent
/// whose URL carries none.
fn shared_credentials(cfg: &UpstreamConfig) -> Result<Option<Credentials>, UpstreamConfigError> {
    let (key, text) = if !cfg.credentials_file.as_os_str().is_empty() {
        let path = &cfg.credentials_file;
        let text = std::fs::read_to_string(path).map_err(|source| {
            UpstreamConfigError::CredentialsFile {
                path: path.clone(),
                source,
            }
        })?;
        ("upstream.credentials_file", text)
    } else if !cfg.credentials_env.is_empty() {
        let var = &cfg.credentials_env;
        let text = std::env::var(var)
            .map_err(|_| UpstreamConfigError::CredentialsEnvUnset(var.clone()))?;
        ("upstream.credentials_env", text)
    } else {
        return Ok(None);
    };
    Credentials::parse_pair(&text)
        .map(Some)
        .map_err(|source| UpstreamConfigError::Credentials { key, source })
}

/// TLS to parents: the system roots plus `upstream.ca_file`.
fn tls_connector(cfg: &UpstreamConfig) -> Result<TlsConnector, UpstreamConfigError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if !cfg.ca_file.as_os_str().is_empty() {
        let path = &cfg.ca_file;
        let bad = |reason: String| UpstreamConfigError::CaFile {
            path: path.clone(),
            reason,
        };
        let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        let mut added = 0;
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            let cert = cert.map_err(|e| bad(e.to_string()))?;
            roots.add(cert).map_err(|e| bad(e.to_string()))?;
            added += 1;
        }
        if added == 0 {
            return Err(bad("no PEM certificate in it".into()));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| UpstreamConfigError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}
