//! The in-place upgrade (`holdfast upgrade`), against the release `holdfast`
//! in a network namespace of its own:
//! - the time from `holdfast upgrade` to the new daemon answering
//!   `status --json`, with 1, 100 and 1000 services (each ÷ the 1-service one);
//! - a steady client's p99 connect-and-answer latency while the daemon
//!   upgrades every 200 ms ÷ the same client without upgrades (same run).
//!   A refused or failed connection fails the step.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use holdfast_testkit::{ask_tcp, toml_array, Netns, Sandbox};

use crate::report::{daemon, need_root, Row};

/// `n` quiet services, all running; then `holdfast upgrade` and a
/// `status --json` that lists them all, timed together: the median of 5, in seconds.
fn upgrade_with(ns: &Netns, n: usize) -> Result<f64> {
    let sandbox = Sandbox::new()?;
    let exec = toml_array(&["/bin/sleep", "100000"]);
    for i in 0..n {
        sandbox.write_unit(&format!("s{i:04}"), &format!("[service]\nexec = {exec}\n"))?;
    }
    let mut hf = daemon(ns, sandbox)?;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let s: serde_json::Value = serde_json::from_str(&hf.cli_ok(&["status", "--json"])?)?;
        let running = s
            .as_array()
            .map_or(0, |a| a.iter().filter(|x| x["state"] == "running").count());
        if running == n {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "{running} of {n} services running"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut took: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            hf.cli_ok(&["upgrade"])?;
            let s: serde_json::Value = serde_json::from_str(&hf.cli_ok(&["status", "--json"])?)?;
            ensure!(
                s.as_array().map_or(0, Vec::len) == n,
                "status lost services"
            );
            Ok(t.elapsed().as_secs_f64())
        })
        .collect::<Result<_>>()?;
    took.sort_by(f64::total_cmp);
    hf.stop()?;
    Ok(took[2])
}

/// Connect-and-answer latencies of `addr` from inside `ns` for `run`, in
/// seconds, while `during` runs in this thread.
fn latencies(
    ns: &Netns,
    addr: SocketAddr,
    run: Duration,
    during: impl FnOnce(),
) -> Result<Vec<f64>> {
    std::thread::scope(|scope| {
        let client = scope.spawn(move || -> Result<Vec<f64>> {
            let _inside = ns.enter()?;
            let end = Instant::now() + run;
            let mut all = Vec::new();
            while Instant::now() < end {
                let t = Instant::now();
                let answer = ask_tcp(addr, Duration::from_secs(5))?;
                ensure!(!answer.is_empty(), "closed without an answer");
                all.push(t.elapsed().as_secs_f64());
            }
            Ok(all)
        });
        during();
        client.join().expect("the client thread")
    })
}

fn p99(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[(v.len() * 99 / 100).min(v.len() - 1)]
}

pub fn upgrade() -> Result<Vec<Row>> {
    need_root("a network namespace of its own")?;
    let ns = Netns::new()?;
    let mut rows = Vec::new();
    let one = upgrade_with(&ns, 1)?;
    rows.push(Row::new(
        "upgrade until status answers: 1 service",
        one * 1e3,
        None,
        "ms",
    ));
    for n in [100, 1000] {
        let t = upgrade_with(&ns, n)?;
        rows.push(Row::new(
            format!("upgrade until status answers: {n} services ÷ 1"),
            t * 1e3,
            Some(one * 1e3),
            "ms",
        ));
    }

    let sandbox = Sandbox::new()?;
    let exec = sandbox.serve_exec("web")?;
    sandbox.write_local_unit("web", 8000, &format!("exec = {exec}"))?;
    let hf = daemon(&ns, sandbox)?;
    let addr: SocketAddr = "127.0.0.1:8000".parse()?;
    let run = Duration::from_secs(5);
    let quiet = latencies(&ns, addr, run, || {})?;
    let mut upgrades = 0;
    let busy = latencies(&ns, addr, run, || {
        let end = Instant::now() + run - Duration::from_millis(500);
        while Instant::now() < end {
            if hf.cli_ok(&["upgrade"]).is_ok() {
                upgrades += 1;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    })?;
    ensure!(upgrades > 5, "only {upgrades} upgrades went through");
    rows.push(Row::new(
        format!("client p99 latency during {upgrades} upgrades ÷ without"),
        p99(busy) * 1e3,
        Some(p99(quiet) * 1e3),
        "ms",
    ));
    let mut hf = hf;
    hf.stop()?;
    Ok(rows)
}
