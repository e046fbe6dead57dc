//! Privileged end-to-end tests of the per-packet (tc) datapath across two nodes: an external
//! client, two nodes each running kproxy, pods on both.
//!
//! ```text
//!  ext netns: eth0 192.168.50.100 (and .101)        node-1 netns: kpext0 192.168.50.2
//!    192.168.60.0/24, 10.96.0.0/16   ┐              pods 10.244.1.0/24 (pod-a, pod-b)
//!    via .2                          │
//!                                    ├─ lan0 ─┬──   10.244.2.0/24 via .3
//!                                    │ (lan   │
//!                                    │ netns) └──   node-2 netns: kpext0 192.168.50.3
//!                                                   pods 10.244.2.0/24 (pod-c)
//!                                                   10.244.1.0/24 via .2
//! ```
//! Both nodes forward and run `kproxy run --devices kpext0`. The external client reaches
//! node-1's NodePort, or an external or load-balancer IP routed to node-1; a backend on node-2
//! answers only if node-1 source-translated the request (node-2 would otherwise reply to the
//! client directly, from the pod's address, which the client would not accept). Nothing here
//! has a route out of these namespaces; the harnesses and guards tear everything down.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{binaries, datapath_drops, say, skip_unless_root, tcp_retransmissions};
use kproxy_e2e::harness::{unique_bpffs_dir, Harness, HTTP_PORT, UDP_PORT};
use kproxy_e2e::report::Report;
use kproxy_e2e::topology::{output_in, spawn_in, Netns};

const DEVICE: &str = "kpext0";
const NODE_IPS: [&str; 2] = ["192.168.50.2", "192.168.50.3"];
const NODE_NAMES: [&str; 2] = ["node-1", "node-2"];
const EXT_IP: &str = "192.168.50.100";
const OTHER_EXT_IP: &str = "192.168.50.101";
const EXTERNAL_IP: &str = "192.168.60.10";
/// A load-balancer ingress IP, routed to node-1 like the external IP.
const LB_IP: &str = "192.168.60.20";
const CLIENT_WAIT: Duration = Duration::from_secs(90);

/// Two nodes with their pods and agents, the LAN between them and the external client.
struct Cluster {
    // Field order is drop order: agents and pods first, then the client and the LAN.
    nodes: [Harness; 2],
    ext: Netns,
    lan: Netns,
}

/// Runs `sh -c script` in `ns`, panicking with its output if it fails.
fn sh(ns: &Netns, script: &str) {
    let mut cmd = Command::new("sh");
    cmd.args(["-ec", script]);
    let out = output_in(ns, None, cmd, Duration::from_secs(20)).unwrap_or_else(|e| panic!("{script}: {e:#}"));
    assert!(out.status.success(), "{script}: {}", String::from_utf8_lossy(&out.stderr));
}

