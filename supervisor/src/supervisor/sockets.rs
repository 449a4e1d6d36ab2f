//! The supervisor's sockets: opening a unit's listeners in the placement the
//! dispatcher allows, numbering steered sockets (destination ids), and
//! turning them into the dispatcher's bindings.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use crate::dispatch::{Binding, DestinationId, Dispatcher};
use crate::listener::{self, Placement, PlacementError};
use crate::unit::{IpPrefix, PortRange, Protocol, SocketConfig, Unit};

use super::{Service, SupervisorError};

/// A socket holdfast keeps open for a service, whatever the service does.
pub(super) struct Socket {
    pub name: String,
    pub protocol: Protocol,
    pub placement: Placement,
    /// Its sockmap slot, when steered.
    pub destination: Option<DestinationId>,
    /// What it was created from: a reload keeps the socket while this is unchanged.
    pub config: SocketConfig,
    pub fd: OwnedFd,
    /// A unix socket's file as it was bound, so that `remove-on-stop`
    /// removes that file and never a newer socket's at the same path.
    pub file: Option<FileId>,
}

/// A file's device and inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(super) struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    /// The socket file at `path`, if there is one.
    fn of_socket(path: &Path) -> Option<FileId> {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let meta = std::fs::symlink_metadata(path).ok()?;
        meta.file_type().is_socket().then(|| FileId {
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }
}

impl Drop for Socket {
    /// `remove-on-stop`: the socket file goes with the socket (a reload
    /// that drops it, holdfast's exit), unless another socket has taken its path.
    fn drop(&mut self) {
        if let (true, Placement::Unix(path), Some(file)) = (
            self.config.options.remove_on_stop,
            &self.placement,
            self.file,
        ) {
            if FileId::of_socket(path) == Some(file) {
                if let Err(e) = std::fs::remove_file(path) {
                    tracing::warn!(socket = %self.name, path = %path.display(), error = %e, "cannot remove the socket file (remove-on-stop)");
                }
            }
        }
    }
}

impl Socket {
    /// Whether `cfg` can be served by this very socket. Never needing a new
    /// socket: the bindings of a steered socket (as long as its address
    /// family fits), holdfast's own policy (allow, deny, the accept limits),
    /// and, for a bound or unix socket, the options Linux lets a listening
    /// socket change ([`Socket::adjust`] applies them).
    pub fn serves(&self, cfg: &SocketConfig) -> bool {
        let mut a = self.config.clone();
        let mut b = cfg.clone();
        a.options = a.options.without_policy();
        b.options = b.options.without_policy();
        if matches!(self.placement, Placement::Steered { .. }) {
            // Steered: bindings may change freely as long as the family fits
            // and getsockname() stays true (`keeps_its_address`).
            if !self.keeps_its_address(&b) {
                return false;
            }
            let fam = |c: &SocketConfig| {
                (
                    c.addresses.iter().any(|p| p.addr.is_ipv4()),
                    c.addresses.iter().any(|p| p.addr.is_ipv6()),
                )
            };
            if fam(&a) != fam(&b) {
                return false;
            }
            a.addresses.clear();
            a.ports.clear();
            b.addresses.clear();
            b.ports.clear();
            a == b
        } else {
            // Bound: a new socket could not bind while this one holds the
            // address, so what can change in place does.
            listener::adjustable(&a, &b)
        }
    }

    /// Whether a steered socket can stay where it is bound under `cfg`: one
    /// bound to an address and port stays while `cfg` declares exactly that one
    /// or still serves it among wider bindings (what getsockname() says stays
    /// true); one on loopback stays unless `cfg` now declares one address and
    /// port it did not declare before (which a new socket binds).
    fn keeps_its_address(&self, cfg: &SocketConfig) -> bool {
        match (self.placement.steered_at(), listener::steered_at(cfg)) {
            (Some(at), Some(want)) => at == want,
            (Some(at), None) => cfg
                .bindings()
                .any(|(p, r)| p.contains(at.ip()) && r.contains(at.port())),
            // Declared before too, yet on loopback: bound before holdfast
            // bound such sockets there, or the address was taken.
            (None, Some(want)) => listener::steered_at(&self.config) == Some(want),
            (None, None) => true,
        }
    }

    /// Takes `cfg` (which it [`serves`](Socket::serves)) as its
    /// configuration, changing the live socket's options where they differ.
    pub fn adjust(&mut self, cfg: &SocketConfig) -> Result<(), listener::ListenerError> {
        let changed = self.config.options.without_policy() != cfg.options.without_policy();
        if changed && !matches!(self.placement, Placement::Steered { .. }) {
            listener::adjust(&self.fd, cfg)?;
        }
        self.config = cfg.clone();
        Ok(())
    }
}

/// A socket as an in-place upgrade carries it: its fd is inherited.
#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct SavedSocket {
    name: String,
    protocol: Protocol,
    placement: Placement,
    destination: Option<DestinationId>,
    config: SocketConfig,
    fd: RawFd,
    #[serde(default)]
    file: Option<FileId>,
}

