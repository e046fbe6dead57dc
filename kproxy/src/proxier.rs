//! The proxier, after kube-proxy's `Proxier`: it owns the store of objects
//! ([`ModelStore`]), the [`Syncer`] and everything a sync reports to, and runs on its own OS
//! thread (`kproxy-proxier`) under the bounded-frequency runner ([`crate::runner`]), so a long
//! sync never holds up the event loop that serves `/healthz`, `/livez`, `/metrics` and the
//! watches.
//!
//! - Between syncs, each wake-up drains the update channel ([`crate::sources::update`]) into
//!   the store (and reads the manifest files that settled, with the manifest source): O(1) per
//!   update. The pending-change gauges, `last_queued_timestamp` and the health's queued
//!   update follow what the store says is a change, as the updates arrive.
//! - A sync ([`Proxier::sync`]) is four steps: [`Proxier::intake`] (the same drain, and with
//!   `full` a re-check of every manifest file), [`Proxier::take_changes`] (the store
//!   recomputes the changed Services' frontends; problems are logged and counted),
//!   [`Syncer::sync`] (the plan and the map writes), and [`Proxier::report`] (health,
//!   metrics, the `healthCheckNodePort` servers, events, stale-socket termination).
//! - Nothing else touches the store: the sources only send updates, so no lock is taken.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    thread::JoinHandle,
    time::{Instant, SystemTime},
};

use anyhow::{Context as _, Result};
use kproxy_api::event::{Event, Synced};
use kproxy_common::{
    lb::{BACKENDS_MAP, MEMBERS_MAP, SERVICES_MAP, SERVICE_META_MAP},
    sock::{SOCK_AFFINITY_MAP, SOCK_REVNAT_MAP, SOCK_STAT_AFFINITY_NEW, SOCK_STAT_LOCAL, SOCK_STAT_LOCAL_FULL, SOCK_STAT_REVNAT_NEW},
};
use tokio::sync::{oneshot, Notify};

use crate::{
    dataplane::{
        bpf::{BpfMaps, SocketMaps},
        plan::{RefuseReason, Refused},
        Dataplane,
    },
    events::Events,
    health::{ProxyHealth, ServiceHealthServers},
    metrics::{follow, unix_seconds, InvalidLabels, MapLabel, Metrics, RefusedLabel},
    model::{DesiredService, DesiredState, Frontend, InvalidObject},
    runner::{self, RunKind, RunnerConfig, Step},
    sockterm::SockTerm,
    sources::{manifests::ManifestSource, update::UpdateReceiver},
    sync::{SyncScope, SyncStats, Syncer},
    sys::release_free_memory,
    tracker::{Changes, ModelStore},
};

/// The store, the syncer and what the syncs report to. Built with [`Proxier::new`] and the
/// `with_*` methods, then run with [`Proxier::spawn`] (the agent) or [`Proxier::sync`] (once).
/// `D` is the dataplane: the pinned maps, or in tests maps in memory.
pub struct Proxier<D = BpfMaps> {
    store: ModelStore,
    syncer: Syncer<D>,
    /// The apiserver watches' updates.
    updates: Option<UpdateReceiver>,
    /// The manifest source, read on this thread: it pushes into the store directly.
    manifests: Option<ManifestSource>,
    health: Arc<ProxyHealth>,
    metrics: Arc<Metrics>,
    problems: ProblemLog,
    refusals: RefusedLog,
    /// The `healthCheckNodePort` servers, and the runtime they are served on (the agent's
    /// event loop, never this thread's); none without one.
    service_health: Option<(tokio::runtime::Handle, ServiceHealthServers)>,
    sockterm: Option<SockTerm>,
    socket_metrics: Option<SocketMetrics>,
    events: Events,
    /// The last sync freed room it could not use itself: sync again (see `Syncer::sync`).
    again: bool,
}

