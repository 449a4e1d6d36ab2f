//! The real `holdfast` binary: the daemon (`holdfast run`) spawned inside a test's
//! network namespace with its log captured to a file, and the CLI talking to it.

use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

use crate::{run_bounded, wait_for, Netns, Sandbox};

/// How long `holdfast run` may take to create its control socket and answer.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a CLI command may take.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the daemon may take to exit after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// An fd the daemon inherits without CLOEXEC, as from a careless parent: no
/// service may see it ("every other fd of the supervisor is closed in the child").
pub const STRAY_FD: i32 = 77;

/// The binary under test: `$HOLDFAST_BIN`, else `<workspace>/target/debug/holdfast`.
/// Panics with a hint when it does not exist (a missing binary is a broken setup,
/// not a missing privilege, so it never skips).
pub fn holdfast_bin() -> PathBuf {
    let bin = std::env::var_os("HOLDFAST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/holdfast")
        });
    assert!(
        bin.is_file(),
        "holdfast binary not found at {} (set HOLDFAST_BIN, or run `cargo build -p holdfast` / `cargo xtask test`)",
        bin.display()
    );
    bin
}

/// Runs `holdfast ARGS…` (no daemon involved, e.g. `check`), bounded by [`CLI_TIMEOUT`].
pub fn holdfast_cli(args: &[&str]) -> Result<Output> {
    let mut cmd = Command::new(holdfast_bin());
    cmd.args(args).env("NO_COLOR", "1");
    run_bounded(cmd, CLI_TIMEOUT)
}

/// Runs `holdfast check DIR`, which must exit `want` (0: every unit valid, 1: a unit
/// refused): returns its stderr; fails naming the exit status and stderr otherwise.
pub fn holdfast_check(dir: &Path, want: i32) -> Result<String> {
    let out = holdfast_cli(&["check", &dir.to_string_lossy()])?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if out.status.code() != Some(want) {
        bail!(
            "holdfast check {} exited with {} (want exit {want}); stderr:\n{stderr}",
            dir.display(),
            out.status
        );
    }
    Ok(stderr)
}

/// Writes `toml` as the one unit NAME of a fresh [`Sandbox`] and runs
/// [`holdfast_check`] on it, which must exit `want`: its stderr.
pub fn holdfast_check_unit(name: &str, toml: &str, want: i32) -> Result<String> {
    let sandbox = Sandbox::new()?;
    sandbox.write_unit(name, toml)?;
    holdfast_check(&sandbox.units_dir(), want)
}

/// A dispatcher instance name (`holdfast run --instance`) that no other test, nor
/// another run of the tests, uses: `test-<pid>-TAG`.
pub fn dispatcher_instance(tag: &str) -> String {
    format!("test-{}-{tag}", std::process::id())
}

/// What [`Holdfast::spawn_with`] adds to the default `holdfast run` command line.
/// More arguments for every `holdfast run` the kit starts (whitespace
/// separated), unless a test names `--cgroup-root`.
pub const DAEMON_ARGS_ENV: &str = "HOLDFAST_TEST_DAEMON_ARGS";

#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Load the sk_lookup dispatcher: leave out `--no-dispatcher`. (Where BPF is
    /// not available the daemon falls back to bind mode; a test that needs the
    /// dispatcher checks that `holdfast bindings` answers.)
    pub dispatcher: bool,
    /// More arguments for `holdfast run`, e.g. `["--log-format", "json"]`.
    /// Without a `--journal…` one, the daemon gets `--journal off`.
    pub args: Vec<String>,
    /// More environment for the daemon, e.g. `("RUST_LOG", "debug")`.
    pub env: Vec<(String, String)>,
    /// RLIMIT_NOFILE (soft and hard) for the daemon, e.g. to run it at its fd limit.
    pub max_open_files: Option<u64>,
    /// A command the daemon runs under, e.g. `["setpriv", "--bounding-set=-bpf", "--"]`.
    pub wrapper: Vec<String>,
    /// Run this holdfast binary instead of [`holdfast_bin`] (e.g. a copy a test
    /// replaces to upgrade it in place).
    pub binary: Option<PathBuf>,
    /// Spawn the daemon in the calling thread's namespace with `--netns
    /// /run/netns/NAME`, so that holdfast enters the test's namespace itself.
    pub netns_flag: bool,
}

/// A `holdfast run --units <sandbox>/units --state-dir <sandbox>/state --no-dispatcher`
/// running inside a [`Netns`], stdout and stderr in `<sandbox>/holdfast.log`,
/// with a stray inherited fd ([`STRAY_FD`]). [`RunOptions`] change the command
/// line (the dispatcher on, more arguments, more environment, a wrapper, `--netns`).
///
/// Dropping it prints the daemon's log (libtest shows it when the test fails),
/// then, if it still runs, sends SIGTERM, and SIGKILL after 5 s.
#[derive(Debug)]
pub struct Holdfast {
    sandbox: Sandbox,
    child: Child,
    exited: Option<ExitStatus>,
    log: PathBuf,
}

