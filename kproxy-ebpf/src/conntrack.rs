//! Connection tracking: find, refresh and create the entries of translated flows. A found
//! entry is an [`Entry`], whose pointer into the map never leaves this module.

use kproxy_common::{
    ct::{
        CtKey, CtValue, CT_CLOSE_TIMEOUT_NS, CT_EGRESS, CT_FLAG_FRONTEND, CT_INGRESS, CT_SEEN_CLOSING,
        CT_SEEN_ESTABLISHED, CT_SEEN_SYN, CT_SYN_TIMEOUT_NS, CT_TCP_TIMEOUT_NS, CT_UDP_TIMEOUT_NS,
    },
    lb::ServiceKey,
    nat::{SNAT_PORT_MAX, SNAT_PORT_MIN, SNAT_PORT_TRIES},
    wire::{PROTO_TCP, PROTO_UDP, TCP_FIN, TCP_RST, TCP_SYN},
};

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
};

use crate::{
    lb,
    maps::{KP_CT, KP_SERVICES},
    packet::Flow,
};

/// The key of a packet's 5-tuple (addresses and ports in network order) in `direction`.
#[inline(always)]
pub fn key(src: ([u8; 4], [u8; 2]), dst: ([u8; 4], [u8; 2]), protocol: u8, direction: u8) -> CtKey {
    CtKey {
        src_address: src.0,
        dst_address: dst.0,
        src_port: src.1,
        dst_port: dst.1,
        protocol,
        direction,
        _pad: [0; 2],
    }
}

/// A live (unexpired) entry of `KP_CT`, found by [`lookup`], and the time it was found at
/// (which [`refresh`] extends it from).
///
/// It holds a pointer into the map value, valid for this program run (LRU maps preallocate
/// their values, and a value is not freed while a program that looked it up runs); other CPUs
/// may write the same entry meanwhile, which is why it stays a pointer, read and written field
/// by field, rather than a Rust reference.
pub struct Entry {
    value: *mut CtValue,
    now: u64,
}

/// The entry for `key`, if it has not expired (the time is read only when there is an entry:
/// most packets have none).
#[inline(always)]
pub fn lookup(key: &CtKey) -> Option<Entry> {
    let value = KP_CT.get_ptr_mut(key)?;
    let now = now();
    // SAFETY: a map value pointer from the helper, valid and aligned for CtValue.
    if unsafe { (*value).expires_ns } <= now {
        return None;
    }
    Some(Entry { value, now })
}

impl Entry {
    /// The address and port this entry writes into its packets (network order).
    #[inline(always)]
    pub fn nat(&self) -> ([u8; 4], [u8; 2]) {
        // SAFETY: `value` is a live map value for this program run (see [`Entry`]).
        unsafe { ((*self.value).nat_address, (*self.value).nat_port) }
    }
}

/// Set by the agent at load time to 1 when the kernel has `bpf_ktime_get_coarse_ns` (Linux
/// >= 5.11). The verifier sees the constant and prunes the call it cannot make on older
/// kernels (5.10 is the floor), as with `KP_HAS_SET_RETVAL`.
#[unsafe(no_mangle)]
static KP_HAS_COARSE_CLOCK: u8 = 0;

/// The clock entries expire by: CLOCK_MONOTONIC in ns, at the resolution of a tick where the
/// kernel offers that cheaper read (no TSC read per packet; the timeouts are seconds long),
/// else `bpf_ktime_get_ns`. Both count from the same origin, so entries written with either
/// (e.g. by an agent before an upgrade) compare correctly.
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: reading a constant global patched at load time.
    if unsafe { core::ptr::read_volatile(&KP_HAS_COARSE_CLOCK) } != 0 {
        // SAFETY: helper without arguments, from Linux 5.11 (gated above).
        unsafe { bpf_ktime_get_coarse_ns() }
    } else {
        // SAFETY: helper without arguments.
        unsafe { bpf_ktime_get_ns() }
    }
}

