//! Everything that can happen to one service, in one place: the state machine
//! over its instances (the main one, an overlap candidate, old ones draining),
//! readiness, the watchdog, stops, both kinds of restart, exits and the
//! restart policy. Each event is a method that updates the bookkeeping and
//! returns the [`Effect`]s the daemon must carry out (spawn, signal, release
//! sockets); the daemon reports back what came of a spawn. No processes, no
//! signals, no clock of its own: instants are passed in, so every path is
//! tested without root.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::unit::{Commands, ExecCommand, RestartMode, RestartPolicy, ServiceConfig, ServiceType};

use super::{Backoff, Exit, StartLimit, State};

/// Names one instance of one service for as long as the daemon runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct InstanceId(pub u64);

/// Which instance a spawn is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SpawnRole {
    /// The service's main instance.
    Main,
    /// The new instance of an overlap restart, on the same sockets.
    Candidate,
}

/// Which of the commands a service runs beside its main process, one at a
/// time, with `$MAINPID`: [`Effect::SpawnCommand`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandKind {
    /// `exec-start-post`: once the main process started (or said READY=1).
    StartPost,
    /// `exec-stop`: on a stop, before kill-signal.
    Stop,
    /// `exec-reload`: `holdfast reload-service`.
    Reload,
}

impl CommandKind {
    /// Its key in the unit file.
    pub fn key(self) -> &'static str {
        match self {
            CommandKind::StartPost => "exec-start-post",
            CommandKind::Stop => "exec-stop",
            CommandKind::Reload => "exec-reload",
        }
    }
    /// Its commands in `c`.
    pub fn of(self, c: &Commands) -> &[ExecCommand] {
        match self {
            CommandKind::StartPost => &c.start_post,
            CommandKind::Stop => &c.stop,
            CommandKind::Reload => &c.reload,
        }
    }
}

/// Which of a service's instances something came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Main,
    /// The overlap candidate.
    Candidate,
    /// An old instance told to stop.
    Draining,
}

/// What the daemon must do for the machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Spawn an instance; report with [`Machine::spawned`] or [`Machine::spawn_failed`].
    Spawn(SpawnRole),
    /// Run `exec-start-pre` command `index` (no sockets) before the
    /// instance `role`; report with [`Machine::pre_spawned`] or
    /// [`Machine::pre_spawn_failed`]. Its exit comes to [`Machine::exited`]
    /// under the id `pre_spawned` gave it.
    SpawnPre { role: SpawnRole, index: usize },
    /// Run command `index` of `kind` (no sockets, `$MAINPID` the main
    /// instance's pid); report with [`Machine::command_spawned`] or
    /// [`Machine::command_spawn_failed`]; its exit comes to [`Machine::exited`].
    SpawnCommand { kind: CommandKind, index: usize },
    /// The unit's `reload-signal` to the instance's main process (type
    /// notify-reload).
    ReloadSignal(InstanceId),
    /// Ask every process of the instance to stop (SIGTERM, then SIGCONT).
    Terminate(InstanceId),
    /// SIGKILL to every process of the instance.
    Kill(InstanceId),
    /// SIGABRT to the instance's main process (watchdog).
    Abort(InstanceId),
    /// The instance's main process moved from `old` to `new` (MAINPID=).
    MainPid {
        instance: InstanceId,
        old: i32,
        new: i32,
    },
    /// Sockets a reload replaced are no longer held by any instance.
    ReleaseOldSockets,
}

/// What an instance said through its notify socket, as the machine needs it
/// (the fd store is the daemon's; a MAINPID= is checked by the daemon first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Said {
    Ready,
    Reloading,
    Stopping,
    Status(String),
    Errno(i32),
    MainPid(i32),
    ExtendTimeout(Duration),
    Watchdog,
    WatchdogTrigger,
    WatchdogUsec(Duration),
}

/// One instance's bookkeeping.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Instance {
    pub id: InstanceId,
    /// The main pid (MAINPID= may move it).
    pub pid: i32,
    #[serde(with = "super::mono")]
    pub started_at: Instant,
    pub ready: bool,
    /// A notify service must say READY=1 by then.
    #[serde(with = "super::mono::option")]
    ready_by: Option<Instant>,
    watchdog: Option<Duration>,
    #[serde(with = "super::mono::option")]
    watchdog_at: Option<Instant>,
    /// Told to stop; SIGKILL at this instant.
    #[serde(with = "super::mono::option")]
    kill_at: Option<Instant>,
    /// The old instance of an overlap restart, serving beside the new one
    /// for the unit's overlap-grace: told to stop at this instant.
    #[serde(default, with = "super::mono::option")]
    drain_at: Option<Instant>,
    /// Why holdfast stopped it (start timeout, watchdog): its exit is a
    /// failure whatever its status, as systemd counts it.
    failed: Option<String>,
}

/// The commands of one kind under way: which one runs, as an instance of
/// its own (so stop, kill and reaping work on it as on a main instance).
/// `what`: for exec-start-pre the instance they come before
/// ([`SpawnRole`]); else the [`CommandKind`] (one such command at a time).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CommandRun<K> {
    what: K,
    /// The command of its list that runs (or is being spawned).
    index: usize,
    /// Every command of the list must be done by then (start-timeout;
    /// stop-timeout for exec-stop).
    #[serde(with = "super::mono")]
    by: Instant,
    /// The running command, once spawned.
    inst: Option<Instance>,
}

type PreRun = CommandRun<SpawnRole>;
type ControlRun = CommandRun<CommandKind>;

/// What follows a command's exit.
enum AfterCommand {
    /// The next command of the list, by index.
    Next(usize),
    /// The list is over; with why, when it failed.
    Done(Option<String>),
}

impl<K: Copy> CommandRun<K> {
    fn new(what: K, by: Instant) -> CommandRun<K> {
        CommandRun {
            what,
            index: 0,
            by,
            inst: None,
        }
    }

    /// The command asked for runs as `pid`, named `id`.
    fn spawned(&mut self, id: InstanceId, pid: i32, now: Instant) {
        self.inst = Some(command_instance(id, pid, now, Some(self.by)));
    }

    /// The command asked for could not be spawned: it stands as a command
    /// that failed (unless written with `-`), to be ended as if it exited.
    fn spawn_failed(&mut self, list: &[ExecCommand], failed: String, now: Instant) {
        let ignored = list.get(self.index).is_some_and(|c| c.ignore_failure);
        let inst = self
            .inst
            .insert(command_instance(InstanceId(0), 0, now, None));
        if !ignored {
            inst.failed = Some(failed);
        }
    }

    /// After its command (of `list`, under `key`) exited with `exit`: the
    /// next one, or the end. `interrupted`: a stop or restart came, which
    /// ends the list however it exited.
    fn after_exit(
        &mut self,
        service: &str,
        key: &str,
        list: &[ExecCommand],
        exit: Exit,
        interrupted: bool,
    ) -> AfterCommand {
        let index = self.index;
        let Some(inst) = self.inst.as_mut() else {
            return AfterCommand::Done(None);
        };
        let ignore = list.get(index).is_some_and(|c| c.ignore_failure);
        let passed = inst.failed.is_none()
            && inst.kill_at.is_none()
            && (exit.success() || ignore)
            && !interrupted;
        if passed && !exit.success() {
            tracing::warn!(service, pid = inst.pid, command = index, %exit, "{key} failed; ignored (-)");
        }
        if passed && index + 1 < list.len() {
            return AfterCommand::Next(index + 1);
        }
        let program = list.get(index).map_or("", |c| c.argv[0].as_str());
        AfterCommand::Done((!passed).then(|| {
            inst.failed
                .take()
                .unwrap_or_else(|| format!("{key}[{index}] ({program}) failed: {exit}"))
        }))
    }

    /// The next command of the list, to be spawned.
    fn next(self, index: usize) -> CommandRun<K> {
        CommandRun {
            index,
            inst: None,
            ..self
        }
    }
}

/// A reload of a notify-reload service: reload-signal sent, RELOADING=1
/// then READY=1 awaited.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SignalReload {
    #[serde(with = "super::mono")]
    by: Instant,
    /// RELOADING=1 came.
    reloading: bool,
}

/// A main instance that exited, as the restart policy sees it.
struct Ended {
    main: Instance,
    exit: Exit,
    /// A failure by its status or by holdfast's verdict (start timeout, watchdog).
    failed: bool,
    uptime: Duration,
}

/// What one notification told the machine beyond the instance itself.
#[derive(Default)]
struct Heard {
    became_ready: bool,
    /// The state the main instance asked for (READY=1, RELOADING=1, STOPPING=1).
    main_state: Option<State>,
    status: Option<String>,
    errno: Option<i32>,
}

impl Instance {
    /// Whether its `ready_by` (start timeout, or a command's time limit) has passed.
    fn late_for(&self, now: Instant) -> bool {
        self.ready_by.is_some_and(|t| t <= now)
    }

    /// Applies one field of a notification to this instance; what concerns
    /// the service is left in `heard`.
    fn hear(
        &mut self,
        service: &str,
        item: Said,
        now: Instant,
        stop_timeout: Duration,
        heard: &mut Heard,
        fx: &mut Vec<Effect>,
    ) {
        match item {
            Said::Ready => {
                if !self.ready {
                    self.ready = true;
                    self.ready_by = None;
                    heard.became_ready = true;
                    tracing::info!(service, pid = self.pid, "ready (READY=1)");
                }
                heard.main_state = Some(State::Running);
            }
            Said::Reloading => heard.main_state = Some(State::Reloading),
            Said::Stopping => heard.main_state = Some(State::Stopping),
            Said::Status(s) => heard.status = Some(s),
            Said::Errno(e) => heard.errno = Some(e),
            Said::MainPid(p) => {
                tracing::info!(
                    service,
                    old = self.pid,
                    new = p,
                    "main pid changed (MAINPID=)"
                );
                fx.push(Effect::MainPid {
                    instance: self.id,
                    old: self.pid,
                    new: p,
                });
                self.pid = p;
            }
            Said::ExtendTimeout(d) => {
                let t = deadline(now, d);
                for deadline in [&mut self.ready_by, &mut self.kill_at, &mut self.watchdog_at]
                    .into_iter()
                    .flatten()
                {
                    *deadline = (*deadline).max(t);
                }
            }
            Said::Watchdog => {
                if let Some(w) = self.watchdog {
                    self.watchdog_at = Some(deadline(now, w));
                }
            }
            Said::WatchdogTrigger => {
                tracing::error!(service, pid = self.pid, "WATCHDOG=trigger: sending SIGABRT");
                fx.push(Effect::Abort(self.id));
                self.watchdog_at = None;
                self.kill_at = Some(deadline(now, stop_timeout));
                self.failed = Some("WATCHDOG=trigger".into());
            }
            Said::WatchdogUsec(d) => {
                self.watchdog = (!d.is_zero()).then_some(d);
                self.watchdog_at = self.watchdog.map(|d| deadline(now, d));
            }
        }
    }

