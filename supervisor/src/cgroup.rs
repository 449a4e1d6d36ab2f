//! cgroup v2: the kernel's record of which processes belong to a service.
//! Owns finding the cgroup2 mount and holdfast's own cgroup, making and
//! removing cgroups, moving holdfast into its leaf, signalling and killing
//! every process of a cgroup, watching `cgroup.events`, writing the unit's
//! resource limits and reading usage. Knows nothing of services: the
//! supervisor decides which cgroup is whose and when to kill it.
//!
//! The layout (ARCHITECTURE.md, "Process tracking"):
//!
//! ```text
//! <root>/                       holdfast's own cgroup, or --cgroup-root;
//!                               subtree_control: the controllers available
//!                               of memory, pids, cpu, io
//! <root>/holdfast.supervisor/   holdfast itself, when <root> is its own cgroup
//! <root>/<service>.service/     one per service: its limits, its usage
//! <root>/<service>.service/<n>/ one leaf per instance (per connection too)
//! ```
//!
//! cgroup v2 lets a cgroup hand controllers to its children only while it
//! has no processes of its own ("no internal processes"), so when holdfast
//! runs in `<root>` it first moves itself into the `holdfast.supervisor`
//! leaf (systemd does the same with `Delegate=` and a payload leaf). A
//! service's processes live only in its instance leaves, so a service
//! cgroup never has processes and an instance can be killed alone (an
//! overlap restart stops the old instance while the new one runs).
//!
//! Where no cgroup2 is mounted or it cannot be written (a container without
//! delegation), [`detect`] says so once and returns
//! [`Mode::ProcessGroups`]: the weaker mode, in which a process that calls
//! `setsid` escapes `stop`.

use std::collections::BTreeSet;
use std::fmt;
use std::fs::File;
use std::io::{self, Read, Seek};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::pidfd::Pidfd;
use crate::unit::{CgroupLimits, Limit};

/// The leaf holdfast moves itself into when it runs in the root it manages.
pub const SUPERVISOR_LEAF: &str = "holdfast.supervisor";
/// cpu.max's period, as systemd writes it (100 ms).
const CPU_PERIOD_USEC: u64 = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup2 file system is mounted (none in /proc/self/mountinfo)")]
    NoCgroup2,
    #[error("cannot tell holdfast's own cgroup (no 0:: line in /proc/self/cgroup)")]
    NoOwnCgroup,
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{key}: the cgroup controller `{controller}` is not available in {cgroup} (it has: {available}); enable it for holdfast's cgroup (e.g. systemd's Delegate=yes) or remove {key}")]
    MissingController {
        key: &'static str,
        controller: Controller,
        cgroup: PathBuf,
        available: Controllers,
    },
    #[error("{key}: write {value:?} to {path}: {source}")]
    Limit {
        key: &'static str,
        value: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err<'p>(op: &'static str, path: &'p Path) -> impl FnOnce(io::Error) -> CgroupError + 'p {
    move |source| CgroupError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// The controllers holdfast's limits use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Controller {
    Memory,
    Pids,
    Cpu,
    Io,
}

impl Controller {
    pub const ALL: [Controller; 4] = [
        Controller::Memory,
        Controller::Pids,
        Controller::Cpu,
        Controller::Io,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Controller::Memory => "memory",
            Controller::Pids => "pids",
            Controller::Cpu => "cpu",
            Controller::Io => "io",
        }
    }
}

impl fmt::Display for Controller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A set of controllers, as read from `cgroup.controllers`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Controllers(pub BTreeSet<Controller>);

impl Controllers {
    /// Parses a `cgroup.controllers` line; controllers holdfast does not use are left out.
    pub fn parse(text: &str) -> Controllers {
        Controllers(
            text.split_whitespace()
                .filter_map(|w| Controller::ALL.into_iter().find(|c| c.name() == w))
                .collect(),
        )
    }
    pub fn contains(&self, c: Controller) -> bool {
        self.0.contains(&c)
    }
}

impl fmt::Display for Controllers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("none of memory, pids, cpu, io");
        }
        let names: Vec<&str> = self.0.iter().map(|c| c.name()).collect();
        f.write_str(&names.join(" "))
    }
}

