//! Set-up cost: 16 addresses × 1,000 ports served by one steered socket
//! (attach the dispatcher, create the socket, put it in the sockmap, apply 16
//! bindings) vs. one socket bound per address and port (16,000 listeners, as
//! holdfast's bind mode makes them: `listener::create`). Time, and kernel
//! memory: the in-use bytes of every slab cache (`/proc/slabinfo`, active
//! objects × object size) plus `VmallocUsed` and `Percpu` from
//! `/proc/meminfo` (BPF maps and the JIT image live there), read before and
//! after with everything still open. Also the steered set-up of a /24 on all
//! 65,535 ports, against the bound figures extrapolated per socket to a /24
//! (256 × 65,535 sockets), which cannot be made here (fd limit).
//!
//! Other work on the machine moves these counters too: each figure is the
//! median of a few rounds, in a fresh namespace.

use std::fs;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use holdfast::dispatch::{Binding, Dispatcher};
use holdfast::listener::{self, Placement};
use holdfast::unit::{IpPrefix, PortRange, Protocol, SocketConfig, SocketOptions};

use crate::netns::{Netns, THREAD_NETNS};
use crate::report::{median, Row};
use crate::Attached;

const ADDRESSES: usize = 16;
const PORTS: usize = 1000;
const FIRST_PORT: u16 = 20000;
/// Sockets a /24 on every port would need in bind mode.
const SLASH24_SOCKETS: f64 = 256.0 * 65535.0;

/// Medians over the rounds.
struct SetupCost {
    pub bound_secs: f64,
    pub bound_bytes: f64,
    pub steered_secs: f64,
    pub steered_bytes: f64,
    /// One steered socket with a /24 on ports 1-65535.
    pub wide_secs: f64,
    pub wide_bytes: f64,
}

impl SetupCost {
    fn sockets(&self) -> f64 {
        (ADDRESSES * PORTS) as f64
    }
}

fn address(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 1, 1 + i as u8)
}

fn tcp_config(addresses: Vec<IpPrefix>, ports: Vec<PortRange>) -> SocketConfig {
    SocketConfig {
        name: "bench".into(),
        protocol: Protocol::Tcp,
        addresses,
        ports,
        path: None,
        options: SocketOptions::default(),
    }
}

/// Kernel memory in use now, in bytes (see the module docs).
fn kernel_bytes() -> Result<f64> {
    let slabinfo = fs::read_to_string("/proc/slabinfo").context("read /proc/slabinfo (root)")?;
    let mut total = 0f64;
    // "name <active_objs> <num_objs> <objsize> …", after two header lines.
    for line in slabinfo.lines().skip(2) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if let (Some(active), Some(size)) = (f.get(1), f.get(3)) {
            total += active.parse::<f64>().unwrap_or(0.0) * size.parse::<f64>().unwrap_or(0.0);
        }
    }
    let meminfo = fs::read_to_string("/proc/meminfo").context("read /proc/meminfo")?;
    for key in ["VmallocUsed:", "Percpu:"] {
        let kb = meminfo
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
            .with_context(|| format!("no {key} in /proc/meminfo"))?;
        total += kb * 1024.0;
    }
    Ok(total)
}

/// Raises the soft fd limit to the hard one; fails if that cannot hold `need`.
fn enough_fds(need: u64) -> Result<()> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if hard < need {
        bail!("the fd limit is {hard}; this benchmark needs {need}");
    }
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    Ok(())
}

