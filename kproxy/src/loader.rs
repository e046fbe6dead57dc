//! Loading, attaching, pinning, adopting and removing kproxy's kernel objects.
//!
//! Layout under the bpffs directory (`--bpffs-dir`, default `/sys/fs/bpf/kproxy`):
//! ```text
//! maps/KP_SERVICES  maps/KP_BACKENDS  maps/KP_SVC_META  maps/KP_SVC_MEMBERS  maps/KP_SOCK_LOCAL
//! maps/KP_SOCK_REVNAT  maps/KP_SOCK_AFFIN  maps/KP_SOCK_STATS  maps/KP_CT  maps/KP_SRC_RANGES
//! maps/KP_AFFINITY  maps/KP_DROPS
//! links/kp_connect4 links/kp_sendmsg4 links/kp_recvmsg4 links/kp_getpeername4
//! ```
//! Pinned links keep the programs attached after the agent exits, and pinned maps keep their
//! content, so the datapath serves while no agent runs. A starting agent reuses the pinned maps
//! (aya opens a map that is already pinned instead of creating it), attaches freshly loaded
//! programs next to the old ones, and swaps the link pins by rename: the old link is released
//! only once the new one is attached, so no connection ever misses translation. While both are
//! attached, the old program translates first and the new one sees a backend address, which is
//! not a frontend, and leaves it alone. A map this binary has and the pins lack (added by an
//! upgrade) is created and pinned; the others are adopted after a check of their layout.

use std::{
    fs,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use aya::{
    maps::{HashMap as BpfHashMap, MapData},
    programs::{
        links::{FdLink, Link as _, LinkOrder, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
        CgroupAttachMode, CgroupSockAddr, ProgramType, SchedClassifier, TcAttachType,
    },
    sys::{is_helper_supported, BpfHelper},
    util::KernelVersion,
    Ebpf, EbpfLoader,
};
use aya_obj::generated::bpf_attach_type;
use kproxy_api::event::{Attached, TcAttachment};
use kproxy_common::{
    ct::{CtKey, CtValue, CT_MAP},
    drops::{DROPS_MAP, DROP_SLOTS},
    lb::{
        AffinityKey, AffinityValue, Backend, MemberKey, MemberValue, ServiceKey, ServiceMeta, ServiceValue,
        SourceRangeKey, AFFINITY_MAP, BACKENDS_MAP, DEFAULT_MAX_AFFINITY_ENTRIES, DEFAULT_MAX_SOURCE_RANGES,
        MEMBERS_MAP, SERVICES_MAP, SERVICE_META_MAP, SOURCE_RANGES_MAP,
    },
    nat::{Device, DEVICES_MAP},
    sock::{
        SockAffinityKey, SockAffinityValue, SockLocal, SockRevNatKey, SockRevNatValue, SOCK_AFFINITY_MAP,
        SOCK_LOCAL_MAP, SOCK_REVNAT_MAP, SOCK_STATS, SOCK_STATS_MAP,
    },
};

use crate::sys;

/// The eBPF object built by `build.rs` from the `kproxy-ebpf` crate.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/kproxy"));

/// The cgroup sock_addr programs, in attach order.
pub const PROGRAMS: [&str; 4] = ["kp_connect4", "kp_sendmsg4", "kp_recvmsg4", "kp_getpeername4"];

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
const DEFAULT_BPFFS_MOUNT: &str = "/sys/fs/bpf";

/// Map capacities, from the agent's flags.
#[derive(Clone, Copy, Debug)]
pub struct Capacities {
    pub max_services: u32,
    pub max_backends: u32,
    /// Capacity of each socket-level LRU map (reverse translation, UDP affinity).
    pub max_sock_entries: u32,
    /// Capacity of the tc connection-tracking map (LRU, two entries per flow).
    pub max_ct_entries: u32,
}

impl Default for Capacities {
    fn default() -> Self {
        Self {
            max_services: kproxy_common::lb::DEFAULT_MAX_SERVICES,
            max_backends: kproxy_common::lb::DEFAULT_MAX_BACKENDS,
            max_sock_entries: kproxy_common::sock::DEFAULT_MAX_SOCK_ENTRIES,
            max_ct_entries: kproxy_common::ct::DEFAULT_MAX_CT_ENTRIES,
        }
    }
}

impl Capacities {
    pub fn service_entries(&self) -> u32 {
        kproxy_common::lb::services_map_capacity(self.max_services, self.max_backends)
    }
}

/// Where kproxy's objects live in bpffs.
#[derive(Clone, Debug)]
pub struct PinLayout {
    pub root: PathBuf,
}

impl PinLayout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
    pub fn maps_dir(&self) -> PathBuf {
        self.root.join("maps")
    }
    pub fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }
}

