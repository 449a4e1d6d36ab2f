//! Tests of the test harness itself, independent of the daemon: namespaces are
//! isolated, entered per thread and cleaned up; the reference service reports a
//! correct hand-off as correct and a wrong one as wrong; the unprivileged peer
//! really is unprivileged.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use holdfast_testkit::{
    ask_tcp, ask_udp, check_handoff, control_request_as, netns_and_sandbox, netns_or_skip,
    process_gone, require_root, skip_unless, ExpectSocket, HandedFds, PeerOutcome, Sandbox,
};
use nix::errno::Errno;
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};

const T: Duration = Duration::from_secs(5);

fn current_netns() -> String {
    std::fs::read_link("/proc/thread-self/ns/net")
        .expect("readlink /proc/thread-self/ns/net")
        .to_string_lossy()
        .into_owned()
}

#[test]
fn netns_is_private_entered_per_thread_and_restored() -> Result<()> {
    let a = skip_unless!(netns_or_skip());
    let b = skip_unless!(netns_or_skip());
    let before = current_netns();
    // A thread that already exists keeps its namespace when this one moves.
    let (go, wait) = std::sync::mpsc::channel::<()>();
    let other = std::thread::spawn(move || {
        wait.recv().expect("go");
        current_netns()
    });
    {
        let _inside = a.enter()?;
        assert_ne!(current_netns(), before, "enter() did not move the thread");
        // lo is up: a loopback connection works.
        let l = TcpListener::bind("127.0.0.1:7000")?;
        TcpStream::connect("127.0.0.1:7000")?;
        drop(l);
        go.send(())?;
        let other = other.join().expect("thread");
        assert_eq!(other, before, "enter() moved more than the current thread");
    }
    assert_eq!(
        current_netns(),
        before,
        "the guard did not restore the namespace"
    );

    // The same port in two namespaces: no conflict.
    let la = a.run(|| TcpListener::bind("127.0.0.1:7001"))??;
    let lb = b.run(|| TcpListener::bind("127.0.0.1:7001"))??;
    drop((la, lb));
    Ok(())
}

#[test]
fn local_routes_make_a_whole_prefix_local() -> Result<()> {
    let ns = skip_unless!(netns_or_skip());
    ns.add_local_route("192.0.2.0/24")?;
    ns.add_local_route("2001:db8::/64")?;
    ns.run(|| -> Result<()> {
        let l = TcpListener::bind("192.0.2.77:80").context("bind inside the local prefix")?;
        TcpStream::connect("192.0.2.77:80").context("connect inside the local prefix")?;
        drop(l);
        Ok(())
    })??;
    let routes = Command::new("ip")
        .args(["-n", ns.name(), "-6", "route", "show", "table", "local"])
        .output()?;
    let routes = String::from_utf8_lossy(&routes.stdout);
    assert!(
        routes.contains("2001:db8::/64"),
        "no IPv6 local route: {routes}"
    );
    Ok(())
}

#[test]
fn dropping_netns_deletes_it_and_kills_what_is_left_inside() -> Result<()> {
    let ns = skip_unless!(netns_or_skip());
    let path = ns.path().to_owned();
    let mut sleeper = ns.run(|| Command::new("sleep").arg("1000").spawn())??;
    assert_eq!(ns.pids()?, vec![sleeper.id() as i32]);
    drop(ns);
    assert!(!path.exists(), "{} still exists", path.display());
    let status = sleeper.wait()?;
    assert!(!status.success(), "sleep was not killed: {status}");
    Ok(())
}

