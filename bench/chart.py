"""docs/benchmarks.png from one bench/results/*.json (run with bench/.venv/bin/python,
which has matplotlib): left, req/s per system (keep-alive and a new connection per
request; median bar, min–max whisker); right, failed requests per reload per system."""

import json
import os
import statistics
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import APPS, NAMES, aggregate_throughput  # noqa: E402

SHORT = {"limit": "limit", "alone": "1 proc", "inherit": "clusterd\ninherit", "shared": "clusterd\nshared", "http": "clusterd\nhttp",
         "tcp": "clusterd\ntcp", "pm2": "PM2\ncluster"}


def main(src, dst):
    with open(src) as f:
        res = json.load(f)
    agg = aggregate_throughput(res)
    order = list(NAMES)
    keys = sorted((k for k in agg if not agg[k]["not_run"] and agg[k]["keepalive"]),
                  key=lambda k: (k[1] != "node", k[2], order.index(k[0]) if k[0] in order else 99))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 5.5), gridspec_kw={"width_ratios": [3, 2]})
    labels, x = [], list(range(len(keys)))
    w = 0.4
    for i, (mode, color) in enumerate((("keepalive", "#4C72B0"), ("close", "#DD8452"))):
        meds, lo, hi = [], [], []
        for k in keys:
            xs = [v for v in agg[k][mode].get("rps", []) if v is not None] or [0]
            m = statistics.median(xs)
            meds.append(m)
            lo.append(m - min(xs))
            hi.append(max(xs) - m)
        ax1.bar([p + (i - 0.5) * w for p in x], meds, w, yerr=[lo, hi], capsize=3, color=color,
                label="keep-alive (wrk)" if mode == "keepalive" else "new connection per request (loadgen)")
    for s, app, n in keys:
        labels.append(f"{SHORT.get(s, s)}\n{'node' if app == 'node' else 'demo'} N={n}")
    ax1.set_xticks(x)
    ax1.set_xticklabels(labels, fontsize=7)
    ax1.set_ylabel("requests/s (median, min–max)")
    ax1.set_title("Throughput")
    ax1.legend(fontsize=8)
    ax1.grid(axis="y", alpha=0.3)

    groups = {}
    for r in res.get("reload", []):
        if "not_run" in r or "error" in r:
            continue
        groups.setdefault((r["system"], r["app"], r["path"]), []).append(r["failed_per_reload"])
    rkeys = sorted(groups, key=lambda k: (k[1] != "node", order.index(k[0]) if k[0] in order else 99, k[2]))
    vals = [statistics.median(groups[k]) for k in rkeys]
    colors = ["#55A868" if k[0] != "pm2" else "#C44E52" for k in rkeys]
    ax2.bar(range(len(rkeys)), vals, color=colors)
    for i, v in enumerate(vals):
        ax2.text(i, v, f"{v:g}", ha="center", va="bottom", fontsize=8)
    ax2.set_xticks(range(len(rkeys)))
    ax2.set_xticklabels([f"{SHORT.get(s, s)}\n{'node' if a == 'node' else 'demo'} {p.split('?')[0]}"
                         for s, a, p in rkeys], fontsize=7)
    ax2.set_ylabel("failed requests per reload (median)")
    ax2.set_title("Reload under keep-alive load (N=2)")
    ax2.grid(axis="y", alpha=0.3)
    if not rkeys:
        ax2.text(0.5, 0.5, "no reload runs", transform=ax2.transAxes, ha="center")
    m = res["machine"]
    fig.suptitle(f"clusterd benchmarks — {m['nproc']} CPUs, {m['cpu_model']}, {res['started']}"
                 + ("  [--quick smoke run: not for quoting]" if res.get("quick") else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    _ = APPS
    main(sys.argv[1], sys.argv[2])
