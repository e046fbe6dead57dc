//! `BPF_MAP_UPDATE_BATCH` (Linux >= 5.6, hash maps): many entries written by one syscall. A
//! first sync at 10,000 services writes some 340,000 entries, and one syscall each was most of
//! its time. aya 0.14 has no batch operations.

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
