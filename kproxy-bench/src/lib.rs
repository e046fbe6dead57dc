//! `cargo xtask bench` (this crate's binary, src/main.rs): kproxy against kube-proxy's iptables
//! and nftables modes, and against no proxy at all, side by side in one run (issue 6). See
//! `docs/benchmarks.md` for the method and the latest figures. The namespaces, the fake apiserver
//! and the manifests are kproxy-e2e's.
//!
//! - [`kubeproxy`]: the rulesets kube-proxy's proxiers write, as `iptables-restore` and `nft -f`
//!   input.
//! - [`env`]: one isolated node + pods + client cgroup per mode.
//! - [`load`]: `wrk` and `kproxy-testpod http` as clients, and their parsing.
//! - [`agent`]: the kproxy agent under benchmark, its log, RSS and BPF map memory.
//! - [`run`]: the measurements.
//! - [`scale`]: `--scale`, kproxy's control plane at 10,000 to 100,000 Services (`docs/scale.md`).
//! - [`cost`]: CPU time per request of each mode's processes, plus softirq time.
//! - [`results`], [`report`], [`plot`]: `results.json`, `benchmarks.md` and the PNG plots.
//! - [`stats`]: per-round ratios' medians with bootstrap intervals, and verdicts on them.
//! - [`compare`]: `--compare REV`, this build against another commit's, side by side.
//! - [`setup`]: what the benchmark needs beyond `cargo xtask setup`.

pub mod agent;
pub mod compare;
pub mod cost;
pub mod env;
pub mod kubeproxy;
pub mod load;
pub mod plot;
pub mod report;
pub mod results;
pub mod run;
pub mod scale;
pub mod setup;
pub mod stats;
