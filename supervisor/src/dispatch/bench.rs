//! The lookup micro-benchmark: BPF_PROG_TEST_RUN of the sk_lookup program on a
//! hit, at several binding counts, each divided by the empty program measured
//! in the same round, so that the figures are ratios on a shared, noisy machine.
//! Loads its own copy of the object; attaches nothing, pins nothing.

use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::os::fd::AsFd;

use holdfast_common::{EMPTY_PROGRAM, IPPROTO_TCP, LOOKUP_PROGRAM};

use super::sys::{self, SkLookupCtx};
use super::{Binding, DispatchError, Loaded};
use crate::unit::{IpPrefix, PortRange, Protocol};

const AF_INET: u32 = 2;
const SK_PASS: u32 = 1;
const PORT: u16 = 8080;

/// One binding count's figures (medians over the rounds).
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchFigure {
    pub bindings: usize,
    pub binding_entries: usize,
    /// ns per run of the lookup program on a hit that selects a socket.
    pub hit_ns: u32,
    /// ns per run of the empty program in the same rounds.
    pub empty_ns: u32,
    /// `hit_ns / empty_ns`.
    pub ratio: f64,
}

/// Everything the benchmark measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    pub repeat: u32,
    pub rounds: u32,
    pub figures: Vec<BenchFigure>,
    /// Binding entries for one binding on ports 1-65535 …
    pub entries_all_ports: usize,
    /// … and for one binding on a single port.
    pub entries_one_port: usize,
}

/// The `i`-th of `n` distinct /32 bindings in 10.0.0.0/8, all to destination 0.
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
            addr: IpAddr::V4(addr),
            len: 32,
        },
        ports,
        destination: 0,
    }
}

fn median(mut v: Vec<u32>) -> u32 {
    v.sort_unstable();
    v[v.len() / 2]
}

/// Measures a hit at each of `sizes` binding counts, `rounds` rounds of
/// `repeat` runs each (lookup and empty program alternating), and counts binding
/// entries for an all-ports binding against a single-port one. Needs CAP_BPF.
pub fn bench_lookup(
    sizes: &[usize],
    repeat: u32,
    rounds: u32,
) -> Result<BenchReport, DispatchError> {
    let largest = sizes.iter().copied().max().unwrap_or(1);
    // Both generations coexist during a change.
    let capacity = u32::try_from(2 * largest + 1024).unwrap_or(u32::MAX);
    let mut loaded = Loaded::load(capacity.max(holdfast_common::DEFAULT_BINDING_ENTRIES), None)?;
    let listener =
        TcpListener::bind("127.0.0.1:0").map_err(|source| DispatchError::BenchSetup {
            what: "listener",
            source,
        })?;
    loaded.insert_socket(0, listener.as_fd())?;
    let cookie =
        sys::socket_cookie(listener.as_fd()).map_err(|source| DispatchError::BenchSetup {
            what: "socket cookie",
            source,
        })?;
    let one_port = PortRange {
        first: PORT,
        last: PORT,
    };

    loaded.apply(&[binding(
        nth_address(0),
        PortRange {
            first: 1,
            last: 65535,
        },
    )])?;
    let entries_all_ports = loaded.binding_entries()?;
    loaded.apply(&[binding(nth_address(0), one_port)])?;
    let entries_one_port = loaded.binding_entries()?;

    let mut figures = Vec::new();
    for &n in sizes {
        let bindings: Vec<Binding> = (0..n.max(1))
            .map(|i| binding(nth_address(i), one_port))
            .collect();
        loaded.apply(&bindings)?;
        let hit = nth_address(n.max(1) / 2);
        let ctx = SkLookupCtx {
            family: AF_INET,
            protocol: u32::from(IPPROTO_TCP),
            remote_ip4: u32::from_ne_bytes([192, 0, 2, 1]),
            remote_port: 40000u16.to_be(),
            local_ip4: u32::from_ne_bytes(hit.octets()),
            local_port: u32::from(PORT),
            ..Default::default()
        };
        let lookup_fd = loaded.program_fd(LOOKUP_PROGRAM)?;
        let empty_fd = loaded.program_fd(EMPTY_PROGRAM)?;
        let run = |fd: &std::os::fd::OwnedFd, name| {
            sys::test_run_sk_lookup(fd.as_fd(), &ctx, repeat)
                .map_err(|source| DispatchError::TestRun { name, source })
        };
        let (mut hits, mut empties) = (Vec::new(), Vec::new());
        for _ in 0..rounds.max(1) {
            empties.push(run(&empty_fd, EMPTY_PROGRAM)?.ns_per_run);
            let r = run(&lookup_fd, LOOKUP_PROGRAM)?;
            if r.retval != SK_PASS || r.cookie != cookie {
                return Err(DispatchError::TestRun {
                    name: LOOKUP_PROGRAM,
                    source: std::io::Error::other(format!(
                        "no hit for {hit}:{PORT} at {n} bindings (retval {}, cookie {} want {cookie})",
                        r.retval, r.cookie
                    )),
                });
            }
            hits.push(r.ns_per_run);
        }
        let (hit_ns, empty_ns) = (median(hits), median(empties));
        figures.push(BenchFigure {
            bindings: n,
            binding_entries: loaded.live_entries.len(),
            hit_ns,
            empty_ns,
            ratio: f64::from(hit_ns) / f64::from(empty_ns.max(1)),
        });
    }
    loaded.apply(&[])?;
    Ok(BenchReport {
        repeat,
        rounds,
        figures,
        entries_all_ports,
        entries_one_port,
    })
}
