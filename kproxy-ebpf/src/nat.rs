//! Rewriting an address and port in place, with incremental IPv4 and L4 checksum updates (the
//! arithmetic is `kproxy_common::csum`'s).

use kproxy_common::{
    csum,
    wire::{IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF, L4_DST_PORT_OFF, L4_SRC_PORT_OFF, PROTO_UDP},
};

use crate::packet::{self, Flow, Packet};

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
    // just above; see `packet::read` for the alignment.
    unsafe {
        packet::write(start, address_off, u32::from_ne_bytes(address));
        packet::write(start, port_off, u16::from_ne_bytes(port));
        // The IPv4 header checksum is always complete in the header (unlike the L4 one, which
        // may be partial): updated here rather than by a helper call.
        let sum = packet::read::<u16>(start, IP_CSUM_OFF).to_ne_bytes();
        packet::write(start, IP_CSUM_OFF, u16::from_ne_bytes(csum::ip_replace4(sum, old_address, address)));
    }
    if flow.no_l4_csum {
        return Ok(());
    }
    let udp = flow.protocol == PROTO_UDP;
    let mangled = if udp { BPF_F_MARK_MANGLED_0 } else { 0 };
    // The L4 checksum needs the helper: only the kernel knows whether it is complete in the
    // packet or partial (CHECKSUM_PARTIAL, a locally generated packet whose checksum the
    // device or the stack finishes; its field then holds the pseudo header's sum, which the
    // port is not part of). One call for the address tells which (below), so that the port
    // is done inline rather than by a second call.
    let Some(before) = l4_csum(ctx, flow.l4_csum_off) else { return Err(-1) };
    // The address is part of the pseudo header the L4 checksum covers.
    ctx.l4_csum_replace(flow.l4_csum_off, old_a, new_a, BPF_F_PSEUDO_HDR | mangled | 4)?;
    let Some(after) = l4_csum(ctx, flow.l4_csum_off) else { return Err(-1) };
    let (old_a, new_a) = (old_a as u32, new_a as u32);
    let complete = csum::mangle_udp(csum::replace4(before, old_a, new_a), udp);
    let partial = csum::mangle_udp(csum::replace4_partial(before, old_a, new_a), udp);
    if after == complete && after != partial {
        // As `inet_proto_csum_replace2` does for a complete checksum (not in the pseudo
        // header, so `skb->csum` of CHECKSUM_COMPLETE stays as it is).
        let sum = csum::mangle_udp(csum::replace4(after, old_p as u32, new_p as u32), udp);
        let (start, end) = (ctx.data(), ctx.data_end());
        if start + flow.l4_csum_off + 2 > end {
            return Err(-1);
        }
        // SAFETY: bounds checked just above.
        unsafe { packet::write(start, flow.l4_csum_off, sum) };
    } else if after != partial || after == complete {
        // Not told apart (the address change does not move the checksum, e.g. an address
        // mapped to itself): the helper, which knows.
        ctx.l4_csum_replace(flow.l4_csum_off, old_p, new_p, mangled | 2)?;
    }
    // Else a partial checksum: the kernel leaves it alone for a change outside the pseudo
    // header, and so does this.
    Ok(())
}

/// The L4 checksum field at `offset` (as in the packet), by direct access; `None` if not in
/// the linear data (`parse` checked that it is).
#[inline(always)]
fn l4_csum<P: Packet>(ctx: &P, offset: usize) -> Option<u16> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + offset + 2 > end {
        return None;
    }
    // SAFETY: bounds checked just above.
    Some(unsafe { packet::read::<u16>(start, offset) })
}
