//! A background thread that runs `kproxy dump --json` over and over (bounded in count and
//! time) and checks every dump against invariants: services that must be present with at least
//! some backends. It catches flaps that a final-state comparison cannot see: a service or a
//! backend that disappears for a moment while the agent reconnects, relists or restarts.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use std::time::Duration;
//! use kproxy_e2e::dump_poller::{DumpPoller, Invariant};
//! let poller = DumpPoller::start(
//!     "target/debug/kproxy".as_ref(),
//!     "/sys/fs/bpf/kproxy-test-1-0".as_ref(),
//!     vec![Invariant::new("web", &["10.244.1.10:8080"])],
//! );
//! // ... cut watches, restart the agent, ...
//! let report = poller.stop();
//! report.assert_clean("after cutting watches");
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::harness::Dump;
use crate::topology::ChildGuard;

/// Pause between two dumps.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// The poller stops by itself after this long, whatever the test does.
pub const MAX_RUN: Duration = Duration::from_secs(180);
/// And after this many dumps.
pub const MAX_SAMPLES: usize = 5000;
const DUMP_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_RECORDED: usize = 20;

/// Service `name` (any port, unless `port_name` says which) must be in every dump, with at
/// least `backends` among its backends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invariant {
    pub name: String,
    pub port_name: Option<String>,
    pub backends: Vec<String>,
}

impl Invariant {
    pub fn new(name: &str, backends: &[&str]) -> Invariant {
        Invariant {
            name: name.to_string(),
            port_name: None,
            backends: backends.iter().map(|b| b.to_string()).collect(),
        }
    }

    /// What is wrong with `dump`, if anything.
    pub fn violation(&self, dump: &Dump) -> Option<String> {
        let entries: Vec<_> = dump
            .services
            .iter()
            .filter(|s| {
                s.name == self.name && self.port_name.as_ref().is_none_or(|p| &s.port_name == p)
            })
            .collect();
        if entries.is_empty() {
            return Some(format!("service {} is missing", self.name));
        }
        for entry in entries {
            let missing: Vec<&String> = self
                .backends
                .iter()
                .filter(|b| !entry.backends.contains(b))
                .collect();
            if !missing.is_empty() {
                return Some(format!(
                    "service {} ({}) lacks backends {missing:?}: it has {:?}",
                    self.name, entry.frontend, entry.backends
                ));
            }
        }
        None
    }
}

/// What the poller saw.
#[derive(Debug, Clone, Default)]
pub struct PollerReport {
    /// Dumps taken and checked.
    pub samples: usize,
    /// The first failures of `kproxy dump` itself, with when (ms since start).
    pub errors: Vec<String>,
    pub error_count: usize,
    /// The first invariant violations, with when (ms since start).
    pub violations: Vec<String>,
    pub violation_count: usize,
    pub elapsed: Duration,
}

impl PollerReport {
    /// Panics (quoting what was seen) unless every dump worked and satisfied the invariants,
    /// and there were at least 2 dumps.
    pub fn assert_clean(&self, context: &str) {
        assert!(
            self.violation_count == 0,
            "{context}: {} of {} dumps violated the invariants; first: {:#?}",
            self.violation_count,
            self.samples,
            self.violations
        );
        assert!(
            self.error_count == 0,
            "{context}: `kproxy dump` failed {} times out of {}; first: {:#?}",
            self.error_count,
            self.samples + self.error_count,
            self.errors
        );
        assert!(
            self.samples >= 2,
            "{context}: the poller took only {} dumps in {:?}",
            self.samples,
            self.elapsed
        );
    }
}

/// See the module documentation. Dropping it stops the thread.
pub struct DumpPoller {
    stop: Arc<AtomicBool>,
    invariants: Arc<Mutex<Vec<Invariant>>>,
    thread: Option<JoinHandle<PollerReport>>,
}

