//! Source identity: client address → labels, by longest CIDR prefix over the config and a sources file.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ipnet::IpNet;

use super::config::{AclConfigError, Problem, SourceEntry, check_labels, check_net};
use super::prefix::PrefixMap;
use super::selector::{CompactLabels, LabelInterner};
use super::workload::{NodeIdentity, PodIdentity};

/// Who a client is: a live pod or node (from the `kubernetes` index), the source entry with the
/// longest prefix containing its address, or unknown. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Identity {
    kind: Kind,
}

#[derive(Debug, Clone, Default)]
enum Kind {
    #[default]
    Unknown,
    Source(Arc<Source>),
    Pod(Arc<PodIdentity>),
    Node(Arc<NodeIdentity>),
}

/// One compiled source prefix.
#[derive(Debug)]
pub(crate) struct Source {
    pub(crate) name: Option<Arc<str>>,
    pub(crate) cidr: IpNet,
    pub(crate) labels: Arc<BTreeMap<String, String>>,
    /// Where it was defined: `sources[3]` or `/etc/kalmar/sources.yaml[12]`.
    pub(crate) origin: Arc<str>,
    /// `labels` interned for the policy of this generation (0: none).
    compact: Arc<CompactLabels>,
    generation: u64,
}

/// The compiled source table.
#[derive(Debug, Default)]
pub(crate) struct SourceTable {
    prefixes: PrefixMap<Arc<Source>>,
    files: Vec<PathBuf>,
}

// === impl Identity ===

impl Identity {
    /// A client in no source entry.
    pub fn unknown() -> Self {
        Self::default()
    }

    /// A known source built by hand (tests, tools).
    pub fn known(name: Option<&str>, cidr: IpNet, labels: BTreeMap<String, String>) -> Self {
        Self {
            kind: Kind::Source(Arc::new(Source {
                name: name.map(Arc::from),
                cidr,
                labels: Arc::new(labels),
                origin: Arc::from("-"),
                compact: Arc::from(Vec::new()),
                generation: 0,
            })),
        }
    }

    /// A pod from the live index.
    pub fn pod(pod: Arc<PodIdentity>) -> Self {
        Self {
            kind: Kind::Pod(pod),
        }
    }

    /// A node from the live index.
    pub fn node(node: Arc<NodeIdentity>) -> Self {
        Self {
            kind: Kind::Node(node),
        }
    }

    pub fn is_known(&self) -> bool {
        !matches!(self.kind, Kind::Unknown)
    }

    /// What identified the client: the source entry's name, the pod (`namespace/name`) or the
    /// node (`node/<name>`).
    pub fn name(&self) -> Option<&str> {
        match &self.kind {
            Kind::Unknown => None,
            Kind::Source(s) => s.name.as_deref(),
            Kind::Pod(p) => Some(p.full_name()),
            Kind::Node(n) => Some(n.full_name()),
        }
    }

    pub fn labels(&self) -> Option<&Arc<BTreeMap<String, String>>> {
        match &self.kind {
            Kind::Unknown => None,
            Kind::Source(s) => Some(&s.labels),
            Kind::Pod(p) => Some(&p.labels),
            Kind::Node(n) => Some(&n.labels),
        }
    }

    /// The pod, when the client was identified from the live index.
    pub fn as_pod(&self) -> Option<&Arc<PodIdentity>> {
        match &self.kind {
            Kind::Pod(p) => Some(p),
            _ => None,
        }
    }

    /// The node, when the client is a node's address from the live index.
    pub fn as_node(&self) -> Option<&Arc<NodeIdentity>> {
        match &self.kind {
            Kind::Node(n) => Some(n),
            _ => None,
        }
    }

    /// The pod's namespace.
    pub fn namespace(&self) -> Option<&str> {
        self.as_pod().map(|p| &*p.namespace)
    }

    /// The pod's service account.
    pub fn service_account(&self) -> Option<&str> {
        self.as_pod().map(|p| &*p.service_account)
    }

    /// The pod's node, or the node itself.
    pub fn node_name(&self) -> Option<&str> {
        match &self.kind {
            Kind::Pod(p) => p.node.as_deref(),
            Kind::Node(n) => Some(&n.name),
            _ => None,
        }
    }

    /// The prefix that identified the client (static sources only).
    pub fn cidr(&self) -> Option<IpNet> {
        match &self.kind {
            Kind::Source(s) => Some(s.cidr),
            _ => None,
        }
    }

    /// The interned labels and whether the source is known, if this identity comes from the policy
    /// of `generation` (an unknown source has no labels under any policy). Live identities are
    /// matched on their string labels.
    pub(crate) fn compact(&self, generation: u64) -> Option<(&CompactLabels, bool)> {
        match &self.kind {
            Kind::Unknown => Some((&[], false)),
            Kind::Source(s) if s.generation == generation => Some((&s.compact, true)),
            _ => None,
        }
    }

