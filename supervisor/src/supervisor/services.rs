//! Services at run time: their instances (a main one, an overlap candidate,
//! old ones draining), starting, stopping, both kinds of restart, readiness
//! and the watchdog through sd_notify, exits, and their output.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::notify::{FdStore, Message, Notification, NotifySocket, Senders};
use crate::service::{AfterExit, Exit, Lifecycle, State};
use crate::spawn::{self, Credentials};
use crate::unit::{ServiceType, Unit};

use super::inetd::Acceptor;
use super::sockets::Socket;
use super::{Supervisor, LOG_RING_LINES};

/// One running process tree of a service: its main process and process group.
#[derive(Debug)]
pub(super) struct Instance {
    /// The main pid (MAINPID= may move it within the process group).
    pub pid: Pid,
    /// The instance's process group (its first pid).
    pub pgid: Pid,
    pub started_at: Instant,
    pub ready: bool,
    /// A notify service must say READY=1 by then.
    pub ready_by: Option<Instant>,
    pub watchdog: Option<Duration>,
    pub watchdog_at: Option<Instant>,
    /// SIGTERM was sent; SIGKILL to the group at this instant.
    pub kill_at: Option<Instant>,
    /// Why holdfast stopped it (start timeout, watchdog): its exit is a
    /// failure whatever its status, as systemd counts it.
    pub failed: Option<String>,
}

impl Instance {
    fn deadline(&self) -> Option<Instant> {
        [
            self.ready_by.filter(|_| !self.ready),
            self.watchdog_at,
            self.kill_at,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// SIGTERM (and SIGCONT) to the whole group; SIGKILL after `timeout`.
    fn terminate(&mut self, service: &str, now: Instant, timeout: Duration) {
        if self.kill_at.is_some() {
            return;
        }
        tracing::info!(
            service,
            pid = self.pid.as_raw(),
            "stopping: SIGTERM to its process group"
        );
        let _ = killpg(self.pgid, Signal::SIGTERM);
        let _ = killpg(self.pgid, Signal::SIGCONT);
        self.kill_at = Some(now + timeout);
        self.ready_by = None;
        self.watchdog_at = None;
    }
}

/// One service at run time.
pub(super) struct Service {
    pub unit: Unit,
    pub sockets: Vec<Socket>,
    /// Sockets replaced by a reload, closed once the instances that hold them are gone.
    pub old_sockets: Vec<Socket>,
    pub life: Lifecycle,
    pub main: Option<Instance>,
    /// The new instance of an overlap restart, until it is ready.
    pub next: Option<Instance>,
    /// Old instances told to stop, draining.
    pub draining: Vec<Instance>,
    pub restarts: u32,
    pub next_start: Option<Instant>,
    pub last_exit: Option<Exit>,
    /// STATUS=, ERRNO=, RELOADING=1 from the service.
    pub status_text: Option<String>,
    pub errno: Option<i32>,
    pub reloading: bool,
    /// Why the last overlap restart was abandoned, for the waiting request.
    pub overlap_failure: Option<String>,
    /// Why the service is `failed`, for replies and status.
    pub failure: Option<String>,
    pub notify: Option<NotifySocket>,
    pub fd_store: FdStore,
    /// The uid its processes run as (for the notify socket's sender check).
    pub uid: u32,
    /// Per-connection instances of an accept service.
    pub acceptor: Acceptor,
    /// Sources its sockets' allow/deny refused in the sk_lookup program, as
    /// last read from the dispatcher's counters.
    pub dispatcher_denied: u64,
    pub log: VecDeque<String>,
    /// The sequence number the next captured line gets.
    pub log_next: u64,
    /// Main pids of instances that have exited, newest last: a late
    /// notification from one of them is not the current instance speaking.
    pub gone_pids: VecDeque<i32>,
}

/// How many exited main pids a service remembers (see `gone_pids`).
const GONE_PIDS: usize = 32;

/// Which of a service's instances a notification came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Main,
    /// The overlap candidate.
    Next,
    /// An old instance told to stop.
    Draining,
}

impl Service {
    /// A service not yet started, with its sockets; on failure (its notify
    /// socket) the sockets are given back with the error.
    pub fn new(
        unit: Unit,
        sockets: Vec<Socket>,
        state_dir: &Path,
    ) -> Result<Service, (String, Vec<Socket>)> {
        let notify = match NotifySocket::bind(state_dir, &unit.name) {
            Ok(n) => n,
            Err(e) => {
                return Err((
                    format!(
                        "{}: service {}: cannot create its notify socket: {e}",
                        unit.path.display(),
                        unit.name
                    ),
                    sockets,
                ))
            }
        };
        let life = Lifecycle::new(&unit.service);
        let fd_store = FdStore::new(unit.service.fd_store_max as usize);
        Ok(Service {
            unit,
            sockets,
            old_sockets: Vec::new(),
            life,
            main: None,
            next: None,
            draining: Vec::new(),
            restarts: 0,
            next_start: None,
            last_exit: None,
            status_text: None,
            errno: None,
            reloading: false,
            overlap_failure: None,
            failure: None,
            notify: Some(notify),
            fd_store,
            uid: 0,
            acceptor: Acceptor::default(),
            dispatcher_denied: 0,
            log: VecDeque::new(),
            log_next: 0,
            gone_pids: VecDeque::new(),
        })
    }

