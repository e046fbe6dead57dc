//! The rulesets kube-proxy writes for a set of NodePort services (each with its ClusterIP), in
//! its iptables and nftables modes, as `iptables-restore` and `nft -f` input.
//!
//! The layout follows kube-proxy's own proxiers at kubernetes/kubernetes commit
//! [`KUBE_PROXY_COMMIT`] (`pkg/proxy/iptables/proxier.go`, `pkg/proxy/nftables/proxier.go`),
//! with the settings of a typical node: IPv4, `--cluster-cidr` [`CLUSTER_CIDR`] (detect-local mode
//! `ClusterCIDR`, so traffic to a ClusterIP from outside the cluster CIDR is masqueraded),
//! `--masquerade-bit 14`, localhost NodePorts allowed (the default, hence the `KUBE-FIREWALL`
//! martian rule), `nf_conntrack_tcp_be_liberal` off (hence the INVALID drop in `KUBE-FORWARD`),
//! `--random-fully` available, no nfacct counters, and the ServiceCIDR [`SERVICE_CIDR`] known to
//! the nftables proxier. `--nodeport-addresses` is left at each mode's default: every local
//! address for iptables (`-m addrtype --dst-type LOCAL`), the node's primary address
//! [`NODE_ADDRESS`] for nftables (`primary`, its default since the nftables mode exists).
//! Services use the `Cluster` external traffic policy, so NodePort traffic is masqueraded. Chain names are computed exactly as kube-proxy computes them (SHA-256,
//! base32), so the rules look like the ones on a real node.
//!
//! Differences, all immaterial to what is measured: services are written in a fixed order (kube-
//! proxy iterates a Go map, so the position of a service in `KUBE-SERVICES` is random on a real
//! node; here service 0 is first and service N-1 last), the nftables base chains use numeric
//! priorities (`-110` for kube-proxy's `dstnat-10`, which nft 1.0.6 refuses for filter chains),
//! and the jump rules that kube-proxy inserts one by one with `iptables -I` are loaded with one
//! `iptables-restore --noflush`.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The kube-proxy sources the rulesets follow.
pub const KUBE_PROXY_COMMIT: &str = "531be81208e2274ef42e72525a26610a9622bcdf";
/// Namespace of every benchmark service.
pub const NAMESPACE: &str = "bench";
/// Port name of every benchmark service.
pub const PORT_NAME: &str = "http";
/// The cluster (pod) CIDR: contains the pod subnet and every endpoint address.
pub const CLUSTER_CIDR: &str = "10.128.0.0/9";
/// The service CIDR: every ClusterIP.
pub const SERVICE_CIDR: &str = "10.96.0.0/12";
/// kube-proxy's masquerade mark for `--masquerade-bit 14` (Go's `%#08x` of `1 << 14`).
pub const MASQ_MARK: &str = "0x004000";
/// The node's primary address: the nftables mode serves NodePorts on it only.
pub const NODE_ADDRESS: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
/// Above this many endpoints kube-proxy's iptables proxier drops per-endpoint comments and
/// stops looking for stale chains on every sync ("large cluster mode").
pub const LARGE_CLUSTER_ENDPOINTS: usize = 1000;

/// One service with one TCP port: a ClusterIP, and a NodePort unless `node_port` is 0.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Svc {
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    pub node_port: u16,
    pub target_port: u16,
    pub endpoints: Vec<Ipv4Addr>,
}

impl Svc {
    /// `namespace/name:port`, kube-proxy's `ServicePortName.String()`.
    pub fn port_name(&self) -> String {
        format!("{NAMESPACE}/{}:{PORT_NAME}", self.name)
    }

    /// `ip:targetPort` of an endpoint.
    pub fn endpoint(&self, ip: Ipv4Addr) -> String {
        format!("{ip}:{}", self.target_port)
    }

    /// kube-proxy's `KUBE-SVC-…` chain of this service port.
    pub fn svc_chain(&self) -> String {
        format!("KUBE-SVC-{}", hash_b32(&format!("{}tcp", self.port_name()), 16))
    }

    /// kube-proxy's `KUBE-EXT-…` chain of this service port (external destinations: NodePort).
    pub fn ext_chain(&self) -> String {
        format!("KUBE-EXT-{}", hash_b32(&format!("{}tcp", self.port_name()), 16))
    }

