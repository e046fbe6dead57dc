//! What a benchmark run measured: the raw samples of every round and their medians, written to
//! `results.json` and read back to render the report again (`--from-json`).

use std::process::Command;

use serde::{Deserialize, Serialize};

use super::agent::{MapMemory, Rss};
use super::cost::Cost;
use super::env::{Access, Mode};
use super::kubeproxy::{IptablesCounts, NftCounts};
use super::load::{SeqResult, WrkResult, WrkSettings, Workload};
use kproxy_e2e::cmd;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Machine {
    pub nproc: usize,
    pub kernel: String,
    pub cpu: String,
    pub memory_gib: f64,
    pub iptables: String,
    pub nft: String,
    pub wrk: String,
    pub kproxy_commit: String,
    pub date: String,
    /// `/proc/loadavg` (1, 5, 15 minutes) when the run started and when it ended.
    #[serde(default)]
    pub load_start: String,
    #[serde(default)]
    pub load_end: String,
}

/// The 1-, 5- and 15-minute load averages, from `/proc/loadavg`.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

impl Machine {
    pub fn detect() -> Machine {
        let run = |program: &str, args: &[&str]| {
            cmd::output(Command::new(program).args(args))
                .map(|s| s.lines().next().unwrap_or("").trim().to_string())
                .unwrap_or_else(|_| "unknown".to_string())
        };
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_kib: f64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0.0);
        let wrk = {
            // `wrk -v` prints its version and exits non-zero.
            Command::new("wrk")
                .arg("-v")
                .output()
                .map(|o| {
                    let mut text = String::from_utf8_lossy(&o.stdout).into_owned();
                    text.push_str(&String::from_utf8_lossy(&o.stderr));
                    text.lines()
                        .next()
                        .unwrap_or("")
                        .trim()
                        .to_string()
                })
                .unwrap_or_default()
        };
        let commit = run("git", &["-C", env!("CARGO_MANIFEST_DIR"), "rev-parse", "--short=12", "HEAD"]);
        Machine {
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            kernel: run("uname", &["-r"]),
            cpu: cpuinfo
                .lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_string())
                .unwrap_or_else(|| "unknown".into()),
            memory_gib: mem_kib / 1024.0 / 1024.0,
            iptables: run("iptables", &["--version"]),
            nft: run("nft", &["--version"]),
            wrk,
            kproxy_commit: commit,
            date: run("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
            load_start: String::new(),
            load_end: load_average(),
        }
    }
}

/// The settings of a run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    pub quick: bool,
    pub services: Vec<usize>,
    pub endpoints_per_service: usize,
    pub pods_per_mode: usize,
    pub rounds: usize,
    pub wrk: WrkSettings,
    pub sequential_requests: u32,
    pub endpoint_changes: usize,
    pub profile: String,
    pub command: String,
    /// Cap of iptables-nft-restore, seconds.
    pub iptables_nft_cap_s: u64,
    /// `kproxy tc-cost` rounds, and runs per case and round.
    #[serde(default)]
    pub tc_rounds: usize,
    #[serde(default)]
    pub tc_runs: u32,
    /// `--note`: what else ran on the machine, printed under the load averages.
    #[serde(default)]
    pub note: Option<String>,
}

/// One measurement of the data path.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sample {
    pub round: usize,
    /// ClusterIP from the node or NodePort from outside (runs before NodePorts were measured
    /// have ClusterIP samples only).
    #[serde(default)]
    pub access: Access,
    pub mode: Mode,
    /// "first" or "last" programmed service ("pod" for no proxy).
    pub target: String,
    pub workload: Workload,
    /// The round's block of back-to-back runs this sample was taken in: 0 for the first
    /// service's, 1 for the last's (no proxy runs in both). A ratio pairs samples of one block.
    #[serde(default)]
    pub slot: usize,
    pub wrk: WrkResult,
    pub seq: SeqResult,
    /// CPU time used during the wrk run (totals, µs).
    #[serde(default)]
    pub cpu: Option<Cost>,
}

impl Sample {
    /// CPU µs per request of the wrk run (NaN if not measured).
    pub fn cpu_per_request(&self) -> f64 {
        self.cpu.map_or(f64::NAN, |c| c.per_request(self.wrk.requests).total_us())
    }

    /// A run with errors (connect, read, write, timeout, non-2xx) is not a valid sample of the
    /// rate: it is excluded from the medians and ratios, and counted.
    pub fn valid(&self) -> bool {
        self.wrk.errors == 0
    }
}

/// Per-round ratios of one figure of (mode `a`, target `ta`) to the same figure of (mode `b`,
/// target `tb`), each pair taken in the same block of back-to-back runs (same round, access,
/// workload and slot).
#[derive(Debug, Clone, Default)]
pub struct Paired {
    pub ratios: Vec<f64>,
    /// Pairs left out because one of the two runs had errors.
    pub excluded: usize,
}

