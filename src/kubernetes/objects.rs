//! The three watched kinds, decoded into only the fields identity needs.
//!
//! The API sends whole objects (a pod's JSON is often 5-20 KiB with `managedFields`); decoding
//! into these types skips everything else while parsing, so neither a list page nor an event
//! ever holds a full `k8s_openapi` Pod.

use std::borrow::Cow;
use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::{ClusterResourceScope, NamespaceResourceScope};
use kube::Resource;
use serde::{Deserialize, Deserializer};

/// A Pod: identity fields only.
#[derive(Debug, Clone, Deserialize)]
pub struct PodObject {
    #[serde(deserialize_with = "slim_meta")]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PodSpec,
    #[serde(default)]
    pub status: PodStatus,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct PodSpec {
    #[serde(default, rename = "hostNetwork")]
    pub host_network: bool,
    #[serde(default, rename = "serviceAccountName")]
    pub service_account_name: Option<String>,
    #[serde(default, rename = "nodeName")]
    pub node_name: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct PodStatus {
    #[serde(default)]
    pub phase: Option<String>,
    #[serde(default, rename = "podIP")]
    pub pod_ip: Option<String>,
    #[serde(default, rename = "podIPs")]
    pub pod_ips: Vec<PodIp>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PodIp {
    pub ip: String,
}

/// A Namespace: its name and labels.
#[derive(Debug, Clone, Deserialize)]
pub struct NamespaceObject {
    #[serde(deserialize_with = "slim_meta")]
    pub metadata: ObjectMeta,
}

/// A Node: its name and addresses.
#[derive(Debug, Clone, Deserialize)]
pub struct NodeObject {
    #[serde(deserialize_with = "slim_meta")]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub status: NodeStatus,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct NodeStatus {
    #[serde(default)]
    pub addresses: Vec<NodeAddress>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct NodeAddress {
    #[serde(rename = "type")]
    pub kind: String,
    pub address: String,
}

/// The metadata fields kept: everything else (annotations, managedFields, owners) is skipped.
#[derive(Deserialize)]
struct SlimMeta {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    uid: Option<String>,
    #[serde(default, rename = "resourceVersion")]
    resource_version: Option<String>,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
}

fn slim_meta<'de, D: Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    let m = SlimMeta::deserialize(d)?;
    Ok(ObjectMeta {
        name: m.name,
        namespace: m.namespace,
        uid: m.uid,
        resource_version: m.resource_version,
        labels: m.labels,
        ..ObjectMeta::default()
    })
}

/// `Resource` for a core/v1 kind with a fixed plural.
macro_rules! core_v1 {
    ($ty:ty, $kind:literal, $plural:literal, $scope:ty) => {
        impl Resource for $ty {
            type DynamicType = ();
            type Scope = $scope;

            fn kind(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($kind)
            }
            fn group(_: &()) -> Cow<'_, str> {
                Cow::Borrowed("")
            }
            fn version(_: &()) -> Cow<'_, str> {
                Cow::Borrowed("v1")
            }
            fn plural(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($plural)
            }
            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

core_v1!(PodObject, "Pod", "pods", NamespaceResourceScope);
core_v1!(
    NamespaceObject,
    "Namespace",
    "namespaces",
    ClusterResourceScope
);
core_v1!(NodeObject, "Node", "nodes", ClusterResourceScope);

// === impl PodObject ===

impl PodObject {
    /// Phases that hold an address a pod sends from (a pod without a phase yet counts as Pending).
    pub fn is_live(&self) -> bool {
        matches!(
            self.status.phase.as_deref(),
            None | Some("Pending" | "Running" | "Unknown")
        )
    }

    /// Every pod IP (`podIPs`, else `podIP`), parsed; unparsable ones are skipped.
    pub fn ips(&self) -> smallvec::SmallVec<[std::net::IpAddr; 2]> {
        let mut out = smallvec::SmallVec::new();
        let listed = self.status.pod_ips.iter().map(|p| p.ip.as_str());
        for raw in listed.chain(self.status.pod_ip.as_deref()) {
            if let Ok(ip) = raw.parse::<std::net::IpAddr>() {
                let ip = ip.to_canonical();
                if !out.contains(&ip) {
                    out.push(ip);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_only_identity_fields_from_a_full_pod() {
        let json = r#"{
          "apiVersion": "v1", "kind": "Pod",
          "metadata": {"name": "web-1", "namespace": "shop", "uid": "u-1",
            "resourceVersion": "42", "labels": {"app": "web"},
            "annotations": {"big": "x"},
            "managedFields": [{"manager": "kubectl", "fieldsV1": {"f:spec": {}}}]},
          "spec": {"containers": [{"name": "c", "image": "nginx"}],
            "serviceAccountName": "web-sa", "nodeName": "node-a"},
          "status": {"phase": "Running", "podIP": "10.1.0.5",
            "podIPs": [{"ip": "10.1.0.5"}, {"ip": "fd00::5"}],
            "conditions": [{"type": "Ready", "status": "True"}]}
        }"#;
        let pod: PodObject = serde_json::from_str(json).expect("pod");
        assert_eq!(pod.metadata.name.as_deref(), Some("web-1"));
        assert_eq!(pod.metadata.resource_version.as_deref(), Some("42"));
        assert!(pod.metadata.annotations.is_none());
        assert!(pod.metadata.managed_fields.is_none());
        assert_eq!(pod.spec.service_account_name.as_deref(), Some("web-sa"));
        assert!(pod.is_live());
        let ips: Vec<String> = pod.ips().iter().map(|i| i.to_string()).collect();
        assert_eq!(ips, ["10.1.0.5", "fd00::5"]);
        for (phase, live) in [
            ("Pending", true),
            ("Running", true),
            ("Succeeded", false),
            ("Failed", false),
        ] {
            let mut p = pod.clone();
            p.status.phase = Some(phase.into());
            assert_eq!(p.is_live(), live, "{phase}");
        }
    }

    #[test]
    fn node_addresses_and_namespace_labels() {
        let node: NodeObject = serde_json::from_str(
            r#"{"metadata": {"name": "n1", "uid": "n"}, "status": {"addresses": [
                {"type": "InternalIP", "address": "10.0.0.4"}, {"type": "Hostname", "address": "n1"}]}}"#,
        )
        .expect("node");
        assert_eq!(node.status.addresses.len(), 2);
        assert_eq!(NodeObject::plural(&()), "nodes");
        assert_eq!(
            PodObject::url_path(&(), Some("x")),
            "/api/v1/namespaces/x/pods"
        );
        let ns: NamespaceObject =
            serde_json::from_str(r#"{"metadata": {"name": "x", "labels": {"team": "a"}}}"#)
                .expect("namespace");
        assert_eq!(ns.metadata.labels.map(|l| l.len()), Some(1));
    }
}
