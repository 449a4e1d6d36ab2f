//! The NOTIFY_SOCKET server: one unix datagram socket per service, bound at
//! `<state_dir>/notify/<service>.sock`, whose path the service gets in
//! NOTIFY_SOCKET. Owns those sockets, reading their datagrams (with the
//! sender's SCM_CREDENTIALS and any SCM_RIGHTS fds), deciding which to accept,
//! and parsing them into [`Notification`]s; and [`FdStore`], the per-service
//! store of fds handed over with FDSTORE=1.
//!
//! Never acts on a message: the supervisor's event loop polls [`NotifySocket::as_fd`],
//! calls [`NotifySocket::receive`] with the rule saying which senders belong
//! to the service ([`Senders`]), and applies what comes back.
//!
//! Why a socket per service: systemd has one socket and looks the sender's
//! pid up in /proc to find its unit, which fails when a short-lived sender
//! such as `systemd-notify` has exited before the message is read. Here the
//! socket a message arrives on says whose it is; the credentials are still
//! checked, so another process cannot speak for the service.
//!
//! The kernel queues at most `net.unix.max_dgram_qlen` datagrams on a
//! socket (10 by default; systemd's sysctl.d raises it to 512); beyond that
//! a sender blocks (or gets EAGAIN) until the event loop reads. Nothing here
//! changes that sysctl.

#[cfg(test)]
mod cgroup_tests;
mod fdstore;
mod parse;
#[cfg(test)]
mod tests;

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::ratelimit::LogLimiter;

#[cfg(test)]
use fdstore::Added;
pub use fdstore::FdStore;
pub use parse::{parse, Notification, MAX_MESSAGE};

/// The directory in the state dir that holds the notify sockets.
pub const SOCKET_DIR: &str = "notify";
/// The receive buffer asked for (systemd's notify socket uses 8 MiB): a
/// burst of messages from a busy service must not be dropped.
const RECEIVE_BUFFER: usize = 8 * 1024 * 1024;
/// The most fds one datagram can carry (the kernel's SCM_MAX_FD).
const MAX_FDS: usize = 253;
/// The most datagrams one `receive` reads, so a flooding service cannot
/// starve the event loop; the rest stay queued and poll reports them again.
pub const MAX_PER_RECEIVE: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("invalid service name {service:?} for a notify socket")]
    BadServiceName { service: String },
    #[error("create the notify socket directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "notify socket {path} is in use by another process (another holdfast with this state dir?)"
    )]
    InUse { path: PathBuf },
    #[error("{call} on the notify socket {path}: {source}")]
    Socket {
        call: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("message of {len} bytes is over the {MAX_MESSAGE}-byte limit")]
    Oversized { len: usize },
    #[error("line {line:?} is not UTF-8")]
    NotUtf8 { line: String },
    #[error("message contains a NUL byte")]
    Nul,
    #[error("line {line:?} is not KEY=VALUE")]
    BadLine { line: String },
    #[error("key {key:?} is not a valid name")]
    BadKey { key: String },
    #[error("invalid value {value:?} for {key}")]
    BadValue { key: String, value: String },
    #[error("invalid FDNAME {name:?}: use 1 to 255 printable ASCII characters, no ':' or space")]
    BadFdName { name: String },
    #[error("FDSTOREREMOVE=1 without a valid FDNAME=")]
    NoFdName,
}

/// A datagram's sender, from SCM_CREDENTIALS as the kernel filled them in
/// (a pid not visible in holdfast's pid namespace reads as 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sender {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
    /// The id of the sender's cgroup (v2), read while the kernel still
    /// vouched for the sender: through the pidfd that came with the
    /// message (SCM_PIDFD, Linux 6.5), else through a pidfd opened on its
    /// pid from SCM_CREDENTIALS, else /proc/PID/cgroup. `None`: the sender
    /// has exited (or cannot be seen from here).
    pub cgroup: Option<u64>,
}

