//! `dispatch` owns the BPF side of holdfast: it loads the sk_lookup program
//! (`ebpf/holdfast-ebpf`, embedded at build time), creates and pins its maps,
//! attaches it to a network namespace, compiles bindings into the lookup maps,
//! puts sockets in the sockmap and reads the per-destination counters.
//! It knows nothing of services or processes: the supervisor hands it
//! [`Binding`]s and socket fds. It never closes or creates a service's socket.
//!
//! # Lookup
//!
//! For a packet (protocol, local address, local port) the program reads the live
//! generation `g` (one-entry ARRAY), then the port class of the port in `g`
//! (ARRAY of 2 generations × 2 protocols × 65536 ports; class 0: no binding,
//! SK_PASS). Then, for each prefix length in use, longest first (an ARRAY per
//! generation lists them, with their masks and where `g`'s half of the binding
//! table is), it looks up {protocol, class, length, address masked to length}
//! in `g`'s half of the binding table (IPv4 as `::ffff:a.b.c.d`); the first
//! hit is the destination id. Its sockmap slot is then selected: missing
//! socket → SK_DROP and a miss; `bpf_sk_assign` failing → SK_DROP and an error;
//! otherwise SK_PASS with the socket selected.
//!
//! The binding table is a cuckoo hash table of 64-byte buckets ([`table`]),
//! kept in small inner ARRAYs of an ARRAY_OF_MAPS so that each is allocated in
//! the kernel's direct map, whose huge pages spare a random lookup a TLB miss
//! (see `holdfast_common::INNER_BUCKETS`): an entry sits in one of two
//! buckets, so a probe is at most two pairs of inlined ARRAY reads and four
//! compares, with no helper call, and a lookup
//! costs one probe per distinct prefix length in use (at most 129), whatever
//! the number of bindings. A kernel HASH, used before, cost a helper call, a
//! hash of the 24-byte key and two dependent memory reads (bucket, then
//! element); an LPM trie, tried first, one node per bit of depth. Memory grows
//! with bindings times the port classes each spans, never with ports (see
//! [`compile`]); the table is allocated whole at load, sized by the capacity
//! ([`table::maps_per_half`]: 45 inner arrays of 31 KiB, 1.4 MiB, per half for
//! [`DEFAULT_BINDING_ENTRIES`]).
//!
//! # Atomicity of a change of bindings
//!
//! Every lookup sees the old set or the new set, never a mix:
//! 1. The two generations live side by side in the same maps: the port class
//!    array, the prefix-length array and the binding table have a half per
//!    generation.
//!    [`Dispatcher::apply`] writes the whole new set into the *idle* generation,
//!    which no lookup reads.
//! 2. It then flips the live generation with one update of the one-entry ARRAY,
//!    a single aligned 4-byte store: a lookup reads either the old or the new value.
//! 3. The program reads the generation once, at its start, and uses that value
//!    for the port class, the prefix lengths and the binding keys, so a lookup running across the
//!    flip finishes entirely in the generation it started in.
//! 4. Before returning, `apply` waits for every program run that might still
//!    be reading the old generation to end: sk_lookup runs inside an RCU
//!    read-side section, and `membarrier(MEMBARRIER_CMD_GLOBAL)` is
//!    `synchronize_rcu()` (the kernel waits the same way after updating a
//!    map-in-map). Only then may the next change write there (it writes only
//!    the buckets and port classes that differ from what that half holds).
//!
//! If anything fails before the flip, the live set is untouched (a set that
//! does not fit the table is refused before anything is written). Sockets are not generational: a destination id
//! keeps its sockmap slot across changes.
//!
//! # Source rules (allow/deny)
//!
//! A destination may have source rules, set by [`Dispatcher::set_source_rules`]
//! with the `allow` and `deny` prefixes of its socket. They are checked after
//! the binding matched and before the socket is selected: a refused packet is
//! dropped (SK_DROP; a TCP client sees its connection refused, nothing reaches
//! the socket) and counted in [`Counters::denied`] (and in `lookups`, since a
//! binding matched). The verdict is the one of
//! [`SocketOptions::admits`](crate::unit::SocketOptions::admits), so the
//! program and holdfast's own accept path agree: a source is refused when any
//! deny prefix contains it, else admitted when allow is empty or any allow
//! prefix contains it — deny wins whatever the lengths. Sources are matched in
//! the IPv4-mapped space, as the bindings are (`::/0` contains IPv4 sources,
//! `0.0.0.0/0` no IPv6 one), exactly as `IpPrefix::contains` does.
//!
//! Cost: a destination without rules pays one ARRAY read (its rule state, 0);
//! one with rules pays that and one LPM trie lookup, keyed {destination, phase,
//! source address}. The longest match is the verdict: [`compile::compile_rules`]
//! turns allow/deny into entries for which longest match equals `admits()` (a
//! default entry of length 0 that refuses when allow is non-empty; every deny
//! prefix; every allow prefix that no deny prefix contains). The trie's depth
//! is bounded by its 160 key bits and grows with the number of rules, never
//! with the number of bindings; a lookup that matches no binding pays nothing.
//!
//! Rules are per destination and change on their own, not with the binding
//! generation, so that setting one socket's rules costs its few entries rather
//! than a rewrite of every binding. Each destination has two phases of rule
//! entries and one ARRAY slot saying which phase is live (0: no rules). A
//! change writes the new entries into the idle phase, then flips the slot with
//! one 4-byte store: a lookup reads the slot once and sees the destination's
//! old rules or its new ones, never a mix. The old phase's entries are deleted
//! only after a grace period (the same `membarrier` wait as above) has passed
//! since the flip: at the next [`Dispatcher::apply`], or at the next change of
//! that destination's rules, which waits first if it must reuse that phase
//! sooner. Setting rules where there were none never waits. The caller sets a
//! socket's rules before its socket and bindings are published, so that no
//! packet reaches it unfiltered; a destination id handed to another socket
//! keeps its rules until they are set again (empty lists clear them).
//!
//! # Pins
//!
//! Program, link and maps are pinned under `/sys/fs/bpf/holdfast/<instance>`
//! (bpffs is mounted if missing): staged in a temporary directory, then renamed
//! into place under an `flock` on `/sys/fs/bpf/holdfast`. A stale directory left
//! by a holdfast that died is replaced (unpinning its link detaches its program);
//! [`Dispatcher::detach`] removes everything.

