//! Low fd numbers a spawn puts the child's fds in, so that the child copies
//! only the bottom of holdfast's fd table.
//!
//! A child made without `CLONE_FILES` gets a copy of every fd holdfast holds
//! (a reference taken on each open file), and closes them all again before
//! exec: at 1000 services that is some 5000 fds per spawn, growing with each
//! service started, so booting n services cost O(n²). Instead the child
//! shares holdfast's table (`CLONE_FILES`) until its first fd operation,
//! `close_range(K, ~0, CLOSE_RANGE_UNSHARE)`, which gives it a table of its
//! own holding only the fds below `K`. Every fd the child needs (its stdin,
//! stdout, stderr, sockets, stored fds and the error pipe) is first put, with
//! `dup3(…, O_CLOEXEC)`, in one of [`SLOTS`] low numbers reserved early
//! ([`reserve`]) holding /dev/null otherwise, and put back to /dev/null once
//! the child has exec'd. A spawn that needs more fds than there are slots,
//! or finds none reserved, copies the whole table as before.
//!
//! Only `spawn` uses it. The slots are behind a mutex: a spawn holds it from
//! staging to putting back (the tests spawn from several threads).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Mutex, MutexGuard};

/// How many fds a spawn can stage: stdin, stdout, stderr, the error pipe
/// and 28 sockets or stored fds.
pub const SLOTS: usize = 32;

/// The reserved numbers, each holding `null` but while a spawn stages there.
struct Slots {
    null: OwnedFd,
    fds: Vec<RawFd>,
}

static RESERVED: Mutex<Option<Slots>> = Mutex::new(None);

/// Reserves the slots at the lowest free fd numbers, once per process:
/// call it before holdfast opens its many fds (`supervisor::run` does, first
/// thing). A failure (no fds left) leaves spawns copying the whole table.
pub fn reserve() {
    let mut reserved = lock();
    if reserved.is_none() {
        *reserved = open_slots().ok();
    }
}

fn lock() -> MutexGuard<'static, Option<Slots>> {
    RESERVED.lock().unwrap_or_else(|e| e.into_inner())
}

fn open_slots() -> std::io::Result<Slots> {
    let null = OwnedFd::from(std::fs::File::open("/dev/null")?);
    let mut fds = Vec::with_capacity(SLOTS);
    for _ in 0..SLOTS {
        // SAFETY: F_DUPFD_CLOEXEC on our own fd; the new fd is kept in `fds`
        // for the life of the process.
        let fd = unsafe { libc::fcntl(null.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            for fd in fds {
                // SAFETY: a slot just made here, used by nothing yet.
                drop(unsafe { OwnedFd::from_raw_fd(fd) });
            }
            return Err(e);
        }
        fds.push(fd);
    }
    Ok(Slots { null, fds })
}

/// Fds put in slots for one spawn; dropping it puts /dev/null back in them
/// (so a pipe's write end staged here is held by the child only).
pub struct Staged {
    guard: MutexGuard<'static, Option<Slots>>,
    /// (the fd staged, its slot)
    staged: Vec<(RawFd, RawFd)>,
    /// One above the highest slot used: the child keeps the fds below.
    pub below: RawFd,
}

impl Staged {
    /// Stages each distinct fd of `fds`; `None` when there are more than
    /// the slots, none are reserved, or a `dup3` fails.
    pub fn new(fds: impl IntoIterator<Item = RawFd>) -> Option<Staged> {
        let mut guard = lock();
        if guard.is_none() {
            // Not reserved early: the lowest numbers free now.
            *guard = open_slots().ok();
        }
        let slots = guard.as_ref()?;
        let mut distinct: Vec<RawFd> = Vec::new();
        for fd in fds {
            if !distinct.contains(&fd) {
                distinct.push(fd);
            }
        }
        if distinct.len() > slots.fds.len() {
            return None;
        }
        let mut staged = Staged {
            staged: Vec::with_capacity(distinct.len()),
            below: 0,
            guard,
        };
        let slots = staged.guard.as_ref()?.fds.clone();
        for (fd, slot) in distinct.into_iter().zip(slots) {
            // SAFETY: dup3 onto a slot this module owns (holding /dev/null);
            // `fd` is the caller's open fd.
            if unsafe { libc::dup3(fd, slot, libc::O_CLOEXEC) } < 0 {
                return None; // dropping `staged` puts back what was staged
            }
            staged.staged.push((fd, slot));
            staged.below = staged.below.max(slot + 1);
        }
        Some(staged)
    }

    /// The slot `fd` was staged in (`fd` itself if it was not).
    pub fn slot(&self, fd: RawFd) -> RawFd {
        self.staged
            .iter()
            .find(|(f, _)| *f == fd)
            .map_or(fd, |(_, slot)| *slot)
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        let Some(slots) = self.guard.as_ref() else {
            return;
        };
        for (_, slot) in &self.staged {
            // SAFETY: dup3 of our /dev/null onto our own slot, dropping the
            // reference the slot held to a staged fd's file.
            unsafe { libc::dup3(slots.null.as_raw_fd(), *slot, libc::O_CLOEXEC) };
        }
    }
}
