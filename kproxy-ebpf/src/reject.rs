//! Refusing a connection to a frontend without endpoints, as kube-proxy's REJECT rule does:
//! the packet is turned, in place, into a TCP RST (for TCP) or an ICMP port unreachable (for
//! UDP) from the frontend back to the client, and sent out of the device it came in on.

use aya_ebpf::{
    bindings::TC_ACT_SHOT,
    helpers::{bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};
use kproxy_common::PROTO_TCP;

use crate::packet::{Flow, ETH_HLEN, TCP_ACK_OFF, TCP_FIN, TCP_FLAGS_OFF, TCP_RST, TCP_SEQ_OFF, TCP_SYN};

const TCP_ACK: u8 = 0x10;
const IPPROTO_ICMP: u8 = 1;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
/// An ICMP error quotes the offending IP header and the first 8 bytes after it.
const QUOTE_LEN: usize = 20 + 8;

/// One's-complement sum of big-endian 16-bit words, folded.
#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

#[inline(always)]
fn sum_bytes<const N: usize>(bytes: &[u8; N]) -> u32 {
    let mut sum = 0u32;
    let mut i = 0;
    while i + 1 < N {
        sum += u32::from(u16::from_be_bytes([bytes[i], bytes[i + 1]]));
        i += 2;
    }
    sum
}

/// A 20-byte IPv4 header from `src` to `dst`, checksummed.
#[inline(always)]
fn ipv4_header(src: [u8; 4], dst: [u8; 4], protocol: u8, total_len: u16) -> [u8; 20] {
    let len = total_len.to_be_bytes();
    let mut h = [
        0x45, 0, len[0], len[1], 0, 0, 0x40, 0, 64, protocol, 0, 0, src[0], src[1], src[2], src[3], dst[0], dst[1],
        dst[2], dst[3],
    ];
    let csum = fold(sum_bytes(&h)).to_be_bytes();
    h[10] = csum[0];
    h[11] = csum[1];
    h
}

/// Rewrites the frame into the reply: Ethernet addresses swapped, then `l3_l4` after them,
/// trimmed or grown to exactly that length, and redirects it out of its device.
#[inline(always)]
fn send_back<const N: usize>(ctx: &mut TcContext, l3_l4: &[u8; N]) -> i32 {
    let Ok(eth) = ctx.load::<[u8; 12]>(0) else { return TC_ACT_SHOT as i32 };
    // SAFETY: the context's skb pointer is valid for the program run.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, (ETH_HLEN + N) as u32, 0) } != 0 {
        return TC_ACT_SHOT as i32;
    }
    let swapped = [eth[6], eth[7], eth[8], eth[9], eth[10], eth[11], eth[0], eth[1], eth[2], eth[3], eth[4], eth[5]];
    if ctx.store(0, &swapped, 0).is_err() || ctx.store(ETH_HLEN, l3_l4, 0).is_err() {
        return TC_ACT_SHOT as i32;
    }
    // SAFETY: reading the ifindex of the skb the program runs on.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: plain helper call; an egress redirect to the device the packet came from.
    unsafe { bpf_redirect(ifindex, 0) as i32 }
}

/// Answers `flow` with a refusal. TCP RSTs are never answered (RFC 793).
#[inline(always)]
pub fn refuse(ctx: &mut TcContext, flow: &Flow) -> i32 {
    if flow.protocol == PROTO_TCP {
        if flow.tcp_flags & TCP_RST != 0 {
            return TC_ACT_SHOT as i32;
        }
        tcp_reset(ctx, flow)
    } else {
        port_unreachable(ctx, flow)
    }
}

#[inline(always)]
fn tcp_reset(ctx: &mut TcContext, flow: &Flow) -> i32 {
    let (Ok(seq), Ok(ack), Ok(total_len)) =
        (ctx.load::<[u8; 4]>(TCP_SEQ_OFF), ctx.load::<[u8; 4]>(TCP_ACK_OFF), ctx.load::<[u8; 2]>(ETH_HLEN + 2))
    else {
        return TC_ACT_SHOT as i32;
    };
    let Ok(doff) = ctx.load::<u8>(TCP_FLAGS_OFF - 1) else { return TC_ACT_SHOT as i32 };
    // As the kernel's own reset: answer an ACK with its ack number as our sequence; otherwise
    // acknowledge everything the segment occupied.
    let (seq_out, ack_out, flags) = if flow.tcp_flags & TCP_ACK != 0 {
        (ack, [0; 4], TCP_RST)
    } else {
        let header = usize::from(doff >> 4) * 4;
        let payload = (u16::from_be_bytes(total_len) as usize).saturating_sub(20 + header) as u32;
        let occupied = payload + u32::from(flow.tcp_flags & TCP_SYN != 0) + u32::from(flow.tcp_flags & TCP_FIN != 0);
        ([0; 4], u32::from_be_bytes(seq).wrapping_add(occupied).to_be_bytes(), TCP_RST | TCP_ACK)
    };
    let (s, d) = (flow.dst_address, flow.src_address);
    let mut tcp = [
        flow.dst_port[0], flow.dst_port[1], flow.src_port[0], flow.src_port[1], seq_out[0], seq_out[1], seq_out[2],
        seq_out[3], ack_out[0], ack_out[1], ack_out[2], ack_out[3], 0x50, flags, 0, 0, 0, 0, 0, 0,
    ];
    let pseudo = sum_bytes(&s) + sum_bytes(&d) + u32::from(PROTO_TCP) + 20;
    let csum = fold(pseudo + sum_bytes(&tcp)).to_be_bytes();
    tcp[16] = csum[0];
    tcp[17] = csum[1];
    let ip = ipv4_header(s, d, PROTO_TCP, 40);
    let mut out = [0u8; 40];
    out[..20].copy_from_slice(&ip);
    out[20..].copy_from_slice(&tcp);
    send_back(ctx, &out)
}

#[inline(always)]
fn port_unreachable(ctx: &mut TcContext, flow: &Flow) -> i32 {
    let Ok(quote) = ctx.load::<[u8; QUOTE_LEN]>(ETH_HLEN) else { return TC_ACT_SHOT as i32 };
    let mut icmp = [0u8; 8 + QUOTE_LEN];
    icmp[0] = ICMP_DEST_UNREACH;
    icmp[1] = ICMP_PORT_UNREACH;
    icmp[8..].copy_from_slice(&quote);
    let csum = fold(sum_bytes(&icmp)).to_be_bytes();
    icmp[2] = csum[0];
    icmp[3] = csum[1];
    let ip = ipv4_header(flow.dst_address, flow.src_address, IPPROTO_ICMP, (20 + icmp.len()) as u16);
    let mut out = [0u8; 20 + 8 + QUOTE_LEN];
    out[..20].copy_from_slice(&ip);
    out[20..].copy_from_slice(&icmp);
    send_back(ctx, &out)
}
