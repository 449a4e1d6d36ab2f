//! The `[service]` keys naming commands (`exec-start-pre`): values, the
//! mistakes with their words, and random values for the round-trip tests.

use super::*;
use pretty_assertions::assert_eq;

fn service(keys: &str) -> Result<ServiceConfig, Diagnostics> {
    let text = format!("[service]\nexec = [\"x\"]\n{keys}\n");
    parse_unit("svc", Path::new("svc.toml"), &text).map(|u| u.service)
}

fn cmd(argv: &[&str], ignore_failure: bool) -> ExecCommand {
    ExecCommand {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ignore_failure,
    }
}

#[test]
fn exec_start_pre_is_a_list_of_commands_with_systemds_dash() {
    assert!(service("").unwrap().commands.start_pre.is_empty());
    let s = service(
        "exec-start-pre = [[\"/usr/sbin/sshd\", \"-t\"], [\"-mkdir\", \"-p\", \"/run/x\"]]",
    )
    .unwrap();
    assert_eq!(
        s.commands.start_pre,
        vec![
            cmd(&["/usr/sbin/sshd", "-t"], false),
            cmd(&["mkdir", "-p", "/run/x"], true)
        ]
    );
    let unit =
        unit_file("[service]\nexec = [\"x\"]\nexec-start-pre = [[\"-a\"], [\"b\", \"-c\"]]\n")
            .unwrap();
    round_trip(&unit);
    let text = to_toml(&unit);
    assert!(
        text.contains("exec-start-pre = [[\"-a\"], [\"b\", \"-c\"]]"),
        "{text}"
    );
}

#[test]
fn exec_start_pre_mistakes_are_placed_and_explained() {
    #[rustfmt::skip]
    let cases: &[(&str, Expect<'_>)] = &[
        ("exec-start-pre = \"/bin/true\"", (3, 18, "service.exec-start-pre", "expected an array", "exec-start-pre = [[\"/usr/sbin/sshd\", \"-t\"]")),
        ("exec-start-pre = [\"/bin/true\"]", (3, 19, "service.exec-start-pre[0]", "expected an array of strings (one command)", "each an array of strings")),
        ("exec-start-pre = [[]]", (3, 19, "service.exec-start-pre[0]", "the command is empty", "each an array of strings")),
        ("exec-start-pre = [[\"-\", \"x\"]]", (3, 20, "service.exec-start-pre[0][0]", "the program name is empty", "[\"-/usr/sbin/sshd\", \"-t\"]")),
        ("exec-start-pre = [[\"a\", 1]]", (3, 25, "service.exec-start-pre[0][1]", "expected a string", "\"--flag\"")),
    ];
    assert_each_mistake(service, cases);
    // Not with accept = true: each connection starts its own process.
    #[rustfmt::skip]
    assert_each_mistake(unit_file, &[(
        "[service]\nexec = [\"x\"]\nexec-start-pre = [[\"a\"]]\n[[socket]]\nports = [\"80\"]\naddresses = [\"127.0.0.1\"]\naccept = true\n",
        (3, 1, "service.exec-start-pre", "exec-start-pre is not run for a socket with accept = true", "drop exec-start-pre"),
    )]);
}

#[test]
fn notify_reload_takes_a_reload_signal_and_no_exec_reload() {
    let s = service("type = \"notify-reload\"").unwrap();
    assert_eq!(s.kind, ServiceType::NotifyReload);
    assert_eq!(s.process.notify_access, NotifyAccess::Main);
    assert_eq!(s.commands.reload_signal(), KillSignal(1));
    let s = service("type = \"notify-reload\"\nreload-signal = \"SIGUSR1\"").unwrap();
    assert_eq!(s.commands.reload_signal, Some(KillSignal(10)));
    let unit = unit_file(
        "[service]\nexec = [\"x\"]\ntype = \"notify-reload\"\nreload-signal = \"USR2\"\n",
    )
    .unwrap();
    round_trip(&unit);
    let text = to_toml(&unit);
    assert!(text.contains("reload-signal = \"SIGUSR2\""), "{text}");
    #[rustfmt::skip]
    let cases: &[(&str, Expect<'_>)] = &[
        ("reload-signal = \"HUP\"", (3, 1, "service.reload-signal", "reload-signal is sent only to a type = \"notify-reload\" service", "write type = \"notify-reload\"")),
        ("type = \"notify-reload\"\nexec-reload = [[\"/bin/kill\", \"-HUP\", \"$MAINPID\"]]", (4, 1, "service.exec-reload", "is reloaded by reload-signal, not by exec-reload", "drop exec-reload")),
        ("type = \"notify-reload\"\nreload-signal = \"SIGNOPE\"", (4, 17, "service.reload-signal", "\"SIGNOPE\" is not a signal", "\"SIGTERM\"")),
    ];
    assert_each_mistake(service, cases);
}

#[test]
fn every_command_key_reads_alike() {
    let s = service(
        "exec-start-post = [[\"/bin/post\"]]\nexec-stop = [[\"-/bin/stop\", \"$MAINPID\"]]\nexec-reload = [[\"/bin/kill\", \"-HUP\", \"$MAINPID\"]]",
    )
    .unwrap();
    assert_eq!(s.commands.start_post, vec![cmd(&["/bin/post"], false)]);
    assert_eq!(s.commands.stop, vec![cmd(&["/bin/stop", "$MAINPID"], true)]);
    assert_eq!(
        s.commands.reload,
        vec![cmd(&["/bin/kill", "-HUP", "$MAINPID"], false)]
    );
    let e: Expect<'_> = (3, 16, "service.exec-reload[0]", "the command is empty", "");
    assert_each_mistake(service, &[("exec-reload = [[]]", e)]);
}

/// Random commands for the round-trip tests.
pub(super) fn randomize(s: &mut ServiceConfig, rng: &mut Rng) {
    let c = &mut s.commands;
    for list in [
        &mut c.start_pre,
        &mut c.start_post,
        &mut c.stop,
        &mut c.reload,
    ] {
        *list = random_commands(rng);
    }
    if s.kind == ServiceType::Notify && rng.chance() {
        s.kind = ServiceType::NotifyReload;
        c.reload.clear();
        c.reload_signal = *rng.pick(&[None, Some(KillSignal(1)), Some(KillSignal(10))]);
    }
}

fn random_commands(rng: &mut Rng) -> Vec<ExecCommand> {
    let any = "ab -/\"\\é$";
    (0..rng.below(3))
        .map(|_| ExecCommand {
            argv: (0..1 + rng.below(3))
                .map(|k| {
                    let t = rng.text(any, 6);
                    if k == 0 {
                        format!("p{}", t.trim_start_matches('-'))
                    } else {
                        t
                    }
                })
                .collect(),
            ignore_failure: rng.chance(),
        })
        .collect()
}
