//! Crash restarts as a test drives them: the service's running instance killed
//! with SIGKILL round after round, with connections made while it is down, which
//! wait in the backlog holdfast keeps and must each be answered by the next
//! instance.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::{parse_answer, process_gone, wait_for, Holdfast};

impl Holdfast {
    /// `rounds` times: waits until `service` (a serve.py) runs a new instance,
    /// SIGKILLs it, waits until it is gone, connects to every address
    /// `while_down(round)` gives, and fails unless each of those connections is
    /// answered by `service` from another pid. Returns how many connections were
    /// made while down (and prints it, with the time taken). The calling thread
    /// must be inside the namespace.
    pub fn kill_9_rounds(
        &self,
        service: &str,
        rounds: usize,
        timeout: Duration,
        mut while_down: impl FnMut(usize) -> Vec<SocketAddr>,
    ) -> Result<usize> {
        let started = Instant::now();
        let mut previous = 0;
        let mut queued = 0;
        for round in 0..rounds {
            let status = self.wait_service(service, timeout, |s| {
                s["state"] == "running" && s["pid"].as_i64().is_some_and(|p| p as i32 != previous)
            })?;
            let pid = status["pid"].as_i64().context("checked above")? as i32;
            kill(Pid::from_raw(pid), Signal::SIGKILL)?;
            wait_for(&format!("pid {pid} to die"), timeout, || {
                process_gone(pid).then_some(())
            })?;
            // The service is down (or just coming back): these wait in the
            // backlog, and the next instance answers each.
            let mut waiting = Vec::new();
            for addr in while_down(round) {
                let s = TcpStream::connect_timeout(&addr, timeout)
                    .with_context(|| format!("round {round}: connect {addr} while down"))?;
                waiting.push((addr, s));
            }
            for (addr, mut s) in waiting {
                s.set_read_timeout(Some(timeout))?;
                let mut answer = String::new();
                s.read_to_string(&mut answer)
                    .with_context(|| format!("round {round}: {addr} queued while down"))?;
                match parse_answer(&answer) {
                    Some((name, next)) if name == service && next != pid => queued += 1,
                    _ => bail!(
                        "round {round}: {addr} queued while down got {answer:?} (killed pid {pid})"
                    ),
                }
            }
            previous = pid;
        }
        eprintln!(
            "{rounds} kills of {service} in {:?}; {queued} connections queued while down, all answered",
            started.elapsed()
        );
        Ok(queued)
    }
}
