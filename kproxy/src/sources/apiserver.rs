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

use std::{path::Path, sync::Arc};

use anyhow::{Context as _, Result};
use futures::StreamExt as _;
use k8s_openapi::{
    api::{core::v1::Node, core::v1::Service, discovery::v1::EndpointSlice},
    serde::de::DeserializeOwned,
};
use kube::{
    runtime::{watcher, WatchStreamExt as _},
    Api, Client, Resource, ResourceExt as _,
};
use tokio::sync::watch;

use super::update::{Update, UpdateSender};
use crate::{health::ProxyHealth, metrics::Metrics};

/// kube-proxy's label selector for Services and EndpointSlices: skip objects that belong to
/// another proxy, and headless ones.
pub const LABEL_SELECTOR: &str = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

/// A client from `--kubeconfig`, or the in-cluster configuration, whose requests are counted
/// and timed in client-go's `rest_client_*` metrics.
pub async fn client(kubeconfig: Option<&Path>, metrics: Arc<Metrics>) -> Result<Client> {
    let config = config(kubeconfig).await?;
    let layer = super::rest_metrics::RestMetricsLayer::new(metrics, &config.cluster_url);
    let builder = kube::client::ClientBuilder::try_from(config).context("create the Kubernetes client")?;
    Ok(builder.with_layer(&layer).build())
}

/// The client configuration from `--kubeconfig`, or the in-cluster one.
pub async fn config(kubeconfig: Option<&Path>) -> Result<kube::Config> {
    Ok(match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("read kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("use kubeconfig {}", path.display()))?
        }
        None => kube::Config::incluster().context("in-cluster configuration (or pass --kubeconfig)")?,
    })
}

/// An object kind the proxier tracks, and the updates its events become.
trait Tracked: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static {
    const KIND: &'static str;
    fn apply(obj: Self) -> Update;
    fn delete(namespace: String, name: String) -> Update;
    fn replace(objs: Vec<Self>) -> Update;
}

impl Tracked for Service {
    const KIND: &'static str = "Service";
    fn apply(obj: Self) -> Update {
        Update::ApplyService(Box::new(obj))
    }
    fn delete(namespace: String, name: String) -> Update {
        Update::DeleteService { namespace, name }
    }
    fn replace(objs: Vec<Self>) -> Update {
        Update::ReplaceServices(objs)
    }
}

impl Tracked for EndpointSlice {
    const KIND: &'static str = "EndpointSlice";
    fn apply(obj: Self) -> Update {
        Update::ApplySlice(Box::new(obj))
    }
    fn delete(namespace: String, name: String) -> Update {
        Update::DeleteSlice { namespace, name }
    }
    fn replace(objs: Vec<Self>) -> Update {
        Update::ReplaceSlices(objs)
    }
}

/// What the watches need: where their updates go, and this node's eligibility (kube-proxy's
/// `NodeEligibleHandler`, which follows the Node object directly rather than through a sync).
#[derive(Clone)]
pub struct Shared {
    pub updates: UpdateSender,
    pub health: Arc<ProxyHealth>,
}

/// Watches one kind, sending each event to the proxier. A (re)list replaces that kind's
/// objects atomically once complete, so a relist after `410 Gone` or a reconnect never makes a service flap; `listed`
/// turns true after the first complete list.
async fn follow<K: Tracked>(api: Api<K>, shared: Shared, listed: watch::Sender<bool>) {
    let config = watcher::Config::default().labels(LABEL_SELECTOR);
    let mut events = watcher(api, config).default_backoff().boxed();
    let mut relist: Option<Vec<K>> = None;
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::Init) => relist = Some(Vec::new()),
            Ok(watcher::Event::InitApply(obj)) => relist.get_or_insert_with(Vec::new).push(obj),
            Ok(watcher::Event::InitDone) => {
                let objs = relist.take().unwrap_or_default();
                tracing::info!(kind = K::KIND, objects = objs.len(), "listed");
                shared.updates.send(K::replace(objs));
                listed.send_replace(true);
            }
            Ok(watcher::Event::Apply(obj)) => shared.updates.send(K::apply(obj)),
            Ok(watcher::Event::Delete(obj)) => {
                let (ns, name) = (obj.namespace().unwrap_or_default(), obj.name_any());
                shared.updates.send(K::delete(ns, name));
            }
            Err(e) => tracing::warn!(kind = K::KIND, "watch failed, retrying with backoff: {e}"),
        }
    }
}

/// The Node label kube-proxy reads the zone from (`v1.LabelTopologyZone`).
const LABEL_TOPOLOGY_ZONE: &str = "topology.kubernetes.io/zone";

/// Follows this node's Node object for health (eligibility) and its zone (topology hints).
async fn follow_node(api: Api<Node>, node_name: String, shared: Shared) {
    let config = watcher::Config::default().fields(&format!("metadata.name={node_name}"));
    let mut events = watcher(api, config).default_backoff().boxed();
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::Apply(node) | watcher::Event::InitApply(node)) => {
                shared.health.sync_node(Some(&node));
                let zone = node.labels().get(LABEL_TOPOLOGY_ZONE).cloned();
                shared.updates.send(Update::NodeZone(zone));
            }
            Ok(watcher::Event::Delete(_)) => shared.health.sync_node(None),
            Ok(_) => {}
            Err(e) => tracing::warn!(node = %node_name, "node watch failed, retrying with backoff: {e}"),
        }
    }
}

/// Starts the watches. Returns when every Service and EndpointSlice has been listed once, so
/// the first sync sees a complete picture and removes nothing by mistake.
pub async fn start(client: Client, node_name: &str, shared: Shared) -> Result<Vec<tokio::task::JoinHandle<()>>> {
    let (svc_tx, mut svc_rx) = watch::channel(false);
    let (eps_tx, mut eps_rx) = watch::channel(false);
    let tasks = vec![
        tokio::spawn(follow::<Service>(Api::all(client.clone()), shared.clone(), svc_tx)),
        tokio::spawn(follow::<EndpointSlice>(Api::all(client.clone()), shared.clone(), eps_tx)),
        tokio::spawn(follow_node(Api::all(client.clone()), node_name.to_string(), shared.clone())),
    ];
    svc_rx.wait_for(|listed| *listed).await.context("Service watch ended before its first list")?;
    eps_rx.wait_for(|listed| *listed).await.context("EndpointSlice watch ended before its first list")?;
    publish_starting_event(client, node_name).await;
    Ok(tasks)
}

/// Records a `Starting` event on the node, as kube-proxy does. Best effort.
async fn publish_starting_event(client: Client, node_name: &str) {
    use kube::runtime::events::{Event, EventType, Recorder, Reporter};
    let reporter = Reporter { controller: "kproxy".into(), instance: Some(node_name.to_string()) };
    let recorder = Recorder::new(client, reporter);
    let reference = k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Node".into()),
        name: Some(node_name.to_string()),
        uid: Some(node_name.to_string()),
        ..Default::default()
    };
    let event = Event {
        type_: EventType::Normal,
        reason: "Starting".into(),
        note: Some("Starting kproxy.".into()),
        action: "StartKProxy".into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, &reference).await {
        tracing::warn!("could not record the Starting event: {e}");
    }
}
