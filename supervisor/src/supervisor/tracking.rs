//! Which processes are a service's, and how they are signalled: one
//! `Tracking` per service. With cgroup v2 (`--cgroup-root`), the service has
//! a cgroup (`<root>/<name>.service`, its cgroup limits) and each instance a
//! leaf in it (per connection too), made before the spawn so the child
//! starts there; signals go to every process of a leaf through pidfds and
//! SIGKILL through `cgroup.kill`, so a `setsid` double fork cannot escape.
//! Without it (process-group mode, the weaker one), signals go to the
//! instance's process group, as before.
//!
//! Instances and connections are named here by the pid they were spawned
//! with (their process group in process-group mode).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use crate::cgroup::{Cgroup, CgroupError, Hierarchy};
use crate::unit::ServiceConfig;

#[derive(Debug, Default)]
pub(super) struct Tracking {
    /// The service's cgroup, once made (cgroup mode only).
    service: Option<Cgroup>,
    /// The leaf of each live instance or connection, by its first pid.
    leaves: HashMap<i32, Cgroup>,
    /// Leaves whose instance is gone, kept for reuse (or removed) once empty.
    dying: Vec<Cgroup>,
    /// Empty leaves ready for the next instance: a per-connection service
    /// would otherwise make and remove a cgroup per connection.
    free: Vec<Cgroup>,
    /// The cgroup limits last written to the service's cgroup.
    applied: Option<crate::unit::CgroupLimits>,
    /// Leaves (by id) that got a `cgroup.kill`: never reused. On this
    /// kernel a process made into a once-killed cgroup with
    /// `clone3(CLONE_INTO_CGROUP)` is SIGKILLed at birth (the kill count it
    /// is compared with is its parent cgroup's), so they are removed.
    killed: std::collections::HashSet<u64>,
    next_leaf: u64,
}

/// How many empty leaves a service keeps for reuse.
const FREE_LEAVES: usize = 16;

/// A service's cgroups as an in-place upgrade carries them: by path.
#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct SavedTracking {
    service: Option<std::path::PathBuf>,
    leaves: Vec<(i32, std::path::PathBuf)>,
    dying: Vec<std::path::PathBuf>,
    next_leaf: u64,
}

impl Tracking {
    pub fn save(&self) -> SavedTracking {
        SavedTracking {
            service: self.service.as_ref().map(|c| c.path().to_path_buf()),
            leaves: self
                .leaves
                .iter()
                .map(|(pid, c)| (*pid, c.path().to_path_buf()))
                .collect(),
            // Free leaves go as dying ones: swept (reused) after the exec.
            dying: self
                .dying
                .iter()
                .chain(&self.free)
                .map(|c| c.path().to_path_buf())
                .collect(),
            next_leaf: self.next_leaf,
        }
    }

