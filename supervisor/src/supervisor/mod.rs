//! The daemon: one thread that owns every service's state and drives it from
//! one epoll loop over the signal pipe, the control socket, the services'
//! notify sockets, listeners and output pipes, and the timers. The only
//! module that joins units, listeners, the dispatcher, processes and the
//! control socket. What can happen to a service is decided in
//! `crate::service::Machine`; this layer carries it out.

mod acceptor;
mod doors;
mod inetd;
mod output;
mod poller;
mod recovery;
mod registry;
mod reload;
mod requests;
mod services;
mod sockets;
mod tracking;
mod upgrade;

use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::control;
use crate::dispatch::{self, Binding, Dispatcher};
use crate::metrics;
use crate::spawn;
use crate::unit;

use output::Outputs;
use poller::{Poller, Token};
use registry::{Registry, ServiceId};
use requests::Waiter;
use services::Service;
use sockets::Destinations;

pub use output::LOG_RING_LINES;
pub use upgrade::{accepts as accepts_state_version, STATE_VERSION};

#[derive(Debug, Clone)]
pub struct Options {
    pub units: PathBuf,
    pub state_dir: PathBuf,
    pub netns: Option<PathBuf>,
    /// `--no-dispatcher`: bind mode only, never load BPF.
    pub no_dispatcher: bool,
    /// The dispatcher's pin directory name; default `netns-<inode>`.
    pub instance: Option<String>,
    /// Serve Prometheus metrics over HTTP here.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Track services by cgroup v2 under this cgroup (a directory under
    /// the cgroup2 mount, or a path as /proc/self/cgroup shows it).
    pub cgroup_root: Option<PathBuf>,
    /// `--no-cgroups`: track services by process group only.
    pub no_cgroups: bool,
    /// Forward services' output to the journald socket at this path when
    /// one is there at start (`--journal auto`); `None`: `--journal off`.
    pub journal: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("{0}")]
    Units(#[from] unit::Diagnostics),
    #[error("cannot create the listeners:\n{}", .0.join("\n"))]
    Listeners(Vec<String>),
    #[error("cannot apply the bindings: {0}")]
    Bindings(#[source] dispatch::DispatchError),
    #[error(transparent)]
    Lock(#[from] crate::instance_lock::LockError),
    #[error(transparent)]
    StateDir(#[from] crate::statedir::StateDirError),
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

struct Signals {
    pipe: OwnedFd,
    terminate: Arc<AtomicBool>,
    hangup: Arc<AtomicBool>,
    /// SIGUSR2: upgrade in place.
    upgrade: Arc<AtomicBool>,
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
        let upgrade = Arc::new(AtomicBool::new(false));
        signal_hook::flag::register(crate::signals::UPGRADE_SIGNAL, upgrade.clone())
            .map_err(setup("signal handler"))?;
        for sig in [
            libc::SIGTERM,
            libc::SIGINT,
            libc::SIGHUP,
            libc::SIGCHLD,
            crate::signals::UPGRADE_SIGNAL,
        ] {
            let w = w.try_clone().map_err(setup("signal pipe"))?;
            signal_hook::low_level::pipe::register(sig, w).map_err(setup("signal handler"))?;
        }
        Ok(Signals {
            pipe: OwnedFd::from(r),
            terminate,
            hangup,
            upgrade,
        })
    }

    fn drain(&self) {
        let mut buf = [0u8; 256];
        while matches!(nix::unistd::read(self.pipe.as_raw_fd(), &mut buf), Ok(n) if n > 0) {}
    }
}

/// Everything the daemon owns.
pub struct Supervisor {
    opts: Options,
    /// Every service, live or retiring (removed by a reload, still stopping).
    registry: Registry,
    poller: Poller,
    outputs: Outputs,
    waiters: Vec<Waiter>,
    server: Option<control::Server>,
    /// Held for as long as the daemon runs (and across an upgrade's exec).
    lock: Option<crate::instance_lock::InstanceLock>,
    shutting_down: bool,
    base_path: Option<OsString>,
    dispatcher: Option<Dispatcher>,
    /// Why there is no dispatcher, for error messages.
    why_not: String,
    destinations: Destinations,
    bindings: Vec<Binding>,
    /// How many sockets services held at the last turn (`refresh_refusals`).
    open_sockets: usize,
    metrics: Option<metrics::Endpoint>,
    /// holdfast's own manager (systemd): readiness, status, watchdog, fd store.
    manager: crate::manager::Manager,
    /// The cgroup tree services run in; `None`: process-group mode.
    cgroups: Option<crate::cgroup::Hierarchy>,
    /// Where services' output lines are forwarded too, if anywhere.
    journal: Option<crate::journal::Journal>,
}

/// Runs the daemon until SIGTERM/SIGINT has stopped every service.
pub fn run(opts: &Options) -> Result<(), SupervisorError> {
    spawn::ensure_stdio();
    // Low fd numbers for spawns to hand fds over in, taken before holdfast
    // holds thousands (a child then copies only those: see spawn's slots).
    spawn::reserve_low_fds();
    let unused_signals = crate::signals::catch_unused().map_err(setup("signal handler"))?;
    if let Some(saved) = upgrade::inherited()? {
        let sup = upgrade::resume(opts, saved)?;
        return sup.serve(unused_signals, false);
    }
    // Before any thread starts: it changes the environment.
    let mut inherited = crate::manager::Inherited::from_env();
    if !opts.no_dispatcher {
        // The kernel's BTF is parsed while the units are read and checked.
        dispatch::warm_up();
    }
    let units = unit::load_dir(&opts.units)?;
    crate::preflight::check_units(
        &units,
        &opts.state_dir,
        std::env::var_os("PATH").as_deref(),
        None,
    )?;
    if let Some(netns) = &opts.netns {
        sockets::enter_netns(netns)?;
    }
    // The state dir and its subdirectories exist with their modes and are
    // real directories of root's, before anything is created in them by name
    // (the lock file first).
    crate::statedir::prepare(&opts.state_dir)?;
    // Before anything a live holdfast uses (pins, links, sockets, state dir).
    let netns_lock = (!opts.no_dispatcher).then_some(Path::new("/proc/thread-self/ns/net"));
    let instance_lock = crate::instance_lock::acquire(&opts.state_dir, netns_lock)?;

    // Whether sockets are steered is settled before any is made; the
    // program is attached once they are all in its maps (below).
    let why_not = why_no_dispatcher(opts);
    // What a holdfast that died here left running: its listeners taken back
    // (used below in place of new ones), its processes stopped. A dead
    // holdfast's sk_lookup program keeps steering to those listeners
    // meanwhile, so what arrives waits in their backlogs.
    recovery::recover(&opts.state_dir, &units, &mut inherited);
    let mut sup = Supervisor::new(opts, Some(instance_lock), Destinations::default())?;
    sup.why_not = why_not.clone().unwrap_or_default();
    if let Err(e) = sup.open_all(units, &mut inherited, why_not.is_none()) {
        sup.detach();
        return Err(e);
    }
    if why_not.is_none() {
        let instance = opts
            .instance
            .clone()
            .unwrap_or_else(sockets::default_instance);
        // Attached beside a dead holdfast's program, filled, and only then
        // does the old one go: no lookup falls between them.
        sup.attach_filled(&instance, None)
            .map_err(SupervisorError::Bindings)?;
    }
    inherited.close_unclaimed();
    sup.sync_fd_store();

    if let Some(addr) = opts.metrics_listen {
        if let Err(e) = sup.serve_metrics(addr) {
            sup.detach();
            return Err(e);
        }
    }
    match control::Server::bind(&opts.state_dir) {
        Ok(s) => sup.server = Some(s),
        Err(e) => {
            sup.detach();
            return Err(setup(format!(
                "control socket in {}",
                opts.state_dir.display()
            ))(e));
        }
    }
    sup.serve(unused_signals, true)
}

/// Why there will be no dispatcher (`--no-dispatcher`, or BPF cannot be
/// loaded here: said once), or `None`: sockets are steered.
fn why_no_dispatcher(opts: &Options) -> Option<String> {
    if opts.no_dispatcher {
        return Some("--no-dispatcher was given".to_string());
    }
    dispatch::probe().err().map(|e| {
        let why = error_chain(&e);
        tracing::warn!(
            error = %why,
            "BPF is not available: falling back to bind mode, where a socket can only have one address and one port"
        );
        format!("BPF is not available ({why})")
    })
}

/// An error with its whole chain of causes (a cause its message already
/// quotes is not repeated): the cause (EPERM, no bpffs…) is what says why.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut why = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !why.contains(&text) {
            why.push_str(": ");
            why.push_str(&text);
        }
        source = cause.source();
    }
    why
}

