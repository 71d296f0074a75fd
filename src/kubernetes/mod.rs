//! Pod identity from the Kubernetes API: watches Pods, Namespaces and Nodes, folds them into an
//! immutable address index, and answers "who is this client" with one lock-free load.
//!
//! # Shape
//! - [`KubernetesConfig`] is the `[kubernetes]` section (`enabled`, `kubeconfig`, `namespaces`,
//!   `pod_cidrs`), parsed and checked here ([`KubernetesConfig::validate`]).
//! - One background task per configuration ([`watch`]) runs three kinds of kube-rs watchers (one
//!   pod watcher per listed namespace, or one for all; one for namespaces; one for nodes), each
//!   with its own back-off, and folds their events ([`fold`]) into a [`WorkloadIndex`] that it
//!   swaps into an `ArcSwap` (at most every [`PUBLISH_INTERVAL`], right away for the first list).
//! - [`Kubernetes::identify`] is the identify stage: one load of the index, then, for a miss
//!   inside `pod_cidrs`, one bounded direct lookup ([`direct`]); then the policy's static
//!   sources and the node owning the address ([`crate::acl::Policy::identify_with`]).
//!
//! # Failure behaviour
//! Not ready (`/readyz` 503) until every watch has listed once. After that, a lost API server
//! keeps the last-known index (a warning per watch, the sync-age gauge grows) while the watchers
//! retry with back-off; a resumed watch continues from its resourceVersion, and one the server no
//! longer holds (`410 Gone`) re-lists, replacing the watch's objects only once the list is
//! complete. A reload that changes the section starts new watchers; the old index keeps
//! answering until the new one has listed, so no request waits for it.

mod direct;
mod fold;
mod metrics;
mod objects;
mod watch;

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use ipnet::IpNet;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::acl::{Identity, Policy, Workload, WorkloadIndex};

pub use direct::{DIRECT_NEGATIVE_TTL, DIRECT_RATE_PER_SECOND, DIRECT_TIMEOUT};
pub use fold::{Counts, Fold, Object, Scope};
pub use metrics::KubeMetrics;
pub use objects::{NamespaceObject, NodeObject, PodObject};

/// The index is republished at most this often while events stream in.
pub const PUBLISH_INTERVAL: Duration = Duration::from_millis(50);

/// `[kubernetes]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KubernetesConfig {
    /// Watch the API and identify clients as pods (default false).
    pub enabled: bool,
    /// Empty: `KUBECONFIG` if set, else the in-cluster service account; otherwise a path.
    pub kubeconfig: PathBuf,
    /// Watch pods of these namespaces only; empty: all.
    pub namespaces: Vec<String>,
    /// Where an unindexed client is "a pod not seen yet": a miss here gets one direct lookup.
    pub pod_cidrs: Vec<IpNet>,
}

/// An invalid `[kubernetes]` section: the key and what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {message}")]
pub struct KubernetesConfigError {
    pub key: String,
    pub message: String,
}

/// Where the client credentials come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials {
    /// A kubeconfig file (`kubeconfig`, or the first `KUBECONFIG` entry).
    Kubeconfig(PathBuf),
    /// The pod's service account (`KUBERNETES_SERVICE_HOST`, the mounted token and CA).
    InCluster,
}

/// A checked `[kubernetes]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub credentials: Credentials,
    pub namespaces: Vec<String>,
    pub pod_cidrs: Vec<IpNet>,
}

/// The live source of pod identities, shared by the request path, reloads and the admin server.
pub struct Kubernetes {
    inner: Arc<Inner>,
    runtime: tokio::runtime::Handle,
    running: Mutex<Option<Running>>,
}

struct Running {
    config: KubernetesConfig,
    task: tokio::task::JoinHandle<()>,
}

/// What the watcher task and the request path share.
struct Inner {
    enabled: AtomicBool,
    /// Every watch of the current configuration has listed once (true when disabled).
    synced: AtomicBool,
    index: ArcSwap<WorkloadIndex>,
    /// `pod_cidrs` and the direct lookup, once the task has a client.
    direct: ArcSwapOption<direct::DirectLookup>,
    pod_cidrs: ArcSwap<Vec<IpNet>>,
    metrics: KubeMetrics,
}

// === impl KubernetesConfig ===

