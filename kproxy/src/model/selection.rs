//! Which endpoints a service port uses, as kube-proxy's `CategorizeEndpoints` chooses them:
//! ready endpoints (within the topology hints for this node), falling back to serving and
//! terminating ones when none is ready (KEP-1669), and the same among this node's endpoints for
//! the frontends a `Local` traffic policy restricts.

use std::{collections::BTreeSet, net::SocketAddrV4};

use super::{
    endpoints::{EndpointInfo, SliceInfo},
    service::{ServiceInfo, ServicePortInfo},
};

/// This node, as endpoint selection sees it.
#[derive(Clone, Copy, Debug, Default)]
pub struct NodeTopology<'a> {
    /// The node's name: endpoints with this `nodeName` are local, `hints.forNodes` name it.
    pub name: Option<&'a str>,
    /// The node's `topology.kubernetes.io/zone` label, matched against `hints.forZones`.
    pub zone: Option<&'a str>,
}

/// One endpoint of a service port, with what selection needs.
pub(super) struct Candidate<'a> {
    pub backend: SocketAddrV4,
    /// Ready, or counted as ready (`publishNotReadyAddresses`).
    pub ready: bool,
    /// Not ready, but serving and terminating: used when no endpoint is ready (KEP-1669).
    pub serving_terminating: bool,
    /// On this node.
    pub local: bool,
    pub info: &'a EndpointInfo,
}

/// The endpoints of service port `port` of `svc`, from every slice: slice ports match the
/// service port by name and protocol, and several slices merge (duplicates included: the
/// selection below de-duplicates).
pub(super) fn candidates<'a>(
    svc: &ServiceInfo,
    port: &ServicePortInfo,
    slices: impl Iterator<Item = &'a SliceInfo>,
    node: NodeTopology<'_>,
) -> Vec<Candidate<'a>> {
    let mut candidates = Vec::new();
    for slice in slices {
        let matching = slice.ports.iter().filter(|p| p.name == port.name.port_name && p.protocol == port.name.protocol);
        for slice_port in matching {
            for ep in &slice.endpoints {
                let ready = ep.ready || svc.publish_not_ready;
                candidates.push(Candidate {
                    backend: SocketAddrV4::new(ep.address, slice_port.port),
                    ready,
                    serving_terminating: !ready && ep.serving && ep.terminating,
                    local: node.name.is_some() && ep.node_name() == node.name,
                    info: ep,
                });
            }
        }
    }
    candidates
}

/// Which endpoints topology hints restrict the cluster-wide endpoints to (kube-proxy's
/// `topologyModeFromHints`): the same node's if every ready endpoint has node hints and one
/// names this node; else the same zone's if every ready endpoint has zone hints and one names
/// this node's zone; else none (every endpoint).
#[derive(Clone, Copy, PartialEq, Eq)]
enum TopologyMode {
    All,
    SameNode,
    SameZone,
}

