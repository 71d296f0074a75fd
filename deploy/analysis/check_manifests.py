#!/usr/bin/env python3
"""Static checks of the rendered manifests and the Dockerfile.

The properties the issue asks of the deployment that a schema cannot see:
names of the seed's policies, the AND form of every cross-namespace peer, one
list of internal CIDRs, the Deployment's rollout, probes, drain time and
securityContext, the directory mount of the config, the Services, the
upstream environment of the kaapana overlay, the example client's NO_PROXY,
and the Dockerfile's shape (hadolint checks its style separately).

    check_manifests.py --variant base=RENDERED.yaml --variant kaapana=RENDERED.yaml \
        --client CLIENT.yaml --dockerfile docker/Dockerfile \
        [--config-out DIR] [--tally FILE]

--config-out writes each variant's ConfigMap kalmar.toml to DIR/<variant>.toml
and the kaapana overlay's upstream environment (names from the Deployment,
sample values) to DIR/<variant>.env, for `kalmar check-config` in the caller.
Prints a PASS/FAIL table; exit status 1 on any failure.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import sys
import tomllib

import yaml

SEED_POLICIES = [
    "deny-all-traffic",
    "allow-kube-dns",
    "allow-external-ips",
    "allow-access-to-squid-proxy",
    "allow-access-to-ctp",
    "allow-ingress-from-traefik",
    "allow-opensearch-egress",
    "allow-keycloak-and-aii-egress",
    "egress-for-processing-containers",
]
PROCESSING_LABEL = {"base": ("pod-type", "processing-container"), "kaapana": ("kaapana.ai/type", "processing-container")}
KALMAR_NS = {"base": "kalmar", "kaapana": "admin"}
PROXY_SERVICE = {"base": "kalmar", "kaapana": "squid-proxy-service"}
# kube-apiserver's port as the CNI sees it (kubeadm 6443, microk8s 16443).
API_PORT = {"base": 6443, "kaapana": 16443}
CONFIG_PATH = "/etc/kalmar/kalmar.toml"
# Sample values for the kaapana overlay's upstream variables, keyed by the
# proxy.env key the Deployment reads them from.
UPSTREAM_SAMPLES = {
    "http_proxy": "http://proxy.example.org:8080",
    "https_proxy": "http://proxy.example.org:8080",
    "no_proxy": ".example.org,10.0.0.0/8",
}


class Report:
    def __init__(self) -> None:
        self.rows: list[tuple[bool, str, str, str]] = []

    def check(self, scope: str, name: str, ok: bool, detail: str = "") -> bool:
        self.rows.append((bool(ok), scope, name, detail))
        return bool(ok)

    def print(self) -> tuple[int, int]:
        w = max(len(s) for _, s, _, _ in self.rows)
        for ok, scope, name, detail in self.rows:
            line = f"[manifests] {'PASS' if ok else 'FAIL'}  {scope:<{w}}  {name}"
            if detail and not ok:
                line += f"  <-- {detail}"
            print(line)
        passed = sum(ok for ok, *_ in self.rows)
        return passed, len(self.rows) - passed


def load(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d]


def find(docs, kind, name=None, namespace=None):
    return [
        d
        for d in docs
        if d.get("kind") == kind
        and (name is None or d["metadata"].get("name") == name)
        and (namespace is None or d["metadata"].get("namespace") == namespace)
    ]


def one(docs, kind, name=None, namespace=None):
    found = find(docs, kind, name, namespace)
    return found[0] if len(found) == 1 else None


def parse_duration_s(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    total, pos = 0.0, 0
    for m in re.finditer(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h)", text):
        total += float(m.group(1)) * units[m.group(2)]
        pos = m.end()
    if pos == 0:
        raise ValueError(f"cannot parse duration {text!r}")
    return total


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in (selector or {}).items())


# === per variant ============================================================


def check_variant(r: Report, variant: str, docs: list[dict], config_out: str | None) -> None:
    S = variant
    ns = KALMAR_NS[variant]

    # --- the seed's project policies
    netpols = find(docs, "NetworkPolicy")
    project = [p for p in netpols if p["metadata"]["name"] in SEED_POLICIES]
    names = sorted(p["metadata"]["name"] for p in project)
    r.check(S, "all nine seed NetworkPolicies rendered, each once", names == sorted(SEED_POLICIES), f"got {names}")
    r.check(
        S,
        "seed policies live in one namespace that is not Kalmar's",
        len({p["metadata"].get("namespace") for p in project}) == 1
        and project
        and project[0]["metadata"].get("namespace") not in (None, ns),
    )
    deny_all = next((p for p in project if p["metadata"]["name"] == "deny-all-traffic"), None)
    r.check(
        S,
        "deny-all-traffic selects every pod and denies both directions",
        deny_all is not None
        and deny_all["spec"].get("podSelector") == {}
        and sorted(deny_all["spec"].get("policyTypes", [])) == ["Egress", "Ingress"]
        and not deny_all["spec"].get("ingress")
        and not deny_all["spec"].get("egress"),
    )
    r.check(S, "every NetworkPolicy states its policyTypes", all(p["spec"].get("policyTypes") for p in netpols))

    # AND form: a podSelector peer always carries its namespaceSelector.
    or_form = []
    for p in netpols:
        for direction, key in (("ingress", "from"), ("egress", "to")):
            for i, rule in enumerate(p["spec"].get(direction) or []):
                for peer in rule.get(key) or []:
                    if "podSelector" in peer and "namespaceSelector" not in peer:
                        or_form.append(f"{p['metadata']['name']}.{direction}[{i}]")
    r.check(S, "AND form: every podSelector peer has a namespaceSelector in the same item", not or_form, ", ".join(or_form))

    key, value = PROCESSING_LABEL[variant]
    pc = next((p for p in project if p["metadata"]["name"] == "egress-for-processing-containers"), None)
    r.check(
        S,
        f"processing containers selected by {key}: {value}",
        pc is not None and pc["spec"]["podSelector"] == {"matchLabels": {key: value}},
        pc and str(pc["spec"]["podSelector"]),
    )

    # --- Kalmar's objects
    dep = one(docs, "Deployment", "kalmar", ns)
    if not r.check(S, f"Deployment kalmar in namespace {ns}", dep is not None):
        return
    spec, pod = dep["spec"], dep["spec"]["template"]["spec"]
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    c = next((c for c in pod["containers"] if c["name"] == "kalmar"), None)
    if not r.check(S, "container kalmar", c is not None):
        return
    r.check(S, "2 replicas", spec.get("replicas") == 2)
    ru = (spec.get("strategy") or {}).get("rollingUpdate") or {}
    r.check(S, "rolling update with maxUnavailable 0", spec.get("strategy", {}).get("type") == "RollingUpdate" and ru.get("maxUnavailable") == 0)
    pref = ((pod.get("affinity") or {}).get("podAntiAffinity") or {}).get("preferredDuringSchedulingIgnoredDuringExecution") or []
    r.check(
        S,
        "preferred pod anti-affinity across nodes",
        any(
            t["podAffinityTerm"].get("topologyKey") == "kubernetes.io/hostname"
            and selects(t["podAffinityTerm"]["labelSelector"].get("matchLabels"), pod_labels)
            for t in pref
        ),
    )
    res = c.get("resources") or {}
    r.check(
        S,
        "cpu and memory requests and limits",
        all(k in (res.get(kind) or {}) for kind in ("requests", "limits") for k in ("cpu", "memory")),
    )
    r.check(S, "enableServiceLinks false (no KALMAR_* service variables)", pod.get("enableServiceLinks") is False)
    r.check(S, f"args --config {CONFIG_PATH}", c.get("args") == ["--config", CONFIG_PATH], str(c.get("args")))
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    r.check(S, "container ports proxy 3128 and admin 9090", ports.get("proxy") == 3128 and ports.get("admin") == 9090, str(ports))

    def probe(kind, path):
        pr = c.get(kind) or {}
        g = pr.get("httpGet") or {}
        return g.get("path") == path and g.get("port") in ("admin", 9090)

    r.check(S, "readiness probe GET /readyz on the admin port", probe("readinessProbe", "/readyz"))
    r.check(S, "liveness probe GET /healthz on the admin port", probe("livenessProbe", "/healthz"))

    psc, csc = pod.get("securityContext") or {}, c.get("securityContext") or {}
    run_as = csc.get("runAsUser", psc.get("runAsUser"))
    r.check(S, "runAsNonRoot with a numeric non-zero user", (psc.get("runAsNonRoot") or csc.get("runAsNonRoot")) is True and isinstance(run_as, int) and run_as > 0)
    r.check(S, "readOnlyRootFilesystem", csc.get("readOnlyRootFilesystem") is True)
    r.check(S, "allowPrivilegeEscalation false", csc.get("allowPrivilegeEscalation") is False)
    r.check(S, "all capabilities dropped", (csc.get("capabilities") or {}).get("drop") == ["ALL"])
    seccomp = (csc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
    r.check(S, "seccomp RuntimeDefault", seccomp == "RuntimeDefault")
    sa_name = pod.get("serviceAccountName")
    sa = one(docs, "ServiceAccount", sa_name, ns)
    r.check(
        S,
        "own ServiceAccount: no token by default, mounted only in Kalmar's pod (pod identity)",
        sa is not None and sa.get("automountServiceAccountToken") is False and pod.get("automountServiceAccountToken") is True,
    )
    # RBAC: exactly get/list/watch on pods, namespaces, nodes, bound to that account only.
    bindings = [
        b
        for b in find(docs, "ClusterRoleBinding") + find(docs, "RoleBinding")
        if any(x.get("kind") == "ServiceAccount" and x.get("name") == sa_name and x.get("namespace", b["metadata"].get("namespace")) == ns for x in b.get("subjects", []))
    ]
    roles = [one(docs, b["roleRef"]["kind"], b["roleRef"]["name"], None if b["roleRef"]["kind"] == "ClusterRole" else ns) for b in bindings]
    rules = [rule for role in roles if role for rule in role.get("rules", [])]
    granted = {(g, res, verb) for rule in rules for g in rule.get("apiGroups", []) for res in rule.get("resources", []) for verb in rule.get("verbs", [])}
    wanted = {("", res, verb) for res in ("pods", "namespaces", "nodes") for verb in ("get", "list", "watch")}
    r.check(
        S,
        f"RBAC: one ClusterRoleBinding to {sa_name} in {ns}; get/list/watch on pods, namespaces, nodes and nothing else",
        len(bindings) == 1 and bindings[0]["kind"] == "ClusterRoleBinding" and all(roles) and granted == wanted and not any(rule.get("resourceNames") or rule.get("nonResourceURLs") for rule in rules),
        f"bindings {[b['metadata']['name'] for b in bindings]}, granted {sorted(granted)}",
    )

    # Config: a directory mount of the ConfigMap, never subPath.
    mounts = [m for m in c.get("volumeMounts", []) if m.get("mountPath") == os.path.dirname(CONFIG_PATH)]
    vol = None
    if len(mounts) == 1:
        vol = next((v for v in pod.get("volumes", []) if v["name"] == mounts[0]["name"]), None)
    cm_name = vol and (vol.get("configMap") or {}).get("name")
    r.check(
        S,
        "ConfigMap mounted as the directory /etc/kalmar (no subPath anywhere)",
        cm_name is not None and not any("subPath" in m or "subPathExpr" in m for m in c.get("volumeMounts", [])),
    )
    cm = one(docs, "ConfigMap", cm_name, ns) if cm_name else None
    toml_text = (cm or {}).get("data", {}).get("kalmar.toml")
    if not r.check(S, "the mounted ConfigMap carries kalmar.toml", toml_text is not None):
        return
    try:
        cfg = tomllib.loads(toml_text)
        toml_ok = True
    except tomllib.TOMLDecodeError as e:
        cfg, toml_ok = {}, False
        r.check(S, "kalmar.toml is TOML", False, str(e))
    if toml_ok:
        r.check(S, "kalmar.toml is TOML", True)
    server = cfg.get("server", {})
    r.check(S, "config listens on 0.0.0.0:3128 and admin 0.0.0.0:9090", server.get("listen") == "0.0.0.0:3128" and server.get("admin_listen") == "0.0.0.0:9090", str(server))
    grace = parse_duration_s(server.get("shutdown_grace", "30s"))
    pre_stop = (((c.get("lifecycle") or {}).get("preStop") or {}).get("sleep") or {}).get("seconds", 0)
    tgps = pod.get("terminationGracePeriodSeconds", 30)
    r.check(S, f"terminationGracePeriodSeconds ({tgps}) > preStop ({pre_stop}s) + shutdown_grace ({grace:g}s)", tgps > pre_stop + grace)

    # Services.
    svc = one(docs, "Service", PROXY_SERVICE[variant], ns)
    r.check(
        S,
        f"Service {PROXY_SERVICE[variant]} in {ns}: port 3128 to Kalmar's pods",
        svc is not None
        and selects(svc["spec"].get("selector"), pod_labels)
        and svc["spec"].get("selector")
        and [(p["port"], p.get("targetPort")) for p in svc["spec"]["ports"]] in ([(3128, "proxy")], [(3128, 3128)]),
    )
    metrics = [
        s
        for s in find(docs, "Service", namespace=ns)
        if s["spec"].get("selector") and selects(s["spec"]["selector"], pod_labels) and any(p["port"] == 9090 for p in s["spec"]["ports"])
    ]
    ann = metrics[0]["metadata"].get("annotations", {}) if len(metrics) == 1 else {}
    r.check(
        S,
        "metrics Service on 9090 with Prometheus scrape annotations",
        ann.get("prometheus.io/scrape") == "true" and ann.get("prometheus.io/port") == "9090" and ann.get("prometheus.io/path") == "/metrics",
    )
    r.check(S, "the proxy Service does not expose the admin port", svc is not None and all(p["port"] != 9090 for p in svc["spec"]["ports"]))
    pdb = [p for p in find(docs, "PodDisruptionBudget", namespace=ns) if selects(p["spec"]["selector"].get("matchLabels"), pod_labels)]
    r.check(S, "PodDisruptionBudget over Kalmar's pods", len(pdb) == 1)
    hpa = [h for h in find(docs, "HorizontalPodAutoscaler", namespace=ns) if h["spec"]["scaleTargetRef"].get("name") == "kalmar"]
    r.check(
        S,
        "HorizontalPodAutoscaler on CPU, minReplicas >= 2",
        len(hpa) == 1
        and hpa[0]["spec"].get("minReplicas", 1) >= 2
        and any(m.get("resource", {}).get("name") == "cpu" for m in hpa[0]["spec"].get("metrics", [])),
    )

    # Kalmar's NetworkPolicy and the single list of internal CIDRs.
    own = [p for p in netpols if p["metadata"].get("namespace") == ns and selects(p["spec"]["podSelector"].get("matchLabels"), pod_labels) and p["spec"]["podSelector"].get("matchLabels")]
    r.check(S, "Kalmar's own NetworkPolicy (ingress and egress)", len(own) == 1 and sorted(own[0]["spec"]["policyTypes"]) == ["Egress", "Ingress"])

    def excepts(policy):
        out = []
        for rule in (policy or {}).get("spec", {}).get("egress") or []:
            for peer in rule.get("to") or []:
                b = peer.get("ipBlock")
                if b and b.get("cidr") == "0.0.0.0/0":
                    out.append(sorted(b.get("except", [])))
        return out

    ext = next((p for p in project if p["metadata"]["name"] == "allow-external-ips"), None)
    own_ex, ext_ex = excepts(own[0] if own else None), excepts(ext)
    r.check(S, "one internal-CIDR list: Kalmar's egress except == allow-external-ips except", len(own_ex) == 1 and own_ex == ext_ex, f"{own_ex} vs {ext_ex}")
    cluster = (cfg.get("destinations") or {}).get("cluster_cidrs") or []
    internal = [ipaddress.ip_network(x) for x in (ext_ex[0] if ext_ex else [])]
    uncovered = [x for x in cluster if not any(ipaddress.ip_network(x).subnet_of(n) for n in internal if n.version == ipaddress.ip_network(x).version)]
    r.check(S, "config cluster_cidrs lie inside the NetworkPolicy's internal CIDRs", cluster and not uncovered, f"not covered: {uncovered}")
    kube = cfg.get("kubernetes") or {}
    r.check(
        S,
        "config: [kubernetes] on, pod_cidrs = the pod CIDR (first cluster_cidr)",
        kube.get("enabled") is True and bool(cluster) and kube.get("pod_cidrs") == [cluster[0]],
        str(kube),
    )
    pod_net = ipaddress.ip_network(cluster[0]) if cluster else None
    broad = [
        c
        for entry in cfg.get("sources", [])
        for c in ([entry["cidr"]] if "cidr" in entry else []) + entry.get("cidrs", [])
        if pod_net and ipaddress.ip_network(c).version == pod_net.version and ipaddress.ip_network(c).overlaps(pod_net) and ipaddress.ip_network(c).prefixlen < pod_net.max_prefixlen
    ]
    r.check(S, "config: no static source labels a range of the pod CIDR (labels come from each pod)", not broad, f"sources over the pod CIDR: {broad}")
    api_port = API_PORT[variant]
    api_rules = [
        rule
        for rule in (own[0] if own else {}).get("spec", {}).get("egress") or []
        if [(p.get("protocol", "TCP"), p.get("port")) for p in rule.get("ports", [])] == [("TCP", api_port)]
    ]
    api_peers = [peer.get("ipBlock", {}).get("cidr") for rule in api_rules for peer in rule.get("to") or []]
    r.check(
        S,
        f"Kalmar's egress to the API server: TCP {api_port}, private addresses only",
        len(api_rules) == 1 and api_peers and all(c and ipaddress.ip_network(c).is_private for c in api_peers) and all("except" not in (peer.get("ipBlock") or {}) for rule in api_rules for peer in rule.get("to") or []),
        str(api_peers),
    )

    # kaapana: the institution's proxy settings as optional Secret-backed env.
    env_lines = []
    if variant == "kaapana":
        env = [e for e in c.get("env", []) if e["name"].startswith("KALMAR_UPSTREAM__")]
        refs = [(e["name"], (e.get("valueFrom") or {}).get("secretKeyRef") or {}) for e in env]
        secrets = {s["metadata"]["name"] for s in find(docs, "Secret", namespace=ns)}
        keys = sorted(ref.get("key") for _, ref in refs)
        r.check(
            S,
            "upstream env from the institution Secret (http_proxy, https_proxy, no_proxy; optional)",
            keys == ["http_proxy", "https_proxy", "no_proxy"] and all(ref.get("name") in secrets and ref.get("optional") is True for _, ref in refs),
            str(refs),
        )
        env_lines = [f"{name}={UPSTREAM_SAMPLES[ref['key']]}" for name, ref in refs if ref.get("key") in UPSTREAM_SAMPLES]

    if config_out:
        os.makedirs(config_out, exist_ok=True)
        with open(os.path.join(config_out, f"{variant}.toml"), "w", encoding="utf-8") as f:
            f.write(toml_text)
        with open(os.path.join(config_out, f"{variant}.env"), "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in env_lines))


# === example client and Dockerfile ==========================================


def check_client(r: Report, docs: list[dict], base_docs: list[dict]) -> None:
    S = "client"
    dep = one(docs, "Deployment")
    if not r.check(S, "one example client Deployment", dep is not None):
        return
    labels = dep["spec"]["template"]["metadata"]["labels"]
    r.check(S, 'pod labelled network-access-external-ips: "true"', labels.get("network-access-external-ips") == "true")
    env = {e["name"]: e.get("value", "") for c in dep["spec"]["template"]["spec"]["containers"] for e in c.get("env", [])}
    url = "http://kalmar.kalmar.svc.cluster.local:3128"
    r.check(S, "HTTP(S)_PROXY in both spellings name Kalmar's Service", all(env.get(k) == url for k in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy")))
    cm = one(base_docs, "ConfigMap", "kalmar-config", "kalmar")
    cluster = tomllib.loads(cm["data"]["kalmar.toml"]).get("destinations", {}).get("cluster_cidrs", []) if cm else []
    need = ["localhost", "127.0.0.1", ".svc", ".cluster.local", *cluster]
    for k in ("NO_PROXY", "no_proxy"):
        have = [x.strip() for x in env.get(k, "").split(",")]
        missing = [n for n in need if n not in have]
        r.check(
            S,
            f"{k} has loopback, .svc, .cluster.local and the pod/service CIDRs",
            bool(cluster) and not missing,
            f"missing {missing}" if cluster else "no base render to read the cluster CIDRs from",
        )


def check_dockerfile(r: Report, path: str) -> None:
    S = "Dockerfile"
    with open(path, encoding="utf-8") as f:
        text = f.read()
    lines = [ln.strip() for ln in re.sub(r"\\\n", " ", text).splitlines() if ln.strip() and not ln.strip().startswith("#")]
    froms = [ln for ln in lines if ln.upper().startswith("FROM ")]
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", "\n".join(lines), re.M))

    def image(line):
        ref = line.split()[1]
        return re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), ref)

    r.check(S, "multi-stage: build stage from the official rust image", len(froms) >= 2 and image(froms[0]).startswith("rust:"), str([image(x) for x in froms]))
    runtime = image(froms[-1]) if froms else ""
    r.check(S, "runtime stage distroless or scratch", runtime.startswith("gcr.io/distroless/") or runtime == "scratch", runtime)
    users = [ln.split()[1] for ln in lines if ln.upper().startswith("USER ")]
    r.check(S, "USER numeric and not root", bool(users) and re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]) is not None, str(users))
    expose = sorted(p for ln in lines if ln.upper().startswith("EXPOSE ") for p in ln.split()[1:])
    r.check(S, "EXPOSE 3128 9090", expose == ["3128", "9090"], str(expose))
    r.check(S, "default config copied to /etc/kalmar/kalmar.toml", any(re.match(r"COPY\s+config/kalmar\.toml\s+/etc/kalmar/kalmar\.toml$", ln) for ln in lines))
    ep = [ln for ln in lines if ln.upper().startswith("ENTRYPOINT ")]
    r.check(S, "ENTRYPOINT in exec form (no shell at runtime)", bool(ep) and ep[-1].split(None, 1)[1].startswith("["))
    cmd = [ln for ln in lines if ln.upper().startswith("CMD ")]
    r.check(S, f"CMD --config {CONFIG_PATH}", bool(cmd) and yaml.safe_load(cmd[-1].split(None, 1)[1]) == ["--config", CONFIG_PATH])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", action="append", required=True, help="NAME=RENDERED.yaml (NAME: base or kaapana)")
    ap.add_argument("--client", required=True)
    ap.add_argument("--dockerfile", required=True)
    ap.add_argument("--config-out")
    ap.add_argument("--tally")
    args = ap.parse_args()

    r = Report()
    rendered = {}
    for item in args.variant:
        name, _, path = item.partition("=")
        if name not in KALMAR_NS:
            ap.error(f"unknown variant {name!r}")
        rendered[name] = load(path)
        check_variant(r, name, rendered[name], args.config_out)
    check_client(r, load(args.client), rendered.get("base", []))
    check_dockerfile(r, args.dockerfile)

    passed, failed = r.print()
    print(f"[manifests] static checks: {passed} PASS / {failed} FAIL")
    if args.tally:
        with open(args.tally, "a", encoding="utf-8") as f:
            f.write(f"{passed} {failed}\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
