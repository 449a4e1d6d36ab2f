//! What services write: their stdout and stderr pipes, read line by line and
//! logged with the service's name, and each service's ring of recent lines
//! (with when they were read, their stream and their instance's pid) for
//! `holdfast logs`.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::SystemTime;

use crate::protocol::{LogLine, Stream};

use super::registry::ServiceId;

/// Lines of output kept per service for `holdfast logs`.
pub const LOG_RING_LINES: usize = 1000;

/// A service's last [`LOG_RING_LINES`] lines, numbered from its start.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub(super) struct LogRing {
    lines: VecDeque<Entry>,
    /// The sequence number the next line gets.
    next: u64,
}

/// One line in the ring. State version 1 saved a ring's lines as bare
/// strings: those are read with no time, stream or pid.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(from = "SavedEntry")]
struct Entry {
    time: Option<SystemTime>,
    stream: Option<Stream>,
    pid: Option<i32>,
    text: String,
}

#[derive(serde::Deserialize)]
#[serde(untagged)]
enum SavedEntry {
    Text(String),
    Entry {
        time: Option<SystemTime>,
        stream: Option<Stream>,
        pid: Option<i32>,
        text: String,
    },
}

impl From<SavedEntry> for Entry {
    fn from(saved: SavedEntry) -> Entry {
        match saved {
            SavedEntry::Text(text) => Entry {
                time: None,
                stream: None,
                pid: None,
                text,
            },
            SavedEntry::Entry {
                time,
                stream,
                pid,
                text,
            } => Entry {
                time,
                stream,
                pid,
                text,
            },
        }
    }
}

/// Which lines a `holdfast logs` asks for.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Query {
    /// Only the last this many (of those `since` leaves).
    pub lines: Option<usize>,
    /// Only those numbered `after` and later (following a `-f`).
    pub after: Option<u64>,
    /// Only those read at or after this time (a line of unknown time is left out).
    pub since: Option<SystemTime>,
}

impl LogRing {
    pub fn push(&mut self, line: &Line) {
        if self.lines.len() >= LOG_RING_LINES {
            self.lines.pop_front();
        }
        self.lines.push_back(Entry {
            time: Some(line.time),
            stream: Some(line.stream),
            pid: line.pid,
            text: line.text.clone(),
        });
        self.next += 1;
    }

    /// The lines `query` selects, oldest first; and the next sequence number.
    pub fn read(&self, query: Query) -> (Vec<LogLine>, u64) {
        let first_seq = self.next - self.lines.len() as u64;
        let after = query.after.unwrap_or(0);
        let mut picked: Vec<LogLine> = self
            .lines
            .iter()
            .zip(first_seq..)
            .filter(|(_, seq)| *seq >= after)
            .filter(|(e, _)| match query.since {
                Some(since) => e.time.is_some_and(|t| t >= since),
                None => true,
            })
            .map(|(e, seq)| LogLine {
                seq,
                time: e.time,
                stream: e.stream,
                pid: e.pid,
                line: e.text.clone(),
            })
            .collect();
        if let Some(n) = query.lines {
            picked.drain(..picked.len().saturating_sub(n));
        }
        (picked, self.next)
    }
}

struct Pipe {
    service: ServiceId,
    stream: Stream,
    /// The instance whose pipe it is (`None`: inherited from a holdfast
    /// that did not record it).
    pid: Option<i32>,
    fd: OwnedFd,
    partial: Vec<u8>,
}

/// One complete line a service wrote, and when it was read.
pub(super) struct Line {
    pub service: ServiceId,
    pub stream: Stream,
    pub pid: Option<i32>,
    pub time: SystemTime,
    pub text: String,
}

/// A pipe as an in-place upgrade carries it across the exec.
pub(super) struct ExportedPipe {
    pub service: ServiceId,
    pub stream: Stream,
    pub pid: Option<i32>,
    pub fd: std::os::fd::RawFd,
    /// What was read of its current line.
    pub partial: Vec<u8>,
}

/// Every open output pipe, by id (the event loop's token).
#[derive(Default)]
pub(super) struct Outputs {
    pipes: HashMap<u64, Pipe>,
    next: u64,
}

