//! echo as a real process: under `systemd-socket-activate` (TCP and UDP, IPv4, IPv6 and
//! dual-stack), with a mix of sockets handed over the way holdfast hands them, and, in a network
//! namespace, answering UDP from the address the client used on a wildcard-bound socket.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::time::Duration;

use holdfast_testkit::{
    loopback4 as v4, loopback6 as v6, netns_with_local_routes, wait_for, Activated, HandedFds,
};

const BIN: &str = env!("CARGO_BIN_EXE_echo");
const TIMEOUT: Duration = Duration::from_secs(10);

/// Several messages on one TCP connection, each echoed whole.
fn check_tcp(addr: SocketAddr, tag: &str) {
    let mut conn = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    conn.set_read_timeout(Some(TIMEOUT)).unwrap();
    for i in 0..5 {
        let message = format!("{tag} message {i}\n");
        conn.write_all(message.as_bytes()).unwrap();
        let mut back = vec![0; message.len()];
        conn.read_exact(&mut back)
            .unwrap_or_else(|e| panic!("echo from {addr}: {e}"));
        assert_eq!(String::from_utf8(back).unwrap(), message);
    }
}

/// Datagrams from a *connected* client: its kernel drops anything that does not come from
/// exactly `addr`, so each echo also proves the reply's source address and port.
fn check_udp(client_bind: &str, addr: SocketAddr) {
    let client = UdpSocket::bind(client_bind).unwrap();
    client.connect(addr).unwrap();
    client.set_read_timeout(Some(TIMEOUT)).unwrap();
    for i in 0..3 {
        let message = format!("datagram {i} to {addr}");
        client.send(message.as_bytes()).unwrap();
        let mut buf = [0u8; 256];
        let n = client
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no echo from {addr}: {e}"));
        assert_eq!(&buf[..n], message.as_bytes());
    }
}

#[test]
fn echoes_tcp_over_ipv4_and_ipv6_under_systemd_socket_activate() {
    let service = Activated::start(2, |p| {
        let args = ["--fdname=tcp4:tcp6", "--", BIN];
        [
            format!("--listen=127.0.0.1:{}", p[0]),
            format!("--listen=[::1]:{}", p[1]),
        ]
        .into_iter()
        .chain(args.map(String::from))
        .collect()
    })
    .unwrap();
    let (addr4, addr6) = (v4(service.ports[0]), v6(service.ports[1]));
    check_tcp(addr4, "first");
    // Concurrent connections on both families.
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let addr = if i % 2 == 0 { addr4 } else { addr6 };
            std::thread::spawn(move || check_tcp(addr, &format!("client {i}")))
        })
        .collect();
    for t in threads {
        t.join()
            .unwrap_or_else(|_| panic!("a TCP client failed\n{}", service.log()));
    }
}

#[test]
fn echoes_udp_over_ipv4_ipv6_and_dual_stack_under_systemd_socket_activate() {
    // A bare port is a dual-stack [::]:PORT socket.
    let service = Activated::start(3, |p| {
        let args = ["--datagram", "--fdname=udp4:udp6:udp46", "--", BIN];
        let listen = [
            format!("127.0.0.1:{}", p[0]),
            format!("[::1]:{}", p[1]),
            p[2].to_string(),
        ];
        listen
            .iter()
            .map(|l| format!("--listen={l}"))
            .chain(args.map(String::from))
            .collect()
    })
    .unwrap();
    let [p4, p6, p46] = [service.ports[0], service.ports[1], service.ports[2]];
    check_udp("127.0.0.1:0", v4(p4));
    check_udp("[::1]:0", v6(p6));
    check_udp("127.0.0.1:0", v4(p46));
    check_udp("[::1]:0", v6(p46));
    assert!(service.log().contains("serving"), "{}", service.log());
}

