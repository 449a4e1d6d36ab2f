//! `cargo xtask bench`: runs a list of benchmark steps and prints one table. Each step is a
//! subcommand of `holdfast-bench` (the bench crate, `bench/`), which prints its rows as JSON
//! lines: a value and, where it has one, a baseline measured in the same run (these machines are
//! shared and noisy, so only ratios mean much). To add a benchmark, add a subcommand there and
//! list it in `STEPS`.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::io::{BufRead as _, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::shell::{self, Workspace};

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
    pub fn new(name: impl Into<String>, value: f64, baseline: Option<f64>, unit: &str) -> Self {
        let ratio = baseline.filter(|b| *b != 0.0).map(|b| value / b);
        Row {
            name: name.into(),
            value,
            baseline,
            ratio,
            unit: unit.to_string(),
        }
    }
}

/// What every step gets: where the release binaries are, and how to call `holdfast-bench`.
pub struct Bench<'a> {
    pub ws: &'a Workspace,
    pub bin_dir: PathBuf,
    /// `--quick` for every step.
    pub quick: bool,
    /// Options after `--`, for the one step chosen with `--only`.
    pub args: &'a [OsString],
}

/// Every benchmark, in the order they run: `holdfast-bench` subcommands. `--only NAME` picks some.
pub const STEPS: &[&str] = &[
    "lookup", "connect", "udp", "setup", "restarts", "reload", "rss", "scale", "upgrade", "inetd",
];

/// Every name in `only` is a step (checked before anything is built).
pub fn check_steps(only: &[String]) -> Result<()> {
    for name in only {
        if !STEPS.contains(&name.as_str()) {
            bail!(
                "no benchmark step {name:?}; the steps are {}",
                STEPS.join(", ")
            );
        }
    }
    Ok(())
}

/// Runs the chosen steps (all when `only` is empty) and prints the table (or JSON lines).
/// Returns whether every step that ran succeeded.
pub fn run(bench: &Bench, only: &[String], json: bool) -> Result<bool> {
    check_steps(only)?;
    if !bench.args.is_empty() && only.len() != 1 {
        bail!("options after `--` are for one step: name it with --only");
    }
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    let mut ok = true;
    for name in STEPS {
        if !only.is_empty() && !only.iter().any(|o| o == name) {
            continue;
        }
        eprintln!("bench: {name}");
        let start = std::time::Instant::now();
        match step(bench, name) {
            Ok(Output::Rows(r)) => rows.extend(r),
            Ok(Output::Skipped(why)) => notes.push(format!("{name}: skipped: {why}")),
            Err(e) => {
                ok = false;
                notes.push(format!("{name}: FAILED: {e:#}"));
            }
        }
        eprintln!("bench: {name} took {:.1}s", start.elapsed().as_secs_f64());
    }
    if json {
        for row in &rows {
            println!("{}", row_json(row));
        }
    } else {
        print!("{}", table(&rows));
    }
    for note in &notes {
        eprintln!("bench: {note}");
    }
    Ok(ok)
}

fn row_json(row: &Row) -> serde_json::Value {
    serde_json::json!({
        "name": row.name,
        "value": row.value,
        "baseline": row.baseline,
        "ratio": row.ratio,
        "unit": row.unit,
    })
}

/// A number in a width of about eight: enough digits to compare, no false precision.
fn fmt_num(x: f64) -> String {
    let a = x.abs();
    if a == 0.0 {
        "0".to_string()
    } else if a >= 1e7 {
        format!("{x:.3e}")
    } else if a >= 100.0 {
        format!("{x:.0}")
    } else if a >= 1.0 {
        format!("{x:.2}")
    } else if a >= 0.001 {
        format!("{x:.4}")
    } else {
        format!("{x:.3e}")
    }
}

