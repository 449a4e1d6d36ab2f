//! Control requests: answering them, and holding the replies of those that
//! wait for a service to reach a state (start, stop, restart).

use std::collections::BTreeMap;
use std::time::Instant;

use nix::unistd::Pid;
use serde_json::json;

use crate::control::{ConnectionId, Reply, Request};
use crate::dispatch::{Counters, DestinationId};
use crate::listener::{self, Placement};
use crate::metrics;
use crate::service::Exit;
use crate::service::State;
use crate::unit::RestartMode;

use super::services::Service;
use super::Supervisor;

/// A control request waiting for a service to reach a state.
pub(super) struct Waiter {
    pub connection: ConnectionId,
    pub service: String,
    pub until: Until,
}

pub(super) enum Until {
    Down,
    /// Running and ready, with a main pid other than this one.
    Up {
        not: Option<Pid>,
    },
}

impl Supervisor {
    pub(super) fn serve_control(&mut self) {
        let Some(server) = self.server.as_mut() else {
            return;
        };
        let requests = server.service();
        if !requests.is_empty() {
            self.refresh_dispatcher_denied();
        }
        let now = Instant::now();
        for (conn, request) in requests {
            if let Some(reply) = self.handle(conn, request, now) {
                if let Some(server) = self.server.as_mut() {
                    server.reply(conn, &reply);
                }
            }
        }
    }

    /// Answers a request, or registers a waiter and returns `None`.
    fn handle(&mut self, conn: ConnectionId, request: Request, now: Instant) -> Option<Reply> {
        let named = |name: &str| -> Result<usize, Reply> {
            self.find(name)
                .ok_or_else(|| Reply::error(format!("no service named {name:?}")))
        };
        match request {
            Request::Status { name } => Some(match name {
                None => Reply::ok(json!(self
                    .services
                    .iter()
                    .map(|s| status_of(s, now))
                    .collect::<Vec<_>>())),
                Some(n) => match named(&n) {
                    Ok(i) => Reply::ok(json!([status_of(&self.services[i], now)])),
                    Err(r) => r,
                },
            }),
            Request::Start { name } => {
                let i = match named(&name) {
                    Ok(i) => i,
                    Err(r) => return Some(r),
                };
                if self.shutting_down {
                    return Some(Reply::error("holdfast is shutting down"));
                }
                let svc = &mut self.services[i];
                if svc.traffic_started() {
                    if matches!(svc.life.state, State::Stopped | State::Failed) {
                        svc.life.reset();
                        svc.life.state = State::Listening;
                    }
                    return Some(Reply::ok(status_of(svc, now)));
                }
                match svc.life.state {
                    State::Running | State::Listening => {
                        return Some(Reply::ok(status_of(svc, now)))
                    }
                    State::Starting => {}
                    State::Stopping => {
                        // Start again once it is down.
                        svc.life.stop_requested = false;
                        svc.life.restart_requested = true;
                    }
                    State::Waiting | State::Stopped | State::Failed => {
                        svc.life.reset();
                        self.start_counted(i, now, false);
                    }
                }
                self.wait(conn, name, Until::Up { not: None });
                None
            }
            Request::Stop { name } => {
                let i = match named(&name) {
                    Ok(i) => i,
                    Err(r) => return Some(r),
                };
                self.stop(i, now);
                self.wait(conn, name, Until::Down);
                None
            }
            Request::Restart { name, mode } => {
                let i = match named(&name) {
                    Ok(i) => i,
                    Err(r) => return Some(r),
                };
                if self.shutting_down {
                    return Some(Reply::error("holdfast is shutting down"));
                }
                let svc = &mut self.services[i];
                let mode = mode.unwrap_or(svc.unit.service.restart_mode);
                let old = svc.main.as_ref().map(|m| m.pid);
                svc.overlap_failure = None;
                match mode {
                    RestartMode::Overlap if svc.unit.service.single_instance => {
                        return Some(Reply::error(format!(
                            "service {name:?} refuses an overlap restart: its unit says single-instance = true (it cannot run twice); use --mode stop-start"
                        )));
                    }
                    RestartMode::Overlap if old.is_some() => {
                        if let Err(e) = self.start_overlap(i, now) {
                            return Some(Reply::error(e));
                        }
                    }
                    _ => self.restart_stop_start(i, now),
                }
                self.wait(conn, name, Until::Up { not: old });
                None
            }
            Request::Reload => Some(match self.reload() {
                Ok(summary) => Reply::ok(json!(summary)),
                Err(e) => Reply::error(e.to_string()),
            }),
            Request::Logs { name, lines, after } => Some(match named(&name) {
                Ok(i) => {
                    let svc = &self.services[i];
                    let first_seq = svc.log_next - svc.log.len() as u64;
                    let skip = match after {
                        Some(a) => a.saturating_sub(first_seq).min(svc.log.len() as u64) as usize,
                        None => svc.log.len() - lines.unwrap_or(svc.log.len()).min(svc.log.len()),
                    };
                    Reply::ok(json!({
                        "lines": svc.log.iter().skip(skip).collect::<Vec<_>>(),
                        "next": svc.log_next,
                    }))
                }
                Err(r) => r,
            }),
            Request::Bindings => Some(self.bindings_reply()),
            Request::Metrics => {
                let snapshot = self.snapshot();
                Some(Reply::ok(json!({
                    "text": metrics::render(&snapshot),
                    "snapshot": snapshot,
                })))
            }
        }
    }

