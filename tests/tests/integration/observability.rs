//! Observability: `holdfast metrics` and the `--metrics-listen` endpoint read by
//! a real Prometheus/OpenMetrics parser (Python's prometheus_client) with values
//! that follow the services (state, restarts, exit status, lookups through the
//! dispatcher, the accept queue of a stopped service); `holdfast logs` (the last
//! N lines, the 1000-line ring, `-f`); `--log-format json` and RUST_LOG; and the
//! `--json` outputs of status, bindings and metrics.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

use anyhow::{bail, ensure, Context, Result};
use holdfast_testkit::{
    ask_tcp, holdfast_bin, netns_and_sandbox, netns_and_sandbox_with_tools, netns_or_skip,
    process_gone, run_ok, skip_unless, wait_for, Holdfast, Netns, RunOptions, Sandbox, PYTHON,
};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

const T: Duration = Duration::from_secs(10);

/// Where Debian's python3-prometheus-client installs the parser.
const PROMETHEUS_CLIENT: &str = "/usr/lib/python3/dist-packages/prometheus_client";

/// Reads exposition text on stdin and prints what both parsers of
/// prometheus_client make of it: `{"openmetrics": [family…], "prometheus": [family…]}`,
/// a family being `{"name", "type", "samples": [{"name", "labels", "value"}]}`.
/// Any parse error is an exception: exit status 1 and a traceback.
const PARSE_PY: &str = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics
from prometheus_client.parser import text_string_to_metric_families as prometheus
text = sys.stdin.read()
out = {}
for label, parse in (("openmetrics", openmetrics), ("prometheus", prometheus)):
    out[label] = [
        {"name": f.name, "type": f.type,
         "samples": [{"name": s.name, "labels": s.labels, "value": float(s.value)} for s in f.samples]}
        for f in parse(text)
    ]
json.dump(out, sys.stdout)
"#;

/// Every family the issue asks for, with its OpenMetrics type.
const FAMILIES: &[(&str, &str)] = &[
    ("holdfast_service_state", "gauge"),
    ("holdfast_service_restarts", "counter"),
    ("holdfast_service_ready", "gauge"),
    ("holdfast_service_uptime_seconds", "gauge"),
    ("holdfast_service_last_exit_status", "gauge"),
    ("holdfast_destination_lookups", "counter"),
    ("holdfast_destination_misses", "counter"),
    ("holdfast_destination_errors", "counter"),
    ("holdfast_destination_socket_present", "gauge"),
    ("holdfast_socket_backlog_queued", "gauge"),
    ("holdfast_socket_backlog_limit", "gauge"),
];

/// The states of the one-series-per-state gauge (the contract's, plus "reloading").
const STATES: &[&str] = &[
    "starting",
    "running",
    "reloading",
    "stopping",
    "waiting",
    "stopped",
    "failed",
];

/// Exposition text as prometheus_client's OpenMetrics parser read it.
struct Metrics {
    families: Vec<Value>,
}

impl Metrics {
    /// Parses `text` with both parsers; fails if either fails, or if the plain
    /// Prometheus parser sees other samples than the OpenMetrics one.
    fn parse(text: &str) -> Result<Metrics> {
        let mut child = Command::new(PYTHON)
            .args(["-I", "-c", PARSE_PY])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("start the python parser")?;
        let mut stdin = child.stdin.take().context("stdin")?;
        let input = text.to_string();
        let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
        let out = child.wait_with_output().context("run the python parser")?;
        writer
            .join()
            .expect("writer thread")
            .context("feed the parser")?;
        if !out.status.success() {
            bail!(
                "prometheus_client cannot parse the metrics ({}):\n{}\n---- the text ----\n{text}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let v: Value = serde_json::from_slice(&out.stdout).context("the parser's JSON")?;
        let samples = |parser: &str| -> BTreeSet<String> {
            v[parser]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|f| f["samples"].as_array().cloned().unwrap_or_default())
                .map(|s| s.to_string())
                .collect()
        };
        ensure!(
            samples("openmetrics") == samples("prometheus"),
            "the two parsers disagree:\nopenmetrics {:?}\nprometheus {:?}",
            samples("openmetrics"),
            samples("prometheus")
        );
        Ok(Metrics {
            families: v["openmetrics"].as_array().cloned().unwrap_or_default(),
        })
    }

    fn family(&self, name: &str) -> Option<&Value> {
        self.families.iter().find(|f| f["name"] == name)
    }

    /// The value of the one sample named `name` whose labels include `labels`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        let found: Vec<&Value> = self
            .families
            .iter()
            .flat_map(|f| f["samples"].as_array().into_iter().flatten())
            .filter(|s| s["name"] == name && labels.iter().all(|(k, v)| s["labels"][k] == *v))
            .collect();
        match found.as_slice() {
            [one] => one["value"].as_f64().context("a numeric value"),
            _ => bail!(
                "{} samples {name}{labels:?} (want exactly one); families: {:?}",
                found.len(),
                self.families
            ),
        }
    }

    /// Fails unless every family of [`FAMILIES`] is there with its type (but
    /// `holdfast_service_last_exit_status` only once a service has exited, so
    /// only when `exited`).
    fn expect_families(&self, exited: bool) -> Result<()> {
        for (name, kind) in FAMILIES {
            if !exited && *name == "holdfast_service_last_exit_status" {
                continue;
            }
            let f = self.family(name).with_context(|| {
                let names: Vec<&Value> = self.families.iter().map(|f| &f["name"]).collect();
                format!("no family {name} among {names:?}")
            })?;
            ensure!(f["type"] == *kind, "{name} is a {}, want {kind}", f["type"]);
        }
        Ok(())
    }

    /// Fails unless `service` is in `state` (1) and no other state (0).
    fn expect_state(&self, service: &str, state: &str) -> Result<()> {
        for st in STATES {
            let v = self.value(
                "holdfast_service_state",
                &[("service", service), ("state", st)],
            )?;
            let want = if *st == state { 1.0 } else { 0.0 };
            ensure!(
                v == want,
                "holdfast_service_state{{{service},{st}}} = {v}, want {want}"
            );
        }
        Ok(())
    }
}

/// `holdfast metrics`, parsed.
fn cli_metrics(hf: &Holdfast) -> Result<Metrics> {
    Metrics::parse(&hf.cli_ok(&["metrics"])?)
}

