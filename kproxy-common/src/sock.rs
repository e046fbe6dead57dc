//! Socket-level reverse translation.
//!
//! `connect4` and `sendmsg4` rewrite a service address to a backend address in the socket
//! itself, so the kernel never sees the service again. To make the socket still *appear*
//! connected to the service (`getpeername`, the source of a UDP reply in `recvmsg`), the
//! forward hook records "this socket talks to this backend on behalf of this frontend" here,
//! and `getpeername4` / `recvmsg4` translate back. LRU, so entries of closed sockets age out.

use bytemuck::{Pod, Zeroable};

use crate::user_pod;

/// Pinned name of the socket reverse-NAT map.
pub const SOCK_REVNAT_MAP: &str = "KP_SOCK_REVNAT";

/// Default capacity of [`SOCK_REVNAT_MAP`] and [`SOCK_AFFINITY_MAP`] (sockets with a live
/// translation).
pub const DEFAULT_MAX_SOCK_ENTRIES: u32 = 262_144;

/// Key of [`SOCK_REVNAT_MAP`]. 16 bytes, no holes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SockRevNatKey {
    /// `bpf_get_socket_cookie()` of the client socket.
    pub cookie: u64,
    /// Backend IPv4 address the socket was sent to, network order.
    pub address: [u8; 4],
    /// Backend port, network order.
    pub port: [u8; 2],
    /// Explicit padding, always zero.
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<SockRevNatKey>() == 16);

/// Value of [`SOCK_REVNAT_MAP`]. 12 bytes, no holes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SockRevNatValue {
    /// Frontend (service) IPv4 address the application asked for, network order.
    pub address: [u8; 4],
    /// Frontend port, network order.
    pub port: [u8; 2],
    /// Explicit padding, always zero.
    pub _pad: [u8; 2],
    /// Service id of the frontend, as in [`crate::lb::ServiceValue::service_id`].
    pub service_id: u32,
}
const _: () = assert!(core::mem::size_of::<SockRevNatValue>() == 12);

user_pod!(SockRevNatKey, SockRevNatValue);

/// Pinned name of the socket affinity map.
pub const SOCK_AFFINITY_MAP: &str = "KP_SOCK_AFFIN";

/// Key of [`SOCK_AFFINITY_MAP`]: an unconnected UDP socket talking to one frontend. 16 bytes.
///
/// kube-proxy's conntrack keeps every datagram of a (socket, service) pair on one backend; so
/// does this map, for `sendmsg4`. The entry is only trusted while its slot of the service still
/// holds the same backend, so a removed backend loses its clients on their next datagram.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SockAffinityKey {
    /// `bpf_get_socket_cookie()` of the client socket.
    pub cookie: u64,
    /// Frontend IPv4 address, network order.
    pub address: [u8; 4],
    /// Frontend port, network order.
    pub port: [u8; 2],
    /// IP protocol of the frontend.
    pub protocol: u8,
    /// Explicit padding, always zero.
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<SockAffinityKey>() == 16);

/// Value of [`SOCK_AFFINITY_MAP`]. 8 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SockAffinityValue {
    /// Backend id chosen for this socket and frontend.
    pub backend_id: u32,
    /// Slot of the service that held `backend_id` when it was chosen.
    pub slot: u16,
    /// Explicit padding, always zero.
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<SockAffinityValue>() == 8);

user_pod!(SockAffinityKey, SockAffinityValue);

/// Pinned-nowhere name of the socket termination map: filled by the agent right before it runs
/// the socket iterators (`kp_sockterm_udp`, `kp_sockterm_tcp`) and emptied right after.
pub const SOCK_TERM_MAP: &str = "KP_SOCK_TERM";

/// Capacity of [`SOCK_TERM_MAP`]: (service, backend) pairs removed by one sync. The agent runs
/// the iterators once per batch of at most this many pairs.
pub const SOCK_TERM_ENTRIES: u32 = 4096;

/// Key of [`SOCK_TERM_MAP`]: a backend that left a service. A socket is destroyed when it is
/// connected to `address:port` over `protocol` and [`SOCK_REVNAT_MAP`] says kproxy translated
/// it to that backend for `service_id`. 12 bytes, no holes. The value is a `u8`, unused.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct SockTermKey {
    /// Service id of the frontend, as in [`SockRevNatValue::service_id`].
    pub service_id: u32,
    /// Backend IPv4 address, network order.
    pub address: [u8; 4],
    /// Backend port, network order.
    pub port: [u8; 2],
    /// IP protocol ([`crate::PROTO_TCP`] or [`crate::PROTO_UDP`]).
    pub protocol: u8,
    /// Explicit padding, always zero.
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<SockTermKey>() == 12);

user_pod!(SockTermKey);
