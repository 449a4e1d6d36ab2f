//! `cargo xtask run`: says where to point a client (read from the unit files), then runs
//! `holdfast run` in the foreground. Ctrl-C goes to the whole foreground process group:
//! holdfast stops its services and exits; xtask survives the signal, waits, and exits with
//! holdfast's status. A SIGTERM sent to xtask alone is passed on to holdfast.

use std::ffi::OsString;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, ExitStatus};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{Context, Result};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::shell::{Profile, Workspace};

pub const DEFAULT_STATE_DIR: &str = "/run/holdfast";

/// One socket of one unit, as much as a hint needs.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SocketHint {
    service: String,
    /// `hello-http` or `/usr/bin/hello-http`: the program's file name, to guess the protocol.
    program: String,
    protocol: String,
    addresses: Vec<String>,
    ports: Vec<String>,
    path: Option<String>,
}

/// Reads every `*.toml` in `dir`; a file that does not parse is reported and skipped
/// (`holdfast run` then says exactly what is wrong with it).
fn read_units(dir: &Path) -> Result<Vec<SocketHint>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("read units directory {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    let mut hints = Vec::new();
    for file in files {
        let service = file
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let parsed = std::fs::read_to_string(&file)
            .map_err(anyhow::Error::from)
            .and_then(|text| unit_hints(&service, &text));
        match parsed {
            Ok(h) => hints.extend(h),
            Err(e) => eprintln!("xtask: could not read {}: {e:#}", file.display()),
        }
    }
    Ok(hints)
}

fn strings(value: Option<&toml::Value>) -> Vec<String> {
    let Some(value) = value else {
        return Vec::new();
    };
    match value {
        toml::Value::Array(items) => items.iter().flat_map(|v| strings(Some(v))).collect(),
        toml::Value::String(s) => vec![s.clone()],
        toml::Value::Integer(i) => vec![i.to_string()],
        _ => Vec::new(),
    }
}

fn unit_hints(service: &str, text: &str) -> Result<Vec<SocketHint>> {
    let unit: toml::Table = text.parse()?;
    let program = unit
        .get("service")
        .and_then(|s| s.get("exec"))
        .and_then(|e| e.get(0))
        .and_then(|p| p.as_str())
        .map(|p| p.rsplit('/').next().unwrap_or(p).to_string())
        .unwrap_or_default();
    let sockets = unit
        .get("socket")
        .and_then(|s| s.as_array())
        .cloned()
        .unwrap_or_default();
    Ok(sockets
        .iter()
        .map(|s| SocketHint {
            service: service.to_string(),
            program: program.clone(),
            protocol: s
                .get("protocol")
                .and_then(|p| p.as_str())
                .unwrap_or("tcp")
                .to_string(),
            addresses: strings(s.get("addresses")),
            ports: strings(s.get("ports")),
            path: s.get("path").and_then(|p| p.as_str()).map(str::to_string),
        })
        .collect())
}

/// A host to connect to inside `prefix`: the address itself, or the first one after the
/// network address when the prefix is wider than one host.
fn host_in(prefix: &str) -> Option<IpAddr> {
    let (addr, len) = match prefix.split_once('/') {
        Some((a, l)) => (a.parse::<IpAddr>().ok()?, Some(l.parse::<u8>().ok()?)),
        None => (prefix.parse::<IpAddr>().ok()?, None),
    };
    Some(match (addr, len) {
        (IpAddr::V4(a), Some(l)) if l < 32 && u32::from(a) & (u32::MAX >> l) == 0 => {
            IpAddr::V4((u32::from(a) + 1).into())
        }
        (IpAddr::V6(a), Some(l)) if l < 128 && u128::from(a) & (u128::MAX >> l) == 0 => {
            IpAddr::V6((u128::from(a) + 1).into())
        }
        _ => addr,
    })
}

/// The first port of `"8080"` or `"8000-8099"`.
fn first_port(ports: &str) -> Option<u16> {
    ports.split('-').next()?.trim().parse().ok()
}