    fn deadline(&self) -> Option<Instant> {
        [
            self.ready_by.filter(|_| !self.ready),
            self.watchdog_at,
            self.kill_at,
            self.drain_at,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Asks it to stop, once; SIGKILL at `now + timeout`.
    fn terminate(&mut self, now: Instant, timeout: Duration, fx: &mut Vec<Effect>) {
        if self.kill_at.is_some() {
            return;
        }
        self.kill_at = Some(deadline(now, timeout));
        self.ready_by = None;
        self.watchdog_at = None;
        self.drain_at = None;
        fx.push(Effect::Terminate(self.id));
    }
}

/// The bookkeeping of a command run beside the main process (exec-start-pre
/// and friends): never ready, its `ready_by` the deadline of its kind.
fn command_instance(id: InstanceId, pid: i32, now: Instant, by: Option<Instant>) -> Instance {
    Instance {
        id,
        pid,
        started_at: now,
        ready: false,
        ready_by: by,
        watchdog: None,
        watchdog_at: None,
        kill_at: None,
        drain_at: None,
        failed: None,
    }
}

/// A command not done in time: stopped (kill-signal, SIGKILL after
/// `stop_timeout`); `why` is what its exit fails with.
fn stop_late_command(
    service: &str,
    inst: &mut Instance,
    why: String,
    now: Instant,
    stop_timeout: Duration,
    fx: &mut Vec<Effect>,
) {
    tracing::error!(service, pid = inst.pid, "{why}: stopping it");
    inst.terminate(now, stop_timeout, fx);
    inst.failed = Some(why);
}

/// `now + d` without the panic `Instant + Duration` gives on overflow: a
/// deadline too far to represent becomes about 100 years from now ("never"
/// for any service). Every deadline computed from a configured or notified
/// duration goes through here.
pub fn deadline(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .or_else(|| now.checked_add(Duration::from_secs(100 * 365 * 86_400)))
        .unwrap_or(now)
}

/// How many exited main pids a service remembers (see [`Machine::knows_sender`]).
const GONE_PIDS: usize = 32;

/// The state machine of one service. Serializable (instants as
/// CLOCK_MONOTONIC), so an in-place upgrade carries it across the exec.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    name: String,
    cfg: ServiceConfig,
    /// Accept or on-demand: waits for traffic instead of starting at boot.
    traffic_started: bool,
    state: State,
    backoff: Backoff,
    start_limit: StartLimit,
    /// Set by `stop`: the next exit is final.
    stop_requested: bool,
    /// Set by `restart`: the next exit starts again at once.
    restart_requested: bool,
    main: Option<Instance>,
    candidate: Option<Instance>,
    draining: Vec<Instance>,
    next_id: u64,
    restarts: u32,
    #[serde(with = "super::mono::option")]
    next_start: Option<Instant>,
    last_exit: Option<Exit>,
    status_text: Option<String>,
    errno: Option<i32>,
    /// Why the last overlap restart was abandoned, for the waiting request.
    overlap_failure: Option<String>,
    /// Why the service is `failed`.
    failure: Option<String>,
    /// Main pids of instances that have exited, newest last.
    gone_pids: std::collections::VecDeque<i32>,
    /// The exec-start-pre command running before a start.
    #[serde(default)]
    pre: Option<PreRun>,
    /// The exec-start-post, exec-stop or exec-reload command running.
    #[serde(default)]
    control: Option<ControlRun>,
    /// Reloads asked for (`holdfast reload-service`), and how the last one ended.
    #[serde(default)]
    reloads: u64,
    #[serde(default)]
    reload_outcome: Option<(u64, Result<(), String>)>,
    #[serde(default)]
    signal_reload: Option<SignalReload>,
}

impl Machine {
    pub fn new(name: &str, cfg: &ServiceConfig, traffic_started: bool) -> Machine {
        Machine {
            name: name.to_string(),
            cfg: cfg.clone(),
            traffic_started,
            state: State::Stopped,
            backoff: backoff_of(cfg),
            start_limit: StartLimit::new(cfg.start_limit_burst, cfg.start_limit_interval),
            stop_requested: false,
            restart_requested: false,
            main: None,
            candidate: None,
            draining: Vec::new(),
            next_id: 1,
            restarts: 0,
            next_start: None,
            last_exit: None,
            status_text: None,
            errno: None,
            overlap_failure: None,
            failure: None,
            gone_pids: Default::default(),
            pre: None,
            control: None,
            reloads: 0,
            reload_outcome: None,
            signal_reload: None,
        }
    }

    // ---- what the daemon reads ----

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn config(&self) -> &ServiceConfig {
        &self.cfg
    }
    pub fn state(&self) -> State {
        self.state
    }
    pub fn restarts(&self) -> u32 {
        self.restarts
    }
    pub fn last_exit(&self) -> Option<Exit> {
        self.last_exit
    }
    pub fn status_text(&self) -> Option<&str> {
        self.status_text.as_deref()
    }
    pub fn errno(&self) -> Option<i32> {
        self.errno
    }
    pub fn failure(&self) -> Option<&str> {
        self.failure.as_deref()
    }
    pub fn overlap_failure(&self) -> Option<&str> {
        self.overlap_failure.as_deref()
    }
    pub fn main(&self) -> Option<&Instance> {
        self.main.as_ref()
    }
    pub fn candidate(&self) -> Option<&Instance> {
        self.candidate.as_ref()
    }
    pub fn draining(&self) -> &[Instance] {
        &self.draining
    }
    /// Every instance: main, candidate, draining, and a running
    /// exec-start-pre command.
    pub fn instances(&self) -> impl Iterator<Item = &Instance> {
        self.main
            .iter()
            .chain(&self.candidate)
            .chain(&self.draining)
            .chain(self.pre.as_ref().and_then(|p| p.inst.as_ref()))
            .chain(self.control.as_ref().and_then(|c| c.inst.as_ref()))
    }
    /// The exec-start-post, exec-stop or exec-reload command that runs now.
    pub fn running_command(&self) -> Option<(CommandKind, usize, &Instance)> {
        self.control
            .as_ref()
            .and_then(|c| c.inst.as_ref().map(|i| (c.what, c.index, i)))
    }
    /// How reload number `seq` ended, once it has.
    pub fn reload_outcome(&self, seq: u64) -> Option<Result<(), &str>> {
        match &self.reload_outcome {
            Some((n, r)) if *n == seq => Some(r.as_ref().map(|_| ()).map_err(String::as_str)),
            _ => None,
        }
    }
    /// The exec-start-pre command that runs now: its index and instance.
    pub fn pre_command(&self) -> Option<(usize, &Instance)> {
        self.pre
            .as_ref()
            .and_then(|p| p.inst.as_ref().map(|i| (p.index, i)))
    }
    pub fn has_instances(&self) -> bool {
        self.instances().next().is_some()
    }
    pub fn traffic_started(&self) -> bool {
        self.traffic_started
    }
    /// A restart is under way (asked for, not yet started).
    pub fn restart_pending(&self) -> bool {
        self.restart_requested
    }
    /// The earliest instant at which [`Machine::timers`] has something to do.
    pub fn deadline(&self) -> Option<Instant> {
        self.instances()
            .filter_map(Instance::deadline)
            .chain(self.next_start.filter(|_| self.control.is_none()))
            .chain(self.signal_reload.as_ref().map(|r| r.by))
            .min()
    }

    /// The instance and role a notification sender belongs to: `member`
    /// says whether the sender is one of an instance's processes. A sender
    /// that is gone (`alive` false) is taken for the newest instance unless
    /// it is the main pid of an instance that has exited.
    pub fn sender_role(
        &self,
        pid: i32,
        alive: bool,
        member: impl Fn(&Instance) -> bool,
    ) -> Option<(InstanceId, Role)> {
        let matches = |i: &Instance| i.pid == pid || member(i);
        if let Some(c) = self.candidate.as_ref().filter(|i| matches(i)) {
            return Some((c.id, Role::Candidate));
        }
        if let Some(m) = self.main.as_ref().filter(|i| matches(i)) {
            return Some((m.id, Role::Main));
        }
        if let Some(d) = self.draining.iter().find(|i| matches(i)) {
            return Some((d.id, Role::Draining));
        }
        if !alive && !self.gone_pids.contains(&pid) {
            if let Some(c) = &self.candidate {
                return Some((c.id, Role::Candidate));
            }
            return self.main.as_ref().map(|m| (m.id, Role::Main));
        }
        None
    }

    pub fn instance(&self, id: InstanceId) -> Option<&Instance> {
        self.instances().find(|i| i.id == id)
    }

    // ---- events ----

    /// A reload changed the `[service]` table: new policy, backoff, limits.
    pub fn set_config(&mut self, cfg: &ServiceConfig) {
        if *cfg != self.cfg {
            self.backoff = backoff_of(cfg);
            self.start_limit = StartLimit::new(cfg.start_limit_burst, cfg.start_limit_interval);
            self.cfg = cfg.clone();
        }
    }

    /// At boot or after an add by reload: start, or listen for traffic.
    pub fn boot(&mut self, now: Instant) -> Vec<Effect> {
        if self.traffic_started {
            self.state = State::Listening;
            Vec::new()
        } else {
            self.start(now, true)
        }
    }

    /// Starts a main instance now. Automatic starts (`counted`) count
    /// towards the start limit; those a user asked for do not.
    pub fn start(&mut self, now: Instant, counted: bool) -> Vec<Effect> {
        self.next_start = None;
        self.failure = None;
        if counted && !self.start_limit.try_start(now) {
            let why = format!(
                "start limit hit: more than {} starts within {}; left alone until `holdfast start`",
                self.cfg.start_limit_burst,
                humantime::format_duration(self.cfg.start_limit_interval)
            );
            tracing::error!(service = %self.name, "{why}");
            self.failure = Some(why);
            self.state = State::Failed;
            return Vec::new();
        }
        self.begin(SpawnRole::Main, now).into_iter().collect()
    }

    /// The first step of starting an instance `role`: its first
    /// exec-start-pre command, or the instance itself. `None` while pre
    /// commands already run for a start.
    fn begin(&mut self, role: SpawnRole, now: Instant) -> Option<Effect> {
        if self.pre.is_some() {
            return None;
        }
        if self.cfg.commands.start_pre.is_empty() {
            return Some(Effect::Spawn(role));
        }
        self.pre = Some(PreRun::new(role, deadline(now, self.cfg.start_timeout)));
        if role == SpawnRole::Main {
            self.state = State::Starting;
        }
        Some(Effect::SpawnPre { role, index: 0 })
    }

    /// The exec-start-pre command asked for by `Effect::SpawnPre` runs as `pid`.
    pub fn pre_spawned(&mut self, pid: i32, now: Instant) -> InstanceId {
        let id = self.new_id();
        if let Some(pre) = self.pre.as_mut() {
            tracing::info!(service = %self.name, pid, command = pre.index, "exec-start-pre started");
            pre.spawned(id, pid, now);
        }
        id
    }

    fn new_id(&mut self) -> InstanceId {
        self.next_id += 1;
        InstanceId(self.next_id - 1)
    }

    /// The exec-start-pre command asked for could not be spawned: as if it
    /// had exited with 127 (ignored for a `-` command).
    pub fn pre_spawn_failed(&mut self, why: &str, now: Instant) -> Vec<Effect> {
        let Some(pre) = self.pre.as_mut() else {
            return Vec::new();
        };
        tracing::error!(service = %self.name, command = pre.index, error = %why, "cannot run exec-start-pre");
        let failed = format!("cannot run exec-start-pre[{}]: {why}", pre.index);
        pre.spawn_failed(&self.cfg.commands.start_pre, failed, now);
        self.pre_exited(Exit::Code(127), now, false)
    }

