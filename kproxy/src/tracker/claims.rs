//! Which Services claim which frontends. Two Services may name one frontend (two manifests with
//! one ClusterIP, two Services with one external IP): the first by namespace/name owns it, the
//! others are reported as invalid, and one of them takes over when the owner leaves.

use std::collections::{BTreeMap, HashMap};

use super::ObjectKey;
use crate::model::{Frontend, InvalidCode, InvalidObject};

#[derive(Debug, Default)]
pub(super) struct Claims {
    /// Frontends each Service claims (whether or not it owns them).
    claims_of: HashMap<ObjectKey, Vec<Frontend>>,
    /// Services claiming each frontend; the first one (by namespace/name) owns it.
    /// Sorted; almost always one: a vector, as a set's node would be ten times its size.
    claimants: HashMap<Frontend, Vec<ObjectKey>>,
    /// Services that lost a frontend to another one.
    conflicts: BTreeMap<(Frontend, ObjectKey), InvalidObject>,
}

impl Claims {
    /// Drops every claim of Service `key`; returns the frontends it claimed.
    pub fn release(&mut self, key: &ObjectKey) -> Vec<Frontend> {
        let released = self.claims_of.remove(key).unwrap_or_default();
        for f in &released {
            if let Some(c) = self.claimants.get_mut(f) {
                c.retain(|k| k != key);
                if c.is_empty() {
                    self.claimants.remove(f);
                }
            }
        }
        released
    }

    /// Records that Service `key` claims `frontends` (after [`Self::release`]).
    pub fn claim(&mut self, key: &ObjectKey, frontends: Vec<Frontend>) {
        for f in &frontends {
            let claimants = self.claimants.entry(*f).or_default();
            if let Err(at) = claimants.binary_search(key) {
                claimants.insert(at, key.clone());
            }
        }
        self.claims_of.insert(key.clone(), frontends);
    }

    /// The Service that owns frontend `f`, if any claims it.
    pub fn owner(&self, f: Frontend) -> Option<&ObjectKey> {
        self.claimants.get(&f).and_then(|c| c.first())
    }

    /// Records the conflicts over `f` anew: every claimant but its owner lost it. `port_index`
    /// is the index in `spec.ports` of the losing Service's port that names `f`.
    pub fn record_conflicts(&mut self, f: Frontend, port_index: impl Fn(&ObjectKey) -> usize) {
        self.conflicts.retain(|(g, _), _| *g != f);
        let Some(claimants) = self.claimants.get(&f) else { return };
        let owner = claimants.first().expect("non-empty");
        for loser in claimants.iter().skip(1) {
            let conflict = InvalidObject {
                kind: "Service",
                object: format!("{}/{}", loser.0, loser.1),
                field: format!("spec.ports[{}]", port_index(loser)),
                reason: format!("frontend {f} is already served for {}/{}", owner.0, owner.1),
                code: InvalidCode::FrontendConflict,
            };
            self.conflicts.insert((f, loser.clone()), conflict);
        }
    }

    /// The Services that lost a frontend, one error per frontend lost.
    pub fn conflicts(&self) -> impl Iterator<Item = &InvalidObject> {
        self.conflicts.values()
    }
}

#[cfg(test)]
mod tests {
    use super::super::{
        test_support::{fe, service, slice},
        ModelStore,
    };
    use crate::model::test_support::build;

    #[test]
    fn a_frontend_conflict_is_reported_and_resolved_when_the_owner_leaves() {
        let mut store = ModelStore::default();
        store.replace_all(&[service("b", "10.96.0.1"), service("a", "10.96.0.1")], &[slice("b-1", "b", &["10.244.0.2"])]);
        store.take_changes();
        assert_eq!(store.desired()[&fe("10.96.0.1")].name.name, "a");
        let conflicts: Vec<String> = store.invalid().map(ToString::to_string).collect();
        assert_eq!(conflicts, ["Service default/b: spec.ports[0]: frontend 10.96.0.1:80/TCP is already served for default/a"]);
        // The owner goes: the other service takes the frontend over, with its endpoints.
        store.replace_all(&[service("b", "10.96.0.1")], &[slice("b-1", "b", &["10.244.0.2"])]);
        assert_eq!(store.take_changes().frontends, [fe("10.96.0.1")].into());
        assert_eq!(store.desired()[&fe("10.96.0.1")].name.name, "b");
        assert_eq!(store.desired()[&fe("10.96.0.1")].backends.len(), 1);
        assert_eq!(store.invalid().count(), 0);
    }

    #[test]
    fn duplicate_objects_and_frontend_conflicts_are_reported() {
        let svc = |name: &str, ip: &str| {
            format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{clusterIP: {ip}, ports: [{{port: 80}}]}}\n---\n")
        };
        let s = build(&(svc("a", "10.96.0.1") + &svc("a", "10.96.0.2") + &svc("b", "10.96.0.1")));
        let errors: Vec<String> = s.invalid.iter().map(ToString::to_string).collect();
        assert_eq!(
            errors,
            [
                "Service default/b: spec.ports[0]: frontend 10.96.0.1:80/TCP is already served for default/a",
                "Service default/a: metadata.name: duplicate object; the first one is used",
            ]
        );
        assert_eq!(s.desired.len(), 1);
    }
}
