//! The control socket and the CLI: only root is served, bad requests get error
//! replies without disturbing the daemon, `status --json` has the contract's
//! fields, start/stop/restart keep the sockets open, SIGTERM stops everything
//! gracefully, and the exit codes are the contract's.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use anyhow::{Context, Result};
use holdfast_testkit::{
    ask_tcp, control_request_as, holdfast_bin, holdfast_check, holdfast_cli, netns_and_sandbox,
    netns_or_skip, process_gone, run_bounded, skip_unless, wait_for, Holdfast, Netns, PeerOutcome,
    Sandbox,
};
use nix::errno::Errno;
use serde_json::Value;

const T: Duration = Duration::from_secs(10);

/// A daemon with one serve.py service `web` on TCP 127.0.0.1:8080, running and
/// past its start-up (its report is written, its SIGTERM handler in place).
fn web_daemon(ns: &Netns) -> Result<(Holdfast, i32)> {
    let sandbox = Sandbox::new()?;
    sandbox.write_serve_unit("web", 8080, "")?;
    let hf = Holdfast::start_in(ns, sandbox)?;
    let pid = hf.wait_running("web", T)?;
    hf.sandbox().wait_report("web", T, |r| r["pid"] == pid)?;
    Ok((hf, pid))
}

/// One request line from root, one reply line back.
fn ask_control(hf: &Holdfast, request: &[u8]) -> Result<Value> {
    let mut s = UnixStream::connect(hf.sandbox().control_socket())?;
    s.set_read_timeout(Some(T))?;
    s.set_write_timeout(Some(T))?;
    // The daemon may answer (and close) before it has read everything we send.
    let _ = s.write_all(request);
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line)?;
    serde_json::from_str(&line).with_context(|| format!("reply {line:?}"))
}

