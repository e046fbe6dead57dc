//! Rewriting an address and port in place, with incremental IPv4 and L4 checksum updates.

use aya_ebpf::programs::TcContext;

use crate::packet::{Flow, IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF, L4_DST_PORT_OFF, L4_SRC_PORT_OFF};

const BPF_F_PSEUDO_HDR: u64 = 1 << 4;
const BPF_F_MARK_MANGLED_0: u64 = 1 << 5;

/// Which end of the packet to rewrite.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum End {
    Source,
    Destination,
}

/// Rewrites the source or destination address and port to `address:port` (network order).
/// Errors are helper failures (the packet is then dropped by the caller).
#[inline(always)]
pub fn rewrite(ctx: &mut TcContext, flow: &Flow, end: End, address: [u8; 4], port: [u8; 2]) -> Result<(), i64> {
    let (old_address, old_port, address_off, port_off) = match end {
        End::Source => (flow.src_address, flow.src_port, IP_SRC_OFF, L4_SRC_PORT_OFF),
        End::Destination => (flow.dst_address, flow.dst_port, IP_DST_OFF, L4_DST_PORT_OFF),
    };
    let (old_a, new_a) = (u32::from_ne_bytes(old_address) as u64, u32::from_ne_bytes(address) as u64);
    let (old_p, new_p) = (u16::from_ne_bytes(old_port) as u64, u16::from_ne_bytes(port) as u64);
    if !flow.no_l4_csum {
        let mangled = if flow.protocol == kproxy_common::PROTO_UDP { BPF_F_MARK_MANGLED_0 } else { 0 };
        // The address is part of the pseudo header the L4 checksum covers.
        ctx.l4_csum_replace(flow.l4_csum_off, old_a, new_a, BPF_F_PSEUDO_HDR | mangled | 4)?;
        ctx.l4_csum_replace(flow.l4_csum_off, old_p, new_p, mangled | 2)?;
    }
    ctx.l3_csum_replace(IP_CSUM_OFF, old_a, new_a, 4)?;
    ctx.store(address_off, &address, 0)?;
    ctx.store(port_off, &port, 0)?;
    Ok(())
}
