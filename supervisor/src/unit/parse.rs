//! One unit file: TOML text → [`Unit`], with every mistake in the file
//! collected (not just the first), each placed at the key or value it is
//! about. Also records where each socket's bindings were written, so the
//! cross-unit checks can point at them.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml_edit::{ImDocument, Item, TableLike};

use super::diag::{Diagnostic, Diagnostics, LineIndex, Pos};
use super::model::*;

mod commands;
mod process;
pub(crate) use process::signal_name;

pub(crate) const DEFAULT_RESTART_DELAY: Duration = Duration::from_millis(100);
pub(crate) const DEFAULT_RESTART_DELAY_MAX: Duration = Duration::from_secs(30);
pub(crate) const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);
pub(crate) const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(30);
pub(crate) const DEFAULT_START_LIMIT_BURST: u32 = 5;
pub(crate) const DEFAULT_START_LIMIT_INTERVAL: Duration = Duration::from_secs(10);
/// Removes a table's field by key, for the `*_keys` readers: what is left
/// after them all is unknown.
type Take<'a, 't> = &'a mut dyn FnMut(&str) -> Option<Field<'t>>;

impl ServiceConfig {
    /// What a `[service]` that sets only `exec` gets: a simple service,
    /// restarted on failure, with the `DEFAULT_*` timings above.
    pub fn with_defaults(exec: Vec<String>) -> ServiceConfig {
        ServiceConfig {
            exec,
            kind: ServiceType::Simple,
            restart: RestartPolicy::OnFailure,
            restart_mode: RestartMode::StopStart,
            overlap_grace: Duration::ZERO,
            restart_delay: DEFAULT_RESTART_DELAY,
            restart_delay_max: DEFAULT_RESTART_DELAY_MAX,
            stop_timeout: DEFAULT_STOP_TIMEOUT,
            start_timeout: DEFAULT_START_TIMEOUT,
            start_limit_burst: DEFAULT_START_LIMIT_BURST,
            start_limit_interval: DEFAULT_START_LIMIT_INTERVAL,
            watchdog: None,
            fd_store_max: 0,
            single_instance: false,
            on_demand: false,
            environment: BTreeMap::new(),
            working_directory: None,
            user: None,
            group: None,
            process: ProcessConfig::defaults_for(ServiceType::Simple),
            commands: Commands::default(),
        }
    }
}

/// The longest duration any key takes: humantime's "1year" (365.25 days,
/// 31 557 600 s, well inside u32 seconds). Every deadline the supervisor
/// computes from a unit is then far from `Instant`'s overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(31_557_600);

/// The longest unix socket path bind() takes (sun_path is 108 bytes with its NUL).
const UNIX_PATH_MAX: usize = 107;

const ROOT_KEYS: &[&str] = &["service", "socket"];
pub(crate) const SERVICE_KEYS: &[&str] = &[
    "exec",
    "type",
    "restart",
    "restart-mode",
    "overlap-grace",
    "restart-delay",
    "restart-delay-max",
    "stop-timeout",
    "start-timeout",
    "start-limit-burst",
    "start-limit-interval",
    "watchdog",
    "fd-store-max",
    "single-instance",
    "on-demand",
    "environment",
    "working-directory",
    "user",
    "group",
    // Read in `commands`:
    "exec-start-pre",
    "exec-start-post",
    "exec-stop",
    "exec-reload",
    "reload-signal",
    // Read in `process`:
    "notify-access",
    "kill-signal",
    "kill-mode",
    "limit-nofile",
    "limit-nproc",
    "limit-core",
    "limit-memlock",
    "memory-max",
    "memory-high",
    "tasks-max",
    "cpu-quota",
    "cpu-weight",
    "io-weight",
    "non-blocking",
    "standard-input",
    "standard-output",
    "umask",
    "supplementary-groups",
    "no-new-privileges",
    "environment-file",
];
pub(crate) const SOCKET_KEYS: &[&str] = &[
    "name",
    "protocol",
    "addresses",
    "ports",
    "path",
    "backlog",
    "reuse-port",
    "free-bind",
    "transparent",
    "receive-buffer",
    "send-buffer",
    "mark",
    "keep-alive",
    "no-delay",
    "accept",
    "max-connections",
    "max-connections-per-source",
    "max-connection-rate",
    "rate-limit-pause",
    "allow",
    "deny",
    "ipv6-only",
    "mode",
    "socket-user",
    "socket-group",
    "remove-on-stop",
];

const PORT_HINT: &str =
    "write a port between 1 and 65535, e.g. \"8080\", or a range such as \"8000-8099\"";
const ADDRESS_HINT: &str = "write an address such as \"127.0.0.1\" or \"::1\", or a prefix such as \"192.0.2.0/24\" or \"2001:db8::/64\"";
const DURATION_HINT: &str =
    "write a number and a unit, e.g. \"100ms\", \"5s\", \"1m\" or \"1h 30m\"";

/// Where the parts of one `[[socket]]` were written (1-based; `Pos::NONE` if unknown).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct SocketSpans {
    pub table: Pos,
    pub addresses: Vec<Pos>,
    pub ports: Vec<Pos>,
    pub path: Pos,
}

/// Where each socket of a unit was written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct UnitSpans {
    pub sockets: Vec<SocketSpans>,
}

/// The outcome of reading one file: the unit when it had no mistakes, the
/// places of its parts, and its mistakes.
pub(crate) struct Parsed {
    pub unit: Option<Unit>,
    pub spans: UnitSpans,
    pub diags: Vec<Diagnostic>,
}

/// Parse one unit file; `name` is the service name (the file stem) and
/// `path` the file named in diagnostics.
pub fn parse_unit(name: &str, path: &Path, text: &str) -> Result<Unit, Diagnostics> {
    let parsed = parse_spanned(name, path, text);
    match parsed.unit {
        Some(unit) if parsed.diags.is_empty() => Ok(unit),
        _ => Err(Diagnostics::sorted(parsed.diags)),
    }
}

