//! Metrics: a snapshot of what the supervisor knows, rendered as Prometheus
//! text exposition (with the `prometheus-client` crate), and the optional
//! HTTP endpoint (`--metrics-listen`) that serves it.
//!
//! The endpoint's one thread accepts, parses (with `httparse`) and writes
//! HTTP, with bounded connections and timeouts (see [`Endpoint`]); it asks
//! the event loop for a render through a socket pair and gets the text back
//! through a channel, so the loop stays the only owner of the state.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};

use crate::ratelimit::{AcceptThrottle, LogLimiter};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Snapshot {
    /// Every state a service can be in (one `holdfast_service_state` series
    /// each), from the one list the supervisor keeps.
    #[serde(skip)]
    pub states: Vec<&'static str>,
    pub services: Vec<ServiceMetrics>,
    pub destinations: Vec<DestinationMetrics>,
    pub sockets: Vec<SocketMetrics>,
    /// The journald forwarder's counts (`None`: not forwarding).
    #[serde(default)]
    pub journal: Option<JournalMetrics>,
}

/// Lines forwarded to journald, and those it could not take then.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct JournalMetrics {
    pub forwarded: u64,
    pub dropped: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceMetrics {
    pub service: String,
    pub state: String,
    pub restarts: u64,
    pub ready: bool,
    pub uptime_seconds: f64,
    /// The exit code, or 128 + the signal number, as a shell shows it.
    pub last_exit_status: Option<i64>,
    /// Accept services: per-connection instances running now.
    pub instances: u64,
    /// Accept services: connections accepted since holdfast started.
    pub connections_total: u64,
    /// Connections refused by allow/deny or the per-source limit.
    pub denied_total: u64,
    /// `memory.current` of its cgroup (cgroup mode, with the memory controller).
    #[serde(default)]
    pub memory_bytes: Option<u64>,
    /// CPU time its cgroup has used (`cpu.stat` `usage_usec`; cgroup mode).
    #[serde(default)]
    pub cpu_seconds: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DestinationMetrics {
    pub service: String,
    pub socket: String,
    #[serde(flatten)]
    pub counters: DestinationCounters,
}

/// A destination's sk_lookup counters and whether its socket is in the
/// sockmap, as the metrics and `holdfast bindings` both show them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DestinationCounters {
    pub destination: u32,
    pub socket_present: bool,
    pub lookups: u64,
    pub misses: u64,
    pub errors: u64,
    /// Hits whose source the socket's allow/deny refused (dropped).
    pub denied: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SocketMetrics {
    pub service: String,
    pub socket: String,
    pub protocol: String,
    /// Connections waiting in the accept queue (TCP listeners only).
    pub backlog_queued: Option<u64>,
    /// The accept queue's limit (TCP listeners only).
    pub backlog_limit: Option<u64>,
}

type Labels = Vec<(String, String)>;

/// A float gauge (`Gauge<i64>` is the crate's default).
type FloatGauge = Gauge<f64, std::sync::atomic::AtomicU64>;
/// A float counter, for seconds.
type FloatCounter = Counter<f64, std::sync::atomic::AtomicU64>;

/// A family of metric `M` by label set, registered as `name`.
fn family<M>(registry: &mut Registry, name: &str, help: &str) -> Family<Labels, M>
where
    M: prometheus_client::metrics::TypedMetric
        + prometheus_client::encoding::EncodeMetric
        + Default
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let f = Family::<Labels, M>::default();
    registry.register(name, help, f.clone());
    f
}

fn gauge(registry: &mut Registry, name: &str, help: &str) -> Family<Labels, FloatGauge> {
    family(registry, name, help)
}

