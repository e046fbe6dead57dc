//! qemu: installed from Debian when missing, then one boot per kernel under TCG (software
//! emulation; nested KVM is not usable where kproxy is developed), with no network device, a
//! hard timeout, and the serial console streamed line by line.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{cmd, interrupt};

pub const QEMU: &str = "qemu-system-x86_64";
const PACKAGE: &str = "qemu-system-x86";

/// Installs Debian's qemu-system-x86 (without recommends) unless `qemu-system-x86_64` runs.
/// Waits up to 10 minutes for another apt/dpkg to finish instead of failing on its lock.
pub fn ensure_installed() -> Result<()> {
    if cmd::succeeds(Command::new(QEMU).arg("--version")) {
        return Ok(());
    }
    println!("vm: installing {PACKAGE} (apt-get)");
    let install = || {
        let mut c = Command::new("apt-get");
        c.args(["-o", "DPkg::Lock::Timeout=600", "-y", "--no-install-recommends", "install", PACKAGE])
            .env("DEBIAN_FRONTEND", "noninteractive");
        c
    };
    if cmd::run(&mut install()).is_err() {
        cmd::run(Command::new("apt-get").args(["-o", "DPkg::Lock::Timeout=600", "update"]))?;
        cmd::run(&mut install())?;
    }
    if !cmd::succeeds(Command::new(QEMU).arg("--version")) {
        bail!("{PACKAGE} is installed but `{QEMU} --version` fails");
    }
    Ok(())
}

/// One VM boot.
pub struct Boot<'a> {
    pub kernel: &'a Path,
    pub initrd: &'a Path,
    pub memory_mb: u32,
    /// `-cpu` (see [`command`]).
    pub cpu_model: String,
    /// 1 is what works reliably (see [`command`]).
    pub cpus: u32,
    pub timeout: Duration,
    /// Every console line is appended here.
    pub log: PathBuf,
    /// Printed before each console line on stdout (`[5.10] `).
    pub prefix: String,
}

/// How a boot ended.
#[derive(Debug)]
pub enum Ended {
    /// qemu exited by itself (the guest powered off, or panicked with `panic=-1 -no-reboot`).
    Exited(std::process::ExitStatus),
    /// Killed at the timeout.
    TimedOut,
    /// Killed because the caller was interrupted (Ctrl-C).
    Interrupted,
}

/// A child process killed on drop (so an error or a panic does not leave qemu running).
struct Killed(Child);

impl Killed {
    /// SIGKILL to the child's process group (it leads its own, see [`stream`]), so that its
    /// descendants go too and release the output pipes.
    fn kill_group(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            // SAFETY: kill has no memory-safety preconditions; the group is our child's own.
            unsafe { libc::kill(-(self.0.id() as i32), libc::SIGKILL) };
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

impl Drop for Killed {
    fn drop(&mut self) {
        self.kill_group();
    }
}

/// The command line, for the log and for people reproducing a run by hand.
pub fn command(boot: &Boot) -> Command {
    let mut qemu = Command::new(QEMU);
    // The default `-cpu max,-cx16` (see vm-test's --qemu-cpu) has RDRAND, for random.trust_cpu
    // below, and no CMPXCHG16B: with it, qemu 7.2's TCG crashes Debian's 6.12 (double fault at
    // the `cmpxchg16b %gs:(%rsi)` of SLUB's per-CPU fast path in kmem_cache_alloc, at boot or
    // later); without it SLUB takes its locked path. More than one vCPU is not reliable either
    // (6.12 died in do_sync_core); see `Boot::cpus`.
    qemu.args(["-accel", "tcg", "-machine", "pc"])
        .arg("-cpu")
        .arg(&boot.cpu_model)
        .arg("-m")
        .arg(boot.memory_mb.to_string())
        .arg("-smp")
        .arg(boot.cpus.to_string())
        .args(["-nographic", "-monitor", "none", "-no-reboot", "-nic", "none"])
        .arg("-kernel")
        .arg(boot.kernel)
        .arg("-initrd")
        .arg(boot.initrd)
        // panic=-1 with -no-reboot turns a guest panic (or init exiting) into qemu exiting.
        // random.trust_cpu: getrandom must not block at boot.
        .args([
            "-append",
            "console=ttyS0 panic=-1 oops=panic loglevel=4 random.trust_cpu=on rdinit=/init",
        ]);
    qemu
}

/// Boots, calling `on_line` with each console line as it arrives, until qemu exits or the
/// timeout passes.
pub fn run(boot: &Boot, on_line: impl FnMut(&str, Instant)) -> Result<Ended> {
    stream(command(boot), boot.timeout, &boot.log, &boot.prefix, on_line)
}

/// Runs `command` (stdout and stderr piped; stderr lines prefixed `stderr: `), appending its
/// output to `log`, echoing it to stdout after `prefix`, and calling `on_line` with each line
/// and the time it arrived. Killed at `timeout` or on Ctrl-C.
pub fn stream(
    mut command: Command,
    timeout: Duration,
    log: &Path,
    prefix: &str,
    mut on_line: impl FnMut(&str, Instant),
) -> Result<Ended> {
    let mut log_file = File::create(log).with_context(|| format!("creating {}", log.display()))?;
    writeln!(log_file, "# {}", cmd::describe(&command))?;
    let child = command
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting `{}`", cmd::describe(&command)))?;
    let mut child = Killed(child);
    let (tx, rx) = mpsc::channel::<String>();
    let stdout = child.0.stdout.take().context("child stdout")?;
    let stderr = child.0.stderr.take().context("child stderr")?;
    let readers = [
        spawn_reader(stdout, tx.clone(), ""),
        spawn_reader(stderr, tx, "stderr: "),
    ];
    let deadline = Instant::now() + timeout;
    let ended = loop {
        if interrupt::requested() {
            break Ended::Interrupted;
        }
        let now = Instant::now();
        if now >= deadline {
            break Ended::TimedOut;
        }
        match rx.recv_timeout((deadline - now).min(Duration::from_millis(200))) {
            Ok(line) => {
                let at = Instant::now();
                writeln!(log_file, "{line}")?;
                println!("{prefix}{line}");
                on_line(&line, at);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            // Both pipes closed, every line received: the process is gone.
            Err(mpsc::RecvTimeoutError::Disconnected) => break Ended::Exited(child.0.wait()?),
        }
    };
    if !matches!(ended, Ended::Exited(_)) {
        child.kill_group();
        writeln!(log_file, "# killed: {ended:?}")?;
    }
    drop(child);
    for reader in readers {
        let _ = reader.join();
    }
    Ok(ended)
}

fn spawn_reader(
    stream: impl Read + Send + 'static,
    tx: mpsc::Sender<String>,
    prefix: &'static str,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&buf);
                    let line = text.trim_end_matches(['\n', '\r']).replace('\r', "");
                    if tx.send(format!("{prefix}{line}")).is_err() {
                        return;
                    }
                }
            }
        }
    })
}