/// One HTTP/1.1 GET from the calling thread: (status code, headers, body).
fn http_get(addr: &str, path: &str) -> Result<(u16, String, String)> {
    let mut s = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    s.set_read_timeout(Some(T))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let raw = String::from_utf8(raw).context("the HTTP reply is not UTF-8")?;
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .with_context(|| format!("no end of headers in {raw:?}"))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("status line of {head:?}"))?;
    Ok((code, head.to_lowercase(), body.to_string()))
}

#[test]
fn metrics_follow_the_services_in_the_cli_and_over_http() -> Result<()> {
    let (ns, sandbox) = skip_unless!(netns_and_sandbox_with_tools(&[PROMETHEUS_CLIENT])?);
    let exec = sandbox.serve_exec("web")?;
    let service = format!("exec = {exec}\nrestart = \"always\"");
    sandbox.write_tcp_unit("web", &service, "http", &["192.0.2.0/24"], &["80"], "")?;
    ns.add_local_route("192.0.2.0/24")?;
    let opts = RunOptions {
        args: vec!["--metrics-listen".into(), "127.0.0.1:9100".into()],
        ..RunOptions::default()
    };
    let mut hf = skip_unless!(Holdfast::start_dispatched(&ns, sandbox, &opts)?);
    let pid = hf.wait_running("web", T)?;
    let dest = [("service", "web"), ("socket", "http")];

    let m = cli_metrics(&hf)?;
    m.expect_families(false)?;
    m.expect_state("web", "running")?;
    let web = [("service", "web")];
    assert_eq!(m.value("holdfast_service_ready", &web)?, 1.0);
    assert_eq!(m.value("holdfast_service_restarts_total", &web)?, 0.0);
    let uptime = m.value("holdfast_service_uptime_seconds", &web)?;
    ensure!(uptime > 0.0 && uptime < 60.0, "uptime {uptime}");
    assert_eq!(m.value("holdfast_destination_socket_present", &dest)?, 1.0);
    assert_eq!(m.value("holdfast_destination_misses_total", &dest)?, 0.0);
    assert_eq!(m.value("holdfast_destination_errors_total", &dest)?, 0.0);
    let lookups = m.value("holdfast_destination_lookups_total", &dest)?;
    let limit = m.value("holdfast_socket_backlog_limit", &dest)?;
    ensure!(limit > 0.0, "backlog limit {limit}");

    // Connections through the dispatcher are counted.
    ns.run(|| -> Result<()> {
        for i in 0..5 {
            let answer = ask_tcp(format!("192.0.2.{}:80", 10 + i).parse()?, T)?;
            ensure!(answer == format!("http {pid}\n"), "{answer:?}");
        }
        Ok(())
    })??;
    let m = cli_metrics(&hf)?;
    let now = m.value("holdfast_destination_lookups_total", &dest)?;
    ensure!(
        now >= lookups + 5.0,
        "5 connections, yet lookups went from {lookups} to {now}"
    );

    // A kill -9: restarts_total 1, last exit status 128 + 9.
    kill(Pid::from_raw(pid), Signal::SIGKILL)?;
    let next = hf.wait_service("web", T, |s| {
        s["state"] == "running" && s["pid"].is_i64() && s["pid"] != pid
    })?;
    let m = cli_metrics(&hf)?;
    m.expect_families(true)?;
    m.expect_state("web", "running")?;
    assert_eq!(
        m.value("holdfast_service_restarts_total", &web)?,
        1.0,
        "{next}"
    );
    assert_eq!(m.value("holdfast_service_last_exit_status", &web)?, 137.0);

    // The same over HTTP, from inside the namespace.
    let (code, head, body) = ns.run(|| http_get("127.0.0.1:9100", "/metrics"))??;
    assert_eq!(code, 200, "{head}\n{body}");
    ensure!(
        head.contains("content-type: application/openmetrics-text")
            || head.contains("content-type: text/plain"),
        "no exposition content type: {head}"
    );
    let m = Metrics::parse(&body)?;
    m.expect_families(true)?;
    m.expect_state("web", "running")?;
    assert_eq!(m.value("holdfast_service_restarts_total", &web)?, 1.0);
    assert_eq!(m.value("holdfast_service_last_exit_status", &web)?, 137.0);
    ensure!(m.value("holdfast_destination_lookups_total", &dest)? >= now);
    let (code, _, _) = ns.run(|| http_get("127.0.0.1:9100", "/nothing-here"))??;
    assert_eq!(code, 404);

    // A stopped service: state stopped, not ready.
    hf.cli_ok(&["stop", "web"])?;
    let m = cli_metrics(&hf)?;
    m.expect_state("web", "stopped")?;
    assert_eq!(m.value("holdfast_service_ready", &web)?, 0.0);
    hf.stop()
}

/// Opens `argv[2]` connections to `argv[1]` (HOST:PORT) and holds them idle until
/// stdin closes (60 s at most); prints how many it opened.
const FLOOD_PY: &str = r#"
import select, socket, sys
host, port = sys.argv[1].rsplit(":", 1)
held = []
for _ in range(int(sys.argv[2])):
    try:
        held.append(socket.create_connection((host, int(port)), timeout=2))
    except OSError:
        pass
print(len(held), flush=True)
select.select([sys.stdin], [], [], 60)
"#;

/// holdfast::metrics::MAX_CONNECTIONS: the endpoint's connections at once.
const METRICS_MAX_CONNECTIONS: usize = 32;

/// (threads, open fds) of a process.
fn threads_and_fds(pid: i32) -> Result<(usize, usize)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let threads = status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .context("no Threads: line")?
        .trim()
        .parse()?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
    Ok((threads, fds))
}

