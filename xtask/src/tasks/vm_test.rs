//! `cargo xtask vm-test`: the datapath tests on Debian's 5.10, 6.1 and 6.12 kernels under qemu,
//! and on the host kernel. See [`xtask::vm`] for how.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;
use xtask::vm::{
    self, debian, initramfs, modules::ModuleTree, qemu, Collector, LegResult, Plan, ScriptMode,
    ScriptPaths, Suite,
};
use xtask::workspace::Binaries;
use xtask::{cmd, interrupt};

use super::{build, cargo, target_dir};

#[derive(clap::Args)]
pub struct Args {
    /// Kernels, comma-separated: 5.10, 6.1, 6.12, all (those three), host (this machine's
    /// kernel, same tests, no VM).
    #[arg(long, value_delimiter = ',', default_value = "all")]
    kernel: Vec<String>,
    /// Run every socket_lb test, not only the kernel-floor set (xtask::vm::CORE_TESTS).
    #[arg(long)]
    all_tests: bool,
    /// Only the steps whose id (`check:NAME`, `socket_lb:NAME`, `tc_datapath:NAME`,
    /// `nodeport:NAME`) contains one of these, comma-separated.
    #[arg(long, value_delimiter = ',')]
    filter: Vec<String>,
    /// Hard limit for one VM (boot, every step, power-off), in seconds.
    #[arg(long, default_value_t = 1500)]
    timeout: u64,
    /// Limit for one step inside a run, in seconds.
    #[arg(long, default_value_t = 300)]
    step_timeout: u64,
    /// Virtual CPUs of each VM. With more than 1, qemu 7.2's TCG often crashes Debian's 6.12
    /// early in boot.
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// qemu's `-cpu` for each VM. Without `-cx16`, qemu 7.2's TCG crashes Debian's 6.12 (see
    /// xtask/src/vm/qemu.rs).
    #[arg(long, default_value = "max,-cx16")]
    qemu_cpu: String,
    /// Memory of each VM, in MiB.
    #[arg(long, default_value_t = 1024)]
    memory: u32,
    /// Test the debug build of kproxy (as `cargo xtask test` does) instead of a release build.
    /// Under emulation a debug agent needs about 10 s to start, longer than the socket_lb tests
    /// wait for it.
    #[arg(long)]
    debug_binaries: bool,
    /// Test this kproxy binary instead of the one built from the workspace (for example a
    /// candidate fix, or a release artifact).
    #[arg(long)]
    kproxy: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Leg {
    Vm(&'static str),
    Host,
}

fn legs(requested: &[String]) -> Result<Vec<Leg>> {
    let mut legs = Vec::new();
    for k in requested {
        let new: Vec<Leg> = match k.trim() {
            "all" => vm::SERIES.iter().map(|s| Leg::Vm(s)).collect(),
            "host" => vec![Leg::Host],
            other => match vm::SERIES.iter().find(|s| **s == other) {
                Some(s) => vec![Leg::Vm(s)],
                None => bail!(
                    "--kernel {other}: expected one of {}, all, host",
                    vm::SERIES.join(", ")
                ),
            },
        };
        for leg in new {
            if !legs.contains(&leg) {
                legs.push(leg);
            }
        }
    }
    Ok(legs)
}

pub fn run(args: Args) -> Result<()> {
    let legs = legs(&args.kernel)?;
    interrupt::install()?;
    let debug_bins = build::build(false)?;
    // The agent under test is a release build, as shipped: under emulation a debug agent needs
    // about 10 s to start, longer than the socket_lb tests wait for it. The test workload
    // (kproxy-testpod) is the debug build that `build` just made.
    let mut bins = debug_bins.clone();
    if args.kproxy.is_none() && !args.debug_binaries {
        println!("vm: building kproxy in release mode");
        cmd::run(cargo().args(["build", "--release", "--package", "kproxy", "--bin", "kproxy"]))?;
        bins.kproxy = target_dir()?.join("release/kproxy");
        bins.check()?;
    }
    if let Some(kproxy) = &args.kproxy {
        bins.kproxy = fs::canonicalize(kproxy).with_context(|| format!("--kproxy {}", kproxy.display()))?;
    }
    println!("vm: building the test binaries");
    let socket_lb = test_binary("kproxy-e2e", "socket_lb")?;
    let tc_datapath = test_binary("kproxy", "tc_datapath")?;
    let nodeport = test_binary("kproxy-e2e", "nodeport")?;
    let checks = target_dir()?.join("debug/kproxy-vm-check");
    if !checks.is_file() {
        bail!("{} does not exist after the build", checks.display());
    }

    let mut tests: Vec<(Suite, String)> = Vec::new();
    let socket_lb_tests = list_tests(&socket_lb)?;
    if args.all_tests {
        tests.extend(socket_lb_tests.into_iter().map(|t| (Suite::SocketLb, t)));
    } else {
        for name in vm::CORE_TESTS {
            if !socket_lb_tests.iter().any(|t| t == name) {
                bail!("socket_lb has no test {name} (xtask::vm::CORE_TESTS is out of date)");
            }
            tests.push((Suite::SocketLb, name.to_string()));
        }
    }
    tests.extend(
        list_tests(&tc_datapath)?
            .into_iter()
            .filter(|t| !vm::TC_DATAPATH_SKIPPED.contains(&t.as_str()))
            .map(|t| (Suite::TcDatapath, t)),
    );
    let nodeport_tests = list_tests(&nodeport)?;
    for name in vm::NODEPORT_TESTS {
        if !nodeport_tests.iter().any(|t| t == name) {
            bail!("nodeport has no test {name} (xtask::vm::NODEPORT_TESTS is out of date)");
        }
        tests.push((Suite::NodePort, name.to_string()));
    }
    let mut plan = Plan::new(&tests, Duration::from_secs(args.step_timeout));
    if !args.filter.is_empty() {
        plan.steps.retain(|step| args.filter.iter().any(|f| step.id().contains(f.as_str())));
    }

    let cache = target_dir()?.join("vm");
    let logs = cache.join("logs");
    fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let host = Programs {
        checks,
        socket_lb,
        tc_datapath,
        nodeport,
        bins,
    };
    // One private apt for every leg: a cold cache runs `apt-get update` once, not per kernel.
    let mut apt = debian::Apt::new(&cache.join("apt"))?;
    let mut results = Vec::new();
    for leg in &legs {
        interrupt::check()?;
        let result = match leg {
            Leg::Host => run_host(&plan, &host, &logs, &args),
            Leg::Vm(series) => run_vm(series, &plan, &host, &cache, &mut apt, &args),
        };
        let result = result.with_context(|| format!("vm-test leg {leg:?}"))?;
        println!("vm: {} finished in {:.1}s", result.label, result.total.as_secs_f64());
        results.push(result);
    }
    let table = vm::render(&results);
    let summary = cache.join("summary.txt");
    fs::write(&summary, &table).with_context(|| format!("writing {}", summary.display()))?;
    println!("\n==> vm-test results (also in {}; serial logs in {})\n{table}", summary.display(), logs.display());
    let failed: Vec<&str> = results.iter().filter(|r| r.failed()).map(|r| r.label.as_str()).collect();
    if !failed.is_empty() {
        bail!("vm-test failed on: {}", failed.join(", "));
    }
    println!("vm-test passed on: {}", results.iter().map(|r| r.label.as_str()).collect::<Vec<_>>().join(", "));
    Ok(())
}

/// The host's copies of everything a run executes.
struct Programs {
    /// kproxy-e2e's `kproxy-vm-check`.
    checks: PathBuf,
    socket_lb: PathBuf,
    tc_datapath: PathBuf,
    nodeport: PathBuf,
    bins: Binaries,
}

/// `cargo test --no-run -p <package> --test <test>`, and the executable it built.
fn test_binary(package: &str, test: &str) -> Result<PathBuf> {
    let mut command = cargo();
    command.args(["test", "--no-run", "--message-format=json", "--package", package, "--test", test]);
    let out = cmd::output(&mut command)?;
    out.lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|msg| msg["reason"] == "compiler-artifact" && msg["target"]["name"] == test)
        .find_map(|msg| msg["executable"].as_str().map(PathBuf::from))
        .with_context(|| format!("`{}` named no executable for {test}", cmd::describe(&command)))
}

/// The test names in a libtest binary (`--list`).
fn list_tests(binary: &Path) -> Result<Vec<String>> {
    let out = cmd::output(Command::new(binary).arg("--list"))?;
    Ok(out
        .lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .map(str::to_string)
        .collect())
}

fn path_str(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// `name` on PATH (and the sbin directories, which a non-login PATH may lack), symlinks resolved.
fn which(name: &str) -> Result<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.is_file());
    found
        .map(|p| fs::canonicalize(&p).unwrap_or(p))
        .with_context(|| format!("{name} is not installed (cargo xtask setup installs it)"))
}

