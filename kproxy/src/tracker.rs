//! Change tracking, after kube-proxy's `ServiceChangeTracker` and `EndpointsChangeTracker`.
//!
//! Sources feed every object update into a [`ModelStore`]: it validates the object once, keeps
//! the last valid version, drops updates that change nothing kproxy serves, and records which
//! Services changed. A sync then calls [`ModelStore::take_changes`], which recomputes the
//! desired frontends of those Services only and returns the frontends that differ, so a sync
//! costs O(changes), not O(services).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    time::SystemTime,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use crate::model::{
    service_frontends, DesiredService, DesiredState, Frontend, FrontendKind, Ignored, InvalidCode, InvalidObject,
    NodeTopology, Protocol, ServiceInfo, ServiceOutcome, ServicePortName, SliceInfo,
};

/// `(namespace, name)` of an object.
pub type ObjectKey = (String, String);

fn key_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> ObjectKey {
    (
        meta.namespace.clone().unwrap_or_else(|| "default".into()),
        meta.name.clone().unwrap_or_default(),
    )
}

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

/// Validated objects, the desired state built from them, and the changes not yet synced.
#[derive(Debug, Default)]
pub struct ModelStore {
    services: HashMap<ObjectKey, ServiceInfo>,
    /// Valid Services that kproxy leaves alone, with the reason.
    ignored: HashMap<ObjectKey, Ignored>,
    slices: HashMap<ObjectKey, SliceInfo>,
    /// Slice names per Service `(namespace, service name)`.
    /// Sorted, usually one or a few: a vector, as a set's node would be ten times its size.
    slices_by_service: HashMap<ObjectKey, Vec<String>>,
    /// Objects whose latest version is invalid, by kind and key.
    invalid: BTreeMap<(&'static str, ObjectKey), InvalidObject>,

    desired: DesiredState,
    /// Frontends each Service claims (whether or not it owns them).
    claims_of: HashMap<ObjectKey, Vec<Frontend>>,
    /// Services claiming each frontend; the first one (by namespace/name) owns it.
    /// Sorted; almost always one: a vector, as a set's node would be ten times its size.
    claimants: HashMap<Frontend, Vec<ObjectKey>>,
    /// Services that lost a frontend to another one.
    conflicts: BTreeMap<(Frontend, ObjectKey), InvalidObject>,
    /// Service ports with a `Local` traffic policy and endpoints, none of them on this node:
    /// how many of their frontends are in that state, by service port and whether the policy
    /// is the external one (NodePort, external and load-balancer IPs) or the internal one.
    unserved: HashMap<(ServicePortName, bool), usize>,
    /// Second copies of an object in the last complete set (`replace_all`).
    duplicates: Vec<InvalidObject>,

    service_changes: BTreeSet<ObjectKey>,
    /// Services whose endpoints changed, with the oldest trigger time of the change.
    endpoint_changes: BTreeMap<ObjectKey, SystemTime>,
    /// Addresses NodePorts are served on (`--nodeport-addresses` applied to the node's).
    node_addresses: Vec<std::net::Ipv4Addr>,
    /// This node's name, for the `Local` traffic policies and node hints.
    node_name: Option<String>,
    /// This node's `topology.kubernetes.io/zone` label, for zone hints.
    node_zone: Option<String>,
}

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

