//! `holdfast-bench inetd` (`cargo xtask bench --only inetd`): connections per second served by a trivial
//! per-connection service under holdfast (`accept = true`: an instance per connection), against
//! the same service under Debian's `systemd-socket-activate --accept --inetd` (a process per
//! connection, the connection on stdin/stdout) in the same invocation (these
//! machines are shared and noisy: only the ratio means much).
//!
//! The service is `/bin/cat`: the client connects, writes one line, shuts its side down and reads
//! until EOF; the answer must be that line. The client is this process: a fixed number of threads,
//! each in a fresh network namespace, connecting in a loop for a fixed time. Runs alternate
//! (holdfast, baseline, holdfast, baseline, …) so a burst of load from elsewhere hits both.
//! The step fails when any connection is refused, fails, or gets a wrong answer. It owns only its
//! namespace, its scratch directory (kept when it fails: units, the daemon's log) and the
//! processes it starts.
//!
//! The same service under a holdfast with `--no-cgroups` measures what a cgroup per connection
//! costs a spawn (issue 10's spawn cost, aim ≥ 0.8), and both daemons time `holdfast restart` of a
//! simple service until it runs again.
//!
//! Options (`holdfast-bench inetd --help`): `--duration` (each run, default 5s), `--threads`
//! (client threads, default 8), `--rounds` (runs of each, default 2); `--quick`: 2 s, one round.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use holdfast_testkit::Netns;

use crate::report::{find_command, need_root, per, Env, Row};

const HOLDFAST_ADDR: &str = "127.0.0.1:9001";
const BASELINE_ADDR: &str = "127.0.0.1:9002";
const PGROUPS_ADDR: &str = "127.0.0.1:9003";
const LINE: &[u8] = b"hello inetd\n";
/// One connection may take this long (a cold fork+exec on a loaded machine included).
const CONN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a server may take to answer its first connection.
const UP_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Options {
    pub duration: Duration,
    pub threads: usize,
    pub rounds: usize,
}

/// The step: see the module docs.
pub fn inetd(b: &Env, opts: Options) -> Result<Vec<Row>> {
    need_root("ip netns add")?;
    let holdfast = b.bin_dir.join("holdfast");
    ensure!(holdfast.is_file(), "{} is not built", holdfast.display());
    let activate = PathBuf::from("/usr/bin/systemd-socket-activate");
    ensure!(
        activate.is_file(),
        "{} is missing (run `cargo xtask bootstrap`)",
        activate.display()
    );
    let ip = find_command("ip").context("ip is not installed (iproute2)")?;
    let scratch = std::env::temp_dir().join(format!("holdfast-bench-inetd-{}", std::process::id()));
    let result = measure(&holdfast, &activate, &ip, &scratch, opts);
    match &result {
        Ok(_) => {
            let _ = fs::remove_dir_all(&scratch);
        }
        Err(_) => eprintln!("inetd: kept {} (units, daemon log)", scratch.display()),
    }
    result
}

