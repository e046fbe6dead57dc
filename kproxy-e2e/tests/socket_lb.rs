//! Privileged end-to-end tests of kproxy's socket-level load balancing.
//!
//! Each test builds its own node + pods topology and client cgroup, writes its own manifest,
//! runs the real `kproxy run` (from `KPROXY_BIN`, else `<workspace>/target/debug/kproxy`) and
//! sends real traffic with `kproxy-testpod` from the node namespace inside the client cgroup.
//! Traffic never leaves the test's namespaces; every client run is bounded. The harness tears
//! everything down (agent, `kproxy cleanup`, namespaces, cgroup) even when an assertion fails.
//!
//! Run them with `cargo xtask test`, or after `cargo xtask build`:
//! `cargo test -p kproxy-e2e --test socket_lb -- --test-threads=1`. Without root every test prints
//! `SKIPPED (needs root)` and passes.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

mod common;

use common::{binaries, counts, say, skip_unless_root};
use kproxy_e2e::cmd;
use kproxy_e2e::harness::{unique_bpffs_dir, Harness, HTTP_PORT, UDP_PORT};
use kproxy_e2e::manifest::{Protocol, ServiceSpec};
use kproxy_e2e::report::Report;

const WEB_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const WEB: &str = "10.96.0.10:80";
const DNS_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 53);
const DNS: &str = "10.96.0.53:53";
const EMPTY_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 99);
const EMPTY: &str = "10.96.0.99:80";

/// How long a starting agent may take to program a manifest (load and verify every program,
/// attach, first sync): an upper bound, waited out only by a failure. Well under a second
/// here; 4-8 s on the emulated kernels of `cargo xtask vm-test` when the machine is busy.
const PROGRAMMED: Duration = Duration::from_secs(30);
/// Upper bound of one client run (the clients bound themselves well below this).
const CLIENT_WAIT: Duration = Duration::from_secs(90);

/// A harness with `pods`, or `None` after a loud SKIPPED line when not running as root.
fn harness(test: &str, pods: &[&str]) -> Option<Harness> {
    if skip_unless_root(test) {
        return None;
    }
    let h = Harness::new(binaries(), pods, unique_bpffs_dir("kproxy-test"))
        .unwrap_or_else(|e| panic!("{test}: setting up the harness: {e:#}"));
    Some(h)
}

/// `spec` with `endpoints` (pod name, ready) taken from the harness's pods.
fn with_endpoints(h: &Harness, spec: ServiceSpec, endpoints: &[(&str, bool)]) -> ServiceSpec {
    endpoints.iter().fold(spec, |spec, &(pod, ready)| {
        spec.endpoint(pod, h.topology.pod(pod).ip, ready)
    })
}

/// Service `web`: 10.96.0.10:80 (port "http", TCP) to the pods' HTTP port.
fn web(h: &Harness, endpoints: &[(&str, bool)]) -> ServiceSpec {
    let spec = ServiceSpec::new("web", WEB_IP, 80, "http", Protocol::Tcp, HTTP_PORT);
    with_endpoints(h, spec, endpoints)
}

/// Service `dns`: 10.96.0.53:53 (port "dns", UDP) to the pods' UDP port.
fn dns(h: &Harness, endpoints: &[(&str, bool)]) -> ServiceSpec {
    let spec = ServiceSpec::new("dns", DNS_IP, 53, "dns", Protocol::Udp, UDP_PORT);
    with_endpoints(h, spec, endpoints)
}

/// Writes the manifest, starts the agent and waits until its dump shows exactly `services`.
fn start(h: &mut Harness, services: &[ServiceSpec]) {
    h.write_services(services).expect("writing the manifest");
    h.start_agent().expect("starting kproxy run");
    h.wait_for_services(services, PROGRAMMED)
        .unwrap_or_else(|e| panic!("kproxy did not program the manifest: {e:#}"));
}

/// Runs `kproxy-testpod <kind> --addr <addr> --count <count> <extra>` as a client.
fn client(h: &Harness, kind: &str, addr: &str, count: u32, extra: &[&str]) -> Report {
    let count = count.to_string();
    let mut args = vec![kind, "--addr", addr, "--count", &count];
    args.extend_from_slice(extra);
    h.run_client(&args, CLIENT_WAIT)
        .unwrap_or_else(|e| panic!("client {args:?}: {e:#}"))
}

fn http(h: &Harness, addr: &str, count: u32, extra: &[&str]) -> Report {
    client(h, "http", addr, count, extra)
}

