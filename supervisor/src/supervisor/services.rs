//! A service at run time — its unit, its state machine, its sockets, notify
//! socket, fd store, acceptor and log ring, fields private to this module —
//! and the daemon's side of the machine: carrying out its effects (spawning
//! instances, signalling their process groups), reaping exits, reading
//! notifications and running timers.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Instant;

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::notify::{CgroupSenders, FdStore, Message, Notification, NotifySocket, Senders};
use crate::pidfd::Pidfd;
use crate::protocol::Stream;
use crate::ratelimit::{AcceptThrottle, LogLimiter};
use crate::service::{CommandKind, Effect, Exit, InstanceId, Machine, Said};
use crate::spawn::{self, Credentials};
use crate::unit::{KillMode, NotifyAccess, StandardInput, StandardOutput, Unit};

use super::acceptor::Acceptor;
use super::output::LogRing;
use super::poller::Token;
use super::registry::{Owner, ServiceId};
use super::sockets::{SavedSocket, Socket};
use super::tracking::{SavedTracking, Tracking};
use super::Supervisor;

/// One service at run time.
pub(super) struct Service {
    unit: Unit,
    machine: Machine,
    sockets: Vec<Socket>,
    /// Sockets replaced by a reload, closed once the instances that hold them are gone.
    old_sockets: Vec<Socket>,
    notify: Option<NotifySocket>,
    fd_store: FdStore,
    /// The uid its processes run as (for the notify socket's sender check).
    uid: u32,
    /// Accept services: the per-connection acceptor.
    acceptor: Option<Acceptor>,
    /// Sources its sockets' allow/deny refused in the sk_lookup program, as
    /// last read from the dispatcher's counters.
    dispatcher_denied: u64,
    log: LogRing,
    /// The process group of each live instance (its first pid).
    groups: BTreeMap<InstanceId, Pid>,
    /// Its cgroups (or process groups): how its processes are signalled.
    tracking: Tracking,
    /// A pidfd on each instance's main process named by MAINPID= (which
    /// may not be holdfast's child), watched by the event loop: its exit is
    /// seen, and a signal never goes to a pid number reused since.
    main_pidfds: BTreeMap<InstanceId, Pidfd>,
    /// The pidfd of a MAINPID= just checked by [`Supervisor::notified`],
    /// for the machine's `Effect::MainPid` to keep.
    offered_main_pid: Option<Pidfd>,
    /// Main pids of MAINPID= gone across an in-place upgrade (no pidfd
    /// could be opened again): exited, as soon as the service is registered.
    main_pids_lost: Vec<i32>,
    /// Accept services: set while accept fails for lack of fds (its
    /// listener is not polled), and accept's rate-limited warnings.
    accept: AcceptThrottle,
    /// Its TCP listeners are shut while it is failed (see `doors.rs`).
    doors_shut: bool,
}

/// How long an accept service stops accepting after accept found no fd.
const ACCEPT_PAUSE: std::time::Duration = std::time::Duration::from_millis(250);

fn accept_throttle() -> AcceptThrottle {
    AcceptThrottle::new(
        ACCEPT_PAUSE,
        LogLimiter::new(5, std::time::Duration::from_secs(10)),
    )
}

impl Service {
    /// A service not yet started, with its sockets; on failure (its notify
    /// socket) the sockets are given back with the error.
    pub fn new(
        unit: Unit,
        sockets: Vec<Socket>,
        state_dir: &Path,
    ) -> Result<Service, (String, Vec<Socket>)> {
        let notify = match notify_socket_for(&unit, state_dir) {
            Ok(n) => n,
            Err(e) => return Err((e, sockets)),
        };
        let acceptor = accept_options(&sockets).map(Acceptor::new);
        let traffic_started = acceptor.is_some() || unit.service.on_demand;
        Ok(Service {
            machine: Machine::new(&unit.name, &unit.service, traffic_started),
            fd_store: FdStore::new(unit.service.fd_store_max as usize),
            unit,
            sockets,
            old_sockets: Vec::new(),
            notify,
            uid: 0,
            acceptor,
            dispatcher_denied: 0,
            log: LogRing::default(),
            groups: BTreeMap::new(),
            tracking: Tracking::default(),
            accept: accept_throttle(),
            main_pidfds: BTreeMap::new(),
            offered_main_pid: None,
            main_pids_lost: Vec::new(),
            doors_shut: false,
        })
    }

