#!/usr/bin/env python3
"""Runs issue 16's malformed and hostile requests through HAProxy, nginx and clusterd's
http proxy (the `proxy_bench` example) in front of one raw backend, and prints what each
client got and what the backend received, as a markdown table for docs/reliability.md.

    cargo build -p clusterd-runtime --example proxy_bench
    python3 bench/abuse_compare.py target/debug/examples/proxy_bench

Needs `haproxy` and `nginx` (Debian packages; installed with apt-get when missing). Timeouts (60 s
body and send) are not run here: they are the products' documented defaults, and the
runtime tests prove clusterd's.
"""

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

CASES = [
    ("TE: gzip, chunked", b"POST / HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"),
    ("bare LF after last chunk", b"POST /first HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\nGET /second HTTP/1.1\r\nHost: app\r\n\r\n"),
    ("two Host lines", b"GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n"),
    ("authority-form on GET", b"GET evil.example HTTP/1.1\r\nHost: app\r\n\r\n"),
    ("absolute-form with userinfo", b"GET http://user:pw@app.example/ HTTP/1.1\r\nHost: app\r\n\r\n"),
    ("Host with comma", b"GET / HTTP/1.1\r\nHost: app.example,evil.example\r\n\r\n"),
    ("Host with space", b"GET / HTTP/1.1\r\nHost: app.example evil\r\n\r\n"),
    ("Host with slash", b"GET / HTTP/1.1\r\nHost: app.example/evil\r\n\r\n"),
    ("CONNECT", b"CONNECT app.example:443 HTTP/1.1\r\nHost: app.example:443\r\n\r\n"),
    ("Upgrade: h2c", b"GET / HTTP/1.1\r\nHost: app\r\nConnection: Upgrade, HTTP2-Settings, close\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"),
    ("spoofed X-Forwarded-Proto/Host, X-Real-IP", b"GET / HTTP/1.1\r\nHost: app\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: evil.example\r\nX-Real-IP: 10.6.6.6\r\nConnection: close\r\n\r\n"),
    ("response with CL and TE", b"GET /clte HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n"),
]


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def backend(port, seen):
    """Answers each request head with a summary of what arrived."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(64)

    def serve(c):
        c.settimeout(2)
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                chunk = c.recv(65536)
                if not chunk:
                    return
                data += chunk
            try:
                data += c.recv(65536)
            except socket.timeout:
                pass
        except OSError:
            pass
        head = data.split(b"\r\n\r\n")[0].decode("latin-1")
        seen.append(data.decode("latin-1"))
        if head.startswith("GET /clte"):
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
        else:
            body = head.encode()
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        c.close()

    while True:
        c, _ = srv.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()


def exchange(port, raw):
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(3)
    s.sendall(raw)
    out = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
    except OSError:
        pass
    s.close()
    return out.decode("latin-1")


def wait_port(port):
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port)).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listening on {port}")


def ensure_tools():
    import shutil
    missing = [t for t in ("haproxy", "nginx") if not shutil.which(t)]
    if missing:
        subprocess.run(["apt-get", "install", "-y", "-o", "DPkg::Lock::Timeout=600", *missing], check=True)


def main():
    ensure_tools()
    clusterd_proxy = sys.argv[1] if len(sys.argv) > 1 else "target/debug/examples/proxy_bench"
    tmp = tempfile.mkdtemp()
    bport, hport, nport, cport = free_port(), free_port(), free_port(), free_port()
    seen = []
    threading.Thread(target=backend, args=(bport, seen), daemon=True).start()
    with open(f"{tmp}/haproxy.cfg", "w") as f:
        f.write(f"""global
  maxconn 256
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  option forwardfor
frontend fe
  bind 127.0.0.1:{hport}
  default_backend be
backend be
  server s1 127.0.0.1:{bport}
""")
    with open(f"{tmp}/nginx.conf", "w") as f:
        f.write(f"""daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log;
events {{ worker_connections 256; }}
http {{
  access_log off;
  client_body_temp_path {tmp}; proxy_temp_path {tmp};
  fastcgi_temp_path {tmp}; uwsgi_temp_path {tmp}; scgi_temp_path {tmp};
  server {{
    listen 127.0.0.1:{nport};
    location / {{
      proxy_pass http://127.0.0.1:{bport};
      proxy_http_version 1.1;
      proxy_set_header Host $host;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
    }}
  }}
}}
""")
    procs = [
        subprocess.Popen(["haproxy", "-f", f"{tmp}/haproxy.cfg"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        subprocess.Popen(["nginx", "-c", f"{tmp}/nginx.conf", "-p", tmp], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        subprocess.Popen([clusterd_proxy, "http", f"127.0.0.1:{cport}", f"127.0.0.1:{bport}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
    ]
    try:
        for p in (bport, hport, nport, cport):
            wait_port(p)
        print("| Case | HAProxy 2.6 | nginx 1.22 | clusterd |")
        print("|---|---|---|---|")
        for name, raw in CASES:
            cells = []
            for port in (hport, nport, cport):
                seen.clear()
                out = exchange(port, raw)
                status = out.split("\r\n", 1)[0] or "(closed)"
                status = status.replace("HTTP/1.1 ", "").replace("HTTP/1.0 ", "")
                backend_got = " / ".join(
                    s.split("\r\n", 1)[0] for s in seen
                ) or "nothing"
                note = f"{status}; backend got: {backend_got}"
                if "spoofed" in name and seen:
                    hdrs = [l for l in seen[0].split("\r\n") if l.lower().startswith(("x-forwarded-proto", "x-forwarded-host", "x-real-ip"))]
                    note += "; " + ", ".join(hdrs) if hdrs else "; none of them"
                if "h2c" in name and seen:
                    note += "; Upgrade forwarded" if "upgrade: h2c" in seen[0].lower() else "; Upgrade removed"
                if "CL and TE" in name:
                    hdr = out.split("\r\n\r\n")[0].lower()
                    note += "; client got Content-Length" if "content-length" in hdr else "; Content-Length removed"
                cells.append(note.replace("|", "\\|"))
            print(f"| {name} | " + " | ".join(cells) + " |")
    finally:
        for p in procs:
            p.terminate()
            p.wait()


if __name__ == "__main__":
    main()
