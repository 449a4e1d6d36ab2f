//! The daemon: one thread that owns every service's state and drives it from
//! one poll loop over the signal pipe, the control socket, the services'
//! output pipes and the timers. The only module that joins units, listeners,
//! processes and the control socket.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use serde_json::json;

use crate::control::{self, ConnectionId, Reply, Request};
use crate::dispatch::{self, Binding, DestinationId, Dispatcher};
use crate::listener::{self, Placement, PlacementError};
use crate::service::{AfterExit, Exit, Lifecycle, State};
use crate::spawn::{self, Credentials};
use crate::unit::{self, Protocol, Unit};

/// Lines of output kept per service for `holdfast logs`.
pub const LOG_RING_LINES: usize = 1000;

#[derive(Debug, Clone)]
pub struct Options {
    pub units: PathBuf,
    pub state_dir: PathBuf,
    pub netns: Option<PathBuf>,
    /// `--no-dispatcher`: bind mode only, never load BPF.
    pub no_dispatcher: bool,
    /// The dispatcher's pin directory name; default `netns-<inode>`.
    pub instance: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("{0}")]
    Units(#[from] unit::Diagnostics),
    #[error("cannot create the listeners:\n{}", .0.join("\n"))]
    Listeners(Vec<String>),
    #[error("cannot apply the bindings: {0}")]
    Bindings(#[source] dispatch::DispatchError),
    #[error("{what}: {source}")]
    Setup {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

fn setup(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SupervisorError {
    let what = what.into();
    move |source| SupervisorError::Setup { what, source }
}

/// A socket holdfast keeps open for a service, whatever the service does.
struct Socket {
    name: String,
    protocol: Protocol,
    placement: Placement,
    /// Its sockmap slot, when steered.
    destination: Option<DestinationId>,
    fd: OwnedFd,
}

/// One service at run time.
struct Service {
    unit: Unit,
    sockets: Vec<Socket>,
    life: Lifecycle,
    pid: Option<Pid>,
    started_at: Option<Instant>,
    restarts: u32,
    next_start: Option<Instant>,
    kill_at: Option<Instant>,
    last_exit: Option<Exit>,
    log: VecDeque<String>,
}

impl Service {
    fn name(&self) -> &str {
        &self.unit.name
    }
}

/// A service's stdout or stderr, line by line.
struct Output {
    service: String,
    stream: &'static str,
    fd: OwnedFd,
    partial: Vec<u8>,
}

/// A control request waiting for a service to reach a state.
struct Waiter {
    connection: ConnectionId,
    service: String,
    until: Until,
}

enum Until {
    Down,
    /// Running, with a pid other than this one (a restart's new instance).
    Up {
        not: Option<Pid>,
    },
}

struct Signals {
    pipe: OwnedFd,
    terminate: Arc<AtomicBool>,
    hangup: Arc<AtomicBool>,
}

impl Signals {
    fn register() -> Result<Signals, SupervisorError> {
        let (r, w) = std::os::unix::net::UnixStream::pair().map_err(setup("signal pipe"))?;
        r.set_nonblocking(true).map_err(setup("signal pipe"))?;
        w.set_nonblocking(true).map_err(setup("signal pipe"))?;
        let terminate = Arc::new(AtomicBool::new(false));
        let hangup = Arc::new(AtomicBool::new(false));
        for sig in [libc::SIGTERM, libc::SIGINT] {
            signal_hook::flag::register(sig, terminate.clone()).map_err(setup("signal handler"))?;
        }
        signal_hook::flag::register(libc::SIGHUP, hangup.clone())
            .map_err(setup("signal handler"))?;
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGCHLD] {
            let w = w.try_clone().map_err(setup("signal pipe"))?;
            signal_hook::low_level::pipe::register(sig, w).map_err(setup("signal handler"))?;
        }
        Ok(Signals {
            pipe: OwnedFd::from(r),
            terminate,
            hangup,
        })
    }

    fn drain(&self) {
        let mut buf = [0u8; 256];
        while matches!(nix::unistd::read(self.pipe.as_raw_fd(), &mut buf), Ok(n) if n > 0) {}
    }
}

pub struct Supervisor {
    services: Vec<Service>,
    outputs: Vec<Output>,
    waiters: Vec<Waiter>,
    server: Option<control::Server>,
    shutting_down: bool,
    base_path: Option<OsString>,
    dispatcher: Option<Dispatcher>,
    bindings: Vec<Binding>,
}

/// Runs the daemon until SIGTERM/SIGINT has stopped every service.
pub fn run(opts: &Options) -> Result<(), SupervisorError> {
    spawn::ensure_stdio();
    let units = unit::load_dir(&opts.units)?;
    if let Some(netns) = &opts.netns {
        enter_netns(netns)?;
    }
    std::fs::create_dir_all(&opts.state_dir)
        .map_err(setup(format!("state dir {}", opts.state_dir.display())))?;

    let (mut dispatcher, why_not) = if opts.no_dispatcher {
        (None, "--no-dispatcher was given".to_string())
    } else {
        let instance = opts.instance.clone().unwrap_or_else(default_instance);
        match Dispatcher::attach(&instance, Path::new("/proc/self/ns/net")) {
            Ok(d) => (Some(d), String::new()),
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    "BPF is not available: falling back to bind mode, where a socket can only have one address and one port"
                );
                (None, format!("BPF is not available ({e})"))
            }
        }
    };
    let services = match create_listeners(units, dispatcher.is_some(), &why_not) {
        Ok(s) => s,
        Err(e) => {
            if let Some(d) = dispatcher.take() {
                let _ = d.detach();
            }
            return Err(e);
        }
    };
    let bindings = bindings_of(&services);
    if let Some(d) = dispatcher.as_mut() {
        if let Err(e) = steer(d, &services, &bindings) {
            if let Some(d) = dispatcher.take() {
                let _ = d.detach();
            }
            return Err(e);
        }
    }

    let signals = Signals::register()?;
    // SAFETY: PR_SET_CHILD_SUBREAPER takes an int flag and no pointers.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return Err(setup("prctl(PR_SET_CHILD_SUBREAPER)")(
            std::io::Error::last_os_error(),
        ));
    }
    let mut sup = Supervisor {
        services,
        outputs: Vec::new(),
        waiters: Vec::new(),
        server: None,
        shutting_down: false,
        base_path: std::env::var_os("PATH"),
        dispatcher,
        bindings,
    };
    let now = Instant::now();
    for i in 0..sup.services.len() {
        sup.start(i, now);
    }
    sup.server = Some(
        control::Server::bind(&opts.state_dir).map_err(setup(format!(
            "control socket in {}",
            opts.state_dir.display()
        )))?,
    );
    tracing::info!(
        services = sup.services.len(),
        control = %control::socket_path(&opts.state_dir).display(),
        "holdfast is up"
    );
    sup.event_loop(&signals);
    tracing::info!("every service is down; exiting");
    if let Some(d) = sup.dispatcher.take() {
        if let Err(e) = d.detach() {
            tracing::warn!(error = %e, "cannot detach the dispatcher cleanly");
        }
    }
    Ok(())
}

