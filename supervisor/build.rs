//! Builds the sk_lookup program (`ebpf/holdfast-ebpf`) for the BPF target with
//! aya-build and leaves the object at `$OUT_DIR/holdfast-ebpf`, which
//! `dispatch` embeds. The toolchain, bpf-linker and `AYA_BUILD_SKIP`: see
//! `build_ebpf.rs` (shared with `bench/build.rs`); under `AYA_BUILD_SKIP=1`
//! `dispatch` reports that the object was not built.

#[path = "build_ebpf.rs"]
mod build_ebpf;

use std::env;
use std::path::PathBuf;

use anyhow::{Context as _, Result};

fn main() -> Result<()> {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?);
    let common = manifest.join("../ebpf/holdfast-common");
    println!("cargo:rerun-if-changed={}", common.display());
    build_ebpf::build_ebpf(
        "holdfast-ebpf",
        &manifest.join("../ebpf/holdfast-ebpf"),
        "the sk_lookup program",
    )
}
