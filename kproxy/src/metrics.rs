//! Prometheus metrics, with kube-proxy's names and types where kube-proxy has the metric (so its
//! dashboards and alerts keep working) and `kproxy_` names for kproxy's own.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};
use std::sync::{atomic::AtomicU64, OnceLock};

use kproxy_common::drops::DropReason;

use crate::dataplane::{
    bpf::DropCounters,
    plan::{RefuseReason, Refused},
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TrafficPolicyLabel {
    /// `internal` or `external`.
    pub traffic_policy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabel {
    pub map: String,
}

/// client-go's `rest_client_requests_total` labels: status code (`<error>` when no response
/// came), the apiserver's `host:port`, and the HTTP method.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RestRequestLabels {
    pub code: String,
    pub host: String,
    pub method: String,
}

/// client-go's `rest_client_request_duration_seconds` labels: the HTTP method and the
/// apiserver's `host:port`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RestDurationLabels {
    pub verb: String,
    pub host: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InvalidLabels {
    pub kind: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabel {
    /// `services_full`, `backends_full`, `service_entries_full` or `too_many_endpoints`
    /// ([`crate::dataplane::plan::RefuseReason`]).
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DropLabel {
    /// [`DropReason::as_str`].
    pub reason: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// client-go's buckets for `rest_client_request_duration_seconds`.
fn rest_duration_buckets() -> Histogram {
    Histogram::new([0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0])
}

pub struct Metrics {
    registry: Registry,
    pub sync_duration: Histogram,
    pub sync_full_duration: Histogram,
    pub sync_partial_duration: Histogram,
    pub last_sync_timestamp: FloatGauge,
    pub last_queued_timestamp: FloatGauge,
    pub network_programming_duration: Histogram,
    pub endpoint_changes_pending: Gauge,
    pub endpoint_changes_total: Counter,
    pub service_changes_pending: Gauge,
    pub service_changes_total: Counter,
    pub no_local_endpoints: Family<TrafficPolicyLabel, Gauge>,
    pub healthz_total: Family<CodeLabel, Counter>,
    pub livez_total: Family<CodeLabel, Counter>,
    pub map_entries: Family<MapLabel, Gauge>,
    pub map_capacity: Family<MapLabel, Gauge>,
    pub map_writes_total: Counter,
    pub invalid_objects_total: Family<InvalidLabels, Counter>,
    pub sync_failures_total: Counter,
    pub rest_requests_total: Family<RestRequestLabels, Counter>,
    pub rest_request_duration: Family<RestDurationLabels, Histogram, fn() -> Histogram>,
    pub frontends_refused: Family<RefusedLabel, Gauge>,
    pub frontend_refusals_total: Family<RefusedLabel, Counter>,
    pub sock_storage_entries_total: Counter,
    pub sock_storage_overflow_total: Counter,
    pub sock_lru_inserts_total: Family<MapLabel, Counter>,
    pub datapath_drops_total: Family<DropLabel, Counter>,
    /// Where `datapath_drops_total` is read from at each scrape, once the maps are loaded.
    drop_counters: OnceLock<DropCounters>,
}

/// Sync durations: 1 ms to ~16 s, as kube-proxy's `sync_proxy_rules_duration_seconds`.
fn sync_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut m = Metrics {
            registry: Registry::default(),
            sync_duration: sync_buckets(),
            sync_full_duration: sync_buckets(),
            sync_partial_duration: sync_buckets(),
            last_sync_timestamp: FloatGauge::default(),
            last_queued_timestamp: FloatGauge::default(),
            // From 0.5 ms: kproxy programs a change in well under kube-proxy's first bucket.
            network_programming_duration: Histogram::new(exponential_buckets(0.0005, 2.0, 20)),
            endpoint_changes_pending: Gauge::default(),
            endpoint_changes_total: Counter::default(),
            service_changes_pending: Gauge::default(),
            service_changes_total: Counter::default(),
            no_local_endpoints: Family::default(),
            healthz_total: Family::default(),
            livez_total: Family::default(),
            map_entries: Family::default(),
            map_capacity: Family::default(),
            map_writes_total: Counter::default(),
            invalid_objects_total: Family::default(),
            sync_failures_total: Counter::default(),
            rest_requests_total: Family::default(),
            rest_request_duration: Family::new_with_constructor(rest_duration_buckets),
            frontends_refused: Family::default(),
            frontend_refusals_total: Family::default(),
            sock_storage_entries_total: Counter::default(),
            sock_storage_overflow_total: Counter::default(),
            sock_lru_inserts_total: Family::default(),
            datapath_drops_total: Family::default(),
            drop_counters: OnceLock::new(),
        };
        // A closed set of reasons starts at 0, so that `rate()` and `increase()` see the first
        // refusal (a series that appears at 1 has no earlier sample to differ from).
        for reason in RefuseReason::ALL {
            let _ = m.frontend_refusals_total.get_or_create(&RefusedLabel { reason: reason.as_str().into() });
        }
        for reason in DropReason::ALL {
            let _ = m.datapath_drops_total.get_or_create(&DropLabel { reason: reason.as_str().into() });
        }
        let r = &mut m.registry;
        r.register("kubeproxy_sync_proxy_rules_duration_seconds", "SyncProxyRules latency in seconds", m.sync_duration.clone());
        r.register("kubeproxy_sync_full_proxy_rules_duration_seconds", "SyncProxyRules latency in seconds for full resyncs", m.sync_full_duration.clone());
        r.register("kubeproxy_sync_partial_proxy_rules_duration_seconds", "SyncProxyRules latency in seconds for partial resyncs", m.sync_partial_duration.clone());
        r.register("kubeproxy_sync_proxy_rules_last_timestamp_seconds", "The last time proxy rules were successfully synced", m.last_sync_timestamp.clone());
        r.register("kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds", "The last time a sync of proxy rules was queued", m.last_queued_timestamp.clone());
        r.register("kubeproxy_network_programming_duration_seconds", "In Cluster Network Programming Latency in seconds", m.network_programming_duration.clone());
        r.register("kubeproxy_sync_proxy_rules_endpoint_changes_pending", "Pending proxy rules Endpoint changes", m.endpoint_changes_pending.clone());
        r.register("kubeproxy_sync_proxy_rules_endpoint_changes", "Cumulative proxy rules Endpoint changes", m.endpoint_changes_total.clone());
        r.register("kubeproxy_sync_proxy_rules_service_changes_pending", "Pending proxy rules Service changes", m.service_changes_pending.clone());
        r.register("kubeproxy_sync_proxy_rules_service_changes", "Cumulative proxy rules Service changes", m.service_changes_total.clone());
        r.register(
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            "Number of services with a Local traffic policy and no endpoints",
            m.no_local_endpoints.clone(),
        );
        r.register("kubeproxy_proxy_healthz", "Cumulative proxy healthz HTTP status", m.healthz_total.clone());
        r.register("kubeproxy_proxy_livez", "Cumulative proxy livez HTTP status", m.livez_total.clone());
        r.register("kproxy_bpf_map_entries", "Entries in each kproxy BPF map", m.map_entries.clone());
        r.register("kproxy_bpf_map_capacity", "Capacity (max_entries) of each kproxy BPF map", m.map_capacity.clone());
        r.register("kproxy_bpf_map_writes", "BPF map updates and deletes made by syncs", m.map_writes_total.clone());
        r.register("kproxy_invalid_objects", "Invalid object versions skipped, by kind and reason", m.invalid_objects_total.clone());
        r.register("kproxy_sync_failures", "Syncs that failed and were retried", m.sync_failures_total.clone());
        r.register(
            "rest_client_requests",
            "Number of HTTP requests, partitioned by status code, method, and host.",
            m.rest_requests_total.clone(),
        );
        r.register(
            "rest_client_request_duration_seconds",
            "Request latency in seconds. Broken down by verb, and host.",
            m.rest_request_duration.clone(),
        );
        r.register_collector(Box::new(crate::process_metrics::ProcessCollector::new()));
        r.register(
            "kproxy_frontends_refused",
            "Frontends (service ports) not programmed as desired because they do not fit, by reason",
            m.frontends_refused.clone(),
        );
        r.register(
            "kproxy_frontend_refusals",
            "Refusals of frontends that do not fit, counted once per frontend and reason, by reason",
            m.frontend_refusals_total.clone(),
        );
        r.register(
            "kproxy_sock_storage_entries",
            "Socket translations stored in the socket's own storage (where no other socket can evict them)",
            m.sock_storage_entries_total.clone(),
        );
        r.register(
            "kproxy_sock_storage_overflow",
            "Socket translations that went to the shared LRU maps although socket storage is in use (a socket talking to more services than its storage holds, or storage the kernel could not allocate)",
            m.sock_storage_overflow_total.clone(),
        );
        r.register(
            "kproxy_sock_lru_inserts",
            "New entries written to a shared socket LRU map; nothing else removes entries, so this minus kproxy_bpf_map_entries of the map is how many it evicted",
            m.sock_lru_inserts_total.clone(),
        );
        r.register(
            "kproxy_datapath_drops",
            "Packets the tc programs dropped, by reason (summed over the CPUs at each scrape)",
            m.datapath_drops_total.clone(),
        );
        m
    }

    /// Serves `kproxy_datapath_drops_total` from `counters` from now on (at each scrape).
    pub fn set_drop_counters(&self, counters: DropCounters) {
        if self.drop_counters.set(counters).is_err() {
            tracing::debug!("drop counters already set");
        }
    }

    /// Brings `kproxy_datapath_drops_total` up to the kernel's counters.
    fn follow_drops(&self) {
        let Some(counters) = self.drop_counters.get() else { return };
        match counters.totals() {
            Ok(totals) => {
                for (reason, total) in DropReason::ALL.iter().zip(totals) {
                    follow(&self.datapath_drops_total.get_or_create(&DropLabel { reason: reason.as_str().into() }), total);
                }
            }
            Err(e) => tracing::debug!("drop counters: {e:#}"),
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String never fails");
        out
    }

    /// The metrics server's answer to `path`: `/metrics` only.
    pub fn answer(&self, path: &str) -> crate::http::Answer {
        match path {
            "/metrics" => {
                self.follow_drops();
                crate::http::Answer {
                    status: hyper::StatusCode::OK,
                    content_type: "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    body: self.encode(),
                }
            }
            _ => crate::http::Answer::not_found(),
        }
    }

    /// Sets `kubeproxy_sync_proxy_rules_no_local_endpoints_total` for both policies.
    pub fn set_no_local_endpoints(&self, (internal, external): (usize, usize)) {
        for (policy, count) in [("internal", internal), ("external", external)] {
            let label = TrafficPolicyLabel { traffic_policy: policy.into() };
            self.no_local_endpoints.get_or_create(&label).set(count as i64);
        }
    }

    /// Records one apiserver request as client-go does: `code` is the status, or `None` when
    /// the request failed without a response.
    pub fn observe_rest_request(&self, host: &str, method: &str, code: Option<u16>, seconds: f64) {
        let code = code.map_or_else(|| "<error>".to_string(), |c| c.to_string());
        self.rest_requests_total
            .get_or_create(&RestRequestLabels { code, host: host.into(), method: method.into() })
            .inc();
        self.rest_request_duration.get_or_create(&RestDurationLabels { verb: method.into(), host: host.into() }).observe(seconds);
    }

    /// Sets `kproxy_frontends_refused` for every reason, from the frontends refused now.
    pub fn set_refused(&self, refused: &[Refused]) {
        for reason in RefuseReason::ALL {
            let count = refused.iter().filter(|r| r.reason == reason).count();
            self.frontends_refused.get_or_create(&RefusedLabel { reason: reason.as_str().into() }).set(count as i64);
        }
    }

    pub fn set_map(&self, name: &str, entries: usize, capacity: u32) {
        let label = MapLabel { map: name.to_string() };
        self.map_entries.get_or_create(&label).set(entries as i64);
        self.map_capacity.get_or_create(&label).set(i64::from(capacity));
    }
}

/// Brings a counter that mirrors a kernel counter up to `now`: the kernel counts, the
/// exposition only follows (a kernel counter that went backwards, e.g. after `kproxy cleanup`,
/// is not followed down).
pub fn follow(counter: &Counter, now: u64) {
    let shown = counter.get();
    if now > shown {
        counter.inc_by(now - shown);
    }
}

/// Seconds since the Unix epoch, for timestamp gauges.
pub fn unix_seconds(t: std::time::SystemTime) -> f64 {
    t.duration_since(std::time::SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs_f64()
}
