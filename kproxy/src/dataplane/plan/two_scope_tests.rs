//! Frontends with two scopes (`externalTrafficPolicy: Local` short circuit): write order,
//! what each origin resolves to, capacity.

use std::net::SocketAddrV4;

use kproxy_common::lb::{
    ServiceValue, SCOPE_EXTERNAL, SCOPE_INTERNAL, SVC_FLAG_AFFINITY, SVC_FLAG_DROP_UNSERVED, SVC_FLAG_NODE_PORT,
    SVC_FLAG_TWO_SCOPES,
};

use super::*;
use crate::{
    dataplane::{service_key, Dataplane as _, Origin, Resolution},
    model::{DesiredService, FrontendKind, Protocol},
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
        name: ServicePortName { namespace: "default".into(), name: "np".into(), port_name: String::new(), protocol: Protocol::Tcp }.into(),
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
