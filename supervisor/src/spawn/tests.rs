//! Real children: what each one sees of its fds, session, cgroup, limits and
//! environment, read from inside it.

use super::*;
use crate::cgroup::testing::{eventually, test_cgroup_or_skip};
use crate::pidfd::Exit;
use crate::unit::Rlimit;
use std::os::fd::AsFd;

/// What a test changes from the defaults.
struct Opts<'f> {
    fds: Vec<(BorrowedFd<'f>, &'f str)>,
    sockets: usize,
    cgroup: Option<BorrowedFd<'f>>,
    rlimits: Rlimits,
    non_blocking: bool,
    working_directory: Option<&'f Path>,
    env: Vec<(String, OsString)>,
    credentials: Option<&'f Credentials>,
    setup: Setup,
    how: ForkMethod,
}

fn opts<'f>() -> Opts<'f> {
    Opts {
        fds: Vec::new(),
        sockets: 0,
        cgroup: None,
        rlimits: Rlimits::default(),
        non_blocking: false,
        working_directory: None,
        env: Vec::new(),
        credentials: None,
        setup: Setup::default(),
        how: ForkMethod::Clone3,
    }
}

fn wait(pidfd: &Pidfd) -> Exit {
    let mut exit = None;
    assert!(eventually(10, || {
        exit = pidfd.try_wait().unwrap();
        exit.is_some()
    }));
    exit.unwrap()
}

fn read_all(fd: &OwnedFd) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match nix::unistd::read(fd.as_raw_fd(), &mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(nix::errno::Errno::EAGAIN) => {
                std::thread::sleep(std::time::Duration::from_millis(5))
            }
            Err(e) => panic!("{e}"),
        }
    }
    String::from_utf8(out).unwrap()
}

/// Runs `sh -c script` with `o`; its stdout, how it ended, its pid.
fn run_sh(script: &str, o: Opts<'_>) -> Result<(String, Exit, i32), SpawnError> {
    let (out_r, out_w) = output_pipe().unwrap();
    let (_err_r, err_w) = output_pipe().unwrap();
    let argv = vec!["sh".to_string(), "-c".to_string(), script.to_string()];
    let program = PathBuf::from("/bin/sh");
    let cmd = Command {
        fds: o.fds,
        sockets: o.sockets,
        stderr: err_w.as_fd(),
        working_directory: o.working_directory,
        cgroup: o.cgroup,
        rlimits: o.rlimits,
        non_blocking: o.non_blocking,
        env: o.env,
        credentials: o.credentials,
        ..command(&program, &argv, out_w.as_fd())
    };
    let spawned = spawn_with(&cmd, &o.setup, o.how)?;
    drop(cmd);
    drop(out_w);
    drop(err_w);
    let out = read_all(&out_r);
    let exit = wait(&spawned.pidfd);
    Ok((out, exit, spawned.pid.as_raw()))
}

#[test]
fn resolves_through_path() {
    let p = resolve_program("sh", Some(OsStr::new("/nonexistent:/bin"))).unwrap();
    assert_eq!(p, PathBuf::from("/bin/sh"));
    assert!(resolve_program("no-such-program-here", Some(OsStr::new("/bin"))).is_err());
    assert_eq!(resolve_program("./x", None).unwrap(), PathBuf::from("./x"));
}

#[test]
fn child_sees_listen_vars_systemd_env_and_only_its_fds_in_slash() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut o = opts();
    o.fds = vec![(listener.as_fd(), "web")];
    o.sockets = 1;
    let (out, exit, pid) = run_sh(
        "echo $LISTEN_FDS $LISTEN_FDNAMES $LISTEN_PID $$; ls /proc/self/fd | sort -n | tr '\\n' ' '; echo; pwd; echo $PATH; echo $INVOCATION_ID",
        o,
    )
    .unwrap();
    assert_eq!(exit, Exit::Code(0));
    let mut lines = out.lines();
    let first: Vec<&str> = lines.next().unwrap().split(' ').collect();
    assert_eq!(first[0], "1");
    assert_eq!(first[1], "web");
    assert_eq!(first[2], first[3], "LISTEN_PID is the child's pid");
    assert_eq!(first[2], pid.to_string());
    // 0-2, the socket on 3, and the fd `ls` itself opens on /proc/self/fd.
    assert_eq!(lines.next().unwrap().trim(), "0 1 2 3 4");
    assert_eq!(
        lines.next().unwrap(),
        "/",
        "the working directory defaults to /"
    );
    assert_eq!(lines.next().unwrap(), DEFAULT_PATH);
    let id = lines.next().unwrap();
    assert_eq!(id.len(), 32, "{id}");
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
}

