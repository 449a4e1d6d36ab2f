//! sk_lookup dispatch through the real daemon (issue 3): `holdfast run` with the
//! dispatcher (the default), the example services (`echo`, `hello-http`, from
//! PATH as `cargo xtask test` sets it) and serve.py, real clients in a fresh
//! network namespace per test. Addresses and ports are drawn at random inside
//! the declared ranges (the seed is printed; `HOLDFAST_TEST_SEED=N` replays it),
//! and the ones just outside (port 7999, 8100, the next prefix) are made local
//! too, so that "not steered" shows as a refusal, not as an unreachable address.
//!
//! Every daemon gets its own `--instance`, and a clean stop must leave nothing
//! under `/sys/fs/bpf/holdfast/<instance>`.

use std::fs;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, ensure, Context, Result};
use holdfast_testkit::{
    ask_tcp, ask_udp, dispatcher_instance as instance, netns_and_sandbox,
    netns_and_sandbox_with_tools, netns_with_local_routes, require, restart_always, skip_unless,
    toml_array, toml_str, Holdfast, LoopClient, Netns, RunOptions, Sandbox,
};
use serde_json::Value;

/// Bound on every connection and wait that should succeed.
const T: Duration = Duration::from_secs(10);
/// Random samples per range and family.
const SAMPLES: usize = 8;
/// Where holdfast pins its dispatchers.
const PIN_ROOT: &str = "/sys/fs/bpf/holdfast";

// ---- randomness ------------------------------------------------------------

/// xorshift64*: enough to spread samples; the seed is printed for a replay.
struct Rng(u64);

impl Rng {
    fn new(test: &str) -> Rng {
        let seed = std::env::var("HOLDFAST_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                let t = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default();
                t.as_nanos() as u64 ^ u64::from(std::process::id()) << 32
            })
            | 1;
        eprintln!("{test}: seed {seed} (HOLDFAST_TEST_SEED={seed} replays it)");
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    fn port(&mut self, lo: u16, hi: u16) -> u16 {
        self.range(u64::from(lo), u64::from(hi)) as u16
    }

    /// A random address in `prefix` ("192.0.2.0/24", "2001:db8:1::/64"),
    /// neither its first nor (for IPv4) its last address.
    fn addr_in(&mut self, prefix: &str) -> IpAddr {
        let (base, len) = prefix.split_once('/').expect("a prefix has a length");
        let len: u32 = len.parse().expect("a prefix length");
        match base.parse::<IpAddr>().expect("a prefix address") {
            IpAddr::V4(a) => {
                let host_bits = 32 - len;
                let host = self.range(1, (1u64 << host_bits) - 2) as u32;
                IpAddr::V4(Ipv4Addr::from(u32::from(a) | host))
            }
            IpAddr::V6(a) => {
                let host_bits = 128 - len;
                let r = (u128::from(self.next()) << 64) | u128::from(self.next());
                let mask = if host_bits == 128 {
                    u128::MAX
                } else {
                    (1u128 << host_bits) - 1
                };
                let host = (r & mask).max(1);
                IpAddr::V6(Ipv6Addr::from(u128::from(a) | host))
            }
        }
    }
}

// ---- the daemon ------------------------------------------------------------

fn pin_dir(instance: &str) -> PathBuf {
    Path::new(PIN_ROOT).join(instance)
}

/// [`netns_with_local_routes`] for [`ROUTES`] and a fresh [`Sandbox`]: `Ok(None)`
/// means skip.
fn routed_netns_and_sandbox() -> Result<Option<(Netns, Sandbox)>> {
    let Some(ns) = netns_with_local_routes(ROUTES)? else {
        return Ok(None);
    };
    Ok(Some((ns, Sandbox::new()?)))
}

