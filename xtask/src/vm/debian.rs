//! Debian packages for the VMs: the kernels (5.10 from bullseye, 6.1 from bookworm, 6.12 from
//! bookworm-backports), busybox-static and bullseye's bpftool (for kernels before 6.0), fetched
//! once with `apt-get download` and cached.
//!
//! apt runs with a private configuration under `<target>/vm/apt` (its own sources list, lists
//! and cache directories), so the host's apt sources and state are not touched. Once a package's
//! `.deb` is in `<target>/vm/debs`, nothing is fetched again: delete the file to pick up a newer
//! build.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::cmd;

const MIRROR: &str = "http://deb.debian.org/debian";
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";
const SUITES: &[&str] = &["bullseye", "bookworm", "bookworm-backports"];

/// apt with a private sources list, lists and cache under `dir`.
pub struct Apt {
    dir: PathBuf,
    updated: bool,
}

impl Apt {
    pub fn new(dir: &Path) -> Result<Apt> {
        for sub in ["lists/partial", "cache/archives/partial", "sources.list.d"] {
            let path = dir.join(sub);
            fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        }
        let sources: String = SUITES
            .iter()
            .map(|suite| format!("deb [signed-by={KEYRING}] {MIRROR} {suite} main\n"))
            .collect();
        let list = dir.join("sources.list");
        fs::write(&list, sources).with_context(|| format!("writing {}", list.display()))?;
        Ok(Apt {
            dir: dir.to_path_buf(),
            updated: false,
        })
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        let dir = self.dir.display();
        for option in [
            format!("Dir::Etc::sourcelist={dir}/sources.list"),
            format!("Dir::Etc::sourceparts={dir}/sources.list.d"),
            format!("Dir::State::Lists={dir}/lists"),
            format!("Dir::Cache={dir}/cache"),
            // Only the package lists: no translations, no AppStream metadata.
            "Acquire::Languages=none".into(),
            "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false".into(),
            "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false".into(),
            "Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false".into(),
            "Acquire::IndexTargets::deb::CNF::DefaultEnabled=false".into(),
            // The private directories belong to root; apt's download user could not write them.
            "APT::Sandbox::User=root".into(),
        ] {
            command.arg("-o").arg(option);
        }
        command.env("DEBIAN_FRONTEND", "noninteractive");
        command
    }

    /// `apt-get update` of the private lists, once per run.
    fn update(&mut self) -> Result<()> {
        if !self.updated {
            println!("vm: apt-get update ({})", SUITES.join(", "));
            let mut update = self.command("apt-get");
            update.args(["-q", "update"]);
            cmd::output(&mut update)?;
            self.updated = true;
        }
        Ok(())
    }

    /// Names of packages matching the (apt-cache) regular expression `pattern`.
    fn search(&mut self, pattern: &str) -> Result<Vec<String>> {
        self.update()?;
        let mut search = self.command("apt-cache");
        search.args(["search", "--names-only", pattern]);
        Ok(cmd::output(&mut search)?
            .lines()
            .filter_map(|l| l.split(" - ").next())
            .map(str::to_string)
            .collect())
    }

    /// `apt-get download <package>` into `dest`; returns the `.deb` (named `<deb_prefix>*`).
    fn download(&mut self, package: &str, dest: &Path, deb_prefix: &str) -> Result<PathBuf> {
        self.update()?;
        println!("vm: apt-get download {package}");
        let mut download = self.command("apt-get");
        download.args(["-q", "download", package]).current_dir(dest);
        cmd::output(&mut download)?;
        find_deb(dest, deb_prefix)?
            .with_context(|| format!("apt-get download {package} left no .deb in {}", dest.display()))
    }
}

/// The `.deb` in `dir` whose name starts with `prefix` (the newest by name, if several).
fn find_deb(dir: &Path, prefix: &str) -> Result<Option<PathBuf>> {
    let mut debs: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix) && n.ends_with(".deb"))
        })
        .collect();
    debs.sort_by_key(|p| version_key(&p.to_string_lossy()));
    Ok(debs.pop())
}

/// The numbers in `s`, for ordering package names such as `linux-image-6.1.0-50-...` and
/// `linux-image-6.1.0-9-...` numerically.
fn version_key(s: &str) -> Vec<u64> {
    s.split(|c: char| !c.is_ascii_digit())
        .filter(|part| !part.is_empty())
        .filter_map(|part| part.parse().ok())
        .collect()
}

/// Where the package for a kernel series is cached and what the kernel is called.
pub struct KernelPackage {
    /// The extracted package: `boot/vmlinuz-<release>`, `lib/modules/<release>/`.
    pub root: PathBuf,
    /// `uname -r` of the kernel, e.g. `5.10.0-32-cloud-amd64`.
    pub release: String,
    /// The `.deb` it came from.
    pub deb: PathBuf,
}

impl KernelPackage {
    pub fn vmlinuz(&self) -> PathBuf {
        self.root.join("boot").join(format!("vmlinuz-{}", self.release))
    }

    pub fn modules_dir(&self) -> PathBuf {
        self.root.join("lib/modules").join(&self.release)
    }
}

