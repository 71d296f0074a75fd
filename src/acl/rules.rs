//! Ordered rules (first match wins) and the indexes that find the first match among thousands.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use http::Method;
use ipnet::IpNet;
use smallvec::SmallVec;

use super::address::{AllowList, embedded_ipv4};
use super::config::{
    AclConfigError, Action, PortSpec, Problem, RuleConfig, RuleProtocol, check_name, check_net,
};
use super::host::{HostError, validate_label};
use super::prefix::{FastBuild, PrefixMap};
use super::selector::{CompactLabels, CompactSelector, LabelInterner, Selector};
use super::{Destination, Host, Identity, Protocol, TunnelOptions};

/// A set of ports: sorted, merged inclusive ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortSet {
    ranges: Vec<(u16, u16)>,
}

/// A domain pattern: optional leading `*` (one or more labels), then labels that are literal or `*`
/// (exactly one label).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Pattern {
    leading_any: bool,
    labels: Vec<Label>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Label {
    Lit(Box<str>),
    Any,
}

/// Domain patterns indexed for lookup by name, each with a value (rule ids, or `()`).
#[derive(Debug, Clone)]
pub(crate) struct DomainIndex<V> {
    /// `example.com`.
    exact: HashMap<Box<str>, V, FastBuild>,
    /// `*.example.com`, keyed by `example.com`.
    suffix: HashMap<Box<str>, V, FastBuild>,
    /// Patterns with `*` inside, keyed by the literal labels after the last `*`.
    tailed: HashMap<Box<str>, Vec<(Pattern, V)>, FastBuild>,
    /// Patterns ending in `*` (and `*` itself).
    untailed: Vec<(Pattern, V)>,
    len: usize,
}

/// One compiled rule.
#[derive(Debug)]
pub(crate) struct Rule {
    pub(crate) name: Arc<str>,
    pub(crate) action: Action,
    pub(crate) selector: Selector,
    /// `selector` over the rule set's interned labels.
    compact: CompactSelector,
    /// `None` with `cidrs` also `None`: any destination.
    domains: Option<DomainIndex<()>>,
    cidrs: Option<PrefixMap<()>>,
    /// Explicit ports; `None`: the protocol's default ports (allow, report) or any port (deny).
    pub(crate) ports: Option<PortSet>,
    /// Empty: any method.
    methods: Vec<Method>,
    protocol: Option<Protocol>,
    /// What this rule lets its tunnels do at the TLS check.
    pub(crate) tunnel: TunnelOptions,
    pub(crate) allow: Option<Arc<AllowList>>,
    /// The `to` part as configured, for `explain`.
    pub(crate) to_text: String,
}

/// All rules in order, with a destination index and a source index over them.
///
/// A decision needs the first rule (lowest index) that matches. Both indexes return, as a few
/// sorted lists of rule ids, a superset of the rules that can match: the destination index by the
/// name's exact/suffix/wildcard patterns or the address's prefixes, the source index by the label
/// pair every source a rule selects must carry (its "anchor"). The smaller side is merged in
/// order and each candidate fully checked, so the cost depends on how many rules could apply to
/// this source or this destination, not on the size of the policy.
#[derive(Debug, Default)]
pub(crate) struct RuleSet {
    pub(crate) rules: Vec<Rule>,
    by_domain: DomainIndex<Vec<u32>>,
    by_cidr: PrefixMap<Vec<u32>>,
    /// Rules without domains and cidrs.
    any_destination: Vec<u32>,
    /// Interned (label key, value) → rules anchored on that pair.
    by_label: HashMap<u64, Vec<u32>, FastBuild>,
    /// Rules without an anchor (empty selectors, only NotIn/Exists/DoesNotExist).
    unanchored: Vec<u32>,
    /// The label keys and values the selectors mention.
    pub(crate) interner: LabelInterner,
}

