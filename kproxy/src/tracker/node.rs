//! This node as the model sees it: the addresses NodePorts are served on, its name (which
//! endpoints are local) and its zone (topology hints). A change rebuilds the Services it touches.

use super::ModelStore;
use crate::model::NodeTopology;

impl ModelStore {
    /// Sets the addresses NodePorts are served on; every Service with a NodePort is rebuilt.
    pub fn set_node_addresses(&mut self, mut addresses: Vec<std::net::Ipv4Addr>) {
        addresses.sort();
        addresses.dedup();
        if addresses != self.node_addresses {
            self.node_addresses = addresses;
            let with_node_ports = self.services.iter().filter(|(_, s)| s.ports.iter().any(|p| p.node_port.is_some()));
            self.service_changes.extend(with_node_ports.map(|(k, _)| k.clone()));
        }
    }

    /// Sets this node's name (endpoints with this `nodeName` are local).
    pub fn set_node_name(&mut self, name: Option<String>) {
        if name != self.node_name {
            self.node_name = name;
            self.service_changes.extend(self.services.keys().cloned());
        }
    }

    /// Sets this node's zone (from its `topology.kubernetes.io/zone` label), for topology hints.
    pub fn set_node_zone(&mut self, zone: Option<String>) {
        if zone != self.node_zone {
            self.node_zone = zone;
            self.service_changes.extend(self.services.keys().cloned());
        }
    }

    pub(super) fn topology(&self) -> NodeTopology<'_> {
        NodeTopology { name: self.node_name.as_deref(), zone: self.node_zone.as_deref() }
    }
}

#[cfg(test)]
mod tests {
    use super::super::ModelStore;
    use crate::model::{Frontend, FrontendKind, Protocol};

    #[test]
    fn node_ports_external_and_load_balancer_ips_are_frontends_too() {
        let (services, slices) = crate::sources::manifests::parse_objects(
            r#"
apiVersion: v1
kind: Service
metadata: {name: lb}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.7
  externalIPs: [198.51.100.7, "2001:db8::7"]
  ports: [{name: http, port: 80, nodePort: 30080}]
status: {loadBalancer: {ingress: [{ip: 203.0.113.7}, {hostname: lb.example.com}]}}
---
apiVersion: v1
kind: Service
metadata: {name: bad-np}
spec: {type: NodePort, clusterIP: 10.96.0.8, ports: [{port: 80, nodePort: 70000}]}
"#,
        );
        let mut store = ModelStore::default();
        store.set_node_addresses(vec!["192.168.50.2".parse().unwrap(), "192.168.60.2".parse().unwrap()]);
        store.replace_all(&services, &slices);
        store.take_changes();
        let kinds: Vec<(String, FrontendKind)> =
            store.desired().iter().map(|(f, d)| (format!("{}:{}", f.address, f.port), d.frontend_type)).collect();
        assert_eq!(
            kinds,
            [
                ("10.96.0.7:80".to_string(), FrontendKind::ClusterIp),
                ("192.168.50.2:30080".to_string(), FrontendKind::NodePort),
                ("192.168.60.2:30080".to_string(), FrontendKind::NodePort),
                ("198.51.100.7:80".to_string(), FrontendKind::ExternalIp),
                ("203.0.113.7:80".to_string(), FrontendKind::LoadBalancer),
            ]
        );
        let errors: Vec<String> = store.invalid().map(ToString::to_string).collect();
        assert_eq!(errors, ["Service default/bad-np: spec.ports[0].nodePort: 70000 is out of range 1-65535"]);
        // A node address change rebuilds NodePort frontends only.
        store.set_node_addresses(vec!["192.168.50.2".parse().unwrap()]);
        let changed = store.take_changes().frontends;
        let f = |a: &str, p| Frontend { address: a.parse().unwrap(), port: p, protocol: Protocol::Tcp };
        assert_eq!(changed, [f("192.168.60.2", 30080)].into());
    }
}
