//! kproxy's kernel programs: one thin entry point per hook over the shared modules.
#![no_std]
#![no_main]

mod conntrack;
mod icmp;
mod lb;
mod maps;
mod nat;
mod packet;
mod reject;
mod route;
mod sock;
mod svc_counters;
mod tc;

use aya_ebpf::{
    macros::{cgroup_sock_addr, classifier},
    programs::{SockAddrContext, TcContext},
};

/// TCP connect() and connected UDP: service → backend.
#[cgroup_sock_addr(connect4)]
pub fn kp_connect4(ctx: SockAddrContext) -> i32 {
    sock::forward(&ctx, sock::Affinity::None)
}

/// Unconnected UDP sendto()/sendmsg(): service → backend, per datagram, the same backend for
/// every datagram of a socket while that backend stays in the service.
#[cgroup_sock_addr(sendmsg4)]
pub fn kp_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::forward(&ctx, sock::Affinity::PerSocket)
}

/// UDP recvfrom()/recvmsg(): a reply from a backend appears to come from the service.
#[cgroup_sock_addr(recvmsg4)]
pub fn kp_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::reverse(&ctx)
}

/// getpeername(): a translated socket reports the service address.
#[cgroup_sock_addr(getpeername4)]
pub fn kp_getpeername4(ctx: SockAddrContext) -> i32 {
    sock::reverse(&ctx)
}

/// tc ingress on the node's devices: frontends reached from outside → backends.
#[classifier]
pub fn kp_tc_ingress(mut ctx: TcContext) -> i32 {
    tc::ingress(&mut ctx)
}

/// tc egress on the node's devices: replies of translated flows → from the frontend.
#[classifier]
pub fn kp_tc_egress(mut ctx: TcContext) -> i32 {
    tc::egress(&mut ctx)
}

/// An empty classifier, never attached: the baseline that tests and benchmarks compare the
/// per-packet cost of `kp_tc_ingress` with (BPF_PROG_TEST_RUN).
#[classifier]
pub fn kp_tc_baseline(_ctx: TcContext) -> i32 {
    0 // TC_ACT_OK
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
