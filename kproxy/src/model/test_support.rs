//! What the model's tests share: objects fed through a fresh [`ModelStore`], and short
//! constructors.

use std::net::SocketAddrV4;

use super::{DesiredState, Frontend, Ignored, InvalidObject, Protocol};
use crate::tracker::ModelStore;

/// The outcome of feeding the objects into a fresh store.
pub(crate) struct Built {
    pub desired: DesiredState,
    pub invalid: Vec<InvalidObject>,
    pub ignored: Vec<(String, Ignored)>,
}

pub(crate) fn build(yaml: &str) -> Built {
    build_on(yaml, None, None)
}

/// As [`build`], on a node with this name and zone.
pub(crate) fn build_on(yaml: &str, node: Option<&str>, zone: Option<&str>) -> Built {
    let (services, slices) = crate::sources::manifests::parse_objects(yaml);
    let mut store = ModelStore::default();
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

pub(crate) fn fe(addr: &str, port: u16, protocol: Protocol) -> Frontend {
    Frontend { address: addr.parse().unwrap(), port, protocol }
}

pub(crate) fn addrs(list: &[&str]) -> Vec<SocketAddrV4> {
    list.iter().map(|a| a.parse().unwrap()).collect()
}
