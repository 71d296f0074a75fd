//! Kubernetes label selectors over source identities (`match_labels`, `match_expressions`), with
//! the pod-only parts of a NetworkPolicy peer (`namespace_selector`, `service_accounts`).

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use super::Identity;
use super::config::{
    AclConfigError, Operator, Problem, SelectorConfig, check_labels, valid_label_key,
    valid_label_value,
};
use super::workload::{NODE_NAME_LABEL, NODE_SOURCE_LABEL};

/// A compiled selector: every requirement must hold (Kubernetes semantics).
///
/// An empty selector matches every *known* source and never an unknown one, so that "from everyone"
/// does not silently include clients outside the source table.
///
/// A `namespace_selector` or `service_accounts` restricts the selector to pods (ANDed with the
/// label requirements, as in a NetworkPolicy peer): a static source or a node never matches it.
/// A node identity is matched only by a selector that names one of the reserved node labels
/// (`kalmar.io/source`, `kalmar.io/node`), so pod selectors never select nodes by accident.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    requirements: Vec<Requirement>,
    namespaces: Option<Box<Selector>>,
    /// `(namespace, name)`.
    service_accounts: Vec<(String, String)>,
    /// Some requirement names a reserved node label.
    names_node: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    /// The key is present with one of the values (`match_labels` pairs are `In` with one value).
    In {
        key: String,
        values: Vec<String>,
    },
    /// The key is absent, or present with none of the values.
    NotIn {
        key: String,
        values: Vec<String>,
    },
    Exists {
        key: String,
    },
    DoesNotExist {
        key: String,
    },
}

/// Interns the label keys and values that rule selectors mention, so that matching compares
/// integers instead of strings (the hot path of [`super::Policy::authorize`]).
#[derive(Debug, Default)]
pub(crate) struct LabelInterner {
    keys: HashMap<String, u32>,
    values: HashMap<String, u32>,
}

/// A label set in interned form: `(key, value)` pairs sorted by key, keeping only keys that some
/// selector mentions; a value no selector mentions is [`UNSEEN`].
pub(crate) type CompactLabels = [(u32, u32)];

/// A value id that no selector mentions.
pub(crate) const UNSEEN: u32 = u32::MAX;

/// A [`Selector`] over interned labels; same semantics.
#[derive(Debug, Clone, Default)]
pub(crate) struct CompactSelector {
    requirements: Box<[CompactRequirement]>,
    /// The selector has pod-only parts: no static source matches it.
    pods_only: bool,
}

#[derive(Debug, Clone)]
enum CompactRequirement {
    In { key: u32, values: Box<[u32]> },
    NotIn { key: u32, values: Box<[u32]> },
    Exists { key: u32 },
    DoesNotExist { key: u32 },
}

// === impl Selector ===