    /// The running exec-start-pre command exited: the next one, the
    /// instance, or (it failed, or a stop or restart interrupted it) what
    /// follows a main process's exit before it was ready.
    fn pre_exited(&mut self, exit: Exit, now: Instant, shutting_down: bool) -> Vec<Effect> {
        let Some(mut pre) = self.pre.take() else {
            return Vec::new();
        };
        let role = pre.what;
        let interrupted = match role {
            SpawnRole::Main => shutting_down || self.stop_requested || self.restart_requested,
            SpawnRole::Candidate => false,
        };
        let list = &self.cfg.commands.start_pre;
        let after = pre.after_exit(&self.name, "exec-start-pre", list, exit, interrupted);
        let Some(mut inst) = pre.inst.take() else {
            return Vec::new();
        };
        if inst.pid != 0 {
            self.gone(inst.pid);
        }
        let why = match after {
            AfterCommand::Next(index) => {
                self.pre = Some(pre.next(index));
                return vec![Effect::SpawnPre { role, index }];
            }
            AfterCommand::Done(None) => return vec![Effect::Spawn(role)],
            AfterCommand::Done(Some(why)) => why,
        };
        match role {
            SpawnRole::Candidate => {
                tracing::error!(service = %self.name, pid = inst.pid, %exit, "overlap restart: {why}; the old one keeps serving");
                self.overlap_failure = Some(format!("{why}; the old instance keeps serving"));
                Vec::new()
            }
            SpawnRole::Main => {
                if !interrupted {
                    tracing::error!(service = %self.name, pid = inst.pid, %exit, "{why}: the start failed");
                }
                // The start failed as a main process that exits before it
                // is ready: the restart policy and the start limit apply.
                inst.failed = Some(why);
                self.main_exited(inst, exit, now, shutting_down)
            }
        }
    }

    /// Traffic arrived for an on-demand service with no instance running.
    pub fn traffic(&mut self, now: Instant) -> Vec<Effect> {
        if self.main.is_some() || self.state != State::Listening {
            return Vec::new();
        }
        tracing::info!(service = %self.name, "traffic arrived: starting (on-demand)");
        self.start(now, true)
    }

    /// The instance asked for by `Effect::Spawn(role)` runs as `pid`.
    pub fn spawned(
        &mut self,
        role: SpawnRole,
        pid: i32,
        now: Instant,
    ) -> (InstanceId, Vec<Effect>) {
        let id = InstanceId(self.next_id);
        self.next_id += 1;
        let notify = self.cfg.kind.notifies();
        let inst = Instance {
            id,
            pid,
            started_at: now,
            ready: !notify,
            ready_by: notify.then(|| deadline(now, self.cfg.start_timeout)),
            watchdog: self.cfg.watchdog,
            watchdog_at: self.cfg.watchdog.map(|w| deadline(now, w)),
            kill_at: None,
            drain_at: None,
            failed: None,
        };
        tracing::info!(service = %self.name, pid, "started");
        let mut fx = Vec::new();
        match role {
            SpawnRole::Main => {
                let ready = inst.ready;
                self.state = if ready {
                    State::Running
                } else {
                    State::Starting
                };
                self.status_text = None;
                self.main = Some(inst);
                if ready {
                    self.after_ready(now, &mut fx);
                }
            }
            SpawnRole::Candidate => {
                let ready = inst.ready;
                self.candidate = Some(inst);
                if ready {
                    self.promote(now, &mut fx);
                }
            }
        }
        (id, fx)
    }

    /// The spawn asked for could not be done.
    pub fn spawn_failed(&mut self, role: SpawnRole, why: &str, now: Instant) {
        match role {
            SpawnRole::Main => {
                tracing::error!(service = %self.name, error = %why, "cannot start");
                self.failure = Some(format!("cannot start: {why}"));
                self.last_exit = Some(Exit::Code(127));
                match self.after_exit(true, Duration::ZERO, now) {
                    Some(t) => self.set_waiting(t),
                    None => self.state = State::Failed,
                }
            }
            SpawnRole::Candidate => {
                tracing::error!(service = %self.name, error = %why, "overlap restart: cannot start the new instance; the old one keeps serving");
                self.overlap_failure = Some(format!(
                    "cannot start the new instance: {why}; the old one keeps serving"
                ));
            }
        }
    }

    /// Starts running the commands of `kind`: the first one's spawn, or
    /// `None` when there is none or another command runs.
    fn begin_command(&mut self, kind: CommandKind, now: Instant) -> Option<Effect> {
        if self.control.is_some() || kind.of(&self.cfg.commands).is_empty() {
            return None;
        }
        let timeout = match kind {
            CommandKind::Stop => self.cfg.stop_timeout,
            CommandKind::StartPost | CommandKind::Reload => self.cfg.start_timeout,
        };
        self.control = Some(ControlRun::new(kind, deadline(now, timeout)));
        Some(Effect::SpawnCommand { kind, index: 0 })
    }

    /// The command asked for by `Effect::SpawnCommand` runs as `pid`.
    pub fn command_spawned(&mut self, pid: i32, now: Instant) -> InstanceId {
        let id = self.new_id();
        if let Some(c) = self.control.as_mut() {
            tracing::info!(service = %self.name, pid, command = c.index, "{} started", c.what.key());
            c.spawned(id, pid, now);
        }
        id
    }

    /// The command asked for could not be spawned: as if it had exited with
    /// 127 (ignored for a `-` command).
    pub fn command_spawn_failed(&mut self, why: &str, now: Instant) -> Vec<Effect> {
        let Some(c) = self.control.as_mut() else {
            return Vec::new();
        };
        let key = c.what.key();
        tracing::error!(service = %self.name, command = c.index, error = %why, "cannot run {key}");
        let failed = format!("cannot run {key}[{}]: {why}", c.index);
        c.spawn_failed(c.what.of(&self.cfg.commands), failed, now);
        self.command_exited(Exit::Code(127), now)
    }

    /// The running exec-start-post, exec-stop or exec-reload command exited.
    fn command_exited(&mut self, exit: Exit, now: Instant) -> Vec<Effect> {
        let Some(mut c) = self.control.take() else {
            return Vec::new();
        };
        let kind = c.what;
        let list = kind.of(&self.cfg.commands);
        let why = match c.after_exit(&self.name, kind.key(), list, exit, false) {
            AfterCommand::Next(index) => {
                self.control = Some(c.next(index));
                return vec![Effect::SpawnCommand { kind, index }];
            }
            AfterCommand::Done(why) => why,
        };
        let Some(inst) = c.inst.take() else {
            return Vec::new();
        };
        let mut fx = Vec::new();
        let stop_timeout = self.cfg.stop_timeout;
        // A stop or restart asked for meanwhile is no failure of the service.
        let stopping = self.stop_requested
            || self.restart_requested
            || self.main.as_ref().is_none_or(|m| m.kill_at.is_some());
        match kind {
            CommandKind::StartPost => match why {
                None => {
                    if self.state == State::Starting && self.main.as_ref().is_some_and(|m| m.ready)
                    {
                        tracing::info!(service = %self.name, "exec-start-post done: running");
                        self.state = State::Running;
                    }
                }
                Some(why) if !stopping => {
                    tracing::error!(service = %self.name, pid = inst.pid, %exit, "{why}: stopping the service as failed");
                    if let Some(main) = self.main.as_mut() {
                        main.failed = Some(why);
                    }
                    self.state = State::Stopping;
                    self.stop_main(now, &mut fx);
                }
                Some(_) => {}
            },
            CommandKind::Stop => {
                if let Some(why) = &why {
                    tracing::warn!(service = %self.name, pid = inst.pid, "{why}; kill-signal to what is left");
                }
                if let Some(main) = self.main.as_mut() {
                    main.terminate(now, stop_timeout, &mut fx);
                }
            }
            CommandKind::Reload => {
                let outcome = match why {
                    None => {
                        tracing::info!(service = %self.name, "reloaded (exec-reload)");
                        Ok(())
                    }
                    Some(why) => {
                        tracing::error!(service = %self.name, pid = inst.pid, %exit, "{why}: the reload failed; the service runs on");
                        Err(why)
                    }
                };
                self.reload_outcome = Some((self.reloads, outcome));
                if self.state == State::Reloading {
                    self.state = State::Running;
                }
            }
        }
        if !self.has_instances() {
            fx.push(Effect::ReleaseOldSockets);
            // A start that waited for this command to end.
            if self.next_start.is_some_and(|t| t <= now) {
                fx.extend(self.start(now, false));
            }
        }
        fx
    }

    /// Stops the main instance: its exec-stop commands first (then
    /// kill-signal once they are done, or at stop-timeout), else
    /// kill-signal now. Another command that runs is stopped with it.
    fn stop_main(&mut self, now: Instant, fx: &mut Vec<Effect>) {
        let timeout = self.cfg.stop_timeout;
        let busy = self.control.as_ref().map(|c| c.what);
        if busy == Some(CommandKind::Stop) {
            return;
        }
        let Some(main) = self.main.as_mut() else {
            return;
        };
        if main.kill_at.is_some() {
            return;
        }
        if busy.is_none() && !self.cfg.commands.stop.is_empty() {
            main.ready_by = None;
            main.watchdog_at = None;
            fx.extend(self.begin_command(CommandKind::Stop, now));
            return;
        }
        main.terminate(now, timeout, fx);
        if let Some(inst) = self.control.as_mut().and_then(|c| c.inst.as_mut()) {
            inst.terminate(now, timeout, fx);
        }
    }

    /// The main instance is ready: exec-start-post, the service `starting`
    /// until it is done.
    fn after_ready(&mut self, now: Instant, fx: &mut Vec<Effect>) {
        if let Some(e) = self.begin_command(CommandKind::StartPost, now) {
            self.state = State::Starting;
            fx.push(e);
        }
    }

    /// `holdfast reload-service`: exec-reload, or (notify-reload) the
    /// reload-signal; the number to wait for with [`Machine::reload_outcome`].
    pub fn reload(&mut self, now: Instant) -> Result<(u64, Vec<Effect>), String> {
        let name = &self.name;
        if let Some(c) = &self.control {
            return Err(format!(
                "service {name:?} runs its {} commands now; try again once they are done",
                c.what.key()
            ));
        }
        if self.signal_reload.is_some() {
            return Err(format!(
                "service {name:?} is reloading now; try again once it is done"
            ));
        }
        let Some(main) = self.main.as_ref().filter(|_| self.state == State::Running) else {
            return Err(format!(
                "service {name:?} is {}: only a running service can be reloaded",
                self.state.as_str()
            ));
        };
        let signal = self.cfg.kind == ServiceType::NotifyReload;
        if !signal && self.cfg.commands.reload.is_empty() {
            return Err(format!("service {name:?} has no exec-reload and is not type = \"notify-reload\": nothing reloads it; use holdfast restart"));
        }
        self.reloads += 1;
        self.state = State::Reloading;
        tracing::info!(service = %self.name, pid = main.pid, "reloading");
        if signal {
            let id = main.id;
            self.signal_reload = Some(SignalReload {
                by: deadline(now, self.cfg.start_timeout),
                reloading: false,
            });
            return Ok((self.reloads, vec![Effect::ReloadSignal(id)]));
        }
        let fx = self.begin_command(CommandKind::Reload, now);
        Ok((self.reloads, fx.into_iter().collect()))
    }

    /// A reload by signal is over: `Err` says why it failed.
    fn end_signal_reload(&mut self, outcome: Result<(), String>) {
        if self.signal_reload.take().is_none() {
            return;
        }
        match &outcome {
            Ok(()) => tracing::info!(service = %self.name, "reloaded (RELOADING=1, then READY=1)"),
            Err(why) => tracing::error!(service = %self.name, "the reload failed: {why}"),
        }
        self.reload_outcome = Some((self.reloads, outcome));
    }

    /// `holdfast start`: true when the reply must wait for the service to be up.
    pub fn request_start(&mut self, now: Instant) -> (bool, Vec<Effect>) {
        if self.traffic_started {
            if matches!(self.state, State::Stopped | State::Failed) {
                self.reset();
                self.state = State::Listening;
            }
            return (false, Vec::new());
        }
        match self.state {
            State::Running | State::Reloading | State::Listening => (false, Vec::new()),
            State::Starting => (true, Vec::new()),
            State::Stopping => {
                // Start again once it is down.
                self.stop_requested = false;
                self.restart_requested = true;
                (true, Vec::new())
            }
            State::Waiting | State::Stopped | State::Failed => {
                self.reset();
                (true, self.start(now, false))
            }
        }
    }

