// SPDX-License-Identifier: MIT OR GPL-2.0-only
// (This program calls GPL-only kernel functions, so it is offered under the GPL too; the rest
// of kproxy is Apache-2.0.)
//! Socket termination: `iter/udp` and `iter/tcp` programs that destroy the sockets kproxy
//! translated to a backend that has since left its service (Linux >= 6.5: `bpf_sock_destroy`).
//!
//! The socket-level translation (`connect4`) writes the backend address into the socket, so a
//! connected UDP socket, or an established TCP connection, keeps talking to a backend after the
//! agent removed it. kube-proxy clears the conntrack entries of such UDP flows; kproxy destroys
//! the socket instead (as Cilium does), so the application sees `ECONNABORTED` and reconnects,
//! through the service, to a live backend.
//!
//! The agent fills `KP_SOCK_TERM` with (service id, backend) pairs, then opens these iterators
//! once per network namespace (an iterator walks the namespace of the thread that opens it),
//! then empties the map. A socket is destroyed when its peer is a listed backend over the
//! listed protocol *and* kproxy translated this very socket to that backend for that service,
//! as the socket's own storage (`KP_SOCK_LOCAL`) or, failing that, `KP_SOCK_REVNAT` records:
//! sockets that talk to a pod address directly are left alone.
//! Each destroyed socket writes one byte to the iterator's output, so the agent can count them.
//!
//! aya-ebpf has no `iter` macro and no kfunc declarations: the programs are plain functions in
//! `iter/*` sections and `bpf_sock_destroy` is an `extern` the linker leaves undefined; the
//! agent resolves the call against the running kernel's BTF before loading (aya 0.14 does not
//! relocate kfunc calls; see `kproxy/src/sockterm.rs`).
#![no_std]
#![no_main]

use core::ffi::c_void;

use aya_ebpf::{
    btf_maps::{HashMap, LruHashMap, SkStorage},
    helpers::{bpf_get_socket_cookie, bpf_seq_write, bpf_sk_storage_get, bpf_skc_to_tcp_sock},
    macros::btf_map,
};
use kproxy_common::{
    sock::{SockLocal, SockRevNatKey, SockRevNatValue, SockTermKey, SOCK_LOCAL_ENTRIES},
    PROTO_TCP, PROTO_UDP,
};

/// The socket reverse-NAT map of the main object (the agent reuses its pin): which backend
/// kproxy translated a socket to, and for which service.
#[btf_map]
static KP_SOCK_REVNAT: LruHashMap<SockRevNatKey, SockRevNatValue, 1024> = LruHashMap::new();

/// Each socket's own translations, the main object's socket-local storage (the agent reuses
/// its pin).
#[btf_map]
static KP_SOCK_LOCAL: SkStorage<SockLocal> = SkStorage::new();

/// (service id, backend, protocol) pairs whose sockets must go; filled and emptied by the agent.
#[btf_map]
static KP_SOCK_TERM: HashMap<SockTermKey, u8, 4096> = HashMap::new();

// Kernel function (Linux >= 6.5), resolved by the agent to its BTF id in vmlinux.
unsafe extern "C" {
    fn bpf_sock_destroy(sock: *mut c_void) -> i32;
}

/// `struct bpf_iter_meta`: only the seq_file pointer is used.
#[repr(C)]
pub struct BpfIterMeta {
    seq: *mut c_void,
    session_id: u64,
    seq_num: u64,
}

/// `struct bpf_iter__udp` (include/linux/udp.h, net/ipv4/udp.c).
#[repr(C)]
pub struct BpfIterUdp {
    meta: *mut BpfIterMeta,
    udp_sk: *mut c_void,
    uid: u32,
}

/// `struct bpf_iter__tcp` (net/ipv4/tcp_ipv4.c).
#[repr(C)]
pub struct BpfIterTcp {
    meta: *mut BpfIterMeta,
    sk_common: *mut c_void,
    uid: u32,
}

/// The head of `struct sock_common`, which starts every socket (`udp_sock`, `tcp_sock`,
/// timewait and request socks). Its layout has not changed since Linux 2.6.
#[repr(C)]
struct SockCommonHead {
    skc_daddr: u32,
    skc_rcv_saddr: u32,
    skc_hash: u32,
    skc_dport: u16,
    skc_num: u16,
    skc_family: u16,
    skc_state: u8,
}

const AF_INET: u16 = 2;

