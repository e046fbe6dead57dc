//! Privileged end-to-end tests of the agent under what nodes and pods do to it: manifest files
//! rewritten in place while clients use their Services, reads that fail for want of file
//! descriptors, ConfigMap volume updates, floods of idle connections and slow clients on its
//! HTTP ports, and a umask of 0 (issue 12, items 4 to 6).
//!
//! One node namespace with pods, the real `kproxy run` on a manifest directory, clients in the
//! attached cgroup (the socket path) or connecting from a pod's namespace. Nothing leaves the
//! test's namespaces; the harness tears everything down even when an assertion fails.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

mod common;

use common::{binaries, say, skip_unless_root};
use kproxy_e2e::harness::{unique_bpffs_dir, Harness, HEALTHZ_PORT, HTTP_PORT, METRICS_PORT};
use kproxy_e2e::topology::{in_netns, BRIDGE_IP};

const NODE: &str = "kproxy-node";
const SERVICE: &str = "10.96.0.7:80";
const CLIENT_WAIT: Duration = Duration::from_secs(120);
/// The agent's CPU time over a few seconds of idleness must stay below this share of them: a
/// check against a busy loop (which takes all of a core), not a measure of speed.
const IDLE_CPU_SHARE: f64 = 0.1;

/// A harness with `pods` whose agent runs as node `kproxy-node` with `args`; `None` when not
/// root. The agent serves `/healthz` on 0.0.0.0:10256 and `/metrics` on 127.0.0.1:10249 of the
/// node namespace (its defaults) unless `args` say otherwise.
fn harness(test: &str, pods: &[&str], args: &[&str]) -> Option<Harness> {
    if skip_unless_root(test) {
        return None;
    }
    let mut all = vec!["--hostname-override", NODE, "--devices="];
    all.extend_from_slice(args);
    let h = Harness::new(binaries(), pods, unique_bpffs_dir("kproxy-hard"))
        .unwrap_or_else(|e| panic!("{test}: harness: {e:#}"))
        .with_agent_args(&all);
    Some(h)
}

/// Service `s` at 10.96.0.7:80 with one EndpointSlice of `pods` (port 8080), the Service
/// annotated with `rev` so that each version differs.
fn manifest(h: &Harness, pods: &[&str], rev: u32) -> String {
    format!("{}---\n{}", service_yaml(rev), slice_yaml(h, pods, rev))
}

/// Service `s` (see [`manifest`]).
fn service_yaml(rev: u32) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: s, namespace: default, annotations: {{rev: \"{rev}\"}}}}\n\
         spec:\n  clusterIP: 10.96.0.7\n  ports: [{{name: http, port: 80, protocol: TCP}}]\n"
    )
}

/// The EndpointSlice of Service `s` with `pods`, annotated with `rev`.
fn slice_yaml(h: &Harness, pods: &[&str], rev: u32) -> String {
    let eps: String = pods.iter().map(|p| format!("- addresses: [{}]\n", h.topology.pod(p).ip)).collect();
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: s-1\n  namespace: default\n  \
         labels: {{kubernetes.io/service-name: s}}\n  annotations: {{rev: \"{rev}\"}}\naddressType: IPv4\n\
         ports: [{{name: http, port: {HTTP_PORT}, protocol: TCP}}]\nendpoints:\n{eps}"
    )
}

/// Whether the dump has the Service with `backends` backends.
fn has_backends(d: &kproxy_e2e::harness::Dump, backends: usize) -> bool {
    d.services.iter().any(|s| s.frontend == SERVICE && s.backends.len() == backends)
}

/// Writes `yaml` (atomically), starts the agent if needed, and waits until the Service has
/// `backends` backends.
fn program(h: &mut Harness, yaml: &str, backends: usize) {
    h.write_manifest(yaml).expect("write manifest");
    if !h.agent_running() {
        h.start_agent().expect("start kproxy run");
    }
    h.wait_for_dump(Duration::from_secs(20), |d| has_backends(d, backends))
        .unwrap_or_else(|e| panic!("not programmed with {backends} backends: {e:#}"));
}

/// CPU time (user and system) process `pid` has used.
fn cpu_time(pid: i32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/PID/stat");
    // Fields after the command name in parentheses: state is field 3, utime 14, stime 15.
    let fields: Vec<&str> = stat.rsplit_once(')').expect("a command name").1.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_secs_f64(ticks as f64 / per_second as f64)
}

/// The agent's CPU time over `wall` from now.
fn cpu_over(pid: i32, wall: Duration) -> Duration {
    let before = cpu_time(pid);
    std::thread::sleep(wall);
    cpu_time(pid) - before
}

/// The smallest file descriptor number process `pid` does not use: with its `RLIMIT_NOFILE`
/// set to that, the process's next open (or accept) fails with `EMFILE`.
fn lowest_free_fd(pid: i32) -> u64 {
    let used: std::collections::BTreeSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("list /proc/PID/fd")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    (0..).find(|n| !used.contains(n)).expect("a free number")
}

/// Sets the soft `RLIMIT_NOFILE` of process `pid` (as `prlimit --pid PID --nofile=SOFT:`);
/// returns the soft limit it had.
fn set_soft_open_files(pid: i32, soft: u64) -> u64 {
    let mut old = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: prlimit only reads or writes the rlimit structs passed (null: not used), which
    // live on this stack.
    let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) };
    assert_eq!(rc, 0, "prlimit get: {}", std::io::Error::last_os_error());
    let new = libc::rlimit { rlim_cur: soft as libc::rlim_t, rlim_max: old.rlim_max };
    // SAFETY: as above.
    let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit set: {}", std::io::Error::last_os_error());
    old.rlim_cur
}