#[test]
fn non_root_peer_is_refused() -> Result<()> {
    let ns = skip_unless!(netns_or_skip());
    let (mut hf, _) = web_daemon(&ns)?;
    let sock = hf.sandbox().control_socket();
    let mode = std::fs::metadata(&sock)?.permissions().mode() & 0o7777;
    assert_eq!(mode, 0o600, "control socket mode {mode:o}");
    let request = b"{\"command\":\"status\",\"name\":null}\n";

    // (a) The file mode keeps others out.
    let got = control_request_as(65534, 65534, &sock, request)?;
    assert_eq!(got, PeerOutcome::ConnectFailed(Errno::EACCES));

    // (b) With the mode opened up, SO_PEERCRED still keeps them out.
    std::fs::set_permissions(hf.sandbox().state_dir(), PermissionsExt::from_mode(0o755))?;
    std::fs::set_permissions(&sock, PermissionsExt::from_mode(0o666))?;
    let got = control_request_as(65534, 65534, &sock, request)?;
    let PeerOutcome::Reply(reply) = got else {
        panic!("uid 65534 could not connect to a 0666 socket: {got:?}")
    };
    let reply: Value = serde_json::from_str(&reply).with_context(|| format!("reply {reply:?}"))?;
    assert_eq!(reply["ok"], false, "{reply}");
    assert!(
        reply["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("permission denied")),
        "{reply}"
    );
    assert!(reply.get("result").is_none_or(Value::is_null), "{reply}");

    // And root is still served.
    assert_eq!(hf.service("web")?["state"], "running");
    hf.stop()
}

#[test]
fn malformed_idle_and_oversized_requests_do_not_disturb_the_daemon() -> Result<()> {
    let ns = skip_unless!(netns_or_skip());
    let (mut hf, pid) = web_daemon(&ns)?;

    // A client that connects and says nothing must not block the others.
    let idle = UnixStream::connect(hf.sandbox().control_socket())?;
    idle.set_write_timeout(Some(T))?;
    (&idle).write_all(b"{\"command\":")?;

    for request in [
        &b"this is not json\n"[..],
        b"{\"command\":\"frobnicate\"}\n",
        b"{\"command\":\"stop\",\"name\":\"no-such-service\"}\n",
        b"[1,2,3]\n",
        b"\n",
    ] {
        let reply = ask_control(&hf, request)?;
        assert_eq!(
            reply["ok"],
            false,
            "request {:?} got {reply}",
            String::from_utf8_lossy(request)
        );
        assert!(reply["error"].is_string(), "{reply}");
    }
    // 4 MiB without a newline.
    let reply = ask_control(&hf, &vec![b'x'; 4 << 20])?;
    assert_eq!(reply["ok"], false, "oversized request got {reply}");

    // A good request on the raw protocol.
    let reply = ask_control(&hf, b"{\"command\":\"status\",\"name\":null}\n")?;
    assert_eq!(reply["ok"], true, "{reply}");
    assert!(reply["result"].is_array(), "{reply}");

    drop(idle);
    let now = hf.service("web")?;
    assert_eq!(now["pid"], pid, "the service was disturbed: {now}");
    hf.stop()
}

#[test]
fn status_fields_and_sigterm_stops_every_service_gracefully() -> Result<()> {
    let (ns, sandbox) = skip_unless!(netns_and_sandbox()?);
    sandbox.write_serve_unit("alpha", 8081, "")?;
    sandbox.write_serve_unit("beta", 8082, "")?;
    sandbox.write_unit("idle", "[service]\nexec = [\"sleep\", \"1000\"]\n")?;
    let (mut hf, alpha) = Holdfast::start_running(&ns, sandbox, "alpha")?;
    let beta = hf.wait_running("beta", T)?;
    let idle = hf.wait_running("idle", T)?;
    // Their reports say the SIGTERM handlers are in place.
    hf.sandbox()
        .wait_report("alpha", T, |r| r["pid"] == alpha)?;
    hf.sandbox().wait_report("beta", T, |r| r["pid"] == beta)?;

    let all = hf.status()?;
    let all = all.as_array().expect("array");
    let mut names: Vec<&str> = all.iter().filter_map(|s| s["name"].as_str()).collect();
    names.sort();
    assert_eq!(names, ["alpha", "beta", "idle"]);
    for s in all {
        assert_eq!(s["state"], "running", "{s}");
        assert!(s["pid"].as_i64().is_some_and(|p| p > 1), "pid: {s}");
        assert_eq!(s["restarts"], 0, "restarts: {s}");
        assert!(
            s["uptime_secs"].as_f64().is_some_and(|u| u >= 0.0),
            "uptime_secs: {s}"
        );
        assert!(s["sockets"].is_array(), "sockets: {s}");
    }
    let one = hf.cli_ok(&["status", "alpha", "--json"])?;
    let one: Value = serde_json::from_str(&one)?;
    assert_eq!(
        one.as_array().map(Vec::len),
        Some(1),
        "status alpha --json: {one}"
    );
    assert_eq!(one[0]["name"], "alpha");
    assert_eq!(one[0]["sockets"], serde_json::json!(["alpha"]));
    assert_eq!(hf.service("idle")?["sockets"], serde_json::json!([]));
    let table = hf.cli_ok(&["status"])?;
    for name in ["alpha", "beta", "idle"] {
        assert!(table.contains(name), "the table lacks {name}:\n{table}");
    }

    // A stopped service: pid and uptime null; it was asked with SIGTERM.
    hf.cli_ok(&["stop", "beta"])?;
    let b = hf.service("beta")?;
    assert_eq!(b["state"], "stopped", "{b}");
    assert_eq!(b["pid"], Value::Null, "{b}");
    assert_eq!(b["uptime_secs"], Value::Null, "{b}");
    let beta_term = hf.sandbox().out("beta.term");
    assert_eq!(
        std::fs::read_to_string(&beta_term).ok(),
        Some(format!("{beta}\n")),
        "beta was not stopped with SIGTERM"
    );

    // SIGTERM to the daemon: every service stopped gracefully, exit 0.
    let alpha_term = hf.sandbox().out("alpha.term");
    hf.stop()?;
    assert_eq!(
        std::fs::read_to_string(&alpha_term).ok(),
        Some(format!("{alpha}\n")),
        "alpha was not stopped with SIGTERM"
    );
    for pid in [alpha, idle] {
        assert!(process_gone(pid), "pid {pid} survived the daemon");
    }
    ns.expect_empty()
}

#[test]
fn stop_start_restart_keep_the_sockets_open() -> Result<()> {
    let ns = skip_unless!(netns_or_skip());
    let (mut hf, first) = web_daemon(&ns)?;
    let addr: SocketAddr = "127.0.0.1:8080".parse()?;

    hf.cli_ok(&["restart", "web"])?;
    let second = hf.wait_running("web", T)?;
    assert_ne!(second, first, "restart kept the old pid");
    wait_for("the old instance to go", T, || {
        process_gone(first).then_some(())
    })?;
    let answer = ns.run(|| ask_tcp(addr, T))??;
    assert_eq!(answer, format!("web {second}\n"));

    // Stopped: the socket stays open, a connection waits for the next start.
    hf.cli_ok(&["stop", "web"])?;
    assert_eq!(hf.service("web")?["state"], "stopped");
    let mut waiting = ns.run(|| TcpStream::connect_timeout(&addr, T))??;
    hf.cli_ok(&["start", "web"])?;
    let third = hf.wait_running("web", T)?;
    waiting.set_read_timeout(Some(T))?;
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut waiting, &mut answer)?;
    assert_eq!(answer, format!("web {third}\n"), "the waiting connection");

    // An unknown service is an error reply: exit 1.
    let out = hf.cli(&["stop", "no-such-service"])?;
    assert_eq!(out.status.code(), Some(1), "stop no-such-service: {out:?}");
    assert!(!out.stderr.is_empty(), "no message for an unknown service");
    hf.stop()
}

