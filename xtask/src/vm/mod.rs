//! `cargo xtask vm-test`: kproxy's privileged datapath tests on the kernels it promises to
//! support, each booted under `qemu-system-x86_64` (TCG software emulation), and on the host.
//!
//! - [`debian`]: Debian's cloud kernels (5.10, 6.1, 6.12) and busybox-static, fetched once with
//!   a private apt configuration and cached under `<target>/vm/`.
//! - [`modules`]: the kernel modules the tests need (veth, bridge, and for the tc datapath
//!   cls_bpf and sch_ingress) with their dependencies, in load order.
//! - [`initramfs`]: the initramfs: busybox, the test binaries with their shared libraries,
//!   `ip`, `bpftool`, `curl`, the modules, and `/init` (the [`script`] of the [`Plan`]).
//! - [`qemu`]: installing qemu if missing, booting with a hard timeout, streaming the serial
//!   console.
//! - the checks ([`CHECKS`]) that the socket_lb tests do not make (every program attached at its
//!   hook, `kproxy dump`, the refused-connect fallback) are kproxy-e2e's (`src/vm_checks.rs`),
//!   run inside the VM as `kproxy-vm-check NAME`.
//!
//! The NodePort end-to-end tests (kproxy-e2e/tests/nodeport.rs) carry the tc path through a veth pair:
//! an external client namespace reaches pods through the node's device.
//!
//! Every run, in a VM or on the host, is the same shell [`script`]: it prints `VMTEST-*` marker
//! lines around each step, and a [`Collector`] turns the output into a [`LegResult`].

pub mod cpio;
pub mod debian;
pub mod initramfs;
pub mod modules;
pub mod qemu;

use std::fmt::Write as _;
use std::fs;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// The kernel series a VM leg can boot, oldest first.
pub const SERIES: [&str; 3] = ["5.10", "6.1", "6.12"];

/// Modules loaded in every VM (with their dependencies): veth and bridge for the test topology;
/// cls_bpf and sch_ingress for the tc datapath (issue 4), loaded already so that a missing one
/// shows up now.
pub const MODULES: [&str; 4] = ["veth", "bridge", "cls_bpf", "sch_ingress"];

/// The socket_lb tests run by default: what the kernel floor depends on. TCP and UDP ClusterIP
/// with `getpeername`, the refused connect (a helper newer than 5.10), pinned links outliving
/// the agent, the link swap of a restart, and `kproxy cleanup`.
pub const CORE_TESTS: [&str; 6] = [
    "tcp_clusterip_spreads_over_every_ready_backend",
    "udp_reply_comes_from_service_address",
    "service_without_endpoints_refuses_fast",
    "datapath_survives_kill_9",
    "restart_without_disruption",
    "cleanup_leaves_nothing",
];

/// The socket_lb test whose `ECONNREFUSED` needs `bpf_set_retval` (Linux 5.18); below that the
/// agent falls back to `EPERM`, which the test's assertion does not accept.
pub const REFUSAL_TEST: &str = "service_without_endpoints_refuses_fast";

/// kproxy's tc_datapath tests (BPF_PROG_TEST_RUN on crafted frames) that a run leaves out: this
/// one only measures, 2.4 million test runs, which software emulation makes meaningless.
pub const TC_DATAPATH_SKIPPED: [&str; 1] = ["per_packet_cost_next_to_an_empty_program"];

/// The NodePort end-to-end tests run by default (the tc path through a veth pair): TCP, UDP and
/// the RST/ICMP refusal with netlink tc filters (every kernel), a kept-alive flow across a
/// `kill -9` and restart of the agent with `--tc-attach auto` (netlink below 6.6, TCX from 6.6)
/// followed by `kproxy cleanup`, the same traffic with TCX links (6.6 and later, see
/// [`KERNEL_REQUIREMENTS`]), and the per-service counters switched on (`--service-counters`),
/// whose counting paths the verifier sees only then, on both the socket and the tc programs.
pub const NODEPORT_TESTS: [&str; 4] = [
    "node_port_reaches_local_backends_netlink",
    "a_node_port_flow_survives_an_agent_restart",
    "node_port_reaches_local_backends_tcx",
    "service_counters_count_real_connections_per_frontend_up_to_the_bound",
];

