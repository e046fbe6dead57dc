//! `kproxy run`: attach the datapath, follow a source, keep the maps equal to it, and report
//! health and metrics.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Instant, SystemTime},
};

use anyhow::{Context as _, Result};
use kproxy_api::event::{Event, SocketTermination, SocketTerminationStatus, Synced};
use kproxy_common::{
    lb::{BACKENDS_MAP, MEMBERS_MAP, SERVICES_MAP, SERVICE_META_MAP},
    sock::{SOCK_AFFINITY_MAP, SOCK_REVNAT_MAP, SOCK_STAT_AFFINITY_NEW, SOCK_STAT_LOCAL, SOCK_STAT_LOCAL_FULL, SOCK_STAT_REVNAT_NEW},
};
use tokio::sync::Notify;

use crate::{
    dataplane::{
        bpf::{BpfMaps, DropCounters, ServiceCounterMaps, SocketMaps},
        plan::{Limits, RefuseReason, Refused},
    },
    events::Events,
    health::{self, ProxyHealth},
    http,
    loader::{self, Capacities, PinLayout},
    metrics::{follow, unix_seconds, InvalidLabels, MapLabel, Metrics, RefusedLabel},
    model::{DesiredState, Frontend, InvalidObject},
    runner::{self, RunKind, RunnerConfig},
    sockterm::SockTerm,
    sources::{
        apiserver::{self, Shared},
        manifests::ManifestSource,
    },
    sync::{SyncScope, Syncer},
    sys::release_free_memory,
    tracker::ModelStore,
};

/// Where Services and EndpointSlices come from.
pub enum Source {
    /// A YAML file or directory, watched.
    Manifests(PathBuf),
    /// The apiserver, from a kubeconfig or the in-cluster configuration.
    Apiserver { kubeconfig: Option<PathBuf> },
}

pub struct AgentConfig {
    pub source: Source,
    /// This node's name (its Node object; endpoints with this `nodeName` are local).
    pub node_name: String,
    pub layout: PinLayout,
    pub cgroup: PathBuf,
    /// Devices for the tc programs (NodePort, external and load-balancer IPs).
    pub devices: Vec<String>,
    pub tc_attach: loader::TcAttach,
    /// Addresses NodePorts are served on.
    pub node_port_addresses: Vec<std::net::Ipv4Addr>,
    pub capacities: Capacities,
    pub runner: RunnerConfig,
    pub healthz_addr: Option<SocketAddr>,
    pub metrics_addr: Option<SocketAddr>,
    /// How long a changed manifest file must be quiet (after its writer closed it) before it
    /// is read (`crate::sources::settle`).
    pub manifests_settle: std::time::Duration,
    /// Destroy sockets still connected to removed backends where the kernel allows it
    /// (`crate::sockterm`, Linux >= 6.5).
    pub terminate_sockets: bool,
    /// Keep socket translations in socket-local storage where the kernel allows it (see
    /// `kproxy_common::sock`); false: in the shared LRU maps only.
    pub socket_storage: bool,
    /// Where the machine-readable events go (`--event-file`, [`crate::events`]).
    pub events: Events,
}

/// Logs each problem once, when it first appears, and counts each newly invalid object.
#[derive(Default)]
struct ProblemLog {
    reported: BTreeSet<String>,
    invalid: BTreeSet<InvalidObject>,
}

impl ProblemLog {
    fn report(&mut self, problems: impl IntoIterator<Item = String>) {
        let current: BTreeSet<String> = problems.into_iter().collect();
        for p in current.difference(&self.reported) {
            tracing::error!("{p}");
        }
        self.reported = current;
    }

    fn count_invalid(&mut self, current: BTreeSet<InvalidObject>, metrics: &Metrics) {
        for e in current.difference(&self.invalid) {
            let labels = InvalidLabels { kind: e.kind.to_string(), reason: e.code.as_str().to_string() };
            metrics.invalid_objects_total.get_or_create(&labels).inc();
        }
        self.invalid = current;
    }
}

/// Logs and counts each refused frontend once per reason, and says when it is programmed at
/// last; the syncs in between refuse it again silently.
#[derive(Default)]
struct RefusedLog {
    reported: BTreeMap<Frontend, RefuseReason>,
}

