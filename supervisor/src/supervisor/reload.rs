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

use std::collections::BTreeMap;
use std::time::Instant;

use serde::Serialize;

use crate::dispatch::Binding;
use crate::listener::Placement;
use crate::unit::{self, RestartMode, Unit};

use super::services::Service;
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

/// What a reload did, by service name.
#[derive(Debug, Default, Serialize)]
pub struct ReloadSummary {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Restarted: their `[service]` or their sockets changed.
    pub restarted: Vec<String>,
    /// Only their bindings changed: same socket, same process.
    pub rebound: Vec<String>,
    pub unchanged: Vec<String>,
}

impl std::fmt::Display for ReloadSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "added {:?}, removed {:?}, restarted {:?}, rebound {:?}, unchanged {}",
            self.added,
            self.removed,
            self.restarted,
            self.rebound,
            self.unchanged.len()
        )
    }
}

/// For one new unit: which of the service's current sockets each of its
/// sockets reuses, or the socket opened for it.
enum Plan {
    /// A new service, with its sockets and notify socket, not started.
    Add(Box<Service>),
    Change {
        index: usize,
        unit: Box<Unit>,
        /// Per new socket: an old socket's index to reuse, or a new socket.
        sockets: Vec<Result<usize, Socket>>,
    },
    Keep(usize),
}

