//! sd_notify with real senders: Debian's `systemd-notify` run from a shell-script
//! service (also when the sender is gone before holdfast reads its message), and a
//! Python service writing to NOTIFY_SOCKET itself (tests/src/notifier.py). Each
//! message is checked in `holdfast status --json` or in what the service goes
//! through; foreign senders are ignored; a notify service that never says READY=1
//! is stopped at its start-timeout and restarted per policy.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use holdfast_testkit::{
    netns_and_notifier, netns_and_sandbox, netns_and_sandbox_with_tools, notifier_running,
    notifier_started, process_gone, reply_pid, send_notify_as, send_notify_from_here, skip_unless,
    tell, toml_str, wait_for, Holdfast, Netns, Sandbox,
};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(10);
const NOBODY: u32 = 65534;

fn web() -> SocketAddr {
    "127.0.0.1:8080".parse().expect("literal")
}

/// A `type = "notify"` shell-script service.
fn shell_unit(script: &str, extra: &str) -> String {
    format!(
        "[service]\nexec = [\"/bin/sh\", \"-c\", {}]\ntype = \"notify\"\n{extra}\n",
        toml_str(script)
    )
}

fn touch(p: &Path) -> Result<()> {
    std::fs::write(p, b"").with_context(|| format!("create {}", p.display()))
}

#[test]
fn systemd_notify_ready_and_status_from_a_shell_script() -> Result<()> {
    let (ns, sandbox) = skip_unless!(netns_and_sandbox_with_tools(&["/usr/bin/systemd-notify"])?);
    let (go, env) = (sandbox.out("go"), sandbox.out("env"));
    let script = format!(
        "echo \"$NOTIFY_SOCKET\" > {env}; systemd-notify --status=warming-up; \
         while [ ! -e {go} ]; do sleep 0.05; done; \
         systemd-notify --ready --status=\"serving as $$\"; exec sleep 1000",
        env = env.display(),
        go = go.display()
    );
    sandbox.write_unit("shell", &shell_unit(&script, "start-timeout = \"25s\""))?;
    let socket = sandbox.notify_socket("shell");
    let mut hf = Holdfast::start_in(&ns, sandbox)?;

    // STATUS= before READY=1: shown while the service is still starting.
    let s = hf.wait_service("shell", T, |s| s["status_text"] == "warming-up")?;
    assert_eq!(s["state"], "starting", "{s}");
    assert_eq!(s["ready"], false, "{s}");
    let pid = s["pid"].as_i64().context("a starting service has a pid")?;
    let given = wait_for("the service's NOTIFY_SOCKET", T, || {
        std::fs::read_to_string(&env)
            .ok()
            .filter(|t| t.ends_with('\n'))
    })?;
    assert_eq!(Path::new(given.trim()), socket, "NOTIFY_SOCKET");
    std::thread::sleep(Duration::from_millis(500));
    let s = hf.service("shell")?;
    assert_eq!(s["state"], "starting", "running without READY=1: {s}");

    touch(&hf.sandbox().out("go"))?;
    let s = hf.wait_state("shell", "running", T)?;
    assert_eq!(s["ready"], true, "{s}");
    assert_eq!(s["pid"], pid, "{s}");
    assert_eq!(s["status_text"], format!("serving as {pid}"), "{s}");
    assert_eq!(s["restarts"], 0, "{s}");
    hf.stop()
}

