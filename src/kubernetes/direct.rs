//! The direct lookup for a client the index does not hold yet: a pod can send before its watch
//! event arrives. One `GET /api/v1/pods?fieldSelector=status.podIP=<ip>`, bounded by
//! [`DIRECT_TIMEOUT`], at most [`DIRECT_RATE_PER_SECOND`] per second in all; "no such pod" is
//! kept for [`DIRECT_NEGATIVE_TTL`]; concurrent lookups of one address share one request. A
//! found pod is not cached: the watch follows it from there.
//!
//! The field selector matches a pod's primary address (`status.podIP`): the secondary family of
//! a dual-stack pod is known from the watch only.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use kube::Api;
use kube::api::ListParams;

use super::metrics::KubeMetrics;
use super::objects::{NamespaceObject, NodeObject, PodObject};
use crate::acl::{
    Labels, NodeIdentity, PodIdentity, Workload, WorkloadIndex, namespace_name_labels,
};

/// The longest a request waits for a direct lookup.
pub const DIRECT_TIMEOUT: Duration = Duration::from_millis(500);
/// Direct lookups per second, for all clients together (a burst of as many is allowed).
pub const DIRECT_RATE_PER_SECOND: u32 = 20;
/// How long a "no such pod" answer is reused.
pub const DIRECT_NEGATIVE_TTL: Duration = Duration::from_secs(2);

pub(super) struct DirectLookup {
    client: kube::Client,
    namespaces: Vec<String>,
    limiter: DefaultDirectRateLimiter,
    cache: moka::future::Cache<IpAddr, Option<Arc<PodIdentity>>>,
    metrics: KubeMetrics,
}

// === impl DirectLookup ===

impl DirectLookup {
    pub(super) fn new(client: kube::Client, namespaces: Vec<String>, metrics: KubeMetrics) -> Self {
        let rate = NonZeroU32::new(DIRECT_RATE_PER_SECOND).unwrap_or(NonZeroU32::MIN);
        Self {
            client,
            namespaces,
            limiter: RateLimiter::direct(Quota::per_second(rate)),
            cache: moka::future::Cache::builder()
                .max_capacity(4096)
                .time_to_live(DIRECT_NEGATIVE_TTL)
                .build(),
            metrics,
        }
    }

    /// The pod that owns `ip` now, if exactly one live pod does.
    pub(super) async fn lookup(
        &self,
        ip: IpAddr,
        index: &ArcSwap<WorkloadIndex>,
    ) -> Option<Arc<PodIdentity>> {
        if let Some(answer) = self.cache.get(&ip).await {
            self.metrics.direct("cached");
            return answer;
        }
        let answer = self
            .cache
            .try_get_with(ip, async {
                if self.limiter.check().is_err() {
                    return Err("rate-limited");
                }
                match tokio::time::timeout(
                    DIRECT_TIMEOUT,
                    find_pod(&self.client, &self.namespaces, ip),
                )
                .await
                {
                    Ok(Ok(Some(pod))) => {
                        let ns = pod.metadata.namespace.as_deref().unwrap_or_default();
                        let ns_labels = index.load().namespace_labels(ns);
                        let found = pod_identity(&pod, ns_labels).map(Arc::new);
                        self.metrics
                            .direct(if found.is_some() { "found" } else { "not-found" });
                        Ok(found)
                    }
                    Ok(Ok(None)) => {
                        self.metrics.direct("not-found");
                        Ok(None)
                    }
                    Ok(Err(error)) => {
                        tracing::warn!(%ip, %error, "direct pod lookup failed");
                        Err("error")
                    }
                    Err(_) => {
                        tracing::warn!(%ip, timeout = ?DIRECT_TIMEOUT, "direct pod lookup timed out");
                        Err("error")
                    }
                }
            })
            .await;
        match answer {
            Ok(Some(found)) => {
                // Only "not found" is remembered: a found pod is the watch's to follow (it may
                // finish or change labels before its events arrive).
                self.cache.invalidate(&ip).await;
                Some(found)
            }
            Ok(None) => None,
            Err(kind) => {
                self.metrics.direct(*kind);
                None
            }
        }
    }
}

/// The one live, non-hostNetwork pod whose address is `ip` (none when two claim it).
pub(super) async fn find_pod(
    client: &kube::Client,
    namespaces: &[String],
    ip: IpAddr,
) -> Result<Option<PodObject>, kube::Error> {
    let params = ListParams::default().fields(&format!("status.podIP={ip}"));
    let apis: Vec<Api<PodObject>> = if namespaces.is_empty() {
        vec![Api::all(client.clone())]
    } else {
        namespaces
            .iter()
            .map(|ns| Api::namespaced(client.clone(), ns))
            .collect()
    };
    let mut found = Vec::new();
    for api in apis {
        let list = api.list(&params).await?;
        found.extend(
            list.items
                .into_iter()
                .filter(|p| p.is_live() && !p.spec.host_network && p.ips().contains(&ip)),
        );
    }
    Ok(if found.len() == 1 { found.pop() } else { None })
}

/// A pod's identity from its object (None without a namespace or name).
pub(super) fn pod_identity(pod: &PodObject, namespace_labels: Arc<Labels>) -> Option<PodIdentity> {
    let ns = pod.metadata.namespace.as_deref()?;
    let name = pod.metadata.name.as_deref()?;
    Some(PodIdentity::new(
        Arc::from(ns),
        name,
        Arc::new(pod.metadata.labels.clone().unwrap_or_default()),
        namespace_labels,
        Arc::from(
            pod.spec
                .service_account_name
                .as_deref()
                .unwrap_or("default"),
        ),
        pod.spec.node_name.as_deref().map(Arc::from),
    ))
}

/// For `kalmar explain`: the pod owning `ip`, else the node, asked of the API directly.
pub(super) async fn resolve_once(
    client: &kube::Client,
    namespaces: &[String],
    ip: IpAddr,
) -> Result<Option<Workload>, String> {
    let api_err = |what: &str| {
        let what = what.to_owned();
        move |e: kube::Error| format!("listing {what}: {e}")
    };
    if let Some(pod) = find_pod(client, namespaces, ip)
        .await
        .map_err(api_err("pods"))?
    {
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let labels = match Api::<NamespaceObject>::all(client.clone())
            .get_opt(&ns)
            .await
        {
            Ok(Some(obj)) => {
                let mut labels = obj.metadata.labels.unwrap_or_default();
                labels.extend(namespace_name_labels(&ns));
                labels
            }
            _ => namespace_name_labels(&ns),
        };
        return Ok(pod_identity(&pod, Arc::new(labels)).map(|p| Workload::Pod(Arc::new(p))));
    }
    let nodes = Api::<NodeObject>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(api_err("nodes"))?;
    Ok(nodes.items.into_iter().find_map(|n| {
        let owns = n.status.addresses.iter().any(|a| {
            (a.kind == "InternalIP" || a.kind == "ExternalIP")
                && a.address.parse::<IpAddr>().map(|x| x.to_canonical()) == Ok(ip)
        });
        let name = n.metadata.name?;
        owns.then(|| Workload::Node(Arc::new(NodeIdentity::new(Arc::from(name)))))
    }))
}
