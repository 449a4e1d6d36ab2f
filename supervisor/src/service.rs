//! One service's lifecycle: its state machine, restart policy, backoff and
//! start limit. Pure bookkeeping over instants and exit statuses: it decides,
//! the supervisor acts (spawn, kill). Testable without processes.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::unit::{RestartPolicy, ServiceConfig};

/// How far ahead [`deadline`] reaches when `now + d` cannot be represented:
/// about 100 years, "never" for any service.
const FAR_FUTURE: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// `now + d` without the panic `Instant + Duration` gives on overflow: a
/// deadline too far to represent becomes [`FAR_FUTURE`] from now (and `now`
/// itself only if even that overflows). Every deadline the supervisor
/// computes from a configured or notified duration goes through here.
pub fn deadline(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .or_else(|| now.checked_add(FAR_FUTURE))
        .unwrap_or(now)
}

/// Where a service is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
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
    /// Waiting for traffic: an on-demand service not running, or an accept
    /// service (its per-connection instances are counted apart).
    Listening,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Listening => "listening",
            State::Running => "running",
            State::Stopping => "stopping",
            State::Waiting => "waiting",
            State::Stopped => "stopped",
            State::Failed => "failed",
        }
    }
}

/// How a main process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
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

/// What the supervisor should do after a main process exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterExit {
    /// Start again at this instant.
    RestartAt(Instant),
    /// Stay down in this state (`Stopped` or `Failed`).
    Stay(State),
}

/// Restart delays that double while a service keeps dying quickly, capped,
/// and reset once it has stayed up for `stable_after`.
#[derive(Debug, Clone)]
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
#[derive(Debug, Clone)]
pub struct StartLimit {
    burst: u32,
    interval: Duration,
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

/// The decisions for one service.
#[derive(Debug, Clone)]
pub struct Lifecycle {
    pub state: State,
    pub restart: RestartPolicy,
    pub backoff: Backoff,
    pub start_limit: StartLimit,
    /// Set by `stop`: the next exit is final.
    pub stop_requested: bool,
    /// Set by `restart`: the next exit starts again at once.
    pub restart_requested: bool,
}

impl Lifecycle {
    pub fn new(cfg: &ServiceConfig) -> Lifecycle {
        Lifecycle {
            state: State::Stopped,
            restart: cfg.restart,
            backoff: Backoff::new(
                cfg.restart_delay,
                cfg.restart_delay_max,
                cfg.start_limit_interval,
            ),
            start_limit: StartLimit::new(cfg.start_limit_burst, cfg.start_limit_interval),
            stop_requested: false,
            restart_requested: false,
        }
    }

    /// Decides what follows a main process's exit after `uptime`. `failed`: the run
    /// failed (a non-zero exit, a signal, or stopped by holdfast for a
    /// start or watchdog timeout, whatever its exit status).
    pub fn after_exit(&mut self, failed: bool, uptime: Duration, now: Instant) -> AfterExit {
        if self.stop_requested {
            self.stop_requested = false;
            self.restart_requested = false;
            return AfterExit::Stay(State::Stopped);
        }
        if self.restart_requested {
            self.restart_requested = false;
            self.backoff.reset();
            return AfterExit::RestartAt(now);
        }
        let wanted = match self.restart {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => failed,
            RestartPolicy::Never => false,
        };
        if !wanted {
            return AfterExit::Stay(if failed {
                State::Failed
            } else {
                State::Stopped
            });
        }
        AfterExit::RestartAt(deadline(now, self.backoff.next_delay(uptime)))
    }

    /// An explicit `start`: clears the failure and the start limit.
    pub fn reset(&mut self) {
        self.backoff.reset();
        self.start_limit.reset();
        self.stop_requested = false;
        self.restart_requested = false;
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
    fn deadlines_saturate_instead_of_panicking() {
        let now = Instant::now();
        assert_eq!(deadline(now, 5 * MS), now + 5 * MS);
        let far = deadline(now, Duration::MAX);
        assert_eq!(far, now + FAR_FUTURE);
        assert_eq!(
            deadline(now, Duration::from_secs(u64::MAX)),
            far,
            "18446744073709551615s"
        );
        // A restart delay that overflows `Instant` (the backoff caps at
        // restart-delay-max, which the unit bounds; a hand-built config may not).
        let mut c = cfg(RestartPolicy::Always);
        c.restart_delay = Duration::MAX;
        c.restart_delay_max = Duration::MAX;
        let mut l = Lifecycle::new(&c);
        assert_eq!(l.after_exit(true, MS, now), AfterExit::RestartAt(far));
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

    fn cfg(restart: RestartPolicy) -> ServiceConfig {
        ServiceConfig {
            exec: vec!["x".into()],
            kind: crate::unit::ServiceType::Simple,
            restart,
            restart_mode: crate::unit::RestartMode::StopStart,
            restart_delay: 100 * MS,
            restart_delay_max: 1000 * MS,
            stop_timeout: 1000 * MS,
            start_timeout: 1000 * MS,
            start_limit_burst: 5,
            start_limit_interval: 10_000 * MS,
            watchdog: None,
            fd_store_max: 0,
            single_instance: false,
            on_demand: false,
            environment: Default::default(),
            working_directory: None,
            user: None,
            group: None,
        }
    }

    #[test]
    fn restart_policies() {
        let now = Instant::now();
        let cases = [
            (RestartPolicy::Always, Exit::Code(0), true),
            (RestartPolicy::Always, Exit::Code(1), true),
            (RestartPolicy::OnFailure, Exit::Code(0), false),
            (RestartPolicy::OnFailure, Exit::Code(1), true),
            (RestartPolicy::OnFailure, Exit::Signal(9), true),
            (RestartPolicy::Never, Exit::Code(1), false),
        ];
        for (policy, exit, restarts) in cases {
            let mut l = Lifecycle::new(&cfg(policy));
            let got = l.after_exit(!exit.success(), MS, now);
            assert_eq!(
                matches!(got, AfterExit::RestartAt(_)),
                restarts,
                "{policy:?} after {exit:?}: {got:?}"
            );
        }
        // Stopped by holdfast (start timeout, watchdog): a failure even after exit 0.
        let mut l = Lifecycle::new(&cfg(RestartPolicy::OnFailure));
        assert!(matches!(
            l.after_exit(true, MS, now),
            AfterExit::RestartAt(_)
        ));
        let mut l = Lifecycle::new(&cfg(RestartPolicy::Never));
        assert_eq!(l.after_exit(true, MS, now), AfterExit::Stay(State::Failed));
        let mut l = Lifecycle::new(&cfg(RestartPolicy::Always));
        l.stop_requested = true;
        assert_eq!(l.after_exit(true, MS, now), AfterExit::Stay(State::Stopped));
        let mut l = Lifecycle::new(&cfg(RestartPolicy::Never));
        l.restart_requested = true;
        assert_eq!(l.after_exit(true, MS, now), AfterExit::RestartAt(now));
    }
}
