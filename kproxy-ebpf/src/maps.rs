//! The maps, declared with BTF so `bpftool map dump` shows field names. Sizes here are
//! placeholders: the agent sets every capacity at load time from its flags.

use aya_ebpf::{
    btf_maps::{HashMap, LpmTrie, LruHashMap, PerCpuArray, SkStorage},
    macros::btf_map,
};
use kproxy_common::{
    ct::{CtKey, CtValue},
    drops::DROP_SLOTS,
    lb::{AffinityKey, AffinityValue, Backend, MemberKey, MemberValue, ServiceKey, ServiceMeta, ServiceValue, SourceRangeKey},
    nat::Device,
    sock::{SockAffinityKey, SockAffinityValue, SockLocal, SockRevNatKey, SockRevNatValue, SOCK_STATS},
};

/// Frontends and backend slots; see `kproxy_common::lb`.
#[btf_map]
pub static KP_SERVICES: HashMap<ServiceKey, ServiceValue, 1024> = HashMap::new();

/// Backends by id.
#[btf_map]
pub static KP_BACKENDS: HashMap<u32, Backend, 1024> = HashMap::new();

/// (service, backend) → the backend's slot; see `kproxy_common::lb::MEMBERS_MAP`.
#[btf_map]
pub static KP_SVC_MEMBERS: HashMap<MemberKey, MemberValue, 1024> = HashMap::new();

/// Service id → frontend and names. Written by the agent only; read by the reverse path.
#[btf_map]
pub static KP_SVC_META: HashMap<u32, ServiceMeta, 1024> = HashMap::new();

/// Each socket's own translations (socket-local storage); see `kproxy_common::sock`.
#[btf_map]
pub static KP_SOCK_LOCAL: SkStorage<SockLocal> = SkStorage::new();

/// Counters of the socket programs, per CPU, indexed by `kproxy_common::sock::SOCK_STAT_*`.
#[btf_map]
pub static KP_SOCK_STATS: PerCpuArray<u64, { SOCK_STATS as usize }> = PerCpuArray::new();

/// (socket, backend) → frontend, for getpeername and UDP replies, where socket-local storage
/// cannot take it.
#[btf_map]
pub static KP_SOCK_REVNAT: LruHashMap<SockRevNatKey, SockRevNatValue, 1024> = LruHashMap::new();

/// (socket, frontend) → backend, so an unconnected UDP socket keeps its backend, where
/// socket-local storage cannot take it.
#[btf_map]
pub static KP_SOCK_AFFIN: LruHashMap<SockAffinityKey, SockAffinityValue, 1024> = LruHashMap::new();

/// Connection tracking of translated flows at tc; see `kproxy_common::ct`.
#[btf_map]
pub static KP_CT: LruHashMap<CtKey, CtValue, 1024> = LruHashMap::new();

/// The node's devices kproxy is attached to, by ifindex, with their SNAT address; see
/// `kproxy_common::nat`.
#[btf_map]
pub static KP_DEVICES: HashMap<u32, Device, 64> = HashMap::new();

/// Allowed client ranges of frontends with `SVC_FLAG_SOURCE_RANGES`; see
/// `kproxy_common::lb::SourceRangeKey`.
#[btf_map]
pub static KP_SRC_RANGES: LpmTrie<SourceRangeKey, u8, 1024> = LpmTrie::new();

/// Session affinity: (client, frontend) → the backend it used last and when; see
/// `kproxy_common::lb::AffinityKey`.
#[btf_map]
pub static KP_AFFINITY: LruHashMap<AffinityKey, AffinityValue, 1024> = LruHashMap::new();

/// Drops of the tc programs, per CPU, indexed by `kproxy_common::drops::DropReason`.
#[btf_map]
pub static KP_DROPS: PerCpuArray<u64, { DROP_SLOTS as usize }> = PerCpuArray::new();

/// Adds one to counter `index` of a per-CPU counter array (this CPU's copy: no atomics needed).
#[inline(always)]
pub fn count<const N: usize>(counters: &PerCpuArray<u64, N>, index: u32) {
    if let Some(counter) = counters.get_ptr_mut(index) {
        // SAFETY: a live per-CPU array value of this CPU, for this program run.
        unsafe { *counter += 1 };
    }
}
