//! Traffic: `wrk` for rates under load, `kproxy-testpod http` for the latency of one request at
//! a time. Both run as clients of a [`ModeEnv`] (on the node, or external), bounded in time and
//! count.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::env::{Access, ModeEnv};
use kproxy_e2e::report::Report;

/// Short connections (connect, one request, response, close) or requests on kept-alive
/// connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    Short,
    Keepalive,
}

impl Workload {
    pub const ALL: [Workload; 2] = [Workload::Short, Workload::Keepalive];

    pub fn name(self) -> &'static str {
        match self {
            Workload::Short => "short",
            Workload::Keepalive => "keepalive",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Workload::Short => "short connections",
            Workload::Keepalive => "kept-alive connections",
        }
    }
}

/// What one `wrk` run measured.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct WrkResult {
    /// Requests per second.
    pub rate: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub requests: u64,
    /// Socket errors (connect, read, write, timeout) plus non-2xx responses.
    pub errors: u64,
    /// Of those, connect errors (e.g. no ephemeral port left).
    #[serde(default)]
    pub connect_errors: u64,
}

/// `wrk` settings.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct WrkSettings {
    pub threads: u32,
    pub connections: u32,
    pub seconds: u32,
}

/// Runs `wrk` against `http://addr/` from `env`'s client position for `access`.
pub fn wrk(env: &ModeEnv, access: Access, addr: &str, workload: Workload, s: WrkSettings) -> Result<WrkResult> {
    let mut cmd = Command::new("wrk");
    cmd.arg(format!("-t{}", s.threads))
        .arg(format!("-c{}", s.connections))
        .arg(format!("-d{}s", s.seconds))
        .args(["--timeout", "2s", "--latency"]);
    if workload == Workload::Short {
        cmd.args(["-H", "Connection: close"]);
    }
    cmd.arg(format!("http://{addr}/")).stdin(Stdio::null());
    let what = kproxy_e2e::cmd::describe(&cmd);
    let out = env.client(access, cmd, Duration::from_secs(u64::from(s.seconds) + 30))?;
    kproxy_e2e::cmd::check_output(&what, &out)?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_wrk(&text).with_context(|| format!("parsing the output of `{what}`:\n{text}"))
}

/// Parses wrk's `--latency` report.
pub fn parse_wrk(text: &str) -> Result<WrkResult> {
    let mut r = WrkResult::default();
    let mut in_distribution = false;
    let (mut p50, mut p99) = (None, None);
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with("Latency Distribution") {
            in_distribution = true;
            continue;
        }
        if in_distribution {
            if let Some((pct, value)) = line.split_once(char::is_whitespace) {
                match pct {
                    "50%" => p50 = Some(duration_ms(value.trim())?),
                    "99%" => p99 = Some(duration_ms(value.trim())?),
                    "75%" | "90%" => {}
                    _ => in_distribution = false,
                }
            }
        }
        if let Some(rest) = line.strip_prefix("Requests/sec:") {
            r.rate = rest.trim().parse().context("Requests/sec")?;
        } else if line.contains(" requests in ") {
            r.requests = line
                .split_whitespace()
                .next()
                .unwrap_or("")
                .parse()
                .context("requests")?;
        } else if let Some(rest) = line.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 0"
            for part in rest.split(',') {
                let mut words = part.split_whitespace();
                if let (Some(kind), Some(n)) = (words.next(), words.next()) {
                    let n = n.parse::<u64>().unwrap_or(0);
                    r.errors += n;
                    if kind == "connect" {
                        r.connect_errors += n;
                    }
                }
            }
        } else if let Some(rest) = line.strip_prefix("Non-2xx or 3xx responses:") {
            r.errors += rest.trim().parse::<u64>().unwrap_or(0);
        }
    }
    r.p50_ms = p50.ok_or_else(|| anyhow!("no 50% latency"))?;
    r.p99_ms = p99.ok_or_else(|| anyhow!("no 99% latency"))?;
    if r.requests == 0 {
        bail!("wrk made no request");
    }
    Ok(r)
}

/// "123.45us", "1.20ms", "2.00s" in milliseconds.
fn duration_ms(text: &str) -> Result<f64> {
    let split = text
        .find(|c: char| c.is_ascii_alphabetic())
        .ok_or_else(|| anyhow!("no unit in {text:?}"))?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().with_context(|| format!("{text:?}"))?;
    Ok(match unit {
        "us" => number / 1000.0,
        "ms" => number,
        "s" => number * 1000.0,
        "m" => number * 60_000.0,
        _ => bail!("unknown unit in {text:?}"),
    })
}

/// What `count` sequential requests measured.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct SeqResult {
    /// Per request: from connect (short) or send (kept alive) to the last byte of the answer.
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub ok: u64,
    pub errors: u64,
    /// Distinct backends that answered.
    pub backends: usize,
}

/// `kproxy-testpod http --count COUNT [--keepalive]` against `addr`, one request at a time.
pub fn sequential(
    env: &ModeEnv,
    access: Access,
    testpod: &Path,
    addr: &str,
    workload: Workload,
    count: u32,
) -> Result<SeqResult> {
    let mut cmd = Command::new(testpod);
    cmd.args(["http", "--addr", addr, "--count", &count.to_string()])
        .args(["--timeout-ms", "2000", "--max-ms", "60000"])
        .stdin(Stdio::null());
    if workload == Workload::Keepalive {
        cmd.arg("--keepalive");
    }
    let what = kproxy_e2e::cmd::describe(&cmd);
    let out = env.client(access, cmd, Duration::from_secs(90))?;
    kproxy_e2e::cmd::check_output(&what, &out)?;
    let report = Report::parse(&String::from_utf8_lossy(&out.stdout))
        .with_context(|| format!("output of `{what}`"))?;
    let latency = report
        .request_ms
        .ok_or_else(|| anyhow!("`{what}` had no successful request: {:?}", report.first_error))?;
    Ok(SeqResult {
        p50_ms: latency.p50,
        p99_ms: latency.p99,
        ok: report.ok,
        errors: report.failed(),
        backends: report.by_backend.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_wrk_output() {
        let text = "Running 2s test @ http://10.96.0.10:80/
  1 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   321.24us  100.12us   2.31ms   90.00%
    Req/Sec     6.20k   300.00     6.50k    70.00%
  Latency Distribution
     50%  300.00us
     75%  350.00us
     90%  400.00us
     99%    1.20ms
  12345 requests in 2.00s, 1.23MB read
  Socket errors: connect 5, read 3, write 0, timeout 1
  Non-2xx or 3xx responses: 2
Requests/sec:   6172.50
Transfer/sec:    630.00KB
";
        let r = parse_wrk(text).unwrap();
        assert_eq!(r.requests, 12345);
        assert!((r.rate - 6172.5).abs() < 1e-9);
        assert!((r.p50_ms - 0.3).abs() < 1e-9);
        assert!((r.p99_ms - 1.2).abs() < 1e-9);
        assert_eq!(r.errors, 11);
        assert_eq!(r.connect_errors, 5);
    }
}
