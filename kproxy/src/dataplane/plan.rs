//! Planning a sync: the ordered writes that take the maps from their current content to the
//! desired state. Pure: no kernel, no clock.
//!
//! Only differences are written, in an order that keeps every intermediate state valid for a
//! reader in the kernel, and that never writes to a full map:
//! 1. removed frontends (slot 0 first, so readers stop at once), then their slots and their
//!    scope-1 entries likewise with the membership entries of their slots, source ranges and
//!    metadata, then the backends only they used: the room they free is counted before
//!    anything is added, so the same plan can use it;
//! 2. new backends, then service metadata, new source ranges and membership entries (which
//!    slot holds which backend: written before the slot, see `kproxy_common::lb::MEMBERS_MAP`);
//! 3. per frontend, those that do not grow before those that do: changed backend slots, then
//!    the frontend entry (slot 0, with the count that makes the slots reachable), then slots
//!    beyond the new count; a frontend with two scopes (`kproxy_common::lb::SCOPE_INTERNAL`)
//!    gets its scope-1 entries so, before the scope-0 entries whose `SVC_FLAG_TWO_SCOPES`
//!    makes them reachable;
//! 4. source ranges no longer wanted, the scope-1 entries of a frontend whose flag was just
//!    cleared, stray entries, the membership entries of backends no slot holds any more, and
//!    metadata;
//! 5. backends that no slot references any more.
//!
//! A frontend that does not fit in the maps ([`Limits`]), or that has more backends than a
//! slot index can number ([`MAX_BACKENDS_PER_FRONTEND`]), is refused whole ([`Refused`]): it
//! keeps what was programmed for it, or stays unprogrammed; it is never cut short.
//!
//! A plan covers a [`Scope`]: the frontends that changed (a sync after events costs O(changes))
//! or everything (start-up and periodic full syncs, which also remove stray entries).
//! Backends are shared: one id per (address, port, protocol), whatever the number of services
//! that use it. Ids already in the maps are kept, so a restarted agent adopts them; new ids
//! come from a cursor past every id in use, so a plan never reuses an id it frees.

use std::collections::{BTreeSet, HashMap, HashSet};

use kproxy_common::lb::{
    Backend, MemberKey, MemberValue, ServiceKey, ServiceValue, SCOPE_EXTERNAL, SCOPE_INTERNAL, SVC_FLAG_AFFINITY,
    SVC_FLAG_DROP_UNSERVED, SVC_FLAG_SOURCE_RANGES, SVC_FLAG_TWO_SCOPES,
};

use super::{backend_value, frontend_of, service_key, service_meta, Dataplane as _, MapContents, Op};
use crate::model::{Cidr, DesiredService, DesiredState, Frontend, FrontendKind, ServicePortName};

/// Map capacities the plan must respect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Frontends (entries of the metadata map).
    pub max_services: u32,
    /// Distinct backends (entries of the backends map).
    pub max_backends: u32,
    /// Entries of the services map: frontends plus slots.
    pub max_service_entries: u32,
}

/// Which frontends a plan reconciles.
#[derive(Clone, Copy, Debug)]
pub enum Scope<'a> {
    /// Every frontend, desired or programmed, plus a sweep of stray entries.
    Full,
    /// Only these frontends (whether desired, programmed, or both).
    Frontends(&'a BTreeSet<Frontend>),
}

/// The most backends one frontend can have: backend slots are numbered `1..=count` by a 16-bit
/// index ([`ServiceKey::slot`], [`ServiceValue::count`]; slot 0 is the frontend entry), and the
/// kernel's slot selection (`kproxy_common::select_slot`) covers that whole range. A frontend
/// with more is refused ([`RefuseReason::TooManyEndpoints`]), never cut short.
pub const MAX_BACKENDS_PER_FRONTEND: usize = u16::MAX as usize;

/// Why a frontend was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RefuseReason {
    /// No room for one more frontend ([`Limits::max_services`]).
    ServicesFull,
    /// No room for its new backends ([`Limits::max_backends`]).
    BackendsFull,
    /// No room for its slots in the services map ([`Limits::max_service_entries`]).
    ServiceEntriesFull,
    /// More backends than one frontend can hold ([`MAX_BACKENDS_PER_FRONTEND`]).
    TooManyEndpoints,
}

impl RefuseReason {
    pub const ALL: [RefuseReason; 4] =
        [RefuseReason::ServicesFull, RefuseReason::BackendsFull, RefuseReason::ServiceEntriesFull, RefuseReason::TooManyEndpoints];

    /// The `reason` label of the refusal metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            RefuseReason::ServicesFull => "services_full",
            RefuseReason::BackendsFull => "backends_full",
            RefuseReason::ServiceEntriesFull => "service_entries_full",
            RefuseReason::TooManyEndpoints => "too_many_endpoints",
        }
    }
}

/// A frontend left as it was (programmed as before, or not at all) because it does not fit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    pub frontend: Frontend,
    pub name: ServicePortName,
    pub reason: RefuseReason,
    /// What did not fit, with the numbers, and what became of the frontend.
    pub detail: String,
}

/// The outcome of planning.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub ops: Vec<Op>,
    pub refused: Vec<Refused>,
}

/// The programmed state: the maps' content and the indexes planning needs, kept current as
/// ops are applied, so planning a change never scans the maps.
#[derive(Clone, Debug, Default)]
pub struct Mirror {
    contents: MapContents,
    /// The id of each backend value (the lowest, should the maps hold a value twice).
    ids_by_backend: HashMap<Backend, u32>,
    /// Values the maps hold under more than one id, with the number of ids beyond the first
    /// (rare: written by hand or by another agent). Only these need a scan when an id goes.
    extra_ids: HashMap<Backend, u32>,
    /// How many slots name each backend id.
    backend_refs: HashMap<u32, u32>,
    /// Frontend entries of scope 0: one per frontend (scope-1 ones are extra entries of it).
    frontends: usize,
    next_backend_id: u32,
    next_service_id: u32,
}

impl Mirror {
    /// Indexes the content read from the maps. O(entries).
    pub fn new(contents: MapContents) -> Self {
        let mut m = Mirror { next_backend_id: 1, next_service_id: 1, ..Default::default() };
        let mut backends: Vec<(u32, Backend)> = contents.backends.iter().map(|(i, b)| (*i, *b)).collect();
        backends.sort();
        for (id, b) in backends {
            m.index_backend(id, b);
            m.next_backend_id = m.next_backend_id.max(id.saturating_add(1));
        }
        for (k, v) in &contents.services {
            if k.slot == 0 {
                m.frontends += usize::from(k.scope == SCOPE_EXTERNAL);
            } else {
                *m.backend_refs.entry(v.backend_id).or_default() += 1;
                m.next_backend_id = m.next_backend_id.max(v.backend_id.saturating_add(1));
            }
            m.next_service_id = m.next_service_id.max(v.service_id.saturating_add(1));
        }
        for id in contents.meta.keys() {
            m.next_service_id = m.next_service_id.max(id.saturating_add(1));
        }
        m.contents = contents;
        m
    }

    /// Entries of the services, backends and metadata maps.
    pub fn entries(&self) -> (usize, usize, usize) {
        (self.contents.services.len(), self.contents.backends.len(), self.contents.meta.len())
    }

    /// Entries of the membership map.
    pub fn member_entries(&self) -> usize {
        self.contents.members.len()
    }

    /// The service id programmed for a frontend.
    pub fn service_id(&self, frontend: Frontend) -> Option<u32> {
        self.contents.services.get(&service_key(frontend, 0)).map(|v| v.service_id)
    }

    /// The service id of a programmed frontend (`key0`: slot 0 of scope 0) and the backends
    /// that the socket path gives its clients: those of its scope-1 slots if it has two scopes,
    /// else those of its slots. O(backends of the frontend).
    pub fn frontend_backends(&self, key0: &ServiceKey) -> Option<(u32, BTreeSet<Backend>)> {
        let mut key0 = *key0;
        let mut front = self.contents.services.get(&key0)?;
        if front.flags & SVC_FLAG_TWO_SCOPES != 0 {
            let internal = ServiceKey { scope: SCOPE_INTERNAL, ..key0 };
            if let Some(v) = self.contents.services.get(&internal) {
                (key0, front) = (internal, v);
            }
        }
        let backends = (1..=front.count)
            .filter_map(|slot| self.contents.services.get(&ServiceKey { slot, ..key0 }))
            .filter_map(|s| self.contents.backends.get(&s.backend_id))
            .copied()
            .collect();
        Some((front.service_id, backends))
    }

    #[cfg(test)]
    pub fn contents(&self) -> &MapContents {
        &self.contents
    }

    /// Applies one op to the content and the indexes.
    pub fn apply(&mut self, op: &Op) {
        match op {
            Op::PutBackend(id, b) => {
                if let Some(old) = self.contents.backends.get(id).copied() {
                    self.unindex_backend(*id, old);
                }
                self.index_backend(*id, *b);
                self.next_backend_id = self.next_backend_id.max(id.saturating_add(1));
            }
            Op::DeleteBackend(id) => {
                if let Some(old) = self.contents.backends.get(id).copied() {
                    self.unindex_backend(*id, old);
                }
            }
            Op::PutService(k, v) => {
                match self.contents.services.get(k) {
                    None if k.slot == 0 && k.scope == SCOPE_EXTERNAL => self.frontends += 1,
                    Some(old) if k.slot > 0 => self.unref(old.backend_id),
                    _ => {}
                }
                if k.slot > 0 {
                    *self.backend_refs.entry(v.backend_id).or_default() += 1;
                }
                self.next_service_id = self.next_service_id.max(v.service_id.saturating_add(1));
            }
            Op::DeleteService(k) => match self.contents.services.get(k) {
                Some(_) if k.slot == 0 => self.frontends -= usize::from(k.scope == SCOPE_EXTERNAL),
                Some(old) => self.unref(old.backend_id),
                None => {}
            },
            Op::PutMeta(id, _) => self.next_service_id = self.next_service_id.max(id.saturating_add(1)),
            Op::DeleteMeta(_)
            | Op::PutSourceRange(..)
            | Op::DeleteSourceRange(..)
            | Op::PutMember(..)
            | Op::DeleteMember(..) => {}
        }
        self.contents.apply(op).expect("the in-memory dataplane never fails");
    }