/// The race systemd has: `systemd-notify` (which claims its parent's pid) and that
/// parent are gone, reaped, when holdfast reads the message. The daemon is
/// SIGSTOPped meanwhile so that the message is certainly read afterwards.
#[test]
fn systemd_notify_is_heard_when_its_sender_is_gone_before_the_read() -> Result<()> {
    let (ns, sandbox) = skip_unless!(netns_and_sandbox_with_tools(&["/usr/bin/systemd-notify"])?);
    let (go, sender, sent) = (
        sandbox.out("go"),
        sandbox.out("sender"),
        sandbox.out("sent"),
    );
    let script = format!(
        "while [ ! -e {go} ]; do sleep 0.05; done; \
         sh -c 'systemd-notify --no-block --ready --status=from-a-gone-sender; exit 0' & \
         echo $! > {sender}; wait $!; touch {sent}; exec sleep 1000",
        go = go.display(),
        sender = sender.display(),
        sent = sent.display()
    );
    // The sender is not the main process: as under systemd, that takes
    // NotifyAccess=all. Tracked by cgroup, the gone sender is judged by the
    // cgroup it exited in.
    sandbox.write_unit(
        "late",
        &shell_unit(&script, "start-timeout = \"25s\"\nnotify-access = \"all\""),
    )?;
    let mut hf = Holdfast::start_in(&ns, sandbox)?;
    let s = hf.wait_state("late", "starting", T)?;
    let pid = s["pid"].clone();

    hf.signal(Signal::SIGSTOP)?;
    let resumed = (|| -> Result<i32> {
        touch(&go)?;
        wait_for("the script to have sent", T, || sent.exists().then_some(()))?;
        let gone: i32 = std::fs::read_to_string(&sender)?.trim().parse()?;
        ensure!(
            process_gone(gone),
            "the sender's parent {gone} still exists"
        );
        Ok(gone)
    })();
    hf.signal(Signal::SIGCONT)?;
    let gone = resumed?;

    let s = hf.wait_state("late", "running", T)?;
    assert_eq!(s["pid"], pid, "{s}");
    assert_eq!(s["status_text"], "from-a-gone-sender", "{s}");
    assert!(
        !hf.log().contains("outside the service ignored"),
        "the message of the gone sender {gone} was refused:\n{}",
        hf.log()
    );
    hf.stop()
}

#[test]
fn python_sender_ready_status_reloading_errno_stopping() -> Result<()> {
    let (ns, mut hf) = skip_unless!(notifier_started("py", &[], "start-timeout = \"25s\"")?);
    let _inside = ns.enter()?;
    let s = hf.wait_state("py", "starting", T)?;
    let pid = s["pid"].as_i64().context("pid")? as i32;
    assert_eq!(s["ready"], false, "{s}");

    tell(web(), "notify STATUS=warming up")?;
    let s = hf.wait_service("py", T, |s| s["status_text"] == "warming up")?;
    assert_eq!(s["state"], "starting", "{s}");

    tell(web(), "notify READY=1\\nSTATUS=serving")?;
    let s = hf.wait_state("py", "running", T)?;
    assert_eq!(
        (&s["ready"], &s["status_text"], &s["pid"]),
        (&json!(true), &json!("serving"), &json!(pid)),
        "{s}"
    );

    tell(
        web(),
        "notify RELOADING=1\\nSTATUS=reloading its configuration",
    )?;
    let s = hf.wait_state("py", "reloading", T)?;
    assert_eq!(s["status_text"], "reloading its configuration", "{s}");
    assert_eq!(s["pid"], pid, "{s}");
    tell(web(), "notify READY=1\\nSTATUS=reloaded")?;
    let s = hf.wait_state("py", "running", T)?;
    assert_eq!(s["status_text"], "reloaded", "{s}");

    assert_eq!(hf.service("py")?["errno"], Value::Null);
    tell(web(), "notify ERRNO=28\\nSTATUS=disk full")?;
    let s = hf.wait_service("py", T, |s| s["errno"] == 28)?;
    assert_eq!(s["status_text"], "disk full", "{s}");

    tell(web(), "notify STOPPING=1")?;
    let s = hf.wait_state("py", "stopping", T)?;
    assert_eq!(s["pid"], pid, "{s}");
    assert!(!process_gone(pid), "STOPPING=1 is news, not a stop: {s}");
    // It exits by itself, 0: restart = "on-failure" leaves it stopped.
    tell(web(), "exit 0")?;
    let s = hf.wait_state("py", "stopped", T)?;
    assert_eq!(s["restarts"], 0, "{s}");
    assert_eq!(s["last_exit"], "exit code 0", "{s}");
    drop(_inside);
    hf.stop()
}