impl<D: Dataplane> Proxier<D> {
    pub fn new(store: ModelStore, syncer: Syncer<D>, health: Arc<ProxyHealth>, metrics: Arc<Metrics>) -> Self {
        Self {
            store,
            syncer,
            updates: None,
            manifests: None,
            health,
            metrics,
            problems: ProblemLog::default(),
            refusals: RefusedLog::default(),
            service_health: None,
            sockterm: None,
            socket_metrics: None,
            events: Events::none(),
            again: false,
        }
    }

    /// Takes in the updates sent on this channel.
    pub fn with_updates(mut self, updates: UpdateReceiver) -> Self {
        self.updates = Some(updates);
        self
    }

    /// Reads this manifest source.
    pub fn with_manifests(mut self, source: ManifestSource) -> Self {
        self.manifests = Some(source);
        self
    }

    /// Serves the `healthCheckNodePort`s of the Services that have one on `runtime`.
    pub fn with_health_check_servers(mut self, runtime: tokio::runtime::Handle) -> Self {
        self.service_health = Some((runtime, ServiceHealthServers::default()));
        self
    }

    /// Destroys sockets connected to removed backends (see `crate::sockterm`).
    pub fn with_sockterm(mut self, sockterm: Option<SockTerm>) -> Self {
        self.sockterm = sockterm;
        self
    }

    /// Follows the socket programs' counters in the metrics.
    pub fn with_socket_metrics(mut self, maps: Option<SocketMaps>) -> Self {
        self.socket_metrics = maps.map(|maps| SocketMetrics { maps, counted: None });
        if let Some(m) = &mut self.socket_metrics {
            m.update(&self.metrics, true);
        }
        self
    }

    /// Writes an event per sync here.
    pub fn with_events(mut self, events: Events) -> Self {
        self.events = events;
        self
    }

    /// The desired state as last synced.
    pub fn desired(&self) -> &DesiredState {
        self.store.desired()
    }

    /// The problems of the manifest files (each naming file and document).
    pub fn source_problems(&self) -> impl Iterator<Item = &String> {
        self.manifests.iter().flat_map(ManifestSource::problems)
    }

    /// The frontends the last sync refused.
    pub fn refused(&self) -> &[Refused] {
        &self.refusals.last
    }

    /// Runs the proxier on its own thread, `kproxy-proxier`, under the bounded-frequency
    /// runner: a full sync at once, then a sync for each change `wake` announces (paced by
    /// `cfg`) and a full one every sync period, until [`ProxierThread::stop`].
    pub fn spawn(mut self, cfg: RunnerConfig, wake: Arc<Notify>) -> Result<ProxierThread>
    where
        D: Send + 'static,
    {
        let (stop, stopped) = oneshot::channel::<()>();
        let (ended, finished) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("kproxy-proxier".into())
            .spawn(move || {
                // Sent when this thread ends, by a return or a panic.
                let _ended = ended;
                let runtime = match tokio::runtime::Builder::new_current_thread().enable_time().build() {
                    Ok(r) => r,
                    Err(e) => return tracing::error!("the proxier's runtime: {e}"),
                };
                let stopped = async move {
                    let _ = stopped.await;
                };
                let again = wake.clone();
                runtime.block_on(runner::run_steps(cfg, wake, stopped, |step| match step {
                    // A failed read asks for a run too: it fails again, and the runner retries it
                    // (as a full run, after --retry-interval) until the manifest path is back.
                    Step::Intake => !self.intake(false) || self.wants_sync(),
                    Step::Run(kind) => {
                        let ok = self.sync(kind);
                        if self.again {
                            again.notify_one();
                        }
                        ok
                    }
                }));
            })
            .context("start the proxier thread")?;
        Ok(ProxierThread { stop, finished, thread })
    }

