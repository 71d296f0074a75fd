//! Raw ACL configuration sections as written by operators (serde), and the error that names a bad key.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::address::DEFAULT_DENIED_CIDRS;

/// One `[[sources]]` item: EITHER an inline entry (`cidr` and/or `cidrs`, `labels`, optional `name`)
/// OR `{ file = "path" }`, a YAML or JSON file holding a list of inline entries.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceEntry {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "de_opt_net"
    )]
    pub cidr: Option<IpNet>,
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "de_nets"
    )]
    pub cidrs: Vec<IpNet>,
    /// Label values may be written as YAML/TOML booleans or numbers; they are kept as strings.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "de_labels"
    )]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
}

/// One `[[rules]]` item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub name: String,
    pub action: Action,
    /// Absent or empty: every known source.
    #[serde(default)]
    pub from: SelectorConfig,
    /// Absent or empty: any destination, default ports.
    #[serde(default)]
    pub to: ToConfig,
    /// Internal ranges this rule opens on purpose (beats the denied lists for exactly these ranges).
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "de_nets"
    )]
    pub allow_cidrs: Vec<IpNet>,
}

/// What a matching rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
    /// Allow, but log and count as "would deny" (safe rollout).
    Report,
}

/// A Kubernetes label selector: every `match_labels` pair and every expression must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelectorConfig {
    #[serde(
        default,
        alias = "matchLabels",
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "de_labels"
    )]
    pub match_labels: BTreeMap<String, String>,
    #[serde(
        default,
        alias = "matchExpressions",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub match_expressions: Vec<ExpressionConfig>,
    /// Pods only: the pod's namespace must match this selector too (over the namespace's labels,
    /// `kubernetes.io/metadata.name` included), as in a NetworkPolicy peer.
    #[serde(
        default,
        alias = "namespaceSelector",
        skip_serializing_if = "Option::is_none"
    )]
    pub namespace_selector: Option<Box<SelectorConfig>>,
    /// Pods only: the pod's service account must be one of these, written `namespace/name`.
    #[serde(
        default,
        alias = "serviceAccounts",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub service_accounts: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpressionConfig {
    pub key: String,
    pub operator: Operator,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

/// Kubernetes selector operators, spelled as in Kubernetes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

/// The destination part of a rule. Every non-empty field must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToConfig {
    /// `example.com` (exact), `*.example.com` (subdomains at any depth, not the apex),
    /// `api.*.example.com` (`*` inside a name is exactly one label), `*` (any name).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub domains: Vec<String>,
    /// Literal-IP destinations only.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "de_nets"
    )]
    pub cidrs: Vec<IpNet>,
    /// `443`, `"443"`, `"8000-8100"`. Absent: the protocol's default ports (deny rules: any port).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortSpec>,
    /// Request methods (`GET`, ...; a tunnel's method is `CONNECT`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// `connect` (tunnels only), `http` (plain HTTP only), or `any` (both, and a tunnel on a
    /// `tls.ports` port may carry bytes that are not TLS). Absent: both, TLS required there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<RuleProtocol>,
    /// A tunnel this rule allows may send a ClientHello without a server name (SNI).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_missing_sni: bool,
}

/// `to.protocol`: which requests a rule matches, and whether its tunnels must speak TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleProtocol {
    /// CONNECT tunnels only.
    Connect,
    /// Plain-HTTP requests only.
    Http,
    /// Both, and the tunnel check lets bytes that are not TLS through.
    Any,
}

/// A port or an inclusive port range, written as an integer or a string (`"8000-8100"`).
/// Kept as written; validated when the policy compiles.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PortSpec(pub String);

/// `[destinations]`: the SSRF guard and the default ports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DestinationsConfig {
    /// Replaces the default list when set (tests on loopback set it explicitly).
    #[serde(deserialize_with = "de_nets")]
    pub denied_cidrs: Vec<IpNet>,
    /// Pod and service CIDRs of the cluster: denied in addition to `denied_cidrs`.
    #[serde(deserialize_with = "de_nets")]
    pub cluster_cidrs: Vec<IpNet>,
    /// Ranges opened on purpose, for every rule.
    #[serde(deserialize_with = "de_nets")]
    pub allowed_cidrs: Vec<IpNet>,
    /// Ports CONNECT may reach unless a rule lists others.
    pub connect_ports: Vec<PortSpec>,
    /// Ports plain HTTP may reach unless a rule lists others (Squid's Safe_ports).
    pub http_ports: Vec<PortSpec>,
    pub unknown_source: UnknownSource,
}

