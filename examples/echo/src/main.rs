//! echo: serves every socket passed through LISTEN_FDS (LISTEN_PID checked by the sd-notify
//! crate): TCP and unix stream listeners (a thread per connection), already accepted stream
//! connections, UDP sockets (replies from the address and port the client sent to, see
//! `echo::udp`) and unix datagram sockets. Each socket gets a thread. Reports READY=1 over
//! NOTIFY_SOCKET when it is set; SIGTERM or SIGINT exits 0. A socket that fails for good exits 1,
//! so the manager restarts the service. No arguments.

use std::net::{TcpListener, UdpSocket};
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::process::ExitCode;
use std::sync::mpsc;

use anyhow::{bail, Context};
use echo::udp::UdpEcho;
use echo::{classify, stream, unix_dgram, SocketKind};
use nix::sys::signal::{SigSet, Signal};
use sd_notify::NotifyState;
use tracing::{error, info, warn};

/// Why the main thread wakes up.
enum Event {
    Signal(Signal),
    Failed(String),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    if let Some(arg) = std::env::args().nth(1) {
        eprintln!("echo takes no arguments (got {arg:?}); it serves the sockets in LISTEN_FDS");
        return ExitCode::from(2);
    }
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    // Blocked before any thread exists, so every thread inherits the mask and only the signal
    // thread below takes SIGTERM and SIGINT.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals.thread_block().context("block SIGTERM and SIGINT")?;

    let names = std::env::var("LISTEN_FDNAMES").ok();
    // SAFETY: no other thread exists yet, so nothing reads the environment while sd-notify
    // removes LISTEN_PID and LISTEN_FDS.
    let fds: Vec<i32> = unsafe { sd_notify::listen_fds_and_unset_env() }
        .context("read LISTEN_FDS")?
        .collect();
    std::env::remove_var("LISTEN_FDNAMES");
    if fds.is_empty() {
        bail!("no sockets: LISTEN_FDS is unset, 0, or for another LISTEN_PID; run under holdfast or systemd-socket-activate");
    }
    let names: Vec<String> = names
        .map(|n| n.split(':').map(str::to_owned).collect())
        .unwrap_or_default();

    let (events, wake) = mpsc::channel();
    let mut served = Vec::new();
    for (i, raw) in fds.into_iter().enumerate() {
        let name = names.get(i).cloned().unwrap_or_else(|| format!("fd{raw}"));
        // SAFETY: sd-notify returned this fd from the LISTEN_FDS range handed to this process;
        // nothing else in this process owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let kind = classify(fd.as_fd());
        if kind == SocketKind::Other {
            warn!(socket = %name, fd = raw, "not a socket echo serves: left alone");
            std::mem::forget(fd);
            continue;
        }
        let local = local_addr(&fd);
        info!(socket = %name, fd = raw, ?kind, %local, "serving");
        served.push(format!("{name} ({local})"));
        let events = events.clone();
        std::thread::Builder::new()
            .name(format!("echo {name}"))
            .spawn(move || {
                if let Err(e) = serve(fd, kind, &name) {
                    let _ = events.send(Event::Failed(format!("{e:#}")));
                }
            })
            .context("spawn a socket thread")?;
    }
    if served.is_empty() {
        bail!("none of the LISTEN_FDS is a socket echo can serve");
    }
    std::thread::spawn(move || {
        if let Ok(signal) = signals.wait() {
            let _ = events.send(Event::Signal(signal));
        }
    });
    notify(&[
        NotifyState::Ready,
        NotifyState::Status(&format!("echoing on {}", served.join(", "))),
    ]);
    match wake.recv() {
        Ok(Event::Signal(signal)) => {
            info!(?signal, "stopping");
            notify(&[NotifyState::Stopping]);
            Ok(())
        }
        Ok(Event::Failed(e)) => bail!(e),
        Err(_) => bail!("every socket thread ended"),
    }
}

/// Serves one socket for as long as it works.
fn serve(fd: OwnedFd, kind: SocketKind, name: &str) -> anyhow::Result<()> {
    match kind {
        SocketKind::StreamListener { unix: false } => {
            stream::serve_tcp(TcpListener::from(fd), name)?
        }
        SocketKind::StreamListener { unix: true } => {
            stream::serve_unix(UnixListener::from(fd), name)?
        }
        SocketKind::StreamConnection { unix } => stream::serve_connection(fd, unix),
        SocketKind::Udp => UdpEcho::new(UdpSocket::from(fd))?.serve()?,
        SocketKind::UnixDatagram => unix_dgram::serve(UnixDatagram::from(fd), name)?,
        SocketKind::Other => {}
    }
    Ok(())
}

fn local_addr(fd: &OwnedFd) -> String {
    use nix::sys::socket::{getsockname, SockaddrStorage};
    match getsockname::<SockaddrStorage>(std::os::fd::AsRawFd::as_raw_fd(fd)) {
        Ok(addr) => addr.to_string(),
        Err(e) => format!("getsockname: {e}"),
    }
}

/// Tell the service manager, when there is one; a failure is logged, never fatal.
fn notify(state: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        warn!(error = %e, "sd_notify failed");
    }
}
