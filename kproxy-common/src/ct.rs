//! Connection tracking for the per-packet (tc) datapath.
//!
//! Every translated flow has two entries in [`CT_MAP`]:
//! ```text
//! forward  (client, frontend) dir=FORWARD → backend   used at ingress: same flow, same backend
//! reverse  (backend, client)  dir=REVERSE → frontend  used at egress: replies leave as the frontend
//! ```
//! LRU, so the map never fills up; each entry also carries its own expiry, refreshed by
//! traffic, so closed or idle flows stop matching after their timeout.

use bytemuck::{Pod, Zeroable};

use crate::user_pod;

/// Pinned name of the connection-tracking map.
pub const CT_MAP: &str = "KP_CT";

/// Default capacity of [`CT_MAP`] (two entries per tracked flow).
pub const DEFAULT_MAX_CT_ENTRIES: u32 = 524_288;

/// [`CtKey::direction`] of the entry a client → frontend packet matches.
pub const CT_FORWARD: u8 = 0;
/// [`CtKey::direction`] of the entry a backend → client reply matches.
pub const CT_REVERSE: u8 = 1;

/// Lifetime of a TCP flow that has only seen SYNs (as Cilium: 60 s).
pub const CT_SYN_TIMEOUT_NS: u64 = 60_000_000_000;
/// Lifetime of an established TCP flow after its last packet (as Cilium: 6 h).
pub const CT_TCP_TIMEOUT_NS: u64 = 21_600_000_000_000;
/// Lifetime of a TCP flow after a FIN or RST (as Cilium: 10 s).
pub const CT_CLOSE_TIMEOUT_NS: u64 = 10_000_000_000;
/// Lifetime of a UDP flow after its last packet (as Cilium: 60 s).
pub const CT_UDP_TIMEOUT_NS: u64 = 60_000_000_000;

/// Key of [`CT_MAP`]: the packet's own 5-tuple, as it arrives. 16 bytes, no holes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct CtKey {
    /// Source IPv4 address, network order.
    pub src_address: [u8; 4],
    /// Destination IPv4 address, network order.
    pub dst_address: [u8; 4],
    /// Source port, network order.
    pub src_port: [u8; 2],
    /// Destination port, network order.
    pub dst_port: [u8; 2],
    /// IP protocol.
    pub protocol: u8,
    /// [`CT_FORWARD`] or [`CT_REVERSE`].
    pub direction: u8,
    /// Explicit padding, always zero.
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<CtKey>() == 16);

/// Value of [`CT_MAP`]. 24 bytes, no holes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct CtValue {
    /// `bpf_ktime_get_ns()` after which the entry no longer matches.
    pub expires_ns: u64,
    /// Forward: the backend address to write as destination. Reverse: the frontend address
    /// to write as source. Network order.
    pub nat_address: [u8; 4],
    /// Port counterpart of `nat_address`, network order.
    pub nat_port: [u8; 2],
    /// TCP flags seen in this direction (`CT_SEEN_*`).
    pub seen: u8,
    /// Explicit padding, always zero.
    pub _pad: u8,
    /// Service id of the frontend, as in [`crate::lb::ServiceValue::service_id`].
    pub service_id: u32,
    /// Explicit padding, always zero.
    pub _pad2: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<CtValue>() == 24);

/// [`CtValue::seen`]: a SYN went this way.
pub const CT_SEEN_SYN: u8 = 1 << 0;
/// [`CtValue::seen`]: a packet without SYN went this way (the handshake progressed).
pub const CT_SEEN_ESTABLISHED: u8 = 1 << 1;
/// [`CtValue::seen`]: a FIN or RST went this way; the entry only lives out its close timeout.
pub const CT_SEEN_CLOSING: u8 = 1 << 2;

user_pod!(CtKey, CtValue);