/// Steps that need a kernel feature newer than 5.10: (step id, first kernel with it, what the
/// table says below that). On older kernels the step is not run and shows as not applicable,
/// which is not a failure.
pub const KERNEL_REQUIREMENTS: [(&str, (u32, u32), &str); 1] = [(
    "nodeport:node_port_reaches_local_backends_tcx",
    (6, 6),
    "n/a below 6.6: TCX links (BPF_TCX_INGRESS/EGRESS) arrive in Linux 6.6; older kernels use netlink tc filters",
)];

/// The checks (kproxy-e2e's `kproxy-vm-check NAME`), in the order a run makes them.
pub const CHECKS: [&str; 3] = ["programs_attached", "refused_connect", "tc_attach"];

/// Marker prefix of every line the script and the checks print for the collector.
pub const MARK: &str = "VMTEST-";

/// A test binary built by cargo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Suite {
    /// kproxy-e2e/tests/socket_lb.rs: the agent, real traffic in namespaces.
    SocketLb,
    /// kproxy/tests/tc_datapath.rs: the tc programs on crafted frames (BPF_PROG_TEST_RUN).
    TcDatapath,
    /// kproxy-e2e/tests/nodeport.rs: an external client through the node's device (tc programs).
    NodePort,
}

impl Suite {
    pub fn name(self) -> &'static str {
        match self {
            Suite::SocketLb => "socket_lb",
            Suite::TcDatapath => "tc_datapath",
            Suite::NodePort => "nodeport",
        }
    }
}

/// One step of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// `kproxy-vm-check NAME` (one of [`CHECKS`]).
    Check(String),
    /// `<suite binary> --exact NAME`.
    Test(Suite, String),
    /// Not run on this kernel, which lacks what the step tests: the step's id and why
    /// (see [`KERNEL_REQUIREMENTS`]).
    NotApplicable(String, String),
}

impl Step {
    /// The step's id in markers and tables: `check:NAME`, `socket_lb:NAME`,
    /// `tc_datapath:NAME`, `nodeport:NAME`.
    pub fn id(&self) -> String {
        match self {
            Step::Check(name) => format!("check:{name}"),
            Step::Test(suite, name) => format!("{}:{name}", suite.name()),
            Step::NotApplicable(id, _) => id.clone(),
        }
    }
}

/// What runs, in order.
#[derive(Debug, Clone)]
pub struct Plan {
    pub steps: Vec<Step>,
    /// Per step, enforced by `timeout` inside the run.
    pub step_timeout: Duration,
}

impl Plan {
    /// The checks, then `tests` (suite and name).
    pub fn new(tests: &[(Suite, String)], step_timeout: Duration) -> Plan {
        let mut steps: Vec<Step> = CHECKS
            .iter()
            .map(|c| Step::Check(c.to_string()))
            .collect();
        steps.extend(
            tests
                .iter()
                .map(|(suite, name)| Step::Test(*suite, name.clone())),
        );
        Plan {
            steps,
            step_timeout,
        }
    }

    /// The plan for a kernel `(major, minor)`: steps that need a newer one
    /// ([`KERNEL_REQUIREMENTS`]) become [`Step::NotApplicable`].
    pub fn for_kernel(&self, version: (u32, u32)) -> Plan {
        let steps = self
            .steps
            .iter()
            .map(|step| {
                let id = step.id();
                match KERNEL_REQUIREMENTS.iter().find(|(req, _, _)| *req == id) {
                    Some((_, min, why)) if version < *min && !matches!(step, Step::NotApplicable(..)) => {
                        Step::NotApplicable(id, why.to_string())
                    }
                    _ => step.clone(),
                }
            })
            .collect();
        Plan {
            steps,
            step_timeout: self.step_timeout,
        }
    }
}

