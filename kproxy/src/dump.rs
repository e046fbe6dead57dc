//! `kproxy dump`: what is programmed, read back from the pinned maps alone.

use std::io::Write;

use crate::{
    dataplane::{bpf::MapUsage, ProgrammedService},
    model::FrontendKind,
};

pub use kproxy_api::dump::{DumpService, NoBackends};

/// What is programmed: the frontends (what `--json` prints, [`kproxy_api::dump`]) and the maps'
/// fill.
#[derive(Debug)]
pub struct Dump {
    pub programmed: kproxy_api::dump::Dump,
    pub maps: Vec<MapUsage>,
}

impl Dump {
    /// The JSON form: `{"services":[…]}`.
    pub fn json(&self) -> &kproxy_api::dump::Dump {
        &self.programmed
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
                    svc_type: p.frontend_type.map_or("Unknown", FrontendKind::as_str).to_string(),
                    frontend: format!("{}:{}", p.frontend.address, p.frontend.port),
                    protocol: p.frontend.protocol.to_string(),
                    backends: p.backends.iter().map(ToString::to_string).collect(),
                    in_cluster_backends: p.internal_backends.map(|list| list.iter().map(ToString::to_string).collect()),
                    no_backends: match (p.backends.is_empty(), p.drop_unserved) {
                        (false, _) => None,
                        (true, false) => Some(NoBackends::Refuse),
                        (true, true) => Some(NoBackends::Drop),
                    },
                    source_ranges: p.source_ranges.iter().map(ToString::to_string).collect(),
                    session_affinity_seconds: (p.affinity_timeout > 0).then_some(p.affinity_timeout),
                }
            })
            .collect();
        Self { programmed: kproxy_api::dump::Dump { services }, maps }
    }

    pub fn write_table(&self, out: &mut impl Write) -> std::io::Result<()> {
        let rows: Vec<[String; 5]> = self
            .programmed
            .services
            .iter()
            .map(|s| {
                let mut name = format!("{}/{}", s.namespace, s.name);
                if !s.port_name.is_empty() {
                    name = format!("{name}:{}", s.port_name);
                }
                let mut backends = match s.no_backends {
                    None => s.backends.join(", "),
                    Some(NoBackends::Drop) => "(none here: dropped, externalTrafficPolicy Local)".to_string(),
                    Some(NoBackends::Refuse) => "(none: refused)".to_string(),
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
