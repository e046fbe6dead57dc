//! Load-balancing maps: services (frontends and their backend slots), backends, and service
//! metadata.
//!
//! A service port with `n` backends occupies `n + 1` entries of [`SERVICES_MAP`], all with the
//! same frontend address, port and protocol:
//!
//! ```text
//! slot 0      → ServiceValue { backend_id: t,  count: n, flags, service_id }   the frontend
//!               (t: session affinity timeout, 0 without affinity)
//! slot 1..=n  → ServiceValue { backend_id: b,  count: 0, flags: 0, service_id } one per backend
//! ```
//!
//! A reader looks up slot 0, picks a slot with [`crate::select_slot`], looks that slot up, then
//! the backend by id: three O(1) hash lookups, whatever the number of services (a fourth, on
//! the socket path, for a frontend with [`SVC_FLAG_TWO_SCOPES`]: see [`SCOPE_INTERNAL`]). Writers keep
//! every intermediate state valid: backends are written before the slots that name them, slots
//! before the frontend count that makes them reachable, a frontend's scope-1 entries before
//! the scope-0 flag that makes them reachable, and deletion runs in reverse.
//!
//! Slots are dense: when a backend leaves, the agent moves the last slot's backend into its
//! slot. A flow that remembers its backend and slot (tc conntrack, per-socket UDP affinity,
//! session affinity) therefore finds another backend in its slot although its own stayed;
//! [`MEMBERS_MAP`] says where that backend is now, so that only the flows of the backend that
//! left are balanced afresh.

use bytemuck::{Pod, Zeroable};

use crate::user_pod;

/// Pinned name of the services map (`bpftool map dump name KP_SERVICES`).
pub const SERVICES_MAP: &str = "KP_SERVICES";
/// Pinned name of the backends map.
pub const BACKENDS_MAP: &str = "KP_BACKENDS";
/// Pinned name of the service metadata map (reverse NAT and names, keyed by service id).
pub const SERVICE_META_MAP: &str = "KP_SVC_META";

/// Default number of service ports (frontends) the maps hold.
pub const DEFAULT_MAX_SERVICES: u32 = 16_384;
/// Default number of distinct backends (address, port, protocol) the maps hold.
pub const DEFAULT_MAX_BACKENDS: u32 = 131_072;

/// Capacity of [`SERVICES_MAP`] for the given limits: one frontend entry per service port plus
/// one slot per (service port, backend) pair, which is bounded by `max_backends` per service
/// in the worst case but is `max_services + max_backends` when backends are not shared. A
/// frontend with [`SVC_FLAG_TWO_SCOPES`] takes one more frontend entry and one more slot per
/// cluster-wide backend from the same capacity.
pub const fn services_map_capacity(max_services: u32, max_backends: u32) -> u32 {
    max_services.saturating_add(max_backends)
}

/// [`ServiceKey::scope`] of every frontend's entries: what the tc path (clients from outside
/// the node) and, for a frontend without [`SVC_FLAG_TWO_SCOPES`], the socket path use.
pub const SCOPE_EXTERNAL: u8 = 0;
/// [`ServiceKey::scope`] of the entries the socket path (clients in the cluster: the node's
/// processes and its pods) uses instead for a frontend with [`SVC_FLAG_TWO_SCOPES`]: the
/// cluster-wide endpoints of an external frontend with `externalTrafficPolicy: Local`, which
/// kube-proxy "short-circuits" in-cluster clients to. A frontend entry and `1..=count` slots,
/// as in scope 0, with the same `service_id` (so affinity and reverse translation are per
/// service port whatever the scope); its `flags` have the frontend kind and
/// [`SVC_FLAG_AFFINITY`] only.
pub const SCOPE_INTERNAL: u8 = 1;

/// Key of [`SERVICES_MAP`]. 12 bytes, no holes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct ServiceKey {
    /// Frontend IPv4 address (the ClusterIP), network order.
    pub address: [u8; 4],
    /// Frontend port, network order.
    pub port: [u8; 2],
    /// 0 for the frontend entry, `1..=count` for backend slots. Host order.
    pub slot: u16,
    /// IP protocol: [`crate::PROTO_TCP`] or [`crate::PROTO_UDP`].
    pub protocol: u8,
    /// Lookup scope: [`SCOPE_EXTERNAL`] for every frontend; [`SCOPE_INTERNAL`] for the
    /// second set of entries of a frontend whose slot 0 has [`SVC_FLAG_TWO_SCOPES`].
    pub scope: u8,
    /// Explicit padding, always zero.
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 12);
const _: () = assert!(core::mem::offset_of!(ServiceKey, slot) == 6);
const _: () = assert!(core::mem::offset_of!(ServiceKey, protocol) == 8);

