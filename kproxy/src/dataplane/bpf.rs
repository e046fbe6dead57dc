//! The BPF dataplane: the pinned kernel maps, read and written through aya.

use std::path::Path;

use std::net::Ipv4Addr;

use aya::maps::{
    lpm_trie::{Key, LpmTrie},
    HashMap, IterableMap as _, Map, MapData, MapError, PerCpuArray,
};
use kproxy_common::ct::{CtKey, CtValue, CT_MAP};
use kproxy_common::lb::{
    source_range_prefix_len, AffinityKey, AffinityValue, AFFINITY_MAP, Backend, MemberKey, MemberValue, ServiceKey, ServiceMeta, ServiceValue, SourceRangeKey,
    BACKENDS_MAP, MEMBERS_MAP, SERVICES_MAP, SERVICE_META_MAP, SOURCE_RANGES_MAP,
};

use kproxy_common::drops::{DROPS_MAP, DROP_REASONS};
use kproxy_common::sock::{
    SockAffinityKey, SockAffinityValue, SockRevNatKey, SockRevNatValue, SOCK_AFFINITY_MAP, SOCK_REVNAT_MAP, SOCK_STATS,
    SOCK_STATS_MAP,
};

use super::{Dataplane, DataplaneError, MapContents, Op};
use crate::{model::Cidr, sys};

/// Handles on the load-balancing maps.
pub struct BpfMaps {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: HashMap<MapData, u32, Backend>,
    meta: HashMap<MapData, u32, ServiceMeta>,
    source_ranges: LpmTrie<MapData, SourceRangeKey, u8>,
    members: HashMap<MapData, MemberKey, MemberValue>,
}

/// The source ranges map's key for `range` of service `id`.
fn source_range_key(id: u32, range: Cidr) -> Key<SourceRangeKey> {
    let data = SourceRangeKey { service_id: id.to_be_bytes(), address: range.address.octets() };
    Key::new(source_range_prefix_len(range.prefix_len), data)
}

/// Capacity and use of one map, for `dump` and metrics.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MapUsage {
    pub name: &'static str,
    pub entries: usize,
    pub capacity: u32,
}

fn open<M: TryFrom<Map, Error = MapError>>(maps_dir: &Path, name: &'static str) -> Result<M, DataplaneError> {
    let path = maps_dir.join(name);
    let open_err = |source| DataplaneError::Open { path: path.display().to_string(), source };
    let data = MapData::from_pin(&path).map_err(open_err)?;
    let map = Map::from_map_data(data).map_err(open_err)?;
    M::try_from(map).map_err(open_err)
}

fn map_err(map: &'static str, operation: &'static str) -> impl FnOnce(MapError) -> DataplaneError {
    move |source| DataplaneError::Map { map, operation, source }
}

/// Treats "no such key" on delete as done: the entry is already gone.
fn ignore_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

/// Entries (a walk of the keys, O(entries)) and capacity of `m`.
fn usage_of<K: aya::Pod, V: aya::Pod>(m: &HashMap<MapData, K, V>, name: &'static str) -> Result<MapUsage, DataplaneError> {
    let info = m.map().info().map_err(map_err(name, "info"))?;
    Ok(MapUsage { name, entries: m.keys().count(), capacity: info.max_entries() })
}

fn read_all<K: aya::Pod + Eq + std::hash::Hash, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    name: &'static str,
) -> Result<std::collections::HashMap<K, V>, DataplaneError> {
    map.iter().collect::<Result<_, _>>().map_err(map_err(name, "iterate"))
}

impl BpfMaps {
    /// Opens the maps pinned in `maps_dir` (the agent's `<bpffs-dir>/maps`).
    pub fn open(maps_dir: &Path) -> Result<Self, DataplaneError> {
        Ok(Self {
            services: open(maps_dir, SERVICES_MAP)?,
            backends: open(maps_dir, BACKENDS_MAP)?,
            meta: open(maps_dir, SERVICE_META_MAP)?,
            source_ranges: open(maps_dir, SOURCE_RANGES_MAP)?,
            members: open(maps_dir, MEMBERS_MAP)?,
        })
    }

    /// Takes the maps out of a loaded object (tests load one with private maps).
    pub fn from_ebpf(ebpf: &mut aya::Ebpf) -> Result<Self, DataplaneError> {
        fn take<M: TryFrom<Map, Error = MapError>>(ebpf: &mut aya::Ebpf, name: &'static str) -> Result<M, DataplaneError> {
            let open_err = |source| DataplaneError::Open { path: name.to_string(), source };
            let map = ebpf.take_map(name).ok_or_else(|| open_err(MapError::InvalidName { name: name.into() }))?;
            M::try_from(map).map_err(open_err)
        }
        Ok(Self {
            services: take(ebpf, SERVICES_MAP)?,
            backends: take(ebpf, BACKENDS_MAP)?,
            meta: take(ebpf, SERVICE_META_MAP)?,
            source_ranges: take(ebpf, SOURCE_RANGES_MAP)?,
            members: take(ebpf, MEMBERS_MAP)?,
        })
    }

