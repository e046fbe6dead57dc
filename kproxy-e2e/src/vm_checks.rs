//! Checks that complement the socket_lb tests on each kernel, run by `cargo xtask vm-test` as
//! `kproxy-vm-check NAME` (inside a VM, or on the host for the host leg):
//!
//! - `programs_attached`: the agent loads every program (the tc classifiers are verified at load
//!   even when no device is configured) and attaches one kproxy program at each cgroup hook
//!   (connect4, sendmsg4, recvmsg4, getpeername4); `kproxy dump` shows the service; traffic
//!   flows; `kproxy cleanup` leaves no program and no pin; the agent's `socket_termination`
//!   event says whether stale-socket termination loaded (Linux >= 6.5) or is unavailable (older
//!   kernels).
//! - `refused_connect`: a service without endpoints refuses at once; with `ECONNREFUSED` where
//!   the kernel has `bpf_set_retval` (5.18), else with the documented `EPERM` fallback, and the
//!   agent's `attached` event says which one it chose.
//! - `tc_attach`: the tc programs attach to a veth with the mechanism the kernel has (netlink
//!   clsact filters below 6.6, TCX links from 6.6, and netlink forced there too; the `attached`
//!   event agrees), and `kproxy cleanup` removes them. Runs in a private network and mount namespace with its own
//!   sysfs, cgroup2 and bpffs mounts: kproxy finds devices through `/sys/class/net`, which
//!   shows the devices of the namespace sysfs was mounted in, not of the caller's.
//!
//! Each prints `VMTEST-NOTE` lines (what it observed) and `VMTEST-FALLBACK` lines (a documented
//! fallback was in effect) for the [`Collector`](xtask::vm::Collector).

use std::fs::{self, File};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

use xtask::vm::{has_set_retval, kernel_release, release_version, CHECKS, MARK};
use crate::cmd;
use crate::events::{self, Event, SocketTerminationStatus, TcAttachment, EVENT_FILE_FLAG};
use crate::harness::{unique_bpffs_dir, Binaries, Dump, Harness, HTTP_PORT};
use crate::manifest::{self, Protocol, ServiceSpec};
use crate::topology::unique_name;

const WEB_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const WEB: &str = "10.96.0.10:80";
const EMPTY_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 99);
const EMPTY: &str = "10.96.0.99:80";
/// Generous: agents start slowly under software emulation.
const PROGRAMMED: Duration = Duration::from_secs(30);
const CLIENT_WAIT: Duration = Duration::from_secs(60);

/// The cgroup hooks and the kproxy program at each: (bpftool's attach type names, old and
/// libbpf's, program).
const CGROUP_HOOKS: [(&str, &str, &str); 4] = [
    ("connect4", "cgroup_inet4_connect", "kp_connect4"),
    ("sendmsg4", "cgroup_udp4_sendmsg", "kp_sendmsg4"),
    ("recvmsg4", "cgroup_udp4_recvmsg", "kp_recvmsg4"),
    ("getpeername4", "cgroup_inet4_getpeername", "kp_getpeername4"),
];
const TC_PROGRAMS: [&str; 2] = ["kp_tc_ingress", "kp_tc_egress"];

fn note(text: &str) {
    println!("{MARK}NOTE {text}");
}

fn fallback(text: &str) {
    println!("{MARK}FALLBACK {text}");
}

/// Runs the check `name` with the binaries from `KPROXY_BIN` and `KPROXY_TESTPOD_BIN`.
pub fn run(name: &str) -> Result<()> {
    let bins = Binaries::from_env()?;
    match name {
        "programs_attached" => programs_attached(bins),
        "refused_connect" => refused_connect(bins),
        "tc_attach" => tc_attach(bins),
        other => bail!("no check {other:?}; the checks are {CHECKS:?}"),
    }
}

/// `bpftool <args> -j`, parsed; empty output (bpftool prints nothing for "none") is `[]`.
fn bpftool_json(args: &[&str]) -> Result<Value> {
    let mut bpftool = Command::new("bpftool");
    bpftool.args(args).arg("-j");
    let out = cmd::output(&mut bpftool)?;
    if out.trim().is_empty() {
        return Ok(Value::Array(Vec::new()));
    }
    serde_json::from_str(&out).with_context(|| format!("bpftool {args:?} printed {out:?}"))
}

