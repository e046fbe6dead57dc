//! `cargo xtask build` and `cargo xtask test`.

use std::process::Command;

use anyhow::{bail, Result};
use xtask::cmd;
use xtask::workspace::Binaries;

use super::{cargo, setup, target_dir};

/// `cargo <args>` in the workspace root, `args` split at spaces.
fn cargo_with(args: &str) -> Command {
    let mut command = cargo();
    command.args(args.split_whitespace());
    command
}

/// Setup, then builds kproxy (its build script builds the eBPF programs) and the kproxy-e2e
/// binaries (`kproxy-testpod`, `kproxy-demo`, `kproxy-vm-check`), in the release profile if
/// `release`. Returns where kproxy and kproxy-testpod are.
pub fn build(release: bool) -> Result<Binaries> {
    setup::run()?;
    let profile = if release { " --release" } else { "" };
    cmd::run(&mut cargo_with(&format!("build{profile} --package kproxy")))?;
    cmd::run(&mut cargo_with(&format!("build{profile} --package kproxy-e2e --bins")))?;
    let bins = Binaries::in_profile(&target_dir()?, if release { "release" } else { "debug" });
    bins.check()?;
    Ok(bins)
}

/// Builds, then runs every test suite (all of them, even after a failure) and fails if any did.
pub fn test() -> Result<()> {
    let bins = build(false)?;
    // The privileged suites build their own topologies and agents: one test at a time.
    let e2e = |test: &str| {
        let mut command = cargo_with(&format!(
            "test --package kproxy-e2e --test {test} -- --test-threads=1"
        ));
        command
            .env("KPROXY_BIN", &bins.kproxy)
            .env("KPROXY_TESTPOD_BIN", &bins.testpod);
        command
    };
    let suites = [
        (
            "kproxy, kproxy-common and kproxy-api tests",
            cargo_with("test --workspace --exclude kproxy-ebpf --exclude xtask --exclude kproxy-e2e --exclude kproxy-bench"),
        ),
        (
            "xtask, kproxy-e2e and kproxy-bench unit tests, topology and fake apiserver tests",
            cargo_with("test --package xtask --package kproxy-e2e --package kproxy-bench --lib --bins --test topology --test fake_apiserver"),
        ),
        ("xtask, kproxy-e2e and kproxy-bench doc tests", cargo_with("test --package xtask --package kproxy-e2e --package kproxy-bench --doc")),
        ("end-to-end tests (socket_lb)", e2e("socket_lb")),
        ("end-to-end tests (apiserver)", e2e("apiserver")),
        ("end-to-end tests (service semantics)", e2e("service_semantics")),
        ("end-to-end tests (hardening: files, HTTP servers, bpffs modes)", e2e("hardening")),
        ("end-to-end tests (nodeport, tc datapath)", e2e("nodeport")),
        ("end-to-end tests (two nodes, tc datapath)", e2e("two_nodes")),
    ];
    let mut failed = Vec::new();
    for (name, mut command) in suites {
        println!("==> {name}: {}", cmd::describe(&command));
        if let Err(e) = cmd::run(&mut command) {
            eprintln!("FAILED {name}: {e:#}");
            failed.push(name);
        }
    }
    if !failed.is_empty() {
        bail!("test suites failed: {}", failed.join(", "));
    }
    println!("all test suites passed");
    Ok(())
}
