//! `kproxy-vm-check NAME`: one of the checks of `cargo xtask vm-test` (see
//! `kproxy_e2e::vm_checks`), with the binaries from `KPROXY_BIN` and `KPROXY_TESTPOD_BIN`.

use anyhow::{bail, Result};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [name] = args.as_slice() else {
        bail!("usage: kproxy-vm-check NAME, NAME one of {:?}", xtask::vm::CHECKS);
    };
    kproxy_e2e::vm_checks::run(name)
}
