//! Facts about this node: its IPv4 addresses (where NodePorts are served) and the devices the
//! tc programs attach to.

use std::{collections::BTreeSet, net::Ipv4Addr};

use anyhow::{bail, Context as _, Result};

/// An IPv4 CIDR, as in kube-proxy's `--nodeport-addresses` or a Service's
/// `loadBalancerSourceRanges`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    pub address: Ipv4Addr,
    pub prefix_len: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (address, prefix_len) = s.split_once('/').ok_or_else(|| format!("{s:?} is not ADDRESS/PREFIX"))?;
        let address: Ipv4Addr = address.parse().map_err(|_| format!("{s:?}: {address:?} is not an IPv4 address"))?;
        let prefix_len: u8 = prefix_len.parse().ok().filter(|p| *p <= 32).ok_or_else(|| format!("{s:?}: bad prefix length"))?;
        Ok(Cidr { address, prefix_len })
    }
}

impl Cidr {
    fn mask(&self) -> u32 {
        if self.prefix_len == 0 { 0 } else { u32::MAX << (32 - u32::from(self.prefix_len)) }
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.address) & self.mask()
    }

    /// The same range with the host bits of the address cleared (`10.1.2.3/8` → `10.0.0.0/8`).
    pub fn masked(&self) -> Cidr {
        Cidr { address: Ipv4Addr::from(u32::from(self.address) & self.mask()), prefix_len: self.prefix_len }
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix_len)
    }
}

/// (device, address) for every non-loopback IPv4 address of this network namespace.
pub fn ipv4_addresses() -> Result<Vec<(String, Ipv4Addr)>> {
    let mut out = Vec::new();
    for ifa in nix::ifaddrs::getifaddrs().context("getifaddrs")? {
        let Some(addr) = ifa.address.as_ref().and_then(|a| a.as_sockaddr_in()) else { continue };
        let ip = addr.ip();
        if !ip.is_loopback() {
            out.push((ifa.interface_name.clone(), ip));
        }
    }
    Ok(out)
}

/// The addresses NodePorts are served on: the node's IPv4 addresses, only those within
/// `cidrs` when given (kube-proxy's `--nodeport-addresses`).
pub fn node_port_addresses(cidrs: &[Cidr]) -> Result<Vec<Ipv4Addr>> {
    let all = ipv4_addresses()?;
    Ok(all
        .into_iter()
        .map(|(_, ip)| ip)
        .filter(|ip| cidrs.is_empty() || cidrs.iter().any(|c| c.contains(*ip)))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect())
}

/// Default tc devices: those with a default route (`/proc/net/route`).
pub fn default_route_devices() -> Result<Vec<String>> {
    let routes = std::fs::read_to_string("/proc/net/route").context("read /proc/net/route")?;
    let mut out = BTreeSet::new();
    for line in routes.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() > 7 && fields[1] == "00000000" && fields[7] == "00000000" {
            out.insert(fields[0].to_string());
        }
    }
    Ok(out.into_iter().collect())
}

/// Checks that every named device exists. (Asks the kernel, not `/sys/class/net`, which shows
/// the network namespace sysfs was mounted in, not necessarily this process's.)
pub fn check_devices(devices: &[String]) -> Result<()> {
    for d in devices {
        if nix::net::if_::if_nametoindex(d.as_str()).is_err() {
            bail!("--devices: no network device {d:?} in this network namespace");
        }
    }
    Ok(())
}

/// Names of every network device of this network namespace.
pub fn devices() -> Result<Vec<String>> {
    let list = nix::net::if_::if_nameindex().context("list network devices")?;
    Ok(list.iter().map(|i| i.name().to_string_lossy().into_owned()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse_and_match() {
        let c: Cidr = "192.168.50.0/24".parse().unwrap();
        assert!(c.contains("192.168.50.9".parse().unwrap()));
        assert!(!c.contains("192.168.51.9".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        assert!("192.168.50.0".parse::<Cidr>().is_err());
        assert!("192.168.50.0/33".parse::<Cidr>().is_err());
        assert!("fd00::/64".parse::<Cidr>().is_err());
    }
}
