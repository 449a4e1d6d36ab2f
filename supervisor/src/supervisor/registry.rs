//! The services the daemon knows, each under a [`ServiceId`] that is never
//! reused while it runs: live ones (found by name), retiring ones (removed by
//! a reload and still stopping), and which process belongs to which service.

use std::collections::{BTreeMap, HashMap};

use crate::service::InstanceId;

use super::services::Service;

/// Names one service for as long as the daemon runs (a unit removed and
/// added back gets a new one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) struct ServiceId(u32);

impl ServiceId {
    pub fn raw(self) -> u32 {
        self.0
    }
    pub fn from_raw(raw: u32) -> ServiceId {
        ServiceId(raw)
    }
}

/// What a tracked pid is to its service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Owner {
    /// The main process of an instance.
    Instance(InstanceId),
    /// A per-connection instance of an accept service.
    Connection,
}

#[derive(Default)]
pub(super) struct Registry {
    services: BTreeMap<ServiceId, Service>,
    by_name: HashMap<String, ServiceId>,
    pids: HashMap<i32, (ServiceId, Owner)>,
    next: u32,
}

impl Registry {
    /// Adds a live service; a live one of the same name must not exist.
    pub fn insert(&mut self, svc: Service) -> ServiceId {
        let id = ServiceId(self.next);
        self.next += 1;
        self.by_name.insert(svc.name().to_string(), id);
        self.services.insert(id, svc);
        id
    }

    /// The live service of that name.
    pub fn find(&self, name: &str) -> Option<ServiceId> {
        self.by_name.get(name).copied()
    }

    pub fn get(&self, id: ServiceId) -> Option<&Service> {
        self.services.get(&id)
    }

    pub fn get_mut(&mut self, id: ServiceId) -> Option<&mut Service> {
        self.services.get_mut(&id)
    }

    pub fn is_live(&self, id: ServiceId) -> bool {
        self.get(id)
            .is_some_and(|s| self.by_name.get(s.name()) == Some(&id))
    }

    /// Live services, in the order they were added.
    pub fn live(&self) -> impl Iterator<Item = (ServiceId, &Service)> {
        self.services
            .iter()
            .filter(|(id, s)| self.by_name.get(s.name()) == Some(id))
            .map(|(id, s)| (*id, s))
    }

    pub fn live_ids(&self) -> Vec<ServiceId> {
        self.live().map(|(id, _)| id).collect()
    }

    /// Every service, retiring ones included.
    pub fn all(&self) -> impl Iterator<Item = (ServiceId, &Service)> {
        self.services.iter().map(|(id, s)| (*id, s))
    }

    pub fn all_ids(&self) -> Vec<ServiceId> {
        self.services.keys().copied().collect()
    }

    pub fn live_count(&self) -> usize {
        self.by_name.len()
    }

    /// Takes a service out of the live set; it stays until [`Registry::sweep`]
    /// finds it without processes.
    pub fn retire(&mut self, id: ServiceId) {
        if let Some(s) = self.services.get(&id) {
            if self.by_name.get(s.name()) == Some(&id) {
                self.by_name.remove(s.name());
            }
        }
    }

    /// Drops retiring services whose processes are all gone.
    pub fn sweep(&mut self) {
        let by_name = &self.by_name;
        self.services
            .retain(|id, s| by_name.get(s.name()) == Some(id) || s.has_processes());
    }

    /// Whether any service (live or retiring) still has a process.
    pub fn any_processes(&self) -> bool {
        self.services.values().any(|s| s.has_processes())
    }

    pub fn track(&mut self, pid: i32, service: ServiceId, owner: Owner) {
        self.pids.insert(pid, (service, owner));
    }

    /// Whose `pid` is, if tracked.
    pub fn owner(&self, pid: i32) -> Option<(ServiceId, Owner)> {
        self.pids.get(&pid).copied()
    }

    pub fn untrack(&mut self, pid: i32) -> Option<(ServiceId, Owner)> {
        self.pids.remove(&pid)
    }
}