/// `holdfast run --instance INSTANCE` with the dispatcher, INSTANCE the
/// [`instance`] of `tag`: the daemon and INSTANCE; `None`: skip (no BPF,
/// outside CI).
fn start_dispatched(ns: &Netns, sandbox: Sandbox, tag: &str) -> Result<Option<(Holdfast, String)>> {
    let instance = instance(tag);
    let opts = RunOptions {
        args: vec!["--instance".into(), instance.clone()],
        ..RunOptions::default()
    };
    let Some(hf) = Holdfast::start_dispatched(ns, sandbox, &opts)? else {
        return Ok(None);
    };
    ensure!(
        pin_dir(&instance).is_dir(),
        "holdfast runs with the dispatcher but nothing is pinned at {}; its log:\n{}",
        pin_dir(&instance).display(),
        hf.log()
    );
    Ok(Some((hf, instance)))
}

/// [`routed_netns_and_sandbox`] with one serve.py unit NAME on TCP [`V4`] and
/// [`V6`] × `ports` (`service_extra` lines in `[service]`), started by
/// [`start_dispatched`] as the instance of `tag`, NAME running: the namespace,
/// the daemon, the instance and NAME's pid; `None`: skip.
fn dual_stack_dispatched(
    name: &str,
    ports: &str,
    service_extra: &str,
    tag: &str,
) -> Result<Option<(Netns, Holdfast, String, i32)>> {
    let Some((ns, sandbox)) = routed_netns_and_sandbox()? else {
        return Ok(None);
    };
    sandbox.write_serve_ip_unit(name, "tcp", &[V4, V6], &[ports], service_extra, "")?;
    let Some((hf, inst)) = start_dispatched(&ns, sandbox, tag)? else {
        return Ok(None);
    };
    let pid = hf.wait_running(name, T)?;
    Ok(Some((ns, hf, inst, pid)))
}

/// SIGTERM, exit 0, and nothing left under the instance's pin directory.
fn stop_leaves_no_pins(hf: &mut Holdfast, instance: &str) -> Result<()> {
    hf.stop()?;
    let dir = pin_dir(instance);
    if dir.exists() {
        let left: Vec<_> = walk(&dir);
        bail!("a clean exit left {} behind: {left:?}", dir.display());
    }
    Ok(())
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_owned()];
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            out.extend(walk(&e.path()));
        }
    }
    out
}

/// `holdfast bindings --json`.
fn bindings(hf: &Holdfast) -> Result<Vec<Value>> {
    let text = hf.cli_ok(&["bindings", "--json"])?;
    let v: Value =
        serde_json::from_str(&text).with_context(|| format!("bindings --json: {text:?}"))?;
    v.as_array()
        .cloned()
        .ok_or_else(|| anyhow!("bindings --json printed no array: {v}"))
}

/// The `(prefix, ports)` of service `name`'s bindings, sorted.
fn bindings_of(all: &[Value], name: &str) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = all
        .iter()
        .filter(|b| b["service"] == name)
        .map(|b| {
            (
                b["prefix"].as_str().unwrap_or("?").to_string(),
                b["ports"].as_str().unwrap_or("?").to_string(),
            )
        })
        .collect();
    v.sort();
    v
}

/// The directory of the example binaries: where PATH finds `hello-http`, which
/// must also hold the example's `echo` (cargo xtask test puts target/debug first).
fn examples_dir() -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dir = std::env::split_paths(&path)
        .find(|d| d.join("hello-http").is_file())
        .context("hello-http is not on PATH (cargo xtask test puts target/debug first)")?;
    ensure!(
        dir.join("echo").is_file(),
        "no example echo beside {}",
        dir.join("hello-http").display()
    );
    Ok(dir)
}

// ---- clients ---------------------------------------------------------------

/// What a probe got.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Got {
    Answer(String),
    Refused,
    Failed(String),
}

fn got(r: io::Result<String>) -> Got {
    match r {
        Ok(a) => Got::Answer(a),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Got::Refused,
        Err(e) => Got::Failed(e.to_string()),
    }
}

