//! Privileged end-to-end tests of the Service behaviours workloads rely on, each named after the
//! Kubernetes sig-network e2e test it mirrors (`test/e2e/network/service.go`, `conntrack.go`).
//!
//! One node namespace with pods, the real `kproxy run` on a manifest directory, clients from the
//! node namespace in the attached cgroup (the socket path), as in `socket_lb.rs`. Nothing leaves
//! the test's namespaces; the harness tears everything down even when an assertion fails.

use std::process::{Command, Stdio};
use std::time::Duration;

mod common;

use common::{binaries, say, skip_unless_root};
use kproxy_e2e::events::SocketTerminationStatus;
use kproxy_e2e::harness::{unique_bpffs_dir, Harness, HTTP_PORT, UDP_PORT};
use kproxy_e2e::report::Report;
use kproxy_e2e::topology::spawn_in_cgroup;

const NODE: &str = "kproxy-node";
const CLIENT_WAIT: Duration = Duration::from_secs(90);

/// A harness with `pods` whose agent runs as node `kproxy-node`; `None` when not root.
fn harness(test: &str, pods: &[&str]) -> Option<Harness> {
    if skip_unless_root(test) {
        return None;
    }
    let h = Harness::new(binaries(), pods, unique_bpffs_dir("kproxy-sem"))
        .unwrap_or_else(|e| panic!("{test}: harness: {e:#}"))
        .with_agent_args(&["--hostname-override", NODE, "--devices=", "--healthz-bind-address", "", "--metrics-bind-address", ""]);
    Some(h)
}

/// Service `s` at 10.96.0.7 with `ports` (YAML flow mappings with name, port, protocol) and
/// `spec` lines, and one EndpointSlice of `endpoints` (flow mappings) on the same port names,
/// TCP ones to the pods' HTTP port, UDP ones to their UDP port.
fn manifest(spec: &str, ports: &[(&str, u16, &str)], endpoints: &[String]) -> String {
    let svc_ports: Vec<String> =
        ports.iter().map(|(name, port, proto)| format!("{{name: {name}, port: {port}, protocol: {proto}}}")).collect();
    let slice_ports: Vec<String> = ports
        .iter()
        .map(|(name, _, proto)| {
            let target = if *proto == "UDP" { UDP_PORT } else { HTTP_PORT };
            format!("{{name: {name}, port: {target}, protocol: {proto}}}")
        })
        .collect();
    let eps: String = endpoints.iter().map(|e| format!("- {e}\n")).collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: s, namespace: default}}\nspec:\n  clusterIP: 10.96.0.7\n  \
         ports: [{}]\n{spec}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: s-1, namespace: default, labels: {{kubernetes.io/service-name: s}}}}\naddressType: IPv4\n\
         ports: [{}]\nendpoints:\n{eps}",
        svc_ports.join(", "),
        slice_ports.join(", "),
    )
}

const HTTP: (&str, u16, &str) = ("http", 80, "TCP");
const DNS: (&str, u16, &str) = ("dns", 53, "UDP");

/// An endpoint of pod `pod` with extra fields (`nodeName: …`, `conditions: {…}`).
fn endpoint(h: &Harness, pod: &str, extra: &str) -> String {
    let sep = if extra.is_empty() { "" } else { ", " };
    format!("{{addresses: [{}]{sep}{extra}}}", h.topology.pod(pod).ip)
}

/// Writes `yaml`, starts the agent if needed, and waits until the ClusterIP frontend is
/// programmed with `backends` backends (of its first port).
fn program(h: &mut Harness, yaml: &str, backends: usize) {
    h.write_manifest(yaml).expect("write manifest");
    if !h.agent_running() {
        h.start_agent().expect("start kproxy run");
    }
    h.wait_for_dump(Duration::from_secs(10), |d| {
        d.services.iter().any(|s| s.frontend.starts_with("10.96.0.7:") && s.backends.len() == backends)
    })
    .unwrap_or_else(|e| panic!("not programmed with {backends} backends: {e:#}\n{}", h.agent_log()));
}

fn client(h: &Harness, args: &[&str]) -> Report {
    h.run_client(args, CLIENT_WAIT).unwrap_or_else(|e| panic!("client {args:?}: {e:#}"))
}

