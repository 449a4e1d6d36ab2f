//! `holdfast-bench`: holdfast's benchmarks, one subcommand per step, each
//! figure with a baseline measured in the same run (these machines are shared
//! and noisy: only ratios mean much). Every step prints its rows as JSON lines
//! (see `report`); `table` runs the steps and prints one table of them, which
//! is what `cargo xtask bench` calls once it has built everything. Needs root
//! (CAP_BPF, namespaces, /proc/slabinfo).
//!
//! - `lookup`: BPF_PROG_TEST_RUN of holdfast's program, hot and cold, beside
//!   the empty and steer-only floors and the tubular scheme (`lookup`).
//! - `connect`: TCP connect + accept + close through the dispatcher ÷ a plain
//!   listener (`connect`); `udp`: datagrams the same way (`udp`).
//! - `setup`: set-up time and kernel memory, steered ÷ bound (`setup`).
//! - `restarts`: wrk against services restarted in a loop (`restarts`).
//! - `reload`: reloads of 10k bindings under a loop client; `rss`: the
//!   supervisor's memory with 100 services; `scale`: start-up and status with
//!   1000 services (`reload`).
//! - `inetd`: per-connection services ÷ systemd-socket-activate (`inetd`).
//!
//! `table` runs the steps and prints their rows as one table (`table`).

mod connect;
mod inetd;
mod lookup;
mod netns;
mod reload;
mod report;
mod restarts;
mod setup;
mod table;
mod udp;
mod upgrade;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use holdfast::dispatch::Dispatcher;

use crate::report::{Env, Row, Skip};

#[derive(Parser)]
#[command(
    name = "holdfast-bench",
    about = "holdfast's benchmarks (rows as JSON lines)"
)]
struct Cli {
    /// Fewer and shorter rounds: a quick look, not figures to quote.
    #[arg(long, global = true)]
    quick: bool,
    /// Where holdfast and the example services are built.
    #[arg(
        long,
        global = true,
        value_name = "DIR",
        default_value = "target/release"
    )]
    bin_dir: PathBuf,
    #[command(subcommand)]
    step: Step,
}

#[derive(Subcommand)]
enum Step {
    /// The lookup micro-benchmark.
    Lookup {
        /// Test runs per hot measurement.
        #[arg(long, default_value_t = 1_000_000)]
        repeat: u32,
        /// Hot measurements per figure (median taken).
        #[arg(long, default_value_t = 5)]
        rounds: u32,
        /// Single runs per cold figure, each on a random hit (median taken).
        #[arg(long, default_value_t = 20_000)]
        cold_runs: u32,
        /// Binding counts.
        #[arg(long, value_delimiter = ',', default_value = "1,1000,100000,1000000")]
        sizes: Vec<usize>,
    },
    /// TCP connect + accept + close, steered over many bindings ÷ a plain listener.
    Connect {
        /// /32 bindings the hits are spread over.
        #[arg(long, default_value_t = 100_000)]
        bindings: usize,
        /// Both sides together.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "6s")]
        duration: Duration,
    },
    /// UDP datagrams per second, steered ÷ a plainly bound socket.
    Udp {
        /// /32 bindings the datagrams are spread over.
        #[arg(long, default_value_t = 100_000)]
        bindings: usize,
        /// Each of one-way and request/reply, both sides together.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "6s")]
        duration: Duration,
    },
    /// Set-up time and kernel memory: one steered socket ÷ one bound socket per address and port.
    Setup {
        #[arg(long, default_value_t = 3)]
        rounds: u32,
    },
    /// wrk against hello-http and gunicorn while they are restarted in a loop.
    Restarts {
        /// Each wrk run (whole seconds).
        #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
        duration: Duration,
        /// Restarts per run.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
        count: u32,
    },
    /// Reloads that add, replace and remove 10k bindings, under a loop client.
    Reload,
    /// The supervisor's resident memory with 100 services ÷ with 1.
    Rss,
    /// Start-up and `status --json` with 1000 services ÷ with 1.
    Scale,
    /// `holdfast upgrade` until `status` answers with 1, 100, 1000 services; a
    /// client's p99 latency during upgrades ÷ without.
    Upgrade,
    /// Per-connection services: holdfast `accept = true` ÷ systemd-socket-activate --accept.
    Inetd {
        /// Each run.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
        duration: Duration,
        /// Client threads.
        #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
        threads: u32,
        /// Runs of each side.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
        rounds: u32,
    },
    /// Runs the steps above (each as `holdfast-bench STEP`) and prints one table of their rows.
    Table {
        /// Run only this step (repeatable).
        #[arg(long, value_name = "STEP")]
        only: Vec<String>,
        /// Print the rows as JSON lines instead of the table.
        #[arg(long)]
        json: bool,
        /// Options of the one step named with --only.
        #[arg(last = true)]
        args: Vec<OsString>,
    },
}

