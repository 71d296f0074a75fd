#!/usr/bin/env python3
"""Tabulate probe.py's peer-side counters from a pbx.py --probe run.

    probe_report.py RESULTS_DIR [--client-cpu cpu0] [--proxy-cpu cpu1] [--pairs A/B,...]

Writes RESULTS_DIR/probe.md (and prints it): per proxy, the median over valid repetitions of
each figure, per MB of payload (bulk) or per connection (connect).
"""
import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import probe  # noqa: E402

MB = 1e6
BULK_BYTES = 100 * 2**20

# Median over the run of the client core's speed probe (set in main): a repetition's
# figures are also given scaled to it, since this VM's vCPU speed moves by up to 2x.
MEDIAN_SPEED = {}

# (workload, rep) -> direct's result in that repetition (set in main).
DIRECT = {}


def vs_direct(r, key):
    d = DIRECT.get((r["workload"], r["rep"]))
    return r[key] / d[key] if d and d.get(key) else None


def speed_factor(r, cpu):
    """This repetition's speed of `cpu` (mean of the probe before and after) / the run's median."""
    vals = [r.get(k, {}).get(cpu) for k in ("cpu_speed_pre", "cpu_speed_post")]
    vals = [v for v in vals if v]
    if not vals or not MEDIAN_SPEED.get(cpu):
        return None
    return sum(vals) / len(vals) / MEDIAN_SPEED[cpu]


def med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def fmt(v, nd=2):
    if v is None:
        return "–"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.{nd}f}"


def rate_rows(r, key, label, ccpu):
    """A rate as measured, at the run's median client-core speed, and against direct's."""
    f = speed_factor(r, ccpu)
    return {
        label: r.get(key),
        f"{label} at the run's median {ccpu} speed": r[key] / f if f else None,
        f"{label} / direct's in the same repetition": vs_direct(r, key),
    }


