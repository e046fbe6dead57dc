//! Host-side stub: this crate's real output is the `kproxy` eBPF object built from `main.rs`
//! for `bpfel-unknown-none`. The library target only exists so that `kproxy`'s build script can
//! depend on this package and be rebuilt when it changes.
#![no_std]
