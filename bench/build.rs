//! Builds the benchmark's reference programs (`bench/ebpf`) for the BPF target
//! with aya-build, leaving the object at `$OUT_DIR/holdfast-bench-ebpf`. The
//! build itself is `supervisor/build_ebpf.rs`, shared with `supervisor/build.rs`.

#[path = "../supervisor/build_ebpf.rs"]
mod build_ebpf;

use std::env;
use std::path::PathBuf;

use anyhow::{Context as _, Result};

fn main() -> Result<()> {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?);
    build_ebpf::build_ebpf(
        "holdfast-bench-ebpf",
        &manifest.join("ebpf"),
        "the benchmark's BPF programs",
    )
}
