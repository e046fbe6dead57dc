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

#[cfg(test)]
mod tests {
    use std::net::SocketAddrV4;

    use super::*;
    use crate::{
        dataplane::{Dataplane as _, Resolution},
        model::{DesiredService, Protocol},
    };

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
        let p = plan(&MapContents::default(), &want, &LIMITS);
        assert!(p.refused.is_empty());
        // A backend shared by two services is written once; backends and metadata come first,
        // and every frontend entry comes after its slots.
        let kinds: Vec<&str> = p
            .ops
            .iter()
            .map(|op| match op {
                Op::PutBackend(..) => "backend",
                Op::PutMeta(..) => "meta",
                Op::PutService(k, _) if k.slot == 0 => "frontend",
                Op::PutService(..) => "slot",
                _ => "delete",
            })
            .collect();
        assert_eq!(
            kinds,
            ["backend", "backend", "backend", "meta", "meta", "meta", "slot", "slot", "slot", "frontend", "slot", "frontend", "frontend"]
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
        assert_eq!(plan(&maps, &want, &LIMITS), Plan::default());
    }

    #[test]
    fn removing_a_backend_writes_only_the_difference_and_never_breaks_the_service() {
        let old = ["10.244.1.1:8080", "10.244.1.2:8080", "10.244.1.3:8080"];
        let mut maps = MapContents::default();
        for op in plan(&maps.clone(), &desired(&[("10.96.0.10:80", svc("web", &old))]), &LIMITS).ops {
            maps.apply(&op).unwrap();
        }
        let new = ["10.244.1.1:8080", "10.244.1.3:8080"];
        let p = plan(&maps, &desired(&[("10.96.0.10:80", svc("web", &new))]), &LIMITS);
        // Slot 2 takes the backend from slot 3, the count drops, slot 3 and the backend go.
        assert_eq!(p.ops.len(), 4, "{:#?}", p.ops);
        assert!(matches!(p.ops[3], Op::DeleteBackend(_)));
        let allowed: Vec<SocketAddrV4> = old.iter().map(|a| a.parse().unwrap()).collect();
        apply_checked(&mut maps, &p, &[("10.96.0.10:80", allowed)]);
        let hits = spread(&maps, "10.96.0.10:80", 100);
        assert_eq!(hits.keys().cloned().collect::<Vec<_>>(), new);
        assert_eq!(maps.backends.len(), 2);
    }

    #[test]
    fn adding_backends_keeps_existing_slots() {
        let mut maps = MapContents::default();
        for op in plan(&maps.clone(), &desired(&[("10.96.0.10:80", svc("web", &["10.244.1.5:80"]))]), &LIMITS).ops {
            maps.apply(&op).unwrap();
        }
        let before = maps.services.clone();
        let want = desired(&[("10.96.0.10:80", svc("web", &["10.244.1.1:80", "10.244.1.5:80"]))]);
        let p = plan(&maps, &want, &LIMITS);
        apply_checked(&mut maps, &p, &[("10.96.0.10:80", vec!["10.244.1.1:80".parse().unwrap(), "10.244.1.5:80".parse().unwrap()])]);
        let slot1 = service_key(fe("10.96.0.10:80"), 1);
        assert_eq!(maps.services[&slot1], before[&slot1], "existing backend moved");
        assert_eq!(p.ops.len(), 3, "{:#?}", p.ops); // new backend, new slot 2, count
    }

    #[test]
    fn removed_service_goes_frontend_first_and_its_id_is_not_reused_at_once() {
        let mut maps = MapContents::default();
        for op in plan(&maps.clone(), &desired(&[("10.96.0.10:80", svc("a", &["10.244.1.1:80"]))]), &LIMITS).ops {
            maps.apply(&op).unwrap();
        }
        let old_id = maps.services[&service_key(fe("10.96.0.10:80"), 0)].service_id;
        let p = plan(&maps, &desired(&[("10.96.0.20:80", svc("b", &["10.244.1.1:80"]))]), &LIMITS);
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
        for op in plan(&maps.clone(), &want, &LIMITS).ops {
            let op = match op {
                Op::PutBackend(id, b) => Op::PutBackend(id + 40, b),
                Op::PutService(k, v) if k.slot > 0 => Op::PutService(k, ServiceValue { backend_id: v.backend_id + 40, service_id: 7, ..v }),
                Op::PutService(k, v) => Op::PutService(k, ServiceValue { service_id: 7, ..v }),
                Op::PutMeta(_, m) => Op::PutMeta(7, m),
                other => other,
            };
            maps.apply(&op).unwrap();
        }
        assert_eq!(plan(&maps, &want, &LIMITS), Plan::default(), "adoption must not rewrite anything");
        // Drift: a slot and the metadata deleted by hand, a stray entry added.
        maps.services.remove(&service_key(fe("10.96.0.10:80"), 2));
        maps.meta.clear();
        maps.services.insert(service_key(fe("10.96.0.99:80"), 3), ServiceValue::default());
        let p = plan(&maps, &want, &LIMITS);
        assert_eq!(p.ops.len(), 3, "{:#?}", p.ops);
        for op in &p.ops {
            maps.apply(op).unwrap();
        }
        assert_eq!(plan(&maps, &want, &LIMITS), Plan::default());
        assert_eq!(spread(&maps, "10.96.0.10:80", 10).len(), 2);
    }

    #[test]
    fn full_maps_refuse_new_services_and_keep_live_ones() {
        let limits = Limits { max_services: 2, max_backends: 3, max_service_entries: 100 };
        let mut maps = MapContents::default();
        let first = desired(&[("10.96.0.1:80", svc("a", &["10.244.0.1:80", "10.244.0.2:80"]))]);
        for op in plan(&maps.clone(), &first, &limits).ops {
            maps.apply(&op).unwrap();
        }
        let want = desired(&[
            ("10.96.0.1:80", svc("a", &["10.244.0.1:80", "10.244.0.2:80", "10.244.0.3:80", "10.244.0.4:80"])),
            ("10.96.0.2:80", svc("b", &["10.244.0.1:80"])),
            ("10.96.0.3:80", svc("c", &["10.244.0.1:80"])),
        ]);
        let p = plan(&maps, &want, &limits);
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
}
