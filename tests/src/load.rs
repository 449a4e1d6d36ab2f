//! Load for the restart tests and `holdfast-bench restarts`: the real `wrk` (Debian's,
//! installed by `cargo xtask bootstrap`) run in a network namespace with [`WrkArgs`],
//! its output parsed into [`WrkReport`]. The bench spawns wrk itself (it stops a run
//! with SIGINT); the tests call [`wrk`].

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::{run_bounded, Netns, Sandbox};

/// A wrk script whose `done` adds a line wrk's summary lacks: every response whose
/// status is not 2xx (wrk itself counts only those over 399), and the error
/// counters as numbers.
const WRK_LUA: &str = r#"
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) responses = 0; non2xx = 0 end
function response(status, headers, body)
  responses = responses + 1
  if status < 200 or status > 299 then non2xx = non2xx + 1 end
end
function done(summary, latency, requests)
  local r, n = 0, 0
  for _, t in ipairs(threads) do r = r + t:get("responses"); n = n + t:get("non2xx") end
  local e = summary.errors
  io.write(string.format(
    "holdfast-test: requests %d responses %d non2xx %d connect %d read %d write %d timeout %d status %d\n",
    summary.requests, r, n, e.connect, e.read, e.write, e.timeout, e.status))
end
"#;

/// wrk's threads (the machines have two cores).
const THREADS: u32 = 2;

/// The arguments of one wrk run: `-t2 -cCONNECTIONS -dDURATION --latency --timeout
/// TIMEOUT -s SCRIPT [-H HEADER] URL`, the script being [`WRK_LUA`]'s, whose line
/// [`WrkReport::parse`] needs.
#[derive(Debug, Clone, Copy)]
pub struct WrkArgs<'a> {
    pub url: &'a str,
    pub connections: u32,
    /// wrk's `-d`, in whole seconds (rounded down).
    pub duration: Duration,
    /// wrk counts a request slower than this as a timeout error (whole seconds).
    pub timeout: Duration,
    /// One `-H` header, such as `Connection: close`.
    pub header: Option<&'a str>,
}

impl WrkArgs<'_> {
    /// Adds the arguments to `cmd` (wrk, or a wrapper ending in it such as `ip netns
    /// exec NS wrk`), writing the report script into `dir` unless it is there.
    pub fn add_to(&self, cmd: &mut Command, dir: &Path) -> Result<()> {
        let script = dir.join("report.lua");
        if !script.exists() {
            std::fs::write(&script, WRK_LUA)
                .with_context(|| format!("write the wrk script {}", script.display()))?;
        }
        cmd.arg(format!("-t{THREADS}"))
            .arg(format!("-c{}", self.connections))
            .arg(format!("-d{}s", self.duration.as_secs()))
            .arg("--latency")
            .arg("--timeout")
            .arg(format!("{}s", self.timeout.as_secs()))
            .arg("-s")
            .arg(&script);
        if let Some(h) = self.header {
            cmd.arg("-H").arg(h);
        }
        cmd.arg(self.url);
        Ok(())
    }
}

/// What one wrk run saw (latencies in milliseconds).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WrkReport {
    /// From "N requests in …" (wrk's summary).
    pub requests: u64,
    /// How long wrk ran, from the same line.
    pub seconds: f64,
    /// Responses seen by the script, and those among them that were not 2xx.
    pub responses: u64,
    pub non_2xx: u64,
    /// wrk's "Socket errors: connect …, read …, write …, timeout …" (0 when absent).
    pub connect: u64,
    pub read: u64,
    pub write: u64,
    pub timeout: u64,
    /// The 50% and 99% lines of wrk's latency distribution (`--latency`).
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// The whole output, for messages.
    pub text: String,
}

impl WrkReport {
    /// Socket errors of every kind.
    pub fn socket_errors(&self) -> u64 {
        self.connect + self.read + self.write + self.timeout
    }

    /// Requests per second.
    pub fn rate(&self) -> f64 {
        if self.seconds > 0.0 {
            self.requests as f64 / self.seconds
        } else {
            0.0
        }
    }

