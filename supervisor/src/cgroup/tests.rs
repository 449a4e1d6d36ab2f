//! Against the real kernel: a fresh cgroup per test (see `testing`).

use super::testing::{eventually, shell_in, test_cgroup_or_skip, TestCgroup};
use super::*;
use std::process::Command;

#[test]
fn finds_the_cgroup2_mount_on_hybrid_and_pure_hosts() {
    let hybrid = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    assert_eq!(
        parse_mountinfo(hybrid),
        Some((PathBuf::from("/sys/fs/cgroup/unified"), "/".to_string()))
    );
    let pure = "29 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
    assert_eq!(
        parse_mountinfo(pure),
        Some((PathBuf::from("/sys/fs/cgroup"), "/".to_string()))
    );
    let escaped = "50 1 0:40 /sub /mnt/my\\040cg rw - cgroup2 none rw\n";
    assert_eq!(
        parse_mountinfo(escaped),
        Some((PathBuf::from("/mnt/my cg"), "/sub".to_string()))
    );
    assert_eq!(
        parse_mountinfo("31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n"),
        None
    );
    assert_eq!(
        cgroup_dir(Path::new("/mnt/my cg"), "/sub", "/sub/a/b"),
        PathBuf::from("/mnt/my cg/a/b")
    );
    assert_eq!(
        parse_proc_cgroup("4:memory:/x\n0::/system.slice/holdfast.service\n"),
        Some("/system.slice/holdfast.service")
    );
}

#[test]
fn parses_controllers_events_and_cpu_stat() {
    let c = Controllers::parse("cpuset cpu io memory hugetlb pids rdma misc\n");
    assert_eq!(c.to_string(), "memory pids cpu io");
    assert_eq!(
        Controllers::parse("hugetlb\n").to_string(),
        "none of memory, pids, cpu, io"
    );
    assert!(parse_populated("populated 1\nfrozen 0\n"));
    assert!(!parse_populated("populated 0\nfrozen 0\n"));
    assert_eq!(
        parse_cpu_usage("usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n"),
        Duration::from_micros(1500)
    );
}

/// Running (not gone, not a zombie waiting for its parent).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}

fn all_pids(cg: &Cgroup) -> Vec<i32> {
    let mut pids = cg.pids().unwrap();
    for c in cg.children().unwrap() {
        pids.extend(all_pids(&c));
    }
    pids
}

#[test]
fn a_setsid_double_fork_cannot_escape_cgroup_kill() {
    let t = test_cgroup_or_skip!("escape");
    let leaf = t.get().create_child("1").unwrap();
    let mut watch = t.get().watch().unwrap();
    let mut sh = shell_in(
        &leaf,
        "setsid sh -c 'sleep 300 & sleep 300' & sleep 300",
        &[],
    );
    assert!(
        eventually(5, || all_pids(t.get()).len() >= 4),
        "the shell, the setsid'd shell and two sleeps: {:?}",
        all_pids(t.get())
    );
    assert!(watch.populated().unwrap());
    let pids = all_pids(t.get());
    t.get().kill().unwrap();
    let _ = sh.wait();
    // The kernel says populated 0 through POLLPRI on cgroup.events.
    let mut pfd = libc::pollfd {
        fd: std::os::fd::AsRawFd::as_raw_fd(&watch.as_fd()),
        events: libc::POLLPRI,
        revents: 0,
    };
    assert!(
        eventually(5, || {
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, 100) };
            !watch.populated().unwrap()
        }),
        "still populated: {:?}",
        all_pids(t.get())
    );
    assert_ne!(pfd.revents & libc::POLLPRI, 0, "POLLPRI was raised");
    for pid in pids {
        assert!(!alive(pid), "pid {pid} survived");
    }
    leaf.remove().unwrap();
}

#[test]
fn signal_all_reaches_every_process_below_and_nothing_else() {
    let t = test_cgroup_or_skip!("signal");
    let leaf = t.get().create_child("1").unwrap();
    let mut sh = shell_in(&leaf, "setsid sleep 300 & exec sleep 300", &[]);
    let mut outside = Command::new("sleep").arg("300").spawn().unwrap();
    assert!(eventually(5, || all_pids(t.get()).len() == 2));
    assert_eq!(t.get().signal_all(Signal::SIGTERM).unwrap(), 2);
    let status = sh.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGTERM));
    assert!(eventually(5, || !t.get().populated().unwrap()));
    assert_eq!(
        outside.try_wait().unwrap(),
        None,
        "a process outside was hit"
    );
    outside.kill().unwrap();
    outside.wait().unwrap();
}