/// `(attach_type, program name)` of the programs attached to `cgroup` itself.
fn cgroup_programs(cgroup: &Path) -> Result<Vec<(String, String)>> {
    let path = cgroup.to_string_lossy();
    let shown = bpftool_json(&["cgroup", "show", &path])?;
    let Value::Array(programs) = shown else {
        bail!("bpftool cgroup show printed {shown}");
    };
    Ok(programs
        .iter()
        .map(|p| {
            let text = |k: &str| p.get(k).and_then(Value::as_str).unwrap_or("?").to_string();
            (text("attach_type"), text("name"))
        })
        .collect())
}

/// `result` of `kproxy cleanup --cgroup`; when it failed, says whether the cgroup's programs
/// went away on their own within two seconds (kproxy checked before the kernel's deferred
/// release of the unpinned links) or stayed (a leak).
fn explain_cleanup<T>(result: Result<T>, cgroup: &Path) -> Result<T> {
    let error = match result {
        Ok(value) => return Ok(value),
        Err(e) => e,
    };
    let start = Instant::now();
    let mut left = cgroup_programs(cgroup);
    while start.elapsed() < Duration::from_secs(2) {
        if left.as_ref().is_ok_and(|l| l.is_empty()) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
        left = cgroup_programs(cgroup);
    }
    let after = match left {
        Ok(l) if l.is_empty() => format!(
            "kproxy cleanup failed, yet its programs were detached {} ms later without further \
             action: the kernel releases unpinned links asynchronously (bpffs frees the pin's \
             inode after an RCU grace period), and kproxy's check ran before that",
            start.elapsed().as_millis()
        ),
        Ok(l) => format!("still attached after 2 s: {l:?}"),
        Err(e) => format!("querying the cgroup afterwards failed: {e:#}"),
    };
    Err(error.context(after))
}

fn programs_attached(bins: Binaries) -> Result<()> {
    let mut h = Harness::new(bins, &["pod-a"], unique_bpffs_dir("kproxy-vm"))?;
    let web = ServiceSpec::new("web", WEB_IP, 80, "http", Protocol::Tcp, HTTP_PORT).endpoint(
        "pod-a",
        h.topology.pod("pod-a").ip,
        true,
    );
    h.write_services(std::slice::from_ref(&web))?;
    let started = Instant::now();
    h.start_agent()?;
    h.wait_for_services(std::slice::from_ref(&web), PROGRAMMED)?;
    note(&format!(
        "agent loaded every program and programmed the service in {} ms",
        started.elapsed().as_millis()
    ));

    let attached = cgroup_programs(h.cgroup.path())?;
    for (hook, libbpf_name, program) in CGROUP_HOOKS {
        ensure!(
            attached
                .iter()
                .any(|(t, n)| (t == hook || t == libbpf_name) && n == program),
            "{program} is not attached at {hook} on {}: bpftool shows {attached:?}\nagent log:\n{}",
            h.cgroup.path().display(),
            h.agent_log()
        );
    }
    note(&format!(
        "cgroup hooks: {}",
        attached
            .iter()
            .map(|(t, n)| format!("{t}={n}"))
            .collect::<Vec<_>>()
            .join(" ")
    ));

    // Stale-socket termination (bpf_sock_destroy, Linux 6.5) is optional: below 6.5 the agent
    // says once that it is unavailable and serves everything else.
    let release = kernel_release()?;
    let termination = h
        .socket_termination()?
        .with_context(|| format!("the agent wrote no socket_termination event:\n{}", h.agent_log()))?;
    if release_version(&release).is_some_and(|v| v >= (6, 5)) {
        ensure!(
            termination.status == SocketTerminationStatus::Available,
            "on {release} the agent must load the socket iterators: {termination:?}\n{}",
            h.agent_log_full()
        );
        note("stale-socket termination: iter/udp and iter/tcp loaded (bpf_sock_destroy)");
    } else {
        ensure!(
            termination.status == SocketTerminationStatus::Unavailable,
            "on {release} the agent must say stale-socket termination is unavailable: {termination:?}\n{}",
            h.agent_log_full()
        );
        fallback(&format!(
            "stale-socket termination unavailable below 6.5: {}",
            termination.error.unwrap_or_default()
        ));
    }

    let table = h.dump_table()?;
    println!("kproxy dump:\n{table}");
    let backend = format!("{}:{HTTP_PORT}", h.topology.pod("pod-a").ip);
    ensure!(
        table.contains(WEB) && table.contains(&backend),
        "kproxy dump does not show {WEB} -> {backend}:\n{table}"
    );

    let report = h.run_client(&["http", "--addr", WEB, "--count", "3"], CLIENT_WAIT)?;
    ensure!(
        report.ok == 3 && report.peers.get(WEB) == Some(&3),
        "3 requests to {WEB}: {report:?}"
    );

    let cgroup = h.cgroup.path().to_path_buf();
    explain_cleanup(h.cleanup(), &cgroup)?;
    ensure!(
        !h.bpffs_dir().exists(),
        "{} remains after kproxy cleanup",
        h.bpffs_dir().display()
    );
    let left = cgroup_programs(h.cgroup.path())?;
    ensure!(left.is_empty(), "still attached after kproxy cleanup: {left:?}");
    Ok(())
}