    /// Parses wrk's output (run with [`WrkArgs`]: `--latency` and `WRK_LUA`'s line).
    /// The "Socket errors" line and the script's line must agree.
    pub fn parse(text: &str) -> Result<WrkReport> {
        let mut r = WrkReport {
            text: text.to_owned(),
            ..WrkReport::default()
        };
        let number = |s: &str| -> Result<u64> {
            s.trim_matches(|c: char| !c.is_ascii_digit())
                .parse()
                .with_context(|| format!("{s:?} in wrk's output:\n{text}"))
        };
        let time =
            |s: &str| parse_time_ms(s.trim()).with_context(|| format!("wrk's output:\n{text}"));
        let mut script = None;
        let (mut saw_requests, mut p50, mut p99) = (false, None, None);
        for line in text.lines().map(str::trim) {
            if let Some((n, rest)) = line.split_once(" requests in ") {
                r.requests = number(n)?;
                r.seconds = time(rest.split(',').next().unwrap_or_default())? / 1000.0;
                saw_requests = true;
            } else if let Some(rest) = line.strip_prefix("50%") {
                p50 = Some(time(rest)?);
            } else if let Some(rest) = line.strip_prefix("99%") {
                p99 = Some(time(rest)?);
            } else if let Some(rest) = line.strip_prefix("Socket errors:") {
                for part in rest.split(',') {
                    let (kind, n) = part
                        .trim()
                        .split_once(' ')
                        .with_context(|| format!("socket errors {rest:?}"))?;
                    let n = number(n)?;
                    match kind {
                        "connect" => r.connect = n,
                        "read" => r.read = n,
                        "write" => r.write = n,
                        "timeout" => r.timeout = n,
                        _ => bail!("unknown socket error kind {kind:?} in wrk's output:\n{text}"),
                    }
                }
            } else if let Some(rest) = line.strip_prefix("holdfast-test:") {
                let words: Vec<&str> = rest.split_whitespace().collect();
                let mut fields = std::collections::BTreeMap::new();
                for pair in words.chunks(2) {
                    if let [k, v] = pair {
                        fields.insert(*k, number(v)?);
                    }
                }
                script = Some(fields);
            }
        }
        let Some(fields) = script else {
            bail!("wrk printed no summary line from its script:\n{text}");
        };
        if !saw_requests {
            bail!("wrk printed no \"requests in\" line:\n{text}");
        }
        let (Some(p50), Some(p99)) = (p50, p99) else {
            bail!("no 50%/99% latency lines (was --latency given?) in wrk's output:\n{text}");
        };
        (r.p50_ms, r.p99_ms) = (p50, p99);
        r.responses = fields.get("responses").copied().unwrap_or(0);
        r.non_2xx = fields.get("non2xx").copied().unwrap_or(0);
        let agree = [
            ("requests", r.requests),
            ("connect", r.connect),
            ("read", r.read),
            ("write", r.write),
            ("timeout", r.timeout),
        ];
        for (k, v) in agree {
            if fields.get(k) != Some(&v) {
                bail!(
                    "wrk's summary says {k} {v}, its script {:?}:\n{text}",
                    fields.get(k)
                );
            }
        }
        Ok(r)
    }
}

/// A wrk time such as "278.00us", "5.93ms", "1.02s", "1.50m", in milliseconds.
fn parse_time_ms(s: &str) -> Result<f64> {
    let split = s
        .find(|c: char| c.is_ascii_alphabetic())
        .with_context(|| format!("time {s:?} has no unit"))?;
    let (num, unit) = s.split_at(split);
    let n: f64 = num.trim().parse().with_context(|| format!("time {s:?}"))?;
    let per_ms = match unit {
        "us" => 0.001,
        "ms" => 1.0,
        "s" => 1000.0,
        "m" => 60_000.0,
        "h" => 3_600_000.0,
        _ => bail!("time {s:?}: unknown unit {unit:?}"),
    };
    Ok(n * per_ms)
}

/// Runs wrk with `args` inside `ns` and parses its report. wrk's own timeout counts
/// as a socket error.
pub fn wrk(ns: &Netns, sandbox: &Sandbox, args: WrkArgs) -> Result<WrkReport> {
    let mut cmd = Command::new("wrk");
    args.add_to(&mut cmd, sandbox.path())?;
    // The child inherits the network namespace of the thread that forks it.
    let out: Output = ns.run(|| run_bounded(cmd, args.duration + Duration::from_secs(20)))??;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "wrk exited with {}: {}{text}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    WrkReport::parse(&text)
}

#[cfg(test)]
mod tests {
    use super::*;

    const QUIET: &str = "\
Running 10s test @ http://192.0.2.1:8081/
  2 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    22.02ms   35.63ms 275.12ms   86.69%
    Req/Sec     1.94k     2.21k    6.29k    74.05%
  Latency Distribution
     50%    5.93ms
     75%   19.89ms
     90%   72.60ms
     99%  161.94ms
  31418 requests in 10.05s, 5.33MB read
Requests/sec:   3127.32
Transfer/sec:    543.62KB
holdfast-test: requests 31418 responses 31418 non2xx 0 connect 0 read 0 write 0 timeout 0 status 0
";

