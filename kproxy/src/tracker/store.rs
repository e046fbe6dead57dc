//! The store of objects: the last valid version of every Service and EndpointSlice, those
//! kproxy ignores, those whose latest version is invalid, and the slices of each Service. Every
//! update that changes what kproxy serves is recorded as a change of its Service.

use std::{
    collections::BTreeSet,
    time::SystemTime,
};

use k8s_openapi::{
    api::{core::v1::Service, discovery::v1::EndpointSlice},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

use super::{ModelStore, TRIGGER_TIME_ANNOTATION};
use crate::model::{Ignored, InvalidCode, InvalidObject, ServiceInfo, ServiceOutcome, SliceInfo};

/// `(namespace, name)` of an object.
pub type ObjectKey = (String, String);

fn key_of(meta: &ObjectMeta) -> ObjectKey {
    (
        meta.namespace.clone().unwrap_or_else(|| "default".into()),
        meta.name.clone().unwrap_or_default(),
    )
}

impl ModelStore {
    /// Adds or updates a Service. An invalid update keeps the last valid version serving and
    /// returns the error (it is also listed by [`Self::invalid`] until fixed).
    pub fn apply_service(&mut self, svc: &Service) -> Result<(), InvalidObject> {
        let key = key_of(&svc.metadata);
        match ServiceInfo::from_service(svc) {
            Ok(ServiceOutcome::Served(info)) => {
                self.invalid.remove(&("Service", key.clone()));
                if let Some(field) = info.unsupported_ports.first() {
                    // Served, but not every port: say which one is left out.
                    let warning = InvalidObject {
                        kind: "Service",
                        object: format!("{}/{}", key.0, key.1),
                        field: format!("{field}.protocol"),
                        reason: "SCTP is not served by kproxy; port skipped".into(),
                        code: InvalidCode::UnsupportedProtocol,
                    };
                    self.invalid.insert(("Service", key.clone()), warning);
                }
                self.ignored.remove(&key);
                if self.services.get(&key) != Some(&info) {
                    self.services.insert(key.clone(), info);
                    self.service_changes.insert(key);
                }
                Ok(())
            }
            Ok(ServiceOutcome::Ignored(why)) => {
                self.invalid.remove(&("Service", key.clone()));
                self.ignored.insert(key.clone(), why);
                if self.services.remove(&key).is_some() {
                    self.service_changes.insert(key);
                }
                Ok(())
            }
            Err(e) => {
                self.invalid.insert(("Service", key), e.clone());
                Err(e)
            }
        }
    }

    pub fn delete_service(&mut self, namespace: &str, name: &str) {
        let key = (namespace.to_string(), name.to_string());
        self.invalid.remove(&("Service", key.clone()));
        self.ignored.remove(&key);
        if self.services.remove(&key).is_some() {
            self.service_changes.insert(key);
        }
    }

    /// Adds or updates an EndpointSlice; as [`Self::apply_service`] for invalid ones.
    pub fn apply_slice(&mut self, slice: &EndpointSlice) -> Result<(), InvalidObject> {
        let key = key_of(&slice.metadata);
        match SliceInfo::from_slice(slice) {
            Ok(Some(info)) => {
                self.invalid.remove(&("EndpointSlice", key.clone()));
                if self.slices.get(&key) != Some(&info) {
                    self.remove_slice(&key);
                    let service = (info.namespace.clone(), info.service.clone());
                    let names = self.slices_by_service.entry(service.clone()).or_default();
                    if let Err(at) = names.binary_search(&key.1) {
                        names.insert(at, key.1.clone());
                    }
                    self.slices.insert(key, info);
                    let triggered = slice
                        .metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get(TRIGGER_TIME_ANNOTATION))
                        .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
                        .unwrap_or_else(SystemTime::now);
                    self.endpoint_changes.entry(service).or_insert(triggered);
                }
                Ok(())
            }
            Ok(None) => {
                self.invalid.remove(&("EndpointSlice", key.clone()));
                self.remove_slice(&key);
                Ok(())
            }
            Err(e) => {
                self.invalid.insert(("EndpointSlice", key), e.clone());
                Err(e)
            }
        }
    }

    pub fn delete_slice(&mut self, namespace: &str, name: &str) {
        let key = (namespace.to_string(), name.to_string());
        self.invalid.remove(&("EndpointSlice", key.clone()));
        self.remove_slice(&key);
    }

    fn remove_slice(&mut self, key: &ObjectKey) {
        if let Some(old) = self.slices.remove(key) {
            let service = (old.namespace, old.service);
            if let Some(names) = self.slices_by_service.get_mut(&service) {
                names.retain(|n| *n != key.1);
                if names.is_empty() {
                    self.slices_by_service.remove(&service);
                }
            }
            self.endpoint_changes.entry(service).or_insert_with(SystemTime::now);
        }
    }

    /// Replaces every object with this complete set (a re-read of the manifests): objects
    /// absent from it are deleted, the others applied, and only real differences are recorded
    /// as changes. Invalid objects are listed by [`Self::invalid`].
    pub fn replace_all(&mut self, services: &[Service], slices: &[EndpointSlice]) {
        self.replace_services(services);
        self.replace_slices(slices);
    }

    /// [`Self::replace_all`] for Services only (a relist of Services).
    pub fn replace_services(&mut self, services: &[Service]) {
        self.duplicates.retain(|d| d.kind != "Service");
        let keep: BTreeSet<ObjectKey> = services.iter().map(|s| key_of(&s.metadata)).collect();
        let gone: Vec<ObjectKey> = self
            .services
            .keys()
            .chain(self.ignored.keys())
            .chain(self.invalid.keys().filter(|(k, _)| *k == "Service").map(|(_, o)| o))
            .filter(|k| !keep.contains(*k))
            .cloned()
            .collect();
        for (ns, name) in gone {
            self.delete_service(&ns, &name);
        }
        let mut seen = BTreeSet::new();
        for svc in services {
            if !seen.insert(key_of(&svc.metadata)) {
                self.duplicates.push(duplicate("Service", &svc.metadata));
                continue;
            }
            // An invalid object is recorded in `self.invalid`.
            let _ = self.apply_service(svc);
        }
    }

    /// [`Self::replace_all`] for EndpointSlices only (a relist of EndpointSlices).
    pub fn replace_slices(&mut self, slices: &[EndpointSlice]) {
        self.duplicates.retain(|d| d.kind != "EndpointSlice");
        let keep: BTreeSet<ObjectKey> = slices.iter().map(|s| key_of(&s.metadata)).collect();
        let gone: Vec<ObjectKey> = self
            .slices
            .keys()
            .chain(self.invalid.keys().filter(|(k, _)| *k == "EndpointSlice").map(|(_, o)| o))
            .filter(|k| !keep.contains(*k))
            .cloned()
            .collect();
        for (ns, name) in gone {
            self.delete_slice(&ns, &name);
        }
        let mut seen = BTreeSet::new();
        for slice in slices {
            if !seen.insert(key_of(&slice.metadata)) {
                self.duplicates.push(duplicate("EndpointSlice", &slice.metadata));
                continue;
            }
            let _ = self.apply_slice(slice);
        }
    }

    /// Objects whose latest version is invalid, Services that lost a frontend conflict, and
    /// duplicate objects.
    pub fn invalid(&self) -> impl Iterator<Item = &InvalidObject> {
        self.invalid.values().chain(self.claims.conflicts()).chain(&self.duplicates)
    }

    pub fn ignored(&self) -> impl Iterator<Item = (&ObjectKey, &Ignored)> {
        self.ignored.iter()
    }

    /// The slices of Service `key`.
    pub(super) fn slices_of<'a>(&'a self, key: &'a ObjectKey) -> impl Iterator<Item = &'a SliceInfo> + Clone + 'a {
        let names = self.slices_by_service.get(key).into_iter().flatten();
        names.filter_map(move |n| self.slices.get(&(key.0.clone(), n.clone())))
    }
}