/// Where the script finds its programs.
#[derive(Debug, Clone)]
pub struct ScriptPaths {
    /// kproxy-e2e's `kproxy-vm-check`.
    pub checks: String,
    pub socket_lb: String,
    pub tc_datapath: String,
    pub nodeport: String,
    pub kproxy: String,
    pub testpod: String,
}

/// What the script does before and after the steps.
#[derive(Debug, Clone)]
pub enum ScriptMode {
    /// PID 1 of a VM: mounts, loads `modules` (file paths in load order), powers off at the end.
    Guest { modules: Vec<(String, String)> },
    /// A shell on the host: only the steps.
    Host,
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The POSIX shell script of `plan`, for `/init` in a VM or `sh -c` on the host.
pub fn script(plan: &Plan, paths: &ScriptPaths, mode: &ScriptMode) -> String {
    let mut s = String::from("#!/bin/sh\n# Generated by `cargo xtask vm-test` (xtask/src/vm/mod.rs).\nexec 2>&1\n");
    if let ScriptMode::Guest { modules } = mode {
        s.push_str(
            r#"export PATH=/usr/local/bin:/bin
/bin/busybox --install -s /bin
mkdir -p /proc /sys /dev /run /tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /tmp
mkdir -p /sys/fs/cgroup /sys/fs/bpf
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
ip link set lo up
hostname kproxy-vm
"#,
        );
        let _ = writeln!(s, "echo \"{MARK}UNAME $(uname -r)\"");
        s.push_str("cat /proc/version\n");
        for (name, path) in modules {
            let _ = writeln!(
                s,
                "insmod {path}; echo \"{MARK}MODULE {name} $?\"",
                path = shell_quote(path)
            );
        }
    } else {
        let _ = writeln!(s, "echo \"{MARK}UNAME $(uname -r)\"");
    }
    let _ = writeln!(
        s,
        "export KPROXY_BIN={} KPROXY_TESTPOD_BIN={} RUST_BACKTRACE=1",
        shell_quote(&paths.kproxy),
        shell_quote(&paths.testpod)
    );
    let secs = plan.step_timeout.as_secs().max(1);
    for step in &plan.steps {
        let id = step.id();
        let argv = match step {
            Step::Check(name) => format!(
                "{} {}",
                shell_quote(&paths.checks),
                shell_quote(name)
            ),
            Step::Test(suite, name) => format!(
                "{} --exact {} --test-threads=1 --nocapture",
                shell_quote(match suite {
                    Suite::SocketLb => &paths.socket_lb,
                    Suite::TcDatapath => &paths.tc_datapath,
                    Suite::NodePort => &paths.nodeport,
                }),
                shell_quote(name)
            ),
            Step::NotApplicable(_, why) => {
                let _ = writeln!(s, "echo {}", shell_quote(&format!("{MARK}NA {id} {why}")));
                continue;
            }
        };
        let _ = writeln!(
            s,
            "echo \"{MARK}BEGIN {id}\"\ntimeout {secs} {argv}\necho \"{MARK}END {id} $?\""
        );
    }
    let _ = writeln!(s, "echo \"{MARK}DONE\"");
    if let ScriptMode::Guest { .. } = mode {
        s.push_str("sync\npoweroff -f\necho o > /proc/sysrq-trigger\nsleep 10\n");
    }
    s
}

/// How one step ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    Fail(String),
    /// Passed in the documented fallback mode of an older kernel.
    Fallback(String),
    /// Not run: the kernel lacks what the step tests (not a failure).
    NotApplicable(String),
    /// Never started (the run ended early).
    NotRun,
}

impl Outcome {
    pub fn is_failure(&self) -> bool {
        matches!(self, Outcome::Fail(_) | Outcome::NotRun)
    }
}

#[derive(Debug, Clone)]
pub struct StepResult {
    pub id: String,
    pub outcome: Outcome,
    pub duration: Option<Duration>,
}

