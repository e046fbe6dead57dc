//! `cargo xtask demo` and `cargo xtask bench`: programs of the `kproxy-e2e` and `kproxy-bench`
//! crates, whose dependencies (an HTTP server, Kubernetes types, plotting) xtask itself does not
//! carry.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Result};
use xtask::workspace::Binaries;
use xtask::{cmd, interrupt};

use super::{build::build, cargo, target_dir, workspace_root};

/// Builds (unless `no_build`), then runs `kproxy-demo` on `manifests` [default:
/// deploy/examples/demo.yaml].
pub fn demo(manifests: Option<PathBuf>, no_build: bool) -> Result<()> {
    let bins = if no_build {
        let bins = Binaries::in_target_dir(&target_dir()?);
        bins.check()?;
        bins
    } else {
        build(false)?
    };
    let demo = target_dir()?.join("debug/kproxy-demo");
    if !demo.is_file() {
        bail!("{} does not exist: build it first (drop --no-build)", demo.display());
    }
    let manifest = manifests.unwrap_or_else(|| workspace_root().join("deploy/examples/demo.yaml"));
    // The demo turns Ctrl-C into an orderly teardown: wait for it rather than die first.
    interrupt::install()?;
    cmd::run(
        Command::new(demo)
            .arg("--manifests")
            .arg(manifest)
            .env("KPROXY_BIN", &bins.kproxy)
            .env("KPROXY_TESTPOD_BIN", &bins.testpod),
    )
}

/// `cargo run --package kproxy-bench -- <args>`: the benchmark parses its own arguments and
/// builds what it measures (`cargo xtask build`, in the profile it measures).
pub fn bench(args: &[String]) -> Result<()> {
    interrupt::install()?;
    cmd::run(
        cargo()
            .args(["run", "--quiet", "--package", "kproxy-bench", "--"])
            .args(args),
    )
}
