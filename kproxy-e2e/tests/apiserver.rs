//! Privileged end-to-end tests of the agent's apiserver source: the real `kproxy run
//! --kubeconfig` against the fake apiserver (`kproxy_e2e::fake_apiserver`, real HTTP list/watch on
//! 127.0.0.1), with faults injected on the server side (cut watches, 410 Gone, restarts), a
//! killed agent, invalid objects, and scrapes of `/healthz`, `/livez` and `/metrics`.
//!
//! Where things run: the agent runs in the topology's node namespace, as with manifests (and as
//! kube-proxy runs in the node's network). The fake apiserver is a runtime inside this test
//! process whose listening socket was made in that node namespace, so the agent reaches it on
//! the node's 127.0.0.1; the test scrapes the agent's health and metrics ports there too, with
//! sockets made in the namespace (`Harness::with_apiserver`, `kproxy_e2e::topology::in_netns`).
//! Pods, clients and all service traffic stay in the topology's namespaces and the client
//! cgroup, as in `socket_lb.rs`; nothing touches the machine's own network.
//!
//! Convergence is polled with `kproxy dump --json`, bounded in time. A `DumpPoller` checks,
//! while faults happen, that no service and no backend that was never removed disappears.
//!
//! Run them with `cargo xtask test`, or after `cargo xtask build`:
//! `cargo test -p kproxy-e2e --test apiserver -- --test-threads=1`. Without root every test prints
//! `SKIPPED (needs root)` and passes.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

mod common;

use common::{binaries, say, skip_unless_root};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::{json, Value};
use kproxy_e2e::dump_poller::{DumpPoller, Invariant};
use kproxy_e2e::fake_apiserver::{FakeApiServer, Kind, LabelSelector, RequestRecord};
use kproxy_e2e::harness::{unique_bpffs_dir, Dump, Harness, HTTP_PORT, UDP_PORT};
use kproxy_e2e::k8s;
use kproxy_e2e::promql;
use kproxy_e2e::manifest::{Endpoint, Protocol, ServiceSpec};
use kproxy_e2e::report::Report;

/// The Node the agent runs as (`--hostname-override`).
const NODE: &str = "kproxy-e2e-node";
/// kube-proxy's label selector for Services and EndpointSlices.
const KUBE_PROXY_SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

/// How long the agent may take to follow a change (watch events, then a sync).
const CONVERGE: Duration = Duration::from_secs(10);
/// How long it may take after a fault (backoff, relist, reconnect).
const RECOVER: Duration = Duration::from_secs(30);
/// Upper bound of one client run (the clients bound themselves well below this).
const CLIENT_WAIT: Duration = Duration::from_secs(90);

/// A harness whose agent watches a fake apiserver. Field order is drop order: the agent stops
/// (and `kproxy cleanup` runs) before the server goes away.
struct Env {
    h: Harness,
    api: FakeApiServer,
}

/// An [`Env`] with `pods` and Node [`NODE`], or `None` after a loud SKIPPED line when not
/// running as root. The fake apiserver listens on 127.0.0.1 of the node namespace; the agent is
/// not started yet.
fn env(test: &str, pods: &[&str], agent_args: &[&str]) -> Option<Env> {
    if skip_unless_root(test) {
        return None;
    }
    let h = Harness::new(binaries(), pods, unique_bpffs_dir("kproxy-api"))
        .unwrap_or_else(|e| panic!("{test}: setting up the harness: {e:#}"));
    let api = FakeApiServer::start_in(&h.topology.node.path(), (Ipv4Addr::LOCALHOST, 0).into())
        .unwrap_or_else(|e| panic!("{test}: starting the fake apiserver: {e:#}"));
    api.create(&k8s::node(NODE)).expect("creating the Node");
    let h = h
        .with_apiserver(&api, NODE)
        .map(|h| h.with_agent_args(agent_args))
        .unwrap_or_else(|e| panic!("{test}: pointing the agent at the apiserver: {e:#}"));
    Some(Env { h, api })
}

impl Env {
    fn pod_ip(&self, pod: &str) -> Ipv4Addr {
        self.h.topology.pod(pod).ip
    }

    /// `spec` with `endpoints` (pod name, ready) taken from the topology's pods.
    fn with_endpoints(&self, spec: ServiceSpec, endpoints: &[(&str, bool)]) -> ServiceSpec {
        endpoints.iter().fold(spec, |spec, &(pod, ready)| {
            spec.endpoint(pod, self.pod_ip(pod), ready)
        })
    }

    /// TCP service `name` on `ip:80` to the pods' HTTP port.
    fn http_service(&self, name: &str, ip: [u8; 4], endpoints: &[(&str, bool)]) -> ServiceSpec {
        let spec = ServiceSpec::new(name, ip.into(), 80, "http", Protocol::Tcp, HTTP_PORT);
        self.with_endpoints(spec, endpoints)
    }

    /// Creates or replaces the Service of `spec` and its endpoints spread over `slices` slices.
    fn publish(&self, spec: &ServiceSpec, slices: usize) {
        self.api
            .apply(&k8s::service(spec))
            .expect("applying a Service");
        for slice in k8s::slices(spec, slices) {
            self.api.apply(&slice).expect("applying an EndpointSlice");
        }
    }

    fn start_agent(&mut self) {
        self.h.start_agent().expect("starting kproxy run");
    }

    /// Waits until the dump holds exactly `specs` (one entry each, exact ready backends).
    fn wait_exact(&mut self, specs: &[ServiceSpec], timeout: Duration) -> Duration {
        let (_, took) = self
            .h
            .wait_for_dump(timeout, |d| exactly(d, specs))
            .unwrap_or_else(|e| {
                panic!("the agent did not converge: {e:#}\n{}", self.api_summary())
            });
        took
    }

    /// Waits until the agent has an open watch on every resource.
    fn wait_for_watches(&self) {
        self.api
            .wait_for_watches(&[Kind::Service, Kind::EndpointSlice, Kind::Node], RECOVER)
            .unwrap_or_else(|e| panic!("{e:#}\n{}", self.api_summary()));
    }

    /// The server's counters and last requests, for failure messages.
    fn api_summary(&self) -> String {
        let requests = self.api.requests();
        let tail: Vec<String> = requests.iter().rev().take(15).rev().map(describe).collect();
        format!(
            "fake apiserver: rv {}, {:?}, last requests:\n  {}",
            self.api.resource_version(),
            self.api.stats(),
            tail.join("\n  ")
        )
    }

    fn http(&self, addr: &str, count: u32) -> Report {
        let count = count.to_string();
        let args = ["http", "--addr", addr, "--count", &count];
        self.h
            .run_client(&args, CLIENT_WAIT)
            .unwrap_or_else(|e| panic!("client {args:?}: {e:#}"))
    }

    fn poller(&self, invariants: Vec<Invariant>) -> DumpPoller {
        DumpPoller::start(&self.h.binaries().kproxy, self.h.bpffs_dir(), invariants)
    }
}

fn describe(r: &RequestRecord) -> String {
    format!(
        "#{} {} {}?{} -> {}",
        r.seq, r.method, r.path, r.query, r.status
    )
}

/// Whether `dump` lists exactly `specs`: one entry each, with exactly its ready backends.
fn exactly(dump: &Dump, specs: &[ServiceSpec]) -> bool {
    dump.services.len() == specs.len() && dump.matches_all(specs)
}

/// `ip:port` backends of `spec` that are ready, as the dump prints them.
fn backends(spec: &ServiceSpec) -> Vec<String> {
    spec.ready_backends()
}

/// An invariant: `spec`'s service with at least these of its backends.
fn keeps(spec: &ServiceSpec, pods: &[&str]) -> Invariant {
    let wanted: Vec<String> = spec
        .endpoints
        .iter()
        .filter(|e| pods.contains(&e.pod.as_str()))
        .map(|e| format!("{}:{}", e.ip, spec.target_port))
        .collect();
    let wanted: Vec<&str> = wanted.iter().map(String::as_str).collect();
    Invariant::new(&spec.name, &wanted)
}

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

fn to_json<T: serde::Serialize>(object: &T) -> Value {
    serde_json::to_value(object).expect("serializing an object")
}

