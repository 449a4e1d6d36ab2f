//! Connection rate on loopback: connect + accept + close per second, through
//! the sk_lookup dispatcher holding many bindings, ÷ the same against a
//! plainly bound listener in a namespace with no program attached.
//!
//! Three fresh namespaces, each with 10.0.0.0/8 local. In the steered one the
//! dispatcher has `bindings` /32s (10.0.0.1, 10.0.0.2, …) on port 8080, all to
//! one listener bound to 127.0.0.1 on a kernel-chosen port; in the floor one
//! the bench's steer-only program (port check, sockmap slot 0, bpf_sk_assign:
//! what any sk_lookup dispatch costs) steers port 8080 to such a listener; in
//! the plain one a listener is bound to 0.0.0.0:8080. One thread goes round
//! them, round by round (the order turns every round), each round a loop of: a client
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
use crate::report::{count, median, Rng, Row};
use crate::Attached;

/// The port of every binding, and of the plain socket.
pub(crate) const PORT: u16 = 8080;

/// The measured rates (medians) and ratios (medians of the pairs' ratios).
pub(crate) struct Rates {
    pub pairs: usize,
    /// The steer-only floor ÷ plain, per wall-clock and per CPU second.
    pub floor_ratio: f64,
    pub floor_ratio_cpu: f64,
    /// Operations per second through the dispatcher, and on the plain socket.
    pub steered: f64,
    pub plain: f64,
    pub ratio: f64,
    /// The same per CPU second of the benchmark thread.
    pub steered_cpu: f64,
    pub plain_cpu: f64,
    pub ratio_cpu: f64,
}

/// One round: operations, wall seconds, thread CPU seconds.
#[derive(Clone, Copy, Default)]
struct Round {
    n: u64,
    wall: f64,
    cpu: f64,
}

/// The `i`-th (from 0) of the /32s the steered namespace binds: 10.0.0.1, ….
pub(crate) fn nth_address(i: usize) -> Ipv4Addr {
    Ipv4Addr::from((10u32 << 24) + 1 + i as u32)
}

/// The step: `duration` for both sides together, in pairs of ~100 ms rounds.
pub fn run(bindings: usize, duration: Duration) -> Result<Vec<Row>> {
    let (pairs, round) = pairs_of(duration);
    let r = crate::netns::on_own_thread("connect", move || {
        compare(
            Protocol::Tcp,
            bindings,
            pairs,
            round,
            || Ok(TcpListener::bind("127.0.0.1:0")?),
            || Ok(TcpListener::bind(("0.0.0.0", PORT))?),
            |l, to| {
                one_connection(l, to).with_context(|| format!("connection to {to}"))?;
                Ok(1)
            },
        )
    })?;
    eprintln!(
        "holdfast-bench: connect: {} pairs of {round:?} rounds",
        r.pairs
    );
    let what = format!(
        "TCP connect+accept+close, hits over {} bindings",
        count(bindings)
    );
    Ok(r.rows(&what, " (target ≥ 0.98)", "conn"))
}

/// Pairs of rounds of about 100 ms each that fill `duration`.
pub(crate) fn pairs_of(duration: Duration) -> (u32, Duration) {
    let secs = duration.as_secs_f64();
    let pairs = ((secs / 0.2).round() as u32).max(5);
    (pairs, Duration::from_secs_f64(secs / f64::from(2 * pairs)))
}

impl Rates {
    /// The wall-clock and CPU-second rows of `what` (`target` after the
    /// ratio's name), `unit` per second; then the floor's.
    pub(crate) fn rows(&self, what: &str, target: &str, unit: &str) -> Vec<Row> {
        let name = format!("{what} ÷ plain{target}");
        let floor = format!("{what}, steer-only floor (no lookup) ÷ plain");
        vec![
            Row::new(floor.clone(), self.floor_ratio, None, "ratio"),
            Row::new(
                format!("{floor}, per CPU second"),
                self.floor_ratio_cpu,
                None,
                "ratio",
            ),
            Row::new(
                name.clone(),
                self.steered,
                Some(self.plain),
                &format!("{unit}/s"),
            )
            .with_ratio(self.ratio),
            Row::new(
                format!("{name}, per CPU second"),
                self.steered_cpu,
                Some(self.plain_cpu),
                &format!("{unit}/cpu-s"),
            )
            .with_ratio(self.ratio_cpu),
        ]
    }
}