/// How the source of a request is matched against selectors.
#[derive(Debug, Clone, Copy)]
pub(crate) enum SourceView<'a> {
    /// Labels interned for this rule set, and whether the source is known (the fast path).
    Compact(&'a CompactLabels, bool),
    /// An identity from another policy or built by hand: string labels.
    Strings(&'a Identity),
}

// === impl PortSet ===

impl PortSet {
    /// Parses `443`, `"8000-8100"`; `key` names the list in errors.
    pub fn parse(specs: &[PortSpec], key: &str) -> Result<Self, AclConfigError> {
        let mut ranges = Vec::with_capacity(specs.len());
        for spec in specs {
            let text = spec.0.trim();
            let range = match text.split_once('-') {
                Some((lo, hi)) => {
                    let bad =
                        || AclConfigError::new(key, Problem::InvalidPortRange(spec.0.clone()));
                    let lo = parse_port(lo).ok_or_else(bad)?;
                    let hi = parse_port(hi).ok_or_else(bad)?;
                    if lo > hi {
                        return Err(bad());
                    }
                    (lo, hi)
                }
                None => {
                    let port = parse_port(text).ok_or_else(|| {
                        AclConfigError::new(key, Problem::InvalidPort(spec.0.clone()))
                    })?;
                    (port, port)
                }
            };
            ranges.push(range);
        }
        ranges.sort_unstable();
        let mut merged: Vec<(u16, u16)> = Vec::with_capacity(ranges.len());
        for (lo, hi) in ranges {
            match merged.last_mut() {
                Some(last) if u32::from(lo) <= u32::from(last.1) + 1 => last.1 = last.1.max(hi),
                _ => merged.push((lo, hi)),
            }
        }
        Ok(Self { ranges: merged })
    }

    pub fn contains(&self, port: u16) -> bool {
        let at = self.ranges.partition_point(|&(lo, _)| lo <= port);
        at > 0 && self.ranges.get(at - 1).is_some_and(|&(_, hi)| port <= hi)
    }
}

fn parse_port(s: &str) -> Option<u16> {
    let s = s.trim();
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<u16>().ok().filter(|&p| p != 0)
}

impl fmt::Display for PortSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.ranges.is_empty() {
            return f.write_str("none");
        }
        for (i, &(lo, hi)) in self.ranges.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if lo == hi {
                write!(f, "{lo}")?;
            } else {
                write!(f, "{lo}-{hi}")?;
            }
        }
        Ok(())
    }
}

// === impl Pattern ===

impl Pattern {
    /// Parses a domain pattern (lowercased, one trailing dot stripped).
    pub(crate) fn parse(raw: &str) -> Result<Self, String> {
        let lower = raw.trim().to_ascii_lowercase();
        let text = lower.strip_suffix('.').unwrap_or(&lower);
        if text.is_empty() {
            return Err("empty".into());
        }
        if text.starts_with('.') {
            return Err(
                "a leading dot is ambiguous: write `example.com` and/or `*.example.com`".into(),
            );
        }
        if text.len() > 253 {
            return Err("longer than 253 characters".into());
        }
        let mut parts: Vec<&str> = text.split('.').collect();
        let leading_any = parts.first() == Some(&"*");
        if leading_any {
            parts.remove(0);
        }
        let mut labels = Vec::with_capacity(parts.len());
        for part in parts {
            if part == "*" {
                labels.push(Label::Any);
            } else if part.contains('*') {
                return Err(format!("`*` must be a whole label, not part of {part:?}"));
            } else {
                validate_label(part, text).map_err(|e| match e {
                    HostError::InvalidChar { ch, .. } => format!("invalid character {ch:?}"),
                    other => other.to_string(),
                })?;
                labels.push(Label::Lit(part.into()));
            }
        }
        if let Some(Label::Lit(last)) = labels.last()
            && (last.bytes().all(|b| b.is_ascii_digit()) || last.starts_with("0x"))
        {
            return Err("looks like an address: use `cidrs` for addresses".into());
        }
        Ok(Self {
            leading_any,
            labels,
        })
    }