/// See [`Paired`]; `metric` is the figure (e.g. the rate).
pub fn paired(
    samples: &[Sample],
    access: Access,
    workload: Workload,
    (a, ta): (Mode, &str),
    (b, tb): (Mode, &str),
    metric: impl Fn(&Sample) -> f64,
) -> Paired {
    let mut out = Paired::default();
    let pick = |s: &Sample, mode: Mode, target: &str| {
        s.access == access && s.workload == workload && s.mode == mode && s.target == target
    };
    for sa in samples.iter().filter(|s| pick(s, a, ta)) {
        let Some(sb) = samples
            .iter()
            .find(|s| pick(s, b, tb) && s.round == sa.round && s.slot == sa.slot)
        else {
            continue;
        };
        if !sa.valid() || !sb.valid() {
            out.excluded += 1;
            continue;
        }
        out.ratios.push(metric(sa) / metric(sb));
    }
    out
}

/// Medians over the rounds of one (access, mode, target, workload).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    #[serde(default)]
    pub access: Access,
    pub mode: Mode,
    pub target: String,
    pub workload: Workload,
    pub rounds: usize,
    pub rate: f64,
    /// Lowest and highest rate over the rounds.
    pub rate_min: f64,
    pub rate_max: f64,
    pub wrk_p50_ms: f64,
    pub wrk_p99_ms: f64,
    pub seq_p50_ms: f64,
    pub seq_p99_ms: f64,
    pub errors: u64,
    /// wrk's connect errors over the rounds (part of `errors`).
    #[serde(default)]
    pub connect_errors: u64,
    /// Runs with errors, left out of the medians (`rounds` counts the others).
    #[serde(default)]
    pub excluded: usize,
    /// Median CPU time per request, µs: client, servers, agent, softirq (NaN if not measured).
    #[serde(default)]
    pub cpu_per_request: Option<Cost>,
}

/// How long programming took, in milliseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ControlPlane {
    /// kproxy: agent started with the manifest in place → `synced` event with N frontends seen.
    pub kproxy_start_ms: f64,
    /// ... of which the agent's own sync (reading the manifest + writing the maps).
    pub kproxy_start_total_ms: f64,
    pub kproxy_start_sync_ms: f64,
    /// ... and its map writes (one planned op each).
    #[serde(default)]
    pub kproxy_start_writes: usize,
    /// kproxy: manifest renamed into place (agent running, nothing programmed) → `synced` event.
    pub kproxy_write_ms: f64,
    pub kproxy_write_total_ms: f64,
    pub kproxy_write_sync_ms: f64,
    pub kproxy_dump_ms: f64,
    /// kproxy on a (fake) apiserver holding the N services: agent started → `synced` event, and
    /// the agent's whole sync (list, decode, validate, map writes) and map writes.
    #[serde(default)]
    pub kproxy_api_start_ms: Option<f64>,
    #[serde(default)]
    pub kproxy_api_total_ms: Option<f64>,
    #[serde(default)]
    pub kproxy_api_sync_ms: Option<f64>,
    /// `iptables-legacy-restore --noflush --counters` of kube-proxy's full ruleset into empty
    /// tables (the back end of the iptables data path).
    pub iptables_restore_ms: f64,
    /// The same with `iptables-nft-restore`; `None` if it ran over the cap.
    pub iptables_nft_restore_ms: Option<f64>,
    /// `nft -f` of kube-proxy's first full transaction.
    pub nft_ms: f64,
    /// One endpoint of the last service replaced, per repetition.
    pub change: ChangeTimes,
}

/// One endpoint change with N services programmed, each repetition in milliseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ChangeTimes {
    /// Manifest renamed into place → `synced` event seen.
    pub kproxy_e2e_ms: Vec<f64>,
    /// The agent's sync: reading + parsing every manifest, then writing the maps.
    pub kproxy_total_ms: Vec<f64>,
    /// The agent's map writes (plan + BPF updates).
    pub kproxy_sync_ms: Vec<f64>,
    pub kproxy_writes: Vec<usize>,
    /// kube-proxy >= 1.27 partial sync: KUBE-SERVICES + the changed service's chains
    /// (plus `iptables-save -t nat` outside large cluster mode).
    pub iptables_partial_ms: Vec<f64>,
    /// A full `iptables-restore` of the whole ruleset.
    pub iptables_full_ms: Vec<f64>,
    /// kube-proxy's partial nftables transaction (`nft -f`).
    pub nft_tx_ms: Vec<f64>,
    /// ... plus the listings kube-proxy runs before every sync (`nft --json list chains`,
    /// `list sets`).
    pub nft_with_list_ms: Vec<f64>,
}

/// Memory.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Footprint {
    /// Agent after programming N services.
    pub agent: Rss,
    /// Agent at the end of the point (after the endpoint changes).
    pub agent_end: Rss,
    /// The agent on the apiserver, once it programmed the N services.
    #[serde(default)]
    pub agent_api: Option<Rss>,
    pub maps: Vec<MapMemory>,
    pub map_memlock_bytes: u64,
    pub capacities: (u32, u32),
    /// Conntrack entries in the iptables and nftables node namespaces at the end of the point.
    pub conntrack_iptables: Option<u64>,
    pub conntrack_nftables: Option<u64>,
}

