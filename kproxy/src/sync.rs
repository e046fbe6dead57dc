//! Sync: bring the dataplane to the desired state by writing only the difference.

use std::{
    collections::BTreeSet,
    net::SocketAddrV4,
    time::{Duration, Instant},
};

use kproxy_common::{
    lb::{Backend, ServiceKey},
    sock::SockTermKey,
    PROTO_TCP,
};

use crate::{
    dataplane::{
        plan::{plan, Limits, Mirror, Refused, Scope},
        backend_addr, backend_value, frontend_of, Dataplane, DataplaneError, Op,
    },
    model::{DesiredState, Frontend},
};

/// What one sync did.
#[derive(Debug, Default)]
pub struct SyncStats {
    /// Whether the whole state was reconciled (after a re-read of the maps).
    pub full: bool,
    /// Map writes and deletes applied.
    pub ops: usize,
    pub refused: Vec<Refused>,
    pub duration: Duration,
    /// Backends that left a frontend in this sync, with the frontend's service id: sockets
    /// kproxy translated to them for that service are stale (see `crate::sockterm`). UDP: every
    /// backend that left. TCP: only backends of a frontend that is still desired and whose
    /// endpoint is no longer listed at all (a not-ready or terminating endpoint keeps its
    /// connections, as with kube-proxy; so do the connections of a deleted Service).
    pub removed: Vec<SockTermKey>,
}

/// Owns the dataplane and an indexed mirror of what it holds, so a sync of a few changed
/// frontends costs O(changes): no map reads, no scan. The mirror is rebuilt from the maps on
/// the first sync, on every full sync (which repairs drift, such as entries deleted by hand)
/// and after a failed write.
pub struct Syncer<D> {
    dataplane: D,
    mirror: Option<Mirror>,
    limits: Limits,
}

/// What a sync must look at.
#[derive(Clone, Copy, Debug)]
pub enum SyncScope<'a> {
    /// Re-read the maps and reconcile everything.
    Full,
    /// Reconcile these frontends against the mirror.
    Changed(&'a BTreeSet<Frontend>),
}

impl<D: Dataplane> Syncer<D> {
    pub fn new(dataplane: D, limits: Limits) -> Self {
        Self { dataplane, mirror: None, limits }
    }

    /// Entries of the services, backends and metadata maps, as last synced.
    pub fn entries(&self) -> Option<(usize, usize, usize)> {
        self.mirror.as_ref().map(Mirror::entries)
    }

    /// Entries of the membership map, as last synced.
    pub fn member_entries(&self) -> Option<usize> {
        self.mirror.as_ref().map(Mirror::member_entries)
    }

    /// Socket-termination keys for TCP endpoints that stopped being listed while draining
    /// ([`crate::tracker::Changes::unlisted`]), with their frontend's service id as programmed.
    pub fn unlisted_keys(&self, unlisted: &[(Frontend, SocketAddrV4)]) -> Vec<SockTermKey> {
        let Some(mirror) = &self.mirror else { return Vec::new() };
        unlisted
            .iter()
            .filter_map(|(f, a)| {
                let service_id = mirror.service_id(*f)?;
                let b = backend_value(*a, f.protocol);
                Some(SockTermKey { service_id, address: b.address, port: b.port, protocol: b.protocol, _pad: 0 })
            })
            .collect()
    }

    pub fn sync(&mut self, desired: &DesiredState, scope: SyncScope<'_>) -> Result<SyncStats, DataplaneError> {
        let start = Instant::now();
        let (mut mirror, plan_scope) = match (self.mirror.take(), scope) {
            (Some(m), SyncScope::Changed(set)) => (m, Scope::Frontends(set)),
            // No trusted mirror (first sync, or a write failed): a changed sync becomes full.
            _ => (Mirror::new(self.dataplane.read()?), Scope::Full),
        };
        let full = matches!(plan_scope, Scope::Full);
        let plan = plan(&mirror, desired, plan_scope, &self.limits);
        // The backends of every frontend the plan touches, before it is applied.
        let touched: BTreeSet<ServiceKey> = plan
            .ops
            .iter()
            .filter_map(|op| match op {
                Op::PutService(k, _) | Op::DeleteService(k) => Some(ServiceKey { slot: 0, ..*k }),
                _ => None,
            })
            .collect();
        let before: Vec<(ServiceKey, u32, BTreeSet<Backend>)> = touched
            .iter()
            .filter_map(|k| mirror.frontend_backends(k).map(|(id, set)| (*k, id, set)))
            .collect();
        // On error the mirror is dropped (self.mirror stays None): the next sync re-reads.
        self.dataplane.apply_all(&plan.ops)?;
        for op in &plan.ops {
            mirror.apply(op);
        }
        let removed = removed_backends(&mirror, desired, before);
        self.mirror = Some(mirror);
        Ok(SyncStats { full, ops: plan.ops.len(), refused: plan.refused, duration: start.elapsed(), removed })
    }
}

