//! What each `healthCheckNodePort` answers: the number of this node's ready endpoints of its
//! Service (kube-proxy's `ServiceHealthServer` inputs).

use std::collections::{BTreeMap, BTreeSet};

use super::ModelStore;
use crate::health::ServiceHealthCheck;

impl ModelStore {
    /// The `healthCheckNodePort`s to serve: for every Service with `externalTrafficPolicy:
    /// Local`, its ready endpoints on this node (distinct addresses, over all its slices).
    pub fn health_checks(&self) -> BTreeMap<u16, ServiceHealthCheck> {
        let mut out = BTreeMap::new();
        for (key, svc) in &self.services {
            let Some(port) = svc.health_check_node_port.filter(|_| svc.external_policy_local) else { continue };
            let local: BTreeSet<std::net::Ipv4Addr> = self
                .slices_of(key)
                .flat_map(|s| &s.endpoints)
                .filter(|ep| ep.ready && self.node_name.is_some() && ep.node_name() == self.node_name.as_deref())
                .map(|ep| ep.address)
                .collect();
            out.insert(
                port,
                ServiceHealthCheck { namespace: key.0.clone(), name: key.1.clone(), local_endpoints: local.len() },
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::super::ModelStore;
    use crate::model::Frontend;

    #[test]
    fn external_traffic_policy_local_uses_only_this_nodes_endpoints_from_outside() {
        let (services, slices) = crate::sources::manifests::parse_objects(
            r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: NodePort
  clusterIP: 10.96.0.7
  externalTrafficPolicy: Local
  healthCheckNodePort: 32000
  ports: [{port: 80, nodePort: 30080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [10.244.1.5], nodeName: node-a}
- {addresses: [10.244.2.5], nodeName: node-b}
"#,
        );
        let mut store = ModelStore::default();
        store.set_node_addresses(vec!["192.168.50.2".parse().unwrap()]);
        store.set_node_name(Some("node-a".into()));
        store.replace_all(&services, &slices);
        store.take_changes();
        let backends: Vec<(String, Vec<String>)> = store
            .desired()
            .iter()
            .map(|(f, d)| (format!("{}:{}", f.address, f.port), d.backends.iter().map(ToString::to_string).collect()))
            .collect();
        assert_eq!(
            backends,
            [
                ("10.96.0.7:80".to_string(), vec!["10.244.1.5:8080".to_string(), "10.244.2.5:8080".to_string()]),
                ("192.168.50.2:30080".to_string(), vec!["10.244.1.5:8080".to_string()]),
            ]
        );
        let checks = store.health_checks();
        assert_eq!(checks.len(), 1);
        assert_eq!((checks[&32000].name.as_str(), checks[&32000].local_endpoints), ("web", 1));
        // Another node sees its own endpoint only.
        store.set_node_name(Some("node-b".into()));
        assert_eq!(store.take_changes().frontends.len(), 1);
        let np = &store.desired()[&Frontend { address: "192.168.50.2".parse().unwrap(), port: 30080, protocol: crate::model::Protocol::Tcp }];
        assert_eq!(np.backends, ["10.244.2.5:8080".parse().unwrap()]);
    }
}