fn counter(registry: &mut Registry, name: &str, help: &str) -> Family<Labels, Counter> {
    family(registry, name, help)
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Renders a snapshot as Prometheus text exposition (OpenMetrics text, which
/// Prometheus and its parsers read).
pub fn render(s: &Snapshot) -> String {
    let mut r = Registry::with_prefix("holdfast");
    render_services(&mut r, s);
    render_journal(&mut r, s);
    render_destinations(&mut r, s);
    render_sockets(&mut r, s);
    let mut out = String::new();
    encode(&mut out, &r).expect("writing to a String cannot fail");
    out
}

/// The per-service families: state, restarts, readiness, uptime, exits,
/// per-connection instances, cgroup usage.
fn render_services(r: &mut Registry, s: &Snapshot) {
    let state = gauge(
        r,
        "service_state",
        "1 for the state the service is in, 0 for the others",
    );
    let restarts = counter(r, "service_restarts", "Restarts since holdfast started");
    let ready = gauge(r, "service_ready", "1 when the main instance is ready");
    let uptime = gauge(
        r,
        "service_uptime_seconds",
        "Seconds since the main instance started",
    );
    let exit = gauge(
        r,
        "service_last_exit_status",
        "The last exit status (code, or 128 + signal)",
    );
    let instances = gauge(
        r,
        "service_instances",
        "Per-connection instances running (accept services)",
    );
    let conns = counter(
        r,
        "service_connections",
        "Connections accepted by holdfast (accept services)",
    );
    let denied = counter(
        r,
        "service_denied_connections",
        "Connections refused by allow/deny or the per-source limit",
    );
    let memory = gauge(
        r,
        "service_memory_bytes",
        "Memory used by the service's cgroup (memory.current)",
    );
    let cpu = family::<FloatCounter>(
        r,
        "service_cpu_seconds",
        "CPU time used by the service's cgroup (cpu.stat usage_usec)",
    );
    for m in &s.services {
        for st in &s.states {
            state
                .get_or_create(&labels(&[("service", &m.service), ("state", st)]))
                .set(if *st == m.state { 1.0 } else { 0.0 });
        }
        let l = labels(&[("service", &m.service)]);
        restarts.get_or_create(&l).inc_by(m.restarts);
        ready.get_or_create(&l).set(if m.ready { 1.0 } else { 0.0 });
        uptime.get_or_create(&l).set(m.uptime_seconds);
        instances.get_or_create(&l).set(m.instances as f64);
        conns.get_or_create(&l).inc_by(m.connections_total);
        denied.get_or_create(&l).inc_by(m.denied_total);
        if let Some(e) = m.last_exit_status {
            exit.get_or_create(&l).set(e as f64);
        }
        if let Some(b) = m.memory_bytes {
            memory.get_or_create(&l).set(b as f64);
        }
        if let Some(c) = m.cpu_seconds {
            cpu.get_or_create(&l).inc_by(c);
        }
    }
}

/// What was forwarded to journald, when holdfast forwards.
fn render_journal(r: &mut Registry, s: &Snapshot) {
    if let Some(j) = &s.journal {
        for (name, help, n) in [
            (
                "journal_forwarded_lines",
                "Lines of services' output forwarded to journald",
                j.forwarded,
            ),
            (
                "journal_dropped_lines",
                "Lines of services' output journald could not take then (dropped)",
                j.dropped,
            ),
        ] {
            let c = Counter::<u64>::default();
            c.inc_by(n);
            r.register(name, help, c);
        }
    }
}

/// The dispatcher's per-destination counters.
fn render_destinations(r: &mut Registry, s: &Snapshot) {
    let lookups = counter(
        r,
        "destination_lookups",
        "sk_lookup hits on the destination's bindings",
    );
    let misses = counter(
        r,
        "destination_misses",
        "Hits dropped because the destination's socket was missing",
    );
    let errors = counter(
        r,
        "destination_errors",
        "Hits dropped because bpf_sk_assign failed",
    );
    let dest_denied = counter(
        r,
        "destination_denied",
        "Hits dropped because the socket's allow/deny rules refused the source",
    );
    let present = gauge(
        r,
        "destination_socket_present",
        "1 when the destination's socket is in the sockmap",
    );
    for m in &s.destinations {
        let d = &m.counters;
        let id = d.destination.to_string();
        let l = labels(&[
            ("service", &m.service),
            ("socket", &m.socket),
            ("destination", &id),
        ]);
        lookups.get_or_create(&l).inc_by(d.lookups);
        misses.get_or_create(&l).inc_by(d.misses);
        errors.get_or_create(&l).inc_by(d.errors);
        dest_denied.get_or_create(&l).inc_by(d.denied);
        present
            .get_or_create(&l)
            .set(if d.socket_present { 1.0 } else { 0.0 });
    }
}

/// Each socket's accept queue.
fn render_sockets(r: &mut Registry, s: &Snapshot) {
    let queued = gauge(
        r,
        "socket_backlog_queued",
        "Connections waiting in the socket's accept queue",
    );
    let limit = gauge(r, "socket_backlog_limit", "The socket's accept queue limit");
    for k in &s.sockets {
        let l = labels(&[
            ("service", &k.service),
            ("socket", &k.socket),
            ("protocol", &k.protocol),
        ]);
        if let Some(q) = k.backlog_queued {
            queued.get_or_create(&l).set(q as f64);
        }
        if let Some(q) = k.backlog_limit {
            limit.get_or_create(&l).set(q as f64);
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot serve metrics on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot set up the metrics endpoint: {0}")]
    Setup(#[source] io::Error),
}

/// Connections the endpoint keeps at once (so at most this many fds, plus
/// the listener and two wake-up sockets). When full, a new connection
/// evicts the oldest one that has not yet sent a whole request.
pub const MAX_CONNECTIONS: usize = 32;
/// How long a client may take to send its request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client may take to read its reply (from the end of its request).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest request head read; longer is answered 431 and closed.
const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// How long accepting pauses after EMFILE/ENFILE.
const ACCEPT_PAUSE: Duration = Duration::from_millis(500);
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The `--metrics-listen` endpoint, as the event loop sees it: a fd that
/// is readable when scrapers wait for a reply, and [`Endpoint::answer`].
///
/// One thread (`metrics-http`) owns the listening socket and every
/// connection and drives them with poll(2): HTTP/1.x GET parsed with
/// `httparse`, at most [`MAX_CONNECTIONS`] connections,
/// [`REQUEST_TIMEOUT`] / [`REPLY_TIMEOUT`] for idle and slow clients, a
/// pause on EMFILE. So the endpoint uses one thread and a bounded number of
/// fds however many clients come, and never takes the fds the services need.
/// It stops when the `Endpoint` is dropped.
pub struct Endpoint {
    addr: SocketAddr,
    /// Readable when the HTTP thread has requests waiting for a render.
    wanted: UnixStream,
    /// Rendered texts for the HTTP thread; a byte on `rendered_wake` says one is there.
    rendered: mpsc::Sender<Arc<str>>,
    rendered_wake: UnixStream,
}

impl Endpoint {
    /// Binds `addr` and starts the HTTP thread.
    pub fn serve(addr: SocketAddr) -> Result<Endpoint, MetricsError> {
        let listener =
            TcpListener::bind(addr).map_err(|source| MetricsError::Listen { addr, source })?;
        let addr = listener.local_addr().unwrap_or(addr);
        listener
            .set_nonblocking(true)
            .map_err(MetricsError::Setup)?;
        let (wanted, wanted_tx) = UnixStream::pair().map_err(MetricsError::Setup)?;
        let (rendered_rx_wake, rendered_wake) = UnixStream::pair().map_err(MetricsError::Setup)?;
        for s in [&wanted, &wanted_tx, &rendered_rx_wake, &rendered_wake] {
            s.set_nonblocking(true).map_err(MetricsError::Setup)?;
        }
        let (rendered, rendered_rx) = mpsc::channel();
        let http = Http {
            listener,
            connections: Vec::new(),
            want: wanted_tx,
            asked: false,
            rendered: rendered_rx,
            rendered_wake: rendered_rx_wake,
            accept: AcceptThrottle::new(ACCEPT_PAUSE, LogLimiter::new(3, Duration::from_secs(60))),
        };
        std::thread::Builder::new()
            .name("metrics-http".into())
            .spawn(move || http.run())
            .map_err(MetricsError::Setup)?;
        Ok(Endpoint {
            addr,
            wanted,
            rendered,
            rendered_wake,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Poll it for POLLIN: scrapers are waiting for [`Endpoint::answer`].
    pub fn wake_fd(&self) -> BorrowedFd<'_> {
        self.wanted.as_fd()
    }

    /// Renders once for every scraper waiting (nothing when none is).
    pub fn answer(&self, render: impl Fn() -> String) {
        let mut buf = [0u8; 64];
        let mut asked = false;
        while matches!((&self.wanted).read(&mut buf), Ok(n) if n > 0) {
            asked = true;
        }
        if asked && self.rendered.send(Arc::from(render())).is_ok() {
            let _ = (&self.rendered_wake).write(&[1]);
        }
    }
}

/// Where one HTTP connection is.
enum Phase {
    /// Reading the request head, until `deadline`.
    Reading,
    /// A GET /metrics is in, waiting for the event loop's render.
    Waiting,
    /// Writing `out` from `written`, until `deadline`.
    Writing { out: Arc<[u8]>, written: usize },
}

struct Connection {
    stream: TcpStream,
    input: Vec<u8>,
    phase: Phase,
    deadline: Instant,
}

/// The HTTP thread's state; see [`Endpoint`].
struct Http {
    listener: TcpListener,
    connections: Vec<Connection>,
    /// A byte here asks the event loop for a render.
    want: UnixStream,
    /// A render has been asked for and not yet received.
    asked: bool,
    rendered: mpsc::Receiver<Arc<str>>,
    rendered_wake: UnixStream,
    accept: AcceptThrottle,
}

impl Http {
    fn run(mut self) {
        loop {
            let now = Instant::now();
            let mut fds = vec![PollFd::new(self.rendered_wake.as_fd(), PollFlags::POLLIN)];
            let listening = !self.accept.is_paused(now);
            if listening {
                fds.push(PollFd::new(self.listener.as_fd(), PollFlags::POLLIN));
            }
            let first_connection = fds.len();
            for c in &self.connections {
                let events = match c.phase {
                    Phase::Reading => PollFlags::POLLIN,
                    Phase::Waiting => PollFlags::empty(),
                    Phase::Writing { .. } => PollFlags::POLLOUT,
                };
                fds.push(PollFd::new(c.stream.as_fd(), events));
            }
            let wake_at = self
                .connections
                .iter()
                .filter(|c| !matches!(c.phase, Phase::Waiting))
                .map(|c| c.deadline)
                .chain(self.accept.resumes_at(now))
                .min();
            let timeout = wake_at.map_or(PollTimeout::NONE, |t| {
                let ms = t
                    .saturating_duration_since(now)
                    .as_millis()
                    .clamp(1, 60_000);
                PollTimeout::from(ms as u16)
            });
            match nix::poll::poll(&mut fds, timeout) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => {
                    tracing::error!(error = %e, "metrics: poll failed; the endpoint stops");
                    return;
                }
            }
            let ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
            let woken = ready(&fds[0]);
            let accept = listening && ready(&fds[1]);
            let active: Vec<bool> = fds[first_connection..].iter().map(ready).collect();
            drop(fds);
            if woken && !self.take_renders() {
                return; // the Endpoint is gone
            }
            let now = Instant::now();
            for (c, active) in self.connections.iter_mut().zip(active) {
                if active {
                    step(c, now);
                }
            }
            self.connections
                .retain(|c| c.deadline > now || matches!(c.phase, Phase::Waiting));
            self.connections.retain(|c| !c.done());
            if accept {
                self.accept(now);
            }
            if !self.asked
                && self
                    .connections
                    .iter()
                    .any(|c| matches!(c.phase, Phase::Waiting))
            {
                self.asked = true;
                let _ = (&self.want).write(&[1]);
            }
        }
    }

    /// Hands the newest render to every waiting connection; false when the
    /// event loop's side is gone.
    fn take_renders(&mut self) -> bool {
        let mut buf = [0u8; 64];
        if let Ok(0) = (&self.rendered_wake).read(&mut buf) {
            return false;
        }
        let mut latest = None;
        loop {
            match self.rendered.try_recv() {
                Ok(text) => latest = Some(text),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => return false,
            }
        }
        let Some(text) = latest else {
            return true;
        };
        self.asked = false;
        let reply: Arc<[u8]> = Arc::from(response(200, CONTENT_TYPE, text.as_bytes()));
        let now = Instant::now();
        for c in &mut self.connections {
            if matches!(c.phase, Phase::Waiting) {
                c.reply(reply.clone(), now);
            }
        }
        true
    }

    fn accept(&mut self, now: Instant) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    if self.connections.len() >= MAX_CONNECTIONS {
                        // Full: the oldest client still not done sending goes.
                        match self
                            .connections
                            .iter()
                            .position(|c| matches!(c.phase, Phase::Reading))
                        {
                            Some(oldest) => {
                                self.connections.remove(oldest);
                            }
                            None => continue, // every slot is being answered: drop this one
                        }
                    }
                    self.connections.push(Connection {
                        stream,
                        input: Vec::new(),
                        phase: Phase::Reading,
                        deadline: now + REQUEST_TIMEOUT,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    if let Some(w) = self.accept.failed(&e, now) {
                        tracing::warn!(error = %e, repeated = w.repeated, "metrics: accept failed{}", w.hint);
                    }
                    return;
                }
            }
        }
    }
}

impl Connection {
    fn reply(&mut self, out: Arc<[u8]>, now: Instant) {
        self.phase = Phase::Writing { out, written: 0 };
        self.deadline = now + REPLY_TIMEOUT;
        step(self, now);
    }

    /// Replied in full (or the client went away).
    fn done(&self) -> bool {
        matches!(&self.phase, Phase::Writing { out, written } if *written >= out.len())
    }
}

/// Reads or writes what the connection is ready for.
fn step(c: &mut Connection, now: Instant) {
    match &mut c.phase {
        Phase::Reading => {
            let mut buf = [0u8; 2048];
            loop {
                match c.stream.read(&mut buf) {
                    Ok(0) => {
                        c.finish();
                        return;
                    }
                    Ok(n) => c.input.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        c.finish();
                        return;
                    }
                }
                if c.input.len() > MAX_REQUEST_HEAD {
                    break;
                }
            }
            match route(&c.input) {
                Route::Incomplete => {}
                Route::Metrics => c.phase = Phase::Waiting,
                Route::Reply(out) => c.reply(Arc::from(out), now),
            }
        }
        Phase::Waiting => {}
        Phase::Writing { out, written } => {
            while *written < out.len() {
                match c.stream.write(&out[*written..]) {
                    Ok(n) => *written += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                    Err(_) => {
                        *written = out.len();
                        return;
                    }
                }
            }
        }
    }
}

impl Connection {
    /// Nothing more to do for this connection: it goes at the next sweep.
    fn finish(&mut self) {
        self.phase = Phase::Writing {
            out: Arc::from(Vec::new()),
            written: 0,
        };
    }
}

/// What a request head asks for.
enum Route {
    /// Not all there yet.
    Incomplete,
    /// GET /metrics or /: the event loop renders.
    Metrics,
    /// Answered here (404, 405, 400, 431).
    Reply(Vec<u8>),
}

fn route(input: &[u8]) -> Route {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    let text = "text/plain; charset=utf-8";
    match req.parse(input) {
        Ok(httparse::Status::Complete(_)) => {
            let path = req.path.unwrap_or("").split('?').next().unwrap_or("");
            match (req.method, path) {
                (Some("GET"), "/metrics" | "/") => Route::Metrics,
                (Some("GET"), _) => Route::Reply(response(404, text, b"not found: try /metrics\n")),
                _ => Route::Reply(response(405, text, b"only GET is served\n")),
            }
        }
        Ok(httparse::Status::Partial) if input.len() > MAX_REQUEST_HEAD => {
            Route::Reply(response(431, text, b"request head too large\n"))
        }
        Ok(httparse::Status::Partial) => Route::Incomplete,
        // httparse refuses too many headers too: a request this endpoint does not serve.
        Err(_) => Route::Reply(response(400, text, b"bad request\n")),
    }
}

/// A whole HTTP/1.1 response; the connection closes after it.
fn response(code: u16, content_type: &str, body: &[u8]) -> Vec<u8> {
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Request Header Fields Too Large",
    };
    let mut out = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exchange(addr: SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(request).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn endpoint_routes_requests_and_drops_idle_clients() {
        let endpoint = Endpoint::serve("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = endpoint.addr();
        // The event loop's part, in a thread: poll the wake fd, answer.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let looping = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let mut fds = [PollFd::new(endpoint.wake_fd(), PollFlags::POLLIN)];
                    let _ = nix::poll::poll(&mut fds, PollTimeout::from(50u16));
                    endpoint.answer(|| "# EOF\n".to_string());
                }
            })
        };
        let idle = TcpStream::connect(addr).unwrap();
        let ok = exchange(addr, b"GET /metrics?x=1 HTTP/1.0\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(
            ok.contains("Content-Type: application/openmetrics-text"),
            "{ok}"
        );
        assert!(ok.ends_with("\r\n\r\n# EOF\n"), "{ok}");
        for (request, status) in [
            (&b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"[..], "404"),
            (b"POST /metrics HTTP/1.1\r\n\r\n", "405"),
            (b"\x01\x02 nonsense\r\n\r\n", "400"),
        ] {
            let got = exchange(addr, request);
            assert!(got.starts_with(&format!("HTTP/1.1 {status} ")), "{got}");
        }
        let huge = [b"GET /metrics HTTP/1.1\r\nX: ".to_vec(), vec![b'a'; 10_000]].concat();
        assert!(exchange(addr, &huge).starts_with("HTTP/1.1 431 "));
        // The idle client is closed after REQUEST_TIMEOUT (5 s).
        let started = Instant::now();
        let mut idle = idle;
        idle.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut buf = [0u8; 16];
        let read = crate::testing::read_through_interruptions(&mut idle, &mut buf).unwrap();
        assert_eq!(read, 0, "closed without a reply");
        let waited = started.elapsed();
        assert!(
            waited < REQUEST_TIMEOUT + Duration::from_secs(2),
            "{waited:?}"
        );
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        looping.join().unwrap();
    }

    #[test]
    fn renders_every_family_with_labels() {
        let s = Snapshot {
            states: vec!["running", "failed"],
            services: vec![ServiceMetrics {
                service: "web".into(),
                state: "running".into(),
                restarts: 3,
                ready: true,
                uptime_seconds: 12.5,
                last_exit_status: Some(137),
                instances: 0,
                connections_total: 0,
                denied_total: 0,
                memory_bytes: Some(4096),
                cpu_seconds: Some(1.25),
            }],
            destinations: vec![DestinationMetrics {
                service: "web".into(),
                socket: "http".into(),
                counters: DestinationCounters {
                    destination: 0,
                    socket_present: true,
                    lookups: 10,
                    misses: 1,
                    errors: 0,
                    denied: 0,
                },
            }],
            sockets: vec![SocketMetrics {
                service: "web".into(),
                socket: "http".into(),
                protocol: "tcp".into(),
                backlog_queued: Some(2),
                backlog_limit: Some(4096),
            }],
            journal: Some(JournalMetrics {
                forwarded: 7,
                dropped: 2,
            }),
        };
        let text = render(&s);
        for needle in [
            "holdfast_service_state{service=\"web\",state=\"running\"} 1",
            "holdfast_service_state{service=\"web\",state=\"failed\"} 0",
            "holdfast_service_restarts_total{service=\"web\"} 3",
            "holdfast_service_ready{service=\"web\"} 1",
            "holdfast_service_uptime_seconds{service=\"web\"} 12.5",
            "holdfast_service_last_exit_status{service=\"web\"} 137",
            "holdfast_destination_lookups_total{service=\"web\",socket=\"http\",destination=\"0\"} 10",
            "holdfast_destination_misses_total{service=\"web\",socket=\"http\",destination=\"0\"} 1",
            "holdfast_socket_backlog_queued{service=\"web\",socket=\"http\",protocol=\"tcp\"} 2",
            "# TYPE holdfast_service_memory_bytes gauge",
            "holdfast_service_memory_bytes{service=\"web\"} 4096",
            "# TYPE holdfast_service_cpu_seconds counter",
            "holdfast_service_cpu_seconds_total{service=\"web\"} 1.25",
            "holdfast_journal_forwarded_lines_total 7",
            "holdfast_journal_dropped_lines_total 2",
            "# EOF",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
    }
}
