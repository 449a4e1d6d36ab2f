//! hello-http: a small HTTP/1.1 server for socket activation.
//!
//! It owns nothing but its connections: the listening sockets come from the service manager
//! (holdfast, systemd, `systemd-socket-activate`) through LISTEN_FDS, checked against LISTEN_PID
//! by the sd-notify crate, and every request gets `200` with `<greeting> from <service> pid <pid>`.
//! Readiness and shutdown are reported over NOTIFY_SOCKET when it is set.
//!
//! On SIGTERM or SIGINT it stops accepting (the shared listener stays open in the manager, so
//! connections still queued there go to the next instance), answers the requests already on their
//! way with `Connection: close`, and exits 0 once its connections are done or after
//! `--drain-timeout`. It never shuts down or closes a listener in a way the manager's copy would see.
//!
//! Without LISTEN_FDS it can bind `--listen ADDR:PORT` itself: the "no supervisor" baseline.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use hyper::header::{HeaderValue, CONNECTION, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use nix::sys::socket::{
    getsockname, getsockopt, sockopt, AddressFamily, SockType, SockaddrLike, SockaddrStorage,
};
use sd_notify::NotifyState;
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

/// After a drain starts, how long an idle keep-alive connection is given to send the request that
/// may already be on its way (it is answered with `Connection: close`) before it is closed.
const IDLE_GRACE: Duration = Duration::from_secs(1);

/// Pause after an accept error such as EMFILE, so a persistent error does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

#[derive(Parser, Debug)]
#[command(
    version,
    about = "A small HTTP/1.1 server that takes its listeners from LISTEN_FDS"
)]
struct Args {
    /// Service name in the replies [default: the first LISTEN_FDNAMES entry, else "hello-http"]
    #[arg(long)]
    name: Option<String>,

    /// First word of every reply
    #[arg(long, default_value = "hello")]
    greeting: String,

    /// Address to bind when no LISTEN_FDS were passed (repeatable), e.g. 127.0.0.1:8080
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Vec<SocketAddr>,

    /// Longest wait for in-flight requests after SIGTERM, e.g. "5s", "500ms"
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
}

