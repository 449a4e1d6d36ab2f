//! The `#[repr(C)]` map keys and values that the sk_lookup program and the
//! supervisor share, and the map and program names that join the two sides.
//! `no_std`; the `user` feature implements `aya::Pod`.
//!
//! Maps (all defined by the BPF object, created and pinned by `dispatch`):
//! - [`GENERATION_MAP`]: ARRAY, one `u32`: the live generation (0 or 1).
//! - [`PORT_CLASS_MAP`]: ARRAY of `u32` port classes, indexed by
//!   [`port_class_index`] (generation × protocol × port); class 0 means no binding.
//! - [`BINDINGS_MAP`]: LPM_TRIE from `Key<`[`TrieKey`]`>` to a destination id.
//! - [`SOCKETS_MAP`]: SOCKMAP from destination id to socket.
//! - [`COUNTERS_MAP`]: PERCPU_ARRAY of [`Counters`] per destination id.
#![no_std]

/// The sk_lookup program that dispatches.
pub const LOOKUP_PROGRAM: &str = "holdfast_lookup";
/// A program that returns SK_PASS and does nothing else: the benchmark baseline.
pub const EMPTY_PROGRAM: &str = "holdfast_empty";

pub const GENERATION_MAP: &str = "HF_GENERATION";
pub const PORT_CLASS_MAP: &str = "HF_PORT_CLASS";
pub const BINDINGS_MAP: &str = "HF_BINDINGS";
pub const SOCKETS_MAP: &str = "HF_SOCKETS";
pub const COUNTERS_MAP: &str = "HF_COUNTERS";

/// Destination ids are `0..MAX_DESTINATIONS` (sockmap and counters size).
pub const MAX_DESTINATIONS: u32 = 4096;
/// A trie value meaning "no binding": the program passes (used to keep IPv6
/// prefixes such as `::/0` from matching IPv4 traffic).
pub const NO_DESTINATION: u32 = u32::MAX;
/// Default LPM trie capacity (both generations together); userspace may raise it at load.
pub const DEFAULT_TRIE_ENTRIES: u32 = 1 << 21;

/// Protocol slots in the port class array.
pub const PROTO_TCP: u32 = 0;
pub const PROTO_UDP: u32 = 1;
/// Ports per (generation, protocol) slot.
pub const PORTS: u32 = 1 << 16;
/// Entries in the port class array: 2 generations × 2 protocols × 65536 ports.
pub const PORT_CLASS_ENTRIES: u32 = 4 * PORTS;

/// Index of `port` for protocol slot `proto` ([`PROTO_TCP`]/[`PROTO_UDP`]) in
/// generation `generation` (0 or 1).
#[inline(always)]
pub const fn port_class_index(generation: u32, proto: u32, port: u32) -> u32 {
    (((generation & 1) << 1 | (proto & 1)) << 16) | (port & 0xffff)
}

/// IPPROTO numbers, as they appear in the sk_lookup context and in [`TrieKey::protocol`].
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// The LPM trie key data after the prefix length. Every field before `addr` is
/// always matched in full, so a trie prefix length is [`TRIE_FIXED_BITS`] plus the
/// address prefix length in the IPv4-mapped IPv6 space.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TrieKey {
    /// IPPROTO_TCP or IPPROTO_UDP.
    pub protocol: u8,
    /// 0 or 1.
    pub generation: u8,
    /// The port class, big-endian.
    pub class: [u8; 2],
    /// The local address as 16 bytes; IPv4 as `::ffff:a.b.c.d`.
    pub addr: [u8; 16],
}

/// Bits of [`TrieKey`] before the address.
pub const TRIE_FIXED_BITS: u32 = 32;

/// Per-destination counters, one copy per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Lookups that matched a binding of this destination.
    pub lookups: u64,
    /// ... whose socket was missing from the sockmap (packet dropped).
    pub misses: u64,
    /// ... for which bpf_sk_assign failed (packet dropped).
    pub errors: u64,
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: TrieKey is repr(C), Copy, made only of byte fields: no padding, any bit
    // pattern is valid.
    unsafe impl aya::Pod for super::TrieKey {}
    // SAFETY: Counters is repr(C), Copy, three u64: no padding, any bit pattern is valid.
    unsafe impl aya::Pod for super::Counters {}
}
