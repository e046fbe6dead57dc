//! Service lookup and backend selection, independent of the hook that calls it.

use aya_ebpf::helpers::bpf_get_prandom_u32;
use aya_ebpf::{btf_maps::lpm_trie::Key, helpers::bpf_ktime_get_ns};
use kproxy_common::{
    lb::{
        source_range_prefix_len, AffinityKey, AffinityValue, Backend, MemberKey, ServiceKey, SourceRangeKey,
        SCOPE_EXTERNAL, SCOPE_INTERNAL, SVC_FLAG_AFFINITY, SVC_FLAG_TWO_SCOPES,
    },
    select_slot,
};

use crate::maps::{KP_AFFINITY, KP_BACKENDS, KP_SERVICES, KP_SRC_RANGES, KP_SVC_MEMBERS};

/// Who is asking, for `sessionAffinity: ClientIP`: see `kproxy_common::lb::AffinityKey`.
#[derive(Clone, Copy)]
pub struct Client {
    pub id: [u8; 8],
    pub kind: u8,
}

/// A backend chosen earlier for the same client, to keep if it is still in its slot.
#[derive(Clone, Copy)]
pub struct Sticky {
    pub slot: u16,
    pub backend_id: u32,
}

/// What a lookup of a destination found.
pub enum Lookup {
    /// Not a service frontend: leave the traffic alone.
    NotAService,
    /// A frontend with no usable backend: refuse, as kube-proxy's REJECT rule does, or drop
    /// when `flags` has `SVC_FLAG_DROP_UNSERVED`.
    NoBackend { flags: u16, service_id: u32 },
    /// Translate to this backend, found in `slot`.
    Backend { backend: Backend, backend_id: u32, slot: u16, service_id: u32, flags: u16 },
}

impl Lookup {
    /// The frontend's `SVC_FLAG_*` bits and service id, if it is a frontend.
    #[inline(always)]
    pub fn frontend(&self) -> Option<(u16, u32)> {
        match *self {
            Lookup::NotAService => None,
            Lookup::NoBackend { flags, service_id } | Lookup::Backend { flags, service_id, .. } => Some((flags, service_id)),
        }
    }
}

/// Whether `client` (network order) is within the allowed source ranges of `service_id`.
#[inline(always)]
pub fn source_allowed(service_id: u32, client: [u8; 4]) -> bool {
    let key = Key::new(source_range_prefix_len(32), SourceRangeKey { service_id: service_id.to_be_bytes(), address: client });
    KP_SRC_RANGES.get(&key).is_some()
}

/// Where a client is, which decides the endpoints of a frontend with two scopes
/// (`kproxy_common::lb::SCOPE_INTERNAL`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The node's processes and its pods (the socket path).
    InCluster,
    /// Outside the node (the tc path).
    Outside,
}

/// The slot of the frontend `key` (any slot of it: address, port, protocol, scope) that holds
/// `backend_id` of `service_id` now, for a flow whose remembered slot holds another backend:
/// the agent moved this one there when another left (see `kproxy_common::lb::MEMBERS_MAP`).
/// `None` if the backend left the service. O(1): the membership lookup, then the slot it names,
/// which must hold the backend (a membership entry may run ahead of the slots for an instant
/// while the agent rewrites them). Off the fast path: only called after a mismatch.
#[inline(always)]
pub fn relocate(key: &ServiceKey, service_id: u32, backend_id: u32) -> Option<u16> {
    let member = MemberKey { service_id, backend_id, scope: key.scope, _pad: [0; 3] };
    // SAFETY: the value is copied out at once.
    let slot = unsafe { KP_SVC_MEMBERS.get(&member) }?.slot;
    let at = ServiceKey { slot, ..*key };
    // SAFETY: as above.
    match unsafe { KP_SERVICES.get(&at) } {
        Some(v) if slot != 0 && v.backend_id == backend_id && v.service_id == service_id => Some(slot),
        _ => None,
    }
}

