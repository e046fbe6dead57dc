//! `BPF_MAP_UPDATE_BATCH` (Linux ≥ 5.6, hash maps): many entries written by one syscall. A
//! first sync at 10,000 services writes some 340,000 entries, and one syscall each was most of
//! its time. aya 0.14 has no batch operations, so this is the raw syscall.

use std::os::fd::{AsFd as _, AsRawFd as _};

use aya::{maps::MapData, sys::SyscallError, Pod};

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
