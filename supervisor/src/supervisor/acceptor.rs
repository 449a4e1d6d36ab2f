//! The per-connection acceptor of an `accept = true` socket: its limits
//! (`max-connections`, `max-connections-per-source`, `max-connection-rate`
//! with its pause, allow/deny), the instances it has started, and their
//! stop deadlines. Pure bookkeeping over pids and instants: it knows
//! nothing of services; `inetd` accepts and spawns, and asks it first.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use nix::unistd::Pid;

use serde::{Deserialize, Serialize};

use crate::service::{deadline, mono};
use crate::unit::SocketOptions;

/// Instances at once when `max-connections` is not set (systemd's default).
pub const DEFAULT_MAX_CONNECTIONS: u32 = 64;
/// How long accepting pauses when `max-connection-rate` is exceeded.
pub const DEFAULT_RATE_LIMIT_PAUSE: Duration = Duration::from_secs(10);

/// One per-connection instance.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Connection {
    #[serde(with = "raw_pid")]
    pid: Pid,
    source: Option<IpAddr>,
    /// Told to stop; SIGKILL to its process group at this instant.
    #[serde(with = "mono::option")]
    kill_at: Option<Instant>,
}

/// A pid as its number.
mod raw_pid {
    use nix::unistd::Pid;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(p: &Pid, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i32(p.as_raw())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Pid, D::Error> {
        i32::deserialize(d).map(Pid::from_raw)
    }
}

/// Why a connection was closed without an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refused {
    AllowDeny,
    PerSource(u32),
}

/// Serializable (instants as CLOCK_MONOTONIC), for the in-place upgrade.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Acceptor {
    options: SocketOptions,
    connections: Vec<Connection>,
    total: u64,
    denied: u64,
    /// Accepting is paused until then (rate limit).
    #[serde(with = "mono::option")]
    paused_until: Option<Instant>,
    /// Accept times within the last second, for the rate limit.
    #[serde(with = "mono::deque")]
    recent: VecDeque<Instant>,
}

impl Acceptor {
    pub fn new(options: &SocketOptions) -> Acceptor {
        Acceptor {
            options: options.clone(),
            connections: Vec::new(),
            total: 0,
            denied: 0,
            paused_until: None,
            recent: VecDeque::new(),
        }
    }

    /// A reload changed the socket's policy keys.
    pub fn set_options(&mut self, options: &SocketOptions) {
        self.options = options.clone();
    }

