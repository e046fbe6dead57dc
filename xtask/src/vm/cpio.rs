//! A writer for the "newc" cpio format, the one the kernel unpacks as an initramfs
//! (`Documentation/driver-api/early-userspace/buffer-format.rst`).
//!
//! Written here rather than with the `cpio` tool so that the archive can hold device nodes and
//! root-owned files without privileges, and its content does not depend on the host's files'
//! owners or times.

use std::collections::BTreeSet;
use std::io::{self, Write};

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// Writes entries in the order given; parent directories are added on first use.
pub struct CpioWriter<W: Write> {
    out: W,
    next_ino: u32,
    dirs: BTreeSet<String>,
    names: BTreeSet<String>,
}

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> Self {
        CpioWriter {
            out,
            next_ino: 1,
            dirs: BTreeSet::new(),
            names: BTreeSet::new(),
        }
    }

    /// `path` without leading or trailing slashes (`usr/lib`); the root itself is implicit.
    fn normalize(path: &str) -> String {
        path.trim_matches('/').to_string()
    }

    fn header(&mut self, name: &str, mode: u32, size: usize, rdev: (u32, u32)) -> io::Result<()> {
        let ino = self.next_ino;
        self.next_ino += 1;
        let nlink = if mode & S_IFDIR != 0 { 2 } else { 1 };
        let fields = [
            ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime: fixed, so that identical inputs give identical archives
            u32::try_from(size).map_err(|_| io::Error::other(format!("{name} is over 4 GiB")))?,
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            (name.len() + 1) as u32,
            0, // check
        ];
        let mut header = String::from("070701");
        for field in fields {
            header.push_str(&format!("{field:08x}"));
        }
        self.out.write_all(header.as_bytes())?;
        self.out.write_all(name.as_bytes())?;
        self.out.write_all(&[0])?;
        self.pad(110 + name.len() + 1)
    }

    fn pad(&mut self, len: usize) -> io::Result<()> {
        let padding = (4 - len % 4) % 4;
        self.out.write_all(&[0; 3][..padding])
    }

    fn entry(&mut self, path: &str, mode: u32, data: &[u8], rdev: (u32, u32)) -> io::Result<()> {
        let name = Self::normalize(path);
        if let Some((parent, _)) = name.rsplit_once('/') {
            self.dir(parent)?;
        }
        if !self.names.insert(name.clone()) {
            return Err(io::Error::other(format!("{name} added twice to the initramfs")));
        }
        self.header(&name, mode, data.len(), rdev)?;
        self.out.write_all(data)?;
        self.pad(data.len())
    }

    /// A directory (mode 0755), and its parents; adding one twice is harmless.
    pub fn dir(&mut self, path: &str) -> io::Result<()> {
        let name = Self::normalize(path);
        if name.is_empty() || self.dirs.contains(&name) {
            return Ok(());
        }
        self.dirs.insert(name.clone());
        self.entry(&name, S_IFDIR | 0o755, &[], (0, 0))
    }

    /// A regular file with permission bits `perm` (e.g. 0o755).
    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.entry(path, S_IFREG | (perm & 0o7777), data, (0, 0))
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        self.entry(path, S_IFLNK | 0o777, target.as_bytes(), (0, 0))
    }

    /// A character device, such as `/dev/console` (5, 1): the kernel opens it for init's stdio
    /// before any devtmpfs is mounted.
    pub fn char_device(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.entry(path, S_IFCHR | (perm & 0o7777), &[], (major, minor))
    }

    /// Whether `path` was added (as anything).
    pub fn contains(&self, path: &str) -> bool {
        self.names.contains(&Self::normalize(path))
    }

    /// Writes the trailer and returns the writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.header("TRAILER!!!", 0, 0, (0, 0))?;
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_aligned_newc_entries() {
        let mut w = CpioWriter::new(Vec::new());
        w.file("/bin/x", 0o755, b"hello").unwrap();
        w.symlink("bin/sh", "x").unwrap();
        let out = w.finish().unwrap();
        let text = String::from_utf8_lossy(&out);
        // bin (directory), bin/x, bin/sh, trailer; every header at a 4-byte boundary.
        let headers: Vec<usize> = text.match_indices("070701").map(|(i, _)| i).collect();
        assert_eq!(headers.len(), 4, "{text:?}");
        assert!(headers.iter().all(|i| i % 4 == 0), "{headers:?}");
        assert!(text.contains("bin\0"));
        assert!(text.contains("bin/x\0"));
        assert!(text.contains("hello"));
        assert!(text.contains("TRAILER!!!\0"));
        assert_eq!(out.len() % 4, 0);
    }

    #[test]
    fn refuses_duplicates() {
        let mut w = CpioWriter::new(Vec::new());
        w.file("a", 0o644, b"1").unwrap();
        assert!(w.file("/a", 0o644, b"2").is_err());
        w.dir("d").unwrap();
        w.dir("d/").unwrap();
    }
}
