//! systemd directives → a holdfast [`Unit`]. Each directive is either
//! translated onto a holdfast key, known to mean nothing here (noted when
//! the difference matters), or listed as not translated with why and what
//! to do instead. Where holdfast's defaults differ from systemd's (restart
//! policy, timeouts, restart delay growth), systemd's are written out, so
//! the imported service behaves as it did.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::time::Duration;

use super::ini::Entry;
use super::values;
use crate::unit::{
    EnvironmentFile, IpPrefix, KillSignal, NotifyAccess, PortRange, Protocol, RestartPolicy,
    Rlimit, ServiceConfig, ServiceType, SocketConfig, SocketOptions, StandardInput, StandardOutput,
    Unit,
};

/// A directive that was not translated (or translated with a difference,
/// for a note): where, what, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// `file:line`.
    pub place: String,
    /// `Key=Value` as written.
    pub directive: String,
    pub why: String,
}

/// The parsed files of one import, their specifiers already expanded.
pub struct Input<'a> {
    /// The holdfast service name (the output file's stem).
    pub name: &'a str,
    /// The `.socket` file's assignments, if there is one.
    pub socket: Option<&'a [Entry]>,
    /// Its unit name, e.g. `ssh.socket` (the default FileDescriptorName).
    pub socket_name: &'a str,
    pub service: &'a [Entry],
    /// Its unit name, e.g. `ssh.service` or `saned@.service`.
    pub service_name: &'a str,
}

pub struct Output {
    pub unit: Unit,
    /// `Description=` of the service (or the socket), for the file's header.
    pub description: Option<String>,
    pub dropped: Vec<Finding>,
    pub notes: Vec<Finding>,
}

/// The report being built.
#[derive(Default)]
struct Report {
    dropped: Vec<Finding>,
    notes: Vec<Finding>,
}

fn finding(e: &Entry, why: impl Into<String>) -> Finding {
    Finding {
        place: e.place(),
        directive: format!("{}={}", e.key, e.value),
        why: why.into(),
    }
}

impl Report {
    fn drop(&mut self, e: &Entry, why: impl Into<String>) {
        self.dropped.push(finding(e, why));
    }
    fn note(&mut self, e: &Entry, why: impl Into<String>) {
        self.notes.push(finding(e, why));
    }
}

/// The assignments of one file, and which keys the translator has read.
struct Directives<'a> {
    entries: &'a [Entry],
    read: HashSet<(String, String)>,
}

impl<'a> Directives<'a> {
    fn new(entries: &'a [Entry]) -> Self {
        Directives {
            entries,
            read: HashSet::new(),
        }
    }
    fn all(&mut self, section: &str, key: &str) -> Vec<&'a Entry> {
        self.read.insert((section.into(), key.into()));
        self.entries
            .iter()
            .filter(|e| e.section == section && e.key == key)
            .collect()
    }
    /// A list directive: every value after the last empty assignment (which resets it).
    fn list(&mut self, section: &str, key: &str) -> Vec<&'a Entry> {
        let all = self.all(section, key);
        let start = all
            .iter()
            .rposition(|e| e.value.is_empty())
            .map_or(0, |i| i + 1);
        all[start..].to_vec()
    }
    /// A single-valued directive: the last assignment wins; an empty one means the default.
    fn last(&mut self, section: &str, key: &str) -> Option<&'a Entry> {
        self.all(section, key)
            .last()
            .copied()
            .filter(|e| !e.value.is_empty())
    }
    /// Assignments the translator never read (empty resets left out).
    fn unread(&self) -> impl Iterator<Item = &'a Entry> + '_ {
        self.entries.iter().filter(|e| {
            !e.value.is_empty() && !self.read.contains(&(e.section.clone(), e.key.clone()))
        })
    }
}

// systemd's defaults where holdfast's differ (systemd-system.conf(5)).
const SYSTEMD_TIMEOUT: Duration = Duration::from_secs(90);
const SYSTEMD_RESTART_SEC: Duration = Duration::from_millis(100);
const SYSTEMD_START_LIMIT_BURST: u32 = 5;
const SYSTEMD_START_LIMIT_INTERVAL: Duration = Duration::from_secs(10);

/// systemd targets: ordering against them is the host's business, done
/// by holdfast's own unit (deploy/holdfast.service), not by each service.
fn is_target(name: &str) -> bool {
    name.ends_with(".target")
}

pub fn translate(input: &Input<'_>) -> Output {
    let mut r = Report::default();
    let mut svc = Directives::new(input.service);
    let mut sock = input.socket.map(Directives::new);

    let accept = match sock.as_mut().and_then(|s| s.last("Socket", "Accept")) {
        Some(e) => match values::boolean(&e.value) {
            Ok(b) => b,
            Err(why) => {
                r.drop(e, why);
                false
            }
        },
        None => false,
    };

    let mut service = service_config(&mut svc, &mut r, input, accept);
    let mut sockets = Vec::new();
    if let Some(s) = sock.as_mut() {
        sockets = socket_configs(s, &mut r, input, accept);
        // systemd starts a socket-activated service on the first connection,
        // unless the service is enabled on its own ([Install] WantedBy=).
        let wanted: Vec<&Entry> = ["WantedBy", "RequiredBy", "UpheldBy"]
            .iter()
            .flat_map(|k| svc.list("Install", k))
            .collect();
        if !accept && wanted.is_empty() && !sockets.is_empty() {
            service.on_demand = true;
        }
    }
    let description = svc
        .last("Unit", "Description")
        .or_else(|| sock.as_mut().and_then(|s| s.last("Unit", "Description")))
        .map(|e| e.value.clone());
    unit_section(&mut svc, &mut r, input);
    install_section(&mut svc, &mut r);
    if let Some(s) = sock.as_mut() {
        s.all("Unit", "Description");
        unit_section(s, &mut r, input);
        install_section(s, &mut r);
    }
    for d in std::iter::once(&svc).chain(sock.as_ref()) {
        for e in d.unread() {
            r.drop(e, why_not(&e.section, &e.key));
        }
    }
    Output {
        unit: Unit {
            name: input.name.to_string(),
            path: PathBuf::new(),
            service,
            sockets,
        },
        description,
        dropped: r.dropped,
        notes: r.notes,
    }
}

