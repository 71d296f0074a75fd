//! The fold: watch events of pods, namespaces and nodes → the small records identity needs →
//! an immutable [`WorkloadIndex`] on demand.
//!
//! Churn rules (the part naive implementations get wrong):
//! - records are keyed by pod UID, never by IP: a late DELETE of an old pod removes that pod's
//!   claims only, never those of the pod that now owns the address;
//! - only live pods (Pending/Running) with an address and without `hostNetwork` claim it;
//!   a MODIFIED event to Succeeded/Failed drops the pod at once (such pods keep their `podIP`);
//! - two live pods claiming one address make it a [`Workload::Conflict`] (counted), never a guess;
//! - a node claims its InternalIP/ExternalIP addresses; a pod claim beats a node claim;
//! - a re-list (after `410 Gone` or a lost watch) replaces the objects of that watch only when it
//!   is complete: until then the last-known records stay.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use kube::runtime::watcher::Event;
use smallvec::SmallVec;

use super::objects::{NamespaceObject, NodeObject, PodObject};
use crate::acl::{
    Labels, NodeIdentity, PodIdentity, Workload, WorkloadIndex, namespace_name_labels, workload_map,
};

/// One watched object, whatever its kind.
#[derive(Debug, Clone)]
pub enum Object {
    Pod(PodObject),
    Namespace(NamespaceObject),
    Node(NodeObject),
}

/// What one watch covers, so that its re-list replaces exactly its objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Pods of one namespace, or of all (`None`).
    Pods(Option<String>),
    Namespaces,
    Nodes,
}

/// Counts for the metrics after a change.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub pods: usize,
    pub namespaces: usize,
    pub nodes: usize,
    /// Addresses two or more live pods claim now.
    pub conflicting_ips: usize,
}

#[derive(Debug)]
struct PodRecord {
    ips: SmallVec<[IpAddr; 2]>,
    identity: Arc<PodIdentity>,
}

#[derive(Debug)]
struct NodeRecord {
    ips: SmallVec<[IpAddr; 2]>,
    identity: Arc<NodeIdentity>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Claim {
    Pod(Arc<str>),
    Node(Arc<str>),
}

/// The mutable state, owned by the watcher task.
#[derive(Debug)]
pub struct Fold {
    scopes: Vec<Scope>,
    pods: HashMap<Arc<str>, PodRecord>,
    namespaces: HashMap<Arc<str>, Arc<Labels>>,
    nodes: HashMap<Arc<str>, NodeRecord>,
    claims: HashMap<IpAddr, SmallVec<[Claim; 1]>>,
    /// Watch index → keys seen since its `Init`, while a (re-)list is in progress.
    relisting: HashMap<usize, HashSet<Arc<str>>>,
    /// Watches whose first list is complete.
    listed: Vec<bool>,
    strings: HashSet<Arc<str>>,
    label_sets: HashSet<Arc<Labels>>,
    /// Changes since the interners were last swept.
    churn: usize,
    /// Times an address became claimed by a second live pod.
    conflicts_seen: u64,
}

// === impl Fold ===

impl Fold {
    pub fn new(scopes: Vec<Scope>) -> Self {
        let listed = vec![false; scopes.len()];
        Self {
            scopes,
            pods: HashMap::new(),
            namespaces: HashMap::new(),
            nodes: HashMap::new(),
            claims: HashMap::new(),
            relisting: HashMap::new(),
            listed,
            strings: HashSet::new(),
            label_sets: HashSet::new(),
            churn: 0,
            conflicts_seen: 0,
        }
    }

    /// Every watch has completed its first list.
    pub fn synced(&self) -> bool {
        self.listed.iter().all(|l| *l)
    }

    /// Times an address became claimed by two live pods (for the conflicts counter).
    pub fn conflicts_seen(&self) -> u64 {
        self.conflicts_seen
    }