pub mod compile;
mod links;
mod pins;
mod sys;
mod table;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock, PoisonError};

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, ArrayOfMaps, Map, MapData, PerCpuArray};
use aya::programs::{links::FdLink, SkLookup};
use aya::{Ebpf, EbpfLoader};
use holdfast_common::{
    class_entry, port_class_index, rule_tag, Bucket, LengthSlot, RuleData, TableShape,
    COUNTERS_MAP, GENERATION_MAP, INNER_BUCKETS, LENGTHS_MAP, LENGTH_SLOTS, LOOKUP_PROGRAM,
    PORT_CLASS_MAP, RULES_MAP, RULE_ADMIT, RULE_REFUSE, RULE_STATE_MAP, RULE_TAG_BITS, SOCKETS_MAP,
    TABLE_MAP,
};

pub use compile::{compile, compile_rules, BindingEntry, Compiled, RuleEntry};
pub use holdfast_common::{DEFAULT_BINDING_ENTRIES, MAX_DESTINATIONS};
/// BPF_PROG_TEST_RUN of an sk_lookup program, for the tests and `holdfast-bench`.
pub use sys::{socket_cookie, test_run_sk_lookup, SkLookupCtx, TestRun};

use crate::unit::{IpPrefix, PortRange, Protocol};

/// The sockmap slot and counter index of one socket.
pub type DestinationId = u32;

/// One (protocol, prefix, port range) that steers traffic to a destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    pub service: String,
    pub socket: String,
    /// Tcp or Udp.
    pub protocol: Protocol,
    pub prefix: IpPrefix,
    pub ports: PortRange,
    pub destination: DestinationId,
}

/// A destination's counters, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Counters {
    /// Lookups that matched one of its bindings.
    pub lookups: u64,
    /// ... whose socket was not in the sockmap (dropped).
    pub misses: u64,
    /// ... for which bpf_sk_assign failed (dropped).
    pub errors: u64,
    /// ... whose source its allow/deny rules refused (dropped).
    pub denied: u64,
}

/// A destination's source rules, as given to [`Dispatcher::set_source_rules`].
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct SourceRules {
    pub allow: Vec<IpPrefix>,
    pub deny: Vec<IpPrefix>,
}

/// Errors of the dispatcher; each names the operation and the object.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    #[error("bpffs is not mounted at {path} and cannot be mounted: {source}")]
    Bpffs { path: PathBuf, source: nix::Error },
    #[error("the sk_lookup BPF object is empty: holdfast was built with AYA_BUILD_SKIP set")]
    NotBuilt,
    #[error("cannot load the BPF object (needs CAP_BPF, or root): {source}")]
    LoadObject { source: aya::EbpfError },
    #[error("cannot load BPF program {name} (needs CAP_BPF and CAP_NET_ADMIN): {source}")]
    LoadProgram {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("the BPF object has no {kind} named {name}")]
    MissingObject {
        kind: &'static str,
        name: &'static str,
    },
    #[error("cannot {op} BPF map {map}: {source}")]
    Map {
        op: &'static str,
        map: &'static str,
        source: aya::maps::MapError,
    },
    #[error("cannot {op} BPF map {map}: {source}")]
    MapSyscall {
        op: &'static str,
        map: &'static str,
        source: io::Error,
    },
    #[error("cannot open network namespace {path}: {source}")]
    OpenNetns { path: PathBuf, source: io::Error },
    #[error("cannot attach the sk_lookup program to network namespace {netns}: {source}")]
    Attach {
        netns: PathBuf,
        source: aya::programs::ProgramError,
    },
    #[error("cannot pin {what} at {path}: {source}")]
    Pin {
        what: &'static str,
        path: PathBuf,
        source: aya::pin::PinError,
    },
    #[error("cannot {op} BPF link {id}: {source}")]
    Links {
        op: &'static str,
        id: u32,
        source: io::Error,
    },
    #[error("cannot {op} BPF pin path {path}: {source}")]
    Pins {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("invalid dispatcher instance name {instance:?}: one path component, without '.', not starting with '__'")]
    InstanceName { instance: String },
    #[error("{entries} binding entries do not fit the binding table ({slots} slots a generation): declare fewer prefixes, or port ranges that split the ports into fewer classes")]
    TableFull { entries: usize, slots: usize },
    #[error("bindings are equally specific and overlap: {first} and {second}")]
    Ambiguous { first: String, second: String },
    #[error("only tcp and udp can be steered: {binding}")]
    UnsupportedProtocol { binding: String },
    #[error("destination id out of range (max {max}): {binding}")]
    DestinationOutOfRange { binding: String, max: u32 },
    #[error("invalid port range: {binding}")]
    InvalidPortRange { binding: String },
    #[error("invalid source prefix {prefix} in the rules of destination {destination}")]
    InvalidSourcePrefix {
        destination: DestinationId,
        prefix: String,
    },
    #[error("destination {destination} is out of range (max {max})")]
    Destination {
        destination: DestinationId,
        max: u32,
    },
    #[error("cannot put the socket of destination {destination} in the sockmap: {source}")]
    InsertSocket {
        destination: DestinationId,
        source: io::Error,
    },
    #[error("cannot remove the socket of destination {destination} from the sockmap: {source}")]
    RemoveSocket {
        destination: DestinationId,
        source: io::Error,
    },
}

/// The BPF object, built by build.rs through aya-build.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/holdfast-ebpf"));

