//! `holdfast-bench`: the sk_lookup micro-benchmark (BPF_PROG_TEST_RUN). Prints
//! one JSON object per line: one `lookup` line per binding count (ns per run of
//! a hit, of the empty program in the same rounds, and their ratio), one
//! `lookup_flatness` line (largest count's ratio ÷ smallest's), and one
//! `map_entries` line (binding entries of an all-ports binding vs one port).
//! Needs CAP_BPF. `cargo xtask bench` runs it.
//!
//! Options: `--repeat N` (runs per measurement, default 1000000), `--rounds N`
//! (measurements per figure, median taken, default 5), `--sizes A,B,…`
//! (binding counts, default 1,1000,100000,1000000).

use anyhow::{bail, Context as _, Result};
use serde_json::json;

fn main() -> Result<()> {
    let mut repeat: u32 = 1_000_000;
    let mut rounds: u32 = 5;
    let mut sizes: Vec<usize> = vec![1, 1_000, 100_000, 1_000_000];
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--repeat" => repeat = value()?.parse().context("--repeat")?,
            "--rounds" => rounds = value()?.parse().context("--rounds")?,
            "--sizes" => {
                sizes = value()?
                    .split(',')
                    .map(|s| s.trim().parse::<usize>())
                    .collect::<Result<_, _>>()
                    .context("--sizes")?
            }
            other => bail!("unknown argument {other:?} (--repeat N, --rounds N, --sizes A,B,…)"),
        }
    }
    let report = holdfast::dispatch::bench_lookup(&sizes, repeat, rounds)?;
    for f in &report.figures {
        println!(
            "{}",
            json!({
                "bench": "lookup",
                "bindings": f.bindings,
                "binding_entries": f.binding_entries,
                "hit_ns": f.hit_ns,
                "empty_ns": f.empty_ns,
                "ratio": f.ratio,
                "repeat": report.repeat,
                "rounds": report.rounds,
            })
        );
    }
    if let (Some(first), Some(last)) = (report.figures.first(), report.figures.last()) {
        println!(
            "{}",
            json!({
                "bench": "lookup_flatness",
                "bindings": [first.bindings, last.bindings],
                "ratio": last.ratio / first.ratio,
                "target_max": 1.1,
            })
        );
    }
    println!(
        "{}",
        json!({
            "bench": "map_entries",
            "all_ports": report.entries_all_ports,
            "one_port": report.entries_one_port,
        })
    );
    Ok(())
}