def bulk_rows(r, ccpu, pcpu):
    p = r["probe"]
    mb = r["downloads"] * BULK_BYTES / MB
    sc, ps, ev = p.get("probe_client_syscalls", {}), p.get("probe_proxy_syscalls", {}), p.get("probe_cpu_events", {})
    socks = p.get("probe_sockets", {})
    one = BULK_BYTES / MB  # the instrumented download is one 100 MiB transfer

    def cpu(c, kinds=("user", "sys", "softirq")):
        return sum(p.get(f"{c}_{k}_ms", 0) for k in kinds) / mb

    def sock(role, num, den=None, scale=1.0):
        d = socks.get(role)
        if not d or num not in d:
            return None
        if den is None:
            return d[num] * scale
        if not d.get(den):
            return None
        return d[num] / d[den] * scale

    return {
        **rate_rows(r, "mb_per_s", "MB/s", ccpu),
        "proxy CPU s/GB": r.get("proxy_cpu_s_per_gb"),
        f"client core ({ccpu}) CPU ms/MB": cpu(ccpu),
        "… user / sys / softirq": "/".join(fmt(cpu(ccpu, (k,)), 3) for k in ("user", "sys", "softirq")),
        f"proxy core ({pcpu}) CPU ms/MB": cpu(pcpu),
        "… user / sys / softirq ": "/".join(fmt(cpu(pcpu, (k,)), 3) for k in ("user", "sys", "softirq")),
        "curl CPU ms/MB": (p["client_utime_s"] + p["client_stime_s"]) * 1000 / mb,
        "curl voluntary switches /MB": p["client_vol_cs"] / mb,
        "nginx CPU ms/MB": p["origin_cpu_s"] * 1000 / mb,
        "nginx voluntary switches /MB": p["origin_vol_cs"] / mb,
        "context switches (all) /MB": p["ctxt"] / mb,
        "TCP segments /MB (each counted once)": p["tcp_OutSegs"] / mb,
        "pure ACKs received /MB": p.get("tcp_TCPPureAcks", 0) / mb,
        "delayed ACKs /MB": p.get("tcp_DelayedACKs", 0) / mb,
        "receive-queue collapses /MB": p.get("tcp_TCPRcvCollapsed", 0) / mb,
        "curl recv calls /MB": (sc.get("sc_read", 0) + sc.get("sc_recvfrom", 0)) / one if sc else None,
        "curl poll calls /MB": (sc.get("sc_poll", 0) + sc.get("sc_ppoll", 0)) / one if sc else None,
        "proxy splice /MB": ps.get("sc_splice", 0) / one if ps else None,
        "proxy read+recv /MB": (ps.get("sc_read", 0) + ps.get("sc_recvfrom", 0)) / one if ps else None,
        "proxy write+send /MB": (ps.get("sc_write", 0) + ps.get("sc_writev", 0) + ps.get("sc_sendto", 0)) / one
        if ps else None,
        "proxy epoll_wait /MB": (ps.get("sc_epoll_wait", 0) + ps.get("sc_epoll_pwait", 0)) / one if ps else None,
        f"switches on {ccpu} /MB (1 download)": ev.get(f"context-switches/{ccpu}", 0) / one if ev else None,
        f"wakeups on {ccpu} /MB": ev.get(f"sched_wakeup/{ccpu}", 0) / one if ev else None,
        f"switches on {pcpu} /MB": ev.get(f"context-switches/{pcpu}", 0) / one if ev else None,
        "curl: KB per data segment in": sock("client", "bytes_received", "data_segs_in", 1e-3),
        "curl: segments out /MB": sock("client", "segs_out", "bytes_received", MB),
        "curl: rcv_space KB": sock("client", "rcv_space", scale=1e-3),
        "proxy→nginx: segments (ACKs) out /MB": sock("proxy_origin", "segs_out", "bytes_received", MB),
        "nginx→proxy: KB per data segment": sock("proxy_origin", "bytes_received", "data_segs_in", 1e-3),
        "proxy: rcv_space KB (from nginx)": sock("proxy_origin", "rcv_space", scale=1e-3),
        "proxy→curl: KB per data segment": sock("proxy_client", "bytes_acked", "data_segs_out", 1e-3),
        "proxy→curl: cwnd": sock("proxy_client", "cwnd"),
    }


def connect_rows(r, ccpu, pcpu):
    p = r["probe"]
    n = r.get("requests_ok") or 0
    if not n:
        return {}

    ev = p.get("probe_cpu_events", {})

    def cpu(c):
        return sum(p.get(f"{c}_{k}_ms", 0) for k in ("user", "sys", "softirq")) * 1000 / n

    return {
        **rate_rows(r, "conn_per_s", "conn/s", ccpu),
        "p99 ms": r.get("p99_ms"),
        "proxy CPU µs/conn": r.get("proxy_cpu_us_per_conn"),
        f"client core ({ccpu}) CPU µs/conn": cpu(ccpu),
        f"proxy core ({pcpu}) CPU µs/conn": cpu(pcpu),
        "nginx CPU µs/conn": p["origin_cpu_s"] * 1e6 / n,
        "TCP segments /conn": p["tcp_OutSegs"] / n,
        "pure ACKs /conn": p.get("tcp_TCPPureAcks", 0) / n,
        "delayed ACKs /conn": p.get("tcp_DelayedACKs", 0) / n,
        "context switches (all) /conn": p["ctxt"] / n,
        "nginx voluntary switches /conn": p["origin_vol_cs"] / n,
        f"switches on {ccpu} /conn": ev.get(f"context-switches/{ccpu}", 0) / n if ev else None,
        f"wakeups on {ccpu} /conn": ev.get(f"sched_wakeup/{ccpu}", 0) / n if ev else None,
        f"switches on {pcpu} /conn": ev.get(f"context-switches/{pcpu}", 0) / n if ev else None,
        f"wakeups on {pcpu} /conn": ev.get(f"sched_wakeup/{pcpu}", 0) / n if ev else None,
    }