/// Can BPF be used here? Mounts bpffs if it is missing, then loads the program
/// (without attaching it, and without the table's inner arrays, whose setting
/// waits for an RCU grace period). The error says plainly what is missing.
pub fn probe() -> Result<(), DispatchError> {
    pins::ensure_bpffs()?;
    load_object(DEFAULT_BINDING_ENTRIES).map(drop)
}

/// aya's loader, one per process: `EbpfLoader::new` reads and parses the
/// kernel's BTF (5 MB of `/sys/kernel/btf/vmlinux`; 21 ms here) each time it
/// is called, and a start loads the object twice ([`probe`], then the attach).
static LOADER: OnceLock<Mutex<EbpfLoader<'static>>> = OnceLock::new();

/// Runs `f` with the process's loader, made on first use.
fn with_loader<T>(f: impl FnOnce(&mut EbpfLoader<'static>) -> T) -> T {
    let loader = LOADER.get_or_init(|| {
        #[cfg(test)]
        tests::LOADERS_MADE.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Mutex::new(EbpfLoader::new())
    });
    f(&mut loader.lock().unwrap_or_else(PoisonError::into_inner))
}

/// Makes the process's loader in a thread of its own, so that the kernel's
/// BTF is parsed while the caller goes on (an upgraded holdfast adopting its
/// services); the first load waits for it. The thread touches nothing else.
pub fn warm_up() {
    let spawned = std::thread::Builder::new()
        .name("bpf-loader".into())
        .spawn(|| with_loader(|_| ()));
    if let Err(e) = spawned {
        // The first load makes the loader itself.
        tracing::debug!(error = %e, "cannot start a thread to parse the kernel's BTF ahead");
    }
}

/// Loads the object with its table sized for `capacity` binding entries and
/// its program, into the kernel; returns it and the inner arrays per half.
fn load_object(capacity: u32) -> Result<(Ebpf, u32), DispatchError> {
    if OBJECT.is_empty() {
        return Err(DispatchError::NotBuilt);
    }
    let maps = table::maps_per_half(capacity);
    let mut ebpf = with_loader(|loader| loader.map_max_entries(TABLE_MAP, 2 * maps).load(OBJECT))
        .map_err(|source| DispatchError::LoadObject { source })?;
    sk_lookup_program(&mut ebpf, LOOKUP_PROGRAM)?
        .load()
        .map_err(|source| DispatchError::LoadProgram {
            name: LOOKUP_PROGRAM,
            source,
        })?;
    Ok((ebpf, maps))
}

/// The shadow of the port class array: `[generation][protocol slot * 65536 + port]`.
type ClassShadow = [Vec<u16>; 2];

/// The loaded object and the state of its maps; not attached, not pinned.
struct Loaded {
    ebpf: Ebpf,
    generation: Array<MapData, u32>,
    port_class: Array<MapData, u32>,
    lengths: Array<MapData, LengthSlot>,
    table: ArrayOfMaps<MapData, Array<MapData, Bucket>>,
    sockets: MapData,
    counters: PerCpuArray<MapData, holdfast_common::Counters>,
    /// The live generation, 0 or 1.
    live: u32,
    /// Inner arrays in each generation's half of the table.
    maps: u32,
    /// What each generation's half of the table holds; `None`: unknown (a
    /// write failed), so the next set written there is written whole.
    halves: [Option<table::Half>; 2],
    /// What the port class array holds, per generation (`u16::MAX`: unknown).
    classes: ClassShadow,
    bindings: Vec<Binding>,
    sockets_inserted: BTreeSet<DestinationId>,
    rule_state: Array<MapData, u32>,
    rules: LpmTrie<MapData, RuleData, u32>,
    /// The live rules of each destination that has some.
    source_rules: BTreeMap<DestinationId, LiveRules>,
    /// Rule entries no longer live, still in the trie until a grace period
    /// has passed since they stopped being live.
    stale_rules: Vec<StaleRule>,
    /// Grace periods waited so far (see [`Loaded::wait_grace`]).
    grace_periods: u64,
}

/// One destination's live source rules.
struct LiveRules {
    rules: SourceRules,
    entries: Vec<RuleEntry>,
    /// The phase (0 or 1) its entries are written in.
    phase: u32,
}

/// A rule entry that a lookup may still be reading: deletable once
/// `grace_periods > since`.
struct StaleRule {
    destination: DestinationId,
    phase: u32,
    entry: RuleEntry,
    since: u64,
}

fn rule_key(destination: DestinationId, phase: u32, e: &RuleEntry) -> Key<RuleData> {
    // The address words keep the bytes' order in memory: network order.
    let word =
        |i: usize| u32::from_ne_bytes([e.addr[i], e.addr[i + 1], e.addr[i + 2], e.addr[i + 3]]);
    Key::new(
        RULE_TAG_BITS + u32::from(e.prefix_len),
        RuleData {
            tag: rule_tag(destination, phase).to_be(),
            addr: [word(0), word(4), word(8), word(12)],
        },
    )
}

fn map_err(
    op: &'static str,
    map: &'static str,
) -> impl FnOnce(aya::maps::MapError) -> DispatchError {
    move |source| DispatchError::Map { op, map, source }
}

impl Loaded {
    /// Loads the object with room for `capacity` binding entries (both
    /// generations together), pinning the maps into `pin_dir` if given.
    fn load(capacity: u32, pin_dir: Option<&Path>) -> Result<Loaded, DispatchError> {
        let (mut ebpf, maps) = load_object(capacity)?;
        if let Some(dir) = pin_dir {
            for name in [
                GENERATION_MAP,
                PORT_CLASS_MAP,
                LENGTHS_MAP,
                TABLE_MAP,
                SOCKETS_MAP,
                COUNTERS_MAP,
                RULE_STATE_MAP,
                RULES_MAP,
            ] {
                let path = dir.join(name);
                take_ref(&ebpf, name)?
                    .pin(&path)
                    .map_err(|source| DispatchError::Pin {
                        what: "map",
                        path: path.clone(),
                        source,
                    })?;
                pins::set_mode(&path, 0o640)?;
            }
        }
        let generation = open_map(&mut ebpf, GENERATION_MAP)?;
        let port_class = open_map(&mut ebpf, PORT_CLASS_MAP)?;
        let lengths = open_map(&mut ebpf, LENGTHS_MAP)?;
        let table = match take(&mut ebpf, TABLE_MAP)? {
            Map::ArrayOfMaps(outer) => {
                set_inner_tables(outer.fd().as_fd(), 2 * maps)?;
                ArrayOfMaps::try_from(Map::ArrayOfMaps(outer))
                    .map_err(map_err("open", TABLE_MAP))?
            }
            _ => {
                return Err(DispatchError::MissingObject {
                    kind: "array of maps",
                    name: TABLE_MAP,
                })
            }
        };
        let counters = open_map(&mut ebpf, COUNTERS_MAP)?;
        let rule_state = open_map(&mut ebpf, RULE_STATE_MAP)?;
        let rules = open_map(&mut ebpf, RULES_MAP)?;
        let sockets = match take(&mut ebpf, SOCKETS_MAP)? {
            Map::SockMap(data) => data,
            _ => {
                return Err(DispatchError::MissingObject {
                    kind: "sockmap",
                    name: SOCKETS_MAP,
                })
            }
        };
        Ok(Loaded {
            ebpf,
            generation,
            port_class,
            lengths,
            table,
            sockets,
            counters,
            live: 0,
            maps,
            // A new map is all zeros: the first set writes only its own buckets.
            halves: [(); 2].map(|()| Some(table::Half::empty(maps, rand_seed()))),
            classes: [vec![0; 2 << 16], vec![0; 2 << 16]],
            bindings: Vec::new(),
            sockets_inserted: BTreeSet::new(),
            rule_state,
            rules,
            source_rules: BTreeMap::new(),
            stale_rules: Vec::new(),
            grace_periods: 0,
        })
    }

    /// A CLOEXEC duplicate of a loaded program's fd, for BPF_PROG_TEST_RUN.
    #[cfg(test)]
    fn program_fd(&mut self, name: &'static str) -> Result<std::os::fd::OwnedFd, DispatchError> {
        let fd = sk_lookup_program(&mut self.ebpf, name)?
            .fd()
            .map_err(|source| DispatchError::LoadProgram { name, source })?;
        Ok(fd.as_fd().try_clone_to_owned().expect("dup a program fd"))
    }

    fn apply(&mut self, bindings: &[Binding]) -> Result<(), DispatchError> {
        let compiled = compile(bindings, MAX_DESTINATIONS)?;
        let idle = self.live ^ 1;
        let seed = match &self.halves[idle as usize] {
            Some(h) => h.seed,
            None => rand_seed(),
        };
        let half = table::build(&compiled.entries, self.maps, seed).map_err(|full| {
            DispatchError::TableFull {
                entries: full.entries,
                slots: full.slots,
            }
        })?;

        // 1. Port classes of the idle generation: write what differs.
        self.write_port_classes(idle, &compiled.classes)?;

        // 2. The idle half of the table, then the prefix lengths, longest
        //    first, each with the half's shape.
        let shape = self.write_half(idle, half)?;
        let mut lengths: Vec<u8> = compiled.entries.iter().map(|(e, _)| e.prefix_len).collect();
        lengths.sort_unstable_by(|a, b| b.cmp(a));
        lengths.dedup();
        let slots = lengths
            .iter()
            .map(|l| LengthSlot::new(*l, shape))
            .chain(std::iter::once(LengthSlot::END));
        for (i, slot) in slots.enumerate() {
            self.lengths
                .set(idle * LENGTH_SLOTS + i as u32, slot, 0)
                .map_err(map_err("update", LENGTHS_MAP))?;
        }

        // 3. The flip: one 4-byte store.
        self.generation
            .set(0, idle, 0)
            .map_err(map_err("update", GENERATION_MAP))?;
        self.live = idle;
        self.bindings = bindings.to_vec();

        // 4. Wait for lookups that read the old generation: the next change
        //    writes there.
        self.wait_grace();
        self.purge_stale_rules();
        Ok(())
    }

    /// Writes `half` into generation `idle`'s half of the table (the buckets
    /// that differ from what is there); returns where it is.
    fn write_half(&mut self, idle: u32, half: table::Half) -> Result<TableShape, DispatchError> {
        let base = idle * self.maps;
        let old = self.halves[idle as usize].take();
        let per_map = INNER_BUCKETS as usize;
        for (m, buckets) in half.buckets.chunks(per_map).enumerate() {
            let (mut keys, mut values) = (Vec::new(), Vec::new());
            for (i, b) in buckets.iter().enumerate() {
                if old
                    .as_ref()
                    .is_none_or(|o| o.buckets[m * per_map + i] != *b)
                {
                    keys.push(i as u32);
                    values.push(*b);
                }
            }
            if keys.is_empty() {
                continue;
            }
            let inner = self.inner_table(base + m as u32)?;
            sys::array_update_batch(inner.inner_fd(), &keys, &values).map_err(|source| {
                DispatchError::MapSyscall {
                    op: "batch-update",
                    map: TABLE_MAP,
                    source,
                }
            })?;
        }
        let shape = TableShape {
            seed: half.seed,
            base,
            maps: self.maps,
        };
        self.halves[idle as usize] = Some(half);
        Ok(shape)
    }

    /// Inner array `index` of the table (an fd of its own, closed on drop).
    fn inner_table(&self, index: u32) -> Result<Array<MapData, Bucket>, DispatchError> {
        self.table
            .get(&index, 0)
            .map_err(map_err("read", TABLE_MAP))
    }

    /// The port classes of generation `idle`: only the entries whose idle
    /// half differs from its shadow, in one batch (a failure leaves the idle
    /// shadow unknown). Each entry is written whole, its live half as the live
    /// shadow has it: that shadow is exact, since a generation goes live only
    /// after its write succeeded.
    fn write_port_classes(&mut self, idle: u32, classes: &[Vec<u16>]) -> Result<(), DispatchError> {
        let (mut keys, mut values) = (Vec::new(), Vec::new());
        let [gen0, gen1] = &mut self.classes;
        let (shadow, live) = if idle == 0 {
            (gen0, &*gen1)
        } else {
            (gen1, &*gen0)
        };
        for (slot, classes) in classes.iter().enumerate() {
            for (port, class) in classes.iter().enumerate() {
                let i = (slot << 16) | port;
                if shadow[i] != *class {
                    debug_assert_ne!(live[i], u16::MAX, "the live shadow is exact");
                    let mut both = [live[i]; 2];
                    both[idle as usize] = *class;
                    keys.push(port_class_index(slot as u32, port as u32));
                    values.push(class_entry(both));
                }
            }
        }
        if let Err(source) = sys::array_update_batch(self.port_class.inner_fd(), &keys, &values) {
            shadow.fill(u16::MAX);
            return Err(DispatchError::MapSyscall {
                op: "batch-update",
                map: PORT_CLASS_MAP,
                source,
            });
        }
        for (slot, classes) in classes.iter().enumerate() {
            shadow[slot << 16..(slot + 1) << 16].copy_from_slice(classes);
        }
        Ok(())
    }

    /// Waits until every program run that started before this call has ended
    /// (sk_lookup runs in an RCU read-side section; see [`sys::wait_for_running_programs`]).
    fn wait_grace(&mut self) {
        if let Err(e) = sys::wait_for_running_programs() {
            tracing::warn!(error = %e, "membarrier failed; waiting 50ms for running BPF programs instead");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        self.grace_periods += 1;
    }

    /// Deletes the stale rule entries that no lookup can be reading any more.
    fn purge_stale_rules(&mut self) {
        let (grace, rules) = (self.grace_periods, &mut self.rules);
        self.stale_rules.retain(|s| {
            if s.since >= grace {
                return true;
            }
            match rules.remove(&rule_key(s.destination, s.phase, &s.entry)) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => false,
                Err(source) => {
                    tracing::warn!(error = %source, destination = s.destination, "cannot delete an old BPF source rule entry yet");
                    true
                }
            }
        });
    }

    fn set_source_rules(
        &mut self,
        dest: DestinationId,
        allow: &[IpPrefix],
        deny: &[IpPrefix],
    ) -> Result<(), DispatchError> {
        Self::check_destination(dest)?;
        let entries = compile_rules(dest, allow, deny)?;
        let rules = SourceRules {
            allow: allow.to_vec(),
            deny: deny.to_vec(),
        };
        let live = self.source_rules.get_mut(&dest);
        match live {
            Some(l) if l.entries == entries => {
                l.rules = rules;
                return Ok(());
            }
            None if entries.is_empty() => return Ok(()),
            _ => {}
        }
        let phase = self.source_rules.get(&dest).map_or(0, |l| l.phase ^ 1);
        if !entries.is_empty() {
            // Entries left in this phase by an earlier change may still be read
            // by a lookup that started before it: wait, then delete them.
            let in_phase = |s: &StaleRule| s.destination == dest && s.phase == phase;
            if self
                .stale_rules
                .iter()
                .any(|s| in_phase(s) && s.since >= self.grace_periods)
            {
                self.wait_grace();
            }
            self.purge_stale_rules();
            if self.stale_rules.iter().any(in_phase) {
                return Err(DispatchError::MapSyscall {
                    op: "delete from",
                    map: RULES_MAP,
                    source: io::Error::other(format!(
                        "old source rule entries of destination {dest} remain"
                    )),
                });
            }
            for (n, e) in entries.iter().enumerate() {
                let verdict = if e.refuse { RULE_REFUSE } else { RULE_ADMIT };
                if let Err(source) = self.rules.insert(&rule_key(dest, phase, e), verdict, 0) {
                    // Never live, and nothing reads this phase: delete at once.
                    self.remove_rule_entries(dest, phase, &entries[..n]);
                    return Err(map_err("insert into", RULES_MAP)(source));
                }
            }
        }
        // The flip: one 4-byte store.
        let state = if entries.is_empty() { 0 } else { phase + 1 };
        if let Err(source) = self.rule_state.set(dest, state, 0) {
            self.remove_rule_entries(dest, phase, &entries);
            return Err(map_err("update", RULE_STATE_MAP)(source));
        }
        if let Some(old) = self.source_rules.remove(&dest) {
            let since = self.grace_periods;
            self.stale_rules
                .extend(old.entries.iter().map(|e| StaleRule {
                    destination: dest,
                    phase: old.phase,
                    entry: *e,
                    since,
                }));
        }
        if !entries.is_empty() {
            self.source_rules.insert(
                dest,
                LiveRules {
                    rules,
                    entries,
                    phase,
                },
            );
        }
        Ok(())
    }

    /// Deletes entries that were never live.
    fn remove_rule_entries(&mut self, dest: DestinationId, phase: u32, entries: &[RuleEntry]) {
        for e in entries {
            let _ = self.rules.remove(&rule_key(dest, phase, e));
        }
    }

    fn rule_entries(&self) -> Result<usize, DispatchError> {
        count_keys(self.rules.keys(), RULES_MAP)
    }

    fn check_destination(dest: DestinationId) -> Result<(), DispatchError> {
        if dest < MAX_DESTINATIONS {
            Ok(())
        } else {
            Err(DispatchError::Destination {
                destination: dest,
                max: MAX_DESTINATIONS,
            })
        }
    }

    fn insert_socket(
        &mut self,
        dest: DestinationId,
        fd: BorrowedFd<'_>,
    ) -> Result<(), DispatchError> {
        Self::check_destination(dest)?;
        sys::sockmap_insert(self.sockets.fd().as_fd(), dest, fd).map_err(|source| {
            DispatchError::InsertSocket {
                destination: dest,
                source,
            }
        })?;
        self.sockets_inserted.insert(dest);
        Ok(())
    }

    fn remove_socket(&mut self, dest: DestinationId) -> Result<(), DispatchError> {
        Self::check_destination(dest)?;
        sys::sockmap_remove(self.sockets.fd().as_fd(), dest).map_err(|source| {
            DispatchError::RemoveSocket {
                destination: dest,
                source,
            }
        })?;
        self.sockets_inserted.remove(&dest);
        Ok(())
    }

    fn socket_present(&self, dest: DestinationId) -> bool {
        dest < MAX_DESTINATIONS
            && matches!(
                sys::sockmap_cookie(self.sockets.fd().as_fd(), dest),
                Ok(Some(_))
            )
    }

    fn counters(&self) -> Result<BTreeMap<DestinationId, Counters>, DispatchError> {
        let dests: BTreeSet<DestinationId> = self
            .bindings
            .iter()
            .map(|b| b.destination)
            .chain(self.sockets_inserted.iter().copied())
            .chain(self.source_rules.keys().copied())
            .collect();
        dests
            .into_iter()
            .map(|dest| Ok((dest, sum_per_cpu(&self.counters, dest)?)))
            .collect()
    }

    /// Starts destination counters at these values (a dispatcher replacing
    /// another in an in-place upgrade carries its figures on).
    fn seed_counters(
        &mut self,
        start: &BTreeMap<DestinationId, Counters>,
    ) -> Result<(), DispatchError> {
        let cpu_error = |source| DispatchError::Pins {
            op: "count CPUs for",
            path: COUNTERS_MAP.into(),
            source,
        };
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| cpu_error(e))?;
        for (dest, c) in start {
            let mut values = vec![holdfast_common::Counters::default(); cpus];
            values[0] = holdfast_common::Counters {
                lookups: c.lookups,
                misses: c.misses,
                errors: c.errors,
                denied: c.denied,
            };
            let values = aya::maps::PerCpuValues::try_from(values).map_err(cpu_error)?;
            self.counters
                .set(*dest, values, 0)
                .map_err(map_err("write", COUNTERS_MAP))?;
        }
        Ok(())
    }

    /// The entries in the live half of the table, as the kernel holds them.
    fn binding_entries(&self) -> Result<usize, DispatchError> {
        let base = self.live * self.maps;
        let mut n = 0;
        for m in base..base + self.maps {
            let inner = self.inner_table(m)?;
            for i in 0..INNER_BUCKETS {
                let b = inner.get(&i, 0).map_err(map_err("read", TABLE_MAP))?;
                n += b.slots.iter().filter(|s| s.meta != 0).count();
            }
        }
        Ok(n)
    }
}