/// What happens to a client in no source entry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownSource {
    /// 403 `unknown-source` before any rule.
    #[default]
    Deny,
    /// Evaluated by the rules as a source with no labels (an empty selector still does not match it).
    Allow,
}

/// One `[[rate_limits]]` item. The first item whose selector matches a source applies to it; an
/// unset dimension is unlimited.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    pub name: String,
    #[serde(default)]
    pub from: SelectorConfig,
    /// Sustained requests per second per client IP (fractions allowed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_second: Option<f64>,
    /// Requests allowed at once above the rate; default: `requests_per_second` rounded up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// Concurrent CONNECT tunnels per client IP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tunnels: Option<u32>,
}

/// An invalid ACL or rate-limit configuration: the key (`rules[2].to.ports`) and what is wrong with it.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct AclConfigError {
    pub key: String,
    pub problem: Problem,
}

/// What is wrong with a configuration value; each message names the value.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Problem {
    #[error("invalid port {0:?} (1-65535)")]
    InvalidPort(String),
    #[error("invalid port range {0:?}")]
    InvalidPortRange(String),
    #[error("{net} has host bits set (did you mean {suggested}?)")]
    HostBits { net: IpNet, suggested: IpNet },
    #[error("duplicate {what} {value:?} (first at {first})")]
    Duplicate {
        what: &'static str,
        value: String,
        first: String,
    },
    #[error("must not be empty")]
    Empty,
    #[error("invalid domain pattern {pattern:?}: {why}")]
    InvalidDomain { pattern: String, why: String },
    #[error("invalid method {0:?}")]
    InvalidMethod(String),
    #[error("invalid name {0:?} (1-128 printable characters)")]
    InvalidName(String),
    #[error(
        "invalid label key {0:?} (Kubernetes syntax: [prefix/]name, name ≤ 63 of [A-Za-z0-9._-])"
    )]
    InvalidLabelKey(String),
    #[error(
        "invalid value {value:?} for label {key:?} (≤ 63 of [A-Za-z0-9._-], alphanumeric at both ends)"
    )]
    InvalidLabelValue { key: String, value: String },
    #[error("operator {operator:?} {why}, got {values:?}")]
    OperatorValues {
        operator: Operator,
        why: &'static str,
        values: Vec<String>,
    },
    #[error("{0}")]
    SourceShape(&'static str),
    #[error("cannot read {path:?}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("cannot parse {path:?}: {error}")]
    Parse { path: PathBuf, error: String },
    #[error("{0:?} is empty (write [] for a file with no sources)")]
    EmptyFile(PathBuf),
    #[error("requests_per_second must be a positive number of at most 1e9, got {0:?}")]
    InvalidRate(f64),
    #[error("burst must be at least 1, got {0}")]
    InvalidBurst(u32),
    #[error("burst {0} is set without requests_per_second")]
    BurstWithoutRate(u32),
    #[error("sets neither requests_per_second nor max_tunnels")]
    NoLimit,
    #[error("has no effect {0}")]
    NoEffect(&'static str),
    #[error("invalid service account {0:?} (write namespace/name)")]
    InvalidServiceAccount(String),
    #[error("a namespace_selector cannot have a namespace_selector or service_accounts of its own")]
    NestedNamespaceSelector,
}

/// Squid's default Safe_ports.
pub const SAFE_PORTS: &[&str] = &[
    "80",
    "21",
    "443",
    "70",
    "210",
    "1025-65535",
    "280",
    "488",
    "591",
    "777",
];

// === impl DestinationsConfig ===

impl Default for DestinationsConfig {
    fn default() -> Self {
        Self {
            denied_cidrs: DEFAULT_DENIED_CIDRS
                .iter()
                .filter_map(|s| s.parse().ok())
                .collect(),
            cluster_cidrs: Vec::new(),
            allowed_cidrs: Vec::new(),
            connect_ports: vec![PortSpec::from(443)],
            http_ports: SAFE_PORTS.iter().map(|&p| PortSpec::from(p)).collect(),
            unknown_source: UnknownSource::Deny,
        }
    }
}

// === impl Action ===

impl Action {
    pub fn as_str(&self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
            Action::Report => "report",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// === impl RuleProtocol ===

impl RuleProtocol {
    pub fn as_str(&self) -> &'static str {
        match self {
            RuleProtocol::Connect => "connect",
            RuleProtocol::Http => "http",
            RuleProtocol::Any => "any",
        }
    }
}

// === impl Operator ===

impl Operator {
    pub fn as_str(&self) -> &'static str {
        match self {
            Operator::In => "In",
            Operator::NotIn => "NotIn",
            Operator::Exists => "Exists",
            Operator::DoesNotExist => "DoesNotExist",
        }
    }
}

// === impl UnknownSource ===

impl UnknownSource {
    pub fn as_str(&self) -> &'static str {
        match self {
            UnknownSource::Deny => "deny",
            UnknownSource::Allow => "allow",
        }
    }
}