fn fs_type(path: &Path) -> Result<i64> {
    let st = nix::sys::statfs::statfs(path).with_context(|| format!("statfs {}", path.display()))?;
    Ok(st.filesystem_type().0 as i64)
}

/// Makes sure `dir` can live on bpffs: if its nearest existing ancestor is not on bpffs and
/// `dir` is under `/sys/fs/bpf`, mounts bpffs there (as Cilium does).
pub fn ensure_bpffs(dir: &Path) -> Result<()> {
    let existing = dir.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/"));
    if fs_type(existing)? == BPF_FS_MAGIC {
        return Ok(());
    }
    if !dir.starts_with(DEFAULT_BPFFS_MOUNT) {
        bail!("{} is not on a bpf filesystem; mount one (mount -t bpf bpf DIR) or use a directory under {DEFAULT_BPFFS_MOUNT}", dir.display());
    }
    let mount_point = Path::new(DEFAULT_BPFFS_MOUNT);
    fs::create_dir_all(mount_point).with_context(|| format!("create {DEFAULT_BPFFS_MOUNT}"))?;
    // Private, as systemd mounts it (bpffs's own default is 0777).
    nix::mount::mount(Some("bpf"), mount_point, Some("bpf"), nix::mount::MsFlags::empty(), Some("mode=0700"))
        .with_context(|| format!("mount -t bpf -o mode=0700 bpf {DEFAULT_BPFFS_MOUNT}"))?;
    tracing::info!("mounted bpffs at {DEFAULT_BPFFS_MOUNT}");
    Ok(())
}

/// The mode of every directory kproxy creates in bpffs: only root may see, open or replace
/// the pins (which the kernel creates 0600).
pub const PIN_DIR_MODE: u32 = 0o700;

/// Creates kproxy's directories ([`PinLayout`]: the root, `maps/`, `links/`, and parents of
/// the root that do not exist yet) with mode [`PIN_DIR_MODE`] whatever the umask, and makes
/// them private if an older agent created them with a laxer mode. A root that is a mount point
/// (`--bpffs-dir /sys/fs/bpf`) keeps its mode: it is the file system's, not kproxy's.
fn create_private_dirs(layout: &PinLayout) -> Result<()> {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let mut missing: Vec<PathBuf> =
        layout.root.ancestors().skip(1).take_while(|p| !p.exists()).map(Path::to_path_buf).collect();
    missing.reverse();
    for dir in &missing {
        make_private_dir(dir)?;
    }
    let is_mount_point = |dir: &Path| {
        let dev = |p: &Path| fs::metadata(p).map(|m| m.dev()).ok();
        dir.parent().is_some_and(|parent| dev(parent) != dev(dir))
    };
    for dir in [layout.root.clone(), layout.maps_dir(), layout.links_dir()] {
        let mode = fs::metadata(&dir).ok().map(|m| m.permissions().mode() & 0o7777);
        if mode != Some(PIN_DIR_MODE) && !(mode.is_some() && is_mount_point(&dir)) {
            make_private_dir(&dir)?;
        }
    }
    Ok(())
}

/// `mkdir dir` (already existing is fine) then `chmod PIN_DIR_MODE dir`.
fn make_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    match fs::DirBuilder::new().mode(PIN_DIR_MODE).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("create {}", dir.display())),
    }
    // mkdir applies the umask (to 0700 it can only remove bits); the chmod makes the mode exact.
    fs::set_permissions(dir, fs::Permissions::from_mode(PIN_DIR_MODE))
        .with_context(|| format!("chmod {:o} {}", PIN_DIR_MODE, dir.display()))
}

