//! Service ports a `Local` traffic policy leaves without an endpoint on this node although they
//! have some elsewhere (their traffic is dropped), counted as kube-proxy's
//! `sync_proxy_rules_no_local_endpoints_total` counts them.

use std::{collections::HashMap, sync::Arc};

use super::ModelStore;
use crate::model::{DesiredService, FrontendKind, ServicePortName};

/// How many frontends of each service port are in that state, by service port and whether the
/// policy is the external one (NodePort, external and load-balancer IPs) or the internal one.
#[derive(Debug, Default)]
pub(super) struct Unserved(HashMap<(Arc<ServicePortName>, bool), usize>);

impl Unserved {
    /// Follows one frontend's desired entry going from `old` to `new`.
    pub fn update(&mut self, old: Option<&DesiredService>, new: Option<&DesiredService>) {
        self.count(old, -1);
        self.count(new, 1);
    }

    fn count(&mut self, d: Option<&DesiredService>, delta: isize) {
        let Some(d) = d.filter(|d| d.drop_unserved) else { return };
        let key = (d.name.clone(), d.frontend_type != FrontendKind::ClusterIp);
        let count = self.0.entry(key.clone()).or_default();
        *count = count.saturating_add_signed(delta);
        if *count == 0 {
            self.0.remove(&key);
        }
    }
}

impl ModelStore {
    /// Service ports with a `Local` traffic policy that have endpoints but none on this node
    /// (their traffic is dropped), as kube-proxy's
    /// `sync_proxy_rules_no_local_endpoints_total`: `(internal, external)`.
    pub fn no_local_endpoints(&self) -> (usize, usize) {
        let external = self.unserved.0.keys().filter(|(_, external)| *external).count();
        (self.unserved.0.len() - external, external)
    }
}

#[cfg(test)]
mod tests {
    use super::super::ModelStore;
    use crate::model::{Frontend, Protocol};

    #[test]
    fn in_cluster_clients_of_an_external_traffic_policy_local_node_port_follow_the_cluster_endpoints() {
        let yaml = |endpoints: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.7\n  \
                 externalTrafficPolicy: Local\n  ports: [{{port: 80, nodePort: 30080}}]\n---\n\
                 apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-1, labels: {{kubernetes.io/service-name: web}}}}\n\
                 addressType: IPv4\nports: [{{port: 8080}}]\nendpoints: [{endpoints}]\n"
            )
        };
        let np = Frontend { address: "192.168.50.2".parse().unwrap(), port: 30080, protocol: Protocol::Tcp };
        let addrs = |list: &[&str]| list.iter().map(|a| a.parse().unwrap()).collect::<Vec<std::net::SocketAddrV4>>();
        let mut store = ModelStore::default();
        store.set_node_addresses(vec!["192.168.50.2".parse().unwrap()]);
        store.set_node_name(Some("node-a".into()));
        let (services, slices) = crate::sources::manifests::parse_objects(&yaml("{addresses: [10.244.2.5], nodeName: node-b}"));
        store.replace_all(&services, &slices);
        store.take_changes();
        let d = &store.desired()[&np];
        assert_eq!((d.backends.len(), d.drop_unserved), (0, true), "from outside: dropped here");
        assert_eq!(d.internal_backends, Some(addrs(&["10.244.2.5:8080"])), "from inside: the cluster's endpoint");
        // kube-proxy counts the service port as without local endpoints all the same.
        assert_eq!(store.no_local_endpoints(), (0, 1));

        // Another remote endpoint: the in-cluster set changes, so does the frontend.
        let two_remote = "{addresses: [10.244.2.5], nodeName: node-b}, {addresses: [10.244.3.5], nodeName: node-c}";
        let (_, slices) = crate::sources::manifests::parse_objects(&yaml(two_remote));
        store.apply_slice(&slices[0]).unwrap();
        assert!(store.take_changes().frontends.contains(&np));
        assert_eq!(store.desired()[&np].internal_backends, Some(addrs(&["10.244.2.5:8080", "10.244.3.5:8080"])));

        // A local endpoint appears: outside clients get it, inside ones all three; none dropped.
        let (_, slices) = crate::sources::manifests::parse_objects(&yaml(&format!("{two_remote}, {{addresses: [10.244.1.5], nodeName: node-a}}")));
        store.apply_slice(&slices[0]).unwrap();
        assert!(store.take_changes().frontends.contains(&np));
        let d = &store.desired()[&np];
        assert_eq!(d.backends, addrs(&["10.244.1.5:8080"]));
        assert_eq!(d.internal_backends, Some(addrs(&["10.244.1.5:8080", "10.244.2.5:8080", "10.244.3.5:8080"])));
        assert_eq!(store.no_local_endpoints(), (0, 0));
    }

    #[test]
    fn service_ports_without_local_endpoints_are_counted_per_policy() {
        let (services, slices) = crate::sources::manifests::parse_objects(
            r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: NodePort
  clusterIP: 10.96.0.7
  externalTrafficPolicy: Local
  internalTrafficPolicy: Local
  ports: [{name: a, port: 80, nodePort: 30080}, {name: b, port: 81, nodePort: 30081}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: a, port: 8080}, {name: b, port: 8081}]
endpoints:
- {addresses: [10.244.2.5], nodeName: node-b}
"#,
        );
        let mut store = ModelStore::default();
        // Two node addresses: two NodePort frontends per port, one service port each.
        store.set_node_addresses(vec!["192.168.50.2".parse().unwrap(), "192.168.60.2".parse().unwrap()]);
        store.set_node_name(Some("node-a".into()));
        store.replace_all(&services, &slices);
        store.take_changes();
        assert_eq!(store.no_local_endpoints(), (2, 2), "both ports, both policies");
        // The endpoint is local on node-b; none is counted.
        store.set_node_name(Some("node-b".into()));
        store.take_changes();
        assert_eq!(store.no_local_endpoints(), (0, 0));
        // Without endpoints at all, traffic is refused rather than dropped: not counted either.
        store.set_node_name(Some("node-a".into()));
        store.delete_slice("default", "web-1");
        store.take_changes();
        assert_eq!(store.no_local_endpoints(), (0, 0));
    }
}