/// The child gets exactly its fds whether they fit the low slots (it then
/// copies only the bottom of our fd table) or not (it copies all of it), and
/// no fd of ours without CLOEXEC, however high; the slots are put back, so
/// the output pipe sees EOF (`run_sh` reads to it).
#[test]
fn only_its_fds_whether_they_fit_the_low_slots_or_not() {
    // SAFETY: dup of stdin (always open: ensure_stdio) to a free fd without
    // CLOEXEC, above everything else; closed by the OwnedFd.
    let stray = unsafe { OwnedFd::from_raw_fd(libc::fcntl(0, libc::F_DUPFD, 900)) };
    assert!(stray.as_raw_fd() >= 900);
    for n in [5, slots::SLOTS + 8] {
        let listeners: Vec<std::net::TcpListener> = (0..n)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let mut o = opts();
        o.fds = listeners.iter().map(|l| (l.as_fd(), "s")).collect();
        o.sockets = n;
        let (out, exit, _) = run_sh("ls /proc/self/fd | sort -n | tr '\\n' ' '", o).unwrap();
        assert_eq!(exit, Exit::Code(0));
        // 0-2, the sockets, and the fd `ls` itself opens on /proc/self/fd.
        let want: Vec<String> = (0..n + 4).map(|fd| fd.to_string()).collect();
        assert_eq!(out.trim(), want.join(" "), "{n} sockets");
    }
    drop(stray);
}

#[test]
fn watchdog_pid_is_the_childs_own_pid_beside_watchdog_usec() {
    let (out_r, out_w) = output_pipe().unwrap();
    let program = PathBuf::from("/bin/sh");
    let script = "echo $$ ${WATCHDOG_PID-unset} ${WATCHDOG_USEC-unset}";
    let argv = vec!["sh".to_string(), "-c".to_string(), script.to_string()];
    for (env, want_pid) in [
        (vec![("WATCHDOG_USEC".to_string(), "5000000".into())], true),
        (vec![], false),
    ] {
        let cmd = Command {
            env,
            ..command(&program, &argv, out_w.as_fd())
        };
        let spawned = spawn(&cmd).unwrap();
        assert_eq!(wait(&spawned.pidfd), Exit::Code(0));
        let mut line = String::new();
        assert!(eventually(5, || {
            let mut buf = [0u8; 256];
            if let Ok(n) = nix::unistd::read(out_r.as_raw_fd(), &mut buf) {
                line.push_str(std::str::from_utf8(&buf[..n]).unwrap());
            }
            line.ends_with('\n')
        }));
        let words: Vec<&str> = line.split_whitespace().collect();
        if want_pid {
            assert_eq!(
                words,
                [
                    spawned.pid.as_raw().to_string().as_str(),
                    words[0],
                    "5000000"
                ]
            );
            assert_eq!(words[1], words[0], "WATCHDOG_PID is the child's pid");
        } else {
            assert_eq!(&words[1..], ["unset", "unset"]);
        }
    }
}

#[test]
fn exec_failure_is_reported_by_both_methods() {
    for how in [ForkMethod::Clone3, ForkMethod::Fork] {
        let (_r, w) = output_pipe().unwrap();
        let program = PathBuf::from("/nonexistent/program");
        let argv = vec!["x".to_string()];
        let cmd = command(&program, &argv, w.as_fd());
        match spawn_with(&cmd, &Setup::default(), how) {
            Err(SpawnError::Child { stage, source }) => {
                assert_eq!(stage, "execve");
                assert_eq!(source.raw_os_error(), Some(libc::ENOENT));
            }
            other => panic!("expected an execve failure, got {other:?}"),
        }
    }
}

#[test]
fn each_child_leads_its_own_session() {
    let (out, _, pid) = run_sh("cat /proc/$$/stat", opts()).unwrap();
    // After "(comm) ": state, ppid, pgrp, session.
    let fields: Vec<&str> = out.rsplit_once(") ").unwrap().1.split(' ').collect();
    assert_eq!(fields[2], pid.to_string(), "process group");
    assert_eq!(fields[3], pid.to_string(), "session");
    let ours = std::fs::read_to_string("/proc/self/stat").unwrap();
    let ours: Vec<&str> = ours.rsplit_once(") ").unwrap().1.split(' ').collect();
    assert_ne!(fields[3], ours[3], "not holdfast's session");
}

