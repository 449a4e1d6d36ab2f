//! Senders judged by cgroup: real senders (Debian's systemd-notify) in real
//! cgroups, and the NotifyAccess table.

use std::os::unix::net::UnixDatagram;

use super::*;
use crate::cgroup::testing::{self, test_cgroup_or_skip};
use crate::cgroup::Cgroup;
use crate::unit::NotifyAccess;

fn socket() -> (tempfile::TempDir, NotifySocket) {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = NotifySocket::bind(dir.path(), "web").expect("bind the notify socket");
    (dir, sock)
}

fn wait_readable(sock: &NotifySocket) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(sock.as_fd(), PollFlags::POLLIN)];
    poll(&mut fds, PollTimeout::from(200u16)).expect("poll") > 0
}

/// `notify-access = all` for a service in `cgroups`, no process named.
fn all_in(cgroups: &[u64]) -> CgroupSenders<'_> {
    CgroupSenders {
        access: NotifyAccess::All,
        cgroups,
        main_pids: &[],
        spawned_pids: &[],
    }
}

/// `sh -c script` in `cg`, with NOTIFY_SOCKET set to `sock`.
fn shell_in(cg: &Cgroup, sock: &NotifySocket, script: &str) -> std::process::Child {
    testing::shell_in(cg, script, &[("NOTIFY_SOCKET", sock.path().as_os_str())])
}

#[test]
fn a_sender_is_the_services_when_it_is_in_the_services_cgroup() {
    let t = test_cgroup_or_skip!("notify");
    let own = t.get().create_child("1").unwrap();
    let other = t.get().create_child("other").unwrap();
    let (_dir, sock) = socket();
    let cgroups = [own.id()];
    let rule = all_in(&cgroups);
    // systemd-notify waits (BARRIER=1) until its message is read: alive then.
    // As root it speaks for its parent, the shell, which stays in the cgroup.
    for (cg, accepted) in [(&other, false), (&own, true)] {
        let mut sh = shell_in(cg, &sock, "systemd-notify --ready --status=hi; true");
        let mut got = Vec::new();
        // Read until it exits: its BARRIER=1 follows the message.
        while sh.try_wait().unwrap().is_none() {
            if wait_readable(&sock) {
                got.extend(sock.receive(&|s| rule.accepts(s)));
            }
        }
        assert!(sh.wait().unwrap().success());
        got.retain(|m| m.items != [Notification::Barrier]);
        if accepted {
            assert_eq!(got.len(), 1, "from the service's cgroup");
            assert_eq!(got[0].sender.cgroup, Some(own.id()));
            assert!(got[0].items.contains(&Notification::Ready));
        } else {
            assert!(got.is_empty(), "a sender in another cgroup was accepted");
        }
    }
}

#[test]
fn a_sender_that_has_exited_is_judged_by_the_cgroup_it_exited_in() {
    let t = test_cgroup_or_skip!("gone");
    let own = t.get().create_child("1").unwrap();
    let other = t.get().create_child("2").unwrap();
    let cgroups = [own.id()];
    let rule = all_in(&cgroups);
    for (from, in_service) in [(&own, true), (&other, false)] {
        let (_dir, sock) = socket();
        // --no-block: no barrier, so sender and shell are gone (reaped) first.
        let mut sh = shell_in(from, &sock, "systemd-notify --no-block --ready");
        assert!(sh.wait().unwrap().success());
        assert!(wait_readable(&sock) || wait_readable(&sock));
        let seen = std::cell::Cell::new(None);
        let got = sock.receive(&|s| {
            seen.set(Some(s));
            rule.accepts(s)
        });
        let Some(s) = seen.get() else {
            // The kernel gave no pidfd for the reaped sender: dropped.
            assert!(got.is_empty());
            continue;
        };
        match s.cgroup {
            // The kernel kept the cgroup it exited in (Linux 6.15+).
            Some(id) => {
                assert_eq!(id, from.id(), "{s:?}");
                assert_eq!(got.len(), usize::from(in_service), "{s:?}");
            }
            // An older kernel cannot say: refused.
            None => assert!(got.is_empty(), "{s:?}"),
        }
    }
}

#[test]
fn notify_access_decides_among_the_services_processes() {
    let sender = |pid, cgroup| Sender {
        pid,
        uid: 0,
        gid: 0,
        cgroup,
    };
    let cgroups = [10, 11];
    // (access, sender, accepted)
    #[rustfmt::skip]
    let cases = [
        (NotifyAccess::All, sender(100, Some(10)), true),
        (NotifyAccess::All, sender(999, Some(11)), true),
        (NotifyAccess::All, sender(100, Some(12)), false),
        (NotifyAccess::All, sender(100, None), false),
        (NotifyAccess::Main, sender(100, Some(10)), true),
        (NotifyAccess::Main, sender(200, Some(10)), false),
        (NotifyAccess::Main, sender(100, Some(12)), false),
        (NotifyAccess::Exec, sender(100, Some(10)), true),
        (NotifyAccess::Exec, sender(200, Some(10)), true),
        (NotifyAccess::Exec, sender(300, Some(10)), false),
        (NotifyAccess::None, sender(100, Some(10)), false),
    ];
    for (access, s, want) in cases {
        let rule = CgroupSenders {
            access,
            cgroups: &cgroups,
            main_pids: &[100],
            spawned_pids: &[200],
        };
        assert_eq!(rule.accepts(s), want, "{access:?} {s:?}");
    }
}

#[test]
fn a_raw_sender_in_the_cgroup_is_known_by_its_pidfd() {
    // This process sends: alive, so its cgroup is known, and it is ours.
    let (_dir, sock) = socket();
    let client = UnixDatagram::unbound().unwrap();
    client.send_to(b"READY=1", sock.path()).unwrap();
    assert!(wait_readable(&sock));
    let seen = std::cell::Cell::new(None);
    sock.receive(&|s| {
        seen.set(Some(s));
        true
    });
    let me = crate::pidfd::Pidfd::open(std::process::id() as i32).unwrap();
    match me.cgroup_id() {
        Ok(id) => assert_eq!(seen.get().unwrap().cgroup, Some(id)),
        Err(e) => panic!("PIDFD_GET_INFO: {e}"),
    }
}
