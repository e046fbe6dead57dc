//! `cargo xtask setup`: installs what is missing, prints one line per item.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use xtask::cmd;

/// Debian packages used by the build, the tests, the demo and the benchmarks.
const PACKAGES: &[&str] = &[
    "iproute2", "curl", "bpftool", "iptables", "nftables", "wrk", "iperf3",
];

/// Debian packages `cargo xtask vm-test` needs on the host, installed without their
/// recommends (qemu's would bring a graphical stack): qemu-system-x86 boots the kernels;
/// debian-archive-keyring verifies the private apt lists that fetch the kernel, busybox-static
/// and bullseye's bpftool packages (xtask/src/vm/debian.rs; none of those is installed on the
/// host); binutils' strip shrinks the test binaries in the initramfs. dpkg-deb and ldd are
/// essential packages; the initramfs is written by xtask itself (no cpio needed).
const VM_PACKAGES: &[&str] = &["qemu-system-x86", "debian-archive-keyring", "binutils"];

pub fn run() -> Result<()> {
    debian_packages(PACKAGES, false)?;
    debian_packages(VM_PACKAGES, true)?;
    nightly_toolchain()?;
    bpf_linker()?;
    Ok(())
}

fn report(done: bool, item: &str) {
    println!("{:<9} {item}", if done { "installed" } else { "ok" });
}

fn dpkg_installed(package: &str) -> bool {
    cmd::output(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
        .is_ok_and(|status| status.trim() == "install ok installed")
}

fn debian_packages(packages: &[&str], no_recommends: bool) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if !missing.is_empty() {
        println!("installing Debian packages: {}", missing.join(" "));
        cmd::run(Command::new("apt-get").arg("update"))?;
        let mut install = Command::new("apt-get");
        install.args(["install", "-y"]);
        if no_recommends {
            install.arg("--no-install-recommends");
        }
        cmd::run(
            install
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }
    report(
        !missing.is_empty(),
        &format!("Debian packages ({})", packages.join(" ")),
    );
    Ok(())
}

fn nightly_toolchain() -> Result<()> {
    let toolchains = cmd::output(Command::new("rustup").args(["toolchain", "list"]))?;
    let has_nightly = toolchains.lines().any(|l| l.starts_with("nightly-"));
    if !has_nightly {
        cmd::run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
    }
    report(!has_nightly, "rustup toolchain nightly");

    let components = cmd::output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    let has_src = components.lines().any(|l| l.starts_with("rust-src"));
    if !has_src {
        cmd::run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    report(!has_src, "rust-src for nightly");
    Ok(())
}

/// Builds bpf-linker against the LLVM inside the nightly toolchain, so that both agree exactly
/// on the bitcode they exchange.
fn bpf_linker() -> Result<()> {
    if cmd::succeeds(Command::new("bpf-linker").arg("--version")) {
        report(false, "bpf-linker");
        return Ok(());
    }
    let sysroot = PathBuf::from(
        cmd::output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?.trim(),
    );
    let lib_dir = sysroot.join("lib");
    let mut llvm_libs: Vec<String> = fs::read_dir(&lib_dir)
        .with_context(|| format!("reading {}", lib_dir.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| name.starts_with("libLLVM.so."))
        .collect();
    llvm_libs.sort();
    let Some(llvm_lib) = llvm_libs.first() else {
        bail!(
            "no libLLVM.so.* in {}: is the nightly toolchain complete?",
            lib_dir.display()
        );
    };
    // bpf-linker's build links against plain `libLLVM.so`, which rustup does not ship.
    let link = lib_dir.join("libLLVM.so");
    if fs::read_link(&link).ok().as_deref() != Some(Path::new(llvm_lib)) {
        if link.symlink_metadata().is_ok() {
            fs::remove_file(&link).with_context(|| format!("removing {}", link.display()))?;
        }
        symlink(llvm_lib, &link).with_context(|| format!("linking {}", link.display()))?;
    }

    let version = cmd::output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let major = llvm_major(&version)
        .with_context(|| format!("no LLVM version in `rustc +nightly -vV`:\n{version}"))?;
    println!("building bpf-linker against nightly's LLVM {major} (takes a minute or two)");
    cmd::run(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--no-default-features",
                "--features",
            ])
            .arg(format!("llvm-{major}"))
            .env("LLVM_PREFIX", &sysroot),
    )?;
    if !cmd::succeeds(Command::new("bpf-linker").arg("--version")) {
        bail!(
            "bpf-linker was installed but `bpf-linker --version` fails: is ~/.cargo/bin on PATH?"
        );
    }
    report(true, "bpf-linker");
    Ok(())
}

/// The major version from rustc's "LLVM version: 22.1.2" line.
fn llvm_major(rustc_version: &str) -> Option<u32> {
    rustc_version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))?
        .split('.')
        .next()?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_llvm_major() {
        let v = "rustc 1.97.0-nightly\nhost: x86_64-unknown-linux-gnu\nLLVM version: 22.1.2\n";
        assert_eq!(llvm_major(v), Some(22));
        assert_eq!(llvm_major("rustc 1.0"), None);
    }
}
