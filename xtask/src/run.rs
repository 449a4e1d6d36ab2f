//! `cargo xtask run`: says where to point a client and what to try (read from the unit
//! files: a prefix and port range, a process per connection, an overlap restart,
//! `holdfast bindings`), then runs `holdfast run` in the foreground. Ctrl-C goes to the whole
//! foreground process group: holdfast stops its services and exits; xtask survives the
//! signal, waits, and exits with holdfast's status. A SIGTERM sent to xtask alone is passed
//! on to holdfast. Where BPF is not available (holdfast says so and fails on a unit only the
//! dispatcher can serve), xtask starts it again without those units, naming them.

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
    /// `accept = true`: an instance per connection.
    accept: bool,
    /// The service restarts in `restart-mode = "overlap"`.
    overlap: bool,
}

impl SocketHint {
    /// Only the sk_lookup dispatcher can serve it: an IP socket on more than one
    /// address and port, or on a prefix or a port range (bind mode binds one of each).
    fn needs_dispatcher(&self) -> bool {
        if self.path.is_some() {
            return false;
        }
        match (self.addresses.as_slice(), self.ports.as_slice()) {
            ([a], [p]) => !is_host(a) || p.contains('-'),
            _ => true,
        }
    }
}

/// `127.0.0.1`, `127.0.0.1/32`, `::1/128`: one host.
fn is_host(prefix: &str) -> bool {
    match prefix.split_once('/') {
        None => true,
        Some((a, l)) => match a.parse::<IpAddr>() {
            Ok(IpAddr::V4(_)) => l == "32",
            Ok(IpAddr::V6(_)) => l == "128",
            Err(_) => false,
        },
    }
}

/// The `*.toml` files in `dir`, sorted.
fn unit_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("read units directory {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    Ok(files)
}

