//! Builds the benchmark's reference programs (`bench/ebpf`) for the BPF target
//! with aya-build, leaving the object at `$OUT_DIR/holdfast-bench-ebpf`. The
//! toolchain and `AYA_BUILD_SKIP` work as in `supervisor/build.rs`.

use std::env;
use std::fs;
use std::path::PathBuf;

use anyhow::{Context as _, Result};
use aya_build::{Package, Toolchain};

fn main() -> Result<()> {
    println!("cargo:rerun-if-env-changed=HOLDFAST_BPF_TOOLCHAIN");
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?);
    let ebpf = manifest.join("ebpf");
    let toolchain = env::var("HOLDFAST_BPF_TOOLCHAIN").unwrap_or_else(|_| "stable".into());
    // For the inner `cargo build` that aya-build spawns (stable + -Z build-std).
    env::set_var("RUSTC_BOOTSTRAP", "1");
    // The inner cargo's progress lines ("Compiling …") would each come out as
    // a `warning:` of this build; its errors and rustc's warnings still do.
    env::set_var("CARGO_TERM_QUIET", "true");
    let root_dir = ebpf.to_str().context("non-UTF-8 path to bench/ebpf")?;
    aya_build::build_ebpf(
        [Package {
            name: "holdfast-bench-ebpf",
            root_dir,
            ..Default::default()
        }],
        Toolchain::Custom(&toolchain),
    )
    .context("building the benchmark's BPF programs (needs bpf-linker and rust-src; `cargo xtask bootstrap` installs them)")?;
    let object = PathBuf::from(env::var("OUT_DIR").context("OUT_DIR")?).join("holdfast-bench-ebpf");
    if !object.exists() {
        fs::write(&object, []).context("writing the placeholder BPF object")?;
    }
    Ok(())
}
