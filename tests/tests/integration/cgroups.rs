//! Services tracked by cgroup v2 (`holdfast run --cgroup-root`): a `setsid`
//! double fork cannot outlive `holdfast stop` or holdfast's SIGTERM, the
//! unit's `kill-signal` is what stop sends, and the cgroups go at exit.
//! Each test gets its own cgroup root under the test process's cgroup.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;
use holdfast_testkit::{
    netns_or_skip, process_gone, require, skip_unless, toml_str, wait_for, CgroupRoot, Holdfast,
    Netns, RunOptions, Sandbox,
};

const T: Duration = Duration::from_secs(10);

fn pids_in(file: &Path) -> Vec<i32> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// holdfast with `--cgroup-root` on a fresh cgroup root named after NAME, serving
/// one unit NAME that runs `sh -c SCRIPT` ([`Sandbox::write_sh_noting`]: `$NOTE` is a
/// file of the test's), with `extra` [service] lines; NAME running. The
/// namespace, the root, the daemon and the path of `$NOTE`; `None`: skip.
fn tracked(
    name: &str,
    script: &str,
    extra: &str,
) -> Result<Option<(Netns, CgroupRoot, Holdfast, PathBuf)>> {
    let Some(ns) = netns_or_skip() else {
        return Ok(None);
    };
    let Some(root) = require("a cgroup v2 of our own", CgroupRoot::new(name)) else {
        return Ok(None);
    };
    let sandbox = Sandbox::new()?;
    let note = sandbox.write_sh_noting(name, script, &format!("restart = \"never\"\n{extra}"))?;
    let opts = RunOptions {
        args: root.run_args(),
        ..RunOptions::default()
    };
    let hf = Holdfast::start_with(&ns, sandbox, &opts)?;
    hf.wait_running(name, T)?;
    Ok(Some((ns, root, hf, note)))
}

/// Its grandchild leaves the session and the process group, ignores SIGTERM (so
/// only the cgroup's SIGKILL ends it), then waits; both write their pids to `$NOTE`.
const ESCAPER: &str = "setsid sh -c 'trap \"\" TERM; sleep 1000 & echo $! >> \"$NOTE\"; echo $$ >> \"$NOTE\"; wait' & exec sleep 1000";

#[test]
fn a_setsid_double_fork_does_not_outlive_stop_or_shutdown() -> Result<()> {
    let (_ns, root, mut hf, pids) =
        skip_unless!(tracked("escaper", ESCAPER, "stop-timeout = \"2s\"")?);
    let service_cg = root.path().join("escaper.service");
    let escaped = wait_for("the setsid'd processes' pids", T, || {
        let p = pids_in(&pids);
        (p.len() == 2).then_some(p)
    })?;
    assert!(service_cg.is_dir(), "no cgroup {}", service_cg.display());
    hf.cli_ok(&["stop", "escaper"])?;
    // `stop` answers once no process of the service is left (its cgroup
    // is empty), the setsid'd ones that ignore SIGTERM included.
    for p in &escaped {
        assert!(process_gone(*p), "pid {p} outlived `holdfast stop`");
    }
    hf.wait_state("escaper", "stopped", T)?;

    // Again, then holdfast's own SIGTERM.
    std::fs::remove_file(&pids)?;
    hf.cli_ok(&["start", "escaper"])?;
    hf.wait_running("escaper", T)?;
    let escaped = wait_for("the second run's pids", T, || {
        let p = pids_in(&pids);
        (p.len() == 2).then_some(p)
    })?;
    hf.stop()?;
    for p in &escaped {
        assert!(process_gone(*p), "pid {p} outlived holdfast");
    }
    assert!(
        !service_cg.exists(),
        "holdfast left {}",
        service_cg.display()
    );
    Ok(())
}

/// Writes the signal that stopped it, SIGINT or SIGTERM, to `$NOTE`.
const POLITE: &str = "trap 'echo INT > \"$NOTE\"; exit 0' INT; trap 'echo TERM > \"$NOTE\"; exit 0' TERM; sleep 1000 & wait";

#[test]
fn stop_sends_the_units_kill_signal() -> Result<()> {
    let (_ns, _root, mut hf, got) =
        skip_unless!(tracked("polite", POLITE, "kill-signal = \"SIGINT\"")?);
    hf.cli_ok(&["stop", "polite"])?;
    hf.wait_state("polite", "stopped", T)?;
    let said = wait_for("the trap's note", T, || {
        std::fs::read_to_string(&got).ok().filter(|s| !s.is_empty())
    })?;
    assert_eq!(said.trim(), "INT", "stop sent SIGTERM, not kill-signal");
    hf.stop()
}

