//! Privileged tests of the test topology itself (no kproxy involved): pods answer from their
//! namespaces, clients really run in the node namespace and the cgroup, and nothing is left
//! behind afterwards, also when a test panics. Skipped (loudly) when not root.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

mod common;

use common::{counts, skip_unless_root};
use kproxy_e2e::harness::{HTTP_PORT, UDP_PORT};
use kproxy_e2e::report::Report;
use kproxy_e2e::topology::{output_in, spawn_in, spawn_in_cgroup, Cgroup, ChildGuard, Netns, Topology};

const CLIENT_WAIT: Duration = Duration::from_secs(30);

fn serve(pod: &kproxy_e2e::topology::Pod) -> ChildGuard {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kproxy-testpod"));
    cmd.args(["serve", "--name", &pod.name])
        .arg("--tcp")
        .arg(format!("{}:{HTTP_PORT}", pod.ip))
        .arg("--udp")
        .arg(format!("{}:{UDP_PORT}", pod.ip))
        .stdout(Stdio::piped());
    let mut server = spawn_in(&pod.netns, cmd).expect("starting a server");
    let line = server
        .read_line(Duration::from_secs(5))
        .expect("server ready line");
    assert!(line.starts_with("ready"), "unexpected server line {line:?}");
    server
}

fn client(node: &Netns, cgroup: &Cgroup, args: &[&str]) -> Report {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kproxy-testpod"));
    cmd.args(args);
    let out = output_in(node, Some(cgroup), cmd, CLIENT_WAIT).expect("running the client");
    assert!(out.status.success(), "client {args:?} failed: {out:?}");
    Report::parse(&String::from_utf8_lossy(&out.stdout)).expect("client report")
}

/// Whether `pid` exists and is not a zombie (killed children nobody reaped are zombies).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'))
    })
}

/// What a topology leaves on the machine while it exists.
struct Traces {
    netns: Vec<PathBuf>,
    cgroup: PathBuf,
    pids: Vec<i32>,
}

impl Traces {
    fn assert_gone(&self) {
        for ns in &self.netns {
            assert!(!ns.exists(), "{} was not deleted", ns.display());
        }
        assert!(
            !self.cgroup.exists(),
            "{} was not removed",
            self.cgroup.display()
        );
        for pid in &self.pids {
            assert!(!alive(*pid), "process {pid} survived");
        }
    }
}

#[test]
fn pods_answer_node_clients_and_everything_is_removed() {
    if skip_unless_root("pods_answer_node_clients_and_everything_is_removed") {
        return;
    }
    let traces = {
        let topo = Topology::builder()
            .pods(["pod-a", "pod-b"])
            .build()
            .expect("topology");
        let cgroup = Cgroup::new("topology-test").expect("cgroup");
        let servers: Vec<ChildGuard> = topo.pods.iter().map(serve).collect();

        for pod in &topo.pods {
            let http = format!("{}:{HTTP_PORT}", pod.ip);
            let r = client(
                &topo.node,
                &cgroup,
                &["http", "--addr", &http, "--count", "5"],
            );
            assert_eq!((r.ok, r.failed()), (5, 0), "{r:?}");
            assert_eq!(r.by_backend, counts(&[(&pod.name, 5)]));
            assert_eq!(r.peers, counts(&[(&http, 5)]), "one connection per request");

            let args = ["http", "--addr", &http, "--count", "5", "--keepalive"];
            let r = client(&topo.node, &cgroup, &args);
            assert_eq!((r.ok, r.peers.clone()), (5, counts(&[(&http, 1)])), "{r:?}");

            let udp = format!("{}:{UDP_PORT}", pod.ip);
            for mode in [None, Some("--connected"), Some("--new-socket")] {
                let mut args = vec!["udp", "--addr", &udp, "--count", "5"];
                args.extend(mode);
                let r = client(&topo.node, &cgroup, &args);
                assert_eq!((r.ok, r.failed()), (5, 0), "{mode:?}: {r:?}");
                assert_eq!(r.by_backend, counts(&[(&pod.name, 5)]));
                assert_eq!(r.sources, counts(&[(&udp, 5)]));
            }
        }

        // Nothing routes service addresses: without kproxy they are unreachable, not sent out.
        let args = [
            "http",
            "--addr",
            "10.96.0.10:80",
            "--count",
            "1",
            "--timeout-ms",
            "500",
        ];
        let r = client(&topo.node, &cgroup, &args);
        assert_eq!(r.errors, counts(&[("NetworkUnreachable", 1)]), "{r:?}");

        // A spawned process really is in the node namespace and in the cgroup.
        let mut sleep = Command::new("sleep");
        sleep.arg("30");
        let sleeper = spawn_in_cgroup(&topo.node, &cgroup, sleep).expect("spawn sleep");
        assert!(
            cgroup.procs().unwrap().contains(&sleeper.pid()),
            "not in the cgroup"
        );
        assert!(
            topo.node.pids().unwrap().contains(&sleeper.pid()),
            "not in the netns"
        );

        let mut pids: Vec<i32> = servers.iter().map(ChildGuard::pid).collect();
        pids.push(sleeper.pid());
        // Leaked on purpose: the namespace and cgroup guards must kill them.
        std::mem::forget(servers);
        std::mem::forget(sleeper);
        let mut netns: Vec<PathBuf> = topo.pods.iter().map(|p| p.netns.path()).collect();
        netns.push(topo.node.path());
        Traces {
            netns,
            cgroup: cgroup.path().to_path_buf(),
            pids,
        }
    };
    traces.assert_gone();
}

#[test]
fn a_panicking_test_leaves_nothing_behind() {
    if skip_unless_root("a_panicking_test_leaves_nothing_behind") {
        return;
    }
    let traces = std::sync::Mutex::new(None);
    let outcome = std::panic::catch_unwind(|| {
        let topo = Topology::builder().pod("pod-a").build().expect("topology");
        let cgroup = Cgroup::new("topology-test").expect("cgroup");
        let mut sleep = Command::new("sleep");
        sleep.arg("30");
        let sleeper = spawn_in_cgroup(&topo.node, &cgroup, sleep).expect("spawn sleep");
        *traces.lock().unwrap() = Some(Traces {
            netns: vec![topo.node.path(), topo.pods[0].netns.path()],
            cgroup: cgroup.path().to_path_buf(),
            pids: vec![sleeper.pid()],
        });
        panic!("deliberate panic with a live topology");
    });
    assert!(outcome.is_err());
    traces.into_inner().unwrap().expect("traces").assert_gone();
}
