//! Access control: who a client is (source CIDR → labels), what it may reach (ordered label rules), and the SSRF guard.
//!
//! Pure policy logic: no I/O on the request path, no DNS. The core compiles a [`Policy`] from the
//! config (reading the sources file), keeps it in an `ArcSwap`, and per request calls, in order:
//!
//! 1. [`Policy::identify`] — longest-prefix match of the client address in the source table;
//! 2. [`Policy::authorize`] — rules, ports, and literal-address destinations;
//! 3. [`Policy::check_address`] — on every address it is about to dial, after DNS.
//!
//! # Semantics
//! - **Sources.** Longest prefix wins; an IPv4-mapped client address is looked up as IPv4. A prefix
//!   defined twice (config or sources file) is a config error. A client in no entry is *unknown*:
//!   denied with `unknown-source` (default), or with `unknown_source = "allow"` evaluated as a source
//!   with no labels — an empty selector still does not match it (target it with e.g.
//!   `{key = "team", operator = "DoesNotExist"}`). An empty sources file is an error (`[]` is not).
//! - **Rules.** Ordered, first match wins, default deny. A rule matches when its selector, its
//!   destination, its ports, its methods and its protocol all match.
//!   - Selectors have Kubernetes semantics; an empty selector matches every known source.
//!   - `domains` match names only, `cidrs` match literal addresses only (a name never matches a
//!     `cidrs` rule, whatever it resolves to: the address check after DNS is the SSRF guard's job,
//!     and `allow_cidrs` is how a rule opens internal ranges for names). A rule with neither matches
//!     any destination. Patterns: `example.com` exact; `*.example.com` any subdomain at any depth
//!     but **not** the apex (list both to get both); a `*` label inside (`api.*.example.com`) is
//!     exactly one label; `*` alone is any name. A leading `.` is rejected as ambiguous.
//!   - Ports: an `allow`/`report` rule without `ports` only matches the protocol's default ports
//!     (`connect_ports` for CONNECT, `http_ports` for plain HTTP); a rule that lists `ports` matches
//!     exactly those, which is how a port outside the defaults is opened. A `deny` rule without
//!     `ports` matches every port. When no rule matches, the reason is `port-not-allowed` if the port
//!     is outside the defaults, else `default-deny`.
//!   - `methods` match the request method; a tunnel's method is `CONNECT`.
//!   - `protocol`: `connect` (tunnels only), `http` (plain HTTP only), `any` (both, and the
//!     tunnel ClientHello check in `src/tls` lets bytes that are not TLS through); absent: both.
//!     `allow_missing_sni = true`: the rule's tunnels may send a ClientHello without a server
//!     name. Both are read by the TLS check through [`Policy::tunnel_options`]; `allow_missing_sni`
//!     on a deny rule or with `protocol = "http"` is a config error (it would mean nothing).
//!   - `report` grants access like `allow` (verdict `report`: allowed, logged and counted as
//!     "would deny"); scope it as you would an allow rule.
//! - **Destinations.** A literal address (and every address the core resolves) is denied when it,
//!   or the IPv4 address it embeds (mapped, compatible, SIIT, NAT64 `64:ff9b::/96`), falls in
//!   `denied_cidrs` or `cluster_cidrs`, unless an explicit allow (`allowed_cidrs`, or the deciding
//!   rule's `allow_cidrs`) is at least as specific as the denied range that matched: explicit
//!   allows open exactly what they name, never a more specific denied range inside them
//!   (`allowed_cidrs = ["10.0.0.0/8"]` leaves a `cluster_cidrs` `10.96.0.0/12` closed). The guard
//!   is not subject to `report`. A deny rule decides before the address is looked at, so denials
//!   do not tell whether an address is internal.
//! - **Config.** `denied_cidrs`, when set, replaces the default list ([`DEFAULT_DENIED_CIDRS`]);
//!   `cluster_cidrs` add to it. Prefixes with host bits set are errors; a bare address is its /32
//!   or /128. Label values written as booleans or numbers are read as strings. Every error names
//!   the key and the value: `rules[2].to.ports: invalid port range "90-80"`.
//! - **Cost.** `identify` probes one hash map per distinct prefix length. `authorize` does not scan
//!   the rules: they are indexed by destination (exact name, `*.suffix`, inner wildcards, CIDR) and
//!   by a label pair every selected source must carry; only candidates from the smaller side are
//!   checked, on labels interned per compiled policy.

mod address;
mod config;
mod decision;
mod explain;
mod host;
mod identity;
mod prefix;
mod rules;
mod selector;
mod workload;

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

