//! Sync: bring the dataplane to the desired state by writing only the difference.

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use crate::{
    dataplane::{
        plan::{plan, Limits, Mirror, Refused, Scope},
        Dataplane, DataplaneError,
    },
    model::{DesiredState, Frontend},
};

/// What one sync did.
#[derive(Debug, Default)]
pub struct SyncStats {
    /// Whether the whole state was reconciled (after a re-read of the maps).
    pub full: bool,
    /// Map writes and deletes applied.
    pub ops: usize,
    pub refused: Vec<Refused>,
    pub duration: Duration,
}

/// Owns the dataplane and an indexed mirror of what it holds, so a sync of a few changed
/// frontends costs O(changes): no map reads, no scan. The mirror is rebuilt from the maps on
/// the first sync, on every full sync (which repairs drift, such as entries deleted by hand)
/// and after a failed write.
pub struct Syncer<D> {
    dataplane: D,
    mirror: Option<Mirror>,
    limits: Limits,
}

/// What a sync must look at.
#[derive(Clone, Copy, Debug)]
pub enum SyncScope<'a> {
    /// Re-read the maps and reconcile everything.
    Full,
    /// Reconcile these frontends against the mirror.
    Changed(&'a BTreeSet<Frontend>),
}

impl<D: Dataplane> Syncer<D> {
    pub fn new(dataplane: D, limits: Limits) -> Self {
        Self { dataplane, mirror: None, limits }
    }

    /// Entries of the services, backends and metadata maps, as last synced.
    pub fn entries(&self) -> Option<(usize, usize, usize)> {
        self.mirror.as_ref().map(Mirror::entries)
    }

    pub fn sync(&mut self, desired: &DesiredState, scope: SyncScope<'_>) -> Result<SyncStats, DataplaneError> {
        let start = Instant::now();
        let (mut mirror, plan_scope) = match (self.mirror.take(), scope) {
            (Some(m), SyncScope::Changed(set)) => (m, Scope::Frontends(set)),
            // No trusted mirror (first sync, or a write failed): a changed sync becomes full.
            _ => (Mirror::new(self.dataplane.read()?), Scope::Full),
        };
        let full = matches!(plan_scope, Scope::Full);
        let plan = plan(&mirror, desired, plan_scope, &self.limits);
        // On error the mirror is dropped (self.mirror stays None): the next sync re-reads.
        self.dataplane.apply_all(&plan.ops)?;
        for op in &plan.ops {
            mirror.apply(op);
        }
        self.mirror = Some(mirror);
        Ok(SyncStats { full, ops: plan.ops.len(), refused: plan.refused, duration: start.elapsed() })
    }
}
