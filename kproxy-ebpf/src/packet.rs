//! Parsing of Ethernet + IPv4 + TCP/UDP headers, hook-independent: the fields translation
//! needs, read with bounds-checked loads (the offsets are `kproxy_common::wire`'s).

use aya_ebpf::programs::TcContext;
use kproxy_common::wire::{
    ETH_HLEN, ETH_P_IP, ETH_TYPE_OFF, IP_DST_OFF, IP_FRAG_MASK, IP_FRAG_OFF, IP_PROTO_OFF, IP_SRC_OFF, IP_TOT_LEN_OFF,
    IP_VERSION_IHL, L4_DST_PORT_OFF, L4_OFF, L4_SRC_PORT_OFF, PROTO_TCP, PROTO_UDP, TCP_CSUM_OFF, TCP_FLAGS_OFF, TCP_HLEN,
    UDP_CSUM_OFF, UDP_HLEN,
};

/// The parts of a TCP or UDP over IPv4 packet that translation uses. Addresses and ports are
/// in network order, as on the wire.
#[derive(Clone, Copy)]
pub struct Flow {
    pub src_address: [u8; 4],
    pub dst_address: [u8; 4],
    pub src_port: [u8; 2],
    pub dst_port: [u8; 2],
    pub protocol: u8,
    /// TCP flags (0 for UDP).
    pub tcp_flags: u8,
    /// Offset of the L4 checksum.
    pub l4_csum_off: usize,
    /// UDP without checksum (checksum field 0): nothing to update.
    pub no_l4_csum: bool,
}

/// What parsing and translation need from the hook they run in. Implemented for tc here; an
/// XDP fast path implements it too (with checksum updates computed inline, since XDP has no
/// checksum helpers) and reuses `parse`, `nat` and `icmp` unchanged.
pub trait Packet {
    /// Start of the directly accessible (linear) data.
    fn data(&self) -> usize;
    /// End of the directly accessible data.
    fn data_end(&self) -> usize;
    /// Length of the whole packet, linear part or not.
    fn len(&self) -> usize;
    /// Reads a `T` at `offset` (any part of the packet).
    fn load<T>(&self, offset: usize) -> Result<T, i64>;
    /// Writes `value` at `offset` (any part of the packet).
    fn store<T>(&mut self, offset: usize, value: &T) -> Result<(), i64>;
    /// `bpf_l3_csum_replace`: the checksum at `offset` after `from` became `to` (`size` bytes).
    fn l3_csum_replace(&mut self, offset: usize, from: u64, to: u64, size: u64) -> Result<(), i64>;
    /// `bpf_l4_csum_replace`: as `l3_csum_replace`, `flags` holding the size and
    /// `BPF_F_PSEUDO_HDR` / `BPF_F_MARK_MANGLED_0`; partial checksums are handled.
    fn l4_csum_replace(&mut self, offset: usize, from: u64, to: u64, flags: u64) -> Result<(), i64>;
}

impl Packet for TcContext {
    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }
    #[inline(always)]
    fn len(&self) -> usize {
        TcContext::len(self) as usize
    }
    #[inline(always)]
    fn load<T>(&self, offset: usize) -> Result<T, i64> {
        TcContext::load(self, offset)
    }
    #[inline(always)]
    fn store<T>(&mut self, offset: usize, value: &T) -> Result<(), i64> {
        TcContext::store(self, offset, value, 0)
    }
    #[inline(always)]
    fn l3_csum_replace(&mut self, offset: usize, from: u64, to: u64, size: u64) -> Result<(), i64> {
        TcContext::l3_csum_replace(self, offset, from, to, size)
    }
    #[inline(always)]
    fn l4_csum_replace(&mut self, offset: usize, from: u64, to: u64, flags: u64) -> Result<(), i64> {
        TcContext::l4_csum_replace(self, offset, from, to, flags)
    }
}