/// The (service, backend) pairs that `before` had and the applied mirror no longer has; see
/// [`SyncStats::removed`] for which TCP backends count.
fn removed_backends(mirror: &Mirror, desired: &DesiredState, before: Vec<(ServiceKey, u32, BTreeSet<Backend>)>) -> Vec<SockTermKey> {
    let mut out = Vec::new();
    for (key0, service_id, old) in before {
        let now = match mirror.frontend_backends(&key0) {
            Some((id, set)) if id == service_id => set,
            _ => BTreeSet::new(),
        };
        let want = desired.get(&frontend_of(&key0));
        for b in old.difference(&now) {
            if b.protocol == PROTO_TCP {
                let listed = want.map(|w| w.draining.contains(&backend_addr(b)));
                if listed != Some(false) {
                    continue; // frontend gone (Service deleted) or endpoint still listed
                }
            }
            out.push(SockTermKey { service_id, address: b.address, port: b.port, protocol: b.protocol, _pad: 0 });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddrV4};

    use kproxy_common::PROTO_UDP;

    use super::*;
    use crate::{
        dataplane::MapContents,
        model::{DesiredService, Protocol, ServicePortName, ServiceType},
    };

    const LIMITS: Limits = Limits { max_services: 100, max_backends: 100, max_service_entries: 1000 };

    fn frontend(protocol: Protocol) -> Frontend {
        Frontend { address: Ipv4Addr::new(10, 96, 0, 7), port: 53, protocol }
    }

    fn addr(last: u8) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, last), 5353)
    }

    fn desired(protocol: Protocol, backends: &[u8], draining: &[u8]) -> DesiredState {
        let name = ServicePortName { namespace: "default".into(), name: "s".into(), port_name: "p".into(), protocol };
        let svc = DesiredService {
            name,
            frontend_type: ServiceType::ClusterIp,
            backends: backends.iter().map(|b| addr(*b)).collect(),
            draining: draining.iter().map(|b| addr(*b)).collect(),
            drop_unserved: false,
            source_ranges: Vec::new(),
            affinity_timeout: 0,
        };
        [(frontend(protocol), svc)].into_iter().collect()
    }

    /// The removed (backend last octet, protocol) pairs of each sync, in order.
    fn removed_per_sync(protocol: Protocol, states: &[DesiredState]) -> Vec<Vec<(u8, u8)>> {
        let mut syncer = Syncer::new(MapContents::default(), LIMITS);
        let changed: BTreeSet<Frontend> = [frontend(protocol)].into_iter().collect();
        states
            .iter()
            .map(|d| {
                let stats = syncer.sync(d, SyncScope::Changed(&changed)).unwrap();
                assert!(stats.removed.iter().all(|k| k.service_id == 1), "{:?}", stats.removed);
                stats.removed.iter().map(|k| (k.address[3], k.protocol)).collect()
            })
            .collect()
    }

    #[test]
    fn udp_backends_that_leave_a_frontend_are_removed_whatever_the_reason() {
        let states = [
            desired(Protocol::Udp, &[1, 2], &[]),
            desired(Protocol::Udp, &[2], &[1]), // 1 not ready or terminating
            desired(Protocol::Udp, &[2, 3], &[]),
            DesiredState::new(), // the Service is deleted
        ];
        let got = removed_per_sync(Protocol::Udp, &states);
        assert_eq!(got, vec![vec![], vec![(1, PROTO_UDP)], vec![], vec![(2, PROTO_UDP), (3, PROTO_UDP)]]);
    }

    #[test]
    fn tcp_backends_are_removed_only_when_no_longer_listed_while_the_service_stays() {
        let states = [
            desired(Protocol::Tcp, &[1, 2, 3], &[]),
            desired(Protocol::Tcp, &[2, 3], &[1]), // 1 terminating: its connections drain
            desired(Protocol::Tcp, &[3], &[1]),    // 2 no longer listed: its pod is gone
            DesiredState::new(),                   // the Service is deleted: connections stay
        ];
        let got = removed_per_sync(Protocol::Tcp, &states);
        assert_eq!(got, vec![vec![], vec![], vec![(2, PROTO_TCP)], vec![]]);
    }
}
