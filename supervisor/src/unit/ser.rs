//! Writing a unit back out as TOML, every key explicit, so that parsing the
//! text again gives the same unit (the round-trip the tests and fuzzing rely on).

use std::time::Duration;

use toml_edit::{value, Array, ArrayOfTables, DocumentMut, Item, Table};

use super::model::{
    Limit, ProcessConfig, Rlimit, ServiceConfig, SocketConfig, SocketOptions, Unit,
};
use super::parse::signal_name;

fn duration(d: Duration) -> Item {
    value(humantime::format_duration(d).to_string())
}

fn strings<'a>(items: impl IntoIterator<Item = &'a str>) -> Item {
    value(Array::from_iter(items))
}

/// Each key whose number is set.
fn numbers<const N: usize>(t: &mut Table, keys: [(&str, Option<u32>); N]) {
    for (key, n) in keys {
        if let Some(n) = n {
            t[key] = value(i64::from(n));
        }
    }
}

/// The unit as a TOML document. `unit.name` and `unit.path` are not in it:
/// they come from the file name.
pub fn to_toml(unit: &Unit) -> String {
    let mut doc = DocumentMut::new();
    doc["service"] = Item::Table(service_table(&unit.service));
    let mut sockets = ArrayOfTables::new();
    for sock in &unit.sockets {
        sockets.push(socket_table(sock));
    }
    if !sockets.is_empty() {
        doc["socket"] = Item::ArrayOfTables(sockets);
    }
    doc.to_string()
}

/// `[service]`.
fn service_table(s: &ServiceConfig) -> Table {
    let mut svc = Table::new();
    svc["exec"] = strings(s.exec.iter().map(String::as_str));
    svc["type"] = value(s.kind.as_str());
    svc["restart"] = value(s.restart.as_str());
    svc["restart-mode"] = value(s.restart_mode.as_str());
    if !s.overlap_grace.is_zero() {
        svc["overlap-grace"] = duration(s.overlap_grace);
    }
    svc["restart-delay"] = duration(s.restart_delay);
    svc["restart-delay-max"] = duration(s.restart_delay_max);
    svc["stop-timeout"] = duration(s.stop_timeout);
    svc["start-timeout"] = duration(s.start_timeout);
    svc["start-limit-burst"] = value(i64::from(s.start_limit_burst));
    svc["start-limit-interval"] = duration(s.start_limit_interval);
    if let Some(w) = s.watchdog {
        svc["watchdog"] = duration(w);
    }
    svc["fd-store-max"] = value(i64::from(s.fd_store_max));
    svc["single-instance"] = value(s.single_instance);
    svc["on-demand"] = value(s.on_demand);
    if let Some(d) = &s.working_directory {
        svc["working-directory"] = value(d.to_string_lossy().into_owned());
    }
    if let Some(u) = &s.user {
        svc["user"] = value(u.as_str());
    }
    if let Some(g) = &s.group {
        svc["group"] = value(g.as_str());
    }
    process_keys(&mut svc, &s.process);
    command_keys(&mut svc, &s.commands);
    if !s.environment.is_empty() {
        let mut env = Table::new();
        for (k, v) in &s.environment {
            env[k.as_str()] = value(v.as_str());
        }
        svc["environment"] = Item::Table(env);
    }
    svc
}

/// A list of commands as an array of arrays, each program with its `-`.
fn commands(list: &[super::model::ExecCommand]) -> Item {
    value(Array::from_iter(list.iter().map(|c| {
        toml_edit::Value::Array(Array::from_iter(c.written()))
    })))
}

/// The command keys of `[service]`: exec-start-pre and friends, reload-signal.
fn command_keys(svc: &mut Table, c: &super::model::Commands) {
    if let Some(sig) = c.reload_signal {
        svc["reload-signal"] = match signal_name(sig) {
            Some(name) => value(name),
            None => value(i64::from(sig.0)),
        };
    }
    for (key, list) in [
        ("exec-start-pre", &c.start_pre),
        ("exec-start-post", &c.start_post),
        ("exec-stop", &c.stop),
        ("exec-reload", &c.reload),
    ] {
        if !list.is_empty() {
            svc[key] = commands(list);
        }
    }
}

