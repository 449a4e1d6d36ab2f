//! holdfast as a service of its own manager (systemd, or anything speaking
//! its protocols): what holdfast tells it on `NOTIFY_SOCKET` ([`Manager`]:
//! READY=1, STATUS=, RELOADING=1 with MONOTONIC_USEC=, STOPPING=1, WATCHDOG=1
//! and the fd store) and the sockets it is handed in `LISTEN_FDS`
//! ([`Inherited`]: from systemd's fd store after a crash, or from `.socket`
//! units).
//!
//! Names: every listener is stored as `FDNAME=<service>.<socket>`, and an
//! inherited fd is used for the unit socket of that name, once it is checked
//! against what the unit asks for ([`mismatch`]: family, type, listening, the
//! address the placement binds); anything else is closed with a warning.
//!
//! It never acts on services: the supervisor calls it. It uses `unit`'s model
//! and `listener::Placement` only. The messages go through the `sd-notify`
//! crate (which reads `NOTIFY_SOCKET` at each call: holdfast's environment is
//! not its services', so it stays set).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::sys::socket::{self, sockopt, AddressFamily, SockaddrLike, SockaddrStorage};
use sd_notify::NotifyState;

use crate::listener::Placement;
use crate::ratelimit::LogLimiter;
use crate::unit::{Protocol, SocketConfig};

/// systemd's limit on an fd name.
const MAX_FDNAME: usize = 255;

/// The name a listener is stored under: `<service>.<socket>`.
pub fn fd_name(service: &str, socket: &str) -> String {
    format!("{service}.{socket}")
}

/// The fds handed over in `LISTEN_FDS`, not yet claimed by a unit socket.
#[derive(Debug, Default)]
pub struct Inherited {
    /// (name, fd, where it came from: "passed in LISTEN_FDS" or other words).
    fds: Vec<(String, OwnedFd, &'static str)>,
}

impl Inherited {
    /// Takes the fds of `LISTEN_FDS` (when `LISTEN_PID` is this process),
    /// marks them CLOEXEC and removes `LISTEN_PID`, `LISTEN_FDS` and
    /// `LISTEN_FDNAMES` from the environment, so that a later exec of holdfast
    /// never takes them again. Call it first thing, before any thread starts.
    pub fn from_env() -> Inherited {
        // SAFETY: called by supervisor::run before it starts any thread, so
        // nothing reads the environment while it is changed.
        let fds = match unsafe { sd_notify::listen_fds_with_names_and_unset_env() } {
            Ok(fds) => fds,
            Err(e) => {
                tracing::warn!(error = %e, "ignoring LISTEN_FDS: {e}");
                return Inherited::default();
            }
        };
        let fds = fds
            .map(|(fd, name)| {
                // SAFETY: LISTEN_FDS fds are handed to this process to own;
                // each number is taken once.
                let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                (name, fd, "passed in LISTEN_FDS")
            })
            .collect::<Vec<_>>();
        if !fds.is_empty() {
            let names: Vec<&str> = fds.iter().map(|(n, _, _)| n.as_str()).collect();
            tracing::info!(fds = fds.len(), names = %names.join(":"), "took the sockets passed in LISTEN_FDS");
        }
        Inherited { fds }
    }

    /// Adds a socket taken back from the processes a dead holdfast left,
    /// used like one passed in `LISTEN_FDS` under `name`.
    pub fn add_recovered(&mut self, name: String, fd: OwnedFd) {
        self.fds
            .push((name, fd, "taken back from a dead holdfast's services"));
    }

