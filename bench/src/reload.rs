//! The reload and memory benchmarks, run against the release `holdfast` in a
//! network namespace of their own, with the test kit (`holdfast-testkit`: the
//! namespace, the sandbox, the daemon launcher and the loop client):
//! - `reload`: a reload that adds 10,000 bindings, one that replaces them with 10,000
//!   others, one that removes them, each timed against a reload that changes nothing (same
//!   run, 10k bindings in place), while a client connects in a loop to a binding that stays;
//!   a refused, misrouted or failed connection fails the step.
//! - `rss`: the supervisor's resident memory with 100 services ÷ with 1, for quiet
//!   services and for services whose log ring (1000 lines) is full.

use std::fs;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use holdfast_testkit::{ask_tcp, toml_array, Holdfast, LoopClient, Netns, Sandbox};

use crate::report::{daemon, need_root, Row};

/// The binding the loop client uses: in every unit set of `reload`.
const STAY: &str = "192.0.2.1:80";
/// Bindings each reload of `reload` adds or removes.
const CHURN: usize = 10_000;
/// Services in the large `rss` daemon.
const MANY: usize = 100;

/// `holdfast reload`, timed in seconds.
fn timed_reload(hf: &Holdfast) -> Result<f64> {
    let start = Instant::now();
    hf.cli_ok(&["reload"])?;
    Ok(start.elapsed().as_secs_f64())
}

/// Waits until `n` services are running.
fn wait_running(hf: &Holdfast, n: usize, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let status = hf.status()?;
        let running = status
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["state"] == "running")
            .count();
        if running == n {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{running} of {n} services running after {timeout:?}: {status}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A unit running the kit's serve.py (answers `"NAME PID\n"`) on TCP `addresses` × port 80.
fn write_serve_unit(sandbox: &Sandbox, name: &str, addresses: &[String]) -> Result<()> {
    let exec = sandbox.serve_exec(name)?;
    let addresses: Vec<&str> = addresses.iter().map(String::as_str).collect();
    sandbox.write_unit(
        name,
        &format!(
            "[service]\nexec = {exec}\n\n[[socket]]\nname = \"{name}\"\nprotocol = \"tcp\"\naddresses = {}\nports = [\"80\"]\n",
            toml_array(&addresses)
        ),
    )?;
    Ok(())
}

/// `count` host prefixes in 10.`block`.0.0/16 and up: 10.B.x.y/32.
fn hosts(block: u8, count: usize) -> Vec<String> {
    (0..count)
        .map(|i| {
            format!(
                "10.{}.{}.{}/32",
                usize::from(block) + i / 65536,
                (i / 256) % 256,
                i % 256
            )
        })
        .collect()
}

/// Fails unless `addr` answers from `service` (or, for `None`, refuses).
fn expect_answer(ns: &Netns, addr: &str, service: Option<&str>) -> Result<()> {
    let to: SocketAddr = addr.parse()?;
    let got = ns.run(|| ask_tcp(to, Duration::from_secs(5)))?;
    let ok = match (&got, service) {
        (Ok(a), Some(s)) => a.starts_with(&format!("{s} ")),
        (Err(e), None) => e.kind() == std::io::ErrorKind::ConnectionRefused,
        _ => false,
    };
    if !ok {
        bail!("{addr}: got {got:?}, want an answer from {service:?} (None: refused)");
    }
    Ok(())
}

/// The median of a few no-op reloads: the baseline.
fn noop_reload(hf: &Holdfast) -> Result<f64> {
    let mut times: Vec<f64> = (0..5).map(|_| timed_reload(hf)).collect::<Result<_>>()?;
    times.sort_by(f64::total_cmp);
    Ok(times[2])
}

pub fn reload_10k() -> Result<Vec<Row>> {
    need_root("a network namespace of its own")?;
    let ns = Netns::new()?;
    for prefix in ["192.0.2.0/24", "10.0.0.0/8"] {
        ns.add_local_route(prefix)?;
    }
    let sandbox = Sandbox::new()?;
    let units = sandbox.units_dir();
    write_serve_unit(&sandbox, "stay", &["192.0.2.1/32".into()])?;
    let mut hf = daemon(&ns, sandbox)?;
    wait_running(&hf, 1, Duration::from_secs(30))?;

    let client = LoopClient::start(
        &ns,
        vec![(STAY.parse()?, "stay".into())],
        Duration::ZERO,
        Duration::from_secs(5),
    )?;
    // Each change is timed against a reload that changes nothing with the 10k bindings in
    // place (the units are read and the binding set published either way), measured
    // just before it; that no-op reload is itself shown against one with 1 binding.
    let result = (|| -> Result<Vec<(String, f64, f64)>> {
        let mut timed = Vec::new();
        let small = noop_reload(&hf)?;
        write_serve_unit(hf.sandbox(), "churn", &hosts(0, CHURN))?;
        let add = timed_reload(&hf)?;
        wait_running(&hf, 2, Duration::from_secs(30))?;
        expect_answer(&ns, "10.0.39.15:80", Some("churn"))?;
        let large = noop_reload(&hf)?;
        timed.push((
            "reload: nothing changed, 10k bindings / 1".into(),
            large,
            small,
        ));
        timed.push(("reload: add 10k bindings".into(), add, large));
        write_serve_unit(hf.sandbox(), "churn", &hosts(100, CHURN))?;
        let replace = timed_reload(&hf)?;
        expect_answer(&ns, "10.100.39.15:80", Some("churn"))?;
        expect_answer(&ns, "10.0.39.15:80", None)?;
        let large = noop_reload(&hf)?;
        timed.push((
            "reload: replace 10k bindings by 10k others".into(),
            replace,
            large,
        ));
        fs::remove_file(units.join("churn.toml")).context("remove churn.toml")?;
        timed.push((
            "reload: remove 10k bindings".into(),
            timed_reload(&hf)?,
            large,
        ));
        expect_answer(&ns, "10.100.39.15:80", None)?;
        Ok(timed)
    })();
    // Let the client see the final set too.
    std::thread::sleep(Duration::from_millis(200));
    let tally = client.finish()?;
    let log = hf.log();
    hf.stop()?;
    let timed = result.with_context(|| format!("the daemon's log:\n{log}"))?;
    let (refused, misrouted, failed) = (tally.refused, tally.misrouted.len(), tally.failed.len());
    eprintln!("holdfast-bench: reload: loop client: {} answered, {refused} refused, {misrouted} misrouted, {failed} failed", tally.answered);
    if refused as usize + misrouted + failed > 0 || tally.answered == 0 {
        bail!("the loop client during the reloads: {tally:?} (want only answers)");
    }
    let mut rows: Vec<Row> = timed
        .into_iter()
        .map(|(name, value, base)| Row::new(name, value * 1e3, Some(base * 1e3), "ms"))
        .collect();
    rows.push(Row::new(
        "reload 10k: connections refused or misrouted",
        (refused as usize + misrouted) as f64,
        None,
        "conn",
    ));
    rows.push(Row::new(
        "reload 10k: connections answered during the reloads",
        tally.answered as f64,
        None,
        "conn",
    ));
    Ok(rows)
}

/// VmRSS of a process, in bytes.
fn rss_of(pid: i32) -> Result<f64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")?;
    Ok(kb * 1024.0)
}

