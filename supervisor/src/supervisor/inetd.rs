//! Traffic-started services: inetd's two styles, above the service machine
//! and the per-connection [`Acceptor`](super::acceptor::Acceptor).
//!
//! - `accept = true` on a unit's only socket (inetd's `wait = no`, systemd's
//!   `Accept=yes`): holdfast accepts each connection and starts one instance
//!   for it, with the connection as stdin, stdout and fd 3 (LISTEN_FDS=1,
//!   LISTEN_FDNAMES=connection), REMOTE_ADDR/REMOTE_PORT and
//!   LOCAL_ADDR/LOCAL_PORT in the environment; the acceptor's limits say
//!   which connections get one.
//! - `on-demand = true` in [service] (inetd's `wait = yes`, systemd's socket
//!   activation): the service gets its sockets and is started when traffic
//!   first arrives; holdfast watches the sockets again once it has exited.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::time::Instant;

use nix::sys::socket::{self, SockaddrStorage};
use nix::unistd::Pid;

use crate::spawn;

use super::acceptor::Refused;
use super::registry::{Owner, ServiceId};
use super::Supervisor;

impl Supervisor {
    /// Arms the listeners of every traffic-started service that wants traffic now.
    pub(super) fn watch_traffic(&mut self, now: Instant) {
        if self.shutting_down {
            return;
        }
        for (id, svc) in self.registry.live() {
            if svc.wants_traffic(now) {
                let fds: Vec<_> = svc.sockets().iter().map(|s| s.fd.as_fd()).collect();
                self.poller.want_traffic(id, &fds);
            }
        }
    }

    /// Traffic arrived for service `id`: accept (accept services) or start it (on-demand).
    pub(super) fn traffic(&mut self, id: ServiceId, now: Instant) {
        if self.shutting_down || !self.registry.is_live(id) {
            return;
        }
        let Some(svc) = self.registry.get(id) else {
            return;
        };
        if !svc.wants_traffic(now) {
            return;
        }
        if svc.accept_socket().is_some() {
            self.accept_connections(id, now);
        } else {
            self.act(id, now, |m| m.traffic(now));
        }
    }

    fn accept_connections(&mut self, id: ServiceId, now: Instant) {
        if let Some(svc) = self.registry.get_mut(id) {
            svc.report_suppressed_accept_errors(now);
        }
        loop {
            let Some(svc) = self.registry.get_mut(id) else {
                return;
            };
            if !svc.wants_traffic(now) {
                return;
            }
            let name = svc.name().to_string();
            let listening = svc
                .accept_socket()
                .expect("an accept service")
                .fd
                .as_raw_fd();
            let acceptor = svc.acceptor_mut().expect("an accept service");
            // The rate limit: with `max-connection-rate` accepts already in
            // the last second, a waiting connection pauses accepting before
            // it is accepted; it waits in the backlog for the pause to end.
            if !acceptor.may_accept(now, || connection_waiting(listening)) {
                return;
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
                    _ => {
                        if let Some(svc) = self.registry.get_mut(id) {
                            svc.accept_failed(&e, now);
                        }
                    }
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
            match acceptor.admit(source, now) {
                Ok(()) => {}
                Err(Refused::AllowDeny) => {
                    tracing::info!(service = %name, source = ?source, "connection refused by allow/deny");
                    continue;
                }
                Err(Refused::PerSource(max)) => {
                    tracing::warn!(service = %name, source = ?source, max, "connection closed: max-connections-per-source reached");
                    continue;
                }
            }
            match self.spawn_connection(id, &conn, peer, local) {
                Ok(pid) => {
                    if let Some(a) = self.registry.get_mut(id).and_then(|s| s.acceptor_mut()) {
                        a.started(pid, source);
                    }
                    self.registry.track(pid.as_raw(), id, Owner::Connection);
                }
                Err(e) => {
                    tracing::error!(service = %name, error = %e, "cannot start an instance for a connection");
                    return;
                }
            }
        }
    }

    fn spawn_connection(
        &mut self,
        id: ServiceId,
        conn: &OwnedFd,
        peer: Option<SocketAddr>,
        local: Option<SocketAddr>,
    ) -> Result<Pid, spawn::SpawnError> {
        let hierarchy = self.cgroups.as_ref();
        let svc = self.registry.get_mut(id).expect("a known service");
        let (name, cfg) = (svc.name().to_string(), svc.unit().service.clone());
        let leaf = svc.tracking_mut().prepare(hierarchy, &name, &cfg)?;
        let svc = self.registry.get(id).expect("a known service");
        let cfg = &svc.unit().service;
        let (path_var, mut env) = self.base_env(svc);
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
        let setup = spawn::Setup::for_process(&cfg.process)?;
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
            sockets: 1,
            cgroup: leaf.as_ref().map(|l| l.as_fd()),
            rlimits: cfg.process.rlimits,
            non_blocking: cfg.process.non_blocking,
            standard_input: cfg.process.standard_input,
            standard_output: cfg.process.standard_output,
        };
        // The core is to keep the pidfd (issue 10); for now the pid only.
        let spawned = spawn::spawn_set_up(&cmd, &setup);
        drop(cmd);
        let svc = self.registry.get_mut(id).expect("a known service");
        let pid = svc.tracking_mut().spawned(spawned, leaf)?;
        tracing::debug!(service = %svc.name(), pid = pid.as_raw(), peer = ?peer, "connection instance started");
        self.add_output(id, pid, crate::protocol::Stream::Stderr, err_r);
        Ok(pid)
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
