//! `cargo xtask`: the developer workflow of holdfast: bootstrap, build, run, test, bench.
//! A fresh machine (Rust stable via rustup, gcc, Debian base, root) needs nothing by hand:
//! every subcommand first sets up what it lacks, idempotently (see `bootstrap`), so `.ci/run`
//! is one call to `cargo xtask test`.

mod bootstrap;
mod run;
mod shell;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::Instant;

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};

use crate::bootstrap::Scope;
use crate::shell::{Profile, Workspace};

/// The binaries `build` must leave in target/<profile>/.
const BINARIES: &[&str] = &["holdfast", "hello-http", "echo"];

#[derive(Parser)]
#[command(name = "cargo xtask", about = "holdfast's developer workflow")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what this machine lacks: rustup components (rust-src, rustfmt, clippy),
    /// bpf-linker, the Debian packages the tests use; mount bpffs. Safe to run again.
    Bootstrap,
    /// Build holdfast and the example services into target/release/ (or target/debug/).
    Build {
        /// A debug build, into target/debug/.
        #[arg(long)]
        debug: bool,
    },
    /// Build, then run holdfast in the foreground on units/ until Ctrl-C.
    Run {
        /// The units directory (default: units/ in the workspace).
        #[arg(long, value_name = "DIR")]
        units: Option<PathBuf>,
        /// More arguments for `holdfast run`.
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// cargo fmt --check, clippy -D warnings, then every test, the privileged ones included.
    Test {
        /// Skip the fmt and clippy checks (for a quick local loop; CI always runs them).
        #[arg(long)]
        no_lint: bool,
        /// More arguments for `cargo test` (e.g. `-p holdfast-testkit --test integration restart -- --nocapture`).
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// Build release binaries and `holdfast-bench`, run the benchmark steps (its subcommands) and
    /// print one table of ratios (`holdfast-bench table`).
    Bench {
        /// Run only this step (repeatable): lookup, connect, udp, setup, restarts, reload, rss, scale,
        /// upgrade, inetd.
        #[arg(long, value_name = "STEP")]
        only: Vec<String>,
        /// Fewer and shorter rounds (a quick look, not figures to quote).
        #[arg(long)]
        quick: bool,
        /// Print JSON lines instead of the table.
        #[arg(long)]
        json: bool,
        /// Options of the one step named with --only (see `holdfast-bench STEP --help`).
        #[arg(last = true)]
        args: Vec<OsString>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(command: Cmd) -> Result<ExitCode> {
    let ws = Workspace::locate()?;
    match command {
        Cmd::Bootstrap => {
            let start = Instant::now();
            let done = bootstrap::ensure(&ws, Scope::Full)?;
            let took = start.elapsed().as_secs_f64();
            match done.len() {
                0 => eprintln!("bootstrap: nothing to do ({took:.2}s)"),
                n => eprintln!("bootstrap: done, {n} installed ({took:.1}s)"),
            }
        }
        Cmd::Build { debug } => {
            bootstrap::ensure(&ws, Scope::Toolchain)?;
            let profile = if debug {
                Profile::Debug
            } else {
                Profile::Release
            };
            build(&ws, profile)?;
        }
        Cmd::Run { units, args } => {
            bootstrap::ensure(&ws, Scope::Full)?;
            build(&ws, Profile::Release)?;
            return run::run(&ws, units, args);
        }
        Cmd::Test { no_lint, args } => test(&ws, no_lint, &args)?,
        Cmd::Bench {
            only,
            quick,
            json,
            args,
        } => {
            bootstrap::ensure(&ws, Scope::Full)?;
            build(&ws, Profile::Release)?;
            shell::run(
                &mut ws.cargo(["build", "--release", "--package", "holdfast-bench"]),
                "the benchmark build failed (see above)",
            )?;
            let bin_dir = ws.bin_dir(Profile::Release);
            let mut cmd = Command::new(bin_dir.join("holdfast-bench"));
            cmd.arg("--bin-dir").arg(&bin_dir);
            cmd.args(quick.then_some("--quick")).arg("table");
            cmd.args(only.iter().flat_map(|step| ["--only", step]));
            cmd.args(json.then_some("--json")).arg("--").args(&args);
            cmd.current_dir(&ws.root)
                .env("PATH", ws.path_with(&bin_dir)?);
            shell::run(&mut cmd, "see holdfast-bench's message above")?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Every binary of the workspace (holdfast and the examples). xtask itself is left out: it is
/// running, and building it here with the whole workspace's features would only make the next
/// `cargo xtask` rebuild it. So is the bench crate: only `bench` needs it.
fn build(ws: &Workspace, profile: Profile) -> Result<()> {
    let mut cmd = ws.cargo(["build"]);
    if profile == Profile::Release {
        cmd.arg("--release");
    }
    cmd.args([
        "--workspace",
        "--bins",
        "--exclude",
        "xtask",
        "--exclude",
        "holdfast-bench",
    ]);
    shell::run(&mut cmd, "the build failed (see above)")?;
    let dir = ws.bin_dir(profile);
    let missing: Vec<_> = BINARIES
        .iter()
        .filter(|b| !dir.join(b).exists())
        .copied()
        .collect();
    if !missing.is_empty() {
        bail!(
            "the build succeeded but left no {} in {}",
            missing.join(", "),
            dir.display()
        );
    }
    eprintln!(
        "xtask: binaries in {}: {}",
        dir.display(),
        BINARIES.join(" ")
    );
    Ok(())
}

fn test(ws: &Workspace, no_lint: bool, args: &[OsString]) -> Result<()> {
    if shell::in_ci() {
        eprintln!("xtask: CI=true: a privileged test that cannot get what it needs fails");
    }
    bootstrap::ensure(ws, Scope::Full)?;
    if !no_lint {
        shell::run(
            &mut ws.cargo(["fmt", "--all", "--", "--check"]),
            "the code is not formatted: run `cargo fmt --all`",
        )?;
        shell::run(
            &mut ws.cargo(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]),
            "clippy found problems (above): fix them, or write #[expect(lint, reason = \"…\")] where one is right",
        )?;
    }
    build(ws, Profile::Debug)?;
    let bin_dir = ws.bin_dir(Profile::Debug);
    let cargo_test = || -> Result<Command> {
        let mut cmd = ws.cargo(["test"]);
        cmd.env("HOLDFAST_BIN", bin_dir.join("holdfast"))
            .env("PATH", ws.path_with(&bin_dir)?);
        Ok(cmd)
    };
    let mut cmd = cargo_test()?;
    // The privileged test crate is not a default member: name the whole workspace, unless
    // the caller picked packages.
    if !args
        .iter()
        .any(|a| a == "-p" || a.to_string_lossy().starts_with("--package"))
    {
        cmd.arg("--workspace");
    }
    shell::run(cmd.args(args), "some tests failed (see above)")?;
    if args.is_empty() {
        // The weaker mode, where cgroup v2 cannot be written: the modules
        // about running services again, with process groups only.
        let mut cmd = cargo_test()?;
        cmd.args(["-p", "holdfast-testkit", "--test", "integration", "--"])
            .args(PROCESS_GROUP_MODULES)
            .env("HOLDFAST_TEST_DAEMON_ARGS", "--no-cgroups");
        shell::run(
            &mut cmd,
            "some tests failed with --no-cgroups (process-group mode, see above)",
        )?;
    }
    Ok(())
}

/// The integration modules `cargo xtask test` runs a second time in
/// process-group mode (`holdfast run --no-cgroups`).
const PROCESS_GROUP_MODULES: &[&str] = &[
    "restarts::",
    "overlap::",
    "watchdog::",
    "inetd::",
    "fdstore::",
    "handoff::",
    "failed::",
];
