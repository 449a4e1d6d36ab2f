//! The repository's own `units/` (what `cargo xtask run` starts) with the example
//! services, found through PATH as `cargo xtask test` sets it (target/debug first):
//! valid, and serving real clients (curl for hello-http) through holdfast.

use std::io::{Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use holdfast_testkit::{
    holdfast_cli, netns_or_skip, require, run_bounded, skip_unless, Holdfast, Sandbox,
};

const T: Duration = Duration::from_secs(10);

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
    let out = holdfast_cli(&["check", &repo_units().to_string_lossy()])?;
    assert_eq!(
        out.status.code(),
        Some(0),
        "holdfast check units/: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[test]
fn repository_units_serve_curl_and_echo_clients() -> Result<()> {
    let ns = skip_unless!(netns_or_skip());
    if require("the example binaries on PATH", examples_on_path()).is_none() {
        return Ok(());
    }
    let sandbox = Sandbox::new()?;
    for entry in std::fs::read_dir(repo_units())? {
        let p = entry?.path();
        if p.extension().is_some_and(|e| e == "toml") {
            std::fs::copy(&p, sandbox.units_dir().join(p.file_name().expect("a file")))?;
        }
    }
    let mut hf = Holdfast::start_in(&ns, sandbox)?;
    let hello = hf.wait_running("hello", T)?;
    hf.wait_running("echo", T)?;

    let body = ns.run(|| -> Result<String> {
        let mut curl = Command::new("curl");
        curl.args(["-sS", "--max-time", "10", "http://127.0.0.1:8080/"]);
        let out = run_bounded(curl, T)?;
        if !out.status.success() {
            bail!("curl: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    })??;
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
    hf.stop()?;
    Ok(())
}
