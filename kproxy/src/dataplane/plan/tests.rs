//! The plan in general: write order, minimal differences, adoption and repair, refusals.

use std::net::SocketAddrV4;

use kproxy_common::lb::{MemberValue, ServiceValue, SVC_FLAG_SOURCE_RANGES};

use super::*;
use crate::{
    dataplane::{service_key, Dataplane as _, Resolution},
    model::{Cidr, DesiredService, FrontendKind, Protocol},
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
        name: ServicePortName { namespace: "default".into(), name: name.into(), port_name: "http".into(), protocol: Protocol::Tcp }.into(),
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