    fn unref(&mut self, id: u32) {
        if let Some(n) = self.backend_refs.get_mut(&id) {
            *n -= 1;
            if *n == 0 {
                self.backend_refs.remove(&id);
            }
        }
    }

    fn index_backend(&mut self, id: u32, b: Backend) {
        match self.ids_by_backend.entry(b) {
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(id);
            }
            std::collections::hash_map::Entry::Occupied(mut e) => {
                *self.extra_ids.entry(b).or_default() += 1;
                let lowest = e.get_mut();
                *lowest = (*lowest).min(id);
            }
        }
    }

    /// O(1), unless the value is held by another id too.
    fn unindex_backend(&mut self, id: u32, old: Backend) {
        let Some(extra) = self.extra_ids.get_mut(&old) else {
            self.ids_by_backend.remove(&old);
            return;
        };
        *extra -= 1;
        if *extra == 0 {
            self.extra_ids.remove(&old);
        }
        if self.ids_by_backend.get(&old) == Some(&id) {
            self.ids_by_backend.remove(&old);
            // Rare (a value the maps held twice): fall back to its other id.
            let other = self.contents.backends.iter().filter(|(i, b)| **i != id && **b == old).map(|(i, _)| *i).min();
            if let Some(other) = other {
                self.ids_by_backend.insert(old, other);
            }
        }
    }

    fn refs(&self, id: u32) -> u32 {
        self.backend_refs.get(&id).copied().unwrap_or(0)
    }
}

/// Hands out ids past every id in use, wrapping around (and skipping ids in use) at u32::MAX.
struct Ids<'a> {
    next: u32,
    in_use: &'a dyn Fn(u32) -> bool,
    taken: HashSet<u32>,
}

impl Ids<'_> {
    fn allocate(&mut self) -> u32 {
        loop {
            let id = self.next;
            self.next = self.next.checked_add(1).unwrap_or(1);
            if id != 0 && !(self.in_use)(id) && self.taken.insert(id) {
                return id;
            }
        }
    }
}