/// Value of [`SERVICES_MAP`]. 12 bytes, no holes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct ServiceValue {
    /// Slot > 0: id of the backend in [`BACKENDS_MAP`]. Slot 0: the session affinity timeout
    /// in seconds when `flags` has [`SVC_FLAG_AFFINITY`], else 0 (as Cilium's
    /// `backend_id`/`affinity_timeout` union).
    pub backend_id: u32,
    /// Slot 0: number of backend slots (0 means "no ready endpoint": refuse). Slot > 0: 0.
    pub count: u16,
    /// Slot 0: `SVC_FLAG_*` bits. Slot > 0: 0.
    pub flags: u16,
    /// Id of the service port, the key of [`SERVICE_META_MAP`]. Same in every slot.
    pub service_id: u32,
}
const _: () = assert!(core::mem::size_of::<ServiceValue>() == 12);
const _: () = assert!(core::mem::offset_of!(ServiceValue, service_id) == 8);

/// [`ServiceValue::flags`]: the frontend is a ClusterIP.
pub const SVC_FLAG_CLUSTER_IP: u16 = 1 << 0;
/// [`ServiceValue::flags`]: the frontend is a node address at a NodePort.
pub const SVC_FLAG_NODE_PORT: u16 = 1 << 1;
/// [`ServiceValue::flags`]: the frontend is one of `spec.externalIPs`.
pub const SVC_FLAG_EXTERNAL_IP: u16 = 1 << 2;
/// [`ServiceValue::flags`]: the frontend is a load-balancer ingress IP.
pub const SVC_FLAG_LOAD_BALANCER: u16 = 1 << 3;
/// [`ServiceValue::flags`]: `count` is 0 although the Service has ready endpoints, because the
/// frontend may only use endpoints on this node (`externalTrafficPolicy: Local`) and none is
/// here. New flows are dropped, not refused, as kube-proxy does, so that clients and load
/// balancers retry elsewhere.
pub const SVC_FLAG_DROP_UNSERVED: u16 = 1 << 4;
/// [`ServiceValue::flags`]: only clients within the frontend's entries of
/// [`SOURCE_RANGES_MAP`] may open flows (`spec.loadBalancerSourceRanges`); others are dropped.
pub const SVC_FLAG_SOURCE_RANGES: u16 = 1 << 5;
/// [`ServiceValue::flags`]: `sessionAffinity: ClientIP`; slot 0's `backend_id` is the timeout
/// in seconds, and a client's backend is kept in [`AFFINITY_MAP`].
pub const SVC_FLAG_AFFINITY: u16 = 1 << 6;
/// [`ServiceValue::flags`]: clients in the cluster (the socket path) use this frontend's
/// [`SCOPE_INTERNAL`] entries, which are written before this flag and deleted after it is
/// cleared; clients from outside (the tc path) use these scope-0 entries. Set on external
/// frontends of `externalTrafficPolicy: Local` Services whose local endpoints differ from the
/// cluster's. Without the flag, the socket path makes no second lookup.
pub const SVC_FLAG_TWO_SCOPES: u16 = 1 << 7;

/// Pinned name of the session affinity map (LRU): [`AffinityKey`] → [`AffinityValue`].
pub const AFFINITY_MAP: &str = "KP_AFFINITY";

/// Default capacity of [`AFFINITY_MAP`]: (client, frontend) pairs.
pub const DEFAULT_MAX_AFFINITY_ENTRIES: u32 = 65_536;

/// [`AffinityKey::kind`]: `client` is a network namespace cookie (the socket path: a pod, or
/// the node's own processes, as the source address would tell kube-proxy).
pub const AFFINITY_NETNS: u8 = 0;
/// [`AffinityKey::kind`]: `client` is an IPv4 address, network order, in its first 4 bytes
/// (the tc path).
pub const AFFINITY_ADDRESS: u8 = 1;

/// Key of [`AFFINITY_MAP`]. 16 bytes, no holes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct AffinityKey {
    /// The client: see [`AffinityKey::kind`].
    pub client: [u8; 8],
    /// Service id of the frontend.
    pub service_id: u32,
    /// [`AFFINITY_NETNS`] or [`AFFINITY_ADDRESS`].
    pub kind: u8,
    /// Explicit padding, always zero.
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<AffinityKey>() == 16);

/// Value of [`AFFINITY_MAP`]. 16 bytes, no holes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct AffinityValue {
    /// `bpf_ktime_get_ns()` of the client's last new connection to the frontend; the
    /// affinity holds until this plus the timeout (kube-proxy's `recent --rcheck --seconds`).
    pub last_used_ns: u64,
    /// The backend chosen, as in [`ServiceValue::backend_id`].
    pub backend_id: u32,
    /// Its slot: the affinity ends at once when the slot no longer holds this backend.
    pub slot: u16,
    /// Explicit padding, always zero.
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<AffinityValue>() == 16);

/// Pinned name of the source ranges map: an LPM trie keyed by `(prefix length, `
/// [`SourceRangeKey`]`)`, value `u8` (unused, always 1).
pub const SOURCE_RANGES_MAP: &str = "KP_SRC_RANGES";

