//! The packet headers the tc programs read and write: Ethernet, option-less IPv4, TCP, UDP and
//! ICMP, as offsets from the start of the frame, and the protocol numbers and flags they use.
//! Defined once here, for the kernel programs and for the host tests that build and check
//! frames; the replies the programs build (a TCP RST, an ICMP port unreachable) are assembled
//! here too, by pure functions with their checksums ([`crate::csum`]).
//!
//! Only option-less IPv4 headers (20 bytes, `ihl` 5) are translated, so every L4 offset is
//! fixed.

use crate::csum;
pub use crate::{PROTO_TCP, PROTO_UDP};

/// `IPPROTO_ICMP`.
pub const PROTO_ICMP: u8 = 1;

/// Length of an Ethernet header (no VLAN tag).
pub const ETH_HLEN: usize = 14;
/// Offset of the EtherType.
pub const ETH_TYPE_OFF: usize = 12;
/// EtherType of IPv4.
pub const ETH_P_IP: u16 = 0x0800;

/// Length of an option-less IPv4 header.
pub const IP_HLEN: usize = 20;
/// The first byte of an option-less IPv4 header: version 4, `ihl` 5.
pub const IP_VERSION_IHL: u8 = 0x45;
/// Offset of the IPv4 total length.
pub const IP_TOT_LEN_OFF: usize = ETH_HLEN + 2;
/// Offset of the IPv4 flags and fragment offset.
pub const IP_FRAG_OFF: usize = ETH_HLEN + 6;
/// [`IP_FRAG_OFF`] bits of a fragment: "more fragments" and the offset (not "don't fragment").
pub const IP_FRAG_MASK: u16 = 0x3fff;
/// Offset of the IPv4 protocol.
pub const IP_PROTO_OFF: usize = ETH_HLEN + 9;
/// Offset of the IPv4 header checksum.
pub const IP_CSUM_OFF: usize = ETH_HLEN + 10;
/// Offset of the IPv4 source address.
pub const IP_SRC_OFF: usize = ETH_HLEN + 12;
/// Offset of the IPv4 destination address.
pub const IP_DST_OFF: usize = ETH_HLEN + 16;

/// Where L4 starts (after an option-less IPv4 header).
pub const L4_OFF: usize = ETH_HLEN + IP_HLEN;
/// Offset of the TCP or UDP source port.
pub const L4_SRC_PORT_OFF: usize = L4_OFF;
/// Offset of the TCP or UDP destination port.
pub const L4_DST_PORT_OFF: usize = L4_OFF + 2;

/// Length of a TCP header without options.
pub const TCP_HLEN: usize = 20;
/// Offset of the TCP sequence number.
pub const TCP_SEQ_OFF: usize = L4_OFF + 4;
/// Offset of the TCP acknowledgment number.
pub const TCP_ACK_OFF: usize = L4_OFF + 8;
/// Offset of the TCP data offset (upper 4 bits, in 32-bit words).
pub const TCP_DOFF_OFF: usize = L4_OFF + 12;
/// Offset of the TCP flags.
pub const TCP_FLAGS_OFF: usize = L4_OFF + 13;
/// Offset of the TCP checksum.
pub const TCP_CSUM_OFF: usize = L4_OFF + 16;
/// TCP flag FIN.
pub const TCP_FIN: u8 = 0x01;
/// TCP flag SYN.
pub const TCP_SYN: u8 = 0x02;
/// TCP flag RST.
pub const TCP_RST: u8 = 0x04;
/// TCP flag ACK.
pub const TCP_ACK: u8 = 0x10;

/// Length of a UDP header.
pub const UDP_HLEN: usize = 8;
/// Offset of the UDP checksum.
pub const UDP_CSUM_OFF: usize = L4_OFF + 6;