    /// kube-proxy's `KUBE-SEP-…` chain of one endpoint.
    pub fn sep_chain(&self, ip: Ipv4Addr) -> String {
        let key = format!("{}tcp{}", self.port_name(), self.endpoint(ip));
        format!("KUBE-SEP-{}", hash_b32(&key, 16))
    }

    /// kube-proxy's nftables `service-…` chain.
    pub fn nft_service_chain(&self) -> String {
        format!("service-{}", hash_and_truncate(&self.nft_base()))
    }

    /// kube-proxy's nftables `external-…` chain.
    pub fn nft_external_chain(&self) -> String {
        format!("external-{}", hash_and_truncate(&self.nft_base()))
    }

    /// kube-proxy's nftables `endpoint-…` chain of one endpoint.
    pub fn nft_endpoint_chain(&self, ip: Ipv4Addr) -> String {
        let base = format!("{}__{ip}/{}", self.nft_base(), self.target_port);
        format!("endpoint-{}", hash_and_truncate(&base))
    }

    fn nft_base(&self) -> String {
        format!("{NAMESPACE}/{}/tcp/{PORT_NAME}", self.name)
    }
}

/// The first `chars` characters of base32(sha256(text)), as kube-proxy names its chains.
fn hash_b32(text: &str, chars: usize) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let hash = Sha256::digest(text.as_bytes());
    let mut out = String::with_capacity(chars);
    let (mut buffer, mut bits) = (0u32, 0u32);
    for &byte in hash.iter() {
        buffer = (buffer << 8) | u32::from(byte);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((buffer >> bits) & 31) as usize] as char);
            if out.len() == chars {
                return out;
            }
        }
    }
    out
}

/// kube-proxy nftables' `hashAndTruncate` (the names here never need truncating).
fn hash_and_truncate(name: &str) -> String {
    format!("{}-{name}", hash_b32(name, 8))
}

/// What an `iptables-restore` input contains.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IptablesCounts {
    /// Rules in the nat table.
    pub nat_rules: usize,
    /// Rules in the filter table.
    pub filter_rules: usize,
    /// User-defined chains (both tables).
    pub chains: usize,
    /// Jump rules from the built-in chains (PREROUTING, OUTPUT, ...).
    pub jump_rules: usize,
    /// Rules in KUBE-SERVICES (nat), which the first packet of every connection walks.
    pub kube_services_rules: usize,
    /// Rules in KUBE-NODEPORTS (nat), which the first packet of a NodePort connection walks
    /// after all of KUBE-SERVICES.
    #[serde(default)]
    pub kube_nodeports_rules: usize,
    /// Size of the restore input, bytes.
    pub bytes: usize,
}

impl IptablesCounts {
    pub fn total_rules(&self) -> usize {
        self.nat_rules + self.filter_rules + self.jump_rules
    }
}

/// What an `nft -f` input creates.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NftCounts {
    /// Chains (base and regular).
    pub chains: usize,
    pub rules: usize,
    /// Elements of the verdict maps (`service-ips`, ...).
    pub map_elements: usize,
    /// Elements of the sets (`cluster-ips`).
    pub set_elements: usize,
    /// Size of the transaction, bytes.
    pub bytes: usize,
}

/// The whole ruleset, one `iptables-restore` input, and its counts.
pub struct Restore {
    pub text: String,
    pub counts: IptablesCounts,
}

