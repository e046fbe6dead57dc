//! `kproxy tc-cost` (hidden): the per-packet cost of the tc programs, for the benchmark
//! (`cargo xtask bench`). The services of a manifest directory are programmed, as the agent
//! would program them, into maps private to this process (nothing is pinned or attached), and
//! the verified programs run on crafted frames with BPF_PROG_TEST_RUN, next to the empty
//! `kp_tc_baseline` classifier.
//!
//! A subcommand of the agent's binary rather than code in the benchmark (kproxy-bench): the
//! tools do not link the agent, and this way the benchmark measures the very binary it runs as
//! the agent, with the agent's own loader and proxier (one full sync of [`Proxier::sync`]).
//! Its JSON ([`Report`]) is kproxy-api's.
//!
//! Two ways of timing, both reported:
//!
//! - With `repeat` (the kernel runs the program many times in a row and reports the mean): hot
//!   caches, no timer overhead per run. But the program runs again on the same buffer, so a
//!   frame it translates is seen translated from the second run on (a tracked flow's packet
//!   would be timed as a packet to no frontend). Tracked flows are therefore timed on a flow to
//!   a service whose only backend is its own frontend, added to these private maps only: its
//!   translation rewrites the frame to what it was, so every run takes the tracked-flow path
//!   (conntrack lookup, refresh, address rewrite and checksum updates, the same instructions
//!   for any address).
//! - One run per `BPF_PROG_TEST_RUN` (`repeat = 1`, the median of many): every run gets a
//!   fresh frame, which a new flow needs (each run a new client port); the kernel's timer around
//!   a single run adds a few tens of ns, the empty program's figure included. The tracked flow
//!   to the real backend and the self-mapped one are both timed this way too, to show they cost
//!   the same.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use anyhow::{bail, ensure, Context as _, Result};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions};

use crate::{
    dataplane::{bpf::BpfMaps, plan::Limits},
    health::ProxyHealth,
    loader::{self, Capacities},
    metrics::Metrics,
    model::{Frontend, Protocol},
    proxier::Proxier,
    runner::RunKind,
    sources::manifests::ManifestSource,
    sync::Syncer,
    tracker::ModelStore,
};

const TC_ACT_OK: u32 = 0;
const TCP_SYN: u8 = 0x02;
const TCP_PSH_ACK: u8 = 0x18;

/// What to measure.
pub struct Config {
    /// The manifests (a file or directory), as `kproxy run --manifests` reads them.
    pub manifests: PathBuf,
    /// Addresses NodePorts are served on.
    pub node_addresses: Vec<Ipv4Addr>,
    pub capacities: Capacities,
    /// The frontend the flows go to (e.g. a NodePort on a node address).
    pub frontend: SocketAddrV4,
    /// The external client.
    pub client: Ipv4Addr,
    pub rounds: usize,
    /// Runs per case and round (`repeat`, and single runs whose median is taken).
    pub runs: u32,
}

pub use kproxy_api::tc_cost::{Report, Round};

/// The self-mapped service's frontend (and backend), outside every range the benchmark uses.
const SELF_MAPPED: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 19, 255, 1), 9);

