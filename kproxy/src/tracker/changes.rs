//! What changed since the last sync: the Services and endpoint sets that changed, and, once
//! [`ModelStore::take_changes`] has rebuilt them, the frontends that differ.

use std::{
    collections::{BTreeSet, HashMap},
    time::SystemTime,
};

use super::{ModelStore, ObjectKey};
use crate::model::Frontend;

/// What one `take_changes` found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Frontends whose desired entry was added, changed or removed.
    pub frontends: BTreeSet<Frontend>,
    /// Services whose definition changed since the last call (kube-proxy's service changes).
    pub services: usize,
    /// Services whose endpoints changed since the last call (kube-proxy's endpoint changes).
    pub endpoints: usize,
    /// When each endpoint change was triggered: the EndpointSlice's
    /// `endpoints.kubernetes.io/last-change-trigger-time` annotation, or when kproxy received
    /// it. `kubeproxy_network_programming_duration_seconds` measures from here.
    pub trigger_times: Vec<SystemTime>,
    /// TCP endpoints that were draining behind a frontend (listed, but not a backend: e.g.
    /// terminating) and are no longer listed at all, the frontend staying: their pod is gone,
    /// so connections still open to them can be ended (the sync sees no map change for them).
    pub unlisted: Vec<(Frontend, std::net::SocketAddrV4)>,
}

/// Annotation the EndpointSlice controller sets to the time of the change behind an update.
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

impl ModelStore {
    /// Services and endpoint sets changed since the last [`Self::take_changes`].
    pub fn pending(&self) -> (usize, usize) {
        (self.service_changes.len(), self.endpoint_changes.len())
    }

    /// Recomputes the desired frontends of every changed Service and returns what differs.
    /// Frontend conflicts (two Services, one frontend) go to the first Service by
    /// namespace/name; the other is reported as invalid and takes over if the first leaves.
    pub fn take_changes(&mut self) -> Changes {
        let service_changes = std::mem::take(&mut self.service_changes);
        let endpoint_changes = std::mem::take(&mut self.endpoint_changes);
        let mut changes = Changes {
            services: service_changes.len(),
            endpoints: endpoint_changes.len(),
            trigger_times: endpoint_changes.values().copied().collect(),
            ..Default::default()
        };
        let changed: BTreeSet<ObjectKey> = service_changes.into_iter().chain(endpoint_changes.into_keys()).collect();
        let mut touched: BTreeSet<Frontend> = BTreeSet::new();
        let mut wanted = HashMap::new();
        for key in &changed {
            // Drop the old claims; re-claim what the current version serves.
            touched.extend(self.claims.release(key));
            let Some(frontends) = self.wanted_frontends(key) else { continue };
            touched.extend(frontends.iter().map(|(f, _)| *f));
            self.claims.claim(key, frontends.iter().map(|(f, _)| *f).collect());
            wanted.insert(key.clone(), frontends);
        }
        for f in touched {
            self.settle(f, &mut wanted, &mut changes);
        }
        changes
    }
}

#[cfg(test)]
mod tests {
    use super::super::{
        test_support::{fe, service, slice},
        ModelStore,
    };
    use crate::model::{Frontend, Protocol};

