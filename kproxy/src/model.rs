//! The model: Services and EndpointSlices reduced to what the dataplane serves, validated.
//!
//! Sources (manifest files, later the apiserver) hand Kubernetes objects to [`ServiceInfo::from_service`]
//! and [`SliceInfo::from_slice`]; [`desired_state`] joins them the way kube-proxy does. Invalid
//! objects become [`InvalidObject`] errors that name the object and the field; they are skipped
//! and never affect other objects.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{Ipv4Addr, SocketAddrV4},
};

use k8s_openapi::{
    api::{core::v1::Service, discovery::v1::EndpointSlice},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

pub use crate::node::Cidr;

/// `sessionAffinityConfig.clientIP.timeoutSeconds` when unset (3 hours, as the API's default).
pub const DEFAULT_AFFINITY_TIMEOUT_SECONDS: i32 = 10_800;
/// The largest timeout the API accepts (1 day).
pub const MAX_AFFINITY_TIMEOUT_SECONDS: i32 = 86_400;

/// Label that joins an EndpointSlice to its Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// Services with this label belong to another proxy (kube-proxy skips them too).
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// Services with this label are headless (kube-proxy skips them too).
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";

/// L4 protocols kproxy serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// The IP protocol number used in map keys.
    pub fn ip_proto(self) -> u8 {
        match self {
            Protocol::Tcp => kproxy_common::PROTO_TCP,
            Protocol::Udp => kproxy_common::PROTO_UDP,
        }
    }

    pub fn from_ip_proto(proto: u8) -> Option<Self> {
        match proto {
            kproxy_common::PROTO_TCP => Some(Protocol::Tcp),
            kproxy_common::PROTO_UDP => Some(Protocol::Udp),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a Kubernetes `protocol` field holds.
enum ParsedProtocol {
    Served(Protocol),
    /// Valid in Kubernetes but not served by kproxy yet.
    Sctp,
}

fn parse_protocol(value: Option<&str>) -> Result<ParsedProtocol, String> {
    match value.unwrap_or("TCP") {
        "TCP" => Ok(ParsedProtocol::Served(Protocol::Tcp)),
        "UDP" => Ok(ParsedProtocol::Served(Protocol::Udp)),
        "SCTP" => Ok(ParsedProtocol::Sctp),
        other => Err(format!("unknown protocol {other:?} (want TCP, UDP or SCTP)")),
    }
}

/// The kind of a frontend, the one type for it in the agent: the model builds frontends of each
/// kind, the plan writes its `SVC_FLAG_*` bit and its `SVC_TYPE_*` metadata code, and `dump`
/// prints its name. A ClusterIP frontend is `ClusterIp` whatever the Service's type, and
/// `ExternalIp` is a kind of frontend only; a Service's own `spec.type` is one of the other
/// three ([`ServiceInfo::svc_type`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FrontendKind {
    ClusterIp,
    NodePort,
    ExternalIp,
    LoadBalancer,
}

impl FrontendKind {
    pub const ALL: [FrontendKind; 4] =
        [FrontendKind::ClusterIp, FrontendKind::NodePort, FrontendKind::ExternalIp, FrontendKind::LoadBalancer];

    /// The name `kproxy dump` prints (the `type` of [`kproxy_api::dump::DumpService`]).
    pub fn as_str(self) -> &'static str {
        match self {
            FrontendKind::ClusterIp => "ClusterIP",
            FrontendKind::NodePort => "NodePort",
            FrontendKind::ExternalIp => "ExternalIP",
            FrontendKind::LoadBalancer => "LoadBalancer",
        }
    }

    /// The `SVC_FLAG_*` bit of a frontend entry of this kind (`kproxy_common::lb`).
    pub fn flag(self) -> u16 {
        use kproxy_common::lb::{SVC_FLAG_CLUSTER_IP, SVC_FLAG_EXTERNAL_IP, SVC_FLAG_LOAD_BALANCER, SVC_FLAG_NODE_PORT};
        match self {
            FrontendKind::ClusterIp => SVC_FLAG_CLUSTER_IP,
            FrontendKind::NodePort => SVC_FLAG_NODE_PORT,
            FrontendKind::ExternalIp => SVC_FLAG_EXTERNAL_IP,
            FrontendKind::LoadBalancer => SVC_FLAG_LOAD_BALANCER,
        }
    }

    /// Every kind's bit: the `SVC_FLAG_*` bits that say which kind of frontend an entry is.
    pub fn all_flags() -> u16 {
        Self::ALL.iter().fold(0, |bits, kind| bits | kind.flag())
    }

    /// The `SVC_TYPE_*` code of the metadata map (`kproxy_common::lb::ServiceMeta::svc_type`).
    pub fn meta_code(self) -> u8 {
        use kproxy_common::lb::{SVC_TYPE_CLUSTER_IP, SVC_TYPE_EXTERNAL_IP, SVC_TYPE_LOAD_BALANCER, SVC_TYPE_NODE_PORT};
        match self {
            FrontendKind::ClusterIp => SVC_TYPE_CLUSTER_IP,
            FrontendKind::NodePort => SVC_TYPE_NODE_PORT,
            FrontendKind::ExternalIp => SVC_TYPE_EXTERNAL_IP,
            FrontendKind::LoadBalancer => SVC_TYPE_LOAD_BALANCER,
        }
    }

    /// The kind a metadata code names; `None` for a code the agent never writes.
    pub fn from_meta_code(code: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.meta_code() == code)
    }
}

