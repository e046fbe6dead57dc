//! kproxy's task runner (`cargo xtask`, src/main.rs) and the small library under it and under the
//! heavier development tools, `kproxy-e2e` (end-to-end tests, harness, fake apiserver, demo) and
//! `kproxy-bench` (the benchmark). It stays light, so that `cargo xtask setup` compiles in
//! seconds on an empty target directory before it installs anything.
//!
//! - [`cmd`]: running host commands with errors that name the command.
//! - [`interrupt`]: Ctrl-C turned into an orderly teardown.
//! - [`workspace`]: the workspace root, its cargo and target directory, the binaries
//!   `cargo xtask build` makes.
//! - [`vm`]: the VM runner of `cargo xtask vm-test` (kernels, initramfs, qemu, the run's script
//!   and its results).

pub mod cmd;
pub mod interrupt;
pub mod vm;
pub mod workspace;
