//! echo: TCP, UDP and unix-socket echo for every socket passed through LISTEN_FDS.
//!
//! This library holds what the binary serves a socket with: [`classify`] reads what an
//! inherited fd is (SO_TYPE, SO_ACCEPTCONN, the address family), [`stream`] echoes stream
//! sockets (a thread per connection), [`unix_dgram`] unix datagram sockets, and [`udp`] echoes datagrams from the address and port
//! the client sent to, even when sk_lookup steered them to a socket bound elsewhere. It never
//! closes, shuts down or re-binds a socket it was handed, so the manager's copy stays usable.

pub mod stream;
pub mod udp;
pub mod unix_dgram;

use std::os::fd::{AsRawFd, BorrowedFd};

use nix::sys::socket::{
    getsockname, getsockopt, sockopt, AddressFamily, SockType, SockaddrLike, SockaddrStorage,
};

/// What an inherited fd is, as far as echoing it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketKind {
    /// A listening TCP or unix stream socket: accept and echo each connection.
    StreamListener { unix: bool },
    /// One already accepted stream connection (inetd style, `Accept=yes`): echo it.
    StreamConnection { unix: bool },
    /// A UDP socket.
    Udp,
    /// A unix datagram socket: echo to senders that have an address.
    UnixDatagram,
    /// Anything else (another socket type, a pipe, a stored memfd): left alone.
    Other,
}

/// Reads what `fd` is with getsockopt(SO_TYPE), getsockopt(SO_ACCEPTCONN) and getsockname.
pub fn classify(fd: BorrowedFd<'_>) -> SocketKind {
    let Ok(kind) = getsockopt(&fd, sockopt::SockType) else {
        return SocketKind::Other; // ENOTSOCK
    };
    let family = getsockname::<SockaddrStorage>(fd.as_raw_fd())
        .ok()
        .and_then(|a| a.family());
    let (inet, unix) = match family {
        Some(AddressFamily::Inet | AddressFamily::Inet6) => (true, false),
        Some(AddressFamily::Unix) => (false, true),
        _ => (false, false),
    };
    match kind {
        SockType::Stream if inet || unix => {
            if getsockopt(&fd, sockopt::AcceptConn).unwrap_or(false) {
                SocketKind::StreamListener { unix }
            } else {
                SocketKind::StreamConnection { unix }
            }
        }
        SockType::Datagram if inet => SocketKind::Udp,
        SockType::Datagram if unix => SocketKind::UnixDatagram,
        _ => SocketKind::Other,
    }
}

/// Blocks until `fd` is readable. For sockets whose shared file description is O_NONBLOCK
/// (the flag belongs to the manager's copy too, so it is waited out, never cleared).
pub fn wait_readable(fd: BorrowedFd<'_>) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    // EINTR or a spurious wake-up just sends the caller round its loop again.
    let _ = poll(&mut fds, PollTimeout::NONE);
}