    pub fn name(&self) -> &str {
        &self.unit.name
    }
    pub fn unit(&self) -> &Unit {
        &self.unit
    }
    pub fn machine(&self) -> &Machine {
        &self.machine
    }
    pub fn sockets(&self) -> &[Socket] {
        &self.sockets
    }
    /// Its sockets and the old ones a reload replaced, still held by instances.
    pub fn all_sockets(&self) -> impl Iterator<Item = &Socket> {
        self.sockets.iter().chain(&self.old_sockets)
    }
    /// Whether its TCP listeners are shut (it is failed).
    pub fn doors_shut(&self) -> bool {
        self.doors_shut
    }
    pub fn set_doors_shut(&mut self, shut: bool) {
        self.doors_shut = shut;
    }
    pub fn notify(&self) -> Option<&NotifySocket> {
        self.notify.as_ref()
    }
    pub fn fd_store(&self) -> &FdStore {
        &self.fd_store
    }
    pub fn acceptor(&self) -> Option<&Acceptor> {
        self.acceptor.as_ref()
    }
    pub fn acceptor_mut(&mut self) -> Option<&mut Acceptor> {
        self.acceptor.as_mut()
    }
    pub fn log(&self) -> &LogRing {
        &self.log
    }
    pub fn dispatcher_denied(&self) -> u64 {
        self.dispatcher_denied
    }
    pub fn set_dispatcher_denied(&mut self, n: u64) {
        self.dispatcher_denied = n;
    }
    /// Its cgroup's memory and CPU usage (`None`: not tracked by cgroup).
    pub fn usage(&self) -> Option<crate::cgroup::Usage> {
        self.tracking.usage()
    }
    pub fn tracking(&self) -> &Tracking {
        &self.tracking
    }
    pub fn tracking_mut(&mut self) -> &mut Tracking {
        &mut self.tracking
    }
    /// The unit's `kill-signal` (SIGTERM if the number is not one nix knows).
    pub fn kill_signal(&self) -> Signal {
        Signal::try_from(self.unit.service.process.kill_signal.0).unwrap_or(Signal::SIGTERM)
    }

    pub fn has_processes(&self) -> bool {
        self.machine.has_instances() || self.acceptor.as_ref().is_some_and(|a| a.instances() > 0)
    }

    pub fn deadline(&self) -> Option<Instant> {
        self.machine
            .deadline()
            .into_iter()
            .chain(self.acceptor.as_ref().and_then(Acceptor::deadline))
            .chain(self.accept.resumes_at(Instant::now()))
            .min()
    }

    /// The socket holdfast accepts on, if this is an accept service.
    pub fn accept_socket(&self) -> Option<&Socket> {
        self.acceptor.as_ref().and_then(|_| self.sockets.first())
    }

    /// Whether the event loop should watch this service's sockets now.
    pub fn wants_traffic(&self, now: Instant) -> bool {
        if self.machine.state() != crate::service::State::Listening {
            return false;
        }
        match &self.acceptor {
            Some(a) => a.has_room(now) && !self.accept.is_paused(now),
            None => self.unit.service.on_demand && self.machine.main().is_none(),
        }
    }

    /// accept on its listener failed with `e`: logged (a few lines per 10 s,
    /// then "repeated N times"); for lack of fds, accepting pauses, the
    /// listener left out of the poll set (it stays readable: polling it at
    /// once would spin).
    pub fn accept_failed(&mut self, e: &std::io::Error, now: Instant) {
        if let Some(w) = self.accept.failed(e, now) {
            tracing::warn!(service = %self.unit.name, error = %e, repeated = w.repeated, "accept failed{}", w.hint);
        }
    }

    /// Says how many accept warnings were dropped, once their window is over.
    pub fn report_suppressed_accept_errors(&mut self, now: Instant) {
        if let Some(repeated) = self.accept.take_suppressed(now) {
            tracing::warn!(service = %self.unit.name, repeated, "accept failed (the last message repeated {repeated} times)");
        }
    }

    /// A reload's commit: the unit, its sockets (the old ones kept until the
    /// instances holding them are gone), the machine's config, the fd store's limit.
    pub fn replace(&mut self, unit: Unit, sockets: Vec<Socket>, old: Vec<Socket>) {
        self.old_sockets.extend(old);
        if !self.has_processes() {
            self.old_sockets.clear();
        }
        if unit.service.fd_store_max != self.unit.service.fd_store_max {
            let closed = self.fd_store.set_max(unit.service.fd_store_max as usize);
            if closed > 0 {
                tracing::warn!(service = %unit.name, closed, max = unit.service.fd_store_max, "fd-store-max lowered: the newest stored fds over it are closed");
            }
        }
        self.machine.set_config(&unit.service);
        if let (Some(a), Some(opts)) = (self.acceptor.as_mut(), accept_options(&sockets)) {
            a.set_options(opts);
        }
        self.sockets = sockets;
        self.unit = unit;
    }

    /// Takes the sockets out (a reload builds the new list from them).
    pub fn take_sockets(&mut self) -> Vec<Socket> {
        std::mem::take(&mut self.sockets)
    }

    /// A reload gave it a notify socket (its `notify-access` was `none`).
    pub fn set_notify(&mut self, notify: NotifySocket) {
        self.notify = Some(notify);
    }

    /// A reload removed the unit: its notify socket goes now, so that a unit
    /// of the same name can be added back while its processes stop.
    pub fn drop_notify(&mut self) {
        self.notify = None;
    }
}

