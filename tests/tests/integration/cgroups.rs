//! Services tracked by cgroup v2 (`holdfast run --cgroup-root`): a `setsid`
//! double fork cannot outlive `holdfast stop` or holdfast's SIGTERM, the
//! unit's `kill-signal` is what stop sends, and the cgroups go at exit.
//! Each test gets its own cgroup root under the test process's cgroup.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use holdfast_testkit::{
    netns_or_skip, require, skip_unless, toml_str, wait_for, Holdfast, RunOptions, Sandbox,
};

const T: Duration = Duration::from_secs(10);

/// A fresh cgroup root for one daemon, removed (with what holdfast left) on drop.
struct CgroupRoot(PathBuf);

impl CgroupRoot {
    fn new(tag: &str) -> Result<CgroupRoot> {
        static N: AtomicU32 = AtomicU32::new(0);
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
        let mount = mountinfo
            .lines()
            .filter_map(|l| l.split_once(" - "))
            .find(|(_, fs)| fs.starts_with("cgroup2 "))
            .and_then(|(m, _)| m.split(' ').nth(4))
            .context("no cgroup2 mount in /proc/self/mountinfo")?
            .to_string();
        let own = std::fs::read_to_string("/proc/self/cgroup")?;
        let own = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .context("no 0:: line in /proc/self/cgroup")?
            .trim_start_matches('/')
            .to_string();
        let dir = Path::new(&mount).join(own).join(format!(
            "hf-it-{}-{}-{tag}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        Ok(CgroupRoot(dir))
    }

    fn args(&self) -> Vec<String> {
        vec!["--cgroup-root".into(), self.0.display().to_string()]
    }
}

impl Drop for CgroupRoot {
    fn drop(&mut self) {
        let _ = std::fs::write(self.0.join("cgroup.kill"), "1");
        std::thread::sleep(Duration::from_millis(100));
        fn remove(dir: &Path) {
            if let Ok(entries) = std::fs::read_dir(dir) {
                for e in entries.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        remove(&e.path());
                    }
                }
            }
            let _ = std::fs::remove_dir(dir);
        }
        remove(&self.0);
    }
}

/// Running (not gone, not a zombie).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, r)| !r.starts_with('Z')))
        .unwrap_or(false)
}

fn pids_in(file: &Path) -> Vec<i32> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// holdfast with `--cgroup-root` on a fresh root, serving one unit `name`
/// whose `exec` is `sh -c script`, with `extra` [service] lines.
fn tracked(
    ns: &holdfast_testkit::Netns,
    root: &CgroupRoot,
    sandbox: Sandbox,
    name: &str,
    script: &str,
    extra: &str,
) -> Result<Holdfast> {
    sandbox.write_unit(
        name,
        &format!(
            "[service]\nexec = [\"sh\", \"-c\", {}]\nrestart = \"never\"\n{extra}",
            toml_str(script)
        ),
    )?;
    let opts = RunOptions {
        args: root.args(),
        ..RunOptions::default()
    };
    Holdfast::start_with(ns, sandbox, &opts)
}

#[test]
fn a_setsid_double_fork_does_not_outlive_stop_or_shutdown() -> Result<()> {
    let ns = skip_unless!(netns_or_skip());
    let root = skip_unless!(require("a cgroup v2 of our own", CgroupRoot::new("escape")));
    let sandbox = Sandbox::new()?;
    let pids = sandbox.out("escaped.pids");
    // The grandchild leaves the session and the process group, then waits.
    let script = format!(
        "setsid sh -c 'sleep 1000 & echo $! >> {p}; echo $$ >> {p}; wait' & exec sleep 1000",
        p = pids.display()
    );
    let mut hf = tracked(
        &ns,
        &root,
        sandbox,
        "escaper",
        &script,
        "stop-timeout = \"2s\"\n",
    )?;
    let service_cg = root.0.join("escaper.service");
    hf.wait_running("escaper", T)?;
    let escaped = wait_for("the setsid'd processes' pids", T, || {
        let p = pids_in(&pids);
        (p.len() == 2).then_some(p)
    })?;
    assert!(service_cg.is_dir(), "no cgroup {}", service_cg.display());
    hf.cli_ok(&["stop", "escaper"])?;
    hf.wait_state("escaper", "stopped", T)?;
    wait_for("the setsid'd processes to be gone after stop", T, || {
        escaped.iter().all(|p| !alive(*p)).then_some(())
    })?;

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
        assert!(!alive(*p), "pid {p} outlived holdfast");
    }
    assert!(
        !service_cg.exists(),
        "holdfast left {}",
        service_cg.display()
    );
    Ok(())
}

#[test]
fn stop_sends_the_units_kill_signal() -> Result<()> {
    let ns = skip_unless!(netns_or_skip());
    let root = skip_unless!(require("a cgroup v2 of our own", CgroupRoot::new("signal")));
    let sandbox = Sandbox::new()?;
    let got = sandbox.out("got");
    let script = format!(
        "trap 'echo INT > {g}; exit 0' INT; trap 'echo TERM > {g}; exit 0' TERM; sleep 1000 & wait",
        g = got.display()
    );
    let mut hf = tracked(
        &ns,
        &root,
        sandbox,
        "polite",
        &script,
        "kill-signal = \"SIGINT\"\n",
    )?;
    hf.wait_running("polite", T)?;
    hf.cli_ok(&["stop", "polite"])?;
    hf.wait_state("polite", "stopped", T)?;
    let said = wait_for("the trap's note", T, || {
        std::fs::read_to_string(&got).ok().filter(|s| !s.is_empty())
    })?;
    assert_eq!(said.trim(), "INT", "stop sent SIGTERM, not kill-signal");
    hf.stop()?;
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
    hf.stop()?;
    Ok(())
}