#[test]
fn should_fallback_to_terminating_endpoints_when_there_are_no_ready_endpoints_with_internal_traffic_policy_cluster() {
    let test = "should_fallback_to_terminating_endpoints_when_there_are_no_ready_endpoints_with_internal_traffic_policy_cluster";
    let Some(mut h) = harness(test, &["pod-a", "pod-b", "pod-c"]) else { return };
    let terminating = |serving: bool| format!("conditions: {{ready: false, serving: {serving}, terminating: true}}");
    let eps = vec![endpoint(&h, "pod-a", &terminating(true)), endpoint(&h, "pod-b", &terminating(false))];
    program(&mut h, &manifest("", &[HTTP], &eps), 1);
    let report = client(&h, &["http", "--addr", "10.96.0.7:80", "--count", "30"]);
    assert_eq!((report.ok, report.backend("pod-a")), (30, 30), "only the serving terminating endpoint: {report:?}");
    // A ready endpoint appears: it takes every new connection.
    let mut eps = eps;
    eps.push(endpoint(&h, "pod-c", ""));
    program(&mut h, &manifest("", &[HTTP], &eps), 1);
    // Still one backend, as before the change: wait for it to be pod-c's.
    let pod_c = format!("{}:{HTTP_PORT}", h.topology.pod("pod-c").ip);
    h.wait_for_dump(Duration::from_secs(10), |d| d.services.iter().any(|s| s.frontend.starts_with("10.96.0.7:") && s.backends == [pod_c.clone()]))
        .unwrap_or_else(|e| panic!("pod-c not programmed: {e:#}"));
    let report = client(&h, &["http", "--addr", "10.96.0.7:80", "--count", "30"]);
    assert_eq!((report.ok, report.backend("pod-c")), (30, 30), "ready endpoints first: {report:?}");
    say(&format!("{test}: terminating-but-serving pod used while nothing was ready, then only the ready one"));
}

#[test]
fn should_respect_internal_traffic_policy_local_pod_to_pod() {
    let test = "should_respect_internal_traffic_policy_local_pod_to_pod";
    let Some(mut h) = harness(test, &["pod-a", "pod-b"]) else { return };
    let eps = vec![endpoint(&h, "pod-a", &format!("nodeName: {NODE}")), endpoint(&h, "pod-b", "nodeName: other-node")];
    program(&mut h, &manifest("  internalTrafficPolicy: Local", &[HTTP], &eps), 1);
    let report = client(&h, &["http", "--addr", "10.96.0.7:80", "--count", "30"]);
    assert_eq!((report.ok, report.backend("pod-a")), (30, 30), "only this node's endpoint: {report:?}");
    // No local endpoint left: nothing is reachable from this node (kube-proxy drops; the
    // socket path refuses at once).
    let eps = vec![endpoint(&h, "pod-b", "nodeName: other-node")];
    program(&mut h, &manifest("  internalTrafficPolicy: Local", &[HTTP], &eps), 0);
    let report = client(&h, &["http", "--addr", "10.96.0.7:80", "--count", "3", "--timeout-ms", "500"]);
    assert_eq!(report.ok, 0, "{report:?}");
    say(&format!("{test}: 30/30 to the local endpoint; none reachable once it left"));
}

#[test]
fn should_serve_multiport_endpoints_from_pods_and_the_same_port_over_tcp_and_udp() {
    let test = "should_serve_multiport_endpoints_from_pods_and_the_same_port_over_tcp_and_udp";
    let Some(mut h) = harness(test, &["pod-a", "pod-b"]) else { return };
    let ports = [HTTP, ("alt", 8081, "TCP"), ("dns", 80, "UDP")];
    let eps = vec![endpoint(&h, "pod-a", ""), endpoint(&h, "pod-b", "")];
    program(&mut h, &manifest("", &ports, &eps), 2);
    for addr in ["10.96.0.7:80", "10.96.0.7:8081"] {
        let report = client(&h, &["http", "--addr", addr, "--count", "20"]);
        assert_eq!(report.ok, 20, "TCP {addr}: {report:?}");
        assert!(report.backend("pod-a") > 0 && report.backend("pod-b") > 0, "TCP {addr}: {report:?}");
    }
    let report = client(&h, &["udp", "--addr", "10.96.0.7:80", "--count", "20", "--new-socket"]);
    assert_eq!(report.ok, 20, "UDP port 80 next to TCP port 80: {report:?}");
    assert_eq!(report.sources.get("10.96.0.7:80"), Some(&20), "{report:?}");
    say(&format!("{test}: TCP 80 and 8081 and UDP 80 of one Service, each spread over both pods"));
}

