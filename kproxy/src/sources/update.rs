//! The one update type every source pushes, and the channel that carries it to the proxier
//! (`crate::proxier`), after kube-proxy's event handlers feeding its change trackers.
//!
//! A source never touches the [`ModelStore`]: it sends [`Update`]s into a [`Sink`]. The
//! apiserver's watchers send them through an [`UpdateSender`] (an unbounded channel: a send
//! never blocks the event loop, and wakes the proxier); the manifest source, read on the
//! proxier's thread, pushes straight into the store, which is a [`Sink`] too. The store
//! validates each update when it is applied, so invalid objects are listed and counted in one
//! place whatever their source.

use std::sync::{mpsc, Arc};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use tokio::sync::Notify;

use crate::{model::InvalidObject, tracker::ModelStore};

/// One change of what a source knows.
#[derive(Debug)]
pub enum Update {
    ApplyService(Box<Service>),
    DeleteService { namespace: String, name: String },
    ApplySlice(Box<EndpointSlice>),
    DeleteSlice { namespace: String, name: String },
    /// Every Service, as a (re)list returned them: those absent are deleted.
    ReplaceServices(Vec<Service>),
    /// Every EndpointSlice, as a (re)list returned them.
    ReplaceSlices(Vec<EndpointSlice>),
    /// This node's `topology.kubernetes.io/zone` label (`None`: none).
    NodeZone(Option<String>),
}

impl Update {
    /// Applies the update to `store`; `Err` names an invalid object (the store also lists it
    /// until it is fixed, and keeps serving its last valid version).
    pub fn apply(self, store: &mut ModelStore) -> Result<(), InvalidObject> {
        match self {
            Update::ApplyService(svc) => store.apply_service(&svc)?,
            Update::DeleteService { namespace, name } => store.delete_service(&namespace, &name),
            Update::ApplySlice(slice) => store.apply_slice(&slice)?,
            Update::DeleteSlice { namespace, name } => store.delete_slice(&namespace, &name),
            Update::ReplaceServices(services) => store.replace_services(&services),
            Update::ReplaceSlices(slices) => store.replace_slices(&slices),
            Update::NodeZone(zone) => store.set_node_zone(zone),
        }
        Ok(())
    }
}

/// Where a source pushes its updates.
pub trait Sink {
    fn push(&mut self, update: Update);
}

/// The store applies what it is pushed at once (the manifest source on the proxier's thread,
/// `kproxy tc-cost`, tests); an invalid object is listed by [`ModelStore::invalid`].
impl Sink for ModelStore {
    fn push(&mut self, update: Update) {
        if let Err(e) = update.apply(self) {
            tracing::debug!("invalid update: {e}");
        }
    }
}

/// The sending end of the update channel: cheap to clone, never blocks, and wakes the proxier
/// after each send.
#[derive(Clone)]
pub struct UpdateSender {
    tx: mpsc::Sender<Update>,
    wake: Arc<Notify>,
}

impl UpdateSender {
    /// Sends `update` and wakes the proxier. An update sent after the proxier stopped (at
    /// shutdown) is dropped.
    pub fn send(&self, update: Update) {
        if self.tx.send(update).is_ok() {
            self.wake.notify_one();
        }
    }
}

impl Sink for UpdateSender {
    fn push(&mut self, update: Update) {
        self.send(update);
    }
}

/// The receiving end, owned by the proxier.
pub struct UpdateReceiver {
    rx: mpsc::Receiver<Update>,
}

impl UpdateReceiver {
    /// The updates sent so far, in order, without waiting for more.
    pub fn drain(&self) -> impl Iterator<Item = Update> + '_ {
        self.rx.try_iter()
    }
}

/// A new update channel whose sends notify `wake`.
pub fn channel(wake: Arc<Notify>) -> (UpdateSender, UpdateReceiver) {
    let (tx, rx) = mpsc::channel();
    (UpdateSender { tx, wake }, UpdateReceiver { rx })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn updates_arrive_in_order_and_each_send_wakes_the_receiver() {
        let wake = Arc::new(Notify::new());
        let (tx, rx) = channel(wake.clone());
        let (services, slices) = crate::sources::manifests::parse_objects(
            "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-1, labels: {kubernetes.io/service-name: web}}\n\
             addressType: IPv4\nports: [{port: 8080}]\nendpoints: [{addresses: [10.244.0.1]}]\n",
        );
        tx.send(Update::ReplaceServices(services));
        tx.clone().push(Update::ApplySlice(Box::new(slices[0].clone())));
        // A permit is stored for the receiver, which was not waiting.
        let woken = futures::FutureExt::now_or_never(wake.notified());
        assert!(woken.is_some(), "a send wakes the proxier");
        let mut store = ModelStore::default();
        for update in rx.drain() {
            update.apply(&mut store).unwrap();
        }
        assert_eq!(store.pending(), (1, 1));
        store.take_changes();
        assert_eq!(store.desired().len(), 1);
        tx.send(Update::DeleteService { namespace: "default".into(), name: "web".into() });
        rx.drain().for_each(|u| store.push(u));
        assert_eq!(store.take_changes().frontends.len(), 1);
        assert!(store.desired().is_empty());
    }
}