fn measure(
    holdfast: &Path,
    activate: &Path,
    ip: &Path,
    scratch: &Path,
    opts: Options,
) -> Result<Vec<Row>> {
    let _ = fs::remove_dir_all(scratch);
    let ns = Netns::new()?;
    // holdfast with a cgroup per connection (the default), and the same with
    // process groups only: what the kernel's cgroup bookkeeping costs a spawn.
    let _daemon = start_holdfast(holdfast, scratch, "cgroups", HOLDFAST_ADDR, &ns, &[])?;
    let _plain = start_holdfast(
        holdfast,
        scratch,
        "pgroups",
        PGROUPS_ADDR,
        &ns,
        &["--no-cgroups"],
    )?;

    let baseline_log = File::create(scratch.join("socket-activate.log"))?;
    let mut cmd = in_netns(ip, &ns, activate);
    cmd.args(["--accept", "--inetd", "-l", BASELINE_ADDR, "/bin/cat"])
        .stdin(Stdio::null())
        .stdout(baseline_log.try_clone()?)
        .stderr(baseline_log);
    eprintln!("inetd: $ {cmd:?}");
    let _baseline = Reaped(cmd.spawn().context("start systemd-socket-activate")?);

    let ns_file = File::open(ns.path()).with_context(|| format!("open {}", ns.path().display()))?;
    let holdfast_addr: SocketAddr = HOLDFAST_ADDR.parse()?;
    let baseline_addr: SocketAddr = BASELINE_ADDR.parse()?;
    let pgroups_addr: SocketAddr = PGROUPS_ADDR.parse()?;
    for addr in [holdfast_addr, baseline_addr, pgroups_addr] {
        wait_up(&ns_file, addr)?;
    }

    let (mut ours, mut theirs, mut pgroups) =
        (Tally::default(), Tally::default(), Tally::default());
    for round in 0..opts.rounds {
        for (addr, total, who) in [
            (holdfast_addr, &mut ours, "holdfast accept = true"),
            (
                baseline_addr,
                &mut theirs,
                "systemd-socket-activate --accept --inetd",
            ),
            (
                pgroups_addr,
                &mut pgroups,
                "holdfast accept = true --no-cgroups",
            ),
        ] {
            let t = load(&ns_file, addr, opts)?;
            eprintln!(
                "inetd: round {}: {who}: {} connections in {:.2}s ({:.0}/s), {} errors, mean {:.2} ms",
                round + 1,
                t.ok,
                t.seconds,
                t.rate(),
                t.errors.len(),
                t.mean_ms()
            );
            total.add(t);
        }
    }
    for (t, who) in [
        (&ours, "holdfast"),
        (&theirs, "systemd-socket-activate"),
        (&pgroups, "holdfast --no-cgroups"),
    ] {
        ensure!(
            t.errors.is_empty(),
            "{who}: {} of {} connections failed, e.g. {:?}",
            t.errors.len(),
            t.ok as usize + t.errors.len(),
            &t.errors[..t.errors.len().min(5)]
        );
        ensure!(t.ok > 0, "{who}: no connection was served");
    }
    let label = format!("{} client threads, /bin/cat", opts.threads);
    Ok(vec![
        Row::new(
            format!("inetd conn/s, {label} (vs systemd-socket-activate --accept --inetd)"),
            ours.rate(),
            Some(theirs.rate()),
            "conn/s",
        ),
        Row::new(
            format!("inetd mean connection time, {label}"),
            ours.mean_ms(),
            Some(theirs.mean_ms()),
            "ms",
        ),
        Row::new(
            format!("spawn cost: inetd conn/s, a cgroup per connection ÷ process groups (--no-cgroups), {label} (aim ≥ 0.8)"),
            ours.rate(),
            Some(pgroups.rate()),
            "conn/s",
        ),
        Row::new(
            format!("spawn cost: restart of a simple service until running, process groups ÷ cgroups, mean of {RESTARTS} (aim ≥ 0.8)"),
            restart_ms(holdfast, scratch, "pgroups")?,
            Some(restart_ms(holdfast, scratch, "cgroups")?),
            "ms",
        ),
    ])
}

/// Restarts to time per daemon.
const RESTARTS: u32 = 20;

/// Mean wall time of `holdfast restart sleeper` (the reply comes once the
/// new instance runs) against the daemon of state dir `scratch/TAG`.
fn restart_ms(holdfast: &Path, scratch: &Path, tag: &str) -> Result<f64> {
    let state = scratch.join(tag).join("state");
    let mut total = Duration::ZERO;
    for _ in 0..RESTARTS {
        let began = Instant::now();
        let out = Command::new(holdfast)
            .arg("--state-dir")
            .arg(&state)
            .args(["restart", "sleeper"])
            .output()
            .context("holdfast restart")?;
        ensure!(
            out.status.success(),
            "holdfast restart sleeper ({tag}): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        total += began.elapsed();
    }
    Ok(total.as_secs_f64() * 1000.0 / f64::from(RESTARTS))
}

/// `holdfast run` in `ns` on `scratch/TAG`: `cat` (one /bin/cat per
/// connection on `addr`) and `sleeper` (a simple service to restart).
fn start_holdfast(
    holdfast: &Path,
    scratch: &Path,
    tag: &str,
    addr: &str,
    ns: &Netns,
    extra: &[&str],
) -> Result<Reaped> {
    let dir = scratch.join(tag);
    let units = dir.join("units");
    fs::create_dir_all(&units).with_context(|| format!("create {}", units.display()))?;
    let (host, port) = addr.split_once(':').expect("ADDR:PORT");
    fs::write(
        units.join("cat.toml"),
        format!(
            "# One /bin/cat per connection.\n[service]\nexec = [\"/bin/cat\"]\n\n[[socket]]\nprotocol = \"tcp\"\naddresses = [\"{host}/32\"]\nports = [\"{port}\"]\naccept = true\nbacklog = 1024\n"
        ),
    )
    .context("write cat.toml")?;
    fs::write(
        units.join("sleeper.toml"),
        "[service]\nexec = [\"/bin/sleep\", \"1000\"]\nrestart = \"always\"\n",
    )
    .context("write sleeper.toml")?;
    let log = File::create(dir.join("holdfast.log")).context("create holdfast.log")?;
    let mut cmd = Command::new(holdfast);
    cmd.arg("run")
        .arg("--units")
        .arg(&units)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--netns")
        .arg(ns.path())
        .arg("--no-dispatcher")
        .args(extra)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone().context("dup the log")?)
        .stderr(log);
    eprintln!("inetd: $ {cmd:?}");
    Ok(Reaped(cmd.spawn().context("start holdfast run")?))
}