/// Creates the table's `count` inner arrays and sets them in the outer map
/// `outer`, in batches: every update of an ARRAY_OF_MAPS from userspace
/// waits for an RCU grace period (`maybe_wait_bpf_programs`), once per
/// element but once per batch (16 ms each here: one at a time, the default
/// table took 1.4 s to set up). The outer map holds the inner arrays; their
/// fds close after each batch, so no more than a batch's are open at once.
fn set_inner_tables(outer: BorrowedFd<'_>, count: u32) -> Result<(), DispatchError> {
    const BATCH: u32 = 256;
    for first in (0..count).step_by(BATCH as usize) {
        let keys: Vec<u32> = (first..count.min(first + BATCH)).collect();
        let inner = keys
            .iter()
            .map(|_| Array::<MapData, Bucket>::create(INNER_BUCKETS, 0))
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err("create", TABLE_MAP))?;
        let fds: Vec<u32> = inner
            .iter()
            .map(|a| a.inner_fd().as_raw_fd() as u32)
            .collect();
        sys::array_update_batch(outer, &keys, &fds).map_err(|source| {
            DispatchError::MapSyscall {
                op: "batch-update",
                map: TABLE_MAP,
                source,
            }
        })?;
    }
    Ok(())
}

/// A destination's counters summed over CPUs.
fn sum_per_cpu(
    map: &PerCpuArray<MapData, holdfast_common::Counters>,
    dest: DestinationId,
) -> Result<Counters, DispatchError> {
    let per_cpu = map.get(&dest, 0).map_err(map_err("read", COUNTERS_MAP))?;
    Ok(per_cpu.iter().fold(Counters::default(), |a, c| Counters {
        lookups: a.lookups + c.lookups,
        misses: a.misses + c.misses,
        errors: a.errors + c.errors,
        denied: a.denied + c.denied,
    }))
}

