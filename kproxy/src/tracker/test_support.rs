//! What the tracker's tests share: one-port Services and one-port slices, and their frontends.

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use crate::model::{Frontend, Protocol};

pub(super) fn service(name: &str, ip: &str) -> Service {
    crate::sources::manifests::parse_objects(&format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{clusterIP: {ip}, ports: [{{port: 80}}]}}\n")).0.remove(0)
}

pub(super) fn slice(name: &str, svc: &str, ips: &[&str]) -> EndpointSlice {
    let eps: Vec<String> = ips.iter().map(|ip| format!("{{addresses: [{ip}]}}")).collect();
    crate::sources::manifests::parse_objects(&format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, labels: {{kubernetes.io/service-name: {svc}}}}}\naddressType: IPv4\nports: [{{port: 8080}}]\nendpoints: [{}]\n",
        eps.join(", ")
    ))
    .1
    .remove(0)
}

pub(super) fn fe(ip: &str) -> Frontend {
    Frontend { address: ip.parse().unwrap(), port: 80, protocol: Protocol::Tcp }
}
