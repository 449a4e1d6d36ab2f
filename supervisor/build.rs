//! Builds the sk_lookup program (`ebpf/holdfast-ebpf`) for the BPF target with
//! aya-build and leaves the object at `$OUT_DIR/holdfast-ebpf`, which
//! `dispatch` embeds.
//!
//! Needs bpf-linker on PATH and the rust-src component of the toolchain used.
//! The toolchain is `stable` (override with HOLDFAST_BPF_TOOLCHAIN, e.g.
//! `nightly`); `RUSTC_BOOTSTRAP=1` is set for the inner cargo so that stable
//! accepts `-Z build-std=core`. `AYA_BUILD_SKIP=1` skips the BPF build (for
//! quick checks); `dispatch` then reports that the object was not built.

use std::env;
use std::fs;
use std::path::PathBuf;

use anyhow::{Context as _, Result};
use aya_build::{Package, Toolchain};

fn main() -> Result<()> {
    println!("cargo:rerun-if-env-changed=HOLDFAST_BPF_TOOLCHAIN");
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?);
    let ebpf = manifest.join("../ebpf/holdfast-ebpf");
    let common = manifest.join("../ebpf/holdfast-common");
    println!("cargo:rerun-if-changed={}", common.display());
    let toolchain = env::var("HOLDFAST_BPF_TOOLCHAIN").unwrap_or_else(|_| "stable".into());
    // SAFETY-free in edition 2021: the build script is single-threaded here; the
    // variable is for the inner `cargo build` that aya-build spawns.
    env::set_var("RUSTC_BOOTSTRAP", "1");
    // The inner cargo's progress lines ("Compiling …") would each come out as
    // a `warning:` of this build; its errors and rustc's warnings still do.
    env::set_var("CARGO_TERM_QUIET", "true");
    let root_dir = ebpf
        .to_str()
        .context("non-UTF-8 path to ebpf/holdfast-ebpf")?;
    aya_build::build_ebpf(
        [Package {
            name: "holdfast-ebpf",
            root_dir,
            ..Default::default()
        }],
        Toolchain::Custom(&toolchain),
    )
    .context("building the sk_lookup program (needs bpf-linker and rust-src; `cargo xtask bootstrap` installs them)")?;
    let object = PathBuf::from(env::var("OUT_DIR").context("OUT_DIR")?).join("holdfast-ebpf");
    if !object.exists() {
        // AYA_BUILD_SKIP: an empty object, refused at load time.
        fs::write(&object, []).context("writing the placeholder BPF object")?;
    }
    Ok(())
}
