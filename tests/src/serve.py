"""A real LISTEN_FDS consumer for the holdfast tests (Python 3 standard library only).

Usage: serve.py REPORT [TERM_MARKER]

1. Writes what it was handed to REPORT as JSON (atomically: REPORT.tmp, then rename):
     pid, ppid, uid, gid, groups, cwd, argv, env (the whole environment),
     fds: {"0": "/dev/null", "3": "socket:[123]", ...} (every open fd, listed first thing),
     sockets: for each fd 3 .. 3+LISTEN_FDS-1:
       {fd, family: "AF_INET", type: "SOCK_STREAM", address: ["127.0.0.1", 8001] or a path,
        listening, blocking}
2. Serves every passed socket: a stream listener answers each connection with
   "NAME PID\n" (NAME from LISTEN_FDNAMES) and closes it; a datagram socket answers
   each datagram with the same text.
3. On SIGTERM writes "PID\n" to TERM_MARKER (when given) and exits 0.
"""

import os
import sys


def open_fds():
    # First thing, before this script opens anything. The directory fd that
    # listdir uses is in the listing but closed by the time of readlink, so it drops out.
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[name] = os.readlink("/proc/self/fd/" + name)
        except OSError:
            pass
    return fds


FDS = open_fds()

import json  # noqa: E402
import select  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import threading  # noqa: E402

PID = os.getpid()


def describe(fd):
    blocking = os.get_blocking(fd)
    s = socket.socket(fileno=fd)
    try:
        name = s.getsockname()
        if s.family in (socket.AF_INET, socket.AF_INET6):
            address = [name[0], name[1]]
        elif isinstance(name, bytes):
            address = name.decode("utf-8", "replace")
        else:
            address = name
        return {
            "fd": fd,
            "family": getattr(s.family, "name", str(s.family)),
            "type": getattr(s.type, "name", str(s.type)),
            "address": address,
            "listening": bool(s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)),
            "blocking": blocking,
        }
    finally:
        s.detach()


def serve(fd, label):
    s = socket.socket(fileno=fd)
    reply = ("%s %d\n" % (label, PID)).encode()
    stream = s.type == socket.SOCK_STREAM
    while True:
        select.select([s], [], [])
        try:
            if stream:
                conn, _ = s.accept()
                conn.setblocking(True)
                try:
                    conn.sendall(reply)
                    conn.shutdown(socket.SHUT_WR)
                finally:
                    conn.close()
            else:
                _, peer = s.recvfrom(65536)
                s.sendto(reply, peer)
        except (BlockingIOError, InterruptedError, ConnectionError):
            pass


def main():
    report = sys.argv[1]
    term_marker = sys.argv[2] if len(sys.argv) > 2 else None

    def on_term(_signum, _frame):
        if term_marker:
            with open(term_marker, "w") as f:
                f.write("%d\n" % PID)
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)

    count = int(os.environ.get("LISTEN_FDS", "0") or "0")
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    sockets = [describe(3 + i) for i in range(count)]
    data = {
        "pid": PID,
        "ppid": os.getppid(),
        "uid": os.getuid(),
        "gid": os.getgid(),
        "groups": os.getgroups(),
        "cwd": os.getcwd(),
        "argv": sys.argv,
        "env": dict(os.environ),
        "fds": FDS,
        "sockets": sockets,
    }
    with open(report + ".tmp", "w") as f:
        json.dump(data, f)
    os.rename(report + ".tmp", report)

    for i in range(count):
        label = names[i] if i < len(names) else "?"
        threading.Thread(target=serve, args=(3 + i, label), daemon=True).start()
    print("serving pid %d on %d sockets" % (PID, count), flush=True)
    while True:
        signal.pause()


main()