    fn wait(&mut self, connection: ConnectionId, service: String, until: Until) {
        self.waiters.push(Waiter {
            connection,
            service,
            until,
        });
    }

    fn bindings_reply(&self) -> Reply {
        let Some(d) = &self.dispatcher else {
            return Reply::error(
                "the sk_lookup dispatcher is not active: every socket is bound directly (see `holdfast status`)",
            );
        };
        let counters = match d.counters() {
            Ok(c) => c,
            Err(e) => return Reply::error(format!("cannot read the counters: {e}")),
        };
        let rows: Vec<serde_json::Value> = self
            .bindings
            .iter()
            .map(|b| {
                let c = counters.get(&b.destination).copied().unwrap_or_default();
                json!({
                    "service": b.service,
                    "socket": b.socket,
                    "protocol": b.protocol.as_str(),
                    "prefix": b.prefix.to_string(),
                    "ports": b.ports.to_string(),
                    "destination": b.destination,
                    "socket_present": d.socket_present(b.destination),
                    "lookups": c.lookups,
                    "misses": c.misses,
                    "errors": c.errors,
                    "denied": c.denied,
                })
            })
            .collect();
        Reply::ok(json!(rows))
    }

    /// Reads the dispatcher's `denied` counters into each service's
    /// `dispatcher_denied` (sources its sockets' allow/deny dropped in the
    /// sk_lookup program, before holdfast could count them itself).
    pub(super) fn refresh_dispatcher_denied(&mut self) {
        let Some(d) = &self.dispatcher else { return };
        let Ok(counters) = d.counters() else { return };
        for svc in &mut self.services {
            svc.dispatcher_denied = dispatcher_denied(svc, &counters);
        }
    }

    /// What the metrics show, read now (BPF counters and accept queues included).
    pub(super) fn snapshot(&self) -> metrics::Snapshot {
        let now = Instant::now();
        let mut s = metrics::Snapshot::default();
        // Read once, for the destinations and each service's denied total
        // (the HTTP endpoint is answered without a refresh of the services').
        let counters = self
            .dispatcher
            .as_ref()
            .map(|d| d.counters().unwrap_or_default())
            .unwrap_or_default();
        for svc in &self.services {
            let main = svc.main.as_ref();
            s.services.push(metrics::ServiceMetrics {
                service: svc.unit.name.clone(),
                state: if svc.reloading {
                    "reloading".into()
                } else {
                    svc.life.state.as_str().into()
                },
                restarts: u64::from(svc.restarts),
                ready: main.is_some_and(|m| m.ready),
                uptime_seconds: main
                    .map(|m| now.saturating_duration_since(m.started_at).as_secs_f64())
                    .unwrap_or(0.0),
                instances: svc.acceptor.connections.len() as u64,
                connections_total: svc.acceptor.total,
                denied_total: svc.acceptor.denied + dispatcher_denied(svc, &counters),
                last_exit_status: svc.last_exit.map(|e| match e {
                    Exit::Code(c) => i64::from(c),
                    Exit::Signal(n) => 128 + i64::from(n),
                }),
            });
            for k in &svc.sockets {
                let queue = listener::accept_queue(&k.fd);
                s.sockets.push(metrics::SocketMetrics {
                    service: svc.unit.name.clone(),
                    socket: k.name.clone(),
                    protocol: k.protocol.as_str().into(),
                    backlog_queued: queue.map(|q| u64::from(q.0)),
                    backlog_limit: queue.map(|q| u64::from(q.1)),
                });
            }
        }
        if let Some(d) = &self.dispatcher {
            for svc in &self.services {
                for k in &svc.sockets {
                    let Some(dest) = k.destination else { continue };
                    let c = counters.get(&dest).copied().unwrap_or_default();
                    s.destinations.push(metrics::DestinationMetrics {
                        service: svc.unit.name.clone(),
                        socket: k.name.clone(),
                        destination: dest,
                        socket_present: d.socket_present(dest),
                        lookups: c.lookups,
                        misses: c.misses,
                        errors: c.errors,
                        denied: c.denied,
                    });
                }
            }
        }
        s
    }

