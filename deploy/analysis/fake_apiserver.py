#!/usr/bin/env python3
"""A minimal loopback Kubernetes API for the deploy checks (stdlib only).

Serves the objects it is given (pods, namespaces, nodes) the way kube-apiserver
does for the calls Kalmar makes with `[kubernetes] enabled = true`: lists with
metadata.resourceVersion and `fieldSelector` (metadata.name, metadata.namespace,
status.podIP), GET of one object (404 Status when absent), and `watch=1`
streams that send a BOOKMARK every second until the client goes away. Nothing
changes while it runs: the checks ask what the shipped config decides for a
labelled and an unlabelled pod, with the real binary and a real API client.

    with FakeApiServer(objects) as api:
        env["KUBECONFIG"] = api.kubeconfig(tmpdir)
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PLURALS = {"pods": "Pod", "namespaces": "Namespace", "nodes": "Node"}
RESOURCE_VERSION = "1000"


def pod(namespace: str, name: str, ip: str, labels: dict[str, str]) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{namespace}-{name}",
                     "resourceVersion": RESOURCE_VERSION, "labels": labels},
        "spec": {"serviceAccountName": "default", "nodeName": "node-1"},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
    }


def namespace(name: str, labels: dict[str, str] | None = None) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "uid": f"uid-ns-{name}", "resourceVersion": RESOURCE_VERSION,
                     "labels": {"kubernetes.io/metadata.name": name, **(labels or {})}},
    }


class FakeApiServer:
    def __init__(self, objects: list[dict]):
        self.objects = objects
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def send_json(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):  # noqa: N802
                url = urllib.parse.urlsplit(self.path)
                q = dict(urllib.parse.parse_qsl(url.query))
                parts = url.path.strip("/").split("/")
                ns = None
                if parts[:3] == ["api", "v1", "namespaces"] and len(parts) >= 5 and parts[4] == "pods":
                    ns, parts = parts[3], ["api", "v1", "pods"] + parts[5:]
                if parts[:2] != ["api", "v1"] or len(parts) < 3 or parts[2] not in PLURALS:
                    return self.send_json(404, status(404, "NotFound", url.path))
                kind = PLURALS[parts[2]]
                items = [o for o in server.objects if o["kind"] == kind]
                if ns is not None:
                    items = [o for o in items if o["metadata"].get("namespace") == ns]
                if len(parts) == 4:
                    found = [o for o in items if o["metadata"]["name"] == parts[3]]
                    if not found:
                        return self.send_json(404, status(404, "NotFound", f'{parts[2]} "{parts[3]}" not found'))
                    return self.send_json(200, found[0])
                for sel in filter(None, q.get("fieldSelector", "").split(",")):
                    path, _, want = sel.partition("=")
                    items = [o for o in items if lookup(o, path) == want.lstrip("=")]
                if q.get("watch") in ("1", "true"):
                    return self.watch(kind)
                self.send_json(200, {"apiVersion": "v1", "kind": f"{kind}List",
                                     "metadata": {"resourceVersion": RESOURCE_VERSION}, "items": items})

            def watch(self, kind: str) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                deadline = time.monotonic() + 300
                try:
                    while time.monotonic() < deadline and not server.stopping.is_set():
                        line = json.dumps({"type": "BOOKMARK", "object": {
                            "kind": kind, "apiVersion": "v1",
                            "metadata": {"resourceVersion": RESOURCE_VERSION}}}).encode() + b"\n"
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                        self.wfile.flush()
                        server.stopping.wait(1)
                    self.wfile.write(b"0\r\n\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.stopping = threading.Event()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "FakeApiServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def kubeconfig(self, directory: str) -> str:
        path = os.path.join(directory, "kubeconfig")
        with open(path, "w", encoding="utf-8") as f:
            f.write(
                "apiVersion: v1\nkind: Config\n"
                f"clusters:\n- name: fake\n  cluster:\n    server: {self.url}\n"
                "contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n"
                "current-context: fake\nusers:\n- name: fake\n  user: {}\n"
            )
        return path


def lookup(obj: dict, path: str) -> str:
    cur: object = obj
    for key in path.split("."):
        cur = cur.get(key, {}) if isinstance(cur, dict) else {}
    return cur if isinstance(cur, str) else ""


def status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}
