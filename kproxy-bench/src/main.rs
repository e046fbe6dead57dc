//! `cargo xtask bench` (`cargo run --package kproxy-bench`): builds, then benchmarks kproxy
//! against kube-proxy's iptables and nftables modes and no proxy (see the library), and writes
//! `results.json`, the report and its plots.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use kproxy_bench::{self as bench, load::WrkSettings, results::Results, run::Config};
use kproxy_e2e::{cmd, topology};
use xtask::workspace::{cargo, target_dir, workspace_root};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Profile {
    Release,
    Debug,
}

#[derive(Debug, Parser)]
#[command(
    name = "kproxy-bench",
    bin_name = "cargo xtask bench",
    about = "Benchmark kproxy against kube-proxy's iptables and nftables modes and no proxy (root)"
)]
pub struct BenchArgs {
    /// Smoke run (CI): N in {1, 1000}, one round, 1 s per load run, debug binaries (those of
    /// `cargo xtask test`). Checks that every mode works; no thresholds.
    #[arg(long)]
    quick: bool,
    /// Numbers of services, comma separated [default: 1,1000,5000,10000; quick: 1,1000].
    #[arg(long, value_delimiter = ',')]
    services: Option<Vec<usize>>,
    /// Endpoints per service.
    #[arg(long, default_value_t = 10)]
    endpoints: usize,
    /// Pods per mode (the endpoints are spread over them).
    #[arg(long, default_value_t = 4)]
    pods: usize,
    /// Interleaved rounds per N [default: 10; quick: 1]. Ratios are paired within a round.
    #[arg(long)]
    rounds: Option<usize>,
    /// Seconds per wrk run [default: 1; quick: 1].
    #[arg(long)]
    duration: Option<u32>,
    /// wrk connections [default: 4].
    #[arg(long, default_value_t = 4)]
    connections: u32,
    /// Sequential requests per latency run [default: 500; quick: 300].
    #[arg(long)]
    requests: Option<u32>,
    /// Endpoint changes timed per N [default: 3; quick: 2].
    #[arg(long)]
    changes: Option<usize>,
    /// Build profile of kproxy and kproxy-testpod [default: release; quick: debug].
    #[arg(long, value_enum)]
    profile: Option<Profile>,
    /// Use the binaries already built instead of building.
    #[arg(long)]
    no_build: bool,
    /// Where results.json, benchmarks.md and the plots go [default: <workspace>/target/bench].
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// Do not update docs/benchmarks.md and docs/img/ (a full run does by default; --quick
    /// never does).
    #[arg(long)]
    no_docs: bool,
    /// Render the report and plots from an earlier results.json instead of measuring.
    #[arg(long)]
    from_json: Option<PathBuf>,
    /// Also run the whole benchmark with the kproxy of commit REV (built in a git worktree under
    /// `<target>/bench-compare/`, with a target directory of its own kept there), first, and
    /// write `compare.md` (this build ÷ REV's, with intervals) next to the report. Needs REV's
    /// agent to take the options the benchmark passes.
    #[arg(long, value_name = "REV")]
    compare: Option<String>,
    /// A note for the report on the machine's state (e.g. "other builds were running");
    /// with --from-json it replaces the recorded one.
    #[arg(long)]
    note: Option<String>,
    /// Instead of the comparison: kproxy's control plane at these numbers of ClusterIP
    /// Services (e.g. 10000,30000,100000) on the fake apiserver, next to kube-proxy's full
    /// ruleset loads (capped at --scale-cap); writes scale.json and scale.md (and docs/scale.md
    /// unless --no-docs). See kproxy-bench/src/scale.rs.
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["compare", "from_json", "quick"])]
    scale: Option<Vec<usize>>,
    /// With --scale: kube-proxy's loads are stopped after this many seconds.
    #[arg(long, default_value_t = 60)]
    scale_cap: u64,
    /// With --from-json: the other run's results.json, to render compare.md again.
    #[arg(long, requires = "from_json")]
    compare_json: Option<PathBuf>,
}