    fn topology(&self) -> NodeTopology<'_> {
        NodeTopology { name: self.node_name.as_deref(), zone: self.node_zone.as_deref() }
    }

    /// Adds or updates a Service. An invalid update keeps the last valid version serving and
    /// returns the error (it is also listed by [`Self::invalid`] until fixed).
    pub fn apply_service(&mut self, svc: &Service) -> Result<(), InvalidObject> {
        let key = key_of(&svc.metadata);
        match ServiceInfo::from_service(svc) {
            Ok(ServiceOutcome::Served(info)) => {
                self.invalid.remove(&("Service", key.clone()));
                if let Some(field) = info.unsupported_ports.first() {
                    // Served, but not every port: say which one is left out.
                    let warning = InvalidObject {
                        kind: "Service",
                        object: format!("{}/{}", key.0, key.1),
                        field: format!("{field}.protocol"),
                        reason: "SCTP is not served by kproxy; port skipped".into(),
                        code: InvalidCode::UnsupportedProtocol,
                    };
                    self.invalid.insert(("Service", key.clone()), warning);
                }
                self.ignored.remove(&key);
                if self.services.get(&key) != Some(&info) {
                    self.services.insert(key.clone(), info);
                    self.service_changes.insert(key);
                }
                Ok(())
            }
            Ok(ServiceOutcome::Ignored(why)) => {
                self.invalid.remove(&("Service", key.clone()));
                self.ignored.insert(key.clone(), why);
                if self.services.remove(&key).is_some() {
                    self.service_changes.insert(key);
                }
                Ok(())
            }
            Err(e) => {
                self.invalid.insert(("Service", key), e.clone());
                Err(e)
            }
        }
    }

    pub fn delete_service(&mut self, namespace: &str, name: &str) {
        let key = (namespace.to_string(), name.to_string());
        self.invalid.remove(&("Service", key.clone()));
        self.ignored.remove(&key);
        if self.services.remove(&key).is_some() {
            self.service_changes.insert(key);
        }
    }

    /// Adds or updates an EndpointSlice; as [`Self::apply_service`] for invalid ones.
    pub fn apply_slice(&mut self, slice: &EndpointSlice) -> Result<(), InvalidObject> {
        let key = key_of(&slice.metadata);
        match SliceInfo::from_slice(slice) {
            Ok(Some(info)) => {
                self.invalid.remove(&("EndpointSlice", key.clone()));
                if self.slices.get(&key) != Some(&info) {
                    self.remove_slice(&key);
                    let service = (info.namespace.clone(), info.service.clone());
                    let names = self.slices_by_service.entry(service.clone()).or_default();
                    if let Err(at) = names.binary_search(&key.1) {
                        names.insert(at, key.1.clone());
                    }
                    self.slices.insert(key, info);
                    let triggered = slice
                        .metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get(TRIGGER_TIME_ANNOTATION))
                        .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
                        .unwrap_or_else(SystemTime::now);
                    self.endpoint_changes.entry(service).or_insert(triggered);
                }
                Ok(())
            }
            Ok(None) => {
                self.invalid.remove(&("EndpointSlice", key.clone()));
                self.remove_slice(&key);
                Ok(())
            }
            Err(e) => {
                self.invalid.insert(("EndpointSlice", key), e.clone());
                Err(e)
            }
        }
    }

    pub fn delete_slice(&mut self, namespace: &str, name: &str) {
        let key = (namespace.to_string(), name.to_string());
        self.invalid.remove(&("EndpointSlice", key.clone()));
        self.remove_slice(&key);
    }

    fn remove_slice(&mut self, key: &ObjectKey) {
        if let Some(old) = self.slices.remove(key) {
            let service = (old.namespace, old.service);
            if let Some(names) = self.slices_by_service.get_mut(&service) {
                names.retain(|n| *n != key.1);
                if names.is_empty() {
                    self.slices_by_service.remove(&service);
                }
            }
            self.endpoint_changes.entry(service).or_insert_with(SystemTime::now);
        }
    }

    /// Replaces every object with this complete set (a re-read of the manifests): objects
    /// absent from it are deleted, the others applied, and only real differences are recorded
    /// as changes. Invalid objects are listed by [`Self::invalid`].
    pub fn replace_all(&mut self, services: &[Service], slices: &[EndpointSlice]) {
        self.replace_services(services);
        self.replace_slices(slices);
    }

    /// [`Self::replace_all`] for Services only (a relist of Services).
    pub fn replace_services(&mut self, services: &[Service]) {
        self.duplicates.retain(|d| d.kind != "Service");
        let keep: BTreeSet<ObjectKey> = services.iter().map(|s| key_of(&s.metadata)).collect();
        let gone: Vec<ObjectKey> = self
            .services
            .keys()
            .chain(self.ignored.keys())
            .chain(self.invalid.keys().filter(|(k, _)| *k == "Service").map(|(_, o)| o))
            .filter(|k| !keep.contains(*k))
            .cloned()
            .collect();
        for (ns, name) in gone {
            self.delete_service(&ns, &name);
        }
        let mut seen = BTreeSet::new();
        for svc in services {
            if !seen.insert(key_of(&svc.metadata)) {
                self.duplicates.push(duplicate("Service", &svc.metadata));
                continue;
            }
            // An invalid object is recorded in `self.invalid`.
            let _ = self.apply_service(svc);
        }
    }

    /// [`Self::replace_all`] for EndpointSlices only (a relist of EndpointSlices).
    pub fn replace_slices(&mut self, slices: &[EndpointSlice]) {
        self.duplicates.retain(|d| d.kind != "EndpointSlice");
        let keep: BTreeSet<ObjectKey> = slices.iter().map(|s| key_of(&s.metadata)).collect();
        let gone: Vec<ObjectKey> = self
            .slices
            .keys()
            .chain(self.invalid.keys().filter(|(k, _)| *k == "EndpointSlice").map(|(_, o)| o))
            .filter(|k| !keep.contains(*k))
            .cloned()
            .collect();
        for (ns, name) in gone {
            self.delete_slice(&ns, &name);
        }
        let mut seen = BTreeSet::new();
        for slice in slices {
            if !seen.insert(key_of(&slice.metadata)) {
                self.duplicates.push(duplicate("EndpointSlice", &slice.metadata));
                continue;
            }
            let _ = self.apply_slice(slice);
        }
    }

    /// Objects whose latest version is invalid, Services that lost a frontend conflict, and
    /// duplicate objects.
    pub fn invalid(&self) -> impl Iterator<Item = &InvalidObject> {
        self.invalid.values().chain(self.conflicts.values()).chain(&self.duplicates)
    }

    pub fn ignored(&self) -> impl Iterator<Item = (&ObjectKey, &Ignored)> {
        self.ignored.iter()
    }

    /// Services and endpoint sets changed since the last [`Self::take_changes`].
    pub fn pending(&self) -> (usize, usize) {
        (self.service_changes.len(), self.endpoint_changes.len())
    }

    pub fn desired(&self) -> &DesiredState {
        &self.desired
    }

    /// The `healthCheckNodePort`s to serve: for every Service with `externalTrafficPolicy:
    /// Local`, its ready endpoints on this node (distinct addresses, over all its slices).
    pub fn health_checks(&self) -> BTreeMap<u16, crate::health::ServiceHealthCheck> {
        let mut out = BTreeMap::new();
        for (key, svc) in &self.services {
            let Some(port) = svc.health_check_node_port.filter(|_| svc.external_policy_local) else { continue };
            let names = self.slices_by_service.get(key).into_iter().flatten();
            let local: BTreeSet<std::net::Ipv4Addr> = names
                .filter_map(|n| self.slices.get(&(key.0.clone(), n.clone())))
                .flat_map(|s| &s.endpoints)
                .filter(|ep| ep.ready && self.node_name.is_some() && ep.node_name == self.node_name)
                .map(|ep| ep.address)
                .collect();
            out.insert(
                port,
                crate::health::ServiceHealthCheck { namespace: key.0.clone(), name: key.1.clone(), local_endpoints: local.len() },
            );
        }
        out
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
            ..Default::default()
        };
        changes.trigger_times = endpoint_changes.values().copied().collect();
        let changed: BTreeSet<ObjectKey> = service_changes.into_iter().chain(endpoint_changes.into_keys()).collect();
        let mut touched: BTreeSet<Frontend> = BTreeSet::new();
        let mut wanted: HashMap<ObjectKey, BTreeMap<Frontend, DesiredService>> = HashMap::new();
        for key in &changed {
            // Drop the old claims; re-claim what the current version serves.
            for f in self.claims_of.remove(key).unwrap_or_default() {
                if let Some(c) = self.claimants.get_mut(&f) {
                    c.retain(|k| k != key);
                    if c.is_empty() {
                        self.claimants.remove(&f);
                    }
                }
                touched.insert(f);
            }
            let Some(svc) = self.services.get(key) else { continue };
            let names = self.slices_by_service.get(key);
            let slices = names.into_iter().flatten().filter_map(|n| self.slices.get(&(key.0.clone(), n.clone())));
            let frontends: BTreeMap<Frontend, DesiredService> =
                service_frontends(svc, slices, &self.node_addresses, self.topology()).into_iter().collect();
            for f in frontends.keys() {
                let claimants = self.claimants.entry(*f).or_default();
                if let Err(at) = claimants.binary_search(key) {
                    claimants.insert(at, key.clone());
                }
                touched.insert(*f);
            }
            self.claims_of.insert(key.clone(), frontends.keys().copied().collect());
            wanted.insert(key.clone(), frontends);
        }
        for f in touched {
            let owner = self.claimants.get(&f).and_then(|c| c.first()).cloned();
            let entry = owner.and_then(|o| match wanted.get(&o) {
                Some(w) => w.get(&f).cloned(),
                // An unchanged Service takes over a frontend released by another one.
                None => self.frontend_of_service(&o, f),
            });
            self.conflicts.retain(|(g, _), _| *g != f);
            if let Some(claimants) = self.claimants.get(&f) {
                for other in claimants.iter().skip(1) {
                    let conflict = self.conflict(other, claimants.first().expect("non-empty"), f);
                    self.conflicts.insert((f, other.clone()), conflict);
                }
            }
            let old = match &entry {
                Some(e) => self.desired.insert(f, e.clone()),
                None => self.desired.remove(&f),
            };
            let changed = old != entry;
            if let (Some(old), Some(new), Protocol::Tcp) = (&old, &entry, f.protocol) {
                changes.unlisted.extend(old.draining.iter().filter(|a| !new.lists(a)).map(|a| (f, *a)));
            }
            if changed {
                self.count_unserved(old.as_ref(), -1);
                self.count_unserved(entry.as_ref(), 1);
            }
            if changed {
                changes.frontends.insert(f);
            }
        }
        changes
    }

    /// Counts `d` in or out of [`Self::unserved`].
    fn count_unserved(&mut self, d: Option<&DesiredService>, delta: isize) {
        let Some(d) = d.filter(|d| d.drop_unserved) else { return };
        let key = (d.name.clone(), d.frontend_type != FrontendKind::ClusterIp);
        let count = self.unserved.entry(key.clone()).or_default();
        *count = count.saturating_add_signed(delta);
        if *count == 0 {
            self.unserved.remove(&key);
        }
    }

    /// Service ports with a `Local` traffic policy that have endpoints but none on this node
    /// (their traffic is dropped), as kube-proxy's
    /// `sync_proxy_rules_no_local_endpoints_total`: `(internal, external)`.
    pub fn no_local_endpoints(&self) -> (usize, usize) {
        let external = self.unserved.keys().filter(|(_, external)| *external).count();
        (self.unserved.len() - external, external)
    }

    fn frontend_of_service(&self, key: &ObjectKey, f: Frontend) -> Option<DesiredService> {
        let svc = self.services.get(key)?;
        let names = self.slices_by_service.get(key);
        let slices = names.into_iter().flatten().filter_map(|n| self.slices.get(&(key.0.clone(), n.clone())));
        service_frontends(svc, slices, &self.node_addresses, self.topology()).into_iter().find(|(g, _)| *g == f).map(|(_, d)| d)
    }

    fn conflict(&self, loser: &ObjectKey, owner: &ObjectKey, f: Frontend) -> InvalidObject {
        let index = self
            .services
            .get(loser)
            .and_then(|s| s.ports.iter().position(|p| p.port == f.port && p.name.protocol == f.protocol))
            .unwrap_or_default();
        InvalidObject {
            kind: "Service",
            object: format!("{}/{}", loser.0, loser.1),
            field: format!("spec.ports[{index}]"),
            reason: format!("frontend {f} is already served for {}/{}", owner.0, owner.1),
            code: InvalidCode::FrontendConflict,
        }
    }
}

