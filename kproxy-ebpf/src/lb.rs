//! Service lookup and backend selection, independent of the hook that calls it.

use aya_ebpf::helpers::bpf_get_prandom_u32;
use kproxy_common::{
    lb::{Backend, ServiceKey},
    select_slot,
};

use crate::maps::{KP_BACKENDS, KP_SERVICES};

/// What a lookup of a destination found.
pub enum Lookup {
    /// Not a service frontend: leave the traffic alone.
    NotAService,
    /// A frontend with no usable backend: refuse, as kube-proxy's REJECT rule does.
    NoBackend,
    /// Translate to this backend.
    Backend { backend: Backend, service_id: u32 },
}

/// Looks up `address:port/protocol` (network order) and picks a backend uniformly at random.
#[inline(always)]
pub fn lookup(address: [u8; 4], port: [u8; 2], protocol: u8) -> Lookup {
    let mut key = ServiceKey { address, port, slot: 0, protocol, scope: 0, _pad: [0; 2] };
    // SAFETY: the value is copied out at once; no reference outlives this statement.
    let Some(frontend) = (unsafe { KP_SERVICES.get(&key) }).copied() else {
        return Lookup::NotAService;
    };
    if frontend.count == 0 {
        return Lookup::NoBackend;
    }
    // SAFETY: helper without arguments, always available to these program types.
    key.slot = select_slot(unsafe { bpf_get_prandom_u32() }, frontend.count);
    // A slot or backend can be missing only for an instant while the agent shrinks a service
    // (it writes the smaller count first); treat that like a service without backends.
    // SAFETY: as above, values are copied out at once.
    let Some(slot) = (unsafe { KP_SERVICES.get(&key) }).copied() else {
        return Lookup::NoBackend;
    };
    match unsafe { KP_BACKENDS.get(&slot.backend_id) }.copied() {
        Some(backend) => Lookup::Backend { backend, service_id: frontend.service_id },
        None => Lookup::NoBackend,
    }
}