/// The jump rules kube-proxy inserts into the built-in chains at start-up (its
/// `iptablesJumpChains` and `iptablesKubeletJumpChains`), as `iptables-restore --noflush` input.
pub fn iptables_jumps() -> Restore {
    const FILTER: &[(&str, &str, &str, bool)] = &[
        ("INPUT", "KUBE-EXTERNAL-SERVICES", "kubernetes externally-visible service portals", true),
        ("FORWARD", "KUBE-EXTERNAL-SERVICES", "kubernetes externally-visible service portals", true),
        ("INPUT", "KUBE-NODEPORTS", "kubernetes health check service ports", false),
        ("FORWARD", "KUBE-SERVICES", "kubernetes service portals", true),
        ("OUTPUT", "KUBE-SERVICES", "kubernetes service portals", true),
        ("FORWARD", "KUBE-FORWARD", "kubernetes forwarding rules", false),
        ("INPUT", "KUBE-PROXY-FIREWALL", "kubernetes load balancer firewall", true),
        ("OUTPUT", "KUBE-PROXY-FIREWALL", "kubernetes load balancer firewall", true),
        ("FORWARD", "KUBE-PROXY-FIREWALL", "kubernetes load balancer firewall", true),
        ("INPUT", "KUBE-FIREWALL", "", false),
        ("OUTPUT", "KUBE-FIREWALL", "", false),
    ];
    const NAT: &[(&str, &str, &str)] = &[
        ("OUTPUT", "KUBE-SERVICES", "kubernetes service portals"),
        ("PREROUTING", "KUBE-SERVICES", "kubernetes service portals"),
        ("POSTROUTING", "KUBE-POSTROUTING", "kubernetes postrouting rules"),
    ];
    let mut text = String::from("*filter\n");
    for chain in FILTER_CHAINS.iter().chain(["KUBE-FIREWALL"].iter()) {
        let _ = writeln!(text, ":{chain} - [0:0]");
    }
    for (src, dst, comment, new_only) in FILTER {
        text.push_str(&format!("-I {src}"));
        if *new_only {
            text.push_str(" -m conntrack --ctstate NEW");
        }
        if !comment.is_empty() {
            let _ = write!(text, " -m comment --comment \"{comment}\"");
        }
        let _ = writeln!(text, " -j {dst}");
    }
    text.push_str("COMMIT\n*nat\n");
    for chain in NAT_CHAINS {
        let _ = writeln!(text, ":{chain} - [0:0]");
    }
    for (src, dst, comment) in NAT {
        let _ = writeln!(text, "-I {src} -m comment --comment \"{comment}\" -j {dst}");
    }
    text.push_str("COMMIT\n");
    let counts = IptablesCounts {
        jump_rules: FILTER.len() + NAT.len(),
        bytes: text.len(),
        ..Default::default()
    };
    Restore { text, counts }
}

/// The filter-table chains kube-proxy's iptables proxier declares on every sync.
const FILTER_CHAINS: [&str; 5] = [
    "KUBE-SERVICES",
    "KUBE-EXTERNAL-SERVICES",
    "KUBE-FORWARD",
    "KUBE-NODEPORTS",
    "KUBE-PROXY-FIREWALL",
];
/// The nat-table chains it declares on every sync.
const NAT_CHAINS: [&str; 4] = [
    "KUBE-SERVICES",
    "KUBE-NODEPORTS",
    "KUBE-POSTROUTING",
    "KUBE-MARK-MASQ",
];

/// Which services a sync rewrites.
#[derive(Debug, Clone, Copy)]
pub struct Scope<'a> {
    /// `None`: a full sync, every service's chains. `Some`: a partial sync (kube-proxy >= 1.27,
    /// `MinimizeIPTablesRestore`): the top-level chains (all of `KUBE-SERVICES`) plus the chains
    /// of the services at these indices.
    pub changed: Option<&'a [usize]>,
    /// Chains to delete (kube-proxy finds them with `iptables-save`, which it skips in large
    /// cluster mode except once per sync period).
    pub stale: &'a [String],
}

impl Scope<'static> {
    /// A full sync that deletes nothing.
    pub const FULL: Scope<'static> = Scope { changed: None, stale: &[] };
}

