//! Optional per-frontend counters (`kproxy run --service-counters N`): new connections on both
//! paths, and the packets and bytes of translated flows at tc ingress.
//!
//! Off by default (N = 0): the programs then read a load-time constant that the verifier
//! prunes on, and touch no map. With N > 0, [`SVC_COUNTERS_MAP`] holds at most N frontends,
//! which bounds the metric series the agent serves (three per frontend): the kernel adds a
//! frontend on its first counted event (`BPF_NOEXIST`) and adds to it after; once the map is
//! full, frontends not in it are simply not counted. The agent deletes a frontend's entry when
//! it deletes its metadata, so a reused service id starts from zero.

use bytemuck::{Pod, Zeroable};

/// Pinned name of the counters: a `BPF_MAP_TYPE_PERCPU_HASH` from the `u32` service id (the
/// frontend's id, as in [`crate::lb::SERVICE_META_MAP`]) to [`ServiceCounters`], one value per
/// CPU. `max_entries` is the `--service-counters` bound (1 when off: a map cannot have 0).
/// Written by the programs (entries and counts) and by the agent (deletions only).
pub const SVC_COUNTERS_MAP: &str = "KP_SVC_COUNTERS";

/// Value of [`SVC_COUNTERS_MAP`], per CPU: the agent sums the CPUs' values at each scrape.
/// 24 bytes, no holes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ServiceCounters {
    /// New connections to the frontend: a socket translated at `connect()` (TCP, connected
    /// UDP), an unconnected UDP socket's first datagram to the frontend, or its first after
    /// its backend changed (`sendmsg()`), and a new conntrack flow at tc ingress (a flow from
    /// outside the node, or one whose UDP backend left and is balanced afresh).
    pub new_connections: u64,
    /// Packets to the frontend translated at tc ingress (the first of each flow included).
    /// Socket-path traffic is never seen per packet: it goes to the backend directly.
    pub packets: u64,
    /// Bytes of those packets, as tc sees them: the whole frame (`skb->len`, the Ethernet
    /// header included).
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<ServiceCounters>() == 24);
const _: () = assert!(core::mem::offset_of!(ServiceCounters, packets) == 8);
const _: () = assert!(core::mem::offset_of!(ServiceCounters, bytes) == 16);

crate::user_pod!(ServiceCounters);
