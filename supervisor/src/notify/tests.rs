//! Notify sockets with real senders: Debian's systemd-notify, the sd-notify
//! crate (in a child process: this test binary run again as
//! `sender_child`), and raw datagrams sent from here.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pretty_assertions::assert_eq;

use super::*;
use Notification as N;

/// Tells the re-executed test binary which sender to play.
const SCENARIO: &str = "HOLDFAST_NOTIFY_TEST_SENDER";
const SENT: &str = "holdfast-notify-test: sent";

fn socket() -> (tempfile::TempDir, NotifySocket) {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = NotifySocket::bind(dir.path(), "web").expect("bind the notify socket");
    (dir, sock)
}

fn me() -> i32 {
    std::process::id() as i32
}

fn wait_readable(sock: &NotifySocket, timeout: Duration) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(sock.as_fd(), PollFlags::POLLIN)];
    let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
    poll(&mut fds, PollTimeout::from(ms)).expect("poll") > 0
}

/// Runs this test binary again as the sender `scenario`.
fn sender(scenario: &str, sock: &NotifySocket) -> Command {
    sender_at(
        &std::env::current_exe().expect("current_exe"),
        scenario,
        sock,
    )
}

/// Like [`sender`], running the test binary copied to `exe`.
fn sender_at(exe: &Path, scenario: &str, sock: &NotifySocket) -> Command {
    let mut c = Command::new(exe);
    c.args([
        "--exact",
        "notify::tests::sender_child",
        "--ignored",
        "--nocapture",
        "-q",
    ])
    .env("NOTIFY_SOCKET", sock.path())
    .env(SCENARIO, scenario);
    c
}

fn run_sender(scenario: &str, sock: &NotifySocket) -> i32 {
    let mut child = sender(scenario, sock).spawn().expect("spawn the sender");
    let pid = child.id() as i32;
    let status = child.wait().expect("wait for the sender");
    assert!(status.success(), "sender {scenario} failed: {status}");
    pid
}

/// The sender side, in its own process: sd-notify reads NOTIFY_SOCKET from
/// the environment, which a test must not set in a multithreaded process.
#[test]
#[ignore = "the sender half of the notify tests; they run it with NOTIFY_SOCKET set"]
fn sender_child() {
    use sd_notify::NotifyState as S;
    let Ok(scenario) = std::env::var(SCENARIO) else {
        eprintln!("{SCENARIO} is not set: nothing to send");
        return;
    };
    match scenario.as_str() {
        "states" => {
            sd_notify::notify(&[S::Ready, S::Status("serving 3 clients")]).unwrap();
            sd_notify::notify(&[S::Watchdog]).unwrap();
            sd_notify::notify(&[S::WatchdogUsec(1_500_000)]).unwrap();
            sd_notify::notify(&[S::ExtendTimeoutUsec(20_000_000)]).unwrap();
            sd_notify::notify(&[S::WatchdogTrigger, S::Errno(5), S::MainPid(4242)]).unwrap();
            sd_notify::notify(&[S::Reloading, S::Stopping]).unwrap();
            sd_notify::notify(&[S::FdStoreRemove, S::FdName("old")]).unwrap();
        }
        "fdstore" => {
            let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
            File::from(w.try_clone().unwrap())
                .write_all(b"from the sender;")
                .unwrap();
            sd_notify::notify_with_fds(&[S::FdStore, S::FdName("pipe")], &[r.as_fd(), w.as_fd()])
                .unwrap();
        }
        "unsolicited-fd" => {
            use nix::fcntl::OFlag;
            let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).unwrap();
            sd_notify::notify_with_fds(&[S::Ready], &[r.as_fd()]).unwrap();
            drop(r);
            // The receiver closes the read end it got: our write end then
            // has no reader left, and writing fails with EPIPE.
            let mut w = File::from(w);
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match w.write(b"?") {
                    Err(e) if e.raw_os_error() == Some(libc::EPIPE) => break,
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("write: {e}"),
                }
                assert!(Instant::now() < deadline, "the receiver kept the fd open");
                std::thread::sleep(Duration::from_millis(10));
            }
            println!("{SENT}");
        }
        "on-request" => {
            // One READY=1 per line on stdin, acknowledged on stdout.
            for (i, line) in std::io::stdin().lock().lines().enumerate() {
                line.unwrap();
                sd_notify::notify(&[S::Status(&format!("message {i}"))]).unwrap();
                println!("{SENT}");
            }
        }
        other => panic!("unknown scenario {other:?}"),
    }
}

