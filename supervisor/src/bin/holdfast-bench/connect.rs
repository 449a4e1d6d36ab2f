//! Connection rate on loopback: connect + accept + close per second, through
//! the sk_lookup dispatcher holding many bindings, ÷ the same against a
//! plainly bound listener in a namespace with no program attached.
//!
//! Two fresh namespaces, both with 10.0.0.0/8 local. In the steered one the
//! dispatcher has `bindings` /32s (10.0.0.1, 10.0.0.2, …) on port 8080, all to
//! one listener bound to 127.0.0.1 on a kernel-chosen port; in the plain one a
//! listener is bound to 0.0.0.0:8080. One thread alternates between them, round
//! by round (the order flips every round), each round a loop of: a client
//! socket with SO_LINGER 0 (its close sends a RST, so no TIME_WAIT eats the
//! ephemeral ports) connects to a random one of those addresses, the listener
//! accepts, both close. Rounds are short and come in adjacent pairs, so load
//! from other work on the machine hits both sides of a pair alike: the ratio
//! is the median of the pairs' ratios. Rates are given per wall-clock second
//! and per CPU second of the benchmark thread (loopback traffic is processed
//! on the sending thread, so the second excludes time the thread spent
//! descheduled by other work).

use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};
use holdfast::dispatch::{Binding, Dispatcher};
use holdfast::unit::{IpPrefix, PortRange, Protocol};
use nix::sys::socket::{
    connect, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn,
};

use crate::netns::{Netns, THREAD_NETNS};
use crate::{median, Attached, Rng};

const PORT: u16 = 8080;

/// The measured rates (medians) and ratios (medians of the pairs' ratios).
pub struct ConnectRate {
    pub bindings: usize,
    pub pairs: usize,
    /// Connections per second through the dispatcher, and to the plain listener.
    pub steered: f64,
    pub plain: f64,
    pub ratio: f64,
    /// The same per CPU second of the benchmark thread.
    pub steered_cpu: f64,
    pub plain_cpu: f64,
    pub ratio_cpu: f64,
}

/// One round: connections, wall seconds, thread CPU seconds.
#[derive(Clone, Copy)]
struct Round {
    n: u64,
    wall: f64,
    cpu: f64,
}

/// The `i`-th (from 0) of the /32s the steered namespace binds: 10.0.0.1, ….
fn nth_address(i: usize) -> Ipv4Addr {
    Ipv4Addr::from((10u32 << 24) + 1 + i as u32)
}

/// Measures `rounds` pairs of rounds of `round` each; `bindings` ≤ 2^24 - 2.
pub fn connect_rate(bindings: usize, rounds: u32, round: Duration) -> Result<ConnectRate> {
    let bindings = bindings.clamp(1, (1 << 24) - 2);
    let steered_ns = Netns::create(&["10.0.0.0/8"])?;
    let instance = format!("bench-{}-connect", std::process::id());
    // Both generations coexist while a set is applied.
    let capacity = u32::try_from(2 * bindings + 1024).context("too many bindings")?;
    let mut dispatcher = Attached(Some(
        Dispatcher::attach_with_capacity(&instance, THREAD_NETNS.as_ref(), capacity)
            .context("attach the dispatcher (needs CAP_BPF)")?,
    ));
    let steered = TcpListener::bind("127.0.0.1:0").context("bind the steered listener")?;
    let d = dispatcher.get();
    d.insert_socket(0, steered.as_fd())?;
    let set: Vec<Binding> = (0..bindings)
        .map(|i| Binding {
            service: "bench".into(),
            socket: "bench".into(),
            protocol: Protocol::Tcp,
            prefix: IpPrefix {
                addr: nth_address(i).into(),
                len: 32,
            },
            ports: PortRange {
                first: PORT,
                last: PORT,
            },
            destination: 0,
        })
        .collect();
    d.apply(&set)?;
    drop(set);

    let plain_ns = Netns::create(&["10.0.0.0/8"])?;
    let plain = TcpListener::bind(("0.0.0.0", PORT)).context("bind the plain listener")?;

    let mut rng = Rng::new();
    let mut pairs: Vec<(Round, Round)> = Vec::new();
    let mut steered_total = 0u64;
    for r in 0..rounds.max(1) {
        let mut pair = [None, None];
        for steered_first in [r % 2 == 0, r % 2 != 0] {
            if steered_first {
                steered_ns.enter()?;
                let got = run_round(&steered, bindings, round, &mut rng)?;
                steered_total += got.n;
                pair[0] = Some(got);
            } else {
                plain_ns.enter()?;
                pair[1] = Some(run_round(&plain, bindings, round, &mut rng)?);
            }
        }
        if let [Some(s), Some(p)] = pair {
            pairs.push((s, p));
        }
    }
    let counters = dispatcher.get().counters()?;
    let lookups = counters.get(&0).map_or(0, |c| c.lookups);
    ensure!(
        lookups >= steered_total,
        "the dispatcher counted {lookups} lookups for {steered_total} steered connections: they did not all go through it"
    );
    dispatcher.detach()?;
    let wall = |r: &Round| r.n as f64 / r.wall;
    let cpu = |r: &Round| r.n as f64 / r.cpu.max(1e-9);
    Ok(ConnectRate {
        bindings,
        pairs: pairs.len(),
        steered: median(pairs.iter().map(|(s, _)| wall(s)).collect()),
        plain: median(pairs.iter().map(|(_, p)| wall(p)).collect()),
        ratio: median(pairs.iter().map(|(s, p)| wall(s) / wall(p)).collect()),
        steered_cpu: median(pairs.iter().map(|(s, _)| cpu(s)).collect()),
        plain_cpu: median(pairs.iter().map(|(_, p)| cpu(p)).collect()),
        ratio_cpu: median(pairs.iter().map(|(s, p)| cpu(s) / cpu(p)).collect()),
    })
}

/// CPU time of the calling thread, in seconds.
fn thread_cpu() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// Connects, accepts and closes for `round`.
fn run_round(
    listener: &TcpListener,
    bindings: usize,
    round: Duration,
    rng: &mut Rng,
) -> Result<Round> {
    let (start, cpu) = (Instant::now(), thread_cpu());
    let mut n = 0u64;
    while start.elapsed() < round {
        // A batch between clock reads.
        for _ in 0..32 {
            let to = nth_address(rng.below(bindings as u64) as usize);
            one_connection(listener, SocketAddrV4::new(to, PORT))
                .with_context(|| format!("connection to {to}:{PORT}"))?;
            n += 1;
        }
    }
    Ok(Round {
        n,
        wall: start.elapsed().as_secs_f64(),
        cpu: thread_cpu() - cpu,
    })
}

fn one_connection(listener: &TcpListener, to: SocketAddrV4) -> Result<()> {
    let client = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    setsockopt(
        &client,
        sockopt::Linger,
        &libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    )?;
    // On loopback the handshake completes inside connect().
    connect(client.as_raw_fd(), &SockaddrIn::from(to))?;
    let (conn, _) = listener.accept()?;
    drop(client);
    drop(conn);
    Ok(())
}
