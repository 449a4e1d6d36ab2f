//! The `[service]` keys that name commands run beside the main process:
//! `exec-start-pre`, `exec-start-post`, `exec-stop`, `exec-reload`
//! (systemd's `ExecStartPre=` …), each an array of commands, each an array
//! of strings whose program may carry systemd's `-` prefix (its failure is
//! ignored).

use super::*;

const COMMANDS_HINT: &str = "write an array of commands, each an array of strings, e.g. exec-start-pre = [[\"/usr/sbin/sshd\", \"-t\"], [\"-/bin/mkdir\", \"-p\", \"/run/web\"]] (a leading - on the program: its failure is ignored)";

impl Cx<'_> {
    /// Reads the command keys into `svc.commands`; `take` removes a field by
    /// key. Records where they were written for [`Cx::check_commands`].
    pub(super) fn command_keys<'t>(&mut self, svc: &mut ServiceConfig, take: Take<'_, 't>) {
        let c = &mut svc.commands;
        for (key, list) in [
            ("exec-start-pre", &mut c.start_pre),
            ("exec-start-post", &mut c.start_post),
            ("exec-stop", &mut c.stop),
            ("exec-reload", &mut c.reload),
        ] {
            if let Some(f) = take(key) {
                *list = self.command_list(&f);
                if !list.is_empty() {
                    self.commands_at.push((f.key_pos, f.path.clone()));
                }
            }
        }
        let notify_reload = svc.kind == ServiceType::NotifyReload;
        if let Some(f) = take("reload-signal") {
            c.reload_signal = self.signal(&f);
            if !notify_reload {
                self.err(
                    f.key_pos,
                    f.path.clone(),
                    "reload-signal is sent only to a type = \"notify-reload\" service",
                    "write type = \"notify-reload\", or drop reload-signal (exec-reload runs commands instead)",
                );
            }
        }
        if notify_reload && !c.reload.is_empty() {
            let (pos, path) = self
                .commands_at
                .iter()
                .find(|(_, p)| p.ends_with("exec-reload"))
                .cloned()
                .unwrap_or_default();
            self.err(
                pos,
                path,
                "a type = \"notify-reload\" service is reloaded by reload-signal, not by exec-reload",
                "drop exec-reload, or write type = \"notify\" to reload with the commands",
            );
        }
    }

    /// An array of commands.
    fn command_list(&mut self, f: &Field<'_>) -> Vec<ExecCommand> {
        let Some(items) = self.array(f, COMMANDS_HINT) else {
            return Vec::new();
        };
        items.iter().filter_map(|c| self.command(c)).collect()
    }

    /// One command: a non-empty array of strings, the program first.
    fn command(&mut self, f: &Field<'_>) -> Option<ExecCommand> {
        if f.item.as_str().is_some() {
            // A flat list of strings: one command written without its brackets.
            self.type_error(f, "an array of strings (one command)", COMMANDS_HINT);
            return None;
        }
        let items = self.array(f, COMMANDS_HINT)?;
        if items.is_empty() {
            self.field_err(f, "the command is empty", COMMANDS_HINT);
            return None;
        }
        let mut argv = Vec::new();
        for item in &items {
            argv.push(self.string(item, "\"--flag\"")?);
        }
        let ignore_failure = argv[0].starts_with('-');
        if ignore_failure {
            argv[0].remove(0);
        }
        if argv[0].is_empty() {
            self.err(
                items[0].pos,
                items[0].path.clone(),
                "the program name is empty",
                "write the program's path or name first, e.g. [\"/usr/sbin/sshd\", \"-t\"], or [\"-/usr/sbin/sshd\", \"-t\"] to ignore its failure",
            );
            return None;
        }
        Some(ExecCommand {
            argv,
            ignore_failure,
        })
    }

    /// Command keys in a unit whose socket has `accept = true`: those start
    /// one process per connection, without the service's start or stop.
    pub(super) fn check_commands(&mut self, sockets: &[SocketConfig]) {
        let written = std::mem::take(&mut self.commands_at);
        if !sockets.iter().any(|s| s.options.accept) {
            return;
        }
        for (pos, path) in written {
            let key = last_key(&path).to_string();
            self.err(
                pos,
                path,
                format!("{key} is not run for a socket with accept = true: each connection starts its own process at once, and is stopped by kill-signal"),
                format!("drop {key}, or do its work at the start of the program itself"),
            );
        }
    }
}