impl RefusedLog {
    fn report(&mut self, refused: &[Refused], desired: &DesiredState, metrics: &Metrics) {
        let current: BTreeMap<Frontend, RefuseReason> = refused.iter().map(|r| (r.frontend, r.reason)).collect();
        for r in refused.iter().filter(|r| self.reported.get(&r.frontend) != Some(&r.reason)) {
            tracing::error!(service = %r.name, frontend = %r.frontend, reason = r.reason.as_str(), "does not fit: {}", r.detail);
            metrics.frontend_refusals_total.get_or_create(&RefusedLabel { reason: r.reason.as_str().into() }).inc();
        }
        for frontend in self.reported.keys().filter(|f| !current.contains_key(f)) {
            if let Some(want) = desired.get(frontend) {
                tracing::info!(service = %want.name, %frontend, "programmed: it fits now");
            }
        }
        metrics.set_refused(refused);
        self.reported = current;
    }
}

pub async fn run(cfg: AgentConfig) -> Result<()> {
    raise_open_file_limit();
    let metrics = Arc::new(Metrics::new());
    // kube-proxy's health timeout: twice the sync period.
    let health = Arc::new(ProxyHealth::new(cfg.runner.sync_period * 2));
    // Ports first: if another proxy still holds them, fail before touching the datapath.
    let mut servers = Vec::new();
    if let Some(addr) = cfg.healthz_addr {
        let (health, metrics) = (health.clone(), metrics.clone());
        let answer = move |path: &str| health::answer(&health, &metrics, path);
        servers.push(http::serve(http::bind(addr).await?, format!("healthz {addr}"), http::LIMITS, answer));
        tracing::info!(%addr, "serving /healthz and /livez");
    }
    if let Some(addr) = cfg.metrics_addr {
        let metrics = metrics.clone();
        let answer = move |path: &str| metrics.answer(path);
        servers.push(http::serve(http::bind(addr).await?, format!("metrics {addr}"), http::LIMITS, answer));
        tracing::info!(%addr, "serving /metrics");
    }
    let mut events = cfg.events;
    // The pinned maps are adopted before the source is read, so the datapath keeps serving.
    let attached =
        loader::load_and_attach(&cfg.layout, &cfg.cgroup, &cfg.devices, cfg.tc_attach, cfg.capacities, cfg.socket_storage)?;
    events.emit(&Event::Attached(attached));
    let maps = BpfMaps::open(&cfg.layout.maps_dir()).context("open the pinned maps")?;
    // Optional: never a reason not to start.
    let (mut sockterm, status, error) = if cfg.terminate_sockets {
        match SockTerm::load(&cfg.layout.maps_dir(), cfg.capacities.max_sock_entries) {
            Ok(t) => {
                tracing::info!("stale-socket termination available: sockets connected to removed backends are destroyed");
                (Some(t), SocketTerminationStatus::Available, None)
            }
            Err(e) => {
                tracing::warn!(
                    "stale-socket termination unavailable ({e:#}); connected UDP sockets and TCP connections keep a removed backend until the application reconnects"
                );
                (None, SocketTerminationStatus::Unavailable, Some(format!("{e:#}")))
            }
        }
    } else {
        tracing::info!("stale-socket termination switched off (--terminate-stale-sockets=false)");
        (None, SocketTerminationStatus::Off, None)
    };
    events.emit(&Event::SocketTermination(SocketTermination { status, error }));
    // Loading parsed the kernel's BTF (some 20 MB, twice with socket termination): hand it back.
    release_free_memory();
    for usage in maps.usage()? {
        metrics.set_map(usage.name, usage.entries, usage.capacity);
    }
    // Only metrics come from these: never a reason not to start.
    let mut socket_metrics = SocketMaps::open(&cfg.layout.maps_dir())
        .inspect_err(|e| tracing::warn!("socket map metrics unavailable: {e:#}"))
        .ok()
        .map(|maps| SocketMetrics { maps, counted: None });
    if let Some(m) = &mut socket_metrics {
        m.update(&metrics, true);
    }
    match DropCounters::open(&cfg.layout.maps_dir()) {
        Ok(counters) => metrics.set_drop_counters(counters),
        Err(e) => tracing::warn!("datapath drop metrics unavailable: {e:#}"),
    }
    if cfg.capacities.service_counters > 0 {
        match ServiceCounterMaps::open(&cfg.layout.maps_dir()) {
            Ok(maps) => metrics.set_service_counters(maps),
            Err(e) => tracing::warn!("per-service counter metrics unavailable: {e:#}"),
        }
    }
    let limits = Limits {
        max_services: cfg.capacities.max_services,
        max_backends: cfg.capacities.max_backends,
        max_service_entries: cfg.capacities.service_entries(),
    };
    let mut syncer = Syncer::new(maps, limits);
    let mut store = ModelStore::default();
    store.set_node_addresses(cfg.node_port_addresses.clone());
    store.set_node_name(Some(cfg.node_name.clone()));
    let shared = Shared {
        store: Arc::new(Mutex::new(store)),
        health: health.clone(),
        metrics: metrics.clone(),
        changed: Arc::new(Notify::new()),
    };
    let mut manifests = None;
    let mut _watcher = None;
    let mut _watches = Vec::new();
    match &cfg.source {
        Source::Manifests(path) => {
            let source = ManifestSource::with_settle(path.clone(), cfg.manifests_settle);
            _watcher = Some(source.watch(shared.changed.clone()).with_context(|| format!("watch {}", path.display()))?);
            manifests = Some(source);
            tracing::info!(manifests = %path.display(), settle = ?cfg.manifests_settle, "watching manifests");
        }
        Source::Apiserver { kubeconfig } => {
            let client = apiserver::client(kubeconfig.as_deref(), metrics.clone()).await?;
            tracing::info!(node = %cfg.node_name, "listing Services and EndpointSlices");
            _watches = apiserver::start(client, &cfg.node_name, shared.clone()).await?;
        }
    }

    let mut problems = ProblemLog::default();
    let mut refusals = RefusedLog::default();
    let mut service_health = health::ServiceHealthServers::default();
    let trigger = shared.changed.clone();
    let sync_once = move |kind: RunKind| -> bool {
        let started = Instant::now();
        let mut store = shared.store.lock().unwrap_or_else(|e| e.into_inner());
        let mut source_problems = Vec::new();
        let mut duplicates = Vec::new();
        if let Some(source) = manifests.as_mut() {
            // Only the files changed since the last sync are read (all of them the first time;
            // a full sync also re-reads those whose stamp changed unseen).
            match source.update(&mut store, kind == RunKind::Full) {
                Ok(stats) => tracing::debug!(?stats, "manifests read"),
                Err(e) => {
                    problems.report([e]);
                    return false;
                }
            }
            source_problems = source.problems().cloned().collect();
            duplicates = source.duplicates();
        }
        if manifests.is_some() && store.pending() != (0, 0) {
            // With manifests, changes are only found here, at sync time.
            metrics.last_queued_timestamp.set(unix_seconds(SystemTime::now()));
        }
        let changes = store.take_changes();
        metrics.service_changes_pending.set(0);
        metrics.endpoint_changes_pending.set(0);
        metrics.service_changes_total.inc_by(changes.services as u64);
        metrics.endpoint_changes_total.inc_by(changes.endpoints as u64);
        let invalid: BTreeSet<InvalidObject> = store.invalid().cloned().chain(duplicates).collect();
        problems.report(source_problems.into_iter().chain(invalid.iter().map(|e| format!("skipped invalid object: {e}"))));
        problems.count_invalid(invalid, &metrics);
        let scope = match kind {
            RunKind::Full => SyncScope::Full,
            RunKind::Changed => SyncScope::Changed(&changes.frontends),
        };
        match syncer.sync(store.desired(), scope) {
            Ok(stats) => {
                let now = SystemTime::now();
                health.updated(now);
                service_health.sync(&store.health_checks(), &health);
                refusals.report(&stats.refused, store.desired(), &metrics);
                if stats.sync_again {
                    // Room this sync freed too late for it to use (see Syncer::sync).
                    shared.changed.notify_one();
                }
                let seconds = stats.duration.as_secs_f64();
                metrics.sync_duration.observe(seconds);
                if stats.full { &metrics.sync_full_duration } else { &metrics.sync_partial_duration }.observe(seconds);
                metrics.last_sync_timestamp.set(unix_seconds(now));
                metrics.map_writes_total.inc_by(stats.ops as u64);
                metrics.set_no_local_endpoints(store.no_local_endpoints());
                for t in &changes.trigger_times {
                    metrics.network_programming_duration.observe(now.duration_since(*t).unwrap_or_default().as_secs_f64());
                }
                if let (Some((services, backends, meta)), Some(members)) = (syncer.entries(), syncer.member_entries()) {
                    for (name, entries) in
                        [(SERVICES_MAP, services), (BACKENDS_MAP, backends), (SERVICE_META_MAP, meta), (MEMBERS_MAP, members)]
                    {
                        metrics.map_entries.get_or_create(&MapLabel { map: name.into() }).set(entries as i64);
                    }
                }
                if let Some(m) = &mut socket_metrics {
                    m.update(&metrics, stats.full);
                }
                let synced = Synced {
                    full: stats.full,
                    frontends: store.desired().len(),
                    changed_frontends: changes.frontends.len(),
                    writes: stats.ops,
                    sync_ms: seconds * 1e3,
                    total_ms: started.elapsed().as_secs_f64() * 1e3,
                };
                tracing::info!(
                    full = synced.full,
                    frontends = synced.frontends,
                    changed_frontends = synced.changed_frontends,
                    writes = synced.writes,
                    sync_ms = format!("{:.3}", synced.sync_ms),
                    total_ms = format!("{:.3}", synced.total_ms),
                    "synced"
                );
                events.emit(&Event::Synced(synced));
                let mut removed = stats.removed;
                removed.extend(syncer.unlisted_keys(&changes.unlisted));
                if let (Some(term), false) = (sockterm.as_mut(), removed.is_empty()) {
                    match term.terminate(&removed) {
                        Ok(t) => tracing::info!(
                            removed_backends = removed.len(),
                            namespaces = t.namespaces,
                            udp_sockets = t.udp,
                            tcp_sockets = t.tcp,
                            ms = format!("{:.3}", t.duration.as_secs_f64() * 1e3),
                            "destroyed sockets connected to removed backends"
                        ),
                        // The maps are right; only the stale sockets stay (as without it).
                        Err(e) => tracing::error!("stale-socket termination failed: {e:#}"),
                    }
                }
                if stats.ops >= TRIM_AFTER_WRITES {
                    release_free_memory();
                }
                true
            }
            Err(e) => {
                metrics.sync_failures_total.inc();
                tracing::error!("sync failed, will retry: {:#}", anyhow::Error::from(e));
                false
            }
        }
    };
    runner::run(cfg.runner, trigger, shutdown_signal(), sync_once).await;
    for server in servers {
        server.abort();
    }
    tracing::info!("stopping; the datapath stays attached and keeps serving (kproxy cleanup removes it)");
    Ok(())
}