pub(crate) fn parse_spanned(name: &str, path: &Path, text: &str) -> Parsed {
    let mut cx = Cx {
        file: path,
        lines: LineIndex::new(text),
        text,
        diags: Vec::new(),
        stdio_socket: None,
        commands_at: Vec::new(),
    };
    check_service_name(&mut cx, name);
    let doc = match ImDocument::parse(text) {
        Ok(doc) => doc,
        Err(e) => {
            let pos = cx.at(e.span());
            let message = e.message().trim().replace('\n', "; ");
            let message = if message.is_empty() {
                "invalid TOML".to_string()
            } else {
                format!("invalid TOML: {message}")
            };
            cx.err(
                pos,
                "",
                message,
                "see https://toml.io; strings are quoted, e.g. exec = [\"/usr/bin/program\"]",
            );
            return Parsed {
                unit: None,
                spans: UnitSpans::default(),
                diags: cx.diags,
            };
        }
    };
    let root = Tbl {
        t: doc.as_table(),
        path: String::new(),
        pos: Pos { line: 1, column: 1 },
    };
    let mut fields = cx.fields(&root, ROOT_KEYS, "at the top level");
    let service = cx.service_table(fields.remove("service"));
    let (sockets, spans) = match fields.remove("socket") {
        Some(f) => cx.sockets(&f, name),
        None => (Vec::new(), UnitSpans::default()),
    };
    cx.check_stdio_socket(sockets.len());
    cx.check_commands(&sockets);
    // A unit with mistakes is not returned: its parts would not line up with their places.
    let unit = service.filter(|_| cx.diags.is_empty()).map(|service| Unit {
        name: name.to_string(),
        path: path.to_path_buf(),
        service,
        sockets,
    });
    Parsed {
        unit,
        spans,
        diags: cx.diags,
    }
}

impl Cx<'_> {
    /// The `[service]` table, when it is there and a table.
    fn service_table(&mut self, f: Option<Field<'_>>) -> Option<ServiceConfig> {
        match f {
            Some(f) => match f.item.as_table_like() {
                Some(t) => Some(self.service(&Tbl {
                    t,
                    path: "service".into(),
                    pos: f.pos,
                })),
                None => {
                    self.type_error(
                        &f,
                        "a table",
                        "write a [service] table with exec = [\"/path/to/program\"] in it",
                    );
                    None
                }
            },
            None => {
                self.err(
                    Pos { line: 1, column: 1 },
                    "service",
                    "missing [service] table",
                    "add a [service] table, e.g. [service] and below it exec = [\"/usr/bin/program\", \"--flag\"]",
                );
                None
            }
        }
    }
}

fn check_service_name(cx: &mut Cx<'_>, name: &str) {
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '@' | '-');
    if name.is_empty() {
        cx.err(
            Pos::NONE,
            "",
            "the service name (the file name without .toml) is empty",
            "name the file after the service, e.g. web.toml",
        );
    } else if let Some(bad) = name.chars().find(|&c| !ok(c)) {
        let fixed: String = name.chars().map(|c| if ok(c) { c } else { '-' }).collect();
        cx.err(
            Pos::NONE,
            "",
            format!("service name {name:?} (the file name without .toml) contains {bad:?}"),
            format!(
                "use only letters, digits and _ . @ - in the file name, e.g. rename it to {fixed}.toml"
            ),
        );
    } else if name.starts_with('.') {
        cx.err(
            Pos::NONE,
            "",
            format!("service name {name:?} starts with a dot"),
            "start the file name with a letter or digit",
        );
    }
}

/// A table (or inline table) and where it sits.
struct Tbl<'a> {
    t: &'a dyn TableLike,
    /// Its key path, e.g. `service` or `socket[1]`; empty for the root.
    path: String,
    pos: Pos,
}

impl Tbl<'_> {
    fn child(&self, key: &str) -> String {
        if self.path.is_empty() {
            key_segment(key)
        } else {
            format!("{}.{}", self.path, key_segment(key))
        }
    }
}

/// One key/value pair being read.
#[derive(Clone)]
struct Field<'a> {
    item: Node<'a>,
    /// The key path, e.g. `service.exec`.
    path: String,
    /// Where the value is (the key when the value has no place).
    pos: Pos,
    /// Where the key is.
    key_pos: Pos,
}

struct Cx<'a> {
    file: &'a Path,
    text: &'a str,
    lines: LineIndex<'a>,
    diags: Vec<Diagnostic>,
    /// Where standard-input or standard-output = "socket" was written.
    stdio_socket: Option<(Pos, String)>,
    /// Where the command keys were written (accept services refuse them).
    commands_at: Vec<(Pos, String)>,
}

impl<'a> Cx<'a> {
    fn at(&self, span: Option<Range<usize>>) -> Pos {
        span.map_or(Pos { line: 1, column: 1 }, |r| self.lines.pos(r.start))
    }

    fn err(
        &mut self,
        pos: Pos,
        key: impl Into<String>,
        message: impl Into<String>,
        hint: impl Into<String>,
    ) {
        self.diags.push(pos.diag(self.file, key, message, hint));
    }

    /// A mistake in `f`'s value, placed there.
    fn field_err(&mut self, f: &Field<'_>, message: impl Into<String>, hint: impl Into<String>) {
        self.err(f.pos, f.path.clone(), message, hint);
    }

