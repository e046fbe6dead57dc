//! The writes of a plan by phase, and their assembly into the one order the module doc
//! describes.

use std::collections::BTreeSet;

use kproxy_common::lb::MemberKey;

use super::super::Op;

/// A plan's writes, by phase.
#[derive(Default)]
pub(super) struct Phases {
    /// Phase 1: what removed frontends free, before every other write.
    pub freeing: Vec<Op>,
    /// Phase 2: new backends, then metadata and new source ranges, then membership entries
    /// (apart from the metadata, so that they reach the kernel as one batch).
    pub backends: Vec<Op>,
    pub meta: Vec<Op>,
    pub members: Vec<Op>,
    /// Phase 3: slots and frontend entries, frontend by frontend.
    pub services: Vec<Op>,
    /// Phase 4: source ranges no longer wanted, internal scopes no flag reaches any more, and
    /// stray entries; then membership entries and metadata nobody holds.
    pub removals: Vec<Op>,
    pub member_deletes: Vec<MemberKey>,
    pub meta_deletes: Vec<u32>,
    /// Phase 5: backends no slot references any more.
    pub stale_backends: BTreeSet<u32>,
}

impl Phases {
    /// The writes in order.
    pub fn assemble(self) -> Vec<Op> {
        let Phases {
            freeing,
            backends,
            meta,
            members,
            services,
            removals,
            mut member_deletes,
            mut meta_deletes,
            stale_backends,
        } = self;
        meta_deletes.sort_unstable();
        meta_deletes.dedup();
        member_deletes.sort_unstable();
        member_deletes.dedup();
        let mut ops = freeing;
        ops.extend(backends);
        ops.extend(meta);
        ops.extend(members);
        ops.extend(services);
        ops.extend(removals);
        ops.extend(member_deletes.into_iter().map(Op::DeleteMember));
        ops.extend(meta_deletes.into_iter().map(Op::DeleteMeta));
        ops.extend(stale_backends.into_iter().map(Op::DeleteBackend));
        ops
    }
}
