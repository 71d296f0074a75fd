#!/usr/bin/env python3
"""Run the built kalmar binary the way the Deployment runs it, on loopback.

    smoke_binary.py --kalmar BIN --config RENDERED_KALMAR.toml --name base [--tally FILE]

The config (taken from the rendered ConfigMap) is laid out the way the kubelet
lays out a ConfigMap volume: /etc/kalmar/kalmar.toml -> ..data/kalmar.toml,
..data -> ..<timestamp>/. Kalmar starts with the Deployment's arguments
(`--config <dir>/kalmar.toml`); the listen addresses are moved to free
loopback ports through the KALMAR_SERVER__* environment overrides (nothing
leaves this machine). Then:
  - GET /healthz and /readyz answer 200 (the liveness and readiness probes),
  - GET /metrics answers 200 in the Prometheus text format (the scrape),
  - a CONNECT from an unlisted source to a loopback target is refused with
    403 and an X-Kalmar-Error header (default deny; never 407),
  - the access log is JSON lines on stdout (format = "json", path = "-"),
  - a ConfigMap update, done the kubelet's way (new directory, atomic swap of
    the ..data symlink), is hot-reloaded (kalmar_config_reloads_total{result="ok"}),
  - SIGTERM ends the process within server.shutdown_grace.
With [kubernetes] enabled, Kalmar watches a loopback API (fake_apiserver.py)
through KUBECONFIG: /readyz is 503 while that API does not answer and 200 once
the first list is in.
Prints one PASS/FAIL row per property; exit status 1 on any failure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.error
import urllib.request

from fake_apiserver import FakeApiServer, namespace


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    try:
        with opener.open(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")


def wait_for(url: str, deadline: float) -> tuple[int, str]:
    last: tuple[int, str] = (0, "")
    while time.monotonic() < deadline:
        try:
            last = http_get(url)
            if last[0] == 200:
                return last
        except OSError as e:
            last = (0, str(e))
        time.sleep(0.2)
    return last


def raw_connect(port: int, target: str, timeout: float = 5.0) -> tuple[int, dict[str, str]]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data and len(data) < 65536:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    lines = head.split("\r\n")
    m = re.match(r"HTTP/1\.[01] (\d{3})", lines[0] if lines else "")
    headers = {}
    for ln in lines[1:]:
        k, _, v = ln.partition(":")
        headers[k.strip().lower()] = v.strip()
    return (int(m.group(1)) if m else 0), headers


RELOADS_METRIC = "kalmar_config_reloads_total"


def reloads_ok(admin: str) -> float:
    """The successful-reload counter from /metrics (0 when not yet exported)."""
    try:
        status, body = http_get(f"{admin}/metrics")
    except OSError:
        return -1.0
    pattern = "^" + re.escape(RELOADS_METRIC) + r'\{[^}]*result="ok"[^}]*\}\s+(\S+)$'
    m = re.search(pattern, body, re.M)
    return float(m.group(1)) if status == 200 and m else 0.0


def duration_s(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h)", text)) or 30.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kalmar", required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--name", default="config")
    ap.add_argument("--tally")
    args = ap.parse_args()

    with open(args.config, "rb") as f:
        cfg = tomllib.load(f)
    grace = duration_s(cfg.get("server", {}).get("shutdown_grace", "30s"))
    rows: list[tuple[bool, str, str]] = []

    def check(name: str, ok: bool, detail: str = "") -> bool:
        rows.append((bool(ok), name, detail))
        return bool(ok)

    tmp = tempfile.mkdtemp(prefix="kalmar-smoke-")
    proc = None
    api = None
    out_lines: list[str] = []
    err_lines: list[str] = []
    try:
        # The kubelet's ConfigMap volume layout.
        etc = os.path.join(tmp, "etc-kalmar")
        stamp = os.path.join(etc, "..2024_01_01_00_00_00.000000001")
        os.makedirs(stamp)
        shutil.copyfile(args.config, os.path.join(stamp, "kalmar.toml"))
        os.symlink(os.path.basename(stamp), os.path.join(etc, "..data"))
        os.symlink("..data/kalmar.toml", os.path.join(etc, "kalmar.toml"))

        proxy_port = free_port()
        admin_port = free_port()
        while admin_port == proxy_port:
            admin_port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("KALMAR_") and k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")}
        env["KALMAR_SERVER__LISTEN"] = f"127.0.0.1:{proxy_port}"
        env["KALMAR_SERVER__ADMIN_LISTEN"] = f"127.0.0.1:{admin_port}"
        with open(args.config, "rb") as f:
            kube = (tomllib.load(f).get("kubernetes") or {}).get("enabled") is True
        if kube:
            api = FakeApiServer([namespace("default")])
            env["KUBECONFIG"] = api.kubeconfig(tmp)
        proc = subprocess.Popen(
            [args.kalmar, "--config", os.path.join(etc, "kalmar.toml")],
            env=env,
            cwd=tmp,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        readers = [
            threading.Thread(target=lambda: out_lines.extend(proc.stdout), daemon=True),
            threading.Thread(target=lambda: err_lines.extend(proc.stderr), daemon=True),
        ]
        for t in readers:
            t.start()

        admin = f"http://127.0.0.1:{admin_port}"
        status, body = wait_for(f"{admin}/healthz", time.monotonic() + 20)
        alive = check("starts with the Deployment's args; liveness GET /healthz -> 200", status == 200, f"status {status} {body[:200]!r}; exit {proc.poll()}")
        if alive and api is not None:
            status, body = http_get(f"{admin}/readyz")
            check("[kubernetes] on, API not answering yet: /readyz -> 503", status == 503, f"status {status} {body[:200]!r}")
            api.__enter__()
        if alive:
            status, body = wait_for(f"{admin}/readyz", time.monotonic() + 10)
            check("readiness GET /readyz -> 200", status == 200, f"status {status} {body[:200]!r}")
            status, body = http_get(f"{admin}/metrics")
            check("GET /metrics -> 200, Prometheus text format", status == 200 and ("# TYPE" in body or "# HELP" in body), f"status {status} {body[:200]!r}")
            try:
                code, headers = raw_connect(proxy_port, f"127.0.0.1:{admin_port}")
            except OSError as e:
                code, headers = 0, {"error": str(e)}
            check("CONNECT to a loopback target is refused: 403 with X-Kalmar-Error", code == 403 and "x-kalmar-error" in headers, f"status {code}, headers {headers}")
            time.sleep(0.5)  # let the access-log line reach stdout
            json_lines = 0
            for ln in list(out_lines):
                try:
                    json_lines += isinstance(json.loads(ln), dict)
                except ValueError:
                    pass
            check('access log: JSON lines on stdout (format "json", path "-")', json_lines > 0, f"{len(out_lines)} stdout lines, none JSON")

            # A ConfigMap update as the kubelet does it: a new timestamped
            # directory, then an atomic rename of the ..data symlink.
            before = reloads_ok(admin)
            stamp2 = os.path.join(etc, "..2024_01_01_00_01_00.000000002")
            os.makedirs(stamp2)
            with open(args.config, encoding="utf-8") as src, open(os.path.join(stamp2, "kalmar.toml"), "w", encoding="utf-8") as dst:
                dst.write(src.read() + "\n# updated by smoke_binary.py\n")
            os.symlink(os.path.basename(stamp2), os.path.join(etc, "..data_tmp"))
            os.rename(os.path.join(etc, "..data_tmp"), os.path.join(etc, "..data"))
            shutil.rmtree(stamp)
            deadline, after = time.monotonic() + 10, before
            while time.monotonic() < deadline and after <= before:
                time.sleep(0.25)
                after = reloads_ok(admin)
            check(
                f"ConfigMap update (..data symlink swap) hot-reloaded: {RELOADS_METRIC}{{result=\"ok\"}} {before:g} -> {after:g}",
                after > before,
                "no successful reload within 10s",
            )
        # Graceful stop, as the kubelet does it after preStop.
        started = time.monotonic()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=grace + 5)
            took = time.monotonic() - started
            check(f"SIGTERM: exits within shutdown_grace ({grace:g}s), in {took:.1f}s with exit code {code}", took <= grace + 1)
        except subprocess.TimeoutExpired:
            check(f"SIGTERM: exits within shutdown_grace ({grace:g}s)", False, f"still running after {grace + 5:g}s")
    finally:
        if proc and proc.poll() is None:
            proc.kill()
            proc.wait()
        if api is not None and api.thread.is_alive():
            api.__exit__(None, None, None)
        shutil.rmtree(tmp, ignore_errors=True)

    failed = sum(not ok for ok, _, _ in rows)
    for ok, name, detail in rows:
        print(f"[smoke {args.name}] {'PASS' if ok else 'FAIL'}  {name}" + ("" if ok or not detail else f"  <-- {detail}"))
    if failed:
        tail = "".join(err_lines[-15:])
        if tail:
            print(f"[smoke {args.name}] kalmar stderr (last lines):\n{tail}", end="" if tail.endswith("\n") else "\n")
    if args.tally:
        with open(args.tally, "a", encoding="utf-8") as f:
            f.write(f"{len(rows) - failed} {failed}\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