/// The cgroup tree services run in (`--cgroup-root`, else under holdfast's
/// own cgroup), or `None`: process-group mode (`--no-cgroups`, or cgroup v2
/// not writable, said once).
fn cgroup_hierarchy(opts: &Options) -> Option<crate::cgroup::Hierarchy> {
    if opts.no_cgroups {
        tracing::info!("--no-cgroups: tracking services by process group, the weaker mode (a process that calls setsid escapes stop)");
        return None;
    }
    match crate::cgroup::detect(opts.cgroup_root.as_deref()) {
        crate::cgroup::Mode::Cgroup2(h) => Some(h),
        crate::cgroup::Mode::ProcessGroups => None,
    }
}

impl Supervisor {
    /// A daemon with no service yet, no dispatcher, no control socket.
    fn new(
        opts: &Options,
        lock: Option<crate::instance_lock::InstanceLock>,
        destinations: Destinations,
    ) -> Result<Supervisor, SupervisorError> {
        Ok(Supervisor {
            opts: opts.clone(),
            registry: Registry::default(),
            poller: Poller::new().map_err(setup("epoll"))?,
            outputs: Outputs::default(),
            waiters: Vec::new(),
            server: None,
            lock,
            shutting_down: false,
            base_path: std::env::var_os("PATH"),
            dispatcher: None,
            why_not: String::new(),
            destinations,
            bindings: Vec::new(),
            open_sockets: 0,
            metrics: None,
            manager: crate::manager::Manager::from_env(Instant::now()),
            cgroups: cgroup_hierarchy(opts),
            journal: output::open_journal(opts.journal.as_deref()),
        })
    }

