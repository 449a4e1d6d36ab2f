//! The `holdfast` command: the daemon (`run`) and the CLI that talks to it.
//! Replies are the typed `holdfast::protocol` values, printed as tables or,
//! with `--json`, as the JSON that `docs/json.md` documents.
//!
//! Exit codes: 0 ok; 1 the operation failed (invalid units, a listener that
//! cannot be created, an error reply); 2 usage error; 3 the control socket
//! could not be reached.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use clap::{Parser, Subcommand};
use holdfast::control::{self, Request};
use holdfast::protocol::{
    rfc3339, BindingStatus, LogLine, LogLines, MetricsReply, ReloadSummary, ServiceStatus,
    UpgradeReport,
};
use holdfast::unit::{self, RestartMode};
use holdfast::{preflight, supervisor};
use serde::de::DeserializeOwned;
use serde::Serialize;

#[derive(Parser)]
#[command(name = "holdfast", version, about = "A socket-activation supervisor")]
struct Cli {
    /// holdfast's state directory: its control socket, notify sockets and lock.
    #[arg(long, global = true, default_value = "/run/holdfast")]
    state_dir: PathBuf,
    /// Machine-readable output: the JSON of docs/json.md (for `run`: log lines as JSON).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum JournalMode {
    Auto,
    Off,
}

