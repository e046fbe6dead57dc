//! The programmed state as planning reads it: [`MapContents`] with the indexes that keep
//! planning a change O(change): backend ids by value, slot references per backend id, the
//! number of frontends and the id cursors. Kept current op by op ([`Mirror::apply`]), so a sync
//! never re-reads or scans the maps. The metadata map is kept as digests ([`meta_digest`]): the
//! plan only compares what it would write with what is there, and an entry is 200 bytes.

use std::collections::{BTreeSet, HashMap};

use kproxy_common::lb::{Backend, ServiceKey, ServiceMeta, SCOPE_EXTERNAL, SCOPE_INTERNAL, SVC_FLAG_TWO_SCOPES};

use super::super::{service_key, Dataplane as _, MapContents, Op};
use crate::model::Frontend;

/// The programmed state: the maps' content and the indexes planning needs, kept current as
/// ops are applied, so planning a change never scans the maps.
#[derive(Clone, Debug, Default)]
pub struct Mirror {
    /// The maps' content, but for the metadata map (`meta`, below): `contents.meta` is empty.
    pub(super) contents: MapContents,
    /// The metadata map: the [`meta_digest`] of each entry, by service id.
    pub(super) meta: HashMap<u32, u64>,
    /// The id of each backend value (the lowest, should the maps hold a value twice).
    pub(super) ids_by_backend: HashMap<Backend, u32>,
    /// Values the maps hold under more than one id, with the number of ids beyond the first
    /// (rare: written by hand or by another agent). Only these need a scan when an id goes.
    pub(super) extra_ids: HashMap<Backend, u32>,
    /// How many slots name each backend id.
    pub(super) backend_refs: HashMap<u32, u32>,
    /// Frontend entries of scope 0: one per frontend (scope-1 ones are extra entries of it).
    pub(super) frontends: usize,
    pub(super) next_backend_id: u32,
    pub(super) next_service_id: u32,
}

impl Mirror {
    /// Indexes the content read from the maps. O(entries).
    pub fn new(mut contents: MapContents) -> Self {
        let meta = std::mem::take(&mut contents.meta).into_iter().map(|(id, v)| (id, meta_digest(&v))).collect();
        let mut m = Mirror { meta, next_backend_id: 1, next_service_id: 1, ..Default::default() };
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
        for id in m.meta.keys() {
            m.next_service_id = m.next_service_id.max(id.saturating_add(1));
        }
        m.contents = contents;
        m
    }

    /// Entries of the services, backends and metadata maps.
    pub fn entries(&self) -> (usize, usize, usize) {
        (self.contents.services.len(), self.contents.backends.len(), self.meta.len())
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
            Op::PutMeta(id, meta) => {
                self.meta.insert(*id, meta_digest(meta));
                self.next_service_id = self.next_service_id.max(id.saturating_add(1));
                return;
            }
            Op::DeleteMeta(id) => {
                self.meta.remove(id);
                return;
            }
            Op::PutSourceRange(..)
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

    pub(super) fn refs(&self, id: u32) -> u32 {
        self.backend_refs.get(&id).copied().unwrap_or(0)
    }

    /// Whether the metadata map holds an entry for service id `id`.
    pub(super) fn has_meta(&self, id: u32) -> bool {
        self.meta.contains_key(&id)
    }

    /// Whether the metadata map holds `meta` for service id `id` (by digest).
    pub(super) fn holds_meta(&self, id: u32, meta: &ServiceMeta) -> bool {
        self.meta.get(&id) == Some(&meta_digest(meta))
    }
}

/// A 64-bit digest of a metadata entry (SipHash of its bytes, with fixed keys): two different
/// entries share one with a chance of 2^-64, which would leave a stale name in the metadata
/// map until the entry changes again; 8 bytes per frontend instead of 200.
pub(super) fn meta_digest(meta: &ServiceMeta) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    BuildHasherDefault::<DefaultHasher>::default().hash_one(bytemuck::bytes_of(meta))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{dataplane::backend_value, model::Protocol};

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
