//! `table` owns where binding entries go in the binding table (`HF_TABLE`):
//! how many inner arrays of [`INNER_BUCKETS`] buckets a capacity needs, and
//! which bucket and slot each entry of a set takes. Cuckoo hashing: an entry may sit in one of two buckets of
//! [`BUCKET_SLOTS`] slots, given by [`table_hashes`] (shared with the program
//! through `holdfast-common`, so both sides agree); when both are full, an
//! occupant is moved to its other bucket, and so on. A lookup therefore reads
//! at most two buckets of one cache line each, however many entries there are,
//! and an address nobody bound costs the same two reads: no input can make a
//! lookup walk a chain. Pure: [`super::Loaded::apply`] writes what it builds.

use holdfast_common::{
    bucket_at, slot_meta, table_hashes, Bucket, TableSlot, BUCKET_SLOTS, INNER_BUCKETS,
};

use super::{BindingEntry, DestinationId};

/// Moves tried before an insertion gives up on a seed.
const MAX_MOVES: usize = 512;
/// Seeds tried before a set is declared too large for its half.
const MAX_SEEDS: u64 = 16;

/// The number of inner arrays in each generation's half of the table for
/// `capacity` binding entries (both generations together): at least 4/3 of a
/// slot per entry of a half (a set may use half the capacity), so a full half
/// is at most 3/4 full; cuckoo hashing with two buckets of two slots places
/// entries up to about 9/10.
pub fn maps_per_half(capacity: u32) -> u32 {
    let per_half = u64::from(capacity.max(2)) / 2;
    let buckets = (per_half * 2).div_ceil(3).max(1);
    u32::try_from(buckets.div_ceil(u64::from(INNER_BUCKETS))).unwrap_or(u32::MAX / 2)
}

/// One generation's half, built for a set of entries: its inner arrays'
/// buckets one after the other ([`INNER_BUCKETS`] each).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Half {
    pub seed: u64,
    pub buckets: Vec<Bucket>,
}

impl Half {
    /// A half of `maps` inner arrays as the kernel creates them: every bucket
    /// empty.
    pub fn empty(maps: u32, seed: u64) -> Half {
        Half {
            seed,
            buckets: vec![Bucket::default(); (maps * INNER_BUCKETS) as usize],
        }
    }

    /// Its number of inner arrays.
    #[cfg(test)]
    pub fn maps(&self) -> u32 {
        (self.buckets.len() / INNER_BUCKETS as usize) as u32
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

/// The two bucket indexes (within the half of `maps` inner arrays, counted
/// across them) of a slot's key.
fn buckets_of(seed: u64, maps: u32, s: &TableSlot) -> [usize; 2] {
    let h = table_hashes(seed, s.meta, s.addr_hi, s.addr_lo);
    [h as u32, (h >> 32) as u32].map(|h| {
        let (map, bucket) = bucket_at(h, maps);
        (map * INNER_BUCKETS + bucket) as usize
    })
}

/// A seed for attempt `n` after `first`: SplitMix64 steps, so that a retry
/// is unrelated to the seed that failed.
fn nth_seed(first: u64, n: u64) -> u64 {
    let mut z = first.wrapping_add(n.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Places `entries` in a half of `maps` inner arrays, trying
/// `seed` first (the half's current seed, so that an unchanged set writes
/// nothing), then other seeds.
pub fn build(
    entries: &[(BindingEntry, DestinationId)],
    maps: u32,
    seed: u64,
) -> Result<Half, Full> {
    let slots: Vec<TableSlot> = entries.iter().map(|(e, d)| slot_of(e, *d)).collect();
    for n in 0..MAX_SEEDS {
        let s = if n == 0 { seed } else { nth_seed(seed, n) };
        if let Some(half) = place(&slots, maps, s) {
            return Ok(half);
        }
    }
    Err(Full {
        entries: entries.len(),
        slots: (maps * INNER_BUCKETS) as usize * BUCKET_SLOTS,
    })
}

/// Cuckoo insertion of every slot with one seed; `None` if one cannot be placed.
fn place(slots: &[TableSlot], maps: u32, seed: u64) -> Option<Half> {
    let mut table = Half::empty(maps, seed).buckets;
    if slots.len() > table.len() * BUCKET_SLOTS {
        return None;
    }
    // Which slot of a full bucket moves: drawn at random (xorshift, seeded by
    // the seed, so a build is reproducible), so that moves do not cycle; a
    // slot taken in turns can.
    let mut draw = seed | 1;
    for s in slots {
        let mut moving = *s;
        let mut at = buckets_of(seed, maps, &moving)[0];
        let mut placed = false;
        for _ in 0..MAX_MOVES {
            let [first, second] = buckets_of(seed, maps, &moving);
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
            draw ^= draw << 13;
            draw ^= draw >> 7;
            draw ^= draw << 17;
            let k = (draw >> 32) as usize % BUCKET_SLOTS;
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
    buckets_of(half.seed, half.maps(), &key)
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
        let maps = maps_per_half(capacity);
        assert_eq!(maps, 45);
        let set: Vec<_> = (0..capacity / 2)
            .map(|i| (entry(i, 128), i % 4096))
            .collect();
        let half = build(&set, maps, 7).expect("placed");
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
        let half = build(&set, maps_per_half(4096), 1).unwrap();
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
        let a = build(&set, 2, 99).unwrap();
        let b = build(&set, 2, 99).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.seed, 99);
    }

    #[test]
    fn a_set_larger_than_the_half_is_refused() {
        let set: Vec<_> = (0..993).map(|i| (entry(i, 128), 1)).collect();
        assert_eq!(
            build(&set, 1, 3),
            Err(Full {
                entries: 993,
                slots: 992
            })
        );
    }

    #[test]
    fn sizes_leave_room_to_spare_and_no_more_than_an_inner_array() {
        for capacity in [2, 3, 100, 4096, 65536, 2 * 1_000_000 + 1024] {
            let maps = maps_per_half(capacity);
            let slots = u64::from(maps * INNER_BUCKETS) * BUCKET_SLOTS as u64;
            let needed = u64::from(capacity / 2).max(1) * 4;
            assert!(slots * 3 >= needed, "{capacity}: {maps} arrays");
            let one_less = slots - u64::from(INNER_BUCKETS) * BUCKET_SLOTS as u64;
            assert!(one_less * 3 < needed, "{capacity}: {maps} arrays");
        }
    }

    #[test]
    fn the_buckets_of_the_whole_half_are_used_evenly() {
        // Placement by two multiply-shifts, not a mask: every inner array and
        // every bucket index in them takes a share.
        let maps = 3;
        let mut per_map = [0usize; 3];
        let mut per_bucket = vec![0usize; INNER_BUCKETS as usize];
        for i in 0..60_000u32 {
            let s = slot_of(&entry(i, 128), 1);
            for b in buckets_of(11, maps, &s) {
                per_map[b / INNER_BUCKETS as usize] += 1;
                per_bucket[b % INNER_BUCKETS as usize] += 1;
            }
        }
        for n in per_map {
            assert!((35_000..45_000).contains(&n), "{per_map:?}");
        }
        assert!(per_bucket.iter().all(|n| (150..350).contains(n)));
    }
}