    pub(super) fn answer_waiters(&mut self) {
        let now = Instant::now();
        let mut answered = Vec::new();
        for (k, w) in self.waiters.iter().enumerate() {
            let Some(svc) = self.services.iter().find(|s| s.unit.name == w.service) else {
                answered.push((k, Reply::error(format!("service {:?} is gone", w.service))));
                continue;
            };
            let state = svc.life.state;
            let exit = || svc.last_exit.map(|e| format!(" ({e})")).unwrap_or_default();
            let reply = match w.until {
                Until::Down => (matches!(state, State::Stopped | State::Failed)
                    && svc.acceptor.connections.is_empty())
                .then(|| Reply::ok(status_of(svc, now))),
                Until::Up { not } => {
                    let main = svc.main.as_ref();
                    if let Some(why) = &svc.overlap_failure {
                        Some(Reply::error(format!(
                            "restart of {:?} failed: {why}",
                            w.service
                        )))
                    } else if state == State::Running
                        && main.is_some_and(|m| m.ready && Some(m.pid) != not)
                    {
                        Some(Reply::ok(status_of(svc, now)))
                    } else if state == State::Failed {
                        Some(Reply::error(match &svc.failure {
                            Some(why) => format!("service {:?} failed: {why}", w.service),
                            None => format!("service {:?} failed{}", w.service, exit()),
                        }))
                    } else if state == State::Stopped {
                        Some(Reply::error(format!(
                            "service {:?} stopped{}",
                            w.service,
                            exit()
                        )))
                    } else if self.shutting_down {
                        Some(Reply::error("holdfast is shutting down"))
                    } else {
                        None
                    }
                }
            };
            if let Some(r) = reply {
                answered.push((k, r));
            }
        }
        for (k, reply) in answered.into_iter().rev() {
            let w = self.waiters.remove(k);
            if let Some(server) = self.server.as_mut() {
                server.reply(w.connection, &reply);
            }
        }
    }
}

/// What the sk_lookup program's allow/deny dropped for `svc`'s sockets.
fn dispatcher_denied(svc: &Service, counters: &BTreeMap<DestinationId, Counters>) -> u64 {
    svc.sockets
        .iter()
        .filter_map(|k| k.destination)
        .filter_map(|dest| counters.get(&dest))
        .map(|c| c.denied)
        .sum()
}

pub(super) fn status_of(s: &Service, now: Instant) -> serde_json::Value {
    let main = s.main.as_ref();
    json!({
        "name": s.unit.name,
        "state": if s.reloading { "reloading" } else { s.life.state.as_str() },
        "pid": main.map(|m| m.pid.as_raw()),
        "ready": main.is_some_and(|m| m.ready),
        "restarts": s.restarts,
        "uptime_secs": main.map(|m| now.saturating_duration_since(m.started_at).as_secs_f64()),
        "last_exit": s.last_exit.map(|e| e.to_string()),
        "status_text": s.status_text,
        "instances": s.acceptor.connections.len(),
        "connections_total": s.acceptor.total,
        "denied_total": s.acceptor.denied + s.dispatcher_denied,
        "failure": s.failure,
        "errno": s.errno,
        "next_pid": s.next.as_ref().map(|n| n.pid.as_raw()),
        "draining_pids": s.draining.iter().map(|d| d.pid.as_raw()).collect::<Vec<_>>(),
        "fd_store": s.fd_store.fds().map(|(name, _)| name).collect::<Vec<_>>(),
        "sockets": s.sockets.iter().map(|k| k.name.clone()).collect::<Vec<_>>(),
        "listeners": s.sockets.iter().map(|k| json!({
            "name": k.name,
            "protocol": k.protocol.as_str(),
            "destination": k.destination,
            "placement": match &k.placement {
                Placement::Bound(a) => format!("bound {a}"),
                Placement::Steered { .. } => format!(
                    "steered (kernel socket {})",
                    listener::local_addr(&k.fd).map(|a| a.to_string()).unwrap_or_default()
                ),
                Placement::Unix(p) => format!("unix {}", p.display()),
            },
        })).collect::<Vec<_>>(),
    })
}