#[test]
fn follows_services_and_endpointslices() {
    let test = "follows_services_and_endpointslices";
    let Some(mut e) = env(test, &["pod-a", "pod-b", "pod-c"], &[]) else {
        return;
    };
    // web: two slices (pod-a in web-0, pod-b in web-1); dns: UDP, one slice.
    let web = e.http_service("web", [10, 96, 0, 10], &[("pod-a", true), ("pod-b", true)]);
    let dns = e.with_endpoints(
        ServiceSpec::new(
            "dns",
            [10, 96, 0, 53].into(),
            53,
            "dns",
            Protocol::Udp,
            UDP_PORT,
        ),
        &[("pod-c", true)],
    );
    e.publish(&web, 2);
    e.publish(&dns, 1);
    e.start_agent();
    let took = e.wait_exact(&[web.clone(), dns.clone()], CONVERGE);
    say(&format!(
        "{test}: initial state programmed {} ms after start",
        took.as_millis()
    ));

    let r = e.http("10.96.0.10:80", 40);
    assert_all_ok(&r, 40);
    assert!(
        r.backend("pod-a") > 0 && r.backend("pod-b") > 0,
        "both slices' endpoints must get traffic: {:?}",
        r.by_backend
    );

    // Endpoint changes in both slices: pod-a not ready, pod-c added.
    let web2 = e.http_service(
        "web",
        [10, 96, 0, 10],
        &[("pod-a", false), ("pod-b", true), ("pod-c", true)],
    );
    e.publish(&web2, 2);
    e.wait_exact(&[web2.clone(), dns.clone()], CONVERGE);

    // Deleting a service and its slice.
    e.api.delete::<Service>("default", "dns").unwrap();
    e.api.delete::<EndpointSlice>("default", "dns-0").unwrap();
    e.wait_exact(std::slice::from_ref(&web2), CONVERGE);

    // A service change: the port moves from 80 to 81.
    let web3 = ServiceSpec {
        port: 81,
        ..web2.clone()
    };
    e.api.apply(&k8s::service(&web3)).unwrap();
    e.wait_exact(std::slice::from_ref(&web3), CONVERGE);

    // Deleting one of the two slices leaves the other's endpoints.
    e.api.delete::<EndpointSlice>("default", "web-1").unwrap();
    let remaining: Vec<Endpoint> = k8s::slices(&web3, 2)[0]
        .endpoints
        .iter()
        .map(|ep| {
            web3.endpoints
                .iter()
                .find(|x| x.ip.to_string() == ep.addresses[0])
                .unwrap()
                .clone()
        })
        .collect();
    let web4 = ServiceSpec {
        endpoints: remaining,
        ..web3.clone()
    };
    e.wait_exact(std::slice::from_ref(&web4), CONVERGE);
    let r = e.http("10.96.0.10:81", 20);
    assert_all_ok(&r, 20);
    let expected: BTreeSet<String> = web4
        .endpoints
        .iter()
        .filter(|x| x.ready)
        .map(|x| x.pod.clone())
        .collect();
    let got: BTreeSet<String> = r.by_backend.keys().cloned().collect();
    assert_eq!(got, expected, "traffic went to {:?}", r.by_backend);
}

#[test]
fn recovers_from_cut_watches_without_flapping() {
    let test = "recovers_from_cut_watches_without_flapping";
    let Some(mut e) = env(test, &["pod-a", "pod-b", "pod-c", "pod-d"], &[]) else {
        return;
    };
    let stable = e.http_service(
        "stable",
        [10, 96, 0, 20],
        &[("pod-a", true), ("pod-b", true)],
    );
    // churn: slice churn-fixed always holds pod-a; churn-var changes all the time.
    let churn_base = e.http_service("churn", [10, 96, 0, 21], &[]);
    let fixed = e.with_endpoints(churn_base.clone(), &[("pod-a", true)]);
    let ips: Vec<(String, Ipv4Addr)> = ["pod-b", "pod-c", "pod-d"]
        .iter()
        .map(|&p| (p.to_string(), e.pod_ip(p)))
        .collect();
    let churn_slices = |var_pods: &[&str]| {
        let var = ips
            .iter()
            .filter(|(p, _)| var_pods.contains(&p.as_str()))
            .fold(churn_base.clone(), |s, (p, ip)| s.endpoint(p, *ip, true));
        let spec = ServiceSpec {
            endpoints: fixed
                .endpoints
                .iter()
                .chain(&var.endpoints)
                .cloned()
                .collect(),
            ..churn_base.clone()
        };
        let slices = [
            k8s::slice_with(&fixed, "churn-fixed", &fixed.endpoints),
            k8s::slice_with(&var, "churn-var", &var.endpoints),
        ];
        (spec, slices)
    };
    e.publish(&stable, 2);
    e.api.apply(&k8s::service(&churn_base)).unwrap();
    let (mut churn, slices) = churn_slices(&["pod-b"]);
    for s in &slices {
        e.api.apply(s).unwrap();
    }
    e.start_agent();
    e.wait_exact(&[stable.clone(), churn.clone()], CONVERGE);
    e.wait_for_watches();

    let poller = e.poller(vec![
        keeps(&stable, &["pod-a", "pod-b"]),
        keeps(&churn, &["pod-a"]),
    ]);
    let rotations: [&[&str]; 6] = [
        &["pod-c"],
        &["pod-c", "pod-d"],
        &[],
        &["pod-d"],
        &["pod-b", "pod-c", "pod-d"],
        &["pod-b"],
    ];
    let mut extras: Vec<ServiceSpec> = Vec::new();
    let mut cut = 0;
    for (i, var) in rotations.iter().enumerate() {
        cut += e.api.cut_watches();
        let (spec, slices) = churn_slices(var);
        churn = spec;
        e.api.apply(&slices[1]).unwrap();
        if i % 2 == 0 {
            let extra = e.http_service(
                &format!("extra-{i}"),
                [10, 96, 1, i as u8 + 1],
                &[("pod-c", true)],
            );
            e.publish(&extra, 1);
            extras.push(extra);
        } else if let Some(old) = extras.first().cloned() {
            e.api.delete::<Service>("default", &old.name).unwrap();
            e.api
                .delete::<EndpointSlice>("default", &format!("{}-0", old.name))
                .unwrap();
            extras.remove(0);
        }
        // Cut again while the agent is (probably) reconnecting, then let it catch up a little.
        std::thread::sleep(Duration::from_millis(100 + 50 * i as u64));
        cut += e.api.cut_watches();
        std::thread::sleep(Duration::from_millis(150));
    }
    let mut expected = vec![stable.clone(), churn.clone()];
    expected.extend(extras.iter().cloned());
    let took = e.wait_exact(&expected, RECOVER);
    // A little longer, to see that nothing flaps after convergence either.
    std::thread::sleep(Duration::from_millis(500));
    let report = poller.stop();
    say(&format!(
        "{test}: {cut} watches cut; converged {} ms after the last change; {} dumps checked; \
         server stats {:?}",
        took.as_millis(),
        report.samples,
        e.api.stats()
    ));
    assert!(
        cut >= 6,
        "the cuts hit only {cut} open watches: the test proved little"
    );
    report.assert_clean(test);
    assert!(e.h.agent_running(), "the agent died:\n{}", e.h.agent_log());
    // Resumed watches name a resourceVersion.
    let resumed = e
        .api
        .requests()
        .iter()
        .filter(|r| r.is_watch_of(Kind::EndpointSlice))
        .count();
    assert!(
        resumed > 6,
        "only {resumed} EndpointSlice watches were started"
    );
}

#[test]
fn relists_after_410_gone() {
    let test = "relists_after_410_gone";
    let Some(mut e) = env(test, &["pod-a", "pod-b", "pod-c"], &[]) else {
        return;
    };
    let web = e.http_service("web", [10, 96, 0, 10], &[("pod-a", true), ("pod-b", true)]);
    let gone = e.http_service("gone", [10, 96, 0, 11], &[("pod-c", true)]);
    e.publish(&web, 2);
    e.publish(&gone, 1);
    e.start_agent();
    e.wait_exact(&[web.clone(), gone.clone()], CONVERGE);
    e.wait_for_watches();
    let poller = e.poller(vec![keeps(&web, &["pod-a", "pod-b"])]);

    // Round 1: cut, change, compact — as one step, so the agent resumes from a forgotten
    // resourceVersion and must relist.
    let web2 = e.http_service(
        "web",
        [10, 96, 0, 10],
        &[("pod-a", true), ("pod-b", true), ("pod-c", true)],
    );
    let fresh = e.http_service("fresh", [10, 96, 0, 12], &[("pod-b", true)]);
    let mark = e.api.request_count();
    let gone_before = e.api.stats().gone_sent;
    let mut changes: Vec<Value> = k8s::slices(&web2, 2).iter().map(to_json).collect();
    changes.push(to_json(&k8s::service(&fresh)));
    changes.extend(k8s::slices(&fresh, 1).iter().map(to_json));
    e.api.atomically(|s| {
        s.cut_watches();
        for c in changes {
            s.apply(c).unwrap();
        }
        s.delete(Kind::Service, "default", "gone").unwrap();
        s.delete(Kind::EndpointSlice, "default", "gone-0").unwrap();
        s.expire_history();
    });
    e.wait_exact(&[web2.clone(), fresh.clone()], RECOVER);
    let stats = e.api.stats();
    assert!(
        stats.gone_sent > gone_before,
        "no watch got 410 Gone: {stats:?}\n{}",
        e.api_summary()
    );
    let relisted: Vec<String> = e
        .api
        .requests_since(mark)
        .iter()
        .filter(|r| r.is_list_of(Kind::EndpointSlice) || r.is_list_of(Kind::Service))
        .map(describe)
        .collect();
    assert!(
        !relisted.is_empty(),
        "no list after 410:\n{}",
        e.api_summary()
    );

    // Round 2: the same with the watches left open (the agent may be anywhere), and a change
    // that only a relist can reveal because history is gone before the agent sees it.
    poller.set_invariants(vec![
        keeps(&web2, &["pod-a", "pod-b", "pod-c"]),
        keeps(&fresh, &["pod-b"]),
    ]);
    let fresh2 = e.http_service(
        "fresh",
        [10, 96, 0, 12],
        &[("pod-b", true), ("pod-a", true)],
    );
    let slice = to_json(&k8s::slices(&fresh2, 1)[0]);
    e.api.atomically(|s| {
        s.apply(slice).unwrap();
        s.expire_history();
        s.cut_watches();
    });
    e.wait_exact(&[web2.clone(), fresh2.clone()], RECOVER);
    std::thread::sleep(Duration::from_millis(500));
    let report = poller.stop();
    say(&format!(
        "{test}: {} lists after the first compaction; {} dumps checked; {:?}",
        relisted.len(),
        report.samples,
        e.api.stats()
    ));
    report.assert_clean(test);
}

