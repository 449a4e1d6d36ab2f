//! Reload: re-read the units directory and apply only the difference.
//!
//! In three phases, so that a reload that cannot be applied changes nothing:
//! 1. validate every unit and open every socket that must be new (a failure
//!    closes what was opened and reports every error);
//! 2. publish the new binding set to the dispatcher in one atomic flip, with
//!    the new sockets put in the sockmap first;
//! 3. commit: removed services stop (their bindings are already gone) and
//!    their sockets close once their processes are; changed services get
//!    their new sockets and, if their `[service]` or their set of fds changed,
//!    a restart in their restart mode; added services start. A unit whose
//!    bindings alone changed keeps its socket and its running process.

use std::os::fd::AsFd;
use std::time::Instant;

use crate::dispatch::Binding;
use crate::listener::Placement;
use crate::notify::NotifySocket;
use crate::protocol::ReloadSummary;
use crate::unit::{self, RestartMode, Unit};

use super::registry::ServiceId;
use super::services::{notify_socket_for, Service};
use super::sockets::{self, Socket};
use super::{Supervisor, SupervisorError};

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The units directory does not validate: every mistake, with its fix.
    #[error("{0}")]
    Units(#[from] unit::Diagnostics),
    /// Sockets (or notify sockets) that could not be created, each naming
    /// its unit file and socket.
    #[error("reload refused, nothing changed:\n{}", .0.join("\n"))]
    Sockets(Vec<String>),
    /// The dispatcher refused the new binding set.
    #[error("reload refused, nothing changed: {0}")]
    Bindings(#[source] SupervisorError),
}

/// Where a changed unit's socket comes from.
enum SocketPlan {
    /// The service's current socket at this index serves it as it is.
    Reuse(usize),
    /// A socket opened for it.
    New(Box<Socket>),
}

/// For one unit of the new set.
enum Plan {
    /// A new service, with its sockets and notify socket, not started.
    Add(Box<Service>),
    Change {
        id: ServiceId,
        unit: Box<Unit>,
        sockets: Vec<SocketPlan>,
        /// Its notify socket, when it had none and the new unit's
        /// `notify-access` is not `none`.
        notify: Option<NotifySocket>,
    },
    Keep(ServiceId),
}

impl Plan {
    fn kept(&self) -> Option<ServiceId> {
        match self {
            Plan::Keep(id) | Plan::Change { id, .. } => Some(*id),
            Plan::Add(_) => None,
        }
    }
}

impl Supervisor {
    /// Re-reads the units and applies the difference; on any error nothing
    /// changes and every error is returned.
    /// [`Supervisor::reload_units`] between RELOADING=1 and READY=1 to
    /// holdfast's manager, and the fd store brought up to date.
    pub(super) fn reload(&mut self) -> Result<ReloadSummary, ReloadError> {
        self.manager.reloading();
        let result = self.reload_units();
        if result.is_ok() {
            self.sync_fd_store();
            self.record_for_recovery();
        }
        self.update_status();
        self.manager.ready();
        result
    }

    fn reload_units(&mut self) -> Result<ReloadSummary, ReloadError> {
        let units = unit::load_dir(&self.opts.units)?;
        crate::preflight::check_units(
            &units,
            &self.opts.state_dir,
            self.base_path.as_deref(),
            self.cgroups.as_ref(),
        )?;
        let plans = self.plan(units)?;
        let removed: Vec<ServiceId> = self
            .registry
            .live_ids()
            .into_iter()
            .filter(|id| !plans.iter().any(|p| p.kept() == Some(*id)))
            .collect();
        if let Err(e) = self.publish(&plans) {
            self.discard(plans);
            return Err(ReloadError::Bindings(e));
        }
        let summary = self.commit(plans, removed, Instant::now());
        tracing::info!(%summary, "reloaded");
        Ok(summary)
    }

    /// Phase 1: a plan per unit, opening the sockets that must be new. On
    /// any error, what was opened is closed and every error is returned.
    fn plan(&mut self, units: Vec<Unit>) -> Result<Vec<Plan>, ReloadError> {
        let mut plans = Vec::new();
        let mut errors = Vec::new();
        for unit in units {
            let result = match self.registry.find(&unit.name) {
                None => self.plan_add(unit),
                Some(id) => self.plan_change(id, unit),
            };
            match result {
                Ok(p) => plans.push(p),
                Err(mut e) => errors.append(&mut e),
            }
        }
        if !errors.is_empty() {
            self.discard(plans);
            return Err(ReloadError::Sockets(errors));
        }
        Ok(plans)
    }

    fn open_socket(&mut self, unit: &Unit, cfg: &unit::SocketConfig) -> Result<Socket, String> {
        // The sockets, still open, bound where this one binds (the one it
        // replaces, and any an earlier reload replaced that is still held).
        let at = self
            .dispatcher
            .as_ref()
            .and(crate::listener::steered_at(cfg));
        let live: Vec<_> = self
            .registry
            .all()
            .flat_map(|(_, svc)| svc.all_sockets())
            .filter(|s| {
                at.is_some() && s.protocol == cfg.protocol && s.placement.steered_at() == at
            })
            .map(|s| s.fd.as_fd())
            .collect();
        sockets::open(
            unit,
            cfg,
            self.dispatcher.is_some(),
            &self.why_not,
            &mut self.destinations,
            &mut crate::manager::Inherited::default(),
            &live,
        )
    }

    fn plan_add(&mut self, unit: Unit) -> Result<Plan, Vec<String>> {
        let mut socks = Vec::new();
        let mut errors = Vec::new();
        for cfg in &unit.sockets {
            match self.open_socket(&unit, cfg) {
                Ok(s) => socks.push(s),
                Err(e) => errors.push(e),
            }
        }
        if !errors.is_empty() {
            self.give_back(socks);
            return Err(errors);
        }
        match Service::new(unit, socks, &self.opts.state_dir) {
            Ok(svc) => Ok(Plan::Add(Box::new(svc))),
            Err((e, socks)) => {
                self.give_back(socks);
                Err(vec![e])
            }
        }
    }

    fn plan_change(&mut self, id: ServiceId, unit: Unit) -> Result<Plan, Vec<String>> {
        let old = self.registry.get(id).expect("a live service");
        if *old.unit() == unit {
            return Ok(Plan::Keep(id));
        }
        let needs_notify = old.notify().is_none();
        let mut used = vec![false; old.sockets().len()];
        let mut reuse = Vec::new();
        for cfg in &unit.sockets {
            let k = old
                .sockets()
                .iter()
                .enumerate()
                .find(|(k, s)| !used[*k] && s.name == cfg.name && s.serves(cfg))
                .map(|(k, _)| k);
            if let Some(k) = k {
                used[k] = true;
            }
            let bound_before = old
                .sockets()
                .iter()
                .any(|s| s.name == cfg.name && matches!(s.placement, Placement::Bound(_)));
            reuse.push((k, bound_before));
        }
        let mut socks = Vec::new();
        let mut errors = Vec::new();
        for (cfg, (k, bound_before)) in unit.sockets.iter().zip(reuse) {
            if let Some(k) = k {
                socks.push(SocketPlan::Reuse(k));
                continue;
            }
            match self.open_socket(&unit, cfg) {
                Ok(s) => socks.push(SocketPlan::New(Box::new(s))),
                Err(e) if bound_before => errors.push(format!(
                    "{e}\n  the change needs a new socket (only backlog, buffers, mark, keep-alive, no-delay and the allow/deny/limit keys change in place), and a bound socket's replacement cannot bind while the old one holds the address: remove the unit, reload, add it back and reload again, or run holdfast with the dispatcher (sk_lookup), where sockets are replaced without a gap"
                )),
                Err(e) => errors.push(e),
            }
        }
        let notify = if needs_notify {
            notify_socket_for(&unit, &self.opts.state_dir).unwrap_or_else(|e| {
                errors.push(e);
                None
            })
        } else {
            None
        };
        let plan = Plan::Change {
            id,
            unit: Box::new(unit),
            sockets: socks,
            notify,
        };
        if !errors.is_empty() {
            self.discard(vec![plan]);
            return Err(errors);
        }
        Ok(plan)
    }

    /// Phase 2: the whole new binding set, published in one flip, with the
    /// new sockets in the sockmap first. On failure the new sockets leave the
    /// sockmap and kept ones get their old rules back.
    fn publish(&mut self, plans: &[Plan]) -> Result<(), SupervisorError> {
        let mut new_bindings: Vec<Binding> = Vec::new();
        // Sockets to steer, with the configuration they will have: new
        // ones, and kept ones whose allow/deny may have changed.
        let mut new_sockets: Vec<(&Socket, &unit::SocketConfig)> = Vec::new();
        for p in plans {
            match p {
                Plan::Keep(id) => {
                    let name = self.registry.get(*id).expect("live").name();
                    new_bindings.extend(self.bindings.iter().filter(|b| b.service == name).cloned())
                }
                Plan::Add(svc) => {
                    for (cfg, s) in svc.unit().sockets.iter().zip(svc.sockets()) {
                        new_bindings.extend(sockets::bindings(&svc.unit().name, cfg, s));
                        new_sockets.push((s, cfg));
                    }
                }
                Plan::Change {
                    id, unit, sockets, ..
                } => {
                    let current = self.registry.get(*id).expect("live").sockets();
                    for (cfg, s) in unit.sockets.iter().zip(sockets) {
                        let s = match s {
                            SocketPlan::Reuse(k) => &current[*k],
                            SocketPlan::New(s) => &**s,
                        };
                        new_sockets.push((s, cfg));
                        new_bindings.extend(sockets::bindings(&unit.name, cfg, s));
                    }
                }
            }
        }
        let Some(d) = self.dispatcher.as_mut() else {
            self.bindings = new_bindings;
            return Ok(());
        };
        // A failed service's listeners stay shut: its bindings stay out.
        let open = super::doors::open_bindings(&self.registry, &new_bindings);
        if let Err(e) = sockets::steer(d, &new_sockets, &open) {
            for (s, _) in &new_sockets {
                let Some(dest) = s.destination else { continue };
                let kept = self.registry.live().find_map(|(_, svc)| {
                    svc.sockets().iter().find(|k| k.destination == Some(dest))
                });
                match kept {
                    Some(k) => {
                        let o = &k.config.options;
                        let _ = d.set_source_rules(dest, &o.allow, &o.deny);
                    }
                    None => {
                        let _ = d.remove_socket(dest);
                    }
                }
            }
            return Err(e);
        }
        self.bindings = new_bindings;
        Ok(())
    }

    /// Phase 3: changed services take their sockets (and restart when their
    /// `[service]` or their fds changed), removed ones stop, added ones start.
    fn commit(&mut self, plans: Vec<Plan>, removed: Vec<ServiceId>, now: Instant) -> ReloadSummary {
        let mut summary = ReloadSummary::default();
        let mut to_start = Vec::new();
        let mut to_restart = Vec::new();
        for p in plans {
            match p {
                Plan::Keep(id) => summary
                    .unchanged
                    .push(self.registry.get(id).expect("live").name().into()),
                Plan::Change {
                    id,
                    unit,
                    sockets,
                    notify,
                } => {
                    let name = unit.name.clone();
                    let (restart, running) = self.change(id, *unit, sockets);
                    if let Some(n) = notify {
                        // Its [service] changed (notify-access): it restarts,
                        // and the new instances get NOTIFY_SOCKET.
                        if let Some(svc) = self.registry.get_mut(id) {
                            svc.set_notify(n);
                        }
                        self.watch_notify(id);
                    }
                    if restart {
                        if running {
                            to_restart.push(id);
                        }
                        summary.restarted.push(name);
                    } else {
                        summary.rebound.push(name);
                    }
                }
                Plan::Add(svc) => {
                    summary.added.push(svc.name().to_string());
                    to_start.push(*svc);
                }
            }
        }
        for id in removed {
            self.remove(id, now);
            summary.removed.push(
                self.registry
                    .get(id)
                    .map(|s| s.name().to_string())
                    .unwrap_or_default(),
            );
        }
        for svc in to_start {
            let id = self.add_service(svc);
            // Accept and on-demand services wait for traffic, as at boot.
            self.act(id, now, |m| m.boot(now));
        }
        for id in to_restart {
            let overlap = self.registry.get(id).is_some_and(|s| {
                s.unit().service.restart_mode == RestartMode::Overlap
                    && !s.unit().service.single_instance
            });
            let mode = if overlap {
                RestartMode::Overlap
            } else {
                RestartMode::StopStart
            };
            self.act(id, now, |m| m.restart(Some(mode), now).unwrap_or_default());
        }
        summary
    }

    /// A changed unit takes its sockets; returns (whether it must restart,
    /// whether it has a main instance).
    fn change(&mut self, id: ServiceId, unit: Unit, plans: Vec<SocketPlan>) -> (bool, bool) {
        let svc = self.registry.get_mut(id).expect("live");
        let same_fds = plans.len() == svc.sockets().len()
            && plans
                .iter()
                .enumerate()
                .all(|(k, s)| matches!(s, SocketPlan::Reuse(j) if *j == k));
        let service_changed = svc.unit().service != unit.service;
        let current = svc.take_sockets();
        let fds: Vec<_> = current.iter().map(|s| s.fd.as_fd()).collect();
        self.poller.forget_traffic(id, &fds);
        let mut old: Vec<Option<Socket>> = current.into_iter().map(Some).collect();
        let mut socks = Vec::new();
        for (cfg, s) in unit.sockets.iter().zip(plans) {
            let mut s = match s {
                SocketPlan::Reuse(k) => old[k].take().expect("each old socket is reused once"),
                SocketPlan::New(s) => *s,
            };
            if let Err(e) = s.adjust(cfg) {
                tracing::error!(service = %unit.name, socket = %cfg.name, error = %e, "cannot change the socket's options in place; it keeps its old ones");
            }
            socks.push(s);
        }
        let replaced: Vec<Socket> = old.into_iter().flatten().collect();
        for s in &replaced {
            self.unsteer(s);
        }
        let svc = self.registry.get_mut(id).expect("live");
        svc.replace(unit, socks, replaced);
        (service_changed || !same_fds, svc.machine().main().is_some())
    }

    /// A unit removed: its bindings are already gone; its processes stop and
    /// its sockets close once they have.
    fn remove(&mut self, id: ServiceId, now: Instant) {
        let Some(svc) = self.registry.get(id) else {
            return;
        };
        let fds: Vec<_> = svc.sockets().iter().map(|s| s.fd.as_fd()).collect();
        self.poller.forget_traffic(id, &fds);
        let socks: Vec<(Option<crate::dispatch::DestinationId>,)> =
            svc.sockets().iter().map(|s| (s.destination,)).collect();
        for (dest,) in socks {
            if let (Some(d), Some(dest)) = (self.dispatcher.as_mut(), dest) {
                let _ = d.remove_socket(dest);
                self.destinations.give_back(dest);
            }
        }
        self.registry.retire(id);
        self.stop_connections(id, now);
        if let Some(svc) = self.registry.get_mut(id) {
            svc.drop_notify();
        }
        self.act(id, now, |m| m.retire(now));
    }

    /// A socket that leaves its service: out of the sockmap, its id freed.
    fn unsteer(&mut self, s: &Socket) {
        if let (Some(d), Some(dest)) = (self.dispatcher.as_mut(), s.destination) {
            let _ = d.remove_socket(dest);
            self.destinations.give_back(dest);
        }
    }

    /// Closes the sockets a refused reload had opened and frees their ids.
    fn discard(&mut self, plans: Vec<Plan>) {
        for p in plans {
            let socks: Vec<Socket> = match p {
                Plan::Add(mut svc) => svc.take_sockets(),
                Plan::Change { sockets, .. } => sockets
                    .into_iter()
                    .filter_map(|s| match s {
                        SocketPlan::New(s) => Some(*s),
                        SocketPlan::Reuse(_) => None,
                    })
                    .collect(),
                Plan::Keep(_) => Vec::new(),
            };
            self.give_back(socks);
        }
    }

    /// Closes sockets that will not be used and frees their sockmap slots.
    fn give_back(&mut self, socks: Vec<Socket>) {
        for s in socks {
            if let Some(dest) = s.destination {
                self.destinations.give_back(dest);
            }
        }
    }
}
