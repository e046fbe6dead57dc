//! Planning a sync: the ordered writes that take the maps from their current content to the
//! desired state. Pure: no kernel, no clock.
//!
//! Only differences are written, in an order that keeps every intermediate state valid for a
//! reader in the kernel:
//! 1. new backends, then service metadata, new source ranges and membership entries (which
//!    slot holds which backend: written before the slot, see `kproxy_common::lb::MEMBERS_MAP`);
//! 2. per frontend: changed backend slots, then the frontend entry (slot 0, with the count that
//!    makes the slots reachable), then slots beyond the new count;
//! 3. removed frontends (slot 0 first, so readers stop at once), then their slots, source
//!    ranges no longer wanted, stray entries, the membership entries of backends no slot holds
//!    any more, and metadata;
//! 4. backends that no slot references any more.
//!
//! A plan covers a [`Scope`]: the frontends that changed (a sync after events costs O(changes))
//! or everything (start-up and periodic full syncs, which also remove stray entries).
//! Backends are shared: one id per (address, port, protocol), whatever the number of services
//! that use it. Ids already in the maps are kept, so a restarted agent adopts them; new ids
//! come from a cursor past every id in use, so a plan never reuses an id it frees.

use std::collections::{BTreeSet, HashMap, HashSet};

use kproxy_common::lb::{
    Backend, MemberKey, MemberValue, ServiceKey, ServiceValue, SVC_FLAG_AFFINITY, SVC_FLAG_CLUSTER_IP, SVC_FLAG_DROP_UNSERVED,
    SVC_FLAG_EXTERNAL_IP, SVC_FLAG_LOAD_BALANCER, SVC_FLAG_NODE_PORT, SVC_FLAG_SOURCE_RANGES,
};

use super::{backend_value, frontend_of, service_key, service_meta, Dataplane as _, MapContents, Op};
use crate::model::{Cidr, DesiredService, DesiredState, Frontend, ServicePortName, ServiceType};

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

