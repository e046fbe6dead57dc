//! The benchmark itself: for each N, program the services in every mode (timing it), check that
//! every mode reaches the pods, measure the data path in interleaved rounds, time endpoint
//! changes, and record the agent's footprint.

use std::collections::BTreeMap;
use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use super::agent::{self, Agent};
use super::env::{self, Mode, ModeEnv, BLOCK_SIZE, POD_PORT, SERVICE_PORT};
use super::kubeproxy::{self, Scope, Svc};
use super::load::{self, Workload, WrkSettings};
use super::results::{
    summarize, ChangeTimes, ControlPlane, Footprint, Machine, Point, Results, Sample, Settings,
};
use crate::harness::unique_bpffs_dir;
use crate::manifest::{self, Protocol, ServiceSpec};
use crate::topology::{unique_name, Netns};
use crate::interrupt;

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
}

/// Requests of the correctness probe before and after measuring.
const PROBE_REQUESTS: u32 = 20;
/// The agent applies an isolated change at once only if its token bucket (kube-proxy's burst of
/// 2, one token per `--min-sync-period` = 1 s) has a token: changes are spaced this much.
const CHANGE_SPACING: Duration = Duration::from_millis(1100);
/// kproxy's default map capacities (kept unless N needs more).
const DEFAULT_MAX_SERVICES: u32 = 16_384;
const DEFAULT_MAX_BACKENDS: u32 = 131_072;
/// Endpoint blocks are shared by services and the spare addresses of endpoint changes.
const SPARES: u32 = 1000;

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
            target_port: POD_PORT,
            endpoints: (0..per_service)
                .map(|j| endpoint_ip(i, j, per_service, pods))
                .collect(),
        })
        .collect()
}

fn manifest_yaml(services: &[Svc], pods: usize) -> String {
    let specs: Vec<ServiceSpec> = services
        .iter()
        .map(|s| {
            let mut spec = ServiceSpec::new(
                &s.name,
                s.cluster_ip,
                s.port,
                kubeproxy::PORT_NAME,
                Protocol::Tcp,
                s.target_port,
            );
            spec.namespace = kubeproxy::NAMESPACE.to_string();
            for (j, &ip) in s.endpoints.iter().enumerate() {
                spec = spec.endpoint(&format!("pod-{}", j % pods), ip, true);
            }
            spec
        })
        .collect();
    if specs.is_empty() {
        return "# no services\n".to_string();
    }
    manifest::to_yaml(&specs)
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
    for &n in &cfg.services {
        interrupt::check()?;
        let point = measure_point(cfg, &envs, n, &work.0)
            .with_context(|| format!("benchmarking N = {n}"))?;
        print_point(&point);
        points.push(point);
    }
    Ok(Results {
        machine: Machine::detect(),
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
        },
        kube_proxy_commit: kubeproxy::KUBE_PROXY_COMMIT.to_string(),
        points,
        elapsed_s: started.elapsed().as_secs_f64(),
    })
}

const EMPTY_TABLES: &str = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n\
*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n";

/// iptables commands of one back end.
struct Ipt {
    restore: &'static str,
    save: &'static str,
}