pub fn run(cfg: &Config) -> Result<Report> {
    ensure!(cfg.rounds > 0 && cfg.runs > 0, "--rounds and --runs must be positive");
    let mut store = ModelStore::default();
    store.set_node_addresses(cfg.node_addresses.clone());
    let caps = cfg.capacities;
    let mut ebpf = loader::load_object(None, caps)?;
    let maps = BpfMaps::from_ebpf(&mut ebpf).context("take the maps")?;
    let limits = Limits {
        max_services: caps.max_services,
        max_backends: caps.max_backends,
        max_service_entries: caps.service_entries(),
    };
    // The agent's proxier, on these private maps, for one full sync (no thread, no servers).
    let health = Arc::new(ProxyHealth::new(Duration::MAX));
    let mut proxier = Proxier::new(store, Syncer::new(maps, limits), health, Arc::new(Metrics::new()))
        .with_manifests(ManifestSource::new(cfg.manifests.clone()));
    let synced = proxier.sync(RunKind::Full);
    if let Some(p) = proxier.source_problems().next() {
        bail!("{} has problems: {p}", cfg.manifests.display());
    }
    ensure!(synced, "programming the services of {} failed (see the log)", cfg.manifests.display());
    let desired = proxier.desired();
    if let Some(r) = proxier.refused().first() {
        bail!("{} of {} frontends not programmed, e.g. {}: {}", proxier.refused().len(), desired.len(), r.frontend, r.detail);
    }
    let frontends = desired.len();
    let backends = desired.values().map(|d| d.backends.len()).sum();
    let tcp = |a: SocketAddrV4| Frontend { address: *a.ip(), port: a.port(), protocol: Protocol::Tcp };
    let mut self_mapped = desired
        .get(&tcp(cfg.frontend))
        .with_context(|| format!("{} is not a frontend of {}", cfg.frontend, cfg.manifests.display()))?
        .clone();
    self_mapped.backends = vec![SELF_MAPPED];
    let stats = proxier.program_extra(tcp(SELF_MAPPED), self_mapped).context("program the self-mapped service")?;
    ensure!(stats.refused.is_empty(), "the self-mapped service was not programmed: {:?}", stats.refused);
    // The proxier (its syncer) holds the maps the programs below are loaded with: it lives on.
    for name in ["kp_tc_ingress", "kp_tc_egress", "kp_tc_baseline"] {
        let program: &mut SchedClassifier = ebpf.program_mut(name).context(name)?.try_into()?;
        program.load().with_context(|| format!("load {name}"))?;
    }
    let prog = |name: &str| -> Result<&SchedClassifier> { Ok(ebpf.program(name).context("program")?.try_into()?) };
    let (ingress, egress, empty) = (prog("kp_tc_ingress")?, prog("kp_tc_egress")?, prog("kp_tc_baseline")?);

    // The tracked flows: to the frontend's real backend, and to the self-mapped service. Their
    // SYNs pick the backends and create the conntrack entries.
    let client = SocketAddrV4::new(cfg.client, 40_000);
    let ((verdict, out), _) = run_once(ingress, &tcp_frame(client, cfg.frontend, TCP_SYN, b""))?;
    let backend = destination(&out).context("translated SYN")?;
    ensure!(
        verdict == TC_ACT_OK && backend != cfg.frontend,
        "{} is not served by the tc program (verdict {verdict}, destination {backend})",
        cfg.frontend
    );
    let ((verdict, out), _) = run_once(ingress, &tcp_frame(client, SELF_MAPPED, TCP_SYN, b""))?;
    ensure!(verdict == TC_ACT_OK && destination(&out) == Some(SELF_MAPPED), "the self-mapped flow was not created");
    let payload = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n";
    let tracked = tcp_frame(client, cfg.frontend, TCP_PSH_ACK, payload);
    let tracked_self = tcp_frame(client, SELF_MAPPED, TCP_PSH_ACK, payload);
    let reply = tcp_frame(backend, client, TCP_PSH_ACK, payload);
    let reply_self = tcp_frame(SELF_MAPPED, client, TCP_PSH_ACK, payload);
    let unserved = tcp_frame(client, SocketAddrV4::new(*cfg.frontend.ip(), 22), TCP_PSH_ACK, payload);
    let untracked = tcp_frame(SocketAddrV4::new(*cfg.frontend.ip(), 22), client, TCP_PSH_ACK, payload);
    // Both flows are tracked both ways: the replies are translated (back) to their frontends,
    // and the self-mapped flow's frames come out as they went in.
    let ((_, out), _) = run_once(egress, &reply)?;
    ensure!(source_of(&out) == Some(cfg.frontend), "the reply was not translated back to {}", cfg.frontend);
    for (program, frame) in [(ingress, &tracked_self), (egress, &reply_self)] {
        let ((verdict, out), _) = run_once(program, frame)?;
        ensure!(verdict == TC_ACT_OK && out == *frame, "the self-mapped flow's frame changed");
    }

    let mut rounds = Vec::new();
    for round in 0..cfg.rounds {
        let repeated = |program: &SchedClassifier, frame: &[u8]| -> Result<f64> {
            let mut out = vec![0u8; frame.len() + 64];
            let opts = TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), repeat: cfg.runs, ..TestRunOptions::new() };
            Ok(program.test_run(opts)?.duration.as_nanos() as f64)
        };
        let single = |program: &SchedClassifier, frame: &[u8]| -> Result<f64> {
            let mut ns = Vec::with_capacity(cfg.runs as usize);
            for _ in 0..cfg.runs {
                ns.push(run_once(program, frame)?.1);
            }
            Ok(median(ns))
        };
        let mut r = Round {
            empty_ns: repeated(empty, &tracked_self)?,
            ingress_tracked_ns: repeated(ingress, &tracked_self)?,
            ingress_not_frontend_ns: repeated(ingress, &unserved)?,
            egress_reply_ns: repeated(egress, &reply_self)?,
            egress_untracked_ns: repeated(egress, &untracked)?,
            empty_single_ns: single(empty, &tracked)?,
            ingress_tracked_single_ns: single(ingress, &tracked)?,
            ingress_tracked_self_single_ns: single(ingress, &tracked_self)?,
            ..Round::default()
        };
        // New flows: a client address per round, a port per run.
        let source_ip = Ipv4Addr::new(198, 18, (round / 250) as u8, (round % 250) as u8 + 1);
        let mut ns = Vec::with_capacity(cfg.runs as usize);
        for i in 0..cfg.runs {
            let src = SocketAddrV4::new(source_ip, 1024 + (i % 64_000) as u16);
            let ((verdict, _), took) = run_once(ingress, &tcp_frame(src, cfg.frontend, TCP_SYN, b""))?;
            ensure!(verdict == TC_ACT_OK, "new flow {src}: verdict {verdict}");
            ns.push(took);
        }
        r.ingress_new_flow_single_ns = median(ns);
        rounds.push(r);
    }
    Ok(Report { frontends, backends, runs: cfg.runs, rounds })
}

