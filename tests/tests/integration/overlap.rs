//! Overlap restarts (`holdfast restart NAME --mode overlap`, or `restart-mode =
//! "overlap"` in the unit): the new instance starts on the same sockets and the old
//! one is stopped only once the new one said READY=1. A new instance that never
//! gets ready, or exits, is stopped and the old one keeps serving (the CLI exits 1
//! saying so); a `single-instance` service refuses an overlap restart; with
//! `overlap-grace`, the old instance serves on beside the new one for that long
//! before it is stopped. A client loops throughout and sees no error.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::Output;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use holdfast_testkit::{
    notifier_running, process_gone, reply_pid, skip_unless, tell, wait_for, Holdfast, LoopClient,
    Netns, Tally,
};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(10);

fn web() -> SocketAddr {
    "127.0.0.1:8080".parse().expect("literal")
}

/// Asks "web" (a notifier.py) for its pid in a loop, from a thread in `ns`.
fn pid_client(ns: &Netns) -> Result<LoopClient> {
    LoopClient::each_round(ns, Duration::from_millis(5), |tally| {
        match tell(web(), "pid").and_then(|a| reply_pid(&a)) {
            Ok(pid) => tally.answered_by("web", pid),
            Err(e) => tally.failed.push(format!("{e:#}")),
        }
    })
}

/// Stops the client; fails unless it was answered.
fn finish(client: LoopClient) -> Result<Tally> {
    let tally = client.finish()?;
    ensure!(
        tally.answered > 0,
        "the client was never answered: {tally:?}"
    );
    Ok(tally)
}

