//! The dataplane: what the maps hold, how a change to them is planned, and who writes it.
//!
//! [`MapContents`] is the content of the load-balancing maps as plain data, in the exact types
//! the kernel reads. [`plan::plan`] turns (current contents, desired state) into an ordered
//! list of [`Op`]s; a [`Dataplane`] applies them. The BPF implementation ([`bpf::BpfMaps`]) is
//! the only code that touches kernel maps; [`MapContents`] itself is the in-memory dataplane,
//! and [`MapContents::resolve`] answers "where would this connection go?" with the same
//! selection code as the kernel.

pub mod bpf;
pub mod plan;

use std::{
    collections::{BTreeSet, HashMap},
    net::{Ipv4Addr, SocketAddrV4},
};

use kproxy_common::lb::{
    Backend, MemberKey, MemberValue, ServiceKey, ServiceMeta, ServiceValue, NAME_LEN, SCOPE_EXTERNAL, SCOPE_INTERNAL,
    SVC_FLAG_AFFINITY, SVC_FLAG_DROP_UNSERVED, SVC_FLAG_TWO_SCOPES,
};

use crate::model::{Cidr, Frontend, FrontendKind, Protocol, ServicePortName};

/// One write to the maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    PutBackend(u32, Backend),
    DeleteBackend(u32),
    PutService(ServiceKey, ServiceValue),
    DeleteService(ServiceKey),
    /// Boxed: the metadata is 200 bytes, every other operation under 32, and a first sync
    /// plans hundreds of thousands of operations.
    PutMeta(u32, Box<ServiceMeta>),
    DeleteMeta(u32),
    /// Allows clients from a range to the frontends of a service id.
    PutSourceRange(u32, Cidr),
    DeleteSourceRange(u32, Cidr),
    /// Records which slot of a service holds a backend (the membership map).
    PutMember(MemberKey, MemberValue),
    DeleteMember(MemberKey),
}

// A first sync at 10,000 services plans about half a million operations: keep them small.
const _: () = assert!(std::mem::size_of::<Op>() <= 32);

/// The content of the load-balancing maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapContents {
    pub services: HashMap<ServiceKey, ServiceValue>,
    pub backends: HashMap<u32, Backend>,
    pub meta: HashMap<u32, ServiceMeta>,
    /// Allowed client ranges by service id (the source ranges map).
    pub source_ranges: HashMap<u32, BTreeSet<Cidr>>,
    /// (service, backend) → the slot that holds the backend (the membership map).
    pub members: HashMap<MemberKey, MemberValue>,
}

/// Errors of a dataplane write or read, naming the map and the operation. The cause is the
/// error's `source()`, not part of its message: print it with `anyhow`'s `{:#}` (as the agent
/// does), which shows each cause once.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("{map}: {operation}")]
    Map {
        map: &'static str,
        operation: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    /// A batched write (`crate::sys::map_update_batch`) failed.
    #[error("{map}: {operation}")]
    Sys {
        map: &'static str,
        operation: &'static str,
        #[source]
        source: crate::sys::SysError,
    },
    /// `CLOCK_MONOTONIC`, the clock of conntrack and affinity entries, could not be read.
    #[error("read CLOCK_MONOTONIC")]
    Clock(#[source] nix::errno::Errno),
    #[error("open pinned map {path}")]
    Open {
        path: String,
        #[source]
        source: aya::maps::MapError,
    },
}

/// Something that holds load-balancing maps.
pub trait Dataplane {
    /// Reads the whole content of the maps.
    fn read(&self) -> Result<MapContents, DataplaneError>;
    /// Applies one write. Deleting an entry that is already gone is not an error.
    fn apply(&mut self, op: &Op) -> Result<(), DataplaneError>;
    /// Applies `ops` in order. On error, some of them may have been applied.
    fn apply_all(&mut self, ops: &[Op]) -> Result<(), DataplaneError> {
        ops.iter().try_for_each(|op| self.apply(op))
    }
}

impl Dataplane for MapContents {
    fn read(&self) -> Result<MapContents, DataplaneError> {
        Ok(self.clone())
    }

    fn apply(&mut self, op: &Op) -> Result<(), DataplaneError> {
        match op {
            Op::PutBackend(id, b) => {
                self.backends.insert(*id, *b);
            }
            Op::DeleteBackend(id) => {
                self.backends.remove(id);
            }
            Op::PutService(k, v) => {
                self.services.insert(*k, *v);
            }
            Op::DeleteService(k) => {
                self.services.remove(k);
            }
            Op::PutMeta(id, m) => {
                self.meta.insert(*id, **m);
            }
            Op::DeleteMeta(id) => {
                self.meta.remove(id);
            }
            Op::PutSourceRange(id, range) => {
                self.source_ranges.entry(*id).or_default().insert(*range);
            }
            Op::DeleteSourceRange(id, range) => {
                if let Some(set) = self.source_ranges.get_mut(id) {
                    set.remove(range);
                    if set.is_empty() {
                        self.source_ranges.remove(id);
                    }
                }
            }
            Op::PutMember(k, v) => {
                self.members.insert(*k, *v);
            }
            Op::DeleteMember(k) => {
                self.members.remove(k);
            }
        }
        Ok(())
    }
}

/// Where a new connection to a frontend goes (tests trace connections with it).
#[cfg(test)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolution {
    NotAService,
    Refused,
    Backend(SocketAddrV4),
}