/// ICMP type "destination unreachable".
pub const ICMP_DEST_UNREACH: u8 = 3;
/// ICMP code "port unreachable" (of [`ICMP_DEST_UNREACH`]).
pub const ICMP_PORT_UNREACH: u8 = 3;
/// ICMP type "time exceeded".
pub const ICMP_TIME_EXCEEDED: u8 = 11;
/// Length of the ICMP header of an error (type, code, checksum, 4 unused or MTU bytes).
pub const ICMP_HLEN: usize = 8;
/// Offset of the ICMP checksum.
pub const ICMP_CSUM_OFF: usize = L4_OFF + 2;
/// What an ICMP error quotes of the offending packet: its (option-less) IP header and the first
/// 8 bytes after it.
pub const ICMP_QUOTE_LEN: usize = IP_HLEN + 8;
/// Offset of the quoted IPv4 header in an ICMP error.
pub const INNER_OFF: usize = L4_OFF + ICMP_HLEN;
/// Offset of the quoted IPv4 protocol.
pub const INNER_PROTO_OFF: usize = INNER_OFF + 9;
/// Offset of the quoted IPv4 header checksum.
pub const INNER_CSUM_OFF: usize = INNER_OFF + 10;
/// Offset of the quoted IPv4 source address.
pub const INNER_SRC_OFF: usize = INNER_OFF + 12;
/// Offset of the quoted IPv4 destination address.
pub const INNER_DST_OFF: usize = INNER_OFF + 16;
/// Offset of the quoted source port.
pub const INNER_SPORT_OFF: usize = INNER_OFF + IP_HLEN;
/// Offset of the quoted destination port.
pub const INNER_DPORT_OFF: usize = INNER_OFF + IP_HLEN + 2;
/// The shortest ICMP error that is translated: headers and the whole quote.
pub const ICMP_ERROR_MIN_LEN: usize = INNER_OFF + ICMP_QUOTE_LEN;

/// A 20-byte IPv4 header from `src` to `dst` (DF set, TTL 64), checksummed.
#[inline(always)]
pub fn ipv4_header(src: [u8; 4], dst: [u8; 4], protocol: u8, total_len: u16) -> [u8; IP_HLEN] {
    let len = total_len.to_be_bytes();
    let mut h = [
        IP_VERSION_IHL, 0, len[0], len[1], 0, 0, 0x40, 0, 64, protocol, 0, 0, src[0], src[1], src[2], src[3], dst[0],
        dst[1], dst[2], dst[3],
    ];
    let sum = csum::fold(csum::sum16(&h)).to_be_bytes();
    h[10] = sum[0];
    h[11] = sum[1];
    h
}

/// The segment a TCP stack answers with when nothing listens, as the kernel's own reset:
/// to a segment with ACK, a bare RST whose sequence number is that ACK's number; to any other,
/// RST|ACK acknowledging everything the segment occupied (`payload` bytes, plus one each for
/// SYN and FIN). `from`/`to` are the reset's own source and destination (the segment's
/// destination and source), `seq`/`ack` the segment's numbers as on the wire.
#[inline(always)]
pub fn tcp_reset(
    from: ([u8; 4], [u8; 2]),
    to: ([u8; 4], [u8; 2]),
    tcp_flags: u8,
    seq: [u8; 4],
    ack: [u8; 4],
    payload: u32,
) -> [u8; IP_HLEN + TCP_HLEN] {
    let (seq_out, ack_out, flags) = if tcp_flags & TCP_ACK != 0 {
        (ack, [0; 4], TCP_RST)
    } else {
        let occupied = payload + u32::from(tcp_flags & TCP_SYN != 0) + u32::from(tcp_flags & TCP_FIN != 0);
        ([0; 4], u32::from_be_bytes(seq).wrapping_add(occupied).to_be_bytes(), TCP_RST | TCP_ACK)
    };
    let mut tcp = [
        from.1[0], from.1[1], to.1[0], to.1[1], seq_out[0], seq_out[1], seq_out[2], seq_out[3], ack_out[0], ack_out[1],
        ack_out[2], ack_out[3], 0x50, flags, 0, 0, 0, 0, 0, 0,
    ];
    let pseudo = csum::sum16(&from.0) + csum::sum16(&to.0) + u32::from(PROTO_TCP) + TCP_HLEN as u32;
    let sum = csum::fold(pseudo + csum::sum16(&tcp)).to_be_bytes();
    tcp[16] = sum[0];
    tcp[17] = sum[1];
    let ip = ipv4_header(from.0, to.0, PROTO_TCP, (IP_HLEN + TCP_HLEN) as u16);
    let mut out = [0u8; IP_HLEN + TCP_HLEN];
    out[..IP_HLEN].copy_from_slice(&ip);
    out[IP_HLEN..].copy_from_slice(&tcp);
    out
}

