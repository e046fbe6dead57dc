//! The kproxy agent under benchmark: started in the kproxy mode's node namespace on a manifest
//! directory, followed through its `synced` log lines, measured through `/proc`.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};

use super::env::ModeEnv;
use kproxy_e2e::harness::Dump;
use kproxy_e2e::topology::{spawn_in, ChildGuard};
use kproxy_e2e::{cmd, interrupt};

const POLL: Duration = Duration::from_millis(1);
const STOP_GRACE: Duration = Duration::from_secs(10);

/// One `synced` line of the agent's log.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Synced {
    pub full: bool,
    pub frontends: usize,
    pub changed: usize,
    pub writes: usize,
    /// Time spent writing the maps (planning included), as the agent reports it.
    pub sync_ms: f64,
    /// The whole sync: reading and parsing the manifests, then `sync_ms`.
    pub total_ms: f64,
}

/// Parses a `synced` log line (ANSI colours and quotes tolerated); `None` for other lines.
pub fn parse_synced(line: &str) -> Option<Synced> {
    let line = strip_ansi(line);
    let mut words = line.split_whitespace();
    words.find(|w| *w == "synced")?;
    let fields: BTreeMap<&str, &str> = words
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k, v.trim_matches('"')))
        .collect();
    let num = |k: &str| fields.get(k).and_then(|v| v.parse::<f64>().ok());
    Some(Synced {
        full: fields.get("full") == Some(&"true"),
        frontends: num("frontends")? as usize,
        changed: num("changed_frontends").unwrap_or(0.0) as usize,
        writes: num("writes").unwrap_or(0.0) as usize,
        sync_ms: num("sync_ms")?,
        total_ms: num("total_ms")?,
    })
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

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
}

/// A running `kproxy run`, killed and cleaned up (`kproxy cleanup`) on drop.
pub struct Agent {
    kproxy: PathBuf,
    bpffs_dir: PathBuf,
    cgroup: PathBuf,
    log: PathBuf,
    offset: u64,
    pending: String,
    process: Option<ChildGuard>,
}

impl Agent {
    /// Starts the agent on `source` with its socket programs on `cgroup`, and its tc programs
    /// on the node's uplink if `tc`. The sync period is long so that no periodic full sync lands
    /// inside a measurement.
    pub fn start(kproxy: &Path, env: &ModeEnv, source: Source<'_>, attach: Attach<'_>, log: PathBuf) -> Result<Agent> {
        let file = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = Command::new(kproxy);
        cmd.arg("run");
        match source {
            Source::Manifests(path) => {
                cmd.arg("--manifests").arg(path);
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
            .args(["--healthz-bind-address", "", "--metrics-bind-address", ""])
            .args(["--sync-period", "1h"])
            .arg("--max-services")
            .arg(attach.capacities.0.to_string())
            .arg("--max-backends")
            .arg(attach.capacities.1.to_string())
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
            offset: 0,
            pending: String::new(),
            process: Some(process),
        })
    }

    pub fn pid(&self) -> i32 {
        self.process.as_ref().map_or(0, ChildGuard::pid)
    }

    /// Waits for the next `synced` line that satisfies `done`; returns it and when it was seen.
    pub fn wait_synced(
        &mut self,
        timeout: Duration,
        done: impl Fn(&Synced) -> bool,
    ) -> Result<(Synced, Instant)> {
        let deadline = Instant::now() + timeout;
        loop {
            interrupt::check()?;
            let mut file = File::open(&self.log)?;
            file.seek(SeekFrom::Start(self.offset))?;
            let mut new = String::new();
            let read = file.read_to_string(&mut new)?;
            let seen = Instant::now();
            self.offset += read as u64;
            self.pending.push_str(&new);
            while let Some(end) = self.pending.find('\n') {
                let line: String = self.pending.drain(..=end).collect();
                if let Some(synced) = parse_synced(&line) {
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
                    "no matching `synced` line within {timeout:?}; agent log:\n{}",
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_synced_lines() {
        let line = "2026-01-01T00:00:00.000001Z  INFO kproxy::agent: synced full=true \
                    frontends=3 changed_frontends=3 writes=12 sync_ms=\"0.250\" total_ms=1.500";
        let s = parse_synced(line).unwrap();
        assert!(s.full);
        assert_eq!((s.frontends, s.changed, s.writes), (3, 3, 12));
        assert!((s.sync_ms - 0.25).abs() < 1e-9 && (s.total_ms - 1.5).abs() < 1e-9);
        let colored = "\x1b[32m INFO\x1b[0m \x1b[2mkproxy::agent\x1b[0m\x1b[2m:\x1b[0m synced \
                       \x1b[3mfull\x1b[0m\x1b[2m=\x1b[0mfalse \x1b[3mfrontends\x1b[0m\x1b[2m=\x1b[0m1 \
                       sync_ms=0.1 total_ms=0.2";
        assert_eq!(parse_synced(colored).unwrap().frontends, 1);
        assert!(parse_synced("INFO kproxy: watching manifests").is_none());
    }
}