/// This test process's hard `RLIMIT_NOFILE`.
fn own_open_files_hard_limit() -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes the rlimit on this stack.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) }, 0);
    limit.rlim_max
}

/// Raises this test process's soft `RLIMIT_NOFILE` to its hard limit, to hold `needed`
/// connections; panics if the hard limit is too low.
fn raise_own_open_files(needed: u64) {
    let hard = own_open_files_hard_limit();
    assert!(hard >= needed, "this test needs {needed} open files; the hard limit is {hard}");
    let limit = libc::rlimit { rlim_cur: hard as libc::rlim_t, rlim_max: hard as libc::rlim_t };
    // SAFETY: setrlimit reads the rlimit on this stack.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0, "setrlimit: {}", std::io::Error::last_os_error());
}

/// Opens `count` TCP connections to `addr` from network namespace `netns`, each left idle.
fn open_idle(netns: &Path, addr: SocketAddr, count: usize) -> Vec<TcpStream> {
    in_netns(netns, || {
        (0..count).filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()).collect::<Vec<_>>()
    })
    .expect("connect from the pod")
}

/// Waits (at most `wait`) for the server to close each of `streams`; returns how many it did.
fn count_closed(streams: &[TcpStream], wait: Duration) -> usize {
    let deadline = Instant::now() + wait;
    let mut closed = vec![false; streams.len()];
    loop {
        for (s, done) in streams.iter().zip(closed.iter_mut()).filter(|(_, d)| !**d) {
            s.set_nonblocking(true).expect("nonblocking");
            let mut buf = [0u8; 256];
            *done = match (&*s).read(&mut buf) {
                Ok(0) => true,
                Ok(_) => false,
                Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
            };
        }
        let n = closed.iter().filter(|c| **c).count();
        if n == streams.len() || Instant::now() >= deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits (at most `wait`) for the agent log to contain `text`.
fn wait_for_log(h: &Harness, text: &str, wait: Duration) -> bool {
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        if h.agent_log_full().contains(text) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

// `kubectl get … -o yaml > endpoints.yaml`, an editor saving in place, a script writing
// slowly: the file is truncated, then written in pieces. Read half-way, it would take the
// Service's endpoints away (and with them, through stale-socket termination, its established
// connections). The agent reads it only once the writer closed it and it settled.
#[test]
fn a_manifest_rewritten_in_place_never_takes_its_service_down() {
    let test = "a_manifest_rewritten_in_place_never_takes_its_service_down";
    let Some(mut h) = harness(test, &["pod-a", "pod-b"], &["--healthz-bind-address", "", "--metrics-bind-address", ""]) else {
        return;
    };
    // The Service in one file, its EndpointSlice in another (as `kubectl get endpointslices
    // -o yaml > endpoints.yaml` writes it), which is rewritten.
    let target = h.manifests().join("endpoints.yaml");
    std::fs::write(&target, slice_yaml(&h, &["pod-a", "pod-b"], 0)).expect("write endpoints.yaml");
    program(&mut h, &service_yaml(0), 2);
    let looped = h
        .spawn_client(&["http", "--addr", SERVICE, "--count", "2500", "--interval-ms", "2", "--timeout-ms", "1000"])
        .expect("start the client loop");
    let kept = h
        .spawn_client(&["http", "--addr", SERVICE, "--keepalive", "--count", "350", "--interval-ms", "25", "--timeout-ms", "1000"])
        .expect("start the kept-alive client");
    std::thread::sleep(Duration::from_millis(500));
    // 12 rewrites in place, each truncating the file and writing it line by line, 25 ms apart
    // (as a program printing its output slowly); between rewrites, alternately less and more
    // than the settle time (500 ms).
    const REWRITES: u32 = 12;
    let started = Instant::now();
    for rev in 1..=REWRITES {
        let text = slice_yaml(&h, &["pod-a", "pod-b"], rev);
        let mut f = File::create(&target).expect("truncate the manifest");
        for line in text.split_inclusive('\n') {
            std::thread::sleep(Duration::from_millis(25));
            f.write_all(line.as_bytes()).expect("write a line");
        }
        drop(f);
        std::thread::sleep(Duration::from_millis(if rev % 2 == 0 { 900 } else { 100 }));
    }
    let rewriting = started.elapsed();
    let looped = Harness::client_report(looped, CLIENT_WAIT).expect("client loop report");
    let kept = Harness::client_report(kept, CLIENT_WAIT).expect("kept-alive client report");
    let connections: u64 = kept.peers.values().sum();
    say(&format!(
        "{test}: {REWRITES} rewrites in place over {rewriting:.1?}: {} of {} new connections failed ({:?}); \
         kept-alive client: {} of {} requests failed, {connections} connection(s)",
        looped.failed(),
        looped.ok + looped.failed(),
        looped.errors,
        kept.failed(),
        kept.ok + kept.failed(),
    ));
    let log = h.agent_log();
    assert_eq!(looped.failed(), 0, "no request fails while the file is rewritten: {looped:?}\n{log}");
    assert_eq!(kept.failed(), 0, "the kept-alive connection is never aborted: {kept:?}\n{log}");
    assert_eq!(connections, 1, "one connection throughout: {kept:?}");
    h.wait_for_dump(Duration::from_secs(10), |d| has_backends(d, 2)).expect("the last version is served");
}

// A read that fails (here: the agent is out of file descriptors, EMFILE) keeps the last version
// of the file and is retried; the periodic full syncs meanwhile, whose directory walk fails too,
// take nothing for deleted.
#[test]
fn a_manifest_read_that_fails_keeps_the_service_and_is_retried() {
    let test = "a_manifest_read_that_fails_keeps_the_service_and_is_retried";
    let args = ["--healthz-bind-address", "", "--metrics-bind-address", "", "--sync-period", "2s"];
    let Some(mut h) = harness(test, &["pod-a", "pod-b"], &args) else { return };
    let yaml = manifest(&h, &["pod-a"], 0);
    program(&mut h, &yaml, 1);
    let pid = h.agent_pid().expect("the agent runs");
    let client = h
        .spawn_client(&["http", "--addr", SERVICE, "--count", "700", "--interval-ms", "10", "--timeout-ms", "1000"])
        .expect("start the client");
    std::thread::sleep(Duration::from_millis(300));
    let soft = set_soft_open_files(pid, lowest_free_fd(pid));
    h.write_manifest(&manifest(&h, &["pod-a", "pod-b"], 1)).expect("add pod-b");
    let failed_read = wait_for_log(&h, "Too many open files", Duration::from_secs(20));
    // Two full syncs (every 2 s) at least, with the directory walk failing too.
    std::thread::sleep(Duration::from_secs(5));
    set_soft_open_files(pid, soft);
    let restored = Instant::now();
    let retried = h.wait_for_dump(Duration::from_secs(30), |d| has_backends(d, 2));
    let took = restored.elapsed();
    let report = Harness::client_report(client, CLIENT_WAIT).expect("client report");
    let log = h.agent_log();
    say(&format!(
        "{test}: read failed with EMFILE: {failed_read}; change applied {} after descriptors were available again; \
         {} of {} requests failed meanwhile",
        if retried.is_ok() { format!("{took:.1?}") } else { "never (30 s)".into() },
        report.failed(),
        report.ok + report.failed()
    ));
    assert!(failed_read, "the agent's read hit EMFILE (the test's premise):\n{log}");
    assert_eq!(report.failed(), 0, "the Service kept serving while reads failed: {report:?}\n{log}");
    retried.unwrap_or_else(|e| panic!("the failed read was not retried: {e:#}"));
}

/// Lays out `dir` as kubelet's atomic writer does for a ConfigMap volume with the key
/// `services.yaml` (version `n` of it): the content in a timestamped hidden directory, `..data`
/// linking to it, the visible file linking through `..data`; a new version is swapped in by
/// renaming a new link over `..data`, then the old directory is removed.
fn configmap_write(dir: &Path, n: u32, content: &str) {
    let data = format!("..2024_01_01_00_00_{n:02}.123456789");
    std::fs::create_dir(dir.join(&data)).expect("create the data directory");
    std::fs::write(dir.join(&data).join("services.yaml"), content).expect("write the data");
    std::os::unix::fs::symlink(&data, dir.join("..data_tmp")).expect("link ..data_tmp");
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).expect("swap ..data");
    let visible = dir.join("services.yaml");
    if std::fs::symlink_metadata(&visible).is_err() {
        std::os::unix::fs::symlink("..data/services.yaml", &visible).expect("link the visible file");
    }
    if n > 1 {
        std::fs::remove_dir_all(dir.join(format!("..2024_01_01_00_00_{:02}.123456789", n - 1))).expect("remove the old data");
    }
}

// A ConfigMap mounted as the manifest directory: kubelet updates it by swapping the `..data`
// link, and never touches the visible files (links through it). The update is read when the
// link changes, not at the next full sync.
#[test]
fn a_configmap_volume_update_is_applied_when_its_data_link_is_swapped() {
    let test = "a_configmap_volume_update_is_applied_when_its_data_link_is_swapped";
    let Some(mut h) = harness(test, &["pod-a", "pod-b"], &["--healthz-bind-address", "", "--metrics-bind-address", ""]) else {
        return;
    };
    let dir = h.manifests().to_path_buf();
    configmap_write(&dir, 1, &manifest(&h, &["pod-a"], 0));
    h.start_agent().expect("start kproxy run");
    h.wait_for_dump(Duration::from_secs(20), |d| has_backends(d, 1)).expect("first version");
    configmap_write(&dir, 2, &manifest(&h, &["pod-a", "pod-b"], 1));
    // Well before the full sync (every 30 s).
    let (_, took) = h
        .wait_for_dump(Duration::from_secs(10), |d| has_backends(d, 2))
        .unwrap_or_else(|e| panic!("the ConfigMap update was not applied: {e:#}"));
    say(&format!("{test}: the swapped ..data link was applied after {took:.1?}"));
}

// One pod opens 1,100 idle connections to the node's healthz port, with the agent started
// under the common default soft limit of 1,024 open files. The agent raises that limit, caps
// its connections (a new one closes the oldest) and cuts idle ones, so it does not run out of
// descriptors, does not spin, answers /healthz and reads manifests meanwhile.
#[test]
fn the_healthz_port_stays_responsive_under_a_flood_of_idle_connections() {
    let test = "the_healthz_port_stays_responsive_under_a_flood_of_idle_connections";
    let Some(h) = harness(test, &["pod-a", "pod-b"], &[]) else { return };
    // Soft 1,024 (the usual default), hard what this process has (raising it would need
    // CAP_SYS_RESOURCE).
    let mut h = h.with_agent_open_files(1024, own_open_files_hard_limit());
    let yaml = manifest(&h, &["pod-a"], 0);
    program(&mut h, &yaml, 1);
    const FLOOD: usize = 1100;
    raise_own_open_files(FLOOD as u64 + 1024);
    let pid = h.agent_pid().expect("the agent runs");
    let healthz = SocketAddr::from((BRIDGE_IP, HEALTHZ_PORT));
    let pod = h.topology.pod("pod-a").netns.path();
    let flood = open_idle(&pod, healthz, FLOOD);
    std::thread::sleep(Duration::from_secs(1));
    let wall = Duration::from_secs(5);
    let cpu = cpu_over(pid, wall);
    let asked = Instant::now();
    let healthz_answer = kproxy_e2e::http::get_in(&pod, healthz, "/healthz", Duration::from_secs(15));
    let answered = asked.elapsed();
    h.write_manifest(&manifest(&h, &["pod-a", "pod-b"], 1)).expect("add pod-b");
    let read = h.wait_for_dump(Duration::from_secs(20), |d| has_backends(d, 2));
    let closed = count_closed(&flood, Duration::from_secs(15));
    let log = h.agent_log_full();
    say(&format!(
        "{test}: {} of {FLOOD} idle connections opened; agent CPU {cpu:.2?} in {wall:?}; /healthz {} after {answered:.1?}; \
         manifest change read: {}; {closed} of them closed by the agent",
        flood.len(),
        healthz_answer.as_ref().map_or_else(|e| format!("failed ({e:#})"), |r| format!("answered {}", r.status)),
        read.is_ok(),
    ));
    assert_eq!(flood.len(), FLOOD, "every connection was made (the kernel queues what is not accepted)");
    assert!(cpu.as_secs_f64() < wall.as_secs_f64() * IDLE_CPU_SHARE, "the agent spins: {cpu:?} of CPU in {wall:?}\n{}", h.agent_log());
    assert_eq!(healthz_answer.expect("/healthz answers").status, 200);
    read.unwrap_or_else(|e| panic!("the manifest change was not read during the flood: {e:#}"));
    assert_eq!(closed, FLOOD, "idle connections are closed (at the cap, or after the header timeout)");
    assert!(log.contains("raised the open-file limit (RLIMIT_NOFILE) to its hard limit"), "{}", h.agent_log());
}

// When accept fails because the process has no descriptor left (EMFILE), the kernel keeps the
// connection queued and every retry fails the same way: the agent must wait before retrying.
#[test]
fn accept_errors_back_off_instead_of_spinning() {
    let test = "accept_errors_back_off_instead_of_spinning";
    let Some(mut h) = harness(test, &["pod-a"], &[]) else { return };
    let yaml = manifest(&h, &["pod-a"], 0);
    program(&mut h, &yaml, 1);
    let pid = h.agent_pid().expect("the agent runs");
    let healthz = SocketAddr::from((BRIDGE_IP, HEALTHZ_PORT));
    let pod = h.topology.pod("pod-a").netns.path();
    let soft = set_soft_open_files(pid, lowest_free_fd(pid));
    let queued = open_idle(&pod, healthz, 50);
    std::thread::sleep(Duration::from_millis(500));
    let wall = Duration::from_secs(5);
    let cpu = cpu_over(pid, wall);
    set_soft_open_files(pid, soft);
    let after = kproxy_e2e::http::get_in(&pod, healthz, "/healthz", Duration::from_secs(15));
    say(&format!(
        "{test}: {} connections queued while accept failed with EMFILE: agent CPU {cpu:.2?} in {wall:?}; \
         /healthz once descriptors were back: {}",
        queued.len(),
        after.as_ref().map_or_else(|e| format!("failed ({e:#})"), |r| format!("answered {}", r.status)),
    ));
    let log = h.agent_log();
    assert!(cpu.as_secs_f64() < wall.as_secs_f64() * IDLE_CPU_SHARE, "the accept loop spins: {cpu:?} of CPU in {wall:?}\n{log}");
    assert!(log.contains("accept failed"), "the failure is logged:\n{log}");
    assert_eq!(after.expect("/healthz answers again").status, 200);
}

/// Sends `request` on a fresh connection to `addr` in `netns` and returns how long the server
/// took to close it (`None`: still open after `wait`).
fn time_to_close(netns: &Path, addr: SocketAddr, request: &[u8], wait: Duration) -> Option<Duration> {
    let mut s = in_netns(netns, || TcpStream::connect_timeout(&addr, Duration::from_secs(5))).unwrap().expect("connect");
    s.write_all(request).expect("send");
    let sent = Instant::now();
    s.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Some(sent.elapsed()),
            Ok(_) => continue, // a response; wait for the close
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => return None,
            Err(_) => return Some(sent.elapsed()), // reset
        }
    }
}

