//! Live workload identities (pods and nodes) and the immutable address index a watcher fills.
//!
//! The ACL does not know where these come from: the `kubernetes` module folds API events into a
//! [`WorkloadIndex`] and swaps it in; [`super::Policy::identify_with`] combines one lookup in it
//! with the static source table.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

/// The hasher of the workload maps (seeded per process: the keys come from the cluster, not from
/// trusted configuration).
pub type WorkloadHasher = foldhash::fast::RandomState;

/// A label set, shared between the pods that carry the same one.
pub type Labels = BTreeMap<String, String>;

/// The reserved label every node identity carries: `kalmar.io/source: node`.
pub const NODE_SOURCE_LABEL: &str = "kalmar.io/source";
/// Its value.
pub const NODE_SOURCE_VALUE: &str = "node";
/// The reserved label with the node's name: `kalmar.io/node: <name>`.
pub const NODE_NAME_LABEL: &str = "kalmar.io/node";
/// The label Kubernetes sets on every namespace to its own name.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// A running (or pending) pod, as much of it as identity needs.
#[derive(Debug, PartialEq, Eq)]
pub struct PodIdentity {
    /// `namespace/name`.
    full_name: Box<str>,
    namespace_len: usize,
    pub namespace: Arc<str>,
    pub labels: Arc<Labels>,
    /// The namespace's labels, `kubernetes.io/metadata.name` included.
    pub namespace_labels: Arc<Labels>,
    pub service_account: Arc<str>,
    pub node: Option<Arc<str>>,
}

/// A node: matched only by selectors that name one of the reserved node labels.
#[derive(Debug, PartialEq, Eq)]
pub struct NodeIdentity {
    /// `node/<name>`.
    full_name: Box<str>,
    pub name: Arc<str>,
    /// [`NODE_SOURCE_LABEL`] and [`NODE_NAME_LABEL`].
    pub labels: Arc<Labels>,
}

/// What one address belongs to.
#[derive(Debug, Clone)]
pub enum Workload {
    Pod(Arc<PodIdentity>),
    Node(Arc<NodeIdentity>),
    /// Two live pods claim the address: nobody is attributed (the client is unknown).
    Conflict,
}

/// Address → workload, immutable once built; a new one replaces it as a whole.
#[derive(Debug, Default)]
pub struct WorkloadIndex {
    by_ip: HashMap<IpAddr, Workload, WorkloadHasher>,
    namespaces: HashMap<Arc<str>, Arc<Labels>, WorkloadHasher>,
}

// === impl PodIdentity ===

impl PodIdentity {
    pub fn new(
        namespace: Arc<str>,
        name: &str,
        labels: Arc<Labels>,
        namespace_labels: Arc<Labels>,
        service_account: Arc<str>,
        node: Option<Arc<str>>,
    ) -> Self {
        Self {
            full_name: format!("{namespace}/{name}").into_boxed_str(),
            namespace_len: namespace.len(),
            namespace,
            labels,
            namespace_labels,
            service_account,
            node,
        }
    }

    /// `namespace/name`.
    pub fn full_name(&self) -> &str {
        &self.full_name
    }

    /// The pod's own name.
    pub fn name(&self) -> &str {
        self.full_name
            .get(self.namespace_len + 1..)
            .unwrap_or_default()
    }

    /// The same pod under other namespace labels.
    pub fn with_namespace_labels(&self, namespace_labels: Arc<Labels>) -> Self {
        Self {
            full_name: self.full_name.clone(),
            namespace_len: self.namespace_len,
            namespace: self.namespace.clone(),
            labels: self.labels.clone(),
            namespace_labels,
            service_account: self.service_account.clone(),
            node: self.node.clone(),
        }
    }
}

// === impl NodeIdentity ===

impl NodeIdentity {
    pub fn new(name: Arc<str>) -> Self {
        let labels: Labels = [
            (NODE_SOURCE_LABEL.to_owned(), NODE_SOURCE_VALUE.to_owned()),
            (NODE_NAME_LABEL.to_owned(), name.to_string()),
        ]
        .into();
        Self {
            full_name: format!("node/{name}").into_boxed_str(),
            name,
            labels: Arc::new(labels),
        }
    }

    /// `node/<name>`.
    pub fn full_name(&self) -> &str {
        &self.full_name
    }
}

// === impl WorkloadIndex ===

impl WorkloadIndex {
    pub fn new(
        by_ip: HashMap<IpAddr, Workload, WorkloadHasher>,
        namespaces: HashMap<Arc<str>, Arc<Labels>, WorkloadHasher>,
    ) -> Self {
        Self { by_ip, namespaces }
    }

    /// An IPv4-mapped address is looked up as IPv4.
    pub fn get(&self, ip: IpAddr) -> Option<&Workload> {
        if self.by_ip.is_empty() {
            return None;
        }
        self.by_ip.get(&ip.to_canonical())
    }

    /// The labels of a namespace; one the index has not seen gets only its name label.
    pub fn namespace_labels(&self, namespace: &str) -> Arc<Labels> {
        self.namespaces
            .get(namespace)
            .cloned()
            .unwrap_or_else(|| Arc::new(namespace_name_labels(namespace)))
    }

    pub fn len(&self) -> usize {
        self.by_ip.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_ip.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&IpAddr, &Workload)> {
        self.by_ip.iter()
    }
}

/// `{kubernetes.io/metadata.name: <namespace>}`.
pub fn namespace_name_labels(namespace: &str) -> Labels {
    [(NAMESPACE_NAME_LABEL.to_owned(), namespace.to_owned())].into()
}

/// A map with the index's hasher (for builders outside the ACL).
pub fn workload_map<K, V>(capacity: usize) -> HashMap<K, V, WorkloadHasher> {
    HashMap::with_capacity_and_hasher(capacity, WorkloadHasher::default())
}