fn udp(h: &Harness, addr: &str, count: u32, extra: &[&str]) -> Report {
    client(h, "udp", addr, count, extra)
}

/// `bpftool cgroup show <cgroup> -j`: the programs attached to the cgroup itself.
fn attached_programs(cgroup: &Path) -> Vec<serde_json::Value> {
    let mut bpftool = Command::new("bpftool");
    bpftool.args(["cgroup", "show"]).arg(cgroup).arg("-j");
    let shown = cmd::output(&mut bpftool).expect("bpftool cgroup show");
    // bpftool prints nothing at all for a cgroup without programs.
    if shown.trim().is_empty() {
        return Vec::new();
    }
    match serde_json::from_str(&shown) {
        Ok(serde_json::Value::Array(programs)) => programs,
        other => panic!("bpftool cgroup show printed {shown:?}: {other:?}"),
    }
}

/// All `count` requests succeeded.
fn assert_all_ok(report: &Report, count: u64) {
    assert!(
        report.errors.is_empty() && report.ok == count,
        "expected {count} successful requests, got {} ok and errors {:?} (first: {:?} at {:?} ms)",
        report.ok,
        report.errors,
        report.first_error,
        report.first_error_ms
    );
}

#[test]
fn tcp_clusterip_spreads_over_every_ready_backend() {
    let test = "tcp_clusterip_spreads_over_every_ready_backend";
    let Some(mut h) = harness(test, &["pod-a", "pod-b", "pod-c", "pod-d"]) else {
        return;
    };
    let ready = [("pod-a", true), ("pod-b", true), ("pod-c", true)];
    let web = web(&h, &[ready[0], ready[1], ready[2], ("pod-d", false)]);
    start(&mut h, &[web]);

    let r = http(&h, WEB, 300, &[]);
    assert_all_ok(&r, 300);
    for (pod, _) in ready {
        let n = r.backend(pod);
        assert!(
            (60..=140).contains(&n),
            "{pod} answered {n} of 300 requests, outside a fair share 60..=140: {:?}",
            r.by_backend
        );
    }
    assert_eq!(
        r.backend("pod-d"),
        0,
        "the not-ready pod-d got traffic: {:?}",
        r.by_backend
    );
    assert_eq!(
        r.peers,
        counts(&[(WEB, 300)]),
        "getpeername() must return the service address, not the backend's"
    );
}

#[test]
fn curl_reaches_clusterip() {
    let Some(mut h) = harness("curl_reaches_clusterip", &["pod-a"]) else {
        return;
    };
    let web = web(&h, &[("pod-a", true)]);
    start(&mut h, &[web]);

    let mut curl = Command::new("curl");
    curl.args([
        "--silent",
        "--show-error",
        "--noproxy",
        "*",
        "--max-time",
        "5",
    ])
    .args(["--write-out", "%{http_code} %{remote_ip}:%{remote_port}"])
    .arg(format!("http://{WEB}/"));
    let out = h
        .run_in_client_cgroup(curl, Duration::from_secs(15))
        .expect("running curl");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "curl http://{WEB}/ failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout,
        format!("pod-a\nclient {}\n200 {WEB}", kproxy_e2e::topology::BRIDGE_IP),
        "body (the pod saw the node's own address), status and peer seen by curl"
    );
}

#[test]
fn udp_reply_comes_from_service_address() {
    let test = "udp_reply_comes_from_service_address";
    let Some(mut h) = harness(test, &["pod-a", "pod-b"]) else {
        return;
    };
    let dns = dns(&h, &[("pod-a", true), ("pod-b", true)]);
    start(&mut h, &[dns]);

    // One unconnected socket: every reply carries the service address as its source, and the
    // socket keeps its backend (as kube-proxy's conntrack entry would).
    let r = udp(&h, DNS, 30, &[]);
    assert_all_ok(&r, 30);
    assert_eq!(
        r.sources,
        counts(&[(DNS, 30)]),
        "replies to an unconnected socket must come from the service address"
    );
    assert_eq!(
        r.by_backend.len(),
        1,
        "one unconnected socket switched backends: {:?}",
        r.by_backend
    );

    // A fresh socket per datagram, as DNS resolvers do: spread over both ready backends.
    let r = udp(&h, DNS, 60, &["--new-socket"]);
    assert_all_ok(&r, 60);
    assert_eq!(
        r.sources,
        counts(&[(DNS, 60)]),
        "source of the replies to new sockets"
    );
    for pod in ["pod-a", "pod-b"] {
        assert!(
            r.backend(pod) >= 10,
            "datagrams from new sockets were not spread over both backends: {:?}",
            r.by_backend
        );
    }

    // A connected socket: getpeername() and the replies' source are the service address.
    let r = udp(&h, DNS, 20, &["--connected"]);
    assert_all_ok(&r, 20);
    assert_eq!(
        r.peers,
        counts(&[(DNS, 1)]),
        "getpeername() of the connected socket"
    );
    assert_eq!(
        r.sources,
        counts(&[(DNS, 20)]),
        "source of the replies on a connected socket"
    );
    assert_eq!(
        r.by_backend.len(),
        1,
        "a connected socket switched backends: {:?}",
        r.by_backend
    );
}

