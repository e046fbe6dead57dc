//! Service lookup and backend selection, independent of the hook that calls it.

use aya_ebpf::helpers::bpf_get_prandom_u32;
use kproxy_common::{
    lb::{Backend, ServiceKey},
    select_slot,
};

use crate::maps::{KP_BACKENDS, KP_SERVICES};

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
    /// A frontend with no usable backend: refuse, as kube-proxy's REJECT rule does.
    NoBackend,
    /// Translate to this backend, found in `slot`.
    Backend { backend: Backend, backend_id: u32, slot: u16, service_id: u32 },
}

/// Looks up `address:port/protocol` (network order) and picks a backend: the `sticky` one if
/// its slot still holds it, else uniformly at random. O(1): at most three hash lookups.
#[inline(always)]
pub fn lookup(address: [u8; 4], port: [u8; 2], protocol: u8, sticky: Option<Sticky>) -> Lookup {
    let mut key = ServiceKey { address, port, slot: 0, protocol, scope: 0, _pad: [0; 2] };
    // SAFETY: the value is copied out at once; no reference outlives this statement.
    let Some(frontend) = (unsafe { KP_SERVICES.get(&key) }).copied() else {
        return Lookup::NotAService;
    };
    if frontend.count == 0 {
        return Lookup::NoBackend;
    }
    key.slot = match sticky {
        Some(s) if s.slot >= 1 && s.slot <= frontend.count => s.slot,
        // SAFETY: helper without arguments, always available to these program types.
        _ => select_slot(unsafe { bpf_get_prandom_u32() }, frontend.count),
    };
    // A slot or backend can be missing only for an instant while the agent shrinks a service
    // (it writes the smaller count first); treat that like a service without backends.
    // SAFETY: as above, values are copied out at once.
    let Some(mut slot) = (unsafe { KP_SERVICES.get(&key) }).copied() else {
        return Lookup::NoBackend;
    };
    if let Some(s) = sticky {
        if s.slot == key.slot && slot.backend_id != s.backend_id {
            // The sticky backend left its slot (removed or replaced): choose afresh.
            // SAFETY: as above.
            key.slot = select_slot(unsafe { bpf_get_prandom_u32() }, frontend.count);
            match unsafe { KP_SERVICES.get(&key) }.copied() {
                Some(v) => slot = v,
                None => return Lookup::NoBackend,
            }
        }
    }
    // SAFETY: as above.
    match unsafe { KP_BACKENDS.get(&slot.backend_id) }.copied() {
        Some(backend) => Lookup::Backend {
            backend,
            backend_id: slot.backend_id,
            slot: key.slot,
            service_id: frontend.service_id,
        },
        None => Lookup::NoBackend,
    }
}