/// A service as an in-place upgrade carries it across the exec: its state,
/// and its fds (sockets, notify socket, fd store) by number, inherited.
#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct SavedService {
    unit: Unit,
    machine: Machine,
    sockets: Vec<SavedSocket>,
    old_sockets: Vec<SavedSocket>,
    notify: Option<(RawFd, PathBuf)>,
    fd_store: Vec<(String, RawFd)>,
    uid: u32,
    acceptor: Option<Acceptor>,
    dispatcher_denied: u64,
    log: LogRing,
    groups: Vec<(InstanceId, i32)>,
    tracking: SavedTracking,
    /// Main pids named by MAINPID=, their pidfds opened again on resume.
    #[serde(default)]
    main_pids: Vec<(InstanceId, i32)>,
    /// Live (false: retiring, removed by a reload and still stopping).
    pub live: bool,
}

impl SavedService {
    /// Every fd the new holdfast must inherit for this service.
    pub fn fds(&self) -> Vec<RawFd> {
        self.sockets
            .iter()
            .chain(&self.old_sockets)
            .map(SavedSocket::fd)
            .chain(self.notify.as_ref().map(|(fd, _)| *fd))
            .chain(self.fd_store.iter().map(|(_, fd)| *fd))
            .collect()
    }
}

impl Service {
    pub fn save(&self, live: bool) -> SavedService {
        SavedService {
            unit: self.unit.clone(),
            machine: self.machine.clone(),
            sockets: self.sockets.iter().map(Socket::save).collect(),
            old_sockets: self.old_sockets.iter().map(Socket::save).collect(),
            notify: self
                .notify
                .as_ref()
                .map(|n| (n.raw_fd(), n.path().to_path_buf())),
            fd_store: self
                .fd_store
                .fds()
                .map(|(name, fd)| (name.to_string(), fd.as_raw_fd()))
                .collect(),
            uid: self.uid,
            acceptor: self.acceptor.clone(),
            dispatcher_denied: self.dispatcher_denied,
            log: self.log.clone(),
            groups: self.groups.iter().map(|(i, g)| (*i, g.as_raw())).collect(),
            tracking: self.tracking.save(),
            main_pids: self
                .main_pidfds
                .iter()
                .map(|(i, p)| (*i, p.pid()))
                .collect(),
            live,
        }
    }

    /// The service again, in the upgraded holdfast, with its inherited fds.
    pub fn adopt(saved: SavedService) -> std::io::Result<Service> {
        let adopt_all = |socks: Vec<SavedSocket>| -> std::io::Result<Vec<Socket>> {
            socks.into_iter().map(Socket::adopt).collect()
        };
        let notify = match saved.notify {
            // SAFETY: the fd was this notify socket's before the exec; the
            // saved state names it once.
            Some((fd, path)) => Some(NotifySocket::adopt(
                unsafe { OwnedFd::from_raw_fd(fd) },
                path,
                &saved.unit.name,
            )?),
            None => None,
        };
        let mut fd_store = FdStore::new(saved.unit.service.fd_store_max as usize);
        for (name, fd) in saved.fd_store {
            crate::fds::set_cloexec(fd, true)?;
            // SAFETY: as above: an fd of the store before the exec, named once.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            if let Err(e) = fd_store.add(&name, fd) {
                tracing::warn!(service = %saved.unit.name, fdname = %name, error = %e, "upgrade: a stored fd could not be stored again");
            }
        }
        // The process a saved main pid names cannot have been reaped by
        // holdfast, the old one was watching it: if it is gone, the number
        // is not opened again (it may be someone else's by now).
        let mut main_pidfds = BTreeMap::new();
        let mut main_pids_lost = Vec::new();
        for (instance, pid) in saved.main_pids {
            match Pidfd::open(pid) {
                Ok(p) if !p.has_exited() => {
                    main_pidfds.insert(instance, p);
                }
                _ => main_pids_lost.push(pid),
            }
        }
        Ok(Service {
            main_pidfds,
            offered_main_pid: None,
            main_pids_lost,
            // Shut again, if it is failed, on the first turn.
            doors_shut: false,
            sockets: adopt_all(saved.sockets)?,
            old_sockets: adopt_all(saved.old_sockets)?,
            unit: saved.unit,
            machine: saved.machine,
            notify,
            fd_store,
            uid: saved.uid,
            acceptor: saved.acceptor,
            dispatcher_denied: saved.dispatcher_denied,
            log: saved.log,
            groups: saved
                .groups
                .into_iter()
                .map(|(i, g)| (i, Pid::from_raw(g)))
                .collect(),
            tracking: Tracking::restore(saved.tracking),
            accept: accept_throttle(),
        })
    }

    /// The pids the process table tracks for it: each instance's main pid
    /// and each per-connection instance.
    pub fn tracked_pids(&self) -> Vec<(i32, Owner)> {
        self.machine
            .instances()
            .map(|i| (i.pid, Owner::Instance(i.id)))
            .chain(
                self.acceptor
                    .iter()
                    .flat_map(|a| a.pids())
                    .map(|p| (p.as_raw(), Owner::Connection)),
            )
            .collect()
    }
}

