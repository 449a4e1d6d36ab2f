//! hello-http as a real process: under `systemd-socket-activate`, with sockets handed over the
//! way holdfast hands them, restarted under load, and on its own with `--listen`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use holdfast_testkit::{
    free_port, loopback4 as v4, loopback6 as v6, wait_for, Activated, HandedFds,
};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const BIN: &str = env!("CARGO_BIN_EXE_hello-http");
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// One HTTP/1.1 response, as far as these tests care.
#[derive(Debug)]
struct Reply {
    status: u16,
    body: String,
    /// The server said `Connection: close`.
    close: bool,
}

fn connect(addr: SocketAddr) -> std::io::Result<BufReader<TcpStream>> {
    let stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(BufReader::new(stream))
}

/// Send `GET /` on `conn` and read the whole response (Content-Length framed, as hyper sends it).
fn get(conn: &mut BufReader<TcpStream>, close: bool) -> std::io::Result<Reply> {
    let connection = if close { "close" } else { "keep-alive" };
    write!(
        conn.get_mut(),
        "GET / HTTP/1.1\r\nHost: test\r\nConnection: {connection}\r\n\r\n"
    )?;
    let eof = || std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "eof before a response");
    let mut line = String::new();
    if conn.read_line(&mut line)? == 0 {
        return Err(eof());
    }
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let (mut length, mut close) = (0usize, false);
    loop {
        line.clear();
        if conn.read_line(&mut line)? == 0 {
            return Err(eof());
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        let (name, value) = header.split_once(':').unwrap_or((header, ""));
        match name.to_ascii_lowercase().as_str() {
            "content-length" => length = value.trim().parse().unwrap_or(0),
            "connection" => close |= value.trim().eq_ignore_ascii_case("close"),
            _ => {}
        }
    }
    let mut body = vec![0; length];
    conn.read_exact(&mut body)?;
    let body = String::from_utf8(body).map_err(std::io::Error::other)?;
    Ok(Reply {
        status,
        body,
        close,
    })
}

fn get_once(addr: SocketAddr) -> Reply {
    get(&mut connect(addr).expect("connect"), true).expect("GET /")
}

fn wait_exit(child: &mut Child, timeout: Duration) -> anyhow::Result<ExitStatus> {
    wait_for("the exit", timeout, || child.try_wait().expect("waitpid"))
}

fn sigterm(child: &Child) {
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("kill SIGTERM");
}

#[test]
fn answers_with_fdname_and_pid_under_systemd_socket_activate() {
    let service = Activated::start(2, |p| {
        vec![
            format!("--listen=127.0.0.1:{}", p[0]),
            format!("--listen=[::1]:{}", p[1]),
            "--fdname=web:web6".into(),
            "--".into(),
            BIN.into(),
        ]
    })
    .unwrap();
    let (addr4, addr6) = (v4(service.ports[0]), v6(service.ports[1]));
    let expected = format!("hello from web pid {}\n", service.pid());

    // A new connection per request, on both families.
    for addr in [addr4, addr4, addr4, addr6, addr6] {
        let reply = get_once(addr);
        assert_eq!(
            (reply.status, reply.body.as_str()),
            (200, expected.as_str()),
            "{}",
            service.log()
        );
    }
    // Keep-alive: ten requests on one connection, none closed by the server.
    let mut conn = connect(addr4).unwrap();
    for _ in 0..10 {
        let reply = get(&mut conn, false).expect("keep-alive GET");
        assert_eq!(
            (reply.status, reply.body.as_str(), reply.close),
            (200, expected.as_str(), false)
        );
    }
    // Concurrent clients, keep-alive and not, each holding its connection open meanwhile.
    let threads: Vec<_> = (0..16)
        .map(|i| {
            let addr = if i % 2 == 0 { addr4 } else { addr6 };
            std::thread::spawn(move || {
                let mut conn = connect(addr).unwrap();
                (0..10)
                    .map(|_| {
                        if i % 4 < 2 {
                            get(&mut conn, false).map(|r| r.body)
                        } else {
                            get(&mut connect(addr)?, true).map(|r| r.body)
                        }
                    })
                    .collect::<std::io::Result<Vec<String>>>()
            })
        })
        .collect();
    for thread in threads {
        let bodies = thread.join().unwrap().expect("concurrent GETs");
        assert!(bodies.iter().all(|b| *b == expected), "{bodies:?}");
    }
}

