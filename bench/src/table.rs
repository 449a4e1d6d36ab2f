//! `holdfast-bench table`: runs the steps (every subcommand but this one, in
//! their order; `--only STEP` picks some), each as a child `holdfast-bench
//! STEP` so that a step that fails or panics costs only its own rows, and
//! prints one table of their rows (`--json`: the rows as JSON lines). A step
//! that skips (no root outside CI) is named after the table; one that fails
//! makes the whole run fail once every step has run. `cargo xtask bench`
//! builds and calls it.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use clap::CommandFactory as _;

use crate::report::{parse_line, Env, Line, Row};

/// What `table` was asked for.
pub struct Options {
    pub only: Vec<String>,
    pub json: bool,
    /// Options after `--`, for the one step named with `--only`.
    pub args: Vec<OsString>,
}

/// Every step, in the order they run: the subcommands of `holdfast-bench`
/// but `table` itself.
fn steps() -> Vec<String> {
    crate::Cli::command()
        .get_subcommands()
        .map(|c| c.get_name().to_string())
        .filter(|name| name != "table")
        .collect()
}

/// The steps to run: all, or those named in `only` (each must be a step).
fn chosen(steps: &[String], opts: &Options) -> Result<Vec<String>> {
    if let Some(name) = opts.only.iter().find(|o| !steps.contains(o)) {
        bail!(
            "no benchmark step {name:?}; the steps are {}",
            steps.join(", ")
        );
    }
    if !opts.args.is_empty() && opts.only.len() != 1 {
        bail!("options after `--` are for one step: name it with --only");
    }
    Ok(steps
        .iter()
        .filter(|s| opts.only.is_empty() || opts.only.contains(s))
        .cloned()
        .collect())
}

/// Runs the chosen steps and prints the table (or JSON lines); fails when a step did.
pub fn run(env: &Env, quick: bool, opts: Options) -> Result<()> {
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    let mut failed = false;
    for name in chosen(&steps(), &opts)? {
        eprintln!("bench: {name}");
        let start = Instant::now();
        match step(env, quick, &name, &opts.args) {
            Ok((r, None)) => rows.extend(r),
            Ok((_, Some(why))) => notes.push(format!("{name}: skipped: {why}")),
            Err(e) => {
                failed = true;
                notes.push(format!("{name}: FAILED: {e:#}"));
            }
        }
        eprintln!("bench: {name} took {:.1}s", start.elapsed().as_secs_f64());
    }
    if opts.json {
        rows.iter().for_each(Row::print);
    } else {
        print!("{}", table(&rows));
    }
    for note in &notes {
        eprintln!("bench: {note}");
    }
    if failed {
        bail!("a benchmark step failed (see above)");
    }
    Ok(())
}

/// `holdfast-bench [--quick] STEP [ARGS]`: its JSON lines on stdout become rows
/// (or say why it skipped); any other stdout line is shown as progress; its
/// stderr goes straight to the terminal.
fn step(
    env: &Env,
    quick: bool,
    name: &str,
    args: &[OsString],
) -> Result<(Vec<Row>, Option<String>)> {
    let exe = std::env::current_exe().context("where holdfast-bench is")?;
    let mut cmd = Command::new(&exe);
    cmd.arg("--bin-dir").arg(&env.bin_dir);
    if quick {
        cmd.arg("--quick");
    }
    cmd.arg(name).args(args).stdout(Stdio::piped());
    eprintln!("bench: $ {cmd:?}");
    let mut child = cmd
        .spawn()
        .with_context(|| format!("start {}", exe.display()))?;
    let stdout = child.stdout.take().context("holdfast-bench stdout")?;
    let (mut rows, mut skipped) = (Vec::new(), None);
    for line in BufReader::new(stdout).lines() {
        let line = line.context("read holdfast-bench stdout")?;
        if !line.trim_start().starts_with('{') {
            eprintln!("holdfast-bench: {line}");
            continue;
        }
        match parse_line(&line).with_context(|| format!("holdfast-bench printed {line:?}"))? {
            Line::Row(row) => rows.push(row),
            Line::Skipped(why) => skipped = Some(why),
        }
    }
    let status = child.wait().context("wait for holdfast-bench")?;
    if !status.success() {
        bail!("holdfast-bench {name} failed ({status})");
    }
    Ok((rows, skipped))
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

/// The rows under a header, name and unit left-aligned, figures right-aligned.
fn table(rows: &[Row]) -> String {
    let header = ["benchmark", "value", "baseline", "ratio", "unit"].map(String::from);
    let cells: Vec<[String; 5]> = std::iter::once(header)
        .chain(rows.iter().map(|r| {
            [
                r.name.clone(),
                fmt_num(r.value),
                r.baseline.map_or("-".into(), fmt_num),
                r.ratio.map_or("-".into(), |x| format!("{x:.3}")),
                r.unit.clone(),
            ]
        }))
        .collect();
    let mut w = [0; 5];
    for row in &cells {
        for (w, c) in w.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for [name, value, baseline, ratio, unit] in &cells {
        let _ = writeln!(
            out,
            "{name:<w0$}  {value:>w1$}  {baseline:>w2$}  {ratio:>w3$}  {unit}",
            w0 = w[0],
            w1 = w[1],
            w2 = w[2],
            w3 = w[3],
        );
    }
    if rows.is_empty() {
        out.push_str("(no figures)\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(only: &[&str], args: &[&str]) -> Options {
        Options {
            only: only.iter().map(|s| s.to_string()).collect(),
            json: false,
            args: args.iter().map(OsString::from).collect(),
        }
    }

    #[test]
    fn the_steps_are_the_subcommands_in_order() {
        let steps = steps();
        assert_eq!(steps.first().map(String::as_str), Some("lookup"));
        assert!(steps.iter().any(|s| s == "restarts"), "{steps:?}");
        assert!(!steps.iter().any(|s| s == "table"), "{steps:?}");
        assert_eq!(chosen(&steps, &opts(&[], &[])).unwrap(), steps);
        let two = chosen(&steps, &opts(&["inetd", "connect"], &[])).unwrap();
        assert_eq!(two, ["connect", "inetd"], "the steps' order, not --only's");
    }

    #[test]
    fn unknown_steps_and_stray_options_are_refused() {
        let steps = steps();
        let err = chosen(&steps, &opts(&["nope"], &[])).unwrap_err();
        assert!(err.to_string().contains("restarts"), "{err}");
        assert!(chosen(&steps, &opts(&["setup"], &["--rounds", "1"])).is_ok());
        assert!(chosen(&steps, &opts(&[], &["--rounds", "1"])).is_err());
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
