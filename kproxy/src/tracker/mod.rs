//! Change tracking, after kube-proxy's `ServiceChangeTracker` and `EndpointsChangeTracker`.
//!
//! The proxier applies every update the sources send to its [`ModelStore`]: the store
//! validates the object once, keeps the last valid version, drops updates that change nothing
//! kproxy serves, and records which Services changed. A sync then calls [`ModelStore::take_changes`], which recomputes the
//! desired frontends of those Services only and returns the frontends that differ, so a sync
//! costs O(changes), not O(services).
//!
//! - `store`: the last valid version of every object, the invalid and ignored ones, and the
//!   slices of each Service;
//! - `node`: this node (addresses, name, zone), whose changes rebuild the Services they touch;
//! - `changes`: what changed since the last sync ([`Changes`], [`ModelStore::take_changes`]);
//! - `desired`: the desired state, one entry per frontend, from its owner among the Services
//!   that claim it (`claims`: two Services may name one frontend);
//! - `unserved`: the service ports a `Local` policy leaves without an endpoint here
//!   ([`ModelStore::no_local_endpoints`]), and `health_checks`: what each `healthCheckNodePort`
//!   answers ([`ModelStore::health_checks`]).

mod changes;
mod claims;
mod desired;
mod health_checks;
mod node;
mod store;
mod unserved;

#[cfg(test)]
mod test_support;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    time::SystemTime,
};

pub use changes::{Changes, TRIGGER_TIME_ANNOTATION};
pub use store::ObjectKey;

use crate::model::{DesiredState, Ignored, InvalidObject, ServiceInfo, SliceInfo};

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
    /// Second copies of an object in the last complete set (`replace_all`).
    duplicates: Vec<InvalidObject>,

    desired: DesiredState,
    /// Which Services claim which frontends, and the conflicts among them.
    claims: claims::Claims,
    /// Frontends a `Local` traffic policy leaves without an endpoint on this node.
    unserved: unserved::Unserved,

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
