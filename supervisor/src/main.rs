//! The `holdfast` command: the daemon (`run`) and the CLI that talks to it.
//!
//! Exit codes: 0 ok; 1 the operation failed (invalid units, a listener that
//! cannot be created, an error reply); 2 usage error; 3 the control socket
//! could not be reached.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use holdfast::control::{self, Reply, Request};
use holdfast::unit::{self, RestartMode};
use holdfast::{preflight, supervisor};

#[derive(Parser)]
#[command(name = "holdfast", version, about = "A socket-activation supervisor")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the supervisor in the foreground on a units directory.
    Run {
        /// The directory of NAME.toml unit files.
        #[arg(long, default_value = "/etc/holdfast/units")]
        units: PathBuf,
        #[arg(long, default_value = "/run/holdfast")]
        state_dir: PathBuf,
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
        /// Log format: human (default) or json (one object per line).
        #[arg(long, value_enum, default_value_t = LogFormat::Human)]
        log_format: LogFormat,
    },
    /// Validate a units directory without starting anything: the files, and
    /// what they name on this machine (users, groups, programs).
    Check {
        dir: PathBuf,
        /// The state dir `holdfast run` will use (notify socket paths must fit under it).
        #[arg(long, default_value = "/run/holdfast")]
        state_dir: PathBuf,
    },
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
    Status {
        name: Option<String>,
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = "/run/holdfast")]
        state_dir: PathBuf,
    },
    /// Start a stopped or failed service.
    Start {
        name: String,
        #[arg(long, default_value = "/run/holdfast")]
        state_dir: PathBuf,
    },
    /// Stop a service (SIGTERM, then SIGKILL after its stop-timeout); its sockets stay open.
    Stop {
        name: String,
        #[arg(long, default_value = "/run/holdfast")]
        state_dir: PathBuf,
    },
    /// List every binding: service, socket, protocol, prefix, ports, destination, counters.
    Bindings {
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = "/run/holdfast")]
        state_dir: PathBuf,
    },
    /// Print Prometheus text exposition (or, with --json, the same figures as JSON).
    Metrics {
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = "/run/holdfast")]
        state_dir: PathBuf,
    },
    /// Re-read the units directory and apply the difference (SIGHUP does the same).
    Reload {
        #[arg(long, default_value = "/run/holdfast")]
        state_dir: PathBuf,
    },
    /// Show a service's captured output (the last 1000 lines are kept).
    Logs {
        name: String,
        /// Only the last N lines.
        #[arg(short = 'n', long)]
        lines: Option<usize>,
        /// Keep printing new lines as they come.
        #[arg(short = 'f', long)]
        follow: bool,
        #[arg(long, default_value = "/run/holdfast")]
        state_dir: PathBuf,
    },
    /// Restart a service; its sockets stay open, so no connection is refused.
    Restart {
        name: String,
        #[arg(long, value_parser = parse_mode)]
        mode: Option<RestartMode>,
        #[arg(long, default_value = "/run/holdfast")]
        state_dir: PathBuf,
    },
}

fn parse_mode(s: &str) -> Result<RestartMode, String> {
    match s {
        "overlap" => Ok(RestartMode::Overlap),
        "stop-start" => Ok(RestartMode::StopStart),
        _ => Err("write overlap or stop-start".into()),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Run { .. }) {
        die_quietly_on_broken_pipe();
    }
    match cli.command {
        Command::Run {
            units,
            state_dir,
            netns,
            no_dispatcher,
            instance,
            metrics_listen,
            log_format,
        } => {
            init_logging(log_format);
            let opts = supervisor::Options {
                units,
                state_dir,
                netns,
                no_dispatcher,
                instance,
                metrics_listen,
            };
            match supervisor::run(&opts) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("holdfast: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Check { dir, state_dir } => match unit::load_dir(&dir).and_then(|units| {
            let path = std::env::var_os("PATH");
            preflight::check_units(&units, &state_dir, path.as_deref()).map(|()| units)
        }) {
            Ok(units) => {
                println!("{}: {} unit(s), all valid", dir.display(), units.len());
                ExitCode::SUCCESS
            }
            Err(diags) => {
                eprintln!("{diags}");
                ExitCode::from(1)
            }
        },
        Command::Import {
            files,
            output,
            instance,
            force,
        } => {
            let req = holdfast::import::Request { files, instance };
            ExitCode::from(holdfast::import::run(&req, &output, force))
        }
        Command::Status {
            name,
            json,
            state_dir,
        } => request(&state_dir, &Request::Status { name }, |result| {
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(result).unwrap_or_default()
                );
            } else {
                print_status(result);
            }
        }),
        Command::Bindings { json, state_dir } => {
            request(&state_dir, &Request::Bindings, |result| {
                if json {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(result).unwrap_or_default()
                    );
                } else {
                    print_bindings(result);
                }
            })
        }
        Command::Metrics { json, state_dir } => request(&state_dir, &Request::Metrics, |result| {
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&result["snapshot"]).unwrap_or_default()
                );
            } else {
                print!("{}", result["text"].as_str().unwrap_or_default());
            }
        }),
        Command::Reload { state_dir } => request(&state_dir, &Request::Reload, |result| {
            println!(
                "{}",
                serde_json::to_string_pretty(result).unwrap_or_default()
            );
        }),
        Command::Logs {
            name,
            lines,
            follow,
            state_dir,
        } => logs(&state_dir, name, lines, follow),
        Command::Start { name, state_dir } => request(&state_dir, &Request::Start { name }, |_| {}),
        Command::Stop { name, state_dir } => request(&state_dir, &Request::Stop { name }, |_| {}),
        Command::Restart {
            name,
            mode,
            state_dir,
        } => request(&state_dir, &Request::Restart { name, mode }, |_| {}),
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