fn refused_connect(bins: Binaries) -> Result<()> {
    let release = kernel_release()?;
    let new_kernel = has_set_retval(&release);
    let mut h = Harness::new(bins, &["pod-a"], unique_bpffs_dir("kproxy-vm"))?;
    let empty = ServiceSpec::new("empty", EMPTY_IP, 80, "http", Protocol::Tcp, HTTP_PORT);
    h.write_services(std::slice::from_ref(&empty))?;
    h.start_agent()?;
    h.wait_for_services(std::slice::from_ref(&empty), PROGRAMMED)?;

    let report = h.run_client(&["http", "--addr", EMPTY, "--count", "5"], CLIENT_WAIT)?;
    let log = h.agent_log();
    let chosen = h.attached()?.map(|a| a.set_retval);

    let expected = if new_kernel {
        "ConnectionRefused"
    } else {
        "PermissionDenied"
    };
    ensure!(
        report.ok == 0 && report.errors.get(expected) == Some(&5) && report.errors.len() == 1,
        "on {release} a connect to a service without endpoints must fail with {expected} \
         5 times, got ok={} errors={:?} (first: {:?})",
        report.ok,
        report.errors,
        report.first_error
    );
    let slowest = report.failure_ms.map(|l| l.max).unwrap_or(f64::NAN);
    ensure!(
        slowest < 100.0,
        "refusal took {slowest} ms, expected < 100 ms"
    );
    ensure!(
        chosen == Some(new_kernel),
        "the agent's attached event says set_retval={chosen:?} on {release} (expected {new_kernel}):\n{log}"
    );
    let chosen = chosen.map(|c| c.to_string());
    if new_kernel {
        note(&format!(
            "refused connect: ECONNREFUSED in {slowest:.2} ms (bpf_set_retval, agent set_retval={})",
            chosen.unwrap_or_default()
        ));
    } else {
        fallback(&format!(
            "refused connect: EPERM instead of ECONNREFUSED in {slowest:.2} ms; no bpf_set_retval \
             below 5.18, the agent detected {release} and reported set_retval={}",
            chosen.unwrap_or_default()
        ));
    }
    // Last, so that what the kernel did is reported even if the cleanup fails.
    let cgroup = h.cgroup.path().to_path_buf();
    explain_cleanup(h.cleanup(), &cgroup)?;
    Ok(())
}

/// `tcx` or `netlink`, as `--tc-attach` spells them.
fn tc_name(mode: TcAttachment) -> &'static str {
    match mode {
        TcAttachment::Tcx => "tcx",
        TcAttachment::Netlink => "netlink",
    }
}

/// A child process killed (and reaped) on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Moves this process into fresh network and mount namespaces, with sysfs, cgroup2 and bpffs
/// mounted for them. Nothing propagates back: the host's network and mounts are untouched, and
/// both namespaces vanish with this process and its children.
fn private_namespaces() -> Result<()> {
    use nix::mount::{mount, MsFlags};
    // SAFETY: unshare has no memory-safety preconditions; it only affects this process.
    if unsafe { libc::unshare(libc::CLONE_NEWNET | libc::CLONE_NEWNS) } != 0 {
        return Err(std::io::Error::last_os_error()).context("unshare(CLONE_NEWNET | CLONE_NEWNS)");
    }
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>)
        .context("making / private")?;
    mount(Some("sysfs"), "/sys", Some("sysfs"), MsFlags::empty(), None::<&str>)
        .context("mounting sysfs for the new network namespace")?;
    mount(Some("cgroup2"), "/sys/fs/cgroup", Some("cgroup2"), MsFlags::empty(), None::<&str>)
        .context("mounting cgroup2 at /sys/fs/cgroup")?;
    mount(Some("bpf"), "/sys/fs/bpf", Some("bpf"), MsFlags::empty(), None::<&str>)
        .context("mounting bpffs at /sys/fs/bpf")?;
    Ok(())
}

