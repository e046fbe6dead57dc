//! `kproxy run`: attach the datapath, then keep the maps equal to the manifests.

use std::{
    collections::{BTreeSet, HashMap},
    path::PathBuf,
    sync::Arc,
    time::Instant,
};

use anyhow::{Context as _, Result};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use tokio::sync::Notify;

use crate::{
    dataplane::{bpf::BpfMaps, plan::Limits},
    loader::{self, Capacities, PinLayout},
    model::Snapshot,
    runner::{self, RunKind, RunnerConfig},
    sources::manifests::{self, ManifestWatcher},
    sync::Syncer,
};

pub struct AgentConfig {
    pub manifests: PathBuf,
    pub layout: PinLayout,
    pub cgroup: PathBuf,
    pub capacities: Capacities,
    pub runner: RunnerConfig,
}

/// The manifest source with memory: a file that fails to parse keeps serving the objects of
/// its last good version, so a half-saved edit never takes services down.
struct ManifestSource {
    path: PathBuf,
    last_good: HashMap<PathBuf, (Vec<Service>, Vec<EndpointSlice>)>,
    reported: BTreeSet<String>,
}

impl ManifestSource {
    /// Reads the manifests; `None` when the path itself cannot be read (nothing is changed
    /// then: an unreadable path must not look like "no services").
    fn read(&mut self) -> Option<Snapshot> {
        if !self.path.exists() {
            self.report(vec![format!("{}: no such file or directory; keeping the programmed services", self.path.display())]);
            return None;
        }
        let mut services = Vec::new();
        let mut slices = Vec::new();
        let mut messages = Vec::new();
        let mut seen = HashMap::new();
        for (file, m) in manifests::read_files(&self.path) {
            messages.extend(m.errors.iter().map(|e| e.to_string()));
            let objects = if m.errors.is_empty() {
                (m.services, m.slices)
            } else if let Some(good) = self.last_good.get(&file) {
                messages.push(format!("{}: has errors; serving its last good version", file.display()));
                good.clone()
            } else {
                (m.services, m.slices)
            };
            services.extend(objects.0.iter().cloned());
            slices.extend(objects.1.iter().cloned());
            seen.insert(file, objects);
        }
        self.last_good = seen;
        let snapshot = Snapshot::build(&services, &slices);
        messages.extend(snapshot.invalid.iter().map(|e| format!("skipped invalid object: {e}")));
        self.report(messages);
        Some(snapshot)
    }

    /// Logs each problem once, when it first appears.
    fn report(&mut self, messages: Vec<String>) {
        let current: BTreeSet<String> = messages.into_iter().collect();
        for m in current.difference(&self.reported) {
            tracing::error!("{m}");
        }
        self.reported = current;
    }
}

pub async fn run(cfg: AgentConfig) -> Result<()> {
    loader::load_and_attach(&cfg.layout, &cfg.cgroup, cfg.capacities)?;
    let maps = BpfMaps::open(&cfg.layout.maps_dir()).context("open the pinned maps")?;
    let limits = Limits {
        max_services: cfg.capacities.max_services,
        max_backends: cfg.capacities.max_backends,
        max_service_entries: cfg.capacities.service_entries(),
    };
    let mut syncer = Syncer::new(maps, limits);
    let mut source = ManifestSource { path: cfg.manifests.clone(), last_good: HashMap::new(), reported: BTreeSet::new() };

    let trigger = Arc::new(Notify::new());
    let _watcher = ManifestWatcher::new(&cfg.manifests, trigger.clone())
        .with_context(|| format!("watch {}", cfg.manifests.display()))?;
    tracing::info!(manifests = %cfg.manifests.display(), "watching manifests");

    let sync_once = move |kind: RunKind| -> bool {
        let started = Instant::now();
        let Some(snapshot) = source.read() else { return false };
        match syncer.sync(&snapshot.desired, kind == RunKind::Full) {
            Ok(stats) => {
                for r in &stats.refused {
                    tracing::error!(service = %r.name, frontend = %r.frontend, "not programmed: {}", r.reason);
                }
                tracing::info!(
                    ?kind,
                    frontends = stats.frontends,
                    writes = stats.ops,
                    invalid = snapshot.invalid.len(),
                    sync_ms = format!("{:.3}", stats.duration.as_secs_f64() * 1e3),
                    total_ms = format!("{:.3}", started.elapsed().as_secs_f64() * 1e3),
                    "synced"
                );
                true
            }
            Err(e) => {
                tracing::error!("sync failed, will retry: {e:#}");
                false
            }
        }
    };
    runner::run(cfg.runner, trigger, shutdown_signal(), sync_once).await;
    tracing::info!("stopping; the datapath stays attached and keeps serving (kproxy cleanup removes it)");
    Ok(())
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
