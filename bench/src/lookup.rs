//! The lookup micro-benchmark: BPF_PROG_TEST_RUN of holdfast's own
//! `holdfast_lookup` (attached by a real `Dispatcher` in a namespace of its
//! own, test-run through its pin) beside the reference programs of
//! `bench/ebpf` on the same `struct bpf_sk_lookup` context: the empty program
//! and the steer-only program (the two floors) and the tubular scheme.
//!
//! At each binding count (n distinct /32s on one port, all to one socket):
//! - hot: `rounds` rounds of `repeat` runs of each program on one hit, the
//!   programs interleaved within a round; medians.
//! - cold: `cold_runs` single runs of each program, each on a different hit
//!   drawn at random from the whole set, the programs interleaved on the same
//!   hit; medians.
//!
//! Every run of a dispatching program must select the listener (return SK_PASS
//! with its cookie), or the benchmark fails.

use std::net::{Ipv4Addr, TcpListener};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use anyhow::{bail, ensure, Context as _, Result};
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{MapData, SockMap};
use aya::programs::SkLookup;
use aya::{Ebpf, EbpfLoader};
use holdfast::dispatch::{
    socket_cookie, test_run_sk_lookup, Binding, Dispatcher, SkLookupCtx, DEFAULT_BINDING_ENTRIES,
};
use holdfast::unit::{IpPrefix, PortRange, Protocol};
use holdfast_common::{IPPROTO_TCP, LOOKUP_PROGRAM};

use crate::netns::{Netns, THREAD_NETNS};
use crate::report::{count, median, Rng, Row};
use crate::Attached;

/// The reference programs, built by build.rs.
static BENCH_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/holdfast-bench-ebpf"));

const AF_INET: u32 = 2;
const SK_PASS: u32 = 1;
/// The port every binding is on (the steer-only program checks for it).
const PORT: u16 = 8080;

/// What the step measures; see the module docs.
#[derive(Debug, Clone)]
pub struct Options {
    pub repeat: u32,
    pub rounds: u32,
    pub sizes: Vec<usize>,
    pub cold_runs: u32,
}

/// The programs, in the order of a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Prog {
    Empty,
    Steer,
    Holdfast,
    Tubular,
}

const PROGS: [Prog; 4] = [Prog::Empty, Prog::Steer, Prog::Holdfast, Prog::Tubular];

/// The trie key of the tubular scheme; the layout of `bench/ebpf`'s `TubularKey`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct TubularKey {
    protocol: u8,
    _pad: u8,
    port: u16,
    addr: [u32; 4],
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct TubularValue {
    destination: u32,
    prefix_len: u32,
}

// SAFETY: repr(C), Copy, the padding byte an explicit field: any bit pattern is valid.
unsafe impl aya::Pod for TubularKey {}
// SAFETY: repr(C), Copy, two u32: no padding.
unsafe impl aya::Pod for TubularValue {}

/// The `i`-th of the distinct /32 bindings in 10.0.0.0/8.
fn nth_address(i: usize) -> Ipv4Addr {
    // 2654435761 is odd, so i ↦ i·k mod 2^24 is a bijection: distinct, spread.
    let host = (i as u32).wrapping_mul(2_654_435_761) & 0x00ff_ffff;
    Ipv4Addr::from((10u32 << 24) | host)
}

fn binding(addr: Ipv4Addr, ports: PortRange) -> Binding {
    Binding {
        service: "bench".into(),
        socket: "bench".into(),
        protocol: Protocol::Tcp,
        prefix: IpPrefix {
            addr: addr.into(),
            len: 32,
        },
        ports,
        destination: 0,
    }
}

fn tubular_key(addr: Ipv4Addr, port: u16, prefix_len: u32) -> Key<TubularKey> {
    let o = addr.octets();
    Key::new(
        32 + 96 + prefix_len,
        TubularKey {
            protocol: IPPROTO_TCP,
            _pad: 0,
            port: port.to_be(),
            addr: [0, 0, 0xffffu32.to_be(), u32::from_ne_bytes(o)],
        },
    )
}

fn context(hit: Ipv4Addr) -> SkLookupCtx {
    SkLookupCtx {
        family: AF_INET,
        protocol: u32::from(IPPROTO_TCP),
        remote_ip4: u32::from_ne_bytes([192, 0, 2, 1]),
        remote_port: 40000u16.to_be(),
        local_ip4: u32::from_ne_bytes(hit.octets()),
        local_port: u32::from(PORT),
        ..Default::default()
    }
}

/// The loaded programs and the socket they must select.
struct Programs<'a> {
    fds: [BorrowedFd<'a>; 4],
    cookie: u64,
}