/// Where a client is, as the kernel's `lb::Origin`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The node's processes and its pods (the socket path).
    InCluster,
    /// Outside the node (the tc path).
    Outside,
}

impl MapContents {
    /// Resolves a new connection from outside the node (the tc path), as
    /// [`MapContents::resolve_from`] does.
    #[cfg(test)]
    pub fn resolve(&self, frontend: Frontend, random: u32) -> Resolution {
        self.resolve_from(Origin::Outside, frontend, random)
    }

    /// Resolves a new connection from `origin` exactly as the kernel's `lb::lookup` does, with
    /// `random` in place of `bpf_get_prandom_u32()`.
    #[cfg(test)]
    pub fn resolve_from(&self, origin: Origin, frontend: Frontend, random: u32) -> Resolution {
        let mut key = service_key(frontend, 0);
        let Some(mut front) = self.services.get(&key) else { return Resolution::NotAService };
        if origin == Origin::InCluster && front.flags & SVC_FLAG_TWO_SCOPES != 0 {
            if let Some(internal) = self.services.get(&ServiceKey { scope: SCOPE_INTERNAL, ..key }) {
                key.scope = SCOPE_INTERNAL;
                front = internal;
            }
        }
        if front.count == 0 {
            return Resolution::Refused;
        }
        key.slot = kproxy_common::select_slot(random, front.count);
        let backend = self.services.get(&key).and_then(|slot| self.backends.get(&slot.backend_id));
        match backend {
            Some(b) => Resolution::Backend(backend_addr(b)),
            None => Resolution::Refused,
        }
    }

    /// Where the next packet of a flow goes that remembers `(slot, backend id)` (a tracked UDP
    /// flow, a socket's UDP affinity, a session affinity), as the kernel's `lb::lookup` and
    /// `conntrack::stale` decide: its backend if still in the service (in its slot, or where
    /// the membership map says it moved), else a slot chosen with `random`. Returns the
    /// (slot, backend id) the flow remembers next, `None` if the frontend has no backend.
    #[cfg(test)]
    pub fn resolve_flow(&self, frontend: Frontend, remembered: Option<(u16, u32)>, random: u32) -> Option<(u16, u32)> {
        let key0 = service_key(frontend, 0);
        let front = self.services.get(&key0)?;
        if front.count == 0 {
            return None;
        }
        if let Some((slot, backend_id)) = remembered {
            let holds = |slot: u16| {
                (1..=front.count).contains(&slot)
                    && self.services.get(&ServiceKey { slot, ..key0 }).is_some_and(|v| v.backend_id == backend_id)
            };
            if holds(slot) {
                return Some((slot, backend_id));
            }
            let member = MemberKey { service_id: front.service_id, backend_id, scope: key0.scope, _pad: [0; 3] };
            if let Some(m) = self.members.get(&member).filter(|m| holds(m.slot)) {
                return Some((m.slot, backend_id));
            }
        }
        let slot = kproxy_common::select_slot(random, front.count);
        self.services.get(&ServiceKey { slot, ..key0 }).map(|v| (slot, v.backend_id))
    }

    /// Every frontend (slot 0) with its backends in slot order, for display.
    pub fn frontends(&self) -> Vec<ProgrammedService> {
        let mut out: Vec<ProgrammedService> = self
            .services
            .iter()
            .filter(|(k, _)| k.slot == 0 && k.scope == SCOPE_EXTERNAL)
            .map(|(k, v)| {
                let backends = self.slot_backends(k, v);
                let internal_key = ServiceKey { scope: SCOPE_INTERNAL, ..*k };
                let internal_backends = (v.flags & SVC_FLAG_TWO_SCOPES != 0)
                    .then(|| self.services.get(&internal_key).map(|i| self.slot_backends(&internal_key, i)))
                    .flatten();
                let meta = self.meta.get(&v.service_id);
                ProgrammedService {
                    frontend: frontend_of(k),
                    service_id: v.service_id,
                    name: meta.map(meta_names),
                    frontend_type: meta.and_then(|m| FrontendKind::from_meta_code(m.svc_type)),
                    backends,
                    internal_backends,
                    drop_unserved: v.flags & SVC_FLAG_DROP_UNSERVED != 0,
                    affinity_timeout: if v.flags & SVC_FLAG_AFFINITY != 0 { v.backend_id } else { 0 },
                    source_ranges: self.source_ranges.get(&v.service_id).into_iter().flatten().copied().collect(),
                }
            })
            .collect();
        out.sort_by(|a, b| (&a.name, a.frontend).cmp(&(&b.name, b.frontend)));
        out
    }

