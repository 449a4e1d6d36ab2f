//! Throttles for what repeats under pressure: a log line that an error would
//! write thousands of times a second ([`LogLimiter`]), and an accept that
//! keeps failing because the process is out of fds ([`AcceptPause`]); a
//! listener's two together ([`AcceptThrottle`]).
//!
//! Pure bookkeeping over instants passed in: the caller logs, and leaves a
//! paused listener out of its poll set. Uses nothing else in the crate, so
//! every accept path (control socket, inetd, metrics) can share it.

use std::io;
use std::time::{Duration, Instant};

/// At most `burst` lines per `interval`; the lines dropped in between are
/// counted and reported with the next line let through ("… repeated N
/// times"), or by [`LogLimiter::take_suppressed`] once the burst is over.
#[derive(Debug, Clone)]
pub struct LogLimiter {
    burst: u32,
    interval: Duration,
    window_start: Option<Instant>,
    in_window: u32,
    suppressed: u64,
}

impl LogLimiter {
    pub const fn new(burst: u32, interval: Duration) -> LogLimiter {
        LogLimiter {
            burst,
            interval,
            window_start: None,
            in_window: 0,
            suppressed: 0,
        }
    }

    /// Whether to write a line at `now`: `Some(n)` says write it, and that
    /// `n` lines before it were dropped (0: none); `None`, drop it.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        let new_window = self
            .window_start
            .is_none_or(|start| now.saturating_duration_since(start) >= self.interval);
        if new_window {
            self.window_start = Some(now);
            self.in_window = 0;
        }
        if self.in_window < self.burst {
            self.in_window += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }

    /// Lines dropped and not yet reported, once the window they fell in is
    /// over (so a quiet error source still gets its "repeated N times").
    pub fn take_suppressed(&mut self, now: Instant) -> Option<u64> {
        let over = self
            .window_start
            .is_some_and(|start| now.saturating_duration_since(start) >= self.interval);
        (over && self.suppressed > 0).then(|| std::mem::take(&mut self.suppressed))
    }
}

/// Why a paused listener is paused, the end of its "accept failed" line.
const EXHAUSTION_HINT: &str =
    ": out of file descriptors: accepting pauses (raise LimitNOFILE / ulimit -n, or close idle connections)";

/// Stops polling a listener for a while after an accept failed for lack of
/// fds or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM). The pending connection
/// stays queued and the listener readable, so polling it again at once
/// would spin at 100% CPU; after `pause` one accept is tried again.
#[derive(Debug, Clone)]
pub struct AcceptPause {
    pause: Duration,
    until: Option<Instant>,
}

impl AcceptPause {
    pub const fn new(pause: Duration) -> AcceptPause {
        AcceptPause { pause, until: None }
    }

    /// Whether `e` means the process (or system) has no fd or buffer for a
    /// new connection: waiting, not retrying, is what helps.
    pub fn is_exhaustion(e: &io::Error) -> bool {
        matches!(
            e.raw_os_error(),
            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
        )
    }

    /// Records a failed accept: returns true (and pauses) when it was exhaustion.
    pub fn on_error(&mut self, e: &io::Error, now: Instant) -> bool {
        if !Self::is_exhaustion(e) {
            return false;
        }
        self.until = Some(now.checked_add(self.pause).unwrap_or(now));
        true
    }

    /// Whether the listener should be left out of the poll set at `now`.
    pub fn is_paused(&self, now: Instant) -> bool {
        self.until.is_some_and(|t| now < t)
    }

    /// When polling resumes, while paused: for the event loop's poll timeout.
    pub fn resumes_at(&self, now: Instant) -> Option<Instant> {
        self.until.filter(|&t| now < t)
    }
}

/// One listener's accept throttles: its [`AcceptPause`], and the
/// [`LogLimiter`] of its "accept failed" warnings.
#[derive(Debug, Clone)]
pub struct AcceptThrottle {
    pause: AcceptPause,
    warnings: LogLimiter,
}

/// A failed accept to warn about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcceptWarning {
    /// Warnings dropped since the last one written.
    pub repeated: u64,
    /// The end of the line: why accepting pauses, or empty when it does not.
    pub hint: &'static str,
}

impl AcceptThrottle {
    pub const fn new(pause: Duration, warnings: LogLimiter) -> AcceptThrottle {
        AcceptThrottle {
            pause: AcceptPause::new(pause),
            warnings,
        }
    }