/// Who may notify for a service tracked by cgroup ([`crate::cgroup`]),
/// with systemd's `NotifyAccess=`: a message is the service's when its
/// sender is in one of the service's `cgroups` and `access` admits it.
/// A sender that has already exited is judged by the cgroup it exited in,
/// where the kernel keeps that for the message's pidfd (SCM_PIDFD, Linux
/// 6.15), and refused where it does not. Pass
/// [`CgroupSenders::accepts`] to [`NotifySocket::receive`].
#[derive(Debug, Clone, Copy)]
pub struct CgroupSenders<'a> {
    pub access: crate::unit::NotifyAccess,
    /// The ids ([`crate::cgroup::Cgroup::id`]) of the service's cgroup and
    /// its instances' cgroups.
    pub cgroups: &'a [u64],
    /// Each running instance's main process (after any MAINPID=).
    pub main_pids: &'a [i32],
    /// The processes holdfast spawned for the service (for `exec`).
    pub spawned_pids: &'a [i32],
}

impl CgroupSenders<'_> {
    pub fn accepts(&self, sender: Sender) -> bool {
        use crate::unit::NotifyAccess;
        let Some(cgroup) = sender.cgroup else {
            return false;
        };
        if !self.cgroups.contains(&cgroup) {
            return false;
        }
        let pid = sender.pid;
        match self.access {
            NotifyAccess::None => false,
            NotifyAccess::All => true,
            NotifyAccess::Main => self.main_pids.contains(&pid),
            NotifyAccess::Exec => self.main_pids.contains(&pid) || self.spawned_pids.contains(&pid),
        }
    }
}

/// The sender's cgroup id: through `pidfd` (SCM_PIDFD) when the message
/// carried one, else through a pidfd opened on `pid`, else /proc.
fn sender_cgroup(pid: i32, pidfd: Option<OwnedFd>) -> Option<u64> {
    use crate::pidfd::Pidfd;
    if let Some(fd) = pidfd {
        // The pidfd names the sender itself: no pid reuse can intervene;
        // a sender gone already is judged by the cgroup it exited in.
        return Pidfd::from_owned(fd).cgroup_id_even_if_gone();
    }
    if pid <= 0 {
        return None;
    }
    match Pidfd::open(pid) {
        Ok(p) => match p.cgroup_id() {
            Ok(id) => Some(id),
            // PIDFD_GET_INFO is Linux 6.13: read /proc while the pidfd
            // shows the process alive.
            Err(e) if !e.is_gone() => {
                crate::cgroup::cgroup_id_of_pid(pid).filter(|_| !p.has_exited())
            }
            Err(_) => None,
        },
        Err(_) => None,
    }
}

/// Who may notify for a service; its [`Senders::accepts`] is what the
/// supervisor passes to [`NotifySocket::receive`]. The rule, applied to a
/// message that arrived on the service's own socket:
///
/// 1. the sender's pid is one of `main_pids` (each running instance's main
///    process, after any MAINPID=): accepted;
/// 2. otherwise, if the sender's process group can be read (getpgid), it is
///    accepted when that group is one of `groups` (each instance's process
///    group: spawn makes the child a group leader, so its first main pid)
///    and refused when it is any other group, whatever its uid;
/// 3. otherwise the sender has exited (getpgid fails: a short-lived
///    `systemd-notify` may be gone before its datagram is read) or its pid
///    is not visible (0): accepted when its uid is 0 or `uid`, the
///    service's user. Only someone who could write to this service's socket
///    as root or as the service's user gets here, and the socket says
///    which service it speaks for.
#[derive(Debug, Clone, Copy)]
pub struct Senders<'a> {
    pub main_pids: &'a [i32],
    pub groups: &'a [i32],
    pub uid: u32,
}

impl Senders<'_> {
    /// The rule above, looking process groups up with getpgid(2).
    pub fn accepts(&self, sender: Sender) -> bool {
        self.accepts_with(sender, &live_process_group)
    }

    /// The rule above, with the process-group lookup passed in (`None`:
    /// cannot be read), so the policy can be tested for every outcome.
    pub fn accepts_with(&self, sender: Sender, group_of: &dyn Fn(i32) -> Option<i32>) -> bool {
        if sender.pid > 0 && self.main_pids.contains(&sender.pid) {
            return true;
        }
        // getpgid(0) would answer holdfast's own group: never ask for it.
        let group = if sender.pid > 0 {
            group_of(sender.pid)
        } else {
            None
        };
        match group {
            Some(g) => self.groups.contains(&g),
            None => sender.uid == 0 || sender.uid == self.uid,
        }
    }
}

