//! What a service runs with and what becomes of its output: stdout and stderr in
//! holdfast's log line by line with the service name; `user`/`group` drop
//! privileges (supplementary groups included); `environment` and
//! `working-directory` apply; a relative `exec` is found through PATH.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result};
use holdfast_testkit::{
    netns_and_sandbox, netns_or_skip, skip_unless, toml_str, wait_for, Holdfast, Sandbox,
};
use nix::unistd::{Group, User};

const T: Duration = Duration::from_secs(10);

#[test]
fn service_output_is_logged_line_by_line_with_its_name() -> Result<()> {
    let ns = skip_unless!(netns_or_skip());
    let mut hf = Holdfast::start(
        &ns,
        &[
            (
                "chatty",
                // `sh` is relative: found through PATH.
                r#"[service]
exec = ["sh", "-c", "echo out-line-one; echo out-line-two; echo err-line-one >&2; exec sleep 1000"]
"#,
            ),
            ("quiet", "[service]\nexec = [\"sleep\", \"1000\"]\n"),
        ],
    )?;
    hf.wait_running("chatty", T)?;
    let lines = wait_for("the service's output in the log", T, || {
        let log = hf.log();
        let wanted = ["out-line-one", "out-line-two", "err-line-one"];
        let found: Vec<String> = wanted
            .iter()
            .filter_map(|w| log.lines().find(|l| l.contains(w)).map(String::from))
            .collect();
        (found.len() == wanted.len()).then_some(found)
    })?;
    for l in &lines {
        assert!(l.contains("chatty"), "logged without the service name: {l}");
        assert!(!l.contains("quiet"), "logged under the wrong service: {l}");
    }
    // Line by line: the two stdout lines are two log lines.
    assert_ne!(lines[0], lines[1], "two output lines logged as one");
    hf.stop()
}

/// `Uid:`/`Gid:`/`Groups:` of a `/proc/PID/status` text.
fn ids(status: &str) -> BTreeMap<String, Vec<u32>> {
    status
        .lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(k, _)| ["Uid", "Gid", "Groups"].contains(k))
        .map(|(k, v)| {
            (
                k.to_owned(),
                v.split_whitespace()
                    .filter_map(|n| n.parse().ok())
                    .collect(),
            )
        })
        .collect()
}

#[test]
fn user_and_group_drop_privileges() -> Result<()> {
    let ns = skip_unless!(netns_or_skip());
    let nobody = User::from_name("nobody")?.context("no user nobody")?;
    let daemon = Group::from_name("daemon")?.context("no group daemon")?;
    let (uid, gid) = (nobody.uid.as_raw(), nobody.gid.as_raw());
    let sandbox = Sandbox::new()?;
    let dump = |tag: &str| {
        format!(
            r#"["/bin/sh", "-c", "cat /proc/self/status > {}; exec sleep 1000"]"#,
            sandbox.out(&format!("{tag}.status")).display()
        )
    };
    sandbox.write_units(&[
        (
            "as-nobody",
            &format!(
                "[service]\nexec = {}\nuser = \"nobody\"\n",
                dump("as-nobody")
            ),
        ),
        (
            "as-nobody-daemon",
            &format!(
                "[service]\nexec = {}\nuser = \"nobody\"\ngroup = \"daemon\"\n",
                dump("as-nobody-daemon")
            ),
        ),
    ])?;
    let mut hf = Holdfast::start_in(&ns, sandbox)?;
    for (tag, want_gid) in [
        ("as-nobody", gid),
        ("as-nobody-daemon", daemon.gid.as_raw()),
    ] {
        hf.wait_running(tag, T)?;
        let path = hf.sandbox().out(&format!("{tag}.status"));
        let status = wait_for(&format!("{}", path.display()), T, || {
            std::fs::read_to_string(&path)
                .ok()
                .filter(|s| s.contains("Groups:"))
        })?;
        let ids = ids(&status);
        assert_eq!(
            ids["Uid"], [uid; 4],
            "{tag}: real, effective, saved, fs uid"
        );
        assert_eq!(
            ids["Gid"], [want_gid; 4],
            "{tag}: real, effective, saved, fs gid"
        );
        // Root's supplementary groups are dropped (the primary group may be listed).
        assert!(
            ids["Groups"].iter().all(|&g| g == want_gid),
            "{tag}: supplementary groups kept: {:?}",
            ids["Groups"]
        );
    }
    hf.stop()
}

