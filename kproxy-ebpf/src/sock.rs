//! Socket-address translation shared by the cgroup sock_addr hooks: forward (service → backend,
//! at connect and sendmsg) and reverse (backend → service, at getpeername and recvmsg).

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::{bpf_get_socket_cookie, bpf_set_retval},
    programs::SockAddrContext,
};
use kproxy_common::sock::{SockRevNatKey, SockRevNatValue};

use crate::{
    lb::{self, Lookup},
    maps::KP_SOCK_REVNAT,
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

/// connect4 / sendmsg4: rewrite a service destination to a chosen backend and remember the
/// frontend for the reverse path. Anything that is not a frontend passes untouched.
#[inline(always)]
pub fn forward(ctx: &SockAddrContext) -> i32 {
    let d = dest(ctx);
    let protocol = sock_addr(ctx).protocol as u8;
    match lb::lookup(d.address, d.port, protocol) {
        Lookup::NotAService => ALLOW,
        Lookup::NoBackend => {
            // SAFETY: reading a constant global patched at load time.
            if unsafe { core::ptr::read_volatile(&KP_HAS_SET_RETVAL) } != 0 {
                // SAFETY: allowed in connect4 and sendmsg4 from Linux 5.18 (gated above).
                unsafe { bpf_set_retval(-ECONNREFUSED) };
            }
            REJECT
        }
        Lookup::Backend { backend, service_id } => {
            let key = SockRevNatKey {
                cookie: cookie(ctx),
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
