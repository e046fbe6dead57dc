//! The desired state: for each frontend, what its owner among the Services claiming it wants,
//! kept current one frontend at a time as [`ModelStore::take_changes`] settles them.

use std::collections::HashMap;

use super::{Changes, ModelStore, ObjectKey};
use crate::model::{service_frontends, DesiredService, DesiredState, Frontend, Protocol};

/// The frontends one Service wants, sorted by frontend, one entry each. A vector: a map's node
/// is some 1.3 KB for the one or two frontends of a Service, and a sync of every Service made
/// and freed 10,000 of them among the desired state's allocations (holes malloc keeps).
pub(super) type Wanted = Vec<(Frontend, DesiredService)>;

impl ModelStore {
    pub fn desired(&self) -> &DesiredState {
        &self.desired
    }

    /// The frontends Service `key` wants now, by frontend; `None` if it is not served.
    pub(super) fn wanted_frontends(&self, key: &ObjectKey) -> Option<Wanted> {
        let mut wanted = self.frontends_of(key)?;
        // As a map collects them: of a frontend listed twice, the last entry.
        wanted.reverse();
        wanted.sort_by_key(|(f, _)| *f);
        wanted.dedup_by_key(|(f, _)| *f);
        Some(wanted)
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
            Some(w) => w.binary_search_by_key(&f, |(g, _)| *g).ok().map(|at| w.remove(at).1),
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
