//! Test support shared by the example services' integration tests (hello-http's, and echo's
//! through `#[path]`): starting a real binary under Debian's `systemd-socket-activate` (the
//! reference LISTEN_FDS provider) on free ports, or handing it sockets the test made itself, the
//! way holdfast does.
#![allow(
    dead_code,
    reason = "included by several test binaries, each of which uses a subset"
)]

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const SOCKET_ACTIVATE: &str = "/usr/bin/systemd-socket-activate";

/// A port that was free a moment ago (bind port 0, read it, close). Callers retry on a clash.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0 to find a free port")
}

/// A program running under `systemd-socket-activate`, which execs it in place on the first
/// connection or datagram: the program's pid is the child's pid. Killed on drop.
pub struct Activated {
    pub child: Child,
    pub ports: Vec<u16>,
    log: Arc<Mutex<String>>,
}

impl Activated {
    /// Start `systemd-socket-activate` with `n_ports` fresh ports; `argv(ports)` gives its
    /// arguments (`-l`, `--datagram`, `--fdname`, `--`, the program and its arguments). A clash
    /// on a port (another test took it meanwhile) is retried with new ports.
    pub fn start(n_ports: usize, argv: impl Fn(&[u16]) -> Vec<String>) -> Activated {
        assert!(
            std::path::Path::new(SOCKET_ACTIVATE).exists(),
            "{SOCKET_ACTIVATE} is missing: apt-get install systemd"
        );
        let mut last_log = String::new();
        for _attempt in 0..10 {
            let ports: Vec<u16> = (0..n_ports).map(|_| free_port()).collect();
            let mut child = Command::new(SOCKET_ACTIVATE)
                .args(argv(&ports))
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn systemd-socket-activate");
            let mut lines = BufReader::new(child.stderr.take().expect("piped stderr")).lines();
            let mut log = String::new();
            let mut listening = 0;
            while listening < n_ports {
                match lines.next() {
                    Some(Ok(line)) => {
                        listening += usize::from(line.starts_with("Listening on"));
                        log.push_str(&line);
                        log.push('\n');
                    }
                    _ => break,
                }
            }
            if listening == n_ports {
                let log = Arc::new(Mutex::new(log));
                let sink = log.clone();
                // Keep reading stderr so the program never blocks on a full pipe.
                std::thread::spawn(move || {
                    for line in lines.map_while(Result::ok) {
                        let mut log = sink.lock().unwrap();
                        log.push_str(&line);
                        log.push('\n');
                    }
                });
                return Activated { child, ports, log };
            }
            let _ = child.kill();
            let _ = child.wait();
            last_log = log;
        }
        panic!("systemd-socket-activate never listened on free ports; last output:\n{last_log}");
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the launcher and the program wrote to stderr so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Activated {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start `program` with `fds` as fds 3, 4, … and LISTEN_FDS / LISTEN_FDNAMES / LISTEN_PID set
/// exactly as systemd and holdfast do. LISTEN_PID must be the program's own pid, which is only
/// known after fork: a `sh -c 'LISTEN_PID=$$ exec …'` trampoline sets it and execs in place.
pub fn spawn_with_fds(
    program: &str,
    args: &[&str],
    fds: &[BorrowedFd<'_>],
    names: &[&str],
    envs: &[(&str, &str)],
    stderr: Stdio,
) -> Child {
    assert_eq!(fds.len(), names.len(), "one name per fd");
    // Copy every fd above the target range first, so placing fd i at 3+i never clobbers a
    // source fd that happens to sit in 3..3+n. The copies are CLOEXEC and die with the exec.
    let high: Vec<std::os::fd::OwnedFd> = fds
        .iter()
        .map(|fd| {
            let raw = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(100))
                .expect("F_DUPFD_CLOEXEC");
            // SAFETY: fcntl just returned this fd, so it is open and owned by nobody else.
            unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) }
        })
        .collect();
    let sources: Vec<i32> = high.iter().map(|fd| fd.as_raw_fd()).collect();
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(r#"LISTEN_PID=$$; export LISTEN_PID; exec "$0" "$@""#)
        .arg(program)
        .args(args)
        .env("LISTEN_FDS", fds.len().to_string())
        .env("LISTEN_FDNAMES", names.join(":"))
        .env_remove("LISTEN_PID")
        .envs(envs.iter().copied())
        .stderr(stderr);
    // SAFETY: the closure runs in the forked child before exec and only calls dup2, which is
    // async-signal-safe; it allocates nothing and takes no lock.
    unsafe {
        command.pre_exec(move || {
            for (i, src) in sources.iter().enumerate() {
                // dup2 leaves the new fd without FD_CLOEXEC, so it survives the exec.
                nix::unistd::dup2(*src, 3 + i as i32)?;
            }
            Ok(())
        });
    }
    let child = command.spawn().expect("spawn the program with its fds");
    drop(high);
    child
}

/// Retry `f` until it returns Some or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `127.0.0.1:port` / `[::1]:port`.
pub fn v4(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}
pub fn v6(port: u16) -> SocketAddr {
    SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port))
}
