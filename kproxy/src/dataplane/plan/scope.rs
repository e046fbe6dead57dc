//! Phase 3 for one scope of a frontend: its slots, then its frontend entry with the count that
//! makes them reachable, then the slots past that count; and the membership entries that say
//! which slot holds which backend (written before the slots, deleted after them).

use std::collections::{BTreeSet, HashSet};

use kproxy_common::lb::{
    MemberKey, MemberValue, ServiceKey, ServiceValue, SCOPE_INTERNAL, SVC_FLAG_AFFINITY, SVC_FLAG_DROP_UNSERVED,
    SVC_FLAG_SOURCE_RANGES, SVC_FLAG_TWO_SCOPES,
};

use super::{
    super::{MapContents, Op},
    removal::delete_scope,
    Planner,
};
use crate::model::{DesiredService, FrontendKind};

/// One scope of a frontend as programmed, read from the maps once: its frontend entry
/// (`key0`, slot 0) and its slots `1..=count`.
pub(super) struct ProgrammedScope {
    key0: ServiceKey,
    front: Option<ServiceValue>,
    /// Slot `i + 1` (`None`: missing, as after a crash or a hand edit).
    slots: Vec<Option<ServiceValue>>,
}

impl ProgrammedScope {
    pub fn read(current: &MapContents, key0: ServiceKey) -> Self {
        let front = current.services.get(&key0).copied();
        let count = front.map_or(0, |v| v.count);
        let slots = (1..=count).map(|slot| current.services.get(&ServiceKey { slot, ..key0 }).copied()).collect();
        ProgrammedScope { key0, front, slots }
    }

    fn count(&self) -> u16 {
        self.front.map_or(0, |v| v.count)
    }

    /// Services-map entries this scope adds and deletes to hold `wanted` backends: its frontend
    /// entry and the slots it lacks, and the slots past the new count.
    pub fn entry_changes(&self, wanted: usize) -> (u64, u64) {
        let old_count = self.slots.len();
        let present = |slot: usize| self.slots[slot - 1].is_some();
        let added = usize::from(self.front.is_none())
            + (1..=wanted.min(old_count)).filter(|s| !present(*s)).count()
            + wanted.saturating_sub(old_count);
        let deleted = (wanted + 1..=old_count).filter(|s| present(*s)).count();
        (added as u64, deleted as u64)
    }
}

