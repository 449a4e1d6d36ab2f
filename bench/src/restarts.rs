//! `holdfast-bench restarts` (`cargo xtask bench --only restarts`): what restarts and crashes cost the clients of a service,
//! measured with a real load generator (wrk), against the same load with no restarts in the same
//! invocation (these machines are shared and noisy: only ratios mean much).
//!
//! In a fresh network namespace, `target/release/holdfast run` serves hello-http and gunicorn
//! (both `type = "notify"`, `restart = "always"`, steered by sk_lookup from 192.0.2.0/24). wrk puts
//! steady load on each, keep-alive and with a new connection per request, while the service is
//! restarted in a loop (`holdfast restart --mode overlap`, `--mode stop-start`) or its main pid is
//! killed with SIGKILL. The baseline no one here wrote is hello-http binding its own socket and
//! restarted by plain stop/start (SIGTERM, start again), where refused connections are expected.
//!
//! Refused connections are counted by the kernel (the namespace's TCP AttemptFails): wrk's
//! connect is non-blocking, so it reports a refusal as a write error, not a connect error.
//! Each disturbed run lasts `--duration` or until its restarts are done, whichever is
//! longer (then wrk is stopped with SIGINT), so throughput is compared as a rate.
//!
//! It fails when a holdfast restart mode shows any socket error, refusal or non-2xx response,
//! when a kill -9 leads to a refused connection, when a no-restart run shows errors, when a
//! restart fails or does not finish. When `holdfast status` does not settle on "running" once
//! the service is back, it warns (clients do not see it). It owns only its namespace, its
//! scratch directory and the processes it starts; the scratch directory (daemon log, units) is
//! kept when it fails.
//!
//! gunicorn runs its default sync workers, which answer every request with `Connection: close`,
//! so its "keep-alive" runs reconnect too. (Its gthread workers keep connections alive but drop
//! idle ones at a graceful stop without a `Connection: close`, racing the client's next request:
//! read errors that are gunicorn's, under any supervisor.)
//!
//! Options (`holdfast-bench restarts --help`): `--duration` (each wrk run, default 30s, rounded
//! up to whole seconds), `--count` (restarts per run, default 50); `--quick`: 5 s and 10 restarts.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use holdfast_testkit::{Netns, WrkArgs, WrkReport};

use crate::report::{find_command, need_root, Env, Row};

/// wrk's connections (its threads are the kit's two: the machines have two cores).
const CONNECTIONS: u32 = 50;
/// wrk counts a request slower than this as a timeout error. wrk's default (2 s) would count a
/// request waiting in the backlog through a cold start on a loaded machine as an error; real
/// clients wait far longer, and the slowness still shows in p99.
const WRK_TIMEOUT: Duration = Duration::from_secs(10);
/// The prefix sk_lookup steers to holdfast's sockets (made local in the namespace).
const PREFIX: &str = "192.0.2.0/24";
const HELLO_URL: &str = "http://192.0.2.1:8080/";
const GUNICORN_URL: &str = "http://192.0.2.2:8081/";
/// hello-http on its own socket (the baseline without holdfast).
const PLAIN_ADDR: &str = "192.0.2.3:9090";
const PLAIN_URL: &str = "http://192.0.2.3:9090/";
const PLAIN_SERVICE: &str = "hello own socket";
/// How long the daemon, a service or a plain instance may take to come up or go.
const UP_TIMEOUT: Duration = Duration::from_secs(15);
const POLL: Duration = Duration::from_millis(5);
/// How long a `holdfast` CLI command may take (a restart returns once the service is ready).
const CLI_TIMEOUT: Duration = Duration::from_secs(30);
/// The least time between the end of one disturbance (the service ready again) and the next.
/// gunicorn sends READY=1 before it forks its workers, and a SIGTERM that reaches a worker
/// between its fork and its own signal set-up is lost: the old instance then never exits and
/// is SIGKILLed at its stop-timeout with a request in hand. A restart within milliseconds of
/// the last would measure that gunicorn race, not holdfast.
const MIN_GAP: Duration = Duration::from_millis(500);
/// A disturbed run may last this many times `--duration` (wrk's `-d`).
const MAX_STRETCH: u64 = 10;
/// How long a ready service's state may take to read "running".
const STATE_SETTLE: Duration = Duration::from_secs(2);