/// In file order: by file, then line (as a number).
pub fn sort_findings(list: &mut [Finding]) {
    let order = |place: &str| match place.rsplit_once(':') {
        Some((f, l)) => (f.to_string(), l.parse().unwrap_or(0)),
        None => (place.to_string(), 0usize),
    };
    list.sort_by_cached_key(|f| order(&f.place));
}

fn service_config(
    d: &mut Directives<'_>,
    r: &mut Report,
    input: &Input<'_>,
    accept: bool,
) -> ServiceConfig {
    // systemd's defaults where they differ from holdfast's.
    let mut s = ServiceConfig {
        restart: RestartPolicy::Never,
        restart_delay: SYSTEMD_RESTART_SEC,
        restart_delay_max: SYSTEMD_RESTART_SEC,
        stop_timeout: SYSTEMD_TIMEOUT,
        start_timeout: SYSTEMD_TIMEOUT,
        start_limit_burst: SYSTEMD_START_LIMIT_BURST,
        start_limit_interval: SYSTEMD_START_LIMIT_INTERVAL,
        ..ServiceConfig::with_defaults(Vec::new())
    };
    if let Some(kind) = service_type(d, r) {
        s.kind = kind;
    }
    if let Some(restart) = restart_policy(d, r) {
        s.restart = restart;
    }
    // Environment first: ExecStart's $VARs are expanded from it.
    let env_files = environment(d, r, &mut s);
    let starts = d.list(S, "ExecStart");
    if let [first, rest @ ..] = starts.as_slice() {
        s.exec = exec_start(first, r, &s, accept, env_files);
        for e in rest {
            r.drop(
                e,
                "holdfast runs one command per service; only the first ExecStart= is used",
            );
        }
    }
    restart_delays(d, r, &mut s);
    timeouts(d, r, &mut s);
    identity(d, r, &mut s);
    for key in [
        "StartLimitBurst",
        "StartLimitIntervalSec",
        "StartLimitInterval",
    ] {
        start_limit(d, r, &mut s, "Unit", key);
        start_limit(d, r, &mut s, S, key);
    }
    if let Some(e) = d.last(S, "KillMode") {
        match e.value.as_str() {
            "control-group" => s.process.kill_mode = crate::unit::KillMode::ControlGroup,
            "mixed" => s.process.kill_mode = crate::unit::KillMode::Mixed,
            _ => r.drop(e, "holdfast signals the main process (KillMode=mixed) or every process of the service (control-group), nothing else"),
        }
    }
    process_directives(d, r, &mut s, accept);
    exec_setup_directives(d, r, &mut s);
    command_directives(d, r, &mut s, accept, env_files);
    if let Some(e) = d.last(S, "Sockets") {
        let only_ours = e
            .value
            .split_whitespace()
            .all(|n| n == input.socket_name && input.socket.is_some());
        if !only_ours {
            r.drop(e, "import takes one .socket file; import each socket's unit, or merge their Listen*= lines into one .socket");
        }
    }
    s
}

/// The `[Service]` section.
const S: &str = "Service";

/// The `Type=` values holdfast cannot follow: what each is written as, and why.
const UNSUPPORTED_TYPES: &[(&str, ServiceType, &str)] = &[
    ("forking", ServiceType::Simple, "holdfast does not follow forking daemons; run the program in the foreground (its -D, -f or --foreground flag) and keep type = \"simple\", or \"notify\" if it sends READY=1"),
    ("oneshot", ServiceType::Simple, "holdfast supervises long-running services, not one-shot commands; run the command from holdfast.service's ExecStartPre= or a timer instead"),
    ("dbus", ServiceType::Simple, "holdfast does not watch D-Bus names; written as type = \"simple\" (\"notify\" if the program sends READY=1)"),
];

/// `Type=`, when it is given.
fn service_type(d: &mut Directives<'_>, r: &mut Report) -> Option<ServiceType> {
    let e = d.last(S, "Type")?;
    Some(match e.value.as_str() {
        "simple" | "exec" => ServiceType::Simple,
        "notify" => ServiceType::Notify,
        "notify-reload" => ServiceType::NotifyReload,
        "idle" => {
            r.note(
                e,
                "idle is simple with a delayed start; written as type = \"simple\"",
            );
            ServiceType::Simple
        }
        other => match UNSUPPORTED_TYPES.iter().find(|(name, ..)| *name == other) {
            Some((_, kind, why)) => {
                r.drop(e, *why);
                *kind
            }
            None => {
                r.drop(
                    e,
                    format!("unknown Type={other}; written as type = \"simple\""),
                );
                ServiceType::Simple
            }
        },
    })
}

/// `Restart=`, when it is given.
fn restart_policy(d: &mut Directives<'_>, r: &mut Report) -> Option<RestartPolicy> {
    let e = d.last(S, "Restart")?;
    Some(match e.value.as_str() {
        "no" => RestartPolicy::Never,
        "always" => RestartPolicy::Always,
        "on-failure" => RestartPolicy::OnFailure,
        "on-abnormal" | "on-abort" | "on-watchdog" => {
            r.drop(e, format!("holdfast has no {}: written as restart = \"on-failure\", which also restarts after a failing exit code", e.value));
            RestartPolicy::OnFailure
        }
        "on-success" => {
            r.drop(
                e,
                "holdfast has no on-success; written as restart = \"never\"",
            );
            RestartPolicy::Never
        }
        other => {
            r.drop(e, format!("unknown Restart={other}"));
            RestartPolicy::Never
        }
    })
}