    /// One sync: take in the updates, take the changes, write the maps, report. Returns
    /// whether it succeeded (a failed sync is retried as a full one).
    pub fn sync(&mut self, kind: RunKind) -> bool {
        let started = Instant::now();
        if !self.intake(kind == RunKind::Full) {
            return false;
        }
        let changes = self.take_changes();
        let scope = match kind {
            RunKind::Full => SyncScope::Full,
            RunKind::Changed => SyncScope::Changed(&changes.frontends),
        };
        match self.syncer.sync(self.store.desired(), scope) {
            Ok(stats) => {
                self.report(&changes, stats, started);
                true
            }
            Err(e) => {
                self.metrics.sync_failures_total.inc();
                tracing::error!("sync failed, will retry: {:#}", anyhow::Error::from(e));
                false
            }
        }
    }

    /// Whether a sync has work: changes are pending in the store, or the last sync asked for
    /// another.
    fn wants_sync(&self) -> bool {
        self.store.pending() != (0, 0) || self.again
    }

    /// Applies the updates that arrived to the store and, with manifests, reads the files that
    /// changed (with `full`, also those whose stamp changed unseen). Then marks the update
    /// queued if the store says something changed. False if the manifest path is gone (the
    /// problem is logged; nothing changes).
    pub fn intake(&mut self, full: bool) -> bool {
        let mut received = 0;
        if let Some(updates) = &self.updates {
            for update in updates.drain() {
                received += 1;
                if let Err(e) = update.apply(&mut self.store) {
                    tracing::debug!("invalid update: {e}");
                }
            }
        }
        if let Some(source) = self.manifests.as_mut() {
            // Only the files changed since the last read are read (all of them the first time).
            match source.update(&mut self.store, full) {
                Ok(stats) => {
                    tracing::debug!(?stats, "manifests read");
                    received += stats.applied + stats.deleted;
                }
                Err(e) => {
                    self.problems.report([e]);
                    return false;
                }
            }
        }
        let (services, endpoints) = self.store.pending();
        self.metrics.service_changes_pending.set(services as i64);
        self.metrics.endpoint_changes_pending.set(endpoints as i64);
        if received > 0 && services + endpoints > 0 {
            let now = SystemTime::now();
            self.health.queued_update(now);
            self.metrics.last_queued_timestamp.set(unix_seconds(now));
        }
        true
    }

    /// Has the store recompute the frontends of the changed Services, counts the changes, and
    /// logs and counts the problems of the sources and the invalid objects.
    pub fn take_changes(&mut self) -> Changes {
        let changes = self.store.take_changes();
        let metrics = &self.metrics;
        metrics.service_changes_pending.set(0);
        metrics.endpoint_changes_pending.set(0);
        metrics.service_changes_total.inc_by(changes.services as u64);
        metrics.endpoint_changes_total.inc_by(changes.endpoints as u64);
        let (source_problems, duplicates) = match &self.manifests {
            Some(source) => (source.problems().cloned().collect(), source.duplicates()),
            None => (Vec::new(), Vec::new()),
        };
        let invalid: BTreeSet<InvalidObject> = self.store.invalid().cloned().chain(duplicates).collect();
        self.problems.report(source_problems.into_iter().chain(invalid.iter().map(|e| format!("skipped invalid object: {e}"))));
        self.problems.count_invalid(invalid, metrics);
        changes
    }

