//! The commands a service runs beside its main process: `exec-start-pre`
//! runs before every start, with the service's environment, directory and
//! cgroup but no socket, its output in the service's log; its failure fails
//! the start (restart policy, start limit); a stop stops it; an in-place
//! upgrade carries it over.

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};

use holdfast_testkit::{
    netns_and_sandbox, process_gone, skip_unless, toml_str, wait_for, Holdfast, Netns, Sandbox,
};

const T: Duration = Duration::from_secs(10);

/// [`netns_and_sandbox`] with `units/web.toml` on 127.0.0.1:8080, its `[service]`
/// lines made by `service` from the sandbox's out dir: `Ok(None)` means skip.
fn web_sandbox(service: impl FnOnce(&Path) -> String) -> Result<Option<(Netns, Sandbox)>> {
    let Some((ns, sandbox)) = netns_and_sandbox()? else {
        return Ok(None);
    };
    sandbox.write_local_unit("web", 8080, &service(&sandbox.out_dir()))?;
    Ok(Some((ns, sandbox)))
}

fn sh(script: &str) -> String {
    format!("[\"/bin/sh\", \"-c\", {}]", toml_str(script))
}

#[test]
fn pre_commands_run_before_the_main_process_with_its_environment_but_no_socket() -> Result<()> {
    let (ns, sandbox) = skip_unless!(web_sandbox(|out| {
        let pre = format!(
            "echo \"$GREETING $(pwd) fds=${{LISTEN_FDS:-none}} $(cat /proc/self/cgroup)\" > {out}/pre; echo pre says hello",
            out = out.display()
        );
        // The main process sees what the pre command left, and its own sockets.
        let main = format!(
            "cp {out}/pre {out}/main-saw && echo \"fds=$LISTEN_FDS\" >> {out}/main-saw; exec sleep 1000",
            out = out.display()
        );
        format!(
            "exec = {main}\nexec-start-pre = [{pre}, [\"-/bin/false\"]]\nenvironment = {{ GREETING = \"hi\" }}\nworking-directory = {dir}\n",
            main = sh(&main),
            pre = sh(&pre),
            dir = toml_str(&out.display().to_string()),
        )
    })?);
    let (hf, _) = Holdfast::start_running(&ns, sandbox, "web")?;
    let out = hf.sandbox().out_dir();
    let saw = wait_for("main-saw", T, || {
        std::fs::read_to_string(out.join("main-saw"))
            .ok()
            .filter(|t| t.contains("fds=1"))
    })?;
    ensure!(
        saw.starts_with(&format!("hi {} fds=none ", out.display())),
        "the pre command's view: {saw:?}"
    );
    ensure!(
        saw.contains("web.service"),
        "not in the service's cgroup: {saw:?}"
    );
    let logs = hf.cli_ok(&["logs", "web"])?;
    ensure!(
        logs.contains("pre says hello"),
        "its output is not in the log: {logs}"
    );
    ensure!(
        hf.service("web")?["restarts"] == 0,
        "the - command's failure counted"
    );
    Ok(())
}

