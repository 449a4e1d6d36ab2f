//! The instance lock: at most one holdfast per state directory, and at most
//! one holdfast with a dispatcher per network namespace. `supervisor::run`
//! takes it before it touches anything a live holdfast uses (BPF pins and
//! links, the state directory's sockets, listeners); a live owner makes it fail
//! at once, naming the owner's pid, with nothing changed.
//!
//! Both are `flock`s, released by the kernel when their holder dies (even by
//! `kill -9`), so a crash never leaves a stale lock behind:
//! - `<state-dir>/holdfast.lock`, a file created for the purpose;
//! - the network namespace itself (its nsfs inode, `/proc/thread-self/ns/net`),
//!   which every mount namespace shares: two holdfasts started under `ip netns
//!   exec` see different bpffs mounts and cannot see each other's pins, but they
//!   lock the same inode.
//!
//! The owner's pid is read from `/proc/locks` (the lock's device and inode);
//! the locked fds are CLOEXEC, so no service ever holds them.
//! It knows nothing of services, sockets or BPF.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

/// The lock file's name in the state directory.
pub const LOCK_FILE: &str = "holdfast.lock";

/// Held for as long as the daemon runs; dropping it releases both locks.
#[derive(Debug)]
pub struct InstanceLock {
    _state_dir: Flock<File>,
    _netns: Option<Flock<File>>,
}

/// Who holds a lock, as `/proc/locks` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner(pub Option<u32>);

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(pid) => write!(f, "pid {pid}"),
            None => f.write_str("a process this one cannot see"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("another holdfast ({owner}) runs on state directory {} (it holds {}): stop it first, or give this one another --state-dir; nothing was changed", .dir.display(), .dir.join(LOCK_FILE).display())]
    StateDirBusy { dir: PathBuf, owner: Owner },
    #[error("another holdfast ({owner}) steers network namespace net:[{inode}] with its dispatcher, and only one may: stop it first, or run this one with --no-dispatcher or in another --netns; nothing was changed")]
    NetnsBusy { inode: u64, owner: Owner },
    #[error("cannot {op} {}: {source}", .path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_error<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> LockError + 'a {
    move |source| LockError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Locks `state_dir` (creating it and its lock file if needed) and, when
/// `netns` is given (the daemon will attach a dispatcher there: pass
/// `/proc/thread-self/ns/net`), that network namespace. Never blocks.
pub fn acquire(state_dir: &Path, netns: Option<&Path>) -> Result<InstanceLock, LockError> {
    std::fs::create_dir_all(state_dir).map_err(io_error("create", state_dir))?;
    let path = state_dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(&path)
        .map_err(io_error("open", &path))?;
    let state = try_lock(file, &path)?.map_err(|owner| LockError::StateDirBusy {
        dir: state_dir.to_path_buf(),
        owner,
    })?;
    let netns = match netns {
        None => None,
        Some(ns) => {
            let file = File::open(ns).map_err(io_error("open", ns))?;
            let inode = file.metadata().map_err(io_error("stat", ns))?.ino();
            Some(try_lock(file, ns)?.map_err(|owner| LockError::NetnsBusy { inode, owner })?)
        }
    };
    Ok(InstanceLock {
        _state_dir: state,
        _netns: netns,
    })
}

impl InstanceLock {
    /// The locked files' fds, to keep across an in-place upgrade's exec
    /// (closing them would let a second holdfast in).
    pub fn fds(&self) -> (std::os::fd::RawFd, Option<std::os::fd::RawFd>) {
        use std::os::fd::AsRawFd;
        (
            self._state_dir.as_raw_fd(),
            self._netns.as_ref().map(|l| l.as_raw_fd()),
        )
    }
}