    fn serve_metrics(&mut self, addr: std::net::SocketAddr) -> Result<(), SupervisorError> {
        match metrics::Endpoint::serve(addr) {
            Ok(e) => {
                tracing::info!(addr = %e.addr(), "serving metrics at http://{}/metrics", e.addr());
                self.metrics = Some(e);
                Ok(())
            }
            Err(e) => Err(setup(format!("--metrics-listen {addr}"))(
                std::io::Error::other(e.to_string()),
            )),
        }
    }

    /// The rest of a start (or of an upgrade, `boot` false: the services
    /// already run): signals, the event loop's fds, the subreaper, booting
    /// the services, then the loop until every service is down.
    fn serve(
        mut self,
        unused_signals: crate::signals::Unused,
        boot: bool,
    ) -> Result<(), SupervisorError> {
        let signals = Signals::register()?;
        self.record_for_recovery();
        // An upgrade execs with every signal blocked; handlers are in place now.
        upgrade::unblock_signals();
        let mut watch = vec![(signals.pipe.as_fd(), Token::Signal)];
        if let Some(m) = &self.metrics {
            watch.push((m.wake_fd(), Token::Metrics));
        }
        if let Some(s) = &self.server {
            watch.push((s.as_fd(), Token::Control));
        }
        for (fd, token) in watch {
            self.poller.add(fd, token).map_err(setup("epoll"))?;
        }
        // SAFETY: PR_SET_CHILD_SUBREAPER takes an int flag and no pointers.
        if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
            self.detach();
            return Err(setup("prctl(PR_SET_CHILD_SUBREAPER)")(
                std::io::Error::last_os_error(),
            ));
        }
        if boot {
            let now = Instant::now();
            for id in self.registry.live_ids() {
                self.act(id, now, |m| m.boot(now));
            }
        }
        tracing::info!(
            services = self.registry.live_count(),
            control = %control::socket_path(&self.opts.state_dir).display(),
            "holdfast is up"
        );
        self.update_status();
        self.manager.ready();
        self.event_loop(&signals, &unused_signals);
        self.close_cgroups();
        drop(self.cgroups.take());
        recovery::forget(&self.opts.state_dir);
        tracing::info!("every service is down; exiting");
        self.detach();
        Ok(())
    }

    /// Opens every unit's sockets before any service starts, and steers the
    /// steered ones; on any failure reports all of them and starts nothing.
    fn open_all(
        &mut self,
        units: Vec<unit::Unit>,
        inherited: &mut crate::manager::Inherited,
        steered: bool,
    ) -> Result<(), SupervisorError> {
        let mut errors = Vec::new();
        for unit in units {
            let mut socks = Vec::new();
            for cfg in &unit.sockets {
                match sockets::open(
                    &unit,
                    cfg,
                    steered,
                    &self.why_not,
                    &mut self.destinations,
                    inherited,
                    &[],
                ) {
                    Ok(s) => socks.push(s),
                    Err(e) => errors.push(e),
                }
            }
            match Service::new(unit, socks, &self.opts.state_dir) {
                Ok(svc) => {
                    self.add_service(svc);
                }
                Err((e, _)) => errors.push(e),
            }
        }
        if !errors.is_empty() {
            return Err(SupervisorError::Listeners(errors));
        }
        self.bindings = sockets::bindings_of(self.registry.live().map(|(_, s)| s));
        Ok(())
    }

    /// At exit: kills what is left in each service's cgroups (a process
    /// that left its instance's process group) and removes them.
    fn close_cgroups(&mut self) {
        for id in self.registry.all_ids() {
            if let Some(svc) = self.registry.get_mut(id) {
                svc.tracking_mut().close(std::time::Duration::from_secs(2));
            }
        }
    }

    fn detach(&mut self) {
        if let Some(d) = self.dispatcher.take() {
            if let Err(e) = d.detach() {
                tracing::warn!(error = %e, "cannot detach the dispatcher cleanly");
            }
        }
    }

    /// Adds a live service and watches its notify socket.
    fn add_service(&mut self, svc: Service) -> ServiceId {
        let id = self.registry.insert(svc);
        self.watch_notify(id);
        id
    }

    /// Watches service `id`'s notify socket, if it has one.
    fn watch_notify(&mut self, id: ServiceId) {
        if let Some(n) = self.registry.get(id).and_then(|s| s.notify()) {
            if let Err(e) = self.poller.add(n.as_fd(), Token::Notify(id)) {
                tracing::warn!(service = %n.path().display(), error = %e, "cannot watch the notify socket");
            }
        }
    }

    fn stop_all(&mut self) {
        let now = Instant::now();
        for id in self.registry.live_ids() {
            self.stop(id, now);
        }
    }

    fn event_loop(&mut self, signals: &Signals, unused_signals: &crate::signals::Unused) {
        loop {
            self.registry.sweep();
            self.refresh_refusals();
            if self.shutting_down && !self.registry.any_processes() {
                return;
            }
            self.watch_traffic(Instant::now());
            let timeout = self.next_deadline().map_or(1000, |d| {
                d.saturating_duration_since(Instant::now())
                    .as_millis()
                    .clamp(1, 1000) as u16
            });
            let ready = self.poller.wait(timeout);
            if ready.contains(&Token::Signal) {
                signals.drain();
            }
            unused_signals.log_received();
            if signals.terminate.swap(false, Ordering::SeqCst) && !self.shutting_down {
                tracing::info!("stopping every service");
                self.manager.stopping();
                self.shutting_down = true;
                self.stop_all();
            }
            if signals.upgrade.swap(false, Ordering::SeqCst) && !self.shutting_down {
                let why = self.upgrade(None);
                tracing::error!(
                    "{}: upgrade refused, this holdfast carries on: {why}",
                    crate::signals::name(crate::signals::UPGRADE_SIGNAL)
                );
            }
            if signals.hangup.swap(false, Ordering::SeqCst) && !self.shutting_down {
                match self.reload() {
                    Ok(summary) => tracing::info!(%summary, "SIGHUP: reloaded"),
                    Err(e) => tracing::error!(
                        "SIGHUP: reload refused, the running configuration stays:\n{e}"
                    ),
                }
            }
            // Notifications before exits: a message an instance sent just
            // before it exited is read while its pid still names it.
            for token in &ready {
                if let Token::Notify(id) = token {
                    self.read_notifications(*id);
                }
            }
            self.reap();
            // Main processes named by MAINPID= that are not holdfast's children.
            for token in &ready {
                if let Token::MainPid { service, pid } = *token {
                    self.main_pid_exited(service, pid);
                }
            }
            if ready.contains(&Token::Metrics) {
                if let Some(m) = &self.metrics {
                    let text = metrics::render(&self.snapshot());
                    m.answer(|| text.clone());
                }
            }
            let now = Instant::now();
            for token in &ready {
                match *token {
                    Token::Traffic(id) => self.traffic(id, now),
                    Token::Output(o) => self.read_output(o),
                    _ => {}
                }
            }
            self.serve_control();
            self.run_timers(Instant::now());
            self.sync_doors();
            self.answer_waiters();
            self.update_status();
            self.manager.tick(Instant::now());
        }
    }

    /// STATUS= for the manager: how many services are in which state.
    fn update_status(&mut self) {
        let line = crate::manager::status_line(
            self.registry
                .live()
                .map(|(_, s)| s.machine().state().as_str()),
        );
        self.manager.set_status(&line);
    }

    /// Puts every live service's listeners in the manager's fd store (and
    /// takes out those gone), so that they survive a crash of holdfast.
    fn sync_fd_store(&mut self) {
        let listeners: Vec<(String, std::os::fd::BorrowedFd<'_>)> = self
            .registry
            .live()
            .flat_map(|(_, s)| {
                s.sockets()
                    .iter()
                    .map(move |k| (crate::manager::fd_name(s.name(), &k.name), k.fd.as_fd()))
            })
            .collect();
        self.manager.sync_fd_store(listeners);
    }

    /// Records the cgroup root and every listener's inode in the state dir,
    /// for a holdfast started here after this one died ([`recovery`]).
    fn record_for_recovery(&self) {
        let mut record = recovery::Record {
            cgroup_root: self
                .cgroups
                .as_ref()
                .and_then(|h| crate::cgroup::path_of(h.root().path())),
            made_root: self.cgroups.as_ref().is_some_and(|h| h.made()),
            ..recovery::Record::default()
        };
        // Live services first: a retiring one may have the same name.
        let services = self.registry.live().chain(self.registry.all());
        for (_, s) in services {
            for k in s.sockets() {
                let name = crate::manager::fd_name(s.name(), &k.name);
                if let Ok(st) = nix::sys::stat::fstat(k.fd.as_raw_fd()) {
                    record.sockets.entry(name).or_insert(st.st_ino);
                }
            }
        }
        recovery::write(&self.opts.state_dir, &record);
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.registry
            .all()
            .filter_map(|(_, s)| s.deadline())
            .chain(self.server.as_ref().and_then(|s| s.resumes_at()))
            .chain(self.manager.next_deadline())
            .min()
    }
}