/// The three-line WSGI app gunicorn serves.
const WSGI_APP: &str = "\
def app(environ, start_response):
    start_response(\"200 OK\", [(\"Content-Type\", \"text/plain\")])
    return [b\"hello from gunicorn\\n\"]
";

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Options {
    /// Each wrk run; whole seconds (rounded up).
    pub duration: Duration,
    pub count: u32,
}

/// TCP counters of the namespace (`/proc/net/snmp`), where only this step's traffic runs:
/// wrk counts a refused connection as a write error (its connect is non-blocking, the refusal
/// surfaces at the first write), so the kernel's own count is what tells refusals apart.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct TcpCounters {
    /// Connection attempts that failed: a SYN answered by RST (refused) on this namespace.
    attempt_fails: u64,
    /// Established connections that ended with a reset.
    estab_resets: u64,
}

impl TcpCounters {
    fn since(self, before: TcpCounters) -> TcpCounters {
        TcpCounters {
            attempt_fails: self.attempt_fails.saturating_sub(before.attempt_fails),
            estab_resets: self.estab_resets.saturating_sub(before.estab_resets),
        }
    }
}

/// The `Tcp:` header and value lines of `/proc/net/snmp`.
fn parse_snmp(text: &str) -> Result<TcpCounters> {
    let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
    let (Some(keys), Some(values)) = (tcp.next(), tcp.next()) else {
        bail!("no Tcp: lines in /proc/net/snmp:\n{text}");
    };
    let field = |name: &str| -> Result<u64> {
        let k = keys
            .split_whitespace()
            .position(|k| k == name)
            .with_context(|| format!("no Tcp {name} in /proc/net/snmp"))?;
        values
            .split_whitespace()
            .nth(k)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("unreadable Tcp {name} in /proc/net/snmp: {values:?}"))
    };
    Ok(TcpCounters {
        attempt_fails: field("AttemptFails")?,
        estab_resets: field("EstabResets")?,
    })
}

/// How wrk's clients use connections.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Style {
    KeepAlive,
    /// `Connection: close`: a new connection for every request.
    Close,
}

impl Style {
    fn label(self) -> &'static str {
        match self {
            Style::KeepAlive => "keep-alive",
            Style::Close => "conn/request",
        }
    }
}

/// What happens to the service while wrk runs.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Disturb {
    Nothing,
    /// `holdfast restart NAME --mode MODE`.
    Restart(&'static str),
    /// SIGKILL to the main pid; holdfast restarts it (`restart = "always"`).
    Kill9,
    /// hello-http on its own socket: SIGTERM, wait for it to exit, start it again.
    PlainStopStart,
}

impl Disturb {
    fn what(self) -> &'static str {
        match self {
            Disturb::Nothing => "nothing",
            Disturb::Restart("overlap") => "restart --mode overlap",
            Disturb::Restart(_) => "restart --mode stop-start",
            Disturb::Kill9 => "kill -9",
            Disturb::PlainStopStart => "plain stop/start",
        }
    }

    fn label(self, count: u32) -> String {
        match self {
            Disturb::Nothing => "no restarts".into(),
            Disturb::Restart(mode) => format!("{count}x restart {mode}"),
            Disturb::Kill9 => format!("{count}x kill -9"),
            Disturb::PlainStopStart => format!("{count}x plain stop/start"),
        }
    }
}

/// One wrk run with its disturbances.
#[derive(Debug, Clone)]
struct Run {
    service: &'static str,
    style: Style,
    disturb: Disturb,
    report: WrkReport,
    /// The namespace's TCP counters over the run.
    kernel: TcpCounters,
    /// Disturbances done while wrk ran.
    done: u32,
    /// Restarts that did not work (command failures, a service that did not come back).
    failures: Vec<String>,
    /// What the daemon got wrong without the clients seeing it (shown, not failed).
    warnings: Vec<String>,
}

impl Run {
    fn name(&self) -> String {
        format!(
            "{} {}, {} in {:.0}s",
            self.service,
            self.style.label(),
            self.disturb.label(self.done),
            self.report.seconds
        )
    }

    /// What must hold for this run; one line per broken promise.
    fn violations(&self, count: u32) -> Vec<String> {
        let r = &self.report;
        let refused = self.kernel.attempt_fails;
        let name = self.name();
        let mut out: Vec<String> = self
            .failures
            .iter()
            .map(|f| format!("{name}: {f}"))
            .collect();
        let errors = format!(
            "{} non-2xx; wrk socket errors: connect {}, read {}, write {}, timeout {}; refused (kernel) {refused}",
            r.non_2xx, r.connect, r.read, r.write, r.timeout
        );
        match self.disturb {
            Disturb::Nothing | Disturb::Restart(_) => {
                if r.non_2xx + r.socket_errors() + refused > 0 {
                    out.push(format!("{name}: must have no errors, had {errors}"));
                }
            }
            Disturb::Kill9 => {
                if r.connect + refused + r.non_2xx > 0 {
                    out.push(format!(
                        "{name}: a kill -9 must never refuse a connection, had {errors}"
                    ));
                }
            }
            // Refused connections are what this baseline shows.
            Disturb::PlainStopStart => {}
        }
        if self.disturb != Disturb::Nothing && self.done < count {
            out.push(format!(
                "{name}: only {} of {count} done while wrk ran (wrk stopped at its cap of {MAX_STRETCH}x the duration)",
                self.done
            ));
        }
        if r.requests == 0 {
            out.push(format!("{name}: wrk completed no request"));
        }
        out
    }
}