impl Socket {
    pub fn save(&self) -> SavedSocket {
        SavedSocket {
            name: self.name.clone(),
            protocol: self.protocol,
            placement: self.placement.clone(),
            destination: self.destination,
            config: self.config.clone(),
            fd: self.fd.as_raw_fd(),
            file: self.file,
        }
    }

    /// Takes back a socket inherited across the exec (CLOEXEC again).
    pub fn adopt(saved: SavedSocket) -> std::io::Result<Socket> {
        crate::fds::set_cloexec(saved.fd, true)?;
        Ok(Socket {
            name: saved.name,
            protocol: saved.protocol,
            placement: saved.placement,
            destination: saved.destination,
            config: saved.config,
            // SAFETY: the fd was this socket's before the exec; the saved
            // state names it once, and nothing else in the new process owns it.
            fd: unsafe { OwnedFd::from_raw_fd(saved.fd) },
            file: saved.file,
        })
    }
}

impl SavedSocket {
    pub fn fd(&self) -> RawFd {
        self.fd
    }
}

/// Hands out sockmap slots and takes them back.
#[derive(Clone, Default, serde::Serialize, serde::Deserialize)]
pub(super) struct Destinations {
    next: DestinationId,
    free: Vec<DestinationId>,
}

impl Destinations {
    pub fn take(&mut self) -> DestinationId {
        self.free.pop().unwrap_or_else(|| {
            if self.next == REFUSED {
                self.next += 1;
            }
            self.next += 1;
            self.next - 1
        })
    }
    pub fn give_back(&mut self, id: DestinationId) {
        self.free.push(id);
    }
}