    /// Does the (normalised) name match? Leading `*` needs at least one more label than the rest.
    pub(crate) fn matches(&self, name: &str) -> bool {
        let mut name_labels = name.rsplit('.');
        for label in self.labels.iter().rev() {
            match (name_labels.next(), label) {
                (None, _) => return false,
                (Some(got), Label::Lit(want)) if got != &**want => return false,
                _ => {}
            }
        }
        let more = name_labels.next().is_some();
        more == self.leading_any
    }

    /// The literal labels after the last inner `*`, joined (`example.com` for `api.*.example.com`).
    fn tail(&self) -> String {
        let from = self
            .labels
            .iter()
            .rposition(|l| *l == Label::Any)
            .map_or(0, |i| i + 1);
        self.literal(&self.labels[from..])
    }

    fn literal(&self, labels: &[Label]) -> String {
        labels
            .iter()
            .map(|l| match l {
                Label::Lit(s) => &**s,
                Label::Any => "*",
            })
            .collect::<Vec<_>>()
            .join(".")
    }

    fn has_inner_any(&self) -> bool {
        self.labels.contains(&Label::Any)
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.leading_any, self.labels.is_empty()) {
            (true, true) => f.write_str("*"),
            (true, false) => write!(f, "*.{}", self.literal(&self.labels)),
            (false, _) => f.write_str(&self.literal(&self.labels)),
        }
    }
}

// === impl DomainIndex ===

impl<V> Default for DomainIndex<V> {
    fn default() -> Self {
        Self {
            exact: HashMap::default(),
            suffix: HashMap::default(),
            tailed: HashMap::default(),
            untailed: Vec::new(),
            len: 0,
        }
    }
}

impl<V: Default> DomainIndex<V> {
    /// The value slot for `pattern`, created empty if new.
    pub(crate) fn slot(&mut self, pattern: Pattern) -> &mut V {
        self.len += 1;
        if !pattern.has_inner_any() && !pattern.labels.is_empty() {
            let key: Box<str> = pattern.literal(&pattern.labels).into();
            let map = if pattern.leading_any {
                &mut self.suffix
            } else {
                &mut self.exact
            };
            return map.entry(key).or_default();
        }
        let tail = pattern.tail();
        let list = if tail.is_empty() {
            &mut self.untailed
        } else {
            self.tailed.entry(tail.into()).or_default()
        };
        let at = match list.iter().position(|(p, _)| *p == pattern) {
            Some(at) => at,
            None => {
                list.push((pattern, V::default()));
                list.len() - 1
            }
        };
        &mut list[at].1
    }
}

impl<V> DomainIndex<V> {
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Calls `f` with the value of every pattern that matches `name`.
    pub(crate) fn for_each_match<'a>(&'a self, name: &str, mut f: impl FnMut(&'a V)) {
        if let Some(v) = self.exact.get(name) {
            f(v);
        }
        if !self.suffix.is_empty() || !self.tailed.is_empty() {
            for (i, _) in name.match_indices('.') {
                let rest = &name[i + 1..];
                if let Some(v) = self.suffix.get(rest) {
                    f(v);
                }
                if let Some(list) = self.tailed.get(rest) {
                    for (pattern, v) in list {
                        if pattern.matches(name) {
                            f(v);
                        }
                    }
                }
            }
        }
        for (pattern, v) in &self.untailed {
            if pattern.matches(name) {
                f(v);
            }
        }
    }

    pub(crate) fn matches(&self, name: &str) -> bool {
        let mut found = false;
        self.for_each_match(name, |_| found = true);
        found
    }
}

// === impl Rule ===

