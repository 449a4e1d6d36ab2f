//! `table` owns where binding entries go in the binding table (`HF_TABLE`):
//! how many buckets a capacity needs, and which bucket and slot each entry of
//! a set takes. Cuckoo hashing: an entry may sit in one of two buckets of
//! [`BUCKET_SLOTS`] slots, given by [`table_hashes`] (shared with the program
//! through `holdfast-common`, so both sides agree); when both are full, an
//! occupant is moved to its other bucket, and so on. A lookup therefore reads
//! at most two buckets of one cache line each, however many entries there are,
//! and an address nobody bound costs the same two reads: no input can make a
//! lookup walk a chain. Pure: [`super::Loaded::apply`] writes what it builds.

use holdfast_common::{slot_meta, table_hashes, Bucket, TableSlot, BUCKET_SLOTS};

use super::{BindingEntry, DestinationId};

/// Moves tried before an insertion gives up on a seed.
const MAX_MOVES: usize = 512;
/// Seeds tried before a set is declared too large for its half.
const MAX_SEEDS: u64 = 16;

/// The number of buckets in each generation's half of the table for
/// `capacity` binding entries (both generations together): a power of two
/// with at least 4/3 of a slot per entry of a half (a set may use half the
/// capacity), so a full half is at most 3/4 full; cuckoo hashing with two
/// buckets of two slots places entries up to about 9/10.
pub fn buckets_per_half(capacity: u32) -> u32 {
    let per_half = u64::from(capacity.max(2)) / 2;
    let buckets = (per_half * 2).div_ceil(3).max(1).next_power_of_two();
    u32::try_from(buckets).unwrap_or(1 << 31)
}

/// One generation's half, built for a set of entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Half {
    pub seed: u64,
    pub buckets: Vec<Bucket>,
}

impl Half {
    /// A half as the kernel creates it: every bucket empty.
    pub fn empty(buckets: u32, seed: u64) -> Half {
        Half {
            seed,
            buckets: vec![Bucket::default(); buckets as usize],
        }
    }
}

/// The set does not fit the half (reported with the number of entries).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full {
    pub entries: usize,
    pub slots: usize,
}

/// The slot of an entry: what a lookup compares and what it returns.
pub fn slot_of(e: &BindingEntry, dest: DestinationId) -> TableSlot {
    let addr = u128::from_be_bytes(e.addr);
    TableSlot {
        addr_hi: (addr >> 64) as u64,
        addr_lo: addr as u64,
        meta: slot_meta(e.protocol, e.class, e.prefix_len),
        dest,
        _pad: 0,
    }
}

/// The two bucket indexes (within the half) of a slot's key.
fn buckets_of(seed: u64, mask: u32, s: &TableSlot) -> [usize; 2] {
    let h = table_hashes(seed, s.meta, s.addr_hi, s.addr_lo);
    [
        (h as u32 & mask) as usize,
        ((h >> 32) as u32 & mask) as usize,
    ]
}

