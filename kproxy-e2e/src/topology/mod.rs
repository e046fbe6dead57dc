//! RAII test topology: network namespaces, a child cgroup, and processes placed in them.
//!
//! Every object removes what it created when dropped (also while a test panics): processes are
//! killed, namespaces deleted, cgroups emptied and removed. Names carry the process id and a
//! per-process counter, so concurrent runs and concurrent tests never collide.
//!
//! The network built by [`Topology`]:
//!
//! ```text
//!  node netns                                 pod netns (one per pod)
//!  kpbr0 10.244.1.1/24 ── kpv<i> ═══ veth ═══ eth0 10.244.1.(10+i)/24, default via 10.244.1.1
//! ```
//!
//! (10.244.`S`.0/24 with [`TopologyBuilder::subnet`] `S`, for a second node.)
//!
//! All links are created inside the namespaces (never in the host's), so interface names only
//! need to be unique within one namespace. The node namespace has no default route and does not
//! forward, so nothing sent in it can leave the machine.

mod cgroup;
mod netns;
mod process;

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, Context, Result};

pub use cgroup::{cgroup2_mount, Cgroup};
pub use netns::{in_netns, Netns};
pub use process::{output_in, spawn_in, spawn_in_cgroup, ChildGuard};

/// The node's bridge address, the pods' default gateway (on the default subnet).
pub const BRIDGE_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);
/// The prefix length of the pod subnet 10.244.1.0/24.
pub const POD_PREFIX_LEN: u8 = 24;
/// The bridge's name inside the node namespace.
pub const BRIDGE: &str = "kpbr0";
/// Pod `i` gets `10.244.1.(FIRST_POD_HOST + i)`.
pub const FIRST_POD_HOST: u8 = 10;
const MAX_PODS: usize = 200;

pub use xtask::cmd::is_root;

/// `{prefix}-{pid}-{n}` with `n` counting up in this process: unique on the machine while this
/// process lives.
pub fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{}-{n}", std::process::id())
}

/// The address of pod number `index` (0-based) in a [`Topology`] on the default subnet.
pub fn pod_ip(index: usize) -> Ipv4Addr {
    pod_ip_in(1, index)
}

/// The address of pod number `index` (0-based) on pod subnet 10.244.`subnet`.0/24.
fn pod_ip_in(subnet: u8, index: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, subnet, FIRST_POD_HOST + index as u8)
}

/// One pod: its own network namespace with `eth0` on the node's bridge.
#[derive(Debug)]
pub struct Pod {
    pub name: String,
    pub ip: Ipv4Addr,
    pub netns: Netns,
}

/// A node network namespace with a bridge, and pods attached to it. Dropping it deletes every
/// namespace (pods first) after killing the processes in them.
#[derive(Debug)]
pub struct Topology {
    // Field order is drop order: the pods' namespaces go before the node's.
    pub pods: Vec<Pod>,
    pub node: Netns,
    /// The third octet of the pod subnet 10.244.`subnet`.0/24.
    pub subnet: u8,
}

/// Builds a [`Topology`]: `Topology::builder().pod("pod-a").pod("pod-b").build()?`.
#[derive(Debug)]
pub struct TopologyBuilder {
    pods: Vec<String>,
    subnet: u8,
}

impl Default for TopologyBuilder {
    fn default() -> Self {
        TopologyBuilder { pods: Vec::new(), subnet: 1 }
    }
}

impl TopologyBuilder {
    /// Adds a pod; pods get addresses in the order they are added.
    pub fn pod(mut self, name: impl Into<String>) -> Self {
        self.pods.push(name.into());
        self
    }

    /// Adds several pods, see [`TopologyBuilder::pod`].
    pub fn pods<S: Into<String>>(mut self, names: impl IntoIterator<Item = S>) -> Self {
        self.pods.extend(names.into_iter().map(Into::into));
        self
    }

    /// Puts the pods on 10.244.`subnet`.0/24 instead of 10.244.1.0/24 (the bridge is
    /// 10.244.`subnet`.1), so that two topologies can be two nodes of one cluster.
    pub fn subnet(mut self, subnet: u8) -> Self {
        self.subnet = subnet;
        self
    }

    /// Creates the namespaces and links. On error, whatever was created is removed again.
    pub fn build(self) -> Result<Topology> {
        if self.pods.len() > MAX_PODS {
            bail!("at most {MAX_PODS} pods fit the 10.244.1.0/24 plan");
        }
        let node = Netns::new("node")?;
        node.ip(&["link", "add", BRIDGE, "type", "bridge"])?;
        let bridge_ip = Ipv4Addr::new(10, 244, self.subnet, 1);
        node.ip(&["addr", "add", &cidr(bridge_ip), "dev", BRIDGE])?;
        node.ip(&["link", "set", BRIDGE, "up"])?;

        let mut topology = Topology {
            pods: Vec::new(),
            node,
            subnet: self.subnet,
        };
        for (index, name) in self.pods.into_iter().enumerate() {
            let pod = topology
                .attach_pod(index, &name)
                .with_context(|| format!("creating pod {name}"))?;
            topology.pods.push(pod);
        }
        Ok(topology)
    }
}

impl Topology {
    pub fn builder() -> TopologyBuilder {
        TopologyBuilder::default()
    }

    /// The node's address on the pods' bridge, their default gateway.
    pub fn bridge_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 244, self.subnet, 1)
    }

    /// The pod subnet, `10.244.S.0/24`.
    pub fn pod_cidr(&self) -> String {
        format!("10.244.{}.0/{POD_PREFIX_LEN}", self.subnet)
    }

    /// The pod called `name`; panics if there is none (a test's own typo).
    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name} in this topology"))
    }

    fn attach_pod(&self, index: usize, name: &str) -> Result<Pod> {
        let netns = Netns::new("pod")?;
        let ip = pod_ip_in(self.subnet, index);
        let node_side = format!("kpv{index}");
        // Both ends are created inside namespaces: `kpv<i>` in the node, `eth0` in the pod.
        self.node.ip(&[
            "link",
            "add",
            &node_side,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            netns.name(),
        ])?;
        self.node
            .ip(&["link", "set", &node_side, "master", BRIDGE])?;
        self.node.ip(&["link", "set", &node_side, "up"])?;
        netns.ip(&["addr", "add", &cidr(ip), "dev", "eth0"])?;
        netns.ip(&["link", "set", "eth0", "up"])?;
        netns.ip(&["route", "add", "default", "via", &self.bridge_ip().to_string()])?;
        Ok(Pod {
            name: name.to_string(),
            ip,
            netns,
        })
    }
}

fn cidr(ip: Ipv4Addr) -> String {
    format!("{ip}/{POD_PREFIX_LEN}")
}
