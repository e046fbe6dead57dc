//! What the benchmark needs beyond `cargo xtask setup`: the font of the plots.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Result};

use kproxy_e2e::cmd;

/// Installs Debian's `fonts-dejavu-core` (the plots' font) if it is missing.
pub fn ensure_packages() -> Result<()> {
    if Path::new(super::plot::FONT).is_file() {
        return Ok(());
    }
    println!("installing Debian package fonts-dejavu-core (the font of the benchmark plots)");
    cmd::run(Command::new("apt-get").arg("update"))?;
    cmd::run(
        Command::new("apt-get")
            .args(["install", "-y", "fonts-dejavu-core"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    if !Path::new(super::plot::FONT).is_file() {
        bail!("{} is still missing after installing fonts-dejavu-core", super::plot::FONT);
    }
    Ok(())
}