/// Every kind of fd at once, passed as holdfast passes them: TCP and UDP (IPv4 and dual-stack),
/// a unix stream listener, a unix datagram socket, and a pipe that echo must leave alone.
/// READY=1 arrives on NOTIFY_SOCKET, and SIGTERM ends it with status 0.
#[test]
fn serves_every_passed_fd_by_its_type() {
    let dir = std::env::temp_dir().join(format!("echo-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let _cleanup = RemoveDir(dir.clone());
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let udp4 = UdpSocket::bind("127.0.0.1:0").unwrap();
    let udp46 = UdpSocket::bind("[::]:0").unwrap();
    let unix_stream = UnixListener::bind(dir.join("stream.sock")).unwrap();
    let unix_dgram = UnixDatagram::bind(dir.join("dgram.sock")).unwrap();
    let (pipe_read, _pipe_write) = nix::unistd::pipe().unwrap();
    let notify = UnixDatagram::bind(dir.join("notify.sock")).unwrap();
    notify.set_read_timeout(Some(TIMEOUT)).unwrap();

    let mut handed = HandedFds::new(
        BIN,
        &[
            tcp.as_fd(),
            udp4.as_fd(),
            pipe_read.as_fd(),
            udp46.as_fd(),
            unix_stream.as_fd(),
            unix_dgram.as_fd(),
        ],
        &["tcp", "udp4", "pipe", "udp46", "ustream", "udgram"],
    )
    .unwrap();
    handed
        .command()
        .env("NOTIFY_SOCKET", dir.join("notify.sock"));
    let mut child = handed.spawn().unwrap();
    let mut buf = [0u8; 4096];
    let n = notify.recv(&mut buf).expect("READY=1 on NOTIFY_SOCKET");
    let message = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(message.lines().any(|l| l == "READY=1"), "{message:?}");
    assert!(message.contains("STATUS=echoing on tcp"), "{message:?}");

    check_tcp(tcp.local_addr().unwrap(), "tcp");
    check_udp("127.0.0.1:0", udp4.local_addr().unwrap());
    let p46 = udp46.local_addr().unwrap().port();
    check_udp("127.0.0.1:0", v4(p46));
    check_udp("[::1]:0", v6(p46));

    let mut conn = UnixStream::connect(dir.join("stream.sock")).unwrap();
    conn.set_read_timeout(Some(TIMEOUT)).unwrap();
    conn.write_all(b"over a unix stream").unwrap();
    let mut back = [0u8; 18];
    conn.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"over a unix stream");

    let client = UnixDatagram::bind(dir.join("client.sock")).unwrap();
    client.set_read_timeout(Some(TIMEOUT)).unwrap();
    client
        .send_to(b"over a unix datagram", dir.join("dgram.sock"))
        .unwrap();
    let n = client.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"over a unix datagram");

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = wait_for("echo to exit on SIGTERM", TIMEOUT, || {
        child.try_wait().unwrap()
    })
    .unwrap();
    assert!(status.success(), "{status:?}");
    // The sockets it was handed are still usable by their owner (nothing was shut down).
    let again = HandedFds::new(BIN, &[tcp.as_fd()], &["tcp"]).unwrap();
    let mut again = KillOnDrop(again.spawn().unwrap());
    check_tcp(tcp.local_addr().unwrap(), "second instance");
    let _ = again.0.kill();
}

/// In a namespace where 192.0.2.0/24 and 2001:db8::/64 are local, a client bound to one address
/// of the range sends to another through a dual-stack wildcard socket. Without a PKTINFO source,
/// the kernel would answer from the client's own address (a local route's preferred source is
/// the destination), and the connected client would drop it.
#[test]
fn wildcard_socket_answers_from_the_address_the_client_used() {
    let Some(ns) = netns_with_local_routes(&["192.0.2.0/24", "2001:db8::/64"]).unwrap() else {
        return;
    };
    let _inside = ns.enter().unwrap();
    let service = Activated::start(1, |p| {
        let args = ["--datagram", "--", BIN];
        std::iter::once(format!("--listen={}", p[0]))
            .chain(args.map(String::from))
            .collect()
    })
    .unwrap();
    let port = service.ports[0];
    check_udp("192.0.2.1:0", SocketAddr::from(([192, 0, 2, 7], port)));
    check_udp("192.0.2.1:0", SocketAddr::from(([192, 0, 2, 200], port)));
    check_udp("[::1]:0", format!("[2001:db8::7]:{port}").parse().unwrap());
    drop(service);
}

struct RemoveDir(std::path::PathBuf);
impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct KillOnDrop(std::process::Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
