//! The programs and their maps. See `holdfast-common` for the map layout.
//! Order of one lookup: port class, binding (longest prefix first), whether
//! an earlier program already selected a socket (then SK_PASS, uncounted),
//! counters, the destination's source rules (refused: SK_DROP, counted as
//! denied), then the socket.

use core::{
    cell::UnsafeCell,
    ffi::c_void,
    ptr::{addr_of, addr_of_mut, read_volatile},
};

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    bindings::{
        bpf_map_def, bpf_map_type::BPF_MAP_TYPE_SOCKMAP, bpf_sk_lookup, sk_action,
        BPF_SK_LOOKUP_F_NO_REUSEPORT,
    },
    btf_maps::{Array as BtfArray, ArrayOfMaps},
    helpers::{bpf_loop, bpf_map_lookup_elem, bpf_sk_assign, bpf_sk_release},
    macros::{btf_map, map, sk_lookup},
    maps::{
        lpm_trie::{Key, LpmTrie},
        Array, PerCpuArray,
    },
    programs::SkLookupContext,
};
use holdfast_common::{
    bucket_at, class_of, port_class_index, rule_tag, slot_meta, table_hashes, Bucket, Counters,
    LengthSlot, RuleData, INNER_BUCKETS, IPPROTO_TCP, IPPROTO_UDP, LENGTH_SLOTS, MAX_DESTINATIONS,
    NO_DESTINATION, PORT_CLASS_ENTRIES, PROTO_TCP, PROTO_UDP, RULE_ADMIT, RULE_ENTRIES,
    RULE_TAG_BITS,
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

#[map(name = "HF_GENERATION")]
static GENERATION: Array<u32> = Array::with_max_entries(1, 0);

#[map(name = "HF_PORT_CLASS")]
static PORT_CLASS: Array<u32> = Array::with_max_entries(PORT_CLASS_ENTRIES, 0);

#[map(name = "HF_LENGTHS")]
static LENGTHS: Array<LengthSlot> = Array::with_max_entries(2 * LENGTH_SLOTS, 0);

/// One inner array of the binding table (see `holdfast_common::INNER_BUCKETS`).
type InnerTable = BtfArray<Bucket, { INNER_BUCKETS as usize }>;

/// Sized by userspace at load (`dispatch::table`), which also creates and
/// sets the inner arrays; this size is a placeholder.
#[btf_map(name = "HF_TABLE")]
static TABLE: ArrayOfMaps<InnerTable, 2> = ArrayOfMaps::new();

/// A legacy map definition for the sockmap, written out because aya-ebpf's
/// `SockMap` declares a 4-byte value: with an 8-byte value, a userspace lookup
/// returns the socket's cookie, which is how `dispatch` asks the kernel whether a
/// destination's socket is still there (a socket whose last fd closed leaves).
#[repr(transparent)]
struct RawMapDef(UnsafeCell<bpf_map_def>);

// SAFETY: the loader rewrites the definition before the program runs; the
// program only takes its address.
unsafe impl Sync for RawMapDef {}

impl RawMapDef {
    const fn as_ptr(&self) -> *mut c_void {
        self.0.get().cast()
    }
}

#[unsafe(link_section = "maps")]
#[unsafe(export_name = "HF_SOCKETS")]
static SOCKETS: RawMapDef = RawMapDef(UnsafeCell::new(bpf_map_def {
    type_: BPF_MAP_TYPE_SOCKMAP,
    key_size: 4,
    value_size: 8,
    max_entries: MAX_DESTINATIONS,
    map_flags: 0,
    id: 0,
    pinning: 0,
}));

enum Assign {
    Done,
    Missing,
    Failed,
}

/// Looks `dest` up in the sockmap and selects its socket, that very socket:
/// `BPF_SK_LOOKUP_F_NO_REUSEPORT` skips the kernel's selection within a
/// reuseport group, so a lookup is never split between a socket and another
/// bound to the same address and port (its replacement during a reload, or a
/// stranger's that joined its group).
#[inline(always)]
fn assign(ctx: &SkLookupContext, dest: u32) -> Assign {
    let key = dest;
    // SAFETY: a map pointer and a pointer to a stack key of the map's key size.
    let sk = unsafe { bpf_map_lookup_elem(SOCKETS.as_ptr(), addr_of!(key).cast()) };
    if sk.is_null() {
        return Assign::Missing;
    }
    // SAFETY: `sk` is a referenced socket from the sockmap lookup, released
    // right after, on every path.
    let ret = unsafe {
        bpf_sk_assign(
            ctx.lookup.cast(),
            sk,
            u64::from(BPF_SK_LOOKUP_F_NO_REUSEPORT),
        )
    };
    // SAFETY: as above; releases the reference the lookup took.
    unsafe { bpf_sk_release(sk) };
    if ret == 0 {
        Assign::Done
    } else {
        Assign::Failed
    }
}

#[map(name = "HF_COUNTERS")]
static COUNTERS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(MAX_DESTINATIONS, 0);

#[map(name = "HF_RULE_STATE")]
static RULE_STATE: Array<u32> = Array::with_max_entries(MAX_DESTINATIONS, 0);

#[map(name = "HF_RULES")]
static RULES: LpmTrie<RuleData, u32> = LpmTrie::with_max_entries(RULE_ENTRIES, BPF_F_NO_PREALLOC);

/// Whether `dest`'s source rules refuse the packet's remote address. No rules:
/// admitted, at the cost of one array read. With rules: one trie lookup in the
/// live phase of `dest`'s rules; the longest matching entry is the verdict (the
/// supervisor compiled allow/deny so that this equals "refused when a deny
/// prefix contains the source, else admitted when allow is empty or an allow
/// prefix contains it"). No entry at all (never the case: every rule set has a
/// default entry) refuses: a filter fails closed.
#[inline(always)]
fn refused(ctx: &SkLookupContext, family: u32, dest: u32) -> bool {
    let state = match RULE_STATE.get(dest) {
        Some(s) if *s != 0 => *s,
        _ => return false,
    };
    let c: *const bpf_sk_lookup = ctx.lookup;
    // SAFETY: as in `read_context`: fixed-offset loads of fields readable in
    // sk_lookup programs (remote_ip6 reads as zero for IPv4), every one
    // unconditional so that no load's address depends on the family.
    let (ip4, ip6) = unsafe {
        (
            read_volatile(addr_of!((*c).remote_ip4)),
            [
                read_volatile(addr_of!((*c).remote_ip6[0])),
                read_volatile(addr_of!((*c).remote_ip6[1])),
                read_volatile(addr_of!((*c).remote_ip6[2])),
                read_volatile(addr_of!((*c).remote_ip6[3])),
            ],
        )
    };
    // The context holds the addresses in network byte order, as the key wants.
    let addr = if family == AF_INET {
        [0, 0, 0xffffu32.to_be(), ip4]
    } else {
        ip6
    };
    let key = Key::new(
        RULE_TAG_BITS + 128,
        RuleData {
            tag: rule_tag(dest, state - 1).to_be(),
            addr,
        },
    );
    !matches!(RULES.get(&key), Some(v) if *v == RULE_ADMIT)
}

/// The fields of the context every lookup reads, each loaded at its fixed
/// offset.
struct Lookup {
    family: u32,
    protocol: u32,
    local_port: u32,
}

/// Reads the fields every lookup needs, one volatile load per field at a
/// constant offset from the context pointer: the verifier rejects a context
/// load whose address was computed ("dereference of modified ctx ptr").
#[inline(always)]
fn read_context(ctx: &SkLookupContext) -> Lookup {
    let c: *const bpf_sk_lookup = ctx.lookup;
    // SAFETY: the kernel passes a valid `struct bpf_sk_lookup`; every field read
    // here is readable in sk_lookup programs.
    unsafe {
        Lookup {
            family: read_volatile(addr_of!((*c).family)),
            protocol: read_volatile(addr_of!((*c).protocol)),
            local_port: read_volatile(addr_of!((*c).local_port)),
        }
    }
}

/// The local address as two 64-bit numbers, IPv4 as `::ffff:a.b.c.d`; only
/// the family's own fields are loaded (volatile loads at constant offsets in
/// each branch, which the compiler may neither merge nor hoist), so an IPv4
/// lookup pays no IPv6 loads.
#[inline(always)]
fn local_address(ctx: &SkLookupContext, family: u32) -> Option<(u64, u64)> {
    let c: *const bpf_sk_lookup = ctx.lookup;
    if family == AF_INET {
        // SAFETY: as in `read_context`.
        let ip4 = unsafe { read_volatile(addr_of!((*c).local_ip4)) };
        Some((0, 0xffff_0000_0000u64 | u64::from(u32::from_be(ip4))))
    } else if family == AF_INET6 {
        // SAFETY: as in `read_context`.
        let w = |i: usize| {
            u64::from(u32::from_be(unsafe {
                read_volatile(addr_of!((*c).local_ip6[i]))
            }))
        };
        Some(((w(0) << 32) | w(1), (w(2) << 32) | w(3)))
    } else {
        None
    }
}

/// The destination of the entry {`meta`, `hi`, `lo`} in the table half
/// `shape` names, found in its first bucket or else its second. Both buckets
/// are located, and the first word of each read, before either is compared:
/// the two reads do not depend on each other, so with cold caches the CPU
/// waits for both misses at once rather than one after the other.
#[inline(always)]
fn probe(shape: &LengthSlot, meta: u32, hi: u64, lo: u64) -> Option<u32> {
    let h = table_hashes(shape.seed, meta, hi, lo);
    let first = bucket(shape, h as u32)?;
    let second = bucket(shape, (h >> 32) as u32)?;
    // SAFETY: two map values the verifier proved non-null and in bounds;
    // volatile only so that both loads are issued here, in this order.
    let (m0, m1) = unsafe {
        (
            read_volatile(addr_of!(first.slots[0].meta)),
            read_volatile(addr_of!(second.slots[0].meta)),
        )
    };
    in_bucket(first, m0, meta, hi, lo).or_else(|| in_bucket(second, m1, meta, hi, lo))
}

/// The bucket a 32-bit hash names in `shape`'s half.
#[inline(always)]
fn bucket(shape: &LengthSlot, h: u32) -> Option<&'static Bucket> {
    let (map, index) = bucket_at(h, shape.maps);
    TABLE.get_value(shape.base + map, &index)
}

