//! `kproxy trace --json` (where a connection from a source to a frontend would go, and why,
//! from the live maps) and `kproxy dump --conntrack --json` (the tc path's tracked flows).
//!
//! Addresses are `a.b.c.d` or `a.b.c.d:port`, protocols `TCP` or `UDP`, as in [`crate::dump`].

use serde::{Deserialize, Serialize};

/// The whole `kproxy trace --json` document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trace {
    /// The client: `address` or `address:port` (a port only when one was given).
    pub source: String,
    /// `namespace/name` when the source was given as a pod (its address resolved through the
    /// apiserver).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_pod: Option<String>,
    /// `address:port` of the destination.
    pub destination: String,
    /// `TCP` or `UDP`.
    pub protocol: String,
    /// Which programs translate the connection.
    pub path: TracePath,
    /// Why that path: where the source is.
    pub path_reason: String,
    /// The frontend entry found; absent when the destination is not a frontend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frontend: Option<TraceFrontend>,
    /// What a new connection (or, with [`Selection::Conntrack`], the given flow's next packet)
    /// gets.
    pub verdict: Verdict,
    /// The verdict in words.
    pub verdict_reason: String,
    /// How the backend is chosen; absent unless `verdict` is [`Verdict::Backend`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selection: Option<Selection>,
    /// The tracked flows (tc path) from the source (at the given port, if any) to the
    /// destination.
    #[serde(default)]
    pub conntrack: Vec<ConntrackFlow>,
}

/// Where a connection is translated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TracePath {
    /// `"socket"`: at `connect()` / `sendmsg()` by the cgroup socket programs (the node's
    /// processes and its pods).
    Socket,
    /// `"tc"`: per packet, at tc ingress of the node's devices (clients outside the node).
    Tc,
}

/// The frontend entry (slot 0) a lookup found, decoded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TraceFrontend {
    pub service_id: u32,
    #[serde(default)]
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub port_name: String,
    /// `ClusterIP`, `NodePort`, `ExternalIP` or `LoadBalancer`.
    #[serde(rename = "type")]
    pub svc_type: String,
    /// `address:port`.
    pub frontend: String,
    /// The entries used: `"external"` (scope 0) or `"in_cluster"` (scope 1, an
    /// `externalTrafficPolicy: Local` frontend's cluster-wide endpoints for in-cluster clients).
    pub scope: String,
    /// The scope-0 entry's `SVC_FLAG_*` bits by name: `ClusterIP`, `NodePort`, `ExternalIP`,
    /// `LoadBalancer`, `DropUnserved`, `SourceRanges`, `SessionAffinity`, `TwoScopes`.
    pub flags: Vec<String>,
    /// The traffic policies and other rules the maps record for this frontend, in words.
    pub policies: Vec<String>,
    /// `loadBalancerSourceRanges`; empty: every source.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub source_ranges: Vec<String>,
    /// Whether the source is within `source_ranges`; absent when the frontend has none or the
    /// path does not check them (the socket path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_allowed: Option<bool>,
    /// `sessionAffinity: ClientIP` timeout in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_affinity_seconds: Option<u32>,
    /// The backend set of the scope used, in slot order.
    pub backends: Vec<TraceBackend>,
}

/// One backend slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceBackend {
    pub slot: u16,
    pub backend_id: u32,
    /// `address:port`; empty if the slot names a backend id the backends map lacks.
    pub address: String,
}

/// The outcome of the trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Not a frontend: the connection is left alone.
    NotAService,
    /// Translated to a backend.
    Backend,
    /// Refused: TCP RST / ICMP port unreachable at tc, `ECONNREFUSED` at the socket.
    Refuse,
    /// Dropped: the source is outside `loadBalancerSourceRanges`.
    DropSourceRange,
    /// Dropped: `externalTrafficPolicy: Local` and no endpoint on this node.
    DropUnserved,
}

/// How the backend is chosen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rule", rename_all = "snake_case")]
pub enum Selection {
    /// Uniformly at random among `among` slots.
    Random { among: u16 },
    /// Session affinity: the client's last backend, within the timeout and still in the
    /// service.
    Affinity {
        backend: String,
        backend_id: u32,
        slot: u16,
        /// Seconds the affinity holds without a new connection.
        expires_in_seconds: f64,
    },
    /// An existing flow (the given source port): its conntrack entry keeps it on its backend.
    Conntrack { backend: String, backend_id: u32, slot: u16 },
}

/// One tracked flow of the tc path: its (client, frontend) entry and the entries that go with
/// it (see `kproxy_common::ct`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConntrackFlow {
    /// `address:port` of the client.
    pub client: String,
    /// `address:port` of the frontend.
    pub frontend: String,
    pub protocol: String,
    /// `namespace/name:port_name` of the frontend, if the metadata map knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// `address:port` the flow was translated to.
    pub backend: String,
    pub backend_id: u32,
    pub slot: u16,
    /// `address:port` the request leaves with towards a backend on another node (SNAT).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snat: Option<String>,
    /// TCP flags seen from the client: `syn`, `established`, `closing`; empty for UDP.
    #[serde(default)]
    pub seen: Vec<String>,
    /// Seconds until the (client, frontend) entry expires; negative: expired (the LRU map has
    /// not reused it yet; it no longer matches).
    pub expires_in_seconds: f64,
    /// Every entry of the flow, the (client, frontend) one first.
    pub entries: Vec<ConntrackEntry>,
}

/// One entry of the conntrack map, decoded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConntrackEntry {
    /// `ingress` (rewrites the destination) or `egress` (rewrites the source).
    pub direction: String,
    /// `address:port` of the packet's source, as the hook sees it.
    pub src: String,
    /// `address:port` of the packet's destination.
    pub dst: String,
    pub protocol: String,
    /// `address:port` written into the packet.
    pub nat: String,
    /// `client→frontend`, `backend reply`, `SNAT request` or `SNAT reply`; `unpaired` for
    /// an entry whose (client, frontend) entry is gone.
    pub role: String,
    pub service_id: u32,
    pub expires_in_seconds: f64,
}

/// `kproxy dump --conntrack --json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConntrackDump {
    pub flows: Vec<ConntrackFlow>,
    /// Entries that belong to no flow of `flows` (their (client, frontend) entry was evicted
    /// or expired and reused), when no filter is given.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unpaired: Vec<ConntrackEntry>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_form_is_the_documented_one() {
        let trace = Trace {
            source: "192.168.50.100".into(),
            source_pod: None,
            destination: "192.168.50.2:30080".into(),
            protocol: "TCP".into(),
            path: TracePath::Tc,
            path_reason: "r".into(),
            frontend: None,
            verdict: Verdict::DropSourceRange,
            verdict_reason: "v".into(),
            selection: Some(Selection::Random { among: 2 }),
            conntrack: vec![],
        };
        let json = serde_json::to_string(&trace).unwrap();
        assert_eq!(
            json,
            r#"{"source":"192.168.50.100","destination":"192.168.50.2:30080","protocol":"TCP","path":"tc","path_reason":"r","verdict":"drop_source_range","verdict_reason":"v","selection":{"rule":"random","among":2},"conntrack":[]}"#
        );
        assert_eq!(serde_json::from_str::<Trace>(&json).unwrap(), trace);
    }
}