    /// The source text of a value, when it has a place.
    fn raw(&self, item: Node<'_>) -> Option<&'a str> {
        item.span().and_then(|r| self.text.get(r))
    }

    /// The fields of a table by name; unknown keys are reported.
    fn fields<'t>(
        &mut self,
        tbl: &Tbl<'t>,
        allowed: &[&'static str],
        where_: &str,
    ) -> HashMap<&'static str, Field<'t>> {
        let mut out = HashMap::new();
        for (name, item) in tbl.t.iter() {
            let key_pos = tbl
                .t
                .get_key_value(name)
                .and_then(|(k, _)| k.span())
                .map_or(tbl.pos, |r| self.lines.pos(r.start));
            let pos = item.span().map_or(key_pos, |r| self.lines.pos(r.start));
            let path = tbl.child(name);
            match allowed.iter().find(|a| **a == name) {
                Some(known) => {
                    out.insert(
                        *known,
                        Field {
                            item: Node::Item(item),
                            path,
                            pos,
                            key_pos,
                        },
                    );
                }
                None => {
                    let hint = match suggest(name, allowed) {
                        Some(s) => format!("did you mean `{s}`?"),
                        None => format!("the keys allowed {where_} are: {}", allowed.join(", ")),
                    };
                    self.err(
                        key_pos,
                        path,
                        format!("unknown key `{name}` {where_}"),
                        hint,
                    );
                }
            }
        }
        out
    }

    fn type_error(&mut self, f: &Field<'_>, expected: &str, hint: &str) {
        let found = match f.item.value() {
            Some(v) => format!(
                "{} {}",
                article(v.type_name()),
                shorten(self.raw(f.item).unwrap_or("").trim())
            ),
            None => article(f.item.type_name()),
        };
        self.field_err(
            f,
            format!("expected {expected}, found {}", found.trim_end()),
            hint,
        );
    }

    fn string(&mut self, f: &Field<'_>, example: &str) -> Option<String> {
        match f.item.as_str() {
            Some(s) if s.contains('\0') => {
                self.field_err(f, "contains a NUL character", "remove the \\u0000");
                None
            }
            Some(s) => Some(s.to_string()),
            None => {
                self.type_error(
                    f,
                    "a string",
                    &format!("write it in quotes, e.g. {example}"),
                );
                None
            }
        }
    }

    /// One of `all`, by its name (`as_str`).
    fn choice<T: Copy>(
        &mut self,
        f: &Field<'_>,
        all: &[T],
        as_str: fn(T) -> &'static str,
    ) -> Option<T> {
        let names: Vec<&str> = all.iter().map(|v| as_str(*v)).collect();
        let list = names
            .iter()
            .map(|n| format!("\"{n}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let s = self.string(f, &format!("\"{}\"", names[0]))?;
        if let Some(v) = all.iter().find(|v| as_str(**v) == s) {
            return Some(*v);
        }
        let hint = match suggest(&s, &names) {
            Some(n) => format!("did you mean \"{n}\"? (one of {list})"),
            None => format!("write one of {list}"),
        };
        self.field_err(f, format!("unknown value {s:?}"), hint);
        None
    }

    fn duration(&mut self, f: &Field<'_>) -> Option<Duration> {
        match f.item.value() {
            Some(toml_edit::Value::String(s)) => match humantime::parse_duration(s.value()) {
                Ok(d) if d > MAX_DURATION => {
                    let max = humantime::format_duration(MAX_DURATION);
                    self.field_err(
                        f,
                        format!(
                            "{:?} is more than the largest duration allowed, {max} ({}s)",
                            s.value(),
                            MAX_DURATION.as_secs()
                        ),
                        format!("write a duration of at most \"{max}\""),
                    );
                    None
                }
                Ok(d) => Some(d),
                Err(e) => {
                    self.field_err(
                        f,
                        format!("{:?} is not a duration: {e}", s.value()),
                        DURATION_HINT,
                    );
                    None
                }
            },
            Some(toml_edit::Value::Integer(i)) => {
                let n = i.value();
                self.field_err(
                    f,
                    format!("expected a duration string, found the number {n}"),
                    format!("durations are strings with a unit: write \"{n}s\" or \"{n}ms\""),
                );
                None
            }
            _ => {
                self.type_error(f, "a duration string", DURATION_HINT);
                None
            }
        }
    }

    /// A duration that must be more than zero.
    fn positive_duration(&mut self, f: &Field<'_>) -> Option<Duration> {
        let d = self.duration(f)?;
        if d.is_zero() {
            self.field_err(
                f,
                "must be more than 0",
                "write a positive duration, e.g. \"10s\"",
            );
            return None;
        }
        Some(d)
    }

    fn int(&mut self, f: &Field<'_>, min: i64, max: i64, example: i64) -> Option<i64> {
        match f.item.value() {
            Some(toml_edit::Value::Integer(i)) => {
                let n = *i.value();
                if n < min || n > max {
                    self.field_err(
                        f,
                        format!("{n} is outside {min}-{max}"),
                        format!("write a whole number between {min} and {max}, e.g. {example}"),
                    );
                    return None;
                }
                Some(n)
            }
            Some(toml_edit::Value::String(s)) if s.value().trim().parse::<i64>().is_ok() => {
                self.field_err(
                    f,
                    format!("expected an integer, found the string {:?}", s.value()),
                    format!(
                        "write the number without quotes, e.g. {} = {}",
                        last_key(&f.path),
                        s.value().trim()
                    ),
                );
                None
            }
            _ => {
                self.type_error(
                    f,
                    "an integer",
                    &format!(
                        "write a whole number, e.g. {} = {example}",
                        last_key(&f.path)
                    ),
                );
                None
            }
        }
    }

    fn u32(&mut self, f: &Field<'_>, min: u32, max: u32, example: u32) -> Option<u32> {
        self.int(f, min.into(), max.into(), example.into())
            .and_then(|n| u32::try_from(n).ok())
    }

    fn bool(&mut self, f: &Field<'_>) -> Option<bool> {
        if let Some(b) = f.item.as_bool() {
            return Some(b);
        }
        let key = last_key(&f.path);
        self.type_error(
            f,
            "a boolean",
            &format!("write {key} = true or {key} = false, without quotes"),
        );
        None
    }

    /// An array; each element comes back as a field of its own (`key[i]`).
    fn array<'t>(&mut self, f: &Field<'t>, hint: &str) -> Option<Vec<Field<'t>>> {
        let Some(arr) = f.item.as_array() else {
            self.type_error(f, "an array", hint);
            return None;
        };
        Some(
            arr.iter()
                .enumerate()
                .map(|(i, v)| {
                    // Array elements are values; wrap each so the helpers above apply.
                    let pos = v.span().map_or(f.pos, |r| self.lines.pos(r.start));
                    Field {
                        item: Node::Value(v),
                        path: format!("{}[{i}]", f.path),
                        pos,
                        key_pos: pos,
                    }
                })
                .collect(),
        )
    }

    fn service(&mut self, tbl: &Tbl<'_>) -> ServiceConfig {
        let mut fs = self.fields(tbl, SERVICE_KEYS, "in [service]");
        let mut take = |k: &str| fs.remove(k);
        let exec = match take("exec") {
            None => {
                self.err(
                    tbl.pos,
                    "service.exec",
                    "missing exec",
                    "add exec = [\"/usr/bin/program\", \"--flag\"]: the program and its arguments",
                );
                Vec::new()
            }
            Some(f) => self.exec(&f),
        };
        let mut svc = ServiceConfig::with_defaults(exec);
        self.kind_keys(&mut svc, &mut take);
        self.timing_keys(&mut svc, &mut take);
        self.instance_keys(&mut svc, &mut take);
        self.identity_keys(&mut svc, &mut take);
        self.process_keys(&mut svc, &mut take);
        self.command_keys(&mut svc, &mut take);
        svc
    }

    /// `type`, `restart`, `restart-mode`.
    fn kind_keys<'t>(&mut self, svc: &mut ServiceConfig, take: Take<'_, 't>) {
        if let Some(f) = take("type") {
            let kind = self.choice(&f, &ServiceType::ALL, ServiceType::as_str);
            svc.kind = kind.unwrap_or(svc.kind);
        }
        if let Some(f) = take("restart") {
            let restart = self.choice(&f, &RestartPolicy::ALL, RestartPolicy::as_str);
            svc.restart = restart.unwrap_or(svc.restart);
        }
        if let Some(f) = take("restart-mode") {
            let mode = self.choice(&f, &RestartMode::ALL, RestartMode::as_str);
            svc.restart_mode = mode.unwrap_or(svc.restart_mode);
        }
    }

    /// The restart delays, the timeouts, the start limit, the watchdog.
    fn timing_keys<'t>(&mut self, svc: &mut ServiceConfig, take: Take<'_, 't>) {
        let delay_f = take("restart-delay");
        if let Some(f) = &delay_f {
            svc.restart_delay = self.duration(f).unwrap_or(svc.restart_delay);
        }
        match take("restart-delay-max") {
            Some(f) => {
                if let Some(max) = self.duration(&f) {
                    svc.restart_delay_max = max;
                    if max < svc.restart_delay {
                        let delay = humantime::format_duration(svc.restart_delay);
                        self.err(
                            f.pos,
                            f.path,
                            format!(
                                "restart-delay-max ({}) is less than restart-delay ({delay})",
                                humantime::format_duration(max)
                            ),
                            format!("write restart-delay-max = \"{delay}\" or more"),
                        );
                    }
                }
            }
            // Unset: the cap is never below the first delay.
            None => svc.restart_delay_max = svc.restart_delay_max.max(svc.restart_delay),
        }
        if let Some(f) = take("stop-timeout") {
            svc.stop_timeout = self.positive_duration(&f).unwrap_or(svc.stop_timeout);
        }
        if let Some(f) = take("overlap-grace") {
            svc.overlap_grace = self.duration(&f).unwrap_or(svc.overlap_grace);
        }
        if let Some(f) = take("start-timeout") {
            svc.start_timeout = self.positive_duration(&f).unwrap_or(svc.start_timeout);
        }
        if let Some(f) = take("start-limit-burst") {
            svc.start_limit_burst = self
                .u32(&f, 1, u32::MAX, 5)
                .unwrap_or(svc.start_limit_burst);
        }
        if let Some(f) = take("start-limit-interval") {
            svc.start_limit_interval = self
                .positive_duration(&f)
                .unwrap_or(svc.start_limit_interval);
        }
        if let Some(f) = take("watchdog") {
            // "0" turns the watchdog off, as systemd's WatchdogSec=0.
            svc.watchdog = self.duration(&f).filter(|d| !d.is_zero());
        }
    }

    /// `fd-store-max`, `single-instance`, `on-demand`.
    fn instance_keys<'t>(&mut self, svc: &mut ServiceConfig, take: Take<'_, 't>) {
        if let Some(f) = take("fd-store-max") {
            svc.fd_store_max = self.u32(&f, 0, 65536, 16).unwrap_or(0);
        }
        if let Some(f) = take("single-instance") {
            svc.single_instance = self.bool(&f).unwrap_or(false);
            if svc.single_instance && svc.restart_mode == RestartMode::Overlap {
                self.err(
                    f.pos,
                    f.path,
                    "a single-instance service cannot have restart-mode = \"overlap\": two instances would run at once".to_string(),
                    "write restart-mode = \"stop-start\", or drop single-instance".to_string(),
                );
            }
        }
        if let Some(f) = take("on-demand") {
            svc.on_demand = self.bool(&f).unwrap_or(false);
        }
    }

    /// `environment`, `working-directory`, `user`, `group`.
    fn identity_keys<'t>(&mut self, svc: &mut ServiceConfig, take: Take<'_, 't>) {
        if let Some(f) = take("environment") {
            svc.environment = self.environment(&f);
        }
        if let Some(f) = take("working-directory") {
            if let Some(s) = self.string(&f, "working-directory = \"/var/lib/web\"") {
                if Path::new(&s).is_absolute() {
                    svc.working_directory = Some(PathBuf::from(s));
                } else {
                    self.err(
                        f.pos,
                        f.path,
                        format!("{s:?} is not an absolute path"),
                        format!(
                            "write a path that starts with /, e.g. \"/{}\"",
                            s.trim_start_matches("./")
                        ),
                    );
                }
            }
        }
        if let Some(f) = take("user") {
            svc.user = self.account(&f, "user = \"www-data\"");
        }
        if let Some(f) = take("group") {
            svc.group = self.account(&f, "group = \"www-data\"");
        }
    }

    fn exec(&mut self, f: &Field<'_>) -> Vec<String> {
        let hint = "write the program and its arguments as an array of strings, e.g. exec = [\"/usr/bin/program\", \"--flag\"]";
        let Some(items) = self.array(f, hint) else {
            return Vec::new();
        };
        if items.is_empty() {
            self.field_err(f, "exec is empty", hint);
            return Vec::new();
        }
        let mut argv = Vec::new();
        for item in &items {
            if let Some(s) = self.string(item, "\"--flag\"") {
                argv.push(s);
            }
        }
        if argv.len() == items.len() && argv[0].is_empty() {
            self.err(
                items[0].pos,
                items[0].path.clone(),
                "the program name is empty",
                "write the program's path or name first, e.g. exec = [\"/usr/bin/program\"]",
            );
        }
        argv
    }

    fn environment(&mut self, f: &Field<'_>) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        let Some(t) = f.item.as_table_like() else {
            self.type_error(
                f,
                "a table",
                "write environment = { NAME = \"value\" }, or a [service.environment] table",
            );
            return env;
        };
        let tbl = Tbl {
            t,
            path: f.path.clone(),
            pos: f.pos,
        };
        for (name, item) in t.iter() {
            let key_pos = t
                .get_key_value(name)
                .and_then(|(k, _)| k.span())
                .map_or(tbl.pos, |r| self.lines.pos(r.start));
            let vf = Field {
                item: Node::Item(item),
                path: tbl.child(name),
                pos: item.span().map_or(key_pos, |r| self.lines.pos(r.start)),
                key_pos,
            };
            if let Some(fixed) = env_name_fix(name) {
                self.err(
                    vf.key_pos,
                    vf.path.clone(),
                    format!("{name:?} is not a valid environment variable name"),
                    format!("use letters, digits and _, not starting with a digit, e.g. {fixed}"),
                );
                continue;
            }
            let value = match item.as_value() {
                Some(toml_edit::Value::String(_)) => self.string(&vf, ""),
                Some(
                    v @ (toml_edit::Value::Integer(_)
                    | toml_edit::Value::Float(_)
                    | toml_edit::Value::Boolean(_)),
                ) => {
                    let shown = v.to_string();
                    let shown = shown.trim();
                    self.field_err(
                        &vf,
                        format!(
                            "expected a string, found {} {shown}",
                            article(v.type_name())
                        ),
                        format!("environment values are strings: write {name} = \"{shown}\""),
                    );
                    None
                }
                _ => {
                    self.type_error(&vf, "a string", &format!("write {name} = \"value\""));
                    None
                }
            };
            if let Some(v) = value {
                env.insert(name.to_string(), v);
            }
        }
        env
    }

    /// A user or group: a name or a numeric id.
    fn account(&mut self, f: &Field<'_>, example: &str) -> Option<String> {
        let s = self.string(f, example)?;
        let bad = if s.is_empty() {
            Some("is empty".to_string())
        } else if s.chars().all(|c| c.is_ascii_digit()) {
            s.parse::<u32>()
                .is_err()
                .then(|| format!("id {s} is too large")) // ids are 32 bits
        } else if let Some(c) = s
            .chars()
            .find(|&c| c.is_whitespace() || c == ':' || c == '/')
        {
            Some(format!("{s:?} contains {c:?}"))
        } else if s.starts_with('-') {
            Some(format!("{s:?} starts with -"))
        } else {
            None
        };
        match bad {
            Some(message) => {
                self.field_err(
                    f,
                    message,
                    format!("write a name or a numeric id, e.g. {example} or \"33\""),
                );
                None
            }
            None => Some(s),
        }
    }

    /// The tables of `socket`: `[[socket]]` or an array of inline tables.
    fn socket_tables<'t>(&mut self, f: &Field<'t>) -> Vec<Tbl<'t>> {
        let mut tables: Vec<Tbl<'_>> = Vec::new();
        match f.item {
            Node::Item(Item::ArrayOfTables(aot)) => {
                for (i, t) in aot.iter().enumerate() {
                    tables.push(Tbl {
                        t,
                        path: format!("socket[{i}]"),
                        pos: self.at(t.span()),
                    });
                }
            }
            Node::Item(Item::Value(toml_edit::Value::Array(arr))) => {
                for (i, v) in arr.iter().enumerate() {
                    let pos = v.span().map_or(f.pos, |r| self.lines.pos(r.start));
                    match v.as_inline_table() {
                        Some(t) => tables.push(Tbl {
                            t,
                            path: format!("socket[{i}]"),
                            pos,
                        }),
                        None => self.err(
                            pos,
                            format!("socket[{i}]"),
                            format!("expected a table, found {}", article(v.type_name())),
                            "write each socket as a [[socket]] table",
                        ),
                    }
                }
            }
            Node::Item(Item::Table(_) | Item::Value(toml_edit::Value::InlineTable(_))) => {
                self.err(
                    f.pos,
                    "socket",
                    "[socket] is a single table, but sockets are an array of tables",
                    "write [[socket]] (two brackets): each [[socket]] is one socket",
                );
            }
            _ => self.type_error(
                f,
                "[[socket]] tables",
                "write each socket as a [[socket]] table",
            ),
        }
        tables
    }

    fn sockets(&mut self, f: &Field<'_>, service: &str) -> (Vec<SocketConfig>, UnitSpans) {
        let tables = self.socket_tables(f);
        let mut sockets = Vec::new();
        let mut spans = UnitSpans::default();
        // Socket name → (index, where its name came from).
        let mut names: HashMap<String, (usize, Pos)> = HashMap::new();
        for (i, tbl) in tables.iter().enumerate() {
            let (sock, sp, name_pos) = self.socket(tbl, service);
            match names.get(&sock.name) {
                Some((j, first)) => {
                    let explicit = name_pos != tbl.pos;
                    self.err(
                        name_pos,
                        format!("socket[{i}].name"),
                        format!(
                            "socket name {:?}{} is already used by socket[{j}] (line {})",
                            sock.name,
                            if explicit { "" } else { " (the default, the service name)" },
                            first.line
                        ),
                        "give each [[socket]] its own name = \"...\"; the service sees it in LISTEN_FDNAMES",
                    );
                }
                None => {
                    names.insert(sock.name.clone(), (i, name_pos));
                }
            }
            sockets.push(sock);
            spans.sockets.push(sp);
        }
        if sockets.len() > 1 {
            for (i, (sock, tbl)) in sockets.iter().zip(&tables).enumerate() {
                if sock.options.accept {
                    self.err(
                        tbl.pos,
                        format!("socket[{i}].accept"),
                        "a socket with accept = true starts one instance per connection, so it must be its unit's only socket",
                        "move this socket and its [service] into a unit file of its own",
                    );
                }
            }
        }
        (sockets, spans)
    }

    /// One `[[socket]]`; also returns where its name was written (the table when defaulted).
    fn socket(&mut self, tbl: &Tbl<'_>, service: &str) -> (SocketConfig, SocketSpans, Pos) {
        let mut fs = self.fields(tbl, SOCKET_KEYS, &format!("in [[socket]] ({})", tbl.path));
        let mut spans = SocketSpans {
            table: tbl.pos,
            ..SocketSpans::default()
        };
        let keys = PlaceKeys {
            protocol: fs.remove("protocol"),
            addresses: fs.remove("addresses"),
            ports: fs.remove("ports"),
            path: fs.remove("path"),
        };
        let protocol = match &keys.protocol {
            Some(f) => self.choice(f, &Protocol::ALL, Protocol::as_str),
            None => Some(Protocol::Tcp),
        };
        let mut sock = SocketConfig {
            name: service.to_string(),
            protocol: protocol.unwrap_or(Protocol::Tcp),
            addresses: Vec::new(),
            ports: Vec::new(),
            path: None,
            options: SocketOptions::default(),
        };
        let name_pos = match fs.remove("name") {
            Some(f) => {
                self.socket_name(&f, &mut sock);
                f.pos
            }
            None => tbl.pos,
        };
        self.socket_place(&keys, &mut sock, &mut spans);
        let Some(protocol) = protocol else {
            // The protocol is unknown, so which keys belong is unknown too.
            self.socket_options(&fs, &mut sock.options);
            return (sock, spans, name_pos);
        };
        let proto_note = match &keys.protocol {
            Some(_) => format!("this socket is {protocol}"),
            None => "this socket is tcp (the default protocol)".to_string(),
        };
        // Options that mean nothing for this protocol: reported, then not read.
        let mut misfits: Vec<(&str, Field<'_>)> = Vec::new();
        fs.retain(|k, f| {
            let fits = option_fits(k, protocol);
            if !fits {
                misfits.push((k, f.clone()));
            }
            fits
        });
        misfits.sort_by_key(|(_, f)| f.key_pos);
        for (key, f) in misfits {
            self.err(
                f.key_pos,
                f.path,
                format!(
                    "{key} applies only to {}, and {proto_note}",
                    option_applies_to(key)
                ),
                format!("remove {key}"),
            );
        }
        self.socket_options(&fs, &mut sock.options);
        self.check_place(tbl, &keys, protocol, &proto_note);
        (sock, spans, name_pos)
    }

    /// `name`: a LISTEN_FDNAMES entry.
    fn socket_name(&mut self, f: &Field<'_>, sock: &mut SocketConfig) {
        if let Some(s) = self.string(f, "name = \"http\"") {
            if let Some(problem) = fdname_problem(&s) {
                self.field_err(
f, format!("socket name {s:?} {problem}"),
                    "write printable ASCII without ':', at most 255 characters, e.g. name = \"http\"",
                );
            }
            sock.name = s;
        }
    }

    /// `addresses`, `ports` and `path`, each read on its own.
    fn socket_place(
        &mut self,
        keys: &PlaceKeys<'_>,
        sock: &mut SocketConfig,
        spans: &mut SocketSpans,
    ) {
        if let Some(f) = &keys.addresses {
            let hint = format!("write a list of addresses or prefixes, e.g. addresses = [\"127.0.0.1\", \"2001:db8::/64\"]; {ADDRESS_HINT}");
            sock.addresses = self.list(f, &hint, &mut spans.addresses, Self::prefix);
        }
        if let Some(f) = &keys.ports {
            let hint = "write a list of ports and ranges, e.g. ports = [\"8080\", \"8000-8099\"]";
            sock.ports = self.list(f, hint, &mut spans.ports, Self::port_range);
        }
        if let Some(f) = &keys.path {
            spans.path = f.pos;
            if let Some(s) = self.string(f, "path = \"/run/web.sock\"") {
                if !s.starts_with('/') {
                    self.field_err(
                        f,
                        format!("unix socket path {s:?} is not absolute"),
                        format!(
                            "write a path that starts with /, e.g. \"/run/{}\"",
                            s.trim_start_matches("./")
                        ),
                    );
                } else if s.len() > UNIX_PATH_MAX {
                    self.field_err(
f, format!("unix socket path is {} bytes long, more than the {UNIX_PATH_MAX} bind() takes", s.len()),
                        "choose a shorter path, e.g. under /run",
                    );
                }
                sock.path = Some(PathBuf::from(s));
            }
        }
    }

    /// Whether `protocol`, `addresses`, `ports` and `path` go together.
    fn check_place(
        &mut self,
        tbl: &Tbl<'_>,
        keys: &PlaceKeys<'_>,
        protocol: Protocol,
        proto_note: &str,
    ) {
        if keys.protocol.is_none()
            && keys.path.is_some()
            && keys.addresses.is_none()
            && keys.ports.is_none()
        {
            self.err(
                tbl.pos,
                format!("{}.protocol", tbl.path),
                "this socket has a path but no protocol, and the default protocol is tcp",
                "add protocol = \"unix-stream\" (or \"unix-dgram\")",
            );
        } else if protocol.is_ip() {
            let example = "[\"127.0.0.1\"] (one address) or a prefix such as [\"192.0.2.0/24\"]";
            self.need_some(
                tbl,
                "addresses",
                keys.addresses.as_ref(),
                protocol,
                "address",
                example,
            );
            let example = "[\"8080\"] or a range such as [\"8000-8099\"]";
            self.need_some(tbl, "ports", keys.ports.as_ref(), protocol, "port", example);
            if let Some(f) = &keys.path {
                self.err(
                    f.key_pos,
                    f.path.clone(),
                    format!("path is for unix sockets, and {proto_note}"),
                    "remove path, or set protocol = \"unix-stream\" (or \"unix-dgram\")",
                );
            }
        } else {
            if keys.path.is_none() {
                self.err(
                    tbl.pos,
                    format!("{}.path", tbl.path),
                    format!("a {protocol} socket needs a path"),
                    "add path = \"/run/NAME.sock\"",
                );
            }
            for f in [&keys.addresses, &keys.ports].into_iter().flatten() {
                self.err(
                    f.key_pos,
                    f.path.clone(),
                    format!(
                        "{} are for tcp and udp sockets, and {proto_note}",
                        last_key(&f.path)
                    ),
                    format!(
                        "remove {}, or set protocol = \"tcp\" (or \"udp\")",
                        last_key(&f.path)
                    ),
                );
            }
        }
    }

    /// An IP socket's `addresses` or `ports`: missing or empty is a mistake.
    fn need_some(
        &mut self,
        tbl: &Tbl<'_>,
        key: &str,
        f: Option<&Field<'_>>,
        protocol: Protocol,
        what: &str,
        example: &str,
    ) {
        let message = format!("a {protocol} socket needs at least one {what}");
        match f {
            None => self.err(
                tbl.pos,
                format!("{}.{key}", tbl.path),
                message,
                format!("add {key} = {example}"),
            ),
            Some(f) if f.item.as_array().is_some_and(|a| a.is_empty()) => {
                self.field_err(f, message, format!("write {key} = {example}"))
            }
            Some(_) => {}
        }
    }

    /// An array of distinct entries, each read by `read`; records where each one is.
    fn list<T: PartialEq + std::fmt::Display>(
        &mut self,
        f: &Field<'_>,
        hint: &str,
        places: &mut Vec<Pos>,
        read: fn(&mut Self, &Field<'_>) -> Option<T>,
    ) -> Vec<T> {
        let mut out = Vec::new();
        for item in self.array(f, hint).unwrap_or_default() {
            places.push(item.pos);
            if let Some(v) = read(self, &item) {
                if out.contains(&v) {
                    self.field_err(&item, format!("{v} is listed twice"), "remove one of them");
                }
                out.push(v);
            }
        }
        out
    }

    fn socket_options(&mut self, fs: &HashMap<&'static str, Field<'_>>, o: &mut SocketOptions) {
        const INT_MAX: u32 = i32::MAX as u32;
        if let Some(f) = fs.get("backlog") {
            o.backlog = self.u32(f, 1, INT_MAX, 128);
        }
        if let Some(f) = fs.get("receive-buffer") {
            o.receive_buffer = self.u32(f, 1, INT_MAX, 262144);
        }
        if let Some(f) = fs.get("send-buffer") {
            o.send_buffer = self.u32(f, 1, INT_MAX, 262144);
        }
        if let Some(f) = fs.get("mark") {
            o.mark = self.u32(f, 0, u32::MAX, 1);
        }
        for (key, _, slot) in o.flags_mut() {
            if let Some(f) = fs.get(key) {
                *slot = self.bool(f).unwrap_or(false);
            }
        }
        if let Some(f) = fs.get("ipv6-only") {
            o.ipv6_only = self.bool(f);
        }
        self.unix_file_options(fs, o);
        if let Some(f) = fs.get("accept") {
            o.accept = self.bool(f).unwrap_or(false);
        }
        if let Some(f) = fs.get("max-connections") {
            o.max_connections = self.u32(f, 1, 65536, 64);
        }
        if let Some(f) = fs.get("max-connections-per-source") {
            o.max_connections_per_source = self.u32(f, 1, 65536, 8);
        }
        if let Some(f) = fs.get("max-connection-rate") {
            o.max_connection_rate = self.u32(f, 1, 1_000_000, 100);
        }
        if let Some(f) = fs.get("rate-limit-pause") {
            o.rate_limit_pause = self.positive_duration(f);
        }
        for (key, slot) in [("allow", &mut o.allow), ("deny", &mut o.deny)] {
            if let Some(f) = fs.get(key) {
                let hint = format!("write a list of source prefixes, e.g. {key} = [\"192.0.2.0/24\", \"2001:db8::/32\"]");
                let mut spans = Vec::new();
                *slot = self.list(f, &hint, &mut spans, Self::prefix);
            }
        }
    }

    /// A unix socket's file: `mode`, `socket-user`, `socket-group`, `remove-on-stop`.
    fn unix_file_options(&mut self, fs: &HashMap<&'static str, Field<'_>>, o: &mut SocketOptions) {
        if let Some(f) = fs.get("mode") {
            o.mode = self.mode(f);
        }
        if let Some(f) = fs.get("socket-user") {
            o.socket_user = self.account(f, "socket-user = \"www-data\"");
        }
        if let Some(f) = fs.get("socket-group") {
            o.socket_group = self.account(f, "socket-group = \"www-data\"");
        }
        if let Some(f) = fs.get("remove-on-stop") {
            o.remove_on_stop = self.bool(f).unwrap_or(false);
        }
    }

    fn mode(&mut self, f: &Field<'_>) -> Option<u32> {
        let hint = "write the mode in octal, as 0o660 or \"0660\"";
        self.octal(f, "mode", 0o7777, hint)
    }

    /// An octal number up to `max`: `0o660` or `"0660"` (a decimal-looking
    /// integer such as 660 is refused: it was meant as octal). `what` names
    /// it in messages ("mode", "umask").
    fn octal(&mut self, f: &Field<'_>, what: &str, max: u32, hint: &str) -> Option<u32> {
        let (value, shown) = match f.item.value() {
            Some(toml_edit::Value::Integer(i)) => {
                let raw = self.raw(f.item).unwrap_or("").trim();
                let n = *i.value();
                if n != 0 && !raw.starts_with("0o") {
                    // 660 in decimal is 0o1224: almost certainly meant as octal.
                    self.field_err(
                        f,
                        format!("{what} {raw} is not octal (TOML reads it as the number {n})"),
                        format!("write 0o{raw} or \"0{raw}\""),
                    );
                    return None;
                }
                (u32::try_from(n).ok(), format!("0o{n:o}"))
            }
            Some(toml_edit::Value::String(s)) => {
                let digits = s.value().strip_prefix("0o").unwrap_or(s.value());
                let n = if !digits.is_empty() && digits.len() <= 6 {
                    u32::from_str_radix(digits, 8).ok()
                } else {
                    None
                };
                if n.is_none() {
                    self.field_err(f, format!("{:?} is not an octal {what}", s.value()), hint);
                    return None;
                }
                (n, format!("{:?}", s.value()))
            }
            _ => {
                self.type_error(f, &format!("an octal {what}"), hint);
                return None;
            }
        };
        match value {
            Some(m) if m <= max => Some(m),
            _ => {
                self.field_err(f, format!("{what} {shown} is more than 0o{max:o}"), hint);
                None
            }
        }
    }

    fn prefix(&mut self, f: &Field<'_>) -> Option<IpPrefix> {
        let Some(s) = f.item.as_str() else {
            self.type_error(
                f,
                "a string",
                &format!("write it in quotes; {ADDRESS_HINT}"),
            );
            return None;
        };
        match parse_prefix(s) {
            Ok(p) => Some(p),
            Err((message, hint)) => {
                self.field_err(f, message, hint);
                None
            }
        }
    }

    fn port_range(&mut self, f: &Field<'_>) -> Option<PortRange> {
        let parsed = match f.item.value() {
            Some(toml_edit::Value::Integer(i)) => port(*i.value()),
            Some(toml_edit::Value::String(s)) => parse_port_range(s.value()),
            _ => {
                self.type_error(f, "a port", PORT_HINT);
                return None;
            }
        };
        match parsed {
            Ok(r) => Some(r),
            Err((message, hint)) => {
                self.field_err(f, message, hint);
                None
            }
        }
    }
}

/// The keys of a `[[socket]]` that say where it is, as written.
struct PlaceKeys<'t> {
    protocol: Option<Field<'t>>,
    addresses: Option<Field<'t>>,
    ports: Option<Field<'t>>,
    path: Option<Field<'t>>,
}

