//! The reference programs of `holdfast-bench lookup`, measured beside holdfast's
//! own `holdfast_lookup` on the same `struct bpf_sk_lookup` context:
//! - `bench_empty`: returns SK_PASS; the cost of running any sk_lookup program.
//! - `bench_steer`: a port check, sockmap slot 0, `bpf_sk_assign`; the least a
//!   dispatcher that selects a socket can do (the second floor).
//! - `bench_tubular`: the scheme of Cloudflare's tubular, written here from its
//!   published design: one LPM trie keyed {protocol, port, address}, looked up
//!   with the packet's port and again with port 0 (the wildcard); the longer
//!   prefix wins, the exact port on a tie; the value's destination id indexes a
//!   per-CPU counter and the sockmap.
//!
//! Built for the BPF target only; on the host this is an empty binary.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod programs;

#[cfg(not(target_arch = "bpf"))]
fn main() {}