/// The cgroup v2 mount point, from `/proc/self/mountinfo` (it is not always /sys/fs/cgroup).
pub fn cgroup2_root() -> Result<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").context("read /proc/self/mountinfo")?;
    for line in mountinfo.lines() {
        // "36 35 98:0 / /mnt1 rw,noatime master:1 - cgroup2 cgroup2 rw"
        let Some((left, right)) = line.split_once(" - ") else { continue };
        if right.split_whitespace().next() == Some("cgroup2") {
            if let Some(mount_point) = left.split_whitespace().nth(4) {
                return Ok(PathBuf::from(mount_point.replace("\\040", " ")));
            }
        }
    }
    bail!("no cgroup2 filesystem in /proc/self/mountinfo; kproxy needs cgroup v2")
}

/// Checks that a map already pinned at `path` has the layout this binary expects, so an
/// upgrade with a changed layout fails loudly instead of corrupting the datapath.
fn check_pinned_map(path: &Path, key_size: usize, value_size: usize, capacity: u32) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let map = MapData::from_pin(path).with_context(|| format!("open pinned map {}", path.display()))?;
    let info = map.info().with_context(|| format!("info of pinned map {}", path.display()))?;
    if info.key_size() as usize != key_size || info.value_size() as usize != value_size {
        bail!(
            "pinned map {} has key/value size {}/{} but this kproxy expects {key_size}/{value_size}; run `kproxy cleanup` to start afresh (this interrupts services)",
            path.display(),
            info.key_size(),
            info.value_size()
        );
    }
    if info.max_entries() != capacity {
        tracing::warn!(
            map = %path.display(),
            pinned = info.max_entries(),
            requested = capacity,
            "keeping the pinned map's capacity; a new capacity takes effect after `kproxy cleanup`"
        );
    }
    Ok(())
}

/// Whether `bpf_set_retval` exists for cgroup sock_addr programs (Linux 5.18).
fn has_set_retval() -> bool {
    KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(5, 18, 0))
}

/// Whether cgroup sock_addr programs may call `bpf_sk_storage_get` (Linux >= 5.3, "bpf: export
/// bpf_sock for BPF_PROG_TYPE_CGROUP_SOCK_ADDR prog type"): probed by loading a program that
/// calls it, as libbpf does, rather than guessed from the version (distributions backport).
pub fn has_socket_storage() -> bool {
    match is_helper_supported(ProgramType::CgroupSockAddr, BpfHelper::BPF_FUNC_sk_storage_get) {
        Ok(supported) => supported,
        Err(e) => {
            tracing::warn!("probing socket storage for sock_addr programs failed ({e}); using the shared LRU maps");
            false
        }
    }
}

/// Whether `bpf_ktime_get_coarse_ns` exists (Linux 5.11): the tc programs then read the
/// clock without a TSC read per packet.
fn has_coarse_clock() -> bool {
    KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(5, 11, 0))
}

/// Loads the eBPF object with every map sized from `caps`: pinned under `maps_dir` (reusing
/// maps already pinned there, after checking their layout), or private to this object when
/// `maps_dir` is `None` (tests). Programs are not loaded into the kernel yet. Socket storage is
/// used where the kernel has it.
pub fn load_object(maps_dir: Option<&Path>, caps: Capacities) -> Result<Ebpf> {
    load_object_with(maps_dir, caps, has_socket_storage())
}