impl Outputs {
    /// Keeps the read end of instance `pid`'s pipe; the id is its token.
    pub fn add(&mut self, service: ServiceId, pid: i32, stream: Stream, fd: OwnedFd) -> u64 {
        self.insert(service, Some(pid), stream, fd, Vec::new())
    }

    fn insert(
        &mut self,
        service: ServiceId,
        pid: Option<i32>,
        stream: Stream,
        fd: OwnedFd,
        partial: Vec<u8>,
    ) -> u64 {
        let id = self.next;
        self.next += 1;
        self.pipes.insert(
            id,
            Pipe {
                service,
                stream,
                pid,
                fd,
                partial,
            },
        );
        id
    }

    /// Every pipe, to keep across an in-place upgrade's exec.
    pub fn export(&self) -> Vec<ExportedPipe> {
        self.pipes
            .values()
            .map(|p| ExportedPipe {
                service: p.service,
                stream: p.stream,
                pid: p.pid,
                fd: p.fd.as_raw_fd(),
                partial: p.partial.clone(),
            })
            .collect()
    }

    /// A pipe inherited across an in-place upgrade (its fd adopted), with
    /// what was read of its current line; the id is its token.
    pub fn adopt(&mut self, pipe: ExportedPipe, fd: OwnedFd) -> u64 {
        self.insert(pipe.service, pipe.pid, pipe.stream, fd, pipe.partial)
    }

    pub fn fd(&self, id: u64) -> Option<BorrowedFd<'_>> {
        self.pipes.get(&id).map(|p| p.fd.as_fd())
    }

    /// Reads what pipe `id` has; the pipe is closed at end of file.
    pub fn read(&mut self, id: u64) -> Vec<Line> {
        let Some(p) = self.pipes.get_mut(&id) else {
            return Vec::new();
        };
        let mut buf = [0u8; 8192];
        let mut eof = false;
        for _ in 0..16 {
            match nix::unistd::read(p.fd.as_raw_fd(), &mut buf) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => p.partial.extend_from_slice(&buf[..n]),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => break,
            }
        }
        let mut lines = Vec::new();
        let time = SystemTime::now();
        let line = |text: &[u8]| Line {
            service: p.service,
            stream: p.stream,
            pid: p.pid,
            time,
            text: String::from_utf8_lossy(text).into_owned(),
        };
        while let Some(end) = p.partial.iter().position(|&b| b == b'\n') {
            let text: Vec<u8> = p.partial.drain(..=end).collect();
            lines.push(line(&text[..text.len() - 1]));
        }
        // An over-long line without a newline is logged in pieces.
        if p.partial.len() > 16 * 1024 || (eof && !p.partial.is_empty()) {
            let text = std::mem::take(&mut p.partial);
            lines.push(line(&text));
        }
        if eof {
            self.pipes.remove(&id);
        }
        lines
    }
}

