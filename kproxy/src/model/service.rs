//! A Service's validation (kube-proxy's `serviceport.go`, and what its `ServiceChangeTracker`
//! keeps): [`ServiceInfo::from_service`] checks every field kproxy uses, in the order below, and
//! returns the first invalid one by name; Services kube-proxy leaves alone are [`Ignored`].

use std::{
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
};

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};

use super::{
    fields::{object_name, parse_port, parse_protocol, Object, ParsedProtocol},
    types::{FrontendKind, Ignored, InvalidCode, InvalidObject, ServicePortName},
};
use crate::node::Cidr;

/// `sessionAffinityConfig.clientIP.timeoutSeconds` when unset (3 hours, as the API's default).
pub const DEFAULT_AFFINITY_TIMEOUT_SECONDS: i32 = 10_800;
/// The largest timeout the API accepts (1 day).
pub const MAX_AFFINITY_TIMEOUT_SECONDS: i32 = 86_400;

/// Services with this label belong to another proxy (kube-proxy skips them too).
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// Services with this label are headless (kube-proxy skips them too).
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";

/// One served port of a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePortInfo {
    /// Shared with the [`DesiredService`](super::DesiredService) of each of its frontends.
    pub name: Arc<ServicePortName>,
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

impl ServiceInfo {
    /// Validates a Service. `Err` names the field; `Ignored` is a valid Service kproxy must not
    /// touch (ExternalName, headless, owned by another proxy, IPv6-only).
    pub fn from_service(svc: &Service) -> Result<ServiceOutcome, InvalidObject> {
        let (namespace, name) = object_name("Service", &svc.metadata)?;
        let object = Object::new("Service", &namespace, &name);
        let labels = svc.metadata.labels.as_ref();
        if labels.is_some_and(|l| l.contains_key(LABEL_SERVICE_PROXY_NAME)) {
            return Ok(ServiceOutcome::Ignored(Ignored::OtherProxy));
        }
        if labels.is_some_and(|l| l.contains_key(LABEL_HEADLESS)) {
            return Ok(ServiceOutcome::Ignored(Ignored::Headless));
        }
        let spec = svc.spec.as_ref().ok_or_else(|| object.invalid(InvalidCode::MissingField, "spec", "missing"))?;
        let svc_type = match spec.type_.as_deref().unwrap_or("ClusterIP") {
            "ClusterIP" => FrontendKind::ClusterIp,
            "NodePort" => FrontendKind::NodePort,
            "LoadBalancer" => FrontendKind::LoadBalancer,
            "ExternalName" => return Ok(ServiceOutcome::Ignored(Ignored::ExternalName)),
            other => return Err(object.invalid(InvalidCode::UnknownType, "spec.type", format!("unknown service type {other:?}"))),
        };
        let cluster_ip = match cluster_ipv4(spec, &object)? {
            Ok(ip) => ip,
            Err(why) => return Ok(ServiceOutcome::Ignored(why)),
        };
        let (ports, unsupported_ports) = service_ports(spec, svc_type, &namespace, &name, &object)?;
        let external_ips =
            ipv4s(spec.external_ips.as_deref().unwrap_or_default(), &|i| format!("spec.externalIPs[{i}]"), &object)?;
        let load_balancer_ips = if svc_type == FrontendKind::LoadBalancer {
            ipv4s(&vip_ingress_ips(svc), &|i| format!("status.loadBalancer.ingress[{i}].ip"), &object)?
        } else {
            Vec::new()
        };
        let external_policy_local =
            traffic_policy_local(spec.external_traffic_policy.as_deref(), "spec.externalTrafficPolicy", &object)?;
        let internal_policy_local =
            traffic_policy_local(spec.internal_traffic_policy.as_deref(), "spec.internalTrafficPolicy", &object)?;
        let affinity_timeout = session_affinity(spec, &object)?;
        let source_ranges = source_ranges(spec, &object)?;
        let health_check_node_port = match spec.health_check_node_port {
            Some(p) if external_policy_local => Some(
                parse_port(p).map_err(|r| object.invalid(InvalidCode::InvalidPort, "spec.healthCheckNodePort", r))?,
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

/// The IPv4 ClusterIP: `spec.clusterIPs[0]` equals `spec.clusterIP`, a second entry is the
/// other family. `Ok(Err(_))`: a headless or IPv6-only Service, which kproxy leaves alone.
fn cluster_ipv4(spec: &ServiceSpec, object: &Object) -> Result<Result<Ipv4Addr, Ignored>, InvalidObject> {
    let cluster_ip = match spec.cluster_ip.as_deref() {
        None | Some("") | Some("None") => return Ok(Err(Ignored::Headless)),
        Some(ip) => ip,
    };
    let mut ipv4 = None;
    let all_ips = spec.cluster_ips.clone().unwrap_or_else(|| vec![cluster_ip.to_string()]);
    for (i, ip) in all_ips.iter().enumerate() {
        let field = if spec.cluster_ips.is_some() { format!("spec.clusterIPs[{i}]") } else { "spec.clusterIP".to_string() };
        match ip.parse::<IpAddr>() {
            Ok(IpAddr::V4(v4)) => ipv4 = ipv4.or(Some(v4)),
            Ok(IpAddr::V6(_)) => {}
            Err(_) => return Err(object.invalid(InvalidCode::InvalidAddress, field, format!("{ip:?} is not an IP address"))),
        }
    }
    Ok(ipv4.ok_or(Ignored::NoIpv4ClusterIp))
}

/// `spec.ports`: the served ones, and the field paths of those skipped because kproxy does not
/// serve their protocol (SCTP). Names must be set when there are several ports, and neither a
/// name nor a (port, protocol) may repeat.
fn service_ports(
    spec: &ServiceSpec,
    svc_type: FrontendKind,
    namespace: &str,
    name: &str,
    object: &Object,
) -> Result<(Vec<ServicePortInfo>, Vec<String>), InvalidObject> {
    let mut ports: Vec<ServicePortInfo> = Vec::new();
    let mut unsupported_ports = Vec::new();
    let spec_ports = spec.ports.as_deref().unwrap_or_default();
    for (i, p) in spec_ports.iter().enumerate() {
        let port_name = p.name.clone().unwrap_or_default();
        if port_name.is_empty() && spec_ports.len() > 1 {
            return Err(object.invalid(
                InvalidCode::MissingField,
                format!("spec.ports[{i}].name"),
                "required when a service has more than one port",
            ));
        }
        let port = parse_port(p.port).map_err(|r| object.invalid(InvalidCode::InvalidPort, format!("spec.ports[{i}].port"), r))?;
        let protocol = match parse_protocol(p.protocol.as_deref())
            .map_err(|r| object.invalid(InvalidCode::UnknownProtocol, format!("spec.ports[{i}].protocol"), r))?
        {
            ParsedProtocol::Served(protocol) => protocol,
            ParsedProtocol::Sctp => {
                unsupported_ports.push(format!("spec.ports[{i}]"));
                continue;
            }
        };
        let name = ServicePortName { namespace: namespace.to_string(), name: name.to_string(), port_name, protocol };
        if ports.iter().any(|q| *q.name == name || (q.port == port && q.name.protocol == protocol)) {
            return Err(object.invalid(InvalidCode::DuplicatePort, format!("spec.ports[{i}]"), "duplicate port"));
        }
        let node_port = node_port(p, i, svc_type, object)?;
        ports.push(ServicePortInfo { name: Arc::new(name), port, node_port });
    }
    Ok((ports, unsupported_ports))
}

/// `spec.ports[i].nodePort`, which only NodePort and LoadBalancer Services have.
fn node_port(p: &ServicePort, i: usize, svc_type: FrontendKind, object: &Object) -> Result<Option<u16>, InvalidObject> {
    match (svc_type, p.node_port) {
        (FrontendKind::NodePort | FrontendKind::LoadBalancer, Some(np)) => Ok(Some(
            parse_port(np).map_err(|r| object.invalid(InvalidCode::InvalidPort, format!("spec.ports[{i}].nodePort"), r))?,
        )),
        _ => Ok(None),
    }
}

/// The IPv4 addresses of a list whose `i`th entry is at `field(i)`; IPv6 entries belong to the
/// other family, which kproxy does not serve yet.
fn ipv4s(list: &[String], field: &dyn Fn(usize) -> String, object: &Object) -> Result<Vec<Ipv4Addr>, InvalidObject> {
    let mut out = Vec::new();
    for (i, ip) in list.iter().enumerate() {
        match ip.parse::<IpAddr>() {
            Ok(IpAddr::V4(v4)) => out.push(v4),
            Ok(IpAddr::V6(_)) => {}
            Err(_) => return Err(object.invalid(InvalidCode::InvalidAddress, field(i), format!("{ip:?} is not an IP address"))),
        }
    }
    Ok(out)
}

/// `status.loadBalancer.ingress[].ip` of the entries that are frontends: kube-proxy's
/// `IsVIPMode`, an ingress IP with `ipMode: Proxy` (or any mode but `VIP`) is not one: traffic to
/// it must reach the load balancer, which proxies it to the node ports itself.
fn vip_ingress_ips(svc: &Service) -> Vec<String> {
    svc.status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter(|ing| ing.ip_mode.as_deref().is_none_or(|mode| mode == "VIP"))
        .filter_map(|ing| ing.ip.clone())
        .collect()
}

/// A traffic policy field: whether it is `Local` (unset means `Cluster`).
fn traffic_policy_local(value: Option<&str>, field: &str, object: &Object) -> Result<bool, InvalidObject> {
    match value {
        None | Some("Cluster") => Ok(false),
        Some("Local") => Ok(true),
        Some(other) => Err(object.invalid(
            InvalidCode::UnknownType,
            field,
            format!("unknown traffic policy {other:?} (want Cluster or Local)"),
        )),
    }
}

/// `sessionAffinity: ClientIP`: its timeout (default [`DEFAULT_AFFINITY_TIMEOUT_SECONDS`]);
/// `None` without session affinity.
fn session_affinity(spec: &ServiceSpec, object: &Object) -> Result<Option<u32>, InvalidObject> {
    match spec.session_affinity.as_deref() {
        None | Some("None") => Ok(None),
        Some("ClientIP") => {
            let timeout = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .unwrap_or(DEFAULT_AFFINITY_TIMEOUT_SECONDS);
            if !(1..=MAX_AFFINITY_TIMEOUT_SECONDS).contains(&timeout) {
                return Err(object.invalid(
                    InvalidCode::InvalidValue,
                    "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                    format!("{timeout} is out of range 1-{MAX_AFFINITY_TIMEOUT_SECONDS}"),
                ));
            }
            Ok(Some(timeout as u32))
        }
        Some(other) => Err(object.invalid(
            InvalidCode::UnknownType,
            "spec.sessionAffinity",
            format!("unknown session affinity {other:?} (want None or ClientIP)"),
        )),
    }
}

/// `spec.loadBalancerSourceRanges`: the IPv4 ones, host bits cleared, sorted, de-duplicated.
fn source_ranges(spec: &ServiceSpec, object: &Object) -> Result<Vec<Cidr>, InvalidObject> {
    let mut source_ranges = Vec::new();
    for (i, range) in spec.load_balancer_source_ranges.iter().flatten().enumerate() {
        let range = range.trim();
        if range.contains(':') {
            continue; // IPv6: the other family
        }
        let cidr: Cidr = range.parse().map_err(|reason: String| {
            object.invalid(InvalidCode::InvalidAddress, format!("spec.loadBalancerSourceRanges[{i}]"), reason)
        })?;
        source_ranges.push(cidr.masked());
    }
    source_ranges.sort();
    source_ranges.dedup();
    Ok(source_ranges)
}

#[cfg(test)]
mod tests {
    use super::super::{
        test_support::{addrs, build, fe},
        Cidr, Ignored, Protocol,
    };

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
}