#[test]
fn bind_makes_a_world_writable_socket_and_drop_removes_it() {
    use std::os::unix::fs::FileTypeExt;
    let dir = tempfile::tempdir().unwrap();
    let sock = NotifySocket::bind(dir.path(), "web").unwrap();
    let path = sock.path().to_path_buf();
    assert!(path.is_absolute());
    assert_eq!(path, dir.path().join("notify/web.sock"));
    let meta = std::fs::symlink_metadata(&path).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o666);
    let dmeta = std::fs::metadata(dir.path().join("notify")).unwrap();
    assert_eq!(dmeta.permissions().mode() & 0o777, 0o755);
    let fd = sock.as_fd().as_raw_fd();
    let fdflags = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).unwrap();
    assert!(fdflags & libc::FD_CLOEXEC != 0, "CLOEXEC");
    let flflags = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFL).unwrap();
    assert!(flflags & libc::O_NONBLOCK != 0, "non-blocking");
    use nix::sys::socket::{getsockopt, sockopt};
    assert!(getsockopt(&sock.socket, sockopt::PassCred).unwrap());
    // Nothing pending: receive returns at once.
    assert!(sock.receive(&|_| true).is_empty());

    // A live socket at the path is not stolen.
    match NotifySocket::bind(dir.path(), "web") {
        Err(NotifyError::InUse { path: p }) => assert_eq!(p, path),
        other => panic!("expected InUse, got {other:?}"),
    }
    drop(sock);
    assert!(!path.exists(), "drop removes the socket file");

    // A stale socket file (nobody bound) is replaced.
    let stale = UnixDatagram::bind(&path).unwrap();
    drop(stale);
    let again = NotifySocket::bind(dir.path(), "web").unwrap();
    // Dropping an old socket whose path was rebound leaves the new file.
    let path2 = again.path().to_path_buf();
    std::fs::remove_file(&path2).unwrap();
    let newer = NotifySocket::bind(dir.path(), "web").unwrap();
    drop(again);
    assert!(
        path2.exists(),
        "an old socket does not remove a newer one's file"
    );
    drop(newer);

    for bad in ["", "../x", "a/b", ".hidden"] {
        assert!(
            matches!(
                NotifySocket::bind(dir.path(), bad),
                Err(NotifyError::BadServiceName { .. })
            ),
            "{bad:?}"
        );
    }
}

/// Receives until `child` has exited and nothing more is pending.
fn receive_while_running(
    sock: &NotifySocket,
    child: &mut Child,
    belongs: &dyn Fn(Sender) -> bool,
) -> (Vec<Message>, std::process::ExitStatus) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut got = Vec::new();
    loop {
        wait_readable(sock, Duration::from_millis(50));
        got.extend(sock.receive(belongs));
        if let Some(status) = child.try_wait().expect("try_wait") {
            got.extend(sock.receive(belongs));
            return (got, status);
        }
        assert!(Instant::now() < deadline, "the sender did not exit");
    }
}

fn systemd_notify(sock: &NotifySocket) -> Child {
    Command::new("/usr/bin/systemd-notify")
        .args(["--ready", "--status=hello"])
        .env("NOTIFY_SOCKET", sock.path())
        .stdin(Stdio::null())
        .spawn()
        .expect("run /usr/bin/systemd-notify (Debian package systemd)")
}

#[test]
fn systemd_notify_ready_and_status() {
    let (_dir, sock) = socket();
    let mut child = systemd_notify(&sock);
    let child_pid = child.id() as i32;
    let senders = std::cell::RefCell::new(Vec::new());
    // systemd-notify speaks for its parent (as root it sends its parent's
    // pid in the credentials, and MAINPID when it does): here, this test.
    let (got, status) = receive_while_running(&sock, &mut child, &|s| {
        senders.borrow_mut().push(s);
        s.pid == me() || s.pid == child_pid
    });
    // systemd-notify waits (BARRIER=1) until its fd is closed: a zero exit
    // says receive closed it.
    assert!(status.success(), "systemd-notify failed: {status}");
    let items: Vec<&Notification> = got.iter().flat_map(|m| &m.items).collect();
    assert!(items.contains(&&N::Ready), "{items:?}");
    assert!(items.contains(&&N::Status("hello".into())), "{items:?}");
    assert!(
        items
            .iter()
            .all(|n| matches!(n, N::Ready | N::Status(_) | N::MainPid(_) | N::Barrier)),
        "{items:?}"
    );
    for m in &got {
        assert!(m.fds.is_empty(), "the barrier fd is closed, not returned");
    }
    let senders = senders.into_inner();
    assert!(!senders.is_empty());
    assert!(senders
        .iter()
        .all(|s| s.uid == nix::unistd::getuid().as_raw()));
}

