//! Privileged end-to-end tests of the per-packet (tc) datapath: an external client reaches a
//! NodePort through the node's device, in both tc attach modes.
//!
//! ```text
//!  ext netns                 node netns                                 pod netns
//!  eth0 192.168.50.100 ═══ kpext0 192.168.50.2   kpbr0 10.244.1.1 ═══ eth0 10.244.1.1x
//!                          (kp_tc_ingress/egress)  (forwarding on)
//! ```
//! The client sends to 192.168.50.2:30080; ingress translates to a pod, the reply leaves
//! kpext0 translated back. The ext namespace has no route anywhere else, and the node forwards
//! only between its own links; everything is torn down by the harness and guards.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::Duration;

mod common;

use common::{binaries, datapath_drops, say, skip_unless_root, tcp_retransmissions};
use kproxy_e2e::harness::{unique_bpffs_dir, Harness, HTTP_PORT, UDP_PORT};
use kproxy_e2e::report::Report;
use kproxy_e2e::topology::{output_in, spawn_in, Netns};

const NODE_IP: &str = "192.168.50.2";
const EXT_IP: &str = "192.168.50.100";
const NODE_DEVICE: &str = "kpext0";
const CLIENT_WAIT: Duration = Duration::from_secs(90);

/// The harness (node + pods), an external client namespace wired to the node's `kpext0`, and
/// the agent attached there with `tc_attach`.
struct NodePortSetup {
    h: Harness,
    ext: Netns,
}

fn manifest(h: &Harness) -> String {
    let endpoints: String = ["pod-a", "pod-b"]
        .iter()
        .map(|p| format!("- addresses: [{}]\n", h.topology.pod(p).ip))
        .collect();
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  ports:
  - {{name: http, port: 80, nodePort: 30080, protocol: TCP}}
  - {{name: dns, port: 53, nodePort: 30053, protocol: UDP}}
---
apiVersion: v1
kind: Service
metadata: {{name: files, namespace: default}}
spec:
  type: NodePort
  clusterIP: 10.96.0.80
  ports: [{{name: http, port: 80, nodePort: 30800, protocol: TCP}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: files-1, namespace: default, labels: {{kubernetes.io/service-name: files}}}}
addressType: IPv4
ports: [{{name: http, port: 8000, protocol: TCP}}]
endpoints: [{{addresses: [{files_pod}]}}]
---
apiVersion: v1
kind: Service
metadata: {{name: empty, namespace: default}}
spec:
  type: NodePort
  clusterIP: 10.96.0.99
  ports:
  - {{name: http, port: 80, nodePort: 30099, protocol: TCP}}
  - {{name: dns, port: 53, nodePort: 30099, protocol: UDP}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-1, namespace: default, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: http, port: {HTTP_PORT}, protocol: TCP}}, {{name: dns, port: {UDP_PORT}, protocol: UDP}}]
endpoints:
{endpoints}"#,
        files_pod = h.topology.pod("pod-a").ip
    )
}

impl NodePortSetup {
    fn new(test: &str, tc_attach: &str) -> Option<NodePortSetup> {
        Self::with_manifest(test, tc_attach, manifest)
    }

    /// As [`NodePortSetup::new`], with the manifest `make_manifest` writes for the harness;
    /// the agent runs as node `kproxy-node`.
    fn with_manifest(test: &str, tc_attach: &str, make_manifest: fn(&Harness) -> String) -> Option<NodePortSetup> {
        Self::with_manifest_and_args(test, tc_attach, make_manifest, &[])
    }

    /// As [`NodePortSetup::with_manifest`], with `extra` agent arguments.
    fn with_manifest_and_args(
        test: &str,
        tc_attach: &str,
        make_manifest: fn(&Harness) -> String,
        extra: &[&str],
    ) -> Option<NodePortSetup> {
        if skip_unless_root(test) {
            return None;
        }
        let h = Harness::new(binaries(), &["pod-a", "pod-b"], unique_bpffs_dir("kproxy-np"))
            .unwrap_or_else(|e| panic!("{test}: harness: {e:#}"))
            .with_agent_args(&[&[
                "--devices",
                NODE_DEVICE,
                "--tc-attach",
                tc_attach,
                "--healthz-bind-address",
                "",
                // /metrics on the node's 127.0.0.1:10249 (the default), for the drop counters.
                "--hostname-override",
                "kproxy-node",
            ][..], extra]
            .concat());
        let ext = Netns::new("ext").unwrap_or_else(|e| panic!("{test}: ext netns: {e:#}"));
        let node = &h.topology.node;
        let link = format!("ip link add {NODE_DEVICE} type veth peer name eth0 netns {}", ext.name());
        let steps: Vec<(&Netns, String)> = vec![
            (node, link),
            (node, format!("ip addr add {NODE_IP}/24 dev {NODE_DEVICE}")),
            (node, format!("ip link set {NODE_DEVICE} up")),
            (&ext, format!("ip addr add {EXT_IP}/24 dev eth0")),
            (&ext, "ip link set eth0 up".into()),
            (&ext, "ip link set lo up".into()),
        ];
        for (ns, step) in steps {
            let args: Vec<&str> = step.split_whitespace().skip(1).collect();
            ns.ip(&args).unwrap_or_else(|e| panic!("{test}: {step}: {e:#}"));
        }
        // Forwarding between the node's own links (namespace-local sysctl).
        let mut sysctl = Command::new("sh");
        sysctl.args(["-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"]);
        let out = output_in(node, None, sysctl, Duration::from_secs(10)).expect("enable forwarding");
        assert!(out.status.success(), "enable forwarding in the node namespace: {out:?}");
        let mut setup = NodePortSetup { h, ext };
        setup.h.write_manifest(&make_manifest(&setup.h)).expect("write manifest");
        setup.h.start_agent().expect("start kproxy run");
        setup
            .h
            // Generous: a starting agent needs 4-8 s under the emulation of `cargo xtask vm-test`.
            .wait_for_dump(Duration::from_secs(30), |d| {
                d.services.iter().any(|s| s.frontend.starts_with(&format!("{NODE_IP}:")) && !s.backends.is_empty())
            })
            .unwrap_or_else(|e| panic!("{test}: NodePort not programmed: {e:#}\n{}", setup.h.agent_log()));
        Some(setup)
    }