#[test]
fn mainpid_moves_the_main_process_within_the_service_only() -> Result<()> {
    let (ns, mut hf, first) =
        skip_unless!(notifier_running("py", &[], "restart-delay = \"100ms\"")?);
    let _inside = ns.enter()?;

    // Outside the service: pid 1, and this test process.
    for outside in [1, std::process::id() as i32] {
        tell(web(), &format!("notify MAINPID={outside}"))?;
        let pid = format!("pid={outside}");
        hf.wait_log_line(&["MAINPID= names a process outside the service", &pid], T)?;
        assert_eq!(hf.service("py")?["pid"], first, "MAINPID={outside} obeyed");
    }

    let child = reply_pid(&tell(web(), "fork")?)?;
    tell(web(), &format!("notify MAINPID={child}"))?;
    let s = hf.wait_service("py", T, |s| s["pid"] == child)?;
    assert_eq!(s["state"], "running", "{s}");

    // The old main process exiting is not the service exiting…
    tell(web(), "exit 0")?;
    wait_for("the first main process to go", T, || {
        process_gone(first).then_some(())
    })?;
    std::thread::sleep(Duration::from_millis(500));
    let s = hf.service("py")?;
    assert_eq!(
        (&s["state"], &s["pid"], &s["restarts"]),
        (&json!("running"), &json!(child), &json!(0)),
        "after the old main pid exited: {s}"
    );
    // …the new one's is (holdfast, the subreaper, reaps the orphan).
    kill(Pid::from_raw(child), Signal::SIGKILL)?;
    let s = hf.wait_service("py", T, |s| {
        s["state"] == "running" && s["pid"].is_i64() && s["pid"] != child && s["pid"] != first
    })?;
    assert_eq!(s["restarts"], 1, "{s}");
    assert_eq!(s["last_exit"], "killed by SIGKILL", "{s}");
    drop(_inside);
    hf.stop()
}

/// Forks `sleep 30` with pid `pid`, set through `/proc/sys/kernel/ns_last_pid`
/// (other processes may take it first: tried again a while).
fn stranger_with_pid(pid: i32) -> Result<std::process::Child> {
    for _ in 0..500 {
        std::fs::write("/proc/sys/kernel/ns_last_pid", format!("{}", pid - 1))
            .context("write /proc/sys/kernel/ns_last_pid")?;
        let mut c = std::process::Command::new("sleep").arg("30").spawn()?;
        if c.id() as i32 == pid {
            return Ok(c);
        }
        c.kill()?;
        c.wait()?;
    }
    anyhow::bail!("pid {pid} was never handed to the stranger")
}

#[test]
fn a_mainpid_reaped_by_its_own_parent_is_seen_to_exit_and_its_reused_pid_gets_no_signal(
) -> Result<()> {
    let (ns, mut hf, first) = skip_unless!(notifier_running(
        "py",
        &[],
        "restart = \"on-failure\"\nrestart-delay = \"100ms\""
    )?);
    let _inside = ns.enter()?;
    let child = reply_pid(&tell(web(), "fork")?)?;
    tell(web(), &format!("notify MAINPID={child}"))?;
    hf.wait_service("py", T, |s| s["pid"] == child)?;

    // The main process exits and its parent (not holdfast) reaps it; its
    // number goes to a stranger; then the service asks for SIGABRT.
    // (Its reply may be lost: holdfast may stop the service first.)
    let _ = tell(web(), &format!("end-child {child}"));
    wait_for("the MAINPID= process to go", T, || {
        process_gone(child).then_some(())
    })?;
    let mut stranger = stranger_with_pid(child)?;
    // Sent only if holdfast has not stopped the instance yet (restart on
    // failure); either way nothing may signal the stranger: neither the
    // watchdog's SIGABRT nor the stop of the instance.
    let _ = tell(web(), "then-notify WATCHDOG=trigger");
    std::thread::sleep(Duration::from_millis(500));
    let stranger_exit = stranger.try_wait()?;
    let _ = stranger.kill();
    let _ = stranger.wait();
    assert_eq!(
        stranger_exit,
        None,
        "the process that got the old main pid was signalled; log:\n{}",
        hf.log()
    );
    hf.wait_log_line(&["its exit status is unknown", &format!("pid={child}")], T)?;
    let s = hf.wait_service("py", T, |s| {
        s["state"] == "running" && s["pid"].is_i64() && s["pid"] != child && s["pid"] != first
    })?;
    assert!(s["restarts"].as_u64() >= Some(1), "not restarted: {s}");
    drop(_inside);
    hf.stop()
}