impl Planner<'_> {
    /// Writes both scopes of a frontend of service `service_id`: `scope0` (as programmed, and
    /// the backend ids it must hold), and `internal` the same for the scope of clients in the
    /// cluster if it has one. The internal scope first: complete before the scope-0 flag that
    /// makes it reachable; without one, a programmed internal scope goes once that flag is
    /// cleared (phase 4).
    pub(super) fn write_scopes(
        &mut self,
        want: &DesiredService,
        service_id: u32,
        scope0: (&ProgrammedScope, &[u32]),
        internal: Option<(&ProgrammedScope, &[u32])>,
    ) {
        let kind_and_affinity = frontend_flags(want) & (FrontendKind::all_flags() | SVC_FLAG_AFFINITY);
        if let Some((programmed, ids)) = internal {
            let front = ServiceValue { backend_id: want.affinity_timeout, count: 0, flags: kind_and_affinity, service_id };
            self.write_scope(programmed, ids, front);
        }
        let two_scopes = if internal.is_some() { SVC_FLAG_TWO_SCOPES } else { 0 };
        let front = ServiceValue { backend_id: want.affinity_timeout, count: 0, flags: frontend_flags(want) | two_scopes, service_id };
        let (programmed, ids) = scope0;
        self.write_scope(programmed, ids, front);
        if internal.is_none() {
            let internal_key0 = ServiceKey { scope: SCOPE_INTERNAL, ..programmed.key0 };
            delete_scope(self.current, internal_key0, &mut self.ops.removals, &mut self.ref_delta);
        }
    }

    /// Plans one scope of a frontend to hold the backend `ids` (at most
    /// [`super::MAX_BACKENDS_PER_FRONTEND`], checked by the caller): changed slots (a backend
    /// keeps its slot while it stays; new ones fill the free slots), then the frontend entry
    /// `front` with the count that makes them reachable, then the slots past the new count.
    fn write_scope(&mut self, programmed: &ProgrammedScope, ids: &[u32], front: ServiceValue) {
        let (current, key0) = (self.current, programmed.key0);
        let old_count = programmed.count();
        let old_slots: Vec<Option<u32>> = programmed.slots.iter().map(|s| s.map(|s| s.backend_id)).collect();
        let mut remaining: BTreeSet<u32> = ids.iter().copied().collect();
        let mut slots: Vec<Option<u32>> = vec![None; ids.len()];
        for (slot, old) in slots.iter_mut().zip(&old_slots) {
            if let Some(id) = old {
                if remaining.remove(id) {
                    *slot = Some(*id);
                }
            }
        }
        let mut fill = remaining.into_iter();
        for slot in slots.iter_mut().filter(|s| s.is_none()) {
            *slot = fill.next();
        }

        // At most MAX_BACKENDS_PER_FRONTEND: every slot number fits in 16 bits.
        for (slot, backend_id) in (1..=u16::MAX).zip(&slots) {
            let backend_id = backend_id.expect("every slot is filled: as many ids as slots");
            let key = ServiceKey { slot, ..key0 };
            let membership = member_key(&key0, front.service_id, backend_id);
            let where_ = MemberValue { slot, _pad: 0 };
            self.keep.members.insert(membership);
            if current.members.get(&membership) != Some(&where_) {
                self.ops.members.push(Op::PutMember(membership, where_));
            }
            let value = ServiceValue { backend_id, count: 0, flags: 0, service_id: front.service_id };
            self.keep.keys.insert(key);
            // Slots past the programmed count were not read with it (a stray one may be there).
            let old = match programmed.slots.get(usize::from(slot) - 1) {
                Some(old) => old.as_ref(),
                None => current.services.get(&key),
            };
            if old != Some(&value) {
                if let Some(old) = old {
                    *self.ref_delta.entry(old.backend_id).or_default() -= 1;
                }
                *self.ref_delta.entry(backend_id).or_default() += 1;
                self.ops.services.push(Op::PutService(key, value));
            }
        }
        let count = u16::try_from(slots.len()).expect("at most MAX_BACKENDS_PER_FRONTEND, checked by the caller");
        let front = ServiceValue { count, ..front };
        self.keep.keys.insert(key0);
        if programmed.front != Some(front) {
            self.ops.services.push(Op::PutService(key0, front));
        }
        // Slots count < slot <= the programmed count, in 16 bits (slot 65,535 included).
        for slot in (count..old_count).map(|s| s + 1) {
            if let Some(old) = programmed.slots[usize::from(slot) - 1] {
                *self.ref_delta.entry(old.backend_id).or_default() -= 1;
                self.ops.services.push(Op::DeleteService(ServiceKey { slot, ..key0 }));
            }
        }
        // Backends no slot of this scope holds any more.
        let kept: HashSet<u32> = ids.iter().copied().collect();
        for backend_id in old_slots.iter().flatten().filter(|id| !kept.contains(id)) {
            let key = member_key(&key0, front.service_id, *backend_id);
            if current.members.contains_key(&key) {
                self.ops.member_deletes.push(key);
            }
        }
    }
}

/// The membership entry of `backend_id` in the scope of `key0` of service `service_id`.
pub(super) fn member_key(key0: &ServiceKey, service_id: u32, backend_id: u32) -> MemberKey {
    MemberKey { service_id, backend_id, scope: key0.scope, _pad: [0; 3] }
}

/// The flags of a frontend's scope-0 entry: its kind, and what the kernel must enforce.
fn frontend_flags(want: &DesiredService) -> u16 {
    let kind = want.frontend_type.flag();
    let drop_unserved = if want.drop_unserved { SVC_FLAG_DROP_UNSERVED } else { 0 };
    let source_ranges = if want.source_ranges.is_empty() { 0 } else { SVC_FLAG_SOURCE_RANGES };
    let affinity = if want.affinity_timeout > 0 { SVC_FLAG_AFFINITY } else { 0 };
    kind | drop_unserved | source_ranges | affinity
}
