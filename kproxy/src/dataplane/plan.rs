//! Planning a sync: the ordered writes that take the maps from their current content to the
//! desired state. Pure: no kernel, no clock.
//!
//! Only differences are written, in an order that keeps every intermediate state valid for a
//! reader in the kernel:
//! 1. new backends, then service metadata;
//! 2. per frontend: changed backend slots, then the frontend entry (slot 0, with the count that
//!    makes the slots reachable), then slots beyond the new count;
//! 3. removed frontends (slot 0 first, so readers stop at once), then their slots, stray
//!    entries and metadata;
//! 4. backends that no slot references any more.
//!
//! Backends are shared: one id per (address, port, protocol), whatever the number of services
//! that use it. Ids already in the maps are kept, so a restarted agent adopts them; new ids are
//! the lowest ones not in use anywhere in the maps (never an id this plan frees).

use std::collections::{BTreeSet, HashMap, HashSet};

use kproxy_common::lb::{Backend, ServiceKey, ServiceValue, SVC_FLAG_CLUSTER_IP};

use super::{backend_value, service_key, service_meta, MapContents, Op};
use crate::model::{DesiredState, Frontend, ServicePortName, ServiceType};

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

/// A frontend left as it was because the maps are full.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    pub frontend: Frontend,
    pub name: ServicePortName,
    pub reason: String,
}

/// The outcome of planning.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub ops: Vec<Op>,
    pub refused: Vec<Refused>,
}

/// Allocates the lowest ids not in `used`, in increasing order: O(1) amortised per id.
struct IdAllocator {
    used: HashSet<u32>,
    next: u32,
}

impl IdAllocator {
    fn new(used: HashSet<u32>) -> Self {
        Self { used, next: 1 }
    }

    fn allocate(&mut self) -> u32 {
        while self.used.contains(&self.next) {
            self.next += 1;
        }
        self.used.insert(self.next);
        self.next
    }
}

/// A frontend as currently programmed.
struct Current {
    value: ServiceValue,
    /// Backend id per slot 1..=count (`None` where the slot entry is missing).
    slots: Vec<Option<u32>>,
}

