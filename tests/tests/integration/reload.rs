//! `holdfast reload` and SIGHUP: a new unit starts, a removed one loses its
//! bindings before it stops and its socket closes after, a unit whose bindings
//! alone changed keeps its socket and its process, a changed `[service]`
//! restarts onto the same socket, a changed socket option moves the service to
//! a new socket, an unchanged unit is not touched, and a reload that cannot be
//! applied changes nothing and names every error. Bindings change atomically:
//! a client connecting in a loop through 30 reloads is never refused or misrouted.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use holdfast_testkit::{
    ask_tcp, netns_and_sandbox, netns_or_skip, process_gone, skip_unless, toml_array, wait_for,
    Holdfast, LoopClient, Netns, Sandbox, PYTHON,
};
use nix::sys::signal::Signal;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(10);

/// Prefixes the dispatched tests bind, made local in each test's namespace.
const PREFIXES: &[&str] = &["192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24"];

/// A server that ignores SIGTERM (so its stop lasts its stop-timeout), writes
/// the inode of its socket (`socket:[N]`) to argv[1], and answers each
/// connection on fd 3 with `"NAME PID\n"` as serve.py does.
const STUBBORN_PY: &str = r#"
import os, signal, socket, sys
signal.signal(signal.SIGTERM, signal.SIG_IGN)
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(os.readlink("/proc/self/fd/3"))
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
s = socket.socket(fileno=3)
s.setblocking(True)
reply = ("%s %d\n" % (os.environ.get("LISTEN_FDNAMES", "?"), os.getpid())).encode()
while True:
    c, _ = s.accept()
    c.sendall(reply)
    c.close()
"#;

/// Writes `units/NAME.toml`: [`STUBBORN_PY`] with stop-timeout 3 s (its stop
/// lasts that long) on `addresses` × port 80; returns the file where it writes
/// its socket's name, which exists once its SIGTERM handler is in place.
fn stubborn_unit(sandbox: &Sandbox, name: &str, addresses: &[&str]) -> Result<PathBuf> {
    let script = sandbox.path().join("stubborn.py");
    if !script.exists() {
        sandbox.write_script("stubborn.py", STUBBORN_PY)?;
    }
    let socket_file = sandbox.out(&format!("{name}.socket"));
    let exec = toml_array(&[
        PYTHON,
        "-I",
        "-S",
        &script.to_string_lossy(),
        &socket_file.to_string_lossy(),
    ]);
    let service = format!("exec = {exec}\nstop-timeout = \"3s\"");
    sandbox.write_tcp_unit(name, &service, name, addresses, &["80"], "")?;
    Ok(socket_file)
}

/// The daemon with the sk_lookup dispatcher, [`PREFIXES`] local, once service
/// `name` runs: the daemon and `name`'s pid; `None`: skip.
fn start_dispatched(ns: &Netns, sandbox: Sandbox, name: &str) -> Result<Option<(Holdfast, i32)>> {
    for prefix in PREFIXES {
        ns.add_local_route(prefix)?;
    }
    let Some(hf) = Holdfast::start_in_mode(ns, sandbox, true)? else {
        return Ok(None);
    };
    let pid = hf.wait_running(name, T)?;
    Ok(Some((hf, pid)))
}

/// What [`web_dispatched`] started: the namespace, the daemon, web's pid, its
/// report and the inode of the socket it reported.
type Web = (Netns, Holdfast, i32, Value, String);

/// A fresh namespace with `web` (serve.py on TCP `addresses` port 80, with the
/// `service_extra` and `socket_extra` lines) started with the dispatcher;
/// `None`: skip.
fn web_dispatched(
    addresses: &[&str],
    service_extra: &str,
    socket_extra: &str,
) -> Result<Option<Web>> {
    let Some((ns, sandbox)) = netns_and_sandbox()? else {
        return Ok(None);
    };
    sandbox.write_serve_ip_unit(
        "web",
        "tcp",
        addresses,
        &["80"],
        service_extra,
        socket_extra,
    )?;
    let Some((hf, pid)) = start_dispatched(&ns, sandbox, "web")? else {
        return Ok(None);
    };
    let (report, socket) = reported_socket(hf.sandbox(), "web", pid)?;
    Ok(Some((ns, hf, pid, report, socket)))
}

/// One connection from the calling thread (which must be inside the namespace).
fn ask(addr: &str) -> io::Result<String> {
    ask_tcp(addr.parse().expect("a literal address"), T)
}

/// Fails unless a connection to `addr` is refused.
fn expect_refused(addr: &str) -> Result<()> {
    match ask(addr) {
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Ok(()),
        other => bail!("{addr}: want connection refused, got {other:?}"),
    }
}

