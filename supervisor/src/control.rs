//! The control socket: its protocol (one JSON request per line, one JSON reply
//! per line), the non-blocking server side the event loop drives, and the
//! client the CLI uses. Only root peers (SO_PEERCRED) are served. Knows the
//! shape of requests, not what they do: the supervisor answers them.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use serde::{Deserialize, Serialize};

use crate::ratelimit::{AcceptThrottle, LogLimiter};
use crate::unit::RestartMode;

/// The largest request accepted; a longer one gets an error reply.
pub const MAX_REQUEST: usize = 64 * 1024;
/// How long the control socket is left out of the poll set after accept
/// failed for lack of fds.
const ACCEPT_PAUSE: Duration = Duration::from_millis(250);
/// The listener's token in the server's epoll (connections use their ids, from 1).
const LISTENER: u64 = 0;
/// The control socket's file name in the state dir.
pub const SOCKET_NAME: &str = "control.sock";

pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET_NAME)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    Status {
        #[serde(default)]
        name: Option<String>,
    },
    Start {
        name: String,
    },
    Stop {
        name: String,
    },
    Restart {
        name: String,
        #[serde(default)]
        mode: Option<RestartMode>,
    },
    Bindings,
    Metrics,
    Reload,
    /// Reload one service: its exec-reload, or (notify-reload) its
    /// reload-signal, answered once it is done.
    ReloadService {
        name: String,
    },
    /// Re-execute holdfast in place (the binary now at its path).
    Upgrade,
    /// A service's captured output: those numbered `after` and later, read
    /// at or after `since` (RFC 3339, e.g. `2026-12-07T13:00:00Z`), the last
    /// `lines` of them.
    Logs {
        name: String,
        #[serde(default)]
        lines: Option<usize>,
        #[serde(default)]
        after: Option<u64>,
        /// Left out when `None`, so a holdfast that does not know it still
        /// answers a request without it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        since: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Reply {
    /// A successful reply carrying one of the `protocol` types.
    pub fn ok(result: &impl Serialize) -> Reply {
        Reply {
            ok: true,
            result: Some(serde_json::to_value(result).expect("replies serialize")),
            error: None,
        }
    }

    /// The typed result of a successful reply, or its error message.
    pub fn into_result<T: serde::de::DeserializeOwned>(self) -> Result<T, String> {
        if !self.ok {
            return Err(self.error.unwrap_or_else(|| "request failed".into()));
        }
        serde_json::from_value(self.result.unwrap_or(serde_json::Value::Null))
            .map_err(|e| format!("holdfast sent a reply this CLI does not understand: {e}"))
    }
    pub fn error(message: impl Into<String>) -> Reply {
        Reply {
            ok: false,
            result: None,
            error: Some(message.into()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot reach holdfast at {path}: {source} (is `holdfast run` running with this --state-dir?)")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{call} on the control socket {path}: {source}")]
    Io {
        call: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("holdfast sent a reply that is not valid JSON: {0}")]
    BadReply(#[source] serde_json::Error),
}

/// Sends one request and waits for its reply.
pub fn call(state_dir: &Path, request: &Request) -> Result<Reply, ControlError> {
    let path = socket_path(state_dir);
    let io_err = |call: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| ControlError::Io { call, path, source }
    };
    let mut stream = UnixStream::connect(&path).map_err(|source| ControlError::Connect {
        path: path.clone(),
        source,
    })?;
    let mut line = serde_json::to_vec(request).expect("requests serialize");
    line.push(b'\n');
    stream.write_all(&line).map_err(io_err("write", &path))?;
    let mut reply = String::new();
    BufReader::new(&stream)
        .read_line(&mut reply)
        .map_err(io_err("read", &path))?;
    serde_json::from_str(&reply).map_err(ControlError::BadReply)
}

/// A connection's progress.
enum Phase {
    Reading,
    /// A request was handed to the supervisor; its reply is pending.
    Busy,
    Writing,
}

struct Connection {
    id: u64,
    stream: UnixStream,
    /// What the server's epoll watches it for now.
    interest: EpollFlags,
    input: Vec<u8>,
    output: Vec<u8>,
    phase: Phase,
}

/// The server side: a listening socket and its connections, non-blocking.
pub struct Server {
    /// The listener and every connection, each watched for what its phase
    /// needs; the event loop watches this one fd.
    epoll: Epoll,
    /// Whether the listener is watched (not while accepting pauses).
    listening: bool,
    listener: UnixListener,
    path: PathBuf,
    connections: Vec<Connection>,
    next_id: u64,
    /// Paused while accept fails for lack of fds (the listener is not
    /// polled); accept's warnings: a few per 10 s, then "repeated N times".
    accept: AcceptThrottle,
}

/// A connection's id, to answer it later.
pub type ConnectionId = u64;

impl Server {
    /// Binds the control socket (mode 0600) in `state_dir`, replacing a stale one.
    pub fn bind(state_dir: &Path) -> io::Result<Server> {
        let path = socket_path(state_dir);
        if let Ok(meta) = std::fs::symlink_metadata(&path) {
            use std::os::unix::fs::FileTypeExt;
            if meta.file_type().is_socket() {
                if UnixStream::connect(&path).is_ok() {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        format!("{} is in use by another holdfast", path.display()),
                    ));
                }
                std::fs::remove_file(&path)?;
            }
        }
        // Bind under a temporary name and rename, so the socket never exists
        // with a wider mode than 0600.
        let tmp = state_dir.join(format!(".{SOCKET_NAME}.{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let listener = UnixListener::bind(&tmp)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&tmp, &path)?;
        Server::serve(listener, path)
    }

    /// The listener a holdfast before an in-place upgrade bound, inherited
    /// across the exec: the socket file stays where it is.
    pub fn adopt(state_dir: &Path, listener: std::os::fd::OwnedFd) -> io::Result<Server> {
        use std::os::fd::AsRawFd;
        crate::fds::set_cloexec(listener.as_raw_fd(), true)?;
        let listener = UnixListener::from(listener);
        Server::serve(listener, socket_path(state_dir))
    }

    /// The listener's fd, to keep across an in-place upgrade's exec.
    pub fn listener_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.listener.as_raw_fd()
    }

    /// Takes connection `id` out of the server (its reply will come from
    /// the upgraded holdfast, which inherits it).
    pub fn take_connection(&mut self, id: ConnectionId) -> Option<UnixStream> {
        let k = self.connections.iter().position(|c| c.id == id)?;
        let c = self.connections.remove(k);
        let _ = self.epoll.delete(&c.stream);
        Some(c.stream)
    }

    fn serve(listener: UnixListener, path: PathBuf) -> io::Result<Server> {
        listener.set_nonblocking(true)?;
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        epoll.add(&listener, EpollEvent::new(EpollFlags::EPOLLIN, LISTENER))?;
        Ok(Server {
            epoll,
            listening: true,
            listener,
            path,
            connections: Vec::new(),
            next_id: 1,
            accept: AcceptThrottle::new(ACCEPT_PAUSE, LogLimiter::new(5, Duration::from_secs(10))),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// While accepting pauses for lack of fds, when it resumes: the event
    /// loop should wake by then to poll the listener again.
    pub fn resumes_at(&self) -> Option<Instant> {
        self.accept.resumes_at(Instant::now())
    }

    /// One fd for the event loop: readable when the listener or a
    /// connection needs [`Server::service`].
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.epoll.0.as_fd()
    }

    /// Watches the listener unless accepting pauses, and each connection for
    /// what its phase needs (nothing while busy); drops the finished ones.
    fn rearm(&mut self) {
        self.connections
            .retain(|c| !(matches!(c.phase, Phase::Writing) && c.output.is_empty()));
        let listen = !self.accept.is_paused(Instant::now());
        if listen != self.listening {
            let flags = if listen {
                EpollFlags::EPOLLIN
            } else {
                EpollFlags::empty()
            };
            let mut ev = EpollEvent::new(flags, LISTENER);
            if self.epoll.modify(&self.listener, &mut ev).is_ok() {
                self.listening = listen;
            }
        }
        for c in &mut self.connections {
            let want = match c.phase {
                Phase::Reading => EpollFlags::EPOLLIN,
                Phase::Writing => EpollFlags::EPOLLOUT,
                Phase::Busy => EpollFlags::empty(),
            };
            if want != c.interest {
                let mut ev = EpollEvent::new(want, c.id);
                if self.epoll.modify(&c.stream, &mut ev).is_ok() {
                    c.interest = want;
                }
            }
        }
    }

    /// Accepts, reads and writes whatever is ready; returns the complete
    /// requests to answer. Refuses non-root peers and bad requests itself.
    pub fn service(&mut self) -> Vec<(ConnectionId, Request)> {
        // Empty the ready list; every connection is tried below.
        let mut events = [EpollEvent::empty(); 32];
        let _ = self.epoll.wait(&mut events, EpollTimeout::ZERO);
        self.accept();
        let mut requests = Vec::new();
        for c in &mut self.connections {
            match c.phase {
                Phase::Reading => {
                    if let Some(r) = read_request(c) {
                        match r {
                            Ok(req) => {
                                c.phase = Phase::Busy;
                                requests.push((c.id, req));
                            }
                            Err(reply) => queue(c, &reply),
                        }
                    }
                }
                Phase::Writing => flush(c),
                Phase::Busy => {}
            }
        }
        self.rearm();
        requests
    }

    /// Answers a request handed out by `service`.
    pub fn reply(&mut self, id: ConnectionId, reply: &Reply) {
        if let Some(c) = self.connections.iter_mut().find(|c| c.id == id) {
            queue(c, reply);
        }
        self.rearm();
    }

    fn accept(&mut self) {
        let now = Instant::now();
        if let Some(repeated) = self.accept.take_suppressed(now) {
            tracing::warn!(
                repeated,
                "control: accept failed (the last message repeated {repeated} times)"
            );
        }
        if self.accept.is_paused(now) {
            return;
        }
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    let id = self.next_id;
                    self.next_id += 1;
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let ev = EpollEvent::new(EpollFlags::EPOLLIN, id);
                    if let Err(e) = self.epoll.add(&stream, ev) {
                        tracing::warn!(error = %e, "control: cannot watch a connection");
                        continue;
                    }
                    let mut c = Connection {
                        id,
                        interest: EpollFlags::EPOLLIN,
                        stream,
                        input: Vec::new(),
                        output: Vec::new(),
                        phase: Phase::Reading,
                    };
                    match peer_uid(&c.stream) {
                        Ok(0) => {}
                        Ok(uid) => {
                            tracing::warn!(uid, "control: refused a non-root peer");
                            queue(
                                &mut c,
                                &Reply::error(format!(
                                    "permission denied: only root may control holdfast (peer uid {uid})"
                                )),
                            );
                        }
                        Err(e) => {
                            queue(
                                &mut c,
                                &Reply::error(format!(
                                    "permission denied: no peer credentials: {e}"
                                )),
                            );
                        }
                    }
                    self.connections.push(c);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    if let Some(w) = self.accept.failed(&e, Instant::now()) {
                        tracing::warn!(error = %e, repeated = w.repeated, "control: accept failed{}", w.hint);
                    }
                    break;
                }
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn peer_uid(stream: &UnixStream) -> nix::Result<u32> {
    let cred = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)?;
    Ok(cred.uid())
}

/// Reads what is there; `Some` once a whole line (or an error) is in.
fn read_request(c: &mut Connection) -> Option<Result<Request, Reply>> {
    let mut buf = [0u8; 4096];
    loop {
        match c.stream.read(&mut buf) {
            Ok(0) => {
                if c.input.is_empty() {
                    // The peer left without asking anything.
                    c.phase = Phase::Writing;
                    return None;
                }
                return Some(parse(&c.input));
            }
            Ok(n) => {
                c.input.extend_from_slice(&buf[..n]);
                if let Some(end) = c.input.iter().position(|&b| b == b'\n') {
                    return Some(parse(&c.input[..end]));
                }
                if c.input.len() > MAX_REQUEST {
                    return Some(Err(Reply::error(format!(
                        "request too large: more than {MAX_REQUEST} bytes without a newline"
                    ))));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => {
                c.phase = Phase::Writing;
                c.output.clear();
                return None;
            }
        }
    }
}

fn parse(line: &[u8]) -> Result<Request, Reply> {
    serde_json::from_slice(line).map_err(|e| Reply::error(format!("malformed request: {e}")))
}

fn queue(c: &mut Connection, reply: &Reply) {
    c.output = serde_json::to_vec(reply).expect("replies serialize");
    c.output.push(b'\n');
    c.phase = Phase::Writing;
    flush(c);
}

fn flush(c: &mut Connection) {
    while !c.output.is_empty() {
        match c.stream.write(&c.output) {
            Ok(n) => {
                c.output.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => {
                c.output.clear();
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_bad_ones_are_named() {
        let r: Request = serde_json::from_str(r#"{"command":"status","name":null}"#).unwrap();
        assert_eq!(r, Request::Status { name: None });
        let r: Request = serde_json::from_str(r#"{"command":"restart","name":"web"}"#).unwrap();
        assert_eq!(
            r,
            Request::Restart {
                name: "web".into(),
                mode: None
            }
        );
        let e = parse(br#"{"command":"explode"}"#).unwrap_err();
        assert!(e.error.unwrap().starts_with("malformed request"));
    }

    #[test]
    fn server_answers_and_survives_garbage() {
        let dir = tempdir();
        let mut server = Server::bind(&dir).unwrap();
        let mode = std::fs::metadata(server.path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let path = server.path().to_path_buf();
        let client = std::thread::spawn(move || {
            let mut junk = UnixStream::connect(&path).unwrap();
            junk.write_all(&vec![b'x'; MAX_REQUEST + 10]).unwrap();
            let mut reply = String::new();
            BufReader::new(&junk).read_line(&mut reply).unwrap();
            let mut good = UnixStream::connect(&path).unwrap();
            good.write_all(b"{\"command\":\"status\"}\n").unwrap();
            let mut reply2 = String::new();
            BufReader::new(&good).read_line(&mut reply2).unwrap();
            (reply, reply2)
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !client.is_finished() && std::time::Instant::now() < deadline {
            for (id, req) in server.service() {
                assert_eq!(req, Request::Status { name: None });
                server.reply(id, &Reply::ok(&Vec::<u8>::new()));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let (bad, good) = client.join().unwrap();
        assert!(bad.contains("request too large"), "{bad}");
        assert_eq!(good.trim(), r#"{"ok":true,"result":[]}"#);
        let _ = std::fs::remove_dir_all(dir);
    }

    fn tempdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "holdfast-control-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
