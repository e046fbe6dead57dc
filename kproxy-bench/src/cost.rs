//! CPU time per request (issue 19): the CPU time a mode's processes used during one wrk run —
//! the client's and the servers' cgroups (`cpu.stat` `usage_usec`, which the bench's own
//! cgroups carry), the agent's process (`/proc/PID/stat`, kproxy only) — plus the machine's
//! softirq time (`/proc/stat`), divided by the run's requests. It depends far less on a
//! neighbour's load than a rate does: other work takes turns on the cores, it does not add to
//! these processes' time.

use std::fs;
use std::path::Path;

use anyhow::{anyhow, Context, Result};
use serde::{Deserialize, Serialize};

/// `/proc` counts in USER_HZ, 100 per second on Linux.
const USER_HZ: f64 = 100.0;

/// CPU time in µs, over one run (or, from [`Cost::per_request`], per request).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Cost {
    /// The client's cgroup (wrk).
    pub client_us: f64,
    /// The pods' servers' cgroup.
    pub server_us: f64,
    /// The kproxy agent (0 for the other modes: kube-proxy's rules run in the kernel and its
    /// process is not part of the data path; its syncs are timed in the control-plane tables).
    pub agent_us: f64,
    /// Machine-wide softirq time (tick-sampled on kernels without IRQ time accounting, where
    /// softirq work done on a task's way out of a system call is charged to that task instead).
    pub softirq_us: f64,
}

impl Cost {
    pub fn total_us(&self) -> f64 {
        self.client_us + self.server_us + self.agent_us + self.softirq_us
    }

    pub fn per_request(&self, requests: u64) -> Cost {
        let n = requests.max(1) as f64;
        Cost {
            client_us: self.client_us / n,
            server_us: self.server_us / n,
            agent_us: self.agent_us / n,
            softirq_us: self.softirq_us / n,
        }
    }

    fn since(&self, before: &Cost) -> Cost {
        Cost {
            client_us: self.client_us - before.client_us,
            server_us: self.server_us - before.server_us,
            agent_us: self.agent_us - before.agent_us,
            softirq_us: self.softirq_us - before.softirq_us,
        }
    }
}

/// What to read: the client's and servers' cgroups, and the agent's process if any.
pub struct Meter<'a> {
    pub client: &'a Path,
    pub server: &'a Path,
    pub agent: Option<i32>,
}

impl Meter<'_> {
    /// The counters now (cumulative).
    pub fn read(&self) -> Result<Cost> {
        Ok(Cost {
            client_us: cgroup_usage_us(self.client)?,
            server_us: cgroup_usage_us(self.server)?,
            agent_us: match self.agent {
                Some(pid) => process_us(pid)?,
                None => 0.0,
            },
            softirq_us: softirq_us()?,
        })
    }

    /// Runs `f`, returning its value and the CPU time used meanwhile.
    pub fn measure<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<(T, Cost)> {
        let before = self.read()?;
        let value = f()?;
        Ok((value, self.read()?.since(&before)))
    }
}

/// `usage_usec` from `<cgroup>/cpu.stat`.
pub fn cgroup_usage_us(cgroup: &Path) -> Result<f64> {
    let file = cgroup.join("cpu.stat");
    let text = fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    parse_cpu_stat(&text).with_context(|| format!("{}: no usage_usec line", file.display()))
}

fn parse_cpu_stat(text: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse().ok())
}

/// utime + stime of `pid` (every thread, also exited ones), µs.
pub fn process_us(pid: i32) -> Result<f64> {
    let file = format!("/proc/{pid}/stat");
    let text = fs::read_to_string(&file).with_context(|| format!("reading {file}"))?;
    parse_proc_pid_stat(&text).ok_or_else(|| anyhow!("{file}: no utime/stime in {text:?}"))
}

fn parse_proc_pid_stat(text: &str) -> Option<f64> {
    // "pid (comm) state ppid ...": comm may hold spaces; fields counted after the last ')'.
    // utime and stime are fields 14 and 15, i.e. the 12th and 13th after the comm.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / USER_HZ * 1e6)
}

/// The softirq time of every CPU (the `cpu` line of `/proc/stat`), µs.
pub fn softirq_us() -> Result<f64> {
    let text = fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    parse_proc_stat_softirq(&text).ok_or_else(|| anyhow!("/proc/stat: no softirq on its cpu line"))
}

fn parse_proc_stat_softirq(text: &str) -> Option<f64> {
    // cpu user nice system idle iowait irq softirq ...
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let softirq: f64 = line.split_whitespace().nth(7)?.parse().ok()?;
    Some(softirq / USER_HZ * 1e6)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_counters() {
        assert_eq!(parse_cpu_stat("usage_usec 1234\nuser_usec 1000\nsystem_usec 234\n"), Some(1234.0));
        assert_eq!(parse_cpu_stat("user_usec 1000\n"), None);
        let stat = "4242 (kproxy run (x)) S 1 4242 4242 0 -1 4194560 900 0 0 0 150 50 0 0 20 0 3 0";
        assert_eq!(parse_proc_pid_stat(stat), Some(2_000_000.0));
        let proc_stat = "cpu  87472 0 21652 47476 1028 0 109 116 0 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n";
        assert_eq!(parse_proc_stat_softirq(proc_stat), Some(1_090_000.0));
    }

    #[test]
    fn reads_this_process_and_machine() {
        // Burn a little CPU, then this process's own counters must have moved.
        let before = process_us(std::process::id() as i32).unwrap();
        let t0 = std::time::Instant::now();
        let mut x = 0u64;
        while t0.elapsed() < std::time::Duration::from_millis(100) {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        std::hint::black_box(x);
        let after = process_us(std::process::id() as i32).unwrap();
        assert!(after > before, "{before} -> {after}");
        assert!(softirq_us().unwrap() >= 0.0);
        let c = Cost { client_us: 10.0, server_us: 20.0, agent_us: 0.0, softirq_us: 10.0 };
        assert_eq!(c.per_request(4).total_us(), 10.0);
    }
}
