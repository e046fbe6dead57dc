//! The initramfs of a VM: busybox, programs with the shared libraries `ldd` names for them,
//! kernel modules, and `/init`.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use super::cpio::CpioWriter;
use super::modules::Module;
use crate::cmd;

/// Where modules go in the image.
pub const MODULE_DIR: &str = "/lib/modules/kproxy-vm";

/// What goes into an image.
pub struct Contents {
    /// A static busybox; `/bin/busybox`, with `/bin/sh` linking to it.
    pub busybox: PathBuf,
    /// Programs: (file on the host, absolute path in the image). Their shared libraries and the
    /// dynamic loader come along at the paths `ldd` prints.
    pub programs: Vec<(PathBuf, String)>,
    /// Loaded by `/init` in this order, from [`MODULE_DIR`].
    pub modules: Vec<Module>,
    /// The `/init` script.
    pub init: String,
}

/// The libraries `ldd` resolves for `program` (absolute paths, loader included); none for a
/// static program.
pub fn shared_libraries(program: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(program)
        .output()
        .with_context(|| format!("running ldd {}", program.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // "not a dynamic executable": nothing to copy.
        return Ok(Vec::new());
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.contains("=> not found") {
            bail!("ldd {}: {line}", program.display());
        }
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.trim(),
            None => line,
        };
        let path = path.split(" (").next().unwrap_or("").trim();
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

/// A copy of `program` without debug information in `staging` (the Rust test binaries shrink
/// by an order of magnitude), or the program itself if `strip` is missing or fails.
fn stripped(program: &Path, staging: &Path) -> Result<PathBuf> {
    let name = program.file_name().context("program without a file name")?;
    let out = staging.join(name);
    let ok = cmd::succeeds(
        Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(&out)
            .arg(program),
    );
    Ok(if ok { out } else { program.to_path_buf() })
}

fn read(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// Writes the image to `out` (uncompressed newc cpio, which every kernel takes); `staging` holds
/// stripped copies meanwhile. Returns its size in bytes.
pub fn build(contents: &Contents, out: &Path, staging: &Path) -> Result<u64> {
    fs::create_dir_all(staging).with_context(|| format!("creating {}", staging.display()))?;
    let tmp = out.with_extension("partial");
    let file = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut cpio = CpioWriter::new(BufWriter::new(file));

    for dir in ["dev", "proc", "sys", "run", "tmp", "root", "etc", "usr/local/bin"] {
        cpio.dir(dir)?;
    }
    cpio.char_device("dev/console", 0o600, 5, 1)?;
    cpio.char_device("dev/null", 0o666, 1, 3)?;
    cpio.file("bin/busybox", 0o755, &read(&contents.busybox)?)?;
    cpio.symlink("bin/sh", "busybox")?;
    // Name resolution for "localhost" and the root user, for tools that look them up.
    cpio.file("etc/hosts", 0o644, b"127.0.0.1 localhost kproxy-vm\n")?;
    cpio.file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n")?;
    cpio.file("etc/group", 0o644, b"root:x:0:\n")?;

    let mut libraries = BTreeSet::new();
    for (program, dest) in &contents.programs {
        let small = stripped(program, staging)?;
        cpio.file(dest, 0o755, &read(&small)?)
            .with_context(|| format!("adding {}", program.display()))?;
        libraries.extend(shared_libraries(program)?);
    }
    for lib in &libraries {
        let dest = lib.to_string_lossy();
        if !cpio.contains(&dest) {
            // Follows symlinks: the image gets the library's content under the name ldd used.
            cpio.file(&dest, 0o755, &read(lib)?)?;
        }
    }
    for module in &contents.modules {
        cpio.file(
            &format!("{MODULE_DIR}/{}.ko", module.name),
            0o644,
            &module.data,
        )?;
    }
    cpio.file("init", 0o755, contents.init.as_bytes())?;
    cpio.finish()?;
    fs::rename(&tmp, out).with_context(|| format!("renaming {} to {}", tmp.display(), out.display()))?;
    Ok(fs::metadata(out)?.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_of_a_dynamic_program_names_the_loader() {
        let Ok(sh) = fs::canonicalize("/bin/sh") else { return };
        let libs = shared_libraries(&sh).unwrap();
        if !libs.is_empty() {
            assert!(
                libs.iter().any(|l| l.to_string_lossy().contains("ld-linux")),
                "{libs:?}"
            );
        }
    }
}
