//! A client that connects in a loop, from its own thread inside a test's network
//! namespace, while the test changes something (a restart, a reload), and tallies
//! what every connection got: answered by the expected service, refused,
//! answered by another service (misrouted), or failed otherwise.

use std::collections::BTreeSet;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};

use crate::{ask_tcp, Netns};

/// Splits a serve.py answer `"NAME PID\n"` into its name and pid.
pub fn parse_answer(answer: &str) -> Option<(&str, i32)> {
    let (name, pid) = answer.trim_end().split_once(' ')?;
    Some((name, pid.parse().ok()?))
}

/// What the loop's connections got.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    /// Answered by the service the target expects.
    pub answered: u64,
    /// `connect()` refused (ECONNREFUSED).
    pub refused: u64,
    /// Answered by another service, or with something that is no serve.py answer:
    /// `"ADDR: ANSWER"`.
    pub misrouted: Vec<String>,
    /// Any other failure (reset, timeout, closed without an answer, …): `"ADDR: ERROR"`.
    pub failed: Vec<String>,
    /// Every `(service, pid)` that answered.
    pub pids: BTreeSet<(String, i32)>,
}

impl Tally {
    /// Counts an answer from `service`'s process `pid`.
    pub fn answered_by(&mut self, service: &str, pid: i32) {
        self.answered += 1;
        self.pids.insert((service.to_owned(), pid));
    }

    /// Fails unless no connection was refused or misrouted and at most
    /// `may_fail` failed otherwise (e.g. one per instance stopped under it).
    pub fn expect_no_loss(&self, may_fail: usize) -> Result<()> {
        if self.refused != 0 {
            bail!("{} connections refused: {self:?}", self.refused);
        }
        if !self.misrouted.is_empty() {
            bail!("{} connections misrouted: {self:?}", self.misrouted.len());
        }
        if self.failed.len() > may_fail {
            bail!(
                "{} connections failed, more than {may_fail}: {self:?}",
                self.failed.len()
            );
        }
        Ok(())
    }

    /// The pids that answered for `service`.
    pub fn pids_of(&self, service: &str) -> BTreeSet<i32> {
        self.pids
            .iter()
            .filter(|(s, _)| s == service)
            .map(|(_, p)| *p)
            .collect()
    }
}

/// A running loop client; [`LoopClient::finish`] stops it and returns the tally.
#[derive(Debug)]
pub struct LoopClient {
    done: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<Tally>>>,
}

impl LoopClient {
    /// Connects to each `(address, expected service name)` in turn, in a loop,
    /// pausing `pause` after each round, until [`LoopClient::finish`]. Each
    /// connection is bounded by `timeout`; the services are serve.py's.
    pub fn start(
        ns: &Netns,
        targets: Vec<(SocketAddr, String)>,
        pause: Duration,
        timeout: Duration,
    ) -> Result<LoopClient> {
        LoopClient::each_round(ns, pause, move |tally| {
            for (addr, expect) in &targets {
                match ask_tcp(*addr, timeout) {
                    // Closed without a word: accepted by an instance that
                    // ended before it answered, not a wrong destination.
                    Ok(answer) if answer.is_empty() => tally
                        .failed
                        .push(format!("{addr}: closed without an answer")),
                    Ok(answer) => match parse_answer(&answer) {
                        Some((name, pid)) if name == expect => tally.answered_by(name, pid),
                        _ => tally.misrouted.push(format!("{addr}: {answer:?}")),
                    },
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => tally.refused += 1,
                    Err(e) => tally.failed.push(format!("{addr}: {e}")),
                }
            }
        })
    }

    /// Calls `round` in a loop from a thread inside `ns`, pausing `pause` after
    /// each call, until [`LoopClient::finish`]; `round` asks whatever the test
    /// serves and records what it got in the tally.
    pub fn each_round(
        ns: &Netns,
        pause: Duration,
        mut round: impl FnMut(&mut Tally) + Send + 'static,
    ) -> Result<LoopClient> {
        let done = Arc::new(AtomicBool::new(false));
        let ns_file = ns.open()?;
        let stop = done.clone();
        let thread = std::thread::Builder::new()
            .name("loop-client".into())
            .spawn(move || -> Result<Tally> {
                // This thread only, for its whole life: it never serves another test.
                nix::sched::setns(&ns_file, nix::sched::CloneFlags::CLONE_NEWNET)?;
                let mut tally = Tally::default();
                while !stop.load(Ordering::Relaxed) {
                    round(&mut tally);
                    std::thread::sleep(pause);
                }
                Ok(tally)
            })?;
        Ok(LoopClient {
            done,
            thread: Some(thread),
        })
    }

    /// Stops the loop and returns what it saw.
    pub fn finish(mut self) -> Result<Tally> {
        self.done.store(true, Ordering::Relaxed);
        let thread = self.thread.take().expect("joined only here or on drop");
        thread
            .join()
            .map_err(|_| anyhow!("the loop client panicked"))?
    }
}

impl Drop for LoopClient {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
