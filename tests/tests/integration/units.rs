//! Unit files through the real binary: `holdfast check` on a table of mistakes
//! (each reported as `FILE:LINE:COL: KEY: MESSAGE` plus an indented `hint:` line,
//! all files at once), a valid directory, and `holdfast run` refusing to start
//! anything when a unit is invalid or a listener cannot be created.

use std::net::TcpListener;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use holdfast_testkit::{
    holdfast_check, holdfast_check_unit, holdfast_cli, netns_and_sandbox, skip_unless, toml_array,
    Holdfast, Netns, Sandbox,
};

/// One kind of mistake: a unit file and where its diagnostic must point.
struct Case {
    /// The file is `<file>.toml`.
    file: &'static str,
    text: &'static str,
    /// The line the diagnostic names (a range where the spot is a matter of taste,
    /// e.g. a missing key: its table's header or any line of the table).
    lines: RangeInclusive<usize>,
    /// A fragment of the KEY part (None: a TOML syntax error names no key).
    key: Option<&'static str>,
}

const SOCKET_OK: &str = r#"protocol = "tcp"
addresses = ["127.0.0.1/32"]
ports = ["8080"]"#;

fn cases() -> Vec<Case> {
    vec![
        Case {
            file: "unknown-key",
            text: "[service]\nexec = [\"/bin/true\"]\nflavour = \"vanilla\"\n",
            lines: 3..=3,
            key: Some("flavour"),
        },
        Case {
            file: "bad-prefix",
            text: "[service]\nexec = [\"/bin/true\"]\n\n[[socket]]\nprotocol = \"tcp\"\naddresses = [\"127.0.0.1/33\"]\nports = [\"8080\"]\n",
            lines: 6..=6,
            key: Some("addresses"),
        },
        Case {
            file: "not-an-address",
            text: "[service]\nexec = [\"/bin/true\"]\n\n[[socket]]\nprotocol = \"tcp\"\naddresses = [\"localhost\"]\nports = [\"8080\"]\n",
            lines: 6..=6,
            key: Some("addresses"),
        },
        Case {
            file: "host-bits",
            text: "[service]\nexec = [\"/bin/true\"]\n\n[[socket]]\nprotocol = \"tcp\"\naddresses = [\"192.0.2.1/24\"]\nports = [\"8080\"]\n",
            lines: 6..=6,
            key: Some("addresses"),
        },
        Case {
            file: "port-zero",
            text: "[service]\nexec = [\"/bin/true\"]\n\n[[socket]]\nprotocol = \"tcp\"\naddresses = [\"127.0.0.1/32\"]\nports = [\"0\"]\n",
            lines: 7..=7,
            key: Some("ports"),
        },
        Case {
            file: "port-too-big",
            text: "[service]\nexec = [\"/bin/true\"]\n\n[[socket]]\nprotocol = \"tcp\"\naddresses = [\"127.0.0.1/32\"]\nports = [\"70000\"]\n",
            lines: 7..=7,
            key: Some("ports"),
        },
        Case {
            file: "reversed-range",
            text: "[service]\nexec = [\"/bin/true\"]\n\n[[socket]]\nprotocol = \"tcp\"\naddresses = [\"127.0.0.1/32\"]\nports = [\"9000-8000\"]\n",
            lines: 7..=7,
            key: Some("ports"),
        },
        Case {
            file: "no-addresses",
            text: "[service]\nexec = [\"/bin/true\"]\n\n[[socket]]\nprotocol = \"tcp\"\nports = [\"8080\"]\n",
            lines: 4..=6,
            key: Some("addresses"),
        },
        Case {
            file: "no-ports",
            text: "[service]\nexec = [\"/bin/true\"]\n\n[[socket]]\nprotocol = \"tcp\"\naddresses = [\"127.0.0.1/32\"]\n",
            lines: 4..=6,
            key: Some("ports"),
        },
        Case {
            file: "empty-exec",
            text: "[service]\nexec = []\n",
            lines: 2..=2,
            key: Some("exec"),
        },
        Case {
            file: "exec-not-array",
            text: "[service]\nexec = \"/bin/true --flag\"\n",
            lines: 2..=2,
            key: Some("exec"),
        },
        Case {
            file: "bad-type",
            text: "[service]\nexec = [\"/bin/true\"]\ntype = \"forking\"\n",
            lines: 3..=3,
            key: Some("type"),
        },
        Case {
            file: "bad-restart",
            text: "[service]\nexec = [\"/bin/true\"]\nrestart = \"sometimes\"\n",
            lines: 3..=3,
            key: Some("restart"),
        },
        Case {
            file: "bad-duration",
            text: "[service]\nexec = [\"/bin/true\"]\nrestart-delay = \"soon\"\n",
            lines: 3..=3,
            key: Some("restart-delay"),
        },
        Case {
            file: "bad-protocol",
            text: "[service]\nexec = [\"/bin/true\"]\n\n[[socket]]\nprotocol = \"sctp\"\naddresses = [\"127.0.0.1/32\"]\nports = [\"8080\"]\n",
            lines: 5..=5,
            key: Some("protocol"),
        },
        Case {
            file: "unknown-socket-key",
            text: "[service]\nexec = [\"/bin/true\"]\n\n[[socket]]\nprotocol = \"tcp\"\naddresses = [\"127.0.0.1/32\"]\nports = [\"8080\"]\nbacklogg = 128\n",
            lines: 8..=8,
            key: Some("backlogg"),
        },
        Case {
            file: "syntax-error",
            text: "[service]\nexec = [\"/bin/true\"\nrestart = \"always\"\n",
            lines: 2..=3,
            key: None,
        },
    ]
}