impl Selector {
    /// Validates label syntax and operator arity; `key` is the config key (`rules[3].from`).
    pub fn compile(cfg: &SelectorConfig, key: &str) -> Result<Self, AclConfigError> {
        check_labels(&format!("{key}.match_labels"), &cfg.match_labels)?;
        let mut requirements: Vec<Requirement> = cfg
            .match_labels
            .iter()
            .map(|(k, v)| Requirement::In {
                key: k.clone(),
                values: vec![v.clone()],
            })
            .collect();
        for (i, expr) in cfg.match_expressions.iter().enumerate() {
            let at = format!("{key}.match_expressions[{i}]");
            if !valid_label_key(&expr.key) {
                return Err(AclConfigError::new(
                    format!("{at}.key"),
                    Problem::InvalidLabelKey(expr.key.clone()),
                ));
            }
            if let Some(bad) = expr.values.iter().find(|v| !valid_label_value(v)) {
                return Err(AclConfigError::new(
                    format!("{at}.values"),
                    Problem::InvalidLabelValue {
                        key: expr.key.clone(),
                        value: bad.clone(),
                    },
                ));
            }
            let arity = |why| {
                AclConfigError::new(
                    format!("{at}.values"),
                    Problem::OperatorValues {
                        operator: expr.operator,
                        why,
                        values: expr.values.clone(),
                    },
                )
            };
            let key = expr.key.clone();
            let mut values = expr.values.clone();
            values.sort();
            values.dedup();
            requirements.push(match expr.operator {
                Operator::In | Operator::NotIn if values.is_empty() => {
                    return Err(arity("needs at least one value"));
                }
                Operator::Exists | Operator::DoesNotExist if !values.is_empty() => {
                    return Err(arity("takes no values"));
                }
                Operator::In => Requirement::In { key, values },
                Operator::NotIn => Requirement::NotIn { key, values },
                Operator::Exists => Requirement::Exists { key },
                Operator::DoesNotExist => Requirement::DoesNotExist { key },
            });
        }
        let namespaces = match &cfg.namespace_selector {
            None => None,
            Some(inner) => {
                let at = format!("{key}.namespace_selector");
                if inner.namespace_selector.is_some() || !inner.service_accounts.is_empty() {
                    return Err(AclConfigError::new(at, Problem::NestedNamespaceSelector));
                }
                Some(Box::new(Selector::compile(inner, &at)?))
            }
        };
        let mut service_accounts = Vec::with_capacity(cfg.service_accounts.len());
        for (i, sa) in cfg.service_accounts.iter().enumerate() {
            let pair = sa
                .split_once('/')
                .filter(|(ns, name)| valid_object_name(ns) && valid_object_name(name))
                .ok_or_else(|| {
                    AclConfigError::new(
                        format!("{key}.service_accounts[{i}]"),
                        Problem::InvalidServiceAccount(sa.clone()),
                    )
                })?;
            service_accounts.push((pair.0.to_owned(), pair.1.to_owned()));
        }
        let names_node = requirements
            .iter()
            .any(|r| matches!(r.key(), NODE_SOURCE_LABEL | NODE_NAME_LABEL));
        Ok(Self {
            requirements,
            namespaces,
            service_accounts,
            names_node,
        })
    }

    /// The empty selector: every known source.
    pub fn everyone() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty() && !self.pods_only()
    }

    /// Has a `namespace_selector` or `service_accounts`: only pods can match.
    pub fn pods_only(&self) -> bool {
        self.namespaces.is_some() || !self.service_accounts.is_empty()
    }

    /// Known sources are matched on their labels; unknown ones as a source with no labels, except
    /// that the empty selector does not match them. Pods are also matched on their namespace's
    /// labels and service account; nodes only by selectors naming a reserved node label.
    pub fn matches(&self, id: &Identity) -> bool {
        if let Some(pod) = id.as_pod() {
            return self.matches_labels(&pod.labels)
                && self
                    .namespaces
                    .as_ref()
                    .is_none_or(|ns| ns.matches_labels(&pod.namespace_labels))
                && (self.service_accounts.is_empty()
                    || self.service_accounts.iter().any(|(ns, name)| {
                        **ns == *pod.namespace && **name == *pod.service_account
                    }));
        }
        if self.pods_only() || (id.as_node().is_some() && !self.names_node) {
            return false;
        }
        match id.labels() {
            Some(labels) => self.matches_labels(labels),
            None => !self.requirements.is_empty() && self.matches_labels(&BTreeMap::new()),
        }
    }

    pub fn matches_labels(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }

    /// The interned form, interning this selector's keys and values.
    pub(crate) fn compact(&self, interner: &mut LabelInterner) -> CompactSelector {
        let requirements = self
            .requirements
            .iter()
            .map(|r| match r {
                Requirement::In { key, values } => CompactRequirement::In {
                    key: interner.key(key),
                    values: values.iter().map(|v| interner.value(v)).collect(),
                },
                Requirement::NotIn { key, values } => CompactRequirement::NotIn {
                    key: interner.key(key),
                    values: values.iter().map(|v| interner.value(v)).collect(),
                },
                Requirement::Exists { key } => CompactRequirement::Exists {
                    key: interner.key(key),
                },
                Requirement::DoesNotExist { key } => CompactRequirement::DoesNotExist {
                    key: interner.key(key),
                },
            })
            .collect();
        CompactSelector {
            requirements,
            pods_only: self.pods_only(),
        }
    }
}

