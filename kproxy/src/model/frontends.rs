//! The desired state of a Service: one [`DesiredService`] per frontend (its ClusterIP, each
//! external IP and load-balancer IP, and a NodePort on each node address), each with the
//! backends of its traffic policy (and, for an external frontend of an `externalTrafficPolicy:
//! Local` Service, those of clients in the cluster), built by [`service_frontends`].

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
    sync::Arc,
};

use super::{
    endpoints::SliceInfo,
    selection::{candidates, usable, Candidate, NodeTopology, Usable},
    service::{ServiceInfo, ServicePortInfo},
    types::{Frontend, FrontendKind, ServicePortName},
};
use crate::node::Cidr;

/// What one frontend must translate to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredService {
    /// Shared by every frontend of the service port (and its `ServicePortInfo`).
    pub name: Arc<ServicePortName>,
    /// Kind of frontend: a ClusterIP frontend is `ClusterIp` whatever the Service's type.
    pub frontend_type: FrontendKind,
    /// Backends that receive new connections (ready endpoints), sorted and de-duplicated.
    /// For an external frontend, these are what clients from outside the node get.
    pub backends: Vec<SocketAddrV4>,
    /// External frontends of a Service with `externalTrafficPolicy: Local`, when its local
    /// endpoints (`backends`) are not all of its usable ones: the backends clients in the
    /// cluster (the node's processes and its pods, the socket path) get instead, the
    /// cluster-wide set kube-proxy "short-circuits" them to (`UsesClusterEndpoints`). Sorted
    /// and de-duplicated; never empty. `None`: every client gets `backends`.
    pub internal_backends: Option<Vec<SocketAddrV4>>,
    /// Endpoints still listed in the Service's slices that are backends for no client of this
    /// frontend (not ready, terminating, or not local under a `Local` policy), sorted and
    /// de-duplicated.
    /// Their pods may still be alive: kproxy leaves TCP connections to them alone, as
    /// kube-proxy does (socket termination, `crate::sockterm`, only ends TCP connections to
    /// endpoints that are listed no more).
    pub draining: Vec<SocketAddrV4>,
    /// No backend, although the Service has usable endpoints: none is on this node and the
    /// frontend may only use local ones (a `Local` traffic policy). kube-proxy drops such
    /// traffic instead of rejecting it, so that clients and load balancers retry elsewhere;
    /// so does kproxy's tc path (its socket path refuses at once, `internalTrafficPolicy:
    /// Local`; clients in the cluster of an external frontend get `internal_backends`).
    pub drop_unserved: bool,
    /// Load-balancer frontends: the only client ranges allowed (empty: all).
    pub source_ranges: Vec<Cidr>,
    /// `sessionAffinity: ClientIP` timeout in seconds; 0 without session affinity.
    pub affinity_timeout: u32,
}

impl DesiredService {
    /// The backends of every kind of client: `backends`, then `internal_backends`.
    pub fn all_backends(&self) -> impl Iterator<Item = &SocketAddrV4> {
        self.backends.iter().chain(self.internal_backends.iter().flatten())
    }

    /// Whether the Service's slices still list endpoint `a` for this frontend: as a backend
    /// for either kind of client, or draining.
    pub fn lists(&self, a: &SocketAddrV4) -> bool {
        let has = |list: &[SocketAddrV4]| list.binary_search(a).is_ok();
        has(&self.backends) || has(&self.draining) || self.internal_backends.as_deref().is_some_and(has)
    }
}

/// Everything the dataplane must serve, keyed by frontend.
pub type DesiredState = BTreeMap<Frontend, DesiredService>;

/// The frontends of one Service with their backends, joined with its slices as kube-proxy
/// does: slice ports match service ports by name and protocol, several slices merge, and the
/// endpoints `super::selection` chooses are backends. Each port is served on the ClusterIP, on
/// every external IP and load-balancer IP, and (NodePort and LoadBalancer Services) on every
/// address of `node_addresses` at its node port. The ClusterIP uses only local endpoints with
/// `internalTrafficPolicy: Local`, the other frontends with `externalTrafficPolicy: Local`
/// for clients from outside, while clients in the cluster get the cluster-wide endpoints
/// there, as kube-proxy's short circuit does (whatever the internal policy: it applies to
/// the ClusterIP only).
pub fn service_frontends<'a>(
    svc: &ServiceInfo,
    slices: impl Iterator<Item = &'a SliceInfo> + Clone,
    node_addresses: &[Ipv4Addr],
    node: NodeTopology<'_>,
) -> Vec<(Frontend, DesiredService)> {
    let mut out = Vec::new();
    for port in &svc.ports {
        let candidates = candidates(svc, port, slices.clone(), node);
        let usable = usable(&candidates, node);
        let protocol = port.name.protocol;
        let mut add = |address: Ipv4Addr, port_number: u16, kind: FrontendKind| {
            let desired = desired_service(svc, port, kind, &candidates, &usable);
            out.push((Frontend { address, port: port_number, protocol }, desired));
        };
        add(svc.cluster_ip, port.port, FrontendKind::ClusterIp);
        for ip in &svc.external_ips {
            add(*ip, port.port, FrontendKind::ExternalIp);
        }
        for ip in &svc.load_balancer_ips {
            add(*ip, port.port, FrontendKind::LoadBalancer);
        }
        if let Some(node_port) = port.node_port {
            for ip in node_addresses {
                add(*ip, node_port, FrontendKind::NodePort);
            }
        }
    }
    out
}

