//! `cargo xtask build` and `cargo xtask test`.

use std::process::Command;

use anyhow::{bail, Result};
use xtask::cmd;
use xtask::harness::Binaries;

use super::{cargo, setup, target_dir};

/// `cargo <args>` in the workspace root, `args` split at spaces.
fn cargo_with(args: &str) -> Command {
    let mut command = cargo();
    command.args(args.split_whitespace());
    command
}

/// Setup, then builds kproxy (its build script builds the eBPF programs) and the xtask binaries
/// (`kproxy-testpod`). Returns where they are.
pub fn build() -> Result<Binaries> {
    setup::run()?;
    cmd::run(&mut cargo_with("build --package kproxy"))?;
    cmd::run(&mut cargo_with("build --package xtask --bins"))?;
    let bins = Binaries::in_target_dir(&target_dir()?);
    bins.check()?;
    Ok(bins)
}

/// Builds, then runs every test suite (all of them, even after a failure) and fails if any did.
pub fn test() -> Result<()> {
    let bins = build()?;
    // The privileged suites build their own topologies and agents: one test at a time.
    let e2e = |test: &str| {
        let mut command = cargo_with(&format!(
            "test --package xtask --test {test} -- --test-threads=1"
        ));
        command
            .env("KPROXY_BIN", &bins.kproxy)
            .env("KPROXY_TESTPOD_BIN", &bins.testpod);
        command
    };
    let suites = [
        (
            "kproxy and kproxy-common tests",
            cargo_with("test --workspace --exclude kproxy-ebpf --exclude xtask"),
        ),
        (
            "xtask unit tests, topology and fake apiserver tests",
            cargo_with("test --package xtask --lib --bins --test topology --test fake_apiserver"),
        ),
        ("xtask doc tests", cargo_with("test --package xtask --doc")),
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
