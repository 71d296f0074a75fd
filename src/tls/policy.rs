//! The tunnel TLS decision: what the ClientHello (or its absence) means for a CONNECT that the ACL allowed, as a verdict with a bounded reason.

use std::fmt;

use super::client_hello::{ClientHello, HelloOutcome};
use super::{EchMode, SniMode, TlsPolicy};
use crate::acl::{Decision, Destination, Host, Identity, Policy, Protocol, Verdict};
use crate::error::ErrorKind;

/// The CONNECT a ClientHello is judged against: who asked, for what, and how the ACL decided.
#[derive(Debug, Clone, Copy)]
pub struct Tunnel<'a> {
    pub policy: &'a Policy,
    pub identity: &'a Identity,
    /// The ACL decision that allowed the CONNECT (verdict `allow` or `report`).
    pub decision: &'a Decision,
    pub host: &'a Host,
    pub port: u16,
}

/// The outcome of the check. `verdict` is `allow` when the tunnel passed, `deny` when it is to
/// be closed, `report` when it failed under a `report` rule (relayed, logged, counted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TlsCheck {
    pub verdict: Verdict,
    pub reason: TlsReason,
}

/// Why; a bounded set, the `result` label of `kalmar_tunnel_tls_checks_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TlsReason {
    /// The server name equals the CONNECT host.
    Exact,
    /// The server name is allowed by the rule that allowed the CONNECT (`tls.sni = "same-rule"`).
    SameRule,
    /// `tls.sni = "off"`: the name was not checked.
    Off,
    /// A CONNECT to an address, with no server name or that same address.
    IpLiteral,
    /// No server name, and the deciding rule says `allow_missing_sni = true`.
    MissingSniAllowed,
    /// Not a ClientHello, and the deciding rule says `protocol = "any"`.
    AnyProtocol,
    /// The server name is not the host the client was allowed to reach.
    SniMismatch,
    /// A ClientHello without a server name on a hostname CONNECT.
    SniMissing,
    /// The client's first bytes are not TLS.
    NotTls,
    /// TLS, but not a well-formed ClientHello of at most 64 KiB.
    ClientHelloInvalid,
    /// An Encrypted ClientHello, and `tls.ech = "deny"`.
    EchDenied,
    /// No complete ClientHello within `tls.client_hello_timeout`.
    ClientHelloTimeout,
    /// The client closed before a complete ClientHello.
    ClientClosed,
}

// === impl TlsCheck ===

impl TlsCheck {
    /// Is the tunnel to be closed now?
    pub fn closes(&self) -> bool {
        self.verdict == Verdict::Deny || self.reason == TlsReason::ClientClosed
    }

    /// The access log's `error` kind of a tunnel this check closes: the failure's log-only
    /// kind, or `client-aborted` when the client left first. `None` when the tunnel goes on
    /// (it passed, or failed under a `report` rule).
    pub fn error_kind(&self) -> Option<ErrorKind> {
        match self.reason {
            TlsReason::ClientClosed => Some(ErrorKind::ClientAborted),
            reason if self.verdict == Verdict::Deny => reason.error_kind(),
            _ => None,
        }
    }
}

impl fmt::Display for TlsCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.verdict, self.reason)
    }
}

// === impl TlsReason ===

impl TlsReason {
    pub const ALL: [TlsReason; 13] = [
        TlsReason::Exact,
        TlsReason::SameRule,
        TlsReason::Off,
        TlsReason::IpLiteral,
        TlsReason::MissingSniAllowed,
        TlsReason::AnyProtocol,
        TlsReason::SniMismatch,
        TlsReason::SniMissing,
        TlsReason::NotTls,
        TlsReason::ClientHelloInvalid,
        TlsReason::EchDenied,
        TlsReason::ClientHelloTimeout,
        TlsReason::ClientClosed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TlsReason::Exact => "exact",
            TlsReason::SameRule => "same-rule",
            TlsReason::Off => "off",
            TlsReason::IpLiteral => "ip-literal",
            TlsReason::MissingSniAllowed => "missing-sni-allowed",
            TlsReason::AnyProtocol => "any-protocol",
            TlsReason::SniMismatch => "sni-mismatch",
            TlsReason::SniMissing => "sni-missing",
            TlsReason::NotTls => "not-tls",
            TlsReason::ClientHelloInvalid => "client-hello-invalid",
            TlsReason::EchDenied => "ech-denied",
            TlsReason::ClientHelloTimeout => "client-hello-timeout",
            TlsReason::ClientClosed => "client-closed",
        }
    }

    /// Would this close the tunnel under an `allow` rule?
    pub fn is_failure(self) -> bool {
        matches!(
            self,
            TlsReason::SniMismatch
                | TlsReason::SniMissing
                | TlsReason::NotTls
                | TlsReason::ClientHelloInvalid
                | TlsReason::EchDenied
                | TlsReason::ClientHelloTimeout
        )
    }

    /// The log-only error kind of a failure (`None` for the reasons that pass).
    pub fn error_kind(self) -> Option<ErrorKind> {
        Some(match self {
            TlsReason::SniMismatch => ErrorKind::SniMismatch,
            TlsReason::SniMissing => ErrorKind::SniMissing,
            TlsReason::NotTls => ErrorKind::NotTls,
            TlsReason::ClientHelloInvalid => ErrorKind::ClientHelloInvalid,
            TlsReason::EchDenied => ErrorKind::EchDenied,
            TlsReason::ClientHelloTimeout => ErrorKind::ClientHelloTimeout,
            _ => return None,
        })
    }

    /// Index in [`TlsReason::ALL`] (for metric arrays).
    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for TlsReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// === impl TlsPolicy (check) ===