/// Reads a `T` at `offset` of the packet, which the caller has bounds-checked, with one load
/// of `T`'s width.
///
/// Header fields are at most 2-byte aligned in a frame (the IPv4 header starts 14 bytes in),
/// but `read_unaligned` would make LLVM's BPF back end split every load into byte loads (it
/// assumes no misaligned access) — several instructions per field, on every packet. A load of
/// the field's width is what C programs get from `ip->saddr`: the verifier accepts it for
/// packet pointers unless the architecture lacks efficient unaligned access (then it rejects
/// the program at load time, it does not misbehave), and the JITs of x86-64 and arm64 emit
/// plain loads, which allow any alignment there.
///
/// # Safety
/// `start + offset + size_of::<T>()` must not exceed the packet end the caller checked
/// against, so the verifier sees an in-bounds direct packet access.
#[inline(always)]
pub unsafe fn read<T: Copy>(start: usize, offset: usize) -> T {
    // SAFETY: in bounds per the caller; see above for the alignment.
    unsafe { core::ptr::read((start + offset) as *const T) }
}

/// Writes `value` at `offset` of the packet with one store of `T`'s width; see [`read`].
///
/// # Safety
/// As for [`read`].
#[inline(always)]
pub unsafe fn write<T: Copy>(start: usize, offset: usize, value: T) {
    // SAFETY: in bounds per the caller; see [`read`] for the alignment.
    unsafe { core::ptr::write((start + offset) as *mut T, value) }
}

/// Parses a frame with direct packet access (one bounds check instead of a helper call per
/// field). `None` for anything translation leaves alone: not IPv4, IP options, fragments,
/// other protocols, truncated or non-linear headers.
#[inline(always)]
pub fn parse<P: Packet>(ctx: &P) -> Option<Flow> {
    let (start, end) = (ctx.data(), ctx.data_end());
    // Ethernet + option-less IPv4 + the 8 bytes every UDP or TCP header starts with.
    if start + L4_OFF + UDP_HLEN > end {
        return None;
    }
    // Every read below ends within L4_OFF + UDP_HLEN, checked above, or within L4_OFF +
    // TCP_HLEN, checked before the TCP reads.
    // SAFETY: bytes 12..14, checked above.
    let ethertype = u16::from_be(unsafe { read::<u16>(start, ETH_TYPE_OFF) });
    if ethertype != ETH_P_IP {
        return None;
    }
    // SAFETY: within the IP header, checked above.
    if unsafe { read::<u8>(start, ETH_HLEN) } != IP_VERSION_IHL {
        return None; // not IPv4, or IP options
    }
    // SAFETY: within the IP header, checked above.
    if u16::from_be(unsafe { read::<u16>(start, IP_FRAG_OFF) }) & IP_FRAG_MASK != 0 {
        return None; // a fragment (more fragments, or an offset)
    }
    // SAFETY: within the IP header, checked above.
    let total_len = u16::from_be(unsafe { read::<u16>(start, IP_TOT_LEN_OFF) }) as usize;
    if ctx.len() < ETH_HLEN + total_len {
        return None; // truncated: the IP layer drops it; nothing sensible to translate
    }
    // SAFETY: within the IP header, checked above.
    let protocol = unsafe { read::<u8>(start, IP_PROTO_OFF) };
    let (l4_csum_off, tcp_flags, no_l4_csum) = match protocol {
        PROTO_TCP => {
            if start + L4_OFF + TCP_HLEN > end {
                return None;
            }
            // SAFETY: within the TCP header, checked just above.
            (TCP_CSUM_OFF, unsafe { read::<u8>(start, TCP_FLAGS_OFF) }, false)
        }
        // SAFETY: within the UDP header, checked above.
        PROTO_UDP => (UDP_CSUM_OFF, 0, unsafe { read::<u16>(start, UDP_CSUM_OFF) } == 0),
        _ => return None,
    };
    Some(Flow {
        // SAFETY: within the IP header, checked above.
        src_address: unsafe { read::<u32>(start, IP_SRC_OFF) }.to_ne_bytes(),
        // SAFETY: within the IP header, checked above.
        dst_address: unsafe { read::<u32>(start, IP_DST_OFF) }.to_ne_bytes(),
        // SAFETY: within the first 8 bytes of the L4 header, checked above.
        src_port: unsafe { read::<u16>(start, L4_SRC_PORT_OFF) }.to_ne_bytes(),
        // SAFETY: within the first 8 bytes of the L4 header, checked above.
        dst_port: unsafe { read::<u16>(start, L4_DST_PORT_OFF) }.to_ne_bytes(),
        protocol,
        tcp_flags,
        l4_csum_off,
        no_l4_csum,
    })
}
