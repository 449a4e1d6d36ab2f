//! Socket activation without holdfast: a program started with sockets the test made itself,
//! at fds 3, 4, … with LISTEN_FDS / LISTEN_FDNAMES / LISTEN_PID as systemd and holdfast set
//! them ([`HandedFds`]), or under Debian's `systemd-socket-activate`, the reference
//! LISTEN_FDS provider, on free ports ([`Activated`]).

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};

/// Debian's `systemd-socket-activate` (package `systemd`).
pub const SOCKET_ACTIVATE: &str = "/usr/bin/systemd-socket-activate";

/// `127.0.0.1:PORT`.
pub fn loopback4(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// `[::1]:PORT`.
pub fn loopback6(port: u16) -> SocketAddr {
    SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port))
}

/// A port that was free a moment ago (bind port 0, read it, close): callers retry on a clash.
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("bind 127.0.0.1:0 to find a free port")?
        .port())
}

/// A command that starts `program` with the test's fds at 3, 4, … (and nothing else open
/// above 2), `LISTEN_FDS` = their number and `LISTEN_PID` = the program's own pid: a
/// `sh -c 'LISTEN_PID=$$ exec …'` trampoline sets it, since it is known only after fork.
/// [`HandedFds::command`] adds arguments, environment (`LISTEN_FDNAMES`, or a wrong
/// `LISTEN_FDS` to test a consumer) and stdio.
#[derive(Debug)]
pub struct HandedFds {
    command: Command,
    /// Copies of the fds above the target range, alive until the spawn.
    copies: Vec<OwnedFd>,
}

impl HandedFds {
    /// The program gets `fds` in order and, when `names` is not empty, `LISTEN_FDNAMES`
    /// = `names` joined by `:`.
    pub fn new(program: &str, fds: &[BorrowedFd<'_>], names: &[&str]) -> Result<HandedFds> {
        HandedFds::with_listen_pid(program, fds, names, "$$")
    }

    /// Like [`HandedFds::new`] but with `LISTEN_PID=PID`: a pid that is not the program's
    /// own, which a consumer must ignore.
    pub fn for_another_pid(
        program: &str,
        fds: &[BorrowedFd<'_>],
        names: &[&str],
        pid: u32,
    ) -> Result<HandedFds> {
        HandedFds::with_listen_pid(program, fds, names, &pid.to_string())
    }

    fn with_listen_pid(
        program: &str,
        fds: &[BorrowedFd<'_>],
        names: &[&str],
        listen_pid: &str,
    ) -> Result<HandedFds> {
        // Copy every fd above the target range first, so placing fd i at 3+i never clobbers
        // a source that sits in 3..3+n. The copies are CLOEXEC and die with the exec.
        let copies = fds
            .iter()
            .map(|fd| {
                let raw =
                    nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(100))
                        .context("F_DUPFD_CLOEXEC")?;
                // SAFETY: fcntl just returned this fd, so it is open and owned by nobody else.
                Ok(unsafe { OwnedFd::from_raw_fd(raw) })
            })
            .collect::<Result<Vec<OwnedFd>>>()?;
        let sources: Vec<RawFd> = copies.iter().map(|fd| fd.as_raw_fd()).collect();
        let mut command = Command::new("/bin/sh");
        command
            .arg("-c")
            .arg(format!(
                r#"LISTEN_PID={listen_pid}; export LISTEN_PID; exec "$0" "$@""#
            ))
            .arg(program)
            .env("LISTEN_FDS", fds.len().to_string())
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDNAMES")
            .stdin(Stdio::null());
        if !names.is_empty() {
            command.env("LISTEN_FDNAMES", names.join(":"));
        }
        // SAFETY: the closure runs in the forked child before exec and makes only
        // async-signal-safe system calls (dup2, close_range) on fds listed before the fork;
        // it allocates nothing and takes no lock.
        unsafe {
            command.pre_exec(move || {
                for (i, &src) in sources.iter().enumerate() {
                    // dup2 leaves the new fd without FD_CLOEXEC, so it survives the exec.
                    if libc::dup2(src, 3 + i as RawFd) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                // Whatever the test process inherited without CLOEXEC (cargo's jobserver
                // pipe, …) is not the program's business.
                libc::close_range(3 + sources.len() as u32, u32::MAX, 0);
                Ok(())
            });
        }
        Ok(HandedFds { command, copies })
    }

    /// The command, to add the program's arguments, environment and stdio.
    pub fn command(&mut self) -> &mut Command {
        &mut self.command
    }

    /// Starts it.
    pub fn spawn(mut self) -> Result<Child> {
        let child = self
            .command
            .spawn()
            .context("spawn a program with handed fds")?;
        drop(self.copies);
        Ok(child)
    }
}

/// A program running under `systemd-socket-activate`, which execs it in place on the first
/// connection or datagram: the program's pid is the child's pid. Killed on drop.
#[derive(Debug)]
pub struct Activated {
    pub child: Child,
    pub ports: Vec<u16>,
    log: Arc<Mutex<String>>,
}

impl Activated {
    /// Starts `systemd-socket-activate` with `n_ports` fresh ports; `argv(ports)` gives its
    /// arguments (`--listen`, `--datagram`, `--fdname`, `--`, the program and its
    /// arguments). A clash on a port (another test took it meanwhile) is retried with new
    /// ports.
    pub fn start(n_ports: usize, argv: impl Fn(&[u16]) -> Vec<String>) -> Result<Activated> {
        if !std::path::Path::new(SOCKET_ACTIVATE).exists() {
            bail!("{SOCKET_ACTIVATE} is missing: apt-get install systemd (cargo xtask bootstrap)");
        }
        let mut last_log = String::new();
        for _attempt in 0..10 {
            let ports = (0..n_ports)
                .map(|_| free_port())
                .collect::<Result<Vec<u16>>>()?;
            let mut child = Command::new(SOCKET_ACTIVATE)
                .args(argv(&ports))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .context("spawn systemd-socket-activate")?;
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
                        let mut log = sink.lock().unwrap_or_else(|p| p.into_inner());
                        log.push_str(&line);
                        log.push('\n');
                    }
                });
                return Ok(Activated { child, ports, log });
            }
            let _ = child.kill();
            let _ = child.wait();
            last_log = log;
        }
        bail!("systemd-socket-activate never listened on free ports; last output:\n{last_log}")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the launcher and the program wrote to stderr so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for Activated {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