// === impl PortSpec ===

impl From<u16> for PortSpec {
    fn from(port: u16) -> Self {
        PortSpec(port.to_string())
    }
}

impl From<&str> for PortSpec {
    fn from(spec: &str) -> Self {
        PortSpec(spec.to_owned())
    }
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A single port is written back as an integer, a range as a string.
impl Serialize for PortSpec {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0.parse::<u16>() {
            Ok(port) if port.to_string() == self.0 => s.serialize_u16(port),
            _ => s.serialize_str(&self.0),
        }
    }
}

impl<'de> Deserialize<'de> for PortSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ScalarVisitor("a port number or a port range string"))
            .map(PortSpec)
    }
}

// === label values ===

/// Reads a string, or a boolean or number as its text (`true` → `"true"`).
struct ScalarVisitor(&'static str);

/// A label value that tolerates YAML/TOML scalars that are not strings.
struct LabelValue(String);

impl serde::de::Visitor<'_> for ScalarVisitor {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<String, E> {
        Ok(v.to_owned())
    }

    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<String, E> {
        Ok(v)
    }

    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<String, E> {
        Ok(v.to_string())
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<String, E> {
        Ok(v.to_string())
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<String, E> {
        Ok(v.to_string())
    }

    fn visit_i128<E: serde::de::Error>(self, v: i128) -> Result<String, E> {
        Ok(v.to_string())
    }

    fn visit_u128<E: serde::de::Error>(self, v: u128) -> Result<String, E> {
        Ok(v.to_string())
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<String, E> {
        Ok(v.to_string())
    }
}

impl<'de> Deserialize<'de> for LabelValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ScalarVisitor("a label value (string)"))
            .map(LabelValue)
    }
}

/// A prefix in CIDR notation; a bare address is its /32 or /128. The error names the value.
struct Net(IpNet);

impl<'de> Deserialize<'de> for Net {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let trimmed = text.trim();
        trimmed
            .parse::<IpNet>()
            .or_else(|_| trimmed.parse::<std::net::IpAddr>().map(IpNet::from))
            .map(Net)
            .map_err(|_| {
                serde::de::Error::custom(format!(
                    "invalid CIDR {text:?} (expected e.g. 10.0.0.0/8 or fd00::/8)"
                ))
            })
    }
}

fn de_opt_net<'de, D: Deserializer<'de>>(d: D) -> Result<Option<IpNet>, D::Error> {
    Ok(Some(Net::deserialize(d)?.0))
}

fn de_nets<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
    Ok(Vec::<Net>::deserialize(d)?
        .into_iter()
        .map(|n| n.0)
        .collect())
}

fn de_labels<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    let raw = BTreeMap::<String, LabelValue>::deserialize(d)?;
    Ok(raw.into_iter().map(|(k, v)| (k, v.0)).collect())
}

// === impl AclConfigError ===

impl AclConfigError {
    pub fn new(key: impl Into<String>, problem: Problem) -> Self {
        Self {
            key: key.into(),
            problem,
        }
    }

    /// The offending key, e.g. `rules[2].to.ports` or `/etc/kalmar/sources.yaml[12].cidr`.
    pub fn key(&self) -> &str {
        &self.key
    }
}

