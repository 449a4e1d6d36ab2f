//! Stream echo: accept on a listening TCP or unix stream socket, a thread per connection, every
//! byte written back until the peer closes.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};

use tracing::{debug, warn};

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("accept on stream listener {socket}")]
    Accept {
        socket: String,
        source: std::io::Error,
    },
}

/// Accepts forever on a listening TCP socket; each connection is echoed on its own thread.
pub fn serve_tcp(listener: TcpListener, socket: &str) -> Result<(), StreamError> {
    accept_loop(listener.as_fd(), socket, || {
        listener.accept().map(|(s, _)| s)
    })
}

/// The same for a listening unix stream socket.
pub fn serve_unix(listener: UnixListener, socket: &str) -> Result<(), StreamError> {
    accept_loop(listener.as_fd(), socket, || {
        listener.accept().map(|(s, _)| s)
    })
}

fn accept_loop<S: Read + Write + Send + 'static>(
    fd: std::os::fd::BorrowedFd<'_>,
    socket: &str,
    accept: impl Fn() -> std::io::Result<S>,
) -> Result<(), StreamError> {
    loop {
        match accept() {
            Ok(conn) => {
                std::thread::spawn(move || echo_connection(conn));
            }
            // Another instance took the connection first, or the shared listener is O_NONBLOCK.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => crate::wait_readable(fd),
            // Per-connection failures (ECONNABORTED, EINTR) and resource limits (EMFILE) pass.
            Err(e) if is_transient(&e) => {
                warn!(socket, error = %e, "accept failed; retrying");
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(source) => {
                return Err(StreamError::Accept {
                    socket: socket.to_owned(),
                    source,
                })
            }
        }
    }
}

fn is_transient(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ECONNABORTED
                | libc::EINTR
                | libc::EMFILE
                | libc::ENFILE
                | libc::ENOBUFS
                | libc::ENOMEM
                | libc::EPROTO
                | libc::EPERM
        )
    )
}

/// Writes back everything read from `conn` until EOF or an error (a reset peer is not news).
pub fn echo_connection(mut conn: impl Read + Write) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match conn.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                debug!(error = %e, "connection read failed");
                return;
            }
        };
        if let Err(e) = conn.write_all(&buf[..n]) {
            debug!(error = %e, "connection write failed");
            return;
        }
    }
}

/// An already accepted connection handed over whole (inetd style).
pub fn serve_connection(fd: OwnedFd, unix: bool) {
    if unix {
        echo_connection(UnixStream::from(fd));
    } else {
        echo_connection(TcpStream::from(fd));
    }
}
