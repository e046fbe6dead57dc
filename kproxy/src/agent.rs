//! `kproxy run`: attach the datapath, then keep the maps equal to the manifests.

use std::{collections::BTreeSet, path::PathBuf, sync::Arc, time::Instant};

use anyhow::{Context as _, Result};
use tokio::sync::Notify;

use crate::{
    dataplane::{bpf::BpfMaps, plan::Limits},
    loader::{self, Capacities, PinLayout},
    runner::{self, RunKind, RunnerConfig},
    sources::manifests::{ManifestSource, ManifestWatcher},
    sync::{SyncScope, Syncer},
    tracker::ModelStore,
};

pub struct AgentConfig {
    pub manifests: PathBuf,
    pub layout: PinLayout,
    pub cgroup: PathBuf,
    pub capacities: Capacities,
    pub runner: RunnerConfig,
}

/// Logs each problem once, when it first appears, and forgets the ones that went away.
#[derive(Default)]
struct ProblemLog {
    reported: BTreeSet<String>,
}

impl ProblemLog {
    fn report(&mut self, problems: impl IntoIterator<Item = String>) {
        let current: BTreeSet<String> = problems.into_iter().collect();
        for p in current.difference(&self.reported) {
            tracing::error!("{p}");
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
    let mut source = ManifestSource::new(cfg.manifests.clone());
    let mut store = ModelStore::default();
    let mut problems = ProblemLog::default();

    let trigger = Arc::new(Notify::new());
    let _watcher = ManifestWatcher::new(&cfg.manifests, trigger.clone())
        .with_context(|| format!("watch {}", cfg.manifests.display()))?;
    tracing::info!(manifests = %cfg.manifests.display(), "watching manifests");

    let sync_once = move |kind: RunKind| -> bool {
        let started = Instant::now();
        let set = match source.read() {
            Ok(set) => set,
            Err(e) => {
                problems.report([e]);
                return false;
            }
        };
        store.replace_all(&set.services, &set.slices);
        let changes = store.take_changes();
        let invalid = store.invalid().map(|e| format!("skipped invalid object: {e}"));
        problems.report(set.problems.into_iter().chain(invalid));
        let scope = match kind {
            RunKind::Full => SyncScope::Full,
            RunKind::Changed => SyncScope::Changed(&changes.frontends),
        };
        match syncer.sync(store.desired(), scope) {
            Ok(stats) => {
                for r in &stats.refused {
                    tracing::error!(service = %r.name, frontend = %r.frontend, "not programmed: {}", r.reason);
                }
                tracing::info!(
                    full = stats.full,
                    frontends = store.desired().len(),
                    changed_frontends = changes.frontends.len(),
                    writes = stats.ops,
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