/// The notify socket of a service of `unit`, bound in `state_dir`, if its
/// processes may use one: with `notify-access = "none"` (the default for
/// `type = "simple"`) NOTIFY_SOCKET is not set, so none is made (at 1000
/// simple services, binding them was a third of holdfast's start-up time).
/// The error names the unit file and the service.
pub(super) fn notify_socket_for(
    unit: &Unit,
    state_dir: &Path,
) -> Result<Option<NotifySocket>, String> {
    if unit.service.process.notify_access == NotifyAccess::None {
        return Ok(None);
    }
    NotifySocket::bind(state_dir, &unit.name)
        .map(Some)
        .map_err(|e| {
            format!(
                "{}: service {}: cannot create its notify socket: {e}",
                unit.path.display(),
                unit.name
            )
        })
}

fn accept_options(sockets: &[Socket]) -> Option<&crate::unit::SocketOptions> {
    match sockets {
        [s] if s.config.options.accept => Some(&s.config.options),
        _ => None,
    }
}

impl Supervisor {
    /// Runs `event` on service `id`'s machine and carries out its effects.
    pub(super) fn act(
        &mut self,
        id: ServiceId,
        now: Instant,
        event: impl FnOnce(&mut Machine) -> Vec<Effect>,
    ) {
        let Some(svc) = self.registry.get_mut(id) else {
            return;
        };
        let fx = event(&mut svc.machine);
        self.carry_out(id, fx, now);
    }

    /// Carries out a machine's effects, feeding back what came of spawns.
    pub(super) fn carry_out(&mut self, id: ServiceId, fx: Vec<Effect>, now: Instant) {
        let mut queue: std::collections::VecDeque<Effect> = fx.into();
        while let Some(effect) = queue.pop_front() {
            let Some(svc) = self.registry.get_mut(id) else {
                return;
            };
            let group = |i: InstanceId| svc.groups.get(&i).copied();
            match effect {
                Effect::SpawnCommand { kind, index } => {
                    let more = self.spawn_command(id, Process::Command(kind, index), now);
                    queue.extend(more);
                }
                Effect::ReloadSignal(i) => {
                    let n = svc.unit.service.commands.reload_signal().0;
                    let signal = Signal::try_from(n).unwrap_or(Signal::SIGHUP);
                    signal_main(svc, i, signal, "reload");
                }
                Effect::SpawnPre { role: _, index } => {
                    let more = self.spawn_command(id, Process::Pre(index), now);
                    queue.extend(more);
                }
                Effect::Spawn(role) => match self.spawn_instance(id, Process::Main) {
                    Ok(pid) => {
                        let svc = self.registry.get_mut(id).expect("still there");
                        let (instance, more) = svc.machine.spawned(role, pid.as_raw(), now);
                        svc.groups.insert(instance, pid);
                        self.registry
                            .track(pid.as_raw(), id, Owner::Instance(instance));
                        queue.extend(more);
                    }
                    Err(e) => {
                        let svc = self.registry.get_mut(id).expect("still there");
                        svc.machine.spawn_failed(role, &e.to_string(), now);
                    }
                },
                Effect::Terminate(i) => {
                    if let Some(g) = group(i) {
                        let signal = svc.kill_signal();
                        let mixed = svc.unit.service.process.kill_mode == KillMode::Mixed;
                        let to = match (mixed, svc.tracking.by_cgroup()) {
                            (true, _) => "its main process (kill-mode = \"mixed\")",
                            (false, true) => "every process of its cgroup",
                            (false, false) => "its process group",
                        };
                        tracing::info!(service = %svc.unit.name, pid = g.as_raw(), "stopping: {signal} to {to}");
                        if mixed {
                            signal_main(svc, i, signal, "stop");
                        } else {
                            svc.tracking.terminate(g, signal);
                        }
                    }
                }
                Effect::Kill(i) => {
                    if let Some(g) = group(i) {
                        svc.tracking.kill(g);
                    }
                }
                Effect::Abort(i) => signal_main(svc, i, Signal::SIGABRT, "watchdog"),
                Effect::MainPid { instance, old, new } => {
                    let offered = svc.offered_main_pid.take().filter(|p| p.pid() == new);
                    // The old main pid's exit is no longer the instance's.
                    self.registry.untrack(old);
                    self.registry.track(new, id, Owner::Instance(instance));
                    self.watch_main_pid(id, instance, offered.map_or_else(|| Pidfd::open(new), Ok));
                }
                Effect::ReleaseOldSockets => svc.old_sockets.clear(),
            }
        }
    }