impl Supervisor {
    /// Re-reads the units and applies the difference; on any error nothing
    /// changes and every error is returned.
    pub(super) fn reload(&mut self) -> Result<ReloadSummary, ReloadError> {
        let units = unit::load_dir(&self.opts.units)?;
        crate::preflight::check_units(&units, &self.opts.state_dir, self.base_path.as_deref())?;

        // Phase 1: plan, opening the sockets that must be new.
        let mut plans = Vec::new();
        let mut errors = Vec::new();
        for unit in units {
            let Some(index) = self.find(&unit.name) else {
                let mut socks = Vec::new();
                let mut opened = true;
                for cfg in &unit.sockets {
                    match sockets::open(
                        &unit,
                        cfg,
                        self.dispatcher.is_some(),
                        &self.why_not,
                        &mut self.destinations,
                    ) {
                        Ok(s) => socks.push(s),
                        Err(e) => {
                            errors.push(e);
                            opened = false;
                        }
                    }
                }
                if !opened {
                    self.give_back(socks);
                    continue;
                }
                match Service::new(unit, socks, &self.opts.state_dir) {
                    Ok(svc) => plans.push(Plan::Add(Box::new(svc))),
                    Err((e, socks)) => {
                        errors.push(e);
                        self.give_back(socks);
                    }
                }
                continue;
            };
            let old = &self.services[index];
            if old.unit == unit {
                plans.push(Plan::Keep(index));
                continue;
            }
            let mut socks = Vec::new();
            let mut used = vec![false; old.sockets.len()];
            for cfg in &unit.sockets {
                let reuse = old
                    .sockets
                    .iter()
                    .enumerate()
                    .find(|(k, s)| !used[*k] && s.name == cfg.name && s.serves(cfg))
                    .map(|(k, _)| k);
                match reuse {
                    Some(k) => {
                        used[k] = true;
                        socks.push(Ok(k));
                    }
                    None => match sockets::open(
                        &unit,
                        cfg,
                        self.dispatcher.is_some(),
                        &self.why_not,
                        &mut self.destinations,
                    ) {
                        Ok(s) => socks.push(Err(s)),
                        Err(e) => {
                            let bound_before = old.sockets.iter().any(|s| {
                                s.name == cfg.name && matches!(s.placement, Placement::Bound(_))
                            });
                            errors.push(if bound_before {
                                format!(
                                    "{e}\n  the change needs a new socket (only backlog, buffers, mark, keep-alive, no-delay and the allow/deny/limit keys change in place), and a bound socket's replacement cannot bind while the old one holds the address: remove the unit, reload, add it back and reload again, or run holdfast with the dispatcher (sk_lookup), where sockets are replaced without a gap"
                                )
                            } else {
                                e
                            });
                        }
                    },
                }
            }
            plans.push(Plan::Change {
                index,
                unit: Box::new(unit),
                sockets: socks,
            });
        }
        if !errors.is_empty() {
            self.discard(plans);
            return Err(ReloadError::Sockets(errors));
        }

        // Phase 2: the new binding set, published atomically.
        let kept_names: Vec<&str> = plans
            .iter()
            .filter_map(|p| match p {
                Plan::Keep(i) | Plan::Change { index: i, .. } => {
                    Some(self.services[*i].unit.name.as_str())
                }
                Plan::Add(..) => None,
            })
            .collect();
        let removed: Vec<usize> = (0..self.services.len())
            .filter(|i| !kept_names.contains(&self.services[*i].unit.name.as_str()))
            .collect();
        let mut new_bindings: Vec<Binding> = Vec::new();
        // Sockets to steer, with the configuration they will have: new
        // ones, and kept ones whose allow/deny may have changed.
        let mut new_sockets: Vec<(&Socket, &unit::SocketConfig)> = Vec::new();
        for p in &plans {
            match p {
                Plan::Keep(i) => new_bindings.extend(
                    self.bindings
                        .iter()
                        .filter(|b| b.service == self.services[*i].unit.name)
                        .cloned(),
                ),
                Plan::Add(svc) => {
                    for (cfg, s) in svc.unit.sockets.iter().zip(&svc.sockets) {
                        new_bindings.extend(sockets::bindings(&svc.unit.name, cfg, s));
                        new_sockets.push((s, cfg));
                    }
                }
                Plan::Change {
                    index,
                    unit,
                    sockets,
                } => {
                    for (cfg, s) in unit.sockets.iter().zip(sockets) {
                        let s = match s {
                            Ok(k) => &self.services[*index].sockets[*k],
                            Err(s) => s,
                        };
                        new_sockets.push((s, cfg));
                        new_bindings.extend(sockets::bindings(&unit.name, cfg, s));
                    }
                }
            }
        }
        if let Some(d) = self.dispatcher.as_mut() {
            if let Err(e) = sockets::steer(d, &new_sockets, &new_bindings) {
                // Undo: new sockets leave the sockmap, kept ones get their
                // rules back.
                for (s, _) in &new_sockets {
                    let Some(dest) = s.destination else { continue };
                    let kept = self
                        .services
                        .iter()
                        .any(|svc| svc.sockets.iter().any(|k| k.destination == Some(dest)));
                    if kept {
                        let o = &s.config.options;
                        let _ = d.set_source_rules(dest, &o.allow, &o.deny);
                    } else {
                        let _ = d.remove_socket(dest);
                    }
                }
                self.discard(plans);
                return Err(ReloadError::Bindings(e));
            }
        }
        self.bindings = new_bindings;

        // Phase 3: commit.
        let now = Instant::now();
        let mut summary = ReloadSummary::default();
        let mut to_start = Vec::new();
        let mut to_restart = Vec::new();
        let mut changes: BTreeMap<usize, (Unit, Vec<Result<usize, Socket>>)> = BTreeMap::new();
        let mut additions = Vec::new();
        for p in plans {
            match p {
                Plan::Keep(i) => summary.unchanged.push(self.services[i].unit.name.clone()),
                Plan::Change {
                    index,
                    unit,
                    sockets,
                } => {
                    changes.insert(index, (*unit, sockets));
                }
                Plan::Add(svc) => additions.push(svc),
            }
        }
        for (index, (unit, new_socks)) in changes {
            let svc = &mut self.services[index];
            let same_fds = new_socks.len() == svc.sockets.len()
                && new_socks
                    .iter()
                    .enumerate()
                    .all(|(k, s)| matches!(s, Ok(j) if *j == k));
            let service_changed = svc.unit.service != unit.service;
            let mut old: Vec<Option<Socket>> = svc.sockets.drain(..).map(Some).collect();
            for (cfg, s) in unit.sockets.iter().zip(new_socks) {
                let mut s = match s {
                    Ok(k) => old[k].take().expect("each old socket is reused once"),
                    Err(s) => s,
                };
                if let Err(e) = s.adjust(cfg) {
                    tracing::error!(service = %unit.name, socket = %cfg.name, error = %e, "cannot change the socket's options in place; it keeps its old ones");
                }
                svc.sockets.push(s);
            }
            for s in old.into_iter().flatten() {
                if let (Some(d), Some(dest)) = (self.dispatcher.as_mut(), s.destination) {
                    let _ = d.remove_socket(dest);
                    self.destinations.give_back(dest);
                }
                svc.old_sockets.push(s);
            }
            if !svc.has_processes() {
                svc.old_sockets.clear();
            }
            if unit.service.fd_store_max != svc.unit.service.fd_store_max {
                let closed = svc.fd_store.set_max(unit.service.fd_store_max as usize);
                if closed > 0 {
                    tracing::warn!(service = %unit.name, closed, max = unit.service.fd_store_max, "fd-store-max lowered: the newest stored fds over it are closed");
                }
            }
            if service_changed {
                svc.life.restart = unit.service.restart;
                svc.life.backoff = crate::service::Backoff::new(
                    unit.service.restart_delay,
                    unit.service.restart_delay_max,
                    unit.service.start_limit_interval,
                );
                svc.life.start_limit = crate::service::StartLimit::new(
                    unit.service.start_limit_burst,
                    unit.service.start_limit_interval,
                );
            }
            let name = unit.name.clone();
            svc.unit = unit;
            if service_changed || !same_fds {
                if svc.main.is_some() {
                    to_restart.push(name.clone());
                }
                summary.restarted.push(name);
            } else {
                summary.rebound.push(name);
            }
        }
        for i in removed.into_iter().rev() {
            let mut svc = self.services.remove(i);
            summary.removed.push(svc.unit.name.clone());
            for s in &svc.sockets {
                if let (Some(d), Some(dest)) = (self.dispatcher.as_mut(), s.destination) {
                    let _ = d.remove_socket(dest);
                    self.destinations.give_back(dest);
                }
            }
            svc.life.stop_requested = true;
            self.retiring.push(svc);
            let k = self.retiring.len() - 1;
            self.retire(k, now);
        }
        for svc in additions {
            let name = svc.unit.name.clone();
            self.services.push(*svc);
            to_start.push(name.clone());
            summary.added.push(name);
        }
        for name in to_start {
            if let Some(i) = self.find(&name) {
                if self.services[i].traffic_started() {
                    // Accept and on-demand services wait for traffic, as at boot.
                    self.services[i].life.state = crate::service::State::Listening;
                } else {
                    self.start(i, now);
                }
            }
        }
        for name in to_restart {
            let Some(i) = self.find(&name) else { continue };
            let svc = &self.services[i];
            let overlap = svc.unit.service.restart_mode == RestartMode::Overlap
                && !svc.unit.service.single_instance;
            if overlap {
                let _ = self.start_overlap(i, now);
            } else {
                self.restart_stop_start(i, now);
            }
        }
        tracing::info!(%summary, "reloaded");
        Ok(summary)
    }

    /// Closes the sockets a refused reload had opened and frees their ids.
    fn discard(&mut self, plans: Vec<Plan>) {
        for p in plans {
            let socks: Vec<Socket> = match p {
                Plan::Add(mut svc) => std::mem::take(&mut svc.sockets),
                Plan::Change { sockets, .. } => {
                    sockets.into_iter().filter_map(Result::err).collect()
                }
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
