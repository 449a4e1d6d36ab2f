//! The reload and memory benchmarks of issue 5, run against the release `holdfast` in a
//! network namespace of their own (`ip netns add`, so root):
//! - `reload-10k`: a reload that adds 10,000 bindings, one that replaces them with 10,000
//!   others, one that removes them, each timed against a reload that changes nothing (same
//!   run, 10k bindings in place), while a client connects in a loop to a binding that stays;
//!   a refused, misrouted or failed connection fails the step.
//! - `rss-100`: the supervisor's resident memory with 100 services ÷ with 1, for quiet
//!   services and for services whose log ring (1000 lines) is full.

use std::fs::{self, File};
use std::io::{self, Read};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::report::{self as shell, Env as Bench, Row, Skip};

/// The binding the loop client uses: in every unit set of `reload-10k`.
const STAY: &str = "192.0.2.1:80";
/// Bindings each reload of `reload-10k` adds or removes.
const CHURN: usize = 10_000;
/// Services in the large `rss-100` daemon.
const MANY: usize = 100;

/// A network namespace for one step, deleted (with every process left in it) on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new(step: &str) -> Result<Netns> {
        let name = format!("hfbench-{step}-{}", std::process::id());
        ip(&["netns", "add", &name])?;
        let ns = Netns { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    fn route_local(&self, prefix: &str) -> Result<()> {
        ip(&[
            "-n", &self.name, "route", "add", "local", prefix, "dev", "lo",
        ])
    }

    fn open(&self) -> Result<File> {
        File::open(Path::new("/run/netns").join(&self.name))
            .with_context(|| format!("open netns {}", self.name))
    }
}