    /// Runs `kproxy-testpod <args>` in the external namespace.
    fn client(&self, args: &[&str]) -> Report {
        let mut cmd = Command::new(&self.h.binaries().testpod);
        cmd.args(args).stdin(Stdio::null());
        let out = output_in(&self.ext, None, cmd, CLIENT_WAIT).unwrap_or_else(|e| panic!("client {args:?}: {e:#}"));
        let stdout = String::from_utf8_lossy(&out.stdout);
        Report::parse(&stdout).unwrap_or_else(|e| panic!("client {args:?} printed {stdout:?}: {e:#}"))
    }
}

fn assert_spread(report: &Report, count: u64, what: &str) {
    assert_eq!(report.ok, count, "{what}: {report:?}");
    assert_eq!(report.failed(), 0, "{what}: {report:?}");
    for pod in ["pod-a", "pod-b"] {
        assert!(report.backend(pod) >= count / 5, "{what}: {pod} got too few: {report:?}");
    }
}

fn node_port_reaches_local_backends(tc_attach: &str) {
    let test = format!("node_port_reaches_local_backends_{tc_attach}");
    let Some(setup) = NodePortSetup::new(&test, tc_attach) else { return };
    let report = setup.client(&["http", "--addr", &format!("{NODE_IP}:30080"), "--count", "100"]);
    assert_spread(&report, 100, "TCP NodePort");
    // The client talks to the node address: the reply came back translated.
    assert_eq!(report.peers.get(&format!("{NODE_IP}:30080")), Some(&100), "{report:?}");
    let report =
        setup.client(&["udp", "--addr", &format!("{NODE_IP}:30053"), "--count", "40", "--new-socket"]);
    assert_spread(&report, 40, "UDP NodePort");
    assert_eq!(report.sources.get(&format!("{NODE_IP}:30053")), Some(&40), "{report:?}");
    // Without endpoints: TCP gets a RST, connected UDP an ICMP port unreachable, at once.
    let empty = format!("{NODE_IP}:30099");
    let report = setup.client(&["http", "--addr", &empty, "--count", "3"]);
    assert_eq!(report.errors.get("ConnectionRefused"), Some(&3), "{report:?}");
    assert!(report.failure_ms.as_ref().is_some_and(|l| l.max < 100.0), "refused slowly: {report:?}");
    let report = setup.client(&["udp", "--addr", &empty, "--count", "3", "--connected", "--timeout-ms", "1000"]);
    assert_eq!(report.errors.get("ConnectionRefused"), Some(&3), "{report:?}");
    say(&format!("{test}: 100 TCP and 40 UDP requests through the NodePort, all answered; no endpoints: refused"));
}

#[test]
fn node_port_reaches_local_backends_tcx() {
    node_port_reaches_local_backends("tcx");
}

#[test]
fn node_port_reaches_local_backends_netlink() {
    node_port_reaches_local_backends("netlink");
}

#[test]
fn a_node_port_flow_survives_an_agent_restart() {
    let test = "a_node_port_flow_survives_an_agent_restart";
    let Some(mut setup) = NodePortSetup::new(test, "auto") else { return };
    // One kept-alive connection sending a request every 20 ms for ~4 s, across a kill -9 and a
    // restart of the agent: conntrack and the pinned links keep it on its backend.
    let mut cmd = Command::new(&setup.h.binaries().testpod);
    cmd.args(["http", "--addr", &format!("{NODE_IP}:30080"), "--count", "200", "--interval-ms", "20", "--keepalive"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let client = spawn_in(&setup.ext, cmd).expect("start the client");
    std::thread::sleep(Duration::from_millis(500));
    setup.h.kill_agent().expect("kill -9 the agent");
    std::thread::sleep(Duration::from_millis(500));
    setup.h.start_agent().expect("restart the agent");
    let out = client.wait_with_output(CLIENT_WAIT).expect("client output");
    let report = Report::parse(&String::from_utf8_lossy(&out.stdout)).expect("client report");
    assert_eq!((report.ok, report.failed()), (200, 0), "{report:?}");
    assert_eq!(report.by_backend.len(), 1, "a kept-alive flow stays on one backend: {report:?}");
    // Cleanup takes the tc programs off the device.
    setup.h.stop_agent().expect("stop the agent");
    setup.h.cleanup().expect("kproxy cleanup");
    let mut tc = Command::new("bpftool");
    tc.args(["net", "show", "dev", NODE_DEVICE, "-j"]);
    let out = output_in(&setup.h.topology.node, None, tc, Duration::from_secs(10)).expect("bpftool net show");
    let shown = String::from_utf8_lossy(&out.stdout);
    // An empty answer from a failed bpftool must not pass for "nothing attached".
    assert!(out.status.success(), "bpftool net show dev {NODE_DEVICE}: {out:?}");
    assert!(!shown.contains("kp_tc_"), "tc programs left on {NODE_DEVICE}: {shown}");
}

#[test]
fn a_100_mb_transfer_through_a_node_port_arrives_intact() {
    let test = "a_100_mb_transfer_through_a_node_port_arrives_intact";
    let Some(setup) = NodePortSetup::new(test, "auto") else { return };
    // 100 MB of pseudo-random bytes, served over HTTP by pod-a, fetched by curl from outside
    // through the NodePort; the SHA-256 must match on both ends.
    let dir = std::env::temp_dir().join(kproxy_e2e::topology::unique_name("kproxy-files"));
    std::fs::create_dir_all(&dir).expect("create the served directory");
    let file = dir.join("big");
    let mut data = vec![0u8; 100 * 1024 * 1024];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    std::fs::write(&file, &data).expect("write the file");
    drop(data);
    let sha = |out: std::process::Output| String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or_default().to_string();
    let mut local = Command::new("sha256sum");
    local.arg(&file);
    let want = sha(local.output().expect("sha256sum"));
    let mut server = Command::new("python3");
    server.args(["-m", "http.server", "8000", "--bind", "0.0.0.0", "--directory"]).arg(&dir);
    server.stdout(Stdio::null()).stderr(Stdio::null());
    let _server = spawn_in(&setup.h.topology.pod("pod-a").netns, server).expect("start the file server");
    std::thread::sleep(Duration::from_millis(800));
    let mut fetch = Command::new("sh");
    fetch.args(["-c", &format!("curl -sS --max-time 60 --retry 3 --retry-connrefused http://{NODE_IP}:30800/big | sha256sum")]);
    let out = output_in(&setup.ext, None, fetch, CLIENT_WAIT).expect("fetch through the NodePort");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success(), "curl failed: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(sha(out), want, "the 100 MB file arrived changed");
    say(&format!("{test}: 100 MB through the NodePort, SHA-256 {want}"));
}

fn local_policy_manifest(h: &Harness) -> String {
    let (a, b) = (h.topology.pod("pod-a").ip, h.topology.pod("pod-b").ip);
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: local, namespace: default}}
spec:
  type: NodePort
  clusterIP: 10.96.0.20
  externalTrafficPolicy: Local
  healthCheckNodePort: 32000
  ports: [{{name: http, port: 80, nodePort: 30090, protocol: TCP}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: local-1, namespace: default, labels: {{kubernetes.io/service-name: local}}}}
addressType: IPv4
ports: [{{name: http, port: {HTTP_PORT}, protocol: TCP}}]
endpoints:
- {{addresses: [{a}], nodeName: kproxy-node}}
- {{addresses: [{b}], nodeName: another-node}}
"#
    )
}

