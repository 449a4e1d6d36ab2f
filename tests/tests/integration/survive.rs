//! holdfast survives itself (issue 11): a second `holdfast run` on a live one's
//! state directory or network namespace changes nothing and names the live
//! one's pid; no signal holdfast does not use kills it; after `kill -9`, a new
//! holdfast finds the dead one's sk_lookup link through the kernel, whichever
//! bpffs pinned it, and replaces it; and one started on the dead one's state
//! directory takes its listeners back from the orphaned services and stops
//! them, refusing no connection.

use std::os::unix::fs::MetadataExt;
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use holdfast_testkit::{
    ask_tcp, dispatcher_instance as instance, holdfast_bin, netns_and_sandbox, process_gone,
    require_file, run_bounded, skip_unless, wait_for, Holdfast, LoopClient, Netns, RunOptions,
    Sandbox,
};
use nix::sys::signal::Signal;
use serde_json::Value;

/// Bound on every wait that should succeed.
const T: Duration = Duration::from_secs(10);
const ADDR: &str = "127.0.0.1:8080";

/// How the second daemon enters the test's namespace.
#[derive(Clone, Copy)]
enum Enter {
    /// setns() before exec: the same mount namespace (and bpffs) as the first.
    Setns,
    /// `ip netns exec`: a private mount namespace, with its own bpffs.
    IpNetnsExec,
}

/// Runs a second `holdfast run ARGS…` in `ns` to completion (bounded).
fn second_run(ns: &Netns, enter: Enter, args: &[&str]) -> Result<Output> {
    let mut cmd = match enter {
        Enter::IpNetnsExec => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns.name()]).arg(holdfast_bin());
            c
        }
        Enter::Setns => ns.command(holdfast_bin())?,
    };
    cmd.arg("run").args(args).env("NO_COLOR", "1");
    run_bounded(cmd, Duration::from_secs(30))
}

/// A fresh namespace (`None`: skip) and a sandbox with serve.py as `web` on
/// [`ADDR`].
fn netns_with_web() -> Result<Option<(Netns, Sandbox)>> {
    let Some((ns, _)) = netns_and_sandbox()? else {
        return Ok(None);
    };
    Ok(Some((ns, web_sandbox()?)))
}

/// A sandbox with serve.py as `web` on [`ADDR`].
fn web_sandbox() -> Result<Sandbox> {
    let sandbox = Sandbox::new()?;
    sandbox.write_serve_unit("web", 8080, "")?;
    Ok(sandbox)
}

/// What must not change while a second holdfast tries to start: the service's
/// pid, the answers, the control socket.
fn still_serving(ns: &Netns, hf: &Holdfast, pid: i32, what: &str) -> Result<()> {
    let answer = ns.run(|| ask_tcp(ADDR.parse().expect("literal"), T))?;
    let answer = answer.with_context(|| format!("{what}: the live daemon no longer serves"))?;
    ensure!(
        answer == format!("web {pid}\n"),
        "{what}: answer {answer:?}, want web {pid}"
    );
    let s = hf.service("web")?;
    ensure!(
        s["state"] == "running" && s["pid"] == pid,
        "{what}: the live daemon's service changed: {s}"
    );
    Ok(())
}

/// The second daemon exited 1, naming the live one's pid, and started nothing.
fn refused(out: &Output, live_pid: i32, what: &str, words: &str) -> Result<()> {
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(1),
        "{what}: want exit 1, got {}; stderr:\n{stderr}",
        out.status
    );
    ensure!(
        stderr.contains(&format!("pid {live_pid}")) && stderr.contains(words),
        "{what}: the refusal does not name pid {live_pid} and {words:?}:\n{stderr}"
    );
    for bad in ["replacing stale BPF pins", "starting", "spawned"] {
        ensure!(
            !stderr.contains(bad),
            "{what}: the second daemon did something before refusing ({bad:?}):\n{stderr}"
        );
    }
    Ok(())
}

#[test]
fn a_second_run_on_a_live_state_dir_changes_nothing_in_bind_mode() -> Result<()> {
    let (ns, sandbox) = skip_unless!(netns_with_web()?);
    let units = sandbox.units_dir();
    let state = sandbox.state_dir();
    let (hf, pid) = Holdfast::start_running(&ns, sandbox, "web")?;
    let out = second_run(
        &ns,
        Enter::Setns,
        &[
            "--units",
            units.to_str().expect("utf-8"),
            "--state-dir",
            state.to_str().expect("utf-8"),
            "--no-dispatcher",
        ],
    )?;
    refused(&out, hf.pid(), "second run, bind mode", "state directory")?;
    still_serving(&ns, &hf, pid, "after the second run")
}