def table(results, workload, rowfn, ccpu, pcpu):
    runs = [r for r in results if r.get("workload") == workload and r.get("valid") and "probe" in r]
    proxies = list(dict.fromkeys(r["proxy"] for r in runs))
    if not proxies:
        return ""
    per = {px: [rowfn(r, ccpu, pcpu) for r in runs if r["proxy"] == px] for px in proxies}
    keys = list(dict.fromkeys(k for rows in per.values() for row in rows for k in row))
    lines = [f"### {workload}: medians of {', '.join(f'{px} n={len(per[px])}' for px in proxies)}", "",
             "| figure | " + " | ".join(proxies) + " |", "|---|" + "---|" * len(proxies)]
    for k in keys:
        cells = []
        for px in proxies:
            vals = [row.get(k) for row in per[px]]
            if any(isinstance(v, str) for v in vals):
                cells.append(next(v for v in vals if isinstance(v, str)))
            else:
                cells.append(fmt(med(vals)))
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


RATIO_FIGURES = [("http", "proxy_cpu_us_per_req", "HTTP proxy CPU µs/req"), ("http", "p99_ms", "HTTP p99"),
                 ("connect", "proxy_cpu_us_per_conn", "CONNECT proxy CPU µs/conn"),
                 ("connect", "conn_per_s", "CONNECT conn/s"), ("bulk", "mb_per_s", "tunnel MB/s"),
                 ("bulk", "proxy_cpu_s_per_gb", "tunnel proxy CPU s/GB")]


def ratios(results, pairs, ccpu, pcpu):
    """Per-repetition ratios A/B (both measured in the same repetition): median (min-max),
    and the median after scaling each by the speed probes of the core that figure depends
    on (the proxy core for CPU time, the client core for rates and latency)."""
    by = {(r["proxy"], r["workload"], r["rep"]): r for r in results if r.get("valid")}
    lines = ["### per-repetition ratios", "", "| figure | " + " | ".join(pairs) + " |",
             "|---|" + "---|" * len(pairs)]
    for w, key, label in RATIO_FIGURES:
        cells = []
        for pair in pairs:
            a, b = pair.split("/")
            raw, scaled = [], []
            for (px, wl, rep), x in by.items():
                y = by.get((b, wl, rep))
                if px != a or wl != w or not y or not x.get(key) or not y.get(key):
                    continue
                raw.append(x[key] / y[key])
                cpu = pcpu if "cpu" in key else ccpu
                fx, fy = speed_factor(x, cpu), speed_factor(y, cpu)
                if fx and fy:
                    # CPU time shrinks on a faster core, rates grow, latency shrinks
                    scaled.append(raw[-1] * (fx / fy if ("cpu" in key or "ms" in key) else fy / fx))
            cells.append(f"{med(raw):.2f}x ({min(raw):.2f}-{max(raw):.2f}); speed-scaled {med(scaled):.2f}x"
                         if raw else "–")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--client-cpu", default="cpu0")
    ap.add_argument("--proxy-cpu", default="cpu1")
    ap.add_argument("--pairs", default="", help="comma list of A/B: per-repetition ratios of the main figures")
    x = ap.parse_args()
    results = probe.load(os.path.join(x.results, "raw.jsonl"))
    DIRECT.update({(r["workload"], r["rep"]): r for r in results if r.get("proxy") == "direct" and r.get("valid")})
    for cpu in (x.client_cpu, x.proxy_cpu):
        MEDIAN_SPEED[cpu] = med([r.get(k, {}).get(cpu) for r in results
                                 for k in ("cpu_speed_pre", "cpu_speed_post")])
    text = "# Peer-side probe\n\n" + "\n".join(
        t for t in (table(results, "bulk", bulk_rows, x.client_cpu, x.proxy_cpu),
                    table(results, "connect", connect_rows, x.client_cpu, x.proxy_cpu)) if t)
    if x.pairs:
        text += "\n" + ratios(results, x.pairs.split(","), x.client_cpu, x.proxy_cpu)
    with open(os.path.join(x.results, "probe.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
