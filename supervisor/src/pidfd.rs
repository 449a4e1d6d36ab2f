//! Process handles the kernel keeps honest: a [`Pidfd`] names one process for
//! as long as the fd is open, even after that process exits and its pid
//! number is reused. Owns the pidfd system calls (`pidfd_open`,
//! `pidfd_send_signal`, `waitid(P_PIDFD)`, the `PIDFD_GET_INFO` ioctl).
//!
//! holdfast never sends a signal to a pid number: it signals through a
//! pidfd, which fails with ESRCH once its process is gone instead of hitting
//! whoever got the number next. The event loop polls [`Pidfd::as_fd`] for
//! POLLIN, which the kernel reports when the process exits, whether or not
//! it is holdfast's child (a `MAINPID=` is often a grandchild).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::signal::Signal;

#[derive(Debug, thiserror::Error)]
pub enum PidfdError {
    #[error("{call} for pid {pid}: {source}")]
    Syscall {
        call: &'static str,
        pid: i32,
        #[source]
        source: io::Error,
    },
}

impl PidfdError {
    /// A raw syscall's return: errno as the error when it is negative.
    fn check(call: &'static str, pid: i32, r: libc::c_long) -> Result<libc::c_long, PidfdError> {
        if r < 0 {
            return Err(PidfdError::Syscall {
                call,
                pid,
                source: io::Error::last_os_error(),
            });
        }
        Ok(r)
    }

    /// The process is gone (exited and reaped, or never existed).
    pub fn is_gone(&self) -> bool {
        let PidfdError::Syscall { source, .. } = self;
        source.raw_os_error() == Some(libc::ESRCH)
    }
}

/// How a reaped child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// It called exit with this status.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
}

/// One process, held by a pidfd (CLOEXEC). `pid` is the number it had when
/// the fd was opened, for logs and for LISTEN_PID-like uses only.
#[derive(Debug)]
pub struct Pidfd {
    fd: OwnedFd,
    pid: i32,
}

impl Pidfd {
    /// `pidfd_open(pid)`. The caller must know that `pid` still names the
    /// process it means: a child it has not reaped, or a pid it has just
    /// checked through another handle (see [`Pidfd::cgroup_id`]).
    pub fn open(pid: i32) -> Result<Pidfd, PidfdError> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0 as libc::c_uint) };
        let fd = PidfdError::check("pidfd_open", pid, fd)?;
        // SAFETY: the kernel just returned this fd (CLOEXEC by definition); it is ours.
        Ok(unsafe { Pidfd::from_raw(fd as RawFd, pid) })
    }

    /// Wraps a pidfd the caller owns (from CLONE_PIDFD or SCM_PIDFD).
    ///
    /// # Safety
    /// `fd` must be an open pidfd owned by nobody else.
    pub unsafe fn from_raw(fd: RawFd, pid: i32) -> Pidfd {
        Pidfd {
            // SAFETY: guaranteed by the caller.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            pid,
        }
    }

    /// Wraps an owned pidfd, reading its pid from the kernel (0 when the
    /// process is not visible in our pid namespace, -1 once it is gone).
    pub fn from_owned(fd: OwnedFd) -> Pidfd {
        let pid = info(fd.as_fd(), libc::PIDFD_INFO_PID as u64)
            .map(|i| i.pid as i32)
            .unwrap_or(-1);
        Pidfd { fd, pid }
    }

    /// The pid number the process had when this handle was made.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The fd to poll for POLLIN: readable once the process has exited.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// `pidfd_send_signal`: fails with ESRCH ([`PidfdError::is_gone`]) once
    /// the process has exited, never reaching another process.
    pub fn signal(&self, signal: Signal) -> Result<(), PidfdError> {
        self.send(signal as libc::c_int)
    }

    /// `pidfd_getfd`: a duplicate of the process's fd `target` (the kernel
    /// makes it CLOEXEC), as a `SCM_RIGHTS` transfer would give it. Needs
    /// ptrace rights over the process (root has them).
    pub fn get_fd(&self, target: RawFd) -> Result<OwnedFd, PidfdError> {
        // SAFETY: pidfd_getfd takes a pidfd, an fd number and flags (0), and
        // returns a new fd or -1; no pointers.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_pidfd_getfd,
                self.fd.as_raw_fd(),
                target,
                0 as libc::c_uint,
            )
        };
        let fd = PidfdError::check("pidfd_getfd", self.pid, fd)?;
        // SAFETY: the kernel just returned this fd to this process; nothing
        // else owns it.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
    }

    /// Whether the process still runs (signal 0: a permission check only).
    /// A zombie counts as exited.
    pub fn is_running(&self) -> bool {
        !self.has_exited() && self.send(0).is_ok()
    }

    /// Whether the process has exited (a zombie has), without waiting.
    pub fn has_exited(&self) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, timeout 0.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        n > 0 && pfd.revents & (libc::POLLIN | libc::POLLHUP) != 0
    }

    fn send(&self, signal: libc::c_int) -> Result<(), PidfdError> {
        // SAFETY: pidfd_send_signal on our own pidfd, no siginfo, no flags.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0 as libc::c_uint,
            )
        };
        PidfdError::check("pidfd_send_signal", self.pid, r)?;
        Ok(())
    }

    /// Reaps the process if it is our child and has exited:
    /// `waitid(P_PIDFD, WEXITED | WNOHANG)`. `Ok(None)`: still running.
    pub fn try_wait(&self) -> Result<Option<Exit>, PidfdError> {
        // SAFETY: a zeroed siginfo_t is a valid out-parameter for waitid.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid on our own pidfd writes into `info` only.
        let r = unsafe {
            libc::waitid(
                libc::P_PIDFD,
                self.fd.as_raw_fd() as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG,
            )
        };
        PidfdError::check("waitid(P_PIDFD)", self.pid, r.into())?;
        // SAFETY: waitid filled `info` (si_pid 0 when nothing has exited).
        let (pid, code, status) = unsafe { (info.si_pid(), info.si_code, info.si_status()) };
        if pid == 0 {
            return Ok(None);
        }
        Ok(Some(if code == libc::CLD_EXITED {
            Exit::Code(status)
        } else {
            Exit::Signal(status)
        }))
    }

    /// The id of the process's cgroup (v2), which is the inode number of
    /// that cgroup's directory. Fails with ESRCH once the process has been
    /// reaped, so a pid read elsewhere and then opened can be checked here:
    /// what this returns is about the process the pidfd holds.
    pub fn cgroup_id(&self) -> Result<u64, PidfdError> {
        info(self.fd.as_fd(), libc::PIDFD_INFO_CGROUPID as u64)
            .map(|i| i.cgroupid)
            .map_err(|source| PidfdError::Syscall {
                call: "ioctl(PIDFD_GET_INFO)",
                pid: self.pid,
                source,
            })
    }
}

