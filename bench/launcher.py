#!/usr/bin/env python3
"""The physical limit: N copies of an app sharing one listening socket, no supervisor
in the data path.

    bench/launcher.py --port 8080 [--address 127.0.0.1] [-n N] -- COMMAND [ARGS...]

Binds ADDRESS:PORT once, then starts N children, each with the socket as fd 3 and the
systemd socket-activation variables set: LISTEN_FDS=1, LISTEN_FDNAMES=http and
LISTEN_PID = the child's own pid (each child is exec'd through `sh -c 'LISTEN_PID=$$
exec "$@"'`, so strict readers such as libsystemd, gunicorn or the listenfd crate accept
it). The launcher itself never accepts; it only waits. SIGTERM/SIGINT to the launcher
stops the children (SIGTERM, then SIGKILL after 5 s) and exits. Prints the children's
pids, one line `pids: 1 2 ...`, on stdout once they are started.
"""
import argparse
import os
import signal
import socket
import subprocess
import sys
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--address", default="127.0.0.1")
    ap.add_argument("-n", type=int, default=2)
    ap.add_argument("--backlog", type=int, default=4096)
    ap.add_argument("command", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not cmd:
        ap.error("missing COMMAND")

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((a.address, a.port))
    sock.listen(a.backlog)
    # The socket stays blocking in the launcher; the launcher never accepts on it.
    fd = sock.fileno()

    def to_fd3():
        # Runs in the child between fork and exec. close_fds=False below, so nothing
        # closes fd 3 after this; dup2(3, 3) would keep FD_CLOEXEC, hence set_inheritable.
        if fd != 3:
            os.dup2(fd, 3, inheritable=True)
        else:
            os.set_inheritable(3, True)

    env = dict(os.environ, LISTEN_FDS="1", LISTEN_FDNAMES="http")
    env.pop("LISTEN_PID", None)
    children = []
    for i in range(a.n):
        e = dict(env, CLUSTERD_INSTANCE=str(i))
        p = subprocess.Popen(
            ["sh", "-c", 'LISTEN_PID=$$; export LISTEN_PID; exec "$@"', "sh", *cmd],
            env=e,
            preexec_fn=to_fd3,
            close_fds=False,
            start_new_session=True,
        )
        children.append(p)
    print("pids:", " ".join(str(p.pid) for p in children), flush=True)

    stopping = False

    def stop(*_):
        nonlocal stopping
        if stopping:
            return
        stopping = True
        for p in children:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.time() + 5
        for p in children:
            try:
                p.wait(max(0.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while True:
        for p in children:
            if p.poll() is not None and not stopping:
                print(f"launcher: child {p.pid} exited with {p.returncode}", file=sys.stderr, flush=True)
                children.remove(p)
                break
        if not children:
            sys.exit(1)
        time.sleep(0.2)


if __name__ == "__main__":
    main()
