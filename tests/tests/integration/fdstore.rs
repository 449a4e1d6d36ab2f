//! The fd store, with a real sender (tests/src/notifier.py sends FDSTORE=1 with an
//! SCM_RIGHTS fd): a memfd and a pipe holding data survive a crash (kill -9, exit 1)
//! and come back after the sockets in LISTEN_FDS/LISTEN_FDNAMES under their
//! FDNAME; FDSTOREREMOVE=1 drops one; `fd-store-max` bounds the store.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use holdfast_testkit::{notifier_running, skip_unless, tell, Holdfast};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(10);

fn web() -> SocketAddr {
    "127.0.0.1:8080".parse().expect("literal")
}

/// Waits for the next instance of "web" (another pid than `old`) and its report.
fn next_instance(hf: &Holdfast, old: i32) -> Result<(i32, Value)> {
    let s = hf.wait_service("web", T, |s| {
        s["state"] == "running" && s["pid"].is_i64() && s["pid"] != old
    })?;
    let pid = s["pid"].as_i64().context("pid")? as i32;
    let report = hf.sandbox().wait_report("web", T, |r| r["pid"] == pid)?;
    Ok((pid, report))
}

#[test]
fn stored_fds_come_back_after_a_crash_under_their_names() -> Result<()> {
    let (ns, mut hf, first) = skip_unless!(notifier_running(
        "web",
        &[],
        "fd-store-max = 4\nrestart-delay = \"100ms\""
    )?);
    let report = hf.sandbox().wait_report("web", T, |r| r["pid"] == first)?;
    assert_eq!(report["env"]["LISTEN_FDNAMES"], "web", "{report}");

    ns.run(|| -> Result<()> {
        tell(web(), "store state kept-in-a-memfd memfd")?;
        tell(web(), "store queue kept-in-a-pipe pipe")?;
        Ok(())
    })??;
    let s = hf.wait_service("web", T, |s| {
        s["fd_store"].as_array().is_some_and(|a| a.len() == 2)
    })?;
    assert_eq!(s["fd_store"], json!(["state", "queue"]), "{s}");

    kill(Pid::from_raw(first), Signal::SIGKILL)?;
    let (second, report) = next_instance(&hf, first)?;
    let env = &report["env"];
    assert_eq!(
        (
            &env["LISTEN_FDS"],
            &env["LISTEN_FDNAMES"],
            &env["LISTEN_PID"]
        ),
        (
            &json!("3"),
            &json!("web:state:queue"),
            &json!(second.to_string())
        ),
        "{report}"
    );
    let fds = &report["fds"];
    assert_eq!(fds[0]["kind"], "socket", "{report}");
    assert_eq!(
        (&fds[1]["name"], &fds[1]["kind"], &fds[1]["data"]),
        (&json!("state"), &json!("memfd"), &json!("kept-in-a-memfd")),
        "{report}"
    );
    assert_eq!(
        (&fds[2]["name"], &fds[2]["kind"], &fds[2]["data"]),
        (&json!("queue"), &json!("pipe"), &json!("kept-in-a-pipe")),
        "{report}"
    );

    // FDSTOREREMOVE=1 drops "state"; the next start (after exit 1) has "queue" only.
    ns.run(|| tell(web(), "notify FDSTOREREMOVE=1\\nFDNAME=state"))??;
    let s = hf.wait_service("web", T, |s| s["fd_store"] == json!(["queue"]))?;
    assert_eq!(s["pid"], second, "{s}");
    ns.run(|| tell(web(), "exit 1"))??;
    let (_, report) = next_instance(&hf, second)?;
    assert_eq!(report["env"]["LISTEN_FDNAMES"], "web:queue", "{report}");
    assert_eq!(report["fds"][1]["kind"], "pipe", "{report}");
    let s = hf.service("web")?;
    assert_eq!(s["restarts"], 2, "{s}");
    hf.stop()
}

#[test]
fn fd_store_max_bounds_the_store() -> Result<()> {
    let (ns, mut hf, first) = skip_unless!(notifier_running("web", &[], "fd-store-max = 2")?);
    ns.run(|| -> Result<()> {
        for name in ["one", "two", "three"] {
            tell(web(), &format!("store {name} data-{name} memfd"))?;
        }
        Ok(())
    })??;
    // The third message is read after the first two: once it is logged, it is settled.
    hf.wait_log_line(&["fd store refused an fd", "three"], T)?;
    let s = hf.service("web")?;
    assert_eq!(s["fd_store"], json!(["one", "two"]), "{s}");

    kill(Pid::from_raw(first), Signal::SIGKILL)?;
    let (_, report) = next_instance(&hf, first)?;
    assert_eq!(report["env"]["LISTEN_FDNAMES"], "web:one:two", "{report}");
    assert_eq!(report["fds"][2]["data"], "data-two", "{report}");
    hf.stop()
}