impl Holdfast {
    /// Writes `units` into a fresh [`Sandbox`], starts the daemon in `ns` and waits
    /// until it answers `holdfast status`.
    pub fn start(ns: &Netns, units: &[(&str, &str)]) -> Result<Holdfast> {
        let sandbox = Sandbox::new()?;
        sandbox.write_units(units)?;
        Holdfast::start_in(ns, sandbox)
    }

    /// Starts the daemon on a prepared sandbox and waits until it answers.
    pub fn start_in(ns: &Netns, sandbox: Sandbox) -> Result<Holdfast> {
        let mut hf = Holdfast::spawn(ns, sandbox)?;
        hf.wait_ready(READY_TIMEOUT)?;
        Ok(hf)
    }

    /// [`Holdfast::start_in`], then waits (up to [`READY_TIMEOUT`]) until service
    /// `name` runs: the daemon and the service's pid.
    pub fn start_running(ns: &Netns, sandbox: Sandbox, name: &str) -> Result<(Holdfast, i32)> {
        let hf = Holdfast::start_in(ns, sandbox)?;
        let pid = hf.wait_running(name, READY_TIMEOUT)?;
        Ok((hf, pid))
    }

    /// [`Holdfast::start_in`] with [`RunOptions`].
    pub fn start_with(ns: &Netns, sandbox: Sandbox, opts: &RunOptions) -> Result<Holdfast> {
        let mut hf = Holdfast::spawn_with(ns, sandbox, opts)?;
        hf.wait_ready(READY_TIMEOUT)?;
        Ok(hf)
    }

    /// [`Holdfast::start_with`] with the dispatcher on, under [`crate::require`]'s
    /// policy: `Ok(None)` (skip) when the daemon had to fall back to bind mode
    /// because BPF is not available, or `holdfast bindings` does not answer.
    pub fn start_dispatched(
        ns: &Netns,
        sandbox: Sandbox,
        opts: &RunOptions,
    ) -> Result<Option<Holdfast>> {
        let opts = RunOptions {
            dispatcher: true,
            ..opts.clone()
        };
        let mut hf = Holdfast::spawn_with(ns, sandbox, &opts)?;
        let ready = hf.wait_ready(READY_TIMEOUT);
        let probe = match &ready {
            Err(_) if hf.log().contains("BPF is not available") => Err(anyhow!(
                "BPF is not available; the daemon's log:\n{}",
                hf.log()
            )),
            Err(e) => bail!("{e:#}"),
            Ok(()) => hf.cli_ok(&["bindings", "--json"]).map(drop),
        };
        Ok(crate::require("the sk_lookup dispatcher (holdfast bindings)", probe).map(|()| hf))
    }

    /// With the `dispatcher`, [`Holdfast::start_dispatched`] with the default options
    /// (`Ok(None)`: skip, BPF is not available); without, [`Holdfast::start_in`]
    /// (bind mode): for the tests that run one case in each mode.
    pub fn start_in_mode(
        ns: &Netns,
        sandbox: Sandbox,
        dispatcher: bool,
    ) -> Result<Option<Holdfast>> {
        if dispatcher {
            Holdfast::start_dispatched(ns, sandbox, &RunOptions::default())
        } else {
            Holdfast::start_in(ns, sandbox).map(Some)
        }
    }

    /// Spawns the daemon on a prepared sandbox without waiting for anything (for
    /// tests that expect it to fail: see [`Holdfast::wait_exit`]).
    pub fn spawn(ns: &Netns, sandbox: Sandbox) -> Result<Holdfast> {
        Holdfast::spawn_with(ns, sandbox, &RunOptions::default())
    }