#[test]
fn a_second_run_on_a_live_dispatcher_changes_nothing() -> Result<()> {
    let (ns, sandbox) = skip_unless!(netns_with_web()?);
    let units = sandbox.units_dir();
    let state = sandbox.state_dir();
    let inst = instance("second");
    let opts = RunOptions {
        args: vec!["--instance".into(), inst.clone()],
        ..RunOptions::default()
    };
    let hf = skip_unless!(Holdfast::start_dispatched(&ns, sandbox, &opts)?);
    let pid = hf.wait_running("web", T)?;
    still_serving(&ns, &hf, pid, "before")?;
    let units = units.to_str().expect("utf-8");
    // The same state dir and instance, as in the report: it used to replace
    // the live pins, detaching the live dispatcher.
    let out = second_run(
        &ns,
        Enter::Setns,
        &[
            "--units",
            units,
            "--state-dir",
            state.to_str().expect("utf-8"),
            "--instance",
            &inst,
        ],
    )?;
    refused(&out, hf.pid(), "same state dir", "state directory")?;
    still_serving(&ns, &hf, pid, "after a second run on the same state dir")?;
    // Another state dir, under `ip netns exec` (whose bpffs cannot see the
    // live pins): the network namespace itself is locked.
    let other = tempfile::tempdir()?;
    let out = second_run(
        &ns,
        Enter::IpNetnsExec,
        &[
            "--units",
            units,
            "--state-dir",
            other.path().to_str().expect("utf-8"),
        ],
    )?;
    refused(&out, hf.pid(), "another state dir", "network namespace")?;
    still_serving(&ns, &hf, pid, "after a second run under ip netns exec")?;
    let b: Value = serde_json::from_str(&hf.cli_ok(&["bindings", "--json"])?)?;
    let dropped = |b: &Value| b["misses"].as_u64().unwrap_or(0) + b["errors"].as_u64().unwrap_or(0);
    ensure!(
        b.as_array()
            .is_some_and(|a| !a.is_empty() && a.iter().all(|b| dropped(b) == 0)),
        "lookups dropped, or no bindings: {b}"
    );
    Ok(())
}

#[test]
fn no_unused_signal_kills_holdfast() -> Result<()> {
    let (ns, sandbox) = skip_unless!(netns_with_web()?);
    let (mut hf, pid) = Holdfast::start_running(&ns, sandbox, "web")?;
    let rt = |n: i32| libc::SIGRTMIN() + n;
    let signals: Vec<(String, i32)> = [
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGQUIT,
        Signal::SIGALRM,
        Signal::SIGPIPE,
        Signal::SIGVTALRM,
        Signal::SIGPROF,
        Signal::SIGIO,
        Signal::SIGPWR,
        Signal::SIGXCPU,
        Signal::SIGXFSZ,
        Signal::SIGSTKFLT,
        Signal::SIGTSTP,
        Signal::SIGTTIN,
        Signal::SIGTTOU,
        Signal::SIGURG,
        Signal::SIGWINCH,
    ]
    .into_iter()
    .map(|s| (s.as_str().to_string(), s as i32))
    .chain([0, 1, 15].map(|n| (format!("SIGRTMIN+{n}"), rt(n))))
    .chain([("SIGRTMAX".to_string(), libc::SIGRTMAX())])
    .collect();
    for (name, sig) in &signals {
        // SAFETY: kill takes no pointers.
        ensure!(unsafe { libc::kill(hf.pid(), *sig) } == 0, "kill {name}");
        std::thread::sleep(Duration::from_millis(50));
        if let Some(status) = hf.try_wait()? {
            anyhow::bail!("{name} ended holdfast: {status}; its log:\n{}", hf.log());
        }
        let proc_state = holdfast_testkit::proc_state(hf.pid());
        ensure!(proc_state != Some('T'), "{name} stopped holdfast (state T)");
        still_serving(&ns, &hf, pid, &format!("after {name}"))?;
    }
    let log = hf.log();
    ensure!(
        log.contains("received SIGUSR1") && log.contains("upgraded in place: resumed"),
        "the ignored signals are not logged, or SIGUSR2 did not upgrade in place:\n{log}"
    );
    hf.stop()
}

/// `bpftool -j link show`, the sk_lookup links on the network namespace of
/// inode `netns_ino`: their link ids.
fn sk_lookup_links(netns_ino: u64) -> Result<Vec<u64>> {
    let mut cmd = Command::new("bpftool");
    cmd.args(["-j", "link", "show"]);
    let out = run_bounded(cmd, T)?;
    ensure!(out.status.success(), "bpftool link show: {out:?}");
    let all: Value = serde_json::from_slice(&out.stdout).context("bpftool -j printed no JSON")?;
    Ok(all
        .as_array()
        .into_iter()
        .flatten()
        .filter(|l| {
            l["type"] == "netns" && l["attach_type"] == "sk_lookup" && l["netns_ino"] == netns_ino
        })
        .filter_map(|l| l["id"].as_u64())
        .collect())
}