fn ip(args: &[&str]) -> Result<()> {
    cmd::output(Command::new("ip").args(args)).map(drop)
}

/// The kproxy programs bpftool lists on `device` (tc filters and, where bpftool knows them,
/// TCX links), as `kind=name`.
fn device_programs(device: &str) -> Result<Vec<String>> {
    let shown = bpftool_json(&["net", "show", "dev", device])?;
    let mut found = Vec::new();
    for entry in shown.as_array().into_iter().flatten() {
        let Some(sections) = entry.as_object() else { continue };
        for (section, programs) in sections {
            for p in programs.as_array().into_iter().flatten() {
                let name = p.get("name").and_then(Value::as_str).unwrap_or("");
                let kind = p.get("kind").and_then(Value::as_str).unwrap_or(section);
                if name.starts_with("kp_") {
                    found.push(format!("{kind}={name}"));
                }
            }
        }
    }
    Ok(found)
}

fn tc_attach(bins: Binaries) -> Result<()> {
    let release = kernel_release()?;
    let has_tcx = release_version(&release).is_some_and(|v| v >= (6, 6));
    private_namespaces()?;
    let device = "kpvm0";
    ip(&["link", "set", "lo", "up"])?;
    ip(&["link", "add", device, "type", "veth", "peer", "name", "kpvm1"])?;
    ip(&["addr", "add", "192.168.77.1/24", "dev", device])?;
    ip(&["link", "set", device, "up"])?;
    ip(&["link", "set", "kpvm1", "up"])?;

    let cgroup = PathBuf::from("/sys/fs/cgroup").join(unique_name("kproxy-vm-tc"));
    fs::create_dir(&cgroup).with_context(|| format!("mkdir {}", cgroup.display()))?;
    let result = tc_attach_modes(&bins, &cgroup, device, has_tcx);
    if let Err(e) = fs::remove_dir(&cgroup) {
        eprintln!("warning: rmdir {}: {e}", cgroup.display());
    }
    result
}

fn tc_attach_modes(bins: &Binaries, cgroup: &Path, device: &str, has_tcx: bool) -> Result<()> {
    let work = std::env::temp_dir().join(unique_name("kproxy-vm-tc"));
    let manifests = work.join("manifests");
    fs::create_dir_all(&manifests).with_context(|| format!("creating {}", manifests.display()))?;
    let web = ServiceSpec::new("web", WEB_IP, 80, "http", Protocol::Tcp, HTTP_PORT).endpoint(
        "pod-a",
        Ipv4Addr::new(10, 244, 1, 10),
        true,
    );
    fs::write(manifests.join("services.yaml"), manifest::to_yaml(std::slice::from_ref(&web)))?;
    // Auto picks TCX from 6.6; netlink is forced there too, to keep the older path working.
    let modes: &[(&str, TcAttachment)] = if has_tcx {
        &[("auto", TcAttachment::Tcx), ("netlink", TcAttachment::Netlink)]
    } else {
        &[("auto", TcAttachment::Netlink)]
    };
    let result = modes.iter().try_for_each(|&(flag, mode)| {
        tc_attach_once(bins, cgroup, device, &manifests, &web, flag, mode)
    });
    let _ = fs::remove_dir_all(&work);
    result
}

