//! The repository's own `units/` (what `cargo xtask run` starts) with the example
//! services, found through PATH as `cargo xtask test` sets it (target/debug first):
//! valid, and serving real clients through holdfast: curl for hello-http, on one address
//! and, with the dispatcher, on a whole prefix and port range (ranges); nc-style clients
//! for echo and for greeter (a process per connection); an overlap restart of hello. In
//! bind mode, what `cargo xtask run` keeps (all but the dispatcher-only units) serves too.

use std::io::{Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use holdfast_testkit::{
    holdfast_check, netns_or_skip, require, run_ok, skip_unless, Holdfast, Netns, Sandbox,
};

const T: Duration = Duration::from_secs(10);

/// [`netns_or_skip`] for a test that runs the example binaries
/// ([`examples_on_path`], under the skip policy): `None` means skip.
fn netns_with_examples() -> Option<Netns> {
    let ns = netns_or_skip()?;
    require("the example binaries on PATH", examples_on_path())?;
    Some(ns)
}

fn repo_units() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../units")
}

/// The directory on PATH where `hello-http` is, provided the `echo` that PATH
/// finds first (the units say just "echo") is the example's, not /bin/echo.
fn examples_on_path() -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let first = |name: &str| {
        std::env::split_paths(&path)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    };
    let Some(hello) = first("hello-http") else {
        bail!("hello-http not on PATH (cargo xtask test puts target/debug first)");
    };
    let dir = hello.parent().expect("a file has a parent").to_owned();
    match first("echo") {
        Some(echo) if echo.parent() == Some(dir.as_path()) => Ok(dir),
        other => bail!(
            "the first echo on PATH is {other:?}, not the example's in {}",
            dir.display()
        ),
    }
}

#[test]
fn repository_units_are_valid() -> Result<()> {
    holdfast_check(&repo_units(), 0)?;
    Ok(())
}

/// What `cargo xtask run` leaves out in bind mode: the units only the dispatcher can serve.
const DISPATCHER_ONLY: &[&str] = &["ranges.toml"];

/// A sandbox with the repository's units, but those in `leave_out`.
fn repo_units_sandbox(leave_out: &[&str]) -> Result<Sandbox> {
    let sandbox = Sandbox::new()?;
    for entry in std::fs::read_dir(repo_units())? {
        let p = entry?.path();
        let name = p
            .file_name()
            .expect("a file")
            .to_string_lossy()
            .into_owned();
        if p.extension().is_some_and(|e| e == "toml") && !leave_out.contains(&name.as_str()) {
            std::fs::copy(&p, sandbox.units_dir().join(&name))?;
        }
    }
    Ok(sandbox)
}

/// `curl URL` inside `ns`: the body.
fn curl(ns: &holdfast_testkit::Netns, url: &str) -> Result<String> {
    let url = url.to_string();
    ns.run(|| -> Result<String> {
        let mut curl = Command::new("curl");
        curl.args(["-sS", "--max-time", "10", &url]);
        let out = run_ok(curl, T)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    })?
}

/// One connection to the greeter (accept = true): what its instance said.
fn greet(ns: &holdfast_testkit::Netns) -> Result<String> {
    ns.run(|| -> Result<String> {
        let mut s = TcpStream::connect("127.0.0.1:7070").context("connect greeter")?;
        s.set_read_timeout(Some(T))?;
        let mut said = String::new();
        s.read_to_string(&mut said)?;
        Ok(said)
    })?
}

/// hello (curl), echo (tcp and udp) and greeter (a process per connection) answer,
/// and hello's overlap restart replaces its process.
fn check_bind_mode_units(hf: &Holdfast, ns: &holdfast_testkit::Netns) -> Result<()> {
    let hello = hf.wait_running("hello", T)?;
    hf.wait_running("echo", T)?;
    let body = curl(ns, "http://127.0.0.1:8080/")?;
    assert!(
        body.contains("from hello") && body.contains(&format!("pid {hello}")),
        "hello-http answered {body:?} (want its service name and pid {hello})"
    );

    let (tcp, udp) = ns.run(|| -> Result<(String, String)> {
        let mut s = TcpStream::connect("127.0.0.1:7007").context("connect echo-tcp")?;
        s.set_read_timeout(Some(T))?;
        s.write_all(b"ping over tcp\n")?;
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf)?;
        let tcp = String::from_utf8_lossy(&buf[..n]).into_owned();
        let u = UdpSocket::bind("127.0.0.1:0")?;
        u.set_read_timeout(Some(T))?;
        u.send_to(b"ping over udp", "127.0.0.1:7007")?;
        let (n, _) = u.recv_from(&mut buf)?;
        Ok((tcp, String::from_utf8_lossy(&buf[..n]).into_owned()))
    })??;
    assert_eq!(tcp, "ping over tcp\n");
    assert_eq!(udp, "ping over udp");

    let pid_in = |said: &str| -> Option<String> {
        said.split_whitespace()
            .skip_while(|w| *w != "pid")
            .nth(1)
            .map(str::to_string)
    };
    let (first, second) = (greet(ns)?, greet(ns)?);
    assert!(
        first.starts_with("hello 127.0.0.1:"),
        "greeter said {first:?}"
    );
    let (a, b) = (pid_in(&first), pid_in(&second));
    assert!(
        a.is_some() && a != b,
        "a process per connection: {first:?} then {second:?}"
    );

    // The overlap restart the demo suggests: a new hello, on the same socket.
    hf.cli_ok(&["restart", "hello", "--mode", "overlap"])?;
    let old = format!("pid {hello}");
    let again = holdfast_testkit::wait_for("a new hello answering", T, || {
        curl(ns, "http://127.0.0.1:8080/")
            .ok()
            .filter(|b| b.contains("from hello") && !b.contains(&old))
    })?;
    assert!(again.contains("from hello"), "{again:?}");
    Ok(())
}

#[test]
fn repository_units_serve_real_clients_with_the_dispatcher() -> Result<()> {
    let ns = skip_unless!(netns_with_examples());
    let sandbox = repo_units_sandbox(&[])?;
    let mut hf = skip_unless!(Holdfast::start_in_mode(&ns, sandbox, true)?);
    check_bind_mode_units(&hf, &ns)?;
    // ranges: one socket on 127.0.0.0/8 x 8100-8199, as the demo's try: lines say.
    let ranges = hf.wait_running("ranges", T)?;
    for url in [
        "http://127.1.2.3:8199/",
        "http://127.0.0.1:8100/",
        "http://127.254.0.9:8150/",
    ] {
        let body = curl(&ns, url)?;
        assert!(
            body.contains("from ranges") && body.contains(&format!("pid {ranges}")),
            "{url}: {body:?}"
        );
    }
    let bindings = hf.cli_ok(&["bindings"])?;
    assert!(
        bindings.contains("127.0.0.0/8") && bindings.contains("8100-8199"),
        "{bindings}"
    );
    hf.stop()
}

#[test]
fn repository_units_but_the_dispatcher_only_ones_serve_in_bind_mode() -> Result<()> {
    let ns = skip_unless!(netns_with_examples());
    let mut hf = Holdfast::start_in(&ns, repo_units_sandbox(DISPATCHER_ONLY)?)?;
    check_bind_mode_units(&hf, &ns)?;
    hf.stop()
}