/// `Environment=` and `EnvironmentFile=`; whether there is an environment file.
fn environment(d: &mut Directives<'_>, r: &mut Report, s: &mut ServiceConfig) -> bool {
    for e in d.list(S, "Environment") {
        match values::assignments(&e.value) {
            Ok((good, bad)) => {
                for (k, v) in good {
                    s.environment.insert(k, v);
                }
                if !bad.is_empty() {
                    r.drop(e, format!("{bad:?} are not VAR=VALUE assignments"));
                }
            }
            Err(why) => r.drop(e, why),
        }
    }
    let files = d.list(S, "EnvironmentFile");
    for e in &files {
        let (optional, path) = match e.value.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, e.value.as_str()),
        };
        if !path.starts_with('/') {
            r.drop(e, "holdfast needs an absolute path; write it");
        } else if path.contains(['*', '?', '[']) {
            r.drop(
                e,
                "holdfast reads named files, not wildcards; list each file in environment-file",
            );
        } else {
            s.process.environment_files.push(EnvironmentFile {
                path: PathBuf::from(path),
                optional,
            });
        }
    }
    !files.is_empty()
}

/// `RestartSec=`, `RestartMaxDelaySec=`, `RestartSteps=`.
fn restart_delays(d: &mut Directives<'_>, r: &mut Report, s: &mut ServiceConfig) {
    if let Some(e) = d.last(S, "RestartSec") {
        match values::timespan(&e.value) {
            Ok(Some(t)) => s.restart_delay = t,
            Ok(None) => r.drop(
                e,
                "an infinite restart delay means no restart: write Restart=no",
            ),
            Err(why) => r.drop(e, why),
        }
    }
    s.restart_delay_max = s.restart_delay;
    if let Some(e) = d.last(S, "RestartMaxDelaySec") {
        match values::timespan(&e.value) {
            Ok(Some(t)) if t >= s.restart_delay => s.restart_delay_max = t,
            Ok(Some(_)) => r.drop(
                e,
                "less than RestartSec=; holdfast keeps the delay at RestartSec=",
            ),
            Ok(None) => r.drop(
                e,
                "holdfast caps the delay; write a finite RestartMaxDelaySec=",
            ),
            Err(why) => r.drop(e, why),
        }
    }
    if let Some(e) = d.last(S, "RestartSteps") {
        if e.value != "0" {
            r.note(e, "holdfast doubles the delay after each quick failure up to restart-delay-max, instead of reaching it in RestartSteps= steps");
        }
    }
}

/// The start and stop timeouts, `WatchdogSec=`, `FileDescriptorStoreMax=`.
fn timeouts(d: &mut Directives<'_>, r: &mut Report, s: &mut ServiceConfig) {
    let timespan = |r: &mut Report, e: &Entry| match values::timespan(&e.value) {
        Ok(Some(t)) if !t.is_zero() => Some(t),
        Ok(_) => {
            r.drop(e, "holdfast needs a finite, non-zero time; write one");
            None
        }
        Err(why) => {
            r.drop(e, why);
            None
        }
    };
    for (key, stop) in [
        ("TimeoutSec", false),
        ("TimeoutStartSec", false),
        ("TimeoutSec", true),
        ("TimeoutStopSec", true),
    ] {
        if let Some(t) = d.last(S, key).and_then(|e| timespan(r, e)) {
            if stop {
                s.stop_timeout = t;
            } else {
                s.start_timeout = t;
            }
        }
    }
    if let Some(e) = d.last(S, "WatchdogSec") {
        match values::timespan(&e.value) {
            Ok(t) => s.watchdog = t.filter(|t| !t.is_zero()),
            Err(why) => r.drop(e, why),
        }
    }
    if let Some(e) = d.last(S, "FileDescriptorStoreMax") {
        match e.value.parse::<u32>() {
            Ok(n) if n <= 65536 => s.fd_store_max = n,
            _ => r.drop(
                e,
                "holdfast keeps 0 to 65536 fds; write a number in that range",
            ),
        }
    }
}

/// Whether holdfast takes `v` as a user or group name (or id).
fn account_name(v: &str) -> bool {
    !v.is_empty()
        && !v.contains(|c: char| c.is_whitespace() || c == ':' || c == '/')
        && !v.starts_with('-')
}

/// `User=`, `Group=`, `DynamicUser=`, `WorkingDirectory=`.
fn identity(d: &mut Directives<'_>, r: &mut Report, s: &mut ServiceConfig) {
    for (key, slot) in [("User", &mut s.user), ("Group", &mut s.group)] {
        if let Some(e) = d.last(S, key) {
            if account_name(&e.value) {
                *slot = Some(e.value.clone());
            } else {
                r.drop(
                    e,
                    format!("{:?} is not a user or group name holdfast accepts", e.value),
                );
            }
        }
    }
    if let Some(e) = d.last(S, "DynamicUser") {
        if values::boolean(&e.value) == Ok(true) {
            r.drop(
                e,
                "holdfast has no dynamic users; create a system user and set User=",
            );
        }
    }
    if let Some(e) = d.last(S, "WorkingDirectory") {
        let v = e.value.strip_prefix('-').unwrap_or(&e.value);
        if v.starts_with('/') {
            s.working_directory = Some(PathBuf::from(v));
            if v.len() != e.value.len() {
                r.note(e, "holdfast needs the directory to exist (the - that let systemd ignore a missing one is dropped)");
            }
        } else {
            r.drop(
                e,
                "holdfast needs an absolute working directory; write the path",
            );
        }
    }
}

