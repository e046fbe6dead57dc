//! `BPF_MAP_UPDATE_BATCH` and `BPF_MAP_LOOKUP_BATCH` (Linux ≥ 5.6, hash maps): many entries
//! written, or read, by one syscall. A first sync at 10,000 services writes some 340,000
//! entries, and one syscall each was most of its time; counting a full socket LRU map of 262,144
//! entries key by key took a second. aya 0.14 has no batch operations, so these are the raw
//! syscalls.

use std::os::fd::{AsFd as _, AsRawFd as _};

use aya::{maps::MapData, sys::SyscallError, Pod};

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// Entries per syscall: the kernel copies keys and values one by one, so larger batches gain
/// nothing; this bounds the time one syscall holds the agent.
const BATCH: usize = 8192;

/// `union bpf_attr`'s member for the `BPF_MAP_*_BATCH` commands (include/uapi/linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Writes `keys[i] → values[i]` for every `i` (`BPF_ANY`), in order. On error, the entries
/// before the failing one are written.
pub fn update<K: Pod, V: Pod>(map: &MapData, keys: &[K], values: &[V]) -> Result<(), SyscallError> {
    assert_eq!(keys.len(), values.len(), "one value per key");
    let fd = map.fd().as_fd().as_raw_fd();
    for (keys, values) in keys.chunks(BATCH).zip(values.chunks(BATCH)) {
        let mut attr = BatchAttr {
            keys: keys.as_ptr() as u64,
            values: values.as_ptr() as u64,
            count: keys.len() as u32,
            map_fd: fd as u32,
            ..Default::default()
        };
        // SAFETY: `attr` is a complete `bpf_attr` batch member of the size passed; `keys` and
        // `values` are live arrays of `count` plain-old-data entries of the map's key and value
        // types (aya checked their sizes against the map when it was opened), which the kernel
        // only reads; `fd` is held open by `map` for the call.
        let rc = unsafe {
            libc::syscall(libc::SYS_bpf, BPF_MAP_UPDATE_BATCH, &mut attr as *mut BatchAttr, size_of::<BatchAttr>())
        };
        if rc < 0 {
            return Err(SyscallError { call: "bpf_map_update_batch", io_error: std::io::Error::last_os_error() });
        }
    }
    Ok(())
}

/// The number of entries of the hash map `map` (key type `K`, value type `V`), read in batches
/// of [`BATCH`]: O(entries), a few dozen syscalls for a quarter of a million entries. Entries
/// written or removed meanwhile may or may not be counted.
pub fn count<K: Pod, V: Pod>(map: &MapData) -> Result<usize, SyscallError> {
    let fd = map.fd().as_fd().as_raw_fd();
    let mut keys = vec![0u8; BATCH * size_of::<K>()];
    let mut values = vec![0u8; BATCH * size_of::<V>()];
    // The kernel's resume token: a bucket index (u32) for hash maps; 8 bytes leave room.
    let (mut token_in, mut token_out) = (0u64, 0u64);
    let mut total = 0;
    for first in std::iter::once(true).chain(std::iter::repeat(false)) {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { &token_in as *const u64 as u64 },
            out_batch: &mut token_out as *mut u64 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: BATCH as u32,
            map_fd: fd as u32,
            ..Default::default()
        };
        // SAFETY: `attr` is a complete `bpf_attr` batch member of the size passed; `keys` and
        // `values` have room for `count` keys and values of the map's types (aya checked their
        // sizes when the map was opened), the tokens for what the kernel reads and writes; `fd`
        // is held open by `map` for the call.
        let rc = unsafe {
            libc::syscall(libc::SYS_bpf, BPF_MAP_LOOKUP_BATCH, &mut attr as *mut BatchAttr, size_of::<BatchAttr>())
        };
        // The kernel writes back how many it copied, on success and at the end (ENOENT) alike.
        total += attr.count as usize;
        if rc < 0 {
            let error = std::io::Error::last_os_error();
            if error.raw_os_error() == Some(libc::ENOENT) {
                break;
            }
            return Err(SyscallError { call: "bpf_map_lookup_batch", io_error: error });
        }
        token_in = token_out;
    }
    Ok(total)
}
