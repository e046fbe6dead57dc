//! Why the tc programs drop a packet, and where they count it.
//!
//! Every drop of the per-packet datapath has one [`DropReason`]: `try_ingress`/`try_egress`
//! return it, and the programs' one exit turns it into `TC_ACT_SHOT` and adds one to its
//! counter in [`DROPS_MAP`]. The agent sums the counters over the CPUs at each scrape and
//! serves them as `kproxy_datapath_drops_total{reason}`, named by [`DropReason::as_str`].
//!
//! Packets the programs leave alone (not IPv4, IP options, fragments, other protocols,
//! truncated) are passed on, not dropped, and the conntrack map is LRU, so it never refuses an
//! entry: there is no "malformed" or "conntrack full" drop to count.

/// Pinned name of the drop counters: a `BPF_MAP_TYPE_PERCPU_ARRAY` of `u64`, indexed by
/// [`DropReason`] (`u32` key), [`DROP_SLOTS`] entries, written by the tc programs only.
/// Pinned, so the counters go on across agent restarts, like the socket counters.
pub const DROPS_MAP: &str = "KP_DROPS";

/// Entries of [`DROPS_MAP`]: room for reasons a later version adds (they are appended), so
/// that an upgraded agent adopting the pinned map still counts them.
pub const DROP_SLOTS: u32 = 32;

/// Why a packet was dropped; the value is its index in [`DROPS_MAP`]. Values are never reused:
/// new reasons are appended.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// A new flow from a client outside the frontend's `spec.loadBalancerSourceRanges`
    /// (`SVC_FLAG_SOURCE_RANGES`), as kube-proxy drops it.
    SourceRange = 0,
    /// A new flow to a frontend whose endpoints may only be on this node
    /// (`externalTrafficPolicy: Local`, or `internalTrafficPolicy: Local`) and none is here
    /// (`SVC_FLAG_DROP_UNSERVED`): dropped, not refused, so clients and load balancers retry
    /// elsewhere.
    NoLocalEndpoints = 1,
    /// A TCP RST to a frontend without endpoints: other packets there are refused with a RST
    /// or an ICMP port unreachable, but a RST is never answered (RFC 793).
    NoEndpoints = 2,
    /// A new flow to a backend on another node for which no source port was free: every one
    /// of `SNAT_PORT_TRIES` random ports of `SNAT_PORT_MIN..=SNAT_PORT_MAX` towards that
    /// backend was taken (the client's retransmission tries again).
    SnatPortsExhausted = 3,
    /// Rewriting a TCP/UDP packet's address, port or checksum failed (a helper error): a
    /// half-translated packet is dropped rather than sent on.
    RewriteFailed = 4,
    /// As [`DropReason::RewriteFailed`], for an ICMP error about a tracked flow.
    IcmpRewriteFailed = 5,
    /// Turning a packet to a frontend without endpoints into its refusal (RST or ICMP port
    /// unreachable) failed: reading the packet, resizing it or writing the reply.
    RejectFailed = 6,
}

/// Reasons in use (the first entries of [`DROPS_MAP`]).
pub const DROP_REASONS: u32 = 7;
const _: () = assert!(DROP_REASONS <= DROP_SLOTS);
// The map's key is the reason as a `u32` (4 bytes); its value, per CPU, a `u64` count (8 bytes).
const _: () = assert!(core::mem::size_of::<DropReason>() == core::mem::size_of::<u32>());

impl DropReason {
    /// Every reason, in index order.
    pub const ALL: [DropReason; DROP_REASONS as usize] = [
        DropReason::SourceRange,
        DropReason::NoLocalEndpoints,
        DropReason::NoEndpoints,
        DropReason::SnatPortsExhausted,
        DropReason::RewriteFailed,
        DropReason::IcmpRewriteFailed,
        DropReason::RejectFailed,
    ];

    /// The `reason` label of `kproxy_datapath_drops_total`.
    pub const fn as_str(self) -> &'static str {
        match self {
            DropReason::SourceRange => "source_range",
            DropReason::NoLocalEndpoints => "no_local_endpoints",
            DropReason::NoEndpoints => "no_endpoints",
            DropReason::SnatPortsExhausted => "snat_ports_exhausted",
            DropReason::RewriteFailed => "rewrite_failed",
            DropReason::IcmpRewriteFailed => "icmp_rewrite_failed",
            DropReason::RejectFailed => "reject_failed",
        }
    }

    /// The key of its counter in [`DROPS_MAP`].
    #[inline(always)]
    pub const fn index(self) -> u32 {
        self as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_indexed_in_order_with_distinct_names() {
        for (i, reason) in DropReason::ALL.iter().enumerate() {
            assert_eq!(reason.index() as usize, i, "{reason:?}");
            for other in &DropReason::ALL[..i] {
                assert_ne!(reason.as_str(), other.as_str());
            }
            assert!(reason.as_str().bytes().all(|b| b.is_ascii_lowercase() || b == b'_'), "{}", reason.as_str());
        }
    }
}
