//! Configuration: the embedded default, file and environment layering, validation.
//!
//! Loading order (later wins): `config/kalmar.toml` compiled into the binary, the file
//! given with `--config`, then `KALMAR_*` environment variables (`KALMAR_SERVER__LISTEN`).
//! Every struct denies unknown fields, so a typo is an error naming the key.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

mod error;

pub use self::error::ConfigError;

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
    "tls.ports",
    "kubernetes.namespaces",
    "kubernetes.pod_cidrs",
];

/// The whole validated configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub timeouts: TimeoutsConfig,
    pub proxy: ProxyConfig,
    pub dns: crate::connect::resolver::DnsConfig,
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
    pub upstream: crate::connect::upstream::UpstreamConfig,
    /// The ClientHello check of CONNECT tunnels (`[tls]`).
    #[serde(default)]
    pub tls: crate::tls::TlsConfig,
    /// Pod identity from the Kubernetes API (`[kubernetes]`).
    #[serde(default)]
    pub kubernetes: crate::kubernetes::KubernetesConfig,
    /// How tunnels move their bytes (`[tunnel]`).
    #[serde(default)]
    pub tunnel: crate::relay::TunnelConfig,
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

impl From<crate::acl::AclConfigError> for ConfigError {
    fn from(e: crate::acl::AclConfigError) -> ConfigError {
        // Its own Display already starts with the key.
        ConfigError::invalid(e.key, e.problem)
    }
}

impl From<crate::tls::TlsConfigError> for ConfigError {
    fn from(e: crate::tls::TlsConfigError) -> ConfigError {
        ConfigError::invalid(e.key, e.message)
    }
}

/// Each section's own error type knows its key (`fn key(&self)`); this turns it into
/// [`ConfigError::Invalid`], so that the section's owner never needs this module.
macro_rules! keyed_errors {
    ($($error:ty),* $(,)?) => {$(
        impl From<$error> for ConfigError {
            fn from(e: $error) -> ConfigError {
                ConfigError::invalid(e.key(), &e)
            }
        }
    )*};
}

keyed_errors!(
    crate::cache::CacheConfigError,
    crate::connect::resolver::DnsConfigError,
    crate::connect::upstream::UpstreamConfigError,
    crate::relay::TunnelConfigError,
);

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
        let file = match path {
            Some(path) => Some((
                path.display().to_string(),
                std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
                    path: path.to_owned(),
                    source,
                })?,
            )),
            None => None,
        };
        Self::from_toml_with_env(file.as_ref().map(|(o, t)| (o.as_str(), t.as_str())), env)
    }

    /// The embedded default overlaid with `text` (TOML), without the environment.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        Self::from_toml_with_env(Some(("the given TOML", text)), std::iter::empty())
    }

    /// `file` is (where it came from, its text).
    fn from_toml_with_env(
        file: Option<(&str, &str)>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut builder = config::Config::builder().add_source(config::File::from_str(
            DEFAULT_CONFIG,
            config::FileFormat::Toml,
        ));
        if let Some((_, text)) = file {
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
        // Only the file can hold a syntax error: the embedded default is tested.
        let merged = builder.add_source(environment).build().map_err(|e| {
            let (origin, text) = file.unwrap_or(("the embedded default", DEFAULT_CONFIG));
            ConfigError::from_build(e, origin, text)
        })?;
        let config: Config = serde_path_to_error::deserialize(merged.clone())
            .map_err(|e| ConfigError::from_deserialize::<Config>(e, &merged))?;
        config.validate()?;
        Ok(config)
    }

    /// Cross-field checks that serde cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.server.listen == self.server.admin_listen {
            return Err(ConfigError::invalid(
                "server.admin_listen",
                format!(
                    "{} is also server.listen; the admin listener must be separate",
                    self.server.admin_listen
                ),
            ));
        }
        if self.server.max_connections == 0 {
            return Err(ConfigError::invalid(
                "server.max_connections",
                "0: must be at least 1",
            ));
        }
        let header = self.server.max_request_header_size.as_u64();
        if !(1024..=1024 * 1024).contains(&header) {
            return Err(ConfigError::invalid(
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
                return Err(ConfigError::invalid(key, "0s: must be greater than zero"));
            }
        }
        if self.proxy.via_name.is_empty()
            || http::HeaderValue::from_str(&self.proxy.via_name).is_err()
        {
            return Err(ConfigError::invalid(
                "proxy.via_name",
                format!(
                    "{:?}: must be a non-empty header-safe token",
                    self.proxy.via_name
                ),
            ));
        }
        self.cache.validate()?;
        self.upstream.validate()?;
        self.tunnel.validate()?;
        Ok(())
    }

    /// The effective configuration as TOML, for `check-config`.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# could not render: {e}"))
    }
}