// The healthz port listens on every address of the node, so any pod reaches it: it answers
// /healthz and /livez only (the metrics are on the metrics address, loopback by default), and a
// client that sends its headers slowly or idles is cut.
#[test]
fn the_healthz_port_serves_only_health_and_cuts_slow_and_idle_clients() {
    let test = "the_healthz_port_serves_only_health_and_cuts_slow_and_idle_clients";
    let Some(mut h) = harness(test, &["pod-a"], &[]) else { return };
    let yaml = manifest(&h, &["pod-a"], 0);
    program(&mut h, &yaml, 1);
    let node = h.topology.node.path();
    let healthz = SocketAddr::from((Ipv4Addr::LOCALHOST, HEALTHZ_PORT));
    let metrics = SocketAddr::from((Ipv4Addr::LOCALHOST, METRICS_PORT));
    let get = |addr, path| kproxy_e2e::http::get_in(&node, addr, path, Duration::from_secs(10)).unwrap_or_else(|e| panic!("GET {path}: {e:#}"));
    let on_healthz: Vec<(&str, u16)> = ["/healthz", "/livez", "/metrics", "/"].iter().map(|p| (*p, get(healthz, p).status)).collect();
    let scrape = get(metrics, "/metrics");
    let wait = Duration::from_secs(20);
    let slow = time_to_close(&node, healthz, b"GET /healthz HTTP/1.1\r\nHost: node\r\n", wait);
    let idle = time_to_close(&node, healthz, b"GET /healthz HTTP/1.1\r\nHost: node\r\n\r\n", wait);
    say(&format!(
        "{test}: on the healthz port {on_healthz:?}; /metrics on the metrics port {}; half-sent headers cut after {slow:.1?}, \
         an idle kept-alive connection after {idle:.1?}",
        scrape.status
    ));
    assert_eq!(on_healthz, [("/healthz", 200), ("/livez", 200), ("/metrics", 404), ("/", 404)]);
    assert_eq!(scrape.status, 200);
    assert!(scrape.text().contains("kubeproxy_sync_proxy_rules_duration_seconds"), "{}", scrape.text());
    assert!(slow.is_some(), "a client that never finishes its headers is cut within {wait:?}");
    assert!(idle.is_some(), "an idle kept-alive connection is closed within {wait:?}");
}

