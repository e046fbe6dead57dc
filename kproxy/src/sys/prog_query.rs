//! `BPF_PROG_QUERY` (Linux >= 4.15): the programs attached to a cgroup at one attach type.

use std::os::fd::{AsRawFd as _, BorrowedFd};

use aya_obj::generated::{bpf_attach_type, bpf_cmd};

use super::{bpf, zeroed_attr, SysError};

/// Writes the ids of the programs attached directly to the cgroup `target` (an open cgroup
/// directory) at `attach_type` into `prog_ids`, and returns how many it wrote. More programs
/// than `prog_ids` holds fail the call with `ENOSPC`.
pub fn prog_query(target: BorrowedFd<'_>, attach_type: bpf_attach_type, prog_ids: &mut [u32]) -> Result<usize, SysError> {
    let capacity = u32::try_from(prog_ids.len()).unwrap_or(u32::MAX);
    let mut attr = zeroed_attr();
    // `query`: target_fd, attach_type, query_flags (0: the cgroup's own programs, not the
    // effective ones), prog_ids (buffer), prog_cnt (in: its capacity, out: the count).
    attr.query.__bindgen_anon_1.target_fd = target.as_raw_fd() as u32;
    attr.query.attach_type = attach_type as u32;
    attr.query.prog_ids = prog_ids.as_mut_ptr() as u64;
    attr.query.__bindgen_anon_2.prog_cnt = capacity;
    // SAFETY: `attr` is a zeroed `bpf_attr` with its `query` member filled in; `prog_ids` points
    // to a live, exclusively borrowed buffer of `prog_cnt` u32s that the kernel fills; `target`
    // is borrowed, so it stays open during the call.
    unsafe { bpf(bpf_cmd::BPF_PROG_QUERY, &mut attr) }.map_err(|io_error| SysError {
        cmd: bpf_cmd::BPF_PROG_QUERY,
        fd: target.as_raw_fd(),
        io_error,
    })?;
    // SAFETY: `prog_cnt` is a plain u32, written by this function and then by the kernel.
    let count = unsafe { attr.query.__bindgen_anon_2.prog_cnt };
    Ok((count as usize).min(prog_ids.len()))
}