/// Writes `units/NAME.toml`, a valid unit whose service, once started, touches
/// `marker`: its socket is named `socket`, on TCP 127.0.0.1:`port`.
fn write_toucher(
    sandbox: &Sandbox,
    name: &str,
    marker: &Path,
    port: u16,
    socket: &str,
) -> Result<()> {
    let script = format!("touch {}; exec sleep 1000", marker.display());
    let service = format!("exec = {}", toml_array(&["/bin/sh", "-c", &script]));
    let port = port.to_string();
    sandbox.write_tcp_unit(name, &service, socket, &["127.0.0.1/32"], &[&port], "")?;
    Ok(())
}

/// A diagnostic as printed: `PATH:LINE:COL: KEY: MESSAGE`, then its hint line.
#[derive(Debug)]
struct Diag {
    line: usize,
    col: usize,
    rest: String,
    hint: Option<String>,
}

/// Every diagnostic about `<file>.toml` in `stderr`.
fn diags_for(stderr: &str, file: &str) -> Vec<Diag> {
    let needle = format!("{file}.toml:");
    let lines: Vec<&str> = stderr.lines().collect();
    let mut found = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        let Some(at) = l.find(&needle) else { continue };
        // The path is the file name or ends in "/<file>.toml".
        if at > 0 && !l[..at].ends_with('/') {
            continue;
        }
        let mut parts = l[at + needle.len()..].splitn(3, ':');
        let (Some(line), Some(col), Some(rest)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let (Ok(line), Ok(col)) = (line.trim().parse(), col.trim().parse()) else {
            continue;
        };
        let hint = lines
            .get(i + 1)
            .filter(|h| h.starts_with(char::is_whitespace) && h.trim_start().starts_with("hint:"))
            .map(|h| h.trim().to_owned());
        found.push(Diag {
            line,
            col,
            rest: rest.trim().to_owned(),
            hint,
        });
    }
    found
}

fn check_case(case: &Case, stderr: &str) -> Result<()> {
    let diags = diags_for(stderr, case.file);
    ensure!(
        !diags.is_empty(),
        "no FILE:LINE:COL diagnostic names {}.toml",
        case.file
    );
    let good = diags.iter().any(|d| {
        case.lines.contains(&d.line)
            && d.col >= 1
            && case.key.is_none_or(|k| {
                // KEY is the part before the message: `KEY: MESSAGE`.
                d.rest
                    .split_once(": ")
                    .is_some_and(|(key, _)| key.contains(k))
            })
            && (case.key.is_none() || d.hint.as_deref().is_some_and(|h| h.len() > "hint:".len()))
    });
    ensure!(
        good,
        "{}.toml: want a diagnostic at line {:?} for key {:?} followed by a `hint:` line; got {diags:#?}",
        case.file,
        case.lines,
        case.key
    );
    Ok(())
}

#[test]
fn check_reports_every_kind_of_mistake_in_every_file_at_once() -> Result<()> {
    let sandbox = Sandbox::new()?;
    let cases = cases();
    assert!(cases.len() >= 10);
    for c in &cases {
        sandbox.write_unit(c.file, c.text)?;
    }
    let stderr = holdfast_check(&sandbox.units_dir(), 1).context("check on bad units")?;
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|c| check_case(c, &stderr).err().map(|e| format!("{e:#}")))
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} cases badly reported:\n{}\n---- stderr ----\n{stderr}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    Ok(())
}

