//! Fresh network namespaces for the benchmarks that need real traffic or many
//! sockets: the kit's [`holdfast_testkit::Netns`] (`lo` up, some prefixes
//! local, deleted with what is left in it on drop), entered by the calling
//! thread for good. Only the calling thread moves, so every benchmark runs on
//! a thread of its own ([`on_own_thread`]) and the main thread stays where it
//! was.

use anyhow::{Context as _, Result};
use nix::sched::{setns, CloneFlags};

/// The path of the calling thread's namespace, for `Dispatcher::attach`.
pub const THREAD_NETNS: &str = "/proc/thread-self/ns/net";

/// A namespace made by [`Netns::create`].
pub struct Netns(holdfast_testkit::Netns);

impl Netns {
    /// Moves the calling thread into a new namespace and makes every prefix of
    /// `local_routes` local (`ip route add local P dev lo`).
    pub fn create(local_routes: &[&str]) -> Result<Netns> {
        let ns = holdfast_testkit::Netns::new()?;
        for route in local_routes {
            ns.add_local_route(route)?;
        }
        let ns = Netns(ns);
        ns.enter()?;
        Ok(ns)
    }

    /// Moves the calling thread (back) into this namespace.
    pub fn enter(&self) -> Result<()> {
        setns(self.0.open()?, CloneFlags::CLONE_NEWNET).context("setns into a benchmark namespace")
    }
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