    /// [`Holdfast::spawn`] with [`RunOptions`].
    pub fn spawn_with(ns: &Netns, sandbox: Sandbox, opts: &RunOptions) -> Result<Holdfast> {
        let log = sandbox.path().join("holdfast.log");
        let out = File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let err = out.try_clone().context("dup the log file")?;
        // Any fd will do as the stray one: the namespace file.
        let stray = ns.open()?;
        let stray_fd = stray.as_raw_fd();
        let nofile = opts.max_open_files.map(|n| libc::rlimit {
            rlim_cur: n,
            rlim_max: n,
        });
        let binary = opts.binary.clone().unwrap_or_else(holdfast_bin);
        let (program, wrapped) = match opts.wrapper.split_first() {
            Some((program, args)) => (program.into(), args),
            None => (binary.clone().into_os_string(), &[][..]),
        };
        let mut cmd = if opts.netns_flag {
            Command::new(program)
        } else {
            ns.command(program)?
        };
        if !opts.wrapper.is_empty() {
            cmd.args(wrapped).arg(&binary);
        }
        cmd.arg("run")
            .arg("--units")
            .arg(sandbox.units_dir())
            .arg("--state-dir")
            .arg(sandbox.state_dir());
        if !opts.dispatcher {
            cmd.arg("--no-dispatcher");
        }
        if opts.netns_flag {
            cmd.arg("--netns").arg(ns.path());
        }
        // Not into the host's journal (where one runs): the tests read the
        // services' output in holdfast's own log, at info. A test that wants
        // the journal names its socket.
        if !opts.args.iter().any(|a| a.starts_with("--journal")) {
            cmd.args(["--journal", "off"]);
        }
        // `cargo xtask test` runs some modules again with
        // HOLDFAST_TEST_DAEMON_ARGS=--no-cgroups: the process-group mode.
        if !opts.args.iter().any(|a| a.starts_with("--cgroup-root")) {
            if let Ok(extra) = std::env::var(DAEMON_ARGS_ENV) {
                cmd.args(extra.split_whitespace());
            }
        }
        cmd.args(&opts.args)
            .envs(opts.env.iter().map(|(k, v)| (k, v)))
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        // SAFETY: the closure runs in the child between fork and exec (after the
        // namespace's setns); it makes async-signal-safe system calls (dup2,
        // setrlimit) on an fd opened before the fork (closed at exec by O_CLOEXEC)
        // and a limit built before it, and allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(stray_fd, STRAY_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(limit) = &nofile {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = cmd.spawn().context("spawn holdfast run")?;
        drop(stray);
        Ok(Holdfast {
            sandbox,
            child,
            exited: None,
            log,
        })
    }

    /// The sandbox of a daemon that has exited (e.g. killed with SIGKILL), to
    /// start the next one on the same units and state dir.
    pub fn into_sandbox(mut self) -> Result<Sandbox> {
        if self.try_wait()?.is_none() {
            bail!("holdfast {} still runs", self.pid());
        }
        Ok(std::mem::replace(&mut self.sandbox, Sandbox::new()?))
    }

