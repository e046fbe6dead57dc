//! Refusing a connection to a frontend without endpoints, as kube-proxy's REJECT rule does:
//! the packet is turned, in place, into a TCP RST (for TCP) or an ICMP port unreachable (for
//! UDP) from the frontend back to the client, and sent out of the device it came in on. The
//! replies themselves are built by `kproxy_common::wire`.

use aya_ebpf::{
    helpers::{bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};
use kproxy_common::{
    drops::DropReason,
    wire::{self, ETH_HLEN, ICMP_QUOTE_LEN, IP_TOT_LEN_OFF, PROTO_TCP, TCP_ACK_OFF, TCP_DOFF_OFF, TCP_RST, TCP_SEQ_OFF},
};

use crate::packet::Flow;

/// Rewrites the frame into the reply: Ethernet addresses swapped, then `l3_l4` after them,
/// trimmed or grown to exactly that length, and redirects it out of its device.
#[inline(always)]
fn send_back<const N: usize>(ctx: &mut TcContext, l3_l4: &[u8; N]) -> Result<i32, DropReason> {
    let eth = ctx.load::<[u8; 12]>(0).map_err(|_| DropReason::RejectFailed)?;
    // SAFETY: the context's skb pointer is valid for the program run.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, (ETH_HLEN + N) as u32, 0) } != 0 {
        return Err(DropReason::RejectFailed);
    }
    let swapped = [eth[6], eth[7], eth[8], eth[9], eth[10], eth[11], eth[0], eth[1], eth[2], eth[3], eth[4], eth[5]];
    if ctx.store(0, &swapped, 0).is_err() || ctx.store(ETH_HLEN, l3_l4, 0).is_err() {
        return Err(DropReason::RejectFailed);
    }
    // SAFETY: reading the ifindex of the skb the program runs on.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: plain helper call; an egress redirect to the device the packet came from.
    Ok(unsafe { bpf_redirect(ifindex, 0) as i32 })
}

/// Answers `flow` with a refusal. TCP RSTs are never answered (RFC 793): dropped.
#[inline(always)]
pub fn refuse(ctx: &mut TcContext, flow: &Flow) -> Result<i32, DropReason> {
    if flow.protocol == PROTO_TCP {
        if flow.tcp_flags & TCP_RST != 0 {
            return Err(DropReason::NoEndpoints);
        }
        tcp_reset(ctx, flow)
    } else {
        port_unreachable(ctx, flow)
    }
}

#[inline(always)]
fn tcp_reset(ctx: &mut TcContext, flow: &Flow) -> Result<i32, DropReason> {
    let (Ok(seq), Ok(ack), Ok(total_len), Ok(doff)) = (
        ctx.load::<[u8; 4]>(TCP_SEQ_OFF),
        ctx.load::<[u8; 4]>(TCP_ACK_OFF),
        ctx.load::<[u8; 2]>(IP_TOT_LEN_OFF),
        ctx.load::<u8>(TCP_DOFF_OFF),
    ) else {
        return Err(DropReason::RejectFailed);
    };
    let payload = wire::tcp_payload_len(u16::from_be_bytes(total_len), doff);
    let out = wire::tcp_reset(
        (flow.dst_address, flow.dst_port),
        (flow.src_address, flow.src_port),
        flow.tcp_flags,
        seq,
        ack,
        payload,
    );
    send_back(ctx, &out)
}

#[inline(always)]
fn port_unreachable(ctx: &mut TcContext, flow: &Flow) -> Result<i32, DropReason> {
    let quote = ctx.load::<[u8; ICMP_QUOTE_LEN]>(ETH_HLEN).map_err(|_| DropReason::RejectFailed)?;
    send_back(ctx, &wire::icmp_port_unreachable(flow.dst_address, flow.src_address, &quote))
}
