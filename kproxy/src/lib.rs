//! kproxy's agent as a library: sources → model → tracking & sync → dataplane.
//!
//! - [`sources`]: manifest files (and, later, the apiserver) into Kubernetes objects;
//! - [`model`]: validation and the per-service join of Services and EndpointSlices;
//! - [`tracker`]: the validated objects, the desired state, and what changed;
//! - [`sync`] and [`runner`]: when and what to write;
//! - [`dataplane`]: the map contents, the planner, and the BPF maps;
//! - [`loader`]: loading, attaching, pinning and removing the kernel objects;
//! - [`sockterm`]: destroying sockets still connected to removed backends (Linux >= 6.5);
//! - [`health`], [`metrics`] and [`http`]: `/healthz`, `/metrics` and the one HTTP server behind
//!   them and the `healthCheckNodePort` servers;
//! - [`sys`]: the `bpf(2)` calls aya does not make, behind safe functions: the only `unsafe`
//!   code of the library (denied everywhere else);
//! - [`agent`]: `kproxy run`; [`dump`]: `kproxy dump`; [`tc_cost`]: the benchmark's per-packet
//!   cost of the tc programs (`kproxy tc-cost`, hidden); [`events`]: the agent's machine-readable
//!   events (`kproxy run --event-file`, hidden). Their JSON is defined in kproxy-api.

#![deny(unsafe_code)]

pub mod agent;
pub mod config;
pub mod dataplane;
pub mod dump;
pub mod events;
pub mod health;
pub mod http;
pub mod loader;
pub mod metrics;
pub mod model;
pub mod node;
pub mod process_metrics;
pub mod proxier;
pub mod runner;
pub mod sockterm;
pub mod sources;
pub mod sync;
#[allow(unsafe_code)]
pub mod sys;
pub mod tc_cost;
pub mod trace;
pub mod tracker;
