//! The sd_notify side of the tests: [`NOTIFIER_PY`], a Python service that writes to
//! NOTIFY_SOCKET itself and takes commands over its socket ([`tell`]), the path of a
//! service's notify socket, and a foreign sender ([`send_notify_as`]).

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::{netns_and_sandbox, toml_array, Holdfast, Netns, Sandbox, PYTHON};

/// The commanded sd_notify sender; see its docstring.
pub const NOTIFIER_PY: &str = include_str!("notifier.py");

impl Sandbox {
    /// The argv, as a TOML array, of a [`NOTIFIER_PY`] service that reports to
    /// `out/TAG.json` and `out/TAG.starts`, with `flags` (`--ready`, `--ping`, …).
    pub fn notifier_exec(&self, tag: &str, flags: &[&str]) -> Result<String> {
        let script = self.path().join("notifier.py");
        if !script.exists() {
            self.write_script("notifier.py", NOTIFIER_PY)?;
        }
        let script = script.to_string_lossy().into_owned();
        let out = self.out_dir().to_string_lossy().into_owned();
        let mut argv = vec![PYTHON, "-I", "-S", &script, &out, tag];
        argv.extend_from_slice(flags);
        Ok(toml_array(&argv))
    }

    /// Writes `units/NAME.toml`: a `type = "notify"` [`Sandbox::notifier_exec`]
    /// service (tag NAME) with `flags`, `service_extra` lines in `[service]`, and
    /// one socket named NAME on TCP 127.0.0.1:`port` (its command socket).
    pub fn write_notifier_unit(
        &self,
        name: &str,
        port: u16,
        flags: &[&str],
        service_extra: &str,
    ) -> Result<()> {
        let exec = self.notifier_exec(name, flags)?;
        self.write_local_unit(
            name,
            port,
            &format!("exec = {exec}\ntype = \"notify\"\n{service_extra}"),
        )
    }

    /// `<state>/notify/NAME.sock`: the NOTIFY_SOCKET of service NAME.
    pub fn notify_socket(&self, name: &str) -> PathBuf {
        self.state_dir().join("notify").join(format!("{name}.sock"))
    }

    /// The pids in `out/TAG.starts`, one per start of a [`NOTIFIER_PY`] service.
    pub fn starts(&self, tag: &str) -> Vec<i32> {
        std::fs::read_to_string(self.out(&format!("{tag}.starts")))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }
}

/// [`netns_and_sandbox`] with one [`Sandbox::write_notifier_unit`] service NAME
/// (`flags`, `service_extra`), its command socket on 127.0.0.1:8080, the opening
/// of most sd_notify tests: `Ok(None)` means skip.
pub fn netns_and_notifier(
    name: &str,
    flags: &[&str],
    service_extra: &str,
) -> Result<Option<(Netns, Sandbox)>> {
    let Some((ns, sandbox)) = netns_and_sandbox()? else {
        return Ok(None);
    };
    sandbox.write_notifier_unit(name, 8080, flags, service_extra)?;
    Ok(Some((ns, sandbox)))
}

/// [`netns_and_notifier`] with the daemon started ([`Holdfast::start_in`]) on it:
/// `Ok(None)` means skip.
pub fn notifier_started(
    name: &str,
    flags: &[&str],
    service_extra: &str,
) -> Result<Option<(Netns, Holdfast)>> {
    let Some((ns, sandbox)) = netns_and_notifier(name, flags, service_extra)? else {
        return Ok(None);
    };
    let hf = Holdfast::start_in(&ns, sandbox)?;
    Ok(Some((ns, hf)))
}

/// [`netns_and_notifier`] with `--ready` and the other `flags`, the daemon started
/// and service NAME running ([`Holdfast::start_running`]): the namespace, the
/// daemon and the service's pid; `Ok(None)` means skip.
pub fn notifier_running(
    name: &str,
    flags: &[&str],
    service_extra: &str,
) -> Result<Option<(Netns, Holdfast, i32)>> {
    // A notify service is running once it said READY=1.
    let flags = [&["--ready"], flags].concat();
    let Some((ns, sandbox)) = netns_and_notifier(name, &flags, service_extra)? else {
        return Ok(None);
    };
    let (hf, pid) = Holdfast::start_running(&ns, sandbox, name)?;
    Ok(Some((ns, hf, pid)))
}

/// Sends one command line to a [`NOTIFIER_PY`] service at `addr` (from inside its
/// namespace) and returns its reply line; fails unless the reply starts with `ok`
/// or is the answer to `pid`.
pub fn tell(addr: SocketAddr, command: &str) -> Result<String> {
    let t = Duration::from_secs(10);
    let mut s = TcpStream::connect_timeout(&addr, t).with_context(|| format!("connect {addr}"))?;
    s.set_read_timeout(Some(t))?;
    s.write_all(format!("{command}\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .with_context(|| format!("reply to {command:?}"))?;
    let line = line.trim_end().to_owned();
    if command != "pid" && !line.starts_with("ok") {
        bail!("command {command:?} answered {line:?}");
    }
    Ok(line)
}

/// The number after `ok ` in a [`tell`] reply.
pub fn reply_pid(reply: &str) -> Result<i32> {
    reply
        .rsplit(' ')
        .next()
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("no pid in reply {reply:?}"))
}

/// Starts a process outside any service, as `uid`/`gid` in a process group of its
/// own, that sends `text` to the notify socket at `socket` and then stays alive for
/// `linger` (zero: exits at once). Returns it once it has sent (its stdout says so).
/// Supplementary groups are dropped (std does so when it sets the uid as root).
pub fn send_notify_as(
    uid: u32,
    gid: u32,
    socket: &Path,
    text: &str,
    linger: Duration,
) -> Result<Child> {
    let code = "import socket, sys, time\n\
                s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n\
                s.sendto(sys.argv[2].encode(), sys.argv[1])\n\
                print('sent', flush=True)\n\
                time.sleep(float(sys.argv[3]))\n";
    let mut child = Command::new(PYTHON)
        .args(["-I", "-S", "-c", code])
        .arg(socket)
        .arg(text)
        .arg(linger.as_secs_f64().to_string())
        .uid(uid)
        .gid(gid)
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("spawn the foreign sender")?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
    if line.trim() != "sent" {
        let status = child.wait()?;
        bail!("the foreign sender (uid {uid}) did not send: {status}");
    }
    Ok(child)
}

/// Sends `text` to the notify socket at `socket` from this (test) process: uid 0,
/// alive, and in a process group no service has.
pub fn send_notify_from_here(socket: &Path, text: &str) -> Result<()> {
    let s = UnixDatagram::unbound()?;
    s.send_to(text.as_bytes(), socket)
        .with_context(|| format!("send to {}", socket.display()))?;
    Ok(())
}
