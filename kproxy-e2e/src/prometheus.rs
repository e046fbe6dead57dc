//! Parsing the Prometheus text exposition format, as the agent's `/metrics` serves it, into
//! samples that tests can query.
//!
//! ```
//! let m = kproxy_e2e::prometheus::Metrics::parse(
//!     "# TYPE kproxy_bpf_map_entries gauge\nkproxy_bpf_map_entries{map=\"KP_SERVICES\"} 3\n",
//! ).unwrap();
//! assert_eq!(m.get("kproxy_bpf_map_entries", &[("map", "KP_SERVICES")]), Some(3.0));
//! ```

use std::collections::BTreeMap;

use anyhow::{anyhow, bail, Result};

/// One sample: a metric name, its labels and its value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Every sample of one scrape, plus the `# TYPE` lines.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metrics {
    pub samples: Vec<Sample>,
    /// Metric family name → type (`counter`, `gauge`, `histogram`, ...).
    pub types: BTreeMap<String, String>,
}

impl Metrics {
    pub fn parse(text: &str) -> Result<Metrics> {
        let mut metrics = Metrics::default();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            if let Some(rest) = line.strip_prefix('#') {
                let mut words = rest.split_whitespace();
                if words.next() == Some("TYPE") {
                    if let (Some(name), Some(ty)) = (words.next(), words.next()) {
                        metrics.types.insert(name.to_string(), ty.to_string());
                    }
                }
                continue;
            }
            let sample =
                parse_sample(line).map_err(|e| anyhow!("line {}: {line:?}: {e}", n + 1))?;
            metrics.samples.push(sample);
        }
        Ok(metrics)
    }

    /// Samples called `name` whose labels include all of `labels`.
    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// The value of the one sample `name{labels...}` (extra labels allowed); `None` if there is
    /// none. With several matches, their sum.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut found = self.matching(name, labels).peekable();
        found.peek()?;
        Some(found.map(|s| s.value).sum())
    }

    /// The sum of every sample called `name` (0 if none).
    pub fn sum(&self, name: &str) -> f64 {
        self.matching(name, &[]).map(|s| s.value).sum()
    }

    /// Whether a metric family (or sample) called `name` appears at all: its `# TYPE` line, a
    /// sample with that name, or a histogram's `_bucket`/`_sum`/`_count` samples. A counter
    /// `x_total` also counts as present from its OpenMetrics `# TYPE x counter` line alone (a
    /// labelled family without samples yet).
    /// Whether a query naming the series `name` (as PromQL spells it: `x_total`, `h_bucket`)
    /// finds it on this scrape: a sample of that name, or a family whose type makes that series
    /// (a labelled family without samples yet still prints its `# TYPE` line).
    pub fn serves(&self, name: &str) -> bool {
        let family_is = |suffix: &str, ty: &str| {
            name.strip_suffix(suffix).is_some_and(|family| self.types.get(family).is_some_and(|t| t == ty))
        };
        self.samples.iter().any(|s| s.name == name)
            || self.types.get(name).is_some_and(|t| t == "gauge" || t == "unknown")
            || family_is("_total", "counter")
            || ["_bucket", "_sum", "_count"].iter().any(|suffix| family_is(suffix, "histogram"))
    }

    pub fn has(&self, name: &str) -> bool {
        let family = name.strip_suffix("_total").unwrap_or(name);
        self.types.contains_key(name)
            || self.types.get(family).is_some_and(|t| t == "counter")
            || self.samples.iter().any(|s| {
                s.name == name
                    || s.name
                        .strip_prefix(name)
                        .is_some_and(|rest| ["_bucket", "_sum", "_count", "_total"].contains(&rest))
            })
    }
}