#[test]
fn survives_apiserver_restart() {
    let test = "survives_apiserver_restart";
    let Some(mut e) = env(test, &["pod-a", "pod-b", "pod-c"], &[]) else {
        return;
    };
    let web = e.http_service("web", [10, 96, 0, 10], &[("pod-a", true), ("pod-b", true)]);
    let other = e.http_service("other", [10, 96, 0, 11], &[("pod-c", true)]);
    e.publish(&web, 2);
    e.publish(&other, 1);
    e.start_agent();
    e.wait_exact(&[web.clone(), other.clone()], CONVERGE);
    e.wait_for_watches();
    let poller = e.poller(vec![keeps(&web, &["pod-a", "pod-b"])]);

    // Down for 3 s; changes meanwhile.
    e.api.stop_listening();
    let web2 = e.http_service(
        "web",
        [10, 96, 0, 10],
        &[("pod-a", true), ("pod-b", true), ("pod-c", true)],
    );
    let after = e.http_service("after", [10, 96, 0, 12], &[("pod-b", true)]);
    e.publish(&web2, 2);
    e.api.delete::<Service>("default", "other").unwrap();
    e.api.delete::<EndpointSlice>("default", "other-0").unwrap();
    e.publish(&after, 1);
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        e.h.agent_running(),
        "the agent died while the apiserver was down:\n{}",
        e.h.agent_log()
    );
    let during = e.h.dump().expect("dump while the apiserver is down");
    assert!(
        exactly(&during, &[web.clone(), other.clone()]),
        "the programmed state changed while the apiserver was down: {during:#?}"
    );
    let mark = e.api.request_count();
    e.api.resume_listening().expect("listening again");
    let took = e.wait_exact(&[web2.clone(), after.clone()], RECOVER);
    say(&format!(
        "{test}: converged {} ms after the apiserver came back ({} requests since)",
        took.as_millis(),
        e.api.request_count() - mark
    ));

    // A short restart with a change in between.
    let after2 = e.http_service(
        "after",
        [10, 96, 0, 12],
        &[("pod-b", true), ("pod-c", true)],
    );
    e.api.stop_listening();
    e.publish(&after2, 1);
    std::thread::sleep(Duration::from_millis(300));
    e.api.resume_listening().expect("listening again");
    e.wait_exact(&[web2.clone(), after2.clone()], RECOVER);
    let report = poller.stop();
    report.assert_clean(test);
    assert!(e.h.agent_running(), "the agent died:\n{}", e.h.agent_log());
}

#[test]
fn bookmarks_are_requested() {
    let test = "bookmarks_are_requested";
    let Some(mut e) = env(test, &["pod-a"], &[]) else {
        return;
    };
    let web = e.http_service("web", [10, 96, 0, 10], &[("pod-a", true)]);
    e.publish(&web, 1);
    e.start_agent();
    e.wait_exact(std::slice::from_ref(&web), CONVERGE);
    e.wait_for_watches();

    let requests = e.api.requests();
    let kube_proxy = LabelSelector::parse(KUBE_PROXY_SELECTOR)
        .unwrap()
        .canonical();
    for kind in [Kind::Service, Kind::EndpointSlice] {
        let lists: Vec<&RequestRecord> = requests.iter().filter(|r| r.is_list_of(kind)).collect();
        let watches: Vec<&RequestRecord> =
            requests.iter().filter(|r| r.is_watch_of(kind)).collect();
        assert!(
            !lists.is_empty(),
            "no list of {kind:?}:\n{}",
            e.api_summary()
        );
        assert!(
            !watches.is_empty(),
            "no watch of {kind:?}:\n{}",
            e.api_summary()
        );
        for r in lists.iter().chain(&watches) {
            assert_eq!(
                r.label_selector().canonical(),
                kube_proxy,
                "{kind:?} request without kube-proxy's label selector: {}",
                describe(r)
            );
            assert_eq!(r.status, 200, "{}", describe(r));
        }
        for r in &lists {
            let limit: usize = r.param("limit").and_then(|l| l.parse().ok()).unwrap_or(0);
            assert!(limit > 0, "unpaginated list: {}", describe(r));
        }
        for r in &watches {
            assert_eq!(
                r.param("allowWatchBookmarks"),
                Some("true"),
                "{}",
                describe(r)
            );
            let rv = r.param("resourceVersion").unwrap_or("");
            assert!(
                !rv.is_empty() && rv != "0",
                "watch not resumed from a list: {}",
                describe(r)
            );
            assert!(r.param("timeoutSeconds").is_some(), "{}", describe(r));
        }
    }
    let node_requests: Vec<&RequestRecord> = requests
        .iter()
        .filter(|r| r.path.starts_with("/api/v1/nodes"))
        .collect();
    assert!(
        node_requests.iter().any(|r| r.is_watch_of(Kind::Node)
            && r.param("fieldSelector") == Some(&*format!("metadata.name={NODE}"))),
        "no watch of Node {NODE} by name: {:#?}",
        node_requests
            .iter()
            .map(|r| describe(r))
            .collect::<Vec<_>>()
    );
    for r in &node_requests {
        let by_name = r.path == format!("/api/v1/nodes/{NODE}")
            || r.param("fieldSelector") == Some(&*format!("metadata.name={NODE}"));
        assert!(by_name, "the agent asked for other nodes: {}", describe(r));
    }

    // Bookmarks are honoured: after one arrives, a resumed watch starts from the newest
    // resourceVersion even though no Service or EndpointSlice changed. (An unrelated Node
    // moves the global resourceVersion forward.)
    e.api.create(&k8s::node("another-node")).unwrap();
    let rv = e.api.resource_version();
    let before = e.api.stats().bookmarks_sent;
    std::thread::sleep(Duration::from_millis(2500));
    let sent = e.api.stats().bookmarks_sent - before;
    assert!(
        sent >= 3,
        "only {sent} bookmarks reached the agent's 3 watches in 2.5 s"
    );
    let mark = e.api.request_count();
    e.api.cut_watches();
    for kind in [Kind::Service, Kind::EndpointSlice] {
        let resumed = e
            .api
            .wait_for_request(mark, RECOVER, |r| r.is_watch_of(kind))
            .unwrap_or_else(|err| panic!("{kind:?} watch not resumed: {err:#}"));
        assert_eq!(
            resumed.param("resourceVersion"),
            Some(&*rv.to_string()),
            "the {kind:?} watch did not resume from the bookmark's resourceVersion: {}",
            describe(&resumed)
        );
    }
    let relists = e
        .api
        .requests_since(mark)
        .iter()
        .filter(|r| r.is_list_of(Kind::Service) || r.is_list_of(Kind::EndpointSlice))
        .count();
    assert_eq!(
        relists,
        0,
        "a cut watch should resume, not relist:\n{}",
        e.api_summary()
    );
    e.wait_exact(std::slice::from_ref(&web), CONVERGE);
}

#[test]
fn restart_without_disruption() {
    let test = "restart_without_disruption";
    let Some(mut e) = env(test, &["pod-a", "pod-b", "pod-c"], &[]) else {
        return;
    };
    let all = [("pod-a", true), ("pod-b", true), ("pod-c", true)];
    let web = e.http_service("web", [10, 96, 0, 10], &all);
    e.publish(&web, 3);
    e.start_agent();
    e.wait_exact(std::slice::from_ref(&web), CONVERGE);
    e.h.wait_for_healthz(200, CONVERGE)
        .expect("healthz before the restart");
    let before = e.h.dump().expect("dump before the restart");
    let poller = e.poller(vec![keeps(&web, &["pod-a", "pod-b", "pod-c"])]);

    // About 4 s of requests, 5 ms apart; the kill and restart happen in the middle.
    let args = [
        "http",
        "--addr",
        "10.96.0.10:80",
        "--count",
        "800",
        "--interval-ms",
        "5",
    ];
    let mut client = e.h.spawn_client(&args).expect("starting the client");
    std::thread::sleep(Duration::from_millis(300));
    let status = e.h.kill_agent().expect("kill -9 the agent");
    say(&format!("{test}: agent killed: {status}"));
    std::thread::sleep(Duration::from_millis(200));
    let mark = e.api.request_count();
    let restarted = Instant::now();
    e.h.start_agent().expect("restarting the agent");
    for kind in [Kind::Service, Kind::EndpointSlice] {
        e.api
            .wait_for_request(mark, RECOVER, |r| r.is_watch_of(kind))
            .unwrap_or_else(|err| panic!("the new agent never watched {kind:?}: {err:#}"));
    }
    e.h.wait_for_healthz(200, RECOVER)
        .expect("healthz after the restart");
    say(&format!(
        "{test}: the new agent watched and was healthy {} ms after its start",
        restarted.elapsed().as_millis()
    ));
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        client.is_running(),
        "the client finished before the agent was back; the test proved nothing"
    );
    let r = Harness::client_report(client, CLIENT_WAIT).expect("client report");
    assert_all_ok(&r, 800);
    let report = poller.stop();
    report.assert_clean(test);
    let after = e.h.dump().expect("dump after the restart");
    assert_eq!(after, before, "the restart changed the programmed state");

    // The new agent follows changes.
    let web2 = e.http_service("web", [10, 96, 0, 10], &[("pod-a", true), ("pod-b", true)]);
    e.api.apply(&k8s::slice_with(&web2, "web-2", &[])).unwrap();
    e.wait_exact(std::slice::from_ref(&web2), CONVERGE);
}

