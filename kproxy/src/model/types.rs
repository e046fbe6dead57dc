//! What the parts of the model share: protocols, the kind of a frontend, frontends and service
//! port names, and the errors of invalid objects.

use std::{fmt, net::Ipv4Addr};

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

/// The kind of a frontend, the one type for it in the agent: the model builds frontends of each
/// kind, the plan writes its `SVC_FLAG_*` bit and its `SVC_TYPE_*` metadata code, and `dump`
/// prints its name. A ClusterIP frontend is `ClusterIp` whatever the Service's type, and
/// `ExternalIp` is a kind of frontend only; a Service's own `spec.type` is one of the other
/// three ([`ServiceInfo::svc_type`](super::ServiceInfo::svc_type)).
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_frontend_kind_has_its_own_flag_code_and_dump_name() {
        // The names are a contract with tools (`kproxy dump --json`'s `type`).
        let names: Vec<&str> = FrontendKind::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(names, ["ClusterIP", "NodePort", "ExternalIP", "LoadBalancer"]);
        for kind in FrontendKind::ALL {
            assert_eq!(FrontendKind::from_meta_code(kind.meta_code()), Some(kind));
            assert_eq!(kind.flag().count_ones(), 1, "{kind}");
            assert_eq!(FrontendKind::all_flags() & kind.flag(), kind.flag());
        }
        assert_eq!(FrontendKind::all_flags().count_ones(), 4, "four distinct bits");
        assert_eq!(FrontendKind::from_meta_code(0), None);
    }
}