impl Rule {
    /// Compiles `rules[index]`.
    fn compile(index: usize, cfg: &RuleConfig) -> Result<Self, AclConfigError> {
        let key = format!("rules[{index}]");
        check_name(&format!("{key}.name"), &cfg.name)?;
        let selector = Selector::compile(&cfg.from, &format!("{key}.from"))?;
        let mut domains = DomainIndex::default();
        for (i, raw) in cfg.to.domains.iter().enumerate() {
            let pattern = Pattern::parse(raw).map_err(|why| {
                AclConfigError::new(
                    format!("{key}.to.domains[{i}]"),
                    Problem::InvalidDomain {
                        pattern: raw.clone(),
                        why,
                    },
                )
            })?;
            domains.slot(pattern);
        }
        let mut cidrs = PrefixMap::new();
        for (i, net) in cfg.to.cidrs.iter().enumerate() {
            cidrs.insert(check_net(&format!("{key}.to.cidrs[{i}]"), *net)?, ());
        }
        let ports = if cfg.to.ports.is_empty() {
            None
        } else {
            Some(PortSet::parse(&cfg.to.ports, &format!("{key}.to.ports"))?)
        };
        let mut methods = Vec::with_capacity(cfg.to.methods.len());
        for (i, m) in cfg.to.methods.iter().enumerate() {
            let method =
                Method::from_bytes(m.trim().to_ascii_uppercase().as_bytes()).map_err(|_| {
                    AclConfigError::new(
                        format!("{key}.to.methods[{i}]"),
                        Problem::InvalidMethod(m.clone()),
                    )
                })?;
            if !methods.contains(&method) {
                methods.push(method);
            }
        }
        let tunnel = TunnelOptions {
            allow_missing_sni: cfg.to.allow_missing_sni,
            any_protocol: cfg.to.protocol == Some(RuleProtocol::Any),
        };
        if cfg.to.allow_missing_sni {
            let no_effect = |why| {
                Err(AclConfigError::new(
                    format!("{key}.to.allow_missing_sni"),
                    Problem::NoEffect(why),
                ))
            };
            if cfg.action == Action::Deny {
                return no_effect("on a deny rule");
            }
            if cfg.to.protocol == Some(RuleProtocol::Http) {
                return no_effect("with protocol = \"http\" (it is about CONNECT tunnels)");
            }
        }
        let mut allow = AllowList::new();
        for (i, net) in cfg.allow_cidrs.iter().enumerate() {
            allow.insert(check_net(&format!("{key}.allow_cidrs[{i}]"), *net)?, ());
        }
        Ok(Self {
            name: Arc::from(cfg.name.as_str()),
            action: cfg.action,
            selector,
            compact: CompactSelector::default(),
            to_text: describe_to(cfg),
            domains: (!domains.is_empty()).then_some(domains),
            cidrs: (!cidrs.is_empty()).then_some(cidrs),
            ports,
            methods,
            protocol: match cfg.to.protocol {
                Some(RuleProtocol::Connect) => Some(Protocol::Connect),
                Some(RuleProtocol::Http) => Some(Protocol::Http),
                Some(RuleProtocol::Any) | None => None,
            },
            tunnel,
            allow: (!allow.is_empty()).then(|| Arc::new(allow)),
        })
    }

    /// Full check of this rule against a request; `default_ports` are the protocol's defaults.
    /// `destination_known`: the caller already knows the destination part matches.
    pub(crate) fn matches(
        &self,
        source: SourceView,
        dst: &Destination,
        default_ports: &PortSet,
        destination_known: bool,
    ) -> bool {
        self.matches_request(dst, default_ports)
            && self.matches_source(source)
            && (destination_known || self.matches_destination(dst.host))
    }

    pub(crate) fn matches_source(&self, source: SourceView) -> bool {
        match source {
            SourceView::Compact(labels, known) => self.compact.matches(labels, known),
            SourceView::Strings(id) => self.selector.matches(id),
        }
    }

    /// Protocol, method and port.
    pub(crate) fn matches_request(&self, dst: &Destination, default_ports: &PortSet) -> bool {
        if self.protocol.is_some_and(|p| p != dst.protocol) {
            return false;
        }
        if !self.methods.is_empty() && !self.methods.contains(dst.method) {
            return false;
        }
        match (&self.ports, self.action) {
            (Some(ports), _) => ports.contains(dst.port),
            (None, Action::Deny) => true,
            (None, Action::Allow | Action::Report) => default_ports.contains(dst.port),
        }
    }