fn parse_sample(line: &str) -> Result<Sample> {
    let (name, rest) = match line.find(['{', ' ']) {
        Some(i) => (&line[..i], &line[i..]),
        None => bail!("no value"),
    };
    let mut labels = BTreeMap::new();
    let rest = if let Some(after) = rest.strip_prefix('{') {
        let mut chars = after.char_indices().peekable();
        let end;
        loop {
            // key
            while chars.peek().is_some_and(|&(_, c)| c == ',' || c == ' ') {
                chars.next();
            }
            if chars.peek().is_some_and(|&(_, c)| c == '}') {
                end = chars.next().expect("peeked").0;
                break;
            }
            let mut key = String::new();
            for (_, c) in chars.by_ref() {
                if c == '=' {
                    break;
                }
                key.push(c);
            }
            if chars.next().map(|(_, c)| c) != Some('"') {
                bail!("label {key:?} has no quoted value");
            }
            let mut value = String::new();
            loop {
                match chars.next() {
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, c)) => value.push(c),
                        None => bail!("unterminated label value"),
                    },
                    Some((_, '"')) => break,
                    Some((_, c)) => value.push(c),
                    None => bail!("unterminated label value"),
                }
            }
            labels.insert(key.trim().to_string(), value);
        }
        &after[end + 1..]
    } else {
        rest
    };
    let value_text = rest
        .split_whitespace()
        .next()
        .ok_or_else(|| anyhow!("no value"))?;
    let value = match value_text {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().map_err(|_| anyhow!("bad value {v:?}"))?,
    };
    Ok(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_counters_gauges_and_histograms() {
        let text = r#"# HELP kubeproxy_sync_proxy_rules_duration_seconds SyncProxyRules latency
# TYPE kubeproxy_sync_proxy_rules_duration_seconds histogram
kubeproxy_sync_proxy_rules_duration_seconds_bucket{le="0.001"} 2
kubeproxy_sync_proxy_rules_duration_seconds_bucket{le="+Inf"} 3
kubeproxy_sync_proxy_rules_duration_seconds_sum 0.0042
kubeproxy_sync_proxy_rules_duration_seconds_count 3
# TYPE kproxy_invalid_objects_total counter
kproxy_invalid_objects_total{kind="Service",reason="port"} 2
kproxy_invalid_objects_total{reason="label",kind="EndpointSlice"} 1
kubeproxy_proxy_healthz_total{code="200"} 7 1700000000000
weird{a="x\"y\\z",b="1,2"} NaN
# EOF
"#;
        let m = Metrics::parse(text).unwrap();
        assert_eq!(
            m.get("kubeproxy_sync_proxy_rules_duration_seconds_count", &[]),
            Some(3.0)
        );
        assert_eq!(
            m.get(
                "kubeproxy_sync_proxy_rules_duration_seconds_bucket",
                &[("le", "+Inf")]
            ),
            Some(3.0)
        );
        assert_eq!(m.sum("kproxy_invalid_objects_total"), 3.0);
        assert_eq!(
            m.get("kproxy_invalid_objects_total", &[("kind", "EndpointSlice")]),
            Some(1.0)
        );
        assert_eq!(
            m.get("kubeproxy_proxy_healthz_total", &[("code", "200")]),
            Some(7.0)
        );
        assert_eq!(
            m.get("kubeproxy_proxy_healthz_total", &[("code", "503")]),
            None
        );
        let weird = m.matching("weird", &[]).next().unwrap();
        assert_eq!(weird.labels["a"], "x\"y\\z");
        assert_eq!(weird.labels["b"], "1,2");
        assert!(m.has("kubeproxy_sync_proxy_rules_duration_seconds"));
        assert!(m.has("kubeproxy_proxy_healthz"));
        assert!(!m.has("kubeproxy_network_programming_duration_seconds"));
        let empty = Metrics::parse("# TYPE kproxy_invalid_objects counter\n# EOF\n").unwrap();
        assert!(empty.has("kproxy_invalid_objects_total"));
        assert_eq!(empty.sum("kproxy_invalid_objects_total"), 0.0);
        assert_eq!(
            m.types["kubeproxy_sync_proxy_rules_duration_seconds"],
            "histogram"
        );
    }
}