#[test]
fn external_traffic_policy_local_uses_local_endpoints_and_serves_its_health_check_node_port() {
    let test = "external_traffic_policy_local_uses_local_endpoints_and_serves_its_health_check_node_port";
    let Some(setup) = NodePortSetup::with_manifest(test, "auto", local_policy_manifest) else { return };
    let report = setup.client(&["http", "--addr", &format!("{NODE_IP}:30090"), "--count", "40"]);
    assert_eq!((report.ok, report.backend("pod-a")), (40, 40), "only the local endpoint: {report:?}");
    let health = |setup: &NodePortSetup| {
        let mut curl = Command::new("curl");
        curl.args(["-s", "-w", "\n%{http_code}", &format!("http://{NODE_IP}:32000/")]);
        let out = output_in(&setup.ext, None, curl, Duration::from_secs(20)).expect("curl the health check port");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let answer = health(&setup);
    assert!(answer.ends_with("\n200"), "{answer}");
    assert!(answer.contains(r#""localEndpoints": 1"#) && answer.contains(r#""name": "local""#), "{answer}");
    // The local endpoint goes away: the node answers 503, so load balancers drain it.
    let manifest = local_policy_manifest(&setup.h).replace("nodeName: kproxy-node", "nodeName: kproxy-node, conditions: {ready: false}");
    setup.h.write_manifest(&manifest).expect("rewrite manifest");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut answer = health(&setup);
    while !answer.ends_with("\n503") && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        answer = health(&setup);
    }
    assert!(answer.ends_with("\n503") && answer.contains(r#""localEndpoints": 0"#), "{answer}");
    say(&format!("{test}: 40/40 to the local endpoint; health check port 200 then 503"));
}

const LB_IP: &str = "203.0.113.30";

/// An `externalTrafficPolicy: Local` LoadBalancer Service whose only endpoint (pod-b) is on
/// another node, and a Service with a local endpoint (pod-a) as a control.
fn local_policy_remote_endpoints_manifest(h: &Harness) -> String {
    let (a, b) = (h.topology.pod("pod-a").ip, h.topology.pod("pod-b").ip);
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: remote, namespace: default}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.30
  externalTrafficPolicy: Local
  healthCheckNodePort: 32001
  ports:
  - {{name: http, port: 80, nodePort: 30091, protocol: TCP}}
  - {{name: dns, port: 53, nodePort: 30091, protocol: UDP}}
status: {{loadBalancer: {{ingress: [{{ip: {LB_IP}}}]}}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: remote-1, namespace: default, labels: {{kubernetes.io/service-name: remote}}}}
addressType: IPv4
ports: [{{name: http, port: {HTTP_PORT}, protocol: TCP}}, {{name: dns, port: {UDP_PORT}, protocol: UDP}}]
endpoints:
- {{addresses: [{b}], nodeName: another-node}}
---
apiVersion: v1
kind: Service
metadata: {{name: control, namespace: default}}
spec:
  type: NodePort
  clusterIP: 10.96.0.31
  ports: [{{name: http, port: 80, nodePort: 30092, protocol: TCP}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: control-1, namespace: default, labels: {{kubernetes.io/service-name: control}}}}
addressType: IPv4
ports: [{{name: http, port: {HTTP_PORT}, protocol: TCP}}]
endpoints:
- {{addresses: [{a}], nodeName: kproxy-node}}
"#
    )
}

impl NodePortSetup {
    /// Runs `kproxy-testpod <args>` in the cluster: in pod `pod`'s network namespace, or the
    /// node's (a node process) for `None`, in the attached cgroup (the socket path).
    fn in_cluster_client(&self, pod: Option<&str>, args: &[&str]) -> Report {
        let what = format!("client in {} {args:?}", pod.unwrap_or("the node"));
        let child = match pod {
            None => self.h.spawn_client(args),
            Some(pod) => {
                let mut cmd = Command::new(&self.h.binaries().testpod);
                cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
                kproxy_e2e::topology::spawn_in_cgroup(&self.h.topology.pod(pod).netns, &self.h.cgroup, cmd)
            }
        };
        let child = child.unwrap_or_else(|e| panic!("{what}: {e:#}"));
        Harness::client_report(child, CLIENT_WAIT).unwrap_or_else(|e| panic!("{what}: {e:#}"))
    }
}

/// The sig-network e2e "LoadBalancers ExternalTrafficPolicy: Local ... should work from pods",
/// on a node without a local endpoint: kube-proxy short-circuits in-cluster clients of the
/// NodePort and load-balancer IP to the cluster's endpoints (`UsesClusterEndpoints`), while
/// clients from outside keep the Local semantics (dropped here, so the load balancer's health
/// check moves them to a node with an endpoint).
#[test]
fn external_traffic_policy_local_should_work_from_pods_on_a_node_without_local_endpoints() {
    let test = "external_traffic_policy_local_should_work_from_pods_on_a_node_without_local_endpoints";
    let Some(mut setup) = NodePortSetup::with_manifest(test, "auto", local_policy_remote_endpoints_manifest) else { return };
    // From outside, the load-balancer IP is routed to this node.
    setup.ext.ip(&["route", "add", &format!("{LB_IP}/32"), "via", NODE_IP]).expect("route the LB IP to the node");
    let node_port = format!("{NODE_IP}:30091");
    let lb = format!("{LB_IP}:80");
    let pod_b = format!("{}:{HTTP_PORT}", setup.h.topology.pod("pod-b").ip);
    let (dump, _) = setup
        .h
        .wait_for_dump(Duration::from_secs(30), |d| {
            let lb_ip = format!("{LB_IP}:");
            d.services.iter().filter(|s| s.name == "remote" && (s.frontend == node_port || s.frontend.starts_with(&lb_ip))).count() == 4
        })
        .unwrap_or_else(|e| panic!("{test}: frontends not programmed: {e:#}\n{}", setup.h.agent_log()));
    // A node process and a pod reach the NodePort and the load-balancer IP: the remote endpoint
    // answers (not ECONNREFUSED), and sees the pod's own address (no SNAT).
    let pod_a_ip = setup.h.topology.pod("pod-a").ip.to_string();
    for (who, addr) in [(None, &node_port), (Some("pod-a"), &node_port), (None, &lb), (Some("pod-a"), &lb)] {
        let report = setup.in_cluster_client(who, &["http", "--addr", addr, "--count", "20"]);
        assert_eq!((report.ok, report.backend("pod-b")), (20, 20), "{test}: {who:?} to {addr}: {report:?}");
        if who.is_some() {
            assert_eq!(report.seen_as.get(&pod_a_ip), Some(&20), "{test}: the pod's address is kept: {report:?}");
        }
    }
    // UDP from a pod to the load-balancer IP: replies come from the address it sent to.
    let report = setup.in_cluster_client(Some("pod-a"), &["udp", "--addr", &format!("{LB_IP}:53"), "--count", "10"]);
    assert_eq!((report.ok, report.backend("pod-b")), (10, 10), "{test}: UDP to the LB IP from a pod: {report:?}");
    assert_eq!(report.sources.get(&format!("{LB_IP}:53")), Some(&10), "{test}: {report:?}");

    // The dump shows both sets.
    for s in dump.services.iter().filter(|s| s.name == "remote" && s.kind != "ClusterIP") {
        assert!(s.backends.is_empty(), "{test}: no local endpoint for outside clients: {s:?}");
        let want = if s.protocol == "UDP" { format!("{}:{UDP_PORT}", setup.h.topology.pod("pod-b").ip) } else { pod_b.clone() };
        assert_eq!(s.in_cluster_backends, Some(vec![want]), "{test}: dump shows what in-cluster clients get: {s:?}");
    }

    // From outside, through tc: dropped (no RST, no ICMP), at the NodePort and the LB IP, and
    // each SYN the client sent counted as a drop for want of a local endpoint.
    let (drops_before, retrans_before) = (datapath_drops(&setup.h), tcp_retransmissions(&setup.ext));
    for addr in [&node_port, &lb] {
        let report = setup.client(&["http", "--addr", addr, "--count", "3", "--timeout-ms", "500"]);
        assert_eq!((report.ok, report.errors.get("TimedOut")), (0, Some(&3)), "{test}: {addr} from outside: {report:?}");
    }
    // Six attempts (two addresses, three each), each a SYN and its retransmissions.
    let syns = 6 + tcp_retransmissions(&setup.ext) - retrans_before;
    let mut want = drops_before.clone();
    *want.get_mut("no_local_endpoints").unwrap() += syns;
    assert!(syns >= 6, "{test}: at least one SYN per attempt, {syns} sent");
    assert_eq!(datapath_drops(&setup.h), want, "{test}: {syns} SYNs dropped for want of a local endpoint");
    // The control: a NodePort with a local endpoint answers the same outside client.
    let report = setup.client(&["http", "--addr", &format!("{NODE_IP}:30092"), "--count", "10"]);
    assert_eq!((report.ok, report.backend("pod-a")), (10, 10), "{test}: control NodePort: {report:?}");
    say(&format!(
        "{test}: node process and pod reached the NodePort and LB IP of an ETP=Local service with only a remote endpoint \
         (20/20 each, pod address kept, UDP 10/10); outside clients dropped (3/3 timed out, {syns} SYNs counted as \
         no_local_endpoints) while the control answered"
    ));
}

const PROXY_MODE_IP: &str = "203.0.113.40";
const VIP_MODE_IP: &str = "203.0.113.41";

fn ip_mode_manifest(h: &Harness) -> String {
    let a = h.topology.pod("pod-a").ip;
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: lb, namespace: default}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.40
  ports: [{{name: http, port: 80, nodePort: 30093, protocol: TCP}}]
status:
  loadBalancer:
    ingress:
    - {{ip: {PROXY_MODE_IP}, ipMode: Proxy}}
    - {{ip: {VIP_MODE_IP}, ipMode: VIP}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: lb-1, namespace: default, labels: {{kubernetes.io/service-name: lb}}}}
addressType: IPv4
ports: [{{name: http, port: {HTTP_PORT}, protocol: TCP}}]
endpoints:
- {{addresses: [{a}], nodeName: kproxy-node}}
"#
    )
}