impl TlsPolicy {
    /// Decide on what the client sent into `tunnel`.
    pub fn check(&self, tunnel: &Tunnel<'_>, outcome: &HelloOutcome) -> TlsCheck {
        let options = tunnel.policy.tunnel_options(tunnel.decision);
        let reason = match outcome {
            HelloOutcome::Hello(hello) => {
                self.check_hello(tunnel, hello, options.allow_missing_sni)
            }
            _ if options.any_protocol => TlsReason::AnyProtocol,
            HelloOutcome::NotTls | HelloOutcome::FarEndFirst => TlsReason::NotTls,
            HelloOutcome::Invalid(_) => TlsReason::ClientHelloInvalid,
            HelloOutcome::Timeout => TlsReason::ClientHelloTimeout,
            HelloOutcome::Closed => TlsReason::ClientClosed,
        };
        let verdict = match (reason.is_failure(), tunnel.decision.verdict) {
            (false, _) => Verdict::Allow,
            (true, Verdict::Report) => Verdict::Report,
            (true, _) => Verdict::Deny,
        };
        TlsCheck { verdict, reason }
    }

    /// The name check, then the ECH gate.
    fn check_hello(
        &self,
        tunnel: &Tunnel<'_>,
        hello: &ClientHello,
        allow_missing: bool,
    ) -> TlsReason {
        let name = match (self.sni, tunnel.host, &hello.server_name) {
            (SniMode::Off, _, _) => TlsReason::Off,
            // An address is never upgraded by a name: no name, or the same address, only.
            (_, Host::Ip(_), None) => TlsReason::IpLiteral,
            (_, Host::Ip(ip), Some(Host::Ip(named))) if ip == named => TlsReason::IpLiteral,
            (_, Host::Ip(_), Some(_)) => TlsReason::SniMismatch,
            (_, Host::Name(_), None) if allow_missing => TlsReason::MissingSniAllowed,
            (_, Host::Name(_), None) => TlsReason::SniMissing,
            (_, connect, Some(named)) if connect == named => TlsReason::Exact,
            (SniMode::SameRule, _, Some(named @ Host::Name(_)))
                if self.same_rule(tunnel, named) =>
            {
                TlsReason::SameRule
            }
            (_, Host::Name(_), Some(_)) => TlsReason::SniMismatch,
        };
        if !name.is_failure() && hello.ech && self.ech == EchMode::Deny {
            return TlsReason::EchDenied;
        }
        name
    }

    /// Lines for `kalmar explain --sni NAME`: what the check would decide for a ClientHello
    /// naming `sni` (`""`: no server name) in `tunnel`.
    pub fn explain(&self, tunnel: &Tunnel<'_>, sni: &str) -> String {
        let settings = format!(
            "tls.sni = {}, tls.ech = {}, tls.ports {}",
            self.sni.as_str(),
            self.ech.as_str(),
            self.ports_text()
        );
        let shown = if sni.is_empty() {
            "a ClientHello without a server name".to_owned()
        } else {
            format!("server name {sni:?}")
        };
        let line = if !tunnel.decision.is_allowed() {
            "not reached: the CONNECT itself is denied".to_owned()
        } else if !self.applies(tunnel.port) {
            format!("not checked: port {} is not in tls.ports", tunnel.port)
        } else {
            let outcome = if sni.is_empty() {
                HelloOutcome::Hello(ClientHello::default())
            } else {
                match super::client_hello::normalize_server_name(sni.as_bytes()) {
                    Some(name) => HelloOutcome::Hello(ClientHello {
                        server_name: Some(name),
                        ..ClientHello::default()
                    }),
                    None => HelloOutcome::Invalid(super::client_hello::Invalid::ServerName),
                }
            };
            let check = self.check(tunnel, &outcome);
            match (check.verdict, check.reason.error_kind()) {
                (Verdict::Deny, Some(kind)) => {
                    format!("{check}: the tunnel would be closed and logged as {kind}")
                }
                (_, Some(_)) => format!("{check}: relayed (report rule) and counted"),
                _ => format!("{check}: relayed"),
            }
        };
        format!("tls          {settings}\ntls check    {shown}: {line}\n")
    }

    /// `same-rule`: the deciding rule's destination covers `named`, and the policy, asked about
    /// `named` for the same client and port, allows it (no earlier deny rule catches it).
    fn same_rule(&self, tunnel: &Tunnel<'_>, named: &Host) -> bool {
        let method = http::Method::CONNECT;
        let dst = Destination {
            host: named,
            port: tunnel.port,
            method: &method,
            protocol: Protocol::Connect,
        };
        tunnel
            .policy
            .same_rule_allows(tunnel.identity, tunnel.decision, &dst)
    }
}

#[cfg(test)]
mod tests;
