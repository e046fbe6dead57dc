//! Phase 1: the frontends nobody wants any more, and the backends only they used. Their room
//! is counted free before anything is added, so the same plan can use it.

use std::collections::{BTreeSet, HashMap, HashSet};

use kproxy_common::lb::{Backend, ServiceKey, SCOPE_INTERNAL};

use super::{
    super::{backend_value, service_key, MapContents, Op},
    scope::member_key,
    Planner,
};
use crate::model::Frontend;

impl Planner<'_> {
    /// Deletes each removed frontend that is programmed: both scopes, its source ranges and
    /// its metadata.
    pub(super) fn remove_frontends(&mut self, removed: &[Frontend]) {
        let current = self.current;
        for frontend in removed {
            // The frontend entry first, so readers stop at once; the internal scope after it,
            // when nothing points there any more.
            let key0 = service_key(*frontend, 0);
            let Some(v) = current.services.get(&key0) else { continue };
            self.removed_ids.insert(v.service_id);
            self.room.services = self.room.services.saturating_sub(1);
            for key0 in [key0, ServiceKey { scope: SCOPE_INTERNAL, ..key0 }] {
                let deleted = delete_scope(current, key0, &mut self.ops.freeing, &mut self.ref_delta);
                self.room.entries = self.room.entries.saturating_sub(deleted);
            }
            for range in current.source_ranges.get(&v.service_id).into_iter().flatten() {
                self.ops.freeing.push(Op::DeleteSourceRange(v.service_id, *range));
            }
            if self.mirror.has_meta(v.service_id) {
                self.ops.freeing.push(Op::DeleteMeta(v.service_id));
            }
        }
    }

    /// Deletes the backends only removed frontends used, and no frontend of this plan wants.
    pub(super) fn free_backends(&mut self, kept: &[Frontend]) {
        if self.ref_delta.is_empty() {
            return;
        }
        let (current, mirror, desired) = (self.current, self.mirror, self.desired);
        let wanted: HashSet<Backend> = kept
            .iter()
            .flat_map(|f| desired[f].all_backends().map(|a| backend_value(*a, f.protocol)))
            .collect();
        let freed: BTreeSet<u32> = self
            .ref_delta
            .iter()
            .filter(|(id, delta)| i64::from(mirror.refs(**id)) + **delta <= 0)
            .filter(|(id, _)| current.backends.get(id).is_some_and(|b| !wanted.contains(b)))
            .map(|(id, _)| *id)
            .collect();
        self.ops.freeing.extend(freed.iter().copied().map(Op::DeleteBackend));
        self.room.backends = self.room.backends.saturating_sub(freed.len() as u64);
        self.freed_backends = freed;
    }
}

/// Plans the deletion of one scope of a frontend (`key0`, its slot 0), if programmed: the
/// frontend entry first, so readers stop at once, then its slots, then the membership entries
/// of their backends. Returns how many services-map entries it deletes.
pub(super) fn delete_scope(current: &MapContents, key0: ServiceKey, ops: &mut Vec<Op>, ref_delta: &mut HashMap<u32, i64>) -> u64 {
    let Some(v) = current.services.get(&key0) else { return 0 };
    ops.push(Op::DeleteService(key0));
    let mut deleted = 1;
    let mut members = Vec::new();
    for slot in 1..=v.count {
        let key = ServiceKey { slot, ..key0 };
        if let Some(s) = current.services.get(&key) {
            *ref_delta.entry(s.backend_id).or_default() -= 1;
            ops.push(Op::DeleteService(key));
            deleted += 1;
            let member = member_key(&key0, v.service_id, s.backend_id);
            if current.members.contains_key(&member) {
                members.push(Op::DeleteMember(member));
            }
        }
    }
    ops.extend(members);
    deleted
}
