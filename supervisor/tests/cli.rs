//! The `holdfast` command as a user runs it: `check` on bad units, and the
//! CLI whose reader goes away (`holdfast status | head -1`), which must end
//! quietly as coreutils do (killed by SIGPIPE), not panic.
//!
//! The daemon-backed cases need root (the control socket serves root only);
//! outside CI they are skipped with the reason, under CI=true they fail.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_holdfast");

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!("holdfast-cli-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `holdfast args` with stdout a pipe whose reader is already gone.
fn with_closed_stdout(args: &[&str]) -> Output {
    let (r, w) = nix::unistd::pipe().unwrap();
    drop(r);
    let child = Command::new(BIN)
        .args(args)
        .stdout(Stdio::from(w))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_bounded(child, Duration::from_secs(20))
}

fn wait_bounded(mut child: Child, limit: Duration) -> Output {
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("holdfast did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
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

fn root_or_skip(what: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var_os("CI").is_some_and(|v| v == "true") {
        panic!("{what}: needs root (the control socket serves root only)");
    }
    eprintln!("skipped {what}: not root (the control socket serves root only)");
    false
}

#[test]
fn check_with_its_reader_gone_dies_of_sigpipe_quietly() {
    let dir = TempDir::new("check");
    std::fs::write(
        dir.0.join("web.toml"),
        "[service]\nexec = [\"/bin/true\"]\n",
    )
    .unwrap();
    let out = with_closed_stdout(&["check", dir.0.to_str().unwrap()]);
    assert_quiet_sigpipe("holdfast check", &out);
}

#[test]
fn check_refuses_a_duration_that_would_overflow_a_deadline() {
    let dir = TempDir::new("huge");
    std::fs::write(
        dir.0.join("web.toml"),
        "[service]\nexec = [\"/bin/true\"]\nstop-timeout = \"18446744073709551615s\"\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["check", dir.0.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let file = dir.0.join("web.toml");
    assert!(
        stderr.contains(&format!(
            "{}:3:16: service.stop-timeout: \"18446744073709551615s\" is more than the largest duration allowed, 1year",
            file.display()
        )),
        "{stderr}"
    );
}

/// `holdfast run` on a units directory, stopped on drop.
struct Daemon {
    child: Child,
    state: TempDir,
    _units: TempDir,
}

impl Daemon {
    fn start(tag: &str, units: &[(&str, &str)]) -> Daemon {
        let dir = TempDir::new(&format!("{tag}-units"));
        for (name, text) in units {
            std::fs::write(dir.0.join(name), text).unwrap();
        }
        let state = TempDir::new(&format!("{tag}-state"));
        let child = Command::new(BIN)
            .args(["run", "--no-dispatcher", "--units"])
            .arg(&dir.0)
            .arg("--state-dir")
            .arg(&state.0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let d = Daemon {
            child,
            state,
            _units: dir,
        };
        assert!(
            holdfast::control::wait_ready(d.state_dir(), Duration::from_secs(10)),
            "holdfast run did not answer"
        );
        d
    }
    fn state_dir(&self) -> &Path {
        &self.state.0
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let start = Instant::now();
        while self.child.try_wait().ok().flatten().is_none() {
            if start.elapsed() > Duration::from_secs(10) {
                let _ = self.child.kill();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn status_and_logs_follow_with_their_reader_gone_die_of_sigpipe_quietly() {
    if !root_or_skip("status | head") {
        return;
    }
    let talker =
        "[service]\nexec = [\"/bin/sh\", \"-c\", \"while :; do echo tick; sleep 0.1; done\"]\n";
    let d = Daemon::start("pipe", &[("talker.toml", talker)]);
    let state = d.state_dir().to_str().unwrap().to_string();
    let out = with_closed_stdout(&["status", "--state-dir", &state]);
    assert_quiet_sigpipe("holdfast status", &out);
    let out = with_closed_stdout(&["logs", "-f", "talker", "--state-dir", &state]);
    assert_quiet_sigpipe("holdfast logs -f", &out);
    // And through a real `head`, as a user types it: only head's lines, no complaint.
    for cmd in [
        format!("{BIN} status --state-dir {state} | head -1"),
        format!("{BIN} logs -f talker --state-dir {state} | head -2"),
    ] {
        let out = wait_bounded(
            Command::new("sh")
                .args(["-c", &cmd])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
            Duration::from_secs(20),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{cmd}: {:?} {stderr}", out.status);
        assert!(stderr.is_empty(), "{cmd}: {stderr}");
    }
}
