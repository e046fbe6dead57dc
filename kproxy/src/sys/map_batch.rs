//! `BPF_MAP_UPDATE_BATCH` and `BPF_MAP_LOOKUP_BATCH` (Linux >= 5.6, hash maps): many entries
//! written, or read, by one syscall. A first sync at 10,000 services writes some 340,000
//! entries, and one syscall each was most of its time; counting a full socket LRU map of
//! 262,144 entries key by key took a second. aya 0.14 has no batch operations.

use std::os::fd::{AsFd as _, AsRawFd as _};

use aya::{
    maps::{HashMap, IterableMap as _, MapData},
    Pod,
};
use aya_obj::generated::bpf_cmd;

use super::{bpf, zeroed_attr, SysError};

/// Entries per syscall: the kernel copies keys and values one by one, so larger batches gain
/// nothing; this bounds the time one syscall holds the agent.
const BATCH: usize = 8192;

/// Writes `keys[i] → values[i]` for every `i` (`BPF_ANY`), in order. On error, the entries
/// before the failing one are written.
///
/// The map is a typed [`HashMap`]: aya checked, when it was opened, that the map is a hash map
/// whose key and value sizes are those of `K` and `V`, which is what the kernel reads per entry.
pub fn map_update_batch<K: Pod, V: Pod>(map: &HashMap<MapData, K, V>, keys: &[K], values: &[V]) -> Result<(), SysError> {
    assert_eq!(keys.len(), values.len(), "one value per key");
    let fd = map.map().fd().as_fd();
    for (keys, values) in keys.chunks(BATCH).zip(values.chunks(BATCH)) {
        let mut attr = zeroed_attr();
        // `batch`: in_batch and out_batch (NULL: not used by updates), keys, values, count,
        // map_fd, elem_flags (BPF_ANY) and flags (0).
        attr.batch.keys = keys.as_ptr() as u64;
        attr.batch.values = values.as_ptr() as u64;
        attr.batch.count = keys.len() as u32;
        attr.batch.map_fd = fd.as_raw_fd() as u32;
        // SAFETY: `attr` is a zeroed `bpf_attr` with its `batch` member filled in; `keys` and
        // `values` are live arrays of `count` plain-old-data entries of the map's key and value
        // sizes (see above), which the kernel only reads; `fd` is held open by `map` for the
        // call.
        unsafe { bpf(bpf_cmd::BPF_MAP_UPDATE_BATCH, &mut attr) }.map_err(|io_error| SysError {
            cmd: bpf_cmd::BPF_MAP_UPDATE_BATCH,
            fd: fd.as_raw_fd(),
            io_error,
        })?;
    }
    Ok(())
}

/// The number of entries of the hash map `map`, read in batches of [`BATCH`]: O(entries), a
/// few dozen syscalls for a quarter of a million entries. Entries written or removed meanwhile
/// may or may not be counted. The map is typed for the same reason as in [`map_update_batch`]:
/// the kernel writes `count` keys and values of the map's sizes into the buffers.
pub fn map_count<T: std::borrow::Borrow<MapData>, K: Pod, V: Pod>(map: &HashMap<T, K, V>) -> Result<usize, SysError> {
    let fd = map.map().fd().as_fd();
    let mut keys = vec![0u8; BATCH * size_of::<K>()];
    let mut values = vec![0u8; BATCH * size_of::<V>()];
    // The kernel's resume token: a bucket index (u32) for hash maps; 8 bytes leave room.
    let (mut token_in, mut token_out) = (0u64, 0u64);
    let mut total = 0;
    for first in std::iter::once(true).chain(std::iter::repeat(false)) {
        let mut attr = zeroed_attr();
        // `batch`: in_batch (NULL the first time: from the start), out_batch, keys, values,
        // count (room in, copied out), map_fd, elem_flags and flags (0).
        attr.batch.in_batch = if first { 0 } else { &token_in as *const u64 as u64 };
        attr.batch.out_batch = &mut token_out as *mut u64 as u64;
        attr.batch.keys = keys.as_mut_ptr() as u64;
        attr.batch.values = values.as_mut_ptr() as u64;
        attr.batch.count = BATCH as u32;
        attr.batch.map_fd = fd.as_raw_fd() as u32;
        // SAFETY: `attr` is a zeroed `bpf_attr` with its `batch` member filled in; `keys` and
        // `values` have room for `count` keys and values of the map's sizes (see above), the
        // tokens for the 8 bytes the kernel reads and writes; `fd` is held open by `map`.
        let result = unsafe { bpf(bpf_cmd::BPF_MAP_LOOKUP_BATCH, &mut attr) };
        // SAFETY: reading back the integer the kernel wrote into the member filled above.
        // The kernel writes back how many it copied, on success and at the end (ENOENT) alike.
        total += unsafe { attr.batch.count } as usize;
        match result {
            Ok(_) => token_in = token_out,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            Err(io_error) => return Err(SysError { cmd: bpf_cmd::BPF_MAP_LOOKUP_BATCH, fd: fd.as_raw_fd(), io_error }),
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use aya::maps::{HashMap, MapData};
    use kproxy_common::lb::{Backend, BACKENDS_MAP};

    use super::*;

    /// Every entry of a batch lands, also when it takes more than one syscall (`BATCH`
    /// entries each), and an entry written again takes the later value.
    #[test]
    fn a_batch_writes_every_entry() {
        if super::super::skip_unless_root("a_batch_writes_every_entry") {
            return;
        }
        let mut ebpf = super::super::load_small_object();
        let map = ebpf.take_map(BACKENDS_MAP).expect("backends map");
        let backends: HashMap<MapData, u32, Backend> = HashMap::try_from(map).expect("typed backends map");
        let backend = |i: u32, port: u16| Backend { address: i.to_be_bytes(), port: port.to_be_bytes(), protocol: 6, flags: 0 };
        let total = BATCH as u32 + 1000;
        let keys: Vec<u32> = (1..=total).collect();
        let values: Vec<Backend> = keys.iter().map(|&i| backend(i, 80)).collect();
        map_update_batch(&backends, &keys, &values).expect("first write");
        let keys: Vec<u32> = (100..200).collect();
        let values: Vec<Backend> = keys.iter().map(|&i| backend(i, 8080)).collect();
        map_update_batch(&backends, &keys, &values).expect("second write");
        map_update_batch(&backends, &[], &[]).expect("an empty write");
        for i in 1..=total {
            let port = if (100..200).contains(&i) { 8080 } else { 80 };
            assert_eq!(backends.get(&i, 0).expect("entry written"), backend(i, port), "entry {i}");
        }
        assert_eq!(backends.keys().count(), total as usize, "no other entry");
    }
}
