//! The in-place upgrade (`holdfast upgrade`, or SIGUSR2): holdfast re-executes
//! the binary now at its path, as the same pid, so every service stays its
//! child and every socket stays open.
//!
//! 1. *Check*: the new binary is asked whether it reads this state version
//!    (`holdfast __accepts-state N`); no, or no answer in 10 s: refused,
//!    nothing changed.
//! 2. *Save*: the whole daemon state (services with their state machines,
//!    instances, restart counters, backoff, start-limit windows, STATUS=
//!    texts, fd stores, log rings, acceptors; the output pipes; the sockmap
//!    slots; the dispatcher's counters) is written as versioned JSON into a
//!    memfd. Every fd the state names (listeners, notify sockets, stored fds,
//!    pipes, the control socket, the instance lock, the request's connection)
//!    loses FD_CLOEXEC; every signal is blocked.
//! 3. *Exec* the binary with the same argv and `HOLDFAST_UPGRADE_STATE=<memfd>`.
//!    If exec fails, the flags and the signal mask are put back and the old
//!    daemon carries on; the request gets the reason.
//! 4. *Resume* (the new binary, [`inherited`] then [`resume`]): it adopts the
//!    fds, rebuilds the registry and process table, attaches a new dispatcher
//!    beside the old one, fills it (sockets, bindings, counters) and only then
//!    removes the old one, binds the metrics endpoint again, unblocks the
//!    signals and answers the request.
//!
//! Instants cross the exec as CLOCK_MONOTONIC (`service::mono`).

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io::{Read, Seek, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::control::Reply;
use crate::dispatch::{Counters, DestinationId, Dispatcher, DEFAULT_BINDING_ENTRIES};
use crate::protocol::{Stream, UpgradeReport};

use super::output::ExportedPipe;
use super::poller::Token;
use super::registry::ServiceId;
use super::services::{SavedService, Service};
use super::sockets::{self, Destinations};
use super::{setup, Options, Supervisor, SupervisorError};

/// The version of the saved state; a binary reads the versions in
/// [`ACCEPTED_VERSIONS`]. Version 2: each line of a log ring carries its
/// time, stream and pid, each output pipe its instance's pid (a holdfast
/// that reads only version 1 could not read those, so it refuses 2).
pub const STATE_VERSION: u32 = 2;
/// The state versions this binary can resume from: version 1's rings (bare
/// lines) and pipes (no pid) are read with those unknown.
pub const ACCEPTED_VERSIONS: &[u32] = &[1, 2];
/// The environment variable that names the state memfd.
const STATE_ENV: &str = "HOLDFAST_UPGRADE_STATE";
/// The hidden subcommand that says whether a binary reads a state version.
pub const ACCEPTS_STATE: &str = "__accepts-state";
/// How long the new binary may take to answer [`ACCEPTS_STATE`].
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Serialize, Deserialize)]
pub(super) struct Saved {
    version: u32,
    /// The version of the holdfast that saved it.
    from: String,
    services: Vec<SavedService>,
    destinations: Destinations,
    outputs: Vec<SavedPipe>,
    control: Option<RawFd>,
    lock: Option<(RawFd, Option<RawFd>)>,
    /// The dispatcher's instance name and counters, if there was one.
    dispatcher: Option<(String, BTreeMap<DestinationId, Counters>)>,
    why_not: String,
    /// The connection of the `holdfast upgrade` that asked, to answer.
    reply_to: Option<RawFd>,
}

impl Saved {
    fn fds(&self) -> Vec<RawFd> {
        self.services
            .iter()
            .flat_map(SavedService::fds)
            .chain(self.outputs.iter().map(SavedPipe::fd))
            .chain(self.control)
            .chain(
                self.lock
                    .iter()
                    .flat_map(|(a, b)| std::iter::once(*a).chain(*b)),
            )
            .chain(self.reply_to)
            .collect()
    }
}

/// An output pipe as saved: version 1 wrote (index into `services`, stream,
/// fd, the line read so far); version 2 adds the instance's pid.
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum SavedPipe {
    V2 {
        service: usize,
        stream: Stream,
        pid: Option<i32>,
        fd: RawFd,
        partial: Vec<u8>,
    },
    V1(usize, String, RawFd, Vec<u8>),
}