/// A value in the document: a table entry (`Item`) or an array element (`Value`).
#[derive(Clone, Copy)]
enum Node<'a> {
    Item(&'a Item),
    Value(&'a toml_edit::Value),
}

impl<'a> Node<'a> {
    fn value(self) -> Option<&'a toml_edit::Value> {
        match self {
            Node::Item(i) => i.as_value(),
            Node::Value(v) => Some(v),
        }
    }
    fn as_str(self) -> Option<&'a str> {
        self.value().and_then(|v| v.as_str())
    }
    fn as_bool(self) -> Option<bool> {
        self.value().and_then(|v| v.as_bool())
    }
    fn as_array(self) -> Option<&'a toml_edit::Array> {
        self.value().and_then(|v| v.as_array())
    }
    fn as_table_like(self) -> Option<&'a dyn TableLike> {
        match self {
            Node::Item(i) => i.as_table_like(),
            Node::Value(v) => v.as_inline_table().map(|t| t as &dyn TableLike),
        }
    }
    fn type_name(self) -> &'static str {
        match self {
            Node::Item(i) => i.type_name(),
            Node::Value(v) => v.type_name(),
        }
    }
    fn span(self) -> Option<Range<usize>> {
        match self {
            Node::Item(i) => i.span(),
            Node::Value(v) => v.span(),
        }
    }
}