/// kube-proxy's `IsVIPMode`: a load-balancer ingress IP with `ipMode: Proxy` is not a frontend;
/// a client in the cluster reaches the load balancer itself (which proxies to the node ports),
/// not a pod. The load balancer here is a server on that IP in the external namespace.
#[test]
fn a_load_balancer_ip_with_ip_mode_proxy_reaches_the_load_balancer_not_a_pod() {
    let test = "a_load_balancer_ip_with_ip_mode_proxy_reaches_the_load_balancer_not_a_pod";
    let Some(mut setup) = NodePortSetup::with_manifest(test, "auto", ip_mode_manifest) else { return };
    setup.ext.ip(&["addr", "add", &format!("{PROXY_MODE_IP}/32"), "dev", "eth0"]).expect("give the LB its IP");
    setup.h.topology.node.ip(&["route", "add", &format!("{PROXY_MODE_IP}/32"), "via", EXT_IP]).expect("route to the LB");
    // The balancer answers pods through the node, as a real one would through the network.
    setup.ext.ip(&["route", "add", &setup.h.topology.pod_cidr(), "via", NODE_IP]).expect("route back to the pods");
    let mut server = Command::new(&setup.h.binaries().testpod);
    server
        .args(["serve", "--name", "load-balancer", "--tcp", &format!("{PROXY_MODE_IP}:80")])
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    let mut server = spawn_in(&setup.ext, server).expect("start the load balancer");
    let line = server.read_line(Duration::from_secs(5)).expect("load balancer ready");
    assert!(line.starts_with("ready"), "{test}: load balancer printed {line:?}");

    let (dump, _) = setup
        .h
        .wait_for_dump(Duration::from_secs(30), |d| d.services.iter().any(|s| s.frontend == format!("{VIP_MODE_IP}:80")))
        .unwrap_or_else(|e| panic!("{test}: VIP-mode IP not programmed: {e:#}\n{}", setup.h.agent_log()));
    // The VIP-mode IP is translated to the pod; the Proxy-mode one is left for the balancer.
    let report = setup.in_cluster_client(None, &["http", "--addr", &format!("{VIP_MODE_IP}:80"), "--count", "10"]);
    assert_eq!((report.ok, report.backend("pod-a")), (10, 10), "{test}: VIP mode: {report:?}");
    for pod in [None, Some("pod-b")] {
        let report = setup.in_cluster_client(pod, &["http", "--addr", &format!("{PROXY_MODE_IP}:80"), "--count", "10"]);
        assert_eq!((report.ok, report.backend("load-balancer")), (10, 10), "{test}: Proxy mode from {pod:?}: {report:?}");
    }
    let frontends: Vec<&str> = dump.services.iter().map(|s| s.frontend.as_str()).collect();
    assert!(!frontends.iter().any(|f| f.starts_with(PROXY_MODE_IP)), "{test}: Proxy-mode IP programmed: {frontends:?}");
    say(&format!("{test}: {VIP_MODE_IP} (VIP) 10/10 to pod-a; {PROXY_MODE_IP} (Proxy) not in the dump, 10/10 to the load balancer from the node and a pod"));
}