/// The `iptables-restore --noflush` input of one sync of kube-proxy's iptables proxier.
pub fn iptables_sync(services: &[Svc], scope: Scope) -> Restore {
    let total_endpoints: usize = services.iter().map(|s| s.endpoints.len()).sum();
    let large = total_endpoints > LARGE_CLUSTER_ENDPOINTS;
    let mut filter_chains = String::new();
    let mut filter_rules = Lines::default();
    let mut nat_chains = String::new();
    let mut nat_rules = Lines::default();
    let mut chains = 0;

    for chain in FILTER_CHAINS {
        let _ = writeln!(filter_chains, ":{chain} - [0:0]");
        chains += 1;
    }
    for chain in NAT_CHAINS {
        let _ = writeln!(nat_chains, ":{chain} - [0:0]");
        chains += 1;
    }
    nat_rules.push(format!(
        "-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN"
    ));
    nat_rules.push(format!("-A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}"));
    nat_rules.push(
        "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" \
         -j MASQUERADE --random-fully"
            .to_string(),
    );
    nat_rules.push(format!("-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}"));
    // localhostNodePorts (the default) makes kube-proxy keep kubelet's anti-martian rule.
    let _ = writeln!(filter_chains, ":KUBE-FIREWALL - [0:0]");
    chains += 1;
    filter_rules.push(
        "-A KUBE-FIREWALL -m comment --comment \"block incoming localnet connections\" \
         -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP"
            .to_string(),
    );

    let mut kube_services_rules = 0;
    let mut kube_nodeports_rules = 0;
    for (index, svc) in services.iter().enumerate() {
        let name = svc.port_name();
        let svc_chain = svc.svc_chain();
        let ip = svc.cluster_ip;
        let port = svc.port;
        // Capture the clusterIP (always written, also in a partial sync).
        nat_rules.push(format!(
            "-A KUBE-SERVICES -m comment --comment \"{name} cluster IP\" -m tcp -p tcp \
             -d {ip} --dport {port} -j {svc_chain}"
        ));
        kube_services_rules += 1;
        // Capture the NodePort (always written too: KUBE-NODEPORTS is a top-level chain).
        if svc.node_port != 0 && !svc.endpoints.is_empty() {
            nat_rules.push(format!(
                "-A KUBE-NODEPORTS -m comment --comment {name} -m tcp -p tcp --dport {} -j {}",
                svc.node_port,
                svc.ext_chain()
            ));
            kube_nodeports_rules += 1;
        }
        let write_chains = scope.changed.is_none_or(|c| c.contains(&index));
        if !write_chains || svc.endpoints.is_empty() {
            continue;
        }
        // Internal traffic from outside the cluster CIDR is masqueraded.
        nat_rules.push(format!(
            "-A {svc_chain} -m comment --comment \"{name} cluster IP\" -m tcp -p tcp \
             -d {ip} --dport {port} ! -s {CLUSTER_CIDR} -j KUBE-MARK-MASQ"
        ));
        // External traffic (Cluster policy): masqueraded, then the service chain.
        if svc.node_port != 0 {
            let ext_chain = svc.ext_chain();
            let _ = writeln!(nat_chains, ":{ext_chain} - [0:0]");
            chains += 1;
            nat_rules.push(format!(
                "-A {ext_chain} -m comment --comment \"masquerade traffic for {name} external destinations\" \
                 -j KUBE-MARK-MASQ"
            ));
            nat_rules.push(format!("-A {ext_chain} -j {svc_chain}"));
        }
        let _ = writeln!(nat_chains, ":{svc_chain} - [0:0]");
        chains += 1;
        let n = svc.endpoints.len();
        for (i, &ep) in svc.endpoints.iter().enumerate() {
            let mut rule = format!("-A {svc_chain}");
            if !large {
                let _ = write!(rule, " -m comment --comment \"{name} -> {}\"", svc.endpoint(ep));
            }
            if i < n - 1 {
                let _ = write!(
                    rule,
                    " -m statistic --mode random --probability {:.10}",
                    1.0 / (n - i) as f64
                );
            }
            let _ = write!(rule, " -j {}", svc.sep_chain(ep));
            nat_rules.push(rule);
        }
        for &ep in &svc.endpoints {
            let sep = svc.sep_chain(ep);
            let _ = writeln!(nat_chains, ":{sep} - [0:0]");
            chains += 1;
            let comment = if large {
                String::new()
            } else {
                format!(" -m comment --comment {name}")
            };
            nat_rules.push(format!("-A {sep}{comment} -s {ep} -j KUBE-MARK-MASQ"));
            nat_rules.push(format!(
                "-A {sep}{comment} -m tcp -p tcp -j DNAT --to-destination {}",
                svc.endpoint(ep)
            ));
        }
    }
    for chain in scope.stale {
        let _ = writeln!(nat_chains, ":{chain} - [0:0]");
        nat_rules.push(format!("-X {chain}"));
    }
    // nodePortAddresses matches all and localhost NodePorts are allowed: no "! -d 127.0.0.0/8".
    nat_rules.push(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be \
         the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"
            .to_string(),
    );
    kube_services_rules += 1;
    filter_rules.push("-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP".to_string());
    filter_rules.push(format!(
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" \
         -m mark --mark {MASQ_MARK}/{MASQ_MARK} -j ACCEPT"
    ));
    filter_rules.push(
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" \
         -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
            .to_string(),
    );

    let mut text = String::with_capacity(
        filter_chains.len() + filter_rules.text.len() + nat_chains.len() + nat_rules.text.len() + 64,
    );
    text.push_str("*filter\n");
    text.push_str(&filter_chains);
    text.push_str(&filter_rules.text);
    text.push_str("COMMIT\n*nat\n");
    text.push_str(&nat_chains);
    text.push_str(&nat_rules.text);
    text.push_str("COMMIT\n");
    let stale = scope.stale.len();
    let counts = IptablesCounts {
        nat_rules: nat_rules.count - stale,
        filter_rules: filter_rules.count,
        chains,
        jump_rules: 0,
        kube_services_rules,
        kube_nodeports_rules,
        bytes: text.len(),
    };
    Restore { text, counts }
}