/// The back end of the iptables mode's data path.
const IPT: Ipt = Ipt {
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
    fn load_full_capped(&self, netns: &Netns, work: &Path, full: &Path, cap: Duration) -> Result<Option<f64>> {
        self.reset(netns, work)?;
        let jumps = work.join("jumps.rules");
        fs::write(&jumps, kubeproxy::iptables_jumps().text)?;
        env::run_in(netns, self.restore, &["-w", "5", "--noflush"], Some(&jumps))?;
        let mut cmd = std::process::Command::new(self.restore);
        cmd.args(["-w", "5", "--noflush", "--counters"])
            .stdin(std::process::Stdio::from(fs::File::open(full)?));
        let t0 = Instant::now();
        match crate::topology::output_in(netns, None, cmd, cap) {
            Ok(out) => {
                crate::cmd::check_output(self.restore, &out)?;
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
    {
        let bare = env::bare_netns()?;
        control.iptables_nft_restore_ms = IPT_NFT.load_full_capped(&bare, work, &full_file, cfg.iptables_nft_cap)?;
        match control.iptables_nft_restore_ms {
            Some(t) => println!("    iptables-nft-restore {t:.0} ms"),
            None => println!("    iptables-nft-restore: over {:?}, stopped", cfg.iptables_nft_cap),
        }
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
    let capacities = (
        (n as u32 * 5 / 4).max(DEFAULT_MAX_SERVICES),
        ((n * e) as u32 * 5 / 4).max(DEFAULT_MAX_BACKENDS),
    );
    let wait = Duration::from_secs(60 + n as u64 / 100);
    let t0 = Instant::now();
    let mut agent = Agent::start(
        &cfg.kproxy,
        kp_env,
        &manifests,
        unique_bpffs_dir("kproxy-bench"),
        work.join(format!("agent-{n}.log")),
        capacities,
    )?;
    let (synced, seen) = agent.wait_synced(wait, |s| s.frontends == n)?;
    control.kproxy_start_ms = ms(seen - t0);
    control.kproxy_start_total_ms = synced.total_ms;
    control.kproxy_start_sync_ms = synced.sync_ms;
    let (dump, dump_took) = agent.dump()?;
    control.kproxy_dump_ms = ms(dump_took);
    check_dump(&dump, &services)?;
    let mut footprint = Footprint {
        agent: agent::rss(agent.pid())?,
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
    let (synced, seen) = agent.wait_synced(wait, |s| s.frontends == n)?;
    let mut last_sync = seen;
    control.kproxy_write_ms = ms(seen - t0);
    control.kproxy_write_total_ms = synced.total_ms;
    control.kproxy_write_sync_ms = synced.sync_ms;
    check_dump(&agent.dump()?.0, &services)?;
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
    let targets = targets(&services, envs);
    for (mode, name, addr) in &targets {
        probe(&envs[mode], &cfg.testpod, addr, cfg.pods)
            .with_context(|| format!("{} to the {name} target ({addr})", mode.name()))?;
    }
    println!("    probes: every mode reaches the pods through every target");

    // The data path, in interleaved rounds.
    let mut samples = Vec::new();
    for round in 0..cfg.rounds {
        print!("    round {}/{}:", round + 1, cfg.rounds);
        for workload in Workload::ALL {
            for (slot_index, slot) in ["first", "last"].into_iter().enumerate() {
                if slot == "last" && n == 1 {
                    continue; // one service: "last" is "first"
                }
                // No proxy has a single target; it is measured in both slots, so that it is
                // interleaved with the others as often as they are with each other.
                let mut order: Vec<&(Mode, String, String)> = targets
                    .iter()
                    .filter(|(m, t, _)| t == slot || *m == Mode::None)
                    .collect();
                let shift = (round + slot_index) % order.len();
                order.rotate_left(shift);
                for (mode, target, addr) in order {
                    let env = &envs[mode];
                    let wrk = load::wrk(env, addr, workload, cfg.wrk)?;
                    let seq = load::sequential(env, &cfg.testpod, addr, workload, cfg.sequential)?;
                    samples.push(Sample {
                        round,
                        mode: *mode,
                        target: target.clone(),
                        workload,
                        wrk,
                        seq,
                    });
                }
            }
            print!(" {}", workload.name());
        }
        println!();
    }

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
    for _ in 0..cfg.changes {
        interrupt::check()?;
        let new = next_spare(&kp_state[last]);
        // kproxy: the manifest is staged first; the clock starts at the rename.
        kp_state[last] = new.clone();
        let (staged, target) = manifest.stage_one(&kp_state, last)?;
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

        // iptables: kube-proxy's partial restore.
        let stale = kubeproxy::stale_sep_chains(&ipt_state[last], &new);
        ipt_state[last] = new.clone();
        change
            .iptables_partial_ms
            .push(iptables_change(ipt_env, &ipt_state, Some(&[last]), &stale, work)?);

        // nftables: kube-proxy's partial transaction, and the listings before it.
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

        // iptables again, with a full restore (kube-proxy's full sync).
        let new = next_spare(&ipt_state[last]);
        let stale = kubeproxy::stale_sep_chains(&ipt_state[last], &new);
        ipt_state[last] = new;
        change
            .iptables_full_ms
            .push(iptables_change(ipt_env, &ipt_state, None, &stale, work)?);
    }
    if cfg.changes > 0 {
        for (mode, state) in [(Mode::Kproxy, &kp_state), (Mode::Iptables, &ipt_state), (Mode::Nftables, &nft_state)] {
            let addr = format!("{}:{}", state[last].cluster_ip, SERVICE_PORT);
            probe(&envs[&mode], &cfg.testpod, &addr, cfg.pods)
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

/// Services per manifest file: kproxy's YAML parser refuses files of more than 1,024 documents.
const SERVICES_PER_FILE: usize = 250;

/// The manifests: a watched directory whose `set/` subdirectory holds one file per
/// [`SERVICES_PER_FILE`] services. A whole set is published by renaming a staged directory
/// into place (one atomic event), a single file by renaming a staged file over it.
struct Manifest {
    root: PathBuf,
    work: PathBuf,
    pods: usize,
}

impl Manifest {
    fn set(&self) -> PathBuf {
        self.root.join("set")
    }

    fn file_name(chunk: usize) -> String {
        format!("services-{chunk:04}.yaml")
    }

    /// Writes every file of `services` into a staged directory (returned).
    fn stage_all(&self, services: &[Svc]) -> Result<PathBuf> {
        let dir = self.work.join(unique_name("staged-set"));
        fs::create_dir_all(&dir)?;
        for (chunk, part) in services.chunks(SERVICES_PER_FILE).enumerate() {
            fs::write(dir.join(Self::file_name(chunk)), manifest_yaml(part, self.pods))?;
        }
        Ok(dir)
    }

    fn publish_all(&self, staged: &Path) -> Result<()> {
        fs::rename(staged, self.set()).with_context(|| format!("renaming to {}", self.set().display()))
    }

    /// Removes every service (the set leaves the watched directory in one rename).
    fn clear(&self) -> Result<()> {
        let trash = self.work.join(unique_name("trash"));
        fs::rename(self.set(), &trash)?;
        fs::remove_dir_all(&trash)?;
        Ok(())
    }

    /// Stages the file holding service `index` (returned: staged path, final path).
    fn stage_one(&self, services: &[Svc], index: usize) -> Result<(PathBuf, PathBuf)> {
        let chunk = index / SERVICES_PER_FILE;
        let part = &services[chunk * SERVICES_PER_FILE..((chunk + 1) * SERVICES_PER_FILE).min(services.len())];
        let staged = self.work.join("staged-one.yaml");
        fs::write(&staged, manifest_yaml(part, self.pods))?;
        Ok((staged, self.set().join(Self::file_name(chunk))))
    }
}

fn check_dump(dump: &crate::harness::Dump, services: &[Svc]) -> Result<()> {
    ensure!(
        dump.services.len() == services.len(),
        "kproxy dump lists {} services, expected {}",
        dump.services.len(),
        services.len()
    );
    for svc in [&services[0], &services[services.len() - 1]] {
        let got = dump
            .service(&svc.name)
            .with_context(|| format!("{} missing from kproxy dump", svc.name))?;
        let mut want: Vec<String> = svc.endpoints.iter().map(|&ip| svc.endpoint(ip)).collect();
        want.sort();
        ensure!(got.backends == want, "{}: dump has {:?}, expected {want:?}", svc.name, got.backends);
    }
    Ok(())
}

/// (mode, target name, address) of every measurement position.
fn targets(services: &[Svc], envs: &BTreeMap<Mode, ModeEnv>) -> Vec<(Mode, String, String)> {
    let first = format!("{}:{SERVICE_PORT}", services[0].cluster_ip);
    let last = format!("{}:{SERVICE_PORT}", services[services.len() - 1].cluster_ip);
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

/// A few sequential requests must all succeed (and, through a service, reach several pods).
fn probe(env: &ModeEnv, testpod: &Path, addr: &str, pods: usize) -> Result<()> {
    let r = load::sequential(env, testpod, addr, Workload::Short, PROBE_REQUESTS)?;
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
            "      {:<9} {:<5} {:<9} {:>9.0} req/s  {:>7.3} / {:>7.3} ms  errors {}",
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
