//! Room in the maps: what a plan frees is reused by it, and what does not fit is refused whole.

use std::net::{Ipv4Addr, SocketAddrV4};

use super::*;
use crate::{
    dataplane::{backend_value, service_key, Resolution},
    model::{DesiredService, FrontendKind, Protocol},
};

/// Frontend 10.96.0.`i`:80 of Service `s<i>` with backends 10.244.x.y:8080 numbered `b`.
fn svc(i: u8, backends: impl IntoIterator<Item = u32>) -> (Frontend, DesiredService) {
    let f = Frontend { address: Ipv4Addr::new(10, 96, 0, i), port: 80, protocol: Protocol::Tcp };
    let name = ServicePortName { namespace: "ns".into(), name: format!("s{i}"), port_name: "http".into(), protocol: Protocol::Tcp };
    let backends = backends.into_iter().map(|b| SocketAddrV4::new(Ipv4Addr::from(0x0af4_0000 + b), 8080)).collect();
    (f, DesiredService { name: name.into(), frontend_type: FrontendKind::ClusterIp, backends, internal_backends: None, draining: Vec::new(), drop_unserved: false, source_ranges: Vec::new(), affinity_timeout: 0 })
}

/// Applies a plan op by op, checking after each that no map holds more than its limit
/// (the kernel's maps refuse a new key then, and the sync fails).
fn apply_within(mirror: &mut Mirror, plan: &Plan, limits: &Limits) {
    for op in &plan.ops {
        mirror.apply(op);
        let c = mirror.contents();
        assert!(mirror.frontends <= limits.max_services as usize, "{} frontends after {op:?}", mirror.frontends);
        assert!(mirror.meta.len() <= limits.max_services as usize, "{} metadata entries after {op:?}", mirror.meta.len());
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