/// The default dispatcher instance: one per network namespace.
fn default_instance() -> String {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata("/proc/self/ns/net") {
        Ok(m) => format!("netns-{}", m.ino()),
        Err(_) => "default".to_string(),
    }
}

/// Every steered socket's bindings: `addresses × ports`.
fn bindings_of(services: &[Service]) -> Vec<Binding> {
    let mut out = Vec::new();
    for svc in services {
        for (cfg, sock) in svc.unit.sockets.iter().zip(&svc.sockets) {
            let Some(destination) = sock.destination else {
                continue;
            };
            for (prefix, ports) in cfg.bindings() {
                out.push(Binding {
                    service: svc.unit.name.clone(),
                    socket: cfg.name.clone(),
                    protocol: cfg.protocol,
                    prefix,
                    ports,
                    destination,
                });
            }
        }
    }
    out
}

/// Puts every steered socket in the sockmap, then publishes the bindings:
/// sockets first, so no binding ever points at an empty slot.
fn steer(
    d: &mut Dispatcher,
    services: &[Service],
    bindings: &[Binding],
) -> Result<(), SupervisorError> {
    for sock in services.iter().flat_map(|s| &s.sockets) {
        if let Some(dest) = sock.destination {
            d.insert_socket(dest, sock.fd.as_fd())
                .map_err(SupervisorError::Bindings)?;
        }
    }
    d.apply(bindings).map_err(SupervisorError::Bindings)
}