/// One kernel's run.
#[derive(Debug, Clone)]
pub struct LegResult {
    /// "5.10", "6.1", "6.12" or "host".
    pub label: String,
    /// `uname -r` as the run printed it.
    pub release: Option<String>,
    pub steps: Vec<StepResult>,
    /// Problems outside any step (a module that did not load, a run that never finished).
    pub problems: Vec<String>,
    /// Observations worth reporting (fallbacks, attach details), in order.
    pub notes: Vec<String>,
    /// From the start (qemu launch) to the first step.
    pub boot: Option<Duration>,
    pub total: Duration,
}

impl LegResult {
    pub fn failed(&self) -> bool {
        !self.problems.is_empty() || self.steps.iter().any(|s| s.outcome.is_failure())
    }
}

/// `(major, minor)` of a release such as `5.10.0-32-cloud-amd64`.
pub fn release_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// `uname -r`.
pub fn kernel_release() -> Result<String> {
    Ok(fs::read_to_string("/proc/sys/kernel/osrelease")
        .context("reading /proc/sys/kernel/osrelease")?
        .trim()
        .to_string())
}

/// Whether a kernel has `bpf_set_retval` for cgroup sock_addr programs (Linux 5.18).
pub fn has_set_retval(release: &str) -> bool {
    release_version(release).is_some_and(|v| v >= (5, 18))
}

/// Turns a run's output lines (with the time each arrived) into a [`LegResult`].
pub struct Collector {
    label: String,
    start: Instant,
    expected: Vec<String>,
    release: Option<String>,
    results: Vec<StepResult>,
    current: Option<(String, Instant, Vec<String>)>,
    problems: Vec<String>,
    notes: Vec<String>,
    first_step: Option<Instant>,
    done: bool,
}

impl Collector {
    pub fn new(label: &str, plan: &Plan, start: Instant) -> Collector {
        Collector {
            label: label.to_string(),
            start,
            expected: plan.steps.iter().map(Step::id).collect(),
            release: None,
            results: Vec::new(),
            current: None,
            problems: Vec::new(),
            notes: Vec::new(),
            first_step: None,
            done: false,
        }
    }

    /// Whether the run printed its last marker.
    pub fn done(&self) -> bool {
        self.done
    }

    pub fn feed(&mut self, line: &str, at: Instant) {
        if let Some((_, _, lines)) = &mut self.current {
            lines.push(line.to_string());
        }
        // Kernel messages can land in the middle of a line: look for the marker anywhere.
        let Some(pos) = line.find(MARK) else { return };
        let rest = line[pos + MARK.len()..].trim_end();
        let (kind, arg) = rest.split_once(' ').unwrap_or((rest, ""));
        match kind {
            "UNAME" => self.release = Some(arg.trim().to_string()),
            "MODULE" => {
                let (name, rc) = arg.split_once(' ').unwrap_or((arg, ""));
                if rc.trim() != "0" {
                    self.problems
                        .push(format!("insmod {name} failed (exit {})", rc.trim()));
                }
            }
            "BEGIN" => {
                self.first_step.get_or_insert(at);
                self.current = Some((arg.trim().to_string(), at, Vec::new()));
            }
            "END" => {
                let (id, rc) = arg.rsplit_once(' ').unwrap_or((arg, ""));
                let (id, rc) = (id.trim().to_string(), rc.trim().to_string());
                let (started, lines) = match self.current.take() {
                    Some((current, started, lines)) if current == id => (Some(started), lines),
                    _ => (None, Vec::new()),
                };
                let outcome = self.outcome(&id, &rc, &lines);
                self.results.push(StepResult {
                    id,
                    outcome,
                    duration: started.map(|s| at - s),
                });
            }
            "NA" => {
                let (id, why) = arg.split_once(' ').unwrap_or((arg, ""));
                self.results.push(StepResult {
                    id: id.to_string(),
                    outcome: Outcome::NotApplicable(why.trim().to_string()),
                    duration: None,
                });
            }
            "NOTE" => self.notes.push(arg.trim().to_string()),
            // Inside a step, a fallback is reported through the step's outcome.
            "FALLBACK" if self.current.is_none() => self.notes.push(arg.trim().to_string()),
            "DONE" => self.done = true,
            _ => {}
        }
    }