impl Cluster {
    /// Builds the cluster, writes `manifest(&cluster)` for both agents and starts them; `None`
    /// (after saying so) when not root.
    fn new(test: &str, manifest: fn(&Cluster) -> String) -> Option<Cluster> {
        if skip_unless_root(test) {
            return None;
        }
        let node = |i: usize, pods: &[&str]| {
            Harness::on_subnet(binaries(), pods, unique_bpffs_dir("kproxy-2n"), i as u8 + 1)
                .unwrap_or_else(|e| panic!("{test}: node {}: {e:#}", NODE_NAMES[i]))
                .with_agent_args(&[
                    "--devices",
                    DEVICE,
                    "--hostname-override",
                    NODE_NAMES[i],
                    "--healthz-bind-address",
                    "",
                    // /metrics on the node's 127.0.0.1:10249 (the default), for the drop counters.
                ])
        };
        let nodes = [node(0, &["pod-a", "pod-b"]), node(1, &["pod-c"])];
        let lan = Netns::new("lan").unwrap_or_else(|e| panic!("{test}: lan netns: {e:#}"));
        let ext = Netns::new("ext").unwrap_or_else(|e| panic!("{test}: ext netns: {e:#}"));
        sh(&lan, "ip link add lan0 type bridge; ip link set lan0 up");
        let plug = |ns: &Netns, device: &str, address: &str, port: &str| {
            sh(ns, &format!("ip link add {device} type veth peer name {port} netns {}", lan.name()));
            sh(ns, &format!("ip addr add {address}/24 dev {device}; ip link set {device} up; ip link set lo up"));
            sh(&lan, &format!("ip link set {port} master lan0; ip link set {port} up"));
        };
        plug(&ext, "eth0", EXT_IP, "lext");
        for (i, h) in nodes.iter().enumerate() {
            plug(&h.topology.node, DEVICE, NODE_IPS[i], &format!("ln{i}"));
        }
        sh(&ext, &format!("ip route add 192.168.60.0/24 via {}", NODE_IPS[0]));
        // The Service range too, as a router outside the cluster may route it to a node.
        sh(&ext, &format!("ip route add 10.96.0.0/16 via {}", NODE_IPS[0]));
        for (i, h) in nodes.iter().enumerate() {
            let (other, other_ip) = (&nodes[1 - i], NODE_IPS[1 - i]);
            let route = format!("ip route add {} via {other_ip}", other.topology.pod_cidr());
            sh(&h.topology.node, &format!("{route}; echo 1 > /proc/sys/net/ipv4/ip_forward"));
        }
        let mut cluster = Cluster { nodes, ext, lan };
        let yaml = manifest(&cluster);
        for (i, h) in cluster.nodes.iter_mut().enumerate() {
            h.write_manifest(&yaml).expect("write manifest");
            h.start_agent().expect("start kproxy run");
            let node_ip = NODE_IPS[i];
            h.wait_for_dump(Duration::from_secs(10), |d| {
                d.services.iter().any(|s| s.frontend.starts_with(&format!("{node_ip}:")))
            })
            .unwrap_or_else(|e| panic!("{test}: {}: NodePorts not programmed: {e:#}\n{}", NODE_NAMES[i], h.agent_log()));
        }
        Some(cluster)
    }

    fn pod_ip(&self, pod: &str) -> String {
        let node = if pod == "pod-c" { &self.nodes[1] } else { &self.nodes[0] };
        node.topology.pod(pod).ip.to_string()
    }

    /// Runs `kproxy-testpod <args>` in the external namespace.
    fn client(&self, args: &[&str]) -> Report {
        let mut cmd = Command::new(&self.nodes[0].binaries().testpod);
        cmd.args(args).stdin(Stdio::null());
        let out = output_in(&self.ext, None, cmd, CLIENT_WAIT).unwrap_or_else(|e| panic!("client {args:?}: {e:#}"));
        let stdout = String::from_utf8_lossy(&out.stdout);
        Report::parse(&stdout).unwrap_or_else(|e| panic!("client {args:?} printed {stdout:?}: {e:#}"))
    }

    /// The status code and body of `GET http://ADDRESS/` from the external client.
    fn curl(&self, address: &str) -> (u16, String) {
        let mut curl = Command::new("curl");
        curl.args(["-s", "--max-time", "5", "-w", "\n%{http_code}", &format!("http://{address}/")]);
        let out = output_in(&self.ext, None, curl, Duration::from_secs(20)).expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }
}

/// A Service `name` at `cluster_ip` with `ports` (name, port, nodePort, protocol, the pods'
/// target port) and one EndpointSlice of `endpoints` (address, node), followed by `---`.
/// `spec` is appended to the spec: more fields indented two spaces, and possibly a `status:`
/// line after them.
fn service(name: &str, cluster_ip: &str, spec: &str, ports: &[(&str, u16, u16, &str, u16)], endpoints: &[(String, &str)]) -> String {
    let svc_ports: Vec<String> =
        ports.iter().map(|(n, p, np, proto, _)| format!("{{name: {n}, port: {p}, nodePort: {np}, protocol: {proto}}}")).collect();
    let slice_ports: Vec<String> =
        ports.iter().map(|(n, _, _, proto, target)| format!("{{name: {n}, port: {target}, protocol: {proto}}}")).collect();
    let eps: String = endpoints.iter().map(|(ip, node)| format!("- {{addresses: [{ip}], nodeName: {node}}}\n")).collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  clusterIP: {cluster_ip}\n  \
         ports: [{}]\n{spec}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: {name}-1, namespace: default, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\n\
         ports: [{}]\nendpoints:\n{eps}---\n",
        svc_ports.join(", "),
        slice_ports.join(", "),
    )
}

