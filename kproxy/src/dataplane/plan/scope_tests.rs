//! Plans of changed frontends only against full plans.

use std::net::{Ipv4Addr, SocketAddrV4};

use super::*;
use crate::model::{DesiredService, FrontendKind, Protocol};

const LIMITS: Limits = Limits { max_services: 1000, max_backends: 1000, max_service_entries: 10_000 };

fn svc(i: u32, backends: impl IntoIterator<Item = u32>) -> (Frontend, DesiredService) {
    let f = Frontend { address: Ipv4Addr::from(0x0a60_0000 + i), port: 80, protocol: Protocol::Tcp };
    let name = ServicePortName { namespace: "ns".into(), name: format!("s{i}"), port_name: String::new(), protocol: Protocol::Tcp };
    let backends = backends.into_iter().map(|b| SocketAddrV4::new(Ipv4Addr::from(0x0af4_0000 + b), 8080)).collect();
    (f, DesiredService { name: name.into(), frontend_type: FrontendKind::ClusterIp, backends, internal_backends: None, draining: Vec::new(), drop_unserved: false, source_ranges: Vec::new(), affinity_timeout: 0 })
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
        // The metadata (names included: the mirror keeps digests of it), whatever the ids.
        let digests = |m: &Mirror| m.meta.values().copied().collect::<std::collections::BTreeSet<u64>>();
        assert_eq!(mirror.meta.len(), fresh.meta.len(), "stale metadata left");
        assert_eq!(digests(&mirror), digests(&fresh));
        assert_eq!(plan(&mirror, &want, Scope::Full, &LIMITS), Plan::default());
        // The indexes stay equal to a rebuild from the content.
        let rebuilt = Mirror::new(mirror.contents().clone());
        assert_eq!(rebuilt.ids_by_backend, mirror.ids_by_backend);
        assert_eq!(rebuilt.extra_ids, mirror.extra_ids);
        assert_eq!(rebuilt.backend_refs, mirror.backend_refs);
        assert_eq!(rebuilt.frontends, mirror.frontends);
    }
}