fn duplicate(kind: &'static str, meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> InvalidObject {
    let (ns, name) = key_of(meta);
    InvalidObject {
        kind,
        object: format!("{ns}/{name}"),
        field: "metadata.name".into(),
        reason: "duplicate object; the first one is used".into(),
        code: InvalidCode::DuplicateObject,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Protocol;

    fn service(name: &str, ip: &str) -> Service {
        crate::sources::manifests::parse_objects(&format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{clusterIP: {ip}, ports: [{{port: 80}}]}}\n")).0.remove(0)
    }

    fn slice(name: &str, svc: &str, ips: &[&str]) -> EndpointSlice {
        let eps: Vec<String> = ips.iter().map(|ip| format!("{{addresses: [{ip}]}}")).collect();
        crate::sources::manifests::parse_objects(&format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, labels: {{kubernetes.io/service-name: {svc}}}}}\naddressType: IPv4\nports: [{{port: 8080}}]\nendpoints: [{}]\n",
            eps.join(", ")
        ))
        .1
        .remove(0)
    }

    fn fe(ip: &str) -> Frontend {
        Frontend { address: ip.parse().unwrap(), port: 80, protocol: Protocol::Tcp }
    }

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
    fn an_invalid_update_keeps_the_last_valid_version() {
        let mut store = ModelStore::default();
        store.apply_service(&service("web", "10.96.0.1")).unwrap();
        store.take_changes();
        let err = store.apply_service(&service("web", "10.96.0.999")).unwrap_err();
        assert_eq!(err.field, "spec.clusterIP");
        assert!(store.take_changes().frontends.is_empty());
        assert!(store.desired().contains_key(&fe("10.96.0.1")));
        assert_eq!(store.invalid().count(), 1);
        store.apply_service(&service("web", "10.96.0.3")).unwrap();
        assert_eq!(store.invalid().count(), 0);
        assert_eq!(store.take_changes().frontends, [fe("10.96.0.1"), fe("10.96.0.3")].into());
    }

    #[test]
    fn a_frontend_conflict_is_reported_and_resolved_when_the_owner_leaves() {
        let mut store = ModelStore::default();
        store.replace_all(&[service("b", "10.96.0.1"), service("a", "10.96.0.1")], &[slice("b-1", "b", &["10.244.0.2"])]);
        store.take_changes();
        assert_eq!(store.desired()[&fe("10.96.0.1")].name.name, "a");
        let conflicts: Vec<String> = store.invalid().map(ToString::to_string).collect();
        assert_eq!(conflicts, ["Service default/b: spec.ports[0]: frontend 10.96.0.1:80/TCP is already served for default/a"]);
        // The owner goes: the other service takes the frontend over, with its endpoints.
        store.replace_all(&[service("b", "10.96.0.1")], &[slice("b-1", "b", &["10.244.0.2"])]);
        assert_eq!(store.take_changes().frontends, [fe("10.96.0.1")].into());
        assert_eq!(store.desired()[&fe("10.96.0.1")].name.name, "b");
        assert_eq!(store.desired()[&fe("10.96.0.1")].backends.len(), 1);
        assert_eq!(store.invalid().count(), 0);
    }
}

#[cfg(test)]
mod frontend_kind_tests {
    use super::*;
    use crate::model::{FrontendKind, Protocol};

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

#[cfg(test)]
mod traffic_policy_tests {
    use super::*;

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