    /// Spawns a command beside the main process (`what`: not `Main`) and
    /// tells the machine what came of it; returns what it answers.
    fn spawn_command(&mut self, id: ServiceId, what: Process, now: Instant) -> Vec<Effect> {
        let spawned = self.spawn_instance(id, what);
        let svc = self.registry.get_mut(id).expect("still there");
        let m = &mut svc.machine;
        let pid = match spawned {
            Ok(pid) => pid,
            Err(e) => {
                return match what {
                    Process::Pre(_) => m.pre_spawn_failed(&e.to_string(), now),
                    _ => m.command_spawn_failed(&e.to_string(), now),
                }
            }
        };
        let instance = match what {
            Process::Pre(_) => m.pre_spawned(pid.as_raw(), now),
            _ => m.command_spawned(pid.as_raw(), now),
        };
        svc.groups.insert(instance, pid);
        self.registry
            .track(pid.as_raw(), id, Owner::Instance(instance));
        Vec::new()
    }

    /// The PATH a service's program is looked up in, and the environment
    /// every instance of it gets before its unit's `environment`.
    pub(super) fn base_env(&self, svc: &Service) -> (Option<OsString>, Vec<(String, OsString)>) {
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
        // Only for services that may use it (notify-access, systemd's rule).
        let may_notify = cfg.process.notify_access != NotifyAccess::None;
        if let Some(n) = svc.notify.as_ref().filter(|_| may_notify) {
            env.push(("NOTIFY_SOCKET".into(), n.path().as_os_str().to_owned()));
        }
        if let Some(w) = cfg.watchdog {
            env.push(("WATCHDOG_USEC".into(), w.as_micros().to_string().into()));
        }
        (path_var, env)
    }

    /// Spawns a new instance of service `id` with its sockets and stored
    /// fds, or one of its commands (exec-start-pre and friends) with its
    /// credentials, environment, directory and a cgroup leaf of its own,
    /// but no socket; those beside a main process get `$MAINPID`.
    fn spawn_instance(&mut self, id: ServiceId, what: Process) -> Result<Pid, spawn::SpawnError> {
        // A failed service's listeners listen again before it starts on them.
        if !matches!(what, Process::Command(..)) {
            self.open_doors_before_spawn(id);
        }
        let hierarchy = self.cgroups.as_ref();
        let svc = self.registry.get_mut(id).expect("a known service");
        let leaf = svc
            .tracking
            .prepare(hierarchy, &svc.unit.name, &svc.unit.service)?;
        let svc = self.registry.get(id).expect("a known service");
        let (path_var, mut env) = self.base_env(svc);
        let cfg = &svc.unit.service;
        let main_pid = svc.machine.main().map(|m| m.pid);
        let argv: std::borrow::Cow<'_, [String]> = match what {
            Process::Main => (&cfg.exec[..]).into(),
            Process::Pre(k) => (&cfg.commands.start_pre[k].argv[..]).into(),
            Process::Command(kind, k) => {
                let argv = &kind.of(&cfg.commands)[k].argv;
                with_main_pid(argv, main_pid).into()
            }
        };
        let program = spawn::resolve_program(&argv[0], path_var.as_deref())?;
        let credentials = Credentials::resolve(cfg.user.as_deref(), cfg.group.as_deref())?;
        // umask, supplementary groups, no-new-privileges, environment files.
        let setup = spawn::Setup::for_process(&cfg.process)?;
        let (out_r, out_w) = spawn::output_pipe()?;
        let (err_r, err_w) = spawn::output_pipe()?;
        for (k, v) in &cfg.environment {
            env.push((k.clone(), v.into()));
        }
        if let (Process::Command(..), Some(pid)) = (what, main_pid) {
            env.push(("MAINPID".into(), pid.to_string().into()));
        }
        let mut fds: Vec<(BorrowedFd<'_>, &str)> = Vec::new();
        let main = what == Process::Main;
        if main {
            fds.extend(svc.sockets.iter().map(|s| (s.fd.as_fd(), s.name.as_str())));
            fds.extend(svc.fd_store.fds().map(|(name, fd)| (fd, name)));
        }
        let sockets = if main { svc.sockets.len() } else { 0 };
        let (standard_input, standard_output) = if main {
            (cfg.process.standard_input, cfg.process.standard_output)
        } else {
            (StandardInput::Null, StandardOutput::Log)
        };
        let cmd = spawn::Command {
            program: &program,
            argv: &argv,
            env,
            fds,
            stdin: None,
            stdout: out_w.as_fd(),
            stderr: err_w.as_fd(),
            credentials: credentials.as_ref(),
            working_directory: cfg.working_directory.as_deref(),
            sockets,
            cgroup: leaf.as_ref().map(|l| l.as_fd()),
            rlimits: cfg.process.rlimits,
            non_blocking: cfg.process.non_blocking,
            standard_input,
            standard_output,
        };
        // The core is to keep the pidfd (issue 10); for now the pid only.
        let spawned = spawn::spawn_set_up(&cmd, &setup);
        drop(cmd);
        let svc = self.registry.get_mut(id).expect("a known service");
        let pid = svc.tracking.spawned(spawned, leaf)?;
        svc.uid = credentials.as_ref().map_or(0, |c| c.uid);
        self.add_output(id, pid, Stream::Stdout, out_r);
        self.add_output(id, pid, Stream::Stderr, err_r);
        Ok(pid)
    }

