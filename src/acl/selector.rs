//! Kubernetes label selectors over source identities (`match_labels`, `match_expressions`).

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use super::Identity;
use super::config::{
    AclConfigError, Operator, Problem, SelectorConfig, check_labels, valid_label_key,
    valid_label_value,
};

/// A compiled selector: every requirement must hold (Kubernetes semantics).
///
/// An empty selector matches every *known* source and never an unknown one, so that "from everyone"
/// does not silently include clients outside the source table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    requirements: Vec<Requirement>,
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
        Ok(Self { requirements })
    }

    /// The empty selector: every known source.
    pub fn everyone() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    /// Known sources are matched on their labels; unknown ones as a source with no labels, except
    /// that the empty selector does not match them.
    pub fn matches(&self, id: &Identity) -> bool {
        match id.labels() {
            Some(labels) => self.matches_labels(labels),
            None => !self.is_empty() && self.matches_labels(&BTreeMap::new()),
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
        CompactSelector { requirements }
    }
}

/// Kubernetes' string form: `team=a,env in (dev,prod),!legacy,tier` (`<everyone known>` when empty).
impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.requirements.is_empty() {
            return f.write_str("<every known source>");
        }
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

// === impl Requirement ===

impl Requirement {
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
                },
                "rules[1].from.match_labels: invalid label key \"bad key\"",
            ),
            (
                SelectorConfig {
                    match_labels: labels(&[("team", "-x")]),
                    match_expressions: vec![],
                },
                "rules[1].from.match_labels: invalid value \"-x\" for label \"team\"",
            ),
            (
                SelectorConfig {
                    match_labels: BTreeMap::new(),
                    match_expressions: vec![expr("team", Operator::In, &[])],
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
                },
                "rules[1].from.match_expressions[1].values: operator DoesNotExist takes no values, got [\"a\"]",
            ),
            (
                SelectorConfig {
                    match_labels: BTreeMap::new(),
                    match_expressions: vec![expr("Bad/key", Operator::Exists, &[])],
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