fn request(state_dir: &Path, req: &Request, show: impl FnOnce(&serde_json::Value)) -> ExitCode {
    match control::call(state_dir, req) {
        Ok(Reply {
            ok: true, result, ..
        }) => {
            show(&result.unwrap_or(serde_json::Value::Null));
            ExitCode::SUCCESS
        }
        Ok(Reply { error, .. }) => {
            eprintln!(
                "holdfast: {}",
                error.unwrap_or_else(|| "request failed".into())
            );
            ExitCode::from(1)
        }
        Err(e @ control::ControlError::Connect { .. }) => {
            eprintln!("holdfast: {e}");
            ExitCode::from(3)
        }
        Err(e) => {
            eprintln!("holdfast: {e}");
            ExitCode::from(1)
        }
    }
}

fn print_status(result: &serde_json::Value) {
    let rows = result.as_array().cloned().unwrap_or_default();
    println!(
        "{:<20} {:<9} {:>8} {:>8} {:>10}  {:<24} STATUS",
        "NAME", "STATE", "PID", "RESTARTS", "UPTIME", "SOCKETS"
    );
    for r in rows {
        let s = |k: &str| r.get(k).cloned().unwrap_or(serde_json::Value::Null);
        let pid = s("pid")
            .as_i64()
            .map(|p| p.to_string())
            .unwrap_or("-".into());
        let uptime = s("uptime_secs")
            .as_f64()
            .map(|u| {
                humantime::format_duration(std::time::Duration::from_secs(u as u64)).to_string()
            })
            .unwrap_or("-".into());
        let sockets: Vec<String> = s("sockets")
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        // What the service said (STATUS=), or why it failed.
        let (text, failure) = (s("status_text"), s("failure"));
        let status = text.as_str().or(failure.as_str()).unwrap_or("-");
        println!(
            "{:<20} {:<9} {:>8} {:>8} {:>10}  {:<24} {}",
            s("name").as_str().unwrap_or("?"),
            s("state").as_str().unwrap_or("?"),
            pid,
            s("restarts").to_string(),
            uptime,
            sockets.join(","),
            status
        );
    }
}

fn print_bindings(result: &serde_json::Value) {
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
    for r in result.as_array().cloned().unwrap_or_default() {
        let s = |k: &str| r.get(k).cloned().unwrap_or(serde_json::Value::Null);
        let text = |k: &str| s(k).as_str().unwrap_or("?").to_string();
        // serde_json's Display ignores width: numbers are padded as strings.
        let num = |k: &str| s(k).to_string();
        println!(
            "{:<16} {:<12} {:<5} {:<24} {:<12} {:>4} {:<7} {:>10} {:>8} {:>8} {:>8}",
            text("service"),
            text("socket"),
            text("protocol"),
            text("prefix"),
            text("ports"),
            num("destination"),
            if s("socket_present").as_bool() == Some(true) {
                "present"
            } else {
                "MISSING"
            },
            num("lookups"),
            num("misses"),
            num("errors"),
            num("denied"),
        );
    }
}

/// Prints a service's captured lines; with `follow`, polls for new ones.
fn logs(state_dir: &Path, name: String, lines: Option<usize>, follow: bool) -> ExitCode {
    let mut after: Option<u64> = None;
    loop {
        let req = Request::Logs {
            name: name.clone(),
            lines: if after.is_none() { lines } else { None },
            after,
        };
        let reply: serde_json::Value = match control::call(state_dir, &req) {
            Ok(Reply {
                ok: true,
                result: Some(r),
                ..
            }) => r,
            Ok(Reply { error, .. }) => {
                eprintln!("holdfast: {}", error.unwrap_or_default());
                return ExitCode::from(1);
            }
            Err(e) => {
                eprintln!("holdfast: {e}");
                return ExitCode::from(3);
            }
        };
        for line in reply["lines"].as_array().into_iter().flatten() {
            println!("{}", line.as_str().unwrap_or_default());
        }
        if !follow {
            return ExitCode::SUCCESS;
        }
        after = reply["next"].as_u64();
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}
