//! The UDP reply path against the real kernel, in a fresh network namespace where 192.0.2.0/24
//! and 2001:db8::/64 are local (`ip route add local … dev lo`), as they are behind holdfast's
//! sk_lookup dispatcher.
//!
//! Until the dispatcher can steer for these tests, the steering is emulated: the client's
//! datagram is sent straight to the socket (bound to loopback on a random port), and the reply
//! is made with the original destination sk_lookup would have preserved (`192.0.2.7:8042`).
//! The client is a *connected* UDP socket, whose kernel drops any datagram that does not come
//! from exactly the address and port it is connected to: it receives the echo only if the
//! reply left from there.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use echo::udp::{ReplyPath, UdpEcho};
use holdfast_testkit::netns_with_local_routes;

struct Case {
    /// Where the steered socket is bound (port 0: any).
    bind: &'static str,
    /// Where the client sends, and what it is connected to.
    orig_dst: &'static str,
    /// The client's own address.
    client: &'static str,
}

const CASES: &[Case] = &[
    Case {
        bind: "127.0.0.1:0",
        orig_dst: "192.0.2.7:8042",
        client: "192.0.2.1:0",
    },
    // Steered from the same port number on another address.
    Case {
        bind: "127.0.0.1:8042",
        orig_dst: "192.0.2.7:8042",
        client: "192.0.2.1:0",
    },
    Case {
        bind: "[::1]:0",
        orig_dst: "[2001:db8::7]:8042",
        client: "[::1]:0",
    },
    // A dual-stack socket receiving IPv4: the peer arrives v4-mapped, the reply goes over IPv4.
    Case {
        bind: "[::]:0",
        orig_dst: "192.0.2.7:8043",
        client: "192.0.2.1:0",
    },
    Case {
        bind: "[::]:0",
        orig_dst: "[2001:db8::7]:8043",
        client: "[::1]:0",
    },
];

#[test]
fn steered_datagrams_are_answered_from_the_original_destination() {
    let Some(ns) = netns_with_local_routes(&["192.0.2.0/24", "2001:db8::/64"]).unwrap() else {
        return;
    };
    let _inside = ns.enter().unwrap();
    for case in CASES {
        let orig_dst: SocketAddr = case.orig_dst.parse().unwrap();
        let mut echo = UdpEcho::new(UdpSocket::bind(case.bind).unwrap()).unwrap();
        let local = echo.local_addr();
        let loopback = if local.is_ipv4() || orig_dst.is_ipv4() {
            "127.0.0.1"
        } else {
            "::1"
        };
        let direct = SocketAddr::new(loopback.parse().unwrap(), local.port());

        let client = UdpSocket::bind(case.client).unwrap();
        client.connect(orig_dst).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        // Emulated steering: the datagram goes straight to the socket. (Linux lets a connected
        // UDP socket name another destination in sendto.)
        client.send_to(b"ping", direct).unwrap();

        let mut buf = [0u8; 64];
        let got = echo.recv(&mut buf).unwrap();
        assert_eq!(
            echo::udp::unmapped(got.peer),
            client.local_addr().unwrap(),
            "{}",
            case.orig_dst
        );
        assert_eq!(&buf[..got.len], b"ping");
        // sk_lookup keeps the client's destination; the emulation substitutes it here.
        let path = echo.reply(b"pong", got.peer, Some(orig_dst)).unwrap();
        assert_eq!(path, ReplyPath::ReplySocket(orig_dst));

        let mut reply = [0u8; 64];
        let (n, from) = client
            .recv_from(&mut reply)
            .unwrap_or_else(|e| panic!("no reply from {orig_dst} (socket bound to {local}): {e}"));
        assert_eq!((&reply[..n], from), (&b"pong"[..], orig_dst));

        // A second datagram reuses the reply socket; and a reply from the bound address (what
        // a plain sendto would do) never reaches the connected client: the check above can fail.
        echo.reply(b"again", got.peer, Some(orig_dst)).unwrap();
        let (n, _) = client.recv_from(&mut reply).unwrap();
        assert_eq!(&reply[..n], b"again");
        assert_eq!(
            echo.reply(b"wrong", got.peer, None).unwrap(),
            ReplyPath::Direct
        );
        client
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        assert!(
            client.recv(&mut reply).is_err(),
            "a connected client accepted a reply from {local}, not {orig_dst}"
        );
    }
}

#[test]
fn reply_sockets_never_take_the_traffic_they_are_bound_to() {
    let Some(ns) = netns_with_local_routes(&["192.0.2.0/24"]).unwrap() else {
        return;
    };
    let _inside = ns.enter().unwrap();
    let orig_dst: SocketAddr = "192.0.2.9:8044".parse().unwrap();
    let reply = echo::udp::bind_reply_socket(orig_dst).unwrap();
    // SO_REUSEADDR: a second reply socket (another instance's) binds the same address.
    let second = echo::udp::bind_reply_socket(orig_dst).unwrap();
    let sender = UdpSocket::bind("192.0.2.1:0").unwrap();
    sender.send_to(b"stray", orig_dst).unwrap();
    for socket in [&reply, &second] {
        socket
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut buf = [0u8; 16];
        assert!(
            socket.recv(&mut buf).is_err(),
            "the drop-all filter let a datagram in"
        );
    }
}