/// The cloud kernel package of `series` ("5.10", "6.1", "6.12"): the cached one, else the newest
/// of that series in the Debian archive, downloaded. Extracted under `cache/kernels/<series>`.
pub fn kernel(apt: &mut Apt, cache: &Path, series: &str) -> Result<KernelPackage> {
    let debs = cache.join("debs");
    fs::create_dir_all(&debs).with_context(|| format!("creating {}", debs.display()))?;
    let prefix = format!("linux-image-{series}.");
    let deb = match find_deb(&debs, &prefix)?.filter(|d| is_cloud_unsigned(d)) {
        Some(deb) => deb,
        None => {
            let escaped = series.replace('.', r"\.");
            let mut names = apt.search(&format!(
                r"^linux-image-{escaped}\.[0-9].*-cloud-amd64-unsigned$"
            ))?;
            names.sort_by_key(|n| version_key(n));
            let Some(newest) = names.pop() else {
                bail!("no linux-image-{series}.*-cloud-amd64-unsigned package in {SUITES:?}");
            };
            apt.download(&newest, &debs, &format!("{newest}_"))?
        }
    };
    let root = cache.join("kernels").join(series);
    extract_once(&deb, &root)?;
    let boot = root.join("boot");
    let release = fs::read_dir(&boot)
        .with_context(|| format!("reading {}", boot.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .find_map(|n| n.strip_prefix("vmlinuz-").map(str::to_string))
        .with_context(|| format!("no vmlinuz-* in {}", boot.display()))?;
    Ok(KernelPackage { root, release, deb })
}

fn is_cloud_unsigned(deb: &Path) -> bool {
    deb.to_string_lossy().contains("-cloud-amd64-unsigned_")
}

/// The static busybox from Debian's busybox-static package (cached, extracted once).
pub fn busybox(apt: &mut Apt, cache: &Path) -> Result<PathBuf> {
    package_file(apt, cache, "busybox-static", "busybox-static_", "bin/busybox")
}

/// bpftool from bullseye (5.10), for VMs with kernels before 6.0. bpftool 7 (bookworm's 7.1,
/// bookworm-backports' 7.5) sets `prog_attach_flags` in every `BPF_PROG_QUERY`, a field that
/// kernels before 6.0 reject (libbpf/bpftool#41), so its `cgroup show` fails there with exit
/// 255 and prints `[]`. bullseye's bpftool needs only libc, libcap, libelf and zlib, which the
/// image gets from the host through `ldd`.
pub fn bullseye_bpftool(apt: &mut Apt, cache: &Path) -> Result<PathBuf> {
    package_file(apt, cache, "bpftool/bullseye", "bpftool_5.10.", "usr/sbin/bpftool")
}

/// `file` from the Debian package `package` (`name` or `name/suite`) whose `.deb` name starts
/// with `deb_prefix`, downloaded once and extracted under `cache/<deb_prefix>`.
fn package_file(
    apt: &mut Apt,
    cache: &Path,
    package: &str,
    deb_prefix: &str,
    file: &str,
) -> Result<PathBuf> {
    let debs = cache.join("debs");
    fs::create_dir_all(&debs).with_context(|| format!("creating {}", debs.display()))?;
    let deb = match find_deb(&debs, deb_prefix)? {
        Some(deb) => deb,
        None => apt.download(package, &debs, deb_prefix)?,
    };
    let root = cache.join(deb_prefix.trim_end_matches(['_', '.']));
    extract_once(&deb, &root)?;
    let path = root.join(file);
    if !path.is_file() {
        bail!("{} has no {file}", deb.display());
    }
    Ok(path)
}

/// `dpkg-deb -x deb root`, unless a previous run did it (extracted to a temporary directory,
/// then renamed, so an interrupted extraction is redone).
fn extract_once(deb: &Path, root: &Path) -> Result<()> {
    let stamp = root.join(".extracted-from");
    if fs::read_to_string(&stamp).ok().as_deref() == Some(&*deb.to_string_lossy()) {
        return Ok(());
    }
    let staging = root.with_extension("partial");
    for dir in [&staging, &root.to_path_buf()] {
        if dir.exists() {
            fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
        }
    }
    fs::create_dir_all(&staging).with_context(|| format!("creating {}", staging.display()))?;
    println!("vm: extracting {}", deb.display());
    cmd::output(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&staging))?;
    fs::write(staging.join(".extracted-from"), deb.to_string_lossy().as_bytes())?;
    fs::rename(&staging, root)
        .with_context(|| format!("renaming {} to {}", staging.display(), root.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_abi_numbers_numerically() {
        let mut names = [
            "linux-image-6.1.0-9-cloud-amd64-unsigned",
            "linux-image-6.1.0-50-cloud-amd64-unsigned",
            "linux-image-6.1.0-47-cloud-amd64-unsigned",
        ];
        names.sort_by_key(|n| version_key(n));
        assert_eq!(names.last(), Some(&"linux-image-6.1.0-50-cloud-amd64-unsigned"));
    }
}
