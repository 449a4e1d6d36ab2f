//! holdfast as a service of systemd (issue 11), against the protocol's own
//! ends: a NOTIFY_SOCKET the test binds and reads (READY=1, STATUS=,
//! RELOADING=1 + MONOTONIC_USEC=, STOPPING=1, WATCHDOG=1, FDSTORE=1 with the
//! listeners), and sockets handed over by the reference provider
//! `systemd-socket-activate` (LISTEN_FDS, LISTEN_FDNAMES), used in place of
//! new ones when they fit the unit, closed with a warning when they do not.

use std::io::IoSliceMut;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use holdfast_testkit::{
    ask_tcp, netns_and_sandbox, netns_and_sandbox_with_tools, require, skip_unless, wait_for,
    Holdfast, Netns, RunOptions, SOCKET_ACTIVATE,
};
use nix::sys::signal::Signal;
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, SockaddrStorage, UnixAddr};

const T: Duration = Duration::from_secs(10);

/// The test's end of NOTIFY_SOCKET: every datagram, with the fds it carried.
struct NotifyEnd {
    sock: UnixDatagram,
}

struct Datagram {
    text: String,
    fds: Vec<OwnedFd>,
}

impl NotifyEnd {
    fn bind(path: &Path) -> Result<NotifyEnd> {
        let sock = UnixDatagram::bind(path).with_context(|| format!("bind {}", path.display()))?;
        // Anyone (holdfast runs as root, but be plain about it) may send.
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o666))?;
        sock.set_read_timeout(Some(Duration::from_millis(200)))?;
        Ok(NotifyEnd { sock })
    }

    /// The next datagram, `None` after 200 ms of silence (or an interruption).
    fn next(&self) -> Result<Option<Datagram>> {
        let mut buf = vec![0u8; 4096];
        let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 16]);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = match recvmsg::<UnixAddr>(
            self.sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(m) => m,
            // EINTR: a signal for another thread of the test process.
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => return Ok(None),
            Err(e) => bail!("recvmsg on the notify socket: {e}"),
        };
        let mut fds = Vec::new();
        for c in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                // SAFETY: SCM_RIGHTS fds are new in this process, owned by nobody else.
                fds.extend(
                    raw.into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        let n = msg.bytes;
        Ok(Some(Datagram {
            text: String::from_utf8_lossy(&buf[..n]).into_owned(),
            fds,
        }))
    }

    /// Reads until a datagram `accept`s, collecting all of them; fails after `timeout`.
    fn until(
        &self,
        what: &str,
        timeout: Duration,
        accept: impl Fn(&Datagram) -> bool,
    ) -> Result<Vec<Datagram>> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        while Instant::now() < deadline {
            if let Some(d) = self.next()? {
                let done = accept(&d);
                seen.push(d);
                if done {
                    return Ok(seen);
                }
            }
        }
        let texts: Vec<&str> = seen.iter().map(|d| d.text.as_str()).collect();
        bail!("no {what} within {timeout:?}; got {texts:?}")
    }
}

fn has_line(d: &Datagram, line: &str) -> bool {
    d.text.lines().any(|l| l == line)
}

fn local_addr(fd: &OwnedFd) -> Option<SocketAddr> {
    let a: SockaddrStorage = nix::sys::socket::getsockname(fd.as_raw_fd()).ok()?;
    a.as_sockaddr_in()
        .map(|a| SocketAddr::from((a.ip(), a.port())))
}

#[test]
fn holdfast_tells_its_manager_ready_status_reloading_stopping_watchdog_and_stores_its_listeners(
) -> Result<()> {
    let (ns, sandbox) = skip_unless!(netns_and_sandbox()?);
    sandbox.write_serve_unit("web", 8080, "")?;
    let path = sandbox.path().join("manager-notify.sock");
    let end = NotifyEnd::bind(&path)?;
    let opts = RunOptions {
        env: vec![
            ("NOTIFY_SOCKET".into(), path.to_string_lossy().into_owned()),
            ("WATCHDOG_USEC".into(), "400000".into()),
        ],
        ..RunOptions::default()
    };
    let mut hf = Holdfast::spawn_with(&ns, sandbox, &opts)?;
    let seen = end.until("READY=1", T, |d| has_line(d, "READY=1"))?;
    let ready = seen.last().expect("the READY=1 datagram");
    ensure!(
        ready.text.contains("STATUS=1 service: 1 "),
        "READY=1 without the status line: {:?}",
        ready.text
    );
    // The listener went to the fd store, named <service>.<socket>, before READY=1.
    let stored: Vec<&Datagram> = seen.iter().filter(|d| has_line(d, "FDSTORE=1")).collect();
    ensure!(
        stored.len() == 1 && has_line(stored[0], "FDNAME=web.web") && stored[0].fds.len() == 1,
        "want one FDSTORE=1 FDNAME=web.web with its fd; got {:?}",
        seen.iter().map(|d| &d.text).collect::<Vec<_>>()
    );
    ensure!(
        local_addr(&stored[0].fds[0]) == Some("127.0.0.1:8080".parse()?),
        "the stored fd is not web's listener: {:?}",
        local_addr(&stored[0].fds[0])
    );
    hf.wait_running("web", T)?;

    // WATCHDOG=1 at half of WATCHDOG_USEC (200 ms): at least 3 in a second.
    let start = Instant::now();
    let mut pings = 0;
    while start.elapsed() < Duration::from_secs(1) {
        if let Some(d) = end.next()? {
            pings += usize::from(has_line(&d, "WATCHDOG=1"));
        }
    }
    ensure!(pings >= 3, "{pings} WATCHDOG=1 in a second, want ≥ 3");

    // A reload is framed by RELOADING=1 (with MONOTONIC_USEC=) and READY=1.
    hf.cli_ok(&["reload"])?;
    let seen = end.until("RELOADING=1", T, |d| has_line(d, "RELOADING=1"))?;
    let reloading = seen.last().expect("the RELOADING=1 datagram");
    ensure!(
        reloading.text.lines().any(|l| l
            .strip_prefix("MONOTONIC_USEC=")
            .is_some_and(|n| n.parse::<u64>().is_ok_and(|n| n > 0))),
        "RELOADING=1 without MONOTONIC_USEC=: {:?}",
        reloading.text
    );
    end.until("READY=1 after the reload", T, |d| has_line(d, "READY=1"))?;

    hf.signal(Signal::SIGTERM)?;
    end.until("STOPPING=1", T, |d| has_line(d, "STOPPING=1"))?;
    let status = hf.wait_exit(T)?;
    ensure!(status.success(), "exit after SIGTERM: {status}");
    Ok(())
}

