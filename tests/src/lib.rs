//! holdfast-testkit: the one test kit of the workspace, used by the privileged integration
//! tests (`tests/tests/integration`, one binary), the example services' tests and the
//! benchmarks. What it offers:
//!
//! - [`Netns`]: a fresh, uniquely named network namespace (`lo` up, [`Netns::add_local_route`]),
//!   entered per thread ([`Netns::enter`] → [`NetnsGuard`], or [`Netns::run`]); dropping it
//!   SIGKILLs what is left inside and deletes it. [`netns_or_skip`] adds the skip policy,
//!   [`skip_unless!`] the early return; [`netns_and_sandbox`] (the opening of most daemon
//!   tests), [`netns_with_tools`] / [`netns_and_sandbox_with_tools`] (tests that run system
//!   tools) and [`netns_and_notifier`] (sd_notify tests; with the daemon started:
//!   [`notifier_started`], [`notifier_running`]) add the usual first steps.
//! - [`Holdfast`]: the daemon launcher. The real binary ([`holdfast_bin`]) started with the
//!   units of a [`Sandbox`] (a temp dir: units/, state/, out/) in its own namespace, waited
//!   for until its control socket answers; the CLI against it ([`Holdfast::cli`],
//!   [`Holdfast::status`], [`Holdfast::wait_state`], [`Holdfast::wait_log_line`],
//!   [`Holdfast::expect_first_binding_counted`], …); [`Holdfast::start_running`] (started,
//!   and one service running), [`Holdfast::start_in_mode`] (with the dispatcher or in bind
//!   mode); SIGTERM, exit 0 and clean-up ([`Holdfast::stop`], or on drop).
//! - [`Sandbox`] unit writers: [`Sandbox::write_serve_unit`], [`Sandbox::write_tcp_unit`],
//!   [`Sandbox::write_sh_service`], [`Sandbox::write_notifier_unit`], with
//!   [`restart_always`] for the restart policy lines.
//! - [`CgroupRoot`]: a cgroup of the test's own for `--cgroup-root`, killed and removed on drop.
//! - [`wrk`] / [`WrkArgs`] / [`WrkReport`]: the one wrk runner and parser, shared with the
//!   benchmarks (requests, run time, non-2xx responses, socket errors by kind cross-checked
//!   against wrk's own summary, p50/p99 latency).
//! - [`Holdfast::kill_9_rounds`]: crash restarts with connections queued while down.
//! - [`LoopClient`]: the one load client: connects in a loop while a test restarts or
//!   reloads, and tallies answered / refused / misrouted / failed connections.
//! - Services that report what they were handed: [`SERVE_PY`], [`NOTIFIER_PY`] (with
//!   [`tell`]), checked by [`check_handoff`]; [`HandedFds`] (a program with the test's own
//!   sockets at fds 3…) and [`Activated`] (under `systemd-socket-activate`).
//! - Peers and probes: [`ask_tcp`], [`ask_udp`], [`ask_unix`], [`control_request_as`] (an
//!   unprivileged peer), [`process_gone`], [`wait_for`], [`run_bounded`], [`run_ok`]
//!   (with [`describe_output`]); [`holdfast_check`] and [`holdfast_check_unit`] (`holdfast
//!   check` with the exit it must give).
//!
//! A typical test:
//!
//! ```no_run
//! use std::time::Duration;
//! use holdfast_testkit::{ask_tcp, netns_and_sandbox, skip_unless, Holdfast};
//!
//! # fn main() -> anyhow::Result<()> {
//! let (ns, sandbox) = skip_unless!(netns_and_sandbox()?);   // root + `ip netns add`, a temp dir
//! let exec = sandbox.serve_exec("web")?;                    // serve.py, report in out/web.json
//! sandbox.write_unit("web", &format!(r#"
//!     [service]
//!     exec = {exec}
//!     [[socket]]
//!     protocol = "tcp"
//!     addresses = ["127.0.0.1/32"]
//!     ports = ["8080"]
//! "#))?;
//! let mut hf = Holdfast::start_in(&ns, sandbox)?;               // `holdfast run` inside ns
//! let pid = hf.wait_running("web", Duration::from_secs(5))?;
//! let _inside = ns.enter()?;                                // this thread joins ns
//! let answer = ask_tcp("127.0.0.1:8080".parse()?, Duration::from_secs(5))?;
//! assert_eq!(answer, format!("web {pid}\n"));
//! hf.stop()?;                                               // SIGTERM, exit 0
//! # Ok(()) }
//! ```
//!
//! Privilege policy (house rules): a test that cannot get what it needs (root, a
//! namespace, a system tool) calls [`require`]: under `CI=true` that panics with the
//! reason; elsewhere it prints `skipped: <probe>: <error>` and the test returns early.

mod activate;
mod cgroup;
mod daemon;
mod handoff;
mod kill9;
mod load;
mod loop_client;
mod netns;
mod notifier;
mod peer;
mod sandbox;

use std::fmt::Display;
use std::io::Read;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub use activate::{free_port, loopback4, loopback6, Activated, HandedFds, SOCKET_ACTIVATE};
pub use cgroup::CgroupRoot;
pub use daemon::{
    dispatcher_instance, holdfast_bin, holdfast_check, holdfast_check_unit, holdfast_cli, Holdfast,
    RunOptions, CLI_TIMEOUT, DAEMON_ARGS_ENV, READY_TIMEOUT, STOP_TIMEOUT, STRAY_FD,
};
pub use handoff::{check_handoff, ExpectSocket};
pub use load::{wrk, WrkArgs, WrkReport};
pub use loop_client::{parse_answer, LoopClient, Tally};
pub use netns::{Netns, NetnsGuard};
pub use notifier::{
    netns_and_notifier, notifier_running, notifier_started, reply_pid, send_notify_as,
    send_notify_from_here, tell, NOTIFIER_PY,
};
pub use peer::{
    ask_tcp, ask_udp, ask_unix, control_request_as, proc_cpu_time, proc_state, process_gone,
    PeerOutcome,
};
pub use sandbox::{restart_always, toml_array, toml_str, Sandbox, PYTHON, SERVE_PY};