/// Kubernetes' string form: `team=a,env in (dev,prod),!legacy,tier` (`<everyone known>` when empty).
/// With pod-only parts: `team=a and namespace(kubernetes.io/metadata.name=x) and
/// service_accounts(x/runner)`.
impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("<every known source>");
        }
        let mut and = "";
        if !self.requirements.is_empty() {
            self.fmt_requirements(f)?;
            and = " and ";
        }
        if let Some(ns) = &self.namespaces {
            write!(f, "{and}namespace({ns})")?;
            and = " and ";
        }
        if !self.service_accounts.is_empty() {
            let list: Vec<String> = self
                .service_accounts
                .iter()
                .map(|(ns, name)| format!("{ns}/{name}"))
                .collect();
            write!(f, "{and}service_accounts({})", list.join(","))?;
        }
        Ok(())
    }
}

impl Selector {
    fn fmt_requirements(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            match r {
                Requirement::In { key, values } if values.len() == 1 => {
                    write!(f, "{key}={}", values[0])?
                }
                Requirement::In { key, values } => write!(f, "{key} in ({})", values.join(","))?,
                Requirement::NotIn { key, values } => {
                    write!(f, "{key} notin ({})", values.join(","))?
                }
                Requirement::Exists { key } => write!(f, "{key}")?,
                Requirement::DoesNotExist { key } => write!(f, "!{key}")?,
            }
        }
        Ok(())
    }
}

// === impl LabelInterner ===

impl LabelInterner {
    fn key(&mut self, key: &str) -> u32 {
        let next = u32::try_from(self.keys.len()).unwrap_or(UNSEEN - 1);
        *self.keys.entry(key.to_owned()).or_insert(next)
    }

    fn value(&mut self, value: &str) -> u32 {
        let next = u32::try_from(self.values.len()).unwrap_or(UNSEEN - 1);
        *self.values.entry(value.to_owned()).or_insert(next)
    }

    /// The interned form of a source's labels.
    pub(crate) fn compact_labels(&self, labels: &BTreeMap<String, String>) -> Box<CompactLabels> {
        let mut pairs: Vec<(u32, u32)> = labels
            .iter()
            .filter_map(|(k, v)| {
                let key = *self.keys.get(k)?;
                Some((key, self.values.get(v).copied().unwrap_or(UNSEEN)))
            })
            .collect();
        pairs.sort_unstable();
        pairs.into_boxed_slice()
    }
}

// === impl CompactSelector ===

impl CompactSelector {
    /// `known: false` is an unknown source: no labels, and the empty selector does not match it.
    pub(crate) fn matches(&self, labels: &CompactLabels, known: bool) -> bool {
        if self.pods_only {
            return false;
        }
        if self.requirements.is_empty() {
            return known;
        }
        let get = |key: u32| labels.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
        self.requirements.iter().all(|r| match r {
            CompactRequirement::In { key, values } => {
                get(*key).is_some_and(|v| values.contains(&v))
            }
            CompactRequirement::NotIn { key, values } => {
                get(*key).is_none_or(|v| !values.contains(&v))
            }
            CompactRequirement::Exists { key } => get(*key).is_some(),
            CompactRequirement::DoesNotExist { key } => get(*key).is_none(),
        })
    }

    /// The (key, value) pairs one of which every matching source carries (see [`Selector::anchor`]).
    pub(crate) fn anchor(&self) -> Option<(u32, &[u32])> {
        self.requirements
            .iter()
            .filter_map(|r| match r {
                CompactRequirement::In { key, values } => Some((*key, &**values)),
                _ => None,
            })
            .min_by_key(|(_, values)| values.len())
    }
}

/// A Kubernetes object name (DNS-1123 subdomain): 1-253 of `[a-z0-9.-]`, alphanumeric at both ends.
fn valid_object_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 253
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-' || *c == b'.')
        && b.first().is_some_and(u8::is_ascii_alphanumeric)
        && b.last().is_some_and(u8::is_ascii_alphanumeric)
}

