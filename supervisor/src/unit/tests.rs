//! Tests of the unit module: each kind of mistake with its place and words,
//! whole directories, the cross-unit checks, and parse → to_toml → parse.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use pretty_assertions::assert_eq;

use super::*;

mod commands;
mod process_keys;

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "holdfast-unit-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }
    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).expect("write unit file");
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// (line, column, key, message, hint), with message and hint cut down to the
/// expected fragment when they contain it, so a mismatch shows the whole text.
type Seen = (usize, usize, String, String, String);

/// An expected diagnostic: (line, column, key, message fragment, hint fragment).
type Expect<'a> = (usize, usize, &'a str, &'a str, &'a str);

fn seen(diags: &Diagnostics, expected: &[Expect<'_>]) -> Vec<Seen> {
    diags
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let (m, h) = expected.get(i).map_or(("", ""), |e| (e.3, e.4));
            let cut = |text: &str, frag: &str| {
                if text.contains(frag) {
                    frag.to_string()
                } else {
                    text.to_string()
                }
            };
            (
                d.line,
                d.column,
                d.key.clone(),
                cut(&d.message, m),
                cut(&d.hint, h),
            )
        })
        .collect()
}

fn want(expected: &[Expect<'_>]) -> Vec<Seen> {
    expected
        .iter()
        .map(|e| (e.0, e.1, e.2.to_string(), e.3.to_string(), e.4.to_string()))
        .collect()
}

/// Each case's text, read by `parse`, gives exactly its one diagnostic.
fn assert_each_mistake<T: std::fmt::Debug>(
    parse: impl Fn(&str) -> Result<T, Diagnostics>,
    cases: &[(&str, Expect<'_>)],
) {
    for (text, expect) in cases {
        let diags = parse(text).unwrap_err();
        assert_eq!(seen(&diags, &[*expect]), want(&[*expect]), "{text}");
    }
}

/// `text` as the unit file svc.toml.
fn unit_file(text: &str) -> Result<Unit, Diagnostics> {
    parse_unit("svc", Path::new("svc.toml"), text)
}

const WEB_SERVICE: &str = "[service]\nexec = [\"/bin/true\"]\n";

#[test]
fn each_kind_of_mistake_is_placed_and_explained() {
    // (case, service name, text, [(line, column, key, message fragment, hint fragment)])
    #[rustfmt::skip]
    let cases: &[(&str, &str, &str, &[Expect<'_>])] = &[
        ("unknown key, close to a known one", "web",
         "[service]\nexec = [\"/bin/true\"]\nrestart_delay = \"1s\"\n",
         &[(3, 1, "service.restart_delay", "unknown key `restart_delay` in [service]", "did you mean `restart-delay`?")]),
        ("unknown key, nothing close", "web",
         "[service]\nexec = [\"/bin/true\"]\ncolour = \"red\"\n",
         &[(3, 1, "service.colour", "unknown key `colour`", "exec, type, restart")]),
        ("unknown top-level table", "web",
         "[service]\nexec = [\"/bin/true\"]\n[sockets]\nname = \"x\"\n",
         &[(3, 2, "sockets", "unknown key `sockets` at the top level", "did you mean `socket`?")]),
        ("missing [service]", "web",
         "[[socket]]\naddresses = [\"127.0.0.1\"]\nports = [\"80\"]\n",
         &[(1, 1, "service", "missing [service] table", "exec = [")]),
        ("missing exec", "web",
         "# web\n[service]\nrestart = \"always\"\n",
         &[(2, 1, "service.exec", "missing exec", "exec = [\"/usr/bin/program\"")]),
        ("empty exec", "web",
         "[service]\nexec = []\n",
         &[(2, 8, "service.exec", "exec is empty", "array of strings")]),
        ("empty program name", "web",
         "[service]\nexec = [\"\", \"--x\"]\n",
         &[(2, 9, "service.exec[0]", "the program name is empty", "program's path")]),
        ("exec is a string", "web",
         "[service]\nexec = \"/bin/true --x\"\n",
         &[(2, 8, "service.exec", "expected an array, found a string \"/bin/true --x\"", "exec = [\"/usr/bin/program\", \"--flag\"]")]),
        ("a long value is quoted short", "web",
         "[service]\nexec = [\"/bin/true\"]\nuser = { name = \"www-data\", uid = 33, gid = 33, shell = \"/bin/sh\" }\n",
         &[(3, 8, "service.user", "expected a string, found an inline table { name = \"www-data\", uid = 33, gid = 33,…", "user = \"www-data\"")]),
        ("exec element not a string", "web",
         "[service]\nexec = [\"/bin/sleep\", 5]\n",
         &[(2, 23, "service.exec[1]", "expected a string, found an integer 5", "write it in quotes")]),
        ("misspelled choice", "web",
         "[service]\nexec = [\"/bin/true\"]\nrestart = \"alway\"\n",
         &[(3, 11, "service.restart", "unknown value \"alway\"", "did you mean \"always\"?")]),
        ("duration as a number", "web",
         "[service]\nexec = [\"/bin/true\"]\nrestart-delay = 5\n",
         &[(3, 17, "service.restart-delay", "found the number 5", "write \"5s\" or \"5ms\"")]),
        ("bad duration string", "web",
         "[service]\nexec = [\"/bin/true\"]\nstop-timeout = \"5 secs please\"\n",
         &[(3, 16, "service.stop-timeout", "\"5 secs please\" is not a duration", "\"100ms\", \"5s\"")]),
        ("huge durations, each bounded where it is written", "web",
         "[service]\nexec = [\"/bin/true\"]\nstop-timeout = \"18446744073709551615s\"\nstart-timeout = \"18446744073709551615s\"\nrestart-delay = \"18446744073709551615s\"\nwatchdog = \"2years\"\n[[socket]]\naddresses = [\"127.0.0.1\"]\nports = [80]\nrate-limit-pause = \"1year 1s\"\n",
         &[(3, 16, "service.stop-timeout", "\"18446744073709551615s\" is more than the largest duration allowed, 1year (31557600s)", "at most \"1year\""),
           (4, 17, "service.start-timeout", "is more than the largest duration allowed, 1year", "at most \"1year\""),
           (5, 17, "service.restart-delay", "is more than the largest duration allowed, 1year", "at most \"1year\""),
           (6, 12, "service.watchdog", "\"2years\" is more than the largest duration allowed", "at most \"1year\""),
           (10, 20, "socket[0].rate-limit-pause", "\"1year 1s\" is more than the largest duration allowed", "at most \"1year\"")]),
        ("zero stop timeout", "web",
         "[service]\nexec = [\"/bin/true\"]\nstop-timeout = \"0s\"\n",
         &[(3, 16, "service.stop-timeout", "must be more than 0", "positive duration")]),
        ("delay cap below first delay", "web",
         "[service]\nexec = [\"/bin/true\"]\nrestart-delay = \"2s\"\nrestart-delay-max = \"1s\"\n",
         &[(4, 21, "service.restart-delay-max", "restart-delay-max (1s) is less than restart-delay (2s)", "\"2s\" or more")]),
        ("start limit burst zero", "web",
         "[service]\nexec = [\"/bin/true\"]\nstart-limit-burst = 0\n",
         &[(3, 21, "service.start-limit-burst", "0 is outside 1-4294967295", "whole number")]),
        ("integer in quotes", "web",
         "[service]\nexec = [\"/bin/true\"]\nfd-store-max = \"4\"\n",
         &[(3, 16, "service.fd-store-max", "found the string \"4\"", "fd-store-max = 4")]),
        ("bad environment name and value", "web",
         "[service]\nexec = [\"/bin/true\"]\nenvironment = { \"MY-VAR\" = \"1\", PORT = 8080 }\n",
         &[(3, 17, "service.environment.MY-VAR", "\"MY-VAR\" is not a valid environment variable name", "e.g. MY_VAR"),
           (3, 40, "service.environment.PORT", "expected a string, found an integer 8080", "PORT = \"8080\"")]),
        ("relative working directory", "web",
         "[service]\nexec = [\"/bin/true\"]\nworking-directory = \"srv/web\"\n",
         &[(3, 21, "service.working-directory", "\"srv/web\" is not an absolute path", "\"/srv/web\"")]),
        ("empty user", "web",
         "[service]\nexec = [\"/bin/true\"]\nuser = \"\"\n",
         &[(3, 8, "service.user", "is empty", "numeric id")]),
        ("service name from a bad file name", "my web",
         WEB_SERVICE,
         &[(0, 0, "", "service name \"my web\" (the file name without .toml) contains ' '", "rename it to my-web.toml")]),
        ("TOML syntax error", "web",
         "[service]\nexec = [\"/bin/true\"\n",
         &[(3, 1, "", "invalid TOML", "toml.io")]),
        ("duplicate key (TOML)", "web",
         "[service]\nexec = [\"/bin/true\"]\nexec = [\"/bin/false\"]\n",
         &[(3, 1, "", "duplicate key `exec`", "")]),
        ("[socket] instead of [[socket]]", "web",
         "[service]\nexec = [\"/bin/true\"]\n[socket]\nports = [\"80\"]\n",
         &[(3, 1, "socket", "[socket] is a single table", "write [[socket]] (two brackets)")]),
        ("port out of range", "web",
         "[service]\nexec = [\"/bin/true\"]\n\n[[socket]]\naddresses = [\"127.0.0.1\"]\nports = [\"8080\", \"70000\"]\n",
         &[(6, 18, "socket[0].ports[1]", "port 70000 is outside 1-65535", "between 1 and 65535")]),
        ("port zero as an integer", "web",
         "[service]\nexec = [\"/bin/true\"]\n[[socket]]\naddresses = [\"::1\"]\nports = [0]\n",
         &[(5, 10, "socket[0].ports[0]", "port 0 is outside 1-65535", "e.g. \"8080\"")]),
        ("the same port twice", "web",
         "[service]\nexec = [\"/bin/true\"]\n[[socket]]\naddresses = [\"::1\"]\nports = [\"80\", 80]\n",
         &[(5, 16, "socket[0].ports[1]", "80 is listed twice", "remove one")]),
        ("port range backwards", "web",
         "[service]\nexec = [\"/bin/true\"]\n[[socket]]\naddresses = [\"::1\"]\nports = [\"8099-8000\"]\n",
         &[(5, 10, "socket[0].ports[0]", "port range \"8099-8000\" runs backwards", "\"8000-8099\"")]),
        ("port not a number", "web",
         "[service]\nexec = [\"/bin/true\"]\n[[socket]]\naddresses = [\"::1\"]\nports = [\"http\"]\n",
         &[(5, 10, "socket[0].ports[0]", "\"http\" is not a port or a port range", "\"8000-8099\"")]),
        ("prefix with host bits", "web",
         "[service]\nexec = [\"/bin/true\"]\n[[socket]]\naddresses = [\"192.0.2.7/24\"]\nports = [\"80\"]\n",
         &[(4, 14, "socket[0].addresses[0]", "\"192.0.2.7/24\" has host bits set", "write \"192.0.2.0/24\" for the whole network")]),
        ("IPv6 prefix with host bits", "web",
         "[service]\nexec = [\"/bin/true\"]\n[[socket]]\naddresses = [\"2001:db8::1/64\"]\nports = [\"80\"]\n",
         &[(4, 14, "socket[0].addresses[0]", "has host bits set", "\"2001:db8::/64\"")]),
        ("IPv4-mapped IPv6", "web",
         "[service]\nexec = [\"/bin/true\"]\n[[socket]]\naddresses = [\"::ffff:192.0.2.7/120\"]\nports = [\"80\"]\n",
         &[(4, 14, "socket[0].addresses[0]", "is an IPv4-mapped IPv6 address", "write the IPv4 form: \"192.0.2.0/24\"")]),
        ("prefix too long", "web",
         "[service]\nexec = [\"/bin/true\"]\n[[socket]]\naddresses = [\"10.0.0.0/33\"]\nports = [\"80\"]\n",
         &[(4, 14, "socket[0].addresses[0]", "prefix length \"33\" is not valid for IPv4 (0 to 32)", "\"10.0.0.0/24\"")]),
        ("address with a port in it", "web",
         "[service]\nexec = [\"/bin/true\"]\n[[socket]]\naddresses = [\"127.0.0.1:8080\"]\nports = [\"80\"]\n",
         &[(4, 14, "socket[0].addresses[0]", "is not an IP address or prefix", "addresses = [\"127.0.0.1\"] and ports = [\"8080\"]")]),
        ("IP socket with no address or port", "web",
         "[service]\nexec = [\"/bin/true\"]\n\n[[socket]]\nname = \"http\"\n",
         &[(4, 1, "socket[0].addresses", "a tcp socket needs at least one address", "127.0.0.1"),
           (4, 1, "socket[0].ports", "a tcp socket needs at least one port", "8080")]),
        ("empty address list", "web",
         "[service]\nexec = [\"/bin/true\"]\n[[socket]]\nprotocol = \"udp\"\naddresses = []\nports = [\"53\"]\n",
         &[(5, 13, "socket[0].addresses", "a udp socket needs at least one address", "127.0.0.1")]),
        ("unknown protocol", "web",
         "[service]\nexec = [\"/bin/true\"]\n[[socket]]\nprotocol = \"sctp\"\n",
         &[(4, 12, "socket[0].protocol", "unknown value \"sctp\"", "\"tcp\", \"udp\", \"unix-stream\", \"unix-dgram\"")]),
        ("path on an IP socket", "web",
         "[service]\nexec = [\"/bin/true\"]\n[[socket]]\naddresses = [\"::1\"]\nports = [\"80\"]\npath = \"/run/web.sock\"\n",
         &[(6, 1, "socket[0].path", "path is for unix sockets, and this socket is tcp (the default protocol)", "unix-stream")]),
        ("unix socket without a path, with ports", "web",
         "[service]\nexec = [\"/bin/true\"]\n[[socket]]\nprotocol = \"unix-stream\"\nports = [\"80\"]\n",
         &[(3, 1, "socket[0].path", "a unix-stream socket needs a path", "path = \"/run/NAME.sock\""),
           (5, 1, "socket[0].ports", "ports are for tcp and udp sockets, and this socket is unix-stream", "remove ports")]),
        ("a path but no protocol", "web",
         "[service]\nexec = [\"/bin/true\"]\n[[socket]]\npath = \"/run/web.sock\"\n",
         &[(3, 1, "socket[0].protocol", "has a path but no protocol, and the default protocol is tcp", "add protocol = \"unix-stream\"")]),
        ("relative unix path", "web",
         "[service]\nexec = [\"/bin/true\"]\n[[socket]]\nprotocol = \"unix-dgram\"\npath = \"web.sock\"\n",
         &[(5, 8, "socket[0].path", "unix socket path \"web.sock\" is not absolute", "\"/run/web.sock\"")]),
        ("option for another protocol", "web",
         "[service]\nexec = [\"/bin/true\"]\n[[socket]]\nprotocol = \"udp\"\naddresses = [\"::1\"]\nports = [\"53\"]\nkeep-alive = true\nbacklog = 10\n",
         &[(7, 1, "socket[0].keep-alive", "keep-alive applies only to tcp sockets, and this socket is udp", "remove keep-alive"),
           (8, 1, "socket[0].backlog", "backlog applies only to stream sockets", "remove backlog")]),
        ("boolean in quotes", "web",
         "[service]\nexec = [\"/bin/true\"]\n[[socket]]\naddresses = [\"::1\"]\nports = [\"80\"]\nno-delay = \"yes\"\n",
         &[(6, 12, "socket[0].no-delay", "expected a boolean, found a string \"yes\"", "no-delay = true or no-delay = false")]),
        ("decimal mode", "web",
         "[service]\nexec = [\"/bin/true\"]\n[[socket]]\nprotocol = \"unix-stream\"\npath = \"/run/web.sock\"\nmode = 660\n",
         &[(6, 8, "socket[0].mode", "mode 660 is not octal", "write 0o660 or \"0660\"")]),
        ("socket-user on a tcp socket", "web",
         "[service]\nexec = [\"/bin/true\"]\n[[socket]]\naddresses = [\"::1\"]\nports = [\"80\"]\nsocket-user = \"www-data\"\nremove-on-stop = true\n",
         &[(6, 1, "socket[0].socket-user", "socket-user applies only to unix sockets, and this socket is tcp (the default protocol)", "remove socket-user"),
           (7, 1, "socket[0].remove-on-stop", "remove-on-stop applies only to unix sockets", "remove remove-on-stop")]),
        ("bad socket owner, group and remove-on-stop", "web",
         "[service]\nexec = [\"/bin/true\"]\n[[socket]]\nprotocol = \"unix-stream\"\npath = \"/run/web.sock\"\nsocket-user = \"a b\"\nsocket-group = \"\"\nremove-on-stop = \"yes\"\n",
         &[(6, 15, "socket[0].socket-user", "\"a b\" contains ' '", "socket-user = \"www-data\" or \"33\""),
           (7, 16, "socket[0].socket-group", "is empty", "socket-group = \"www-data\""),
           (8, 18, "socket[0].remove-on-stop", "expected a boolean", "remove-on-stop = true")]),
        ("mode on a tcp socket is reported once", "web",
         "[service]\nexec = [\"/bin/true\"]\n[[socket]]\naddresses = [\"::1\"]\nports = [\"80\"]\nmode = 660\n",
         &[(6, 1, "socket[0].mode", "mode applies only to unix sockets, and this socket is tcp (the default protocol)", "remove mode")]),
        ("bad socket name", "web",
         "[service]\nexec = [\"/bin/true\"]\n[[socket]]\nname = \"a:b\"\naddresses = [\"::1\"]\nports = [\"80\"]\n",
         &[(4, 8, "socket[0].name", "contains ':'", "printable ASCII")]),
        ("two sockets with the default name", "web",
         "[service]\nexec = [\"/bin/true\"]\n[[socket]]\naddresses = [\"::1\"]\nports = [\"80\"]\n[[socket]]\naddresses = [\"::1\"]\nports = [\"81\"]\n",
         &[(6, 1, "socket[1].name", "socket name \"web\" (the default, the service name) is already used by socket[0] (line 3)", "its own name")]),
        ("unknown key in a socket", "web",
         "[service]\nexec = [\"/bin/true\"]\n[[socket]]\naddresses = [\"::1\"]\nports = [\"80\"]\nreuseport = true\n",
         &[(6, 1, "socket[0].reuseport", "unknown key `reuseport` in [[socket]] (socket[0])", "did you mean `reuse-port`?")]),
        ("several mistakes in one file", "web",
         "[service]\nexec = []\ntype = \"forking\"\n[[socket]]\naddresses = [\"300.1.1.1\"]\nports = [\"0\"]\n",
         &[(2, 8, "service.exec", "exec is empty", ""),
           (3, 8, "service.type", "unknown value \"forking\"", "write one of \"simple\", \"notify\""),
           (5, 14, "socket[0].addresses[0]", "\"300.1.1.1\" is not an IP address or prefix", ""),
           (6, 10, "socket[0].ports[0]", "port 0 is outside 1-65535", "")]),
    ];
    assert!(cases.len() >= 12);
    for (case, name, text, expected) in cases {
        let path = PathBuf::from(format!("units/{name}.toml"));
        let diags = match parse_unit(name, &path, text) {
            Ok(unit) => panic!("{case}: parsed, but should not have: {unit:?}"),
            Err(d) => d,
        };
        assert!(
            diags.iter().all(|d| d.file == path),
            "{case}: a diagnostic names another file: {diags}"
        );
        assert_eq!(
            seen(&diags, expected),
            want(expected),
            "case: {case}\n{diags}"
        );
    }
}

#[test]
fn display_names_file_line_column_key_and_hint() {
    let text = "[service]\nexec = [\"/bin/true\"]\n\n[[socket]]\nname = \"http\"\naddresses = [\"127.0.0.1\"]\nports = [\"8080\", 70000]\n";
    let err = parse_unit("web", Path::new("units/web.toml"), text).unwrap_err();
    assert_eq!(
        err.to_string(),
        "units/web.toml:7:18: socket[0].ports[1]: port 70000 is outside 1-65535\n  \
         hint: write a port between 1 and 65535, e.g. \"8080\", or a range such as \"8000-8099\""
    );
    let two = parse_unit(
        "web",
        Path::new("u/web.toml"),
        "[service]\nexec = []\nuser = 5\n",
    )
    .unwrap_err()
    .to_string();
    assert_eq!(two.split("\n\n").count(), 2, "one paragraph each: {two}");
    assert!(
        two.starts_with("u/web.toml:2:8: service.exec: exec is empty\n  hint: "),
        "{two}"
    );
    let whole_file = Diagnostic {
        file: "u/x y.toml".into(),
        line: 0,
        column: 0,
        key: String::new(),
        message: "bad name".into(),
        hint: String::new(),
    };
    assert_eq!(whole_file.to_string(), "u/x y.toml: bad name");
}

#[test]
fn columns_count_characters_not_bytes() {
    let text = "[service]\nexec = [\"/bin/é\", \"ü\", 1]\n";
    let err = parse_unit("web", Path::new("w.toml"), text).unwrap_err();
    assert_eq!((err.0[0].line, err.0[0].column), (2, 24), "{err}");
}

#[test]
fn a_directory_reports_every_mistake_of_every_file_at_once() {
    let dir = TempDir::new();
    dir.write("a.toml", "[service]\nexec = []\nrestart = \"sometimes\"\n");
    dir.write("b.toml", "[service]\nexec = [\"/bin/true\"]\n[[socket]]\naddresses = [\"10.0.0.1/8\"]\nports = [\"99999\"]\n");
    dir.write("c.toml", WEB_SERVICE);
    dir.write("bad name.toml", WEB_SERVICE);
    dir.write(".hidden.toml", "not toml at all [");
    dir.write("notes.txt", "not a unit");
    let err = load_dir(&dir.0).unwrap_err();
    let got: Vec<(String, usize, usize, String)> = err
        .iter()
        .map(|d| {
            let file = d.file.file_name().unwrap().to_string_lossy().into_owned();
            (file, d.line, d.column, d.key.clone())
        })
        .collect();
    let want: Vec<(String, usize, usize, String)> = [
        ("a.toml", 2, 8, "service.exec"),
        ("a.toml", 3, 11, "service.restart"),
        ("b.toml", 4, 14, "socket[0].addresses[0]"),
        ("b.toml", 5, 10, "socket[0].ports[0]"),
        ("bad name.toml", 0, 0, ""),
    ]
    .iter()
    .map(|(f, l, c, k)| (f.to_string(), *l, *c, k.to_string()))
    .collect();
    assert_eq!(got, want, "{err}");
    assert!(err.0.iter().all(|d| d.file.starts_with(&dir.0)));
}

#[test]
fn a_directory_of_valid_units_loads_sorted_by_name() {
    let dir = TempDir::new();
    dir.write("zeta.toml", WEB_SERVICE);
    dir.write("alpha.toml", WEB_SERVICE);
    dir.write("mid@1.toml", WEB_SERVICE);
    let units = load_dir(&dir.0).expect("valid");
    let names: Vec<&str> = units.iter().map(|u| u.name.as_str()).collect();
    assert_eq!(names, ["alpha", "mid@1", "zeta"]);
    assert_eq!(units[0].path, dir.0.join("alpha.toml"));
    let missing = load_dir(&dir.0.join("nope")).unwrap_err();
    assert!(
        missing.0[0]
            .message
            .contains("cannot read the units directory"),
        "{missing}"
    );
}

fn defaults(exec: &[&str]) -> ServiceConfig {
    ServiceConfig::with_defaults(exec.iter().map(|s| s.to_string()).collect())
}

fn v4(a: u8, b: u8, c: u8, d: u8, len: u8) -> IpPrefix {
    IpPrefix {
        addr: IpAddr::V4(Ipv4Addr::new(a, b, c, d)),
        len,
    }
}

#[test]
fn a_minimal_unit_gets_the_defaults() {
    let text = "[service]\nexec = [\"hello-http\"]\n\n[[socket]]\naddresses = [\"127.0.0.1\"]\nports = [8080]\n";
    let unit = parse_unit("hello", Path::new("units/hello.toml"), text).expect("valid");
    let expected = Unit {
        name: "hello".into(),
        path: "units/hello.toml".into(),
        service: defaults(&["hello-http"]),
        sockets: vec![SocketConfig {
            name: "hello".into(),
            protocol: Protocol::Tcp,
            addresses: vec![v4(127, 0, 0, 1, 32)],
            ports: vec![PortRange {
                first: 8080,
                last: 8080,
            }],
            path: None,
            options: SocketOptions::default(),
        }],
    };
    assert_eq!(unit, expected);
    assert_eq!(
        unit.sockets[0].single_bind(),
        Some((IpAddr::V4(Ipv4Addr::LOCALHOST), 8080))
    );
    // The documented defaults, written out: `defaults` is the parser's own
    // `ServiceConfig::with_defaults`, so the comparison above cannot see them change.
    let s = &unit.service;
    assert_eq!(
        (s.kind, s.restart, s.restart_mode, s.start_limit_burst),
        (
            ServiceType::Simple,
            RestartPolicy::OnFailure,
            RestartMode::StopStart,
            5
        )
    );
    let secs = Duration::from_secs;
    assert_eq!(
        [
            s.restart_delay,
            s.restart_delay_max,
            s.stop_timeout,
            s.start_timeout,
            s.start_limit_interval
        ],
        [
            Duration::from_millis(100),
            secs(30),
            secs(10),
            secs(30),
            secs(10)
        ]
    );
    assert_eq!(
        (s.watchdog, s.fd_store_max, s.single_instance, s.on_demand),
        (None, 0, false, false)
    );
    assert!(s.environment.is_empty());
    assert_eq!(
        (&s.working_directory, &s.user, &s.group),
        (&None, &None, &None)
    );
    assert_eq!(
        s.process,
        crate::unit::ProcessConfig::defaults_for(ServiceType::Simple)
    );
    assert_eq!(s.commands, Default::default());
}

#[test]
fn a_full_unit_parses_to_the_model() {
    let text = r#"
[service]
exec = ["/usr/bin/hello-http", "--greeting", "hi"]
type = "notify"
restart = "always"
restart-mode = "overlap"
restart-delay = "250ms"
stop-timeout = "3s"
start-timeout = "1m"
start-limit-burst = 3
start-limit-interval = "1m 30s"
watchdog = "20s"
fd-store-max = 8
environment = { RUST_LOG = "info", _X1 = "" }
working-directory = "/srv/hello"
user = "www-data"
group = "33"

[[socket]]
name = "http"
addresses = ["127.0.0.0/24", "2001:db8::/64"]
ports = ["8000-8099", "8443"]
backlog = 511
reuse-port = true
free-bind = true
transparent = true
receive-buffer = 65536
send-buffer = 65536
mark = 7
keep-alive = true
no-delay = true
ipv6-only = false

[[socket]]
name = "admin"
protocol = "unix-stream"
path = "/run/hello/admin.sock"
mode = 0o660

[[socket]]
name = "log"
protocol = "unix-dgram"
path = "/run/hello/log.sock"
mode = "0600"
"#;
    let unit = parse_unit("hello", Path::new("hello.toml"), text).expect("valid");
    let mut service = defaults(&["/usr/bin/hello-http", "--greeting", "hi"]);
    service.kind = ServiceType::Notify;
    service.process.notify_access = NotifyAccess::Main; // systemd's default for notify
    service.restart = RestartPolicy::Always;
    service.restart_mode = RestartMode::Overlap;
    service.restart_delay = Duration::from_millis(250);
    service.stop_timeout = Duration::from_secs(3);
    service.start_timeout = Duration::from_secs(60);
    service.start_limit_burst = 3;
    service.start_limit_interval = Duration::from_secs(90);
    service.watchdog = Some(Duration::from_secs(20));
    service.fd_store_max = 8;
    service.environment = [("RUST_LOG", "info"), ("_X1", "")]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    service.working_directory = Some("/srv/hello".into());
    service.user = Some("www-data".into());
    service.group = Some("33".into());
    let unix = |name: &str, protocol, path: &str, mode| SocketConfig {
        name: name.into(),
        protocol,
        addresses: vec![],
        ports: vec![],
        path: Some(PathBuf::from(path)),
        options: SocketOptions {
            mode: Some(mode),
            ..SocketOptions::default()
        },
    };
    let expected = Unit {
        name: "hello".into(),
        path: "hello.toml".into(),
        service,
        sockets: vec![
            SocketConfig {
                name: "http".into(),
                protocol: Protocol::Tcp,
                addresses: vec![
                    v4(127, 0, 0, 0, 24),
                    IpPrefix {
                        addr: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0)),
                        len: 64,
                    },
                ],
                ports: vec![
                    PortRange {
                        first: 8000,
                        last: 8099,
                    },
                    PortRange {
                        first: 8443,
                        last: 8443,
                    },
                ],
                path: None,
                options: SocketOptions {
                    backlog: Some(511),
                    reuse_port: true,
                    free_bind: true,
                    transparent: true,
                    receive_buffer: Some(65536),
                    send_buffer: Some(65536),
                    mark: Some(7),
                    keep_alive: true,
                    no_delay: true,
                    ipv6_only: Some(false),
                    mode: None,
                    ..SocketOptions::default()
                },
            },
            unix(
                "admin",
                Protocol::UnixStream,
                "/run/hello/admin.sock",
                0o660,
            ),
            unix("log", Protocol::UnixDgram, "/run/hello/log.sock", 0o600),
        ],
    };
    assert_eq!(unit, expected);
}

#[test]
fn small_details_of_the_schema() {
    let parse = |text: &str| parse_unit("svc", Path::new("svc.toml"), text);
    // A restart delay above the default cap raises the cap instead of failing.
    let u = parse("[service]\nexec = [\"x\"]\nrestart-delay = \"1m\"\n").unwrap();
    assert_eq!(u.service.restart_delay_max, Duration::from_secs(60));
    // watchdog = "0" is off.
    let u = parse("[service]\nexec = [\"x\"]\nwatchdog = \"0\"\n").unwrap();
    assert_eq!(u.service.watchdog, None);
    // Dotted keys, inline sockets and [service.environment] all work.
    let u = parse(
        "service.exec = [\"x\"]\nservice.environment.A = \"1\"\nsocket = [{ addresses = [\"::\"], ports = [1] }]\n",
    )
    .unwrap();
    assert_eq!(u.service.environment["A"], "1");
    assert_eq!(u.sockets[0].addresses[0].len, 128);
    // A socket-less unit is fine (a plain supervised service).
    assert!(parse(WEB_SERVICE).unwrap().sockets.is_empty());
}

fn unit_with(name: &str, sockets: &str) -> String {
    format!("[service]\nexec = [\"/bin/{name}\"]\n\n{sockets}")
}

fn load(files: &[(&str, &str)]) -> (TempDir, Result<Vec<Unit>, Diagnostics>) {
    let dir = TempDir::new();
    for (name, sockets) in files {
        dir.write(&format!("{name}.toml"), &unit_with(name, sockets));
    }
    let result = load_dir(&dir.0);
    (dir, result)
}

#[test]
fn equally_specific_overlaps_across_units_name_both_files() {
    let (dir, result) = load(&[
        ("a", "[[socket]]\naddresses = [\"192.0.2.0/24\"]\nports = [\"8000-8009\"]\n"),
        ("b", "[[socket]]\nname = \"web\"\naddresses = [\"10.0.0.1\", \"192.0.2.0/24\"]\nports = [\"8005-8014\"]\n"),
    ]);
    let err = result.unwrap_err();
    assert_eq!(err.len(), 1, "{err}");
    let d = &err.0[0];
    let a = dir.0.join("a.toml");
    assert_eq!(
        (d.file.clone(), d.line, d.column, d.key.as_str()),
        (dir.0.join("b.toml"), 6, 26, "socket[0].addresses[1]")
    );
    assert!(
        d.message.starts_with(&format!(
            "tcp 192.0.2.0/24 ports 8005-8014 of socket \"web\" is also claimed, equally specifically, by {}:5:14 (socket[0].addresses[0] with ports 8000-8009 of socket \"a\")",
            a.display()
        )),
        "{err}"
    );
    assert!(
        d.hint.contains("longer prefix or a narrower port range"),
        "{err}"
    );
}

#[test]
fn overlaps_that_lookup_can_resolve_are_fine() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "a /25 inside a /24",
            "addresses = [\"192.0.2.0/24\"]\nports = [\"80\"]",
            "addresses = [\"192.0.2.128/25\"]\nports = [\"80\"]",
        ),
        (
            "a narrower range inside a wider one",
            "addresses = [\"192.0.2.0/24\"]\nports = [\"8000-8099\"]",
            "addresses = [\"192.0.2.0/24\"]\nports = [\"8042\"]",
        ),
        (
            "tcp and udp on the same binding",
            "addresses = [\"::1\"]\nports = [\"53\"]",
            "protocol = \"udp\"\naddresses = [\"::1\"]\nports = [\"53\"]",
        ),
        (
            "equal widths that do not overlap",
            "addresses = [\"0.0.0.0/0\"]\nports = [\"8000-8009\"]",
            "addresses = [\"0.0.0.0/0\"]\nports = [\"8010-8019\"]",
        ),
        (
            "IPv4 /0 and IPv6 /0",
            "addresses = [\"0.0.0.0/0\"]\nports = [\"1-65535\"]",
            "addresses = [\"::/0\"]\nports = [\"1-65535\"]",
        ),
    ];
    for (case, a, b) in cases {
        let (_dir, result) = load(&[
            ("a", &format!("[[socket]]\n{a}\n")),
            ("b", &format!("[[socket]]\n{b}\n")),
        ]);
        if let Err(e) = result {
            panic!("{case}: {e}");
        }
    }
}