/// One figure of a run: its name, how to read it, its unit, and whether it is compared with
/// the baseline run. Runs may differ in length (a disturbed run lasts until its restarts are
/// done): the total of requests is not compared, the rate is.
type Figure = (&'static str, fn(&Run) -> f64, &'static str, bool);

const FIGURES: &[Figure] = &[
    ("requests", |r| r.report.requests as f64, "req", false),
    ("throughput", |r| r.report.rate(), "req/s", true),
    ("non-2xx", |r| r.report.non_2xx as f64, "resp", true),
    ("connect errors", |r| r.report.connect as f64, "err", true),
    ("read errors", |r| r.report.read as f64, "err", true),
    ("write errors", |r| r.report.write as f64, "err", true),
    ("timeouts", |r| r.report.timeout as f64, "err", true),
    (
        "refused (kernel)",
        |r| r.kernel.attempt_fails as f64,
        "conn",
        true,
    ),
    (
        "resets (kernel)",
        |r| r.kernel.estab_resets as f64,
        "conn",
        true,
    ),
    ("p50", |r| r.report.p50_ms, "ms", true),
    ("p99", |r| r.report.p99_ms, "ms", true),
];

/// The rows of `run`, each against the same figure of `base` when there is one.
fn rows(run: &Run, base: Option<&Run>) -> Vec<Row> {
    let name = run.name();
    FIGURES
        .iter()
        .map(|(what, read, unit, compared)| {
            let baseline = base.filter(|_| *compared).map(read);
            Row::new(format!("{name}: {what}"), read(run), baseline, unit)
        })
        .collect()
}

/// The step registered in `bench::STEPS`.
pub fn restarts(b: &Env, opts: Options) -> Result<Vec<Row>> {
    // wrk takes whole seconds.
    let opts = Options {
        duration: Duration::from_secs(opts.duration.as_secs_f64().ceil().max(1.0) as u64),
        ..opts
    };
    let tools = Tools::find(b)?;
    let scratch = Scratch::new()?;
    let result = measure(&tools, &scratch, opts);
    match &result {
        Ok(_) => scratch.remove(),
        Err(_) => eprintln!(
            "restarts: kept {} (daemon log, units)",
            scratch.path.display()
        ),
    }
    result
}

/// The programs the step runs.
struct Tools {
    holdfast: PathBuf,
    hello: PathBuf,
    gunicorn: PathBuf,
    wrk: PathBuf,
}

impl Tools {
    fn find(b: &Env) -> Result<Tools> {
        need_root("ip netns add, sk_lookup")?;
        let holdfast = b.bin_dir.join("holdfast");
        let hello = b.bin_dir.join("hello-http");
        for exe in [&holdfast, &hello] {
            ensure!(exe.is_file(), "{} is not built", exe.display());
        }
        let command = |name: &str| {
            find_command(name)
                .with_context(|| format!("{name} is not installed (run `cargo xtask bootstrap`)"))
        };
        Ok(Tools {
            holdfast,
            hello,
            gunicorn: command("gunicorn")?,
            wrk: command("wrk")?,
        })
    }
}

/// A scratch directory under the system temp dir: units, state, the WSGI app, logs.
struct Scratch {
    path: PathBuf,
}

impl Scratch {
    fn new() -> Result<Scratch> {
        let path =
            std::env::temp_dir().join(format!("holdfast-bench-restarts-{}", std::process::id()));
        if path.exists() {
            fs::remove_dir_all(&path).with_context(|| format!("remove {}", path.display()))?;
        }
        for sub in ["units", "state", "app"] {
            fs::create_dir_all(path.join(sub))
                .with_context(|| format!("create {}", path.join(sub).display()))?;
        }
        Ok(Scratch { path })
    }

    fn remove(&self) {
        if let Err(e) = fs::remove_dir_all(&self.path) {
            eprintln!("restarts: cannot remove {}: {e}", self.path.display());
        }
    }
}

