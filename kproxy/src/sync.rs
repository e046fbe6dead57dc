//! Sync: bring the dataplane to the desired state by writing only the difference.

use std::time::{Duration, Instant};

use crate::{
    dataplane::{
        plan::{plan, Limits, Refused},
        Dataplane, DataplaneError, MapContents,
    },
    model::DesiredState,
};

/// What one sync did.
#[derive(Debug, Default)]
pub struct SyncStats {
    /// Map writes and deletes applied.
    pub ops: usize,
    pub frontends: usize,
    pub refused: Vec<Refused>,
    pub duration: Duration,
}

/// Owns the dataplane and a mirror of what it holds, so a sync costs O(changes) map writes and
/// no map reads. The mirror is re-read from the maps on the first sync, on every full sync
/// (which repairs drift, such as entries deleted by hand) and after a failed write.
pub struct Syncer<D> {
    dataplane: D,
    mirror: Option<MapContents>,
    limits: Limits,
}

impl<D: Dataplane> Syncer<D> {
    pub fn new(dataplane: D, limits: Limits) -> Self {
        Self { dataplane, mirror: None, limits }
    }

    pub fn dataplane(&self) -> &D {
        &self.dataplane
    }

    pub fn sync(&mut self, desired: &DesiredState, full: bool) -> Result<SyncStats, DataplaneError> {
        let start = Instant::now();
        let mut mirror = match self.mirror.take() {
            Some(m) if !full => m,
            _ => self.dataplane.read()?,
        };
        let plan = plan(&mirror, desired, &self.limits);
        for op in &plan.ops {
            // On error the mirror is dropped (self.mirror stays None): the next sync re-reads.
            self.dataplane.apply(op)?;
            mirror.apply(op).expect("the in-memory dataplane never fails");
        }
        self.mirror = Some(mirror);
        Ok(SyncStats {
            ops: plan.ops.len(),
            frontends: desired.len() - plan.refused.len(),
            refused: plan.refused,
            duration: start.elapsed(),
        })
    }
}