#[test]
fn systemd_notify_from_a_foreign_pid_is_ignored() {
    let (_dir, sock) = socket();
    let mut child = systemd_notify(&sock);
    let child_pid = child.id() as i32;
    let asked = std::cell::Cell::new(0);
    let (got, status) = receive_while_running(&sock, &mut child, &|s| {
        asked.set(asked.get() + 1);
        s.pid != me() && s.pid != child_pid
    });
    assert!(asked.get() >= 1, "no message reached the predicate");
    assert!(got.is_empty(), "{got:?}");
    // The refused BARRIER=1 fd was closed too, so systemd-notify finished.
    assert!(status.success(), "systemd-notify failed: {status}");
}

#[test]
fn sd_notify_crate_states() {
    let (_dir, sock) = socket();
    let pid = run_sender("states", &sock);
    let got = sock.receive(&|s| {
        Senders {
            main_pids: &[pid],
            groups: &[],
            uid: 65534,
        }
        .accepts(s)
    });
    let items: Vec<Vec<Notification>> = got.iter().map(|m| m.items.clone()).collect();
    assert_eq!(
        items,
        vec![
            vec![N::Ready, N::Status("serving 3 clients".into())],
            vec![N::Watchdog],
            vec![N::WatchdogUsec(Duration::from_micros(1_500_000))],
            vec![N::ExtendTimeout(Duration::from_secs(20))],
            vec![N::WatchdogTrigger, N::Errno(5), N::MainPid(4242)],
            vec![N::Reloading, N::Stopping],
            vec![N::FdStoreRemove { name: "old".into() }],
        ]
    );
    for m in &got {
        assert_eq!(m.sender.pid, pid);
        assert_eq!(m.sender.uid, nix::unistd::getuid().as_raw());
    }
}

#[test]
fn sd_notify_crate_fdstore_hands_over_working_fds() {
    let (_dir, sock) = socket();
    let pid = run_sender("fdstore", &sock);
    let mut got = sock.receive(&|s| s.pid == pid);
    assert_eq!(got.len(), 1, "{got:?}");
    let m = got.pop().unwrap();
    assert_eq!(
        m.items,
        vec![N::FdStore {
            name: Some("pipe".into())
        }]
    );
    assert_eq!(m.fds.len(), 2);
    for fd in &m.fds {
        let flags = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFD).unwrap();
        assert!(flags & libc::FD_CLOEXEC != 0, "received fds are CLOEXEC");
    }
    let mut store = FdStore::new(4);
    for fd in m.fds {
        assert_eq!(store.add("pipe", fd).unwrap(), Added::Stored);
    }
    let fds: Vec<OwnedFd> = store
        .fds()
        .map(|(name, fd)| {
            assert_eq!(name, "pipe");
            fd.try_clone_to_owned().unwrap()
        })
        .collect();
    let [r, w] = <[OwnedFd; 2]>::try_from(fds).unwrap();
    File::from(w).write_all(b" and back").unwrap();
    let mut buf = vec![0u8; 64];
    let n = File::from(r).read(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"from the sender; and back");
}

#[test]
fn unsolicited_fds_are_closed_and_the_message_kept() {
    let (_dir, sock) = socket();
    let mut child = sender("unsolicited-fd", &sock)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let (got, status) = receive_while_running(&sock, &mut child, &|s| s.pid == pid);
    // The child exits 0 only once it saw its pipe lose its last reader.
    assert!(status.success(), "{status}");
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(out.contains(SENT), "{out}");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].items, vec![N::Ready]);
    assert!(got[0].fds.is_empty());
}

/// Sends `payload` with `fds` from this process (credentials: this pid).
fn send(sock: &NotifySocket, payload: &[u8], fds: &[i32]) {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
    let tx = UnixDatagram::unbound().unwrap();
    let addr = UnixAddr::new(sock.path()).unwrap();
    let cmsgs: Vec<ControlMessage<'_>> = if fds.is_empty() {
        vec![]
    } else {
        vec![ControlMessage::ScmRights(fds)]
    };
    let n = sendmsg(
        tx.as_raw_fd(),
        &[std::io::IoSlice::new(payload)],
        &cmsgs,
        MsgFlags::empty(),
        Some(&addr),
    )
    .expect("sendmsg");
    assert_eq!(n, payload.len());
}

/// A pipe; the test keeps the write end to see whether the read end, sent
/// or stored away, was closed.
pub(super) fn watched_pipe() -> (OwnedFd, File) {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    (r, File::from(w))
}

