#!/usr/bin/env python3
"""What the cluster's kalmar.toml decides, asked of the built binary.

    check_acl.py --kalmar BIN --config RENDERED_KALMAR.toml --name base [--tally FILE]

The NetworkPolicies decide who reaches the proxy; the ConfigMap's kalmar.toml
decides where those clients may go. This runs `kalmar explain` (no traffic,
IP literals only, so no DNS either) for a pod of the cluster's pod CIDR and
for a client outside it, and checks the verdicts the deploy README promises:
pods reach public addresses; nothing reaches the pod or service CIDRs or the
internal ranges; a client in no source entry is refused; CONNECT keeps to the
default port 443. The pod and service CIDRs are read from the config's
[destinations].cluster_cidrs (first: pods, second: services).

With [kubernetes] enabled, explain asks the API who a client is: a loopback
API (fake_apiserver.py) serves a pod labelled network-access-external-ips:
"true", an unlabelled neighbour, and nothing at a third pod-CIDR address; only
the labelled pod may go out.
Prints one PASS/FAIL row per case; exit status 1 on any failure.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import subprocess
import sys
import tempfile
import tomllib

from fake_apiserver import FakeApiServer, namespace, pod as pod_object

VERDICT = re.compile(r"^verdict\s+(\w+)", re.M)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kalmar", required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--name", default="config")
    ap.add_argument("--tally")
    args = ap.parse_args()

    with open(args.config, "rb") as f:
        cfg = tomllib.load(f)
    cluster = [ipaddress.ip_network(c) for c in (cfg.get("destinations") or {}).get("cluster_cidrs", [])]
    rows: list[tuple[bool, str, str]] = []
    if len(cluster) < 2:
        rows.append((False, "config names the pod and service CIDRs in [destinations].cluster_cidrs", str(cluster)))
    else:
        pods, services = cluster[0], cluster[1]
        pod, other_pod, service = str(pods[5]), str(pods[9]), str(services[1])
        unlabelled, no_pod = str(pods[7]), str(pods[11])
        public = "93.184.215.14"  # any public address; explain sends nothing
        cases = [
            (pod, f"{public}:443", "allow", "pod -> public address, CONNECT :443"),
            (pod, f"http://{public}/", "allow", "pod -> public address, plain HTTP"),
            (pod, f"{public}:8443", "deny", "pod -> public address, CONNECT to a non-default port"),
            (pod, f"{service}:443", "deny", f"pod -> service CIDR ({services})"),
            (pod, f"{other_pod}:443", "deny", f"pod -> pod CIDR ({pods})"),
            (pod, "10.10.0.10:443", "deny", "pod -> internal range (10/8)"),
            (pod, "http://169.254.169.254/", "deny", "pod -> cloud metadata address"),
            (pod, "127.0.0.1:443", "deny", "pod -> loopback"),
            ("192.168.1.10", f"{public}:443", "deny", "client outside the pod CIDR (a node) -> refused"),
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("KALMAR_")}
        kube = (cfg.get("kubernetes") or {}).get("enabled") is True
        api = None
        if kube:
            cases += [
                (unlabelled, f"{public}:443", "deny", "unlabelled pod -> public address (403 denied)"),
                (unlabelled, f"http://{public}/", "deny", "unlabelled pod -> public address, plain HTTP"),
                (no_pod, f"{public}:443", "deny", "pod-CIDR address no pod owns -> refused"),
            ]
            api = FakeApiServer([
                namespace("project-x"),
                pod_object("project-x", "labelled", pod, {"network-access-external-ips": "true"}),
                pod_object("project-x", "unlabelled", unlabelled, {"app": "worker"}),
            ]).__enter__()
            tmp = tempfile.mkdtemp()
            env["KUBECONFIG"] = api.kubeconfig(tmp)
            rows.append((True, "[kubernetes] enabled: clients identified through a loopback API", ""))
        for src, target, want, what in cases:
            proc = subprocess.run(
                [args.kalmar, "--config", args.config, "explain", "--from", src, target],
                capture_output=True,
                text=True,
                env=env,
                timeout=60,
            )
            m = VERDICT.search(proc.stdout)
            got = m.group(1) if m else None
            detail = f"got {got!r} (exit {proc.returncode}): {(proc.stdout + proc.stderr).strip()[-300:]!r}"
            ok = got == want and (not kube or "kubernetes lookup failed" not in proc.stdout)
            if kube and src in (pod, unlabelled):
                # Identified as its pod, and the unlabelled one denied by the rules (403
                # `denied`), not as an unknown source.
                name = "labelled" if src == pod else "unlabelled"
                ok = ok and f"pod          project-x/{name}" in proc.stdout and "unknown-source" not in proc.stdout
            rows.append((ok, f"{want:<5}  {what}  [explain --from {src} {target}]", detail))
        if api is not None:
            api.__exit__(None, None, None)

    failed = sum(not ok for ok, _, _ in rows)
    for ok, name, detail in rows:
        print(f"[acl {args.name}] {'PASS' if ok else 'FAIL'}  {name}" + ("" if ok else f"  <-- {detail}"))
    if args.tally:
        with open(args.tally, "a", encoding="utf-8") as f:
            f.write(f"{len(rows) - failed} {failed}\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
