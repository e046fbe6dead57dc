//! `kproxy run --config FILE`: kube-proxy's `KubeProxyConfiguration`
//! (`kubeproxy.config.k8s.io/v1alpha1`), as kubeadm writes it into the `kube-proxy` ConfigMap.
//!
//! Every field with a kproxy meaning is honoured; command-line flags win over the file, as with
//! kube-proxy. kube-proxy's defaulting is kept: an empty string, `0s` or `null` means "the
//! default", so kubeadm's file (which spells out every field with its zero value) changes
//! nothing it does not set. Fields that are *set* (non-zero) but mean nothing to kproxy are
//! returned in [`KubeProxyConfig::ignored`] for one warning; fields kube-proxy does not know are
//! returned in [`KubeProxyConfig::unknown`] (kube-proxy too only warns about those: its strict
//! decoding errors are not fatal). A wrong `apiVersion`/`kind` or a field of the wrong type is
//! an error that names the field.

use std::{path::Path, path::PathBuf, time::Duration};

use serde_json::{Map, Value};

pub const API_VERSION: &str = "kubeproxy.config.k8s.io/v1alpha1";
pub const KIND: &str = "KubeProxyConfiguration";

/// What the file sets that kproxy honours; `None` where the file leaves kube-proxy's default.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KubeProxyConfig {
    /// `clientConnection.kubeconfig` → `--kubeconfig`.
    pub kubeconfig: Option<PathBuf>,
    /// `hostnameOverride` → `--hostname-override`.
    pub hostname_override: Option<String>,
    /// `healthzBindAddress` → `--healthz-bind-address` (port 10256 added when absent, as
    /// kube-proxy's defaulting does).
    pub healthz_bind_address: Option<String>,
    /// `metricsBindAddress` → `--metrics-bind-address` (port 10249 added when absent).
    pub metrics_bind_address: Option<String>,
    /// `nodePortAddresses` → `--nodeport-addresses`, keywords expanded (`all`, `localhost`).
    pub nodeport_addresses: Option<Vec<String>>,
    /// `<mode>.syncPeriod` of the configured `mode` (iptables when unset) → `--sync-period`.
    pub sync_period: Option<Duration>,
    /// `<mode>.minSyncPeriod` → `--min-sync-period`.
    pub min_sync_period: Option<Duration>,
    /// `oomScoreAdj` → `--oom-score-adj`.
    pub oom_score_adj: Option<i32>,
    /// `logging.format` (`text` or `json`) → `--logging-format`.
    pub logging_format: Option<String>,
    /// `logging.verbosity` → `-v`.
    pub verbosity: Option<u32>,
    /// `field=value` for every field set to a non-default value that kproxy does not use.
    pub ignored: Vec<String>,
    /// Dotted paths of fields that KubeProxyConfiguration does not have.
    pub unknown: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("--config {path}: {message}")]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

/// Reads and interprets `path`.
pub fn load(path: &Path) -> Result<KubeProxyConfig, ConfigError> {
    let error = |message: String| ConfigError { path: path.display().to_string(), message };
    let text = std::fs::read_to_string(path).map_err(|e| error(format!("read: {e}")))?;
    parse(&text).map_err(error)
}

/// The fields of the file and how kproxy treats each. `Use` fields are read by [`parse`].
enum Field {
    /// Honoured.
    Use,
    /// No kproxy meaning: reported when set.
    Ignore,
    /// A nested object of these fields.
    Object(&'static [(&'static str, Field)]),
    /// Free-form (maps, lists of objects): reported as a whole when set.
    Opaque,
}
use Field::{Ignore, Object, Opaque, Use};

