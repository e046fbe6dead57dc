//! Kubernetes Service + EndpointSlice YAML, as the kproxy agent reads it with `--manifests`.
//!
//! ```
//! use kproxy_e2e::manifest::{Protocol, ServiceSpec};
//! let web = ServiceSpec::new("web", "10.96.0.10".parse().unwrap(), 80, "http", Protocol::Tcp, 8080)
//!     .endpoint("pod-a", "10.244.1.10".parse().unwrap(), true);
//! assert_eq!(web.ready_backends(), ["10.244.1.10:8080"]);
//! let yaml = kproxy_e2e::manifest::to_yaml(&[web]);
//! assert!(yaml.contains("kind: EndpointSlice"));
//! ```

use std::fmt::Write;
use std::net::Ipv4Addr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        }
    }
}

/// One endpoint (pod) of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub pod: String,
    pub ip: Ipv4Addr,
    pub ready: bool,
}

/// A ClusterIP service (a NodePort one with [`ServiceSpec::node_port`]) with one port, in
/// namespace `default`, and its single EndpointSlice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    pub namespace: String,
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    /// `spec.ports[0].nodePort`: the service is of type NodePort.
    pub node_port: Option<u16>,
    pub port_name: String,
    pub protocol: Protocol,
    pub target_port: u16,
    pub endpoints: Vec<Endpoint>,
}

impl ServiceSpec {
    pub fn new(
        name: &str,
        cluster_ip: Ipv4Addr,
        port: u16,
        port_name: &str,
        protocol: Protocol,
        target_port: u16,
    ) -> ServiceSpec {
        ServiceSpec {
            namespace: "default".into(),
            name: name.into(),
            cluster_ip,
            port,
            node_port: None,
            port_name: port_name.into(),
            protocol,
            target_port,
            endpoints: Vec::new(),
        }
    }

    /// Adds an endpoint.
    pub fn endpoint(mut self, pod: &str, ip: Ipv4Addr, ready: bool) -> ServiceSpec {
        self.endpoints.push(Endpoint {
            pod: pod.into(),
            ip,
            ready,
        });
        self
    }

    /// Makes it a NodePort service on `node_port`.
    pub fn node_port(mut self, node_port: u16) -> ServiceSpec {
        self.node_port = Some(node_port);
        self
    }

    /// Removes the endpoint of `pod`.
    pub fn without(mut self, pod: &str) -> ServiceSpec {
        self.endpoints.retain(|e| e.pod != pod);
        self
    }

    /// `clusterIP:port`, as `kproxy dump` prints the frontend.
    pub fn frontend(&self) -> String {
        format!("{}:{}", self.cluster_ip, self.port)
    }

    /// `ip:targetPort` of every ready endpoint, sorted: the backends kproxy should program.
    pub fn ready_backends(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .endpoints
            .iter()
            .filter(|e| e.ready)
            .map(|e| format!("{}:{}", e.ip, self.target_port))
            .collect();
        v.sort();
        v
    }

    fn write_yaml(&self, out: &mut String) {
        let (ns, name, proto) = (&self.namespace, &self.name, self.protocol.as_str());
        let (ip, port, port_name) = (self.cluster_ip, self.port, &self.port_name);
        let target = self.target_port;
        let (kind, node_port) = match self.node_port {
            Some(np) => ("NodePort", format!("\n    nodePort: {np}")),
            None => ("ClusterIP", String::new()),
        };
        let _ = write!(
            out,
            "apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: {ns}
spec:
  type: {kind}
  clusterIP: {ip}
  clusterIPs:
  - {ip}
  ports:
  - name: {port_name}
    port: {port}{node_port}
    protocol: {proto}
    targetPort: {target}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-slice
  namespace: {ns}
  labels:
    kubernetes.io/service-name: {name}
addressType: IPv4
ports:
- name: {port_name}
  port: {target}
  protocol: {proto}
"
        );
        if self.endpoints.is_empty() {
            out.push_str("endpoints: []\n");
            return;
        }
        out.push_str("endpoints:\n");
        for e in &self.endpoints {
            let _ = write!(
                out,
                "- addresses:
  - {ip}
  conditions:
    ready: {ready}
  targetRef:
    kind: Pod
    name: {pod}
    namespace: {ns}
",
                ip = e.ip,
                ready = e.ready,
                pod = e.pod,
            );
        }
    }
}

/// All services as one multi-document YAML file.
pub fn to_yaml(services: &[ServiceSpec]) -> String {
    let mut out = String::new();
    for (i, s) in services.iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        s.write_yaml(&mut out);
    }
    out
}