/// A Service with every optional field a real cluster sets, two ports (TCP and UDP, the TCP
/// one with a named targetPort), and its EndpointSlice (one ready endpoint, one terminating).
fn rich_objects(e: &Env) -> (Value, Value, Vec<ServiceSpec>) {
    let a = e.pod_ip("pod-a").to_string();
    let b = e.pod_ip("pod-b").to_string();
    let service = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {
            "name": "rich", "namespace": "default",
            "labels": {"app.kubernetes.io/name": "rich", "app.kubernetes.io/part-of": "shop"},
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{\"x\":1}",
                            "prometheus.io/scrape": "true"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": "rich",
                                 "uid": "11111111-2222-3333-4444-555555555555",
                                 "controller": true, "blockOwnerDeletion": true}],
            "finalizers": ["service.kubernetes.io/load-balancer-cleanup"],
            "managedFields": [{"manager": "kubectl", "operation": "Update", "apiVersion": "v1",
                               "time": "2025-01-01T00:00:00Z", "fieldsType": "FieldsV1",
                               "fieldsV1": {"f:spec": {}}}]
        },
        "spec": {
            "type": "ClusterIP",
            "clusterIP": "10.96.0.30", "clusterIPs": ["10.96.0.30"],
            "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
            "ports": [
                {"name": "http", "port": 80, "protocol": "TCP", "targetPort": "web",
                 "appProtocol": "http"},
                {"name": "dns-udp", "port": 53, "protocol": "UDP", "targetPort": UDP_PORT}
            ],
            "selector": {"app.kubernetes.io/name": "rich"},
            "sessionAffinity": "None",
            "internalTrafficPolicy": "Cluster",
            "publishNotReadyAddresses": false,
            "trafficDistribution": "PreferClose"
        },
        "status": {"loadBalancer": {}, "conditions": []}
    });
    let slice = json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {
            "name": "rich-x7k2p", "namespace": "default", "generateName": "rich-",
            "labels": {"kubernetes.io/service-name": "rich",
                       "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                       "app.kubernetes.io/name": "rich"},
            "annotations": {k8s::TRIGGER_TIME_ANNOTATION: k8s::rfc3339_now()},
            "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": "rich",
                                 "uid": "66666666-7777-8888-9999-000000000000",
                                 "controller": true, "blockOwnerDeletion": true}]
        },
        "addressType": "IPv4",
        "endpoints": [
            {"addresses": [a], "conditions": {"ready": true, "serving": true, "terminating": false},
             "hostname": "rich-0", "nodeName": NODE, "zone": "zone-a",
             "hints": {"forZones": [{"name": "zone-a"}]},
             "deprecatedTopology": {"kubernetes.io/hostname": NODE},
             "targetRef": {"kind": "Pod", "namespace": "default", "name": "rich-0",
                           "uid": "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"}},
            {"addresses": [b], "conditions": {"ready": false, "serving": true, "terminating": true},
             "nodeName": NODE, "zone": "zone-a",
             "targetRef": {"kind": "Pod", "namespace": "default", "name": "rich-1"}}
        ],
        "ports": [
            {"name": "http", "port": HTTP_PORT, "protocol": "TCP", "appProtocol": "http"},
            {"name": "dns-udp", "port": UDP_PORT, "protocol": "UDP"}
        ]
    });
    let http = e.with_endpoints(
        ServiceSpec::new(
            "rich",
            [10, 96, 0, 30].into(),
            80,
            "http",
            Protocol::Tcp,
            HTTP_PORT,
        ),
        &[("pod-a", true)],
    );
    let udp = e.with_endpoints(
        ServiceSpec::new(
            "rich",
            [10, 96, 0, 30].into(),
            53,
            "dns-udp",
            Protocol::Udp,
            UDP_PORT,
        ),
        &[("pod-a", true)],
    );
    (service, slice, vec![http, udp])
}

/// `spec`'s Service as JSON with `edit` applied to its first port (or the spec).
fn service_json(spec: &ServiceSpec, edit: impl FnOnce(&mut Value)) -> Value {
    let mut v = to_json(&k8s::service(spec));
    edit(&mut v);
    v
}

#[test]
fn bad_input_is_logged_counted_and_never_fatal() {
    let test = "bad_input_is_logged_counted_and_never_fatal";
    let Some(mut e) = env(test, &["pod-a", "pod-b"], &[]) else {
        return;
    };
    let (rich_service, rich_slice, rich_specs) = rich_objects(&e);
    e.api.apply_json(rich_service).unwrap();
    e.api.apply_json(rich_slice).unwrap();
    let web = e.http_service("web", [10, 96, 0, 10], &[("pod-a", true), ("pod-b", true)]);
    e.publish(&web, 1);

    // Invalid Services (each with a valid slice).
    let bad_ip = e.http_service("bad-ip", [10, 96, 0, 41], &[("pod-a", true)]);
    e.api
        .apply_json(service_json(&bad_ip, |v| {
            v["spec"]["clusterIP"] = json!("10.96.0.300");
            v["spec"]["clusterIPs"] = json!(["10.96.0.300"]);
        }))
        .unwrap();
    e.api.apply(&k8s::slice(&bad_ip)).unwrap();
    let bad_port = e.http_service("bad-port", [10, 96, 0, 42], &[("pod-a", true)]);
    e.api
        .apply_json(service_json(&bad_port, |v| {
            v["spec"]["ports"][0]["port"] = json!(70000)
        }))
        .unwrap();
    e.api.apply(&k8s::slice(&bad_port)).unwrap();
    let bad_proto = e.http_service("bad-proto", [10, 96, 0, 43], &[("pod-a", true)]);
    e.api
        .apply_json(service_json(&bad_proto, |v| {
            v["spec"]["ports"][0]["protocol"] = json!("TPC")
        }))
        .unwrap();
    e.api.apply(&k8s::slice(&bad_proto)).unwrap();

    // Invalid slices: no service-name label; a bad address (next to a good slice).
    let mut no_label = k8s::slice_with(&web, "no-label-slice", &web.endpoints);
    no_label.metadata.labels = None;
    e.api.apply(&no_label).unwrap();
    let badaddr = e.http_service("badaddr", [10, 96, 0, 44], &[("pod-a", true)]);
    e.api.apply(&k8s::service(&badaddr)).unwrap();
    e.api
        .apply(&k8s::slice_with(
            &badaddr,
            "badaddr-good",
            &badaddr.endpoints,
        ))
        .unwrap();
    let mut bad_slice = to_json(&k8s::slice_with(
        &badaddr,
        "badaddr-bad",
        &badaddr.endpoints,
    ));
    bad_slice["endpoints"][0]["addresses"] = json!(["10.244.1.999"]);
    e.api.apply_json(bad_slice).unwrap();

    // A slice whose Service comes later.
    let late = e.http_service("late", [10, 96, 0, 45], &[("pod-b", true)]);
    e.api.apply(&k8s::slice(&late)).unwrap();

    e.start_agent();
    let mut good: Vec<ServiceSpec> = rich_specs.clone();
    good.push(web.clone());
    good.push(badaddr.clone());
    e.wait_exact(&good, CONVERGE);
    e.h.wait_for_healthz(200, CONVERGE)
        .expect("healthz with invalid objects around");

    let r = e.http("10.96.0.10:80", 20);
    assert_all_ok(&r, 20);
    let r = e.http("10.96.0.30:80", 10);
    assert_all_ok(&r, 10);
    assert_eq!(
        r.backend("pod-a"),
        10,
        "the terminating pod-b got traffic: {:?}",
        r.by_backend
    );

    // The late Service appears: its waiting slice is served.
    e.api.apply(&k8s::service(&late)).unwrap();
    good.push(late.clone());
    e.wait_exact(&good, CONVERGE);

    // A fixed object is served after all.
    let fixed_ip = ServiceSpec {
        cluster_ip: [10, 96, 0, 46].into(),
        ..bad_ip.clone()
    };
    e.api.apply(&k8s::service(&fixed_ip)).unwrap();
    good.push(fixed_ip);
    e.wait_exact(&good, CONVERGE);
    assert!(e.h.agent_running(), "the agent died:\n{}", e.h.agent_log());

    let metrics = e.h.metrics().expect("scraping /metrics");
    let invalid: Vec<String> = metrics
        .matching("kproxy_invalid_objects_total", &[])
        .map(|s| format!("{:?} {}", s.labels, s.value))
        .collect();
    say(&format!(
        "{test}: kproxy_invalid_objects_total: {invalid:?}"
    ));
    let total = metrics.sum("kproxy_invalid_objects_total");
    assert!(
        total >= 5.0,
        "5 invalid objects, counted {total}: {invalid:?}"
    );

    let log = e.h.agent_log_full();
    let cases: [(&str, &[&str]); 5] = [
        ("bad-ip", &["clusterip"]),
        ("bad-port", &["port"]),
        ("bad-proto", &["protocol"]),
        (
            "no-label-slice",
            &["kubernetes.io/service-name", "service-name", "label"],
        ),
        ("badaddr-bad", &["address"]),
    ];
    for (object, fields) in cases {
        let named = log.lines().any(|line| {
            let lower = line.to_lowercase();
            line.contains(object) && fields.iter().any(|f| lower.contains(f))
        });
        assert!(
            named,
            "no log line names {object} and its field ({fields:?}); log:\n{}",
            e.h.agent_log()
        );
    }
}