/// How far an entry's expiry may lag behind its last packet: a packet that would move it by
/// less does not write it (a write per packet would bounce the entry's cache line between the
/// CPUs the flow's packets are handled on).
const REFRESH_SLACK_NS: u64 = 1_000_000_000;

/// The TCP flags this packet adds to what was seen, and the lifetime that results.
#[inline(always)]
fn advance(flow: &Flow, seen: u8) -> (u8, u64) {
    if flow.protocol != PROTO_TCP {
        return (seen, CT_UDP_TIMEOUT_NS);
    }
    let mut seen = seen;
    if flow.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        seen |= CT_SEEN_CLOSING;
    } else if flow.tcp_flags & TCP_SYN != 0 {
        seen |= CT_SEEN_SYN;
    } else {
        seen |= CT_SEEN_ESTABLISHED;
    }
    let lifetime = if seen & CT_SEEN_CLOSING != 0 {
        CT_CLOSE_TIMEOUT_NS
    } else if seen & CT_SEEN_ESTABLISHED != 0 {
        CT_TCP_TIMEOUT_NS
    } else {
        CT_SYN_TIMEOUT_NS
    };
    (seen, lifetime)
}

/// Records this packet in its entry: TCP state and expiry. A closing flow is not extended.
/// Writes only what changes: the state when this packet adds to it (the expiry then too, as
/// the lifetime may shrink), the expiry when it would move by more than [`REFRESH_SLACK_NS`].
#[inline(always)]
pub fn refresh(entry: &Entry, flow: &Flow) {
    let (entry, now) = (entry.value, entry.now);
    // SAFETY: a live map value for this program run (see [`Entry`]).
    unsafe {
        let was = (*entry).seen;
        let (seen, lifetime) = advance(flow, was);
        if seen != was {
            (*entry).seen = seen;
        }
        if was & CT_SEEN_CLOSING == 0 {
            let expires_ns = now + lifetime;
            if seen != was || expires_ns > (*entry).expires_ns + REFRESH_SLACK_NS {
                (*entry).expires_ns = expires_ns;
            }
        }
    }
}

/// The backend a new flow was given, from `lb::lookup`.
#[derive(Clone, Copy)]
pub struct Chosen {
    pub address: [u8; 4],
    pub port: [u8; 2],
    pub backend_id: u32,
    pub slot: u16,
    pub service_id: u32,
}

/// An entry that rewrites to `(address, port)`, living `lifetime` from `now`.
#[inline(always)]
fn value(to: ([u8; 4], [u8; 2]), seen: u8, lifetime: u64, service_id: u32, now: u64) -> CtValue {
    CtValue {
        expires_ns: now + lifetime,
        nat_address: to.0,
        nat_port: to.1,
        seen,
        flags: 0,
        service_id,
        backend_id: 0,
        slot: 0,
        _pad: [0; 6],
    }
}

/// The (client, frontend) entry of a new flow: rewrites to the chosen backend and remembers it.
#[inline(always)]
fn frontend_value(chosen: &Chosen, seen: u8, lifetime: u64, now: u64) -> CtValue {
    CtValue {
        flags: CT_FLAG_FRONTEND,
        backend_id: chosen.backend_id,
        slot: chosen.slot,
        ..value((chosen.address, chosen.port), seen, lifetime, chosen.service_id, now)
    }
}