const SYNC: &[(&str, Field)] = &[("syncPeriod", Use), ("minSyncPeriod", Use)];
const IPTABLES: &[(&str, Field)] = &[
    ("syncPeriod", Use),
    ("minSyncPeriod", Use),
    ("masqueradeAll", Ignore),
    ("masqueradeBit", Ignore),
    ("localhostNodePorts", Ignore),
    ("snatNodeInternalIP", Ignore),
];
const NFTABLES: &[(&str, Field)] =
    &[("syncPeriod", Use), ("minSyncPeriod", Use), ("masqueradeAll", Ignore), ("masqueradeBit", Ignore)];
const IPVS: &[(&str, Field)] = &[
    ("syncPeriod", Use),
    ("minSyncPeriod", Use),
    ("scheduler", Ignore),
    ("excludeCIDRs", Ignore),
    ("strictARP", Ignore),
    ("tcpTimeout", Ignore),
    ("tcpFinTimeout", Ignore),
    ("udpTimeout", Ignore),
];
const TOP: &[(&str, Field)] = &[
    ("apiVersion", Use),
    ("kind", Use),
    ("featureGates", Opaque),
    (
        "clientConnection",
        Object(&[
            ("kubeconfig", Use),
            ("acceptContentTypes", Ignore),
            ("contentType", Ignore),
            ("qps", Ignore),
            ("burst", Ignore),
        ]),
    ),
    (
        "logging",
        Object(&[("format", Use), ("flushFrequency", Ignore), ("verbosity", Use), ("vmodule", Opaque), ("options", Opaque)]),
    ),
    ("hostnameOverride", Use),
    ("bindAddress", Use),
    ("healthzBindAddress", Use),
    ("metricsBindAddress", Use),
    ("bindAddressHardFail", Ignore),
    ("enableProfiling", Ignore),
    ("showHiddenMetricsForVersion", Ignore),
    ("mode", Use),
    ("iptables", Object(IPTABLES)),
    ("ipvs", Object(IPVS)),
    ("nftables", Object(NFTABLES)),
    (
        "winkernel",
        Object(&[
            ("networkName", Ignore),
            ("sourceVip", Ignore),
            ("enableDSR", Ignore),
            ("rootHnsEndpointName", Ignore),
            ("forwardHealthCheckVip", Ignore),
        ]),
    ),
    ("detectLocalMode", Ignore),
    ("detectLocal", Object(&[("bridgeInterface", Ignore), ("interfaceNamePrefix", Ignore)])),
    ("clusterCIDR", Ignore),
    ("nodePortAddresses", Use),
    ("oomScoreAdj", Use),
    (
        "conntrack",
        Object(&[
            ("maxPerCore", Ignore),
            ("min", Ignore),
            ("tcpEstablishedTimeout", Ignore),
            ("tcpCloseWaitTimeout", Ignore),
            ("tcpBeLiberal", Ignore),
            ("udpTimeout", Ignore),
            ("udpStreamTimeout", Ignore),
        ]),
    ),
    ("configSyncPeriod", Ignore),
    ("portRange", Ignore),
    ("windowsRunAsService", Ignore),
];

/// Whether `v` is what kube-proxy's defaulting treats as unset.
fn is_default(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty() || parse_go_duration(s) == Some(Duration::ZERO) || s == "0",
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.values().all(is_default),
    }
}

/// Walks `object` against `fields`: collects set-but-ignored and unknown fields.
fn classify(object: &Map<String, Value>, fields: &[(&str, Field)], prefix: &str, out: &mut KubeProxyConfig) {
    for (name, value) in object {
        let path = format!("{prefix}{name}");
        match fields.iter().find(|(n, _)| n == name).map(|(_, f)| f) {
            None => out.unknown.push(path),
            Some(Use) => {}
            Some(Ignore | Opaque) if is_default(value) => {}
            Some(Ignore | Opaque) => out.ignored.push(format!("{path}={value}")),
            Some(Object(nested)) => match value {
                Value::Object(o) => classify(o, nested, &format!("{path}."), out),
                v if is_default(v) => {}
                v => out.ignored.push(format!("{path}={v}")),
            },
        }
    }
}

