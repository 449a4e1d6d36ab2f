//! inetd mode (issue 6), end to end: `accept = true` (an instance per connection, the
//! connection as stdin, stdout and fd 3, REMOTE_*/LOCAL_* in the environment), its limits
//! (`max-connections`, `max-connections-per-source`, `max-connection-rate` with
//! `rate-limit-pause`, `allow`/`deny`) in bind mode and with the sk_lookup dispatcher,
//! `on-demand = true` (inetd's `wait = yes`) for UDP and TCP with the echo example, and a
//! real inetd program from Debian (micro-httpd) served unchanged.
//!
//! Clients bind to chosen source addresses (198.51.100.0/24 and 127.0.0.0/8, made local in
//! the test's namespace) so that per-source limits and allow/deny see distinct sources.

use std::collections::BTreeSet;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use holdfast_testkit::{
    ask_udp, dispatcher_instance, holdfast_bin, holdfast_check_unit, netns_and_sandbox,
    netns_and_sandbox_with_tools, netns_or_skip, netns_with_local_routes, require, run_bounded,
    run_ok, skip_unless, toml_array, toml_str, wait_for, Holdfast, Netns, RunOptions, Sandbox,
    PYTHON,
};
use nix::sys::signal::{kill, Signal};
use nix::sys::socket::{
    bind, connect, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn,
};
use nix::sys::time::TimeVal;
use nix::unistd::Pid;
use serde_json::Value;

const T: Duration = Duration::from_secs(10);
/// The destination prefix the dispatcher tests steer (made local in the namespace).
const DEST_PREFIX: &str = "192.0.2.0/24";
/// Client source addresses (made local in the namespace).
const SOURCE_PREFIX: &str = "198.51.100.0/24";

fn v4(s: &str) -> IpAddr {
    s.parse().expect("a literal address")
}

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("a literal socket address")
}

// ---------------------------------------------------------------------------------------
// Clients.

/// What one client connection got.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// A full line came back (without its newline).
    Served(String),
    /// Connected, then closed (EOF or reset) before a full line came back; the bytes that
    /// did come, if any.
    Closed(String),
    /// `connect()` was refused.
    Refused,
    /// Nothing within the timeout (connect or read): `what`.
    TimedOut(String),
    /// Any other error.
    Failed(String),
}

/// A TCP connection to `dst`, from `src` (port chosen by the kernel) when given,
/// bounded by `timeout` (connect via SO_SNDTIMEO, reads via SO_RCVTIMEO).
fn connect_from(src: Option<IpAddr>, dst: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let (IpAddr::V4(dst_ip), Some(src_ip)) = (dst.ip(), src) else {
        let s = TcpStream::connect_timeout(&dst, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        return Ok(s);
    };
    let IpAddr::V4(src_ip) = src_ip else {
        return Err(io::Error::other("IPv4 sources only"));
    };
    let fd: OwnedFd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let tv = TimeVal::new(timeout.as_secs() as i64, i64::from(timeout.subsec_micros()));
    setsockopt(&fd, sockopt::SendTimeout, &tv)?;
    setsockopt(&fd, sockopt::ReceiveTimeout, &tv)?;
    bind(
        fd.as_raw_fd(),
        &SockaddrIn::from(std::net::SocketAddrV4::new(src_ip, 0)),
    )?;
    match connect(
        fd.as_raw_fd(),
        &SockaddrIn::from(std::net::SocketAddrV4::new(dst_ip, dst.port())),
    ) {
        Ok(()) => {}
        // A blocking connect with SO_SNDTIMEO reports its timeout as EINPROGRESS.
        Err(nix::errno::Errno::EINPROGRESS) => {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect {dst} from {src_ip}: no answer within {timeout:?}"),
            ))
        }
        Err(e) => return Err(e.into()),
    }
    Ok(TcpStream::from(fd))
}

/// Sends `line` + "\n" and reads until a newline or EOF (the stream's read timeout bounds it).
fn exchange(s: &mut TcpStream, line: &str) -> Outcome {
    if let Err(e) = s.write_all(format!("{line}\n").as_bytes()) {
        return match e.kind() {
            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => {
                Outcome::Closed(String::new())
            }
            _ => Outcome::Failed(format!("write: {e}")),
        };
    }
    read_line(s)
}

/// Reads until a newline or EOF.
fn read_line(s: &mut TcpStream) -> Outcome {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Outcome::Closed(String::from_utf8_lossy(&got).into_owned()),
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                if let Some(end) = got.iter().position(|&b| b == b'\n') {
                    return Outcome::Served(String::from_utf8_lossy(&got[..end]).into_owned());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                return Outcome::Closed(String::from_utf8_lossy(&got).into_owned())
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Outcome::TimedOut(format!("read: {e}"))
            }
            Err(e) => return Outcome::Failed(format!("read: {e}")),
        }
    }
}

/// One connection from `src` to `dst` that sends `line` and reads the answer line.
/// Runs in the calling thread's namespace.
fn try_line(src: Option<IpAddr>, dst: SocketAddr, line: &str, timeout: Duration) -> Outcome {
    match connect_from(src, dst, timeout) {
        Ok(mut s) => exchange(&mut s, line),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Outcome::Refused,
        Err(e) if e.kind() == io::ErrorKind::TimedOut => Outcome::TimedOut(e.to_string()),
        Err(e) => Outcome::Failed(format!("connect {dst}: {e}")),
    }
}

/// A connection kept open: connected from `src`, `line` echoed back. Fails otherwise.
fn open_echo(src: IpAddr, dst: SocketAddr, line: &str) -> Result<TcpStream> {
    let mut s =
        connect_from(Some(src), dst, T).with_context(|| format!("connect {dst} from {src}"))?;
    match exchange(&mut s, line) {
        Outcome::Served(got) if got == line => Ok(s),
        other => bail!("{src} -> {dst}: sent {line:?}, got {other:?}"),
    }
}

