//! Clients for the services under test and for the control socket, and process
//! checks. Socket clients use the calling thread's network namespace: call them
//! inside [`crate::Netns::enter`] or [`crate::Netns::run`].

use std::io::{self, Read};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, pipe2, ForkResult};

/// Connects to a TCP service and reads its whole answer (until EOF). A refused
/// connection is an error of kind `ConnectionRefused`.
pub fn ask_tcp(addr: SocketAddr, timeout: Duration) -> io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    read_answer(&mut s, timeout)
}

/// Connects to a unix stream service and reads its whole answer.
pub fn ask_unix(path: &Path, timeout: Duration) -> io::Result<String> {
    let mut s = UnixStream::connect(path)?;
    s.set_read_timeout(Some(timeout))?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok(text)
}

/// Sends one datagram to a UDP service and returns the answer.
pub fn ask_udp(addr: SocketAddr, timeout: Duration) -> io::Result<String> {
    let local: SocketAddr = if addr.is_ipv4() {
        "127.0.0.1:0".parse().expect("literal")
    } else {
        "[::1]:0".parse().expect("literal")
    };
    let s = UdpSocket::bind(local)?;
    s.set_read_timeout(Some(timeout))?;
    s.send_to(b"ping", addr)?;
    let mut buf = [0u8; 2048];
    let (n, _) = s.recv_from(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

fn read_answer(s: &mut TcpStream, timeout: Duration) -> io::Result<String> {
    s.set_read_timeout(Some(timeout))?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok(text)
}

/// The state letter in `/proc/PID/stat` (`R`, `S`, `Z`, …), `None` when there is
/// no such process.
pub fn proc_state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "PID (COMM) S …": COMM may hold spaces and parentheses; the state follows the last ')'.
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// The user + system CPU time `pid` has used (fields 14 and 15 of
/// `/proc/PID/stat`), `None` when there is no such process.
pub fn proc_cpu_time(pid: i32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After "PID (COMM) ": the state is field 3, so utime and stime are the 12th and 13th.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).ok()?;
    Some(Duration::from_millis(ticks * 1000 / hz.max(1)))
}

/// True when `pid` no longer runs: gone, or a zombie waiting to be reaped.
pub fn process_gone(pid: i32) -> bool {
    matches!(proc_state(pid), None | Some('Z'))
}

/// What an unprivileged peer got from the control socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerOutcome {
    /// `connect()` failed with this errno.
    ConnectFailed(Errno),
    /// The daemon's answer (up to the first newline, or whatever came before EOF).
    Reply(String),
}

/// Forks a child that drops to `uid`/`gid` (no supplementary groups), connects to
/// the unix socket at `path`, sends `request`, and reads one reply line.
///
/// The child makes only async-signal-safe system calls on buffers prepared before
/// the fork, so this is safe in the multi-threaded test process. It reports back
/// over a pipe and is killed by SIGALRM if it hangs for 10 s.
pub fn control_request_as(uid: u32, gid: u32, path: &Path, request: &[u8]) -> Result<PeerOutcome> {
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        bail!("socket path too long: {}", path.display());
    }
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    let addr_len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    let (rx, tx) = pipe2(OFlag::O_CLOEXEC).context("pipe2")?;

    // SAFETY: the child branch below runs only async-signal-safe libc calls on
    // memory prepared before the fork and ends in _exit; it never returns.
    match unsafe { fork() }.context("fork")? {
        ForkResult::Child => {
            let out = tx.as_raw_fd();
            // SAFETY: async-signal-safe system calls on valid pointers and sizes
            // (stack buffers, the prepared sockaddr and request); see above.
            unsafe {
                libc::alarm(10);
                let fail = |stage: u8| {
                    let e = (*libc::__errno_location()).to_ne_bytes();
                    let msg = [b'E', stage, e[0], e[1], e[2], e[3]];
                    libc::write(out, msg.as_ptr().cast(), msg.len());
                    libc::_exit(0);
                };
                if libc::setgroups(0, std::ptr::null()) != 0 {
                    fail(b'g');
                }
                if libc::setgid(gid) != 0 {
                    fail(b'G');
                }
                if libc::setuid(uid) != 0 {
                    fail(b'U');
                }
                let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
                if fd < 0 {
                    fail(b's');
                }
                if libc::connect(fd, std::ptr::addr_of!(addr).cast(), addr_len) != 0 {
                    fail(b'c');
                }
                // The daemon may answer a refused peer and close before reading
                // anything: a failed write is no failure, the reply still counts.
                let mut sent = 0usize;
                while sent < request.len() {
                    let n = libc::write(fd, request[sent..].as_ptr().cast(), request.len() - sent);
                    if n <= 0 {
                        break;
                    }
                    sent += n as usize;
                }
                let mut buf = [0u8; 4096];
                buf[0] = b'R';
                let mut len = 1usize;
                while len < buf.len() {
                    let n = libc::read(fd, buf[len..].as_mut_ptr().cast(), buf.len() - len);
                    if n <= 0 {
                        break;
                    }
                    let start = len;
                    len += n as usize;
                    if buf[start..len].contains(&b'\n') {
                        break;
                    }
                }
                libc::write(out, buf.as_ptr().cast(), len);
                libc::_exit(0);
            }
        }
        ForkResult::Parent { child } => {
            drop(tx);
            let mut report = Vec::new();
            let read = std::fs::File::from(rx).read_to_end(&mut report);
            let status = waitpid(child, None).context("waitpid")?;
            read.context("read the child's report")?;
            if status != WaitStatus::Exited(child, 0) {
                bail!("the unprivileged peer ended with {status:?}");
            }
            match report.as_slice() {
                [b'E', b'c', e @ ..] if e.len() == 4 => Ok(PeerOutcome::ConnectFailed(
                    Errno::from_raw(i32::from_ne_bytes([e[0], e[1], e[2], e[3]])),
                )),
                [b'E', stage, e @ ..] if e.len() == 4 => bail!(
                    "the unprivileged peer failed at step {:?}: {}",
                    *stage as char,
                    Errno::from_raw(i32::from_ne_bytes([e[0], e[1], e[2], e[3]]))
                ),
                [b'R', reply @ ..] => Ok(PeerOutcome::Reply(
                    String::from_utf8_lossy(reply).trim_end().to_owned(),
                )),
                other => bail!("the unprivileged peer reported {other:?}"),
            }
        }
    }
}
