//! `kproxy tc-cost` (hidden): the per-packet cost of the tc programs with BPF_PROG_TEST_RUN, one
//! JSON [`Report`] on stdout. The benchmark runs it and keeps the rounds in its results.json.

use serde::{Deserialize, Serialize};

/// Nanoseconds per packet of each case, in one round.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Round {
    /// `kp_tc_baseline`, `repeat` = runs.
    pub empty_ns: f64,
    /// `kp_tc_ingress`, `repeat`: a packet of a tracked flow (the self-mapped service).
    pub ingress_tracked_ns: f64,
    /// `kp_tc_ingress`, `repeat`: a packet to a node port no service uses (passed on).
    pub ingress_not_frontend_ns: f64,
    /// `kp_tc_egress`, `repeat`: the backend's reply in a tracked flow (the self-mapped service).
    pub egress_reply_ns: f64,
    /// `kp_tc_egress`, `repeat`: a packet of no tracked flow (passed on).
    pub egress_untracked_ns: f64,
    /// `kp_tc_baseline`, one run per test run (median).
    pub empty_single_ns: f64,
    /// `kp_tc_ingress`, one run per test run: the SYN of a new flow to the frontend (backend
    /// chosen, two conntrack entries written, translated), a new client port every run.
    pub ingress_new_flow_single_ns: f64,
    /// `kp_tc_ingress`, one run per test run: a packet of the tracked flow to the frontend's
    /// real backend.
    pub ingress_tracked_single_ns: f64,
    /// The same for the self-mapped flow that the `repeat` figure uses.
    pub ingress_tracked_self_single_ns: f64,
}

/// What `kproxy tc-cost` prints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Frontends and backends programmed in the private maps.
    pub frontends: usize,
    pub backends: usize,
    /// Runs per case and round.
    pub runs: u32,
    pub rounds: Vec<Round>,
}