/// Opens one socket of `unit` (or takes the one `inherited` has for it),
/// beside the `live` sockets bound where it binds (a reload's replacement:
/// see [`listener::create_beside`]); the error names the unit file and the
/// socket. A steered socket whose one address and port something else holds
/// is bound to loopback, with a warning: it is steered all the same, only
/// getsockname() says otherwise.
pub(super) fn open(
    unit: &Unit,
    cfg: &SocketConfig,
    dispatcher: bool,
    why_not: &str,
    destinations: &mut Destinations,
    inherited: &mut crate::manager::Inherited,
    live: &[BorrowedFd<'_>],
) -> Result<Socket, String> {
    let placement = placement_of(unit, cfg, dispatcher, why_not)?;
    // A socket passed in LISTEN_FDS under this name and fitting it is used
    // in place of a new one (after a crash: from systemd's fd store).
    let created = match inherited.take(&unit.name, cfg, &placement) {
        Some(fd) => Ok(fd),
        None => match listener::create_beside(cfg, &placement, live) {
            Err(e) if e.address_refused() && placement.steered_at().is_some() => {
                tracing::warn!(
                    service = %unit.name,
                    socket = %cfg.name,
                    error = %e,
                    "its one address and port cannot be bound: the socket is bound to loopback instead, steered all the same (getsockname() in the service shows a loopback port)"
                );
                listener::create(cfg, &placement.on_loopback())
            }
            created => created,
        },
    };
    let placement = match &created {
        Ok(fd) => placement.as_found(fd),
        Err(_) => placement,
    };
    match created {
        Ok(fd) if cfg.options.accept && listener::set_nonblocking(&fd).is_err() => Err(format!(
            "{}: service {}: socket {:?}: cannot make it non-blocking",
            unit.path.display(),
            unit.name,
            cfg.name
        )),
        Ok(fd) => Ok(Socket {
            file: match &placement {
                Placement::Unix(path) => FileId::of_socket(path),
                _ => None,
            },
            name: cfg.name.clone(),
            protocol: cfg.protocol,
            destination: matches!(placement, Placement::Steered { .. })
                .then(|| destinations.take()),
            placement,
            config: cfg.clone(),
            fd,
        }),
        Err(e) => Err(format!(
            "{}: service {}: socket {:?}: {e}",
            unit.path.display(),
            unit.name,
            cfg.name
        )),
    }
}

/// Where socket `cfg` of `unit` is placed; the error says what to write
/// instead when it needs the dispatcher that is not there (`why_not`).
fn placement_of(
    unit: &Unit,
    cfg: &SocketConfig,
    dispatcher: bool,
    why_not: &str,
) -> Result<Placement, String> {
    match Placement::for_socket(cfg, dispatcher) {
        Ok(p) => Ok(p),
        Err(e @ (PlacementError::NeedsDispatcher | PlacementError::RulesNeedDispatcher)) => {
            let instead = if e == PlacementError::NeedsDispatcher {
                "declare one address (a /32 or /128) and one port"
            } else {
                "remove allow/deny, or set accept = true"
            };
            Err(format!(
                "{}: service {}: socket {:?}: {e}; {why_not}; {instead}, or run where BPF is available",
                unit.path.display(),
                unit.name,
                cfg.name
            ))
        }
        Err(e) => Err(format!(
            "{}: service {}: socket {:?}: {e}",
            unit.path.display(),
            unit.name,
            cfg.name
        )),
    }
}

/// Every steered socket's bindings: `addresses × ports`.
pub(super) fn bindings_of<'a>(services: impl Iterator<Item = &'a Service>) -> Vec<Binding> {
    services
        .flat_map(|svc| {
            svc.sockets()
                .iter()
                .flat_map(|sock| bindings(svc.name(), &sock.config, sock))
        })
        .collect()
}

/// The bindings `cfg` gives socket `sock` (none unless it is steered).
pub(super) fn bindings(service: &str, cfg: &SocketConfig, sock: &Socket) -> Vec<Binding> {
    let Some(destination) = sock.destination else {
        return Vec::new();
    };
    cfg.bindings()
        .map(|(prefix, ports)| Binding {
            service: service.to_string(),
            socket: cfg.name.clone(),
            protocol: cfg.protocol,
            prefix,
            ports,
            destination,
        })
        .collect()
}

/// The destination id no socket gets: its source rules refuse every source,
/// so a lookup that matches a binding to it is dropped (TCP: reset, the
/// client is refused; UDP: port unreachable). See [`refusals`].
pub(super) const REFUSED: DestinationId = crate::dispatch::MAX_DESTINATIONS - 1;

/// A binding to [`REFUSED`] for each steered socket among `open` that is
/// bound to its one address and port while no binding of `bindings` covers
/// them: a socket a reload removed or replaced, still held by the instances
/// that stop, or one of a failed service. Since the socket is bound there,
/// the kernel's own lookup (which runs when the sk_lookup program finds no
/// binding) would find it; this way what is withdrawn is refused, as for a
/// socket bound to loopback. Once its socket has closed, the next turn of the
/// loop publishes again without it (`Supervisor::refresh_refusals`).
pub(super) fn refusals<'a>(
    open: impl Iterator<Item = (&'a str, &'a Socket)>,
    bindings: &[Binding],
) -> Vec<Binding> {
    let mut out: Vec<Binding> = Vec::new();
    for (service, sock) in open {
        let Some(at) = sock.placement.steered_at() else {
            continue;
        };
        let covers = |b: &Binding| {
            b.protocol == sock.protocol && b.prefix.contains(at.ip()) && b.ports.contains(at.port())
        };
        if bindings.iter().any(covers) || out.iter().any(covers) {
            continue;
        }
        out.push(Binding {
            service: service.to_string(),
            socket: sock.name.clone(),
            protocol: sock.protocol,
            prefix: IpPrefix {
                addr: at.ip(),
                len: if at.is_ipv4() { 32 } else { 128 },
            },
            ports: PortRange {
                first: at.port(),
                last: at.port(),
            },
            destination: REFUSED,
        });
    }
    out
}