const HTTP: (&str, u16, &str, u16) = ("http", 80, "TCP", HTTP_PORT);

/// The HTTP port of a Service at `node_port`.
fn http(node_port: u16) -> (&'static str, u16, u16, &'static str, u16) {
    (HTTP.0, HTTP.1, node_port, HTTP.2, HTTP.3)
}

/// A Service served by pod-c only, on node-2: NodePort (TCP and UDP) and an external IP; one
/// with endpoints on both nodes; a load balancer limited by source ranges.
fn remote_manifest(c: &Cluster) -> String {
    let (a, pc) = ((c.pod_ip("pod-a"), "node-1"), (c.pod_ip("pod-c"), "node-2"));
    service(
        "remote",
        "10.96.0.30",
        &format!("  type: NodePort\n  externalIPs: [{EXTERNAL_IP}]"),
        &[http(30081), ("dns", 53, 30053, "UDP", UDP_PORT)],
        std::slice::from_ref(&pc),
    ) + &service("mixed", "10.96.0.31", "  type: NodePort", &[http(30082)], &[a, pc.clone()])
        + &service(
            "limited",
            "10.96.0.32",
            &format!(
                "  type: LoadBalancer\n  loadBalancerSourceRanges: [{EXT_IP}/32, 10.0.0.0/8]\n\
                 status: {{loadBalancer: {{ingress: [{{ip: {LB_IP}}}]}}}}"
            ),
            &[http(30083)],
            &[pc],
        )
}

#[test]
fn load_balancer_source_ranges_admit_only_their_clients() {
    let test = "load_balancer_source_ranges_admit_only_their_clients";
    let Some(c) = Cluster::new(test, remote_manifest) else { return };
    // A second address on the client, outside the ranges.
    sh(&c.ext, &format!("ip addr add {OTHER_EXT_IP}/24 dev eth0"));
    let get = |source: &str, address: &str| {
        let mut curl = Command::new("curl");
        curl.args(["-s", "--max-time", "2", "--interface", source, "-w", "\n%{http_code}", &format!("http://{address}/")]);
        let out = output_in(&c.ext, None, curl, Duration::from_secs(20)).expect("curl");
        (out.status.code(), String::from_utf8_lossy(&out.stdout).to_string())
    };
    let lb = format!("{LB_IP}:80");
    let (code, body) = get(EXT_IP, &lb);
    assert_eq!(code, Some(0), "{body}");
    assert!(body.starts_with("pod-c\n") && body.ends_with("\n200"), "{body}");
    // curl exit 28: timed out, the SYN was dropped (not refused: that would be exit 7), and
    // node-1 counted each SYN (and retransmission) the client sent as a source-range drop.
    let (drops_before, retrans_before) = (datapath_drops(&c.nodes[0]), tcp_retransmissions(&c.ext));
    let (code, body) = get(OTHER_EXT_IP, &lb);
    assert_eq!(code, Some(28), "{OTHER_EXT_IP} is outside the source ranges: {body}");
    // One attempt: its SYN and the SYN's retransmissions.
    let syns = 1 + tcp_retransmissions(&c.ext) - retrans_before;
    let mut want = drops_before.clone();
    *want.get_mut("source_range").unwrap() += syns;
    assert_eq!(datapath_drops(&c.nodes[0]), want, "{test}: {syns} SYNs from {OTHER_EXT_IP} dropped by source range");
    // The ranges guard the load-balancer IP only; the NodePort stays open, as in kube-proxy.
    let (code, body) = get(OTHER_EXT_IP, &format!("{}:30083", NODE_IPS[0]));
    assert_eq!(code, Some(0), "{body}");
    say(&format!("{test}: {EXT_IP} admitted, {OTHER_EXT_IP} dropped at {LB_IP} ({syns} SYNs counted), NodePort open to both"));
}

