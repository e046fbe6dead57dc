//! Rewriting an address and port in place, with incremental IPv4 and L4 checksum updates.

use crate::packet::{Flow, Packet, IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF, L4_DST_PORT_OFF, L4_SRC_PORT_OFF};

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
pub fn rewrite<P: Packet>(ctx: &mut P, flow: &Flow, end: End, address: [u8; 4], port: [u8; 2]) -> Result<(), i64> {
    let (old_address, old_port, address_off, port_off) = match end {
        End::Source => (flow.src_address, flow.src_port, IP_SRC_OFF, L4_SRC_PORT_OFF),
        End::Destination => (flow.dst_address, flow.dst_port, IP_DST_OFF, L4_DST_PORT_OFF),
    };
    let (old_a, new_a) = (u32::from_ne_bytes(old_address) as u64, u32::from_ne_bytes(address) as u64);
    let (old_p, new_p) = (u16::from_ne_bytes(old_port) as u64, u16::from_ne_bytes(port) as u64);
    // The new address and port first, by direct packet access (`parse` has checked that the
    // headers are in the linear part): the checksum helpers below invalidate packet pointers.
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + L4_DST_PORT_OFF + 2 > end {
        return Err(-1);
    }
    // SAFETY: every access ends at or before L4_DST_PORT_OFF + 2, within the bounds checked
    // just above; unaligned, since packet data has no alignment.
    unsafe {
        core::ptr::write_unaligned((start + address_off) as *mut [u8; 4], address);
        core::ptr::write_unaligned((start + port_off) as *mut [u8; 2], port);
        // The IPv4 header checksum is always complete in the header (unlike the L4 one, which
        // may be partial): updated here rather than by a helper call.
        let csum = (start + IP_CSUM_OFF) as *mut [u8; 2];
        core::ptr::write_unaligned(csum, ip_csum_replace(core::ptr::read_unaligned(csum), old_address, address));
    }
    if !flow.no_l4_csum {
        let mangled = if flow.protocol == kproxy_common::PROTO_UDP { BPF_F_MARK_MANGLED_0 } else { 0 };
        // The address is part of the pseudo header the L4 checksum covers.
        ctx.l4_csum_replace(flow.l4_csum_off, old_a, new_a, BPF_F_PSEUDO_HDR | mangled | 4)?;
        ctx.l4_csum_replace(flow.l4_csum_off, old_p, new_p, mangled | 2)?;
    }
    Ok(())
}

/// The IPv4 header checksum `csum` (as in the header) after a 4-byte field changed from `old`
/// to `new`: RFC 1624's incremental update, HC' = ~(~HC + ~m + m'), in 16-bit words.
#[inline(always)]
pub fn ip_csum_replace(csum: [u8; 2], old: [u8; 4], new: [u8; 4]) -> [u8; 2] {
    let word = |b: [u8; 4], i: usize| u32::from(u16::from_be_bytes([b[i], b[i + 1]]));
    let mut sum = u32::from(!u16::from_be_bytes(csum));
    sum += u32::from(!(word(old, 0) as u16)) + u32::from(!(word(old, 2) as u16));
    sum += word(new, 0) + word(new, 2);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    (!(sum as u16)).to_be_bytes()
}
