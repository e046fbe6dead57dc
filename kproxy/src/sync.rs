//! Sync: bring the dataplane to the desired state by writing only the difference.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddrV4,
    time::{Duration, Instant},
};

use kproxy_common::{
    lb::{Backend, ServiceKey, SCOPE_EXTERNAL},
    sock::SockTermKey,
    PROTO_TCP,
};

use crate::{
    dataplane::{
        plan::{plan, Limits, Mirror, RefuseReason, Refused, Scope},
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
    /// Every frontend refused now, by this sync or (too many endpoints, unchanged since) earlier.
    pub refused: Vec<Refused>,
    /// Frontends stay refused and this sync freed room it could not use itself (backends that
    /// changed frontends stopped using are deleted last): sync again, soon, to use it.
    pub sync_again: bool,
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
///
/// Frontends refused because the maps were full are remembered and planned again by every
/// sync, so one is programmed by the first sync after room appears (the plan counts the room a
/// removal frees before what it adds), not at the next full sync: a sync costs O(changes +
/// backends of those frontends). A frontend with too many endpoints waits for a change of its
/// own instead (room does not help it), and is reported as refused until then.
pub struct Syncer<D> {
    dataplane: D,
    mirror: Option<Mirror>,
    limits: Limits,
    /// The frontends refused now.
    refused: BTreeMap<Frontend, Refused>,
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
        Self { dataplane, mirror: None, limits, refused: BTreeMap::new() }
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
        let with_refused: BTreeSet<Frontend>;
        let (mut mirror, plan_scope) = match (self.mirror.take(), scope) {
            (Some(m), SyncScope::Changed(set)) if self.refused.is_empty() => (m, Scope::Frontends(set)),
            (Some(m), SyncScope::Changed(set)) => {
                let waiting = self.refused.values().filter(|r| r.reason != RefuseReason::TooManyEndpoints);
                with_refused = set.iter().copied().chain(waiting.map(|r| r.frontend)).collect();
                (m, Scope::Frontends(&with_refused))
            }
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
                // Either scope: the socket path's backends are compared per frontend.
                Op::PutService(k, _) | Op::DeleteService(k) => Some(ServiceKey { slot: 0, scope: SCOPE_EXTERNAL, ..*k }),
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
        let sync_again = plan.refused.iter().any(|r| r.reason != RefuseReason::TooManyEndpoints)
            && plan.ops.iter().any(|op| matches!(op, Op::DeleteService(_) | Op::DeleteBackend(_) | Op::DeleteMeta(_)));
        // Earlier refusals outside this plan's scope (too many endpoints, unchanged) still hold.
        let planned = |f: &Frontend| match plan_scope {
            Scope::Full => true,
            Scope::Frontends(set) => set.contains(f),
        };
        self.refused.retain(|f, _| !planned(f));
        self.refused.extend(plan.refused.into_iter().map(|r| (r.frontend, r)));
        let refused = self.refused.values().cloned().collect();
        Ok(SyncStats { full, ops: plan.ops.len(), refused, sync_again, duration: start.elapsed(), removed })
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
                let listed = want.map(|w| w.lists(&backend_addr(b)));
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
        model::{DesiredService, FrontendKind, Protocol, ServicePortName},
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
            name: name.into(),
            frontend_type: FrontendKind::ClusterIp,
            backends: backends.iter().map(|b| addr(*b)).collect(),
            internal_backends: None,
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
    fn with_two_scopes_the_removed_backends_are_those_the_socket_path_stops_using() {
        // An external frontend of an externalTrafficPolicy Local Service: `outside` for the tc
        // path, `inside` for the socket path, whose sockets socket termination ends.
        let state = |outside: &[u8], inside: &[u8]| {
            let mut d = desired(Protocol::Udp, outside, &[]);
            for s in d.values_mut() {
                s.frontend_type = FrontendKind::NodePort;
                s.internal_backends = Some(inside.iter().map(|b| addr(*b)).collect());
            }
            d
        };
        let states = [
            state(&[1], &[1, 2, 3]),
            state(&[2], &[1, 2, 3]), // only the outside set changes: no socket is stale
            state(&[2], &[2, 3]),    // 1 leaves the in-cluster set
        ];
        let got = removed_per_sync(Protocol::Udp, &states);
        assert_eq!(got, vec![vec![], vec![], vec![(1, PROTO_UDP)]]);
        // TCP: an endpoint the socket path stops using while it is still listed (here still a
        // backend for outside clients) keeps its connections; once unlisted, they end.
        let tcp = |outside: &[u8], inside: &[u8]| {
            let mut d = desired(Protocol::Tcp, outside, &[]);
            for s in d.values_mut() {
                s.frontend_type = FrontendKind::NodePort;
                s.internal_backends = Some(inside.iter().map(|b| addr(*b)).collect());
            }
            d
        };
        let got = removed_per_sync(Protocol::Tcp, &[tcp(&[1], &[1, 2]), tcp(&[1], &[2, 3]), tcp(&[4], &[2, 3, 4])]);
        assert_eq!(got, vec![vec![], vec![], vec![]]);
        let got = removed_per_sync(Protocol::Tcp, &[tcp(&[1], &[1, 2]), tcp(&[], &[2])]);
        assert_eq!(got, vec![vec![], vec![(1, PROTO_TCP)]]);
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

    /// Frontend 10.96.1.`i`:80 with backends 10.244.2.`b`:8080.
    fn web(i: u8, backends: &[u8]) -> (Frontend, DesiredService) {
        let f = Frontend { address: Ipv4Addr::new(10, 96, 1, i), port: 80, protocol: Protocol::Tcp };
        let name = ServicePortName { namespace: "default".into(), name: format!("web{i}"), port_name: String::new(), protocol: Protocol::Tcp };
        let backends = backends.iter().map(|b| SocketAddrV4::new(Ipv4Addr::new(10, 244, 2, *b), 8080)).collect();
        (f, DesiredService { name: name.into(), frontend_type: FrontendKind::ClusterIp, backends, internal_backends: None, draining: Vec::new(), drop_unserved: false, source_ranges: Vec::new(), affinity_timeout: 0 })
    }

    fn refused(stats: &SyncStats) -> Vec<(Frontend, RefuseReason)> {
        stats.refused.iter().map(|r| (r.frontend, r.reason)).collect()
    }

    fn serves(syncer: &Syncer<MapContents>, f: Frontend) -> bool {
        matches!(syncer.dataplane.resolve(f, 0), crate::dataplane::Resolution::Backend(_))
    }

    #[test]
    fn a_refused_frontend_is_programmed_by_the_first_sync_after_room_appears() {
        let limits = Limits { max_services: 2, max_backends: 100, max_service_entries: 1000 };
        let mut syncer = Syncer::new(MapContents::default(), limits);
        let [(f1, s1), (f2, s2), (f3, s3)] = [web(1, &[1]), web(2, &[2]), web(3, &[3])];
        let mut want: DesiredState = [(f1, s1), (f2, s2), (f3, s3)].into_iter().collect();
        let stats = syncer.sync(&want, SyncScope::Changed(&[f1, f2, f3].into())).unwrap();
        assert_eq!(refused(&stats), [(f3, RefuseReason::ServicesFull)]);
        assert!(!serves(&syncer, f3) && !stats.sync_again);
        // Syncs of other changes plan it again, and say it is still refused.
        want.insert(f2, web(2, &[2, 4]).1);
        let stats = syncer.sync(&want, SyncScope::Changed(&[f2].into())).unwrap();
        assert_eq!(refused(&stats), [(f3, RefuseReason::ServicesFull)]);
        // web1 is deleted: the sync of that change alone programs web3.
        want.remove(&f1);
        let stats = syncer.sync(&want, SyncScope::Changed(&[f1].into())).unwrap();
        assert_eq!(refused(&stats), []);
        assert!(serves(&syncer, f3) && !serves(&syncer, f1));
        assert!(!stats.sync_again);
    }

    #[test]
    fn a_sync_that_frees_room_too_late_to_use_asks_for_another() {
        // Backends are deleted after every slot is rewritten, so a backend that web1 stops
        // using is free only after the sync that refused web2 for want of one.
        let limits = Limits { max_services: 10, max_backends: 2, max_service_entries: 1000 };
        let mut syncer = Syncer::new(MapContents::default(), limits);
        let [(f1, s1), (f2, s2)] = [web(1, &[1, 2]), web(2, &[3])];
        let mut want: DesiredState = [(f1, s1), (f2, s2)].into_iter().collect();
        let stats = syncer.sync(&want, SyncScope::Full).unwrap();
        assert_eq!(refused(&stats), [(f2, RefuseReason::BackendsFull)]);
        assert!(!stats.sync_again, "nothing was freed");
        want.insert(f1, web(1, &[1]).1);
        let stats = syncer.sync(&want, SyncScope::Changed(&[f1].into())).unwrap();
        assert_eq!(refused(&stats), [(f2, RefuseReason::BackendsFull)]);
        assert!(stats.sync_again);
        let stats = syncer.sync(&want, SyncScope::Changed(&BTreeSet::new())).unwrap();
        assert_eq!(refused(&stats), []);
        assert!(serves(&syncer, f2) && !stats.sync_again);
    }

    #[test]
    fn a_frontend_with_too_many_endpoints_stays_refused_until_its_own_change() {
        let mut syncer = Syncer::new(MapContents::default(), LIMITS);
        let (f1, s1) = web(1, &[1]);
        let (f2, mut s2) = web(2, &[]);
        s2.backends = (0..=u16::MAX as u32).map(|i| SocketAddrV4::new(Ipv4Addr::from(0x0af5_0000 + i), 80)).collect();
        let mut want: DesiredState = [(f1, s1), (f2, s2)].into_iter().collect();
        let stats = syncer.sync(&want, SyncScope::Full).unwrap();
        assert_eq!(refused(&stats), [(f2, RefuseReason::TooManyEndpoints)]);
        // Not planned again by other changes (room would not help), but still reported.
        want.insert(f1, web(1, &[1, 2]).1);
        let stats = syncer.sync(&want, SyncScope::Changed(&[f1].into())).unwrap();
        assert_eq!(refused(&stats), [(f2, RefuseReason::TooManyEndpoints)]);
        assert!(!stats.sync_again);
        want.insert(f2, web(2, &[3]).1);
        let stats = syncer.sync(&want, SyncScope::Changed(&[f2].into())).unwrap();
        assert_eq!(refused(&stats), []);
        assert!(serves(&syncer, f2));
    }
}