fn dump_once(kproxy: &Path, bpffs: &Path) -> Result<Dump, String> {
    let mut cmd = Command::new(kproxy);
    cmd.arg("dump")
        .arg("--bpffs-dir")
        .arg(bpffs)
        .arg("--json")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = ChildGuard::spawn(cmd)
        .and_then(|c| c.wait_with_output(DUMP_TIMEOUT))
        .map_err(|e| format!("{e:#}"))?;
    if !out.status.success() {
        return Err(format!(
            "kproxy dump failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Dump::parse(&String::from_utf8_lossy(&out.stdout)).map_err(|e| format!("{e:#}"))
}

impl DumpPoller {
    /// Starts polling `kproxy dump --bpffs-dir <bpffs> --json` (run in the test's own
    /// namespace: it only reads pinned maps) every [`POLL_INTERVAL`].
    pub fn start(kproxy: &Path, bpffs: &Path, invariants: Vec<Invariant>) -> DumpPoller {
        let stop = Arc::new(AtomicBool::new(false));
        let invariants = Arc::new(Mutex::new(invariants));
        let (kproxy, bpffs): (PathBuf, PathBuf) = (kproxy.into(), bpffs.into());
        let thread = {
            let stop = stop.clone();
            let invariants = invariants.clone();
            std::thread::spawn(move || {
                let start = Instant::now();
                let mut report = PollerReport::default();
                while !stop.load(Ordering::Relaxed)
                    && start.elapsed() < MAX_RUN
                    && report.samples + report.error_count < MAX_SAMPLES
                {
                    // The invariants that held when the dump started must hold in it.
                    let wanted = invariants.lock().unwrap_or_else(|e| e.into_inner()).clone();
                    let at = start.elapsed().as_millis();
                    match dump_once(&kproxy, &bpffs) {
                        Ok(dump) => {
                            report.samples += 1;
                            let wrong: Vec<String> =
                                wanted.iter().filter_map(|i| i.violation(&dump)).collect();
                            if !wrong.is_empty() {
                                report.violation_count += 1;
                                if report.violations.len() < MAX_RECORDED {
                                    report.violations.push(format!("at {at} ms: {wrong:?}"));
                                }
                            }
                        }
                        Err(e) => {
                            report.error_count += 1;
                            if report.errors.len() < MAX_RECORDED {
                                report.errors.push(format!("at {at} ms: {e}"));
                            }
                        }
                    }
                    std::thread::sleep(POLL_INTERVAL);
                }
                report.elapsed = start.elapsed();
                report
            })
        };
        DumpPoller {
            stop,
            invariants,
            thread: Some(thread),
        }
    }

    /// Replaces the invariants, e.g. before a change that removes a backend on purpose. Dumps
    /// already running are checked against the old ones.
    pub fn set_invariants(&self, invariants: Vec<Invariant>) {
        *self.invariants.lock().unwrap_or_else(|e| e.into_inner()) = invariants;
    }

    /// Stops the thread and returns what it saw.
    pub fn stop(mut self) -> PollerReport {
        self.finish()
    }

    fn finish(&mut self) -> PollerReport {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .map(|t| t.join().unwrap_or_default())
            .unwrap_or_default()
    }
}

impl Drop for DumpPoller {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invariants_flag_missing_services_and_backends() {
        let dump = Dump::parse(
            r#"{"services":[{"namespace":"default","name":"web","port_name":"http",
            "type":"ClusterIP","frontend":"10.96.0.10:80","protocol":"TCP",
            "backends":["10.244.1.10:8080","10.244.1.11:8080"]}]}"#,
        )
        .unwrap();
        assert_eq!(
            Invariant::new("web", &["10.244.1.10:8080"]).violation(&dump),
            None
        );
        assert!(Invariant::new("web", &["10.244.1.12:8080"])
            .violation(&dump)
            .unwrap()
            .contains("lacks"));
        assert!(Invariant::new("db", &[])
            .violation(&dump)
            .unwrap()
            .contains("missing"));
    }
}