// bpffs directories created by the agent are private whatever the umask it runs with; the
// pins in them are the kernel's 0600.
#[test]
fn bpffs_directories_are_private_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt as _;
    let test = "bpffs_directories_are_private_whatever_the_umask";
    let Some(h) = harness(test, &["pod-a"], &["--healthz-bind-address", "", "--metrics-bind-address", ""]) else { return };
    let mut h = h.with_agent_umask(0);
    let yaml = manifest(&h, &["pod-a"], 0);
    program(&mut h, &yaml, 1);
    let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).permissions().mode() & 0o7777;
    let root = h.bpffs_dir().to_path_buf();
    let dirs: Vec<(String, u32)> =
        [root.clone(), root.join("maps"), root.join("links")].iter().map(|d| (d.display().to_string(), mode(d))).collect();
    let mut pins = Vec::new();
    for dir in ["maps", "links"] {
        for entry in std::fs::read_dir(root.join(dir)).expect("list pins") {
            let path = entry.expect("entry").path();
            pins.push((path.display().to_string(), mode(&path)));
        }
    }
    say(&format!("{test}: under umask 000, directories {:?}; {} pins", dirs.iter().map(|(d, m)| format!("{d} {m:o}")).collect::<Vec<_>>(), pins.len()));
    for (dir, m) in &dirs {
        assert_eq!(*m, 0o700, "{dir} has mode {m:o}");
    }
    assert!(!pins.is_empty());
    for (pin, m) in &pins {
        assert_eq!(*m, 0o600, "{pin} has mode {m:o}");
    }
}