#[derive(Subcommand)]
enum Command {
    /// Run the supervisor in the foreground on a units directory.
    Run(RunArgs),
    /// Validate a units directory without starting anything: the files, and
    /// what they name on this machine (users, groups, programs).
    Check { dir: PathBuf },
    /// Translate systemd units (FILE.socket [FILE.service], or FILE.service) into DIR/NAME.toml.
    /// Exit 0: all translated; 1: some directives were not (each is listed); 2: usage.
    Import {
        /// FILE.socket [FILE.service], or FILE.service.
        #[arg(required = true, num_args = 1..=2)]
        files: Vec<PathBuf>,
        #[arg(long, default_value = ".")]
        output: PathBuf,
        /// The instance of a template (foo@.socket): what %i stands for.
        #[arg(long)]
        instance: Option<String>,
        /// Replace DIR/NAME.toml if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Show services: name, state, main pid, restarts, uptime, sockets.
    Status { name: Option<String> },
    /// Start a stopped or failed service.
    Start { name: String },
    /// Stop a service (SIGTERM, then SIGKILL after its stop-timeout); its sockets stay open.
    Stop { name: String },
    /// List every binding: service, socket, protocol, prefix, ports, destination, counters.
    Bindings,
    /// Print Prometheus text exposition (or, with --json, the same figures as JSON).
    Metrics,
    /// Re-read the units directory and apply the difference (SIGHUP does the same).
    Reload,
    /// Reload one service in place: run its exec-reload commands (with
    /// $MAINPID), or for type = "notify-reload" send its reload-signal and
    /// wait for RELOADING=1 then READY=1. Exit 1 if it has neither or the
    /// reload failed.
    ReloadService { name: String },
    /// Show a service's captured output (the last 1000 lines are kept), each
    /// line with when it was read (UTC), its stream and its instance's pid.
    Logs {
        name: String,
        /// Only the last N lines (of those --since leaves).
        #[arg(short = 'n', long)]
        lines: Option<usize>,
        /// Only lines read since a time (RFC 3339 in UTC, e.g.
        /// "2026-12-07 13:00:00" or "2026-12-07T13:00:00Z") or a duration ago
        /// (e.g. "5min", "1h 30min").
        #[arg(long, value_parser = parse_since)]
        since: Option<SystemTime>,
        /// Keep printing new lines as they come.
        #[arg(short = 'f', long)]
        follow: bool,
    },
    /// Re-execute holdfast in place with the binary now at its path (SIGUSR2
    /// does the same): same pid, every service and socket kept. A refused or
    /// failed upgrade changes nothing and says why (exit 1).
    Upgrade,
    /// Whether this binary can take over from a holdfast saving state VERSION
    /// (asked by the running holdfast before an upgrade).
    #[command(name = "__accepts-state", hide = true)]
    AcceptsState { version: u32 },
    /// Restart a service; its sockets stay open, so no connection is refused.
    Restart {
        name: String,
        #[arg(long, value_enum)]
        mode: Option<RestartMode>,
    },
}

// `holdfast run`'s options; its help text is the `Command::Run` line.
#[derive(clap::Args)]
struct RunArgs {
    /// The directory of NAME.toml unit files.
    #[arg(long, default_value = "/etc/holdfast/units")]
    units: PathBuf,
    /// The network namespace to serve (e.g. /run/netns/NAME); default: holdfast's own.
    #[arg(long)]
    netns: Option<PathBuf>,
    /// Never load BPF: bind every socket directly (one address, one port each).
    #[arg(long)]
    no_dispatcher: bool,
    /// The dispatcher's name under /sys/fs/bpf/holdfast (default: netns-<inode>).
    #[arg(long)]
    instance: Option<String>,
    /// Serve Prometheus metrics over HTTP at ADDR:PORT (GET /metrics).
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Track each service's processes in a cgroup v2 under this cgroup (a
    /// directory under the cgroup2 mount, or a path as /proc/self/cgroup
    /// shows it); made if missing. Default: holdfast's own cgroup when it
    /// is alone there (Delegate=yes), else a `holdfast-<pid>` child of it.
    #[arg(long, conflicts_with = "no_cgroups")]
    cgroup_root: Option<PathBuf>,
    /// Track services by process group only (the weaker mode: a process
    /// that calls setsid escapes stop), as where cgroup v2 is not writable.
    #[arg(long)]
    no_cgroups: bool,
    /// Log format: human (default) or json (one object per line).
    #[arg(long, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    /// Forward each line services write to systemd-journald (auto: when
    /// its socket exists at start; off: never). The ring of `holdfast
    /// logs` keeps them either way.
    #[arg(long, value_enum, default_value_t = JournalMode::Auto)]
    journal: JournalMode,
    /// journald's native socket.
    #[arg(long, default_value = holdfast::journal::DEFAULT_SOCKET)]
    journal_socket: PathBuf,
}

impl RunArgs {
    /// The daemon's options: these, with the state directory.
    fn options(self, state_dir: PathBuf) -> supervisor::Options {
        supervisor::Options {
            units: self.units,
            state_dir,
            netns: self.netns,
            no_dispatcher: self.no_dispatcher,
            instance: self.instance,
            metrics_listen: self.metrics_listen,
            cgroup_root: self.cgroup_root,
            no_cgroups: self.no_cgroups,
            journal: (self.journal == JournalMode::Auto).then_some(self.journal_socket),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Run(_)) {
        die_quietly_on_broken_pipe();
    }
    let out = Output { json: cli.json };
    let dir = cli.state_dir.as_path();
    match cli.command {
        Command::Run(run) => {
            init_logging(if cli.json {
                LogFormat::Json
            } else {
                run.log_format
            });
            run_daemon(&run.options(cli.state_dir))
        }
        Command::Check { dir: units_dir } => check(&units_dir, dir, out),
        Command::Import {
            files,
            output,
            instance,
            force,
        } => import(files, &output, instance, force, cli.json),
        Command::Status { name } => {
            ask::<Vec<ServiceStatus>>(dir, &Request::Status { name }, |rows| {
                out.show(&rows, || print_status(&rows))
            })
        }
        Command::Bindings => ask::<Vec<BindingStatus>>(dir, &Request::Bindings, |rows| {
            out.show(&rows, || print_bindings(&rows))
        }),
        Command::Metrics => ask::<MetricsReply>(dir, &Request::Metrics, |m| {
            out.show(&m.snapshot, || print!("{}", m.text))
        }),
        // The summary is JSON either way (scripts read it).
        Command::Reload => ask::<ReloadSummary>(dir, &Request::Reload, |s| out.json(&s)),
        Command::ReloadService { name } => {
            service_command(dir, Request::ReloadService { name }, out)
        }
        Command::Logs {
            name,
            lines,
            since,
            follow,
        } => logs(dir, name, lines, since, follow, out),
        Command::Start { name } => service_command(dir, Request::Start { name }, out),
        Command::Stop { name } => service_command(dir, Request::Stop { name }, out),
        Command::Upgrade => upgrade(dir, out),
        Command::AcceptsState { version } => accepts_state(version),
        Command::Restart { name, mode } => {
            service_command(dir, Request::Restart { name, mode }, out)
        }
    }
}

/// start, stop, restart, reload-service: the service's status as the daemon
/// answers once it is done (printed with --json only).
fn service_command(dir: &Path, req: Request, out: Output) -> ExitCode {
    ask::<ServiceStatus>(dir, &req, |s| out.show(&s, || {}))
}

/// `holdfast upgrade`: the new binary's report.
fn upgrade(dir: &Path, out: Output) -> ExitCode {
    ask::<UpgradeReport>(dir, &Request::Upgrade, |r| {
        out.show(&r, || {
            println!(
                "upgraded in place: pid {} now runs holdfast {} (was {}), {} service(s) kept",
                r.pid, r.to, r.from, r.services
            )
        })
    })
}

/// `holdfast run`: the daemon until it is stopped; 1 if it could not start.
fn run_daemon(opts: &supervisor::Options) -> ExitCode {
    match supervisor::run(opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("holdfast: {e}");
            ExitCode::from(1)
        }
    }
}

/// `holdfast import`: its own exit codes (0 all translated, 1 some not, 2 usage).
fn import(
    files: Vec<PathBuf>,
    output: &Path,
    instance: Option<String>,
    force: bool,
    json: bool,
) -> ExitCode {
    if json {
        eprintln!(
            "holdfast: import prints what it wrote and what it dropped; it has no --json output"
        );
        return ExitCode::from(2);
    }
    let req = holdfast::import::Request { files, instance };
    ExitCode::from(holdfast::import::run(&req, output, force))
}

/// `holdfast __accepts-state VERSION`, asked before an upgrade.
fn accepts_state(version: u32) -> ExitCode {
    if supervisor::accepts_state_version(version) {
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "holdfast {} resumes from state version {}, not {version}",
            env!("CARGO_PKG_VERSION"),
            supervisor::STATE_VERSION
        );
        ExitCode::from(1)
    }
}