impl KubernetesConfig {
    /// Checks names and prefixes, and reads the kubeconfig once so that a bad path or file is
    /// refused at load or reload (the old configuration stays).
    pub fn validate(&self) -> Result<Settings, KubernetesConfigError> {
        let err = |key: String, message: String| KubernetesConfigError { key, message };
        for (i, ns) in self.namespaces.iter().enumerate() {
            if !valid_namespace(ns) {
                return Err(err(
                    format!("kubernetes.namespaces[{i}]"),
                    format!("{ns:?} is not a namespace name (1-63 of [a-z0-9-])"),
                ));
            }
            if self.namespaces[..i].contains(ns) {
                return Err(err(
                    format!("kubernetes.namespaces[{i}]"),
                    format!("{ns:?} is listed twice"),
                ));
            }
        }
        for (i, net) in self.pod_cidrs.iter().enumerate() {
            if net.trunc() != *net {
                return Err(err(
                    format!("kubernetes.pod_cidrs[{i}]"),
                    format!("{net} has host bits set (did you mean {}?)", net.trunc()),
                ));
            }
        }
        let credentials = if !self.kubeconfig.as_os_str().is_empty() {
            Credentials::Kubeconfig(self.kubeconfig.clone())
        } else {
            match std::env::var_os("KUBECONFIG")
                .and_then(|v| std::env::split_paths(&v).find(|p| !p.as_os_str().is_empty()))
            {
                Some(path) => Credentials::Kubeconfig(path),
                None => Credentials::InCluster,
            }
        };
        if self.enabled
            && let Credentials::Kubeconfig(path) = &credentials
            && let Err(e) = kube::config::Kubeconfig::read_from(path)
        {
            return Err(err(
                "kubernetes.kubeconfig".into(),
                format!("cannot use {}: {e}", path.display()),
            ));
        }
        Ok(Settings {
            credentials,
            namespaces: self.namespaces.clone(),
            pod_cidrs: self.pod_cidrs.clone(),
        })
    }
}

/// A namespace name: a DNS-1123 label.
fn valid_namespace(ns: &str) -> bool {
    let b = ns.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b.first().is_some_and(u8::is_ascii_alphanumeric)
        && b.last().is_some_and(u8::is_ascii_alphanumeric)
}

// === impl Kubernetes ===

impl Kubernetes {
    /// Registers the metrics; nothing runs until [`Kubernetes::configure`]. The watcher tasks are
    /// spawned on `runtime`.
    pub fn new(runtime: tokio::runtime::Handle, metrics: &crate::metrics::Metrics) -> Self {
        Self {
            inner: Arc::new(Inner {
                enabled: AtomicBool::new(false),
                synced: AtomicBool::new(true),
                index: ArcSwap::from_pointee(WorkloadIndex::default()),
                direct: ArcSwapOption::empty(),
                pod_cidrs: ArcSwap::from_pointee(Vec::new()),
                metrics: KubeMetrics::register(metrics.registry()),
            }),
            runtime,
            running: Mutex::new(None),
        }
    }

    /// Applies a (validated) section: starts, restarts or stops the watchers when it changed.
    /// Readiness waits for the first list only when the watchers start from nothing; on a change
    /// the previous index answers until the new watchers have listed.
    pub fn configure(&self, config: &KubernetesConfig) -> Result<(), KubernetesConfigError> {
        let settings = config.validate()?;
        let mut running = self.running.lock();
        if running.as_ref().map(|r| &r.config) == Some(config)
            || (!config.enabled && running.is_none())
        {
            return Ok(());
        }
        let restarting = running.is_some();
        if let Some(old) = running.take() {
            old.task.abort();
        }
        self.inner.direct.store(None);
        if !config.enabled {
            self.inner.enabled.store(false, Ordering::Release);
            self.inner.index.store(Arc::new(WorkloadIndex::default()));
            self.inner.synced.store(true, Ordering::Release);
            self.inner.metrics.reset();
            tracing::info!("kubernetes identity off");
            return Ok(());
        }
        self.inner
            .pod_cidrs
            .store(Arc::new(settings.pod_cidrs.clone()));
        if !restarting {
            self.inner.synced.store(false, Ordering::Release);
        }
        self.inner.enabled.store(true, Ordering::Release);
        let task = self
            .runtime
            .spawn(watch::run(self.inner.clone(), Arc::new(settings)));
        *running = Some(Running {
            config: config.clone(),
            task,
        });
        Ok(())
    }

    /// Every watch has listed once (always true when disabled).
    pub fn is_synced(&self) -> bool {
        self.inner.synced.load(Ordering::Acquire)
    }

