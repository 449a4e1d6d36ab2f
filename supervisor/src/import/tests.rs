use std::path::{Path, PathBuf};
use std::time::Duration;

use pretty_assertions::assert_eq;

use super::values::{self, Specifiers};
use super::{import, ini, run, ImportError, Request};
use crate::unit::{IpPrefix, Protocol, RestartPolicy, ServiceType};

fn entries(text: &str) -> Vec<(String, String, String, usize)> {
    ini::parse(Path::new("x.service"), text)
        .unwrap()
        .into_iter()
        .map(|e| (e.section, e.key, e.value, e.line))
        .collect()
}

#[test]
fn reader_keeps_lines_repeats_and_joins_continuations() {
    let text = "# comment\n; other comment\n[Service]\nExecStart=/bin/prog \\\n# inside\n  --flag \\\n  arg\nEnvironment=A=1\nEnvironment=\n  Environment = B=2  \n[Install]\nWantedBy=multi-user.target\n";
    let s = |a: &str| a.to_string();
    assert_eq!(
        entries(text),
        vec![
            (s("Service"), s("ExecStart"), s("/bin/prog  --flag  arg"), 4),
            (s("Service"), s("Environment"), s("A=1"), 8),
            (s("Service"), s("Environment"), s(""), 9),
            (s("Service"), s("Environment"), s("B=2"), 10),
            (s("Install"), s("WantedBy"), s("multi-user.target"), 12),
        ]
    );
}

#[test]
fn reader_refuses_what_is_not_a_unit_file_naming_the_line() {
    for (text, line, what) in [
        ("Key=1\n", 1, "before any [Section]"),
        ("[Service]\njust words\n", 2, "neither a [Section]"),
        ("[Service\n", 1, "no closing ]"),
    ] {
        match ini::parse(Path::new("f.socket"), text) {
            Err(ImportError::Syntax { place, message }) => {
                assert_eq!(place, format!("f.socket:{line}"), "{text:?}");
                assert!(message.contains(what), "{message}");
            }
            other => panic!("{text:?}: {other:?}"),
        }
    }
}

#[test]
fn words_follow_systemds_quoting_and_escapes() {
    let cases: &[(&str, &[&str])] = &[
        ("/bin/a b  c", &["/bin/a", "b", "c"]),
        ("a \"b c\" 'd e'", &["a", "b c", "d e"]),
        ("a\\sb \\x41\\101 \"q\\\"x\"", &["a b", "AA", "q\"x"]),
        ("pre\"mid dle\"post", &["premid dlepost"]),
        ("", &[]),
    ];
    for (input, want) in cases {
        assert_eq!(values::split_words(input).unwrap(), *want, "{input:?}");
    }
    assert!(values::split_words("a \"open").is_err());
    assert!(values::split_words("trailing\\").is_err());
}

#[test]
fn exec_prefixes_are_read_in_any_order() {
    let l = values::exec_line("-@/usr/sbin/sshd sshd -i").unwrap();
    assert!(l.ignore_failure && l.argv0 && !l.no_env);
    assert_eq!(l.words, ["/usr/sbin/sshd", "sshd", "-i"]);
    let l = values::exec_line(":+!/bin/x").unwrap();
    assert!(l.no_env);
    assert_eq!(l.unsupported, ['+', '!']);
    assert!(values::exec_line("-").is_err());
    assert!(values::exec_line("/bin/a ; /bin/b").is_err());
}