/// Whether the pipe behind `w` still has a reader: writing to a pipe
/// whose every read end is closed fails with EPIPE (SIGPIPE is ignored in
/// Rust programs). Checks closing without racing on fd numbers.
pub(super) fn has_reader(w: &mut File) -> bool {
    match w.write(b"?") {
        Ok(_) => true,
        Err(e) if e.raw_os_error() == Some(libc::EPIPE) => false,
        Err(e) => panic!("write to a pipe: {e}"),
    }
}

#[test]
fn oversized_malformed_and_foreign_messages_are_ignored_and_their_fds_closed() {
    let (_dir, sock) = socket();
    let ours = |s: Sender| s.pid == me();

    send(&sock, &vec![b'x'; 10 * 1024], &[]);
    send(&sock, b"READY=1", &[]);
    let got = sock.receive(&ours);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].items, vec![N::Ready]);

    // Exactly MAX_MESSAGE bytes of a valid message is accepted; one more is not.
    let status = |len: usize| {
        let mut p = b"STATUS=".to_vec();
        p.resize(len, b's');
        p
    };
    send(&sock, &status(MAX_MESSAGE), &[]);
    send(&sock, &status(MAX_MESSAGE + 1), &[]);
    let got = sock.receive(&ours);
    assert_eq!(got.len(), 1);
    assert!(matches!(&got[0].items[..], [N::Status(s)] if s.len() == MAX_MESSAGE - 7));

    // A bad field is ignored and the rest applied, as systemd does.
    send(&sock, b"READY=1\nMAINPID=0\nSTATUS=one", &[]);
    send(&sock, b"READY=1\nno equals sign\nSTATUS=two", &[]);
    let got = sock.receive(&ours);
    let items: Vec<_> = got.iter().map(|m| m.items.clone()).collect();
    assert_eq!(
        items,
        vec![
            vec![N::Ready, N::Status("one".into())],
            vec![N::Ready, N::Status("two".into())]
        ]
    );

    // Oversized, NUL-carrying and foreign messages carrying FDSTORE fds: all
    // dropped, every fd closed.
    let mut watched = Vec::new();
    let mut oversized = b"FDSTORE=1\n".to_vec();
    oversized.resize(10 * 1024, b'\n');
    let payloads: [&[u8]; 2] = [&oversized, b"FDSTORE=1\n\0STATUS=x"];
    for payload in payloads {
        let (r, w) = watched_pipe();
        send(&sock, payload, &[r.as_raw_fd()]);
        drop(r);
        watched.push(w);
    }
    assert!(sock.receive(&ours).is_empty());
    let (r, w) = watched_pipe();
    send(&sock, b"FDSTORE=1\nFDNAME=ok", &[r.as_raw_fd()]);
    drop(r);
    watched.push(w);
    assert!(
        sock.receive(&|_| false).is_empty(),
        "foreign sender refused"
    );
    for (i, w) in watched.iter_mut().enumerate() {
        assert!(!has_reader(w), "fd of ignored message {i} left open");
    }

    // The socket still works, and a good FDSTORE keeps its fd.
    let (r, mut w) = watched_pipe();
    send(&sock, b"FDSTORE=1\nFDNAME=ok\n", &[r.as_raw_fd()]);
    drop(r);
    let got = sock.receive(&ours);
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].items,
        vec![N::FdStore {
            name: Some("ok".into())
        }]
    );
    assert_eq!(got[0].fds.len(), 1);
    assert!(has_reader(&mut w));
    drop(got);
    assert!(!has_reader(&mut w));

    // Empty datagrams are dropped quietly.
    send(&sock, b"", &[]);
    send(&sock, b"\n", &[]);
    assert!(sock.receive(&ours).is_empty());
}

#[test]
fn receive_reads_a_bounded_batch() {
    // The kernel queues at most net.unix.max_dgram_qlen datagrams per
    // socket (10 by default) and a blocking sender waits beyond that, so
    // the bound is tested with a small one.
    let (_dir, sock) = socket();
    for _ in 0..7 {
        send(&sock, b"WATCHDOG=1", &[]);
    }
    assert_eq!(sock.receive_at_most(&|_| true, 4).len(), 4);
    assert!(
        wait_readable(&sock, Duration::ZERO),
        "the rest stays readable"
    );
    assert_eq!(sock.receive_at_most(&|_| true, 4).len(), 3);
    assert!(!wait_readable(&sock, Duration::ZERO));
}

