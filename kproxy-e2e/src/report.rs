//! The one JSON line a `kproxy-testpod` client prints, and its parsing for tests and the demo.
//!
//! ```json
//! {"ok":298,"errors":{"ConnectionRefused":2},"by_backend":{"pod-a":101,"pod-b":97,"pod-c":100},
//!  "peers":{"10.96.0.10:80":298},"connect_ms":{"p50":0.1,"p99":0.3,"max":0.4},
//!  "request_ms":{...},"failure_ms":{...},"first_error_ms":12.5,
//!  "first_error":"connect: Connection refused (os error 111)","elapsed_ms":180.2}
//! ```
//!
//! - `errors`: failed requests by kind (`std::io::ErrorKind` names such as `ConnectionRefused`,
//!   `TimedOut`, `NetworkUnreachable`, or `BadResponse`, `HttpStatus503`).
//! - `by_backend`: successful requests by the name the backend answered with.
//! - `peers`: what `getpeername()` returned, per connection (HTTP, and UDP with `--connected`).
//! - `sources`: UDP only, the source address each reply came from (`recvfrom`).
//! - `seen_as`: the client's address as the backends saw it (their answers say), per request.
//! - `moved`: `udp-flows` only, the sockets whose backend changed between its two rounds, by
//!   `"old->new"` backend names.
//! - `connect_ms`: duration of successful connects; `request_ms`: of successful requests, from
//!   connect (or send) to the last byte of the answer; `failure_ms`: how long failed requests
//!   took to fail. Each is `{"p50","p99","max"}` in milliseconds, absent without samples.
//! - `first_error_ms`: when the first failure happened, in ms since the run started.

use std::collections::BTreeMap;

use anyhow::{anyhow, Context, Result};
use serde_json::{json, Map, Value};

/// Percentiles of a set of durations, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Latency {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl Latency {
    /// `None` when there are no samples.
    pub fn from_samples(samples: &[f64]) -> Option<Latency> {
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let at = |q: f64| sorted[((sorted.len() - 1) as f64 * q).round() as usize];
        (!sorted.is_empty()).then(|| Latency {
            p50: at(0.5),
            p99: at(0.99),
            max: at(1.0),
        })
    }

    fn to_json(self) -> Value {
        json!({"p50": round3(self.p50), "p99": round3(self.p99), "max": round3(self.max)})
    }

    fn from_json(v: &Value) -> Result<Latency> {
        let field = |k: &str| {
            v.get(k)
                .and_then(Value::as_f64)
                .ok_or_else(|| anyhow!("no {k}"))
        };
        Ok(Latency {
            p50: field("p50")?,
            p99: field("p99")?,
            max: field("max")?,
        })
    }
}

/// What one client run saw. See the module documentation for the JSON form.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    pub ok: u64,
    pub errors: BTreeMap<String, u64>,
    pub by_backend: BTreeMap<String, u64>,
    pub peers: BTreeMap<String, u64>,
    pub sources: BTreeMap<String, u64>,
    pub seen_as: BTreeMap<String, u64>,
    pub moved: BTreeMap<String, u64>,
    pub connect_ms: Option<Latency>,
    pub request_ms: Option<Latency>,
    pub failure_ms: Option<Latency>,
    pub first_error_ms: Option<f64>,
    pub first_error: Option<String>,
    pub elapsed_ms: f64,
}

impl Report {
    /// Number of failed requests, of any kind.
    pub fn failed(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Successful requests answered by `backend` (0 if none).
    pub fn backend(&self, backend: &str) -> u64 {
        self.by_backend.get(backend).copied().unwrap_or(0)
    }

    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("ok".into(), json!(self.ok));
        m.insert("errors".into(), json!(self.errors));
        m.insert("by_backend".into(), json!(self.by_backend));
        for (key, map) in
            [("peers", &self.peers), ("sources", &self.sources), ("seen_as", &self.seen_as), ("moved", &self.moved)]
        {
            if !map.is_empty() {
                m.insert(key.into(), json!(map));
            }
        }
        for (key, latency) in [
            ("connect_ms", self.connect_ms),
            ("request_ms", self.request_ms),
            ("failure_ms", self.failure_ms),
        ] {
            if let Some(latency) = latency {
                m.insert(key.into(), latency.to_json());
            }
        }
        if let Some(ms) = self.first_error_ms {
            m.insert("first_error_ms".into(), json!(round3(ms)));
        }
        if let Some(e) = &self.first_error {
            m.insert("first_error".into(), json!(e));
        }
        m.insert("elapsed_ms".into(), json!(round3(self.elapsed_ms)));
        Value::Object(m)
    }