/// True under `CI=true` (or `CI=1`, as xtask also accepts), where privileged
/// tests must fail rather than skip.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// The skip policy: `Some(value)` when the probe succeeded. When it failed: under
/// CI, panics naming the probe and the error; elsewhere prints
/// `skipped: <probe>: <error>` and returns `None` so the test can return early.
pub fn require<T, E: Display>(probe: &str, result: Result<T, E>) -> Option<T> {
    match result {
        Ok(v) => Some(v),
        Err(e) if in_ci() => panic!("{probe}: {e:#} (CI=true: privileged tests may not skip)"),
        Err(e) => {
            eprintln!("skipped: {probe}: {e:#}");
            None
        }
    }
}

/// Probes that the test runs as root (euid 0) under [`require`]'s policy; `probe`
/// says what the test needs root for. Returns false when the test must return.
pub fn require_root(probe: &str) -> bool {
    let euid = nix::unistd::geteuid();
    require(
        probe,
        if euid.is_root() {
            Ok(())
        } else {
            Err(format!("running as uid {euid}, not root"))
        },
    )
    .is_some()
}

/// Root and a fresh [`Netns`], under [`require`]'s policy: `None` means skip.
pub fn netns_or_skip() -> Option<Netns> {
    if !require_root("root, for network namespaces") {
        return None;
    }
    require("ip netns add", Netns::new())
}

/// [`netns_or_skip`] with every address of each of `prefixes` local
/// ([`Netns::add_local_route`]): `Ok(None)` means skip.
pub fn netns_with_local_routes(prefixes: &[&str]) -> Result<Option<Netns>> {
    let Some(ns) = netns_or_skip() else {
        return Ok(None);
    };
    for prefix in prefixes {
        ns.add_local_route(prefix)?;
    }
    Ok(Some(ns))
}

/// [`netns_or_skip`] and a fresh [`Sandbox`], the start of most daemon tests:
/// `Ok(None)` means skip.
pub fn netns_and_sandbox() -> Result<Option<(Netns, Sandbox)>> {
    netns_and_sandbox_with_tools(&[])
}

/// [`netns_or_skip`] for a test that also runs the system tools at `paths`, each
/// probed with [`require_file`]: `None` means skip.
pub fn netns_with_tools(paths: &[&str]) -> Option<Netns> {
    let ns = netns_or_skip()?;
    paths.iter().all(|p| require_file(p)).then_some(ns)
}

/// [`netns_with_tools`] and a fresh [`Sandbox`]: `Ok(None)` means skip.
pub fn netns_and_sandbox_with_tools(paths: &[&str]) -> Result<Option<(Netns, Sandbox)>> {
    let Some(ns) = netns_with_tools(paths) else {
        return Ok(None);
    };
    Ok(Some((ns, Sandbox::new()?)))
}

/// `skip_unless!(probe)`: the value inside `probe`'s `Some`, or, when a probe under
/// [`require`]'s policy said skip (`None`), `return Ok(())` from the calling test.
///
/// ```no_run
/// # use holdfast_testkit::{netns_and_sandbox, netns_or_skip, skip_unless};
/// # fn a_test() -> anyhow::Result<()> {
/// let ns = skip_unless!(netns_or_skip());
/// let (ns, sandbox) = skip_unless!(netns_and_sandbox()?);
/// # Ok(()) }
/// ```
#[macro_export]
macro_rules! skip_unless {
    ($probe:expr) => {
        match $probe {
            Some(value) => value,
            None => return Ok(()),
        }
    };
}

/// Probes that `path` exists (a system tool a test runs), under [`require`]'s policy.
pub fn require_file(path: &str) -> bool {
    let p = std::path::Path::new(path);
    require(
        &format!("{path} present"),
        if p.exists() {
            Ok(())
        } else {
            Err("no such file (apt-get install the package that ships it)")
        },
    )
    .is_some()
}

/// Polls `probe` every 20 ms until it returns `Some`, for at most `timeout`.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> Option<T>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What a finished command said, for a failure message: its exit code, stdout and stderr.
pub fn describe_output(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// [`run_bounded`], failing unless `cmd` exits 0 (naming it, with
/// [`describe_output`]); returns its output.
pub fn run_ok(cmd: Command, timeout: Duration) -> Result<Output> {
    let what = format!("{cmd:?}");
    let out = run_bounded(cmd, timeout)?;
    if !out.status.success() {
        bail!("{what}: {}", describe_output(&out));
    }
    Ok(out)
}

/// Runs `cmd` to completion with stdout and stderr captured, killing it (and
/// failing) if it runs longer than `timeout`.
pub fn run_bounded(mut cmd: Command, timeout: Duration) -> Result<Output> {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawn {what}"))?;
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let out_reader = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = stdout.read_to_end(&mut b);
        b
    });
    let err_reader = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = stderr.read_to_end(&mut b);
        b
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child
            .try_wait()
            .with_context(|| format!("wait for {what}"))?
        {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let err = err_reader.join().unwrap_or_default();
            bail!(
                "{what} still running after {timeout:?}, killed; stderr: {}",
                String::from_utf8_lossy(&err)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Ok(Output {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    })
}