    /// Waits until `<state>/control.sock` exists and `holdfast status --json`
    /// exits 0; fails early, with the log, if the daemon exits.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let sock = self.sandbox.control_socket();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                bail!(
                    "holdfast run exited with {status} before it was ready; its log:\n{}",
                    self.log()
                );
            }
            if sock.exists() {
                if let Ok(out) = self.cli(&["status", "--json"]) {
                    if out.status.success() {
                        return Ok(());
                    }
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "holdfast run not ready within {timeout:?} (control socket {} {}); its log:\n{}",
                    sock.display(),
                    if sock.exists() { "exists but status fails" } else { "missing" },
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn sandbox(&self) -> &Sandbox {
        &self.sandbox
    }

    /// The daemon's pid.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Everything the daemon has logged so far.
    pub fn log(&self) -> String {
        fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_else(|e| format!("(cannot read {}: {e})", self.log.display()))
    }

    /// Waits up to `timeout` until the daemon has logged a line containing every
    /// one of `parts`; returns that line (fails with the whole log).
    pub fn wait_log_line(&self, parts: &[&str], timeout: Duration) -> Result<String> {
        wait_for(&format!("a log line with {parts:?}"), timeout, || {
            self.log()
                .lines()
                .find(|l| parts.iter().all(|p| l.contains(p)))
                .map(String::from)
        })
        .with_context(|| format!("the daemon's log:\n{}", self.log()))
    }

    /// Runs `holdfast ARGS… --state-dir <state>`, bounded by [`CLI_TIMEOUT`].
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        let mut cmd = Command::new(holdfast_bin());
        cmd.args(args)
            .arg("--state-dir")
            .arg(self.sandbox.state_dir())
            .env("NO_COLOR", "1");
        run_bounded(cmd, CLI_TIMEOUT)
    }

    /// Like [`Holdfast::cli`] but fails unless it exits 0; returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.cli(args)?;
        if !out.status.success() {
            bail!(
                "holdfast {} exited with {}; stderr: {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Like [`Holdfast::cli`] but fails unless it exits 1 (the daemon's error
    /// reply, or a unit it refused); returns stderr.
    pub fn cli_err(&self, args: &[&str]) -> Result<String> {
        let out = self.cli(args)?;
        if out.status.code() != Some(1) {
            bail!(
                "holdfast {} exited with {}, not 1: {}",
                args.join(" "),
                out.status,
                crate::describe_output(&out)
            );
        }
        Ok(String::from_utf8_lossy(&out.stderr).into_owned())
    }

    /// `holdfast bindings --json`: one object per binding.
    pub fn bindings(&self) -> Result<Vec<Value>> {
        let text = self.cli_ok(&["bindings", "--json"])?;
        let v: Value = serde_json::from_str(&text)
            .with_context(|| format!("holdfast bindings --json printed {text:?}"))?;
        match v {
            Value::Array(rows) => Ok(rows),
            other => bail!("holdfast bindings --json printed no array: {other}"),
        }
    }

    /// Fails, with `what` and the rows, unless the first row of `holdfast bindings`
    /// has counted its `counter` (`lookups`, `denied`, …) at least once.
    pub fn expect_first_binding_counted(&self, counter: &str, what: &str) -> Result<()> {
        let rows = self.bindings()?;
        let counted = rows.first().and_then(|r| r[counter].as_u64()).unwrap_or(0);
        if counted == 0 {
            bail!("{what}: no {counter} counted in the first binding: {rows:?}");
        }
        Ok(())
    }

    /// `holdfast status --json`: the JSON array of services.
    pub fn status(&self) -> Result<Value> {
        let text = self.cli_ok(&["status", "--json"])?;
        let v: Value = serde_json::from_str(&text)
            .with_context(|| format!("status --json printed no JSON: {text:?}"))?;
        if !v.is_array() {
            bail!("status --json printed no array: {v}");
        }
        Ok(v)
    }

    /// The status object of service `name`.
    pub fn service(&self, name: &str) -> Result<Value> {
        let all = self.status()?;
        all.as_array()
            .into_iter()
            .flatten()
            .find(|s| s["name"] == name)
            .cloned()
            .ok_or_else(|| anyhow!("no service {name:?} in status: {all}"))
    }

    /// Polls the status of `name` until `accept` likes it; returns that status.
    pub fn wait_service(
        &self,
        name: &str,
        timeout: Duration,
        accept: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let mut last = Value::Null;
        wait_for(&format!("service {name}"), timeout, || {
            let s = self.service(name).ok()?;
            if accept(&s) {
                return Some(s);
            }
            last = s;
            None
        })
        .with_context(|| format!("last status of {name}: {last}"))
    }

    /// Waits until `name` is in `state`; returns its status.
    pub fn wait_state(&self, name: &str, state: &str, timeout: Duration) -> Result<Value> {
        self.wait_service(name, timeout, |s| s["state"] == state)
    }

    /// Waits until `name` is running with a pid; returns the pid.
    pub fn wait_running(&self, name: &str, timeout: Duration) -> Result<i32> {
        let s = self.wait_service(name, timeout, |s| {
            s["state"] == "running" && s["pid"].is_i64()
        })?;
        Ok(s["pid"].as_i64().expect("checked above") as i32)
    }

    /// Sends `signal` to the daemon.
    pub fn signal(&self, signal: Signal) -> Result<()> {
        kill(Pid::from_raw(self.pid()), signal).context("signal holdfast")
    }

    /// The exit status, if the daemon has exited.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().context("wait for holdfast")?;
        }
        Ok(self.exited)
    }

    /// Waits up to `timeout` for the daemon to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait()? {
                return Ok(s);
            }
            if Instant::now() >= deadline {
                bail!(
                    "holdfast still running after {timeout:?}; its log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// [`Holdfast::stop`], then [`Netns::expect_empty`]: a clean exit that leaves
    /// no service, instance or orphan behind in `ns`.
    pub fn stop_leaving_nothing(&mut self, ns: &Netns) -> Result<()> {
        self.stop()?;
        ns.expect_empty()
    }

    /// SIGTERM, then waits for the exit (bounded by [`STOP_TIMEOUT`]) and fails
    /// unless it is exit code 0. The sandbox stays until drop. (Most tests end
    /// with it, returning its result.)
    pub fn stop(&mut self) -> Result<()> {
        self.signal(Signal::SIGTERM)?;
        let status = self.wait_exit(STOP_TIMEOUT)?;
        if status.code() != Some(0) {
            bail!(
                "holdfast exited with {status} after SIGTERM (want exit 0); its log:\n{}",
                self.log()
            );
        }
        Ok(())
    }
}

impl Drop for Holdfast {
    fn drop(&mut self) {
        if !matches!(self.try_wait(), Ok(Some(_))) {
            let _ = self.signal(Signal::SIGTERM);
            if self.wait_exit(Duration::from_secs(5)).is_err() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
        // libtest shows a test's captured output only when the test fails (by a
        // panic or by returning Err), so the log is always printed.
        eprintln!(
            "---- holdfast log ({}) ----\n{}---- end of holdfast log ----",
            self.log.display(),
            self.log()
        );
    }
}