fn tc_attach_once(
    bins: &Binaries,
    cgroup: &Path,
    device: &str,
    manifests: &Path,
    web: &ServiceSpec,
    flag: &str,
    mode: TcAttachment,
) -> Result<()> {
    let bpffs = unique_bpffs_dir("kproxy-vm-tc");
    let bpffs_arg = bpffs.to_string_lossy().to_string();
    let log_path = manifests.with_file_name(format!("agent-{flag}.log"));
    let events_path = manifests.with_file_name(format!("agent-{flag}.events.jsonl"));
    let log = File::create(&log_path)?;
    let agent = Command::new(&bins.kproxy)
        .arg("run")
        .arg("--manifests")
        .arg(manifests)
        .args(["--bpffs-dir", &bpffs_arg, "--devices", device, "--tc-attach", flag])
        .arg("--cgroup")
        .arg(cgroup)
        .arg(EVENT_FILE_FLAG)
        .arg(&events_path)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting kproxy run")?;
    let mut agent = Killed(agent);
    let read_log = || fs::read_to_string(&log_path).unwrap_or_default();

    let start = Instant::now();
    loop {
        let dump = cmd::output(Command::new(&bins.kproxy).args(["dump", "--json", "--bpffs-dir", &bpffs_arg]))
            .and_then(|json| Dump::parse(&json));
        if dump.as_ref().is_ok_and(|d| d.matches_all(std::slice::from_ref(web))) {
            break;
        }
        if let Some(status) = agent.0.try_wait()? {
            bail!("kproxy run --tc-attach {flag} exited ({status}):\n{}", read_log());
        }
        if start.elapsed() > PROGRAMMED {
            bail!("kproxy run --tc-attach {flag} did not program the service within {PROGRAMMED:?} (last dump: {dump:?}):\n{}", read_log());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let attached = events::read(&events_path)?.into_iter().rev().find_map(|e| match e {
        Event::Attached(a) => Some(a.tc),
        _ => None,
    });
    ensure!(
        attached == Some(mode),
        "--tc-attach {flag}: expected tc={} in the agent's attached event, found {attached:?}:\n{}",
        tc_name(mode),
        read_log()
    );
    let shown = device_programs(device)?;
    match mode {
        TcAttachment::Netlink => {
            for (program, direction) in TC_PROGRAMS.iter().zip(["ingress", "egress"]) {
                ensure!(
                    shown.iter().any(|s| s.contains(direction) && s.ends_with(&format!("={program}"))),
                    "--tc-attach {flag}: no {program} filter at {direction} of {device}: bpftool shows {shown:?}"
                );
            }
        }
        TcAttachment::Tcx => {
            for program in TC_PROGRAMS {
                let pin = bpffs.join("links").join(format!("{program}_{device}"));
                let link = bpftool_json(&["link", "show", "pinned", &pin.to_string_lossy()])
                    .with_context(|| format!("TCX link of {program} pinned at {}", pin.display()))?;
                // bpftool before 7.3 does not know TCX and prints its number (BPF_LINK_TYPE_TCX).
                let kind = link.get("type").cloned().unwrap_or_default();
                ensure!(
                    kind == "tcx" || kind == 11,
                    "the link pinned at {} is {link}, not a TCX link",
                    pin.display()
                );
            }
        }
    }
    note(&format!(
        "tc --tc-attach {flag}: {} on {device} ({})",
        tc_name(mode),
        if shown.is_empty() {
            "bpftool net lists no kp_ program here; TCX links checked through their pins".to_string()
        } else {
            shown.join(" ")
        }
    ));

    // SIGTERM, as a DaemonSet rollout would; the programs stay attached (pinned or in the kernel).
    // SAFETY: kill has no memory-safety preconditions; the pid is our own live child.
    unsafe { libc::kill(agent.0.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while agent.0.try_wait()?.is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(agent);

    let mut cleanup = Command::new(&bins.kproxy);
    cleanup.args(["cleanup", "--bpffs-dir", &bpffs_arg]).arg("--cgroup").arg(cgroup);
    let said = explain_cleanup(cmd::output(&mut cleanup), cgroup)?;
    let left = device_programs(device)?;
    ensure!(
        left.is_empty(),
        "--tc-attach {flag}: kproxy cleanup ({}) left {left:?} on {device}",
        said.trim()
    );
    ensure!(!bpffs.exists(), "{} remains after kproxy cleanup", bpffs.display());
    let cgroup_left = cgroup_programs(cgroup)?;
    ensure!(cgroup_left.is_empty(), "still attached to the cgroup after kproxy cleanup: {cgroup_left:?}");
    note(&format!("tc --tc-attach {flag}: kproxy cleanup: {}", said.trim()));
    Ok(())
}
