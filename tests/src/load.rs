//! Load for the restart tests: the real `wrk` (Debian's, installed by `cargo xtask
//! bootstrap`) run in a test's network namespace, its output parsed into [`WrkReport`].

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

/// What one wrk run saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WrkReport {
    /// From "N requests in …" (wrk's summary).
    pub requests: u64,
    /// Responses seen by the script, and those among them that were not 2xx.
    pub responses: u64,
    pub non_2xx: u64,
    /// wrk's "Socket errors: connect …, read …, write …, timeout …" (0 when absent).
    pub connect: u64,
    pub read: u64,
    pub write: u64,
    pub timeout: u64,
    /// The whole output, for messages.
    pub text: String,
}

impl WrkReport {
    /// Socket errors of every kind.
    pub fn socket_errors(&self) -> u64 {
        self.connect + self.read + self.write + self.timeout
    }

    /// Parses wrk's output (with `WRK_LUA`'s line). The "Socket errors" line
    /// and the script's line must agree.
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
        let mut script = None;
        for line in text.lines().map(str::trim) {
            if let Some((n, _)) = line.split_once(" requests in ") {
                r.requests = number(n)?;
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
        if r.requests == 0 && !text.contains(" requests in ") {
            bail!("wrk printed no \"requests in\" line:\n{text}");
        }
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

/// Runs `wrk -t2 -cCONNECTIONS -dDURATION --timeout TIMEOUT [-H HEADER] URL` inside
/// `ns` and parses its report. wrk's own timeout counts as a socket error.
pub fn wrk(
    ns: &Netns,
    sandbox: &Sandbox,
    url: &str,
    connections: u32,
    duration: Duration,
    timeout: Duration,
    header: Option<&str>,
) -> Result<WrkReport> {
    let script = sandbox.path().join("report.lua");
    if !script.exists() {
        std::fs::write(&script, WRK_LUA).context("write the wrk script")?;
    }
    let mut cmd = Command::new("wrk");
    cmd.arg("-t2")
        .arg(format!("-c{connections}"))
        .arg(format!("-d{}s", duration.as_secs()))
        .arg("--timeout")
        .arg(format!("{}s", timeout.as_secs()))
        .arg("-s")
        .arg(&script);
    if let Some(h) = header {
        cmd.arg("-H").arg(h);
    }
    cmd.arg(url);
    // The child inherits the network namespace of the thread that forks it.
    let out: Output = ns.run(|| run_bounded(cmd, duration + Duration::from_secs(20)))??;
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

    #[test]
    fn parses_wrk_output_with_and_without_errors() {
        let clean = "Running 5s test @ http://127.0.0.1:8080/\n  2 threads and 50 connections\n\
                     \x20 12345 requests in 5.00s, 1.23MB read\nRequests/sec:   2469.00\n\
                     holdfast-test: requests 12345 responses 12345 non2xx 0 connect 0 read 0 write 0 timeout 0 status 0\n";
        let r = WrkReport::parse(clean).unwrap();
        assert_eq!((r.requests, r.responses, r.non_2xx), (12345, 12345, 0));
        assert_eq!(r.socket_errors(), 0);

        let bad = "  100 requests in 5.00s, 1.23MB read\n  Socket errors: connect 3, read 2, write 1, timeout 4\n\
                   \x20 Non-2xx or 3xx responses: 7\n\
                   holdfast-test: requests 100 responses 97 non2xx 7 connect 3 read 2 write 1 timeout 4 status 7\n";
        let r = WrkReport::parse(bad).unwrap();
        assert_eq!((r.connect, r.read, r.write, r.timeout), (3, 2, 1, 4));
        assert_eq!((r.socket_errors(), r.non_2xx), (10, 7));

        // The two views disagree, or the script's line is missing: refused.
        let wrong = bad.replace("read 2, write", "read 5, write");
        assert!(WrkReport::parse(&wrong).is_err());
        assert!(WrkReport::parse("  100 requests in 5.00s, 1MB read\n").is_err());
    }
}
