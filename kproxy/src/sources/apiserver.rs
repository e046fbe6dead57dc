//! The apiserver source: Services, EndpointSlices and this node's Node, watched with kube-rs.

/// One kind of access the agent needs from the apiserver. [`API_ACCESS`] is the single source
/// of truth for the ClusterRole in `deploy/`, which a test compares against it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApiAccess {
    /// API group ("" for the core group).
    pub group: &'static str,
    /// Resource (plural).
    pub resource: &'static str,
    /// Verbs, sorted.
    pub verbs: &'static [&'static str],
}

/// Everything the agent asks the apiserver for: it lists and watches Services and
/// EndpointSlices, gets and watches its own Node (for eligibility and its zone), and records
/// Events about the node, as kube-proxy does.
pub const API_ACCESS: &[ApiAccess] = &[
    ApiAccess { group: "", resource: "services", verbs: &["list", "watch"] },
    ApiAccess { group: "discovery.k8s.io", resource: "endpointslices", verbs: &["list", "watch"] },
    ApiAccess { group: "", resource: "nodes", verbs: &["get", "list", "watch"] },
    ApiAccess { group: "events.k8s.io", resource: "events", verbs: &["create", "patch", "update"] },
];
