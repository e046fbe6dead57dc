//! Source NAT of flows to backends on other nodes: the node's devices and the port range.
//!
//! A packet that arrives at a frontend and is translated to a backend reached through one of
//! the node's devices (a pod on another node) must leave with the node as its source, or the
//! backend's reply would bypass this node and reach the client untranslated. The kernel program
//! asks the FIB which device leads to the backend; if that device is in [`DEVICES_MAP`], the
//! flow is source-translated to the device's address and a port of
//! [`SNAT_PORT_MIN`]`..=`[`SNAT_PORT_MAX`] that no other flow to the same backend uses (claimed
//! atomically in the conntrack map, see [`crate::ct`]).

use bytemuck::{Pod, Zeroable};

use crate::user_pod;

/// Pinned name of the devices map: ifindex → [`Device`].
pub const DEVICES_MAP: &str = "KP_DEVICES";

/// Capacity of [`DEVICES_MAP`]: devices kproxy attaches to.
pub const MAX_DEVICES: u32 = 64;

/// First source port of translated flows. Above Linux's default ephemeral range
/// (`net.ipv4.ip_local_port_range` = 32768–60999), so a translated flow never takes the port of
/// a socket the node itself opened to the same backend.
pub const SNAT_PORT_MIN: u16 = 61_000;
/// Last source port of translated flows: 4,536 concurrent flows per (node address, backend).
pub const SNAT_PORT_MAX: u16 = 65_535;
/// How many random ports a new flow tries before its packet is dropped (the client's
/// retransmission tries again).
pub const SNAT_PORT_TRIES: u32 = 16;

/// Value of [`DEVICES_MAP`], keyed by the `u32` ifindex. 4 bytes, no holes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct Device {
    /// The device's primary IPv4 address, network order: the source of flows translated
    /// towards a backend behind this device.
    pub snat_address: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<Device>() == 4);

user_pod!(Device);