    /// Records a failed accept (pausing for exhaustion, see
    /// [`AcceptPause::on_error`]); `Some` when a warning should be written.
    pub fn failed(&mut self, e: &io::Error, now: Instant) -> Option<AcceptWarning> {
        let exhausted = self.pause.on_error(e, now);
        let repeated = self.warnings.allow(now)?;
        let hint = if exhausted { EXHAUSTION_HINT } else { "" };
        Some(AcceptWarning { repeated, hint })
    }

    /// Warnings dropped and not yet reported (see [`LogLimiter::take_suppressed`]).
    pub fn take_suppressed(&mut self, now: Instant) -> Option<u64> {
        self.warnings.take_suppressed(now)
    }

    pub fn is_paused(&self, now: Instant) -> bool {
        self.pause.is_paused(now)
    }

    pub fn resumes_at(&self, now: Instant) -> Option<Instant> {
        self.pause.resumes_at(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn log_lines_are_limited_per_window_and_the_dropped_ones_counted() {
        let t0 = Instant::now();
        let mut l = LogLimiter::new(3, 1000 * MS);
        let first: Vec<_> = (0..10).map(|i| l.allow(t0 + i * MS)).collect();
        assert_eq!(
            first,
            [
                Some(0),
                Some(0),
                Some(0),
                None,
                None,
                None,
                None,
                None,
                None,
                None
            ]
        );
        // Not over yet: nothing to report.
        assert_eq!(l.take_suppressed(t0 + 999 * MS), None);
        // The next window: the first line says 7 were dropped.
        assert_eq!(l.allow(t0 + 1000 * MS), Some(7));
        assert_eq!(l.allow(t0 + 1001 * MS), Some(0));
        // A source that falls quiet still gets its count.
        let mut l = LogLimiter::new(1, 100 * MS);
        assert_eq!(l.allow(t0), Some(0));
        assert_eq!(l.allow(t0 + MS), None);
        assert_eq!(l.allow(t0 + 2 * MS), None);
        assert_eq!(l.take_suppressed(t0 + 50 * MS), None);
        assert_eq!(l.take_suppressed(t0 + 100 * MS), Some(2));
        assert_eq!(l.take_suppressed(t0 + 200 * MS), None);
    }

    #[test]
    fn accept_pauses_only_for_exhaustion() {
        let t0 = Instant::now();
        let mut p = AcceptPause::new(250 * MS);
        assert!(!p.is_paused(t0));
        assert!(!p.on_error(&io::Error::from_raw_os_error(libc::ECONNABORTED), t0));
        assert!(!p.is_paused(t0));
        for errno in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            let mut p = AcceptPause::new(250 * MS);
            assert!(
                p.on_error(&io::Error::from_raw_os_error(errno), t0),
                "{errno}"
            );
            assert!(p.is_paused(t0 + 249 * MS));
            assert_eq!(p.resumes_at(t0), Some(t0 + 250 * MS));
            assert!(!p.is_paused(t0 + 250 * MS));
            assert_eq!(p.resumes_at(t0 + 250 * MS), None);
        }
    }

    #[test]
    fn an_accept_throttle_pauses_and_says_why_in_few_warnings() {
        let t0 = Instant::now();
        let emfile = io::Error::from_raw_os_error(libc::EMFILE);
        let aborted = io::Error::from_raw_os_error(libc::ECONNABORTED);
        let mut t = AcceptThrottle::new(250 * MS, LogLimiter::new(2, 1000 * MS));
        let w = t
            .failed(&aborted, t0)
            .expect("the first warning is written");
        assert_eq!((w.repeated, w.hint), (0, ""));
        assert!(!t.is_paused(t0));
        let w = t
            .failed(&emfile, t0)
            .expect("the second warning is written");
        assert_eq!(w.repeated, 0);
        assert!(
            w.hint.starts_with(": out of file descriptors"),
            "{}",
            w.hint
        );
        assert!(t.is_paused(t0 + 249 * MS));
        assert_eq!(t.resumes_at(t0), Some(t0 + 250 * MS));
        // Over the burst: no warning, but the pause still applies.
        assert_eq!(t.failed(&emfile, t0 + 300 * MS), None);
        assert!(t.is_paused(t0 + 549 * MS));
        assert_eq!(t.take_suppressed(t0 + 1000 * MS), Some(1));
    }
}
