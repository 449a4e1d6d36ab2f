//! The pin directory `/sys/fs/bpf/holdfast/<instance>`: mounting bpffs when it
//! is missing, serialising writers with `flock` on `/sys/fs/bpf/holdfast`,
//! staging pins in a temporary directory that is renamed into place, and
//! removing a stale or finished instance. Directories 0750, pins 0640.

use std::fs::{self, File};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use super::DispatchError;

/// Where bpffs is mounted.
pub const BPFFS: &str = "/sys/fs/bpf";
/// `BPF_FS_MAGIC` from linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// `/sys/fs/bpf/holdfast`.
pub fn root() -> PathBuf {
    Path::new(BPFFS).join("holdfast")
}

fn pins_error<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> DispatchError + 'a {
    move |source| DispatchError::Pins {
        op,
        path: path.to_path_buf(),
        source,
    }
}

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
        .unwrap_or(false)
}

/// Makes sure bpffs is mounted at [`BPFFS`], mounting it if it is not.
pub fn ensure_bpffs() -> Result<(), DispatchError> {
    let path = Path::new(BPFFS);
    if is_bpffs(path) {
        return Ok(());
    }
    let mounted = fs::create_dir_all(path)
        .map_err(|e| nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))
        .and_then(|()| {
            nix::mount::mount(
                Some("bpf"),
                path,
                Some("bpf"),
                nix::mount::MsFlags::MS_NOSUID
                    | nix::mount::MsFlags::MS_NODEV
                    | nix::mount::MsFlags::MS_NOEXEC,
                Some("mode=0700"),
            )
        });
    // Someone else may have mounted it meanwhile.
    match mounted {
        _ if is_bpffs(path) => Ok(()),
        Ok(()) => Err(DispatchError::Bpffs {
            path: path.to_path_buf(),
            source: nix::Error::EINVAL,
        }),
        Err(source) => Err(DispatchError::Bpffs {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// An exclusive lock on [`root`], held while pins are created or removed.
pub struct RootLock {
    _lock: Flock<File>,
}

/// Creates [`root`] if needed and locks it. Retries if the directory was removed
/// (by a detach that found it empty) between opening and locking it.
pub fn lock_root() -> Result<RootLock, DispatchError> {
    let root = root();
    loop {
        match fs::DirBuilder::new().mode(0o750).create(&root) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                return Err(pins_error("create", &root)(e))
            }
            _ => {}
        }
        let dir = File::open(&root).map_err(pins_error("open", &root))?;
        let lock =
            Flock::lock(dir, FlockArg::LockExclusive).map_err(|(_, e)| DispatchError::Pins {
                op: "lock",
                path: root.clone(),
                source: e.into(),
            })?;
        let same = match (lock.metadata(), fs::metadata(&root)) {
            (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
            _ => false,
        };
        if same {
            return Ok(RootLock { _lock: lock });
        }
    }
}

/// Prefix of staging directories (bpffs refuses names with a '.').
const STAGING: &str = "__staging_";

/// Checks an instance name: one path component, no '.' (bpffs refuses it), not
/// a staging name.
pub fn check_instance(instance: &str) -> Result<(), DispatchError> {
    let ok = !instance.is_empty()
        && !instance.starts_with("__")
        && !instance.contains(['/', '.'])
        && instance.len() <= 200;
    if ok {
        Ok(())
    } else {
        Err(DispatchError::InstanceName {
            instance: instance.to_string(),
        })
    }
}

/// Creates an empty staging directory for `instance` (removing leftovers of an
/// earlier attach that crashed), under the lock.
pub fn create_staging(_lock: &RootLock, instance: &str) -> Result<PathBuf, DispatchError> {
    let root = root();
    let prefix = format!("{STAGING}{instance}_");
    for entry in fs::read_dir(&root).map_err(pins_error("read", &root))? {
        let entry = entry.map_err(pins_error("read", &root))?;
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            remove_tree(&entry.path())?;
        }
    }
    let staging = root.join(format!("{prefix}{}", std::process::id()));
    fs::DirBuilder::new()
        .mode(0o750)
        .create(&staging)
        .map_err(pins_error("create", &staging))?;
    set_mode(&staging, 0o750)?;
    Ok(staging)
}

/// Sets the mode of a pin or directory (pins are created 0600).
pub fn set_mode(path: &Path, mode: u32) -> Result<(), DispatchError> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(pins_error("chmod", path))
}

/// Replaces `/sys/fs/bpf/holdfast/<instance>` (if any: unpinning a stale link
/// detaches its program) with `staging`.
pub fn commit(_lock: &RootLock, staging: &Path, instance: &str) -> Result<PathBuf, DispatchError> {
    let dir = root().join(instance);
    if dir.exists() {
        tracing::info!(path = %dir.display(), "replacing stale BPF pins");
        remove_tree(&dir)?;
    }
    fs::rename(staging, &dir).map_err(pins_error("rename", staging))?;
    Ok(dir)
}

/// Detaches the link pinned at `dir/link`, if any, at once.
fn detach_pinned_link(dir: &Path) -> Result<(), DispatchError> {
    let path = dir.join(LINK);
    let link = match super::sys::obj_get(&path) {
        Ok(fd) => fd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(pins_error("open", &path)(e)),
    };
    super::sys::link_detach(link.as_fd()).map_err(pins_error("detach", &path))
}

/// The pin name of the link.
pub const LINK: &str = "link";

/// Detaches the pinned link, unpins everything in `dir` and removes it.
pub fn remove_tree(dir: &Path) -> Result<(), DispatchError> {
    detach_pinned_link(dir)?;
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(pins_error("read", dir)(e)),
    };
    for entry in entries {
        let path = entry.map_err(pins_error("read", dir))?.path();
        fs::remove_file(&path).map_err(pins_error("unpin", &path))?;
    }
    fs::remove_dir(dir).map_err(pins_error("remove", dir))
}

/// Removes [`root`] if no instance is left in it.
pub fn remove_root_if_empty(_lock: &RootLock) {
    let root = root();
    match fs::remove_dir(&root) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => {}
        Err(e) => tracing::debug!(path = %root.display(), error = %e, "keeping pin root"),
    }
}
