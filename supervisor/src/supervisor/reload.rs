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
use crate::unit::{self, RestartMode, Unit};

use super::services::Service;
use super::sockets::{self, Socket};
use super::Supervisor;

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
    Add(Unit, Vec<Socket>),
    Change {
        index: usize,
        unit: Unit,
        /// Per new socket: an old socket's index to reuse, or a new socket.
        sockets: Vec<Result<usize, Socket>>,
    },
    Keep(usize),
}

impl Supervisor {
    /// Re-reads the units and applies the difference; on any error nothing
    /// changes and every error is returned.
    pub(super) fn reload(&mut self) -> Result<ReloadSummary, String> {
        let units = unit::load_dir(&self.opts.units).map_err(|d| d.to_string())?;

        // Phase 1: plan, opening the sockets that must be new.
        let mut plans = Vec::new();
        let mut errors = Vec::new();
        for unit in units {
            let Some(index) = self.find(&unit.name) else {
                let mut socks = Vec::new();
                for cfg in &unit.sockets {
                    match sockets::open(
                        &unit,
                        cfg,
                        self.dispatcher.is_some(),
                        &self.why_not,
                        &mut self.destinations,
                    ) {
                        Ok(s) => socks.push(s),
                        Err(e) => errors.push(e),
                    }
                }
                plans.push(Plan::Add(unit, socks));
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
                        Err(e) => errors.push(e),
                    },
                }
            }
            plans.push(Plan::Change {
                index,
                unit,
                sockets: socks,
            });
        }
        if !errors.is_empty() {
            self.discard(plans);
            return Err(format!(
                "reload refused, nothing changed:\n{}",
                errors.join("\n")
            ));
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
        let mut new_sockets: Vec<&Socket> = Vec::new();
        for p in &plans {
            match p {
                Plan::Keep(i) => new_bindings.extend(
                    self.bindings
                        .iter()
                        .filter(|b| b.service == self.services[*i].unit.name)
                        .cloned(),
                ),
                Plan::Add(unit, socks) => {
                    for (cfg, s) in unit.sockets.iter().zip(socks) {
                        new_bindings.extend(sockets::bindings(&unit.name, cfg, s));
                        new_sockets.push(s);
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
                            Err(s) => {
                                new_sockets.push(s);
                                s
                            }
                        };
                        new_bindings.extend(sockets::bindings(&unit.name, cfg, s));
                    }
                }
            }
        }
        if let Some(d) = self.dispatcher.as_mut() {
            if let Err(e) = sockets::steer(d, &new_sockets, &new_bindings) {
                for s in &new_sockets {
                    if let Some(dest) = s.destination {
                        let _ = d.remove_socket(dest);
                    }
                }
                self.discard(plans);
                return Err(format!("reload refused, nothing changed: {e}"));
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
                    changes.insert(index, (unit, sockets));
                }
                Plan::Add(unit, socks) => additions.push((unit, socks)),
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
                s.config = cfg.clone();
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
                    to_restart.push(index);
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
        for (unit, socks) in additions {
            let name = unit.name.clone();
            match Service::new(unit, socks, &self.opts.state_dir) {
                Ok(svc) => {
                    self.services.push(svc);
                    to_start.push(name.clone());
                    summary.added.push(name);
                }
                Err(e) => tracing::error!(service = %name, "cannot add: {e}"),
            }
        }
        for name in to_start {
            if let Some(i) = self.find(&name) {
                self.start(i, now);
            }
        }
        for i in to_restart {
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
                Plan::Add(_, s) => s,
                Plan::Change { sockets, .. } => {
                    sockets.into_iter().filter_map(Result::err).collect()
                }
                Plan::Keep(_) => Vec::new(),
            };
            for s in socks {
                if let Some(dest) = s.destination {
                    self.destinations.give_back(dest);
                }
            }
        }
    }
}