    #[test]
    fn only_real_changes_are_tracked() {
        let mut store = ModelStore::default();
        store.apply_service(&service("web", "10.96.0.1")).unwrap();
        store.apply_slice(&slice("web-1", "web", &["10.244.0.1"])).unwrap();
        assert_eq!(store.pending(), (1, 1));
        let c = store.take_changes();
        assert_eq!((c.services, c.endpoints, c.frontends), (1, 1, [fe("10.96.0.1")].into()));
        // The same objects again (a resync, a relist, a status update): nothing to do.
        store.apply_service(&service("web", "10.96.0.1")).unwrap();
        store.apply_slice(&slice("web-1", "web", &["10.244.0.1"])).unwrap();
        assert_eq!(store.pending(), (0, 0));
        // A change and its undo before the sync: tracked, but no frontend differs.
        store.apply_slice(&slice("web-1", "web", &["10.244.0.2"])).unwrap();
        store.apply_slice(&slice("web-1", "web", &["10.244.0.1"])).unwrap();
        assert!(store.take_changes().frontends.is_empty());
        // An endpoint change touches only its service's frontend.
        store.apply_service(&service("api", "10.96.0.2")).unwrap();
        store.take_changes();
        store.apply_slice(&slice("web-2", "web", &["10.244.0.9"])).unwrap();
        let c = store.take_changes();
        assert_eq!(c.frontends, [fe("10.96.0.1")].into());
        assert_eq!(store.desired()[&fe("10.96.0.1")].backends.len(), 2);
        store.delete_slice("default", "web-1");
        store.take_changes();
        assert_eq!(store.desired()[&fe("10.96.0.1")].backends, ["10.244.0.9:8080".parse().unwrap()]);
        store.delete_service("default", "web");
        assert_eq!(store.take_changes().frontends, [fe("10.96.0.1")].into());
        assert!(!store.desired().contains_key(&fe("10.96.0.1")));
    }

    #[test]
    fn an_endpoint_that_turns_ready_on_another_node_is_not_unlisted() {
        // A remote endpoint that was draining (not ready) becomes ready: outside clients of the
        // externalTrafficPolicy Local NodePort do not use it, in-cluster ones do. It is listed
        // all along, so its connections must not be ended.
        let yaml = |ready: bool| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.7\n  \
                 externalTrafficPolicy: Local\n  ports: [{{port: 80, nodePort: 30080}}]\n---\n\
                 apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-1, labels: {{kubernetes.io/service-name: web}}}}\n\
                 addressType: IPv4\nports: [{{port: 8080}}]\nendpoints: [{{addresses: [10.244.1.5], nodeName: node-a}}, \
                 {{addresses: [10.244.2.5], nodeName: node-b, conditions: {{ready: {ready}}}}}]\n"
            )
        };
        let mut store = ModelStore::default();
        store.set_node_addresses(vec!["192.168.50.2".parse().unwrap()]);
        store.set_node_name(Some("node-a".into()));
        let (services, slices) = crate::sources::manifests::parse_objects(&yaml(false));
        store.replace_all(&services, &slices);
        store.take_changes();
        let (_, slices) = crate::sources::manifests::parse_objects(&yaml(true));
        store.apply_slice(&slices[0]).unwrap();
        let changes = store.take_changes();
        assert_eq!(changes.frontends.len(), 2, "ClusterIP and NodePort gain it");
        assert_eq!(changes.unlisted, [], "still listed");
    }

    #[test]
    fn a_load_balancer_ip_whose_ip_mode_turns_to_proxy_stops_being_a_frontend() {
        let yaml = |mode: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: lb}}\nspec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.8\n  \
                 ports: [{{port: 80, nodePort: 30081}}]\nstatus: {{loadBalancer: {{ingress: [{{ip: 203.0.113.8, ipMode: {mode}}}]}}}}\n"
            )
        };
        let lb = Frontend { address: "203.0.113.8".parse().unwrap(), port: 80, protocol: Protocol::Tcp };
        let mut store = ModelStore::default();
        let (services, _) = crate::sources::manifests::parse_objects(&yaml("VIP"));
        store.apply_service(&services[0]).unwrap();
        store.take_changes();
        assert!(store.desired().contains_key(&lb));
        let (services, _) = crate::sources::manifests::parse_objects(&yaml("Proxy"));
        store.apply_service(&services[0]).unwrap();
        let changes = store.take_changes();
        assert_eq!(changes.frontends, [lb].into(), "only the load-balancer IP changes");
        assert!(!store.desired().contains_key(&lb));
        assert_eq!(store.desired().len(), 1, "the ClusterIP stays");
    }
}