    /// Stops every instance; SIGKILL at the stop timeout.
    pub fn stop(&mut self, now: Instant) -> Vec<Effect> {
        let mut fx = Vec::new();
        self.next_start = None;
        let timeout = self.cfg.stop_timeout;
        if let Some(mut c) = self.candidate.take() {
            c.terminate(now, timeout, &mut fx);
            self.draining.push(c);
        }
        // Old instances still in their overlap-grace stop now, with the rest.
        for old in &mut self.draining {
            old.terminate(now, timeout, &mut fx);
        }
        if let Some(pre) = self.pre.as_mut() {
            if let Some(inst) = pre.inst.as_mut() {
                inst.terminate(now, timeout, &mut fx);
            }
            if pre.what == SpawnRole::Main {
                // Its exit ends the start: stopped.
                self.stop_requested = true;
                self.restart_requested = false;
                self.state = State::Stopping;
                return fx;
            }
        }
        match self.main.as_mut() {
            Some(_) => {
                self.stop_requested = true;
                self.restart_requested = false;
                self.stop_main(now, &mut fx);
                self.state = State::Stopping;
            }
            None => {
                if matches!(
                    self.state,
                    State::Waiting
                        | State::Starting
                        | State::Running
                        | State::Reloading
                        | State::Listening
                ) {
                    self.state = State::Stopped;
                }
            }
        }
        fx
    }

    /// The service's unit was removed: every instance drains.
    pub fn retire(&mut self, now: Instant) -> Vec<Effect> {
        let mut fx = Vec::new();
        self.next_start = None;
        self.stop_requested = true;
        self.state = State::Stopping;
        let timeout = self.cfg.stop_timeout;
        let pre = self.pre.take().and_then(|p| p.inst);
        let control = self.control.take().and_then(|c| c.inst);
        for mut inst in self
            .candidate
            .take()
            .into_iter()
            .chain(self.main.take())
            .chain(pre)
            .chain(control)
        {
            inst.terminate(now, timeout, &mut fx);
            self.draining.push(inst);
        }
        for old in &mut self.draining {
            old.terminate(now, timeout, &mut fx);
        }
        fx
    }

    /// `holdfast restart` (or a reload that changed the service) in `mode`
    /// (the unit's when `None`). An error says why it is refused.
    pub fn restart(
        &mut self,
        mode: Option<RestartMode>,
        now: Instant,
    ) -> Result<Vec<Effect>, String> {
        self.overlap_failure = None;
        let mode = mode.unwrap_or(self.cfg.restart_mode);
        match mode {
            RestartMode::Overlap if self.cfg.single_instance => Err(format!(
                "service {:?} refuses an overlap restart: its unit says single-instance = true (it cannot run twice); use --mode stop-start",
                self.name
            )),
            RestartMode::Overlap if self.main.is_some() => Ok(if self.candidate.is_some() {
                Vec::new()
            } else {
                self.begin(SpawnRole::Candidate, now).into_iter().collect()
            }),
            _ => Ok(self.restart_stop_start(now)),
        }
    }

    /// A stop-start restart: the sockets stay open while no instance runs.
    fn restart_stop_start(&mut self, now: Instant) -> Vec<Effect> {
        let timeout = self.cfg.stop_timeout;
        match self.main.as_mut() {
            Some(_) => {
                let mut fx = Vec::new();
                self.restart_requested = true;
                self.stop_requested = false;
                self.stop_main(now, &mut fx);
                self.state = State::Stopping;
                fx
            }
            None => {
                // A start under way in its exec-start-pre: stopped, then started again.
                if let Some(inst) = self.main_pre_mut() {
                    let mut fx = Vec::new();
                    inst.terminate(now, timeout, &mut fx);
                    self.restart_requested = true;
                    self.stop_requested = false;
                    self.state = State::Stopping;
                    return fx;
                }
                self.reset();
                self.start(now, false)
            }
        }
    }

    /// The running exec-start-pre command of a main instance's start.
    fn main_pre_mut(&mut self) -> Option<&mut Instance> {
        self.pre
            .as_mut()
            .filter(|p| p.what == SpawnRole::Main)
            .and_then(|p| p.inst.as_mut())
    }

    /// The main process of instance `id` exited. `shutting_down`: holdfast
    /// is stopping everything, so nothing restarts.
    pub fn exited(
        &mut self,
        id: InstanceId,
        exit: Exit,
        now: Instant,
        shutting_down: bool,
    ) -> Vec<Effect> {
        if let Some(k) = self.draining.iter().position(|d| d.id == id) {
            return self.draining_exited(k, exit);
        }
        if self.pre_command().is_some_and(|(_, i)| i.id == id) {
            return self.pre_exited(exit, now, shutting_down);
        }
        if self.running_command().is_some_and(|(_, _, i)| i.id == id) {
            return self.command_exited(exit, now);
        }
        if self.candidate.as_ref().is_some_and(|c| c.id == id) {
            self.candidate_exited(exit);
            return Vec::new();
        }
        let Some(main) = self.main.take_if(|m| m.id == id) else {
            return Vec::new();
        };
        self.main_exited(main, exit, now, shutting_down)
    }

    /// An old instance (draining after an overlap restart) exited.
    fn draining_exited(&mut self, k: usize, exit: Exit) -> Vec<Effect> {
        let d = self.draining.remove(k);
        self.gone(d.pid);
        tracing::info!(service = %self.name, pid = d.pid, %exit, "old instance exited");
        // Sockets a reload replaced are held for the instances started
        // before it: once none drains and no restart is under way, the
        // main instance (if any) runs on the new sockets.
        if self.draining.is_empty() && self.candidate.is_none() && !self.restart_requested {
            vec![Effect::ReleaseOldSockets]
        } else {
            Vec::new()
        }
    }

    /// The overlap candidate died before it was ready: the old instance
    /// keeps serving.
    fn candidate_exited(&mut self, exit: Exit) {
        let Some(c) = self.candidate.take() else {
            return;
        };
        self.gone(c.pid);
        tracing::error!(service = %self.name, pid = c.pid, %exit, "overlap restart: the new instance exited before it was ready; the old one keeps serving");
        self.overlap_failure = Some(format!(
            "the new instance exited before it was ready ({exit}); the old instance keeps serving"
        ));
    }

    fn main_exited(
        &mut self,
        main: Instance,
        exit: Exit,
        now: Instant,
        shutting_down: bool,
    ) -> Vec<Effect> {
        self.gone(main.pid);
        self.end_signal_reload(Err(format!("the main process exited ({exit})")));
        let uptime = now.saturating_duration_since(main.started_at);
        self.last_exit = Some(exit);
        let failed = !exit.success() || main.failed.is_some();
        let live = !shutting_down && !self.stop_requested;
        // An overlap candidate takes over at once if the old one dies.
        if live {
            if let Some(c) = self.candidate.take() {
                tracing::warn!(service = %self.name, pid = main.pid, %exit, "exited during an overlap restart; the new instance takes over");
                self.state = if c.ready {
                    State::Running
                } else {
                    State::Starting
                };
                self.main = Some(c);
                self.restarts += 1;
                return Vec::new();
            }
            // The candidate is still in its exec-start-pre: it becomes the main start.
            if let Some(pre) = self.pre.as_mut().filter(|p| p.what == SpawnRole::Candidate) {
                tracing::warn!(service = %self.name, pid = main.pid, %exit, "exited during an overlap restart; the new instance, in its exec-start-pre, takes over");
                pre.what = SpawnRole::Main;
                self.state = State::Starting;
                self.restarts += 1;
                return Vec::new();
            }
        }
        let asked = self.restart_requested;
        let listens_again = self.cfg.on_demand && live && !asked;
        let ended = Ended {
            main,
            exit,
            failed,
            uptime,
        };
        if listens_again {
            self.on_demand_exited(&ended, now);
        } else {
            self.restart_or_rest(&ended, now, shutting_down);
        }
        let mut fx = Vec::new();
        if !self.has_instances() {
            fx.push(Effect::ReleaseOldSockets);
        }
        // A command still runs beside it (exec-stop): the next start waits
        // for its end. Those about this main process end with it.
        self.end_commands_of_main(now, &mut fx);
        if !listens_again && self.control.is_none() && self.next_start.is_some_and(|t| t <= now) {
            fx.extend(self.start(now, !asked));
        }
        fx
    }

    /// The main process is gone: its exec-start-post or exec-reload command
    /// is stopped (exec-stop runs on to its end).
    fn end_commands_of_main(&mut self, now: Instant, fx: &mut Vec<Effect>) {
        let timeout = self.cfg.stop_timeout;
        if let Some(c) = self
            .control
            .as_mut()
            .filter(|c| c.what != CommandKind::Stop)
        {
            if let Some(inst) = c.inst.as_mut() {
                inst.terminate(now, timeout, fx);
            }
        }
    }

    /// An on-demand service waits for traffic again, unless it was stopped
    /// or is to be restarted at once. After a failed run it first waits the
    /// restart delay (with its backoff): the traffic that started it may
    /// still be queued, and would start it again at once, in a loop.
    fn on_demand_exited(&mut self, ended: &Ended, now: Instant) {
        if ended.failed {
            let t = deadline(now, self.backoff.next_delay(ended.uptime));
            self.wait_to_restart(
                ended,
                t,
                now,
                "failed; listening for traffic again after the restart delay (on-demand)",
            );
        } else {
            self.state = State::Listening;
            tracing::info!(service = %self.name, pid = ended.main.pid, exit = %ended.exit, "exited; listening for traffic again (on-demand)");
        }
    }

    /// The restart policy after the main instance's exit: wait to restart,
    /// or come to rest as stopped or failed.
    fn restart_or_rest(&mut self, ended: &Ended, now: Instant, shutting_down: bool) {
        let restart_at = if shutting_down {
            self.stop_requested = false;
            None
        } else {
            let t = self.after_exit(ended.failed, ended.uptime, now);
            if t.is_none() && self.state == State::Failed && self.failure.is_none() {
                self.failure = ended.main.failed.clone();
            }
            t
        };
        match restart_at {
            Some(t) => self.wait_to_restart(ended, t, now, "exited; restarting"),
            None => {
                if shutting_down {
                    self.state = State::Stopped;
                }
                tracing::info!(service = %self.name, pid = ended.main.pid, exit = %ended.exit, state = self.state.as_str(), "exited");
            }
        }
    }

    /// Counts a restart and waits until `t` to start again.
    fn wait_to_restart(&mut self, ended: &Ended, t: Instant, now: Instant, what: &str) {
        self.restarts += 1;
        self.set_waiting(t);
        tracing::info!(
            service = %self.name, pid = ended.main.pid, exit = %ended.exit,
            delay_ms = t.saturating_duration_since(now).as_millis() as u64,
            "{what}"
        );
    }

    /// What instance `id` said.
    pub fn said(
        &mut self,
        id: InstanceId,
        role: Role,
        items: Vec<Said>,
        now: Instant,
    ) -> Vec<Effect> {
        let mut fx = Vec::new();
        let stop_timeout = self.cfg.stop_timeout;
        let name = &self.name;
        let Some(inst) = self
            .main
            .iter_mut()
            .chain(&mut self.candidate)
            .chain(&mut self.draining)
            .find(|i| i.id == id)
        else {
            return fx;
        };
        let mut heard = Heard::default();
        for item in items {
            inst.hear(name, item, now, stop_timeout, &mut heard, &mut fx);
        }
        let became_ready = heard.became_ready;
        self.take_heard(role, heard);
        if became_ready && role == Role::Candidate {
            self.promote(now, &mut fx);
        }
        if became_ready && role == Role::Main && self.state == State::Running {
            self.after_ready(now, &mut fx);
        }
        fx
    }