// === impl Requirement ===

impl Requirement {
    fn key(&self) -> &str {
        match self {
            Requirement::In { key, .. }
            | Requirement::NotIn { key, .. }
            | Requirement::Exists { key }
            | Requirement::DoesNotExist { key } => key,
        }
    }

    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Requirement::In { key, values } => labels.get(key).is_some_and(|v| values.contains(v)),
            Requirement::NotIn { key, values } => {
                labels.get(key).is_none_or(|v| !values.contains(v))
            }
            Requirement::Exists { key } => labels.contains_key(key),
            Requirement::DoesNotExist { key } => !labels.contains_key(key),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acl::config::ExpressionConfig;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, operator: Operator, values: &[&str]) -> ExpressionConfig {
        ExpressionConfig {
            key: key.into(),
            operator,
            values: values.iter().map(|v| v.to_string()).collect(),
        }
    }

    fn selector(match_labels: &[(&str, &str)], exprs: Vec<ExpressionConfig>) -> Selector {
        let cfg = SelectorConfig {
            match_labels: labels(match_labels),
            match_expressions: exprs,
            ..Default::default()
        };
        Selector::compile(&cfg, "test").expect("valid selector")
    }

    #[test]
    fn kubernetes_semantics_for_every_operator() {
        let team_a = labels(&[("team", "a"), ("env", "prod")]);
        let team_b = labels(&[("team", "b")]);
        let no_team = labels(&[("env", "dev")]);
        let empty = labels(&[]);
        let cases: Vec<(&str, Selector, [bool; 4])> = vec![
            ("empty", selector(&[], vec![]), [true, true, true, true]),
            (
                "match_labels",
                selector(&[("team", "a")], vec![]),
                [true, false, false, false],
            ),
            (
                "match_labels both",
                selector(&[("team", "a"), ("env", "prod")], vec![]),
                [true, false, false, false],
            ),
            (
                "match_labels other value",
                selector(&[("env", "dev")], vec![]),
                [false, false, true, false],
            ),
            (
                "In",
                selector(&[], vec![expr("team", Operator::In, &["a", "b"])]),
                [true, true, false, false],
            ),
            (
                "NotIn",
                selector(&[], vec![expr("team", Operator::NotIn, &["a"])]),
                [false, true, true, true],
            ),
            (
                "Exists",
                selector(&[], vec![expr("team", Operator::Exists, &[])]),
                [true, true, false, false],
            ),
            (
                "DoesNotExist",
                selector(&[], vec![expr("team", Operator::DoesNotExist, &[])]),
                [false, false, true, true],
            ),
            (
                "missing key In",
                selector(&[], vec![expr("zone", Operator::In, &["x"])]),
                [false; 4],
            ),
            (
                "missing key NotIn",
                selector(&[], vec![expr("zone", Operator::NotIn, &["x"])]),
                [true; 4],
            ),
            (
                "labels and expressions AND",
                selector(
                    &[("env", "prod")],
                    vec![expr("team", Operator::NotIn, &["b"])],
                ),
                [true, false, false, false],
            ),
            (
                "two expressions AND",
                selector(
                    &[],
                    vec![
                        expr("team", Operator::Exists, &[]),
                        expr("env", Operator::DoesNotExist, &[]),
                    ],
                ),
                [false, true, false, false],
            ),
        ];
        for (name, sel, want) in cases {
            let got = [&team_a, &team_b, &no_team, &empty].map(|l| sel.matches_labels(l));
            assert_eq!(got, want, "{name}: {sel}");
        }
    }

    #[test]
    fn unknown_sources_never_match_the_empty_selector() {
        let unknown = Identity::unknown();
        assert!(!selector(&[], vec![]).matches(&unknown));
        assert!(selector(&[], vec![expr("team", Operator::DoesNotExist, &[])]).matches(&unknown));
        assert!(!selector(&[("team", "a")], vec![]).matches(&unknown));
    }

    #[test]
    fn compact_form_agrees_and_anchors_on_the_narrowest_in() {
        let mut interner = LabelInterner::default();
        let sel = selector(
            &[("team", "a")],
            vec![expr("env", Operator::In, &["x", "y"])],
        );
        let compact = sel.compact(&mut interner);
        let team = interner.key("team");
        let a = interner.value("a");
        assert_eq!(compact.anchor(), Some((team, &[a][..])));
        let notin = selector(&[], vec![expr("env", Operator::NotIn, &["x"])]);
        assert!(notin.compact(&mut interner).anchor().is_none());

        let sets = [
            labels(&[("team", "a"), ("env", "x")]),
            labels(&[("team", "a"), ("env", "z")]),
            labels(&[("team", "a"), ("other", "x")]),
            labels(&[("env", "y")]),
            labels(&[]),
        ];
        let selectors = [
            sel,
            notin,
            selector(&[], vec![]),
            selector(&[], vec![expr("env", Operator::Exists, &[])]),
            selector(&[], vec![expr("env", Operator::DoesNotExist, &[])]),
            selector(&[], vec![expr("other", Operator::NotIn, &["q"])]),
        ];
        let compiled: Vec<CompactSelector> =
            selectors.iter().map(|s| s.compact(&mut interner)).collect();
        for (s, c) in selectors.iter().zip(&compiled) {
            for l in &sets {
                let got = c.matches(&interner.compact_labels(l), true);
                assert_eq!(got, s.matches_labels(l), "{s} on {l:?}");
            }
            assert_eq!(
                c.matches(&[], false),
                s.matches(&Identity::unknown()),
                "{s} on unknown"
            );
        }
    }

    #[test]
    fn invalid_selectors_name_the_key_and_value() {
        let cases: Vec<(SelectorConfig, &str)> = vec![
            (
                SelectorConfig {
                    match_labels: labels(&[("bad key", "x")]),
                    match_expressions: vec![],
                    ..Default::default()
                },
                "rules[1].from.match_labels: invalid label key \"bad key\"",
            ),
            (
                SelectorConfig {
                    match_labels: labels(&[("team", "-x")]),
                    match_expressions: vec![],
                    ..Default::default()
                },
                "rules[1].from.match_labels: invalid value \"-x\" for label \"team\"",
            ),
            (
                SelectorConfig {
                    match_labels: BTreeMap::new(),
                    match_expressions: vec![expr("team", Operator::In, &[])],
                    ..Default::default()
                },
                "rules[1].from.match_expressions[0].values: operator In needs at least one value, got []",
            ),
            (
                SelectorConfig {
                    match_labels: BTreeMap::new(),
                    match_expressions: vec![
                        expr("team", Operator::Exists, &[]),
                        expr("team", Operator::DoesNotExist, &["a"]),
                    ],
                    ..Default::default()
                },
                "rules[1].from.match_expressions[1].values: operator DoesNotExist takes no values, got [\"a\"]",
            ),
            (
                SelectorConfig {
                    match_labels: BTreeMap::new(),
                    match_expressions: vec![expr("Bad/key", Operator::Exists, &[])],
                    ..Default::default()
                },
                "rules[1].from.match_expressions[0].key: invalid label key \"Bad/key\"",
            ),
        ];
        for (cfg, want) in cases {
            let err = Selector::compile(&cfg, "rules[1].from")
                .expect_err(want)
                .to_string();
            assert!(err.starts_with(want), "{err}\n  wanted {want}");
        }
    }

    #[test]
    fn pods_namespaces_service_accounts_and_nodes() {
        use crate::acl::workload::{NodeIdentity, PodIdentity, namespace_name_labels};
        use std::sync::Arc;
        let pod = |ns: &str, sa: &str, l: &[(&str, &str)], ns_l: &[(&str, &str)]| {
            let mut ns_labels = labels(ns_l);
            ns_labels.extend(namespace_name_labels(ns));
            Identity::pod(Arc::new(PodIdentity::new(
                Arc::from(ns),
                "p",
                Arc::new(labels(l)),
                Arc::new(ns_labels),
                Arc::from(sa),
                Some(Arc::from("node-a")),
            )))
        };
        let web = pod("shop", "web", &[("app", "web")], &[("tier", "gold")]);
        let batch = pod("jobs", "runner", &[("app", "web")], &[]);
        let node = Identity::node(Arc::new(NodeIdentity::new(Arc::from("node-a"))));
        let source = Identity::known(
            None,
            "10.0.0.0/8".parse().expect("net"),
            labels(&[("app", "web")]),
        );
        let compile = |toml_text: &str| {
            let cfg: SelectorConfig = toml::from_str(toml_text).expect(toml_text);
            Selector::compile(&cfg, "rules[0].from").expect(toml_text)
        };
        // [web, batch, node, static source, unknown]
        let cases: Vec<(&str, [bool; 5])> = vec![
            ("", [true, true, false, true, false]),
            (
                "match_labels = {app = \"web\"}",
                [true, true, false, true, false],
            ),
            (
                "namespace_selector = {match_labels = {tier = \"gold\"}}",
                [true, false, false, false, false],
            ),
            (
                "match_labels = {app = \"web\"}\nnamespace_selector = {match_labels = {\"kubernetes.io/metadata.name\" = \"jobs\"}}",
                [false, true, false, false, false],
            ),
            ("namespace_selector = {}", [true, true, false, false, false]),
            (
                "service_accounts = [\"jobs/runner\"]",
                [false, true, false, false, false],
            ),
            ("service_accounts = [\"shop/runner\"]", [false; 5]),
            (
                "match_labels = {\"kalmar.io/source\" = \"node\"}",
                [false, false, true, false, false],
            ),
            (
                "match_labels = {\"kalmar.io/node\" = \"node-a\"}",
                [false, false, true, false, false],
            ),
            (
                "match_expressions = [{key = \"app\", operator = \"DoesNotExist\"}]",
                [false, false, false, false, true],
            ),
        ];
        let ids = [&web, &batch, &node, &source, &Identity::unknown()];
        for (text, want) in cases {
            let sel = compile(text);
            let got = ids.map(|id| sel.matches(id));
            assert_eq!(got, want, "{text:?} ({sel})");
        }
        assert_eq!(
            compile("match_labels = {app = \"web\"}\nnamespace_selector = {match_labels = {tier = \"gold\"}}\nservice_accounts = [\"shop/web\"]").to_string(),
            "app=web and namespace(tier=gold) and service_accounts(shop/web)"
        );
        let bad = [
            (
                "service_accounts = [\"runner\"]",
                "rules[0].from.service_accounts[0]: invalid service account \"runner\"",
            ),
            (
                "service_accounts = [\"Jobs/x\"]",
                "rules[0].from.service_accounts[0]: invalid service account \"Jobs/x\"",
            ),
            (
                "namespace_selector = {service_accounts = [\"a/b\"]}",
                "rules[0].from.namespace_selector: a namespace_selector cannot",
            ),
            (
                "namespace_selector = {match_labels = {\"bad key\" = \"x\"}}",
                "rules[0].from.namespace_selector.match_labels: invalid label key",
            ),
        ];
        for (text, want) in bad {
            let cfg: SelectorConfig = toml::from_str(text).expect(text);
            let err = Selector::compile(&cfg, "rules[0].from")
                .expect_err(text)
                .to_string();
            assert!(err.starts_with(want), "{err}\n  wanted {want}");
        }
    }

    #[test]
    fn display_is_kubernetes_like() {
        let sel = selector(
            &[("team", "a")],
            vec![
                expr("env", Operator::In, &["prod", "dev"]),
                expr("zone", Operator::NotIn, &["x"]),
                expr("gpu", Operator::Exists, &[]),
                expr("legacy", Operator::DoesNotExist, &[]),
            ],
        );
        assert_eq!(
            sel.to_string(),
            "team=a,env in (dev,prod),zone notin (x),gpu,!legacy"
        );
    }
}