/// A network namespace of the kit with `lo` up, [`PREFIX`] local, and
/// `net.ipv4.tcp_tw_reuse = 1`: a connection per request leaves tens of
/// thousands of TIME_WAIT sockets on the server side, and wrk's connects then
/// search the ephemeral ports for a 4-tuple not taken by one. Linux lets a
/// connect reuse a TIME_WAIT 4-tuple by default (`tcp_tw_reuse = 2`) only
/// between 127/8 addresses: to the steered 192.0.2.0/24, wrk spent half the
/// machine's CPU in that search (perf: `__inet_check_established`,
/// `tcp_twsk_unique`) and gunicorn's steered rate was a third of its rate on
/// 127.0.0.1, a cost of the load generator's host, not of the server.
fn netns() -> Result<Netns> {
    let ns = Netns::new()?;
    ns.add_local_route(PREFIX)?;
    let status = Command::new("ip")
        .args(["netns", "exec", ns.name(), "sh", "-c"])
        .arg("echo 1 > /proc/sys/net/ipv4/tcp_tw_reuse")
        .status()
        .context("run ip netns exec … sh")?;
    ensure!(
        status.success(),
        "setting tcp_tw_reuse in {}: {status}",
        ns.name()
    );
    Ok(ns)
}

/// `ip netns exec NAME PROGRAM` (exec keeps the pid: signals reach PROGRAM).
fn in_netns(ns: &Netns, program: &Path) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns.name()]).arg(program);
    cmd
}

/// The namespace's TCP counters.
fn tcp_counters(ns: &Netns) -> Result<TcpCounters> {
    let mut cat = in_netns(ns, Path::new("cat"));
    cat.arg("/proc/net/snmp");
    let out = holdfast_testkit::run_bounded(cat, Duration::from_secs(10))?;
    ensure!(
        out.status.success(),
        "cat /proc/net/snmp in {}: {}",
        ns.name(),
        String::from_utf8_lossy(&out.stderr)
    );
    parse_snmp(&String::from_utf8_lossy(&out.stdout))
}

fn signal(pid: i32, sig: i32) -> bool {
    // SAFETY: kill(2) takes two integers and touches no memory of ours.
    unsafe { libc::kill(pid, sig) == 0 }
}

/// What the step reads from `holdfast status NAME --json`.
#[derive(Debug, Clone, PartialEq)]
struct Status {
    state: String,
    pid: Option<i32>,
    /// The main instance has sent READY=1.
    ready: bool,
}

/// `holdfast run` in the namespace; SIGTERM (then SIGKILL) on drop.
struct Daemon<'a> {
    child: Child,
    tools: &'a Tools,
    state: PathBuf,
    log: PathBuf,
}