#[test]
fn name_and_greeting_flags_override_the_fdname() {
    let service = Activated::start(1, |p| {
        let listen = format!("--listen=127.0.0.1:{}", p[0]);
        let args = [
            "--fdname=web",
            "--",
            BIN,
            "--name",
            "api",
            "--greeting",
            "hi",
        ];
        std::iter::once(listen)
            .chain(args.map(String::from))
            .collect()
    })
    .unwrap();
    let reply = get_once(v4(service.ports[0]));
    assert_eq!(reply.body, format!("hi from api pid {}\n", service.pid()));
}

#[test]
fn sigterm_answers_the_request_on_its_way_then_exits_zero() {
    let mut service = Activated::start(1, |p| {
        let args = ["--", BIN];
        std::iter::once(format!("--listen=127.0.0.1:{}", p[0]))
            .chain(args.map(String::from))
            .collect()
    })
    .unwrap();
    let addr = v4(service.ports[0]);
    let mut conn = connect(addr).unwrap();
    let first = get(&mut conn, false).expect("first GET");
    assert!(!first.close, "no Connection: close before SIGTERM");
    // No LISTEN_FDNAMES from systemd-socket-activate without --fdname: the default name.
    assert_eq!(
        first.body,
        format!("hello from hello-http pid {}\n", service.pid())
    );

    let signalled = Instant::now();
    sigterm(&service.child);
    std::thread::sleep(Duration::from_millis(100));
    // The keep-alive connection is still served, and told to close.
    let second = get(&mut conn, false).expect("GET after SIGTERM on a kept-alive connection");
    assert_eq!(
        (second.status, second.close),
        (200, true),
        "{}",
        service.log()
    );
    let mut rest = Vec::new();
    assert_eq!(
        conn.read_to_end(&mut rest).expect("read to EOF"),
        0,
        "closed after the reply"
    );

    let status =
        wait_exit(&mut service.child, Duration::from_secs(8)).expect("exits after draining");
    assert!(
        status.success(),
        "exit status {status:?}\n{}",
        service.log()
    );
    assert!(
        signalled.elapsed() < Duration::from_secs(4),
        "drain waited for nothing: {:?}",
        signalled.elapsed()
    );
}

#[test]
fn listen_flag_binds_without_a_manager() {
    for _attempt in 0..5 {
        let port = free_port().unwrap();
        let mut child = Command::new(BIN)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env_remove("LISTEN_FDS")
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let reply = wait_for("an answer", Duration::from_secs(10), || {
            if child.try_wait().unwrap().is_some() {
                return Some(None); // the port was taken meanwhile: try another
            }
            connect(v4(port)).ok().map(|mut c| get(&mut c, true).ok())
        });
        let _ = child.kill();
        let _ = child.wait();
        if let Ok(Some(reply)) = reply {
            assert_eq!(
                reply.body,
                format!("hello from hello-http pid {}\n", child.id())
            );
            return;
        }
    }
    panic!("hello-http --listen never answered on a free port");
}

#[test]
fn listen_fds_for_another_pid_are_ignored() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    // LISTEN_PID names a process that is not hello-http.
    let mut handed = HandedFds::for_another_pid(BIN, &[listener.as_fd()], &["web"], 1).unwrap();
    handed.command().stderr(Stdio::piped());
    let child = handed.spawn().unwrap();
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("LISTEN_PID is not this process"),
        "{stderr}"
    );
}

/// What the load threads saw.
#[derive(Default)]
struct Load {
    requests: AtomicU64,
    errors: Mutex<Vec<String>>,
    pids: Mutex<std::collections::BTreeSet<String>>,
}

