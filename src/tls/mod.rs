//! Tunnel inspection without interception: the `[tls]` section, reading the ClientHello a client sends into a CONNECT tunnel, and deciding whether it names the host the client was allowed to reach.
//!
//! A CONNECT is authorised by its target (`pypi.org:443`); what the client then sends is opaque
//! to a proxy that does not decrypt. The first flight of TLS is not: the ClientHello carries the
//! server name (SNI) in clear text. After the `200`, on a port in `tls.ports`, the tunnel stage
//! reads the client's bytes until they form a complete ClientHello ([`client_hello`]), decides
//! ([`policy`]), and either forwards every byte it read, unchanged, and relays as before, or
//! closes the tunnel (a `403` is no longer possible: the `200` is out) and logs it with verdict
//! `deny` and a log-only kind.
//!
//! # Semantics
//! - **`tls.sni`**: `exact` (default) — the server name, normalised as CONNECT hosts are (lower
//!   case, no trailing dot, IDNA A-label), must equal the CONNECT host; `same-rule` — the name
//!   must be covered by the destination of the rule that allowed the CONNECT, and not denied by
//!   an earlier rule (the policy evaluated for the name, same client and port, must allow it);
//!   `off` — the name is not checked (the hello is still read: not-TLS and ECH still decide).
//! - **A CONNECT to an IP literal** is never upgraded by a name: a hello without SNI (what
//!   clients send for an address) passes, a hello naming that same address passes, a hello
//!   naming anything else is `sni-mismatch`, in `exact` and `same-rule` alike.
//! - **No SNI** on a hostname CONNECT is `sni-missing`, unless the deciding rule says
//!   `to.allow_missing_sni = true`.
//! - **Not TLS** on a port in `tls.ports` (default: `destinations.connect_ports`) is `not-tls`
//!   (and a hello that starts like TLS but is malformed or above 64 KiB `client-hello-invalid`),
//!   unless the deciding rule says `to.protocol = "any"`: then anything passes that is not a
//!   ClientHello failing the checks above, including a client that waits for the server to speak
//!   first (the stage ends as soon as the origin sends).
//! - **ECH** (extension `0xfe0d`): the outer name is checked as above; then `tls.ech = "deny"`
//!   (default) refuses with `ech-denied`, `"allow"` lets it through.
//! - **Time and size**: no complete hello within `tls.client_hello_timeout` (default 5 s) is
//!   `client-hello-timeout`; at most 64 KiB are read.
//! - **`report` rules** let every failing tunnel through, logged with verdict `report` and the
//!   kind, and counted in `kalmar_would_deny_total`.
//! - `tls.ports = []` turns the stage off: tunnels are relayed from their first byte, as before.

pub mod client_hello;
pub mod policy;

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::acl::{PortSet, PortSpec};

pub use client_hello::{ClientHello, HelloOutcome, HelloRead, read_client_hello};
pub use policy::{TlsCheck, TlsReason};

/// `[tls]`, as written by operators. Reloadable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    pub sni: SniMode,
    /// How long the client has, after the `200`, to send a complete ClientHello.
    #[serde(with = "humantime_serde")]
    pub client_hello_timeout: Duration,
    /// Tunnels to these ports must speak TLS and are checked; unset: `destinations.connect_ports`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<PortSpec>>,
    pub ech: EchMode,
}

/// `tls.sni`: how the server name is checked against the CONNECT.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SniMode {
    /// The server name must equal the CONNECT host.
    #[default]
    Exact,
    /// The server name must be allowed by the rule that allowed the CONNECT.
    SameRule,
    /// The server name is not checked.
    Off,
}

/// `tls.ech`: what happens to an Encrypted ClientHello whose outer name passed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EchMode {
    #[default]
    Deny,
    Allow,
}

/// `[tls]`, compiled: what the tunnel stage reads from the snapshot.
#[derive(Debug, Clone)]
pub struct TlsPolicy {
    pub sni: SniMode,
    pub ech: EchMode,
    pub client_hello_timeout: Duration,
    ports: PortSet,
}

/// An invalid `[tls]` value: the key and what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {message}")]
pub struct TlsConfigError {
    pub key: String,
    pub message: String,
}

