//! `holdfast-bench`: the dispatcher's benchmarks, each figure with a baseline
//! measured in the same run. `cargo xtask bench` runs it and prints the table.
//!
//! - lookup: BPF_PROG_TEST_RUN of the sk_lookup program on a hit at 1, 1k,
//!   100k and 1M bindings, each ÷ the empty sk_lookup program (target: 1M ÷ 1
//!   ≤ 1.1); map entries of a binding on all ports ÷ one port's.
//! - connect: connect + accept + close per second through the dispatcher at
//!   100k bindings ÷ a plainly bound listener (target ≥ 0.97), per wall-clock
//!   and per CPU second; see `connect`.
//! - setup: 16 addresses × 1,000 ports, one steered socket ÷ 16,000 bound
//!   sockets, in time and kernel memory, and a /24 on all ports against the
//!   bound figures extrapolated; see `setup`.
//!
//! Prints one JSON object per line, the row contract of `cargo xtask bench`:
//! `{"name", "value", "baseline", "unit"}` (and `"ratio"` when it is not
//! value ÷ baseline). Needs root (CAP_BPF, namespaces, /proc/slabinfo).
//!
//! Options: `--repeat N` (test runs per lookup measurement, default 1000000),
//! `--rounds N` (measurements per figure, median taken, default 5), `--sizes
//! A,B,…` (binding counts, default 1,1000,100000,1000000), `--connect-bindings
//! N` (default 100000), `--connect-secs S` (both sides together, default 6),
//! `--only lookup,connect,setup`, `--quick` (fewer runs, shorter rounds).
//! Other arguments belong to other `cargo xtask bench` steps and are ignored.

mod connect;
mod netns;
mod setup;

use std::time::Duration;

use anyhow::{Context as _, Result};
use holdfast::dispatch::Dispatcher;
use serde_json::json;

struct Options {
    repeat: u32,
    rounds: u32,
    sizes: Vec<usize>,
    connect_bindings: usize,
    connect_secs: f64,
    only: Vec<String>,
}

impl Options {
    fn parse(args: impl Iterator<Item = String>) -> Result<Options> {
        let mut o = Options {
            repeat: 1_000_000,
            rounds: 5,
            sizes: vec![1, 1_000, 100_000, 1_000_000],
            connect_bindings: 100_000,
            connect_secs: 6.0,
            only: Vec::new(),
        };
        let mut args = args.peekable();
        while let Some(arg) = args.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) => (f.to_string(), Some(v.to_string())),
                None => (arg.clone(), None),
            };
            let mut value = || {
                inline
                    .clone()
                    .or_else(|| args.next())
                    .with_context(|| format!("{flag} needs a value"))
            };
            match flag.as_str() {
                "--repeat" => o.repeat = value()?.parse().context("--repeat")?,
                "--rounds" => o.rounds = value()?.parse().context("--rounds")?,
                "--sizes" => {
                    o.sizes = value()?
                        .split(',')
                        .map(|s| s.trim().parse::<usize>())
                        .collect::<Result<_, _>>()
                        .context("--sizes")?
                }
                "--connect-bindings" => {
                    o.connect_bindings = value()?.parse().context("--connect-bindings")?
                }
                "--connect-secs" => o.connect_secs = value()?.parse().context("--connect-secs")?,
                "--only" => o.only = value()?.split(',').map(str::to_owned).collect(),
                "--quick" => {
                    o.repeat = 100_000;
                    o.rounds = 3;
                    o.connect_secs = 2.0;
                }
                other => eprintln!("holdfast-bench: ignoring {other:?} (another step's)"),
            }
        }
        Ok(o)
    }

    fn runs(&self, part: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|o| o == part)
    }
}

/// One row of `cargo xtask bench`'s table.
fn row(name: &str, value: f64, baseline: Option<f64>, unit: &str) {
    println!(
        "{}",
        json!({"name": name, "value": value, "baseline": baseline, "unit": unit})
    );
}

/// A row whose ratio is given (a ratio of ratios).
fn ratio_row(name: &str, value: f64, baseline: f64, ratio: f64, unit: &str) {
    println!(
        "{}",
        json!({"name": name, "value": value, "baseline": baseline, "ratio": ratio, "unit": unit})
    );
}