/// `UMask=`, `SupplementaryGroups=`, `NoNewPrivileges=`.
fn exec_setup_directives(d: &mut Directives<'_>, r: &mut Report, s: &mut ServiceConfig) {
    let p = &mut s.process;
    if let Some(e) = d.last(S, "UMask") {
        match u32::from_str_radix(&e.value, 8) {
            Ok(m) if m <= 0o777 => p.umask = m,
            _ => r.drop(e, "write the umask in octal, at most 0777, e.g. UMask=0027"),
        }
    }
    for e in d.list(S, "SupplementaryGroups") {
        for g in e.value.split_whitespace() {
            if !account_name(g) {
                r.drop(e, format!("{g:?} is not a group name holdfast accepts"));
            } else if !p.supplementary_groups.iter().any(|have| have == g) {
                p.supplementary_groups.push(g.to_string());
            }
        }
    }
    if let Some(e) = d.last(S, "NoNewPrivileges") {
        match values::boolean(&e.value) {
            Ok(b) => p.no_new_privileges = b,
            Err(why) => r.drop(e, why),
        }
    }
}

fn start_limit(
    d: &mut Directives<'_>,
    r: &mut Report,
    s: &mut ServiceConfig,
    section: &str,
    key: &str,
) {
    let Some(e) = d.last(section, key) else {
        return;
    };
    if key == "StartLimitBurst" {
        match e.value.parse::<u32>() {
            Ok(n) if n >= 1 => s.start_limit_burst = n,
            _ => r.drop(e, "write a burst of at least 1"),
        }
        return;
    }
    match values::timespan(&e.value) {
        Ok(Some(t)) if !t.is_zero() => s.start_limit_interval = t,
        Ok(_) => r.drop(
            e,
            "holdfast always limits starts; write a finite interval (the default is 10s)",
        ),
        Err(why) => r.drop(e, why),
    }
}

fn exec_start(
    e: &Entry,
    r: &mut Report,
    s: &ServiceConfig,
    accept: bool,
    has_env_file: bool,
) -> Vec<String> {
    let line = match values::exec_line(&e.value) {
        Ok(l) => l,
        Err(why) => {
            r.drop(e, why);
            return Vec::new();
        }
    };
    let mut words = line.words.clone();
    if !line.no_env {
        let (expanded, missing) = values::expand_env(&words, &s.environment);
        words = expanded;
        for name in missing {
            let from = if has_env_file {
                " (it may come from the environment-file: holdfast passes its variables to the program, but does not expand them in exec; write the value into exec or Environment=)"
            } else {
                ""
            };
            r.note(e, format!("${name} is set by no Environment= here{from}: it stands for nothing, as it would under systemd"));
        }
    }
    if line.argv0 && words.len() >= 2 {
        let program = words.remove(0);
        let argv0 = &words[0];
        let base = program.rsplit('/').next().unwrap_or(&program);
        if argv0 != &program && argv0 != base {
            r.drop(e, format!("holdfast cannot set argv[0] (@): {program} runs with argv[0] = {program}, not {argv0}"));
        }
        words[0] = program;
    }
    if line.ignore_failure && !accept && s.restart == RestartPolicy::OnFailure {
        r.drop(e, "holdfast counts a failing exit code as a failure (the - prefix has no equivalent): with restart = \"on-failure\" it restarts the service");
    }
    for c in &line.unsupported {
        let why = match c {
            '+' => "holdfast runs the command as User=/Group= (the + prefix for full privileges has no equivalent)",
            '!' => "holdfast has no ambient capabilities (the ! prefix)",
            _ => "holdfast does not run commands through a shell (the | prefix); write the program and its arguments",
        };
        r.drop(e, why);
    }
    words
}

/// The commands beside the main process: `ExecStartPre=`, `ExecStartPost=`,
/// `ExecStop=`, `ExecReload=` onto the keys of the same names, each line
/// read as `ExecStart=` is (prefixes, quoting, `$VAR`s), its `-` kept,
/// `$MAINPID` left for holdfast to fill in where systemd does; and
/// `ReloadSignal=` of a notify-reload service.
fn command_directives(
    d: &mut Directives<'_>,
    r: &mut Report,
    s: &mut ServiceConfig,
    accept: bool,
    has_env_file: bool,
) {
    let notify_reload = s.kind == ServiceType::NotifyReload;
    if let Some(e) = d.last(S, "ReloadSignal") {
        match values::signal(&e.value) {
            Ok(n) if notify_reload => s.commands.reload_signal = Some(KillSignal(n)),
            Ok(_) => r.drop(
                e,
                "holdfast sends reload-signal only to a Type=notify-reload service",
            ),
            Err(why) => r.drop(e, why),
        }
    }
    // With $MAINPID standing for itself, for holdfast to replace at run time.
    let mut with_main_pid = s.clone();
    with_main_pid
        .environment
        .insert("MAINPID".into(), "$MAINPID".into());
    for (key, main_pid) in [
        ("ExecStartPre", false),
        ("ExecStartPost", true),
        ("ExecStop", true),
        ("ExecReload", true),
    ] {
        let lines = d.list(S, key);
        if accept {
            for e in lines {
                r.drop(e, format!("with Accept=yes holdfast starts each connection's process at once and stops it with kill-signal: {} does not run; do its work in the program, or on the host", kebab(key)));
            }
            continue;
        }
        if key == "ExecReload" && notify_reload {
            for e in lines {
                r.drop(e, "a Type=notify-reload service is reloaded by its reload-signal in holdfast, with no exec-reload beside it; holdfast reload-service sends the signal");
            }
            continue;
        }
        let env = if main_pid { &with_main_pid } else { &*s };
        let commands: Vec<_> = lines
            .into_iter()
            .filter_map(|e| exec_command(e, r, env, has_env_file))
            .collect();
        let c = &mut s.commands;
        match key {
            "ExecStartPre" => c.start_pre = commands,
            "ExecStartPost" => c.start_post = commands,
            "ExecStop" => c.stop = commands,
            _ => c.reload = commands,
        }
    }
}

/// One `ExecStartPre=`-like line as a command; `None` (reported) when it
/// cannot be read.
fn exec_command(
    e: &Entry,
    r: &mut Report,
    s: &ServiceConfig,
    has_env_file: bool,
) -> Option<crate::unit::ExecCommand> {
    // As ExecStart= (what cannot be translated is reported there), but a
    // `-` is kept: its failure is ignored.
    let argv = exec_start(e, r, s, true, has_env_file);
    let ignore_failure = values::exec_line(&e.value).ok()?.ignore_failure;
    (!argv.is_empty()).then_some(crate::unit::ExecCommand {
        argv,
        ignore_failure,
    })
}

