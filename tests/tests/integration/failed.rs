//! What a failed service's clients see (as systemd closes a failed socket
//! unit's listeners): once the start limit has made the service `failed`, a
//! client is refused at once, and one that was waiting in the backlog is
//! reset, not left hanging until its own timeout; `holdfast start` listens on
//! the same socket again and the service serves. In bind mode and with the
//! dispatcher (whose bindings for the service are withdrawn meanwhile).

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use holdfast_testkit::{
    ask_tcp, netns_and_sandbox, restart_always, skip_unless, toml_str, Holdfast, PYTHON,
};

const T: Duration = Duration::from_secs(10);
const ADDR: &str = "127.0.0.1:8080";

fn a_failed_service_refuses_and_start_opens_again(dispatcher: bool) -> Result<()> {
    let (ns, sandbox) = skip_unless!(netns_and_sandbox()?);
    let fixed = sandbox.out("fixed");
    sandbox.serve_exec("web")?; // writes serve.py
                                // serve.py, but exits 1 until `fixed` exists.
    let script = format!(
        "[ -e {f} ] || exit 1; exec {py} -I -S {serve} {report} {term}",
        f = fixed.display(),
        py = PYTHON,
        serve = sandbox.path().join("serve.py").display(),
        report = sandbox.out("web.json").display(),
        term = sandbox.out("web.term").display(),
    );
    sandbox.write_local_unit(
        "web",
        8080,
        &format!(
            "exec = [\"/bin/sh\", \"-c\", {}]\n{}",
            toml_str(&script),
            restart_always("300ms", "300ms", 3, "30s")
        ),
    )?;
    let hf = skip_unless!(Holdfast::start_in_mode(&ns, sandbox, dispatcher)?);
    let _inside = ns.enter()?;
    let addr: SocketAddr = ADDR.parse()?;
    // While it keeps failing, a client waits in the backlog.
    let mut waiting = TcpStream::connect_timeout(&addr, T)?;
    let s = hf.wait_state("web", "failed", T)?;
    ensure!(s["restarts"].as_u64().unwrap_or(0) >= 2, "{s}");
    // What waited is reset (or closed), promptly.
    waiting.set_read_timeout(Some(T))?;
    let started = Instant::now();
    let mut buf = [0u8; 64];
    match waiting.read(&mut buf) {
        Ok(0) => {}
        Err(e) => ensure!(
            e.kind() == std::io::ErrorKind::ConnectionReset,
            "the waiting client got {e} after {:?}",
            started.elapsed()
        ),
        Ok(n) => anyhow::bail!("the waiting client read {n} bytes from a failed service"),
    }
    ensure!(started.elapsed() < Duration::from_secs(2), "it hung");
    // A new client is refused at once.
    let started = Instant::now();
    let err = TcpStream::connect_timeout(&addr, T).expect_err("connected to a failed service");
    ensure!(
        err.kind() == std::io::ErrorKind::ConnectionRefused && started.elapsed() < T / 2,
        "want a prompt refusal, got {err} after {:?}",
        started.elapsed()
    );
    // Fixed and started: the same socket listens again and serves.
    std::fs::write(&fixed, b"")?;
    hf.cli_ok(&["start", "web"])?;
    let pid = hf.wait_running("web", T)?;
    let answer = ask_tcp(addr, T)?;
    ensure!(answer == format!("web {pid}\n"), "answered {answer:?}");
    ensure!(
        hf.log().contains("its TCP listeners are shut"),
        "{}",
        hf.log()
    );
    Ok(())
}

tests_of!(a_failed_service_refuses_and_start_opens_again:
    in_bind_mode_a_failed_service_refuses_and_start_listens_again => (false),
    with_the_dispatcher_a_failed_service_refuses_and_start_listens_again => (true),
);
