//! The state directory (`--state-dir`, default /run/holdfast) made safe to
//! create files in by path: the directory and its `notify/` subdirectory
//! exist with explicit modes (0755, whatever the umask), are real
//! directories (not symlinks), are owned by holdfast's user (root) and are
//! writable by nobody else, and the directory's parent cannot let another
//! user rename it away (not writable by others, or sticky like /tmp).
//!
//! Everything is done through fds: each directory is opened with
//! `O_NOFOLLOW | O_DIRECTORY`, created with `mkdirat` relative to its parent's
//! fd, checked with `fstat` and fixed with `fchmod`, so a symlink planted at
//! any step is refused, never followed. Once [`prepare`] returns, the paths
//! in [`StateDir`] can only be changed by root, so the control socket, the
//! lock file and the notify sockets can be created in them by name.
//!
//! Called first by `supervisor::run`, before anything is created in the dir.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The mode of the state dir and its subdirectories.
pub const DIR_MODE: u32 = 0o755;
/// The subdirectories holdfast creates (notify sockets: see `notify::SOCKET_DIR`).
pub const SUBDIRS: &[&str] = &["notify"];

#[derive(Debug, thiserror::Error)]
pub enum StateDirError {
    #[error("state dir {path} is a symlink: holdfast creates nothing through a symlink")]
    Symlink { path: PathBuf },
    #[error("state dir {path} is not a directory")]
    NotADirectory { path: PathBuf },
    #[error("state dir {path} is owned by uid {owner}, not by holdfast's uid {expected}: another user could replace what holdfast creates in it")]
    Owner {
        path: PathBuf,
        owner: u32,
        expected: u32,
    },
    #[error("the parent of the state dir, {path}, is writable by other users (mode {mode:o}) without the sticky bit: they could move the state dir away")]
    ParentWritable { path: PathBuf, mode: u32 },
    #[error("{call} on {path}: {source}")]
    Io {
        call: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The checked state dir: its path and an fd of it and of each subdirectory.
#[derive(Debug)]
pub struct StateDir {
    pub path: PathBuf,
    pub dir: OwnedFd,
    /// `(name, fd)` for each of [`SUBDIRS`].
    pub subdirs: Vec<(&'static str, OwnedFd)>,
}

/// Creates (if needed) and checks `path` and its [`SUBDIRS`] as the module
/// doc says; missing ancestors are created 0755 too. A mode wider or
/// narrower than 0755 on a directory holdfast owns is set back to 0755.
pub fn prepare(path: &Path) -> Result<StateDir, StateDirError> {
    let path = std::path::absolute(path).map_err(io_err("absolute", path))?;
    let parent = path.parent().unwrap_or(Path::new("/"));
    if parent != path {
        std::fs::create_dir_all(parent).map_err(io_err("mkdir", parent))?;
    }
    let parent_fd = open_dir(None, parent, parent)?;
    let meta = fstat(&parent_fd, parent)?;
    let mode = meta.st_mode & 0o7777;
    if mode & 0o022 != 0 && mode & libc::S_ISVTX == 0 {
        return Err(StateDirError::ParentWritable {
            path: parent.to_path_buf(),
            mode,
        });
    }
    let name = path.file_name().map(Path::new).unwrap_or(Path::new("."));
    let dir = checked_subdir(&parent_fd, name, &path)?;
    let mut subdirs = Vec::new();
    for sub in SUBDIRS {
        let fd = checked_subdir(&dir, Path::new(sub), &path.join(sub))?;
        subdirs.push((*sub, fd));
    }
    Ok(StateDir { path, dir, subdirs })
}

/// `name` in the directory `parent`: made 0755 if missing, opened without
/// following a symlink, owned by us, mode set to 0755.
fn checked_subdir(parent: &OwnedFd, name: &Path, shown: &Path) -> Result<OwnedFd, StateDirError> {
    let c = cstring(name, shown)?;
    // SAFETY: mkdirat with a valid dir fd and a NUL-terminated name.
    if unsafe { libc::mkdirat(parent.as_raw_fd(), c.as_ptr(), DIR_MODE) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EEXIST) {
            return Err(io_err("mkdir", shown)(e));
        }
    }
    let fd = open_dir(Some(parent), name, shown)?;
    let meta = fstat(&fd, shown)?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if meta.st_uid != me {
        return Err(StateDirError::Owner {
            path: shown.to_path_buf(),
            owner: meta.st_uid,
            expected: me,
        });
    }
    if meta.st_mode & 0o7777 != DIR_MODE {
        // SAFETY: fchmod on a directory fd we own.
        if unsafe { libc::fchmod(fd.as_raw_fd(), DIR_MODE) } != 0 {
            return Err(io_err("fchmod", shown)(io::Error::last_os_error()));
        }
    }
    Ok(fd)
}

/// Opens a directory with O_NOFOLLOW (relative to `parent` when given).
fn open_dir(parent: Option<&OwnedFd>, name: &Path, shown: &Path) -> Result<OwnedFd, StateDirError> {
    let c = cstring(name, shown)?;
    let at = parent.map_or(libc::AT_FDCWD, |p| p.as_fd().as_raw_fd());
    let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: openat with a valid dir fd (or AT_FDCWD) and a NUL-terminated name.
    let fd = unsafe { libc::openat(at, c.as_ptr(), flags) };
    if fd < 0 {
        let e = io::Error::last_os_error();
        // O_NOFOLLOW | O_DIRECTORY on a symlink gives ENOTDIR (or ELOOP): ask lstat which.
        let is_symlink = || {
            // SAFETY: a zeroed stat is a valid out-buffer for fstatat.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: fstatat with a valid dir fd, a NUL-terminated name, writing into `st`.
            let r = unsafe { libc::fstatat(at, c.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) };
            r == 0 && st.st_mode & libc::S_IFMT == libc::S_IFLNK
        };
        return Err(match e.raw_os_error() {
            Some(libc::ELOOP | libc::ENOTDIR) if is_symlink() => StateDirError::Symlink {
                path: shown.to_path_buf(),
            },
            Some(libc::ENOTDIR) => StateDirError::NotADirectory {
                path: shown.to_path_buf(),
            },
            _ => io_err("open", shown)(e),
        });
    }
    // SAFETY: openat returned a fresh fd nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn fstat(fd: &OwnedFd, shown: &Path) -> Result<libc::stat, StateDirError> {
    // SAFETY: a zeroed stat is a valid out-buffer for fstat.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat on an fd we own, writing into `st`.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(io_err("fstat", shown)(io::Error::last_os_error()));
    }
    Ok(st)
}

fn cstring(name: &Path, shown: &Path) -> Result<CString, StateDirError> {
    CString::new(name.as_os_str().as_bytes()).map_err(|_| {
        io_err("open", shown)(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the path contains a NUL byte",
        ))
    })
}