/// The destination of {`meta`, `hi`, `lo`} in `bucket`, whose first slot's
/// meta word (read already) is `meta0`.
#[inline(always)]
fn in_bucket(bucket: &Bucket, meta0: u32, meta: u32, hi: u64, lo: u64) -> Option<u32> {
    let [s0, s1] = &bucket.slots;
    if meta0 == meta && s0.addr_lo == lo && s0.addr_hi == hi {
        return Some(s0.dest);
    }
    if s1.meta == meta && s1.addr_lo == lo && s1.addr_hi == hi {
        return Some(s1.dest);
    }
    None
}

/// Whether a program that ran before this one on the namespace selected a
/// socket. During an in-place upgrade that is the old holdfast's program,
/// which serves and counts every lookup until its link goes: this one then
/// neither selects (its `bpf_sk_assign` would fail with EEXIST and count an
/// error) nor counts (the lookup would be counted twice). The kernel keeps
/// the first selection whatever later programs return.
#[inline(always)]
fn already_selected(ctx: &SkLookupContext) -> bool {
    let c: *const bpf_sk_lookup = ctx.lookup;
    // SAFETY: `sk` (offset 0) is readable in sk_lookup programs: the socket
    // selected so far, or NULL.
    let sk = unsafe { read_volatile(addr_of!((*c).__bindgen_anon_1.__bindgen_anon_1.sk)) };
    !sk.is_null()
}

