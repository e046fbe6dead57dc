//! The `cargo xtask` commands.

pub mod build;
pub mod launch;
pub mod setup;
pub mod vm_test;

pub use xtask::workspace::{cargo, target_dir, workspace_root};
