//! Socket-address translation shared by the cgroup sock_addr hooks: forward (service → backend,
//! at connect and sendmsg) and reverse (backend → service, at getpeername and recvmsg).
//!
//! What a translation is recorded in, the socket's own storage first and the shared LRU maps
//! for what does not fit there, is described in `kproxy_common::sock`.

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    programs::SockAddrContext,
};
use kproxy_common::{
    lb::AFFINITY_NETNS,
    sock::{
        SockAffinityKey, SockAffinityValue, SockLocal, SockRevNatKey, SockRevNatValue, SockTranslation,
        SOCK_LOCAL_ENTRIES, SOCK_STAT_AFFINITY_NEW, SOCK_STAT_LOCAL, SOCK_STAT_LOCAL_FULL, SOCK_STAT_REVNAT_NEW,
    },
};

use crate::{
    lb::{self, Client, Lookup, Origin, Sticky},
    maps::{self, KP_SOCK_AFFIN, KP_SOCK_LOCAL, KP_SOCK_REVNAT, KP_SOCK_STATS},
};

/// Verdicts of cgroup sock_addr programs.
pub const ALLOW: i32 = 1;
pub const REJECT: i32 = 0;

const ECONNREFUSED: i32 = 111;

/// Set by the agent at load time to 1 when the kernel has `bpf_set_retval` (Linux >= 5.18).
/// Without it a refused connect fails with `EPERM` instead of `ECONNREFUSED`. The verifier
/// sees the constant and prunes the helper call on kernels that lack it.
#[unsafe(no_mangle)]
static KP_HAS_SET_RETVAL: u8 = 0;

/// Set by the agent at load time to 1 when these programs may use socket-local storage
/// (`bpf_sk_storage_get` in cgroup sock_addr programs, Linux >= 5.3; the agent probes it, and
/// `kproxy run --socket-storage=false` keeps it 0). With 0 the verifier prunes every use of it
/// and every translation goes to the shared LRU maps.
#[unsafe(no_mangle)]
static KP_HAS_SK_STORAGE: u8 = 0;

#[inline(always)]
fn sk_storage() -> bool {
    // SAFETY: reading a constant global patched at load time.
    unsafe { core::ptr::read_volatile(&KP_HAS_SK_STORAGE) != 0 }
}

/// Adds one to counter `index` of `KP_SOCK_STATS`.
#[inline(always)]
fn count(index: u32) {
    maps::count(&KP_SOCK_STATS, index);
}

/// The socket's own translations, if it has storage for them (never without
/// `KP_HAS_SK_STORAGE`); null otherwise.
#[inline(always)]
fn local(ctx: &SockAddrContext) -> *mut SockLocal {
    if !sk_storage() {
        return core::ptr::null_mut();
    }
    // SAFETY: `ctx.sk` is the socket of the running hook (a full socket, PTR_TO_SOCKET).
    unsafe { KP_SOCK_LOCAL.get_ptr_mut(ctx) }
}

/// The index of the entry of `local` for the frontend `address:port`, if there is one.
#[inline(always)]
fn find_frontend(local: *mut SockLocal, address: [u8; 4], port: [u8; 2]) -> Option<usize> {
    for i in 0..SOCK_LOCAL_ENTRIES {
        // SAFETY: `local` is a non-null storage value from the helper, valid for this run.
        let e = unsafe { &(*local).entries[i] };
        if e.protocol != 0 && e.frontend_address == address && e.frontend_port == port {
            return Some(i);
        }
    }
    None
}

