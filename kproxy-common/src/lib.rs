//! The contract between kproxy's kernel programs and its agent: map names, keys, values, flags.
//!
//! Every type here is `#[repr(C)]` with explicit padding, so the kernel and user space agree on
//! the layout byte for byte, and every type has a compile-time size check next to it. Addresses
//! and ports are stored as byte arrays in network order, exactly as they appear in
//! `sockaddr_in` and on the wire: the type itself says the byte order, and `bpftool map dump`
//! prints them readably (`"address": [10,96,0,10]`).
#![no_std]

pub mod csum;
pub mod ct;
pub mod drops;
pub mod lb;
pub mod nat;
pub mod sock;
pub mod wire;

/// `IPPROTO_TCP`, as stored in [`lb::ServiceKey::protocol`].
pub const PROTO_TCP: u8 = 6;
/// `IPPROTO_UDP`, as stored in [`lb::ServiceKey::protocol`].
pub const PROTO_UDP: u8 = 17;

/// Picks the backend slot for a new connection: uniform over `1..=count`, O(1).
///
/// The kernel programs call this with `bpf_get_prandom_u32()`; the agent's in-memory dataplane
/// calls it with its own random source, so both resolve a frontend the same way.
/// `count` must be at least 1 (a frontend with no backends is refused before selection).
#[inline(always)]
pub fn select_slot(random: u32, count: u16) -> u16 {
    // `count` is non-zero by contract; `max(1)` keeps the division defined for the verifier.
    let count = if count == 0 { 1 } else { count as u32 };
    (random % count) as u16 + 1
}

/// Defines a user-space `aya::Pod` impl for map types when the `user` feature is on.
macro_rules! user_pod {
    ($($t:ty),* $(,)?) => {
        $(
            #[cfg(feature = "user")]
            // SAFETY: the type is `#[repr(C)]`, has no padding holes (checked by the size
            // assertions next to it) and is `bytemuck::Pod`, so any byte pattern is valid.
            unsafe impl aya::Pod for $t {}
        )*
    };
}
pub(crate) use user_pod;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn select_slot_covers_every_slot_uniformly() {
        let mut hits = [0u32; 4];
        for r in 0..4000u32 {
            let s = select_slot(r, 3);
            assert!((1..=3).contains(&s), "slot {s} out of range");
            hits[s as usize] += 1;
        }
        assert_eq!(hits[0], 0);
        let (min, max) = (hits[1..].iter().min().unwrap(), hits[1..].iter().max().unwrap());
        assert!(max - min <= 1, "uneven spread {hits:?}");
    }

    #[test]
    fn select_slot_handles_extremes() {
        assert_eq!(select_slot(u32::MAX, 1), 1);
        assert_eq!(select_slot(u32::MAX, u16::MAX), (u32::MAX % 65535) as u16 + 1);
        assert_eq!(select_slot(7, 0), 1);
    }
}
