//! `kproxy dump --json`: `{"services":[…]}`, one entry per programmed frontend, read back from
//! the pinned maps alone.

use serde::{Deserialize, Serialize};

/// The whole document.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dump {
    pub services: Vec<DumpService>,
}

/// One frontend. The field names and formats are a stable contract.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DumpService {
    /// Empty for a frontend whose Service name the agent does not know (never in practice).
    #[serde(default)]
    pub namespace: String,
    pub name: String,
    /// The Service port's name; empty for an unnamed port.
    #[serde(default)]
    pub port_name: String,
    /// `ClusterIP`, `NodePort`, `ExternalIP` or `LoadBalancer`: what kind of address `frontend`
    /// is.
    #[serde(rename = "type", default)]
    pub svc_type: String,
    /// `address:port`.
    pub frontend: String,
    /// `TCP` or `UDP`.
    #[serde(default)]
    pub protocol: String,
    /// `address:port`, in slot order. For a frontend with `in_cluster_backends`, what clients
    /// from outside the node get.
    #[serde(default)]
    pub backends: Vec<String>,
    /// `address:port`, in slot order: the backends clients in the cluster (the node's
    /// processes and its pods) get instead, for an external frontend of an
    /// `externalTrafficPolicy: Local` Service whose local endpoints are not all of its
    /// endpoints. Absent: every client gets `backends`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_cluster_backends: Option<Vec<String>>,
    /// Without backends, what a connection gets; absent with backends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_backends: Option<NoBackends>,
    /// CIDRs allowed to reach this frontend (`loadBalancerSourceRanges`); absent: everyone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub source_ranges: Vec<String>,
    /// `sessionAffinity: ClientIP` timeout in seconds; absent without session affinity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_affinity_seconds: Option<u32>,
}

/// What a frontend without backends does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NoBackends {
    /// `"refuse"`: TCP RST / ICMP port unreachable (`ECONNREFUSED` on the socket path).
    Refuse,
    /// `"drop"`: endpoints exist, none on this node, `externalTrafficPolicy: Local`.
    Drop,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_form_is_the_documented_one() {
        let dump = Dump {
            services: vec![DumpService {
                namespace: "default".into(),
                name: "web".into(),
                port_name: "http".into(),
                svc_type: "ClusterIP".into(),
                frontend: "10.96.0.10:80".into(),
                protocol: "TCP".into(),
                backends: vec![],
                in_cluster_backends: None,
                no_backends: Some(NoBackends::Refuse),
                source_ranges: vec![],
                session_affinity_seconds: None,
            }],
        };
        let json = serde_json::to_string(&dump).unwrap();
        assert_eq!(
            json,
            r#"{"services":[{"namespace":"default","name":"web","port_name":"http","type":"ClusterIP","frontend":"10.96.0.10:80","protocol":"TCP","backends":[],"no_backends":"refuse"}]}"#
        );
        assert_eq!(serde_json::from_str::<Dump>(&json).unwrap(), dump);
        // Readers default what an older writer left out.
        let minimal: Dump = serde_json::from_str(r#"{"services":[{"name":"web","frontend":"10.96.0.10:80"}]}"#).unwrap();
        assert_eq!(minimal.services[0].backends, Vec::<String>::new());
        assert_eq!(minimal.services[0].no_backends, None);
    }
}
