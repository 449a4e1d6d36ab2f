//! gunicorn (Debian's, installed by `cargo xtask bootstrap`) under holdfast,
//! unchanged: a Python service that takes its listener from LISTEN_FDS (its
//! `gunicorn.systemd`, when LISTEN_PID is its own pid) and writes READY=1 and
//! STATUS= to NOTIFY_SOCKET itself. It becomes ready, answers, and an overlap
//! restart under a looping client costs no request.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use holdfast_testkit::{
    netns_with_tools, process_gone, skip_unless, toml_array, wait_for, Holdfast, LoopClient,
    Sandbox,
};

const T: Duration = Duration::from_secs(10);
const GUNICORN: &str = "/usr/bin/gunicorn";

const APP: &str = "import os\n\
def app(environ, start_response):\n\
\x20   start_response('200 OK', [('Content-Type', 'text/plain')])\n\
\x20   return [b'hello from gunicorn worker %d\\n' % os.getpid()]\n";

/// One HTTP/1.0 GET; returns the status line and the body.
fn get(addr: SocketAddr) -> Result<(String, String)> {
    let mut s = TcpStream::connect_timeout(&addr, T).context("connect")?;
    s.set_read_timeout(Some(T))?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text).context("read the response")?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("no HTTP response: {text:?}"))?;
    let status = head.lines().next().unwrap_or_default().to_owned();
    Ok((status, body.to_owned()))
}

/// A sandbox with the unit `gunicorn`: `workers` workers of [`APP`], a notify
/// service (with `service_extra`) on socket "http", 127.0.0.1 port `port`.
/// No --bind: gunicorn takes the LISTEN_FDS socket.
fn gunicorn_sandbox(workers: &str, service_extra: &str, port: &str) -> Result<Sandbox> {
    let sandbox = Sandbox::new()?;
    sandbox.write_script("app.py", APP)?;
    let dir = sandbox.path().to_string_lossy().into_owned();
    let exec = toml_array(&[GUNICORN, "--workers", workers, "--chdir", &dir, "app:app"]);
    sandbox.write_tcp_unit(
        "gunicorn",
        &format!("exec = {exec}\ntype = \"notify\"\nstart-timeout = \"20s\"\n{service_extra}"),
        "http",
        &["127.0.0.1/32"],
        &[port],
        "",
    )?;
    Ok(sandbox)
}

/// Fails unless gunicorn (master `pid`) has logged that it listens at `addr`:
/// on the socket holdfast handed it (LISTEN_FDS), not one of its own.
fn says_it_listens_at(hf: &Holdfast, addr: &str, pid: i32) -> Result<()> {
    let log = hf.log();
    ensure!(
        log.contains(&format!("Listening at: http://{addr} ({pid})")),
        "gunicorn ({pid}) does not say it listens at {addr} (on the LISTEN_FDS socket):\n{log}"
    );
    Ok(())
}

#[test]
fn gunicorn_gets_ready_answers_and_survives_an_overlap_restart() -> Result<()> {
    let ns = skip_unless!(netns_with_tools(&[GUNICORN]));
    let sandbox = gunicorn_sandbox("2", "restart = \"always\"", "8080")?;
    let mut hf = Holdfast::start_in(&ns, sandbox)?;
    let old = hf.wait_running("gunicorn", Duration::from_secs(20))?;
    let s = hf.service("gunicorn")?;
    assert_eq!(s["status_text"], "Gunicorn arbiter booted", "{s}");
    let addr: SocketAddr = "127.0.0.1:8080".parse()?;
    let (status, body) = ns.run(|| get(addr))??;
    assert!(status.ends_with(" 200 OK"), "{status}: {body}");
    assert!(body.starts_with("hello from gunicorn worker "), "{body:?}");
    // Its own line about what it listens on: the socket holdfast made, not its
    // default 127.0.0.1:8000.
    says_it_listens_at(&hf, "127.0.0.1:8080", old)?;

    // A client loops (a new connection per request) during an overlap restart.
    let client = LoopClient::each_round(&ns, Duration::from_millis(5), move |tally| {
        match get(addr) {
            Ok((status, _)) if status.contains(" 200 ") => tally.answered += 1,
            Ok((status, body)) => tally.failed.push(format!("{status}: {body}")),
            Err(e) => tally.failed.push(format!("{e:#}")),
        }
    })?;
    std::thread::sleep(Duration::from_millis(300));
    let out = hf.cli(&["restart", "gunicorn", "--mode", "overlap"]);
    // Long enough for the new workers to have booted and answered.
    std::thread::sleep(Duration::from_millis(1500));
    let tally = client.finish()?;
    let out = out?;
    eprintln!("client during the overlap restart: {tally:?}");
    if !out.status.success() {
        bail!(
            "overlap restart of gunicorn: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    ensure!(
        tally.failed.is_empty(),
        "client errors during the overlap restart: {:?}",
        tally.failed
    );
    ensure!(
        tally.answered > 10,
        "only {} requests answered",
        tally.answered
    );

    let s = hf.service("gunicorn")?;
    let new = s["pid"].as_i64().context("pid")? as i32;
    ensure!(
        new != old && s["state"] == "running" && s["ready"] == true,
        "{s}"
    );
    wait_for(
        "the old arbiter to be gone",
        Duration::from_secs(15),
        || process_gone(old).then_some(()),
    )?;
    let (status, _) = ns.run(|| get(addr))??;
    assert!(status.ends_with(" 200 OK"), "{status}");
    hf.stop()
}

/// With the sk_lookup dispatcher the socket is steered, and bound to the one
/// address and port the unit declares, so gunicorn (which prints
/// getsockname() of the socket it was handed) says where it listens, not a
/// loopback port the kernel chose.
#[test]
fn with_the_dispatcher_gunicorn_logs_its_declared_address_and_port() -> Result<()> {
    let ns = skip_unless!(netns_with_tools(&[GUNICORN]));
    let sandbox = gunicorn_sandbox("1", "", "7401")?;
    let mut hf = skip_unless!(Holdfast::start_in_mode(&ns, sandbox, true)?);
    let pid = hf.wait_running("gunicorn", Duration::from_secs(20))?;
    let (status, body) = ns.run(|| get("127.0.0.1:7401".parse()?))??;
    assert!(status.ends_with(" 200 OK"), "{status}: {body}");
    says_it_listens_at(&hf, "127.0.0.1:7401", pid)?;
    hf.expect_first_binding_counted("lookups", "the request was not steered")?;
    hf.stop()
}