#[test]
fn an_idle_flood_leaves_the_metrics_endpoint_answering_and_holdfast_bounded() -> Result<()> {
    let Some(ns) = netns_or_skip() else {
        return Ok(());
    };
    let opts = RunOptions {
        args: vec!["--metrics-listen".into(), "127.0.0.1:9100".into()],
        ..RunOptions::default()
    };
    let mut hf = Holdfast::start_with(&ns, Sandbox::new()?, &opts)?;
    let (code, _, _) = ns.run(|| http_get("127.0.0.1:9100", "/metrics"))??;
    assert_eq!(code, 200);
    let (threads_before, fds_before) = threads_and_fds(hf.pid())?;

    // 600 idle connections from an unprivileged user (the issue saw tiny_http
    // at 498 threads and 1022 fds after 559, then dead).
    let mut flood = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns.name(),
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
        ])
        .args([
            "--clear-groups",
            PYTHON,
            "-c",
            FLOOD_PY,
            "127.0.0.1:9100",
            "600",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("start the flooder as nobody")?;
    let mut opened = String::new();
    BufReader::new(flood.stdout.take().context("flooder stdout")?).read_line(&mut opened)?;
    let opened: usize = opened
        .trim()
        .parse()
        .with_context(|| format!("{opened:?}"))?;
    ensure!(
        opened >= 500,
        "the flooder opened only {opened} connections"
    );

    // While they are held: the endpoint answers at once, threads and fds stay bounded.
    let start = std::time::Instant::now();
    let (code, _, body) = ns.run(|| http_get("127.0.0.1:9100", "/metrics"))??;
    let took = start.elapsed();
    assert_eq!(code, 200);
    ensure!(body.contains("# EOF"), "{body}");
    ensure!(
        took < Duration::from_secs(2),
        "a scrape under the flood took {took:?}"
    );
    let (threads, fds) = threads_and_fds(hf.pid())?;
    ensure!(
        threads <= threads_before,
        "holdfast went from {threads_before} to {threads} threads under the flood"
    );
    ensure!(
        fds <= fds_before + METRICS_MAX_CONNECTIONS,
        "holdfast went from {fds_before} to {fds} fds under the flood"
    );
    eprintln!("under {opened} idle connections: a scrape took {took:?}; {threads_before} -> {threads} threads, {fds_before} -> {fds} fds");

    drop(flood.stdin.take());
    flood.wait()?;
    let (code, _, _) = ns.run(|| http_get("127.0.0.1:9100", "/metrics"))??;
    assert_eq!(code, 200, "the endpoint after the flood");
    hf.stop()
}

#[test]
fn backlog_queued_shows_the_connections_a_stopped_service_has_waiting() -> Result<()> {
    let (ns, sandbox) = skip_unless!(netns_and_sandbox_with_tools(&[PROMETHEUS_CLIENT])?);
    let exec = sandbox.serve_exec("web")?;
    let service = format!("exec = {exec}");
    sandbox.write_tcp_unit(
        "web",
        &service,
        "web",
        &["127.0.0.1/32"],
        &["8080"],
        "backlog = 8",
    )?;
    let (mut hf, _) = Holdfast::start_running(&ns, sandbox, "web")?;
    let sock = [("service", "web"), ("socket", "web"), ("protocol", "tcp")];
    let m = cli_metrics(&hf)?;
    assert_eq!(m.value("holdfast_socket_backlog_queued", &sock)?, 0.0);
    assert_eq!(m.value("holdfast_socket_backlog_limit", &sock)?, 8.0);

    hf.cli_ok(&["stop", "web"])?;
    let _inside = ns.enter()?;
    let waiting: Vec<TcpStream> = (0..3)
        .map(|i| {
            TcpStream::connect_timeout(&"127.0.0.1:8080".parse().expect("literal"), T)
                .with_context(|| format!("connection {i} to the stopped service"))
        })
        .collect::<Result<_>>()?;
    let m = cli_metrics(&hf)?;
    assert_eq!(m.value("holdfast_socket_backlog_queued", &sock)?, 3.0);
    m.expect_state("web", "stopped")?;

    hf.cli_ok(&["start", "web"])?;
    let pid = hf.wait_running("web", T)?;
    for (i, mut s) in waiting.into_iter().enumerate() {
        s.set_read_timeout(Some(T))?;
        let mut answer = String::new();
        s.read_to_string(&mut answer)
            .with_context(|| format!("connection {i} made while stopped"))?;
        assert_eq!(answer, format!("web {pid}\n"), "connection {i}");
    }
    let m = cli_metrics(&hf)?;
    assert_eq!(m.value("holdfast_socket_backlog_queued", &sock)?, 0.0);
    drop(_inside);
    hf.stop()
}

/// A service that prints `line 1` … `line 1200` on stdout, then, once `out/go1`
/// exists, `an error` on stderr, then, once `out/go2` exists, `line 1201` …
/// `line 1205` 200 ms apart; then sleeps.
fn write_chatty_unit(sandbox: &Sandbox) -> Result<()> {
    let go1 = sandbox.out("go1");
    let go2 = sandbox.out("go2");
    let script = format!(
        r#"i=1
while [ $i -le 1200 ]; do echo "line $i"; i=$((i+1)); done
while [ ! -e {go1} ]; do sleep 0.05; done
echo "an error" >&2
while [ ! -e {go2} ]; do sleep 0.05; done
while [ $i -le 1205 ]; do echo "line $i"; i=$((i+1)); sleep 0.2; done
exec sleep 1000
"#,
        go1 = go1.display(),
        go2 = go2.display()
    );
    sandbox.write_sh_unit("chatty", &script)?;
    Ok(())
}

/// A `holdfast logs ARGS… -f` running, its stdout read line by line by a
/// thread; killed when dropped.
struct Follow {
    child: std::process::Child,
    lines: mpsc::Receiver<String>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Follow {
    fn start(hf: &Holdfast, args: &[&str]) -> Result<Follow> {
        let mut child = Command::new(holdfast_bin())
            .arg("logs")
            .args(args)
            .arg("--state-dir")
            .arg(hf.sandbox().state_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("spawn holdfast logs -f")?;
        let stdout = child.stdout.take().context("stdout")?;
        let (tx, lines) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Ok(Follow {
            child,
            lines,
            reader: Some(reader),
        })
    }

    /// The next line it prints (within [`T`]); `what` names it for the error.
    fn next(&self, what: &str) -> Result<String> {
        self.lines
            .recv_timeout(T)
            .with_context(|| format!("logs -f printed no {what}"))
    }

    /// Kills it; returns what it printed and was not read.
    fn finish(mut self) -> Vec<String> {
        self.stop();
        self.lines.try_iter().collect()
    }

    fn stop(&mut self) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

impl Drop for Follow {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `holdfast logs chatty ARGS…`: its lines, without their
/// `TIME STREAM[PID]: ` prefix.
fn logs(hf: &Holdfast, args: &[&str]) -> Result<Vec<String>> {
    let mut all = vec!["logs", "chatty"];
    all.extend_from_slice(args);
    hf.cli_ok(&all)?.lines().map(text_of).collect()
}

/// The text of a line `holdfast logs` printed: what follows `]: `.
fn text_of(printed: &str) -> Result<String> {
    printed
        .split_once("]: ")
        .map(|(_, text)| text.to_string())
        .with_context(|| format!("not a TIME STREAM[PID]: TEXT line: {printed:?}"))
}

fn numbered(range: std::ops::RangeInclusive<u32>) -> Vec<String> {
    range.map(|i| format!("line {i}")).collect()
}

#[test]
fn logs_show_the_last_lines_keep_1000_and_follow() -> Result<()> {
    let (ns, sandbox) = skip_unless!(netns_and_sandbox()?);
    write_chatty_unit(&sandbox)?;
    let (mut hf, _) = Holdfast::start_running(&ns, sandbox, "chatty")?;
    wait_for("the 1200th line to be captured", T, || {
        (logs(&hf, &["-n", "1"]).ok()? == ["line 1200"]).then_some(())
    })?;
    // The ring keeps the last 1000 lines.
    assert_eq!(logs(&hf, &[])?, numbered(201..=1200));
    assert_eq!(logs(&hf, &["-n", "5"])?, numbered(1196..=1200));

    // stderr is captured too.
    std::fs::write(hf.sandbox().out("go1"), "")?;
    wait_for("the stderr line to be captured", T, || {
        (logs(&hf, &["-n", "1"]).ok()? == ["an error"]).then_some(())
    })?;

    // -f: the last lines, then new ones as they come.
    let follow = Follow::start(&hf, &["chatty", "-f", "-n", "2"])?;
    let mut seen = Vec::new();
    let mut expect = |want: &str| -> Result<()> {
        let got = text_of(&follow.next(&format!("{want:?} after {seen:?}"))?)?;
        seen.push(got.clone());
        ensure!(
            got == want,
            "logs -f printed {got:?}, want {want:?} (so far {seen:?})"
        );
        Ok(())
    };
    expect("line 1200")?;
    expect("an error")?;
    std::fs::write(hf.sandbox().out("go2"), "")?;
    for i in 1201..=1205 {
        expect(&format!("line {i}"))?;
    }
    let rest = follow.finish();
    // -f printed no line twice: nothing more came while it ran.
    ensure!(
        rest.is_empty(),
        "logs -f printed more than was logged: {rest:?}"
    );
    hf.stop()
}

/// The daemon's log as JSON objects, one per line; fails on any other line.
fn json_lines(log: &str) -> Result<Vec<Value>> {
    log.lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("a log line is not JSON: {l:?}")))
        .collect()
}

/// Starts the daemon on `sandbox` with `--log-format json` and `RUST_LOG=rust_log`,
/// and waits until its serve.py service `web` runs and its first line is in
/// `holdfast logs`: the daemon and web's pid.
fn start_logging_json(ns: &Netns, sandbox: Sandbox, rust_log: &str) -> Result<(Holdfast, i32)> {
    let opts = RunOptions {
        args: vec!["--log-format".into(), "json".into()],
        env: vec![("RUST_LOG".into(), rust_log.into())],
        ..RunOptions::default()
    };
    let hf = Holdfast::start_with(ns, sandbox, &opts)?;
    let pid = hf.wait_running("web", T)?;
    wait_for("web's first line", T, || {
        let out = hf.cli_ok(&["logs", "web"]).ok()?;
        out.contains(&format!("serving pid {pid}")).then_some(())
    })?;
    Ok((hf, pid))
}

#[test]
fn json_log_lines_parse_and_name_their_service() -> Result<()> {
    let (ns, sandbox) = skip_unless!(netns_and_sandbox()?);
    sandbox.write_serve_unit("web", 8080, "restart = \"always\"")?;
    let (mut hf, pid) = start_logging_json(&ns, sandbox, "debug")?;
    kill(Pid::from_raw(pid), Signal::SIGKILL)?;
    let next = hf.wait_service("web", T, |s| s["pid"].is_i64() && s["pid"] != pid)?;
    let next = next["pid"].as_i64().context("pid")?;
    hf.stop()?;
    let log = hf.log();
    let lines = json_lines(&log)?;
    ensure!(lines.len() >= 5, "only {} log lines:\n{log}", lines.len());

    for line in &lines {
        ensure!(
            line["level"].is_string() && line["fields"].is_object(),
            "a JSON log line without level or fields: {line}"
        );
        // A line about one of the service's processes names the service.
        let about = line["fields"]["pid"].as_i64();
        if about == Some(i64::from(pid)) || about == Some(next) {
            ensure!(
                line["fields"]["service"] == "web",
                "a line about web's pid {about:?} does not carry service=web: {line}"
            );
        }
    }
    let about_web = |needle: &str| {
        lines.iter().any(|l| {
            l["fields"]["service"] == "web"
                && l["fields"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains(needle))
        })
    };
    // Holdfast's own lines and the service's captured output alike.
    ensure!(about_web("started"), "no line says web started:\n{log}");
    ensure!(about_web("exited"), "no line says web exited:\n{log}");
    ensure!(
        about_web(&format!("serving pid {pid}")),
        "web's output is not logged with its name:\n{log}"
    );
    Ok(())
}

#[test]
fn rust_log_sets_the_level() -> Result<()> {
    let (ns, sandbox) = skip_unless!(netns_and_sandbox()?);
    sandbox.write_serve_unit("web", 8080, "")?;
    // Ignores SIGTERM: its stop ends in a SIGKILL, which is worth a warning.
    sandbox.write_unit(
        "stubborn",
        "[service]\nexec = [\"/bin/sh\", \"-c\", \"trap '' TERM; while :; do sleep 0.1; done\"]\nstop-timeout = \"300ms\"\n",
    )?;
    let (mut hf, _) = start_logging_json(&ns, sandbox, "warn")?;
    hf.wait_running("stubborn", T)?;
    hf.stop()?;
    let log = hf.log();
    let lines = json_lines(&log)?;
    for line in &lines {
        ensure!(
            line["level"] == "WARN" || line["level"] == "ERROR",
            "RUST_LOG=warn, yet: {line}"
        );
    }
    ensure!(
        lines
            .iter()
            .any(|l| l["level"] == "WARN" && l["fields"]["service"] == "stubborn"),
        "no warning about the SIGKILL of stubborn:\n{log}"
    );
    Ok(())
}

/// The fields of each row of `holdfast metrics --json`, by section.
const SERVICE_METRICS: &str = "service state restarts ready uptime_seconds last_exit_status instances connections_total denied_total";
const DESTINATION_METRICS: &str =
    "service socket destination socket_present lookups misses errors denied";
const SOCKET_METRICS: &str = "service socket protocol backlog_queued backlog_limit";

#[test]
fn json_outputs_have_the_documented_fields() -> Result<()> {
    let (ns, sandbox) = skip_unless!(netns_and_sandbox()?);
    let exec = sandbox.serve_exec("web")?;
    let service = format!("exec = {exec}");
    let ports = ["80", "8000-8009"];
    sandbox.write_tcp_unit("web", &service, "http", &["192.0.2.0/24"], &ports, "")?;
    sandbox.write_unit("idle", "[service]\nexec = [\"/bin/sleep\", \"1000\"]\n")?;
    ns.add_local_route("192.0.2.0/24")?;
    let mut hf = skip_unless!(Holdfast::start_in_mode(&ns, sandbox, true)?);
    let pid = hf.wait_running("web", T)?;
    hf.wait_running("idle", T)?;
    hf.cli_ok(&["stop", "idle"])?;

    let json = |args: &[&str]| -> Result<Value> {
        let text = hf.cli_ok(args)?;
        serde_json::from_str(&text).with_context(|| format!("{args:?} printed {text:?}"))
    };
    let has = |v: &Value, keys: &[&str]| -> Result<()> {
        for k in keys {
            ensure!(v.get(k).is_some(), "no {k:?} in {v}");
        }
        Ok(())
    };
    // `v`: an array of `count` rows, each with every one of `keys` (names
    // separated by spaces).
    let rows_having = |v: &Value, count: usize, keys: &str| -> Result<Vec<Value>> {
        let rows = v.as_array().with_context(|| format!("not an array: {v}"))?;
        ensure!(
            rows.len() == count,
            "{} rows, want {count}: {v}",
            rows.len()
        );
        let keys: Vec<&str> = keys.split_whitespace().collect();
        for r in rows {
            has(r, &keys)?;
        }
        Ok(rows.clone())
    };
    // The output of `args`: `count` rows, each with every one of the (at least
    // `least`) fields docs/json.md lists under `heading`.
    let documented_rows = |args: &[&str], count: usize, heading: &str, least: usize| {
        let fields = documented_fields(heading)?;
        ensure!(fields.len() >= least, "{heading}: {fields:?}");
        rows_having(&json(args)?, count, &fields.join(" ")).with_context(|| format!("{args:?}"))
    };

    // status --json: an array of objects with every field docs/json.md lists.
    let rows = documented_rows(&["status", "--json"], 2, "## `holdfast status", 18)?;
    let web = rows.iter().find(|r| r["name"] == "web").context("web")?;
    assert_eq!(web["state"], "running");
    assert_eq!(web["pid"], pid);
    assert_eq!(web["restarts"], 0);
    ensure!(
        web["uptime_secs"].as_f64().is_some_and(|u| u >= 0.0),
        "{web}"
    );
    assert_eq!(web["sockets"], serde_json::json!(["http"]));
    let idle = rows.iter().find(|r| r["name"] == "idle").context("idle")?;
    assert_eq!(idle["state"], "stopped");
    assert_eq!(idle["pid"], Value::Null, "{idle}");
    assert_eq!(idle["uptime_secs"], Value::Null, "{idle}");
    assert_eq!(idle["sockets"], serde_json::json!([]));
    let one = json(&["status", "web", "--json"])?;
    assert_eq!(one.as_array().map(Vec::len), Some(1), "{one}");
    assert_eq!(one[0]["name"], "web");

    // bindings --json: one row per prefix × port range.
    ns.run(|| ask_tcp("192.0.2.1:8005".parse().expect("literal"), T))??;
    let rows = documented_rows(&["bindings", "--json"], 2, "## `holdfast bindings", 11)?;
    for r in &rows {
        assert_eq!(r["service"], "web");
        assert_eq!(r["socket"], "http");
        assert_eq!(r["protocol"], "tcp");
        assert_eq!(r["prefix"], "192.0.2.0/24");
        assert_eq!(r["socket_present"], true);
    }
    let ports: BTreeSet<&str> = rows.iter().filter_map(|r| r["ports"].as_str()).collect();
    assert_eq!(ports, BTreeSet::from(["80", "8000-8009"]));
    let range = rows
        .iter()
        .find(|r| r["ports"] == "8000-8009")
        .context("range")?;
    ensure!(range["lookups"].as_u64() >= Some(1), "{range}");

    // metrics --json: {services, destinations, sockets}.
    let m = json(&["metrics", "--json"])?;
    has(&m, &["services", "destinations", "sockets"])?;
    let services = rows_having(&m["services"], 2, SERVICE_METRICS).context("services")?;
    let web = services
        .iter()
        .find(|s| s["service"] == "web")
        .context("web")?;
    assert_eq!(web["state"], "running");
    assert_eq!(web["ready"], true);
    let dests = rows_having(&m["destinations"], 1, DESTINATION_METRICS).context("destinations")?;
    ensure!(dests[0]["lookups"].as_u64() >= Some(1), "{m}");
    let sockets = rows_having(&m["sockets"], 1, SOCKET_METRICS).context("sockets")?;
    assert_eq!(sockets[0]["backlog_queued"], 0);
    hf.stop()?;
    ensure!(process_gone(pid), "web outlived the daemon");
    Ok(())
}

/// The field names in the first column of the table under `heading` in
/// docs/json.md (a cell may name several: "`service`, `socket`").
fn documented_fields(heading: &str) -> Result<Vec<String>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/json.md");
    let doc = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    let section = doc
        .split("\n## ")
        .find(|s| format!("## {s}").starts_with(heading))
        .with_context(|| format!("no {heading:?} section in {}", path.display()))?;
    let mut fields = Vec::new();
    for line in section.lines().filter(|l| l.starts_with("| `")) {
        let cell = line.split('|').nth(1).unwrap_or_default();
        fields.extend(
            cell.split(',')
                .filter_map(|f| f.trim().strip_prefix('`')?.strip_suffix('`'))
                .map(String::from),
        );
    }
    Ok(fields)
}

/// `holdfast logs ARGS… --json`: one object per line.
fn json_logs(hf: &Holdfast, args: &[&str]) -> Result<Vec<Value>> {
    let mut all = vec!["logs", "--json"];
    all.extend_from_slice(args);
    hf.cli_ok(&all)?
        .lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("logs --json printed {l:?}")))
        .collect()
}