    pub fn counts(&self) -> Counts {
        Counts {
            pods: self.pods.len(),
            namespaces: self.namespaces.len(),
            nodes: self.nodes.len(),
            conflicting_ips: self.claims.values().filter(|c| pod_claims(c) > 1).count(),
        }
    }

    /// Applies one event of watch `watch`; returns whether the index changed.
    pub fn apply(&mut self, watch: usize, event: Event<Object>) -> bool {
        match event {
            Event::Init => {
                self.relisting.insert(watch, HashSet::new());
                false
            }
            Event::InitApply(obj) => {
                let key = self.key(&obj);
                let changed = self.upsert(obj);
                if let (Some(seen), Some(key)) = (self.relisting.get_mut(&watch), key) {
                    seen.insert(key);
                }
                changed
            }
            Event::InitDone => {
                let seen = self.relisting.remove(&watch).unwrap_or_default();
                if let Some(l) = self.listed.get_mut(watch) {
                    *l = true;
                }
                self.retain_listed(watch, &seen)
            }
            Event::Apply(obj) => self.upsert(obj),
            Event::Delete(obj) => match obj {
                Object::Pod(p) => p
                    .metadata
                    .uid
                    .as_deref()
                    .is_some_and(|uid| self.remove_pod(uid)),
                Object::Namespace(n) => n
                    .metadata
                    .name
                    .as_deref()
                    .is_some_and(|name| self.remove_namespace(name)),
                Object::Node(n) => n
                    .metadata
                    .name
                    .as_deref()
                    .is_some_and(|name| self.remove_node(name)),
            },
        }
    }

    /// The immutable index of the current state.
    pub fn index(&mut self) -> WorkloadIndex {
        if self.churn > 4096 {
            self.sweep();
        }
        let mut by_ip = workload_map(self.claims.len());
        for (ip, claims) in &self.claims {
            let workload = match pod_claims(claims) {
                0 => claims.iter().find_map(|c| match c {
                    Claim::Node(name) => self
                        .nodes
                        .get(name)
                        .map(|n| Workload::Node(n.identity.clone())),
                    Claim::Pod(_) => None,
                }),
                1 => claims.iter().find_map(|c| match c {
                    Claim::Pod(uid) => self
                        .pods
                        .get(uid)
                        .map(|p| Workload::Pod(p.identity.clone())),
                    Claim::Node(_) => None,
                }),
                _ => Some(Workload::Conflict),
            };
            if let Some(w) = workload {
                by_ip.insert(*ip, w);
            }
        }
        let mut namespaces = workload_map(self.namespaces.len());
        for (name, labels) in &self.namespaces {
            namespaces.insert(name.clone(), labels.clone());
        }
        WorkloadIndex::new(by_ip, namespaces)
    }

    fn key(&self, obj: &Object) -> Option<Arc<str>> {
        let raw = match obj {
            Object::Pod(p) => p.metadata.uid.as_deref(),
            Object::Namespace(n) => n.metadata.name.as_deref(),
            Object::Node(n) => n.metadata.name.as_deref(),
        }?;
        Some(Arc::from(raw))
    }

    fn upsert(&mut self, obj: Object) -> bool {
        match obj {
            Object::Pod(p) => self.upsert_pod(p),
            Object::Namespace(n) => self.upsert_namespace(n),
            Object::Node(n) => self.upsert_node(n),
        }
    }