    /// The cgroups again, opened by path; one that is gone is left out.
    pub fn restore(saved: SavedTracking) -> Tracking {
        let open = |p: &std::path::Path| match Cgroup::open(p) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(cgroup = %p.display(), error = %e, "upgrade: a cgroup is gone");
                None
            }
        };
        Tracking {
            service: saved.service.as_deref().and_then(open),
            leaves: saved
                .leaves
                .iter()
                .filter_map(|(pid, p)| open(p).map(|c| (*pid, c)))
                .collect(),
            dying: saved.dying.iter().filter_map(|p| open(p)).collect(),
            free: Vec::new(),
            applied: None,
            // Whether they were killed is not saved: none is reused.
            killed: saved
                .dying
                .iter()
                .filter_map(|p| Cgroup::open(p).ok().map(|c| c.id()))
                .collect(),
            next_leaf: saved.next_leaf,
        }
    }

    /// In cgroup mode, the leaf the next instance of service `name` starts
    /// in (the service's cgroup made and its limits written first); `None`
    /// in process-group mode.
    pub fn prepare(
        &mut self,
        hierarchy: Option<&Hierarchy>,
        name: &str,
        cfg: &ServiceConfig,
    ) -> Result<Option<Cgroup>, CgroupError> {
        let Some(h) = hierarchy else {
            return Ok(None);
        };
        self.sweep();
        if self.service.is_none() {
            self.service = Some(h.service(name)?);
        }
        let service = self.service.as_ref().expect("made above");
        // A reload may have changed the limits: written when they differ.
        let limits = &cfg.process.cgroup_limits;
        if self.applied.as_ref() != Some(limits) {
            service.apply_limits(limits)?;
            self.applied = Some(*limits);
        }
        if let Some(leaf) = self.free.pop() {
            return Ok(Some(leaf));
        }
        self.next_leaf += 1;
        service.create_child(&self.next_leaf.to_string()).map(Some)
    }

    /// What came of a spawn into `leaf` (from [`Tracking::prepare`]): the
    /// child's leaf is kept under its pid; a failed spawn's leaf is removed.
    pub fn spawned(
        &mut self,
        spawned: Result<crate::spawn::Spawned, crate::spawn::SpawnError>,
        leaf: Option<Cgroup>,
    ) -> Result<Pid, crate::spawn::SpawnError> {
        match spawned {
            Ok(s) => {
                if let Some(leaf) = leaf {
                    self.leaves.insert(s.pid.as_raw(), leaf);
                }
                Ok(s.pid)
            }
            Err(e) => {
                if let Some(leaf) = leaf {
                    self.dying.push(leaf);
                }
                Err(e)
            }
        }
    }

    /// `signal` (then SIGCONT) to every process of the instance spawned as `pid`.
    pub fn terminate(&self, pid: Pid, signal: Signal) {
        match self.leaves.get(&pid.as_raw()) {
            Some(leaf) => {
                let _ = leaf.signal_all(signal);
                let _ = leaf.signal_all(Signal::SIGCONT);
            }
            None => {
                let _ = killpg(pid, signal);
                let _ = killpg(pid, Signal::SIGCONT);
            }
        }
    }

    /// SIGKILL to every process of the instance spawned as `pid`.
    pub fn kill(&mut self, pid: Pid) {
        match self.leaves.get(&pid.as_raw()) {
            Some(leaf) => {
                self.killed.insert(leaf.id());
                if let Err(e) = leaf.kill() {
                    tracing::warn!(cgroup = %leaf.path().display(), error = %e, "cgroup.kill failed");
                }
            }
            None => {
                let _ = killpg(pid, Signal::SIGKILL);
            }
        }
    }

    /// The instance spawned as `pid` is over: whatever it left goes.
    pub fn gone(&mut self, pid: Pid) {
        match self.leaves.remove(&pid.as_raw()) {
            Some(leaf) => {
                if leaf.populated().unwrap_or(true) {
                    self.killed.insert(leaf.id());
                    if let Err(e) = leaf.kill() {
                        tracing::warn!(cgroup = %leaf.path().display(), error = %e, "cgroup.kill failed");
                    }
                }
                self.dying.push(leaf);
            }
            None => self.kill(pid),
        }
        self.sweep();
    }

    /// Dying leaves that are empty are kept for reuse (up to
    /// [`FREE_LEAVES`]) or removed.
    pub fn sweep(&mut self) {
        // What is not populated can go (rmdir; a failure leaves it to the next sweep).
        let (empty, busy): (Vec<_>, Vec<_>) = std::mem::take(&mut self.dying)
            .into_iter()
            .partition(|l| !l.populated().unwrap_or(true));
        self.dying = busy;
        for leaf in empty {
            if !self.killed.remove(&leaf.id()) && self.free.len() < FREE_LEAVES {
                self.free.push(leaf);
            } else {
                let _ = leaf.remove();
            }
        }
    }

    /// Memory and CPU used by the service's cgroup (cgroup mode, once it
    /// has been made and while it can be read).
    pub fn usage(&self) -> Option<crate::cgroup::Usage> {
        self.service.as_ref().and_then(|c| c.usage().ok())
    }

    /// Whether any process of the service is left: its cgroup is populated
    /// (`cgroup.events`), instance leaves and dying ones alike. In
    /// process-group mode there is no such record: false.
    pub fn any_left(&self) -> bool {
        self.service
            .as_ref()
            .is_some_and(|c| c.populated().unwrap_or(false))
    }

    /// Whether the service is tracked by cgroup.
    pub fn by_cgroup(&self) -> bool {
        self.service.is_some()
    }

    /// The cgroup id of the instance spawned as `pid`.
    pub fn leaf_id(&self, pid: i32) -> Option<u64> {
        self.leaves.get(&pid).map(Cgroup::id)
    }

    /// The ids of every live leaf (whose processes may notify).
    pub fn ids(&self) -> Vec<u64> {
        self.leaves.values().map(Cgroup::id).collect()
    }

    /// Kills whatever is left and removes the cgroups, waiting up to `wait`
    /// for the kernel to empty them.
    pub fn close(&mut self, wait: Duration) {
        let Some(service) = self.service.take() else {
            return;
        };
        let _ = service.kill();
        let deadline = Instant::now() + wait;
        while service.populated().unwrap_or(false) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.leaves.clear();
        self.dying.clear();
        self.free.clear();
        if let Err(e) = service.remove() {
            tracing::warn!(error = %e, "cannot remove a service cgroup");
        }
    }
}

impl Drop for Tracking {
    fn drop(&mut self) {
        self.close(Duration::from_millis(200));
    }
}