#[test]
fn the_child_starts_in_its_cgroup_by_both_methods() {
    let t = test_cgroup_or_skip!("spawn");
    for (how, leaf) in [(ForkMethod::Clone3, "clone3"), (ForkMethod::Fork, "fork")] {
        let cg = t.get().create_child(leaf).unwrap();
        let mut o = opts();
        o.cgroup = Some(cg.as_fd());
        o.how = how;
        let (out, exit, _) = run_sh("cat /proc/self/cgroup", o).unwrap();
        assert_eq!(exit, Exit::Code(0));
        let path = crate::cgroup::parse_proc_cgroup(&out).unwrap().trim();
        let want = format!(
            "/{}/{leaf}",
            t.get().path().file_name().unwrap().to_str().unwrap()
        );
        assert!(path.ends_with(&want), "{how:?}: {path} is not …{want}");
    }
}

#[test]
fn rlimits_are_what_the_child_sees() {
    let mut o = opts();
    o.rlimits = Rlimits {
        nofile: Some(Rlimit {
            soft: 1234,
            hard: 2345,
        }),
        // Below this host's hard limits: raising one needs CAP_SYS_RESOURCE.
        nproc: Some(Rlimit {
            soft: 3000,
            hard: 5000,
        }),
        core: Some(Rlimit { soft: 0, hard: 0 }),
        memlock: Some(Rlimit {
            soft: 4 << 20,
            hard: 8 << 20,
        }),
    };
    let (out, exit, _) = run_sh("cat /proc/self/limits", o).unwrap();
    assert_eq!(exit, Exit::Code(0));
    let row = |name: &str| -> Vec<String> {
        let line = out.lines().find(|l| l.starts_with(name)).unwrap();
        line[name.len()..]
            .split_whitespace()
            .take(2)
            .map(str::to_string)
            .collect()
    };
    assert_eq!(row("Max open files"), ["1234", "2345"]);
    assert_eq!(row("Max processes"), ["3000", "5000"]);
    assert_eq!(row("Max core file size"), ["0", "0"]);
    assert_eq!(row("Max locked memory"), ["4194304", "8388608"]);
}

#[test]
fn an_rlimit_the_kernel_refuses_names_its_key() {
    let mut o = opts();
    // Above the hard limit we run with (raising it needs CAP_SYS_RESOURCE,
    // and the kernel caps nofile at fs.nr_open in any case).
    o.rlimits.nofile = Some(Rlimit {
        soft: Rlimit::INFINITY,
        hard: Rlimit::INFINITY,
    });
    match run_sh("true", o) {
        Err(e @ SpawnError::Child { .. }) => {
            assert_eq!(
                e.to_string(),
                "setrlimit for limit-nofile failed in the child: Operation not permitted (os error 1)"
            );
        }
        other => panic!("expected a setrlimit failure, got {other:?}"),
    }
}

fn nonblocking(fd: BorrowedFd<'_>) -> bool {
    let flags = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL).unwrap();
    flags & libc::O_NONBLOCK != 0
}

#[test]
fn o_nonblock_is_reset_on_every_spawn_on_sockets_only() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let stored = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    stored.set_nonblocking(true).unwrap();
    // What "flags:" in the child's fdinfo says of fd 3 (octal).
    let script = "sed -n 's/^flags:[[:space:]]*//p' /proc/self/fdinfo/3";
    for (before, want) in [(true, false), (false, true), (false, false), (true, true)] {
        listener.set_nonblocking(before).unwrap();
        let mut o = opts();
        o.fds = vec![(listener.as_fd(), "web"), (stored.as_fd(), "stored")];
        o.sockets = 1;
        o.non_blocking = want;
        let (out, _, _) = run_sh(script, o).unwrap();
        let flags = i32::from_str_radix(out.trim(), 8).unwrap();
        assert_eq!(flags & libc::O_NONBLOCK != 0, want, "child saw flags {out}");
        // The open file is shared: holdfast's copy says the same.
        assert_eq!(nonblocking(listener.as_fd()), want);
        assert!(nonblocking(stored.as_fd()), "an fd-store fd is left alone");
    }
}