impl SavedPipe {
    fn fd(&self) -> RawFd {
        match self {
            SavedPipe::V2 { fd, .. } | SavedPipe::V1(_, _, fd, _) => *fd,
        }
    }

    /// The pipe again, for the service `service` finds by its index into
    /// the saved services (`None`: not one of them).
    fn resolve(self, service: impl FnOnce(usize) -> Option<ServiceId>) -> Option<ExportedPipe> {
        let (k, stream, pid, fd, partial) = match self {
            SavedPipe::V2 {
                service,
                stream,
                pid,
                fd,
                partial,
            } => (service, stream, pid, fd, partial),
            SavedPipe::V1(k, stream, fd, partial) => {
                let stream = if stream == "stdout" {
                    Stream::Stdout
                } else {
                    Stream::Stderr
                };
                (k, stream, None, fd, partial)
            }
        };
        Some(ExportedPipe {
            service: service(k)?,
            stream,
            pid,
            fd,
            partial,
        })
    }
}

/// Whether this binary resumes from state version `version` (the answer of
/// `holdfast __accepts-state`).
pub fn accepts(version: u32) -> bool {
    ACCEPTED_VERSIONS.contains(&version)
}

/// The binary now at holdfast's path (a replaced file shows as "(deleted)"
/// in /proc/self/exe: its path is where the new one is).
fn binary_path() -> std::io::Result<PathBuf> {
    let link = std::fs::read_link("/proc/self/exe")?;
    let bytes = link.as_os_str().as_bytes();
    Ok(match bytes.strip_suffix(b" (deleted)") {
        Some(b) => PathBuf::from(std::ffi::OsStr::from_bytes(b)),
        None => link,
    })
}

/// Asks `binary` whether it reads [`STATE_VERSION`]; the error says why not.
fn check_binary(binary: &Path) -> Result<(), String> {
    let mut child = std::process::Command::new(binary)
        .arg(ACCEPTS_STATE)
        .arg(STATE_VERSION.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run the new binary {}: {e}", binary.display()))?;
    let deadline = Instant::now() + CHECK_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                return Err(format!(
                    "the new binary {} does not accept state version {STATE_VERSION} ({status}){}",
                    binary.display(),
                    if err.trim().is_empty() {
                        String::new()
                    } else {
                        format!(": {}", err.trim())
                    }
                ));
            }
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "the new binary {} did not answer `{ACCEPTS_STATE}` within {}s",
                    binary.display(),
                    CHECK_TIMEOUT.as_secs()
                ));
            }
            Err(e) => return Err(format!("waiting for the new binary: {e}")),
        }
    }
}

/// Blocks every signal (they stay pending across the exec, for the new
/// holdfast to take once its handlers are in place).
fn block_signals() {
    let _ = nix::sys::signal::sigprocmask(
        nix::sys::signal::SigmaskHow::SIG_BLOCK,
        Some(&nix::sys::signal::SigSet::all()),
        None,
    );
}

/// Unblocks every signal (after [`block_signals`] and an exec, or a failed exec).
pub(super) fn unblock_signals() {
    let _ = nix::sys::signal::sigprocmask(
        nix::sys::signal::SigmaskHow::SIG_UNBLOCK,
        Some(&nix::sys::signal::SigSet::all()),
        None,
    );
}

impl Supervisor {
    /// Re-executes holdfast in place. Returns only if the upgrade was
    /// refused or the exec failed, with the reason; the daemon carries on
    /// unchanged (and `reply_to`, if given, has been answered with it).
    pub(super) fn upgrade(&mut self, reply_to: Option<UnixStream>) -> String {
        let why = match self.try_upgrade(reply_to.as_ref()) {
            Ok(never) => match never {},
            Err(why) => why,
        };
        tracing::error!("upgrade refused, this holdfast carries on: {why}");
        if let Some(mut stream) = reply_to {
            let _ = stream.set_nonblocking(false);
            let mut line = serde_json::to_vec(&Reply::error(format!(
                "upgrade refused, this holdfast carries on: {why}"
            )))
            .expect("replies serialize");
            line.push(b'\n');
            let _ = stream.write_all(&line);
        }
        why
    }