    fn outcome(&self, id: &str, rc: &str, lines: &[String]) -> Outcome {
        let fallback_lines: Vec<&String> = lines
            .iter()
            .filter(|l| l.contains(&format!("{MARK}FALLBACK")))
            .collect();
        match rc {
            "0" if fallback_lines.is_empty() => Outcome::Pass,
            "0" => Outcome::Fallback(
                fallback_lines
                    .iter()
                    .map(|l| l.split_once("FALLBACK ").map_or(l.as_str(), |x| x.1).trim())
                    .collect::<Vec<_>>()
                    .join("; "),
            ),
            // Below 5.18 the refused connect is EPERM; the test insists on ECONNREFUSED.
            _ if id == format!("socket_lb:{REFUSAL_TEST}")
                && self.release.as_deref().is_some_and(|r| !has_set_retval(r))
                && lines
                    .iter()
                    .any(|l| l.contains("left:") && l.contains("{\"PermissionDenied\": 5}")) =>
            {
                Outcome::Fallback(
                    "EPERM (PermissionDenied) instead of ECONNREFUSED: no bpf_set_retval below 5.18"
                        .to_string(),
                )
            }
            "124" | "143" => Outcome::Fail(format!("timed out (exit {rc})")),
            _ => Outcome::Fail(format!("exit {rc}")),
        }
    }

    /// The result; steps that never ended are failures.
    pub fn finish(mut self, end: Instant, ended_how: Option<String>) -> LegResult {
        if let Some((id, started, _)) = self.current.take() {
            self.results.push(StepResult {
                id,
                outcome: Outcome::Fail(ended_how.clone().unwrap_or_else(|| "never ended".into())),
                duration: Some(end - started),
            });
        }
        let mut steps = Vec::new();
        for id in &self.expected {
            match self.results.iter().find(|r| &r.id == id) {
                Some(r) => steps.push(r.clone()),
                None => steps.push(StepResult {
                    id: id.clone(),
                    outcome: Outcome::NotRun,
                    duration: None,
                }),
            }
        }
        if !self.done {
            self.problems.push(match ended_how {
                Some(how) => format!("the run did not finish: {how}"),
                None => "the run did not finish".to_string(),
            });
        }
        if self.release.is_none() {
            self.problems.push("the run never printed its kernel release".into());
        }
        LegResult {
            label: self.label,
            release: self.release,
            steps,
            problems: self.problems,
            notes: self.notes,
            boot: self.first_step.map(|t| t - self.start),
            total: end - self.start,
        }
    }
}

fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

fn cell(step: &StepResult) -> String {
    let time = step.duration.map(|d| format!(" {}", secs(d))).unwrap_or_default();
    match &step.outcome {
        Outcome::Pass => format!("pass{time}"),
        Outcome::Fail(why) => format!("FAIL ({why}){time}"),
        Outcome::Fallback(_) => format!("fallback{time}"),
        // "n/a below 6.6: ..." -> "n/a below 6.6"
        Outcome::NotApplicable(why) => why.split(':').next().unwrap_or("n/a").to_string(),
        Outcome::NotRun => "NOT RUN".to_string(),
    }
}