pub fn plan(mirror: &Mirror, desired: &DesiredState, scope: Scope<'_>, limits: &Limits) -> Plan {
    let current = &mirror.contents;
    let targets: BTreeSet<Frontend> = match scope {
        Scope::Frontends(set) => set.clone(),
        Scope::Full => desired
            .keys()
            .copied()
            .chain(current.services.keys().filter(|k| k.slot == 0).map(frontend_of))
            .collect(),
    };
    let backend_in_use = |id: u32| current.backends.contains_key(&id) || mirror.backend_refs.contains_key(&id);
    let mut backend_ids = Ids { next: mirror.next_backend_id, in_use: &backend_in_use, taken: HashSet::new() };
    let service_in_use = |id: u32| current.meta.contains_key(&id);
    let mut service_ids = Ids { next: mirror.next_service_id, in_use: &service_in_use, taken: HashSet::new() };
    let mut new_ids: HashMap<Backend, u32> = HashMap::new();
    // Slot references gained (+) and lost (-) per backend id.
    let mut ref_delta: HashMap<u32, i64> = HashMap::new();

    // Running totals of each map's entries, following the ops in the order they are written,
    // so that no write ever finds its map full: removed frontends go first and free their
    // room (entries of both scopes, metadata, backends nothing else uses) before anything is
    // added; then frontends that do not grow, whose slot deletions come before the growing
    // ones add theirs. Room freed in a plan is thereby reused by the same plan. Only backends
    // that changed frontends stop using, and the internal scope of a frontend that no longer
    // needs one, are freed after everything else: the caller syncs again to use that room
    // (see `crate::sync`).
    let mut n_services = mirror.frontends as u64;
    let mut n_backends = current.backends.len() as u64;
    let mut n_entries = current.services.len() as u64;

    // Writes that free room, before every other write.
    let mut freeing_ops = Vec::new();
    let mut backend_ops = Vec::new();
    let mut meta_ops = Vec::new();
    let mut service_ops = Vec::new();
    let mut removal_ops = Vec::new();
    let mut meta_deletes = Vec::new();
    // Apart from the metadata, so that they reach the kernel as one batch.
    let mut member_ops = Vec::new();
    let mut member_deletes = Vec::new();
    let mut refused = Vec::new();
    // Full scope only: everything that must survive the sweep of stray entries.
    let mut keep_keys: HashSet<ServiceKey> = HashSet::new();
    let mut keep_meta: HashSet<u32> = HashSet::new();
    let mut keep_members: HashSet<MemberKey> = HashSet::new();

    let (removed, kept): (Vec<Frontend>, Vec<Frontend>) = targets.iter().partition(|f| !desired.contains_key(f));
    // Service ids of the removed frontends: their metadata and ranges go with them.
    let mut removed_ids: HashSet<u32> = HashSet::new();
    for frontend in &removed {
        // The frontend entry first, so readers stop at once; the internal scope after it,
        // when nothing points there any more.
        let key0 = service_key(*frontend, 0);
        let Some(v) = current.services.get(&key0) else { continue };
        removed_ids.insert(v.service_id);
        n_services = n_services.saturating_sub(1);
        for key0 in [key0, ServiceKey { scope: SCOPE_INTERNAL, ..key0 }] {
            let deleted = delete_scope(current, key0, &mut freeing_ops, &mut ref_delta);
            n_entries = n_entries.saturating_sub(deleted);
        }
        for range in current.source_ranges.get(&v.service_id).into_iter().flatten() {
            freeing_ops.push(Op::DeleteSourceRange(v.service_id, *range));
        }
        if current.meta.contains_key(&v.service_id) {
            freeing_ops.push(Op::DeleteMeta(v.service_id));
        }
    }
    // Backends only removed frontends used, and no frontend of this plan wants.
    let mut freed_backends: BTreeSet<u32> = BTreeSet::new();
    if !ref_delta.is_empty() {
        let wanted: HashSet<Backend> = kept
            .iter()
            .flat_map(|f| desired[f].all_backends().map(|a| backend_value(*a, f.protocol)))
            .collect();
        freed_backends = ref_delta
            .iter()
            .filter(|(id, delta)| i64::from(mirror.refs(**id)) + **delta <= 0)
            .filter(|(id, _)| current.backends.get(id).is_some_and(|b| !wanted.contains(b)))
            .map(|(id, _)| *id)
            .collect();
        freeing_ops.extend(freed_backends.iter().copied().map(Op::DeleteBackend));
        n_backends = n_backends.saturating_sub(freed_backends.len() as u64);
    }

    // Frontends that do not grow first: they free slots (or add none) before others add.
    let grows = |f: &Frontend| {
        let want = &desired[f];
        let key0 = service_key(*f, 0);
        let scopes = [(key0, Some(want.backends.len())), (ServiceKey { scope: SCOPE_INTERNAL, ..key0 }, want.internal_backends.as_ref().map(Vec::len))];
        scopes.into_iter().any(|(key0, wanted)| {
            let programmed = current.services.get(&key0).map_or(0, |v| usize::from(v.count) + 1);
            wanted.map_or(0, |n| n + 1) > programmed
        })
    };
    let (steady, growing): (Vec<Frontend>, Vec<Frontend>) = kept.into_iter().partition(|f| !grows(f));
    for frontend in steady.iter().chain(&growing) {
        let key0 = service_key(*frontend, 0);
        let internal_key0 = ServiceKey { scope: SCOPE_INTERNAL, ..key0 };
        let existing = current.services.get(&key0).copied();
        let existing_internal = current.services.get(&internal_key0).copied();
        let want = &desired[frontend];
        let state = if existing.is_some() { "left as programmed" } else { "not programmed" };
        let mut refuse = |reason: RefuseReason, detail: String| {
            refused.push(Refused { frontend: *frontend, name: want.name.clone(), reason, detail });
            if let Some(v) = existing {
                for (key0, v) in [(key0, Some(v)), (internal_key0, existing_internal)] {
                    if let Some(v) = v {
                        keep_keys.insert(key0);
                        for slot in 1..=v.count {
                            let key = ServiceKey { slot, ..key0 };
                            keep_keys.insert(key);
                            if let Some(s) = current.services.get(&key) {
                                keep_members.insert(member_key(&key0, v.service_id, s.backend_id));
                            }
                        }
                    }
                }
                keep_meta.insert(v.service_id);
            }
        };
        // Before anything that costs O(backends): such a frontend may be planned every sync.
        let most = want.backends.len().max(want.internal_backends.as_ref().map_or(0, Vec::len));
        if most > MAX_BACKENDS_PER_FRONTEND {
            refuse(
                RefuseReason::TooManyEndpoints,
                format!(
                    "Service {} ({frontend}) has {most} endpoints, more than the {MAX_BACKENDS_PER_FRONTEND} one service port can hold; {state}",
                    want.name,
                ),
            );
            continue;
        }

        let backends: Vec<Backend> = want.backends.iter().map(|a| backend_value(*a, frontend.protocol)).collect();
        let internal: Option<Vec<Backend>> =
            want.internal_backends.as_ref().map(|list| list.iter().map(|a| backend_value(*a, frontend.protocol)).collect());
        let new_backends: BTreeSet<Backend> = backends
            .iter()
            .chain(internal.iter().flatten())
            .filter(|b| !mirror.ids_by_backend.contains_key(b) && !new_ids.contains_key(b))
            .copied()
            .collect();
        // Services-map keys this frontend adds (all written before its deletions), and deletes.
        let (added_0, deleted_0) = scope_entry_changes(current, key0, Some(backends.len()));
        let (added_1, deleted_1) = scope_entry_changes(current, internal_key0, internal.as_ref().map(Vec::len));
        let (added_entries, deleted_entries) = (added_0 + added_1, deleted_0 + deleted_1);
        let full = if n_services + u64::from(existing.is_none()) > u64::from(limits.max_services) {
            Some(RefuseReason::ServicesFull)
        } else if n_backends + new_backends.len() as u64 > u64::from(limits.max_backends) {
            Some(RefuseReason::BackendsFull)
        } else if n_entries + added_entries > u64::from(limits.max_service_entries) {
            Some(RefuseReason::ServiceEntriesFull)
        } else {
            None
        };
        if let Some(reason) = full {
            refuse(
                reason,
                format!(
                    "maps full ({n_services}/{} services, {n_backends}/{} backends, {n_entries}/{} service entries); {state}",
                    limits.max_services, limits.max_backends, limits.max_service_entries,
                ),
            );
            continue;
        }
        n_services += u64::from(existing.is_none());
        n_backends += new_backends.len() as u64;
        n_entries = (n_entries + added_entries).saturating_sub(deleted_entries);

        for b in &new_backends {
            let id = backend_ids.allocate();
            new_ids.insert(*b, id);
            backend_ops.push(Op::PutBackend(id, *b));
        }
        // A backend entry deleted behind our back is not indexed: it gets a new id above and
        // the slots that named the old one are rewritten below.
        let id_of = |b: &Backend| mirror.ids_by_backend.get(b).or_else(|| new_ids.get(b)).copied().expect("allocated above");
        let ids: Vec<u32> = backends.iter().map(id_of).collect();
        let internal_ids: Option<Vec<u32>> = internal.as_ref().map(|list| list.iter().map(id_of).collect());

        let service_id = existing.map_or_else(|| service_ids.allocate(), |v| v.service_id);
        keep_meta.insert(service_id);
        let meta = service_meta(*frontend, &want.name, want.frontend_type);
        if current.meta.get(&service_id) != Some(&meta) {
            meta_ops.push(Op::PutMeta(service_id, Box::new(meta)));
        }
        // Ranges are in place before the frontend flag that enforces them, and go after it.
        let wanted_ranges: BTreeSet<Cidr> = want.source_ranges.iter().copied().collect();
        let programmed_ranges = current.source_ranges.get(&service_id);
        for range in &wanted_ranges {
            if !programmed_ranges.is_some_and(|p| p.contains(range)) {
                meta_ops.push(Op::PutSourceRange(service_id, *range));
            }
        }
        for range in programmed_ranges.into_iter().flatten().filter(|r| !wanted_ranges.contains(r)) {
            removal_ops.push(Op::DeleteSourceRange(service_id, *range));
        }

        let mut writes = ScopeWrites {
            current,
            ops: &mut service_ops,
            member_ops: &mut member_ops,
            member_deletes: &mut member_deletes,
            ref_delta: &mut ref_delta,
            keep_keys: &mut keep_keys,
            keep_members: &mut keep_members,
        };
        // The internal scope first: complete before the scope-0 flag that makes it reachable.
        let kind_and_affinity = frontend_flags(want) & (FrontendKind::all_flags() | SVC_FLAG_AFFINITY);
        if let Some(ids) = &internal_ids {
            let front = ServiceValue { backend_id: want.affinity_timeout, count: 0, flags: kind_and_affinity, service_id };
            writes.scope(internal_key0, ids, front);
        }
        let two_scopes = if internal_ids.is_some() { SVC_FLAG_TWO_SCOPES } else { 0 };
        let front = ServiceValue { backend_id: want.affinity_timeout, count: 0, flags: frontend_flags(want) | two_scopes, service_id };
        writes.scope(key0, &ids, front);
        if internal_ids.is_none() {
            // No longer two scopes: the internal one goes once the flag is cleared above.
            delete_scope(current, internal_key0, &mut removal_ops, &mut ref_delta);
        }
    }

    let mut stale_backends: BTreeSet<u32> = ref_delta
        .iter()
        .filter(|(id, delta)| **delta < 0 && i64::from(mirror.refs(**id)) + **delta <= 0)
        .map(|(id, _)| *id)
        .filter(|id| current.backends.contains_key(id) && !freed_backends.contains(id))
        .collect();
    if let Scope::Full = scope {
        // Stray entries: slots past a count or without a frontend, scope-1 entries no flag
        // reaches, unreferenced backends and metadata, as left by a crash or a hand edit.
        let deleted: HashSet<ServiceKey> = freeing_ops
            .iter()
            .chain(&removal_ops)
            .chain(&service_ops)
            .filter_map(|op| match op {
                Op::DeleteService(k) => Some(*k),
                _ => None,
            })
            .collect();
        let mut strays: Vec<&ServiceKey> =
            current.services.keys().filter(|k| !keep_keys.contains(k) && !deleted.contains(k)).collect();
        strays.sort_by_key(|k| (k.slot != 0, k.scope, k.address, k.port, k.protocol, k.slot));
        for k in strays {
            if k.slot > 0 {
                *ref_delta.entry(current.services[k].backend_id).or_default() -= 1;
            }
            removal_ops.push(Op::DeleteService(*k));
        }
        stale_backends.extend(
            current
                .backends
                .keys()
                .filter(|id| i64::from(mirror.refs(**id)) + ref_delta.get(id).copied().unwrap_or(0) <= 0)
                .filter(|id| !freed_backends.contains(id)),
        );
        meta_deletes.extend(current.meta.keys().filter(|id| !keep_meta.contains(id) && !removed_ids.contains(id)));
        let mut stray_ranges: Vec<(u32, Cidr)> = current
            .source_ranges
            .iter()
            .filter(|(id, _)| !keep_meta.contains(id) && !removed_ids.contains(id))
            .flat_map(|(id, set)| set.iter().map(move |r| (*id, *r)))
            .filter(|(id, r)| !removal_ops.contains(&Op::DeleteSourceRange(*id, *r)))
            .collect();
        stray_ranges.sort();
        removal_ops.extend(stray_ranges.into_iter().map(|(id, r)| Op::DeleteSourceRange(id, r)));
        let already: HashSet<MemberKey> = freeing_ops
            .iter()
            .chain(&removal_ops)
            .filter_map(|op| match op {
                Op::DeleteMember(k) => Some(*k),
                _ => None,
            })
            .collect();
        member_deletes.extend(current.members.keys().filter(|k| !keep_members.contains(k) && !already.contains(k)));
    }
    meta_deletes.sort_unstable();
    meta_deletes.dedup();
    member_deletes.sort_unstable();
    member_deletes.dedup();

    let mut ops = freeing_ops;
    ops.extend(backend_ops);
    ops.extend(meta_ops);
    ops.extend(member_ops);
    ops.extend(service_ops);
    ops.extend(removal_ops);
    ops.extend(member_deletes.into_iter().map(Op::DeleteMember));
    ops.extend(meta_deletes.into_iter().map(Op::DeleteMeta));
    ops.extend(stale_backends.into_iter().map(Op::DeleteBackend));
    Plan { ops, refused }
}

/// Services-map keys one scope of a frontend (`key0`, its slot 0) adds and deletes when it
/// goes from what is programmed to `wanted` backends: its frontend entry and the slots it
/// lacks, and the slots past the new count. `None` (the scope is not wanted): nothing here,
/// its deletion comes after every addition of the plan.
fn scope_entry_changes(current: &MapContents, key0: ServiceKey, wanted: Option<usize>) -> (u64, u64) {
    let Some(wanted) = wanted else { return (0, 0) };
    let existing = current.services.get(&key0);
    let old_count = existing.map_or(0, |v| usize::from(v.count));
    let slot_present = |slot: usize| {
        u16::try_from(slot).is_ok_and(|slot| current.services.contains_key(&ServiceKey { slot, ..key0 }))
    };
    let added = usize::from(existing.is_none())
        + (1..=wanted.min(old_count)).filter(|s| !slot_present(*s)).count()
        + wanted.saturating_sub(old_count);
    let deleted = (wanted + 1..=old_count).filter(|s| slot_present(*s)).count();
    (added as u64, deleted as u64)
}

/// Where the writes of one frontend's scopes go, and the accounting they update.
struct ScopeWrites<'a> {
    current: &'a MapContents,
    /// Services-map writes.
    ops: &'a mut Vec<Op>,
    /// Membership writes (before every services-map write) and deletions (after them).
    member_ops: &'a mut Vec<Op>,
    member_deletes: &'a mut Vec<MemberKey>,
    /// Slot references gained (+) and lost (-) per backend id.
    ref_delta: &'a mut HashMap<u32, i64>,
    /// Entries that must survive the sweep of a full plan.
    keep_keys: &'a mut HashSet<ServiceKey>,
    keep_members: &'a mut HashSet<MemberKey>,
}