/// Moves the calling thread (one of its own) into the namespace open as `f`, for good.
fn enter(f: &File) -> Result<()> {
    // SAFETY: setns takes an fd we own, open for the call, and a flag; it changes only
    // the calling thread's network namespace.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error()).context("setns");
    }
    Ok(())
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    // SAFETY: kill takes plain integers; these pids are in our namespace.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        let _ = ip(&["netns", "del", &self.name]);
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("run ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// `holdfast run` in a namespace on a scratch directory (units/, state/, holdfast.log).
struct Daemon {
    child: Child,
    holdfast: PathBuf,
    dir: PathBuf,
}

impl Daemon {
    fn start(b: &Bench, ns: &Netns, dir: &Path) -> Result<Daemon> {
        let holdfast = b.bin_dir.join("holdfast");
        let log = File::create(dir.join("holdfast.log"))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .arg(&holdfast)
            .arg("run")
            .arg("--units")
            .arg(dir.join("units"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn holdfast run")?;
        let mut d = Daemon {
            child,
            holdfast,
            dir: dir.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while d.cli(&["status", "--json"]).is_err() {
            if let Some(status) = d.child.try_wait()? {
                bail!("holdfast run exited with {status}; its log:\n{}", d.log());
            }
            if Instant::now() > deadline {
                bail!("holdfast run not ready in 30 s; its log:\n{}", d.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(d)
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.join("holdfast.log")).unwrap_or_default()
    }

    /// `holdfast ARGS… --state-dir`, its stdout; an error unless it exits 0.
    fn cli(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(&self.holdfast)
            .args(args)
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .stdin(Stdio::null())
            .output()
            .context("run the holdfast CLI")?;
        if !out.status.success() {
            bail!(
                "holdfast {} exited with {}: {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `holdfast reload`, timed in seconds.
    fn timed_reload(&self) -> Result<f64> {
        let start = Instant::now();
        self.cli(&["reload"])?;
        Ok(start.elapsed().as_secs_f64())
    }

    /// Waits until `n` services are running.
    fn wait_running(&self, n: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let status: serde_json::Value =
                serde_json::from_str(&self.cli(&["status", "--json"])?)?;
            let running = status
                .as_array()
                .into_iter()
                .flatten()
                .filter(|s| s["state"] == "running")
                .count();
            if running == n {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{running} of {n} services running after {timeout:?}: {status}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// VmRSS of the daemon, in bytes.
    fn rss(&self) -> Result<f64> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let kb: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .context("no VmRSS")?;
        Ok(kb * 1024.0)
    }

    fn stop(mut self) -> Result<()> {
        // SAFETY: kill takes plain integers; the pid is our child's.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    bail!(
                        "holdfast run exited with {status}; its log:\n{}",
                        self.log()
                    );
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                bail!("holdfast run did not stop in 30 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A scratch directory with units/ and state/, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(b: &Bench, step: &str) -> Result<Scratch> {
        let dir = b
            .scratch
            .join(format!("bench-{step}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        for sub in ["units", "state", "out"] {
            fs::create_dir_all(dir.join(sub))?;
        }
        Ok(Scratch(dir))
    }
    fn unit(&self, name: &str, text: &str) -> Result<()> {
        fs::write(self.0.join("units").join(format!("{name}.toml")), text)?;
        Ok(())
    }
    fn remove_unit(&self, name: &str) -> Result<()> {
        fs::remove_file(self.0.join("units").join(format!("{name}.toml")))?;
        Ok(())
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn need_root() -> Result<()> {
    if !shell::is_root() {
        return Err(Skip("needs root (a network namespace of its own)".into()).into());
    }
    Ok(())
}

/// A TOML array of strings.
fn toml_list<S: AsRef<str>>(items: impl IntoIterator<Item = S>) -> String {
    let quoted: Vec<String> = items
        .into_iter()
        .map(|s| format!("\"{}\"", s.as_ref()))
        .collect();
    format!("[{}]", quoted.join(", "))
}

/// A unit running tests/src/serve.py (answers `"NAME PID\n"`) on TCP `addresses` × port 80.
fn serve_unit(b: &Bench, scratch: &Scratch, name: &str, addresses: &[String]) -> String {
    let serve = b.root.join("tests/src/serve.py");
    let report = scratch.0.join("out").join(format!("{name}.json"));
    format!(
        "[service]\nexec = {}\n\n[[socket]]\nname = \"{name}\"\nprotocol = \"tcp\"\naddresses = {}\nports = [\"80\"]\n",
        toml_list([
            "/usr/bin/python3",
            "-I",
            "-S",
            &serve.to_string_lossy(),
            &report.to_string_lossy(),
        ]),
        toml_list(addresses)
    )
}

/// `count` host prefixes in 10.`block`.0.0/16 and up: 10.B.x.y/32.
fn hosts(block: u8, count: usize) -> Vec<String> {
    (0..count)
        .map(|i| {
            format!(
                "10.{}.{}.{}/32",
                usize::from(block) + i / 65536,
                (i / 256) % 256,
                i % 256
            )
        })
        .collect()
}

/// What the loop client saw.
#[derive(Debug, Default)]
struct Tally {
    answered: u64,
    refused: u64,
    misrouted: u64,
    failed: u64,
}

/// Connects to [`STAY`] in a loop from a thread inside `ns` until `done`.
fn loop_client(
    ns: &Netns,
    done: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<Result<Tally>>> {
    let ns_file = ns.open()?;
    Ok(std::thread::spawn(move || -> Result<Tally> {
        enter(&ns_file)?;
        let addr: SocketAddr = STAY.parse()?;
        let mut t = Tally::default();
        while !done.load(Ordering::Relaxed) {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
                Ok(mut s) => {
                    s.set_read_timeout(Some(Duration::from_secs(5)))?;
                    let mut answer = String::new();
                    match s.read_to_string(&mut answer) {
                        Ok(_) if answer.starts_with("stay ") => t.answered += 1,
                        Ok(_) => t.misrouted += 1,
                        Err(_) => t.failed += 1,
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => t.refused += 1,
                Err(_) => t.failed += 1,
            }
        }
        Ok(t)
    }))
}

/// One connection to `addr` from inside `ns`: the answer, or `None` when refused.
fn ask(ns: &Netns, addr: &str) -> Result<Option<String>> {
    let f = ns.open()?;
    let addr: SocketAddr = addr.parse()?;
    std::thread::spawn(move || -> Result<Option<String>> {
        enter(&f)?;
        match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(mut s) => {
                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                let mut answer = String::new();
                s.read_to_string(&mut answer)?;
                Ok(Some(answer))
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Ok(None),
            Err(e) => Err(e).with_context(|| format!("connect {addr}")),
        }
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the client thread panicked"))?
}

/// Fails unless `addr` answers from `service` (or, for `None`, refuses).
fn expect_answer(ns: &Netns, addr: &str, service: Option<&str>) -> Result<()> {
    let got = ask(ns, addr)?;
    let ok = match (&got, service) {
        (Some(a), Some(s)) => a.starts_with(&format!("{s} ")),
        (None, None) => true,
        _ => false,
    };
    if !ok {
        bail!("{addr}: got {got:?}, want an answer from {service:?} (None: refused)");
    }
    Ok(())
}

/// The median of a few no-op reloads: the baseline.
fn noop_reload(d: &Daemon) -> Result<f64> {
    let mut times: Vec<f64> = (0..5).map(|_| d.timed_reload()).collect::<Result<_>>()?;
    times.sort_by(f64::total_cmp);
    Ok(times[2])
}

pub fn reload_10k(b: &Bench) -> Result<Vec<Row>> {
    need_root()?;
    let ns = Netns::new("reload")?;
    for prefix in ["192.0.2.0/24", "10.0.0.0/8"] {
        ns.route_local(prefix)?;
    }
    let scratch = Scratch::new(b, "reload")?;
    scratch.unit(
        "stay",
        &serve_unit(b, &scratch, "stay", &["192.0.2.1/32".into()]),
    )?;
    let d = Daemon::start(b, &ns, &scratch.0)?;
    d.wait_running(1, Duration::from_secs(30))?;

    let done = Arc::new(AtomicBool::new(false));
    let client = loop_client(&ns, done.clone())?;
    // Each change is timed against a reload that changes nothing with the 10k bindings in
    // place (the units are read and the binding set published either way), measured
    // just before it; that no-op reload is itself shown against one with 1 binding.
    let result = (|| -> Result<Vec<(String, f64, f64)>> {
        let mut timed = Vec::new();
        let set_a = hosts(0, CHURN);
        let set_b = hosts(100, CHURN);
        let small = noop_reload(&d)?;
        scratch.unit("churn", &serve_unit(b, &scratch, "churn", &set_a))?;
        let add = d.timed_reload()?;
        d.wait_running(2, Duration::from_secs(30))?;
        expect_answer(&ns, "10.0.39.15:80", Some("churn"))?;
        let large = noop_reload(&d)?;
        timed.push((
            "reload: nothing changed, 10k bindings / 1".into(),
            large,
            small,
        ));
        timed.push(("reload: add 10k bindings".into(), add, large));
        scratch.unit("churn", &serve_unit(b, &scratch, "churn", &set_b))?;
        let replace = d.timed_reload()?;
        expect_answer(&ns, "10.100.39.15:80", Some("churn"))?;
        expect_answer(&ns, "10.0.39.15:80", None)?;
        let large = noop_reload(&d)?;
        timed.push((
            "reload: replace 10k bindings by 10k others".into(),
            replace,
            large,
        ));
        scratch.remove_unit("churn")?;
        timed.push((
            "reload: remove 10k bindings".into(),
            d.timed_reload()?,
            large,
        ));
        expect_answer(&ns, "10.100.39.15:80", None)?;
        Ok(timed)
    })();
    // Let the client see the final set too.
    std::thread::sleep(Duration::from_millis(200));
    done.store(true, Ordering::Relaxed);
    let tally = client
        .join()
        .map_err(|_| anyhow::anyhow!("the loop client panicked"))??;
    let log = d.log();
    d.stop()?;
    let timed = result.with_context(|| format!("the daemon's log:\n{log}"))?;
    eprintln!("bench: reload-10k: loop client {tally:?}");
    if tally.refused + tally.misrouted + tally.failed > 0 || tally.answered == 0 {
        bail!("the loop client during the reloads: {tally:?} (want only answers)");
    }
    let mut rows: Vec<Row> = timed
        .into_iter()
        .map(|(name, value, base)| Row::new(name, value * 1e3, Some(base * 1e3), "ms"))
        .collect();
    rows.push(Row::new(
        "reload 10k: connections refused or misrouted",
        (tally.refused + tally.misrouted) as f64,
        None,
        "conn",
    ));
    rows.push(Row::new(
        "reload 10k: connections answered during the reloads",
        tally.answered as f64,
        None,
        "conn",
    ));
    Ok(rows)
}

/// The daemon's RSS with `n` services running `exec` (a TOML array).
fn rss_with(b: &Bench, ns: &Netns, n: usize, exec: &str) -> Result<f64> {
    let scratch = Scratch::new(b, &format!("rss{n}"))?;
    for i in 0..n {
        scratch.unit(&format!("s{i:03}"), &format!("[service]\nexec = {exec}\n"))?;
    }
    let d = Daemon::start(b, ns, &scratch.0)?;
    d.wait_running(n, Duration::from_secs(120))?;
    // Let the services print what they print, and the daemon read it.
    std::thread::sleep(Duration::from_secs(2));
    let rss = d.rss()?;
    d.stop()?;
    Ok(rss)
}

pub fn rss_100(b: &Bench) -> Result<Vec<Row>> {
    need_root()?;
    let ns = Netns::new("rss")?;
    let quiet = toml_list(["/bin/sleep", "100000"]);
    // 1000 lines of 100 bytes (the whole ring), then quiet.
    let chatty = toml_list([
        "/bin/sh",
        "-c",
        "i=0; while [ $i -lt 1000 ]; do printf '%099d\\n' $i; i=$((i+1)); done; exec sleep 100000",
    ]);
    let mib = 1024.0 * 1024.0;
    let one = rss_with(b, &ns, 1, &quiet)?;
    let many = rss_with(b, &ns, MANY, &quiet)?;
    let one_chatty = rss_with(b, &ns, 1, &chatty)?;
    let many_chatty = rss_with(b, &ns, MANY, &chatty)?;
    Ok(vec![
        Row::new(
            "supervisor RSS: 100 services / 1",
            many / mib,
            Some(one / mib),
            "MiB",
        ),
        Row::new(
            "supervisor RSS: 100 services with full log rings / 1",
            many_chatty / mib,
            Some(one_chatty / mib),
            "MiB",
        ),
    ])
}
