//! The `#[repr(C)]` map keys and values that the sk_lookup program and the
//! supervisor share, and the map and program names that join the two sides.
//! `no_std`; the `user` feature implements `aya::Pod`.
//!
//! Maps (all defined by the BPF object, created and pinned by `dispatch`):
//! - [`GENERATION_MAP`]: ARRAY, one `u32`: the live generation (0 or 1).
//! - [`PORT_CLASS_MAP`]: ARRAY of `u32`s indexed by [`port_class_index`]
//!   (protocol × port), each the port's class in both generations
//!   ([`class_of`]); class 0 means no binding.
//! - [`LENGTHS_MAP`]: ARRAY of [`LengthSlot`]s, [`LENGTH_SLOTS`] per generation:
//!   the distinct prefix lengths of the bindings, longest first, then an end slot;
//!   each slot also says where its generation's half of the table is ([`TableShape`]).
//! - [`TABLE_MAP`]: ARRAY_OF_MAPS of ARRAYs of [`INNER_BUCKETS`] [`Bucket`]s
//!   each, the binding table (see [`table_hashes`] and [`bucket_at`]):
//!   {protocol, class, prefix length, masked address} → destination id.
//! - [`SOCKETS_MAP`]: SOCKMAP from destination id to socket.
//! - [`COUNTERS_MAP`]: PERCPU_ARRAY of [`Counters`] per destination id.
//! - [`RULE_STATE_MAP`]: ARRAY, one `u32` per destination id: 0 when it has no
//!   source rules, else 1 + the phase (0 or 1) whose rule entries are live.
//! - [`RULES_MAP`]: LPM_TRIE from {[`rule_tag`]\(destination, phase), source
//!   address} to [`RULE_ADMIT`] or [`RULE_REFUSE`]; the longest matching entry
//!   is the verdict. Every rule set has an entry of length [`RULE_TAG_BITS`]
//!   (any source) holding its default.
#![no_std]

/// The sk_lookup program that dispatches.
pub const LOOKUP_PROGRAM: &str = "holdfast_lookup";

pub const GENERATION_MAP: &str = "HF_GENERATION";
pub const PORT_CLASS_MAP: &str = "HF_PORT_CLASS";
pub const TABLE_MAP: &str = "HF_TABLE";
pub const LENGTHS_MAP: &str = "HF_LENGTHS";
pub const SOCKETS_MAP: &str = "HF_SOCKETS";
pub const COUNTERS_MAP: &str = "HF_COUNTERS";
pub const RULE_STATE_MAP: &str = "HF_RULE_STATE";
pub const RULES_MAP: &str = "HF_RULES";

/// Destination ids are `0..MAX_DESTINATIONS` (sockmap and counters size).
pub const MAX_DESTINATIONS: u32 = 4096;
/// A binding table value meaning "no binding": the program passes (used to keep IPv6
/// prefixes such as `::/0` from matching IPv4 traffic).
pub const NO_DESTINATION: u32 = u32::MAX;
/// Default capacity in binding entries (both generations together, so a set may
/// use half); userspace sizes the binding table from it at load. The table is
/// an ARRAY, allocated whole up front: see `dispatch::table` for its size.
pub const DEFAULT_BINDING_ENTRIES: u32 = 1 << 16;
/// Prefix lengths 0..=128, plus the end slot.
pub const LENGTH_SLOTS: u32 = 130;

/// Capacity of the source rules trie (both phases of every destination
/// together). An LPM trie allocates each entry as it is inserted, so the
/// capacity costs nothing up front.
pub const RULE_ENTRIES: u32 = 1 << 16;
/// Verdicts in the source rules trie.
pub const RULE_ADMIT: u32 = 1;
pub const RULE_REFUSE: u32 = 2;
/// Bits of a rule key before the address: the [`rule_tag`]. A rule on a
/// source prefix of length `l` (in the IPv4-mapped space) has trie prefix
/// length `RULE_TAG_BITS + l`; a lookup uses `RULE_TAG_BITS + 128`.
pub const RULE_TAG_BITS: u32 = 32;

/// The tag that starts every rule key of `destination`'s rules in `phase`
/// (0 or 1), as a number; keys hold it big-endian (`to_be`), so that the
/// trie's bit order matches.
#[inline(always)]
pub const fn rule_tag(destination: u32, phase: u32) -> u32 {
    (destination << 1) | (phase & 1)
}