    /// Keeps the read end of instance `pid`'s pipe and watches it.
    pub(super) fn add_output(
        &mut self,
        id: ServiceId,
        pid: Pid,
        stream: Stream,
        fd: std::os::fd::OwnedFd,
    ) {
        let token = self.outputs.add(id, pid.as_raw(), stream, fd);
        if let Some(fd) = self.outputs.fd(token) {
            if let Err(e) = self.poller.add(fd, Token::Output(token)) {
                tracing::warn!(error = %e, "cannot watch an output pipe");
            }
        }
    }

    /// Reads a ready output pipe into the log, the service's ring and the
    /// journal.
    pub(super) fn read_output(&mut self, token: u64) {
        let now = Instant::now();
        for line in self.outputs.read(token) {
            let stream = line.stream.as_str();
            let pid = line.pid;
            match self.registry.get_mut(line.service) {
                Some(svc) => {
                    match self.journal.as_mut() {
                        // In the journal already: holdfast's own log (itself
                        // likely in the journal) repeats it at debug only.
                        Some(j) => {
                            tracing::debug!(service = %svc.unit.name, stream, pid, "{}", line.text);
                            let record = crate::journal::Record {
                                service: &svc.unit.name,
                                stream,
                                pid,
                                text: &line.text,
                            };
                            j.send(&record, now);
                        }
                        None => {
                            tracing::info!(service = %svc.unit.name, stream, pid, "{}", line.text)
                        }
                    }
                    svc.log.push(&line);
                }
                None => tracing::info!(stream, pid, "{}", line.text),
            }
        }
    }

    /// Stops every instance of `id`, per-connection ones included.
    pub(super) fn stop(&mut self, id: ServiceId, now: Instant) {
        self.stop_connections(id, now);
        self.act(id, now, |m| m.stop(now));
    }

    /// SIGTERM now to every per-connection instance of `id`; SIGKILL later.
    pub(super) fn stop_connections(&mut self, id: ServiceId, now: Instant) {
        let Some(svc) = self.registry.get_mut(id) else {
            return;
        };
        let timeout = svc.unit.service.stop_timeout;
        let signal = svc.kill_signal();
        if let Some(a) = svc.acceptor.as_mut() {
            for pid in a.stop_all(now, timeout) {
                svc.tracking.terminate(pid, signal);
            }
        }
    }