/// The process group of a live (or zombie) process; `None` once it is reaped.
pub fn live_process_group(pid: i32) -> Option<i32> {
    nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(pid)))
        .ok()
        .map(|p| p.as_raw())
}

/// An accepted notification message.
#[derive(Debug)]
pub struct Message {
    pub sender: Sender,
    /// Never empty.
    pub items: Vec<Notification>,
    /// The fds sent with it, CLOEXEC; only when `items` has
    /// [`Notification::FdStore`], otherwise they were closed on receipt.
    pub fds: Vec<OwnedFd>,
}

/// One service's notify socket. Dropping it removes the socket file (unless
/// another socket has been bound at that path since).
#[derive(Debug)]
pub struct NotifySocket {
    socket: UnixDatagram,
    path: PathBuf,
    service: String,
    /// (st_dev, st_ino) of the socket file, to remove only our own.
    file: (u64, u64),
    /// The warnings about its messages: [`WARNINGS_PER_10S`] per 10 s, then counted.
    warnings: std::sync::Mutex<LogLimiter>,
}

/// Warnings about one socket's messages logged per 10 s; the rest are counted.
pub const WARNINGS_PER_10S: u32 = 10;

/// A socket's throttle for warnings about its messages.
fn warning_limiter() -> std::sync::Mutex<LogLimiter> {
    std::sync::Mutex::new(LogLimiter::new(
        WARNINGS_PER_10S,
        std::time::Duration::from_secs(10),
    ))
}