/// "1", "1k", "100k", "1M".
fn count(n: usize) -> String {
    match n {
        n if n >= 1_000_000 && n % 1_000_000 == 0 => format!("{}M", n / 1_000_000),
        n if n >= 1_000 && n % 1_000 == 0 => format!("{}k", n / 1_000),
        n => n.to_string(),
    }
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// xorshift64*, seeded from the clock: spreads the benchmark's addresses.
pub(crate) struct Rng(u64);

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

fn lookup(o: &Options) -> Result<()> {
    let report = holdfast::dispatch::bench_lookup(&o.sizes, o.repeat, o.rounds)?;
    for f in &report.figures {
        row(
            &format!(
                "lookup hit, {} binding{} ÷ empty program",
                count(f.bindings),
                if f.bindings == 1 { "" } else { "s" }
            ),
            f64::from(f.hit_ns),
            Some(f64::from(f.empty_ns)),
            "ns/run",
        );
    }
    if let (Some(first), Some(last)) = (report.figures.first(), report.figures.last()) {
        ratio_row(
            &format!(
                "lookup flatness, {} ÷ {} bindings (target ≤ 1.1)",
                count(last.bindings),
                count(first.bindings)
            ),
            last.ratio,
            first.ratio,
            last.ratio / first.ratio,
            "× empty",
        );
    }
    row(
        "map entries, ports 1-65535 ÷ one port",
        report.entries_all_ports as f64,
        Some(report.entries_one_port as f64),
        "entries",
    );
    Ok(())
}

fn connect(o: &Options) -> Result<()> {
    // Short rounds in pairs: ~100 ms each, both sides of a pair adjacent.
    let pairs = ((o.connect_secs / 0.2).round() as u32).max(o.rounds.max(1));
    let round = Duration::from_secs_f64(o.connect_secs / f64::from(2 * pairs));
    let bindings = o.connect_bindings;
    let r = netns::on_own_thread("connect", move || {
        connect::connect_rate(bindings, pairs, round)
    })?;
    let name = format!(
        "connect+accept+close, {} bindings ÷ plain listener (target ≥ 0.97)",
        count(r.bindings)
    );
    ratio_row(&name, r.steered, r.plain, r.ratio, "conn/s");
    ratio_row(
        &format!("{name}, per CPU second"),
        r.steered_cpu,
        r.plain_cpu,
        r.ratio_cpu,
        "conn/cpu-s",
    );
    eprintln!(
        "holdfast-bench: connect: {} pairs of {round:?} rounds",
        r.pairs
    );
    Ok(())
}

fn setup(o: &Options) -> Result<()> {
    let rounds = o.rounds.clamp(1, 3);
    let c = netns::on_own_thread("setup", move || setup::setup_cost(rounds))?;
    let sockets = c.sockets();
    let what = format!(
        "{} addr × {} ports, 1 steered ÷ {} bound sockets",
        setup::ADDRESSES,
        setup::PORTS,
        sockets
    );
    row(
        &format!("set-up time, {what}"),
        c.steered_secs * 1e3,
        Some(c.bound_secs * 1e3),
        "ms",
    );
    row(
        &format!("set-up kernel memory, {what}"),
        c.steered_bytes / 1024.0,
        Some(c.bound_bytes / 1024.0),
        "KiB",
    );
    let per_socket = c.bound_bytes / sockets;
    row("kernel memory per bound socket", per_socket, None, "bytes");
    let per_socket_secs = c.bound_secs / sockets;
    row(
        "set-up time, /24 × 65535 ports: 1 steered ÷ bound (extrapolated)",
        c.wide_secs * 1e3,
        Some(per_socket_secs * setup::SLASH24_SOCKETS * 1e3),
        "ms",
    );
    row(
        "set-up kernel memory, /24 × 65535 ports: 1 steered ÷ bound (extrapolated)",
        c.wide_bytes / 1024.0,
        Some(per_socket * setup::SLASH24_SOCKETS / 1024.0),
        "KiB",
    );
    Ok(())
}

fn main() -> Result<()> {
    let o = Options::parse(std::env::args().skip(1))?;
    type Part = fn(&Options) -> Result<()>;
    let parts: [(&str, Part); 3] = [("lookup", lookup), ("connect", connect), ("setup", setup)];
    for (name, part) in parts {
        if o.runs(name) {
            eprintln!("holdfast-bench: {name}");
            part(&o).with_context(|| format!("benchmark {name}"))?;
        }
    }
    Ok(())
}
