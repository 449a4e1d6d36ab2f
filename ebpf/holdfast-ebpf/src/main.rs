//! The sk_lookup program of holdfast: (protocol, local address, local port) →
//! destination id → socket, through the maps described in `holdfast-common`.
//! It owns no state of its own; the supervisor's `dispatch` module fills the maps.
//!
//! Built for the BPF target only; on the host this is an empty binary so that
//! `cargo clippy --workspace` works.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod program;

#[cfg(not(target_arch = "bpf"))]
fn main() {}
