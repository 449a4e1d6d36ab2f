//! Metrics: a snapshot of what the supervisor knows, rendered as Prometheus
//! text exposition (with the `prometheus-client` crate), and the optional
//! HTTP endpoint (`--metrics-listen`, with `tiny_http`) that serves it.
//!
//! The endpoint's thread only accepts and parses HTTP; it hands each request
//! to the event loop through a channel and wakes it through a socket pair, so
//! the loop stays the only owner of the state and renders the reply itself.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::mpsc;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Serialize;

/// Every state a service can be in, for the one-series-per-state gauge.
pub const STATES: &[&str] = &[
    "starting",
    "running",
    "reloading",
    "stopping",
    "waiting",
    "stopped",
    "failed",
];

#[derive(Debug, Clone, Default, Serialize)]
pub struct Snapshot {
    pub services: Vec<ServiceMetrics>,
    pub destinations: Vec<DestinationMetrics>,
    pub sockets: Vec<SocketMetrics>,
}

#[derive(Debug, Clone, Serialize)]
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
}

#[derive(Debug, Clone, Serialize)]
pub struct DestinationMetrics {
    pub service: String,
    pub socket: String,
    pub destination: u32,
    pub socket_present: bool,
    pub lookups: u64,
    pub misses: u64,
    pub errors: u64,
    /// Hits whose source the socket's allow/deny refused (dropped).
    pub denied: u64,
}

#[derive(Debug, Clone, Serialize)]
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

fn gauge(
    registry: &mut Registry,
    name: &str,
    help: &str,
) -> Family<Labels, Gauge<f64, std::sync::atomic::AtomicU64>> {
    let f = Family::<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    registry.register(name, help, f.clone());
    f
}

fn counter(registry: &mut Registry, name: &str, help: &str) -> Family<Labels, Counter> {
    let f = Family::<Labels, Counter>::default();
    registry.register(name, help, f.clone());
    f
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
    let state = gauge(
        &mut r,
        "service_state",
        "1 for the state the service is in, 0 for the others",
    );
    let restarts = counter(
        &mut r,
        "service_restarts",
        "Restarts since holdfast started",
    );
    let ready = gauge(&mut r, "service_ready", "1 when the main instance is ready");
    let uptime = gauge(
        &mut r,
        "service_uptime_seconds",
        "Seconds since the main instance started",
    );
    let exit = gauge(
        &mut r,
        "service_last_exit_status",
        "The last exit status (code, or 128 + signal)",
    );
    let instances = gauge(
        &mut r,
        "service_instances",
        "Per-connection instances running (accept services)",
    );
    let conns = counter(
        &mut r,
        "service_connections",
        "Connections accepted by holdfast (accept services)",
    );
    let denied = counter(
        &mut r,
        "service_denied_connections",
        "Connections refused by allow/deny or the per-source limit",
    );
    let lookups = counter(
        &mut r,
        "destination_lookups",
        "sk_lookup hits on the destination's bindings",
    );
    let misses = counter(
        &mut r,
        "destination_misses",
        "Hits dropped because the destination's socket was missing",
    );
    let errors = counter(
        &mut r,
        "destination_errors",
        "Hits dropped because bpf_sk_assign failed",
    );
    let dest_denied = counter(
        &mut r,
        "destination_denied",
        "Hits dropped because the socket's allow/deny rules refused the source",
    );
    let present = gauge(
        &mut r,
        "destination_socket_present",
        "1 when the destination's socket is in the sockmap",
    );
    let queued = gauge(
        &mut r,
        "socket_backlog_queued",
        "Connections waiting in the socket's accept queue",
    );
    let limit = gauge(
        &mut r,
        "socket_backlog_limit",
        "The socket's accept queue limit",
    );
    for m in &s.services {
        for st in STATES {
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
    }
    for d in &s.destinations {
        let id = d.destination.to_string();
        let l = labels(&[
            ("service", &d.service),
            ("socket", &d.socket),
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
    let mut out = String::new();
    encode(&mut out, &r).expect("writing to a String cannot fail");
    out
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot serve metrics on {addr}: {message}")]
    Listen { addr: SocketAddr, message: String },
    #[error("cannot create the metrics wake-up pair: {0}")]
    Wake(#[source] io::Error),
}

/// The HTTP endpoint: requests arrive on `rx`, and `wake` becomes readable.
pub struct Endpoint {
    wake: OwnedFd,
    rx: mpsc::Receiver<tiny_http::Request>,
    addr: SocketAddr,
}

impl Endpoint {
    pub fn serve(addr: SocketAddr) -> Result<Endpoint, MetricsError> {
        let server = tiny_http::Server::http(addr).map_err(|e| MetricsError::Listen {
            addr,
            message: e.to_string(),
        })?;
        let addr = server.server_addr().to_ip().unwrap_or(addr);
        let (r, w) = UnixStream::pair().map_err(MetricsError::Wake)?;
        r.set_nonblocking(true).map_err(MetricsError::Wake)?;
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("metrics-http".into())
            .spawn(move || {
                use std::io::Write;
                let mut w = w;
                for request in server.incoming_requests() {
                    if tx.send(request).is_err() {
                        return;
                    }
                    let _ = w.write(&[1]);
                }
            })
            .map_err(MetricsError::Wake)?;
        Ok(Endpoint {
            wake: OwnedFd::from(r),
            rx,
            addr,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn wake_fd(&self) -> BorrowedFd<'_> {
        self.wake.as_fd()
    }

    /// Answers every pending request with `render()` (for GET /metrics) or 404,
    /// each reply written by a short-lived thread of its own.
    pub fn answer(&self, render: impl Fn() -> String) {
        let mut buf = [0u8; 64];
        while matches!(nix::unistd::read(std::os::fd::AsRawFd::as_raw_fd(&self.wake), &mut buf), Ok(n) if n > 0)
        {
        }
        while let Ok(req) = self.rx.try_recv() {
            let path = req.url().split('?').next().unwrap_or("").to_string();
            let response = if path == "/metrics" || path == "/" {
                let header = tiny_http::Header::from_bytes(
                    &b"Content-Type"[..],
                    &b"application/openmetrics-text; version=1.0.0; charset=utf-8"[..],
                )
                .expect("a valid header");
                tiny_http::Response::from_string(render()).with_header(header)
            } else {
                tiny_http::Response::from_string("not found: try /metrics\n").with_status_code(404)
            };
            // Written off the event loop: a scraper that reads slowly must
            // not stall the supervisor. The thread owns only the response.
            let spawned = std::thread::Builder::new()
                .name("metrics-reply".into())
                .spawn(move || {
                    let _ = req.respond(response);
                });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "metrics: cannot start a thread to write the reply");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_with_labels() {
        let s = Snapshot {
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
            }],
            destinations: vec![DestinationMetrics {
                service: "web".into(),
                socket: "http".into(),
                destination: 0,
                socket_present: true,
                lookups: 10,
                misses: 1,
                errors: 0,
                denied: 0,
            }],
            sockets: vec![SocketMetrics {
                service: "web".into(),
                socket: "http".into(),
                protocol: "tcp".into(),
                backlog_queued: Some(2),
                backlog_limit: Some(4096),
            }],
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
            "# EOF",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
    }
}