fn string(v: Option<&Value>, field: &str) -> Result<Option<String>, String> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(format!("{field}: want a string, got {other}")),
    }
}

fn duration(v: Option<&Value>, field: &str) -> Result<Option<Duration>, String> {
    let Some(s) = string(v, field)? else { return Ok(None) };
    let d = parse_go_duration(&s).ok_or_else(|| format!("{field}: {s:?} is not a duration (e.g. 30s, 1m0s)"))?;
    Ok((d != Duration::ZERO).then_some(d))
}

/// `host:port`, or `host` with kube-proxy's default port appended (`appendPortIfNeeded`).
fn bind_address(v: Option<&Value>, field: &str, default_port: u16) -> Result<Option<String>, String> {
    let Some(s) = string(v, field)? else { return Ok(None) };
    if s.parse::<std::net::SocketAddr>().is_ok() {
        return Ok(Some(s));
    }
    match s.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(ip)) => Ok(Some(format!("{ip}:{default_port}"))),
        Ok(std::net::IpAddr::V6(ip)) => Ok(Some(format!("[{ip}]:{default_port}"))),
        Err(_) => Err(format!("{field}: {s:?} is not IP or IP:PORT")),
    }
}

/// Parses the file's text (YAML or JSON).
pub fn parse(text: &str) -> Result<KubeProxyConfig, String> {
    let doc: Value = serde_saphyr::from_str(text).map_err(|e| format!("not YAML or JSON: {e}"))?;
    let Value::Object(top) = doc else { return Err("want a KubeProxyConfiguration object".into()) };
    let api_version = string(top.get("apiVersion"), "apiVersion")?.unwrap_or_default();
    if api_version != API_VERSION {
        return Err(format!("apiVersion: want {API_VERSION}, got {api_version:?}"));
    }
    let kind = string(top.get("kind"), "kind")?.unwrap_or_default();
    if kind != KIND {
        return Err(format!("kind: want {KIND}, got {kind:?}"));
    }
    let mut out = KubeProxyConfig::default();
    classify(&top, TOP, "", &mut out);

    let section = |name: &str| top.get(name).and_then(Value::as_object);
    out.kubeconfig = string(section("clientConnection").and_then(|c| c.get("kubeconfig")), "clientConnection.kubeconfig")?
        .map(PathBuf::from);
    out.hostname_override = string(top.get("hostnameOverride"), "hostnameOverride")?.filter(|h| !h.trim().is_empty());
    // kube-proxy's idea of the node's primary IP; kproxy serves every node address (or
    // nodePortAddresses), so only a specific address is worth a warning.
    if let Some(ip) = string(top.get("bindAddress"), "bindAddress")?.filter(|ip| ip != "0.0.0.0" && ip != "::") {
        out.ignored.push(format!("bindAddress={ip:?}"));
    }
    out.healthz_bind_address = bind_address(top.get("healthzBindAddress"), "healthzBindAddress", 10256)?;
    out.metrics_bind_address = bind_address(top.get("metricsBindAddress"), "metricsBindAddress", 10249)?;

    // The sync periods of the mode kube-proxy would run; the other modes' sections are reported
    // as ignored when set.
    let mode = string(top.get("mode"), "mode")?.unwrap_or_else(|| "iptables".into());
    let active = match mode.as_str() {
        "iptables" | "ipvs" | "nftables" => mode.as_str(),
        other => return Err(format!("mode: {other:?} is not iptables, ipvs or nftables")),
    };
    for name in ["iptables", "ipvs", "nftables"] {
        let Some(s) = section(name) else { continue };
        let sync = duration(s.get("syncPeriod"), &format!("{name}.syncPeriod"))?;
        let min_sync = duration(s.get("minSyncPeriod"), &format!("{name}.minSyncPeriod"))?;
        if name == active {
            (out.sync_period, out.min_sync_period) = (sync, min_sync);
        } else {
            for ((field, _), value) in SYNC.iter().zip([sync, min_sync]) {
                if let Some(d) = value {
                    out.ignored.push(format!("{name}.{field}={d:?} (mode is {active})"));
                }
            }
        }
    }

    out.nodeport_addresses = match top.get("nodePortAddresses") {
        None | Some(Value::Null) => None,
        Some(Value::Array(items)) if items.is_empty() => None,
        Some(Value::Array(items)) => {
            let mut cidrs = Vec::new();
            for item in items {
                match item.as_str() {
                    Some("all") => cidrs.push("0.0.0.0/0".to_string()),
                    Some("localhost") => cidrs.push("127.0.0.0/8".to_string()),
                    // kube-proxy's `primary` is the Node object's primary IP, which the agent
                    // only learns after start: kproxy's default (every node address) applies.
                    Some("primary") => out.ignored.push("nodePortAddresses=primary (every node address is served)".into()),
                    Some(cidr) => {
                        cidr.parse::<crate::node::Cidr>().map_err(|e| format!("nodePortAddresses: {e}"))?;
                        cidrs.push(cidr.to_string());
                    }
                    None => return Err(format!("nodePortAddresses: want strings, got {item}")),
                }
            }
            (!cidrs.is_empty()).then_some(cidrs)
        }
        Some(other) => return Err(format!("nodePortAddresses: want a list, got {other}")),
    };
    let logging = section("logging");
    out.logging_format = match string(logging.and_then(|l| l.get("format")), "logging.format")? {
        None => None,
        Some(f) if f == "text" || f == "json" => Some(f),
        Some(f) => return Err(format!("logging.format: {f:?} is not text or json")),
    };
    out.verbosity = match logging.and_then(|l| l.get("verbosity")) {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(0) => None,
            Some(n) => Some(u32::try_from(n).map_err(|_| format!("logging.verbosity: {n} is too large"))?),
            None => return Err(format!("logging.verbosity: want a non-negative integer, got {v}")),
        },
    };
    out.oom_score_adj = match top.get("oomScoreAdj") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_i64() {
            Some(n) if (-1000..=1000).contains(&n) => Some(n as i32),
            _ => return Err(format!("oomScoreAdj: want an integer in [-1000, 1000], got {v}")),
        },
    };
    Ok(out)
}