fn topology_mode(candidates: &[Candidate<'_>], node: NodeTopology<'_>) -> TopologyMode {
    let ready: Vec<&EndpointInfo> = candidates.iter().filter(|c| c.ready).map(|c| c.info).collect();
    if ready.is_empty() {
        return TopologyMode::All;
    }
    let hinted = |hints: fn(&EndpointInfo) -> &[String], value: Option<&str>| {
        ready.iter().all(|ep| !hints(ep).is_empty()) && value.is_some_and(|v| ready.iter().any(|ep| hints(ep).iter().any(|h| h == v)))
    };
    if hinted(EndpointInfo::node_hints, node.name) {
        TopologyMode::SameNode
    } else if hinted(EndpointInfo::zone_hints, node.zone) {
        TopologyMode::SameZone
    } else {
        TopologyMode::All
    }
}

/// The endpoints a port's frontends use, as kube-proxy's `CategorizeEndpoints` chooses them
/// (KEP-1669 and KEP-2433/4444): ready endpoints (within the topology hints for this node),
/// falling back to serving-and-terminating ones when none is ready; the local ones likewise.
pub(super) struct Usable {
    /// For frontends that may use every endpoint, sorted and de-duplicated.
    pub cluster: Vec<SocketAddrV4>,
    /// For frontends that may only use this node's endpoints (a `Local` policy), likewise.
    pub local: Vec<SocketAddrV4>,
    /// Some endpoint is usable somewhere: a frontend whose list is empty drops rather than
    /// refuses.
    pub any: bool,
}

pub(super) fn usable(candidates: &[Candidate<'_>], node: NodeTopology<'_>) -> Usable {
    let mode = topology_mode(candidates, node);
    let in_topology = |c: &Candidate<'_>| match mode {
        TopologyMode::All => true,
        TopologyMode::SameNode => node.name.is_some_and(|n| c.info.node_hints().iter().any(|h| h == n)),
        TopologyMode::SameZone => node.zone.is_some_and(|z| c.info.zone_hints().iter().any(|h| h == z)),
    };
    let pick = |f: &dyn Fn(&Candidate<'_>) -> bool| -> Vec<SocketAddrV4> {
        candidates.iter().filter(|c| f(c)).map(|c| c.backend).collect::<BTreeSet<_>>().into_iter().collect()
    };
    let mut cluster = pick(&|c| c.ready && in_topology(c));
    if cluster.is_empty() {
        cluster = pick(&|c| c.serving_terminating);
    }
    let mut local = pick(&|c| c.local && c.ready);
    if local.is_empty() {
        local = pick(&|c| c.local && c.serving_terminating);
    }
    let any = candidates.iter().any(|c| c.ready || c.serving_terminating);
    Usable { cluster, local, any }
}

#[cfg(test)]
mod tests {
    use super::super::{
        test_support::{build_on, fe},
        Protocol,
    };

    /// A Service (`spec` lines) with one slice of `endpoints` (YAML flow mappings).
    fn selection(spec: &str, endpoints: &[&str]) -> String {
        let eps: String = endpoints.iter().map(|e| format!("- {e}\n")).collect();
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: s}}\nspec:\n  clusterIP: 10.96.0.9\n  ports: [{{port: 80}}]\n{spec}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s-1, labels: {{kubernetes.io/service-name: s}}}}\n\
             addressType: IPv4\nports: [{{port: 8080}}]\nendpoints:\n{eps}"
        )
    }

    /// (backends, drop_unserved) of the ClusterIP frontend, on `node` in `zone`.
    fn chosen(spec: &str, endpoints: &[&str], node: Option<&str>, zone: Option<&str>) -> (Vec<String>, bool) {
        let s = build_on(&selection(spec, endpoints), node, zone);
        assert!(s.invalid.is_empty(), "{:?}", s.invalid);
        let d = &s.desired[&fe("10.96.0.9", 80, Protocol::Tcp)];
        (d.backends.iter().map(|b| b.ip().to_string()).collect(), d.drop_unserved)
    }

    #[test]
    fn endpoint_selection_follows_kube_proxy_categorize_endpoints() {
        let ready = |ip: &str, node: &str| format!("{{addresses: [{ip}], nodeName: {node}}}");
        let terminating = |ip: &str, serving: bool| {
            format!("{{addresses: [{ip}], conditions: {{ready: false, serving: {serving}, terminating: true}}}}")
        };
        let not_ready = |ip: &str| format!("{{addresses: [{ip}], conditions: {{ready: false}}}}");
        let v = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let eps = |list: &[String]| -> Vec<String> { list.to_vec() };
        let call = |spec: &str, list: &[String], node: Option<&str>, zone: Option<&str>| {
            chosen(spec, &list.iter().map(String::as_str).collect::<Vec<_>>(), node, zone)
        };

        // KEP-1669: ready endpoints only; with none ready, the serving terminating ones.
        let mixed = eps(&[ready("10.0.0.1", "n1"), terminating("10.0.0.2", true)]);
        assert_eq!(call("", &mixed, None, None), (v(&["10.0.0.1"]), false));
        let ending = eps(&[terminating("10.0.0.2", true), terminating("10.0.0.3", false), not_ready("10.0.0.4")]);
        assert_eq!(call("", &ending, None, None), (v(&["10.0.0.2"]), false));
        // Nothing usable anywhere: refuse (not drop).
        assert_eq!(call("", &eps(&[not_ready("10.0.0.4")]), None, None), (v(&[]), false));
        // publishNotReadyAddresses: every endpoint counts as ready.
        assert_eq!(
            call("  publishNotReadyAddresses: true", &eps(&[not_ready("10.0.0.4")]), None, None),
            (v(&["10.0.0.4"]), false)
        );

        // internalTrafficPolicy Local: this node's endpoints; none here but some elsewhere: drop.
        let spread = eps(&[ready("10.0.0.1", "n1"), ready("10.0.0.2", "n2")]);
        let local = "  internalTrafficPolicy: Local";
        assert_eq!(call(local, &spread, Some("n1"), None), (v(&["10.0.0.1"]), false));
        assert_eq!(call(local, &spread, Some("n3"), None), (v(&[]), true));
        assert_eq!(call("", &spread, Some("n3"), None), (v(&["10.0.0.1", "10.0.0.2"]), false));

        // Topology hints: used when every ready endpoint has them and one matches this node.
        let zoned = |ip: &str, zone: &str| format!("{{addresses: [{ip}], hints: {{forZones: [{{name: {zone}}}]}}}}");
        let hinted = eps(&[zoned("10.0.0.1", "z1"), zoned("10.0.0.2", "z2"), zoned("10.0.0.3", "z1")]);
        assert_eq!(call("", &hinted, Some("n1"), Some("z1")), (v(&["10.0.0.1", "10.0.0.3"]), false));
        // No endpoint for this zone, no zone label, or one endpoint without hints: all of them.
        assert_eq!(call("", &hinted, Some("n1"), Some("z9")).0.len(), 3);
        assert_eq!(call("", &hinted, Some("n1"), None).0.len(), 3);
        let partly = eps(&[zoned("10.0.0.1", "z1"), ready("10.0.0.2", "n2")]);
        assert_eq!(call("", &partly, Some("n1"), Some("z1")).0.len(), 2);
        // Node hints (PreferSameNode) come before zone hints.
        let noded = |ip: &str, node: &str, zone: &str| {
            format!("{{addresses: [{ip}], hints: {{forNodes: [{{name: {node}}}], forZones: [{{name: {zone}}}]}}}}")
        };
        let both = eps(&[noded("10.0.0.1", "n1", "z1"), noded("10.0.0.2", "n2", "z1")]);
        assert_eq!(call("", &both, Some("n1"), Some("z1")), (v(&["10.0.0.1"]), false));
    }
}