/// The service a unit file declares: its file name without `.toml`.
fn service_of(file: &Path) -> String {
    file.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Reads every unit in `dir`; a file that does not parse is reported and skipped
/// (`holdfast run` then says exactly what is wrong with it).
fn read_units(dir: &Path) -> Result<Vec<SocketHint>> {
    let mut hints = Vec::new();
    for file in unit_files(dir)? {
        let parsed = std::fs::read_to_string(&file)
            .map_err(anyhow::Error::from)
            .and_then(|text| unit_hints(&service_of(&file), &text));
        match parsed {
            Ok(h) => hints.extend(h),
            Err(e) => eprintln!("xtask: could not read {}: {e:#}", file.display()),
        }
    }
    Ok(hints)
}

/// A string, an integer or an array of them, as strings.
fn strings(value: Option<&toml::Value>) -> Vec<String> {
    match value {
        Some(toml::Value::Array(items)) => items.iter().flat_map(|v| strings(Some(v))).collect(),
        Some(toml::Value::String(s)) => vec![s.clone()],
        Some(toml::Value::Integer(i)) => vec![i.to_string()],
        _ => Vec::new(),
    }
}

fn unit_hints(service: &str, text: &str) -> Result<Vec<SocketHint>> {
    let unit: toml::Table = text.parse()?;
    let key = |key: &str| unit.get("service").and_then(|s| s.get(key));
    let exec = key("exec").and_then(|e| e.get(0)).and_then(|p| p.as_str());
    let program = exec.map(|p| p.rsplit('/').next().unwrap_or(p).to_string());
    let overlap = key("restart-mode").and_then(|m| m.as_str()) == Some("overlap");
    let sockets = unit.get("socket").and_then(|s| s.as_array());
    Ok(sockets
        .into_iter()
        .flatten()
        .map(|s| {
            let text = |key: &str| s.get(key).and_then(|v| v.as_str()).map(str::to_string);
            SocketHint {
                service: service.to_string(),
                program: program.clone().unwrap_or_default(),
                protocol: text("protocol").unwrap_or_else(|| "tcp".into()),
                addresses: strings(s.get("addresses")),
                ports: strings(s.get("ports")),
                path: text("path"),
                accept: s.get("accept").and_then(|a| a.as_bool()) == Some(true),
                overlap,
            }
        })
        .collect())
}

/// A host to connect to inside `prefix` (`127.0.0.1`, `192.0.2.0/24`, `::1/128`): the address
/// itself, or the first one after it when it is the network address of a wider prefix.
/// `deep`: one that shows it is a prefix, further in than the first (`127.0.0.0/8` →
/// `127.1.2.3`), for a prefix wider than a /24 (or /120) only.
fn host_in(prefix: &str, deep: bool) -> Option<IpAddr> {
    let (addr, len) = prefix.split_once('/').unwrap_or((prefix, ""));
    let addr: IpAddr = addr.parse().ok()?;
    let (bits, n) = match addr {
        IpAddr::V4(a) => (32, u128::from(u32::from(a))),
        IpAddr::V6(a) => (128, u128::from(a)),
    };
    let len: u32 = if len.is_empty() {
        bits
    } else {
        len.parse().ok()?
    };
    let host_part = u128::MAX.checked_shr(128 - bits + len).unwrap_or(0);
    let n = match deep {
        true if len + 8 >= bits => return None,
        true => n | (0x0001_0203 & host_part),
        false if len < bits && n & host_part == 0 => n + 1,
        false => n,
    };
    Some(match addr {
        IpAddr::V4(_) => IpAddr::V4(u32::try_from(n).ok()?.into()),
        IpAddr::V6(_) => IpAddr::V6(n.into()),
    })
}

/// The first and the last port of `"8080"` or `"8000-8099"`.
fn port_range(ports: &str) -> Option<(u16, u16)> {
    let (first, last) = ports.split_once('-').unwrap_or((ports, ports));
    Some((first.trim().parse().ok()?, last.trim().parse().ok()?))
}

fn url(host: IpAddr, port: u16) -> String {
    match host {
        IpAddr::V6(a) => format!("http://[{a}]:{port}/"),
        a => format!("http://{a}:{port}/"),
    }
}

fn is_http(h: &SocketHint) -> bool {
    h.service.contains("http") || h.program.contains("http")
}

/// The demo lines beyond one client per socket: a far address and the last port of a
/// prefix and range, a second connection to an accept socket, an overlap restart.
fn demo_lines(hints: &[SocketHint], holdfast: &Path, at: &str) -> Vec<String> {
    let hf = holdfast.display();
    let mut lines = Vec::new();
    let mut any_steered = false;
    for h in hints {
        if h.protocol == "tcp" && h.needs_dispatcher() {
            any_steered = true;
            let far = h.addresses.iter().find_map(|a| host_in(a, true));
            let last = h.ports.last().and_then(|p| port_range(p)).map(|r| r.1);
            if let (Some(host), Some(port), true) =
                (far, last, is_http(h) || h.program.contains("hello"))
            {
                lines.push(format!(
                    "curl {}   # {} {} x {}: one socket",
                    url(host, port),
                    h.service,
                    h.addresses.join(","),
                    h.ports.join(",")
                ));
            }
        }
        if h.accept {
            if let Some(cmd) = client_command(h) {
                lines.push(format!(
                    "{cmd}; {cmd}   # {}: a new process per connection (see the pid)",
                    h.service
                ));
            }
        }
    }
    let mut seen: Vec<&str> = Vec::new();
    for h in hints {
        if !h.overlap || seen.contains(&h.service.as_str()) {
            continue;
        }
        seen.push(&h.service);
        let restart = format!("{hf} restart {} --mode overlap{at}", h.service);
        match client_command(h).filter(|_| is_http(h)) {
            Some(curl) => {
                let target = curl.trim_start_matches("curl ");
                lines.push(format!(
                    "for i in $(seq 60); do curl -sf {target} >/dev/null || echo FAILED; sleep 0.05; done & sleep 1; {restart}   # no request fails"
                ));
            }
            None => lines.push(restart),
        }
    }
    if any_steered {
        lines.push(format!(
            "{hf} bindings{at}   # every prefix and port range, its socket and counters"
        ));
    }
    lines
}

/// The command a user would type to talk to this socket, when one can be guessed.
fn client_command(h: &SocketHint) -> Option<String> {
    if let Some(path) = &h.path {
        return match h.protocol.as_str() {
            "unix-stream" => Some(format!("nc -U {path}")),
            "unix-dgram" => Some(format!("nc -uU {path}")),
            _ => None,
        };
    }
    let host = host_in(h.addresses.first()?, false)?;
    let port = port_range(h.ports.first()?)?.0;
    Some(match h.protocol.as_str() {
        "tcp" if is_http(h) => format!("curl {}", url(host, port)),
        "tcp" => format!("nc {host} {port}"),
        "udp" => format!("nc -u {host} {port}"),
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

/// `at`: ` --state-dir DIR` when `holdfast run` was given one, else empty.
fn print_hints(units: &Path, hints: &[SocketHint], holdfast: &Path, at: &str) {
    println!("holdfast: serving the units in {}", units.display());
    let width = hints.iter().map(|h| h.service.len()).max().unwrap_or(0);
    for h in hints {
        let what = describe(h);
        match client_command(h) {
            Some(cmd) => println!("  {:width$}  {what:34}  try: {cmd}", h.service),
            None => println!("  {:width$}  {what}", h.service),
        }
    }
    for line in demo_lines(hints, holdfast, at) {
        println!("  try: {line}");
    }
    println!("  status: {} status{at}", holdfast.display());
    println!("  Ctrl-C stops every service and exits.");
}

/// What holdfast logs when it cannot load BPF and falls back to bind mode.
const BIND_MODE_MARK: &str = "BPF is not available";

/// A copy of `units` in `into` without the units only the dispatcher can serve;
/// returns the names left out.
fn bind_mode_units(units: &Path, hints: &[SocketHint], into: &Path) -> Result<Vec<String>> {
    let mut left_out: Vec<String> = hints
        .iter()
        .filter(|h| h.needs_dispatcher())
        .map(|h| h.service.clone())
        .collect();
    left_out.dedup();
    if into.exists() {
        std::fs::remove_dir_all(into).with_context(|| format!("clear {}", into.display()))?;
    }
    std::fs::create_dir_all(into).with_context(|| format!("create {}", into.display()))?;
    for file in unit_files(units)? {
        if !left_out.contains(&service_of(&file)) {
            std::fs::copy(&file, into.join(file.file_name().expect("a file")))?;
        }
    }
    Ok(left_out)
}

pub fn run(ws: &Workspace, units: Option<PathBuf>, extra: Vec<OsString>) -> Result<ExitCode> {
    let units = match units {
        Some(dir) => std::path::absolute(dir)?,
        None => ws.root.join("units"),
    };
    let bin_dir = ws.bin_dir(Profile::Release);
    let holdfast = bin_dir.join("holdfast");
    // holdfast's own default state dir unless one is given.
    let at = state_dir_in(&extra).map_or(String::new(), |d| format!(" --state-dir {d}"));
    let command = |units: &Path| -> Result<Command> {
        let mut cmd = Command::new(&holdfast);
        cmd.arg("run").arg("--units").arg(units);
        cmd.args(&extra)
            .env("PATH", ws.path_with(&bin_dir)?)
            .current_dir(&ws.root);
        Ok(cmd)
    };
    let hints = read_units(&units)?;
    let bind_mode_dir = ws.target_dir.join("xtask-run-bind-mode-units");
    let no_dispatcher = extra.iter().any(|a| a == "--no-dispatcher");
    if !no_dispatcher {
        print_hints(&units, &hints, &holdfast, &at);
        let (status, bind_mode) = run_in_foreground(&mut command(&units)?)?;
        if status.success() || !bind_mode || !hints.iter().any(SocketHint::needs_dispatcher) {
            return Ok(exit_code(status));
        }
    }
    // Bind mode: only sockets on one address and one port can be served.
    let left_out = bind_mode_units(&units, &hints, &bind_mode_dir)?;
    eprintln!(
        "xtask: bind mode (no BPF dispatcher): leaving out {} (a prefix or a port range needs the dispatcher); starting holdfast on the others",
        left_out.join(", ")
    );
    let kept: Vec<SocketHint> = hints
        .into_iter()
        .filter(|h| !left_out.contains(&h.service))
        .collect();
    print_hints(&bind_mode_dir, &kept, &holdfast, &at);
    let (status, _) = run_in_foreground(&mut command(&bind_mode_dir)?)?;
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
/// child starts with the default dispositions. The child's stderr is passed through line by
/// line; the second value says whether it logged [`BIND_MODE_MARK`].
fn run_in_foreground(cmd: &mut Command) -> Result<(ExitStatus, bool)> {
    let interrupted = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(SIGINT, Arc::clone(&interrupted)).context("handle SIGINT")?;
    let mut terms = Signals::new([SIGTERM]).context("handle SIGTERM")?;
    eprintln!("xtask: $ {}", crate::shell::display(cmd));
    let mut child = cmd
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("start {}", cmd.get_program().to_string_lossy()))?;
    let stderr = child.stderr.take().context("the child's stderr")?;
    let passer = std::thread::spawn(move || {
        use std::io::{BufRead, Write};
        let mut marked = false;
        let mut out = std::io::stderr();
        for line in std::io::BufReader::new(stderr)
            .split(b'\n')
            .map_while(Result::ok)
        {
            marked |= String::from_utf8_lossy(&line).contains(BIND_MODE_MARK);
            let _ = out.write_all(&line);
            let _ = out.write_all(b"\n");
        }
        marked
    });
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
    let marked = passer.join().unwrap_or(false);
    Ok((status?, marked))
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
        let hints = unit_hints(service, text).unwrap();
        hints.iter().map(client_command).collect()
    }

    #[test]
    fn hints_for_http_tcp_udp_and_unix() {
        let some = |s: &str| Some(s.to_string());
        let hello = repo_hints().into_iter().find(|h| h.service == "hello");
        let curl = hello.as_ref().and_then(client_command);
        assert_eq!(curl, some("curl http://127.0.0.1:8080/"));
        let echo = [
            "nc 127.0.0.1 7000",
            "nc -u 127.0.0.1 7001",
            "nc -U /run/echo.sock",
        ];
        assert_eq!(commands("echo", ECHO), echo.map(some));
        // HTTP guessed from the program's file name, a host inside a v6 prefix.
        let web = "[service]\nexec = [\"/usr/bin/hello-http\"]\n[[socket]]\naddresses = [\"2001:db8::/64\"]\nports = [\"8080\"]\n";
        assert_eq!(
            commands("web", web),
            [some("curl http://[2001:db8::1]:8080/")]
        );
    }

    #[test]
    fn hosts_inside_prefixes() {
        // (prefix, deep, host); a deep host only for prefixes wider than a /24 or /120.
        let cases = [
            ("127.0.0.1/32", false, Some("127.0.0.1")),
            ("127.0.0.1", false, Some("127.0.0.1")),
            ("192.0.2.0/24", false, Some("192.0.2.1")),
            ("192.0.2.7/24", false, Some("192.0.2.7")),
            ("2001:db8::/64", false, Some("2001:db8::1")),
            ("::1/128", false, Some("::1")),
            ("10.0.0.0/40", false, Some("10.0.0.0")),
            ("nonsense/8", false, None),
            ("10.0.0.0/x", false, None),
            ("10.0.0.0/8", true, Some("10.1.2.3")),
            ("2001:db8::/64", true, Some("2001:db8::1:203")),
            ("192.0.2.0/24", true, None),
            ("::1/128", true, None),
            ("10.0.0.1", true, None),
        ];
        for (prefix, deep, want) in cases {
            let want = want.map(|w| w.parse().unwrap());
            assert_eq!(host_in(prefix, deep), want, "{prefix} deep={deep}");
        }
    }

    #[test]
    fn no_hint_without_an_address_or_a_port() {
        let text = "[service]\nexec=[\"x\"]\n[[socket]]\nports=[\"80\"]\n";
        assert_eq!(commands("x", text), [None]);
        assert!(unit_hints("x", "not = [toml").is_err());
    }

    /// The repository's units/, as `cargo xtask run` reads them.
    fn repo_hints() -> Vec<SocketHint> {
        read_units(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../units")).unwrap()
    }

    #[test]
    fn only_sockets_beyond_one_address_and_port_need_the_dispatcher() {
        let needs = |hints: &[SocketHint]| -> Vec<bool> {
            hints.iter().map(SocketHint::needs_dispatcher).collect()
        };
        // echo (two sockets), greeter, hello: one address and one port; ranges: a prefix and range.
        assert_eq!(needs(&repo_hints()), [false, false, false, false, true]);
        // A prefix and range; one address and port; unix.
        assert_eq!(
            needs(&unit_hints("echo", ECHO).unwrap()),
            [true, false, false]
        );
    }

    #[test]
    fn the_demo_shows_a_prefix_and_range_an_accept_socket_an_overlap_restart_and_bindings() {
        let lines = demo_lines(&repo_hints(), Path::new("/hf"), " --state-dir /s").join("\n");
        for want in [
            "curl http://127.1.2.3:8199/",
            "nc 127.0.0.1 7070; nc 127.0.0.1 7070",
            "/hf restart hello --mode overlap --state-dir /s",
            "/hf bindings --state-dir /s",
        ] {
            assert!(lines.contains(want), "{want:?} not in:\n{lines}");
        }
    }

    #[test]
    fn bind_mode_leaves_out_what_needs_the_dispatcher() {
        let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("../units");
        let into = std::env::temp_dir().join(format!("xtask-bind-mode-{}", std::process::id()));
        let left_out = bind_mode_units(&units, &repo_hints(), &into).unwrap();
        assert_eq!(left_out, ["ranges"]);
        let mut kept: Vec<String> = std::fs::read_dir(&into)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        kept.sort();
        assert_eq!(kept, ["echo.toml", "greeter.toml", "hello.toml"]);
        std::fs::remove_dir_all(&into).unwrap();
    }

    #[test]
    fn state_dir_is_found_in_either_spelling() {
        let cases: [(&[&str], _); 3] = [
            (&["--state-dir", "/s"], Some("/s")),
            (&["-v", "--state-dir=/t"], Some("/t")),
            (&["--no-dispatcher"], None),
        ];
        for (args, want) in cases {
            let args: Vec<OsString> = args.iter().map(OsString::from).collect();
            assert_eq!(state_dir_in(&args).as_deref(), want, "{args:?}");
        }
    }

    #[test]
    fn exit_codes_follow_the_shell() {
        use std::os::unix::process::ExitStatusExt as _;
        assert_eq!(exit_code(ExitStatus::from_raw(0)), ExitCode::from(0));
        assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), ExitCode::from(3));
        assert_eq!(exit_code(ExitStatus::from_raw(2)), ExitCode::from(130));
    }
}