    fn try_upgrade(
        &mut self,
        reply_to: Option<&UnixStream>,
    ) -> Result<std::convert::Infallible, String> {
        if self.shutting_down {
            return Err("holdfast is shutting down".into());
        }
        let binary = binary_path().map_err(|e| format!("cannot read /proc/self/exe: {e}"))?;
        check_binary(&binary)?;
        let saved = self.save(reply_to)?;
        let json = serde_json::to_vec(&saved).map_err(|e| format!("cannot save the state: {e}"))?;
        let memfd = nix::sys::memfd::memfd_create(
            c"holdfast-state",
            nix::sys::memfd::MemFdCreateFlag::empty(),
        )
        .map_err(|e| format!("memfd_create: {e}"))?;
        let mut file = std::fs::File::from(memfd);
        file.write_all(&json)
            .and_then(|()| file.rewind())
            .map_err(|e| format!("cannot write the state: {e}"))?;

        let argv: Vec<CString> = std::env::args_os()
            .map(|a| CString::new(a.as_bytes()).expect("argv has no NUL"))
            .collect();
        let mut env: Vec<CString> = std::env::vars_os()
            .filter(|(k, _)| k != STATE_ENV)
            .filter_map(|(k, v)| {
                let mut kv = k;
                kv.push("=");
                kv.push(v);
                CString::new(kv.as_bytes()).ok()
            })
            .collect();
        env.push(CString::new(format!("{STATE_ENV}={}", file.as_raw_fd())).expect("digits"));
        let program = CString::new(binary.as_os_str().as_bytes())
            .map_err(|_| format!("{} has a NUL byte", binary.display()))?;

        // Past the point of no return but for exec itself: waiting requests
        // are told, the fds are kept open across the exec, signals held.
        self.fail_waiters("holdfast is upgrading in place: ask again");
        let fds = saved.fds();
        for fd in &fds {
            let _ = crate::fds::set_cloexec(*fd, false);
        }
        block_signals();
        tracing::info!(binary = %binary.display(), services = saved.services.len(), "upgrading in place: exec");
        let err = nix::unistd::execve(&program, &argv, &env).unwrap_err();
        // Still here: nothing has changed but the flags and the mask.
        unblock_signals();
        for fd in &fds {
            let _ = crate::fds::set_cloexec(*fd, true);
        }
        drop(file);
        Err(format!("exec {}: {err}", binary.display()))
    }

    fn save(&self, reply_to: Option<&UnixStream>) -> Result<Saved, String> {
        let mut index: BTreeMap<ServiceId, usize> = BTreeMap::new();
        let mut services = Vec::new();
        for (id, svc) in self.registry.all() {
            index.insert(id, services.len());
            services.push(svc.save(self.registry.is_live(id)));
        }
        let outputs = self
            .outputs
            .export()
            .into_iter()
            .filter_map(|p| {
                Some(SavedPipe::V2 {
                    service: *index.get(&p.service)?,
                    stream: p.stream,
                    pid: p.pid,
                    fd: p.fd,
                    partial: p.partial,
                })
            })
            .collect();
        let dispatcher = match &self.dispatcher {
            Some(d) => Some((
                d.instance().to_string(),
                d.counters()
                    .map_err(|e| format!("cannot read the counters: {e}"))?,
            )),
            None => None,
        };
        Ok(Saved {
            version: STATE_VERSION,
            from: env!("CARGO_PKG_VERSION").to_string(),
            services,
            destinations: self.destinations.clone(),
            outputs,
            control: self.server.as_ref().map(|s| s.listener_fd()),
            lock: self.lock.as_ref().map(|l| l.fds()),
            dispatcher,
            why_not: self.why_not.clone(),
            reply_to: reply_to.map(|s| s.as_raw_fd()),
        })
    }

    /// Answers every waiting request with an error.
    fn fail_waiters(&mut self, why: &str) {
        for w in std::mem::take(&mut self.waiters) {
            if let Some(server) = self.server.as_mut() {
                server.reply(w.connection(), &Reply::error(why));
            }
        }
    }
}

