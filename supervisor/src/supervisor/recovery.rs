//! What a holdfast that died (`kill -9`, a crash) left behind, and taking it
//! back. Owns the record in the state dir, `recovery.json`: the cgroup root
//! the services run under and the inode of every listener by
//! `<service>.<socket>`, rewritten whenever the listeners change and removed
//! at a clean exit.
//!
//! At the next start on the same state dir (under the instance lock, before
//! any socket is made), [`recover`] finds the dead daemon's services by their
//! cgroups, takes each recorded listener back from whichever of their
//! processes holds it (`pidfd_getfd`: the same socket, with the connections
//! queued in it), hands them to the socket opening as inherited fds, stops
//! the orphans (`kill-signal`, `cgroup.kill` after `stop-timeout`) and
//! removes their cgroups. So no service runs twice, a bound address is free
//! for its own socket, and a client that connected during the gap is served
//! by the new instance. In process-group mode there is no cgroup to find
//! them by: nothing is recovered (the README says what a client sees).

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};

use crate::cgroup::{Cgroup, SUPERVISOR_LEAF};
use crate::manager::Inherited;
use crate::pidfd::Pidfd;
use crate::unit::Unit;

const FILE: &str = "recovery.json";
/// How long orphans whose unit is gone get between their signal and SIGKILL.
const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for the kernel to empty a killed cgroup.
const KILL_WAIT: Duration = Duration::from_secs(2);

/// What a running holdfast records for its successor.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(super) struct Record {
    /// The cgroup the service cgroups are under, as /proc/PID/cgroup
    /// names it (the same in every mount namespace).
    pub cgroup_root: Option<String>,
    /// holdfast made `cgroup_root` for itself: the successor removes it.
    pub made_root: bool,
    /// `<service>.<socket>` → the socket's inode (`socket:[N]` in /proc/PID/fd).
    pub sockets: BTreeMap<String, u64>,
}

/// What [`recover`] did, for the log and the tests.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Recovered {
    /// Listeners taken back, by name.
    pub sockets: Vec<String>,
    /// Orphaned processes signalled.
    pub orphans: usize,
}

/// Writes the record (a new file renamed over the old one, so a crash
/// never leaves half of one). A failure is logged: it only costs recovery.
pub(super) fn write(state_dir: &Path, record: &Record) {
    let tmp = state_dir.join(format!("{FILE}.tmp"));
    let result = std::fs::File::create(&tmp)
        .and_then(|mut f| {
            f.write_all(&serde_json::to_vec(record).expect("a record serializes"))?;
            f.sync_data()
        })
        .and_then(|()| std::fs::rename(&tmp, state_dir.join(FILE)));
    if let Err(e) = result {
        tracing::warn!(file = %state_dir.join(FILE).display(), error = %e, "cannot write the recovery record: a crash of holdfast would leave its services orphaned");
    }
}

/// Removes the record (a clean exit left nothing to recover).
pub(super) fn forget(state_dir: &Path) {
    let _ = std::fs::remove_file(state_dir.join(FILE));
}

fn read(state_dir: &Path) -> Option<Record> {
    let path = state_dir.join(FILE);
    let text = std::fs::read(&path).ok()?;
    match serde_json::from_slice(&text) {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "ignoring an unreadable recovery record");
            None
        }
    }
}

/// Takes back what the holdfast that last used `state_dir` left running:
/// its listeners into `inherited`, its processes stopped, its cgroups
/// removed. `units` give each orphan's kill signal and stop timeout.
pub(super) fn recover(state_dir: &Path, units: &[Unit], inherited: &mut Inherited) -> Recovered {
    let mut done = Recovered::default();
    let Some(record) = read(state_dir) else {
        return done;
    };
    forget(state_dir);
    let Some(root) = record
        .cgroup_root
        .as_deref()
        .and_then(crate::cgroup::dir_of)
    else {
        return done;
    };
    let Ok(root) = Cgroup::open(&root) else {
        return done; // gone with its processes
    };
    let services: Vec<Cgroup> = root
        .children()
        .unwrap_or_default()
        .into_iter()
        .filter(|c| {
            c.path()
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(".service") && n != SUPERVISOR_LEAF)
        })
        .collect();
    let mut wanted: HashMap<u64, &str> = record
        .sockets
        .iter()
        .map(|(name, ino)| (*ino, name.as_str()))
        .collect();
    let mut pids = Vec::new();
    for service in &services {
        for pid in service.all_pids().unwrap_or_default() {
            pids.push(pid);
            if !wanted.is_empty() {
                take_sockets(pid, &mut wanted, inherited, &mut done.sockets);
            }
        }
    }
    done.orphans = pids.len();
    if !pids.is_empty() || !done.sockets.is_empty() {
        tracing::warn!(
            orphans = pids.len(),
            pids = ?pids,
            listeners = %done.sockets.join(" "),
            "a holdfast that died left services running: took their listeners back; stopping them"
        );
    }
    stop(&services, units);
    for service in services {
        let path = service.path().to_path_buf();
        if let Err(e) = service.remove() {
            tracing::warn!(cgroup = %path.display(), error = %e, "cannot remove a dead holdfast's service cgroup");
        }
    }
    if record.made_root {
        let _ = std::fs::remove_dir(root.path());
    }
    done
}