#[test]
fn after_kill_9_under_ip_netns_exec_the_next_holdfast_replaces_the_stale_link() -> Result<()> {
    if !require_file("/usr/sbin/bpftool") {
        return Ok(());
    }
    let (ns, sandbox) = skip_unless!(netns_with_web()?);
    let netns_ino = std::fs::metadata(ns.path())?.ino();
    // Each `ip netns exec` gets its own mount namespace, /sys and bpffs: the
    // second daemon cannot see the first one's pins.
    let opts = RunOptions {
        wrapper: vec!["ip".into(), "netns".into(), "exec".into(), ns.name().into()],
        ..RunOptions::default()
    };
    let mut first = skip_unless!(Holdfast::start_dispatched(&ns, sandbox, &opts)?);
    let orphan = first.wait_running("web", T)?;
    let before = sk_lookup_links(netns_ino)?;
    ensure!(
        before.len() == 1,
        "one link while the first runs: {before:?}"
    );
    // Its orphans keep its mount namespace (so its bpffs, so the pinned link)
    // alive, until they die of their closed output pipes; so does this fd,
    // whatever they do.
    let _first_mounts = std::fs::File::open(format!("/proc/{}/ns/mnt", first.pid()))?;
    first.signal(Signal::SIGKILL)?;
    first.wait_exit(T)?;

    // On the same state dir: the orphan is found, its listener taken back
    // and itself stopped; no service runs twice.
    let second = skip_unless!(Holdfast::start_dispatched(
        &ns,
        first.into_sandbox()?,
        &opts
    )?);
    let pid = second.wait_running("web", T)?;
    ensure!(pid != orphan, "the new daemon's service is the orphan?");
    wait_for(&format!("the orphan {orphan} to be stopped"), T, || {
        process_gone(orphan).then_some(())
    })?;
    let after = sk_lookup_links(netns_ino)?;
    ensure!(
        after.len() == 1 && after != before,
        "want only the new daemon's link, the stale one {before:?} gone; links now: {after:?}"
    );
    for _ in 0..20 {
        let answer = ns.run(|| ask_tcp(ADDR.parse().expect("literal"), T))??;
        ensure!(
            answer == format!("web {pid}\n"),
            "answered by {answer:?}, not the new daemon's web {pid} (the orphan is {orphan})"
        );
    }
    let log = second.log();
    ensure!(
        log.contains("detached a stale holdfast sk_lookup link"),
        "no word of the stale link:\n{log}"
    );
    Ok(())
}

/// `kill -9` of holdfast under a client loop, then a new holdfast on the same
/// units and state dir: it takes the listener back from the orphaned service
/// (the same socket, so what queued in the gap is served), stops the orphan
/// (no service runs twice; in bind mode no `Address already in use`), and the
/// loop sees no refused connection.
fn after_kill_9_the_next_holdfast_takes_the_listeners_back(dispatcher: bool) -> Result<()> {
    let (ns, sandbox) = skip_unless!(netns_with_web()?);
    let first = skip_unless!(Holdfast::start_in_mode(&ns, sandbox, dispatcher)?);
    let orphan = first.wait_running("web", T)?;
    let client = LoopClient::start(
        &ns,
        vec![(ADDR.parse()?, "web".into())],
        Duration::from_millis(5),
        T,
    )?;
    std::thread::sleep(Duration::from_millis(200));
    first.signal(Signal::SIGKILL)?;
    let mut first = first;
    first.wait_exit(T)?;
    // The gap: the orphan still serves what it accepts.
    std::thread::sleep(Duration::from_millis(300));
    let second = Holdfast::start_in_mode(&ns, first.into_sandbox()?, dispatcher)?
        .context("the second holdfast fell back to bind mode")?;
    let pid = second.wait_running("web", T)?;
    ensure!(pid != orphan, "the new daemon's service is the orphan?");
    wait_for(&format!("the orphan {orphan} to be stopped"), T, || {
        process_gone(orphan).then_some(())
    })?;
    std::thread::sleep(Duration::from_millis(300));
    let tally = client.finish()?;
    eprintln!("across kill -9 and recovery: {tally:?}");
    // The orphan, stopped, may close one connection it had accepted.
    tally.expect_no_loss(1)?;
    ensure!(
        tally.pids_of("web").contains(&pid),
        "the new instance {pid} never answered: {tally:?}"
    );
    let log = second.log();
    ensure!(
        log.contains("took their listeners back") && log.contains("web.web"),
        "no word of taking the listener back:\n{log}"
    );
    let status = second.service("web")?;
    ensure!(status["restarts"] == 0, "{status}");
    Ok(())
}

tests_of!(after_kill_9_the_next_holdfast_takes_the_listeners_back:
    after_kill_9_in_bind_mode_the_next_holdfast_takes_the_listener_back => (false),
    after_kill_9_with_the_dispatcher_the_next_holdfast_takes_the_listener_back => (true),
);