    /// Parses the JSON line (the last line of `text` that starts with `{`).
    pub fn parse(text: &str) -> Result<Report> {
        let line = text
            .lines()
            .rev()
            .find(|l| l.trim_start().starts_with('{'))
            .ok_or_else(|| anyhow!("no JSON report in {text:?}"))?;
        let v: Value =
            serde_json::from_str(line).with_context(|| format!("parsing report {line:?}"))?;
        Self::from_json(&v).with_context(|| format!("reading report {line:?}"))
    }

    fn from_json(v: &Value) -> Result<Report> {
        let counts = |key: &str| -> Result<BTreeMap<String, u64>> {
            match v.get(key) {
                None => Ok(BTreeMap::new()),
                Some(Value::Object(m)) => m
                    .iter()
                    .map(|(k, n)| {
                        let n = n
                            .as_u64()
                            .ok_or_else(|| anyhow!("{key}.{k} is not a count"))?;
                        Ok((k.clone(), n))
                    })
                    .collect(),
                Some(other) => Err(anyhow!("{key} is not an object: {other}")),
            }
        };
        let latency = |key: &str| {
            v.get(key)
                .map(|l| Latency::from_json(l).with_context(|| format!("in {key}")))
                .transpose()
        };
        Ok(Report {
            ok: v
                .get("ok")
                .and_then(Value::as_u64)
                .ok_or_else(|| anyhow!("no ok count"))?,
            errors: counts("errors")?,
            by_backend: counts("by_backend")?,
            peers: counts("peers")?,
            sources: counts("sources")?,
            seen_as: counts("seen_as")?,
            moved: counts("moved")?,
            connect_ms: latency("connect_ms")?,
            request_ms: latency("request_ms")?,
            failure_ms: latency("failure_ms")?,
            first_error_ms: v.get("first_error_ms").and_then(Value::as_f64),
            first_error: v
                .get("first_error")
                .and_then(Value::as_str)
                .map(str::to_string),
            elapsed_ms: v.get("elapsed_ms").and_then(Value::as_f64).unwrap_or(0.0),
        })
    }
}

fn round3(ms: f64) -> f64 {
    (ms * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_json() {
        let mut r = Report {
            ok: 3,
            elapsed_ms: 12.5,
            connect_ms: Latency::from_samples(&[1.0, 2.0, 3.0]),
            first_error_ms: Some(4.25),
            first_error: Some("connect: refused".into()),
            ..Report::default()
        };
        r.errors.insert("ConnectionRefused".into(), 1);
        r.by_backend.insert("pod-a".into(), 3);
        r.peers.insert("10.96.0.10:80".into(), 3);
        r.seen_as.insert("10.244.1.1".into(), 3);
        r.moved.insert("pod-a->pod-b".into(), 1);
        let text = format!("some log line\n{}\n", r.to_json());
        assert_eq!(Report::parse(&text).unwrap(), r);
        assert_eq!(r.failed(), 1);
        assert_eq!(r.backend("pod-a"), 3);
        assert_eq!(r.backend("pod-z"), 0);
    }

    #[test]
    fn latency_percentiles() {
        let samples: Vec<f64> = (1..=100).map(f64::from).collect();
        let l = Latency::from_samples(&samples).unwrap();
        assert_eq!((l.p50, l.p99, l.max), (51.0, 99.0, 100.0));
        assert_eq!(Latency::from_samples(&[]), None);
    }
}