fn enter_netns(path: &Path) -> Result<(), SupervisorError> {
    let f = std::fs::File::open(path).map_err(setup(format!("netns {}", path.display())))?;
    nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| setup(format!("setns({})", path.display()))(e.into()))
}

/// Creates every unit's sockets before any service starts; on any failure,
/// reports all of them and starts nothing.
fn create_listeners(
    units: Vec<Unit>,
    dispatcher: bool,
    why_not: &str,
) -> Result<Vec<Service>, SupervisorError> {
    let mut errors = Vec::new();
    let mut services = Vec::new();
    let mut next_destination: DestinationId = 0;
    for unit in units {
        let mut sockets = Vec::new();
        for cfg in &unit.sockets {
            let placement = match Placement::for_socket(cfg, dispatcher) {
                Ok(p) => p,
                Err(e @ PlacementError::NeedsDispatcher) => {
                    errors.push(format!(
                        "{}: socket {:?}: {e}; {why_not}; declare one address (a /32 or /128) and one port, or run where BPF is available",
                        unit.path.display(),
                        cfg.name
                    ));
                    continue;
                }
                Err(e) => {
                    errors.push(format!(
                        "{}: socket {:?}: {e}",
                        unit.path.display(),
                        cfg.name
                    ));
                    continue;
                }
            };
            let destination = matches!(placement, Placement::Steered { .. }).then(|| {
                next_destination += 1;
                next_destination - 1
            });
            match listener::create(cfg, &placement) {
                Ok(fd) => sockets.push(Socket {
                    name: cfg.name.clone(),
                    protocol: cfg.protocol,
                    placement,
                    destination,
                    fd,
                }),
                Err(e) => errors.push(format!(
                    "{}: service {}: socket {:?}: {e}",
                    unit.path.display(),
                    unit.name,
                    cfg.name
                )),
            }
        }
        let life = Lifecycle::new(&unit.service);
        services.push(Service {
            unit,
            sockets,
            life,
            pid: None,
            started_at: None,
            restarts: 0,
            next_start: None,
            kill_at: None,
            last_exit: None,
            log: VecDeque::new(),
        });
    }
    if errors.is_empty() {
        Ok(services)
    } else {
        Err(SupervisorError::Listeners(errors))
    }
}

