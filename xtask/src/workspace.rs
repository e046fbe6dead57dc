//! Where things are: the workspace root, its `cargo`, its target directory, and the binaries
//! `cargo xtask build` makes there.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::cmd;

/// The workspace root (the parent of the xtask crate).
pub fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
}

/// `cargo` (the one running us, if any), in the workspace root.
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

/// Cargo's target directory (honours `CARGO_TARGET_DIR` and config).
pub fn target_dir() -> Result<PathBuf> {
    let mut cmd = cargo();
    cmd.args(["metadata", "--format-version", "1", "--no-deps"]);
    let metadata: serde_json::Value =
        serde_json::from_str(&cmd::output(&mut cmd)?).context("parsing `cargo metadata` output")?;
    metadata
        .get("target_directory")
        .and_then(|v| v.as_str())
        .map(PathBuf::from)
        .context("cargo metadata has no target_directory")
}

/// The binaries a harness runs.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub kproxy: PathBuf,
    pub testpod: PathBuf,
}

impl Binaries {
    /// `<target>/debug/kproxy` and `<target>/debug/kproxy-testpod`.
    pub fn in_target_dir(target: &Path) -> Binaries {
        Self::in_profile(target, "debug")
    }

    /// `<target>/<profile>/kproxy` and `<target>/<profile>/kproxy-testpod`.
    pub fn in_profile(target: &Path, profile: &str) -> Binaries {
        let dir = target.join(profile);
        Binaries {
            kproxy: dir.join("kproxy"),
            testpod: dir.join("kproxy-testpod"),
        }
    }

    /// `KPROXY_BIN` and `KPROXY_TESTPOD_BIN` (as `cargo xtask` passes them to the programs it
    /// runs); fails unless both are set and exist.
    pub fn from_env() -> Result<Binaries> {
        let from_env = |var: &str| -> Result<PathBuf> {
            std::env::var_os(var)
                .map(PathBuf::from)
                .with_context(|| format!("{var} is not set"))
        };
        let bins = Binaries {
            kproxy: from_env("KPROXY_BIN")?,
            testpod: from_env("KPROXY_TESTPOD_BIN")?,
        };
        bins.check()?;
        Ok(bins)
    }

    /// Fails unless both files exist.
    pub fn check(&self) -> Result<()> {
        for path in [&self.kproxy, &self.testpod] {
            if !path.is_file() {
                bail!(
                    "{} does not exist: build it first (`cargo xtask build`)",
                    path.display()
                );
            }
        }
        Ok(())
    }
}