    pub fn name(&self) -> &str {
        &self.unit.name
    }

    pub fn has_processes(&self) -> bool {
        self.main.is_some()
            || self.next.is_some()
            || !self.draining.is_empty()
            || !self.acceptor.connections.is_empty()
    }

    /// Started by traffic (accept or on-demand) rather than at boot.
    pub fn traffic_started(&self) -> bool {
        self.accept_socket().is_some() || self.unit.service.on_demand
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.main
            .iter()
            .chain(&self.next)
            .chain(&self.draining)
            .filter_map(Instance::deadline)
            .chain(self.next_start)
            .chain(self.acceptor.paused_until)
            .chain(self.acceptor.connections.iter().filter_map(|c| c.kill_at))
            .min()
    }

    fn instances(&self) -> impl Iterator<Item = &Instance> {
        self.main.iter().chain(&self.next).chain(&self.draining)
    }

    /// The instance a notification from `pid` is about, and its role: the
    /// one whose main pid it is or whose process group holds it. A sender
    /// already reaped (a short-lived `systemd-notify`) is taken for the
    /// newest instance, unless it is the main pid of an instance that has
    /// exited: an old instance's last words are not the new one's.
    fn instance_of(&mut self, pid: i32) -> Option<(&mut Instance, Role)> {
        let pgid = nix::unistd::getpgid(Some(Pid::from_raw(pid))).ok();
        let matches = |i: &Instance| i.pid.as_raw() == pid || Some(i.pgid) == pgid;
        if self.next.as_ref().is_some_and(matches) {
            return self.next.as_mut().map(|i| (i, Role::Next));
        }
        if self.main.as_ref().is_some_and(matches) {
            return self.main.as_mut().map(|i| (i, Role::Main));
        }
        if let Some(k) = self.draining.iter().position(matches) {
            return self.draining.get_mut(k).map(|i| (i, Role::Draining));
        }
        if pgid.is_none() && !self.gone_pids.contains(&pid) {
            if let Some(next) = self.next.as_mut() {
                return Some((next, Role::Next));
            }
            return self.main.as_mut().map(|i| (i, Role::Main));
        }
        None
    }

    /// Remembers the main pid of an instance that has exited.
    fn gone(&mut self, pid: Pid) {
        if self.gone_pids.len() >= GONE_PIDS {
            self.gone_pids.pop_front();
        }
        self.gone_pids.push_back(pid.as_raw());
    }

