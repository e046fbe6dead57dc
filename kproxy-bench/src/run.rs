//! The benchmark itself: for each N, program the services in every mode (timing it), check that
//! every mode reaches the pods, measure the data path in interleaved rounds (ClusterIP from the
//! node, NodePort from outside), measure the tc programs' per-packet cost, time endpoint
//! changes, and record the agent's footprint.

use std::collections::BTreeMap;
use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use super::agent::{self, Agent};
use super::cost::Meter;
use super::env::{self, Access, Mode, ModeEnv, BLOCK_SIZE, EXT_IP, POD_PORT, SERVICE_PORT};
use super::kubeproxy::{self, Scope, Svc, NODE_ADDRESS};
use super::load::{self, Workload, WrkSettings};
use super::results::{
    summarize, ChangeTimes, ControlPlane, Footprint, Machine, Point, Results, Sample, Settings, TcCost,
};
use kproxy_e2e::harness::unique_bpffs_dir;
use kproxy_e2e::fake_apiserver::FakeApiServer;
use kproxy_e2e::k8s;
use kproxy_e2e::manifest::{self, Protocol, ServiceSpec};
use kproxy_e2e::topology::{unique_name, Cgroup, Netns};
use kproxy_e2e::interrupt;

/// What to run.
#[derive(Debug, Clone)]
pub struct Config {
    pub quick: bool,
    pub services: Vec<usize>,
    pub endpoints_per_service: usize,
    pub pods: usize,
    pub rounds: usize,
    pub wrk: WrkSettings,
    pub sequential: u32,
    pub changes: usize,
    pub kproxy: PathBuf,
    pub testpod: PathBuf,
    pub profile: String,
    pub command: String,
    /// How long iptables-nft-restore may take to load the full ruleset.
    pub iptables_nft_cap: Duration,
    /// `kproxy tc-cost`: rounds after each data-path round, and runs per case and round.
    pub tc_rounds: usize,
    pub tc_runs: u32,
    /// `--note`, recorded in the results.
    pub note: Option<String>,
}

/// Requests of the correctness probe before and after measuring.
const PROBE_REQUESTS: u32 = 20;
/// The agent applies an isolated change at once only if its token bucket (kube-proxy's burst of
/// 2, one token per `--min-sync-period` = 1 s) has a token: changes are spaced this much.
const CHANGE_SPACING: Duration = Duration::from_millis(1100);
/// kproxy's default map capacities (kept unless N needs more).
const DEFAULT_MAX_SERVICES: u32 = 16_384;
const DEFAULT_MAX_BACKENDS: u32 = 131_072;
/// kube-proxy's endpoint changes are not repeated once one takes longer than this.
const KUBE_SLOW_CHANGE: Duration = Duration::from_secs(10);
/// Endpoint blocks are shared by services and the spare addresses of endpoint changes.
const SPARES: u32 = 1000;
/// Service `i` has NodePort `NODE_PORT_BASE + i` (beyond the default range 30000-32767 from
/// N = 2,768 on, as with a wider `--service-node-port-range`).
const NODE_PORT_BASE: u16 = 30_000;

/// The ClusterIP of service `i`.
fn cluster_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 10)) + i as u32)
}

/// Endpoint `j` of service `i`: on pod `j % pods`, at index `i * per_service + j` of its block.
fn endpoint_ip(i: usize, j: usize, per_service: usize, pods: usize) -> Ipv4Addr {
    let (block, _) = env::pod_block(j % pods);
    Ipv4Addr::from(u32::from(block) + (i * per_service + j) as u32)
}

/// The `k`-th spare address (pod 0, from the top of its block).
fn spare_ip(k: usize) -> Ipv4Addr {
    let (block, _) = env::pod_block(0);
    Ipv4Addr::from(u32::from(block) + BLOCK_SIZE - 1 - k as u32)
}

pub fn make_services(n: usize, per_service: usize, pods: usize) -> Vec<Svc> {
    (0..n)
        .map(|i| Svc {
            name: format!("svc-{i}"),
            cluster_ip: cluster_ip(i),
            port: SERVICE_PORT,
            node_port: NODE_PORT_BASE + i as u16,
            target_port: POD_PORT,
            endpoints: (0..per_service)
                .map(|j| endpoint_ip(i, j, per_service, pods))
                .collect(),
        })
        .collect()
}

/// One service: a NodePort Service and its EndpointSlice.
fn service_spec(s: &Svc, pods: usize) -> ServiceSpec {
    let mut spec = ServiceSpec::new(&s.name, s.cluster_ip, s.port, kubeproxy::PORT_NAME, Protocol::Tcp, s.target_port)
        .node_port(s.node_port);
    spec.namespace = kubeproxy::NAMESPACE.to_string();
    for (j, &ip) in s.endpoints.iter().enumerate() {
        spec = spec.endpoint(&format!("pod-{}", j % pods), ip, true);
    }
    spec
}