/// The state of the prefix-length loop, on the program's stack.
#[repr(C)]
struct Search {
    hi: u64,
    lo: u64,
    /// [`slot_meta`] with prefix length 0; each step adds its length.
    meta: u32,
    /// The [`LENGTHS`] slot of the loop's step 0: the generation's second.
    base: u32,
    /// What the first probe that hit found.
    dest: u32,
    _pad: u32,
}

/// The destination of the address {`hi`, `lo`} under the length `slot`
/// (masked to it), `meta` being the lookup's [`slot_meta`] with length 0.
#[inline(always)]
fn probe_slot(slot: &LengthSlot, meta: u32, hi: u64, lo: u64) -> Option<u32> {
    let meta = meta | ((slot.prefix_len & 0xff) << 16);
    probe(slot, meta, hi & slot.mask_hi, lo & slot.mask_lo)
}

/// One step of the prefix-length loop (a bpf_loop callback): probes the
/// `i`-th length after the generation's first; 1 (stop) once a probe hit or the lengths
/// ended, 0 to go on.
#[inline(never)]
extern "C" fn probe_length(i: u64, search: *mut c_void) -> i64 {
    // SAFETY: bpf_loop passes the `Search` it was given, on the caller's stack.
    let s = unsafe { &mut *search.cast::<Search>() };
    let slot = match LENGTHS.get(s.base + i as u32) {
        Some(slot) if slot.end == 0 => slot,
        _ => return 1,
    };
    match probe_slot(slot, s.meta, s.hi, s.lo) {
        Some(d) => {
            s.dest = d;
            1
        }
        None => 0,
    }
}