/// Validates a configured prefix: no host bits.
pub(crate) fn check_net(key: &str, net: IpNet) -> Result<IpNet, AclConfigError> {
    if net.trunc() != net {
        return Err(AclConfigError::new(
            key,
            Problem::HostBits {
                net,
                suggested: net.trunc(),
            },
        ));
    }
    Ok(net)
}

/// Kubernetes label key: optional DNS-subdomain prefix and `/`, then a name.
pub(crate) fn valid_label_key(key: &str) -> bool {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            })
    });
    prefix_ok && !name.is_empty() && valid_label_value(name)
}

/// Kubernetes label value: empty, or ≤ 63 of `[A-Za-z0-9._-]` starting and ending alphanumeric.
pub(crate) fn valid_label_value(value: &str) -> bool {
    let bytes = value.as_bytes();
    value.is_empty()
        || (bytes.len() <= 63
            && bytes
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
            && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
            && bytes.last().is_some_and(u8::is_ascii_alphanumeric))
}

/// Checks a label map; `key` is the config key of the map.
pub(crate) fn check_labels(
    key: &str,
    labels: &BTreeMap<String, String>,
) -> Result<(), AclConfigError> {
    for (k, v) in labels {
        if !valid_label_key(k) {
            return Err(AclConfigError::new(
                key,
                Problem::InvalidLabelKey(k.clone()),
            ));
        }
        if !valid_label_value(v) {
            return Err(AclConfigError::new(
                key,
                Problem::InvalidLabelValue {
                    key: k.clone(),
                    value: v.clone(),
                },
            ));
        }
    }
    Ok(())
}

/// Rule and limit names: log fields and metric labels.
pub(crate) fn check_name(key: &str, name: &str) -> Result<(), AclConfigError> {
    if name.is_empty() || name.chars().count() > 128 || name.chars().any(char::is_control) {
        return Err(AclConfigError::new(
            key,
            Problem::InvalidName(name.to_owned()),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_syntax() {
        let keys = [
            ("team", true),
            ("network-access-external-ips", true),
            ("app.kubernetes.io/name", true),
            ("kubernetes.io/metadata.name", true),
            ("a", true),
            ("", false),
            ("/name", false),
            ("Prefix.io/name", false),
            ("-bad", false),
            ("bad-", false),
            ("sp ace", false),
            ("a/b/c", false),
            (&"k".repeat(64), false),
        ];
        for (key, ok) in keys {
            assert_eq!(valid_label_key(key), ok, "{key:?}");
        }
        let values = [
            ("", true),
            ("true", true),
            ("project-x", true),
            ("v1.2_3", true),
            ("-x", false),
            ("x-", false),
            ("a b", false),
            ("a/b", false),
            (&"v".repeat(63), true),
            (&"v".repeat(64), false),
        ];
        for (value, ok) in values {
            assert_eq!(valid_label_value(value), ok, "{value:?}");
        }
    }

    #[test]
    fn port_specs_round_trip_as_ints_and_strings() {
        let specs: Vec<PortSpec> =
            serde_json::from_str(r#"[443, "8000-8100", "80", 70000]"#).expect("ports");
        assert_eq!(
            specs,
            ["443", "8000-8100", "80", "70000"]
                .map(PortSpec::from)
                .to_vec()
        );
        let back = serde_json::to_string(&specs).expect("serialize");
        assert_eq!(
            back,
            r#"[443,"8000-8100",80,70000]"#.replace("70000", "\"70000\"")
        );
        assert!(serde_json::from_str::<Vec<PortSpec>>("[[1]]").is_err());
    }

    #[test]
    fn destinations_default_is_the_issue_list() {
        let d = DestinationsConfig::default();
        assert_eq!(d.denied_cidrs.len(), DEFAULT_DENIED_CIDRS.len());
        assert_eq!(d.connect_ports, vec![PortSpec::from(443)]);
        assert_eq!(d.http_ports.len(), 10);
        assert_eq!(d.unknown_source, UnknownSource::Deny);
        let partial: DestinationsConfig =
            serde_json::from_str(r#"{"cluster_cidrs": ["10.96.0.0/12"]}"#).expect("partial");
        assert_eq!(partial.denied_cidrs, d.denied_cidrs);
        assert!(serde_json::from_str::<DestinationsConfig>(r#"{"denied": []}"#).is_err());
    }
}
