//! Fresh network namespaces for the benchmarks that need real traffic or many
//! sockets: made by `unshare(CLONE_NEWNET)` on the calling thread, with `lo`
//! up and some prefixes local. Only the calling thread moves, so every
//! benchmark runs on a thread of its own ([`on_own_thread`]) and the main
//! thread stays where it was.

use std::fs::File;
use std::process::Command;

use anyhow::{bail, Context as _, Result};
use nix::sched::{setns, unshare, CloneFlags};

/// The path of the calling thread's namespace, for `Dispatcher::attach`.
pub const THREAD_NETNS: &str = "/proc/thread-self/ns/net";

/// A namespace made by [`Netns::create`]; kept alive by its open file.
pub struct Netns {
    file: File,
}

impl Netns {
    /// Moves the calling thread into a new namespace, brings `lo` up and makes
    /// every prefix of `local_routes` local (`ip route add local P dev lo`).
    pub fn create(local_routes: &[&str]) -> Result<Netns> {
        unshare(CloneFlags::CLONE_NEWNET).context("unshare(CLONE_NEWNET) (needs root)")?;
        // A child forked from this thread starts in the thread's namespace.
        ip(&["link", "set", "lo", "up"])?;
        for route in local_routes {
            ip(&["route", "add", "local", route, "dev", "lo"])?;
        }
        let file = File::open(THREAD_NETNS).context("open the new namespace")?;
        Ok(Netns { file })
    }

    /// Moves the calling thread (back) into this namespace.
    pub fn enter(&self) -> Result<()> {
        setns(&self.file, CloneFlags::CLONE_NEWNET).context("setns into a benchmark namespace")
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

/// Runs `f` on a new thread (which may then change namespaces freely) and
/// returns its result.
pub fn on_own_thread<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(f)
        .context("spawn a benchmark thread")?
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}