impl ScopeWrites<'_> {
    /// Plans one scope of a frontend (`key0`, its slot 0) to hold the backend `ids` (at most
    /// [`MAX_BACKENDS_PER_FRONTEND`], checked by the caller): changed slots (a backend keeps
    /// its slot while it stays; new ones fill the free slots), then the frontend entry `front`
    /// with the count that makes them reachable, then the slots past the new count.
    fn scope(&mut self, key0: ServiceKey, ids: &[u32], front: ServiceValue) {
        let services = &self.current.services;
        let old_count = services.get(&key0).map_or(0, |v| v.count);
        let old_slots: Vec<Option<u32>> =
            (1..=old_count).map(|slot| services.get(&ServiceKey { slot, ..key0 }).map(|s| s.backend_id)).collect();
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
            self.keep_members.insert(membership);
            if self.current.members.get(&membership) != Some(&where_) {
                self.member_ops.push(Op::PutMember(membership, where_));
            }
            let value = ServiceValue { backend_id, count: 0, flags: 0, service_id: front.service_id };
            self.keep_keys.insert(key);
            let old = services.get(&key);
            if old != Some(&value) {
                if let Some(old) = old {
                    *self.ref_delta.entry(old.backend_id).or_default() -= 1;
                }
                *self.ref_delta.entry(backend_id).or_default() += 1;
                self.ops.push(Op::PutService(key, value));
            }
        }
        let count = u16::try_from(slots.len()).expect("at most MAX_BACKENDS_PER_FRONTEND, checked by the caller");
        let front = ServiceValue { count, ..front };
        self.keep_keys.insert(key0);
        if services.get(&key0) != Some(&front) {
            self.ops.push(Op::PutService(key0, front));
        }
        // Slots count < slot <= the programmed count, in 16 bits (slot 65,535 included).
        for slot in (count..old_count).map(|s| s + 1) {
            let key = ServiceKey { slot, ..key0 };
            if let Some(old) = services.get(&key) {
                *self.ref_delta.entry(old.backend_id).or_default() -= 1;
                self.ops.push(Op::DeleteService(key));
            }
        }
        // Backends no slot of this scope holds any more.
        let kept: HashSet<u32> = ids.iter().copied().collect();
        for backend_id in old_slots.iter().flatten().filter(|id| !kept.contains(id)) {
            let key = member_key(&key0, front.service_id, *backend_id);
            if self.current.members.contains_key(&key) {
                self.member_deletes.push(key);
            }
        }
    }
}

/// The membership entry of `backend_id` in the scope of `key0` of service `service_id`.
fn member_key(key0: &ServiceKey, service_id: u32, backend_id: u32) -> MemberKey {
    MemberKey { service_id, backend_id, scope: key0.scope, _pad: [0; 3] }
}