/// One service as kproxy's `--manifests` reads it.
fn manifest_yaml(s: &Svc, pods: usize) -> String {
    manifest::to_yaml(&[service_spec(s, pods)])
}

/// The Node the agent on the fake apiserver runs as.
const API_NODE: &str = "bench-node";

/// kproxy programming `services` from an apiserver, the source it has in a cluster: a fake
/// apiserver (real HTTP list and watch, in the node namespace) holds the Services and their
/// EndpointSlices, and an agent is started on it, with its socket programs on a cgroup of its
/// own and no tc programs, so that the data path's agent is untouched. Returns agent start →
/// `synced` with every frontend, the agent's own figures, and its memory then.
fn kproxy_from_apiserver(
    cfg: &Config,
    env: &ModeEnv,
    services: &[Svc],
    frontends: usize,
    capacities: (u32, u32),
    work: &Path,
) -> Result<(f64, agent::Synced, agent::Rss)> {
    let api = FakeApiServer::start_in(&env.node().path(), (Ipv4Addr::LOCALHOST, 0).into())?;
    api.create(&k8s::node(API_NODE))?;
    for s in services {
        let spec = service_spec(s, cfg.pods);
        api.create(&k8s::service(&spec))?;
        for slice in k8s::slices(&spec, 1) {
            api.create(&slice)?;
        }
    }
    let kubeconfig = work.join("kubeconfig");
    api.kubeconfig(&kubeconfig)?;
    let cgroup = Cgroup::new("bench-api")?;
    let attach = agent::Attach {
        bpffs_dir: unique_bpffs_dir("kproxy-bench-api"),
        cgroup: cgroup.path(),
        tc: false,
        capacities,
        healthz: None,
        sync_period: agent::LONG_SYNC_PERIOD,
    };
    let source = agent::Source::Apiserver { kubeconfig: &kubeconfig, node: API_NODE };
    let log = work.join(format!("agent-api-{}.log", services.len()));
    let t0 = Instant::now();
    let mut agent = Agent::start(&cfg.kproxy, env, source, attach, log)?;
    let wait = Duration::from_secs(60 + services.len() as u64 / 100);
    let (synced, seen) = agent.wait_synced(wait, |s| s.frontends == frontends)?;
    let memory = agent::rss(agent.pid())?;
    agent.stop()?;
    Ok((ms(seen - t0), synced, memory))
}

/// A directory removed on drop.
struct WorkDir(PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn timed<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, f64)> {
    let started = Instant::now();
    let value = f()?;
    Ok((value, ms(started.elapsed())))
}

/// Whether `program` can be started.
fn have(program: &str) -> bool {
    std::process::Command::new(program)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok()
}

pub fn run(cfg: &Config) -> Result<Results> {
    let started = Instant::now();
    let load_start = super::results::load_average();
    for tool in ["wrk", "iptables-legacy-restore", "iptables-nft-restore", "nft"] {
        ensure!(have(tool), "`{tool}` is missing: run `cargo xtask setup`");
    }
    let max_n = cfg.services.iter().copied().max().unwrap_or(0);
    ensure!(
        ((max_n * cfg.endpoints_per_service) as u32) < BLOCK_SIZE - SPARES,
        "at most {} endpoints fit the address plan",
        BLOCK_SIZE - SPARES
    );
    ensure!(cfg.pods >= 1 && cfg.pods <= 8, "1 to 8 pods per mode");
    ensure!(max_n <= usize::from(u16::MAX - NODE_PORT_BASE), "at most {} services get a NodePort", u16::MAX - NODE_PORT_BASE);
    let work = WorkDir(std::env::temp_dir().join(unique_name("kproxy-bench")));
    fs::create_dir_all(&work.0)?;

    println!(
        "==> building {} environments (node namespace, {} pods with kproxy-testpod, client cgroup)",
        Mode::ALL.len(),
        cfg.pods
    );
    let mut envs = BTreeMap::new();
    for mode in Mode::ALL {
        envs.insert(mode, ModeEnv::new(mode, cfg.pods, &cfg.testpod)?);
    }

    let mut points = Vec::new();
    // iptables-nft-restore grows faster than N: once over the cap, it is not run for larger N.
    let mut nft_restore_capped = false;
    let mut services = cfg.services.clone();
    services.sort_unstable();
    for n in services {
        interrupt::check()?;
        let point = measure_point(cfg, &envs, n, &work.0, &mut nft_restore_capped)
            .with_context(|| format!("benchmarking N = {n}"))?;
        print_point(&point);
        points.push(point);
    }
    Ok(Results {
        machine: Machine { load_start, ..Machine::detect() },
        settings: Settings {
            quick: cfg.quick,
            services: cfg.services.clone(),
            endpoints_per_service: cfg.endpoints_per_service,
            pods_per_mode: cfg.pods,
            rounds: cfg.rounds,
            wrk: cfg.wrk,
            sequential_requests: cfg.sequential,
            endpoint_changes: cfg.changes,
            profile: cfg.profile.clone(),
            command: cfg.command.clone(),
            iptables_nft_cap_s: cfg.iptables_nft_cap.as_secs(),
            tc_rounds: cfg.tc_rounds,
            tc_runs: cfg.tc_runs,
            note: cfg.note.clone(),
        },
        kube_proxy_commit: kubeproxy::KUBE_PROXY_COMMIT.to_string(),
        points,
        elapsed_s: started.elapsed().as_secs_f64(),
    })
}

