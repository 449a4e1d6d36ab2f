//! `holdfast import` on the unit files Debian's packages install (xtask bootstrap installs
//! them): every pair imports into a unit that `holdfast check` accepts, and two of them run
//! under holdfast with their real clients: `ssh.socket` + `ssh.service` (sshd -D, Type=notify,
//! handed its socket through LISTEN_FDS) answering `ssh`, and `uuidd.socket` + `uuidd.service`
//! (an Accept=no daemon started on demand) answering `uuidd -t`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use holdfast_testkit::{
    describe_output, holdfast_check, holdfast_cli, netns_or_skip, require, run_ok, Holdfast,
    RunOptions, Sandbox,
};

const SYSTEM: &str = "/lib/systemd/system";
const T: Duration = Duration::from_secs(20);

/// The `.socket` files taken from the installed packages, each with the package that ships it.
const DEBIAN_SOCKETS: &[(&str, &str)] = &[
    ("ssh.socket", "openssh-server"),
    ("uuidd.socket", "uuid-runtime"),
    ("fcgiwrap.socket", "fcgiwrap"),
    ("rpcbind.socket", "rpcbind"),
    ("pcscd.socket", "pcscd"),
    ("micro-httpd.socket", "micro-httpd"),
];

fn installed(files: &[&str]) -> Result<()> {
    for f in files {
        let p = Path::new(SYSTEM).join(f);
        if !p.is_file() {
            bail!(
                "{} missing (cargo xtask bootstrap installs the package that ships it)",
                p.display()
            );
        }
    }
    Ok(())
}

fn import(args: &[&str]) -> Result<Output> {
    let mut all = vec!["import"];
    all.extend_from_slice(args);
    holdfast_cli(&all)
}

#[test]
fn debian_units_import_into_units_that_pass_check() -> Result<()> {
    let files: Vec<&str> = DEBIAN_SOCKETS.iter().map(|(f, _)| *f).collect();
    if require("Debian's .socket files", installed(&files)).is_none() {
        return Ok(());
    }
    let out = tempfile::tempdir()?;
    let out_dir = out.path().to_string_lossy().into_owned();
    for (socket, package) in DEBIAN_SOCKETS {
        let path = Path::new(SYSTEM).join(socket);
        let o = import(&["--output", &out_dir, &path.to_string_lossy()])?;
        let code = o.status.code();
        assert!(
            code == Some(0) || code == Some(1),
            "{package} {socket}: {}",
            describe_output(&o)
        );
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(
            stdout.starts_with("wrote "),
            "{socket}: {}",
            describe_output(&o)
        );
        // Exit 1 exactly when something is listed as not translated, each with file:line.
        assert_eq!(
            code == Some(1),
            stdout.contains("not translated ("),
            "{}",
            describe_output(&o)
        );
        let name = socket.trim_end_matches(".socket");
        assert!(
            out.path().join(format!("{name}.toml")).is_file(),
            "{socket}"
        );
    }
    holdfast_check(out.path(), 0)?;

    // What the report says about ssh.service, line by line of the installed file.
    let ssh_service = std::fs::read_to_string(Path::new(SYSTEM).join("ssh.service"))?;
    let line_of = |prefix: &str| -> Result<usize> {
        Ok(ssh_service
            .lines()
            .position(|l| l.starts_with(prefix))
            .with_context(|| format!("ssh.service has a {prefix} line"))?
            + 1)
    };
    let pre_line = line_of("ExecStartPre=")?;
    let reload_line = line_of("ExecReload=")?;
    let o = import(&[
        "--output",
        &out_dir,
        "--force",
        &format!("{SYSTEM}/ssh.socket"),
    ])?;
    let stdout = String::from_utf8_lossy(&o.stdout);
    // ExecStartPre= and ExecReload= are translated: not in the report.
    for line in [pre_line, reload_line, reload_line + 1] {
        assert!(
            !stdout.contains(&format!("{SYSTEM}/ssh.service:{line}:")),
            "line {line}: {stdout}"
        );
    }
    let ssh = std::fs::read_to_string(out.path().join("ssh.toml"))?;
    assert!(
        ssh.contains("exec-start-pre = [[\"/usr/sbin/sshd\", \"-t\"]]"),
        "{ssh}"
    );
    assert!(
        ssh.contains(
            "exec-reload = [[\"/usr/sbin/sshd\", \"-t\"], [\"/bin/kill\", \"-HUP\", \"$MAINPID\"]]"
        ),
        "{ssh}"
    );
    assert!(ssh.contains("exec = [\"/usr/sbin/sshd\", \"-D\"]"), "{ssh}");
    assert!(ssh.contains("type = \"notify\""), "{ssh}");
    assert!(
        ssh.contains("addresses = [\"0.0.0.0/0\", \"::/0\"]"),
        "{ssh}"
    );

    // micro-httpd's pair (Accept=yes with micro-httpd@.service) translates completely.
    let o = import(&[
        "--output",
        &out_dir,
        "--force",
        &format!("{SYSTEM}/micro-httpd.socket"),
    ])?;
    assert_eq!(o.status.code(), Some(0), "{}", describe_output(&o));
    let micro = std::fs::read_to_string(out.path().join("micro-httpd.toml"))?;
    assert!(micro.contains("accept = true"), "{micro}");

    // A usage error: the template service without an instance.
    let o = import(&["--output", &out_dir, "/lib/systemd/system/getty@.service"])?;
    if Path::new("/lib/systemd/system/getty@.service").exists() {
        assert_eq!(o.status.code(), Some(2), "{}", describe_output(&o));
    }
    Ok(())
}

