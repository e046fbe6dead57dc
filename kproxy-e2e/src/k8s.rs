//! Typed Kubernetes objects (k8s-openapi) for the fake apiserver, built from the same
//! [`ServiceSpec`]s the manifest tests use, so `Dump::matches_all` works for both sources.
//!
//! ```
//! use kproxy_e2e::k8s;
//! use kproxy_e2e::manifest::{Protocol, ServiceSpec};
//! let web = ServiceSpec::new("web", "10.96.0.10".parse().unwrap(), 80, "http", Protocol::Tcp, 8080)
//!     .endpoint("pod-a", "10.244.1.10".parse().unwrap(), true)
//!     .endpoint("pod-b", "10.244.1.11".parse().unwrap(), true);
//! let svc = k8s::service(&web);
//! assert_eq!(svc.spec.unwrap().cluster_ip.as_deref(), Some("10.96.0.10"));
//! let slices = k8s::slices(&web, 2);
//! assert_eq!(slices.len(), 2);
//! assert_eq!(slices[1].endpoints[0].addresses, ["10.244.1.11"]);
//! ```

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Node, NodeSpec, ObjectReference, Service, ServicePort, ServiceSpec as K8sServiceSpec, Taint,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::manifest::{self, ServiceSpec};

/// The label tying an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The annotation kube-proxy measures network programming latency from.
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";
/// The taint the cluster autoscaler puts on a node it is about to delete.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

fn meta(namespace: &str, name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some(namespace.into()),
        ..ObjectMeta::default()
    }
}

/// The Service of `spec`: ClusterIP, or NodePort if it has one.
pub fn service(spec: &ServiceSpec) -> Service {
    Service {
        metadata: meta(&spec.namespace, &spec.name),
        spec: Some(K8sServiceSpec {
            type_: Some(if spec.node_port.is_some() { "NodePort" } else { "ClusterIP" }.into()),
            cluster_ip: Some(spec.cluster_ip.to_string()),
            cluster_ips: Some(vec![spec.cluster_ip.to_string()]),
            ports: Some(vec![ServicePort {
                name: Some(spec.port_name.clone()),
                port: spec.port.into(),
                protocol: Some(spec.protocol.as_str().into()),
                target_port: Some(IntOrString::Int(spec.target_port.into())),
                node_port: spec.node_port.map(i32::from),
                ..ServicePort::default()
            }]),
            ..K8sServiceSpec::default()
        }),
        status: None,
    }
}

fn endpoint(spec: &ServiceSpec, e: &manifest::Endpoint) -> Endpoint {
    Endpoint {
        addresses: vec![e.ip.to_string()],
        conditions: Some(EndpointConditions {
            ready: Some(e.ready),
            serving: Some(e.ready),
            terminating: Some(false),
        }),
        target_ref: Some(ObjectReference {
            kind: Some("Pod".into()),
            name: Some(e.pod.clone()),
            namespace: Some(spec.namespace.clone()),
            ..ObjectReference::default()
        }),
        ..Endpoint::default()
    }
}

/// An EndpointSlice `name` of `spec`'s service holding `endpoints` (a subset of its own).
pub fn slice_with(
    spec: &ServiceSpec,
    name: &str,
    endpoints: &[manifest::Endpoint],
) -> EndpointSlice {
    let mut metadata = meta(&spec.namespace, name);
    metadata.labels = Some(BTreeMap::from([
        (SERVICE_NAME_LABEL.to_string(), spec.name.clone()),
        (
            "endpointslice.kubernetes.io/managed-by".to_string(),
            "endpointslice-controller.k8s.io".to_string(),
        ),
    ]));
    EndpointSlice {
        metadata,
        address_type: "IPv4".into(),
        endpoints: endpoints.iter().map(|e| endpoint(spec, e)).collect(),
        ports: Some(vec![EndpointPort {
            name: Some(spec.port_name.clone()),
            port: Some(spec.target_port.into()),
            protocol: Some(spec.protocol.as_str().into()),
            app_protocol: None,
        }]),
    }
}

/// The single slice `<name>-slice` with all of `spec`'s endpoints (as the manifests have it).
pub fn slice(spec: &ServiceSpec) -> EndpointSlice {
    slice_with(spec, &format!("{}-slice", spec.name), &spec.endpoints)
}

/// `n` slices `<name>-0` .. `<name>-(n-1)`, endpoints dealt round-robin (some may be empty).
pub fn slices(spec: &ServiceSpec, n: usize) -> Vec<EndpointSlice> {
    let n = n.max(1);
    (0..n)
        .map(|i| {
            let mine: Vec<manifest::Endpoint> = spec
                .endpoints
                .iter()
                .enumerate()
                .filter(|(j, _)| j % n == i)
                .map(|(_, e)| e.clone())
                .collect();
            slice_with(spec, &format!("{}-{i}", spec.name), &mine)
        })
        .collect()
}

/// Sets the `last-change-trigger-time` annotation to now (as the EndpointSlice controller
/// does), so the agent can observe network programming latency.
pub fn triggered_now(mut slice: EndpointSlice) -> EndpointSlice {
    slice
        .metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(TRIGGER_TIME_ANNOTATION.into(), rfc3339_now());
    slice
}

/// Now, RFC 3339 with nanoseconds (`2025-01-02T03:04:05.123456789Z`).
pub fn rfc3339_now() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    k8s_openapi::jiff::Timestamp::new(now.as_secs() as i64, now.subsec_nanos() as i32)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}

/// A Node called `name`, with the usual hostname and zone labels.
pub fn node(name: &str) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(BTreeMap::from([
                ("kubernetes.io/hostname".to_string(), name.to_string()),
                ("kubernetes.io/os".to_string(), "linux".to_string()),
                (
                    "topology.kubernetes.io/zone".to_string(),
                    "zone-a".to_string(),
                ),
            ])),
            ..ObjectMeta::default()
        },
        spec: Some(NodeSpec {
            pod_cidr: Some("10.244.1.0/24".into()),
            pod_cidrs: Some(vec!["10.244.1.0/24".into()]),
            ..NodeSpec::default()
        }),
        status: None,
    }
}

/// `node` with the cluster autoscaler's `ToBeDeletedByClusterAutoscaler` taint.
pub fn tainted_to_be_deleted(mut node: Node) -> Node {
    let spec = node.spec.get_or_insert_with(NodeSpec::default);
    spec.taints.get_or_insert_with(Vec::new).push(Taint {
        key: TO_BE_DELETED_TAINT.into(),
        value: Some("1700000000".into()),
        effect: "NoSchedule".into(),
        time_added: None,
    });
    node
}