/// Whether a socket option means something for `protocol`.
fn option_fits(key: &str, protocol: Protocol) -> bool {
    match key {
        "backlog" => matches!(protocol, Protocol::Tcp | Protocol::UnixStream),
        "keep-alive" | "no-delay" => protocol == Protocol::Tcp,
        "reuse-port" | "free-bind" | "transparent" | "ipv6-only" => protocol.is_ip(),
        "mode" | "socket-user" | "socket-group" | "remove-on-stop" => !protocol.is_ip(),
        "accept"
        | "max-connections"
        | "max-connections-per-source"
        | "max-connection-rate"
        | "rate-limit-pause" => matches!(protocol, Protocol::Tcp | Protocol::UnixStream),
        "allow" | "deny" => protocol.is_ip(),
        _ => true,
    }
}

fn option_applies_to(key: &str) -> &'static str {
    match key {
        "backlog" => "stream sockets (tcp, unix-stream)",
        "keep-alive" | "no-delay" => "tcp sockets",
        "reuse-port" | "free-bind" | "transparent" | "ipv6-only" | "allow" | "deny" => {
            "tcp and udp sockets"
        }
        "accept" | "max-connections" | "max-connections-per-source" | "max-connection-rate"
        | "rate-limit-pause" => {
            "stream sockets (tcp, unix-stream); for udp, set on-demand = true in [service] (xinetd's wait = yes)"
        }
        _ => "unix sockets",
    }
}