// === impl TlsConfig ===

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            sni: SniMode::Exact,
            client_hello_timeout: Duration::from_secs(5),
            ports: None,
            ech: EchMode::Deny,
        }
    }
}

// === impl SniMode ===

impl SniMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SniMode::Exact => "exact",
            SniMode::SameRule => "same-rule",
            SniMode::Off => "off",
        }
    }
}

// === impl EchMode ===

impl EchMode {
    pub fn as_str(self) -> &'static str {
        match self {
            EchMode::Deny => "deny",
            EchMode::Allow => "allow",
        }
    }
}

// === impl TlsPolicy ===

impl TlsPolicy {
    /// Validates `[tls]`; `connect_ports` (`destinations.connect_ports`) is the default of `ports`.
    /// Empty port entries are skipped, so `KALMAR_TLS__PORTS=` means no port.
    pub fn compile(cfg: &TlsConfig, connect_ports: &[PortSpec]) -> Result<Self, TlsConfigError> {
        if cfg.client_hello_timeout.is_zero() {
            return Err(TlsConfigError {
                key: "tls.client_hello_timeout".into(),
                message: "0s: must be greater than zero".into(),
            });
        }
        let (specs, key) = match &cfg.ports {
            Some(ports) => (ports.as_slice(), "tls.ports"),
            None => (connect_ports, "destinations.connect_ports"),
        };
        let specs: Vec<PortSpec> = specs
            .iter()
            .filter(|p| !p.0.trim().is_empty())
            .cloned()
            .collect();
        let ports = PortSet::parse(&specs, key).map_err(|e| TlsConfigError {
            key: e.key().to_owned(),
            message: e.problem.to_string(),
        })?;
        Ok(Self {
            sni: cfg.sni,
            ech: cfg.ech,
            client_hello_timeout: cfg.client_hello_timeout,
            ports,
        })
    }

    /// Does the stage run for a tunnel to `port`?
    pub fn applies(&self, port: u16) -> bool {
        self.ports.contains(port)
    }

    /// `tls.ports` as text (`443,8443`), for `explain`.
    pub fn ports_text(&self) -> String {
        self.ports.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_default_to_connect_ports_and_empty_entries_are_skipped() {
        let connect = [PortSpec::from(443), PortSpec::from("8443")];
        let p = TlsPolicy::compile(&TlsConfig::default(), &connect).expect("valid");
        assert!(p.applies(443) && p.applies(8443) && !p.applies(80));
        let cfg = TlsConfig {
            ports: Some(vec![PortSpec::from("")]),
            ..TlsConfig::default()
        };
        let p = TlsPolicy::compile(&cfg, &connect).expect("valid");
        assert!(!p.applies(443), "an empty list turns the stage off");
        let cfg = TlsConfig {
            ports: Some(vec![PortSpec::from("90-80")]),
            ..TlsConfig::default()
        };
        let err = TlsPolicy::compile(&cfg, &connect).expect_err("bad range");
        assert_eq!(err.to_string(), "tls.ports: invalid port range \"90-80\"");
        let cfg = TlsConfig {
            client_hello_timeout: Duration::ZERO,
            ..TlsConfig::default()
        };
        let err = TlsPolicy::compile(&cfg, &connect).expect_err("zero timeout");
        assert_eq!(
            err.to_string(),
            "tls.client_hello_timeout: 0s: must be greater than zero"
        );
    }

    #[test]
    fn config_spellings() {
        let cfg: TlsConfig = serde_json::from_str(
            r#"{"sni": "same-rule", "ech": "allow", "client_hello_timeout": "250ms", "ports": [443, "8000-8100"]}"#,
        )
        .expect("valid");
        assert_eq!(cfg.sni, SniMode::SameRule);
        assert_eq!(cfg.ech, EchMode::Allow);
        assert_eq!(cfg.client_hello_timeout, Duration::from_millis(250));
        assert!(serde_json::from_str::<TlsConfig>(r#"{"sni": "loose"}"#).is_err());
        assert!(serde_json::from_str::<TlsConfig>(r#"{"snii": "off"}"#).is_err());
    }
}