fn main() -> Result<()> {
    let args = BenchArgs::parse();
    let out_dir = args
        .out_dir
        .clone()
        .unwrap_or_else(|| workspace_root().join("target/bench"));
    let docs = !args.quick && !args.no_docs;
    if let Some(json) = &args.from_json {
        let text = fs::read_to_string(json).with_context(|| format!("reading {}", json.display()))?;
        let mut results: Results = serde_json::from_str(&text).context("parsing results.json")?;
        if args.note.is_some() {
            results.settings.note = args.note.clone();
        }
        bench::setup::ensure_packages()?;
        if let Some(other) = &args.compare_json {
            let text = fs::read_to_string(other).with_context(|| format!("reading {}", other.display()))?;
            let other: Results = serde_json::from_str(&text).with_context(|| format!("parsing {}", other.display()))?;
            let rev = other.machine.kproxy_commit.clone();
            fs::create_dir_all(&out_dir)?;
            fs::write(out_dir.join("compare.md"), bench::compare::render(&other, &results, &rev))?;
            println!("wrote {}", out_dir.join("compare.md").display());
        }
        return write_outputs(&results, &out_dir, docs && !results.settings.quick);
    }
    if !topology::is_root() {
        bail!("cargo xtask bench needs root (network namespaces, cgroups, BPF, iptables)");
    }
    let started = Instant::now();
    let quick = args.quick;
    let profile = args
        .profile
        .unwrap_or(if quick { Profile::Debug } else { Profile::Release });
    let bins = if args.no_build {
        binaries(profile)?
    } else {
        build_binaries(profile)?
    };
    bench::setup::ensure_packages()?;
    let command = std::iter::once("cargo xtask".to_string())
        .chain(std::env::args().skip(1))
        .collect::<Vec<_>>()
        .join(" ");
    let cfg = Config {
        quick,
        services: args
            .services
            .clone()
            .unwrap_or_else(|| if quick { vec![1, 1000] } else { vec![1, 1000, 5000, 10_000] }),
        endpoints_per_service: args.endpoints,
        pods: args.pods,
        rounds: args.rounds.unwrap_or(if quick { 1 } else { 10 }),
        wrk: WrkSettings {
            threads: 1,
            connections: args.connections,
            seconds: args.duration.unwrap_or(1),
        },
        sequential: args.requests.unwrap_or(if quick { 300 } else { 500 }),
        changes: args.changes.unwrap_or(if quick { 2 } else { 3 }),
        kproxy: bins.0,
        testpod: bins.1,
        profile: match profile {
            Profile::Release => "release".into(),
            Profile::Debug => "debug".into(),
        },
        command,
        iptables_nft_cap: std::time::Duration::from_secs(if quick { 10 } else { 60 }),
        tc_rounds: 1,
        tc_runs: if quick { 2_000 } else { 10_000 },
        note: args.note.clone(),
    };
    if let Some(services) = &args.scale {
        if services.is_empty() || services.contains(&0) || services.iter().any(|&n| n > 100_000) {
            bail!("--scale needs numbers of services from 1 to 100000");
        }
        kproxy_e2e::interrupt::install()?;
        let scale = bench::scale::ScaleConfig {
            kproxy: cfg.kproxy.clone(),
            testpod: cfg.testpod.clone(),
            services: services.clone(),
            endpoints_per_service: cfg.endpoints_per_service,
            changes: cfg.changes,
            cap: std::time::Duration::from_secs(args.scale_cap),
            profile: cfg.profile.clone(),
            command: cfg.command.clone(),
            note: cfg.note.clone(),
        };
        let results = bench::scale::run(&scale)?;
        fs::create_dir_all(&out_dir)?;
        fs::write(out_dir.join("scale.json"), serde_json::to_string_pretty(&results)?)?;
        let md = bench::scale::render(&results);
        fs::write(out_dir.join("scale.md"), &md)?;
        println!("wrote {}", out_dir.join("scale.md").display());
        if !args.no_docs {
            fs::write(workspace_root().join("docs/scale.md"), &md)?;
            println!("wrote docs/scale.md");
        }
        println!("\nbench --scale finished in {:.0} s", started.elapsed().as_secs_f64());
        return Ok(());
    }
    if cfg.services.is_empty() || cfg.services.contains(&0) || cfg.rounds == 0 {
        bail!("--services needs positive numbers and --rounds at least 1");
    }
    kproxy_e2e::interrupt::install()?;
    if let Some(rev) = &args.compare {
        let (commit, kproxy) = build_other(rev, profile)?;
        println!("\n==> run 1 of 2: the kproxy of {rev} ({commit})");
        let mut other = bench::run::run(&Config { kproxy, ..cfg.clone() })?;
        other.machine.kproxy_commit = commit.clone();
        fs::create_dir_all(&out_dir)?;
        let other_json = out_dir.join(format!("results-{commit}.json"));
        fs::write(&other_json, serde_json::to_string_pretty(&other)?)?;
        println!("\n==> run 2 of 2: this checkout's kproxy");
        let results = bench::run::run(&cfg)?;
        // A comparison is not the published report: docs/ stay as they are.
        write_outputs(&results, &out_dir, false)?;
        fs::write(out_dir.join("compare.md"), bench::compare::render(&other, &results, &commit))?;
        println!(
            "wrote {} and {}\nbench finished in {:.0} s",
            other_json.display(),
            out_dir.join("compare.md").display(),
            started.elapsed().as_secs_f64()
        );
        return Ok(());
    }
    let results = bench::run::run(&cfg)?;
    write_outputs(&results, &out_dir, docs)?;
    println!(
        "\nbench finished in {:.0} s (measuring {:.0} s)",
        started.elapsed().as_secs_f64(),
        results.elapsed_s
    );
    Ok(())
}