    /// Reaps every child that has exited.
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
        let Some((id, owner)) = self.registry.untrack(pid.as_raw()) else {
            tracing::debug!(pid = pid.as_raw(), %exit, "reaped an orphan");
            return;
        };
        let shutting_down = self.shutting_down;
        let Some(svc) = self.registry.get_mut(id) else {
            return;
        };
        match owner {
            Owner::Connection => {
                if let Some(a) = svc.acceptor.as_mut() {
                    a.exited(pid);
                }
                // Whatever the connection's instance left goes with it.
                svc.tracking.gone(pid);
            }
            Owner::Instance(instance) => {
                svc.main_pidfds.remove(&instance);
                // Whatever the main process left behind in its group goes with it.
                if let Some(g) = svc.groups.remove(&instance) {
                    svc.tracking.gone(g);
                    if g != pid {
                        self.registry.untrack(g.as_raw());
                    }
                }
                self.act(id, now, |m| m.exited(instance, exit, now, shutting_down));
            }
        }
    }

    /// Keeps (and watches) `pidfd`, the main process of `instance` named by
    /// MAINPID=, in place of the one before; a process already gone (no
    /// pidfd) is taken as exited.
    fn watch_main_pid(
        &mut self,
        id: ServiceId,
        instance: InstanceId,
        pidfd: Result<Pidfd, crate::pidfd::PidfdError>,
    ) {
        let Some(svc) = self.registry.get_mut(id) else {
            return;
        };
        match pidfd {
            Ok(p) => {
                let token = Token::MainPid {
                    service: id,
                    pid: p.pid(),
                };
                if let Err(e) = self.poller.add(p.as_fd(), token) {
                    tracing::warn!(service = %svc.unit.name, pid = p.pid(), error = %e, "cannot watch the main process's pidfd");
                }
                svc.main_pidfds.insert(instance, p);
            }
            Err(e) => {
                svc.main_pidfds.remove(&instance);
                if let Some(pid) = svc.machine.instance(instance).map(|i| i.pid) {
                    tracing::warn!(service = %svc.unit.name, pid, error = %e, "the main process named by MAINPID= is already gone");
                    self.exited(Pid::from_raw(pid), UNKNOWN_EXIT);
                }
            }
        }
    }

    /// The pidfd of a main process named by MAINPID= is readable: it has
    /// exited (reaped by its own parent, or by holdfast through this pidfd).
    pub(super) fn main_pid_exited(&mut self, id: ServiceId, pid: i32) {
        let Some(svc) = self.registry.get_mut(id) else {
            return;
        };
        let Some(instance) = svc
            .main_pidfds
            .iter()
            .find(|(_, p)| p.pid() == pid)
            .map(|(i, _)| *i)
        else {
            return; // already handled (reaped by waitpid first)
        };
        if !svc.main_pidfds[&instance].has_exited() {
            return;
        }
        let pidfd = svc.main_pidfds.remove(&instance).expect("found above");
        // Its status only if it was holdfast's child; else it is unknown.
        let exit = match pidfd.try_wait() {
            Ok(Some(crate::pidfd::Exit::Code(c))) => Exit::Code(c),
            Ok(Some(crate::pidfd::Exit::Signal(s))) => Exit::Signal(s),
            _ => {
                tracing::warn!(service = %svc.unit.name, pid, "the main process (MAINPID=) exited, reaped by another process: its exit status is unknown, taken as a failure");
                UNKNOWN_EXIT
            }
        };
        drop(pidfd);
        if self.registry.owner(pid) == Some((id, Owner::Instance(instance))) {
            self.exited(Pid::from_raw(pid), exit);
        }
    }

    /// After an in-place upgrade: watches the main pids' pidfds opened again,
    /// and takes those gone across the exec as exited.
    pub(super) fn resume_main_pids(&mut self, id: ServiceId) {
        let Some(svc) = self.registry.get_mut(id) else {
            return;
        };
        let lost = std::mem::take(&mut svc.main_pids_lost);
        let name = svc.unit.name.clone();
        for p in svc.main_pidfds.values() {
            let token = Token::MainPid {
                service: id,
                pid: p.pid(),
            };
            if let Err(e) = self.poller.add(p.as_fd(), token) {
                tracing::warn!(service = %svc.unit.name, pid = p.pid(), error = %e, "cannot watch the main process's pidfd");
            }
        }
        for pid in lost {
            tracing::warn!(service = %name, pid, "upgrade: the main process (MAINPID=) is gone");
            if self.registry.owner(pid).is_some_and(|(s, _)| s == id) {
                self.exited(Pid::from_raw(pid), UNKNOWN_EXIT);
            }
        }
    }

    /// Deadlines that have passed, for every service.
    pub(super) fn run_timers(&mut self, now: Instant) {
        let may_start = !self.shutting_down;
        for id in self.registry.all_ids() {
            let Some(svc) = self.registry.get_mut(id) else {
                continue;
            };
            if let Some(a) = svc.acceptor.as_mut() {
                let (late, resumed) = a.timers(now);
                if resumed {
                    tracing::info!(service = %svc.unit.name, "rate-limit pause over: accepting again");
                }
                for pid in late {
                    tracing::warn!(service = %svc.unit.name, pid = pid.as_raw(), "connection instance did not stop in time: SIGKILL to all its processes");
                    svc.tracking.kill(pid);
                }
            }
            if let Some(svc) = self.registry.get_mut(id) {
                svc.tracking.sweep();
            }
            let live = self.registry.is_live(id);
            self.act(id, now, |m| m.timers(now, may_start && live));
        }
    }

    /// Reads service `id`'s notify socket and acts on what its instances say.
    pub(super) fn read_notifications(&mut self, id: ServiceId) {
        let Some(svc) = self.registry.get(id) else {
            return;
        };
        let Some(sock) = &svc.notify else { return };
        let main_pids: Vec<i32> = svc.machine.instances().map(|i| i.pid).collect();
        let groups: Vec<i32> = svc.groups.values().map(|g| g.as_raw()).collect();
        let messages = if svc.tracking.by_cgroup() {
            let cgroups = svc.tracking.ids();
            let senders = CgroupSenders {
                access: svc.unit.service.process.notify_access,
                cgroups: &cgroups,
                main_pids: &main_pids,
                spawned_pids: &groups,
            };
            sock.receive(&|sender| senders.accepts(sender))
        } else {
            let senders = Senders {
                main_pids: &main_pids,
                groups: &groups,
                uid: svc.uid,
            };
            sock.receive(&|sender| senders.accepts(sender))
        };
        for m in messages {
            self.notified(id, m);
        }
    }

    fn notified(&mut self, id: ServiceId, mut m: Message) {
        let now = Instant::now();
        let Some(svc) = self.registry.get_mut(id) else {
            return;
        };
        let name = svc.unit.name.clone();
        let pid = m.sender.pid;
        let groups = &svc.groups;
        let tracking = &svc.tracking;
        // Which instance it is: by cgroup (the kernel's word), else by process group.
        let found = if tracking.by_cgroup() {
            let cgroup = m.sender.cgroup;
            svc.machine.sender_role(pid, cgroup.is_some(), |i| {
                cgroup.is_some()
                    && groups.get(&i.id).and_then(|g| tracking.leaf_id(g.as_raw())) == cgroup
            })
        } else {
            let sender_group = nix::unistd::getpgid(Some(Pid::from_raw(pid))).ok();
            svc.machine.sender_role(pid, sender_group.is_some(), |i| {
                sender_group.is_some() && groups.get(&i.id).copied() == sender_group
            })
        };
        let Some((instance, role)) = found else {
            tracing::warn!(service = %name, pid, "notification from a process of no current instance: ignored");
            return;
        };
        let group = svc.groups.get(&instance).copied();
        let mut said = Vec::new();
        let mut fds = std::mem::take(&mut m.fds).into_iter();
        for item in m.items {
            match item {
                Notification::Ready => said.push(Said::Ready),
                Notification::Reloading => said.push(Said::Reloading),
                Notification::Stopping => said.push(Said::Stopping),
                Notification::Status(s) => said.push(Said::Status(s)),
                Notification::Errno(e) => said.push(Said::Errno(e)),
                Notification::MainPid(p) => match main_pid_in_instance(&svc.tracking, group, p) {
                    Some(pidfd) => {
                        svc.offered_main_pid = Some(pidfd);
                        said.push(Said::MainPid(p))
                    }
                    None => {
                        tracing::warn!(service = %name, pid = p, "MAINPID= names a process outside the service: ignored")
                    }
                },
                Notification::ExtendTimeout(d) => said.push(Said::ExtendTimeout(d)),
                Notification::Watchdog => said.push(Said::Watchdog),
                Notification::WatchdogTrigger => said.push(Said::WatchdogTrigger),
                Notification::WatchdogUsec(d) => said.push(Said::WatchdogUsec(d)),
                Notification::FdStore { name: fdname } => {
                    let fdname = Notification::fd_name(&fdname).to_string();
                    for fd in fds.by_ref() {
                        if let Err(e) = svc.fd_store.add(&fdname, fd) {
                            tracing::warn!(service = %name, fdname = %fdname, error = %e, "fd store refused an fd");
                        } else {
                            tracing::info!(service = %name, fdname = %fdname, "fd stored");
                        }
                    }
                }
                Notification::FdStoreRemove { name: fdname } => {
                    svc.fd_store.remove(&fdname);
                    tracing::info!(service = %name, fdname = %fdname, "fd store entry removed");
                }
                Notification::Barrier => {}
                Notification::Other(k, _) => {
                    tracing::debug!(service = %name, key = %k, "unknown notification ignored")
                }
            }
        }
        self.act(id, now, |m| m.said(instance, role, said, now));
        if let Some(svc) = self.registry.get_mut(id) {
            svc.offered_main_pid = None;
        }
    }
}

