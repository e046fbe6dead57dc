//! The desired state: for each frontend, what its owner among the Services claiming it wants,
//! kept current one frontend at a time as [`ModelStore::take_changes`] settles them.

use std::collections::{BTreeMap, HashMap};

use super::{Changes, ModelStore, ObjectKey};
use crate::model::{service_frontends, DesiredService, DesiredState, Frontend, Protocol};

/// The frontends one Service wants, by frontend.
pub(super) type Wanted = BTreeMap<Frontend, DesiredService>;

impl ModelStore {
    pub fn desired(&self) -> &DesiredState {
        &self.desired
    }

    /// The frontends Service `key` wants now, by frontend; `None` if it is not served.
    pub(super) fn wanted_frontends(&self, key: &ObjectKey) -> Option<Wanted> {
        Some(self.frontends_of(key)?.into_iter().collect())
    }

    /// The frontends Service `key` wants now, in the model's order.
    fn frontends_of(&self, key: &ObjectKey) -> Option<Vec<(Frontend, DesiredService)>> {
        let svc = self.services.get(key)?;
        Some(service_frontends(svc, self.slices_of(key), &self.node_addresses, self.topology()))
    }

    /// Settles frontend `f`, whose claims may have changed: its owner's entry (from `wanted`,
    /// the Services rebuilt by this sync, or rebuilt now for an unchanged Service that takes
    /// `f` over), the conflicts over it, and what its change means for `changes` and the
    /// no-local-endpoint counts.
    /// The owner's entry is moved out of `wanted` (each frontend is settled once per sync): a
    /// copy would interleave the desired state with what the sync frees.
    pub(super) fn settle(&mut self, f: Frontend, wanted: &mut HashMap<ObjectKey, Wanted>, changes: &mut Changes) {
        let owner = self.claims.owner(f).cloned();
        let entry = owner.and_then(|o| match wanted.get_mut(&o) {
            Some(w) => w.remove(&f),
            // An unchanged Service takes over a frontend released by another one.
            None => self.frontends_of(&o).and_then(|list| list.into_iter().find(|(g, _)| *g == f)).map(|(_, d)| d),
        });
        let services = &self.services;
        self.claims.record_conflicts(f, |loser| {
            services
                .get(loser)
                .and_then(|s| s.ports.iter().position(|p| p.port == f.port && p.name.protocol == f.protocol))
                .unwrap_or_default()
        });
        let old = match entry {
            Some(e) => self.desired.insert(f, e),
            None => self.desired.remove(&f),
        };
        let new = self.desired.get(&f);
        if let (Some(old), Some(new), Protocol::Tcp) = (&old, new, f.protocol) {
            changes.unlisted.extend(old.draining.iter().filter(|a| !new.lists(a)).map(|a| (f, *a)));
        }
        if old.as_ref() != new {
            self.unserved.update(old.as_ref(), new);
            changes.frontends.insert(f);
        }
    }
}
