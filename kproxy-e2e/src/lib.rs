//! kproxy's end-to-end tests (`tests/`) and what they stand on, also used by `cargo xtask demo`
//! (`src/bin/kproxy-demo.rs`), by the checks `cargo xtask vm-test` runs in each VM
//! (`src/bin/kproxy-vm-check.rs`) and by the benchmark (kproxy-bench):
//!
//! - [`topology`]: RAII network namespaces, child cgroups, a node/pod network, and spawning
//!   processes inside them.
//! - [`harness`]: one running kproxy agent on top of a topology, as tests and the demo use it.
//! - [`manifest`]: Kubernetes Service + EndpointSlice YAML for the agent to read.
//! - [`k8s`]: typed Service / EndpointSlice / Node objects for the fake apiserver.
//! - [`http`]: a minimal blocking HTTP client (scraping `/healthz`, `/metrics`; watch streams).
//! - [`prometheus`]: parsing the agent's `/metrics`.
//! - [`report`]: the JSON line that `kproxy-testpod` clients print.
//! - [`fake_apiserver`]: a fake Kubernetes apiserver (real HTTP list/watch) with fault
//!   injection, for end-to-end tests of the agent's apiserver source.
//! - [`dump_poller`]: `kproxy dump` in a loop, checking that nothing flaps.
//! - [`events`]: the agent's event file (`kproxy run --event-file`), as typed in kproxy-api.
//! - [`vm_checks`]: the checks of `cargo xtask vm-test` that the test suites do not make.
//! - [`cmd`], [`interrupt`]: xtask's, re-exported: running host commands with errors that name
//!   the command; Ctrl-C turned into an orderly teardown.

pub use xtask::{cmd, interrupt};

pub mod dump_poller;
pub mod events;
pub mod fake_apiserver;
pub mod harness;
pub mod http;
pub mod k8s;
pub mod manifest;
pub mod prometheus;
pub mod promql;
pub mod report;
pub mod topology;
pub mod vm_checks;
