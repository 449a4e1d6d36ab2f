//! A fresh network namespace per privileged test (`ip netns add hf-ex-…`, `lo` up), entered by
//! the test thread only (network namespaces belong to threads; children spawned from that
//! thread start inside it), left on drop of the guard and deleted on drop of the namespace.
//!
//! Privilege policy: under `CI=true` a test that cannot get its namespace panics; elsewhere it
//! skips, printing the probe that failed.

use std::fs::File;
use std::marker::PhantomData;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use nix::sched::{setns, CloneFlags};

static COUNTER: AtomicU32 = AtomicU32::new(0);

pub struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Result<Netns, String> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let name = format!(
            "hf-ex-{}-{}-{:x}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            nanos
        );
        ip(&["netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n NAME ARGS…`.
    pub fn ip(&self, args: &[&str]) -> Result<(), String> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Moves the calling thread into the namespace until the guard drops.
    pub fn enter(&self) -> NetnsGuard {
        let previous =
            File::open("/proc/thread-self/ns/net").expect("open /proc/thread-self/ns/net");
        let target = File::open(format!("/run/netns/{}", self.name)).expect("open the netns file");
        setns(&target, CloneFlags::CLONE_NEWNET).expect("setns into the test netns");
        NetnsGuard {
            previous,
            _not_send: PhantomData,
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("warning: {e}");
        }
    }
}

/// The thread's stay in a [`Netns`]. Not `Send`: it must drop on the thread that entered.
#[must_use]
pub struct NetnsGuard {
    previous: File,
    _not_send: PhantomData<*const ()>,
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        setns(&self.previous, CloneFlags::CLONE_NEWNET).expect("setns back to the original netns");
    }
}

/// A fresh namespace with `routes` (`ip route add local PREFIX dev lo` each), or None after
/// printing why (outside CI only: under `CI=true` the failed probe panics).
pub fn netns_or_skip(test: &str, routes: &[&str]) -> Option<Netns> {
    let probe = (|| {
        if !nix::unistd::geteuid().is_root() {
            return Err("not root (euid != 0)".to_owned());
        }
        let ns = Netns::new()?;
        for prefix in routes {
            let family = if prefix.contains(':') { "-6" } else { "-4" };
            ns.ip(&[family, "route", "add", "local", prefix, "dev", "lo"])?;
        }
        Ok(ns)
    })();
    match probe {
        Ok(ns) => Some(ns),
        Err(e) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("{test}: needs a network namespace, and CI=true: {e}")
        }
        Err(e) => {
            eprintln!("skipped {test}: network namespace probe failed: {e}");
            None
        }
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("run ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}