/// Records `t` in the socket's own storage (`local`, or null if the caller has not looked it
/// up), creating it: in the entry of its frontend, else in the first unused one. False if there
/// is no room (the socket talks to `SOCK_LOCAL_ENTRIES` other frontends) or no storage (none in
/// this kernel, or the kernel could not allocate it): the caller then writes the LRU maps.
#[inline(always)]
fn store_local(ctx: &SockAddrContext, mut local: *mut SockLocal, t: &SockTranslation) -> bool {
    if !sk_storage() {
        return false;
    }
    if local.is_null() {
        // SAFETY: as in `local`; the new storage is zero-initialised (no value passed).
        local = unsafe { KP_SOCK_LOCAL.get_or_insert_ptr_mut(ctx, None) };
        if local.is_null() {
            return false;
        }
    }
    let index = match find_frontend(local, t.frontend_address, t.frontend_port) {
        Some(i) => i,
        None => {
            let mut free = SOCK_LOCAL_ENTRIES;
            for i in 0..SOCK_LOCAL_ENTRIES {
                // SAFETY: as in `find_frontend`.
                if free == SOCK_LOCAL_ENTRIES && unsafe { (*local).entries[i].protocol } == 0 {
                    free = i;
                }
            }
            if free == SOCK_LOCAL_ENTRIES {
                return false;
            }
            count(SOCK_STAT_LOCAL);
            free
        }
    };
    // SAFETY: `index` < SOCK_LOCAL_ENTRIES, within the storage value. The hooks that write run
    // under the socket's lock; a reader (recvmsg, getpeername) that races with an in-place
    // rewrite sees the frontend, which an entry never changes, whichever half it reads. A new
    // entry's protocol, its "in use" mark, is written last: the entry first with the protocol
    // it has (0 when new), then the protocol, both volatile so that they stay in this order
    // (the BPF backend has no compiler fence).
    unsafe {
        let e: *mut SockTranslation = &mut (*local).entries[index];
        if *e != *t {
            core::ptr::write_volatile(e, SockTranslation { protocol: (*e).protocol, ..*t });
            core::ptr::write_volatile(&mut (*e).protocol, t.protocol);
        }
    }
    true
}

/// The parts of `bpf_sock_addr` the translation works on, in network order.
struct Dest {
    address: [u8; 4],
    port: [u8; 2],
}

#[inline(always)]
fn sock_addr(ctx: &SockAddrContext) -> &bpf_sock_addr {
    // SAFETY: the kernel passes a valid `bpf_sock_addr` for the whole program run.
    unsafe { &*ctx.sock_addr }
}

#[inline(always)]
fn dest(ctx: &SockAddrContext) -> Dest {
    let sa = sock_addr(ctx);
    // user_ip4 holds the address in network order; user_port the port in network order in its
    // low 16 bits. On little-endian BPF, native bytes are exactly the wire bytes.
    Dest { address: sa.user_ip4.to_ne_bytes(), port: (sa.user_port as u16).to_ne_bytes() }
}

#[inline(always)]
fn set_dest(ctx: &SockAddrContext, address: [u8; 4], port: [u8; 2]) {
    // SAFETY: writes to user_ip4/user_port are allowed in every hook that calls this.
    unsafe {
        (*ctx.sock_addr).user_ip4 = u32::from_ne_bytes(address);
        (*ctx.sock_addr).user_port = u16::from_ne_bytes(port) as u32;
    }
}

#[inline(always)]
fn cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: the helper takes the program context, which is what we pass.
    unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) }
}

/// Whether the forward translation keeps a socket on the backend it chose before.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Affinity {
    /// connect4: a connected socket is translated once, nothing to remember.
    None,
    /// sendmsg4: every datagram of an unconnected socket is translated; keep them on one
    /// backend per frontend, as kube-proxy's conntrack entry does.
    PerSocket,
}

