//! Socket-address translation shared by the cgroup sock_addr hooks: forward (service → backend,
//! at connect and sendmsg) and reverse (backend → service, at getpeername and recvmsg).

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    programs::SockAddrContext,
};
use kproxy_common::{
    lb::AFFINITY_NETNS,
    sock::{SockAffinityKey, SockAffinityValue, SockRevNatKey, SockRevNatValue},
};

use crate::{
    lb::{self, Client, Lookup, Origin, Sticky},
    maps::{KP_SOCK_AFFIN, KP_SOCK_REVNAT},
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
    let sticky = match affinity {
        Affinity::None => None,
        // SAFETY: the value is copied out at once.
        Affinity::PerSocket => unsafe { KP_SOCK_AFFIN.get(&affinity_key) }
            .map(|v| Sticky { slot: v.slot, backend_id: v.backend_id }),
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
            let unchanged = sticky.is_some_and(|s| s.slot == slot && s.backend_id == backend_id);
            if affinity == Affinity::PerSocket && !unchanged {
                let value = SockAffinityValue { backend_id, slot, _pad: 0 };
                // Best effort, like the reverse entry below.
                let _ = KP_SOCK_AFFIN.insert(&affinity_key, &value, 0);
            }
            let key = SockRevNatKey {
                cookie,
                address: backend.address,
                port: backend.port,
                _pad: [0; 2],
            };
            let value =
                SockRevNatValue { address: d.address, port: d.port, _pad: [0; 2], service_id };
            // If the LRU map cannot take the entry the connection still works; only
            // getpeername and the source of UDP replies would show the backend.
            let _ = KP_SOCK_REVNAT.insert(&key, &value, 0);
            set_dest(ctx, backend.address, backend.port);
            ALLOW
        }
    }
}

/// getpeername4 / recvmsg4: if this socket talks to a backend on behalf of a frontend, show the
/// frontend. Never rejects.
#[inline(always)]
pub fn reverse(ctx: &SockAddrContext) -> i32 {
    let d = dest(ctx);
    let key = SockRevNatKey { cookie: cookie(ctx), address: d.address, port: d.port, _pad: [0; 2] };
    // SAFETY: the value is copied out at once.
    if let Some(front) = unsafe { KP_SOCK_REVNAT.get(&key) }.copied() {
        set_dest(ctx, front.address, front.port);
    }
    ALLOW
}
