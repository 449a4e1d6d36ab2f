//! The typed replies of the control protocol: what `status`, `bindings`,
//! `logs`, `metrics`, `reload`, `start`, `stop` and `restart` answer. One set
//! of `Serialize + Deserialize` types used by the daemon (to build replies),
//! the CLI (to print them) and the tests; `docs/json.md` documents them as
//! the public contract of `--json`, and a test keeps the two in agreement.

use serde::{Deserialize, Serialize};

use crate::metrics::{DestinationCounters, Snapshot};
use crate::service::State;

/// One service in `holdfast status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub name: String,
    pub state: State,
    pub pid: Option<i32>,
    pub ready: bool,
    pub restarts: u32,
    pub uptime_secs: Option<f64>,
    pub last_exit: Option<String>,
    pub status_text: Option<String>,
    pub errno: Option<i32>,
    pub failure: Option<String>,
    pub instances: usize,
    pub connections_total: u64,
    pub denied_total: u64,
    pub next_pid: Option<i32>,
    pub draining_pids: Vec<i32>,
    pub fd_store: Vec<String>,
    pub sockets: Vec<String>,
    pub listeners: Vec<ListenerStatus>,
    /// `memory.current` of its cgroup; `None` when not tracked by cgroup or
    /// without the memory controller.
    #[serde(default)]
    pub memory_bytes: Option<u64>,
    /// `usage_usec` of its cgroup's `cpu.stat`, in seconds; `None` when not
    /// tracked by cgroup.
    #[serde(default)]
    pub cpu_seconds: Option<f64>,
}

/// One socket of a service in `holdfast status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerStatus {
    pub name: String,
    pub protocol: String,
    pub destination: Option<u32>,
    /// `bound ADDR:PORT`, `steered (kernel socket ADDR:PORT)` or `unix PATH`.
    pub placement: String,
}

/// One binding in `holdfast bindings`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BindingStatus {
    pub service: String,
    pub socket: String,
    pub protocol: String,
    pub prefix: String,
    pub ports: String,
    #[serde(flatten)]
    pub counters: DestinationCounters,
}

/// `holdfast logs`: lines, and the sequence number to ask after next.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLines {
    pub lines: Vec<LogLine>,
    pub next: u64,
}

/// One line a service wrote, as `holdfast logs` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// Its number since the service was first started (holdfast's start).
    pub seq: u64,
    /// When holdfast read it (wall clock; RFC 3339, UTC). `None` only for a
    /// line kept across an upgrade from a holdfast that did not record it.
    #[serde(with = "rfc3339")]
    pub time: Option<std::time::SystemTime>,
    /// The stream it came on; `None` as for `time`.
    pub stream: Option<Stream>,
    /// The pid of the instance that wrote it (its main process, or the
    /// per-connection instance); `None` as for `time`.
    pub pid: Option<i32>,
    pub line: String,
}

/// Which of a service's output pipes a line came on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// An optional wall-clock time as an RFC 3339 string in UTC with
/// microseconds (`2026-12-07T13:09:26.123456Z`), or null (also for a time
/// RFC 3339 cannot write: before 1970, or after 9999, a clock set wildly
/// wrong; humantime would panic or fail on those).
pub mod rfc3339 {
    use std::time::{Duration, SystemTime};

    use serde::{Deserialize, Deserializer, Serializer};

    /// 10000-01-01T00:00:00Z.
    const YEAR_10000: Duration = Duration::from_secs(253_402_300_800);

    /// `t` if RFC 3339 (and humantime) can write it.
    pub fn writable(t: SystemTime) -> Option<SystemTime> {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .is_ok_and(|d| d < YEAR_10000)
            .then_some(t)
    }

