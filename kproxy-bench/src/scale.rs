//! `cargo xtask bench --scale N,...`: kproxy's control plane from 10,000 to 100,000 Services, as
//! it runs in a cluster (issues 14 and 19). ClusterIP Services (NodePorts stop at 35,535 in the
//! main benchmark's address plan) × `--endpoints` endpoints each, on the fake apiserver (real
//! HTTP list and watch, pages of 500 as kube-rs asks), with the agent's socket programs on a
//! cgroup of its own and no tc programs. For each N:
//!
//! - **Programming**: agent start → the `synced` event with every frontend, and the initial lists
//!   complete (the last list page the apiserver was asked for) → that event.
//! - **Probes during the first sync**: `/healthz` and `/livez`, alternately, every 20 ms from the
//!   first answer until programmed; answered, and their latency (median, p99, max).
//! - **Memory**: VmRSS once programmed (after the endpoint changes and the idle resync too), and
//!   VmHWM, the peak.
//! - **One endpoint change**: an EndpointSlice replaced at the apiserver → the partial `synced`
//!   event with it, `--changes` times (spaced past the runner's burst).
//! - **Idle full resync**: the agent runs with `--sync-period 15s`; the `sync_ms` of the first full
//!   sync after the endpoint changes, when nothing changed.
//! - **kube-proxy**: its full ruleset for the same Services (no NodePorts), loaded with
//!   `iptables-legacy-restore` and `nft -f` into empty tables of a namespace of their own, each
//!   stopped at `--scale-cap` and reported as capped (kube-proxy's own computation not included).
//!
//! One measurement per N (no rounds): the figures are seconds and MiB, far above the machine's
//! noise; the report says so.

use std::{
    fs,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use kproxy_e2e::{
    fake_apiserver::FakeApiServer,
    harness::unique_bpffs_dir,
    k8s,
    manifest::{Protocol, ServiceSpec},
    topology::{unique_name, Cgroup},
};
use serde::{Deserialize, Serialize};

use crate::{
    agent::{self, Agent},
    env::{self, Mode, ModeEnv, POD_PORT, SERVICE_PORT},
    kubeproxy::{self, Scope, Svc},
    results::{load_average, Machine},
};

/// What a scale run measures, and with what.
#[derive(Clone, Debug)]
pub struct ScaleConfig {
    pub kproxy: PathBuf,
    pub testpod: PathBuf,
    pub services: Vec<usize>,
    pub endpoints_per_service: usize,
    pub changes: usize,
    /// kube-proxy's loads are stopped after this long.
    pub cap: Duration,
    pub profile: String,
    pub command: String,
    pub note: Option<String>,
}

/// The latencies of the probes answered in a window, and how many were sent.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Probes {
    pub sent: usize,
    pub answered: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ScalePoint {
    pub services: usize,
    pub endpoints_per_service: usize,
    /// Creating the objects in the fake apiserver (not the agent's work).
    pub publish_s: f64,
    pub start_to_programmed_ms: f64,
    /// From the last initial list page requested to the programmed event.
    pub lists_to_programmed_ms: Option<f64>,
    /// The agent's own figures for the first sync (`synced` event).
    pub first_sync_ms: f64,
    pub first_total_ms: f64,
    pub writes: usize,
    pub probes: Probes,
    pub rss_kib: u64,
    pub rss_end_kib: u64,
    pub hwm_kib: u64,
    /// Endpoint change → partial sync seen, each repetition.
    pub endpoint_change_ms: Vec<f64>,
    /// The agent's own sync time of those partial syncs.
    pub endpoint_change_sync_ms: Vec<f64>,
    pub idle_full_resync_ms: Option<f64>,
    /// kube-proxy's full ruleset: `None` when over the cap.
    pub iptables_restore_ms: Option<f64>,
    pub nft_ms: Option<f64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ScaleResults {
    pub machine: Machine,
    pub profile: String,
    pub command: String,
    pub cap_s: u64,
    pub note: Option<String>,
    pub points: Vec<ScalePoint>,
    pub elapsed_s: f64,
}

/// Where the healthz server of the agent under test listens, in the node's namespace.
const HEALTHZ: &str = "127.0.0.1:10256";
/// The agent's full-resync period in a scale run.
const SYNC_PERIOD: &str = "15s";
/// Changes are spaced past the runner's burst (kube-proxy's: 2, one token a second).
const CHANGE_SPACING: Duration = Duration::from_millis(1100);
const API_NODE: &str = "bench-scale-node";

/// The ClusterIP of service `i`: 10.96.0.0/12 from 10.96.0.10.
fn cluster_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 10)) + i as u32)
}

