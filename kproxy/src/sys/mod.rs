//! The agent's own system calls: the only module that calls `bpf(2)` directly, and the only
//! one in the library allowed `unsafe` (`lib.rs` denies it everywhere else).
//!
//! aya makes almost every `bpf(2)` call the agent needs; these are the few it has no public API
//! for in 0.14. Each is a safe function in a file of its own, built on the attribute types
//! aya-obj generates from `include/uapi/linux/bpf.h` ([`bpf_attr`], [`bpf_cmd`]), as aya's own
//! `sys` module is, and each fails with [`SysError`], which names the command:
//! - [`prog_query`]: `BPF_PROG_QUERY`, the programs attached to a cgroup at one hook (the
//!   loader's check that `cleanup` detached everything);
//! - [`link_create_iter`]: `BPF_LINK_CREATE` of an iterator program (socket termination);
//! - [`iter_create`]: `BPF_ITER_CREATE`, a readable iterator over that link;
//! - [`map_update_batch`]: `BPF_MAP_UPDATE_BATCH`, many hash map entries in one call (the
//!   dataplane's large writes), and [`map_count`]: `BPF_MAP_LOOKUP_BATCH`, to count a map's
//!   entries (the socket LRU maps' fill level);
//! - [`release_free_memory`]: glibc's `malloc_trim`, not `bpf(2)`, but the agent's one other
//!   foreign call with a safety contract.
//!
//! Every call goes through [`bpf`], with the whole `union bpf_attr` zeroed but for the member the
//! command reads: the kernel requires the bytes it does not read to be zero, and accepts an
//! attribute larger than its own (older kernels: 5.10 included) when the extra bytes are zero.

mod iter;
mod link;
mod map_batch;
mod mem;
mod prog_query;

use std::{
    io,
    os::fd::{FromRawFd as _, OwnedFd, RawFd},
};

use aya_obj::generated::{bpf_attr, bpf_cmd};

pub use iter::iter_create;
pub use link::link_create_iter;
pub use map_batch::{map_count, map_update_batch};
pub use mem::release_free_memory;
pub use prog_query::prog_query;

/// A `bpf(2)` command that failed: which command, on which file descriptor (the one the command
/// works on: the cgroup, program, link or map), and the kernel's error.
#[derive(Debug, thiserror::Error)]
#[error("{cmd:?} on fd {fd}: {io_error}")]
pub struct SysError {
    pub cmd: bpf_cmd,
    pub fd: RawFd,
    pub io_error: io::Error,
}

impl SysError {
    /// The kernel's error number (`EPERM`, `ENOENT`, …).
    pub fn raw_os_error(&self) -> Option<i32> {
        self.io_error.raw_os_error()
    }
}

/// An all-zero `union bpf_attr`, ready for one member to be filled in.
fn zeroed_attr() -> bpf_attr {
    // SAFETY: `bpf_attr` is a union of `#[repr(C)]` structs and unions of integers, integer
    // arrays and bindgen bitfield units (byte arrays): all-zero bytes are a valid value of each.
    unsafe { std::mem::zeroed() }
}

/// `bpf(cmd, attr, sizeof(attr))`: the one place the agent makes the system call. Returns the
/// call's non-negative result, or `errno`.
///
/// # Safety
/// `attr` must hold the member of `union bpf_attr` that `cmd` reads, with every byte the member
/// does not use zero (start from [`zeroed_attr`]). Every pointer in it must be valid, for the
/// whole call, for the kernel to read (inputs) or write (outputs) as many bytes as the other
/// fields of the member say, and every file descriptor in it must stay open during the call. If
/// `cmd` creates a file descriptor, the caller owns the one returned.
unsafe fn bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<libc::c_long> {
    // SAFETY: the caller guarantees that `attr` is laid out for `cmd` and that what it points to
    // is live; the size passed is that of `attr`, which the kernel reads and may write back.
    let rc = unsafe {
        libc::syscall(libc::SYS_bpf, cmd as libc::c_long, attr as *mut bpf_attr, size_of::<bpf_attr>())
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc)
}

/// [`bpf`] for a command that returns a new file descriptor; `fd` names the object the command
/// works on, for the error.
///
/// # Safety
/// As for [`bpf`], and `cmd` must be a command that returns a new file descriptor on success.
unsafe fn bpf_fd(cmd: bpf_cmd, fd: RawFd, attr: &mut bpf_attr) -> Result<OwnedFd, SysError> {
    // SAFETY: the caller upholds `bpf`'s contract.
    let rc = unsafe { bpf(cmd, attr) }.map_err(|io_error| SysError { cmd, fd, io_error })?;
    // SAFETY: on success `cmd` returned a new file descriptor, which nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(rc as RawFd) })
}

/// For the privileged tests of this module: whether to skip (saying so) because the process
/// is not root, and so may not load BPF programs or create maps.
#[cfg(test)]
fn skip_unless_root(test: &str) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    // /proc/self belongs to the effective user of the process reading it.
    if std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0) {
        return false;
    }
    eprintln!("SKIPPED (needs root to load BPF programs): {test}");
    true
}

/// The agent's eBPF object with small maps, loaded (not its programs), for the privileged
/// tests of this module.
#[cfg(test)]
fn load_small_object() -> aya::Ebpf {
    let caps = crate::loader::Capacities {
        max_services: 1024,
        // More than one batch of `map_batch::BATCH`.
        max_backends: 16_384,
        max_sock_entries: 1024,
        max_ct_entries: 1024,
        service_counters: 0,
    };
    crate::loader::load_object(None, caps).expect("load the eBPF object")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A command the kernel refuses fails with an error that names the command, the descriptor
    /// and the kernel's reason (here: a query on a file that is no cgroup, refused with EBADF,
    /// or EPERM when not privileged).
    #[test]
    fn a_failed_command_names_itself_and_the_descriptor() {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        let file = std::fs::File::open("/proc/self/status").expect("open /proc/self/status");
        let mut ids = [0u32; 4];
        let e = prog_query(file.as_fd(), aya_obj::generated::bpf_attach_type::BPF_CGROUP_INET4_CONNECT, &mut ids)
            .expect_err("a query on a regular file fails");
        assert_eq!(e.cmd, bpf_cmd::BPF_PROG_QUERY);
        assert!(e.raw_os_error().is_some(), "{e}");
        let text = e.to_string();
        let expected = format!("BPF_PROG_QUERY on fd {}: ", file.as_raw_fd());
        assert!(text.starts_with(&expected), "{text}");
    }

    /// The attribute passed is at least the 128 bytes the hand-built attributes were: every
    /// member kproxy uses lies within it.
    #[test]
    fn the_attribute_covers_the_members_used() {
        assert!(size_of::<bpf_attr>() >= 128);
    }
}