    fn set_waiting(&mut self, t: Instant) {
        self.life.state = State::Waiting;
        self.next_start = Some(t);
    }
}

/// A service's stdout or stderr, line by line.
pub(super) struct Output {
    pub service: String,
    pub stream: &'static str,
    pub fd: OwnedFd,
    pub partial: Vec<u8>,
}

impl Supervisor {
    /// The PATH a service's program is looked up in, and the environment
    /// every instance of it gets before its unit's `environment`.
    pub(super) fn base_env(&self, i: usize) -> (Option<OsString>, Vec<(String, OsString)>) {
        let svc = &self.services[i];
        let cfg = &svc.unit.service;
        let path_var: Option<OsString> = cfg
            .environment
            .get("PATH")
            .map(OsString::from)
            .or_else(|| self.base_path.clone());
        let mut env: Vec<(String, OsString)> = Vec::new();
        if let Some(p) = &path_var {
            env.push(("PATH".into(), p.clone()));
        }
        if let Some(n) = &svc.notify {
            env.push(("NOTIFY_SOCKET".into(), n.path().as_os_str().to_owned()));
        }
        if let Some(w) = cfg.watchdog {
            env.push(("WATCHDOG_USEC".into(), w.as_micros().to_string().into()));
        }
        (path_var, env)
    }

