//! Unix datagram echo: each datagram goes back to its sender when the sender is bound to an
//! address (an unbound sender cannot be answered).

use std::os::fd::AsFd;
use std::os::unix::net::UnixDatagram;

use tracing::debug;

#[derive(Debug, thiserror::Error)]
pub enum UnixDatagramError {
    #[error("receive on unix datagram socket {socket}")]
    Receive {
        socket: String,
        source: std::io::Error,
    },
}

/// Echoes datagrams on a unix datagram socket back to senders that are bound to an address;
/// an unbound sender cannot be answered and is skipped.
pub fn serve(socket: UnixDatagram, name: &str) -> Result<(), UnixDatagramError> {
    let mut buf = vec![0u8; 65_536];
    loop {
        let (n, peer) = match socket.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                crate::wait_readable(socket.as_fd());
                continue;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(source) => {
                return Err(UnixDatagramError::Receive {
                    socket: name.to_owned(),
                    source,
                })
            }
        };
        if peer.is_unnamed() {
            debug!(socket = name, "datagram from an unbound sender: no reply");
            continue;
        }
        if let Err(e) = socket.send_to_addr(&buf[..n], &peer) {
            debug!(socket = name, error = %e, "reply dropped");
        }
    }
}