#[test]
fn overlaps_within_one_unit_and_shared_unix_paths_are_caught() {
    let (dir, result) = load(&[
        (
            "a",
            "[[socket]]\nname = \"one\"\naddresses = [\"::1\"]\nports = [\"80\"]\n\n[[socket]]\nname = \"two\"\naddresses = [\"::1\"]\nports = [80]\n\n[[socket]]\nname = \"ctl\"\nprotocol = \"unix-stream\"\npath = \"/run/x.sock\"\n",
        ),
        ("b", "[[socket]]\nprotocol = \"unix-dgram\"\npath = \"/run//x.sock\"\n"),
    ]);
    let err = result.unwrap_err();
    let got: Vec<(PathBuf, usize, usize, String)> = err
        .iter()
        .map(|d| (d.file.clone(), d.line, d.column, d.key.clone()))
        .collect();
    let a = dir.0.join("a.toml");
    let b = dir.0.join("b.toml");
    assert_eq!(
        got,
        vec![
            (a.clone(), 11, 14, "socket[1].addresses[0]".to_string()),
            (b.clone(), 6, 8, "socket[0].path".to_string()),
        ],
        "{err}"
    );
    assert!(
        err.0[0].message.contains(&format!("{}:6:14", a.display())),
        "{err}"
    );
    assert!(
        err.0[1].message.contains(&format!(
            "also used by {}:17:8 (socket[2].path)",
            a.display()
        )),
        "{err}"
    );
}

