//! The `#[repr(C)]` map keys and values that the sk_lookup program and the
//! supervisor share. `no_std`; the `user` feature implements `aya::Pod`.
#![no_std]
