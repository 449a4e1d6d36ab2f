//! The `[service]` keys about processes: values in systemd's syntax, the
//! mistakes with their words, and random values for the round-trip tests.

use super::*;
use pretty_assertions::assert_eq;

fn service(keys: &str) -> Result<ServiceConfig, Diagnostics> {
    let text = format!("[service]\nexec = [\"x\"]\n{keys}\n[[socket]]\nports = [\"80\"]\naddresses = [\"127.0.0.1\"]\n");
    parse_unit("svc", Path::new("svc.toml"), &text).map(|u| u.service)
}

#[test]
fn systemd_defaults_for_process_keys() {
    let simple = service("").unwrap();
    assert_eq!(simple.process.notify_access, NotifyAccess::None);
    assert_eq!(simple.process.kill_signal, KillSignal::TERM);
    assert_eq!(simple.process.rlimits, Rlimits::default());
    assert!(simple.process.cgroup_limits.is_empty());
    assert!(!simple.process.non_blocking);
    assert_eq!(simple.process.standard_input, StandardInput::Null);
    assert_eq!(simple.process.standard_output, StandardOutput::Log);
    assert_eq!(simple.process.umask, 0o022, "systemd's UMask= default");
    assert!(simple.process.supplementary_groups.is_empty());
    assert!(!simple.process.no_new_privileges);
    assert!(simple.process.environment_files.is_empty());
    let notify = service("type = \"notify\"").unwrap();
    assert_eq!(notify.process.notify_access, NotifyAccess::Main);
    // StandardOutput=inherit: the socket when stdin is.
    let inetd = service("standard-input = \"socket\"").unwrap();
    assert_eq!(inetd.process.standard_output, StandardOutput::Socket);
    let split = service("standard-input = \"socket\"\nstandard-output = \"log\"").unwrap();
    assert_eq!(split.process.standard_output, StandardOutput::Log);
}

#[test]
fn process_keys_in_systemd_syntax() {
    let s = service(
        "notify-access = \"all\"\nkill-signal = \"INT\"\nlimit-nofile = \"1024:65536\"\nlimit-nproc = 512\nlimit-core = \"infinity\"\nlimit-memlock = \"64M:1G\"\nmemory-max = \"512M\"\nmemory-high = 268435456\ntasks-max = \"infinity\"\ncpu-quota = \"150%\"\ncpu-weight = 200\nio-weight = 1\nnon-blocking = true",
    )
    .unwrap();
    assert_eq!(s.process.notify_access, NotifyAccess::All);
    assert_eq!(s.process.kill_signal, KillSignal(libc::SIGINT));
    let r = |soft, hard| Some(Rlimit { soft, hard });
    assert_eq!(
        s.process.rlimits,
        Rlimits {
            nofile: r(1024, 65536),
            nproc: r(512, 512),
            core: r(Rlimit::INFINITY, Rlimit::INFINITY),
            memlock: r(64 << 20, 1 << 30),
        }
    );
    assert_eq!(
        s.process.cgroup_limits,
        CgroupLimits {
            memory_max: Some(Limit::Value(512 << 20)),
            memory_high: Some(Limit::Value(256 << 20)),
            tasks_max: Some(Limit::Infinity),
            cpu_quota: Some(150),
            cpu_weight: Some(200),
            io_weight: Some(1),
        }
    );
    assert!(s.process.non_blocking);
    assert_eq!(
        service("kill-signal = \"SIGKILL\"")
            .unwrap()
            .process
            .kill_signal,
        KillSignal(9)
    );
    assert_eq!(
        service("kill-signal = 3").unwrap().process.kill_signal,
        KillSignal(3)
    );
}

