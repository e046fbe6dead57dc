//! One isolated environment per proxy mode: its own node namespace, pods, servers and client
//! cgroup, so that the modes never see each other's rules or programs and can be interleaved
//! without reloading anything.
//!
//! ```text
//!  ext netns (one per mode)       node netns (one per mode)                    pod netns p (P per mode)
//!  eth0 192.0.2.100/24 ═══ veth ═ kpnode0 192.0.2.10/24  <- 10.96.0.0/12       eth0 10.244.1.(10+p)/24
//!  10.128.0.0/9, 10.244.0.0/16    kpbr0 10.244.1.1/24 ── kpv<p> ═══ veth ════  local route 10.(128+4p).0.0/14
//!    via 192.0.2.10               route 10.(128+4p).0.0/14 via 10.244.1.(10+p)  kproxy-testpod serve :8080
//!                                 forwarding on
//! ```
//!
//! Every endpoint address is real: pod `p` owns the block `10.(128+4p).0.0/14` through a local
//! route (any address in it is the pod's own, as with `ip route add local`), and the node routes
//! the block to the pod. So 100,000 distinct endpoint addresses are served by a handful of
//! pods, each address reachable. The node's uplink `kpnode0` carries its own address and leads
//! to the external client's namespace (the rest of the world, here): the ClusterIP range is
//! routed there, as a node's default route would, so a connection to a ClusterIP that no proxy
//! translated goes nowhere, and kube-proxy's rules see a source outside the cluster CIDR and
//! masquerade it, exactly as for a host-network client on a real node. The external client
//! reaches NodePorts on the node's address, and (no proxy) the pods' addresses through the node,
//! which forwards; it has no other route.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use kproxy_e2e::cmd;
use kproxy_e2e::topology::{output_in, pod_ip, spawn_in_cgroup, Cgroup, ChildGuard, Netns, Topology};

/// The port every pod serves HTTP on.
pub const POD_PORT: u16 = 8080;
/// The service port of every ClusterIP.
pub const SERVICE_PORT: u16 = 80;
/// The node's own address, on the uplink that also carries the ClusterIP route.
pub const NODE_IP: &str = "192.0.2.10/24";
/// The node's uplink, where kproxy's tc programs attach.
pub const NODE_DEV: &str = "kpnode0";
/// The external client's address.
pub const EXT_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(192, 0, 2, 100);
/// Sets `net.ipv4.tcp_tw_reuse=1` in the namespace it runs in.
const TW_REUSE: &str = "echo 1 > /proc/sys/net/ipv4/tcp_tw_reuse";
const SERVER_READY: Duration = Duration::from_secs(5);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(600);

/// How the client on the node reaches the pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Straight to a pod's address: the limit.
    None,
    /// kproxy's cgroup socket programs.
    Kproxy,
    /// kube-proxy's iptables ruleset (this machine's `iptables-restore`).
    Iptables,
    /// kube-proxy's nftables ruleset.
    Nftables,
}

impl Mode {
    pub const ALL: [Mode; 4] = [Mode::None, Mode::Kproxy, Mode::Iptables, Mode::Nftables];

    pub fn name(self) -> &'static str {
        match self {
            Mode::None => "none",
            Mode::Kproxy => "kproxy",
            Mode::Iptables => "iptables",
            Mode::Nftables => "nftables",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Mode::None => "no proxy",
            Mode::Kproxy => "kproxy",
            Mode::Iptables => "iptables",
            Mode::Nftables => "nftables",
        }
    }
}

/// The address block pod `p` answers on.
pub fn pod_block(p: usize) -> (Ipv4Addr, u8) {
    (Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + ((p as u32) << 18)), 14)
}

/// Addresses per pod block.
pub const BLOCK_SIZE: u32 = 1 << 18;

/// Where a client runs, and what it connects to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    /// A client on the node (node namespace, the mode's cgroup) to a ClusterIP.
    #[default]
    ClusterIp,
    /// An external client (its own namespace, wired to the node's uplink) to a NodePort on the
    /// node's address.
    NodePort,
}