fn io_err<'a>(call: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StateDirError + 'a {
    move |source| StateDirError::Io {
        call,
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    /// A fresh directory under the temp dir (sticky /tmp is an allowed parent).
    fn scratch(tag: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("holdfast-statedir-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        set_mode(&d, 0o755);
        d
    }

    fn set_mode(p: &Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    /// A new directory `name` in `base` with `mode`.
    fn dir_in(base: &Path, name: &str, mode: u32) -> PathBuf {
        let d = base.join(name);
        std::fs::create_dir(&d).unwrap();
        set_mode(&d, mode);
        d
    }

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    /// Under `umask 077` (set in a child process: the umask is per process)
    /// the dirs still come out 0755, so a `user = "nobody"` service can reach
    /// its notify socket.
    #[test]
    fn modes_are_explicit_whatever_the_umask() {
        if let Some(dir) = std::env::var_os("HOLDFAST_STATEDIR_CHILD") {
            let s = prepare(Path::new(&dir).join("state").as_path()).unwrap();
            assert_eq!(s.subdirs.len(), SUBDIRS.len());
            return;
        }
        let base = scratch("umask");
        use std::os::unix::process::CommandExt;
        let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "--exact",
            "statedir::tests::modes_are_explicit_whatever_the_umask",
        ])
        .env("HOLDFAST_STATEDIR_CHILD", &base);
        // SAFETY: umask is async-signal-safe and cannot fail.
        unsafe {
            cmd.pre_exec(|| {
                libc::umask(0o077);
                Ok(())
            });
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert_eq!(mode(&base.join("state")), 0o755);
        assert_eq!(mode(&base.join("state/notify")), 0o755);
        // A narrower mode left behind is set back.
        set_mode(&base.join("state/notify"), 0o700);
        prepare(&base.join("state")).unwrap();
        assert_eq!(mode(&base.join("state/notify")), 0o755);
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn symlinks_are_refused_and_their_targets_untouched() {
        let base = scratch("symlink");
        let attacker = dir_in(&base, "attacker", 0o700);
        // The state dir itself a symlink.
        std::os::unix::fs::symlink(&attacker, base.join("state")).unwrap();
        assert!(
            matches!(
                prepare(&base.join("state")),
                Err(StateDirError::Symlink { .. })
            ),
            "state dir symlink followed"
        );
        std::fs::remove_file(base.join("state")).unwrap();
        // notify/ pre-created as a symlink into the attacker's directory (the issue).
        std::fs::create_dir(base.join("state")).unwrap();
        std::os::unix::fs::symlink(&attacker, base.join("state/notify")).unwrap();
        let err = prepare(&base.join("state")).unwrap_err();
        assert!(matches!(err, StateDirError::Symlink { .. }), "{err}");
        assert!(
            err.to_string().contains("state/notify is a symlink"),
            "{err}"
        );
        assert_eq!(mode(&attacker), 0o700, "the symlink's target was chmod'ed");
        assert_eq!(std::fs::read_dir(&attacker).unwrap().count(), 0);
        // A file where a directory should be.
        std::fs::remove_file(base.join("state/notify")).unwrap();
        std::fs::write(base.join("state/notify"), "").unwrap();
        assert!(matches!(
            prepare(&base.join("state")),
            Err(StateDirError::NotADirectory { .. })
        ));
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn a_dir_owned_by_another_user_or_in_a_world_writable_parent_is_refused() {
        let base = scratch("owner");
        let open_parent = dir_in(&base, "open", 0o777);
        let err = prepare(&open_parent.join("state")).unwrap_err();
        assert!(
            matches!(err, StateDirError::ParentWritable { mode: 0o777, .. }),
            "{err}"
        );
        // Sticky, as /tmp: fine.
        set_mode(&open_parent, 0o1777);
        prepare(&open_parent.join("state")).unwrap();
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            let theirs = base.join("theirs");
            std::fs::create_dir_all(theirs.join("notify")).unwrap();
            std::os::unix::fs::chown(theirs.join("notify"), Some(65534), Some(65534)).unwrap();
            let err = prepare(&theirs).unwrap_err();
            assert!(
                matches!(
                    err,
                    StateDirError::Owner {
                        owner: 65534,
                        expected: 0,
                        ..
                    }
                ),
                "{err}"
            );
            assert_eq!(
                std::fs::metadata(theirs.join("notify")).unwrap().uid(),
                65534
            );
        } else if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
            panic!("needs root to chown a directory to another user");
        }
        std::fs::remove_dir_all(&base).unwrap();
    }
}