impl Supervisor {
    fn event_loop(&mut self, signals: &Signals) {
        loop {
            if self.shutting_down && self.services.iter().all(|s| s.pid.is_none()) {
                return;
            }
            let timeout = self.next_deadline().map_or(1000, |d| {
                d.saturating_duration_since(Instant::now())
                    .as_millis()
                    .min(1000) as u16
            });
            let ready = self.poll(signals, timeout);
            if ready.signal {
                signals.drain();
            }
            if signals.terminate.swap(false, Ordering::SeqCst) && !self.shutting_down {
                tracing::info!("stopping every service");
                self.shutting_down = true;
                let now = Instant::now();
                for i in 0..self.services.len() {
                    self.stop(i, now);
                }
            }
            if signals.hangup.swap(false, Ordering::SeqCst) {
                tracing::warn!(
                    "SIGHUP: reload is not implemented yet; the running configuration stays"
                );
            }
            self.reap();
            self.read_outputs(&ready.outputs);
            self.serve_control();
            self.run_timers(Instant::now());
            self.answer_waiters();
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.services
            .iter()
            .flat_map(|s| [s.next_start, s.kill_at])
            .flatten()
            .min()
    }

    fn poll(&self, signals: &Signals, timeout_ms: u16) -> Ready {
        let mut fds = vec![PollFd::new(signals.pipe.as_fd(), PollFlags::POLLIN)];
        if let Some(server) = &self.server {
            for (fd, write) in server.poll_fds() {
                let flags = if write {
                    PollFlags::POLLOUT
                } else {
                    PollFlags::POLLIN
                };
                fds.push(PollFd::new(fd, flags));
            }
        }
        let first_output = fds.len();
        for o in &self.outputs {
            fds.push(PollFd::new(o.fd.as_fd(), PollFlags::POLLIN));
        }
        match nix::poll::poll(&mut fds, PollTimeout::from(timeout_ms)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => tracing::warn!(error = %e, "poll failed"),
        }
        let readable = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
        Ready {
            signal: readable(&fds[0]),
            outputs: fds[first_output..].iter().map(readable).collect(),
        }
    }

    fn find(&self, name: &str) -> Option<usize> {
        self.services.iter().position(|s| s.name() == name)
    }

    /// Starts service `i` now, subject to its start limit.
    fn start(&mut self, i: usize, now: Instant) {
        let base_path = self.base_path.clone();
        let svc = &mut self.services[i];
        svc.next_start = None;
        if !svc.life.start_limit.try_start(now) {
            tracing::error!(
                service = %svc.name(),
                burst = svc.unit.service.start_limit_burst,
                interval = ?svc.unit.service.start_limit_interval,
                "start limit hit: the service is failed and left alone until `holdfast start`"
            );
            svc.life.state = State::Failed;
            return;
        }
        match spawn_service(svc, base_path.as_deref()) {
            Ok((pid, out, err)) => {
                tracing::info!(service = %svc.name(), pid = pid.as_raw(), "started");
                svc.pid = Some(pid);
                svc.started_at = Some(now);
                svc.life.state = State::Running;
                let name = svc.name().to_string();
                self.outputs.push(Output {
                    service: name.clone(),
                    stream: "stdout",
                    fd: out,
                    partial: Vec::new(),
                });
                self.outputs.push(Output {
                    service: name,
                    stream: "stderr",
                    fd: err,
                    partial: Vec::new(),
                });
            }
            Err(e) => {
                tracing::error!(service = %svc.name(), error = %e, "cannot start");
                svc.last_exit = Some(Exit::Code(127));
                match svc.life.after_exit(Exit::Code(127), Duration::ZERO, now) {
                    AfterExit::RestartAt(t) => {
                        svc.life.state = State::Waiting;
                        svc.next_start = Some(t);
                    }
                    AfterExit::Stay(_) => svc.life.state = State::Failed,
                }
            }
        }
    }

    /// SIGTERM to the service's process group; SIGKILL at its stop timeout.
    fn stop(&mut self, i: usize, now: Instant) {
        let svc = &mut self.services[i];
        svc.next_start = None;
        match svc.pid {
            Some(pid) => {
                svc.life.stop_requested = true;
                svc.life.restart_requested = false;
                if svc.life.state != State::Stopping {
                    terminate(svc.name(), pid);
                    svc.life.state = State::Stopping;
                    svc.kill_at = Some(now + svc.unit.service.stop_timeout);
                }
            }
            None => {
                if matches!(
                    svc.life.state,
                    State::Waiting | State::Starting | State::Running
                ) {
                    svc.life.state = State::Stopped;
                }
            }
        }
    }

    fn restart(&mut self, i: usize, now: Instant) {
        let svc = &mut self.services[i];
        match svc.pid {
            Some(pid) => {
                svc.life.restart_requested = true;
                svc.life.stop_requested = false;
                if svc.life.state != State::Stopping {
                    terminate(svc.name(), pid);
                    svc.life.state = State::Stopping;
                    svc.kill_at = Some(now + svc.unit.service.stop_timeout);
                }
            }
            None => {
                svc.life.reset();
                self.start(i, now);
            }
        }
    }

    fn reap(&mut self) {
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
        let Some(i) = self.services.iter().position(|s| s.pid == Some(pid)) else {
            tracing::debug!(pid = pid.as_raw(), %exit, "reaped an orphan");
            return;
        };
        let now = Instant::now();
        let svc = &mut self.services[i];
        // Whatever the main process left behind in its group goes with it.
        let _ = killpg(pid, Signal::SIGKILL);
        let uptime = svc
            .started_at
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
        svc.pid = None;
        svc.started_at = None;
        svc.kill_at = None;
        svc.last_exit = Some(exit);
        let after = if self.shutting_down {
            svc.life.stop_requested = false;
            AfterExit::Stay(State::Stopped)
        } else {
            svc.life.after_exit(exit, uptime, now)
        };
        match after {
            AfterExit::RestartAt(t) => {
                svc.restarts += 1;
                svc.life.state = State::Waiting;
                svc.next_start = Some(t);
                tracing::info!(
                    service = %svc.name(), pid = pid.as_raw(), %exit,
                    delay_ms = t.saturating_duration_since(now).as_millis() as u64,
                    "exited; restarting"
                );
            }
            AfterExit::Stay(state) => {
                svc.life.state = state;
                tracing::info!(service = %svc.name(), pid = pid.as_raw(), %exit, state = state.as_str(), "exited");
            }
        }
        if svc.next_start.is_some_and(|t| t <= now) {
            self.start(i, now);
        }
    }

    fn run_timers(&mut self, now: Instant) {
        for i in 0..self.services.len() {
            let svc = &mut self.services[i];
            if svc.kill_at.is_some_and(|t| t <= now) {
                svc.kill_at = None;
                if let Some(pid) = svc.pid {
                    tracing::warn!(service = %svc.name(), pid = pid.as_raw(), "did not stop in time; sending SIGKILL to its process group");
                    let _ = killpg(pid, Signal::SIGKILL);
                }
            }
            if self.services[i].next_start.is_some_and(|t| t <= now) && !self.shutting_down {
                self.start(i, now);
            }
        }
    }

    fn read_outputs(&mut self, ready: &[bool]) {
        let mut closed = Vec::new();
        for (k, o) in self.outputs.iter_mut().enumerate() {
            if !ready.get(k).copied().unwrap_or(false) {
                continue;
            }
            let mut buf = [0u8; 8192];
            loop {
                match nix::unistd::read(o.fd.as_raw_fd(), &mut buf) {
                    Ok(0) => {
                        closed.push(k);
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
            if o.partial.len() > 16 * 1024 || (closed.last() == Some(&k) && !o.partial.is_empty()) {
                lines.push(String::from_utf8_lossy(&o.partial).into_owned());
                o.partial.clear();
            }
            for line in lines {
                tracing::info!(service = %o.service, stream = o.stream, "{line}");
                if let Some(s) = self.services.iter_mut().find(|s| s.unit.name == o.service) {
                    if s.log.len() >= LOG_RING_LINES {
                        s.log.pop_front();
                    }
                    s.log.push_back(line);
                }
            }
        }
        for k in closed.into_iter().rev() {
            self.outputs.remove(k);
        }
    }

    fn serve_control(&mut self) {
        let Some(server) = self.server.as_mut() else {
            return;
        };
        let requests = server.service();
        let now = Instant::now();
        for (conn, request) in requests {
            let reply = self.handle(conn, request, now);
            if let Some(reply) = reply {
                if let Some(server) = self.server.as_mut() {
                    server.reply(conn, &reply);
                }
            }
        }
    }

    /// Answers a request, or registers a waiter and returns `None`.
    fn handle(&mut self, conn: ConnectionId, request: Request, now: Instant) -> Option<Reply> {
        let named = |name: &str| -> Result<usize, Reply> {
            self.find(name)
                .ok_or_else(|| Reply::error(format!("no service named {name:?}")))
        };
        match request {
            Request::Status { name } => Some(match name {
                None => Reply::ok(json!(self
                    .services
                    .iter()
                    .map(|s| status_of(s, now))
                    .collect::<Vec<_>>())),
                Some(n) => match named(&n) {
                    Ok(i) => Reply::ok(json!([status_of(&self.services[i], now)])),
                    Err(r) => r,
                },
            }),
            Request::Start { name } => {
                let i = match named(&name) {
                    Ok(i) => i,
                    Err(r) => return Some(r),
                };
                if self.shutting_down {
                    return Some(Reply::error("holdfast is shutting down"));
                }
                let svc = &mut self.services[i];
                match svc.life.state {
                    State::Running | State::Starting => {
                        return Some(Reply::ok(status_of(svc, now)))
                    }
                    State::Stopping => {
                        // Start again once it is down.
                        svc.life.stop_requested = false;
                        svc.life.restart_requested = true;
                    }
                    State::Waiting | State::Stopped | State::Failed => {
                        svc.life.reset();
                        self.start(i, now);
                    }
                }
                self.waiters.push(Waiter {
                    connection: conn,
                    service: name,
                    until: Until::Up { not: None },
                });
                None
            }
            Request::Stop { name } => {
                let i = match named(&name) {
                    Ok(i) => i,
                    Err(r) => return Some(r),
                };
                self.stop(i, now);
                self.waiters.push(Waiter {
                    connection: conn,
                    service: name,
                    until: Until::Down,
                });
                None
            }
            Request::Restart { name, mode: _ } => {
                let i = match named(&name) {
                    Ok(i) => i,
                    Err(r) => return Some(r),
                };
                if self.shutting_down {
                    return Some(Reply::error("holdfast is shutting down"));
                }
                let old = self.services[i].pid;
                self.restart(i, now);
                self.waiters.push(Waiter {
                    connection: conn,
                    service: name,
                    until: Until::Up { not: old },
                });
                None
            }
            Request::Bindings => Some(self.bindings_reply()),
        }
    }

    fn bindings_reply(&self) -> Reply {
        let Some(d) = &self.dispatcher else {
            return Reply::error(
                "the sk_lookup dispatcher is not active: every socket is bound directly (see `holdfast status`)",
            );
        };
        let counters = match d.counters() {
            Ok(c) => c,
            Err(e) => return Reply::error(format!("cannot read the counters: {e}")),
        };
        let rows: Vec<serde_json::Value> = self
            .bindings
            .iter()
            .map(|b| {
                let c = counters.get(&b.destination).copied().unwrap_or_default();
                json!({
                    "service": b.service,
                    "socket": b.socket,
                    "protocol": b.protocol.as_str(),
                    "prefix": b.prefix.to_string(),
                    "ports": b.ports.to_string(),
                    "destination": b.destination,
                    "socket_present": d.socket_present(b.destination),
                    "lookups": c.lookups,
                    "misses": c.misses,
                    "errors": c.errors,
                })
            })
            .collect();
        Reply::ok(json!(rows))
    }

    fn answer_waiters(&mut self) {
        let now = Instant::now();
        let mut answered = Vec::new();
        for (k, w) in self.waiters.iter().enumerate() {
            let Some(svc) = self.services.iter().find(|s| s.unit.name == w.service) else {
                answered.push((k, Reply::error(format!("service {:?} is gone", w.service))));
                continue;
            };
            let state = svc.life.state;
            let reply = match w.until {
                Until::Down => matches!(state, State::Stopped | State::Failed)
                    .then(|| Reply::ok(status_of(svc, now))),
                Until::Up { not } => match state {
                    State::Running if svc.pid != not => Some(Reply::ok(status_of(svc, now))),
                    State::Failed => Some(Reply::error(format!(
                        "service {:?} failed to start{}",
                        w.service,
                        svc.last_exit.map(|e| format!(" ({e})")).unwrap_or_default()
                    ))),
                    State::Stopped if !self.shutting_down => Some(Reply::error(format!(
                        "service {:?} stopped{}",
                        w.service,
                        svc.last_exit.map(|e| format!(" ({e})")).unwrap_or_default()
                    ))),
                    _ if self.shutting_down => Some(Reply::error("holdfast is shutting down")),
                    _ => None,
                },
            };
            if let Some(r) = reply {
                answered.push((k, r));
            }
        }
        for (k, reply) in answered.into_iter().rev() {
            let w = self.waiters.remove(k);
            if let Some(server) = self.server.as_mut() {
                server.reply(w.connection, &reply);
            }
        }
    }
}

struct Ready {
    signal: bool,
    outputs: Vec<bool>,
}

fn terminate(name: &str, pid: Pid) {
    tracing::info!(service = %name, pid = pid.as_raw(), "stopping: SIGTERM to its process group");
    let _ = killpg(pid, Signal::SIGTERM);
    let _ = killpg(pid, Signal::SIGCONT);
}

fn spawn_service(
    svc: &Service,
    base_path: Option<&std::ffi::OsStr>,
) -> Result<(Pid, OwnedFd, OwnedFd), spawn::SpawnError> {
    let cfg = &svc.unit.service;
    let path_var: Option<OsString> = cfg
        .environment
        .get("PATH")
        .map(OsString::from)
        .or_else(|| base_path.map(|p| p.to_os_string()));
    let program = spawn::resolve_program(&cfg.exec[0], path_var.as_deref())?;
    let credentials = Credentials::resolve(cfg.user.as_deref(), cfg.group.as_deref())?;
    let (out_r, out_w) = spawn::output_pipe()?;
    let (err_r, err_w) = spawn::output_pipe()?;
    let mut env: Vec<(String, OsString)> = Vec::new();
    if let Some(p) = &path_var {
        env.push(("PATH".into(), p.clone()));
    }
    for (k, v) in &cfg.environment {
        env.push((k.clone(), v.into()));
    }
    let fds: Vec<(BorrowedFd<'_>, &str)> = svc
        .sockets
        .iter()
        .map(|s| (s.fd.as_fd(), s.name.as_str()))
        .collect();
    let cmd = spawn::Command {
        program: &program,
        argv: &cfg.exec,
        env,
        fds,
        stdout: out_w.as_fd(),
        stderr: err_w.as_fd(),
        credentials: credentials.as_ref(),
        working_directory: cfg.working_directory.as_deref(),
    };
    let pid = spawn::spawn(&cmd)?;
    Ok((pid, out_r, err_r))
}

fn status_of(s: &Service, now: Instant) -> serde_json::Value {
    json!({
        "name": s.unit.name,
        "state": s.life.state.as_str(),
        "pid": s.pid.map(|p| p.as_raw()),
        "restarts": s.restarts,
        "uptime_secs": s.started_at.map(|t| now.saturating_duration_since(t).as_secs_f64()),
        "last_exit": s.last_exit.map(|e| e.to_string()),
        "sockets": s.sockets.iter().map(|k| k.name.clone()).collect::<Vec<_>>(),
        "listeners": s.sockets.iter().map(|k| json!({
            "name": k.name,
            "protocol": k.protocol.as_str(),
            "placement": match &k.placement {
                Placement::Bound(a) => format!("bound {a}"),
                Placement::Steered { .. } => format!(
                    "steered (kernel socket {})",
                    listener::local_addr(&k.fd).map(|a| a.to_string()).unwrap_or_default()
                ),
                Placement::Unix(p) => format!("unix {}", p.display()),
            },
        })).collect::<Vec<_>>(),
    })
}