/// The number of keys a map iteration yields, as the kernel counts them.
fn count_keys<K>(
    keys: impl Iterator<Item = Result<K, aya::maps::MapError>>,
    map: &'static str,
) -> Result<usize, DispatchError> {
    let mut n = 0;
    for key in keys {
        key.map_err(map_err("iterate", map))?;
        n += 1;
    }
    Ok(n)
}

fn sk_lookup_program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SkLookup, DispatchError> {
    ebpf.program_mut(name)
        .ok_or(DispatchError::MissingObject {
            kind: "program",
            name,
        })?
        .try_into()
        .map_err(|source| DispatchError::LoadProgram { name, source })
}

/// Takes map `name` out of the object as the typed map `M`.
fn open_map<M>(ebpf: &mut Ebpf, name: &'static str) -> Result<M, DispatchError>
where
    M: TryFrom<Map, Error = aya::maps::MapError>,
{
    M::try_from(take(ebpf, name)?).map_err(map_err("open", name))
}

fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<Map, DispatchError> {
    ebpf.take_map(name)
        .ok_or(DispatchError::MissingObject { kind: "map", name })
}

fn take_ref<'a>(ebpf: &'a Ebpf, name: &'static str) -> Result<&'a Map, DispatchError> {
    ebpf.map(name)
        .ok_or(DispatchError::MissingObject { kind: "map", name })
}

/// The fd of a typed map, for the raw syscalls in [`sys`].
trait InnerFd {
    fn inner_fd(&self) -> BorrowedFd<'_>;
}

impl<V: aya::Pod> InnerFd for Array<MapData, V> {
    fn inner_fd(&self) -> BorrowedFd<'_> {
        // aya 0.14's typed maps expose their MapData only through IterableMap.
        use aya::maps::IterableMap;
        self.map().fd().as_fd()
    }
}

