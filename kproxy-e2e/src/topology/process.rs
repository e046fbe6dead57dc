//! Child processes placed in a network namespace (and optionally a cgroup), killed on drop.
//!
//! Placement happens between `fork` and `exec` (`pre_exec`): the parent opens
//! `/run/netns/<name>` and `<cgroup>/cgroup.procs` beforehand (close-on-exec), and the child only
//! makes async-signal-safe system calls: `setns(CLONE_NEWNET)`, `write("0")` to move itself into
//! the cgroup, `setpgid` (so Ctrl-C on the terminal reaches only the parent, which then tears down
//! in order) and `PR_SET_PDEATHSIG` (so the child dies if the spawning thread dies without
//! cleaning up). Unlike `ip netns exec`, this keeps the host's `/sys` mounts visible, so the child
//! sees the cgroup2 and bpffs mounts.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Output};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::{Cgroup, Netns};
use crate::{cmd, interrupt};

const POLL: Duration = Duration::from_millis(5);

/// Spawns `cmd` inside `netns` (e.g. a server in a pod).
pub fn spawn_in(netns: &Netns, cmd: Command) -> Result<ChildGuard> {
    spawn_placed(netns, None, cmd)
}

/// Spawns `cmd` inside `netns` and inside `cgroup` (e.g. a client on the node whose sockets
/// kproxy's cgroup programs translate).
pub fn spawn_in_cgroup(netns: &Netns, cgroup: &Cgroup, cmd: Command) -> Result<ChildGuard> {
    spawn_placed(netns, Some(cgroup), cmd)
}

/// Runs `cmd` to completion inside `netns` (and `cgroup`), capturing stdout and stderr. Killed
/// and reported as an error if it runs longer than `timeout`. The exit status is not checked.
pub fn output_in(
    netns: &Netns,
    cgroup: Option<&Cgroup>,
    mut cmd: Command,
    timeout: Duration,
) -> Result<Output> {
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    spawn_placed(netns, cgroup, cmd)?.wait_with_output(timeout)
}

fn spawn_placed(netns: &Netns, cgroup: Option<&Cgroup>, mut cmd: Command) -> Result<ChildGuard> {
    let netns_fd: OwnedFd = File::open(netns.path())
        .with_context(|| format!("opening {}", netns.path().display()))?
        .into();
    let procs_fd: Option<OwnedFd> = match cgroup {
        Some(cg) => {
            let procs = cg.path().join("cgroup.procs");
            let file = OpenOptions::new()
                .write(true)
                .open(&procs)
                .with_context(|| format!("opening {}", procs.display()))?;
            Some(file.into())
        }
        None => None,
    };
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe system
    // calls on file descriptors opened (close-on-exec) by the parent; it does not allocate.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(netns_fd.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(fd) = &procs_fd {
                if libc::write(fd.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::setpgid(0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let where_ = match cgroup {
        Some(cg) => format!("netns {} + cgroup {}", netns.name(), cg.path().display()),
        None => format!("netns {}", netns.name()),
    };
    ChildGuard::spawn(cmd).with_context(|| format!("in {where_}"))
}

/// A running child process, SIGKILLed and reaped on drop unless it already exited.
#[derive(Debug)]
pub struct ChildGuard {
    child: Child,
    what: String,
}

impl ChildGuard {
    /// Spawns `cmd` as is (placement, if any, must already be set up on `cmd`).
    pub fn spawn(mut cmd: Command) -> Result<ChildGuard> {
        let what = cmd::describe(&cmd);
        let child = cmd
            .spawn()
            .with_context(|| format!("failed to start `{what}`"))?;
        Ok(ChildGuard { child, what })
    }

    /// The command line, for messages.
    pub fn what(&self) -> &str {
        &self.what
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The exit status if the process has exited (reaping it), `None` while it runs.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        self.child
            .try_wait()
            .with_context(|| format!("waiting for `{}`", self.what))
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.try_wait(), Ok(None))
    }

    /// Sends `signal`; fails if the process already exited (its pid may be reused).
    pub fn signal(&mut self, signal: Signal) -> Result<()> {
        if let Some(status) = self.try_wait()? {
            bail!("`{}` already exited ({status})", self.what);
        }
        kill(Pid::from_raw(self.pid()), signal)
            .with_context(|| format!("sending {signal} to `{}`", self.what))
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            thread::sleep(POLL);
        }
    }

    /// Sends `signal`, waits up to `grace`, then SIGKILLs. Returns how it exited.
    pub fn stop(&mut self, signal: Signal, grace: Duration) -> Result<ExitStatus> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        self.signal(signal)?;
        if let Some(status) = self.wait_timeout(grace)? {
            return Ok(status);
        }
        eprintln!(
            "warning: `{}` ignored {signal} for {grace:?}; killing it",
            self.what
        );
        let _ = self.child.kill();
        self.child
            .wait()
            .with_context(|| format!("waiting for `{}`", self.what))
    }

    /// Reads one line from the child's stdout (which must be piped) within `timeout`, e.g. a
    /// server's "ready" line. The rest of stdout is closed.
    pub fn read_line(&mut self, timeout: Duration) -> Result<String> {
        let stdout = self
            .child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("stdout of `{}` is not piped", self.what))?;
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut line = String::new();
            let _ = tx.send(BufReader::new(stdout).read_line(&mut line).map(|_| line));
        });
        match rx.recv_timeout(timeout) {
            Ok(Ok(line)) if !line.is_empty() => Ok(line),
            Ok(Ok(_)) => bail!("`{}` closed stdout without a line", self.what),
            Ok(Err(e)) => Err(e).with_context(|| format!("reading stdout of `{}`", self.what)),
            Err(_) => bail!("`{}` printed no line within {timeout:?}", self.what),
        }
    }

    /// Waits for the process to exit and collects its (piped) stdout and stderr. Killed and
    /// reported as an error after `timeout`.
    pub fn wait_with_output(self, timeout: Duration) -> Result<Output> {
        self.collect_output(timeout, false)
    }

    /// Like [`ChildGuard::wait_with_output`], but also gives up (killing the process) once
    /// Ctrl-C was requested, see [`crate::interrupt`].
    pub fn wait_with_output_interruptible(self, timeout: Duration) -> Result<Output> {
        self.collect_output(timeout, true)
    }

    fn collect_output(mut self, timeout: Duration, interruptible: bool) -> Result<Output> {
        let stdout = self.child.stdout.take().map(drain);
        let stderr = self.child.stderr.take().map(drain);
        let deadline = Instant::now() + timeout;
        let status = loop {
            match self.try_wait() {
                Ok(Some(status)) => break Ok(status),
                Ok(None) => {}
                Err(e) => break Err(format!("{e:#}")),
            }
            if interruptible && interrupt::requested() {
                break Err(format!("interrupted while running `{}`", self.what));
            }
            if Instant::now() >= deadline {
                break Err(format!("`{}` still running after {timeout:?}", self.what));
            }
            thread::sleep(POLL);
        };
        if status.is_err() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let join = |h: Option<thread::JoinHandle<Vec<u8>>>| {
            h.map(|h| h.join().unwrap_or_default()).unwrap_or_default()
        };
        let (stdout, stderr) = (join(stdout), join(stderr));
        match status {
            Ok(status) => Ok(Output {
                status,
                stdout,
                stderr,
            }),
            Err(message) => bail!(
                "{message}; its stderr: {}",
                String::from_utf8_lossy(&stderr).trim()
            ),
        }
    }
}

fn drain(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        buf
    })
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