/// The directives holdfast's process keys take (`notify-access`, `kill-signal`, the
/// rlimits, the cgroup limits, `non-blocking`, `standard-input`/`-output`).
fn process_directives(d: &mut Directives<'_>, r: &mut Report, s: &mut ServiceConfig, accept: bool) {
    let p = &mut s.process;
    p.notify_access = NotifyAccess::default_for(s.kind);
    if let Some(e) = d.last(S, "NotifyAccess") {
        match e.value.as_str() {
            "none" => p.notify_access = NotifyAccess::None,
            "main" => p.notify_access = NotifyAccess::Main,
            "exec" => p.notify_access = NotifyAccess::Exec,
            "all" => p.notify_access = NotifyAccess::All,
            other => r.drop(e, format!("{other:?} is not none, main, exec or all")),
        }
    }
    if let Some(e) = d.last(S, "KillSignal") {
        match values::signal(&e.value) {
            Ok(n) => p.kill_signal = KillSignal(n),
            Err(why) => r.drop(e, why),
        }
    }
    limit_directives(d, r, p);
    if let Some(e) = d.last(S, "NonBlocking") {
        match values::boolean(&e.value) {
            Ok(b) => p.non_blocking = b,
            Err(why) => r.drop(e, why),
        }
    }
    if let Some(e) = d.last(S, "StandardInput") {
        match (e.value.as_str(), accept) {
            ("null", false) => p.standard_input = StandardInput::Null,
            ("socket", _) => p.standard_input = StandardInput::Socket,
            ("null", true) => r.drop(e, "holdfast's accept mode puts the connection on stdin (and fd 3) whatever standard-input says"),
            _ => r.drop(e, "holdfast's standard-input is null or socket"),
        }
    }
    for key in ["StandardOutput", "StandardError"] {
        if let Some(e) = d.last(S, key) {
            match e.value.as_str() {
                "journal" | "inherit" | "journal+console" | "kmsg" | "kmsg+console" | "syslog" => {}
                "socket" if key == "StandardOutput" => p.standard_output = StandardOutput::Socket,
                _ => r.drop(e, "holdfast captures stdout and stderr into its log (holdfast logs NAME); redirect in the program if it must write a file"),
            }
        }
    }
}

/// `Limit*=` and the cgroup limits.
fn limit_directives(d: &mut Directives<'_>, r: &mut Report, p: &mut crate::unit::ProcessConfig) {
    for (key, slot, bytes) in [
        ("LimitNOFILE", &mut p.rlimits.nofile, false),
        ("LimitNPROC", &mut p.rlimits.nproc, false),
        ("LimitCORE", &mut p.rlimits.core, true),
        ("LimitMEMLOCK", &mut p.rlimits.memlock, true),
    ] {
        if let Some(e) = d.last(S, key) {
            match values::rlimit(&e.value, bytes) {
                Ok((soft, hard)) => *slot = Some(Rlimit { soft, hard }),
                Err(why) => r.drop(e, why),
            }
        }
    }
    let c = &mut p.cgroup_limits;
    for (key, slot, bytes) in [
        ("MemoryMax", &mut c.memory_max, true),
        ("MemoryHigh", &mut c.memory_high, true),
        ("TasksMax", &mut c.tasks_max, false),
    ] {
        if let Some(e) = d.last(S, key) {
            match values::limit(&e.value, bytes) {
                Ok(l) => *slot = Some(l),
                Err(why) => r.drop(e, why),
            }
        }
    }
    if let Some(e) = d.last(S, "CPUQuota") {
        match e
            .value
            .strip_suffix('%')
            .and_then(|n| n.parse::<u32>().ok())
        {
            Some(n) if (1..=100_000).contains(&n) => c.cpu_quota = Some(n),
            _ => r.drop(e, "write a percentage of one CPU, e.g. CPUQuota=50%"),
        }
    }
    for (key, slot) in [
        ("CPUWeight", &mut c.cpu_weight),
        ("IOWeight", &mut c.io_weight),
    ] {
        if let Some(e) = d.last(S, key) {
            match e.value.parse::<u32>() {
                Ok(n) if (1..=10_000).contains(&n) => *slot = Some(n),
                _ => r.drop(e, "holdfast takes a weight from 1 to 10000"),
            }
        }
    }
}

fn unit_section(d: &mut Directives<'_>, r: &mut Report, input: &Input<'_>) {
    const U: &str = "Unit";
    d.all(U, "Description");
    d.all(U, "Documentation");
    d.all(U, "DefaultDependencies");
    let ours = |n: &str| n == input.socket_name || n == input.service_name;
    for key in [
        "After",
        "Before",
        "Wants",
        "Requires",
        "BindsTo",
        "PartOf",
        "Requisite",
        "Upholds",
    ] {
        for e in d.list(U, key) {
            let others: Vec<&str> = e
                .value
                .split_whitespace()
                .filter(|n| !ours(n) && !is_target(n))
                .collect();
            if !others.is_empty() {
                r.drop(e, format!("holdfast has no dependencies between services: {} is not started or ordered with it", others.join(" ")));
            }
        }
    }
    for e in d.list(U, "Conflicts") {
        r.drop(e, "holdfast has no conflicts between services");
    }
}

fn install_section(d: &mut Directives<'_>, r: &mut Report) {
    const I: &str = "Install";
    // Enablement: a unit in holdfast's units directory is enabled.
    for key in [
        "WantedBy",
        "RequiredBy",
        "UpheldBy",
        "Also",
        "DefaultInstance",
    ] {
        d.all(I, key);
    }
    for e in d.list(I, "Alias") {
        r.drop(e, "holdfast knows a service by its file name only; copy the file under the other name if both are needed");
    }
}