impl NotifySocket {
    /// Binds `<state_dir>/notify/<service>.sock`: the directory is created
    /// 0755, the socket 0666 (a service may run as any user; the
    /// credentials decide), CLOEXEC, non-blocking, with SO_PASSCRED and a
    /// large receive buffer. A stale socket file is replaced; one that a
    /// live process is bound to is an error. The path is absolute.
    pub fn bind(state_dir: &Path, service: &str) -> Result<NotifySocket, NotifyError> {
        if service.is_empty() || service.starts_with('.') || service.contains(['/', '\0']) {
            return Err(NotifyError::BadServiceName {
                service: service.to_string(),
            });
        }
        let dir = std::path::absolute(state_dir.join(SOCKET_DIR)).map_err(|source| {
            NotifyError::CreateDir {
                path: state_dir.join(SOCKET_DIR),
                source,
            }
        })?;
        let create_dir = |source| NotifyError::CreateDir {
            path: dir.clone(),
            source,
        };
        std::fs::create_dir_all(&dir).map_err(create_dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
            .map_err(create_dir)?;
        let path = dir.join(format!("{service}.sock"));
        let sock_err = |call: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| NotifyError::Socket { call, path, source }
        };
        if let Ok(meta) = std::fs::symlink_metadata(&path) {
            if meta.file_type().is_socket()
                && UnixDatagram::unbound()
                    .and_then(|probe| probe.connect(&path))
                    .is_ok()
            {
                return Err(NotifyError::InUse { path });
            }
            std::fs::remove_file(&path).map_err(sock_err("unlink", &path))?;
        }
        // std creates the socket with SOCK_CLOEXEC.
        let socket = UnixDatagram::bind(&path).map_err(sock_err("bind", &path))?;
        let meta = std::fs::symlink_metadata(&path).map_err(sock_err("stat", &path))?;
        let notify = NotifySocket {
            socket,
            file: (meta.dev(), meta.ino()),
            path,
            service: service.to_string(),
            warnings: warning_limiter(),
        };
        // From here on, dropping `notify` on an error removes the file.
        std::fs::set_permissions(&notify.path, std::fs::Permissions::from_mode(0o666))
            .map_err(sock_err("chmod", &notify.path))?;
        notify
            .socket
            .set_nonblocking(true)
            .map_err(sock_err("set O_NONBLOCK", &notify.path))?;
        use nix::sys::socket::{setsockopt, sockopt};
        setsockopt(&notify.socket, sockopt::PassCred, &true)
            .map_err(|e| sock_err("set SO_PASSCRED", &notify.path)(e.into()))?;
        // SCM_PIDFD with each message (Linux 6.5): who sent it, held by the
        // kernel, not by a pid number. Older kernels: SCM_CREDENTIALS only.
        let on: libc::c_int = 1;
        // SAFETY: setsockopt on our socket with a c_int option value.
        unsafe {
            libc::setsockopt(
                notify.socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PASSPIDFD,
                std::ptr::addr_of!(on).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        // SO_RCVBUFFORCE passes net.core.rmem_max but needs CAP_NET_ADMIN.
        if setsockopt(&notify.socket, sockopt::RcvBufForce, &RECEIVE_BUFFER).is_err() {
            if let Err(e) = setsockopt(&notify.socket, sockopt::RcvBuf, &RECEIVE_BUFFER) {
                tracing::warn!(service = %service, error = %e, "notify: cannot enlarge the receive buffer");
            }
        }
        Ok(notify)
    }

    /// The socket a holdfast before an in-place upgrade bound at `path`,
    /// inherited across the exec.
    pub fn adopt(fd: OwnedFd, path: PathBuf, service: &str) -> std::io::Result<NotifySocket> {
        use std::os::fd::AsRawFd;
        crate::fds::set_cloexec(fd.as_raw_fd(), true)?;
        let meta = std::fs::symlink_metadata(&path)?;
        Ok(NotifySocket {
            socket: UnixDatagram::from(fd),
            file: (meta.dev(), meta.ino()),
            path,
            service: service.to_string(),
            warnings: warning_limiter(),
        })
    }

    /// The socket's fd, to keep across an in-place upgrade's exec.
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.socket.as_raw_fd()
    }

    /// The socket's absolute path, for NOTIFY_SOCKET.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The fd to poll for POLLIN.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }

    /// Reads the pending datagrams (at most [`MAX_PER_RECEIVE`]) and returns
    /// the accepted ones, in order. A message is ignored, with a warning
    /// naming the service, when it has no credentials, `belongs` refuses its
    /// sender, it is over [`MAX_MESSAGE`] bytes or its control data was
    /// truncated, or [`parse`] refuses it whole; an empty one is ignored
    /// quietly. A field [`parse`] ignores is logged and the rest applied.
    /// The fds of an ignored message, and of an accepted one without
    /// FDSTORE=1, are closed.
    pub fn receive(&self, belongs: &dyn Fn(Sender) -> bool) -> Vec<Message> {
        self.receive_at_most(belongs, MAX_PER_RECEIVE)
    }

    fn receive_at_most(&self, belongs: &dyn Fn(Sender) -> bool, max: usize) -> Vec<Message> {
        if let Some(n) = self
            .warnings
            .lock()
            .ok()
            .and_then(|mut w| w.take_suppressed(Instant::now()))
        {
            tracing::warn!(service = %self.service, repeated = n, "notify: {n} more warnings were suppressed");
        }
        let mut accepted = Vec::new();
        let mut payload = vec![0u8; MAX_MESSAGE];
        let mut control = ControlBuffer::new();
        for _ in 0..max {
            match recv_datagram(self.socket.as_fd(), &mut payload, &mut control) {
                Ok(d) => {
                    if let Some(m) = self.judge(d, &payload, belongs) {
                        accepted.push(m);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    if let Some(repeated) = self.may_warn() {
                        tracing::warn!(repeated, service = %self.service, error = %e, "notify: recvmsg failed");
                    }
                    break;
                }
            }
        }
        accepted
    }

    /// Whether a warning about this socket's messages may be logged now
    /// (`Some(dropped before it)`): anyone who can write to the socket could
    /// otherwise flood the log.
    fn may_warn(&self) -> Option<u64> {
        self.warnings.lock().ok()?.allow(Instant::now())
    }

    /// Decides about one datagram; its fds are closed unless returned.
    fn judge(
        &self,
        d: Datagram,
        payload: &[u8],
        belongs: &dyn Fn(Sender) -> bool,
    ) -> Option<Message> {
        let service = &self.service;
        let Some(mut sender) = d.sender else {
            if let Some(repeated) = self.may_warn() {
                tracing::warn!(repeated, service = %service, "notify: message without credentials ignored");
            }
            return None;
        };
        sender.cgroup = sender_cgroup(sender.pid, d.pidfd);
        let (pid, uid) = (sender.pid, sender.uid);
        if !belongs(sender) {
            if let Some(repeated) = self.may_warn() {
                tracing::warn!(repeated, service = %service, pid, uid, "notify: message from a process outside the service ignored");
            }
            return None;
        }
        if d.truncated || d.len > MAX_MESSAGE {
            if let Some(repeated) = self.may_warn() {
                tracing::warn!(repeated, service = %service, pid, len = d.len, "notify: message over {MAX_MESSAGE} bytes ignored");
            }
            return None;
        }
        if d.control_truncated {
            if let Some(repeated) = self.may_warn() {
                tracing::warn!(repeated, service = %service, pid, "notify: message with truncated control data ignored");
            }
            return None;
        }
        let items = match parse(&payload[..d.len]) {
            Ok(parsed) => {
                for e in &parsed.ignored {
                    if let Some(repeated) = self.may_warn() {
                        tracing::warn!(repeated, service = %service, pid, error = %e, "notify: field ignored, the rest applied");
                    }
                }
                parsed.items
            }
            Err(e) => {
                if let Some(repeated) = self.may_warn() {
                    tracing::warn!(repeated, service = %service, pid, error = %e, "notify: malformed message ignored");
                }
                return None;
            }
        };
        if items.is_empty() {
            tracing::debug!(service = %service, pid, "notify: empty message ignored");
            return None;
        }
        let mut fds = d.fds;
        let stores = items
            .iter()
            .any(|n| matches!(n, Notification::FdStore { .. }));
        if !stores && !fds.is_empty() {
            // BARRIER=1 sends an fd to be closed; any other is unsolicited.
            if !items.contains(&Notification::Barrier) {
                if let Some(repeated) = self.may_warn() {
                    tracing::warn!(repeated, service = %service, pid, count = fds.len(), "notify: fds sent without FDSTORE=1 closed");
                }
            }
            fds.clear();
        }
        Some(Message { sender, items, fds })
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        if let Ok(meta) = std::fs::symlink_metadata(&self.path) {
            if (meta.dev(), meta.ino()) == self.file {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// One received datagram.
struct Datagram {
    /// The datagram's real length (MSG_TRUNC), even when it did not fit.
    len: usize,
    truncated: bool,
    control_truncated: bool,
    sender: Option<Sender>,
    /// The sender's pidfd (SCM_PIDFD).
    pidfd: Option<OwnedFd>,
    /// Every fd the kernel installed, owned at once so none can leak.
    fds: Vec<OwnedFd>,
}

/// SCM_PIDFD (linux/socket.h; not in libc yet).
const SCM_PIDFD: libc::c_int = 0x04;

/// Room for SCM_CREDENTIALS, SCM_PIDFD and SCM_MAX_FD fds, aligned for cmsghdr.
struct ControlBuffer(Vec<u64>);

impl ControlBuffer {
    const BYTES: usize = {
        // SAFETY: CMSG_SPACE only computes a size from its argument.
        unsafe {
            libc::CMSG_SPACE(std::mem::size_of::<libc::ucred>() as u32)
                + libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32)
                + libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<libc::c_int>()) as u32)
        }
    } as usize;

    fn new() -> ControlBuffer {
        ControlBuffer(vec![0; ControlBuffer::BYTES.div_ceil(8)])
    }
}

/// recvmsg(2) with MSG_TRUNC (report the real length), MSG_CMSG_CLOEXEC
/// and MSG_DONTWAIT: the one place this module talks to the kernel about
/// datagrams. Walks the control messages itself so that fds are owned even
/// when the control data was truncated.
fn recv_datagram(
    fd: BorrowedFd<'_>,
    payload: &mut [u8],
    control: &mut ControlBuffer,
) -> io::Result<Datagram> {
    let mut iov = libc::iovec {
        iov_base: payload.as_mut_ptr().cast(),
        iov_len: payload.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    msg.msg_controllen = ControlBuffer::BYTES as _;
    // SAFETY: msg points at iov (one buffer of payload.len() bytes) and at
    // control (BYTES bytes, 8-aligned), all alive and exclusively borrowed
    // for the call; fd is an open socket.
    let n = unsafe {
        libc::recvmsg(
            fd.as_raw_fd(),
            &mut msg,
            libc::MSG_TRUNC | libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut d = Datagram {
        len: n as usize,
        truncated: msg.msg_flags & libc::MSG_TRUNC != 0,
        control_truncated: msg.msg_flags & libc::MSG_CTRUNC != 0,
        sender: None,
        pidfd: None,
        fds: Vec::new(),
    };
    // SAFETY: msg was filled in by recvmsg; msg_controllen now says how much
    // of the control buffer holds control messages, and CMSG_FIRSTHDR /
    // CMSG_NXTHDR return null rather than step past it.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        // SAFETY: cmsg is non-null and points at a header inside the buffer.
        let (level, kind, len) =
            unsafe { ((*cmsg).cmsg_level, (*cmsg).cmsg_type, (*cmsg).cmsg_len) };
        // SAFETY: as above; CMSG_DATA only offsets the pointer.
        let data = unsafe { libc::CMSG_DATA(cmsg) };
        // cmsg_len is a size_t with glibc, a u32 with musl.
        let len: usize = len as _;
        let data_len = len.saturating_sub(data as usize - cmsg as usize);
        // SAFETY: data points at data_len bytes of this control message,
        // filled in by the kernel for this call.
        unsafe { take_control_message(&mut d, level, kind, data, data_len) };
        // SAFETY: msg and cmsg are as above.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    Ok(d)
}

/// Takes what one control message carries into `d`: SCM_RIGHTS fds,
/// SCM_CREDENTIALS, SCM_PIDFD; anything else is left alone.
///
/// # Safety
/// `data` must point at `data_len` readable bytes of a control message the
/// kernel filled in for this process, whose fds nobody else owns.
unsafe fn take_control_message(
    d: &mut Datagram,
    level: libc::c_int,
    kind: libc::c_int,
    data: *const libc::c_uchar,
    data_len: usize,
) {
    match (level, kind) {
        (libc::SOL_SOCKET, libc::SCM_RIGHTS) => {
            for i in 0..data_len / std::mem::size_of::<libc::c_int>() {
                // SAFETY: i is within the cmsg's data, which the kernel
                // filled with fd numbers it just installed for us.
                let raw = unsafe { data.cast::<libc::c_int>().add(i).read_unaligned() };
                // SAFETY: the kernel installed this fd in our table for
                // this message only; nobody else owns it.
                d.fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
            }
        }
        (libc::SOL_SOCKET, libc::SCM_CREDENTIALS)
            if data_len >= std::mem::size_of::<libc::ucred>() =>
        {
            // SAFETY: the data holds a whole ucred (checked above).
            let c = unsafe { data.cast::<libc::ucred>().read_unaligned() };
            d.sender = Some(Sender {
                pid: c.pid,
                uid: c.uid,
                gid: c.gid,
                cgroup: None,
            });
        }
        (libc::SOL_SOCKET, SCM_PIDFD) if data_len >= std::mem::size_of::<libc::c_int>() => {
            // SAFETY: the data holds one fd number (checked above).
            let raw = unsafe { data.cast::<libc::c_int>().read_unaligned() };
            if raw >= 0 {
                // SAFETY: the kernel installed this pidfd for this message only.
                d.pidfd = Some(unsafe { OwnedFd::from_raw_fd(raw) });
            }
        }
        _ => {}
    }
}