type Problem = (String, String);

fn port(n: i64) -> Result<PortRange, Problem> {
    match u16::try_from(n) {
        Ok(p) if p >= 1 => Ok(PortRange { first: p, last: p }),
        _ => Err((
            format!("port {n} is outside 1-65535"),
            PORT_HINT.to_string(),
        )),
    }
}

/// `"8080"` or `"8000-8099"`.
pub(crate) fn parse_port_range(s: &str) -> Result<PortRange, Problem> {
    let number = |t: &str| -> Result<i64, Problem> {
        if t.is_empty() || t.len() > 9 || !t.bytes().all(|b| b.is_ascii_digit()) {
            return Err((
                format!("{s:?} is not a port or a port range"),
                PORT_HINT.to_string(),
            ));
        }
        Ok(t.parse().expect("at most 9 digits"))
    };
    match s.split_once('-') {
        None => port(number(s)?),
        Some((a, b)) => {
            let first = port(number(a)?)?.first;
            let last = port(number(b)?)?.first;
            if first > last {
                return Err((
                    format!("port range {s:?} runs backwards"),
                    format!("write the lower port first: \"{last}-{first}\""),
                ));
            }
            Ok(PortRange { first, last })
        }
    }
}

/// `"192.0.2.0/24"`, `"2001:db8::/64"`, or a bare address (a /32 or /128).
pub(crate) fn parse_prefix(s: &str) -> Result<IpPrefix, Problem> {
    let (addr_s, len_s) = match s.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (s, None),
    };
    let addr: IpAddr = match addr_s.parse() {
        Ok(a) => a,
        Err(_) => {
            let hint = if addr_s.starts_with('[') {
                format!(
                    "write IPv6 addresses without brackets, e.g. \"{}\"",
                    addr_s.trim_matches(|c| c == '[' || c == ']')
                )
            } else if let Some((a, p)) = addr_s
                .rsplit_once(':')
                .filter(|(a, _)| a.parse::<Ipv4Addr>().is_ok())
            {
                format!("write the address and the port apart: addresses = [\"{a}\"] and ports = [\"{p}\"]")
            } else {
                ADDRESS_HINT.to_string()
            };
            return Err((format!("{s:?} is not an IP address or prefix"), hint));
        }
    };
    let max: u8 = if addr.is_ipv4() { 32 } else { 128 };
    let len = match len_s {
        None => max,
        Some(l) => match l.parse::<u8>() {
            Ok(n) if n <= max && !l.starts_with('+') => n,
            _ => {
                return Err((
                    format!(
                        "prefix length {l:?} is not valid for {} (0 to {max})",
                        if addr.is_ipv4() { "IPv4" } else { "IPv6" }
                    ),
                    format!(
                        "write e.g. \"{addr}/{}\"",
                        if addr.is_ipv4() { 24 } else { 64 }
                    ),
                ))
            }
        },
    };
    if let IpAddr::V6(v6) = addr {
        if let Some(v4) = v6.to_ipv4_mapped().filter(|_| len >= 96) {
            let p4 = masked(IpAddr::V4(v4), len - 96);
            return Err((
                format!("{s:?} is an IPv4-mapped IPv6 address"),
                format!("write the IPv4 form: \"{}\"", p4),
            ));
        }
    }
    let p = masked(addr, len);
    if p.addr != addr {
        return Err((
            format!(
                "{s:?} has host bits set: {}/{len} is the network, {addr} one host in it",
                p.addr
            ),
            format!(
                "write \"{}\" for the whole network, or \"{addr}\" for that one address",
                p
            ),
        ));
    }
    Ok(p)
}