/// Takes back the locks a holdfast before an in-place upgrade held: the same
/// open files, inherited across the exec, so locking them again cannot
/// conflict with the old holder (it is this process).
pub fn adopt(
    state: std::os::fd::OwnedFd,
    netns: Option<std::os::fd::OwnedFd>,
) -> Result<InstanceLock, LockError> {
    use std::os::fd::AsRawFd;
    let lock = |fd: std::os::fd::OwnedFd| {
        let path = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
        crate::fds::set_cloexec(fd.as_raw_fd(), true).map_err(io_error("set CLOEXEC on", &path))?;
        Flock::lock(File::from(fd), FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| io_error("lock", &path)(e.into()))
    };
    Ok(InstanceLock {
        _state_dir: lock(state)?,
        _netns: netns.map(lock).transpose()?,
    })
}

/// `Ok(Ok(lock))`, or `Ok(Err(owner))` when someone else holds it.
fn try_lock(file: File, path: &Path) -> Result<Result<Flock<File>, Owner>, LockError> {
    let meta = file.metadata().map_err(io_error("stat", path))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Ok(lock)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
            let locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
            Ok(Err(Owner(flock_owner(&locks, meta.dev(), meta.ino()))))
        }
        Err((_, e)) => Err(io_error("lock", path)(e.into())),
    }
}

/// The pid holding a FLOCK on (dev, ino) according to `/proc/locks` text
/// (`1: FLOCK  ADVISORY  WRITE 1234 00:04:4026531833 0 EOF`; waiters, marked
/// `->`, are skipped; pid 0: not visible from this pid namespace).
pub fn flock_owner(locks: &str, dev: u64, ino: u64) -> Option<u32> {
    let id = format!(
        "{:02x}:{:02x}:{ino}",
        libc::major(dev as libc::dev_t),
        libc::minor(dev as libc::dev_t)
    );
    locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            [_, "FLOCK", _, _, pid, what, ..] if *what == id => {
                pid.parse().ok().filter(|p| *p != 0)
            }
            _ => None,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_locks_lines() {
        let locks = "1: POSIX  ADVISORY  WRITE 11 00:04:77 0 EOF\n\
                     2: FLOCK  ADVISORY  WRITE 1234 00:04:4026531833 0 EOF\n\
                     2: -> FLOCK  ADVISORY  WRITE 99 00:04:4026531833 0 EOF\n\
                     3: FLOCK  ADVISORY  WRITE 0 fd:01:5 0 EOF\n";
        let nsfs = libc::makedev(0, 4) as u64;
        assert_eq!(flock_owner(locks, nsfs, 4026531833), Some(1234));
        assert_eq!(
            flock_owner(locks, nsfs, 77),
            None,
            "a POSIX lock is not ours"
        );
        let disk = libc::makedev(0xfd, 1) as u64;
        assert_eq!(flock_owner(locks, disk, 5), None, "pid 0: invisible");
        assert_eq!(flock_owner(locks, disk, 6), None);
    }

    #[test]
    fn a_second_lock_names_the_first_owner() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let first = acquire(&state, None).expect("first lock");
        // flock locks belong to the open file description: a second open in
        // this very process conflicts just as another process would.
        match acquire(&state, None) {
            Err(LockError::StateDirBusy { owner, .. }) => {
                assert_eq!(owner, Owner(Some(std::process::id())))
            }
            other => panic!("want StateDirBusy, got {other:?}"),
        }
        drop(first);
        acquire(&state, None).expect("free again once dropped");
    }

    #[test]
    fn a_namespace_inode_is_locked_across_opens() {
        let dir = tempfile::tempdir().unwrap();
        // The same nsfs mechanism as the network namespace, on a namespace
        // no holdfast locks (a daemon in this netns must not fail the test).
        let ns = Path::new("/proc/thread-self/ns/uts");
        let first = acquire(&dir.path().join("a"), Some(ns)).expect("first lock");
        let err = acquire(&dir.path().join("b"), Some(ns)).unwrap_err();
        assert!(
            matches!(err, LockError::NetnsBusy { owner: Owner(Some(pid)), .. } if pid == std::process::id()),
            "{err}"
        );
        assert!(err.to_string().contains("--no-dispatcher"), "{err}");
        drop(first);
        acquire(&dir.path().join("b"), Some(ns)).expect("free again once dropped");
    }
}
