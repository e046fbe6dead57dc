//! Builds the `kproxy-ebpf` crate for the BPF target (nightly + bpf-linker; `cargo xtask setup`
//! installs both) and leaves the object in OUT_DIR for `include_bytes_aligned!`.

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let root_dir = std::path::Path::new(&manifest_dir).join("../kproxy-ebpf");
    let root_dir = root_dir.canonicalize()?;
    let root_dir = root_dir.to_str().ok_or_else(|| anyhow::anyhow!("non-UTF-8 path {root_dir:?}"))?;
    let common_dir = std::path::Path::new(&manifest_dir).join("../kproxy-common");
    println!("cargo:rerun-if-changed={}", common_dir.display());
    aya_build::build_ebpf(
        [aya_build::Package { name: "kproxy-ebpf", root_dir, ..Default::default() }],
        aya_build::Toolchain::default(),
    )
}