    /// Where the matching entry was defined: `sources[3]`, `path[12]`, `kubernetes pod`,
    /// `kubernetes node`.
    pub fn origin(&self) -> Option<&str> {
        match &self.kind {
            Kind::Unknown => None,
            Kind::Source(s) => Some(&s.origin),
            Kind::Pod(_) => Some("kubernetes pod"),
            Kind::Node(_) => Some("kubernetes node"),
        }
    }
}

/// For the access log: `k=v,k2=v2`, `-` for a known source without labels, `unknown` otherwise.
impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(labels) = self.labels() else {
            return f.write_str("unknown");
        };
        if labels.is_empty() {
            return f.write_str("-");
        }
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{k}={v}")?;
        }
        Ok(())
    }
}

// === impl SourceTable ===

impl SourceTable {
    /// Compiles `[[sources]]`, reading `file` entries from disk. A prefix defined twice is an error.
    /// `interner` holds the labels the rules mention; `generation` identifies the policy.
    pub(crate) fn compile(
        entries: &[SourceEntry],
        interner: &LabelInterner,
        generation: u64,
    ) -> Result<Self, AclConfigError> {
        let mut builder = Builder {
            prefixes: PrefixMap::new(),
            files: Vec::new(),
            label_sets: HashMap::new(),
            interner,
            generation,
        };
        for (i, entry) in entries.iter().enumerate() {
            let key = format!("sources[{i}]");
            match &entry.file {
                Some(path) => {
                    if entry.cidr.is_some()
                        || !entry.cidrs.is_empty()
                        || !entry.labels.is_empty()
                        || entry.name.is_some()
                    {
                        return Err(AclConfigError::new(
                            key,
                            Problem::SourceShape(
                                "an entry has either `file` or `cidr`/`cidrs`/`labels`/`name`, not both",
                            ),
                        ));
                    }
                    let listed = read_sources_file(path)
                        .map_err(|p| AclConfigError::new(format!("{key}.file"), p))?;
                    let shown = path.display().to_string();
                    for (j, inner) in listed.iter().enumerate() {
                        builder.add(&format!("{shown}[{j}]"), inner)?;
                    }
                    builder.files.push(path.clone());
                }
                None => builder.add(&key, entry)?,
            }
        }
        Ok(Self {
            prefixes: builder.prefixes,
            files: builder.files,
        })
    }

    /// Longest-prefix lookup; an IPv4-mapped client address is looked up as IPv4.
    pub(crate) fn identify(&self, client: IpAddr) -> Identity {
        match self.prefixes.longest(client.to_canonical()) {
            Some((_, s)) => Identity {
                kind: Kind::Source(Arc::clone(s)),
            },
            None => Identity::unknown(),
        }
    }

    pub(crate) fn files(&self) -> &[PathBuf] {
        &self.files
    }

    pub(crate) fn len(&self) -> usize {
        self.prefixes.len()
    }
}

/// One distinct label set, shared by every prefix that carries it.
type SharedLabels = (Arc<BTreeMap<String, String>>, Arc<CompactLabels>);

/// Collects prefixes, detecting duplicates and sharing identical label sets.
struct Builder<'a> {
    prefixes: PrefixMap<Arc<Source>>,
    files: Vec<PathBuf>,
    label_sets: HashMap<BTreeMap<String, String>, SharedLabels>,
    interner: &'a LabelInterner,
    generation: u64,
}

impl Builder<'_> {
    fn add(&mut self, key: &str, entry: &SourceEntry) -> Result<(), AclConfigError> {
        if entry.file.is_some() {
            return Err(AclConfigError::new(
                format!("{key}.file"),
                Problem::SourceShape("a sources file cannot refer to another file"),
            ));
        }
        check_labels(&format!("{key}.labels"), &entry.labels)?;
        let interner = self.interner;
        let (labels, compact) = self
            .label_sets
            .entry(entry.labels.clone())
            .or_insert_with(|| {
                let compact = interner.compact_labels(&entry.labels);
                (Arc::new(entry.labels.clone()), Arc::from(compact))
            })
            .clone();
        let name: Option<Arc<str>> = entry.name.as_deref().map(Arc::from);
        let origin: Arc<str> = Arc::from(key);
        let nets = entry
            .cidr
            .iter()
            .map(|n| (format!("{key}.cidr"), *n))
            .chain(
                entry
                    .cidrs
                    .iter()
                    .enumerate()
                    .map(|(j, n)| (format!("{key}.cidrs[{j}]"), *n)),
            );
        let mut any = false;
        for (net_key, net) in nets {
            any = true;
            let net = check_net(&net_key, net)?;
            if let Some((_, first)) = self.prefixes.get(net) {
                return Err(AclConfigError::new(
                    net_key,
                    Problem::Duplicate {
                        what: "source prefix",
                        value: net.to_string(),
                        first: first.origin.to_string(),
                    },
                ));
            }
            self.prefixes.insert(
                net,
                Arc::new(Source {
                    name: name.clone(),
                    cidr: net,
                    labels: Arc::clone(&labels),
                    origin: Arc::clone(&origin),
                    compact: Arc::clone(&compact),
                    generation: self.generation,
                }),
            );
        }
        if !any {
            return Err(AclConfigError::new(
                key,
                Problem::SourceShape("an entry needs `cidr` or `cidrs` (or `file`)"),
            ));
        }
        Ok(())
    }
}

