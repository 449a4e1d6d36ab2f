//! UDP echo that answers from the address and port the client sent to.
//!
//! An unconnected UDP socket's replies leave from the address and port it is bound to. Behind
//! holdfast's sk_lookup dispatcher that is wrong: the socket is bound somewhere else (say
//! `127.0.0.1:41234`) and receives datagrams for a whole range (`192.0.2.7:8042`), so a reply
//! from the bound address never reaches a *connected* client, whose kernel drops datagrams from
//! any other source. This module learns each datagram's original destination
//! (IP_RECVORIGDSTADDR / IPV6_RECVORIGDSTADDR) and picks how to answer from it ([`reply_path`]):
//! the socket itself when it is bound there, the socket with a PKTINFO source address when it
//! is bound to the wildcard on that port, or else a send-only socket bound to the original
//! destination (SO_REUSEADDR + IP_FREEBIND / IPV6_FREEBIND; IP_TRANSPARENT as a fallback).
//! docs/udp-replies.md explains the choice.
//!
//! It never connects a reply socket (a connected socket would win the kernel's lookup over
//! sk_lookup and steal the client's next datagrams) and never changes options on the received
//! socket other than asking for the original destination.

use std::collections::HashMap;
use std::io::{IoSlice, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use nix::errno::Errno;
use nix::sys::socket::{
    bind, recvmsg, sendmsg, setsockopt, socket, sockopt, AddressFamily, ControlMessage,
    ControlMessageOwned, MsgFlags, SockFlag, SockType, SockaddrStorage,
};
use tracing::{debug, warn};

/// Reply sockets kept per receiving socket (one per original destination); the cache is
/// emptied when it is full, which only costs re-creating the sockets still in use.
const MAX_REPLY_SOCKETS: usize = 256;

/// Largest UDP payload.
const MAX_DATAGRAM: usize = 65_535;

#[derive(Debug, thiserror::Error)]
pub enum UdpError {
    #[error("read the local address of udp socket fd {fd}")]
    LocalAddr { fd: i32, source: std::io::Error },
    #[error("enable {option} on udp socket {local}")]
    EnableOrigDst {
        option: &'static str,
        local: SocketAddr,
        source: Errno,
    },
    #[error("receive on udp socket {local}")]
    Receive { local: SocketAddr, source: Errno },
    #[error("create a reply socket bound to {orig_dst}")]
    ReplySocket { orig_dst: SocketAddr, source: Errno },
    #[error("send a reply from {from} to {peer}")]
    Send {
        from: SocketAddr,
        peer: SocketAddr,
        source: Errno,
    },
}

/// How a reply gets the client's original destination as its source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyPath {
    /// The socket is bound to exactly that address and port (or the kernel said nothing):
    /// a plain `sendto` on it.
    Direct,
    /// The socket is bound to the wildcard address on that port: `sendmsg` on it with a PKTINFO
    /// source address, so a multi-homed host does not pick another one.
    SourceAddress(IpAddr),
    /// The datagram was steered here (sk_lookup, TPROXY) from another address or port: send
    /// through a socket bound to it.
    ReplySocket(SocketAddr),
}

/// Chooses how to answer a datagram that arrived on a socket bound to `local` and was sent by the
/// client to `orig_dst`. Pure: the table-driven tests pin every case.
pub fn reply_path(local: SocketAddr, orig_dst: Option<SocketAddr>) -> ReplyPath {
    let Some(orig) = orig_dst.map(unmapped) else {
        return ReplyPath::Direct;
    };
    let local = unmapped(local);
    if orig == local {
        ReplyPath::Direct
    } else if orig.port() == local.port() && local.ip().is_unspecified() {
        ReplyPath::SourceAddress(orig.ip())
    } else {
        ReplyPath::ReplySocket(orig)
    }
}

/// `::ffff:a.b.c.d` as the IPv4 address it is; anything else unchanged.
pub fn unmapped(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::from((v4, v6.port())),
            None => addr,
        },
        v4 => v4,
    }
}

