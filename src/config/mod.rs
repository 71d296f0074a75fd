//! Configuration: the embedded default, file and environment layering, validation.
//!
//! Loading order (later wins): `config/kalmar.toml` compiled into the binary, the file
//! given with `--config`, then `KALMAR_*` environment variables (`KALMAR_SERVER__LISTEN`).
//! Every struct denies unknown fields, so a typo is an error naming the key.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

/// The default configuration, byte for byte the repository's `config/kalmar.toml`.
pub const DEFAULT_CONFIG: &str = include_str!("../../config/kalmar.toml");

/// Environment prefix: `KALMAR_SECTION__KEY`.
pub const ENV_PREFIX: &str = "KALMAR";

/// Keys whose environment value is a comma-separated list.
const ENV_LIST_KEYS: &[&str] = &[
    "dns.nameservers",
    "upstream.parents",
    "upstream.http_parents",
    "upstream.https_parents",
    "upstream.direct",
    "destinations.denied_cidrs",
    "destinations.allowed_cidrs",
    "destinations.cluster_cidrs",
    "destinations.connect_ports",
    "destinations.http_ports",
];

/// The whole validated configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub timeouts: TimeoutsConfig,
    pub proxy: ProxyConfig,
    pub dns: DnsConfig,
    pub access_log: crate::access_log::AccessLogConfig,
    /// Client source CIDR → labels (`[[sources]]`), inline or from files.
    #[serde(default)]
    pub sources: Vec<crate::acl::SourceEntry>,
    /// Ordered rules, first match wins, default deny (`[[rules]]`).
    #[serde(default)]
    pub rules: Vec<crate::acl::RuleConfig>,
    /// The destination guard and default ports.
    #[serde(default)]
    pub destinations: crate::acl::DestinationsConfig,
    /// Per-source rate limits (`[[rate_limits]]`).
    #[serde(default)]
    pub rate_limits: Vec<crate::acl::RateLimitConfig>,
    /// The response cache (`[cache]`).
    #[serde(default)]
    pub cache: crate::cache::CacheConfig,
    /// Parent proxies and the destinations that bypass them.
    #[serde(default)]
    pub upstream: UpstreamConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub max_connections: usize,
    pub max_request_header_size: ByteSize,
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    pub workers: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutsConfig {
    #[serde(with = "humantime_serde")]
    pub connect: Duration,
    #[serde(with = "humantime_serde")]
    pub request_header: Duration,
    #[serde(with = "humantime_serde")]
    pub client_idle: Duration,
    #[serde(with = "humantime_serde")]
    pub upstream_response_header: Duration,
    #[serde(with = "humantime_serde")]
    pub tunnel_idle: Duration,
    #[serde(with = "humantime_serde")]
    pub upstream_idle: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ForwardedFor {
    Off,
    On,
    Delete,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    pub via: bool,
    pub via_name: String,
    pub x_forwarded_for: ForwardedFor,
    pub allow_trace: bool,
    pub max_idle_per_origin: usize,
    /// Header that carries the request id to the origin; "" = not sent.
    #[serde(default)]
    pub request_id_header: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    pub nameservers: Vec<String>,
    pub use_hosts_file: bool,
    pub hosts: BTreeMap<String, Vec<IpAddr>>,
    pub cache_size: u64,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Parent proxy URLs for every request (unless the per-scheme lists below are set).
    pub parents: Vec<SecretUrl>,
    /// Parents for plain-HTTP requests (`http_proxy`); empty = `parents`.
    pub http_parents: Vec<SecretUrl>,
    /// Parents for CONNECT tunnels (`https_proxy`); empty = `parents`.
    pub https_parents: Vec<SecretUrl>,
    /// Destinations that bypass the parents (`no_proxy`).
    pub direct: Vec<String>,
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

/// A URL that may carry `user:password@`: Debug and serialization (`check-config`) show
/// the credentials as `***`; only [`SecretUrl::expose`] gives the text.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct SecretUrl(String);

/// A configuration that could not be loaded; the message names the key and the value.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Load(#[from] config::ConfigError),
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
    #[error("config file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

// === impl UpstreamConfig ===

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            parents: Vec::new(),
            http_parents: Vec::new(),
            https_parents: Vec::new(),
            direct: Vec::new(),
            selection: Selection::Ordered,
            down_backoff: Duration::from_secs(30),
            check_resolved_destinations: true,
            ca_file: PathBuf::new(),
            credentials_file: PathBuf::new(),
            credentials_env: String::new(),
        }
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

// === impl SecretUrl ===

impl SecretUrl {
    pub fn new(url: impl Into<String>) -> SecretUrl {
        SecretUrl(url.into())
    }

    /// The URL as configured, credentials included: for building the parent, nothing else.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", crate::connect::upstream::parent::redact(&self.0))
    }
}

impl Serialize for SecretUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&crate::connect::upstream::parent::redact(&self.0))
    }
}

// === impl Config ===

impl Config {
    /// The embedded default plus the environment.
    pub fn load_default() -> Result<Config, ConfigError> {
        Self::load(None)
    }