/// The prefix with its host bits cleared.
pub(crate) fn masked(addr: IpAddr, len: u8) -> IpPrefix {
    let addr = match addr {
        IpAddr::V4(a) => {
            let mask = if len == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(len))
            };
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
        }
        IpAddr::V6(a) => {
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(len))
            };
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
        }
    };
    IpPrefix { addr, len }
}

/// Why `s` cannot be a LISTEN_FDNAMES entry, if it cannot.
fn fdname_problem(s: &str) -> Option<String> {
    if s.is_empty() {
        Some("is empty".into())
    } else if s.len() > 255 {
        Some(format!("is {} characters long, more than 255", s.len()))
    } else if s.contains(':') {
        Some("contains ':', the LISTEN_FDNAMES separator".into())
    } else {
        s.chars()
            .find(|c| !(' '..='~').contains(c))
            .map(|c| format!("contains {c:?}, which is not printable ASCII"))
    }
}

/// A valid environment variable name like `name`, when `name` is not one.
fn env_name_fix(name: &str) -> Option<String> {
    let valid = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if valid {
        return None;
    }
    let fixed: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    Some(
        if fixed.starts_with(|c: char| c.is_ascii_digit()) || fixed.is_empty() {
            format!("_{fixed}")
        } else {
            fixed
        },
    )
}

