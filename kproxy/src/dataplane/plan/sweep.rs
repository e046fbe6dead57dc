//! Phases 4 and 5 at the end of a plan: the backends whose last slot reference it removes,
//! and, in a full plan, the sweep of stray entries nobody wants (slots past a count or without
//! a frontend, scope-1 entries no flag reaches, unreferenced backends, metadata, source ranges
//! and membership entries, as left by a crash or a hand edit).

use std::collections::HashSet;

use kproxy_common::lb::{MemberKey, ServiceKey};

use super::{super::Op, Planner};
use crate::model::Cidr;

impl Planner<'_> {
    /// Backends that lost their last slot reference in this plan (and were not freed with a
    /// removed frontend already).
    pub(super) fn collect_stale_backends(&mut self) {
        let (current, mirror) = (self.current, self.mirror);
        self.ops.stale_backends = self
            .ref_delta
            .iter()
            .filter(|(id, delta)| **delta < 0 && i64::from(mirror.refs(**id)) + **delta <= 0)
            .map(|(id, _)| *id)
            .filter(|id| current.backends.contains_key(id) && !self.freed_backends.contains(id))
            .collect();
    }

    /// Deletes every entry no frontend of a full plan keeps and no write of it deletes already.
    pub(super) fn sweep(&mut self) {
        self.sweep_service_entries();
        self.sweep_backends();
        self.sweep_meta_and_ranges();
        self.sweep_members();
    }

    /// Services-map entries: frontend entries first (so readers stop), then slots.
    fn sweep_service_entries(&mut self) {
        let current = self.current;
        let deleted: HashSet<ServiceKey> = self
            .ops
            .freeing
            .iter()
            .chain(&self.ops.removals)
            .chain(&self.ops.services)
            .filter_map(|op| match op {
                Op::DeleteService(k) => Some(*k),
                _ => None,
            })
            .collect();
        let mut strays: Vec<&ServiceKey> =
            current.services.keys().filter(|k| !self.keep.keys.contains(k) && !deleted.contains(k)).collect();
        strays.sort_by_key(|k| (k.slot != 0, k.scope, k.address, k.port, k.protocol, k.slot));
        for k in strays {
            if k.slot > 0 {
                *self.ref_delta.entry(current.services[k].backend_id).or_default() -= 1;
            }
            self.ops.removals.push(Op::DeleteService(*k));
        }
    }

    /// Backends no slot references once the plan is applied.
    fn sweep_backends(&mut self) {
        let (current, mirror) = (self.current, self.mirror);
        let unreferenced = current
            .backends
            .keys()
            .filter(|id| i64::from(mirror.refs(**id)) + self.ref_delta.get(id).copied().unwrap_or(0) <= 0)
            .filter(|id| !self.freed_backends.contains(id));
        self.ops.stale_backends.extend(unreferenced);
    }

    /// Metadata and source ranges of service ids no frontend keeps (those of removed
    /// frontends went with them).
    fn sweep_meta_and_ranges(&mut self) {
        let current = self.current;
        let unwanted = |id: &u32| !self.keep.meta.contains(id) && !self.removed_ids.contains(id);
        self.ops.meta_deletes.extend(self.mirror.meta.keys().filter(|id| unwanted(id)));
        let mut stray_ranges: Vec<(u32, Cidr)> = current
            .source_ranges
            .iter()
            .filter(|(id, _)| unwanted(id))
            .flat_map(|(id, set)| set.iter().map(move |r| (*id, *r)))
            .filter(|(id, r)| !self.ops.removals.contains(&Op::DeleteSourceRange(*id, *r)))
            .collect();
        stray_ranges.sort();
        self.ops.removals.extend(stray_ranges.into_iter().map(|(id, r)| Op::DeleteSourceRange(id, r)));
    }

    /// Membership entries of backends no slot holds.
    fn sweep_members(&mut self) {
        let already: HashSet<MemberKey> = self
            .ops
            .freeing
            .iter()
            .chain(&self.ops.removals)
            .filter_map(|op| match op {
                Op::DeleteMember(k) => Some(*k),
                _ => None,
            })
            .collect();
        let strays = self.current.members.keys().filter(|k| !self.keep.members.contains(k) && !already.contains(k));
        self.ops.member_deletes.extend(strays);
    }
}
