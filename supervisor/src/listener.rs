//! Listening sockets: creating them with their options, in one of three
//! placements. Owns nothing after creation: the caller keeps the fd for as long
//! as the socket must live (a socket whose last fd closes also leaves the
//! sockmap). Knows nothing of services or BPF.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::sys::socket::{
    self, setsockopt, sockopt, AddressFamily, Backlog, SetSockOpt, SockFlag, SockProtocol,
    SockType, SockaddrIn, SockaddrIn6, UnixAddr,
};

use crate::unit::{Protocol, SocketConfig};

/// Where a socket is bound.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Placement {
    /// Bind mode: bound directly to its one address and port.
    Bound(SocketAddr),
    /// Steered by the sk_lookup dispatcher: traffic reaches it through the
    /// sockmap, wherever it is bound. `at`: a socket declared on exactly one
    /// address and one port is bound there (IP_FREEBIND: the address need not
    /// be local), so getsockname() tells a service what it was declared on,
    /// as in bind mode and under systemd. Otherwise (`at` is `None`: a prefix
    /// or a port range, or the address was taken) it is bound to loopback on
    /// a kernel-chosen port; `dual_stack` when it serves IPv4 and IPv6: then
    /// it binds `[::]`, since only a wildcard-bound IPv6 socket can stay
    /// dual-stack.
    Steered {
        ipv6: bool,
        dual_stack: bool,
        /// Absent in the state of a holdfast from before it was added: its
        /// steered sockets were all on loopback.
        #[serde(default)]
        at: Option<SocketAddr>,
    },
    /// A unix socket file.
    Unix(PathBuf),
}

impl Placement {
    /// The placement `cfg` gets: steered when a dispatcher is available (even
    /// for a single address and port, so that longest-prefix precedence holds
    /// against other services' wider bindings), else bound when it can be.
    pub fn for_socket(cfg: &SocketConfig, dispatcher: bool) -> Result<Placement, PlacementError> {
        if !cfg.protocol.is_ip() {
            let path = cfg.path.clone().ok_or(PlacementError::NoPath)?;
            return Ok(Placement::Unix(path));
        }
        if dispatcher {
            let any_v4 = cfg.addresses.iter().any(|p| p.addr.is_ipv4());
            let any_v6 = cfg.addresses.iter().any(|p| p.addr.is_ipv6());
            let ipv6 = any_v6 || cfg.options.ipv6_only == Some(false);
            let dual_stack = ipv6 && any_v4;
            return Ok(Placement::Steered {
                ipv6,
                dual_stack,
                at: steered_at(cfg).filter(|a| a.is_ipv6() == ipv6 && !dual_stack),
            });
        }
        let rules = !cfg.options.allow.is_empty() || !cfg.options.deny.is_empty();
        if rules && !cfg.options.accept {
            return Err(PlacementError::RulesNeedDispatcher);
        }
        match cfg.single_bind() {
            Some((addr, port)) => Ok(Placement::Bound(SocketAddr::new(addr, port))),
            None => Err(PlacementError::NeedsDispatcher),
        }
    }

    /// This placement as `fd` really is: a steered socket that is not bound
    /// where `at` says (inherited from an older holdfast, or placed on
    /// loopback because its address was taken) is on loopback.
    pub fn as_found(&self, fd: &impl AsFd) -> Placement {
        match self {
            Placement::Steered {
                ipv6,
                dual_stack,
                at: Some(at),
            } if local_addr(fd) != Some(*at) => Placement::Steered {
                ipv6: *ipv6,
                dual_stack: *dual_stack,
                at: None,
            },
            p => p.clone(),
        }
    }

    /// This placement on loopback: a steered socket whose address is taken.
    pub fn on_loopback(&self) -> Placement {
        match self {
            Placement::Steered {
                ipv6, dual_stack, ..
            } => Placement::Steered {
                ipv6: *ipv6,
                dual_stack: *dual_stack,
                at: None,
            },
            p => p.clone(),
        }
    }

    /// Where a steered socket is bound at `at` (see [`Placement::Steered`]).
    pub fn steered_at(&self) -> Option<SocketAddr> {
        match self {
            Placement::Steered { at, .. } => *at,
            _ => None,
        }
    }
}

/// Where a steered socket made from `cfg` binds, so that getsockname() reports
/// it: its one address and port, when it is declared on exactly one address
/// (a /32 or /128) and one port, and the address is one a socket can be bound
/// to alone: not the unspecified address (the wildcard would take the port on
/// every address), not broadcast or multicast, not IPv4-mapped (IPv4 traffic
/// to it is IPv4: no IPv6 socket binds it), not IPv6 link-local (that needs a
/// scope). Wider bindings have no such
/// address: binding the first address and port of a prefix or range would
/// take a port from whatever else binds there (a /0 prefix is the wildcard,
/// which collides with every socket on that port; a narrower socket of
/// another service wins that address and port by precedence and must bind
/// it), so they stay on loopback.
pub fn steered_at(cfg: &SocketConfig) -> Option<SocketAddr> {
    let (addr, port) = cfg.single_bind()?;
    let alone = match addr {
        IpAddr::V4(a) => !(a.is_unspecified() || a.is_broadcast() || a.is_multicast()),
        IpAddr::V6(a) => {
            !(a.is_unspecified()
                || a.is_multicast()
                || a.is_unicast_link_local()
                || a.to_ipv4_mapped().is_some())
        }
    };
    alone.then_some(SocketAddr::new(addr, port))
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlacementError {
    #[error("needs the sk_lookup dispatcher: without it a socket can only be bound to exactly one address (a /32 or /128) and one port")]
    NeedsDispatcher,
    /// allow/deny on a socket the service accepts on itself: without the
    /// dispatcher nothing in holdfast sees its connections.
    #[error("allow/deny need the sk_lookup dispatcher on a socket the service accepts itself: in bind mode holdfast enforces them only where it accepts (accept = true)")]
    RulesNeedDispatcher,
    #[error("a unix socket needs a path")]
    NoPath,
}

#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    #[error("{key} {name:?} of {what} does not exist")]
    NoAccount {
        key: &'static str,
        name: String,
        what: String,
    },
    #[error("{call} on {what}: {source}")]
    Syscall {
        call: &'static str,
        what: String,
        #[source]
        source: io::Error,
    },
}

