//! `cargo xtask demo` (which builds, then runs `kproxy-demo --manifests PATH` with the binaries
//! in `KPROXY_BIN` and `KPROXY_TESTPOD_BIN`): three pods, kproxy in front of them, real clients,
//! and how their requests spread over the pods. Everything is torn down at the end, on error,
//! and on Ctrl-C.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Parser;
use kproxy_e2e::harness::{unique_bpffs_dir, Binaries, Harness, HTTP_PORT, UDP_PORT};
use kproxy_e2e::interrupt;
use kproxy_e2e::report::Report;

const PODS: [&str; 3] = ["pod-a", "pod-b", "pod-c"];
const WEB: &str = "10.96.0.10:80";
const DNS: &str = "10.96.0.53:53";
const HTTP_REQUESTS: u32 = 300;
const UDP_QUERIES: u32 = 30;
const PROGRAMMED_WAIT: Duration = Duration::from_secs(10);
const CLIENT_WAIT: Duration = Duration::from_secs(90);

#[derive(Parser)]
#[command(about = "kproxy balancing real traffic between three pods (run by `cargo xtask demo`)")]
struct Args {
    /// The manifest to load.
    #[arg(long)]
    manifests: PathBuf,
}

fn main() -> Result<()> {
    let manifest = Args::parse().manifests;
    let bins = Binaries::from_env()?;
    if !manifest.exists() {
        bail!("the demo manifest {} is missing", manifest.display());
    }
    // From here on Ctrl-C means: stop what runs, then tear down in order.
    interrupt::install()?;

    println!(
        "\n==> creating a node namespace, pods {} and a client cgroup",
        PODS.join(", ")
    );
    let mut harness =
        Harness::new(bins, &PODS, unique_bpffs_dir("kproxy-demo"))?.with_manifests(manifest);
    let shown = show(&mut harness);
    if interrupt::requested() {
        println!("\n==> interrupted");
    }
    println!("\n==> tearing down: stopping kproxy, kproxy cleanup, removing namespaces and cgroup");
    let cleaned = harness.cleanup();
    drop(harness);
    shown?;
    cleaned?;
    println!("done: nothing left behind");
    Ok(())
}

fn show(h: &mut Harness) -> Result<()> {
    println!("    node netns {}", h.topology.node.name());
    for pod in &h.topology.pods {
        println!(
            "    {} {} (netns {}): HTTP :{HTTP_PORT}, UDP :{UDP_PORT}",
            pod.name,
            pod.ip,
            pod.netns.name()
        );
    }
    println!("    client cgroup {}", h.cgroup.path().display());

    println!(
        "\n==> starting kproxy run --manifests {}",
        h.manifests().display()
    );
    h.start_agent()?;
    let (_, took) = h.wait_for_dump(PROGRAMMED_WAIT, |d| {
        ["web", "dns"]
            .iter()
            .all(|name| d.service(name).is_some_and(|s| !s.backends.is_empty()))
    })?;
    println!(
        "    services programmed after {} ms; kproxy dump:\n",
        took.as_millis()
    );
    println!("{}", h.dump_table()?);

    println!("==> {HTTP_REQUESTS} HTTP requests to web ({WEB}), one connection each");
    let count = HTTP_REQUESTS.to_string();
    let web = h.run_client(&["http", "--addr", WEB, "--count", &count], CLIENT_WAIT)?;
    print_spread(&web, "getpeername()", &web.peers);

    println!("\n==> {UDP_QUERIES} UDP queries to dns ({DNS}), each from a new socket");
    let count = UDP_QUERIES.to_string();
    let args = ["udp", "--addr", DNS, "--count", &count, "--new-socket"];
    let dns = h.run_client(&args, CLIENT_WAIT)?;
    print_spread(&dns, "replies came from", &dns.sources);
    Ok(())
}

fn print_spread(report: &Report, address_label: &str, addresses: &BTreeMap<String, u64>) {
    let total = report.ok + report.failed();
    let mut backends: Vec<&str> = PODS.to_vec();
    backends.extend(
        report
            .by_backend
            .keys()
            .map(String::as_str)
            .filter(|b| !PODS.contains(b)),
    );
    println!("    {:<8} {:>8} {:>7}", "backend", "answers", "share");
    for backend in backends {
        let n = report.backend(backend);
        let share = 100.0 * n as f64 / total.max(1) as f64;
        let bar = "#".repeat((share / 2.0).round() as usize);
        println!("    {backend:<8} {n:>8} {share:>6.1}%  {bar}");
    }
    if report.errors.is_empty() {
        println!("    errors: none");
    } else {
        println!(
            "    errors: {:?} (first: {})",
            report.errors,
            report.first_error.as_deref().unwrap_or("?")
        );
    }
    let seen: Vec<String> = addresses.iter().map(|(a, n)| format!("{a} x{n}")).collect();
    println!("    {address_label}: {}", seen.join(", "));
    if let Some(l) = report.request_ms {
        println!(
            "    latency ms: p50 {:.2}, p99 {:.2}, max {:.2}",
            l.p50, l.p99, l.max
        );
    }
}