fn texts(lines: &[Value]) -> Vec<&str> {
    lines.iter().filter_map(|l| l["line"].as_str()).collect()
}

fn time_of(line: &Value) -> Result<SystemTime> {
    let t = line["time"]
        .as_str()
        .with_context(|| format!("no time: {line}"))?;
    ensure!(
        t.ends_with('Z') && t.contains('T'),
        "not RFC 3339 in UTC: {t}"
    );
    humantime::parse_rfc3339(t).with_context(|| format!("not RFC 3339: {t}"))
}

/// A service that writes on both streams, in steps the test triggers.
fn write_talker_unit(sandbox: &Sandbox) -> Result<()> {
    let step = |n: u32| sandbox.out(&format!("step{n}")).display().to_string();
    let script = format!(
        r#"echo "out 1"
echo "err 1" >&2
while [ ! -e {s1} ]; do sleep 0.05; done
echo "out 2"
while [ ! -e {s2} ]; do sleep 0.05; done
echo "err 2" >&2
exec sleep 1000
"#,
        s1 = step(1),
        s2 = step(2),
    );
    sandbox.write_sh_unit("talker", &script)?;
    Ok(())
}

/// Each line of `holdfast logs` carries when it was read, its stream and its
/// instance's pid (in --json and in the human output); `--since` (a time or
/// a duration ago), `-n`, `-f` and `--json` work together.
#[test]
fn log_lines_carry_time_stream_and_pid_and_since_picks_by_time() -> Result<()> {
    let (ns, sandbox) = skip_unless!(netns_and_sandbox()?);
    write_talker_unit(&sandbox)?;
    let started = SystemTime::now();
    let (mut hf, pid) = Holdfast::start_running(&ns, sandbox, "talker")?;
    wait_for("the first two lines", T, || {
        (json_logs(&hf, &["talker"]).ok()?.len() == 2).then_some(())
    })?;
    let first = json_logs(&hf, &["talker"])?;
    ensure!(texts(&first) == ["out 1", "err 1"], "{first:?}");
    for (line, stream) in first.iter().zip(["stdout", "stderr"]) {
        ensure!(line["stream"] == stream, "{line}");
        ensure!(line["pid"] == pid, "not the instance's pid {pid}: {line}");
        let t = time_of(line)?;
        ensure!(
            t >= started - Duration::from_secs(1) && t <= SystemTime::now(),
            "{line}: read before the test began or in the future"
        );
    }
    ensure!(first[0]["seq"] == 0 && first[1]["seq"] == 1, "{first:?}");
    // The human form: `TIME STREAM[PID]: text`, the time readable.
    let human = hf.cli_ok(&["logs", "talker"])?;
    let human: Vec<&str> = human.lines().collect();
    ensure!(human.len() == 2, "{human:?}");
    ensure!(
        human[1].ends_with(&format!(" stderr[{pid}]: err 1")),
        "{human:?}"
    );
    let shown = human[1].split(" stderr[").next().unwrap_or_default();
    humantime::parse_rfc3339_weak(shown.trim_end_matches('Z'))
        .with_context(|| format!("the time {shown:?} of {:?} does not read", human[1]))?;
    // Tracked by cgroup (the default): its CPU is shown.
    let s = hf.service("talker")?;
    ensure!(s["cpu_seconds"].is_number(), "{s}");

    // Later lines; --since picks by time.
    std::thread::sleep(Duration::from_millis(2500));
    let middle = SystemTime::now();
    std::fs::write(hf.sandbox().out("step1"), "")?;
    wait_for("out 2", T, || {
        (json_logs(&hf, &["talker"]).ok()?.len() == 3).then_some(())
    })?;
    let middle_text = humantime::format_rfc3339_micros(middle).to_string();
    let since = json_logs(&hf, &["talker", "--since", &middle_text])?;
    ensure!(
        texts(&since) == ["out 2"],
        "--since {middle_text}: {since:?}"
    );
    // A duration ago: the first two lines are older than 2 s, out 2 is not.
    let since = json_logs(&hf, &["talker", "--since", "2s"])?;
    ensure!(texts(&since) == ["out 2"], "--since 2s: {since:?}");
    // The same time in the human form (a space, no Z) reads the same.
    let spaced = middle_text.replacen('T', " ", 1).replace('Z', "");
    let since = json_logs(&hf, &["talker", "--since", &spaced])?;
    ensure!(texts(&since) == ["out 2"], "--since {spaced:?}: {since:?}");
    // -n takes the last of what --since leaves.
    let early = humantime::format_rfc3339(started - Duration::from_secs(60)).to_string();
    let last = json_logs(&hf, &["talker", "--since", &early, "-n", "2"])?;
    ensure!(texts(&last) == ["err 1", "out 2"], "{last:?}");
    let none = json_logs(&hf, &["talker", "--since", "2099-01-01T00:00:00Z"])?;
    ensure!(none.is_empty(), "{none:?}");
    // A --since that is neither: a usage error, exit 2.
    let bad = hf.cli(&["logs", "talker", "--since", "yesterday-ish"])?;
    ensure!(bad.status.code() == Some(2), "{bad:?}");

    // -f --json --since -n: what --since and -n pick, then new lines as they come.
    let follow = Follow::start(
        &hf,
        &["talker", "-f", "--json", "-n", "5", "--since", &middle_text],
    )?;
    let next = |what: &str| -> Result<Value> {
        let l = follow.next(what)?;
        serde_json::from_str(&l).with_context(|| format!("logs -f --json printed {l:?}"))
    };
    let got = next("out 2")?;
    ensure!(got["line"] == "out 2" && got["stream"] == "stdout", "{got}");
    std::fs::write(hf.sandbox().out("step2"), "")?;
    let got = next("err 2")?;
    ensure!(
        got["line"] == "err 2" && got["stream"] == "stderr" && got["pid"] == pid,
        "{got}"
    );
    time_of(&got)?;
    drop(follow);
    hf.stop()
}