pub use address::{AddressDenied, DEFAULT_DENIED_CIDRS, embedded_ipv4, normalize_addr};
pub use config::{
    AclConfigError, Action, DestinationsConfig, ExpressionConfig, Operator, PortSpec, Problem,
    RateLimitConfig, RuleConfig, RuleProtocol, SAFE_PORTS, SelectorConfig, SourceEntry, ToConfig,
    UnknownSource,
};
pub use decision::{Decision, Reason, Verdict};
pub use host::{Host, HostError, normalize_host, parse_ipv4_numeric};
pub use identity::Identity;
pub use selector::Selector;
pub use workload::{
    Labels, NAMESPACE_NAME_LABEL, NODE_NAME_LABEL, NODE_SOURCE_LABEL, NODE_SOURCE_VALUE,
    NodeIdentity, PodIdentity, Workload, WorkloadHasher, WorkloadIndex, namespace_name_labels,
    workload_map,
};

use address::AddressTable;
use config::check_net;
use identity::SourceTable;
use ipnet::IpNet;
pub use rules::PortSet;
use rules::RuleSet;

/// How the client asked: a CONNECT tunnel or a plain-HTTP request with an absolute URI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Connect,
    Http,
}

/// What the client asked for.
#[derive(Debug, Clone, Copy)]
pub struct Destination<'a> {
    pub host: &'a Host,
    pub port: u16,
    pub method: &'a http::Method,
    pub protocol: Protocol,
}

/// What the deciding rule lets a tunnel do at the TLS check (`src/tls`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TunnelOptions {
    /// `to.allow_missing_sni = true`: a ClientHello without a server name passes.
    pub allow_missing_sni: bool,
    /// `to.protocol = "any"`: bytes that are not TLS pass.
    pub any_protocol: bool,
}

/// The ACL sections of the whole config.
#[derive(Debug, Clone, Copy)]
pub struct AclConfig<'a> {
    pub sources: &'a [SourceEntry],
    pub rules: &'a [RuleConfig],
    pub destinations: &'a DestinationsConfig,
}

/// The compiled, immutable policy. Swap a new one in on reload.
#[derive(Debug)]
pub struct Policy {
    sources: SourceTable,
    rules: RuleSet,
    addresses: AddressTable,
    connect_ports: PortSet,
    http_ports: PortSet,
    unknown_source: UnknownSource,
    /// Unique per compiled policy: identities carry it to use the interned-label fast path.
    generation: u64,
}

/// Source of [`Policy`] generations (0 is "no policy").
static GENERATION: AtomicU64 = AtomicU64::new(1);

/// A decision with the index of the deciding rule (for `explain`).
struct Evaluation {
    decision: Decision,
    rule_index: Option<usize>,
}

// === impl Protocol ===

