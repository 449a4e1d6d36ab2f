//! The `[service]` keys that name commands run beside the main process:
//! `exec-start-pre` (systemd's `ExecStartPre=`), an array of commands, each
//! an array of strings whose program may carry systemd's `-` prefix (its
//! failure is ignored).

use super::*;

const START_PRE_HINT: &str = "write an array of commands, each an array of strings, e.g. exec-start-pre = [[\"/usr/sbin/sshd\", \"-t\"], [\"-/bin/mkdir\", \"-p\", \"/run/web\"]] (a leading - on the program: its failure is ignored)";

impl Cx<'_> {
    /// Reads `exec-start-pre` into `svc.commands`; `take` removes a field by
    /// key. Records where it was written for [`Cx::check_commands`].
    pub(super) fn command_keys<'t>(
        &mut self,
        svc: &mut ServiceConfig,
        take: &mut dyn FnMut(&str) -> Option<Field<'t>>,
    ) {
        if let Some(f) = take("exec-start-pre") {
            svc.commands.start_pre = self.command_list(&f);
            if !svc.commands.start_pre.is_empty() {
                self.start_pre_at = Some((f.key_pos, f.path.clone()));
            }
        }
    }

    /// An array of commands.
    fn command_list(&mut self, f: &Field<'_>) -> Vec<ExecCommand> {
        let Some(items) = self.array(f, START_PRE_HINT) else {
            return Vec::new();
        };
        items.iter().filter_map(|c| self.command(c)).collect()
    }

    /// One command: a non-empty array of strings, the program first.
    fn command(&mut self, f: &Field<'_>) -> Option<ExecCommand> {
        if f.item.as_str().is_some() {
            // A flat list of strings: one command written without its brackets.
            self.type_error(f, "an array of strings (one command)", START_PRE_HINT);
            return None;
        }
        let items = self.array(f, START_PRE_HINT)?;
        if items.is_empty() {
            self.err(
                f.pos,
                f.path.clone(),
                "the command is empty",
                START_PRE_HINT,
            );
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

    /// `exec-start-pre` in a unit whose socket has `accept = true`: those
    /// start one process per connection, without the service's start.
    pub(super) fn check_commands(&mut self, sockets: &[SocketConfig]) {
        if let Some((pos, path)) = self.start_pre_at.take() {
            if sockets.iter().any(|s| s.options.accept) {
                self.err(
                    pos,
                    path,
                    "exec-start-pre is not run for a socket with accept = true: each connection starts its own process at once",
                    "drop exec-start-pre, or run the check at the start of the program itself",
                );
            }
        }
    }
}