/// As [`load_object`]; the socket programs keep translations in socket storage if
/// `socket_storage` (which needs [`has_socket_storage`]), else in the shared LRU maps only.
pub fn load_object_with(maps_dir: Option<&Path>, caps: Capacities, socket_storage: bool) -> Result<Ebpf> {
    // Capacity 0: socket storage has none (every socket carries its own).
    let specs: [(&str, usize, usize, u32); 12] = [
        (SERVICES_MAP, size_of::<ServiceKey>(), size_of::<ServiceValue>(), caps.service_entries()),
        (BACKENDS_MAP, size_of::<u32>(), size_of::<Backend>(), caps.max_backends),
        (SERVICE_META_MAP, size_of::<u32>(), size_of::<ServiceMeta>(), caps.max_services),
        (MEMBERS_MAP, size_of::<MemberKey>(), size_of::<MemberValue>(), caps.service_entries()),
        (SOCK_LOCAL_MAP, size_of::<i32>(), size_of::<SockLocal>(), 0),
        (SOCK_REVNAT_MAP, size_of::<SockRevNatKey>(), size_of::<SockRevNatValue>(), caps.max_sock_entries),
        (SOCK_AFFINITY_MAP, size_of::<SockAffinityKey>(), size_of::<SockAffinityValue>(), caps.max_sock_entries),
        (SOCK_STATS_MAP, size_of::<u32>(), size_of::<u64>(), SOCK_STATS),
        (CT_MAP, size_of::<CtKey>(), size_of::<CtValue>(), caps.max_ct_entries),
        (SOURCE_RANGES_MAP, size_of::<aya::maps::lpm_trie::Key<SourceRangeKey>>(), size_of::<u8>(), DEFAULT_MAX_SOURCE_RANGES),
        (AFFINITY_MAP, size_of::<AffinityKey>(), size_of::<AffinityValue>(), DEFAULT_MAX_AFFINITY_ENTRIES),
        (DROPS_MAP, size_of::<u32>(), size_of::<u64>(), DROP_SLOTS),
    ];
    let set_retval = u8::from(has_set_retval());
    let coarse_clock = u8::from(has_coarse_clock());
    let sk_storage = u8::from(socket_storage);
    let mut loader = EbpfLoader::new();
    loader.override_global("KP_HAS_SET_RETVAL", &set_retval, true);
    loader.override_global("KP_HAS_COARSE_CLOCK", &coarse_clock, true);
    loader.override_global("KP_HAS_SK_STORAGE", &sk_storage, true);
    let pins: Vec<(&str, PathBuf)> = match maps_dir {
        Some(dir) => specs.iter().map(|(name, ..)| (*name, dir.join(name))).collect(),
        None => Vec::new(),
    };
    for (name, key_size, value_size, capacity) in specs {
        if let Some((_, path)) = pins.iter().find(|(n, _)| *n == name) {
            check_pinned_map(path, key_size, value_size, capacity)?;
            loader.map_pin_path(name, path.as_path());
        }
        if capacity > 0 {
            loader.map_max_entries(name, capacity);
        }
    }
    let ebpf = loader.load(EBPF_OBJECT).context("load the eBPF object")?;
    tracing::debug!(set_retval, sk_storage, "eBPF object loaded");
    Ok(ebpf)
}

/// How tc programs attach.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TcAttach {
    /// TCX links where the kernel has them (Linux >= 6.6), netlink clsact filters otherwise.
    Auto,
    /// TCX links (Linux >= 6.6).
    Tcx,
    /// Netlink clsact filters (any kernel); keeps the older path tested on new kernels.
    Netlink,
}

/// The tc programs and their hooks.
const TC_PROGRAMS: [(&str, TcAttachType); 2] =
    [("kp_tc_ingress", TcAttachType::Ingress), ("kp_tc_egress", TcAttachType::Egress)];

/// Priority of kproxy's netlink tc filters (1 runs first, before other filters).
const TC_NETLINK_PRIORITY: u16 = 1;

/// Pins `link` at `links/<name>`, through a staged pin and a rename, so that the link a
/// previous agent pinned there is released only once the new one is attached.
fn pin_link_atomically(layout: &PinLayout, name: &str, link: FdLink) -> Result<()> {
    let pin = layout.links_dir().join(name);
    // bpffs refuses names with a dot.
    let staged = layout.links_dir().join(format!("{name}_staged"));
    let _ = fs::remove_file(&staged); // left over by an agent killed mid-swap
    link.pin(&staged).with_context(|| format!("pin link {}", staged.display()))?;
    fs::rename(&staged, &pin).with_context(|| format!("rename {} to {}", staged.display(), pin.display()))?;
    Ok(())
}

