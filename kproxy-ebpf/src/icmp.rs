//! ICMP errors about translated flows: a router that cannot forward a translated packet (too
//! big with DF set — path MTU discovery —, TTL exceeded, unreachable) answers to the address
//! the packet carried, quoting its headers. The error is translated like a reply of the quoted
//! packet, so that it reaches the socket that really sent it:
//!
//! - at ingress, an error about a packet this node sent with a translated source (a backend's
//!   reply leaving as the frontend, or a request leaving with the node's SNAT address) goes
//!   to that packet's real sender: outer destination and quoted source rewritten by the
//!   conntrack entry a reply would match; for a source-translated flow, the quoted
//!   destination becomes the node's address and port that the backend knows;
//! - at egress, an error a backend sends about a client's packet leaves as the frontend's:
//!   quoted destination (and the outer source, when it is the backend) rewritten.
//!
//! The quoted IPv4 header checksum and the ICMP checksum are updated; the quoted TCP/UDP
//! checksum is left alone (a quote is usually truncated, and receivers do not check it).

use aya_ebpf::{bindings::TC_ACT_OK, programs::TcContext};
use kproxy_common::{
    ct::{CT_EGRESS, CT_INGRESS},
    drops::DropReason,
    wire::{
        ETH_HLEN, ETH_P_IP, ETH_TYPE_OFF, ICMP_CSUM_OFF, ICMP_DEST_UNREACH, ICMP_ERROR_MIN_LEN, ICMP_TIME_EXCEEDED,
        INNER_CSUM_OFF, INNER_DPORT_OFF, INNER_DST_OFF, INNER_OFF, INNER_PROTO_OFF, INNER_SPORT_OFF, INNER_SRC_OFF,
        IP_CSUM_OFF, IP_DST_OFF, IP_FRAG_MASK, IP_FRAG_OFF, IP_PROTO_OFF, IP_SRC_OFF, IP_VERSION_IHL, L4_OFF, PROTO_ICMP,
        PROTO_TCP, PROTO_UDP,
    },
};

use crate::{
    conntrack,
    packet::{read, Packet},
};

/// The hook the error is seen at.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Ingress,
    Egress,
}

/// An ICMP error quoting a TCP or UDP packet. Addresses and ports in network order.
struct IcmpError {
    outer_src: [u8; 4],
    outer_dst: [u8; 4],
    inner_src: ([u8; 4], [u8; 2]),
    inner_dst: ([u8; 4], [u8; 2]),
    inner_protocol: u8,
}

#[inline(always)]
fn parse<P: Packet>(ctx: &P) -> Option<IcmpError> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + ICMP_ERROR_MIN_LEN > end {
        return None;
    }
    // SAFETY: every read ends below ICMP_ERROR_MIN_LEN, checked above.
    unsafe {
        if u16::from_be(read::<u16>(start, ETH_TYPE_OFF)) != ETH_P_IP
            || read::<u8>(start, ETH_HLEN) != IP_VERSION_IHL
            || read::<u8>(start, IP_PROTO_OFF) != PROTO_ICMP
            || u16::from_be(read::<u16>(start, IP_FRAG_OFF)) & IP_FRAG_MASK != 0
        {
            return None;
        }
        let icmp_type = read::<u8>(start, L4_OFF);
        if icmp_type != ICMP_DEST_UNREACH && icmp_type != ICMP_TIME_EXCEEDED {
            return None;
        }
        let inner_protocol = read::<u8>(start, INNER_PROTO_OFF);
        if read::<u8>(start, INNER_OFF) != IP_VERSION_IHL || (inner_protocol != PROTO_TCP && inner_protocol != PROTO_UDP) {
            return None;
        }
        Some(IcmpError {
            outer_src: read(start, IP_SRC_OFF),
            outer_dst: read(start, IP_DST_OFF),
            inner_src: (read(start, INNER_SRC_OFF), read(start, INNER_SPORT_OFF)),
            inner_dst: (read(start, INNER_DST_OFF), read(start, INNER_DPORT_OFF)),
            inner_protocol,
        })
    }
}