    /// Names match `domains` only, literal addresses `cidrs` only (either the address or the IPv4
    /// address it embeds); a rule with neither matches every destination.
    pub(crate) fn matches_destination(&self, host: &Host) -> bool {
        match (host, &self.domains, &self.cidrs) {
            (_, None, None) => true,
            (Host::Name(name), domains, _) => domains.as_ref().is_some_and(|d| d.matches(name)),
            (Host::Ip(ip), _, cidrs) => cidrs
                .as_ref()
                .is_some_and(|c| address_forms(*ip).any(|a| c.longest(a).is_some())),
        }
    }
}

/// The address itself and the IPv4 address it embeds (mapped, compatible, NAT64).
fn address_forms(ip: IpAddr) -> impl Iterator<Item = IpAddr> {
    let embedded = match ip {
        IpAddr::V6(a) => embedded_ipv4(a).map(IpAddr::V4),
        IpAddr::V4(_) => None,
    };
    std::iter::once(ip).chain(embedded)
}

/// `to` as one line: `domains=[..] cidrs=[..] ports=.. methods=.. protocol=..`.
fn describe_to(cfg: &RuleConfig) -> String {
    let to = &cfg.to;
    let mut parts = Vec::new();
    if !to.domains.is_empty() {
        parts.push(format!("domains=[{}]", to.domains.join(", ")));
    }
    if !to.cidrs.is_empty() {
        let cidrs: Vec<String> = to.cidrs.iter().map(IpNet::to_string).collect();
        parts.push(format!("cidrs=[{}]", cidrs.join(", ")));
    }
    if to.domains.is_empty() && to.cidrs.is_empty() {
        parts.push("any destination".into());
    }
    if to.ports.is_empty() {
        parts.push(match cfg.action {
            Action::Deny => "any port".into(),
            _ => "default ports".into(),
        });
    } else {
        let ports: Vec<String> = to.ports.iter().map(PortSpec::to_string).collect();
        parts.push(format!("ports=[{}]", ports.join(", ")));
    }
    if !to.methods.is_empty() {
        parts.push(format!("methods=[{}]", to.methods.join(", ")));
    }
    if let Some(p) = to.protocol {
        parts.push(format!("protocol={}", p.as_str()));
    }
    if to.allow_missing_sni {
        parts.push("allow_missing_sni".into());
    }
    if !cfg.allow_cidrs.is_empty() {
        let cidrs: Vec<String> = cfg.allow_cidrs.iter().map(IpNet::to_string).collect();
        parts.push(format!("allow_cidrs=[{}]", cidrs.join(", ")));
    }
    parts.join("; ")
}

// === impl RuleSet ===

impl RuleSet {
    pub(crate) fn compile(cfgs: &[RuleConfig]) -> Result<Self, AclConfigError> {
        let mut set = RuleSet::default();
        let mut names: HashMap<&str, usize> = HashMap::new();
        for (index, cfg) in cfgs.iter().enumerate() {
            if let Some(first) = names.insert(cfg.name.as_str(), index) {
                return Err(AclConfigError::new(
                    format!("rules[{index}].name"),
                    Problem::Duplicate {
                        what: "rule name",
                        value: cfg.name.clone(),
                        first: format!("rules[{first}]"),
                    },
                ));
            }
            let mut rule = Rule::compile(index, cfg)?;
            rule.compact = rule.selector.compact(&mut set.interner);
            let id = u32::try_from(index).map_err(|_| {
                AclConfigError::new(
                    format!("rules[{index}]"),
                    Problem::SourceShape("too many rules"),
                )
            })?;
            set.index(id, &rule, cfg);
            set.rules.push(rule);
        }
        Ok(set)
    }

