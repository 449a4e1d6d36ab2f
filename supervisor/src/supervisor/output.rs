//! What services write: their stdout and stderr pipes, read line by line and
//! logged with the service's name, and each service's ring of recent lines
//! for `holdfast logs`.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use super::registry::ServiceId;

/// Lines of output kept per service for `holdfast logs`.
pub const LOG_RING_LINES: usize = 1000;

/// A service's last [`LOG_RING_LINES`] lines, numbered from its start.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub(super) struct LogRing {
    lines: VecDeque<String>,
    /// The sequence number the next line gets.
    next: u64,
}

impl LogRing {
    pub fn push(&mut self, line: String) {
        if self.lines.len() >= LOG_RING_LINES {
            self.lines.pop_front();
        }
        self.lines.push_back(line);
        self.next += 1;
    }

    /// The last `lines`, or those after sequence number `after`; and the
    /// next sequence number.
    pub fn read(&self, lines: Option<usize>, after: Option<u64>) -> (Vec<String>, u64) {
        let len = self.lines.len();
        let first_seq = self.next - len as u64;
        let skip = match after {
            Some(a) => a.saturating_sub(first_seq).min(len as u64) as usize,
            None => len - lines.unwrap_or(len).min(len),
        };
        (self.lines.iter().skip(skip).cloned().collect(), self.next)
    }
}

struct Pipe {
    service: ServiceId,
    stream: &'static str,
    fd: OwnedFd,
    partial: Vec<u8>,
}

/// One complete line a service wrote.
pub(super) struct Line {
    pub service: ServiceId,
    pub stream: &'static str,
    pub text: String,
}

/// Every open output pipe, by id (the event loop's token).
#[derive(Default)]
pub(super) struct Outputs {
    pipes: HashMap<u64, Pipe>,
    next: u64,
}

impl Outputs {
    /// Keeps the read end of a pipe; the id is its token.
    pub fn add(&mut self, service: ServiceId, stream: &'static str, fd: OwnedFd) -> u64 {
        let id = self.next;
        self.next += 1;
        self.pipes.insert(
            id,
            Pipe {
                service,
                stream,
                fd,
                partial: Vec::new(),
            },
        );
        id
    }

    /// Every pipe as (service, stream, fd, partial line), to keep across an
    /// in-place upgrade's exec.
    pub fn export(&self) -> Vec<(ServiceId, &'static str, std::os::fd::RawFd, Vec<u8>)> {
        self.pipes
            .values()
            .map(|p| (p.service, p.stream, p.fd.as_raw_fd(), p.partial.clone()))
            .collect()
    }

    /// A pipe inherited across an in-place upgrade, with what was read of its
    /// current line; the id is its token.
    pub fn adopt(
        &mut self,
        service: ServiceId,
        stream: &'static str,
        fd: OwnedFd,
        partial: Vec<u8>,
    ) -> u64 {
        let id = self.add(service, stream, fd);
        if let Some(p) = self.pipes.get_mut(&id) {
            p.partial = partial;
        }
        id
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
        let line = |text: &[u8]| Line {
            service: p.service,
            stream: p.stream,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_the_last_lines_and_numbers_them() {
        let mut r = LogRing::default();
        for k in 0..(LOG_RING_LINES + 5) {
            r.push(k.to_string());
        }
        let (last, next) = r.read(Some(2), None);
        assert_eq!(
            last,
            vec![
                (LOG_RING_LINES + 3).to_string(),
                (LOG_RING_LINES + 4).to_string()
            ]
        );
        assert_eq!(next, (LOG_RING_LINES + 5) as u64);
        let (after, _) = r.read(None, Some(next - 1));
        assert_eq!(after, vec![(LOG_RING_LINES + 4).to_string()]);
        // Older than the ring: from its first line.
        assert_eq!(r.read(None, Some(0)).0.len(), LOG_RING_LINES);
    }
}
