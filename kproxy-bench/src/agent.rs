//! The kproxy agent under benchmark: started in the kproxy mode's node namespace on a manifest
//! directory, followed through its `synced` events (`kproxy run --event-file`), measured through
//! `/proc`.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};

use super::env::ModeEnv;
use kproxy_e2e::events::{Event, EventReader, EVENT_FILE_FLAG};
use kproxy_e2e::harness::Dump;
use kproxy_e2e::topology::{spawn_in, ChildGuard};
use kproxy_e2e::{cmd, interrupt};

const POLL: Duration = Duration::from_millis(1);
const STOP_GRACE: Duration = Duration::from_secs(10);

/// One sync of the agent (its `synced` event).
pub use kproxy_e2e::events::Synced;

/// Resident memory of a process, from `/proc/PID/status`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Rss {
    pub rss_kib: u64,
    /// Peak resident memory (VmHWM).
    pub hwm_kib: u64,
}

pub fn rss(pid: i32) -> Result<Rss> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    Ok(Rss {
        rss_kib: field("VmRSS:"),
        hwm_kib: field("VmHWM:"),
    })
}

/// One BPF map held by the agent.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MapMemory {
    pub id: u32,
    pub map_type: u32,
    pub max_entries: u64,
    /// Kernel memory charged to the map (`memlock` in fdinfo).
    pub memlock: u64,
}

/// The BPF maps whose file descriptors `pid` holds, from `/proc/PID/fdinfo`.
pub fn bpf_maps(pid: i32) -> Result<Vec<MapMemory>> {
    let mut maps: BTreeMap<u32, MapMemory> = BTreeMap::new();
    let dir = format!("/proc/{pid}/fdinfo");
    for entry in fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        let Ok(text) = fs::read_to_string(entry?.path()) else {
            continue;
        };
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        let (Some(id), Some(memlock)) = (field("map_id:"), field("memlock:")) else {
            continue;
        };
        maps.insert(
            id as u32,
            MapMemory {
                id: id as u32,
                map_type: field("map_type:").unwrap_or(0) as u32,
                max_entries: field("max_entries:").unwrap_or(0),
                memlock,
            },
        );
    }
    Ok(maps.into_values().collect())
}

/// Where the agent reads Services and EndpointSlices.
pub enum Source<'a> {
    /// `--manifests`: a directory of manifest files.
    Manifests(&'a Path),
    /// `--kubeconfig` (an apiserver) and `--hostname-override`.
    Apiserver { kubeconfig: &'a Path, node: &'a str },
}

/// Where the agent pins and attaches.
pub struct Attach<'a> {
    pub bpffs_dir: PathBuf,
    /// Its socket programs' cgroup.
    pub cgroup: &'a Path,
    /// Its tc programs on the node's uplink, or none (`--devices ""`).
    pub tc: bool,
    /// `--max-services`, `--max-backends`.
    pub capacities: (u32, u32),
    /// `--healthz-bind-address` (none: the server is off).
    pub healthz: Option<&'a str>,
    /// `--sync-period`: long by default, so that no periodic full sync lands inside a
    /// measurement ([`LONG_SYNC_PERIOD`]).
    pub sync_period: &'a str,
}

/// The sync period of an agent whose measurements must not meet a periodic full sync.
pub const LONG_SYNC_PERIOD: &str = "1h";

/// A running `kproxy run`, killed and cleaned up (`kproxy cleanup`) on drop.
pub struct Agent {
    kproxy: PathBuf,
    bpffs_dir: PathBuf,
    cgroup: PathBuf,
    log: PathBuf,
    events: EventReader,
    process: Option<ChildGuard>,
}