/// Raises the soft limit on open files to the hard limit, as Go programs (kube-proxy among
/// them) do at start: the default soft limit (1,024) is a guard for programs that use
/// `select(2)`, which the agent does not, and too small for a node's health checkers,
/// manifest files and BPF objects together. Needs no privilege.
fn raise_open_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(limits) => limits,
        Err(e) => {
            tracing::warn!("getrlimit(RLIMIT_NOFILE): {e}");
            return;
        }
    };
    if soft >= hard {
        tracing::info!(limit = soft, "open-file limit (RLIMIT_NOFILE) is already at its hard limit");
        return;
    }
    if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
        tracing::warn!(from = soft, to = hard, "setrlimit(RLIMIT_NOFILE): {e}");
        return;
    }
    tracing::info!(from = soft, to = hard, "raised the open-file limit (RLIMIT_NOFILE) to its hard limit");
}

/// The socket programs' counters and the use of the shared socket LRU maps, as metrics.
struct SocketMetrics {
    maps: SocketMaps,
    /// The new-key counters of the LRU maps when their entries were last counted, and when.
    counted: Option<([u64; 2], Instant)>,
}

/// How long an entry count of the socket LRU maps is reused while no new key was written.
const RECOUNT_AFTER: std::time::Duration = std::time::Duration::from_secs(300);

