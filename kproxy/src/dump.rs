//! `kproxy dump`: what is programmed, read back from the pinned maps alone.

use std::io::Write;

use serde::Serialize;

use crate::dataplane::{bpf::MapUsage, ProgrammedService};

/// One frontend in the JSON output. The field names and formats are a stable contract.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct DumpService {
    pub namespace: String,
    pub name: String,
    pub port_name: String,
    #[serde(rename = "type")]
    pub svc_type: String,
    /// `address:port`.
    pub frontend: String,
    /// `TCP` or `UDP`.
    pub protocol: String,
    /// `address:port`, in slot order. For a frontend with `in_cluster_backends`, what clients
    /// from outside the node get.
    pub backends: Vec<String>,
    /// `address:port`, in slot order: the backends clients in the cluster (the node's
    /// processes and its pods) get instead, for an external frontend of an
    /// `externalTrafficPolicy: Local` Service whose local endpoints are not all of its
    /// endpoints. Absent: every client gets `backends`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub in_cluster_backends: Option<Vec<String>>,
    /// Without backends: `"refuse"` (TCP RST / ICMP port unreachable) or `"drop"` (endpoints
    /// exist, none on this node, `externalTrafficPolicy: Local`). Absent with backends.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub no_backends: Option<&'static str>,
    /// CIDRs allowed to reach this frontend (`loadBalancerSourceRanges`); absent: everyone.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub source_ranges: Vec<String>,
    /// `sessionAffinity: ClientIP` timeout in seconds; absent without session affinity.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_affinity_seconds: Option<u32>,
}

#[derive(Debug, Serialize)]
pub struct Dump {
    pub services: Vec<DumpService>,
    pub maps: Vec<MapUsage>,
}

/// The JSON form: `{"services":[…]}`.
#[derive(Debug, Serialize)]
pub struct JsonDump<'a> {
    pub services: &'a [DumpService],
}

impl Dump {
    pub fn json(&self) -> JsonDump<'_> {
        JsonDump { services: &self.services }
    }

    pub fn new(programmed: Vec<ProgrammedService>, maps: Vec<MapUsage>) -> Self {
        let services = programmed
            .into_iter()
            .map(|p| {
                let (namespace, name, port_name) = p.name.unwrap_or_default();
                DumpService {
                    namespace,
                    name,
                    port_name,
                    svc_type: p.frontend_type.to_string(),
                    frontend: format!("{}:{}", p.frontend.address, p.frontend.port),
                    protocol: p.frontend.protocol.to_string(),
                    backends: p.backends.iter().map(ToString::to_string).collect(),
                    in_cluster_backends: p.internal_backends.map(|list| list.iter().map(ToString::to_string).collect()),
                    no_backends: match (p.backends.is_empty(), p.drop_unserved) {
                        (false, _) => None,
                        (true, false) => Some("refuse"),
                        (true, true) => Some("drop"),
                    },
                    source_ranges: p.source_ranges.iter().map(ToString::to_string).collect(),
                    session_affinity_seconds: (p.affinity_timeout > 0).then_some(p.affinity_timeout),
                }
            })
            .collect();
        Self { services, maps }
    }

    pub fn write_table(&self, out: &mut impl Write) -> std::io::Result<()> {
        let rows: Vec<[String; 5]> = self
            .services
            .iter()
            .map(|s| {
                let mut name = format!("{}/{}", s.namespace, s.name);
                if !s.port_name.is_empty() {
                    name = format!("{name}:{}", s.port_name);
                }
                let mut backends = match s.no_backends {
                    None => s.backends.join(", "),
                    Some("drop") => "(none here: dropped, externalTrafficPolicy Local)".to_string(),
                    Some(_) => "(none: refused)".to_string(),
                };
                if let Some(list) = &s.in_cluster_backends {
                    backends = format!("{backends}  [in-cluster clients: {}]", list.join(", "));
                }
                if let Some(seconds) = s.session_affinity_seconds {
                    backends = format!("{backends}  [ClientIP affinity {seconds}s]");
                }
                if !s.source_ranges.is_empty() {
                    backends = format!("{backends}  [only from {}]", s.source_ranges.join(", "));
                }
                [name, s.svc_type.clone(), s.frontend.clone(), s.protocol.clone(), backends]
            })
            .collect();
        let header = ["SERVICE", "TYPE", "FRONTEND", "PROTO", "BACKENDS"].map(String::from);
        let mut widths = [0usize; 4];
        for row in std::iter::once(&header).chain(&rows) {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.len());
            }
        }
        for row in std::iter::once(&header).chain(&rows) {
            writeln!(
                out,
                "{:w0$}  {:w1$}  {:w2$}  {:w3$}  {}",
                row[0], row[1], row[2], row[3], row[4],
                w0 = widths[0], w1 = widths[1], w2 = widths[2], w3 = widths[3]
            )?;
        }
        writeln!(out)?;
        for m in &self.maps {
            writeln!(out, "map {:<16} {:>8} / {:<8} entries", m.name, m.entries, m.capacity)?;
        }
        Ok(())
    }
}