/// With `--cgroup-root`, `status` (table and --json) and the metrics show the
/// memory and CPU each service's cgroup has used.
#[test]
fn status_and_metrics_show_cgroup_usage() -> Result<()> {
    let ns = skip_unless!(netns_or_skip());
    let root = skip_unless!(holdfast_testkit::require(
        "a cgroup v2 of our own",
        holdfast_testkit::CgroupRoot::new("usage")
    ));
    let sandbox = Sandbox::new()?;
    // About a second of CPU, then idle.
    let burn = "i=0; while [ $i -lt 400000 ]; do i=$((i+1)); done; echo burnt; exec sleep 1000";
    sandbox.write_sh_unit("burner", burn)?;
    let opts = RunOptions {
        args: root.run_args(),
        ..RunOptions::default()
    };
    let mut hf = Holdfast::start_with(&ns, sandbox, &opts)?;
    hf.wait_running("burner", T)?;
    wait_for("the burn to end", Duration::from_secs(60), || {
        hf.cli_ok(&["logs", "burner"])
            .ok()?
            .contains("burnt")
            .then_some(())
    })?;
    let s = hf.service("burner")?;
    let cpu = s["cpu_seconds"]
        .as_f64()
        .with_context(|| format!("no cpu_seconds: {s}"))?;
    ensure!(cpu >= 0.1, "the burner used {cpu} s of CPU? {s}");
    // memory.current exists only with the memory controller.
    let memory_file = root.path().join("burner.service/memory.current");
    if memory_file.exists() {
        let m = s["memory_bytes"]
            .as_u64()
            .with_context(|| format!("{} exists, yet {s}", memory_file.display()))?;
        ensure!(m > 0, "{s}");
    } else {
        ensure!(s["memory_bytes"].is_null(), "no memory.current, yet {s}");
    }
    // The cgroup's own figure: what holdfast shows is what the kernel says.
    let stat = std::fs::read_to_string(root.path().join("burner.service/cpu.stat"))?;
    let kernel = stat
        .lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .context("usage_usec")?
        / 1e6;
    ensure!(
        (kernel - cpu).abs() < 0.5,
        "holdfast says {cpu} s, cpu.stat {kernel} s"
    );

    // The table has the columns.
    let table = hf.cli_ok(&["status"])?;
    let header = table.lines().next().unwrap_or_default();
    ensure!(
        header.contains("MEMORY") && header.contains("CPU"),
        "{table}"
    );
    let row = table
        .lines()
        .find(|l| l.starts_with("burner "))
        .with_context(|| format!("no burner row:\n{table}"))?;
    let shown = row
        .split_whitespace()
        // Uptime shows whole seconds ("0s"), CPU two decimals ("0.69s").
        .filter(|w| w.contains('.'))
        .filter_map(|w| w.strip_suffix('s')?.parse::<f64>().ok())
        .next()
        .with_context(|| format!("no CPU seconds in {row:?}"))?;
    ensure!(shown >= 0.1, "{row}");

    // The metrics.
    let text = hf.cli_ok(&["metrics"])?;
    let sample = text
        .lines()
        .find(|l| l.starts_with("holdfast_service_cpu_seconds_total{service=\"burner\"}"))
        .with_context(|| format!("no cpu series:\n{text}"))?;
    let value: f64 = sample
        .rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("{sample:?}"))?;
    ensure!(value >= 0.1, "{sample}");
    ensure!(
        text.contains("# TYPE holdfast_service_cpu_seconds counter"),
        "{text}"
    );
    ensure!(
        memory_file.exists() == text.contains("holdfast_service_memory_bytes{service=\"burner\"}"),
        "memory series and memory.current disagree:\n{text}"
    );
    hf.stop()
}