/// Three fresh namespaces with 10.0.0.0/8 local: in one, the dispatcher steers
/// `bindings` /32s on [`PORT`] to the socket `make_steered` makes; in another, the
/// steer-only program steers the port to another such socket; in the third,
/// `plain` makes a socket bound to the port. Then `pairs` triples of rounds of
/// `round` (the order turns every triple), each a loop of `op` on the socket
/// and a random one of the addresses, counting what `op` returns. Fails unless
/// the dispatcher counted a lookup for every steered operation.
pub(crate) fn compare<S: AsFd>(
    protocol: Protocol,
    bindings: usize,
    pairs: u32,
    round: Duration,
    make_steered: impl Fn() -> Result<S>,
    plain: impl FnOnce() -> Result<S>,
    mut op: impl FnMut(&S, SocketAddrV4) -> Result<u64>,
) -> Result<Rates> {
    let bindings = bindings.clamp(1, (1 << 24) - 2);
    let steered_ns = Netns::create(&["10.0.0.0/8"])?;
    let instance = format!("bench-{}-{protocol:?}", std::process::id()).to_lowercase();
    // Both generations coexist while a set is applied.
    let capacity = u32::try_from(2 * bindings + 1024).context("too many bindings")?;
    let mut dispatcher = Attached(Some(
        Dispatcher::attach_with_capacity(&instance, THREAD_NETNS.as_ref(), capacity)
            .context("attach the dispatcher (needs CAP_BPF)")?,
    ));
    let steered = make_steered().context("create the steered socket")?;
    let d = dispatcher.get();
    d.insert_socket(0, steered.as_fd())?;
    let set: Vec<Binding> = (0..bindings)
        .map(|i| Binding {
            service: "bench".into(),
            socket: "bench".into(),
            protocol,
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

    let floor_ns = Netns::create(&["10.0.0.0/8"])?;
    let floor = make_steered().context("create the floor's socket")?;
    let _steer_only = crate::lookup::attach_steer_only(floor.as_fd())?;

    let plain_ns = Netns::create(&["10.0.0.0/8"])?;
    let plain = plain().context("create the plain socket")?;

    let mut rng = Rng::new();
    let mut rounds: Vec<[Round; 3]> = Vec::new();
    let mut steered_total = 0u64;
    let mut one_round = |socket: &S, rng: &mut Rng| -> Result<Round> {
        let (start, cpu) = (Instant::now(), thread_cpu());
        let mut n = 0u64;
        while start.elapsed() < round {
            // A batch between clock reads.
            for _ in 0..32 {
                let to = nth_address(rng.below(bindings as u64) as usize);
                n += op(socket, SocketAddrV4::new(to, PORT))?;
            }
        }
        Ok(Round {
            n,
            wall: start.elapsed().as_secs_f64(),
            cpu: thread_cpu() - cpu,
        })
    };
    // The sides of a round, in this order in `rounds`.
    const STEERED: usize = 0;
    const FLOOR: usize = 1;
    const PLAIN: usize = 2;
    let sides = [
        (&steered_ns, &steered),
        (&floor_ns, &floor),
        (&plain_ns, &plain),
    ];
    for r in 0..pairs.max(1) as usize {
        let mut got = [Round::default(); 3];
        for k in 0..3 {
            let side = (k + r) % 3;
            let (ns, socket) = sides[side];
            ns.enter()?;
            got[side] = one_round(socket, &mut rng)?;
        }
        steered_total += got[STEERED].n;
        rounds.push(got);
    }
    let counters = dispatcher.get().counters()?;
    let lookups = counters.get(&0).map_or(0, |c| c.lookups);
    ensure!(
        lookups >= steered_total,
        "the dispatcher counted {lookups} lookups for {steered_total} steered operations: they did not all go through it"
    );
    dispatcher.detach()?;
    let wall = |r: &Round| r.n as f64 / r.wall;
    let cpu = |r: &Round| r.n as f64 / r.cpu.max(1e-9);
    let median_of = |f: &dyn Fn(&[Round; 3]) -> f64| median(rounds.iter().map(f).collect());
    Ok(Rates {
        pairs: rounds.len(),
        floor_ratio: median_of(&|r| wall(&r[FLOOR]) / wall(&r[PLAIN])),
        floor_ratio_cpu: median_of(&|r| cpu(&r[FLOOR]) / cpu(&r[PLAIN])),
        steered: median_of(&|r| wall(&r[STEERED])),
        plain: median_of(&|r| wall(&r[PLAIN])),
        ratio: median_of(&|r| wall(&r[STEERED]) / wall(&r[PLAIN])),
        steered_cpu: median_of(&|r| cpu(&r[STEERED])),
        plain_cpu: median_of(&|r| cpu(&r[PLAIN])),
        ratio_cpu: median_of(&|r| cpu(&r[STEERED]) / cpu(&r[PLAIN])),
    })
}

/// CPU time of the calling thread, in seconds.
fn thread_cpu() -> f64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map(|t| t.tv_sec() as f64 + t.tv_nsec() as f64 * 1e-9)
        .unwrap_or(0.0)
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
