//! Socket termination: destroy the sockets kproxy translated to a backend that has left its
//! service (Linux >= 6.5, `bpf_sock_destroy` from `iter/udp` and `iter/tcp` programs).
//!
//! `connect4` writes the backend address into a connected socket, so without this a connected
//! UDP socket keeps sending to a deleted backend for as long as the application keeps it (what
//! kube-proxy avoids by clearing the flow's conntrack entry), and an established TCP connection
//! to a vanished pod hangs until its retransmissions time out. After a sync removes backends,
//! the agent lists the (service id, backend, protocol) pairs in `KP_SOCK_TERM`, runs the two
//! iterators in every network namespace that may hold translated sockets, and empties the map.
//! The programs (`kproxy-ebpf/src/sockterm.rs`) destroy a socket only when its peer is a listed
//! backend *and* the socket's own storage (`KP_SOCK_LOCAL`), or failing that `KP_SOCK_REVNAT`,
//! records that kproxy translated this socket to that backend for that service; the
//! application then gets `ECONNABORTED` and reconnects.
//!
//! Which sockets go is decided by the sync ([`crate::sync::SyncStats::removed`]): for UDP every
//! backend that left a frontend (kube-proxy's stale-UDP cleanup); for TCP only endpoints that
//! are no longer listed in the Service's slices while the Service stays (a terminating or
//! not-ready endpoint keeps draining, as with kube-proxy).
//!
//! Network namespaces: an iterator walks the sockets of the network namespace of the thread
//! that creates it (`bpf_iter_init_seq_net` takes `current->nsproxy->net_ns`). The agent finds
//! the namespaces from `/proc/<pid>/ns/net` (one per distinct inode; with `hostPID` in the
//! DaemonSet that is every pod of the node; the node's own namespace always) and from the
//! namespaces bind-mounted under `/run/netns` (`ip netns`, CNI plugins). A short-lived thread
//! enters each with `setns(2)`, creates the two iterators there and reads them to the end;
//! the agent's own threads never change namespace. The cost is one walk of the UDP and TCP hash
//! tables per namespace, only when a sync removed backends.
//!
//! aya 0.14 does not relocate kfunc calls (`aya-obj`'s `relocate_calls` only knows BPF-to-BPF
//! calls and fails on a call to an undefined symbol), so [`resolve_kfuncs`] does what libbpf
//! does before aya parses the object: each call to an undefined symbol becomes a
//! `BPF_PSEUDO_KFUNC_CALL` with the function's BTF id in the running kernel.
//!
//! Everything here is optional: on a kernel without the kfunc or the iterators, or should the
//! object fail to load, the agent logs once and runs without it.