/// A journald stand-in: a unix datagram socket bound in the sandbox; holdfast
/// is pointed at it with `--journal-socket`. Each line arrives as one native
/// datagram with the service, stream, pid and priority; `--journal off`
/// sends nothing.
#[test]
fn lines_are_forwarded_to_a_journal_socket() -> Result<()> {
    let (ns, sandbox) = skip_unless!(netns_and_sandbox()?);
    let script = "echo 'hello journal'; echo '<3>disk on fire' >&2; exec sleep 1000";
    sandbox.write_sh_unit("speaker", script)?;
    let path = sandbox.path().join("journal.socket");
    let receiver = std::os::unix::net::UnixDatagram::bind(&path)?;
    receiver.set_read_timeout(Some(T))?;
    let opts = RunOptions {
        args: vec!["--journal-socket".into(), path.display().to_string()],
        ..RunOptions::default()
    };
    let mut hf = Holdfast::start_with(&ns, sandbox, &opts)?;
    let pid = hf.wait_running("speaker", T)?;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 65536];
    while got.len() < 2 {
        let n = receiver
            .recv(&mut buf)
            .with_context(|| format!("no datagram after {got:?}"))?;
        got.push(journal_fields(&buf[..n])?);
    }
    got.sort_by(|a, b| a["HOLDFAST_STREAM"].cmp(&b["HOLDFAST_STREAM"]));
    let (err, out) = (&got[0], &got[1]);
    let pid = pid.to_string();
    for (f, stream, message, priority) in [
        (out, "stdout", "hello journal", "6"),
        (err, "stderr", "disk on fire", "3"),
    ] {
        let want = [
            ("MESSAGE", message),
            ("PRIORITY", priority),
            ("SYSLOG_IDENTIFIER", "speaker"),
            ("HOLDFAST_UNIT", "speaker"),
            ("HOLDFAST_STREAM", stream),
            ("HOLDFAST_PID", &pid),
            ("SYSLOG_PID", &pid),
        ];
        for (k, v) in want {
            ensure!(f.get(k).map(String::as_str) == Some(v), "{k}: {f:?}");
        }
    }
    // The ring keeps them too, and the metrics count them.
    ensure!(hf.cli_ok(&["logs", "speaker"])?.contains("hello journal"));
    let m: Value = serde_json::from_str(&hf.cli_ok(&["metrics", "--json"])?)?;
    ensure!(m["journal"]["forwarded"] == 2, "{}", m["journal"]);
    ensure!(m["journal"]["dropped"] == 0, "{}", m["journal"]);
    // In the journal, so not repeated in holdfast's own log at info.
    hf.stop()?;
    let log = hf.log();
    ensure!(
        !log.contains("hello journal"),
        "a forwarded line is in holdfast's log at info:\n{log}"
    );

    // --journal off: nothing arrives.
    let (ns, sandbox) = skip_unless!(netns_and_sandbox()?);
    sandbox.write_sh_unit("speaker", script)?;
    let opts = RunOptions {
        args: vec![
            "--journal".into(),
            "off".into(),
            "--journal-socket".into(),
            path.display().to_string(),
        ],
        ..RunOptions::default()
    };
    let mut hf = Holdfast::start_with(&ns, sandbox, &opts)?;
    hf.wait_running("speaker", T)?;
    wait_for("the line in the ring", T, || {
        hf.cli_ok(&["logs", "speaker"])
            .ok()?
            .contains("hello journal")
            .then_some(())
    })?;
    receiver.set_nonblocking(true)?;
    ensure!(
        receiver.recv(&mut buf).is_err(),
        "--journal off, yet a datagram came"
    );
    let m: Value = serde_json::from_str(&hf.cli_ok(&["metrics", "--json"])?)?;
    ensure!(m["journal"].is_null(), "{}", m["journal"]);
    hf.stop()?;
    let log = hf.log();
    ensure!(
        log.contains("hello journal"),
        "not in holdfast's log:\n{log}"
    );
    Ok(())
}