#[test]
fn variables_expand_as_systemd_does() {
    let env = [("OPTS", "-a  -b"), ("DIR", "/var/x y")]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let words: Vec<String> = ["/bin/p", "$OPTS", "--dir=${DIR}", "$MISSING", "a$OPTS"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let (out, missing) = values::expand_env(&words, &env);
    assert_eq!(out, ["/bin/p", "-a", "-b", "--dir=/var/x y", "a$OPTS"]);
    assert_eq!(missing, ["MISSING"]);
}

#[test]
fn time_spans_sizes_and_booleans() {
    let ms = Duration::from_millis;
    for (s, want) in [
        ("5", Some(ms(5000))),
        ("100ms", Some(ms(100))),
        ("1min 30s", Some(ms(90_000))),
        ("1min30s", Some(ms(90_000))),
        ("1.5s", Some(ms(1500))),
        ("2h", Some(ms(7_200_000))),
        ("infinity", None),
    ] {
        assert_eq!(values::timespan(s).unwrap(), want, "{s:?}");
    }
    assert!(values::timespan("5 parsecs").is_err());
    assert!(values::timespan("").is_err());
    assert!(values::timespan("2y").unwrap_err().contains("year"));
    assert_eq!(values::size("8K").unwrap(), 8192);
    assert_eq!(values::size("1M").unwrap(), 1 << 20);
    assert!(values::size("1X").is_err());
    assert_eq!(values::boolean("on"), Ok(true));
    assert_eq!(values::boolean("0"), Ok(false));
    assert!(values::boolean("maybe").is_err());
}

#[test]
fn specifiers_that_mean_something_here_expand_and_host_ones_are_refused() {
    let spec = Specifiers {
        full_name: "getty@tty1.service".into(),
        instance: Some("tty1".into()),
    };
    assert_eq!(
        spec.expand("%n %N %p %i %t/%p %%").unwrap(),
        "getty@tty1.service getty@tty1 getty tty1 /run/getty %"
    );
    let escaped = Specifiers {
        full_name: "dev-sda\\x2d1.service".into(),
        instance: None,
    };
    assert_eq!(escaped.expand("%P").unwrap(), "dev/sda-1");
    assert!(spec.expand("%H").unwrap_err().contains("host"));
    assert!(escaped.expand("%i").unwrap_err().contains("not a template"));
    assert!(spec.expand("50%").is_err());
}

/// A directory with the given unit files in it.
fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        let path = dir.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    dir
}

/// Imports `first` from a directory holding `files`.
fn import_from(files: &[(&str, &str)], first: &str) -> super::Imported {
    let dir = dir_with(files);
    import(&req(dir.path(), &[first])).unwrap()
}

fn req(dir: &Path, files: &[&str]) -> Request {
    Request {
        files: files.iter().map(|f| dir.join(f)).collect(),
        instance: None,
    }
}