/// Protocol slots in the port class array.
pub const PROTO_TCP: u32 = 0;
pub const PROTO_UDP: u32 = 1;
/// Ports per protocol slot.
pub const PORTS: u32 = 1 << 16;
/// Entries in the port class array: 2 protocols × 65536 ports.
pub const PORT_CLASS_ENTRIES: u32 = 2 * PORTS;

/// Index of `port` for protocol slot `proto` ([`PROTO_TCP`]/[`PROTO_UDP`]).
/// The index does not depend on the generation, so a lookup reads the entry
/// and the live generation at once, not one after the other.
#[inline(always)]
pub const fn port_class_index(proto: u32, port: u32) -> u32 {
    ((proto & 1) << 16) | (port & 0xffff)
}

/// The class in `generation` (0 or 1) of a port class entry, which holds
/// generation 0's class in its low 16 bits and generation 1's in its high 16.
/// Userspace writes an entry whole, the live half with the value it has, so
/// a lookup reading the live half never sees it change.
#[inline(always)]
pub const fn class_of(entry: u32, generation: u32) -> u32 {
    (entry >> ((generation & 1) * 16)) & 0xffff
}

/// A port class entry with `classes[g]` as generation g's class.
#[inline(always)]
pub const fn class_entry(classes: [u16; 2]) -> u32 {
    classes[0] as u32 | ((classes[1] as u32) << 16)
}

/// IPPROTO numbers, as they appear in the sk_lookup context and in [`BindingKey::protocol`].
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// The binding table: a cuckoo hash table in [`Bucket`]s, one half per
/// generation. An entry lives in one of its two buckets, [`table_hashes`]'
/// two 32-bit hashes placed by [`bucket_at`] in the half its [`TableShape`]
/// names; a lookup reads at most those two buckets (one cache line each),
/// whatever the number of entries. Unlike a kernel HASH map, the lookup is a
/// few inlined ARRAY reads and compares, with no helper call, and the entries
/// sit in the buckets themselves: one memory access where a HASH needs a
/// bucket and then its element.
///
/// The buckets are spread over small inner ARRAYs of [`INNER_BUCKETS`] each,
/// in an ARRAY_OF_MAPS: an ARRAY of at most 32 KiB (with the kernel's header)
/// is allocated with kmalloc, in the kernel's direct map, which is mapped
/// with 2 MiB and 1 GiB pages, where one large ARRAY is vmalloc'd and mapped
/// with 4 KiB pages. A random bucket of a large table then costs a cache miss,
/// not a cache miss and a TLB miss (whose page walk, in a virtual machine, is
/// two-dimensional): the difference between a lookup that stays flat with cold
/// caches and one that grows with the table.
///
/// The meta word of a slot: its binding's port class, prefix length and
/// IPPROTO number ([`slot_meta`]); never 0 for an entry (classes start at
/// 1), so an empty slot (all zero) matches nothing.
#[inline(always)]
pub const fn slot_meta(protocol: u8, class: u16, prefix_len: u8) -> u32 {
    (class as u32) | ((prefix_len as u32) << 16) | ((protocol as u32) << 24)
}

/// The two bucket hashes of an entry or a lookup: the low 32 bits pick its
/// first bucket, the high 32 bits its second (each placed by [`bucket_at`]
/// in the half's [`TableShape::maps`] inner arrays). Seeded per generation so that userspace can build
/// a half again with another seed if the cuckoo insertion fails.
#[inline(always)]
pub const fn table_hashes(seed: u64, meta: u32, addr_hi: u64, addr_lo: u64) -> u64 {
    let mut h = seed ^ (meta as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    h = (h ^ addr_hi).wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 32;
    h = (h ^ addr_lo).wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 29)
}

/// Buckets per inner ARRAY of the binding table: 496 × 64 bytes leaves
/// 768 bytes of a 32 KiB allocation for the kernel's `struct bpf_array`
/// header (312 bytes on 6.x), so that each inner array is a kmalloc, not a
/// vmalloc (the kernel's `bpf_map_area_alloc` switches at 32 KiB).
pub const INNER_BUCKETS: u32 = 496;