#[test]
fn the_socket_as_stdin_and_stdout() {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    theirs.set_nonblocking(true).unwrap();
    let (_err_r, err_w) = output_pipe().unwrap();
    let (_out_r, out_w) = output_pipe().unwrap();
    let argv = vec![
        "sh".to_string(),
        "-c".to_string(),
        "read line; echo got:$line; readlink /proc/self/fd/0 /proc/self/fd/3".to_string(),
    ];
    let program = PathBuf::from("/bin/sh");
    let mut cmd = Command {
        fds: vec![(theirs.as_fd(), "tftp")],
        sockets: 1,
        stderr: err_w.as_fd(),
        standard_input: StandardInput::Socket,
        standard_output: StandardOutput::Socket,
        ..command(&program, &argv, out_w.as_fd())
    };
    let spawned = spawn(&cmd).unwrap();
    use std::io::{BufRead, Write};
    (&ours).write_all(b"ping\n").unwrap();
    let mut reader = std::io::BufReader::new(&ours);
    let mut lines = Vec::new();
    for _ in 0..3 {
        let mut l = String::new();
        reader.read_line(&mut l).unwrap();
        lines.push(l.trim().to_string());
    }
    assert_eq!(wait(&spawned.pidfd), Exit::Code(0));
    assert_eq!(lines[0], "got:ping");
    assert!(lines[1].starts_with("socket:["), "{lines:?}");
    assert_eq!(lines[1], lines[2], "stdin is the socket on fd 3");
    assert!(!nonblocking(theirs.as_fd()), "a socket stdin blocks");

    cmd.fds.clear();
    cmd.sockets = 0;
    assert!(matches!(spawn(&cmd), Err(SpawnError::NoSocketForStdio)));
}

#[test]
fn a_pidfd_never_signals_the_process_that_got_the_pid_next() {
    let (_r, w) = output_pipe().unwrap();
    let program = PathBuf::from("/bin/sleep");
    let argv = vec!["sleep".to_string(), "30".to_string()];
    let ours = spawn(&command(&program, &argv, w.as_fd())).unwrap();
    let pid = ours.pid.as_raw();
    ours.pidfd
        .signal(nix::sys::signal::Signal::SIGKILL)
        .unwrap();
    assert_eq!(wait(&ours.pidfd), Exit::Signal(libc::SIGKILL));
    // Reaped: hand its pid to a stranger (ns_last_pid = pid - 1, then fork;
    // other processes fork too, so try a few times).
    let mut stranger = None;
    for _ in 0..100 {
        std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string()).unwrap();
        let mut child = std::process::Command::new(&program)
            .arg("30")
            .spawn()
            .unwrap();
        if child.id() as i32 == pid {
            stranger = Some(child);
            break;
        }
        child.kill().unwrap();
        child.wait().unwrap();
    }
    let mut stranger = stranger.expect("pid reuse forced through ns_last_pid");
    let err = ours
        .pidfd
        .signal(nix::sys::signal::Signal::SIGTERM)
        .unwrap_err();
    assert!(err.is_gone(), "{err}");
    assert!(!ours.pidfd.is_running());
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert_eq!(stranger.try_wait().unwrap(), None, "the stranger was hit");
    stranger.kill().unwrap();
    stranger.wait().unwrap();
}

/// The line of /proc/self/status named `field`, as the child `script` saw it.
fn status_line(field: &str, o: Opts<'_>) -> String {
    let script = format!("grep '^{field}:' /proc/self/status | cut -f2");
    let (out, exit, _) = run_sh(&script, o).unwrap();
    assert_eq!(exit, Exit::Code(0), "{out}");
    out.trim().to_string()
}

#[test]
fn the_child_gets_systemds_umask_or_the_units() {
    // Whatever holdfast's own umask: 0022 unless the unit says otherwise.
    let (out, _, _) = run_sh("umask", opts()).unwrap();
    assert_eq!(out.trim(), "0022");
    let mut o = opts();
    o.setup.umask = 0o077;
    let (out, _, _) = run_sh(
        "umask; touch /tmp/hf-umask-$$; stat -c %a /tmp/hf-umask-$$; rm /tmp/hf-umask-$$",
        o,
    )
    .unwrap();
    assert_eq!(out.split_whitespace().collect::<Vec<_>>(), ["0077", "600"]);
}

#[test]
fn no_new_privileges_is_what_the_child_sees() {
    assert_eq!(status_line("NoNewPrivs", opts()), "0");
    let mut o = opts();
    o.setup.no_new_privileges = true;
    assert_eq!(status_line("NoNewPrivs", o), "1");
}