impl fmt::Display for FrontendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `namespace/name:port_name`, kube-proxy's `ServicePortName` (protocol included, since the
/// same port name may not repeat but TCP and UDP ports are distinct frontends).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServicePortName {
    pub namespace: String,
    pub name: String,
    pub port_name: String,
    pub protocol: Protocol,
}

impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)?;
        if !self.port_name.is_empty() {
            write!(f, ":{}", self.port_name)?;
        }
        write!(f, "/{}", self.protocol)
    }
}

/// An object that failed validation: which object, which field, and why.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, thiserror::Error)]
#[error("{kind} {object}: {field}: {reason}")]
pub struct InvalidObject {
    /// `Service` or `EndpointSlice`.
    pub kind: &'static str,
    /// `namespace/name`, or a description of where the object came from if it has no name.
    pub object: String,
    /// Path of the offending field, e.g. `spec.ports[1].port`.
    pub field: String,
    /// What is wrong, for people.
    pub reason: String,
    /// What is wrong, for metrics.
    pub code: InvalidCode,
}

/// Classes of invalid input (the `reason` label of `kproxy_invalid_objects_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum InvalidCode {
    MissingField,
    InvalidAddress,
    InvalidPort,
    UnknownProtocol,
    UnknownType,
    UnsupportedProtocol,
    DuplicatePort,
    DuplicateObject,
    FrontendConflict,
    InvalidValue,
}

impl InvalidCode {
    pub fn as_str(self) -> &'static str {
        match self {
            InvalidCode::MissingField => "missing_field",
            InvalidCode::InvalidAddress => "invalid_address",
            InvalidCode::InvalidPort => "invalid_port",
            InvalidCode::UnknownProtocol => "unknown_protocol",
            InvalidCode::UnknownType => "unknown_type",
            InvalidCode::UnsupportedProtocol => "unsupported_protocol",
            InvalidCode::DuplicatePort => "duplicate_port",
            InvalidCode::DuplicateObject => "duplicate_object",
            InvalidCode::FrontendConflict => "frontend_conflict",
            InvalidCode::InvalidValue => "invalid_value",
        }
    }
}

/// Why a valid Service is not programmed (not an error: kube-proxy ignores these too).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ignored {
    ExternalName,
    Headless,
    OtherProxy,
    NoIpv4ClusterIp,
}

/// One served port of a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePortInfo {
    pub name: ServicePortName,
    pub port: u16,
    /// `spec.ports[].nodePort` of NodePort and LoadBalancer Services.
    pub node_port: Option<u16>,
}

/// A validated Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceInfo {
    pub namespace: String,
    pub name: String,
    /// `spec.type`: `ClusterIp`, `NodePort` or `LoadBalancer` (never `ExternalIp`, a kind of
    /// frontend only; `ExternalName` Services are ignored).
    pub svc_type: FrontendKind,
    pub cluster_ip: Ipv4Addr,
    pub ports: Vec<ServicePortInfo>,
    /// `spec.externalIPs` (IPv4 ones).
    pub external_ips: Vec<Ipv4Addr>,
    /// `status.loadBalancer.ingress[].ip` of LoadBalancer Services (IPv4 ones), except those
    /// whose `ipMode` is `Proxy`.
    pub load_balancer_ips: Vec<Ipv4Addr>,
    /// `spec.externalTrafficPolicy: Local`: NodePort, external and load-balancer frontends use
    /// only endpoints on this node (and keep the client's address) for clients from outside;
    /// clients in the cluster get the cluster-wide endpoints.
    pub external_policy_local: bool,
    /// `spec.internalTrafficPolicy: Local`: the ClusterIP uses only endpoints on this node.
    pub internal_policy_local: bool,
    /// `sessionAffinity: ClientIP`: its `timeoutSeconds` (default 10800); `None` without.
    pub affinity_timeout: Option<u32>,
    /// `spec.publishNotReadyAddresses`: every endpoint counts as ready (as the EndpointSlice
    /// controller marks them for such a Service).
    pub publish_not_ready: bool,
    /// `spec.healthCheckNodePort` of a Service with `externalTrafficPolicy: Local`.
    pub health_check_node_port: Option<u16>,
    /// `spec.loadBalancerSourceRanges` (IPv4 ones, host bits cleared): when not empty, the
    /// load-balancer IPs accept only clients from these ranges.
    pub source_ranges: Vec<Cidr>,
    /// Ports skipped because kproxy does not serve their protocol (SCTP), as field paths.
    pub unsupported_ports: Vec<String>,
}