    /// Adds rule `id` to the indexes (ids arrive in increasing order, so every list stays sorted).
    fn index(&mut self, id: u32, rule: &Rule, cfg: &RuleConfig) {
        let push = |list: &mut Vec<u32>| {
            if list.last() != Some(&id) {
                list.push(id);
            }
        };
        if rule.domains.is_none() && rule.cidrs.is_none() {
            push(&mut self.any_destination);
        }
        for raw in &cfg.to.domains {
            if let Ok(pattern) = Pattern::parse(raw) {
                push(self.by_domain.slot(pattern));
            }
        }
        if let Some(cidrs) = &rule.cidrs {
            for (net, _) in cidrs.iter() {
                push(self.by_cidr.get_or_insert_with(net, Vec::new));
            }
        }
        match rule.compact.anchor() {
            Some((key, values)) => {
                for value in values {
                    push(self.by_label.entry(label_key(key, *value)).or_default());
                }
            }
            None => push(&mut self.unanchored),
        }
    }

    /// The index of the first rule that matches, if any. `generation` is the policy's: an
    /// identity from it is matched on interned labels, any other on its string labels.
    pub(crate) fn first_match(
        &self,
        id: &Identity,
        generation: u64,
        dst: &Destination,
        default_ports: &PortSet,
    ) -> Option<usize> {
        let source = match id.compact(generation) {
            Some((labels, known)) => SourceView::Compact(labels, known),
            None => SourceView::Strings(id),
        };
        let mut by_destination: IdLists = SmallVec::new();
        match dst.host {
            Host::Name(name) => self
                .by_domain
                .for_each_match(name, |ids| by_destination.push(ids)),
            Host::Ip(ip) => {
                for form in address_forms(*ip) {
                    self.by_cidr
                        .for_each_match(form, |_, ids| by_destination.push(ids));
                }
            }
        }
        by_destination.push(&self.any_destination);

        // The source side needs interned labels; otherwise the destination side alone will do.
        let mut by_source: IdLists = SmallVec::new();
        if let SourceView::Compact(labels, _) = source {
            by_source.reserve(labels.len() + 1);
            for &(key, value) in labels {
                if let Some(ids) = self.by_label.get(&label_key(key, value)) {
                    by_source.push(ids);
                }
            }
            by_source.push(&self.unanchored);
        }

        let total = |lists: &[&[u32]]| lists.iter().map(|l| l.len()).sum::<usize>();
        let use_source =
            matches!(source, SourceView::Compact(..)) && total(&by_source) < total(&by_destination);
        let (lists, destination_known) = if use_source {
            (by_source, false)
        } else {
            (by_destination, true)
        };
        first_in_order(lists, |i| {
            self.rules
                .get(i as usize)
                .is_some_and(|rule| rule.matches(source, dst, default_ports, destination_known))
        })
        .map(|i| i as usize)
    }
}

/// The anchor index key of an interned label pair.
fn label_key(key: u32, value: u32) -> u64 {
    (u64::from(key) << 32) | u64::from(value)
}

/// Candidate rule-id lists for one request; on the stack for the usual few.
type IdLists<'a> = SmallVec<[&'a [u32]; 8]>;