#[test]
fn node_port_and_external_ip_reach_a_backend_on_another_node() {
    let test = "node_port_and_external_ip_reach_a_backend_on_another_node";
    let Some(c) = Cluster::new(test, remote_manifest) else { return };
    let node1 = NODE_IPS[0];
    // TCP: node-1 translates to pod-c on node-2 and to its own address; the reply comes back
    // through node-1 and leaves as the NodePort.
    let report = c.client(&["http", "--addr", &format!("{node1}:30081"), "--count", "50"]);
    assert_eq!((report.ok, report.backend("pod-c")), (50, 50), "{report:?}");
    assert_eq!(report.peers.get(&format!("{node1}:30081")), Some(&50), "{report:?}");
    assert_eq!(report.seen_as.get(node1), Some(&50), "pod-c must see node-1's address: {report:?}");
    // UDP, a new socket (and source port) per datagram: each flow gets its own SNAT port.
    let report = c.client(&["udp", "--addr", &format!("{node1}:30053"), "--count", "30", "--new-socket"]);
    assert_eq!((report.ok, report.backend("pod-c")), (30, 30), "{report:?}");
    assert_eq!(report.sources.get(&format!("{node1}:30053")), Some(&30), "{report:?}");
    assert_eq!(report.seen_as.get(node1), Some(&30), "{report:?}");
    // An external IP routed to node-1, kept-alive connection: one flow, 20 requests.
    let report = c.client(&["http", "--addr", &format!("{EXTERNAL_IP}:80"), "--count", "20", "--keepalive"]);
    assert_eq!((report.ok, report.backend("pod-c")), (20, 20), "{report:?}");
    assert_eq!(report.peers.get(&format!("{EXTERNAL_IP}:80")), Some(&1), "one connection: {report:?}");
    // The ClusterIP, routed to node-1 from outside: translated at ingress like the others.
    let report = c.client(&["http", "--addr", "10.96.0.30:80", "--count", "20"]);
    assert_eq!((report.ok, report.backend("pod-c")), (20, 20), "{report:?}");
    assert_eq!(report.peers.get("10.96.0.30:80"), Some(&20), "{report:?}");
    // A Service with a local and a remote endpoint: only the remote one is source-translated;
    // the local pod sees the client itself (kproxy, like Cilium, translates only what needs it).
    let report = c.client(&["http", "--addr", &format!("{node1}:30082"), "--count", "60"]);
    assert_eq!(report.ok, 60, "{report:?}");
    assert!(report.backend("pod-a") >= 10 && report.backend("pod-c") >= 10, "{report:?}");
    assert_eq!(report.seen_as.get(EXT_IP).copied(), Some(report.backend("pod-a")), "{report:?}");
    assert_eq!(report.seen_as.get(node1).copied(), Some(report.backend("pod-c")), "{report:?}");
    say(&format!(
        "{test}: 50 TCP, 30 UDP, 20 kept-alive and 20 ClusterIP requests reached pod-c on node-2 through node-1, seen from {node1}; \
         mixed service: {} local (client address kept), {} remote",
        report.backend("pod-a"),
        report.backend("pod-c")
    ));
}

/// `externalTrafficPolicy: Local`, endpoints on both nodes, health check on 32001.
fn local_manifest(c: &Cluster) -> String {
    let spec = "  type: NodePort\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32001";
    service("local", "10.96.0.40", spec, &[http(30091)], &[(c.pod_ip("pod-a"), "node-1"), (c.pod_ip("pod-c"), "node-2")])
}

