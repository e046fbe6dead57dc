//! A fake Kubernetes apiserver speaking the real HTTP list/watch protocol, for end-to-end tests
//! of the agent's kube-rs watchers, plus fault injection.
//!
//! What it serves (plain HTTP/1.1, no authentication):
//! - `GET /api/v1/services`, `/apis/discovery.k8s.io/v1/endpointslices`, `/api/v1/nodes`, `/api/v1/pods` (and
//!   the `/namespaces/NS/` forms): lists with `labelSelector` (`!k`, `k`, `k=v`, `k!=v`,
//!   `k in (..)`, `k notin (..)`), `fieldSelector` (`metadata.name`, `metadata.namespace`),
//!   `limit` and `continue` (pages of a consistent snapshot; an unknown or expired token is 410).
//!   `{"kind":"ServiceList","apiVersion":"v1","metadata":{"resourceVersion":"N"},"items":[..]}`.
//! - The same with `watch=true`: HTTP 200, chunked, one `{"type":..,"object":..}` per line:
//!   every change after `resourceVersion` (from a bounded history per resource; older than the
//!   history: one `ERROR` event with a 410 `Expired` Status, then the end), `BOOKMARK`s every
//!   [`Options::bookmark_interval`] when `allowWatchBookmarks=true`, the end after
//!   `timeoutSeconds`. An object that stops (starts) matching the selectors is `DELETED`
//!   (`ADDED`) for that watch, as the apiserver does.
//! - `GET`/`PUT`/`PATCH` (JSON merge patch)/`DELETE` of one object, `POST` to create.
//! - `POST`/`PATCH`/`PUT` of `events.k8s.io/v1` (and `v1`) Events: stored, see
//!   [`FakeApiServer::posted_events`].
//! - `/version`, `/healthz`, `/livez`, `/readyz`.
//!
//! One resourceVersion counter covers every resource, as etcd's revision does. Updates that
//! change nothing produce no event. Every request is logged ([`FakeApiServer::requests`]).
//!
//! It listens in the test process's own network namespace, or (with [`Options::netns`], see
//! [`FakeApiServer::start_in`]) in another one: the listening socket is made there, so e.g. an
//! agent in a test topology's node namespace reaches it on that namespace's 127.0.0.1.
//!
//! The server runs on its own tokio runtime; its API is synchronous, for synchronous tests:
//!
//! ```
//! use k8s_openapi::api::core::v1::Service;
//! use kproxy_e2e::fake_apiserver::FakeApiServer;
//! let api = FakeApiServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
//! let mut web = Service::default();
//! web.metadata.name = Some("web".into());
//! web.metadata.namespace = Some("default".into());
//! let stored = api.apply(&web).unwrap();
//! assert!(stored.metadata.resource_version.is_some());
//! api.cut_watches();
//! ```

mod selector;
mod server;
mod store;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use k8s_openapi::serde::de::DeserializeOwned;
use k8s_openapi::serde::Serialize;
use k8s_openapi::Resource;
use serde_json::Value;
use tokio::runtime::Runtime;
use tokio::task::JoinHandle;

pub use selector::{FieldSelector, LabelRequirement, LabelSelector, Selectors};
pub use store::{merge_patch, ApiError, Kind, RequestRecord, Stats, Store, DEFAULT_HISTORY_LIMIT};

use server::Shared;

/// How long a restart waits for the old port to become free again.
const REBIND_PATIENCE: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(10);

/// Settings of a [`FakeApiServer`].
#[derive(Debug, Clone)]
pub struct Options {
    /// Events kept per resource for resuming watches.
    pub history_limit: usize,
    /// How often watches that allow bookmarks get one.
    pub bookmark_interval: Duration,
    /// Listen inside this network namespace (`/run/netns/<name>`) instead of the process's own.
    pub netns: Option<PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            history_limit: DEFAULT_HISTORY_LIMIT,
            bookmark_interval: Duration::from_secs(1),
            netns: None,
        }
    }
}