/// A process in the attached cgroup opens thousands of sockets through a service, 16 times as
/// many as the shared LRU maps hold (`--max-sock-entries 256`), while another socket is in
/// use: that socket's `getpeername()` and the source of its UDP replies keep showing the
/// service, because its translation lives in its own storage. The metrics show where the
/// translations went: all into socket storage, none into the LRU map.
#[test]
fn a_process_opening_many_sockets_cannot_evict_another_sockets_translation() {
    let test = "a_process_opening_many_sockets_cannot_evict_another_sockets_translation";
    if skip_unless_root(test) {
        return;
    }
    const FLOOD: u32 = 4096;
    let mut h = Harness::new(binaries(), &["pod-a", "pod-b"], unique_bpffs_dir("kproxy-test"))
        .unwrap_or_else(|e| panic!("{test}: setting up the harness: {e:#}"))
        .with_agent_args(&["--max-sock-entries", "256", "--sync-period", "2s"]);
    let dns = dns(&h, &[("pod-a", true), ("pod-b", true)]);
    start(&mut h, &[dns]);

    // The victim: one connected socket, a datagram every second for 8 s, getpeername() after
    // each. The flood comes between its first and second datagram (it takes well under a
    // second), while the victim is idle, as most sockets are most of the time.
    let victim = h
        .spawn_client(&[
            "udp", "--addr", DNS, "--connected", "--peer-each-datagram", "--count", "8", "--interval-ms", "1000",
        ])
        .expect("starting the victim");
    std::thread::sleep(Duration::from_millis(300));
    let flood = client(&h, "flood", DNS, FLOOD, &[]);
    assert_eq!(
        (flood.ok, flood.failed()),
        (u64::from(FLOOD), 0),
        "the flood connected every socket: {flood:?}"
    );
    assert_eq!(flood.peers, counts(&[(DNS, u64::from(FLOOD))]), "getpeername() of the flood's own sockets");
    let r = Harness::client_report(victim, CLIENT_WAIT).expect("victim report");
    assert_all_ok(&r, 8);
    assert_eq!(
        r.peers,
        counts(&[(DNS, 9)]),
        "getpeername() of the victim, at connect and after each datagram, before and after {FLOOD} other sockets"
    );
    assert_eq!(
        r.sources,
        counts(&[(DNS, 8)]),
        "the source of every reply to the victim, before and after {FLOOD} other sockets"
    );

    // Every translation (the flood's and the victim's) went into socket storage, none into
    // the LRU map: a scrape after the next sync (full syncs every 2 s) shows it.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let metrics = loop {
        let m = h.metrics().expect("scraping /metrics");
        let stored = m.get("kproxy_sock_storage_entries_total", &[]).unwrap_or(0.0);
        if stored >= f64::from(FLOOD + 1) || std::time::Instant::now() > deadline {
            break m;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let stored = metrics.get("kproxy_sock_storage_entries_total", &[]);
    let lru = metrics.get("kproxy_sock_lru_inserts_total", &[("map", "KP_SOCK_REVNAT")]);
    let capacity = metrics.get("kproxy_bpf_map_capacity", &[("map", "KP_SOCK_REVNAT")]);
    let overflow = metrics.get("kproxy_sock_storage_overflow_total", &[]);
    let entries = metrics.get("kproxy_bpf_map_entries", &[("map", "KP_SOCK_REVNAT")]);
    say(&format!(
        "{test}: {FLOOD} sockets opened in {:.0} ms; the victim's 8 replies and 9 getpeername() all showed {DNS}; \
         socket storage entries {stored:?}, overflow {overflow:?}, KP_SOCK_REVNAT inserts {lru:?} (capacity {capacity:?})",
        flood.elapsed_ms
    ));
    assert!(stored >= Some(f64::from(FLOOD + 1)), "kproxy_sock_storage_entries_total: {stored:?}");
    assert_eq!(
        (lru, overflow, entries, capacity),
        (Some(0.0), Some(0.0), Some(0.0), Some(256.0)),
        "the shared LRU map saw no translation"
    );
}

#[test]
fn service_without_endpoints_refuses_fast() {
    let test = "service_without_endpoints_refuses_fast";
    let Some(mut h) = harness(test, &["pod-a"]) else {
        return;
    };
    let empty = ServiceSpec::new("empty", EMPTY_IP, 80, "http", Protocol::Tcp, HTTP_PORT);
    start(&mut h, &[empty]);

    let r = http(&h, EMPTY, 5, &[]);
    assert_eq!(
        r.errors,
        counts(&[("ConnectionRefused", 5)]),
        "connecting to a service without endpoints must be refused (first error: {:?})",
        r.first_error
    );
    let slowest = r.failure_ms.expect("failed requests have timings").max;
    assert!(
        slowest < 100.0,
        "refusal took {slowest} ms, expected < 100 ms"
    );
}

#[test]
fn removing_backend_stops_new_connections_within_1s() {
    let test = "removing_backend_stops_new_connections_within_1s";
    let Some(mut h) = harness(test, &["pod-a", "pod-b", "pod-c"]) else {
        return;
    };
    let web = web(&h, &[("pod-a", true), ("pod-b", true), ("pod-c", true)]);
    start(&mut h, std::slice::from_ref(&web));
    let before = http(&h, WEB, 60, &[]);
    assert_all_ok(&before, 60);
    assert!(
        before.backend("pod-c") > 0,
        "pod-c got no traffic before its removal"
    );

    let without_c = web.without("pod-c");
    h.write_services(std::slice::from_ref(&without_c))
        .expect("rewriting the manifest");
    let (_, took) = h
        .wait_for_services(&[without_c], Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("the dump kept listing pod-c: {e:#}"));
    say(&format!(
        "{test}: kproxy dump stopped listing pod-c {} ms after the manifest changed",
        took.as_millis()
    ));
    assert!(
        took < Duration::from_secs(1),
        "removal took {took:?}, expected < 1 s"
    );

    let after = http(&h, WEB, 60, &[]);
    assert_all_ok(&after, 60);
    assert_eq!(
        after.backend("pod-c"),
        0,
        "removed pod-c still got connections: {:?}",
        after.by_backend
    );
}

#[test]
fn datapath_survives_kill_9() {
    let Some(mut h) = harness("datapath_survives_kill_9", &["pod-a", "pod-b"]) else {
        return;
    };
    let web = web(&h, &[("pod-a", true), ("pod-b", true)]);
    start(&mut h, &[web]);

    let status = h.kill_agent().expect("kill -9 the agent");
    say(&format!("datapath_survives_kill_9: agent ended: {status}"));
    let r = http(&h, WEB, 50, &[]);
    assert_all_ok(&r, 50);
    assert_eq!(
        r.backend("pod-a") + r.backend("pod-b"),
        50,
        "{:?}",
        r.by_backend
    );
}

#[test]
fn restart_without_disruption() {
    let Some(mut h) = harness("restart_without_disruption", &["pod-a", "pod-b"]) else {
        return;
    };
    let web = web(&h, &[("pod-a", true), ("pod-b", true)]);
    start(&mut h, std::slice::from_ref(&web));
    let before = h.dump().expect("dump before the restart");

    // About 2.5 s of requests, 5 ms apart; the restart happens in the middle.
    let args = [
        "http",
        "--addr",
        WEB,
        "--count",
        "400",
        "--interval-ms",
        "5",
    ];
    let mut client = h.spawn_client(&args).expect("starting the client");
    std::thread::sleep(Duration::from_millis(300));
    let status = h.stop_agent().expect("stopping the agent with SIGTERM");
    say(&format!(
        "restart_without_disruption: agent stopped: {status}"
    ));
    std::thread::sleep(Duration::from_millis(200));
    h.start_agent().expect("restarting the agent");
    h.wait_for_services(&[web], PROGRAMMED)
        .unwrap_or_else(|e| panic!("the restarted agent did not show the manifest: {e:#}"));
    assert!(
        client.is_running(),
        "the client finished before the agent was back; the test proved nothing"
    );

    let r = Harness::client_report(client, CLIENT_WAIT).expect("client report");
    assert_all_ok(&r, 400);
    let after = h.dump().expect("dump after the restart");
    assert_eq!(after, before, "the restart changed the programmed state");
}

/// An agent started on the pins of a version that had no membership map, socket storage,
/// socket counters or drop counters (simulated by removing those pins) adopts the others,
/// creates and pins the missing maps, and fills the membership map in its first sync; traffic
/// never stops.
#[test]
fn restart_on_an_older_layout_creates_the_maps_it_lacks() {
    let Some(mut h) = harness("restart_on_an_older_layout_creates_the_maps_it_lacks", &["pod-a", "pod-b", "pod-c"]) else {
        return;
    };
    let web = web(&h, &[("pod-a", true), ("pod-b", true), ("pod-c", true)]);
    start(&mut h, std::slice::from_ref(&web));
    h.stop_agent().expect("stopping the agent");
    let maps = h.bpffs_dir().join("maps");
    let added = ["KP_SVC_MEMBERS", "KP_SOCK_LOCAL", "KP_SOCK_STATS", "KP_DROPS"];
    for name in added {
        std::fs::remove_file(maps.join(name)).unwrap_or_else(|e| panic!("unpin {name}: {e}"));
    }
    let r = http(&h, WEB, 20, &[]);
    assert_all_ok(&r, 20);
    h.start_agent().expect("restarting the agent");
    h.wait_for_services(&[web], PROGRAMMED)
        .unwrap_or_else(|e| panic!("the restarted agent did not show the manifest: {e:#}"));
    for name in added {
        assert!(maps.join(name).exists(), "{name} was not pinned again");
    }
    // The dump matched at once (the services map was kept); the first sync follows.
    let deadline = std::time::Instant::now() + PROGRAMMED;
    let members = loop {
        let mut bpftool = Command::new("bpftool");
        bpftool.args(["map", "dump", "pinned"]).arg(maps.join("KP_SVC_MEMBERS")).arg("-j");
        let dumped: serde_json::Value =
            serde_json::from_str(&cmd::output(&mut bpftool).expect("bpftool map dump")).expect("JSON");
        if dumped.as_array().map(Vec::len) == Some(3) || std::time::Instant::now() > deadline {
            break dumped;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(members.as_array().map(Vec::len), Some(3), "one membership entry per backend: {members}");
    // The new drop counters dump as a per-CPU array, one entry per reason slot.
    let mut bpftool = Command::new("bpftool");
    bpftool.args(["map", "dump", "pinned"]).arg(maps.join("KP_DROPS")).arg("-j");
    let drops: serde_json::Value = serde_json::from_str(&cmd::output(&mut bpftool).expect("bpftool map dump")).expect("JSON");
    let slots = drops.as_array().map(Vec::len);
    assert_eq!(slots, Some(32), "KP_DROPS has DROP_SLOTS (32) entries: {drops}");
    assert!(drops[0]["values"].as_array().is_some_and(|v| !v.is_empty()), "per-CPU values: {}", drops[0]);
    let r = http(&h, WEB, 30, &[]);
    assert_all_ok(&r, 30);
    assert_eq!(r.peers, counts(&[(WEB, 30)]), "getpeername() through the new socket storage");
}

#[test]
fn cleanup_leaves_nothing() {
    let Some(mut h) = harness("cleanup_leaves_nothing", &["pod-a"]) else {
        return;
    };
    let web = web(&h, &[("pod-a", true)]);
    start(&mut h, &[web]);

    let cgroup = h.cgroup.path().to_path_buf();
    assert!(
        !attached_programs(&cgroup).is_empty(),
        "bpftool shows no program on {} while kproxy runs",
        cgroup.display()
    );

    h.cleanup().expect("kproxy cleanup");
    assert!(
        !h.bpffs_dir().exists(),
        "{} still exists after kproxy cleanup",
        h.bpffs_dir().display()
    );
    let cgroup = h.cgroup.path().to_path_buf();
    let shown = cmd::output(
        Command::new("bpftool")
            .args(["cgroup", "show"])
            .arg(&cgroup)
            .arg("-j"),
    )
    .expect("bpftool cgroup show");
    // bpftool prints nothing at all for a cgroup without programs.
    let programs: serde_json::Value = match shown.trim() {
        "" => serde_json::json!([]),
        text => serde_json::from_str(text).expect("bpftool JSON"),
    };
    assert_eq!(
        programs,
        serde_json::json!([]),
        "programs still attached to {} after kproxy cleanup",
        cgroup.display()
    );

    // Without the programs nothing translates the service address (and nothing routes it).
    let r = http(&h, WEB, 1, &["--timeout-ms", "500"]);
    assert_eq!(r.ok, 0, "the service still answered after cleanup: {r:?}");
}
