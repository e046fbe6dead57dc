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
//!
//! The parts, in the order [`plan`] runs them: `removal` (the frontends nobody wants any more
//! and the backends only they used), `frontend` (each wanted frontend: refusal, room, backends,
//! metadata and source ranges) with `scope` (the entries of one scope), `sweep` (stray entries
//! of a full plan, and backends no slot references any more), and `assembly` (the phases above
//! put in order). [`Mirror`] (`mirror`) is the programmed state they read.


mod assembly;
mod frontend;
mod mirror;
mod removal;
mod scope;
mod sweep;

#[cfg(test)]
mod capacity_tests;
#[cfg(test)]
mod scope_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod two_scope_tests;

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    sync::Arc,
};

use kproxy_common::lb::{Backend, MemberKey, ServiceKey};

pub use self::mirror::Mirror;
use self::assembly::Phases;
use super::{frontend_of, MapContents, Op};
use crate::model::{DesiredState, Frontend, ServicePortName};

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
    pub name: Arc<ServicePortName>,
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

/// Plans the writes that take the maps from `mirror` to `desired`, for the frontends of `scope`,
/// within `limits` (see the module doc for the order).
pub fn plan(mirror: &Mirror, desired: &DesiredState, scope: Scope<'_>, limits: &Limits) -> Plan {
    let targets: BTreeSet<Frontend> = match scope {
        Scope::Frontends(set) => set.clone(),
        Scope::Full => desired
            .keys()
            .copied()
            .chain(mirror.contents.services.keys().filter(|k| k.slot == 0).map(frontend_of))
            .collect(),
    };
    let (removed, kept): (Vec<Frontend>, Vec<Frontend>) = targets.iter().partition(|f| !desired.contains_key(f));
    let mut planner = Planner::new(mirror, desired, limits);
    planner.remove_frontends(&removed);
    planner.free_backends(&kept);
    // Frontends that do not grow first: they free slots (or add none) before others add.
    let (steady, growing): (Vec<Frontend>, Vec<Frontend>) = kept.into_iter().partition(|f| !planner.grows(f));
    for frontend in steady.iter().chain(&growing) {
        planner.plan_frontend(*frontend);
    }
    planner.collect_stale_backends();
    if let Scope::Full = scope {
        planner.sweep();
    }
    Plan { ops: planner.ops.assemble(), refused: planner.refused }
}

/// One plan in the making: what it reads, the ids it hands out, its accounting, and its writes
/// by phase.
struct Planner<'a> {
    mirror: &'a Mirror,
    current: &'a MapContents,
    desired: &'a DesiredState,
    limits: &'a Limits,
    backend_ids: Ids,
    service_ids: Ids,
    /// Ids of the backends this plan adds.
    new_ids: HashMap<Backend, u32>,
    /// Slot references gained (+) and lost (-) per backend id.
    ref_delta: HashMap<u32, i64>,
    room: Room,
    ops: Phases,
    refused: Vec<Refused>,
    /// Full scope only: everything that must survive the sweep of stray entries.
    keep: Keep,
    /// Service ids of the removed frontends: their metadata and ranges go with them.
    removed_ids: HashSet<u32>,
    /// Backends only removed frontends used, deleted with them (phase 1).
    freed_backends: BTreeSet<u32>,
}

/// Running totals of each map's entries, following the ops in the order they are written,
/// so that no write ever finds its map full: removed frontends go first and free their
/// room (entries of both scopes, metadata, backends nothing else uses) before anything is
/// added; then frontends that do not grow, whose slot deletions come before the growing
/// ones add theirs. Room freed in a plan is thereby reused by the same plan. Only backends
/// that changed frontends stop using, and the internal scope of a frontend that no longer
/// needs one, are freed after everything else: the caller syncs again to use that room
/// (see `crate::sync`).
struct Room {
    /// Frontends (scope-0 frontend entries).
    services: u64,
    backends: u64,
    /// Entries of the services map.
    entries: u64,
}

/// What a full plan's sweep must leave in place.
#[derive(Default)]
struct Keep {
    keys: HashSet<ServiceKey>,
    meta: HashSet<u32>,
    members: HashSet<MemberKey>,
}

impl<'a> Planner<'a> {
    fn new(mirror: &'a Mirror, desired: &'a DesiredState, limits: &'a Limits) -> Self {
        let current = &mirror.contents;
        Planner {
            mirror,
            current,
            desired,
            limits,
            backend_ids: Ids { next: mirror.next_backend_id, taken: HashSet::new() },
            service_ids: Ids { next: mirror.next_service_id, taken: HashSet::new() },
            new_ids: HashMap::new(),
            ref_delta: HashMap::new(),
            room: Room {
                services: mirror.frontends as u64,
                backends: current.backends.len() as u64,
                entries: current.services.len() as u64,
            },
            ops: Phases::default(),
            refused: Vec::new(),
            keep: Keep::default(),
            removed_ids: HashSet::new(),
            freed_backends: BTreeSet::new(),
        }
    }

    /// A backend id no entry of the maps uses and this plan has not handed out.
    fn new_backend_id(&mut self) -> u32 {
        let (current, mirror) = (self.current, self.mirror);
        self.backend_ids.allocate(|id| current.backends.contains_key(&id) || mirror.backend_refs.contains_key(&id))
    }

    /// A service id no metadata entry uses and this plan has not handed out.
    fn new_service_id(&mut self) -> u32 {
        let mirror = self.mirror;
        self.service_ids.allocate(|id| mirror.has_meta(id))
    }
}

/// Hands out ids past every id in use, wrapping around (and skipping ids in use) at u32::MAX.
struct Ids {
    next: u32,
    taken: HashSet<u32>,
}

impl Ids {
    fn allocate(&mut self, in_use: impl Fn(u32) -> bool) -> u32 {
        loop {
            let id = self.next;
            self.next = self.next.checked_add(1).unwrap_or(1);
            if id != 0 && !in_use(id) && self.taken.insert(id) {
                return id;
            }
        }
    }
}