/// Plans the deletion of one scope of a frontend (`key0`, its slot 0), if programmed: the
/// frontend entry first, so readers stop at once, then its slots, then the membership entries
/// of their backends. Returns how many services-map entries it deletes.
fn delete_scope(current: &MapContents, key0: ServiceKey, ops: &mut Vec<Op>, ref_delta: &mut HashMap<u32, i64>) -> u64 {
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

fn frontend_flags(want: &DesiredService) -> u16 {
    let kind = want.frontend_type.flag();
    let drop_unserved = if want.drop_unserved { SVC_FLAG_DROP_UNSERVED } else { 0 };
    let source_ranges = if want.source_ranges.is_empty() { 0 } else { SVC_FLAG_SOURCE_RANGES };
    let affinity = if want.affinity_timeout > 0 { SVC_FLAG_AFFINITY } else { 0 };
    kind | drop_unserved | source_ranges | affinity
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddrV4;

    use super::*;
    use crate::{
        dataplane::Resolution,
        model::{DesiredService, Protocol},
    };

    /// A full-scope plan against `contents`.
    fn full(contents: &MapContents, want: &DesiredState, limits: &Limits) -> Plan {
        plan(&Mirror::new(contents.clone()), want, Scope::Full, limits)
    }

    const LIMITS: Limits = Limits { max_services: 100, max_backends: 100, max_service_entries: 1000 };

    fn fe(s: &str) -> Frontend {
        let a: SocketAddrV4 = s.parse().unwrap();
        Frontend { address: *a.ip(), port: a.port(), protocol: Protocol::Tcp }
    }

    fn svc(name: &str, backends: &[&str]) -> DesiredService {
        DesiredService {
            name: ServicePortName { namespace: "default".into(), name: name.into(), port_name: "http".into(), protocol: Protocol::Tcp },
            frontend_type: FrontendKind::ClusterIp,
            backends: backends.iter().map(|b| b.parse().unwrap()).collect(),
            internal_backends: None,
            draining: Vec::new(),
            drop_unserved: false,
            source_ranges: Vec::new(),
            affinity_timeout: 0,
        }
    }

    fn apply_plan(maps: &mut MapContents, plan: &Plan) {
        for op in &plan.ops {
            maps.apply(op).unwrap();
        }
    }

    fn desired(list: &[(&str, DesiredService)]) -> DesiredState {
        list.iter().map(|(f, s)| (fe(f), s.clone())).collect()
    }

    /// Applies a plan one op at a time, checking after each op that every frontend in
    /// `stable` resolves, for every random value, to one of its allowed backends.
    fn apply_checked(maps: &mut MapContents, plan: &Plan, stable: &[(&str, Vec<SocketAddrV4>)]) {
        for op in &plan.ops {
            maps.apply(op).unwrap();
            for (f, allowed) in stable {
                for r in 0..12 {
                    match maps.resolve(fe(f), r) {
                        Resolution::Backend(b) => assert!(allowed.contains(&b), "{f} -> {b} after {op:?}"),
                        other => panic!("{f} resolved to {other:?} after {op:?}"),
                    }
                }
            }
        }
    }

    fn spread(maps: &MapContents, f: &str, n: u32) -> std::collections::BTreeMap<String, u32> {
        let mut hits = std::collections::BTreeMap::new();
        for r in 0..n {
            if let Resolution::Backend(b) = maps.resolve(fe(f), r) {
                *hits.entry(b.to_string()).or_insert(0) += 1;
            }
        }
        hits
    }

    #[test]
    fn programs_from_nothing_in_a_safe_order_and_selects_uniformly() {
        let want = desired(&[
            ("10.96.0.10:80", svc("web", &["10.244.1.1:8080", "10.244.1.2:8080", "10.244.1.3:8080"])),
            ("10.96.0.11:80", svc("api", &["10.244.1.1:8080"])),
            ("10.96.0.12:80", svc("empty", &[])),
        ]);
        let p = full(&MapContents::default(), &want, &LIMITS);
        assert!(p.refused.is_empty());
        // A backend shared by two services is written once; backends, metadata and membership
        // come first, and every frontend entry comes after its slots.
        let kinds: Vec<&str> = p
            .ops
            .iter()
            .map(|op| match op {
                Op::PutBackend(..) => "backend",
                Op::PutMeta(..) => "meta",
                Op::PutMember(..) => "member",
                Op::PutService(k, _) if k.slot == 0 => "frontend",
                Op::PutService(..) => "slot",
                _ => "delete",
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "backend", "backend", "backend", "meta", "meta", "meta", "member", "member", "member", "member", "slot", "slot",
                "slot", "frontend", "slot", "frontend", "frontend"
            ]
        );
        let mut maps = MapContents::default();
        for op in &p.ops {
            maps.apply(op).unwrap();
        }
        assert_eq!(maps.backends.len(), 3);
        let hits = spread(&maps, "10.96.0.10:80", 300);
        assert_eq!(hits.values().copied().collect::<Vec<_>>(), [100, 100, 100], "{hits:?}");
        assert_eq!(maps.resolve(fe("10.96.0.12:80"), 7), Resolution::Refused);
        assert_eq!(maps.resolve(fe("10.96.0.13:80"), 7), Resolution::NotAService);
        // Nothing left to do: a second plan is empty.
        assert_eq!(full(&maps, &want, &LIMITS), Plan::default());
    }

    #[test]
    fn removing_a_backend_writes_only_the_difference_and_never_breaks_the_service() {
        let old = ["10.244.1.1:8080", "10.244.1.2:8080", "10.244.1.3:8080"];
        let mut maps = MapContents::default();
        for op in full(&maps, &desired(&[("10.96.0.10:80", svc("web", &old))]), &LIMITS).ops {
            maps.apply(&op).unwrap();
        }
        let new = ["10.244.1.1:8080", "10.244.1.3:8080"];
        let p = full(&maps, &desired(&[("10.96.0.10:80", svc("web", &new))]), &LIMITS);
        // Slot 2 takes the backend from slot 3 (its membership entry first), the count drops,
        // slot 3, then the removed backend's membership entry and the backend go.
        assert_eq!(p.ops.len(), 6, "{:#?}", p.ops);
        assert!(matches!(p.ops[0], Op::PutMember(_, MemberValue { slot: 2, .. })), "{:#?}", p.ops);
        assert!(matches!(p.ops[4], Op::DeleteMember(_)), "{:#?}", p.ops);
        assert!(matches!(p.ops[5], Op::DeleteBackend(_)));
        let allowed: Vec<SocketAddrV4> = old.iter().map(|a| a.parse().unwrap()).collect();
        apply_checked(&mut maps, &p, &[("10.96.0.10:80", allowed)]);
        let hits = spread(&maps, "10.96.0.10:80", 100);
        assert_eq!(hits.keys().cloned().collect::<Vec<_>>(), new);
        assert_eq!(maps.backends.len(), 2);
    }

    /// Flows that remember (slot, backend), as tc conntrack and the affinities do: when one
    /// backend of ten leaves and the last one moves into its slot, only the flows of the one
    /// that left change backend, after every single write of the plan and at its end.
    #[test]
    fn a_backend_that_leaves_moves_only_its_own_flows() {
        let all: Vec<String> = (1..=10).map(|i| format!("10.244.1.{i}:8080")).collect();
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        let mut maps = MapContents::default();
        let p = full(&maps, &desired(&[("10.96.0.10:80", svc("web", &refs))]), &LIMITS);
        apply_plan(&mut maps, &p);
        let web = fe("10.96.0.10:80");
        let mut flows: Vec<(u16, u32)> = (0..1000u32).map(|r| maps.resolve_flow(web, None, r.wrapping_mul(2_654_435_761)).unwrap()).collect();
        let addr = |maps: &MapContents, id: u32| crate::dataplane::backend_addr(&maps.backends[&id]).to_string();
        let before: Vec<String> = flows.iter().map(|(_, id)| addr(&maps, *id)).collect();
        let leaving = "10.244.1.3:8080";
        let rest: Vec<&str> = refs.iter().copied().filter(|b| *b != leaving).collect();
        let p = full(&maps, &desired(&[("10.96.0.10:80", svc("web", &rest))]), &LIMITS);
        for (step, op) in p.ops.iter().enumerate() {
            maps.apply(op).unwrap();
            for (i, flow) in flows.iter_mut().enumerate() {
                let next = maps.resolve_flow(web, Some(*flow), 7 * i as u32 + step as u32).expect("still served");
                if before[i] != leaving {
                    assert_eq!(addr(&maps, next.1), before[i], "flow {i} of a staying backend moved after {op:?}");
                }
                *flow = next;
            }
        }
        let moved = flows.iter().zip(&before).filter(|((_, id), b)| addr(&maps, *id) != **b).count();
        let of_leaving = before.iter().filter(|b| *b == leaving).count();
        assert_eq!(moved, of_leaving, "exactly the flows of the backend that left moved");
        assert!(of_leaving > 50, "{of_leaving} of 1000 flows on the leaving backend");
        assert!(flows.iter().all(|(_, id)| addr(&maps, *id) != leaving));
        // The moved backend's flows remember its new slot.
        assert!(flows.iter().all(|(slot, id)| maps.services[&service_key(web, *slot)].backend_id == *id));
    }

    #[test]
    fn adding_backends_keeps_existing_slots() {
        let mut maps = MapContents::default();
        for op in full(&maps, &desired(&[("10.96.0.10:80", svc("web", &["10.244.1.5:80"]))]), &LIMITS).ops {
            maps.apply(&op).unwrap();
        }
        let before = maps.services.clone();
        let want = desired(&[("10.96.0.10:80", svc("web", &["10.244.1.1:80", "10.244.1.5:80"]))]);
        let p = full(&maps, &want, &LIMITS);
        apply_checked(&mut maps, &p, &[("10.96.0.10:80", vec!["10.244.1.1:80".parse().unwrap(), "10.244.1.5:80".parse().unwrap()])]);
        let slot1 = service_key(fe("10.96.0.10:80"), 1);
        assert_eq!(maps.services[&slot1], before[&slot1], "existing backend moved");
        assert_eq!(p.ops.len(), 4, "{:#?}", p.ops); // new backend, its membership, new slot 2, count
    }

    #[test]
    fn removed_service_goes_frontend_first_and_its_id_is_not_reused_at_once() {
        let mut maps = MapContents::default();
        for op in full(&maps, &desired(&[("10.96.0.10:80", svc("a", &["10.244.1.1:80"]))]), &LIMITS).ops {
            maps.apply(&op).unwrap();
        }
        let old_id = maps.services[&service_key(fe("10.96.0.10:80"), 0)].service_id;
        let p = full(&maps, &desired(&[("10.96.0.20:80", svc("b", &["10.244.1.1:80"]))]), &LIMITS);
        let first_delete = p.ops.iter().position(|op| matches!(op, Op::DeleteService(_))).unwrap();
        assert!(matches!(p.ops[first_delete], Op::DeleteService(k) if k.slot == 0));
        for op in &p.ops {
            maps.apply(op).unwrap();
        }
        let new_id = maps.services[&service_key(fe("10.96.0.20:80"), 0)].service_id;
        assert_ne!(old_id, new_id);
        assert_eq!(maps.meta.len(), 1);
        assert_eq!(maps.backends.len(), 1, "the shared backend stays");
        assert_eq!(maps.resolve(fe("10.96.0.10:80"), 0), Resolution::NotAService);
    }

    #[test]
    fn adopts_state_written_by_another_agent_and_repairs_drift() {
        let want = desired(&[("10.96.0.10:80", svc("web", &["10.244.1.1:80", "10.244.1.2:80"]))]);
        // Another agent used other ids.
        let mut maps = MapContents::default();
        for op in full(&maps, &want, &LIMITS).ops {
            let op = match op {
                Op::PutBackend(id, b) => Op::PutBackend(id + 40, b),
                Op::PutService(k, v) if k.slot > 0 => Op::PutService(k, ServiceValue { backend_id: v.backend_id + 40, service_id: 7, ..v }),
                Op::PutService(k, v) => Op::PutService(k, ServiceValue { service_id: 7, ..v }),
                Op::PutMeta(_, m) => Op::PutMeta(7, m),
                Op::PutMember(k, v) => Op::PutMember(MemberKey { service_id: 7, backend_id: k.backend_id + 40, ..k }, v),
                other => other,
            };
            maps.apply(&op).unwrap();
        }
        assert_eq!(full(&maps, &want, &LIMITS), Plan::default(), "adoption must not rewrite anything");
        // Drift: a slot and the metadata deleted by hand, stray entries added.
        maps.services.remove(&service_key(fe("10.96.0.10:80"), 2));
        maps.meta.clear();
        maps.services.insert(service_key(fe("10.96.0.99:80"), 3), ServiceValue::default());
        maps.members.insert(MemberKey { service_id: 99, backend_id: 41, ..Default::default() }, MemberValue { slot: 1, _pad: 0 });
        let p = full(&maps, &want, &LIMITS);
        assert_eq!(p.ops.len(), 4, "{:#?}", p.ops);
        for op in &p.ops {
            maps.apply(op).unwrap();
        }
        assert_eq!(full(&maps, &want, &LIMITS), Plan::default());
        assert_eq!(spread(&maps, "10.96.0.10:80", 10).len(), 2);
    }

    #[test]
    fn full_maps_refuse_new_services_and_keep_live_ones() {
        let limits = Limits { max_services: 2, max_backends: 3, max_service_entries: 100 };
        let mut maps = MapContents::default();
        let first = desired(&[("10.96.0.1:80", svc("a", &["10.244.0.1:80", "10.244.0.2:80"]))]);
        for op in full(&maps, &first, &limits).ops {
            maps.apply(&op).unwrap();
        }
        let want = desired(&[
            ("10.96.0.1:80", svc("a", &["10.244.0.1:80", "10.244.0.2:80", "10.244.0.3:80", "10.244.0.4:80"])),
            ("10.96.0.2:80", svc("b", &["10.244.0.1:80"])),
            ("10.96.0.3:80", svc("c", &["10.244.0.1:80"])),
        ]);
        let p = full(&maps, &want, &limits);
        let refused: Vec<String> = p.refused.iter().map(|r| r.name.name.clone()).collect();
        assert_eq!(refused, ["a", "c"], "a grows past max_backends, c past max_services");
        assert_eq!(p.refused.iter().map(|r| r.reason).collect::<Vec<_>>(), [RefuseReason::BackendsFull, RefuseReason::ServicesFull]);
        assert!(p.refused[0].detail.contains("left as programmed"), "{}", p.refused[0].detail);
        for op in &p.ops {
            maps.apply(op).unwrap();
        }
        assert_eq!(spread(&maps, "10.96.0.1:80", 10).len(), 2, "a keeps its programming");
        assert!(matches!(maps.resolve(fe("10.96.0.2:80"), 0), Resolution::Backend(_)));
        assert_eq!(maps.resolve(fe("10.96.0.3:80"), 0), Resolution::NotAService);
    }

    #[test]
    fn source_ranges_are_in_place_before_the_flag_that_enforces_them_and_go_after_it() {
        let range = |s: &str| -> Cidr { s.parse().unwrap() };
        let mut lb = svc("lb", &["10.244.1.10:8080"]);
        lb.frontend_type = FrontendKind::LoadBalancer;
        lb.source_ranges = vec![range("192.168.0.0/16"), range("10.0.0.0/8")];
        let mut maps = MapContents::default();
        let p = full(&maps, &desired(&[("203.0.113.10:80", lb.clone())]), &LIMITS);
        let position = |p: &Plan, f: &dyn Fn(&Op) -> bool| p.ops.iter().position(|op| f(op)).expect("op in plan");
        let front = |op: &Op| matches!(op, Op::PutService(k, v) if k.slot == 0 && v.flags & SVC_FLAG_SOURCE_RANGES != 0);
        let first_range = position(&p, &|op| matches!(op, Op::PutSourceRange(..)));
        assert!(first_range < position(&p, &front), "{:?}", p.ops);
        assert_eq!(p.ops.iter().filter(|op| matches!(op, Op::PutSourceRange(..))).count(), 2);
        apply_plan(&mut maps, &p);
        let id = maps.services.values().next().unwrap().service_id;
        assert_eq!(maps.source_ranges[&id].len(), 2);

        // One range goes: deleted after the frontend is rewritten; unchanged ranges untouched.
        lb.source_ranges = vec![range("10.0.0.0/8")];
        let p = full(&maps, &desired(&[("203.0.113.10:80", lb.clone())]), &LIMITS);
        assert_eq!(p.ops, vec![Op::DeleteSourceRange(id, range("192.168.0.0/16"))]);
        apply_plan(&mut maps, &p);

        // No ranges left: the flag is cleared first, then the last range is deleted.
        lb.source_ranges.clear();
        let p = full(&maps, &desired(&[("203.0.113.10:80", lb.clone())]), &LIMITS);
        let cleared = |op: &Op| matches!(op, Op::PutService(k, v) if k.slot == 0 && v.flags & SVC_FLAG_SOURCE_RANGES == 0);
        assert!(position(&p, &cleared) < position(&p, &|op| matches!(op, Op::DeleteSourceRange(..))), "{:?}", p.ops);
        apply_plan(&mut maps, &p);
        assert!(maps.source_ranges.is_empty());

        // A removed frontend takes its ranges along; a stray range is swept by a full sync.
        lb.source_ranges = vec![range("10.0.0.0/8")];
        let p = full(&maps, &desired(&[("203.0.113.10:80", lb)]), &LIMITS);
        apply_plan(&mut maps, &p);
        maps.source_ranges.entry(999).or_default().insert(range("1.2.3.0/24"));
        let p = full(&maps, &DesiredState::new(), &LIMITS);
        apply_plan(&mut maps, &p);
        assert_eq!(maps, MapContents::default());
    }

}

#[cfg(test)]
mod scope_tests {
    use std::net::{Ipv4Addr, SocketAddrV4};

    use super::*;
    use crate::model::{DesiredService, Protocol};

    const LIMITS: Limits = Limits { max_services: 1000, max_backends: 1000, max_service_entries: 10_000 };

    fn svc(i: u32, backends: impl IntoIterator<Item = u32>) -> (Frontend, DesiredService) {
        let f = Frontend { address: Ipv4Addr::from(0x0a60_0000 + i), port: 80, protocol: Protocol::Tcp };
        let name = ServicePortName { namespace: "ns".into(), name: format!("s{i}"), port_name: String::new(), protocol: Protocol::Tcp };
        let backends = backends.into_iter().map(|b| SocketAddrV4::new(Ipv4Addr::from(0x0af4_0000 + b), 8080)).collect();
        (f, DesiredService { name, frontend_type: FrontendKind::ClusterIp, backends, internal_backends: None, draining: Vec::new(), drop_unserved: false, source_ranges: Vec::new(), affinity_timeout: 0 })
    }

    /// Applies a plan to a mirror and returns it.
    fn run(mut mirror: Mirror, want: &DesiredState, scope: Scope<'_>) -> Mirror {
        for op in plan(&mirror, want, scope, &LIMITS).ops {
            mirror.apply(&op);
        }
        mirror
    }

    #[test]
    fn plans_of_changed_frontends_reach_the_same_state_as_full_plans() {
        // 20 services over 30 shared backends, then a series of edits: each applied with a
        // scoped plan must leave the maps serving exactly what a full plan would, and a full
        // plan afterwards must find nothing to do.
        let mut want: DesiredState = (0..20).map(|i| svc(i, (i..i + 5).map(|b| b % 30))).collect();
        let mut mirror = run(Mirror::default(), &want, Scope::Full);
        let edits: Vec<Box<dyn Fn(&mut DesiredState) -> BTreeSet<Frontend>>> = vec![
            Box::new(|w| { let (f, s) = svc(3, [1, 2]); w.insert(f, s); [f].into() }),
            Box::new(|w| { let (f, _) = svc(4, []); w.remove(&f); [f].into() }),
            Box::new(|w| { let (f, s) = svc(25, [29, 31, 32]); w.insert(f, s); [f].into() }),
            Box::new(|w| { let (f, s) = svc(5, []); w.insert(f, s); [f].into() }),
            Box::new(|w| {
                let (a, sa) = svc(6, [40]);
                let (b, _) = svc(7, []);
                w.insert(a, sa);
                w.remove(&b);
                [a, b].into()
            }),
        ];
        for edit in edits {
            let dirty = edit(&mut want);
            mirror = run(mirror, &want, Scope::Frontends(&dirty));
            let fresh = run(Mirror::default(), &want, Scope::Full);
            let view = |m: &Mirror| {
                m.contents().frontends().into_iter().map(|mut p| { p.backends.sort(); (p.frontend, p.name, p.backends) }).collect::<Vec<_>>()
            };
            assert_eq!(view(&mirror), view(&fresh));
            assert_eq!(mirror.contents().backends.len(), fresh.contents().backends.len(), "stale backends left");
            assert_eq!(mirror.contents().meta.len(), fresh.contents().meta.len(), "stale metadata left");
            assert_eq!(plan(&mirror, &want, Scope::Full, &LIMITS), Plan::default());
            // The indexes stay equal to a rebuild from the content.
            let rebuilt = Mirror::new(mirror.contents().clone());
            assert_eq!(rebuilt.ids_by_backend, mirror.ids_by_backend);
            assert_eq!(rebuilt.extra_ids, mirror.extra_ids);
            assert_eq!(rebuilt.backend_refs, mirror.backend_refs);
            assert_eq!(rebuilt.frontends, mirror.frontends);
        }
    }
}

/// Frontends with two scopes (`externalTrafficPolicy: Local` short circuit): write order,
/// what each origin resolves to, capacity.
#[cfg(test)]
mod two_scope_tests {
    use std::net::SocketAddrV4;

    use kproxy_common::lb::SVC_FLAG_NODE_PORT;

    use super::*;
    use crate::{
        dataplane::{Origin, Resolution},
        model::{DesiredService, Protocol},
    };

    const LIMITS: Limits = Limits { max_services: 100, max_backends: 100, max_service_entries: 1000 };
    const NODE_PORT: &str = "192.168.50.2:30080";
    const LOCAL: &[&str] = &["10.244.1.1:8080"];
    const CLUSTER: &[&str] = &["10.244.1.1:8080", "10.244.2.1:8080", "10.244.3.1:8080"];

    fn fe(s: &str) -> Frontend {
        let a: SocketAddrV4 = s.parse().unwrap();
        Frontend { address: *a.ip(), port: a.port(), protocol: Protocol::Tcp }
    }

    fn addrs(list: &[&str]) -> Vec<SocketAddrV4> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    /// A NodePort frontend: `backends` for clients from outside, `internal` for those inside.
    fn node_port(backends: &[&str], internal: Option<&[&str]>) -> DesiredState {
        let svc = DesiredService {
            name: ServicePortName { namespace: "default".into(), name: "np".into(), port_name: String::new(), protocol: Protocol::Tcp },
            frontend_type: FrontendKind::NodePort,
            backends: addrs(backends),
            internal_backends: internal.map(addrs),
            draining: Vec::new(),
            drop_unserved: backends.is_empty(),
            source_ranges: Vec::new(),
            affinity_timeout: 0,
        };
        [(fe(NODE_PORT), svc)].into_iter().collect()
    }

    fn full(maps: &MapContents, want: &DesiredState, limits: &Limits) -> Plan {
        plan(&Mirror::new(maps.clone()), want, Scope::Full, limits)
    }

    /// Applies `plan` one op at a time; after each, a new connection from either origin must
    /// find no frontend (only if `may_vanish`) or one of that origin's `allowed` backends
    /// (`None`: dropped or refused is fine too).
    fn apply_checked(maps: &mut MapContents, plan: &Plan, may_vanish: bool, allowed: &[(Origin, Option<Vec<SocketAddrV4>>)]) {
        let mut mirror = Mirror::new(maps.clone());
        for op in &plan.ops {
            maps.apply(op).unwrap();
            mirror.apply(op);
            for (origin, allowed) in allowed {
                for r in 0..12 {
                    match (maps.resolve_from(*origin, fe(NODE_PORT), r), allowed) {
                        (Resolution::NotAService, _) if may_vanish => {}
                        (Resolution::Refused, None) => {}
                        (Resolution::Backend(b), Some(list)) if list.contains(&b) => {}
                        (Resolution::Backend(_), None) => {}
                        (other, _) => panic!("{origin:?} resolved to {other:?} after {op:?}"),
                    }
                }
            }
        }
        // The indexes kept by applying ops equal a rebuild from the content, and scope-1
        // frontend entries count as no service.
        let rebuilt = Mirror::new(maps.clone());
        assert_eq!((mirror.frontends, &mirror.backend_refs), (rebuilt.frontends, &rebuilt.backend_refs));
        assert_eq!(rebuilt.frontends, maps.services.keys().filter(|k| k.slot == 0 && k.scope == SCOPE_EXTERNAL).count());
    }

    fn spread(maps: &MapContents, origin: Origin, n: u32) -> std::collections::BTreeMap<String, u32> {
        let mut hits = std::collections::BTreeMap::new();
        for r in 0..n {
            if let Resolution::Backend(b) = maps.resolve_from(origin, fe(NODE_PORT), r) {
                *hits.entry(b.to_string()).or_insert(0) += 1;
            }
        }
        hits
    }

    fn kind(op: &Op) -> &'static str {
        match op {
            Op::PutBackend(..) => "backend",
            Op::PutMeta(..) => "meta",
            Op::PutService(k, _) if k.scope == SCOPE_INTERNAL && k.slot == 0 => "internal frontend",
            Op::PutService(k, _) if k.scope == SCOPE_INTERNAL => "internal slot",
            Op::PutService(k, _) if k.slot == 0 => "frontend",
            Op::PutService(..) => "slot",
            Op::DeleteService(k) if k.scope == SCOPE_INTERNAL && k.slot == 0 => "-internal frontend",
            Op::DeleteService(k) if k.scope == SCOPE_INTERNAL => "-internal slot",
            Op::DeleteService(k) if k.slot == 0 => "-frontend",
            Op::DeleteService(..) => "-slot",
            Op::DeleteBackend(..) => "-backend",
            Op::DeleteMeta(..) => "-meta",
            Op::PutMember(k, _) if k.scope == SCOPE_INTERNAL => "internal member",
            Op::PutMember(..) => "member",
            Op::DeleteMember(k) if k.scope == SCOPE_INTERNAL => "-internal member",
            Op::DeleteMember(..) => "-member",
            _ => "other",
        }
    }

    #[test]
    fn the_internal_scope_is_written_before_the_flag_that_reaches_it_and_deleted_after_it() {
        let both = [(Origin::InCluster, Some(addrs(CLUSTER))), (Origin::Outside, Some(addrs(LOCAL)))];
        let mut maps = MapContents::default();
        let p = full(&maps, &node_port(LOCAL, Some(CLUSTER)), &LIMITS);
        let kinds: Vec<&str> = p.ops.iter().map(kind).collect();
        assert_eq!(
            kinds,
            [
                "backend", "backend", "backend", "meta", "internal member", "internal member", "internal member", "member",
                "internal slot", "internal slot", "internal slot", "internal frontend", "slot", "frontend"
            ]
        );
        let flags = |maps: &MapContents, scope: u8| maps.services[&ServiceKey { scope, ..service_key(fe(NODE_PORT), 0) }].flags;
        apply_checked(&mut maps, &p, true, &both);
        assert_eq!(flags(&maps, SCOPE_EXTERNAL), SVC_FLAG_NODE_PORT | SVC_FLAG_TWO_SCOPES);
        assert_eq!(flags(&maps, SCOPE_INTERNAL), SVC_FLAG_NODE_PORT);
        let ids: BTreeSet<u32> = maps.services.values().map(|v| v.service_id).collect();
        assert_eq!(ids.len(), 1, "both scopes share the service id (affinity, reverse translation)");
        // In-cluster clients are spread over every endpoint, outside ones get the local one.
        assert_eq!(spread(&maps, Origin::InCluster, 300).values().copied().collect::<Vec<_>>(), [100, 100, 100]);
        assert_eq!(spread(&maps, Origin::Outside, 300).keys().cloned().collect::<Vec<_>>(), LOCAL);
        assert_eq!(full(&maps, &node_port(LOCAL, Some(CLUSTER)), &LIMITS), Plan::default(), "nothing left to do");

        // A remote endpoint leaves: only the internal scope changes, its count before its slot.
        let fewer = ["10.244.1.1:8080", "10.244.3.1:8080"];
        let p = full(&maps, &node_port(LOCAL, Some(&fewer)), &LIMITS);
        let kinds: Vec<&str> = p.ops.iter().map(kind).collect();
        assert_eq!(kinds, ["internal member", "internal slot", "internal frontend", "-internal slot", "-internal member", "-backend"]);
        apply_checked(&mut maps, &p, false, &both);
        assert_eq!(spread(&maps, Origin::InCluster, 100).keys().cloned().collect::<Vec<_>>(), fewer);

        // externalTrafficPolicy turns Cluster: one set for all; the flag is cleared before the
        // internal scope goes.
        let p = full(&maps, &node_port(&fewer, None), &LIMITS);
        let kinds: Vec<&str> = p.ops.iter().map(kind).collect();
        assert_eq!(
            kinds,
            ["member", "slot", "frontend", "-internal frontend", "-internal slot", "-internal slot", "-internal member", "-internal member"]
        );
        apply_checked(&mut maps, &p, false, &[(Origin::InCluster, Some(addrs(&fewer))), (Origin::Outside, Some(addrs(&fewer)))]);
        assert_eq!(flags(&maps, SCOPE_EXTERNAL), SVC_FLAG_NODE_PORT);
        assert!(maps.services.keys().all(|k| k.scope == SCOPE_EXTERNAL));

        // Back to Local with no local endpoint (dropped from outside), then the Service goes:
        // the scope-0 frontend first, the internal scope after every scope-0 entry.
        let p = full(&maps, &node_port(&[], Some(&fewer)), &LIMITS);
        apply_checked(&mut maps, &p, false, &[(Origin::InCluster, Some(addrs(&fewer))), (Origin::Outside, None)]);
        assert_eq!(maps.resolve_from(Origin::Outside, fe(NODE_PORT), 0), Resolution::Refused, "dropped by tc (flag)");
        assert_eq!(flags(&maps, SCOPE_EXTERNAL), SVC_FLAG_NODE_PORT | SVC_FLAG_TWO_SCOPES | SVC_FLAG_DROP_UNSERVED);
        let p = full(&maps, &DesiredState::new(), &LIMITS);
        let kinds: Vec<&str> = p.ops.iter().map(kind).collect();
        assert_eq!(
            kinds,
            ["-frontend", "-internal frontend", "-internal slot", "-internal slot", "-internal member", "-internal member", "-meta", "-backend", "-backend"]
        );
        apply_checked(&mut maps, &p, true, &both);
        assert_eq!(maps, MapContents::default());
    }

    #[test]
    fn both_scopes_count_against_the_service_entries_but_one_service() {
        // 2 entries in scope 0 (frontend + 1 slot) and 4 in scope 1 (frontend + 3 slots).
        let want = node_port(LOCAL, Some(CLUSTER));
        let tight = Limits { max_services: 1, max_backends: 3, max_service_entries: 5 };
        let p = full(&MapContents::default(), &want, &tight);
        assert_eq!(p.refused.len(), 1, "6 entries do not fit in 5");
        assert!(p.ops.is_empty(), "{:?}", p.ops);
        let exact = Limits { max_service_entries: 6, ..tight };
        let p = full(&MapContents::default(), &want, &exact);
        assert!(p.refused.is_empty(), "one service, 3 backends, 6 entries fit: {:?}", p.refused);
        let mut maps = MapContents::default();
        apply_checked(&mut maps, &p, true, &[(Origin::InCluster, Some(addrs(CLUSTER)))]);
        assert_eq!(Mirror::new(maps.clone()).frontends, 1);
        // Growing the internal scope past the entries left is refused; the programming stays.
        let more = ["10.244.1.1:8080", "10.244.2.1:8080", "10.244.3.1:8080", "10.244.4.1:8080"];
        let p = full(&maps, &node_port(LOCAL, Some(&more)), &Limits { max_backends: 10, ..exact });
        assert_eq!(p.refused.len(), 1);
        assert_eq!(p.refused[0].reason, RefuseReason::ServiceEntriesFull);
        assert!(p.refused[0].detail.contains("left as programmed"), "{}", p.refused[0].detail);
        assert!(p.ops.is_empty(), "a full sweep keeps both scopes of a refused frontend: {:?}", p.ops);
    }

    #[test]
    fn the_internal_scope_keeps_session_affinity_under_the_same_service_id() {
        let mut want = node_port(LOCAL, Some(CLUSTER));
        want.values_mut().for_each(|s| s.affinity_timeout = 60);
        let mut maps = MapContents::default();
        let p = full(&maps, &want, &LIMITS);
        apply_checked(&mut maps, &p, true, &[]);
        let key0 = service_key(fe(NODE_PORT), 0);
        let (outside, inside) = (maps.services[&key0], maps.services[&ServiceKey { scope: SCOPE_INTERNAL, ..key0 }]);
        // The kernel keys affinity by (client, service id): both paths find the same timeout
        // there, and reverse translation finds the frontend by that id in the metadata map.
        assert_eq!((inside.flags, inside.backend_id), (SVC_FLAG_NODE_PORT | SVC_FLAG_AFFINITY, 60));
        assert_eq!(outside.flags & SVC_FLAG_AFFINITY, SVC_FLAG_AFFINITY);
        assert_eq!(inside.service_id, outside.service_id);
        assert!(maps.meta.contains_key(&inside.service_id));
    }

    #[test]
    fn a_full_sync_sweeps_internal_entries_no_flag_reaches() {
        let mut maps = MapContents::default();
        let want = node_port(CLUSTER, None);
        for op in &full(&maps, &want, &LIMITS).ops {
            maps.apply(op).unwrap();
        }
        let key0 = service_key(fe(NODE_PORT), 0);
        let front = maps.services[&key0];
        maps.services.insert(ServiceKey { scope: SCOPE_INTERNAL, ..key0 }, ServiceValue { count: 1, ..front });
        maps.services.insert(ServiceKey { scope: SCOPE_INTERNAL, slot: 1, ..key0 }, maps.services[&ServiceKey { slot: 1, ..key0 }]);
        let p = full(&maps, &want, &LIMITS);
        let kinds: Vec<&str> = p.ops.iter().map(kind).collect();
        assert_eq!(kinds, ["-internal frontend", "-internal slot"]);
        // A changed-frontends plan removes them too.
        let scope: BTreeSet<Frontend> = [fe(NODE_PORT)].into();
        assert_eq!(plan(&Mirror::new(maps.clone()), &want, Scope::Frontends(&scope), &LIMITS).ops, p.ops);
    }
}