    pub fn is_enabled(&self) -> bool {
        self.inner.enabled.load(Ordering::Acquire)
    }

    /// The index the request path reads now.
    pub fn index(&self) -> Arc<WorkloadIndex> {
        self.inner.index.load_full()
    }

    /// The identify stage: live pod → static sources → node → unknown. A miss inside
    /// `pod_cidrs` first gets one bounded direct lookup (rate-limited, briefly cached).
    pub async fn identify(&self, policy: &Policy, client: IpAddr) -> Identity {
        if !self.inner.enabled.load(Ordering::Relaxed) {
            return policy.identify(client);
        }
        let ip = client.to_canonical();
        let hit = self.inner.index.load().get(ip).cloned();
        if hit.is_none()
            && self.inner.pod_cidrs.load().iter().any(|n| n.contains(&ip))
            && let Some(direct) = self.inner.direct.load_full()
            && let Some(pod) = direct.lookup(ip, &self.inner.index).await
        {
            return Identity::pod(pod);
        }
        policy.identify_with(ip, hit.as_ref())
    }

    /// What the index holds for an address (tests, tools).
    pub fn lookup(&self, ip: IpAddr) -> Option<Workload> {
        self.inner.index.load().get(ip).cloned()
    }
}

impl Drop for Kubernetes {
    fn drop(&mut self) {
        if let Some(r) = self.running.lock().take() {
            r.task.abort();
        }
    }
}

impl std::fmt::Debug for Kubernetes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kubernetes")
            .field("enabled", &self.is_enabled())
            .field("synced", &self.is_synced())
            .field("addresses", &self.inner.index.load().len())
            .finish()
    }
}

/// `kalmar explain`: what the API says about `ip` right now (a pod, else a node), with one
/// client built from `config`. `Ok(None)`: nothing owns the address.
pub async fn resolve_once(
    config: &KubernetesConfig,
    ip: IpAddr,
) -> Result<Option<Workload>, String> {
    let settings = config.validate().map_err(|e| e.to_string())?;
    let client = watch::client(&settings)
        .await
        .map_err(|e| format!("kubernetes client: {e}"))?;
    direct::resolve_once(&client, &settings.namespaces, ip.to_canonical()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_key() {
        let bad = [
            (
                KubernetesConfig {
                    namespaces: vec!["ok".into(), "Bad_ns".into()],
                    ..Default::default()
                },
                "kubernetes.namespaces[1]: \"Bad_ns\" is not a namespace name",
            ),
            (
                KubernetesConfig {
                    namespaces: vec!["a".into(), "a".into()],
                    ..Default::default()
                },
                "kubernetes.namespaces[1]: \"a\" is listed twice",
            ),
            (
                KubernetesConfig {
                    pod_cidrs: vec!["10.1.2.3/16".parse().expect("net")],
                    ..Default::default()
                },
                "kubernetes.pod_cidrs[0]: 10.1.2.3/16 has host bits set (did you mean 10.1.0.0/16?)",
            ),
            (
                KubernetesConfig {
                    enabled: true,
                    kubeconfig: "/nonexistent/kubeconfig".into(),
                    ..Default::default()
                },
                "kubernetes.kubeconfig: cannot use /nonexistent/kubeconfig",
            ),
        ];
        for (cfg, want) in bad {
            let got = cfg.validate().expect_err(want).to_string();
            assert!(got.starts_with(want), "{got}\n  wanted {want}");
        }
        let ok = KubernetesConfig {
            kubeconfig: "/some/file".into(),
            namespaces: vec!["kaapana".into()],
            pod_cidrs: vec![
                "10.1.0.0/16".parse().expect("net"),
                "fd00::/64".parse().expect("net"),
            ],
            ..Default::default()
        };
        let s = ok
            .validate()
            .expect("a disabled section does not read its kubeconfig");
        assert_eq!(s.credentials, Credentials::Kubeconfig("/some/file".into()));
    }

    #[test]
    fn section_denies_unknown_keys() {
        let err = toml::from_str::<KubernetesConfig>("enabled = true\nnamespace = [\"a\"]\n")
            .expect_err("typo");
        assert!(
            err.to_string().contains("unknown field `namespace`"),
            "{err}"
        );
        let cfg: KubernetesConfig =
            toml::from_str("enabled = true\npod_cidrs = [\"10.1.0.0/16\"]\n").expect("valid");
        assert!(cfg.enabled && cfg.kubeconfig.as_os_str().is_empty());
    }
}
