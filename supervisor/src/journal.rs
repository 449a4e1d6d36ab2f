//! Forwarding services' output to systemd-journald, when holdfast runs where
//! one listens (`/run/systemd/journal/socket`, or `--journal-socket`): each
//! line becomes one datagram of journald's native protocol, sent on a
//! non-blocking CLOEXEC unix datagram socket. The event loop must never wait
//! on the journal: a line the socket cannot take now (EAGAIN, journald gone,
//! too big) is dropped and counted, and said in a rate-limited warning.
//!
//! The fields of a line (`journalctl -u` does not apply: holdfast is not
//! systemd; `journalctl SYSLOG_IDENTIFIER=web` or `HOLDFAST_UNIT=web` does):
//! `MESSAGE`, `PRIORITY`, `SYSLOG_IDENTIFIER` (the service), `SYSLOG_PID` and
//! `HOLDFAST_PID` (the instance's pid: `_PID` is journald's to set, and would
//! be holdfast's), `HOLDFAST_UNIT` (the service's unit name), and
//! `HOLDFAST_STREAM` (`stdout` or `stderr`). `PRIORITY` is 6 (info) on both
//! streams, as systemd does for a service's output, unless the line starts
//! with a syslog prefix `<0>`…`<7>` (`sd-daemon.h`'s `SD_ERR` and friends),
//! which sets it and is left out of `MESSAGE`, again as systemd does.
//!
//! Knows nothing of services beyond the names it is given; uses only
//! `ratelimit`. The encoding ([`encode`]) is pure; the supervisor owns the
//! one [`Journal`] and calls [`Journal::send`] from the event loop.

use std::io;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::ratelimit::LogLimiter;

/// Where journald listens for native datagrams.
pub const DEFAULT_SOCKET: &str = "/run/systemd/journal/socket";

/// The priority of a line without a `<N>` prefix: LOG_INFO.
pub const DEFAULT_PRIORITY: u8 = 6;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("cannot make a socket to send to the journal at {path}: {source}")]
    Socket {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// One line, as forwarded.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    /// The service's name (`SYSLOG_IDENTIFIER`, `HOLDFAST_UNIT`).
    pub service: &'a str,
    /// `stdout` or `stderr`.
    pub stream: &'a str,
    /// The instance that wrote it, if known.
    pub pid: Option<i32>,
    pub text: &'a str,
}

/// The priority a line sets with a leading `<N>` (0-7), and the rest of it.
fn split_priority(text: &str) -> (u8, &str) {
    let b = text.as_bytes();
    match b {
        [b'<', d @ b'0'..=b'7', b'>', ..] => (d - b'0', &text[3..]),
        _ => (DEFAULT_PRIORITY, text),
    }
}

/// Appends one field in journald's native format: `KEY=value\n`, or, when
/// the value holds a newline, `KEY\n`, its length as 64-bit little endian,
/// the value and `\n`.
fn field(buf: &mut Vec<u8>, key: &str, value: &[u8]) {
    buf.extend_from_slice(key.as_bytes());
    if value.contains(&b'\n') {
        buf.push(b'\n');
        buf.extend_from_slice(&(value.len() as u64).to_le_bytes());
    } else {
        buf.push(b'=');
    }
    buf.extend_from_slice(value);
    buf.push(b'\n');
}

/// The datagram for one line.
pub fn encode(r: &Record<'_>) -> Vec<u8> {
    let (priority, message) = split_priority(r.text);
    let mut buf = Vec::with_capacity(r.text.len() + 160);
    field(&mut buf, "MESSAGE", message.as_bytes());
    field(&mut buf, "PRIORITY", priority.to_string().as_bytes());
    field(&mut buf, "SYSLOG_IDENTIFIER", r.service.as_bytes());
    field(&mut buf, "HOLDFAST_UNIT", r.service.as_bytes());
    field(&mut buf, "HOLDFAST_STREAM", r.stream.as_bytes());
    if let Some(pid) = r.pid {
        let pid = pid.to_string();
        field(&mut buf, "SYSLOG_PID", pid.as_bytes());
        field(&mut buf, "HOLDFAST_PID", pid.as_bytes());
    }
    buf
}