    /// The pids of its instances (for the process table).
    pub fn pids(&self) -> impl Iterator<Item = Pid> + '_ {
        self.connections.iter().map(|c| c.pid)
    }

    pub fn instances(&self) -> usize {
        self.connections.len()
    }
    pub fn total(&self) -> u64 {
        self.total
    }
    pub fn denied(&self) -> u64 {
        self.denied
    }

    /// Below `max-connections` and not paused.
    pub fn has_room(&self, now: Instant) -> bool {
        let max = self
            .options
            .max_connections
            .unwrap_or(DEFAULT_MAX_CONNECTIONS) as usize;
        self.connections.len() < max && self.paused_until.is_none_or(|t| t <= now)
    }

    /// The rate limit, before a waiting connection is accepted: false (and
    /// accepting paused) when `max-connection-rate` accepts were made in the
    /// last second and `waiting` says a connection is queued.
    pub fn may_accept(&mut self, now: Instant, waiting: impl Fn() -> bool) -> bool {
        let Some(rate) = self.options.max_connection_rate else {
            return true;
        };
        let window = Duration::from_secs(1);
        while self
            .recent
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= window)
        {
            self.recent.pop_front();
        }
        if self.recent.len() < rate as usize {
            return true;
        }
        if waiting() {
            let pause = self
                .options
                .rate_limit_pause
                .unwrap_or(DEFAULT_RATE_LIMIT_PAUSE);
            self.paused_until = Some(deadline(now, pause));
            self.recent.clear();
            tracing::warn!(rate, pause = %humantime::format_duration(pause), "connection rate over max-connection-rate: accepting pauses (new connections wait in the backlog)");
        }
        false
    }

    /// Whether a connection from `source` gets an instance; a refusal is counted.
    pub fn admit(&mut self, source: Option<IpAddr>, now: Instant) -> Result<(), Refused> {
        if let Some(src) = source {
            if !self.options.admits(src) {
                self.denied += 1;
                return Err(Refused::AllowDeny);
            }
            if let Some(max) = self.options.max_connections_per_source {
                let from_src = self
                    .connections
                    .iter()
                    .filter(|c| c.source == Some(src))
                    .count();
                if from_src >= max as usize {
                    self.denied += 1;
                    return Err(Refused::PerSource(max));
                }
            }
        }
        self.total += 1;
        if self.options.max_connection_rate.is_some() {
            self.recent.push_back(now);
        }
        Ok(())
    }

    /// An instance was started for an admitted connection.
    pub fn started(&mut self, pid: Pid, source: Option<IpAddr>) {
        self.connections.push(Connection {
            pid,
            source,
            kill_at: None,
        });
    }

    /// A per-connection instance exited; false when `pid` is not one.
    pub fn exited(&mut self, pid: Pid) -> bool {
        match self.connections.iter().position(|c| c.pid == pid) {
            Some(k) => {
                self.connections.swap_remove(k);
                true
            }
            None => false,
        }
    }

    /// Every instance not yet told to stop, now told (kill at `now + timeout`).
    pub fn stop_all(&mut self, now: Instant, timeout: Duration) -> Vec<Pid> {
        let mut told = Vec::new();
        for c in &mut self.connections {
            if c.kill_at.is_none() {
                c.kill_at = Some(deadline(now, timeout));
                told.push(c.pid);
            }
        }
        told
    }

    /// Instances past their stop deadline (to SIGKILL), and the end of a
    /// rate-limit pause.
    pub fn timers(&mut self, now: Instant) -> (Vec<Pid>, bool) {
        let resumed = self.paused_until.is_some_and(|t| t <= now);
        if resumed {
            self.paused_until = None;
        }
        let mut late = Vec::new();
        for c in &mut self.connections {
            if c.kill_at.is_some_and(|t| t <= now) {
                c.kill_at = Some(deadline(now, Duration::from_secs(3600)));
                late.push(c.pid);
            }
        }
        (late, resumed)
    }

    pub fn deadline(&self) -> Option<Instant> {
        self.connections
            .iter()
            .filter_map(|c| c.kill_at)
            .chain(self.paused_until)
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> SocketOptions {
        let toml = "[service]\nexec = [\"x\"]\n[[socket]]\naddresses = [\"127.0.0.1\"]\nports = [\"1\"]\naccept = true\nmax-connections = 2\nmax-connections-per-source = 1\nmax-connection-rate = 3\n";
        let unit = crate::unit::parse_unit("t", std::path::Path::new("t.toml"), toml).unwrap();
        unit.sockets[0].options.clone()
    }

    #[test]
    fn limits_per_source_total_and_rate() {
        let now = Instant::now();
        let mut a = Acceptor::new(&options());
        let a1: IpAddr = "192.0.2.1".parse().unwrap();
        let a2: IpAddr = "192.0.2.2".parse().unwrap();
        assert!(a.has_room(now));
        assert_eq!(a.admit(Some(a1), now), Ok(()));
        a.started(Pid::from_raw(10), Some(a1));
        assert_eq!(a.admit(Some(a1), now), Err(Refused::PerSource(1)));
        assert_eq!(a.admit(Some(a2), now), Ok(()));
        a.started(Pid::from_raw(11), Some(a2));
        assert!(!a.has_room(now));
        assert!(a.exited(Pid::from_raw(10)));
        assert!(a.has_room(now));
        assert_eq!((a.total(), a.denied()), (2, 1));
        // Two accepts in the window so far; a third is allowed, a fourth pauses.
        assert!(a.may_accept(now, || true));
        a.admit(None, now).unwrap();
        assert!(!a.may_accept(now, || true));
        assert!(!a.has_room(now));
        let (_, resumed) = a.timers(now + DEFAULT_RATE_LIMIT_PAUSE);
        assert!(resumed);
    }

    #[test]
    fn stop_then_kill_late_instances() {
        let now = Instant::now();
        let mut a = Acceptor::new(&options());
        a.started(Pid::from_raw(10), None);
        assert_eq!(
            a.stop_all(now, Duration::from_secs(1)),
            vec![Pid::from_raw(10)]
        );
        assert!(a.stop_all(now, Duration::from_secs(1)).is_empty());
        assert!(a.timers(now).0.is_empty());
        assert_eq!(
            a.timers(now + Duration::from_secs(1)).0,
            vec![Pid::from_raw(10)]
        );
    }
}