/// Duplicates every fd of process `pid` that is a recorded listener.
fn take_sockets(
    pid: i32,
    wanted: &mut HashMap<u64, &str>,
    inherited: &mut Inherited,
    taken: &mut Vec<String>,
) {
    let Ok(pidfd) = Pidfd::open(pid) else {
        return; // gone
    };
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return;
    };
    for entry in entries.flatten() {
        let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        let Some(ino) = std::fs::read_link(entry.path())
            .ok()
            .and_then(|l| socket_inode(&l.to_string_lossy()))
        else {
            continue;
        };
        let Some(name) = wanted.get(&ino).copied() else {
            continue;
        };
        match pidfd.get_fd(fd) {
            Ok(owned) => {
                wanted.remove(&ino);
                taken.push(name.to_string());
                inherited.add_recovered(name.to_string(), owned);
            }
            Err(e) => {
                tracing::warn!(pid, fd, error = %e, "cannot take the listener {name} back");
            }
        }
    }
}

/// `N` of a `socket:[N]` link.
fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// Each orphaned service gets its unit's kill signal (SIGTERM when its unit
/// is gone), then `cgroup.kill` once its stop timeout has passed.
fn stop(services: &[Cgroup], units: &[Unit]) {
    let now = Instant::now();
    let mut deadlines = Vec::new();
    for service in services {
        if !service.populated().unwrap_or(false) {
            continue;
        }
        let name = service
            .path()
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".service"))
            .unwrap_or_default();
        let unit = units.iter().find(|u| u.name == name);
        let signal = unit
            .and_then(|u| Signal::try_from(u.service.process.kill_signal.0).ok())
            .unwrap_or(Signal::SIGTERM);
        let timeout = unit.map_or(DEFAULT_STOP_TIMEOUT, |u| u.service.stop_timeout);
        let _ = service.signal_all(signal);
        let _ = service.signal_all(Signal::SIGCONT);
        deadlines.push((service, crate::service::deadline(now, timeout)));
    }
    while !deadlines.is_empty() {
        let now = Instant::now();
        deadlines.retain(|(service, at)| {
            if !service.populated().unwrap_or(false) {
                return false;
            }
            if now >= *at {
                tracing::warn!(cgroup = %service.path().display(), "orphans still running at their stop timeout: killing them");
                let _ = service.kill();
                return false;
            }
            true
        });
        std::thread::sleep(Duration::from_millis(10));
    }
    let until = Instant::now() + KILL_WAIT;
    while services.iter().any(|s| s.populated().unwrap_or(false)) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_links() {
        assert_eq!(socket_inode("socket:[12345]"), Some(12345));
        assert_eq!(socket_inode("pipe:[12345]"), None);
        assert_eq!(socket_inode("/dev/null"), None);
        assert_eq!(socket_inode("socket:[x]"), None);
    }

    #[test]
    fn the_record_round_trips_and_is_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let mut record = Record {
            cgroup_root: Some("/x".into()),
            made_root: true,
            ..Record::default()
        };
        record.sockets.insert("web.http".into(), 42);
        write(dir.path(), &record);
        let back = read(dir.path()).unwrap();
        assert_eq!(back.cgroup_root, record.cgroup_root);
        assert_eq!(back.sockets, record.sockets);
        assert!(back.made_root);
        forget(dir.path());
        assert!(read(dir.path()).is_none());
        // Nothing recorded: nothing to do.
        let mut inherited = Inherited::default();
        assert_eq!(
            recover(dir.path(), &[], &mut inherited),
            Recovered::default()
        );
    }
}