/// One client thread: GET in a loop until `stop`, keep-alive or a new connection per request,
/// recording every error (connect refused, reset, EOF, timeout, non-200).
fn load_client(addr: SocketAddr, keep_alive: bool, stop: Arc<AtomicBool>, load: Arc<Load>) {
    let mut conn = None;
    while !stop.load(Ordering::Relaxed) {
        let c = match conn.take() {
            Some(c) => c,
            None => match connect(addr) {
                Ok(c) => c,
                Err(e) => {
                    load.errors.lock().unwrap().push(format!("connect: {e}"));
                    continue;
                }
            },
        };
        let mut c = c;
        match get(&mut c, !keep_alive) {
            Ok(r) if r.status == 200 => {
                load.requests.fetch_add(1, Ordering::Relaxed);
                let pid = r
                    .body
                    .rsplit(' ')
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_owned();
                load.pids.lock().unwrap().insert(pid);
                if keep_alive && !r.close {
                    conn = Some(c);
                }
            }
            Ok(r) => load
                .errors
                .lock()
                .unwrap()
                .push(format!("status {}", r.status)),
            Err(e) => load.errors.lock().unwrap().push(format!(
                "request ({}): {e}",
                if keep_alive { "keep-alive" } else { "close" }
            )),
        }
    }
}

/// The supervisor's side of the protocol, as holdfast plays it: the test owns the listener and
/// the NOTIFY_SOCKET, starts instances with the listener as fd 3, waits for READY=1, and
/// restarts them while clients hammer the socket. Overlap restarts (new instance ready, then
/// SIGTERM the old) and stop-start restarts (SIGTERM, exit, start) must both cost no request.
#[test]
fn restarts_under_load_lose_no_request() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let notify_env = notify_path.to_str().unwrap().to_owned();

    let start = || {
        let mut handed = HandedFds::new(BIN, &[listener.as_fd()], &["web"]).unwrap();
        handed
            .command()
            .env("NOTIFY_SOCKET", &notify_env)
            .stderr(Stdio::null());
        let child = handed.spawn().unwrap();
        let ready = wait_for("READY=1", Duration::from_secs(15), || {
            let mut buf = [0u8; 4096];
            let n = notify.recv(&mut buf).ok()?;
            String::from_utf8_lossy(&buf[..n])
                .lines()
                .any(|l| l == "READY=1")
                .then_some(())
        });
        assert!(
            ready.is_ok(),
            "no READY=1 on NOTIFY_SOCKET from pid {}",
            child.id()
        );
        child
    };
    let stop = |mut child: Child| {
        sigterm(&child);
        let status =
            wait_exit(&mut child, Duration::from_secs(8)).expect("exits within the drain timeout");
        assert!(status.success(), "instance exited with {status:?}");
    };

    let mut current = start();
    let done = Arc::new(AtomicBool::new(false));
    let load = Arc::new(Load::default());
    let clients: Vec<_> = (0..12)
        .map(|i| {
            let (done, load) = (done.clone(), load.clone());
            std::thread::spawn(move || load_client(addr, i % 2 == 0, done, load))
        })
        .collect();

    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..4 {
        let next = start(); // overlap: both instances accept from the one queue meanwhile
        stop(std::mem::replace(&mut current, next));
        std::thread::sleep(Duration::from_millis(150));
    }
    for _ in 0..4 {
        stop(current); // stop-start: connections wait in the backlog meanwhile
        current = start();
        std::thread::sleep(Duration::from_millis(150));
    }
    done.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    stop(current);

    let errors = load.errors.lock().unwrap();
    let requests = load.requests.load(Ordering::Relaxed);
    let pids = load.pids.lock().unwrap().len();
    eprintln!(
        "{requests} requests answered by {pids} instances, {} errors",
        errors.len()
    );
    assert!(
        errors.is_empty(),
        "{} errors, first: {:?}",
        errors.len(),
        &errors[..errors.len().min(10)]
    );
    assert!(
        requests > 200,
        "only {requests} requests: the load never ran"
    );
    assert!(pids >= 5, "answers came from only {pids} instances");
}