#[test]
fn validate_set_works_on_units_from_anywhere() {
    let (dir, result) = load(&[
        ("a", "[[socket]]\naddresses = [\"::1\"]\nports = [\"80\"]\n"),
        ("b", "[[socket]]\naddresses = [\"::2\"]\nports = [\"80\"]\n"),
    ]);
    let mut units = result.expect("valid");
    validate_set(&units).expect("still valid");
    // Made to clash in memory: found, placed by reading the files, then
    // without places once a unit no longer matches its file.
    units[1].sockets[0].addresses = units[0].sockets[0].addresses.clone();
    let err = validate_set(&units).unwrap_err();
    assert_eq!(err.len(), 1, "{err}");
    assert_eq!(
        (err.0[0].file.clone(), err.0[0].line),
        (dir.0.join("b.toml"), 0)
    );
    assert!(
        err.0[0]
            .message
            .contains(&format!("{}:5:14", dir.0.join("a.toml").display())),
        "{err}"
    );
    units[1].name = "a".into();
    let err = validate_set(&units).unwrap_err();
    assert!(
        err.iter()
            .any(|d| d.message.contains("service name \"a\" is also the name of")),
        "{err}"
    );
}

// ---- round trip: parse → to_toml → parse ----

fn round_trip(unit: &Unit) {
    let text = to_toml(unit);
    match parse_unit(&unit.name, &unit.path, &text) {
        Ok(again) => assert_eq!(&again, unit, "through:\n{text}"),
        Err(e) => panic!("to_toml wrote a unit that does not parse:\n{text}\n{e}"),
    }
}

