//! An EndpointSlice's validation into a [`SliceInfo`]: what kube-proxy's `EndpointSliceCache`
//! keeps of it (its ports, and per endpoint the first address, conditions, node, zone and hints).
//! The join with the Service is `super::frontends`'.

use std::{
    collections::HashSet,
    net::Ipv4Addr,
    sync::{Arc, Mutex},
};

use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};

use super::{
    fields::{object_name, parse_port, parse_protocol, Object, ParsedProtocol},
    types::{InvalidCode, InvalidObject, Protocol},
};

/// Label that joins an EndpointSlice to its Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";

/// One endpoint of an EndpointSlice (its first address, as kube-proxy uses). 16 bytes: the
/// store keeps one per endpoint of every slice, and what names a node or a zone is shared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointInfo {
    pub address: Ipv4Addr,
    /// `conditions.ready`, where unset means ready.
    pub ready: bool,
    /// `conditions.serving`, where unset means the value of `ready`.
    pub serving: bool,
    /// `conditions.terminating`, where unset means false.
    pub terminating: bool,
    /// Its node, zone and hints; `None` when none is set. Interned: the endpoints on one node
    /// (with the same zone and hints) share one value.
    pub placement: Option<Arc<Placement>>,
}

/// Where an endpoint runs and which clients it is meant for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Placement {
    pub node_name: Option<String>,
    pub zone: Option<String>,
    /// `hints.forZones[].name`: the zones whose nodes should use this endpoint.
    pub zone_hints: Vec<String>,
    /// `hints.forNodes[].name`: the nodes that should use this endpoint.
    pub node_hints: Vec<String>,
}

impl EndpointInfo {
    pub fn node_name(&self) -> Option<&str> {
        self.placement.as_ref().and_then(|p| p.node_name.as_deref())
    }

    pub fn zone(&self) -> Option<&str> {
        self.placement.as_ref().and_then(|p| p.zone.as_deref())
    }

    pub fn zone_hints(&self) -> &[String] {
        self.placement.as_ref().map_or(&[], |p| &p.zone_hints)
    }

    pub fn node_hints(&self) -> &[String] {
        self.placement.as_ref().map_or(&[], |p| &p.node_hints)
    }
}

/// The placements in use, so that equal ones are one allocation. Entries no endpoint holds
/// any more are dropped when the set has doubled since the last such sweep.
static PLACEMENTS: Mutex<Interned> = Mutex::new(Interned { set: None, swept_at: 0 });

struct Interned {
    set: Option<HashSet<Arc<Placement>>>,
    /// The set's size after the last sweep.
    swept_at: usize,
}

fn intern(placement: Placement) -> Arc<Placement> {
    let mut interned = PLACEMENTS.lock().unwrap_or_else(|e| e.into_inner());
    let Interned { set, swept_at } = &mut *interned;
    let set = set.get_or_insert_with(HashSet::new);
    if let Some(shared) = set.get(&placement) {
        return shared.clone();
    }
    if set.len() >= 2 * *swept_at + 64 {
        set.retain(|p| Arc::strong_count(p) > 1);
        *swept_at = set.len();
    }
    let shared = Arc::new(placement);
    set.insert(shared.clone());
    shared
}

/// One port of an EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicePort {
    /// Port name, matched against the service port name ("" for an unnamed port).
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
}

/// A validated IPv4 EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceInfo {
    pub namespace: String,
    pub name: String,
    /// The Service it belongs to, from the `kubernetes.io/service-name` label.
    pub service: String,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<EndpointInfo>,
}

impl SliceInfo {
    /// Validates an EndpointSlice. `Ok(None)` for slices kproxy does not serve (IPv6, FQDN).
    pub fn from_slice(slice: &EndpointSlice) -> Result<Option<SliceInfo>, InvalidObject> {
        let (namespace, name) = object_name("EndpointSlice", &slice.metadata)?;
        let object = Object::new("EndpointSlice", &namespace, &name);
        let service = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(LABEL_SERVICE_NAME))
            .filter(|s| !s.is_empty())
            .cloned()
            .ok_or_else(|| object.invalid(InvalidCode::MissingField, format!("metadata.labels[{LABEL_SERVICE_NAME}]"), "missing"))?;
        match slice.address_type.as_str() {
            "IPv4" => {}
            "IPv6" | "FQDN" => return Ok(None),
            other => return Err(object.invalid(InvalidCode::UnknownType, "addressType", format!("unknown address type {other:?}"))),
        }
        let ports = slice_ports(slice, &object)?;
        let mut endpoints = Vec::with_capacity(slice.endpoints.len());
        for (i, ep) in slice.endpoints.iter().enumerate() {
            endpoints.push(endpoint(ep, i, &object)?);
        }
        Ok(Some(SliceInfo { namespace, name, service, ports, endpoints }))
    }
}

/// The slice's ports with a number and a protocol kproxy serves.
fn slice_ports(slice: &EndpointSlice, object: &Object) -> Result<Vec<SlicePort>, InvalidObject> {
    let mut ports = Vec::new();
    for (i, p) in slice.ports.as_deref().unwrap_or_default().iter().enumerate() {
        // A nil port means "all ports": only meaningful for selector-less services, which
        // kube-proxy skips too.
        let Some(port) = p.port else { continue };
        let port = parse_port(port).map_err(|r| object.invalid(InvalidCode::InvalidPort, format!("ports[{i}].port"), r))?;
        let protocol = match parse_protocol(p.protocol.as_deref())
            .map_err(|r| object.invalid(InvalidCode::UnknownProtocol, format!("ports[{i}].protocol"), r))?
        {
            ParsedProtocol::Served(protocol) => protocol,
            ParsedProtocol::Sctp => continue,
        };
        ports.push(SlicePort { name: p.name.clone().unwrap_or_default(), port, protocol });
    }
    // Exact capacities: the store keeps every slice for as long as it exists.
    ports.shrink_to_fit();
    Ok(ports)
}