/// (seconds, bytes) to bind one listener per address and port.
fn bound_round() -> Result<(f64, f64)> {
    let cfg = tcp_config(Vec::new(), Vec::new());
    let before = kernel_bytes()?;
    let start = Instant::now();
    let mut fds: Vec<OwnedFd> = Vec::with_capacity(ADDRESSES * PORTS);
    for a in 0..ADDRESSES {
        for p in 0..PORTS {
            let to = SocketAddr::new(IpAddr::V4(address(a)), FIRST_PORT + p as u16);
            fds.push(listener::create(&cfg, &Placement::Bound(to)).context("bind mode listener")?);
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let bytes = kernel_bytes()? - before;
    drop(fds);
    Ok((secs, bytes))
}

/// (seconds, bytes) to attach a dispatcher and serve `set` from one socket.
fn steered_round(instance: &str, addresses: Vec<IpPrefix>, ports: PortRange) -> Result<(f64, f64)> {
    let cfg = tcp_config(addresses.clone(), vec![ports]);
    let before = kernel_bytes()?;
    let start = Instant::now();
    let mut d = Attached(Some(
        Dispatcher::attach(instance, THREAD_NETNS.as_ref()).context("attach the dispatcher")?,
    ));
    let fd = listener::create(
        &cfg,
        &Placement::Steered {
            ipv6: false,
            dual_stack: false,
            at: None,
        },
    )?;
    d.get().insert_socket(0, fd.as_fd())?;
    let set: Vec<Binding> = addresses
        .into_iter()
        .map(|prefix| Binding {
            service: "bench".into(),
            socket: "bench".into(),
            protocol: Protocol::Tcp,
            prefix,
            ports,
            destination: 0,
        })
        .collect();
    d.get().apply(&set)?;
    let secs = start.elapsed().as_secs_f64();
    let bytes = kernel_bytes()? - before;
    d.detach()?;
    drop(fd);
    Ok((secs, bytes))
}

/// The step's rows.
pub fn run(rounds: u32) -> Result<Vec<Row>> {
    let c = crate::netns::on_own_thread("setup", move || setup_cost(rounds))?;
    let sockets = c.sockets();
    let what = format!("{ADDRESSES} addr × {PORTS} ports, 1 steered ÷ {sockets} bound sockets");
    let per_socket = c.bound_bytes / sockets;
    let per_socket_secs = c.bound_secs / sockets;
    Ok(vec![
        Row::new(
            format!("set-up time, {what}"),
            c.steered_secs * 1e3,
            Some(c.bound_secs * 1e3),
            "ms",
        ),
        Row::new(
            format!("set-up kernel memory, {what}"),
            c.steered_bytes / 1024.0,
            Some(c.bound_bytes / 1024.0),
            "KiB",
        ),
        Row::new("kernel memory per bound socket", per_socket, None, "bytes"),
        Row::new(
            "set-up time, /24 × 65535 ports: 1 steered ÷ bound (extrapolated)",
            c.wide_secs * 1e3,
            Some(per_socket_secs * SLASH24_SOCKETS * 1e3),
            "ms",
        ),
        Row::new(
            "set-up kernel memory, /24 × 65535 ports: 1 steered ÷ bound (extrapolated)",
            c.wide_bytes / 1024.0,
            Some(per_socket * SLASH24_SOCKETS / 1024.0),
            "KiB",
        ),
    ])
}

/// Runs `rounds` rounds of the three set-ups, in a fresh namespace.
fn setup_cost(rounds: u32) -> Result<SetupCost> {
    enough_fds((ADDRESSES * PORTS) as u64 + 1000)?;
    let _ns = Netns::create(&[])?;
    let instance = format!("bench-{}-setup", std::process::id());
    let sixteen: Vec<IpPrefix> = (0..ADDRESSES)
        .map(|a| IpPrefix {
            addr: address(a).into(),
            len: 32,
        })
        .collect();
    let ports = PortRange {
        first: FIRST_PORT,
        last: FIRST_PORT + (PORTS - 1) as u16,
    };
    let slash24 = vec![IpPrefix {
        addr: Ipv4Addr::new(10, 0, 0, 0).into(),
        len: 24,
    }];
    let all_ports = PortRange {
        first: 1,
        last: 65535,
    };
    let (mut b, mut s, mut w) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds.max(1) {
        b.push(bound_round()?);
        settle();
        s.push(steered_round(&instance, sixteen.clone(), ports)?);
        settle();
        w.push(steered_round(&instance, slash24.clone(), all_ports)?);
        settle();
    }
    let pick = |v: &[(f64, f64)], bytes: bool| {
        median(v.iter().map(|x| if bytes { x.1 } else { x.0 }).collect())
    };
    Ok(SetupCost {
        bound_secs: pick(&b, false),
        bound_bytes: pick(&b, true),
        steered_secs: pick(&s, false),
        steered_bytes: pick(&s, true),
        wide_secs: pick(&w, false),
        wide_bytes: pick(&w, true),
    })
}

/// Closed sockets and detached maps are freed after an RCU grace period or
/// from a workqueue: give the kernel a moment before the next reading.
fn settle() {
    std::thread::sleep(Duration::from_millis(300));
}