#[cfg(test)]
mod capacity_tests {
    use std::net::{Ipv4Addr, SocketAddrV4};

    use super::*;
    use crate::{
        dataplane::Resolution,
        model::{DesiredService, Protocol},
    };

    /// Frontend 10.96.0.`i`:80 of Service `s<i>` with backends 10.244.x.y:8080 numbered `b`.
    fn svc(i: u8, backends: impl IntoIterator<Item = u32>) -> (Frontend, DesiredService) {
        let f = Frontend { address: Ipv4Addr::new(10, 96, 0, i), port: 80, protocol: Protocol::Tcp };
        let name = ServicePortName { namespace: "ns".into(), name: format!("s{i}"), port_name: "http".into(), protocol: Protocol::Tcp };
        let backends = backends.into_iter().map(|b| SocketAddrV4::new(Ipv4Addr::from(0x0af4_0000 + b), 8080)).collect();
        (f, DesiredService { name, frontend_type: FrontendKind::ClusterIp, backends, internal_backends: None, draining: Vec::new(), drop_unserved: false, source_ranges: Vec::new(), affinity_timeout: 0 })
    }

    /// Applies a plan op by op, checking after each that no map holds more than its limit
    /// (the kernel's maps refuse a new key then, and the sync fails).
    fn apply_within(mirror: &mut Mirror, plan: &Plan, limits: &Limits) {
        for op in &plan.ops {
            mirror.apply(op);
            let c = mirror.contents();
            assert!(mirror.frontends <= limits.max_services as usize, "{} frontends after {op:?}", mirror.frontends);
            assert!(c.meta.len() <= limits.max_services as usize, "{} metadata entries after {op:?}", c.meta.len());
            assert!(c.backends.len() <= limits.max_backends as usize, "{} backends after {op:?}", c.backends.len());
            assert!(c.services.len() <= limits.max_service_entries as usize, "{} service entries after {op:?}", c.services.len());
        }
    }