use std::{
    collections::HashSet,
    fs::File,
    io::Read as _,
    os::{
        fd::{AsFd as _, BorrowedFd, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use aya::{
    maps::HashMap as BpfHashMap,
    programs::Iter,
    Btf, Ebpf, EbpfLoader,
};
use aya_obj::btf::BtfKind;
use kproxy_common::{
    sock::{SockTermKey, SOCK_LOCAL_MAP, SOCK_REVNAT_MAP, SOCK_TERM_ENTRIES, SOCK_TERM_MAP},
    PROTO_TCP, PROTO_UDP,
};
use object::{Object as _, ObjectSection as _, ObjectSymbol as _, RelocationTarget};

use crate::sys;

/// The socket-termination object built by `build.rs` from `kproxy-ebpf/src/sockterm.rs`.
pub static SOCKTERM_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/kproxy-sockterm"));

/// The iterator programs: (program, iterator target, protocol).
const ITERATORS: [(&str, &str, u8); 2] = [("kp_sockterm_udp", "udp", PROTO_UDP), ("kp_sockterm_tcp", "tcp", PROTO_TCP)];

/// Kernel functions the object calls.
const KFUNCS: [&str; 1] = ["bpf_sock_destroy"];

/// Where bind-mounted network namespaces live (`ip netns`, and CNI plugins for pods).
const NETNS_DIR: &str = "/run/netns";

/// The loaded iterators, ready to run.
pub struct SockTerm {
    ebpf: Ebpf,
    /// One iterator link per protocol (BPF_LINK_CREATE, BPF_TRACE_ITER).
    links: Vec<(u8, OwnedFd)>,
}

/// What one termination round did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TermStats {
    pub namespaces: usize,
    pub udp: usize,
    pub tcp: usize,
    pub duration: Duration,
}

/// Patches every call to an undefined symbol into a kfunc call: `src_reg` =
/// `BPF_PSEUDO_KFUNC_CALL`, `imm` = the function's BTF id (from `btf_id`), `off` = 0 (vmlinux).
/// The relocation entry stays; aya skips it (its symbol has no section and the instruction is
/// no longer a BPF-to-BPF call). Returns the patched object, 8-byte aligned for parsing.
pub fn resolve_kfuncs(elf: &[u8], btf_id: &dyn Fn(&str) -> Option<u32>) -> Result<Vec<u64>> {
    let mut words = vec![0u64; elf.len().div_ceil(8)];
    bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..elf.len()].copy_from_slice(elf);
    let mut patches = Vec::new();
    {
        let file = object::File::parse(elf).context("parse the socket-termination object")?;
        for section in file.sections() {
            let Some((file_offset, _)) = section.file_range() else { continue };
            for (offset, relocation) in section.relocations() {
                let RelocationTarget::Symbol(index) = relocation.target() else { continue };
                let symbol = file.symbol_by_index(index).context("relocation symbol")?;
                if !symbol.is_undefined() {
                    continue;
                }
                let name = symbol.name().context("relocation symbol name")?;
                let Some(id) = btf_id(name) else { bail!("kernel function {name} is not in the kernel's BTF") };
                patches.push((name.to_string(), (file_offset + offset) as usize, id));
            }
        }
    }
    let bytes = bytemuck::cast_slice_mut::<u64, u8>(&mut words);
    for (name, at, id) in patches {
        let insn = bytes.get_mut(at..at + 8).with_context(|| format!("call to {name} out of the object"))?;
        // BPF_JMP | BPF_CALL, as LLVM emits it for an extern function: src_reg 1, imm -1.
        if insn[0] != 0x85 {
            bail!("relocation of {name} at {at:#x} is not on a call instruction ({:#x})", insn[0]);
        }
        insn[1] = (BPF_PSEUDO_KFUNC_CALL << 4) | (insn[1] & 0x0f);
        insn[2..4].copy_from_slice(&0i16.to_le_bytes());
        insn[4..8].copy_from_slice(&(id as i32).to_le_bytes());
    }
    Ok(words)
}

const BPF_PSEUDO_KFUNC_CALL: u8 = 2;

/// Whether the agent said, once, that it may not enter other network namespaces.
static SETNS_DENIED_REPORTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

impl SockTerm {
    /// Loads and attaches the iterators, reusing the pinned `KP_SOCK_LOCAL` and `KP_SOCK_REVNAT`
    /// under `maps_dir` (created by the main object first). Fails on kernels without the kfunc
    /// or iterators.
    pub fn load(maps_dir: &Path, max_sock_entries: u32) -> Result<SockTerm> {
        let btf = Btf::from_sys_fs().context("read the kernel's BTF")?;
        for kfunc in KFUNCS {
            btf.id_by_type_name_kind(kfunc, BtfKind::Func)
                .with_context(|| format!("kernel function {kfunc} not found (Linux >= 6.5 needed)"))?;
        }
        let object = resolve_kfuncs(SOCKTERM_OBJECT, &|name| btf.id_by_type_name_kind(name, BtfKind::Func).ok())?;
        let (revnat, local) = (maps_dir.join(SOCK_REVNAT_MAP), maps_dir.join(SOCK_LOCAL_MAP));
        for pin in [&revnat, &local] {
            if !pin.exists() {
                bail!("{} is not pinned", pin.display());
            }
        }
        let mut ebpf = EbpfLoader::new()
            .map_pin_path(SOCK_REVNAT_MAP, revnat.as_path())
            .map_pin_path(SOCK_LOCAL_MAP, local.as_path())
            .map_max_entries(SOCK_REVNAT_MAP, max_sock_entries)
            .map_max_entries(SOCK_TERM_MAP, SOCK_TERM_ENTRIES)
            .load(&bytemuck::cast_slice::<u64, u8>(&object)[..SOCKTERM_OBJECT.len()])
            .context("load the socket-termination object")?;
        let mut links = Vec::new();
        for (name, target, protocol) in ITERATORS {
            let program: &mut Iter = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing"))?
                .try_into()
                .with_context(|| format!("program {name} is not an iterator"))?;
            program.load(target, &btf).with_context(|| format!("load {name} (iter/{target})"))?;
            let link = sys::link_create_iter(program.fd().with_context(|| format!("fd of {name}"))?.as_fd())
                .with_context(|| format!("attach {name}"))?;
            links.push((protocol, link));
        }
        Ok(SockTerm { ebpf, links })
    }

    /// Destroys the sockets translated to `removed` backends, in every network namespace.
    pub fn terminate(&mut self, removed: &[SockTermKey]) -> Result<TermStats> {
        let started = Instant::now();
        let mut stats = TermStats::default();
        let namespaces = network_namespaces();
        stats.namespaces = namespaces.len();
        for chunk in removed.chunks(SOCK_TERM_ENTRIES as usize) {
            self.fill(chunk)?;
            // Only the iterators of the protocols listed: each is a walk of a hash table.
            let links: Vec<(u8, BorrowedFd<'_>)> = self
                .links
                .iter()
                .filter(|(p, _)| chunk.iter().any(|k| k.protocol == *p))
                .map(|(p, fd)| (*p, fd.as_fd()))
                .collect();
            let result = run_iterators(&links, &namespaces);
            let cleared = self.clear(chunk);
            let (udp, tcp) = result?;
            cleared?;
            stats.udp += udp;
            stats.tcp += tcp;
        }
        stats.duration = started.elapsed();
        Ok(stats)
    }

    fn term_map(&mut self) -> Result<BpfHashMap<&mut aya::maps::MapData, SockTermKey, u8>> {
        let map = self.ebpf.map_mut(SOCK_TERM_MAP).with_context(|| format!("map {SOCK_TERM_MAP} missing"))?;
        BpfHashMap::try_from(map).with_context(|| format!("map {SOCK_TERM_MAP}"))
    }

    fn fill(&mut self, keys: &[SockTermKey]) -> Result<()> {
        let mut map = self.term_map()?;
        for key in keys {
            map.insert(key, 1, 0).with_context(|| format!("{SOCK_TERM_MAP}: insert {key:?}"))?;
        }
        Ok(())
    }

    fn clear(&mut self, keys: &[SockTermKey]) -> Result<()> {
        let mut map = self.term_map()?;
        for key in keys {
            match map.remove(key) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(e).with_context(|| format!("{SOCK_TERM_MAP}: remove {key:?}")),
            }
        }
        Ok(())
    }
}

/// One open handle per distinct network namespace: the agent's own first, then those of every
/// process in `/proc`, then those bind-mounted under `/run/netns`. A process that exits
/// meanwhile is skipped.
pub fn network_namespaces() -> Vec<File> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let mut add = |path: &Path| {
        let Ok(file) = File::open(path) else { return };
        let Ok(meta) = file.metadata() else { return };
        if seen.insert((meta.dev(), meta.ino())) {
            out.push(file);
        }
    };
    add(Path::new("/proc/self/ns/net"));
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let name = entry.file_name();
            if name.to_str().is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit())) {
                add(&entry.path().join("ns/net"));
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(NETNS_DIR) {
        for entry in entries.flatten() {
            add(&entry.path());
        }
    }
    out
}

