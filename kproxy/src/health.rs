//! `/healthz` and `/livez` with kube-proxy's meaning, and the `healthCheckNodePort` servers;
//! [`crate::http`] serves them.
//!
//! Healthy means: no update has been waiting longer than the health timeout (kube-proxy uses
//! twice `--sync-period`) since it was queued. `/healthz` additionally requires the node to be
//! eligible: not being deleted and not tainted `ToBeDeletedByClusterAutoscaler`, so load
//! balancers drain the node before it goes.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use hyper::StatusCode;
use k8s_openapi::api::core::v1::Node;

use crate::{
    http::{self, Answer},
    metrics::{CodeLabel, Metrics},
};

/// Taint the cluster autoscaler puts on a node it is about to delete.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

#[derive(Debug)]
struct State {
    last_updated: Option<SystemTime>,
    oldest_pending_queued: Option<SystemTime>,
    node_eligible: bool,
}

/// The proxy's health, as kube-proxy's `ProxyHealthServer` tracks it.
#[derive(Debug)]
pub struct ProxyHealth {
    timeout: Duration,
    state: Mutex<State>,
}

impl ProxyHealth {
    pub fn new(timeout: Duration) -> Self {
        // Eligible (and so healthy) while starting, until a Node event says otherwise.
        let state = State { last_updated: None, oldest_pending_queued: None, node_eligible: true };
        Self { timeout, state: Mutex::new(state) }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the plain fields inconsistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A change arrived that a sync must apply.
    pub fn queued_update(&self, now: SystemTime) {
        self.state().oldest_pending_queued.get_or_insert(now);
    }

    /// A sync applied everything queued.
    pub fn updated(&self, now: SystemTime) {
        let mut s = self.state();
        s.oldest_pending_queued = None;
        s.last_updated = Some(now);
    }

    /// Follows this node's object (`None`: deleted).
    pub fn sync_node(&self, node: Option<&Node>) {
        let eligible = node.is_some_and(|n| {
            n.metadata.deletion_timestamp.is_none()
                && !n
                    .spec
                    .as_ref()
                    .and_then(|s| s.taints.as_ref())
                    .is_some_and(|t| t.iter().any(|t| t.key == TO_BE_DELETED_TAINT))
        });
        self.state().node_eligible = eligible;
    }

    /// (healthy, node eligible, last updated).
    fn check(&self, now: SystemTime) -> (bool, bool, Option<SystemTime>) {
        let s = self.state();
        let late = s
            .oldest_pending_queued
            .is_some_and(|q| now.duration_since(q).unwrap_or_default() >= self.timeout);
        (!late, s.node_eligible, s.last_updated)
    }

    /// Status and JSON body of `/healthz` (`with_node`) or `/livez`.
    pub fn respond(&self, now: SystemTime, with_node: bool) -> (StatusCode, String) {
        let (healthy, eligible, last_updated) = self.check(now);
        let healthy = healthy && (eligible || !with_node);
        // As kube-proxy: a healthy answer reports lastUpdated as now.
        let last = if healthy { Some(now) } else { last_updated };
        let fmt = |t: Option<SystemTime>| t.map_or_else(String::new, |t| humantime::format_rfc3339_nanos(t).to_string());
        let mut body = format!(r#"{{"lastUpdated": "{}","currentTime": "{}""#, fmt(last), fmt(Some(now)));
        if with_node {
            body.push_str(&format!(r#", "nodeEligible": {eligible}"#));
        }
        body.push('}');
        let code = if healthy { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
        (code, body)
    }
}

/// The healthz server's answer to `path`: `/healthz` and `/livez` only (`/metrics` is served on
/// the metrics address alone: the healthz port listens on every address of the node). Every
/// answer is counted in `kubeproxy_proxy_healthz` / `kubeproxy_proxy_livez`.
pub fn answer(health: &ProxyHealth, metrics: &Metrics, path: &str) -> Answer {
    let with_node = match path {
        "/healthz" => true,
        "/livez" => false,
        _ => return Answer::not_found(),
    };
    let (code, body) = health.respond(SystemTime::now(), with_node);
    let family = if with_node { &metrics.healthz_total } else { &metrics.livez_total };
    family.get_or_create(&CodeLabel { code: code.as_u16().to_string() }).inc();
    Answer::json(code, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(taint: Option<&str>, deleting: bool) -> Node {
        let mut n = Node::default();
        if let Some(key) = taint {
            n.spec = Some(k8s_openapi::api::core::v1::NodeSpec {
                taints: Some(vec![k8s_openapi::api::core::v1::Taint { key: key.into(), effect: "NoSchedule".into(), ..Default::default() }]),
                ..Default::default()
            });
        }
        if deleting {
            n.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Default::default()));
        }
        n
    }

    #[test]
    fn unhealthy_only_when_an_update_waits_past_the_timeout() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let h = ProxyHealth::new(Duration::from_secs(60));
        assert_eq!(h.respond(t0, true).0, StatusCode::OK, "healthy while starting");
        h.queued_update(t0);
        assert_eq!(h.respond(t0 + Duration::from_secs(59), true).0, StatusCode::OK);
        // A later event does not move the oldest pending time.
        h.queued_update(t0 + Duration::from_secs(30));
        let (code, body) = h.respond(t0 + Duration::from_secs(60), true);
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains(r#""nodeEligible": true"#), "{body}");
        assert!(body.starts_with(r#"{"lastUpdated": "","currentTime": "1970-01-12T13:47:40"#), "{body}");
        assert_eq!(h.respond(t0 + Duration::from_secs(60), false).0, StatusCode::SERVICE_UNAVAILABLE);
        h.updated(t0 + Duration::from_secs(61));
        let (code, body) = h.respond(t0 + Duration::from_secs(62), false);
        assert_eq!(code, StatusCode::OK);
        assert!(!body.contains("nodeEligible"), "{body}");
        assert!(body.contains(r#""lastUpdated": "1970-01-12T13:47:42"#), "{body}");
    }

    #[test]
    fn an_ineligible_node_fails_healthz_but_not_livez() {
        let now = SystemTime::now();
        let h = ProxyHealth::new(Duration::from_secs(60));
        for (n, eligible) in [
            (Some(node(Some(TO_BE_DELETED_TAINT), false)), false),
            (Some(node(None, true)), false),
            (None, false),
            (Some(node(Some("other"), false)), true),
        ] {
            h.sync_node(n.as_ref());
            let (code, body) = h.respond(now, true);
            assert_eq!(code == StatusCode::OK, eligible, "{body}");
            assert!(body.contains(&format!(r#""nodeEligible": {eligible}"#)), "{body}");
            assert_eq!(h.respond(now, false).0, StatusCode::OK);
        }
    }
}

/// One `healthCheckNodePort` server's answer: the Service and how many of its endpoints are
/// on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceHealthCheck {
    pub namespace: String,
    pub name: String,
    pub local_endpoints: usize,
}

/// The `healthCheckNodePort` servers of Services with `externalTrafficPolicy: Local`, as
/// kube-proxy serves them: 200 while the node has a local endpoint (load balancers send it
/// traffic), 503 otherwise (they drain it), with kube-proxy's JSON body.
#[derive(Default)]
pub struct ServiceHealthServers {
    servers: std::collections::BTreeMap<u16, (Arc<Mutex<ServiceHealthCheck>>, tokio::task::JoinHandle<()>)>,
}

impl ServiceHealthServers {
    /// Starts, updates and stops servers so that exactly `wanted` are served. A port that
    /// cannot be bound is reported and retried at the next call.
    pub fn sync(&mut self, wanted: &std::collections::BTreeMap<u16, ServiceHealthCheck>, health: &Arc<ProxyHealth>) {
        self.servers.retain(|port, (_, task)| {
            let keep = wanted.contains_key(port);
            if !keep {
                task.abort();
            }
            keep
        });
        for (port, check) in wanted {
            if let Some((current, _)) = self.servers.get(port) {
                *current.lock().unwrap_or_else(|e| e.into_inner()) = check.clone();
                continue;
            }
            let listener = std::net::TcpListener::bind((std::net::Ipv4Addr::UNSPECIFIED, *port))
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .and_then(tokio::net::TcpListener::from_std);
            let listener = match listener {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(port, service = %format!("{}/{}", check.namespace, check.name), "healthCheckNodePort: {e}");
                    continue;
                }
            };
            let state = Arc::new(Mutex::new(check.clone()));
            let name = format!("healthCheckNodePort {port} ({}/{})", check.namespace, check.name);
            let (answer_state, health) = (state.clone(), health.clone());
            let task = http::serve(listener, name, http::LIMITS, move |_path| service_answer(&answer_state, &health));
            self.servers.insert(*port, (state, task));
        }
    }
}

/// kube-proxy's answer on a `healthCheckNodePort` (any path).
fn service_answer(state: &Mutex<ServiceHealthCheck>, health: &ProxyHealth) -> Answer {
    let check = state.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let (proxy_healthy, _, _) = health.check(SystemTime::now());
    let body = format!(
        r#"{{"service": {{"namespace": "{}", "name": "{}"}}, "localEndpoints": {}, "serviceProxyHealthy": {proxy_healthy}}}"#,
        check.namespace, check.name, check.local_endpoints
    );
    let code = if check.local_endpoints > 0 && proxy_healthy { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    Answer::json(code, body)
}