impl Access {
    pub const ALL: [Access; 2] = [Access::ClusterIp, Access::NodePort];

    pub fn name(self) -> &'static str {
        match self {
            Access::ClusterIp => "clusterip",
            Access::NodePort => "nodeport",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Access::ClusterIp => "client on the node → ClusterIP",
            Access::NodePort => "external client → NodePort",
        }
    }
}

/// One mode's namespaces, servers and client cgroup; all removed on drop.
pub struct ModeEnv {
    pub mode: Mode,
    // Field order is drop order: servers, then the cgroup, then the namespaces.
    servers: Vec<ChildGuard>,
    /// Clients run in this cgroup (kproxy attaches its programs to the kproxy mode's).
    pub cgroup: Cgroup,
    /// The external client runs in this cgroup (no program is attached to it): its CPU time.
    pub ext_cgroup: Cgroup,
    /// The pods' servers run in this cgroup: their CPU time.
    pub server_cgroup: Cgroup,
    /// The external client's namespace.
    pub ext: Netns,
    pub topology: Topology,
}

impl ModeEnv {
    /// Builds the namespaces of `pods` pods and starts `testpod serve` in each.
    pub fn new(mode: Mode, pods: usize, testpod: &Path) -> Result<ModeEnv> {
        let names: Vec<String> = (0..pods).map(|p| format!("pod-{p}")).collect();
        let topology = Topology::builder().pods(names).build()?;
        let cgroup = Cgroup::new(&format!("bench-{}", mode.name()))?;
        let ext_cgroup = Cgroup::new(&format!("bench-ext-{}", mode.name()))?;
        let server_cgroup = Cgroup::new(&format!("bench-srv-{}", mode.name()))?;
        let ext = Netns::new(&format!("bench-ext-{}", mode.name()))?;
        let mut env = ModeEnv {
            mode,
            servers: Vec::new(),
            cgroup,
            ext_cgroup,
            server_cgroup,
            ext,
            topology,
        };
        env.wire().with_context(|| format!("wiring the {} environment", mode.name()))?;
        env.start_servers(testpod)?;
        Ok(env)
    }

    fn wire(&self) -> Result<()> {
        let node = &self.topology.node;
        let ext = &self.ext;
        // The node's uplink: a veth pair to the external client's namespace.
        node.ip(&["link", "add", NODE_DEV, "type", "veth", "peer", "name", "eth0", "netns", ext.name()])?;
        node.ip(&["addr", "add", NODE_IP, "dev", NODE_DEV])?;
        node.ip(&["link", "set", NODE_DEV, "up"])?;
        node.ip(&["route", "add", crate::kubeproxy::SERVICE_CIDR, "dev", NODE_DEV])?;
        ext.ip(&["addr", "add", &format!("{EXT_IP}/24"), "dev", "eth0"])?;
        ext.ip(&["link", "set", "eth0", "up"])?;
        ext.ip(&["link", "set", "lo", "up"])?;
        let node_ip = NODE_IP.split('/').next().unwrap_or(NODE_IP);
        for net in [crate::kubeproxy::CLUSTER_CIDR, "10.244.0.0/16"] {
            ext.ip(&["route", "add", net, "via", node_ip])?;
        }
        // The node forwards between its own links (a namespace-local setting): NodePort traffic
        // and, without a proxy, the external client's connections to pods.
        self.node_command("sh", &["-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"], None)?;
        // Equal socket state for every mode (issue 19): short connections leave their client
        // ports in TIME_WAIT, per namespace; without reuse a client to a single address (no
        // proxy) runs out of ephemeral ports within a few runs while the proxies spread over
        // many backends. Both client namespaces (made here) reuse TIME_WAIT ports for new
        // outgoing connections.
        for netns in [node, ext] {
            run_in(netns, "sh", &["-c", TW_REUSE], None)?;
            let set = run_in(netns, "cat", &["/proc/sys/net/ipv4/tcp_tw_reuse"], None)?;
            if set.trim() != "1" {
                bail!("net.ipv4.tcp_tw_reuse is {:?} in {} after setting it to 1", set.trim(), netns.name());
            }
        }
        for (p, pod) in self.topology.pods.iter().enumerate() {
            let (block, len) = pod_block(p);
            let block = format!("{block}/{len}");
            node.ip(&["route", "add", &block, "via", &pod_ip(p).to_string()])?;
            pod.netns
                .ip(&["route", "add", "local", &block, "dev", "lo"])?;
        }
        Ok(())
    }