/// A value's text cut to one short line, for quoting in a message.
fn shorten(raw: &str) -> String {
    let line = raw.lines().next().unwrap_or("");
    if line.len() < raw.len() || line.chars().count() > 40 {
        format!("{}…", line.chars().take(40).collect::<String>())
    } else {
        line.to_string()
    }
}

/// `"a"` or `"an"` before a TOML type name.
fn article(type_name: &str) -> String {
    let an = type_name.starts_with(['a', 'e', 'i', 'o', 'u']);
    format!("{} {type_name}", if an { "an" } else { "a" })
}

/// The last segment of a key path: `socket[0].ports` → `ports`.
fn last_key(path: &str) -> &str {
    path.rsplit('.').next().unwrap_or(path)
}

/// A key as it is written in a key path: bare when TOML allows, else quoted.
fn key_segment(key: &str) -> String {
    if !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        key.to_string()
    } else {
        format!("{key:?}")
    }
}

/// The allowed word closest to `word`, if one is close enough to be a typo.
pub(crate) fn suggest<'c>(word: &str, candidates: &[&'c str]) -> Option<&'c str> {
    let norm = |s: &str| s.to_ascii_lowercase().replace('_', "-");
    let w = norm(word);
    let mut best: Option<(usize, &str)> = None;
    for &c in candidates {
        let d = if w == c {
            0
        } else if w.len() >= 3 && (c.starts_with(&w) || w.starts_with(c)) {
            1
        } else {
            levenshtein(&w, c)
        };
        if best.is_none_or(|(bd, _)| d < bd) {
            best = Some((d, c));
        }
    }
    let (d, c) = best?;
    let limit = (w.chars().count() / 3).max(2);
    (d <= limit && d < w.chars().count()).then_some(c)
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}
