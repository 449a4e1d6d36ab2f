"""A real sd_notify sender for the holdfast tests (Python 3 standard library only):
it writes to NOTIFY_SOCKET itself (AF_UNIX/SOCK_DGRAM, sendmsg with SCM_RIGHTS for
FDSTORE=1), as gunicorn and other Python services do, and does what the test asks.

Usage: notifier.py OUT TAG [--ready] [--status TEXT] [--ping] [--extend USEC]
                   [--ready-after SECONDS] [--later never-ready|exit] [--stopping]

At start:
  1. appends its pid to OUT/TAG.starts (one line per start);
  2. with --extend, sends EXTEND_TIMEOUT_USEC=USEC;
  3. writes OUT/TAG.json (atomically): pid, pgid, env, and "fds": one entry per fd
     3 .. 3+LISTEN_FDS-1 with its LISTEN_FDNAMES name, "kind" (socket, memfd, pipe,
     other) and, for anything but a socket, "data": what it reads from it (a memfd
     from offset 0, a pipe until EOF or until it would block);
  4. with --later, when OUT/TAG.starts had a line already (not the first start):
     never-ready sends nothing more, exit exits 1 at once;
  5. with --ready (after --ready-after seconds), sends READY=1 (and STATUS=TEXT);
  6. with --ping, a thread sends WATCHDOG=1 every WATCHDOG_USEC/5 until `stop-ping`.
Then it serves its first LISTEN_FDS socket (TCP): each connection sends one command
line and gets one reply line:
  pid                       -> "TAG PID"
  notify TEXT               -> sends TEXT ("\\n" in it becomes a newline) -> "ok PID"
  then-notify TEXT          -> "ok PID", and once the connection is closed, sends TEXT
                               (for a message that ends the process, WATCHDOG=trigger)
  store NAME DATA memfd|pipe -> an fd holding DATA, sent with FDSTORE=1 FDNAME=NAME
  fork                      -> a child in this process group that sleeps -> "ok CHILD"
  end-child CHILD           -> SIGKILL to that child, reaped here (not by holdfast)
                               -> "ok CHILD"
  setsid-send TEXT          -> a child in a new session sends TEXT, says "ok CHILD",
                               and lives on for 20 s
  stop-ping                 -> the watchdog thread stops
  term-plan USEC SECONDS    -> on SIGTERM: send EXTEND_TIMEOUT_USEC=USEC, sleep
                               SECONDS, write OUT/TAG.term-done, exit 0
  exit CODE                 -> replies, then exits with CODE
SIGTERM (polled between connections: one accepted is always answered) makes it
exit 0; with --stopping it first sends STOPPING=1 and STATUS=draining, as
hello-http does, and lives 0.3 s more. With --later never-ready it serves nothing (connections stay queued for the
other instance).
"""

import array
import json
import os
import select
import signal
import socket
import sys
import threading
import time

PID = os.getpid()
OUT, TAG = sys.argv[1], sys.argv[2]
ARGS = sys.argv[3:]


def flag(name):
    return name in ARGS


def option(name, default=None):
    if name in ARGS:
        return ARGS[ARGS.index(name) + 1]
    return default


def out(suffix):
    return os.path.join(OUT, TAG + suffix)


def send(text, fds=()):
    """One datagram to NOTIFY_SOCKET, fds as SCM_RIGHTS, like sd_pid_notify_with_fds."""
    addr = os.environ["NOTIFY_SOCKET"]
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        anc = []
        if fds:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        s.sendmsg([text.encode()], anc, 0, addr)
    finally:
        s.close()


def describe(fd, name):
    entry = {"fd": fd, "name": name}
    try:
        s = socket.socket(fileno=fd)
        s.detach()
        entry["kind"] = "socket"
        return entry
    except OSError:
        pass
    link = os.readlink("/proc/self/fd/%d" % fd)
    if link.startswith("/memfd:"):
        entry["kind"] = "memfd"
        os.lseek(fd, 0, os.SEEK_SET)
        entry["data"] = os.read(fd, 65536).decode()
    elif link.startswith("pipe:"):
        entry["kind"] = "pipe"
        os.set_blocking(fd, False)
        chunks = []
        while True:
            try:
                b = os.read(fd, 65536)
            except BlockingIOError:
                break
            if not b:
                break
            chunks.append(b)
        entry["data"] = b"".join(chunks).decode()
    else:
        entry["kind"] = "other"
        entry["link"] = link
    return entry


