//! What a LISTEN_FDS consumer must see, checked against a [`crate::SERVE_PY`] report.

use std::collections::BTreeSet;

use anyhow::{bail, Result};
use serde_json::{json, Value};

/// One socket a service should have been handed, in unit order.
#[derive(Debug, Clone)]
pub struct ExpectSocket {
    /// Its LISTEN_FDNAMES entry.
    pub name: String,
    /// `AF_INET`, `AF_INET6`, `AF_UNIX`.
    pub family: &'static str,
    /// `SOCK_STREAM`, `SOCK_DGRAM`.
    pub kind: &'static str,
    /// What getsockname() says: `["127.0.0.1", 8001]` or a path.
    pub address: Value,
}

impl ExpectSocket {
    pub fn tcp(name: &str, ip: &str, port: u16) -> ExpectSocket {
        ExpectSocket::ip(name, ip, port, "SOCK_STREAM")
    }

    pub fn udp(name: &str, ip: &str, port: u16) -> ExpectSocket {
        ExpectSocket::ip(name, ip, port, "SOCK_DGRAM")
    }

    pub fn unix_stream(name: &str, path: &str) -> ExpectSocket {
        ExpectSocket {
            name: name.to_owned(),
            family: "AF_UNIX",
            kind: "SOCK_STREAM",
            address: json!(path),
        }
    }

    fn ip(name: &str, ip: &str, port: u16, kind: &'static str) -> ExpectSocket {
        ExpectSocket {
            name: name.to_owned(),
            family: if ip.contains(':') {
                "AF_INET6"
            } else {
                "AF_INET"
            },
            kind,
            address: json!([ip, port]),
        }
    }
}

/// Checks a report against systemd's protocol: `LISTEN_FDS` = the number of
/// sockets, `LISTEN_FDNAMES` = their names joined by `:`, `LISTEN_PID` = the
/// reporting process's own pid, the sockets at fds 3, 4, … in order (family, type,
/// bound address, listening for stream sockets, blocking as systemd passes them),
/// and no open fd besides 0–2 and those. Lists every mismatch at once.
pub fn check_handoff(report: &Value, expected: &[ExpectSocket]) -> Result<()> {
    let mut wrong = Vec::new();
    let env = &report["env"];
    let want_fds = expected.len().to_string();
    if env["LISTEN_FDS"] != want_fds.as_str() {
        wrong.push(format!(
            "LISTEN_FDS is {}, want {want_fds:?}",
            env["LISTEN_FDS"]
        ));
    }
    let names: Vec<&str> = expected.iter().map(|s| s.name.as_str()).collect();
    let want_names = names.join(":");
    if env["LISTEN_FDNAMES"] != want_names.as_str() {
        wrong.push(format!(
            "LISTEN_FDNAMES is {}, want {want_names:?}",
            env["LISTEN_FDNAMES"]
        ));
    }
    let pid = report["pid"].to_string();
    if env["LISTEN_PID"] != pid.as_str() {
        wrong.push(format!(
            "LISTEN_PID is {}, want the child's own pid {pid:?}",
            env["LISTEN_PID"]
        ));
    }

    let open: BTreeSet<u32> = report["fds"]
        .as_object()
        .map(|m| m.keys().filter_map(|k| k.parse().ok()).collect())
        .unwrap_or_default();
    let want_open: BTreeSet<u32> = (0..3 + expected.len() as u32).collect();
    if open != want_open {
        wrong.push(format!(
            "open fds are {open:?} ({}), want exactly {want_open:?}",
            report["fds"]
        ));
    }

    let got = report["sockets"].as_array().cloned().unwrap_or_default();
    if got.len() != expected.len() {
        wrong.push(format!(
            "the child described {} sockets, want {}",
            got.len(),
            expected.len()
        ));
    }
    for (i, (want, got)) in expected.iter().zip(&got).enumerate() {
        let fd = 3 + i;
        let stream = want.kind == "SOCK_STREAM";
        let checks = [
            ("family", json!(want.family), &got["family"]),
            ("type", json!(want.kind), &got["type"]),
            ("getsockname", want.address.clone(), &got["address"]),
            ("listening", json!(stream), &got["listening"]),
            (
                "blocking (systemd passes blocking sockets)",
                json!(true),
                &got["blocking"],
            ),
        ];
        for (what, want_v, got_v) in checks {
            if &want_v != got_v {
                wrong.push(format!(
                    "fd {fd} ({}): {what} is {got_v}, want {want_v}",
                    want.name
                ));
            }
        }
    }
    if !wrong.is_empty() {
        bail!(
            "the child was not handed its sockets as systemd would:\n  {}\nreport: {report}",
            wrong.join("\n  ")
        );
    }
    Ok(())
}