/// What [`Supervisor::spawn_instance`] starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Process {
    /// An instance: the unit's `exec`, with its sockets.
    Main,
    /// Command k of exec-start-pre.
    Pre(usize),
    /// Command k of exec-start-post, exec-stop or exec-reload.
    Command(CommandKind, usize),
}

/// `argv` with `$MAINPID` and `${MAINPID}` replaced by the main pid (or
/// nothing without one), as systemd expands them in ExecReload= and friends.
fn with_main_pid(argv: &[String], main_pid: Option<i32>) -> Vec<String> {
    let pid = main_pid.map(|p| p.to_string()).unwrap_or_default();
    argv.iter()
        .map(|a| a.replace("${MAINPID}", &pid).replace("$MAINPID", &pid))
        .collect()
}

/// `signal` to instance `i`'s main process (`why`: for the log): a
/// MAINPID= process through its pidfd; else the main pid is holdfast's
/// child, its number held until reaped.
fn signal_main(svc: &Service, i: InstanceId, signal: Signal, why: &str) {
    if let Some(p) = svc.main_pidfds.get(&i) {
        let _ = p.signal(signal);
    } else if let Some(inst) = svc.machine.instance(i) {
        if svc.groups.get(&i).map(|g| g.as_raw()) == Some(inst.pid) {
            let _ = kill(Pid::from_raw(inst.pid), signal);
        } else {
            tracing::warn!(service = %svc.unit.name, pid = inst.pid, "{why}: the main process is no longer held (no pidfd): no {signal} sent");
        }
    }
}

/// The exit of a main process that was not holdfast's child: its status is
/// its parent's to read, so it counts as a failure.
const UNKNOWN_EXIT: Exit = Exit::Code(255);

/// A pidfd on `pid` (from MAINPID=) if it is a process of the instance whose
/// first pid is `group`: in its cgroup, else in its process group, checked
/// once the pidfd is open, so about that very process. Never 1 or holdfast.
fn main_pid_in_instance(tracking: &Tracking, group: Option<Pid>, pid: i32) -> Option<Pidfd> {
    if pid <= 1 || pid == std::process::id() as i32 {
        return None;
    }
    let group = group?;
    let pidfd = Pidfd::open(pid).ok()?;
    let belongs = if tracking.by_cgroup() {
        let leaf = tracking.leaf_id(group.as_raw())?;
        pidfd.cgroup_id().is_ok_and(|id| id == leaf)
    } else {
        // The group read after the pidfd was opened and before it exited is
        // the group of the process the pidfd holds.
        nix::unistd::getpgid(Some(Pid::from_raw(pid))).ok() == Some(group) && !pidfd.has_exited()
    };
    belongs.then_some(pidfd)
}
