"""Turns one bench/results/*.json into docs/benchmarks.md (called by bench/run; also
runnable alone: python3 bench/report.py bench/results/X.json)."""

import json
import os
import statistics
import sys

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)

NAMES = {
    "limit": "physical limit (shared socket, no supervisor)",
    "alone": "1 process alone",
    "inherit": "clusterd inherit",
    "shared": "clusterd shared (unmodified app binds $PORT)",
    "http": "clusterd http",
    "tcp": "clusterd tcp",
    "pm2": "PM2 cluster mode",
    "http-1t": "clusterd http, 1 proxy thread",
    "tcp-1t": "clusterd tcp, 1 proxy thread",
    "http-hyper-1t": "clusterd http on hyper (CLUSTERD_PROXY_H1=hyper), 1 proxy thread",
    "haproxy": "HAProxy http, 1 thread",
    "haproxy-mt": "HAProxy http, 1 thread per CPU",
    "haproxy-tcp": "HAProxy tcp, 1 thread",
    "haproxy-tcp-mt": "HAProxy tcp, 1 thread per CPU",
    "nginx": "nginx http, 1 worker",
    "nginx-mt": "nginx http, 1 worker per CPU",
    "http-tls": "clusterd http + TLS",
    "http-tls-1t": "clusterd http + TLS, 1 proxy thread",
    "nginx-tls": "nginx + TLS, 1 worker",
    "nginx-tls-mt": "nginx + TLS, 1 worker per CPU",
}
# TLS rows and the nginx row with the same number of threads.
TLS_PEER = {"http-tls": "nginx-tls-mt", "http-tls-1t": "nginx-tls", "nginx-tls": "nginx-tls",
            "nginx-tls-mt": "nginx-tls-mt"}
TLS_BEGIN = "<!-- tls:begin -->"
TLS_END = "<!-- tls:end -->"
# Each proxy row is compared with HAProxy (1 thread) in the same mode.
PROXY_MODE = {"http": "http", "http-1t": "http", "http-hyper-1t": "http", "haproxy": "http", "haproxy-mt": "http", "nginx": "http",
              "nginx-mt": "http", "tcp": "tcp", "tcp-1t": "tcp", "haproxy-tcp": "tcp", "haproxy-tcp-mt": "tcp"}
PROXY_BEGIN = "<!-- proxies:begin -->"
PROXY_END = "<!-- proxies:end -->"
APPS = {"node": "Node hello.js", "demo": "demo-server"}


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def rng(xs):
    xs = [x for x in xs if x is not None]
    return (min(xs), max(xs)) if xs else (None, None)


def f0(x):
    return "—" if x is None else f"{x:,.0f}"


def f2(x):
    return "—" if x is None else f"{x:.2f}"


def cell(xs, fmt=f0):
    m = med(xs)
    lo, hi = rng(xs)
    if m is None:
        return "—"
    if len([x for x in xs if x is not None]) == 1:
        return fmt(m)
    return f"{fmt(m)} ({fmt(lo)}–{fmt(hi)})"


def aggregate_throughput(res):
    """{(system, app, n): {"keepalive": {...lists}, "close": {...}, "not_run": str|None, "errors": [...]}}"""
    agg = {}
    for row in res.get("throughput", []):
        key = (row["system"], row["app"], row["n"])
        g = agg.setdefault(key, {"not_run": None, "errors": [], "keepalive": {}, "close": {}})
        if "not_run" in row:
            g["not_run"] = row["not_run"]
            continue
        if "error" in row:
            g["errors"].append(row["error"])
        for mode in ("keepalive", "close"):
            m = row.get(mode)
            if not m:
                continue
            d = g[mode]
            for k in ("rps", "p50", "p99", "supervisor_cpu_us_per_req", "errors", "non2xx"):
                d.setdefault(k, []).append(m.get(k))
            d.setdefault("commands", set()).add(m.get("command"))
    return agg


def ratio(a, b):
    return None if a is None or not b else a / b