/// The process keys of `[service]`.
fn process_keys(svc: &mut Table, p: &ProcessConfig) {
    svc["notify-access"] = value(p.notify_access.as_str());
    svc["kill-signal"] = match signal_name(p.kill_signal) {
        Some(name) => value(name),
        None => value(i64::from(p.kill_signal.0)),
    };
    svc["kill-mode"] = value(p.kill_mode.as_str());
    limit_keys(svc, p);
    svc["non-blocking"] = value(p.non_blocking);
    svc["standard-input"] = value(p.standard_input.as_str());
    svc["standard-output"] = value(p.standard_output.as_str());
    svc["umask"] = value(format!("{:04o}", p.umask));
    if !p.supplementary_groups.is_empty() {
        svc["supplementary-groups"] = strings(p.supplementary_groups.iter().map(String::as_str));
    }
    svc["no-new-privileges"] = value(p.no_new_privileges);
    if !p.environment_files.is_empty() {
        let shown: Vec<String> = p
            .environment_files
            .iter()
            .map(|f| {
                let dash = if f.optional { "-" } else { "" };
                format!("{dash}{}", f.path.to_string_lossy())
            })
            .collect();
        svc["environment-file"] = strings(shown.iter().map(String::as_str));
    }
}

/// The rlimits and the cgroup limits.
fn limit_keys(svc: &mut Table, p: &ProcessConfig) {
    let rlimit = |n: u64| {
        if n == Rlimit::INFINITY {
            "infinity".to_string()
        } else {
            n.to_string()
        }
    };
    for (key, l) in [
        ("limit-nofile", p.rlimits.nofile),
        ("limit-nproc", p.rlimits.nproc),
        ("limit-core", p.rlimits.core),
        ("limit-memlock", p.rlimits.memlock),
    ] {
        if let Some(l) = l {
            svc[key] = value(format!("{}:{}", rlimit(l.soft), rlimit(l.hard)));
        }
    }
    let c = &p.cgroup_limits;
    for (key, l) in [
        ("memory-max", c.memory_max),
        ("memory-high", c.memory_high),
        ("tasks-max", c.tasks_max),
    ] {
        match l {
            Some(Limit::Value(n)) => svc[key] = value(n.to_string()),
            Some(Limit::Infinity) => svc[key] = value("infinity"),
            None => {}
        }
    }
    if let Some(p) = c.cpu_quota {
        svc["cpu-quota"] = value(format!("{p}%"));
    }
    numbers(
        svc,
        [("cpu-weight", c.cpu_weight), ("io-weight", c.io_weight)],
    );
}

/// One `[[socket]]`.
fn socket_table(sock: &SocketConfig) -> Table {
    let mut t = Table::new();
    t["name"] = value(sock.name.as_str());
    t["protocol"] = value(sock.protocol.as_str());
    if !sock.addresses.is_empty() {
        let shown: Vec<String> = sock.addresses.iter().map(ToString::to_string).collect();
        t["addresses"] = strings(shown.iter().map(String::as_str));
    }
    if !sock.ports.is_empty() {
        let shown: Vec<String> = sock.ports.iter().map(ToString::to_string).collect();
        t["ports"] = strings(shown.iter().map(String::as_str));
    }
    if let Some(p) = &sock.path {
        t["path"] = value(p.to_string_lossy().into_owned());
    }
    let o = &sock.options;
    numbers(
        &mut t,
        [
            ("backlog", o.backlog),
            ("receive-buffer", o.receive_buffer),
            ("send-buffer", o.send_buffer),
            ("mark", o.mark),
        ],
    );
    for (key, on) in [
        ("reuse-port", o.reuse_port),
        ("free-bind", o.free_bind),
        ("transparent", o.transparent),
        ("keep-alive", o.keep_alive),
        ("no-delay", o.no_delay),
        ("remove-on-stop", o.remove_on_stop),
    ] {
        if on {
            t[key] = value(true);
        }
    }
    if let Some(b) = o.ipv6_only {
        t["ipv6-only"] = value(b);
    }
    if let Some(m) = o.mode {
        t["mode"] = value(format!("{m:04o}"));
    }
    for (key, account) in [
        ("socket-user", &o.socket_user),
        ("socket-group", &o.socket_group),
    ] {
        if let Some(a) = account {
            t[key] = value(a.as_str());
        }
    }
    accept_keys(&mut t, o);
    t
}

/// `accept`, its limits, and the source rules.
fn accept_keys(t: &mut Table, o: &SocketOptions) {
    if o.accept {
        t["accept"] = value(true);
    }
    numbers(
        t,
        [
            ("max-connections", o.max_connections),
            ("max-connections-per-source", o.max_connections_per_source),
            ("max-connection-rate", o.max_connection_rate),
        ],
    );
    if let Some(d) = o.rate_limit_pause {
        t["rate-limit-pause"] = value(humantime::format_duration(d).to_string());
    }
    for (key, list) in [("allow", &o.allow), ("deny", &o.deny)] {
        if !list.is_empty() {
            let shown: Vec<String> = list.iter().map(ToString::to_string).collect();
            t[key] = strings(shown.iter().map(String::as_str));
        }
    }
}
