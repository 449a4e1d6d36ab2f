//! Datagrams on loopback through the dispatcher ÷ a plainly bound socket, with
//! the harness of `connect` (three namespaces: the dispatcher, the steer-only
//! floor and the plain socket; rounds in turn, hits spread over the
//! bindings). The client is this thread, native code, with a socket of its
//! own in each namespace:
//! - one-way: a datagram to a random bound address, then the server socket
//!   reads it (on loopback it is queued before `sendto` returns);
//! - request/reply: the same, then the server answers the client's address
//!   from its socket and the client reads the answer.
//!
//! A datagram that does not arrive within a second fails the step (nothing is
//! lost on loopback unless it was misrouted).

use std::net::{SocketAddrV4, UdpSocket};
use std::os::fd::{AsFd, BorrowedFd};
use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use holdfast::unit::Protocol;

use crate::connect::{compare, pairs_of, PORT};
use crate::report::{count, Row};

const PAYLOAD: &[u8] = b"holdfast-bench udp";

/// A server socket and the client that talks to it, in one namespace.
struct Pair {
    server: UdpSocket,
    client: UdpSocket,
}

impl AsFd for Pair {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.server.as_fd()
    }
}

/// The step: each mode for `duration`, both sides together.
pub fn run(bindings: usize, duration: Duration) -> Result<Vec<Row>> {
    let (pairs, round) = pairs_of(duration);
    let mut rows = Vec::new();
    for reply in [false, true] {
        let r = crate::netns::on_own_thread("udp", move || {
            compare(
                Protocol::Udp,
                bindings,
                pairs,
                round,
                || pair("127.0.0.1:0"),
                || pair(&format!("0.0.0.0:{PORT}")),
                |p, to| exchange(p, to, reply),
            )
        })?;
        let (mode, target) = if reply {
            ("request/reply", "")
        } else {
            ("one-way", " (target ≥ 0.95)")
        };
        let what = format!("UDP {mode}, datagrams over {} bindings", count(bindings));
        rows.extend(r.rows(&what, target, "dgram"));
    }
    Ok(rows)
}

/// A server bound to `addr` and a client on an ephemeral port, in the
/// calling thread's namespace.
fn pair(addr: &str) -> Result<Pair> {
    let server = UdpSocket::bind(addr).with_context(|| format!("bind {addr}"))?;
    let client = UdpSocket::bind("127.0.0.1:0").context("bind the client")?;
    for s in [&server, &client] {
        s.set_read_timeout(Some(Duration::from_secs(1)))?;
    }
    Ok(Pair { server, client })
}

fn exchange(p: &Pair, to: SocketAddrV4, reply: bool) -> Result<u64> {
    let mut buf = [0u8; 64];
    p.client.send_to(PAYLOAD, to).context("send")?;
    let (n, from) = p
        .server
        .recv_from(&mut buf)
        .with_context(|| format!("the datagram to {to} did not arrive"))?;
    ensure!(&buf[..n] == PAYLOAD, "the server read {:?}", &buf[..n]);
    if reply {
        p.server.send_to(&buf[..n], from).context("reply")?;
        let n = p
            .client
            .recv(&mut buf)
            .with_context(|| format!("no reply from {to}"))?;
        ensure!(&buf[..n] == PAYLOAD, "the client read {:?}", &buf[..n]);
    }
    Ok(1)
}