/// The fields of a native journal datagram (`KEY=value` lines; the
/// length-prefixed form is not expected here).
fn journal_fields(d: &[u8]) -> Result<std::collections::BTreeMap<String, String>> {
    let text = std::str::from_utf8(d)?;
    text.lines()
        .map(|l| {
            l.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("not KEY=value: {l:?} in {text:?}"))
        })
        .collect()
}

/// A systemd-journald of the test's own: journald's namespace feature gives
/// it its own socket (`/run/systemd/journal.NS/socket`) and files
/// (`/var/log/journal/<machine-id>.NS`), read back with `journalctl
/// --namespace NS`. Stopped, and its files removed, on drop.
struct Journald {
    child: std::process::Child,
    namespace: String,
}

const JOURNALD: &str = "/lib/systemd/systemd-journald";

impl Journald {
    fn start() -> Result<Journald> {
        let namespace = format!("hftest{}", std::process::id());
        let child = Command::new(JOURNALD)
            .arg(&namespace)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawn systemd-journald")?;
        let j = Journald { child, namespace };
        let socket = j.socket();
        wait_for("journald's socket", T, || socket.exists().then_some(()))?;
        Ok(j)
    }

    fn socket(&self) -> std::path::PathBuf {
        Path::new(&format!("/run/systemd/journal.{}", self.namespace)).join("socket")
    }