/// Looks up `address:port/protocol` (network order) and picks a backend: the `sticky` one if
/// it is still in the service (in its slot, or in the slot it was moved to), else (for a
/// frontend with session affinity) the one `client` used last if within the timeout and still
/// in the service, else uniformly at random. A client `InCluster` uses the frontend's internal
/// scope when its flags say it has one. O(1): at most three hash lookups, one more for the
/// internal scope, two more with session affinity, two more when a remembered backend has left
/// its slot.
#[inline(always)]
pub fn lookup(address: [u8; 4], port: [u8; 2], protocol: u8, sticky: Option<Sticky>, client: Client, origin: Origin) -> Lookup {
    let mut key = ServiceKey { address, port, slot: 0, protocol, scope: SCOPE_EXTERNAL, _pad: [0; 2] };
    // SAFETY: the value is copied out at once; no reference outlives this statement.
    let Some(mut frontend) = (unsafe { KP_SERVICES.get(&key) }).copied() else {
        return Lookup::NotAService;
    };
    if origin == Origin::InCluster && frontend.flags & SVC_FLAG_TWO_SCOPES != 0 {
        key.scope = SCOPE_INTERNAL;
        // The agent writes the internal scope before the flag and deletes it after clearing
        // the flag; should it be missing all the same (a hand edit), scope 0 serves.
        // SAFETY: as above.
        match unsafe { KP_SERVICES.get(&key) }.copied() {
            Some(internal) => frontend = internal,
            None => key.scope = SCOPE_EXTERNAL,
        }
    }
    // Session affinity state is built whether the frontend has affinity or not: a value
    // written on one path and read on another would be an uninitialised stack read to the
    // Linux 5.10 verifier, which does not relate the two branches on the same flag. This runs
    // once per new connection, not per packet.
    let affinity = frontend.flags & SVC_FLAG_AFFINITY != 0;
    let affinity_key = AffinityKey { client: client.id, service_id: frontend.service_id, kind: client.kind, _pad: [0; 3] };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let sticky = match sticky {
        Some(s) => Some(s),
        None if affinity => {
            // SAFETY: the value is copied out at once.
            let last = unsafe { KP_AFFINITY.get(&affinity_key) }.copied();
            let timeout_ns = u64::from(frontend.backend_id) * 1_000_000_000;
            last.filter(|v| now.saturating_sub(v.last_used_ns) <= timeout_ns)
                .map(|v| Sticky { slot: v.slot, backend_id: v.backend_id })
        }
        None => None,
    };
    let no_backend = Lookup::NoBackend { flags: frontend.flags, service_id: frontend.service_id };
    if frontend.count == 0 {
        return no_backend;
    }
    // The remembered backend, if it is still in the service: in its slot (the fast path), or
    // in the slot the agent moved it to. 0 (never a backend id) until a backend is chosen; a
    // scalar rather than an Option of a map value, which the Linux 5.10 verifier would see read
    // uninitialised on the paths that never wrote it.
    let mut backend_id = 0u32;
    if let Some(s) = sticky {
        if s.slot >= 1 && s.slot <= frontend.count {
            key.slot = s.slot;
            // SAFETY: as above, values are copied out at once.
            if matches!(unsafe { KP_SERVICES.get(&key) }, Some(v) if v.backend_id == s.backend_id) {
                backend_id = s.backend_id;
            }
        }
        if backend_id == 0 {
            if let Some(moved) = relocate(&key, frontend.service_id, s.backend_id) {
                if moved <= frontend.count {
                    key.slot = moved;
                    backend_id = s.backend_id;
                }
            }
        }
    }
    if backend_id == 0 {
        // SAFETY: helper without arguments, always available to these program types.
        key.slot = select_slot(unsafe { bpf_get_prandom_u32() }, frontend.count);
        // A slot can be missing only for an instant while the agent shrinks a service (it
        // writes the smaller count first); treat that like a service without backends.
        // SAFETY: as above.
        match unsafe { KP_SERVICES.get(&key) } {
            Some(v) => backend_id = v.backend_id,
            None => return no_backend,
        }
    }
    if affinity {
        // Every new connection renews the affinity, as kube-proxy's `recent --set` does.
        // Best effort: without the entry the next connection is balanced afresh.
        let value = AffinityValue { last_used_ns: now, backend_id, slot: key.slot, _pad: 0 };
        let _ = KP_AFFINITY.insert(&affinity_key, &value, 0);
    }
    // SAFETY: as above.
    match unsafe { KP_BACKENDS.get(&backend_id) }.copied() {
        Some(backend) => Lookup::Backend {
            backend,
            backend_id,
            slot: key.slot,
            service_id: frontend.service_id,
            flags: frontend.flags,
        },
        None => no_backend,
    }
}