    fn programmed(limits: &Limits, want: &DesiredState) -> Mirror {
        let mut mirror = Mirror::default();
        let p = plan(&mirror, want, Scope::Full, limits);
        assert!(p.refused.is_empty(), "{:?}", p.refused);
        apply_within(&mut mirror, &p, limits);
        mirror
    }

    fn served(mirror: &Mirror, f: Frontend) -> BTreeSet<SocketAddrV4> {
        (0..64)
            .map(|r| match mirror.contents().resolve(f, r) {
                Resolution::Backend(b) => b,
                other => panic!("{f} resolves to {other:?}"),
            })
            .collect()
    }

    #[test]
    fn room_a_removed_frontend_frees_is_reused_by_the_same_plan() {
        // Every map full: s1 [1, 2], s2 [3] (2 frontends, 3 backends, 5 service entries).
        let limits = Limits { max_services: 2, max_backends: 3, max_service_entries: 5 };
        let before: DesiredState = [svc(1, [1, 2]), svc(2, [3])].into_iter().collect();
        let mirror = programmed(&limits, &before);
        // s1 goes, s3 comes with s1's backend 1 (kept, not rewritten) and a new one, 4, which
        // fits only because s1's backend 2 goes first.
        let (s3, want3) = svc(3, [1, 4]);
        let after: DesiredState = [svc(2, [3]), (s3, want3.clone())].into_iter().collect();
        for scope in [Scope::Full, Scope::Frontends(&[svc(1, []).0, s3].into())] {
            let mut m = mirror.clone();
            let p = plan(&m, &after, scope, &limits);
            assert!(p.refused.is_empty(), "{scope:?}: refused {:?}", p.refused);
            apply_within(&mut m, &p, &limits);
            assert_eq!(served(&m, s3), want3.backends.iter().copied().collect(), "{scope:?}");
            assert_eq!(m.contents().resolve(svc(1, []).0, 0), Resolution::NotAService);
            assert_eq!(m.contents().backends.len(), 3, "{scope:?}: backends 1, 3 and 4");
            assert_eq!(plan(&m, &after, Scope::Full, &limits), Plan::default(), "{scope:?}: not converged");
        }
    }