/// Where a 32-bit bucket hash lands in a half of `maps` inner arrays: the
/// inner array (from 0, within the half) and the bucket in it. Two
/// multiply-shifts ("fastrange"), the second on the fraction the first left,
/// so neither count needs to be a power of two and no division is done.
#[inline(always)]
pub const fn bucket_at(h: u32, maps: u32) -> (u32, u32) {
    let x = h as u64 * maps as u64;
    let map = (x >> 32) as u32;
    let bucket = (((x & 0xffff_ffff) * INNER_BUCKETS as u64) >> 32) as u32;
    (map, bucket)
}

/// Where the kernel's ARRAY values start in the map's allocation: after
/// `struct bpf_array`, 312 bytes on Linux 6.18 (its `struct bpf_map` is 296).
/// The allocation itself (a kmalloc of a power-of-two size class, or pages)
/// starts on a cache line, so this is 8 bytes short of a 64-byte boundary:
/// element `i` of an ARRAY of 64-byte elements covers the last 8 bytes of one
/// cache line and the first 56 of the next. [`TableSlot`] and [`LengthSlot`]
/// therefore leave their first 8 bytes unused, and a bucket or a length slot
/// is read from one cache line, not two: with cold caches, a lookup at 1M
/// bindings cost about a fifth less (`holdfast-bench lookup`). Where the
/// header ends on a line (an offset of 0 mod 64), the used bytes are within
/// one line too.
pub const KERNEL_ARRAY_VALUE_OFFSET: usize = 312;

/// One binding entry: the masked address, its [`slot_meta`] and destination.
/// 32 bytes, the first 8 unused (see [`KERNEL_ARRAY_VALUE_OFFSET`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableSlot {
    pub _pad: u64,
    /// The address's high and low 64 bits (as numbers); IPv4 as `::ffff:a.b.c.d`.
    pub addr_hi: u64,
    pub addr_lo: u64,
    /// [`slot_meta`]; 0: empty.
    pub meta: u32,
    /// A destination id, or [`NO_DESTINATION`].
    pub dest: u32,
}

/// Slots per bucket: a bucket is 64 bytes, its used bytes in one cache line.
pub const BUCKET_SLOTS: usize = 2;

/// One bucket of the binding table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bucket {
    pub slots: [TableSlot; BUCKET_SLOTS],
}

/// Where a generation's half of the table is: the inner arrays
/// `base..base + maps` of the ARRAY_OF_MAPS, and the seed of its hashes. Each [`LengthSlot`] of the generation carries
/// it, so that a lookup reads it with the length it tries.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableShape {
    pub seed: u64,
    pub base: u32,
    pub maps: u32,
}

/// One prefix length to try, with its masks (precomputed so that the program
/// has no branches in its loop) and the shape of its generation's half of the
/// binding table, or the end of the list. 64 bytes, of which the 40 after the
/// first 8 are used: each slot is read from one cache line (see
/// [`KERNEL_ARRAY_VALUE_OFFSET`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LengthSlot {
    /// Unused: see [`KERNEL_ARRAY_VALUE_OFFSET`].
    pub _lead: u64,
    pub mask_hi: u64,
    pub mask_lo: u64,
    /// The half's hash seed.
    pub seed: u64,
    /// The half is inner arrays `base..base + maps`.
    pub base: u32,
    pub maps: u32,
    pub prefix_len: u32,
    /// Non-zero: no more lengths.
    pub end: u32,
    /// Unused: the slot fills a cache line's stride.
    pub _tail: [u64; 2],
}

impl LengthSlot {
    pub const END: LengthSlot = LengthSlot {
        _lead: 0,
        mask_hi: 0,
        mask_lo: 0,
        seed: 0,
        base: 0,
        maps: 0,
        prefix_len: 0,
        end: 1,
        _tail: [0; 2],
    };

    /// The slot of `prefix_len` in a generation whose half of the table is
    /// `shape`.
    pub const fn new(prefix_len: u8, shape: TableShape) -> LengthSlot {
        let len = prefix_len as u32;
        let mask: u128 = if len == 0 {
            0
        } else {
            u128::MAX << (128 - len)
        };
        LengthSlot {
            _lead: 0,
            mask_hi: (mask >> 64) as u64,
            mask_lo: mask as u64,
            seed: shape.seed,
            base: shape.base,
            maps: shape.maps,
            prefix_len: len,
            end: 0,
            _tail: [0; 2],
        }
    }
}