#[test]
fn healthz_and_metrics() {
    let test = "healthz_and_metrics";
    let Some(mut e) = env(test, &["pod-a", "pod-b"], &[]) else {
        return;
    };
    let web = e.http_service("web", [10, 96, 0, 10], &[("pod-a", true)]);
    e.api.apply(&k8s::service(&web)).unwrap();
    e.api.apply(&k8s::triggered_now(k8s::slice(&web))).unwrap();
    e.start_agent();
    e.wait_exact(std::slice::from_ref(&web), CONVERGE);
    let healthz = e.h.wait_for_healthz(200, CONVERGE).expect("healthz");
    let body = healthz.json().expect("healthz JSON");
    for field in ["lastUpdated", "currentTime"] {
        assert!(
            body[field].as_str().is_some_and(|s| !s.is_empty()),
            "/healthz has no {field}: {body}"
        );
    }
    assert_eq!(body["nodeEligible"], json!(true), "{body}");
    let livez = e.h.get_healthz("/livez").expect("livez");
    assert_eq!(livez.status, 200, "{}", livez.text());
    assert!(livez.json().expect("livez JSON")["currentTime"].is_string());

    let m = e.h.metrics().expect("metrics");
    for name in [
        "kubeproxy_sync_proxy_rules_duration_seconds",
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        "kubeproxy_network_programming_duration_seconds",
        "kubeproxy_sync_proxy_rules_endpoint_changes_total",
        "kubeproxy_sync_proxy_rules_service_changes_total",
        "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
        "kubeproxy_sync_proxy_rules_service_changes_pending",
        "kubeproxy_proxy_healthz_total",
        "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
        "kproxy_bpf_map_entries",
        "kproxy_bpf_map_capacity",
        "kproxy_sync_failures_total",
    ] {
        // (kproxy_invalid_objects_total is labelled by kind and reason and, as a labelled
        // family in client_golang, absent until something is invalid: see the bad input test.)
        assert!(m.has(name), "/metrics lacks {name}; it has {:?}", m.types);
    }
    // No Service here has a Local policy: both counts are there, at zero.
    for policy in ["internal", "external"] {
        assert_eq!(
            m.get("kubeproxy_sync_proxy_rules_no_local_endpoints_total", &[("traffic_policy", policy)]),
            Some(0.0),
            "{policy}"
        );
    }
    assert_eq!(
        m.types
            .get("kubeproxy_sync_proxy_rules_duration_seconds")
            .map(String::as_str),
        Some("histogram")
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let last = m
        .get("kubeproxy_sync_proxy_rules_last_timestamp_seconds", &[])
        .expect("last sync timestamp");
    assert!(
        (now - 120.0..=now + 5.0).contains(&last),
        "last sync at {last}, now is {now}"
    );
    assert!(
        m.get("kubeproxy_sync_proxy_rules_duration_seconds_count", &[])
            .unwrap_or(0.0)
            >= 1.0
    );
    assert!(
        m.get("kubeproxy_proxy_healthz_total", &[("code", "200")])
            .unwrap_or(0.0)
            >= 1.0
    );
    assert_eq!(m.get("kproxy_sync_failures_total", &[]).unwrap_or(0.0), 0.0);
    let entries_of =
        |m: &kproxy_e2e::prometheus::Metrics| m.get("kproxy_bpf_map_entries", &[("map", "KP_SERVICES")]);
    // KP_SERVICES: one frontend entry plus one slot per backend, per service port.
    let slots = |d: &Dump| {
        d.services
            .iter()
            .map(|s| 1 + s.backends.len())
            .sum::<usize>() as f64
    };
    let dump = e.h.dump().unwrap();
    assert_eq!(
        entries_of(&m),
        Some(slots(&dump)),
        "KP_SERVICES entries vs {dump:#?}"
    );
    let capacity = m
        .get("kproxy_bpf_map_capacity", &[("map", "KP_SERVICES")])
        .unwrap_or(0.0);
    assert!(capacity >= slots(&dump), "KP_SERVICES capacity {capacity}");

    // An endpoint change (with the controller's trigger time) counts and is measured.
    let endpoint_changes = |m: &kproxy_e2e::prometheus::Metrics| {
        m.get("kubeproxy_sync_proxy_rules_endpoint_changes_total", &[])
            .unwrap_or(0.0)
    };
    let service_changes = |m: &kproxy_e2e::prometheus::Metrics| {
        m.get("kubeproxy_sync_proxy_rules_service_changes_total", &[])
            .unwrap_or(0.0)
    };
    let programming = |m: &kproxy_e2e::prometheus::Metrics| {
        m.get("kubeproxy_network_programming_duration_seconds_count", &[])
            .unwrap_or(0.0)
    };
    let web2 = e.http_service("web", [10, 96, 0, 10], &[("pod-a", true), ("pod-b", true)]);
    e.api.apply(&k8s::triggered_now(k8s::slice(&web2))).unwrap();
    e.wait_exact(std::slice::from_ref(&web2), CONVERGE);
    let m2 = wait_for_metrics(&e, "the endpoint change", |m2| {
        endpoint_changes(m2) > endpoint_changes(&m) && programming(m2) > programming(&m)
    });
    assert_eq!(entries_of(&m2), Some(slots(&e.h.dump().unwrap())));

    // A service change counts too.
    let web3 = ServiceSpec {
        port: 81,
        ..web2.clone()
    };
    e.api.apply(&k8s::service(&web3)).unwrap();
    e.wait_exact(std::slice::from_ref(&web3), CONVERGE);
    let m3 = wait_for_metrics(&e, "the service change", |m3| {
        service_changes(m3) > service_changes(&m2)
            && m3.get("kubeproxy_sync_proxy_rules_service_changes_pending", &[]) == Some(0.0)
            && m3.get("kubeproxy_sync_proxy_rules_endpoint_changes_pending", &[]) == Some(0.0)
    });
    say(&format!(
        "{test}: endpoint changes {} -> {}, service changes {} -> {}, \
         network programming observations {} -> {}",
        endpoint_changes(&m),
        endpoint_changes(&m3),
        service_changes(&m),
        service_changes(&m3),
        programming(&m),
        programming(&m3)
    ));

    // The node gets the autoscaler's taint: /healthz 503 (not eligible), /livez still 200.
    e.api
        .update(&k8s::tainted_to_be_deleted(k8s::node(NODE)))
        .unwrap();
    let unhealthy =
        e.h.wait_for_healthz(503, CONVERGE)
            .expect("healthz 503 with the taint");
    assert_eq!(
        unhealthy.json().unwrap()["nodeEligible"],
        json!(false),
        "{}",
        unhealthy.text()
    );
    let livez = e.h.get_healthz("/livez").expect("livez");
    assert_eq!(
        livez.status,
        200,
        "/livez must ignore node eligibility: {}",
        livez.text()
    );
    // Untainted: healthy again. Being deleted: 503 again.
    e.api.update(&k8s::node(NODE)).unwrap();
    e.h.wait_for_healthz(200, CONVERGE)
        .expect("healthz 200 without the taint");
    e.api.mark_deleting::<Node>("", NODE).unwrap();
    let deleting =
        e.h.wait_for_healthz(503, CONVERGE)
            .expect("healthz 503 while deleting");
    assert_eq!(deleting.json().unwrap()["nodeEligible"], json!(false));
    assert_eq!(e.h.get_healthz("/livez").unwrap().status, 200);
    let m4 = e.h.metrics().unwrap();
    assert!(
        m4.get("kubeproxy_proxy_healthz_total", &[("code", "503")])
            .unwrap_or(0.0)
            >= 2.0,
        "503 answers not counted: {:?}",
        m4.matching("kubeproxy_proxy_healthz_total", &[])
            .collect::<Vec<_>>()
    );
    // The datapath is unaffected by eligibility.
    e.wait_exact(std::slice::from_ref(&web3), CONVERGE);
}

/// Scrapes `/metrics` until `done` holds (bounded).
fn wait_for_metrics(
    e: &Env,
    what: &str,
    done: impl Fn(&kproxy_e2e::prometheus::Metrics) -> bool,
) -> kproxy_e2e::prometheus::Metrics {
    let start = Instant::now();
    loop {
        let m = e.h.metrics().expect("scraping /metrics");
        if done(&m) {
            return m;
        }
        if start.elapsed() > CONVERGE {
            panic!(
                "the metrics never reflected {what}; last scrape:\n{:#?}",
                m.samples
                    .iter()
                    .filter(|s| s.name.starts_with("kubeproxy_sync_proxy_rules")
                        || s.name
                            .starts_with("kubeproxy_network_programming_duration_seconds_")
                            && !s.name.ends_with("_bucket"))
                    .collect::<Vec<_>>()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A Service that does not fit in the maps (`--max-services 3`, a fourth one) is refused: counted
/// by reason in `kproxy_frontends_refused` and `kproxy_frontend_refusals_total`, logged once however
/// many syncs refuse it again, and programmed as soon as a deleted Service makes room, by the
/// sync of that deletion. The periodic full sync, which would program it anyway, is set far
/// beyond the bound, so only that path can pass.
#[test]
fn a_service_that_does_not_fit_is_programmed_once_room_appears() {
    let test = "a_service_that_does_not_fit_is_programmed_once_room_appears";
    let args = ["--max-services", "3", "--sync-period", "10m"];
    let Some(mut e) = env(test, &["pod-a", "pod-b"], &args) else {
        return;
    };
    let fitting: Vec<ServiceSpec> = (1..=3)
        .map(|i| e.http_service(&format!("fits-{i}"), [10, 96, 0, 10 + i], &[("pod-a", true)]))
        .collect();
    let late = e.http_service("late", [10, 96, 0, 20], &[("pod-b", true)]);
    for spec in &fitting {
        e.publish(spec, 1);
    }
    e.start_agent();
    e.wait_exact(&fitting, CONVERGE);
    e.publish(&late, 1);
    let refused = |m: &kproxy_e2e::prometheus::Metrics, reason: &str| {
        m.get("kproxy_frontends_refused", &[("reason", reason)])
    };
    let refusals = |m: &kproxy_e2e::prometheus::Metrics, reason: &str| {
        m.get("kproxy_frontend_refusals_total", &[("reason", reason)])
    };
    wait_for_metrics(&e, "the refused Service", |m| {
        refused(m, "services_full") == Some(1.0) && refusals(m, "services_full") == Some(1.0)
    });
    // Other syncs while it stays refused: an endpoint change, twice.
    let mut changed = fitting.clone();
    for endpoints in [&[("pod-a", true), ("pod-b", true)][..], &[("pod-a", true)]] {
        changed[1] = e.http_service("fits-2", [10, 96, 0, 12], endpoints);
        e.publish(&changed[1], 1);
        e.wait_exact(&changed, CONVERGE);
    }
    let m = e.h.metrics().expect("metrics");
    for reason in ["services_full", "backends_full", "service_entries_full", "too_many_endpoints"] {
        let want = if reason == "services_full" { 1.0 } else { 0.0 };
        assert_eq!(refused(&m, reason), Some(want), "kproxy_frontends_refused{{reason={reason:?}}}");
    }
    assert_eq!(refusals(&m, "services_full"), Some(1.0), "counted once, not once per sync");
    let log = e.h.agent_log_full();
    let logged: Vec<&str> = log.lines().filter(|l| l.contains("does not fit") && l.contains("default/late")).collect();
    assert_eq!(logged.len(), 1, "logged once, not once per sync: {logged:#?}");
    assert!(logged[0].contains("services_full") && logged[0].contains("10.96.0.20:80"), "{}", logged[0]);

    // Room appears: fits-1 is deleted, once the runner's token bucket is full again (as after
    // any quiet second), so that the delay measured is the reaction to this deletion and not the
    // `--min-sync-period` pacing of the syncs just above.
    std::thread::sleep(Duration::from_secs(2));
    let deleted = Instant::now();
    e.api.delete::<Service>("default", "fits-1").unwrap();
    e.api.delete::<EndpointSlice>("default", "fits-1-0").unwrap();
    let expected = [changed[1].clone(), changed[2].clone(), late.clone()];
    e.wait_exact(&expected, CONVERGE);
    let took = deleted.elapsed();
    assert_all_ok(&e.http("10.96.0.20:80", 10), 10);
    let m = wait_for_metrics(&e, "no refused Service", |m| refused(m, "services_full") == Some(0.0));
    assert_eq!(refusals(&m, "services_full"), Some(1.0));
    assert!(
        e.h.agent_log_full().lines().any(|l| l.contains("it fits now") && l.contains("default/late")),
        "no log line saying it is programmed now"
    );
    say(&format!(
        "{test}: the refused Service was programmed {} ms after the deletion that made room \
         (full syncs every 10 minutes)",
        took.as_millis()
    ));
}

#[test]
fn measure_event_to_map_latency() {
    let test = "measure_event_to_map_latency";
    let Some(mut e) = env(test, &["pod-a", "pod-b"], &[]) else {
        return;
    };
    const SERVICES: usize = 1000;
    let (a, b) = (e.pod_ip("pod-a"), e.pod_ip("pod-b"));
    let specs: Vec<ServiceSpec> = (0..SERVICES)
        .map(|i| {
            let ip = Ipv4Addr::new(10, 97, (i / 250) as u8, (i % 250) as u8 + 1);
            let s = ServiceSpec::new(
                &format!("lat-{i}"),
                ip,
                80,
                "http",
                Protocol::Tcp,
                HTTP_PORT,
            )
            .endpoint("pod-a", a, true);
            if i % 2 == 0 {
                s.endpoint("pod-b", b, true)
            } else {
                s
            }
        })
        .collect();
    let created = Instant::now();
    for s in &specs {
        e.publish(s, 1);
    }
    let publish_ms = created.elapsed().as_millis();
    let started = Instant::now();
    e.start_agent();
    e.h.wait_for_dump(Duration::from_secs(120), |d| exactly(d, &specs))
        .unwrap_or_else(|err| panic!("the agent did not program {SERVICES} services: {err:#}"));
    let initial = started.elapsed();
    let dump_start = Instant::now();
    e.h.dump().unwrap();
    let one_dump = dump_start.elapsed();
    let m0 = e.h.metrics().expect("metrics");

    // Each change is isolated, as in a quiet cluster: it follows the previous sync by more
    // than --min-sync-period (1 s), so the runner applies it at once. Its latency is measured
    // to the agent's own record of the sync (kubeproxy_sync_proxy_rules_last_timestamp_seconds,
    // scraped every few ms); the dump then confirms the maps hold the change.
    let mut latencies = Vec::new();
    for k in 0..5usize {
        std::thread::sleep(Duration::from_millis(1500));
        let i = 17 + 193 * k;
        let mut changed = specs[i].clone();
        changed.endpoints[0].ip = Ipv4Addr::new(10, 244, 1, 100 + k as u8);
        let want = backends(&changed);
        let slice = k8s::triggered_now(k8s::slices(&changed, 1).remove(0));
        let last_sync = |e: &Env| {
            e.h.metrics()
                .ok()
                .and_then(|m| m.get("kubeproxy_sync_proxy_rules_last_timestamp_seconds", &[]))
                .unwrap_or(0.0)
        };
        let before = last_sync(&e);
        let applied = std::time::SystemTime::now();
        e.api.apply(&slice).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut synced = before;
        while synced <= before && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
            synced = last_sync(&e);
        }
        let applied_s = applied.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
        latencies.push(Duration::from_secs_f64((synced - applied_s).max(0.0)));
        let name = changed.name.clone();
        e.h.wait_for_dump(Duration::from_secs(5), |d| {
            d.service(&name).is_some_and(|s| s.backends == want)
        })
        .unwrap_or_else(|err| panic!("change {k} not programmed within 5 s: {err:#}"));
    }
    let m1 = e.h.metrics().expect("metrics");
    let npd = |m: &kproxy_e2e::prometheus::Metrics, suffix: &str| {
        m.get(
            &format!("kubeproxy_network_programming_duration_seconds_{suffix}"),
            &[],
        )
        .unwrap_or(0.0)
    };
    let sync = |m: &kproxy_e2e::prometheus::Metrics, suffix: &str| {
        m.get(
            &format!("kubeproxy_sync_proxy_rules_duration_seconds_{suffix}"),
            &[],
        )
        .unwrap_or(0.0)
    };
    let n = npd(&m1, "count") - npd(&m0, "count");
    let npd_mean = if n > 0.0 {
        (npd(&m1, "sum") - npd(&m0, "sum")) / n
    } else {
        f64::NAN
    };
    let syncs = sync(&m1, "count") - sync(&m0, "count");
    let sync_mean = if syncs > 0.0 {
        (sync(&m1, "sum") - sync(&m0, "sum")) / syncs
    } else {
        f64::NAN
    };
    let ms: Vec<String> = latencies.iter().map(|l| format!("{:.1}", l.as_secs_f64() * 1e3)).collect();
    say(&format!(
        "{test}: {SERVICES} services ({} backends) published in {publish_ms} ms, programmed \
         {} ms after the agent started; one `kproxy dump` takes {} ms (the resolution below)",
        specs.iter().map(|s| s.endpoints.len()).sum::<usize>(),
        initial.as_millis(),
        one_dump.as_millis()
    ));
    say(&format!(
        "{test}: one endpoint change -> synced to the maps: {ms:?} ms; \
         kubeproxy_network_programming_duration_seconds: {n} observations, mean {:.1} ms; \
         kubeproxy_sync_proxy_rules_duration_seconds: {syncs} syncs, mean {:.2} ms",
        npd_mean * 1000.0,
        sync_mean * 1000.0
    ));
    assert!(
        latencies.iter().all(|l| *l < Duration::from_secs(5)),
        "latencies {ms:?} ms"
    );
    assert!(
        n >= 1.0,
        "no network programming latency was observed for 5 triggered changes"
    );
}

#[test]
fn should_prefer_endpoints_hinted_for_the_nodes_zone() {
    // kube-proxy's topology-aware routing (`trafficDistribution: PreferClose`, the
    // EndpointSlice controller's `hints.forZones`), with the zone read from this node's
    // `topology.kubernetes.io/zone` label as it changes.
    let test = "should_prefer_endpoints_hinted_for_the_nodes_zone";
    let Some(mut e) = env(test, &["pod-a", "pod-b", "pod-c"], &[]) else {
        return;
    };
    let web = e.http_service("web", [10, 96, 0, 10], &[("pod-a", true), ("pod-b", true), ("pod-c", true)]);
    let mut service = to_json(&k8s::service(&web));
    service["spec"]["trafficDistribution"] = json!("PreferClose");
    e.api.apply_json(service).expect("applying the Service");
    let mut slice = to_json(&k8s::slice(&web));
    let zone_of = |ip: &str| if ip == e.pod_ip("pod-a").to_string() { "zone-a" } else { "zone-b" };
    for ep in slice["endpoints"].as_array_mut().expect("endpoints") {
        let ip = ep["addresses"][0].as_str().expect("address").to_string();
        ep["hints"] = json!({"forZones": [{"name": zone_of(&ip)}]});
    }
    e.api.apply_json(slice).expect("applying the EndpointSlice");
    e.start_agent();
    // The Node (k8s::node) is in zone-a: only pod-a, hinted for zone-a.
    let only = |d: &Dump, n: usize| d.service("web").is_some_and(|s| s.backends.len() == n);
    e.h.wait_for_dump(CONVERGE, |d| only(d, 1)).unwrap_or_else(|err| panic!("{err:#}\n{}", e.api_summary()));
    let report = e.http("10.96.0.10:80", 30);
    assert_eq!((report.ok, report.backend("pod-a")), (30, 30), "{report:?}");
    // The node moves to zone-b: pod-b and pod-c.
    let mut node = k8s::node(NODE);
    node.metadata.labels.as_mut().expect("labels").insert("topology.kubernetes.io/zone".into(), "zone-b".into());
    e.api.apply(&node).expect("relabelling the Node");
    e.h.wait_for_dump(CONVERGE, |d| only(d, 2)).unwrap_or_else(|err| panic!("{err:#}\n{}", e.api_summary()));
    let report = e.http("10.96.0.10:80", 40);
    assert_eq!(report.ok, 40, "{report:?}");
    assert_eq!(report.backend("pod-a"), 0, "{report:?}");
    assert!(report.backend("pod-b") > 0 && report.backend("pod-c") > 0, "{report:?}");
    say(&format!("{test}: zone-a → 30/30 to pod-a; zone-b → {} pod-b, {} pod-c", report.backend("pod-b"), report.backend("pod-c")));
}

/// A field of `/proc/PID/status` (e.g. `VmRSS`), in kB.
fn proc_status_kb(pid: i32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("reading the agent's status");
    let line = status.lines().find(|l| l.starts_with(&format!("{field}:"))).unwrap_or_else(|| panic!("no {field} in {status}"));
    line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("a number of kB")
}

/// Every panel of kubernetes-mixin's "Kubernetes / Proxy" dashboard (`dashboards/proxy.libsonnet`)
/// and its KubeClientErrors alert have data: the rest client metrics count and time the agent's
/// real requests to the (fake) apiserver, and the process metrics describe the agent process
/// as /proc does. `go_goroutines` has no Rust meaning and is not served.
#[test]
fn kube_proxy_dashboard_and_alert_metrics_are_served() {
    let test = "kube_proxy_dashboard_and_alert_metrics_are_served";
    let Some(mut e) = env(test, &["pod-a"], &[]) else {
        return;
    };
    let web = e.http_service("web", [10, 96, 0, 10], &[("pod-a", true)]);
    e.publish(&web, 1);
    e.start_agent();
    e.wait_exact(std::slice::from_ref(&web), CONVERGE);
    e.wait_for_watches();
    let pid = e.h.agent_pid().expect("the agent runs");
    let m = e.h.metrics().expect("metrics");

    // The mixin's queries, by the metric each reads.
    for name in [
        "kubeproxy_sync_proxy_rules_duration_seconds",
        "kubeproxy_network_programming_duration_seconds",
        "rest_client_requests_total",
        "rest_client_request_duration_seconds",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
    ] {
        assert!(m.has(name), "/metrics lacks {name}; it has {:?}", m.types);
    }
    assert!(!m.has("go_goroutines"), "nothing is faked");
    assert_eq!(m.types.get("rest_client_request_duration_seconds").map(String::as_str), Some("histogram"));
    // OpenMetrics names a counter's family without its `_total` suffix.
    assert_eq!(m.types.get("process_cpu_seconds").map(String::as_str), Some("counter"));

    // Requests as the apiserver saw them: lists and watches of three kinds are GETs answered
    // 200, and the Starting event is a POST. The server recorded every request the agent
    // counted (the agent counts a request when its response headers arrive).
    let gets_ok = m.get("rest_client_requests_total", &[("code", "200"), ("method", "GET")]).unwrap_or(0.0);
    let served = e.api.requests().len() as f64;
    assert!(gets_ok >= 6.0, "3 lists and 3 watches at least, counted {gets_ok}: {:?}", m.matching("rest_client_requests_total", &[]).collect::<Vec<_>>());
    assert!(gets_ok <= served, "the agent counted {gets_ok} GETs answered 200, the server saw {served} requests");
    let api_addr = e.api.addr().to_string();
    let hosts: BTreeSet<&str> = m.matching("rest_client_requests_total", &[]).filter_map(|s| s.labels.get("host").map(String::as_str)).collect();
    assert_eq!(hosts, BTreeSet::from([api_addr.as_str()]), "host is the apiserver's host:port");
    let posts = m.matching("rest_client_requests_total", &[("method", "POST")]).map(|s| s.value).sum::<f64>();
    assert!(posts >= 1.0, "the Starting event's POST is counted");
    for verb in ["GET", "POST"] {
        let count = m.get("rest_client_request_duration_seconds_count", &[("verb", verb), ("host", &api_addr)]).unwrap_or(0.0);
        assert!(count >= 1.0, "{verb} requests are timed (the dashboard's {verb} latency panel)");
    }

    // The process metrics are the agent's own, as /proc tells it now.
    let rss = m.get("process_resident_memory_bytes", &[]).expect("RSS");
    let rss_now = proc_status_kb(pid, "VmRSS") * 1024.0;
    assert!((rss / rss_now - 1.0).abs() < 0.5, "process_resident_memory_bytes {rss} vs VmRSS {rss_now}");
    let vm = m.get("process_virtual_memory_bytes", &[]).expect("virtual memory");
    assert!((vm / (proc_status_kb(pid, "VmSize") * 1024.0) - 1.0).abs() < 0.5, "process_virtual_memory_bytes {vm}");
    let open = m.get("process_open_fds", &[]).expect("open fds");
    let open_now = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count() as f64;
    assert!((open - open_now).abs() <= 10.0, "process_open_fds {open} vs {open_now} in /proc/{pid}/fd");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let soft_nofile: f64 = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .expect("Max open files in /proc/PID/limits");
    assert_eq!(m.get("process_max_fds", &[]), Some(soft_nofile));
    let cpu = m.get("process_cpu_seconds_total", &[]).expect("cpu");
    assert!(cpu > 0.0 && cpu < 600.0, "process_cpu_seconds_total {cpu}");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let started = m.get("process_start_time_seconds", &[]).expect("start time");
    assert!(started <= now + 2.0 && started > now - 600.0, "process_start_time_seconds {started}, now {now}");
    say(&format!(
        "{test}: {gets_ok} GETs answered 200 of {served} requests served, {posts} POSTs; RSS {:.1} MiB (VmRSS {:.1} MiB), {open} fds of {soft_nofile}, {cpu:.2} s CPU",
        rss / 1048576.0,
        rss_now / 1048576.0
    ));
}

/// kproxy's own Grafana dashboard (`deploy/grafana/kproxy-dashboard.json`): every series its
/// panels and variables query is one a live agent serves, so no panel is empty for a name that
/// does not exist. The agent runs with a Service programmed and its watches open.
#[test]
fn grafana_dashboard_queries_only_metrics_a_live_agent_serves() {
    let test = "grafana_dashboard_queries_only_metrics_a_live_agent_serves";
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/grafana/kproxy-dashboard.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(path).expect("reading the dashboard"))
        .unwrap_or_else(|e| panic!("{path} is not JSON: {e}"));
    // Every query, named by where it sits.
    let mut queries: Vec<(String, BTreeSet<String>)> = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("a target's expr");
            queries.push((format!("panel {:?} target {}", panel["title"], target["refId"]), promql::metric_names(expr)));
        }
    }
    for var in dashboard["templating"]["list"].as_array().expect("templating") {
        if let Some(query) = var["query"]["query"].as_str() {
            queries.push((format!("variable {}", var["name"]), promql::templating_metric_names(query)));
        }
    }
    let panels_with_queries = dashboard["panels"].as_array().unwrap().iter().filter(|p| p["targets"].is_array()).count();
    assert!(panels_with_queries >= 15 && queries.iter().all(|(_, names)| !names.is_empty()), "every query names a metric: {queries:?}");

    let Some(mut e) = env(test, &["pod-a"], &[]) else {
        return;
    };
    let web = e.http_service("web", [10, 96, 0, 10], &[("pod-a", true)]);
    e.publish(&web, 1);
    // What a real node has seen by the time anyone opens the dashboard: an invalid object
    // (the invalid-objects panel) and the kubelet's probes (the health panel).
    let bad_proto = e.http_service("bad-proto", [10, 96, 0, 43], &[("pod-a", true)]);
    e.api.apply_json(service_json(&bad_proto, |v| v["spec"]["ports"][0]["protocol"] = json!("TPC"))).unwrap();
    e.start_agent();
    e.wait_exact(std::slice::from_ref(&web), CONVERGE);
    e.wait_for_watches();
    e.h.wait_for_healthz(200, CONVERGE).expect("healthz");
    e.h.get_healthz("/livez").expect("livez");
    let m = e.h.metrics().expect("metrics");
    let missing: Vec<String> = queries
        .iter()
        .flat_map(|(place, names)| names.iter().filter(|n| !m.serves(n)).map(move |n| format!("{place}: {n}")))
        .collect();
    assert!(missing.is_empty(), "the dashboard queries series the agent does not serve:\n{}\nserved families: {:?}", missing.join("\n"), m.types.keys().collect::<Vec<_>>());
    let names: BTreeSet<&String> = queries.iter().flat_map(|(_, n)| n).collect();
    say(&format!("{test}: {} queries in {panels_with_queries} panels name {} series, all served", queries.len(), names.len()));
}

/// `--config` with kubeadm's KubeProxyConfiguration: the fields the command line does not give
/// are taken from the file (the mode's sync period, `oomScoreAdj`), flags win over the file
/// (kubeconfig, hostname, metrics address all point elsewhere in the file), and the file's set
/// fields without a kproxy meaning are listed once in a warning.
#[test]
fn kube_proxy_configuration_file_is_honoured_and_flags_win() {
    let test = "kube_proxy_configuration_file_is_honoured_and_flags_win";
    let Some(e) = env(test, &["pod-a"], &[]) else {
        return;
    };
    let kubeadm = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/examples/kubeadm-kube-proxy-config.conf"))
        .expect("kubeadm's default file");
    let edited = kubeadm
        .replace("kubeconfig: /var/lib/kube-proxy/kubeconfig.conf", "kubeconfig: /nonexistent/kubeconfig.conf")
        .replace("hostnameOverride: \"\"", "hostnameOverride: some-other-node")
        .replace("metricsBindAddress: \"\"", "metricsBindAddress: 127.0.0.1:10299")
        .replace("  syncPeriod: 0s\nipvs:", "  syncPeriod: 2s\nipvs:")
        // A positive value: lowering it needs CAP_SYS_RESOURCE, which a test machine may lack.
        .replace("oomScoreAdj: null", "oomScoreAdj: 500");
    assert_ne!(edited, kubeadm);
    assert!(edited.contains("  syncPeriod: 2s\nipvs:"), "the iptables section is edited");
    let config = e.h.workdir().join("kube-proxy-config.conf");
    std::fs::write(&config, &edited).unwrap();
    let Env { h, api } = e;
    let mut e = Env { h: h.with_agent_args(&["--config", config.to_str().unwrap()]), api };
    let web = e.http_service("web", [10, 96, 0, 10], &[("pod-a", true)]);
    e.publish(&web, 1);
    e.start_agent();
    // The flags' kubeconfig and node name are used: the agent follows the apiserver and its Node.
    e.wait_exact(std::slice::from_ref(&web), CONVERGE);
    e.h.wait_for_healthz(200, CONVERGE).expect("healthz on the flag's address");
    e.h.metrics().expect("/metrics on the flag's address, not the file's");
    let pid = e.h.agent_pid().expect("the agent runs");
    let oom = std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj")).unwrap();
    assert_eq!(oom.trim(), "500", "oomScoreAdj from the file");
    // iptables.syncPeriod 2s from the file: full syncs every 2 s (the default is 30 s).
    std::thread::sleep(Duration::from_secs(7));
    let log = e.h.agent_log_full();
    let full_syncs = log.lines().filter(|l| l.contains("synced") && l.contains("full=true")).count();
    assert!(full_syncs >= 3, "{full_syncs} full syncs in ~7 s with syncPeriod 2s:\n{log}");
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains("fields without a kproxy meaning")).collect();
    assert_eq!(warnings.len(), 1, "one warning:\n{log}");
    assert!(warnings[0].contains("clusterCIDR=\"10.244.0.0/16\""), "{}", warnings[0]);
    assert!(!log.contains("some-other-node"), "the flag's hostname wins:\n{log}");
    say(&format!("{test}: {full_syncs} full syncs in 7 s, oom_score_adj {}, warning: {}", oom.trim(), warnings[0]));
}

