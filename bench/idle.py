#!/usr/bin/env python3
"""Idle cost and manifest pickup latency of the daemon (issues 10 and 17).

Usage: bench/idle.py BINARY [--seconds 60] [--apps 50] [--per-app 10]

1. Idle CPU: the daemon with one app of one worker, then with APPS x PER_APP sleeping
   workers; after every worker is ready, CPU (utime+stime from /proc/PID/stat) over
   SECONDS, and how often the manifests were opened meanwhile (strace, if installed).
2. Pickup latency: 20 manifests written atomically (write a temp file, rename), each
   timed from the rename to the `spawn` event's timestamp (ms resolution); median.

Prints a markdown table; the numbers go to docs/benchmarks.md.
"""
import json, os, shutil, signal, statistics, subprocess, sys, tempfile, time
from datetime import datetime

def arg(name, default):
    if name in sys.argv:
        return type(default)(sys.argv[sys.argv.index(name) + 1])
    return default

BIN = os.path.abspath(sys.argv[1])
SECONDS = arg("--seconds", 60)
APPS = arg("--apps", 50)
PER_APP = arg("--per-app", 10)
TICKS = os.sysconf("SC_CLK_TCK")

def free_port():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port

def manifest(name, n):
    return f"""apiVersion: clusterd/v1
kind: App
metadata:
  name: {name}
spec:
  command: ["sleep", "100000"]
  instances: {n}
  listen:
    - port: {free_port()}
      address: 127.0.0.1
      mode: inherit
  readiness: {{type: delay, delay: 0s}}
"""

class Daemon:
    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="clusterd-idle-")
        self.apps = os.path.join(self.dir, "apps")
        os.makedirs(self.apps)
        self.sock = os.path.join(self.dir, "sock")
        self.env = dict(os.environ, CLUSTERD_SOCKET=self.sock)
        self.proc = subprocess.Popen(
            [BIN, "daemon", "--apps-dir", self.apps, "--socket", self.sock,
             "--state-dir", os.path.join(self.dir, "state"), "--log-dir", os.path.join(self.dir, "logs")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.wait(lambda: os.path.exists(self.sock), 20)

    def cli(self, *args):
        return subprocess.run([BIN, *args], env=self.env, capture_output=True, text=True)

    def write(self, name, text):
        tmp = os.path.join(self.apps, f".{name}.tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.rename(tmp, os.path.join(self.apps, name))

    def status(self):
        out = self.cli("status", "-o", "json")
        return json.loads(out.stdout) if out.returncode == 0 else {"apps": []}

    def wait(self, cond, timeout):
        end = time.time() + timeout
        while time.time() < end:
            if cond():
                return
            time.sleep(0.05)
        raise SystemExit("timed out")

    def cpu_ticks(self):
        f = open(f"/proc/{self.proc.pid}/stat").read().rsplit(")", 1)[1].split()
        return int(f[11]) + int(f[12])

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)

def idle(apps, per_app):
    d = Daemon()
    try:
        for i in range(apps):
            d.write(f"app{i}.yaml", manifest(f"app{i}", per_app))
        total = apps * per_app
        d.wait(lambda: sum(a["ready"] for a in d.status()["apps"]) == total, 300)
        time.sleep(2)
        strace = shutil.which("strace")
        tracer = None
        if strace:
            log = os.path.join(d.dir, "strace.log")
            tracer = subprocess.Popen([strace, "-f", "-qq", "-e", "trace=openat", "-o", log, "-p", str(d.proc.pid)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1)
        t0, c0 = time.time(), d.cpu_ticks()
        time.sleep(SECONDS)
        t1, c1 = time.time(), d.cpu_ticks()
        opens = None
        if tracer:
            tracer.send_signal(signal.SIGINT)
            tracer.wait()
            opens = sum(1 for l in open(log) if ".yaml" in l)
        return 100.0 * (c1 - c0) / TICKS / (t1 - t0), opens
    finally:
        d.stop()

def pickup(samples=20):
    d = Daemon()
    try:
        lat = []
        for i in range(samples):
            name = f"p{i}"
            t = time.time()
            d.write(f"{name}.yaml", manifest(name, 1))
            d.wait(lambda: " spawn " in d.cli("events", name).stdout, 20)
            line = next(l for l in d.cli("events", name).stdout.splitlines() if " spawn " in l)
            ts = datetime.strptime(line.split()[0], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=None)
            when = (ts - datetime(1970, 1, 1)).total_seconds()
            lat.append((when - t) * 1000)
            os.remove(os.path.join(d.apps, f"{name}.yaml"))
        return statistics.median(lat), min(lat), max(lat)
    finally:
        d.stop()

if __name__ == "__main__":
    one, one_opens = idle(1, 1)
    many, many_opens = idle(APPS, PER_APP)
    p50, lo, hi = pickup()
    print(f"| measure | value |\n|---|---|")
    print(f"| idle CPU, 1 app x 1 worker, {SECONDS} s | {one:.3f} % of one CPU (manifest opens: {one_opens}) |")
    print(f"| idle CPU, {APPS} apps x {PER_APP} workers, {SECONDS} s | {many:.3f} % of one CPU (manifest opens: {many_opens}) |")
    print(f"| rename -> spawn event, 20 manifests | p50 {p50:.0f} ms (min {lo:.0f}, max {hi:.0f}) |")
