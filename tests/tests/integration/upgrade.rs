//! `holdfast upgrade`: the daemon re-executes itself in place. Under a client
//! that connects in a loop, 20 upgrades refuse, misroute or lose no
//! connection, in dispatcher mode (a port range, steered) and in bind mode;
//! the daemon's pid, the services' pids and restart counters stay, and the
//! dispatcher's counters continue. An upgrade to a binary that refuses the
//! state changes nothing and says why.

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use holdfast_testkit::{netns_and_sandbox, skip_unless, Holdfast, LoopClient, RunOptions, Sandbox};
use serde_json::Value;

const T: Duration = Duration::from_secs(10);
const UPGRADES: usize = 20;

/// A serve.py service "web" on 127.0.0.1 ports `ports` (a range with the
/// dispatcher, one port in bind mode).
fn web_unit(sandbox: &Sandbox, ports: &str) -> Result<()> {
    let exec = sandbox.serve_exec("web")?;
    let service = format!("exec = {exec}\nrestart = \"always\"");
    sandbox.write_tcp_unit("web", &service, "web", &["127.0.0.1/32"], &[ports], "")?;
    Ok(())
}

/// The lookups counted for every binding of `holdfast bindings`.
/// The largest `field` of `holdfast bindings` (the one socket's counters).
fn counter(hf: &Holdfast, field: &str) -> Result<u64> {
    let b: Value = serde_json::from_str(&hf.cli_ok(&["bindings", "--json"])?)?;
    Ok(b.as_array()
        .context("bindings is an array")?
        .iter()
        .filter_map(|r| r[field].as_u64())
        .max()
        .unwrap_or(0))
}

fn upgrades_under_load(dispatcher: bool) -> Result<()> {
    let (ns, sandbox) = skip_unless!(netns_and_sandbox()?);
    let (ports, targets): (&str, Vec<u16>) = if dispatcher {
        ("8000-8009", vec![8000, 8004, 8009])
    } else {
        ("8000", vec![8000])
    };
    web_unit(&sandbox, ports)?;
    let hf = skip_unless!(Holdfast::start_in_mode(&ns, sandbox, dispatcher)?);
    let daemon = hf.pid();
    let pid = hf.wait_running("web", T)?;
    let targets = targets
        .iter()
        .map(|p| {
            (
                format!("127.0.0.1:{p}").parse().expect("an address"),
                "web".to_string(),
            )
        })
        .collect();
    let client = LoopClient::start(&ns, targets, Duration::from_millis(2), T)?;
    std::thread::sleep(Duration::from_millis(300));
    for k in 0..UPGRADES {
        let report: Value = serde_json::from_str(&hf.cli_ok(&["upgrade", "--json"])?)
            .with_context(|| format!("upgrade {k}"))?;
        ensure!(report["pid"] == daemon, "upgrade {k}: {report}");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(300));
    let tally = client.finish()?;
    eprintln!(
        "{UPGRADES} upgrades ({}): {} answered, {} refused, {} misrouted, {} failed",
        if dispatcher {
            "dispatcher"
        } else {
            "bind mode"
        },
        tally.answered,
        tally.refused,
        tally.misrouted.len(),
        tally.failed.len()
    );
    tally.expect_no_loss(0)?;
    ensure!(tally.answered > 100, "only {} answers", tally.answered);
    ensure!(
        tally.pids_of("web") == [pid].into(),
        "answered by {:?}, not only by {pid}",
        tally.pids_of("web")
    );
    let s = hf.service("web")?;
    ensure!(
        s["pid"] == pid && s["restarts"] == 0 && s["state"] == "running",
        "{s}"
    );
    ensure!(hf.pid() == daemon, "the daemon's pid changed");
    let log = hf.log();
    ensure!(
        log.matches("upgraded in place: resumed").count() == UPGRADES,
        "not {UPGRADES} upgrades in the log:\n{log}"
    );
    if dispatcher {
        // Every connection is one lookup (its SYN; a retransmitted SYN is
        // another). Counters reset at an upgrade would show only those since
        // then; figures saved before each exec would miss every lookup the
        // old program served while the new one loaded; a new program that
        // selected beside the old one would count each of those as an error.
        let (n, errors) = (counter(&hf, "lookups")?, counter(&hf, "errors")?);
        ensure!(
            n * 100 >= tally.answered * 98,
            "lookups {n} for {} answers: the counters lost lookups across the upgrades",
            tally.answered
        );
        ensure!(errors == 0, "{errors} errors counted across the upgrades");
    }
    let mut hf = hf;
    hf.stop()
}

