//! The `holdfast` binary as a user runs it: `check` on bad units, the CLI whose
//! reader goes away (`holdfast status | head -1`), which must end quietly as
//! coreutils do (killed by SIGPIPE), not panic, and the daemon at its fd limit.

use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use holdfast_testkit::{
    holdfast_bin, holdfast_check, holdfast_cli, netns_and_sandbox, proc_cpu_time, run_bounded,
    skip_unless, wait_for, Holdfast, RunOptions, Sandbox, CLI_TIMEOUT, READY_TIMEOUT,
};

/// Runs `holdfast ARGS…` with stdout a pipe whose reader is already gone.
fn with_closed_stdout(args: &[&str]) -> Result<Output> {
    let (reader, writer) = nix::unistd::pipe()?;
    drop(reader);
    let mut child = Command::new(holdfast_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(writer))
        .stderr(Stdio::piped())
        .spawn()
        .context("spawn holdfast")?;
    let exited = wait_for("holdfast to exit", CLI_TIMEOUT, || {
        child.try_wait().ok().flatten()
    });
    if exited.is_err() {
        let _ = child.kill();
    }
    exited?;
    Ok(child.wait_with_output()?)
}

fn assert_quiet_sigpipe(what: &str, out: &Output) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("panicked") && !stderr.contains("Broken pipe"),
        "{what}: {stderr}"
    );
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGPIPE),
        "{what}: should die of SIGPIPE as coreutils do, got {:?}; stderr: {stderr}",
        out.status
    );
}

#[test]
fn check_with_its_reader_gone_dies_of_sigpipe_quietly() -> Result<()> {
    let sandbox = Sandbox::new()?;
    sandbox.write_unit("web", "[service]\nexec = [\"/bin/true\"]\n")?;
    let units = sandbox.units_dir();
    let out = with_closed_stdout(&["check", &units.to_string_lossy()])?;
    assert_quiet_sigpipe("holdfast check", &out);
    Ok(())
}

#[test]
fn check_refuses_a_duration_that_would_overflow_a_deadline() -> Result<()> {
    let sandbox = Sandbox::new()?;
    let file = sandbox.write_unit(
        "web",
        "[service]\nexec = [\"/bin/true\"]\nstop-timeout = \"18446744073709551615s\"\n",
    )?;
    let stderr = holdfast_check(&sandbox.units_dir(), 1)?;
    assert!(
        stderr.contains(&format!(
            "{}:3:16: service.stop-timeout: \"18446744073709551615s\" is more than the largest duration allowed, 1year",
            file.display()
        )),
        "{stderr}"
    );
    Ok(())
}

#[test]
fn status_and_logs_follow_with_their_reader_gone_die_of_sigpipe_quietly() -> Result<()> {
    let (ns, sandbox) = skip_unless!(netns_and_sandbox()?);
    sandbox.write_unit(
        "talker",
        "[service]\nexec = [\"/bin/sh\", \"-c\", \"while :; do echo tick; sleep 0.1; done\"]\n",
    )?;
    let mut hf = Holdfast::start_in(&ns, sandbox)?;
    let state = hf.sandbox().state_dir().to_string_lossy().into_owned();
    let out = with_closed_stdout(&["status", "--state-dir", &state])?;
    assert_quiet_sigpipe("holdfast status", &out);
    let out = with_closed_stdout(&["logs", "-f", "talker", "--state-dir", &state])?;
    assert_quiet_sigpipe("holdfast logs -f", &out);
    // And through a real `head`, as a user types it: only head's lines, no complaint.
    let bin = holdfast_bin();
    let bin = bin.display();
    for line in [
        format!("{bin} status --state-dir {state} | head -1"),
        format!("{bin} logs -f talker --state-dir {state} | head -2"),
    ] {
        let mut sh = Command::new("/bin/sh");
        sh.args(["-c", &line]);
        let out = run_bounded(sh, CLI_TIMEOUT)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{line}: {:?} {stderr}", out.status);
        assert!(stderr.is_empty(), "{line}: {stderr}");
    }
    hf.stop()
}