/// A TCP connection to serve.py or nothing: its answer, or the refusal.
fn tcp(addr: SocketAddr) -> Got {
    got(ask_tcp(addr, T))
}

/// A *connected* UDP client sends `payload` and reads one datagram: only a
/// reply from exactly `addr` gets through; nothing listening there shows as
/// a refusal (the ICMP port unreachable reaches a connected socket).
fn udp_connected(addr: SocketAddr, payload: &[u8]) -> Got {
    got((|| {
        let local: SocketAddr = if addr.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let s = UdpSocket::bind(local)?;
        s.connect(addr)?;
        s.set_read_timeout(Some(T))?;
        s.send(payload)?;
        let mut buf = [0u8; 2048];
        let n = s.recv(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    })())
}

/// Sends a line over TCP and reads the echo of that many bytes.
fn tcp_echo(addr: SocketAddr, line: &str) -> Got {
    got((|| {
        let mut s = TcpStream::connect_timeout(&addr, T)?;
        s.set_read_timeout(Some(T))?;
        s.write_all(line.as_bytes())?;
        let mut buf = vec![0u8; line.len()];
        s.read_exact(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    })())
}

/// `GET /` from hello-http: the body of a 200, which names the service.
fn http_get(addr: SocketAddr) -> Got {
    got((|| {
        let mut s = TcpStream::connect_timeout(&addr, T)?;
        s.set_read_timeout(Some(T))?;
        s.write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        match text.split_once("\r\n\r\n") {
            Some((head, body)) if head.starts_with("HTTP/1.1 200 ") => Ok(body.trim().to_string()),
            _ => Err(io::Error::other(format!("not a 200 response: {text:?}"))),
        }
    })())
}

/// Probes every target and fails naming each one whose outcome is not `want(target)`.
fn expect_all(
    what: &str,
    targets: &[SocketAddr],
    probe: impl Fn(SocketAddr) -> Got,
    want: impl Fn(SocketAddr) -> Got,
) -> Result<()> {
    let wrong: Vec<String> = targets
        .iter()
        .filter_map(|&a| {
            let (got, want) = (probe(a), want(a));
            (got != want).then(|| format!("{a}: got {got:?}, want {want:?}"))
        })
        .collect();
    ensure!(
        wrong.is_empty(),
        "{what}: {} of {} cases wrong:\n  {}",
        wrong.len(),
        targets.len(),
        wrong.join("\n  ")
    );
    Ok(())
}

/// [`expect_all`] over TCP (from inside `ns`) for addresses drawn (seed `seed`)
/// from [`V4`] and [`V6`] × `ports`: each answered by `name`'s instance `pid`.
fn expect_answered_by(
    ns: &Netns,
    what: &str,
    seed: &str,
    ports: (u16, u16),
    name: &str,
    pid: i32,
) -> Result<()> {
    let mut rng = Rng::new(seed);
    let targets = inside(&mut rng, &[V4, V6], &[ports]);
    let want = format!("{name} {pid}\n");
    ns.run(|| expect_all(what, &targets, tcp, |_| Got::Answer(want.clone())))?
}

/// [`expect_all`] with every one of `targets` refused.
fn expect_refused(
    what: &str,
    targets: &[SocketAddr],
    probe: impl Fn(SocketAddr) -> Got,
) -> Result<()> {
    expect_all(what, targets, probe, |_| Got::Refused)
}

/// Samples inside `prefixes` × `ports` (each range's ends included).
fn inside(rng: &mut Rng, prefixes: &[&str], ports: &[(u16, u16)]) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for p in prefixes {
        for &(lo, hi) in ports {
            out.push(SocketAddr::new(rng.addr_in(p), lo));
            out.push(SocketAddr::new(rng.addr_in(p), hi));
            for _ in 0..SAMPLES {
                out.push(SocketAddr::new(rng.addr_in(p), rng.port(lo, hi)));
            }
        }
    }
    out
}

/// `n` random addresses and ports on V4 and V6 (alternating) × 8000-8099.
fn random_targets(rng: &mut Rng, n: usize) -> Vec<SocketAddr> {
    (0..n)
        .map(|i| SocketAddr::new(rng.addr_in([V4, V6][i % 2]), rng.port(8000, 8099)))
        .collect()
}

// ---- tests -----------------------------------------------------------------

const V4: &str = "192.0.2.0/24";
const V6: &str = "2001:db8:1::/64";
/// The prefixes just after V4 and V6, local too but declared by no unit.
const V4_NEXT: &str = "192.0.3.0/24";
const V6_NEXT: &str = "2001:db8:1:1::/64";
/// Routes covering V4, V6 and the prefixes just after them.
const ROUTES: &[&str] = &["192.0.2.0/23", "2001:db8:1::/63"];

#[test]
fn tcp_and_udp_ipv4_and_ipv6_reach_the_declared_ranges_and_nothing_else() -> Result<()> {
    let (ns, sandbox) = skip_unless!(routed_netns_and_sandbox()?);
    let ports = ["80", "8000-8099"];
    sandbox.write_serve_ip_unit("web", "tcp", &[V4, V6], &ports, "", "")?;
    sandbox.write_serve_ip_unit("dns", "udp", &[V4, V6], &ports, "", "")?;
    let (mut hf, inst) = skip_unless!(start_dispatched(&ns, sandbox, "ranges")?);
    let web = hf.wait_running("web", T)?;
    let dns = hf.wait_running("dns", T)?;
    let mut rng = Rng::new("ranges");
    let targets = inside(&mut rng, &[V4, V6], &[(80, 80), (8000, 8099)]);
    let mut outside = Vec::new();
    for p in [V4, V6] {
        for port in [79, 81, 7999, 8100] {
            outside.push(SocketAddr::new(rng.addr_in(p), port));
        }
    }
    for p in [V4_NEXT, V6_NEXT] {
        for port in [80, 8000, rng.port(8000, 8099), 8099] {
            outside.push(SocketAddr::new(rng.addr_in(p), port));
        }
    }

    ns.run(|| -> Result<()> {
        let want_web = format!("web {web}\n");
        let want_dns = format!("dns {dns}\n");
        expect_all("tcp inside", &targets, tcp, |_| {
            Got::Answer(want_web.clone())
        })?;
        expect_all(
            "udp inside",
            &targets,
            |a| got(ask_udp(a, T)),
            |_| Got::Answer(want_dns.clone()),
        )?;
        expect_refused("tcp outside", &outside, tcp)?;
        expect_refused("udp outside", &outside, |a| udp_connected(a, b"ping"))
    })??;

    let all = bindings(&hf)?;
    let want: Vec<(String, String)> = {
        let mut w = Vec::new();
        for p in [V4, V6] {
            for ports in ["80", "8000-8099"] {
                w.push((p.to_string(), ports.to_string()));
            }
        }
        w.sort();
        w
    };
    assert_eq!(bindings_of(&all, "web"), want, "{all:?}");
    assert_eq!(bindings_of(&all, "dns"), want, "{all:?}");
    for b in &all {
        assert_eq!(b["socket_present"], true, "{b}");
        assert_eq!(b["misses"], 0, "{b}");
        assert_eq!(b["errors"], 0, "{b}");
        let proto = if b["service"] == "web" { "tcp" } else { "udp" };
        assert_eq!(b["protocol"], proto, "{b}");
    }
    // Counters are per destination: each socket's rows show its whole count.
    for svc in ["web", "dns"] {
        let row = all
            .iter()
            .find(|b| b["service"] == svc)
            .expect("checked above");
        let lookups = row["lookups"].as_u64().unwrap_or(0);
        assert!(
            lookups >= targets.len() as u64,
            "{svc}: {lookups} lookups counted for {} connections: {row}",
            targets.len()
        );
    }
    stop_leaves_no_pins(&mut hf, &inst)
}

#[test]
fn echo_answers_tcp_and_connected_udp_clients_from_the_address_and_port_they_used() -> Result<()> {
    let ns = skip_unless!(netns_with_local_routes(ROUTES)?);
    let dir = skip_unless!(require("the example binaries on PATH", examples_dir()));
    let sandbox = Sandbox::new()?;
    let echo = dir.join("echo");
    let mut unit = format!(
        "[service]\nexec = {}\n",
        toml_array(&[&echo.to_string_lossy()])
    );
    for (name, protocol) in [("echo-tcp", "tcp"), ("echo-udp", "udp")] {
        unit += &format!(
            "\n[[socket]]\nname = {}\nprotocol = {}\naddresses = {}\nports = [\"8000-8099\"]\n",
            toml_str(name),
            toml_str(protocol),
            toml_array(&[V4, V6]),
        );
    }
    sandbox.write_unit("echo", &unit)?;
    let (mut hf, inst) = skip_unless!(start_dispatched(&ns, sandbox, "echo")?);
    hf.wait_running("echo", T)?;
    let mut rng = Rng::new("echo");
    let targets = inside(&mut rng, &[V4, V6], &[(8000, 8099)]);
    let outside: Vec<SocketAddr> = [V4, V6]
        .iter()
        .flat_map(|p| [7999, 8100].map(|port| SocketAddr::new(rng.addr_in(p), port)))
        .collect();
    ns.run(|| -> Result<()> {
        let line = |a: SocketAddr| format!("to {a}\n");
        expect_all(
            "tcp echo",
            &targets,
            |a| tcp_echo(a, &line(a)),
            |a| Got::Answer(line(a)),
        )?;
        // A connected client drops a datagram from any other address or port:
        // the echo arriving proves it left from exactly `a`.
        let datagram = |a: SocketAddr| format!("datagram to {a}");
        expect_all(
            "connected udp echo",
            &targets,
            |a| udp_connected(a, datagram(a).as_bytes()),
            |a| Got::Answer(datagram(a)),
        )?;
        expect_refused("tcp outside", &outside, |a| tcp_echo(a, "x\n"))?;
        expect_refused("udp outside", &outside, |a| udp_connected(a, b"x"))
    })??;
    stop_leaves_no_pins(&mut hf, &inst)
}

#[test]
fn longer_prefix_wins_then_narrower_port_range() -> Result<()> {
    let ns = skip_unless!(netns_with_local_routes(ROUTES)?);
    let dir = skip_unless!(require("the example binaries on PATH", examples_dir()));
    // wide: the /24 and /64 on 8000-8099; narrow: their upper halves (/25,
    // /65) on the same ports; single: the /24 and /64 on 8080 alone.
    const V4_HIGH: &str = "192.0.2.128/25";
    const V4_LOW: &str = "192.0.2.0/25";
    const V6_HIGH: &str = "2001:db8:1:0:8000::/65";
    const V6_LOW: &str = "2001:db8:1::/65";
    let units = [
        ("wide", [V4, V6], "8000-8099"),
        ("narrow", [V4_HIGH, V6_HIGH], "8000-8099"),
        ("single", [V4, V6], "8080"),
    ];
    let sandbox = Sandbox::new()?;
    let hello = dir.join("hello-http");
    for (name, addresses, ports) in units {
        sandbox.write_unit(
            name,
            &format!(
                "[service]\nexec = {}\ntype = \"notify\"\n\n[[socket]]\nname = \"http\"\nprotocol = \"tcp\"\naddresses = {}\nports = [{}]\n",
                toml_array(&[&hello.to_string_lossy(), "--name", name]),
                toml_array(&addresses),
                toml_str(ports),
            ),
        )?;
    }
    let (mut hf, inst) = skip_unless!(start_dispatched(&ns, sandbox, "precedence")?);
    let mut pids = std::collections::BTreeMap::new();
    for (name, _, _) in units {
        pids.insert(name, hf.wait_running(name, T)?);
    }
    let mut rng = Rng::new("precedence");
    let mut cases: Vec<(SocketAddr, &str)> = Vec::new();
    for (low, high) in [(V4_LOW, V4_HIGH), (V6_LOW, V6_HIGH)] {
        for _ in 0..SAMPLES {
            let other_port = loop {
                let p = rng.port(8000, 8099);
                if p != 8080 {
                    break p;
                }
            };
            // The range of the /24 (/64) only.
            cases.push((SocketAddr::new(rng.addr_in(low), other_port), "wide"));
            // The /25 (/65) is longer than the /24 (/64).
            cases.push((SocketAddr::new(rng.addr_in(high), other_port), "narrow"));
            // Equal prefixes: the single port is narrower than the range.
            cases.push((SocketAddr::new(rng.addr_in(low), 8080), "single"));
            // The longer prefix beats the narrower port range.
            cases.push((SocketAddr::new(rng.addr_in(high), 8080), "narrow"));
        }
    }
    ns.run(|| {
        let addrs: Vec<SocketAddr> = cases.iter().map(|c| c.0).collect();
        expect_all("precedence", &addrs, http_get, |a| {
            let name = cases.iter().find(|c| c.0 == a).expect("a case").1;
            Got::Answer(format!("hello from {name} pid {}", pids[name]))
        })
    })??;
    stop_leaves_no_pins(&mut hf, &inst)
}

#[test]
fn equally_specific_overlap_is_refused_naming_both_units() -> Result<()> {
    let (ns, sandbox) = skip_unless!(netns_and_sandbox()?);
    sandbox.write_serve_ip_unit("first", "tcp", &[V4], &["8000-8099"], "", "")?;
    sandbox.write_serve_ip_unit("second", "tcp", &["192.0.2.0/24"], &["8050-8149"], "", "")?;
    let opts = RunOptions {
        dispatcher: true,
        args: vec!["--instance".into(), instance("overlap")],
        ..RunOptions::default()
    };
    let mut hf = Holdfast::spawn_with(&ns, sandbox, &opts)?;
    let status = hf.wait_exit(T)?;
    let log = hf.log();
    assert_eq!(status.code(), Some(1), "{log}");
    for unit in ["first.toml", "second.toml"] {
        assert!(log.contains(unit), "the error does not name {unit}: {log}");
    }
    assert!(
        !hf.sandbox().out("first.json").exists() && !hf.sandbox().out("second.json").exists(),
        "a service started although the units were refused"
    );
    assert!(!pin_dir(&instance("overlap")).exists(), "pins left behind");
    Ok(())
}

#[test]
fn one_dual_stack_socket_serves_ipv4_and_ipv6() -> Result<()> {
    let (ns, mut hf, inst, pid) =
        skip_unless!(dual_stack_dispatched("dual", "8000-8099", "", "dual")?);
    let report = hf.sandbox().wait_report("dual", T, |r| r["pid"] == pid)?;
    let sockets = report["sockets"].as_array().cloned().unwrap_or_default();
    assert_eq!(
        sockets.len(),
        1,
        "one socket for both families: {sockets:?}"
    );
    assert_eq!(sockets[0]["family"], "AF_INET6", "{sockets:?}");
    assert_eq!(
        sockets[0]["address"][0], "::",
        "dual-stack needs [::]: {sockets:?}"
    );

    expect_answered_by(&ns, "dual-stack", "dual", (8000, 8099), "dual", pid)?;
    let all = bindings(&hf)?;
    assert_eq!(all.len(), 2, "{all:?}");
    assert_eq!(all[0]["destination"], all[1]["destination"], "{all:?}");
    let families: Vec<&str> = all.iter().filter_map(|b| b["prefix"].as_str()).collect();
    assert!(families.contains(&V4) && families.contains(&V6), "{all:?}");
    stop_leaves_no_pins(&mut hf, &inst)
}

#[test]
fn kill_9_in_a_loop_refuses_nothing_on_the_ranges() -> Result<()> {
    const KILLS: usize = 10;
    let restart = restart_always("50ms", "200ms", 1000, "10s");
    let (ns, mut hf, inst, _) = skip_unless!(dual_stack_dispatched(
        "web",
        "8000-8099",
        &restart,
        "kill9"
    )?);
    let mut rng = Rng::new("kill9");
    let background: Vec<(SocketAddr, String)> = random_targets(&mut rng, 10)
        .into_iter()
        .map(|a| (a, "web".to_string()))
        .collect();
    let client = LoopClient::start(&ns, background, Duration::from_millis(2), T)?;
    ns.run(|| hf.kill_9_rounds("web", KILLS, T, |_| random_targets(&mut rng, 6)))??;
    let tally = client.finish()?;
    // A connection that an instance accepted just before its SIGKILL ends
    // unanswered (EOF, or a reset): at most one per kill, none of holdfast's doing.
    tally.expect_no_loss(KILLS)?;
    assert!(
        tally.answered > 0 && tally.pids_of("web").len() >= 2,
        "{tally:?}"
    );
    let all = bindings(&hf)?;
    assert!(
        all.iter()
            .all(|b| b["misses"] == 0 && b["errors"] == 0 && b["socket_present"] == true),
        "{all:?}"
    );
    stop_leaves_no_pins(&mut hf, &inst)
}

#[test]
fn a_binding_on_all_ports_serves_any_port() -> Result<()> {
    let (ns, mut hf, inst, pid) =
        skip_unless!(dual_stack_dispatched("any", "1-65535", "", "allports")?);
    expect_answered_by(&ns, "all ports", "allports", (1, 65535), "any", pid)?;
    let all = bindings(&hf)?;
    let want = [V4, V6].map(|p| (p.to_string(), "1-65535".to_string()));
    assert_eq!(bindings_of(&all, "any"), want, "{all:?}");
    // The map entries of an all-ports binding equal a single port's: the
    // dispatcher's own test (dispatch::tests::all_ports_binding_costs_one_entry)
    // counts them with Dispatcher::binding_entries, which the CLI does not show.
    stop_leaves_no_pins(&mut hf, &inst)
}

// ---- dropped capabilities, --netns ------------------------------------------

/// setpriv dropping what BPF needs (and what mounting bpffs needs) from the
/// bounding and inheritable sets, so the root daemon's permitted and effective
/// sets lack them after exec.
const WITHOUT_BPF: &[&str] = &[
    "setpriv",
    "--bounding-set=-bpf,-sys_admin,-perfmon,-net_admin",
    "--inh-caps=-bpf,-sys_admin,-perfmon,-net_admin",
    "--",
];

/// The daemon with the dispatcher asked for, under [`WITHOUT_BPF`].
fn without_bpf(instance: &str) -> RunOptions {
    RunOptions {
        dispatcher: true,
        wrapper: WITHOUT_BPF.iter().map(|s| s.to_string()).collect(),
        args: vec!["--instance".into(), instance.into()],
        ..RunOptions::default()
    }
}

#[test]
fn without_bpf_a_bind_mode_unit_serves_after_a_plain_warning() -> Result<()> {
    let (ns, sandbox) = skip_unless!(netns_and_sandbox_with_tools(&["/usr/bin/setpriv"])?);
    sandbox.write_serve_ip_unit("plain", "tcp", &["127.0.0.1/32"], &["8080"], "", "")?;
    let inst = instance("nobpf");
    let mut hf = Holdfast::start_with(&ns, sandbox, &without_bpf(&inst))?;
    let pid = hf.wait_running("plain", T)?;
    let status = fs::read_to_string(format!("/proc/{}/status", hf.pid()))?;
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(str::trim)
        .unwrap_or("?")
        .to_string();
    let log = hf.log();
    assert!(
        log.contains("BPF is not available") && log.contains("falling back to bind mode"),
        "no plain warning (CapEff {cap_eff}): {log}"
    );
    let answer = ns.run(|| ask_tcp("127.0.0.1:8080".parse().expect("literal"), T))??;
    assert_eq!(answer, format!("plain {pid}\n"));
    let b = hf.cli(&["bindings", "--json"])?;
    assert_eq!(
        b.status.code(),
        Some(1),
        "bindings without a dispatcher: {b:?}"
    );
    assert!(
        String::from_utf8_lossy(&b.stderr).contains("dispatcher is not active"),
        "{b:?}"
    );
    assert!(!pin_dir(&inst).exists(), "pins without BPF?");
    hf.stop()
}

#[test]
fn without_bpf_a_range_unit_is_refused_naming_unit_socket_and_reason() -> Result<()> {
    let (ns, sandbox) = skip_unless!(netns_and_sandbox_with_tools(&["/usr/bin/setpriv"])?);
    let exec = sandbox.serve_exec("ranged")?;
    sandbox.write_unit(
        "ranged",
        &format!(
            "[service]\nexec = {exec}\n\n[[socket]]\nname = \"wide\"\nprotocol = \"tcp\"\naddresses = [\"{V4}\"]\nports = [\"8000-8099\"]\n"
        ),
    )?;
    let mut hf = Holdfast::spawn_with(&ns, sandbox, &without_bpf(&instance("norange")))?;
    let status = hf.wait_exit(T)?;
    let log = hf.log();
    assert_eq!(status.code(), Some(1), "{log}");
    let line = log
        .lines()
        .find(|l| l.contains("needs the sk_lookup dispatcher"))
        .with_context(|| format!("no \"needs the sk_lookup dispatcher\" in the log:\n{log}"))?;
    for name in ["ranged.toml", "ranged", "\"wide\""] {
        assert!(
            line.contains(name),
            "the refusal does not name {name}: {line}"
        );
    }
    assert!(
        log.contains("BPF is not available"),
        "the reason is missing: {log}"
    );
    assert!(
        !hf.sandbox().out("ranged.json").exists(),
        "the service started"
    );
    Ok(())
}

#[test]
fn netns_flag_serves_inside_the_named_namespace() -> Result<()> {
    let (ns, sandbox) = skip_unless!(routed_netns_and_sandbox()?);
    sandbox.write_serve_ip_unit("web", "tcp", &[V4, V6], &["8000-8099"], "", "")?;
    let inst = instance("netnsflag");
    let ns_path = ns.path().to_string_lossy().into_owned();
    // Spawned from this thread's namespace (the host's, or the test runner's),
    // not the test's: holdfast must enter it by itself.
    let opts = RunOptions {
        netns_flag: true,
        args: vec!["--instance".into(), inst.clone()],
        ..RunOptions::default()
    };
    let mut hf = skip_unless!(Holdfast::start_dispatched(&ns, sandbox, &opts)?);
    let pid = hf.wait_running("web", T)?;
    let ino = |p: &str| fs::metadata(p).map(|m| m.ino());
    assert_eq!(
        ino(&format!("/proc/{}/ns/net", hf.pid()))?,
        ino(&ns_path)?,
        "the daemon is not in {ns_path}"
    );
    assert_eq!(
        ino(&format!("/proc/{pid}/ns/net"))?,
        ino(&ns_path)?,
        "the service is not in {ns_path}"
    );
    assert!(
        pin_dir(&inst).is_dir(),
        "nothing pinned at {}",
        pin_dir(&inst).display()
    );
    expect_answered_by(&ns, "--netns", "netnsflag", (8000, 8099), "web", pid)?;
    hf.stop()?;
    assert!(
        !pin_dir(&inst).exists(),
        "a clean exit left {}",
        pin_dir(&inst).display()
    );
    Ok(())
}