    const NOISY: &str = "\
Running 10s test @ http://192.0.2.3:9090/
  2 threads and 50 connections
  Latency Distribution
     50%  278.00us
     75%  761.00us
     90%    2.23ms
     99%    1.50s
  170802 requests in 10.09s, 26.39MB read
  Socket errors: connect 1234, read 308, write 2, timeout 7
  Non-2xx or 3xx responses: 5
Requests/sec:  16926.86
holdfast-test: requests 170802 responses 170795 non2xx 6 connect 1234 read 308 write 2 timeout 7 status 5
";

    #[test]
    fn wrk_output_without_errors_means_zero_errors() {
        let r = WrkReport::parse(QUIET).unwrap();
        assert_eq!(
            r,
            WrkReport {
                requests: 31418,
                responses: 31418,
                seconds: 10.05,
                p50_ms: 5.93,
                p99_ms: 161.94,
                text: QUIET.into(),
                ..WrkReport::default()
            }
        );
        assert_eq!(r.socket_errors(), 0);
    }

    #[test]
    fn wrk_errors_and_latency_units_are_read() {
        let r = WrkReport::parse(NOISY).unwrap();
        assert_eq!(
            (r.requests, r.connect, r.read, r.write, r.timeout),
            (170802, 1234, 308, 2, 7)
        );
        // The script's count, which takes in 1xx and 3xx too, not wrk's "Non-2xx or 3xx".
        assert_eq!((r.responses, r.non_2xx), (170795, 6));
        assert!((r.p50_ms - 0.278).abs() < 1e-9, "{}", r.p50_ms);
        assert!((r.p99_ms - 1500.0).abs() < 1e-9, "{}", r.p99_ms);
        assert_eq!(r.socket_errors(), 1551);
        assert!((r.seconds - 10.09).abs() < 1e-9);
        let stopped = NOISY.replace("in 10.09s", "in 1.50m");
        assert!((WrkReport::parse(&stopped).unwrap().seconds - 90.0).abs() < 1e-9);
    }

    #[test]
    fn wrk_output_missing_or_disagreeing_figures_is_an_error() {
        let without = |what: &str| -> String {
            QUIET
                .lines()
                .filter(|l| !l.contains(what))
                .collect::<Vec<_>>()
                .join("\n")
        };
        // No latency lines, no "requests in" line, no script line.
        for missing in ["%", " requests in ", "holdfast-test:"] {
            assert!(WrkReport::parse(&without(missing)).is_err(), "{missing}");
        }
        assert!(
            WrkReport::parse("unable to connect to 192.0.2.1:8080 Connection refused").is_err()
        );
        assert!(WrkReport::parse(&NOISY.replace("read 308,", "read many,")).is_err());
        // The two views disagree.
        assert!(WrkReport::parse(&NOISY.replace("read 308,", "read 5,")).is_err());
    }

    #[test]
    fn times_convert_to_milliseconds() {
        for (s, ms) in [
            ("5.93ms", 5.93),
            ("278.00us", 0.278),
            ("1.02s", 1020.0),
            ("2.00m", 120_000.0),
        ] {
            assert!((parse_time_ms(s).unwrap() - ms).abs() < 1e-9, "{s}");
        }
        assert!(parse_time_ms("12").is_err());
        assert!(parse_time_ms("12parsecs").is_err());
    }

    #[test]
    fn wrk_args_name_the_script_and_the_header() {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new("wrk");
        WrkArgs {
            url: "http://192.0.2.1:8080/",
            connections: 50,
            duration: Duration::from_secs(5),
            timeout: Duration::from_secs(10),
            header: Some("Connection: close"),
        }
        .add_to(&mut cmd, dir.path())
        .unwrap();
        let script = dir.path().join("report.lua");
        assert_eq!(std::fs::read_to_string(&script).unwrap(), WRK_LUA);
        let args: Vec<_> = cmd.get_args().map(|a| a.to_string_lossy()).collect();
        let script = script.to_string_lossy();
        assert_eq!(
            args,
            [
                "-t2",
                "-c50",
                "-d5s",
                "--latency",
                "--timeout",
                "10s",
                "-s",
                &script,
                "-H",
                "Connection: close",
                "http://192.0.2.1:8080/"
            ]
        );
    }
}
