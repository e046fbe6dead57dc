//! `BPF_ITER_CREATE` (Linux >= 5.8).

use std::{
    fs::File,
    os::fd::{AsRawFd as _, BorrowedFd},
};

use aya_obj::generated::bpf_cmd;

use super::{bpf_fd, zeroed_attr, SysError};

/// A new iterator over the iterator link `link`, read like a file to its end. Socket
/// iterators walk the network namespace of the calling thread.
pub fn iter_create(link: BorrowedFd<'_>) -> Result<File, SysError> {
    let mut attr = zeroed_attr();
    // `iter_create`: link_fd, flags (0).
    attr.iter_create.link_fd = link.as_raw_fd() as u32;
    // SAFETY: `attr` is a zeroed `bpf_attr` with its `iter_create` member filled in and no
    // pointers; `link` is borrowed, so it stays open during the call; BPF_ITER_CREATE returns a
    // new file descriptor.
    unsafe { bpf_fd(bpf_cmd::BPF_ITER_CREATE, link.as_raw_fd(), &mut attr) }.map(File::from)
}