/// `holdfast reload`, its JSON summary.
fn reload(hf: &Holdfast) -> Result<Value> {
    let text = hf.cli_ok(&["reload"])?;
    serde_json::from_str(&text).with_context(|| format!("reload printed no JSON: {text:?}"))
}

/// Fails unless the summary lists exactly these names (in any order).
fn expect_summary(
    summary: &Value,
    added: &[&str],
    removed: &[&str],
    restarted: &[&str],
    rebound: &[&str],
    unchanged: &[&str],
) -> Result<()> {
    let sorted = |v: &Value| -> Result<Vec<String>> {
        let mut names: Vec<String> = v
            .as_array()
            .with_context(|| format!("not an array: {v}"))?
            .iter()
            .map(|n| n.as_str().map(String::from).context("not a name"))
            .collect::<Result<_>>()?;
        names.sort();
        Ok(names)
    };
    let want = json!({
        "added": added, "removed": removed, "restarted": restarted,
        "rebound": rebound, "unchanged": unchanged,
    });
    for key in ["added", "removed", "restarted", "rebound", "unchanged"] {
        let got = sorted(&summary[key]).with_context(|| format!("summary {summary}"))?;
        let want = sorted(&want[key])?;
        ensure!(
            got == want,
            "reload summary: {key} is {got:?}, want {want:?}; whole summary {summary}"
        );
    }
    Ok(())
}

/// The sockets (`socket:[N]`) among a process's open fds.
fn held_sockets(pid: i32) -> Result<BTreeSet<String>> {
    let dir = format!("/proc/{pid}/fd");
    let mut out = BTreeSet::new();
    for entry in fs::read_dir(&dir).with_context(|| format!("read {dir}"))? {
        if let Ok(link) = fs::read_link(entry?.path()) {
            let link = link.to_string_lossy().into_owned();
            if link.starts_with("socket:[") {
                out.insert(link);
            }
        }
    }
    Ok(out)
}

/// The service's socket (fd 3) as its serve.py report saw it, once the report
/// of the instance `pid` is written.
fn reported_socket(sandbox: &Sandbox, name: &str, pid: i32) -> Result<(Value, String)> {
    let report = sandbox.wait_report(name, T, |r| r["pid"] == pid)?;
    let socket = report["fds"]["3"]
        .as_str()
        .with_context(|| format!("no fd 3 in the report of {name}: {report}"))?
        .to_string();
    Ok((report, socket))
}

/// `holdfast bindings --json`, the rows of `service`.
fn bindings_of(hf: &Holdfast, service: &str) -> Result<Vec<Value>> {
    let text = hf.cli_ok(&["bindings", "--json"])?;
    let all: Value = serde_json::from_str(&text).with_context(|| format!("bindings: {text:?}"))?;
    Ok(all
        .as_array()
        .with_context(|| format!("bindings --json printed no array: {all}"))?
        .iter()
        .filter(|b| b["service"] == service)
        .cloned()
        .collect())
}