impl Programs<'_> {
    /// ns of one test run of `p` (`repeat` runs on `ctx`), checked.
    fn run(&self, p: Prog, ctx: &SkLookupCtx, repeat: u32) -> Result<u32> {
        let r = test_run_sk_lookup(self.fds[p as usize], ctx, repeat)
            .with_context(|| format!("BPF_PROG_TEST_RUN of {p:?}"))?;
        if p != Prog::Empty && (r.retval != SK_PASS || r.cookie != self.cookie) {
            bail!(
                "{p:?} did not select the listener for {}:{PORT} (retval {}, cookie {} want {})",
                Ipv4Addr::from(u32::from_be(ctx.local_ip4)),
                r.retval,
                r.cookie,
                self.cookie
            );
        }
        Ok(r.ns_per_run)
    }
}

/// One program's medians at one size.
#[derive(Debug, Clone, Copy, Default)]
struct Figure {
    hot: f64,
    cold: f64,
}

/// Runs the benchmark in a namespace of its own thread (see `netns`).
pub fn run(o: Options) -> Result<Vec<Row>> {
    crate::netns::on_own_thread("lookup", move || measure(&o))
}

/// The steer-only program (the floor of real traffic too), attached to the
/// calling thread's namespace with `socket` at its sockmap's slot 0. It stays
/// attached as long as the returned object lives.
pub(crate) fn attach_steer_only(socket: BorrowedFd<'_>) -> Result<Ebpf> {
    let mut ebpf = load_reference(1)?;
    sockmap(&mut ebpf, "BENCH_STEER_SOCKETS")?.set(0, &socket.as_raw_fd(), 0)?;
    let netns = std::fs::File::open(THREAD_NETNS).context("open the thread's namespace")?;
    let p: &mut SkLookup = ebpf
        .program_mut("bench_steer")
        .context("no program bench_steer")?
        .try_into()?;
    p.attach(netns).context("attach the steer-only program")?;
    Ok(ebpf)
}

fn load_reference(largest: usize) -> Result<Ebpf> {
    ensure!(
        !BENCH_OBJECT.is_empty(),
        "the benchmark's BPF object is empty: built with AYA_BUILD_SKIP set"
    );
    let entries = u32::try_from(largest + 16).context("too many bindings")?;
    let mut ebpf = EbpfLoader::new()
        .map_max_entries("TUBULAR_BINDINGS", entries.max(1024))
        .load(BENCH_OBJECT)
        .context("load the benchmark's BPF object (needs CAP_BPF)")?;
    for name in ["bench_empty", "bench_steer", "bench_tubular"] {
        let p: &mut SkLookup = ebpf
            .program_mut(name)
            .with_context(|| format!("no program {name}"))?
            .try_into()?;
        p.load().with_context(|| format!("load {name}"))?;
    }
    Ok(ebpf)
}

fn program_fd<'a>(ebpf: &'a Ebpf, name: &str) -> Result<BorrowedFd<'a>> {
    let p: &SkLookup = ebpf
        .program(name)
        .with_context(|| format!("no program {name}"))?
        .try_into()?;
    Ok(p.fd()?.as_fd())
}

fn sockmap(ebpf: &mut Ebpf, name: &str) -> Result<SockMap<MapData>> {
    let map = ebpf
        .take_map(name)
        .with_context(|| format!("no map {name}"))?;
    Ok(SockMap::try_from(map)?)
}