use kproxy_api::trace::{ConntrackDump, Selection, Trace, TracePath, Verdict};

impl NodePortSetup {
    /// `kproxy trace --json <args>` in the node namespace, against the live agent's maps.
    fn trace(&self, args: &[&str]) -> Trace {
        let out = self.kproxy_on_maps("trace", args, true).unwrap_or_else(|e| panic!("kproxy trace {args:?}: {e:#}"));
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("kproxy trace {args:?} printed {out:?}: {e}"))
    }

    /// `kproxy trace <args>`, the report for people.
    fn trace_text(&self, args: &[&str]) -> String {
        self.kproxy_on_maps("trace", args, false).unwrap_or_else(|e| panic!("kproxy trace {args:?}: {e:#}"))
    }

    /// `kproxy dump --conntrack --json <filters>`.
    fn conntrack(&self, filters: &[&str]) -> ConntrackDump {
        let mut args = vec!["--conntrack"];
        args.extend(filters);
        let out = self.kproxy_on_maps("dump", &args, true).unwrap_or_else(|e| panic!("kproxy dump {args:?}: {e:#}"));
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("kproxy dump {args:?} printed {out:?}: {e}"))
    }

    fn kproxy_on_maps(&self, command: &str, args: &[&str], json: bool) -> anyhow::Result<String> {
        let dir = self.h.bpffs_dir().display().to_string();
        let mut all = vec![command, "--bpffs-dir", &dir];
        all.extend(args);
        if json {
            all.push("--json");
        }
        self.h.kproxy(&all)
    }

    /// curl `http://{to}/` from the external namespace with extra curl `args`; the exit code
    /// and the first line of the body (the pod's name).
    fn curl(&self, to: &str, args: &[&str]) -> (Option<i32>, String) {
        let mut curl = Command::new("curl");
        curl.args(["-sS", "--max-time", "3"]).args(args).arg(format!("http://{to}/"));
        let out = output_in(&self.ext, None, curl, Duration::from_secs(20)).expect("run curl");
        (out.status.code(), String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or_default().trim().to_string())
    }
}