#[sk_lookup]
pub fn holdfast_lookup(ctx: SkLookupContext) -> u32 {
    dispatch(&ctx)
}

#[inline(always)]
fn dispatch(ctx: &SkLookupContext) -> u32 {
    let l = read_context(ctx);
    let (proto_slot, ipproto) = match l.protocol {
        p if p == u32::from(IPPROTO_TCP) => (PROTO_TCP, IPPROTO_TCP),
        p if p == u32::from(IPPROTO_UDP) => (PROTO_UDP, IPPROTO_UDP),
        _ => return sk_action::SK_PASS,
    };
    // The generation is read once; everything after uses this value. Its
    // read, the port's class entry and the first length slot of each
    // generation do not depend on each other, so with cold caches their misses
    // overlap; the generation then picks.
    let generation = match GENERATION.get(0) {
        Some(g) => *g & 1,
        None => return sk_action::SK_PASS,
    };
    let classes = match PORT_CLASS.get(port_class_index(proto_slot, l.local_port)) {
        Some(c) => *c,
        None => return sk_action::SK_PASS,
    };
    let (Some(first0), Some(first1)) = (LENGTHS.get(0), LENGTHS.get(LENGTH_SLOTS)) else {
        return sk_action::SK_PASS;
    };
    let class = class_of(classes, generation);
    if class == 0 {
        return sk_action::SK_PASS;
    }
    let Some((hi, lo)) = local_address(ctx, l.family) else {
        return sk_action::SK_PASS;
    };
    // Longest prefix first: the first length with an entry wins. The compiler
    // stored, for each (class, prefix), the narrowest binding, so this is
    // "longest prefix, then narrowest range". At most 129 probes of at most two
    // buckets each, however many bindings there are; as many probes as
    // distinct prefix lengths are in use. The first length is probed here
    // (most sets use one: a lookup then makes no call); the rest in
    // bpf_loop's loop, which the verifier checks once (a bounded loop it walks
    // 129 times, each with every way out of a probe) and inlines into a plain
    // loop of calls.
    let meta = slot_meta(ipproto, class as u16, 0);
    let base = generation * LENGTH_SLOTS;
    let first = if generation == 0 { first0 } else { first1 };
    if first.end != 0 {
        return sk_action::SK_PASS;
    }
    let dest = match probe_slot(first, meta, hi, lo) {
        Some(d) => d,
        None => {
            let mut search = Search {
                hi,
                lo,
                meta,
                base: base + 1,
                dest: NO_DESTINATION,
                _pad: 0,
            };
            // SAFETY: a static callback of bpf_loop's signature and a pointer
            // to a `Search` on this stack, alive for the call; flags 0.
            unsafe {
                bpf_loop(
                    LENGTH_SLOTS - 1,
                    probe_length as *mut c_void,
                    addr_of_mut!(search).cast(),
                    0,
                )
            };
            search.dest
        }
    };
    if dest == NO_DESTINATION || already_selected(ctx) {
        return sk_action::SK_PASS;
    }
    let counters = COUNTERS.get_ptr_mut(dest);
    if let Some(c) = counters {
        // SAFETY: a per-CPU array slot of this CPU; sk_lookup runs with
        // migration disabled, so no other writer touches it concurrently.
        unsafe { (*c).lookups += 1 };
    }
    if refused(ctx, l.family, dest) {
        if let Some(c) = counters {
            // SAFETY: as above.
            unsafe { (*c).denied += 1 };
        }
        return sk_action::SK_DROP;
    }
    match assign(ctx, dest) {
        Assign::Done => sk_action::SK_PASS,
        Assign::Missing => {
            if let Some(c) = counters {
                // SAFETY: as above.
                unsafe { (*c).misses += 1 };
            }
            sk_action::SK_DROP
        }
        Assign::Failed => {
            if let Some(c) = counters {
                // SAFETY: as above.
                unsafe { (*c).errors += 1 };
            }
            sk_action::SK_DROP
        }
    }
}

holdfast_common::bpf_object_items!();