    fn start_servers(&mut self, testpod: &Path) -> Result<()> {
        for pod in &self.topology.pods {
            let mut cmd = Command::new(testpod);
            cmd.args(["serve", "--name", &pod.name, "--tcp"])
                .arg(format!("0.0.0.0:{POD_PORT}"))
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null());
            let mut server = spawn_in_cgroup(&pod.netns, &self.server_cgroup, cmd)?;
            let line = server.read_line(SERVER_READY)?;
            if !line.starts_with("ready") {
                bail!("`{}` printed {line:?} instead of ready", server.what());
            }
            self.servers.push(server);
        }
        Ok(())
    }

    pub fn node(&self) -> &Netns {
        &self.topology.node
    }

    /// Runs `cmd` as a client of `access`: in the node namespace and this mode's cgroup, or in
    /// the external client's namespace.
    pub fn client(&self, access: Access, cmd: Command, timeout: Duration) -> Result<Output> {
        kproxy_e2e::interrupt::check()?;
        match access {
            Access::ClusterIp => output_in(&self.topology.node, Some(&self.cgroup), cmd, timeout),
            Access::NodePort => output_in(&self.ext, Some(&self.ext_cgroup), cmd, timeout),
        }
    }

    /// Runs `program args` in the node namespace (not in the cgroup) with `stdin` from a file;
    /// fails unless it exits 0. Returns stdout.
    pub fn node_command(&self, program: &str, args: &[&str], stdin: Option<&Path>) -> Result<String> {
        let mut cmd = Command::new(program);
        cmd.args(args);
        if let Some(path) = stdin {
            cmd.stdin(Stdio::from(
                std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?,
            ));
        }
        let what = cmd::describe(&cmd);
        let out = output_in(&self.topology.node, None, cmd, COMMAND_TIMEOUT)?;
        cmd::check_output(&what, &out)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The client cgroup of `access`.
    pub fn client_cgroup(&self, access: Access) -> &Cgroup {
        match access {
            Access::ClusterIp => &self.cgroup,
            Access::NodePort => &self.ext_cgroup,
        }
    }

    /// The node's IPv4 addresses other than loopback ones (those kproxy serves NodePorts on).
    pub fn node_addresses(&self) -> Result<Vec<std::net::Ipv4Addr>> {
        let out = self.node_command("ip", &["-4", "-o", "addr", "show"], None)?;
        Ok(out
            .lines()
            .filter_map(|l| l.split_whitespace().skip_while(|w| *w != "inet").nth(1))
            .filter_map(|a| a.split('/').next()?.parse::<std::net::Ipv4Addr>().ok())
            .filter(|a| !a.is_loopback())
            .collect())
    }

    /// A value under `/proc/sys` as seen from the node namespace (e.g. the conntrack count).
    pub fn node_sysctl(&self, key: &str) -> Option<u64> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        self.node_command("cat", &[&path], None)
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }
}

/// A bare namespace for loading a ruleset without traffic (the iptables-legacy comparison).
pub fn bare_netns() -> Result<Netns> {
    Netns::new("bench-bare")
}

/// Runs `program args` inside `netns` with stdin from a file; fails unless it exits 0.
pub fn run_in(netns: &Netns, program: &str, args: &[&str], stdin: Option<&Path>) -> Result<String> {
    let mut cmd = Command::new(program);
    cmd.args(args);
    if let Some(path) = stdin {
        cmd.stdin(Stdio::from(
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?,
        ));
    }
    let what = cmd::describe(&cmd);
    let out = output_in(netns, None, cmd, COMMAND_TIMEOUT)?;
    cmd::check_output(&what, &out)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