    /// Spawns a new instance of service `i` with its sockets and stored fds.
    fn spawn_instance(&mut self, i: usize, now: Instant) -> Result<Instance, spawn::SpawnError> {
        let (path_var, mut env) = self.base_env(i);
        let svc = &self.services[i];
        let cfg = &svc.unit.service;
        let program = spawn::resolve_program(&cfg.exec[0], path_var.as_deref())?;
        let credentials = Credentials::resolve(cfg.user.as_deref(), cfg.group.as_deref())?;
        let (out_r, out_w) = spawn::output_pipe()?;
        let (err_r, err_w) = spawn::output_pipe()?;
        for (k, v) in &cfg.environment {
            env.push((k.clone(), v.into()));
        }
        let mut fds: Vec<(BorrowedFd<'_>, &str)> = svc
            .sockets
            .iter()
            .map(|s| (s.fd.as_fd(), s.name.as_str()))
            .collect();
        fds.extend(svc.fd_store.fds().map(|(name, fd)| (fd, name)));
        let cmd = spawn::Command {
            program: &program,
            argv: &cfg.exec,
            env,
            fds,
            stdin: None,
            stdout: out_w.as_fd(),
            stderr: err_w.as_fd(),
            credentials: credentials.as_ref(),
            working_directory: cfg.working_directory.as_deref(),
        };
        let pid = spawn::spawn(&cmd)?;
        let uid = credentials.as_ref().map_or(0, |c| c.uid);
        let notify_type = cfg.kind == ServiceType::Notify;
        let instance = Instance {
            pid,
            pgid: pid,
            started_at: now,
            ready: !notify_type,
            ready_by: notify_type.then(|| now + cfg.start_timeout),
            watchdog: cfg.watchdog,
            watchdog_at: cfg.watchdog.map(|w| now + w),
            kill_at: None,
            failed: None,
        };
        let name = svc.unit.name.clone();
        self.services[i].uid = uid;
        tracing::info!(service = %name, pid = pid.as_raw(), "started");
        self.outputs.push(Output {
            service: name.clone(),
            stream: "stdout",
            fd: out_r,
            partial: Vec::new(),
        });
        self.outputs.push(Output {
            service: name,
            stream: "stderr",
            fd: err_r,
            partial: Vec::new(),
        });
        Ok(instance)
    }

    /// Starts service `i` now. Automatic starts count towards the start
    /// limit; those a user asked for (start, restart) do not.
    pub(super) fn start(&mut self, i: usize, now: Instant) {
        self.start_counted(i, now, true)
    }

    pub(super) fn start_counted(&mut self, i: usize, now: Instant, counted: bool) {
        let svc = &mut self.services[i];
        svc.next_start = None;
        svc.failure = None;
        if counted && !svc.life.start_limit.try_start(now) {
            let why = format!(
                "start limit hit: more than {} starts within {}; left alone until `holdfast start`",
                svc.unit.service.start_limit_burst,
                humantime::format_duration(svc.unit.service.start_limit_interval)
            );
            tracing::error!(service = %svc.name(), "{why}");
            svc.failure = Some(why);
            svc.life.state = State::Failed;
            return;
        }
        match self.spawn_instance(i, now) {
            Ok(inst) => {
                let svc = &mut self.services[i];
                svc.life.state = if inst.ready {
                    State::Running
                } else {
                    State::Starting
                };
                svc.status_text = None;
                svc.reloading = false;
                svc.main = Some(inst);
            }
            Err(e) => {
                let svc = &mut self.services[i];
                tracing::error!(service = %svc.name(), error = %e, "cannot start");
                svc.failure = Some(format!("cannot start: {e}"));
                svc.last_exit = Some(Exit::Code(127));
                match svc.life.after_exit(true, Duration::ZERO, now) {
                    AfterExit::RestartAt(t) => svc.set_waiting(t),
                    AfterExit::Stay(_) => svc.life.state = State::Failed,
                }
            }
        }
    }

    /// An overlap restart: a new instance on the same sockets; the old one is
    /// stopped only once the new one is ready.
    pub(super) fn start_overlap(&mut self, i: usize, now: Instant) -> Result<(), String> {
        if self.services[i].next.is_some() {
            return Ok(());
        }
        match self.spawn_instance(i, now) {
            Ok(inst) => {
                let ready = inst.ready;
                self.services[i].next = Some(inst);
                if ready {
                    self.promote(i, now);
                }
                Ok(())
            }
            Err(e) => {
                tracing::error!(service = %self.services[i].name(), error = %e, "overlap restart: cannot start the new instance; the old one keeps serving");
                Err(format!(
                    "cannot start the new instance: {e}; the old one keeps serving"
                ))
            }
        }
    }

    /// The overlap candidate is ready: it becomes the main instance and the
    /// old one drains.
    fn promote(&mut self, i: usize, now: Instant) {
        let svc = &mut self.services[i];
        let Some(new) = svc.next.take() else {
            return;
        };
        if let Some(mut old) = svc.main.take() {
            old.terminate(&svc.unit.name, now, svc.unit.service.stop_timeout);
            svc.draining.push(old);
        }
        tracing::info!(service = %svc.unit.name, pid = new.pid.as_raw(), "overlap restart: the new instance is ready and serving; the old one drains");
        svc.main = Some(new);
        svc.restarts += 1;
        svc.life.state = State::Running;
    }

    /// Abandons an overlap restart: the candidate is stopped, the old instance stays.
    fn abandon_overlap(&mut self, i: usize, now: Instant, why: String) {
        let svc = &mut self.services[i];
        if let Some(mut next) = svc.next.take() {
            tracing::error!(service = %svc.unit.name, pid = next.pid.as_raw(), "overlap restart abandoned: {why}; the old instance keeps serving");
            next.terminate(&svc.unit.name, now, svc.unit.service.stop_timeout);
            svc.draining.push(next);
            svc.overlap_failure = Some(format!(
                "the new instance {why}; the old instance keeps serving"
            ));
        }
    }

    /// SIGTERM to every instance's process group; SIGKILL at the stop timeout.
    pub(super) fn stop(&mut self, i: usize, now: Instant) {
        let svc = &mut self.services[i];
        svc.next_start = None;
        Self::stop_connections(svc, now);
        let timeout = svc.unit.service.stop_timeout;
        let name = svc.unit.name.clone();
        if let Some(mut next) = svc.next.take() {
            next.terminate(&name, now, timeout);
            svc.draining.push(next);
        }
        match svc.main.as_mut() {
            Some(main) => {
                svc.life.stop_requested = true;
                svc.life.restart_requested = false;
                main.terminate(&name, now, timeout);
                svc.life.state = State::Stopping;
            }
            None => {
                if matches!(
                    svc.life.state,
                    State::Waiting | State::Starting | State::Running | State::Listening
                ) {
                    svc.life.state = State::Stopped;
                }
            }
        }
    }

    /// Stops every instance of a service a reload removed.
    pub(super) fn retire(&mut self, k: usize, now: Instant) {
        let svc = &mut self.retiring[k];
        let timeout = svc.unit.service.stop_timeout;
        let name = svc.unit.name.clone();
        svc.next_start = None;
        svc.life.state = State::Stopping;
        // Its notify socket goes now, so that a unit of the same name can be
        // added back while these processes are still stopping.
        svc.notify = None;
        Self::stop_connections(svc, now);
        for mut inst in svc.next.take().into_iter().chain(svc.main.take()) {
            inst.terminate(&name, now, timeout);
            svc.draining.push(inst);
        }
    }

    /// A stop-start restart: the sockets stay open while no instance runs.
    pub(super) fn restart_stop_start(&mut self, i: usize, now: Instant) {
        let svc = &mut self.services[i];
        let timeout = svc.unit.service.stop_timeout;
        let name = svc.unit.name.clone();
        match svc.main.as_mut() {
            Some(main) => {
                svc.life.restart_requested = true;
                svc.life.stop_requested = false;
                main.terminate(&name, now, timeout);
                svc.life.state = State::Stopping;
            }
            None => {
                svc.life.reset();
                self.start_counted(i, now, false);
            }
        }
    }

    pub(super) fn reap(&mut self) {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => self.exited(pid, Exit::Code(code)),
                Ok(WaitStatus::Signaled(pid, sig, _)) => self.exited(pid, Exit::Signal(sig as i32)),
                Ok(WaitStatus::StillAlive) | Err(nix::errno::Errno::ECHILD) => return,
                Ok(_) => continue,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "waitpid failed");
                    return;
                }
            }
        }
    }

    fn exited(&mut self, pid: Pid, exit: Exit) {
        let now = Instant::now();
        if self.connection_exited(pid) {
            return;
        }
        // Old instances (draining, or of a retired service) just go.
        for svc in self.services.iter_mut().chain(self.retiring.iter_mut()) {
            if let Some(k) = svc.draining.iter().position(|d| d.pid == pid) {
                let d = svc.draining.remove(k);
                let _ = killpg(d.pgid, Signal::SIGKILL);
                svc.gone(d.pid);
                tracing::info!(service = %svc.unit.name, pid = pid.as_raw(), %exit, "old instance exited");
                // Sockets a reload replaced are held for the instances started
                // before it: once none drains and no restart is under way, the
                // main instance (if any) runs on the new sockets.
                if svc.draining.is_empty() && svc.next.is_none() && !svc.life.restart_requested {
                    svc.old_sockets.clear();
                }
                return;
            }
        }
        for svc in self.retiring.iter_mut() {
            if svc.main.as_ref().is_some_and(|m| m.pid == pid) {
                let m = svc.main.take().expect("checked");
                let _ = killpg(m.pgid, Signal::SIGKILL);
                svc.gone(m.pid);
                tracing::info!(service = %svc.unit.name, pid = pid.as_raw(), %exit, "removed service exited");
                return;
            }
        }
        let Some(i) = self.services.iter().position(|s| {
            s.main.as_ref().is_some_and(|m| m.pid == pid)
                || s.next.as_ref().is_some_and(|m| m.pid == pid)
        }) else {
            tracing::debug!(pid = pid.as_raw(), %exit, "reaped an orphan");
            return;
        };
        if self.services[i].next.as_ref().is_some_and(|n| n.pid == pid) {
            let svc = &mut self.services[i];
            let next = svc.next.take().expect("checked");
            let _ = killpg(next.pgid, Signal::SIGKILL);
            svc.gone(next.pid);
            svc.draining.retain(|d| d.pid != pid);
            tracing::error!(service = %svc.unit.name, pid = pid.as_raw(), %exit, "overlap restart: the new instance exited before it was ready; the old one keeps serving");
            svc.overlap_failure = Some(format!(
                "the new instance exited before it was ready ({exit}); the old instance keeps serving"
            ));
            return;
        }
        let shutting_down = self.shutting_down;
        let svc = &mut self.services[i];
        let main = svc.main.take().expect("checked");
        // Whatever the main process left behind in its group goes with it.
        let _ = killpg(main.pgid, Signal::SIGKILL);
        svc.gone(main.pid);
        let uptime = now.saturating_duration_since(main.started_at);
        svc.last_exit = Some(exit);
        svc.reloading = false;
        // An overlap candidate takes over at once if the old one dies.
        if svc.next.is_some() && !shutting_down && !svc.life.stop_requested {
            tracing::warn!(service = %svc.unit.name, pid = pid.as_raw(), %exit, "exited during an overlap restart; the new instance takes over");
            let next = svc.next.take().expect("checked");
            svc.life.state = if next.ready {
                State::Running
            } else {
                State::Starting
            };
            svc.main = Some(next);
            svc.restarts += 1;
            return;
        }
        let asked = svc.life.restart_requested;
        // An on-demand service waits for traffic again, unless it was stopped
        // or is to be restarted at once.
        if svc.unit.service.on_demand && !shutting_down && !svc.life.stop_requested && !asked {
            svc.life.state = State::Listening;
            tracing::info!(service = %svc.unit.name, pid = pid.as_raw(), %exit, "exited; listening for traffic again (on-demand)");
            if !svc.has_processes() {
                svc.old_sockets.clear();
            }
            return;
        }
        let after = if shutting_down {
            svc.life.stop_requested = false;
            AfterExit::Stay(State::Stopped)
        } else {
            let failed = !exit.success() || main.failed.is_some();
            svc.life.after_exit(failed, uptime, now)
        };
        match after {
            AfterExit::RestartAt(t) => {
                svc.restarts += 1;
                svc.set_waiting(t);
                tracing::info!(
                    service = %svc.unit.name, pid = pid.as_raw(), %exit,
                    delay_ms = t.saturating_duration_since(now).as_millis() as u64,
                    "exited; restarting"
                );
            }
            AfterExit::Stay(state) => {
                svc.life.state = state;
                if state == State::Failed && svc.failure.is_none() {
                    svc.failure = main.failed.clone();
                }
                tracing::info!(service = %svc.unit.name, pid = pid.as_raw(), %exit, state = state.as_str(), "exited");
            }
        }
        if !svc.has_processes() {
            svc.old_sockets.clear();
        }
        if svc.next_start.is_some_and(|t| t <= now) {
            self.start_counted(i, now, !asked);
        }
    }

    pub(super) fn run_timers(&mut self, now: Instant) {
        for svc in self.services.iter_mut().chain(self.retiring.iter_mut()) {
            let name = svc.unit.name.clone();
            if svc.acceptor.paused_until.is_some_and(|t| t <= now) {
                svc.acceptor.paused_until = None;
                tracing::info!(service = %name, "rate-limit pause over: accepting again");
            }
            Self::kill_late_connections(svc, now);
            for inst in svc
                .main
                .iter_mut()
                .chain(&mut svc.next)
                .chain(&mut svc.draining)
            {
                if inst.kill_at.is_some_and(|t| t <= now) {
                    inst.kill_at = Some(now + Duration::from_secs(3600));
                    tracing::warn!(service = %name, pid = inst.pid.as_raw(), "did not stop in time: SIGKILL to its process group");
                    let _ = killpg(inst.pgid, Signal::SIGKILL);
                }
            }
        }
        for i in 0..self.services.len() {
            let timeout = self.services[i].unit.service.stop_timeout;
            let start_timeout = self.services[i].unit.service.start_timeout;
            let svc = &mut self.services[i];
            let name = svc.unit.name.clone();
            // Start timeout of an overlap candidate: give up on it.
            if svc
                .next
                .as_ref()
                .is_some_and(|n| !n.ready && n.ready_by.is_some_and(|t| t <= now))
            {
                self.abandon_overlap(
                    i,
                    now,
                    format!(
                        "did not send READY=1 within start-timeout ({})",
                        humantime::format_duration(start_timeout)
                    ),
                );
            }
            let svc = &mut self.services[i];
            if let Some(main) = svc.main.as_mut() {
                if !main.ready && main.ready_by.is_some_and(|t| t <= now) {
                    tracing::error!(service = %name, pid = main.pid.as_raw(), timeout = %humantime::format_duration(start_timeout), "did not send READY=1 within start-timeout: stopping it");
                    main.terminate(&name, now, timeout);
                    main.failed = Some(format!(
                        "did not send READY=1 within start-timeout ({})",
                        humantime::format_duration(start_timeout)
                    ));
                    svc.life.state = State::Stopping;
                }
                if main.watchdog_at.is_some_and(|t| t <= now) {
                    tracing::error!(service = %name, pid = main.pid.as_raw(), "watchdog timeout: no WATCHDOG=1 in time; sending SIGABRT");
                    let _ = kill(main.pid, Signal::SIGABRT);
                    main.watchdog_at = None;
                    main.kill_at = Some(now + timeout);
                    main.failed = Some("watchdog timeout: no WATCHDOG=1 in time".into());
                    svc.life.state = State::Stopping;
                }
            }
            if self.services[i].next_start.is_some_and(|t| t <= now) && !self.shutting_down {
                self.start(i, now);
            }
        }
    }

    /// Reads every ready notify socket and acts on what the services say.
    pub(super) fn read_notifications(&mut self, ready: &[String]) {
        for name in ready {
            let Some(i) = self.find(name) else { continue };
            let messages = {
                let svc = &self.services[i];
                let Some(sock) = &svc.notify else { continue };
                let main_pids: Vec<i32> = svc.instances().map(|i| i.pid.as_raw()).collect();
                let groups: Vec<i32> = svc.instances().map(|i| i.pgid.as_raw()).collect();
                let senders = Senders {
                    main_pids: &main_pids,
                    groups: &groups,
                    uid: svc.uid,
                };
                sock.receive(&|sender| senders.accepts(sender))
            };
            for m in messages {
                self.notified(i, m);
            }
        }
    }

    fn notified(&mut self, i: usize, mut m: Message) {
        let now = Instant::now();
        let stop_timeout = self.services[i].unit.service.stop_timeout;
        let mut became_ready = false;
        let role;
        {
            let svc = &mut self.services[i];
            let name = svc.unit.name.clone();
            let pid = m.sender.pid;
            let Some((inst, r)) = svc.instance_of(pid) else {
                tracing::warn!(service = %name, pid, "notification from a process of no current instance: ignored");
                return;
            };
            role = r;
            let mut fds = std::mem::take(&mut m.fds).into_iter();
            let mut store_requests = Vec::new();
            let mut main_state: Option<State> = None;
            for item in m.items {
                match item {
                    Notification::Ready => {
                        if !inst.ready {
                            inst.ready = true;
                            inst.ready_by = None;
                            became_ready = true;
                            tracing::info!(service = %name, pid = inst.pid.as_raw(), "ready (READY=1)");
                        }
                        main_state = Some(State::Running);
                    }
                    Notification::Reloading => {
                        main_state = Some(State::Starting);
                    }
                    Notification::Stopping => main_state = Some(State::Stopping),
                    Notification::Status(s) => store_requests.push(("status", s)),
                    Notification::MainPid(p) => {
                        let target = Pid::from_raw(p);
                        match nix::unistd::getpgid(Some(target)) {
                            Ok(g) if g == inst.pgid => {
                                tracing::info!(service = %name, old = inst.pid.as_raw(), new = p, "main pid changed (MAINPID=)");
                                inst.pid = target;
                            }
                            _ => {
                                tracing::warn!(service = %name, pid = p, "MAINPID= names a process outside the service: ignored")
                            }
                        }
                    }
                    Notification::ExtendTimeout(d) => {
                        let t = now + d;
                        if let Some(r) = inst.ready_by.as_mut() {
                            *r = (*r).max(t);
                        }
                        if let Some(k) = inst.kill_at.as_mut() {
                            *k = (*k).max(t);
                        }
                        if let Some(w) = inst.watchdog_at.as_mut() {
                            *w = (*w).max(t);
                        }
                    }
                    Notification::Watchdog => {
                        if let Some(w) = inst.watchdog {
                            inst.watchdog_at = Some(now + w);
                        }
                    }
                    Notification::WatchdogTrigger => {
                        tracing::error!(service = %name, pid = inst.pid.as_raw(), "WATCHDOG=trigger: sending SIGABRT");
                        let _ = kill(inst.pid, Signal::SIGABRT);
                        inst.watchdog_at = None;
                        inst.kill_at = Some(now + stop_timeout);
                        inst.failed = Some("WATCHDOG=trigger".into());
                    }
                    Notification::WatchdogUsec(d) => {
                        if d.is_zero() {
                            inst.watchdog = None;
                            inst.watchdog_at = None;
                        } else {
                            inst.watchdog = Some(d);
                            inst.watchdog_at = Some(now + d);
                        }
                    }
                    Notification::Errno(e) => store_requests.push(("errno", e.to_string())),
                    Notification::FdStore { name: fdname } => {
                        store_requests.push(("fdstore", fdname.unwrap_or_else(|| "stored".into())))
                    }
                    Notification::FdStoreRemove { name: fdname } => {
                        store_requests.push(("fdstoreremove", fdname))
                    }
                    Notification::Barrier => {}
                    Notification::Other(k, _) => {
                        tracing::debug!(service = %name, key = %k, "unknown notification ignored")
                    }
                }
            }
            // What an old instance says while it drains is about it, not
            // the service: its STATUS=, ERRNO= and STOPPING=1 are not shown.
            let speaks_for_service = role != Role::Draining;
            for (what, value) in store_requests {
                match what {
                    "status" if speaks_for_service => svc.status_text = Some(value),
                    "errno" if speaks_for_service => svc.errno = value.parse().ok(),
                    "fdstore" => {
                        for fd in fds.by_ref() {
                            if let Err(e) = svc.fd_store.add(&value, fd) {
                                tracing::warn!(service = %name, fdname = %value, error = %e, "fd store refused an fd");
                            } else {
                                tracing::info!(service = %name, fdname = %value, "fd stored");
                            }
                        }
                    }
                    "fdstoreremove" => {
                        svc.fd_store.remove(&value);
                        tracing::info!(service = %name, fdname = %value, "fd store entry removed");
                    }
                    _ => {}
                }
            }
            if role == Role::Main {
                match main_state {
                    Some(State::Running) => {
                        svc.reloading = false;
                        if matches!(svc.life.state, State::Starting) {
                            svc.life.state = State::Running;
                        }
                    }
                    Some(State::Starting) => svc.reloading = true,
                    Some(State::Stopping) => {
                        if matches!(svc.life.state, State::Running | State::Starting) {
                            svc.life.state = State::Stopping;
                        }
                    }
                    _ => {}
                }
            }
        }
        if became_ready && role == Role::Next {
            self.promote(i, now);
        }
    }

    pub(super) fn read_outputs(&mut self, ready: &[bool]) {
        let mut closed = Vec::new();
        for (k, o) in self.outputs.iter_mut().enumerate() {
            if !ready.get(k).copied().unwrap_or(false) {
                continue;
            }
            let mut buf = [0u8; 8192];
            let mut eof = false;
            for _ in 0..16 {
                match nix::unistd::read(o.fd.as_raw_fd(), &mut buf) {
                    Ok(0) => {
                        eof = true;
                        break;
                    }
                    Ok(n) => o.partial.extend_from_slice(&buf[..n]),
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(_) => break,
                }
            }
            let mut lines = Vec::new();
            while let Some(end) = o.partial.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = o.partial.drain(..=end).collect();
                lines.push(String::from_utf8_lossy(&line[..line.len() - 1]).into_owned());
            }
            // An over-long line without a newline is logged in pieces.
            if o.partial.len() > 16 * 1024 || (eof && !o.partial.is_empty()) {
                lines.push(String::from_utf8_lossy(&o.partial).into_owned());
                o.partial.clear();
            }
            let svc = self
                .services
                .iter_mut()
                .chain(self.retiring.iter_mut())
                .find(|s| s.unit.name == o.service);
            let mut svc = svc;
            for line in lines {
                tracing::info!(service = %o.service, stream = o.stream, "{line}");
                if let Some(s) = svc.as_mut() {
                    if s.log.len() >= LOG_RING_LINES {
                        s.log.pop_front();
                    }
                    s.log.push_back(line);
                    s.log_next += 1;
                }
            }
            if eof {
                closed.push(k);
            }
        }
        for k in closed.into_iter().rev() {
            self.outputs.remove(k);
        }
    }
}