#[test]
fn a_failing_pre_command_fails_the_start_and_the_service_at_the_start_limit() -> Result<()> {
    let (ns, sandbox) = skip_unless!(web_sandbox(|out| {
        format!(
                "exec = {main}\nexec-start-pre = [{pre}]\nrestart = \"always\"\nrestart-delay = \"100ms\"\nstart-limit-burst = 3\nstart-limit-interval = \"30s\"\n",
                main = sh(&format!("touch {}/main; exec sleep 1000", out.display())),
                pre = sh(&format!("echo try >> {}/tries; exit 3", out.display())),
        )
    })?);
    let hf = Holdfast::start_in(&ns, sandbox)?;
    let failed = hf.wait_state("web", "failed", Duration::from_secs(15))?;
    let out = hf.sandbox().out_dir();
    let tries = std::fs::read_to_string(out.join("tries"))?.lines().count();
    ensure!(
        (3..=4).contains(&tries),
        "start-limit-burst 3, yet {tries} tries"
    );
    ensure!(!out.join("main").exists(), "the main process ran");
    let why = failed["failure"].as_str().unwrap_or_default();
    ensure!(why.contains("start limit"), "{failed}");
    ensure!(failed["last_exit"].to_string().contains('3'), "{failed}");
    let log = hf.log();
    ensure!(
        log.contains("exec-start-pre[0] (/bin/sh) failed: exit code 3"),
        "the log does not say why: {log}"
    );
    // An explicit start runs them again, and fails again.
    let start = hf.cli(&["start", "web"])?;
    ensure!(!start.status.success(), "start: {start:?}");
    ensure!(!out.join("main").exists(), "the main process ran");
    Ok(())
}

/// [`web_sandbox`] with a pre command that waits for `out/go`, its pid in
/// `out/pre-pid`.
fn waiting_pre_sandbox() -> Result<Option<(Netns, Sandbox)>> {
    web_sandbox(|out| {
        format!(
            "exec = {main}\nexec-start-pre = [{pre}]\nstop-timeout = \"2s\"\n",
            main = sh(&format!("touch {}/main; exec sleep 1000", out.display())),
            pre = sh(&format!(
                "echo $$ > {out}/pre-pid; while [ ! -e {out}/go ]; do sleep 0.05; done",
                out = out.display()
            )),
        )
    })
}

fn pre_pid(hf: &Holdfast) -> Result<i32> {
    let file = hf.sandbox().out("pre-pid");
    wait_for("pre-pid", T, || {
        std::fs::read_to_string(&file).ok()?.trim().parse().ok()
    })
    .context("the pre command never ran")
}

#[test]
fn a_stop_during_a_pre_command_stops_it_and_the_main_process_never_runs() -> Result<()> {
    let (ns, sandbox) = skip_unless!(waiting_pre_sandbox()?);
    let hf = Holdfast::start_in(&ns, sandbox)?;
    let pid = pre_pid(&hf)?;
    ensure!(hf.service("web")?["state"] == "starting");
    let stopped = hf.cli(&["stop", "web"])?;
    ensure!(stopped.status.success(), "stop: {stopped:?}");
    ensure!(hf.service("web")?["state"] == "stopped");
    ensure!(process_gone(pid), "the pre command {pid} still runs");
    std::fs::write(hf.sandbox().out("go"), "")?;
    std::thread::sleep(Duration::from_millis(300));
    ensure!(!hf.sandbox().out("main").exists(), "the main process ran");
    Ok(())
}

#[test]
fn a_pre_command_running_across_an_upgrade_is_carried_over() -> Result<()> {
    let (ns, sandbox) = skip_unless!(waiting_pre_sandbox()?);
    let hf = Holdfast::start_in(&ns, sandbox)?;
    let pid = pre_pid(&hf)?;
    hf.cli_ok(&["upgrade"])?;
    ensure!(hf.service("web")?["state"] == "starting");
    ensure!(!process_gone(pid), "the pre command {pid} did not survive");
    std::fs::write(hf.sandbox().out("go"), "")?;
    hf.wait_running("web", T)?;
    // A simple service is running once spawned, maybe before its shell ran `touch`.
    let main = hf.sandbox().out("main");
    wait_for("the main process to run", T, || main.exists().then_some(()))?;
    Ok(())
}

/// A shell main process that appends `term` to `out/order` on SIGTERM and
/// `hup` to `out/hups` on SIGHUP, its pid in `out/main-pid`.
fn trapping_main(out: &std::path::Path) -> String {
    sh(&format!(
        "trap 'echo term >> {o}/order; exit 0' TERM; trap 'echo hup >> {o}/hups' HUP; \
         echo $$ > {o}/main-pid; while :; do sleep 0.05; done",
        o = out.display()
    ))
}