/// Gives every steered socket its source rules (allow/deny of `cfg`, which
/// may be newer than the socket's own during a reload) and puts it in the
/// sockmap (sockets first, so no binding ever points at an empty slot), then
/// publishes the bindings atomically.
pub(super) fn steer(
    d: &mut Dispatcher,
    sockets: &[(&Socket, &SocketConfig)],
    bindings: &[Binding],
) -> Result<(), SupervisorError> {
    for (sock, cfg) in sockets {
        if let Some(dest) = sock.destination {
            d.set_source_rules(dest, &cfg.options.allow, &cfg.options.deny)
                .map_err(SupervisorError::Bindings)?;
            // A shut listener (a failed service's) cannot be in a sockmap.
            let shut = sock.protocol == Protocol::Tcp && !listener::is_listening(&sock.fd);
            if !d.socket_present(dest) && !shut {
                d.insert_socket(dest, sock.fd.as_fd())
                    .map_err(SupervisorError::Bindings)?;
            }
        }
    }
    // A reload that leaves the bindings as they are (the same list: reloads
    // keep unchanged units' bindings in place) costs no flip.
    if d.bindings() != bindings {
        publish(d, bindings)?;
    }
    // Steered now, allow/deny and all: a new socket's seal comes off.
    for (sock, _) in sockets {
        if sock.destination.is_some() {
            if let Err(e) = listener::unseal(&sock.fd) {
                tracing::error!(socket = %sock.name, error = %e, "cannot take the seal off a steered socket: it drops every packet");
            }
        }
    }
    Ok(())
}

/// Applies `bindings`, with the rules of the refusals among them.
fn publish(d: &mut Dispatcher, bindings: &[Binding]) -> Result<(), SupervisorError> {
    if bindings.iter().any(|b| b.destination == REFUSED) {
        let everyone = [
            IpPrefix {
                addr: std::net::Ipv4Addr::UNSPECIFIED.into(),
                len: 0,
            },
            IpPrefix {
                addr: std::net::Ipv6Addr::UNSPECIFIED.into(),
                len: 0,
            },
        ];
        d.set_source_rules(REFUSED, &[], &everyone)
            .map_err(SupervisorError::Bindings)?;
    }
    d.apply(bindings).map_err(SupervisorError::Bindings)
}

/// The default dispatcher instance: one per network namespace.
pub(super) fn default_instance() -> String {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata("/proc/self/ns/net") {
        Ok(m) => format!("netns-{}", m.ino()),
        Err(_) => "default".to_string(),
    }
}

pub(super) fn enter_netns(path: &Path) -> Result<(), SupervisorError> {
    let f = std::fs::File::open(path).map_err(super::setup(format!("netns {}", path.display())))?;
    nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| super::setup(format!("setns({})", path.display()))(e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::unit::SocketOptions;

    fn unix_socket(path: &Path, remove_on_stop: bool) -> Socket {
        let config = SocketConfig {
            name: "ctl".into(),
            protocol: Protocol::UnixStream,
            addresses: Vec::new(),
            ports: Vec::new(),
            path: Some(path.to_path_buf()),
            options: SocketOptions {
                remove_on_stop,
                ..SocketOptions::default()
            },
        };
        let placement = Placement::Unix(path.to_path_buf());
        let fd = listener::create(&config, &placement).unwrap();
        Socket {
            name: config.name.clone(),
            protocol: config.protocol,
            placement,
            destination: None,
            file: FileId::of_socket(path),
            config,
            fd,
        }
    }

    #[test]
    fn remove_on_stop_removes_its_own_socket_file_only() {
        let dir = std::env::temp_dir().join(format!("holdfast-sockets-{}", std::process::id()));
        let path = dir.join("ctl.sock");
        drop(unix_socket(&path, false));
        assert!(path.exists(), "kept without remove-on-stop");
        drop(unix_socket(&path, true));
        assert!(!path.exists(), "removed with remove-on-stop");
        // A socket whose path a newer socket took leaves the newer one's file.
        let old = unix_socket(&path, true);
        let new = unix_socket(&path, false);
        drop(old);
        assert!(path.exists(), "the newer socket's file was removed");
        drop(new);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
