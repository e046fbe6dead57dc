//! Internet checksum arithmetic (RFC 1071, RFC 1624), as the kernel's `csum_*` helpers do it:
//! the one place the tc programs fold, add and incrementally update checksums. Pure functions,
//! tested on the host against a from-scratch computation over real header bytes.
//!
//! Two conventions, as in the kernel: values "as in the packet" are the wire bytes loaded in
//! the machine's order (`u16::from_ne_bytes(wire)`), which the one's-complement sum does not
//! care about (RFC 1071's byte-order independence), so no byte swap is needed; [`sum16`] and
//! [`ip_replace4`] work on big-endian words and wire bytes.

/// The kernel's `csum_add` on 32-bit partial sums (end-around carry).
#[inline(always)]
pub fn add(a: u32, b: u32) -> u32 {
    let (sum, carry) = a.overflowing_add(b);
    sum.wrapping_add(u32::from(carry))
}

/// The kernel's `csum_fold`: a 32-bit partial sum folded to 16 bits, complemented (the value
/// a checksum field holds).
#[inline(always)]
pub fn fold(sum: u32) -> u16 {
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// The sum of `bytes` as big-endian 16-bit words (N even), unfolded: at most 65,535 words
/// before it could overflow, far more than any header.
#[inline(always)]
pub fn sum16<const N: usize>(bytes: &[u8; N]) -> u32 {
    let mut sum = 0u32;
    let mut i = 0;
    while i + 1 < N {
        sum += u32::from(u16::from_be_bytes([bytes[i], bytes[i + 1]]));
        i += 2;
    }
    sum
}

/// The kernel's `csum_replace4(sum, from, to)`, which `inet_proto_csum_replace4/2` apply to a
/// complete checksum: `sum` after a 4-byte field (or a 2-byte one, zero-extended) changed from
/// `from` to `to`, all as in the packet.
#[inline(always)]
pub fn replace4(sum: u16, from: u32, to: u32) -> u16 {
    fold(add(add(!u32::from(sum), !from), to))
}

/// What `inet_proto_csum_replace4` does to a partial checksum (CHECKSUM_PARTIAL: the field
/// holds the pseudo header's sum, uncomplemented) for a change of a pseudo header field.
#[inline(always)]
pub fn replace4_partial(sum: u16, from: u32, to: u32) -> u16 {
    !fold(add(add(u32::from(sum), !from), to))
}

/// `BPF_F_MARK_MANGLED_0`: a UDP checksum that comes out 0 is written as 0xffff (0 means none).
#[inline(always)]
pub fn mangle_udp(sum: u16, udp: bool) -> u16 {
    if udp && sum == 0 {
        0xffff
    } else {
        sum
    }
}

/// The IPv4 header checksum `csum` (wire bytes) after a 4-byte field changed from `old` to
/// `new` (wire bytes): RFC 1624's incremental update, HC' = ~(~HC + ~m + m'), in 16-bit words.
#[inline(always)]
pub fn ip_replace4(csum: [u8; 2], old: [u8; 4], new: [u8; 4]) -> [u8; 2] {
    let word = |b: [u8; 4], i: usize| u32::from(u16::from_be_bytes([b[i], b[i + 1]]));
    let mut sum = u32::from(!u16::from_be_bytes(csum));
    sum += u32::from(!(word(old, 0) as u16)) + u32::from(!(word(old, 2) as u16));
    sum += word(new, 0) + word(new, 2);
    fold(sum).to_be_bytes()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    extern crate std;
    use std::vec::Vec;

    /// RFC 1071 from scratch, sharing nothing with the module: the complement of the 16-bit
    /// one's-complement sum of `bytes` (odd length padded with a zero byte), in a u64 folded
    /// until it fits. A buffer that holds its own correct checksum gives 0.
    pub(crate) fn reference_checksum(bytes: &[u8]) -> u16 {
        let mut total: u64 = 0;
        for pair in bytes.chunks(2) {
            let hi = u64::from(pair[0]) << 8;
            let lo = pair.get(1).copied().map_or(0, u64::from);
            total += hi | lo;
        }
        while total > 0xffff {
            total = (total & 0xffff) + (total >> 16);
        }
        !(total as u16)
    }

    /// A small deterministic generator (xorshift), so the tests need no crate.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u32 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 16) as u32
        }
        fn bytes<const N: usize>(&mut self) -> [u8; N] {
            let mut out = [0u8; N];
            out.iter_mut().for_each(|b| *b = self.next() as u8);
            out
        }
    }

    /// A real IPv4 + TCP header (SYN from 203.0.113.5:40003 to 192.168.50.2:30080, as a
    /// capture shows it), with both checksums filled in from scratch.
    fn tcp_packet(src: [u8; 4], dst: [u8; 4], sport: [u8; 2], dport: [u8; 2]) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(&[0x45, 0x00, 0x00, 0x3c, 0x8f, 0x12, 0x40, 0x00, 0x40, 0x06, 0, 0]);
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        p.extend_from_slice(&sport);
        p.extend_from_slice(&dport);
        p.extend_from_slice(&[0x5f, 0x2b, 0x0c, 0x81, 0, 0, 0, 0, 0xa0, 0x02, 0xfa, 0xf0, 0, 0, 0, 0]);
        p.extend_from_slice(&[0x02, 0x04, 0x05, 0xb4, 0x04, 0x02, 0x08, 0x0a, 0x9a, 0x1c, 0x3e, 0x7b, 0, 0, 0, 0, 0x01, 0x03, 0x03, 0x07]);
        let ip = reference_checksum(&p[..20]).to_be_bytes();
        p[10..12].copy_from_slice(&ip);
        let tcp = reference_checksum(&pseudo_and_segment(&p)).to_be_bytes();
        p[36..38].copy_from_slice(&tcp);
        p
    }

    /// The TCP pseudo header followed by the segment of `packet` (IPv4 without options).
    fn pseudo_and_segment(packet: &[u8]) -> Vec<u8> {
        let segment = &packet[20..];
        let mut v = Vec::from(&packet[12..20]);
        v.extend_from_slice(&[0, 6]);
        v.extend_from_slice(&(segment.len() as u16).to_be_bytes());
        v.extend_from_slice(segment);
        v
    }

    fn field2(p: &[u8], at: usize) -> [u8; 2] {
        [p[at], p[at + 1]]
    }

    fn field4(p: &[u8], at: usize) -> [u8; 4] {
        [p[at], p[at + 1], p[at + 2], p[at + 3]]
    }

    #[test]
    fn fold_and_add_carry_around() {
        assert_eq!(add(0xffff_ffff, 1), 1);
        assert_eq!(add(0x8000_0000, 0x8000_0000), 1);
        assert_eq!(fold(0), 0xffff);
        assert_eq!(fold(0x0001_fffe), 0);
        assert_eq!(fold(0xffff_ffff), 0);
        assert_eq!(sum16(&[0x12, 0x34, 0xab, 0xcd]), 0x1234 + 0xabcd);
    }

    #[test]
    fn sum16_matches_the_reference_on_headers() {
        let p = tcp_packet([203, 0, 113, 5], [192, 168, 50, 2], 40_003u16.to_be_bytes(), 30_080u16.to_be_bytes());
        let header: [u8; 20] = p[..20].try_into().unwrap();
        assert_eq!(fold(sum16(&header)), reference_checksum(&header));
        assert_eq!(fold(sum16(&header)), 0, "a header with its checksum sums to 0xffff");
        let mut zeroed = header;
        zeroed[10..12].fill(0);
        assert_eq!(fold(sum16(&zeroed)).to_be_bytes(), field2(&header, 10));
    }

    /// NAT of a destination: new address and port, IP checksum by [`ip_replace4`] and by
    /// [`replace4`], TCP checksum by [`replace4`] (address in the pseudo header, then port),
    /// each equal to recomputing from scratch.
    #[test]
    fn incremental_updates_equal_a_recomputation_on_real_headers() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for i in 0..20_000 {
            let (src, dst, new_dst) = (rng.bytes::<4>(), rng.bytes::<4>(), rng.bytes::<4>());
            let (sport, dport, new_dport) = (rng.bytes::<2>(), rng.bytes::<2>(), rng.bytes::<2>());
            // Every few rounds an address mapped to itself, or a port only.
            let new_dst = if i % 7 == 0 { dst } else { new_dst };
            let before = tcp_packet(src, dst, sport, dport);
            let want = tcp_packet(src, new_dst, sport, new_dport);

            let ip = ip_replace4(field2(&before, 10), dst, new_dst);
            assert_eq!(ip, field2(&want, 10), "ip_replace4 {dst:?} -> {new_dst:?}");
            let ip_ne = replace4(u16::from_ne_bytes(field2(&before, 10)), u32::from_ne_bytes(dst), u32::from_ne_bytes(new_dst));
            assert_eq!(ip_ne.to_ne_bytes(), field2(&want, 10), "replace4 on the IP checksum");

            let tcp = u16::from_ne_bytes(field2(&before, 36));
            let tcp = replace4(tcp, u32::from_ne_bytes(dst), u32::from_ne_bytes(new_dst));
            let tcp = replace4(tcp, u32::from(u16::from_ne_bytes(dport)), u32::from(u16::from_ne_bytes(new_dport)));
            assert_eq!(tcp.to_ne_bytes(), field2(&want, 36), "TCP checksum {dst:?}:{dport:?} -> {new_dst:?}:{new_dport:?}");
            assert_eq!(field4(&want, 16), new_dst);
        }
    }

    /// CHECKSUM_PARTIAL: the field holds the uncomplemented sum of the pseudo header only; a
    /// change of an address must give that of the new pseudo header.
    #[test]
    fn a_partial_checksum_follows_its_pseudo_header() {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let partial = |src: [u8; 4], dst: [u8; 4]| {
            let mut pseudo = Vec::from(&src[..]);
            pseudo.extend_from_slice(&dst);
            pseudo.extend_from_slice(&[0, 6, 0, 40]);
            !reference_checksum(&pseudo)
        };
        for _ in 0..20_000 {
            let (src, dst, new_dst) = (rng.bytes::<4>(), rng.bytes::<4>(), rng.bytes::<4>());
            let field = partial(src, dst).to_be_bytes();
            let got = replace4_partial(u16::from_ne_bytes(field), u32::from_ne_bytes(dst), u32::from_ne_bytes(new_dst));
            let want = partial(src, new_dst);
            // 0x0000 and 0xffff are the same one's-complement sum (the kernel leaves either).
            let same = |a: u16, b: u16| a == b || (a == 0 && b == 0xffff) || (a == 0xffff && b == 0);
            assert!(same(u16::from_be_bytes(got.to_ne_bytes()), want), "{dst:?} -> {new_dst:?}");
        }
    }

    #[test]
    fn udp_zero_is_sent_as_ffff() {
        assert_eq!(mangle_udp(0, true), 0xffff);
        assert_eq!(mangle_udp(0, false), 0);
        assert_eq!(mangle_udp(0x1234, true), 0x1234);
    }
}
