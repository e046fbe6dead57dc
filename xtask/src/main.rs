//! `cargo xtask <command>`: kproxy's development tasks.

mod tasks;

use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;

#[derive(Parser)]
#[command(
    name = "xtask",
    bin_name = "cargo xtask",
    about = "kproxy development tasks"
)]
enum Cli {
    /// Install what building and testing need (Debian packages, nightly + rust-src,
    /// bpf-linker); fast when nothing is missing.
    Setup,
    /// Setup, then build kproxy (with its eBPF programs) and the kproxy-e2e binaries
    /// (kproxy-testpod, kproxy-demo, kproxy-vm-check).
    Build {
        /// Build the release profile instead of debug.
        #[arg(long)]
        release: bool,
    },
    /// Build, then run the unit tests and the privileged end-to-end tests.
    Test,
    /// Build, then show kproxy balancing real traffic between three pods.
    Demo {
        /// The manifest to load [default: deploy/examples/demo.yaml].
        #[arg(long)]
        manifests: Option<PathBuf>,
        /// Use the binaries already in the target directory instead of building.
        #[arg(long)]
        no_build: bool,
    },
    /// Benchmark kproxy against kube-proxy's iptables and nftables modes and no proxy (root).
    /// The arguments go to kproxy-bench: `cargo xtask bench --help` lists them.
    #[command(disable_help_flag = true)]
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run the datapath tests on Linux 5.10, 6.1 and 6.12 under qemu, and on the host (root).
    VmTest(tasks::vm_test::Args),
}

fn main() -> Result<()> {
    match Cli::parse() {
        Cli::Setup => tasks::setup::run(),
        Cli::Build { release } => tasks::build::build(release).map(drop),
        Cli::Test => tasks::build::test(),
        Cli::Demo {
            manifests,
            no_build,
        } => tasks::launch::demo(manifests, no_build),
        Cli::Bench { args } => tasks::launch::bench(&args),
        Cli::VmTest(args) => tasks::vm_test::run(args),
    }
}