#[test]
fn supplementary_groups_join_the_users_groups() {
    if !crate::testing::is_root_or_skip("setgroups needs root (geteuid != 0)") {
        return;
    }
    // Without user or group: the supplementary groups alone.
    let mut o = opts();
    o.setup.supplementary_groups = vec![4343, 4242];
    assert_eq!(status_line("Groups", o), "4242 4343");
    // With a user: its own groups and the supplementary ones.
    let nobody = Credentials::resolve(Some("65534"), Some("65534"))
        .unwrap()
        .unwrap();
    let mut o = opts();
    o.credentials = Some(&nobody);
    o.setup.supplementary_groups = vec![4242];
    let mut want: Vec<u32> = nobody.groups.clone();
    want.push(4242);
    want.sort_unstable();
    want.dedup();
    let want: Vec<String> = want.iter().map(u32::to_string).collect();
    assert_eq!(status_line("Groups", o), want.join(" "));
}

#[test]
fn credentials_are_set_while_other_threads_are_being_created() {
    // glibc's setgroups/setgid/setuid wait for every thread glibc knows of;
    // in a clone3 child a thread the parent was creating never answers.
    if !crate::testing::is_root_or_skip("setgroups needs root (geteuid != 0)") {
        return;
    }
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let stop = Arc::new(AtomicBool::new(false));
    let churn = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::spawn(|| {}).join().unwrap();
            }
        })
    };
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let root = Credentials::resolve(Some("0"), Some("0")).unwrap().unwrap();
        for _ in 0..200 {
            let mut o = opts();
            o.credentials = Some(&root);
            o.setup.supplementary_groups = vec![4242];
            let (_, exit, _) = run_sh("exit 0", o).unwrap();
            assert_eq!(exit, Exit::Code(0));
        }
        done_tx.send(()).unwrap();
    });
    let finished = done_rx.recv_timeout(std::time::Duration::from_secs(60));
    stop.store(true, Ordering::Relaxed);
    churn.join().unwrap();
    finished.expect("a child hung before exec, setting its credentials");
}

#[test]
fn setup_resolves_groups_and_reads_environment_files_at_each_call() {
    use crate::unit::{EnvironmentFile, ProcessConfig, ServiceType};
    let dir = std::env::temp_dir().join(format!("holdfast-spawn-env-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("web.env");
    std::fs::write(&file, "# defaults\nFROM_FILE='one two'\nBOTH=file\n").unwrap();
    let mut p = ProcessConfig::defaults_for(ServiceType::Simple);
    p.supplementary_groups = vec!["root".into(), "4242".into()];
    p.environment_files = vec![
        EnvironmentFile {
            path: file.clone(),
            optional: false,
        },
        EnvironmentFile {
            path: dir.join("missing.env"),
            optional: true,
        },
    ];
    let setup = Setup::for_process(&p).unwrap();
    assert_eq!(setup.supplementary_groups, [0, 4242]);
    assert_eq!(setup.umask, 0o022);
    // The files' variables come after the unit's environment: they win.
    let mut o = opts();
    o.env = vec![
        ("BOTH".into(), "environment".into()),
        ("ONLY_ENV".into(), "e".into()),
    ];
    o.setup = setup;
    let (out, _, _) = run_sh("echo \"$FROM_FILE|$BOTH|$ONLY_ENV\"", o).unwrap();
    assert_eq!(out.trim(), "one two|file|e");
    // Read again at the next start.
    std::fs::write(&file, "BOTH=changed\n").unwrap();
    let again = Setup::for_process(&p).unwrap();
    assert_eq!(again.environment, [("BOTH".to_string(), "changed".into())]);
    // A missing file that is not optional fails the start, naming it.
    std::fs::remove_file(&file).unwrap();
    let err = Setup::for_process(&p).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!("environment file {}: ", file.display())),
        "{err}"
    );
    p.environment_files.clear();
    p.supplementary_groups = vec!["no-such-group-hf".into()];
    let err = Setup::for_process(&p).unwrap_err().to_string();
    assert_eq!(err, "group \"no-such-group-hf\" not found");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A command with the defaults, stdout and stderr on `out`.
fn command<'a>(program: &'a Path, argv: &'a [String], out: BorrowedFd<'a>) -> Command<'a> {
    Command {
        program,
        argv,
        env: vec![],
        fds: vec![],
        sockets: 0,
        stdin: None,
        stdout: out,
        stderr: out,
        credentials: None,
        working_directory: None,
        cgroup: None,
        rlimits: Rlimits::default(),
        non_blocking: false,
        standard_input: StandardInput::Null,
        standard_output: StandardOutput::Log,
    }
}
