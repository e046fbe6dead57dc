//! `BPF_LINK_CREATE` (Linux >= 5.7; of an iterator, >= 5.8).

use std::os::fd::{AsRawFd as _, BorrowedFd, OwnedFd};

use aya_obj::generated::{bpf_attach_type, bpf_cmd};

use super::{bpf_fd, zeroed_attr, SysError};

/// Links the iterator program `prog` with no target (`BPF_TRACE_ITER`, no `iter_info`), and
/// returns the link. aya's `IterLink` can create one iterator only (`into_file` consumes it);
/// from this link, [`super::iter_create`] creates as many as wanted.
pub fn link_create_iter(prog: BorrowedFd<'_>) -> Result<OwnedFd, SysError> {
    let mut attr = zeroed_attr();
    // `link_create`: prog_fd, target_fd (0), attach_type, flags (0), iter_info (NULL) and
    // iter_info_len (0).
    attr.link_create.__bindgen_anon_1.prog_fd = prog.as_raw_fd() as u32;
    attr.link_create.attach_type = bpf_attach_type::BPF_TRACE_ITER as u32;
    // SAFETY: `attr` is a zeroed `bpf_attr` with its `link_create` member filled in and no
    // pointers; `prog` is borrowed, so it stays open during the call; BPF_LINK_CREATE returns a
    // new file descriptor.
    unsafe { bpf_fd(bpf_cmd::BPF_LINK_CREATE, prog.as_raw_fd(), &mut attr) }
}
