//! The per-packet datapath at tc: frontends reached from outside (NodePort, ExternalIPs,
//! LoadBalancer IPs, ClusterIPs routed to the node) are translated at ingress, and replies
//! translated back at egress, with connection tracking keeping every packet of a flow on its
//! backend.
//!
//! `try_ingress` and `try_egress` say why they drop a packet with a `DropReason`; the one
//! exit, [`verdict`], turns it into `TC_ACT_SHOT` and counts it in `KP_DROPS`.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use kproxy_common::{
    ct::{CtKey, CT_EGRESS, CT_INGRESS},
    drops::DropReason,
    lb::{AFFINITY_ADDRESS, SVC_FLAG_DROP_UNSERVED, SVC_FLAG_SOURCE_RANGES},
};

use crate::{
    conntrack::{self, Chosen},
    icmp::{self, Hook},
    lb::{self, Client, Lookup, Origin},
    maps::{self, KP_DROPS},
    nat::{self, End},
    packet::{self, Flow},
    reject, route,
};

/// Ingress: a packet to a frontend goes to its flow's backend (a new flow gets one); the reply
/// to a source-translated flow goes back to its client.
#[inline(always)]
pub fn ingress(ctx: &mut TcContext) -> i32 {
    verdict(try_ingress(ctx))
}

/// Egress: a reply from a backend of a tracked flow leaves as its frontend; a request to a
/// backend on another node leaves with the node's address.
#[inline(always)]
pub fn egress(ctx: &mut TcContext) -> i32 {
    verdict(try_egress(ctx))
}

/// The programs' one exit: a verdict passes through, a drop is counted by its reason.
#[inline(always)]
fn verdict(result: Result<i32, DropReason>) -> i32 {
    match result {
        Ok(verdict) => verdict,
        Err(reason) => {
            maps::count(&KP_DROPS, reason.index());
            TC_ACT_SHOT as i32
        }
    }
}

/// The conntrack key of the packet itself, in `direction`.
#[inline(always)]
fn ct_key(flow: &Flow, direction: u8) -> CtKey {
    conntrack::key((flow.src_address, flow.src_port), (flow.dst_address, flow.dst_port), flow.protocol, direction)
}

/// Rewrites `end` of the packet to `to`; a failure leaves a half-translated packet, dropped
/// rather than sent on.
#[inline(always)]
fn rewrite(ctx: &mut TcContext, flow: &Flow, end: End, to: ([u8; 4], [u8; 2])) -> Result<i32, DropReason> {
    match nat::rewrite(ctx, flow, end, to.0, to.1) {
        Ok(()) => Ok(TC_ACT_OK as i32),
        Err(_) => Err(DropReason::RewriteFailed),
    }
}

#[inline(always)]
fn try_ingress(ctx: &mut TcContext) -> Result<i32, DropReason> {
    let Some(flow) = packet::parse(ctx) else { return icmp::on_other_packet(ctx, Hook::Ingress) };
    if let Some(entry) = conntrack::lookup(&ct_key(&flow, CT_INGRESS)) {
        if !conntrack::stale(&entry, &flow) {
            conntrack::refresh(&entry, &flow);
            return rewrite(ctx, &flow, End::Destination, entry.nat());
        }
    }
    let mut client = Client { id: [0; 8], kind: AFFINITY_ADDRESS };
    client.id[..4].copy_from_slice(&flow.src_address);
    let lookup = lb::lookup(flow.dst_address, flow.dst_port, flow.protocol, None, client, Origin::Outside);
    if let Some((flags, service_id)) = lookup.frontend() {
        // kube-proxy drops clients outside `loadBalancerSourceRanges`, before anything else.
        if flags & SVC_FLAG_SOURCE_RANGES != 0 && !lb::source_allowed(service_id, flow.src_address) {
            return Err(DropReason::SourceRange);
        }
    }
    match lookup {
        Lookup::NotAService => Ok(TC_ACT_OK as i32),
        Lookup::NoBackend { flags, .. } if flags & SVC_FLAG_DROP_UNSERVED != 0 => Err(DropReason::NoLocalEndpoints),
        Lookup::NoBackend { .. } => reject::refuse(ctx, &flow),
        Lookup::Backend { backend, backend_id, slot, service_id, .. } => {
            let now = conntrack::now();
            let to = (backend.address, backend.port);
            let chosen = Chosen { address: backend.address, port: backend.port, backend_id, slot, service_id };
            // SAFETY: reading a field of the program's own context.
            let ifindex = unsafe { (*ctx.skb.skb).ifindex };
            match route::device_towards(ctx, ifindex, &flow, to) {
                // A backend on another node: the request also leaves with the node's address
                // (at egress), so that the reply comes back through this node.
                Some(device) => {
                    if conntrack::create_snat(&flow, &chosen, device.snat_address, now).is_none() {
                        return Err(DropReason::SnatPortsExhausted);
                    }
                }
                None => conntrack::create(&flow, &chosen, now),
            }
            rewrite(ctx, &flow, End::Destination, to)
        }
    }
}

#[inline(always)]
fn try_egress(ctx: &mut TcContext) -> Result<i32, DropReason> {
    let Some(flow) = packet::parse(ctx) else { return icmp::on_other_packet(ctx, Hook::Egress) };
    let Some(entry) = conntrack::lookup(&ct_key(&flow, CT_EGRESS)) else { return Ok(TC_ACT_OK as i32) };
    conntrack::refresh(&entry, &flow);
    rewrite(ctx, &flow, End::Source, entry.nat())
}