#[test]
fn holdfast_moves_into_its_leaf_and_service_cgroups_get_the_controllers() {
    let t = test_cgroup_or_skip!("hier");
    // A stand-in for holdfast, running in the root it is given.
    let mut stand_in = shell_in(t.get(), "exec sleep 300", &[]);
    let root = Cgroup::open(t.get().path()).unwrap();
    let h = Hierarchy::take(root, false).unwrap();
    let leaf = h.supervisor().expect("moved into the supervisor leaf");
    assert_eq!(leaf.path(), t.get().path().join(SUPERVISOR_LEAF));
    assert_eq!(leaf.pids().unwrap(), vec![stand_in.id() as i32]);
    assert!(t.get().pids().unwrap().is_empty());
    // What the root could hand down, it now does.
    let available = t.get().controllers().unwrap();
    assert_eq!(h.enabled(), &available);
    let web = h.service("web").unwrap();
    assert_eq!(web.path(), t.get().path().join("web.service"));
    assert_eq!(&web.controllers().unwrap(), h.enabled());
    stand_in.kill().unwrap();
    stand_in.wait().unwrap();
}

#[test]
fn a_limit_without_its_controller_is_an_error_naming_the_key() {
    let t = test_cgroup_or_skip!("nolimit");
    // A child of a cgroup that enables nothing for it has no controllers.
    let bare = t.get().create_child("bare").unwrap();
    assert_eq!(bare.controllers().unwrap(), Controllers::default());
    for (limits, key) in [
        (
            CgroupLimits {
                memory_max: Some(Limit::Value(1 << 20)),
                ..Default::default()
            },
            "memory-max",
        ),
        (
            CgroupLimits {
                tasks_max: Some(Limit::Value(20)),
                ..Default::default()
            },
            "tasks-max",
        ),
        (
            CgroupLimits {
                cpu_quota: Some(50),
                ..Default::default()
            },
            "cpu-quota",
        ),
        (
            CgroupLimits {
                io_weight: Some(10),
                ..Default::default()
            },
            "io-weight",
        ),
    ] {
        let err = bare.apply_limits(&limits).unwrap_err();
        assert!(
            matches!(err, CgroupError::MissingController { key: k, .. } if k == key),
            "{err}"
        );
        assert!(err.to_string().starts_with(&format!("{key}: ")), "{err}");
    }
    // Nothing asked for: nothing to refuse.
    bare.apply_limits(&CgroupLimits::default()).unwrap();
}

/// A service cgroup `name` of a test hierarchy with `limits` applied, when
/// this host's cgroup2 has `wanted` for children. Otherwise (the reason
/// printed) checks that applying them fails naming `key`, and `None`.
fn limited_service(
    t: &TestCgroup,
    wanted: Controller,
    limits: &CgroupLimits,
    name: &str,
    key: &str,
) -> Option<Cgroup> {
    let h = Hierarchy::take(Cgroup::open(t.get().path()).unwrap(), false).unwrap();
    if !h.enabled().contains(wanted) {
        // Not a skip of the test's point: the error path is what this host can show.
        eprintln!(
            "{wanted} is not available in cgroup2 here ({}); checked the error instead",
            h.enabled()
        );
        drop(h);
        let err = h_service(t).apply_limits(limits).unwrap_err();
        assert!(err.to_string().starts_with(&format!("{key}: ")), "{err}");
        return None;
    }
    let svc = h.service(name).unwrap();
    svc.apply_limits(limits).unwrap();
    Some(svc)
}