/// A main process and a child that note which signal ended them. The main's
/// TERM trap waits 0.3 s, then asks the child to end with USR1: the child
/// notes `child-term` only if the stop's SIGTERM reached it directly.
const MASTER_AND_WORKER: &str = "(trap 'echo child-term >> \"$NOTE\"; exit 0' TERM; \
     trap 'echo child-usr1 >> \"$NOTE\"; exit 0' USR1; echo child-up >> \"$NOTE\"; \
     while :; do sleep 0.05; done) & child=$!; \
     trap 'echo main-term >> \"$NOTE\"; sleep 0.3; kill -USR1 $child; wait $child; exit 0' TERM; \
     while :; do wait; done";

/// Stops MASTER_AND_WORKER with `extra` service lines; what the note says.
fn stopped_master_and_worker(name: &str, extra: &str) -> Result<Option<String>> {
    let Some((_ns, _root, mut hf, note)) = tracked(name, MASTER_AND_WORKER, extra)? else {
        return Ok(None);
    };
    wait_for("the child", T, || {
        std::fs::read_to_string(&note)
            .ok()
            .filter(|s| s.contains("child-up"))
    })?;
    hf.cli_ok(&["stop", name])?;
    hf.wait_state(name, "stopped", T)?;
    let said = std::fs::read_to_string(&note)?;
    hf.stop()?;
    Ok(Some(said))
}

#[test]
fn kill_mode_mixed_signals_only_the_main_process() -> Result<()> {
    let said = skip_unless!(stopped_master_and_worker("mixed", "kill-mode = \"mixed\"")?);
    assert!(
        said.contains("main-term") && said.contains("child-usr1") && !said.contains("child-term"),
        "with kill-mode = \"mixed\" the child was not left to its parent: {said}"
    );
    let said = skip_unless!(stopped_master_and_worker("whole", "")?);
    assert!(
        said.contains("main-term") && said.contains("child-term"),
        "by default (control-group) SIGTERM did not reach the child: {said}"
    );
    Ok(())
}

#[test]
fn notify_socket_is_given_only_to_services_that_may_notify() -> Result<()> {
    let ns = skip_unless!(netns_or_skip());
    let sandbox = Sandbox::new()?;
    for (name, extra) in [("quiet", ""), ("chatty", "notify-access = \"all\"\n")] {
        let script = format!(
            "echo \"[$NOTIFY_SOCKET]\" > {}; exec sleep 1000",
            sandbox.out(name).display()
        );
        sandbox.write_unit(
            name,
            &format!(
                "[service]\nexec = [\"sh\", \"-c\", {}]\n{extra}",
                toml_str(&script)
            ),
        )?;
    }
    let mut hf = Holdfast::start_in(&ns, sandbox)?;
    let read = |name: &str| {
        let out = hf.sandbox().out(name);
        wait_for("the service's note", T, || {
            std::fs::read_to_string(&out)
                .ok()
                .filter(|s| s.ends_with('\n'))
        })
    };
    assert_eq!(
        read("quiet")?.trim(),
        "[]",
        "a simple service (notify-access none) got NOTIFY_SOCKET"
    );
    assert!(
        read("chatty")?.contains("chatty.sock"),
        "notify-access = all: NOTIFY_SOCKET set"
    );
    hf.stop()
}

#[test]
fn a_reload_adding_a_limit_without_its_controller_is_refused_naming_the_key() -> Result<()> {
    let ns = skip_unless!(netns_or_skip());
    let root = skip_unless!(require(
        "a cgroup v2 of our own",
        CgroupRoot::new("nocontroller")
    ));
    // A child of a cgroup that enables nothing below it has no controllers.
    let bare = root.path().join("bare");
    std::fs::create_dir(&bare)?;
    let sandbox = Sandbox::new()?;
    sandbox.write_unit(
        "lim",
        "[service]\nexec = [\"sleep\", \"1000\"]\nrestart = \"never\"\n",
    )?;
    let opts = RunOptions {
        args: vec!["--cgroup-root".into(), bare.display().to_string()],
        ..RunOptions::default()
    };
    let mut hf = Holdfast::start_with(&ns, sandbox, &opts)?;
    let pid = hf.wait_running("lim", T)?;
    hf.sandbox().write_unit(
        "lim",
        "[service]\nexec = [\"sleep\", \"1000\"]\nrestart = \"never\"\ntasks-max = 20\n",
    )?;
    let out = hf.cli(&["reload"])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "reload accepted; stderr: {stderr}");
    assert!(
        stderr.contains("lim.toml") && stderr.contains("tasks-max") && stderr.contains("pids"),
        "the refusal does not name the file, the key and the controller: {stderr}"
    );
    let s = hf.service("lim")?;
    assert!(s["state"] == "running" && s["pid"] == pid, "{s}");
    hf.stop()
}
