//! Who may speak for a service, tried as an attacker would, with holdfast in
//! its default mode (no `--cgroup-root`: services tracked by cgroup under
//! its own): a service running as the same user as another cannot change the
//! other's state, store fds in it or trigger its watchdog, even after trying
//! to join its process group; short-lived senders of a shared uid, gone
//! before their datagrams are read, cannot make a never-ready service ready.

use std::time::Duration;

use anyhow::{ensure, Result};
use holdfast_testkit::{
    netns_or_skip, send_notify_as, skip_unless, toml_str, wait_for, Holdfast, Sandbox, PYTHON,
};
use nix::sys::signal::Signal;

const T: Duration = Duration::from_secs(10);
/// nobody:nogroup on Debian.
const NOBODY: u32 = 65534;
/// What the daemon logs when it refuses a notify message.
const OUTSIDER_IGNORED: &str = "notify: message from a process outside the service ignored";

#[test]
fn short_lived_senders_of_the_services_uid_cannot_make_it_ready() -> Result<()> {
    let ns = skip_unless!(netns_or_skip());
    let sandbox = Sandbox::new()?;
    sandbox.write_unit(
        "late",
        "[service]\nexec = [\"sleep\", \"1000\"]\ntype = \"notify\"\nnotify-access = \"all\"\n\
         user = \"nobody\"\ngroup = \"nogroup\"\nstart-timeout = \"60s\"\n",
    )?;
    let socket = sandbox.notify_socket("late");
    let hf = Holdfast::start_in(&ns, sandbox)?;
    hf.wait_state("late", "starting", T)?;
    // holdfast reads nothing while stopped: every sender has exited (and
    // been reaped) before its datagram is read. The kernel queues at most
    // net.unix.max_dgram_qlen (10 by default) datagrams: 8 senders.
    hf.signal(Signal::SIGSTOP)?;
    let sent = (|| -> Result<()> {
        for _ in 0..8 {
            let mut sender = send_notify_as(
                NOBODY,
                NOBODY,
                &socket,
                "READY=1\nSTATUS=ready, says a stranger",
                Duration::ZERO,
            )?;
            sender.wait()?;
        }
        Ok(())
    })();
    hf.signal(Signal::SIGCONT)?;
    sent?;
    hf.wait_log_line(&[OUTSIDER_IGNORED], T)?;
    std::thread::sleep(Duration::from_millis(300));
    let s = hf.service("late")?;
    ensure!(s["state"] == "starting", "a stranger made it ready: {s}");
    ensure!(s["status_text"] != "ready, says a stranger", "{s}");
    Ok(())
}

#[test]
fn a_service_cannot_speak_for_another_of_the_same_user_even_in_its_process_group() -> Result<()> {
    let ns = skip_unless!(netns_or_skip());
    let sandbox = Sandbox::new()?;
    let victim_pid = sandbox.out("victim.pid");
    let tried = sandbox.out("tried");
    sandbox.write_unit(
        "victim",
        "[service]\nexec = [\"sleep\", \"1000\"]\ntype = \"simple\"\nnotify-access = \"all\"\n\
         user = \"nobody\"\ngroup = \"nogroup\"\nwatchdog = \"1h\"\nfd-store-max = 4\n",
    )?;
    let (mut hf, victim) = Holdfast::start_running(&ns, sandbox, "victim")?;
    std::fs::write(&victim_pid, victim.to_string())?;
    // The impostor: another service of the same user. It tries to join the
    // victim's process group, then sends as the victim what would stop it,
    // relabel it, store an fd in it and SIGABRT it.
    let code = "import os, socket, sys\n\
                pid = int(open(sys.argv[2]).read())\n\
                try:\n    os.setpgid(0, pid)\nexcept OSError as e:\n    print('setpgid:', e, flush=True)\n\
                s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n\
                s.connect(sys.argv[1])\n\
                r, w = os.pipe()\n\
                socket.send_fds(s, [b'STATUS=pwned\\nFDSTORE=1\\nFDNAME=pwned'], [w])\n\
                s.send(b'WATCHDOG=trigger')\n\
                s.send(b'STOPPING=1')\n\
                open(sys.argv[3], 'w').write('done')\n\
                os.execvp('sleep', ['sleep', '1000'])\n";
    let socket = hf.sandbox().notify_socket("victim");
    hf.sandbox().write_unit(
        "impostor",
        &format!(
            "[service]\nexec = [{py}, \"-c\", {code}, {sock}, {pidfile}, {tried}]\n\
             user = \"nobody\"\ngroup = \"nogroup\"\n",
            py = toml_str(PYTHON),
            code = toml_str(code),
            sock = toml_str(&socket.display().to_string()),
            pidfile = toml_str(&victim_pid.display().to_string()),
            tried = toml_str(&tried.display().to_string()),
        ),
    )?;
    hf.cli_ok(&["reload"])?;
    wait_for("the impostor to have sent", T, || {
        tried.exists().then_some(())
    })?;
    hf.wait_log_line(&[OUTSIDER_IGNORED], T)?;
    std::thread::sleep(Duration::from_millis(300));
    let s = hf.service("victim")?;
    ensure!(
        s["state"] == "running" && s["pid"] == victim,
        "the impostor moved the victim: {s}"
    );
    ensure!(s["status_text"] != "pwned", "{s}");
    ensure!(s["restarts"] == 0, "{s}");
    let refusals = hf
        .log()
        .lines()
        .filter(|l| l.contains("outside the service ignored") && l.contains("victim"))
        .count();
    ensure!(
        (1..=3).contains(&refusals),
        "want the attempt logged (rate-limited), got {refusals} lines:\n{}",
        hf.log()
    );
    hf.stop()
}
