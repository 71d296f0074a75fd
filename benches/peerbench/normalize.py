#!/usr/bin/env python3
"""Per-repetition Kalmar/Squid CPU ratios from a peerbench raw.jsonl, raw and corrected for
the vCPU speed the harness's probe measured on the proxy core around each measurement
(CPU seconds x probe speed = work in probe units). peerbench interleaves repetitions, but on
this VM the proxy core's speed can change 2x between Squid's window and Kalmar's.

    normalize.py RESULTS_DIR/raw.jsonl
"""
import collections
import json
import statistics
import sys

rows = [json.loads(line) for line in open(sys.argv[1])]
by_rep = collections.defaultdict(dict)
for row in rows:
    if row.get("valid"):
        by_rep[(row["workload"], row["rep"])][row["proxy"]] = row


def speed(row):
    pre, post = row.get("cpu_speed_pre", {}), row.get("cpu_speed_post", {})
    return (pre.get("cpu1", 0) + post.get("cpu1", 0)) / 2


UNITS = {
    "http": lambda r: r["proxy_cpu_s"] / r["requests"],
    "connect": lambda r: r["proxy_cpu_s"] / r["requests_ok"],
    "bulk": lambda r: r["proxy_cpu_s"] / (r["mb_per_s"] * r["wall_s"]),
    "bulk_http": lambda r: r["proxy_cpu_s"] / (r["mb_per_s"] * r["wall_s"]),
}
for workload, per_unit in UNITS.items():
    raw, corrected = [], []
    for (w, _rep), proxies in sorted(by_rep.items()):
        if w != workload or "kalmar" not in proxies or "squid" not in proxies:
            continue
        k, s = proxies["kalmar"], proxies["squid"]
        raw.append(per_unit(k) / per_unit(s))
        if speed(k) and speed(s):
            corrected.append(per_unit(k) * speed(k) / (per_unit(s) * speed(s)))
    if raw:
        fmt = lambda xs: ", ".join(f"{x:.2f}" for x in xs)
        print(f"{workload:10} CPU per unit, Kalmar/Squid: raw median {statistics.median(raw):.2f} "
              f"[{fmt(raw)}]; speed-corrected median {statistics.median(corrected):.2f} [{fmt(corrected)}]")