/// One received datagram's addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Datagram {
    pub len: usize,
    /// The client, as the receiving socket's family spells it (v4-mapped on a dual-stack socket).
    pub peer: SocketAddr,
    /// Where the client sent it, when the kernel said (IP_ORIGDSTADDR / IPV6_ORIGDSTADDR).
    pub orig_dst: Option<SocketAddr>,
}

/// A UDP socket handed over through LISTEN_FDS, echoing every datagram back from the address
/// and port its client used.
#[derive(Debug)]
pub struct UdpEcho {
    socket: UdpSocket,
    local: SocketAddr,
    reply_sockets: HashMap<SocketAddr, UdpSocket>,
}

impl UdpEcho {
    /// Takes the socket and asks the kernel for each datagram's original destination.
    pub fn new(socket: UdpSocket) -> Result<UdpEcho, UdpError> {
        let fd = socket.as_raw_fd();
        let local = socket
            .local_addr()
            .map_err(|source| UdpError::LocalAddr { fd, source })?;
        let enable = |option, result: nix::Result<()>| {
            result.map_err(|source| UdpError::EnableOrigDst {
                option,
                local,
                source,
            })
        };
        if local.is_ipv4() {
            enable(
                "IP_RECVORIGDSTADDR",
                setsockopt(&socket, sockopt::Ipv4OrigDstAddr, &true),
            )?;
        } else {
            enable(
                "IPV6_RECVORIGDSTADDR",
                setsockopt(&socket, sockopt::Ipv6OrigDstAddr, &true),
            )?;
            // IPv4 datagrams on a dual-stack socket report their destination only through the
            // IPv4 option (the kernel takes the IPv4 control-message path for them).
            if !nix::sys::socket::getsockopt(&socket, sockopt::Ipv6V6Only).unwrap_or(true) {
                enable(
                    "IP_RECVORIGDSTADDR",
                    setsockopt(&socket, sockopt::Ipv4OrigDstAddr, &true),
                )?;
            }
        }
        Ok(UdpEcho {
            socket,
            local,
            reply_sockets: HashMap::new(),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Echoes until the socket fails. A reply that cannot be sent is logged and dropped, as UDP
    /// would drop it anyway.
    pub fn serve(mut self) -> Result<(), UdpError> {
        let mut buf = vec![0; MAX_DATAGRAM];
        loop {
            let datagram = self.recv(&mut buf)?;
            let data = &buf[..datagram.len];
            if let Err(e) = self.reply(data, datagram.peer, datagram.orig_dst) {
                warn!(local = %self.local, error = %e, "reply dropped");
            }
        }
    }

    /// Receives one datagram into `buf` with its peer and original destination.
    pub fn recv(&self, buf: &mut [u8]) -> Result<Datagram, UdpError> {
        loop {
            let mut iov = [IoSliceMut::new(buf)];
            // Room for one sockaddr_in6 and one sockaddr_in: a dual-stack socket may carry either.
            let mut cmsg = nix::cmsg_space!(libc::sockaddr_in6, libc::sockaddr_in);
            let received = recvmsg::<SockaddrStorage>(
                self.socket.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC,
            );
            let msg = match received {
                Ok(msg) => msg,
                Err(Errno::EINTR) => continue,
                // The manager's socket may be O_NONBLOCK (the flag lives on the shared file
                // description): wait for the next datagram.
                Err(Errno::EAGAIN) => {
                    crate::wait_readable(self.socket.as_fd());
                    continue;
                }
                Err(source) => {
                    return Err(UdpError::Receive {
                        local: self.local,
                        source,
                    })
                }
            };
            let Some(peer) = msg.address.as_ref().and_then(to_socket_addr) else {
                continue; // no source address: nobody to answer
            };
            let mut orig_dst = None;
            for c in msg.cmsgs().into_iter().flatten() {
                match c {
                    ControlMessageOwned::Ipv4OrigDstAddr(sin) => {
                        orig_dst = Some(SocketAddr::V4(sockaddr_in_to_std(&sin)));
                    }
                    ControlMessageOwned::Ipv6OrigDstAddr(sin6) => {
                        orig_dst = Some(SocketAddr::V6(sockaddr_in6_to_std(&sin6)));
                    }
                    _ => {}
                }
            }
            return Ok(Datagram {
                len: msg.bytes,
                peer,
                orig_dst,
            });
        }
    }

    /// Sends `data` to `peer` from `orig_dst` (the address and port the peer sent to), as
    /// [`reply_path`] decides; returns the path it took.
    pub fn reply(
        &mut self,
        data: &[u8],
        peer: SocketAddr,
        orig_dst: Option<SocketAddr>,
    ) -> Result<ReplyPath, UdpError> {
        let path = reply_path(self.local, orig_dst);
        match path {
            ReplyPath::Direct => {
                let from = self.local;
                self.socket
                    .send_to(data, peer)
                    .map_err(|e| send_error(from, peer, e))?;
            }
            ReplyPath::SourceAddress(source) => {
                send_from_source(&self.socket, self.local, data, peer, source)?;
            }
            ReplyPath::ReplySocket(orig) => {
                let peer = unmapped(peer);
                let socket = self.reply_socket(orig)?;
                match socket.send_to(data, peer) {
                    // The source address is not local: only IP_TRANSPARENT may send from it.
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                        set_transparent(socket.as_fd(), orig.is_ipv4())
                            .map_err(|source| send_error(orig, peer, source.into()))?;
                        socket
                            .send_to(data, peer)
                            .map_err(|e| send_error(orig, peer, e))?;
                    }
                    result => {
                        result.map_err(|e| send_error(orig, peer, e))?;
                    }
                }
            }
        }
        Ok(path)
    }

    /// The send-only socket bound to `orig_dst`, made on first use.
    fn reply_socket(&mut self, orig_dst: SocketAddr) -> Result<&UdpSocket, UdpError> {
        if !self.reply_sockets.contains_key(&orig_dst) {
            if self.reply_sockets.len() >= MAX_REPLY_SOCKETS {
                self.reply_sockets.clear();
            }
            let socket = bind_reply_socket(orig_dst)
                .map_err(|source| UdpError::ReplySocket { orig_dst, source })?;
            debug!(local = %self.local, %orig_dst, "reply socket bound");
            self.reply_sockets.insert(orig_dst, socket);
        }
        Ok(&self.reply_sockets[&orig_dst])
    }
}

/// A UDP socket bound to `addr` that only sends: SO_REUSEADDR (another instance may hold the
/// same reply address), IP_FREEBIND / IPV6_FREEBIND (the address may be routed here without
/// being assigned to an interface, e.g. `ip route add local 2001:db8::/64 dev lo`), and a
/// socket filter that drops everything, so it never queues the traffic it might match when
/// nothing steers that traffic elsewhere. Never connected: a connected socket would win the
/// kernel's lookup over sk_lookup and take the client's next datagrams.
pub fn bind_reply_socket(addr: SocketAddr) -> nix::Result<UdpSocket> {
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd: OwnedFd = socket(family, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    if addr.is_ipv4() {
        setsockopt(&fd, sockopt::IpFreebind, &true)?;
    } else {
        setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
        set_int_option(fd.as_fd(), libc::IPPROTO_IPV6, libc::IPV6_FREEBIND, 1)?;
    }
    attach_drop_all_filter(fd.as_fd())?;
    bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
    Ok(UdpSocket::from(fd))
}

/// `sendmsg` on the received socket with IP_PKTINFO / IPV6_PKTINFO naming the source address.
fn send_from_source(
    socket: &UdpSocket,
    local: SocketAddr,
    data: &[u8],
    peer: SocketAddr,
    source: IpAddr,
) -> Result<(), UdpError> {
    let from = SocketAddr::new(source, local.port());
    let iov = [IoSlice::new(data)];
    let to = SockaddrStorage::from(peer);
    let send = |cmsg: &[ControlMessage<'_>]| {
        sendmsg(socket.as_raw_fd(), &iov, cmsg, MsgFlags::empty(), Some(&to))
    };
    let sent = if local.is_ipv4() {
        let IpAddr::V4(v4) = source else {
            unreachable!("an IPv4 socket only receives IPv4 datagrams")
        };
        let info = libc::in_pktinfo {
            ipi_ifindex: 0,
            ipi_spec_dst: libc::in_addr {
                s_addr: u32::from(v4).to_be(),
            },
            ipi_addr: libc::in_addr { s_addr: 0 },
        };
        send(&[ControlMessage::Ipv4PacketInfo(&info)])
    } else {
        // On an IPv6 socket an IPv4 source is written v4-mapped; the kernel takes it for a
        // v4-mapped destination.
        let v6 = match source {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        };
        let info = libc::in6_pktinfo {
            ipi6_addr: libc::in6_addr {
                s6_addr: v6.octets(),
            },
            ipi6_ifindex: 0,
        };
        let cmsg = [ControlMessage::Ipv6PacketInfo(&info)];
        match send(&cmsg) {
            // IPv6 accepts a PKTINFO source only if it is assigned to an interface, unless the
            // socket may use non-local addresses; a prefix made local with `ip route add local`
            // (as holdfast's ranges are) is not assigned. IPV6_FREEBIND lifts that check and
            // changes nothing else for a bound socket (the unit's `free-bind = true` sets it
            // from the start).
            Err(Errno::EINVAL) => {
                set_int_option(socket.as_fd(), libc::IPPROTO_IPV6, libc::IPV6_FREEBIND, 1)
                    .map_err(|source| UdpError::Send { from, peer, source })?;
                debug!(%local, %from, "IPV6_FREEBIND set to answer from a routed-local address");
                send(&cmsg)
            }
            result => result,
        }
    };
    sent.map(drop)
        .map_err(|source| UdpError::Send { from, peer, source })
}

fn send_error(from: SocketAddr, peer: SocketAddr, e: std::io::Error) -> UdpError {
    let source = e.raw_os_error().map_or(Errno::EIO, Errno::from_raw);
    UdpError::Send { from, peer, source }
}

/// IP_TRANSPARENT / IPV6_TRANSPARENT: send from an address that is not local at all (TPROXY
/// setups). Needs CAP_NET_ADMIN or CAP_NET_RAW; EPERM otherwise.
fn set_transparent(fd: BorrowedFd<'_>, ipv4: bool) -> nix::Result<()> {
    if ipv4 {
        setsockopt(&fd, sockopt::IpTransparent, &true)
    } else {
        set_int_option(fd, libc::IPPROTO_IPV6, libc::IPV6_TRANSPARENT, 1)
    }
}

/// An integer socket option nix 0.29 has no wrapper for (IPV6_FREEBIND, IPV6_TRANSPARENT).
fn set_int_option(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> nix::Result<()> {
    // SAFETY: `fd` is a valid open socket for the borrow; the option value points at a live
    // c_int and the length passed is exactly its size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    Errno::result(rc).map(drop)
}

/// A one-instruction classic BPF socket filter, `ret #0`: every datagram is dropped before it
/// is queued.
fn attach_drop_all_filter(fd: BorrowedFd<'_>) -> nix::Result<()> {
    let mut drop_all = [libc::sock_filter {
        code: (libc::BPF_RET | libc::BPF_K) as u16,
        jt: 0,
        jf: 0,
        k: 0,
    }];
    let program = libc::sock_fprog {
        len: drop_all.len() as u16,
        filter: drop_all.as_mut_ptr(),
    };
    // SAFETY: `fd` is a valid open socket; `program` points at `drop_all`, which outlives the
    // call, and its length is exactly the size of a sock_fprog. The kernel copies the filter.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            (&program as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    Errno::result(rc).map(drop)
}

fn to_socket_addr(addr: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(sin) = addr.as_sockaddr_in() {
        Some(SocketAddr::V4(SocketAddrV4::from(*sin)))
    } else {
        addr.as_sockaddr_in6()
            .map(|sin6| SocketAddr::V6(SocketAddrV6::from(*sin6)))
    }
}

fn sockaddr_in_to_std(sin: &libc::sockaddr_in) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
        u16::from_be(sin.sin_port),
    )
}

fn sockaddr_in6_to_std(sin6: &libc::sockaddr_in6) -> SocketAddrV6 {
    SocketAddrV6::new(
        Ipv6Addr::from(sin6.sin6_addr.s6_addr),
        u16::from_be(sin6.sin6_port),
        u32::from_be(sin6.sin6_flowinfo),
        sin6.sin6_scope_id,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn reply_path_table() {
        use ReplyPath::*;
        #[rustfmt::skip]
        let cases: &[(&str, Option<&str>, ReplyPath)] = &[
            // No original destination from the kernel: the socket's own address.
            ("127.0.0.1:5353", None, Direct),
            // Bound exactly where the client sent.
            ("127.0.0.1:5353", Some("127.0.0.1:5353"), Direct),
            ("[::1]:5353", Some("[::1]:5353"), Direct),
            // Dual-stack socket bound to a v4-mapped address, v4 original destination.
            ("[::ffff:127.0.0.1]:5353", Some("127.0.0.1:5353"), Direct),
            // Wildcard on the right port: only the source address needs choosing.
            ("0.0.0.0:5353", Some("192.0.2.7:5353"), SourceAddress(ip("192.0.2.7"))),
            ("[::]:5353", Some("[2001:db8::7]:5353"), SourceAddress(ip("2001:db8::7"))),
            ("[::]:5353", Some("192.0.2.7:5353"), SourceAddress(ip("192.0.2.7"))),
            // Steered by sk_lookup: bound elsewhere, the port differs.
            ("127.0.0.1:41234", Some("192.0.2.7:8042"), ReplySocket(sa("192.0.2.7:8042"))),
            ("0.0.0.0:41234", Some("192.0.2.7:8042"), ReplySocket(sa("192.0.2.7:8042"))),
            ("[::1]:41234", Some("[2001:db8::7]:8042"), ReplySocket(sa("[2001:db8::7]:8042"))),
            ("[::]:41234", Some("192.0.2.7:8042"), ReplySocket(sa("192.0.2.7:8042"))),
            // Same port, another address (a /24 steered to a socket bound to one address).
            ("127.0.0.1:8042", Some("192.0.2.7:8042"), ReplySocket(sa("192.0.2.7:8042"))),
            // A v4-mapped original destination is answered over IPv4.
            ("[::1]:41234", Some("[::ffff:192.0.2.7]:8042"), ReplySocket(sa("192.0.2.7:8042"))),
        ];
        for (local, orig, want) in cases {
            let got = reply_path(sa(local), orig.map(sa));
            assert_eq!(got, *want, "local {local}, original destination {orig:?}");
        }
    }

    #[test]
    fn unmapped_only_touches_v4_mapped_addresses() {
        assert_eq!(unmapped(sa("[::ffff:10.1.2.3]:9")), sa("10.1.2.3:9"));
        assert_eq!(unmapped(sa("[::1]:9")), sa("[::1]:9"));
        assert_eq!(unmapped(sa("10.1.2.3:9")), sa("10.1.2.3:9"));
    }

    #[test]
    fn direct_datagram_reports_its_original_destination() {
        // Unprivileged: a datagram sent straight to the socket reports the socket's own address.
        for bind_to in ["127.0.0.1:0", "[::1]:0"] {
            let mut echo = UdpEcho::new(UdpSocket::bind(bind_to).unwrap()).unwrap();
            let client = UdpSocket::bind(if bind_to.starts_with('[') {
                "[::1]:0"
            } else {
                "127.0.0.1:0"
            })
            .unwrap();
            client.connect(echo.local_addr()).unwrap();
            client.send(b"ping").unwrap();
            let mut buf = [0; 64];
            let got = echo.recv(&mut buf).unwrap();
            assert_eq!(got.orig_dst, Some(echo.local_addr()));
            assert_eq!(got.peer, client.local_addr().unwrap());
            let path = echo.reply(&buf[..got.len], got.peer, got.orig_dst).unwrap();
            assert_eq!(path, ReplyPath::Direct);
            client
                .set_read_timeout(Some(std::time::Duration::from_secs(5)))
                .unwrap();
            let n = client.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], b"ping");
        }
    }
}