/// Loads the programs with the pinned maps (creating and pinning maps that do not exist yet),
/// attaches the socket programs to `cgroup` and the tc programs to `devices`, and pins the
/// links, replacing those of a previous agent without a gap. Socket translations go to socket
/// storage if `socket_storage` and the kernel has it, else to the shared LRU maps. Returns what
/// it did (the agent reports it as an [`Attached`] event).
pub fn load_and_attach(
    layout: &PinLayout,
    cgroup: &Path,
    devices: &[String],
    tc_attach: TcAttach,
    caps: Capacities,
    socket_storage: bool,
) -> Result<Attached> {
    ensure_bpffs(&layout.root)?;
    create_private_dirs(layout)?;
    if fs_type(cgroup)? != CGROUP2_SUPER_MAGIC {
        bail!("{} is not a cgroup v2 directory", cgroup.display());
    }
    let socket_storage = socket_storage && has_socket_storage();
    let mut ebpf = load_object_with(Some(&layout.maps_dir()), caps, socket_storage)?;

    let cgroup_dir = fs::File::open(cgroup).with_context(|| format!("open cgroup {}", cgroup.display()))?;
    for name in PROGRAMS {
        let program: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing from the eBPF object"))?
            .try_into()
            .with_context(|| format!("program {name} is not a cgroup sock_addr program"))?;
        program.load().with_context(|| format!("load program {name}"))?;
        let link_id = program
            // A cgroup bpf_link always coexists with other programs (the kernel rejects any
            // attach flag on link create), which is what lets old and new overlap.
            .attach(cgroup_dir.as_fd(), CgroupAttachMode::Single)
            .with_context(|| format!("attach {name} to {}", cgroup.display()))?;
        let link: FdLink = program
            .take_link(link_id)
            .with_context(|| format!("take link of {name}"))?
            .try_into()
            .with_context(|| format!("link of {name} is not a bpf_link (Linux >= 5.7 needed)"))?;
        pin_link_atomically(layout, name, link)?;
    }
    write_devices(&mut ebpf, devices)?;
    let tcx = match tc_attach {
        TcAttach::Auto => KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0)),
        TcAttach::Tcx => true,
        TcAttach::Netlink => false,
    };
    for (name, attach_type) in TC_PROGRAMS {
        let program: &mut SchedClassifier = ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing from the eBPF object"))?
            .try_into()
            .with_context(|| format!("program {name} is not a classifier"))?;
        program.load().with_context(|| format!("load program {name}"))?;
        for device in devices {
            if tcx {
                attach_tcx(layout, program, name, device, attach_type)?;
            } else {
                attach_netlink(program, name, device, attach_type)?;
            }
        }
    }
    let set_retval = has_set_retval();
    tracing::info!(
        cgroup = %cgroup.display(),
        bpffs = %layout.root.display(),
        devices = ?devices,
        tc = if tcx { "tcx" } else { "netlink" },
        set_retval,
        socket_storage,
        "programs attached"
    );
    Ok(Attached {
        cgroup: cgroup.display().to_string(),
        bpffs: layout.root.display().to_string(),
        devices: devices.to_vec(),
        tc: if tcx { TcAttachment::Tcx } else { TcAttachment::Netlink },
        set_retval,
    })
}

/// Fills the (unpinned, per-load) devices map: each tc device's ifindex → its first IPv4
/// address, the source of flows translated towards backends on other nodes. Written before
/// the tc programs that read it are attached.
fn write_devices(ebpf: &mut Ebpf, devices: &[String]) -> Result<()> {
    let addresses = crate::node::ipv4_addresses()?;
    let map = ebpf.map_mut(DEVICES_MAP).with_context(|| format!("map {DEVICES_MAP} missing from the eBPF object"))?;
    let mut map: BpfHashMap<_, u32, Device> = BpfHashMap::try_from(map).with_context(|| format!("map {DEVICES_MAP}"))?;
    for device in devices {
        let ifindex = nix::net::if_::if_nametoindex(device.as_str()).with_context(|| format!("device {device}"))?;
        let Some((_, address)) = addresses.iter().find(|(name, _)| name == device) else {
            tracing::warn!(device, "device has no IPv4 address: flows through it to backends on other nodes cannot be source-translated and will fail");
            continue;
        };
        map.insert(ifindex, Device { snat_address: address.octets() }, 0)
            .with_context(|| format!("{DEVICES_MAP}: insert {device} (ifindex {ifindex})"))?;
        tracing::info!(device, ifindex, snat_address = %address, "device programmed");
    }
    Ok(())
}