/// What to say about a directive the translator does not read.
fn why_not(section: &str, key: &str) -> String {
    let no_key = |k: &str| format!("holdfast has no {k} key yet");
    match key {
        "ExecCondition" => format!(
            "{}; run it in a wrapper that then execs the program, or on the host before holdfast starts",
            no_key(&kebab(key))
        ),
        "ExecStopPost" => format!(
            "{}; holdfast stops a service with SIGTERM to its process group, then SIGKILL after stop-timeout",
            no_key(&kebab(key))
        ),
        k if k.starts_with("Limit") => no_key(&kebab(k)),
        "RuntimeDirectory" | "StateDirectory" | "CacheDirectory" | "LogsDirectory"
        | "ConfigurationDirectory" | "RuntimeDirectoryMode" | "StateDirectoryMode" => {
            "holdfast does not create directories for a service; create it on the host (tmpfiles.d, or the image)".into()
        }
        "PIDFile" | "GuessMainPID" | "RemainAfterExit" => {
            "holdfast follows the process it started; this applies to forking or one-shot services".into()
        }
        "RestartPreventExitStatus" | "RestartForceExitStatus" | "SuccessExitStatus" => {
            "holdfast has no exit-status lists; a non-zero exit is a failure".into()
        }
        "ListenFIFO" | "ListenSpecial" | "ListenNetlink" | "ListenMessageQueue"
        | "ListenUSBFunction" => "holdfast creates IP and unix sockets only".into(),
        "BindToDevice" => "holdfast has no bind-to-device; steer by address prefix instead".into(),
        k if k.starts_with("Condition") || k.starts_with("Assert") => {
            "holdfast has no conditions: a unit in its directory runs; leave the file out where it should not".into()
        }
        k if k.starts_with("Protect")
            || k.starts_with("Private")
            || k.starts_with("Restrict")
            || k.starts_with("SystemCall")
            || k.starts_with("ReadWrite")
            || k.starts_with("ReadOnly")
            || k.starts_with("Inaccessible")
            || k.starts_with("Capability")
            || k.starts_with("AmbientCapabilities")
            || k.starts_with("Lock")
            || k == "MemoryDenyWriteExecute" =>
        {
            "holdfast has no sandboxing of its own; run holdfast itself confined (deploy/README.md), or confine the program".into()
        }
        _ => format!("holdfast has no equivalent of [{section}] {key}="),
    }
}

/// `ExecStartPre` → `exec-start-pre`.
fn kebab(key: &str) -> String {
    let mut out = String::new();
    let chars: Vec<char> = key.chars().collect();
    for (i, c) in chars.iter().enumerate() {
        let next_lower = chars.get(i + 1).is_some_and(|n| n.is_ascii_lowercase());
        let prev = if i > 0 { Some(chars[i - 1]) } else { None };
        // A word starts at an upper-case letter after a lower-case one (StartPre),
        // or at the last capital of an acronym (CPUQuota), not after a lone capital (UMask).
        let starts_word = match prev {
            Some(p) if p.is_ascii_lowercase() => true,
            Some(_) => i >= 2 && next_lower,
            None => false,
        };
        if c.is_ascii_uppercase() && starts_word {
            out.push('-');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

/// One `Listen*=` line, read.
struct Listen<'a> {
    entry: &'a Entry,
    protocol: Protocol,
    addresses: Vec<IpPrefix>,
    port: Option<PortRange>,
    path: Option<PathBuf>,
}

/// The prefix with its host bits cleared (the unit parser's own).
fn prefix(addr: IpAddr, len: u8) -> IpPrefix {
    crate::unit::masked(addr, len)
}

const ANY4: IpPrefix = IpPrefix {
    addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    len: 0,
};
const ANY6: IpPrefix = IpPrefix {
    addr: IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    len: 0,
};

/// `ListenStream=`/`ListenDatagram=` values: `PORT`, `ADDR:PORT`,
/// `[V6]:PORT`, `/path`. The unspecified address (and a bare port) become
/// every address of the family, the /0 prefix; `v6_only` keeps IPv4 out.
fn listen<'a>(e: &'a Entry, stream: bool, v6_only: bool) -> Result<Listen<'a>, String> {
    let v = e.value.as_str();
    let (ip, unix) = if stream {
        (Protocol::Tcp, Protocol::UnixStream)
    } else {
        (Protocol::Udp, Protocol::UnixDgram)
    };
    let port = |p: &str| -> Result<PortRange, String> {
        match p.parse::<u16>() {
            Ok(n) if n >= 1 => Ok(PortRange { first: n, last: n }),
            _ => Err(format!("{p:?} is not a port between 1 and 65535")),
        }
    };
    let every = |family_v6: bool| -> Vec<IpPrefix> {
        match (family_v6, v6_only) {
            (false, _) => vec![ANY4],
            (true, true) => vec![ANY6],
            (true, false) => vec![ANY4, ANY6],
        }
    };
    if v.starts_with('/') {
        if v.len() > 107 {
            return Err("the path is longer than the 107 bytes bind() takes".into());
        }
        return Ok(Listen {
            entry: e,
            protocol: unix,
            addresses: Vec::new(),
            port: None,
            path: Some(PathBuf::from(v)),
        });
    }
    if v.starts_with('@') {
        return Err(
            "holdfast has no abstract unix sockets; listen on a path such as /run/NAME.sock".into(),
        );
    }
    if v.starts_with("vsock:") {
        return Err("holdfast has no AF_VSOCK sockets".into());
    }
    if v.bytes().all(|b| b.is_ascii_digit()) {
        return Ok(Listen {
            entry: e,
            protocol: ip,
            addresses: every(true),
            port: Some(port(v)?),
            path: None,
        });
    }
    let (host, p) = if let Some(rest) = v.strip_prefix('[') {
        let (h, p) = rest
            .split_once("]:")
            .ok_or_else(|| format!("{v:?} is not [ADDRESS]:PORT"))?;
        if h.contains('%') {
            return Err("holdfast has no link-local scope (%interface) on a listen address".into());
        }
        (h, p)
    } else {
        v.rsplit_once(':')
            .ok_or_else(|| format!("{v:?} is not PORT, ADDRESS:PORT, [ADDRESS]:PORT or /path"))?
    };
    let addr: IpAddr = host
        .parse()
        .map_err(|_| format!("{host:?} is not an IP address (holdfast does not resolve names)"))?;
    let addresses = if addr.is_unspecified() {
        every(addr.is_ipv6())
    } else {
        vec![prefix(addr, if addr.is_ipv4() { 32 } else { 128 })]
    };
    Ok(Listen {
        entry: e,
        protocol: ip,
        addresses,
        port: Some(port(p)?),
        path: None,
    })
}