#[derive(Default)]
struct Lines {
    text: String,
    count: usize,
}

impl Lines {
    fn push(&mut self, line: String) {
        self.text.push_str(&line);
        self.text.push('\n');
        self.count += 1;
    }
}

/// The `nft -f` input of one kube-proxy nftables transaction, and its counts.
pub struct NftTransaction {
    pub text: String,
    pub counts: NftCounts,
}

const T: &str = "ip kube-proxy";

/// kube-proxy's base chains: name, type, hook, priority.
const NFT_BASE_CHAINS: [(&str, &str, &str, i32); 8] = [
    ("filter-prerouting-pre-dnat", "filter", "prerouting", -110),
    ("filter-output-pre-dnat", "filter", "output", -110),
    ("filter-input", "filter", "input", 0),
    ("filter-forward", "filter", "forward", 0),
    ("filter-output", "filter", "output", 0),
    ("nat-prerouting", "nat", "prerouting", -100),
    ("nat-output", "nat", "output", -100),
    ("nat-postrouting", "nat", "postrouting", 100),
];

/// kube-proxy's `nftablesJumpChains`: destination, source, match.
const NFT_JUMPS: [(&str, &str, &str); 11] = [
    ("nodeport-endpoints-check", "filter-input", "ct state new"),
    ("service-endpoints-check", "filter-input", "ct state new"),
    ("service-endpoints-check", "filter-forward", "ct state new"),
    ("service-endpoints-check", "filter-output", "ct state new"),
    ("firewall-check", "filter-prerouting-pre-dnat", "ct state new"),
    ("firewall-check", "filter-output-pre-dnat", "ct state new"),
    ("services", "nat-output", ""),
    ("services", "nat-prerouting", ""),
    ("masquerading", "nat-postrouting", ""),
    ("cluster-ips-check", "filter-forward", "ct state new"),
    ("cluster-ips-check", "filter-output", "ct state new"),
];

#[derive(Default)]
struct Tx {
    text: String,
    counts: NftCounts,
    created: std::collections::HashSet<String>,
}

impl Tx {
    fn line(&mut self, line: std::fmt::Arguments) {
        let _ = self.text.write_fmt(line);
        self.text.push('\n');
    }

    /// kube-proxy's `ensureChain`: add + flush, once per transaction.
    fn ensure_chain(&mut self, chain: &str) {
        if self.created.insert(chain.to_string()) {
            self.line(format_args!("add chain {T} {chain}"));
            self.line(format_args!("flush chain {T} {chain}"));
            self.counts.chains += 1;
        }
    }

    fn rule(&mut self, chain: &str, rule: std::fmt::Arguments) {
        let _ = write!(self.text, "add rule {T} {chain} ");
        self.line(rule);
        self.counts.rules += 1;
    }
}