/// One probe of the agent's HTTP servers: when it was sent, how long the answer took, and
/// what came back (the status, or why there was none).
struct Probe {
    path: &'static str,
    sent: Instant,
    took: Duration,
    answer: Result<u16, String>,
}

/// Issue 14 item 2: `/healthz`, `/livez` and `/metrics` are answered while the first sync of
/// many services runs (the sync runs on the proxier's own thread, not on the event loop that
/// serves them). A prober sends one of the three every 20 ms, each with a 1 s timeout, from
/// the agent's first answer until the agent reports its first complete sync; every probe must
/// be answered, and some during the sync itself (its span taken from the agent's `synced`
/// event). Latencies are printed, not asserted.
#[test]
fn probes_are_answered_during_the_first_sync() {
    let test = "probes_are_answered_during_the_first_sync";
    const SERVICES: usize = 30_000;
    const PROBE_EVERY: Duration = Duration::from_millis(20);
    const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
    let args = ["--max-services", "65536", "--sync-period", "10m"];
    let Some(mut e) = env(test, &["pod-a", "pod-b"], &args) else {
        return;
    };
    let (a, b) = (e.pod_ip("pod-a"), e.pod_ip("pod-b"));
    let published = Instant::now();
    e.api.atomically(|store| {
        for i in 0..SERVICES {
            let ip = Ipv4Addr::new(10, 100 + (i / 62_500) as u8, ((i / 250) % 250) as u8, (i % 250) as u8 + 1);
            let spec = ServiceSpec::new(&format!("s-{i}"), ip, 80, "http", Protocol::Tcp, HTTP_PORT)
                .endpoint("pod-a", a, true)
                .endpoint("pod-b", b, true);
            store.create(to_json(&k8s::service(&spec))).expect("creating a Service");
            for slice in k8s::slices(&spec, 1) {
                store.create(to_json(&slice)).expect("creating an EndpointSlice");
            }
        }
    });
    let publish_ms = published.elapsed().as_millis();
    let node = e.h.topology.node.path();
    let source = e.h.apiserver().expect("an apiserver source");
    let (healthz, metrics) = (source.healthz, source.metrics);
    let targets = [("/healthz", healthz), ("/livez", healthz), ("/metrics", metrics)];
    let started = Instant::now();
    e.start_agent();
    // The servers are bound before anything else: probing starts with their first answer.
    let first = loop {
        if kproxy_e2e::http::get_in(&node, metrics, "/metrics", PROBE_TIMEOUT).is_ok() {
            break started.elapsed();
        }
        assert!(started.elapsed() < CONVERGE, "the agent's servers never answered:\n{}", e.h.agent_log());
        std::thread::sleep(Duration::from_millis(5));
    };
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let prober = {
        let (stop, node) = (stop.clone(), node.clone());
        std::thread::spawn(move || {
            let mut probes = Vec::new();
            // Bounded: 180 s of probes at most, whatever happens to the agent.
            let deadline = Instant::now() + Duration::from_secs(180);
            for (path, addr) in targets.iter().cycle() {
                if stop.load(std::sync::atomic::Ordering::Relaxed) || Instant::now() > deadline {
                    break;
                }
                let sent = Instant::now();
                let answer = kproxy_e2e::http::get_in(&node, *addr, path, PROBE_TIMEOUT)
                    .map(|r| r.status)
                    .map_err(|e| format!("{e:#}"));
                probes.push(Probe { path, sent, took: sent.elapsed(), answer });
                std::thread::sleep(PROBE_EVERY.saturating_sub(sent.elapsed()));
            }
            probes
        })
    };
    // The first sync that programs every Service, and when the test saw it.
    const POLL: Duration = Duration::from_millis(10);
    let mut reader = kproxy_e2e::events::EventReader::new(&e.h.event_file());
    let deadline = Instant::now() + Duration::from_secs(150);
    let (synced, seen) = loop {
        let found = reader.read_new().expect("reading the events").into_iter().find_map(|ev| match ev {
            kproxy_api::event::Event::Synced(s) if s.frontends >= SERVICES => Some(s),
            _ => None,
        });
        if let Some(s) = found {
            break (s, Instant::now());
        }
        if Instant::now() > deadline || !e.h.agent_running() {
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            panic!("no sync of {SERVICES} services within 150 s; agent log:\n{}", e.h.agent_log());
        }
        std::thread::sleep(POLL);
    };
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let probes = prober.join().expect("the prober panicked");
    // The sync ran within [seen - total, seen]; the test saw its event at most a poll (and a
    // read of the event file) after it ended, so [seen - total, seen - 100 ms] is inside it.
    let total = Duration::from_secs_f64(synced.total_ms / 1e3);
    let (from, to) = (seen - total, seen - Duration::from_millis(100));
    let during: Vec<&Probe> = probes.iter().filter(|p| p.sent >= from && p.sent + p.took <= to).collect();
    let mut ms: Vec<f64> = probes.iter().filter(|p| p.sent + p.took >= from && p.sent <= to).map(|p| p.took.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    let (median, max) = (ms.get(ms.len() / 2).copied().unwrap_or(f64::NAN), ms.last().copied().unwrap_or(f64::NAN));
    say(&format!(
        "{test}: {SERVICES} services x 2 endpoints published in {publish_ms} ms; servers answered {} ms after start, \
         first complete sync ({} frontends, {} writes) ended {} ms after start and took {:.0} ms ({:.0} ms in the maps); \
         {} probes in all, {} sent and answered during the sync (window {}..{} ms after start); \
         probe latency during the sync: median {median:.1} ms, max {max:.1} ms",
        first.as_millis(),
        synced.frontends,
        synced.writes,
        (seen - started).as_millis(),
        synced.total_ms,
        synced.sync_ms,
        probes.len(),
        during.len(),
        (from - started).as_millis(),
        (to - started).as_millis(),
    ));
    let failed: Vec<String> = probes
        .iter()
        .filter(|p| p.answer.is_err())
        .map(|p| format!("{} at {} ms: {}", p.path, (p.sent - started).as_millis(), p.answer.as_ref().unwrap_err()))
        .collect();
    assert!(failed.is_empty(), "{} of {} probes were not answered, e.g. {:?}", failed.len(), probes.len(), &failed[..failed.len().min(5)]);
    for p in &probes {
        let status = *p.answer.as_ref().expect("answered");
        assert!(status == 200 || (p.path == "/healthz" && status == 503), "{} answered {status}", p.path);
    }
    assert!(
        !during.is_empty(),
        "no probe was answered during the first sync ({} ms long, {} probes in all)",
        total.as_millis(),
        probes.len()
    );
}