tests_of!(upgrades_under_load:
    upgrades_under_load_lose_no_connection_with_the_dispatcher => (true),
    upgrades_under_load_lose_no_connection_in_bind_mode => (false),
);

/// Puts `content` at `path` (mode 0755) by a rename, as a package manager does
/// (the running file is not written to).
fn replace(path: &Path, content: &[u8]) -> Result<()> {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, content)?;
    std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

#[test]
fn an_upgrade_the_new_binary_refuses_changes_nothing() -> Result<()> {
    let (ns, sandbox) = skip_unless!(netns_and_sandbox()?);
    web_unit(&sandbox, "8000")?;
    let binary = sandbox.path().join("holdfast");
    let real = std::fs::read(holdfast_testkit::holdfast_bin())?;
    replace(&binary, &real)?;
    let opts = RunOptions {
        binary: Some(binary.clone()),
        ..Default::default()
    };
    let mut hf = Holdfast::start_with(&ns, sandbox, &opts)?;
    let daemon = hf.pid();
    let pid = hf.wait_running("web", T)?;

    // A binary that does not take the state (here: any program that fails).
    replace(
        &binary,
        b"#!/bin/sh\necho 'state version 1? no' >&2\nexit 1\n",
    )?;
    let out = hf.cli(&["upgrade"])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.code() == Some(1), "upgrade: {out:?}");
    ensure!(
        stderr.contains("does not accept state version") && stderr.contains("state version 1? no"),
        "the reason is not given: {stderr}"
    );
    let s = hf.service("web")?;
    ensure!(s["pid"] == pid && s["state"] == "running", "{s}");
    ensure!(hf.try_wait()?.is_none(), "the daemon exited");
    let _inside = ns.enter()?;
    let answer = holdfast_testkit::ask_tcp("127.0.0.1:8000".parse()?, T)?;
    ensure!(answer == format!("web {pid}\n"), "{answer:?}");
    drop(_inside);

    // The real one again: the upgrade goes through, same pids.
    replace(&binary, &real)?;
    let report: Value = serde_json::from_str(&hf.cli_ok(&["upgrade", "--json"])?)?;
    ensure!(
        report["pid"] == daemon && report["services"] == 1,
        "{report}"
    );
    let s = hf.service("web")?;
    ensure!(s["pid"] == pid, "{s}");
    hf.stop()
}

/// `holdfast logs --json` lines: (line, time, stream, pid) each.
fn log_lines(hf: &Holdfast, name: &str) -> Result<Vec<(String, String, String, i64)>> {
    hf.cli_ok(&["logs", name, "--json"])?
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l)?;
            Ok((
                v["line"].as_str().context("line")?.to_string(),
                v["time"].as_str().context("time")?.to_string(),
                v["stream"].as_str().context("stream")?.to_string(),
                v["pid"].as_i64().context("pid")?,
            ))
        })
        .collect()
}

/// Two lines (stdout, stderr), then a third once `$NOTE` exists.
const TALKER: &str = "echo before; echo 'before, on stderr' >&2; while [ ! -e \"$NOTE\" ]; do sleep 0.05; done; echo after >&2; exec sleep 1000";

/// The log ring crosses an upgrade with each line's time, stream and pid, and
/// the output pipes with their instance's pid: a line written after the
/// upgrade still names the instance that wrote it.
#[test]
fn log_lines_keep_their_time_stream_and_pid_across_an_upgrade() -> Result<()> {
    let (ns, sandbox) = skip_unless!(netns_and_sandbox()?);
    let go = sandbox.write_sh_noting("talker", TALKER, "")?;
    let mut hf = Holdfast::start_in(&ns, sandbox)?;
    let pid = i64::from(hf.wait_running("talker", T)?);
    let before = holdfast_testkit::wait_for("two lines", T, || {
        let l = log_lines(&hf, "talker").ok()?;
        (l.len() == 2).then_some(l)
    })?;
    hf.cli_ok(&["upgrade"])?;
    ensure!(
        log_lines(&hf, "talker")? == before,
        "the lines changed across the upgrade"
    );
    std::fs::write(&go, "")?;
    let after = holdfast_testkit::wait_for("the line after", T, || {
        let l = log_lines(&hf, "talker").ok()?;
        (l.len() == 3).then_some(l)
    })?;
    let (line, time, stream, by) = &after[2];
    ensure!(
        line == "after" && stream == "stderr" && *by == pid,
        "{:?}",
        after[2]
    );
    ensure!(time > &before[1].1, "{time} is not after {}", before[1].1);
    hf.stop()
}