#[test]
fn reload_adds_and_removes_units_and_leaves_the_unchanged_alone() -> Result<()> {
    let (ns, sandbox) = skip_unless!(netns_and_sandbox()?);
    sandbox.write_serve_ip_unit("keep", "tcp", &["192.0.2.1/32"], &["80"], "", "")?;
    // `gone` ignores SIGTERM: its stop lasts its stop-timeout, time enough to see
    // that its binding is removed before the stop is over.
    let gone_socket_file = stubborn_unit(&sandbox, "gone", &["192.0.2.2/32"])?;
    let (mut hf, keep) = skip_unless!(start_dispatched(&ns, sandbox, "keep")?);
    let gone = hf.wait_running("gone", T)?;
    let gone_socket = wait_for("gone's socket inode", T, || {
        fs::read_to_string(&gone_socket_file).ok()
    })?;
    let _inside = ns.enter()?;
    for _ in 0..3 {
        assert_eq!(ask("192.0.2.1:80")?, format!("keep {keep}\n"));
    }
    assert_eq!(ask("192.0.2.2:80")?, format!("gone {gone}\n"));
    let keep_before = bindings_of(&hf, "keep")?;
    ensure!(keep_before.len() == 1, "bindings of keep: {keep_before:?}");
    ensure!(
        keep_before[0]["lookups"].as_u64() >= Some(3),
        "3 connections, yet {keep_before:?}"
    );
    ensure!(
        held_sockets(hf.pid())?.contains(&gone_socket),
        "the daemon does not hold gone's socket {gone_socket}"
    );

    fs::remove_file(hf.sandbox().units_dir().join("gone.toml"))?;
    hf.sandbox()
        .write_serve_ip_unit("added", "tcp", &["192.0.2.3/32"], &["80"], "", "")?;
    let summary = reload(&hf)?;
    expect_summary(&summary, &["added"], &["gone"], &[], &[], &["keep"])?;

    // Bindings first: refused at once, while the process, ignoring SIGTERM, still runs.
    expect_refused("192.0.2.2:80")?;
    ensure!(
        !process_gone(gone),
        "gone's process ended within its 3 s stop-timeout though it ignores SIGTERM"
    );
    // Then stopped (SIGKILL after stop-timeout), then its socket closed.
    wait_for("gone's process to end", Duration::from_secs(15), || {
        process_gone(gone).then_some(())
    })?;
    wait_for("the daemon to close gone's socket", T, || {
        (!held_sockets(hf.pid()).ok()?.contains(&gone_socket)).then_some(())
    })?;
    expect_refused("192.0.2.2:80")?;
    let names: Vec<Value> = hf
        .status()?
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| s["name"].clone())
        .collect();
    assert_eq!(names.len(), 2, "status after the reload: {names:?}");
    assert!(!names.contains(&json!("gone")), "{names:?}");

    // The new unit runs and answers.
    let added = hf.wait_running("added", T)?;
    assert_eq!(ask("192.0.2.3:80")?, format!("added {added}\n"));

    // The unchanged unit: same process, same restarts, same destination, counters kept.
    let now = hf.service("keep")?;
    assert_eq!(now["pid"], keep, "{now}");
    assert_eq!(now["restarts"], 0, "{now}");
    assert_eq!(now["state"], "running", "{now}");
    assert_eq!(ask("192.0.2.1:80")?, format!("keep {keep}\n"));
    let keep_after = bindings_of(&hf, "keep")?;
    ensure!(keep_after.len() == 1, "bindings of keep: {keep_after:?}");
    assert_eq!(
        keep_after[0]["destination"], keep_before[0]["destination"],
        "keep moved to another sockmap slot"
    );
    let (before, after) = (
        keep_before[0]["lookups"].as_u64().unwrap_or(0),
        keep_after[0]["lookups"].as_u64().unwrap_or(0),
    );
    ensure!(
        after > before,
        "keep's lookups went from {before} to {after} over a reload and one more connection: reset?"
    );
    drop(_inside);
    hf.stop()
}