/// A real request through a NodePort from outside, from a known port: `kproxy trace` with that
/// source finds its conntrack entry, whose backend is the pod that answered; and a ClusterIP
/// reached from the node is reported on the socket path, among the backends that answer.
#[test]
fn trace_reports_the_backend_a_real_node_port_flow_got_and_the_socket_path_of_a_cluster_ip() {
    let test = "trace_reports_the_backend_a_real_node_port_flow_got_and_the_socket_path_of_a_cluster_ip";
    let Some(setup) = NodePortSetup::new(test, "auto") else { return };
    let node_port = format!("{NODE_IP}:30080");
    let (code, answered) = setup.curl(&node_port, &["--local-port", "40123"]);
    assert_eq!(code, Some(0), "{test}: curl through the NodePort");
    assert!(["pod-a", "pod-b"].contains(&answered.as_str()), "{test}: answered by {answered:?}");
    let other = if answered == "pod-a" { "pod-b" } else { "pod-a" };
    let at = |pod: &str| format!("{}:{HTTP_PORT}", setup.h.topology.pod(pod).ip);

    let args = ["--from", &format!("{EXT_IP}:40123"), "--to", &format!("{node_port}/tcp")];
    let t = setup.trace(&args);
    assert_eq!((t.path, t.verdict), (TracePath::Tc, Verdict::Backend), "{test}: {t:?}");
    match &t.selection {
        Some(Selection::Conntrack { backend, .. }) => assert_eq!(backend, &at(&answered), "{test}: {t:?}"),
        other => panic!("{test}: the flow's conntrack entry should decide: {other:?}"),
    }
    let frontend = t.frontend.as_ref().expect("the NodePort frontend");
    assert_eq!((frontend.name.as_str(), frontend.svc_type.as_str()), ("web", "NodePort"), "{test}: {t:?}");
    let mut backends: Vec<&str> = frontend.backends.iter().map(|b| b.address.as_str()).collect();
    backends.sort();
    let mut want = [at("pod-a"), at("pod-b")];
    want.sort();
    assert_eq!(backends, want, "{test}: {t:?}");
    assert_eq!(t.conntrack.len(), 1, "{test}: one tracked flow from that port: {t:?}");
    let flow = &t.conntrack[0];
    assert_eq!((flow.backend.as_str(), flow.entries.len(), flow.snat.as_deref()), (at(&answered).as_str(), 2, None), "{test}: {flow:?}");
    assert!(flow.seen.iter().any(|s| s == "established"), "{test}: {flow:?}");
    say(&format!("{test}: kproxy trace {}\n{}", args.join(" "), setup.trace_text(&args)));

    // dump --conntrack finds it by client, and not under the other backend.
    let src = format!("{EXT_IP}:40123");
    let found = setup.conntrack(&["--src", &src, "--proto", "tcp"]);
    assert_eq!(found.flows.iter().map(|f| f.backend.clone()).collect::<Vec<_>>(), [at(&answered)], "{test}: {found:?}");
    let none = setup.conntrack(&["--src", &src, "--backend", &setup.h.topology.pod(other).ip.to_string()]);
    assert!(none.flows.is_empty(), "{test}: {none:?}");
    assert!(setup.conntrack(&["--dst", &node_port, "--proto", "udp"]).flows.is_empty(), "{test}: no UDP flow");

    // A ClusterIP from the node: the socket path, random among both pods, which both answer.
    let t = setup.trace(&["--from", "127.0.0.1", "--to", "10.96.0.10:80/tcp"]);
    assert_eq!((t.path, t.verdict, &t.selection), (TracePath::Socket, Verdict::Backend, &Some(Selection::Random { among: 2 })), "{test}: {t:?}");
    assert_eq!(t.frontend.as_ref().map(|f| f.svc_type.as_str()), Some("ClusterIP"), "{test}: {t:?}");
    let report = setup.in_cluster_client(None, &["http", "--addr", "10.96.0.10:80", "--count", "20"]);
    assert_eq!(report.ok, 20, "{test}: {report:?}");
    assert!(report.by_backend.keys().all(|p| p == "pod-a" || p == "pod-b"), "{test}: {report:?}");
    say(&format!(
        "{test}: the NodePort flow from {src} was answered by {answered}; kproxy trace found its conntrack entry to {}; \
         the ClusterIP traced on the socket path",
        at(&answered)
    ));
}

const RANGED_IP: &str = "203.0.113.32";
const EXT_IP_2: &str = "192.168.50.101";