/// How replies are printed.
#[derive(Clone, Copy)]
struct Output {
    json: bool,
}

impl Output {
    /// The value as JSON with `--json`, else what `human` prints.
    fn show<T: Serialize>(self, value: &T, human: impl FnOnce()) {
        if self.json {
            self.json(value);
        } else {
            human();
        }
    }

    fn json<T: Serialize>(self, value: &T) {
        println!(
            "{}",
            serde_json::to_string_pretty(value).expect("replies serialize")
        );
    }
}

/// `holdfast check`: the files, then what they name on this machine.
fn check(units_dir: &Path, state_dir: &Path, out: Output) -> ExitCode {
    let loaded = unit::load_dir(units_dir).and_then(|units| {
        let path = std::env::var_os("PATH");
        preflight::check_units(&units, state_dir, path.as_deref(), None).map(|()| units)
    });
    match loaded {
        Ok(units) => {
            let names: Vec<&str> = units.iter().map(|u| u.name.as_str()).collect();
            out.show(
                &serde_json::json!({ "valid": true, "units": names }),
                || {
                    println!(
                        "{}: {} unit(s), all valid",
                        units_dir.display(),
                        units.len()
                    )
                },
            );
            ExitCode::SUCCESS
        }
        Err(diags) => {
            if out.json {
                let errors: Vec<String> = diags.to_string().lines().map(String::from).collect();
                out.json(&serde_json::json!({ "valid": false, "errors": errors }));
            }
            eprintln!("{diags}");
            ExitCode::from(1)
        }
    }
}