#[test]
fn external_traffic_policy_local_keeps_the_client_address_and_fails_over_by_health_check() {
    let test = "external_traffic_policy_local_keeps_the_client_address_and_fails_over_by_health_check";
    let Some(c) = Cluster::new(test, local_manifest) else { return };
    // The client plays the external load balancer: it sends to the first node whose health
    // check node port answers 200.
    let pick = |c: &Cluster| -> Option<usize> { (0..2).find(|&i| c.curl(&format!("{}:32001", NODE_IPS[i])).0 == 200) };
    let via = |c: &Cluster, node: usize| c.client(&["http", "--addr", &format!("{}:30091", NODE_IPS[node]), "--count", "20"]);

    assert_eq!(pick(&c), Some(0), "node-1 has a local endpoint");
    let report = via(&c, 0);
    assert_eq!((report.ok, report.backend("pod-a")), (20, 20), "node-1 uses its local endpoint only: {report:?}");
    assert_eq!(report.seen_as.get(EXT_IP), Some(&20), "the client's own address is kept: {report:?}");
    let report = via(&c, 1);
    assert_eq!((report.ok, report.backend("pod-c")), (20, 20), "node-2 uses its local endpoint only: {report:?}");
    assert_eq!(report.seen_as.get(EXT_IP), Some(&20), "{report:?}");

    // pod-a stops being ready: node-1's health check turns 503 and the balancer fails over.
    let not_ready = local_manifest(&c).replace("nodeName: node-1", "nodeName: node-1, conditions: {ready: false}");
    for h in &c.nodes {
        h.write_manifest(&not_ready).expect("rewrite manifest");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut health = c.curl(&format!("{}:32001", NODE_IPS[0]));
    while health.0 != 503 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        health = c.curl(&format!("{}:32001", NODE_IPS[0]));
    }
    assert_eq!(health.0, 503, "node-1 without local endpoints: {health:?}");
    assert!(health.1.contains(r#""localEndpoints": 0"#), "{health:?}");
    assert_eq!(pick(&c), Some(1), "the balancer fails over to node-2");
    let report = via(&c, 1);
    assert_eq!((report.ok, report.backend("pod-c"), report.seen_as.get(EXT_IP)), (20, 20, Some(&20)), "{report:?}");
    // node-1 itself no longer serves the NodePort: with no local endpoint, it drops new flows
    // (as kube-proxy does; a refusal would be ConnectionRefused at once).
    let report = c.client(&["http", "--addr", &format!("{}:30091", NODE_IPS[0]), "--count", "3", "--timeout-ms", "500"]);
    assert_eq!((report.ok, report.errors.get("TimedOut")), (0, Some(&3)), "{report:?}");
    say(&format!("{test}: client address kept on both nodes; node-1 503 after its endpoint went, traffic moved to node-2"));
}

/// NodePorts of a file server on pod-a (node-1, local) and on pod-c (node-2, remote).
fn files_manifest(c: &Cluster) -> String {
    let files = |node_port: u16| ("http", 80, node_port, "TCP", 8000);
    service("files-local", "10.96.0.50", "  type: NodePort", &[files(30800)], &[(c.pod_ip("pod-a"), "node-1")])
        + &service("files-remote", "10.96.0.51", "  type: NodePort", &[files(30801)], &[(c.pod_ip("pod-c"), "node-2")])
}

#[test]
fn path_mtu_discovery_works_through_a_node_port_to_local_and_remote_backends() {
    let test = "path_mtu_discovery_works_through_a_node_port_to_local_and_remote_backends";
    let Some(c) = Cluster::new(test, files_manifest) else { return };
    // A client behind a router whose link towards it has an MTU of 1200: the client's SYN
    // announces an MSS for 1500 bytes, so the backend's full-size segments reach the router,
    // which answers "fragmentation needed" to their source, the NodePort's address. Only if
    // node-1 hands that error to the backend does the backend shrink its segments.
    let router = Netns::new("router").expect("router netns");
    let far = Netns::new("far").expect("far netns");
    sh(&router, &format!("ip link add rlan type veth peer name lrtr netns {}", c.lan.name()));
    sh(&c.lan, "ip link set lrtr master lan0; ip link set lrtr up");
    sh(&router, &format!("ip link add rfar type veth peer name eth0 netns {}", far.name()));
    sh(&router, "ip addr add 192.168.50.254/24 dev rlan; ip link set rlan up; ip addr add 192.168.70.1/24 dev rfar; ip link set rfar mtu 1200 up; echo 1 > /proc/sys/net/ipv4/ip_forward");
    sh(&far, "ip addr add 192.168.70.100/24 dev eth0; ip link set eth0 up; ip link set lo up; ip route add default via 192.168.70.1");
    for h in &c.nodes {
        sh(&h.topology.node, "ip route add 192.168.70.0/24 via 192.168.50.254");
    }
    let dir = std::env::temp_dir().join(kproxy_e2e::topology::unique_name("kproxy-pmtu"));
    std::fs::create_dir_all(&dir).expect("create the served directory");
    let data: Vec<u8> = (0..3 * 1024 * 1024u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    std::fs::write(dir.join("file"), &data).expect("write the file");
    let _servers: Vec<_> = [("pod-a", 0), ("pod-c", 1)]
        .iter()
        .map(|(pod, node)| {
            let mut server = Command::new("python3");
            server.args(["-m", "http.server", "8000", "--bind", "0.0.0.0", "--directory"]).arg(&dir);
            server.stdout(Stdio::null()).stderr(Stdio::null());
            spawn_in(&c.nodes[*node].topology.pod(pod).netns, server).expect("start a file server")
        })
        .collect();
    std::thread::sleep(Duration::from_millis(800));
    let fetch = |port: u16| {
        let mut curl = Command::new("curl");
        curl.args(["-sS", "--max-time", "20", "--retry", "3", "--retry-connrefused", "-o", "/dev/null", "-w", "%{size_download}"]);
        curl.arg(format!("http://{}:{port}/file", NODE_IPS[0]));
        let out = output_in(&far, None, curl, Duration::from_secs(90)).expect("curl through the router");
        (out.status.code(), String::from_utf8_lossy(&out.stdout).to_string(), String::from_utf8_lossy(&out.stderr).to_string())
    };
    let local = fetch(30800);
    let remote = fetch(30801);
    let _ = std::fs::remove_dir_all(&dir);
    let want = data.len().to_string();
    assert_eq!((local.0, local.1.as_str()), (Some(0), want.as_str()), "local backend: {local:?}");
    assert_eq!((remote.0, remote.1.as_str()), (Some(0), want.as_str()), "remote backend: {remote:?}");
    say(&format!("{test}: 3 MiB through a 1200-byte MTU hop from a local and from a remote backend"));
}

/// A UDP NodePort (30055) served by `pod` on node-1.
fn udp_manifest_for(c: &Cluster, pod: &str) -> String {
    service("cycling", "10.96.0.60", "  type: NodePort", &[("dns", 53, 30055, "UDP", UDP_PORT)], &[(c.pod_ip(pod), "node-1")])
}

#[test]
fn should_be_able_to_preserve_udp_traffic_when_server_pod_cycles_for_a_node_port_service() {
    let test = "should_be_able_to_preserve_udp_traffic_when_server_pod_cycles_for_a_node_port_service";
    let Some(c) = Cluster::new(test, |c| udp_manifest_for(c, "pod-a")) else { return };
    // One unconnected socket (one flow: same source port) sending every 50 ms for 4 s; after
    // 1 s the endpoint is replaced by pod-b. pod-a keeps running, so a flow left pinned to it
    // would go on being answered by pod-a: the flow must move, as kube-proxy's conntrack
    // cleanup makes it.
    let mut cmd = Command::new(&c.nodes[0].binaries().testpod);
    cmd.args(["udp", "--addr", &format!("{}:30055", NODE_IPS[0]), "--count", "80", "--interval-ms", "50", "--timeout-ms", "200"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    let client = spawn_in(&c.ext, cmd).expect("start the client");
    std::thread::sleep(Duration::from_secs(1));
    let replaced = udp_manifest_for(&c, "pod-b");
    for h in &c.nodes {
        h.write_manifest(&replaced).expect("replace the endpoint");
    }
    let out = client.wait_with_output(CLIENT_WAIT).expect("client output");
    let report = Report::parse(&String::from_utf8_lossy(&out.stdout)).expect("client report");
    assert!(report.backend("pod-a") >= 10, "{report:?}");
    assert!(report.backend("pod-b") >= 40, "the flow follows the new endpoint: {report:?}");
    say(&format!("{test}: {} datagrams to pod-a, then {} to pod-b on the same flow", report.backend("pod-a"), report.backend("pod-b")));
}