/// `IPAddressAllow=`/`IPAddressDeny=` words: prefixes and systemd's names.
fn ip_rules(value: &str) -> Result<Vec<IpPrefix>, String> {
    let mut out = Vec::new();
    for w in value.split_whitespace() {
        let named: &[(&str, u8)] = match w {
            "any" => &[("0.0.0.0", 0), ("::", 0)],
            "localhost" => &[("127.0.0.0", 8), ("::1", 128)],
            "link-local" => &[("169.254.0.0", 16), ("fe80::", 64)],
            "multicast" => &[("224.0.0.0", 4), ("ff00::", 8)],
            _ => &[],
        };
        if !named.is_empty() {
            for (a, l) in named {
                out.push(prefix(a.parse().expect("a literal address"), *l));
            }
            continue;
        }
        let (a, l) = match w.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (w, None),
        };
        let addr: IpAddr = a.parse().map_err(|_| {
            format!("{w:?} is not an address, a prefix or any/localhost/link-local/multicast")
        })?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match l {
            None => max,
            Some(l) => l
                .parse::<u8>()
                .ok()
                .filter(|n| *n <= max)
                .ok_or_else(|| format!("{w:?} has a bad prefix length"))?,
        };
        out.push(prefix(addr, len));
    }
    Ok(out)
}

fn overlaps(a: &IpPrefix, b: &IpPrefix) -> bool {
    a.contains(b.addr) || b.contains(a.addr)
}

/// The `[Socket]` section.
const K: &str = "Socket";

fn socket_configs(
    d: &mut Directives<'_>,
    r: &mut Report,
    input: &Input<'_>,
    accept: bool,
) -> Vec<SocketConfig> {
    let mut o = SocketOptions {
        accept,
        ..SocketOptions::default()
    };
    let mut v6_only = false;
    if let Some(e) = d.last(K, "BindIPv6Only") {
        match e.value.as_str() {
            "default" => {}
            "both" => o.ipv6_only = Some(false),
            "ipv6-only" => {
                o.ipv6_only = Some(true);
                v6_only = true;
            }
            other => r.drop(e, format!("{other:?} is not default, both or ipv6-only")),
        }
    }
    kernel_options(d, r, &mut o);
    unix_file_options(d, r, &mut o);
    accept_limits(d, r, &mut o, accept);
    let name = match d.last(K, "FileDescriptorName") {
        Some(e) => e.value.clone(),
        None => input.socket_name.to_string(),
    };
    d.all(K, "Service"); // read by the caller to find the service
    source_rules(d, r, &mut o);

    let mut sockets = Vec::new();
    for (i, l) in listens(d, r, v6_only).into_iter().enumerate() {
        let opts = fit_options(&o, &l, r);
        let sock_name = if i == 0 {
            name.clone()
        } else {
            let n = format!("{name}-{}", i + 1);
            r.note(l.entry, format!("holdfast names each socket apart: LISTEN_FDNAMES has {n} for this one (systemd would repeat {name})"));
            n
        };
        sockets.push(SocketConfig {
            name: sock_name,
            protocol: l.protocol,
            addresses: l.addresses,
            ports: l.port.into_iter().collect(),
            path: l.path,
            options: opts,
        });
    }
    sockets
}

/// A boolean `[Socket]` directive, when it is given and valid.
fn socket_bool(d: &mut Directives<'_>, r: &mut Report, key: &str) -> Option<bool> {
    let e = d.last(K, key)?;
    match values::boolean(&e.value) {
        Ok(b) => Some(b),
        Err(why) => {
            r.drop(e, why);
            None
        }
    }
}

/// The options the kernel socket is made with: flags, buffers, backlog, mark.
fn kernel_options(d: &mut Directives<'_>, r: &mut Report, o: &mut SocketOptions) {
    for (_, directive, slot) in o.flags_mut() {
        if let Some(b) = socket_bool(d, r, directive) {
            *slot = b;
        }
    }
    let int_max = i32::MAX as u64;
    for (key, slot) in [
        ("ReceiveBuffer", &mut o.receive_buffer),
        ("SendBuffer", &mut o.send_buffer),
    ] {
        if let Some(e) = d.last(K, key) {
            match values::size(&e.value) {
                Ok(n) if (1..=int_max).contains(&n) => *slot = Some(n as u32),
                Ok(_) => r.drop(e, "write a size between 1 and 2G"),
                Err(why) => r.drop(e, why),
            }
        }
    }
    if let Some(e) = d.last(K, "Backlog") {
        match e.value.parse::<u64>() {
            Ok(n) if (1..=int_max).contains(&n) => o.backlog = Some(n as u32),
            _ => r.drop(e, "write a backlog between 1 and 2147483647"),
        }
    }
    if let Some(e) = d.last(K, "Mark") {
        match e.value.parse::<u32>() {
            Ok(n) => o.mark = Some(n),
            Err(_) => r.drop(e, "write the mark as a number"),
        }
    }
}

