//! `kalmar explain`: the policy's reasoning for one source and target, as text for operators.

use std::fmt::Write as _;
use std::net::IpAddr;

use super::address::{Classified, Mark};
use super::{Decision, Destination, Host, Identity, Policy, Reason, UnknownSource};

// === impl Policy (explain) ===

impl Policy {
    /// Multi-line text for `kalmar explain --from IP TARGET`: the source's entry and labels, the
    /// deciding rule, the decision and its reason, and for a name each resolved address (the core
    /// resolves; an empty `resolved` for a name means resolution failed).
    pub fn explain(&self, client: IpAddr, dst: &Destination, resolved: &[IpAddr]) -> String {
        self.explain_identity(client, &self.identify(client), dst, resolved)
    }

    /// As [`Policy::explain`], for an identity the caller found (a live pod or node).
    pub fn explain_identity(
        &self,
        client: IpAddr,
        id: &Identity,
        dst: &Destination,
        resolved: &[IpAddr],
    ) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "source       {client}");
        if let Some(pod) = id.as_pod() {
            let _ = writeln!(out, "pod          {} (kubernetes)", pod.full_name());
            let _ = writeln!(out, "labels       {id}");
            let _ = writeln!(
                out,
                "namespace    {} {}",
                pod.namespace,
                join_labels(&pod.namespace_labels)
            );
            let _ = writeln!(
                out,
                "account      {}/{}",
                pod.namespace, pod.service_account
            );
            let _ = writeln!(out, "node         {}", pod.node.as_deref().unwrap_or("-"));
        } else if let Some(node) = id.as_node() {
            let _ = writeln!(out, "node         {} (kubernetes)", node.name);
            let _ = writeln!(out, "labels       {id}");
        }
        match (id.origin(), id.cidr()) {
            _ if id.as_pod().is_some() || id.as_node().is_some() => {}
            (Some(origin), Some(cidr)) => {
                let name = id.name().map(|n| format!(" {n:?}")).unwrap_or_default();
                let _ = writeln!(out, "entry        {origin}{name} {cidr}");
                let _ = writeln!(out, "labels       {id}");
            }
            _ => {
                let _ = writeln!(
                    out,
                    "entry        none: unknown source (destinations.unknown_source = {})",
                    self.unknown_source.as_str()
                );
            }
        }
        let ports = self.default_ports(dst.protocol);
        let target = match dst.host {
            Host::Ip(IpAddr::V6(a)) => format!("[{a}]:{}", dst.port),
            host => format!("{host}:{}", dst.port),
        };
        let _ = writeln!(
            out,
            "request      {} {target} ({}, default ports {ports})",
            dst.method, dst.protocol
        );

        let eval = self.evaluate(id, dst);
        let decision = &eval.decision;
        match eval
            .rule_index
            .and_then(|i| self.rules.rules.get(i).map(|r| (i, r)))
        {
            Some((i, rule)) => {
                let _ = writeln!(
                    out,
                    "rule         rules[{i}] {:?} ({})",
                    &*rule.name, rule.action
                );
                let _ = writeln!(out, "  from       {}", rule.selector);
                let _ = writeln!(out, "  to         {}", rule.to_text);
            }
            None if decision.reason == Reason::UnknownSource => {
                let _ = writeln!(out, "rule         not evaluated: unknown source");
            }
            None if decision.reason == Reason::PortNotAllowed => {
                let _ = writeln!(
                    out,
                    "rule         none matched; port {} is not a default {} port and no matching rule lists it",
                    dst.port, dst.protocol
                );
            }
            None => {
                let _ = writeln!(
                    out,
                    "rule         none of {} rules matched",
                    self.rules.rules.len()
                );
            }
        }
        let _ = writeln!(out, "decision     {decision}");
        if let Some(denied) = &decision.denied_address {
            let _ = writeln!(out, "address      {denied}");
        }

        let mut verdict = format!("{} ({})", decision.verdict, decision.reason);
        if decision.is_allowed()
            && matches!(dst.host, Host::Name(_))
            && let Some(changed) = self.explain_addresses(&mut out, decision, resolved)
        {
            verdict = changed;
        }
        if let (UnknownSource::Allow, false) = (self.unknown_source, id.is_known()) {
            let _ = writeln!(
                out,
                "note         unknown sources are evaluated with no labels"
            );
        }
        let _ = writeln!(out, "verdict      {verdict}");
        out
    }

    /// One line per resolved address; returns the changed verdict when no address is usable.
    fn explain_addresses(
        &self,
        out: &mut String,
        decision: &Decision,
        resolved: &[IpAddr],
    ) -> Option<String> {
        if resolved.is_empty() {
            return Some("deny (dns-failure: no address to check)".into());
        }
        let mut first_denial = None;
        for addr in resolved {
            let line = match self.addresses.classify(*addr, decision.allow.as_deref()) {
                Classified::Public => "ok".to_string(),
                Classified::Opened {
                    range,
                    by_rule: true,
                } => format!("ok, opened by the rule's allow_cidrs {range}"),
                Classified::Opened {
                    range,
                    by_rule: false,
                } => {
                    format!("ok, opened by destinations.allowed_cidrs {range}")
                }
                Classified::Denied { denied, mark } => {
                    let list = match mark {
                        Mark::Cluster => "destinations.cluster_cidrs",
                        Mark::Denied | Mark::Allowed => "destinations.denied_cidrs",
                    };
                    let line = format!("denied by {list} {}", denied.range);
                    first_denial.get_or_insert(denied);
                    line
                }
            };
            let _ = writeln!(out, "address      {addr}: {line}");
        }
        let all_denied = resolved
            .iter()
            .all(|a| self.check_address(decision, *a).is_err());
        match first_denial {
            Some(denied) if all_denied => {
                let _ = writeln!(out, "message      {denied}");
                Some(format!("deny ({})", Reason::InternalDestination))
            }
            _ => None,
        }
    }
}

/// `k=v,k2=v2`, `-` when empty.
fn join_labels(labels: &super::Labels) -> String {
    if labels.is_empty() {
        return "-".into();
    }
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}