/// [`local_policy_remote_endpoints_manifest`] and a LoadBalancer Service that only `EXT_IP`
/// may reach (`loadBalancerSourceRanges`), with a local endpoint (pod-a).
fn trace_policies_manifest(h: &Harness) -> String {
    let a = h.topology.pod("pod-a").ip;
    format!(
        r#"{}
---
apiVersion: v1
kind: Service
metadata: {{name: ranged, namespace: default}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.32
  loadBalancerSourceRanges: [{EXT_IP}/32]
  ports: [{{name: http, port: 80, nodePort: 30094, protocol: TCP}}]
status: {{loadBalancer: {{ingress: [{{ip: {RANGED_IP}}}]}}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: ranged-1, namespace: default, labels: {{kubernetes.io/service-name: ranged}}}}
addressType: IPv4
ports: [{{name: http, port: {HTTP_PORT}, protocol: TCP}}]
endpoints:
- {{addresses: [{a}], nodeName: kproxy-node}}
"#,
        local_policy_remote_endpoints_manifest(h)
    )
}

/// `kproxy trace` against what real clients get: a source outside `loadBalancerSourceRanges` is
/// reported dropped (and its curl times out) while the allowed one is translated (and
/// answered); an `externalTrafficPolicy: Local` NodePort on a node without local endpoints is
/// reported dropped from outside and translated to the cluster's endpoint from the node and
/// from a pod named through the apiserver (`--pod`), as the clients see.
#[test]
fn trace_reports_source_range_drops_and_external_traffic_policy_local_per_origin() {
    let test = "trace_reports_source_range_drops_and_external_traffic_policy_local_per_origin";
    let Some(mut setup) = NodePortSetup::with_manifest(test, "auto", trace_policies_manifest) else { return };
    setup.ext.ip(&["addr", "add", &format!("{EXT_IP_2}/24"), "dev", "eth0"]).expect("a second outside address");
    setup.ext.ip(&["route", "add", &format!("{RANGED_IP}/32"), "via", NODE_IP]).expect("route the LB IP to the node");
    setup
        .h
        .wait_for_dump(Duration::from_secs(30), |d| d.services.iter().any(|s| s.frontend == format!("{RANGED_IP}:80")))
        .unwrap_or_else(|e| panic!("{test}: LB IP not programmed: {e:#}\n{}", setup.h.agent_log()));
    let ranged = format!("{RANGED_IP}:80");
    let pod_a = format!("{}:{HTTP_PORT}", setup.h.topology.pod("pod-a").ip);
    let pod_b = format!("{}:{HTTP_PORT}", setup.h.topology.pod("pod-b").ip);

    // Source ranges: the allowed client is answered, the other dropped; trace says the same.
    assert_eq!(setup.curl(&ranged, &["--interface", EXT_IP]), (Some(0), "pod-a".to_string()), "{test}: allowed client");
    let (code, _) = setup.curl(&ranged, &["--interface", EXT_IP_2, "--max-time", "1"]);
    assert_eq!(code, Some(28), "{test}: a client outside the ranges times out (dropped)");
    let to = format!("{ranged}/tcp");
    let allowed = setup.trace(&["--from", EXT_IP, "--to", &to]);
    assert_eq!(allowed.verdict, Verdict::Backend, "{test}: {allowed:?}");
    let f = allowed.frontend.as_ref().expect("frontend");
    assert_eq!((f.source_allowed, f.source_ranges.clone()), (Some(true), vec![format!("{EXT_IP}/32")]), "{test}: {allowed:?}");
    assert_eq!(f.backends.iter().map(|b| b.address.clone()).collect::<Vec<_>>(), [pod_a], "{test}: {allowed:?}");
    let denied = setup.trace(&["--from", EXT_IP_2, "--to", &to]);
    assert_eq!(denied.verdict, Verdict::DropSourceRange, "{test}: {denied:?}");
    assert_eq!(denied.frontend.as_ref().and_then(|f| f.source_allowed), Some(false), "{test}: {denied:?}");
    say(&format!("{test}: kproxy trace --from {EXT_IP_2} --to {to}\n{}", setup.trace_text(&["--from", EXT_IP_2, "--to", &to])));

    // externalTrafficPolicy: Local, no local endpoint: dropped from outside ...
    let node_port = format!("{NODE_IP}:30091");
    let (code, _) = setup.curl(&node_port, &["--max-time", "1"]);
    assert_eq!(code, Some(28), "{test}: outside client of the ETP=Local NodePort times out (dropped)");
    let outside = setup.trace(&["--from", EXT_IP, "--to", &format!("{node_port}/tcp")]);
    assert_eq!((outside.path, outside.verdict), (TracePath::Tc, Verdict::DropUnserved), "{test}: {outside:?}");
    let f = outside.frontend.as_ref().expect("frontend");
    assert!(f.backends.is_empty() && f.flags.contains(&"DropUnserved".to_string()), "{test}: {outside:?}");
    assert!(f.flags.contains(&"TwoScopes".to_string()), "{test}: {outside:?}");
    // ... and the cluster's endpoint from the node, on the socket path.
    let node = setup.trace(&["--from", "127.0.0.1", "--to", &format!("{node_port}/tcp")]);
    assert_eq!((node.path, node.verdict), (TracePath::Socket, Verdict::Backend), "{test}: {node:?}");
    let f = node.frontend.as_ref().expect("frontend");
    assert_eq!((f.scope.as_str(), f.backends.iter().map(|b| b.address.clone()).collect::<Vec<_>>()), ("in_cluster", vec![pod_b.clone()]), "{test}: {node:?}");
    let report = setup.in_cluster_client(None, &["http", "--addr", &node_port, "--count", "5"]);
    assert_eq!((report.ok, report.backend("pod-b")), (5, 5), "{test}: {report:?}");

    // A pod by name: its address from the apiserver (a fake one in the node's namespace).
    let api = kproxy_e2e::fake_apiserver::FakeApiServer::start_in(&setup.h.topology.node.path(), "127.0.0.1:0".parse().unwrap())
        .expect("start the fake apiserver");
    let kubeconfig = setup.h.workdir().join("trace-kubeconfig");
    api.kubeconfig(&kubeconfig).expect("write the kubeconfig");
    let pod_ip = setup.h.topology.pod("pod-a").ip.to_string();
    api.apply_json(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "pod-a", "namespace": "default"},
        "status": {"podIP": pod_ip},
    }))
    .expect("store the pod");
    let kc = kubeconfig.display().to_string();
    let from_pod = setup.trace(&["--pod", "default/pod-a", "--kubeconfig", &kc, "--to", &format!("{node_port}/tcp")]);
    assert_eq!((from_pod.source.as_str(), from_pod.source_pod.as_deref()), (pod_ip.as_str(), Some("default/pod-a")), "{test}: {from_pod:?}");
    assert_eq!((from_pod.path, from_pod.verdict), (TracePath::Socket, Verdict::Backend), "{test}: {from_pod:?}");
    assert_eq!(from_pod.frontend.as_ref().map(|f| f.backends[0].address.clone()), Some(pod_b.clone()), "{test}: {from_pod:?}");
    let report = setup.in_cluster_client(Some("pod-a"), &["http", "--addr", &node_port, "--count", "5"]);
    assert_eq!((report.ok, report.backend("pod-b")), (5, 5), "{test}: {report:?}");
    let missing = setup.kproxy_on_maps("trace", &["--pod", "default/nope", "--kubeconfig", &kc, "--to", "10.96.0.10:80"], false);
    let err = format!("{:#}", missing.expect_err("an unknown pod is an error"));
    assert!(err.contains("pod default/nope: not found"), "{test}: {err}");
    say(&format!(
        "{test}: {EXT_IP_2} outside the source ranges dropped (curl timed out) and traced drop_source_range; ETP=Local \
         NodePort dropped from outside, traced to {pod_b} from the node and from pod default/pod-a (both answered by pod-b)"
    ));
}