    /// The inherited socket named `<service>.<socket>` that fits `cfg` in
    /// `placement`, if any; one of that name that does not fit is closed
    /// with a warning saying why.
    pub fn take(
        &mut self,
        service: &str,
        cfg: &SocketConfig,
        placement: &Placement,
    ) -> Option<OwnedFd> {
        let name = fd_name(service, &cfg.name);
        while let Some(i) = self.fds.iter().position(|(n, _, _)| *n == name) {
            let (_, fd, from) = self.fds.remove(i);
            match Found::of(&fd).and_then(|f| match mismatch(cfg, placement, &f) {
                None => Ok(()),
                Some(why) => Err(why),
            }) {
                Ok(()) => {
                    tracing::info!(service, socket = %cfg.name, fd = fd.as_raw_fd(), "using the socket {from} as {name}");
                    return Some(fd);
                }
                Err(why) => tracing::warn!(
                    service,
                    socket = %cfg.name,
                    "closing the socket {from} as {name}: {why}"
                ),
            }
        }
        None
    }

    /// Closes every fd no unit socket claimed, with a warning each.
    pub fn close_unclaimed(&mut self) {
        for (name, fd, from) in self.fds.drain(..) {
            tracing::warn!(
                fd = fd.as_raw_fd(),
                "closing the fd {from} as {name:?}: no unit socket has that name (want <service>.<socket>)"
            );
        }
    }
}

/// What an inherited fd is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub family: Option<AddressFamily>,
    /// SOCK_STREAM (else datagram).
    pub stream: bool,
    pub listening: bool,
    pub local: Local,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Local {
    Ip(SocketAddr),
    Unix(Option<PathBuf>),
    Other,
}

impl Found {
    fn of(fd: &OwnedFd) -> Result<Found, String> {
        let ty =
            socket::getsockopt(fd, sockopt::SockType).map_err(|e| format!("not a socket ({e})"))?;
        let stream = ty == socket::SockType::Stream;
        let listening = stream && socket::getsockopt(fd, sockopt::AcceptConn).unwrap_or(false);
        let addr: SockaddrStorage =
            socket::getsockname(fd.as_raw_fd()).map_err(|e| format!("getsockname failed ({e})"))?;
        let local = if let Some(a) = addr.as_sockaddr_in() {
            Local::Ip(SocketAddr::from((a.ip(), a.port())))
        } else if let Some(a) = addr.as_sockaddr_in6() {
            Local::Ip(SocketAddr::from((a.ip(), a.port())))
        } else if let Some(a) = addr.as_unix_addr() {
            Local::Unix(a.path().map(|p| p.to_path_buf()))
        } else {
            Local::Other
        };
        Ok(Found {
            family: addr.family(),
            stream,
            listening,
            local,
        })
    }
}

/// Why `found` cannot serve `cfg` in `placement`, or `None` when it can: the
/// same family and type, listening if a stream socket, and bound where the
/// placement binds: the unit's address for a bound socket, its path for a
/// unix one; a steered socket is bound to loopback (`[::]` when dual-stack)
/// as holdfast binds a wide one (or did before it bound a socket of one
/// address and port there), or to an address and port the unit's bindings
/// contain: as holdfast binds a socket of one address and port, or as a
/// `.socket` unit's is.
pub fn mismatch(cfg: &SocketConfig, placement: &Placement, found: &Found) -> Option<String> {
    let stream = matches!(cfg.protocol, Protocol::Tcp | Protocol::UnixStream);
    if found.stream != stream {
        let (want, got) = if stream {
            ("a stream", "a datagram")
        } else {
            ("a datagram", "a stream")
        };
        return Some(format!(
            "the unit asks for {want} socket ({}), this is {got} socket",
            cfg.protocol
        ));
    }
    if stream && !found.listening {
        return Some("it is a stream socket that is not listening".into());
    }
    match (placement, &found.local) {
        (Placement::Unix(path), Local::Unix(got)) => (got.as_ref() != Some(path)).then(|| {
            format!(
                "it is bound to {}, the unit to {}",
                got.as_ref()
                    .map_or("no path".into(), |p| p.display().to_string()),
                path.display()
            )
        }),
        (Placement::Bound(want), Local::Ip(got)) => {
            (want != got).then(|| format!("it is bound to {got}, the unit to {want}"))
        }
        (
            Placement::Steered {
                ipv6, dual_stack, ..
            },
            Local::Ip(got),
        ) => {
            if got.is_ipv6() != *ipv6 {
                return Some(format!(
                    "it is an IPv{} socket, the unit needs IPv{}",
                    if got.is_ipv6() { 6 } else { 4 },
                    if *ipv6 { 6 } else { 4 }
                ));
            }
            let steered_ip: IpAddr = match (ipv6, dual_stack) {
                (true, true) => std::net::Ipv6Addr::UNSPECIFIED.into(),
                (true, false) => std::net::Ipv6Addr::LOCALHOST.into(),
                _ => std::net::Ipv4Addr::LOCALHOST.into(),
            };
            let as_holdfast_binds = got.ip() == steered_ip && got.port() != 0;
            let in_bindings = !dual_stack
                && cfg
                    .bindings()
                    .any(|(p, r)| p.contains(got.ip()) && r.contains(got.port()));
            (!as_holdfast_binds && !in_bindings).then(|| {
                format!(
                    "it is bound to {got}, neither {steered_ip} (as holdfast binds a steered socket) nor an address and port of the unit"
                )
            })
        }
        (_, got) => Some(format!(
            "its family ({:?}, bound to {got:?}) is not the unit's ({})",
            found.family, cfg.protocol
        )),
    }
}

/// Talks to holdfast's own manager on `NOTIFY_SOCKET`; without one, every
/// call does nothing.
#[derive(Debug)]
pub struct Manager {
    enabled: bool,
    /// WATCHDOG=1 every half of WATCHDOG_USEC, next at `.1`.
    watchdog: Option<(Duration, Instant)>,
    status: String,
    /// What is in the fd store: name → (device, inode) of the socket.
    stored: BTreeMap<String, (u64, u64)>,
    errors: LogLimiter,
}

impl Manager {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`.
    pub fn from_env(now: Instant) -> Manager {
        let enabled = std::env::var_os("NOTIFY_SOCKET").is_some();
        let watchdog = sd_notify::watchdog_enabled()
            .filter(|d| enabled && !d.is_zero())
            .map(|d| (d / 2, now));
        if let Some((every, _)) = watchdog {
            tracing::info!(
                every_ms = every.as_millis() as u64,
                "the manager's watchdog is on: WATCHDOG=1 every half of WATCHDOG_USEC"
            );
        }
        Manager {
            enabled,
            watchdog,
            status: String::new(),
            stored: BTreeMap::new(),
            errors: LogLimiter::new(5, Duration::from_secs(60)),
        }
    }

    /// Whether holdfast has a manager listening (`NOTIFY_SOCKET` is set).
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    fn send(&mut self, state: &[NotifyState<'_>], fds: &[BorrowedFd<'_>]) {
        if !self.enabled {
            return;
        }
        let r = if fds.is_empty() {
            sd_notify::notify(state)
        } else {
            sd_notify::notify_with_fds(state, fds)
        };
        if let Err(e) = r {
            if let Some(dropped) = self.errors.allow(Instant::now()) {
                let what: Vec<String> = state.iter().map(|s| s.to_string()).collect();
                tracing::warn!(error = %e, repeated = dropped, "cannot tell the manager {}", what.join(" "));
            }
        }
    }

    /// READY=1 (with the current STATUS=): every service has been started,
    /// or a reload is over.
    pub fn ready(&mut self) {
        let status = self.status.clone();
        self.send(&[NotifyState::Ready, NotifyState::Status(&status)], &[]);
    }

    /// RELOADING=1 with MONOTONIC_USEC=; [`Manager::ready`] ends it.
    pub fn reloading(&mut self) {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[NotifyState::Reloading, now], &[]),
            Err(_) => self.send(&[NotifyState::Reloading], &[]),
        }
    }

    /// STOPPING=1: holdfast is stopping every service.
    pub fn stopping(&mut self) {
        self.send(&[NotifyState::Stopping], &[]);
    }

    /// STATUS=`line`, sent only when it changed.
    pub fn set_status(&mut self, line: &str) {
        if line != self.status {
            self.status = line.to_string();
            self.send(&[NotifyState::Status(line)], &[]);
        }
    }

    /// When [`Manager::tick`] must run next (the watchdog), if ever.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.watchdog.map(|(_, at)| at)
    }

    /// Sends WATCHDOG=1 when it is due. Call it from the event loop's timers:
    /// if the loop stalls, the manager notices.
    pub fn tick(&mut self, now: Instant) {
        if let Some((every, at)) = self.watchdog {
            if now >= at {
                self.send(&[NotifyState::Watchdog], &[]);
                self.watchdog = Some((every, now + every));
            }
        }
    }

    /// Makes the fd store hold exactly `listeners` (`(<service>.<socket>`
    /// name, fd)): FDSTOREREMOVE=1 for names gone or now naming another socket,
    /// then FDSTORE=1 for each new one (systemd closes an fd it already has).
    /// Call it once the listeners are open, and after each reload.
    pub fn sync_fd_store<'a>(
        &mut self,
        listeners: impl IntoIterator<Item = (String, BorrowedFd<'a>)>,
    ) {
        if !self.enabled {
            return;
        }
        let mut now: BTreeMap<String, ((u64, u64), BorrowedFd<'a>)> = BTreeMap::new();
        for (name, fd) in listeners {
            if name.len() > MAX_FDNAME {
                tracing::warn!("cannot keep {name:?} in the manager's fd store: fd names are at most {MAX_FDNAME} bytes");
                continue;
            }
            let Ok(meta) = nix::sys::stat::fstat(fd.as_raw_fd()) else {
                continue;
            };
            now.insert(name, ((meta.st_dev, meta.st_ino), fd));
        }
        let gone: Vec<String> = self
            .stored
            .iter()
            .filter(|(name, id)| now.get(*name).is_none_or(|(n, _)| n != *id))
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            self.send(
                &[NotifyState::FdStoreRemove, NotifyState::FdName(&name)],
                &[],
            );
            self.stored.remove(&name);
        }
        for (name, (id, fd)) in now {
            if self.stored.get(&name) != Some(&id) {
                self.send(
                    &[NotifyState::FdStore, NotifyState::FdName(&name)],
                    &[fd.as_fd()],
                );
                self.stored.insert(name, id);
            }
        }
    }
}

/// The STATUS= line: `3 services: 2 running, 1 failed` (states in order of
/// first appearance).
pub fn status_line<'a>(states: impl IntoIterator<Item = &'a str>) -> String {
    let mut counts: Vec<(&str, usize)> = Vec::new();
    let mut total = 0;
    for s in states {
        total += 1;
        match counts.iter_mut().find(|(k, _)| *k == s) {
            Some((_, n)) => *n += 1,
            None => counts.push((s, 1)),
        }
    }
    let parts: Vec<String> = counts.iter().map(|(s, n)| format!("{n} {s}")).collect();
    let noun = if total == 1 { "service" } else { "services" };
    if parts.is_empty() {
        format!("{total} {noun}")
    } else {
        format!("{total} {noun}: {}", parts.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(protocol: Protocol, addresses: &[&str], ports: &[(u16, u16)]) -> SocketConfig {
        SocketConfig {
            protocol,
            ..crate::listener::tests::tcp(addresses, ports)
        }
    }

    fn tcp_at(addr: &str) -> Found {
        let local: SocketAddr = addr.parse().unwrap();
        Found {
            family: Some(if local.is_ipv6() {
                AddressFamily::Inet6
            } else {
                AddressFamily::Inet
            }),
            stream: true,
            listening: true,
            local: Local::Ip(local),
        }
    }

    #[test]
    fn what_an_inherited_socket_must_be() {
        let web = cfg(Protocol::Tcp, &["127.0.0.1/32"], &[(8080, 8080)]);
        let wide = cfg(Protocol::Tcp, &["192.0.2.0/24"], &[(8000, 8099)]);
        let dual = cfg(
            Protocol::Tcp,
            &["192.0.2.0/24", "2001:db8::/64"],
            &[(80, 80)],
        );
        let udp = cfg(Protocol::Udp, &["127.0.0.1/32"], &[(53, 53)]);
        let bound = |a: &str| Placement::Bound(a.parse().unwrap());
        let v4 = Placement::Steered {
            ipv6: false,
            dual_stack: false,
            at: None,
        };
        let both = Placement::Steered {
            ipv6: true,
            dual_stack: true,
            at: None,
        };
        let v4_at_8080 = Placement::Steered {
            ipv6: false,
            dual_stack: false,
            at: Some("127.0.0.1:8080".parse().unwrap()),
        };
        let not_listening = Found {
            listening: false,
            ..tcp_at("127.0.0.1:8080")
        };
        let dgram = Found {
            stream: false,
            listening: false,
            ..tcp_at("127.0.0.1:53")
        };
        let unix = Found {
            family: Some(AddressFamily::Unix),
            stream: true,
            listening: true,
            local: Local::Unix(Some("/run/x.sock".into())),
        };
        // (unit, placement, what was passed, Some(words of the refusal) or None: fits)
        let cases: &[(&SocketConfig, &Placement, &Found, Option<&str>)] = &[
            (
                &web,
                &bound("127.0.0.1:8080"),
                &tcp_at("127.0.0.1:8080"),
                None,
            ),
            (
                &web,
                &bound("127.0.0.1:8080"),
                &tcp_at("127.0.0.1:8081"),
                Some("bound to 127.0.0.1:8081"),
            ),
            (
                &web,
                &bound("127.0.0.1:8080"),
                &not_listening,
                Some("not listening"),
            ),
            (&web, &bound("127.0.0.1:8080"), &dgram, Some("datagram")),
            (&web, &bound("127.0.0.1:8080"), &unix, Some("family")),
            (&udp, &bound("127.0.0.1:53"), &dgram, None),
            (
                &udp,
                &bound("127.0.0.1:53"),
                &tcp_at("127.0.0.1:53"),
                Some("stream"),
            ),
            // Steered: as holdfast binds it (after a crash, from the fd store) …
            (&wide, &v4, &tcp_at("127.0.0.1:41234"), None),
            (&web, &v4_at_8080, &tcp_at("127.0.0.1:8080"), None),
            (&web, &v4_at_8080, &tcp_at("127.0.0.1:41234"), None),
            (
                &web,
                &v4_at_8080,
                &tcp_at("127.0.0.2:8080"),
                Some("neither"),
            ),
            // … or inside the unit's bindings (a .socket unit) …
            (&wide, &v4, &tcp_at("192.0.2.9:8042"), None),
            (&wide, &v4, &tcp_at("192.0.2.9:8100"), Some("neither")),
            (&wide, &v4, &tcp_at("198.51.100.1:8042"), Some("neither")),
            (&wide, &v4, &tcp_at("[::1]:41234"), Some("IPv6 socket")),
            // … but a dual-stack one only on [::].
            (&dual, &both, &tcp_at("[::]:41234"), None),
            (&dual, &both, &tcp_at("[2001:db8::1]:80"), Some("neither")),
        ];
        for (i, (c, p, f, want)) in cases.iter().enumerate() {
            let got = mismatch(c, p, f);
            match (want, &got) {
                (None, None) => {}
                (Some(w), Some(g)) if g.contains(w) => {}
                _ => panic!("case {i}: want {want:?}, got {got:?} ({p:?}, {f:?})"),
            }
        }
    }

    #[test]
    fn status_lines() {
        assert_eq!(status_line([]), "0 services");
        assert_eq!(status_line(["running"]), "1 service: 1 running");
        assert_eq!(
            status_line(["running", "failed", "running"]),
            "3 services: 2 running, 1 failed"
        );
    }

    #[test]
    fn fd_names() {
        assert_eq!(fd_name("web", "http"), "web.http");
    }
}
