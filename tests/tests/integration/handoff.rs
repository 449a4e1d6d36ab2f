//! Socket hand-off: what a service sees is exactly systemd's LISTEN_FDS protocol,
//! and a real third-party consumer (systemd-socket-proxyd) works unchanged.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::time::Duration;

use anyhow::Result;
use holdfast_testkit::{
    ask_tcp, ask_udp, ask_unix, check_handoff, netns_and_sandbox, netns_with_tools, skip_unless,
    toml_str, ExpectSocket, Holdfast, Netns, RunOptions, Sandbox,
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
    let (mut hf, pid) = Holdfast::start_running(&ns, sandbox, "one")?;
    let report = hf.sandbox().wait_report("one", T, |r| r["pid"] == pid)?;
    check_handoff(&report, &[ExpectSocket::tcp("one", "127.0.0.1", 8001)])?;
    let answer = ns.run(|| ask_tcp("127.0.0.1:8001".parse().expect("literal"), T))??;
    assert_eq!(answer, format!("one {pid}\n"));
    assert_eq!(hf.service("one")?["sockets"], serde_json::json!(["one"]));
    hf.stop()
}

/// Writes unit `name` running `exec` with the sockets "web" (TCP
/// 127.0.0.1:8001) and "dns" (UDP [::1]:8053), then a third: the lines of
/// its `[[socket]]` table.
fn write_web_dns_and(sandbox: &Sandbox, name: &str, exec: &str, third: &str) -> Result<()> {
    sandbox.write_unit(
        name,
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
{third}
"#
        ),
    )?;
    Ok(())
}

/// "web" and "dns" of [`write_web_dns_and`] answer as the instance `pid`.
fn ask_web_and_dns(ns: &Netns, pid: i32) -> Result<()> {
    let _inside = ns.enter()?;
    assert_eq!(
        ask_tcp("127.0.0.1:8001".parse()?, T)?,
        format!("web {pid}\n")
    );
    assert_eq!(ask_udp("[::1]:8053".parse()?, T)?, format!("dns {pid}\n"));
    Ok(())
}

#[test]
fn three_sockets_are_fds_3_4_5_in_unit_order() -> Result<()> {
    let (ns, sandbox) = skip_unless!(netns_and_sandbox()?);
    let exec = sandbox.serve_exec("three")?;
    let unix_path = sandbox.path().join("ctl.sock");
    let unix_path_str = unix_path.to_string_lossy().into_owned();
    write_web_dns_and(
        &sandbox,
        "three",
        &exec,
        &format!(
            "name = \"ctl\"\nprotocol = \"unix-stream\"\npath = {}",
            toml_str(&unix_path_str)
        ),
    )?;
    let (mut hf, pid) = Holdfast::start_running(&ns, sandbox, "three")?;
    let report = hf.sandbox().wait_report("three", T, |r| r["pid"] == pid)?;
    check_handoff(
        &report,
        &[
            ExpectSocket::tcp("web", "127.0.0.1", 8001),
            ExpectSocket::udp("dns", "::1", 8053),
            ExpectSocket::unix_stream("ctl", &unix_path_str),
        ],
    )?;
    ask_web_and_dns(&ns, pid)?;
    assert_eq!(ask_unix(&unix_path, T)?, format!("ctl {pid}\n"));
    assert_eq!(
        hf.service("three")?["sockets"],
        serde_json::json!(["web", "dns", "ctl"])
    );
    hf.stop()
}

/// The daemon with the dispatcher (`None`: skip), once `name` runs: its pid
/// and serve.py's report.
fn start_dispatched_and_report(
    ns: &Netns,
    sandbox: Sandbox,
    name: &str,
) -> Result<Option<(Holdfast, i32, serde_json::Value)>> {
    let Some(hf) = Holdfast::start_dispatched(ns, sandbox, &RunOptions::default())? else {
        return Ok(None);
    };
    let pid = hf.wait_running(name, T)?;
    let report = hf.sandbox().wait_report(name, T, |r| r["pid"] == pid)?;
    Ok(Some((hf, pid, report)))
}