fn table(rows: &[Row]) -> String {
    let header = ["benchmark", "value", "baseline", "ratio", "unit"];
    let cells: Vec<[String; 5]> = rows
        .iter()
        .map(|r| {
            [
                r.name.clone(),
                fmt_num(r.value),
                r.baseline.map_or("-".into(), fmt_num),
                r.ratio.map_or("-".into(), |x| format!("{x:.3}")),
                r.unit.clone(),
            ]
        })
        .collect();
    let mut width = header.map(str::len);
    for row in &cells {
        for (w, c) in width.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cols: [&str; 5]| {
        // Name and unit left-aligned, figures right-aligned.
        let _ = writeln!(
            out,
            "{:<w0$}  {:>w1$}  {:>w2$}  {:>w3$}  {}",
            cols[0],
            cols[1],
            cols[2],
            cols[3],
            cols[4],
            w0 = width[0],
            w1 = width[1],
            w2 = width[2],
            w3 = width[3],
        );
    };
    line(header);
    for row in &cells {
        line([&row[0], &row[1], &row[2], &row[3], &row[4]]);
    }
    if rows.is_empty() {
        out.push_str("(no figures)\n");
    }
    out
}

/// What a step printed: rows, or why it could not run here.
#[derive(Debug, PartialEq)]
enum Output {
    Rows(Vec<Row>),
    Skipped(String),
}

/// One JSON line of `holdfast-bench`: a row `{"name", "value", "baseline", "ratio", "unit"}`
/// (baseline and ratio optional, may be null), or `{"skipped": why}`.
fn parse_line(line: &str) -> Result<std::result::Result<Row, String>> {
    let v: serde_json::Value = serde_json::from_str(line)?;
    if let Some(why) = v["skipped"].as_str() {
        return Ok(Err(why.to_string()));
    }
    let name = v["name"].as_str().context("no \"name\"")?;
    let value = v["value"].as_f64().context("no numeric \"value\"")?;
    let baseline = v["baseline"].as_f64();
    let unit = v["unit"].as_str().unwrap_or("");
    let mut row = Row::new(name, value, baseline, unit);
    if let Some(ratio) = v["ratio"].as_f64() {
        row.ratio = Some(ratio);
    }
    Ok(Ok(row))
}

/// `holdfast-bench [--quick] STEP [ARGS]`: its JSON lines on stdout become rows; any other
/// stdout line is shown as progress; its stderr goes straight to the terminal.
fn step(b: &Bench, name: &str) -> Result<Output> {
    let exe = b.bin_dir.join("holdfast-bench");
    let mut cmd = Command::new(&exe);
    cmd.arg("--bin-dir").arg(&b.bin_dir);
    if b.quick {
        cmd.arg("--quick");
    }
    cmd.arg(name)
        .args(b.args)
        .current_dir(&b.ws.root)
        .env("PATH", b.ws.path_with(&b.bin_dir)?)
        .stdout(Stdio::piped());
    eprintln!("xtask: $ {}", shell::display(&cmd));
    let mut child = cmd
        .spawn()
        .with_context(|| format!("start {}", exe.display()))?;
    let stdout = child.stdout.take().context("holdfast-bench stdout")?;
    let mut rows = Vec::new();
    let mut skipped = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.context("read holdfast-bench stdout")?;
        if !line.trim_start().starts_with('{') {
            eprintln!("holdfast-bench: {line}");
            continue;
        }
        match parse_line(&line).with_context(|| format!("holdfast-bench printed {line:?}"))? {
            Ok(row) => rows.push(row),
            Err(why) => skipped = Some(why),
        }
    }
    let status = child.wait().context("wait for holdfast-bench")?;
    if !status.success() {
        bail!("holdfast-bench {name} failed ({status})");
    }
    Ok(match skipped {
        Some(why) => Output::Skipped(why),
        None => Output::Rows(rows),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_become_rows() {
        let row = |line: &str| parse_line(line).unwrap().unwrap();
        let r = row(r#"{"name":"lookup 1M","value":42.0,"baseline":40,"unit":"ns"}"#);
        assert_eq!(r, Row::new("lookup 1M", 42.0, Some(40.0), "ns"));
        assert_eq!(r.ratio, Some(1.05));
        let no_base = row(r#"{"name":"x","value":1,"baseline":null,"unit":"s"}"#);
        assert_eq!((no_base.baseline, no_base.ratio), (None, None));
        assert_eq!(
            row(r#"{"name":"x","value":1,"ratio":0.5}"#).ratio,
            Some(0.5)
        );
        assert_eq!(
            parse_line(r#"{"skipped":"needs root"}"#).unwrap(),
            Err("needs root".to_string())
        );
        assert!(parse_line(r#"{"value":1}"#).is_err());
        assert!(parse_line(r#"{"name":"x","value":"fast"}"#).is_err());
        assert!(parse_line("{not json").is_err());
    }

    #[test]
    fn unknown_steps_are_refused() {
        assert!(check_steps(&["lookup".to_string()]).is_ok());
        let err = check_steps(&["nope".to_string()]).unwrap_err().to_string();
        assert!(err.contains("restarts"), "{err}");
    }

    #[test]
    fn a_zero_baseline_has_no_ratio() {
        assert_eq!(Row::new("x", 1.0, Some(0.0), "s").ratio, None);
    }

    #[test]
    fn numbers_keep_a_readable_precision() {
        let cases = [
            (0.0, "0"),
            (123_456.7, "123457"),
            (12.345, "12.35"),
            (0.012_34, "0.0123"),
            (1.5e-5, "1.500e-5"),
            (2.5e9, "2.500e9"),
        ];
        for (x, want) in cases {
            assert_eq!(fmt_num(x), want, "{x}");
        }
    }

    #[test]
    fn the_table_aligns_its_columns() {
        let rows = [
            Row::new("a", 1.0, Some(2.0), "ns"),
            Row::new("longer name", 1000.0, None, "conn/s"),
        ];
        let want = "\
benchmark    value  baseline  ratio  unit
a             1.00      2.00  0.500  ns
longer name   1000         -      -  conn/s
";
        assert_eq!(table(&rows), want);
        assert!(table(&[]).ends_with("(no figures)\n"));
    }
}