impl Protocol {
    pub fn as_str(&self) -> &'static str {
        match self {
            Protocol::Connect => "connect",
            Protocol::Http => "http",
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

// === impl Policy ===

impl Policy {
    /// Validates and compiles; reads `file` source entries from disk (blocking I/O).
    pub fn compile(cfg: &AclConfig) -> Result<Policy, AclConfigError> {
        let d = cfg.destinations;
        let nets = |key: &str, list: &[IpNet]| -> Result<Vec<IpNet>, AclConfigError> {
            list.iter()
                .enumerate()
                .map(|(i, n)| check_net(&format!("destinations.{key}[{i}]"), *n))
                .collect()
        };
        let addresses = AddressTable::new(
            &nets("denied_cidrs", &d.denied_cidrs)?,
            &nets("cluster_cidrs", &d.cluster_cidrs)?,
            &nets("allowed_cidrs", &d.allowed_cidrs)?,
        );
        let connect_ports = PortSet::parse(&d.connect_ports, "destinations.connect_ports")?;
        let http_ports = PortSet::parse(&d.http_ports, "destinations.http_ports")?;
        let rules = RuleSet::compile(cfg.rules)?;
        let generation = GENERATION.fetch_add(1, Ordering::Relaxed);
        let sources = SourceTable::compile(cfg.sources, &rules.interner, generation)?;
        Ok(Policy {
            sources,
            rules,
            addresses,
            connect_ports,
            http_ports,
            unknown_source: d.unknown_source,
            generation,
        })
    }

    /// The sources files this policy was built from; the core polls their mtimes to reload.
    pub fn watched_files(&self) -> &[PathBuf] {
        self.sources.files()
    }

    /// Longest-prefix match of the client address; IPv4-mapped IPv6 is looked up as IPv4.
    pub fn identify(&self, client: IpAddr) -> Identity {
        self.sources.identify(client)
    }

    /// The lookup order for a client given what the live index holds for its address: a pod
    /// wins; an address two pods claim is unknown (never a guess, never the static table); else
    /// the static sources; else the node owning the address; else unknown.
    pub fn identify_with(&self, client: IpAddr, live: Option<&Workload>) -> Identity {
        match live {
            Some(Workload::Pod(pod)) => Identity::pod(pod.clone()),
            Some(Workload::Conflict) => Identity::unknown(),
            Some(Workload::Node(node)) => {
                let id = self.sources.identify(client);
                if id.is_known() {
                    id
                } else {
                    Identity::node(node.clone())
                }
            }
            None => self.sources.identify(client),
        }
    }

    /// Rules, ports and literal-address destinations. Does no DNS: for a name, the core runs
    /// [`Policy::check_address`] on the resolved addresses.
    pub fn authorize(&self, id: &Identity, dst: &Destination) -> Decision {
        self.evaluate(id, dst).decision
    }

    /// The SSRF guard, for every address the core is about to dial. Normalises IPv4-mapped,
    /// IPv4-compatible and NAT64 forms itself too. Uses the deciding rule's `allow_cidrs`; the
    /// core only dials after an allowing decision.
    pub fn check_address(&self, decision: &Decision, addr: IpAddr) -> Result<(), AddressDenied> {
        self.addresses.check(addr, decision.allow.as_deref())
    }

    /// The tunnel options of the rule that made `decision` (a decision of this policy);
    /// none when no rule decided.
    pub fn tunnel_options(&self, decision: &Decision) -> TunnelOptions {
        self.deciding_rule(decision)
            .map(|rule| rule.tunnel)
            .unwrap_or_default()
    }

    /// For `tls.sni = "same-rule"`: does the rule that made `decision` (a decision of this
    /// policy) also cover `dst`, a server name, and does the policy allow `dst` for `id` (no
    /// earlier deny rule catches the name)? Ports, methods and protocol are those of the CONNECT.
    pub fn same_rule_allows(&self, id: &Identity, decision: &Decision, dst: &Destination) -> bool {
        self.deciding_rule(decision)
            .is_some_and(|rule| rule.matches_destination(dst.host))
            && self.authorize(id, dst).is_allowed()
    }

    fn deciding_rule(&self, decision: &Decision) -> Option<&rules::Rule> {
        let index = usize::try_from(decision.rule_index?).ok()?;
        self.rules.rules.get(index)
    }

    pub fn unknown_source(&self) -> UnknownSource {
        self.unknown_source
    }

    /// Number of source prefixes.
    pub fn source_count(&self) -> usize {
        self.sources.len()
    }

    pub fn rule_count(&self) -> usize {
        self.rules.rules.len()
    }

    fn default_ports(&self, protocol: Protocol) -> &PortSet {
        match protocol {
            Protocol::Connect => &self.connect_ports,
            Protocol::Http => &self.http_ports,
        }
    }

    fn evaluate(&self, id: &Identity, dst: &Destination) -> Evaluation {
        if !id.is_known() && self.unknown_source == UnknownSource::Deny {
            return Evaluation {
                decision: Decision::deny(Reason::UnknownSource, None),
                rule_index: None,
            };
        }
        let default_ports = self.default_ports(dst.protocol);
        let Some(index) = self
            .rules
            .first_match(id, self.generation, dst, default_ports)
        else {
            let reason = if default_ports.contains(dst.port) {
                Reason::DefaultDeny
            } else {
                Reason::PortNotAllowed
            };
            return Evaluation {
                decision: Decision::deny(reason, None),
                rule_index: None,
            };
        };
        let Some(rule) = self.rules.rules.get(index) else {
            return Evaluation {
                decision: Decision::deny(Reason::DefaultDeny, None),
                rule_index: None,
            };
        };
        let name = Some(rule.name.clone());
        let verdict = match rule.action {
            Action::Deny => {
                return Evaluation {
                    decision: Decision::deny(Reason::Rule, name),
                    rule_index: Some(index),
                };
            }
            Action::Allow => Verdict::Allow,
            Action::Report => Verdict::Report,
        };
        let mut decision = Decision {
            verdict,
            rule: name,
            reason: Reason::Rule,
            denied_address: None,
            allow: rule.allow.clone(),
            rule_index: u32::try_from(index).ok(),
        };
        if let Host::Ip(ip) = dst.host
            && let Err(denied) = self.check_address(&decision, *ip)
        {
            decision.verdict = Verdict::Deny;
            decision.reason = Reason::InternalDestination;
            decision.denied_address = Some(denied);
        }
        Evaluation {
            decision,
            rule_index: Some(index),
        }
    }
}

#[cfg(test)]
mod tests;