#[test]
fn control_connections_at_the_fd_limit_do_not_spin_the_daemon() -> Result<()> {
    let (ns, sandbox) = skip_unless!(netns_and_sandbox()?);
    let opts = RunOptions {
        max_open_files: Some(24),
        ..RunOptions::default()
    };
    let mut hf = Holdfast::start_with(&ns, sandbox, &opts)?;
    let path = hf.sandbox().control_socket();
    // More idle connections than the daemon has fds: the rest wait in the
    // backlog, the listener stays readable and accept gets EMFILE.
    let idle = (0..40)
        .map(|_| UnixStream::connect(&path))
        .collect::<std::io::Result<Vec<UnixStream>>>()?;
    std::thread::sleep(Duration::from_millis(500));
    let cpu = || proc_cpu_time(hf.pid()).context("the daemon's /proc/PID/stat");
    let before = cpu()?;
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu()? - before;
    let log = hf.log();
    let accept_lines = log.lines().filter(|l| l.contains("accept failed")).count();
    ensure!(
        used < Duration::from_millis(400),
        "the daemon used {used:?} of CPU in 2 s at its fd limit (a busy loop); {accept_lines} accept lines"
    );
    ensure!(
        (1..=10).contains(&accept_lines),
        "{accept_lines} \"accept failed\" lines, want a few (rate-limited):\n{}",
        &log[..log.len().min(2000)]
    );
    ensure!(log.contains("out of file descriptors"), "{log}");
    // Once the idle clients leave, the daemon answers again.
    drop(idle);
    hf.wait_ready(READY_TIMEOUT)
        .context("no answer after the idle connections closed")?;
    hf.stop()
}

/// A unit naming what this machine does not have.
const MISSING_THINGS: &str = "[service]\nexec = [\"/nonexistent/prog\"]\nuser = \"no-such-user-hf\"\ngroup = \"no-such-group-hf\"\n";

#[test]
fn check_refuses_users_groups_and_programs_that_do_not_exist() -> Result<()> {
    let sandbox = Sandbox::new()?;
    let web = sandbox.write_unit("web", MISSING_THINGS)?;
    sandbox.write_unit("ok", "[service]\nexec = [\"sh\"]\n")?;
    let long = "n".repeat(82);
    sandbox.write_unit(&long, "[service]\nexec = [\"sh\"]\n")?;
    let units = sandbox.units_dir();
    let out = holdfast_cli(&[
        "check",
        &units.to_string_lossy(),
        "--state-dir",
        "/run/holdfast",
    ])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let web = web.display();
    for want in [
        format!("{web}:2:9: service.exec[0]: program /nonexistent/prog: No such file"),
        format!("{web}:3:8: service.user: user \"no-such-user-hf\" does not exist"),
        format!("{web}:4:9: service.group: group \"no-such-group-hf\" does not exist"),
        format!("{long}.toml: the service name is too long for its notify socket"),
    ] {
        ensure!(stderr.contains(&want), "missing {want:?} in:\n{stderr}");
    }
    ensure!(!stderr.contains("ok.toml"), "{stderr}");
    Ok(())
}

#[test]
fn reload_refuses_what_check_refuses_and_the_daemon_keeps_running() -> Result<()> {
    let (ns, sandbox) = skip_unless!(netns_and_sandbox()?);
    let mut hf = Holdfast::start_in(&ns, sandbox)?;
    hf.sandbox().write_unit("web", MISSING_THINGS)?;
    let stderr = hf.cli_err(&["reload"])?;
    ensure!(
        stderr.contains("user \"no-such-user-hf\" does not exist"),
        "{stderr}"
    );
    hf.wait_ready(READY_TIMEOUT)?;
    hf.stop()
}