    fn upsert_pod(&mut self, pod: PodObject) -> bool {
        let Some(uid) = pod.metadata.uid.as_deref() else {
            return false;
        };
        let ips = pod.ips();
        let indexable = pod.is_live() && !pod.spec.host_network && !ips.is_empty();
        let (Some(namespace), Some(name), true) = (
            pod.metadata.namespace.as_deref(),
            pod.metadata.name.as_deref(),
            indexable,
        ) else {
            return self.remove_pod(uid);
        };
        let empty = Labels::new();
        let labels = pod.metadata.labels.as_ref().unwrap_or(&empty);
        let service_account = pod
            .spec
            .service_account_name
            .as_deref()
            .unwrap_or("default");
        let node = pod.spec.node_name.as_deref();
        if let Some(old) = self.pods.get(uid) {
            let id = &old.identity;
            if old.ips == ips
                && *id.namespace == *namespace
                && id.name() == name
                && *id.labels == *labels
                && *id.service_account == *service_account
                && id.node.as_deref() == node
            {
                return false;
            }
        }
        self.remove_pod(uid);
        let namespace = self.intern(namespace);
        let namespace_labels = self.namespace_labels(&namespace);
        let identity = PodIdentity::new(
            namespace,
            name,
            self.intern_labels(labels),
            namespace_labels,
            self.intern(service_account),
            node.map(|n| self.intern(n)),
        );
        let uid: Arc<str> = Arc::from(uid);
        for ip in &ips {
            self.claim(*ip, Claim::Pod(uid.clone()));
        }
        self.pods.insert(
            uid,
            PodRecord {
                ips,
                identity: Arc::new(identity),
            },
        );
        self.churn += 1;
        true
    }

    fn remove_pod(&mut self, uid: &str) -> bool {
        let Some((uid, record)) = self.pods.remove_entry(uid) else {
            return false;
        };
        let claim = Claim::Pod(uid);
        for ip in &record.ips {
            self.unclaim(*ip, &claim);
        }
        self.churn += 1;
        true
    }

    fn upsert_namespace(&mut self, ns: NamespaceObject) -> bool {
        let Some(name) = ns.metadata.name.as_deref() else {
            return false;
        };
        let mut labels = ns.metadata.labels.unwrap_or_default();
        labels.extend(namespace_name_labels(name));
        if self.namespaces.get(name).is_some_and(|l| **l == labels) {
            return false;
        }
        let name = self.intern(name);
        let labels = self.intern_labels(&labels);
        self.namespaces.insert(name.clone(), labels.clone());
        self.relabel_pods(&name, labels);
        true
    }

    fn remove_namespace(&mut self, name: &str) -> bool {
        let Some((name, _)) = self.namespaces.remove_entry(name) else {
            return false;
        };
        let labels = Arc::new(namespace_name_labels(&name));
        self.relabel_pods(&name, labels);
        true
    }

    /// New identities for the pods of `namespace` (a namespace relabel is rare; pods are many).
    fn relabel_pods(&mut self, namespace: &str, labels: Arc<Labels>) {
        for record in self.pods.values_mut() {
            if *record.identity.namespace == *namespace {
                record.identity = Arc::new(record.identity.with_namespace_labels(labels.clone()));
            }
        }
    }

    fn namespace_labels(&self, namespace: &str) -> Arc<Labels> {
        self.namespaces
            .get(namespace)
            .cloned()
            .unwrap_or_else(|| Arc::new(namespace_name_labels(namespace)))
    }

    fn upsert_node(&mut self, node: NodeObject) -> bool {
        let Some(name) = node.metadata.name.as_deref() else {
            return false;
        };
        let mut ips: SmallVec<[IpAddr; 2]> = SmallVec::new();
        for a in &node.status.addresses {
            if (a.kind == "InternalIP" || a.kind == "ExternalIP")
                && let Ok(ip) = a.address.parse::<IpAddr>()
                && !ips.contains(&ip.to_canonical())
            {
                ips.push(ip.to_canonical());
            }
        }
        if self.nodes.get(name).is_some_and(|n| n.ips == ips) {
            return false;
        }
        self.remove_node(name);
        let name = self.intern(name);
        for ip in &ips {
            self.claim(*ip, Claim::Node(name.clone()));
        }
        let identity = Arc::new(NodeIdentity::new(name.clone()));
        self.nodes.insert(name, NodeRecord { ips, identity });
        true
    }