/// Reads a sources file: a YAML list of entries, or JSON when the name ends in `.json`.
/// An empty file is an error (it is more likely a writer caught mid-write than an intent).
fn read_sources_file(path: &Path) -> Result<Vec<SourceEntry>, Problem> {
    let text = std::fs::read_to_string(path).map_err(|error| Problem::Io {
        path: path.to_owned(),
        error,
    })?;
    if text.trim().is_empty() {
        return Err(Problem::EmptyFile(path.to_owned()));
    }
    let is_json = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"));
    let parsed = if is_json {
        serde_json::from_str(&text).map_err(|e| e.to_string())
    } else {
        serde_norway::from_str(&text).map_err(|e| e.to_string())
    };
    parsed.map_err(|error| Problem::Parse {
        path: path.to_owned(),
        error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().expect("test prefix")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    fn entry(name: &str, cidr: &str, team: &str) -> SourceEntry {
        SourceEntry {
            name: Some(name.into()),
            cidr: Some(net(cidr)),
            labels: [("team".to_string(), team.to_string())].into(),
            ..SourceEntry::default()
        }
    }

    fn compile_table(entries: &[SourceEntry]) -> Result<SourceTable, AclConfigError> {
        SourceTable::compile(entries, &LabelInterner::default(), 1)
    }

    fn temp_file(name: &str, contents: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kalmar-acl-{}-{name}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join(name);
        std::fs::write(&path, contents).expect("write temp file");
        path
    }

    #[test]
    fn longest_prefix_with_overlapping_entries_v4_and_v6() {
        let table = compile_table(&[
            entry("all", "0.0.0.0/0", "world"),
            entry("ns", "10.1.0.0/16", "ns"),
            entry("pods", "10.1.2.0/24", "pods"),
            entry("pod", "10.1.2.3/32", "pod"),
            entry("v6", "fd00::/8", "v6"),
            entry("v6-ns", "fd00:1::/32", "v6-ns"),
            entry("v6-pod", "fd00:1::5/128", "v6-pod"),
        ])
        .expect("valid");
        let cases = [
            ("10.1.2.3", Some("pod")),
            ("::ffff:10.1.2.3", Some("pod")),
            ("10.1.2.4", Some("pods")),
            ("10.1.3.1", Some("ns")),
            ("10.2.0.0", Some("all")),
            ("fd00:1::5", Some("v6-pod")),
            ("fd00:1::6", Some("v6-ns")),
            ("fd00:2::1", Some("v6")),
            ("fe80::1", None),
            ("::1", None),
            // IPv4-compatible is not normalised for clients (only mapped is).
            ("::10.1.2.3", None),
        ];
        for (addr, want) in cases {
            let id = table.identify(ip(addr));
            assert_eq!(id.name(), want, "{addr}");
            assert_eq!(id.is_known(), want.is_some(), "{addr}");
        }
        let id = table.identify(ip("10.1.2.4"));
        assert_eq!(id.cidr(), Some(net("10.1.2.0/24")));
        assert_eq!(id.origin(), Some("sources[2]"));
        assert_eq!(id.to_string(), "team=pods");
        assert_eq!(Identity::unknown().to_string(), "unknown");
    }

    #[test]
    fn cidrs_list_and_shared_label_sets() {
        let table = compile_table(&[SourceEntry {
            name: None,
            cidr: Some(net("10.0.0.0/24")),
            cidrs: vec![net("10.0.1.0/24"), net("fd00::/64")],
            labels: [("team".into(), "a".into())].into(),
            file: None,
        }])
        .expect("valid");
        assert_eq!(table.len(), 3);
        let a = table.identify(ip("10.0.0.1"));
        let b = table.identify(ip("fd00::1"));
        let (Some(la), Some(lb)) = (a.labels(), b.labels()) else {
            panic!("both known")
        };
        assert!(Arc::ptr_eq(la, lb));
        assert_eq!(b.origin(), Some("sources[0]"));
    }

    #[test]
    fn sources_files_yaml_and_json() {
        let yaml = temp_file(
            "sources.yaml",
            "# written by the controller\n- name: pod-a\n  cidr: 10.1.2.3/32\n  labels:\n    network-access-external-ips: true\n    app.kubernetes.io/name: worker\n- cidrs: [10.2.0.0/16, 'fd00:2::/48']\n  labels: {namespace: project-x}\n",
        );
        let json = temp_file(
            "sources.json",
            r#"[{"name": "pod-b", "cidr": "10.9.9.9/32", "labels": {"replicas": 3}}]"#,
        );
        let table = compile_table(&[
            SourceEntry {
                file: Some(yaml.clone()),
                ..SourceEntry::default()
            },
            SourceEntry {
                file: Some(json.clone()),
                ..SourceEntry::default()
            },
            entry("inline", "10.0.0.0/8", "inline"),
        ])
        .expect("valid files");
        assert_eq!(table.files(), [yaml.clone(), json.clone()]);
        let a = table.identify(ip("10.1.2.3"));
        assert_eq!(a.name(), Some("pod-a"));
        assert_eq!(
            a.to_string(),
            "app.kubernetes.io/name=worker,network-access-external-ips=true"
        );
        assert_eq!(a.origin(), Some(format!("{}[0]", yaml.display()).as_str()));
        assert_eq!(
            table.identify(ip("fd00:2::9")).to_string(),
            "namespace=project-x"
        );
        assert_eq!(table.identify(ip("10.9.9.9")).to_string(), "replicas=3");
        assert_eq!(table.identify(ip("10.3.0.0")).name(), Some("inline"));
    }

    #[test]
    fn source_errors_name_the_key_and_value() {
        let dup_file = temp_file("dup.yaml", "- cidr: 10.0.0.0/8\n");
        let empty_file = temp_file("empty.yaml", "  \n");
        let bad_yaml = temp_file("bad.yaml", "- cidr: [unclosed\n");
        let nested = temp_file("nested.json", r#"[{"file": "/etc/other"}]"#);
        let unknown_field = temp_file("unknown.yaml", "- cidr: 10.0.0.0/8\n  lables: {}\n");
        let file = |p: &PathBuf| SourceEntry {
            file: Some(p.clone()),
            ..SourceEntry::default()
        };
        let cases: Vec<(Vec<SourceEntry>, String)> = vec![
            (
                vec![entry("a", "10.0.0.0/8", "a"), entry("b", "10.0.0.0/8", "b")],
                "sources[1].cidr: duplicate source prefix \"10.0.0.0/8\" (first at sources[0])"
                    .into(),
            ),
            (
                vec![entry("a", "10.0.0.0/8", "a"), file(&dup_file)],
                format!(
                    "{}[0].cidr: duplicate source prefix \"10.0.0.0/8\" (first at sources[0])",
                    dup_file.display()
                ),
            ),
            (
                vec![entry("a", "10.1.2.3/8", "a")],
                "sources[0].cidr: 10.1.2.3/8 has host bits set (did you mean 10.0.0.0/8?)".into(),
            ),
            (
                vec![SourceEntry {
                    name: Some("x".into()),
                    ..SourceEntry::default()
                }],
                "sources[0]: an entry needs `cidr` or `cidrs`".into(),
            ),
            (
                vec![SourceEntry {
                    cidr: Some(net("10.0.0.0/8")),
                    file: Some(dup_file.clone()),
                    ..SourceEntry::default()
                }],
                "sources[0]: an entry has either `file`".into(),
            ),
            (
                vec![SourceEntry {
                    cidr: Some(net("10.0.0.0/8")),
                    labels: [("team".into(), "a b".into())].into(),
                    ..SourceEntry::default()
                }],
                "sources[0].labels: invalid value \"a b\" for label \"team\"".into(),
            ),
            (
                vec![file(&empty_file)],
                format!("sources[0].file: {:?} is empty", empty_file),
            ),
            (
                vec![file(&bad_yaml)],
                format!("sources[0].file: cannot parse {:?}", bad_yaml),
            ),
            (
                vec![file(&unknown_field)],
                format!(
                    "sources[0].file: cannot parse {:?}: .[0]: unknown field `lables`",
                    unknown_field
                ),
            ),
            (
                vec![file(&nested)],
                format!("{}[0].file: a sources file cannot refer", nested.display()),
            ),
            (
                vec![file(&PathBuf::from("/nonexistent/kalmar/sources.yaml"))],
                "sources[0].file: cannot read \"/nonexistent/kalmar/sources.yaml\"".into(),
            ),
        ];
        for (entries, want) in cases {
            let err = compile_table(&entries).expect_err(&want).to_string();
            assert!(err.starts_with(&want), "{err}\n  wanted {want}");
        }
    }
}