fn read(hf: &Holdfast, name: &str) -> String {
    std::fs::read_to_string(hf.sandbox().out(name)).unwrap_or_default()
}

#[test]
fn reload_service_runs_exec_reload_with_mainpid_and_says_when_it_fails() -> Result<()> {
    let (ns, sandbox) = skip_unless!(web_sandbox(|out| {
        format!(
            "exec = {main}\nexec-reload = [{env}, [\"/bin/kill\", \"-HUP\", \"$MAINPID\"]]\n",
            main = trapping_main(out),
            env = sh(&format!("echo \"$MAINPID\" > {}/reload-env", out.display())),
        )
    })?);
    sandbox.write_local_unit(
        "bad",
        8081,
        "exec = [\"/bin/sleep\", \"1000\"]\nexec-reload = [[\"/bin/false\"]]\n",
    )?;
    sandbox.write_local_unit("plain", 8082, "exec = [\"/bin/sleep\", \"1000\"]\n")?;
    let (hf, pid) = Holdfast::start_running(&ns, sandbox, "web")?;
    hf.wait_running("bad", T)?;
    hf.wait_running("plain", T)?;
    let reply: serde_json::Value =
        serde_json::from_str(&hf.cli_ok(&["reload-service", "web", "--json"])?)?;
    ensure!(
        reply["state"] == "running" && reply["pid"] == pid,
        "{reply}"
    );
    // Done when the reply came: $MAINPID in the environment and in the arguments.
    ensure!(read(&hf, "reload-env").trim() == pid.to_string());
    wait_for("SIGHUP to the main process", T, || {
        read(&hf, "hups").contains("hup").then_some(())
    })?;

    let failed = hf.cli(&["reload-service", "bad"])?;
    let stderr = String::from_utf8_lossy(&failed.stderr);
    ensure!(failed.status.code() == Some(1), "{failed:?}");
    ensure!(
        stderr
            .contains("reload of \"bad\" failed: exec-reload[0] (/bin/false) failed: exit code 1"),
        "{stderr}"
    );
    let bad = hf.service("bad")?;
    ensure!(bad["state"] == "running" && bad["restarts"] == 0, "{bad}");

    let none = hf.cli(&["reload-service", "plain"])?;
    ensure!(
        String::from_utf8_lossy(&none.stderr).contains("has no exec-reload"),
        "{none:?}"
    );
    Ok(())
}

#[test]
fn exec_stop_runs_with_mainpid_before_the_kill_signal() -> Result<()> {
    let (ns, sandbox) = skip_unless!(web_sandbox(|out| {
        format!(
            "exec = {main}\nexec-stop = [{stop}]\n",
            main = trapping_main(out),
            stop = sh(&format!(
                "echo \"stop $MAINPID\" >> {}/order; sleep 0.3",
                out.display()
            )),
        )
    })?);
    let (hf, pid) = Holdfast::start_running(&ns, sandbox, "web")?;
    let stopped = hf.cli(&["stop", "web"])?;
    ensure!(stopped.status.success(), "stop: {stopped:?}");
    ensure!(hf.service("web")?["state"] == "stopped");
    ensure!(
        read(&hf, "order") == format!("stop {pid}\nterm\n"),
        "exec-stop then SIGTERM: {:?}",
        read(&hf, "order")
    );
    Ok(())
}

