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

/// `kproxy_datapath_drops_total` of `h`'s agent, by reason (a live scrape).
#[allow(dead_code)] // not every test file uses every helper
pub fn datapath_drops(h: &kproxy_e2e::harness::Harness) -> BTreeMap<String, u64> {
    let metrics = h.metrics().unwrap_or_else(|e| panic!("scrape /metrics: {e:#}\n{}", h.agent_log()));
    let drops: BTreeMap<String, u64> = metrics
        .matching("kproxy_datapath_drops_total", &[])
        .map(|s| (s.labels.get("reason").cloned().unwrap_or_default(), s.value as u64))
        .collect();
    assert!(drops.contains_key("source_range") && drops.contains_key("no_local_endpoints"), "every reason is served: {drops:?}");
    drops
}

/// How many TCP segments the network namespace `ns` has retransmitted (`RetransSegs` of its
/// `/proc/net/snmp`). With connection attempts that get no answer, the SYNs a client there
/// sent are its attempts plus the change of this count: the kernel's own figure, to compare
/// with what the datapath saw. (`OutSegs` would also count the last ACK or FIN of an earlier
/// connection that happens to leave in between.)
#[allow(dead_code)] // not every test file uses every helper
pub fn tcp_retransmissions(ns: &kproxy_e2e::topology::Netns) -> u64 {
    let mut cat = std::process::Command::new("cat");
    cat.arg("/proc/net/snmp");
    let out = kproxy_e2e::topology::output_in(ns, None, cat, std::time::Duration::from_secs(10)).expect("read /proc/net/snmp");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
    let (Some(names), Some(values)) = (tcp.next(), tcp.next()) else { panic!("no Tcp lines in /proc/net/snmp: {text}") };
    let field = |name: &str| -> u64 {
        let at = names.split_whitespace().position(|n| n == name).unwrap_or_else(|| panic!("no {name} in {names}"));
        values.split_whitespace().nth(at).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{name} in {values}"))
    };
    field("RetransSegs")
}
