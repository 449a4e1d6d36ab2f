//! Control requests: answering them, and holding the replies of those that
//! wait for a service to reach a state (start, stop, restart).

use std::collections::BTreeMap;
use std::time::Instant;

use crate::protocol::{BindingStatus, ListenerStatus, LogLines, MetricsReply, ServiceStatus};

use crate::control::{ConnectionId, Reply, Request};
use crate::dispatch::{Counters, DestinationId, Dispatcher};
use crate::listener::{self, Placement};
use crate::metrics;
use crate::service::Exit;
use crate::service::State;
use crate::unit::RestartMode;

use super::output::Query;
use super::registry::ServiceId;
use super::services::Service;
use super::Supervisor;

/// A control request waiting for a service to reach a state.
pub(super) struct Waiter {
    connection: ConnectionId,
    service: ServiceId,
    name: String,
    until: Until,
}

impl Waiter {
    pub fn connection(&self) -> ConnectionId {
        self.connection
    }
}

enum Until {
    Down,
    /// Running and ready, with a main pid other than this one.
    Up {
        not: Option<i32>,
    },
    /// Reload number `seq` of the service is over.
    Reloaded {
        seq: u64,
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

    /// The live service of that name, or the error reply.
    fn named(&self, name: &str) -> Result<ServiceId, Reply> {
        self.registry
            .find(name)
            .ok_or_else(|| Reply::error(format!("no service named {name:?}")))
    }

    fn status_reply(&self, id: ServiceId, now: Instant) -> Reply {
        match self.registry.get(id) {
            Some(s) => Reply::ok(&status_of(s, now)),
            None => no_such_service(),
        }
    }

    /// Answers a request, or registers a waiter and returns `None`.
    fn handle(&mut self, conn: ConnectionId, request: Request, now: Instant) -> Option<Reply> {
        let answer = match request {
            Request::Status { name } => self.status_request(name, now),
            Request::Start { name } => self.start_request(conn, name, now),
            Request::Stop { name } => self.stop_request(conn, name, now),
            Request::Restart { name, mode } => self.restart_request(conn, name, mode, now),
            Request::ReloadService { name } => self.reload_service_request(conn, name, now),
            Request::Reload => Ok(Some(match self.reload() {
                Ok(summary) => Reply::ok(&summary),
                Err(e) => Reply::error(e.to_string()),
            })),
            Request::Logs {
                name,
                lines,
                after,
                since,
            } => self.logs_request(&name, lines, after, since.as_deref()),
            Request::Bindings => Ok(Some(self.bindings_reply())),
            Request::Upgrade => {
                // Answered by the new binary once it runs, or here with why not.
                let stream = self.server.as_mut().and_then(|s| s.take_connection(conn));
                self.upgrade(stream);
                Ok(None)
            }
            Request::Metrics => {
                let snapshot = self.snapshot();
                Ok(Some(Reply::ok(&MetricsReply {
                    text: metrics::render(&snapshot),
                    snapshot,
                })))
            }
        };
        answer.unwrap_or_else(Some)
    }

    fn status_request(&self, name: Option<String>, now: Instant) -> Answer {
        let statuses: Vec<_> = match name {
            None => self
                .registry
                .live()
                .map(|(_, s)| status_of(s, now))
                .collect(),
            Some(n) => {
                let id = self.named(&n)?;
                let s = self.registry.get(id).ok_or_else(no_such_service)?;
                vec![status_of(s, now)]
            }
        };
        Ok(Some(Reply::ok(&statuses)))
    }

    fn start_request(&mut self, conn: ConnectionId, name: String, now: Instant) -> Answer {
        let id = self.named(&name)?;
        self.refuse_when_shutting_down()?;
        let mut wait = false;
        self.act(id, now, |m| {
            let (w, fx) = m.request_start(now);
            wait = w;
            fx
        });
        if !wait {
            return Ok(Some(self.status_reply(id, now)));
        }
        self.wait(conn, id, name, Until::Up { not: None });
        Ok(None)
    }

    fn stop_request(&mut self, conn: ConnectionId, name: String, now: Instant) -> Answer {
        let id = self.named(&name)?;
        self.stop(id, now);
        self.wait(conn, id, name, Until::Down);
        Ok(None)
    }

    fn restart_request(
        &mut self,
        conn: ConnectionId,
        name: String,
        mode: Option<RestartMode>,
        now: Instant,
    ) -> Answer {
        let id = self.named(&name)?;
        self.refuse_when_shutting_down()?;
        let svc = self.registry.get(id).ok_or_else(no_such_service)?;
        let old = svc.machine().main().map(|m| m.pid);
        let mut refused = None;
        self.act(id, now, |m| match m.restart(mode, now) {
            Ok(fx) => fx,
            Err(e) => {
                refused = Some(e);
                Vec::new()
            }
        });
        if let Some(e) = refused {
            return Err(Reply::error(e));
        }
        self.wait(conn, id, name, Until::Up { not: old });
        Ok(None)
    }

    fn reload_service_request(&mut self, conn: ConnectionId, name: String, now: Instant) -> Answer {
        let id = self.named(&name)?;
        self.refuse_when_shutting_down()?;
        let mut asked = Err(String::new());
        self.act(id, now, |m| match m.reload(now) {
            Ok((seq, fx)) => {
                asked = Ok(seq);
                fx
            }
            Err(e) => {
                asked = Err(e);
                Vec::new()
            }
        });
        let seq = asked.map_err(Reply::error)?;
        self.wait(conn, id, name, Until::Reloaded { seq });
        Ok(None)
    }

    fn logs_request(
        &self,
        name: &str,
        lines: Option<usize>,
        after: Option<u64>,
        since: Option<&str>,
    ) -> Answer {
        let id = self.named(name)?;
        let svc = self.registry.get(id).ok_or_else(no_such_service)?;
        let since = since
            .map(|s| {
                humantime::parse_rfc3339_weak(s).map_err(|e| {
                    Reply::error(format!(
                        "since {s:?} is not an RFC 3339 time such as 2026-12-07T13:00:00Z: {e}"
                    ))
                })
            })
            .transpose()?;
        let query = Query {
            lines,
            after,
            since,
        };
        let (lines, next) = svc.log().read(query);
        Ok(Some(Reply::ok(&LogLines { lines, next })))
    }

    fn refuse_when_shutting_down(&self) -> Result<(), Reply> {
        if self.shutting_down {
            Err(Reply::error("holdfast is shutting down"))
        } else {
            Ok(())
        }
    }

    fn wait(&mut self, connection: ConnectionId, service: ServiceId, name: String, until: Until) {
        self.waiters.push(Waiter {
            connection,
            service,
            name,
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
        let rows: Vec<BindingStatus> = self
            .bindings
            .iter()
            .map(|b| BindingStatus {
                service: b.service.clone(),
                socket: b.socket.clone(),
                protocol: b.protocol.as_str().into(),
                prefix: b.prefix.to_string(),
                ports: b.ports.to_string(),
                counters: destination_counters(d, &counters, b.destination),
            })
            .collect();
        Reply::ok(&rows)
    }

    /// Reads the dispatcher's `denied` counters into each service's
    /// `dispatcher_denied` (sources its sockets' allow/deny dropped in the
    /// sk_lookup program, before holdfast could count them itself).
    pub(super) fn refresh_dispatcher_denied(&mut self) {
        let Some(d) = &self.dispatcher else { return };
        let Ok(counters) = d.counters() else { return };
        for id in self.registry.live_ids() {
            if let Some(svc) = self.registry.get_mut(id) {
                let denied = dispatcher_denied(svc, &counters);
                svc.set_dispatcher_denied(denied);
            }
        }
    }

    /// What the metrics show, read now (BPF counters and accept queues included).
    pub(super) fn snapshot(&self) -> metrics::Snapshot {
        let now = Instant::now();
        let mut s = metrics::Snapshot {
            states: state_names(),
            ..Default::default()
        };
        // Read once, for the destinations and each service's denied total
        // (the HTTP endpoint is answered without a refresh of the services').
        let counters = self
            .dispatcher
            .as_ref()
            .map(|d| d.counters().unwrap_or_default())
            .unwrap_or_default();
        for (_, svc) in self.registry.live() {
            let m = svc.machine();
            let main = m.main();
            let (instances, total, denied) = acceptor_counts(svc);
            let usage = svc.usage();
            s.services.push(metrics::ServiceMetrics {
                memory_bytes: usage.and_then(|u| u.memory_bytes),
                cpu_seconds: usage.map(|u| u.cpu.as_secs_f64()),
                service: svc.name().to_string(),
                state: m.state().as_str().into(),
                restarts: u64::from(m.restarts()),
                ready: main.is_some_and(|m| m.ready),
                uptime_seconds: main
                    .map(|m| now.saturating_duration_since(m.started_at).as_secs_f64())
                    .unwrap_or(0.0),
                instances: instances as u64,
                connections_total: total,
                denied_total: denied + dispatcher_denied(svc, &counters),
                last_exit_status: m.last_exit().map(|e| match e {
                    Exit::Code(c) => i64::from(c),
                    Exit::Signal(n) => 128 + i64::from(n),
                }),
            });
            for k in svc.sockets() {
                let queue = listener::accept_queue(&k.fd);
                s.sockets.push(metrics::SocketMetrics {
                    service: svc.name().to_string(),
                    socket: k.name.clone(),
                    protocol: k.protocol.as_str().into(),
                    backlog_queued: queue.map(|q| u64::from(q.0)),
                    backlog_limit: queue.map(|q| u64::from(q.1)),
                });
            }
        }
        s.journal = self.journal.as_ref().map(|j| metrics::JournalMetrics {
            forwarded: j.forwarded(),
            dropped: j.dropped(),
        });
        if let Some(d) = &self.dispatcher {
            for (_, svc) in self.registry.live() {
                for k in svc.sockets() {
                    let Some(dest) = k.destination else { continue };
                    s.destinations.push(metrics::DestinationMetrics {
                        service: svc.name().to_string(),
                        socket: k.name.clone(),
                        counters: destination_counters(d, &counters, dest),
                    });
                }
            }
        }
        s
    }

    pub(super) fn answer_waiters(&mut self) {
        let now = Instant::now();
        let mut k = 0;
        while k < self.waiters.len() {
            match self.waiter_reply(&self.waiters[k], now) {
                Some(reply) => {
                    let w = self.waiters.remove(k);
                    if let Some(server) = self.server.as_mut() {
                        server.reply(w.connection, &reply);
                    }
                }
                None => k += 1,
            }
        }
    }

    /// The reply for a waiter, once its service has reached the state or cannot.
    fn waiter_reply(&self, w: &Waiter, now: Instant) -> Option<Reply> {
        let name = &w.name;
        let Some(svc) = self
            .registry
            .get(w.service)
            .filter(|_| self.registry.is_live(w.service))
        else {
            return Some(Reply::error(format!("service {name:?} is gone")));
        };
        let m = svc.machine();
        let state = m.state();
        let exit = || m.last_exit().map(|e| format!(" ({e})")).unwrap_or_default();
        match w.until {
            // Down is no process left, as systemd counts it: the cgroup
            // empty, a setsid'd grandchild included.
            Until::Down => (matches!(state, State::Stopped | State::Failed)
                && acceptor_counts(svc).0 == 0
                && !svc.tracking().any_left())
            .then(|| Reply::ok(&status_of(svc, now))),
            Until::Reloaded { seq } => match m.reload_outcome(seq) {
                Some(Ok(())) => Some(Reply::ok(&status_of(svc, now))),
                Some(Err(why)) => Some(Reply::error(format!("reload of {name:?} failed: {why}"))),
                None if self.shutting_down => Some(Reply::error("holdfast is shutting down")),
                None => None,
            },
            Until::Up { not } => {
                if let Some(why) = m.overlap_failure() {
                    Some(Reply::error(format!("restart of {name:?} failed: {why}")))
                } else if state == State::Running
                    && m.main().is_some_and(|i| i.ready && Some(i.pid) != not)
                {
                    Some(Reply::ok(&status_of(svc, now)))
                } else if state == State::Failed {
                    Some(Reply::error(match m.failure() {
                        Some(why) => format!("service {name:?} failed: {why}"),
                        None => format!("service {name:?} failed{}", exit()),
                    }))
                } else if state == State::Stopped {
                    Some(Reply::error(format!("service {name:?} stopped{}", exit())))
                } else if self.shutting_down {
                    Some(Reply::error("holdfast is shutting down"))
                } else {
                    None
                }
            }
        }
    }
}

/// An accept service's instances, connections and refusals (zeros otherwise).
fn acceptor_counts(svc: &Service) -> (usize, u64, u64) {
    svc.acceptor()
        .map_or((0, 0, 0), |a| (a.instances(), a.total(), a.denied()))
}

/// `dest`'s counters as read from the dispatcher, and whether its socket is
/// in the sockmap now.
fn destination_counters(
    d: &Dispatcher,
    counters: &BTreeMap<DestinationId, Counters>,
    dest: DestinationId,
) -> metrics::DestinationCounters {
    let c = counters.get(&dest).copied().unwrap_or_default();
    metrics::DestinationCounters {
        destination: dest,
        socket_present: d.socket_present(dest),
        lookups: c.lookups,
        misses: c.misses,
        errors: c.errors,
        denied: c.denied,
    }
}

/// What the sk_lookup program's allow/deny dropped for `svc`'s sockets.
fn dispatcher_denied(svc: &Service, counters: &BTreeMap<DestinationId, Counters>) -> u64 {
    svc.sockets()
        .iter()
        .filter_map(|k| k.destination)
        .filter_map(|dest| counters.get(&dest))
        .map(|c| c.denied)
        .sum()
}

pub(super) fn status_of(s: &Service, now: Instant) -> ServiceStatus {
    let m = s.machine();
    let main = m.main();
    let (instances, total, denied) = acceptor_counts(s);
    let usage = s.usage();
    ServiceStatus {
        memory_bytes: usage.and_then(|u| u.memory_bytes),
        cpu_seconds: usage.map(|u| u.cpu.as_secs_f64()),
        name: s.name().to_string(),
        state: m.state(),
        pid: main.map(|i| i.pid),
        ready: main.is_some_and(|i| i.ready),
        restarts: m.restarts(),
        uptime_secs: main.map(|i| now.saturating_duration_since(i.started_at).as_secs_f64()),
        last_exit: m.last_exit().map(|e| e.to_string()),
        status_text: m.status_text().map(String::from),
        instances,
        connections_total: total,
        denied_total: denied + s.dispatcher_denied(),
        failure: m.failure().map(String::from),
        errno: m.errno(),
        next_pid: m.candidate().map(|n| n.pid),
        draining_pids: m.draining().iter().map(|d| d.pid).collect(),
        fd_store: s
            .fd_store()
            .fds()
            .map(|(name, _)| name.to_string())
            .collect(),
        sockets: s.sockets().iter().map(|k| k.name.clone()).collect(),
        listeners: s
            .sockets()
            .iter()
            .map(|k| ListenerStatus {
                name: k.name.clone(),
                protocol: k.protocol.as_str().into(),
                destination: k.destination,
                placement: match &k.placement {
                    Placement::Bound(a) => format!("bound {a}"),
                    Placement::Steered { .. } => format!(
                        "steered (kernel socket {})",
                        listener::local_addr(&k.fd)
                            .map(|a| a.to_string())
                            .unwrap_or_default()
                    ),
                    Placement::Unix(p) => format!("unix {}", p.display()),
                },
            })
            .collect(),
    }
}

/// Every state's name, for the one-series-per-state gauge.
fn state_names() -> Vec<&'static str> {
    State::ALL.iter().map(|s| s.as_str()).collect()
}

/// A request's answer: `Ok(Some(reply))`, `Ok(None)` once it has registered
/// a waiter, or `Err(reply)` when it is refused.
type Answer = Result<Option<Reply>, Reply>;

fn no_such_service() -> Reply {
    Reply::error("no such service")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `metrics::STATES` once lacked `listening`: a listening service
    /// exported 0 for every state series.
    #[test]
    fn every_state_has_its_series() {
        for state in State::ALL {
            let s = metrics::Snapshot {
                states: state_names(),
                services: vec![metrics::ServiceMetrics {
                    service: "web".into(),
                    state: state.as_str().into(),
                    restarts: 0,
                    ready: false,
                    uptime_seconds: 0.0,
                    last_exit_status: None,
                    instances: 0,
                    connections_total: 0,
                    denied_total: 0,
                    memory_bytes: None,
                    cpu_seconds: None,
                }],
                ..Default::default()
            };
            let text = metrics::render(&s);
            let want = format!(
                "holdfast_service_state{{service=\"web\",state=\"{}\"}} 1",
                state.as_str()
            );
            assert!(text.contains(&want), "missing {want:?} in\n{text}");
        }
    }
}
