//! Shared code of kproxy's development tasks: the `cargo xtask` commands, the `kproxy-testpod`
//! workload, and the privileged end-to-end tests in `tests/`.
//!
//! - [`topology`]: RAII network namespaces, child cgroups, a node/pod network, and spawning
//!   processes inside them.
//! - [`harness`]: one running kproxy agent on top of a topology, as tests and the demo use it.
//! - [`manifest`]: Kubernetes Service + EndpointSlice YAML for the agent to read.
//! - [`report`]: the JSON line that `kproxy-testpod` clients print.
//! - [`cmd`]: running host commands with errors that name the command.
//! - [`interrupt`]: Ctrl-C turned into an orderly teardown.

pub mod cmd;
pub mod harness;
pub mod interrupt;
pub mod manifest;
pub mod report;
pub mod topology;