    /// After a successful sync: health, the `healthCheckNodePort` servers, refusals, metrics,
    /// the sync's event, and the sockets to destroy.
    fn report(&mut self, changes: &Changes, stats: SyncStats, started: Instant) {
        let (metrics, desired) = (&self.metrics, self.store.desired());
        let now = SystemTime::now();
        self.health.updated(now);
        if let Some((runtime, servers)) = &mut self.service_health {
            // Spawned on the agent's event loop, so they answer while this thread syncs.
            let _on = runtime.enter();
            servers.sync(&self.store.health_checks(), &self.health);
        }
        self.refusals.report(&stats.refused, desired, metrics);
        self.again = stats.sync_again;
        let seconds = stats.duration.as_secs_f64();
        metrics.sync_duration.observe(seconds);
        if stats.full { &metrics.sync_full_duration } else { &metrics.sync_partial_duration }.observe(seconds);
        metrics.last_sync_timestamp.set(unix_seconds(now));
        metrics.map_writes_total.inc_by(stats.ops as u64);
        metrics.set_no_local_endpoints(self.store.no_local_endpoints());
        for t in &changes.trigger_times {
            metrics.network_programming_duration.observe(now.duration_since(*t).unwrap_or_default().as_secs_f64());
        }
        if let (Some((services, backends, meta)), Some(members)) = (self.syncer.entries(), self.syncer.member_entries()) {
            for (name, entries) in [(SERVICES_MAP, services), (BACKENDS_MAP, backends), (SERVICE_META_MAP, meta), (MEMBERS_MAP, members)] {
                metrics.map_entries.get_or_create(&MapLabel { map: name.into() }).set(entries as i64);
            }
        }
        if let Some(m) = &mut self.socket_metrics {
            m.update(metrics, stats.full);
        }
        let synced = Synced {
            full: stats.full,
            frontends: desired.len(),
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
        self.events.emit(&Event::Synced(synced));
        let mut removed = stats.removed;
        removed.extend(self.syncer.unlisted_keys(&changes.unlisted));
        if let (Some(term), false) = (self.sockterm.as_mut(), removed.is_empty()) {
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
    }

    /// Programs `frontend` as `want` besides the desired state, in a sync of that frontend
    /// alone (`kproxy tc-cost`'s self-mapped service, which no Service describes).
    pub fn program_extra(&mut self, frontend: Frontend, want: DesiredService) -> Result<SyncStats> {
        let mut desired = self.store.desired().clone();
        desired.insert(frontend, want);
        let scope = [frontend].into();
        Ok(self.syncer.sync(&desired, SyncScope::Changed(&scope))?)
    }
}

/// The running proxier thread.
pub struct ProxierThread {
    stop: oneshot::Sender<()>,
    finished: oneshot::Receiver<()>,
    thread: JoinHandle<()>,
}

impl ProxierThread {
    /// Completes if the thread ends by itself (it should not: a panic, or no runtime).
    pub async fn ended(&mut self) {
        let _ = (&mut self.finished).await;
    }

    /// Stops the runner once the sync under way (if any) is done, and waits for the thread,
    /// without blocking the event loop meanwhile.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let thread = self.thread;
        match tokio::task::spawn_blocking(move || thread.join()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => tracing::error!("the proxier thread panicked"),
            Err(e) => tracing::error!("waiting for the proxier thread: {e}"),
        }
    }
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
    /// The refusals of the last sync.
    last: Vec<Refused>,
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
        self.last = refused.to_vec();
    }
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use hyper::StatusCode;

    use super::*;
    use crate::{
        dataplane::{plan::Limits, MapContents},
        sources::update::{self, Update, UpdateSender},
    };

    const LIMITS: Limits = Limits { max_services: 100, max_backends: 100, max_service_entries: 1000 };
    const TIMEOUT: Duration = Duration::from_secs(60);