    #[test]
    fn room_a_shrinking_frontend_frees_is_reused_by_a_growing_one_in_the_same_plan() {
        // s2 [1, 2, 3] and s3 [4] fill 6 service entries; s1 sorts first and grows while s2
        // shrinks by as much: the shrinking one is written first.
        let limits = Limits { max_services: 3, max_backends: 10, max_service_entries: 8 };
        let before: DesiredState = [svc(1, [5]), svc(2, [1, 2, 3]), svc(3, [4])].into_iter().collect();
        let mut mirror = programmed(&limits, &before);
        let (s1, want1) = svc(1, [5, 1]);
        let after: DesiredState = [(s1, want1.clone()), svc(2, [1, 2]), svc(3, [4])].into_iter().collect();
        let changed: BTreeSet<Frontend> = [s1, svc(2, []).0].into();
        let p = plan(&mirror, &after, Scope::Frontends(&changed), &limits);
        assert!(p.refused.is_empty(), "refused {:?}", p.refused);
        apply_within(&mut mirror, &p, &limits);
        assert_eq!(served(&mirror, s1), want1.backends.iter().copied().collect());
        assert_eq!(plan(&mirror, &after, Scope::Full, &limits), Plan::default());
    }

    #[test]
    fn a_frontend_with_more_endpoints_than_a_slot_index_can_number_is_refused_never_cut_short() {
        const MAX: u32 = MAX_BACKENDS_PER_FRONTEND as u32;
        assert_eq!(MAX, 65_535);
        let limits = Limits { max_services: 10, max_backends: 200_000, max_service_entries: 400_000 };
        // 65,535 endpoints: every one has its slot, the last one 65,535.
        let (f1, want1) = svc(1, 0..MAX);
        let mut mirror = programmed(&limits, &[(f1, want1.clone())].into_iter().collect());
        let front = mirror.contents().services[&service_key(f1, 0)];
        assert_eq!(front.count, u16::MAX);
        let last = mirror.contents().services[&service_key(f1, u16::MAX)];
        assert_eq!(mirror.contents().backends[&last.backend_id], backend_value(want1.backends[65_534], Protocol::Tcp));
        assert_eq!(mirror.contents().frontends()[0].backends.len(), 65_535);
        assert_eq!(plan(&mirror, &[(f1, want1.clone())].into_iter().collect(), Scope::Full, &limits), Plan::default(), "not converged");

        // 65,536: refused with an error naming it, the count and the limit; not programmed.
        let (f2, want2) = svc(2, 100_000..100_000 + MAX + 1);
        let mut want: DesiredState = [(f1, want1.clone()), (f2, want2)].into_iter().collect();
        let p = plan(&mirror, &want, Scope::Frontends(&[f2].into()), &limits);
        assert_eq!(p.ops, []);
        let [r] = &p.refused[..] else { panic!("{:?}", p.refused) };
        assert_eq!((r.frontend, r.reason), (f2, RefuseReason::TooManyEndpoints));
        for part in ["ns/s2", "http", "10.96.0.2:80", "65536 endpoints", "65535"] {
            assert!(r.detail.contains(part), "{part:?} not in {:?}", r.detail);
        }

        // A programmed frontend that grows past the limit keeps what it had, whole.
        want.insert(f1, svc(1, 0..MAX + 1).1);
        let p = plan(&mirror, &want, Scope::Full, &limits);
        assert_eq!(p.refused.iter().map(|r| (r.frontend, r.reason)).collect::<Vec<_>>(), [(f1, RefuseReason::TooManyEndpoints), (f2, RefuseReason::TooManyEndpoints)]);
        assert!(p.refused[0].detail.contains("left as programmed"), "{}", p.refused[0].detail);
        apply_within(&mut mirror, &p, &limits);
        assert_eq!(mirror.contents().services[&service_key(f1, 0)].count, u16::MAX);
        assert_eq!(mirror.contents().frontends()[0].backends, want1.backends);
    }

    #[test]
    fn a_backend_value_held_under_two_ids_stays_indexed_until_both_go() {
        let b = backend_value("10.244.0.1:80".parse().unwrap(), Protocol::Tcp);
        let other = backend_value("10.244.0.2:80".parse().unwrap(), Protocol::Tcp);
        let mut contents = MapContents::default();
        contents.backends.extend([(3, b), (7, b), (9, other)]);
        let mut mirror = Mirror::new(contents);
        assert_eq!(mirror.ids_by_backend[&b], 3);
        for (op, expected) in [(Op::DeleteBackend(3), Some(7)), (Op::PutBackend(2, b), Some(2)), (Op::DeleteBackend(2), Some(7)), (Op::DeleteBackend(7), None)] {
            mirror.apply(&op);
            assert_eq!(mirror.ids_by_backend.get(&b).copied(), expected, "after {op:?}");
            let rebuilt = Mirror::new(mirror.contents().clone());
            assert_eq!((&rebuilt.ids_by_backend, &rebuilt.extra_ids), (&mirror.ids_by_backend, &mirror.extra_ids), "after {op:?}");
        }
        assert_eq!(mirror.ids_by_backend.get(&other), Some(&9));
    }
}