/// The command a user would type to talk to this socket, when one can be guessed.
fn client_command(h: &SocketHint) -> Option<String> {
    let ip_target = || {
        let host = host_in(h.addresses.first()?)?;
        let port = first_port(h.ports.first()?)?;
        Some((host, port))
    };
    let http = h.service.contains("http") || h.program.contains("http");
    Some(match h.protocol.as_str() {
        "tcp" if http => match ip_target()? {
            (IpAddr::V6(a), port) => format!("curl http://[{a}]:{port}/"),
            (a, port) => format!("curl http://{a}:{port}/"),
        },
        "tcp" => {
            let (a, port) = ip_target()?;
            format!("nc {a} {port}")
        }
        "udp" => {
            let (a, port) = ip_target()?;
            format!("nc -u {a} {port}")
        }
        "unix-stream" => format!("nc -U {}", h.path.as_ref()?),
        "unix-dgram" => format!("nc -uU {}", h.path.as_ref()?),
        _ => return None,
    })
}

fn describe(h: &SocketHint) -> String {
    match &h.path {
        Some(path) => format!("{} {path}", h.protocol),
        None => format!(
            "{} {} port {}",
            h.protocol,
            h.addresses.join(","),
            h.ports.join(",")
        ),
    }
}

fn print_hints(units: &Path, hints: &[SocketHint], holdfast: &Path, state_dir: &str) {
    println!("holdfast: serving the units in {}", units.display());
    let width = hints.iter().map(|h| h.service.len()).max().unwrap_or(0);
    for h in hints {
        let what = describe(h);
        match client_command(h) {
            Some(cmd) => println!("  {:width$}  {what:34}  try: {cmd}", h.service),
            None => println!("  {:width$}  {what}", h.service),
        }
    }
    println!(
        "  status: {} status --state-dir {state_dir}",
        holdfast.display()
    );
    println!("  Ctrl-C stops every service and exits.");
}

pub fn run(ws: &Workspace, units: Option<PathBuf>, extra: Vec<OsString>) -> Result<ExitCode> {
    let units = match units {
        Some(dir) => std::path::absolute(dir)?,
        None => ws.root.join("units"),
    };
    let bin_dir = ws.bin_dir(Profile::Release);
    let holdfast = bin_dir.join("holdfast");
    let mut cmd = Command::new(&holdfast);
    cmd.arg("run").arg("--units").arg(&units);
    let state_dir = match state_dir_in(&extra) {
        Some(dir) => dir,
        None => {
            cmd.args(["--state-dir", DEFAULT_STATE_DIR]);
            DEFAULT_STATE_DIR.to_string()
        }
    };
    cmd.args(&extra)
        .env("PATH", ws.path_with(&bin_dir)?)
        .current_dir(&ws.root);

    print_hints(&units, &read_units(&units)?, &holdfast, &state_dir);
    let status = run_in_foreground(&mut cmd)?;
    Ok(exit_code(status))
}

/// The value of `--state-dir DIR` or `--state-dir=DIR` among the extra arguments.
fn state_dir_in(args: &[OsString]) -> Option<String> {
    let mut args = args.iter().map(|a| a.to_string_lossy());
    while let Some(arg) = args.next() {
        if arg == "--state-dir" {
            return Some(args.next().map(|d| d.into_owned()).unwrap_or_default());
        }
        if let Some(dir) = arg.strip_prefix("--state-dir=") {
            return Some(dir.to_string());
        }
    }
    None
}

/// Spawns `cmd` and waits for it, surviving SIGINT (which the terminal sends to the child as
/// well) and passing SIGTERM on. Handlers, unlike ignored signals, are reset by exec, so the
/// child starts with the default dispositions.
fn run_in_foreground(cmd: &mut Command) -> Result<ExitStatus> {
    let interrupted = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(SIGINT, Arc::clone(&interrupted)).context("handle SIGINT")?;
    let mut terms = Signals::new([SIGTERM]).context("handle SIGTERM")?;
    eprintln!("xtask: $ {}", crate::shell::display(cmd));
    let mut child = cmd
        .spawn()
        .with_context(|| format!("start {}", cmd.get_program().to_string_lossy()))?;
    let pid = libc::pid_t::try_from(child.id()).context("child pid")?;
    let handle = terms.handle();
    let forwarder = std::thread::spawn(move || {
        for sig in terms.forever() {
            // SAFETY: kill(2) reads and writes no memory of ours. pid is our child; only a
            // SIGTERM in the instant between its reaping and `handle.close()` could reach
            // a reused pid, a window far too short to matter for a developer command.
            unsafe {
                libc::kill(pid, sig);
            }
        }
    });
    let status = child.wait().context("wait for holdfast");
    handle.close();
    let _ = forwarder.join();
    status
}