    /// The backends in slots `1..=count` of the frontend entry `key0` (`front`), in slot order.
    fn slot_backends(&self, key0: &ServiceKey, front: &ServiceValue) -> Vec<SocketAddrV4> {
        self.slots(key0, front).into_iter().filter_map(|(_, _, b)| b).collect()
    }

    /// (slot, backend id, backend address if the backends map has it) for every slot
    /// `1..=count` of the frontend entry `key0` (`front`) that exists, in slot order.
    pub fn slots(&self, key0: &ServiceKey, front: &ServiceValue) -> Vec<(u16, u32, Option<SocketAddrV4>)> {
        (1..=front.count)
            .filter_map(|slot| self.services.get(&ServiceKey { slot, ..*key0 }).map(|s| (slot, s)))
            .map(|(slot, s)| (slot, s.backend_id, self.backends.get(&s.backend_id).map(backend_addr)))
            .collect()
    }
}

/// A programmed frontend as read back from the maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgrammedService {
    pub frontend: Frontend,
    pub service_id: u32,
    /// (namespace, name, port name) from the metadata map, if present.
    pub name: Option<(String, String, String)>,
    /// The kind the metadata names; `None` without metadata or with a code the agent never
    /// writes (`dump` prints `Unknown`).
    pub frontend_type: Option<FrontendKind>,
    pub backends: Vec<SocketAddrV4>,
    /// With two scopes ([`SVC_FLAG_TWO_SCOPES`]): the backends of clients in the cluster (the
    /// socket path), in slot order; `backends` are then those of clients from outside.
    pub internal_backends: Option<Vec<SocketAddrV4>>,
    /// No backend because none is local (`externalTrafficPolicy: Local`): new flows dropped.
    pub drop_unserved: bool,
    /// Allowed client ranges (load-balancer IPs with `loadBalancerSourceRanges`).
    pub source_ranges: Vec<Cidr>,
    /// `sessionAffinity: ClientIP` timeout in seconds; 0 without.
    pub affinity_timeout: u32,
}

/// The key of `frontend`'s `slot` in scope 0 ([`SCOPE_EXTERNAL`]).
pub fn service_key(frontend: Frontend, slot: u16) -> ServiceKey {
    ServiceKey {
        address: frontend.address.octets(),
        port: frontend.port.to_be_bytes(),
        slot,
        protocol: frontend.protocol.ip_proto(),
        scope: SCOPE_EXTERNAL,
        _pad: [0; 2],
    }
}

/// The frontend of a key; an unknown protocol number reads as TCP (the agent never writes one).
pub fn frontend_of(key: &ServiceKey) -> Frontend {
    Frontend {
        address: Ipv4Addr::from(key.address),
        port: u16::from_be_bytes(key.port),
        protocol: Protocol::from_ip_proto(key.protocol).unwrap_or(Protocol::Tcp),
    }
}

pub fn backend_value(addr: SocketAddrV4, protocol: Protocol) -> Backend {
    Backend { address: addr.ip().octets(), port: addr.port().to_be_bytes(), protocol: protocol.ip_proto(), flags: 0 }
}

pub fn backend_addr(b: &Backend) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(b.address), u16::from_be_bytes(b.port))
}

fn name_field(s: &str) -> [u8; NAME_LEN] {
    let mut out = [0u8; NAME_LEN];
    // Kubernetes names are at most 63 bytes; anything longer is cut, keeping a NUL at the end.
    let n = s.len().min(NAME_LEN - 1);
    out[..n].copy_from_slice(&s.as_bytes()[..n]);
    out
}

fn name_str(field: &[u8; NAME_LEN]) -> String {
    let end = field.iter().position(|b| *b == 0).unwrap_or(NAME_LEN);
    String::from_utf8_lossy(&field[..end]).into_owned()
}

pub fn service_meta(frontend: Frontend, name: &ServicePortName, frontend_type: FrontendKind) -> ServiceMeta {
    ServiceMeta {
        address: frontend.address.octets(),
        port: frontend.port.to_be_bytes(),
        protocol: frontend.protocol.ip_proto(),
        svc_type: frontend_type.meta_code(),
        namespace: name_field(&name.namespace),
        name: name_field(&name.name),
        port_name: name_field(&name.port_name),
    }
}

pub fn meta_names(m: &ServiceMeta) -> (String, String, String) {
    (name_str(&m.namespace), name_str(&m.name), name_str(&m.port_name))
}