/// Runs every iterator in every namespace from a thread of its own (setns changes only the
/// calling thread's namespace, and this thread ends afterwards). The first namespace is the
/// agent's own, where the thread starts: it needs no `setns`, hence no `CAP_SYS_ADMIN`.
/// Returns the sockets destroyed (UDP, TCP): each destroyed socket writes one byte to its
/// iterator's output.
fn run_iterators(links: &[(u8, BorrowedFd<'_>)], namespaces: &[File]) -> Result<(usize, usize)> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| -> Result<(usize, usize)> {
                let (mut udp, mut tcp) = (0, 0);
                let mut errors = Vec::new();
                let mut denied = 0;
                for (i, ns) in namespaces.iter().enumerate() {
                    if i > 0 {
                        match nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET) {
                            Ok(()) => {}
                            Err(nix::errno::Errno::EPERM) => {
                                denied += 1;
                                continue;
                            }
                            // The namespace went away since it was listed.
                            Err(e) => {
                                tracing::debug!("setns: {e}");
                                continue;
                            }
                        }
                    }
                    for (protocol, link) in links {
                        let mut out = Vec::new();
                        let read = sys::iter_create(*link)
                            .map_err(anyhow::Error::from)
                            .and_then(|mut it| it.read_to_end(&mut out).context("read the iterator"));
                        match read {
                            Ok(n) if *protocol == PROTO_UDP => udp += n,
                            Ok(n) => tcp += n,
                            Err(e) => errors.push(e),
                        }
                    }
                }
                if denied > 0 && !SETNS_DENIED_REPORTED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    tracing::warn!(
                        namespaces = denied,
                        "setns refused (no CAP_SYS_ADMIN): sockets in network namespaces other than the agent's are not checked (said once)"
                    );
                }
                if let Some(e) = errors.into_iter().next() {
                    return Err(e.context("run a socket iterator"));
                }
                Ok((udp, tcp))
            })
            .join()
            .unwrap_or_else(|_| bail!("the socket iterator thread panicked"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The object as built: each call to `bpf_sock_destroy` is an extern call (src_reg 1,
    /// imm -1) that the patch turns into a kfunc call with the given id.
    #[test]
    fn kfunc_calls_are_patched_with_the_btf_id() {
        let patched = resolve_kfuncs(SOCKTERM_OBJECT, &|name| (name == "bpf_sock_destroy").then_some(4242)).unwrap();
        let patched = &bytemuck::cast_slice::<u64, u8>(&patched)[..SOCKTERM_OBJECT.len()];
        let diffs: Vec<usize> = (0..SOCKTERM_OBJECT.len()).filter(|i| patched[*i] != SOCKTERM_OBJECT[*i]).collect();
        assert!(!diffs.is_empty(), "nothing patched");
        let file = object::File::parse(patched).unwrap();
        let mut calls = 0;
        for section in file.sections() {
            let Some((base, _)) = section.file_range() else { continue };
            for (offset, rel) in section.relocations() {
                let RelocationTarget::Symbol(i) = rel.target() else { continue };
                if file.symbol_by_index(i).unwrap().name() == Ok("bpf_sock_destroy") {
                    let at = (base + offset) as usize;
                    let insn = &patched[at..at + 8];
                    assert_eq!((insn[0], insn[1] >> 4), (0x85, BPF_PSEUDO_KFUNC_CALL));
                    assert_eq!(i32::from_le_bytes(insn[4..8].try_into().unwrap()), 4242);
                    calls += 1;
                }
            }
        }
        assert_eq!(calls, 2, "one call per iterator (udp, tcp)");
        assert!(resolve_kfuncs(SOCKTERM_OBJECT, &|_| None).is_err(), "an unknown kfunc is an error");
    }
}