const VALID: &[&str] = &[
    "[service]\nexec = [\"x\"]\n",
    "[service]\nexec = [\"/bin/sh\", \"-c\", \"echo \\\"hi\\\" 'there' \\\\ \\u00e9\"]\ntype = \"notify\"\nwatchdog = \"1h 2m 3s 4ms 5us 6ns\"\nrestart-delay = \"0s\"\n",
    "[service]\nexec = [\"a\"]\nrestart = \"never\"\nenvironment = { A = \"=\", B_2 = \"line\\nbreak\", _ = \"\\t\" }\nuser = \"0\"\ngroup = \"wheel\"\nworking-directory = \"/\"\n",
    "[service]\nexec = [\"a\"]\n[[socket]]\nname = \"dns\"\nprotocol = \"udp\"\naddresses = [\"0.0.0.0/0\", \"::/0\", \"fe80::/10\"]\nports = [53, \"5300-5399\", \"1-65535\"]\nmark = 0\nipv6-only = true\nreceive-buffer = 1\nsend-buffer = 2147483647\n",
    "[service]\nexec = [\"a\"]\n[[socket]]\nname = \"with space ~!\"\nprotocol = \"unix-stream\"\npath = \"/run/a b.sock\"\nbacklog = 1\nmode = 0\n[[socket]]\nname = \"\\\"q\\\"\"\nprotocol = \"unix-dgram\"\npath = \"/tmp/x\"\nmode = \"7777\"\n",
    "[service]\nexec = [\"a\"]\nfd-store-max = 65536\nstart-limit-burst = 4294967295\nrestart-delay = \"1year\"\nrestart-delay-max = \"1year\"\n[[socket]]\naddresses = [\"255.255.255.255\", \"::/95\", \"64:ff9b::/96\", \"::1.2.3.4\"]\nports = [\"65535\"]\nreuse-port = true\n",
];