/// Outcome of reading one Service object.
#[derive(Debug)]
pub enum ServiceOutcome {
    Served(ServiceInfo),
    Ignored(Ignored),
}

fn object_name(kind: &'static str, meta: &ObjectMeta) -> Result<(String, String), InvalidObject> {
    let namespace = meta.namespace.clone().unwrap_or_else(|| "default".to_string());
    match meta.name.as_deref() {
        Some(name) if !name.is_empty() => Ok((namespace, name.to_string())),
        _ => Err(InvalidObject {
            kind,
            object: format!("{namespace}/<unnamed>"),
            field: "metadata.name".into(),
            reason: "missing".into(),
            code: InvalidCode::MissingField,
        }),
    }
}

fn parse_port(value: i32) -> Result<u16, String> {
    u16::try_from(value)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{value} is out of range 1-65535"))
}

impl ServiceInfo {
    /// Validates a Service. `Err` names the field; `Ignored` is a valid Service kproxy must not
    /// touch (ExternalName, headless, owned by another proxy, IPv6-only).
    pub fn from_service(svc: &Service) -> Result<ServiceOutcome, InvalidObject> {
        let (namespace, name) = object_name("Service", &svc.metadata)?;
        let invalid = |code: InvalidCode, field: &str, reason: String| InvalidObject {
            kind: "Service",
            object: format!("{namespace}/{name}"),
            field: field.to_string(),
            reason,
            code,
        };
        let labels = svc.metadata.labels.as_ref();
        if labels.is_some_and(|l| l.contains_key(LABEL_SERVICE_PROXY_NAME)) {
            return Ok(ServiceOutcome::Ignored(Ignored::OtherProxy));
        }
        if labels.is_some_and(|l| l.contains_key(LABEL_HEADLESS)) {
            return Ok(ServiceOutcome::Ignored(Ignored::Headless));
        }
        let spec = svc.spec.as_ref().ok_or_else(|| invalid(InvalidCode::MissingField, "spec", "missing".into()))?;
        let svc_type = match spec.type_.as_deref().unwrap_or("ClusterIP") {
            "ClusterIP" => FrontendKind::ClusterIp,
            "NodePort" => FrontendKind::NodePort,
            "LoadBalancer" => FrontendKind::LoadBalancer,
            "ExternalName" => return Ok(ServiceOutcome::Ignored(Ignored::ExternalName)),
            other => return Err(invalid(InvalidCode::UnknownType, "spec.type", format!("unknown service type {other:?}"))),
        };
        let cluster_ip = match spec.cluster_ip.as_deref() {
            None | Some("") | Some("None") => return Ok(ServiceOutcome::Ignored(Ignored::Headless)),
            Some(ip) => ip,
        };
        // spec.clusterIPs[0] equals spec.clusterIP; a second entry is the other family.
        let mut ipv4 = None;
        let all_ips = spec.cluster_ips.clone().unwrap_or_else(|| vec![cluster_ip.to_string()]);
        for (i, ip) in all_ips.iter().enumerate() {
            let field = if spec.cluster_ips.is_some() {
                format!("spec.clusterIPs[{i}]")
            } else {
                "spec.clusterIP".to_string()
            };
            match ip.parse::<std::net::IpAddr>() {
                Ok(std::net::IpAddr::V4(v4)) => ipv4 = ipv4.or(Some(v4)),
                Ok(std::net::IpAddr::V6(_)) => {}
                Err(_) => return Err(invalid(InvalidCode::InvalidAddress, &field, format!("{ip:?} is not an IP address"))),
            }
        }
        let Some(cluster_ip) = ipv4 else {
            return Ok(ServiceOutcome::Ignored(Ignored::NoIpv4ClusterIp));
        };
        let mut ports = Vec::new();
        let mut unsupported_ports = Vec::new();
        let spec_ports = spec.ports.as_deref().unwrap_or_default();
        for (i, p) in spec_ports.iter().enumerate() {
            let port_name = p.name.clone().unwrap_or_default();
            if port_name.is_empty() && spec_ports.len() > 1 {
                return Err(invalid(
                    InvalidCode::MissingField,
                    &format!("spec.ports[{i}].name"),
                    "required when a service has more than one port".into(),
                ));
            }
            let port = parse_port(p.port).map_err(|r| invalid(InvalidCode::InvalidPort, &format!("spec.ports[{i}].port"), r))?;
            let protocol = match parse_protocol(p.protocol.as_deref())
                .map_err(|r| invalid(InvalidCode::UnknownProtocol, &format!("spec.ports[{i}].protocol"), r))?
            {
                ParsedProtocol::Served(protocol) => protocol,
                ParsedProtocol::Sctp => {
                    unsupported_ports.push(format!("spec.ports[{i}]"));
                    continue;
                }
            };
            let name = ServicePortName {
                namespace: namespace.clone(),
                name: name.clone(),
                port_name,
                protocol,
            };
            if ports.iter().any(|q: &ServicePortInfo| q.name == name || (q.port == port && q.name.protocol == protocol)) {
                return Err(invalid(InvalidCode::DuplicatePort, &format!("spec.ports[{i}]"), "duplicate port".into()));
            }
            let node_port = match (svc_type, p.node_port) {
                (FrontendKind::NodePort | FrontendKind::LoadBalancer, Some(np)) => Some(
                    parse_port(np).map_err(|r| invalid(InvalidCode::InvalidPort, &format!("spec.ports[{i}].nodePort"), r))?,
                ),
                _ => None,
            };
            ports.push(ServicePortInfo { name, port, node_port });
        }
        // IPv6 entries belong to the other family, which kproxy does not serve yet.
        let parse_ipv4s = |list: &[String], field: &dyn Fn(usize) -> String| -> Result<Vec<Ipv4Addr>, InvalidObject> {
            let mut out = Vec::new();
            for (i, ip) in list.iter().enumerate() {
                match ip.parse::<std::net::IpAddr>() {
                    Ok(std::net::IpAddr::V4(v4)) => out.push(v4),
                    Ok(std::net::IpAddr::V6(_)) => {}
                    Err(_) => return Err(invalid(InvalidCode::InvalidAddress, &field(i), format!("{ip:?} is not an IP address"))),
                }
            }
            Ok(out)
        };
        let external_ips = parse_ipv4s(spec.external_ips.as_deref().unwrap_or_default(), &|i| format!("spec.externalIPs[{i}]"))?;
        let ingress_ips: Vec<String> = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref())
            .into_iter()
            .flatten()
            // kube-proxy's `IsVIPMode`: an ingress IP with `ipMode: Proxy` (or any mode but
            // `VIP`) is not a frontend: traffic to it must reach the load balancer, which
            // proxies it to the node ports itself.
            .filter(|ing| ing.ip_mode.as_deref().is_none_or(|mode| mode == "VIP"))
            .filter_map(|ing| ing.ip.clone())
            .collect();
        let load_balancer_ips = if svc_type == FrontendKind::LoadBalancer {
            parse_ipv4s(&ingress_ips, &|i| format!("status.loadBalancer.ingress[{i}].ip"))?
        } else {
            Vec::new()
        };
        let policy_local = |value: Option<&str>, field: &str| match value {
            None | Some("Cluster") => Ok(false),
            Some("Local") => Ok(true),
            Some(other) => Err(invalid(
                InvalidCode::UnknownType,
                field,
                format!("unknown traffic policy {other:?} (want Cluster or Local)"),
            )),
        };
        let external_policy_local =
            policy_local(spec.external_traffic_policy.as_deref(), "spec.externalTrafficPolicy")?;
        let internal_policy_local =
            policy_local(spec.internal_traffic_policy.as_deref(), "spec.internalTrafficPolicy")?;
        let affinity_timeout = match spec.session_affinity.as_deref() {
            None | Some("None") => None,
            Some("ClientIP") => {
                let timeout = spec
                    .session_affinity_config
                    .as_ref()
                    .and_then(|c| c.client_ip.as_ref())
                    .and_then(|c| c.timeout_seconds)
                    .unwrap_or(DEFAULT_AFFINITY_TIMEOUT_SECONDS);
                if !(1..=MAX_AFFINITY_TIMEOUT_SECONDS).contains(&timeout) {
                    return Err(invalid(
                        InvalidCode::InvalidValue,
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                        format!("{timeout} is out of range 1-{MAX_AFFINITY_TIMEOUT_SECONDS}"),
                    ));
                }
                Some(timeout as u32)
            }
            Some(other) => {
                return Err(invalid(
                    InvalidCode::UnknownType,
                    "spec.sessionAffinity",
                    format!("unknown session affinity {other:?} (want None or ClientIP)"),
                ))
            }
        };
        let mut source_ranges = Vec::new();
        for (i, range) in spec.load_balancer_source_ranges.iter().flatten().enumerate() {
            let range = range.trim();
            if range.contains(':') {
                continue; // IPv6: the other family
            }
            let cidr: Cidr = range.parse().map_err(|reason| {
                invalid(InvalidCode::InvalidAddress, &format!("spec.loadBalancerSourceRanges[{i}]"), reason)
            })?;
            source_ranges.push(cidr.masked());
        }
        source_ranges.sort();
        source_ranges.dedup();
        let health_check_node_port = match spec.health_check_node_port {
            Some(p) if external_policy_local => Some(
                parse_port(p).map_err(|r| invalid(InvalidCode::InvalidPort, "spec.healthCheckNodePort", r))?,
            ),
            _ => None,
        };
        Ok(ServiceOutcome::Served(ServiceInfo {
            namespace,
            name,
            svc_type,
            cluster_ip,
            ports,
            external_ips,
            load_balancer_ips,
            external_policy_local,
            internal_policy_local,
            affinity_timeout,
            publish_not_ready: spec.publish_not_ready_addresses.unwrap_or(false),
            health_check_node_port,
            source_ranges,
            unsupported_ports,
        }))
    }
}

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
        let invalid = |code: InvalidCode, field: String, reason: String| InvalidObject {
            kind: "EndpointSlice",
            object: format!("{namespace}/{name}"),
            field,
            reason,
            code,
        };
        let service = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(LABEL_SERVICE_NAME))
            .filter(|s| !s.is_empty())
            .cloned()
            .ok_or_else(|| invalid(InvalidCode::MissingField, format!("metadata.labels[{LABEL_SERVICE_NAME}]"), "missing".into()))?;
        match slice.address_type.as_str() {
            "IPv4" => {}
            "IPv6" | "FQDN" => return Ok(None),
            other => {
                return Err(invalid(InvalidCode::UnknownType, "addressType".into(), format!("unknown address type {other:?}")))
            }
        }
        let mut ports = Vec::new();
        for (i, p) in slice.ports.as_deref().unwrap_or_default().iter().enumerate() {
            // A nil port means "all ports": only meaningful for selector-less services, which
            // kube-proxy skips too.
            let Some(port) = p.port else { continue };
            let port = parse_port(port).map_err(|r| invalid(InvalidCode::InvalidPort, format!("ports[{i}].port"), r))?;
            let protocol = match parse_protocol(p.protocol.as_deref())
                .map_err(|r| invalid(InvalidCode::UnknownProtocol, format!("ports[{i}].protocol"), r))?
            {
                ParsedProtocol::Served(protocol) => protocol,
                ParsedProtocol::Sctp => continue,
            };
            ports.push(SlicePort { name: p.name.clone().unwrap_or_default(), port, protocol });
        }
        // Exact capacities: the store keeps every slice for as long as it exists.
        ports.shrink_to_fit();
        let mut endpoints = Vec::with_capacity(slice.endpoints.len());
        for (i, ep) in slice.endpoints.iter().enumerate() {
            let Some(first) = ep.addresses.first() else {
                return Err(invalid(InvalidCode::MissingField, format!("endpoints[{i}].addresses"), "empty".into()));
            };
            let address = first.parse::<Ipv4Addr>().map_err(|_| {
                invalid(
                    InvalidCode::InvalidAddress,
                    format!("endpoints[{i}].addresses[0]"),
                    format!("{first:?} is not an IPv4 address"),
                )
            })?;
            let conditions = ep.conditions.as_ref();
            let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
            endpoints.push(EndpointInfo {
                address,
                ready,
                serving: conditions.and_then(|c| c.serving).unwrap_or(ready),
                terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
                node_name: ep.node_name.clone(),
                zone: ep.zone.clone(),
                zone_hints: ep.hints.iter().flat_map(|h| h.for_zones.iter().flatten()).map(|z| z.name.clone()).collect(),
                node_hints: ep.hints.iter().flat_map(|h| h.for_nodes.iter().flatten()).map(|n| n.name.clone()).collect(),
            });
        }
        Ok(Some(SliceInfo { namespace, name, service, ports, endpoints }))
    }
}