#[test]
fn tasks_max_holds_a_fork_bomb() {
    let t = test_cgroup_or_skip!("bomb");
    let limits = CgroupLimits {
        tasks_max: Some(Limit::Value(20)),
        ..Default::default()
    };
    let Some(svc) = limited_service(&t, Controller::Pids, &limits, "bomb", "tasks-max") else {
        return;
    };
    assert_eq!(svc.read("pids.max").unwrap().trim(), "20");
    let leaf = svc.create_child("1").unwrap();
    let mut sh = shell_in(&leaf, "b() { b & b & wait; }; b", &[]);
    std::thread::sleep(Duration::from_secs(2));
    let current: u64 = svc.read("pids.current").unwrap().trim().parse().unwrap();
    assert!(current <= 20, "{current} tasks");
    let events = svc.read("pids.events").unwrap();
    assert!(!events.contains("max 0"), "the limit was hit: {events}");
    // holdfast (this process) still forks fine.
    assert!(Command::new("true").status().unwrap().success());
    svc.kill().unwrap();
    let _ = sh.wait();
    assert!(eventually(10, || !svc.populated().unwrap()));
}

/// A service cgroup of a hierarchy at `t` (whatever it enables).
fn h_service(t: &TestCgroup) -> Cgroup {
    Hierarchy::take(Cgroup::open(t.get().path()).unwrap(), false)
        .unwrap()
        .service("svc")
        .unwrap()
}

#[test]
fn memory_max_is_written_and_enforced() {
    let t = test_cgroup_or_skip!("mem");
    let limits = CgroupLimits {
        memory_max: Some(Limit::Value(32 << 20)),
        memory_high: Some(Limit::Value(24 << 20)),
        ..Default::default()
    };
    let Some(svc) = limited_service(&t, Controller::Memory, &limits, "mem", "memory-max") else {
        return;
    };
    assert_eq!(
        svc.read("memory.max").unwrap().trim(),
        (32u64 << 20).to_string()
    );
    assert_eq!(
        svc.read("memory.high").unwrap().trim(),
        (24u64 << 20).to_string()
    );
    let leaf = svc.create_child("1").unwrap();
    // 64 MiB in a shell variable: more than memory-max allows.
    let mut sh = shell_in(
        &leaf,
        "x=$(head -c 67108864 /dev/zero | tr '\\0' a); echo ${#x}",
        &[],
    );
    let status = sh.wait().unwrap();
    assert!(!status.success(), "the OOM killer ended it");
    let events = svc.read("memory.events").unwrap();
    assert!(!events.contains("oom_kill 0"), "{events}");
    // Dropping the keys resets the files.
    svc.apply_limits(&CgroupLimits::default()).unwrap();
    assert_eq!(svc.read("memory.max").unwrap().trim(), "max");
}

#[test]
fn cpu_usage_is_read_from_cpu_stat() {
    let t = test_cgroup_or_skip!("usage");
    let leaf = t.get().create_child("1").unwrap();
    let before = t.get().usage().unwrap().cpu;
    let mut sh = shell_in(
        &leaf,
        "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done",
        &[],
    );
    sh.wait().unwrap();
    let after = t.get().usage().unwrap().cpu;
    assert!(
        after > before + Duration::from_millis(10),
        "{before:?} → {after:?}"
    );
}

#[test]
fn the_default_root_is_holdfasts_own_cgroup_only_when_it_is_alone_there() {
    let mount = Path::new("/sys/fs/cgroup");
    let own = Path::new("/sys/fs/cgroup/system.slice/holdfast.service");
    // Alone (systemd with Delegate=yes, a container): its own cgroup.
    assert_eq!(
        default_root(mount, own, &[42], 42),
        (own.to_path_buf(), false)
    );
    // Beside a shell or other daemons: a child of its own, made by it.
    assert_eq!(
        default_root(mount, own, &[7, 42], 42),
        (own.join("holdfast-42"), true)
    );
    // Already in the leaf an earlier holdfast of this pid moved it to.
    assert_eq!(
        default_root(mount, &own.join(SUPERVISOR_LEAF), &[42], 42),
        (own.to_path_buf(), false)
    );
    // The hierarchy's root is never vacated.
    assert_eq!(
        default_root(mount, mount, &[42], 42),
        (mount.join("holdfast-42"), true)
    );
}

#[test]
fn cgroup_paths_and_directories_round_trip() {
    let Some(dir) = own_cgroup_dir() else {
        assert!(std::env::var_os("CI").is_none(), "no cgroup2 mount");
        return;
    };
    let path = path_of(&dir).expect("under the mount");
    assert!(path.starts_with('/'), "{path}");
    assert_eq!(dir_of(&path), Some(dir));
    // A recorded path cannot lead out of the cgroup2 mount.
    assert_eq!(dir_of("/../../etc"), None);
    assert_eq!(dir_of("/a/../../b"), None);
}