/// Endpoint `j` of service `i`, in 10.128.0.0/9 (1,000,000 endpoints fit). No pod owns it:
/// only the control plane is measured.
fn endpoint_ip(i: usize, j: usize, per_service: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + (i * per_service + j) as u32)
}

/// The `k`-th address an endpoint change moves to (above every endpoint's).
fn spare_ip(k: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 250, 0, 0)) + k as u32)
}

pub fn make_services(n: usize, per_service: usize) -> Vec<Svc> {
    (0..n)
        .map(|i| Svc {
            name: format!("svc-{i}"),
            cluster_ip: cluster_ip(i),
            port: SERVICE_PORT,
            node_port: 0,
            target_port: POD_PORT,
            endpoints: (0..per_service).map(|j| endpoint_ip(i, j, per_service)).collect(),
        })
        .collect()
}

fn spec(s: &Svc) -> ServiceSpec {
    let mut spec = ServiceSpec::new(&s.name, s.cluster_ip, s.port, kubeproxy::PORT_NAME, Protocol::Tcp, s.target_port);
    spec.namespace = kubeproxy::NAMESPACE.to_string();
    for (j, &ip) in s.endpoints.iter().enumerate() {
        spec = spec.endpoint(&format!("pod-{j}"), ip, true);
    }
    spec
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub fn run(cfg: &ScaleConfig) -> Result<ScaleResults> {
    let started = Instant::now();
    let load_start = load_average();
    let env = ModeEnv::new(Mode::Kproxy, 1, &cfg.testpod).context("the scale run's node namespace")?;
    let work = std::env::temp_dir().join(unique_name("kproxy-bench-scale"));
    fs::create_dir_all(&work)?;
    let mut points = Vec::new();
    let mut ns = cfg.services.clone();
    ns.sort_unstable();
    for n in ns {
        kproxy_e2e::interrupt::check()?;
        println!("\n==> scale: N = {n} ClusterIP services x {} endpoints", cfg.endpoints_per_service);
        let point = measure(cfg, &env, n, &work).with_context(|| format!("scale point N = {n}"));
        let point = match point {
            Ok(p) => p,
            Err(e) => {
                let _ = fs::remove_dir_all(&work);
                return Err(e);
            }
        };
        print_point(&point);
        points.push(point);
    }
    let _ = fs::remove_dir_all(&work);
    Ok(ScaleResults {
        machine: Machine { load_start, load_end: load_average(), ..Machine::detect() },
        profile: cfg.profile.clone(),
        command: cfg.command.clone(),
        cap_s: cfg.cap.as_secs(),
        note: cfg.note.clone(),
        points,
        elapsed_s: started.elapsed().as_secs_f64(),
    })
}

fn measure(cfg: &ScaleConfig, env: &ModeEnv, n: usize, work: &Path) -> Result<ScalePoint> {
    let e = cfg.endpoints_per_service;
    let services = make_services(n, e);
    let mut point = ScalePoint { services: n, endpoints_per_service: e, ..Default::default() };

    // kube-proxy's rulesets first, while no agent runs.
    let (ipt, nft) = kube_proxy_loads(&services, work, cfg.cap)?;
    point.iptables_restore_ms = ipt;
    point.nft_ms = nft;

    let api = FakeApiServer::start_in(&env.node().path(), (Ipv4Addr::LOCALHOST, 0).into())?;
    api.create(&k8s::node(API_NODE))?;
    let t0 = Instant::now();
    let mut first_slice = None;
    for s in &services {
        let spec = spec(s);
        api.create(&k8s::service(&spec))?;
        for slice in k8s::slices(&spec, 1) {
            if first_slice.is_none() {
                first_slice = Some((spec.clone(), slice.clone()));
            }
            api.create(&slice)?;
        }
    }
    point.publish_s = t0.elapsed().as_secs_f64();
    let kubeconfig = work.join("kubeconfig");
    api.kubeconfig(&kubeconfig)?;
    let before_start = api.requests().len();

    let cgroup = Cgroup::new("bench-scale")?;
    let capacities = ((n as u32 * 5 / 4).max(16_384), ((n * e) as u32 * 5 / 4).max(131_072));
    let attach = agent::Attach {
        bpffs_dir: unique_bpffs_dir("kproxy-bench-scale"),
        cgroup: cgroup.path(),
        tc: false,
        capacities,
        healthz: Some(HEALTHZ),
        sync_period: SYNC_PERIOD,
    };
    let source = agent::Source::Apiserver { kubeconfig: &kubeconfig, node: API_NODE };
    let prober = Prober::start(env)?;
    let t0 = Instant::now();
    let mut agent = Agent::start(&cfg.kproxy, env, source, attach, work.join(format!("agent-scale-{n}.log")))?;
    let wait = Duration::from_secs(120 + n as u64 / 500);
    let (synced, seen) = agent.wait_synced(wait, |s| s.frontends == n)?;
    point.probes = prober.stop(seen);
    point.start_to_programmed_ms = ms(seen - t0);
    point.first_sync_ms = synced.sync_ms;
    point.first_total_ms = synced.total_ms;
    point.writes = synced.writes;
    // The initial lists: every list page of Services and EndpointSlices asked for since the
    // agent started (a watch carries `watch=1`).
    let last_list = api.requests_since(before_start).into_iter().filter(|r| {
        (r.path.ends_with("/services") || r.path.ends_with("/endpointslices")) && r.param("watch").is_none()
    });
    point.lists_to_programmed_ms = last_list.map(|r| r.at).max().map(|at| ms(seen.saturating_duration_since(at)));
    point.rss_kib = agent::rss(agent.pid())?.rss_kib;

    // Endpoint changes: the first Service's first endpoint moves to a spare address.
    let (spec0, mut slice) = first_slice.context("no service")?;
    for k in 0..cfg.changes {
        std::thread::sleep(CHANGE_SPACING);
        let endpoint = slice.endpoints.first_mut().context("an endpoint")?;
        endpoint.addresses = vec![spare_ip(k).to_string()];
        let t0 = Instant::now();
        api.apply(&slice).with_context(|| format!("changing an endpoint of {}", spec0.name))?;
        let (synced, seen) = agent.wait_synced(wait, |s| !s.full && s.changed_frontends >= 1)?;
        point.endpoint_change_ms.push(ms(seen - t0));
        point.endpoint_change_sync_ms.push(synced.sync_ms);
    }
    // The next full resync, with nothing changed since.
    let (synced, _) = agent.wait_synced(Duration::from_secs(60) + wait, |s| s.full)?;
    point.idle_full_resync_ms = Some(synced.sync_ms);
    let memory = agent::rss(agent.pid())?;
    point.rss_end_kib = memory.rss_kib;
    point.hwm_kib = memory.hwm_kib;
    agent.stop()?;
    Ok(point)
}

/// kube-proxy's full ruleset for `services`, timed into empty tables of a bare namespace with
/// `iptables-legacy-restore` and `nft -f`, each stopped at `cap` (`None`).
fn kube_proxy_loads(services: &[Svc], work: &Path, cap: Duration) -> Result<(Option<f64>, Option<f64>)> {
    let full = kubeproxy::iptables_sync(services, Scope::FULL);
    let file = work.join("scale-full.rules");
    fs::write(&file, &full.text)?;
    let bare = env::bare_netns()?;
    let ipt = crate::run::IPT.load_full_capped(&bare, work, &file, cap)?;
    match ipt {
        Some(t) => println!("    kube-proxy iptables: {} rules, iptables-legacy-restore {t:.0} ms", full.counts.total_rules()),
        None => println!("    kube-proxy iptables: {} rules, iptables-legacy-restore over {cap:?}, stopped", full.counts.total_rules()),
    }
    drop(full);
    let nft = kubeproxy::nft_full(services);
    let file = work.join("scale-full.nft");
    fs::write(&file, &nft.text)?;
    let bare = env::bare_netns()?;
    let mut cmd = std::process::Command::new("nft");
    cmd.arg("-f").arg(&file);
    let t0 = Instant::now();
    let nft_ms = match kproxy_e2e::topology::output_in(&bare, None, cmd, cap) {
        Ok(out) => {
            kproxy_e2e::cmd::check_output("nft", &out)?;
            Some(ms(t0.elapsed()))
        }
        Err(_) if t0.elapsed() >= cap => None,
        Err(e) => return Err(e),
    };
    match nft_ms {
        Some(t) => println!("    kube-proxy nftables: {} rules, nft -f {t:.0} ms", nft.counts.rules),
        None => println!("    kube-proxy nftables: {} rules, nft -f over {cap:?}, stopped", nft.counts.rules),
    }
    Ok((ipt, nft_ms))
}

/// `/healthz` and `/livez` of the agent under test, asked alternately every 20 ms from a thread
/// in the node's namespace, each with a 5 s timeout.
struct Prober {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(Instant, Option<f64>)>>,
}

/// Probes answered or not: (sent at, latency if answered). Until the server first answers,
/// nothing is recorded (it is not listening yet).
impl Prober {
    fn start(env: &ModeEnv) -> Result<Prober> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let netns = env.node().path();
        let thread = std::thread::Builder::new().name("bench-prober".into()).spawn(move || {
            kproxy_e2e::topology::in_netns(&netns, move || {
                let addr: SocketAddr = HEALTHZ.parse().expect("a socket address");
                let mut out = Vec::new();
                let mut listening = false;
                let mut k = 0usize;
                while !flag.load(Ordering::Relaxed) {
                    let path = if k.is_multiple_of(2) { "/healthz" } else { "/livez" };
                    k += 1;
                    let at = Instant::now();
                    match probe(addr, path) {
                        Some(()) => {
                            listening = true;
                            out.push((at, Some(ms(at.elapsed()))));
                        }
                        None if listening => out.push((at, None)),
                        None => {}
                    }
                    std::thread::sleep(Duration::from_millis(20).saturating_sub(at.elapsed()));
                }
                out
            })
            .unwrap_or_default()
        })?;
        Ok(Prober { stop, thread })
    }

    /// Stops probing; the probes sent before `until`.
    fn stop(self, until: Instant) -> Probes {
        self.stop.store(true, Ordering::Relaxed);
        let probes = self.thread.join().unwrap_or_default();
        let window: Vec<&(Instant, Option<f64>)> = probes.iter().filter(|(at, _)| *at <= until).collect();
        let mut answered: Vec<f64> = window.iter().filter_map(|(_, l)| *l).collect();
        answered.sort_by(f64::total_cmp);
        let pick = |q: f64| answered.get(((answered.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(0.0);
        Probes {
            sent: window.len(),
            answered: answered.len(),
            p50_ms: pick(0.5),
            p99_ms: pick(0.99),
            max_ms: answered.last().copied().unwrap_or(0.0),
        }
    }
}

/// One HTTP/1.1 GET of `path`; Some when a status line came back within 5 s.
fn probe(addr: SocketAddr, path: &str) -> Option<()> {
    let timeout = Duration::from_secs(5);
    let mut s = TcpStream::connect_timeout(&addr, timeout).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    s.set_write_timeout(Some(timeout)).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n").ok()?;
    let mut buf = [0u8; 12];
    s.read_exact(&mut buf).ok()?;
    buf.starts_with(b"HTTP/1.1 ").then_some(())
}

fn print_point(p: &ScalePoint) {
    println!(
        "    kproxy: start -> programmed {:.0} ms, lists -> programmed {}, first sync {:.0} ms ({} writes); \
         probes {}/{} answered, p50 {:.1} ms, max {:.1} ms; RSS {} KiB (end {} KiB, peak {} KiB); \
         endpoint change {:?} ms; idle full resync {:?} ms",
        p.start_to_programmed_ms,
        p.lists_to_programmed_ms.map_or("-".into(), |t| format!("{t:.0} ms")),
        p.first_sync_ms,
        p.writes,
        p.probes.answered,
        p.probes.sent,
        p.probes.p50_ms,
        p.probes.max_ms,
        p.rss_kib,
        p.rss_end_kib,
        p.hwm_kib,
        p.endpoint_change_ms.iter().map(|t| (t * 10.0).round() / 10.0).collect::<Vec<_>>(),
        p.idle_full_resync_ms.map(|t| (t * 10.0).round() / 10.0),
    );
}

fn median(v: &[f64]) -> Option<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    (!v.is_empty()).then(|| if v.len() % 2 == 1 { v[v.len() / 2] } else { (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0 })
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

fn capped(t: Option<f64>, cap_s: u64) -> String {
    t.map_or(format!("over {cap_s} s (capped)"), |t| format!("{:.2} s", t / 1e3))
}

/// `docs/scale.md`.
pub fn render(r: &ScaleResults) -> String {
    let mut md = String::new();
    md.push_str("# kproxy at scale: 10,000 to 100,000 Services\n\n");
    md.push_str(&format!(
        "Generated by `{}` on {} ({:.0} s), {} build of kproxy commit {}. Load average (1, 5, 15 min) at the start: {}; at the end: {}.{}\n\n",
        r.command,
        r.machine.date,
        r.elapsed_s,
        r.profile,
        r.machine.kproxy_commit,
        r.machine.load_start,
        r.machine.load_end,
        r.note.as_ref().map_or(String::new(), |n| format!(" {n}"))
    ));
    md.push_str(&format!(
        "{} cores, {:.0} GiB, kernel {}. Method: `kproxy-bench/src/scale.rs` (its module doc): ClusterIP Services × endpoints \
         on the fake apiserver (real HTTP list and watch, pages of 500), one agent with its socket programs on a cgroup of its \
         own and no tc programs, `--sync-period {SYNC_PERIOD}`; one measurement per N (seconds and MiB, far above the noise). \
         kube-proxy's full ruleset for the same Services is loaded with `iptables-legacy-restore` and `nft -f` into empty tables, \
         each stopped at {} s.\n\n",
        r.machine.nproc, r.machine.memory_gib, r.machine.kernel, r.cap_s
    ));
    md.push_str("| N × endpoints | start → programmed | lists complete → programmed | first sync (agent) | probes answered during start-up (p50 / p99 / max) | RSS programmed / later / peak | one endpoint change (median; agent's sync) | idle full resync | kube-proxy iptables-legacy-restore | kube-proxy nft -f |\n");
    md.push_str("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
    for p in &r.points {
        md.push_str(&format!(
            "| {} × {} | {:.2} s | {} | {:.2} s ({} writes) | {}/{} ({:.1} / {:.1} / {:.1} ms) | {} / {} / {} MiB | {} ms ({} ms) | {} | {} | {} |\n",
            p.services,
            p.endpoints_per_service,
            p.start_to_programmed_ms / 1e3,
            p.lists_to_programmed_ms.map_or("–".into(), |t| format!("{:.2} s", t / 1e3)),
            p.first_sync_ms / 1e3,
            p.writes,
            p.probes.answered,
            p.probes.sent,
            p.probes.p50_ms,
            p.probes.p99_ms,
            p.probes.max_ms,
            mib(p.rss_kib),
            mib(p.rss_end_kib),
            mib(p.hwm_kib),
            median(&p.endpoint_change_ms).map_or("–".into(), |t| format!("{t:.1}")),
            median(&p.endpoint_change_sync_ms).map_or("–".into(), |t| format!("{t:.1}")),
            p.idle_full_resync_ms.map_or("–".into(), |t| format!("{:.0} ms ({:.1} ms per 10,000)", t, t * 1e4 / p.services as f64)),
            capped(p.iptables_restore_ms, r.cap_s),
            capped(p.nft_ms, r.cap_s),
        ));
    }
    md.push_str(
        "\nIssue 14's targets: every probe answered within 50 ms during any sync; RSS at most 32 MiB at 10,000 × 10 and 250 MiB \
         at 100,000, the peak at most 1.25 × the steady figure; 100,000 × 10 programmed within 2 s of the lists completing; one \
         endpoint change within 5 ms at 100,000; an idle full resync at most 50 ms per 10,000 services.\n",
    );
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_address_plan_holds_100000_services_of_10_endpoints_without_overlap() {
        let last_cluster_ip = cluster_ip(99_999);
        assert!(u32::from(last_cluster_ip) < u32::from(Ipv4Addr::new(10, 112, 0, 0)), "in 10.96.0.0/12: {last_cluster_ip}");
        let last_endpoint = endpoint_ip(99_999, 9, 10);
        assert!(u32::from(last_endpoint) < u32::from(spare_ip(0)), "{last_endpoint} below the spares");
        assert_eq!(endpoint_ip(1, 0, 10), Ipv4Addr::new(10, 128, 0, 10));
    }

    #[test]
    fn the_report_marks_capped_loads_and_gives_the_resync_per_10000() {
        let r = ScaleResults {
            machine: Machine { nproc: 2, ..Default::default() },
            profile: "release".into(),
            command: "cargo xtask bench --scale 100000".into(),
            cap_s: 60,
            note: None,
            points: vec![ScalePoint {
                services: 100_000,
                endpoints_per_service: 10,
                idle_full_resync_ms: Some(500.0),
                iptables_restore_ms: None,
                nft_ms: Some(12_345.0),
                endpoint_change_ms: vec![3.0, 1.0, 2.0],
                ..Default::default()
            }],
            elapsed_s: 1.0,
        };
        let md = render(&r);
        assert!(md.contains("over 60 s (capped)"), "{md}");
        assert!(md.contains("12.35 s"), "{md}");
        assert!(md.contains("500 ms (50.0 ms per 10,000)"), "{md}");
        assert!(md.contains("| 2.0 ms"), "median of the changes: {md}");
    }
}