fn measure(o: &Options) -> Result<Vec<Row>> {
    let mut sizes = o.sizes.clone();
    sizes.sort_unstable();
    sizes.dedup();
    let largest = sizes.last().copied().unwrap_or(1).max(1);
    let _ns = Netns::create(&[])?;
    let listener = TcpListener::bind("127.0.0.1:0").context("bind the listener")?;
    let cookie = socket_cookie(listener.as_fd()).context("SO_COOKIE")?;

    // holdfast's own program, attached here, with room for both generations.
    let capacity = u32::try_from(2 * largest + 1024).context("too many bindings")?;
    let instance = format!("bench-{}-lookup", std::process::id());
    let mut attached = Attached(Some(
        Dispatcher::attach_with_capacity(
            &instance,
            THREAD_NETNS.as_ref(),
            capacity.max(DEFAULT_BINDING_ENTRIES),
        )
        .context("attach the dispatcher (needs CAP_BPF)")?,
    ));
    let d = attached.get();
    d.insert_socket(0, listener.as_fd())?;
    let holdfast = SkLookup::from_pin(d.pin_dir().join(LOOKUP_PROGRAM))
        .context("open holdfast's pinned program")?;

    let mut reference = load_reference(largest)?;
    sockmap(&mut reference, "BENCH_STEER_SOCKETS")?.set(0, &listener.as_raw_fd(), 0)?;
    sockmap(&mut reference, "TUBULAR_SOCKETS")?.set(0, &listener.as_raw_fd(), 0)?;
    let mut trie: LpmTrie<MapData, TubularKey, TubularValue> = LpmTrie::try_from(
        reference
            .take_map("TUBULAR_BINDINGS")
            .context("no map TUBULAR_BINDINGS")?,
    )?;

    let one_port = PortRange {
        first: PORT,
        last: PORT,
    };
    let all_ports = PortRange {
        first: 1,
        last: 65535,
    };
    d.apply(&[binding(nth_address(0), all_ports)])?;
    let entries_all_ports = d.binding_entries()?;
    d.apply(&[binding(nth_address(0), one_port)])?;
    let entries_one_port = d.binding_entries()?;

    let programs = Programs {
        fds: [
            program_fd(&reference, "bench_empty")?,
            program_fd(&reference, "bench_steer")?,
            holdfast.fd()?.as_fd(),
            program_fd(&reference, "bench_tubular")?,
        ],
        cookie,
    };
    let mut rng = Rng::new();
    let mut in_trie = 0;
    let mut results: Vec<(usize, [Figure; 4])> = Vec::new();
    for &n in &sizes {
        let n = n.max(1);
        let set: Vec<Binding> = (0..n).map(|i| binding(nth_address(i), one_port)).collect();
        attached.get().apply(&set)?;
        drop(set);
        let value = TubularValue {
            destination: 0,
            prefix_len: 32,
        };
        for i in in_trie..n {
            trie.insert(&tubular_key(nth_address(i), PORT, 32), value, 0)
                .context("insert into the tubular trie")?;
        }
        in_trie = n;
        eprintln!("holdfast-bench: lookup: {} bindings", count(n));

        let hot_ctx = context(nth_address(n / 2));
        let mut hot: [Vec<f64>; 4] = Default::default();
        for round in 0..o.rounds.max(1) {
            // The order turns every round, so no program always runs first.
            for k in 0..PROGS.len() {
                let p = PROGS[(k + round as usize) % PROGS.len()];
                hot[p as usize].push(f64::from(programs.run(p, &hot_ctx, o.repeat)?));
            }
        }
        let mut cold: [Vec<f64>; 4] = Default::default();
        for run in 0..o.cold_runs.max(1) {
            let ctx = context(nth_address(rng.below(n as u64) as usize));
            for k in 0..PROGS.len() {
                let p = PROGS[(k + run as usize) % PROGS.len()];
                cold[p as usize].push(f64::from(programs.run(p, &ctx, 1)?));
            }
        }
        let fig = |p: Prog| Figure {
            hot: median(hot[p as usize].clone()),
            cold: median(cold[p as usize].clone()),
        };
        results.push((n, PROGS.map(fig)));
    }
    attached.get().apply(&[])?;
    attached.detach()?;
    Ok(rows(&results, entries_all_ports, entries_one_port))
}

fn rows(results: &[(usize, [Figure; 4])], all_ports: usize, one_port: usize) -> Vec<Row> {
    let mut out = Vec::new();
    const E: usize = Prog::Empty as usize;
    const S: usize = Prog::Steer as usize;
    const H: usize = Prog::Holdfast as usize;
    const T: usize = Prog::Tubular as usize;
    // (mode, what is compared, figure: holdfast's and its baseline's).
    type Compare = (&'static str, &'static str, fn(&[Figure; 4]) -> (f64, f64));
    let compares: [Compare; 5] = [
        ("hot", "holdfast ÷ empty program", |f| (f[H].hot, f[E].hot)),
        (
            "hot",
            "holdfast − empty ÷ steer-only − empty (target ≤ 1.5)",
            |f| (f[H].hot - f[E].hot, f[S].hot - f[E].hot),
        ),
        ("hot", "holdfast ÷ tubular scheme (target < 1)", |f| {
            (f[H].hot, f[T].hot)
        }),
        ("cold", "holdfast ÷ empty program", |f| {
            (f[H].cold, f[E].cold)
        }),
        ("cold", "holdfast ÷ tubular scheme (target < 1)", |f| {
            (f[H].cold, f[T].cold)
        }),
    ];
    for (n, f) in results {
        let at = format!("{} binding{}", count(*n), if *n == 1 { "" } else { "s" });
        for (mode, what, figure) in compares {
            let (value, baseline) = figure(f);
            out.push(Row::new(
                format!("lookup {mode}, {at}: {what}"),
                value,
                Some(baseline),
                "ns/run",
            ));
        }
    }
    if let (Some((n0, first)), Some((n1, last))) = (results.first(), results.last()) {
        for (mode, target, get) in [
            ("hot", "1.1", (|f: &Figure| f.hot) as fn(&Figure) -> f64),
            ("cold", "1.5", |f: &Figure| f.cold),
        ] {
            // Each size as a multiple of the empty program in the same rounds.
            let (a, b) = (
                get(&first[H]) / get(&first[E]),
                get(&last[H]) / get(&last[E]),
            );
            out.push(Row::new(
                format!(
                    "lookup flatness {mode}, {} ÷ {} bindings (target ≤ {target})",
                    count(*n1),
                    count(*n0)
                ),
                b,
                Some(a),
                "× empty",
            ));
        }
    }
    out.push(Row::new(
        "map entries, ports 1-65535 ÷ one port",
        all_ports as f64,
        Some(one_port as f64),
        "entries",
    ));
    out
}