/// The journald forwarder `--journal` asks for, if its socket is there:
/// said once at start either way.
pub(super) fn open_journal(path: Option<&std::path::Path>) -> Option<crate::journal::Journal> {
    let path = path?;
    match crate::journal::Journal::open_if_present(path) {
        Ok(Some(j)) => {
            tracing::info!(journal = %path.display(), "forwarding services' output to the journal");
            Some(j)
        }
        Ok(None) => {
            tracing::info!(journal = %path.display(), "no journal socket: services' output is kept in holdfast's ring only");
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "services' output is kept in holdfast's ring only");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn line(text: &str, stream: Stream, pid: i32, time: SystemTime) -> Line {
        Line {
            service: ServiceId::from_raw(0),
            stream,
            pid: Some(pid),
            time,
            text: text.into(),
        }
    }

    fn texts(lines: &[LogLine]) -> Vec<String> {
        lines.iter().map(|l| l.line.clone()).collect()
    }

    #[test]
    fn ring_keeps_the_last_lines_and_numbers_them() {
        let mut r = LogRing::default();
        let t = SystemTime::now();
        for k in 0..(LOG_RING_LINES + 5) {
            r.push(&line(&k.to_string(), Stream::Stdout, 7, t));
        }
        let last = |n| Query {
            lines: Some(n),
            ..Query::default()
        };
        let (got, next) = r.read(last(2));
        assert_eq!(
            texts(&got),
            vec![
                (LOG_RING_LINES + 3).to_string(),
                (LOG_RING_LINES + 4).to_string()
            ]
        );
        assert_eq!(got[1].seq, (LOG_RING_LINES + 4) as u64);
        assert_eq!(next, (LOG_RING_LINES + 5) as u64);
        let after = |a| Query {
            after: Some(a),
            ..Query::default()
        };
        let (got, _) = r.read(after(next - 1));
        assert_eq!(texts(&got), vec![(LOG_RING_LINES + 4).to_string()]);
        // Older than the ring: from its first line.
        assert_eq!(r.read(after(0)).0.len(), LOG_RING_LINES);
        assert_eq!(r.read(Query::default()).0.len(), LOG_RING_LINES);
    }

    #[test]
    fn each_line_keeps_its_time_stream_and_pid() {
        let mut r = LogRing::default();
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        r.push(&line("out", Stream::Stdout, 10, t));
        r.push(&line(
            "err",
            Stream::Stderr,
            11,
            t + Duration::from_millis(5),
        ));
        let (got, _) = r.read(Query::default());
        assert_eq!(
            got,
            vec![
                LogLine {
                    seq: 0,
                    time: Some(t),
                    stream: Some(Stream::Stdout),
                    pid: Some(10),
                    line: "out".into()
                },
                LogLine {
                    seq: 1,
                    time: Some(t + Duration::from_millis(5)),
                    stream: Some(Stream::Stderr),
                    pid: Some(11),
                    line: "err".into()
                },
            ]
        );
        // The wire form: RFC 3339 in UTC, the stream by name.
        let json = serde_json::to_value(&got[1]).unwrap();
        assert_eq!(json["time"], "2027-01-15T08:00:00.005000Z");
        assert_eq!(json["stream"], "stderr");
        assert_eq!(json["pid"], 11);
        let back: LogLine = serde_json::from_value(json).unwrap();
        assert_eq!(back, got[1]);
    }

    /// `since` picks lines by time; `lines` then takes the last of those;
    /// `after` (a follow) composes with both.
    #[test]
    fn since_lines_and_after_compose() {
        let mut r = LogRing::default();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        for k in 0..10u64 {
            r.push(&line(
                &format!("l{k}"),
                Stream::Stdout,
                1,
                t0 + Duration::from_secs(k),
            ));
        }
        let since = |s: u64| Some(t0 + Duration::from_secs(s));
        let q = |lines, after, since| Query {
            lines,
            after,
            since,
        };
        assert_eq!(
            texts(&r.read(q(None, None, since(7))).0),
            ["l7", "l8", "l9"]
        );
        assert_eq!(texts(&r.read(q(Some(2), None, since(3))).0), ["l8", "l9"]);
        assert_eq!(texts(&r.read(q(Some(5), None, since(8))).0), ["l8", "l9"]);
        assert_eq!(texts(&r.read(q(None, Some(9), since(2))).0), ["l9"]);
        assert!(r.read(q(None, None, since(100))).0.is_empty());
        assert!(r.read(q(Some(0), None, None)).0.is_empty());
        // The next number does not depend on what was picked.
        assert_eq!(r.read(q(None, None, since(100))).1, 10);
    }

    /// A ring saved by state version 1 (bare strings) is read again: its
    /// lines keep their numbers, with no time, stream or pid, and `since`
    /// leaves them out.
    #[test]
    fn a_version_1_ring_is_read() {
        let saved = r#"{"lines":["a","b"],"next":7}"#;
        let mut r: LogRing = serde_json::from_str(saved).unwrap();
        let t = SystemTime::now();
        r.push(&line("c", Stream::Stderr, 3, t));
        let (got, next) = r.read(Query::default());
        assert_eq!(next, 8);
        assert_eq!(texts(&got), ["a", "b", "c"]);
        assert_eq!(got[0].seq, 5);
        assert_eq!((got[0].time, got[0].stream, got[0].pid), (None, None, None));
        let since = Query {
            since: Some(t - Duration::from_secs(3600)),
            ..Query::default()
        };
        assert_eq!(texts(&r.read(since).0), ["c"]);
        // And what this version saves, it reads.
        let again: LogRing = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(again.read(Query::default()).0, got);
    }
}