/// `systemd-socket-activate -l ADDR … --fdname=…` around the daemon.
fn socket_activate(listen: &[&str], names: &[&str]) -> Vec<String> {
    let mut w = vec!["/usr/bin/systemd-socket-activate".to_string()];
    for l in listen {
        w.push("-l".into());
        w.push((*l).into());
    }
    w.push(format!("--fdname={}", names.join(":")));
    w
}

fn answer(ns: &Netns, addr: &str) -> Result<String> {
    let addr: SocketAddr = addr.parse()?;
    Ok(ns.run(|| ask_tcp(addr, T))??)
}

#[test]
fn sockets_passed_in_listen_fds_are_used_in_place_when_they_fit_the_unit() -> Result<()> {
    let (ns, sandbox) = skip_unless!(netns_and_sandbox_with_tools(&[SOCKET_ACTIVATE])?);
    sandbox.write_serve_unit("web", 8080, "")?;
    sandbox.write_serve_unit("api", 8081, "")?;
    // web.web fits; api.api is bound elsewhere (closed, holdfast makes its
    // own); stray.x names no unit socket (closed).
    let opts = RunOptions {
        wrapper: socket_activate(
            &["127.0.0.1:8080", "127.0.0.1:9091", "127.0.0.1:9092"],
            &["web.web", "api.api", "stray.x"],
        ),
        ..RunOptions::default()
    };
    let mut hf = Holdfast::spawn_with(&ns, sandbox, &opts)?;
    // systemd-socket-activate execs holdfast on the first connection: this
    // one waits in the socket's backlog and is served by holdfast's service.
    let first = wait_for("systemd-socket-activate listening", T, || {
        answer(&ns, "127.0.0.1:8080").ok()
    })?;
    hf.wait_ready(T)?;
    let web = hf.wait_running("web", T)?;
    let api = hf.wait_running("api", T)?;
    ensure!(
        first == format!("web {web}\n"),
        "the first connection got {first:?}"
    );
    ensure!(answer(&ns, "127.0.0.1:8080")? == format!("web {web}\n"));
    ensure!(answer(&ns, "127.0.0.1:8081")? == format!("api {api}\n"));
    for closed in ["127.0.0.1:9091", "127.0.0.1:9092"] {
        let r = answer(&ns, closed);
        ensure!(r.is_err(), "{closed} still answers: {r:?}");
    }
    let log = hf.log();
    for words in [
        "using the socket passed in LISTEN_FDS as web.web",
        "closing the socket passed in LISTEN_FDS as api.api: it is bound to 127.0.0.1:9091, the unit to 127.0.0.1:8081",
        "closing the fd passed in LISTEN_FDS as \"stray.x\"",
    ] {
        ensure!(log.contains(words), "the log does not say {words:?}:\n{log}");
    }
    Ok(())
}

/// With the dispatcher, a passed socket bound to the unit's one address and
/// port (as holdfast binds such a socket, so what systemd's fd store gives
/// back after a crash) is used in place too: the service sees that address
/// and port, and the dispatcher steers to it.
#[test]
fn with_the_dispatcher_a_passed_socket_on_the_units_address_is_used_in_place() -> Result<()> {
    let (ns, sandbox) = skip_unless!(netns_and_sandbox_with_tools(&[SOCKET_ACTIVATE])?);
    sandbox.write_serve_unit("web", 8080, "")?;
    let opts = RunOptions {
        dispatcher: true,
        wrapper: socket_activate(&["127.0.0.1:8080"], &["web.web"]),
        ..RunOptions::default()
    };
    let mut hf = Holdfast::spawn_with(&ns, sandbox, &opts)?;
    wait_for("systemd-socket-activate listening", T, || {
        answer(&ns, "127.0.0.1:8080").ok()
    })?;
    hf.wait_ready(T)?;
    let rows = hf.bindings()?;
    let steered = if rows.is_empty() {
        Err(format!("no bindings: bind mode; the log:\n{}", hf.log()))
    } else {
        Ok(())
    };
    skip_unless!(require(
        "the sk_lookup dispatcher (holdfast bindings)",
        steered
    ));
    let web = hf.wait_running("web", T)?;
    ensure!(answer(&ns, "127.0.0.1:8080")? == format!("web {web}\n"));
    let report = hf.sandbox().wait_report("web", T, |r| r["pid"] == web)?;
    ensure!(
        report["sockets"][0]["address"] == serde_json::json!(["127.0.0.1", 8080]),
        "{report}"
    );
    let log = hf.log();
    ensure!(
        log.contains("using the socket passed in LISTEN_FDS as web.web"),
        "the passed socket was not used:\n{log}"
    );
    let rows = hf.bindings()?;
    ensure!(
        rows.first()
            .is_some_and(|r| r["lookups"].as_u64() >= Some(1) && r["socket_present"] == true),
        "not steered: {rows:?}"
    );
    hf.stop()
}