/// The sk_lookup program attached to one network namespace, with its pins.
pub struct Dispatcher {
    loaded: Loaded,
    instance: String,
    dir: PathBuf,
    /// The attached link; also pinned, so it outlives this process unless detached.
    link: Option<FdLink>,
    /// The inode of the network namespace it is attached to.
    netns_ino: u64,
}

impl Dispatcher {
    /// Loads the program, creates and pins its maps, attaches it to the network
    /// namespace at `netns` (e.g. `/proc/self/ns/net`) and pins the link, under
    /// `/sys/fs/bpf/holdfast/<instance>`, replacing a stale instance.
    pub fn attach(instance: &str, netns: &Path) -> Result<Dispatcher, DispatchError> {
        Self::attach_with_capacity(instance, netns, DEFAULT_BINDING_ENTRIES)
    }

    /// [`Dispatcher::attach`] with room for `capacity` binding entries, both
    /// generations together (so a set may use half); the default is
    /// [`DEFAULT_BINDING_ENTRIES`]. The kernel allocates 16 bytes per slot of
    /// capacity up front (hash buckets) and each entry as it is inserted.
    pub fn attach_with_capacity(
        instance: &str,
        netns: &Path,
        capacity: u32,
    ) -> Result<Dispatcher, DispatchError> {
        Self::attach_prepared(instance, netns, capacity, |_| Ok(()))
    }

