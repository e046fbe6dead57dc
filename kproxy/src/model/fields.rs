//! Field parsing that Services and EndpointSlices share: names, ports, protocols, and the error
//! that names the object and the field.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::types::{InvalidCode, InvalidObject, Protocol};

/// The object an error is about: its kind and `namespace/name`.
pub(super) struct Object {
    pub kind: &'static str,
    pub object: String,
}

impl Object {
    pub fn new(kind: &'static str, namespace: &str, name: &str) -> Self {
        Object { kind, object: format!("{namespace}/{name}") }
    }

    /// The error of one field of this object.
    pub fn invalid(&self, code: InvalidCode, field: impl Into<String>, reason: impl Into<String>) -> InvalidObject {
        InvalidObject { kind: self.kind, object: self.object.clone(), field: field.into(), reason: reason.into(), code }
    }
}

/// What a Kubernetes `protocol` field holds.
pub(super) enum ParsedProtocol {
    Served(Protocol),
    /// Valid in Kubernetes but not served by kproxy yet.
    Sctp,
}

/// A `protocol` field (unset means TCP).
pub(super) fn parse_protocol(value: Option<&str>) -> Result<ParsedProtocol, String> {
    match value.unwrap_or("TCP") {
        "TCP" => Ok(ParsedProtocol::Served(Protocol::Tcp)),
        "UDP" => Ok(ParsedProtocol::Served(Protocol::Udp)),
        "SCTP" => Ok(ParsedProtocol::Sctp),
        other => Err(format!("unknown protocol {other:?} (want TCP, UDP or SCTP)")),
    }
}

/// `(namespace, name)` of an object (an unset namespace is `default`); a missing name is an error.
pub(super) fn object_name(kind: &'static str, meta: &ObjectMeta) -> Result<(String, String), InvalidObject> {
    let namespace = meta.namespace.clone().unwrap_or_else(|| "default".to_string());
    match meta.name.as_deref() {
        Some(name) if !name.is_empty() => Ok((namespace, name.to_string())),
        _ => Err(Object::new(kind, &namespace, "<unnamed>").invalid(InvalidCode::MissingField, "metadata.name", "missing")),
    }
}

/// A port number, 1-65535.
pub(super) fn parse_port(value: i32) -> Result<u16, String> {
    u16::try_from(value)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{value} is out of range 1-65535"))
}