def report():
    count = int(os.environ.get("LISTEN_FDS", "0") or "0")
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    fds = [describe(3 + i, names[i] if i < len(names) else None) for i in range(count)]
    data = {"pid": PID, "pgid": os.getpgid(0), "env": dict(os.environ), "fds": fds}
    with open(out(".json.tmp"), "w") as f:
        json.dump(data, f)
    os.rename(out(".json.tmp"), out(".json"))
    return fds


pinging = threading.Event()
term_plan = None


def ping():
    period = int(os.environ["WATCHDOG_USEC"]) / 5e6
    while pinging.is_set():
        send("WATCHDOG=1")
        time.sleep(period)


def on_term():
    """SIGTERM is blocked in every thread and polled for between connections, so a
    connection once accepted is always answered (the old instance of an overlap
    restart drains; what it did not accept stays queued for the new one)."""
    if flag("--stopping"):
        send("STOPPING=1\nSTATUS=draining")
        time.sleep(0.3)
    if term_plan:
        usec, seconds = term_plan
        send("EXTEND_TIMEOUT_USEC=%d" % usec)
        time.sleep(seconds)
        with open(out(".term-done"), "w") as f:
            f.write("%d\n" % PID)
    os._exit(0)


def child_signals():
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def memfd_with(data):
    fd = os.memfd_create("holdfast-test")
    os.write(fd, data.encode())
    return fd


def pipe_with(data):
    r, w = os.pipe()
    os.write(w, data.encode())
    os.close(w)
    return r


def command(line, listener):
    global term_plan
    word, _, rest = line.partition(" ")
    if word == "pid":
        return "%s %d" % (TAG, PID)
    if word == "notify":
        send(rest.replace("\\n", "\n"))
        return "ok %d" % PID
    if word == "then-notify":
        return ("ok %d" % PID, lambda: send(rest.replace("\\n", "\n")))
    if word == "store":
        name, data, kind = rest.split(" ")
        fd = memfd_with(data) if kind == "memfd" else pipe_with(data)
        send("FDSTORE=1\nFDNAME=" + name, [fd])
        os.close(fd)
        return "ok %d" % PID
    if word == "fork":
        child = os.fork()
        if child == 0:
            child_signals()
            listener.close()
            while True:
                time.sleep(60)
        return "ok %d" % child
    if word == "end-child":
        child = int(rest)
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        return "ok %d" % child
    if word == "setsid-send":
        r, w = os.pipe()
        child = os.fork()
        if child == 0:
            child_signals()
            listener.close()
            os.setsid()
            send(rest.replace("\\n", "\n"))
            os.write(w, b"sent")
            time.sleep(20)
            os._exit(0)
        os.close(w)
        os.read(r, 16)
        os.close(r)
        return "ok %d" % child
    if word == "stop-ping":
        pinging.clear()
        return "ok %d" % PID
    if word == "term-plan":
        usec, seconds = rest.split(" ")
        term_plan = (int(usec), float(seconds))
        return "ok %d" % PID
    if word == "exit":
        return None
    return "unknown command %r" % line


def term_pending():
    return signal.SIGTERM in signal.sigpending()


def main():
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    first = not os.path.exists(out(".starts"))
    with open(out(".starts"), "a") as f:
        f.write("%d\n" % PID)
    if option("--extend"):
        send("EXTEND_TIMEOUT_USEC=" + option("--extend"))
    fds = report()
    later = None if first else option("--later")
    if later == "exit":
        os._exit(1)
    if flag("--ping"):
        pinging.set()
        threading.Thread(target=ping, daemon=True).start()
    if flag("--ready") and later != "never-ready":
        time.sleep(float(option("--ready-after", "0")))
        text = "READY=1"
        if option("--status"):
            text += "\nSTATUS=" + option("--status")
        send(text)
    sockets = [f for f in fds if f["kind"] == "socket"]
    if not sockets or later == "never-ready":
        # Not serving: what is queued on the socket is left to the other instance.
        signal.sigwait({signal.SIGTERM})
        on_term()
    listener = socket.socket(fileno=sockets[0]["fd"])
    listener.setblocking(False)
    while True:
        readable, _, _ = select.select([listener], [], [], 0.05)
        if term_pending():
            on_term()
        if not readable:
            continue
        try:
            conn, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            continue  # another instance took it
        with conn:
            conn.setblocking(True)
            conn.settimeout(10)
            line = conn.makefile("r").readline().strip()
            reply = command(line, listener)
            if reply is None:
                conn.sendall(("ok %d\n" % PID).encode())
                conn.close()
                os._exit(int(line.split(" ")[1]))
            after = None
            if isinstance(reply, tuple):
                reply, after = reply
            conn.sendall((reply + "\n").encode())
        if after:
            after()


main()