    /// [`Dispatcher::attach`] for a dispatcher that replaces a live one (an
    /// in-place upgrade): the new program is attached beside the old one,
    /// `prepare` fills its maps (sockets, bindings, counters) while the old
    /// one still steers, and only then do the old pins go (detaching the old
    /// link). Two programs selecting the same socket select it once, so no
    /// lookup finds neither. If `prepare` fails, the new one is detached and
    /// the old one is left as it was.
    pub fn attach_prepared(
        instance: &str,
        netns: &Path,
        capacity: u32,
        prepare: impl FnOnce(&mut Dispatcher) -> Result<(), DispatchError>,
    ) -> Result<Dispatcher, DispatchError> {
        pins::check_instance(instance)?;
        pins::ensure_bpffs()?;
        let netns_file = File::open(netns).map_err(|source| DispatchError::OpenNetns {
            path: netns.to_path_buf(),
            source,
        })?;
        let netns_ino = {
            use std::os::unix::fs::MetadataExt;
            netns_file
                .metadata()
                .map_err(|source| DispatchError::OpenNetns {
                    path: netns.to_path_buf(),
                    source,
                })?
                .ino()
        };
        let lock = pins::lock_root()?;
        let staging = pins::create_staging(&lock, instance)?;
        let result = Self::attach_into(&staging, &netns_file, netns, capacity);
        let (loaded, link) = match result {
            Ok(ok) => ok,
            Err(e) => {
                let _ = pins::remove_tree(&staging);
                return Err(e);
            }
        };
        let mut d = Dispatcher {
            loaded,
            instance: instance.to_string(),
            dir: staging.clone(),
            link: Some(link),
            netns_ino,
        };
        if let Err(e) = prepare(&mut d) {
            let _ = pins::remove_tree(&staging);
            return Err(e);
        }
        d.dir = match pins::commit(&lock, &staging, instance) {
            Ok(dir) => dir,
            Err(e) => {
                let _ = pins::remove_tree(&staging);
                return Err(e);
            }
        };
        drop(lock);
        tracing::info!(instance, netns = %netns.display(), pins = %d.dir.display(), "sk_lookup dispatcher attached");
        Ok(d)
    }

    /// Detaches every other holdfast sk_lookup link on this dispatcher's
    /// network namespace, found through the kernel whichever bpffs pinned it
    /// (see `links.rs`), so that this one is the only one; returns their ids.
    /// The caller must make sure no live holdfast owns them: `supervisor::run`
    /// holds the namespace's instance lock. Call it right after [`attach`]:
    /// until then, both programs run on every lookup.
    ///
    /// [`attach`]: Dispatcher::attach
    pub fn detach_stale_links(&mut self) -> Result<Vec<u32>, DispatchError> {
        let own = match &self.link {
            Some(l) => Some(
                l.info()
                    .map_err(|e| DispatchError::Links {
                        op: "read",
                        id: 0,
                        source: io::Error::other(e.to_string()),
                    })?
                    .id(),
            ),
            None => None,
        };
        let mut ids = Vec::new();
        for link in links::stale(self.netns_ino, own)? {
            links::detach(&link)?;
            tracing::warn!(
                link = link.id,
                program = link.prog_id,
                netns = self.netns_ino,
                "detached a stale holdfast sk_lookup link left on this network namespace by a holdfast that is gone"
            );
            ids.push(link.id);
        }
        Ok(ids)
    }