/// With the sk_lookup dispatcher, a socket declared on one address (a /32 or
/// /128, local or not) and one port is bound there, so getsockname() in the
/// service says what the unit says, as in bind mode and under systemd, while
/// the dispatcher steers it (its lookups are counted). A wider socket has no
/// one address: it is on loopback, on a port the kernel chose.
#[test]
fn with_the_dispatcher_getsockname_shows_the_one_declared_address_and_port() -> Result<()> {
    let (ns, sandbox) = skip_unless!(netns_and_sandbox()?);
    // Routed here, yet on no interface: the socket binds it with IP_FREEBIND.
    ns.add_local_route("192.0.2.0/24")?;
    let exec = sandbox.serve_exec("exact")?;
    let far =
        "name = \"far\"\nprotocol = \"tcp\"\naddresses = [\"192.0.2.7/32\"]\nports = [\"80\"]";
    write_web_dns_and(&sandbox, "exact", &exec, far)?;
    let wide_exec = sandbox.serve_exec("wide")?;
    sandbox.write_tcp_unit(
        "wide",
        &format!("exec = {wide_exec}"),
        "wide",
        &["192.0.2.0/24"],
        &["8080-8089"],
        "",
    )?;
    let (mut hf, pid, report) = skip_unless!(start_dispatched_and_report(&ns, sandbox, "exact")?);
    check_handoff(
        &report,
        &[
            ExpectSocket::tcp("web", "127.0.0.1", 8001),
            ExpectSocket::udp("dns", "::1", 8053),
            ExpectSocket::tcp("far", "192.0.2.7", 80),
        ],
    )?;
    let wide = hf.wait_running("wide", T)?;
    let report = hf.sandbox().wait_report("wide", T, |r| r["pid"] == wide)?;
    let address = &report["sockets"][0]["address"];
    assert_eq!(address[0], "127.0.0.1", "the wide socket: {report}");
    assert!(
        address[1]
            .as_u64()
            .is_some_and(|p| p != 0 && !(8080..=8089).contains(&p)),
        "the wide socket is on a port the kernel chose: {report}"
    );
    ask_web_and_dns(&ns, pid)?;
    let inside = ns.enter()?;
    assert_eq!(ask_tcp("192.0.2.7:80".parse()?, T)?, format!("far {pid}\n"));
    assert_eq!(
        ask_tcp("192.0.2.200:8085".parse()?, T)?,
        format!("wide {wide}\n")
    );
    drop(inside);
    // Steered all the same: the dispatcher counted a lookup on every binding.
    let rows = hf.bindings()?;
    assert_eq!(rows.len(), 4, "{rows:?}");
    for row in &rows {
        assert!(
            row["lookups"].as_u64().is_some_and(|n| n >= 1) && row["socket_present"] == true,
            "a binding the dispatcher did not steer: {row}"
        );
    }
    hf.stop()
}

/// With the dispatcher, a socket whose one address and port another program
/// holds is bound to loopback instead, with a warning, and steered all the
/// same: holdfast starts, and its service answers on that address and port.
#[test]
fn with_the_dispatcher_a_taken_address_falls_back_to_loopback_and_is_steered() -> Result<()> {
    let (ns, sandbox) = skip_unless!(netns_and_sandbox()?);
    let squatter = ns.run(|| TcpListener::bind("127.0.0.1:8002"))??;
    sandbox.write_serve_unit("web", 8002, "")?;
    let (mut hf, pid, report) = skip_unless!(start_dispatched_and_report(&ns, sandbox, "web")?);
    let address = &report["sockets"][0]["address"];
    assert!(
        address[0] == "127.0.0.1" && address[1] != 8002,
        "bound beside the squatter? {report}"
    );
    assert!(
        hf.log()
            .contains("cannot be bound: the socket is bound to loopback instead"),
        "no warning:\n{}",
        hf.log()
    );
    let answer = ns.run(|| ask_tcp("127.0.0.1:8002".parse().expect("literal"), T))??;
    assert_eq!(answer, format!("web {pid}\n"), "steered past the squatter");
    drop(squatter);
    hf.stop()
}

#[test]
fn systemd_socket_proxyd_works_unchanged() -> Result<()> {
    const PROXYD: &str = "/lib/systemd/systemd-socket-proxyd";
    let ns = skip_unless!(netns_with_tools(&[PROXYD]));
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
    let (mut hf, pid) = Holdfast::start_running(&ns, sandbox, "proxy")?;
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
    hf.stop()
}