/// results.json, benchmarks.md and the plots into `out_dir`; with `docs`, also the report and
/// plots into docs/.
fn write_outputs(results: &Results, out_dir: &Path, docs: bool) -> Result<()> {
    fs::create_dir_all(out_dir)?;
    let json = out_dir.join("results.json");
    fs::write(&json, serde_json::to_string_pretty(results)?)?;
    bench::plot::render(results, &out_dir.join("img"))?;
    fs::write(out_dir.join("benchmarks.md"), bench::report::render(results, "img"))?;
    println!("wrote {} and {}", json.display(), out_dir.join("benchmarks.md").display());
    if docs {
        let dir = workspace_root().join("docs");
        bench::plot::render(results, &dir.join("img"))?;
        fs::write(dir.join("benchmarks.md"), bench::report::render(results, "img"))?;
        println!("wrote docs/benchmarks.md and docs/img/bench-*.png");
    }
    Ok(())
}

fn binaries(profile: Profile) -> Result<(PathBuf, PathBuf)> {
    let dir = target_dir()?.join(match profile {
        Profile::Release => "release",
        Profile::Debug => "debug",
    });
    let bins = (dir.join("kproxy"), dir.join("kproxy-testpod"));
    for path in [&bins.0, &bins.1] {
        if !path.is_file() {
            bail!("{} does not exist: build it first (drop --no-build)", path.display());
        }
    }
    Ok(bins)
}

/// `--compare REV`: REV's commit (12 digits) and its kproxy binary, built with `cargo xtask
/// build` in a detached git worktree `<target>/bench-compare/src-COMMIT` (kept for the next
/// comparison) into the target directory `<target>/bench-compare/target`, shared by every
/// compared commit so that only what changed is rebuilt. The clients and servers stay this
/// checkout's kproxy-testpod.
fn build_other(rev: &str, profile: Profile) -> Result<(String, PathBuf)> {
    let root = workspace_root();
    let commit = cmd::output(
        std::process::Command::new("git")
            .arg("-C")
            .arg(root)
            .args(["rev-parse", "--verify", &format!("{rev}^{{commit}}")]),
    )
    .with_context(|| format!("--compare {rev}: not a commit of this repository"))?
    .trim()
    .to_string();
    let short = commit[..12].to_string();
    let base = target_dir()?.join("bench-compare");
    let src = base.join(format!("src-{short}"));
    if !src.join("Cargo.toml").is_file() {
        fs::create_dir_all(&base)?;
        cmd::run(
            std::process::Command::new("git")
                .arg("-C")
                .arg(root)
                .args(["worktree", "add", "--detach"])
                .arg(&src)
                .arg(&commit),
        )
        .with_context(|| format!("--compare {rev}: adding a worktree at {}", src.display()))?;
    }
    let target = base.join("target");
    let mut build = cargo();
    build.current_dir(&src).env("CARGO_TARGET_DIR", &target).args(["xtask", "build"]);
    if profile == Profile::Release {
        build.arg("--release");
    }
    println!("==> building the kproxy of {rev} ({short}) in {}", src.display());
    cmd::run(&mut build).with_context(|| format!("--compare {rev}: building {}", src.display()))?;
    let kproxy = target.join(match profile {
        Profile::Release => "release",
        Profile::Debug => "debug",
    }).join("kproxy");
    if !kproxy.is_file() {
        bail!("--compare {rev}: the build made no {}", kproxy.display());
    }
    Ok((short, kproxy))
}

/// `cargo xtask build` (setup, then kproxy and kproxy-testpod) in `profile`.
fn build_binaries(profile: Profile) -> Result<(PathBuf, PathBuf)> {
    let mut build = cargo();
    build.args(["xtask", "build"]);
    if profile == Profile::Release {
        build.arg("--release");
    }
    cmd::run(&mut build)?;
    binaries(profile)
}