#[test]
fn cli_exit_codes() -> Result<()> {
    // 3: nothing listens on the control socket.
    let sandbox = Sandbox::new()?;
    let state = sandbox.state_dir();
    let out = holdfast_cli(&["status", "--state-dir", &state.to_string_lossy()])?;
    assert_eq!(
        out.status.code(),
        Some(3),
        "status without a daemon: {out:?}"
    );
    // 2: usage errors.
    let out = holdfast_cli(&["frobnicate"])?;
    assert_eq!(out.status.code(), Some(2), "unknown subcommand: {out:?}");
    let out = holdfast_cli(&["stop"])?;
    assert_eq!(out.status.code(), Some(2), "stop without a name: {out:?}");
    // 1: invalid units (details in units.rs).
    sandbox.write_unit("bad", "[service]\nexec = []\n")?;
    holdfast_check(&sandbox.units_dir(), 1).context("check on an invalid unit")?;
    Ok(())
}

/// A state dir, or its notify/ subdirectory, planted as a symlink into another user's
/// directory is refused (exit 1, naming it) before anything is created through it; the
/// symlink's target is left as it was (holdfast used to chmod it and bind sockets in it).
#[test]
fn a_symlinked_state_dir_or_notify_dir_is_refused() -> Result<()> {
    use std::os::unix::fs::symlink;
    let (ns, sandbox) = skip_unless!(netns_and_sandbox()?);
    sandbox.write_serve_unit("web", 8080, "")?;
    let attacker = sandbox.path().join("attacker");
    std::fs::create_dir(&attacker)?;
    std::fs::set_permissions(&attacker, PermissionsExt::from_mode(0o700))?;
    let state = sandbox.state_dir();
    let run = || -> Result<std::process::Output> {
        let mut cmd = ns.command(holdfast_bin())?;
        cmd.arg("run")
            .arg("--no-dispatcher")
            .arg("--units")
            .arg(sandbox.units_dir())
            .arg("--state-dir")
            .arg(&state)
            .env("NO_COLOR", "1");
        run_bounded(cmd, T)
    };
    std::fs::remove_dir(&state)?;
    symlink(&attacker, &state)?;
    let notify = state.join("notify");
    for (what, planted) in [
        ("the state dir", state.clone()),
        ("notify/", notify.clone()),
    ] {
        if what == "notify/" {
            std::fs::remove_file(&state)?;
            std::fs::create_dir(&state)?;
            symlink(&attacker, &notify)?;
        }
        let out = run()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{what} a symlink: {stderr}");
        assert!(
            stderr.contains(&format!("{} is a symlink", planted.display())),
            "the error names {what} as a symlink: {stderr}"
        );
        let mode = std::fs::metadata(&attacker)?.permissions().mode() & 0o7777;
        assert_eq!(mode, 0o700, "{what}: the symlink's target was chmod'ed");
        assert_eq!(
            std::fs::read_dir(&attacker)?.count(),
            0,
            "{what}: something was created in the symlink's target"
        );
    }
    ns.expect_empty()
}

#[test]
fn sigint_stops_gracefully_too() -> Result<()> {
    let ns = skip_unless!(netns_or_skip());
    let (mut hf, pid) = web_daemon(&ns)?;
    hf.signal(nix::sys::signal::Signal::SIGINT)?;
    let status = hf.wait_exit(holdfast_testkit::STOP_TIMEOUT)?;
    assert_eq!(status.code(), Some(0), "after SIGINT: {status}");
    assert_eq!(
        std::fs::read_to_string(hf.sandbox().out("web.term")).ok(),
        Some(format!("{pid}\n")),
        "web was not stopped with SIGTERM"
    );
    ns.expect_empty()
}