/// The child's exit code, or 128 + signal as a shell reports it.
fn exit_code(status: ExitStatus) -> ExitCode {
    use std::os::unix::process::ExitStatusExt as _;
    let code = status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1);
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HELLO: &str = r#"
[service]
exec = ["hello-http", "--greeting", "hi"]

[[socket]]
name = "http"
protocol = "tcp"
addresses = ["127.0.0.1/32"]
ports = ["8080"]
"#;

    const ECHO: &str = r#"
[service]
exec = ["/usr/local/bin/echo"]

[[socket]]
addresses = ["127.0.0.0/24", "::1/128"]
ports = ["7000-7099"]

[[socket]]
protocol = "udp"
addresses = ["127.0.0.1/32"]
ports = [7001]

[[socket]]
protocol = "unix-stream"
path = "/run/echo.sock"
"#;

    fn commands(service: &str, text: &str) -> Vec<Option<String>> {
        unit_hints(service, text)
            .unwrap()
            .iter()
            .map(client_command)
            .collect()
    }

    #[test]
    fn hints_for_http_tcp_udp_and_unix() {
        assert_eq!(
            commands("hello-http", HELLO),
            [Some("curl http://127.0.0.1:8080/".to_string())]
        );
        assert_eq!(
            commands("echo", ECHO),
            [
                Some("nc 127.0.0.1 7000".to_string()),
                Some("nc -u 127.0.0.1 7001".to_string()),
                Some("nc -U /run/echo.sock".to_string()),
            ]
        );
    }

    #[test]
    fn http_is_guessed_from_the_program_too() {
        let text = HELLO.replace("hello-http\",", "/usr/bin/hello-http\",");
        assert_eq!(
            commands("web", &text),
            [Some("curl http://127.0.0.1:8080/".to_string())]
        );
        let v6 = HELLO.replace("127.0.0.1/32", "2001:db8::/64");
        assert_eq!(
            commands("hello-http", &v6),
            [Some("curl http://[2001:db8::1]:8080/".to_string())]
        );
    }

    #[test]
    fn hosts_inside_prefixes() {
        let cases = [
            ("127.0.0.1/32", "127.0.0.1"),
            ("127.0.0.1", "127.0.0.1"),
            ("192.0.2.0/24", "192.0.2.1"),
            ("192.0.2.7/24", "192.0.2.7"),
            ("2001:db8::/64", "2001:db8::1"),
            ("::1/128", "::1"),
        ];
        for (prefix, want) in cases {
            assert_eq!(host_in(prefix), Some(want.parse().unwrap()), "{prefix}");
        }
        assert_eq!(host_in("nonsense/8"), None);
        assert_eq!(host_in("10.0.0.0/x"), None);
    }

    #[test]
    fn no_hint_without_an_address_or_a_port() {
        let text = "[service]\nexec=[\"x\"]\n[[socket]]\nports=[\"80\"]\n";
        assert_eq!(commands("x", text), [None]);
        assert!(unit_hints("x", "not = [toml").is_err());
    }

    #[test]
    fn state_dir_is_found_in_either_spelling() {
        let args = |a: &[&str]| a.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(
            state_dir_in(&args(&["--state-dir", "/s"])).as_deref(),
            Some("/s")
        );
        assert_eq!(
            state_dir_in(&args(&["-v", "--state-dir=/t"])).as_deref(),
            Some("/t")
        );
        assert_eq!(state_dir_in(&args(&["--no-dispatcher"])), None);
    }

    #[test]
    fn exit_codes_follow_the_shell() {
        use std::os::unix::process::ExitStatusExt as _;
        assert_eq!(exit_code(ExitStatus::from_raw(0)), ExitCode::from(0));
        assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), ExitCode::from(3));
        assert_eq!(exit_code(ExitStatus::from_raw(2)), ExitCode::from(130));
    }
}
