//! Restarts and stops: sockets stay open while a service is down (no connection
//! refused), a crash loop backs off and ends `failed` without disturbing the
//! others, and a service that ignores SIGTERM is SIGKILLed with its whole group.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use holdfast_testkit::{
    ask_tcp, netns_and_sandbox, process_gone, restart_always, skip_unless, wait_for, Holdfast,
    LoopClient,
};

const T: Duration = Duration::from_secs(10);

#[test]
fn kill_9_in_a_loop_refuses_no_connection() -> Result<()> {
    const KILLS: usize = 20;
    let (ns, sandbox) = skip_unless!(netns_and_sandbox()?);
    sandbox.write_serve_unit("web", 8080, &restart_always("100ms", "300ms", 1000, "10s"))?;
    let (mut hf, _) = Holdfast::start_running(&ns, sandbox, "web")?;
    let addr: SocketAddr = "127.0.0.1:8080".parse()?;

    // A client connecting in a loop the whole time.
    let client = LoopClient::start(&ns, vec![(addr, "web".into())], Duration::from_millis(5), T)?;

    ns.run(|| hf.kill_9_rounds("web", KILLS, T, |_| vec![addr; 3]))??;
    let tally = client.finish()?;
    // Lost: accepted by an instance that was killed before it answered, not
    // holdfast's doing.
    tally.expect_no_loss(KILLS)?;
    assert!(
        tally.answered > 0,
        "the loop client was never answered: {tally:?}"
    );
    let status = hf.service("web")?;
    assert!(
        status["restarts"].as_u64().unwrap_or(0) >= KILLS as u64,
        "restarts not counted: {status}"
    );
    hf.stop()
}

/// One start of the crash-looping service: when holdfast forked it and when it
/// was about to exit, in seconds since boot (10 ms resolution), so that the delay
/// between an exit and the next fork is measured without the start-up time of
/// the shell, which is long and erratic on a busy machine.
#[derive(Debug, Clone, Copy)]
struct Start {
    forked: f64,
    exiting: f64,
}

#[test]
fn crash_loop_backs_off_and_fails_while_others_keep_running() -> Result<()> {
    let (ns, sandbox) = skip_unless!(netns_and_sandbox()?);
    // Field 22 of /proc/PID/stat: start time in clock ticks since boot; /proc/uptime
    // is read last, just before exit.
    let starts = sandbox.write_sh_noting(
        "crash",
        "st=$(cut -d' ' -f22 /proc/$$/stat); read up _ < /proc/uptime; echo \"$st $up\" >> \"$NOTE\"; exit 3",
        &restart_always("300ms", "10s", 3, "30s"),
    )?;
    sandbox.write_serve_unit("steady", 8080, "")?;
    let tick = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.unwrap_or(100) as f64;
    let (mut hf, steady) = Holdfast::start_running(&ns, sandbox, "steady")?;
    let failed = hf.wait_state("crash", "failed", Duration::from_secs(15))?;
    let read_starts = || -> Result<Vec<Start>> {
        let text = std::fs::read_to_string(&starts)?;
        text.lines()
            .map(|l| -> Result<Start> {
                let (st, up) = l.split_once(' ').with_context(|| format!("line {l:?}"))?;
                Ok(Start {
                    forked: st.parse::<f64>()? / tick,
                    exiting: up.parse()?,
                })
            })
            .collect()
    };
    let times = read_starts()?;
    ensure!(
        (3..=4).contains(&times.len()),
        "start-limit-burst 3, yet {} starts: {times:?}",
        times.len()
    );
    // From an exit to the next fork: the restart delay holdfast applied.
    let delays: Vec<f64> = times
        .windows(2)
        .map(|w| w[1].forked - w[0].exiting)
        .collect();
    eprintln!("restart delays (s): {delays:?}; final status {failed}");
    ensure!(
        delays[0] >= 0.3 - 0.03,
        "restart-delay 300ms not respected: {delays:?}"
    );
    for w in delays.windows(2) {
        ensure!(
            w[1] >= w[0] * 1.5,
            "the restart delay does not back off (it should double): {delays:?}"
        );
    }
    assert_eq!(failed["pid"], serde_json::Value::Null, "{failed}");

    // Left alone once failed.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        read_starts()?.len(),
        times.len(),
        "started again after failed"
    );
    assert_eq!(hf.service("crash")?["state"], "failed");

    // The other service never noticed.
    let now = hf.service("steady")?;
    assert_eq!(now["state"], "running", "{now}");
    assert_eq!(now["pid"], steady, "{now}");
    assert_eq!(now["restarts"], 0, "{now}");
    let answer = ns.run(|| ask_tcp("127.0.0.1:8080".parse().expect("literal"), T))??;
    assert_eq!(answer, format!("steady {steady}\n"));
    hf.stop()
}

#[test]
fn sigterm_ignored_means_sigkill_after_stop_timeout_for_the_whole_group() -> Result<()> {
    let (ns, sandbox) = skip_unless!(netns_and_sandbox()?);
    let main_file = sandbox.out("main");
    let grandchild_file = sandbox.out("grandchild");
    sandbox.write_unit(
        "stubborn",
        &format!(
            r#"[service]
exec = ["/bin/sh", "-c", "trap '' TERM; echo $$ > {main}; sleep 1000 & echo $! > {grandchild}; wait"]
restart = "always"
stop-timeout = "1s"
"#,
            main = main_file.display(),
            grandchild = grandchild_file.display()
        ),
    )?;
    let (mut hf, main) = Holdfast::start_running(&ns, sandbox, "stubborn")?;
    let read_pid = |p: &std::path::Path| -> Option<i32> {
        std::fs::read_to_string(p).ok()?.trim().parse().ok()
    };
    let grandchild = wait_for("the grandchild's pid", T, || read_pid(&grandchild_file))?;
    assert_eq!(
        read_pid(&main_file),
        Some(main),
        "status pid is not the service's"
    );
    assert!(!process_gone(grandchild), "the grandchild is not running");

    let asked = Instant::now();
    hf.cli_ok(&["stop", "stubborn"])?;
    let took = asked.elapsed();
    if took < Duration::from_millis(900) {
        bail!("stopped after {took:?}: SIGKILL came before stop-timeout (1s)");
    }
    if took > Duration::from_secs(6) {
        bail!("stop took {took:?} with stop-timeout 1s");
    }
    let status = hf.service("stubborn")?;
    assert_eq!(status["state"], "stopped", "{status}");
    assert_eq!(status["pid"], serde_json::Value::Null, "{status}");
    wait_for("the service to be gone", Duration::from_secs(2), || {
        process_gone(main).then_some(())
    })?;
    wait_for("the grandchild to be gone", Duration::from_secs(2), || {
        process_gone(grandchild).then_some(())
    })?;
    // An explicit stop is not a failure: restart = "always" does not bring it back.
    std::thread::sleep(Duration::from_millis(1500));
    let status = hf.service("stubborn")?;
    assert_eq!(status["state"], "stopped", "restarted after stop: {status}");
    hf.stop()
}