#[test]
fn should_allow_pods_to_hairpin_back_to_themselves_through_services() {
    let test = "should_allow_pods_to_hairpin_back_to_themselves_through_services";
    let Some(mut h) = harness(test, &["pod-a", "pod-b"]) else { return };
    let yaml = manifest("", &[HTTP], &[endpoint(&h, "pod-a", "")]);
    program(&mut h, &yaml, 1);
    // The client runs in pod-a itself (its network namespace, the attached cgroup).
    let pod = h.topology.pod("pod-a");
    let mut cmd = Command::new(&h.binaries().testpod);
    cmd.args(["http", "--addr", "10.96.0.7:80", "--count", "10"]).stdin(Stdio::null()).stdout(Stdio::piped());
    let child = spawn_in_cgroup(&pod.netns, &h.cgroup, cmd).expect("start the client in pod-a");
    let report = Harness::client_report(child, CLIENT_WAIT).expect("client report");
    assert_eq!((report.ok, report.backend("pod-a")), (10, 10), "{report:?}");
    assert_eq!(report.seen_as.get(&pod.ip.to_string()), Some(&10), "pod-a saw itself as the client: {report:?}");
    say(&format!("{test}: pod-a reached itself through its Service 10/10 times"));
}

#[test]
fn should_be_able_to_preserve_udp_traffic_when_server_pod_cycles_for_a_cluster_ip_service() {
    let test = "should_be_able_to_preserve_udp_traffic_when_server_pod_cycles_for_a_cluster_ip_service";
    let Some(mut h) = harness(test, &["pod-a", "pod-b"]) else { return };
    let yaml = manifest("", &[DNS], &[endpoint(&h, "pod-a", "")]);
    program(&mut h, &yaml, 1);
    // One unconnected socket sending a datagram every 50 ms for 4 s (as a DNS client does).
    // After 1 s the server pod goes away (scale to zero), after 2 s another one comes up.
    let client = h
        .spawn_client(&["udp", "--addr", "10.96.0.7:53", "--count", "80", "--interval-ms", "50", "--timeout-ms", "200"])
        .expect("start the client");
    std::thread::sleep(Duration::from_secs(1));
    h.write_manifest(&manifest("", &[DNS], &[])).expect("scale to zero");
    std::thread::sleep(Duration::from_secs(1));
    h.write_manifest(&manifest("", &[DNS], &[endpoint(&h, "pod-b", "")])).expect("scale back up");
    let report = Harness::client_report(client, CLIENT_WAIT).expect("client report");
    // ~20 datagrams before the change reach pod-a; the ~40 sent in the last 2 s must reach
    // pod-b: the socket follows the new backend at once instead of blackholing.
    assert!(report.backend("pod-a") >= 10, "{report:?}");
    assert!(report.backend("pod-b") >= 30, "the same socket reaches the new pod: {report:?}");
    say(&format!(
        "{test}: {} datagrams to pod-a, {} failed while no pod served, {} to pod-b on the same socket",
        report.backend("pod-a"),
        report.failed(),
        report.backend("pod-b")
    ));
}