    fn remove_node(&mut self, name: &str) -> bool {
        let Some((name, record)) = self.nodes.remove_entry(name) else {
            return false;
        };
        let claim = Claim::Node(name);
        for ip in &record.ips {
            self.unclaim(*ip, &claim);
        }
        true
    }

    /// After watch `watch` listed `seen`: drop its objects that the list no longer holds.
    fn retain_listed(&mut self, watch: usize, seen: &HashSet<Arc<str>>) -> bool {
        let Some(scope) = self.scopes.get(watch).cloned() else {
            return false;
        };
        let gone: Vec<Arc<str>> = match &scope {
            Scope::Pods(ns) => self
                .pods
                .iter()
                .filter(|(uid, r)| {
                    ns.as_deref().is_none_or(|ns| *r.identity.namespace == *ns)
                        && !seen.contains(*uid)
                })
                .map(|(uid, _)| uid.clone())
                .collect(),
            Scope::Namespaces => self
                .namespaces
                .keys()
                .filter(|n| !seen.contains(*n))
                .cloned()
                .collect(),
            Scope::Nodes => self
                .nodes
                .keys()
                .filter(|n| !seen.contains(*n))
                .cloned()
                .collect(),
        };
        let changed = !gone.is_empty();
        for key in gone {
            match scope {
                Scope::Pods(_) => self.remove_pod(&key),
                Scope::Namespaces => self.remove_namespace(&key),
                Scope::Nodes => self.remove_node(&key),
            };
        }
        changed
    }

    fn claim(&mut self, ip: IpAddr, claim: Claim) {
        let claims = self.claims.entry(ip).or_default();
        let is_pod = matches!(claim, Claim::Pod(_));
        claims.push(claim);
        if is_pod && pod_claims(claims) == 2 {
            self.conflicts_seen += 1;
            tracing::warn!(%ip, "two live pods claim one address; it is attributed to nobody");
        }
    }

    fn unclaim(&mut self, ip: IpAddr, claim: &Claim) {
        if let Some(claims) = self.claims.get_mut(&ip) {
            claims.retain(|c| c != claim);
            if claims.is_empty() {
                self.claims.remove(&ip);
            }
        }
    }

    fn intern(&mut self, s: &str) -> Arc<str> {
        if let Some(found) = self.strings.get(s) {
            return found.clone();
        }
        let new: Arc<str> = Arc::from(s);
        self.strings.insert(new.clone());
        new
    }

    fn intern_labels(&mut self, labels: &Labels) -> Arc<Labels> {
        if let Some(found) = self.label_sets.get(labels) {
            return found.clone();
        }
        let new = Arc::new(labels.clone());
        self.label_sets.insert(new.clone());
        new
    }