#[test]
fn a_socket_and_its_service_become_one_unit() {
    let dir = dir_with(&[
        (
            "web.socket",
            "[Socket]\nListenStream=127.0.0.1:8080\nListenStream=[::1]:8080\nListenDatagram=5353\n\
             ListenStream=/run/web.sock\nBacklog=512\nNoDelay=yes\nReceiveBuffer=64K\nSocketMode=0660\n\
             FileDescriptorName=http\nIPAddressDeny=any\nIPAddressAllow=localhost 192.0.2.0/24\n",
        ),
        (
            "web.service",
            "[Unit]\nDescription=The web\nAfter=network.target\n[Service]\nType=notify\n\
             Environment=\"GREETING=hello world\" MODE=fast\nExecStart=/usr/bin/web --mode $MODE \"--greet=${GREETING}\"\n\
             Restart=always\nRestartSec=2\nRestartMaxDelaySec=1min\nTimeoutStopSec=5s\nWatchdogSec=10\n\
             User=www-data\nGroup=www-data\nWorkingDirectory=/srv\nFileDescriptorStoreMax=4\n\
             [Install]\nWantedBy=multi-user.target\n",
        ),
    ]);
    let got = import(&req(dir.path(), &["web.socket"])).unwrap();
    assert_eq!(got.dropped, vec![], "nothing dropped");
    let s = &got.unit.service;
    assert_eq!(
        s.exec,
        ["/usr/bin/web", "--mode", "fast", "--greet=hello world"]
    );
    assert_eq!(s.kind, ServiceType::Notify);
    assert_eq!(s.restart, RestartPolicy::Always);
    assert_eq!(s.restart_delay, Duration::from_secs(2));
    assert_eq!(s.restart_delay_max, Duration::from_secs(60));
    assert_eq!(s.stop_timeout, Duration::from_secs(5));
    assert_eq!(
        s.start_timeout,
        Duration::from_secs(90),
        "systemd's default"
    );
    assert_eq!(s.watchdog, Some(Duration::from_secs(10)));
    assert_eq!(s.user.as_deref(), Some("www-data"));
    assert_eq!(s.working_directory, Some(PathBuf::from("/srv")));
    assert_eq!(s.fd_store_max, 4);
    assert!(!s.on_demand, "the service is enabled on its own");
    let socks = &got.unit.sockets;
    let names: Vec<&str> = socks.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["http", "http-2", "http-3", "http-4"]);
    let protos: Vec<Protocol> = socks.iter().map(|s| s.protocol).collect();
    assert_eq!(
        protos,
        [
            Protocol::Tcp,
            Protocol::Tcp,
            Protocol::Udp,
            Protocol::UnixStream
        ]
    );
    let shown = |s: &[IpPrefix]| s.iter().map(ToString::to_string).collect::<Vec<_>>();
    assert_eq!(shown(&socks[0].addresses), ["127.0.0.1/32"]);
    assert_eq!(shown(&socks[1].addresses), ["::1/128"]);
    assert_eq!(shown(&socks[2].addresses), ["0.0.0.0/0", "::/0"]);
    assert_eq!(socks[3].path, Some(PathBuf::from("/run/web.sock")));
    let o = &socks[0].options;
    assert_eq!(
        (o.backlog, o.no_delay, o.receive_buffer),
        (Some(512), true, Some(65536))
    );
    assert_eq!(
        shown(&o.allow),
        ["127.0.0.0/8", "::1/128", "192.0.2.0/24"],
        "deny any + allow: allow"
    );
    assert!(o.deny.is_empty());
    assert_eq!(socks[2].options.backlog, None, "no backlog on udp");
    assert!(!socks[2].options.no_delay, "no-delay is tcp only");
    assert_eq!(socks[3].options.mode, Some(0o660));
    assert!(got.toml.starts_with("# Written by `holdfast import` from:"));
    assert!(got.toml.contains("# The web\n"));
}

#[test]
fn accept_yes_pairs_with_the_template_and_stdin_socket_is_translated() {
    let got = import_from(&[
        (
            "sshd.socket",
            "[Socket]\nListenStream=2222\nAccept=yes\nMaxConnections=10\nMaxConnectionsPerSource=2\n",
        ),
        (
            "sshd@.service",
            "[Service]\nExecStart=-/usr/sbin/sshd -i\nStandardInput=socket\n",
        ),
    ], "sshd.socket");
    assert_eq!(got.dropped, vec![]);
    assert_eq!(got.unit.name, "sshd");
    assert_eq!(got.unit.service.exec, ["/usr/sbin/sshd", "-i"]);
    let o = &got.unit.sockets[0].options;
    assert!(o.accept);
    assert_eq!(
        (o.max_connections, o.max_connections_per_source),
        (Some(10), Some(2))
    );
    assert!(
        !got.unit.service.on_demand,
        "accept sockets start instances themselves"
    );
}

#[test]
fn a_socket_activated_service_not_enabled_on_its_own_starts_on_demand() {
    let got = import_from(
        &[
            (
                "d.socket",
                "[Socket]\nListenStream=/run/d.sock\nMaxConnections=5\n",
            ),
            ("d.service", "[Service]\nExecStart=/usr/sbin/d\n"),
        ],
        "d.socket",
    );
    assert_eq!(
        got.dropped,
        vec![],
        "MaxConnections= means nothing with Accept=no"
    );
    assert!(got.unit.service.on_demand);
    assert_eq!(
        got.unit.service.restart,
        RestartPolicy::Never,
        "systemd's Restart=no"
    );
}

