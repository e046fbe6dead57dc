//! Connection tracking for the per-packet (tc) datapath.
//!
//! Every entry is keyed by a packet's 5-tuple as the hook that matches it sees the packet, and
//! says which address and port to write into that packet: entries matched at ingress rewrite
//! the destination, entries matched at egress rewrite the source. A flow to a backend on this
//! node has two entries, a flow to a backend reached through one of the node's devices (on
//! another node) four, because it is also source-translated to the node (SNAT):
//!
//! ```text
//! C client, F frontend, B backend, N:P the node's address on the device towards B and a port
//! allocated for this flow (see crate::nat).
//!
//! key (as the packet is seen)   direction   rewrites          used for
//! (C, F)                        INGRESS     destination → B   client → frontend, every backend
//! (B, C)                        EGRESS      source → F        backend's reply leaves as F
//! (C, B)                        EGRESS      source → N:P      SNAT: the forwarded request
//! (B, N:P)                      INGRESS     destination → C   SNAT: the backend's reply
//! ```
//!
//! With SNAT a request crosses the node as C→F (ingress: DNAT) → C→B (routed, egress: SNAT) →
//! N:P→B, and the reply as B→N:P (ingress: un-SNAT) → B→C (routed, egress: un-DNAT) → F→C.
//! LRU, so the map never fills up; each entry also carries its own expiry, refreshed by
//! traffic, so closed or idle flows stop matching after their timeout.

use bytemuck::{Pod, Zeroable};

use crate::user_pod;

/// Pinned name of the connection-tracking map.
pub const CT_MAP: &str = "KP_CT";

/// Default capacity of [`CT_MAP`] (two entries per tracked flow, four with SNAT).
pub const DEFAULT_MAX_CT_ENTRIES: u32 = 524_288;

/// [`CtKey::direction`] of entries matched at tc ingress: they rewrite the destination.
pub const CT_INGRESS: u8 = 0;
/// [`CtKey::direction`] of entries matched at tc egress: they rewrite the source.
pub const CT_EGRESS: u8 = 1;

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
    /// [`CT_INGRESS`] or [`CT_EGRESS`].
    pub direction: u8,
    /// Explicit padding, always zero.
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<CtKey>() == 16);

/// Value of [`CT_MAP`]. 32 bytes, no holes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct CtValue {
    /// CLOCK_MONOTONIC in ns (`bpf_ktime_get_ns()`, or its coarse variant where the kernel has
    /// it) after which the entry no longer matches.
    pub expires_ns: u64,
    /// The address to write: the destination at ingress, the source at egress. Network order.
    pub nat_address: [u8; 4],
    /// Port counterpart of `nat_address`, network order.
    pub nat_port: [u8; 2],
    /// TCP flags seen in this direction (`CT_SEEN_*`).
    pub seen: u8,
    /// `CT_FLAG_*` bits.
    pub flags: u8,
    /// Service id of the frontend, as in [`crate::lb::ServiceValue::service_id`].
    pub service_id: u32,
    /// Entries with [`CT_FLAG_FRONTEND`]: the backend chosen, as in
    /// [`crate::lb::ServiceValue::backend_id`]. 0 otherwise.
    pub backend_id: u32,
    /// Entries with [`CT_FLAG_FRONTEND`]: the backend's slot in the frontend. 0 otherwise.
    pub slot: u16,
    /// Explicit padding, always zero.
    pub _pad: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<CtValue>() == 32);

/// [`CtValue::flags`]: the (client, frontend) entry of a flow, whose `backend_id` and `slot`
/// say which backend it was given. A UDP flow whose backend has left the service is balanced
/// afresh on its next datagram, as kube-proxy deletes the conntrack entries of UDP flows to
/// removed endpoints; one whose backend only moved to another slot keeps it (and `slot` is
/// updated), see `crate::lb::MEMBERS_MAP`.
pub const CT_FLAG_FRONTEND: u8 = 1 << 0;

/// [`CtValue::seen`]: a SYN went this way.
pub const CT_SEEN_SYN: u8 = 1 << 0;
/// [`CtValue::seen`]: a packet without SYN went this way (the handshake progressed).
pub const CT_SEEN_ESTABLISHED: u8 = 1 << 1;
/// [`CtValue::seen`]: a FIN or RST went this way; the entry only lives out its close timeout.
pub const CT_SEEN_CLOSING: u8 = 1 << 2;

user_pod!(CtKey, CtValue);