/// A sandbox with the installed NAME.socket and NAME.service copied into its `systemd/`
/// directory (as a user would before adding drop-ins), once `package` and its `programs`
/// are there (under [`require`]'s policy: `None` means skip).
fn copied(name: &str, package: &str, programs: &[&str]) -> Result<Option<(Sandbox, PathBuf)>> {
    let files = [format!("{name}.socket"), format!("{name}.service")];
    let present = installed(&[&files[0], &files[1]]).and_then(|()| {
        match programs.iter().find(|p| !Path::new(p).exists()) {
            Some(p) => bail!("{p} missing ({package})"),
            None => Ok(()),
        }
    });
    if require(&format!("{package} and its unit files"), present).is_none() {
        return Ok(None);
    }
    let sandbox = Sandbox::new()?;
    let systemd = sandbox.path().join("systemd");
    std::fs::create_dir_all(&systemd)?;
    for f in &files {
        std::fs::copy(Path::new(SYSTEM).join(f), systemd.join(f))
            .with_context(|| format!("copy {f}"))?;
    }
    Ok(Some((sandbox, systemd)))
}

fn write(path: PathBuf, text: &str) -> Result<PathBuf> {
    std::fs::create_dir_all(path.parent().expect("a parent"))?;
    std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
    Ok(path)
}

/// `holdfast import --output <units> <systemd>/NAME.socket`, expecting exit `code`;
/// returns the unit file written.
fn import_into_units(sandbox: &Sandbox, systemd: &Path, name: &str, code: i32) -> Result<String> {
    let o = import(&[
        "--output",
        &sandbox.units_dir().to_string_lossy(),
        &systemd.join(format!("{name}.socket")).to_string_lossy(),
    ])?;
    assert_eq!(o.status.code(), Some(code), "{}", describe_output(&o));
    Ok(std::fs::read_to_string(
        sandbox.units_dir().join(format!("{name}.toml")),
    )?)
}