/// A dispatcher that is detached (unpinned) however the benchmark ends.
pub(crate) struct Attached(pub Option<Dispatcher>);

impl Attached {
    pub fn get(&mut self) -> &mut Dispatcher {
        self.0.as_mut().expect("present until detach")
    }

    pub fn detach(mut self) -> Result<()> {
        match self.0.take() {
            Some(d) => d.detach().context("detach the dispatcher"),
            None => Ok(()),
        }
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        if let Some(d) = self.0.take() {
            if let Err(e) = d.detach() {
                eprintln!("holdfast-bench: {e}");
            }
        }
    }
}

fn run(cli: Cli) -> Result<Vec<Row>> {
    let env = Env {
        bin_dir: std::path::absolute(&cli.bin_dir).context("resolve --bin-dir")?,
    };
    let quick = cli.quick;
    // The kit's daemon launcher starts this binary.
    std::env::set_var("HOLDFAST_BIN", env.bin_dir.join("holdfast"));
    match cli.step {
        Step::Lookup {
            repeat,
            rounds,
            cold_runs,
            sizes,
        } => {
            report::need_root("CAP_BPF")?;
            let (repeat, rounds, cold_runs) = if quick {
                (repeat.min(100_000), rounds.min(3), cold_runs.min(2_000))
            } else {
                (repeat, rounds, cold_runs)
            };
            lookup::run(lookup::Options {
                repeat,
                rounds,
                sizes,
                cold_runs,
            })
        }
        Step::Connect { bindings, duration } => {
            report::need_root("CAP_BPF, a network namespace")?;
            connect::run(bindings, short(quick, duration, 2))
        }
        Step::Udp { bindings, duration } => {
            report::need_root("CAP_BPF, a network namespace")?;
            udp::run(bindings, short(quick, duration, 2))
        }
        Step::Setup { rounds } => {
            report::need_root("CAP_BPF, /proc/slabinfo")?;
            setup::run(if quick { 1 } else { rounds })
        }
        Step::Restarts { duration, count } => {
            let opts = if quick {
                restarts::Options {
                    duration: Duration::from_secs(5),
                    count: 10,
                }
            } else {
                restarts::Options { duration, count }
            };
            restarts::restarts(&env, opts)
        }
        Step::Reload => reload::reload_10k(),
        Step::Rss => reload::rss_100(),
        Step::Scale => reload::scale(),
        Step::Upgrade => upgrade::upgrade(),
        Step::Inetd {
            duration,
            threads,
            rounds,
        } => {
            let opts = if quick {
                inetd::Options {
                    duration: Duration::from_secs(2),
                    threads: threads as usize,
                    rounds: 1,
                }
            } else {
                inetd::Options {
                    duration,
                    threads: threads as usize,
                    rounds: rounds as usize,
                }
            };
            inetd::inetd(&env, opts)
        }
        Step::Table { only, json, args } => {
            table::run(&env, quick, table::Options { only, json, args })?;
            Ok(Vec::new())
        }
    }
}

/// `duration`, or at most `secs` seconds with `--quick`.
fn short(quick: bool, duration: Duration, secs: u64) -> Duration {
    if quick {
        duration.min(Duration::from_secs(secs))
    } else {
        duration
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(rows) => {
            for row in &rows {
                row.print();
            }
            ExitCode::SUCCESS
        }
        Err(e) => match e.downcast_ref::<Skip>() {
            Some(skip) => {
                println!("{}", serde_json::json!({ "skipped": skip.0 }));
                ExitCode::SUCCESS
            }
            None => {
                eprintln!("holdfast-bench: error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}