def throughput_table(res, agg, mode):
    lines = [
        "| system | app | N | req/s median (min–max) | p50 ms | p99 ms | supervisor CPU µs/req | errors | × limit | × PM2 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {s: i for i, s in enumerate(NAMES)}
    skipped = {}
    for key in sorted(agg, key=lambda k: (k[1] != "node", k[2], order.get(k[0], 99))):
        system, app, n = key
        g = agg[key]
        if g["not_run"]:
            skipped.setdefault(g["not_run"], []).append(f"{NAMES.get(system, system)} ({APPS.get(app, app)}, N={n})")
            continue
        d = g[mode]
        if not d:
            lines.append(f"| {NAMES.get(system, system)} | {APPS.get(app, app)} | {n} | failed: "
                         f"{'; '.join(g['errors'])[:200]} | | | | | | |")
            continue
        rps = med(d["rps"])
        lim = agg.get(("limit", app, n), {}).get(mode, {})
        pm2 = agg.get(("pm2", "node", n), {}).get(mode, {}) if app == "node" else {}
        r_lim = ratio(rps, med(lim.get("rps", []))) if system != "limit" else 1.0
        r_pm2 = ratio(rps, med(pm2.get("rps", []))) if system != "pm2" else (1.0 if pm2 else None)
        sup = d.get("supervisor_cpu_us_per_req", [])
        sup_cell = cell(sup, f2) if any(x is not None for x in sup) else "— (none in path)"
        errs = sum((x or 0) for x in d["errors"]) + sum((x or 0) for x in d["non2xx"])
        lines.append(
            f"| {NAMES.get(system, system)} | {APPS.get(app, app)} | {n} | {cell(d['rps'])} | {cell(d['p50'], f2)} |"
            f" {cell(d['p99'], f2)} | {sup_cell} | {errs} | {f2(r_lim) + 'x' if r_lim else '—'} |"
            f" {f2(r_pm2) + 'x' if r_pm2 else '—'} |")
    return "\n".join(lines) + not_run_note(skipped)


def proxies_table(res, agg):
    """clusterd's http/tcp modes next to HAProxy and nginx in front of the same workers."""
    lines = [
        "| proxy | mode | N | conn | req/s median (min–max) | proxy CPU µs/req median (min–max) |"
        " req/s × HAProxy 1t | CPU/req × HAProxy 1t | req/s × HAProxy same threads | CPU/req × HAProxy same threads |"
        " p99 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {s: i for i, s in enumerate(PROXY_MODE)}
    def base(system):
        return system.split("@")[0]

    def name(system):
        b, _, variant = system.partition("@")
        return NAMES.get(b, b) + (f" [{variant}]" if variant else "")

    keys = sorted((k for k in agg if base(k[0]) in PROXY_MODE and not agg[k]["not_run"]),
                  key=lambda k: (k[1] != "node", k[1], k[2], PROXY_MODE[base(k[0])], order[base(k[0])], k[0]))
    for mode, conn in (("keepalive", "keep-alive"), ("close", "new per request")):
        for key in keys:
            system, app, n = key
            d = agg[key][mode]
            if not d:
                continue
            pmode = PROXY_MODE[base(system)]
            ref = agg.get(("haproxy" if pmode == "http" else "haproxy-tcp", app, n), {}).get(mode, {})
            rps, cpu = med(d["rps"]), med(d.get("supervisor_cpu_us_per_req", []))
            r_rps = ratio(rps, med(ref.get("rps", [])))
            r_cpu = ratio(cpu, med(ref.get("supervisor_cpu_us_per_req", [])))
            # Same number of threads: clusterd's default runtime and the "-mt" rows use
            # one thread per CPU; "-1t", HAProxy and nginx without "-mt" use one.
            multi = base(system) in ("http", "tcp", "haproxy-mt", "haproxy-tcp-mt", "nginx-mt")
            peer = ("haproxy" if pmode == "http" else "haproxy-tcp") + ("-mt" if multi else "")
            ref2 = agg.get((peer, app, n), {}).get(mode, {})
            s_rps = ratio(rps, med(ref2.get("rps", [])))
            s_cpu = ratio(cpu, med(ref2.get("supervisor_cpu_us_per_req", [])))
            bold = "**" if base(system) in ("http", "tcp", "http-1t", "tcp-1t") else ""
            lines.append(
                f"| {bold}{name(system)}{bold} | {pmode} | {n} | {conn} | {cell(d['rps'])} |"
                f" {cell(d.get('supervisor_cpu_us_per_req', []), f2)} | {f2(r_rps) + 'x' if r_rps else '—'} |"
                f" {f2(r_cpu) + 'x' if r_cpu else '—'} | {f2(s_rps) + 'x' if s_rps else '—'} |"
                f" {f2(s_cpu) + 'x' if s_cpu else '—'} | {cell(d['p99'], f2)} |")
    if len(lines) == 2:
        return "(no proxy rows in this run)"
    return "\n".join(lines)


def proxies_section(res, agg, results_rel):
    a, v = res["args"], res["versions"]
    return f"""{PROXY_BEGIN}
## Proxies side by side: clusterd http/tcp vs HAProxy and nginx

From [`{results_rel}`](../{results_rel}) ({a.get('reps')} interleaved repetition(s) of {a.get('duration')} s,
{a.get('conns')} connections, started {res.get('started')}; {v.get('haproxy') or 'HAProxy'}; {v.get('nginx') or 'nginx'}).
Every proxy fronts the same app, N copies each on its own 127.0.0.1 port, with keep-alive
to the workers: HAProxy `balance leastconn`, `http-reuse always`, `option forwardfor`
(`mode tcp` for the tcp rows); nginx `least_conn`, `keepalive 64`, `proxy_http_version 1.1`,
X-Forwarded-For, `proxy_buffering off`. *Proxy CPU* is utime+stime of the proxy's
processes (nginx: master and workers) over the measurement, divided by the requests
completed; for clusterd it is the whole daemon. The ratios compare with HAProxy in the
same mode, with one thread ("1t") and with the same number of threads as the row (clusterd's
proxy has one thread per CPU unless `CLUSTERD_PROXY_THREADS=1`); lower CPU and higher req/s are better.
On a shared, overloaded machine req/s follows the CPU share a process gets, which grows with
its number of runnable threads: compare req/s at equal threads, and trust CPU/req more.

{proxies_table(res, agg)}
{PROXY_END}"""


def tls_table(res, agg):
    """clusterd terminating TLS next to nginx terminating TLS, in front of the same workers."""
    lines = [
        "| proxy | N | conn | req/s median (min–max) | proxy CPU µs/req median (min–max) |"
        " req/s × nginx same threads | CPU/req × nginx same threads | req/s × nginx 1 worker | p99 ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    order = list(TLS_PEER)
    keys = sorted((k for k in agg if k[0].split("@")[0] in TLS_PEER and not agg[k]["not_run"]),
                  key=lambda k: (k[1], k[2], order.index(k[0].split("@")[0]), k[0]))
    for mode, conn in (("keepalive", "keep-alive"), ("close", "new per request")):
        for key in keys:
            system, app, n = key
            d = agg[key][mode]
            if not d:
                continue
            base, _, variant = system.partition("@")
            rps, cpu = med(d["rps"]), med(d.get("supervisor_cpu_us_per_req", []))
            peer = agg.get((TLS_PEER[base], app, n), {}).get(mode, {})
            one = agg.get(("nginx-tls", app, n), {}).get(mode, {})
            s_rps = ratio(rps, med(peer.get("rps", [])))
            s_cpu = ratio(cpu, med(peer.get("supervisor_cpu_us_per_req", [])))
            o_rps = ratio(rps, med(one.get("rps", [])))
            bold = "**" if base.startswith("http") else ""
            label = NAMES.get(base, base) + (f" [{variant}]" if variant else "")
            lines.append(
                f"| {bold}{label}{bold} | {n} | {conn} | {cell(d['rps'])} |"
                f" {cell(d.get('supervisor_cpu_us_per_req', []), f2)} | {f2(s_rps) + 'x' if s_rps else '—'} |"
                f" {f2(s_cpu) + 'x' if s_cpu else '—'} | {f2(o_rps) + 'x' if o_rps else '—'} |"
                f" {cell(d['p99'], f2)} |")
    if len(lines) == 2:
        return None
    return "\n".join(lines)


def tls_section(res, agg, results_rel):
    table = tls_table(res, agg)
    if table is None:
        return None
    a, v = res["args"], res["versions"]
    return f"""{TLS_BEGIN}
## TLS termination: clusterd http + `tls` vs nginx

From [`{results_rel}`](../{results_rel}) (`./bench/run --tls`: {a.get('reps')} interleaved repetition(s) of
{a.get('duration')} s, {a.get('conns')} connections, started {res.get('started')}; {v.get('nginx') or 'nginx'}).
Both terminate TLS for the same 2 Node workers (each on its own port, keep-alive to them)
with one self-signed ECDSA P-256 certificate made for the run: clusterd http mode with
`listen[].tls` (rustls with *ring*: TLS 1.3 preferred, session tickets, AES-128-GCM chosen
first unless the client lists ChaCha20 first);
nginx `listen … ssl`, TLS 1.2/1.3, `ssl_session_cache shared:SSL:10m`, tickets on, and the
proxy settings of the rows above. Keep-alive: `wrk` on `https://` (its TLS handshakes
happen once per connection). New connection per request: `bench/loadgen --mode close`
on `https://`: a TLS handshake per request, resuming the previous session (a TLS 1.3
ticket), as a returning browser would; the certificate is not verified but the
handshake signature is. *Proxy CPU* as above (clusterd: the whole daemon; nginx: master
and workers). "Same threads": clusterd's default runtime (one thread per CPU) against
nginx with one worker per CPU, `CLUSTERD_PROXY_THREADS=1` against one nginx worker.

{table}
{TLS_END}"""


def replace_section(old, begin, end, section):
    """`old` with the text between `begin` and `end` replaced by `section` (put after the
    proxies section, or at the end, when the markers are missing)."""
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        return head + section + rest.split(end, 1)[1]
    if PROXY_END in old:
        head, tail = old.split(PROXY_END, 1)
        return head + PROXY_END + "\n\n" + section + tail
    return old.rstrip("\n") + "\n\n" + section + "\n"


def not_run_note(skipped):
    return "".join(f"\n\n**Not run:** {', '.join(v)} — {why}" for why, v in skipped.items())


def reload_table(res):
    groups = {}
    for row in res.get("reload", []):
        key = (row["system"], row["app"], row["path"])
        groups.setdefault(key, []).append(row)
    lines = [
        "| system | app | endpoint | reload runs | failed requests / reload median (min–max) | failure kinds (all runs) |"
        " non-2xx | reload wall time s, median | req/s during reloads |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    order = {s: i for i, s in enumerate(NAMES)}
    skipped = {}
    for key in sorted(groups, key=lambda k: (k[1] != "node", k[2], order.get(k[0], 99))):
        rows = groups[key]
        system, app, path = key
        name = f"{NAMES.get(system, system)} | {APPS.get(app, app)} | `{path}`"
        nr = [r for r in rows if "not_run" in r]
        if nr:
            skipped.setdefault(nr[0]["not_run"], []).append(f"{NAMES.get(system, system)} ({APPS.get(app, app)}, `{path}`)")
            continue
        good = [r for r in rows if "error" not in r]
        if not good:
            lines.append(f"| {name} | failed: {rows[0].get('error', '')[:200]} | | | | | |")
            continue
        kinds = {}
        for r in good:
            for k, v in (r.get("errors_by_kind") or {}).items():
                kinds[k] = kinds.get(k, 0) + v
        kinds_s = ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())) or "—"
        walls = [w for r in good for w in r.get("reload_wall_s", [])]
        lines.append(
            f"| {name} | {len(good)} x {good[0]['reloads']} | {cell([r['failed_per_reload'] for r in good], f2)} |"
            f" {kinds_s} | {sum(r['non2xx'] for r in good)} | {f2(med(walls))} | {cell([r['rps'] for r in good])} |")
    return "\n".join(lines) + not_run_note(skipped)


def control_section(res):
    c = res.get("control") or {}
    if not c:
        return "_Not run in this run._"
    out = []
    cd, pm = c.get("clusterd", {}), c.get("pm2", {})

    def g(d, *path):
        for p in path:
            if not isinstance(d, dict):
                return None
            d = d.get(p)
        return d

    def kib(x):
        return "—" if x is None else f"{x / 1024:.1f} MiB"

    def ms(d):
        if not isinstance(d, dict) or "median_ms" not in d:
            return "—" if not isinstance(d, dict) or "error" not in d else d["error"]
        return f"{d['median_ms']:.1f} ms ({d['min_ms']:.1f}–{d['max_ms']:.1f})"

    nr_c = cd.get("not_run") or cd.get("error")
    nr_p = pm.get("not_run") or pm.get("error")
    out.append("| measurement | clusterd | PM2 |")
    out.append("|---|---|---|")
    cdv = (lambda v: f"not run: {nr_c}") if cd.get("not_run") else (lambda v: v)
    pmv = (lambda v: f"not run: {nr_p}") if pm.get("not_run") else (lambda v: v)
    rec = g(cd, "reconcile")
    out.append("| new app (4 sleeping workers): manifest write → first spawn, median | "
               f"{cdv(f2(g(rec, 'first_spawn_median_ms')) + ' ms' if rec else '—')} | "
               f"{pmv('`pm2 start` returned after ' + f2(g(pm, 'start', 'start_cmd_median_ms')) + ' ms' if g(pm, 'start') else '—')} |")
    out.append("| new app: manifest write → Available, median | "
               f"{cdv(f2(g(rec, 'available_median_ms')) + ' ms' if rec else '—')} | (no equivalent) |")
    out.append(f"| daemon RSS, 10 apps x 4 workers | {cdv(kib(g(cd, 'apps10x4', 'daemon_rss_kib')))} |"
               f" {pmv(kib(g(pm, 'apps10x4', 'daemon_rss_kib')))} |")
    out.append(f"| status, 10 apps x 4: `clusterd status -o json` vs `pm2 jlist` | {cdv(ms(g(cd, 'apps10x4', 'status_json')))} |"
               f" {pmv(ms(g(pm, 'apps10x4', 'jlist')))} |")
    out.append(f"| status, 10 apps x 4: `clusterd status` vs `pm2 ls` | {cdv(ms(g(cd, 'apps10x4', 'status_table')))} |"
               f" {pmv(ms(g(pm, 'apps10x4', 'ls')))} |")
    pct = lambda x: "—" if x is None else f"{x:.2f} %"  # noqa: E731
    out.append(f"| daemon idle CPU, 10 apps x 4 | {cdv(pct(g(cd, 'apps10x4', 'idle_cpu_percent')))} |"
               f" {pmv(pct(g(pm, 'apps10x4', 'idle_cpu_percent')))} |")
    nw = g(cd, "sleepers", "workers") or g(pm, "sleepers", "workers") or res.get("args", {}).get("sleepers")
    out.append(f"| {nw} sleeping workers: daemon idle CPU | {cdv(pct(g(cd, 'sleepers', 'idle_cpu_percent')))} |"
               f" {pmv(pct(g(pm, 'sleepers', 'idle_cpu_percent')))} |")
    out.append(f"| {nw} sleeping workers: daemon RSS | {cdv(kib(g(cd, 'sleepers', 'daemon_rss_kib')))} |"
               f" {pmv(kib(g(pm, 'sleepers', 'daemon_rss_kib')))} |")
    out.append(f"| {nw} sleeping workers: status (`-o json` / `jlist`) | {cdv(ms(g(cd, 'sleepers', 'status_json')))} |"
               f" {pmv(ms(g(pm, 'sleepers', 'jlist')))} |")
    if cd.get("error"):
        out.append(f"\nclusterd control section failed: {cd['error']}")
    if pm.get("error"):
        out.append(f"\nPM2 control section failed: {pm['error']}")
    return "\n".join(out)


def commands_section(res, agg):
    cmds = set()
    for g in agg.values():
        for mode in ("keepalive", "close"):
            cmds |= {c for c in g[mode].get("commands", set()) if c}
    rl = {r.get("command") for r in res.get("reload", []) if r.get("command")}
    ex = []
    for c in sorted(cmds)[:3] + sorted(rl)[:1]:
        ex.append("    " + c)
    return "\n".join(ex) if ex else "    (no load was run)"


def write_docs(res, results_rel):
    agg = aggregate_throughput(res)
    path = os.path.join(ROOT, "docs", "benchmarks.md")
    if res["args"].get("tls") and not res["args"].get("compare") and os.path.exists(path):
        # A --tls run only replaces the TLS section of the page.
        with open(path) as f:
            old = f.read()
        section = tls_section(res, agg, results_rel)
        if section:
            with open(path, "w") as f:
                f.write(replace_section(old, TLS_BEGIN, TLS_END, section))
        return os.path.relpath(path, ROOT)
    if res["args"].get("compare") and os.path.exists(path):
        # A --compare run only replaces the proxies section of the page (and the TLS
        # section, with --tls).
        with open(path) as f:
            old = f.read()
        tls = tls_section(res, agg, results_rel)
        if tls:
            old = replace_section(old, TLS_BEGIN, TLS_END, tls)
        section = proxies_section(res, agg, results_rel)
        if PROXY_BEGIN in old and PROXY_END in old:
            head, rest = old.split(PROXY_BEGIN, 1)
            new = head + section + rest.split(PROXY_END, 1)[1]
        elif "## Reload under load" in old:
            head, tail = old.split("## Reload under load", 1)
            new = head + section + "\n\n## Reload under load" + tail
        else:
            new = old.rstrip("\n") + "\n\n" + section + "\n"
        with open(path, "w") as f:
            f.write(new)
        return os.path.relpath(path, ROOT)
    m, v, a = res["machine"], res["versions"], res["args"]
    quick = res.get("quick")
    targets = """- clusterd inherit ≥ 0.98x the physical limit;
- clusterd shared (the unmodified Node app) ≥ 0.98x the physical limit, ≥ 1.0x PM2 keep-alive,
  ≥ 2x PM2 with a new connection per request;
- a new connection per request: every clusterd mode ≥ 2x PM2 cluster mode;
- http ≥ 1.0x PM2 cluster mode with keep-alive, p99 no worse;
- 0 failed requests per reload for clusterd, in every mode, with unmodified apps;
- daemon RSS ≤ 10 MiB with 10 apps x 4 workers; `clusterd status` ≤ 10 ms."""
    warn = ""
    if quick:
        warn = ("\n> **This is a `--quick` smoke run** (1 short repetition): it proves the harness, not the "
                "numbers. Run `./bench/run` on a quiet machine for numbers worth quoting.\n")
    not_run = [f"- {k}: {w}" for k, w in res.get("availability", {}).items() if w != "ok"]
    # The TLS section of this run, else the one already on the page (from a --tls run).
    tls_part = tls_section(res, agg, results_rel)
    if tls_part is None and os.path.exists(path):
        with open(path) as f:
            old = f.read()
        if TLS_BEGIN in old and TLS_END in old:
            tls_part = TLS_BEGIN + old.split(TLS_BEGIN, 1)[1].split(TLS_END, 1)[0] + TLS_END
    tls_part = "\n" + tls_part + "\n" if tls_part else ""
    body = f"""# Benchmarks

clusterd against the physical limit (the same app as N processes sharing one listening
socket, nothing in between) and against PM2's cluster mode, in one interleaved run.
Generated by `bench/run` from [`{results_rel}`](../{results_rel}) — do not edit by hand.
{warn}
What the numbers mean, where clusterd falls short of its targets and why:
[performance.md](performance.md) (hand-written, not regenerated).

![req/s per system, and failed requests per reload](benchmarks.png)

## How to run

    just bench                 # = ./bench/run: 5 interleaved repetitions, ~30-40 min
    ./bench/run --quick        # smoke test: 1 short repetition of everything, a few minutes
    ./bench/run --compare      # only clusterd http/tcp vs HAProxy, nginx, PM2 (3 reps, ~5 min)
    ./bench/run --tls          # only clusterd terminating TLS vs nginx (3 reps, ~3 min)
    ./bench/run --help         # repetitions, duration, connections, sections, N, pinning

`bench/run` installs what it needs: `wrk`, `haproxy`, `nginx-light` (Debian's packages,
`apt-get install -y -o DPkg::Lock::Timeout=600 …`),
pm2 {v.get('pm2')} (`npm install --prefix bench pm2@{v.get('pm2')}`, into bench/node_modules),
matplotlib (into bench/.venv, for the chart); builds the workspace with
`cargo build --release --workspace`; writes `bench/results/<timestamp>.json` and this page.

## Machine and versions

- {m.get('nproc')} CPUs, {m.get('cpu_model')}, Linux {m.get('kernel')}; load average at start {' '.join(m.get('loadavg_at_start') or [])}; somaxconn {m.get('somaxconn')}
- node {v.get('node')}, pm2 {v.get('pm2')}, {v.get('wrk')}, clusterd {v.get('clusterd') or '—'} (commit {v.get('clusterd_commit')}), {v.get('rustc')}
- run started {res.get('started')}, finished {res.get('finished')}; {a.get('reps')} repetition(s) of {a.get('duration')} s per measurement, {a.get('conns')} connections

**Read the numbers with this in mind.** The load generator runs on the same machine as the
servers (pinned with `taskset -c {a.get('loadgen_cpus') or '(none)'}`; the servers are not pinned), so
it competes with them for the CPUs: the absolute numbers are those of a small shared box,
and only comparisons *within one run* mean anything. Every repetition runs every system,
in a rotated order, so drift on the machine hits them all alike.
{chr(10).join(['', 'Not run in this run:'] + not_run) if not_run else ''}

## What is measured

- **Apps.** `bench/apps/hello.js`: `http.createServer((q, s) => s.end('hello'))`, listening on
  `$PORT`, or on fd 3 (`listen({{fd: 3}})`) when `LISTEN_FDS` is set; `/slow?ms=N` answers after N ms.
  It dies at once on SIGINT, like most apps (no drain handler). `demo-server` (crates/demo-server).
- **Systems.** *physical limit*: `bench/launcher.py` binds the port and starts N copies with the
  socket as fd 3 (`LISTEN_FDS=1`, `LISTEN_PID` = the child's pid); nothing is in the data path.
  *1 process alone* on `$PORT`. *clusterd inherit / shared / http / tcp*: a private daemon
  (`clusterd daemon --apps-dir … --socket …`) with one manifest, waited on until `Available`
  (readiness: demo-server `notify`; Node in inherit mode `delay: 500ms`; shared `bind`, the
  app binding `$PORT` unmodified; http/tcp `tcp`).
  *PM2 cluster mode*: `pm2 start hello.js -i N` with a private `PM2_HOME` (the app unmodified).
- **Keep-alive**: `wrk -t1 -c{a.get('conns')} -d{a.get('duration')}s --latency` (p50/p99 from its latency distribution).
- **New connection per request**: `bench/loadgen --mode close` ({a.get('close_tool')}): a closed-loop
  tokio client that opens a TCP connection for every request, sends `Connection: close`,
  and counts each request's outcome. (wrk with `-H 'Connection: close'` is available with `--wrk-close`.)
- **Supervisor CPU per request**: utime+stime of the supervisor process (`/proc/PID/stat`)
  around each measurement, divided by the requests completed: the clusterd daemon; PM2's God
  daemon, which in cluster mode is also the cluster primary that accepts every connection
  and hands it to a worker. None for the limit and the lone process.
- **Reload under load**: {a.get('reloads')} reloads (`clusterd reload bench` / `pm2 reload hello`, each
  waited for, {a.get('reload_gap')} s apart), N = 2, during `bench/loadgen --mode keepalive -c{a.get('conns')}` on `/` and on
  `/slow?ms={a.get('slow_ms')}` (requests in flight at every reload). A failed request is any error
  (refused, reset, EOF before a response — `reused_conn_*` marks failures on a reused
  keep-alive connection, which a retrying client would hide — or timeout) or non-2xx.

Example commands of this run:

{commands_section(res, agg)}

## Throughput: keep-alive

{throughput_table(res, agg, 'keepalive')}

## Throughput: a new connection per request

{throughput_table(res, agg, 'close')}

`× limit` compares with the physical limit for the same app and N; `× PM2` with PM2
cluster mode for the Node app and the same N. Medians over repetitions, (min–max).

{proxies_section(res, agg, results_rel)}
{tls_part}
## Reload under load

{reload_table(res)}

## Control plane

{control_section(res)}

Sleeping workers are `sleep infinity` (readiness `none` for clusterd; PM2 fork mode,
`pm2 start /bin/sleep -i K -- infinity`). Status latency is the wall time of the whole CLI
command (PM2's CLI is a Node program). Idle CPU is the daemon's utime+stime over
{a.get('idle_secs')} s with nothing happening, as a percentage of one CPU.

## Targets

These are the product's goals (`issues show 7`); the tables above say where it stands.

{targets}
"""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(body)
    return os.path.relpath(path, ROOT)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        r = json.load(f)
    print(write_docs(r, os.path.relpath(os.path.abspath(sys.argv[1]), ROOT)))