#[test]
fn exec_keys_in_systemd_syntax() {
    let s = service(
        "umask = \"0077\"\nsupplementary-groups = [\"adm\", \"44\"]\nno-new-privileges = true\nenvironment-file = [\"/etc/default/web\", \"-/etc/web.env\"]",
    )
    .unwrap();
    assert_eq!(s.process.umask, 0o077);
    assert_eq!(s.process.supplementary_groups, ["adm", "44"]);
    assert!(s.process.no_new_privileges);
    let file = |path: &str, optional| EnvironmentFile {
        path: PathBuf::from(path),
        optional,
    };
    assert_eq!(
        s.process.environment_files,
        [file("/etc/default/web", false), file("/etc/web.env", true)]
    );
    assert_eq!(service("umask = 0o027").unwrap().process.umask, 0o027);
    assert_eq!(service("umask = \"0\"").unwrap().process.umask, 0);
}

#[test]
fn process_key_mistakes_are_placed_and_explained() {
    #[rustfmt::skip]
    let cases: &[(&str, Expect<'_>)] = &[
        ("notify-access = \"main-pid\"", (3, 17, "service.notify-access", "unknown value \"main-pid\"", "\"main\", \"exec\", \"all\", \"none\"")),
        ("kill-signal = \"SIGFOO\"", (3, 15, "service.kill-signal", "\"SIGFOO\" is not a signal", "\"SIGTERM\"")),
        ("kill-signal = \"STOP\"", (3, 15, "service.kill-signal", "not a signal that can stop a process", "\"SIGINT\"")),
        ("kill-signal = 99", (3, 15, "service.kill-signal", "99 is not a signal number", "\"SIGTERM\"")),
        ("limit-nofile = \"65536:1024\"", (3, 16, "service.limit-nofile", "soft limit in \"65536:1024\" is above the hard limit", "soft <= hard")),
        ("limit-nofile = \"lots\"", (3, 16, "service.limit-nofile", "\"lots\" is not a limit", "\"1024:65536\"")),
        ("limit-nofile = \"1K\"", (3, 16, "service.limit-nofile", "\"1K\" is not a limit", "65536")),
        ("limit-core = \"1X\"", (3, 14, "service.limit-core", "\"1X\" is not a limit", "\"64M\"")),
        ("limit-nproc = true", (3, 15, "service.limit-nproc", "expected a number or a string", "1024:65536")),
        ("memory-max = \"1.5G\"", (3, 14, "service.memory-max", "\"1.5G\" is not a limit", "\"512M\"")),
        ("memory-max = \"99999999999T\"", (3, 14, "service.memory-max", "is not a limit", "powers of 1024")),
        ("memory-high = 0", (3, 15, "service.memory-high", "0 is not a limit", "\"infinity\"")),
        ("tasks-max = \"20M\"", (3, 13, "service.tasks-max", "\"20M\" is not a limit", "number of tasks")),
        ("cpu-quota = 50", (3, 13, "service.cpu-quota", "expected a percentage string", "\"50%\"")),
        ("cpu-quota = \"0%\"", (3, 13, "service.cpu-quota", "between 1% and 100000%", "\"200%\"")),
        ("cpu-weight = 0", (3, 14, "service.cpu-weight", "0 is outside 1-10000", "e.g. 100")),
        ("io-weight = 10001", (3, 13, "service.io-weight", "10001 is outside 1-10000", "")),
        ("non-blocking = \"yes\"", (3, 16, "service.non-blocking", "expected a boolean", "non-blocking = true")),
        ("standard-input = \"tty\"", (3, 18, "service.standard-input", "unknown value \"tty\"", "\"null\", \"socket\"")),
        ("standard-output = \"journal\"", (3, 19, "service.standard-output", "unknown value \"journal\"", "\"log\", \"socket\"")),
        ("umask = 22", (3, 9, "service.umask", "umask 22 is not octal", "write 0o22 or \"022\"")),
        ("umask = \"0800\"", (3, 9, "service.umask", "\"0800\" is not an octal umask", "\"0022\"")),
        ("umask = \"1777\"", (3, 9, "service.umask", "umask \"1777\" is more than 0o777", "\"0027\"")),
        ("umask = true", (3, 9, "service.umask", "expected an octal umask", "\"0022\"")),
        ("supplementary-groups = \"adm\"", (3, 24, "service.supplementary-groups", "expected an array", "[\"adm\", \"44\"]")),
        ("supplementary-groups = [\"adm\", \"a:b\"]", (3, 32, "service.supplementary-groups[1]", "\"a:b\" contains ':'", "\"adm\" or \"33\"")),
        ("supplementary-groups = [\"adm\", \"adm\"]", (3, 32, "service.supplementary-groups[1]", "adm is listed twice", "remove one")),
        ("supplementary-groups = [\"99999999999\"]", (3, 25, "service.supplementary-groups[0]", "id 99999999999 is too large", "")),
        ("no-new-privileges = 1", (3, 21, "service.no-new-privileges", "expected a boolean", "no-new-privileges = true")),
        ("environment-file = \"/etc/default/web\"", (3, 20, "service.environment-file", "expected an array", "-/etc/web.env")),
        ("environment-file = [\"etc/web.env\"]", (3, 21, "service.environment-file[0]", "environment file \"etc/web.env\" is not an absolute path", "\"/etc/web.env\"")),
        ("environment-file = [\"-web.env\"]", (3, 21, "service.environment-file[0]", "\"-web.env\" is not an absolute path", "\"-/web.env\"")),
        ("environment-file = [1]", (3, 21, "service.environment-file[0]", "expected a string", "\"/etc/default/web\"")),
    ];
    assert_each_mistake(service, cases);
    // Socket stdio needs a socket.
    #[rustfmt::skip]
    assert_each_mistake(unit_file, &[(
        "[service]\nexec = [\"x\"]\nstandard-input = \"socket\"\n",
        (3, 18, "service.standard-input", "standard-input = \"socket\" needs a socket, and this unit has none", "add a [[socket]]"),
    )]);
}

/// Random values for every process key (socket stdio only with a socket).
pub(super) fn randomize(s: &mut ServiceConfig, rng: &mut Rng, has_socket: bool) {
    s.process.notify_access = *rng.pick(&[
        NotifyAccess::None,
        NotifyAccess::Main,
        NotifyAccess::Exec,
        NotifyAccess::All,
    ]);
    s.process.kill_signal = KillSignal(*rng.pick(&[1, 2, 3, 9, 10, 15]));
    let rlimit = |rng: &mut Rng| {
        rng.chance().then(|| {
            let hard = *rng.pick(&[0, 1, 1024, 1 << 40, Rlimit::INFINITY]);
            let soft = if rng.chance() { hard } else { hard / 2 };
            Rlimit { soft, hard }
        })
    };
    s.process.rlimits = Rlimits {
        nofile: rlimit(rng),
        nproc: rlimit(rng),
        core: rlimit(rng),
        memlock: rlimit(rng),
    };
    let limit = |rng: &mut Rng| {
        *rng.pick(&[
            None,
            Some(Limit::Infinity),
            Some(Limit::Value(1)),
            Some(Limit::Value(1 << 33)),
        ])
    };
    s.process.cgroup_limits = CgroupLimits {
        memory_max: limit(rng),
        memory_high: limit(rng),
        tasks_max: limit(rng),
        cpu_quota: rng.chance().then(|| 1 + rng.below(100_000) as u32),
        cpu_weight: rng.chance().then(|| 1 + rng.below(10_000) as u32),
        io_weight: rng.chance().then(|| 1 + rng.below(10_000) as u32),
    };
    s.process.non_blocking = rng.chance();
    s.process.umask = rng.below(0o1000) as u32;
    s.process.supplementary_groups = ["adm", "44", "nogroup"]
        .into_iter()
        .filter(|_| rng.chance())
        .map(String::from)
        .collect();
    s.process.no_new_privileges = rng.chance();
    s.process.environment_files = (0..rng.below(3))
        .map(|i| EnvironmentFile {
            path: PathBuf::from(format!("/etc/{i}{}", rng.text("ab. é-", 8))),
            optional: rng.chance(),
        })
        .collect();
    if has_socket {
        s.process.standard_input = *rng.pick(&[StandardInput::Null, StandardInput::Socket]);
        s.process.standard_output = *rng.pick(&[StandardOutput::Log, StandardOutput::Socket]);
    }
}