/// Endpoint `i` of a slice: its first address and its conditions, with unset ones defaulted as
/// the API documents them.
fn endpoint(ep: &Endpoint, i: usize, object: &Object) -> Result<EndpointInfo, InvalidObject> {
    let Some(first) = ep.addresses.first() else {
        return Err(object.invalid(InvalidCode::MissingField, format!("endpoints[{i}].addresses"), "empty"));
    };
    let address = first.parse::<Ipv4Addr>().map_err(|_| {
        object.invalid(InvalidCode::InvalidAddress, format!("endpoints[{i}].addresses[0]"), format!("{first:?} is not an IPv4 address"))
    })?;
    let conditions = ep.conditions.as_ref();
    let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
    let placement = Placement {
        node_name: ep.node_name.clone(),
        zone: ep.zone.clone(),
        zone_hints: ep.hints.iter().flat_map(|h| h.for_zones.iter().flatten()).map(|z| z.name.clone()).collect(),
        node_hints: ep.hints.iter().flat_map(|h| h.for_nodes.iter().flatten()).map(|n| n.name.clone()).collect(),
    };
    Ok(EndpointInfo {
        address,
        ready,
        serving: conditions.and_then(|c| c.serving).unwrap_or(ready),
        terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
        placement: (placement != Placement::default()).then(|| intern(placement)),
    })
}

#[cfg(test)]
mod tests {
    use super::super::{
        test_support::{addrs, build, fe},
        Protocol,
    };

    const WEB: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  ports:
  - {name: http, port: 80}
  - {name: dns, port: 53, protocol: UDP}
  - {name: dns-tcp, port: 53, protocol: TCP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-a, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}, {name: dns, port: 5353, protocol: UDP}]
endpoints:
- addresses: [10.244.1.1]
- addresses: [10.244.1.2]
  conditions: {ready: false, serving: true, terminating: true}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-b, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}, {name: dns-tcp, port: 5353}]
endpoints:
- addresses: [10.244.2.1]
  conditions: {ready: true}
- addresses: [10.244.1.1]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: other, namespace: default, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 9999}]
endpoints: [{addresses: [10.244.9.9]}]
"#;

    #[test]
    fn slices_merge_by_label_ports_match_by_name_and_only_ready_endpoints_serve() {
        let s = build(WEB);
        assert!(s.invalid.is_empty(), "{:?}", s.invalid);
        assert_eq!(s.desired.len(), 3);
        let http = &s.desired[&fe("10.96.0.10", 80, Protocol::Tcp)];
        assert_eq!(http.name.to_string(), "shop/web:http/TCP");
        // Merged from both slices, de-duplicated, the not-ready one left out, and the slice of
        // the same-named service in another namespace ignored.
        assert_eq!(http.backends, addrs(&["10.244.1.1:8080", "10.244.2.1:8080"]));
        let dns = &s.desired[&fe("10.96.0.10", 53, Protocol::Udp)];
        assert_eq!(dns.backends, addrs(&["10.244.1.1:5353"]));
        let dns_tcp = &s.desired[&fe("10.96.0.10", 53, Protocol::Tcp)];
        assert_eq!(dns_tcp.backends, addrs(&["10.244.1.1:5353", "10.244.2.1:5353"]));
    }

    #[test]
    fn an_endpoint_is_16_bytes_and_endpoints_on_one_node_share_its_placement() {
        // The store keeps one per endpoint: at 100,000 slices of 10, every byte is a MB.
        assert!(std::mem::size_of::<super::EndpointInfo>() <= 16, "{} bytes", std::mem::size_of::<super::EndpointInfo>());
        let (_, slices) = crate::sources::manifests::parse_objects(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: a, labels: {kubernetes.io/service-name: s}}\n\
             addressType: IPv4\nports: [{port: 80}]\nendpoints:\n\
             - {addresses: [10.244.1.1], nodeName: node-a, zone: z1}\n\
             - {addresses: [10.244.1.2], nodeName: node-a, zone: z1}\n\
             - {addresses: [10.244.2.1], nodeName: node-b, zone: z1, hints: {forZones: [{name: z1}]}}\n\
             - {addresses: [10.244.3.1]}\n",
        );
        let info = super::SliceInfo::from_slice(&slices[0]).unwrap().unwrap();
        let eps = &info.endpoints;
        let (a1, a2, b) = (eps[0].placement.as_ref().unwrap(), eps[1].placement.as_ref().unwrap(), eps[2].placement.as_ref().unwrap());
        assert!(std::sync::Arc::ptr_eq(a1, a2), "one node, one placement");
        assert!(!std::sync::Arc::ptr_eq(a1, b));
        assert_eq!((eps[0].node_name(), eps[0].zone(), eps[0].zone_hints()), (Some("node-a"), Some("z1"), &[][..]));
        assert_eq!((eps[2].node_name(), eps[2].zone_hints()), (Some("node-b"), &["z1".to_string()][..]));
        assert_eq!((eps[3].placement.is_none(), eps[3].node_name(), eps[3].node_hints()), (true, None, &[][..]));
    }
}