/// Whether `entry` is a UDP flow's (client, frontend) entry whose backend has left the
/// service: then the datagram is balanced afresh (see `CT_FLAG_FRONTEND`). A backend that is
/// still in the service but in another slot (the agent moved it into the slot of one that
/// left) keeps its flows, and the entry remembers the new slot. TCP flows keep their backend,
/// as with kube-proxy. The fast path, a slot that still holds the backend, is one lookup.
#[inline(always)]
pub fn stale(entry: &Entry, flow: &Flow) -> bool {
    let entry = entry.value;
    // SAFETY: a live map value for this program run (see [`Entry`]).
    let (flags, backend_id, slot, service_id) =
        unsafe { ((*entry).flags, (*entry).backend_id, (*entry).slot, (*entry).service_id) };
    if flow.protocol != PROTO_UDP || flags & CT_FLAG_FRONTEND == 0 {
        return false;
    }
    let key = ServiceKey { address: flow.dst_address, port: flow.dst_port, slot, protocol: flow.protocol, scope: 0, _pad: [0; 2] };
    // SAFETY: the value is copied out at once.
    if matches!(unsafe { KP_SERVICES.get(&key) }, Some(v) if v.backend_id == backend_id) {
        return false;
    }
    match lb::relocate(&key, service_id, backend_id) {
        Some(moved) => {
            // SAFETY: as above; a u16 store into the entry.
            unsafe { (*entry).slot = moved };
            false
        }
        None => true,
    }
}

/// Creates the entries of a new flow to a backend on this node: the client's packets to
/// `backend` (at ingress), the backend's replies from the frontend (at egress). Best effort:
/// if the LRU map cannot take them, the packet is still translated and the next one retries.
#[inline(always)]
pub fn create(flow: &Flow, chosen: &Chosen, now: u64) {
    let (seen, lifetime) = advance(flow, 0);
    let client = (flow.src_address, flow.src_port);
    let frontend = (flow.dst_address, flow.dst_port);
    let backend = (chosen.address, chosen.port);
    let _ = KP_CT.insert(&key(backend, client, flow.protocol, CT_EGRESS), &value(frontend, 0, lifetime, chosen.service_id, now), 0);
    let _ = KP_CT.insert(&key(client, frontend, flow.protocol, CT_INGRESS), &frontend_value(chosen, seen, lifetime, now), 0);
}

/// Creates the four entries of a new flow to a backend behind one of the node's devices,
/// source-translated to `node_address` and a port claimed for it; see `kproxy_common::ct`.
/// `None` if no port was free after `SNAT_PORT_TRIES` random tries: the caller drops the packet.
///
/// A port is claimed by inserting the (backend, node:port) reply entry with `BPF_NOEXIST`,
/// which the kernel does atomically, so two flows never get the same port towards a backend.
/// An entry that has expired but is still in the LRU map is taken over with a plain update.
#[inline(always)]
pub fn create_snat(flow: &Flow, chosen: &Chosen, node_address: [u8; 4], now: u64) -> Option<[u8; 2]> {
    let (seen, lifetime) = advance(flow, 0);
    let (backend, service_id) = ((chosen.address, chosen.port), chosen.service_id);
    let client = (flow.src_address, flow.src_port);
    let frontend = (flow.dst_address, flow.dst_port);
    let to_client = value(client, 0, lifetime, service_id, now);
    let range = (SNAT_PORT_MAX - SNAT_PORT_MIN) as u32 + 1;
    let mut claimed = None;
    for _ in 0..SNAT_PORT_TRIES {
        // SAFETY: helper without arguments.
        let port = (SNAT_PORT_MIN + (unsafe { bpf_get_prandom_u32() } % range) as u16).to_be_bytes();
        let reply = key(backend, (node_address, port), flow.protocol, CT_INGRESS);
        if KP_CT.insert(&reply, &to_client, BPF_NOEXIST as u64).is_ok()
            || (lookup(&reply).is_none() && KP_CT.insert(&reply, &to_client, 0).is_ok())
        {
            claimed = Some(port);
            break;
        }
    }
    let port = claimed?;
    let node = (node_address, port);
    let _ = KP_CT.insert(&key(backend, client, flow.protocol, CT_EGRESS), &value(frontend, 0, lifetime, service_id, now), 0);
    let _ = KP_CT.insert(&key(client, backend, flow.protocol, CT_EGRESS), &value(node, seen, lifetime, service_id, now), 0);
    let _ = KP_CT.insert(&key(client, frontend, flow.protocol, CT_INGRESS), &frontend_value(chosen, seen, lifetime, now), 0);
    Some(port)
}
