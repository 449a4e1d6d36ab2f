//! Traffic-started services: inetd's two styles.
//!
//! - `accept = true` on a unit's only socket (inetd's `wait = no`, systemd's
//!   `Accept=yes`): holdfast accepts each connection and starts one instance
//!   for it, with the connection as stdin, stdout and fd 3 (LISTEN_FDS=1,
//!   LISTEN_FDNAMES=connection), REMOTE_ADDR/REMOTE_PORT and
//!   LOCAL_ADDR/LOCAL_PORT in the environment. `max-connections` bounds the
//!   instances (holdfast stops accepting, so further connections wait in the
//!   backlog), `max-connections-per-source` closes a source's extra
//!   connections, `max-connection-rate` pauses accepting for
//!   `rate-limit-pause` (xinetd's `cps`), and allow/deny close what they refuse.
//! - `on-demand = true` in [service] (inetd's `wait = yes`, systemd's socket
//!   activation): the service gets its sockets and is started when traffic
//!   first arrives; holdfast watches the sockets again once it has exited.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::sys::socket::{self, SockaddrStorage};
use nix::unistd::Pid;

use crate::service::State;
use crate::spawn;

use super::services::{Output, Service};
use super::Supervisor;

/// Instances at once when `max-connections` is not set (systemd's default).
pub const DEFAULT_MAX_CONNECTIONS: u32 = 64;
/// How long accepting pauses when `max-connection-rate` is exceeded.
pub const DEFAULT_RATE_LIMIT_PAUSE: Duration = Duration::from_secs(10);

/// One per-connection instance.
#[derive(Debug)]
pub(super) struct Connection {
    pub pid: Pid,
    pub source: Option<IpAddr>,
    /// SIGTERM was sent; SIGKILL to its process group at this instant.
    pub kill_at: Option<Instant>,
}

/// A service's accept bookkeeping.
#[derive(Debug, Default)]
pub(super) struct Acceptor {
    pub connections: Vec<Connection>,
    pub total: u64,
    pub denied: u64,
    /// Accepting is paused until then (rate limit).
    pub paused_until: Option<Instant>,
    /// Accept times within the last second, for the rate limit.
    pub recent: std::collections::VecDeque<Instant>,
}

impl Service {
    /// The socket holdfast accepts on, if this is an accept service.
    pub(super) fn accept_socket(&self) -> Option<&super::sockets::Socket> {
        match self.sockets.as_slice() {
            [s] if s.config.options.accept => Some(s),
            _ => None,
        }
    }

    /// Whether the event loop should watch this service's sockets now.
    pub(super) fn wants_traffic(&self, now: Instant) -> bool {
        if self.life.state != State::Listening {
            return false;
        }
        match self.accept_socket() {
            Some(s) => {
                let max = s
                    .config
                    .options
                    .max_connections
                    .unwrap_or(DEFAULT_MAX_CONNECTIONS) as usize;
                self.acceptor.connections.len() < max
                    && self.acceptor.paused_until.is_none_or(|t| t <= now)
            }
            None => self.unit.service.on_demand && self.main.is_none(),
        }
    }
}

impl Supervisor {
    /// Traffic arrived for service `i`: accept (accept services) or start it (on-demand).
    pub(super) fn traffic(&mut self, i: usize, now: Instant) {
        if self.services[i].accept_socket().is_some() {
            self.accept_connections(i, now);
        } else if self.services[i].main.is_none() {
            tracing::info!(service = %self.services[i].unit.name, "traffic arrived: starting (on-demand)");
            self.start(i, now);
        }
    }

    fn accept_connections(&mut self, i: usize, now: Instant) {
        loop {
            if !self.services[i].wants_traffic(now) {
                return;
            }
            let svc = &mut self.services[i];
            let sock = svc.accept_socket().expect("an accept service");
            let opts = sock.config.options.clone();
            let listening = sock.fd.as_raw_fd();
            // The rate limit: with `max-connection-rate` accepts already in
            // the last second, a waiting connection pauses accepting before
            // it is accepted; it waits in the backlog for the pause to end.
            if let Some(rate) = opts.max_connection_rate {
                let window = Duration::from_secs(1);
                let recent = &mut svc.acceptor.recent;
                while recent
                    .front()
                    .is_some_and(|t| now.saturating_duration_since(*t) >= window)
                {
                    recent.pop_front();
                }
                if recent.len() >= rate as usize {
                    if !connection_waiting(listening) {
                        return;
                    }
                    let pause = opts.rate_limit_pause.unwrap_or(DEFAULT_RATE_LIMIT_PAUSE);
                    svc.acceptor.paused_until = Some(now + pause);
                    svc.acceptor.recent.clear();
                    tracing::warn!(service = %svc.unit.name, rate, pause = %humantime::format_duration(pause), "connection rate over max-connection-rate: accepting pauses (new connections wait in the backlog)");
                    return;
                }
            }
            // SAFETY: accept4 on our listening socket; a returned fd is owned by us.
            let fd = unsafe {
                libc::accept4(
                    listening,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if fd < 0 {
                let e = std::io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EAGAIN) => {}
                    Some(libc::EINTR) | Some(libc::ECONNABORTED) => continue,
                    _ => tracing::warn!(service = %svc.unit.name, error = %e, "accept failed"),
                }
                return;
            }
            // SAFETY: accept4 returned a fresh fd nobody else owns.
            let conn = unsafe { OwnedFd::from_raw_fd(fd) };
            let peer = socket::getpeername::<SockaddrStorage>(fd)
                .ok()
                .and_then(ip_of);
            let local = socket::getsockname::<SockaddrStorage>(fd)
                .ok()
                .and_then(ip_of);
            let source = peer.map(|p| p.ip());
            let name = svc.unit.name.clone();
            if let Some(src) = source {
                if !opts.admits(src) {
                    svc.acceptor.denied += 1;
                    tracing::info!(service = %name, source = %src, "connection refused by allow/deny");
                    continue;
                }
                if let Some(max) = opts.max_connections_per_source {
                    let from_src = svc
                        .acceptor
                        .connections
                        .iter()
                        .filter(|c| c.source == Some(src))
                        .count();
                    if from_src >= max as usize {
                        svc.acceptor.denied += 1;
                        tracing::warn!(service = %name, source = %src, max, "connection closed: max-connections-per-source reached");
                        continue;
                    }
                }
            }
            svc.acceptor.total += 1;
            if opts.max_connection_rate.is_some() {
                svc.acceptor.recent.push_back(now);
            }
            match self.spawn_connection(i, &conn, peer, local) {
                Ok(pid) => self.services[i].acceptor.connections.push(Connection {
                    pid,
                    source,
                    kill_at: None,
                }),
                Err(e) => {
                    tracing::error!(service = %name, error = %e, "cannot start an instance for a connection");
                    return;
                }
            }
        }
    }

