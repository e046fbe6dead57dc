//! A named network namespace (`ip netns add`), deleted on drop with every process inside.

use std::fs::{self, File};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sched::{setns, CloneFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::unique_name;
use crate::cmd;

const NETNS_DIR: &str = "/run/netns";
const KILL_WAIT: Duration = Duration::from_secs(5);

/// A network namespace `kproxy-<role>-<pid>-<n>` with `lo` up. Dropping it kills every process
/// whose network namespace it is, then deletes it.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a fresh namespace; `role` ("node", "pod", ...) only makes the name readable.
    pub fn new(role: &str) -> Result<Netns> {
        let name = loop {
            let name = unique_name(&format!("kproxy-{role}"));
            if !PathBuf::from(NETNS_DIR).join(&name).exists() {
                break name;
            }
        };
        cmd::output(Command::new("ip").args(["netns", "add", &name]))?;
        let netns = Netns { name };
        netns.ip(&["link", "set", "lo", "up"])?;
        Ok(netns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`, the file to `setns(2)` into.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(NETNS_DIR).join(&self.name)
    }

    /// Runs `f` inside this namespace, see [`in_netns`].
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        in_netns(&self.path(), f)
    }

    /// Runs `ip -n <name> <args>`.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        cmd::output(Command::new("ip").args(["-n", &self.name]).args(args)).map(drop)
    }

    /// Process ids living in this namespace (what `ip netns pids` prints).
    pub fn pids(&self) -> Result<Vec<i32>> {
        let ns =
            fs::metadata(self.path()).with_context(|| format!("stat {}", self.path().display()))?;
        let mut pids = Vec::new();
        for entry in fs::read_dir("/proc").context("reading /proc")? {
            let Some(pid) = entry?
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<i32>().ok())
            else {
                continue;
            };
            // Processes may exit while we look; zombies have no namespace left.
            if let Ok(m) = fs::metadata(format!("/proc/{pid}/ns/net")) {
                if m.dev() == ns.dev() && m.ino() == ns.ino() {
                    pids.push(pid);
                }
            }
        }
        Ok(pids)
    }

    /// SIGKILLs every process in the namespace and waits (bounded) until none is left.
    pub fn kill_all(&self) -> Result<()> {
        let deadline = Instant::now() + KILL_WAIT;
        loop {
            let pids = self.pids()?;
            let pids: Vec<i32> = pids
                .into_iter()
                .filter(|&p| p != std::process::id() as i32 && p != 1)
                .collect();
            if pids.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "processes {pids:?} still in netns {} after SIGKILL",
                    self.name
                );
            }
            for pid in pids {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Runs `f` on a short-lived thread that has joined the network namespace at `path`
/// (`/run/netns/<name>`), and returns its result. Sockets `f` creates stay in that namespace for
/// good, whichever thread uses them later: this is how the test process listens on, or connects
/// to, a namespace's 127.0.0.1 without moving any of its other threads. (`setns(CLONE_NEWNET)`
/// affects only the calling thread, which exits right after.)
pub fn in_netns<T: Send>(path: &Path, f: impl FnOnce() -> T + Send) -> Result<T> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    std::thread::scope(|scope| {
        scope
            .spawn(move || -> Result<T> {
                setns(&file, CloneFlags::CLONE_NEWNET)
                    .with_context(|| format!("setns into {}", path.display()))?;
                Ok(f())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the thread in netns {} panicked", path.display()))?
    })
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = self.kill_all() {
            eprintln!("warning: {e:#}");
        }
        if let Err(e) = cmd::output(Command::new("ip").args(["netns", "delete", &self.name])) {
            eprintln!("warning: deleting netns {}: {e:#}", self.name);
        }
    }
}