/// The error of a second copy of an object in a complete set.
fn duplicate(kind: &'static str, meta: &ObjectMeta) -> InvalidObject {
    let (ns, name) = key_of(meta);
    InvalidObject {
        kind,
        object: format!("{ns}/{name}"),
        field: "metadata.name".into(),
        reason: "duplicate object; the first one is used".into(),
        code: InvalidCode::DuplicateObject,
    }
}

#[cfg(test)]
mod tests {
    use super::super::{
        test_support::{fe, service},
        ModelStore,
    };

    #[test]
    fn an_invalid_update_keeps_the_last_valid_version() {
        let mut store = ModelStore::default();
        store.apply_service(&service("web", "10.96.0.1")).unwrap();
        store.take_changes();
        let err = store.apply_service(&service("web", "10.96.0.999")).unwrap_err();
        assert_eq!(err.field, "spec.clusterIP");
        assert!(store.take_changes().frontends.is_empty());
        assert!(store.desired().contains_key(&fe("10.96.0.1")));
        assert_eq!(store.invalid().count(), 1);
        store.apply_service(&service("web", "10.96.0.3")).unwrap();
        assert_eq!(store.invalid().count(), 0);
        assert_eq!(store.take_changes().frontends, [fe("10.96.0.1"), fe("10.96.0.3")].into());
    }
}