/// One round of `kproxy tc-cost`: nanoseconds per packet of each case, with `repeat` (hot,
/// tracked flows on a self-mapped service) and single runs (median), as kproxy-api defines it.
pub use kproxy_api::tc_cost::Round as TcRound;

/// The per-packet cost of the tc programs at one N (`kproxy tc-cost`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TcCost {
    /// The frontend the flows went to.
    pub frontend: String,
    /// Frontends and backends programmed in the private maps.
    pub frontends: usize,
    pub backends: usize,
    /// Runs per case and round.
    pub runs: u32,
    pub rounds: Vec<TcRound>,
}

impl TcCost {
    /// The median over the rounds of one case.
    pub fn median(&self, case: impl Fn(&TcRound) -> f64) -> f64 {
        median(&self.rounds.iter().map(case).collect::<Vec<_>>())
    }
}

/// A case of [`TcRound`]: label, its value, and the empty program's measured the same way.
pub type TcCase = (&'static str, fn(&TcRound) -> f64, fn(&TcRound) -> f64);

/// The cases of [`TcRound`], each with its empty-program baseline.
pub const TC_CASES: [TcCase; 5] = [
    ("ingress, tracked flow", |r| r.ingress_tracked_ns, |r| r.empty_ns),
    ("ingress, not a frontend", |r| r.ingress_not_frontend_ns, |r| r.empty_ns),
    ("egress, tracked reply", |r| r.egress_reply_ns, |r| r.empty_ns),
    ("egress, untracked", |r| r.egress_untracked_ns, |r| r.empty_ns),
    ("ingress, new flow (single runs)", |r| r.ingress_new_flow_single_ns, |r| r.empty_single_ns),
];

/// The label of the new-flow case: the first packet of a connection, a cost per connection.
pub const TC_NEW_FLOW: &str = "ingress, new flow (single runs)";

/// Everything measured for one N.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Point {
    pub services: usize,
    pub endpoints: usize,
    pub iptables: IptablesCounts,
    /// Rules loaded, as `iptables-save` lists them (nat, filter).
    pub iptables_loaded: (usize, usize),
    pub nft: NftCounts,
    pub control: ControlPlane,
    pub footprint: Footprint,
    /// Per-packet cost of the tc programs (runs before the tc datapath have none).
    #[serde(default)]
    pub tc: Option<TcCost>,
    pub samples: Vec<Sample>,
    pub summaries: Vec<Summary>,
}

impl Point {
    pub fn summary(&self, access: Access, mode: Mode, target: &str, workload: Workload) -> Option<&Summary> {
        self.summaries.iter().find(|s| {
            s.access == access
                && s.mode == mode
                && s.workload == workload
                && (s.target == target || mode == Mode::None)
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Results {
    pub machine: Machine,
    pub settings: Settings,
    pub kube_proxy_commit: String,
    pub points: Vec<Point>,
    pub elapsed_s: f64,
}

pub use super::stats::median;

/// The medians of `samples`, per (access, mode, target, workload).
pub fn summarize(samples: &[Sample]) -> Vec<Summary> {
    let mut keys: Vec<(Access, Mode, String, Workload)> = samples
        .iter()
        .map(|s| (s.access, s.mode, s.target.clone(), s.workload))
        .collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .map(|(access, mode, target, workload)| {
            let all: Vec<&Sample> = samples
                .iter()
                .filter(|s| s.access == access && s.mode == mode && s.target == target && s.workload == workload)
                .collect();
            let group: Vec<&Sample> = all.iter().copied().filter(|s| s.valid()).collect();
            let m = |f: &dyn Fn(&Sample) -> f64| median(&group.iter().map(|s| f(s)).collect::<Vec<_>>());
            let rates: Vec<f64> = group.iter().map(|s| s.wrk.rate).collect();
            Summary {
                access,
                mode,
                target,
                workload,
                rounds: group.len(),
                rate: median(&rates),
                rate_min: rates.iter().copied().fold(f64::INFINITY, f64::min),
                rate_max: rates.iter().copied().fold(0.0, f64::max),
                wrk_p50_ms: m(&|s| s.wrk.p50_ms),
                wrk_p99_ms: m(&|s| s.wrk.p99_ms),
                seq_p50_ms: m(&|s| s.seq.p50_ms),
                seq_p99_ms: m(&|s| s.seq.p99_ms),
                errors: all.iter().map(|s| s.wrk.errors + s.seq.errors).sum(),
                connect_errors: all.iter().map(|s| s.wrk.connect_errors).sum(),
                excluded: all.len() - group.len(),
                cpu_per_request: group.iter().all(|s| s.cpu.is_some()).then(|| Cost {
                    client_us: m(&|s| s.cpu.unwrap_or_default().per_request(s.wrk.requests).client_us),
                    server_us: m(&|s| s.cpu.unwrap_or_default().per_request(s.wrk.requests).server_us),
                    agent_us: m(&|s| s.cpu.unwrap_or_default().per_request(s.wrk.requests).agent_us),
                    softirq_us: m(&|s| s.cpu.unwrap_or_default().per_request(s.wrk.requests).softirq_us),
                }),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }
}
