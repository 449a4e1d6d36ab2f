//! Listening sockets: creating them with their options, in one of three
//! placements. Owns nothing after creation: the caller keeps the fd for as long
//! as the socket must live (a socket whose last fd closes also leaves the
//! sockmap). Knows nothing of services or BPF.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::sys::socket::{
    self, setsockopt, sockopt, AddressFamily, Backlog, SockFlag, SockProtocol, SockType,
    SockaddrIn, SockaddrIn6, UnixAddr,
};

use crate::unit::{Protocol, SocketConfig};

/// Where a socket is bound.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Placement {
    /// Bind mode: bound directly to its one address and port.
    Bound(SocketAddr),
    /// Steered by the sk_lookup dispatcher: bound to a loopback address on a
    /// kernel-chosen port; traffic reaches it through the sockmap.
    /// `dual_stack` when it serves IPv4 and IPv6: then it binds `[::]` on a
    /// kernel-chosen port, since only a wildcard-bound IPv6 socket can stay
    /// dual-stack.
    Steered { ipv6: bool, dual_stack: bool },
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
            return Ok(Placement::Steered {
                ipv6,
                dual_stack: ipv6 && any_v4,
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
    match placement {
        Placement::Unix(path) => create_unix(cfg, path),
        Placement::Bound(addr) => create_ip(cfg, *addr, false, None),
        Placement::Steered { ipv6, dual_stack } => {
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
            create_ip(cfg, addr, true, Some(*dual_stack))
        }
    }
}

fn create_ip(
    cfg: &SocketConfig,
    addr: SocketAddr,
    steered: bool,
    dual_stack: Option<bool>,
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
    ip_options(&fd, cfg, addr, steered, dual_stack, &what)?;
    set_common(&fd, cfg, &what)?;
    let o = &cfg.options;
    if ty == SockType::Stream {
        if o.keep_alive {
            sys(
                "setsockopt(SO_KEEPALIVE)",
                &what,
                setsockopt(&fd, sockopt::KeepAlive, &true),
            )?;
        }
        if o.no_delay {
            sys(
                "setsockopt(TCP_NODELAY)",
                &what,
                setsockopt(&fd, sockopt::TcpNoDelay, &true),
            )?;
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

/// An IP socket's options before bind: IPV6_V6ONLY, SO_REUSEADDR (and
/// SO_REUSEPORT), IP(V6)_FREEBIND on a steered socket, IP(V6)_TRANSPARENT.
fn ip_options(
    fd: &OwnedFd,
    cfg: &SocketConfig,
    addr: SocketAddr,
    steered: bool,
    dual_stack: Option<bool>,
    what: &str,
) -> Result<(), ListenerError> {
    let o = &cfg.options;
    if addr.is_ipv6() {
        let v6only = match (o.ipv6_only, dual_stack) {
            (Some(v), _) => v,
            (None, Some(dual)) => !dual,
            (None, None) => false,
        };
        sys(
            "setsockopt(IPV6_V6ONLY)",
            what,
            setsockopt(fd, sockopt::Ipv6V6Only, &v6only),
        )?;
    }
    // Stream sockets: a restarted holdfast must be able to bind while old
    // connections sit in TIME_WAIT. Datagram sockets get it too, as systemd
    // gives every socket unit (ReuseAddress= is on for both): a service that
    // opens its own socket on the same address next to the passed one, or a
    // second holdfast instance taking over, can bind.
    sys(
        "setsockopt(SO_REUSEADDR)",
        what,
        setsockopt(fd, sockopt::ReuseAddr, &true),
    )?;
    if o.reuse_port {
        sys(
            "setsockopt(SO_REUSEPORT)",
            what,
            setsockopt(fd, sockopt::ReusePort, &true),
        )?;
    }
    // A steered socket binds to loopback, which may be down in a fresh namespace.
    if o.free_bind || steered {
        if addr.is_ipv4() {
            sys(
                "setsockopt(IP_FREEBIND)",
                what,
                setsockopt(fd, sockopt::IpFreebind, &true),
            )?;
        } else {
            set_int(fd, libc::SOL_IPV6, libc::IPV6_FREEBIND, 1)
                .map_err(|source| syscall_err("setsockopt(IPV6_FREEBIND)", what, source))?;
        }
    }
    if o.transparent {
        if addr.is_ipv4() {
            sys(
                "setsockopt(IP_TRANSPARENT)",
                what,
                setsockopt(fd, sockopt::IpTransparent, &true),
            )?;
        } else {
            set_int(fd, libc::SOL_IPV6, libc::IPV6_TRANSPARENT, 1)
                .map_err(|source| syscall_err("setsockopt(IPV6_TRANSPARENT)", what, source))?;
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
    if let Some(n) = o.receive_buffer {
        sys(
            "setsockopt(SO_RCVBUF)",
            what,
            setsockopt(fd, sockopt::RcvBuf, &(n as usize)),
        )?;
    }
    if let Some(n) = o.send_buffer {
        sys(
            "setsockopt(SO_SNDBUF)",
            what,
            setsockopt(fd, sockopt::SndBuf, &(n as usize)),
        )?;
    }
    if let Some(mark) = o.mark {
        sys(
            "setsockopt(SO_MARK)",
            what,
            setsockopt(fd, sockopt::Mark, &mark),
        )?;
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
            sys(
                "setsockopt(SO_KEEPALIVE)",
                &what,
                setsockopt(fd, sockopt::KeepAlive, &cfg.options.keep_alive),
            )?;
            sys(
                "setsockopt(TCP_NODELAY)",
                &what,
                setsockopt(fd, sockopt::TcpNoDelay, &cfg.options.no_delay),
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
                dual_stack: false
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
                dual_stack: true
            })
        );
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
        use std::io::Read;
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
        match queued.read(&mut buf) {
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