/// A seed for attempt `n` after `first`: SplitMix64 steps, so that a retry
/// is unrelated to the seed that failed.
fn nth_seed(first: u64, n: u64) -> u64 {
    let mut z = first.wrapping_add(n.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Places `entries` in a half of `buckets` buckets (a power of two), trying
/// `seed` first (the half's current seed, so that an unchanged set writes
/// nothing), then other seeds.
pub fn build(
    entries: &[(BindingEntry, DestinationId)],
    buckets: u32,
    seed: u64,
) -> Result<Half, Full> {
    assert!(buckets.is_power_of_two());
    let slots: Vec<TableSlot> = entries.iter().map(|(e, d)| slot_of(e, *d)).collect();
    for n in 0..MAX_SEEDS {
        let s = if n == 0 { seed } else { nth_seed(seed, n) };
        if let Some(half) = place(&slots, buckets, s) {
            return Ok(half);
        }
    }
    Err(Full {
        entries: entries.len(),
        slots: buckets as usize * BUCKET_SLOTS,
    })
}

/// Cuckoo insertion of every slot with one seed; `None` if one cannot be placed.
fn place(slots: &[TableSlot], buckets: u32, seed: u64) -> Option<Half> {
    if slots.len() > buckets as usize * BUCKET_SLOTS {
        return None;
    }
    let mask = buckets - 1;
    let mut table = vec![Bucket::default(); buckets as usize];
    // Which slot of a full bucket moves: varied, so that moves do not cycle.
    let mut turn = seed as usize;
    for s in slots {
        let mut moving = *s;
        let mut at = buckets_of(seed, mask, &moving)[0];
        let mut placed = false;
        for _ in 0..MAX_MOVES {
            let [first, second] = buckets_of(seed, mask, &moving);
            if let Some(b) = [first, second]
                .into_iter()
                .find(|b| table[*b].slots.iter().any(|x| x.meta == 0))
            {
                let free = table[b].slots.iter_mut().find(|x| x.meta == 0);
                *free.expect("a free slot") = moving;
                placed = true;
                break;
            }
            // Both full: take the place of an occupant of the bucket other
            // than the one `moving` was just pushed out of.
            at = if at == first { second } else { first };
            turn = turn.wrapping_add(1);
            let k = turn % BUCKET_SLOTS;
            std::mem::swap(&mut table[at].slots[k], &mut moving);
        }
        if !placed {
            return None;
        }
    }
    Some(Half {
        seed,
        buckets: table,
    })
}

/// The destination a lookup of {`meta`, `hi`, `lo`} finds in `half`, read as
/// the program reads it (first bucket, then second).
#[cfg(test)]
pub fn find(half: &Half, meta: u32, hi: u64, lo: u64) -> Option<DestinationId> {
    let key = TableSlot {
        addr_hi: hi,
        addr_lo: lo,
        meta,
        ..Default::default()
    };
    let mask = half.buckets.len() as u32 - 1;
    buckets_of(half.seed, mask, &key)
        .into_iter()
        .flat_map(|b| half.buckets[b].slots)
        .find(|s| s.meta == meta && s.addr_hi == hi && s.addr_lo == lo)
        .map(|s| s.dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(i: u32, prefix_len: u8) -> BindingEntry {
        let v4 = 0x0a00_0000u32.wrapping_add(i.wrapping_mul(2_654_435_761) & 0x00ff_ffff);
        let addr = (0xffffu128 << 32) | u128::from(v4);
        BindingEntry {
            protocol: 6,
            class: 1 + (i % 3) as u16,
            prefix_len,
            addr: addr.to_be_bytes(),
        }
    }

    #[test]
    fn a_full_half_of_the_default_capacity_is_placed_and_every_entry_found() {
        let capacity = holdfast_common::DEFAULT_BINDING_ENTRIES;
        let buckets = buckets_per_half(capacity);
        assert_eq!(buckets, 32768);
        let set: Vec<_> = (0..capacity / 2)
            .map(|i| (entry(i, 128), i % 4096))
            .collect();
        let half = build(&set, buckets, 7).expect("placed");
        for (e, d) in &set {
            let s = slot_of(e, *d);
            assert_eq!(find(&half, s.meta, s.addr_hi, s.addr_lo), Some(*d), "{e:?}");
        }
        let used: usize = half
            .buckets
            .iter()
            .map(|b| b.slots.iter().filter(|s| s.meta != 0).count())
            .sum();
        assert_eq!(used, set.len());
    }

    #[test]
    fn what_was_not_bound_is_not_found() {
        let set: Vec<_> = (0..1000).map(|i| (entry(i, 128), 1)).collect();
        let half = build(&set, buckets_per_half(4096), 1).unwrap();
        let other = slot_of(&entry(5000, 128), 1);
        assert_eq!(find(&half, other.meta, other.addr_hi, other.addr_lo), None);
        // The same address under another prefix length or class is another key.
        let s = slot_of(&set[0].0, 1);
        assert_eq!(find(&half, s.meta ^ (1 << 16), s.addr_hi, s.addr_lo), None);
        assert_eq!(find(&half, s.meta + 1, s.addr_hi, s.addr_lo), None);
    }

    #[test]
    fn an_unchanged_set_builds_the_same_half_with_the_same_seed() {
        let set: Vec<_> = (0..500).map(|i| (entry(i, 120), 2)).collect();
        let a = build(&set, 512, 99).unwrap();
        let b = build(&set, 512, 99).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.seed, 99);
    }

    #[test]
    fn a_set_larger_than_the_half_is_refused() {
        let set: Vec<_> = (0..9).map(|i| (entry(i, 128), 1)).collect();
        assert_eq!(
            build(&set, 4, 3),
            Err(Full {
                entries: 9,
                slots: 8
            })
        );
    }

    #[test]
    fn sizes_are_powers_of_two_with_room_to_spare() {
        for capacity in [2, 3, 100, 4096, 65536, 2 * 1_000_000 + 1024] {
            let b = buckets_per_half(capacity);
            assert!(b.is_power_of_two());
            assert!(
                u64::from(b) * BUCKET_SLOTS as u64 * 3 >= u64::from(capacity / 2) * 4,
                "{capacity}: {b} buckets"
            );
        }
    }
}
