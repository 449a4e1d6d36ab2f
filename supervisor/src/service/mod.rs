//! One service's lifecycle as pure bookkeeping: its states, how a process
//! ended, restart backoff, the start limit, and (`machine`) the state machine
//! that decides what happens to a service and returns the effects the
//! daemon carries out. No processes, no signals, no clock of its own.

mod machine;
pub mod mono;

pub use machine::{
    deadline, CommandKind, Effect, Instance, InstanceId, Machine, Role, Said, SpawnRole,
};

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Where a service is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    /// Spawned; waiting for READY=1 (notify services).
    Starting,
    Running,
    /// SIGTERM sent; SIGKILL at the deadline.
    Stopping,
    /// Exited; a restart is due after the delay.
    Waiting,
    /// Not running and not to be restarted until asked.
    Stopped,
    /// Hit its start limit (or could not be spawned); left alone until asked.
    Failed,
    /// The main instance said RELOADING=1; READY=1 brings it back to running.
    Reloading,
    /// Waiting for traffic: an on-demand service not running, or an accept
    /// service (its per-connection instances are counted apart).
    Listening,
}

impl State {
    /// Every state, in the order the docs and metrics list them.
    pub const ALL: [State; 8] = [
        State::Starting,
        State::Running,
        State::Reloading,
        State::Stopping,
        State::Waiting,
        State::Stopped,
        State::Failed,
        State::Listening,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Listening => "listening",
            State::Running => "running",
            State::Stopping => "stopping",
            State::Waiting => "waiting",
            State::Stopped => "stopped",
            State::Failed => "failed",
            State::Reloading => "reloading",
        }
    }
}

/// How a main process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind", content = "value")]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

impl Exit {
    pub fn success(self) -> bool {
        self == Exit::Code(0)
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exit code {c}"),
            Exit::Signal(s) => {
                let name = nix::sys::signal::Signal::try_from(*s)
                    .map(|s| s.as_str())
                    .unwrap_or("unknown signal");
                write!(f, "killed by {name}")
            }
        }
    }
}

/// Restart delays that double while a service keeps dying quickly, capped,
/// and reset once it has stayed up for `stable_after`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    stable_after: Duration,
    quick_deaths: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration, stable_after: Duration) -> Backoff {
        Backoff {
            base,
            max: max.max(base),
            stable_after,
            quick_deaths: 0,
        }
    }

    /// The delay before the next start, given how long the last run lasted.
    pub fn next_delay(&mut self, uptime: Duration) -> Duration {
        if uptime >= self.stable_after {
            self.quick_deaths = 0;
        }
        let shift = self.quick_deaths.min(31);
        self.quick_deaths = self.quick_deaths.saturating_add(1);
        self.base
            .checked_mul(1u32 << shift)
            .unwrap_or(self.max)
            .min(self.max)
    }

    pub fn reset(&mut self) {
        self.quick_deaths = 0;
    }
}

/// At most `burst` starts within any `interval`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StartLimit {
    burst: u32,
    interval: Duration,
    #[serde(with = "mono::deque")]
    starts: VecDeque<Instant>,
}

impl StartLimit {
    pub fn new(burst: u32, interval: Duration) -> StartLimit {
        StartLimit {
            burst: burst.max(1),
            interval,
            starts: VecDeque::new(),
        }
    }

    /// Records a start at `now`, or refuses it when the limit is hit.
    pub fn try_start(&mut self, now: Instant) -> bool {
        while let Some(&t) = self.starts.front() {
            if now.saturating_duration_since(t) >= self.interval {
                self.starts.pop_front();
            } else {
                break;
            }
        }
        if self.starts.len() as u32 >= self.burst {
            return false;
        }
        self.starts.push_back(now);
        true
    }

    pub fn reset(&mut self) {
        self.starts.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn backoff_doubles_caps_and_resets() {
        let mut b = Backoff::new(100 * MS, 1000 * MS, 10_000 * MS);
        let quick = 10 * MS;
        let got: Vec<u128> = (0..6).map(|_| b.next_delay(quick).as_millis()).collect();
        assert_eq!(got, vec![100, 200, 400, 800, 1000, 1000]);
        // Stayed up long enough: back to the base delay.
        assert_eq!(b.next_delay(10_000 * MS).as_millis(), 100);
        assert_eq!(b.next_delay(quick).as_millis(), 200);
    }

    #[test]
    fn start_limit_counts_within_the_interval() {
        let t0 = Instant::now();
        let mut l = StartLimit::new(3, 1000 * MS);
        assert!(l.try_start(t0));
        assert!(l.try_start(t0 + 100 * MS));
        assert!(l.try_start(t0 + 200 * MS));
        assert!(!l.try_start(t0 + 300 * MS));
        // The first start has left the window.
        assert!(l.try_start(t0 + 1000 * MS));
        l.reset();
        assert!(l.try_start(t0 + 1001 * MS));
    }
}