impl<'a> Daemon<'a> {
    fn start(tools: &'a Tools, scratch: &Scratch, ns: &Netns) -> Result<Daemon<'a>> {
        let units = scratch.path.join("units");
        let service = |exec: Vec<String>, port: u16, extra: &str| {
            let exec: Vec<String> = exec.iter().map(|a| toml_str(a)).collect();
            format!(
                "[service]\n\
                 exec = [{}]\n\
                 {extra}\
                 type = \"notify\"\n\
                 restart = \"always\"\n\
                 # 50 kills in 30 s: the default start limit (5 in 10 s) would leave it failed.\n\
                 restart-delay = \"10ms\"\n\
                 restart-delay-max = \"100ms\"\n\
                 start-limit-burst = 100000\n\
                 \n\
                 [[socket]]\n\
                 name = \"http\"\n\
                 protocol = \"tcp\"\n\
                 addresses = [\"{PREFIX}\"]\n\
                 ports = [\"{port}\"]\n",
                exec.join(", ")
            )
        };
        let hello = service(
            vec![
                tools.hello.display().to_string(),
                "--name".into(),
                "hello".into(),
            ],
            port_of(HELLO_URL),
            "",
        );
        let app = scratch.path.join("app");
        fs::write(app.join("app.py"), WSGI_APP).context("write app.py")?;
        // gunicorn takes its listener from LISTEN_FDS and sends READY=1 to NOTIFY_SOCKET itself.
        let gunicorn = service(
            vec![
                tools.gunicorn.display().to_string(),
                "--chdir".into(),
                app.display().to_string(),
                "--workers".into(),
                "2".into(),
                "app:app".into(),
            ],
            port_of(GUNICORN_URL),
            // As gunicorn's own systemd example: SIGTERM to the arbiter only, which
            // stops its workers; a SIGTERM that reaches a worker directly makes the
            // arbiter log from its SIGCHLD handler while it writes to stderr, and
            // gunicorn 20.1 can then hang ("reentrant call") until SIGKILL.
            "kill-mode = \"mixed\"\n",
        );
        fs::write(units.join("hello.toml"), hello).context("write hello.toml")?;
        fs::write(units.join("gunicorn.toml"), gunicorn).context("write gunicorn.toml")?;

        let state = scratch.path.join("state");
        let log = scratch.path.join("holdfast.log");
        let out = File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let err = out.try_clone().context("dup the log file")?;
        let mut cmd = Command::new(&tools.holdfast);
        cmd.arg("run")
            .arg("--units")
            .arg(&units)
            .arg("--state-dir")
            .arg(&state)
            .arg("--netns")
            .arg(ns.path())
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        eprintln!("restarts: $ {cmd:?}");
        let child = cmd.spawn().context("start holdfast run")?;
        let mut daemon = Daemon {
            child,
            tools,
            state,
            log,
        };
        for name in ["hello", "gunicorn"] {
            daemon.wait_up(name, None)?;
        }
        Ok(daemon)
    }

    /// `holdfast ARGS… --state-dir STATE`, killed after [`CLI_TIMEOUT`]: a daemon that never
    /// answers must not hang the benchmark.
    fn cli(&self, args: &[&str]) -> Result<Output> {
        let what = format!("holdfast {}", args.join(" "));
        let mut child = Command::new(&self.tools.holdfast)
            .args(args)
            .arg("--state-dir")
            .arg(&self.state)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("run {what}"))?;
        let deadline = Instant::now() + CLI_TIMEOUT;
        while child.try_wait()?.is_none() {
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "{what} got no answer within {CLI_TIMEOUT:?}; the daemon's log is {}",
                    self.log.display()
                );
            }
            std::thread::sleep(POLL);
        }
        child
            .wait_with_output()
            .with_context(|| format!("read the output of {what}"))
    }

    /// `holdfast status NAME --json`.
    fn status(&self, name: &str) -> Result<Status> {
        let out = self.cli(&["status", name, "--json"])?;
        if !out.status.success() {
            bail!(
                "holdfast status {name} --json: {} {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).context("holdfast status --json printed")?;
        let svc = v
            .as_array()
            .and_then(|a| a.iter().find(|s| s["name"] == name))
            .with_context(|| format!("holdfast status has no service {name}: {v}"))?;
        Ok(Status {
            state: svc["state"].as_str().unwrap_or_default().to_string(),
            pid: svc["pid"].as_i64().map(|p| p as i32),
            ready: svc["ready"].as_bool().unwrap_or(false),
        })
    }

    /// Waits until `name` has a main pid other than `not` that has sent READY=1. This does not
    /// look at the state: see [`Daemon::state_after`].
    fn wait_up(&mut self, name: &str, not: Option<i32>) -> Result<i32> {
        let deadline = Instant::now() + UP_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "holdfast run exited ({status}); its log is {}",
                    self.log.display()
                );
            }
            let last = match self.status(name) {
                Ok(Status {
                    pid: Some(pid),
                    ready: true,
                    ..
                }) if Some(pid) != not => return Ok(pid),
                Ok(st) => format!("{st:?}"),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() >= deadline {
                bail!(
                    "{name} has no new ready main pid within {UP_TIMEOUT:?} (last {last}); the daemon's log is {}",
                    self.log.display()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Once `name` is up again after a run: what `holdfast status` says if it does not settle
    /// on "running" within [`STATE_SETTLE`], else None.
    fn state_after(&mut self, name: &str) -> Result<Option<Status>> {
        let pid = self.wait_up(name, None)?;
        let deadline = Instant::now() + STATE_SETTLE;
        loop {
            let st = self.status(name)?;
            if st.state == "running" {
                return Ok(None);
            }
            if Instant::now() >= deadline {
                return Ok(Some(Status {
                    pid: st.pid.or(Some(pid)),
                    ..st
                }));
            }
            std::thread::sleep(POLL);
        }
    }

    /// One disturbance of `name`.
    fn disturb(&mut self, name: &str, how: Disturb) -> Result<()> {
        match how {
            Disturb::Restart(mode) => {
                let out = self.cli(&["restart", name, "--mode", mode])?;
                if !out.status.success() {
                    bail!(
                        "holdfast restart {name} --mode {mode}: {} {}",
                        out.status,
                        String::from_utf8_lossy(&out.stderr).trim()
                    );
                }
                Ok(())
            }
            Disturb::Kill9 => {
                let pid = self.wait_up(name, None)?;
                ensure!(
                    signal(pid, libc::SIGKILL),
                    "kill -9 {pid}: {}",
                    std::io::Error::last_os_error()
                );
                self.wait_up(name, Some(pid)).map(|_| ())
            }
            Disturb::Nothing | Disturb::PlainStopStart => Ok(()),
        }
    }
}

impl Drop for Daemon<'_> {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        signal(self.child.id() as i32, libc::SIGTERM);
        let deadline = Instant::now() + UP_TIMEOUT;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("restarts: holdfast run ignored SIGTERM for {UP_TIMEOUT:?}: SIGKILL");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// hello-http binding [`PLAIN_ADDR`] itself in the namespace, restarted by plain stop/start.
struct Plain<'a> {
    ns: &'a Netns,
    hello: &'a Path,
    log_dir: PathBuf,
    child: Option<Child>,
    starts: u32,
}

impl<'a> Plain<'a> {
    fn start(ns: &'a Netns, hello: &'a Path, log_dir: PathBuf) -> Result<Plain<'a>> {
        let mut plain = Plain {
            ns,
            hello,
            log_dir,
            child: None,
            starts: 0,
        };
        plain.spawn()?;
        Ok(plain)
    }

    /// Starts an instance and waits for its "serving" log line (it has bound and listens).
    fn spawn(&mut self) -> Result<()> {
        self.starts += 1;
        let log = self.log_dir.join(format!("plain-{}.log", self.starts));
        let out = File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let mut cmd = in_netns(self.ns, self.hello);
        cmd.args(["--name", "plain", "--listen", PLAIN_ADDR])
            .env("NO_COLOR", "1")
            .env_remove("LISTEN_FDS")
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(out);
        let mut child = cmd.spawn().context("start hello-http --listen")?;
        let deadline = Instant::now() + UP_TIMEOUT;
        loop {
            if fs::read_to_string(&log).is_ok_and(|t| t.contains("serving")) {
                self.child = Some(child);
                return Ok(());
            }
            if let Some(status) = child.try_wait()? {
                bail!(
                    "hello-http --listen {PLAIN_ADDR} exited ({status}): {}",
                    fs::read_to_string(&log).unwrap_or_default().trim()
                );
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("hello-http --listen {PLAIN_ADDR} not serving within {UP_TIMEOUT:?}");
            }
            std::thread::sleep(POLL);
        }
    }

    /// SIGTERM (it drains and exits), wait, start again.
    fn stop_start(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            signal(child.id() as i32, libc::SIGTERM);
            child.wait().context("wait for hello-http --listen")?;
        }
        self.spawn()
    }
}

