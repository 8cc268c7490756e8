"""A minimal in-memory Kubernetes API server, enough for Helm's install action.

helm-sdkpy (Helm v4's Go library) has no `helm template`: it renders a chart only
on install. This server answers what Helm asks during an install (version,
discovery of the API groups the chart uses, the release Secret, GET/POST of each
object) and keeps every object Helm creates, so the test reads back exactly what
Helm rendered and the release record Helm stored (with the `helm test` hook).
It admits everything: it is a recorder, not a validator (validation is the
test's job, against the Kubernetes schemas).
"""

import base64
import gzip
import http.server
import json
import re
import threading
import time
import urllib.parse

# (group, version) -> [(resource, kind, namespaced)]
RESOURCES = {
    ("", "v1"): [("namespaces", "Namespace", False), ("secrets", "Secret", True),
                 ("configmaps", "ConfigMap", True), ("services", "Service", True),
                 ("serviceaccounts", "ServiceAccount", True), ("pods", "Pod", True)],
    ("apps", "v1"): [("deployments", "Deployment", True)],
    ("policy", "v1"): [("poddisruptionbudgets", "PodDisruptionBudget", True)],
    ("admissionregistration.k8s.io", "v1"): [
        ("mutatingwebhookconfigurations", "MutatingWebhookConfiguration", False)],
}
# Custom resources the chart may create, served only when their CRDs are "installed".
CRDS = {
    "cert-manager": {("cert-manager.io", "v1"): [("issuers", "Issuer", True),
                                                 ("certificates", "Certificate", True)]},
    "prometheus-operator": {("monitoring.coreos.com", "v1"): [("podmonitors", "PodMonitor", True),
                                                              ("prometheusrules", "PrometheusRule", True)]},
}
VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]


class Store:
    def __init__(self, crds=("cert-manager", "prometheus-operator"), kube_version="1.31.0"):
        self.groups = {k: list(v) for k, v in RESOURCES.items()}
        for c in crds:
            self.groups.update(CRDS[c])
        self.kube_version = kube_version
        self.objects = {}  # (group, resource, namespace, name) -> object
        self.requests = []
        self.patches = []
        self.lock = threading.Lock()
        self.rv = 1

    def resource(self, group, version, resource):
        for r, kind, namespaced in self.groups.get((group, version), []):
            if r == resource:
                return kind, namespaced
        return None

    def created(self):
        """Objects Helm created (besides its release Secrets), in creation order."""
        return [o for k, o in self.objects.items()
                if not (k[1] == "secrets" and k[3].startswith("sh.helm.release."))]

    def release(self, name, revision=1):
        """The release record Helm stored: a dict with manifest, hooks, config, ..."""
        for (g, res, ns, n), o in self.objects.items():
            if res == "secrets" and n == f"sh.helm.release.v1.{name}.v{revision}":
                raw = base64.b64decode(o["data"]["release"])
                raw = base64.b64decode(raw)
                if raw[:2] == b"\x1f\x8b":
                    raw = gzip.decompress(raw)
                return json.loads(raw)
        return None


PATH = re.compile(r"^/(?:api/(?P<cv>v1)|apis/(?P<g>[^/]+)/(?P<v>[^/]+))"
                  r"(?:/namespaces/(?P<ns>[^/]+))?/(?P<res>[^/]+)(?:/(?P<name>[^/]+))?(?:/(?P<sub>[^/]+))?$")


def _fields(buf):
    """The (field number, value) pairs of a protobuf message (varints and bytes only)."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i:i + n], i + n
        else:
            raise ValueError(f"protobuf wire type {wire} not supported by this recorder")
        yield field, value


def _varint(buf, i):
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


def secret_from_protobuf(raw):
    """A Secret sent as Kubernetes protobuf (how client-go's typed client, and so
    Helm's release storage, writes Secrets), as the JSON object it stands for."""
    if raw[:4] != b"k8s\x00":
        raise ValueError("protobuf body without the k8s envelope")
    unknown = dict(_fields(raw[4:]))
    type_meta = dict(_fields(unknown[1]))
    if type_meta.get(2) != b"Secret":
        raise ValueError(f"protobuf {type_meta.get(2)!r}: only Secrets are decoded by this recorder")
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"labels": {}}, "data": {}}
    for field, value in _fields(unknown[2]):
        if field == 1:  # ObjectMeta
            for mf, mv in _fields(value):
                if mf in (1, 3):
                    secret["metadata"]["name" if mf == 1 else "namespace"] = mv.decode()
                elif mf == 11:  # labels: map entry {1: key, 2: value}
                    e = dict(_fields(mv))
                    secret["metadata"]["labels"][e[1].decode()] = e.get(2, b"").decode()
                elif mf == 6 and mv:  # resourceVersion
                    secret["metadata"]["resourceVersion"] = mv.decode()
        elif field == 2:  # data: map<string, bytes>
            e = dict(_fields(value))
            secret["data"][e[1].decode()] = base64.b64encode(e.get(2, b"")).decode()
        elif field == 3:
            secret["type"] = value.decode()
    return secret


def status(code, reason, message):
    return code, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                  "message": message, "reason": reason, "code": code}