/// The CLI is killed by SIGPIPE when its reader leaves (`holdfast status |
/// head -1`), quietly, as coreutils are; Rust ignores SIGPIPE, which would
/// turn that into a panic on the next print. `run` keeps ignoring it: a
/// client hanging up must not kill the daemon.
fn die_quietly_on_broken_pipe() {
    // SAFETY: signal(2) with SIG_DFL has no preconditions; it runs at start-up,
    // before any thread or handler exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Logs go to stderr, filtered by RUST_LOG (default: info).
fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Sends one request; on success hands its typed result to `show`.
fn ask<T: DeserializeOwned>(state_dir: &Path, req: &Request, show: impl FnOnce(T)) -> ExitCode {
    match call::<T>(state_dir, req) {
        Ok(value) => {
            show(value);
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

/// One request and its typed result; an error is printed and becomes the exit code.
fn call<T: DeserializeOwned>(state_dir: &Path, req: &Request) -> Result<T, ExitCode> {
    match control::call(state_dir, req) {
        Ok(reply) => reply.into_result().map_err(|e| {
            eprintln!("holdfast: {e}");
            ExitCode::from(1)
        }),
        Err(e @ control::ControlError::Connect { .. }) => {
            eprintln!("holdfast: {e}");
            Err(ExitCode::from(3))
        }
        Err(e) => {
            eprintln!("holdfast: {e}");
            Err(ExitCode::from(1))
        }
    }
}

/// Bytes as `holdfast status` shows them: `512B`, `1.5K`, `12.0M`, `2.0G`.
fn human_bytes(b: u64) -> String {
    let mut v = b as f64;
    for unit in ["B", "K", "M", "G"] {
        if v < 1024.0 || unit == "G" {
            return if unit == "B" {
                format!("{b}B")
            } else {
                format!("{v:.1}{unit}")
            };
        }
        v /= 1024.0;
    }
    unreachable!("the loop returns at G")
}

fn print_status(rows: &[ServiceStatus]) {
    println!(
        "{:<20} {:<9} {:>8} {:>8} {:>10} {:>8} {:>9}  {:<24} STATUS",
        "NAME", "STATE", "PID", "RESTARTS", "UPTIME", "MEMORY", "CPU", "SOCKETS"
    );
    for r in rows {
        let pid = r.pid.map_or("-".into(), |p| p.to_string());
        let uptime = r.uptime_secs.map_or("-".into(), |u| {
            humantime::format_duration(std::time::Duration::from_secs(u as u64)).to_string()
        });
        // What the service said (STATUS=), or why it failed.
        let status = r
            .status_text
            .as_deref()
            .or(r.failure.as_deref())
            .unwrap_or("-");
        // Only with --cgroup-root (and memory.current where the memory
        // controller is there).
        let memory = r.memory_bytes.map_or("-".into(), human_bytes);
        let cpu = r.cpu_seconds.map_or("-".into(), |c| format!("{c:.2}s"));
        println!(
            "{:<20} {:<9} {:>8} {:>8} {:>10} {:>8} {:>9}  {:<24} {}",
            r.name,
            r.state.as_str(),
            pid,
            r.restarts,
            uptime,
            memory,
            cpu,
            r.sockets.join(","),
            status
        );
    }
}

fn print_bindings(rows: &[BindingStatus]) {
    println!(
        "{:<16} {:<12} {:<5} {:<24} {:<12} {:>4} {:<7} {:>10} {:>8} {:>8} {:>8}",
        "SERVICE",
        "SOCKET",
        "PROTO",
        "PREFIX",
        "PORTS",
        "DEST",
        "SOCKET",
        "LOOKUPS",
        "MISSES",
        "ERRORS",
        "DENIED"
    );
    for r in rows {
        let c = &r.counters;
        println!(
            "{:<16} {:<12} {:<5} {:<24} {:<12} {:>4} {:<7} {:>10} {:>8} {:>8} {:>8}",
            r.service,
            r.socket,
            r.protocol,
            r.prefix,
            r.ports,
            c.destination,
            if c.socket_present {
                "present"
            } else {
                "MISSING"
            },
            c.lookups,
            c.misses,
            c.errors,
            c.denied,
        );
    }
}

/// `--since`: a duration ago ("5min") or a time (RFC 3339, UTC).
fn parse_since(s: &str) -> Result<SystemTime, String> {
    if let Ok(ago) = humantime::parse_duration(s) {
        return SystemTime::now()
            .checked_sub(ago)
            .and_then(rfc3339::writable)
            .ok_or_else(|| format!("{s:?} ago is before 1970"));
    }
    humantime::parse_rfc3339_weak(s).map_err(|e| {
        format!("neither a duration (\"5min\") nor a time (\"2026-12-07 13:00:00\", UTC): {e}")
    })
}

/// A line as `holdfast logs` prints it: `2026-12-07 13:09:26.123Z
/// stdout[1234]: text` (`-` and `?` for what a line kept from before an
/// upgrade does not know).
fn human_line(l: &LogLine) -> String {
    let time = l.time.and_then(rfc3339::writable).map_or("-".into(), |t| {
        humantime::format_rfc3339_millis(t)
            .to_string()
            .replacen('T', " ", 1)
    });
    let stream = l.stream.map_or("?", |s| s.as_str());
    let pid = l.pid.map_or("?".to_string(), |p| p.to_string());
    format!("{time} {stream}[{pid}]: {}", l.line)
}

/// Prints a service's captured lines (with `--json`, one object per line:
/// `seq`, `time`, `stream`, `pid`, `line`); with `follow`, polls for new ones.
fn logs(
    state_dir: &Path,
    name: String,
    lines: Option<usize>,
    since: Option<SystemTime>,
    follow: bool,
    out: Output,
) -> ExitCode {
    let mut after: Option<u64> = None;
    loop {
        // The first ask picks by -n and --since; the next ones follow.
        let first = after.is_none();
        let req = Request::Logs {
            name: name.clone(),
            lines: if first { lines } else { None },
            after,
            since: since
                .filter(|_| first)
                .map(|t| humantime::format_rfc3339_micros(t).to_string()),
        };
        let got: LogLines = match call(state_dir, &req) {
            Ok(l) => l,
            Err(code) => return code,
        };
        for line in &got.lines {
            if out.json {
                println!("{}", serde_json::to_string(line).expect("lines serialize"));
            } else {
                println!("{}", human_line(line));
            }
        }
        if !follow {
            return ExitCode::SUCCESS;
        }
        after = Some(got.next);
        std::thread::sleep(Duration::from_millis(200));
    }
}
