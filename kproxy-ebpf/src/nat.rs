//! Rewriting an address and port in place, with incremental IPv4 and L4 checksum updates.

use crate::packet::{self, Flow, Packet, IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF, L4_DST_PORT_OFF, L4_SRC_PORT_OFF};

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
        let csum = packet::read::<u16>(start, IP_CSUM_OFF).to_ne_bytes();
        packet::write(start, IP_CSUM_OFF, u16::from_ne_bytes(ip_csum_replace(csum, old_address, address)));
    }
    if flow.no_l4_csum {
        return Ok(());
    }
    let udp = flow.protocol == kproxy_common::PROTO_UDP;
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
    let complete = mangle(csum_replace(before, old_a, new_a), udp);
    let partial = mangle(csum_replace_partial(before, old_a, new_a), udp);
    if after == complete && after != partial {
        // As `inet_proto_csum_replace2` does for a complete checksum (not in the pseudo
        // header, so `skb->csum` of CHECKSUM_COMPLETE stays as it is).
        let csum = mangle(csum_replace(after, old_p as u32, new_p as u32), udp);
        let (start, end) = (ctx.data(), ctx.data_end());
        if start + flow.l4_csum_off + 2 > end {
            return Err(-1);
        }
        // SAFETY: bounds checked just above.
        unsafe { packet::write(start, flow.l4_csum_off, csum) };
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

/// The kernel's `csum_add` on 32-bit partial sums (end-around carry).
#[inline(always)]
fn csum_add(a: u32, b: u32) -> u32 {
    let (sum, carry) = a.overflowing_add(b);
    sum.wrapping_add(u32::from(carry))
}

/// The kernel's `csum_fold`: a 32-bit partial sum folded to 16 bits, complemented.
#[inline(always)]
fn csum_fold(sum: u32) -> u16 {
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// The kernel's `csum_replace4(sum, from, to)`, which `inet_proto_csum_replace4/2` apply to a
/// complete checksum (`from`, `to` as the helper gets them: bytes as in the packet, loaded in
/// the machine's order).
#[inline(always)]
fn csum_replace(sum: u16, from: u32, to: u32) -> u16 {
    csum_fold(csum_add(csum_add(!u32::from(sum), !from), to))
}

/// What `inet_proto_csum_replace4` does to a partial checksum for a pseudo header field.
#[inline(always)]
fn csum_replace_partial(sum: u16, from: u32, to: u32) -> u16 {
    !csum_fold(csum_add(csum_add(u32::from(sum), !from), to))
}

/// `BPF_F_MARK_MANGLED_0`: a UDP checksum that comes out 0 is written as 0xffff (0 means none).
#[inline(always)]
fn mangle(sum: u16, udp: bool) -> u16 {
    if udp && sum == 0 {
        0xffff
    } else {
        sum
    }
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