#[test]
fn check_gives_each_mistake_its_own_clear_message() -> Result<()> {
    // One file per directory: the message stands on its own, and no other file is blamed.
    let mut failures = Vec::new();
    for case in cases() {
        let sandbox = Sandbox::new()?;
        sandbox.write_unit(case.file, case.text)?;
        sandbox.write_unit(
            "fine",
            &format!("[service]\nexec = [\"/bin/true\"]\n\n[[socket]]\n{SOCKET_OK}\n"),
        )?;
        let out = holdfast_cli(&["check", &sandbox.units_dir().to_string_lossy()])?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.code() != Some(1) {
            failures.push(format!("{}: exit {} (want 1)", case.file, out.status));
        }
        if let Err(e) = check_case(&case, &stderr) {
            failures.push(format!("{e:#}\n---- stderr ----\n{stderr}"));
        }
        if !diags_for(&stderr, "fine").is_empty() {
            failures.push(format!(
                "{}: the valid fine.toml was blamed:\n{stderr}",
                case.file
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

#[test]
fn check_reports_two_mistakes_in_one_file() -> Result<()> {
    let stderr = holdfast_check_unit(
        "two",
        "[service]\nexec = []\n\n[[socket]]\nprotocol = \"tcp\"\naddresses = [\"127.0.0.1/32\"]\nports = [\"70000\"]\n",
        1,
    )?;
    let lines: Vec<usize> = diags_for(&stderr, "two").iter().map(|d| d.line).collect();
    assert!(
        lines.contains(&2) && lines.contains(&7),
        "want diagnostics at lines 2 and 7, got {lines:?}:\n{stderr}"
    );
    Ok(())
}

#[test]
fn check_accepts_a_valid_directory() -> Result<()> {
    let sandbox = Sandbox::new()?;
    let unix = sandbox.path().join("api.sock");
    sandbox.write_units(&[
        (
            "web",
            &format!(
                r#"[service]
exec = ["sleep", "1000"]
type = "notify"
restart = "always"
restart-delay = "100ms"
restart-delay-max = "30s"
stop-timeout = "10s"
start-timeout = "30s"
start-limit-burst = 5
start-limit-interval = "10s"
environment = {{ RUST_LOG = "info" }}
working-directory = "/"
user = "nobody"
group = "nogroup"

[[socket]]
name = "http"
protocol = "tcp"
addresses = ["127.0.0.1/32"]
ports = ["8080"]
backlog = 128
reuse-port = true
no-delay = true
keep-alive = true

[[socket]]
name = "api"
protocol = "unix-stream"
path = "{}"
mode = 0o660
"#,
                unix.display()
            ),
        ),
        (
            "dns",
            "[service]\nexec = [\"/bin/sleep\", \"1000\"]\nrestart = \"on-failure\"\n\n[[socket]]\nprotocol = \"udp\"\naddresses = [\"::1/128\"]\nports = [\"5353\"]\n",
        ),
        ("plain", "[service]\nexec = [\"/bin/sleep\", \"1000\"]\nrestart = \"never\"\n"),
    ])?;
    holdfast_check(&sandbox.units_dir(), 0).context("check on valid units")?;
    Ok(())
}

/// Runs the daemon on `sandbox`, which must make it exit 1 without starting any
/// service (none of `markers` appears, no control socket, nothing left in the
/// namespace). Returns its log.
fn run_expecting_refusal(ns: &Netns, sandbox: Sandbox, markers: &[PathBuf]) -> Result<String> {
    let mut hf = Holdfast::spawn(ns, sandbox)?;
    let status = hf.wait_exit(Duration::from_secs(10))?;
    let log = hf.log();
    ensure!(
        status.code() == Some(1),
        "holdfast run exited with {status}, want 1:\n{log}"
    );
    // A service started just before the exit would still have touched its marker.
    std::thread::sleep(Duration::from_millis(300));
    for m in markers {
        ensure!(!m.exists(), "{} was started:\n{log}", m.display());
    }
    ensure!(
        !hf.sandbox().control_socket().exists(),
        "a control socket was made:\n{log}"
    );
    ns.expect_empty()?;
    Ok(log)
}

#[test]
fn run_on_invalid_units_starts_nothing_and_exits_1() -> Result<()> {
    let (ns, sandbox) = skip_unless!(netns_and_sandbox()?);
    let marker = sandbox.out("started");
    write_toucher(&sandbox, "aa-good", &marker, 8080, "web")?;
    sandbox.write_unit(
        "zz-bad",
        "[service]\nexec = [\"/bin/true\"]\nflavour = \"vanilla\"\n",
    )?;
    let log = run_expecting_refusal(&ns, sandbox, &[marker])?;
    assert!(
        log.contains("zz-bad.toml"),
        "the log does not name the bad file:\n{log}"
    );
    assert!(
        log.contains("flavour"),
        "the log does not name the bad key:\n{log}"
    );
    Ok(())
}

#[test]
fn listener_in_use_names_unit_and_socket_and_starts_nothing() -> Result<()> {
    let (ns, sandbox) = skip_unless!(netns_and_sandbox()?);
    let markers = ["a", "m", "z"].map(|m| sandbox.out(&format!("{m}-started")));
    // Units on both sides of the busy one, whatever order holdfast goes in.
    write_toucher(&sandbox, "aa-free", &markers[0], 8081, "web")?;
    write_toucher(&sandbox, "mm-busy", &markers[1], 8080, "admin")?;
    write_toucher(&sandbox, "zz-free", &markers[2], 8082, "web")?;
    let squatter = ns.run(|| TcpListener::bind("127.0.0.1:8080"))??;
    let log = run_expecting_refusal(&ns, sandbox, &markers)?;
    drop(squatter);
    let complaint = log
        .lines()
        .find(|l| l.contains("mm-busy"))
        .unwrap_or_else(|| panic!("the log does not name unit mm-busy:\n{log}"));
    assert!(
        log.contains("admin"),
        "the log does not name socket admin:\n{log}"
    );
    assert!(
        log.to_lowercase().contains("in use"),
        "the log does not say the address is in use ({complaint}):\n{log}"
    );
    Ok(())
}
