//! Writing a unit back out as TOML, every key explicit, so that parsing the
//! text again gives the same unit (the round-trip the tests and fuzzing rely on).

use std::time::Duration;

use toml_edit::{value, Array, ArrayOfTables, DocumentMut, Item, Table};

use super::model::{RestartMode, RestartPolicy, ServiceType, Unit};

fn duration(d: Duration) -> Item {
    value(humantime::format_duration(d).to_string())
}

fn strings<'a>(items: impl IntoIterator<Item = &'a str>) -> Item {
    value(Array::from_iter(items))
}

/// The unit as a TOML document. `unit.name` and `unit.path` are not in it:
/// they come from the file name.
pub fn to_toml(unit: &Unit) -> String {
    let s = &unit.service;
    let mut svc = Table::new();
    svc["exec"] = strings(s.exec.iter().map(String::as_str));
    svc["type"] = value(match s.kind {
        ServiceType::Simple => "simple",
        ServiceType::Notify => "notify",
    });
    svc["restart"] = value(match s.restart {
        RestartPolicy::Always => "always",
        RestartPolicy::OnFailure => "on-failure",
        RestartPolicy::Never => "never",
    });
    svc["restart-mode"] = value(match s.restart_mode {
        RestartMode::StopStart => "stop-start",
        RestartMode::Overlap => "overlap",
    });
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
    if !s.environment.is_empty() {
        let mut env = Table::new();
        for (k, v) in &s.environment {
            env[k.as_str()] = value(v.as_str());
        }
        svc["environment"] = Item::Table(env);
    }

    let mut doc = DocumentMut::new();
    doc["service"] = Item::Table(svc);
    let mut sockets = ArrayOfTables::new();
    for sock in &unit.sockets {
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
        for (key, n) in [
            ("backlog", o.backlog),
            ("receive-buffer", o.receive_buffer),
            ("send-buffer", o.send_buffer),
            ("mark", o.mark),
        ] {
            if let Some(n) = n {
                t[key] = value(i64::from(n));
            }
        }
        for (key, on) in [
            ("reuse-port", o.reuse_port),
            ("free-bind", o.free_bind),
            ("transparent", o.transparent),
            ("keep-alive", o.keep_alive),
            ("no-delay", o.no_delay),
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
        if o.accept {
            t["accept"] = value(true);
        }
        for (key, n) in [
            ("max-connections", o.max_connections),
            ("max-connections-per-source", o.max_connections_per_source),
            ("max-connection-rate", o.max_connection_rate),
        ] {
            if let Some(n) = n {
                t[key] = value(i64::from(n));
            }
        }
        if let Some(d) = o.rate_limit_pause {
            t["rate-limit-pause"] = value(humantime::format_duration(d).to_string());
        }
        for (key, list) in [("allow", &o.allow), ("deny", &o.deny)] {
            if !list.is_empty() {
                let shown: Vec<String> = list.iter().map(ToString::to_string).collect();
                t[key] = strings(shown.iter().map(String::as_str));
            }
        }
        sockets.push(t);
    }
    if !sockets.is_empty() {
        doc["socket"] = Item::ArrayOfTables(sockets);
    }
    doc.to_string()
}