fn run_host(plan: &Plan, host: &Programs, logs: &Path, args: &Args) -> Result<LegResult> {
    let start = Instant::now();
    let version = vm::kernel_release()
        .ok()
        .and_then(|r| vm::release_version(&r))
        .context("reading the host's kernel version")?;
    let plan = &plan.for_kernel(version);
    let mut collector = Collector::new("host", plan, start);
    if !cmd::is_root() {
        let mut result = collector.finish(Instant::now(), Some("needs root".into()));
        result.problems.push("the host leg needs root".into());
        return Ok(result);
    }
    let paths = ScriptPaths {
        checks: path_str(&host.checks),
        socket_lb: path_str(&host.socket_lb),
        tc_datapath: path_str(&host.tc_datapath),
        nodeport: path_str(&host.nodeport),
        kproxy: path_str(&host.bins.kproxy),
        testpod: path_str(&host.bins.testpod),
    };
    let script = vm::script(plan, &paths, &ScriptMode::Host);
    let mut sh = Command::new("sh");
    sh.arg("-c").arg(&script);
    let ended = qemu::stream(
        sh,
        Duration::from_secs(args.timeout),
        &logs.join("host.log"),
        "[host] ",
        |line, at| collector.feed(line, at),
    )?;
    Ok(finish(collector, ended))
}