#[test]
fn extend_timeout_usec_extends_the_start_timeout() -> Result<()> {
    // Without the extension it would be stopped 1.5 s after it started.
    let (_ns, mut hf) = skip_unless!(notifier_started(
        "slow",
        &["--extend", "8000000", "--ready", "--ready-after", "3.5"],
        "start-timeout = \"1500ms\"\nrestart = \"always\""
    )?);
    let started = Instant::now();
    let s = hf.wait_state("slow", "starting", T)?;
    let pid = s["pid"].clone();
    std::thread::sleep(Duration::from_millis(2500).saturating_sub(started.elapsed()));
    let s = hf.service("slow")?;
    assert_eq!(
        (&s["state"], &s["pid"]),
        (&json!("starting"), &pid),
        "stopped at start-timeout despite EXTEND_TIMEOUT_USEC: {s}"
    );
    let s = hf.wait_state("slow", "running", T)?;
    assert_eq!((&s["pid"], &s["restarts"]), (&pid, &json!(0)), "{s}");
    assert_eq!(hf.sandbox().starts("slow").len(), 1);
    hf.stop()
}

#[test]
fn extend_timeout_usec_extends_the_stop_timeout() -> Result<()> {
    let (ns, sandbox) = skip_unless!(netns_and_sandbox()?);
    for (name, port) in [("extends", 8080), ("plain", 8081)] {
        sandbox.write_notifier_unit(name, port, &["--ready"], "stop-timeout = \"1s\"")?;
    }
    let (mut hf, _) = Holdfast::start_running(&ns, sandbox, "extends")?;
    hf.wait_running("plain", T)?;
    ns.run(|| -> Result<()> {
        // Both take 2.5 s to stop after SIGTERM; one asks for 6 s.
        tell(web(), "term-plan 6000000 2.5")?;
        tell("127.0.0.1:8081".parse()?, "term-plan 0 2.5")?;
        Ok(())
    })??;

    let asked = Instant::now();
    hf.cli_ok(&["stop", "extends"])?;
    let took = asked.elapsed();
    let s = hf.service("extends")?;
    assert_eq!(
        s["last_exit"], "exit code 0",
        "SIGKILLed despite EXTEND_TIMEOUT_USEC: {s}"
    );
    assert!(hf.sandbox().out("extends.term-done").exists(), "{s}");
    assert!(took >= Duration::from_secs(2), "stopped after {took:?}");

    // The control: without the extension, SIGKILL after stop-timeout (1 s).
    hf.cli_ok(&["stop", "plain"])?;
    let s = hf.service("plain")?;
    assert_eq!(s["last_exit"], "killed by SIGKILL", "{s}");
    assert!(!hf.sandbox().out("plain.term-done").exists(), "{s}");
    hf.stop()
}