/// connect4 / sendmsg4: rewrite a service destination to a chosen backend and remember the
/// frontend for the reverse path. Anything that is not a frontend passes untouched.
#[inline(always)]
pub fn forward(ctx: &SockAddrContext, affinity: Affinity) -> i32 {
    let d = dest(ctx);
    let protocol = sock_addr(ctx).protocol as u8;
    let cookie = cookie(ctx);
    let affinity_key =
        SockAffinityKey { cookie, address: d.address, port: d.port, protocol, _pad: 0 };
    // connect4 needs the storage only to write it (`store_local` finds or creates it then).
    let local = if affinity == Affinity::PerSocket { local(ctx) } else { core::ptr::null_mut() };
    // The backend this socket used for this frontend before: from its own storage, else from
    // the LRU map (where it went if it did not fit, or where an older agent put it).
    let mut in_lru = false;
    let sticky = match affinity {
        Affinity::None => None,
        Affinity::PerSocket => {
            let found = if local.is_null() { None } else { find_frontend(local, d.address, d.port) };
            match found {
                // SAFETY: `i` indexes an entry of the non-null storage value.
                Some(i) => unsafe {
                    let e = &(*local).entries[i];
                    Some(Sticky { slot: e.slot, backend_id: e.backend_id })
                },
                // SAFETY: the value is copied out at once.
                None => unsafe { KP_SOCK_AFFIN.get(&affinity_key) }.map(|v| {
                    in_lru = true;
                    Sticky { slot: v.slot, backend_id: v.backend_id }
                }),
            }
        }
    };
    // Session affinity is per client; on the socket path the client is the socket's network
    // namespace (a pod, or the node), which is what its source address would tell kube-proxy.
    // SAFETY: the helper takes the program context, which is what we pass (Linux >= 5.7).
    let client = Client { id: unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) }.to_ne_bytes(), kind: AFFINITY_NETNS };
    match lb::lookup(d.address, d.port, protocol, sticky, client, Origin::InCluster) {
        Lookup::NotAService => ALLOW,
        Lookup::NoBackend { .. } => {
            // SAFETY: reading a constant global patched at load time.
            if unsafe { core::ptr::read_volatile(&KP_HAS_SET_RETVAL) } != 0 {
                // SAFETY: allowed in connect4 and sendmsg4 from Linux 5.18 (gated above).
                unsafe { bpf_set_retval(-ECONNREFUSED) };
            }
            REJECT
        }
        Lookup::Backend { backend, backend_id, slot, service_id, .. } => {
            let translation = SockTranslation {
                frontend_address: d.address,
                frontend_port: d.port,
                backend_port: backend.port,
                backend_address: backend.address,
                service_id,
                backend_id,
                slot,
                protocol,
                _pad: 0,
            };
            if !store_local(ctx, local, &translation) {
                if sk_storage() {
                    count(SOCK_STAT_LOCAL_FULL);
                }
                store_lru(&affinity_key, affinity, sticky, in_lru, &translation);
            }
            set_dest(ctx, backend.address, backend.port);
            ALLOW
        }
    }
}

/// Records `t` in the shared LRU maps: the per-socket affinity (sendmsg4, when it changed) and
/// the reverse translation (when it changed), counting the new keys. Best effort: if the LRU
/// maps cannot take an entry the connection still works; only getpeername and the source of
/// UDP replies would show the backend (and an unconnected socket could change backends).
#[inline(always)]
fn store_lru(key: &SockAffinityKey, affinity: Affinity, sticky: Option<Sticky>, in_lru: bool, t: &SockTranslation) {
    let unchanged = in_lru && sticky.is_some_and(|s| s.slot == t.slot && s.backend_id == t.backend_id);
    if affinity == Affinity::PerSocket && !unchanged {
        let value = SockAffinityValue { backend_id: t.backend_id, slot: t.slot, _pad: 0 };
        if KP_SOCK_AFFIN.insert(key, &value, 0).is_ok() && !in_lru {
            count(SOCK_STAT_AFFINITY_NEW);
        }
    }
    let key = SockRevNatKey { cookie: key.cookie, address: t.backend_address, port: t.backend_port, _pad: [0; 2] };
    let value = SockRevNatValue { address: t.frontend_address, port: t.frontend_port, _pad: [0; 2], service_id: t.service_id };
    // SAFETY: the value is copied out at once.
    let old = unsafe { KP_SOCK_REVNAT.get(&key) }.copied();
    if old != Some(value) && KP_SOCK_REVNAT.insert(&key, &value, 0).is_ok() && old.is_none() {
        count(SOCK_STAT_REVNAT_NEW);
    }
}

/// getpeername4 / recvmsg4: if this socket talks to a backend on behalf of a frontend, show the
/// frontend: as its own storage says, else as the LRU map says. Never rejects.
#[inline(always)]
pub fn reverse(ctx: &SockAddrContext) -> i32 {
    let d = dest(ctx);
    let local = local(ctx);
    if !local.is_null() {
        for i in 0..SOCK_LOCAL_ENTRIES {
            // SAFETY: `local` is a non-null storage value from the helper, valid for this run.
            let e = unsafe { &(*local).entries[i] };
            if e.protocol != 0 && e.backend_address == d.address && e.backend_port == d.port {
                set_dest(ctx, e.frontend_address, e.frontend_port);
                return ALLOW;
            }
        }
    }
    let key = SockRevNatKey { cookie: cookie(ctx), address: d.address, port: d.port, _pad: [0; 2] };
    // SAFETY: the value is copied out at once.
    if let Some(front) = unsafe { KP_SOCK_REVNAT.get(&key) }.copied() {
        set_dest(ctx, front.address, front.port);
    }
    ALLOW
}
