//! `kproxy run`: attach the datapath, start the HTTP servers and the sources, and hand the
//! syncs to the proxier's thread ([`crate::proxier`]). This event loop serves `/healthz`,
//! `/livez`, `/metrics`, the `healthCheckNodePort`s and the watches, and never waits for a
//! sync.

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::{Context as _, Result};
use kproxy_api::event::{Event, SocketTermination, SocketTerminationStatus};
use tokio::sync::Notify;

use crate::{
    dataplane::{
        bpf::{BpfMaps, DropCounters, SocketMaps},
        plan::Limits,
    },
    events::Events,
    health::{self, ProxyHealth},
    http,
    loader::{self, Capacities, PinLayout},
    metrics::Metrics,
    proxier::Proxier,
    runner::RunnerConfig,
    sockterm::SockTerm,
    sources::{
        apiserver::{self, Shared},
        manifests::ManifestSource,
        update,
    },
    sync::Syncer,
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
    let (sockterm, status, error) = if cfg.terminate_sockets {
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
    let socket_maps = SocketMaps::open(&cfg.layout.maps_dir())
        .inspect_err(|e| tracing::warn!("socket map metrics unavailable: {e:#}"))
        .ok();
    match DropCounters::open(&cfg.layout.maps_dir()) {
        Ok(counters) => metrics.set_drop_counters(counters),
        Err(e) => tracing::warn!("datapath drop metrics unavailable: {e:#}"),
    }
    let limits = Limits {
        max_services: cfg.capacities.max_services,
        max_backends: cfg.capacities.max_backends,
        max_service_entries: cfg.capacities.service_entries(),
    };
    let syncer = Syncer::new(maps, limits);
    let mut store = ModelStore::default();
    store.set_node_addresses(cfg.node_port_addresses.clone());
    store.set_node_name(Some(cfg.node_name.clone()));
    let proxier = Proxier::new(store, syncer, health.clone(), metrics.clone())
        .with_health_check_servers(tokio::runtime::Handle::current())
        .with_sockterm(sockterm)
        .with_socket_metrics(socket_maps)
        .with_events(events);
    // Wakes the proxier: an update sent, a manifest file settled.
    let wake = Arc::new(Notify::new());
    let mut _watcher = None;
    let mut _watches = Vec::new();
    let proxier = match &cfg.source {
        Source::Manifests(path) => {
            let source = ManifestSource::with_settle(path.clone(), cfg.manifests_settle);
            _watcher = Some(source.watch(wake.clone()).with_context(|| format!("watch {}", path.display()))?);
            tracing::info!(manifests = %path.display(), settle = ?cfg.manifests_settle, "watching manifests");
            proxier.with_manifests(source)
        }
        Source::Apiserver { kubeconfig } => {
            let client = apiserver::client(kubeconfig.as_deref(), metrics.clone()).await?;
            let (updates, received) = update::channel(wake.clone());
            tracing::info!(node = %cfg.node_name, "listing Services and EndpointSlices");
            // Returns once everything is listed, so the first sync removes nothing by mistake.
            _watches = apiserver::start(client, &cfg.node_name, Shared { updates, health: health.clone() }).await?;
            proxier.with_updates(received)
        }
    };
    let mut proxier = proxier.spawn(cfg.runner, wake)?;
    let ended = tokio::select! {
        _ = shutdown_signal() => false,
        _ = proxier.ended() => true,
    };
    if ended {
        anyhow::bail!("the proxier thread stopped; the datapath stays attached and keeps serving");
    }
    // After the sync under way, if any: the servers answer until then.
    proxier.stop().await;
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