/// A running fake apiserver; see the module documentation. Dropping it closes every connection
/// and stops its runtime.
pub struct FakeApiServer {
    addr: SocketAddr,
    netns: Option<PathBuf>,
    shared: Arc<Shared>,
    acceptor: Mutex<Option<JoinHandle<()>>>,
    bookmarks: JoinHandle<()>,
    runtime: Option<Runtime>,
}

impl std::fmt::Debug for FakeApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeApiServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// The kind of a k8s-openapi type.
fn kind_of<K: Resource>() -> Result<Kind> {
    Kind::ALL
        .into_iter()
        .find(|k| k.api_version() == K::API_VERSION && k.kind() == K::KIND)
        .ok_or_else(|| anyhow!("the fake apiserver does not serve {}", K::KIND))
}

fn to_json<K: Serialize>(object: &K) -> Result<Value> {
    serde_json::to_value(object).context("serializing the object")
}

fn from_json<K: DeserializeOwned>(value: Value) -> Result<K> {
    serde_json::from_value(value).context("deserializing the stored object")
}

impl FakeApiServer {
    /// Listens on `addr` (port 0 picks a free port, see [`FakeApiServer::addr`]).
    pub fn start(addr: SocketAddr) -> Result<FakeApiServer> {
        FakeApiServer::start_with(addr, Options::default())
    }

    /// Listens on `addr` inside the network namespace at `netns` (`/run/netns/<name>`).
    pub fn start_in(netns: &Path, addr: SocketAddr) -> Result<FakeApiServer> {
        let options = Options {
            netns: Some(netns.to_path_buf()),
            ..Options::default()
        };
        FakeApiServer::start_with(addr, options)
    }

    /// Binds `addr`, in the configured namespace.
    fn bind(
        netns: Option<&Path>,
        addr: SocketAddr,
        patience: Duration,
    ) -> Result<std::net::TcpListener> {
        let bind = || server::bind(addr, patience);
        let listener = match netns {
            Some(path) => crate::topology::in_netns(path, bind)?,
            None => bind(),
        };
        let where_ = netns.map_or_else(String::new, |p| format!(" in netns {}", p.display()));
        listener.with_context(|| format!("binding the fake apiserver to {addr}{where_}"))
    }