const EMPTY_TABLES: &str = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n\
*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n";

/// iptables commands of one back end.
pub(crate) struct Ipt {
    restore: &'static str,
    save: &'static str,
}

/// The back end of the iptables mode's data path.
pub(crate) const IPT: Ipt = Ipt {
    restore: "iptables-legacy-restore",
    save: "iptables-legacy-save",
};
/// The nf_tables back end (this machine's default `iptables`), timed for programming only.
const IPT_NFT: Ipt = Ipt {
    restore: "iptables-nft-restore",
    save: "iptables-nft-save",
};

impl Ipt {
    fn reset(&self, netns: &Netns, work: &Path) -> Result<()> {
        let file = work.join("empty.rules");
        fs::write(&file, EMPTY_TABLES)?;
        env::run_in(netns, self.restore, &["-w", "5"], Some(&file)).map(drop)
    }

    fn restore(&self, netns: &Netns, file: &Path) -> Result<f64> {
        timed(|| env::run_in(netns, self.restore, &["-w", "5", "--noflush", "--counters"], Some(file)))
            .map(|(_, t)| t)
    }

    /// [`Ipt::load_full`] into a fresh namespace, given up (`None`) after `cap`.
    pub(crate) fn load_full_capped(&self, netns: &Netns, work: &Path, full: &Path, cap: Duration) -> Result<Option<f64>> {
        self.reset(netns, work)?;
        let jumps = work.join("jumps.rules");
        fs::write(&jumps, kubeproxy::iptables_jumps().text)?;
        env::run_in(netns, self.restore, &["-w", "5", "--noflush"], Some(&jumps))?;
        let mut cmd = std::process::Command::new(self.restore);
        cmd.args(["-w", "5", "--noflush", "--counters"])
            .stdin(std::process::Stdio::from(fs::File::open(full)?));
        let t0 = Instant::now();
        match kproxy_e2e::topology::output_in(netns, None, cmd, cap) {
            Ok(out) => {
                kproxy_e2e::cmd::check_output(self.restore, &out)?;
                Ok(Some(ms(t0.elapsed())))
            }
            Err(_) if t0.elapsed() >= cap => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Rules loaded in (nat, filter).
    fn loaded(&self, netns: &Netns) -> Result<(usize, usize)> {
        let count = |table: &str| -> Result<usize> {
            let out = env::run_in(netns, self.save, &["-t", table], None)?;
            Ok(out.lines().filter(|l| l.starts_with("-A ")).count())
        };
        Ok((count("nat")?, count("filter")?))
    }

    /// From empty tables: jump rules (untimed, as kube-proxy's start-up), then the full ruleset
    /// (timed).
    fn load_full(&self, netns: &Netns, work: &Path, full: &Path) -> Result<f64> {
        self.reset(netns, work)?;
        let jumps = work.join("jumps.rules");
        fs::write(&jumps, kubeproxy::iptables_jumps().text)?;
        env::run_in(netns, self.restore, &["-w", "5", "--noflush"], Some(&jumps))?;
        self.restore(netns, full)
    }
}

fn measure_point(
    cfg: &Config,
    envs: &BTreeMap<Mode, ModeEnv>,
    n: usize,
    work: &Path,
    nft_restore_capped: &mut bool,
) -> Result<Point> {
    let e = cfg.endpoints_per_service;
    println!("\n==> N = {n} services x {e} endpoints");
    let services = make_services(n, e, cfg.pods);
    let mut control = ControlPlane::default();

    // kube-proxy, iptables mode: the data path runs on the legacy back end (x_tables);
    // iptables-nft-restore of the same ruleset is timed in a namespace of its own, capped.
    let ipt_env = &envs[&Mode::Iptables];
    let full = kubeproxy::iptables_sync(&services, Scope::FULL);
    let full_file = work.join("full.rules");
    fs::write(&full_file, &full.text)?;
    control.iptables_restore_ms = IPT.load_full(ipt_env.node(), work, &full_file)?;
    let jumps = kubeproxy::iptables_jumps().counts.jump_rules;
    let loaded = IPT.loaded(ipt_env.node())?;
    ensure!(
        loaded.0 + loaded.1 == full.counts.total_rules() + jumps,
        "iptables-save lists {loaded:?} (nat, filter) rules, the ruleset has {} + {jumps} jumps",
        full.counts.total_rules()
    );
    println!(
        "    iptables: {} rules ({} nat, {} filter, {jumps} jumps), {} chains, {} KiB; \
         iptables-legacy-restore {:.0} ms",
        full.counts.total_rules() + jumps,
        full.counts.nat_rules,
        full.counts.filter_rules,
        full.counts.chains,
        full.counts.bytes / 1024,
        control.iptables_restore_ms
    );
    if *nft_restore_capped {
        println!("    iptables-nft-restore: not run (over {:?} at a smaller N)", cfg.iptables_nft_cap);
    } else {
        let bare = env::bare_netns()?;
        control.iptables_nft_restore_ms = IPT_NFT.load_full_capped(&bare, work, &full_file, cfg.iptables_nft_cap)?;
        match control.iptables_nft_restore_ms {
            Some(t) => println!("    iptables-nft-restore {t:.0} ms"),
            None => println!("    iptables-nft-restore: over {:?}, stopped", cfg.iptables_nft_cap),
        }
        *nft_restore_capped = control.iptables_nft_restore_ms.is_none();
    }

    // kube-proxy, nftables mode.
    let nft_env = &envs[&Mode::Nftables];
    let _ = nft_env.node_command("nft", &["delete", "table", "ip", "kube-proxy"], None);
    let nft = kubeproxy::nft_full(&services);
    let nft_file = work.join("full.nft");
    fs::write(&nft_file, &nft.text)?;
    control.nft_ms = timed(|| nft_env.node_command("nft", &["-f", &nft_file.display().to_string()], None))?.1;
    println!(
        "    nftables: {} chains, {} rules, {} map + {} set elements, {} KiB; nft -f {:.0} ms",
        nft.counts.chains,
        nft.counts.rules,
        nft.counts.map_elements,
        nft.counts.set_elements,
        nft.counts.bytes / 1024,
        control.nft_ms
    );

    // kproxy.
    let kp_env = &envs[&Mode::Kproxy];
    let manifests = work.join(format!("manifests-{n}"));
    fs::create_dir_all(&manifests)?;
    let manifest = Manifest {
        root: manifests.clone(),
        work: work.to_path_buf(),
        pods: cfg.pods,
    };
    let staged = manifest.stage_all(&services)?;
    manifest.publish_all(&staged)?;
    // kproxy serves each NodePort on every address of the node (its default, as kube-proxy's
    // iptables mode): N ClusterIP frontends plus N per node address.
    let frontends = n * (1 + kp_env.node_addresses()?.len());
    // The services map holds a frontend entry and a slot per backend for every frontend, and is
    // sized max_services + max_backends: with each backend behind three frontends, max_backends
    // is raised beyond the number of distinct backends to fit the slots.
    let max_services = (frontends as u32 * 5 / 4).max(DEFAULT_MAX_SERVICES);
    let slots = (frontends * (1 + e)) as u32 * 5 / 4;
    let capacities = (
        max_services,
        ((n * e) as u32 * 5 / 4).max(slots.saturating_sub(max_services)).max(DEFAULT_MAX_BACKENDS),
    );
    let (api_ms, api_synced, api_memory) = kproxy_from_apiserver(cfg, kp_env, &services, frontends, capacities, work)
        .context("kproxy on the fake apiserver")?;
    control.kproxy_api_start_ms = Some(api_ms);
    control.kproxy_api_total_ms = Some(api_synced.total_ms);
    control.kproxy_api_sync_ms = Some(api_synced.sync_ms);
    println!(
        "    kproxy on an apiserver: start -> programmed {api_ms:.0} ms (sync {:.1} ms of {:.0} ms); RSS {} KiB, peak {} KiB",
        api_synced.sync_ms, api_synced.total_ms, api_memory.rss_kib, api_memory.hwm_kib
    );

    let wait = Duration::from_secs(60 + n as u64 / 100);
    let t0 = Instant::now();
    let attach = agent::Attach {
        bpffs_dir: unique_bpffs_dir("kproxy-bench"),
        cgroup: kp_env.cgroup.path(),
        tc: true,
        capacities,
        healthz: None,
        sync_period: agent::LONG_SYNC_PERIOD,
    };
    let source = agent::Source::Manifests(&manifests);
    let mut agent = Agent::start(&cfg.kproxy, kp_env, source, attach, work.join(format!("agent-{n}.log")))?;
    let (synced, seen) = agent.wait_synced(wait, |s| s.frontends == frontends)?;
    control.kproxy_start_ms = ms(seen - t0);
    control.kproxy_start_total_ms = synced.total_ms;
    control.kproxy_start_sync_ms = synced.sync_ms;
    control.kproxy_start_writes = synced.writes;
    let (dump, dump_took) = agent.dump()?;
    control.kproxy_dump_ms = ms(dump_took);
    check_dump(&dump, &services, frontends)?;
    let mut footprint = Footprint {
        agent: agent::rss(agent.pid())?,
        agent_api: Some(api_memory),
        maps: agent::bpf_maps(agent.pid())?,
        capacities,
        ..Default::default()
    };
    footprint.map_memlock_bytes = footprint.maps.iter().map(|m| m.memlock).sum();
    // Programming from nothing with the agent running: remove every manifest, then write them
    // again.
    manifest.clear()?;
    agent.wait_synced(wait, |s| s.frontends == 0)?;
    std::thread::sleep(CHANGE_SPACING);
    let staged = manifest.stage_all(&services)?;
    let t0 = Instant::now();
    manifest.publish_all(&staged)?;
    let (synced, seen) = agent.wait_synced(wait, |s| s.frontends == frontends)?;
    let mut last_sync = seen;
    control.kproxy_write_ms = ms(seen - t0);
    control.kproxy_write_total_ms = synced.total_ms;
    control.kproxy_write_sync_ms = synced.sync_ms;
    check_dump(&agent.dump()?.0, &services, frontends)?;
    println!(
        "    kproxy: start -> programmed {:.0} ms (sync {:.1} ms of {:.0} ms); manifest written -> \
         programmed {:.0} ms (sync {:.1} ms); RSS {} KiB, BPF maps {} KiB",
        control.kproxy_start_ms,
        control.kproxy_start_sync_ms,
        control.kproxy_start_total_ms,
        control.kproxy_write_ms,
        control.kproxy_write_sync_ms,
        footprint.agent.rss_kib,
        footprint.map_memlock_bytes / 1024
    );

    // Every mode reaches the pods, through every target.
    let targets: Vec<(Access, Vec<Target>)> =
        Access::ALL.into_iter().map(|a| (a, targets(a, &services, envs))).collect();
    for (access, targets) in &targets {
        for (mode, name, addr) in targets {
            probe(&envs[mode], *access, &cfg.testpod, addr, cfg.pods)
                .with_context(|| format!("{} to the {name} {} target ({addr})", mode.name(), access.name()))?;
        }
    }
    println!("    probes: every mode reaches the pods through every target, from the node and from outside");

    // The data path, in interleaved rounds, each followed by rounds of the tc programs'
    // per-packet cost (so that those are spread over the point's minutes too).
    let mut samples = Vec::new();
    let mut tc: Option<TcCost> = None;
    for round in 0..cfg.rounds {
        print!("    round {}/{}:", round + 1, cfg.rounds);
        let round_started = Instant::now();
        for (access, targets) in &targets {
            for workload in Workload::ALL {
                for (slot_index, slot) in ["first", "last"].into_iter().enumerate() {
                    if slot == "last" && n == 1 {
                        continue; // one service: "last" is "first"
                    }
                    // No proxy has a single target; it is measured in both slots, so that it is
                    // interleaved with the others as often as they are with each other.
                    let mut order: Vec<&Target> =
                        targets.iter().filter(|(m, t, _)| t == slot || *m == Mode::None).collect();
                    let shift = (round + slot_index) % order.len();
                    order.rotate_left(shift);
                    for (mode, target, addr) in order {
                        let env = &envs[mode];
                        let meter = Meter {
                            client: env.client_cgroup(*access).path(),
                            server: env.server_cgroup.path(),
                            agent: (*mode == Mode::Kproxy).then(|| agent.pid()),
                        };
                        let (wrk, cpu) = meter.measure(|| load::wrk(env, *access, addr, workload, cfg.wrk))?;
                        if wrk.errors > 0 {
                            print!(
                                " [{} {} {}: {} errors, {} connect: run excluded]",
                                access.name(),
                                mode.name(),
                                workload.name(),
                                wrk.errors,
                                wrk.connect_errors
                            );
                        }
                        let seq = load::sequential(env, *access, &cfg.testpod, addr, workload, cfg.sequential)?;
                        samples.push(Sample {
                            round,
                            access: *access,
                            mode: *mode,
                            target: target.clone(),
                            workload,
                            slot: slot_index,
                            wrk,
                            seq,
                            cpu: Some(cpu),
                        });
                    }
                }
                print!(" {}/{}", access.name(), workload.name());
            }
        }
        println!(" ({:.0} s)", round_started.elapsed().as_secs_f64());
        let more = tc_cost(cfg, kp_env, &manifests, &services, capacities)?;
        match &mut tc {
            Some(tc) => tc.rounds.extend(more.rounds),
            None => tc = Some(more),
        }
    }
    let tc = tc.context("no data-path round")?;
    println!(
        "    tc per packet, ns: repeat: empty {:.1}, ingress tracked {:.1}, not a frontend {:.1}, egress reply {:.1}, \
         untracked {:.1}; single runs: empty {:.0}, new flow {:.0}, tracked {:.0} (self-mapped {:.0})",
        tc.median(|r| r.empty_ns),
        tc.median(|r| r.ingress_tracked_ns),
        tc.median(|r| r.ingress_not_frontend_ns),
        tc.median(|r| r.egress_reply_ns),
        tc.median(|r| r.egress_untracked_ns),
        tc.median(|r| r.empty_single_ns),
        tc.median(|r| r.ingress_new_flow_single_ns),
        tc.median(|r| r.ingress_tracked_single_ns),
        tc.median(|r| r.ingress_tracked_self_single_ns),
    );

    // One endpoint change with N services programmed.
    let mut change = ChangeTimes::default();
    let last = n - 1;
    let mut kp_state = services.clone();
    let mut ipt_state = services.clone();
    let mut nft_state = services.clone();
    let mut spare = 0;
    let mut next_spare = |svc: &Svc| {
        let mut new = svc.clone();
        new.endpoints[0] = spare_ip(spare);
        spare += 1;
        new
    };
    // kube-proxy's changes are repeated while one takes under KUBE_SLOW_CHANGE (at large N a
    // single one takes tens of seconds); its full restore is timed on the first change only.
    let mut kube_slow = false;
    for repetition in 0..cfg.changes {
        interrupt::check()?;
        let new = next_spare(&kp_state[last]);
        // kproxy: the manifest is staged first; the clock starts at the rename.
        kp_state[last] = new.clone();
        let (staged, target) = manifest.stage_one(&kp_state[last])?;
        if let Some(wait_more) = CHANGE_SPACING.checked_sub(last_sync.elapsed()) {
            std::thread::sleep(wait_more);
        }
        let t0 = Instant::now();
        fs::rename(&staged, &target)?;
        let (synced, seen) = agent.wait_synced(wait, |_| true)?;
        last_sync = seen;
        change.kproxy_e2e_ms.push(ms(seen - t0));
        change.kproxy_total_ms.push(synced.total_ms);
        change.kproxy_sync_ms.push(synced.sync_ms);
        change.kproxy_writes.push(synced.writes);
        let (dump, _) = agent.dump()?;
        let programmed = dump.service(&new.name).map(|s| s.backends.clone()).unwrap_or_default();
        ensure!(
            programmed.contains(&new.endpoint(new.endpoints[0])),
            "kproxy did not program the new endpoint {} of {}: {programmed:?}",
            new.endpoints[0],
            new.name
        );
        if kube_slow {
            continue;
        }
        let kube_started = Instant::now();

        // iptables: kube-proxy's partial restore.
        let new = next_spare(&ipt_state[last]);
        let stale = kubeproxy::stale_sep_chains(&ipt_state[last], &new);
        ipt_state[last] = new;
        change
            .iptables_partial_ms
            .push(iptables_change(ipt_env, &ipt_state, Some(&[last]), &stale, work)?);

        // nftables: kube-proxy's partial transaction, and the listings before it.
        let new = next_spare(&nft_state[last]);
        let tx = kubeproxy::nft_partial(&nft_state[last], &new);
        nft_state[last] = new;
        let tx_file = work.join("partial.nft");
        fs::write(&tx_file, &tx.text)?;
        let t0 = Instant::now();
        nft_env.node_command("nft", &["--json", "list", "chains", "ip"], None)?;
        nft_env.node_command("nft", &["--json", "list", "sets", "ip"], None)?;
        let t1 = Instant::now();
        nft_env.node_command("nft", &["-f", &tx_file.display().to_string()], None)?;
        change.nft_tx_ms.push(ms(t1.elapsed()));
        change.nft_with_list_ms.push(ms(t0.elapsed()));
        kube_slow = kube_started.elapsed() > KUBE_SLOW_CHANGE;

        // iptables again, with a full restore (kube-proxy's full sync).
        if repetition == 0 {
            let new = next_spare(&ipt_state[last]);
            let stale = kubeproxy::stale_sep_chains(&ipt_state[last], &new);
            ipt_state[last] = new;
            change
                .iptables_full_ms
                .push(iptables_change(ipt_env, &ipt_state, None, &stale, work)?);
        }
    }
    if cfg.changes > 0 {
        for (mode, state) in [(Mode::Kproxy, &kp_state), (Mode::Iptables, &ipt_state), (Mode::Nftables, &nft_state)] {
            let addr = format!("{}:{}", state[last].cluster_ip, SERVICE_PORT);
            probe(&envs[&mode], Access::ClusterIp, &cfg.testpod, &addr, cfg.pods)
                .with_context(|| format!("{} after the endpoint changes", mode.name()))?;
        }
    }
    control.change = change;
    footprint.agent_end = agent::rss(agent.pid())?;
    footprint.conntrack_iptables = ipt_env.node_sysctl("net.netfilter.nf_conntrack_count");
    footprint.conntrack_nftables = nft_env.node_sysctl("net.netfilter.nf_conntrack_count");
    agent.stop()?;

    let summaries = summarize(&samples);
    Ok(Point {
        services: n,
        endpoints: n * e,
        iptables: kubeproxy::IptablesCounts {
            jump_rules: jumps,
            ..full.counts
        },
        iptables_loaded: loaded,
        nft: nft.counts,
        control,
        footprint,
        tc: Some(tc),
        samples,
        summaries,
    })
}

/// One iptables endpoint change as kube-proxy syncs it: outside large cluster mode it first
/// lists the nat table (`iptables-save`) to find stale chains; then one restore.
fn iptables_change(
    env: &ModeEnv,
    services: &[Svc],
    changed: Option<&[usize]>,
    stale: &[String],
    work: &Path,
) -> Result<f64> {
    let large = kubeproxy::large_cluster_mode(services);
    let stale: &[String] = if large { &[] } else { stale };
    let restore = kubeproxy::iptables_sync(services, Scope { changed, stale });
    let file = work.join("change.rules");
    fs::write(&file, &restore.text)?;
    let t0 = Instant::now();
    if !large {
        env.node_command(IPT.save, &["-t", "nat"], None)?;
    }
    env.node_command(IPT.restore, &["-w", "5", "--noflush", "--counters"], Some(&file))?;
    Ok(ms(t0.elapsed()))
}

/// The manifests: a watched directory whose `set/` subdirectory holds one file per service
/// (its Service and EndpointSlice), as a directory applied with `kubectl apply -f` would. A
/// whole set is published by renaming a staged directory into place (one atomic event), a
/// single file by renaming a staged file over it.
struct Manifest {
    root: PathBuf,
    work: PathBuf,
    pods: usize,
}

impl Manifest {
    fn set(&self) -> PathBuf {
        self.root.join("set")
    }

    fn file_name(svc: &Svc) -> String {
        format!("{}.yaml", svc.name)
    }

    /// Writes every file of `services` into a staged directory (returned).
    fn stage_all(&self, services: &[Svc]) -> Result<PathBuf> {
        let dir = self.work.join(unique_name("staged-set"));
        fs::create_dir_all(&dir)?;
        for svc in services {
            fs::write(dir.join(Self::file_name(svc)), manifest_yaml(svc, self.pods))?;
        }
        Ok(dir)
    }

    fn publish_all(&self, staged: &Path) -> Result<()> {
        fs::rename(staged, self.set()).with_context(|| format!("renaming to {}", self.set().display()))
    }

    /// Removes every service (the set leaves the watched directory in one rename). The set is
    /// deleted with the work directory, at the end: deleting its files now would send the
    /// agent's watcher events while programming is timed (inotify keeps watching a directory
    /// moved out of the tree).
    fn clear(&self) -> Result<()> {
        let trash = self.work.join(unique_name("trash"));
        fs::rename(self.set(), &trash)?;
        Ok(())
    }

    /// Stages the file of `svc` (returned: staged path, final path).
    fn stage_one(&self, svc: &Svc) -> Result<(PathBuf, PathBuf)> {
        let staged = self.work.join("staged-one.yaml");
        fs::write(&staged, manifest_yaml(svc, self.pods))?;
        Ok((staged, self.set().join(Self::file_name(svc))))
    }
}

fn check_dump(dump: &kproxy_e2e::harness::Dump, services: &[Svc], frontends: usize) -> Result<()> {
    ensure!(
        dump.services.len() == frontends,
        "kproxy dump lists {} frontends, expected {frontends}",
        dump.services.len(),
    );
    for svc in [&services[0], &services[services.len() - 1]] {
        let mut want: Vec<String> = svc.endpoints.iter().map(|&ip| svc.endpoint(ip)).collect();
        want.sort();
        let node_port = format!("{NODE_ADDRESS}:{}", svc.node_port);
        for frontend in [format!("{}:{}", svc.cluster_ip, svc.port), node_port] {
            let got = dump
                .services
                .iter()
                .find(|s| s.frontend == frontend)
                .with_context(|| format!("{} ({frontend}) missing from kproxy dump", svc.name))?;
            ensure!(got.backends == want, "{frontend}: dump has {:?}, expected {want:?}", got.backends);
        }
    }
    Ok(())
}

/// (mode, target name, address) of a measurement position.
type Target = (Mode, String, String);

/// Every measurement position of `access`: no proxy straight to a pod's address, and each
/// proxy at the first and the last service.
fn targets(access: Access, services: &[Svc], envs: &BTreeMap<Mode, ModeEnv>) -> Vec<Target> {
    let address = |svc: &Svc| match access {
        Access::ClusterIp => format!("{}:{}", svc.cluster_ip, svc.port),
        Access::NodePort => format!("{NODE_ADDRESS}:{}", svc.node_port),
    };
    let first = address(&services[0]);
    let last = address(&services[services.len() - 1]);
    let pod = format!("{}:{POD_PORT}", envs[&Mode::None].topology.pods[0].ip);
    let mut out = vec![(Mode::None, "pod".to_string(), pod)];
    for mode in [Mode::Kproxy, Mode::Iptables, Mode::Nftables] {
        out.push((mode, "first".to_string(), first.clone()));
        if services.len() > 1 {
            out.push((mode, "last".to_string(), last.clone()));
        }
    }
    out
}

/// `kproxy tc-cost` in the kproxy mode's node namespace, on the manifests the agent reads, with
/// the agent's capacities: flows from the external client to the last service's NodePort.
fn tc_cost(cfg: &Config, env: &ModeEnv, manifests: &Path, services: &[Svc], capacities: (u32, u32)) -> Result<TcCost> {
    let frontend = format!("{NODE_ADDRESS}:{}", services[services.len() - 1].node_port);
    let manifests = manifests.display().to_string();
    let (max_services, max_backends) = (capacities.0.to_string(), capacities.1.to_string());
    let (rounds, runs) = (cfg.tc_rounds.to_string(), cfg.tc_runs.to_string());
    let client = EXT_IP.to_string();
    let args = [
        "tc-cost", "--manifests", &manifests, "--frontend", &frontend, "--client", &client,
        "--max-services", &max_services, "--max-backends", &max_backends, "--rounds", &rounds, "--runs", &runs,
    ];
    let out = env.node_command(&cfg.kproxy.display().to_string(), &args, None)?;
    let r: kproxy_api::tc_cost::Report = serde_json::from_str(out.trim()).with_context(|| format!("kproxy tc-cost printed {out:?}"))?;
    Ok(TcCost { frontend, frontends: r.frontends, backends: r.backends, runs: r.runs, rounds: r.rounds })
}

/// A few sequential requests must all succeed (and, through a service, reach several pods).
fn probe(env: &ModeEnv, access: Access, testpod: &Path, addr: &str, pods: usize) -> Result<()> {
    let r = load::sequential(env, access, testpod, addr, Workload::Short, PROBE_REQUESTS)?;
    if r.ok != u64::from(PROBE_REQUESTS) {
        bail!("{} of {PROBE_REQUESTS} requests succeeded", r.ok);
    }
    if env.mode != Mode::None && pods > 1 && r.backends < 2 {
        bail!("every request reached the same pod");
    }
    Ok(())
}

fn print_point(p: &Point) {
    println!("    medians (rate req/s, sequential p50/p99 ms):");
    for s in &p.summaries {
        println!(
            "      {:<9} {:<9} {:<5} {:<9} {:>9.0} req/s  {:>7.3} / {:>7.3} ms  errors {}",
            s.access.name(),
            s.mode.name(),
            s.target,
            s.workload.name(),
            s.rate,
            s.seq_p50_ms,
            s.seq_p99_ms,
            s.errors
        );
    }
    let c = &p.control.change;
    let m = super::results::median;
    println!(
        "    endpoint change: kproxy {:.1} ms end to end (sync {:.2} ms), iptables partial {:.0} ms, \
         full {:.0} ms, nft {:.1} ms (+ listings {:.0} ms)",
        m(&c.kproxy_e2e_ms),
        m(&c.kproxy_sync_ms),
        m(&c.iptables_partial_ms),
        m(&c.iptables_full_ms),
        m(&c.nft_tx_ms),
        m(&c.nft_with_list_ms)
    );
}