#[test]
fn sender_rule_table() {
    let senders = Senders {
        main_pids: &[100],
        groups: &[100, 300],
        uid: 1000,
    };
    let s = |pid, uid| Sender {
        pid,
        uid,
        gid: 0,
        cgroup: None,
    };
    // pid → process group; pids missing here have exited.
    let groups = |pid: i32| match pid {
        100 | 101 => Some(100),
        301 => Some(300),
        200 => Some(200),
        0 => panic!("getpgid(0) would answer holdfast's own group"),
        _ => None,
    };
    let cases = [
        (s(100, 4242), true, "the main pid, any uid"),
        (s(101, 4242), true, "a member of the service's group"),
        (s(301, 4242), true, "a member of another instance's group"),
        (s(200, 0), false, "alive in a foreign group, even as root"),
        (
            s(200, 1000),
            false,
            "alive in a foreign group, even as the service's user",
        ),
        (s(555, 1000), true, "exited, the service's user"),
        (s(555, 0), true, "exited, root"),
        (s(555, 4242), false, "exited, another user"),
        (s(0, 1000), true, "pid not visible, the service's user"),
        (s(0, 4242), false, "pid not visible, another user"),
    ];
    for (sender, want, why) in cases {
        assert_eq!(senders.accepts_with(sender, &groups), want, "{why}");
    }
}

#[test]
fn sender_rule_with_real_processes() {
    // A live sender in its own process group: refused unless its group is
    // the service's, whatever its uid (here: ours).
    let (_dir, sock) = socket();
    use std::os::unix::process::CommandExt;
    let mut child = sender("on-request", &sock)
        .process_group(0)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let uid = nix::unistd::getuid().as_raw();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut request = |stdin: &mut std::process::ChildStdin| {
        writeln!(stdin, "send").unwrap();
        let mut line = String::new();
        while !line.contains(SENT) {
            line.clear();
            assert!(stdout.read_line(&mut line).unwrap() > 0, "sender quit");
        }
    };
    request(&mut stdin);
    let foreign = Senders {
        main_pids: &[],
        groups: &[pid + 1],
        uid,
    };
    assert!(sock.receive(&|s| foreign.accepts(s)).is_empty());
    request(&mut stdin);
    let own = Senders {
        main_pids: &[],
        groups: &[pid],
        uid: 4242,
    };
    let got = sock.receive(&|s| own.accepts(s));
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].items, vec![N::Status("message 1".into())]);
    drop(stdin);
    assert!(child.wait().unwrap().success());
}

#[test]
fn exited_sender_is_judged_by_uid() {
    use std::os::unix::process::CommandExt;
    if !nix::unistd::geteuid().is_root() {
        let why = "sending as another uid needs root (geteuid != 0)";
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{why}");
        }
        eprintln!("skipped: {why}");
        return;
    }
    const NOBODY: u32 = 65534;
    let dir = tempfile::tempdir().unwrap();
    // The service's user must reach the socket through the state dir.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let sock = NotifySocket::bind(dir.path(), "web").unwrap();
    // nobody may not reach the test binary where it was built (a checkout
    // in a 0700 directory): it runs a copy in the 0755 directory.
    let exe = dir.path().join("sender");
    std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    let run_as_nobody = || {
        let status = sender_at(&exe, "states", &sock)
            .uid(NOBODY)
            .gid(NOBODY)
            .status()
            .unwrap();
        assert!(status.success(), "sender as uid {NOBODY}: {status}");
    };
    // The sender has exited and been reaped: only the uid can decide.
    run_as_nobody();
    let other_user = Senders {
        main_pids: &[],
        groups: &[],
        uid: 1000,
    };
    assert!(sock.receive(&|s| other_user.accepts(s)).is_empty());
    run_as_nobody();
    let its_user = Senders {
        main_pids: &[],
        groups: &[],
        uid: NOBODY,
    };
    let got = sock.receive(&|s| its_user.accepts(s));
    assert_eq!(got.len(), 7, "{got:?}");
    assert!(got.iter().all(|m| m.sender.uid == NOBODY));
}

/// A log sink for one thread's tracing output.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_flood_of_bad_messages_logs_a_few_warnings_then_counts_them() {
    let (_dir, sock) = socket();
    let ours = |s: Sender| s.pid == me();
    let log = Captured::default();
    let sink = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || sink.clone())
        .with_ansi(false)
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        // Anyone who may write to the socket can send these as fast as it likes.
        for _ in 0..5 {
            for _ in 0..8 {
                send(&sock, b"READY=1\0", &[]);
            }
            assert!(sock.receive(&ours).is_empty());
        }
        assert!(sock.receive(&|_| false).is_empty());
    });
    let text = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
    let warnings = text.lines().filter(|l| l.contains("WARN")).count();
    assert_eq!(
        warnings, WARNINGS_PER_10S as usize,
        "40 bad datagrams should log {WARNINGS_PER_10S} warnings:\n{text}"
    );
    assert!(text.contains("NUL"), "{text}");
}