    fn objects(backend: &str) -> (Service, EndpointSlice) {
        let (services, slices) = crate::sources::manifests::parse_objects(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec: {{clusterIP: 10.96.0.1, ports: [{{port: 80}}]}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-1, labels: {{kubernetes.io/service-name: web}}}}\n\
             addressType: IPv4\nports: [{{port: 8080}}]\nendpoints: [{{addresses: [{backend}]}}]\n"
        ));
        (services[0].clone(), slices[0].clone())
    }

    use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

    /// A proxier on maps in memory, fed by a channel.
    fn proxier() -> (Proxier<MapContents>, UpdateSender, Arc<Notify>, Arc<ProxyHealth>, Arc<Metrics>) {
        let wake = Arc::new(Notify::new());
        let (tx, rx) = update::channel(wake.clone());
        let (health, metrics) = (Arc::new(ProxyHealth::new(TIMEOUT)), Arc::new(Metrics::new()));
        let syncer = Syncer::new(MapContents::default(), LIMITS);
        let p = Proxier::new(ModelStore::default(), syncer, health.clone(), metrics.clone()).with_updates(rx);
        (p, tx, wake, health, metrics)
    }

    /// Whether an update is queued and not synced (unhealthy once the timeout has passed).
    fn queued(health: &ProxyHealth) -> bool {
        health.respond(SystemTime::now() + TIMEOUT, false).0 == StatusCode::SERVICE_UNAVAILABLE
    }

    #[test]
    fn updates_are_taken_in_between_syncs_and_only_real_changes_queue_one() {
        let (mut p, tx, _, health, metrics) = proxier();
        let (svc, slice) = objects("10.244.0.1");
        tx.send(Update::ApplyService(Box::new(svc.clone())));
        tx.send(Update::ApplySlice(Box::new(slice.clone())));
        assert!(p.intake(false));
        assert_eq!((metrics.service_changes_pending.get(), metrics.endpoint_changes_pending.get()), (1, 1));
        assert!(queued(&health), "a change queues an update");
        assert!(metrics.last_queued_timestamp.get() > 0.0);
        assert!(p.wants_sync());
        assert!(p.sync(RunKind::Changed));
        assert_eq!((metrics.service_changes_pending.get(), metrics.endpoint_changes_pending.get()), (0, 0));
        assert!(!queued(&health), "the sync applied it");
        assert_eq!(p.desired().len(), 1);
        assert!(metrics.map_writes_total.get() > 0, "the frontend was written");

        // The same objects again (a resync): nothing changes, nothing is queued, no sync wanted.
        tx.send(Update::ApplyService(Box::new(svc)));
        tx.send(Update::ApplySlice(Box::new(slice)));
        assert!(p.intake(false));
        assert!(!queued(&health) && !p.wants_sync());

        // An endpoint change, then its Service deleted: each as the store counts it.
        let (_, moved) = objects("10.244.0.2");
        tx.send(Update::ApplySlice(Box::new(moved)));
        assert!(p.intake(false));
        assert_eq!((metrics.service_changes_pending.get(), metrics.endpoint_changes_pending.get()), (0, 1));
        tx.send(Update::DeleteService { namespace: "default".into(), name: "web".into() });
        assert!(p.intake(false));
        assert_eq!((metrics.service_changes_pending.get(), metrics.endpoint_changes_pending.get()), (1, 1));
        assert!(p.sync(RunKind::Full));
        assert!(p.desired().is_empty());
        // An invalid object is listed and counted by the store, as from any source.
        let (mut bad, _) = objects("10.244.0.3");
        bad.spec.as_mut().unwrap().cluster_ip = Some("10.96.0.999".into());
        tx.send(Update::ApplyService(Box::new(bad)));
        assert!(p.sync(RunKind::Changed));
        assert_eq!(p.problems.invalid.len(), 1);
    }

    #[test]
    fn the_proxier_thread_syncs_what_arrives_and_stops() {
        let (p, tx, wake, health, metrics) = proxier();
        let cfg = RunnerConfig {
            min_interval: Duration::from_millis(10),
            sync_period: Duration::from_secs(600),
            retry_interval: Duration::from_secs(1),
        };
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let thread = p.spawn(cfg, wake).unwrap();
        let (svc, slice) = objects("10.244.0.1");
        tx.send(Update::ApplyService(Box::new(svc)));
        tx.send(Update::ApplySlice(Box::new(slice)));
        let deadline = Instant::now() + Duration::from_secs(10);
        // The two updates may arrive in one sync or in two (the slice queued after the first
        // sync wrote the Service): wait until everything queued is synced.
        while (metrics.map_writes_total.get() == 0 || queued(&health)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(metrics.map_writes_total.get() > 0, "the proxier thread programmed the Service");
        assert!(!queued(&health), "every queued update was synced within 10 s");
        runtime.block_on(thread.stop());
        // Sends after the stop are dropped, not an error.
        tx.send(Update::NodeZone(None));
    }
}