/// Rewrites the quoted source or destination from `old` to `new`, with the quoted header's
/// checksum and the ICMP checksum (which covers the quote, that checksum included).
#[inline(always)]
fn rewrite_quoted<P: Packet>(ctx: &mut P, source: bool, old: ([u8; 4], [u8; 2]), new: ([u8; 4], [u8; 2])) -> Result<(), i64> {
    let (address_off, port_off) = if source { (INNER_SRC_OFF, INNER_SPORT_OFF) } else { (INNER_DST_OFF, INNER_DPORT_OFF) };
    let (old_a, new_a) = (u32::from_ne_bytes(old.0) as u64, u32::from_ne_bytes(new.0) as u64);
    let (old_p, new_p) = (u16::from_ne_bytes(old.1) as u64, u16::from_ne_bytes(new.1) as u64);
    let old_csum = ctx.load::<u16>(INNER_CSUM_OFF)? as u64;
    ctx.l3_csum_replace(INNER_CSUM_OFF, old_a, new_a, 4)?;
    let new_csum = ctx.load::<u16>(INNER_CSUM_OFF)? as u64;
    ctx.store(address_off, &new.0)?;
    ctx.store(port_off, &new.1)?;
    ctx.l4_csum_replace(ICMP_CSUM_OFF, old_a, new_a, 4)?;
    ctx.l4_csum_replace(ICMP_CSUM_OFF, old_p, new_p, 2)?;
    ctx.l4_csum_replace(ICMP_CSUM_OFF, old_csum, new_csum, 2)?;
    Ok(())
}

/// Rewrites the outer source or destination address (the ICMP checksum does not cover it).
#[inline(always)]
fn rewrite_outer<P: Packet>(ctx: &mut P, source: bool, old: [u8; 4], new: [u8; 4]) -> Result<(), i64> {
    ctx.l3_csum_replace(IP_CSUM_OFF, u32::from_ne_bytes(old) as u64, u32::from_ne_bytes(new) as u64, 4)?;
    ctx.store(if source { IP_SRC_OFF } else { IP_DST_OFF }, &new)
}

/// Translates an ICMP error about a tracked flow (see the module documentation). `Ok` with
/// nothing changed for anything else.
#[inline(always)]
fn translate<P: Packet>(ctx: &mut P, hook: Hook) -> Result<(), i64> {
    let Some(e) = parse(ctx) else { return Ok(()) };
    // The entry a reply to the quoted packet would match at this hook.
    let direction = if hook == Hook::Ingress { CT_INGRESS } else { CT_EGRESS };
    let reply = conntrack::key(e.inner_dst, e.inner_src, e.inner_protocol, direction);
    let Some(entry) = conntrack::lookup(&reply) else { return Ok(()) };
    let to = entry.nat();
    match hook {
        Hook::Ingress => {
            rewrite_quoted(ctx, true, e.inner_src, to)?;
            if e.outer_dst == e.inner_src.0 {
                rewrite_outer(ctx, false, e.outer_dst, to.0)?;
            }
            // A source-translated flow: the backend knows its peer as the node's address.
            let snat = conntrack::key(e.inner_dst, to, e.inner_protocol, CT_EGRESS);
            if let Some(entry) = conntrack::lookup(&snat) {
                rewrite_quoted(ctx, false, e.inner_dst, entry.nat())?;
            }
        }
        Hook::Egress => {
            rewrite_quoted(ctx, false, e.inner_dst, to)?;
            if e.outer_src == e.inner_dst.0 {
                rewrite_outer(ctx, true, e.outer_src, to.0)?;
            }
        }
    }
    Ok(())
}

/// The tc verdict for a packet that is not TCP or UDP: translated if it is an ICMP error
/// about a tracked flow, else passed on untouched.
#[inline(always)]
pub fn on_other_packet(ctx: &mut TcContext, hook: Hook) -> Result<i32, DropReason> {
    match translate(ctx, hook) {
        Ok(()) => Ok(TC_ACT_OK as i32),
        // Half-translated: drop it (the sender's next packet brings another error).
        Err(_) => Err(DropReason::IcmpRewriteFailed),
    }
}
