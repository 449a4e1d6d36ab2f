//! The three programs and their maps; the layouts userspace writes are in
//! `holdfast-bench`'s `lookup` module (`TubularKey`, `TubularValue`).

use core::ptr::{addr_of, read_volatile};

use aya_ebpf::{
    bindings::{bpf_sk_lookup, sk_action, BPF_F_NO_PREALLOC},
    macros::{map, sk_lookup},
    maps::{
        lpm_trie::{Key, LpmTrie},
        PerCpuArray, SockMap,
    },
    programs::SkLookupContext,
};

/// The port the steer-only program serves.
const STEER_PORT: u32 = 8080;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
/// Room for the largest binding set the benchmark measures.
const TRIE_ENTRIES: u32 = 1 << 21;
const DESTINATIONS: u32 = 4096;

#[map(name = "BENCH_STEER_SOCKETS")]
static STEER_SOCKETS: SockMap = SockMap::with_max_entries(1, 0);

#[map(name = "TUBULAR_BINDINGS")]
static TUBULAR_BINDINGS: LpmTrie<TubularKey, TubularValue> =
    LpmTrie::with_max_entries(TRIE_ENTRIES, BPF_F_NO_PREALLOC);

#[map(name = "TUBULAR_SOCKETS")]
static TUBULAR_SOCKETS: SockMap = SockMap::with_max_entries(DESTINATIONS, 0);

#[map(name = "TUBULAR_METRICS")]
static TUBULAR_METRICS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DESTINATIONS, 0);

/// The trie key after its prefix length: every field in network byte order, so
/// that the bytes are the bits the trie matches, protocol first. A binding of
/// an address prefix of length `l` (IPv4 as `::ffff:a.b.c.d`) has trie prefix
/// length `32 + l`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TubularKey {
    pub protocol: u8,
    pub _pad: u8,
    /// Big-endian; 0 is the wildcard.
    pub port: u16,
    pub addr: [u32; 4],
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct TubularValue {
    pub destination: u32,
    /// The binding's address prefix length, to choose between the two matches.
    pub prefix_len: u32,
}

#[sk_lookup]
pub fn bench_empty(_ctx: SkLookupContext) -> u32 {
    sk_action::SK_PASS
}

#[sk_lookup]
pub fn bench_steer(ctx: SkLookupContext) -> u32 {
    let c: *const bpf_sk_lookup = ctx.lookup;
    // SAFETY: a fixed-offset load of a field readable in sk_lookup programs.
    let port = unsafe { read_volatile(addr_of!((*c).local_port)) };
    if port != STEER_PORT {
        return sk_action::SK_PASS;
    }
    match STEER_SOCKETS.redirect_sk_lookup(&ctx, 0, 0) {
        Ok(()) => sk_action::SK_PASS,
        Err(_) => sk_action::SK_DROP,
    }
}

#[sk_lookup]
pub fn bench_tubular(ctx: SkLookupContext) -> u32 {
    let c: *const bpf_sk_lookup = ctx.lookup;
    // SAFETY: fixed-offset loads of fields readable in sk_lookup programs, all
    // unconditional (local_ip6 reads as zero for IPv4).
    let (family, protocol, ip4, ip6, port) = unsafe {
        (
            read_volatile(addr_of!((*c).family)),
            read_volatile(addr_of!((*c).protocol)),
            read_volatile(addr_of!((*c).local_ip4)),
            [
                read_volatile(addr_of!((*c).local_ip6[0])),
                read_volatile(addr_of!((*c).local_ip6[1])),
                read_volatile(addr_of!((*c).local_ip6[2])),
                read_volatile(addr_of!((*c).local_ip6[3])),
            ],
            read_volatile(addr_of!((*c).local_port)),
        )
    };
    let addr = if family == AF_INET {
        [0, 0, 0xffffu32.to_be(), ip4]
    } else if family == AF_INET6 {
        ip6
    } else {
        return sk_action::SK_PASS;
    };
    let mut key = Key::new(
        32 + 128,
        TubularKey {
            protocol: protocol as u8,
            _pad: 0,
            port: (port as u16).to_be(),
            addr,
        },
    );
    let exact = TUBULAR_BINDINGS.get(&key).copied();
    key.data.port = 0;
    let wildcard = TUBULAR_BINDINGS.get(&key).copied();
    let found = match (exact, wildcard) {
        (Some(e), Some(w)) if w.prefix_len > e.prefix_len => w,
        (Some(e), _) => e,
        (None, Some(w)) => w,
        (None, None) => return sk_action::SK_PASS,
    };
    if let Some(n) = TUBULAR_METRICS.get_ptr_mut(found.destination) {
        // SAFETY: this CPU's slot; sk_lookup runs with migration disabled.
        unsafe { *n += 1 };
    }
    match TUBULAR_SOCKETS.redirect_sk_lookup(&ctx, found.destination, 0) {
        Ok(()) => sk_action::SK_PASS,
        Err(_) => sk_action::SK_DROP,
    }
}

holdfast_common::bpf_object_items!();