#[test]
fn imported_ssh_serves_a_real_ssh_client() -> Result<()> {
    let Some(ns) = netns_or_skip() else {
        return Ok(());
    };
    let programs = ["/usr/sbin/sshd", "/usr/bin/ssh", "/usr/bin/ssh-keygen"];
    let Some((sandbox, systemd)) = copied("ssh", "openssh-server", &programs)? else {
        return Ok(());
    };
    let base = sandbox.path().to_path_buf();

    // A host key, a client key, and an sshd_config that uses them.
    for key in ["host_key", "client_key"] {
        let mut kg = Command::new("ssh-keygen");
        kg.args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(base.join(key));
        run_ok(kg, T)?;
    }
    std::fs::copy(base.join("client_key.pub"), base.join("authorized_keys"))?;
    let config = write(
        base.join("sshd_config"),
        &format!(
            "HostKey {b}/host_key\nAuthorizedKeysFile {b}/authorized_keys\nPermitRootLogin prohibit-password\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n\
             PidFile none\nLogLevel VERBOSE\n",
            b = base.display()
        ),
    )?;
    // The drop-in a user would write: the options ssh.service's ExecStart= takes from
    // $SSHD_OPTS, and its ExecStartPre= check of that same configuration.
    write(
        systemd.join("ssh.service.d/test.conf"),
        &format!(
            "[Service]\nEnvironment=\"SSHD_OPTS=-f {}\"\nExecStartPre=\nExecStartPre=/usr/sbin/sshd -t $SSHD_OPTS\n\
             ExecReload=\nExecReload=/usr/sbin/sshd -t $SSHD_OPTS\nExecReload=/bin/kill -HUP $MAINPID\n",
            config.display()
        ),
    )?;
    // What the report says about RuntimeDirectory=sshd: create it on the host.
    std::fs::create_dir_all("/run/sshd")?;

    // RuntimeDirectory= and more are not translated: exit 1.
    let unit = import_into_units(&sandbox, &systemd, "ssh", 1)?;
    assert!(
        unit.contains(&format!("\"-f\", \"{}\"", config.display())),
        "{unit}"
    );
    assert!(
        unit.contains(&format!(
            "exec-start-pre = [[\"/usr/sbin/sshd\", \"-t\", \"-f\", \"{}\"]]",
            config.display()
        )),
        "{unit}"
    );

    // ListenStream=22 is every address: the dispatcher's 0.0.0.0/0 and ::/0.
    let Some(hf) = Holdfast::start_dispatched(&ns, sandbox, &RunOptions::default())? else {
        return Ok(());
    };
    let pid = hf.wait_running("ssh", T)?;
    let ssh = |host: &str| -> Result<String> {
        let mut c = Command::new("ssh");
        c.arg("-i").arg(base.join("client_key")).args([
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "ConnectTimeout=10",
            "-p",
            "22",
            &format!("root@{host}"),
            "echo",
            "answered-by-sshd",
        ]);
        let out = ns.run(|| run_ok(c, T))??;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    assert_eq!(ssh("127.0.0.1")?, "answered-by-sshd", "{}", hf.log());
    assert_eq!(ssh("::1")?, "answered-by-sshd", "{}", hf.log());
    // A restart keeps the socket: the next sshd answers on it.
    hf.cli_ok(&["restart", "ssh"])?;
    let again = holdfast_testkit::wait_for("a new sshd", T, || {
        hf.service("ssh")
            .ok()
            .and_then(|s| s["pid"].as_i64())
            .filter(|p| *p != i64::from(pid))
    })?;
    assert_ne!(again, i64::from(pid));
    assert_eq!(ssh("127.0.0.1")?, "answered-by-sshd", "{}", hf.log());
    // ExecReload=: the config checked, then SIGHUP to $MAINPID, answered once
    // both ran. (sshd then re-executes itself in place, same pid; Debian's sshd
    // takes its LISTEN_FDS socket only once, so it is not asked again here.)
    let reloaded: serde_json::Value =
        serde_json::from_str(&hf.cli_ok(&["reload-service", "ssh", "--json"])?)?;
    assert_eq!(reloaded["pid"], again, "{reloaded}");
    assert_eq!(reloaded["state"], "running", "{reloaded}");
    let log = hf.log();
    assert!(
        log.contains("exec-reload started service=ssh")
            && log.contains("command=1")
            && log.contains("reloaded (exec-reload) service=ssh"),
        "{log}"
    );
    Ok(())
}

#[test]
fn imported_uuidd_starts_on_demand_and_answers_uuidd_clients() -> Result<()> {
    let Some(ns) = netns_or_skip() else {
        return Ok(());
    };
    let Some((sandbox, systemd)) = copied("uuidd", "uuid-runtime", &["/usr/sbin/uuidd"])? else {
        return Ok(());
    };
    let base = sandbox.path().to_path_buf();
    // The socket moved into the sandbox, so the test shares nothing with the host's /run/uuidd.
    let socket = base.join("uuidd/request");
    write(
        systemd.join("uuidd.socket.d/path.conf"),
        &format!(
            "[Socket]\nListenStream=\nListenStream={}\n",
            socket.display()
        ),
    )?;
    // Its sandboxing directives are not translated: exit 1.
    let unit = import_into_units(&sandbox, &systemd, "uuidd", 1)?;
    assert!(unit.contains("on-demand = true"), "{unit}");
    assert!(unit.contains("user = \"uuidd\""), "{unit}");

    let hf = Holdfast::start_in(&ns, sandbox)?;
    let before = hf.service("uuidd")?;
    assert!(
        before["pid"].is_null(),
        "on demand: not started before a client: {before}"
    );
    let mut client = Command::new("uuidd");
    client.arg("-t").arg("-s").arg(&socket);
    let out = run_ok(client, T).with_context(|| hf.log())?;
    let said = String::from_utf8_lossy(&out.stdout);
    let uuid = said
        .split_whitespace()
        .last()
        .context("uuidd -t printed nothing")?;
    assert_eq!(uuid.len(), 36, "a UUID: {said}");
    assert_eq!(&uuid[14..15], "1", "time-based (version 1): {said}");
    let pid = hf.wait_running("uuidd", T)?;
    let user = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let uid = user
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .context("no Uid: line")?;
    assert_ne!(uid, "0", "User=uuidd: not root");
    Ok(())
}