/// Runs `holdfast restart ARGS…` on a thread while this one records every overlap
/// candidate (`next_pid`) that status shows; returns the CLI's output and those pids.
fn restart_watching(hf: &Holdfast, args: &[&str]) -> Result<(Output, BTreeSet<i32>)> {
    let mut cli = vec!["restart"];
    cli.extend_from_slice(args);
    std::thread::scope(|scope| {
        let running = scope.spawn(|| hf.cli(&cli));
        let mut candidates = BTreeSet::new();
        while !running.is_finished() {
            if let Some(p) = hf.service("web").ok().and_then(|s| s["next_pid"].as_i64()) {
                candidates.insert(p as i32);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok((running.join().expect("cli thread")?, candidates))
    })
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The old instance kept serving and nothing else changed: same pid, running, no
/// candidate or draining instance left, no restart counted; only `old` answered.
fn old_one_kept(hf: &Holdfast, old: i32, seen: &Tally) -> Result<Value> {
    let s = hf.wait_service("web", T, |s| s["draining_pids"] == json!([]))?;
    ensure!(
        (&s["state"], &s["pid"], &s["next_pid"], &s["restarts"])
            == (&json!("running"), &json!(old), &Value::Null, &json!(0)),
        "after the failed overlap restart: {s}"
    );
    ensure!(seen.failed.is_empty(), "client errors: {seen:?}");
    ensure!(
        seen.pids_of("web") == BTreeSet::from([old]),
        "answered by {:?}, want {old} only",
        seen.pids_of("web")
    );
    Ok(s)
}

/// An overlap restart whose new instance (every start after the first: notifier.py
/// `--later LATER`) fails: the CLI (`restart ARGS…`) exits 1 with every one of
/// `reasons`, the old instance kept serving a looping client without an error, and
/// the candidate, which status showed as `next_pid`, is gone.
fn failed_overlap(later: &str, unit_extra: &str, args: &[&str], reasons: &[&str]) -> Result<()> {
    let (ns, mut hf, old) = skip_unless!(notifier_running("web", &["--later", later], unit_extra)?);
    let client = pid_client(&ns)?;
    let (out, candidates) = restart_watching(&hf, args)?;
    std::thread::sleep(Duration::from_millis(300));
    let seen = finish(client)?;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "restart: {err}");
    for part in reasons {
        assert!(err.contains(part), "restart said {err:?}, want {part:?}");
    }
    let starts = hf.sandbox().starts("web");
    assert_eq!(starts.len(), 2, "{starts:?}");
    assert!(
        candidates.is_subset(&BTreeSet::from([starts[1]])),
        "status next_pid {candidates:?}, the candidate was {}",
        starts[1]
    );
    old_one_kept(&hf, old, &seen)?;
    wait_for("the candidate to be gone", T, || {
        process_gone(starts[1]).then_some(())
    })?;
    eprintln!("client during the restart: {} answers", seen.answered);
    hf.stop()
}

#[test]
fn overlap_restart_whose_new_instance_never_gets_ready_keeps_the_old_one() -> Result<()> {
    // It never says READY=1 (and accepts nothing); no --mode: the unit's restart-mode.
    failed_overlap(
        "never-ready",
        "restart-mode = \"overlap\"\nstart-timeout = \"1s\"",
        &["web"],
        &[
            "did not send READY=1 within start-timeout",
            "old instance keeps serving",
        ],
    )
}

#[test]
fn overlap_restart_whose_new_instance_exits_keeps_the_old_one() -> Result<()> {
    failed_overlap(
        "exit",
        "start-timeout = \"20s\"",
        &["web", "--mode", "overlap"],
        &[
            "exited before it was ready",
            "exit code 1",
            "old instance keeps serving",
        ],
    )
}

#[test]
fn overlap_restart_hands_over_and_the_old_one_drains() -> Result<()> {
    let (ns, mut hf, old) = skip_unless!(notifier_running("web", &["--ready-after", "0.5"], "")?);
    let client = pid_client(&ns)?;
    let (out, candidates) = restart_watching(&hf, &["web", "--mode", "overlap"])?;
    assert_eq!(out.status.code(), Some(0), "restart: {}", stderr(&out));
    let s = hf.service("web")?;
    let new = s["pid"].as_i64().context("pid")? as i32;
    assert_ne!(new, old, "{s}");
    assert_eq!(
        candidates,
        BTreeSet::from([new]),
        "status next_pid while it got ready"
    );
    assert_eq!(
        (&s["state"], &s["restarts"]),
        (&json!("running"), &json!(1)),
        "{s}"
    );
    wait_for("the old instance to be gone", T, || {
        process_gone(old).then_some(())
    })?;
    std::thread::sleep(Duration::from_millis(300));
    let seen = finish(client)?;
    assert!(seen.failed.is_empty(), "client errors: {seen:?}");
    assert!(
        seen.pids_of("web").contains(&new),
        "the new instance never answered: {seen:?}"
    );
    assert!(
        seen.pids_of("web").is_subset(&BTreeSet::from([old, new])),
        "{seen:?}"
    );
    hf.stop()
}

#[test]
fn overlap_grace_keeps_the_old_instance_serving_beside_the_new_one() -> Result<()> {
    let (ns, mut hf, old) = skip_unless!(notifier_running("web", &[], "overlap-grace = \"2s\"")?);
    let client = pid_client(&ns)?;
    let (out, _) = restart_watching(&hf, &["web", "--mode", "overlap"])?;
    let promoted = std::time::Instant::now();
    assert_eq!(out.status.code(), Some(0), "restart: {}", stderr(&out));
    let s = hf.service("web")?;
    let new = s["pid"].as_i64().context("pid")? as i32;
    assert_ne!(new, old, "{s}");
    // Within the grace: the new one is the main instance, the old one is
    // still there, not told to stop.
    std::thread::sleep(Duration::from_millis(700));
    let s = hf.service("web")?;
    assert_eq!(s["draining_pids"], json!([old]), "{s}");
    assert_eq!(
        (&s["state"], &s["pid"]),
        (&json!("running"), &json!(new)),
        "{s}"
    );
    assert!(
        !process_gone(old),
        "the old instance stopped within its grace"
    );
    // After it: stopped.
    wait_for("the old instance to be gone", T, || {
        process_gone(old).then_some(())
    })?;
    let after = promoted.elapsed();
    assert!(after >= Duration::from_millis(1900), "gone after {after:?}");
    let seen = finish(client)?;
    assert!(seen.failed.is_empty(), "client errors: {seen:?}");
    hf.stop()
}

#[test]
fn overlap_restart_is_refused_for_a_single_instance_service() -> Result<()> {
    let (_ns, mut hf, old) = skip_unless!(notifier_running("web", &[], "single-instance = true")?);
    let out = hf.cli(&["restart", "web", "--mode", "overlap"])?;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "restart: {err}");
    assert!(err.contains("single-instance"), "no reason given: {err:?}");
    let s = hf.service("web")?;
    assert_eq!((&s["pid"], &s["restarts"]), (&json!(old), &json!(0)), "{s}");
    assert_eq!(hf.sandbox().starts("web").len(), 1);
    // stop-start is still allowed.
    hf.cli_ok(&["restart", "web", "--mode", "stop-start"])?;
    let s = hf.service("web")?;
    assert_ne!(s["pid"], old, "{s}");
    hf.stop()
}

/// The old instance of an overlap restart says STOPPING=1 and STATUS=draining as
/// it drains (hello-http does, through the sd-notify crate). That is news about
/// the old instance, not the service: the service, whose new instance is ready,
/// must stay "running" with the new instance's status text, and `holdfast start`
/// must see it running (a draining instance's STOPPING=1 once left the service
/// "stopping" for good and `holdfast start` waiting forever).
#[test]
fn a_draining_instance_does_not_speak_for_the_service() -> Result<()> {
    let (_ns, mut hf, old) = skip_unless!(notifier_running(
        "web",
        &["--status", "serving", "--stopping"],
        ""
    )?);
    hf.cli_ok(&["restart", "web", "--mode", "overlap"])?;
    wait_for("the old instance to be gone", T, || {
        process_gone(old).then_some(())
    })?;
    let s = hf.wait_service("web", T, |s| s["draining_pids"] == json!([]))?;
    ensure!(
        (&s["state"], &s["ready"], &s["status_text"])
            == (&json!("running"), &json!(true), &json!("serving")),
        "after the old instance drained: {s}"
    );
    let started = std::time::Instant::now();
    let out = hf.cli(&["start", "web"])?;
    ensure!(
        out.status.success() && started.elapsed() < Duration::from_secs(5),
        "holdfast start on the running service: {} after {:?}",
        stderr(&out),
        started.elapsed()
    );
    hf.stop()
}