#[test]
fn rebinding_keeps_the_socket_and_the_process() -> Result<()> {
    let (ns, mut hf, pid, _, socket) = skip_unless!(web_dispatched(&["192.0.2.0/25"], "", "")?);
    let destination = bindings_of(&hf, "web")?[0]["destination"].clone();
    let _inside = ns.enter()?;
    assert_eq!(ask("192.0.2.5:80")?, format!("web {pid}\n"));
    expect_refused("192.0.2.200:80")?;

    hf.sandbox().write_serve_ip_unit(
        "web",
        "tcp",
        &["192.0.2.128/25", "203.0.113.0/24"],
        &["80", "8080"],
        "",
        "",
    )?;
    let summary = reload(&hf)?;
    expect_summary(&summary, &[], &[], &[], &["web"], &[])?;

    let status = hf.service("web")?;
    assert_eq!(
        status["pid"], pid,
        "rebinding restarted the service: {status}"
    );
    assert_eq!(status["restarts"], 0, "{status}");
    assert_eq!(status["state"], "running", "{status}");
    ensure!(
        held_sockets(hf.pid())?.contains(&socket),
        "the daemon no longer holds web's socket {socket}"
    );
    for addr in ["192.0.2.200:80", "192.0.2.200:8080", "203.0.113.9:8080"] {
        assert_eq!(ask(addr)?, format!("web {pid}\n"), "{addr}");
    }
    for addr in ["192.0.2.5:80", "192.0.2.5:8080", "192.0.2.200:81"] {
        expect_refused(addr)?;
    }
    let rows = bindings_of(&hf, "web")?;
    let got: BTreeSet<(String, String)> = rows
        .iter()
        .map(|b| {
            (
                b["prefix"].as_str().unwrap_or("?").to_string(),
                b["ports"].as_str().unwrap_or("?").to_string(),
            )
        })
        .collect();
    let want: BTreeSet<(String, String)> = [
        ("192.0.2.128/25", "80"),
        ("192.0.2.128/25", "8080"),
        ("203.0.113.0/24", "80"),
        ("203.0.113.0/24", "8080"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(got, want, "bindings after the reload: {rows:?}");
    for row in &rows {
        assert_eq!(row["destination"], destination, "{row}");
        assert_eq!(row["socket_present"], true, "{row}");
    }
    drop(_inside);
    hf.stop()
}

/// A socket bound to its one address and port cannot keep its socket when
/// they change (getsockname() would tell the old ones): it moves to a new
/// socket, as a changed option does, and the service restarts onto it.
#[test]
fn a_one_address_socket_whose_address_changes_moves_to_a_new_socket() -> Result<()> {
    let (ns, mut hf, old, report, old_socket) =
        skip_unless!(web_dispatched(&["192.0.2.9/32"], "", "")?);
    assert_eq!(report["sockets"][0]["address"], json!(["192.0.2.9", 80]));

    hf.sandbox()
        .write_serve_ip_unit("web", "tcp", &["192.0.2.10/32"], &["80"], "", "")?;
    let summary = reload(&hf)?;
    expect_summary(&summary, &[], &[], &["web"], &[], &[])?;
    let new = wait_new_main(&hf, "web", old)?;
    let (report, new_socket) = reported_socket(hf.sandbox(), "web", new)?;
    assert_ne!(new_socket, old_socket);
    assert_eq!(report["sockets"][0]["address"], json!(["192.0.2.10", 80]));
    let _inside = ns.enter()?;
    assert_eq!(ask("192.0.2.10:80")?, format!("web {new}\n"));
    expect_refused("192.0.2.9:80")?;
    drop(_inside);
    hf.stop()
}

/// `[service]` lines choosing the restart mode, and how many connections of the
/// loop may fail (not be refused) in that mode: with stop-start, the old
/// instance may have accepted one just before its SIGTERM; with overlap it keeps
/// serving until the new one is ready, so none.
fn mode_lines(overlap: bool) -> (&'static str, usize) {
    if overlap {
        ("restart-mode = \"overlap\"", 0)
    } else {
        ("restart-mode = \"stop-start\"", 1)
    }
}

tests_of!(service_change_case:
    service_change_restarts_onto_the_same_socket_without_refusing => (false),
    service_change_restarts_in_overlap_mode_without_losing_a_connection => (true),
);

fn service_change_case(overlap: bool) -> Result<()> {
    let ns = skip_unless!(netns_or_skip());
    let (mode, may_fail) = mode_lines(overlap);
    let sandbox = Sandbox::new()?;
    sandbox.write_serve_unit("web", 8080, mode)?;
    let (mut hf, old) = Holdfast::start_running(&ns, sandbox, "web")?;
    let (_, socket) = reported_socket(hf.sandbox(), "web", old)?;
    let addr: SocketAddr = "127.0.0.1:8080".parse()?;
    let client = LoopClient::start(&ns, vec![(addr, "web".into())], Duration::from_millis(2), T)?;
    std::thread::sleep(Duration::from_millis(300));

    hf.sandbox().write_serve_unit(
        "web",
        8080,
        &format!("{mode}\nenvironment = {{ GENERATION = \"2\" }}"),
    )?;
    let summary = reload(&hf)?;
    expect_summary(&summary, &[], &[], &["web"], &[], &[])?;
    let new = wait_new_main(&hf, "web", old)?;
    let (report, new_socket) = reported_socket(hf.sandbox(), "web", new)?;
    assert_eq!(
        report["env"]["GENERATION"], "2",
        "the new [service] is not in use"
    );
    assert_eq!(new_socket, socket, "a [service] change replaced the socket");
    wait_for("the old instance to end", T, || {
        process_gone(old).then_some(())
    })?;
    std::thread::sleep(Duration::from_millis(300));
    let tally = client.finish()?;
    eprintln!("loop client: {tally:?}");
    tally.expect_no_loss(may_fail)?;
    assert!(
        tally.pids_of("web").contains(&new),
        "the new instance never answered the loop: {tally:?}"
    );
    hf.stop()
}

/// Waits until `name` runs with a main pid other than `old`; returns it.
fn wait_new_main(hf: &Holdfast, name: &str, old: i32) -> Result<i32> {
    let s = hf.wait_service(name, T, |s| {
        s["state"] == "running" && s["pid"].is_i64() && s["pid"] != old
    })?;
    Ok(s["pid"].as_i64().context("pid")? as i32)
}

#[test]
fn socket_option_change_moves_the_service_to_a_new_socket() -> Result<()> {
    socket_option_case(false, true, WIDE)
}

#[test]
fn socket_option_change_in_overlap_mode_loses_no_connection() -> Result<()> {
    socket_option_case(true, false, WIDE)
}

/// The old socket must be closed once the old instance is gone, also in overlap
/// mode, where the new main instance is still running when the old one exits.
#[test]
fn socket_option_change_in_overlap_mode_closes_the_old_socket() -> Result<()> {
    socket_option_case(true, true, WIDE)
}

/// A socket of one address and one port is bound there (getsockname() says
/// so), and so is its replacement, while the old one still listens: no
/// connection refused, in either restart mode.
#[test]
fn socket_option_change_of_a_one_address_socket_loses_no_connection() -> Result<()> {
    socket_option_case(false, true, ONE)?;
    socket_option_case(true, true, ONE)
}

/// What [`socket_option_case`] declares: a /24, or the one address the loop
/// client connects to.
const WIDE: &str = "192.0.2.0/24";
const ONE: &str = "192.0.2.9/32";

/// Where a steered socket on `declared` × port 80 is bound, as serve.py
/// reports it: the one address and port, or loopback.
fn expect_bound(report: &Value, declared: &str) -> Result<()> {
    let address = &report["sockets"][0]["address"];
    if declared == ONE {
        ensure!(
            *address == json!(["192.0.2.9", 80]),
            "getsockname() of a socket on 192.0.2.9/32 port 80: {address}"
        );
    } else {
        ensure!(
            address[0] == "127.0.0.1",
            "getsockname() of a wide steered socket: {address}"
        );
    }
    Ok(())
}

/// Binds (and listens on) 192.0.2.9:80 inside `ns` as a stranger of uid 0
/// would, with SO_REUSEPORT: it must not join holdfast's socket there.
fn stranger_binds_beside(ns: &Netns) -> Result<nix::Result<()>> {
    use nix::sys::socket::{
        bind, listen, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag, SockType,
        SockaddrIn,
    };
    use std::os::fd::AsRawFd;
    ns.run(|| -> nix::Result<()> {
        let fd = socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        setsockopt(&fd, sockopt::ReuseAddr, &true)?;
        setsockopt(&fd, sockopt::ReusePort, &true)?;
        bind(fd.as_raw_fd(), &SockaddrIn::new(192, 0, 2, 9, 80))?;
        listen(&fd, Backlog::new(1).expect("a small backlog"))
    })
}

/// A backlog change under a loop client: a new socket, a new instance on it, no
/// connection refused; `old_closed`: also wait for the daemon to close the old
/// socket. `declared`: [`WIDE`] or [`ONE`].
fn socket_option_case(overlap: bool, old_closed: bool, declared: &str) -> Result<()> {
    let (mode, may_fail) = mode_lines(overlap);
    let (ns, mut hf, old, report, old_socket) =
        skip_unless!(web_dispatched(&[declared], mode, "backlog = 16")?);
    expect_bound(&report, declared)?;
    assert_eq!(backlog_limit(&hf, "web")?, Some(16));
    let client = LoopClient::start(
        &ns,
        vec![("192.0.2.9:80".parse()?, "web".into())],
        Duration::from_millis(2),
        T,
    )?;
    std::thread::sleep(Duration::from_millis(300));

    hf.sandbox()
        .write_serve_ip_unit("web", "tcp", &[declared], &["80"], mode, "backlog = 32")?;
    let summary = reload(&hf)?;
    expect_summary(&summary, &[], &[], &["web"], &[], &[])?;
    let new = wait_new_main(&hf, "web", old)?;
    let (report, new_socket) = reported_socket(hf.sandbox(), "web", new)?;
    assert_ne!(new_socket, old_socket, "a new backlog, yet the same socket");
    expect_bound(&report, declared)?;
    assert_eq!(backlog_limit(&hf, "web")?, Some(32));
    if declared == ONE {
        // Old and new were bound to one address and port together, yet a
        // stranger cannot bind beside them.
        assert_eq!(
            stranger_binds_beside(&ns)?,
            Err(nix::errno::Errno::EADDRINUSE),
            "a SO_REUSEPORT socket of uid 0 bound beside the replaced socket"
        );
    }
    wait_for("the old instance to end", T, || {
        process_gone(old).then_some(())
    })?;
    if old_closed {
        wait_for("the daemon to close the old socket", T, || {
            (!held_sockets(hf.pid()).ok()?.contains(&old_socket)).then_some(())
        })?;
    }
    std::thread::sleep(Duration::from_millis(300));
    let tally = client.finish()?;
    eprintln!("loop client: {tally:?}");
    tally.expect_no_loss(may_fail)?;
    let _inside = ns.enter()?;
    assert_eq!(ask("192.0.2.9:80")?, format!("web {new}\n"));
    drop(_inside);
    hf.stop()
}

/// Without the dispatcher a socket is bound to its one address and port, so
/// its replacement cannot be bound while it is open. What Linux lets a
/// listening socket change (here the backlog) changes in place: same socket,
/// same process. What needs a new socket (here reuse-port) is refused with the
/// reason and what to do, and the running configuration keeps serving.
#[test]
fn socket_option_change_without_the_dispatcher() -> Result<()> {
    let ns = skip_unless!(netns_or_skip());
    let web = |sandbox: &Sandbox, socket_extra: &str| {
        sandbox.write_serve_ip_unit("web", "tcp", &["127.0.0.1/32"], &["8080"], "", socket_extra)
    };
    let sandbox = Sandbox::new()?;
    web(&sandbox, "backlog = 16")?;
    let (mut hf, old) = Holdfast::start_running(&ns, sandbox, "web")?;
    let (_, old_socket) = reported_socket(hf.sandbox(), "web", old)?;
    assert_eq!(backlog_limit(&hf, "web")?, Some(16));

    web(hf.sandbox(), "backlog = 32")?;
    let summary = reload(&hf)?;
    expect_summary(&summary, &[], &[], &[], &["web"], &[])?;
    assert_eq!(
        backlog_limit(&hf, "web")?,
        Some(32),
        "listen() again with the new backlog"
    );
    assert!(
        held_sockets(hf.pid())?.contains(&old_socket),
        "the backlog changes in place, on the same socket"
    );
    let answer = ns.run(|| ask("127.0.0.1:8080"))??;
    assert_eq!(answer, format!("web {old}\n"), "the same process serves");

    web(hf.sandbox(), "backlog = 32\nreuse-port = true")?;
    let stderr = hf.cli_err(&["reload"])?;
    for needle in ["needs a new socket", "web", "dispatcher"] {
        assert!(stderr.contains(needle), "{needle:?} missing in:\n{stderr}");
    }
    let answer = ns.run(|| ask("127.0.0.1:8080"))??;
    assert_eq!(
        answer,
        format!("web {old}\n"),
        "the running configuration serves"
    );
    assert_eq!(backlog_limit(&hf, "web")?, Some(32));
    hf.stop()
}

/// `socket_backlog_limit` of `service`'s socket, from `holdfast metrics --json`.
fn backlog_limit(hf: &Holdfast, service: &str) -> Result<Option<u64>> {
    let text = hf.cli_ok(&["metrics", "--json"])?;
    let m: Value = serde_json::from_str(&text).with_context(|| format!("metrics: {text:?}"))?;
    let socket = m["sockets"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["service"] == service)
        .with_context(|| format!("no socket of {service} in {m}"))?;
    Ok(socket["backlog_limit"].as_u64())
}

#[test]
fn a_reload_that_cannot_be_applied_changes_nothing_and_names_every_error() -> Result<()> {
    let (ns, sandbox) = skip_unless!(netns_and_sandbox()?);
    sandbox.write_serve_unit("a", 8081, "")?;
    sandbox.write_serve_unit("b", 8082, "")?;
    let (mut hf, a) = Holdfast::start_running(&ns, sandbox, "a")?;
    let b = hf.wait_running("b", T)?;
    let sb = hf.sandbox();
    let a_text = fs::read_to_string(sb.units_dir().join("a.toml"))?;

    // Two invalid files (one changed, one new) and a valid new unit.
    let a_path = sb.write_unit(
        "a",
        &a_text.replacen("[service]\n", "[service]\nrestart = \"sometimes\"\n", 1),
    )?;
    let c_path = sb.write_unit(
        "c",
        "[service]\nexec = [\"/bin/true\"]\n\n[[socket]]\nprotocol = \"tcp\"\naddresses = [\"127.0.0.1/32\"]\nports = [\"99999\"]\n",
    )?;
    sb.write_serve_unit("d", 8084, "")?;
    let stderr = hf.cli_err(&["reload"]).context("reload of invalid units")?;
    for needle in [
        format!("{}:2:", a_path.display()),
        "service.restart".to_string(),
        format!("{}:7:", c_path.display()),
        "socket[0].ports[0]".to_string(),
        "hint:".to_string(),
    ] {
        assert!(
            stderr.contains(&needle),
            "the reload's errors do not name {needle:?}:\n{stderr}"
        );
    }
    expect_untouched(&hf, &ns, &[("a", a, 8081), ("b", b, 8082)], &[8084])?;

    // Valid units, but a socket that cannot be opened: the port is taken.
    sb.write_unit("a", &a_text)?;
    fs::remove_file(&c_path)?;
    sb.write_serve_unit("e", 8085, "")?;
    let squatter = ns.run(|| TcpListener::bind("127.0.0.1:8085"))??;
    let stderr = hf
        .cli_err(&["reload"])
        .context("reload onto a taken port")?;
    let e_path = sb.units_dir().join("e.toml");
    assert!(
        stderr.contains(&e_path.display().to_string()) && stderr.contains("\"e\""),
        "the error does not name e.toml and its socket:\n{stderr}"
    );
    expect_untouched(&hf, &ns, &[("a", a, 8081), ("b", b, 8082)], &[8084])?;

    // Once the port is free the same reload goes through.
    drop(squatter);
    let summary = reload(&hf)?;
    expect_summary(&summary, &["d", "e"], &[], &[], &[], &["a", "b"])?;
    let d = hf.wait_running("d", T)?;
    let e = hf.wait_running("e", T)?;
    let _inside = ns.enter()?;
    assert_eq!(ask("127.0.0.1:8084")?, format!("d {d}\n"));
    assert_eq!(ask("127.0.0.1:8085")?, format!("e {e}\n"));
    drop(_inside);
    hf.stop()
}

/// Exactly `running` (name, pid, port) run, each answering on its port with the
/// same pid and no restart; `refused` ports refuse.
fn expect_untouched(
    hf: &Holdfast,
    ns: &Netns,
    running: &[(&str, i32, u16)],
    refused: &[u16],
) -> Result<()> {
    let status = hf.status()?;
    let names: BTreeSet<&str> = status
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["name"].as_str())
        .collect();
    let want: BTreeSet<&str> = running.iter().map(|(n, _, _)| *n).collect();
    ensure!(names == want, "services {names:?}, want {want:?}: {status}");
    for (name, pid, port) in running {
        let s = hf.service(name)?;
        ensure!(
            s["pid"] == *pid && s["restarts"] == 0 && s["state"] == "running",
            "{name} was touched: {s}"
        );
        let answer = ns.run(|| ask(&format!("127.0.0.1:{port}")))??;
        ensure!(answer == format!("{name} {pid}\n"), "{name}: {answer:?}");
    }
    for port in refused {
        ns.run(|| expect_refused(&format!("127.0.0.1:{port}")))??;
    }
    Ok(())
}

#[test]
fn sighup_reloads_like_the_cli() -> Result<()> {
    let (ns, sandbox) = skip_unless!(netns_and_sandbox()?);
    sandbox.write_serve_unit("a", 8081, "")?;
    let (mut hf, a) = Holdfast::start_running(&ns, sandbox, "a")?;

    // Added by SIGHUP.
    hf.sandbox().write_serve_unit("b", 8082, "")?;
    hf.signal(Signal::SIGHUP)?;
    let b = hf.wait_running("b", T)?;
    expect_untouched(&hf, &ns, &[("a", a, 8081), ("b", b, 8082)], &[])?;

    // Refused by SIGHUP: logged, nothing changes.
    let c_path = hf.sandbox().write_unit(
        "c",
        "[service]\nexec = [\"/bin/true\"]\nrestart = \"sometimes\"\n",
    )?;
    hf.sandbox().write_serve_unit("d", 8084, "")?;
    hf.signal(Signal::SIGHUP)?;
    let needle = format!("{}:3:", c_path.display());
    wait_for("the refused reload in the daemon's log", T, || {
        let log = hf.log();
        (log.contains("reload refused") && log.contains(&needle)).then_some(())
    })?;
    expect_untouched(&hf, &ns, &[("a", a, 8081), ("b", b, 8082)], &[8084])?;

    // Removed by SIGHUP.
    fs::remove_file(&c_path)?;
    fs::remove_file(hf.sandbox().units_dir().join("d.toml"))?;
    fs::remove_file(hf.sandbox().units_dir().join("b.toml"))?;
    hf.signal(Signal::SIGHUP)?;
    wait_for("b to be removed", T, || {
        (hf.status().ok()?.as_array()?.len() == 1).then_some(())
    })?;
    wait_for("b's process to end", T, || process_gone(b).then_some(()))?;
    expect_untouched(&hf, &ns, &[("a", a, 8081)], &[8082, 8084])?;
    hf.stop()
}

/// The two unit sets the atomicity test alternates between. Both bind X
/// (192.0.2.1:80 → x) and Z (198.51.100.7:80 → z); set B adds bindings around
/// them, among them wider and narrower prefixes of X's that belong to other
/// services (z and w), so that a lookup seeing half a set would misroute X.
fn write_set(sandbox: &Sandbox, b: bool) -> Result<()> {
    if b {
        sandbox.write_serve_ip_unit(
            "x",
            "tcp",
            &["192.0.2.1/32", "203.0.113.0/24"],
            &["80", "82"],
            "",
            "",
        )?;
        sandbox.write_serve_ip_unit(
            "z",
            "tcp",
            &["192.0.2.0/24", "198.51.100.0/24"],
            &["80"],
            "",
            "",
        )?;
        sandbox.write_serve_ip_unit("w", "tcp", &["192.0.2.0/28"], &["80-81"], "", "")?;
    } else {
        sandbox.write_serve_ip_unit("x", "tcp", &["192.0.2.1/32"], &["80"], "", "")?;
        sandbox.write_serve_ip_unit("z", "tcp", &["198.51.100.0/24"], &["80"], "", "")?;
        let w = sandbox.units_dir().join("w.toml");
        if w.exists() {
            fs::remove_file(w)?;
        }
    }
    Ok(())
}

#[test]
fn bindings_change_atomically_while_a_client_connects_in_a_loop() -> Result<()> {
    const RELOADS: usize = 30;
    let (ns, sandbox) = skip_unless!(netns_and_sandbox()?);
    write_set(&sandbox, false)?;
    let (mut hf, x) = skip_unless!(start_dispatched(&ns, sandbox, "x")?);
    let z = hf.wait_running("z", T)?;
    let client = LoopClient::start(
        &ns,
        vec![
            ("192.0.2.1:80".parse()?, "x".into()),
            ("198.51.100.7:80".parse()?, "z".into()),
        ],
        Duration::from_millis(1),
        T,
    )?;
    let started = std::time::Instant::now();
    let mut w = 0;
    for round in 0..RELOADS {
        let b = round % 2 == 0;
        write_set(hf.sandbox(), b)?;
        let summary = reload(&hf).with_context(|| format!("reload {round}"))?;
        if b {
            expect_summary(&summary, &["w"], &[], &[], &["x", "z"], &[])
                .with_context(|| format!("reload {round}"))?;
            w = hf.wait_running("w", T)?;
        } else {
            expect_summary(&summary, &[], &["w"], &[], &["x", "z"], &[])
                .with_context(|| format!("reload {round}"))?;
            // Re-adding w while its removal is still under way is another test's
            // matter (a_unit_added_back_while_its_removal_is_stopping).
            wait_for("the removed w to end", T, || process_gone(w).then_some(()))?;
        }
        // Let the client make a few connections in each set.
        std::thread::sleep(Duration::from_millis(30));
    }
    let took = started.elapsed();
    let tally = client.finish()?;
    eprintln!(
        "{RELOADS} reloads in {took:?}; loop client: answered {}, refused {}, misrouted {:?}, failed {:?}, pids {:?}",
        tally.answered, tally.refused, tally.misrouted, tally.failed, tally.pids
    );
    tally.expect_no_loss(0)?;
    assert!(
        tally.answered >= 2 * RELOADS as u64,
        "too few connections to prove anything: {tally:?}"
    );
    // Rebinding never restarted them.
    assert_eq!(tally.pids_of("x"), BTreeSet::from([x]), "{tally:?}");
    assert_eq!(tally.pids_of("z"), BTreeSet::from([z]), "{tally:?}");
    hf.stop()
}

/// A unit removed by one reload and added back by the next while its old
/// instance is still stopping (with the dispatcher: in bind mode the old socket,
/// still open, makes the reload refuse cleanly with EADDRINUSE): the second
/// reload adds it, with a notify socket of its own (the removed one's went with
/// the removal).
#[test]
fn a_unit_added_back_while_its_removal_is_stopping() -> Result<()> {
    let (ns, sandbox) = skip_unless!(netns_and_sandbox()?);
    let socket_file = stubborn_unit(&sandbox, "w", &["192.0.2.0/25"])?;
    let unit = fs::read_to_string(sandbox.units_dir().join("w.toml"))?;
    sandbox.write_serve_ip_unit("a", "tcp", &["192.0.2.200/32"], &["80"], "", "")?;
    let (mut hf, old) = skip_unless!(start_dispatched(&ns, sandbox, "w")?);
    // Its SIGTERM handler is in place once it has written its socket's name.
    wait_for("w's socket inode", T, || {
        fs::read_to_string(&socket_file).ok()
    })?;
    fs::remove_file(hf.sandbox().units_dir().join("w.toml"))?;
    expect_summary(&reload(&hf)?, &[], &["w"], &[], &[], &["a"])?;
    ensure!(!process_gone(old), "w ended before its stop-timeout");
    hf.sandbox().write_unit("w", &unit)?;
    // Either refused (exit 1, nothing changed) or added: never "ok" without it.
    let out = hf.cli(&["reload"])?;
    eprintln!("the reload that adds w back: {out:?}");
    if out.status.success() {
        let summary: Value = serde_json::from_slice(&out.stdout)?;
        expect_summary(&summary, &["w"], &[], &[], &[], &["a"])?;
        let new = hf.wait_running("w", Duration::from_secs(15))?;
        ensure!(new != old, "the removed instance came back as the new one");
        let answer = ns.run(|| ask("192.0.2.7:80"))??;
        assert_eq!(answer, format!("w {new}\n"));
    } else {
        let s = hf.status()?;
        ensure!(
            s.as_array().is_some_and(|a| a.len() == 1),
            "a refused reload changed the services: {s}"
        );
    }
    hf.stop()
}