/// A frontend: what a client connects to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    pub address: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.address, self.port, self.protocol)
    }
}

/// What one frontend must translate to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredService {
    pub name: ServicePortName,
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

/// This node, as endpoint selection sees it.
#[derive(Clone, Copy, Debug, Default)]
pub struct NodeTopology<'a> {
    /// The node's name: endpoints with this `nodeName` are local, `hints.forNodes` name it.
    pub name: Option<&'a str>,
    /// The node's `topology.kubernetes.io/zone` label, matched against `hints.forZones`.
    pub zone: Option<&'a str>,
}

/// One endpoint of a service port, with what selection needs.
struct Candidate<'a> {
    backend: SocketAddrV4,
    ready: bool,
    serving_terminating: bool,
    local: bool,
    info: &'a EndpointInfo,
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
    let hinted = |hints: fn(&EndpointInfo) -> &Vec<String>, value: Option<&str>| {
        ready.iter().all(|ep| !hints(ep).is_empty()) && value.is_some_and(|v| ready.iter().any(|ep| hints(ep).iter().any(|h| h == v)))
    };
    if hinted(|ep| &ep.node_hints, node.name) {
        TopologyMode::SameNode
    } else if hinted(|ep| &ep.zone_hints, node.zone) {
        TopologyMode::SameZone
    } else {
        TopologyMode::All
    }
}