impl Pidfd {
    /// The id of the cgroup the process is in, or, once it has exited and
    /// been reaped, the one it exited in (the kernel keeps that for its
    /// pidfds, Linux 6.15: `PIDFD_INFO_EXIT`). So a short-lived sender such as
    /// `systemd-notify`, gone before its message is read, is still judged by
    /// the cgroup the kernel saw it in. `None` where the kernel cannot say.
    pub fn cgroup_id_even_if_gone(&self) -> Option<u64> {
        if let Ok(id) = self.cgroup_id() {
            return Some(id);
        }
        let mask = (libc::PIDFD_INFO_CGROUPID | libc::PIDFD_INFO_EXIT) as u64;
        // SAFETY: pidfd_info is plain integers; zero is a valid value.
        let mut info: libc::pidfd_info = unsafe { std::mem::zeroed() };
        info.mask = mask;
        // SAFETY: the ioctl reads and writes one pidfd_info of the size
        // encoded in the request number, which is the struct we pass.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::PIDFD_GET_INFO, &mut info) };
        (r == 0 && info.mask & libc::PIDFD_INFO_CGROUPID as u64 != 0).then_some(info.cgroupid)
    }
}

/// `ioctl(PIDFD_GET_INFO)` asking for `mask`.
fn info(fd: BorrowedFd<'_>, mask: u64) -> io::Result<libc::pidfd_info> {
    // SAFETY: pidfd_info is plain integers; zero is a valid value.
    let mut info: libc::pidfd_info = unsafe { std::mem::zeroed() };
    info.mask = mask;
    // SAFETY: the ioctl reads and writes one pidfd_info of the size encoded
    // in the request number, which is the struct we pass.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::PIDFD_GET_INFO, &mut info) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    if info.mask & mask != mask {
        return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn signal_reaches_the_process_then_is_refused_once_it_is_gone() {
        let child = Command::new("sleep").arg("30").spawn().unwrap();
        let pidfd = Pidfd::open(child.id() as i32).unwrap();
        assert!(pidfd.is_running());
        assert_eq!(pidfd.try_wait().unwrap(), None);
        pidfd.signal(Signal::SIGTERM).unwrap();
        // Poll until the exit is visible, then reap through the pidfd.
        let mut exit = None;
        for _ in 0..500 {
            if let Some(e) = pidfd.try_wait().unwrap() {
                exit = Some(e);
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(exit, Some(Exit::Signal(libc::SIGTERM)));
        assert!(pidfd.has_exited());
        let err = pidfd.signal(Signal::SIGTERM).unwrap_err();
        assert!(err.is_gone(), "{err}");
        assert!(pidfd.cgroup_id().unwrap_err().is_gone());
        // The kernel (6.15+) still says which cgroup it exited in.
        let own = Pidfd::open(std::process::id() as i32).unwrap().cgroup_id();
        if let (Some(gone), Ok(own)) = (pidfd.cgroup_id_even_if_gone(), own) {
            assert_eq!(gone, own);
        }
        std::mem::forget(child); // reaped above
    }

    #[test]
    fn cgroup_id_is_the_inode_of_the_cgroup_directory() {
        let Some(dir) = crate::cgroup::own_cgroup_dir() else {
            assert!(
                std::env::var_os("CI").is_none(),
                "no cgroup2 mount found in /proc/self/mountinfo"
            );
            eprintln!("skipped: no cgroup2 mount");
            return;
        };
        let me = Pidfd::open(std::process::id() as i32).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            me.cgroup_id().unwrap(),
            std::fs::metadata(dir).unwrap().ino()
        );
    }
}
