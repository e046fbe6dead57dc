//! The machine-readable output of kproxy, defined once: kproxy serializes these types and the
//! tools that read it (the end-to-end harness and VM checks in kproxy-e2e, the benchmark in
//! kproxy-bench) deserialize the same types, so neither side mirrors the other by hand and no
//! tool parses a log line written for people.
//!
//! - [`dump`]: `kproxy dump --json`, what is programmed.
//! - [`tc_cost`]: `kproxy tc-cost` (hidden), the per-packet cost of the tc programs.
//! - [`trace`]: `kproxy trace --json`, where a connection would go and why, and
//!   `kproxy dump --conntrack --json`, the tracked flows.
//! - [`event`]: `kproxy run --event-file PATH` (hidden), one JSON line per event: programs
//!   attached, stale-socket termination available or not, each sync.
//!
//! Fields are only ever added; readers take missing ones as their default where that makes
//! sense, so that a newer tool reads an older kproxy's output.

#![forbid(unsafe_code)]

pub mod dump;
pub mod event;
pub mod tc_cost;
pub mod trace;