impl ListenerError {
    /// Whether the address and port could not be had: bind or listen failed
    /// with EADDRINUSE (taken), EADDRNOTAVAIL or EINVAL (an address this
    /// host cannot bind), or EACCES (a port below 1024 without the capability).
    pub fn address_refused(&self) -> bool {
        let ListenerError::Syscall { call, source, .. } = self else {
            return false;
        };
        let refusals = [
            libc::EADDRINUSE,
            libc::EADDRNOTAVAIL,
            libc::EINVAL,
            libc::EACCES,
        ];
        matches!(*call, "bind" | "listen")
            && source.raw_os_error().is_some_and(|e| refusals.contains(&e))
    }
}

fn sys<T>(call: &'static str, what: &str, r: nix::Result<T>) -> Result<T, ListenerError> {
    r.map_err(|e| ListenerError::Syscall {
        call,
        what: what.to_string(),
        source: io::Error::from(e),
    })
}

const DEFAULT_BACKLOG: i32 = 4096;

/// Creates the socket `cfg` describes at `placement`: bound, listening (for
/// stream sockets), CLOEXEC.
pub fn create(cfg: &SocketConfig, placement: &Placement) -> Result<OwnedFd, ListenerError> {
    create_beside(cfg, placement, &[])
}

/// As [`create`], for a steered socket whose address and port `live` sockets
/// (the ones it replaces, which keep serving meanwhile) are bound to.
///
/// A TCP listener cannot bind where another listens, except in one reuseport
/// group: for the moment of the new socket's bind and listen, every live one
/// gets SO_REUSEPORT, then each is put back as it was and the new one has it
/// only if `cfg` asks. The kernel remembers in the port's bind bucket that a
/// reuseport socket of uid 0 bound there, and would let any later uid-0
/// SO_REUSEPORT socket bind beside ours without a conflict check: binding (and
/// closing at once) a socket without SO_REUSEPORT on the same port, on an
/// address nothing uses, makes it forget. So only a socket that asked for
/// reuse-port shares its address and port. (The sk_lookup program assigns
/// with BPF_SK_LOOKUP_F_NO_REUSEPORT, so a steered lookup is never split
/// between old and new either way.) UDP sockets need none of this: two with
/// SO_REUSEADDR may share an address.
pub fn create_beside(
    cfg: &SocketConfig,
    placement: &Placement,
    live: &[BorrowedFd<'_>],
) -> Result<OwnedFd, ListenerError> {
    match placement {
        Placement::Unix(path) => create_unix(cfg, path),
        Placement::Bound(addr) => create_ip(cfg, *addr, false, None, false),
        Placement::Steered {
            at: Some(at),
            dual_stack,
            ..
        } => {
            if live.is_empty() || cfg.protocol != Protocol::Tcp {
                return create_ip(cfg, *at, true, Some(*dual_stack), false);
            }
            create_shared(cfg, *at, live)
        }
        Placement::Steered {
            ipv6, dual_stack, ..
        } => {
            // Binding to any specific IPv6 address makes the kernel set
            // IPV6_V6ONLY, and bpf_sk_assign refuses a v6-only socket for IPv4
            // packets: a dual-stack socket must bind the wildcard.
            let addr = if *ipv6 && *dual_stack {
                SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0)
            } else if *ipv6 {
                SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 0)
            } else {
                SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0)
            };
            create_ip(cfg, addr, true, Some(*dual_stack), false)
        }
    }
}