/// The state an upgrading holdfast left for this one, if it was exec'd by one.
pub(super) fn inherited() -> Result<Option<Saved>, SupervisorError> {
    let Some(var) = std::env::var_os(STATE_ENV) else {
        return Ok(None);
    };
    // SAFETY: the daemon is single-threaded at this point of its start (no
    // thread has been spawned yet), so nothing reads the environment concurrently.
    unsafe { std::env::remove_var(STATE_ENV) };
    let bad = |why: String| setup(STATE_ENV)(std::io::Error::other(why));
    let fd: RawFd = var
        .to_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("{var:?} is not an fd number")))?;
    // SAFETY: the upgrading holdfast passed this memfd for us alone.
    let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let mut json = Vec::new();
    file.read_to_end(&mut json)
        .map_err(|e| bad(format!("cannot read the state: {e}")))?;
    #[derive(Deserialize)]
    struct Version {
        version: u32,
    }
    let v: Version =
        serde_json::from_slice(&json).map_err(|e| bad(format!("unreadable state: {e}")))?;
    if !accepts(v.version) {
        return Err(bad(format!(
            "state version {} is not one this holdfast reads",
            v.version
        )));
    }
    serde_json::from_slice(&json)
        .map(Some)
        .map_err(|e| bad(format!("unreadable state: {e}")))
}

/// Answers the `holdfast upgrade` that asked (its connection `fd`, inherited
/// across the exec) with the report of the new binary.
fn answer_upgrade(fd: OwnedFd, from: String, services: usize) {
    let _ = crate::fds::set_cloexec(fd.as_raw_fd(), true);
    let mut stream = UnixStream::from(fd);
    let _ = stream.set_nonblocking(false);
    let report = UpgradeReport {
        pid: std::process::id(),
        from,
        to: env!("CARGO_PKG_VERSION").to_string(),
        services,
    };
    let mut line = serde_json::to_vec(&Reply::ok(&report)).expect("replies serialize");
    line.push(b'\n');
    let _ = stream.write_all(&line);
}

/// Rebuilds the daemon from what the holdfast before the exec saved.
pub(super) fn resume(opts: &Options, saved: Saved) -> Result<Supervisor, SupervisorError> {
    if saved.dispatcher.is_some() {
        // The kernel's BTF is parsed while the services are adopted.
        crate::dispatch::warm_up();
    }
    let adopt = |fd: RawFd| {
        // SAFETY: each fd the saved state names was kept open across the
        // exec for this process alone, and is named once.
        unsafe { OwnedFd::from_raw_fd(fd) }
    };
    let lock = match saved.lock {
        Some((state, netns)) => Some(crate::instance_lock::adopt(adopt(state), netns.map(adopt))?),
        None => None,
    };
    let mut sup = Supervisor::new(opts, lock, saved.destinations)?;
    sup.why_not = saved.why_not;
    // Retiring services first: a live one may have the same name.
    let (retiring, live): (Vec<_>, Vec<_>) = saved
        .services
        .into_iter()
        .enumerate()
        .partition(|(_, s)| !s.live);
    let mut by_index: BTreeMap<usize, ServiceId> = BTreeMap::new();
    for (k, s) in retiring.into_iter().chain(live) {
        let was_live = s.live;
        let svc = Service::adopt(s).map_err(setup("upgrade: a service's fds"))?;
        let pids = svc.tracked_pids();
        let id = if was_live {
            sup.add_service(svc)
        } else {
            let id = sup.registry.insert(svc);
            sup.registry.retire(id);
            id
        };
        for (pid, owner) in pids {
            sup.registry.track(pid, id, owner);
        }
        sup.resume_main_pids(id);
        by_index.insert(k, id);
    }
    for pipe in saved.outputs {
        let Some(pipe) = pipe.resolve(|k| by_index.get(&k).copied()) else {
            continue;
        };
        let _ = crate::fds::set_cloexec(pipe.fd, true);
        let fd = adopt(pipe.fd);
        let token = sup.outputs.adopt(pipe, fd);
        if let Some(fd) = sup.outputs.fd(token) {
            sup.poller
                .add(fd, Token::Output(token))
                .map_err(setup("epoll"))?;
        }
    }
    sup.bindings = sockets::bindings_of(sup.registry.live().map(|(_, s)| s));
    if let Some((instance, counters)) = saved.dispatcher {
        if let Err(e) = sup.attach_filled(&instance, Some(&counters)) {
            tracing::error!(error = %e, "upgrade: cannot attach the new dispatcher; the old program keeps steering, but bindings cannot change until holdfast restarts");
            sup.why_not = format!("the dispatcher could not be replaced at the upgrade ({e})");
        }
    }
    if let Some(fd) = saved.control {
        sup.server = Some(
            crate::control::Server::adopt(&opts.state_dir, adopt(fd))
                .map_err(setup("upgrade: the control socket"))?,
        );
    }
    if let Some(addr) = opts.metrics_listen {
        sup.serve_metrics(addr)?;
    }
    let services = sup.registry.live_count();
    tracing::info!(from = %saved.from, services, "upgraded in place: resumed");
    if let Some(fd) = saved.reply_to {
        answer_upgrade(adopt(fd), saved.from, services);
    }
    Ok(sup)
}

