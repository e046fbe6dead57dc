//! Shared code of kproxy's development tasks: the `cargo xtask` commands, the `kproxy-testpod`
//! workload, and the privileged end-to-end tests in `tests/`.
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
//! - [`cmd`]: running host commands with errors that name the command.
//! - [`interrupt`]: Ctrl-C turned into an orderly teardown.

pub mod bench;
pub mod cmd;
pub mod dump_poller;
pub mod fake_apiserver;
pub mod harness;
pub mod http;
pub mod interrupt;
pub mod k8s;
pub mod manifest;
pub mod prometheus;
pub mod report;
pub mod topology;
pub mod vm;