/// The programmed state: the maps' content and the indexes planning needs, kept current as
/// ops are applied, so planning a change never scans the maps.
#[derive(Clone, Debug, Default)]
pub struct Mirror {
    contents: MapContents,
    /// The id of each backend value (the lowest, should the maps hold a value twice).
    ids_by_backend: HashMap<Backend, u32>,
    /// How many slots name each backend id.
    backend_refs: HashMap<u32, u32>,
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
            m.ids_by_backend.entry(b).or_insert(id);
            m.next_backend_id = m.next_backend_id.max(id.saturating_add(1));
        }
        for (k, v) in &contents.services {
            if k.slot == 0 {
                m.frontends += 1;
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

    /// The service id of a programmed frontend (`key0`, slot 0) and the backends its slots
    /// name. O(backends of the frontend).
    /// The service id programmed for a frontend.
    pub fn service_id(&self, frontend: Frontend) -> Option<u32> {
        self.contents.services.get(&service_key(frontend, 0)).map(|v| v.service_id)
    }

    pub fn frontend_backends(&self, key0: &ServiceKey) -> Option<(u32, BTreeSet<Backend>)> {
        let front = self.contents.services.get(key0)?;
        let backends = (1..=front.count)
            .filter_map(|slot| self.contents.services.get(&ServiceKey { slot, ..*key0 }))
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
                let e = self.ids_by_backend.entry(*b).or_insert(*id);
                *e = (*e).min(*id);
                self.next_backend_id = self.next_backend_id.max(id.saturating_add(1));
            }
            Op::DeleteBackend(id) => {
                if let Some(old) = self.contents.backends.get(id).copied() {
                    self.unindex_backend(*id, old);
                }
            }
            Op::PutService(k, v) => {
                match self.contents.services.get(k) {
                    None if k.slot == 0 => self.frontends += 1,
                    Some(old) if k.slot > 0 => self.unref(old.backend_id),
                    _ => {}
                }
                if k.slot > 0 {
                    *self.backend_refs.entry(v.backend_id).or_default() += 1;
                }
                self.next_service_id = self.next_service_id.max(v.service_id.saturating_add(1));
            }
            Op::DeleteService(k) => match self.contents.services.get(k) {
                Some(_) if k.slot == 0 => self.frontends -= 1,
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

    fn unindex_backend(&mut self, id: u32, old: Backend) {
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

    // Running totals, never decreased within one plan: deletions come last, so the peak is
    // what was there plus what is added.
    let mut n_services = mirror.frontends as u64;
    let mut n_backends = current.backends.len() as u64;
    let mut n_entries = current.services.len() as u64;

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
    let member = |key0: &ServiceKey, service_id: u32, backend_id: u32| MemberKey { service_id, backend_id, scope: key0.scope, _pad: [0; 3] };

    for frontend in &targets {
        let key0 = service_key(*frontend, 0);
        let existing = current.services.get(&key0).copied();
        let old_slots: Vec<Option<u32>> = existing.map_or_else(Vec::new, |v| {
            (1..=v.count).map(|slot| current.services.get(&ServiceKey { slot, ..key0 }).map(|s| s.backend_id)).collect()
        });
        let Some(want) = desired.get(frontend) else {
            // Removed: the frontend entry first, so readers stop at once.
            if let Some(v) = existing {
                removal_ops.push(Op::DeleteService(key0));
                for slot in 1..=v.count {
                    let key = ServiceKey { slot, ..key0 };
                    if let Some(s) = current.services.get(&key) {
                        *ref_delta.entry(s.backend_id).or_default() -= 1;
                        removal_ops.push(Op::DeleteService(key));
                    }
                }
                for backend_id in old_slots.iter().flatten() {
                    let key = member(&key0, v.service_id, *backend_id);
                    if current.members.contains_key(&key) {
                        member_deletes.push(key);
                    }
                }
                if current.meta.contains_key(&v.service_id) {
                    meta_deletes.push(v.service_id);
                }
                for range in current.source_ranges.get(&v.service_id).into_iter().flatten() {
                    removal_ops.push(Op::DeleteSourceRange(v.service_id, *range));
                }
            }
            continue;
        };

        let backends: Vec<Backend> = want.backends.iter().map(|a| backend_value(*a, frontend.protocol)).collect();
        let new_backends: BTreeSet<Backend> = backends
            .iter()
            .filter(|b| !mirror.ids_by_backend.contains_key(b) && !new_ids.contains_key(b))
            .copied()
            .collect();
        let old_count = old_slots.len();
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
            if let Some(v) = existing {
                keep_keys.insert(key0);
                keep_keys.extend((1..=v.count).map(|slot| ServiceKey { slot, ..key0 }));
                keep_meta.insert(v.service_id);
                keep_members.extend(old_slots.iter().flatten().map(|id| member(&key0, v.service_id, *id)));
            }
            continue;
        }
        n_services += u64::from(existing.is_none());
        n_backends += new_backends.len() as u64;
        n_entries += added_entries as u64;

        for b in &new_backends {
            let id = backend_ids.allocate();
            new_ids.insert(*b, id);
            backend_ops.push(Op::PutBackend(id, *b));
        }
        // A backend entry deleted behind our back is not indexed: it gets a new id above and
        // the slots that named the old one are rewritten below.
        let ids: Vec<u32> = backends
            .iter()
            .map(|b| mirror.ids_by_backend.get(b).or_else(|| new_ids.get(b)).copied().expect("allocated above"))
            .collect();

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

        // Backends keep their slot when they stay; new ones fill the free slots.
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

        for (i, backend_id) in slots.iter().enumerate() {
            let backend_id = backend_id.expect("every slot is filled: as many ids as slots");
            let key = ServiceKey { slot: i as u16 + 1, ..key0 };
            let membership = member(&key0, service_id, backend_id);
            let where_ = MemberValue { slot: key.slot, _pad: 0 };
            keep_members.insert(membership);
            if current.members.get(&membership) != Some(&where_) {
                member_ops.push(Op::PutMember(membership, where_));
            }
            let value = ServiceValue { backend_id, count: 0, flags: 0, service_id };
            keep_keys.insert(key);
            let old = current.services.get(&key);
            if old != Some(&value) {
                if let Some(old) = old {
                    *ref_delta.entry(old.backend_id).or_default() -= 1;
                }
                *ref_delta.entry(backend_id).or_default() += 1;
                service_ops.push(Op::PutService(key, value));
            }
        }
        let front = ServiceValue {
            backend_id: want.affinity_timeout,
            count: slots.len() as u16,
            flags: frontend_flags(want),
            service_id,
        };
        keep_keys.insert(key0);
        if existing != Some(front) {
            service_ops.push(Op::PutService(key0, front));
        }
        for slot in slots.len() + 1..=old_count {
            let key = ServiceKey { slot: slot as u16, ..key0 };
            if let Some(old) = current.services.get(&key) {
                *ref_delta.entry(old.backend_id).or_default() -= 1;
                service_ops.push(Op::DeleteService(key));
            }
        }
        // Backends no slot of this frontend holds any more.
        let kept: HashSet<u32> = if old_slots.is_empty() { HashSet::new() } else { ids.iter().copied().collect() };
        for backend_id in old_slots.iter().flatten().filter(|id| !kept.contains(id)) {
            let key = member(&key0, service_id, *backend_id);
            if current.members.contains_key(&key) {
                member_deletes.push(key);
            }
        }
    }

    let mut stale_backends: BTreeSet<u32> = ref_delta
        .iter()
        .filter(|(id, delta)| **delta < 0 && i64::from(mirror.refs(**id)) + **delta <= 0)
        .map(|(id, _)| *id)
        .filter(|id| current.backends.contains_key(id))
        .collect();
    if let Scope::Full = scope {
        // Stray entries: slots past a count or without a frontend, unreferenced backends and
        // metadata, as left by a crash or a hand edit.
        let deleted: HashSet<ServiceKey> = removal_ops
            .iter()
            .chain(&service_ops)
            .filter_map(|op| match op {
                Op::DeleteService(k) => Some(*k),
                _ => None,
            })
            .collect();
        let mut strays: Vec<&ServiceKey> =
            current.services.keys().filter(|k| !keep_keys.contains(k) && !deleted.contains(k)).collect();
        strays.sort_by_key(|k| (k.slot != 0, k.address, k.port, k.protocol, k.slot));
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
                .filter(|id| i64::from(mirror.refs(**id)) + ref_delta.get(id).copied().unwrap_or(0) <= 0),
        );
        meta_deletes.extend(current.meta.keys().filter(|id| !keep_meta.contains(id)));
        let mut stray_ranges: Vec<(u32, Cidr)> = current
            .source_ranges
            .iter()
            .filter(|(id, _)| !keep_meta.contains(id))
            .flat_map(|(id, set)| set.iter().map(move |r| (*id, *r)))
            .filter(|(id, r)| !removal_ops.contains(&Op::DeleteSourceRange(*id, *r)))
            .collect();
        stray_ranges.sort();
        removal_ops.extend(stray_ranges.into_iter().map(|(id, r)| Op::DeleteSourceRange(id, r)));
        member_deletes.extend(current.members.keys().filter(|k| !keep_members.contains(k)));
    }
    meta_deletes.sort_unstable();
    meta_deletes.dedup();
    member_deletes.sort_unstable();
    member_deletes.dedup();

    let mut ops = backend_ops;
    ops.extend(meta_ops);
    ops.extend(member_ops);
    ops.extend(service_ops);
    ops.extend(removal_ops);
    ops.extend(member_deletes.into_iter().map(Op::DeleteMember));
    ops.extend(meta_deletes.into_iter().map(Op::DeleteMeta));
    ops.extend(stale_backends.into_iter().map(Op::DeleteBackend));
    Plan { ops, refused }
}

fn frontend_flags(want: &DesiredService) -> u16 {
    let kind = match want.frontend_type {
        ServiceType::ClusterIp => SVC_FLAG_CLUSTER_IP,
        ServiceType::NodePort => SVC_FLAG_NODE_PORT,
        ServiceType::ExternalIp => SVC_FLAG_EXTERNAL_IP,
        ServiceType::LoadBalancer => SVC_FLAG_LOAD_BALANCER,
    };
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
            frontend_type: ServiceType::ClusterIp,
            backends: backends.iter().map(|b| b.parse().unwrap()).collect(),
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
        assert!(p.refused[0].reason.contains("left as programmed"), "{}", p.refused[0].reason);
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
        lb.frontend_type = ServiceType::LoadBalancer;
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
        (f, DesiredService { name, frontend_type: ServiceType::ClusterIp, backends, draining: Vec::new(), drop_unserved: false, source_ranges: Vec::new(), affinity_timeout: 0 })
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
            assert_eq!(rebuilt.backend_refs, mirror.backend_refs);
            assert_eq!(rebuilt.frontends, mirror.frontends);
        }
    }
}
