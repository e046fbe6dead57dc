//! Helpers shared by the privileged test files.

use std::collections::BTreeMap;
use std::io::Write;

use std::path::{Path, PathBuf};

use kproxy_e2e::harness::Binaries;
use kproxy_e2e::topology::is_root;

/// Prints a line straight to stderr, bypassing the test harness's output capture, so that it
/// shows up in CI logs even when the test passes.
pub fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Whether `test` must be skipped because we are not root; says so loudly if so.
pub fn skip_unless_root(test: &str) -> bool {
    if is_root() {
        return false;
    }
    say(&format!("SKIPPED (needs root): {test}"));
    true
}

/// A count map, as in reports: `counts(&[("pod-a", 3)])`.
#[allow(dead_code)] // not every test file uses every helper
pub fn counts(entries: &[(&str, u64)]) -> BTreeMap<String, u64> {
    entries.iter().map(|&(k, n)| (k.to_string(), n)).collect()
}

/// The binaries under test: `KPROXY_BIN` (else `<workspace>/target/debug/kproxy`) and
/// `KPROXY_TESTPOD_BIN` (else the testpod this test crate was built with).
#[allow(dead_code)] // not every test file uses every helper
pub fn binaries() -> Binaries {
    let from_env = |var: &str| std::env::var_os(var).map(PathBuf::from);
    Binaries {
        kproxy: from_env("KPROXY_BIN")
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/kproxy")),
        testpod: from_env("KPROXY_TESTPOD_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_kproxy-testpod").into()),
    }
}