/// What every connection shares.
struct Ctx {
    body: String,
    /// Set on SIGTERM: every response from then on carries `Connection: close`.
    draining: AtomicBool,
    /// Connections open right now, for the drain log lines.
    open: AtomicUsize,
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
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    // Before any thread exists: this reads and then unsets the LISTEN_* variables.
    let (listeners, first_name) = take_listeners(&args)?;
    let service = args
        .name
        .clone()
        .or(first_name)
        .unwrap_or_else(|| "hello-http".to_owned());
    let ctx = Arc::new(Ctx {
        body: format!(
            "{} from {} pid {}\n",
            args.greeting,
            service,
            std::process::id()
        ),
        draining: AtomicBool::new(false),
        open: AtomicUsize::new(0),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the tokio runtime")?;
    runtime.block_on(serve(listeners, ctx, &service, args.drain_timeout))
}

/// The listeners passed in LISTEN_FDS (LISTEN_PID checked), with the first LISTEN_FDNAMES entry;
/// or, when none were passed, the `--listen` addresses bound here.
fn take_listeners(args: &Args) -> anyhow::Result<(Vec<std::net::TcpListener>, Option<String>)> {
    let fds_given = std::env::var("LISTEN_FDS").ok().filter(|n| n != "0");
    let names = std::env::var("LISTEN_FDNAMES").ok();
    // SAFETY: called from `run` before the runtime or any other thread exists, so nothing can
    // read the environment while the LISTEN_* variables are removed.
    let fds: Vec<i32> = unsafe { sd_notify::listen_fds_and_unset_env() }
        .context("read LISTEN_FDS")?
        .collect();
    // sd-notify's listen_fds_with_names rejects LISTEN_FDNAMES when LISTEN_PID is not ours (it
    // compares the names with zero fds), so the names are read here; systemd's fallback name
    // for an unnamed fd is "unknown".
    std::env::remove_var("LISTEN_FDNAMES");
    let name_list: Vec<String> = names
        .map(|n| n.split(':').map(str::to_owned).collect())
        .unwrap_or_default();
    let first_name = fds
        .first()
        .and(name_list.first().cloned())
        .filter(|n| !n.is_empty() && n != "unknown");
    let passed: Vec<(i32, String)> = fds
        .iter()
        .enumerate()
        .map(|(i, fd)| {
            (
                *fd,
                name_list
                    .get(i)
                    .cloned()
                    .unwrap_or_else(|| "unknown".into()),
            )
        })
        .collect();
    if passed.is_empty() {
        if let Some(n) = fds_given {
            warn!(listen_fds = %n, "LISTEN_PID is not this process: ignoring LISTEN_FDS");
        }
        if args.listen.is_empty() {
            bail!("no listening socket: pass one through LISTEN_FDS (holdfast, systemd-socket-activate) or use --listen ADDR:PORT");
        }
        let bound = args
            .listen
            .iter()
            .map(|a| std::net::TcpListener::bind(a).with_context(|| format!("bind {a}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        return Ok((bound, None));
    }
    if !args.listen.is_empty() {
        warn!("LISTEN_FDS given: ignoring --listen");
    }
    let mut listeners = Vec::new();
    for (raw, name) in passed {
        // SAFETY: sd-notify returned this fd from the LISTEN_FDS range handed to this process;
        // nothing else in this process owns it, so taking ownership here is sound.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        if is_tcp_listener(&fd) {
            listeners.push(std::net::TcpListener::from(fd));
        } else {
            // Not ours to serve (a datagram socket, a stored memfd...): leave it alone and open.
            warn!(fd = raw, fdname = %name, "not a listening TCP socket: skipped");
            std::mem::forget(fd);
        }
    }
    if listeners.is_empty() {
        bail!("none of the LISTEN_FDS is a listening TCP socket");
    }
    Ok((listeners, first_name))
}

fn is_tcp_listener(fd: &OwnedFd) -> bool {
    let stream = getsockopt(fd, sockopt::SockType).is_ok_and(|t| t == SockType::Stream);
    let listening = getsockopt(fd, sockopt::AcceptConn).unwrap_or(false);
    let inet = getsockname::<SockaddrStorage>(std::os::fd::AsRawFd::as_raw_fd(fd))
        .ok()
        .and_then(|a| a.family())
        .is_some_and(|f| matches!(f, AddressFamily::Inet | AddressFamily::Inet6));
    stream && listening && inet
}

async fn serve(
    listeners: Vec<std::net::TcpListener>,
    ctx: Arc<Ctx>,
    service: &str,
    drain_timeout: Duration,
) -> anyhow::Result<()> {
    let mut sigterm = signal(SignalKind::terminate()).context("install the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("install the SIGINT handler")?;
    let (drain_tx, drain_rx) = watch::channel(false);
    // Every connection task holds a clone of `alive`; `gone.recv()` returns None once all are done.
    let (alive, mut gone) = mpsc::channel::<()>(1);

    let mut addrs = Vec::new();
    let mut accept_tasks = Vec::new();
    for std_listener in listeners {
        // O_NONBLOCK is set on the open file description, which the manager shares: harmless for
        // a listener, and what systemd's own sockets already have.
        std_listener
            .set_nonblocking(true)
            .context("set O_NONBLOCK on a listener")?;
        let listener = TcpListener::from_std(std_listener).context("register a listener")?;
        let addr = listener.local_addr().context("getsockname on a listener")?;
        addrs.push(addr.to_string());
        accept_tasks.push(tokio::spawn(accept_loop(
            listener,
            ctx.clone(),
            drain_rx.clone(),
            alive.clone(),
        )));
    }
    drop(alive);

    let listening = addrs.join(", ");
    info!(service, %listening, "serving");
    notify(&[
        NotifyState::Ready,
        NotifyState::Status(&format!("serving on {listening}")),
    ]);

    tokio::select! {
        _ = sigterm.recv() => info!(service, "SIGTERM: draining"),
        _ = sigint.recv() => info!(service, "SIGINT: draining"),
    }
    notify(&[NotifyState::Stopping, NotifyState::Status("draining")]);
    ctx.draining.store(true, Ordering::SeqCst);
    drain_tx.send_replace(true);
    for task in accept_tasks {
        // Each accept loop returns on the drain signal and drops its listener (our copy only).
        let _ = task.await;
    }
    let open = ctx.open.load(Ordering::SeqCst);
    match tokio::time::timeout(drain_timeout, gone.recv()).await {
        Ok(_) => info!(service, connections = open, "drained; exiting"),
        Err(_) => warn!(
            service,
            left = ctx.open.load(Ordering::SeqCst),
            timeout = %humantime::format_duration(drain_timeout),
            "drain timed out; exiting with connections still open"
        ),
    }
    Ok(())
}

async fn accept_loop(
    listener: TcpListener,
    ctx: Arc<Ctx>,
    mut drain: watch::Receiver<bool>,
    alive: mpsc::Sender<()>,
) {
    let conn_drain = drain.clone();
    loop {
        let accepted = tokio::select! {
            // Cancelling accept() loses nothing: an unaccepted connection stays in the queue.
            biased;
            _ = drain.wait_for(|d| *d) => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _peer)) => {
                let task = serve_connection(stream, ctx.clone(), conn_drain.clone(), alive.clone());
                tokio::spawn(task);
            }
            Err(e) => {
                // ECONNABORTED and friends are per-connection; EMFILE needs a pause.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
            }
        }
    }
}

async fn serve_connection(
    stream: TcpStream,
    ctx: Arc<Ctx>,
    mut drain: watch::Receiver<bool>,
    _alive: mpsc::Sender<()>,
) {
    ctx.open.fetch_add(1, Ordering::SeqCst);
    let _ = stream.set_nodelay(true);
    let handler_ctx = ctx.clone();
    let service = service_fn(move |_req: Request<hyper::body::Incoming>| {
        let ctx = handler_ctx.clone();
        async move { Ok::<_, Infallible>(respond(&ctx)) }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .serve_connection(TokioIo::new(stream), service);
    let mut conn = std::pin::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => Some(r),
        _ = drain.wait_for(|d| *d) => None,
    };
    let result = match result {
        Some(r) => r,
        None => {
            // Draining: a request already on its way is answered (with Connection: close); an
            // idle connection gets IDLE_GRACE, then hyper closes it if it is still idle.
            match tokio::time::timeout(IDLE_GRACE, conn.as_mut()).await {
                Ok(r) => r,
                Err(_) => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            }
        }
    };
    if let Err(e) = result {
        debug!(error = %e, "connection ended with an error");
    }
    ctx.open.fetch_sub(1, Ordering::SeqCst);
}

fn respond(ctx: &Ctx) -> Response<String> {
    let mut response = Response::new(ctx.body.clone());
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if ctx.draining.load(Ordering::SeqCst) {
        headers.insert(CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// Tell the service manager, when there is one; a failure is logged, never fatal.
fn notify(state: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        warn!(error = %e, "sd_notify failed");
    }
}
