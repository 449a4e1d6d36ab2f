//! The `[service]` keys about the service's processes, with systemd's
//! syntax: `notify-access`, `kill-signal`, `kill-mode`, the rlimits (`limit-nofile`,
//! `limit-nproc`, `limit-core`, `limit-memlock`: `LimitNOFILE=` syntax with
//! `soft:hard` and `infinity`), the cgroup limits (`memory-max`,
//! `memory-high`, `tasks-max`, `cpu-quota`, `cpu-weight`, `io-weight`),
//! `non-blocking`, `standard-input` and `standard-output`; and what the
//! process is set up with before exec: `umask`, `supplementary-groups`,
//! `no-new-privileges`, `environment-file`.

use super::*;

/// The largest cpu-quota: 100000% (1000 CPUs).
const MAX_CPU_QUOTA: u32 = 100_000;
/// systemd's weight range.
const MAX_WEIGHT: u32 = 10_000;

const SIZE_HINT: &str = "write a number of bytes with an optional K, M, G or T (powers of 1024), e.g. \"512M\", or \"infinity\"";

impl Cx<'_> {
    /// Reads the process keys into `svc`; `take` removes a field by key.
    /// Records in `self.stdio_socket` where a "socket" stdio was asked for.
    pub(super) fn process_keys<'t>(&mut self, svc: &mut ServiceConfig, take: Take<'_, 't>) {
        svc.process.notify_access = NotifyAccess::default_for(svc.kind);
        if let Some(f) = take("notify-access") {
            let access = self.choice(&f, &NotifyAccess::ALL, NotifyAccess::as_str);
            svc.process.notify_access = access.unwrap_or(svc.process.notify_access);
        }
        if let Some(f) = take("kill-signal") {
            svc.process.kill_signal = self.signal(&f).unwrap_or(svc.process.kill_signal);
        }
        if let Some(f) = take("kill-mode") {
            let mode = self.choice(&f, &KillMode::ALL, KillMode::as_str);
            svc.process.kill_mode = mode.unwrap_or(svc.process.kill_mode);
        }
        self.limit_keys(&mut svc.process, take);
        if let Some(f) = take("non-blocking") {
            svc.process.non_blocking = self.bool(&f).unwrap_or(false);
        }
        self.stdio_keys(&mut svc.process, take);
        self.exec_keys(&mut svc.process, take);
    }

    /// The rlimits and the cgroup limits.
    fn limit_keys<'t>(&mut self, p: &mut ProcessConfig, take: Take<'_, 't>) {
        for (key, slot, size) in [
            ("limit-nofile", &mut p.rlimits.nofile, false),
            ("limit-nproc", &mut p.rlimits.nproc, false),
            ("limit-core", &mut p.rlimits.core, true),
            ("limit-memlock", &mut p.rlimits.memlock, true),
        ] {
            if let Some(f) = take(key) {
                *slot = self.rlimit(&f, size);
            }
        }
        let l = &mut p.cgroup_limits;
        for (key, slot, size) in [
            ("memory-max", &mut l.memory_max, true),
            ("memory-high", &mut l.memory_high, true),
            ("tasks-max", &mut l.tasks_max, false),
        ] {
            if let Some(f) = take(key) {
                *slot = self.limit(&f, size);
            }
        }
        if let Some(f) = take("cpu-quota") {
            l.cpu_quota = self.percent(&f);
        }
        if let Some(f) = take("cpu-weight") {
            l.cpu_weight = self.u32(&f, 1, MAX_WEIGHT, 100);
        }
        if let Some(f) = take("io-weight") {
            l.io_weight = self.u32(&f, 1, MAX_WEIGHT, 100);
        }
    }

    /// `standard-input` and `standard-output`.
    fn stdio_keys<'t>(&mut self, p: &mut ProcessConfig, take: Take<'_, 't>) {
        if let Some(f) = take("standard-input") {
            let input = self.choice(&f, &StandardInput::ALL, StandardInput::as_str);
            p.standard_input = input.unwrap_or(p.standard_input);
            if p.standard_input == StandardInput::Socket {
                self.stdio_socket = Some((f.pos, f.path.clone()));
            }
        }
        // systemd's default, `inherit`: the socket when stdin is the socket.
        p.standard_output = match p.standard_input {
            StandardInput::Socket => StandardOutput::Socket,
            StandardInput::Null => StandardOutput::Log,
        };
        if let Some(f) = take("standard-output") {
            let output = self.choice(&f, &StandardOutput::ALL, StandardOutput::as_str);
            p.standard_output = output.unwrap_or(p.standard_output);
            if p.standard_output == StandardOutput::Socket && self.stdio_socket.is_none() {
                self.stdio_socket = Some((f.pos, f.path.clone()));
            }
        }
    }

    /// What the process is set up with before exec: `umask`,
    /// `supplementary-groups`, `no-new-privileges`, `environment-file`.
    fn exec_keys<'t>(&mut self, p: &mut ProcessConfig, take: Take<'_, 't>) {
        if let Some(f) = take("umask") {
            let hint = "write the umask in octal, as \"0022\" or \"0027\"";
            p.umask = self.octal(&f, "umask", 0o777, hint).unwrap_or(p.umask);
        }
        if let Some(f) = take("supplementary-groups") {
            let hint =
                "write a list of group names or ids, e.g. supplementary-groups = [\"adm\", \"44\"]";
            p.supplementary_groups = self.list(&f, hint, &mut Vec::new(), Self::group_name);
        }
        if let Some(f) = take("no-new-privileges") {
            p.no_new_privileges = self.bool(&f).unwrap_or(false);
        }
        if let Some(f) = take("environment-file") {
            let hint = "write a list of absolute paths, e.g. environment-file = [\"/etc/default/web\", \"-/etc/web.env\"] (a leading - lets the file be missing)";
            for item in self.array(&f, hint).unwrap_or_default() {
                if let Some(file) = self.environment_file(&item) {
                    p.environment_files.push(file);
                }
            }
        }
    }

    /// One supplementary group: a name or a numeric id.
    fn group_name(&mut self, f: &Field<'_>) -> Option<String> {
        self.account(f, "\"adm\"")
    }

    /// `"/path"` or `"-/path"` (optional).
    fn environment_file(&mut self, f: &Field<'_>) -> Option<EnvironmentFile> {
        let s = self.string(f, "\"/etc/default/web\"")?;
        let (optional, path) = match s.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, s.as_str()),
        };
        if !path.starts_with('/') {
            let dash = if optional { "-" } else { "" };
            self.field_err(
                f,
                format!("environment file {s:?} is not an absolute path"),
                format!(
                    "write a path that starts with /, e.g. \"{dash}/{}\"",
                    path.trim_start_matches("./")
                ),
            );
            return None;
        }
        Some(EnvironmentFile {
            path: PathBuf::from(path),
            optional,
        })
    }

    /// standard-input or standard-output = "socket" in a unit without a socket.
    pub(super) fn check_stdio_socket(&mut self, sockets: usize) {
        if let (Some((pos, path)), 0) = (self.stdio_socket.take(), sockets) {
            self.err(
                pos,
                path.clone(),
                format!(
                    "{} = \"socket\" needs a socket, and this unit has none",
                    last_key(&path)
                ),
                "add a [[socket]] table, or write \"null\" / \"log\"",
            );
        }
    }

    /// A signal by name (`"SIGTERM"`, `"TERM"`) or number.
    pub(super) fn signal(&mut self, f: &Field<'_>) -> Option<KillSignal> {
        let hint = "write a signal name such as \"SIGTERM\", \"SIGINT\" or \"SIGQUIT\"";
        if let Some(toml_edit::Value::Integer(i)) = f.item.value() {
            let n = *i.value();
            if let Some(n) = i32::try_from(n)
                .ok()
                .filter(|n| signal_name(KillSignal(*n)).is_some())
            {
                return Some(KillSignal(n));
            }
            self.field_err(f, format!("{n} is not a signal number"), hint);
            return None;
        }
        let s = self.string(f, "\"SIGTERM\"")?;
        let upper = s.to_ascii_uppercase();
        let full = if upper.starts_with("SIG") {
            upper
        } else {
            format!("SIG{upper}")
        };
        match full.parse::<nix::sys::signal::Signal>() {
            Ok(sig) if !matches!(sig, nix::sys::signal::Signal::SIGSTOP) => {
                Some(KillSignal(sig as i32))
            }
            _ => {
                self.field_err(
                    f,
                    format!("{s:?} is not a signal that can stop a process"),
                    hint,
                );
                None
            }
        }
    }

    /// `N`, `infinity` or `soft:hard` (each `N` or `infinity`); with `size`,
    /// `N` may carry a K/M/G/T suffix.
    fn rlimit(&mut self, f: &Field<'_>, size: bool) -> Option<Rlimit> {
        let hint = if size {
            "write a size such as \"64M\", \"infinity\", or soft:hard such as \"16M:64M\""
        } else {
            "write a number such as 65536, \"infinity\", or soft:hard such as \"1024:65536\""
        };
        let text = match f.item.value() {
            Some(toml_edit::Value::Integer(i)) if *i.value() >= 0 => i.value().to_string(),
            Some(toml_edit::Value::String(s)) => s.value().trim().to_string(),
            _ => {
                self.type_error(f, "a number or a string", hint);
                return None;
            }
        };
        let one = |s: &str| -> Option<u64> {
            if s == "infinity" {
                Some(Rlimit::INFINITY)
            } else if size {
                parse_size(s)
            } else {
                s.parse::<u64>().ok().filter(|n| *n != Rlimit::INFINITY)
            }
        };
        let parsed = match text.split_once(':') {
            Some((soft, hard)) => one(soft.trim()).zip(one(hard.trim())),
            None => one(&text).map(|n| (n, n)),
        };
        match parsed {
            Some((soft, hard)) if soft <= hard => Some(Rlimit { soft, hard }),
            Some(_) => {
                self.field_err(
                    f,
                    format!("the soft limit in {text:?} is above the hard limit"),
                    "write soft:hard with soft <= hard, e.g. \"1024:65536\"",
                );
                None
            }
            None => {
                self.field_err(f, format!("{text:?} is not a limit"), hint);
                None
            }
        }
    }

    /// A byte size (`size`) or a count, or `infinity`.
    fn limit(&mut self, f: &Field<'_>, size: bool) -> Option<Limit> {
        let hint = if size {
            SIZE_HINT
        } else {
            "write a number of tasks, e.g. 512, or \"infinity\""
        };
        let parsed = match f.item.value() {
            Some(toml_edit::Value::Integer(i)) if *i.value() > 0 => {
                Some(Limit::Value(*i.value() as u64))
            }
            Some(toml_edit::Value::String(s)) => {
                let t = s.value().trim();
                if t == "infinity" {
                    Some(Limit::Infinity)
                } else if size {
                    parse_size(t).filter(|n| *n > 0).map(Limit::Value)
                } else {
                    t.parse::<u64>().ok().filter(|n| *n > 0).map(Limit::Value)
                }
            }
            _ => None,
        };
        if parsed.is_none() {
            let shown = self.raw(f.item).unwrap_or("").trim().to_string();
            self.field_err(f, format!("{} is not a limit", shorten(&shown)), hint);
        }
        parsed
    }

    /// `"N%"`: a share of one CPU.
    fn percent(&mut self, f: &Field<'_>) -> Option<u32> {
        let hint = "write a percentage of one CPU as a string, e.g. \"50%\" (half a CPU) or \"200%\" (two)";
        let s = match f.item.value() {
            Some(toml_edit::Value::String(s)) => s.value().trim().to_string(),
            _ => {
                self.type_error(f, "a percentage string", hint);
                return None;
            }
        };
        match s
            .strip_suffix('%')
            .and_then(|n| n.trim().parse::<u32>().ok())
        {
            Some(n) if (1..=MAX_CPU_QUOTA).contains(&n) => Some(n),
            _ => {
                self.field_err(
                    f,
                    format!("{s:?} is not a percentage between 1% and {MAX_CPU_QUOTA}%"),
                    hint,
                );
                None
            }
        }
    }
}

/// `N`, `NK`, `NM`, `NG`, `NT` (powers of 1024, as systemd), no overflow.
pub(crate) fn parse_size(s: &str) -> Option<u64> {
    let (digits, shift) = match s.as_bytes().last()? {
        b'K' | b'k' => (&s[..s.len() - 1], 10),
        b'M' | b'm' => (&s[..s.len() - 1], 20),
        b'G' | b'g' => (&s[..s.len() - 1], 30),
        b'T' | b't' => (&s[..s.len() - 1], 40),
        _ => (s, 0),
    };
    let n: u64 = digits.trim().parse().ok()?;
    n.checked_mul(1u64 << shift).filter(|v| *v != u64::MAX)
}

/// The name of a signal number (`SIGTERM`), if it is one.
pub(crate) fn signal_name(sig: KillSignal) -> Option<&'static str> {
    nix::sys::signal::Signal::try_from(sig.0)
        .ok()
        .filter(|s| !matches!(s, nix::sys::signal::Signal::SIGSTOP))
        .map(|s| s.as_str())
}
