//! A test's scratch directory: unit files, the daemon's state dir, scripts for
//! the services under test, and an `out/` dir where those services write reports.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;
use tempfile::TempDir;

use crate::wait_for;

/// The report-writing, socket-serving test service; see its docstring.
pub const SERVE_PY: &str = include_str!("serve.py");

/// The interpreter the scripts run with: the system one, readable by every user
/// (the `user = "nobody"` tests need that).
pub const PYTHON: &str = "/usr/bin/python3";

/// A temporary directory laid out as
///
/// ```text
/// DIR/            0755 (services running as nobody must reach their scripts)
///   units/        unit files, NAME.toml
///   state/        the daemon's --state-dir
///   out/          0777: services write reports and markers here
///   serve.py      written on first use of serve_exec()
/// ```
#[derive(Debug)]
pub struct Sandbox {
    dir: TempDir,
}

impl Sandbox {
    pub fn new() -> Result<Sandbox> {
        let dir = tempfile::Builder::new()
            .prefix("holdfast-test-")
            .tempdir()
            .context("create a temporary directory")?;
        let sandbox = Sandbox { dir };
        chmod(sandbox.path(), 0o755)?;
        for (sub, mode) in [("units", 0o755), ("state", 0o755), ("out", 0o777)] {
            let p = sandbox.path().join(sub);
            fs::create_dir(&p).with_context(|| format!("mkdir {}", p.display()))?;
            chmod(&p, mode)?;
        }
        Ok(sandbox)
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn units_dir(&self) -> PathBuf {
        self.path().join("units")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.path().join("state")
    }

    /// `<state>/control.sock`.
    pub fn control_socket(&self) -> PathBuf {
        self.state_dir().join("control.sock")
    }

    pub fn out_dir(&self) -> PathBuf {
        self.path().join("out")
    }

    /// `out/NAME`: where a service writes a report or a marker.
    pub fn out(&self, name: &str) -> PathBuf {
        self.out_dir().join(name)
    }

    /// Writes `units/NAME.toml` and returns its path.
    pub fn write_unit(&self, name: &str, toml: &str) -> Result<PathBuf> {
        let p = self.units_dir().join(format!("{name}.toml"));
        fs::write(&p, toml).with_context(|| format!("write {}", p.display()))?;
        Ok(p)
    }

    /// Writes `units/NAME.toml` for a service that runs `script` with
    /// `/bin/sh -c` (every other key at its default) and returns its path.
    pub fn write_sh_unit(&self, name: &str, script: &str) -> Result<PathBuf> {
        self.write_sh_service(name, script, "")
    }

    /// [`Sandbox::write_sh_unit`] with the `service_extra` lines added to `[service]`.
    pub fn write_sh_service(
        &self,
        name: &str,
        script: &str,
        service_extra: &str,
    ) -> Result<PathBuf> {
        let exec = toml_array(&["/bin/sh", "-c", script]);
        self.write_unit(
            name,
            &format!("[service]\nexec = {exec}\n{service_extra}\n"),
        )
    }

    /// [`Sandbox::write_sh_service`] for a script that leaves a note for the test,
    /// or waits for one: `$NOTE` in its environment is `out/NAME.note`, whose path
    /// this returns.
    pub fn write_sh_noting(
        &self,
        name: &str,
        script: &str,
        service_extra: &str,
    ) -> Result<PathBuf> {
        let note = self.out(&format!("{name}.note"));
        let env = toml_str(&note.to_string_lossy());
        self.write_sh_service(
            name,
            script,
            &format!("environment = {{ NOTE = {env} }}\n{service_extra}"),
        )?;
        Ok(note)
    }

    /// Writes every `(name, toml)` as `units/NAME.toml`.
    pub fn write_units(&self, units: &[(&str, &str)]) -> Result<()> {
        for (name, toml) in units {
            self.write_unit(name, toml)?;
        }
        Ok(())
    }

    /// Writes an executable (0755) file `NAME` in the sandbox and returns its path.
    pub fn write_script(&self, name: &str, text: &str) -> Result<PathBuf> {
        let p = self.path().join(name);
        fs::write(&p, text).with_context(|| format!("write {}", p.display()))?;
        chmod(&p, 0o755)?;
        Ok(p)
    }

    /// The argv, as a TOML array, of a [`SERVE_PY`] service that writes its report
    /// to `out/TAG.json` and, on SIGTERM, its pid to `out/TAG.term`.
    pub fn serve_exec(&self, tag: &str) -> Result<String> {
        let script = self.path().join("serve.py");
        if !script.exists() {
            self.write_script("serve.py", SERVE_PY)?;
        }
        let report = self.out(&format!("{tag}.json"));
        let term = self.out(&format!("{tag}.term"));
        Ok(toml_array(&[
            PYTHON,
            "-I",
            "-S",
            &script.to_string_lossy(),
            &report.to_string_lossy(),
            &term.to_string_lossy(),
        ]))
    }

    /// Writes `units/NAME.toml`: a [`Sandbox::serve_exec`] service reporting to
    /// `out/NAME.json`, with `service_extra` lines added to `[service]`, and one
    /// socket named NAME on TCP 127.0.0.1:`port`.
    pub fn write_serve_unit(&self, name: &str, port: u16, service_extra: &str) -> Result<()> {
        let exec = self.serve_exec(name)?;
        self.write_local_unit(name, port, &format!("exec = {exec}\n{service_extra}"))
    }

    /// Writes `units/NAME.toml`: `[service]` with the `service` lines, and one
    /// socket named NAME on TCP 127.0.0.1:`port`.
    pub fn write_local_unit(&self, name: &str, port: u16, service: &str) -> Result<()> {
        let port = port.to_string();
        self.write_tcp_unit(name, service, name, &["127.0.0.1/32"], &[&port], "")?;
        Ok(())
    }

    /// Writes `units/NAME.toml`: `[service]` with the `service` lines (`exec = …`
    /// included), and one TCP `[[socket]]` named `socket` on `addresses` × `ports`,
    /// with the `socket_extra` lines (options such as `backlog = 16`) added.
    pub fn write_tcp_unit(
        &self,
        name: &str,
        service: &str,
        socket: &str,
        addresses: &[&str],
        ports: &[&str],
        socket_extra: &str,
    ) -> Result<PathBuf> {
        let socket = ip_socket(socket, "tcp", addresses, ports, socket_extra);
        self.write_unit(name, &format!("[service]\n{service}\n\n{socket}"))
    }

    /// Writes `units/NAME.toml`: a [`Sandbox::serve_exec`] service reporting to
    /// `out/NAME.json`, with the `service_extra` lines added to `[service]`, and one
    /// `protocol` socket named NAME on `addresses` × `ports` with the
    /// `socket_extra` lines.
    pub fn write_serve_ip_unit(
        &self,
        name: &str,
        protocol: &str,
        addresses: &[&str],
        ports: &[&str],
        service_extra: &str,
        socket_extra: &str,
    ) -> Result<PathBuf> {
        let exec = self.serve_exec(name)?;
        let socket = ip_socket(name, protocol, addresses, ports, socket_extra);
        self.write_unit(
            name,
            &format!("[service]\nexec = {exec}\n{service_extra}\n\n{socket}"),
        )
    }

    /// Waits until `out/TAG.json` exists and `accept` likes it; returns it.
    pub fn wait_report(
        &self,
        tag: &str,
        timeout: Duration,
        accept: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let p = self.out(&format!("{tag}.json"));
        wait_for(&format!("report {}", p.display()), timeout, || {
            let v: Value = serde_json::from_slice(&fs::read(&p).ok()?).ok()?;
            accept(&v).then_some(v)
        })
    }
}

/// A `[[socket]]` table: `name`, `protocol`, `addresses` × `ports`, and the `extra`
/// lines (options such as `backlog = 16`).
fn ip_socket(
    name: &str,
    protocol: &str,
    addresses: &[&str],
    ports: &[&str],
    extra: &str,
) -> String {
    let mut text = format!(
        "[[socket]]\nname = {}\nprotocol = {}\naddresses = {}\nports = {}\n",
        toml_str(name),
        toml_str(protocol),
        toml_array(addresses),
        toml_array(ports),
    );
    if !extra.is_empty() {
        text.push_str(extra);
        text.push('\n');
    }
    text
}

/// `[service]` lines for a service restarted always: after `delay`, backing off
/// up to `delay_max`, at most `burst` starts in `interval`.
pub fn restart_always(delay: &str, delay_max: &str, burst: u32, interval: &str) -> String {
    format!(
        "restart = \"always\"\nrestart-delay = \"{delay}\"\nrestart-delay-max = \"{delay_max}\"\n\
         start-limit-burst = {burst}\nstart-limit-interval = \"{interval}\""
    )
}

/// A TOML array of basic strings: `["a", "b c"]`.
pub fn toml_array(items: &[&str]) -> String {
    // A JSON string is a valid TOML basic string for everything a test passes.
    let quoted: Vec<String> = items
        .iter()
        .map(|s| serde_json::to_string(s).expect("a string serializes"))
        .collect();
    format!("[{}]", quoted.join(", "))
}

/// A TOML basic string: `"a b"`.
pub fn toml_str(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

pub(crate) fn chmod(p: &Path, mode: u32) -> Result<()> {
    fs::set_permissions(p, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", p.display()))
}