    /// What a notification means for the service as a whole. What an old
    /// instance says while it drains is about it, not the service: its
    /// STATUS=, ERRNO= and STOPPING=1 are not shown.
    fn take_heard(&mut self, role: Role, heard: Heard) {
        if role != Role::Draining {
            if let Some(s) = heard.status {
                self.status_text = Some(s);
            }
            if let Some(e) = heard.errno {
                self.errno = Some(e);
            }
        }
        if role != Role::Main {
            return;
        }
        let from: &[State] = match heard.main_state {
            Some(State::Running) => &[State::Starting, State::Reloading],
            Some(State::Reloading) => &[State::Running, State::Starting],
            Some(State::Stopping) => &[State::Running, State::Starting, State::Reloading],
            _ => &[],
        };
        // Still in exec-start-post: starting until it is done.
        let post = self
            .control
            .as_ref()
            .is_some_and(|c| c.what == CommandKind::StartPost);
        // A reload by signal: READY=1 ends it only after RELOADING=1.
        if let Some(r) = self.signal_reload.as_mut() {
            match heard.main_state {
                Some(State::Reloading) => r.reloading = true,
                Some(State::Running) if !r.reloading => return,
                _ => {}
            }
        }
        if let Some(to) = heard
            .main_state
            .filter(|_| from.contains(&self.state))
            .filter(|to| !(post && *to == State::Running))
        {
            if to == State::Running && self.state == State::Reloading {
                self.end_signal_reload(Ok(()));
            }
            self.state = to;
        }
    }

    /// Deadlines that have passed: SIGKILL after a stop timeout, a start
    /// timeout, the watchdog, a due restart. `may_start`: false while
    /// holdfast shuts down.
    pub fn timers(&mut self, now: Instant, may_start: bool) -> Vec<Effect> {
        let mut fx = Vec::new();
        self.end_grace(now, &mut fx);
        self.kill_late(now, &mut fx);
        self.pre_command_timeout(now, &mut fx);
        self.command_timeout(now, &mut fx);
        self.reload_signal_timeout(now);
        self.candidate_timeout(now, &mut fx);
        self.main_timeouts(now, &mut fx);
        if may_start && self.control.is_none() && self.next_start.is_some_and(|t| t <= now) {
            if self.cfg.on_demand {
                // The delay after a failed run is over: traffic starts it.
                self.next_start = None;
                self.state = State::Listening;
            } else {
                fx.extend(self.start(now, true));
            }
        }
        fx
    }

    /// The old instances of overlap restarts whose overlap-grace is over:
    /// told to stop.
    fn end_grace(&mut self, now: Instant, fx: &mut Vec<Effect>) {
        let timeout = self.cfg.stop_timeout;
        for old in &mut self.draining {
            if old.drain_at.is_some_and(|t| t <= now) {
                old.terminate(now, timeout, fx);
            }
        }
    }

    /// SIGKILL for every instance still there at its `kill_at`.
    fn kill_late(&mut self, now: Instant, fx: &mut Vec<Effect>) {
        for inst in self
            .main
            .iter_mut()
            .chain(&mut self.candidate)
            .chain(&mut self.draining)
            .chain(self.pre.as_mut().and_then(|p| p.inst.as_mut()))
            .chain(self.control.as_mut().and_then(|c| c.inst.as_mut()))
        {
            if inst.kill_at.is_some_and(|t| t <= now) {
                inst.kill_at = Some(deadline(now, Duration::from_secs(3600)));
                tracing::warn!(service = %self.name, pid = inst.pid, "did not stop in time: SIGKILL to all its processes");
                fx.push(Effect::Kill(inst.id));
            }
        }
    }

    /// Start timeout in an exec-start-pre command.
    fn pre_command_timeout(&mut self, now: Instant, fx: &mut Vec<Effect>) {
        let stop_timeout = self.cfg.stop_timeout;
        let start_timeout = self.cfg.start_timeout;
        // Start timeout in an exec-start-pre command: stop it; its exit
        // fails the start.
        if let Some(pre) = self.pre.as_mut() {
            if let Some(inst) = pre.inst.as_mut().filter(|i| i.late_for(now)) {
                let why = format!(
                    "exec-start-pre[{}] did not finish within start-timeout ({})",
                    pre.index,
                    humantime::format_duration(start_timeout)
                );
                stop_late_command(&self.name, inst, why, now, stop_timeout, fx);
                if pre.what == SpawnRole::Main {
                    self.state = State::Stopping;
                }
            }
        }
    }

    /// A command beside the main process not done in time.
    fn command_timeout(&mut self, now: Instant, fx: &mut Vec<Effect>) {
        let stop_timeout = self.cfg.stop_timeout;
        let start_timeout = self.cfg.start_timeout;
        // A command beside the main process not done in time: stopped; its
        // exit fails it. exec-stop's timeout sends kill-signal to the main
        // process at once.
        if let Some(c) = self.control.as_mut() {
            if let Some(inst) = c.inst.as_mut().filter(|i| i.late_for(now)) {
                let (timeout, which) = match c.what {
                    CommandKind::Stop => (stop_timeout, "stop-timeout"),
                    CommandKind::StartPost | CommandKind::Reload => {
                        (start_timeout, "start-timeout")
                    }
                };
                let why = format!(
                    "{}[{}] did not finish within {which} ({})",
                    c.what.key(),
                    c.index,
                    humantime::format_duration(timeout)
                );
                stop_late_command(&self.name, inst, why, now, stop_timeout, fx);
                if c.what == CommandKind::Stop {
                    if let Some(main) = self.main.as_mut() {
                        main.terminate(now, stop_timeout, fx);
                    }
                }
            }
        }
    }

    /// A reload by signal with no RELOADING=1 then READY=1 in time.
    fn reload_signal_timeout(&mut self, now: Instant) {
        let start_timeout = self.cfg.start_timeout;
        if self.signal_reload.as_ref().is_some_and(|r| r.by <= now) {
            let why = format!(
                "no RELOADING=1 then READY=1 within start-timeout ({}) after reload-signal",
                humantime::format_duration(start_timeout)
            );
            self.end_signal_reload(Err(why));
            if self.state == State::Reloading {
                self.state = State::Running;
            }
        }
    }

    /// Start timeout of an overlap candidate.
    fn candidate_timeout(&mut self, now: Instant, fx: &mut Vec<Effect>) {
        let stop_timeout = self.cfg.stop_timeout;
        // Start timeout of an overlap candidate: give up on it.
        if self
            .candidate
            .as_ref()
            .is_some_and(|c| !c.ready && c.late_for(now))
        {
            let why = not_ready_in_time(self.cfg.start_timeout);
            let mut c = self.candidate.take().expect("checked");
            tracing::error!(service = %self.name, pid = c.pid, "overlap restart abandoned: {why}; the old instance keeps serving");
            c.terminate(now, stop_timeout, fx);
            self.draining.push(c);
            self.overlap_failure = Some(format!(
                "the new instance {why}; the old instance keeps serving"
            ));
        }
    }

    /// The main instance's start timeout and watchdog.
    fn main_timeouts(&mut self, now: Instant, fx: &mut Vec<Effect>) {
        let stop_timeout = self.cfg.stop_timeout;
        let start_timeout = self.cfg.start_timeout;
        if let Some(main) = self.main.as_mut() {
            if !main.ready && main.late_for(now) {
                tracing::error!(service = %self.name, pid = main.pid, timeout = %humantime::format_duration(start_timeout), "did not send READY=1 within start-timeout: stopping it");
                main.terminate(now, stop_timeout, fx);
                main.failed = Some(not_ready_in_time(start_timeout));
                self.state = State::Stopping;
            }
            if main.watchdog_at.is_some_and(|t| t <= now) {
                tracing::error!(service = %self.name, pid = main.pid, "watchdog timeout: no WATCHDOG=1 in time; sending SIGABRT");
                fx.push(Effect::Abort(main.id));
                main.watchdog_at = None;
                main.kill_at = Some(deadline(now, stop_timeout));
                main.failed = Some("watchdog timeout: no WATCHDOG=1 in time".into());
                self.state = State::Stopping;
            }
        }
    }

    // ---- inside the machine ----

    /// The overlap candidate is ready: it becomes the main instance and the
    /// old one drains.
    fn promote(&mut self, now: Instant, fx: &mut Vec<Effect>) {
        let Some(new) = self.candidate.take() else {
            return;
        };
        if let Some(mut old) = self.main.take() {
            let grace = self.cfg.overlap_grace;
            if grace.is_zero() {
                old.terminate(now, self.cfg.stop_timeout, fx);
            } else {
                // No watchdog or start deadline for it any more: only the grace.
                old.ready_by = None;
                old.watchdog_at = None;
                old.drain_at = Some(deadline(now, grace));
                tracing::info!(service = %self.name, pid = old.pid, grace = %humantime::format_duration(grace), "overlap restart: the old instance serves on for overlap-grace");
            }
            self.draining.push(old);
        }
        tracing::info!(service = %self.name, pid = new.pid, "overlap restart: the new instance is ready and serving; the old one drains");
        self.main = Some(new);
        self.restarts += 1;
        self.state = State::Running;
        self.after_ready(now, fx);
    }

    /// The restart policy after a main process's exit: when to start again,
    /// or `None` with the state set to `Stopped` or `Failed`.
    fn after_exit(&mut self, failed: bool, uptime: Duration, now: Instant) -> Option<Instant> {
        if self.stop_requested {
            self.stop_requested = false;
            self.restart_requested = false;
            self.state = State::Stopped;
            return None;
        }
        if self.restart_requested {
            self.restart_requested = false;
            self.backoff.reset();
            return Some(now);
        }
        let wanted = match self.cfg.restart {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => failed,
            RestartPolicy::Never => false,
        };
        if !wanted {
            self.state = if failed {
                State::Failed
            } else {
                State::Stopped
            };
            return None;
        }
        Some(deadline(now, self.backoff.next_delay(uptime)))
    }

    fn set_waiting(&mut self, t: Instant) {
        self.state = State::Waiting;
        self.next_start = Some(t);
    }

    /// An explicit start: clears the failure and the start limit.
    fn reset(&mut self) {
        self.backoff.reset();
        self.start_limit.reset();
        self.stop_requested = false;
        self.restart_requested = false;
    }

