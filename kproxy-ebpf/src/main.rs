//! kproxy's kernel programs: one thin entry point per hook over the shared modules.
#![no_std]
#![no_main]

mod lb;
mod maps;
mod sock;

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