/// The daemon's RSS with `n` services running `exec` (a TOML array).
fn rss_with(ns: &Netns, n: usize, exec: &str) -> Result<f64> {
    let sandbox = Sandbox::new()?;
    for i in 0..n {
        sandbox.write_unit(&format!("s{i:03}"), &format!("[service]\nexec = {exec}\n"))?;
    }
    let mut hf = daemon(ns, sandbox)?;
    wait_running(&hf, n, Duration::from_secs(120))?;
    // Let the services print what they print, and the daemon read it.
    std::thread::sleep(Duration::from_secs(2));
    let rss = rss_of(hf.pid())?;
    hf.stop()?;
    Ok(rss)
}

pub fn rss_100() -> Result<Vec<Row>> {
    need_root("a network namespace of its own")?;
    let ns = Netns::new()?;
    let quiet = toml_array(&["/bin/sleep", "100000"]);
    // 1000 lines of 100 bytes (the whole ring), then quiet.
    let chatty = toml_array(&[
        "/bin/sh",
        "-c",
        "i=0; while [ $i -lt 1000 ]; do printf '%099d\\n' $i; i=$((i+1)); done; exec sleep 100000",
    ]);
    let mib = 1024.0 * 1024.0;
    let one = rss_with(&ns, 1, &quiet)?;
    let many = rss_with(&ns, MANY, &quiet)?;
    let one_chatty = rss_with(&ns, 1, &chatty)?;
    let many_chatty = rss_with(&ns, MANY, &chatty)?;
    Ok(vec![
        Row::new(
            "supervisor RSS: 100 services / 1",
            many / mib,
            Some(one / mib),
            "MiB",
        ),
        Row::new(
            "supervisor RSS: 100 services with full log rings / 1",
            many_chatty / mib,
            Some(one_chatty / mib),
            "MiB",
        ),
    ])
}

/// Services in the `scale` step.
const SCALE: usize = 1000;

/// Start-up of a daemon with `n` quiet services, until all run, in seconds;
/// then `holdfast status --json` against it (the CLI's own start included),
/// the median of 5, in seconds.
fn start_and_status(ns: &Netns, n: usize) -> Result<(f64, f64)> {
    let sandbox = Sandbox::new()?;
    let exec = toml_array(&["/bin/sleep", "100000"]);
    for i in 0..n {
        sandbox.write_unit(&format!("s{i:04}"), &format!("[service]\nexec = {exec}\n"))?;
    }
    let start = Instant::now();
    let mut hf = daemon(ns, sandbox)?;
    wait_running(&hf, n, Duration::from_secs(300))?;
    let up = start.elapsed().as_secs_f64();
    let mut status: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            hf.cli_ok(&["status", "--json"])
                .map(|_| t.elapsed().as_secs_f64())
        })
        .collect::<Result<_>>()?;
    status.sort_by(f64::total_cmp);
    hf.stop()?;
    Ok((up, status[2]))
}

/// The supervisor at scale: start-up with 1000 services (until every one runs)
/// and `status --json` with 1000, each ÷ the same with 1 service.
pub fn scale() -> Result<Vec<Row>> {
    need_root("a network namespace of its own")?;
    let ns = Netns::new()?;
    let (up_one, status_one) = start_and_status(&ns, 1)?;
    let (up_many, status_many) = start_and_status(&ns, SCALE)?;
    Ok(vec![
        Row::new(
            format!("supervisor start-up until all run: {SCALE} services ÷ 1"),
            up_many * 1e3,
            Some(up_one * 1e3),
            "ms",
        ),
        Row::new(
            format!("holdfast status --json (CLI start included): {SCALE} services ÷ 1"),
            status_many * 1e3,
            Some(status_one * 1e3),
            "ms",
        ),
    ])
}