    /// Entries and capacity of each map, as the kernel reports them.
    pub fn usage(&self) -> Result<Vec<MapUsage>, DataplaneError> {
        Ok(vec![
            usage_of(&self.services, SERVICES_MAP)?,
            usage_of(&self.backends, BACKENDS_MAP)?,
            usage_of(&self.meta, SERVICE_META_MAP)?,
            usage_of(&self.members, MEMBERS_MAP)?,
        ])
    }
}

/// The socket-level maps, for metrics: the socket programs' counters and the use of the shared
/// LRU maps (see `kproxy_common::sock`).
pub struct SocketMaps {
    stats: PerCpuArray<MapData, u64>,
    revnat: HashMap<MapData, SockRevNatKey, SockRevNatValue>,
    affinity: HashMap<MapData, SockAffinityKey, SockAffinityValue>,
}

impl SocketMaps {
    /// Opens the maps pinned in `maps_dir`.
    pub fn open(maps_dir: &Path) -> Result<Self, DataplaneError> {
        Ok(Self {
            stats: open(maps_dir, SOCK_STATS_MAP)?,
            revnat: open(maps_dir, SOCK_REVNAT_MAP)?,
            affinity: open(maps_dir, SOCK_AFFINITY_MAP)?,
        })
    }

    /// The `SOCK_STAT_*` counters, summed over the CPUs.
    pub fn stats(&self) -> Result<[u64; SOCK_STATS as usize], DataplaneError> {
        sum_over_cpus(&self.stats, SOCK_STATS_MAP)
    }

    /// Entries and capacity of the shared LRU maps: read in batches, O(entries) (some 200 ms
    /// for a full map of 262,144 entries, against a second key by key).
    pub fn usage(&self) -> Result<Vec<MapUsage>, DataplaneError> {
        fn one<K: aya::Pod, V: aya::Pod>(m: &HashMap<MapData, K, V>, name: &'static str) -> Result<MapUsage, DataplaneError> {
            let info = m.map().info().map_err(map_err(name, "info"))?;
            let entries =
                sys::map_count(m).map_err(|source| DataplaneError::Sys { map: name, operation: "lookup batch", source })?;
            Ok(MapUsage { name, entries, capacity: info.max_entries() })
        }
        Ok(vec![one(&self.revnat, SOCK_REVNAT_MAP)?, one(&self.affinity, SOCK_AFFINITY_MAP)?])
    }
}

/// The flow state the kernel keeps, for `kproxy trace` and `kproxy dump --conntrack`: the tc
/// path's conntrack map and the session affinity map. Read only.
pub struct FlowMaps {
    ct: HashMap<MapData, CtKey, CtValue>,
    affinity: HashMap<MapData, AffinityKey, AffinityValue>,
}

/// What [`FlowMaps`] hold, read at one instant.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlowContents {
    pub ct: std::collections::HashMap<CtKey, CtValue>,
    pub affinity: std::collections::HashMap<AffinityKey, AffinityValue>,
    /// CLOCK_MONOTONIC in ns when they were read: the clock of `CtValue::expires_ns` and
    /// `AffinityValue::last_used_ns`.
    pub now_ns: u64,
}

impl FlowMaps {
    /// Opens the maps pinned in `maps_dir`.
    pub fn open(maps_dir: &Path) -> Result<Self, DataplaneError> {
        Ok(Self { ct: open(maps_dir, CT_MAP)?, affinity: open(maps_dir, AFFINITY_MAP)? })
    }

    /// Every entry of both maps (entries evicted or added while they are read may be missed or
    /// seen, as with any walk of a live map), and the time.
    pub fn read(&self) -> Result<FlowContents, DataplaneError> {
        let ct = read_all(&self.ct, CT_MAP)?;
        let affinity = read_all(&self.affinity, AFFINITY_MAP)?;
        let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
            .map_err(DataplaneError::Clock)?;
        let now_ns = now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64;
        Ok(FlowContents { ct, affinity, now_ns })
    }
}

/// The first `N` counters of a per-CPU counter array, each summed over the CPUs.
fn sum_over_cpus<const N: usize>(map: &PerCpuArray<MapData, u64>, name: &'static str) -> Result<[u64; N], DataplaneError> {
    let mut out = [0u64; N];
    for (index, total) in (0u32..).zip(out.iter_mut()) {
        let per_cpu = map.get(&index, 0).map_err(map_err(name, "lookup"))?;
        *total = per_cpu.iter().sum();
    }
    Ok(out)
}

/// The tc programs' drop counters (`kproxy_common::drops`), read for metrics.
pub struct DropCounters {
    map: PerCpuArray<MapData, u64>,
}

impl DropCounters {
    /// Opens the map pinned in `maps_dir`.
    pub fn open(maps_dir: &Path) -> Result<Self, DataplaneError> {
        Ok(Self { map: open(maps_dir, DROPS_MAP)? })
    }

