//! An EndpointSlice's validation into a [`SliceInfo`]: what kube-proxy's `EndpointSliceCache`
//! keeps of it (its ports, and per endpoint the first address, conditions, node, zone and hints).
//! The join with the Service is `super::frontends`'.

use std::net::Ipv4Addr;

use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};

use super::{
    fields::{object_name, parse_port, parse_protocol, Object, ParsedProtocol},
    types::{InvalidCode, InvalidObject, Protocol},
};

/// Label that joins an EndpointSlice to its Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";

/// One endpoint of an EndpointSlice (its first address, as kube-proxy uses).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointInfo {
    pub address: Ipv4Addr,
    /// `conditions.ready`, where unset means ready.
    pub ready: bool,
    /// `conditions.serving`, where unset means the value of `ready`.
    pub serving: bool,
    /// `conditions.terminating`, where unset means false.
    pub terminating: bool,
    pub node_name: Option<String>,
    pub zone: Option<String>,
    /// `hints.forZones[].name`: the zones whose nodes should use this endpoint.
    pub zone_hints: Vec<String>,
    /// `hints.forNodes[].name`: the nodes that should use this endpoint.
    pub node_hints: Vec<String>,
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
    Ok(EndpointInfo {
        address,
        ready,
        serving: conditions.and_then(|c| c.serving).unwrap_or(ready),
        terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
        node_name: ep.node_name.clone(),
        zone: ep.zone.clone(),
        zone_hints: ep.hints.iter().flat_map(|h| h.for_zones.iter().flatten()).map(|z| z.name.clone()).collect(),
        node_hints: ep.hints.iter().flat_map(|h| h.for_nodes.iter().flatten()).map(|n| n.name.clone()).collect(),
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
}
