//! Connection tracking: find, refresh and create the entries of translated flows.

use kproxy_common::{
    ct::{
        CtKey, CtValue, CT_CLOSE_TIMEOUT_NS, CT_FORWARD, CT_REVERSE, CT_SEEN_CLOSING, CT_SEEN_ESTABLISHED, CT_SEEN_SYN,
        CT_SYN_TIMEOUT_NS, CT_TCP_TIMEOUT_NS, CT_UDP_TIMEOUT_NS,
    },
    PROTO_TCP,
};

use crate::{
    maps::KP_CT,
    packet::{Flow, TCP_FIN, TCP_RST, TCP_SYN},
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

/// The entry for `key`, if it has not expired. The pointer is into the map value, for
/// [`refresh`]; it stays valid for this program run (LRU maps preallocate).
#[inline(always)]
pub fn lookup(key: &CtKey, now: u64) -> Option<*mut CtValue> {
    let entry = KP_CT.get_ptr_mut(key)?;
    // SAFETY: a map value pointer from the helper, valid and aligned for CtValue.
    if unsafe { (*entry).expires_ns } <= now {
        return None;
    }
    Some(entry)
}

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
#[inline(always)]
pub fn refresh(entry: *mut CtValue, flow: &Flow, now: u64) {
    // SAFETY: `entry` comes from `lookup` in this program run.
    unsafe {
        let was_closing = (*entry).seen & CT_SEEN_CLOSING != 0;
        let (seen, lifetime) = advance(flow, (*entry).seen);
        (*entry).seen = seen;
        if !was_closing {
            (*entry).expires_ns = now + lifetime;
        }
    }
}

/// Creates the forward entry (this packet's flow → `backend`) and the reverse entry
/// (`backend` → the client, translated back to the frontend). Best effort: if the LRU map
/// cannot take them, the packet is still translated and the next one retries.
#[inline(always)]
pub fn create(flow: &Flow, backend_address: [u8; 4], backend_port: [u8; 2], service_id: u32, now: u64) {
    let (seen, lifetime) = advance(flow, 0);
    let client = (flow.src_address, flow.src_port);
    let backend = (backend_address, backend_port);
    let forward = key(client, (flow.dst_address, flow.dst_port), flow.protocol, CT_FORWARD);
    let to_backend = CtValue {
        expires_ns: now + lifetime,
        nat_address: backend_address,
        nat_port: backend_port,
        seen,
        _pad: 0,
        service_id,
        _pad2: [0; 4],
    };
    let reverse = key(backend, client, flow.protocol, CT_REVERSE);
    let to_frontend = CtValue {
        expires_ns: now + lifetime,
        nat_address: flow.dst_address,
        nat_port: flow.dst_port,
        seen: 0,
        _pad: 0,
        service_id,
        _pad2: [0; 4],
    };
    let _ = KP_CT.insert(&reverse, &to_frontend, 0);
    let _ = KP_CT.insert(&forward, &to_backend, 0);
}
