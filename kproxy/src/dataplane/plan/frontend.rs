//! Phases 2 and 3 for one wanted frontend: refused whole if it cannot fit, else its new
//! backends, its metadata and source ranges, and its scopes (`super::scope`).

use std::collections::BTreeSet;

use kproxy_common::lb::{Backend, ServiceKey, ServiceValue, SCOPE_INTERNAL};

use super::{
    super::{backend_value, service_key, service_meta, Op},
    scope::ProgrammedScope,
    Limits, Planner, RefuseReason, Refused, Room, MAX_BACKENDS_PER_FRONTEND,
};
use crate::model::{Cidr, DesiredService, Frontend};

impl Planner<'_> {
    /// Whether frontend `f` needs more services-map entries than it has, in either scope.
    pub(super) fn grows(&self, f: &Frontend) -> bool {
        let want = &self.desired[f];
        let key0 = service_key(*f, 0);
        let internal = (ServiceKey { scope: SCOPE_INTERNAL, ..key0 }, want.internal_backends.as_ref().map(Vec::len));
        [(key0, Some(want.backends.len())), internal].into_iter().any(|(key0, wanted)| {
            let programmed = self.current.services.get(&key0).map_or(0, |v| usize::from(v.count) + 1);
            wanted.map_or(0, |n| n + 1) > programmed
        })
    }

    /// Plans one wanted frontend, or refuses it whole.
    pub(super) fn plan_frontend(&mut self, frontend: Frontend) {
        let (current, desired) = (self.current, self.desired);
        let want = &desired[&frontend];
        let key0 = service_key(frontend, 0);
        let existing = current.services.get(&key0).copied();
        let state = if existing.is_some() { "left as programmed" } else { "not programmed" };
        // Before anything that costs O(backends): such a frontend may be planned every sync.
        let most = want.backends.len().max(want.internal_backends.as_ref().map_or(0, Vec::len));
        if most > MAX_BACKENDS_PER_FRONTEND {
            let detail = format!(
                "Service {} ({frontend}) has {most} endpoints, more than the {MAX_BACKENDS_PER_FRONTEND} one service port can hold; {state}",
                want.name,
            );
            self.refuse(frontend, want, existing, RefuseReason::TooManyEndpoints, detail);
            return;
        }

        let backends: Vec<Backend> = want.backends.iter().map(|a| backend_value(*a, frontend.protocol)).collect();
        let internal: Option<Vec<Backend>> =
            want.internal_backends.as_ref().map(|list| list.iter().map(|a| backend_value(*a, frontend.protocol)).collect());
        let new_backends: BTreeSet<Backend> = backends
            .iter()
            .chain(internal.iter().flatten())
            .filter(|b| !self.mirror.ids_by_backend.contains_key(b) && !self.new_ids.contains_key(b))
            .copied()
            .collect();
        // Each scope as programmed, read once for the accounting and the writes; the internal
        // one only if wanted (else its deletion comes after every addition of the plan).
        let programmed = ProgrammedScope::read(current, key0);
        let programmed_internal =
            internal.as_ref().map(|_| ProgrammedScope::read(current, ServiceKey { scope: SCOPE_INTERNAL, ..key0 }));
        // Services-map keys this frontend adds (all written before its deletions), and deletes.
        let (added_0, deleted_0) = programmed.entry_changes(backends.len());
        let (added_1, deleted_1) =
            programmed_internal.as_ref().zip(internal.as_ref()).map_or((0, 0), |(p, list)| p.entry_changes(list.len()));
        let (added_entries, deleted_entries) = (added_0 + added_1, deleted_0 + deleted_1);
        if let Some(reason) = self.room.refusal(self.limits, existing.is_none(), new_backends.len(), added_entries) {
            let detail = format!("{}; {state}", self.room.full(self.limits));
            self.refuse(frontend, want, existing, reason, detail);
            return;
        }
        self.room.services += u64::from(existing.is_none());
        self.room.backends += new_backends.len() as u64;
        self.room.entries = (self.room.entries + added_entries).saturating_sub(deleted_entries);

        for b in &new_backends {
            let id = self.new_backend_id();
            self.new_ids.insert(*b, id);
            self.ops.backends.push(Op::PutBackend(id, *b));
        }
        // A backend entry deleted behind our back is not indexed: it gets a new id above and
        // the slots that named the old one are rewritten below.
        let (mirror, new_ids) = (self.mirror, &self.new_ids);
        let id_of = |b: &Backend| mirror.ids_by_backend.get(b).or_else(|| new_ids.get(b)).copied().expect("allocated above");
        let ids: Vec<u32> = backends.iter().map(id_of).collect();
        let internal_ids: Option<Vec<u32>> = internal.as_ref().map(|list| list.iter().map(id_of).collect());

        let service_id = existing.map_or_else(|| self.new_service_id(), |v| v.service_id);
        self.keep.meta.insert(service_id);
        self.write_meta(frontend, want, service_id);
        self.write_scopes(want, service_id, (&programmed, &ids), programmed_internal.as_ref().zip(internal_ids.as_deref()));
    }

    /// Refuses `frontend` for `reason`: it keeps what is programmed for it (`existing`, its
    /// scope-0 frontend entry), which the sweep must therefore leave alone.
    fn refuse(&mut self, frontend: Frontend, want: &DesiredService, existing: Option<ServiceValue>, reason: RefuseReason, detail: String) {
        self.refused.push(Refused { frontend, name: want.name.clone(), reason, detail });
        let Some(v) = existing else { return };
        let current = self.current;
        let key0 = service_key(frontend, 0);
        let internal_key0 = ServiceKey { scope: SCOPE_INTERNAL, ..key0 };
        for (key0, v) in [(key0, Some(v)), (internal_key0, current.services.get(&internal_key0).copied())] {
            let Some(v) = v else { continue };
            self.keep.keys.insert(key0);
            for slot in 1..=v.count {
                let key = ServiceKey { slot, ..key0 };
                self.keep.keys.insert(key);
                if let Some(s) = current.services.get(&key) {
                    self.keep.members.insert(super::scope::member_key(&key0, v.service_id, s.backend_id));
                }
            }
        }
        self.keep.meta.insert(v.service_id);
    }

    /// The metadata of `frontend`'s service id, and its source ranges: those wanted are in place
    /// before the frontend flag that enforces them (phase 2), the others go after it (phase 4).
    fn write_meta(&mut self, frontend: Frontend, want: &DesiredService, service_id: u32) {
        let current = self.current;
        let meta = service_meta(frontend, &want.name, want.frontend_type);
        if !self.mirror.holds_meta(service_id, &meta) {
            self.ops.meta.push(Op::PutMeta(service_id, Box::new(meta)));
        }
        let wanted_ranges: BTreeSet<Cidr> = want.source_ranges.iter().copied().collect();
        let programmed_ranges = current.source_ranges.get(&service_id);
        for range in &wanted_ranges {
            if !programmed_ranges.is_some_and(|p| p.contains(range)) {
                self.ops.meta.push(Op::PutSourceRange(service_id, *range));
            }
        }
        for range in programmed_ranges.into_iter().flatten().filter(|r| !wanted_ranges.contains(r)) {
            self.ops.removals.push(Op::DeleteSourceRange(service_id, *range));
        }
    }
}

impl Room {
    /// Why one more frontend (if `new_frontend`) with `new_backends` backends and
    /// `added_entries` services-map entries does not fit, if it does not.
    fn refusal(&self, limits: &Limits, new_frontend: bool, new_backends: usize, added_entries: u64) -> Option<RefuseReason> {
        if self.services + u64::from(new_frontend) > u64::from(limits.max_services) {
            Some(RefuseReason::ServicesFull)
        } else if self.backends + new_backends as u64 > u64::from(limits.max_backends) {
            Some(RefuseReason::BackendsFull)
        } else if self.entries + added_entries > u64::from(limits.max_service_entries) {
            Some(RefuseReason::ServiceEntriesFull)
        } else {
            None
        }
    }

    /// The totals against the limits, for a refusal's detail.
    fn full(&self, limits: &Limits) -> String {
        format!(
            "maps full ({}/{} services, {}/{} backends, {}/{} service entries)",
            self.services, limits.max_services, self.backends, limits.max_backends, self.entries, limits.max_service_entries,
        )
    }
}
