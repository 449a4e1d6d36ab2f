//! What every step shares: the row contract between a step and `table` (one
//! JSON object per line on stdout: `{"name", "value", "baseline", "ratio",
//! "unit"}`, or `{"skipped": why}`), where the built binaries are, and small
//! helpers for the programs and daemons a step drives.

use std::env;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use holdfast_testkit::{Holdfast, Netns, RunOptions, Sandbox};
use serde_json::json;

/// One line of the table.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub name: String,
    pub value: f64,
    pub baseline: Option<f64>,
    /// value ÷ baseline unless the step says otherwise.
    pub ratio: Option<f64>,
    pub unit: String,
}

impl Row {
    pub fn new(name: impl Into<String>, value: f64, baseline: Option<f64>, unit: &str) -> Row {
        let ratio = baseline.filter(|b| *b != 0.0).map(|b| value / b);
        Row {
            name: name.into(),
            value,
            baseline,
            ratio,
            unit: unit.to_string(),
        }
    }

    /// A row whose ratio is not value ÷ baseline (a ratio of ratios, a median of ratios).
    pub fn with_ratio(mut self, ratio: f64) -> Row {
        self.ratio = Some(ratio);
        self
    }

    /// Prints the row as the JSON line [`parse_line`] reads.
    pub fn print(&self) {
        println!(
            "{}",
            json!({"name": self.name, "value": self.value, "baseline": self.baseline,
                   "ratio": self.ratio, "unit": self.unit})
        );
    }
}

/// One JSON line of a step.
#[derive(Debug, PartialEq)]
pub enum Line {
    Row(Row),
    /// `{"skipped": why}`: the step cannot run here.
    Skipped(String),
}

/// Reads a line [`Row::print`] (or a skipped step) printed; baseline and ratio
/// may be missing or null.
pub fn parse_line(line: &str) -> Result<Line> {
    let v: serde_json::Value = serde_json::from_str(line)?;
    if let Some(why) = v["skipped"].as_str() {
        return Ok(Line::Skipped(why.to_string()));
    }
    let name = v["name"].as_str().context("no \"name\"")?;
    let value = v["value"].as_f64().context("no numeric \"value\"")?;
    let row = Row::new(
        name,
        value,
        v["baseline"].as_f64(),
        v["unit"].as_str().unwrap_or(""),
    );
    Ok(Line::Row(match v["ratio"].as_f64() {
        Some(ratio) => row.with_ratio(ratio),
        None => row,
    }))
}

/// A step that cannot run here (no root outside CI): reported, not a failure.
#[derive(Debug)]
pub struct Skip(pub String);

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Skip {}

/// Fails (under `CI=true`) or skips (elsewhere) unless this process is root.
pub fn need_root(why: &str) -> Result<()> {
    if nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    let why = format!("needs root ({why})");
    if holdfast_testkit::in_ci() {
        bail!("{why}; CI=true: not skipped");
    }
    Err(Skip(why).into())
}

/// Where the step finds what it runs.
#[derive(Debug, Clone)]
pub struct Env {
    /// target/release: holdfast, hello-http, echo.
    pub bin_dir: PathBuf,
}

/// The daemon in `ns` with the dispatcher, on `sandbox`'s units, logging warnings only.
pub fn daemon(ns: &Netns, sandbox: Sandbox) -> Result<Holdfast> {
    let opts = RunOptions {
        dispatcher: true,
        env: vec![("RUST_LOG".into(), "warn".into())],
        ..RunOptions::default()
    };
    Holdfast::start_with(ns, sandbox, &opts)
}

/// `command -v NAME`, also looking in the sbin directories a non-login root shell may lack.
pub fn find_command(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let path = env::var_os("PATH").unwrap_or_default();
    env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// "1", "1k", "100k", "1M".
pub fn count(n: usize) -> String {
    match n {
        n if n >= 1_000_000 && n % 1_000_000 == 0 => format!("{}M", n / 1_000_000),
        n if n >= 1_000 && n % 1_000 == 0 => format!("{}k", n / 1_000),
        n => n.to_string(),
    }
}

/// `n ÷ d`, or 0 when `d` is (a rate over no time, a mean of nothing).
pub fn per(n: f64, d: f64) -> f64 {
    if d > 0.0 {
        n / d
    } else {
        0.0
    }
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// xorshift64*, seeded from the clock: spreads the benchmark's addresses.
pub struct Rng(u64);

impl Rng {
    pub fn new() -> Rng {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Rng(t.as_nanos() as u64 | 1)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_zero_baseline_has_no_ratio() {
        assert_eq!(Row::new("x", 1.0, Some(0.0), "s").ratio, None);
        assert_eq!(Row::new("x", 1.0, Some(4.0), "s").ratio, Some(0.25));
        assert_eq!(
            Row::new("x", 1.0, None, "s").with_ratio(2.0).ratio,
            Some(2.0)
        );
    }

    #[test]
    fn json_lines_become_rows() {
        let row = |line: &str| match parse_line(line).unwrap() {
            Line::Row(r) => r,
            other => panic!("{other:?}"),
        };
        let r = row(r#"{"name":"lookup 1M","value":42.0,"baseline":40,"unit":"ns"}"#);
        assert_eq!(r, Row::new("lookup 1M", 42.0, Some(40.0), "ns"));
        assert_eq!(r.ratio, Some(1.05));
        let no_base = row(r#"{"name":"x","value":1,"baseline":null,"unit":"s"}"#);
        assert_eq!((no_base.baseline, no_base.ratio), (None, None));
        let ratio = row(r#"{"name":"x","value":1,"ratio":0.5}"#).ratio;
        assert_eq!(ratio, Some(0.5));
        let skipped = parse_line(r#"{"skipped":"needs root"}"#).unwrap();
        assert_eq!(skipped, Line::Skipped("needs root".to_string()));
        assert!(parse_line(r#"{"value":1}"#).is_err());
        assert!(parse_line(r#"{"name":"x","value":"fast"}"#).is_err());
        assert!(parse_line("{not json").is_err());
    }

    #[test]
    fn counts_read_as_people_write_them() {
        assert_eq!(
            [1, 1000, 100_000, 1_000_000, 1500].map(count),
            ["1", "1k", "100k", "1M", "1500"]
        );
    }
}