    fn attach_into(
        staging: &Path,
        netns_file: &File,
        netns: &Path,
        capacity: u32,
    ) -> Result<(Loaded, FdLink), DispatchError> {
        let mut loaded = Loaded::load(capacity, Some(staging))?;
        let prog = sk_lookup_program(&mut loaded.ebpf, LOOKUP_PROGRAM)?;
        let prog_path = staging.join(LOOKUP_PROGRAM);
        prog.pin(&prog_path).map_err(|source| DispatchError::Pin {
            what: "program",
            path: prog_path.clone(),
            source,
        })?;
        pins::set_mode(&prog_path, 0o640)?;
        let attach = |source| DispatchError::Attach {
            netns: netns.to_path_buf(),
            source,
        };
        let link_id = prog.attach(netns_file).map_err(attach)?;
        let link: FdLink = prog.take_link(link_id).map_err(attach)?.into();
        let link_path = staging.join(pins::LINK);
        let pinned = link.pin(&link_path).map_err(|source| DispatchError::Pin {
            what: "link",
            path: link_path.clone(),
            source,
        })?;
        pins::set_mode(&link_path, 0o640)?;
        Ok((loaded, pinned.into()))
    }

    /// The instance name.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// `/sys/fs/bpf/holdfast/<instance>`.
    pub fn pin_dir(&self) -> &Path {
        &self.dir
    }

    /// Replaces the whole binding set; every lookup sees the old or the new set
    /// (see the module docs). Rejects ambiguous or invalid sets, changing nothing.
    pub fn apply(&mut self, bindings: &[Binding]) -> Result<(), DispatchError> {
        self.loaded.apply(bindings)
    }

    /// The binding set last applied.
    pub fn bindings(&self) -> &[Binding] {
        &self.loaded.bindings
    }

    /// Replaces the source rules of destination `dest` with `allow` and `deny`
    /// (a socket's `SocketOptions::allow` / `deny`); both empty: no rules, every
    /// source admitted. Takes effect at once, for that destination only, and
    /// atomically: a lookup sees its old rules or its new ones (see the module
    /// docs). Call it for every steered socket, empty lists included, before
    /// its socket and bindings are published (`insert_socket`, `apply`), and
    /// again when a reload changes its allow/deny or hands its destination id
    /// to another socket. Unchanged rules cost nothing. Rejects a prefix
    /// longer than its family allows, changing nothing.
    pub fn set_source_rules(
        &mut self,
        dest: DestinationId,
        allow: &[IpPrefix],
        deny: &[IpPrefix],
    ) -> Result<(), DispatchError> {
        self.loaded.set_source_rules(dest, allow, deny)
    }

    /// The source rules of `dest`, `None` when it has none.
    pub fn source_rules(&self, dest: DestinationId) -> Option<&SourceRules> {
        self.loaded.source_rules.get(&dest).map(|l| &l.rules)
    }

    /// Entries in the source rules trie, as the kernel counts them (live ones
    /// only, once an `apply` has returned since the last change).
    pub fn rule_entries(&self) -> Result<usize, DispatchError> {
        self.loaded.rule_entries()
    }

    /// Puts a socket (a TCP listener or an unconnected UDP socket) in the
    /// sockmap at `dest`, replacing any socket there. The kernel keeps its own
    /// reference, but drops the socket from the map when its last fd closes:
    /// the caller must keep `fd` open.
    pub fn insert_socket(
        &mut self,
        dest: DestinationId,
        fd: BorrowedFd<'_>,
    ) -> Result<(), DispatchError> {
        self.loaded.insert_socket(dest, fd)
    }

    /// Empties the sockmap slot `dest`; traffic for its bindings is then dropped
    /// and counted as misses.
    pub fn remove_socket(&mut self, dest: DestinationId) -> Result<(), DispatchError> {
        self.loaded.remove_socket(dest)
    }

    /// Per destination (of the bindings and the inserted sockets), summed over CPUs.
    /// See `Loaded::seed_counters`.
    pub fn seed_counters(
        &mut self,
        start: &BTreeMap<DestinationId, Counters>,
    ) -> Result<(), DispatchError> {
        self.loaded.seed_counters(start)
    }

    pub fn counters(&self) -> Result<BTreeMap<DestinationId, Counters>, DispatchError> {
        self.loaded.counters()
    }

    /// Whether the kernel's sockmap holds a socket at `dest` now.
    pub fn socket_present(&self, dest: DestinationId) -> bool {
        self.loaded.socket_present(dest)
    }

    /// Entries in the live half of the binding table, as the kernel holds them.
    pub fn binding_entries(&self) -> Result<usize, DispatchError> {
        self.loaded.binding_entries()
    }

    /// The counters of `dests` in the maps pinned for `instance` (a running
    /// or an old holdfast's), read now: an upgrade carries on the old
    /// program's figures as late as it can, since that program counts until
    /// its link goes.
    pub fn pinned_counters(
        instance: &str,
        dests: impl IntoIterator<Item = DestinationId>,
    ) -> Result<BTreeMap<DestinationId, Counters>, DispatchError> {
        pins::check_instance(instance)?;
        let path = pins::root().join(instance).join(COUNTERS_MAP);
        let data = MapData::from_pin(&path).map_err(|source| DispatchError::Map {
            op: "open the pinned",
            map: COUNTERS_MAP,
            source,
        })?;
        let map: PerCpuArray<MapData, holdfast_common::Counters> =
            PerCpuArray::try_from(Map::PerCpuArray(data)).map_err(map_err("open", COUNTERS_MAP))?;
        dests
            .into_iter()
            .map(|dest| Ok((dest, sum_per_cpu(&map, dest)?)))
            .collect()
    }

    /// Detaches the program, unpins everything and removes the instance directory.
    pub fn detach(mut self) -> Result<(), DispatchError> {
        let lock = pins::lock_root()?;
        pins::remove_tree(&self.dir)?;
        // The last reference to the link: the program leaves the namespace.
        drop(self.link.take());
        pins::remove_root_if_empty(&lock);
        tracing::info!(instance = %self.instance, "sk_lookup dispatcher detached");
        Ok(())
    }
}

/// A seed for a half of the binding table at load, or after a failed write: random
/// per process (std's hasher keys), so that two holdfasts do not share one.
/// Bounded lookups do not depend on it; only placement does.
fn rand_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}