/// Parses a Go `time.Duration` string as `metav1.Duration` serialises it ("1h0m0s", "30s",
/// "1.5s", "300ms"). `None` if it is not one.
pub fn parse_go_duration(s: &str) -> Option<Duration> {
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let mut rest = s;
    let mut total = 0f64;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let value: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += value * scale;
        rest = &rest[unit_len..];
    }
    Some(Duration::from_secs_f64(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `kubeadm init` writes as `config.conf` in the `kube-proxy` ConfigMap (Kubernetes
    /// 1.31–1.35, with a pod subnet): every field spelled out with its zero value.
    pub const KUBEADM_DEFAULT: &str = include_str!("../../deploy/examples/kubeadm-kube-proxy-config.conf");

    #[test]
    fn kubeadms_default_file_sets_only_the_kubeconfig_and_warns_about_nothing_set() {
        let c = parse(KUBEADM_DEFAULT).expect("kubeadm's file parses");
        assert_eq!(c.kubeconfig.as_deref(), Some(Path::new("/var/lib/kube-proxy/kubeconfig.conf")));
        assert_eq!((c.healthz_bind_address.as_deref(), c.metrics_bind_address.as_deref()), (None, None));
        assert_eq!((c.sync_period, c.min_sync_period, c.oom_score_adj), (None, None, None));
        assert_eq!(c.nodeport_addresses, None);
        assert_eq!(c.ignored, ["clusterCIDR=\"10.244.0.0/16\""], "only the set field kproxy has no use for");
        assert!(c.unknown.is_empty(), "{:?}", c.unknown);
    }

    #[test]
    fn honoured_fields_follow_kube_proxys_defaulting_and_the_mode() {
        let c = parse(
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n\
             hostnameOverride: node-a\nhealthzBindAddress: 10.0.0.5\nmetricsBindAddress: 0.0.0.0:9999\n\
             mode: nftables\nnftables: {syncPeriod: 1m0s, minSyncPeriod: 1.5s}\niptables: {syncPeriod: 10s}\n\
             nodePortAddresses: [10.0.0.0/8, all, primary]\noomScoreAdj: -999\n\
             conntrack: {maxPerCore: 32768, min: null}\nenableProfiling: true\nnotAField: 1\n\
             logging: {format: json, verbosity: 4}\n",
        )
        .expect("parses");
        assert_eq!(c.hostname_override.as_deref(), Some("node-a"));
        assert_eq!(c.healthz_bind_address.as_deref(), Some("10.0.0.5:10256"), "kube-proxy appends the default port");
        assert_eq!(c.metrics_bind_address.as_deref(), Some("0.0.0.0:9999"));
        assert_eq!(c.sync_period, Some(Duration::from_secs(60)));
        assert_eq!(c.min_sync_period, Some(Duration::from_millis(1500)));
        assert_eq!(c.nodeport_addresses, Some(vec!["10.0.0.0/8".to_string(), "0.0.0.0/0".to_string()]));
        assert_eq!(c.oom_score_adj, Some(-999));
        assert_eq!((c.logging_format.as_deref(), c.verbosity), (Some("json"), Some(4)));
        assert_eq!(
            c.ignored,
            [
                "conntrack.maxPerCore=32768",
                "enableProfiling=true",
                "iptables.syncPeriod=10s (mode is nftables)",
                "nodePortAddresses=primary (every node address is served)",
            ]
        );
        assert_eq!(c.unknown, ["notAField"]);
    }

    #[test]
    fn bad_files_are_errors_that_name_the_field() {
        let head = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n";
        for (body, want) in [
            ("", "want a KubeProxyConfiguration object"),
            ("kind: KubeProxyConfiguration\n", "apiVersion: want kubeproxy.config.k8s.io/v1alpha1"),
            ("apiVersion: kubeproxy.config.k8s.io/v1alpha2\nkind: KubeProxyConfiguration\n", "apiVersion: want"),
            ("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeletConfiguration\n", "kind: want KubeProxyConfiguration"),
            (&format!("{head}iptables: {{syncPeriod: soon}}\n"), "iptables.syncPeriod: \"soon\" is not a duration"),
            (&format!("{head}healthzBindAddress: localhost:x\n"), "healthzBindAddress: \"localhost:x\" is not IP"),
            (&format!("{head}nodePortAddresses: [10.0.0.0]\n"), "nodePortAddresses: "),
            (&format!("{head}oomScoreAdj: -5000\n"), "oomScoreAdj: want an integer"),
            (&format!("{head}mode: userspace\n"), "mode: \"userspace\""),
            (&format!("{head}hostnameOverride: [a]\n"), "hostnameOverride: want a string"),
            (&format!("{head}logging: {{format: xml}}\n"), "logging.format: \"xml\" is not text or json"),
            (&format!("{head}logging: {{verbosity: -1}}\n"), "logging.verbosity: want a non-negative integer"),
        ] {
            let err = parse(body).expect_err(body);
            assert!(err.contains(want), "{body:?}: {err}");
        }
    }

    #[test]
    fn go_durations_parse_as_metav1_writes_them() {
        for (s, want) in [("0s", 0.0), ("30s", 30.0), ("1m0s", 60.0), ("2h22m", 8520.0), ("1.5s", 1.5), ("300ms", 0.3), ("0", 0.0)] {
            assert_eq!(parse_go_duration(s), Some(Duration::from_secs_f64(want)), "{s}");
        }
        for s in ["", "5", "1d", "s", "1m0"] {
            assert_eq!(parse_go_duration(s), None, "{s}");
        }
    }
}
