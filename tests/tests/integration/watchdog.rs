//! The watchdog, with a real sender (tests/src/notifier.py pinging WATCHDOG=1 from a
//! thread): a service that pings is left alone over several periods, one that goes
//! quiet gets SIGABRT and is restarted; WATCHDOG=trigger aborts at once;
//! WATCHDOG_USEC= changes the timeout of the running instance only.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use holdfast_testkit::{netns_and_notifier, skip_unless, tell, Holdfast, Netns, Sandbox};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(10);

/// notifier.py's flags for a service that says READY=1, then pings WATCHDOG=1.
const PINGER: &[&str] = &["--ready", "--ping"];

/// [`netns_and_notifier`] with a [`PINGER`] service NAME, `watchdog = WATCHDOG`.
fn netns_and_pinger(name: &str, watchdog: &str) -> Result<Option<(Netns, Sandbox)>> {
    netns_and_notifier(name, PINGER, &format!("watchdog = \"{watchdog}\""))
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Checks `name` every 50 ms for `d`: running, ready, the same `pid`, no restart.
fn left_alone(hf: &Holdfast, name: &str, pid: i32, d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        let s = hf.service(name)?;
        ensure!(
            (&s["state"], &s["pid"], &s["restarts"]) == (&json!("running"), &json!(pid), &json!(0)),
            "{name} disturbed although it pings: {s}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Waits for `name` to run again as another process than `old`, after a SIGABRT.
fn restarted_after_abort(hf: &Holdfast, name: &str, old: i32, within: Duration) -> Result<Value> {
    let s = hf.wait_service(name, within, |s| {
        s["state"] == "running" && s["pid"].is_i64() && s["pid"] != old
    })?;
    ensure!(s["last_exit"] == "killed by SIGABRT", "{s}");
    ensure!(s["restarts"] == 1, "{s}");
    Ok(s)
}

#[test]
fn a_pinging_service_is_left_alone_and_a_silent_one_restarted() -> Result<()> {
    let (ns, sandbox) = skip_unless!(netns_and_pinger("dog", "1s")?);
    let (mut hf, pid) = Holdfast::start_running(&ns, sandbox, "dog")?;
    let report = hf.sandbox().wait_report("dog", T, |r| r["pid"] == pid)?;
    assert_eq!(report["env"]["WATCHDOG_USEC"], "1000000", "{report}");

    // Four watchdog periods, pinged every 200 ms.
    left_alone(&hf, "dog", pid, Duration::from_secs(4))?;

    ns.run(|| tell(addr(8080), "stop-ping"))??;
    let quiet = Instant::now();
    restarted_after_abort(&hf, "dog", pid, T)?;
    let took = quiet.elapsed();
    assert!(
        took >= Duration::from_millis(700),
        "aborted {took:?} after the last ping, with watchdog 1s"
    );
    hf.log()
        .lines()
        .find(|l| l.contains("watchdog timeout") && l.contains("dog"))
        .context("no watchdog line in the log")?;
    hf.stop()
}

#[test]
fn watchdog_trigger_aborts_at_once() -> Result<()> {
    let (ns, sandbox) = skip_unless!(netns_and_pinger("dog", "20s")?);
    let (mut hf, pid) = Holdfast::start_running(&ns, sandbox, "dog")?;
    let asked = Instant::now();
    ns.run(|| tell(addr(8080), "then-notify WATCHDOG=trigger"))??;
    restarted_after_abort(&hf, "dog", pid, T)?;
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "WATCHDOG=trigger took {:?}",
        asked.elapsed()
    );
    hf.stop()
}

#[test]
fn watchdog_usec_changes_the_timeout_of_the_running_instance() -> Result<()> {
    // "shorter" asks for 500 ms instead of 20 s, then goes quiet; "longer" for 60 s
    // instead of 1 s, then goes quiet.
    let (ns, sandbox) = skip_unless!(netns_and_pinger("shorter", "20s")?);
    sandbox.write_notifier_unit("longer", 8081, PINGER, "watchdog = \"1s\"")?;
    let (mut hf, shorter) = Holdfast::start_running(&ns, sandbox, "shorter")?;
    let longer = hf.wait_running("longer", T)?;
    ns.run(|| -> Result<()> {
        for port in [8080, 8081] {
            tell(addr(port), "stop-ping")?;
        }
        tell(addr(8080), "notify WATCHDOG_USEC=500000")?;
        tell(addr(8081), "notify WATCHDOG_USEC=60000000")?;
        Ok(())
    })??;
    let changed = Instant::now();

    // Three periods of its unit's watchdog without a ping: still there.
    left_alone(&hf, "longer", longer, Duration::from_secs(3))?;
    // Long gone, 17 s before its unit's watchdog.
    let s = restarted_after_abort(&hf, "shorter", shorter, Duration::from_millis(100))
        .with_context(|| format!("{:?} after WATCHDOG_USEC=500000", changed.elapsed()))?;
    // The next instance has the unit's watchdog again.
    let pid = s["pid"].as_i64().context("pid")? as i32;
    let report = hf
        .sandbox()
        .wait_report("shorter", T, |r| r["pid"] == pid)?;
    assert_eq!(report["env"]["WATCHDOG_USEC"], "20000000", "{report}");
    hf.stop()
}