/// What one frontend of kind `kind` of service port `port` serves: its policy's endpoints, the
/// cluster-wide ones for clients in the cluster where a `Local` external policy leaves them
/// out, and as draining every other endpoint the slices list.
fn desired_service(
    svc: &ServiceInfo,
    port: &ServicePortInfo,
    kind: FrontendKind,
    candidates: &[Candidate<'_>],
    usable: &Usable,
) -> DesiredService {
    let local_only = if kind == FrontendKind::ClusterIp { svc.internal_policy_local } else { svc.external_policy_local };
    let backends = if local_only { usable.local.clone() } else { usable.cluster.clone() };
    let drop_unserved = backends.is_empty() && usable.any;
    let internal_backends = (kind != FrontendKind::ClusterIp && local_only && usable.cluster != backends && !usable.cluster.is_empty())
        .then(|| usable.cluster.clone());
    let used = |b: &SocketAddrV4| {
        backends.binary_search(b).is_ok() || internal_backends.as_ref().is_some_and(|i| i.binary_search(b).is_ok())
    };
    let draining: Vec<SocketAddrV4> =
        candidates.iter().map(|c| c.backend).filter(|b| !used(b)).collect::<BTreeSet<_>>().into_iter().collect();
    let source_ranges = if kind == FrontendKind::LoadBalancer { svc.source_ranges.clone() } else { Vec::new() };
    DesiredService {
        name: port.name.clone(),
        frontend_type: kind,
        backends,
        internal_backends,
        draining,
        drop_unserved,
        source_ranges,
        affinity_timeout: svc.affinity_timeout.unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, net::SocketAddrV4};

    use super::super::{
        test_support::{addrs, fe},
        FrontendKind, Protocol,
    };

    /// (backends, in-cluster backends, drop_unserved) of a frontend, as last octets.
    type Serving = (Vec<u8>, Option<Vec<u8>>, bool);

    /// What each kind of frontend of Service `s` serves on `node`: (backends, in-cluster
    /// backends, drop_unserved), addresses' last octets only. `s` is a LoadBalancer Service
    /// with `spec` lines, ClusterIP 10.96.0.9, external IP 198.51.100.9, load-balancer IP
    /// 203.0.113.9 and NodePort 30009 on 192.168.50.2, with one slice of `endpoints`.
    fn by_kind(spec: &str, endpoints: &[String], node: &str) -> BTreeMap<FrontendKind, Serving> {
        let eps: String = endpoints.iter().map(|e| format!("- {e}\n")).collect();
        let yaml = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: s}}\nspec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.9\n  \
             externalIPs: [198.51.100.9]\n  ports: [{{port: 80, nodePort: 30009}}]\n{spec}\n\
             status: {{loadBalancer: {{ingress: [{{ip: 203.0.113.9}}]}}}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s-1, labels: {{kubernetes.io/service-name: s}}}}\n\
             addressType: IPv4\nports: [{{port: 8080}}]\nendpoints:\n{eps}"
        );
        let (services, slices) = crate::sources::manifests::parse_objects(&yaml);
        let mut store = crate::tracker::ModelStore::default();
        store.set_node_name(Some(node.to_string()));
        store.set_node_addresses(vec!["192.168.50.2".parse().unwrap()]);
        store.replace_all(&services, &slices);
        store.take_changes();
        assert!(store.invalid().next().is_none(), "{:?}", store.invalid().collect::<Vec<_>>());
        let octets = |list: &[SocketAddrV4]| list.iter().map(|b| b.ip().octets()[3]).collect::<Vec<u8>>();
        let out: BTreeMap<FrontendKind, Serving> = store
            .desired()
            .values()
            .map(|d| (d.frontend_type, (octets(&d.backends), d.internal_backends.as_deref().map(octets), d.drop_unserved)))
            .collect();
        assert_eq!(out.len(), 4, "one frontend of each kind: {out:?}");
        out
    }

    #[test]
    fn external_traffic_policy_local_gives_clients_in_the_cluster_the_cluster_endpoints() {
        use FrontendKind::*;
        let ep = |last: u8, node: &str, extra: &str| format!("{{addresses: [10.0.0.{last}], nodeName: {node}{extra}}}");
        let spread = [ep(1, "n1", ""), ep(2, "n2", "")];
        let etp = "  externalTrafficPolicy: Local";
        let both = "  externalTrafficPolicy: Local\n  internalTrafficPolicy: Local";
        let itp = "  internalTrafficPolicy: Local";
        let external = |got: &BTreeMap<FrontendKind, Serving>| {
            let e = got[&NodePort].clone();
            assert!([ExternalIp, LoadBalancer].iter().all(|k| got[k] == e), "every external frontend alike: {got:?}");
            e
        };

        // kube-proxy's UsesClusterEndpoints: an externally accessible Service always has its
        // cluster endpoints, which in-cluster clients of the external frontends get (the
        // short circuit); clients from outside get the local ones.
        let got = by_kind(etp, &spread, "n1");
        assert_eq!(got[&ClusterIp], (vec![1, 2], None, false));
        assert_eq!(external(&got), (vec![1], Some(vec![1, 2]), false));
        // No local endpoint: dropped from outside, served from inside.
        let got = by_kind(etp, &spread, "n3");
        assert_eq!(external(&got), (vec![], Some(vec![1, 2]), true));
        // Both policies Local: the ClusterIP follows the internal one; the external
        // frontends' in-cluster clients still get the cluster endpoints.
        let got = by_kind(both, &spread, "n3");
        assert_eq!(got[&ClusterIp], (vec![], None, true));
        assert_eq!(external(&got), (vec![], Some(vec![1, 2]), true));
        // internalTrafficPolicy Local alone changes the ClusterIP only.
        let got = by_kind(itp, &spread, "n3");
        assert_eq!(got[&ClusterIp], (vec![], None, true));
        assert_eq!(external(&got), (vec![1, 2], None, false));
        // Every endpoint local: one set serves everyone, no second one.
        let got = by_kind(etp, &[ep(1, "n1", ""), ep(2, "n1", "")], "n1");
        assert_eq!(external(&got), (vec![1, 2], None, false));
        // No usable endpoint anywhere: refused on both paths.
        let got = by_kind(etp, &[ep(2, "n2", ", conditions: {ready: false}")], "n1");
        assert_eq!(external(&got), (vec![], None, false));
        // Each set falls back to serving terminating endpoints on its own (KEP-1669): the
        // local one to this node's terminating endpoint, the cluster one keeps the ready one.
        let terminating = ", conditions: {ready: false, serving: true, terminating: true}";
        let got = by_kind(etp, &[ep(1, "n1", terminating), ep(2, "n2", "")], "n1");
        assert_eq!(external(&got), (vec![1], Some(vec![2]), false));
        // Topology hints restrict the cluster endpoints (not the local ones) as for a ClusterIP.
        let zoned = |last: u8, node: &str, zone: &str| ep(last, node, &format!(", hints: {{forNodes: [{{name: {zone}}}]}}"));
        let got = by_kind(etp, &[zoned(1, "n1", "n2"), zoned(2, "n2", "n2"), zoned(3, "n3", "n1")], "n1");
        assert_eq!(got[&ClusterIp], (vec![3], None, false));
        assert_eq!(external(&got), (vec![1], Some(vec![3]), false));
    }

    #[test]
    fn endpoints_used_by_in_cluster_clients_are_not_draining() {
        let ep = |last: u8, node: &str, extra: &str| format!("{{addresses: [10.0.0.{last}], nodeName: {node}{extra}}}");
        let eps = [ep(1, "n1", ""), ep(2, "n2", ""), ep(3, "n2", ", conditions: {ready: false}")];
        let yaml = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: s}}\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.9\n  \
             externalTrafficPolicy: Local\n  ports: [{{port: 80, nodePort: 30009}}]\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s-1, labels: {{kubernetes.io/service-name: s}}}}\n\
             addressType: IPv4\nports: [{{port: 8080}}]\nendpoints:\n{}",
            eps.iter().map(|e| format!("- {e}\n")).collect::<String>()
        );
        let (services, slices) = crate::sources::manifests::parse_objects(&yaml);
        let mut store = crate::tracker::ModelStore::default();
        store.set_node_name(Some("n1".into()));
        store.set_node_addresses(vec!["192.168.50.2".parse().unwrap()]);
        store.replace_all(&services, &slices);
        store.take_changes();
        let np = &store.desired()[&fe("192.168.50.2", 30009, Protocol::Tcp)];
        assert_eq!(np.backends, addrs(&["10.0.0.1:8080"]));
        assert_eq!(np.internal_backends, Some(addrs(&["10.0.0.1:8080", "10.0.0.2:8080"])));
        // 10.0.0.2 serves in-cluster clients: its connections are not left to drain.
        assert_eq!(np.draining, addrs(&["10.0.0.3:8080"]));
    }
}
