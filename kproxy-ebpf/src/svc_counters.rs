//! Per-frontend counters (`kproxy_common::svc_counters`), when the agent switches them on.

use aya_ebpf::bindings::BPF_NOEXIST;
use kproxy_common::svc_counters::ServiceCounters;

use crate::maps::KP_SVC_COUNTERS;

/// Set by the agent at load time to 1 with `kproxy run --service-counters N` (N > 0). With 0
/// the verifier sees the constant and prunes every counting path: the programs cost one
/// branch more and never touch `KP_SVC_COUNTERS`.
#[unsafe(no_mangle)]
static KP_SVC_COUNTERS_ON: u8 = 0;

/// Whether the counters are on; callers test it before reading what they would count.
#[inline(always)]
pub fn on() -> bool {
    // SAFETY: reading a constant global patched at load time.
    unsafe { core::ptr::read_volatile(&KP_SVC_COUNTERS_ON) != 0 }
}

/// A new connection to frontend `service_id` on the socket path.
#[inline(always)]
pub fn new_connection(service_id: u32) {
    if on() {
        add(service_id, &ServiceCounters { new_connections: 1, packets: 0, bytes: 0 });
    }
}

/// A packet of `bytes` to frontend `service_id` translated at tc ingress, the first of a new
/// flow if `new_flow`.
#[inline(always)]
pub fn packet(service_id: u32, bytes: u32, new_flow: bool) {
    if on() {
        add(service_id, &ServiceCounters { new_connections: u64::from(new_flow), packets: 1, bytes: u64::from(bytes) });
    }
}

/// Adds `n` to this CPU's counters of `service_id`; the first event of a frontend inserts its
/// entry (`BPF_NOEXIST`, the other CPUs' values zero). An insert that fails because another
/// CPU inserted first adds to that entry; one that fails because the map is full (the
/// `--service-counters` bound) leaves the frontend uncounted.
#[inline(always)]
fn add(service_id: u32, n: &ServiceCounters) {
    let mut counters = KP_SVC_COUNTERS.get_ptr_mut(service_id);
    if counters.is_none() {
        if KP_SVC_COUNTERS.insert(service_id, n, BPF_NOEXIST as u64).is_ok() {
            return;
        }
        counters = KP_SVC_COUNTERS.get_ptr_mut(service_id);
    }
    if let Some(c) = counters {
        // SAFETY: this CPU's value of a live per-CPU hash entry, for this program run (only
        // this CPU writes it; the agent only reads and deletes).
        unsafe {
            (*c).new_connections += n.new_connections;
            (*c).packets += n.packets;
            (*c).bytes += n.bytes;
        }
    }
}