/// The data of a source rules trie key (after the trie's `prefix_len`).
/// Every field is in network byte order, so that the bytes in memory are the
/// bits the trie matches, most significant first.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RuleData {
    /// [`rule_tag`], big-endian.
    pub tag: u32,
    /// The source address in the IPv4-mapped IPv6 space (`::ffff:a.b.c.d`),
    /// as four big-endian words; host bits zero in stored keys.
    pub addr: [u32; 4],
}

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
    /// ... whose source address its allow/deny rules refuse (packet dropped).
    pub denied: u64,
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: Bucket is repr(C), Copy, two TableSlots of u64 and u32 fields
    // with the padding an explicit field: any bit pattern is valid.
    unsafe impl aya::Pod for super::Bucket {}
    // SAFETY: LengthSlot is repr(C), Copy, u64 fields, four u32 and a [u64; 2],
    // the unused bytes explicit fields: no padding, any bit pattern is valid.
    unsafe impl aya::Pod for super::LengthSlot {}
    // SAFETY: Counters is repr(C), Copy, four u64: no padding, any bit pattern is valid.
    unsafe impl aya::Pod for super::Counters {}
    // SAFETY: RuleData is repr(C), Copy, five u32: no padding, any bit pattern is valid.
    unsafe impl aya::Pod for super::RuleData {}
}

const _: () = assert!(core::mem::size_of::<Bucket>() == 64);
// An inner array of the table with a header of up to 768 bytes fits 32 KiB.
const _: () = assert!(INNER_BUCKETS as usize * core::mem::size_of::<Bucket>() + 768 <= 32 * 1024);
const _: () = assert!(core::mem::size_of::<TableShape>() == 16);
const _: () = assert!(core::mem::size_of::<LengthSlot>() == 64);
const _: () = assert!(core::mem::size_of::<RuleData>() * 8 == RULE_TAG_BITS as usize + 128);

/// The items every BPF object of this workspace ends with: the panic handler
/// a `no_std` binary needs (the verifier proves no panic path is taken) and
/// the license section, which the kernel reads to allow GPL-only helpers.
#[macro_export]
macro_rules! bpf_object_items {
    () => {
        #[panic_handler]
        fn panic(_info: &core::panic::PanicInfo) -> ! {
            loop {}
        }

        #[unsafe(link_section = "license")]
        #[unsafe(no_mangle)]
        static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    /// The cache lines the bytes `start..end` of element `index` cover, in an
    /// ARRAY of `element`-byte values that start `value_offset` bytes into a
    /// line-aligned allocation.
    fn lines(value_offset: usize, element: usize, index: usize, start: usize, end: usize) -> usize {
        let first = value_offset + index * element + start;
        let last = value_offset + index * element + end - 1;
        last / 64 - first / 64 + 1
    }

    #[test]
    fn a_bucket_and_a_length_slot_are_each_read_from_one_cache_line() {
        let slot = size_of::<TableSlot>();
        let (used_start, used_end) = (
            offset_of!(TableSlot, addr_hi),
            offset_of!(TableSlot, dest) + 4,
        );
        let (length_start, length_end) = (
            offset_of!(LengthSlot, mask_hi),
            offset_of!(LengthSlot, end) + 4,
        );
        for value_offset in [KERNEL_ARRAY_VALUE_OFFSET, 0, 256] {
            for index in 0..INNER_BUCKETS as usize {
                let start = used_start;
                let end = (BUCKET_SLOTS - 1) * slot + used_end;
                assert_eq!(
                    lines(value_offset, size_of::<Bucket>(), index, start, end),
                    1,
                    "bucket {index}, values at {value_offset}"
                );
            }
            for index in 0..2 * LENGTH_SLOTS as usize {
                assert_eq!(
                    lines(
                        value_offset,
                        size_of::<LengthSlot>(),
                        index,
                        length_start,
                        length_end
                    ),
                    1,
                    "length slot {index}, values at {value_offset}"
                );
            }
        }
    }
}