impl Drop for Plain<'_> {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn measure(tools: &Tools, scratch: &Scratch, opts: Options) -> Result<Vec<Row>> {
    let ns = netns()?;
    eprintln!(
        "restarts: netns {}, {CONNECTIONS} connections, {}s per run, {} restarts per run",
        ns.name(),
        opts.duration.as_secs(),
        opts.count
    );
    let mut runs: Vec<Run> = Vec::new();

    // The baseline no one here wrote first, before the daemon's services compete for the CPU.
    {
        let mut plain = Plain::start(&ns, &tools.hello, scratch.path.clone())?;
        for style in [Style::KeepAlive, Style::Close] {
            for disturb in [Disturb::Nothing, Disturb::PlainStopStart] {
                let run = load(
                    tools,
                    scratch,
                    &ns,
                    opts,
                    PLAIN_SERVICE,
                    PLAIN_URL,
                    style,
                    disturb,
                    &mut |_| plain.stop_start(),
                )?;
                runs.push(run);
            }
        }
    }

    let mut daemon = Daemon::start(tools, scratch, &ns)?;
    for (service, url) in [("hello", HELLO_URL), ("gunicorn", GUNICORN_URL)] {
        for style in [Style::KeepAlive, Style::Close] {
            for disturb in [
                Disturb::Nothing,
                Disturb::Restart("overlap"),
                Disturb::Restart("stop-start"),
                Disturb::Kill9,
            ] {
                let mut run = load(
                    tools,
                    scratch,
                    &ns,
                    opts,
                    service,
                    url,
                    style,
                    disturb,
                    &mut |how| daemon.disturb(service, how),
                )?;
                // Each run starts from a service that is up again; its state must say so.
                if let Some(st) = daemon.state_after(service)? {
                    run.warnings.push(format!(
                        "afterwards `holdfast status` says state {:?} for main pid {:?}, which is up and ready (READY=1): the state should be \"running\"",
                        st.state, st.pid
                    ));
                }
                runs.push(run);
            }
        }
    }
    drop(daemon);

    let mut table = Vec::new();
    let mut violations = Vec::new();
    for run in &runs {
        for w in &run.warnings {
            eprintln!("restarts: WARNING: {}: {w}", run.name());
        }
    }
    for run in &runs {
        let quiet = |service: &str| {
            runs.iter().find(|b| {
                b.disturb == Disturb::Nothing && b.service == service && b.style == run.style
            })
        };
        let base = match (run.disturb, run.service) {
            // hello-http's no-restart runs under holdfast against the same on its own socket:
            // what steering and a shared socket cost when nothing happens.
            (Disturb::Nothing, "hello") => quiet(PLAIN_SERVICE),
            (Disturb::Nothing, _) => None,
            _ => quiet(run.service),
        };
        table.extend(rows(run, base));
        violations.extend(run.violations(opts.count));
    }
    if !violations.is_empty() {
        // The framework prints no table for a failed step: the figures go to stderr instead.
        eprintln!("restarts: figures (name | value | baseline | ratio | unit):");
        for row in &table {
            let opt = |x: Option<f64>| x.map_or("-".into(), |x| format!("{x:.4}"));
            eprintln!(
                "restarts: {} | {} | {} | {} | {}",
                row.name,
                row.value,
                opt(row.baseline),
                opt(row.ratio),
                row.unit
            );
        }
        bail!(
            "{} broken promise(s):\n  {}",
            violations.len(),
            violations.join("\n  ")
        );
    }
    Ok(table)
}

