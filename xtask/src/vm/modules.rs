//! Kernel modules from an extracted Debian kernel package: find them by name, decompress them
//! (6.12 ships `.ko.xz`), and order them so that each comes after the modules it depends on.
//!
//! Debian's packages do not ship `modules.dep` (`depmod` makes it at install time), and the host
//! need not have kmod, so dependencies are read from each module's own `.modinfo` ELF section
//! (`depends=stp,llc`).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::cmd;

/// A module ready to be put into an initramfs: its name and its uncompressed bytes.
#[derive(Debug, Clone)]
pub struct Module {
    pub name: String,
    pub data: Vec<u8>,
}

/// `veth`, `sch-ingress` and `sch_ingress` are the same module to the kernel.
fn canonical(name: &str) -> String {
    name.replace('-', "_")
}

/// The module name of a file name: `bridge.ko.xz` -> `bridge`.
fn module_name(file_name: &str) -> Option<String> {
    let stem = ["ko", "ko.xz", "ko.zst", "ko.gz"]
        .iter()
        .find_map(|ext| file_name.strip_suffix(&format!(".{ext}")))?;
    Some(canonical(stem))
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            walk(&path, out)?;
        } else {
            out.push(path);
        }
    }
    Ok(())
}

/// The uncompressed content of a module file.
fn read_module(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        "xz"
    } else if name.ends_with(".zst") {
        "zstd"
    } else if name.ends_with(".gz") {
        "gzip"
    } else {
        return fs::read(path).with_context(|| format!("reading {}", path.display()));
    };
    let out = Command::new(tool)
        .arg("-dc")
        .arg(path)
        .output()
        .with_context(|| format!("running `{tool} -dc {}` (is {tool} installed?)", path.display()))?;
    cmd::check_output(&format!("{tool} -dc {}", path.display()), &out)?;
    Ok(out.stdout)
}

/// The `.modinfo` section of an ELF64 little-endian object, as `key=value` strings.
pub fn modinfo(elf: &[u8]) -> Result<Vec<String>> {
    let u16_at = |off: usize| -> Result<u16> {
        Ok(u16::from_le_bytes(elf.get(off..off + 2).context("truncated ELF")?.try_into()?))
    };
    let u32_at = |off: usize| -> Result<u32> {
        Ok(u32::from_le_bytes(elf.get(off..off + 4).context("truncated ELF")?.try_into()?))
    };
    let u64_at = |off: usize| -> Result<usize> {
        Ok(u64::from_le_bytes(elf.get(off..off + 8).context("truncated ELF")?.try_into()?) as usize)
    };
    if elf.get(..4) != Some(b"\x7fELF") || elf.get(4) != Some(&2) || elf.get(5) != Some(&1) {
        bail!("not a 64-bit little-endian ELF object");
    }
    let shoff = u64_at(0x28)?;
    let shentsize = u16_at(0x3a)? as usize;
    let shnum = u16_at(0x3c)? as usize;
    let shstrndx = u16_at(0x3e)? as usize;
    let section = |i: usize| -> Result<(u32, usize, usize)> {
        let base = shoff + i * shentsize;
        // sh_name @0, sh_offset @0x18, sh_size @0x20
        Ok((u32_at(base)?, u64_at(base + 0x18)?, u64_at(base + 0x20)?))
    };
    let (_, strtab_off, strtab_size) = section(shstrndx)?;
    let strtab = elf
        .get(strtab_off..strtab_off + strtab_size)
        .context("section name table out of bounds")?;
    for i in 0..shnum {
        let (name_off, off, size) = section(i)?;
        let name = strtab
            .get(name_off as usize..)
            .and_then(|s| s.split(|&b| b == 0).next())
            .unwrap_or_default();
        if name == b".modinfo" {
            let data = elf.get(off..off + size).context(".modinfo out of bounds")?;
            return Ok(data
                .split(|&b| b == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect());
        }
    }
    bail!("no .modinfo section")
}

/// The modules of one kernel release, by name.
pub struct ModuleTree {
    /// `lib/modules/<release>`.
    root: PathBuf,
    files: BTreeMap<String, PathBuf>,
    builtin: BTreeSet<String>,
}

impl ModuleTree {
    /// Indexes `lib/modules/<release>` (module files and `modules.builtin`).
    pub fn open(root: &Path) -> Result<ModuleTree> {
        let mut paths = Vec::new();
        walk(&root.join("kernel"), &mut paths)?;
        let files = paths
            .into_iter()
            .filter_map(|p| Some((module_name(p.file_name()?.to_str()?)?, p)))
            .collect();
        let builtin = fs::read_to_string(root.join("modules.builtin"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| module_name(l.rsplit('/').next()?))
            .collect();
        Ok(ModuleTree {
            root: root.to_path_buf(),
            files,
            builtin,
        })
    }

    /// `wanted` and everything they depend on, each after its dependencies, uncompressed.
    /// Modules built into the kernel are left out (there is nothing to load).
    pub fn load_order(&self, wanted: &[&str]) -> Result<Vec<Module>> {
        let mut order = Vec::new();
        let mut done = BTreeSet::new();
        for name in wanted {
            self.visit(&canonical(name), &mut done, &mut Vec::new(), &mut order)?;
        }
        Ok(order)
    }

    fn visit(
        &self,
        name: &str,
        done: &mut BTreeSet<String>,
        stack: &mut Vec<String>,
        order: &mut Vec<Module>,
    ) -> Result<()> {
        if done.contains(name) || self.builtin.contains(name) {
            return Ok(());
        }
        if stack.iter().any(|s| s == name) {
            bail!("module dependency cycle: {} -> {name}", stack.join(" -> "));
        }
        let path = self.files.get(name).with_context(|| {
            format!(
                "module {name} is neither a file under {} nor in modules.builtin",
                self.root.display()
            )
        })?;
        let data = read_module(path)?;
        let info = modinfo(&data).with_context(|| format!("reading {}", path.display()))?;
        let depends: Vec<String> = info
            .iter()
            .filter_map(|kv| kv.strip_prefix("depends="))
            .flat_map(|deps| deps.split(','))
            .filter(|d| !d.is_empty())
            .map(canonical)
            .collect();
        stack.push(name.to_string());
        for dep in &depends {
            self.visit(dep, done, stack, order)?;
        }
        stack.pop();
        done.insert(name.to_string());
        order.push(Module {
            name: name.to_string(),
            data,
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_of_module_files() {
        assert_eq!(module_name("bridge.ko.xz").as_deref(), Some("bridge"));
        assert_eq!(module_name("sch-ingress.ko").as_deref(), Some("sch_ingress"));
        assert_eq!(module_name("modules.order"), None);
    }

    #[test]
    fn rejects_non_elf() {
        assert!(modinfo(b"not an elf").is_err());
    }
}