/// Three NodePort Services (alpha, beta, gamma: ClusterIPs 10.96.0.21-23, NodePorts
/// 30081-30083), each served by pod-a and pod-b.
fn three_services_manifest(h: &Harness) -> String {
    let endpoints: String = ["pod-a", "pod-b"].iter().map(|p| format!("- addresses: [{}]\n", h.topology.pod(p).ip)).collect();
    ["alpha", "beta", "gamma"]
        .iter()
        .enumerate()
        .map(|(i, name)| {
            format!(
                r#"apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec:
  type: NodePort
  clusterIP: 10.96.0.2{n}
  ports: [{{name: http, port: 80, nodePort: 3008{n}, protocol: TCP}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}-1, namespace: default, labels: {{kubernetes.io/service-name: {name}}}}}
addressType: IPv4
ports: [{{name: http, port: {HTTP_PORT}, protocol: TCP}}]
endpoints:
{endpoints}"#,
                n = i + 1
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

impl NodePortSetup {
    /// `n` curls of `http://{to}/` from the node (the socket path), each answered.
    fn curls_from_node(&self, to: &str, n: usize) {
        for _ in 0..n {
            let mut curl = Command::new("curl");
            curl.args(["-sS", "--max-time", "3", &format!("http://{to}/")]);
            let out = self.h.run_in_client_cgroup(curl, Duration::from_secs(20)).expect("run curl");
            assert!(out.status.success(), "curl {to} from the node: {out:?}");
        }
    }

    /// `n` curls of `http://{to}/` from outside (the tc path), each answered.
    fn curls_from_outside(&self, to: &str, n: usize) {
        for _ in 0..n {
            let (code, answered) = self.curl(to, &[]);
            assert_eq!(code, Some(0), "curl {to} from outside");
            assert!(["pod-a", "pod-b"].contains(&answered.as_str()), "curl {to}: answered by {answered:?}");
        }
    }

    /// `kproxy_service_*_total` by (name, kind, frontend): (new connections, packets, bytes).
    fn service_counters(&self) -> BTreeMap<(String, String, String), (u64, u64, u64)> {
        let metrics = self.h.metrics().unwrap_or_else(|e| panic!("scrape /metrics: {e:#}\n{}", self.h.agent_log()));
        let mut out: BTreeMap<(String, String, String), (u64, u64, u64)> = BTreeMap::new();
        for (i, name) in ["kproxy_service_new_connections_total", "kproxy_service_packets_total", "kproxy_service_bytes_total"].iter().enumerate() {
            for sample in metrics.matching(name, &[]) {
                let label = |k: &str| sample.labels.get(k).cloned().unwrap_or_default();
                assert_eq!((label("namespace"), label("port_name")), ("default".into(), "http".into()), "{sample:?}");
                let entry = out.entry((label("name"), label("kind"), label("frontend"))).or_default();
                let value = sample.value as u64;
                match i {
                    0 => entry.0 = value,
                    1 => entry.1 = value,
                    _ => entry.2 = value,
                }
            }
        }
        out
    }
}

/// `--service-counters 2`: real connections from outside (tc) and from the node (socket path)
/// are counted per frontend, exactly in new connections; the first two frontends used fill the
/// map, and the third one, used after, is never counted (the bound on the series).
#[test]
fn service_counters_count_real_connections_per_frontend_up_to_the_bound() {
    let test = "service_counters_count_real_connections_per_frontend_up_to_the_bound";
    let Some(mut setup) = NodePortSetup::with_manifest_and_args(test, "auto", three_services_manifest, &["--service-counters", "2"]) else {
        return;
    };
    assert!(setup.service_counters().is_empty(), "{test}: nothing counted before any traffic");
    let metrics = setup.h.metrics().expect("scrape");
    assert_eq!(metrics.get("kproxy_service_counters_frontends", &[]), Some(0.0), "{test}");
    assert_eq!(metrics.get("kproxy_service_counters_max_frontends", &[]), Some(2.0), "{test}");
    let alpha_node_port = format!("{NODE_IP}:30081");
    setup.curls_from_outside(&alpha_node_port, 3);
    setup.curls_from_node("10.96.0.22:80", 2);
    // The map is full: gamma's NodePort and alpha's ClusterIP (another frontend) are served
    // but not counted.
    setup.curls_from_outside(&format!("{NODE_IP}:30083"), 2);
    setup.curls_from_node("10.96.0.21:80", 2);
    let counted = setup.service_counters();
    let key = |name: &str, kind: &str, frontend: &str| (name.to_string(), kind.to_string(), frontend.to_string());
    let alpha = counted.get(&key("alpha", "NodePort", &format!("{alpha_node_port}/TCP"))).copied();
    let beta = counted.get(&key("beta", "ClusterIP", "10.96.0.22:80/TCP")).copied();
    assert_eq!(counted.len(), 2, "{test}: two frontends counted: {counted:?}");
    let (connections, packets, bytes) = alpha.unwrap_or_else(|| panic!("{test}: alpha's NodePort counted: {counted:?}"));
    assert_eq!(connections, 3, "{test}: three connections through alpha's NodePort: {counted:?}");
    // Each HTTP exchange is at least a SYN, the request, an ACK and a FIN, of at least an
    // Ethernet, IPv4 and TCP header each.
    assert!(packets >= 3 * 4 && bytes >= packets * 54, "{test}: alpha's packets and bytes: {counted:?}");
    // The socket path sees connections, not packets.
    assert_eq!(beta, Some((2, 0, 0)), "{test}: two connections from the node to beta's ClusterIP: {counted:?}");
    let metrics = setup.h.metrics().expect("scrape");
    assert_eq!(metrics.get("kproxy_service_counters_frontends", &[]), Some(2.0), "{test}");
    // The map is pinned: an agent restarted with the same bound adopts it and counts on.
    setup.h.kill_agent().expect("kill -9 the agent");
    setup.h.start_agent().expect("restart the agent");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while setup.h.metrics().ok().and_then(|m| m.get("kproxy_service_counters_frontends", &[])).is_none() {
        assert!(std::time::Instant::now() < deadline, "{test}: the restarted agent serves no counters\n{}", setup.h.agent_log());
        std::thread::sleep(Duration::from_millis(100));
    }
    setup.curls_from_node("10.96.0.22:80", 1);
    let after = setup.service_counters();
    assert_eq!(after.get(&key("beta", "ClusterIP", "10.96.0.22:80/TCP")).map(|c| c.0), Some(3), "{test}: beta counts on: {after:?}");
    assert_eq!(after.get(&key("alpha", "NodePort", &format!("{alpha_node_port}/TCP"))), alpha.as_ref(), "{test}: {after:?}");
    say(&format!("{test}: counted {counted:?}; gamma and alpha's ClusterIP served but not counted (the bound of 2)"));
}

/// Without `--service-counters`, no per-service series is served, whatever the traffic.
#[test]
fn service_counters_are_not_served_without_the_flag() {
    let test = "service_counters_are_not_served_without_the_flag";
    let Some(setup) = NodePortSetup::with_manifest(test, "auto", three_services_manifest) else { return };
    setup.curls_from_outside(&format!("{NODE_IP}:30081"), 2);
    setup.curls_from_node("10.96.0.22:80", 2);
    let metrics = setup.h.metrics().expect("scrape");
    let served: Vec<&str> = metrics.samples.iter().map(|s| s.name.as_str()).filter(|n| n.starts_with("kproxy_service_")).collect();
    assert!(served.is_empty(), "{test}: per-service series served without the flag: {served:?}");
    assert!(metrics.get("kproxy_datapath_drops_total", &[]).is_some(), "{test}: the scrape has the agent's metrics");
}