/// The transaction of kube-proxy's first (full) nftables sync from an empty table:
/// `setupNFTables` and every service.
pub fn nft_full(services: &[Svc]) -> NftTransaction {
    let mut tx = Tx::default();
    tx.line(format_args!("add table {T} {{ comment \"rules for kube-proxy\" ; }}"));
    // First sync: add + delete every base chain so that they are recreated.
    for (name, ..) in NFT_BASE_CHAINS {
        tx.line(format_args!("add chain {T} {name}"));
        tx.line(format_args!("delete chain {T} {name}"));
    }
    for (name, kind, hook, priority) in NFT_BASE_CHAINS {
        tx.line(format_args!(
            "add chain {T} {name} {{ type {kind} hook {hook} priority {priority} ; }}"
        ));
        tx.line(format_args!("flush chain {T} {name}"));
        tx.counts.chains += 1;
    }
    for (dst, src, matches) in NFT_JUMPS {
        tx.ensure_chain(dst);
        let sep = if matches.is_empty() { "" } else { " " };
        tx.rule(src, format_args!("{matches}{sep}jump {dst}"));
    }
    for chain in ["services", "cluster-ips-check", "masquerading", "mark-for-masquerade"] {
        tx.ensure_chain(chain);
    }
    tx.rule("mark-for-masquerade", format_args!("mark set mark or {MASQ_MARK}"));
    tx.rule("masquerading", format_args!("mark and {MASQ_MARK} == 0 return"));
    tx.rule("masquerading", format_args!("mark set mark xor {MASQ_MARK}"));
    tx.rule("masquerading", format_args!("masquerade fully-random"));
    tx.line(format_args!(
        "add set {T} cluster-ips {{ type ipv4_addr ; comment \"Active ClusterIPs\" ; }}"
    ));
    tx.rule(
        "cluster-ips-check",
        format_args!(
            "ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\""
        ),
    );
    tx.rule(
        "cluster-ips-check",
        format_args!(
            "ip daddr {{ {SERVICE_CIDR} }} drop comment \"Drop traffic to unallocated ClusterIPs\""
        ),
    );
    // nodePortAddresses `primary` (the nftables mode's default): the node's primary address.
    tx.line(format_args!(
        "add set {T} nodeport-ips {{ type ipv4_addr ; comment \"IPs that accept NodePort traffic\" ; }}"
    ));
    tx.line(format_args!("flush set {T} nodeport-ips"));
    tx.line(format_args!("add element {T} nodeport-ips {{ {NODE_ADDRESS} }}"));
    tx.counts.set_elements += 1;
    tx.line(format_args!(
        "add map {T} no-endpoint-services {{ type ipv4_addr . inet_proto . inet_service : verdict ; \
         comment \"vmap to drop or reject packets to services with no endpoints\" ; }}"
    ));
    tx.line(format_args!(
        "add map {T} no-endpoint-nodeports {{ type inet_proto . inet_service : verdict ; \
         comment \"vmap to drop or reject packets to service nodeports with no endpoints\" ; }}"
    ));
    tx.line(format_args!(
        "add chain {T} reject-chain {{ comment \"helper for @no-endpoint-services / @no-endpoint-nodeports\" ; }}"
    ));
    tx.line(format_args!("flush chain {T} reject-chain"));
    tx.counts.chains += 1;
    tx.rule("reject-chain", format_args!("reject"));
    tx.rule(
        "service-endpoints-check",
        format_args!("ip daddr . meta l4proto . th dport vmap @no-endpoint-services"),
    );
    tx.rule(
        "nodeport-endpoints-check",
        format_args!("ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports"),
    );
    tx.line(format_args!(
        "add map {T} firewall-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; \
         comment \"destinations that are subject to LoadBalancerSourceRanges\" ; }}"
    ));
    tx.ensure_chain("firewall-check");
    tx.rule(
        "firewall-check",
        format_args!("ip daddr . meta l4proto . th dport vmap @firewall-ips"),
    );
    tx.line(format_args!(
        "add map {T} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; \
         comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}"
    ));
    tx.line(format_args!(
        "add map {T} service-nodeports {{ type inet_proto . inet_service : verdict ; \
         comment \"NodePort traffic\" ; }}"
    ));
    tx.rule(
        "services",
        format_args!("ip daddr . meta l4proto . th dport vmap @service-ips"),
    );
    tx.rule(
        "services",
        format_args!("ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports"),
    );
    for svc in services {
        nft_service(&mut tx, svc, true);
    }
    tx.counts.bytes = tx.text.len();
    NftTransaction {
        text: tx.text,
        counts: tx.counts,
    }
}