/// Merges sorted id lists in increasing order (each id once) and returns the first that passes.
fn first_in_order(mut lists: IdLists<'_>, mut test: impl FnMut(u32) -> bool) -> Option<u32> {
    lists.retain(|l| !l.is_empty());
    loop {
        let next = lists.iter().filter_map(|l| l.first()).min().copied()?;
        for list in lists.iter_mut() {
            if let Some((&head, rest)) = list.split_first()
                && head == next
            {
                *list = rest;
            }
        }
        if test(next) {
            return Some(next);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_sets() {
        let specs = ["443", " 8000-8100", "80", "8050-8200", "8201", "65535"].map(PortSpec::from);
        let set = PortSet::parse(&specs, "k").expect("valid");
        assert_eq!(set.to_string(), "80,443,8000-8201,65535");
        let cases = [
            (0, false),
            (1, false),
            (79, false),
            (80, true),
            (81, false),
            (443, true),
            (7999, false),
            (8000, true),
            (8100, true),
            (8201, true),
            (8202, false),
            (65534, false),
            (65535, true),
        ];
        for (port, want) in cases {
            assert_eq!(set.contains(port), want, "{port}");
        }
        assert!(!PortSet::default().contains(443));
    }

    #[test]
    fn invalid_ports_name_key_and_value() {
        let cases = [
            ("90-80", "rules[2].to.ports: invalid port range \"90-80\""),
            ("0", "rules[2].to.ports: invalid port \"0\" (1-65535)"),
            (
                "65536",
                "rules[2].to.ports: invalid port \"65536\" (1-65535)",
            ),
            ("-1", "rules[2].to.ports: invalid port range \"-1\""),
            ("1-", "rules[2].to.ports: invalid port range \"1-\""),
            ("1-2-3", "rules[2].to.ports: invalid port range \"1-2-3\""),
            ("http", "rules[2].to.ports: invalid port \"http\" (1-65535)"),
            ("+80", "rules[2].to.ports: invalid port \"+80\" (1-65535)"),
            ("", "rules[2].to.ports: invalid port \"\" (1-65535)"),
        ];
        for (spec, want) in cases {
            let err = PortSet::parse(&[PortSpec::from(spec)], "rules[2].to.ports").expect_err(spec);
            assert_eq!(err.to_string(), want);
        }
    }

    #[test]
    fn domain_patterns() {
        let cases: &[(&str, &[(&str, bool)])] = &[
            (
                "example.com",
                &[
                    ("example.com", true),
                    ("www.example.com", false),
                    ("example.org", false),
                    ("com", false),
                ],
            ),
            ("Example.COM.", &[("example.com", true)]),
            (
                "*.example.com",
                &[
                    ("example.com", false),
                    ("www.example.com", true),
                    ("a.b.example.com", true),
                    ("badexample.com", false),
                    ("www.example.com.evil", false),
                ],
            ),
            (
                "api.*.example.com",
                &[
                    ("api.eu.example.com", true),
                    ("api.example.com", false),
                    ("api.a.b.example.com", false),
                    ("x.eu.example.com", false),
                    ("api.eu.example.org", false),
                ],
            ),
            (
                "*.api.*.example.com",
                &[
                    ("v1.api.eu.example.com", true),
                    ("api.eu.example.com", false),
                ],
            ),
            (
                "*.*.example.com",
                &[
                    ("a.example.com", false),
                    ("a.b.example.com", true),
                    ("a.b.c.example.com", true),
                ],
            ),
            (
                "api.example.*",
                &[
                    ("api.example.com", true),
                    ("api.example.co.uk", false),
                    ("api.example", false),
                ],
            ),
            ("*", &[("example.com", true), ("localhost", true)]),
        ];
        for (raw, names) in cases {
            let pattern = Pattern::parse(raw).expect(raw);
            let mut index: DomainIndex<()> = DomainIndex::default();
            index.slot(pattern.clone());
            for (name, want) in *names {
                assert_eq!(pattern.matches(name), *want, "{raw} vs {name}");
                assert_eq!(index.matches(name), *want, "index {raw} vs {name}");
            }
        }
        let invalid = [
            "",
            ".example.com",
            "ex*.com",
            "exa mple.com",
            "10.0.0.1",
            "*.0x7f",
            "a..b",
            "under_score.ok.but.-fine.com",
        ];
        for raw in invalid {
            let got = Pattern::parse(raw);
            assert_eq!(
                got.is_err(),
                raw != "under_score.ok.but.-fine.com",
                "{raw}: {got:?}"
            );
        }
        assert_eq!(
            Pattern::parse("*.Example.com").map(|p| p.to_string()),
            Ok("*.example.com".into())
        );
    }

    #[test]
    fn merge_visits_ids_in_order_once() {
        let a = [1u32, 4, 9];
        let b = [2u32, 4, 10];
        let c: [u32; 0] = [];
        let mut seen = Vec::new();
        let first = first_in_order(smallvec::smallvec![&a[..], &b[..], &c[..]], |i| {
            seen.push(i);
            false
        });
        assert_eq!(first, None);
        assert_eq!(seen, [1, 2, 4, 9, 10]);
        assert_eq!(
            first_in_order(smallvec::smallvec![&a[..], &b[..]], |i| i % 2 == 0),
            Some(2)
        );
    }
}