/// `SocketMode=`, `SocketUser=`, `SocketGroup=`, `RemoveOnStop=`: a unix socket's file.
fn unix_file_options(d: &mut Directives<'_>, r: &mut Report, o: &mut SocketOptions) {
    if let Some(e) = d.last(K, "SocketMode") {
        match u32::from_str_radix(&e.value, 8) {
            Ok(m) if m <= 0o7777 => o.mode = Some(m),
            _ => r.drop(e, "write the mode in octal, e.g. 0660"),
        }
    }
    for (key, slot) in [
        ("SocketUser", &mut o.socket_user),
        ("SocketGroup", &mut o.socket_group),
    ] {
        if let Some(e) = d.last(K, key) {
            if account_name(&e.value) {
                *slot = Some(e.value.clone());
            } else {
                r.drop(
                    e,
                    format!("{:?} is not a user or group name holdfast accepts", e.value),
                );
            }
        }
    }
    if let Some(b) = socket_bool(d, r, "RemoveOnStop") {
        o.remove_on_stop = b;
    }
}

/// `MaxConnections=`, `MaxConnectionsPerSource=`: only with `Accept=yes`.
fn accept_limits(d: &mut Directives<'_>, r: &mut Report, o: &mut SocketOptions, accept: bool) {
    if !accept {
        // systemd: "only has an effect for sockets configured with Accept=yes".
        d.all(K, "MaxConnections");
        d.all(K, "MaxConnectionsPerSource");
        return;
    }
    if let Some(e) = d.last(K, "MaxConnections") {
        match e.value.parse::<u32>() {
            Ok(n) if (1..=65536).contains(&n) => o.max_connections = Some(n),
            _ => r.drop(e, "holdfast allows 1 to 65536 instances at once"),
        }
    }
    if let Some(e) = d.last(K, "MaxConnectionsPerSource") {
        match e.value.parse::<u32>() {
            Ok(n) if (1..=65536).contains(&n) => o.max_connections_per_source = Some(n),
            _ => r.drop(e, "holdfast allows 1 to 65536 instances per source"),
        }
    }
}

/// Source rules. systemd grants what Allow matches, else refuses what Deny
/// matches; holdfast refuses what deny matches, else needs allow (when
/// set). They agree when Deny is everything (allow = Allow), or when no
/// Allow prefix overlaps a Deny one (deny = Deny).
fn source_rules(d: &mut Directives<'_>, r: &mut Report, o: &mut SocketOptions) {
    let mut rules = |key: &str| -> (Vec<IpPrefix>, Vec<&Entry>) {
        let mut out = Vec::new();
        let entries = d.list(K, key);
        for e in &entries {
            match ip_rules(&e.value) {
                Ok(p) => out.extend(p),
                Err(why) => r.drop(e, why),
            }
        }
        (out, entries)
    };
    let (allow, allow_e) = rules("IPAddressAllow");
    let (deny, deny_e) = rules("IPAddressDeny");
    let deny_all = deny.contains(&ANY4) && deny.contains(&ANY6);
    if deny_all && !allow.is_empty() {
        o.allow = allow;
    } else if deny_all || !allow.iter().any(|a| deny.iter().any(|b| overlaps(a, b))) {
        o.deny = deny;
    } else {
        for e in allow_e.iter().chain(&deny_e) {
            r.drop(e, "holdfast's deny wins over allow, systemd's allow wins over deny: an IPAddressAllow= prefix inside an IPAddressDeny= one cannot be written; list only what to refuse in deny");
        }
    }
}

/// Every `Listen*=` line holdfast can create, in file order.
fn listens<'a>(d: &mut Directives<'a>, r: &mut Report, v6_only: bool) -> Vec<Listen<'a>> {
    let mut out = Vec::new();
    for (key, stream) in [("ListenStream", true), ("ListenDatagram", false)] {
        for e in d.list(K, key) {
            match listen(e, stream, v6_only) {
                Ok(l) => out.push(l),
                Err(why) => r.drop(e, why),
            }
        }
    }
    for e in d.list(K, "ListenSequentialPacket") {
        r.drop(
            e,
            "holdfast has no SOCK_SEQPACKET sockets; ListenStream= on the same path is the nearest",
        );
    }
    out.sort_by_key(|l| l.entry.line);
    out
}

/// The socket options `o` as they apply to `l`'s kind of socket: the others
/// are ignored, as systemd does.
fn fit_options(o: &SocketOptions, l: &Listen<'_>, r: &mut Report) -> SocketOptions {
    let mut opts = o.clone();
    let p = l.protocol;
    if !p.is_ip() {
        opts.reuse_port = false;
        opts.free_bind = false;
        opts.transparent = false;
        opts.ipv6_only = None;
        opts.allow.clear();
        opts.deny.clear();
    } else {
        opts.mode = None;
        opts.socket_user = None;
        opts.socket_group = None;
        opts.remove_on_stop = false;
        if opts.ipv6_only.is_some() && !l.addresses.iter().all(|a| a.addr.is_ipv6()) {
            opts.ipv6_only = None;
        }
    }
    if p != Protocol::Tcp {
        opts.keep_alive = false;
        opts.no_delay = false;
    }
    if matches!(p, Protocol::Udp | Protocol::UnixDgram) {
        opts.backlog = None;
        if opts.accept {
            r.drop(l.entry, "Accept=yes applies to stream sockets; holdfast starts the service on a datagram's arrival with on-demand instead");
            opts.accept = false;
            opts.max_connections = None;
            opts.max_connections_per_source = None;
        }
    }
    opts
}

#[cfg(test)]
mod tests {
    use super::kebab;

    #[test]
    fn directive_names_become_kebab_case() {
        for (from, to) in [
            ("ExecStartPre", "exec-start-pre"),
            ("LimitNOFILE", "limit-nofile"),
            ("CPUQuota", "cpu-quota"),
            ("UMask", "umask"),
            ("NoNewPrivileges", "no-new-privileges"),
        ] {
            assert_eq!(kebab(from), to, "{from}");
        }
    }
}