/// Runs wrk for `opts.duration` against `url` and, unless `disturb` is `Nothing`, calls `act`
/// `opts.count` times spread over the middle 80% of the run.
#[expect(
    clippy::too_many_arguments,
    reason = "one call site per kind of service; a struct would only rename the arguments"
)]
fn load(
    tools: &Tools,
    scratch: &Scratch,
    ns: &Netns,
    opts: Options,
    service: &'static str,
    url: &str,
    style: Style,
    disturb: Disturb,
    act: &mut dyn FnMut(Disturb) -> Result<()>,
) -> Result<Run> {
    // A disturbed run lasts until every disturbance is done (a cold Python start on a busy
    // machine can take longer than its slot), then wrk is stopped with SIGINT, after which it
    // prints its figures as at the end of `-d`. `-d` is only the cap.
    let secs = match disturb {
        Disturb::Nothing => opts.duration.as_secs(),
        _ => opts.duration.as_secs() * MAX_STRETCH,
    };
    let mut cmd = in_netns(ns, &tools.wrk);
    WrkArgs {
        url,
        connections: CONNECTIONS,
        duration: Duration::from_secs(secs),
        timeout: WRK_TIMEOUT,
        header: (style == Style::Close).then_some("Connection: close"),
    }
    .add_to(&mut cmd, &scratch.path)?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let line = format!("{cmd:?}");
    let before = tcp_counters(ns)?;
    let started = Instant::now();
    let mut wrk = cmd.spawn().with_context(|| format!("start `{line}`"))?;

    let mut done = 0;
    let mut failures = Vec::new();
    if disturb != Disturb::Nothing {
        // Quiet for a tenth of the duration at each end, disturbances spread over the rest.
        let lead = opts.duration / 10;
        let span = opts.duration * 8 / 10;
        let mut last_done = started;
        for k in 0..opts.count {
            let slot = (started + lead + span * k / opts.count).max(last_done + MIN_GAP);
            while Instant::now() < slot && wrk.try_wait()?.is_none() {
                std::thread::sleep(POLL.min(slot.saturating_duration_since(Instant::now())));
            }
            if wrk.try_wait()?.is_some() {
                break;
            }
            let result = act(disturb);
            last_done = Instant::now();
            match result {
                // One that ended after wrk did is not counted as done under load.
                Ok(()) if wrk.try_wait()?.is_none() => done += 1,
                Ok(()) => break,
                Err(e) => {
                    failures.push(format!("{} #{}: {e:#}", disturb.what(), k + 1));
                    // A restart that did not finish would turn every later try into noise.
                    break;
                }
            }
        }
        let end = (started + opts.duration).max(Instant::now() + lead);
        while Instant::now() < end && wrk.try_wait()?.is_none() {
            std::thread::sleep(POLL.min(end.saturating_duration_since(Instant::now())));
        }
        if wrk.try_wait()?.is_none() {
            signal(wrk.id() as i32, libc::SIGINT);
        }
    }
    let out = wrk
        .wait_with_output()
        .with_context(|| format!("wait for `{line}`"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "`{line}` failed ({}): {}{}",
            out.status,
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let report = WrkReport::parse(&text).with_context(|| format!("`{line}`"))?;
    let kernel = tcp_counters(ns)?.since(before);
    let run = Run {
        service,
        style,
        disturb,
        report,
        kernel,
        done,
        failures,
        warnings: Vec::new(),
    };
    eprintln!(
        "restarts: {}: {} requests, {} non-2xx, wrk socket errors connect {} read {} write {} timeout {}, refused {} reset {} (kernel), p50 {:.3} ms, p99 {:.3} ms",
        run.name(),
        run.report.requests,
        run.report.non_2xx,
        run.report.connect,
        run.report.read,
        run.report.write,
        run.report.timeout,
        kernel.attempt_fails,
        kernel.estab_resets,
        run.report.p50_ms,
        run.report.p99_ms
    );
    Ok(run)
}

fn port_of(url: &str) -> u16 {
    url.rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .expect("the URL constants end in :PORT/")
}

/// A TOML basic string.
fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(disturb: Disturb, report: &WrkReport, done: u32) -> Run {
        Run {
            service: "hello",
            style: Style::Close,
            disturb,
            report: report.clone(),
            kernel: TcpCounters::default(),
            done,
            failures: Vec::new(),
            warnings: vec!["not counted as a broken promise".into()],
        }
    }

    #[test]
    fn promises_are_checked_per_kind_of_run() {
        let clean = WrkReport {
            requests: 100,
            ..WrkReport::default()
        };
        let refused = WrkReport {
            connect: 3,
            ..clean.clone()
        };
        let reset = WrkReport {
            read: 3,
            ..clean.clone()
        };
        assert!(run(Disturb::Restart("overlap"), &clean, 50)
            .violations(50)
            .is_empty());
        assert_eq!(
            run(Disturb::Restart("overlap"), &reset, 50)
                .violations(50)
                .len(),
            1
        );
        assert_eq!(run(Disturb::Nothing, &refused, 0).violations(50).len(), 1);
        // A kill -9 may lose accepted requests, never refuse one.
        assert!(run(Disturb::Kill9, &reset, 50).violations(50).is_empty());
        assert_eq!(run(Disturb::Kill9, &refused, 50).violations(50).len(), 1);
        // The plain baseline is expected to refuse.
        assert!(run(Disturb::PlainStopStart, &refused, 50)
            .violations(50)
            .is_empty());
        // Too few restarts while wrk ran, or no request at all.
        assert_eq!(
            run(Disturb::Restart("stop-start"), &clean, 49)
                .violations(50)
                .len(),
            1
        );
        assert_eq!(
            run(Disturb::Nothing, &WrkReport::default(), 0)
                .violations(50)
                .len(),
            1
        );
        // wrk counts a refusal as a write error; the kernel's count catches it as a refusal.
        let mut kernel_refused = run(Disturb::Kill9, &clean, 50);
        kernel_refused.kernel.attempt_fails = 1;
        assert_eq!(kernel_refused.violations(50).len(), 1);
        let mut failed = run(Disturb::Restart("overlap"), &clean, 50);
        failed
            .failures
            .push("holdfast restart: exit status 1".into());
        assert_eq!(failed.violations(50).len(), 1);
    }

    #[test]
    fn rows_compare_with_the_baseline() {
        let base = run(
            Disturb::Nothing,
            &WrkReport {
                requests: 200,
                seconds: 10.0,
                p50_ms: 1.0,
                p99_ms: 4.0,
                ..WrkReport::default()
            },
            0,
        );
        let during = run(
            Disturb::Restart("overlap"),
            &WrkReport {
                requests: 200,
                seconds: 20.0,
                read: 2,
                p50_ms: 2.0,
                p99_ms: 8.0,
                ..WrkReport::default()
            },
            50,
        );
        let rows = rows(&during, Some(&base));
        assert_eq!(rows.len(), 11);
        assert_eq!(
            rows[0].name,
            "hello conn/request, 50x restart overlap in 20s: requests"
        );
        assert_eq!((rows[0].value, rows[0].baseline), (200.0, None));
        assert_eq!((rows[1].value, rows[1].ratio), (10.0, Some(0.5)));
        assert_eq!(
            (rows[4].value, rows[4].baseline, rows[4].ratio),
            (2.0, Some(0.0), None)
        );
        assert_eq!(rows[10].ratio, Some(2.0));
        assert!(super::rows(&base, None)
            .iter()
            .all(|r| r.baseline.is_none()));
    }

    #[test]
    fn snmp_tcp_counters_are_read() {
        let snmp = "\
Ip: Forwarding DefaultTTL InReceives
Ip: 2 64 100
Tcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens PassiveOpens AttemptFails EstabResets CurrEstab
Tcp: 1 200 120000 -1 30 20 7 3 2
Udp: InDatagrams
Udp: 0
";
        let now = parse_snmp(snmp).unwrap();
        assert_eq!(
            now,
            TcpCounters {
                attempt_fails: 7,
                estab_resets: 3
            }
        );
        let before = TcpCounters {
            attempt_fails: 5,
            estab_resets: 3,
        };
        assert_eq!(
            now.since(before),
            TcpCounters {
                attempt_fails: 2,
                estab_resets: 0
            }
        );
        assert!(parse_snmp("Ip: a\nIp: 1\n").is_err());
        assert!(parse_snmp("Tcp: ActiveOpens\nTcp: 1\n").is_err());
    }

    #[test]
    fn units_get_valid_toml_strings() {
        for path in ["/tmp/a b/\"x\"", "it's", "C:\\x"] {
            let doc: toml::Table = toml::from_str(&format!("x = {}", toml_str(path))).unwrap();
            assert_eq!(doc["x"].as_str(), Some(path));
        }
        assert_eq!(port_of(HELLO_URL), 8080);
        assert_eq!(port_of(GUNICORN_URL), 8081);
    }
}