// kube-proxy deletes the conntrack entries of UDP flows to an endpoint that goes away, and only
// those: every other flow keeps its backend. kproxy's slots are dense (the last backend moves
// into the slot of one that leaves), and a flow remembers its slot: the membership map keeps
// the moved backend's flows where they are.
#[test]
fn should_only_move_the_udp_flows_of_a_removed_endpoint_for_a_cluster_ip_service() {
    let test = "should_only_move_the_udp_flows_of_a_removed_endpoint_for_a_cluster_ip_service";
    let pods: Vec<String> = (0..10).map(|i| format!("pod-{i}")).collect();
    let pod_refs: Vec<&str> = pods.iter().map(String::as_str).collect();
    let Some(mut h) = harness(test, &pod_refs) else { return };
    let all: Vec<String> = pod_refs.iter().map(|p| endpoint(&h, p, "")).collect();
    program(&mut h, &manifest("", &[DNS], &all), 10);
    // 300 unconnected sockets, one datagram each (sendmsg, the per-socket affinity), then one
    // more each after pod-2 left.
    let (ready, go) = (h.workdir().join("flows-ready"), h.workdir().join("flows-go"));
    let (ready_arg, go_arg) = (ready.display().to_string(), go.display().to_string());
    let client = h
        .spawn_client(&[
            "udp-flows", "--addr", "10.96.0.7:53", "--count", "300", "--ready-file", &ready_arg, "--go-file", &go_arg,
            "--max-ms", "60000",
        ])
        .expect("start the client");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !ready.exists() {
        assert!(std::time::Instant::now() < deadline, "the first round did not finish within 30 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    let rest: Vec<String> = pod_refs.iter().filter(|p| **p != "pod-2").map(|p| endpoint(&h, p, "")).collect();
    program(&mut h, &manifest("", &[DNS], &rest), 9);
    std::fs::write(&go, b"").expect("write the go file");
    let report = Harness::client_report(client, CLIENT_WAIT).expect("client report");
    assert_eq!((report.ok, report.failed()), (300, 0), "every datagram of the second round answered: {report:?}");
    assert_eq!(report.backend("pod-2"), 0, "every socket of the removed pod-2 moved: {report:?}");
    let moved: u64 = report.moved.values().sum();
    let others: Vec<&String> = report.moved.keys().filter(|k| !k.starts_with("pod-2->")).collect();
    say(&format!("{test}: {moved} of 300 sockets moved after pod-2 left: {:?}", report.moved));
    assert!(moved >= 5, "some sockets were on pod-2: {report:?}");
    assert!(others.is_empty(), "only sockets of the removed pod-2 may move, these moved too: {others:?} ({report:?})");
}

/// The one backend that answered every request of `report`, or a panic saying otherwise.
fn single_backend(report: &Report, what: &str) -> String {
    assert_eq!(report.failed(), 0, "{what}: {report:?}");
    assert_eq!(report.by_backend.len(), 1, "{what}: one backend for every connection: {report:?}");
    report.by_backend.keys().next().expect("one backend").clone()
}

#[test]
fn should_have_session_affinity_work_for_service_with_type_cluster_ip() {
    let test = "should_have_session_affinity_work_for_service_with_type_cluster_ip";
    let Some(mut h) = harness(test, &["pod-a", "pod-b", "pod-c"]) else { return };
    let spec = "  sessionAffinity: ClientIP";
    let all: Vec<String> = ["pod-a", "pod-b", "pod-c"].iter().map(|p| endpoint(&h, p, "")).collect();
    program(&mut h, &manifest(spec, &[HTTP], &all), 3);
    // 30 new connections from this client: one backend.
    let report = client(&h, &["http", "--addr", "10.96.0.7:80", "--count", "30"]);
    let first = single_backend(&report, "with affinity");
    // That backend leaves: the affinity ends at once and the client sticks to a new one.
    let rest: Vec<String> =
        ["pod-a", "pod-b", "pod-c"].iter().filter(|p| **p != first).map(|p| endpoint(&h, p, "")).collect();
    program(&mut h, &manifest(spec, &[HTTP], &rest), 2);
    let report = client(&h, &["http", "--addr", "10.96.0.7:80", "--count", "30"]);
    let second = single_backend(&report, "after the backend left");
    assert_ne!(second, first);
    say(&format!("{test}: 30/30 connections to {first}; after it left, 30/30 to {second}"));
}

#[test]
fn should_have_session_affinity_timeout_work_for_service_with_type_cluster_ip() {
    let test = "should_have_session_affinity_timeout_work_for_service_with_type_cluster_ip";
    let Some(mut h) = harness(test, &["pod-a", "pod-b", "pod-c"]) else { return };
    let spec = "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 2}}";
    let all: Vec<String> = ["pod-a", "pod-b", "pod-c"].iter().map(|p| endpoint(&h, p, "")).collect();
    program(&mut h, &manifest(spec, &[HTTP], &all), 3);
    let report = client(&h, &["http", "--addr", "10.96.0.7:80", "--count", "10", "--interval-ms", "100"]);
    let first = single_backend(&report, "within the timeout");
    // Idle longer than the timeout, a new connection is balanced afresh: within 15 tries
    // (each 1 in 3 to land on the same pod again) it reaches another backend.
    let mut tries = 0;
    let moved = loop {
        tries += 1;
        std::thread::sleep(Duration::from_millis(2_300));
        let report = client(&h, &["http", "--addr", "10.96.0.7:80", "--count", "1"]);
        let backend = single_backend(&report, "after the timeout");
        if backend != first || tries == 15 {
            break backend;
        }
    };
    assert_ne!(moved, first, "still on {first} after {tries} idle periods longer than the timeout");
    say(&format!("{test}: 10/10 to {first} within 2 s; after idling past the timeout, {moved} (try {tries})"));
}

/// Whether the agent could load socket termination (Linux >= 6.5); says so when it could not.
fn socket_termination_available(h: &Harness, test: &str) -> bool {
    let termination = h.socket_termination().expect("reading the agent's events");
    if termination.is_some_and(|t| t.status == SocketTerminationStatus::Available) {
        return true;
    }
    say(&format!("SKIPPED (no stale-socket termination on this kernel): {test}\n{}", h.agent_log()));
    false
}

/// Starts `kproxy-testpod <args>` as a client in pod `pod`'s network namespace (and the client
/// cgroup), in the background: a pod's socket, which the agent reaches through `setns`.
fn spawn_client_in_pod(h: &Harness, pod: &str, args: &[&str]) -> kproxy_e2e::topology::ChildGuard {
    let mut cmd = Command::new(binaries().testpod);
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    spawn_in_cgroup(&h.topology.pod(pod).netns, &h.cgroup, cmd).unwrap_or_else(|e| panic!("client in {pod}: {e:#}"))
}

/// Time from the start of `report`'s client to its first error, minus `change_ms`.
/// How soon after the change a stale socket must be aborted: by the sync of the change (a
/// manifest settle and one sync, some hundreds of ms), with room for a loaded 2-core machine
/// (1.7 s seen with 5 builds running), and well inside the 6 s the clients run. Without
/// termination the socket is never aborted at all (pod-a keeps answering), which the
/// one-failure assertions catch; this bound only tells "at once" from "eventually".
const ABORTED_WITHIN_MS: f64 = 3000.0;

fn error_after_change(report: &kproxy_e2e::report::Report, change_ms: f64) -> f64 {
    report.first_error_ms.expect("an error") - change_ms
}

// kube-proxy clears the conntrack entries of UDP flows to an endpoint that goes away
// (`conntrack.go`: "should be able to preserve UDP traffic when server pod cycles", and the
// stale-UDP cleanup of `proxy/conntrack`), so a connected UDP client stops reaching it. With
// socket-level translation the backend is in the socket itself: kproxy destroys the socket,
// the application sees ECONNABORTED and a new socket goes to a live backend.
#[test]
fn should_abort_a_connected_udp_socket_whose_backend_is_deleted_for_a_cluster_ip_service() {
    let test = "should_abort_a_connected_udp_socket_whose_backend_is_deleted_for_a_cluster_ip_service";
    let Some(mut h) = harness(test, &["pod-a", "pod-b", "pod-c"]) else { return };
    let yaml = manifest("", &[DNS], &[endpoint(&h, "pod-a", "")]);
    program(&mut h, &yaml, 1);
    let pod_b = manifest("", &[DNS], &[endpoint(&h, "pod-b", "")]);
    if !socket_termination_available(&h, test) {
        return;
    }
    // Two clients, one in the node's namespace and one in a pod's (the agent's own namespace,
    // and one it enters with setns): each a connected socket, a datagram every 50 ms for 6 s,
    // a new socket after an error.
    let args = [
        "udp", "--addr", "10.96.0.7:53", "--connected", "--reconnect-on-error", "--count", "120", "--interval-ms", "50",
        "--timeout-ms", "200",
    ];
    let started = std::time::Instant::now();
    let node_client = h.spawn_client(&args).expect("start the client");
    let pod_client = spawn_client_in_pod(&h, "pod-c", &args);
    std::thread::sleep(Duration::from_secs(1));
    // pod-a leaves the service (it keeps running and would still answer the old sockets).
    let change_ms = started.elapsed().as_secs_f64() * 1e3;
    h.write_manifest(&pod_b).expect("replace pod-a by pod-b");
    let mut lines = Vec::new();
    for (client, where_) in [(node_client, "node"), (pod_client, "pod-c")] {
        let report = Harness::client_report(client, CLIENT_WAIT).expect("client report");
        let log = h.agent_log();
        // The destroyed socket is disconnected with ECONNABORTED pending: a recv() waiting on
        // it returns ECONNABORTED, a send() after it EDESTADDRREQ (it has no peer any more).
        assert_eq!(report.failed(), 1, "{where_}: one failed datagram on the old socket: {report:?}\n{log}");
        let error = report.first_error.clone().unwrap_or_default();
        assert!(
            error.contains("os error 103") || error.contains("os error 89"),
            "{where_}: the socket is aborted (ECONNABORTED or EDESTADDRREQ), not timed out: {report:?}\n{log}"
        );
        // Client-relative times start a little after `started`: this slightly underestimates.
        let after = error_after_change(&report, change_ms);
        assert!(after < ABORTED_WITHIN_MS, "{where_}: the socket is aborted promptly after the change ({after:.0} ms): {report:?}\n{log}");
        assert!(report.backend("pod-a") >= 10, "{where_}: {report:?}");
        assert!(report.backend("pod-b") >= 25, "{where_}: the re-created socket reaches the new backend: {report:?}");
        lines.push(format!(
            "{where_}: {} datagrams to pod-a, `{error}` {after:.0} ms after the change, then {} to pod-b on a new socket",
            report.backend("pod-a"),
            report.backend("pod-b")
        ));
    }
    say(&format!("{test}: {}", lines.join("; ")));
}

// The TCP counterpart: an established connection to an endpoint that is no longer listed (its
// pod is gone) is reset at once instead of hanging until retransmissions time out; the client
// reconnects through the service to a live backend.
#[test]
fn should_reset_an_established_tcp_connection_whose_backend_is_deleted_for_a_cluster_ip_service() {
    let test = "should_reset_an_established_tcp_connection_whose_backend_is_deleted_for_a_cluster_ip_service";
    let Some(mut h) = harness(test, &["pod-a", "pod-b", "pod-c"]) else { return };
    let yaml = manifest("", &[HTTP], &[endpoint(&h, "pod-a", "")]);
    program(&mut h, &yaml, 1);
    let pod_b = manifest("", &[HTTP], &[endpoint(&h, "pod-b", "")]);
    if !socket_termination_available(&h, test) {
        return;
    }
    // A keep-alive connection from pod-c (a namespace the agent enters with setns).
    let started = std::time::Instant::now();
    let client = spawn_client_in_pod(
        &h,
        "pod-c",
        &["http", "--addr", "10.96.0.7:80", "--keepalive", "--count", "120", "--interval-ms", "50", "--timeout-ms", "500"],
    );
    std::thread::sleep(Duration::from_secs(1));
    let change_ms = started.elapsed().as_secs_f64() * 1e3;
    h.write_manifest(&pod_b).expect("replace pod-a by pod-b");
    let report = Harness::client_report(client, CLIENT_WAIT).expect("client report");
    let log = h.agent_log();
    assert_eq!(report.failed(), 1, "one failed request on the aborted connection: {report:?}\n{log}");
    let kind = report.errors.keys().next().cloned().unwrap_or_default();
    assert!(
        ["ConnectionAborted", "ConnectionReset", "BrokenPipe", "UnexpectedEof"].contains(&kind.as_str()),
        "the connection is aborted, not timed out: {report:?}"
    );
    let after = error_after_change(&report, change_ms);
    assert!(after < ABORTED_WITHIN_MS, "the connection is aborted promptly after the change ({after:.0} ms): {report:?}\n{log}");
    assert_eq!(report.peers.values().sum::<u64>(), 2, "one reconnection: {report:?}");
    assert!(report.backend("pod-a") >= 10, "{report:?}");
    assert!(report.backend("pod-b") >= 25, "the new connection reaches the new backend: {report:?}");
    say(&format!(
        "{test}: from pod-c, {} requests to pod-a, {kind} {after:.0} ms after the change, then {} to pod-b on a new connection",
        report.backend("pod-a"),
        report.backend("pod-b")
    ));
}

// Graceful termination (KEP-1669): a terminating endpoint leaves the backends while ready ones
// exist, but its established connections drain, as with kube-proxy (which never touches TCP
// conntrack entries). Once the endpoint is listed no more (its pod is gone), what is still
// connected to it is ended, as for an endpoint deleted at once.
#[test]
fn should_keep_established_tcp_connections_to_a_terminating_endpoint_for_a_cluster_ip_service() {
    let test = "should_keep_established_tcp_connections_to_a_terminating_endpoint_for_a_cluster_ip_service";
    let Some(mut h) = harness(test, &["pod-a", "pod-b"]) else { return };
    let yaml = manifest("", &[HTTP], &[endpoint(&h, "pod-a", "")]);
    program(&mut h, &yaml, 1);
    if !socket_termination_available(&h, test) {
        return;
    }
    let started = std::time::Instant::now();
    let client = h
        .spawn_client(&["http", "--addr", "10.96.0.7:80", "--keepalive", "--count", "100", "--interval-ms", "50", "--timeout-ms", "500"])
        .expect("start the client");
    std::thread::sleep(Duration::from_secs(1));
    let terminating = endpoint(&h, "pod-a", "conditions: {ready: false, serving: true, terminating: true}");
    let yaml = manifest("", &[HTTP], &[terminating, endpoint(&h, "pod-b", "")]);
    h.write_manifest(&yaml).expect("pod-a terminating");
    let pod_b = format!("{}:{HTTP_PORT}", h.topology.pod("pod-b").ip);
    h.wait_for_dump(Duration::from_secs(10), |d| {
        d.services.iter().any(|s| s.frontend.starts_with("10.96.0.7:") && s.backends == [pod_b.clone()])
    })
    .unwrap_or_else(|e| panic!("pod-a not removed from the backends: {e:#}\n{}", h.agent_log()));
    let synced = started.elapsed();
    assert!(synced < Duration::from_secs(2), "the terminating sync came late ({synced:?})");
    // Draining for about a second, then pod-a is gone from the slice.
    std::thread::sleep(Duration::from_secs(1));
    let change_ms = started.elapsed().as_secs_f64() * 1e3;
    h.write_manifest(&manifest("", &[HTTP], &[endpoint(&h, "pod-b", "")])).expect("pod-a gone");
    let report = Harness::client_report(client, CLIENT_WAIT).expect("client report");
    let log = h.agent_log();
    let drained = report.backend("pod-a");
    assert!(drained >= 30, "the connection drains on pod-a while it terminates: {report:?}\n{log}");
    assert_eq!(report.failed(), 1, "one failed request once pod-a is gone: {report:?}\n{log}");
    let kind = report.errors.keys().next().cloned().unwrap_or_default();
    assert!(
        ["ConnectionAborted", "ConnectionReset", "BrokenPipe", "UnexpectedEof"].contains(&kind.as_str()),
        "the connection is aborted, not timed out: {report:?}"
    );
    let after = error_after_change(&report, change_ms);
    assert!(after < 1000.0, "the connection is aborted within 1 s of pod-a's removal ({after:.0} ms): {report:?}\n{log}");
    assert!(report.backend("pod-b") >= 20, "the new connection reaches pod-b: {report:?}");
    say(&format!(
        "{test}: {drained} requests to pod-a, terminating from {synced:?} on, then {kind} {after:.0} ms after it was removed, {} to pod-b",
        report.backend("pod-b")
    ));
}
