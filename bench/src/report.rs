//! What every step shares: the row contract with `cargo xtask bench` (one JSON
//! object per line on stdout: `{"name", "value", "baseline", "ratio", "unit"}`,
//! or `{"skipped": why}`), where the built binaries and the workspace are, and
//! small helpers for running the programs a step drives.

use std::env;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{bail, Context, Result};
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

    /// Prints the row as the JSON line `cargo xtask bench` reads.
    pub fn print(&self) {
        println!(
            "{}",
            json!({"name": self.name, "value": self.value, "baseline": self.baseline,
                   "ratio": self.ratio, "unit": self.unit})
        );
    }
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
    if is_root() {
        return Ok(());
    }
    let why = format!("needs root ({why})");
    if in_ci() {
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

/// `CI=true` (or `1`): set-up that cannot be done is an error, never a skip.
pub fn in_ci() -> bool {
    env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
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

/// The command as a user would type it.
pub fn display(cmd: &Command) -> String {
    let mut line = Path::new(cmd.get_program()).display().to_string();
    for arg in cmd.get_args() {
        let arg = arg.to_string_lossy();
        if arg.is_empty() || arg.contains([' ', '"', '\'']) {
            let _ = write!(line, " '{arg}'");
        } else {
            let _ = write!(line, " {arg}");
        }
    }
    line
}

/// Runs with output captured, shown only when the command fails.
pub fn run_quiet(cmd: &mut Command) -> Result<Output> {
    let line = display(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start `{line}`"))?;
    if !out.status.success() {
        bail!(
            "`{line}` failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// "1", "1k", "100k", "1M".
pub fn count(n: usize) -> String {
    match n {
        n if n >= 1_000_000 && n % 1_000_000 == 0 => format!("{}M", n / 1_000_000),
        n if n >= 1_000 && n % 1_000 == 0 => format!("{}k", n / 1_000),
        n => n.to_string(),
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
    fn counts_read_as_people_write_them() {
        assert_eq!(
            [1, 1000, 100_000, 1_000_000, 1500].map(count),
            ["1", "1k", "100k", "1M", "1500"]
        );
    }
}