def make_handler(store):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def send(self, code, body):
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def body(self):
            n = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(n) if n else b""
            ctype = self.headers.get("Content-Type", "")
            if raw and ctype.startswith("application/vnd.kubernetes.protobuf"):
                return secret_from_protobuf(raw)
            if raw and "json" not in ctype:
                raise ValueError(f"unsupported Content-Type {ctype!r}")
            return json.loads(raw) if raw else None

        def handle_any(self):
            url = urllib.parse.urlsplit(self.path)
            with store.lock:
                store.requests.append((self.command, url.path))
            try:
                code, body = self.route(self.command, url.path, urllib.parse.parse_qs(url.query))
            except ValueError as e:
                code, body = status(415, "UnsupportedMediaType", str(e))
            self.send(code, body)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = handle_any

        def route(self, method, path, query):
            if path == "/version":
                major, minor, _ = store.kube_version.split(".")
                return 200, {"major": major, "minor": minor, "gitVersion": "v" + store.kube_version,
                             "platform": "linux/amd64", "goVersion": "go1.23"}
            if path == "/api":
                return 200, {"kind": "APIVersions", "versions": ["v1"],
                             "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]}
            if path == "/apis":
                groups = {}
                for g, v in store.groups:
                    if g:
                        groups.setdefault(g, []).append(v)
                return 200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
                    {"name": g, "versions": [{"groupVersion": f"{g}/{v}", "version": v} for v in vs],
                     "preferredVersion": {"groupVersion": f"{g}/{vs[0]}", "version": vs[0]}}
                    for g, vs in groups.items()]}
            m = re.match(r"^/(?:api/(v1)|apis/([^/]+)/([^/]+))$", path)
            if m:
                g, v = ("", "v1") if m.group(1) else (m.group(2), m.group(3))
                if (g, v) not in store.groups:
                    return status(404, "NotFound", f"the server could not find {path}")
                return 200, {"kind": "APIResourceList", "apiVersion": "v1",
                             "groupVersion": f"{g}/{v}" if g else v, "resources": [
                                 {"name": r, "singularName": kind.lower(), "namespaced": ns, "kind": kind, "verbs": VERBS}
                                 for r, kind, ns in store.groups[(g, v)]]}
            m = PATH.match(path)
            if not m:
                return status(404, "NotFound", f"the server could not find {path}")
            g, v = ("", "v1") if m.group("cv") else (m.group("g"), m.group("v"))
            res, ns, name = m.group("res"), m.group("ns"), m.group("name")
            info = store.resource(g, v, res)
            if info is None:
                return status(404, "NotFound", f"the server could not find the requested resource {path}")
            kind, namespaced = info
            key = (g, res, ns or "", name)
            with store.lock:
                if method == "GET" and name is None:
                    sel = (query.get("labelSelector") or [""])[0]
                    want = dict(p.split("=", 1) for p in sel.split(",") if "=" in p)
                    items = [o for (og, ores, ons, _), o in store.objects.items()
                             if og == g and ores == res and (ns is None or ons == ns)
                             and all((o["metadata"].get("labels") or {}).get(k) == val for k, val in want.items())]
                    return 200, {"kind": kind + "List", "apiVersion": f"{g}/{v}" if g else v,
                                 "metadata": {"resourceVersion": str(store.rv)}, "items": items}
                if method == "GET":
                    if key in store.objects:
                        return 200, store.objects[key]
                    return status(404, "NotFound", f'{res} "{name}" not found')
                if method == "POST" and name is None:
                    o = self.body()
                    key = (g, res, ns or "", o["metadata"]["name"])
                    if key in store.objects:
                        return status(409, "AlreadyExists", f'{res} "{o["metadata"]["name"]}" already exists')
                    store.rv += 1
                    o["metadata"].update({"resourceVersion": str(store.rv), "uid": f"00000000-0000-4000-8000-{store.rv:012d}",
                                          "creationTimestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
                    if namespaced:
                        o["metadata"]["namespace"] = ns
                    store.objects[key] = o
                    return 201, o
                if method == "PUT":
                    o = self.body()
                    store.rv += 1
                    o["metadata"]["resourceVersion"] = str(store.rv)
                    store.objects[key] = o
                    return 200, o
                if method == "PATCH":
                    # Helm's upgrade patches objects that exist; the recorder keeps
                    # what Helm sent and answers with the object as it stands (the
                    # release record, not these objects, is what the test reads).
                    self.body_raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                    if key not in store.objects:
                        return status(404, "NotFound", f'{res} "{name}" not found')
                    store.patches.append((key, self.headers.get("Content-Type"), self.body_raw))
                    return 200, store.objects[key]
                if method == "DELETE":
                    o = store.objects.pop(key, None)
                    return (200, o) if o else status(404, "NotFound", f'{res} "{name}" not found')
            return status(405, "MethodNotAllowed", f"{method} {path} is not served by this recorder")

    return Handler


class FakeApiServer:
    """Start with `with FakeApiServer(...) as api:`; api.kubeconfig is a kubeconfig YAML."""

    def __init__(self, **store_args):
        self.store = Store(**store_args)
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), make_handler(self.store))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.kubeconfig = json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": "fake"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
        })

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