/// One service in a transaction: chains, map elements (only when `elements`: a partial sync of
/// an unchanged ClusterIP writes none) and rules.
fn nft_service(tx: &mut Tx, svc: &Svc, elements: bool) {
    let chain = svc.nft_service_chain();
    let endpoint_chains: Vec<String> = svc
        .endpoints
        .iter()
        .map(|&ep| svc.nft_endpoint_chain(ep))
        .collect();
    for c in &endpoint_chains {
        tx.ensure_chain(c);
    }
    let external = (svc.node_port != 0).then(|| svc.nft_external_chain());
    if !svc.endpoints.is_empty() {
        tx.ensure_chain(&chain);
        if let Some(ext) = &external {
            tx.ensure_chain(ext);
        }
    }
    let ip = svc.cluster_ip;
    let port = svc.port;
    if elements {
        tx.line(format_args!("add element {T} cluster-ips {{ {ip} }}"));
        tx.counts.set_elements += 1;
        if !svc.endpoints.is_empty() {
            tx.line(format_args!(
                "add element {T} service-ips {{ {ip} . tcp . {port} : goto {chain} }}"
            ));
            tx.counts.map_elements += 1;
            if let Some(ext) = &external {
                tx.line(format_args!(
                    "add element {T} service-nodeports {{ tcp . {} : goto {ext} }}",
                    svc.node_port
                ));
                tx.counts.map_elements += 1;
            }
        }
    }
    if svc.endpoints.is_empty() {
        return;
    }
    tx.rule(
        &chain,
        format_args!("ip daddr {ip} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade"),
    );
    let vmap: Vec<String> = endpoint_chains
        .iter()
        .enumerate()
        .map(|(i, c)| format!("{i} : goto {c}"))
        .collect();
    tx.rule(
        &chain,
        format_args!(
            "numgen random mod {} vmap {{ {} }}",
            endpoint_chains.len(),
            vmap.join(" , ")
        ),
    );
    if let Some(ext) = &external {
        tx.rule(ext, format_args!("jump mark-for-masquerade"));
        tx.rule(ext, format_args!("goto {chain}"));
    }
    for (c, &ep) in endpoint_chains.iter().zip(&svc.endpoints) {
        tx.rule(c, format_args!("ip saddr {ep} jump mark-for-masquerade"));
        tx.rule(
            c,
            format_args!("meta l4proto tcp dnat to {}", svc.endpoint(ep)),
        );
    }
}

/// The transaction of kube-proxy's partial nftables sync after the endpoints of `new` changed
/// (it was `old`): the service's chains are rewritten and chains no longer used are flushed
/// (kube-proxy deletes them in a later sync, once they are a second old).
pub fn nft_partial(old: &Svc, new: &Svc) -> NftTransaction {
    let mut tx = Tx::default();
    nft_service(&mut tx, new, false);
    for &ep in &old.endpoints {
        let chain = old.nft_endpoint_chain(ep);
        if !new.endpoints.contains(&ep) {
            tx.line(format_args!("flush chain {T} {chain}"));
        }
    }
    tx.counts.bytes = tx.text.len();
    NftTransaction {
        text: tx.text,
        counts: tx.counts,
    }
}

/// The `KUBE-SEP-…` chains of `old` that `new` no longer uses.
pub fn stale_sep_chains(old: &Svc, new: &Svc) -> Vec<String> {
    old.endpoints
        .iter()
        .filter(|ep| !new.endpoints.contains(ep))
        .map(|&ep| old.sep_chain(ep))
        .collect()
}

