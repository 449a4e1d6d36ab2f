//! Network namespaces for tests: one fresh, uniquely named namespace per test,
//! entered per thread (network namespaces belong to threads, so tests that run in
//! parallel never see each other's sockets), and torn down with everything left in it.

use std::fs::File;
use std::marker::PhantomData;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, Context, Result};
use nix::sched::{setns, CloneFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A network namespace made with `ip netns add hf-<pid>-<counter>`, with `lo` up.
///
/// Dropping it SIGKILLs every process still inside it (other than this test
/// process) and deletes it with `ip netns del`.
#[derive(Debug)]
pub struct Netns {
    name: String,
    path: PathBuf,
}

impl Netns {
    /// Creates the namespace and brings `lo` up (so 127.0.0.1 and ::1 work).
    pub fn new() -> Result<Netns> {
        let name = format!(
            "hf-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &name])?;
        let ns = Netns {
            path: Path::new("/run/netns").join(&name),
            name,
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The name `ip netns` knows it by.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/NAME`, the bind mount that keeps the namespace alive.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens the namespace file, e.g. to `setns()` a child into it.
    pub fn open(&self) -> Result<File> {
        File::open(&self.path).with_context(|| format!("open {}", self.path.display()))
    }

    /// Runs `ip -n NAME ARGS…` and fails with its stderr when it fails.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Makes every address of `prefix` local in the namespace
    /// (`ip -n NAME route add local PREFIX dev lo`), IPv4 or IPv6.
    pub fn add_local_route(&self, prefix: &str) -> Result<()> {
        let family = if prefix.contains(':') { "-6" } else { "-4" };
        self.ip(&[family, "route", "add", "local", prefix, "dev", "lo"])
    }

    /// Moves the current thread into the namespace until the guard is dropped.
    ///
    /// Only this thread moves: sockets it creates belong to the namespace (and stay
    /// there whichever thread uses them later); other threads are unaffected.
    pub fn enter(&self) -> Result<NetnsGuard> {
        let previous =
            File::open("/proc/thread-self/ns/net").context("open /proc/thread-self/ns/net")?;
        let target = self.open()?;
        setns(&target, CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("setns into {}", self.name))?;
        Ok(NetnsGuard {
            previous,
            _same_thread: PhantomData,
        })
    }

    /// A command for `program` that starts inside the namespace (`setns` between
    /// fork and exec), whichever namespace the calling thread is in.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
        let netns = self.open()?;
        let mut cmd = Command::new(program);
        // SAFETY: setns is async-signal-safe and allocates nothing; the fd was
        // opened before the fork (O_CLOEXEC) and lives in the closure until exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(cmd)
    }

    /// Runs `f` on a fresh thread inside the namespace and returns its result.
    /// Panics in `f` propagate.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let _inside = self.enter()?;
                    Ok(f())
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Pids of the processes inside the namespace (`ip netns pids`), this test
    /// process excluded.
    pub fn pids(&self) -> Result<Vec<i32>> {
        let out = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
            .context("run ip netns pids")?;
        if !out.status.success() {
            bail!(
                "ip netns pids {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let me = std::process::id() as i32;
        Ok(String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .filter(|&p| p != me)
            .collect())
    }

    /// Fails unless every process in the namespace is gone within 2 s (a daemon
    /// that exited must not leave services or orphans behind), naming those left.
    pub fn expect_empty(&self) -> Result<()> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        loop {
            let left = self.pids()?;
            if left.is_empty() {
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                let named: Vec<String> = left
                    .iter()
                    .map(|p| {
                        let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
                        format!("{p} {:?}", String::from_utf8_lossy(&cmd).replace('\0', " "))
                    })
                    .collect();
                bail!("processes left in {}: {}", self.name, named.join(", "));
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Leftovers (a service whose daemon was SIGKILLed, a grandchild that
        // escaped) must not outlive the test.
        if let Ok(pids) = self.pids() {
            for pid in pids {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("warning: {e:#}");
        }
    }
}

/// The current thread's stay in a [`Netns`]; dropping it moves the thread back.
/// Not `Send`: it must be dropped on the thread that entered.
#[derive(Debug)]
#[must_use = "the thread leaves the namespace when the guard is dropped"]
pub struct NetnsGuard {
    previous: File,
    _same_thread: PhantomData<*const ()>,
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        if let Err(e) = setns(&self.previous, CloneFlags::CLONE_NEWNET) {
            // A test thread left in a test namespace would run later tests there.
            eprintln!("fatal: cannot restore the network namespace of this thread: {e}");
            std::process::abort();
        }
    }
}

/// Runs `ip ARGS…`, failing with its stderr.
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
