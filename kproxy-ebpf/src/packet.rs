//! Parsing of Ethernet + IPv4 + TCP/UDP headers, hook-independent: offsets and the fields
//! translation needs, read with bounds-checked loads.

use aya_ebpf::programs::TcContext;
use kproxy_common::{PROTO_TCP, PROTO_UDP};

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
pub const IP_CSUM_OFF: usize = ETH_HLEN + 10;
pub const IP_SRC_OFF: usize = ETH_HLEN + 12;
pub const IP_DST_OFF: usize = ETH_HLEN + 16;
/// Where L4 starts: only option-less IPv4 headers are translated.
pub const L4_OFF: usize = ETH_HLEN + 20;
pub const L4_SRC_PORT_OFF: usize = L4_OFF;
pub const L4_DST_PORT_OFF: usize = L4_OFF + 2;
pub const TCP_SEQ_OFF: usize = L4_OFF + 4;
pub const TCP_ACK_OFF: usize = L4_OFF + 8;
pub const TCP_FLAGS_OFF: usize = L4_OFF + 13;
pub const TCP_CSUM_OFF: usize = L4_OFF + 16;
pub const UDP_CSUM_OFF: usize = L4_OFF + 6;
const TCP_HLEN: usize = 20;
const UDP_HLEN: usize = 8;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;

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

/// Reads a `T` at `offset` of the packet, which the caller has bounds-checked.
///
/// # Safety
/// `start + offset + size_of::<T>()` must not exceed the packet end the caller checked
/// against, so the verifier sees an in-bounds direct packet access.
#[inline(always)]
unsafe fn read<T: Copy>(start: usize, offset: usize) -> T {
    // SAFETY: in bounds per the caller; unaligned read since packet data has no alignment.
    unsafe { core::ptr::read_unaligned((start + offset) as *const T) }
}

/// Parses a frame with direct packet access (one bounds check instead of a helper call per
/// field). `None` for anything translation leaves alone: not IPv4, IP options, fragments,
/// other protocols, truncated or non-linear headers.
#[inline(always)]
pub fn parse(ctx: &TcContext) -> Option<Flow> {
    let (start, end) = (ctx.data(), ctx.data_end());
    // Ethernet + option-less IPv4 + the 8 bytes every UDP or TCP header starts with.
    if start + L4_OFF + UDP_HLEN > end {
        return None;
    }
    // SAFETY (every read below): offsets are below L4_OFF + UDP_HLEN, checked above, or
    // below L4_OFF + TCP_HLEN, checked before the TCP reads.
    let ethertype = u16::from_be(unsafe { read::<u16>(start, 12) });
    if ethertype != ETH_P_IP {
        return None;
    }
    if unsafe { read::<u8>(start, ETH_HLEN) } != 0x45 {
        return None; // not IPv4, or IP options
    }
    if u16::from_be(unsafe { read::<u16>(start, ETH_HLEN + 6) }) & 0x3fff != 0 {
        return None; // a fragment (more fragments, or an offset)
    }
    let total_len = u16::from_be(unsafe { read::<u16>(start, ETH_HLEN + 2) }) as usize;
    if (ctx.len() as usize) < ETH_HLEN + total_len {
        return None; // truncated: the IP layer drops it; nothing sensible to translate
    }
    let protocol = unsafe { read::<u8>(start, ETH_HLEN + 9) };
    let (l4_csum_off, tcp_flags, no_l4_csum) = match protocol {
        PROTO_TCP => {
            if start + L4_OFF + TCP_HLEN > end {
                return None;
            }
            (TCP_CSUM_OFF, unsafe { read::<u8>(start, TCP_FLAGS_OFF) }, false)
        }
        PROTO_UDP => (UDP_CSUM_OFF, 0, unsafe { read::<u16>(start, UDP_CSUM_OFF) } == 0),
        _ => return None,
    };
    Some(Flow {
        src_address: unsafe { read(start, IP_SRC_OFF) },
        dst_address: unsafe { read(start, IP_DST_OFF) },
        src_port: unsafe { read(start, L4_SRC_PORT_OFF) },
        dst_port: unsafe { read(start, L4_DST_PORT_OFF) },
        protocol,
        tcp_flags,
        l4_csum_off,
        no_l4_csum,
    })
}
