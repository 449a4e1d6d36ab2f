//! What a failed service's clients see. While a service is `failed` (its
//! start limit hit, or ended where `restart` does not apply) nothing will
//! answer its sockets until someone runs `holdfast start`, so, as systemd
//! closes a failed socket unit's listeners, its TCP listeners are shut
//! (`listener::shut`: what waited in the backlog is reset, a new client is
//! refused at once instead of waiting for its own timeout) and, with the
//! dispatcher, its bindings are withdrawn from the sk_lookup program (the
//! kernel's own lookup then finds nothing listening and refuses). The fds
//! stay open: `holdfast start` (or a reload that starts it) listens on the
//! same sockets again, before the first instance spawns, and publishes the
//! bindings again. UDP and unix sockets are left as they are: a datagram
//! socket cannot refuse without being closed, and a unix listener cannot be
//! reopened once shut.

use crate::dispatch::Binding;
use crate::listener;
use crate::service::State;
use crate::unit::{Protocol, SocketConfig};

use super::registry::{Registry, ServiceId};
use super::services::Service;
use super::sockets::{self, Socket};
use super::Supervisor;

impl Supervisor {
    /// Once a turn: shuts the listeners of the services that have failed
    /// since, and opens those of services that left `failed` without a
    /// spawn (e.g. traffic-started ones, listening again).
    pub(super) fn sync_doors(&mut self) {
        let mut changed = false;
        for id in self.registry.live_ids() {
            let Some(svc) = self.registry.get_mut(id) else {
                continue;
            };
            let failed = svc.machine().state() == State::Failed;
            if failed == svc.doors_shut() {
                continue;
            }
            if failed {
                shut_doors(svc);
            } else {
                open_doors(svc);
            }
            changed = true;
        }
        if changed {
            self.steer_open_doors();
        }
    }

    /// Before an instance of service `id` spawns: its listeners listen.
    pub(super) fn open_doors_before_spawn(&mut self, id: ServiceId) {
        let Some(svc) = self.registry.get_mut(id) else {
            return;
        };
        if svc.doors_shut() {
            open_doors(svc);
            self.steer_open_doors();
        }
    }

    /// Once a turn: when a socket has closed since the last turn (a removed
    /// service's, a replaced one, once its instances are gone), the dispatcher
    /// drops the refusal that kept its address and port refused while it was
    /// open (`sockets::refusals`), so that whatever binds there next is found.
    pub(super) fn refresh_refusals(&mut self) {
        let open = self
            .registry
            .all()
            .map(|(_, s)| s.all_sockets().count())
            .sum();
        let closed = open < self.open_sockets;
        self.open_sockets = open;
        let refusing = self.dispatcher.as_ref().is_some_and(|d| {
            d.bindings()
                .iter()
                .any(|b| b.destination == sockets::REFUSED)
        });
        if closed && refusing {
            self.steer_open_doors();
        }
    }

    /// Publishes the sockets and bindings of every service whose doors are
    /// open (a no-op when they are what the dispatcher has).
    fn steer_open_doors(&mut self) {
        let Some(d) = self.dispatcher.as_mut() else {
            return;
        };
        let open: Vec<(&Socket, &SocketConfig)> = self
            .registry
            .live()
            .filter(|(_, s)| !s.doors_shut())
            .flat_map(|(_, s)| s.sockets())
            .map(|k| (k, &k.config))
            .collect();
        let bindings = open_bindings(&self.registry, &self.bindings);
        if let Err(e) = sockets::steer(d, &open, &bindings) {
            tracing::error!(error = %e, "cannot publish the bindings of the services whose listeners were shut or opened");
        }
    }
}

/// `declared` less the bindings of the services whose listeners are shut,
/// plus the refusals of sockets that are withdrawn but still open
/// (`sockets::refusals`).
pub(super) fn open_bindings(registry: &Registry, declared: &[Binding]) -> Vec<Binding> {
    let shut: Vec<&str> = registry
        .live()
        .filter(|(_, s)| s.doors_shut())
        .map(|(_, s)| s.name())
        .collect();
    let mut open: Vec<Binding> = declared
        .iter()
        .filter(|b| !shut.contains(&b.service.as_str()))
        .cloned()
        .collect();
    let all = registry
        .all()
        .flat_map(|(_, s)| s.all_sockets().map(move |k| (s.name(), k)));
    let refused = sockets::refusals(all, &open);
    open.extend(refused);
    open
}

fn shut_doors(svc: &mut Service) {
    for k in svc.sockets() {
        if k.protocol == Protocol::Tcp && listener::is_listening(&k.fd) {
            if let Err(e) = listener::shut(&k.fd, &k.name) {
                tracing::warn!(service = %svc.name(), socket = %k.name, error = %e, "cannot shut the listener of a failed service");
            }
        }
    }
    svc.set_doors_shut(true);
    tracing::warn!(service = %svc.name(), "failed: its TCP listeners are shut (new clients are refused, waiting ones reset) until `holdfast start`");
}

fn open_doors(svc: &mut Service) {
    for k in svc.sockets() {
        if k.protocol == Protocol::Tcp && !listener::is_listening(&k.fd) {
            if let Err(e) = listener::listen_again(&k.fd, &k.config) {
                tracing::error!(service = %svc.name(), socket = %k.name, error = %e, "cannot listen again on a socket shut while the service was failed");
            }
        }
    }
    svc.set_doors_shut(false);
    tracing::info!(service = %svc.name(), "its listeners listen again");
}