#[test]
fn what_is_not_translated_is_listed_with_file_line_and_why() {
    let dir = dir_with(&[(
        "x.service",
        "[Unit]\nAfter=postgresql.service\n[Service]\nExecCondition=/bin/true\nExecStart=+/bin/x %H\n\
         ExecStart=/bin/x\nExecStart=\nExecStart=/bin/y\nLimitSTACK=8M\nType=forking\nProtectSystem=strict\n",
    )]);
    let got = import(&req(dir.path(), &["x.service"])).unwrap();
    let place = |f: &super::Finding| f.place.rsplit(':').next().unwrap().to_string();
    let lines: Vec<String> = got.dropped.iter().map(place).collect();
    assert_eq!(
        lines,
        ["2", "4", "5", "9", "10", "11"],
        "{:#?}",
        got.dropped
    );
    let why: Vec<&str> = got.dropped.iter().map(|f| f.why.as_str()).collect();
    assert!(why[0].contains("postgresql.service"));
    assert!(why[1].contains("exec-condition"), "{}", why[1]);
    assert!(why[2].contains("host"), "%H: {}", why[2]);
    assert!(why[3].contains("limit-stack"), "{}", why[3]);
    assert!(why[4].contains("foreground"));
    assert_eq!(got.dropped[3].directive, "LimitSTACK=8M");
    assert_eq!(
        got.unit.service.exec,
        ["/bin/y"],
        "the reset cleared the earlier lines"
    );
}

#[test]
fn ip_rules_that_deny_wins_cannot_express_are_dropped() {
    let dir = dir_with(&[
        (
            "r.socket",
            "[Socket]\nListenStream=80\nIPAddressDeny=10.0.0.0/8\nIPAddressAllow=10.1.0.0/16\n",
        ),
        ("r.service", "[Service]\nExecStart=/bin/r\n"),
        (
            "s.socket",
            "[Socket]\nListenStream=81\nIPAddressDeny=10.0.0.0/8\nIPAddressAllow=192.0.2.1\n",
        ),
        ("s.service", "[Service]\nExecStart=/bin/s\n"),
    ]);
    let r = import(&req(dir.path(), &["r.socket"])).unwrap();
    assert_eq!(r.dropped.len(), 2, "{:#?}", r.dropped);
    let s = import(&req(dir.path(), &["s.socket"])).unwrap();
    assert_eq!(s.dropped, vec![]);
    let deny: Vec<String> = s.unit.sockets[0]
        .options
        .deny
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(deny, ["10.0.0.0/8"]);
}

#[test]
fn templates_need_an_instance_and_drop_ins_are_read() {
    let dir = dir_with(&[
        ("echo@.socket", "[Socket]\nListenStream=/run/echo-%i.sock\n"),
        (
            "echo@.service",
            "[Service]\nExecStart=/bin/echo-server --name %i\n",
        ),
        (
            "echo@.service.d/override.conf",
            "[Service]\nExecStart=\nExecStart=/bin/echo-server --name %i --debug\n",
        ),
    ]);
    match import(&req(dir.path(), &["echo@.socket"])) {
        Err(ImportError::Usage(m)) => assert!(m.contains("--instance"), "{m}"),
        other => panic!("{other:?}"),
    }
    let mut r = req(dir.path(), &["echo@.socket"]);
    r.instance = Some("a".into());
    let got = import(&r).unwrap();
    assert_eq!(got.unit.name, "echo@a");
    assert_eq!(
        got.unit.sockets[0].path,
        Some(PathBuf::from("/run/echo-a.sock"))
    );
    assert_eq!(
        got.unit.service.exec,
        ["/bin/echo-server", "--name", "a", "--debug"]
    );
    assert_eq!(got.sources.len(), 3, "{:?}", got.sources);
}