impl SocketMetrics {
    /// Follows the counters, and on full syncs (`full`) counts the entries of the LRU maps (a
    /// batched read of every entry, some 200 ms for a full map of 262,144): only when new keys
    /// were written since the last count or that count is old, since entries come and go only
    /// by inserts (and the evictions they cause).
    fn update(&mut self, metrics: &Metrics, full: bool) {
        let stats = match self.maps.stats() {
            Ok(stats) => stats,
            Err(e) => return tracing::debug!("socket counters: {e:#}"),
        };
        follow(&metrics.sock_storage_entries_total, stats[SOCK_STAT_LOCAL as usize]);
        follow(&metrics.sock_storage_overflow_total, stats[SOCK_STAT_LOCAL_FULL as usize]);
        for (map, index) in [(SOCK_REVNAT_MAP, SOCK_STAT_REVNAT_NEW), (SOCK_AFFINITY_MAP, SOCK_STAT_AFFINITY_NEW)] {
            follow(&metrics.sock_lru_inserts_total.get_or_create(&MapLabel { map: map.into() }), stats[index as usize]);
        }
        let inserts = [stats[SOCK_STAT_REVNAT_NEW as usize], stats[SOCK_STAT_AFFINITY_NEW as usize]];
        let fresh = self.counted.is_some_and(|(at, when)| at == inserts && when.elapsed() < RECOUNT_AFTER);
        if !full || fresh {
            return;
        }
        match self.maps.usage() {
            Ok(usage) => {
                usage.iter().for_each(|u| metrics.set_map(u.name, u.entries, u.capacity));
                self.counted = Some((inserts, Instant::now()));
            }
            Err(e) => tracing::debug!("socket map use: {e:#}"),
        }
    }
}

/// After a sync this large (the first one, typically), the memory freed by planning and by
/// reading the sources is handed back to the system.
const TRIM_AFTER_WRITES: usize = 10_000;

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