/// TCX: a bpf_link per device and direction, pinned like the socket programs' links; the new
/// link is attached before the old one is released.
fn attach_tcx(layout: &PinLayout, program: &mut SchedClassifier, name: &str, device: &str, at: TcAttachType) -> Result<()> {
    let link_id = program
        .attach_with_options(device, at, TcAttachOptions::TcxOrder(LinkOrder::default()))
        .with_context(|| format!("attach {name} to {device} with TCX (Linux >= 6.6; try --tc-attach netlink)"))?;
    let link: FdLink = program
        .take_link(link_id)
        .with_context(|| format!("take link of {name}"))?
        .try_into()
        .with_context(|| format!("TCX link of {name} is not a bpf_link"))?;
    pin_link_atomically(layout, &format!("{name}_{device}"), link)
}

/// Netlink: a clsact filter per device and direction, at kproxy's priority. Filters live in
/// the kernel, not in this process. The new filter takes the handle (1 or 2) the old one does
/// not use, and the old one is removed only after the new one is in place.
fn attach_netlink(program: &mut SchedClassifier, name: &str, device: &str, at: TcAttachType) -> Result<()> {
    match tc::qdisc_add_clsact(device) {
        Ok(()) | Err(tc::TcError::AlreadyAttached) => {}
        Err(tc::TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
        Err(e) => return Err(e).with_context(|| format!("add clsact qdisc to {device}")),
    }
    let mut last_err = None;
    for (new, old) in [(1u16, 2u16), (2, 1)] {
        let options = NlOptions { priority: TC_NETLINK_PRIORITY, handle: TcHandle::new(0, new), classid: None };
        match program.attach_with_options(device, at, TcAttachOptions::Netlink(options)) {
            Ok(link_id) => {
                let link = program.take_link(link_id).with_context(|| format!("take link of {name}"))?;
                // The filter must outlive this process: forget the handle that would detach it.
                std::mem::forget(link);
                if let Ok(previous) = SchedClassifierLink::attached(device, at, TC_NETLINK_PRIORITY, TcHandle::new(0, old), None) {
                    // Absent on a first start; detaching a missing filter is not an error.
                    let _ = previous.detach();
                }
                return Ok(());
            }
            Err(e) => last_err = Some(e), // the handle is taken by the previous agent's filter
        }
    }
    Err(last_err.expect("two attempts")).with_context(|| format!("attach {name} to {device} with netlink"))
}

/// Removes kproxy's netlink tc filters from every device of this network namespace.
fn detach_netlink_filters() -> Result<usize> {
    let mut removed = 0;
    for device in crate::node::devices()? {
        for (name, at) in TC_PROGRAMS {
            if tc::qdisc_detach_program(&device, at, name).is_ok() {
                removed += 1;
            }
        }
    }
    Ok(removed)
}

/// cgroup attach types of the sock_addr hooks kproxy uses.
const SOCK_ADDR_ATTACH_TYPES: [(bpf_attach_type, &str); 4] = [
    (bpf_attach_type::BPF_CGROUP_INET4_CONNECT, "connect4"),
    (bpf_attach_type::BPF_CGROUP_UDP4_SENDMSG, "sendmsg4"),
    (bpf_attach_type::BPF_CGROUP_UDP4_RECVMSG, "recvmsg4"),
    (bpf_attach_type::BPF_CGROUP_INET4_GETPEERNAME, "getpeername4"),
];

/// Ids of the programs attached directly to `cgroup` at kproxy's hooks (`BPF_PROG_QUERY`).
fn attached_program_ids(cgroup: &Path) -> Result<Vec<u32>> {
    let dir = fs::File::open(cgroup).with_context(|| format!("open cgroup {}", cgroup.display()))?;
    let mut ids = Vec::new();
    for (attach_type, hook) in SOCK_ADDR_ATTACH_TYPES {
        let mut prog_ids = [0u32; 64];
        let count = sys::prog_query(dir.as_fd(), attach_type, &mut prog_ids)
            .with_context(|| format!("programs at {hook} of {}", cgroup.display()))?;
        ids.extend_from_slice(&prog_ids[..count]);
    }
    Ok(ids)
}

/// Names of kproxy programs (`kp_*`) still attached directly to `cgroup`.
pub fn attached_kproxy_programs(cgroup: &Path) -> Result<Vec<String>> {
    let ids = attached_program_ids(cgroup)?;
    let mut names = Vec::new();
    for info in aya::programs::loaded_programs() {
        let info = match info {
            Ok(info) => info,
            // A program freed between the listing of its id and the opening of it (as the
            // programs of unpinned links are, right after `cleanup`) is attached nowhere.
            Err(aya::programs::ProgramError::SyscallError(aya::sys::SyscallError { io_error, .. }))
                if io_error.raw_os_error() == Some(libc::ENOENT) =>
            {
                continue
            }
            Err(e) => return Err(e).context("list loaded BPF programs"),
        };
        if ids.contains(&info.id()) {
            let name = info.name_as_str().unwrap_or_default().to_string();
            if name.starts_with("kp_") {
                names.push(name);
            }
        }
    }
    Ok(names)
}

/// Waits up to `timeout` for `cgroup` to have no kproxy program attached, and returns those
/// still attached then. Removing a link's last pin does not detach it at once: bpffs frees the
/// inode, and with it the link, after an RCU grace period (tens of milliseconds on a loaded
/// machine, seconds under emulation on Linux 5.10), so a single check right after `cleanup`
/// can see programs that are already on their way out.
pub fn wait_detached(cgroup: &Path, timeout: Duration) -> Result<Vec<String>> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = attached_kproxy_programs(cgroup)?;
        if left.is_empty() || Instant::now() >= deadline {
            return Ok(left);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What `cleanup` removed.
#[derive(Debug, Default)]
pub struct CleanupReport {
    pub links: Vec<PathBuf>,
    pub maps: Vec<PathBuf>,
    /// Netlink tc filters removed (from any device of this network namespace).
    pub tc_filters: usize,
}

/// Detaches and removes everything kproxy pinned under `layout`. Idempotent.
pub fn cleanup(layout: &PinLayout) -> Result<CleanupReport> {
    let mut report = CleanupReport { tc_filters: detach_netlink_filters()?, ..Default::default() };
    if !layout.root.exists() {
        return Ok(report);
    }
    let links_dir = layout.links_dir();
    if links_dir.exists() {
        for entry in fs::read_dir(&links_dir).with_context(|| format!("read {}", links_dir.display()))? {
            let path = entry?.path();
            // The pin is the only reference kproxy keeps to a link (the agent drops its fds
            // once pinned), so removing it detaches the program.
            let link = PinnedLink::from_pin(&path).with_context(|| format!("open pinned link {}", path.display()))?;
            link.unpin().with_context(|| format!("unpin {}", path.display()))?;
            report.links.push(path);
        }
    }
    let maps_dir = layout.maps_dir();
    if maps_dir.exists() {
        for entry in fs::read_dir(&maps_dir).with_context(|| format!("read {}", maps_dir.display()))? {
            let path = entry?.path();
            fs::remove_file(&path).with_context(|| format!("unpin {}", path.display()))?;
            report.maps.push(path);
        }
    }
    for dir in [links_dir, maps_dir, layout.root.clone()] {
        if dir.exists() {
            fs::remove_dir(&dir).with_context(|| format!("remove {}", dir.display()))?;
        }
    }
    Ok(report)
}