#[test]
fn exit_codes_and_the_written_file() {
    let dir = dir_with(&[
        ("ok.service", "[Service]\nExecStart=/bin/ok\n"),
        (
            "bad.service",
            "[Service]\nExecStart=/bin/bad\nLimitSTACK=8M\n",
        ),
        ("none.service", "[Service]\nType=simple\n"),
    ]);
    let out = tempfile::tempdir().unwrap();
    assert_eq!(run(&req(dir.path(), &["ok.service"]), out.path(), false), 0);
    let text = std::fs::read_to_string(out.path().join("ok.toml")).unwrap();
    crate::unit::parse_unit("ok", Path::new("ok.toml"), &text).unwrap();
    assert_eq!(
        run(&req(dir.path(), &["ok.service"]), out.path(), false),
        2,
        "exists"
    );
    assert_eq!(
        run(&req(dir.path(), &["ok.service"]), out.path(), true),
        0,
        "--force"
    );
    assert_eq!(
        run(&req(dir.path(), &["bad.service"]), out.path(), false),
        1
    );
    assert_eq!(
        run(&req(dir.path(), &["none.service"]), out.path(), false),
        1
    );
    assert!(!out.path().join("none.toml").exists());
    assert_eq!(
        run(&req(dir.path(), &["missing.service"]), out.path(), false),
        2
    );
    assert_eq!(run(&req(dir.path(), &["ok.timer"]), out.path(), false), 2);
    crate::unit::load_dir(out.path()).unwrap();
}

#[test]
fn process_directives_land_on_holdfasts_process_keys() {
    use crate::unit::{KillMode, KillSignal, Limit, NotifyAccess, Rlimit, StandardInput};
    let dir = dir_with(&[
        ("p.socket", "[Socket]\nListenStream=/run/p.sock\n"),
        (
            "p.service",
            "[Service]\nType=notify\nExecStart=/bin/p\nNotifyAccess=all\nKillSignal=SIGINT\nKillMode=mixed\n\
             LimitNOFILE=1024:4096\nLimitCORE=infinity\nMemoryMax=512M\nTasksMax=100\nCPUQuota=50%\n\
             NonBlocking=yes\nStandardInput=socket\nStandardOutput=journal\n\
             MemoryHigh=10%\nLimitNPROC=9:8\n",
        ),
    ]);
    let got = import(&req(dir.path(), &["p.socket"])).unwrap();
    let p = &got.unit.service.process;
    assert_eq!(p.notify_access, NotifyAccess::All);
    assert_eq!(p.kill_signal, KillSignal(2));
    assert_eq!(p.kill_mode, KillMode::Mixed);
    assert_eq!(
        p.rlimits.nofile,
        Some(Rlimit {
            soft: 1024,
            hard: 4096
        })
    );
    assert_eq!(
        p.rlimits.core,
        Some(Rlimit {
            soft: u64::MAX,
            hard: u64::MAX
        })
    );
    assert_eq!(p.cgroup_limits.memory_max, Some(Limit::Value(512 << 20)));
    assert_eq!(p.cgroup_limits.tasks_max, Some(Limit::Value(100)));
    assert_eq!(p.cgroup_limits.cpu_quota, Some(50));
    assert_eq!(p.cgroup_limits.memory_high, None);
    assert!(p.non_blocking);
    assert_eq!(p.standard_input, StandardInput::Socket);
    let dropped: Vec<&str> = got.dropped.iter().map(|f| f.directive.as_str()).collect();
    assert_eq!(dropped, ["MemoryHigh=10%", "LimitNPROC=9:8"]);
    assert!(super::values::signal("SIGSTOP").is_err());
    assert_eq!(super::values::signal("term"), Ok(15));
    assert_eq!(super::values::signal("9"), Ok(9));
    assert!(got.toml.contains("notify-access = \"all\""), "{}", got.toml);
}

