//! The event loop's one epoll instance: each fd is registered once, when it
//! is created, with a [`Token`] saying what it is; closing the fd (held by
//! holdfast alone) takes it out. Listeners of traffic-started services are
//! the exception, as children hold them too: they are armed one shot at a
//! time (`EPOLLONESHOT`), only while the service wants traffic.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};

use super::registry::ServiceId;

/// What a ready fd is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Token {
    /// The signal pipe.
    Signal,
    /// The control server (its own epoll fd).
    Control,
    /// The metrics endpoint's wake-up socket.
    Metrics,
    /// A service's notify socket.
    Notify(ServiceId),
    /// A listener of a traffic-started service.
    Traffic(ServiceId),
    /// A service's stdout or stderr pipe.
    Output(u64),
    /// The pidfd of a main process named by MAINPID= (`pid`, below 2^24):
    /// readable once it has exited, holdfast's child or not.
    MainPid { service: ServiceId, pid: i32 },
}

/// Bits of a [`Token::MainPid`]'s id that hold the pid (the kernel's
/// `PID_MAX_LIMIT` is 2^22).
const PID_BITS: u32 = 24;

const KIND_SHIFT: u32 = 56;

impl Token {
    fn encode(self) -> u64 {
        let (kind, id) = match self {
            Token::Signal => (0, 0),
            Token::Control => (1, 0),
            Token::Metrics => (2, 0),
            Token::Notify(s) => (3, u64::from(s.raw())),
            Token::Traffic(s) => (4, u64::from(s.raw())),
            Token::Output(o) => (5, o & ((1 << KIND_SHIFT) - 1)),
            Token::MainPid { service, pid } => (
                6,
                (u64::from(service.raw()) << PID_BITS) | (pid as u64 & ((1 << PID_BITS) - 1)),
            ),
        };
        (kind << KIND_SHIFT) | id
    }

    fn decode(v: u64) -> Option<Token> {
        let id = v & ((1 << KIND_SHIFT) - 1);
        let service = || ServiceId::from_raw(id as u32);
        Some(match v >> KIND_SHIFT {
            0 => Token::Signal,
            1 => Token::Control,
            2 => Token::Metrics,
            3 => Token::Notify(service()),
            4 => Token::Traffic(service()),
            5 => Token::Output(id),
            6 => Token::MainPid {
                service: ServiceId::from_raw((id >> PID_BITS) as u32),
                pid: (id & ((1 << PID_BITS) - 1)) as i32,
            },
            _ => return None,
        })
    }
}

pub(super) struct Poller {
    epoll: Epoll,
    /// Traffic listeners registered, by service: fd → armed.
    traffic: BTreeMap<ServiceId, BTreeMap<RawFd, bool>>,
}

impl Poller {
    pub fn new() -> std::io::Result<Poller> {
        Ok(Poller {
            epoll: Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?,
            traffic: BTreeMap::new(),
        })
    }

    /// Registers `fd` (readable) under `token`, for as long as it is open.
    pub fn add(&self, fd: BorrowedFd<'_>, token: Token) -> std::io::Result<()> {
        self.epoll
            .add(fd, EpollEvent::new(EpollFlags::EPOLLIN, token.encode()))?;
        Ok(())
    }

    /// Arms the listeners `fds` of `service` for one readiness each; those
    /// already armed stay so.
    pub fn want_traffic(&mut self, service: ServiceId, fds: &[BorrowedFd<'_>]) {
        let known = self.traffic.entry(service).or_default();
        let event = || {
            EpollEvent::new(
                EpollFlags::EPOLLIN | EpollFlags::EPOLLONESHOT,
                Token::Traffic(service).encode(),
            )
        };
        for fd in fds {
            let raw = fd.as_raw_fd();
            let result = match known.get(&raw) {
                Some(true) => continue,
                Some(false) => self.epoll.modify(fd.as_fd(), &mut event()),
                None => self.epoll.add(fd.as_fd(), event()),
            };
            match result {
                Ok(()) => {
                    known.insert(raw, true);
                }
                // Registered before under this number (a socket closed and
                // replaced, or a one shot that fired): arm it again.
                Err(nix::errno::Errno::EEXIST) => {
                    if self.epoll.modify(fd.as_fd(), &mut event()).is_ok() {
                        known.insert(raw, true);
                    }
                }
                Err(nix::errno::Errno::ENOENT) => {
                    if self.epoll.add(fd.as_fd(), event()).is_ok() {
                        known.insert(raw, true);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot watch a listener for traffic"),
            }
        }
    }

    /// Waits up to `timeout_ms` and returns the ready tokens (a traffic
    /// token once per service), with traffic listeners disarmed.
    pub fn wait(&mut self, timeout_ms: u16) -> Vec<Token> {
        let mut events = [EpollEvent::empty(); 64];
        let n = match self.epoll.wait(&mut events, EpollTimeout::from(timeout_ms)) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => 0,
            Err(e) => {
                tracing::warn!(error = %e, "epoll_wait failed");
                0
            }
        };
        let mut ready = Vec::new();
        for ev in &events[..n] {
            let Some(token) = Token::decode(ev.data()) else {
                continue;
            };
            if let Token::Traffic(s) = token {
                // One shot: every listener of the service is disarmed (the
                // event does not say which fired); `want_traffic` re-arms.
                if let Some(fds) = self.traffic.get_mut(&s) {
                    fds.values_mut().for_each(|armed| *armed = false);
                }
            }
            if !ready.contains(&token) {
                ready.push(token);
            }
        }
        ready
    }

    /// Forgets a service's listeners (the service is gone or its sockets
    /// were replaced); they are taken out before the fds close.
    pub fn forget_traffic(&mut self, service: ServiceId, fds: &[BorrowedFd<'_>]) {
        for fd in fds {
            let _ = self.epoll.delete(fd.as_fd());
        }
        self.traffic.remove(&service);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_survive_their_encoding() {
        let service = ServiceId::from_raw(u32::MAX);
        for token in [
            Token::Signal,
            Token::Notify(service),
            Token::Output((1 << KIND_SHIFT) - 1),
            Token::MainPid {
                service,
                pid: 4_194_304,
            },
            Token::MainPid {
                service: ServiceId::from_raw(7),
                pid: 2,
            },
        ] {
            assert_eq!(Token::decode(token.encode()), Some(token));
        }
    }
}