/// The per-kernel, per-step table, then notes, fallbacks and problems.
pub fn render(legs: &[LegResult]) -> String {
    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut header = vec!["step".to_string()];
    header.extend(legs.iter().map(|l| l.label.clone()));
    rows.push(header);
    let mut release = vec!["kernel".to_string()];
    release.extend(
        legs.iter()
            .map(|l| l.release.clone().unwrap_or_else(|| "?".into())),
    );
    rows.push(release);
    let mut ids: Vec<String> = Vec::new();
    for leg in legs {
        for step in &leg.steps {
            if !ids.contains(&step.id) {
                ids.push(step.id.clone());
            }
        }
    }
    for id in &ids {
        let mut row = vec![id.clone()];
        for leg in legs {
            row.push(
                leg.steps
                    .iter()
                    .find(|s| &s.id == id)
                    .map(cell)
                    .unwrap_or_else(|| "-".into()),
            );
        }
        rows.push(row);
    }
    let mut boot = vec!["boot (to first step)".to_string()];
    boot.extend(legs.iter().map(|l| l.boot.map(secs).unwrap_or_else(|| "-".into())));
    rows.push(boot);
    let mut total = vec!["total".to_string()];
    total.extend(legs.iter().map(|l| secs(l.total)));
    rows.push(total);
    let mut verdict = vec!["result".to_string()];
    verdict.extend(
        legs.iter()
            .map(|l| if l.failed() { "FAILED" } else { "passed" }.to_string()),
    );
    rows.push(verdict);

    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for (i, row) in rows.iter().enumerate() {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(text, w)| format!("{text:<w$}"))
            .collect();
        let _ = writeln!(out, "| {} |", line.join(" | "));
        if i == 0 {
            let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
            let _ = writeln!(out, "| {} |", rule.join(" | "));
        }
    }
    for leg in legs {
        for step in &leg.steps {
            match &step.outcome {
                Outcome::Fallback(why) => {
                    let _ = writeln!(out, "[{}] fallback in {}: {why}", leg.label, step.id);
                }
                Outcome::NotApplicable(why) => {
                    let _ = writeln!(out, "[{}] not applicable {}: {why}", leg.label, step.id);
                }
                _ => {}
            }
        }
        for note in &leg.notes {
            let _ = writeln!(out, "[{}] note: {note}", leg.label);
        }
        for problem in &leg.problems {
            let _ = writeln!(out, "[{}] PROBLEM: {problem}", leg.label);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCX_TEST: &str = "nodeport:node_port_reaches_local_backends_tcx";

    fn plan() -> Plan {
        Plan::new(
            &[
                (Suite::SocketLb, "a".to_string()),
                (Suite::SocketLb, REFUSAL_TEST.to_string()),
                (Suite::NodePort, NODEPORT_TESTS[0].to_string()),
                (Suite::NodePort, "node_port_reaches_local_backends_tcx".to_string()),
            ],
            Duration::from_secs(60),
        )
    }

    fn collect(lines: &[&str]) -> LegResult {
        let start = Instant::now();
        let mut c = Collector::new("5.10", &plan().for_kernel((5, 10)), start);
        for l in lines {
            c.feed(l, start);
        }
        c.finish(start, None)
    }

    #[test]
    fn script_marks_every_step() {
        let paths = ScriptPaths {
            checks: "/x".into(),
            socket_lb: "/t".into(),
            tc_datapath: "/c".into(),
            nodeport: "/n".into(),
            kproxy: "/k".into(),
            testpod: "/p".into(),
        };
        let s = script(&plan().for_kernel((6, 12)), &paths, &ScriptMode::Host);
        assert!(s.contains("echo \"VMTEST-BEGIN socket_lb:a\"\ntimeout 60 '/t' --exact 'a'"));
        assert!(s.contains(&format!(
            "echo \"VMTEST-BEGIN {TCX_TEST}\"\ntimeout 60 '/n' --exact 'node_port_reaches_local_backends_tcx'"
        )));
        assert!(!s.contains("VMTEST-NA"));
        assert!(!s.contains("poweroff"));
        // Below 6.6 the TCX test is announced, not run; the netlink one still runs.
        let s = script(&plan().for_kernel((6, 1)), &paths, &ScriptMode::Host);
        assert!(s.contains(&format!("VMTEST-NA {TCX_TEST} n/a below 6.6")));
        assert!(!s.contains("--exact 'node_port_reaches_local_backends_tcx'"));
        assert!(s.contains("--exact 'node_port_reaches_local_backends_netlink'"));
    }

    #[test]
    fn kernel_requirements_name_planned_steps() {
        let ids: Vec<String> = NODEPORT_TESTS.iter().map(|t| format!("nodeport:{t}")).collect();
        for (id, min, why) in KERNEL_REQUIREMENTS {
            assert!(ids.iter().any(|i| i == id), "{id} is not in NODEPORT_TESTS");
            assert!(why.starts_with(&format!("n/a below {}.{}", min.0, min.1)), "{why}");
        }
        let at = |v| plan().for_kernel(v).steps.into_iter().find(|s| s.id() == TCX_TEST).unwrap();
        assert!(matches!(at((5, 10)), Step::NotApplicable(..)));
        assert!(matches!(at((6, 5)), Step::NotApplicable(..)));
        assert!(matches!(at((6, 6)), Step::Test(Suite::NodePort, _)));
        assert!(matches!(at((6, 18)), Step::Test(Suite::NodePort, _)));
    }

    #[test]
    fn collects_outcomes() {
        let r = collect(&[
            "VMTEST-UNAME 5.10.0-32-cloud-amd64",
            "VMTEST-BEGIN check:programs_attached",
            "VMTEST-END check:programs_attached 0",
            "VMTEST-BEGIN check:refused_connect",
            "VMTEST-FALLBACK refused connect: EPERM",
            "VMTEST-END check:refused_connect 0",
            "[  1.0] random: crng init VMTEST-BEGIN socket_lb:a",
            "test a ... FAILED",
            "VMTEST-END socket_lb:a 101",
            "VMTEST-BEGIN socket_lb:service_without_endpoints_refuses_fast",
            "  left: {\"PermissionDenied\": 5}",
            " right: {\"ConnectionRefused\": 5}",
            "VMTEST-END socket_lb:service_without_endpoints_refuses_fast 101",
            "VMTEST-BEGIN nodeport:node_port_reaches_local_backends_netlink",
            "VMTEST-END nodeport:node_port_reaches_local_backends_netlink 0",
            "VMTEST-NA nodeport:node_port_reaches_local_backends_tcx n/a below 6.6: TCX links arrive in Linux 6.6",
            "VMTEST-DONE",
        ]);
        let outcome = |id: &str| r.steps.iter().find(|s| s.id == id).unwrap().outcome.clone();
        assert_eq!(outcome("check:programs_attached"), Outcome::Pass);
        assert!(matches!(outcome("check:refused_connect"), Outcome::Fallback(_)));
        assert_eq!(outcome("socket_lb:a"), Outcome::Fail("exit 101".into()));
        assert!(matches!(
            outcome("socket_lb:service_without_endpoints_refuses_fast"),
            Outcome::Fallback(_)
        ));
        assert_eq!(outcome("nodeport:node_port_reaches_local_backends_netlink"), Outcome::Pass);
        assert!(matches!(outcome(TCX_TEST), Outcome::NotApplicable(_)));
        assert!(!outcome(TCX_TEST).is_failure());
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        assert!(r.failed());
        let table = render(&[r]);
        assert!(table.contains("| n/a below 6.6"), "{table}");
        assert!(!table.contains("FAIL (n/a"), "{table}");
    }

    #[test]
    fn eperm_is_a_failure_from_5_18() {
        let start = Instant::now();
        let mut c = Collector::new("6.1", &plan(), start);
        for l in [
            "VMTEST-UNAME 6.1.0-50-cloud-amd64",
            "VMTEST-BEGIN socket_lb:service_without_endpoints_refuses_fast",
            "  left: {\"PermissionDenied\": 5}",
            "VMTEST-END socket_lb:service_without_endpoints_refuses_fast 101",
        ] {
            c.feed(l, start);
        }
        let r = c.finish(start, Some("qemu timed out".into()));
        let refusal = r
            .steps
            .iter()
            .find(|s| s.id == format!("socket_lb:{REFUSAL_TEST}"))
            .unwrap();
        assert!(matches!(refusal.outcome, Outcome::Fail(_)), "{:?}", r.steps);
        assert_eq!(r.steps[0].outcome, Outcome::NotRun);
        assert!(r.problems.iter().any(|p| p.contains("qemu timed out")));
    }

    #[test]
    fn set_retval_from_5_18() {
        assert!(!has_set_retval("5.10.0-32-cloud-amd64"));
        assert!(has_set_retval("5.18.0"));
        assert!(has_set_retval("6.1.0-50-cloud-amd64"));
        assert!(has_set_retval("6.12.95+deb12-cloud-amd64"));
    }
}