#[test]
fn environment_and_working_directory_apply() -> Result<()> {
    let (ns, sandbox) = skip_unless!(netns_and_sandbox()?);
    let exec = sandbox.serve_exec("env")?;
    let cwd = sandbox.out_dir();
    sandbox.write_unit(
        "env",
        &format!(
            r#"[service]
exec = {exec}
working-directory = {cwd}
environment = {{ GREETING = "hello there", EMPTY = "" }}
"#,
            cwd = toml_str(&cwd.to_string_lossy())
        ),
    )?;
    let (mut hf, pid) = Holdfast::start_running(&ns, sandbox, "env")?;
    let report = hf.sandbox().wait_report("env", T, |r| r["pid"] == pid)?;
    assert_eq!(report["env"]["GREETING"], "hello there", "{report}");
    assert_eq!(report["env"]["EMPTY"], "", "{report}");
    assert_eq!(report["cwd"], cwd.to_string_lossy().as_ref(), "{report}");
    // No sockets: no LISTEN_* at all.
    for k in ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"] {
        assert!(
            report["env"].get(k).is_none(),
            "{k} set without sockets: {report}"
        );
    }
    hf.stop()
}

/// Its inner shell starts a sleep, writes its pid to `$NOTE` and exits at once:
/// the sleep is orphaned.
const ORPHANING: &str = "sh -c 'sleep 1 & echo $! > \"$NOTE\"'; exec sleep 1000";

#[test]
fn orphans_are_adopted_and_reaped_by_holdfast() -> Result<()> {
    let (ns, sandbox) = skip_unless!(netns_and_sandbox()?);
    let orphan_file = sandbox.write_sh_noting("parent", ORPHANING, "")?;
    let (mut hf, _) = Holdfast::start_running(&ns, sandbox, "parent")?;
    let orphan: i32 = wait_for("the orphan's pid", T, || {
        std::fs::read_to_string(&orphan_file)
            .ok()?
            .trim()
            .parse()
            .ok()
    })?;
    // Adopted by holdfast, the child subreaper, once its parent has exited…
    let ppid = wait_for("the orphan's new parent", T, || {
        let status = std::fs::read_to_string(format!("/proc/{orphan}/status")).ok()?;
        let ppid: i32 = status
            .lines()
            .find_map(|l| l.strip_prefix("PPid:"))?
            .trim()
            .parse()
            .ok()?;
        (ppid != 0 && !is_shell_of(ppid)).then_some(ppid)
    })?;
    assert_eq!(ppid, hf.pid(), "the orphan was not adopted by holdfast");
    // …and reaped when it exits: no zombie left.
    wait_for("the orphan to be reaped", Duration::from_secs(5), || {
        holdfast_testkit::proc_state(orphan).is_none().then_some(())
    })?;
    hf.stop()
}

/// True while `pid` is a shell (the orphan's original parent, not yet exited).
fn is_shell_of(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "sh")
}

/// The keys systemd users reach for (issue 13) on a plain service, not only
/// on per-connection instances: umask, supplementary groups,
/// no-new-privileges and environment files (read again at each start; a
/// missing required one fails the start, naming it).
#[test]
fn a_plain_service_gets_umask_groups_no_new_privs_and_environment_files() -> anyhow::Result<()> {
    use anyhow::ensure;
    let (ns, sandbox) = skip_unless!(netns_and_sandbox()?);
    let env_file = sandbox.path().join("plain.env");
    std::fs::write(&env_file, "FROM_FILE='one two'\n")?;
    let report = sandbox.out("plain.txt");
    let script = format!(
        "{{ umask; grep -E '^(NoNewPrivs|Groups):' /proc/self/status | tr -s '\\t ' ' '; \
         echo \"$FROM_FILE\"; }} > {r}.tmp && mv {r}.tmp {r}; exec sleep 1000",
        r = report.display()
    );
    sandbox.write_sh_service(
        "plain",
        &script,
        &format!(
            "umask = \"0027\"\nno-new-privileges = true\nsupplementary-groups = [\"4242\"]\n\
             environment-file = [{}]\nrestart = \"never\"",
            toml_str(&env_file.to_string_lossy()),
        ),
    )?;
    let (mut hf, _) = Holdfast::start_running(&ns, sandbox, "plain")?;
    let said = wait_for("the service's report", Duration::from_secs(10), || {
        std::fs::read_to_string(&report).ok()
    })?;
    let lines: Vec<&str> = said.lines().collect();
    ensure!(
        lines == ["0027", "Groups: 4242 ", "NoNewPrivs: 1", "one two"],
        "the service said {said:?}"
    );
    // A required environment file gone: the start fails, naming it.
    std::fs::remove_file(&env_file)?;
    let _ = hf.cli(&["restart", "plain"])?;
    let s = hf.wait_state("plain", "failed", Duration::from_secs(10))?;
    ensure!(
        s["failure"]
            .as_str()
            .is_some_and(|f| f.contains("plain.env")),
        "{s}"
    );
    hf.stop()
}