/// Samples the status of `name` every 20 ms for `d`; returns every sample.
fn watch(hf: &Holdfast, name: &str, d: Duration) -> Result<Vec<Value>> {
    let end = Instant::now() + d;
    let mut seen = Vec::new();
    while Instant::now() < end {
        seen.push(hf.service(name)?);
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(seen)
}

const NEVER_READY_POLICY: &str = "start-timeout = \"500ms\"\nrestart-delay = \"100ms\"\n\
    restart-delay-max = \"200ms\"\nstart-limit-burst = 100";

/// Starts the daemon on `sandbox` and watches `name`, a notify service that
/// never says READY=1, for 3 s: never running or ready, stopped at its
/// start-timeout (500 ms) and restarted (the default `restart = "on-failure"`)
/// again and again; then stops the daemon.
fn never_running_and_restarted(ns: &Netns, sandbox: Sandbox, name: &str) -> Result<()> {
    let mut hf = Holdfast::start_in(ns, sandbox)?;
    for s in watch(&hf, name, Duration::from_secs(3))? {
        ensure!(
            s["state"] != "running" && s["ready"] != true,
            "never said READY=1, yet {s}"
        );
    }
    let s = hf.service(name)?;
    let starts = hf.sandbox().starts(name);
    ensure!(
        starts.len() >= 3 && s["restarts"].as_u64() >= Some(2),
        "{name}: {} starts in 3 s with start-timeout 500ms, not restarted after its start timeout: {s}",
        starts.len(),
    );
    ensure!(
        s["state"] != "failed" && s["state"] != "stopped",
        "{name} left {} after its start timeout: {s}",
        s["state"]
    );
    hf.wait_log_line(&["did not send READY=1 within start-timeout", name], T)?;
    hf.stop()
}

#[test]
fn never_ready_is_stopped_at_start_timeout_and_restarted() -> Result<()> {
    let (ns, sandbox) = skip_unless!(netns_and_sandbox()?);
    let starts = sandbox.out("mute.starts");
    // The shell dies of the SIGTERM.
    let script = format!("echo $$ >> {}; exec sleep 1000", starts.display());
    sandbox.write_unit("mute", &shell_unit(&script, NEVER_READY_POLICY))?;
    never_running_and_restarted(&ns, sandbox, "mute")
}

/// systemd counts a start timeout as a failure (result "timeout") whatever the
/// exit status, so `Restart=on-failure` restarts the service; so does holdfast,
/// even when the service exits 0 on the SIGTERM.
#[test]
fn never_ready_that_exits_0_on_sigterm_is_restarted_too() -> Result<()> {
    let (ns, sandbox) = skip_unless!(netns_and_notifier("polite", &[], NEVER_READY_POLICY)?);
    never_running_and_restarted(&ns, sandbox, "polite")
}

#[test]
fn foreign_senders_are_ignored() -> Result<()> {
    let (ns, sandbox) = skip_unless!(netns_and_notifier("py", &[], "start-timeout = \"25s\"")?);
    let socket = sandbox.notify_socket("py");
    let mut hf = Holdfast::start_in(&ns, sandbox)?;
    let s = hf.wait_state("py", "starting", T)?;
    let pid = s["pid"].clone();
    let refused = |pid: i32| -> Result<()> {
        hf.wait_log_line(&["outside the service ignored", &format!("pid={pid}")], T)
            .map(drop)
    };

    // This test process: root, alive, in a process group of its own.
    send_notify_from_here(&socket, "READY=1\nSTATUS=forged by root")?;
    refused(std::process::id() as i32)?;

    // nobody, alive.
    let mut alive = send_notify_as(
        NOBODY,
        NOBODY,
        &socket,
        "READY=1\nSTATUS=forged by nobody",
        T,
    )?;
    refused(alive.id() as i32)?;
    alive.kill()?;
    alive.wait()?;

    // nobody, gone (reaped) before holdfast reads.
    hf.signal(Signal::SIGSTOP)?;
    let gone = send_notify_as(
        NOBODY,
        NOBODY,
        &socket,
        "READY=1\nSTATUS=forged by a gone nobody",
        Duration::ZERO,
    )
    .and_then(|mut c| {
        c.wait()?;
        Ok(c.id() as i32)
    });
    hf.signal(Signal::SIGCONT)?;
    refused(gone?)?;

    // A child of the service in a session (process group) of its own.
    let escaped = ns.run(|| {
        tell(
            web(),
            "setsid-send READY=1\\nSTATUS=forged by an escaped child",
        )
    })??;
    refused(reply_pid(&escaped)?)?;

    let s = hf.service("py")?;
    assert_eq!(
        (&s["state"], &s["ready"], &s["status_text"], &s["pid"]),
        (&json!("starting"), &json!(false), &Value::Null, &pid),
        "a foreign message was obeyed: {s}"
    );
    // The service itself is heard.
    ns.run(|| tell(web(), "notify READY=1\\nSTATUS=genuine"))??;
    let s = hf.wait_state("py", "running", T)?;
    assert_eq!(s["status_text"], "genuine", "{s}");
    hf.stop()
}

/// The issue: STATUS= is "shown by `holdfast status`": in the JSON
/// (`status_text`, checked above) and in the table's STATUS column.
#[test]
fn status_text_is_shown_by_the_status_table() -> Result<()> {
    let (_ns, mut hf) = skip_unless!(notifier_started(
        "py",
        &["--ready", "--status", "serving-42-clients"],
        ""
    )?);
    hf.wait_service("py", T, |s| s["status_text"] == "serving-42-clients")?;
    let table = hf.cli_ok(&["status"])?;
    assert!(
        table.contains("serving-42-clients"),
        "holdfast status printed:\n{table}"
    );
    let one = hf.cli_ok(&["status", "py"])?;
    assert!(
        one.contains("serving-42-clients"),
        "holdfast status py printed:\n{one}"
    );
    hf.stop()
}

/// A service whose `notify-access` is `none` (the default of `type = "simple"`) is not
/// given NOTIFY_SOCKET, so holdfast binds no notify socket for it (at 1000 services that
/// was a third of the start-up); a reload that makes it `type = "notify"` makes the socket
/// before the restart, and the new instance's READY=1 through it is heard.
#[test]
fn a_simple_service_gets_a_notify_socket_only_once_a_reload_lets_it_notify() -> Result<()> {
    let (ns, sandbox) = skip_unless!(netns_and_sandbox_with_tools(&["/usr/bin/systemd-notify"])?);
    let env = sandbox.out("env");
    let script = format!(
        "echo \"${{NOTIFY_SOCKET-unset}}\" > {env}; exec sleep 1000",
        env = env.display()
    );
    sandbox.write_sh_service("shell", &script, "")?;
    let socket = sandbox.notify_socket("shell");
    let mut hf = Holdfast::start_in(&ns, sandbox)?;
    let pid = hf.wait_running("shell", T)?;
    let given = wait_for("the simple service's NOTIFY_SOCKET", T, || {
        std::fs::read_to_string(&env)
            .ok()
            .filter(|t| t.ends_with('\n'))
    })?;
    assert_eq!(given.trim(), "unset", "NOTIFY_SOCKET of a simple service");
    assert!(
        !socket.exists(),
        "a notify socket {} was made for a service that may not notify",
        socket.display()
    );

    std::fs::remove_file(&env)?;
    let script = format!(
        "echo \"$NOTIFY_SOCKET\" > {env}; systemd-notify --ready; exec sleep 1000",
        env = env.display()
    );
    hf.sandbox().write_unit("shell", &shell_unit(&script, ""))?;
    hf.cli_ok(&["reload"])?;
    let s = hf.wait_service("shell", T, |s| {
        s["state"] == "running" && s["ready"] == true && s["pid"] != pid
    })?;
    let given = wait_for("the notify service's NOTIFY_SOCKET", T, || {
        std::fs::read_to_string(&env)
            .ok()
            .filter(|t| t.ends_with('\n'))
    })?;
    assert_eq!(
        Path::new(given.trim()),
        socket,
        "NOTIFY_SOCKET after the reload"
    );
    assert!(socket.exists(), "no notify socket after the reload: {s}");
    hf.stop()
}