    pub fn serialize<S: Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
        match t.and_then(writable) {
            Some(t) => s.collect_str(&humantime::format_rfc3339_micros(t)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SystemTime>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|s| humantime::parse_rfc3339_weak(&s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// `holdfast metrics`: the exposition text and the figures it was rendered from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MetricsReply {
    pub text: String,
    pub snapshot: Snapshot,
}

/// `holdfast upgrade`: answered by the new binary once it has taken over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeReport {
    /// holdfast's pid: the same before and after.
    pub pid: u32,
    /// The version that was running, and the one running now.
    pub from: String,
    pub to: String,
    /// Live services carried over.
    pub services: usize,
}

/// What a reload did, by service name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadSummary {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Restarted: their `[service]` or their sockets changed.
    pub restarted: Vec<String>,
    /// Only their bindings changed: same socket, same process.
    pub rebound: Vec<String>,
    pub unchanged: Vec<String>,
}

impl std::fmt::Display for ReloadSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "added {:?}, removed {:?}, restarted {:?}, rebound {:?}, unchanged {}",
            self.added,
            self.removed,
            self.restarted,
            self.rebound,
            self.unchanged.len()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A clock set before 1970 or past 9999 gives null, not a panic in the
    /// daemon's reply.
    #[test]
    fn times_rfc3339_cannot_write_are_null() {
        use std::time::{Duration, SystemTime};
        let at = |time| LogLine {
            seq: 0,
            time,
            stream: None,
            pid: None,
            line: String::new(),
        };
        let before = SystemTime::UNIX_EPOCH - Duration::from_secs(1);
        let after = SystemTime::UNIX_EPOCH + Duration::from_secs(253_402_300_800);
        for t in [before, after] {
            let v = serde_json::to_value(at(Some(t))).unwrap();
            assert!(v["time"].is_null(), "{v}");
        }
        let ok = SystemTime::UNIX_EPOCH + Duration::from_secs(253_402_300_799);
        let v = serde_json::to_value(at(Some(ok))).unwrap();
        assert_eq!(v["time"], "9999-12-31T23:59:59.000000Z");
    }

    /// The field names of a type, as serde writes them.
    fn fields<T: Serialize>(value: &T) -> Vec<String> {
        match serde_json::to_value(value).unwrap() {
            serde_json::Value::Object(m) => m.keys().cloned().collect(),
            other => panic!("not an object: {other}"),
        }
    }

    /// Every field a reply type has is documented in docs/json.md, and every
    /// state is listed there.
    #[test]
    fn docs_json_documents_every_field_and_state() {
        let doc = include_str!("../../docs/json.md");
        let status = ServiceStatus {
            name: "web".into(),
            state: State::Running,
            pid: None,
            ready: false,
            restarts: 0,
            uptime_secs: None,
            last_exit: None,
            status_text: None,
            errno: None,
            failure: None,
            instances: 0,
            connections_total: 0,
            denied_total: 0,
            next_pid: None,
            draining_pids: vec![],
            fd_store: vec![],
            sockets: vec![],
            listeners: vec![],
            memory_bytes: None,
            cpu_seconds: None,
        };
        let line = LogLine {
            seq: 0,
            time: None,
            stream: Some(Stream::Stdout),
            pid: None,
            line: String::new(),
        };
        let listener = ListenerStatus {
            name: "web".into(),
            protocol: "tcp".into(),
            destination: None,
            placement: "unix /x".into(),
        };
        let binding = BindingStatus {
            service: "web".into(),
            socket: "web".into(),
            protocol: "tcp".into(),
            prefix: "192.0.2.0/24".into(),
            ports: "80".into(),
            counters: DestinationCounters::default(),
        };
        for f in fields(&status)
            .into_iter()
            .chain(fields(&listener))
            .chain(fields(&binding))
            .chain(fields(&ReloadSummary::default()))
            .chain(fields(&line))
        {
            assert!(
                doc.contains(&format!("`{f}`")) || doc.contains(&format!("\"{f}\"")),
                "docs/json.md lacks `{f}`"
            );
        }
        for s in State::ALL {
            assert!(
                doc.contains(&format!("`{}`", s.as_str())),
                "docs/json.md lacks the state `{}`",
                s.as_str()
            );
            // serde and as_str agree.
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
    }
}