    fn spawn_connection(
        &mut self,
        i: usize,
        conn: &OwnedFd,
        peer: Option<SocketAddr>,
        local: Option<SocketAddr>,
    ) -> Result<Pid, spawn::SpawnError> {
        let svc = &self.services[i];
        let cfg = &svc.unit.service;
        let (path_var, mut env) = self.base_env(i);
        if let Some(p) = peer {
            env.push(("REMOTE_ADDR".into(), p.ip().to_string().into()));
            env.push(("REMOTE_PORT".into(), p.port().to_string().into()));
        }
        if let Some(l) = local {
            env.push(("LOCAL_ADDR".into(), l.ip().to_string().into()));
            env.push(("LOCAL_PORT".into(), l.port().to_string().into()));
        }
        for (k, v) in &cfg.environment {
            env.push((k.clone(), v.into()));
        }
        let program = spawn::resolve_program(&cfg.exec[0], path_var.as_deref())?;
        let credentials = spawn::Credentials::resolve(cfg.user.as_deref(), cfg.group.as_deref())?;
        let (err_r, err_w) = spawn::output_pipe()?;
        let cmd = spawn::Command {
            program: &program,
            argv: &cfg.exec,
            env,
            fds: vec![(conn.as_fd(), "connection")],
            stdin: Some(conn.as_fd()),
            stdout: conn.as_fd(),
            stderr: err_w.as_fd(),
            credentials: credentials.as_ref(),
            working_directory: cfg.working_directory.as_deref(),
        };
        let pid = spawn::spawn(&cmd)?;
        let name = svc.unit.name.clone();
        tracing::debug!(service = %name, pid = pid.as_raw(), peer = ?peer, "connection instance started");
        self.outputs.push(Output {
            service: name,
            stream: "stderr",
            fd: err_r,
            partial: Vec::new(),
        });
        Ok(pid)
    }

    /// Reaps a per-connection instance; false when `pid` is not one.
    pub(super) fn connection_exited(&mut self, pid: Pid) -> bool {
        for svc in self.services.iter_mut().chain(self.retiring.iter_mut()) {
            if let Some(k) = svc.acceptor.connections.iter().position(|c| c.pid == pid) {
                svc.acceptor.connections.swap_remove(k);
                let _ = killpg(pid, Signal::SIGKILL);
                return true;
            }
        }
        false
    }

    /// Stops every per-connection instance of a service: SIGTERM now,
    /// SIGKILL to those still there after `stop-timeout`.
    pub(super) fn stop_connections(svc: &mut Service, now: Instant) {
        let timeout = svc.unit.service.stop_timeout;
        for c in &mut svc.acceptor.connections {
            if c.kill_at.is_some() {
                continue;
            }
            let _ = killpg(c.pid, Signal::SIGTERM);
            let _ = killpg(c.pid, Signal::SIGCONT);
            c.kill_at = Some(now + timeout);
        }
    }

    /// SIGKILL to per-connection instances whose stop timeout has passed.
    pub(super) fn kill_late_connections(svc: &mut Service, now: Instant) {
        let name = &svc.unit.name;
        for c in &mut svc.acceptor.connections {
            if c.kill_at.is_some_and(|t| t <= now) {
                tracing::warn!(service = %name, pid = c.pid.as_raw(), "connection instance did not stop in time: SIGKILL to its process group");
                let _ = killpg(c.pid, Signal::SIGKILL);
                c.kill_at = Some(now + Duration::from_secs(3600));
            }
        }
    }
}

/// Whether a connection waits to be accepted on listening socket `fd`.
fn connection_waiting(fd: std::os::fd::RawFd) -> bool {
    // SAFETY: `fd` is the service's listening socket, open for this call.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let mut fds = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
    matches!(nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO), Ok(n) if n > 0)
}

fn ip_of(addr: SockaddrStorage) -> Option<SocketAddr> {
    if let Some(a) = addr.as_sockaddr_in() {
        return Some(SocketAddr::from((a.ip(), a.port())));
    }
    addr.as_sockaddr_in6().map(|a| {
        let ip = a.ip();
        // A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d.
        let ip = ip
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(ip));
        SocketAddr::new(ip, a.port())
    })
}
