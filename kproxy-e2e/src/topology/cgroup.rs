//! A child cgroup under the cgroup2 mount, emptied and removed on drop.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::unique_name;

const EMPTY_WAIT: Duration = Duration::from_secs(5);

/// Where cgroup v2 is mounted, read from `/proc/self/mountinfo` (on this machine
/// `/sys/fs/cgroup/unified`, on most others `/sys/fs/cgroup`).
pub fn cgroup2_mount() -> Result<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").context("reading mountinfo")?;
    mountinfo
        .lines()
        .find_map(|line| {
            // "<id> <parent> <dev> <root> <mount point> <options> [optional...] - <fstype> ..."
            let (before, after) = line.split_once(" - ")?;
            (after.split(' ').next()? == "cgroup2").then(|| before.split(' ').nth(4))?
        })
        .map(|p| PathBuf::from(unescape_mountinfo(p)))
        .context("no cgroup2 mount in /proc/self/mountinfo")
}

/// mountinfo writes space, tab, newline and backslash as octal escapes (`\040`).
fn unescape_mountinfo(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut rest = field;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest
            .get(i + 1..i + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(byte) => {
                out.push(byte as char);
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// A child cgroup `<cgroup2 mount>/kproxy-<role>-<pid>-<n>`. Dropping it kills its processes,
/// waits until it is empty and removes it (which also detaches any BPF program left on it).
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    pub fn new(role: &str) -> Result<Cgroup> {
        let mount = cgroup2_mount()?;
        loop {
            let path = mount.join(unique_name(&format!("kproxy-{role}")));
            match fs::create_dir(&path) {
                Ok(()) => return Ok(Cgroup { path }),
                Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e).with_context(|| format!("mkdir {}", path.display())),
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Process ids in the cgroup (`cgroup.procs`).
    pub fn procs(&self) -> Result<Vec<i32>> {
        let file = self.path.join("cgroup.procs");
        let text =
            fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
        Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }

    /// Kills every process in the cgroup (`cgroup.kill`, or SIGKILL to each) and waits, bounded,
    /// until it is empty.
    pub fn kill_all(&self) -> Result<()> {
        let kill_file = self.path.join("cgroup.kill");
        let deadline = Instant::now() + EMPTY_WAIT;
        loop {
            let procs = self.procs()?;
            if procs.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "processes {procs:?} still in {} after SIGKILL",
                    self.path.display()
                );
            }
            if fs::write(&kill_file, "1").is_err() {
                for pid in procs {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn remove(&self) -> Result<()> {
        self.kill_all()?;
        let deadline = Instant::now() + EMPTY_WAIT;
        loop {
            match fs::remove_dir(&self.path) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
                // Killed tasks can keep the cgroup busy for a moment.
                Err(e) if Instant::now() < deadline && e.raw_os_error() == Some(libc::EBUSY) => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => return Err(e).with_context(|| format!("rmdir {}", self.path.display())),
            }
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            eprintln!("warning: removing cgroup: {e:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_mountinfo_octal() {
        assert_eq!(unescape_mountinfo(r"/a\040b\134c"), r"/a b\c");
        assert_eq!(unescape_mountinfo("/sys/fs/cgroup"), "/sys/fs/cgroup");
    }
}