    fn gone(&mut self, pid: i32) {
        if self.gone_pids.len() >= GONE_PIDS {
            self.gone_pids.pop_front();
        }
        self.gone_pids.push_back(pid);
    }
}

fn backoff_of(cfg: &ServiceConfig) -> Backoff {
    Backoff::new(
        cfg.restart_delay,
        cfg.restart_delay_max,
        cfg.start_limit_interval,
    )
}

/// Why an instance that did not say READY=1 within `start_timeout` failed.
fn not_ready_in_time(start_timeout: Duration) -> String {
    format!(
        "did not send READY=1 within start-timeout ({})",
        humantime::format_duration(start_timeout)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use CommandKind::{Reload, StartPost, Stop};
    use RestartPolicy::{Always, Never, OnFailure};
    use ServiceType::{Notify, NotifyReload, Simple};

    const MS: Duration = Duration::from_millis(1);

    fn cfg(kind: ServiceType, restart: RestartPolicy) -> ServiceConfig {
        ServiceConfig {
            kind,
            restart,
            restart_delay: 100 * MS,
            restart_delay_max: 1000 * MS,
            stop_timeout: 1000 * MS,
            start_timeout: 1000 * MS,
            start_limit_burst: 5,
            start_limit_interval: 10_000 * MS,
            process: crate::unit::ProcessConfig::defaults_for(kind),
            ..ServiceConfig::with_defaults(vec!["x".into()])
        }
    }

    fn machine(kind: ServiceType, restart: RestartPolicy) -> Machine {
        Machine::new("s", &cfg(kind, restart), false)
    }

    fn started(m: &mut Machine, now: Instant, pid: i32) -> InstanceId {
        assert_eq!(m.boot(now), vec![Effect::Spawn(SpawnRole::Main)]);
        m.spawned(SpawnRole::Main, pid, now).0
    }

    /// A `kind` service (restart on failure) whose main process, pid 10, has
    /// said READY=1.
    fn ready(kind: ServiceType, now: Instant) -> (Machine, InstanceId) {
        let mut m = machine(kind, OnFailure);
        let id = started(&mut m, now, 10);
        m.said(id, Role::Main, vec![Said::Ready], now);
        (m, id)
    }

    /// A simple on-demand service, restarted on failure.
    fn on_demand() -> Machine {
        let c = ServiceConfig {
            on_demand: true,
            ..cfg(Simple, OnFailure)
        };
        Machine::new("s", &c, true)
    }

    /// The `run`th start: the boot, then each restart when its delay is over.
    fn start_run(m: &mut Machine, run: i32, t: Instant) -> Vec<Effect> {
        if run == 0 {
            m.boot(t)
        } else {
            m.timers(t, true)
        }
    }

    /// `text` is there and holds `fragment`.
    fn assert_says(text: Option<&str>, fragment: &str) {
        let text = text.expect("a reason");
        assert!(text.contains(fragment), "{text:?} lacks {fragment:?}");
    }

    #[test]
    fn restart_policies_after_exit() {
        let now = Instant::now();
        let cases = [
            (Always, Exit::Code(0), State::Waiting),
            (Always, Exit::Code(1), State::Waiting),
            (OnFailure, Exit::Code(0), State::Stopped),
            (OnFailure, Exit::Code(1), State::Waiting),
            (OnFailure, Exit::Signal(9), State::Waiting),
            (Never, Exit::Code(1), State::Failed),
            (Never, Exit::Code(0), State::Stopped),
        ];
        for (policy, exit, want) in cases {
            let mut m = machine(Simple, policy);
            let id = started(&mut m, now, 10);
            assert_eq!(m.state(), State::Running);
            m.exited(id, exit, now + MS, false);
            assert_eq!(m.state(), want, "{policy:?} after {exit:?}");
            assert_eq!(m.restarts(), u32::from(want == State::Waiting));
        }
    }

    #[test]
    fn notify_service_is_starting_until_ready_and_times_out() {
        let now = Instant::now();
        let mut m = machine(Notify, OnFailure);
        let id = started(&mut m, now, 10);
        assert_eq!(m.state(), State::Starting);
        assert!(m.timers(now + 999 * MS, true).is_empty());
        let fx = m.timers(now + 1000 * MS, true);
        assert_eq!(fx, vec![Effect::Terminate(id)]);
        assert_eq!(m.state(), State::Stopping);
        // A start timeout is a failure even after exit 0.
        m.exited(id, Exit::Code(0), now + 1001 * MS, false);
        assert_eq!(m.state(), State::Waiting);
    }

    #[test]
    fn reloading_is_a_state_between_ready_and_ready() {
        let now = Instant::now();
        let (mut m, id) = ready(Notify, now);
        assert_eq!(m.state(), State::Running);
        m.said(id, Role::Main, vec![Said::Reloading], now);
        assert_eq!(m.state(), State::Reloading);
        m.said(id, Role::Main, vec![Said::Ready], now);
        assert_eq!(m.state(), State::Running);
    }

    #[test]
    fn overlap_promotes_when_ready_and_old_drains() {
        let now = Instant::now();
        let (mut m, old) = ready(Notify, now);
        let fx = m.restart(Some(RestartMode::Overlap), now).unwrap();
        assert_eq!(fx, vec![Effect::Spawn(SpawnRole::Candidate)]);
        let (new, fx) = m.spawned(SpawnRole::Candidate, 11, now);
        assert!(fx.is_empty());
        assert_eq!(m.main().unwrap().pid, 10);
        let fx = m.said(new, Role::Candidate, vec![Said::Ready], now);
        assert_eq!(fx, vec![Effect::Terminate(old)]);
        assert_eq!(m.main().unwrap().pid, 11);
        assert_eq!(m.draining().len(), 1);
        assert_eq!(m.restarts(), 1);
        assert_eq!(
            m.exited(old, Exit::Signal(15), now, false),
            vec![Effect::ReleaseOldSockets]
        );
        assert_eq!(m.state(), State::Running);
    }

    /// A ready notify service (pid 10) with `overlap-grace = grace`,
    /// overlap-restarted to pid 11, which has said READY=1.
    fn overlapped_with_grace(
        grace: Duration,
        now: Instant,
    ) -> (Machine, InstanceId, InstanceId, Vec<Effect>) {
        let mut c = cfg(Notify, OnFailure);
        c.overlap_grace = grace;
        let mut m = Machine::new("s", &c, false);
        let old = started(&mut m, now, 10);
        m.said(old, Role::Main, vec![Said::Ready], now);
        m.restart(Some(RestartMode::Overlap), now).unwrap();
        let (new, _) = m.spawned(SpawnRole::Candidate, 11, now);
        let fx = m.said(new, Role::Candidate, vec![Said::Ready], now);
        (m, old, new, fx)
    }

    #[test]
    fn with_overlap_grace_the_old_instance_serves_on_until_it_ends() {
        let now = Instant::now();
        let grace = Duration::from_secs(2);
        let (mut m, old, _, fx) = overlapped_with_grace(grace, now);
        assert!(fx.is_empty(), "{fx:?}");
        assert_eq!(m.main().unwrap().pid, 11);
        assert_eq!(m.draining().len(), 1);
        assert_eq!(m.state(), State::Running);
        assert_eq!(m.deadline(), Some(now + grace));
        assert!(m.timers(now + grace - MS, true).is_empty());
        assert_eq!(m.timers(now + grace, true), vec![Effect::Terminate(old)]);
        // Once: then the stop timeout runs, as for any stop.
        assert!(m.timers(now + grace + MS, true).is_empty());
        assert_eq!(
            m.exited(old, Exit::Signal(15), now + grace + MS, false),
            vec![Effect::ReleaseOldSockets]
        );
    }

    #[test]
    fn a_stop_during_overlap_grace_stops_the_old_instance_too() {
        let now = Instant::now();
        let (mut m, old, new, _) = overlapped_with_grace(Duration::from_secs(60), now);
        let fx = m.stop(now + MS);
        assert!(fx.contains(&Effect::Terminate(old)), "{fx:?}");
        assert!(fx.contains(&Effect::Terminate(new)), "{fx:?}");
        // A retired unit's old instance, too.
        let (mut m, old, _, _) = overlapped_with_grace(Duration::from_secs(60), now);
        assert!(m.retire(now + MS).contains(&Effect::Terminate(old)));
    }

    #[test]
    fn overlap_candidate_that_dies_leaves_the_old_one() {
        let now = Instant::now();
        let (mut m, old) = ready(Notify, now);
        m.restart(Some(RestartMode::Overlap), now).unwrap();
        let (new, _) = m.spawned(SpawnRole::Candidate, 11, now);
        m.exited(new, Exit::Code(1), now, false);
        assert_says(m.overlap_failure(), "exited before it was ready");
        assert_eq!(m.main().unwrap().id, old);
        assert_eq!(m.state(), State::Running);
    }

    #[test]
    fn single_instance_refuses_overlap() {
        let now = Instant::now();
        let c = ServiceConfig {
            single_instance: true,
            ..cfg(Simple, OnFailure)
        };
        let mut m = Machine::new("s", &c, false);
        started(&mut m, now, 10);
        assert!(m.restart(Some(RestartMode::Overlap), now).is_err());
    }

    #[test]
    fn stop_then_exit_is_stopped_whatever_the_policy() {
        let now = Instant::now();
        let mut m = machine(Simple, Always);
        let id = started(&mut m, now, 10);
        assert_eq!(m.stop(now), vec![Effect::Terminate(id)]);
        assert_eq!(m.state(), State::Stopping);
        assert_eq!(m.timers(now + 1000 * MS, true), vec![Effect::Kill(id)]);
        m.exited(id, Exit::Signal(9), now + 1001 * MS, false);
        assert_eq!(m.state(), State::Stopped);
    }

    #[test]
    fn start_limit_fails_the_service() {
        let now = Instant::now();
        let mut m = machine(Simple, Always);
        let mut t = now;
        for pid in 0..5 {
            let fx = start_run(&mut m, pid, t);
            assert_eq!(fx, vec![Effect::Spawn(SpawnRole::Main)], "start {pid}");
            let (id, _) = m.spawned(SpawnRole::Main, 100 + pid, t);
            m.exited(id, Exit::Code(1), t, false);
            t += Duration::from_secs(1);
        }
        assert!(m.timers(t, true).is_empty());
        assert_eq!(m.state(), State::Failed);
        assert_says(m.failure(), "start limit");
        // An explicit start clears it.
        let (wait, fx) = m.request_start(t);
        assert!(wait);
        assert_eq!(fx, vec![Effect::Spawn(SpawnRole::Main)]);
    }

    #[test]
    fn watchdog_miss_aborts_then_kills() {
        let now = Instant::now();
        let mut c = cfg(Simple, OnFailure);
        c.watchdog = Some(100 * MS);
        let mut m = Machine::new("s", &c, false);
        let id = started(&mut m, now, 10);
        m.said(id, Role::Main, vec![Said::Watchdog], now + 50 * MS);
        assert!(m.timers(now + 100 * MS, true).is_empty());
        assert_eq!(m.timers(now + 150 * MS, true), vec![Effect::Abort(id)]);
        assert_eq!(m.timers(now + 1150 * MS, true), vec![Effect::Kill(id)]);
    }

    #[test]
    fn huge_durations_do_not_overflow() {
        let now = Instant::now();
        let mut c = cfg(Notify, Always);
        c.stop_timeout = Duration::MAX;
        c.start_timeout = Duration::MAX;
        c.restart_delay = Duration::MAX;
        c.restart_delay_max = Duration::MAX;
        let mut m = Machine::new("s", &c, false);
        let id = started(&mut m, now, 10);
        m.said(
            id,
            Role::Main,
            vec![Said::ExtendTimeout(Duration::MAX)],
            now,
        );
        m.stop(now);
        m.exited(id, Exit::Code(1), now, false);
        let id = {
            m.request_start(now);
            m.spawned(SpawnRole::Main, 11, now).0
        };
        m.exited(id, Exit::Code(1), now, false);
        assert_eq!(m.state(), State::Waiting);
    }

    #[test]
    fn a_gone_sender_is_not_credited_to_a_new_instance_when_its_pid_is_known() {
        let now = Instant::now();
        let mut m = machine(Simple, Always);
        let id = started(&mut m, now, 10);
        m.exited(id, Exit::Code(1), now, false);
        m.timers(now + Duration::from_secs(1), true);
        let new = m.spawned(SpawnRole::Main, 11, now).0;
        assert_eq!(m.sender_role(10, false, |_| false), None);
        assert_eq!(m.sender_role(99, false, |_| false), Some((new, Role::Main)));
        assert_eq!(m.sender_role(11, true, |_| false), Some((new, Role::Main)));
        assert_eq!(m.sender_role(99, true, |_| false), None);
    }

    #[test]
    fn on_demand_listens_again_after_exit() {
        let now = Instant::now();
        let mut m = on_demand();
        assert!(m.boot(now).is_empty());
        assert_eq!(m.state(), State::Listening);
        assert_eq!(m.traffic(now), vec![Effect::Spawn(SpawnRole::Main)]);
        let (id, _) = m.spawned(SpawnRole::Main, 10, now);
        m.exited(id, Exit::Code(0), now, false);
        assert_eq!(m.state(), State::Listening);
        assert_eq!(m.restarts(), 0);
    }

    #[test]
    fn on_demand_failures_wait_the_restart_delay_with_backoff() {
        let now = Instant::now();
        let mut m = on_demand();
        m.boot(now);
        let mut t = now;
        for (run, delay) in [(1, 100), (2, 200), (3, 400)] {
            assert_eq!(m.traffic(t), vec![Effect::Spawn(SpawnRole::Main)]);
            let (id, _) = m.spawned(SpawnRole::Main, 10 + run, t);
            let exit = if run == 2 {
                Exit::Signal(9)
            } else {
                Exit::Code(1)
            };
            m.exited(id, exit, t + MS, false);
            assert_eq!(m.state(), State::Waiting, "run {run}");
            assert_eq!(m.restarts(), run as u32);
            // Queued traffic does not start it during the delay.
            assert!(m.traffic(t + MS).is_empty());
            assert!(m.timers(t + (delay) * MS, true).is_empty());
            assert_eq!(m.state(), State::Waiting, "run {run}");
            t += (delay + 1) * MS;
            assert_eq!(m.deadline(), Some(t));
            assert!(m.timers(t, true).is_empty());
            assert_eq!(m.state(), State::Listening, "run {run}");
        }
        // Stopped while waiting: stays stopped.
        assert_eq!(m.traffic(t), vec![Effect::Spawn(SpawnRole::Main)]);
        let (id, _) = m.spawned(SpawnRole::Main, 20, t);
        m.exited(id, Exit::Code(1), t, false);
        m.stop(t);
        assert_eq!(m.state(), State::Stopped);
        assert!(m.timers(t + Duration::from_secs(5), true).is_empty());
        assert_eq!(m.state(), State::Stopped);
    }

    /// A machine whose exec-start-pre commands are `pre` ("-x": x, its
    /// failure ignored).
    fn pre_machine(kind: ServiceType, restart: RestartPolicy, pre: &[&str]) -> Machine {
        let list: Vec<(&str, bool)> = pre
            .iter()
            .map(|p| p.strip_prefix('-').map_or((*p, false), |p| (p, true)))
            .collect();
        Machine::new("s", &with_pre(kind, restart, &list), false)
    }

    /// A machine with `n` commands of `which`.
    fn cmd_machine(
        kind: ServiceType,
        restart: RestartPolicy,
        which: CommandKind,
        n: usize,
    ) -> Machine {
        Machine::new("s", &with_commands(kind, restart, which, n), false)
    }

    /// A booted `pre_machine` whose first command runs as pid 10.
    fn pre_running(
        kind: ServiceType,
        restart: RestartPolicy,
        pre: &[&str],
        now: Instant,
    ) -> (Machine, InstanceId) {
        let mut m = pre_machine(kind, restart, pre);
        m.boot(now);
        let id = m.pre_spawned(10, now);
        (m, id)
    }

    /// `id`, stopping since `since`, is killed when the stop-timeout is
    /// over, and its end leaves no instance.
    fn assert_killed_at_stop_timeout(m: &mut Machine, id: InstanceId, since: Instant) {
        assert_eq!(m.state(), State::Stopping);
        assert_eq!(m.timers(since + 1000 * MS, true), vec![Effect::Kill(id)]);
        let end = m.exited(id, Exit::Signal(9), since + 1001 * MS, false);
        assert_eq!(end, released());
    }

    /// Runs a spawned exec-start-pre command as `pid` to its `exit`.
    fn pre_ran(m: &mut Machine, pid: i32, exit: Exit, now: Instant) -> Vec<Effect> {
        let id = m.pre_spawned(pid, now);
        m.exited(id, exit, now, false)
    }

    /// Runs a spawned exec-start-post, exec-stop or exec-reload command as
    /// `pid` to its `exit`.
    fn ran(m: &mut Machine, pid: i32, exit: Exit, now: Instant) -> Vec<Effect> {
        let id = m.command_spawned(pid, now);
        m.exited(id, exit, now, false)
    }

    fn with_pre(kind: ServiceType, restart: RestartPolicy, pre: &[(&str, bool)]) -> ServiceConfig {
        let mut c = cfg(kind, restart);
        c.commands.start_pre = pre
            .iter()
            .map(|(p, ignore)| crate::unit::ExecCommand {
                argv: vec![p.to_string()],
                ignore_failure: *ignore,
            })
            .collect();
        c
    }

    /// A start that failed leaves no instance: sockets a reload replaced go.
    fn released() -> Vec<Effect> {
        vec![Effect::ReleaseOldSockets]
    }

    fn pre(role: SpawnRole, index: usize) -> Vec<Effect> {
        vec![Effect::SpawnPre { role, index }]
    }

    #[test]
    fn pre_commands_run_one_after_another_before_the_main_process() {
        let now = Instant::now();
        let mut m = pre_machine(Simple, OnFailure, &["a", "b"]);
        assert_eq!(m.boot(now), pre(SpawnRole::Main, 0));
        assert_eq!(m.state(), State::Starting);
        let a = m.pre_spawned(20, now);
        assert_eq!(m.pre_command().map(|(k, i)| (k, i.pid)), Some((0, 20)));
        assert!(m.has_instances());
        assert!(m.main().is_none());
        assert_eq!(
            m.exited(a, Exit::Code(0), now, false),
            pre(SpawnRole::Main, 1)
        );
        assert_eq!(
            pre_ran(&mut m, 21, Exit::Code(0), now),
            vec![Effect::Spawn(SpawnRole::Main)]
        );
        assert!(m.pre_command().is_none());
        m.spawned(SpawnRole::Main, 22, now);
        assert_eq!(m.state(), State::Running);
        // A restart runs them again.
        let main = m.main().unwrap().id;
        m.exited(main, Exit::Code(1), now + MS, false);
        assert_eq!(m.state(), State::Waiting);
        assert_eq!(
            m.timers(now + Duration::from_secs(1), true),
            pre(SpawnRole::Main, 0)
        );
    }

    #[test]
    fn a_failing_pre_command_fails_the_start_and_the_start_limit_applies() {
        let now = Instant::now();
        let c = with_pre(Simple, Always, &[("check", false)]);
        let mut m = Machine::new("s", &c, false);
        let mut t = now;
        for run in 0..5 {
            let fx = start_run(&mut m, run, t);
            assert_eq!(fx, pre(SpawnRole::Main, 0), "start {run}");
            let id = m.pre_spawned(100 + run, t);
            assert_eq!(m.exited(id, Exit::Code(1), t, false), released());
            assert_eq!(m.state(), State::Waiting, "start {run}");
            assert_eq!(m.last_exit(), Some(Exit::Code(1)));
            t += Duration::from_secs(1);
        }
        assert_eq!(m.restarts(), 5);
        assert!(m.timers(t, true).is_empty());
        assert_eq!(m.state(), State::Failed);
        assert_says(m.failure(), "start limit");

        // restart = "never": failed at once, saying which command.
        let mut m = pre_machine(Simple, Never, &["ok", "check"]);
        m.boot(now);
        pre_ran(&mut m, 10, Exit::Code(0), now);
        pre_ran(&mut m, 11, Exit::Signal(9), now);
        assert_eq!(m.state(), State::Failed);
        let why = m.failure().unwrap();
        assert!(why.contains("exec-start-pre[1] (check) failed"), "{why}");
        assert!(!m.has_instances());
    }

    #[test]
    fn a_dash_command_may_fail_and_cannot_be_spawned_as_well() {
        let now = Instant::now();
        let (mut m, a) = pre_running(Notify, OnFailure, &["-a", "-b", "c"], now);
        assert_eq!(
            m.exited(a, Exit::Code(3), now, false),
            pre(SpawnRole::Main, 1)
        );
        assert_eq!(
            m.pre_spawn_failed("no such file", now),
            pre(SpawnRole::Main, 2)
        );
        // Not a dash: a spawn failure fails the start.
        assert_eq!(m.pre_spawn_failed("no such file", now), released());
        assert_eq!(m.state(), State::Waiting);
        assert_eq!(m.last_exit(), Some(Exit::Code(127)));
    }

    #[test]
    fn pre_commands_must_finish_within_start_timeout() {
        let now = Instant::now();
        let (mut m, a) = pre_running(Simple, Never, &["a", "-slow"], now);
        m.exited(a, Exit::Code(0), now + 600 * MS, false);
        let slow = m.pre_spawned(11, now + 600 * MS);
        // One start-timeout for them all, from the start.
        assert_eq!(m.deadline(), Some(now + 1000 * MS));
        assert!(m.timers(now + 999 * MS, true).is_empty());
        assert_eq!(
            m.timers(now + 1000 * MS, true),
            vec![Effect::Terminate(slow)]
        );
        // Even a dash command that timed out fails the start.
        assert_killed_at_stop_timeout(&mut m, slow, now + 1000 * MS);
        assert_eq!(m.state(), State::Failed);
        assert_says(m.failure(), "within start-timeout");
    }

    #[test]
    fn a_stop_during_a_pre_command_stops_it_and_nothing_starts() {
        let now = Instant::now();
        let (mut m, a) = pre_running(Simple, Always, &["a"], now);
        assert_eq!(m.stop(now), vec![Effect::Terminate(a)]);
        assert_killed_at_stop_timeout(&mut m, a, now);
        assert_eq!(m.state(), State::Stopped);
        assert!(m.failure().is_none());
        assert!(!m.has_instances());
        // Shutting down: stopped too, whatever its exit.
        m.request_start(now);
        let a = m.pre_spawned(11, now);
        assert_eq!(m.exited(a, Exit::Code(0), now, true), released());
        assert_eq!(m.state(), State::Stopped);
    }

    #[test]
    fn a_restart_during_a_pre_command_starts_again_from_the_first() {
        let now = Instant::now();
        let mut m = pre_machine(Simple, Never, &["a", "b"]);
        m.boot(now);
        pre_ran(&mut m, 10, Exit::Code(0), now);
        let b = m.pre_spawned(11, now);
        assert_eq!(m.restart(None, now).unwrap(), vec![Effect::Terminate(b)]);
        assert_eq!(
            m.exited(b, Exit::Signal(15), now, false),
            [released(), pre(SpawnRole::Main, 0)].concat()
        );
        assert_eq!(m.state(), State::Starting);
    }

    #[test]
    fn an_overlap_candidate_runs_the_pre_commands_and_their_failure_keeps_the_old_one() {
        let now = Instant::now();
        let mut m = pre_machine(Simple, OnFailure, &["check"]);
        m.boot(now);
        pre_ran(&mut m, 10, Exit::Code(0), now);
        let (old, _) = m.spawned(SpawnRole::Main, 11, now);
        assert_eq!(
            m.restart(Some(RestartMode::Overlap), now).unwrap(),
            pre(SpawnRole::Candidate, 0)
        );
        // Asked again while it runs: nothing more.
        assert!(m
            .restart(Some(RestartMode::Overlap), now)
            .unwrap()
            .is_empty());
        let p = m.pre_spawned(12, now);
        assert_eq!(m.state(), State::Running);
        assert!(m.exited(p, Exit::Code(1), now, false).is_empty());
        assert_says(m.overlap_failure(), "exec-start-pre[0] (check) failed");
        assert_eq!(m.main().unwrap().id, old);
        assert_eq!(m.state(), State::Running);
        // Passes: the candidate spawns, and (simple) takes over at once.
        m.restart(Some(RestartMode::Overlap), now).unwrap();
        let p = m.pre_spawned(13, now);
        assert_eq!(
            m.exited(p, Exit::Code(0), now, false),
            vec![Effect::Spawn(SpawnRole::Candidate)]
        );
        let (_, fx) = m.spawned(SpawnRole::Candidate, 14, now);
        assert_eq!(fx, vec![Effect::Terminate(old)]);
        // The old one dies while a candidate is in its pre command: that start becomes the main one.
        m.restart(Some(RestartMode::Overlap), now).unwrap();
        let p = m.pre_spawned(15, now);
        let main = m.main().unwrap().id;
        assert!(m.exited(main, Exit::Code(1), now, false).is_empty());
        assert_eq!(m.state(), State::Starting);
        assert_eq!(
            m.exited(p, Exit::Code(0), now, false),
            vec![Effect::Spawn(SpawnRole::Main)]
        );
    }

    #[test]
    fn a_pre_command_survives_serialization_for_the_upgrade() {
        let now = Instant::now();
        let (m, a) = pre_running(Simple, OnFailure, &["a", "b"], now);
        let json = serde_json::to_string(&m).unwrap();
        let mut m: Machine = serde_json::from_str(&json).unwrap();
        assert_eq!(
            m.pre_command().map(|(k, i)| (k, i.pid, i.id)),
            Some((0, 10, a))
        );
        assert_eq!(
            m.exited(a, Exit::Code(0), now, false),
            pre(SpawnRole::Main, 1)
        );
        // A machine saved before exec-start-pre existed reads as none running.
        let mut v: serde_json::Value = serde_json::from_str(&json).unwrap();
        v.as_object_mut().unwrap().remove("pre");
        let old: Machine = serde_json::from_value(v).unwrap();
        assert!(old.pre_command().is_none());
    }

    fn with_commands(
        kind: ServiceType,
        restart: RestartPolicy,
        which: CommandKind,
        n: usize,
    ) -> ServiceConfig {
        let mut c = cfg(kind, restart);
        let list = (0..n)
            .map(|k| crate::unit::ExecCommand {
                argv: vec![format!("c{k}")],
                ignore_failure: false,
            })
            .collect();
        match which {
            StartPost => c.commands.start_post = list,
            Stop => c.commands.stop = list,
            Reload => c.commands.reload = list,
        }
        c
    }

    fn command(kind: CommandKind, index: usize) -> Vec<Effect> {
        vec![Effect::SpawnCommand { kind, index }]
    }

    #[test]
    fn start_post_runs_once_ready_and_the_service_is_running_when_it_is_done() {
        let now = Instant::now();
        // simple: at once.
        let mut m = cmd_machine(Simple, OnFailure, StartPost, 2);
        m.boot(now);
        let (main, fx) = m.spawned(SpawnRole::Main, 10, now);
        assert_eq!(fx, command(StartPost, 0));
        assert_eq!(m.state(), State::Starting);
        let p = m.command_spawned(11, now);
        assert_eq!(
            m.exited(p, Exit::Code(0), now, false),
            command(StartPost, 1)
        );
        let p = m.command_spawned(12, now);
        assert!(m.exited(p, Exit::Code(0), now, false).is_empty());
        assert_eq!(m.state(), State::Running);
        assert_eq!(m.main().unwrap().id, main);
        // notify: after READY=1; a second READY=1 meanwhile does not make it running.
        let mut m = cmd_machine(Notify, OnFailure, StartPost, 1);
        m.boot(now);
        let (main, fx) = m.spawned(SpawnRole::Main, 10, now);
        assert!(fx.is_empty());
        assert_eq!(
            m.said(main, Role::Main, vec![Said::Ready], now),
            command(StartPost, 0)
        );
        assert_eq!(m.state(), State::Starting);
        m.said(main, Role::Main, vec![Said::Ready], now);
        assert_eq!(m.state(), State::Starting);
        ran(&mut m, 11, Exit::Code(0), now);
        assert_eq!(m.state(), State::Running);
    }

    #[test]
    fn a_failing_start_post_stops_the_service_as_failed() {
        let now = Instant::now();
        let mut m = cmd_machine(Simple, Never, StartPost, 1);
        let main = started(&mut m, now, 10);
        assert_eq!(
            ran(&mut m, 11, Exit::Code(2), now),
            vec![Effect::Terminate(main)]
        );
        assert_eq!(m.state(), State::Stopping);
        m.exited(main, Exit::Signal(15), now, false);
        assert_eq!(m.state(), State::Failed);
        assert_says(m.failure(), "exec-start-post[0] (c0) failed: exit code 2");
    }

    #[test]
    fn exec_stop_runs_before_kill_signal_and_its_timeout_sends_it() {
        let now = Instant::now();
        let c = with_commands(Simple, Always, Stop, 2);
        let mut m = Machine::new("s", &c, false);
        let main = started(&mut m, now, 10);
        assert_eq!(m.stop(now), command(Stop, 0));
        assert_eq!(m.state(), State::Stopping);
        // Asked again: nothing more.
        assert!(m.stop(now).is_empty());
        let a = m.command_spawned(11, now);
        assert_eq!(m.exited(a, Exit::Code(0), now, false), command(Stop, 1));
        let b = m.command_spawned(12, now);
        assert_eq!(
            m.exited(b, Exit::Code(0), now, false),
            vec![Effect::Terminate(main)]
        );
        assert_eq!(m.timers(now + 1000 * MS, true), vec![Effect::Kill(main)]);
        m.exited(main, Exit::Signal(9), now, false);
        assert_eq!(m.state(), State::Stopped);

        // The main process exits during exec-stop (it was told to): stopped.
        let mut m = Machine::new("s", &c, false);
        let main = started(&mut m, now, 10);
        m.stop(now);
        let a = m.command_spawned(11, now);
        assert!(m.exited(main, Exit::Code(0), now, false).is_empty());
        assert_eq!(m.state(), State::Stopped);
        assert_eq!(m.exited(a, Exit::Code(0), now, false), command(Stop, 1));
        assert_eq!(ran(&mut m, 12, Exit::Code(0), now), released());
        assert!(!m.has_instances());

        // exec-stop hangs: at stop-timeout, kill-signal to both; SIGKILL after another.
        let mut m = Machine::new("s", &c, false);
        let main = started(&mut m, now, 10);
        m.restart(None, now).unwrap();
        let a = m.command_spawned(11, now);
        assert_eq!(
            m.timers(now + 1000 * MS, true),
            vec![Effect::Terminate(a), Effect::Terminate(main)]
        );
        assert_eq!(
            m.timers(now + 2000 * MS, true),
            vec![Effect::Kill(main), Effect::Kill(a)]
        );
        assert!(m
            .exited(a, Exit::Signal(9), now + 2001 * MS, false)
            .is_empty());
        assert_eq!(
            m.exited(main, Exit::Signal(9), now + 2001 * MS, false),
            [released(), vec![Effect::Spawn(SpawnRole::Main)]].concat()
        );
    }

    #[test]
    fn exec_reload_runs_the_commands_and_says_how_it_ended() {
        let now = Instant::now();
        let c = with_commands(Simple, OnFailure, Reload, 2);
        let mut m = Machine::new("s", &c, false);
        started(&mut m, now, 10);
        let (seq, fx) = m.reload(now).unwrap();
        assert_eq!(fx, command(Reload, 0));
        assert_eq!(m.state(), State::Reloading);
        assert!(m.reload(now).unwrap_err().contains("runs its exec-reload"));
        let a = m.command_spawned(11, now);
        assert_eq!(
            m.running_command().map(|(k, i, c)| (k, i, c.pid)),
            Some((Reload, 0, 11))
        );
        m.exited(a, Exit::Code(0), now, false);
        let b = m.command_spawned(12, now);
        assert_eq!(m.reload_outcome(seq), None);
        m.exited(b, Exit::Code(0), now, false);
        assert_eq!(m.reload_outcome(seq), Some(Ok(())));
        assert_eq!(m.state(), State::Running);
        // A failure: the service runs on, the reload failed.
        let (seq, _) = m.reload(now).unwrap();
        ran(&mut m, 13, Exit::Code(1), now);
        assert_says(
            m.reload_outcome(seq).unwrap().err(),
            "exec-reload[0] (c0) failed",
        );
        assert_eq!(m.state(), State::Running);
        assert_eq!(m.restarts(), 0);
        // Nothing to reload with.
        let mut m = machine(Simple, OnFailure);
        started(&mut m, now, 10);
        assert!(m.reload(now).unwrap_err().contains("has no exec-reload"));
        m.stop(now);
        assert!(m
            .reload(now)
            .unwrap_err()
            .contains("only a running service"));
    }

    #[test]
    fn notify_reload_sends_the_signal_and_waits_for_reloading_then_ready() {
        let now = Instant::now();
        let (mut m, main) = ready(NotifyReload, now);
        let (seq, fx) = m.reload(now).unwrap();
        assert_eq!(fx, vec![Effect::ReloadSignal(main)]);
        assert_eq!(m.state(), State::Reloading);
        // READY=1 before RELOADING=1 does not end it.
        m.said(main, Role::Main, vec![Said::Ready], now);
        assert_eq!(m.state(), State::Reloading);
        m.said(main, Role::Main, vec![Said::Reloading], now);
        assert_eq!(m.reload_outcome(seq), None);
        m.said(main, Role::Main, vec![Said::Ready], now);
        assert_eq!(m.state(), State::Running);
        assert_eq!(m.reload_outcome(seq), Some(Ok(())));
        // No answer within start-timeout: failed, running on.
        let (seq, _) = m.reload(now).unwrap();
        assert_eq!(m.deadline(), Some(now + 1000 * MS));
        m.timers(now + 1000 * MS, true);
        assert_says(m.reload_outcome(seq).unwrap().err(), "no RELOADING=1");
        assert_eq!(m.state(), State::Running);
        // The main process exits meanwhile: failed.
        let (seq, _) = m.reload(now).unwrap();
        m.exited(main, Exit::Code(1), now, false);
        assert_says(m.reload_outcome(seq).unwrap().err(), "exited");
    }

    #[test]
    fn a_restart_waits_for_exec_stop_to_end_and_start_post_ends_with_its_main() {
        let now = Instant::now();
        let mut m = cmd_machine(Simple, OnFailure, Stop, 1);
        let main = started(&mut m, now, 10);
        assert_eq!(m.restart(None, now).unwrap(), command(Stop, 0));
        let stop = m.command_spawned(11, now);
        // It stopped the main process itself: the new one waits for exec-stop.
        assert!(m.exited(main, Exit::Code(0), now, false).is_empty());
        assert_eq!(m.deadline(), Some(now + 1000 * MS));
        assert!(m.timers(now + 10 * MS, true).is_empty());
        assert_eq!(
            m.exited(stop, Exit::Code(0), now + 20 * MS, false),
            [released(), vec![Effect::Spawn(SpawnRole::Main)]].concat()
        );

        // The main process dies during exec-start-post: the command is stopped.
        let mut m = cmd_machine(Simple, OnFailure, StartPost, 1);
        let main = started(&mut m, now, 10);
        let post = m.command_spawned(11, now);
        assert_eq!(
            m.exited(main, Exit::Code(1), now, false),
            vec![Effect::Terminate(post)]
        );
        assert_eq!(m.state(), State::Waiting);
        assert_eq!(m.exited(post, Exit::Signal(15), now, false), released());
        assert_eq!(
            m.timers(now + Duration::from_secs(1), true),
            vec![Effect::Spawn(SpawnRole::Main)]
        );
    }
}