fn finish(collector: Collector, ended: qemu::Ended) -> LegResult {
    let how = match ended {
        qemu::Ended::Exited(status) if collector.done() => {
            let _ = status;
            None
        }
        qemu::Ended::Exited(status) => Some(format!("exited early ({status})")),
        qemu::Ended::TimedOut => Some("killed at the --timeout".to_string()),
        qemu::Ended::Interrupted => Some("interrupted".to_string()),
    };
    collector.finish(Instant::now(), how)
}

/// Where the programs go in the image.
const GUEST_DIR: &str = "/opt/kproxy";

fn run_vm(
    series: &str,
    plan: &Plan,
    host: &Programs,
    cache: &Path,
    apt: &mut debian::Apt,
    args: &Args,
) -> Result<LegResult> {
    let prepared = Instant::now();
    qemu::ensure_installed()?;
    let kernel = debian::kernel(apt, cache, series)?;
    let version = vm::release_version(&kernel.release)
        .with_context(|| format!("no version in the kernel release {}", kernel.release))?;
    let plan = &plan.for_kernel(version);
    let busybox = debian::busybox(apt, cache)?;
    let modules = ModuleTree::open(&kernel.modules_dir())?.load_order(&vm::MODULES)?;

    let guest = |name: &str| format!("{GUEST_DIR}/{name}");
    let paths = ScriptPaths {
        checks: guest("kproxy-vm-check"),
        socket_lb: guest("socket_lb"),
        tc_datapath: guest("tc_datapath"),
        nodeport: guest("nodeport"),
        kproxy: guest("kproxy"),
        testpod: guest("kproxy-testpod"),
    };
    let mode = ScriptMode::Guest {
        modules: modules
            .iter()
            .map(|m| (m.name.clone(), format!("{}/{}.ko", initramfs::MODULE_DIR, m.name)))
            .collect(),
    };
    let mut programs = vec![
        (host.checks.clone(), paths.checks.clone()),
        (host.socket_lb.clone(), paths.socket_lb.clone()),
        (host.tc_datapath.clone(), paths.tc_datapath.clone()),
        (host.nodeport.clone(), paths.nodeport.clone()),
        (host.bins.kproxy.clone(), paths.kproxy.clone()),
        (host.bins.testpod.clone(), paths.testpod.clone()),
    ];
    for tool in ["ip", "curl"] {
        programs.push((which(tool)?, format!("/usr/local/bin/{tool}")));
    }
    let bpftool = if vm::release_version(series).is_some_and(|v| v < (6, 0)) {
        debian::bullseye_bpftool(apt, cache)?
    } else {
        which("bpftool")?
    };
    programs.push((bpftool, "/usr/local/bin/bpftool".into()));
    let contents = initramfs::Contents {
        busybox,
        programs,
        modules,
        init: vm::script(plan, &paths, &mode),
    };
    let initrd = cache.join(format!("initramfs-{series}.cpio"));
    let size = initramfs::build(&contents, &initrd, &cache.join("staging"))?;
    println!(
        "vm: {series}: kernel {} ({}), initramfs {} MiB with modules {}, prepared in {:.1}s",
        kernel.release,
        kernel.deb.file_name().unwrap_or_default().to_string_lossy(),
        size / (1024 * 1024),
        contents.modules.iter().map(|m| m.name.as_str()).collect::<Vec<_>>().join(" "),
        prepared.elapsed().as_secs_f64()
    );

    let boot = qemu::Boot {
        kernel: &kernel.vmlinuz(),
        initrd: &initrd,
        memory_mb: args.memory,
        cpu_model: args.qemu_cpu.clone(),
        cpus: args.cpus,
        timeout: Duration::from_secs(args.timeout),
        log: cache.join("logs").join(format!("{series}.log")),
        prefix: format!("[{series}] "),
    };
    let mut attempt = 1;
    loop {
        let start = Instant::now();
        let mut collector = Collector::new(series, plan, start);
        let ended = qemu::run(&boot, |line, at| collector.feed(line, at))?;
        let mut result = finish(collector, ended);
        // A kernel that dies before /init prints anything is emulation trouble, not a result
        // about kproxy: boot once more, and say so.
        if result.release.is_none() && attempt == 1 && !interrupt::requested() {
            println!("vm: {series}: the kernel died before /init ran (see {}); booting again", boot.log.display());
            let first_log = boot.log.with_extension("attempt1.log");
            let _ = fs::rename(&boot.log, &first_log);
            attempt += 1;
            continue;
        }
        if attempt > 1 {
            result.notes.push(format!(
                "the first boot died before /init ran (emulation); this is the second ({})",
                boot.log.with_extension("attempt1.log").display()
            ));
        }
        return Ok(result);
    }
}