/// The socket lines go out on, and what came of them.
#[derive(Debug)]
pub struct Journal {
    socket: UnixDatagram,
    path: PathBuf,
    forwarded: u64,
    dropped: u64,
    warnings: LogLimiter,
}

impl Journal {
    /// A forwarder to journald's socket at `path`, if there is one there
    /// now; `Ok(None)` when there is not (the lines stay in holdfast's ring).
    pub fn open_if_present(path: &Path) -> Result<Option<Journal>, JournalError> {
        if !path.exists() {
            return Ok(None);
        }
        Journal::open(path).map(Some)
    }

    /// A forwarder to the socket at `path`: an unbound unix datagram socket
    /// (CLOEXEC, as std makes every socket), non-blocking.
    pub fn open(path: &Path) -> Result<Journal, JournalError> {
        let err = |source| JournalError::Socket {
            path: path.to_path_buf(),
            source,
        };
        let socket = UnixDatagram::unbound().map_err(err)?;
        socket.set_nonblocking(true).map_err(err)?;
        Ok(Journal {
            socket,
            path: path.to_path_buf(),
            forwarded: 0,
            dropped: 0,
            warnings: LogLimiter::new(3, Duration::from_secs(10)),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sends one line; never waits. A line that cannot go now is dropped,
    /// counted, and said in a warning (a few per 10 s).
    pub fn send(&mut self, r: &Record<'_>, now: Instant) {
        match self.socket.send_to(&encode(r), &self.path) {
            Ok(_) => self.forwarded += 1,
            Err(e) => {
                self.dropped += 1;
                if let Some(before) = self.warnings.allow(now) {
                    let why = if e.kind() == io::ErrorKind::WouldBlock {
                        "the journal is not keeping up".to_string()
                    } else {
                        e.to_string()
                    };
                    tracing::warn!(
                        service = %r.service,
                        journal = %self.path.display(),
                        dropped_total = self.dropped,
                        "a line was not forwarded to the journal: {why}{}",
                        if before > 0 {
                            format!(" ({before} more since the last warning)")
                        } else {
                            String::new()
                        }
                    );
                }
            }
        }
    }

    /// Lines sent to the journal.
    pub fn forwarded(&self) -> u64 {
        self.forwarded
    }

    /// Lines dropped because the journal could not take them then.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::os::fd::AsRawFd;

    use super::*;

    /// Reads a native datagram back into its fields (the way journald
    /// parses them), so the tests check meaning, not bytes.
    fn parse(mut d: &[u8]) -> BTreeMap<String, Vec<u8>> {
        let mut out = BTreeMap::new();
        while !d.is_empty() {
            let nl = d.iter().position(|&b| b == b'\n').expect("a field ends");
            let line = &d[..nl];
            if let Some(eq) = line.iter().position(|&b| b == b'=') {
                let key = String::from_utf8(line[..eq].to_vec()).unwrap();
                out.insert(key, line[eq + 1..].to_vec());
                d = &d[nl + 1..];
            } else {
                let key = String::from_utf8(line.to_vec()).unwrap();
                let len = u64::from_le_bytes(d[nl + 1..nl + 9].try_into().unwrap()) as usize;
                let value = d[nl + 9..nl + 9 + len].to_vec();
                assert_eq!(d[nl + 9 + len], b'\n', "a binary field ends in a newline");
                out.insert(key, value);
                d = &d[nl + 10 + len..];
            }
        }
        out
    }

    fn fields(d: &[u8]) -> BTreeMap<String, String> {
        parse(d)
            .into_iter()
            .map(|(k, v)| (k, String::from_utf8(v).unwrap()))
            .collect()
    }

    fn record<'a>(text: &'a str, stream: &'a str) -> Record<'a> {
        Record {
            service: "web",
            stream,
            pid: Some(4242),
            text,
        }
    }

    #[test]
    fn a_line_carries_its_service_stream_pid_and_priority() {
        let got = fields(&encode(&record("listening on :80", "stdout")));
        let want: BTreeMap<String, String> = [
            ("MESSAGE", "listening on :80"),
            ("PRIORITY", "6"),
            ("SYSLOG_IDENTIFIER", "web"),
            ("HOLDFAST_UNIT", "web"),
            ("HOLDFAST_STREAM", "stdout"),
            ("SYSLOG_PID", "4242"),
            ("HOLDFAST_PID", "4242"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        pretty_assertions::assert_eq!(got, want);
        // The exact bytes of the simple form.
        assert!(encode(&record("hi", "stderr")).starts_with(b"MESSAGE=hi\nPRIORITY=6\n"));
    }

    #[test]
    fn a_syslog_prefix_sets_the_priority_and_is_left_out() {
        for (text, priority, message) in [
            ("<3>disk full", "3", "disk full"),
            ("<7>", "7", ""),
            ("<0>x", "0", "x"),
            ("<8>not a priority", "6", "<8>not a priority"),
            ("<3", "6", "<3"),
            ("< 3>x", "6", "< 3>x"),
            ("", "6", ""),
        ] {
            let f = fields(&encode(&record(text, "stderr")));
            assert_eq!(f["PRIORITY"], priority, "{text:?}");
            assert_eq!(f["MESSAGE"], message, "{text:?}");
        }
    }

    /// A value with a newline (a line read in pieces never has one, but a
    /// service name or future field may) uses the length-prefixed form.
    #[test]
    fn a_value_with_a_newline_is_length_prefixed() {
        let mut buf = Vec::new();
        field(&mut buf, "MESSAGE", b"two\nlines");
        let mut want = b"MESSAGE\n".to_vec();
        want.extend_from_slice(&9u64.to_le_bytes());
        want.extend_from_slice(b"two\nlines\n");
        assert_eq!(buf, want);
        assert_eq!(parse(&buf)["MESSAGE"], b"two\nlines");
    }

    #[test]
    fn no_pid_no_pid_fields() {
        let r = Record {
            pid: None,
            ..record("x", "stdout")
        };
        let f = fields(&encode(&r));
        assert!(!f.contains_key("SYSLOG_PID") && !f.contains_key("HOLDFAST_PID"));
    }

    /// The forwarder against a real receiver: a unix datagram socket bound
    /// in a temporary directory, standing in for journald's.
    #[test]
    fn lines_arrive_at_a_real_receiver_and_a_full_one_drops_without_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("socket");
        assert!(Journal::open_if_present(&path).unwrap().is_none());
        let receiver = UnixDatagram::bind(&path).unwrap();
        let mut j = Journal::open_if_present(&path).unwrap().expect("present");
        // CLOEXEC and non-blocking.
        let fd = j.socket.as_raw_fd();
        let fdflags = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).unwrap();
        assert_ne!(fdflags & libc::FD_CLOEXEC, 0, "the socket is not CLOEXEC");
        let flflags = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFL).unwrap();
        assert_ne!(flflags & libc::O_NONBLOCK, 0, "the socket blocks");

        let now = Instant::now();
        j.send(&record("<4>first", "stderr"), now);
        j.send(&record("second", "stdout"), now);
        let mut buf = vec![0u8; 65536];
        let n = receiver.recv(&mut buf).unwrap();
        let f = fields(&buf[..n]);
        assert_eq!(f["MESSAGE"], "first");
        assert_eq!(f["PRIORITY"], "4");
        assert_eq!(f["HOLDFAST_STREAM"], "stderr");
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(fields(&buf[..n])["MESSAGE"], "second");
        assert_eq!((j.forwarded(), j.dropped()), (2, 0));

        // Nobody reads: the receiver's queue fills, and send neither waits
        // nor fails the caller; what does not fit is counted.
        let start = Instant::now();
        let line = "x".repeat(4000);
        for _ in 0..2000 {
            j.send(&record(&line, "stdout"), now);
        }
        assert!(start.elapsed() < Duration::from_secs(5), "send waited");
        assert!(j.dropped() > 0, "a full receiver dropped nothing");
        assert_eq!(j.forwarded() + j.dropped(), 2002);

        // journald gone: dropped and counted too.
        drop(receiver);
        std::fs::remove_file(&path).unwrap();
        let before = j.dropped();
        j.send(&record("lost", "stdout"), now);
        assert_eq!(j.dropped(), before + 1);
    }
}