#[test]
fn varied_valid_units_survive_a_round_trip() {
    for (i, text) in VALID.iter().enumerate() {
        let unit = parse_unit("svc", Path::new("svc.toml"), text)
            .unwrap_or_else(|e| panic!("VALID[{i}] does not parse: {e}"));
        round_trip(&unit);
    }
}

use crate::fuzz::Rng;

/// Generated values for units; the generator itself is the fuzz harness's.
impl Rng {
    fn duration(&mut self) -> Duration {
        Duration::new(
            self.below(100_000),
            self.pick(&[0, 1, 1_000, 1_000_000, 999_999_999]).to_owned(),
        )
    }
    fn text(&mut self, alphabet: &str, max: u64) -> String {
        let chars: Vec<char> = alphabet.chars().collect();
        (0..self.below(max + 1))
            .map(|_| *self.pick(&chars))
            .collect()
    }
}

fn random_unit(rng: &mut Rng) -> Unit {
    let any = "aZ09 _-./:=\"'\\\n\té€#[]{}";
    let mut s = defaults(&[]);
    s.exec = (0..1 + rng.below(4)).map(|_| rng.text(any, 8)).collect();
    if s.exec[0].is_empty() {
        s.exec[0] = "x".into();
    }
    s.kind = *rng.pick(&[ServiceType::Simple, ServiceType::Notify]);
    s.restart = *rng.pick(&[
        RestartPolicy::Always,
        RestartPolicy::OnFailure,
        RestartPolicy::Never,
    ]);
    s.restart_mode = *rng.pick(&[RestartMode::StopStart, RestartMode::Overlap]);
    s.overlap_grace = if rng.chance() {
        Duration::ZERO
    } else {
        rng.duration()
    };
    s.restart_delay = rng.duration();
    s.restart_delay_max = s.restart_delay + rng.duration();
    s.stop_timeout = rng.duration() + Duration::from_nanos(1);
    s.start_timeout = rng.duration() + Duration::from_nanos(1);
    s.start_limit_burst = 1 + rng.below(1000) as u32;
    s.start_limit_interval = rng.duration() + Duration::from_secs(1);
    s.watchdog = rng
        .chance()
        .then(|| rng.duration() + Duration::from_millis(1));
    s.fd_store_max = rng.below(100) as u32;
    for _ in 0..rng.below(4) {
        let name = format!("{}{}", rng.pick(&["A", "_", "z"]), rng.text("A_9b", 5));
        s.environment.insert(name, rng.text(any, 10));
    }
    s.working_directory = rng
        .chance()
        .then(|| PathBuf::from(format!("/{}", rng.text("ab/ é", 10))));
    s.user = rng
        .chance()
        .then(|| rng.pick(&["root", "0", "www-data", "nobody"]).to_string());
    s.group = rng
        .chance()
        .then(|| rng.pick(&["root", "65534", "adm"]).to_string());
    let mut sockets = Vec::new();
    for i in 0..rng.below(4) {
        let protocol = *rng.pick(&[
            Protocol::Tcp,
            Protocol::Udp,
            Protocol::UnixStream,
            Protocol::UnixDgram,
        ]);
        let mut sock = SocketConfig {
            name: format!("s{i}{}", rng.text("a Z~!=", 4)),
            protocol,
            addresses: vec![],
            ports: vec![],
            path: None,
            options: SocketOptions::default(),
        };
        let o = &mut sock.options;
        o.receive_buffer = rng.chance().then(|| 1 + rng.below(1 << 20) as u32);
        o.send_buffer = rng.chance().then(|| 1 + rng.below(1 << 20) as u32);
        o.mark = rng.chance().then(|| rng.next() as u32);
        if protocol.is_ip() {
            for _ in 0..1 + rng.below(3) {
                let bits = rng.next() as u128 | ((rng.next() as u128) << 64);
                let p = if rng.chance() {
                    let len = rng.below(33) as u8;
                    parse::masked(IpAddr::V4(Ipv4Addr::from(bits as u32)), len)
                } else {
                    // Not in ::ffff:0:0/96, where the IPv4 form is required.
                    let len = rng.below(96) as u8;
                    parse::masked(IpAddr::V6(Ipv6Addr::from(bits)), len)
                };
                if !sock.addresses.contains(&p) {
                    sock.addresses.push(p);
                }
            }
            for _ in 0..1 + rng.below(3) {
                let first = 1 + rng.below(65535) as u16;
                let last = first + rng.below(u64::from(65535 - first) + 1) as u16;
                let r = PortRange { first, last };
                if !sock.ports.contains(&r) {
                    sock.ports.push(r);
                }
            }
            let o = &mut sock.options;
            o.reuse_port = rng.chance();
            o.free_bind = rng.chance();
            o.transparent = rng.chance();
            o.ipv6_only = *rng.pick(&[None, Some(true), Some(false)]);
        } else {
            sock.path = Some(PathBuf::from(format!("/run/{}", rng.text("ab. é", 20))));
            sock.options.mode = rng.chance().then(|| rng.below(0o10000) as u32);
            sock.options.socket_user = rng
                .chance()
                .then(|| rng.pick(&["root", "0", "www-data"]).to_string());
            sock.options.socket_group = rng
                .chance()
                .then(|| rng.pick(&["adm", "65534"]).to_string());
            sock.options.remove_on_stop = rng.chance();
        }
        if protocol == Protocol::Tcp {
            sock.options.keep_alive = rng.chance();
            sock.options.no_delay = rng.chance();
        }
        if matches!(protocol, Protocol::Tcp | Protocol::UnixStream) {
            sock.options.backlog = rng.chance().then(|| 1 + rng.below(4096) as u32);
        }
        sockets.push(sock);
    }
    process_keys::randomize(&mut s, rng, !sockets.is_empty());
    commands::randomize(&mut s, rng);
    Unit {
        name: "gen".into(),
        path: "gen.toml".into(),
        service: s,
        sockets,
    }
}