/// The endpoints a port's frontends use, as kube-proxy's `CategorizeEndpoints` chooses them
/// (KEP-1669 and KEP-2433/4444): ready endpoints (within the topology hints for this node),
/// falling back to serving-and-terminating ones when none is ready; the local ones likewise.
struct Usable {
    cluster: Vec<SocketAddrV4>,
    local: Vec<SocketAddrV4>,
    /// Some endpoint is usable somewhere: a frontend whose list is empty drops rather than
    /// refuses.
    any: bool,
}

fn usable(candidates: &[Candidate<'_>], node: NodeTopology<'_>) -> Usable {
    let mode = topology_mode(candidates, node);
    let in_topology = |c: &Candidate<'_>| match mode {
        TopologyMode::All => true,
        TopologyMode::SameNode => node.name.is_some_and(|n| c.info.node_hints.iter().any(|h| h == n)),
        TopologyMode::SameZone => node.zone.is_some_and(|z| c.info.zone_hints.iter().any(|h| h == z)),
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

/// The frontends of one Service with their backends, joined with its slices as kube-proxy
/// does: slice ports match service ports by name and protocol, several slices merge, and
/// [`usable`] endpoints are backends. Each port is served on the ClusterIP, on every external
/// IP and load-balancer IP, and (NodePort and LoadBalancer Services) on every address of
/// `node_addresses` at its node port. The ClusterIP uses only local endpoints with
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
        let mut candidates = Vec::new();
        for slice in slices.clone() {
            let matching = slice
                .ports
                .iter()
                .filter(|p| p.name == port.name.port_name && p.protocol == port.name.protocol);
            for slice_port in matching {
                for ep in &slice.endpoints {
                    let ready = ep.ready || svc.publish_not_ready;
                    candidates.push(Candidate {
                        backend: SocketAddrV4::new(ep.address, slice_port.port),
                        ready,
                        serving_terminating: !ready && ep.serving && ep.terminating,
                        local: node.name.is_some() && ep.node_name.as_deref() == node.name,
                        info: ep,
                    });
                }
            }
        }
        let usable = usable(&candidates, node);
        let protocol = port.name.protocol;
        let mut add = |address: Ipv4Addr, port_number: u16, frontend_type: FrontendKind| {
            let local_only =
                if frontend_type == FrontendKind::ClusterIp { svc.internal_policy_local } else { svc.external_policy_local };
            let backends = if local_only { usable.local.clone() } else { usable.cluster.clone() };
            let drop_unserved = backends.is_empty() && usable.any;
            let internal_backends = (frontend_type != FrontendKind::ClusterIp
                && local_only
                && usable.cluster != backends
                && !usable.cluster.is_empty())
            .then(|| usable.cluster.clone());
            let used = |b: &SocketAddrV4| {
                backends.binary_search(b).is_ok() || internal_backends.as_ref().is_some_and(|i| i.binary_search(b).is_ok())
            };
            let draining: Vec<SocketAddrV4> = candidates
                .iter()
                .map(|c| c.backend)
                .filter(|b| !used(b))
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            let source_ranges =
                if frontend_type == FrontendKind::LoadBalancer { svc.source_ranges.clone() } else { Vec::new() };
            let desired = DesiredService {
                name: port.name.clone(),
                frontend_type,
                backends,
                internal_backends,
                draining,
                drop_unserved,
                source_ranges,
                affinity_timeout: svc.affinity_timeout.unwrap_or(0),
            };
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The outcome of feeding the objects into a fresh store.
    struct Built {
        desired: DesiredState,
        invalid: Vec<InvalidObject>,
        ignored: Vec<(String, Ignored)>,
    }

    fn build(yaml: &str) -> Built {
        build_on(yaml, None, None)
    }

    /// As [`build`], on a node with this name and zone.
    fn build_on(yaml: &str, node: Option<&str>, zone: Option<&str>) -> Built {
        let (services, slices) = crate::sources::manifests::parse_objects(yaml);
        let mut store = crate::tracker::ModelStore::default();
        store.set_node_name(node.map(str::to_string));
        store.set_node_zone(zone.map(str::to_string));
        store.replace_all(&services, &slices);
        store.take_changes();
        let invalid: Vec<InvalidObject> = store.invalid().cloned().collect();
        let mut ignored: Vec<(String, Ignored)> =
            store.ignored().map(|((ns, n), w)| (format!("{ns}/{n}"), *w)).collect();
        ignored.sort_by(|a, b| a.0.cmp(&b.0));
        Built { desired: store.desired().clone(), invalid, ignored }
    }

    fn fe(addr: &str, port: u16, protocol: Protocol) -> Frontend {
        Frontend { address: addr.parse().unwrap(), port, protocol }
    }

    fn addrs(list: &[&str]) -> Vec<SocketAddrV4> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

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
    fn services_kube_proxy_leaves_alone_are_ignored() {
        let s = build(
            r#"
apiVersion: v1
kind: Service
metadata: {name: headless}
spec: {clusterIP: None, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: ext}
spec: {type: ExternalName, externalName: example.com}
---
apiVersion: v1
kind: Service
metadata: {name: other, labels: {service.kubernetes.io/service-proxy-name: foo}}
spec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: labelled-headless, labels: {service.kubernetes.io/headless: ""}}
spec: {clusterIP: 10.96.0.2, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: v6}
spec: {clusterIP: "fd00::1", clusterIPs: ["fd00::1"], ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: dual}
spec: {clusterIP: "fd00::2", clusterIPs: ["fd00::2", "10.96.0.3"], ports: [{port: 80}]}
"#,
        );
        assert!(s.invalid.is_empty(), "{:?}", s.invalid);
        let ignored: Vec<_> = s.ignored.iter().map(|(n, w)| (n.as_str(), *w)).collect();
        assert_eq!(
            ignored,
            [
                ("default/ext", Ignored::ExternalName),
                ("default/headless", Ignored::Headless),
                ("default/labelled-headless", Ignored::Headless),
                ("default/other", Ignored::OtherProxy),
                ("default/v6", Ignored::NoIpv4ClusterIp),
            ]
        );
        assert_eq!(s.desired.keys().copied().collect::<Vec<_>>(), [fe("10.96.0.3", 80, Protocol::Tcp)]);
    }

    #[test]
    fn invalid_objects_name_object_and_field_and_never_disturb_others() {
        let s = build(
            r#"
apiVersion: v1
kind: Service
metadata: {name: bad-ip}
spec: {clusterIP: 10.96.0.300, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: bad-port}
spec: {clusterIP: 10.96.0.2, ports: [{port: 70000}]}
---
apiVersion: v1
kind: Service
metadata: {name: bad-proto}
spec: {clusterIP: 10.96.0.3, ports: [{port: 80, protocol: TPC}]}
---
apiVersion: v1
kind: Service
metadata: {name: sctp}
spec: {clusterIP: 10.96.0.4, ports: [{name: a, port: 80, protocol: SCTP}, {name: b, port: 81}]}
---
apiVersion: v1
kind: Service
metadata: {name: good}
spec: {clusterIP: 10.96.0.5, ports: [{port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: no-label}
addressType: IPv4
endpoints: []
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: bad-ep, labels: {kubernetes.io/service-name: good}}
addressType: IPv4
ports: [{port: 80}]
endpoints: [{addresses: [10.244.0.1]}, {addresses: [nope]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: good-1, labels: {kubernetes.io/service-name: good}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.244.0.2]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: orphan, labels: {kubernetes.io/service-name: not-yet}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.244.0.3]}]
"#,
        );
        let errors: Vec<String> = s.invalid.iter().map(ToString::to_string).collect();
        assert_eq!(
            errors,
            [
                r#"EndpointSlice default/bad-ep: endpoints[1].addresses[0]: "nope" is not an IPv4 address"#,
                "EndpointSlice default/no-label: metadata.labels[kubernetes.io/service-name]: missing",
                r#"Service default/bad-ip: spec.clusterIP: "10.96.0.300" is not an IP address"#,
                "Service default/bad-port: spec.ports[0].port: 70000 is out of range 1-65535",
                r#"Service default/bad-proto: spec.ports[0].protocol: unknown protocol "TPC" (want TCP, UDP or SCTP)"#,
                "Service default/sctp: spec.ports[0].protocol: SCTP is not served by kproxy; port skipped",
            ]
        );
        let frontends: Vec<_> = s.desired.keys().copied().collect();
        assert_eq!(frontends, [fe("10.96.0.4", 81, Protocol::Tcp), fe("10.96.0.5", 80, Protocol::Tcp)]);
        assert_eq!(s.desired[&fe("10.96.0.5", 80, Protocol::Tcp)].backends, addrs(&["10.244.0.2:8080"]));
    }

    #[test]
    fn load_balancer_source_ranges_apply_to_load_balancer_ips_only_and_bad_ones_are_named() {
        let s = build(
            r#"
apiVersion: v1
kind: Service
metadata: {name: lb}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.7
  loadBalancerSourceRanges: ["192.168.7.9/16", "fd00::/8", " 10.0.0.0/8"]
  ports: [{port: 80, nodePort: 30007}]
status: {loadBalancer: {ingress: [{ip: 203.0.113.7}]}}
---
apiVersion: v1
kind: Service
metadata: {name: bad-range}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.8
  loadBalancerSourceRanges: ["10.0.0.0/33"]
  ports: [{port: 80, nodePort: 30008}]
"#,
        );
        let errors: Vec<String> = s.invalid.iter().map(ToString::to_string).collect();
        assert_eq!(
            errors,
            [r#"Service default/bad-range: spec.loadBalancerSourceRanges[0]: "10.0.0.0/33": bad prefix length"#]
        );
        let lb = &s.desired[&fe("203.0.113.7", 80, Protocol::Tcp)];
        let want: Vec<Cidr> = vec!["10.0.0.0/8".parse().unwrap(), "192.168.0.0/16".parse().unwrap()];
        assert_eq!(lb.source_ranges, want, "masked, sorted, IPv6 left to the other family");
        assert!(s.desired[&fe("10.96.0.7", 80, Protocol::Tcp)].source_ranges.is_empty(), "ClusterIP is not limited");
    }

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

    #[test]
    fn load_balancer_ingress_ips_with_ip_mode_proxy_are_not_frontends() {
        let s = build(
            r#"
apiVersion: v1
kind: Service
metadata: {name: lb}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.7
  ports: [{port: 80, nodePort: 30007}]
status:
  loadBalancer:
    ingress:
    - {ip: 203.0.113.1}
    - {ip: 203.0.113.2, ipMode: VIP}
    - {ip: 203.0.113.3, ipMode: Proxy}
    - {hostname: lb.example.com, ipMode: Proxy}
"#,
        );
        assert!(s.invalid.is_empty(), "{:?}", s.invalid);
        let frontends: Vec<String> = s.desired.keys().map(|f| f.address.to_string()).collect();
        // kube-proxy's IsVIPMode: no ipMode, or VIP. A Proxy-mode address belongs to the load
        // balancer, which must receive the traffic itself.
        assert_eq!(frontends, ["10.96.0.7", "203.0.113.1", "203.0.113.2"]);
    }

    #[test]
    fn session_affinity_defaults_to_three_hours_and_bad_values_are_named() {
        let s = build(
            r#"
apiVersion: v1
kind: Service
metadata: {name: sticky}
spec: {clusterIP: 10.96.0.11, sessionAffinity: ClientIP, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: short}
spec:
  clusterIP: 10.96.0.12
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: too-long}
spec:
  clusterIP: 10.96.0.13
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 86401}}
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: odd}
spec: {clusterIP: 10.96.0.14, sessionAffinity: Cookie, ports: [{port: 80}]}
"#,
        );
        let errors: Vec<String> = s.invalid.iter().map(ToString::to_string).collect();
        assert_eq!(
            errors,
            [
                r#"Service default/odd: spec.sessionAffinity: unknown session affinity "Cookie" (want None or ClientIP)"#,
                "Service default/too-long: spec.sessionAffinityConfig.clientIP.timeoutSeconds: 86401 is out of range 1-86400",
            ]
        );
        assert_eq!(s.desired[&fe("10.96.0.11", 80, Protocol::Tcp)].affinity_timeout, 10_800);
        assert_eq!(s.desired[&fe("10.96.0.12", 80, Protocol::Tcp)].affinity_timeout, 60);
    }

    #[test]
    fn duplicate_objects_and_frontend_conflicts_are_reported() {
        let svc = |name: &str, ip: &str| {
            format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{clusterIP: {ip}, ports: [{{port: 80}}]}}\n---\n")
        };
        let s = build(&(svc("a", "10.96.0.1") + &svc("a", "10.96.0.2") + &svc("b", "10.96.0.1")));
        let errors: Vec<String> = s.invalid.iter().map(ToString::to_string).collect();
        assert_eq!(
            errors,
            [
                "Service default/b: spec.ports[0]: frontend 10.96.0.1:80/TCP is already served for default/a",
                "Service default/a: metadata.name: duplicate object; the first one is used",
            ]
        );
        assert_eq!(s.desired.len(), 1);
    }
}
