//! Which of the node's devices leads to a backend: a FIB lookup, so that flows to backends on
//! other nodes are source-translated (see `kproxy_common::nat`).

use aya_ebpf::{bindings::bpf_fib_lookup as FibLookup, helpers::bpf_fib_lookup, EbpfContext};
use kproxy_common::nat::Device;

use crate::{maps::KP_DEVICES, packet::Flow};

const AF_INET: u8 = 2;
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;
/// The route exists but the next hop's MAC is not resolved yet: the device is still known.
const BPF_FIB_LKUP_RET_NO_NEIGH: i64 = 7;

/// The arguments and results of `bpf_fib_lookup` (`struct bpf_fib_lookup`, 64 bytes since
/// Linux 4.18): declared flat here because the generated binding's unions differ by kernel
/// version while the layout of the fields used does not.
#[repr(C)]
#[derive(Default)]
struct FibParams {
    family: u8,
    l4_protocol: u8,
    sport: [u8; 2],
    dport: [u8; 2],
    /// In: IP total length for an MTU check (0: none). Out: the MTU when it fails.
    tot_len: u16,
    /// In: the device the packet arrived on. Out: the device that leads to `dst`.
    ifindex: u32,
    tos: u32,
    src: [u32; 4],
    dst: [u32; 4],
    h_vlan_proto: u16,
    h_vlan_tci: u16,
    smac: [u8; 6],
    dmac: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<FibParams>() == 64);
const _: () = assert!(core::mem::size_of::<FibParams>() == core::mem::size_of::<FibLookup>());

/// The kproxy device (with its SNAT address) through which the node would forward `flow`'s
/// packet once its destination is `backend`; `None` if the backend is reached any other way
/// (a local pod's veth or bridge, a local address) or is unreachable.
#[inline(always)]
pub fn device_towards<C: EbpfContext>(ctx: &C, ingress_ifindex: u32, flow: &Flow, backend: ([u8; 4], [u8; 2])) -> Option<Device> {
    let mut params = FibParams {
        family: AF_INET,
        l4_protocol: flow.protocol,
        sport: flow.src_port,
        dport: backend.1,
        ifindex: ingress_ifindex,
        src: [u32::from_ne_bytes(flow.src_address), 0, 0, 0],
        dst: [u32::from_ne_bytes(backend.0), 0, 0, 0],
        ..Default::default()
    };
    // SAFETY: `params` is a live, writable 64-byte `struct bpf_fib_lookup` (size asserted
    // above) and `ctx` the program's own context.
    let rc = unsafe {
        bpf_fib_lookup(ctx.as_ptr(), (&mut params as *mut FibParams).cast(), core::mem::size_of::<FibParams>() as i32, 0)
    };
    if rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH {
        return None;
    }
    // SAFETY: the value is copied out at once.
    unsafe { KP_DEVICES.get(&params.ifindex) }.copied()
}
