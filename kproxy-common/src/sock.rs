//! Socket-level reverse translation.
//!
//! `connect4` and `sendmsg4` rewrite a service address to a backend address in the socket
//! itself, so the kernel never sees the service again. To make the socket still *appear*
//! connected to the service (`getpeername`, the source of a UDP reply in `recvmsg`), the
//! forward hook records "this socket talks to this backend on behalf of this frontend", and
//! `getpeername4` / `recvmsg4` translate back.
//!
//! Where that record lives:
//! - **In the socket itself** ([`SOCK_LOCAL_MAP`], `BPF_MAP_TYPE_SK_STORAGE`), where the
//!   kernel lets cgroup sock_addr programs use socket-local storage (Linux >= 5.3; the agent
//!   probes it at load time). The record lives and dies with its socket, so no other process,
//!   however many sockets it opens, can evict it. A socket has room for
//!   [`SOCK_LOCAL_ENTRIES`] translations: one is what a connected socket needs; an unconnected
//!   UDP socket may talk to several services, one entry each. The same entry carries the
//!   per-socket UDP affinity of `sendmsg4` (which backend, in which slot).
//! - **In the shared LRU maps** ([`SOCK_REVNAT_MAP`], [`SOCK_AFFINITY_MAP`], keyed by socket
//!   cookie) for the translations that do not fit: every one on kernels without socket storage
//!   in sock_addr programs (or with `kproxy run --socket-storage=false`), and on other kernels
//!   those of a socket already holding [`SOCK_LOCAL_ENTRIES`] other services, or whose storage
//!   could not be allocated. Readers look in the socket first, then in the LRU maps (which also
//!   holds what an agent before this layout wrote). LRU, so entries of closed sockets age out,
//!   and a burst of new sockets can evict live entries: [`SOCK_STATS_MAP`] counts the new
//!   entries written, so that the pressure shows as a metric.

use bytemuck::{Pod, Zeroable};

use crate::user_pod;

/// Pinned name of the socket reverse-NAT map.
pub const SOCK_REVNAT_MAP: &str = "KP_SOCK_REVNAT";

/// Default capacity of [`SOCK_REVNAT_MAP`] and [`SOCK_AFFINITY_MAP`] (translations kept in the
/// shared LRU maps: see the module documentation for which).
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

/// Pinned name of the socket-local storage map (`BPF_MAP_TYPE_SK_STORAGE`: key a socket,
/// value [`SockLocal`]; no capacity, every socket has its own).
pub const SOCK_LOCAL_MAP: &str = "KP_SOCK_LOCAL";

/// Translations one socket keeps in its own storage; more go to the LRU maps.
pub const SOCK_LOCAL_ENTRIES: usize = 4;

/// One translation of a socket, frontend ↔ backend, in [`SockLocal`]. 24 bytes, no holes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SockTranslation {
    /// Frontend (service) IPv4 address the application asked for, network order.
    pub frontend_address: [u8; 4],
    /// Frontend port, network order.
    pub frontend_port: [u8; 2],
    /// Backend port, network order.
    pub backend_port: [u8; 2],
    /// Backend IPv4 address the socket was sent to, network order.
    pub backend_address: [u8; 4],
    /// Service id of the frontend, as in [`crate::lb::ServiceValue::service_id`].
    pub service_id: u32,
    /// Backend id chosen, as in [`crate::lb::ServiceValue::backend_id`] (the per-socket UDP
    /// affinity of `sendmsg4`, as [`SockAffinityValue::backend_id`]).
    pub backend_id: u32,
    /// Slot of the frontend that held `backend_id` when last used, as
    /// [`SockAffinityValue::slot`].
    pub slot: u16,
    /// IP protocol of the frontend ([`crate::PROTO_TCP`] or [`crate::PROTO_UDP`]); 0 marks an
    /// unused entry. Written last, so a reader never matches a half-written entry.
    pub protocol: u8,
    /// Explicit padding, always zero.
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<SockTranslation>() == 24);
const _: () = assert!(core::mem::offset_of!(SockTranslation, backend_address) == 8);
const _: () = assert!(core::mem::offset_of!(SockTranslation, protocol) == 22);

/// Value of [`SOCK_LOCAL_MAP`]: a socket's translations, unused entries zero. Entries are
/// filled in order and never moved; one is rewritten in place when its frontend gets another
/// backend. 96 bytes, no holes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SockLocal {
    pub entries: [SockTranslation; SOCK_LOCAL_ENTRIES],
}
const _: () = assert!(core::mem::size_of::<SockLocal>() == 24 * SOCK_LOCAL_ENTRIES);

user_pod!(SockTranslation, SockLocal);

/// Pinned name of the socket statistics map: a per-CPU array of `u64` counters, indexed by the
/// `SOCK_STAT_*` constants, written by the socket programs only. Pinned, so the counters go on
/// across agent restarts.
pub const SOCK_STATS_MAP: &str = "KP_SOCK_STATS";
/// [`SOCK_STATS_MAP`]: translations stored in a socket's own storage (new entries).
pub const SOCK_STAT_LOCAL: u32 = 0;
/// [`SOCK_STATS_MAP`]: translations that went to the shared LRU maps although socket storage is
/// in use (the socket's entries were all taken by other services, or its storage could not be
/// allocated).
pub const SOCK_STAT_LOCAL_FULL: u32 = 1;
/// [`SOCK_STATS_MAP`]: new keys written to [`SOCK_REVNAT_MAP`]. Nothing deletes from that LRU
/// map, so this minus its entries is how many were evicted.
pub const SOCK_STAT_REVNAT_NEW: u32 = 2;
/// [`SOCK_STATS_MAP`]: new keys written to [`SOCK_AFFINITY_MAP`], likewise.
pub const SOCK_STAT_AFFINITY_NEW: u32 = 3;
/// Entries of [`SOCK_STATS_MAP`].
pub const SOCK_STATS: u32 = 4;

/// Pinned-nowhere name of the socket termination map: filled by the agent right before it runs
/// the socket iterators (`kp_sockterm_udp`, `kp_sockterm_tcp`) and emptied right after.
pub const SOCK_TERM_MAP: &str = "KP_SOCK_TERM";

/// Capacity of [`SOCK_TERM_MAP`]: (service, backend) pairs removed by one sync. The agent runs
/// the iterators once per batch of at most this many pairs.
pub const SOCK_TERM_ENTRIES: u32 = 4096;

/// Key of [`SOCK_TERM_MAP`]: a backend that left a service. A socket is destroyed when it is
/// connected to `address:port` over `protocol` and its [`SockLocal`] entries (or, failing
/// those, [`SOCK_REVNAT_MAP`]) say kproxy translated it to that backend for `service_id`. 12 bytes, no holes. The value is a `u8`, unused.
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