    /// The embedded default, then `path` (if any), then the environment.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_with_env(path, std::env::vars())
    }

    /// As [`Config::load`], with the environment given explicitly (tests).
    pub fn load_with_env(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        // Read the file ourselves so that a missing file is an error naming the path,
        // never a silent fall-back to the defaults.
        let text = match path {
            Some(path) => {
                Some(
                    std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
                        path: path.to_owned(),
                        source,
                    })?,
                )
            }
            None => None,
        };
        Self::from_toml_with_env(text.as_deref(), env)
    }

    /// The embedded default overlaid with `text` (TOML), without the environment.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        Self::from_toml_with_env(Some(text), std::iter::empty())
    }

    fn from_toml_with_env(
        text: Option<&str>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut builder = config::Config::builder().add_source(config::File::from_str(
            DEFAULT_CONFIG,
            config::FileFormat::Toml,
        ));
        if let Some(text) = text {
            builder = builder.add_source(config::File::from_str(text, config::FileFormat::Toml));
        }
        let vars: config::Map<String, String> = env
            .into_iter()
            // Only KALMAR_SECTION__KEY: the binary's own KALMAR_LOG / KALMAR_CONFIG, and the
            // KALMAR_PORT_* service links Kubernetes injects, are not config keys.
            .filter(|(k, _)| {
                k.strip_prefix(ENV_PREFIX)
                    .and_then(|rest| rest.strip_prefix('_'))
                    .is_some_and(|rest| rest.contains("__"))
            })
            .collect();
        let mut environment = config::Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("_")
            .separator("__")
            .try_parsing(true)
            .list_separator(",")
            .source(Some(vars));
        for key in ENV_LIST_KEYS {
            environment = environment.with_list_parse_key(key);
        }
        let merged = builder.add_source(environment).build()?;
        let config: Config = merged.try_deserialize()?;
        config.validate()?;
        Ok(config)
    }

    /// Cross-field checks that serde cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            key: key.to_owned(),
            message,
        };
        if self.server.listen == self.server.admin_listen {
            return Err(invalid(
                "server.admin_listen",
                format!(
                    "{} is also server.listen; the admin listener must be separate",
                    self.server.admin_listen
                ),
            ));
        }
        if self.server.max_connections == 0 {
            return Err(invalid(
                "server.max_connections",
                "0: must be at least 1".into(),
            ));
        }
        let header = self.server.max_request_header_size.as_u64();
        if !(1024..=1024 * 1024).contains(&header) {
            return Err(invalid(
                "server.max_request_header_size",
                format!("{header} bytes: must be between 1 KiB and 1 MiB"),
            ));
        }
        for (key, value) in [
            ("timeouts.connect", self.timeouts.connect),
            ("timeouts.request_header", self.timeouts.request_header),
            ("timeouts.client_idle", self.timeouts.client_idle),
            (
                "timeouts.upstream_response_header",
                self.timeouts.upstream_response_header,
            ),
            ("timeouts.tunnel_idle", self.timeouts.tunnel_idle),
            ("timeouts.upstream_idle", self.timeouts.upstream_idle),
            ("dns.timeout", self.dns.timeout),
        ] {
            if value.is_zero() {
                return Err(invalid(key, "0s: must be greater than zero".into()));
            }
        }
        if self.proxy.via_name.is_empty()
            || http::HeaderValue::from_str(&self.proxy.via_name).is_err()
        {
            return Err(invalid(
                "proxy.via_name",
                format!(
                    "{:?}: must be a non-empty header-safe token",
                    self.proxy.via_name
                ),
            ));
        }
        self.cache
            .validate()
            .map_err(|e| invalid(e.key(), e.to_string()))?;
        if self.upstream.down_backoff.is_zero() {
            return Err(invalid(
                "upstream.down_backoff",
                "0s: must be greater than zero".into(),
            ));
        }
        for (key, urls) in [
            ("parents", &self.upstream.parents),
            ("http_parents", &self.upstream.http_parents),
            ("https_parents", &self.upstream.https_parents),
        ] {
            for (i, url) in urls.iter().enumerate() {
                // Empty entries are skipped: an empty environment value means "no parents".
                if url.expose().trim().is_empty() {
                    continue;
                }
                crate::connect::upstream::parent::ParentUrl::parse(url.expose())
                    .map_err(|e| invalid(&format!("upstream.{key}[{i}]"), e.to_string()))?;
            }
        }
        crate::connect::upstream::direct::DirectList::parse(&self.upstream.direct)
            .map_err(|(i, e)| invalid(&format!("upstream.direct[{i}]"), e.to_string()))?;
        for (i, ns) in self.dns.nameservers.iter().enumerate() {
            parse_nameserver(ns)
                .map_err(|message| invalid(&format!("dns.nameservers[{i}]"), message))?;
        }
        Ok(())
    }

    /// The effective configuration as TOML, for `check-config`.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# could not render: {e}"))
    }
}

/// `"10.96.0.10"`, `"10.96.0.10:53"`, `"[::1]:5353"` → socket address (port 53 by default).
pub fn parse_nameserver(s: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(addr);
    }
    s.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, 53))
        .map_err(|_| format!("{s:?}: not an IP address or IP:PORT"))
}
