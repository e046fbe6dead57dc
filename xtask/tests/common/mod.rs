//! Helpers shared by the privileged test files.

use std::collections::BTreeMap;
use std::io::Write;

use xtask::topology::is_root;

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