    /// The drops of every `DropReason`, by index, summed over the CPUs.
    pub fn totals(&self) -> Result<[u64; DROP_REASONS as usize], DataplaneError> {
        sum_over_cpus(&self.map, DROPS_MAP)
    }
}

/// Writes `entries` to `map` in batches; returns how many.
fn put_batch<K: aya::Pod, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    name: &'static str,
    entries: Vec<(K, V)>,
) -> Result<usize, DataplaneError> {
    let count = entries.len();
    let (keys, values): (Vec<K>, Vec<V>) = entries.into_iter().unzip();
    sys::map_update_batch(map, &keys, &values)
        .map_err(|source| DataplaneError::Sys { map: name, operation: "update batch", source })?;
    Ok(count)
}

impl BpfMaps {
    fn read_source_ranges(&self) -> Result<std::collections::HashMap<u32, std::collections::BTreeSet<Cidr>>, DataplaneError> {
        let mut out: std::collections::HashMap<u32, std::collections::BTreeSet<Cidr>> = Default::default();
        for key in self.source_ranges.keys() {
            let key = key.map_err(map_err(SOURCE_RANGES_MAP, "iterate"))?;
            let data = key.data();
            // The agent writes prefixes of 32 (the service id) plus the range's; anything
            // shorter, written by hand, reads as a /0 range of that id.
            let prefix_len = key.prefix_len().saturating_sub(32).min(32) as u8;
            let range = Cidr { address: Ipv4Addr::from(data.address), prefix_len };
            out.entry(u32::from_be_bytes(data.service_id)).or_default().insert(range);
        }
        Ok(out)
    }
}

impl Dataplane for BpfMaps {
    fn read(&self) -> Result<MapContents, DataplaneError> {
        Ok(MapContents {
            services: read_all(&self.services, SERVICES_MAP)?,
            backends: read_all(&self.backends, BACKENDS_MAP)?,
            meta: read_all(&self.meta, SERVICE_META_MAP)?,
            source_ranges: self.read_source_ranges()?,
            members: read_all(&self.members, MEMBERS_MAP)?,
        })
    }

    /// Runs of backend, service and membership writes (most of a big sync) go to the kernel in
    /// batches; the order of the operations is kept.
    fn apply_all(&mut self, ops: &[Op]) -> Result<(), DataplaneError> {
        let mut rest = ops;
        while let Some(first) = rest.first() {
            let members: Vec<(MemberKey, MemberValue)> = rest
                .iter()
                .map_while(|op| match op {
                    Op::PutMember(k, v) => Some((*k, *v)),
                    _ => None,
                })
                .collect();
            let backends: Vec<(u32, Backend)> = rest
                .iter()
                .map_while(|op| match op {
                    Op::PutBackend(id, b) => Some((*id, *b)),
                    _ => None,
                })
                .collect();
            let services: Vec<(ServiceKey, ServiceValue)> = rest
                .iter()
                .map_while(|op| match op {
                    Op::PutService(k, v) => Some((*k, *v)),
                    _ => None,
                })
                .collect();
            let done = if backends.len() > 1 {
                put_batch(&self.backends, BACKENDS_MAP, backends)?
            } else if services.len() > 1 {
                put_batch(&self.services, SERVICES_MAP, services)?
            } else if members.len() > 1 {
                put_batch(&self.members, MEMBERS_MAP, members)?
            } else {
                self.apply(first)?;
                1
            };
            rest = &rest[done..];
        }
        Ok(())
    }

    fn apply(&mut self, op: &Op) -> Result<(), DataplaneError> {
        match op {
            Op::PutBackend(id, b) => self.backends.insert(id, b, 0).map_err(map_err(BACKENDS_MAP, "insert")),
            Op::DeleteBackend(id) => {
                ignore_missing(self.backends.remove(id)).map_err(map_err(BACKENDS_MAP, "remove"))
            }
            Op::PutService(k, v) => self.services.insert(k, v, 0).map_err(map_err(SERVICES_MAP, "insert")),
            Op::DeleteService(k) => {
                ignore_missing(self.services.remove(k)).map_err(map_err(SERVICES_MAP, "remove"))
            }
            Op::PutMeta(id, m) => self.meta.insert(id, **m, 0).map_err(map_err(SERVICE_META_MAP, "insert")),
            Op::DeleteMeta(id) => {
                ignore_missing(self.meta.remove(id)).map_err(map_err(SERVICE_META_MAP, "remove"))
            }
            Op::PutSourceRange(id, range) => self
                .source_ranges
                .insert(&source_range_key(*id, *range), 1, 0)
                .map_err(map_err(SOURCE_RANGES_MAP, "insert")),
            Op::DeleteSourceRange(id, range) => ignore_missing(self.source_ranges.remove(&source_range_key(*id, *range)))
                .map_err(map_err(SOURCE_RANGES_MAP, "remove")),
            Op::PutMember(k, v) => self.members.insert(k, v, 0).map_err(map_err(MEMBERS_MAP, "insert")),
            Op::DeleteMember(k) => ignore_missing(self.members.remove(k)).map_err(map_err(MEMBERS_MAP, "remove")),
        }
    }
}