    /// Its entries matching `matches` (`FIELD=value`), as JSON objects.
    fn entries(&self, matches: &[&str]) -> Result<Vec<Value>> {
        let mut journalctl = Command::new("journalctl");
        journalctl
            .args(["--namespace", &self.namespace, "-o", "json", "--no-pager"])
            .args(matches);
        let out = run_ok(journalctl, T)?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).with_context(|| format!("journalctl printed {l:?}")))
            .collect()
    }
}

impl Drop for Journald {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(format!("/run/systemd/journal.{}", self.namespace));
        if let Ok(id) = std::fs::read_to_string("/etc/machine-id") {
            let _ = std::fs::remove_dir_all(format!(
                "/var/log/journal/{}.{}",
                id.trim(),
                self.namespace
            ));
        }
    }
}

/// The real systemd-journald takes holdfast's datagrams: `journalctl` finds
/// each line by its service with the stream, pid and priority holdfast gave
/// it (and `_PID`, journald's own, is holdfast's: why `HOLDFAST_PID` exists).
#[test]
fn lines_reach_a_real_systemd_journald() -> Result<()> {
    let (ns, sandbox) = skip_unless!(netns_and_sandbox_with_tools(&[JOURNALD])?);
    let journald = Journald::start()?;
    let script = "echo 'to the journal'; echo '<4>careful' >&2; exec sleep 1000";
    sandbox.write_sh_unit("scribe", script)?;
    let opts = RunOptions {
        args: vec![
            "--journal-socket".into(),
            journald.socket().display().to_string(),
        ],
        ..RunOptions::default()
    };
    let mut hf = Holdfast::start_with(&ns, sandbox, &opts)?;
    let pid = hf.wait_running("scribe", T)?.to_string();
    let entries = wait_for("two entries in the journal", T, || {
        let e = journald.entries(&["HOLDFAST_UNIT=scribe"]).ok()?;
        (e.len() == 2).then_some(e)
    })?;
    let by_stream = |s: &str| {
        entries
            .iter()
            .find(|e| e["HOLDFAST_STREAM"] == s)
            .with_context(|| format!("no {s} entry in {entries:?}"))
    };
    let (out, err) = (by_stream("stdout")?, by_stream("stderr")?);
    for (e, message, priority) in [(out, "to the journal", "6"), (err, "careful", "4")] {
        ensure!(e["MESSAGE"] == message, "{e}");
        ensure!(e["PRIORITY"] == priority, "{e}");
        ensure!(e["SYSLOG_IDENTIFIER"] == "scribe", "{e}");
        ensure!(e["HOLDFAST_PID"] == pid.as_str(), "{e}");
        ensure!(e["SYSLOG_PID"] == pid.as_str(), "{e}");
        ensure!(e["_TRANSPORT"] == "journal", "{e}");
        ensure!(e["_PID"] == hf.pid().to_string().as_str(), "{e}");
    }
    // As a user asks for a service's errors.
    let errors = journald.entries(&["SYSLOG_IDENTIFIER=scribe", "PRIORITY=4"])?;
    ensure!(errors.len() == 1, "{errors:?}");
    hf.stop()
}

/// A per-connection instance (`accept = true`) has no main pid; each of its
/// lines (stderr: stdout is the connection) names the instance that wrote it.
#[test]
fn a_per_connection_instance_s_lines_carry_its_own_pid() -> Result<()> {
    let (ns, sandbox) = skip_unless!(netns_and_sandbox()?);
    let exec = holdfast_testkit::toml_array(&[
        "/bin/sh",
        "-c",
        "echo \"instance $$\" >&2; read x; echo \"$x\"",
    ]);
    sandbox.write_unit(
        "greeter",
        &format!(
            "[service]\nexec = {exec}\n\n[[socket]]\nprotocol = \"tcp\"\naddresses = [\"127.0.0.1/32\"]\nports = [\"7070\"]\naccept = true\n"
        ),
    )?;
    let mut hf = Holdfast::start_in(&ns, sandbox)?;
    hf.wait_state("greeter", "listening", T)?;
    {
        let _inside = ns.enter()?;
        for k in 0..2 {
            let mut c = TcpStream::connect("127.0.0.1:7070")?;
            c.set_read_timeout(Some(T))?;
            writeln!(c, "hello {k}")?;
            let mut answer = String::new();
            BufReader::new(&c).read_line(&mut answer)?;
            ensure!(answer == format!("hello {k}\n"), "{answer:?}");
        }
    }
    let lines = wait_for("both instances' lines", T, || {
        let l = json_logs(&hf, &["greeter"]).ok()?;
        (l.len() == 2).then_some(l)
    })?;
    let mut pids = BTreeSet::new();
    for l in &lines {
        let said: i64 = l["line"]
            .as_str()
            .and_then(|t| t.strip_prefix("instance "))
            .and_then(|p| p.parse().ok())
            .with_context(|| format!("{l}"))?;
        ensure!(l["pid"] == said && l["stream"] == "stderr", "{l}");
        pids.insert(said);
    }
    ensure!(pids.len() == 2, "one pid for two instances: {lines:?}");
    hf.stop()
}
