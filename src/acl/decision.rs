//! The outcome of authorizing a request: a verdict with a bounded reason, and what the SSRF guard needs.

use std::fmt;
use std::sync::Arc;

use super::address::{AddressDenied, AllowList};
use super::host::clip;
use crate::error::ErrorKind;

/// An authorization decision. `rule` is the rule that matched, if any (also on a
/// `internal-destination` denial, where the rule allowed but the address did not).
#[derive(Debug, Clone)]
pub struct Decision {
    pub verdict: Verdict,
    pub rule: Option<Arc<str>>,
    pub reason: Reason,
    /// For `internal-destination` on a literal address: which address and range.
    pub denied_address: Option<AddressDenied>,
    /// The deciding rule's `allow_cidrs`, for [`super::Policy::check_address`].
    pub(crate) allow: Option<Arc<AllowList>>,
    /// The deciding rule's index in the policy that decided (for the tunnel TLS check).
    pub(crate) rule_index: Option<u32>,
}

/// What happens to the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    Allow,
    Deny,
    /// Allowed, but logged and counted as "would deny" (a `report` rule matched).
    Report,
}

/// Why; a bounded set, used as a log field and a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// A rule matched and its action decided.
    Rule,
    /// No rule matched.
    DefaultDeny,
    /// The client is in no source entry and `destinations.unknown_source` is `deny`.
    UnknownSource,
    /// No rule matched and the port is not among the protocol's default ports.
    PortNotAllowed,
    /// The destination address is in a denied range.
    InternalDestination,
}

// === impl Decision ===

impl Decision {
    pub(crate) fn deny(reason: Reason, rule: Option<Arc<str>>) -> Self {
        Self {
            verdict: Verdict::Deny,
            rule,
            reason,
            denied_address: None,
            allow: None,
            rule_index: None,
        }
    }

    pub fn is_allowed(&self) -> bool {
        self.verdict.is_allowed()
    }

    /// The `X-Kalmar-Error` kind of a denial: `unknown-source`, `port-not-allowed`,
    /// `internal-destination`, or `denied` (a deny rule or the default deny). `None` when allowed.
    pub fn error_kind(&self) -> Option<ErrorKind> {
        if self.is_allowed() {
            return None;
        }
        Some(match self.reason {
            Reason::UnknownSource => ErrorKind::UnknownSource,
            Reason::PortNotAllowed => ErrorKind::PortNotAllowed,
            Reason::InternalDestination => ErrorKind::InternalDestination,
            Reason::Rule | Reason::DefaultDeny => ErrorKind::Denied,
        })
    }

    /// The client-facing text of a denial, about `authority` (what the client asked for, clipped).
    /// It names no rule and nothing the client did not ask for; an internal literal address
    /// gets the address, its range and the NO_PROXY hint. Empty when allowed.
    pub fn message(&self, authority: &str) -> String {
        let authority = clip(authority);
        if self.is_allowed() {
            return String::new();
        }
        match (self.reason, &self.denied_address) {
            (Reason::InternalDestination, Some(denied)) => format!("{authority}: {denied}"),
            (Reason::InternalDestination, None) => {
                format!("{authority}: internal destinations are not reachable through this proxy")
            }
            (Reason::UnknownSource, _) => {
                format!("{authority}: this client's address is not a known source of this proxy")
            }
            (Reason::PortNotAllowed, _) => {
                format!("{authority}: this port is not allowed through this proxy")
            }
            (Reason::Rule | Reason::DefaultDeny, _) => {
                format!("{authority}: denied by the proxy's access policy for this client")
            }
        }
    }

    /// The rule name for logs, `-` when none decided.
    pub fn rule_name(&self) -> &str {
        self.rule.as_deref().unwrap_or("-")
    }
}

/// `verdict (reason, rule NAME)`.
impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (reason: {}", self.verdict, self.reason)?;
        if let Some(rule) = &self.rule {
            write!(f, ", rule: {rule}")?;
        }
        f.write_str(")")
    }
}

// === impl Verdict ===

impl Verdict {
    pub fn as_str(&self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
            Verdict::Report => "report",
        }
    }

    /// Allow and Report let the request through.
    pub fn is_allowed(&self) -> bool {
        matches!(self, Verdict::Allow | Verdict::Report)
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// === impl Reason ===

impl Reason {
    pub const ALL: [Reason; 5] = [
        Reason::Rule,
        Reason::DefaultDeny,
        Reason::UnknownSource,
        Reason::PortNotAllowed,
        Reason::InternalDestination,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            Reason::Rule => "rule",
            Reason::DefaultDeny => "default-deny",
            Reason::UnknownSource => "unknown-source",
            Reason::PortNotAllowed => "port-not-allowed",
            Reason::InternalDestination => "internal-destination",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