#[test]
fn exec_start_pre_lines_become_exec_start_pre_commands() {
    let dir = dir_with(&[(
        "p.service",
        "[Service]\nEnvironment=OPTS=-q\nExecStartPre=/usr/sbin/sshd -t $OPTS\nExecStartPre=-/bin/mkdir -p \"/run/a b\"\n\
         ExecStartPre=+/bin/chown x /run/p\nExecStart=/bin/p\n",
    )]);
    let got = import(&req(dir.path(), &["p.service"])).unwrap();
    let pre: Vec<(Vec<&str>, bool)> = got
        .unit
        .service
        .commands
        .start_pre
        .iter()
        .map(|c| {
            (
                c.argv.iter().map(String::as_str).collect(),
                c.ignore_failure,
            )
        })
        .collect();
    assert_eq!(
        pre,
        [
            (vec!["/usr/sbin/sshd", "-t", "-q"], false),
            (vec!["/bin/mkdir", "-p", "/run/a b"], true),
            (vec!["/bin/chown", "x", "/run/p"], false),
        ]
    );
    // The + prefix (full privileges) has no equivalent: said, line 5.
    let dropped: Vec<String> = got.dropped.iter().map(|f| f.place.clone()).collect();
    assert_eq!(dropped.len(), 1, "{:#?}", got.dropped);
    assert!(dropped[0].ends_with(":5"), "{dropped:?}");
    assert!(got.dropped[0].why.contains("+ prefix"));

    // Not with Accept=yes: reported, not written.
    let got = import_from(
        &[
            (
                "q.socket",
                "[Socket]\nListenStream=127.0.0.1:9000\nAccept=yes\n",
            ),
            (
                "q@.service",
                "[Service]\nExecStartPre=/bin/true\nExecStart=/bin/q\n",
            ),
        ],
        "q.socket",
    );
    assert!(got.unit.service.commands.start_pre.is_empty());
    assert!(
        got.dropped.iter().any(|f| f.why.contains("Accept=yes")),
        "{:#?}",
        got.dropped
    );
}

#[test]
fn post_stop_and_reload_lines_keep_mainpid_for_holdfast_to_fill_in() {
    let got = import_from(&[(
        "r.service",
        "[Service]\nType=notify\nExecStart=/usr/sbin/sshd -D\nExecStartPost=-/bin/register ${MAINPID}\n\
         ExecStop=/bin/kill -TERM $MAINPID\nExecReload=/usr/sbin/sshd -t\nExecReload=/bin/kill -HUP $MAINPID\n",
    )], "r.service");
    assert!(got.dropped.is_empty(), "{:#?}", got.dropped);
    let argv = |list: &[crate::unit::ExecCommand]| -> Vec<Vec<String>> {
        list.iter().map(|c| c.written()).collect()
    };
    let c = &got.unit.service.commands;
    assert_eq!(argv(&c.start_post), [["-/bin/register", "$MAINPID"]]);
    assert_eq!(argv(&c.stop), [["/bin/kill", "-TERM", "$MAINPID"]]);
    assert_eq!(
        argv(&c.reload),
        [
            vec!["/usr/sbin/sshd", "-t"],
            vec!["/bin/kill", "-HUP", "$MAINPID"]
        ]
    );
}

#[test]
fn notify_reload_takes_its_reload_signal_and_no_exec_reload() {
    let got = import_from(&[(
        "n.service",
        "[Service]\nType=notify-reload\nExecStart=/bin/n\nReloadSignal=SIGUSR1\nExecReload=/bin/kill -HUP $MAINPID\n",
    )], "n.service");
    let s = &got.unit.service;
    assert_eq!(s.kind, ServiceType::NotifyReload);
    assert_eq!(s.commands.reload_signal, Some(crate::unit::KillSignal(10)));
    assert!(s.commands.reload.is_empty());
    let places: Vec<&str> = got.dropped.iter().map(|f| f.place.as_str()).collect();
    assert_eq!(places.len(), 1, "{:#?}", got.dropped);
    assert!(places[0].ends_with(":5"), "{places:?}");
    // Not notify-reload: ReloadSignal= has nothing to go to.
    let got = import_from(
        &[(
            "m.service",
            "[Service]\nExecStart=/bin/m\nReloadSignal=SIGUSR1\n",
        )],
        "m.service",
    );
    assert!(got.unit.service.commands.reload_signal.is_none());
    assert!(
        got.dropped[0].why.contains("notify-reload"),
        "{:#?}",
        got.dropped
    );
}