/// Each unit key that needs a controller, with its controller, for the
/// limits that are set.
pub fn required_controllers(limits: &CgroupLimits) -> Vec<(&'static str, Controller)> {
    let l = limits;
    [
        ("memory-max", l.memory_max.is_some(), Controller::Memory),
        ("memory-high", l.memory_high.is_some(), Controller::Memory),
        ("tasks-max", l.tasks_max.is_some(), Controller::Pids),
        ("cpu-quota", l.cpu_quota.is_some(), Controller::Cpu),
        ("cpu-weight", l.cpu_weight.is_some(), Controller::Cpu),
        ("io-weight", l.io_weight.is_some(), Controller::Io),
    ]
    .into_iter()
    .filter(|(_, set, _)| *set)
    .map(|(key, _, controller)| (key, controller))
    .collect()
}

/// The mount point of the cgroup2 file system and the cgroup path its root
/// shows, from /proc/self/mountinfo text. Hybrid hosts mount it at
/// `/sys/fs/cgroup/unified` beside the v1 controllers, pure v2 hosts at
/// `/sys/fs/cgroup`.
pub fn parse_mountinfo(text: &str) -> Option<(PathBuf, String)> {
    text.lines().find_map(|line| {
        let (mount, fs) = line.split_once(" - ")?;
        if fs.split(' ').next()? != "cgroup2" {
            return None;
        }
        let mut fields = mount.split(' ');
        let root = fields.nth(3)?;
        let point = fields.next()?;
        Some((PathBuf::from(unescape(point)), unescape(root)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup v2 path of a process, from /proc/PID/cgroup text (its `0::` line).
pub fn parse_proc_cgroup(text: &str) -> Option<&str> {
    text.lines().find_map(|l| l.strip_prefix("0::"))
}

/// The directory of a cgroup path under the mount (whose root shows `mount_root`).
fn cgroup_dir(mount: &Path, mount_root: &str, cgroup: &str) -> PathBuf {
    let rel = cgroup
        .strip_prefix(mount_root.trim_end_matches('/'))
        .unwrap_or(cgroup)
        .trim_start_matches('/');
    mount.join(rel)
}

/// Where a cgroup2 is mounted when none is (see [`mount_if_missing`]).
const DEFAULT_MOUNT: &str = "/sys/fs/cgroup";

/// The cgroup2 mount, mounting one at `/sys/fs/cgroup` first when none is
/// mounted and that directory is empty: `ip netns exec` gives its command a
/// fresh sysfs, with the host's cgroup mounts hidden below it (holdfast
/// mounts bpffs there likewise). A directory with anything in it (a v1
/// hierarchy's tmpfs) is never mounted over.
fn mount_if_missing() -> Result<(PathBuf, String), CgroupError> {
    if let Ok(found) = cgroup2_mount() {
        return Ok(found);
    }
    let dir = Path::new(DEFAULT_MOUNT);
    let empty = std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_none());
    if !empty {
        return Err(CgroupError::NoCgroup2);
    }
    use nix::mount::{mount, MsFlags};
    mount(
        Some("cgroup2"),
        dir,
        Some("cgroup2"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC | MsFlags::MS_RELATIME,
        None::<&str>,
    )
    .map_err(|e| io_err("mount cgroup2 on", dir)(e.into()))?;
    tracing::info!(
        mount = DEFAULT_MOUNT,
        "no cgroup2 was mounted here: mounted one"
    );
    cgroup2_mount()
}

/// The path of the cgroup whose directory is `dir`, as /proc/PID/cgroup
/// shows it (`/a/b`): the same in every mount namespace, unlike `dir`.
pub fn path_of(dir: &Path) -> Option<String> {
    let (mount, root) = cgroup2_mount().ok()?;
    let rel = dir.strip_prefix(&mount).ok()?;
    let base = root.trim_end_matches('/');
    Some(format!("{base}/{}", rel.display()).replace("//", "/"))
}

/// The directory of the cgroup at `path` (as [`path_of`] gives it) under
/// this mount namespace's cgroup2 mount (mounted if missing).
pub fn dir_of(path: &str) -> Option<PathBuf> {
    // Only a cgroup below the mount: no `..` out of it.
    if Path::new(path)
        .components()
        .any(|c| c == std::path::Component::ParentDir)
    {
        return None;
    }
    let (mount, root) = mount_if_missing().ok()?;
    Some(cgroup_dir(&mount, &root, path))
}

fn cgroup2_mount() -> Result<(PathBuf, String), CgroupError> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(io_err("read", Path::new("/proc/self/mountinfo")))?;
    parse_mountinfo(&text).ok_or(CgroupError::NoCgroup2)
}

/// The directory of holdfast's own cgroup, when cgroup2 is mounted.
pub fn own_cgroup_dir() -> Option<PathBuf> {
    let (mount, root) = cgroup2_mount().ok()?;
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    Some(cgroup_dir(&mount, &root, parse_proc_cgroup(&text)?))
}

/// The cgroup directory of a live process from /proc/PID/cgroup (the
/// fallback when a sender's pidfd is not available: racy against pid
/// reuse, unlike [`Pidfd::cgroup_id`]).
pub fn cgroup_id_of_pid(pid: i32) -> Option<u64> {
    let (mount, root) = cgroup2_mount().ok()?;
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let dir = cgroup_dir(&mount, &root, parse_proc_cgroup(&text)?);
    std::fs::metadata(dir).ok().map(|m| m.ino())
}

/// One cgroup directory, held open (CLOEXEC) for `CLONE_INTO_CGROUP`.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
    dir: OwnedFd,
    id: u64,
}

impl Cgroup {
    /// Opens an existing cgroup directory.
    pub fn open(path: &Path) -> Result<Cgroup, CgroupError> {
        let dir = File::open(path).map_err(io_err("open", path))?;
        let meta = dir.metadata().map_err(io_err("stat", path))?;
        if !meta.is_dir() {
            return Err(CgroupError::Io {
                op: "open",
                path: path.to_path_buf(),
                source: io::Error::from_raw_os_error(libc::ENOTDIR),
            });
        }
        Ok(Cgroup {
            path: path.to_path_buf(),
            id: meta.ino(),
            dir: dir.into(),
        })
    }

    /// Makes (or, if it is left from an earlier run, opens) the child `name`.
    pub fn create_child(&self, name: &str) -> Result<Cgroup, CgroupError> {
        let path = self.path.join(name);
        match std::fs::create_dir(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err("mkdir", &path)(e)),
        }
        Cgroup::open(&path)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cgroup's id: its directory's inode, what `PIDFD_GET_INFO` reports.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The directory fd, for `clone3(CLONE_INTO_CGROUP)` (see `spawn`).
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.dir.as_fd()
    }

    fn read(&self, file: &str) -> Result<String, CgroupError> {
        let path = self.path.join(file);
        std::fs::read_to_string(&path).map_err(io_err("read", &path))
    }

    fn write(&self, file: &str, value: &str) -> io::Result<()> {
        // One write(2): cgroupfs takes each write as one command.
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(self.path.join(file))?;
        f.write_all(value.as_bytes())
    }

    /// The controllers this cgroup's parent has enabled for it.
    pub fn controllers(&self) -> Result<Controllers, CgroupError> {
        Ok(Controllers::parse(&self.read("cgroup.controllers")?))
    }

    /// Enables `wanted` for this cgroup's children (those of them it has);
    /// returns what is enabled for them now. The cgroup must have no
    /// processes (EBUSY otherwise), except the hierarchy's root.
    pub fn enable_for_children(&self, wanted: &[Controller]) -> Result<Controllers, CgroupError> {
        let have = self.controllers()?;
        let line: Vec<String> = wanted
            .iter()
            .filter(|c| have.contains(**c))
            .map(|c| format!("+{}", c.name()))
            .collect();
        if !line.is_empty() {
            let path = self.path.join("cgroup.subtree_control");
            self.write("cgroup.subtree_control", &line.join(" "))
                .map_err(io_err("write", &path))?;
        }
        Ok(Controllers::parse(&self.read("cgroup.subtree_control")?))
    }

    /// The pids in this cgroup itself (not its children).
    pub fn pids(&self) -> Result<Vec<i32>, CgroupError> {
        Ok(self
            .read("cgroup.procs")?
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect())
    }

    /// Moves process `pid` (0: the caller) into this cgroup.
    pub fn move_process(&self, pid: i32) -> Result<(), CgroupError> {
        let path = self.path.join("cgroup.procs");
        self.write("cgroup.procs", &pid.to_string())
            .map_err(io_err("write", &path))
    }

    /// The pids in this cgroup and every cgroup below it.
    pub fn all_pids(&self) -> Result<Vec<i32>, CgroupError> {
        let mut pids = self.pids()?;
        for child in self.children()? {
            pids.extend(child.all_pids()?);
        }
        Ok(pids)
    }

    /// The cgroups directly below this one.
    pub fn children(&self) -> Result<Vec<Cgroup>, CgroupError> {
        let mut out = Vec::new();
        let entries = std::fs::read_dir(&self.path).map_err(io_err("list", &self.path))?;
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                match Cgroup::open(&entry.path()) {
                    Ok(c) => out.push(c),
                    // Removed meanwhile.
                    Err(CgroupError::Io { source, .. })
                        if source.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(out)
    }

    /// Sends `signal` to every process in this cgroup and its children;
    /// returns how many were signalled. Each pid read from `cgroup.procs` is
    /// opened as a pidfd and signalled only if that process is still in the
    /// cgroup, so a pid reused meanwhile by a stranger is never hit.
    pub fn signal_all(&self, signal: Signal) -> Result<usize, CgroupError> {
        let mut n = 0;
        for pid in self.pids()? {
            let Ok(pidfd) = Pidfd::open(pid) else {
                continue; // gone
            };
            if pidfd.cgroup_id().ok() == Some(self.id) && pidfd.signal(signal).is_ok() {
                n += 1;
            }
        }
        for child in self.children()? {
            n += child.signal_all(signal)?;
        }
        Ok(n)
    }

    /// SIGKILL to every process of this cgroup and its children at once,
    /// through `cgroup.kill` (Linux 5.14): no process can fork its way out.
    /// Returns without waiting; `populated 0` in `cgroup.events` says when
    /// they are all gone.
    pub fn kill(&self) -> Result<(), CgroupError> {
        let path = self.path.join("cgroup.kill");
        match self.write("cgroup.kill", "1") {
            Ok(()) => Ok(()),
            // Older kernels: freeze, kill each, thaw (a frozen task cannot fork).
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let _ = self.write("cgroup.freeze", "1");
                let r = self.signal_all(Signal::SIGKILL);
                let _ = self.write("cgroup.freeze", "0");
                r.map(|_| ())
            }
            Err(e) => Err(io_err("write", &path)(e)),
        }
    }

    /// Whether any process is left in this cgroup or below (`cgroup.events`).
    pub fn populated(&self) -> Result<bool, CgroupError> {
        Ok(parse_populated(&self.read("cgroup.events")?))
    }

    /// A handle on `cgroup.events` for the event loop to poll.
    pub fn watch(&self) -> Result<EventsWatch, CgroupError> {
        let path = self.path.join("cgroup.events");
        let file = File::open(&path).map_err(io_err("open", &path))?;
        Ok(EventsWatch { file, path })
    }

    /// Writes the unit's limits. Unset limits are reset to the kernel's
    /// default where their controller is enabled (so a reload that drops a
    /// key takes it away). A set limit whose controller is not enabled for
    /// this cgroup is an error naming the key.
    pub fn apply_limits(&self, limits: &CgroupLimits) -> Result<(), CgroupError> {
        let have = self.controllers()?;
        for (key, controller) in required_controllers(limits) {
            if !have.contains(controller) {
                return Err(CgroupError::MissingController {
                    key,
                    controller,
                    cgroup: self.path.clone(),
                    available: have,
                });
            }
        }
        let limit = |l: Option<Limit>| match l {
            None | Some(Limit::Infinity) => "max".to_string(),
            Some(Limit::Value(n)) => n.to_string(),
        };
        let cpu_max = match limits.cpu_quota {
            None => format!("max {CPU_PERIOD_USEC}"),
            Some(percent) => format!(
                "{} {CPU_PERIOD_USEC}",
                (u64::from(percent) * CPU_PERIOD_USEC / 100).max(1000)
            ),
        };
        let writes: [(&'static str, Controller, &str, String); 6] = [
            (
                "memory-max",
                Controller::Memory,
                "memory.max",
                limit(limits.memory_max),
            ),
            (
                "memory-high",
                Controller::Memory,
                "memory.high",
                limit(limits.memory_high),
            ),
            (
                "tasks-max",
                Controller::Pids,
                "pids.max",
                limit(limits.tasks_max),
            ),
            ("cpu-quota", Controller::Cpu, "cpu.max", cpu_max),
            (
                "cpu-weight",
                Controller::Cpu,
                "cpu.weight",
                limits.cpu_weight.unwrap_or(100).to_string(),
            ),
            (
                "io-weight",
                Controller::Io,
                "io.weight",
                format!("default {}", limits.io_weight.unwrap_or(100)),
            ),
        ];
        for (key, controller, file, value) in writes {
            if !have.contains(controller) {
                continue;
            }
            if let Err(source) = self.write(file, &value) {
                return Err(CgroupError::Limit {
                    key,
                    value,
                    path: self.path.join(file),
                    source,
                });
            }
        }
        Ok(())
    }

    /// Memory and CPU used by this cgroup and below.
    pub fn usage(&self) -> Result<Usage, CgroupError> {
        let memory = match self.read("memory.current") {
            Ok(s) => s.trim().parse().ok(),
            Err(_) => None, // no memory controller
        };
        let cpu = parse_cpu_usage(&self.read("cpu.stat")?);
        Ok(Usage {
            memory_bytes: memory,
            cpu,
        })
    }

    /// Removes this cgroup and its (empty) children. Fails with EBUSY while
    /// a process is left: kill, wait for `populated 0`, then remove.
    pub fn remove(self) -> Result<(), CgroupError> {
        for child in self.children()? {
            child.remove()?;
        }
        std::fs::remove_dir(&self.path).map_err(io_err("rmdir", &self.path))
    }
}

/// Usage read from a cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// `memory.current`; `None` without the memory controller.
    pub memory_bytes: Option<u64>,
    /// `usage_usec` of `cpu.stat` (always there in cgroup v2).
    pub cpu: Duration,
}

fn parse_populated(events: &str) -> bool {
    events
        .lines()
        .find_map(|l| l.strip_prefix("populated "))
        .is_some_and(|v| v.trim() == "1")
}

fn parse_cpu_usage(stat: &str) -> Duration {
    let usec = stat
        .lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    Duration::from_micros(usec)
}

/// `cgroup.events`, open for polling: the kernel raises POLLPRI (and
/// POLLERR) on it whenever `populated` or `frozen` changes. Poll
/// [`EventsWatch::as_fd`] with POLLPRI, then read [`EventsWatch::populated`].
#[derive(Debug)]
pub struct EventsWatch {
    file: File,
    path: PathBuf,
}

impl EventsWatch {
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Re-reads the file from the start (which also re-arms the event).
    pub fn populated(&mut self) -> Result<bool, CgroupError> {
        let mut text = String::new();
        self.file
            .rewind()
            .and_then(|_| self.file.read_to_string(&mut text))
            .map_err(io_err("read", &self.path))?;
        Ok(parse_populated(&text))
    }
}

/// holdfast's cgroup tree: the root every service cgroup is made in.
#[derive(Debug)]
pub struct Hierarchy {
    root: Cgroup,
    /// Where holdfast itself was moved to, when it ran in `root`.
    supervisor: Option<Cgroup>,
    /// What `root` has enabled for the service cgroups.
    enabled: Controllers,
    /// holdfast made `root` for itself (`holdfast-<pid>`): removed at exit.
    made: bool,
}

/// Where services go without `--cgroup-root`, from holdfast's own cgroup
/// `own` (a directory under the cgroup2 mount `mount`): `own` itself when
/// holdfast is alone there (a systemd service with `Delegate=yes`, a
/// container), its parent when `own` is the leaf an earlier holdfast of this
/// pid moved itself into (an in-place upgrade, a restart in place), else a
/// child of its own, `holdfast-<pid>`, so that daemons started from one
/// shell or test runner never share service cgroups. The flag: holdfast
/// makes (and at exit removes) that child.
pub fn default_root(mount: &Path, own: &Path, own_pids: &[i32], pid: i32) -> (PathBuf, bool) {
    if own.file_name().is_some_and(|n| n == SUPERVISOR_LEAF) {
        if let Some(parent) = own.parent() {
            return (parent.to_path_buf(), false);
        }
    }
    if own != mount && own_pids == [pid] {
        return (own.to_path_buf(), false);
    }
    (own.join(format!("holdfast-{pid}")), true)
}

impl Hierarchy {
    /// Takes `root` (a directory under the cgroup2 mount, or a cgroup path
    /// as /proc/self/cgroup shows it; default: see [`default_root`]),
    /// making it if needed. If holdfast's processes are in it, they move to
    /// [`SUPERVISOR_LEAF`] first; then the controllers available of memory,
    /// pids, cpu and io are enabled for its children.
    pub fn setup(root: Option<&Path>) -> Result<Hierarchy, CgroupError> {
        let (mount, mount_root) = mount_if_missing()?;
        let (dir, made) = match root {
            Some(r) if r.starts_with(&mount) => (r.to_path_buf(), false),
            Some(r) => (cgroup_dir(&mount, &mount_root, &r.to_string_lossy()), false),
            None => {
                let text = std::fs::read_to_string("/proc/self/cgroup")
                    .map_err(io_err("read", Path::new("/proc/self/cgroup")))?;
                let own = parse_proc_cgroup(&text).ok_or(CgroupError::NoOwnCgroup)?;
                let own = cgroup_dir(&mount, &mount_root, own);
                let pids = Cgroup::open(&own)?.pids()?;
                default_root(&mount, &own, &pids, std::process::id() as i32)
            }
        };
        std::fs::create_dir_all(&dir).map_err(io_err("mkdir", &dir))?;
        let root = Cgroup::open(&dir)?;
        let mut h = Hierarchy::take(root, dir == mount)?;
        h.made = made;
        Ok(h)
    }

    /// [`Hierarchy::setup`] on an open cgroup; `is_mount_root`: the
    /// hierarchy's root, which may keep processes and is never vacated.
    pub fn take(root: Cgroup, is_mount_root: bool) -> Result<Hierarchy, CgroupError> {
        let mut supervisor = None;
        if !is_mount_root {
            // Probe writability before moving anything.
            let pids = root.pids()?;
            if !pids.is_empty() {
                let leaf = root.create_child(SUPERVISOR_LEAF)?;
                for pid in pids {
                    match leaf.move_process(pid) {
                        Ok(()) => {}
                        // Exited meanwhile.
                        Err(CgroupError::Io { source, .. })
                            if source.raw_os_error() == Some(libc::ESRCH) => {}
                        Err(e) => return Err(e),
                    }
                }
                supervisor = Some(leaf);
            }
        }
        // Without controllers to hand down (a parent that has processes, a
        // host without delegation) the tree still tracks processes.
        let enabled = match root.enable_for_children(&Controller::ALL) {
            Ok(c) => c,
            Err(e) if is_mount_root => return Err(e),
            Err(e) => {
                tracing::debug!(error = %e, "no cgroup controllers for the services");
                Controllers::parse(&root.read("cgroup.subtree_control").unwrap_or_default())
            }
        };
        Ok(Hierarchy {
            root,
            supervisor,
            enabled,
            made: false,
        })
    }

    pub fn root(&self) -> &Cgroup {
        &self.root
    }

    /// Whether holdfast made the root for itself (removed at exit).
    pub fn made(&self) -> bool {
        self.made
    }

    /// The leaf holdfast moved itself into, if it did.
    pub fn supervisor(&self) -> Option<&Cgroup> {
        self.supervisor.as_ref()
    }

    /// The controllers service cgroups get.
    pub fn enabled(&self) -> &Controllers {
        &self.enabled
    }

    /// The first unit key whose controller service cgroups will not have,
    /// for `holdfast check` and reload: `Some((key, controller))`.
    pub fn missing_for(&self, limits: &CgroupLimits) -> Option<(&'static str, Controller)> {
        required_controllers(limits)
            .into_iter()
            .find(|(_, c)| !self.enabled.contains(*c))
    }

    /// The cgroup of service `name` (`<name>.service`: never the supervisor leaf).
    pub fn service(&self, name: &str) -> Result<Cgroup, CgroupError> {
        self.root.create_child(&format!("{name}.service"))
    }
}

impl Drop for Hierarchy {
    /// At holdfast's exit (or a failed start), once every service cgroup is
    /// gone: the root goes if holdfast made it (an rmdir, which fails while
    /// anything is left in it).
    fn drop(&mut self) {
        if self.made {
            if let Err(e) = std::fs::remove_dir(self.root.path()) {
                tracing::warn!(cgroup = %self.root.path().display(), error = %e, "cannot remove holdfast's cgroup");
            }
        }
    }
}

/// How holdfast tracks a service's processes.
#[derive(Debug)]
pub enum Mode {
    /// A cgroup per service, the kernel's record.
    Cgroup2(Hierarchy),
    /// Process groups and sessions only: a process that calls `setsid`
    /// escapes `stop`. Used where cgroup v2 is not mounted or not writable.
    ProcessGroups,
}

/// Sets up cgroup tracking under `root`, or says once (a warning) why it
/// cannot and falls back to process groups.
pub fn detect(root: Option<&Path>) -> Mode {
    match Hierarchy::setup(root) {
        Ok(h) => {
            tracing::info!(
                root = %h.root.path().display(),
                controllers = %h.enabled,
                "tracking services with cgroup v2"
            );
            Mode::Cgroup2(h)
        }
        Err(e) => {
            tracing::warn!(
                error = %e,
                "cgroup v2 is not writable: tracking services by process group, the weaker mode (a process that calls setsid escapes stop)"
            );
            Mode::ProcessGroups
        }
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! A fresh cgroup per test, under the test process's own cgroup; killed
    //! and removed on drop.
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    pub(crate) struct TestCgroup {
        pub cgroup: Option<Cgroup>,
    }

    impl TestCgroup {
        /// `None` (outside CI only) when cgroup2 is not there or not writable.
        pub(crate) fn new(what: &str) -> Option<TestCgroup> {
            static N: AtomicU32 = AtomicU32::new(0);
            let probe = || -> Result<Cgroup, CgroupError> {
                let own = own_cgroup_dir().ok_or(CgroupError::NoCgroup2)?;
                let parent = Cgroup::open(&own)?;
                let name = format!(
                    "holdfast-test-{}-{}-{what}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                );
                parent.create_child(&name)
            };
            match probe() {
                Ok(c) => Some(TestCgroup { cgroup: Some(c) }),
                Err(e) => {
                    assert!(
                        std::env::var_os("CI").is_none(),
                        "cgroup v2 not usable: {e}"
                    );
                    eprintln!("skipped: cgroup v2 not usable: {e}");
                    None
                }
            }
        }

        pub(crate) fn get(&self) -> &Cgroup {
            self.cgroup.as_ref().expect("present until drop")
        }
    }

    /// `TestCgroup::new(what)`, or a return from the test (skipped, see
    /// `new`) where cgroup v2 is not usable.
    macro_rules! test_cgroup_or_skip {
        ($what:expr) => {
            match $crate::cgroup::testing::TestCgroup::new($what) {
                Some(t) => t,
                None => return,
            }
        };
    }
    pub(crate) use test_cgroup_or_skip;

    impl Drop for TestCgroup {
        fn drop(&mut self) {
            let Some(c) = self.cgroup.take() else { return };
            let _ = c.kill();
            for _ in 0..500 {
                if !c.populated().unwrap_or(false) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = c.remove();
        }
    }

    /// `sh -c script` with `env` set, moved into `cg` before the script runs
    /// (the shell waits for a line on stdin first); its stdout is discarded.
    pub(crate) fn shell_in(
        cg: &Cgroup,
        script: &str,
        env: &[(&str, &std::ffi::OsStr)],
    ) -> std::process::Child {
        use std::io::Write;
        use std::process::{Command, Stdio};
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(format!("read _; {script}"))
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        cg.move_process(child.id() as i32).unwrap();
        child.stdin.take().unwrap().write_all(b"\n").unwrap();
        child
    }

    /// Waits up to `secs` for `cond`.
    pub(crate) fn eventually(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs(secs);
        while std::time::Instant::now() < deadline {
            if cond() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        cond()
    }
}

#[cfg(test)]
mod tests;