    pub fn start_with(addr: SocketAddr, options: Options) -> Result<FakeApiServer> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("fake-apiserver")
            .enable_all()
            .build()
            .context("building the fake apiserver's runtime")?;
        let listener = FakeApiServer::bind(options.netns.as_deref(), addr, Duration::ZERO)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::new(Store::new(options.history_limit)));
        let acceptor = {
            let _guard = runtime.enter();
            let listener = tokio::net::TcpListener::from_std(listener)?;
            runtime.spawn(server::accept_loop(listener, shared.clone()))
        };
        let bookmarks = runtime.spawn(server::bookmark_loop(
            shared.clone(),
            options.bookmark_interval,
        ));
        Ok(FakeApiServer {
            addr,
            netns: options.netns,
            shared,
            acceptor: Mutex::new(Some(acceptor)),
            bookmarks,
            runtime: Some(runtime),
        })
    }

    /// Where it listens (also after a restart).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The kubeconfig YAML for this server: one cluster (plain HTTP), one context, one user
    /// without credentials.
    pub fn kubeconfig_yaml(&self) -> String {
        let mut y = String::new();
        let _ = write!(
            y,
            "apiVersion: v1
kind: Config
clusters:
- name: kproxy-fake
  cluster:
    server: {url}
contexts:
- name: kproxy-fake
  context:
    cluster: kproxy-fake
    user: kproxy-fake
    namespace: default
current-context: kproxy-fake
users:
- name: kproxy-fake
  user: {{}}
preferences: {{}}
",
            url = self.url()
        );
        y
    }

    /// Writes [`FakeApiServer::kubeconfig_yaml`] to `path`.
    pub fn kubeconfig(&self, path: &Path) -> Result<()> {
        std::fs::write(path, self.kubeconfig_yaml())
            .with_context(|| format!("writing {}", path.display()))
    }

    fn runtime(&self) -> &Runtime {
        self.runtime.as_ref().expect("the runtime lives until drop")
    }

    // ---- objects ---------------------------------------------------------------------------

    /// Runs `f` with the store locked: nothing the agent does (and no request) interleaves, so
    /// e.g. "cut the watches, change objects, compact the history" happens as one step.
    pub fn atomically<R>(&self, f: impl FnOnce(&mut Store) -> R) -> R {
        f(&mut self.shared.store())
    }

    /// Creates `object`; fails if it exists. Returns it as stored (resourceVersion, uid, ...).
    pub fn create<K: Resource + Serialize + DeserializeOwned>(&self, object: &K) -> Result<K> {
        let stored = self.shared.store().create(to_json(object)?)?;
        from_json(stored)
    }

    /// Replaces the existing `object` (whatever its resourceVersion says).
    pub fn update<K: Resource + Serialize + DeserializeOwned>(&self, object: &K) -> Result<K> {
        let stored = self.shared.store().update(to_json(object)?)?;
        from_json(stored)
    }

    /// Creates or replaces `object`.
    pub fn apply<K: Resource + Serialize + DeserializeOwned>(&self, object: &K) -> Result<K> {
        let stored = self.shared.store().apply(to_json(object)?)?;
        from_json(stored)
    }

    /// Creates or replaces a raw JSON object (`apiVersion`/`kind` say which resource), e.g. one
    /// that no typed struct can hold.
    pub fn apply_json(&self, object: Value) -> Result<Value> {
        Ok(self.shared.store().apply(object)?)
    }

    /// Deletes the object `namespace`/`name` of type `K` ("" namespace for Nodes).
    pub fn delete<K: Resource>(&self, namespace: &str, name: &str) -> Result<()> {
        let kind = kind_of::<K>()?;
        self.shared.store().delete(kind, namespace, name)?;
        Ok(())
    }

    /// Sets `metadata.deletionTimestamp`, as for an object held by a finalizer.
    pub fn mark_deleting<K: Resource>(&self, namespace: &str, name: &str) -> Result<()> {
        let kind = kind_of::<K>()?;
        self.shared.store().mark_deleting(kind, namespace, name)?;
        Ok(())
    }

    /// The stored object, if any.
    pub fn get<K: Resource + DeserializeOwned>(&self, namespace: &str, name: &str) -> Option<K> {
        let kind = kind_of::<K>().ok()?;
        let value = self.shared.store().get(kind, namespace, name)?;
        from_json(value).ok()
    }

    /// The current resourceVersion (one counter for all resources).
    pub fn resource_version(&self) -> u64 {
        self.shared.store().resource_version()
    }

    // ---- faults ----------------------------------------------------------------------------

    /// Drops every open watch connection mid-stream. Returns how many there were.
    pub fn cut_watches(&self) -> usize {
        self.shared.store().cut_watches()
    }

    /// Forgets the event history (an etcd compaction): the next watch that resumes from an
    /// older resourceVersion gets 410 Expired and the client must list again.
    pub fn expire_history(&self) {
        self.shared.store().expire_history()
    }

    /// Stops (`true`) or resumes sending BOOKMARK events.
    pub fn pause_bookmarks(&self, paused: bool) {
        self.shared.store().pause_bookmarks(paused)
    }

    /// Whether the server accepts connections.
    pub fn is_listening(&self) -> bool {
        self.acceptor
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Goes down: closes the listening socket and every connection (watches are cut). Objects
    /// stay and can still be changed through this handle. No-op when already down.
    pub fn stop_listening(&self) {
        let acceptor = self
            .acceptor
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let Some(acceptor) = acceptor else {
            return;
        };
        acceptor.abort();
        // Wait (bounded) until the task, and so the listener, is dropped. Polling rather than
        // `block_on`, so that this also works when called from async code.
        let deadline = Instant::now() + REBIND_PATIENCE;
        while !acceptor.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        self.shared.store().cut_watches();
        self.shared.abort_connections();
        self.shared.store().count_restart();
    }

    /// Listens again on the same address. No-op when listening.
    pub fn resume_listening(&self) -> Result<()> {
        let mut acceptor = self.acceptor.lock().unwrap_or_else(|e| e.into_inner());
        if acceptor.is_some() {
            return Ok(());
        }
        let listener = FakeApiServer::bind(self.netns.as_deref(), self.addr, REBIND_PATIENCE)
            .context("listening again")?;
        let runtime = self.runtime();
        let _guard = runtime.enter();
        let listener = tokio::net::TcpListener::from_std(listener)?;
        *acceptor = Some(runtime.spawn(server::accept_loop(listener, self.shared.clone())));
        Ok(())
    }

    /// [`FakeApiServer::stop_listening`], `down_for`, then [`FakeApiServer::resume_listening`].
    pub fn restart(&self, down_for: Duration) -> Result<()> {
        self.stop_listening();
        std::thread::sleep(down_for);
        self.resume_listening()
    }

    // ---- observation -----------------------------------------------------------------------

    /// Every request so far.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.store().requests().to_vec()
    }

    /// Requests from position `seq` on (see [`RequestRecord::seq`]).
    pub fn requests_since(&self, seq: usize) -> Vec<RequestRecord> {
        let store = self.shared.store();
        store.requests().get(seq..).unwrap_or_default().to_vec()
    }

    /// How many requests were logged so far (the `seq` the next one gets).
    pub fn request_count(&self) -> usize {
        self.shared.store().requests().len()
    }

    /// Waits (at most `timeout`) for a request from position `since` on that satisfies `pred`.
    pub fn wait_for_request(
        &self,
        since: usize,
        timeout: Duration,
        pred: impl Fn(&RequestRecord) -> bool,
    ) -> Result<RequestRecord> {
        let start = Instant::now();
        loop {
            if let Some(r) = self.requests_since(since).into_iter().find(|r| pred(r)) {
                return Ok(r);
            }
            if start.elapsed() > timeout {
                bail!(
                    "no matching request within {timeout:?}; requests since #{since}: {:#?}",
                    self.requests_since(since)
                        .iter()
                        .map(|r| format!("{} {}?{} -> {}", r.method, r.path, r.query, r.status))
                        .collect::<Vec<_>>()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Open watches of `kind`.
    pub fn open_watches(&self, kind: Kind) -> usize {
        self.shared.store().open_watches(kind)
    }

    /// Waits until every kind in `kinds` has at least one open watch.
    pub fn wait_for_watches(&self, kinds: &[Kind], timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            let missing: Vec<Kind> = kinds
                .iter()
                .copied()
                .filter(|&k| self.open_watches(k) == 0)
                .collect();
            if missing.is_empty() {
                return Ok(());
            }
            if start.elapsed() > timeout {
                bail!("no open watch of {missing:?} within {timeout:?}");
            }
            std::thread::sleep(POLL);
        }
    }

    pub fn stats(&self) -> Stats {
        self.shared.store().stats()
    }

    /// Events (events.k8s.io/v1 or v1) the clients posted.
    pub fn posted_events(&self) -> Vec<Value> {
        self.shared.store().posted_events().to_vec()
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        if let Some(acceptor) = self
            .acceptor
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            acceptor.abort();
        }
        self.bookmarks.abort();
        self.shared.store().cut_watches();
        self.shared.abort_connections();
        if let Some(runtime) = self.runtime.take() {
            // Blocking is not allowed when dropped from async code (a test's own runtime).
            if tokio::runtime::Handle::try_current().is_ok() {
                runtime.shutdown_background();
            } else {
                runtime.shutdown_timeout(Duration::from_secs(2));
            }
        }
    }
}