/// A TCP listener at `at` beside the `live` ones (see [`create_beside`]).
fn create_shared(
    cfg: &SocketConfig,
    at: SocketAddr,
    live: &[BorrowedFd<'_>],
) -> Result<OwnedFd, ListenerError> {
    let what = format!("{} socket {at}", cfg.protocol);
    let mut was = Vec::with_capacity(live.len());
    for fd in live {
        was.push(socket::getsockopt(fd, sockopt::ReusePort).unwrap_or(false));
    }
    let put_back = |was: &[bool]| {
        for (fd, on) in live.iter().zip(was) {
            let _ = setsockopt(fd, sockopt::ReusePort, on);
        }
    };
    for fd in live {
        if let Err(e) = setsockopt(fd, sockopt::ReusePort, &true) {
            put_back(&was);
            return Err(syscall_err(
                "setsockopt(SO_REUSEPORT) on the live socket",
                &what,
                e.into(),
            ));
        }
    }
    let created = create_ip(cfg, at, true, Some(false), true);
    put_back(&was);
    let fd = created?;
    if !cfg.options.reuse_port {
        let sockopts = Setsockopt::on(&fd, &what);
        sockopts.set("setsockopt(SO_REUSEPORT)", sockopt::ReusePort, &false)?;
        if !was.iter().any(|on| *on) {
            forget_reuseport(at);
        }
    }
    Ok(fd)
}

/// Makes the kernel forget that a reuseport socket bound to `at`'s port (see
/// [`create_beside`]): a socket without SO_REUSEPORT bound to the same port on
/// an address reserved for no use (240.0.0.1, 100::1), closed at once. If
/// even that address is taken on the port, nothing is lost but the hardening.
fn forget_reuseport(at: SocketAddr) {
    let (family, unused) = match at {
        SocketAddr::V4(_) => (
            AddressFamily::Inet,
            SocketAddr::new(Ipv4Addr::new(240, 0, 0, 1).into(), at.port()),
        ),
        SocketAddr::V6(_) => (
            AddressFamily::Inet6,
            SocketAddr::new(Ipv6Addr::new(0x100, 0, 0, 0, 0, 0, 0, 1).into(), at.port()),
        ),
    };
    let bound = (|| -> io::Result<OwnedFd> {
        let fd = socket::socket(
            family,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::Tcp,
        )?;
        match unused {
            SocketAddr::V4(a) => {
                setsockopt(&fd, sockopt::IpFreebind, &true)?;
                socket::bind(fd.as_raw_fd(), &SockaddrIn::from(a))?;
            }
            SocketAddr::V6(a) => {
                set_int(&fd, libc::SOL_IPV6, libc::IPV6_FREEBIND, 1)?;
                socket::bind(fd.as_raw_fd(), &SockaddrIn6::from(a))?;
            }
        }
        Ok(fd)
    })();
    if let Err(e) = bound {
        tracing::warn!(%at, error = %e, "could not close the reuseport group of a replaced socket: a process of uid 0 could bind beside it with SO_REUSEPORT");
    }
}

fn create_ip(
    cfg: &SocketConfig,
    addr: SocketAddr,
    steered: bool,
    dual_stack: Option<bool>,
    reuse_port: bool,
) -> Result<OwnedFd, ListenerError> {
    let what = format!("{} socket {addr}", cfg.protocol);
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let (ty, proto) = match cfg.protocol {
        Protocol::Udp => (SockType::Datagram, SockProtocol::Udp),
        _ => (SockType::Stream, SockProtocol::Tcp),
    };
    let fd = sys(
        "socket",
        &what,
        socket::socket(family, ty, SockFlag::SOCK_CLOEXEC, proto),
    )?;
    ip_options(&fd, cfg, addr, steered, dual_stack, reuse_port, &what)?;
    set_common(&fd, cfg, &what)?;
    let o = &cfg.options;
    // A steered socket bound to its own address and port can be found by the
    // kernel's own lookup before the sk_lookup program steers to it (its
    // bindings are published after it listens), and that lookup knows
    // nothing of allow/deny: sealed until then (see `unseal`).
    if steered && addr.port() != 0 && !(o.allow.is_empty() && o.deny.is_empty()) {
        seal(&fd).map_err(|source| syscall_err("setsockopt(SO_ATTACH_FILTER)", &what, source))?;
    }
    if ty == SockType::Stream {
        let sockopts = Setsockopt::on(&fd, &what);
        if o.keep_alive {
            sockopts.set("setsockopt(SO_KEEPALIVE)", sockopt::KeepAlive, &true)?;
        }
        if o.no_delay {
            sockopts.set("setsockopt(TCP_NODELAY)", sockopt::TcpNoDelay, &true)?;
        }
    }
    match addr {
        SocketAddr::V4(a) => sys(
            "bind",
            &what,
            socket::bind(fd.as_raw_fd(), &SockaddrIn::from(a)),
        )?,
        SocketAddr::V6(a) => sys(
            "bind",
            &what,
            socket::bind(fd.as_raw_fd(), &SockaddrIn6::from(a)),
        )?,
    }
    if ty == SockType::Stream {
        listen(&fd, cfg, &what)?;
    }
    Ok(fd)
}

/// The one instruction of the socket filter that seals a socket: `ret #0`
/// (BPF_RET | BPF_K, accept no byte of any packet).
const DROP_ALL: libc::sock_filter = libc::sock_filter {
    code: 0x06,
    jt: 0,
    jf: 0,
    k: 0,
};

/// Seals a socket: a classic BPF socket filter that drops every packet (a
/// TCP listener's SYNs too: clients retry), until [`unseal`].
fn seal(fd: &impl AsFd) -> io::Result<()> {
    attach_filter(fd, &mut [DROP_ALL])
}

/// SO_ATTACH_FILTER: `code` becomes the socket's classic BPF filter.
fn attach_filter(fd: &impl AsFd, code: &mut [libc::sock_filter]) -> io::Result<()> {
    let prog = libc::sock_fprog {
        len: u16::try_from(code.len()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?,
        filter: code.as_mut_ptr(),
    };
    // SAFETY: the fd is open for the call; `prog` and the instructions it
    // points to outlive it (the kernel copies the program).
    let r = unsafe {
        libc::setsockopt(
            fd.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            (&prog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Takes the seal of [`create`] off a socket, once the sk_lookup program
/// steers to it with its allow/deny. A socket without that very filter
/// (none, or one its service attached) is left as it is.
pub fn unseal(fd: &impl AsFd) -> io::Result<()> {
    let mut code = [DROP_ALL; 2];
    // SO_GET_FILTER counts in instructions, not bytes: room for two, so a
    // longer filter (not ours) fails with EINVAL.
    let mut len = code.len() as libc::socklen_t;
    // SAFETY: the buffer holds `len` instructions and outlives the call.
    let r = unsafe {
        libc::getsockopt(
            fd.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_GET_FILTER,
            code.as_mut_ptr().cast(),
            &mut len,
        )
    };
    let ours = r == 0 && len == 1 && {
        let c = &code[0];
        (c.code, c.jt, c.jf, c.k) == (DROP_ALL.code, DROP_ALL.jt, DROP_ALL.jf, DROP_ALL.k)
    };
    if !ours {
        return Ok(());
    }
    set_int(fd, libc::SOL_SOCKET, libc::SO_DETACH_FILTER, 0)
}

/// An IP socket's options before bind: IPV6_V6ONLY, SO_REUSEADDR (and
/// SO_REUSEPORT: the unit's, or `reuse_port` for a reload's replacement), IP(V6)_FREEBIND on a steered socket, IP(V6)_TRANSPARENT.
fn ip_options(
    fd: &OwnedFd,
    cfg: &SocketConfig,
    addr: SocketAddr,
    steered: bool,
    dual_stack: Option<bool>,
    reuse_port: bool,
    what: &str,
) -> Result<(), ListenerError> {
    let o = &cfg.options;
    let sockopts = Setsockopt::on(fd, what);
    if addr.is_ipv6() {
        let v6only = match (o.ipv6_only, dual_stack) {
            (Some(v), _) => v,
            (None, Some(dual)) => !dual,
            (None, None) => false,
        };
        sockopts.set("setsockopt(IPV6_V6ONLY)", sockopt::Ipv6V6Only, &v6only)?;
    }
    // Stream sockets: a restarted holdfast must be able to bind while old
    // connections sit in TIME_WAIT. Datagram sockets get it too, as systemd
    // gives every socket unit (ReuseAddress= is on for both): a service that
    // opens its own socket on the same address next to the passed one, or a
    // second holdfast instance taking over, can bind.
    sockopts.set("setsockopt(SO_REUSEADDR)", sockopt::ReuseAddr, &true)?;
    if o.reuse_port || reuse_port {
        sockopts.set("setsockopt(SO_REUSEPORT)", sockopt::ReusePort, &true)?;
    }
    // A steered socket binds to loopback, which may be down in a fresh namespace.
    if o.free_bind || steered {
        if addr.is_ipv4() {
            sockopts.set("setsockopt(IP_FREEBIND)", sockopt::IpFreebind, &true)?;
        } else {
            sockopts.set_ipv6_flag("setsockopt(IPV6_FREEBIND)", libc::IPV6_FREEBIND)?;
        }
    }
    if o.transparent {
        if addr.is_ipv4() {
            sockopts.set("setsockopt(IP_TRANSPARENT)", sockopt::IpTransparent, &true)?;
        } else {
            sockopts.set_ipv6_flag("setsockopt(IPV6_TRANSPARENT)", libc::IPV6_TRANSPARENT)?;
        }
    }
    Ok(())
}

fn create_unix(cfg: &SocketConfig, path: &Path) -> Result<OwnedFd, ListenerError> {
    let what = format!("{} socket {}", cfg.protocol, path.display());
    let ty = match cfg.protocol {
        Protocol::UnixDgram => SockType::Datagram,
        _ => SockType::Stream,
    };
    let fd = sys(
        "socket",
        &what,
        socket::socket(AddressFamily::Unix, ty, SockFlag::SOCK_CLOEXEC, None),
    )?;
    set_common(&fd, cfg, &what)?;
    // A stale socket file from an earlier run would make bind fail; only a socket is removed.
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if meta.file_type().is_socket() {
            let _ = std::fs::remove_file(path);
        }
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|source| syscall_err("mkdir", &what, source))?;
    }
    let addr = sys("bind", &what, UnixAddr::new(path))?;
    sys("bind", &what, socket::bind(fd.as_raw_fd(), &addr))?;
    if let Some(mode) = cfg.options.mode {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(|source| syscall_err("chmod", &what, source))?;
    }
    let (uid, gid) = owner(cfg, &what)?;
    if uid.is_some() || gid.is_some() {
        std::os::unix::fs::lchown(path, uid, gid)
            .map_err(|source| syscall_err("chown", &what, source))?;
    }
    if ty == SockType::Stream {
        listen(&fd, cfg, &what)?;
    }
    Ok(fd)
}

/// The socket file's owner and group from `socket-user` and `socket-group`
/// (names or ids), as systemd's SocketUser=/SocketGroup=: a named user alone
/// brings its primary group. `None`: left as created (holdfast's).
fn owner(cfg: &SocketConfig, what: &str) -> Result<(Option<u32>, Option<u32>), ListenerError> {
    use nix::unistd::{Group, User};
    let missing = |key, name: &str| ListenerError::NoAccount {
        key,
        name: name.to_string(),
        what: what.to_string(),
    };
    let o = &cfg.options;
    let (mut uid, mut gid) = (None, None);
    if let Some(u) = &o.socket_user {
        match u.parse::<u32>() {
            Ok(id) => uid = Some(id),
            Err(_) => {
                let user = User::from_name(u)
                    .ok()
                    .flatten()
                    .ok_or_else(|| missing("socket-user", u))?;
                uid = Some(user.uid.as_raw());
                gid = Some(user.gid.as_raw());
            }
        }
    }
    if let Some(g) = &o.socket_group {
        gid = Some(match g.parse::<u32>() {
            Ok(id) => id,
            Err(_) => Group::from_name(g)
                .ok()
                .flatten()
                .ok_or_else(|| missing("socket-group", g))?
                .gid
                .as_raw(),
        });
    }
    Ok((uid, gid))
}

fn set_common(fd: &OwnedFd, cfg: &SocketConfig, what: &str) -> Result<(), ListenerError> {
    let o = &cfg.options;
    let sockopts = Setsockopt::on(fd, what);
    if let Some(n) = o.receive_buffer {
        sockopts.set("setsockopt(SO_RCVBUF)", sockopt::RcvBuf, &(n as usize))?;
    }
    if let Some(n) = o.send_buffer {
        sockopts.set("setsockopt(SO_SNDBUF)", sockopt::SndBuf, &(n as usize))?;
    }
    if let Some(mark) = o.mark {
        sockopts.set("setsockopt(SO_MARK)", sockopt::Mark, &mark)?;
    }
    Ok(())
}

/// Whether a live socket made from `from` can be changed in place to
/// `to`: the two differ at most in the options Linux lets a listening socket
/// change (the backlog, by listen() again; buffers and mark, set, not unset;
/// keep-alive and no-delay, inherited by sockets accepted afterwards).
pub fn adjustable(from: &SocketConfig, to: &SocketConfig) -> bool {
    let (a, b) = (&from.options, &to.options);
    let settable = |old: Option<u32>, new: Option<u32>| old.is_none() || new.is_some();
    if !(settable(a.receive_buffer, b.receive_buffer)
        && settable(a.send_buffer, b.send_buffer)
        && settable(a.mark, b.mark))
    {
        return false;
    }
    let mut same = from.clone();
    same.options.backlog = b.backlog;
    same.options.receive_buffer = b.receive_buffer;
    same.options.send_buffer = b.send_buffer;
    same.options.mark = b.mark;
    same.options.keep_alive = b.keep_alive;
    same.options.no_delay = b.no_delay;
    same == *to
}

/// Changes a live socket's options to `cfg`'s (see [`adjustable`]).
pub fn adjust(fd: &OwnedFd, cfg: &SocketConfig) -> Result<(), ListenerError> {
    let what = format!("{} socket {:?}", cfg.protocol, cfg.name);
    set_common(fd, cfg, &what)?;
    let stream = !matches!(cfg.protocol, Protocol::Udp | Protocol::UnixDgram);
    if stream {
        if cfg.protocol == Protocol::Tcp {
            let sockopts = Setsockopt::on(fd, &what);
            sockopts.set(
                "setsockopt(SO_KEEPALIVE)",
                sockopt::KeepAlive,
                &cfg.options.keep_alive,
            )?;
            sockopts.set(
                "setsockopt(TCP_NODELAY)",
                sockopt::TcpNoDelay,
                &cfg.options.no_delay,
            )?;
        }
        listen(fd, cfg, &what)?;
    }
    Ok(())
}

fn listen(fd: &OwnedFd, cfg: &SocketConfig, what: &str) -> Result<(), ListenerError> {
    let n = cfg
        .options
        .backlog
        .map(|b| i32::try_from(b).unwrap_or(i32::MAX))
        .unwrap_or(DEFAULT_BACKLOG);
    let backlog = Backlog::new(n).unwrap_or(Backlog::MAXCONN);
    sys("listen", what, socket::listen(fd, backlog))
}

/// setsockopt on one socket, a failure named by its call and the socket.
struct Setsockopt<'a> {
    fd: BorrowedFd<'a>,
    what: &'a str,
}

impl<'a> Setsockopt<'a> {
    fn on(fd: &'a impl AsFd, what: &'a str) -> Setsockopt<'a> {
        Setsockopt {
            fd: fd.as_fd(),
            what,
        }
    }

    fn set<O: SetSockOpt>(
        &self,
        call: &'static str,
        opt: O,
        value: &O::Val,
    ) -> Result<(), ListenerError> {
        sys(call, self.what, setsockopt(&self.fd, opt, value))
    }

    /// Turns on an IPv6 flag nix has no type for (the twins of IP_FREEBIND
    /// and IP_TRANSPARENT).
    fn set_ipv6_flag(&self, call: &'static str, name: i32) -> Result<(), ListenerError> {
        set_int(&self.fd, libc::SOL_IPV6, name, 1)
            .map_err(|source| syscall_err(call, self.what, source))
    }
}

fn syscall_err(call: &'static str, what: &str, source: io::Error) -> ListenerError {
    ListenerError::Syscall {
        call,
        what: what.to_string(),
        source,
    }
}

fn set_int(fd: &impl AsFd, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: the fd is open for the duration of the call, and the option value
    // is a plain int whose address and size are passed together.
    let r = unsafe {
        libc::setsockopt(
            fd.as_fd().as_raw_fd(),
            level,
            name,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A TCP listener's accept queue: (connections waiting, limit), from
/// TCP_INFO (for a listener the kernel reports them as unacked and sacked).
pub fn accept_queue(fd: &impl AsFd) -> Option<(u32, u32)> {
    // SAFETY: tcp_info is plain old data; zeroed is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the buffer and its length are passed together and outlive the call.
    let r = unsafe {
        libc::getsockopt(
            fd.as_fd().as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    // TCP_LISTEN is state 10.
    (r == 0 && info.tcpi_state == 10).then_some((info.tcpi_unacked, info.tcpi_sacked))
}

/// Makes a socket non-blocking (for the sockets holdfast accepts on itself).
pub fn set_nonblocking(fd: &impl AsFd) -> nix::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let raw = fd.as_fd().as_raw_fd();
    let flags = OFlag::from_bits_truncate(fcntl(raw, FcntlArg::F_GETFL)?);
    fcntl(raw, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).map(drop)
}

/// The address a socket is bound to, for status output.
pub fn local_addr(fd: &impl AsFd) -> Option<SocketAddr> {
    let addr: socket::SockaddrStorage = socket::getsockname(fd.as_fd().as_raw_fd()).ok()?;
    if let Some(a) = addr.as_sockaddr_in() {
        return Some(SocketAddr::from((a.ip(), a.port())));
    }
    addr.as_sockaddr_in6()
        .map(|a| SocketAddr::from((a.ip(), a.port())))
}

/// Whether `fd` is a listening stream socket.
pub fn is_listening(fd: &impl AsFd) -> bool {
    socket::getsockopt(fd, sockopt::AcceptConn).unwrap_or(false)
}

/// Stops a listening TCP socket listening, `shutdown(SHUT_RD)`: every
/// connection in its backlog is reset and new ones are refused (nothing
/// listens on the address), while the fd stays open, and bound where it
/// was bound to an explicit port, for [`listen_again`].
pub fn shut(fd: &impl AsFd, what: &str) -> Result<(), ListenerError> {
    sys(
        "shutdown(SHUT_RD)",
        what,
        socket::shutdown(fd.as_fd().as_raw_fd(), socket::Shutdown::Read),
    )
}

/// Listens again on a socket [`shut`] stopped, with `cfg`'s backlog.
pub fn listen_again(fd: &OwnedFd, cfg: &SocketConfig) -> Result<(), ListenerError> {
    listen(fd, cfg, &cfg.name)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::unit::{IpPrefix, PortRange, SocketOptions};

    /// A TCP socket named `web` on `addresses` (`"192.0.2.0/24"`) × `ports`.
    pub(crate) fn tcp(addresses: &[&str], ports: &[(u16, u16)]) -> SocketConfig {
        SocketConfig {
            name: "web".into(),
            protocol: Protocol::Tcp,
            addresses: addresses
                .iter()
                .map(|a| {
                    let (addr, len) = a.split_once('/').unwrap();
                    IpPrefix {
                        addr: addr.parse().unwrap(),
                        len: len.parse().unwrap(),
                    }
                })
                .collect(),
            ports: ports
                .iter()
                .map(|&(first, last)| PortRange { first, last })
                .collect(),
            path: None,
            options: SocketOptions::default(),
        }
    }

    #[test]
    fn placement_rules() {
        let single = tcp(&["127.0.0.1/32"], &[(8080, 8080)]);
        assert_eq!(
            Placement::for_socket(&single, false),
            Ok(Placement::Bound("127.0.0.1:8080".parse().unwrap()))
        );
        assert_eq!(
            Placement::for_socket(&single, true),
            Ok(Placement::Steered {
                ipv6: false,
                dual_stack: false,
                at: Some("127.0.0.1:8080".parse().unwrap()),
            })
        );
        let range = tcp(&["127.0.0.1/32"], &[(8000, 8099)]);
        assert_eq!(
            Placement::for_socket(&range, false),
            Err(PlacementError::NeedsDispatcher)
        );
        let wide = tcp(&["192.0.2.0/24"], &[(80, 80)]);
        assert_eq!(
            Placement::for_socket(&wide, false),
            Err(PlacementError::NeedsDispatcher)
        );
        // allow/deny: enforced by the dispatcher, or by holdfast where it accepts.
        let mut ruled = single.clone();
        ruled.options.deny = tcp(&["192.0.2.7/32"], &[]).addresses;
        assert_eq!(
            Placement::for_socket(&ruled, false),
            Err(PlacementError::RulesNeedDispatcher)
        );
        assert!(matches!(
            Placement::for_socket(&ruled, true),
            Ok(Placement::Steered { .. })
        ));
        ruled.options.accept = true;
        assert_eq!(
            Placement::for_socket(&ruled, false),
            Ok(Placement::Bound("127.0.0.1:8080".parse().unwrap()))
        );
        let dual = tcp(&["192.0.2.0/24", "2001:db8::/64"], &[(80, 80)]);
        assert_eq!(
            Placement::for_socket(&dual, true),
            Ok(Placement::Steered {
                ipv6: true,
                dual_stack: true,
                at: None,
            })
        );
    }

    /// Where a steered socket binds, so that getsockname() reports it: its
    /// one address and port, or loopback when it has no single one.
    #[test]
    fn a_steered_socket_binds_its_one_address_and_port() {
        let steered = |addresses: &[&str], ports: &[(u16, u16)], ipv6_only: Option<bool>| {
            let mut cfg = tcp(addresses, ports);
            cfg.options.ipv6_only = ipv6_only;
            match Placement::for_socket(&cfg, true) {
                Ok(Placement::Steered { at, .. }) => at.map(|a| a.to_string()),
                other => panic!("{addresses:?} {ports:?}: {other:?}"),
            }
        };
        /// (addresses, ports, ipv6-only, where it binds: None for loopback)
        type Case<'a> = (
            &'a [&'a str],
            &'a [(u16, u16)],
            Option<bool>,
            Option<&'a str>,
        );
        let cases: &[Case<'_>] = &[
            (
                &["127.0.0.1/32"],
                &[(7401, 7401)],
                None,
                Some("127.0.0.1:7401"),
            ),
            (&["192.0.2.7/32"], &[(80, 80)], None, Some("192.0.2.7:80")),
            (
                &["2001:db8::7/128"],
                &[(443, 443)],
                None,
                Some("[2001:db8::7]:443"),
            ),
            (
                &["2001:db8::7/128"],
                &[(443, 443)],
                Some(true),
                Some("[2001:db8::7]:443"),
            ),
            // A prefix, a port range, two addresses or two ports: no one address.
            (&["192.0.2.0/24"], &[(80, 80)], None, None),
            (&["192.0.2.7/32"], &[(8000, 8099)], None, None),
            (&["192.0.2.7/32"], &[(80, 80), (443, 443)], None, None),
            (&["192.0.2.7/32", "192.0.2.8/32"], &[(80, 80)], None, None),
            (&["0.0.0.0/0"], &[(80, 80)], None, None),
            // IPv4 traffic to an IPv4-mapped address is IPv4: no IPv6 socket binds it.
            (&["::ffff:192.0.2.7/128"], &[(80, 80)], None, None),
            // The wildcard would take the port on every address; link-local needs a scope.
            (&["0.0.0.0/32"], &[(80, 80)], None, None),
            (&["::/128"], &[(80, 80)], None, None),
            (&["255.255.255.255/32"], &[(80, 80)], None, None),
            (&["224.0.0.1/32"], &[(80, 80)], None, None),
            (&["fe80::1/128"], &[(80, 80)], None, None),
            // ipv6-only = false asks for a dual-stack socket: only [::] stays one.
            (&["192.0.2.7/32"], &[(80, 80)], Some(false), None),
        ];
        for (addresses, ports, v6only, want) in cases {
            assert_eq!(
                steered(addresses, ports, *v6only).as_deref(),
                *want,
                "{addresses:?} {ports:?} ipv6-only={v6only:?}"
            );
        }
    }

    /// The state of a holdfast from before `at` (an in-place upgrade) reads
    /// as a socket on loopback, as it is.
    #[test]
    fn a_steered_placement_saved_without_at_is_on_loopback() {
        let old = r#"{"Steered":{"ipv6":false,"dual_stack":false}}"#;
        let p: Placement = serde_json::from_str(old).unwrap();
        assert_eq!(p.steered_at(), None);
        let new = Placement::Steered {
            ipv6: false,
            dual_stack: false,
            at: Some("192.0.2.7:80".parse().unwrap()),
        };
        let back: Placement = serde_json::from_str(&serde_json::to_string(&new).unwrap()).unwrap();
        assert_eq!(back, new);
    }

    /// Runs `f` in a network namespace of its own (this thread's only), so
    /// that it may bind any address and port; `None` where that is not allowed.
    fn in_own_netns<T>(f: impl FnOnce() -> T + Send) -> Option<T>
    where
        T: Send,
    {
        std::thread::scope(|s| {
            s.spawn(|| {
                if let Err(e) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET) {
                    eprintln!("skipped: unshare(CLONE_NEWNET): {e}");
                    return None;
                }
                Some(f())
            })
            .join()
            .expect("the test thread")
        })
    }

    fn stranger_binds(at: SocketAddr, reuse_port: bool) -> nix::Result<OwnedFd> {
        let fam = if at.is_ipv4() {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        let fd = socket::socket(fam, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
        setsockopt(&fd, sockopt::ReuseAddr, &true)?;
        setsockopt(&fd, sockopt::ReusePort, &reuse_port)?;
        match at {
            SocketAddr::V4(a) => {
                setsockopt(&fd, sockopt::IpFreebind, &true)?;
                socket::bind(fd.as_raw_fd(), &SockaddrIn::from(a))?
            }
            SocketAddr::V6(a) => {
                set_int(&fd, libc::SOL_IPV6, libc::IPV6_FREEBIND, 1)
                    .map_err(|_| nix::Error::EINVAL)?;
                socket::bind(fd.as_raw_fd(), &SockaddrIn6::from(a))?
            }
        }
        socket::listen(&fd, Backlog::new(1).unwrap())?;
        Ok(fd)
    }

    /// A steered socket with allow/deny bound to its own address and port is
    /// sealed (it drops everything, so no client gets in around the
    /// program's rules) until `unseal`; a filter not ours stays.
    #[test]
    fn a_socket_with_source_rules_is_sealed_until_steered() {
        use std::net::{TcpListener, TcpStream};
        use std::time::Duration;
        let free = TcpListener::bind("127.0.0.1:0").unwrap();
        let at = free.local_addr().unwrap();
        drop(free);
        let mut cfg = tcp(&["127.0.0.1/32"], &[(at.port(), at.port())]);
        cfg.options.deny = tcp(&["192.0.2.7/32"], &[]).addresses;
        let placement = Placement::for_socket(&cfg, true).unwrap();
        assert_eq!(placement.steered_at(), Some(at));
        let fd = create(&cfg, &placement).unwrap();
        let err = TcpStream::connect_timeout(&at, Duration::from_millis(300)).unwrap_err();
        assert_eq!(
            err.kind(),
            io::ErrorKind::TimedOut,
            "a sealed listener took a SYN: {err}"
        );
        unseal(&fd).unwrap();
        TcpStream::connect_timeout(&at, Duration::from_secs(5)).expect("unsealed");
        // A filter of another shape is not the seal: it stays.
        let other = create(&cfg, &Placement::Bound("127.0.0.1:0".parse().unwrap())).unwrap();
        attach_filter(&other, &mut [DROP_ALL, DROP_ALL]).unwrap();
        unseal(&other).unwrap();
        let mut len: libc::socklen_t = 0;
        // SAFETY: a length of 0 asks only for the number of instructions.
        let r = unsafe {
            libc::getsockopt(
                other.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_GET_FILTER,
                std::ptr::null_mut(),
                &mut len,
            )
        };
        assert_eq!((r, len), (0, 2), "unseal took off a filter not its own");
    }

    /// A steered socket on its one address (need not be local), a reload's
    /// replacement bound beside it while it listens, twice; and no other
    /// socket, with or without SO_REUSEPORT, can bind there at any point
    /// (the kernel's memory of the reuseport bind is wiped).
    #[test]
    fn a_replacement_binds_beside_the_live_socket_and_no_stranger_can() {
        for (addr, port) in [
            ("192.0.2.7/32", "192.0.2.7:7401"),
            ("2001:db8::7/128", "[2001:db8::7]:7401"),
        ] {
            let at: SocketAddr = port.parse().unwrap();
            let cfg = tcp(&[addr], &[(7401, 7401)]);
            let placement = Placement::for_socket(&cfg, true).unwrap();
            assert_eq!(placement.steered_at(), Some(at));
            let done = in_own_netns(|| {
                let strangers_refused = |when: &str| {
                    for rp in [false, true] {
                        let e = stranger_binds(at, rp).map(drop).unwrap_err();
                        assert_eq!(e, nix::Error::EADDRINUSE, "{at} {when}, SO_REUSEPORT {rp}");
                    }
                };
                let first = create(&cfg, &placement).unwrap();
                assert_eq!(local_addr(&first), Some(at));
                assert!(!socket::getsockopt(&first, sockopt::ReusePort).unwrap());
                strangers_refused("beside the first socket");
                // Without the live socket's help, a second one cannot bind.
                assert!(create(&cfg, &placement).unwrap_err().address_refused());
                let second = create_beside(&cfg, &placement, &[first.as_fd()]).unwrap();
                assert_eq!(local_addr(&second), Some(at));
                assert!(is_listening(&second) && is_listening(&first));
                for fd in [&first, &second] {
                    assert!(!socket::getsockopt(fd, sockopt::ReusePort).unwrap());
                }
                strangers_refused("beside the first and its replacement");
                drop(first);
                strangers_refused("beside the replacement");
                let third = create_beside(&cfg, &placement, &[second.as_fd()]).unwrap();
                assert_eq!(local_addr(&third), Some(at));
                strangers_refused("beside the second replacement");
            });
            if done.is_none() {
                return;
            }
        }
    }

    #[test]
    fn udp_and_tcp_sockets_get_so_reuseaddr_as_under_systemd() {
        for protocol in [Protocol::Udp, Protocol::Tcp] {
            let mut cfg = tcp(&["127.0.0.1/32"], &[(1, 1)]);
            cfg.protocol = protocol;
            let fd = create(&cfg, &Placement::Bound("127.0.0.1:0".parse().unwrap())).unwrap();
            assert!(
                socket::getsockopt(&fd, sockopt::ReuseAddr).unwrap(),
                "{protocol}: SO_REUSEADDR is off"
            );
        }
        // What it is for: another SO_REUSEADDR datagram socket can bind the
        // same address and port (without it: EADDRINUSE).
        let mut cfg = tcp(&["127.0.0.1/32"], &[(1, 1)]);
        cfg.protocol = Protocol::Udp;
        let first = create(&cfg, &Placement::Bound("127.0.0.1:0".parse().unwrap())).unwrap();
        let addr = local_addr(&first).unwrap();
        create(&cfg, &Placement::Bound(addr)).expect("a second udp socket on the same address");
    }

    fn unix(path: &Path) -> SocketConfig {
        SocketConfig {
            name: "ctl".into(),
            protocol: Protocol::UnixStream,
            addresses: Vec::new(),
            ports: Vec::new(),
            path: Some(path.to_path_buf()),
            options: SocketOptions::default(),
        }
    }

    #[test]
    fn a_unix_socket_file_gets_its_owner_group_and_mode() {
        use std::os::unix::fs::MetadataExt;
        if !crate::testing::is_root_or_skip("chown to another user needs root (geteuid != 0)") {
            return;
        }
        let dir = std::env::temp_dir().join(format!("holdfast-listener-{}", std::process::id()));
        let path = dir.join("ctl.sock");
        let mut cfg = unix(&path);
        cfg.options.mode = Some(0o660);
        cfg.options.socket_user = Some("65534".into());
        cfg.options.socket_group = Some("4242".into());
        let _fd = create(&cfg, &Placement::Unix(path.clone())).unwrap();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid(), meta.mode() & 0o7777),
            (65534, 4242, 0o660)
        );
        // A named user alone brings its primary group, as SocketUser= does.
        let nobody = nix::unistd::User::from_uid(65534.into()).unwrap().unwrap();
        assert_ne!(nobody.gid.as_raw(), 0);
        cfg.options.socket_user = Some(nobody.name.clone());
        cfg.options.socket_group = None;
        let _fd = create(&cfg, &Placement::Unix(path.clone())).unwrap();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (65534, nobody.gid.as_raw()));
        // Unknown names fail the socket, naming the key.
        cfg.options.socket_group = Some("no-such-group-hf".into());
        let err = create(&cfg, &Placement::Unix(path.clone()))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("socket-group \"no-such-group-hf\" of unix-stream socket"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bound_socket_listens_with_its_options() {
        let mut cfg = tcp(&["127.0.0.1/32"], &[(1, 1)]);
        cfg.options.no_delay = true;
        cfg.options.keep_alive = true;
        // Port 0 asks the kernel for a free port; loopback exists in every namespace.
        let fd = create(&cfg, &Placement::Bound("127.0.0.1:0".parse().unwrap())).unwrap();
        let addr = local_addr(&fd).unwrap();
        assert!(addr.port() != 0);
        assert!(socket::getsockopt(&fd, sockopt::AcceptConn).unwrap());
        assert!(socket::getsockopt(&fd, sockopt::KeepAlive).unwrap());
        std::net::TcpStream::connect(addr).unwrap();
    }

    #[test]
    fn a_shut_listener_resets_its_backlog_refuses_and_listens_again() {
        let cfg = tcp(&["127.0.0.1/32"], &[(1, 1)]);
        // An explicit port (as bind mode binds), which a shut socket keeps.
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = free.local_addr().unwrap();
        drop(free);
        let fd = create(&cfg, &Placement::Bound(addr)).unwrap();
        let mut queued = std::net::TcpStream::connect(addr).unwrap();
        shut(&fd, "test").unwrap();
        assert!(!is_listening(&fd));
        // What waited in the backlog is reset, not left hanging.
        queued
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 8];
        match crate::testing::read_through_interruptions(&mut queued, &mut buf) {
            Ok(0) => {}
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
            Ok(n) => panic!("read {n} bytes from a reset connection"),
        }
        // A new client is refused at once.
        let err = std::net::TcpStream::connect(addr).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
        // Same fd, same address, listening again.
        listen_again(&fd, &cfg).unwrap();
        assert!(is_listening(&fd));
        assert_eq!(local_addr(&fd), Some(addr));
        std::net::TcpStream::connect(addr).unwrap();
    }
}
