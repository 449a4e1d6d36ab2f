//! holdfast: a socket-activation supervisor. See ARCHITECTURE.md for the layering:
//! only what the `holdfast` binary (CLI, `supervisor`, `unit`, `control`,
//! `protocol`, `import`, `preflight`) and the bench crate (`dispatch`,
//! `listener`) use is public.
//! `unit` (files → validated units) and `listener` (sockets) know nothing of
//! processes; `spawn` is the only door to fork/exec; `service` decides, the
//! `supervisor` event loop acts; `control` carries requests and replies.

pub mod cgroup;
pub mod control;
pub mod dispatch;
mod fds;
#[cfg(test)]
mod fuzz;
pub mod import;
mod instance_lock;
pub mod journal;
pub mod listener;
pub mod manager;
pub mod metrics;
pub mod notify;
pub mod pidfd;
pub mod preflight;
pub mod protocol;
mod ratelimit;
pub mod service;
mod signals;
pub mod spawn;
pub mod statedir;
pub mod supervisor;
#[cfg(test)]
mod testing;
pub mod unit;