pub fn plan(current: &MapContents, desired: &DesiredState, limits: &Limits) -> Plan {
    // What is programmed, per frontend.
    let mut programmed: HashMap<ServiceKey, Current> = HashMap::new();
    for (key, value) in current.services.iter().filter(|(k, _)| k.slot == 0) {
        let slots = (1..=value.count)
            .map(|slot| current.services.get(&ServiceKey { slot, ..*key }).map(|s| s.backend_id))
            .collect();
        programmed.insert(*key, Current { value: *value, slots });
    }
    // One id per backend value: the lowest id wins if a value appears twice.
    let mut ids_by_backend: HashMap<Backend, u32> = HashMap::new();
    let mut sorted_backends: Vec<(&u32, &Backend)> = current.backends.iter().collect();
    sorted_backends.sort();
    for (id, b) in sorted_backends {
        ids_by_backend.entry(*b).or_insert(*id);
    }
    let mut backend_ids = IdAllocator::new(
        current.backends.keys().copied().chain(current.services.values().map(|v| v.backend_id)).collect(),
    );
    let mut service_ids = IdAllocator::new(
        current.meta.keys().copied().chain(current.services.values().map(|v| v.service_id)).collect(),
    );

    // Running totals, never decreased within one plan: deletions come last, so the peak is
    // what was there plus what is added.
    let mut n_services = programmed.len() as u64;
    let mut n_backends = current.backends.len() as u64;
    let mut n_entries = current.services.len() as u64;

    let mut backend_ops = Vec::new();
    let mut meta_ops = Vec::new();
    let mut service_ops = Vec::new();
    let mut refused = Vec::new();
    // Everything that must survive the plan.
    let mut keep_keys: HashSet<ServiceKey> = HashSet::new();
    let mut keep_backends: HashSet<u32> = HashSet::new();
    let mut keep_meta: HashSet<u32> = HashSet::new();

    for (frontend, want) in desired {
        let key0 = service_key(*frontend, 0);
        let existing = programmed.get(&key0);
        let backends: Vec<Backend> =
            want.backends.iter().map(|a| backend_value(*a, frontend.protocol)).collect();
        let new_backends: BTreeSet<Backend> =
            backends.iter().filter(|b| !ids_by_backend.contains_key(b)).copied().collect();
        let old_count = existing.map_or(0, |c| c.slots.len());
        let added_entries = (backends.len() + 1).saturating_sub(old_count + usize::from(existing.is_some()));
        let fits = (n_services + u64::from(existing.is_none()) <= u64::from(limits.max_services))
            && (n_backends + new_backends.len() as u64 <= u64::from(limits.max_backends))
            && (n_entries + added_entries as u64 <= u64::from(limits.max_service_entries));
        if !fits {
            refused.push(Refused {
                frontend: *frontend,
                name: want.name.clone(),
                reason: format!(
                    "maps full ({n_services}/{} services, {n_backends}/{} backends, {n_entries}/{} service entries); {}",
                    limits.max_services,
                    limits.max_backends,
                    limits.max_service_entries,
                    if existing.is_some() { "left as programmed" } else { "not programmed" },
                ),
            });
            if let Some(c) = existing {
                keep_current(&key0, c, &mut keep_keys, &mut keep_backends, &mut keep_meta);
            }
            continue;
        }
        n_services += u64::from(existing.is_none());
        n_backends += new_backends.len() as u64;
        n_entries += added_entries as u64;

        for b in &new_backends {
            let id = backend_ids.allocate();
            ids_by_backend.insert(*b, id);
            backend_ops.push(Op::PutBackend(id, *b));
        }
        let ids: Vec<u32> = backends.iter().map(|b| ids_by_backend[b]).collect();
        // A backend entry deleted behind our back is not in `ids_by_backend`: it gets a new
        // id above and the slots that named the old one are rewritten below.
        keep_backends.extend(ids.iter().copied());

        let service_id = existing.map_or_else(|| service_ids.allocate(), |c| c.value.service_id);
        keep_meta.insert(service_id);
        let meta = service_meta(*frontend, &want.name, want.frontend_type);
        if current.meta.get(&service_id) != Some(&meta) {
            meta_ops.push(Op::PutMeta(service_id, meta));
        }

        // Backends keep their slot when they stay; new ones fill the free slots.
        let old_slots = existing.map_or(&[][..], |c| &c.slots[..]);
        let mut remaining: BTreeSet<u32> = ids.iter().copied().collect();
        let mut slots: Vec<Option<u32>> = vec![None; ids.len()];
        for (slot, old) in slots.iter_mut().zip(old_slots) {
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

        for (i, backend_id) in slots.iter().enumerate() {
            let key = ServiceKey { slot: i as u16 + 1, ..key0 };
            let backend_id = backend_id.expect("every slot is filled: as many ids as slots");
            let value = ServiceValue { backend_id, count: 0, flags: 0, service_id };
            keep_keys.insert(key);
            if current.services.get(&key) != Some(&value) {
                service_ops.push(Op::PutService(key, value));
            }
        }
        let front = ServiceValue { backend_id: 0, count: slots.len() as u16, flags: frontend_flags(want.frontend_type), service_id };
        keep_keys.insert(key0);
        if current.services.get(&key0) != Some(&front) {
            service_ops.push(Op::PutService(key0, front));
        }
        for slot in slots.len() + 1..=old_count {
            service_ops.push(Op::DeleteService(ServiceKey { slot: slot as u16, ..key0 }));
            keep_keys.insert(ServiceKey { slot: slot as u16, ..key0 }); // already handled
        }
    }

    // Removed frontends first (slot 0 before its slots), then any other stray entry.
    let mut removals: Vec<&ServiceKey> = current.services.keys().filter(|k| !keep_keys.contains(k)).collect();
    removals.sort_by_key(|k| (k.slot != 0, k.address, k.port, k.protocol, k.slot));
    service_ops.extend(removals.into_iter().map(|k| Op::DeleteService(*k)));

    let mut stale_meta: Vec<u32> = current.meta.keys().filter(|id| !keep_meta.contains(id)).copied().collect();
    stale_meta.sort_unstable();
    let mut stale_backends: Vec<u32> =
        current.backends.keys().filter(|id| !keep_backends.contains(id)).copied().collect();
    stale_backends.sort_unstable();

    let mut ops = backend_ops;
    ops.extend(meta_ops);
    ops.extend(service_ops);
    ops.extend(stale_meta.into_iter().map(Op::DeleteMeta));
    ops.extend(stale_backends.into_iter().map(Op::DeleteBackend));
    Plan { ops, refused }
}

fn frontend_flags(t: ServiceType) -> u16 {
    match t {
        ServiceType::ClusterIp => SVC_FLAG_CLUSTER_IP,
        ServiceType::NodePort | ServiceType::LoadBalancer => 0,
    }
}

/// Marks a programmed frontend, its slots, backends and metadata as staying.
fn keep_current(
    key0: &ServiceKey,
    c: &Current,
    keys: &mut HashSet<ServiceKey>,
    backends: &mut HashSet<u32>,
    meta: &mut HashSet<u32>,
) {
    keys.insert(*key0);
    meta.insert(c.value.service_id);
    for (i, id) in c.slots.iter().enumerate() {
        keys.insert(ServiceKey { slot: i as u16 + 1, ..*key0 });
        backends.extend(id);
    }
}