/// Spawns serve.py with `fds` at 3, 4, … and LISTEN_FDS = `count`, the way a
/// correct supervisor would (LISTEN_PID its own pid) or, with `own_pid` false,
/// with LISTEN_PID=1.
fn spawn_reference(
    sandbox: &Sandbox,
    fds: &[BorrowedFd<'_>],
    count: usize,
    names: &[&str],
    own_pid: bool,
) -> Result<Child> {
    let exec = sandbox.serve_exec("ref")?;
    let argv: Vec<String> = serde_json::from_str(&exec)?;
    let mut handed = if own_pid {
        HandedFds::new(&argv[0], fds, names)?
    } else {
        HandedFds::for_another_pid(&argv[0], fds, names, 1)?
    };
    handed
        .command()
        .args(&argv[1..])
        .env("LISTEN_FDS", count.to_string())
        .stdout(Stdio::null());
    handed.spawn()
}

#[test]
fn reference_service_confirms_a_correct_handoff() -> Result<()> {
    let (ns, sandbox) = skip_unless!(netns_and_sandbox()?);
    let tcp = ns.run(|| TcpListener::bind("127.0.0.1:8001"))??;
    let udp = ns.run(|| UdpSocket::bind("[::1]:8053"))??;
    let mut child = spawn_reference(
        &sandbox,
        &[tcp.as_fd(), udp.as_fd()],
        2,
        &["web", "dns"],
        true,
    )?;
    drop((tcp, udp));
    let report = sandbox.wait_report("ref", T, |_| true)?;
    let result = check_handoff(
        &report,
        &[
            ExpectSocket::tcp("web", "127.0.0.1", 8001),
            ExpectSocket::udp("dns", "::1", 8053),
        ],
    );
    let pid = report["pid"].clone();
    let answers = ns.run(|| -> Result<_> {
        Ok((
            ask_tcp("127.0.0.1:8001".parse()?, T)?,
            ask_udp("[::1]:8053".parse()?, T)?,
        ))
    })?;
    child.kill()?;
    child.wait()?;
    result?;
    let (tcp_answer, udp_answer) = answers?;
    assert_eq!(tcp_answer, format!("web {pid}\n"));
    assert_eq!(udp_answer, format!("dns {pid}\n"));
    Ok(())
}

#[test]
fn reference_service_exposes_a_wrong_handoff() -> Result<()> {
    let (ns, sandbox) = skip_unless!(netns_and_sandbox()?);
    let a = ns.run(|| TcpListener::bind("127.0.0.1:8001"))??;
    let b = ns.run(|| TcpListener::bind("127.0.0.1:8002"))??;
    // LISTEN_PID=1, and fd 4 leaks in uncounted.
    let mut child = spawn_reference(&sandbox, &[a.as_fd(), b.as_fd()], 1, &["web"], false)?;
    let report = sandbox.wait_report("ref", T, |_| true)?;
    child.kill()?;
    child.wait()?;
    let err = check_handoff(&report, &[ExpectSocket::tcp("web", "127.0.0.1", 8001)])
        .expect_err("a wrong LISTEN_PID and a leaked fd must be caught");
    let err = format!("{err:#}");
    assert!(err.contains("LISTEN_PID"), "{err}");
    assert!(err.contains("open fds"), "{err}");
    // And the right socket expected at the wrong place is caught too.
    let err = check_handoff(&report, &[ExpectSocket::tcp("web", "127.0.0.1", 8002)])
        .expect_err("a wrong address must be caught");
    assert!(format!("{err:#}").contains("getsockname"), "{err:#}");
    Ok(())
}

#[test]
fn unprivileged_peer_is_refused_by_mode_and_seen_as_its_uid() -> Result<()> {
    if !require_root("root, to drop to uid 65534") {
        return Ok(());
    }
    let sandbox = Sandbox::new()?;
    let path = sandbox.path().join("toy.sock");
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let got = control_request_as(65534, 65534, &path, b"{}\n")?;
    assert_eq!(got, PeerOutcome::ConnectFailed(Errno::EACCES));

    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o666))?;
    let server = std::thread::spawn(move || -> Result<(u32, String)> {
        let (mut conn, _) = listener.accept()?;
        let cred = getsockopt(&conn, PeerCredentials)?;
        let mut line = String::new();
        BufReader::new(&conn).read_line(&mut line)?;
        writeln!(conn, "uid {} said {}", cred.uid(), line.trim())?;
        Ok((cred.uid(), line))
    });
    let got = control_request_as(65534, 65534, &path, b"hello\n")?;
    let (uid, line) = server.join().expect("toy server")?;
    assert_eq!(uid, 65534);
    assert_eq!(line, "hello\n");
    assert_eq!(got, PeerOutcome::Reply("uid 65534 said hello".into()));
    Ok(())
}

#[test]
fn process_gone_sees_exit_and_zombies() -> Result<()> {
    let mut child = Command::new("sleep").arg("1000").spawn()?;
    let pid = child.id() as i32;
    assert!(!process_gone(pid));
    child.kill()?;
    // Not reaped yet: a zombie counts as gone.
    holdfast_testkit::wait_for("zombie", T, || process_gone(pid).then_some(()))?;
    child.wait()?;
    assert!(process_gone(pid));
    Ok(())
}