#[test]
fn exec_setup_and_socket_file_directives_land_on_their_keys() {
    use crate::unit::EnvironmentFile;
    let dir = dir_with(&[
        (
            "k.socket",
            "[Socket]\nListenStream=/run/k.sock\nListenStream=127.0.0.1:9\nSocketMode=0660\n\
             SocketUser=www-data\nSocketGroup=adm\nRemoveOnStop=yes\n",
        ),
        (
            "k.service",
            "[Service]\nExecStart=/bin/k $OPTS\nUMask=0027\nSupplementaryGroups=adm 44\n\
             SupplementaryGroups=adm\nNoNewPrivileges=yes\nEnvironmentFile=-/etc/default/k\n\
             EnvironmentFile=/etc/k.env\nEnvironmentFile=/etc/k/*.env\nEnvironmentFile=k.env\n",
        ),
        (
            "m.service",
            "[Service]\nExecStart=/bin/m\nUMask=0800\nNoNewPrivileges=maybe\n",
        ),
    ]);
    let got = import(&req(dir.path(), &["k.socket"])).unwrap();
    let p = &got.unit.service.process;
    assert_eq!(p.umask, 0o027);
    assert_eq!(p.supplementary_groups, ["adm", "44"]);
    assert!(p.no_new_privileges);
    let file = |path: &str, optional| EnvironmentFile {
        path: PathBuf::from(path),
        optional,
    };
    assert_eq!(
        p.environment_files,
        [file("/etc/default/k", true), file("/etc/k.env", false)]
    );
    let unix = &got.unit.sockets[0].options;
    assert_eq!(unix.mode, Some(0o660));
    assert_eq!(unix.socket_user.as_deref(), Some("www-data"));
    assert_eq!(unix.socket_group.as_deref(), Some("adm"));
    assert!(unix.remove_on_stop);
    // They mean nothing for the IP socket beside it.
    let ip = &got.unit.sockets[1].options;
    assert_eq!(
        (&ip.socket_user, &ip.socket_group, ip.remove_on_stop),
        (&None, &None, false)
    );
    let dropped: Vec<&str> = got.dropped.iter().map(|f| f.directive.as_str()).collect();
    assert_eq!(
        dropped,
        ["EnvironmentFile=/etc/k/*.env", "EnvironmentFile=k.env"],
        "{:#?}",
        got.dropped
    );
    let bad = import(&req(dir.path(), &["m.service"])).unwrap();
    let dropped: Vec<&str> = bad.dropped.iter().map(|f| f.directive.as_str()).collect();
    assert_eq!(dropped, ["UMask=0800", "NoNewPrivileges=maybe"]);
    assert_eq!(bad.unit.service.process.umask, 0o022, "systemd's default");
    // $OPTS may come from the file: said, since holdfast does not expand it in exec.
    assert!(
        got.notes.iter().any(|n| n.why.contains("environment-file")),
        "{:#?}",
        got.notes
    );
    for key in [
        "umask = \"0027\"",
        "no-new-privileges = true",
        "environment-file = [\"-/etc/default/k\", \"/etc/k.env\"]",
        "socket-user = \"www-data\"",
        "remove-on-stop = true",
    ] {
        assert!(got.toml.contains(key), "{key}: {}", got.toml);
    }
}
