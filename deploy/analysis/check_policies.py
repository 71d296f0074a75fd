#!/usr/bin/env python3
"""Prove the project's NetworkPolicy table with IBM's network-config-analyzer.

Runs `nca --connectivity` over the rendered manifests (NetworkPolicies and
Kalmar's Deployment) plus the example namespaces and pods in fixtures.yaml,
parses its per-connection output (`-o txt_no_fw_rules`), and checks every
expectation below: for each policy the connection it exists for is allowed,
and its near misses (wrong label, wrong port, wrong namespace, wrong pod) are
denied.

    check_policies.py --nca PATH --variant base|kaapana|kaapana-parent-proxy \
        --rendered RENDERED.yaml [--fixtures fixtures.yaml] [--tally FILE] \
        [--mutate-or-form]

--mutate-or-form rewrites every AND peer (namespaceSelector and podSelector in
one item) into the OR form (two items) before the analysis and then expects
the table to FAIL: evidence that the near-miss rows can catch the classic
mistake. Prints a PASS/FAIL table; exit status 1 on any failure. --tally
appends "<passed> <failed>" to FILE for the caller's summary.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))

# === expectations ===========================================================

PROJECT = "project-admin"  # the project namespace the analysis renders into


@dataclass(frozen=True)
class Variant:
    name: str
    kalmar_ns: str  # where Kalmar's Deployment runs
    processing: str  # fixture pod carrying this variant's processing label
    processing_other: str  # fixture pod carrying the other variant's label
    platform_clients: bool  # whole platform namespaces may use the proxy
    prometheus_any_ns: bool  # metrics port open to a prometheus-labelled pod anywhere
    parent_proxy: bool  # the parent-proxy component is enabled


VARIANTS = {
    "base": Variant("base", "kalmar", "processing-seed", "processing-kaapana", False, True, False),
    "kaapana": Variant("kaapana", "admin", "processing-kaapana", "processing-seed", True, False, False),
    "kaapana-parent-proxy": Variant(
        "kaapana-parent-proxy", "admin", "processing-kaapana", "processing-seed", True, False, True
    ),
}


@dataclass(frozen=True)
class Expect:
    policy: str  # the policy (or property) the row is about
    src: str  # "ns/pod", "@kalmar" (Kalmar's Deployment) or "ip:A.B.C.D"
    dst: str
    proto: str
    port: int
    allowed: bool
    why: str


def expectations(v: Variant) -> list[Expect]:
    P = PROJECT
    K = "@kalmar"
    rows: list[Expect] = []

    def allow(policy, src, dst, proto, port, why):
        rows.append(Expect(policy, src, dst, proto, port, True, why))

    def deny(policy, src, dst, proto, port, why):
        rows.append(Expect(policy, src, dst, proto, port, False, why))

    # deny-all-traffic: nothing in or out unless allowed below.
    pol = "deny-all-traffic"
    deny(pol, f"{P}/unlabelled", "services/services-app", "TCP", 80, "egress to a platform pod")
    deny(pol, f"{P}/unlabelled", f"{P}/external-ips", "TCP", 80, "within the project namespace")
    deny(pol, "default/outsider", f"{P}/unlabelled", "TCP", 80, "ingress from another namespace")
    deny(pol, "services/services-app", f"{P}/external-ips", "TCP", 8080, "ingress from a platform pod")

    # allow-kube-dns
    pol = "allow-kube-dns"
    allow(pol, f"{P}/unlabelled", "kube-system/kube-dns", "UDP", 53, "DNS over UDP")
    allow(pol, f"{P}/unlabelled", "kube-system/kube-dns", "TCP", 53, "DNS over TCP")
    deny(pol, f"{P}/unlabelled", "kube-system/kube-dns", "TCP", 80, "wrong port")
    deny(pol, f"{P}/unlabelled", "kube-system/metrics-server", "UDP", 53, "wrong pod in kube-system")
    deny(pol, f"{P}/unlabelled", "default/fake-dns", "UDP", 53, "kube-dns label, wrong namespace")

    # allow-external-ips: the internet, minus the internal CIDRs.
    pol = "allow-external-ips"
    allow(pol, f"{P}/external-ips", "ip:8.8.8.8", "TCP", 443, "internet")
    allow(pol, f"{P}/external-ips", "ip:203.0.113.7", "TCP", 8443, "internet, any port")
    for ip, what in (
        ("10.1.2.3", "10/8"),
        ("172.16.0.1", "172.16/12"),
        ("192.168.1.1", "192.168/16"),
        ("100.64.0.1", "CGNAT 100.64/10"),
        ("169.254.169.254", "link-local / cloud metadata"),
        ("127.0.0.1", "loopback"),
    ):
        deny(pol, f"{P}/external-ips", f"ip:{ip}", "TCP", 443, f"internal CIDR {what}")
    deny(pol, f"{P}/external-ips-false", "ip:8.8.8.8", "TCP", 443, 'wrong label value "false"')

    # A pod without network-access-external-ips reaches neither the internet nor the proxy.
    pol = "no-label-no-egress"
    deny(pol, f"{P}/unlabelled", "ip:8.8.8.8", "TCP", 443, "internet (HTTPS)")
    deny(pol, f"{P}/unlabelled", "ip:8.8.8.8", "TCP", 80, "internet (HTTP)")
    deny(pol, f"{P}/unlabelled", K, "TCP", 3128, "the proxy")
    deny(pol, f"{P}/{v.processing}", "ip:8.8.8.8", "TCP", 443, "processing container: internet")
    deny(pol, f"{P}/{v.processing}", K, "TCP", 3128, "processing container: the proxy")
    deny(pol, f"{P}/ctp-client", K, "TCP", 3128, "other access label: the proxy")

    # allow-access-to-squid-proxy: now Kalmar, proxy port only.
    pol = "allow-access-to-squid-proxy"
    allow(pol, f"{P}/external-ips", K, "TCP", 3128, "proxy port")
    deny(pol, f"{P}/external-ips", K, "TCP", 9090, "wrong port (admin: metrics, POST /reload)")
    deny(pol, f"{P}/external-ips-false", K, "TCP", 3128, 'wrong label value "false"')
    deny(pol, f"{P}/external-ips", "default/kalmar-impostor", "TCP", 3128, "Kalmar's labels, wrong namespace")
    neighbour = "kalmar/kalmar-neighbour" if v.kalmar_ns == "kalmar" else f"{v.kalmar_ns}/admin-app"
    deny(pol, f"{P}/external-ips", neighbour, "TCP", 3128, "other pod in Kalmar's namespace")

    # allow-access-to-ctp
    pol = "allow-access-to-ctp"
    allow(pol, f"{P}/ctp-client", "services/ctp", "TCP", 11112, "CTP (DICOM)")
    deny(pol, f"{P}/unlabelled", "services/ctp", "TCP", 11112, "wrong label")
    deny(pol, f"{P}/ctp-client", "admin/ctp-in-admin", "TCP", 11112, "ctp label, wrong namespace")
    deny(pol, f"{P}/ctp-client", "services/opensearch", "TCP", 9200, "wrong pod in services")

    # allow-ingress-from-traefik
    pol = "allow-ingress-from-traefik"
    allow(pol, "admin/traefik", f"{P}/unlabelled", "TCP", 8080, "Traefik to any project pod")
    allow(pol, "admin/traefik", f"{P}/{v.processing}", "TCP", 5000, "Traefik to any project pod")
    deny(pol, "services/traefik-in-services", f"{P}/unlabelled", "TCP", 8080, "traefik label, wrong namespace")
    deny(pol, "admin/admin-app", f"{P}/unlabelled", "TCP", 8080, "wrong pod in admin")

    # allow-opensearch-egress
    pol = "allow-opensearch-egress"
    allow(pol, f"{P}/opensearch-job", "services/opensearch", "TCP", 9200, "OpenSearch REST")
    deny(pol, f"{P}/opensearch-job", "services/opensearch", "TCP", 9300, "wrong port (transport)")
    deny(pol, f"{P}/unlabelled", "services/opensearch", "TCP", 9200, "wrong label")
    deny(pol, f"{P}/opensearch-job", "admin/opensearch-in-admin", "TCP", 9200, "opensearch label, wrong namespace")

    # allow-keycloak-and-aii-egress
    pol = "allow-keycloak-and-aii-egress"
    allow(pol, f"{P}/create-project-user", "admin/keycloak", "TCP", 8443, "keycloak HTTPS")
    allow(pol, f"{P}/create-project-user", "services/access-information-interface", "TCP", 8080, "AII")
    deny(pol, f"{P}/create-project-user", "admin/keycloak", "TCP", 8080, "wrong port (AII's port on keycloak)")
    deny(pol, f"{P}/create-project-user", "services/access-information-interface", "TCP", 8443, "wrong port (keycloak's port on AII)")
    deny(pol, f"{P}/create-project-user", "services/keycloak-in-services", "TCP", 8443, "keycloak label, wrong namespace")
    deny(pol, f"{P}/create-other-user", "admin/keycloak", "TCP", 8443, "wrong label (another Job)")

    # egress-for-processing-containers
    pol = "egress-for-processing-containers"
    pc = f"{P}/{v.processing}"
    for dst, port, what in (
        ("admin/keycloak", 8443, "keycloak HTTPS"),
        ("admin/keycloak", 8080, "keycloak HTTP"),
        ("services/opensearch", 9200, "opensearch"),
        ("services/dicom-web-filter", 8080, "dicom-web-filter"),
        ("services/minio", 9000, "minio"),
        ("services/kaapana-backend", 5000, "kaapana-backend"),
    ):
        allow(pol, pc, dst, "TCP", port, what)
    deny(pol, pc, "services/minio", "TCP", 9090, "wrong port (minio console)")
    deny(pol, pc, "services/kaapana-backend", "TCP", 8080, "wrong port")
    deny(pol, pc, "services/keycloak-in-services", "TCP", 8443, "keycloak label, wrong namespace")
    deny(pol, pc, "services/ctp", "TCP", 11112, "service not in the list")
    deny(pol, f"{P}/{v.processing_other}", "admin/keycloak", "TCP", 8443, "the other variant's label")

    # Kalmar's own NetworkPolicy.
    pol = "kalmar (own policy)"
    allow(pol, K, "ip:8.8.8.8", "TCP", 443, "egress to the internet")
    allow(pol, K, "ip:203.0.113.7", "TCP", 80, "egress to the internet, HTTP")
    allow(pol, K, "kube-system/kube-dns", "UDP", 53, "DNS")
    deny(pol, K, "kube-system/metrics-server", "UDP", 53, "DNS port, wrong pod")
    deny(pol, K, "ip:10.1.2.3", "TCP", 443, "internal CIDR")
    deny(pol, K, "ip:169.254.169.254", "TCP", 80, "cloud metadata")
    deny(pol, K, "services/minio", "TCP", 9000, "cluster pods")
    deny(pol, K, f"{P}/external-ips", "TCP", 8080, "project pods")
    allow(pol, "default/outsider-external-ips", K, "TCP", 3128, "labelled pod in any namespace")
    deny(pol, "default/outsider-external-ips", K, "TCP", 9090, "labelled pod, admin port")
    deny(pol, "default/outsider", K, "TCP", 3128, "unlabelled pod outside the platform")
    allow(pol, "monitoring/prometheus", K, "TCP", 9090, "Prometheus scrapes /metrics")
    deny(pol, "monitoring/prometheus", K, "TCP", 8080, "Prometheus, wrong port")
    deny(pol, "monitoring/grafana", K, "TCP", 9090, "wrong pod in monitoring")
    if v.prometheus_any_ns:
        allow(pol, "default/prometheus-elsewhere", K, "TCP", 9090, "prometheus label in any namespace (base)")
        allow(pol, "monitoring/prometheus-generic", K, "TCP", 9090, "app.kubernetes.io/name: prometheus (base)")
    else:
        deny(pol, "default/prometheus-elsewhere", K, "TCP", 9090, "Kaapana's Prometheus label, wrong namespace")
        deny(pol, "monitoring/prometheus-generic", K, "TCP", 9090, "generic prometheus label (kaapana needs app-name)")
    if v.platform_clients:
        allow(pol, "services/services-app", K, "TCP", 3128, "platform namespace `services` uses the proxy")
        allow(pol, "admin/admin-app", K, "TCP", 3128, "platform namespace `admin` uses the proxy")
        deny(pol, "services/services-app", K, "TCP", 9090, "platform pod, admin port")
    else:
        deny(pol, "services/services-app", K, "TCP", 3128, "unlabelled platform pod (base)")

    # The API server for pod identity: its port on a private address, nothing else.
    pol = "kalmar: API server egress"
    api_port = 6443 if v.name == "base" else 16443
    other_port = 16443 if v.name == "base" else 6443
    allow(pol, K, "ip:10.0.0.5", "TCP", api_port, "control-plane endpoint (10/8)")
    allow(pol, K, "ip:192.168.1.20", "TCP", api_port, "control-plane endpoint (192.168/16)")
    deny(pol, K, "ip:10.0.0.5", "TCP", other_port, "the other distribution's API port")
    deny(pol, K, "ip:10.0.0.5", "TCP", 22, "control-plane address, another port")
    deny(pol, f"{P}/external-ips", "ip:10.0.0.5", "TCP", api_port, "project pods do not reach the API")

    # The institution's parent proxy (an internal address).
    pol = "parent-proxy component"
    if v.parent_proxy:
        allow(pol, K, "ip:10.10.0.10", "TCP", 8080, "parent proxy address and port")
        deny(pol, K, "ip:10.10.0.10", "TCP", 22, "parent proxy address, wrong port")
        deny(pol, K, "ip:10.10.0.11", "TCP", 8080, "next address")
        deny(pol, f"{P}/external-ips", "ip:10.10.0.10", "TCP", 8080, "project pods still cannot")
    else:
        deny(pol, K, "ip:10.10.0.10", "TCP", 8080, "not enabled: internal address stays closed")
    return rows


# === nca output =============================================================

LINE = re.compile(r"^(?P<src>\S+) => (?P<dst>\S+) : (?P<conn>.+)$")
GROUP = re.compile(r"\{protocols:(?P<protos>[A-Za-z0-9, ]+?)(?:,dst_ports:(?P<ports>[0-9,\-]+))?\}")


class NcaParseError(Exception):
    pass


@dataclass
class Conn:
    """The connections nca reports between two endpoints."""

    all: bool
    sets: list[tuple[frozenset[str], list[tuple[int, int]] | None]]

    def allows(self, proto: str, port: int) -> bool:
        if self.all:
            return True
        for protos, ranges in self.sets:
            if proto in protos and (ranges is None or any(lo <= port <= hi for lo, hi in ranges)):
                return True
        return False


def parse_conn(text: str) -> Conn:
    text = text.strip()
    if text == "All connections":
        return Conn(True, [])
    sets = []
    pos = 0
    for m in GROUP.finditer(text):
        between = text[pos : m.start()].strip(" ,;")
        if between:
            raise NcaParseError(f"unexpected text {between!r} in {text!r}")
        protos = frozenset(p.strip().upper() for p in m.group("protos").split(",") if p.strip())
        ranges = None
        if m.group("ports"):
            ranges = []
            for part in m.group("ports").split(","):
                lo, _, hi = part.partition("-")
                ranges.append((int(lo), int(hi or lo)))
        sets.append((protos, ranges))
        pos = m.end()
    if not sets or text[pos:].strip(" ,;"):
        raise NcaParseError(f"cannot parse nca connection set {text!r}")
    return Conn(False, sets)


def parse_ip_endpoint(name: str):
    """nca prints IP peers as ranges ("A-B") or CIDRs; returns (lo, hi) or None."""
    try:
        if "-" in name:
            lo, hi = name.split("-", 1)
            return ipaddress.ip_address(lo), ipaddress.ip_address(hi)
        net = ipaddress.ip_network(name, strict=False)
        return net[0], net[-1]
    except ValueError:
        return None


class Connectivity:
    def __init__(self, text: str):
        self.pairs: dict[tuple[str, str], Conn] = {}
        self.ip_pairs: list[tuple[str, object, object, Conn, str]] = []  # (src, lo, hi, conn, dst_text)
        self.ip_src_pairs: list[tuple[object, object, str, Conn]] = []
        self.endpoints: set[str] = set()
        for raw in text.splitlines():
            m = LINE.match(raw.strip())
            if not m:
                continue
            src, dst, conn = m.group("src"), m.group("dst"), parse_conn(m.group("conn"))
            dst_ip, src_ip = parse_ip_endpoint(dst), parse_ip_endpoint(src)
            if dst_ip:
                self.ip_pairs.append((src, dst_ip[0], dst_ip[1], conn, dst))
                self.endpoints.add(src)
            elif src_ip:
                self.ip_src_pairs.append((src_ip[0], src_ip[1], dst, conn))
                self.endpoints.add(dst)
            else:
                self.pairs[(src, dst)] = conn
                self.endpoints.update((src, dst))
        if not self.endpoints:
            raise NcaParseError("nca reported no connections at all")

    def allows(self, src: str, dst: str, proto: str, port: int) -> bool:
        if dst.startswith("ip:"):
            ip = ipaddress.ip_address(dst[3:])
            return any(s == src and lo <= ip <= hi and c.allows(proto, port) for s, lo, hi, c, _ in self.ip_pairs)
        if src.startswith("ip:"):
            ip = ipaddress.ip_address(src[3:])
            return any(d == dst and lo <= ip <= hi and c.allows(proto, port) for lo, hi, d, c in self.ip_src_pairs)
        conn = self.pairs.get((src, dst))
        return conn is not None and conn.allows(proto, port)


# === inputs =================================================================


def load_docs(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d]


def split_and_peers(docs: list[dict]) -> int:
    """Mutation: rewrite each AND peer into two OR peers. Returns how many."""
    n = 0
    for d in docs:
        if d.get("kind") != "NetworkPolicy":
            continue
        spec = d.get("spec", {})
        for direction, key in (("ingress", "from"), ("egress", "to")):
            for rule in spec.get(direction) or []:
                peers = rule.get(key)
                if not peers:
                    continue
                out = []
                for p in peers:
                    if "namespaceSelector" in p and "podSelector" in p:
                        out.append({"namespaceSelector": p["namespaceSelector"]})
                        out.append({"podSelector": p["podSelector"]})
                        n += 1
                    else:
                        out.append(p)
                rule[key] = out
    return n


def endpoint_name(e: str, kalmar_ns: str) -> str:
    if e == "@kalmar":
        return f"{kalmar_ns}/kalmar[Deployment]"
    if e.startswith("ip:"):
        return e
    return f"{e}[Pod]"


def run_nca(nca: str, fixtures: str, rendered: str, workdir: str) -> str:
    out = os.path.join(workdir, "connectivity.txt")
    cmd = [
        nca,
        "--connectivity",
        "--resource_list", fixtures,
        "--resource_list", rendered,
        "--output_format", "txt_no_fw_rules",
        "--file_out", out,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 or not os.path.exists(out):
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"nca failed (exit {proc.returncode}): {' '.join(cmd)}")
    with open(out, encoding="utf-8") as f:
        return f.read()


# === main ===================================================================


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nca", default="nca")
    ap.add_argument("--variant", choices=sorted(VARIANTS), required=True)
    ap.add_argument("--rendered", required=True, help="kustomize output to analyse")
    ap.add_argument("--fixtures", default=os.path.join(HERE, "fixtures.yaml"))
    ap.add_argument("--tally", help="append '<passed> <failed>' to this file")
    ap.add_argument("--mutate-or-form", action="store_true")
    ap.add_argument("--keep", help="copy nca's raw output here")
    args = ap.parse_args()
    v = VARIANTS[args.variant]
    label = v.name + (" OR-mutant" if args.mutate_or_form else "")

    with tempfile.TemporaryDirectory(prefix="kalmar-nca-") as tmp:
        rendered = args.rendered
        if args.mutate_or_form:
            docs = load_docs(rendered)
            n = split_and_peers(docs)
            rendered = os.path.join(tmp, "mutant.yaml")
            with open(rendered, "w", encoding="utf-8") as f:
                yaml.safe_dump_all(docs, f, sort_keys=False)
            print(f"[{label}] split {n} AND peers into OR peers")
        text = run_nca(args.nca, args.fixtures, rendered, tmp)
        if args.keep:
            with open(args.keep, "w", encoding="utf-8") as f:
                f.write(text)
    conn = Connectivity(text)

    # Every endpoint an expectation names must exist in nca's model, else a
    # typo would read as "denied" and pass silently.
    rows = expectations(v)
    unknown = sorted(
        {
            endpoint_name(e, v.kalmar_ns)
            for r in rows
            for e in (r.src, r.dst)
            if not e.startswith("ip:") and endpoint_name(e, v.kalmar_ns) not in conn.endpoints
        }
    )
    if unknown:
        print(f"[{label}] FAIL endpoints unknown to nca: {', '.join(unknown)}")
        if args.tally:
            with open(args.tally, "a", encoding="utf-8") as f:
                f.write("0 1\n")
        return 1

    failures = 0
    results = []
    for r in rows:
        got = conn.allows(endpoint_name(r.src, v.kalmar_ns), endpoint_name(r.dst, v.kalmar_ns), r.proto, r.port)
        ok = got == r.allowed
        failures += not ok
        results.append((ok, r, got))

    if args.mutate_or_form:
        # The mutant must break the table; report that as one check.
        flipped = [r for ok, r, _ in results if not ok]
        caught = len(flipped) > 0
        print(f"[{label}] {'PASS' if caught else 'FAIL'}  OR-form mutant detected by {len(flipped)} near-miss rows")
        for r in flipped[:8]:
            print(f"           e.g. {r.policy}: {r.src} -> {r.dst} {r.proto}/{r.port} ({r.why}) became allowed")
        if args.tally:
            with open(args.tally, "a", encoding="utf-8") as f:
                f.write(f"{int(caught)} {int(not caught)}\n")
        return 0 if caught else 1

    w_pol = max(len(r.policy) for r in rows)
    print(f"[{label}] {'':4}  {'policy':<{w_pol}}  {'expect':<7}  connection")
    for ok, r, got in results:
        print(
            f"[{label}] {'PASS' if ok else 'FAIL'}  {r.policy:<{w_pol}}  "
            f"{'allowed' if r.allowed else 'denied':<7}  {r.src} -> {r.dst} {r.proto}/{r.port}  ({r.why})"
            + ("" if ok else f"  <-- nca says {'allowed' if got else 'denied'}")
        )
    passed = len(rows) - failures
    print(f"[{label}] policy table: {passed} PASS / {failures} FAIL")
    if args.tally:
        with open(args.tally, "a", encoding="utf-8") as f:
            f.write(f"{passed} {failures}\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