/// Asserts that the connection was turned away by holdfast: not served.
fn assert_turned_away(outcome: &Outcome, what: &str) {
    assert!(
        matches!(outcome, Outcome::Closed(got) if got.is_empty()),
        "{what}: want the connection closed without an answer, got {outcome:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Set-up.

/// A fresh namespace with [`DEST_PREFIX`] and [`SOURCE_PREFIX`] local.
fn netns_with_routes() -> Result<Option<Netns>> {
    netns_with_local_routes(&[DEST_PREFIX, SOURCE_PREFIX])
}

/// `holdfast run` with the dispatcher under a dispatcher name no other test uses;
/// `None`: skip (no BPF, outside CI).
fn start_dispatched(ns: &Netns, sandbox: Sandbox, tag: &str) -> Result<Option<Holdfast>> {
    let opts = RunOptions {
        args: vec![
            "--instance".into(),
            dispatcher_instance(&format!("inetd-{tag}")),
        ],
        ..RunOptions::default()
    };
    Holdfast::start_dispatched(ns, sandbox, &opts)
}

/// An accept unit: `[service]` with `exec` (and `service_extra`), one tcp socket on
/// `addresses` × `ports` with `accept = true` and `socket_extra`.
fn accept_unit(
    exec: &[&str],
    service_extra: &str,
    addresses: &[&str],
    ports: &[&str],
    socket_extra: &str,
) -> String {
    format!(
        "[service]\nexec = {}\n{service_extra}\n\n[[socket]]\nprotocol = \"tcp\"\naddresses = {}\nports = {}\naccept = true\n{socket_extra}\n",
        toml_array(exec),
        toml_array(addresses),
        toml_array(ports),
    )
}

/// A sandbox with one unit, "cat": `/bin/cat` per connection on `addresses` × `ports`,
/// with `socket_extra` in its socket.
fn cat_sandbox(addresses: &[&str], ports: &[&str], socket_extra: &str) -> Result<Sandbox> {
    let sandbox = Sandbox::new()?;
    sandbox.write_unit(
        "cat",
        &accept_unit(&["/bin/cat"], "", addresses, ports, socket_extra),
    )?;
    Ok(sandbox)
}

/// [`cat_sandbox`] served by a daemon in bind mode in `ns`.
fn start_cat(
    ns: &Netns,
    addresses: &[&str],
    ports: &[&str],
    socket_extra: &str,
) -> Result<Holdfast> {
    Holdfast::start_in(ns, cat_sandbox(addresses, ports, socket_extra)?)
}

/// Runs `client(k)` for k in 0..n, each on its own thread inside `ns`, all let go at once.
fn burst<T: Send>(ns: &Netns, n: usize, client: impl Fn(usize) -> T + Sync) -> Result<Vec<T>> {
    let barrier = Barrier::new(n);
    std::thread::scope(|scope| {
        let threads: Vec<_> = (0..n)
            .map(|k| {
                let (barrier, client) = (&barrier, &client);
                scope.spawn(move || -> Result<T> {
                    let _inside = ns.enter()?;
                    barrier.wait();
                    Ok(client(k))
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("client thread"))
            .collect()
    })
}

/// A status field of `svc` as an integer (panics naming it when missing).
fn int(svc: &Value, key: &str) -> u64 {
    svc[key]
        .as_u64()
        .unwrap_or_else(|| panic!("status has no integer {key:?}: {svc}"))
}

/// Waits until `name` has no per-connection instance left; returns its status.
fn wait_idle(hf: &Holdfast, name: &str) -> Result<Value> {
    hf.wait_service(name, T, |s| s["instances"] == 0)
}

/// The value of the sample `family{service="name"}` in `holdfast metrics`.
fn metric(hf: &Holdfast, family: &str, name: &str) -> Result<f64> {
    let text = hf.cli_ok(&["metrics"])?;
    let want = format!("{family}{{service=\"{name}\"}}");
    text.lines()
        .find_map(|l| l.strip_prefix(&want))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no sample {want} in holdfast metrics:\n{text}"))
}

/// The fd-3 service: reads a line from `socket.socket(fileno=3)` and answers, on fd 3, one
/// JSON line saying what it was handed.
const WHO_PY: &str = r#"
import json, os, socket, sys
conn = socket.socket(fileno=3)
line = b""
while not line.endswith(b"\n"):
    chunk = conn.recv(4096)
    if not chunk:
        break
    line += chunk
ident = lambda fd: [os.fstat(fd).st_dev, os.fstat(fd).st_ino]
names = ["LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PID",
         "REMOTE_ADDR", "REMOTE_PORT", "LOCAL_ADDR", "LOCAL_PORT"]
report = {
    "pid": os.getpid(),
    "env": {n: os.environ.get(n) for n in names},
    "stdin_is_fd3": ident(0) == ident(3),
    "stdout_is_fd3": ident(1) == ident(3),
    "fd4_open": os.path.exists("/proc/self/fd/4"),
    "peer": list(conn.getpeername()[:2]),
    "local": list(conn.getsockname()[:2]),
    "line": line.decode().strip(),
}
conn.sendall((json.dumps(report) + "\n").encode())
print(f"who served pid {os.getpid()}", file=sys.stderr, flush=True)
"#;

// ---------------------------------------------------------------------------------------
// accept = true: what an instance gets.

/// `cat` (stdin/stdout) and the fd-3 service, each `accept = true`, reached at `cat_targets`
/// and `who_targets` from `sources`; every connection its own instance with the right
/// environment.
fn check_cat_and_who(
    ns: &Netns,
    hf: &Holdfast,
    cat_targets: &[SocketAddr],
    who_targets: &[SocketAddr],
    sources: &[IpAddr],
) -> Result<()> {
    assert_eq!(hf.service("cat")?["state"], "listening");
    assert_eq!(hf.service("who")?["state"], "listening");
    assert_eq!(hf.service("who")?["pid"], Value::Null);

    for (k, dst) in cat_targets.iter().enumerate() {
        let src = sources[k % sources.len()];
        let line = format!("line {k} to {dst} from {src}");
        let got = ns.run(|| try_line(Some(src), *dst, &line, T))?;
        assert_eq!(got, Outcome::Served(line), "cat at {dst}");
    }

    let mut pids = BTreeSet::new();
    for (k, dst) in who_targets.iter().enumerate() {
        let src = sources[k % sources.len()];
        let (client_port, got) = ns.run(|| -> Result<(u16, Outcome)> {
            let mut s = connect_from(Some(src), *dst, T)?;
            let port = s.local_addr()?.port();
            Ok((port, exchange(&mut s, "who are you")))
        })??;
        let Outcome::Served(json) = got else {
            bail!("who at {dst} from {src}: {got:?}");
        };
        let r: Value = serde_json::from_str(&json).with_context(|| format!("who said {json}"))?;
        let pid = r["pid"].as_i64().context("pid")?;
        let env = &r["env"];
        let want = serde_json::json!({
            "LISTEN_FDS": "1",
            "LISTEN_FDNAMES": "connection",
            "LISTEN_PID": pid.to_string(),
            "REMOTE_ADDR": src.to_string(),
            "REMOTE_PORT": client_port.to_string(),
            "LOCAL_ADDR": dst.ip().to_string(),
            "LOCAL_PORT": dst.port().to_string(),
        });
        assert_eq!(env, &want, "environment of the instance for {src} -> {dst}");
        assert_eq!(r["stdin_is_fd3"], true, "{r}");
        assert_eq!(r["stdout_is_fd3"], true, "{r}");
        assert_eq!(r["fd4_open"], false, "only fd 3 is handed over: {r}");
        assert_eq!(r["line"], "who are you");
        assert_eq!(
            r["peer"],
            serde_json::json!([src.to_string(), client_port]),
            "fd 3 is the connection"
        );
        assert!(pids.insert(pid), "pid {pid} served two connections");
    }

    // Each instance's stderr reaches holdfast's log, named by its service.
    let log = wait_for("the instances' stderr in the log", T, || {
        let log = hf.log();
        pids.iter()
            .all(|p| {
                log.lines().any(|l| {
                    l.contains(&format!("who served pid {p}")) && l.contains("service=who")
                })
            })
            .then_some(log)
    });
    if let Err(e) = log {
        bail!("{e:#}; the log:\n{}", hf.log());
    }

    let cat = wait_idle(hf, "cat")?;
    assert_eq!(
        int(&cat, "connections_total"),
        cat_targets.len() as u64,
        "{cat}"
    );
    assert_eq!(int(&cat, "denied_total"), 0, "{cat}");
    assert_eq!(cat["state"], "listening", "{cat}");
    let who = wait_idle(hf, "who")?;
    assert_eq!(
        int(&who, "connections_total"),
        who_targets.len() as u64,
        "{who}"
    );
    assert_eq!(who["state"], "listening", "{who}");
    assert_eq!(
        metric(hf, "holdfast_service_connections_total", "who")?,
        who_targets.len() as f64
    );
    assert_eq!(metric(hf, "holdfast_service_instances", "who")?, 0.0);
    Ok(())
}

#[test]
fn accept_serves_stdin_stdout_and_fd3_services_on_a_port_range_and_prefix() -> Result<()> {
    let ns = skip_unless!(netns_with_routes()?);
    let sandbox = Sandbox::new()?;
    let who = sandbox.write_script("who.py", WHO_PY)?;
    let who = who.to_string_lossy();
    sandbox.write_unit(
        "cat",
        &accept_unit(&["/bin/cat"], "", &[DEST_PREFIX], &["7000-7009"], ""),
    )?;
    sandbox.write_unit(
        "who",
        &accept_unit(&[PYTHON, &who], "", &[DEST_PREFIX], &["7100-7109"], ""),
    )?;
    let mut hf = skip_unless!(start_dispatched(&ns, sandbox, "range")?);
    check_cat_and_who(
        &ns,
        &hf,
        &[
            sa("192.0.2.1:7000"),
            sa("192.0.2.77:7005"),
            sa("192.0.2.254:7009"),
        ],
        &[
            sa("192.0.2.9:7100"),
            sa("192.0.2.200:7109"),
            sa("192.0.2.33:7104"),
        ],
        &[v4("198.51.100.10"), v4("198.51.100.11")],
    )?;
    // Outside the range: nobody is steered there.
    let outside = ns.run(|| try_line(None, sa("192.0.2.1:7010"), "x", Duration::from_secs(2)))?;
    assert!(
        !matches!(outside, Outcome::Served(_)),
        "port 7010 is outside 7000-7009 but was served: {outside:?}"
    );
    hf.stop_leaving_nothing(&ns)
}

#[test]
fn accept_serves_stdin_stdout_and_fd3_services_in_bind_mode() -> Result<()> {
    let (ns, sandbox) = skip_unless!(netns_and_sandbox()?);
    let who = sandbox.write_script("who.py", WHO_PY)?;
    let who = who.to_string_lossy();
    sandbox.write_unit(
        "cat",
        &accept_unit(&["/bin/cat"], "", &["127.0.0.1/32"], &["7000"], ""),
    )?;
    sandbox.write_unit(
        "who",
        &accept_unit(&[PYTHON, &who], "", &["127.0.0.1/32"], &["7100"], ""),
    )?;
    let mut hf = Holdfast::start_in(&ns, sandbox)?;
    check_cat_and_who(
        &ns,
        &hf,
        &[sa("127.0.0.1:7000"), sa("127.0.0.1:7000")],
        &[sa("127.0.0.1:7100"), sa("127.0.0.1:7100")],
        &[v4("127.0.0.1"), v4("127.0.0.5")],
    )?;
    hf.stop_leaving_nothing(&ns)
}

// ---------------------------------------------------------------------------------------
// max-connections.

/// Per connection: records start and end (ns since the epoch) in OUT/conn.PID, echoes one
/// line after a pause, so that instances overlap.
const SLOW_ECHO_SH: &str = r#"#!/bin/sh
start=$(date +%s%N)
IFS= read -r line
sleep 0.2
printf '%s\n' "$line"
echo "$start $(date +%s%N)" > "$OUT/conn.$$"
"#;

/// The most intervals `[start, end]` that overlap at one time.
fn max_overlap(intervals: &[(u128, u128)]) -> usize {
    let mut edges: Vec<(u128, i32)> = intervals
        .iter()
        .flat_map(|&(s, e)| [(s, 1), (e, -1)])
        .collect();
    // At equal times, ends before starts: touching intervals do not overlap.
    edges.sort();
    let (mut now, mut most) = (0i32, 0i32);
    for (_, d) in edges {
        now += d;
        most = most.max(now);
    }
    most as usize
}

#[test]
fn overlap_counts_intervals_that_share_a_time() {
    assert_eq!(max_overlap(&[]), 0);
    assert_eq!(max_overlap(&[(0, 10), (10, 20)]), 1);
    assert_eq!(max_overlap(&[(0, 10), (5, 15), (6, 7), (20, 30)]), 3);
}

#[test]
fn max_connections_bounds_instances_and_every_connection_is_served() -> Result<()> {
    const CLIENTS: usize = 200;
    const MAX: u64 = 10;
    let (ns, sandbox) = skip_unless!(netns_and_sandbox()?);
    let script = sandbox.write_script("slow-echo.sh", SLOW_ECHO_SH)?;
    let out = sandbox.out_dir();
    sandbox.write_unit(
        "slow",
        &accept_unit(
            &["/bin/sh", &script.to_string_lossy()],
            &format!(
                "environment = {{ OUT = {} }}",
                toml_str(&out.to_string_lossy())
            ),
            &["127.0.0.1/32"],
            &["7200"],
            &format!("max-connections = {MAX}\nbacklog = 512"),
        ),
    )?;
    let mut hf = Holdfast::start_in(&ns, sandbox)?;
    let dst = sa("127.0.0.1:7200");

    let done = AtomicBool::new(false);
    let (outcomes, sampled) = std::thread::scope(|scope| -> Result<_> {
        // Sample the instance count while the clients run.
        let sampler = scope.spawn(|| {
            let mut seen = Vec::new();
            while !done.load(Ordering::Relaxed) {
                if let Ok(s) = hf.service("slow") {
                    seen.push(int(&s, "instances"));
                }
            }
            seen
        });
        let outcomes = burst(&ns, CLIENTS, |k| {
            try_line(None, dst, &format!("client {k}"), Duration::from_secs(90))
        });
        done.store(true, Ordering::Relaxed);
        Ok((outcomes?, sampler.join().expect("sampler thread")))
    })?;

    let wrong: Vec<String> = outcomes
        .iter()
        .enumerate()
        .filter(|(k, o)| **o != Outcome::Served(format!("client {k}")))
        .map(|(k, o)| format!("client {k}: {o:?}"))
        .collect();
    assert!(
        wrong.is_empty(),
        "{} of {CLIENTS} connections not served: {wrong:?}",
        wrong.len()
    );
    let most_sampled = sampled.iter().copied().max().unwrap_or(0);
    assert!(
        most_sampled <= MAX,
        "status showed {most_sampled} instances at once (max-connections = {MAX}); samples {sampled:?}"
    );
    assert_eq!(
        most_sampled,
        MAX,
        "with {CLIENTS} clients waiting the limit should be reached; {} samples: {sampled:?}",
        sampled.len()
    );

    // Every instance recorded its run; none overlapped more than MAX others.
    let intervals = wait_for("every instance's record", T, || {
        let mut v = Vec::new();
        for e in std::fs::read_dir(&out).ok()? {
            let text = std::fs::read_to_string(e.ok()?.path()).ok()?;
            let mut it = text.split_whitespace().map(|n| n.parse::<u128>());
            match (it.next(), it.next()) {
                (Some(Ok(s)), Some(Ok(e))) => v.push((s, e)),
                _ => return None, // still being written
            }
        }
        (v.len() == CLIENTS).then_some(v)
    })?;
    let overlap = max_overlap(&intervals);
    assert!(
        overlap <= MAX as usize,
        "{overlap} instances ran at once (max-connections = {MAX})"
    );
    let svc = wait_idle(&hf, "slow")?;
    assert_eq!(int(&svc, "connections_total"), CLIENTS as u64, "{svc}");
    assert_eq!(int(&svc, "denied_total"), 0, "{svc}");
    eprintln!(
        "max-connections: {} status samples, most {most_sampled}; most overlapping records {overlap}",
        sampled.len()
    );
    hf.stop_leaving_nothing(&ns)
}

// ---------------------------------------------------------------------------------------
// max-connections-per-source, max-connection-rate.

#[test]
fn per_source_limit_closes_a_sources_extra_connections_only() -> Result<()> {
    let ns = skip_unless!(netns_with_routes()?);
    let mut hf = start_cat(
        &ns,
        &["198.51.100.1/32"],
        &["7300"],
        "max-connections-per-source = 2",
    )?;
    let dst = sa("198.51.100.1:7300");
    let (a, b) = (v4("198.51.100.2"), v4("198.51.100.3"));

    ns.run(|| -> Result<()> {
        let a1 = open_echo(a, dst, "a1")?;
        let _a2 = open_echo(a, dst, "a2")?;
        // The third from a: closed by holdfast.
        assert_turned_away(
            &try_line(Some(a), dst, "a3", T),
            "a third connection from a",
        );
        // Another source still gets its two.
        let _b1 = open_echo(b, dst, "b1")?;
        let _b2 = open_echo(b, dst, "b2")?;
        let svc = hf.wait_service("cat", T, |s| s["instances"] == 4)?;
        assert_eq!(int(&svc, "denied_total"), 1, "{svc}");
        assert_eq!(int(&svc, "connections_total"), 4, "{svc}");
        // Once one of a's ends, a may connect again.
        drop(a1);
        hf.wait_service("cat", T, |s| s["instances"] == 3)?;
        let _a4 = open_echo(a, dst, "a4")?;
        assert_turned_away(
            &try_line(Some(a), dst, "a5", T),
            "a third connection from a again",
        );
        let svc = hf.service("cat")?;
        assert_eq!(int(&svc, "denied_total"), 2, "{svc}");
        assert_eq!(int(&svc, "connections_total"), 5, "{svc}");
        Ok(())
    })??;
    assert_eq!(
        metric(&hf, "holdfast_service_denied_connections_total", "cat")?,
        2.0
    );
    let log = hf.log();
    assert!(
        log.contains("max-connections-per-source"),
        "the log should say why a connection was closed:\n{log}"
    );
    hf.stop_leaving_nothing(&ns)
}

#[test]
fn rate_limit_pauses_accepting_and_the_burst_is_served_after_the_pause() -> Result<()> {
    const BURST: usize = 20;
    const RATE: usize = 5;
    let pause = Duration::from_secs(2);
    let ns = skip_unless!(netns_or_skip());
    let mut hf = start_cat(
        &ns,
        &["127.0.0.1/32"],
        &["7400"],
        &format!("max-connection-rate = {RATE}\nrate-limit-pause = \"2s\""),
    )?;
    let dst = sa("127.0.0.1:7400");

    let start = Instant::now();
    let results = burst(&ns, BURST, |k| {
        let o = try_line(None, dst, &format!("burst {k}"), Duration::from_secs(30));
        (o, start.elapsed())
    })?;
    for (k, (o, _)) in results.iter().enumerate() {
        assert_eq!(o, &Outcome::Served(format!("burst {k}")), "connection {k}");
    }
    let mut times: Vec<f64> = results.iter().map(|(_, t)| t.as_secs_f64()).collect();
    times.sort_by(f64::total_cmp);
    // At most RATE connections start in the first second; the rest wait out the pause.
    let early = times.iter().filter(|t| **t < 1.0).count();
    let late = times
        .iter()
        .filter(|t| **t >= pause.as_secs_f64() * 0.9)
        .count();
    assert!(
        (1..=RATE).contains(&early),
        "{early} of {BURST} answered in the first second, more than max-connection-rate = {RATE}; answer times {times:?}"
    );
    assert_eq!(
        early + late,
        BURST,
        "every connection is answered either at once or after the {pause:?} pause; answer times {times:?}"
    );
    eprintln!(
        "rate limit: {early} answered in the first second, {late} after the pause; times {times:?}"
    );
    let svc = wait_idle(&hf, "cat")?;
    assert_eq!(int(&svc, "connections_total"), BURST as u64, "{svc}");
    assert_eq!(int(&svc, "denied_total"), 0, "{svc}");
    let log = hf.log();
    assert!(
        log.contains("max-connection-rate") && log.contains("accepting pauses"),
        "the log should say accepting paused:\n{log}"
    );
    hf.stop_leaving_nothing(&ns)
}

/// The lowest fd number free in process `pid`.
fn lowest_free_fd(pid: i32) -> Result<u64> {
    let used: BTreeSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    Ok((0..).find(|n| !used.contains(n)).expect("a free number"))
}

/// User + system CPU time of process `pid`, in clock ticks.
fn cpu_ticks(pid: i32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(") ").context("a /proc stat line")?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    Ok(fields[11].parse::<u64>()? + fields[12].parse::<u64>()?)
}

/// `prlimit --pid PID --nofile=SOFT:` (the soft limit only).
fn set_nofile(pid: i32, soft: u64) -> Result<()> {
    let mut prlimit = Command::new("prlimit");
    prlimit.args(["--pid", &pid.to_string(), &format!("--nofile={soft}:")]);
    run_ok(prlimit, T).map(drop)
}

/// With no fd left for accept (EMFILE), the accept service stops polling its listener for a
/// while and says so a few times, instead of spinning on the readable listener and writing a
/// line per try; once fds are back, the queued connection is served.
#[test]
fn accept_out_of_fds_pauses_instead_of_spinning_and_serves_once_fds_are_back() -> Result<()> {
    let ns = skip_unless!(netns_or_skip());
    let mut hf = start_cat(&ns, &["127.0.0.1/32"], &["7405"], "")?;
    let dst = sa("127.0.0.1:7405");
    assert_eq!(
        ns.run(|| try_line(None, dst, "before", T))?,
        Outcome::Served("before".into())
    );
    wait_idle(&hf, "cat")?;
    let pid = hf.pid();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits"))?;
    let soft: u64 = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .context("Max open files in /proc/PID/limits")?
        .parse()?;
    set_nofile(pid, lowest_free_fd(pid)?)?;
    let cpu_before = cpu_ticks(pid)?;
    let mut waiting = ns.run(|| connect_from(None, dst, T))??;
    waiting.write_all(b"while out of fds\n")?;
    std::thread::sleep(Duration::from_secs(2));
    let cpu = cpu_ticks(pid)? - cpu_before;
    let log = hf.log();
    let warnings = log
        .lines()
        .filter(|l| l.contains("accept failed") && l.contains("service=cat"))
        .count();
    set_nofile(pid, soft)?;
    assert!(
        log.contains("out of file descriptors"),
        "the log names the exhaustion:\n{log}"
    );
    assert!(
        warnings <= 6,
        "accept's warning is rate-limited: {warnings} lines in 2 s"
    );
    assert!(
        cpu < 50,
        "holdfast spent {cpu} ticks of CPU in 2 s while out of fds (a spin)"
    );
    assert_eq!(
        read_line(&mut waiting),
        Outcome::Served("while out of fds".into()),
        "the queued connection is served once fds are back"
    );
    hf.stop_leaving_nothing(&ns)
}

// ---------------------------------------------------------------------------------------
// stop / start of an accept service.

#[test]
fn stop_ends_the_instances_and_connections_wait_for_start_not_refused() -> Result<()> {
    let ns = skip_unless!(netns_or_skip());
    let mut hf = start_cat(&ns, &["127.0.0.1/32"], &["7800"], "")?;
    let dst = sa("127.0.0.1:7800");
    let local = v4("127.0.0.1");
    ns.run(|| -> Result<()> {
        let mut open = open_echo(local, dst, "before stop")?;
        hf.wait_service("cat", T, |s| s["instances"] == 1)?;
        hf.cli_ok(&["stop", "cat"])?;
        // The instance was stopped: its connection ends.
        assert_eq!(read_line(&mut open), Outcome::Closed(String::new()));
        let svc = hf.wait_service("cat", T, |s| s["instances"] == 0)?;
        assert_eq!(svc["state"], "stopped", "{svc}");
        // While stopped, a connection waits in the backlog: not refused, not served.
        let mut waiting = connect_from(Some(local), dst, T).context("connect while stopped")?;
        waiting.set_read_timeout(Some(Duration::from_secs(1)))?;
        let got = exchange(&mut waiting, "while stopped");
        assert!(
            matches!(got, Outcome::TimedOut(_)),
            "a connection made while the service is stopped waits: {got:?}"
        );
        hf.cli_ok(&["start", "cat"])?;
        waiting.set_read_timeout(Some(T))?;
        assert_eq!(
            read_line(&mut waiting),
            Outcome::Served("while stopped".into()),
            "the waiting connection is served once the service is started"
        );
        assert_eq!(hf.service("cat")?["state"], "listening");
        Ok(())
    })??;
    hf.stop_leaving_nothing(&ns)
}

/// Per connection: ignores SIGTERM (inherited through exec by cat) and echoes.
const STUBBORN: &str = "trap '' TERM; exec /bin/cat";

/// "stubborn", an accept service of [`STUBBORN`] instances with a 1 s stop-timeout on
/// 127.0.0.1:`port`, in bind mode in `ns`, holding one open connection; returns the
/// daemon and that connection.
fn start_stubborn(ns: &Netns, port: u16) -> Result<(Holdfast, TcpStream)> {
    let sandbox = Sandbox::new()?;
    sandbox.write_unit(
        "stubborn",
        &accept_unit(
            &["/bin/sh", "-c", STUBBORN],
            "stop-timeout = \"1s\"",
            &["127.0.0.1/32"],
            &[&port.to_string()],
            "",
        ),
    )?;
    let hf = Holdfast::start_in(ns, sandbox)?;
    let dst = SocketAddr::from(([127, 0, 0, 1], port));
    let open = ns.run(|| open_echo(v4("127.0.0.1"), dst, "hold"))??;
    hf.wait_service("stubborn", T, |s| s["instances"] == 1)?;
    Ok((hf, open))
}

#[test]
fn stop_kills_instances_that_ignore_sigterm_after_stop_timeout() -> Result<()> {
    let ns = skip_unless!(netns_or_skip());
    let (mut hf, mut open) = start_stubborn(&ns, 7801)?;
    let asked = Instant::now();
    hf.cli_ok(&["stop", "stubborn"])?;
    open.set_read_timeout(Some(T))?;
    let got = read_line(&mut open);
    let took = asked.elapsed();
    assert_eq!(
        got,
        Outcome::Closed(String::new()),
        "the instance ignoring SIGTERM is SIGKILLed after stop-timeout (1s); after {took:?}"
    );
    assert!(took < Duration::from_secs(5), "ended after {took:?}");
    hf.wait_service("stubborn", T, |s| s["instances"] == 0)?;
    hf.stop_leaving_nothing(&ns)
}

#[test]
fn shutdown_ends_instances_that_ignore_sigterm() -> Result<()> {
    let ns = skip_unless!(netns_or_skip());
    let (mut hf, _open) = start_stubborn(&ns, 7802)?;
    // SIGTERM to holdfast: it exits 0 (within its stop timeout) with no instance left.
    hf.stop_leaving_nothing(&ns)
}

// ---------------------------------------------------------------------------------------
// allow / deny.

#[test]
fn allow_and_deny_close_what_they_refuse_in_bind_mode() -> Result<()> {
    let ns = skip_unless!(netns_or_skip());
    let mut hf = start_cat(
        &ns,
        &["127.0.0.1/32"],
        &["7500"],
        "allow = [\"127.0.0.0/29\"]\ndeny = [\"127.0.0.3/32\"]",
    )?;
    let dst = sa("127.0.0.1:7500");
    ns.run(|| {
        assert_eq!(
            try_line(Some(v4("127.0.0.2")), dst, "allowed", T),
            Outcome::Served("allowed".into())
        );
        assert_turned_away(
            &try_line(Some(v4("127.0.0.3")), dst, "denied", T),
            "127.0.0.3 (deny wins over allow)",
        );
        assert_turned_away(
            &try_line(Some(v4("127.0.0.9")), dst, "not allowed", T),
            "127.0.0.9 (outside allow)",
        );
        assert_eq!(
            try_line(Some(v4("127.0.0.7")), dst, "allowed too", T),
            Outcome::Served("allowed too".into())
        );
    })?;
    let svc = wait_idle(&hf, "cat")?;
    assert_eq!(int(&svc, "denied_total"), 2, "{svc}");
    assert_eq!(int(&svc, "connections_total"), 2, "{svc}");
    assert_eq!(
        metric(&hf, "holdfast_service_denied_connections_total", "cat")?,
        2.0
    );
    hf.stop_leaving_nothing(&ns)
}

#[test]
fn allow_and_deny_refuse_sources_with_the_dispatcher() -> Result<()> {
    let ns = skip_unless!(netns_with_routes()?);
    let sandbox = cat_sandbox(
        &[DEST_PREFIX],
        &["7600-7609"],
        "allow = [\"198.51.100.0/25\"]\ndeny = [\"198.51.100.7/32\"]",
    )?;
    let mut hf = skip_unless!(start_dispatched(&ns, sandbox, "allow")?);
    // Denied connections are dropped by the dispatcher's sk_lookup program
    // before they reach the socket: refused (or timed out), never accepted.
    let short = Duration::from_secs(3);
    ns.run(|| {
        assert_eq!(
            try_line(Some(v4("198.51.100.8")), sa("192.0.2.1:7600"), "ok", T),
            Outcome::Served("ok".into())
        );
        for (src, dst) in [
            ("198.51.100.7", "192.0.2.2:7605"),
            ("198.51.100.200", "192.0.2.3:7609"),
        ] {
            let got = try_line(Some(v4(src)), sa(dst), "no", short);
            assert!(
                matches!(got, Outcome::TimedOut(_) | Outcome::Refused),
                "{src} -> {dst} should be dropped before accept: {got:?}"
            );
        }
        assert_eq!(
            try_line(Some(v4("198.51.100.100")), sa("192.0.2.4:7603"), "ok 2", T),
            Outcome::Served("ok 2".into())
        );
    })?;
    let svc = wait_idle(&hf, "cat")?;
    // The dispatcher may count a dropped SYN and its retransmissions; at least both count.
    assert!(
        int(&svc, "denied_total") >= 2,
        "both refused sources count as denied: {svc}"
    );
    assert_eq!(int(&svc, "connections_total"), 2, "{svc}");
    // The sk_lookup program counted them, per binding.
    let rows: Value = serde_json::from_str(&hf.cli_ok(&["bindings", "--json"])?)?;
    let bpf_denied: u64 = rows
        .as_array()
        .context("bindings --json is an array")?
        .iter()
        .filter_map(|r| r["denied"].as_u64())
        .max()
        .unwrap_or(0);
    assert!(bpf_denied >= 2, "the dispatcher's denied counter: {rows}");
    assert!(
        metric(&hf, "holdfast_service_denied_connections_total", "cat")? >= 2.0,
        "denied connections in the metrics"
    );
    hf.stop_leaving_nothing(&ns)
}

/// A steered socket declared on one address and port is bound there (so that
/// getsockname() tells the truth), where the kernel's own lookup would find
/// it: a refused source must still be dropped by the sk_lookup program, never
/// passed on to that lookup. The service accepts itself (not `accept = true`),
/// so nothing in holdfast sees the connection after the program.
#[test]
fn deny_holds_on_a_socket_bound_to_its_one_address_and_port() -> Result<()> {
    let ns = skip_unless!(netns_with_routes()?);
    let sandbox = Sandbox::new()?;
    let exec = sandbox.serve_exec("web")?;
    sandbox.write_tcp_unit(
        "web",
        &format!("exec = {exec}"),
        "web",
        &["192.0.2.50/32"],
        &["7650"],
        "deny = [\"198.51.100.7/32\"]",
    )?;
    let mut hf = skip_unless!(start_dispatched(&ns, sandbox, "deny-one")?);
    let pid = hf.wait_running("web", T)?;
    let report = hf.sandbox().wait_report("web", T, |r| r["pid"] == pid)?;
    assert_eq!(
        report["sockets"][0]["address"],
        serde_json::json!(["192.0.2.50", 7650]),
        "{report}"
    );
    let dst = sa("192.0.2.50:7650");
    ns.run(|| {
        // serve.py answers without reading: only read.
        let mut s = connect_from(Some(v4("198.51.100.8")), dst, T).expect("an admitted source");
        assert_eq!(read_line(&mut s), Outcome::Served(format!("web {pid}")));
        let got = connect_from(Some(v4("198.51.100.7")), dst, Duration::from_secs(3));
        assert!(
            matches!(&got, Err(e) if matches!(e.kind(), io::ErrorKind::TimedOut | io::ErrorKind::ConnectionRefused)),
            "a denied source reached the socket bound to its address: {got:?}"
        );
    })?;
    hf.expect_first_binding_counted("denied", "the dispatcher's denied counter")?;
    hf.stop()
}

/// A reload that changes only allow/deny keeps the socket (holdfast's policy,
/// not a socket option) and the dispatcher's rules follow at once.
#[test]
fn reload_changes_allow_and_deny_in_place() -> Result<()> {
    let ns = skip_unless!(netns_with_routes()?);
    let unit = |rules: &str| accept_unit(&["/bin/cat"], "", &[DEST_PREFIX], &["7610"], rules);
    let sandbox = Sandbox::new()?;
    sandbox.write_unit("cat", &unit("deny = [\"198.51.100.7/32\"]"))?;
    let hf = skip_unless!(start_dispatched(&ns, sandbox, "reallow")?);
    let dst = sa("192.0.2.1:7610");
    let (seven, eight) = (v4("198.51.100.7"), v4("198.51.100.8"));
    let short = Duration::from_secs(3);
    let dropped = |o: &Outcome| matches!(o, Outcome::TimedOut(_) | Outcome::Refused);
    ns.run(|| {
        assert!(dropped(&try_line(Some(seven), dst, "no", short)));
        assert_eq!(
            try_line(Some(eight), dst, "yes", T),
            Outcome::Served("yes".into())
        );
    })?;
    let before = hf.cli_ok(&["status", "--json"])?;

    hf.sandbox()
        .write_unit("cat", &unit("deny = [\"198.51.100.8/32\"]"))?;
    let summary: Value = serde_json::from_str(&hf.cli_ok(&["reload"])?)?;
    assert_eq!(summary["rebound"], serde_json::json!(["cat"]), "{summary}");
    ns.run(|| {
        assert_eq!(
            try_line(Some(seven), dst, "now yes", T),
            Outcome::Served("now yes".into())
        );
        assert!(dropped(&try_line(Some(eight), dst, "now no", short)));
    })?;
    let listeners = |text: &str| -> Result<Value> {
        let v: Value = serde_json::from_str(text)?;
        Ok(v[0]["listeners"].clone())
    };
    assert_eq!(
        listeners(&before)?,
        listeners(&hf.cli_ok(&["status", "--json"])?)?,
        "the same socket (kernel address) and destination"
    );
    let mut hf = hf;
    hf.stop_leaving_nothing(&ns)
}

// ---------------------------------------------------------------------------------------
// on-demand (wait = yes).

/// Probes that the `echo` PATH finds first is the example built beside the holdfast binary
/// under test (not /bin/echo), under the skip policy.
fn example_echo_on_path() -> bool {
    let dir = holdfast_bin()
        .parent()
        .expect("a file has a parent")
        .to_owned();
    let path = std::env::var_os("PATH").unwrap_or_default();
    let first = std::env::split_paths(&path)
        .map(|d| d.join("echo"))
        .find(|p| p.is_file());
    require(
        "the echo example first on PATH",
        match first {
            Some(p) if p.parent() == Some(dir.as_path()) => Ok(()),
            other => Err(format!(
                "the first echo on PATH is {other:?}, not {}/echo (cargo xtask test puts it first)",
                dir.display()
            )),
        },
    )
    .is_some()
}

/// The echo example, `on-demand = true`, on one `protocol` socket at 127.0.0.1:`port`.
fn on_demand_echo(protocol: &str, port: u16) -> String {
    format!(
        "[service]\nexec = [\"echo\"]\non-demand = true\n\n[[socket]]\nprotocol = \"{protocol}\"\naddresses = [\"127.0.0.1/32\"]\nports = [\"{port}\"]\n"
    )
}

/// Waits until `name` listens for traffic again with no main instance.
fn wait_listening(hf: &Holdfast, name: &str) -> Result<()> {
    hf.wait_service(name, T, |s| s["state"] == "listening" && s["pid"].is_null())
        .map(drop)
}

/// The on-demand cycle: started by the first packet, back to listening after it exits, started
/// again by the next; stopped and started by the CLI, and started again by traffic.
fn check_on_demand(ns: &Netns, hf: &Holdfast, ask: &dyn Fn() -> Result<String>) -> Result<()> {
    wait_listening(hf, "echo")?;
    // Nothing runs before traffic: only the daemon is in the namespace.
    assert_eq!(
        ns.pids()?,
        vec![hf.pid()],
        "only holdfast runs before traffic"
    );

    assert_eq!(ask()?, "ping", "the first packet is answered");
    let p1 = hf.wait_running("echo", T)?;

    kill(Pid::from_raw(p1), Signal::SIGTERM)?;
    wait_listening(hf, "echo")?;
    assert_eq!(ask()?, "ping", "the next packet after an exit is answered");
    let p2 = hf.wait_running("echo", T)?;
    assert_ne!(p1, p2, "a new instance");

    hf.cli_ok(&["stop", "echo"])?;
    hf.wait_state("echo", "stopped", T)?;
    hf.cli_ok(&["start", "echo"])?;
    wait_listening(hf, "echo")?;
    assert_eq!(ask()?, "ping", "traffic after stop + start is answered");
    let p3 = hf.wait_running("echo", T)?;
    assert!(p3 != p1 && p3 != p2, "a new instance");
    let log = hf.log();
    assert!(
        log.contains("listening for traffic again"),
        "the log should say the service waits for traffic again:\n{log}"
    );
    Ok(())
}

/// The daemon in a fresh namespace with [`on_demand_echo`] as unit `echo`, under
/// the skip policy (root, a namespace, [`example_echo_on_path`]): `Ok(None)` means skip.
fn on_demand_echo_daemon(protocol: &str, port: u16) -> Result<Option<(Netns, Holdfast)>> {
    let Some(ns) = netns_or_skip() else {
        return Ok(None);
    };
    if !example_echo_on_path() {
        return Ok(None);
    }
    let hf = Holdfast::start(&ns, &[("echo", &on_demand_echo(protocol, port))])?;
    Ok(Some((ns, hf)))
}

#[test]
fn on_demand_udp_echo_starts_on_the_first_datagram_and_again_after_it_exits() -> Result<()> {
    let (ns, mut hf) = skip_unless!(on_demand_echo_daemon("udp", 7700)?);
    check_on_demand(&ns, &hf, &|| {
        Ok(ns.run(|| ask_udp(sa("127.0.0.1:7700"), T))??)
    })?;
    hf.stop_leaving_nothing(&ns)
}

#[test]
fn on_demand_tcp_echo_starts_on_the_first_connection_and_again_after_it_exits() -> Result<()> {
    let (ns, mut hf) = skip_unless!(on_demand_echo_daemon("tcp", 7701)?);
    check_on_demand(&ns, &hf, &|| match ns
        .run(|| try_line(None, sa("127.0.0.1:7701"), "ping", T))?
    {
        Outcome::Served(s) => Ok(s),
        other => bail!("echo over tcp: {other:?}"),
    })?;
    hf.stop_leaving_nothing(&ns)
}

/// A traffic-started service that keeps failing on the datagram left queued is started
/// again only after the restart delay, doubling, each failure counted as a restart, until the
/// start limit fails it (it was started back to back, `restarts` 0, before).
#[test]
fn on_demand_service_failing_on_queued_traffic_backs_off_and_counts_restarts() -> Result<()> {
    let (ns, sandbox) = skip_unless!(netns_and_sandbox()?);
    let starts = sandbox.out("starts");
    let script = sandbox.write_script(
        "fail.sh",
        &format!("#!/bin/sh\ndate +%s%N >> '{}'\nexit 1\n", starts.display()),
    )?;
    sandbox.write_unit(
        "flaky",
        &format!(
            "[service]\nexec = {}\non-demand = true\nrestart-delay = \"200ms\"\nrestart-delay-max = \"2s\"\nstart-limit-burst = 4\nstart-limit-interval = \"30s\"\n\n[[socket]]\nprotocol = \"udp\"\naddresses = [\"127.0.0.1/32\"]\nports = [\"7702\"]\n",
            toml_array(&[&script.to_string_lossy()])
        ),
    )?;
    let mut hf = Holdfast::start_in(&ns, sandbox)?;
    hf.wait_state("flaky", "listening", T)?;
    ns.run(|| std::net::UdpSocket::bind("127.0.0.1:0")?.send_to(b"ping\n", "127.0.0.1:7702"))??;
    let failed = hf.wait_state("flaky", "failed", T)?;
    let text = std::fs::read_to_string(&starts).context("read the starts file")?;
    let at: Vec<u128> = text
        .lines()
        .map(|l| l.trim().parse())
        .collect::<Result<_, _>>()?;
    assert_eq!(at.len(), 4, "started start-limit-burst times: {text}");
    let gaps_ms: Vec<u128> = at.windows(2).map(|w| (w[1] - w[0]) / 1_000_000).collect();
    for (gap, delay) in gaps_ms.iter().zip([200, 400, 800]) {
        assert!(
            *gap >= delay,
            "starts are spaced by the restart delay and its backoff (200, 400, 800 ms): {gaps_ms:?}"
        );
    }
    assert_eq!(
        int(&failed, "restarts"),
        4,
        "each failed run is a restart: {failed}"
    );
    assert!(
        failed["failure"]
            .as_str()
            .is_some_and(|f| f.contains("start limit")),
        "{failed}"
    );
    hf.stop_leaving_nothing(&ns)
}

#[test]
fn accept_on_udp_is_refused_pointing_to_on_demand() -> Result<()> {
    let err = holdfast_check_unit(
        "dns",
        "[service]\nexec = [\"/bin/cat\"]\n\n[[socket]]\nprotocol = \"udp\"\naddresses = [\"127.0.0.1/32\"]\nports = [\"53\"]\naccept = true\n",
        1,
    )?;
    assert!(
        err.contains("dns") && err.contains("accept") && err.contains("on-demand = true"),
        "the error names the unit and the key and points to on-demand = true: {err}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// A real inetd program.

const MICRO_HTTPD: &str = "/usr/sbin/micro-httpd";

#[test]
fn debian_micro_httpd_is_served_unchanged_per_connection() -> Result<()> {
    let (ns, sandbox) = skip_unless!(netns_and_sandbox_with_tools(&[
        MICRO_HTTPD,
        "/usr/bin/curl"
    ])?);
    let www = sandbox.path().join("www");
    std::fs::create_dir(&www)?;
    std::fs::write(
        www.join("hello.txt"),
        "hello from micro-httpd via holdfast\n",
    )?;
    std::fs::write(www.join("index.html"), "<p>index</p>\n")?;
    // As Debian's own micro-httpd@.service runs it: as www-data, the connection on stdin/stdout.
    sandbox.write_unit(
        "web",
        &accept_unit(
            &[MICRO_HTTPD, &www.to_string_lossy()],
            "user = \"www-data\"\ngroup = \"www-data\"",
            &["127.0.0.1/32"],
            &["8080"],
            "",
        ),
    )?;
    let mut hf = Holdfast::start_in(&ns, sandbox)?;
    let curl = |path: &str| -> Result<(String, String)> {
        ns.run(|| -> Result<(String, String)> {
            let mut cmd = Command::new("curl");
            cmd.args(["-sS", "--max-time", "10", "-w", "\n%{http_code}"])
                .arg(format!("http://127.0.0.1:8080{path}"));
            let out = run_bounded(cmd, T)?;
            ensure!(
                out.status.success(),
                "curl {path}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let (body, code) = text.rsplit_once('\n').context("curl -w output")?;
            Ok((code.to_string(), body.to_string()))
        })?
    };
    for _ in 0..3 {
        assert_eq!(
            curl("/hello.txt")?,
            ("200".into(), "hello from micro-httpd via holdfast\n".into())
        );
    }
    assert_eq!(curl("/")?, ("200".into(), "<p>index</p>\n".into()));
    assert_eq!(curl("/missing")?.0, "404");
    let svc = wait_idle(&hf, "web")?;
    assert_eq!(int(&svc, "connections_total"), 5, "{svc}");
    assert_eq!(svc["state"], "listening", "{svc}");
    assert!(Path::new(MICRO_HTTPD).is_file());
    hf.stop_leaving_nothing(&ns)
}

#[test]
fn outcome_reading_tells_served_from_closed() -> Result<()> {
    // A plain local pair (no namespace needed): a server that answers, one that closes.
    let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let addr = l.local_addr()?;
    let server = std::thread::spawn(move || -> io::Result<()> {
        let (mut a, _) = l.accept()?;
        let mut buf = [0u8; 16];
        let n = a.read(&mut buf)?;
        a.write_all(&buf[..n])?;
        let (b, _) = l.accept()?;
        drop(b);
        Ok(())
    });
    assert_eq!(try_line(None, addr, "x", T), Outcome::Served("x".into()));
    assert_turned_away(&try_line(None, addr, "y", T), "a connection closed at once");
    server.join().expect("server thread")?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The keys systemd users reach for (issue 13), on a unix socket with accept = true.

#[test]
fn accept_instances_get_umask_groups_no_new_privs_and_environment_files() -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let (ns, sandbox) = skip_unless!(netns_and_sandbox()?);
    let env_file = sandbox.path().join("keys.env");
    std::fs::write(
        &env_file,
        "# read at each start\nFROM_FILE='one two'\nBOTH=file\n",
    )?;
    let socket = sandbox.path().join("keys.sock");
    let script = "umask; grep -E '^(NoNewPrivs|Groups):' /proc/self/status | tr -s '\\t ' ' '; \
                  echo \"$FROM_FILE|$BOTH|$FROM_ENV\"";
    sandbox.write_unit(
        "keys",
        &format!(
            "[service]\nexec = {}\numask = \"0027\"\nno-new-privileges = true\n\
             supplementary-groups = [\"4242\"]\nenvironment-file = [{}, \"-/nonexistent/hf.env\"]\n\
             environment = {{ FROM_ENV = \"e\", BOTH = \"environment\" }}\n\n\
             [[socket]]\nprotocol = \"unix-stream\"\npath = {}\naccept = true\nmode = \"0660\"\n\
             socket-user = \"65534\"\nsocket-group = \"4242\"\nremove-on-stop = true\n",
            toml_array(&["/bin/sh", "-c", script]),
            toml_str(&env_file.to_string_lossy()),
            toml_str(&socket.to_string_lossy()),
        ),
    )?;
    let mut hf = Holdfast::start_in(&ns, sandbox)?;
    let meta = std::fs::symlink_metadata(&socket)?;
    ensure!(
        (meta.uid(), meta.gid(), meta.mode() & 0o7777) == (65534, 4242, 0o660),
        "socket file owned {}:{} mode {:o}, want 65534:4242 0660",
        meta.uid(),
        meta.gid(),
        meta.mode() & 0o7777
    );
    let answer = holdfast_testkit::ask_unix(&socket, T)?;
    let lines: Vec<&str> = answer.lines().collect();
    ensure!(
        lines == ["0027", "Groups: 4242 ", "NoNewPrivs: 1", "one two|file|e"],
        "the instance said {answer:?}"
    );
    // Read at each start: a changed file is what the next instance sees.
    std::fs::write(&env_file, "FROM_FILE=changed\n")?;
    let answer = holdfast_testkit::ask_unix(&socket, T)?;
    ensure!(
        answer.ends_with("changed|environment|e\n"),
        "after the file changed the instance said {answer:?}"
    );
    hf.stop_leaving_nothing(&ns)?;
    ensure!(
        !socket.exists(),
        "remove-on-stop: {} is still there after holdfast exited",
        socket.display()
    );
    Ok(())
}

const IN_TFTPD: &str = "/usr/sbin/in.tftpd";

/// One TFTP read (RRQ, octet mode) of `file` from `server`: the whole file,
/// block by block, each acknowledged. The server answers from a port of its
/// own (its transfer id), as TFTP does.
fn tftp_get(server: SocketAddr, file: &str) -> Result<Vec<u8>> {
    let s = std::net::UdpSocket::bind("127.0.0.1:0")?;
    s.set_read_timeout(Some(T))?;
    let mut rrq = vec![0, 1];
    rrq.extend_from_slice(file.as_bytes());
    rrq.push(0);
    rrq.extend_from_slice(b"octet\0");
    s.send_to(&rrq, server)?;
    let mut got = Vec::new();
    let mut buf = [0u8; 516];
    for block in 1u16.. {
        let (n, from) = s
            .recv_from(&mut buf)
            .context("no DATA from the tftp server")?;
        ensure!(
            n >= 4 && buf[..2] == [0, 3] && buf[2..4] == block.to_be_bytes(),
            "want DATA block {block}, got {:?}",
            &buf[..n.min(64)]
        );
        got.extend_from_slice(&buf[4..n]);
        let ack = [0, 4, buf[2], buf[3]];
        s.send_to(&ack, from)?;
        if n < 516 {
            break;
        }
    }
    Ok(got)
}

/// Debian's in.tftpd, a `wait = yes` inetd daemon that reads its first
/// request from fd 0, served unchanged: started on demand with the UDP socket
/// on stdin (`standard-input = "socket"`), as from inetd or a systemd socket
/// unit with StandardInput=socket.
#[test]
fn debian_in_tftpd_is_served_unchanged_with_the_socket_on_stdin() -> Result<()> {
    let (ns, sandbox) = skip_unless!(netns_and_sandbox_with_tools(&[IN_TFTPD])?);
    let root = sandbox.path().join("tftp");
    std::fs::create_dir(&root)?;
    // More than one block: 1300 bytes are three DATA packets.
    let text: Vec<u8> = (0..1300u32).map(|i| b'a' + (i % 26) as u8).collect();
    std::fs::write(root.join("boot.txt"), &text)?;
    sandbox.write_unit(
        "tftp",
        &format!(
            "[service]\nexec = {}\non-demand = true\nstandard-input = \"socket\"\n\n\
             [[socket]]\nprotocol = \"udp\"\naddresses = [\"127.0.0.1/32\"]\nports = [\"6969\"]\n",
            toml_array(&[
                IN_TFTPD,
                "--secure",
                "--timeout",
                "2",
                &root.to_string_lossy()
            ])
        ),
    )?;
    let mut hf = Holdfast::start_in(&ns, sandbox)?;
    hf.wait_state("tftp", "listening", T)?;
    let server: SocketAddr = "127.0.0.1:6969".parse()?;
    let got = ns.run(|| tftp_get(server, "boot.txt"))??;
    ensure!(got == text, "got {} bytes, not the file", got.len());
    // It exits after its idle timeout; the next request starts it again.
    hf.wait_state("tftp", "listening", Duration::from_secs(15))?;
    let again = ns.run(|| tftp_get(server, "boot.txt"))??;
    ensure!(again == text, "the second run served {} bytes", again.len());
    hf.stop_leaving_nothing(&ns)
}