impl Agent {
    /// Starts the agent on `source` with its socket programs on `cgroup`, and its tc programs
    /// on the node's uplink if `tc`. Its output goes to `log`, its events next to it
    /// (`<log>.events.jsonl`).
    pub fn start(kproxy: &Path, env: &ModeEnv, source: Source<'_>, attach: Attach<'_>, log: PathBuf) -> Result<Agent> {
        let file = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let events = log.with_extension("events.jsonl");
        // A fresh file: the reader starts at its beginning.
        File::create(&events).with_context(|| format!("creating {}", events.display()))?;
        let mut cmd = Command::new(kproxy);
        cmd.arg("run");
        match source {
            Source::Manifests(path) => {
                // The benchmark renames every file into place (complete by construction), and
                // times programming, not the file source's settle time (500 ms by default, a
                // guard against files read half-written; see kproxy/src/sources/settle.rs).
                cmd.arg("--manifests").arg(path).args(["--manifests-settle-time", "0s"]);
            }
            Source::Apiserver { kubeconfig, node } => {
                cmd.arg("--kubeconfig").arg(kubeconfig).args(["--hostname-override", node]);
            }
        }
        cmd.arg("--bpffs-dir")
            .arg(&attach.bpffs_dir)
            .arg("--cgroup")
            .arg(attach.cgroup)
            .args(["--devices", if attach.tc { super::env::NODE_DEV } else { "" }])
            .args(["--healthz-bind-address", attach.healthz.unwrap_or(""), "--metrics-bind-address", ""])
            .args(["--sync-period", attach.sync_period])
            .arg("--max-services")
            .arg(attach.capacities.0.to_string())
            .arg("--max-backends")
            .arg(attach.capacities.1.to_string())
            .arg(EVENT_FILE_FLAG)
            .arg(&events)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        let process = spawn_in(env.node(), cmd)?;
        Ok(Agent {
            kproxy: kproxy.to_path_buf(),
            bpffs_dir: attach.bpffs_dir,
            cgroup: attach.cgroup.to_path_buf(),
            log,
            events: EventReader::new(&events),
            process: Some(process),
        })
    }

    pub fn pid(&self) -> i32 {
        self.process.as_ref().map_or(0, ChildGuard::pid)
    }

    /// Waits for the next `synced` event that satisfies `done`; returns it and when it was seen.
    pub fn wait_synced(
        &mut self,
        timeout: Duration,
        done: impl Fn(&Synced) -> bool,
    ) -> Result<(Synced, Instant)> {
        let deadline = Instant::now() + timeout;
        loop {
            interrupt::check()?;
            let events = self.events.read_new()?;
            let seen = Instant::now();
            for event in events {
                if let Event::Synced(synced) = event {
                    if done(&synced) {
                        return Ok((synced, seen));
                    }
                }
            }
            if let Some(process) = &mut self.process {
                if let Some(status) = process.try_wait()? {
                    bail!("the agent exited ({status}); its log:\n{}", self.log_tail());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "no matching `synced` event within {timeout:?}; agent log:\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// The end of the agent's log.
    pub fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// `kproxy dump --json`, parsed, and how long it took.
    pub fn dump(&self) -> Result<(Dump, Duration)> {
        let started = Instant::now();
        let mut cmd = Command::new(&self.kproxy);
        cmd.args(["dump", "--json", "--bpffs-dir"]).arg(&self.bpffs_dir);
        let out = cmd::output(&mut cmd)?;
        let took = started.elapsed();
        Ok((Dump::parse(&out)?, took))
    }

    /// Stops the agent (SIGTERM) and removes its programs and pins (`kproxy cleanup`).
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut process) = self.process.take() {
            process.stop(Signal::SIGTERM, STOP_GRACE)?;
        }
        let mut cmd = Command::new(&self.kproxy);
        cmd.args(["cleanup", "--bpffs-dir"])
            .arg(&self.bpffs_dir)
            .arg("--cgroup")
            .arg(&self.cgroup);
        cmd::output(&mut cmd).map(drop)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let running = self.process.is_some();
        if let Err(e) = self.stop() {
            if running {
                eprintln!("warning: stopping the benchmark agent: {e:#}");
            }
        }
        if self.bpffs_dir.exists() {
            let _ = fs::remove_dir_all(&self.bpffs_dir);
        }
    }
}