    /// Forgets interned values nothing refers to any more.
    fn sweep(&mut self) {
        self.strings.retain(|s| Arc::strong_count(s) > 1);
        self.label_sets.retain(|l| Arc::strong_count(l) > 1);
        self.churn = 0;
    }
}

fn pod_claims(claims: &[Claim]) -> usize {
    claims.iter().filter(|c| matches!(c, Claim::Pod(_))).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(uid: &str, ns: &str, name: &str, ip: &str, labels: &[(&str, &str)]) -> PodObject {
        let labels: serde_json::Map<String, serde_json::Value> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
            .collect();
        serde_json::from_value(serde_json::json!({
            "metadata": {"uid": uid, "namespace": ns, "name": name, "resourceVersion": "1",
                         "labels": labels},
            "spec": {"serviceAccountName": "sa", "nodeName": "node-a"},
            "status": {"phase": "Running", "podIP": ip}
        }))
        .expect("pod")
    }

    fn namespace(name: &str, labels: &[(&str, &str)]) -> NamespaceObject {
        let labels: serde_json::Map<String, serde_json::Value> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
            .collect();
        serde_json::from_value(serde_json::json!({"metadata": {"name": name, "labels": labels}}))
            .expect("namespace")
    }

    fn node(name: &str, ip: &str) -> NodeObject {
        serde_json::from_value(serde_json::json!({"metadata": {"name": name},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}]}}))
        .expect("node")
    }

    fn synced_fold() -> Fold {
        let mut fold = Fold::new(vec![Scope::Pods(None), Scope::Namespaces, Scope::Nodes]);
        for w in 0..3 {
            fold.apply(w, Event::Init);
            fold.apply(w, Event::InitDone);
        }
        assert!(fold.synced());
        fold
    }

    fn who(fold: &mut Fold, ip: &str) -> String {
        match fold.index().get(ip.parse().expect("ip")) {
            None => "-".into(),
            Some(Workload::Conflict) => "conflict".into(),
            Some(Workload::Node(n)) => n.full_name().into(),
            Some(Workload::Pod(p)) => {
                let labels: Vec<String> =
                    p.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                format!("{} {}", p.full_name(), labels.join(","))
            }
        }
    }

    fn apply(fold: &mut Fold, obj: Object) -> bool {
        fold.apply(0, Event::Apply(obj))
    }

    #[test]
    fn not_synced_until_every_watch_listed() {
        let mut fold = Fold::new(vec![Scope::Pods(None), Scope::Nodes]);
        fold.apply(0, Event::Init);
        fold.apply(
            0,
            Event::InitApply(Object::Pod(pod("u1", "a", "p", "10.1.0.1", &[]))),
        );
        fold.apply(0, Event::InitDone);
        assert!(!fold.synced());
        fold.apply(1, Event::Init);
        fold.apply(1, Event::InitDone);
        assert!(fold.synced());
        assert_eq!(who(&mut fold, "10.1.0.1"), "a/p ");
    }

    #[test]
    fn late_delete_of_the_old_pod_keeps_the_new_owner() {
        let mut fold = synced_fold();
        let old = pod("old", "a", "p1", "10.1.0.7", &[("app", "x")]);
        assert!(apply(&mut fold, Object::Pod(old.clone())));
        // The old pod ends (its DELETE is late); a new pod gets the address.
        let mut done = old.clone();
        done.status.phase = Some("Succeeded".into());
        assert!(apply(&mut fold, Object::Pod(done)));
        assert_eq!(who(&mut fold, "10.1.0.7"), "-");
        apply(
            &mut fold,
            Object::Pod(pod("new", "b", "p2", "10.1.0.7", &[("app", "y")])),
        );
        assert!(!fold.apply(0, Event::Delete(Object::Pod(old))));
        assert_eq!(who(&mut fold, "10.1.0.7"), "b/p2 app=y");
    }

    #[test]
    fn two_live_pods_on_one_address_are_a_conflict_until_one_goes() {
        let mut fold = synced_fold();
        let a = pod("a", "n", "pa", "10.1.0.9", &[]);
        apply(&mut fold, Object::Pod(a.clone()));
        apply(&mut fold, Object::Pod(pod("b", "n", "pb", "10.1.0.9", &[])));
        assert_eq!(who(&mut fold, "10.1.0.9"), "conflict");
        assert_eq!(fold.conflicts_seen(), 1);
        assert_eq!(fold.counts().conflicting_ips, 1);
        fold.apply(0, Event::Delete(Object::Pod(a)));
        assert_eq!(who(&mut fold, "10.1.0.9"), "n/pb ");
        assert_eq!(fold.counts().conflicting_ips, 0);
    }

    #[test]
    fn host_network_and_finished_pods_never_claim() {
        let mut fold = synced_fold();
        let mut host = pod("h", "kube-system", "proxy", "10.0.0.4", &[]);
        host.spec.host_network = true;
        assert!(!apply(&mut fold, Object::Pod(host)));
        fold.apply(2, Event::Apply(Object::Node(node("node-a", "10.0.0.4"))));
        assert_eq!(who(&mut fold, "10.0.0.4"), "node/node-a");
        let mut failed = pod("f", "a", "job", "10.1.0.3", &[]);
        failed.status.phase = Some("Failed".into());
        assert!(!apply(&mut fold, Object::Pod(failed)));
        assert_eq!(who(&mut fold, "10.1.0.3"), "-");
        // A pod claim beats a node claim on the same address.
        apply(&mut fold, Object::Pod(pod("p", "a", "x", "10.0.0.4", &[])));
        assert_eq!(who(&mut fold, "10.0.0.4"), "a/x ");
    }

    #[test]
    fn namespace_relabel_reaches_existing_pods() {
        let mut fold = synced_fold();
        apply(
            &mut fold,
            Object::Pod(pod("u", "proj", "w", "10.1.0.2", &[])),
        );
        let ns_labels = |fold: &mut Fold| match fold.index().get("10.1.0.2".parse().expect("ip")) {
            Some(Workload::Pod(p)) => p.namespace_labels.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            ns_labels(&mut fold).get("kubernetes.io/metadata.name"),
            Some(&"proj".to_string())
        );
        fold.apply(
            1,
            Event::Apply(Object::Namespace(namespace("proj", &[("tier", "gold")]))),
        );
        assert_eq!(ns_labels(&mut fold).get("tier"), Some(&"gold".to_string()));
        fold.apply(1, Event::Delete(Object::Namespace(namespace("proj", &[]))));
        assert_eq!(ns_labels(&mut fold).get("tier"), None);
    }

    #[test]
    fn relist_replaces_only_when_complete_and_only_its_scope() {
        let mut fold = Fold::new(vec![
            Scope::Pods(Some("a".into())),
            Scope::Pods(Some("b".into())),
        ]);
        for w in 0..2 {
            fold.apply(w, Event::Init);
        }
        fold.apply(
            0,
            Event::InitApply(Object::Pod(pod("1", "a", "p1", "10.1.0.1", &[]))),
        );
        fold.apply(
            0,
            Event::InitApply(Object::Pod(pod("2", "a", "p2", "10.1.0.2", &[]))),
        );
        fold.apply(
            1,
            Event::InitApply(Object::Pod(pod("3", "b", "p3", "10.1.0.3", &[]))),
        );
        fold.apply(0, Event::InitDone);
        fold.apply(1, Event::InitDone);
        // Watch 0 re-lists (say after 410 Gone): p2 is gone meanwhile.
        fold.apply(0, Event::Init);
        fold.apply(
            0,
            Event::InitApply(Object::Pod(pod("1", "a", "p1", "10.1.0.1", &[]))),
        );
        assert_eq!(
            who(&mut fold, "10.1.0.2"),
            "a/p2 ",
            "kept until the list is complete"
        );
        fold.apply(0, Event::InitDone);
        assert_eq!(who(&mut fold, "10.1.0.2"), "-");
        assert_eq!(who(&mut fold, "10.1.0.3"), "b/p3 ", "other scope untouched");
        assert_eq!(fold.counts().pods, 2);
    }

    #[test]
    fn unchanged_status_updates_are_not_changes_and_labels_are_shared() {
        let mut fold = synced_fold();
        let p = pod("u", "a", "w", "10.1.0.5", &[("app", "web")]);
        assert!(apply(&mut fold, Object::Pod(p.clone())));
        assert!(!apply(&mut fold, Object::Pod(p)));
        apply(
            &mut fold,
            Object::Pod(pod("v", "a", "w2", "10.1.0.6", &[("app", "web")])),
        );
        let index = fold.index();
        let labels = |ip: &str| match index.get(ip.parse().expect("ip")) {
            Some(Workload::Pod(p)) => p.labels.clone(),
            other => panic!("{other:?}"),
        };
        assert!(Arc::ptr_eq(&labels("10.1.0.5"), &labels("10.1.0.6")));
        assert!(index.get("::ffff:10.1.0.5".parse().expect("ip")).is_some());
    }
}
