//! Checks of valid units against this machine, made before anything runs:
//! each `user` and `group` exists, `exec[0]` is an executable file (looked up
//! through PATH as spawn looks it up), so do each of its `supplementary-groups`
//! and each unix socket's `socket-user` and `socket-group`, and each service's notify socket path
//! under the state dir fits a unix socket address, and, where holdfast
//! tracks services by cgroup, each cgroup limit's controller is there. `unit` may only read the
//! unit files, so these live here; `holdfast check` and the daemon's start
//! and reload call [`check_units`], and its mistakes read like the unit
//! file's own (file, line, column, key, what to write instead).

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::cgroup::Hierarchy;
use crate::notify;
use crate::spawn::{self, Credentials, SpawnError};
use crate::unit::{diagnostic_at, Diagnostic, Diagnostics, Unit};

/// The longest unix socket path bind() takes (sun_path is 108 bytes with its NUL).
const UNIX_PATH_MAX: usize = 107;

/// Every mistake of `units` on this machine. `state_dir` is the daemon's
/// `--state-dir`; `base_path` the PATH a program is looked up in when its
/// unit sets none (the daemon's own; `None`: spawn's default); `cgroups`
/// the daemon's cgroup hierarchy, when it tracks services by cgroup.
pub fn check_units(
    units: &[Unit],
    state_dir: &Path,
    base_path: Option<&OsStr>,
    cgroups: Option<&Hierarchy>,
) -> Result<(), Diagnostics> {
    let mut diags = Vec::new();
    for unit in units {
        diags.extend(check_unit(unit, state_dir, base_path));
        if let Some(h) = cgroups {
            diags.extend(check_controllers(unit, h));
        }
    }
    Diagnostics::into_result(diags)
}

fn check_unit(unit: &Unit, state_dir: &Path, base_path: Option<&OsStr>) -> Vec<Diagnostic> {
    let mut diags = Vec::new();
    let svc = &unit.service;
    diags.extend(check_accounts(unit));
    if let Some(program) = svc.exec.first() {
        let path_var = svc.environment.get("PATH").map(OsStr::new).or(base_path);
        if let Some((message, hint)) = program_problem(program, path_var) {
            diags.push(diagnostic_at(unit, "service.exec[0]", message, hint));
        }
    }
    diags.extend(check_commands(unit, base_path));
    let socket = notify_socket_path(state_dir, &unit.name);
    let len = socket.as_os_str().len();
    if len > UNIX_PATH_MAX {
        let room = unit.name.len().saturating_sub(len - UNIX_PATH_MAX);
        diags.push(diagnostic_at(
            unit,
            "",
            format!(
                "the service name is too long for its notify socket: {} is {len} bytes, more than the {UNIX_PATH_MAX} a unix socket path can be",
                socket.display()
            ),
            format!("shorten the file name to at most {room} characters before .toml, or run holdfast with a shorter --state-dir"),
        ));
    }
    diags
}

/// The programs of the command keys (exec-start-pre and friends), as
/// `exec[0]`; one written with `-` may be missing (its failure is ignored).
fn check_commands(unit: &Unit, base_path: Option<&OsStr>) -> Vec<Diagnostic> {
    let svc = &unit.service;
    let path_var = svc.environment.get("PATH").map(OsStr::new).or(base_path);
    let c = &svc.commands;
    let keys = [
        ("exec-start-pre", &c.start_pre),
        ("exec-start-post", &c.start_post),
        ("exec-stop", &c.stop),
        ("exec-reload", &c.reload),
    ];
    let mut diags = Vec::new();
    for (key, list) in keys {
        for (k, command) in list.iter().enumerate() {
            if command.ignore_failure {
                continue;
            }
            if let Some((message, hint)) = program_problem(&command.argv[0], path_var) {
                let at = format!("service.{key}[{k}]");
                diags.push(diagnostic_at(unit, &at, message, hint));
            }
        }
    }
    diags
}

/// Each user and group the unit names exists: `user`, `group`,
/// `supplementary-groups`, and each unix socket's `socket-user` and `socket-group`.
fn check_accounts(unit: &Unit) -> Vec<Diagnostic> {
    let svc = &unit.service;
    let mut users: Vec<(String, &str)> = Vec::new();
    let mut groups: Vec<(String, &str)> = Vec::new();
    users.extend(
        svc.user
            .iter()
            .map(|u| ("service.user".to_string(), u.as_str())),
    );
    groups.extend(
        svc.group
            .iter()
            .map(|g| ("service.group".to_string(), g.as_str())),
    );
    for (i, g) in svc.process.supplementary_groups.iter().enumerate() {
        groups.push((format!("service.supplementary-groups[{i}]"), g));
    }
    for (i, sock) in unit.sockets.iter().enumerate() {
        let o = &sock.options;
        users.extend(
            o.socket_user
                .iter()
                .map(|u| (format!("socket[{i}].socket-user"), u.as_str())),
        );
        groups.extend(
            o.socket_group
                .iter()
                .map(|g| (format!("socket[{i}].socket-group"), g.as_str())),
        );
    }
    let mut diags = Vec::new();
    for (key, user) in users {
        if let Err(SpawnError::NoUser { .. }) = Credentials::resolve(Some(user), None) {
            diags.push(diagnostic_at(
                unit,
                &key,
                format!("user {user:?} does not exist on this machine"),
                "create it (e.g. useradd --system NAME), or write an existing user name or a numeric uid",
            ));
        }
    }
    for (key, group) in groups {
        if let Err(SpawnError::NoGroup { .. }) = spawn::group_id(group) {
            diags.push(diagnostic_at(
                unit,
                &key,
                format!("group {group:?} does not exist on this machine"),
                "create it (e.g. groupadd --system NAME), or write an existing group name or a numeric gid",
            ));
        }
    }
    diags
}