/// Whether kube-proxy's iptables proxier runs in large cluster mode for these services.
pub fn large_cluster_mode(services: &[Svc]) -> bool {
    services.iter().map(|s| s.endpoints.len()).sum::<usize>() > LARGE_CLUSTER_ENDPOINTS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str, endpoints: usize) -> Svc {
        Svc {
            name: name.into(),
            cluster_ip: "10.96.0.10".parse().unwrap(),
            port: 80,
            node_port: 30080,
            target_port: 8080,
            endpoints: (0..endpoints)
                .map(|i| Ipv4Addr::new(10, 128, 0, i as u8))
                .collect(),
        }
    }

    #[test]
    fn chain_names_match_kube_proxy() {
        // Expected values from kube-proxy's own hash functions (sha256, base32, 16 chars):
        // servicePortPolicyClusterChain("ns1/svc1:p80", "tcp") in its proxier_test.go.
        assert_eq!(
            format!("KUBE-SVC-{}", hash_b32("ns1/svc1:p80tcp", 16)),
            "KUBE-SVC-XPGD46QRK7WJZT7O"
        );
        assert_eq!(
            format!("KUBE-SEP-{}", hash_b32("ns1/svc1:p80tcp10.180.0.1:80", 16)),
            "KUBE-SEP-SXIVWICOYRO3J4NJ"
        );
        // nftables: servicePortChainNameBase of ns1/svc1:p80 is "ULMVA6XW-ns1/svc1/tcp/p80".
        assert_eq!(hash_and_truncate("ns1/svc1/tcp/p80"), "ULMVA6XW-ns1/svc1/tcp/p80");
        assert_eq!(
            hash_and_truncate("ns1/svc1/tcp/p80__10.180.0.1/80"),
            "5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"
        );
    }

    #[test]
    fn iptables_counts_follow_the_layout() {
        let services = vec![svc("a", 3), svc("b", 3)];
        let r = iptables_sync(&services, Scope::FULL);
        // Per service: 1 KUBE-SERVICES + 1 KUBE-NODEPORTS + 2 EXT + 1 masq + 3 SVC->SEP
        // + 3 x 2 SEP rules = 14. Fixed: 3 KUBE-POSTROUTING + 1 KUBE-MARK-MASQ + 1 nodeports.
        assert_eq!(r.counts.nat_rules, 2 * 14 + 5);
        assert_eq!(r.counts.filter_rules, 4);
        assert_eq!(r.counts.kube_services_rules, 3);
        assert_eq!(r.counts.kube_nodeports_rules, 2);
        assert_eq!(r.counts.chains, 5 + 4 + 1 + 2 * 5);
        assert!(r.text.contains("-A KUBE-NODEPORTS -m comment --comment bench/a:http -m tcp -p tcp --dport 30080 -j KUBE-EXT-"));
        assert!(r.text.contains("--probability 0.3333333333"));
        assert!(r.text.contains("--probability 0.5000000000"));
        assert!(r.text.contains("-m comment --comment \"bench/a:http -> 10.128.0.0:8080\""));

        let partial = iptables_sync(
            &services,
            Scope { changed: Some(&[1]), stale: &["KUBE-SEP-X".to_string()] },
        );
        // The changed service's chains, every KUBE-SERVICES and KUBE-NODEPORTS rule.
        assert_eq!(partial.counts.nat_rules, 14 + 2 + 5);
        assert!(partial.text.contains("-X KUBE-SEP-X"));
        assert!(!partial.text.contains(&services[0].svc_chain().replace("KUBE-SVC", ":KUBE-SVC")));
    }

    #[test]
    fn nft_counts_follow_the_layout() {
        let services = vec![svc("a", 2)];
        let t = nft_full(&services);
        assert_eq!(t.counts.map_elements, 2, "service-ips and service-nodeports");
        assert_eq!(t.counts.set_elements, 2, "cluster-ips and nodeport-ips");
        assert!(t.text.contains("numgen random mod 2 vmap { 0 : goto endpoint-"));
        assert!(t.text.contains("add element ip kube-proxy service-nodeports { tcp . 30080 : goto external-"));
        let mut new = services[0].clone();
        new.endpoints[0] = "10.128.9.9".parse().unwrap();
        let p = nft_partial(&services[0], &new);
        assert_eq!(p.counts.rules, 2 + 2 + 2 * 2);
        assert!(p.text.contains(&format!(
            "flush chain ip kube-proxy {}",
            services[0].nft_endpoint_chain(services[0].endpoints[0])
        )));
    }
}