/// What the client threads saw.
#[derive(Debug, Default)]
struct Tally {
    ok: u64,
    /// Summed wall time of the served connections.
    busy: Duration,
    /// Summed wall time of the runs.
    seconds: f64,
    errors: Vec<String>,
}

impl Tally {
    fn rate(&self) -> f64 {
        per(self.ok as f64, self.seconds)
    }

    fn mean_ms(&self) -> f64 {
        per(self.busy.as_secs_f64() * 1000.0, self.ok as f64)
    }

    fn add(&mut self, other: Tally) {
        self.ok += other.ok;
        self.busy += other.busy;
        self.seconds += other.seconds;
        self.errors.extend(other.errors);
    }
}

/// `opts.threads` threads in the namespace, each connecting to `addr` in a loop for
/// `opts.duration`.
fn load(ns: &File, addr: SocketAddr, opts: Options) -> Result<Tally> {
    let start = Instant::now();
    let end = start + opts.duration;
    let per_thread: Vec<Tally> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..opts.threads)
            .map(|_| {
                scope.spawn(move || -> Result<Tally> {
                    enter(ns)?;
                    let mut t = Tally::default();
                    while Instant::now() < end {
                        let began = Instant::now();
                        match one_connection(addr) {
                            Ok(()) => {
                                t.ok += 1;
                                t.busy += began.elapsed();
                            }
                            Err(e) => t.errors.push(format!("{e:#}")),
                        }
                    }
                    Ok(t)
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("client thread"))
            .collect::<Result<_>>()
    })?;
    let seconds = start.elapsed().as_secs_f64();
    let mut total = Tally::default();
    for t in per_thread {
        total.add(t);
    }
    total.seconds = seconds;
    Ok(total)
}

/// Moves the calling thread (only) into the namespace.
fn enter(ns: &File) -> Result<()> {
    // SAFETY: setns(2) on an fd we hold open; it changes only this thread's namespace.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setns into the bench namespace");
    }
    Ok(())
}

/// Connect, send [`LINE`], shut down writing, read to EOF: the answer must be [`LINE`].
fn one_connection(addr: SocketAddr) -> Result<()> {
    let mut s = TcpStream::connect_timeout(&addr, CONN_TIMEOUT).context("connect")?;
    s.set_read_timeout(Some(CONN_TIMEOUT))?;
    s.write_all(LINE).context("write")?;
    s.shutdown(Shutdown::Write).context("shutdown")?;
    let mut got = Vec::new();
    s.read_to_end(&mut got).context("read")?;
    ensure!(
        got == LINE,
        "answered {:?}, want {:?}",
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(LINE)
    );
    Ok(())
}

/// Waits until `addr` answers one connection in the namespace.
fn wait_up(ns: &File, addr: SocketAddr) -> Result<()> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| -> Result<()> {
                enter(ns)?;
                let deadline = Instant::now() + UP_TIMEOUT;
                loop {
                    match one_connection(addr) {
                        Ok(()) => return Ok(()),
                        Err(e) if Instant::now() >= deadline => {
                            return Err(e.context(format!("{addr} not up within {UP_TIMEOUT:?}")))
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(50)),
                    }
                }
            })
            .join()
            .expect("probe thread")
    })
}

/// A child that gets SIGTERM (then SIGKILL after 5 s) and is reaped on drop.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(Some(_))) {
            return;
        }
        // SAFETY: kill(2) takes two integers and touches no memory of ours.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `ip netns exec NAME PROGRAM` (exec keeps the pid: signals reach PROGRAM).
fn in_netns(ip: &Path, ns: &Netns, program: &Path) -> Command {
    let mut cmd = Command::new(ip);
    cmd.args(["netns", "exec", ns.name()]).arg(program);
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tallies_add_up_to_rates() {
        let mut t = Tally {
            ok: 10,
            busy: Duration::from_millis(50),
            seconds: 2.0,
            errors: vec![],
        };
        t.add(Tally {
            ok: 30,
            busy: Duration::from_millis(150),
            seconds: 2.0,
            errors: vec!["connect: refused".into()],
        });
        assert_eq!(t.rate(), 10.0);
        assert_eq!(t.mean_ms(), 5.0);
        assert_eq!(t.errors.len(), 1);
        assert_eq!(Tally::default().rate(), 0.0);
    }
}