/// The TCP payload length of a segment whose IPv4 total length is `total_len` and whose data
/// offset byte (at [`TCP_DOFF_OFF`]) is `doff` (0 if the lengths do not add up).
#[inline(always)]
pub fn tcp_payload_len(total_len: u16, doff: u8) -> u32 {
    let header = usize::from(doff >> 4) * 4;
    (usize::from(total_len)).saturating_sub(IP_HLEN + header) as u32
}

/// An ICMP port unreachable from `from` to `to` quoting `quote` (the datagram's IP header and
/// first 8 bytes), IP header included, checksummed.
#[inline(always)]
pub fn icmp_port_unreachable(
    from: [u8; 4],
    to: [u8; 4],
    quote: &[u8; ICMP_QUOTE_LEN],
) -> [u8; IP_HLEN + ICMP_HLEN + ICMP_QUOTE_LEN] {
    let mut icmp = [0u8; ICMP_HLEN + ICMP_QUOTE_LEN];
    icmp[0] = ICMP_DEST_UNREACH;
    icmp[1] = ICMP_PORT_UNREACH;
    icmp[ICMP_HLEN..].copy_from_slice(quote);
    let sum = csum::fold(csum::sum16(&icmp)).to_be_bytes();
    icmp[2] = sum[0];
    icmp[3] = sum[1];
    let ip = ipv4_header(from, to, PROTO_ICMP, (IP_HLEN + icmp.len()) as u16);
    let mut out = [0u8; IP_HLEN + ICMP_HLEN + ICMP_QUOTE_LEN];
    out[..IP_HLEN].copy_from_slice(&ip);
    out[IP_HLEN..].copy_from_slice(&icmp);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csum::tests::reference_checksum;
    extern crate std;

    /// Checks an IPv4 header and its TCP segment (`l3_l4`) from scratch: the IP checksum over
    /// the header, the TCP checksum over the pseudo header and segment.
    fn assert_tcp_checksums(l3_l4: &[u8]) {
        assert_eq!(reference_checksum(&l3_l4[..IP_HLEN]), 0, "IPv4 header sums to 0xffff");
        let segment = &l3_l4[IP_HLEN..];
        let mut pseudo = std::vec::Vec::new();
        pseudo.extend_from_slice(&l3_l4[12..20]);
        pseudo.extend_from_slice(&[0, PROTO_TCP]);
        pseudo.extend_from_slice(&(segment.len() as u16).to_be_bytes());
        pseudo.extend_from_slice(segment);
        assert_eq!(reference_checksum(&pseudo), 0, "TCP segment with its pseudo header sums to 0xffff");
    }

    #[test]
    fn offsets_are_those_of_the_headers() {
        assert_eq!((IP_SRC_OFF, IP_DST_OFF, IP_CSUM_OFF, L4_OFF), (26, 30, 24, 34));
        assert_eq!((TCP_FLAGS_OFF, TCP_CSUM_OFF, UDP_CSUM_OFF), (47, 50, 40));
        assert_eq!((INNER_OFF, INNER_SRC_OFF, INNER_DPORT_OFF, ICMP_ERROR_MIN_LEN), (42, 54, 64, 70));
    }

    #[test]
    fn ipv4_header_is_well_formed() {
        let h = ipv4_header([192, 168, 50, 2], [203, 0, 113, 5], PROTO_TCP, 40);
        assert_eq!(reference_checksum(&h), 0);
        assert_eq!((h[0], &h[2..4], h[9], h[8]), (0x45, &[0u8, 40][..], PROTO_TCP, 64));
        // A header checksummed elsewhere (the worked example of Wikipedia's "IPv4 header
        // checksum": 4500 0073 0000 4000 4011 b861 c0a8 0001 c0a8 00c7).
        let known = [0x45, 0, 0, 0x73, 0, 0, 0x40, 0, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8, 0, 1, 0xc0, 0xa8, 0, 0xc7];
        let rebuilt = ipv4_header([0xc0, 0xa8, 0, 1], [0xc0, 0xa8, 0, 0xc7], PROTO_UDP, 0x73);
        assert_eq!(rebuilt, known);
    }

    #[test]
    fn a_reset_acknowledges_what_the_segment_occupied() {
        let (client, frontend) = (([203, 0, 113, 5], 40_003u16.to_be_bytes()), ([192, 168, 50, 2], 30_099u16.to_be_bytes()));
        // A SYN (seq 1000, no payload): RST|ACK acknowledging 1001.
        let out = tcp_reset(frontend, client, TCP_SYN, 1000u32.to_be_bytes(), [0; 4], 0);
        assert_tcp_checksums(&out);
        let tcp = &out[IP_HLEN..];
        assert_eq!((&tcp[0..2], &tcp[2..4]), (&frontend.1[..], &client.1[..]));
        assert_eq!((tcp[13], u32::from_be_bytes(tcp[8..12].try_into().unwrap())), (TCP_RST | TCP_ACK, 1001));
        // FIN with 4 bytes: 1000 + 4 + 1.
        let out = tcp_reset(frontend, client, TCP_FIN, 1000u32.to_be_bytes(), [0; 4], 4);
        assert_eq!(u32::from_be_bytes(out[IP_HLEN + 8..IP_HLEN + 12].try_into().unwrap()), 1005);
        // An ACK: a bare RST with the ACK's number as sequence number.
        let out = tcp_reset(frontend, client, TCP_ACK, 1000u32.to_be_bytes(), 2000u32.to_be_bytes(), 4);
        assert_tcp_checksums(&out);
        assert_eq!((out[IP_HLEN + 13], &out[IP_HLEN + 4..IP_HLEN + 8]), (TCP_RST, &2000u32.to_be_bytes()[..]));
        // Sequence numbers wrap.
        let out = tcp_reset(frontend, client, TCP_SYN, u32::MAX.to_be_bytes(), [0; 4], 0);
        assert_eq!(&out[IP_HLEN + 8..IP_HLEN + 12], &[0, 0, 0, 0]);
    }

    #[test]
    fn payload_length_comes_from_the_ip_and_tcp_lengths() {
        assert_eq!(tcp_payload_len(40, 0x50), 0);
        assert_eq!(tcp_payload_len(44, 0x50), 4);
        assert_eq!(tcp_payload_len(64, 0x80), 12);
        assert_eq!(tcp_payload_len(20, 0x50), 0, "shorter than its headers");
    }

    #[test]
    fn a_port_unreachable_quotes_and_checksums() {
        let mut quote = [0u8; ICMP_QUOTE_LEN];
        quote[..IP_HLEN].copy_from_slice(&ipv4_header([203, 0, 113, 5], [192, 168, 50, 2], PROTO_UDP, 33));
        quote[IP_HLEN..].copy_from_slice(&[0x9c, 0x43, 0x75, 0x53, 0, 13, 0xab, 0xcd]);
        let out = icmp_port_unreachable([192, 168, 50, 2], [203, 0, 113, 5], &quote);
        assert_eq!(reference_checksum(&out[..IP_HLEN]), 0);
        assert_eq!(reference_checksum(&out[IP_HLEN..]), 0, "ICMP checksum covers header and quote");
        assert_eq!((out[IP_HLEN], out[IP_HLEN + 1], out[9]), (ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, PROTO_ICMP));
        assert_eq!(&out[IP_HLEN + ICMP_HLEN..], &quote[..]);
        assert_eq!(u16::from_be_bytes([out[2], out[3]]) as usize, out.len());
    }
}
