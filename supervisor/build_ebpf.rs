//! The BPF build that `supervisor/build.rs` and `bench/build.rs` share. A build
//! script can use no workspace crate without a crate of its own for it, so both
//! include this file as a module (`#[path = …] mod build_ebpf;`).
//!
//! Needs bpf-linker on PATH and the rust-src component of the toolchain used.
//! The toolchain is `stable` (override with HOLDFAST_BPF_TOOLCHAIN, e.g.
//! `nightly`); `RUSTC_BOOTSTRAP=1` is set for the inner cargo so that stable
//! accepts `-Z build-std=core`. `AYA_BUILD_SKIP=1` skips the BPF build (for
//! quick checks), leaving an empty object that is refused at load time.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use aya_build::{Package, Toolchain};

/// Builds the BPF crate `name` at `root_dir` with aya-build and leaves its object
/// at `$OUT_DIR/NAME`; `what` names the programs in the error.
pub fn build_ebpf(name: &str, root_dir: &Path, what: &str) -> Result<()> {
    println!("cargo:rerun-if-env-changed=HOLDFAST_BPF_TOOLCHAIN");
    let toolchain = env::var("HOLDFAST_BPF_TOOLCHAIN").unwrap_or_else(|_| "stable".into());
    // For the inner `cargo build` that aya-build spawns (stable + -Z build-std); the
    // build script is single-threaded here.
    env::set_var("RUSTC_BOOTSTRAP", "1");
    // The inner cargo's progress lines ("Compiling …") would each come out as
    // a `warning:` of this build; its errors and rustc's warnings still do.
    env::set_var("CARGO_TERM_QUIET", "true");
    let root = root_dir
        .to_str()
        .with_context(|| format!("non-UTF-8 path to {}", root_dir.display()))?;
    aya_build::build_ebpf(
        [Package {
            name,
            root_dir: root,
            ..Default::default()
        }],
        Toolchain::Custom(&toolchain),
    )
    .with_context(|| {
        format!("building {what} (needs bpf-linker and rust-src; `cargo xtask bootstrap` installs them)")
    })?;
    let object = PathBuf::from(env::var("OUT_DIR").context("OUT_DIR")?).join(name);
    if !object.exists() {
        // AYA_BUILD_SKIP: an empty object, refused at load time.
        fs::write(&object, []).context("writing the placeholder BPF object")?;
    }
    Ok(())
}
