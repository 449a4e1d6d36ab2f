//! Restarts under load, measured by a real load generator: `wrk` against the example
//! `hello-http` (a `type = "notify"` service, found through PATH as `cargo xtask
//! test` sets it) under holdfast, restarted in a loop during the run, in each mode,
//! once with keep-alive connections and once with a new connection per request.
//! Every request must get a 2xx, and wrk must see no socket error (connect, read,
//! write, timeout): the sockets stay open in holdfast, and the old instance drains.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Result};
use holdfast_testkit::{
    netns_or_skip, require, skip_unless, toml_str, wrk, Holdfast, Netns, Sandbox, WrkArgs,
    WrkReport,
};

const URL: &str = "http://127.0.0.1:8080/";
/// Restarts per wrk run.
const RESTARTS: usize = 10;
/// Each wrk run (two per test).
const RUN: Duration = Duration::from_secs(10);
/// Between two restarts.
const PAUSE: Duration = Duration::from_millis(200);
/// wrk's own timeout: a stop-start restart makes requests wait in the backlog, so
/// well above the default 2 s on a loaded machine, but a request that got no
/// answer at all still shows up as a timeout.
const WRK_TIMEOUT: Duration = Duration::from_secs(8);

/// `hello-http` on PATH (target/debug first, as `cargo xtask test` sets it).
fn hello_http() -> Result<String> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    match std::env::split_paths(&path)
        .map(|d| d.join("hello-http"))
        .find(|p| p.is_file())
    {
        Some(p) => Ok(p.to_string_lossy().into_owned()),
        None => bail!("hello-http not on PATH (cargo xtask test puts target/debug first)"),
    }
}

fn start(ns: &Netns) -> Result<Option<Holdfast>> {
    let Some(exec) = require(
        "the example hello-http on PATH",
        hello_http().map(|p| toml_str(&p)),
    ) else {
        return Ok(None);
    };
    if require("wrk on PATH (cargo xtask bootstrap)", which("wrk")).is_none() {
        return Ok(None);
    }
    let sandbox = Sandbox::new()?;
    let service = format!(
        r#"exec = [{exec}, "--name", "hello"]
type = "notify"
restart = "always"
stop-timeout = "10s"
start-limit-burst = 1000"#
    );
    let (addresses, ports) = (["127.0.0.1/32"], ["8080"]);
    sandbox.write_tcp_unit(
        "hello",
        &service,
        "http",
        &addresses,
        &ports,
        "backlog = 4096",
    )?;
    let (hf, _) = Holdfast::start_running(ns, sandbox, "hello")?;
    // READY=1 and STATUS= through the sd-notify crate.
    let s = hf.service("hello")?;
    ensure!(
        s["ready"] == true && s["status_text"] == "serving on 127.0.0.1:8080",
        "{s}"
    );
    Ok(Some(hf))
}

fn which(tool: &str) -> Result<()> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    if std::env::split_paths(&path).any(|d| d.join(tool).is_file()) {
        Ok(())
    } else {
        bail!("{tool} not found on PATH")
    }
}

/// One wrk run of [`RUN`] with `header`, restarting "hello" in `mode` [`RESTARTS`]
/// times meanwhile, one after the other with [`PAUSE`] between, from 0.5 s into the
/// run; all must be done 1 s before its end. Returns wrk's report.
fn run_with_restarts(
    ns: &Netns,
    hf: &Holdfast,
    mode: &str,
    header: Option<&str>,
) -> Result<WrkReport> {
    std::thread::scope(|scope| -> Result<WrkReport> {
        let args = WrkArgs {
            url: URL,
            connections: 50,
            duration: RUN,
            timeout: WRK_TIMEOUT,
            header,
        };
        let load = scope.spawn(move || wrk(ns, hf.sandbox(), args));
        let began = Instant::now();
        let mut pids = vec![hf.service("hello")?["pid"].clone()];
        std::thread::sleep(Duration::from_millis(500));
        for _ in 0..RESTARTS {
            hf.cli_ok(&["restart", "hello", "--mode", mode])?;
            pids.push(hf.service("hello")?["pid"].clone());
            std::thread::sleep(PAUSE);
        }
        let took = began.elapsed();
        let report = load.join().expect("wrk thread")?;
        ensure!(
            took + Duration::from_secs(1) < RUN,
            "{RESTARTS} {mode} restarts ended {took:?} into the wrk run of {RUN:?}: not all under load"
        );
        let distinct: std::collections::BTreeSet<String> =
            pids.iter().map(|p| p.to_string()).collect();
        ensure!(distinct.len() == RESTARTS + 1, "{mode}: pids {pids:?}");
        eprintln!("{mode}: {RESTARTS} restarts in {took:?}");
        Ok(report)
    })
}

fn check(mode: &str, header: Option<&str>, r: &WrkReport) -> Result<()> {
    eprintln!(
        "{mode} {}: {} requests, {} non-2xx, socket errors connect {} read {} write {} timeout {}",
        header.unwrap_or("keep-alive"),
        r.requests,
        r.non_2xx,
        r.connect,
        r.read,
        r.write,
        r.timeout
    );
    ensure!(
        r.requests > 100,
        "{mode}: only {} requests:\n{}",
        r.requests,
        r.text
    );
    ensure!(
        r.socket_errors() == 0 && r.non_2xx == 0 && r.responses == r.requests,
        "{mode} restarts under load, {}: {} socket errors, {} non-2xx, {} responses of {} requests:\n{}",
        header.unwrap_or("keep-alive"),
        r.socket_errors(),
        r.non_2xx,
        r.responses,
        r.requests,
        r.text
    );
    Ok(())
}

fn restarts_under_wrk(mode: &str) -> Result<()> {
    let ns = skip_unless!(netns_or_skip());
    let mut hf = skip_unless!(start(&ns)?);
    for header in [None, Some("Connection: close")] {
        let report = run_with_restarts(&ns, &hf, mode, header)?;
        check(mode, header, &report)?;
    }
    let s = hf.service("hello")?;
    ensure!(s["restarts"] == 2 * RESTARTS, "{s}");
    // (What status shows once the old instances are gone is checked in
    // overlap.rs: the draining instance's STOPPING=1 must not count.)
    hf.stop()
}

#[test]
fn overlap_restarts_under_wrk_lose_nothing() -> Result<()> {
    restarts_under_wrk("overlap")
}

#[test]
fn stop_start_restarts_under_wrk_lose_nothing() -> Result<()> {
    restarts_under_wrk("stop-start")
}