/// A cgroup limit whose controller the service cgroups will not have.
fn check_controllers(unit: &Unit, cgroups: &Hierarchy) -> Option<Diagnostic> {
    let (key, controller) = cgroups.missing_for(&unit.service.process.cgroup_limits)?;
    Some(diagnostic_at(
        unit,
        &format!("service.{key}"),
        format!(
            "{key} needs the {controller} cgroup controller, which {} does not give its service cgroups (it has: {})",
            cgroups.root().path().display(),
            cgroups.enabled()
        ),
        format!("enable {controller} in the parent cgroup's cgroup.subtree_control (under systemd: Delegate=yes), or remove {key}"),
    ))
}

/// Why `program` cannot be executed, looked up as spawn does; `None` when it can.
/// A relative path with a slash is left to spawn (it depends on the working directory).
fn program_problem(program: &str, path_var: Option<&OsStr>) -> Option<(String, String)> {
    let path = match spawn::resolve_program(program, path_var) {
        Ok(path) => path,
        Err(_) => {
            let searched = path_var.map_or_else(
                || "the default PATH".to_string(),
                |p| format!("PATH={}", p.to_string_lossy()),
            );
            return Some((
                format!("program {program:?} is not found in {searched}"),
                "write the program's absolute path, e.g. exec = [\"/usr/bin/program\"], or set PATH in [service.environment]".to_string(),
            ));
        }
    };
    if !path.is_absolute() {
        return None;
    }
    let hint =
        "write the path of an executable file, e.g. exec = [\"/usr/bin/program\"]".to_string();
    match std::fs::metadata(&path) {
        Err(e) => Some((format!("program {}: {e}", path.display()), hint)),
        Ok(m) if !m.is_file() => Some((
            format!("program {} is not a regular file", path.display()),
            hint,
        )),
        Ok(m) if m.permissions().mode() & 0o111 == 0 => Some((
            format!(
                "program {} is not executable (mode {:o})",
                path.display(),
                m.permissions().mode() & 0o7777
            ),
            format!(
                "make it executable (chmod +x {}), or {hint}",
                path.display()
            ),
        )),
        Ok(_) => None,
    }
}

