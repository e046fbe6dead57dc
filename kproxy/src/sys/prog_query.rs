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

#[cfg(test)]
mod tests {
    use std::{fs, os::fd::AsFd as _, path::PathBuf};

    use aya::programs::{CgroupAttachMode, CgroupSockAddr};

    use super::*;

    /// Removes the test's cgroup, even when the test fails.
    struct RemoveCgroup(PathBuf);

    impl Drop for RemoveCgroup {
        fn drop(&mut self) {
            if let Err(e) = fs::remove_dir(&self.0) {
                eprintln!("remove {}: {e}", self.0.display());
            }
        }
    }

    /// A program attached to a cgroup is listed at its attach type, and only there; the
    /// loader's check built on the query names it. The cgroup is a child made for the test,
    /// with no process in it.
    #[test]
    fn a_query_lists_the_program_attached_to_a_cgroup_at_its_hook() {
        if super::super::skip_unless_root("a_query_lists_the_program_attached_to_a_cgroup_at_its_hook") {
            return;
        }
        let root = crate::loader::cgroup2_root().expect("cgroup2 mount");
        let cgroup = root.join(format!("kproxy-test-prog-query-{}", std::process::id()));
        fs::create_dir(&cgroup).unwrap_or_else(|e| panic!("create {}: {e}", cgroup.display()));
        let _remove = RemoveCgroup(cgroup.clone());
        let dir = fs::File::open(&cgroup).expect("open the cgroup");
        let mut ids = [0u32; 4];
        assert_eq!(prog_query(dir.as_fd(), bpf_attach_type::BPF_CGROUP_INET4_CONNECT, &mut ids).expect("query"), 0);

        // Declared after `_remove`, so dropped (and detached) before the cgroup goes.
        let mut ebpf = super::super::load_small_object();
        let program: &mut CgroupSockAddr =
            ebpf.program_mut("kp_connect4").expect("kp_connect4").try_into().expect("sock_addr program");
        program.load().expect("load kp_connect4");
        program.attach(dir.as_fd(), CgroupAttachMode::Single).expect("attach kp_connect4");
        let id = program.info().expect("program info").id();

        let count = prog_query(dir.as_fd(), bpf_attach_type::BPF_CGROUP_INET4_CONNECT, &mut ids).expect("query");
        assert_eq!(&ids[..count], &[id], "the program at connect4");
        for other in [bpf_attach_type::BPF_CGROUP_UDP4_SENDMSG, bpf_attach_type::BPF_CGROUP_INET4_GETPEERNAME] {
            assert_eq!(prog_query(dir.as_fd(), other, &mut ids).expect("query"), 0, "nothing at {other:?}");
        }
        let names = crate::loader::attached_kproxy_programs(&cgroup).expect("attached kproxy programs");
        assert_eq!(names, ["kp_connect4"]);
    }
}