/// Default capacity of [`SOURCE_RANGES_MAP`]: (service port, range) pairs.
pub const DEFAULT_MAX_SOURCE_RANGES: u32 = 16_384;

/// Data part of a [`SOURCE_RANGES_MAP`] key. The LPM prefix length that goes with it is
/// `32 + range prefix length`: the service id always matches in full, then the address's
/// leading bits. 8 bytes, no holes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct SourceRangeKey {
    /// Service id of the frontend, big-endian so that its bytes come first in prefix order.
    pub service_id: [u8; 4],
    /// Client IPv4 address (lookups) or range address (entries), network order.
    pub address: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<SourceRangeKey>() == 8);

/// Prefix length of a [`SOURCE_RANGES_MAP`] entry for a `/range_prefix_len` range.
pub const fn source_range_prefix_len(range_prefix_len: u8) -> u32 {
    32 + range_prefix_len as u32
}

/// Value of [`BACKENDS_MAP`], keyed by a `u32` backend id (never 0). 8 bytes, no holes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct Backend {
    /// Backend (pod) IPv4 address, network order.
    pub address: [u8; 4],
    /// Backend port, network order.
    pub port: [u8; 2],
    /// IP protocol, as in [`ServiceKey::protocol`].
    pub protocol: u8,
    /// Reserved for backend state (e.g. terminating). Always 0 today.
    pub flags: u8,
}
const _: () = assert!(core::mem::size_of::<Backend>() == 8);

/// Length of the NUL-padded name fields of [`ServiceMeta`]: a Kubernetes namespace, service
/// name or port name is a DNS label of at most 63 bytes, so one NUL always fits.
pub const NAME_LEN: usize = 64;

/// Value of [`SERVICE_META_MAP`], keyed by the `u32` service id. 200 bytes, no holes.
///
/// The frontend half is what reverse translation needs (service id → frontend); the names make
/// the pinned maps self-describing, so `kproxy dump` and a restarted agent can rebuild the full
/// programmed state from bpffs alone.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct ServiceMeta {
    /// Frontend IPv4 address, network order.
    pub address: [u8; 4],
    /// Frontend port, network order.
    pub port: [u8; 2],
    /// IP protocol, as in [`ServiceKey::protocol`].
    pub protocol: u8,
    /// Service type: one of `SVC_TYPE_*`.
    pub svc_type: u8,
    /// Namespace of the Service, NUL-padded UTF-8.
    pub namespace: [u8; NAME_LEN],
    /// Name of the Service, NUL-padded UTF-8.
    pub name: [u8; NAME_LEN],
    /// Name of the service port (may be empty), NUL-padded UTF-8.
    pub port_name: [u8; NAME_LEN],
}
const _: () = assert!(core::mem::size_of::<ServiceMeta>() == 8 + 3 * NAME_LEN);

/// [`ServiceMeta::svc_type`] of a ClusterIP frontend.
pub const SVC_TYPE_CLUSTER_IP: u8 = 1;
/// [`ServiceMeta::svc_type`] of a NodePort frontend (a node address at the node port).
pub const SVC_TYPE_NODE_PORT: u8 = 2;
/// [`ServiceMeta::svc_type`] of an external IP frontend.
pub const SVC_TYPE_EXTERNAL_IP: u8 = 3;
/// [`ServiceMeta::svc_type`] of a load-balancer ingress IP frontend.
pub const SVC_TYPE_LOAD_BALANCER: u8 = 4;

/// Pinned name of the membership map: [`MemberKey`] (service, backend) → [`MemberValue`] (the
/// backend's slot), one entry per backend slot of [`SERVICES_MAP`].
///
/// Read only when a flow's remembered slot no longer holds its remembered backend: the entry
/// says which slot holds it now (the reader confirms with that slot), or that the backend left
/// the service. The agent writes an entry before the slot that holds the backend and deletes it
/// after the slot no longer does.
pub const MEMBERS_MAP: &str = "KP_SVC_MEMBERS";

/// Key of [`MEMBERS_MAP`]. 12 bytes, no holes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct MemberKey {
    /// Service id of the frontend, as in [`ServiceValue::service_id`].
    pub service_id: u32,
    /// The backend, as in [`ServiceValue::backend_id`] of a slot.
    pub backend_id: u32,
    /// Lookup scope of the slots, as in [`ServiceKey::scope`].
    pub scope: u8,
    /// Explicit padding, always zero.
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<MemberKey>() == 12);
const _: () = assert!(core::mem::offset_of!(MemberKey, scope) == 8);

/// Value of [`MEMBERS_MAP`]. 4 bytes, no holes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct MemberValue {
    /// The slot (`1..=count`) of the frontend that holds the backend, as in
    /// [`ServiceKey::slot`].
    pub slot: u16,
    /// Explicit padding, always zero.
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<MemberValue>() == 4);

user_pod!(ServiceKey, ServiceValue, Backend, ServiceMeta, SourceRangeKey, AffinityKey, AffinityValue, MemberKey, MemberValue);