#[test]
fn generated_units_survive_a_round_trip() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for _ in 0..300 {
        round_trip(&random_unit(&mut rng));
    }
}

#[test]
fn mutated_files_never_panic_and_what_parses_round_trips() {
    let mut rng = Rng(42);
    let alphabet: Vec<char> = "\"'[]{}=,.-_/:0123456789abcdefxyz \n#\\é".chars().collect();
    let mut parsed = 0;
    for i in 0..1500 {
        let mut chars: Vec<char> = VALID[i % VALID.len()].chars().collect();
        for _ in 0..1 + rng.below(3) {
            let at = rng.below(chars.len() as u64 + 1) as usize;
            match rng.below(3) {
                0 if at < chars.len() => {
                    chars.remove(at);
                }
                1 if at < chars.len() => chars[at] = *rng.pick(&alphabet),
                _ => chars.insert(at, *rng.pick(&alphabet)),
            }
        }
        let text: String = chars.into_iter().collect();
        match parse_unit("svc", Path::new("svc.toml"), &text) {
            Ok(unit) => {
                parsed += 1;
                round_trip(&unit);
            }
            Err(e) => {
                assert!(!e.is_empty());
                for d in &e {
                    assert!(!d.message.is_empty(), "empty message for:\n{text}");
                    assert!(
                        d.line <= text.lines().count() + 1,
                        "{d} beyond the end of:\n{text}"
                    );
                }
            }
        }
    }
    assert!(
        parsed > 100,
        "only {parsed} mutants parsed: the mutations are too harsh to test the round trip"
    );
}
