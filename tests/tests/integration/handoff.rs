//! Socket hand-off: what a service sees is exactly systemd's LISTEN_FDS protocol,
//! and a real third-party consumer (systemd-socket-proxyd) works unchanged.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::time::Duration;

use anyhow::Result;
use holdfast_testkit::{
    ask_tcp, ask_udp, ask_unix, check_handoff, netns_and_sandbox, netns_or_skip, require_file,
    skip_unless, toml_str, ExpectSocket, Holdfast, Sandbox,
};

const T: Duration = Duration::from_secs(10);

#[test]
fn one_socket_is_fd_3_with_exact_listen_env() -> Result<()> {
    let (ns, sandbox) = skip_unless!(netns_and_sandbox()?);
    let exec = sandbox.serve_exec("one")?;
    // No `name`: the LISTEN_FDNAMES entry defaults to the service name.
    sandbox.write_unit(
        "one",
        &format!(
            r#"[service]
exec = {exec}

[[socket]]
protocol = "tcp"
addresses = ["127.0.0.1/32"]
ports = ["8001"]
"#
        ),
    )?;
    let mut hf = Holdfast::start_in(&ns, sandbox)?;
    let pid = hf.wait_running("one", T)?;
    let report = hf.sandbox().wait_report("one", T, |r| r["pid"] == pid)?;
    check_handoff(&report, &[ExpectSocket::tcp("one", "127.0.0.1", 8001)])?;
    let answer = ns.run(|| ask_tcp("127.0.0.1:8001".parse().expect("literal"), T))??;
    assert_eq!(answer, format!("one {pid}\n"));
    assert_eq!(hf.service("one")?["sockets"], serde_json::json!(["one"]));
    hf.stop()?;
    Ok(())
}

#[test]
fn three_sockets_are_fds_3_4_5_in_unit_order() -> Result<()> {
    let (ns, sandbox) = skip_unless!(netns_and_sandbox()?);
    let exec = sandbox.serve_exec("three")?;
    let unix_path = sandbox.path().join("ctl.sock");
    let unix_path_str = unix_path.to_string_lossy().into_owned();
    sandbox.write_unit(
        "three",
        &format!(
            r#"[service]
exec = {exec}

[[socket]]
name = "web"
protocol = "tcp"
addresses = ["127.0.0.1/32"]
ports = ["8001"]

[[socket]]
name = "dns"
protocol = "udp"
addresses = ["::1/128"]
ports = ["8053"]

[[socket]]
name = "ctl"
protocol = "unix-stream"
path = {path}
"#,
            path = toml_str(&unix_path_str)
        ),
    )?;
    let mut hf = Holdfast::start_in(&ns, sandbox)?;
    let pid = hf.wait_running("three", T)?;
    let report = hf.sandbox().wait_report("three", T, |r| r["pid"] == pid)?;
    check_handoff(
        &report,
        &[
            ExpectSocket::tcp("web", "127.0.0.1", 8001),
            ExpectSocket::udp("dns", "::1", 8053),
            ExpectSocket::unix_stream("ctl", &unix_path_str),
        ],
    )?;
    let (web, dns) = ns.run(|| -> Result<_> {
        Ok((
            ask_tcp("127.0.0.1:8001".parse()?, T)?,
            ask_udp("[::1]:8053".parse()?, T)?,
        ))
    })??;
    assert_eq!(web, format!("web {pid}\n"));
    assert_eq!(dns, format!("dns {pid}\n"));
    assert_eq!(ask_unix(&unix_path, T)?, format!("ctl {pid}\n"));
    assert_eq!(
        hf.service("three")?["sockets"],
        serde_json::json!(["web", "dns", "ctl"])
    );
    hf.stop()?;
    Ok(())
}

#[test]
fn systemd_socket_proxyd_works_unchanged() -> Result<()> {
    const PROXYD: &str = "/lib/systemd/systemd-socket-proxyd";
    let ns = skip_unless!(netns_or_skip());
    if !require_file(PROXYD) {
        return Ok(());
    }
    // The backend: a plain TCP server in the namespace, answering one line per
    // connection, then closing.
    let backend = ns.run(|| TcpListener::bind("127.0.0.1:9000"))??;
    std::thread::spawn(move || {
        for conn in backend.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut line = String::new();
            if BufReader::new(&conn).read_line(&mut line).is_ok() {
                let _ = write!(conn, "backend got {}", line);
            }
        }
    });
    let sandbox = Sandbox::new()?;
    sandbox.write_local_unit(
        "proxy",
        8080,
        &format!(r#"exec = ["{PROXYD}", "127.0.0.1:9000"]"#),
    )?;
    let mut hf = Holdfast::start_in(&ns, sandbox)?;
    let pid = hf.wait_running("proxy", T)?;
    for i in 0..3 {
        let answer = ns.run(|| -> Result<String> {
            let mut s = std::net::TcpStream::connect("127.0.0.1:8080")?;
            s.set_read_timeout(Some(T))?;
            writeln!(s, "ping {i}")?;
            let mut answer = String::new();
            BufReader::new(&s).read_line(&mut answer)?;
            Ok(answer)
        })??;
        assert_eq!(
            answer,
            format!("backend got ping {i}\n"),
            "through the proxy"
        );
    }
    // The proxy kept running: it accepted the sockets it was handed.
    assert_eq!(hf.wait_running("proxy", T)?, pid);
    hf.stop()?;
    Ok(())
}