/// Where the daemon binds the service's notify socket (see `notify::NotifySocket::bind`).
fn notify_socket_path(state_dir: &Path, service: &str) -> PathBuf {
    std::path::absolute(state_dir)
        .unwrap_or_else(|_| state_dir.to_path_buf())
        .join(notify::SOCKET_DIR)
        .join(format!("{service}.sock"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::unit::parse_unit;

    /// (name, unit text) → the diagnostics, as (line, column, key, message).
    fn check(name: &str, text: &str, state_dir: &str) -> Vec<(usize, usize, String, String)> {
        // A directory per call: the tests run at once, and each removes its own.
        static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!(
            "holdfast-preflight-{}-{call}-{name}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join(format!("{name}.toml"));
        std::fs::write(&file, text).unwrap();
        let unit = parse_unit(name, &file, text).unwrap();
        let got = match check_units(
            &[unit],
            Path::new(state_dir),
            Some(OsStr::new("/usr/bin:/bin")),
            None,
        ) {
            Ok(()) => Vec::new(),
            Err(d) => d
                .into_iter()
                .map(|d| {
                    assert_eq!(d.file, file);
                    assert!(!d.hint.is_empty(), "{d}");
                    (d.line, d.column, d.key, d.message)
                })
                .collect(),
        };
        std::fs::remove_dir_all(&dir).unwrap();
        got
    }

    /// An expected mistake: (line, column, key, message fragment).
    type Found<'a> = (usize, usize, &'a str, &'a str);

    /// `got` is, in order, a mistake at each (line, column, key) whose
    /// message holds the fragment.
    fn assert_found(got: &[(usize, usize, String, String)], want: &[Found<'_>]) {
        let keys: Vec<_> = got.iter().map(|g| (g.0, g.1, g.2.as_str())).collect();
        let want_keys: Vec<_> = want.iter().map(|w| (w.0, w.1, w.2)).collect();
        assert_eq!(keys, want_keys, "{got:?}");
        for (g, w) in got.iter().zip(want) {
            assert!(g.3.contains(w.3), "{:?} lacks {:?}", g.3, w.3);
        }
    }

    #[test]
    fn a_unit_that_can_run_here_passes() {
        let ok = "[service]\nexec = [\"sh\", \"-c\", \"true\"]\nuser = \"root\"\ngroup = \"0\"\n";
        assert_eq!(check("web", ok, "/run/holdfast"), vec![]);
        // A numeric uid with no passwd entry is a valid uid, as for spawn.
        let numeric = "[service]\nexec = [\"/bin/true\"]\nuser = \"4000000000\"\n";
        assert_eq!(check("web", numeric, "/run/holdfast"), vec![]);
        let accounts = "[service]\nexec = [\"/bin/true\"]\nsupplementary-groups = [\"root\", \"4242\"]\n[[socket]]\nprotocol = \"unix-stream\"\npath = \"/run/x.sock\"\nsocket-user = \"root\"\nsocket-group = \"4242\"\n";
        assert_eq!(check("accounts", accounts, "/run/holdfast"), vec![]);
    }

    #[test]
    fn missing_accounts_programs_and_socket_owners_are_placed_at_their_keys() {
        #[rustfmt::skip]
        let cases: &[(&str, &str, &[Found<'_>])] = &[
            ("web", "[service]\nexec = [\"/nonexistent/prog\", \"-x\"]\nuser = \"no-such-user-hf\"\ngroup = \"no-such-group-hf\"\n", &[
                (2, 9, "service.exec[0]", "No such file"),
                (3, 8, "service.user", "user \"no-such-user-hf\" does not exist"),
                (4, 9, "service.group", "group \"no-such-group-hf\" does not exist"),
            ]),
            ("accounts", "[service]\nexec = [\"/bin/true\"]\nsupplementary-groups = [\"root\", \"no-such-group-hf\"]\n[[socket]]\nprotocol = \"unix-stream\"\npath = \"/run/x.sock\"\nsocket-user = \"no-such-user-hf\"\nsocket-group = \"no-such-group-hf\"\n", &[
                (3, 33, "service.supplementary-groups[1]", "group \"no-such-group-hf\" does not exist"),
                (7, 15, "socket[0].socket-user", "user \"no-such-user-hf\" does not exist"),
                (8, 16, "socket[0].socket-group", ""),
            ]),
        ];
        for (name, text, want) in cases {
            assert_found(&check(name, text, "/run/holdfast"), want);
        }
    }

    #[test]
    fn programs_that_are_not_executable_files_are_refused() {
        let cases = [
            ("no-such-program-hf", "is not found in PATH=/usr/bin:/bin"),
            ("/etc/passwd", "is not executable (mode 644)"),
            ("/tmp", "is not a regular file"),
        ];
        for (program, want) in cases {
            let text = format!("[service]\nexec = [{program:?}]\n");
            let got = check("web", &text, "/run/holdfast");
            assert_eq!(got.len(), 1, "{program}: {got:?}");
            assert_eq!((got[0].0, got[0].1), (2, 9), "{program}");
            assert!(got[0].3.contains(want), "{program}: {got:?}");
        }
        // The unit's own PATH is the one searched.
        let text = "[service]\nexec = [\"sh\"]\nenvironment = { PATH = \"/nonexistent\" }\n";
        let got = check("web", text, "/run/holdfast");
        assert!(got[0].3.contains("PATH=/nonexistent"), "{got:?}");
    }

    #[test]
    fn exec_start_pre_programs_are_checked_unless_written_with_a_dash() {
        let text = "[service]\nexec = [\"/bin/true\"]\nexec-start-pre = [[\"-/nonexistent/a\"], [\"/bin/true\"], [\"/nonexistent/b\", \"-t\"]]\n";
        let got = check("web", text, "/run/holdfast");
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(
            (got[0].0, got[0].1, got[0].2.as_str()),
            (3, 55, "service.exec-start-pre[2]")
        );
        assert!(got[0].3.contains("/nonexistent/b"), "{got:?}");
    }

    #[test]
    fn a_name_too_long_for_its_notify_socket_is_refused() {
        let text = "[service]\nexec = [\"/bin/true\"]\n";
        // /run/holdfast/notify/ is 21 bytes, .sock 5: a name of 81 fits, 82 does not.
        assert_eq!(check(&"n".repeat(81), text, "/run/holdfast"), vec![]);
        let got = check(&"n".repeat(82), text, "/run/holdfast");
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!((got[0].0, got[0].1, got[0].2.as_str()), (0, 0, ""));
        assert!(
            got[0].3.contains("is 108 bytes, more than the 107"),
            "{got:?}"
        );
    }
}