/// One run: (verdict and frame out, nanoseconds).
fn run_once(program: &SchedClassifier, frame: &[u8]) -> Result<((u32, Vec<u8>), f64)> {
    let mut out = vec![0u8; frame.len() + 64];
    let opts = TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), ..TestRunOptions::new() };
    let result = program.test_run(opts)?;
    out.truncate(result.data_size_out as usize);
    Ok(((result.return_value, out), result.duration.as_nanos() as f64))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

const ETH_LEN: usize = 14;
const IP_LEN: usize = 20;
const TCP_LEN: usize = 20;

/// Ones' complement sum of `data` added to `sum`.
fn ones_sum(data: &[u8], mut sum: u32) -> u32 {
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet + IPv4 + TCP frame with correct checksums.
fn tcp_frame(src: SocketAddrV4, dst: SocketAddrV4, flags: u8, payload: &[u8]) -> Vec<u8> {
    let total = IP_LEN + TCP_LEN + payload.len();
    let mut f = Vec::with_capacity(ETH_LEN + total);
    f.extend_from_slice(&[2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00]);
    let ip_start = f.len();
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&(total as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0, 0x40, 0, 64, 6, 0, 0]);
    f.extend_from_slice(&src.ip().octets());
    f.extend_from_slice(&dst.ip().octets());
    let ip_sum = fold(ones_sum(&f[ip_start..], 0));
    f[ip_start + 10..ip_start + 12].copy_from_slice(&ip_sum.to_be_bytes());
    let tcp_start = f.len();
    f.extend_from_slice(&src.port().to_be_bytes());
    f.extend_from_slice(&dst.port().to_be_bytes());
    f.extend_from_slice(&1000u32.to_be_bytes());
    let ack = if flags & 0x10 != 0 { 2000u32 } else { 0 };
    f.extend_from_slice(&ack.to_be_bytes());
    f.extend_from_slice(&[(TCP_LEN as u8 / 4) << 4, flags]);
    f.extend_from_slice(&64_000u16.to_be_bytes());
    f.extend_from_slice(&[0, 0, 0, 0]);
    f.extend_from_slice(payload);
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&src.ip().octets());
    pseudo.extend_from_slice(&dst.ip().octets());
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&((TCP_LEN + payload.len()) as u16).to_be_bytes());
    let tcp_sum = fold(ones_sum(&f[tcp_start..], ones_sum(&pseudo, 0)));
    f[tcp_start + 16..tcp_start + 18].copy_from_slice(&tcp_sum.to_be_bytes());
    f
}

/// (source, destination) of a frame built like [`tcp_frame`]'s.
fn endpoints(frame: &[u8]) -> Option<(SocketAddrV4, SocketAddrV4)> {
    let ip = frame.get(ETH_LEN..ETH_LEN + IP_LEN)?;
    let tcp = frame.get(ETH_LEN + IP_LEN..ETH_LEN + IP_LEN + 4)?;
    let addr = |a: &[u8], p: &[u8]| SocketAddrV4::new(Ipv4Addr::new(a[0], a[1], a[2], a[3]), u16::from_be_bytes([p[0], p[1]]));
    Some((addr(&ip[12..16], &tcp[0..2]), addr(&ip[16..20], &tcp[2..4])))
}

fn destination(frame: &[u8]) -> Option<SocketAddrV4> {
    endpoints(frame).map(|e| e.1)
}

fn source_of(frame: &[u8]) -> Option<SocketAddrV4> {
    endpoints(frame).map(|e| e.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_have_valid_checksums() {
        let f = tcp_frame("192.0.2.100:40000".parse().unwrap(), "192.0.2.10:30000".parse().unwrap(), TCP_PSH_ACK, b"abc");
        assert_eq!(fold(ones_sum(&f[ETH_LEN..ETH_LEN + IP_LEN], 0)), 0, "IPv4 header checksum");
        let mut pseudo = vec![192, 0, 2, 100, 192, 0, 2, 10, 0, 6];
        pseudo.extend_from_slice(&((TCP_LEN + 3) as u16).to_be_bytes());
        assert_eq!(fold(ones_sum(&f[ETH_LEN + IP_LEN..], ones_sum(&pseudo, 0))), 0, "TCP checksum");
        assert_eq!(endpoints(&f), Some(("192.0.2.100:40000".parse().unwrap(), "192.0.2.10:30000".parse().unwrap())));
    }
}