/// Destroys `sk` if kproxy translated it to a backend listed in `KP_SOCK_TERM` for `protocol`;
/// writes one byte to the iterator output per socket destroyed. `full` is the same socket as a
/// full-socket pointer, for its storage.
#[inline(always)]
fn terminate(meta: *mut BpfIterMeta, sk: *mut c_void, full: *mut c_void, protocol: u8) -> i32 {
    let head = sk as *const SockCommonHead;
    // SAFETY: `sk` is a non-null socket pointer from the iterator context (a PTR_TO_BTF_ID the
    // verifier checks every load against); the fields read are within `struct sock_common`.
    let (family, daddr, dport) = unsafe {
        (
            core::ptr::read_volatile(&(*head).skc_family),
            core::ptr::read_volatile(&(*head).skc_daddr),
            core::ptr::read_volatile(&(*head).skc_dport),
        )
    };
    if family != AF_INET || daddr == 0 {
        return 0; // not IPv4, or not connected
    }
    let address = daddr.to_ne_bytes();
    let port = dport.to_ne_bytes();
    let Some(service_id) = translated_for(sk, full, address, port) else { return 0 };
    let term_key = SockTermKey { service_id, address, port, protocol, _pad: 0 };
    // SAFETY: as above.
    if unsafe { KP_SOCK_TERM.get(&term_key) }.is_none() {
        return 0;
    }
    // SAFETY: `sk` is the trusted socket of the iterator context, which holds the socket's
    // lock as `bpf_sock_destroy` requires.
    if unsafe { bpf_sock_destroy(sk) } == 0 {
        let one: u8 = protocol;
        // SAFETY: `meta` is the non-null iterator meta of the context; one byte is written
        // from a stack variable.
        unsafe {
            let seq = core::ptr::read_volatile(&(*meta).seq);
            bpf_seq_write(seq.cast(), (&one as *const u8).cast(), 1);
        }
    }
    0
}

/// The service id kproxy translated `sk` (`full`, as a full socket) to `address:port` (its
/// peer) for: from the socket's own storage, else from the LRU map.
#[inline(always)]
fn translated_for(sk: *mut c_void, full: *mut c_void, address: [u8; 4], port: [u8; 2]) -> Option<u32> {
    let map = core::ptr::from_ref(&KP_SOCK_LOCAL).cast_mut().cast::<c_void>();
    // SAFETY: `map` is the socket-storage map; `full` a full socket (`struct udp_sock` or
    // `struct tcp_sock`, both starting with `struct sock`); no value, no flags: only an
    // existing storage is returned.
    let local = unsafe { bpf_sk_storage_get(map, full, core::ptr::null_mut(), 0) }.cast::<SockLocal>();
    if !local.is_null() {
        for i in 0..SOCK_LOCAL_ENTRIES {
            // SAFETY: a non-null storage value from the helper, valid for this program run.
            let e = unsafe { &(*local).entries[i] };
            if e.protocol != 0 && e.backend_address == address && e.backend_port == port {
                return Some(e.service_id);
            }
        }
    }
    // SAFETY: the helper takes any socket pointer (ARG_PTR_TO_BTF_ID_SOCK_COMMON).
    let cookie = unsafe { bpf_get_socket_cookie(sk) };
    let revnat_key = SockRevNatKey { cookie, address, port, _pad: [0; 2] };
    // SAFETY: the value is only read, within this program run.
    unsafe { KP_SOCK_REVNAT.get(&revnat_key) }.map(|v| v.service_id)
}

/// `iter/udp`: every UDP socket of the network namespace that opened the iterator.
///
/// # Safety
/// Called by the kernel only, with `ctx` a valid `struct bpf_iter__udp`.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/udp")]
pub unsafe extern "C" fn kp_sockterm_udp(ctx: *mut BpfIterUdp) -> i32 {
    // SAFETY: the kernel passes a valid `bpf_iter__udp`; `udp_sk` is NULL at the end of a walk.
    let (meta, sk) = unsafe { ((*ctx).meta, (*ctx).udp_sk) };
    if sk.is_null() || meta.is_null() {
        return 0;
    }
    terminate(meta, sk, sk, PROTO_UDP)
}

/// `iter/tcp`: every TCP socket of the network namespace that opened the iterator (listening,
/// established, timewait and request socks; only full sockets are considered).
///
/// # Safety
/// Called by the kernel only, with `ctx` a valid `struct bpf_iter__tcp`.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
pub unsafe extern "C" fn kp_sockterm_tcp(ctx: *mut BpfIterTcp) -> i32 {
    // SAFETY: the kernel passes a valid `bpf_iter__tcp`; `sk_common` is NULL at the end.
    let (meta, sk) = unsafe { ((*ctx).meta, (*ctx).sk_common) };
    if sk.is_null() || meta.is_null() {
        return 0;
    }
    // Timewait and request socks have no `sk_prot`, which `bpf_sock_destroy` dereferences.
    // SAFETY: the helper takes any socket pointer and returns NULL for non-full TCP sockets.
    let tcp = unsafe { bpf_skc_to_tcp_sock(sk) };
    if tcp.is_null() {
        return 0;
    }
    // The socket storage helper takes a full socket, not the `sock_common` of the context;
    // `bpf_sock_destroy` wants the context's own (trusted) pointer.
    terminate(meta, sk, tcp.cast(), PROTO_TCP)
}

/// `bpf_sock_destroy` and `bpf_seq_write` are GPL-only in the kernel; the object must declare
/// a GPL-compatible license to be loaded.
#[unsafe(no_mangle)]
#[unsafe(link_section = "license")]
pub static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
