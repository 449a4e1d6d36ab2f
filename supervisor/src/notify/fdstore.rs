//! One service's fd store: the fds it handed over with FDSTORE=1, kept
//! across its restarts and given back after its sockets. Bounded by
//! `fd-store-max`; an fd already stored (same device and inode) is not
//! stored twice. Owns the fds: dropping the store closes them.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use super::parse::fd_name_is_valid;

#[derive(Debug, thiserror::Error)]
pub enum FdStoreError {
    #[error("fd store is full ({max} fds): refused fd {name:?}")]
    Full { name: String, max: usize },
    #[error("invalid fd name {name:?}: use 1 to 255 printable ASCII characters, no ':' or space")]
    BadName { name: String },
    #[error("fstat/fcntl on fd {name:?} for the fd store: {source}")]
    Stat {
        name: String,
        #[source]
        source: io::Error,
    },
}

/// What `add` did with an fd it accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Added {
    Stored,
    /// The same open file (device and inode) is already stored; the new fd
    /// was closed, as systemd does.
    Duplicate,
}

/// What makes two fds "the same" for the store: the open file's device and
/// inode, and its status flags (F_GETFL), which tell a pipe's read end from
/// its write end. systemd's `same_fd` falls back to the same comparison when
/// kcmp(2) is not available.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
    flags: i32,
}

impl FileId {
    fn of(fd: BorrowedFd<'_>) -> io::Result<FileId> {
        let st = nix::sys::stat::fstat(fd.as_raw_fd())?;
        let flags = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL)?;
        Ok(FileId {
            dev: st.st_dev,
            ino: st.st_ino,
            flags,
        })
    }
}

struct Entry {
    name: String,
    fd: OwnedFd,
    id: FileId,
}

/// A bounded list of named fds, in the order they were stored.
pub struct FdStore {
    max: usize,
    entries: Vec<Entry>,
}

