//! The signals holdfast does not use: each gets a handler that only sets a
//! flag, so that none of them can kill or stop the daemon (with the default
//! action SIGUSR1, SIGALRM, SIGQUIT … would terminate it and orphan every
//! service), and [`Unused::log_received`] logs, from the event loop, which came.
//!
//! What holdfast does with every signal (README.md "Signals" says the same):
//! - used by the daemon core: SIGTERM and SIGINT (stop everything, exit 0),
//!   SIGHUP (reload), SIGCHLD (reap);
//! - [`UPGRADE_SIGNAL`] (SIGUSR2): the in-place upgrade, as `holdfast upgrade`
//!   (handled by the daemon core, not here);
//! - logged and ignored: SIGUSR1, SIGQUIT, SIGALRM, SIGPIPE, SIGVTALRM, SIGPROF,
//!   SIGIO, SIGPWR, SIGXCPU, SIGXFSZ, SIGSTKFLT, the job-control stops SIGTSTP,
//!   SIGTTIN, SIGTTOU (a stopped supervisor would stall every service), and
//!   every real-time signal SIGRTMIN…SIGRTMAX;
//! - left at their default action: the faults SIGSEGV, SIGBUS, SIGILL, SIGFPE,
//!   SIGTRAP, SIGSYS and SIGABRT (holdfast itself is broken; the kernel kills
//!   it whatever the disposition), SIGKILL and SIGSTOP (cannot be caught);
//!   SIGCONT, SIGURG and SIGWINCH are ignored by default.
//!
//! Handlers, unlike ignored dispositions, are reset by exec, so services start
//! with every signal at its default (spawn also resets them).

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The signal of the in-place upgrade (`kill -USR2 <holdfast>`).
pub const UPGRADE_SIGNAL: libc::c_int = libc::SIGUSR2;

/// The classic signals holdfast catches only so that they do nothing.
const IGNORED: &[libc::c_int] = &[
    libc::SIGUSR1,
    libc::SIGQUIT,
    libc::SIGALRM,
    libc::SIGPIPE,
    libc::SIGVTALRM,
    libc::SIGPROF,
    libc::SIGIO,
    libc::SIGPWR,
    libc::SIGXCPU,
    libc::SIGXFSZ,
    libc::SIGSTKFLT,
    libc::SIGTSTP,
    libc::SIGTTIN,
    libc::SIGTTOU,
];

/// Every signal [`catch_unused`] handles: [`IGNORED`] and the real-time ones.
pub fn unused() -> Vec<libc::c_int> {
    IGNORED
        .iter()
        .copied()
        .chain(libc::SIGRTMIN()..=libc::SIGRTMAX())
        .collect()
}

/// The handlers of the unused signals; dropping it keeps them installed.
pub struct Unused {
    received: Vec<(libc::c_int, Arc<AtomicBool>)>,
}

/// Installs a flag-setting handler for every signal in [`unused`]. Call it
/// first thing in the daemon, before anything a signal could interrupt.
pub fn catch_unused() -> io::Result<Unused> {
    let mut received = Vec::new();
    for sig in unused() {
        let flag = Arc::new(AtomicBool::new(false));
        signal_hook::flag::register(sig, flag.clone())?;
        received.push((sig, flag));
    }
    Ok(Unused { received })
}

impl Unused {
    /// Logs each unused signal that arrived since the last call (once per
    /// signal and call, however many came).
    pub fn log_received(&self) {
        for (sig, flag) in &self.received {
            if !flag.swap(false, Ordering::SeqCst) {
                continue;
            }
            let name = name(*sig);
            tracing::info!(signal = %name, "received {name}: holdfast does not use it; ignored");
        }
    }
}

/// `SIGUSR1`, `SIGRTMIN+3`, …
pub fn name(sig: libc::c_int) -> String {
    if (libc::SIGRTMIN()..=libc::SIGRTMAX()).contains(&sig) {
        return format!("SIGRTMIN+{}", sig - libc::SIGRTMIN());
    }
    nix::sys::signal::Signal::try_from(sig)
        .map(|s| s.as_str().to_string())
        .unwrap_or_else(|_| format!("signal {sig}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_the_list() {
        assert_eq!(name(libc::SIGUSR2), "SIGUSR2");
        assert_eq!(name(libc::SIGRTMIN() + 2), "SIGRTMIN+2");
        let all = unused();
        for used in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGCHLD] {
            assert!(!all.contains(&used), "{} is used", name(used));
        }
        for fault in [
            libc::SIGSEGV,
            libc::SIGBUS,
            libc::SIGILL,
            libc::SIGFPE,
            libc::SIGABRT,
        ] {
            assert!(!all.contains(&fault), "{} keeps its default", name(fault));
        }
        // The upgrade's signal has its own handler (supervisor::run), not this one.
        assert!(!all.contains(&UPGRADE_SIGNAL), "SIGUSR2 is the upgrade's");
        assert!(all.contains(&libc::SIGRTMAX()));
    }
}