#[test]
fn exec_start_post_runs_once_started_and_its_failure_fails_the_service() -> Result<()> {
    let (ns, sandbox) = skip_unless!(web_sandbox(|out| {
        format!(
            "exec = [\"/bin/sleep\", \"1000\"]\nexec-start-post = [{post}]\n",
            post = sh(&format!(
                "sleep 1; echo \"post $MAINPID\" > {}/post",
                out.display()
            )),
        )
    })?);
    sandbox.write_local_unit(
        "bad",
        8081,
        "exec = [\"/bin/sleep\", \"1000\"]\nexec-start-post = [[\"/bin/false\"]]\nrestart = \"never\"\n",
    )?;
    let hf = Holdfast::start_in(&ns, sandbox)?;
    let s = hf.wait_service("web", T, |s| s["pid"].is_i64())?;
    ensure!(
        s["state"] == "starting",
        "running before exec-start-post is done: {s}"
    );
    let pid = hf.wait_running("web", T)?;
    ensure!(
        read(&hf, "post") == format!("post {pid}\n"),
        "{:?}",
        read(&hf, "post")
    );
    let bad = hf.wait_state("bad", "failed", T)?;
    ensure!(
        bad["failure"]
            .as_str()
            .unwrap_or_default()
            .contains("exec-start-post[0] (/bin/false) failed"),
        "{bad}"
    );
    Ok(())
}

#[test]
fn notify_reload_sends_the_reload_signal_and_waits_for_ready() -> Result<()> {
    if !holdfast_testkit::require_file("/usr/bin/systemd-notify") {
        return Ok(());
    }
    let (ns, sandbox) = skip_unless!(web_sandbox(|out| {
        let main = format!(
            "trap 'systemd-notify RELOADING=1; sleep 0.3; echo reloaded >> {o}/reloads; systemd-notify --ready' USR1; \
             systemd-notify --ready; while :; do sleep 0.05; done",
            o = out.display()
        );
        format!(
            "exec = {main}\ntype = \"notify-reload\"\nreload-signal = \"SIGUSR1\"\n",
            main = sh(&main)
        )
    })?);
    let (hf, pid) = Holdfast::start_running(&ns, sandbox, "web")?;
    let reply: serde_json::Value =
        serde_json::from_str(&hf.cli_ok(&["reload-service", "web", "--json"])?)?;
    ensure!(
        reply["state"] == "running" && reply["pid"] == pid,
        "{reply}"
    );
    // Answered after READY=1, which came after the work.
    ensure!(
        read(&hf, "reloads") == "reloaded\n",
        "{:?}",
        read(&hf, "reloads")
    );
    ensure!(hf.service("web")?["restarts"] == 0);
    Ok(())
}

#[test]
fn an_exec_reload_running_across_an_upgrade_ends_in_the_new_holdfast() -> Result<()> {
    let (ns, sandbox) = skip_unless!(web_sandbox(|out| {
        format!(
            "exec = [\"/bin/sleep\", \"1000\"]\nexec-reload = [{reload}]\n",
            reload = sh(&format!(
                "echo $$ > {o}/reload-pid; while [ ! -e {o}/go ]; do sleep 0.05; done",
                o = out.display()
            )),
        )
    })?);
    let (hf, pid) = Holdfast::start_running(&ns, sandbox, "web")?;
    // The request waits for the command; the upgrade answers it with an error.
    let mut waiting = std::process::Command::new(holdfast_testkit::holdfast_bin())
        .args(["reload-service", "web", "--state-dir"])
        .arg(hf.sandbox().state_dir())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let file = hf.sandbox().out("reload-pid");
    let reload: i32 = wait_for("the exec-reload command", T, || {
        std::fs::read_to_string(&file).ok()?.trim().parse().ok()
    })?;
    ensure!(hf.service("web")?["state"] == "reloading");
    hf.cli_ok(&["upgrade"])?;
    let _ = waiting.wait();
    ensure!(hf.service("web")?["state"] == "reloading");
    ensure!(
        !process_gone(reload),
        "the exec-reload command {reload} did not survive"
    );
    std::fs::write(hf.sandbox().out("go"), "")?;
    let s = hf.wait_state("web", "running", T)?;
    ensure!(s["pid"] == pid && s["restarts"] == 0, "{s}");
    // The new holdfast reaped it and ended the reload.
    hf.wait_log_line(&["reloaded (exec-reload)"], T)?;
    Ok(())
}