impl std::fmt::Debug for FdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FdStore")
            .field("max", &self.max)
            .field(
                "entries",
                &self
                    .entries
                    .iter()
                    .map(|e| (e.name.as_str(), e.fd.as_raw_fd()))
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl FdStore {
    /// An empty store holding at most `max` fds (`fd-store-max`; 0 refuses
    /// every fd).
    pub fn new(max: usize) -> FdStore {
        FdStore {
            max,
            entries: Vec::new(),
        }
    }

    /// Changes the bound (a reload's `fd-store-max`); stored fds over the
    /// new bound, the newest, are closed. Returns how many.
    pub fn set_max(&mut self, max: usize) -> usize {
        self.max = max;
        let over = self.entries.len().saturating_sub(max);
        self.entries.truncate(max);
        over
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Stores `fd` under `name`. A duplicate of a stored fd (same file, same
    /// flags: a dup, or the same file opened the same way) is closed and
    /// reported as such (even when the store is full); otherwise an fd over
    /// `max`, with an invalid name, or that cannot be fstat'ed is refused
    /// and closed. Several fds may share a name.
    pub fn add(&mut self, name: &str, fd: OwnedFd) -> Result<Added, FdStoreError> {
        if !fd_name_is_valid(name) {
            return Err(FdStoreError::BadName {
                name: name.to_string(),
            });
        }
        let id = FileId::of(fd.as_fd()).map_err(|source| FdStoreError::Stat {
            name: name.to_string(),
            source,
        })?;
        if self.entries.iter().any(|e| e.id == id) {
            return Ok(Added::Duplicate);
        }
        if self.entries.len() >= self.max {
            return Err(FdStoreError::Full {
                name: name.to_string(),
                max: self.max,
            });
        }
        self.entries.push(Entry {
            name: name.to_string(),
            fd,
            id,
        });
        Ok(Added::Stored)
    }

    /// Closes every fd stored under `name` (FDSTOREREMOVE=1); returns how many.
    pub fn remove(&mut self, name: &str) -> usize {
        let before = self.entries.len();
        self.entries.retain(|e| e.name != name);
        before - self.entries.len()
    }

    /// The stored fds with their names, oldest first: what the service gets
    /// after its sockets in LISTEN_FDS / LISTEN_FDNAMES.
    pub fn fds(&self) -> impl Iterator<Item = (&str, BorrowedFd<'_>)> {
        self.entries.iter().map(|e| (e.name.as_str(), e.fd.as_fd()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notify::tests::{has_reader, watched_pipe as pipe};
    use std::fs::File;
    use std::io::{Read, Write};

    /// Whether the raw fd number still refers to `id` (it may be closed,
    /// or reused by another test's fd, which is then another file).
    fn still_refers_to(raw: i32, id: FileId) -> bool {
        // SAFETY: the fd is only inspected with fstat/fcntl and not closed;
        // if the number is not open, FileId::of fails with EBADF.
        let fd = unsafe { BorrowedFd::borrow_raw(raw) };
        FileId::of(fd).is_ok_and(|now| now == id)
    }

    #[test]
    fn max_is_respected_and_refused_fds_are_closed() {
        let mut store = FdStore::new(2);
        let (a, mut aw) = pipe();
        let (b, mut bw) = pipe();
        let (c, mut cw) = pipe();
        assert_eq!(store.add("a", a).unwrap(), Added::Stored);
        assert_eq!(store.add("b", b).unwrap(), Added::Stored);
        match store.add("c", c) {
            Err(FdStoreError::Full { name, max: 2 }) => assert_eq!(name, "c"),
            other => panic!("expected Full, got {other:?}"),
        }
        assert!(!has_reader(&mut cw), "a refused fd is closed");
        assert!(
            has_reader(&mut aw) && has_reader(&mut bw),
            "stored fds stay open"
        );
        let names: Vec<&str> = store.fds().map(|(n, _)| n).collect();
        assert_eq!(names, ["a", "b"]);

        let mut none = FdStore::new(0);
        let (d, mut dw) = pipe();
        assert!(matches!(
            none.add("d", d),
            Err(FdStoreError::Full { max: 0, .. })
        ));
        assert!(none.is_empty());
        assert!(!has_reader(&mut dw));

        drop(store);
        assert!(!has_reader(&mut aw), "dropping the store closes its fds");
    }

    #[test]
    fn identical_fds_are_stored_once() {
        let mut store = FdStore::new(3);
        let (r, mut w) = pipe();
        let dup = r.try_clone().expect("dup");
        let (dup_raw, id) = (dup.as_raw_fd(), FileId::of(dup.as_fd()).unwrap());
        assert_eq!(store.add("r", r).unwrap(), Added::Stored);
        assert_eq!(store.add("again", dup).unwrap(), Added::Duplicate);
        assert!(!still_refers_to(dup_raw, id), "the duplicate is closed");
        // The write end of the same pipe has the same inode but other flags:
        // a different fd, stored.
        let w2 = OwnedFd::from(w.try_clone().unwrap());
        assert_eq!(store.add("w", w2).unwrap(), Added::Stored);
        // A regular file opened twice the same way is one file.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"").unwrap();
        let f1 = OwnedFd::from(File::open(&path).unwrap());
        let f2 = OwnedFd::from(File::open(&path).unwrap());
        assert_eq!(store.add("f", f1).unwrap(), Added::Stored);
        assert_eq!(store.add("f", f2).unwrap(), Added::Duplicate);
        // A duplicate is not refused even when the store is full.
        assert_eq!(store.len(), 3);
        let dup = store.fds().next().unwrap().1.try_clone_to_owned().unwrap();
        assert_eq!(store.add("r", dup).unwrap(), Added::Duplicate);
        // The stored read end still works.
        w.write_all(b"x").unwrap();
        let (_, fd) = store.fds().next().unwrap();
        let mut got = [0u8; 1];
        File::from(fd.try_clone_to_owned().unwrap())
            .read_exact(&mut got)
            .unwrap();
        assert_eq!(&got, b"x");
    }

    #[test]
    fn remove_closes_every_fd_of_a_name() {
        let mut store = FdStore::new(10);
        let mut writers = Vec::new();
        for name in ["conn", "conn", "state", "conn"] {
            let (r, w) = pipe();
            writers.push((name, w));
            store.add(name, r).unwrap();
        }
        assert_eq!(store.remove("conn"), 3);
        assert_eq!(store.remove("conn"), 0);
        assert_eq!(store.remove("absent"), 0);
        let left: Vec<&str> = store.fds().map(|(n, _)| n).collect();
        assert_eq!(left, ["state"]);
        for (name, w) in &mut writers {
            assert_eq!(has_reader(w), *name == "state", "{name}");
        }
    }

    #[test]
    fn invalid_names_are_refused_and_closed() {
        let mut store = FdStore::new(10);
        for bad in ["", "a:b", "with space"] {
            let (r, mut w) = pipe();
            assert!(
                matches!(store.add(bad, r), Err(FdStoreError::BadName { .. })),
                "{bad:?}"
            );
            assert!(!has_reader(&mut w));
        }
        assert!(store.is_empty());
    }
}