impl Supervisor {
    /// Attaches a dispatcher with every live socket and binding in its maps
    /// before its pins replace a stale or old instance's, then detaches any
    /// other holdfast link on the namespace. In an upgrade (`carried`: the
    /// counters saved before the exec) it also carries the old program's
    /// counters on. If that fails the old program keeps steering, but
    /// bindings can no longer change until holdfast restarts: said loudly.
    pub(super) fn attach_filled(
        &mut self,
        instance: &str,
        carried: Option<&BTreeMap<DestinationId, Counters>>,
    ) -> Result<(), crate::dispatch::DispatchError> {
        let all: Vec<(&sockets::Socket, &crate::unit::SocketConfig)> = self
            .registry
            .live()
            .flat_map(|(_, s)| s.sockets())
            .map(|k| (k, &k.config))
            .collect();
        let bindings = &super::doors::open_bindings(&self.registry, &self.bindings);
        let result = Dispatcher::attach_prepared(
            instance,
            Path::new("/proc/self/ns/net"),
            DEFAULT_BINDING_ENTRIES,
            |d| {
                sockets::steer(d, &all, bindings).map_err(|e| match e {
                    SupervisorError::Bindings(e) => e,
                    other => crate::dispatch::DispatchError::Pins {
                        op: "steer",
                        path: PathBuf::from(instance),
                        source: std::io::Error::other(other.to_string()),
                    },
                })?;
                // An upgrade: the old program served and counted every
                // lookup until now (this one yields to it), so its figures
                // of this moment, not those saved before the exec.
                let Some(saved) = carried else { return Ok(()) };
                let now = Dispatcher::pinned_counters(instance, saved.keys().copied())
                    .unwrap_or_else(|e| {
                        tracing::warn!(error = %e, "cannot read the old dispatcher's counters; carrying on those saved before the upgrade");
                        saved.clone()
                    });
                d.seed_counters(&now)
            },
        );
        let mut d = result?;
        if let Err(e) = d.detach_stale_links() {
            tracing::warn!(error = %e, "cannot look for stale holdfast links on this network namespace");
        }
        self.dispatcher = Some(d);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Version 1's pipes (tuples, no pid) are read; version 2's keep the pid.
    #[test]
    fn pipes_of_both_state_versions_are_read() {
        let v1: Vec<SavedPipe> =
            serde_json::from_str(r#"[[0,"stdout",17,[104,105]],[1,"stderr",18,[]]]"#).unwrap();
        let find = |k: usize| (k == 0).then(|| ServiceId::from_raw(5));
        let mut pipes = v1.into_iter().map(|p| p.resolve(find));
        let p = pipes.next().unwrap().expect("service 0 is known");
        assert_eq!(
            (p.service, p.stream, p.pid, p.fd, p.partial.as_slice()),
            (ServiceId::from_raw(5), Stream::Stdout, None, 17, &b"hi"[..])
        );
        assert!(pipes.next().unwrap().is_none(), "service 1 is not");

        let v2 = SavedPipe::V2 {
            service: 0,
            stream: Stream::Stderr,
            pid: Some(99),
            fd: 20,
            partial: vec![],
        };
        let json = serde_json::to_string(&v2).unwrap();
        let back: SavedPipe = serde_json::from_str(&json).unwrap();
        assert_eq!(back.fd(), 20);
        let p = back.resolve(find).unwrap();
        assert_eq!((p.stream, p.pid), (Stream::Stderr, Some(99)));
    }

    #[test]
    fn this_binary_reads_the_state_it_saves_and_the_one_before() {
        assert!(accepts(STATE_VERSION));
        assert!(accepts(1));
        assert!(!accepts(STATE_VERSION + 1));
    }
}
