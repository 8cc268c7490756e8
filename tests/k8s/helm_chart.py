#!/usr/bin/env python3
"""Checks charts/ferry with real Helm code (helm-sdkpy: Helm v4's Go library).

1. `helm lint` (helm-sdkpy's Lint): no warning or error; and lint does report an
   error for a copy of the chart with a broken template (so it really lints).
2. Renders the chart with Helm's own install action, against a recording fake API
   server (tests/k8s/fake_apiserver.py: helm-sdkpy has no `helm template`), with
   default values and the option combinations; Helm validates the values against
   values.schema.json on the way. Every rendered object, the `helm test` hook
   included, validates against the Kubernetes schemas exactly as the kustomize
   output does (crates/ferry-inject/tests/k8s/validate.py: strict, 1.29 and latest,
   the cert-manager / Prometheus Operator subsets, cross-object, PromQL, CEL checks).
3. The chart renders the same objects as the kustomizations (manifests/base,
   manifests/without-cert-manager, manifests/monitoring): same kinds, names and
   namespaces, and the same content once Helm's own labels are set aside, apart
   from the differences listed in KNOWN_DIFFERENCES.
4. The image is set in one place: with any image value, the webhook container,
   FERRY_SIDECAR_IMAGE and the image the test hook expects are all that value.
   `helm upgrade --reuse-values` that turns monitoring on (as the docs show) keeps
   the earlier values and adds the monitoring objects.
5. values.schema.json rejects bad values (Helm refuses to install), and the chart's
   kubeVersion refuses a cluster older than 1.29.
6. `helm package` makes an archive that holds manifests/monitoring's rules and
   dashboard as plain files (files/ links to them), and installing from the
   archive renders the same objects as from the directory.
7. With --serve: the `helm test` Pod's script, verbatim, runs against the webhook as
   a process (the ferry-inject `serve` example) with a certificate for the Service's
   DNS name; it passes when the webhook injects the release's image, and fails when
   the webhook injects another image.

Prints one line per check and a closing "N passed, N failed" line; exits 1 on failure.
"""

import argparse
import asyncio
import copy
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(REPO, "crates", "ferry-inject", "tests", "k8s"))

import helm_sdkpy  # noqa: E402
import validate  # noqa: E402  (the kustomize checks: schemas, cross-object, PromQL, CEL)
from fake_apiserver import FakeApiServer  # noqa: E402

CHART = os.path.join(REPO, "charts", "ferry")
NAMESPACE = "ferry-system"
RELEASE = "ferry"
DEFAULT_IMAGE = "ghcr.io/ferry-io/ferry:0.1.0"

# Labels only the chart sets (Helm's conventions); set aside when comparing with kustomize.
HELM_LABELS = ["app.kubernetes.io/instance", "app.kubernetes.io/managed-by",
               "app.kubernetes.io/version", "helm.sh/chart"]

# What differs on purpose between the chart and the kustomizations, as
# (kind, name, path) -> why. Anything else that differs fails the check.
KNOWN_DIFFERENCES = {
    ("Namespace", "ferry-system", ""):
        "the chart installs into the release namespace (helm install -n ferry-system "
        "--create-namespace) and does not own it; docs/KUBERNETES.md labels it for the "
        "restricted Pod Security Standard",
    ("Deployment", "ferry-inject", "spec.template.spec.containers[0].imagePullPolicy"):
        "values: image.pullPolicy",
}

# A CA certificate for the own-CA options (any valid PEM: it is only carried).
def make_ca(tmp):
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", os.path.join(tmp, "ca.key"), "-out", os.path.join(tmp, "ca.crt"),
                    "-days", "1", "-subj", "/CN=ferry-inject helm test CA",
                    "-addext", "basicConstraints=critical,CA:TRUE",
                    "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
                   check=True, capture_output=True)
    with open(os.path.join(tmp, "ca.crt"), encoding="ascii") as f:
        return f.read()


def scenarios(ca_pem):
    monitoring_on = {"podMonitor": {"enabled": True}, "prometheusRule": {"enabled": True},
                     "dashboard": {"enabled": True}}
    return {
        "defaults": None,
        "own CA (certManager.enabled=false, caBundle)": {"certManager": {"enabled": False}, "caBundle": ca_pem},
        "monitoring on": {"monitoring": monitoring_on},
        "own CA, monitoring on, own image, cluster label, 3 replicas": {
            "certManager": {"enabled": False}, "caBundle": ca_pem,
            "image": {"repository": "registry.example.com/mirror/ferry", "tag": "0.1.0-rc1"},
            "webhook": {"replicas": 3},
            "monitoring": {**copy.deepcopy(monitoring_on), "labels": {"release": "kube-prometheus-stack"},
                           "podMonitor": {"enabled": True, "cluster": "eu-west"}}},
        "image pinned by digest": {
            "image": {"repository": "registry.example.com/ferry", "digest": "sha256:" + "ab" * 32}},
    }


# Values that values.schema.json (or the chart) must refuse: (what, values, text the error must hold).
BAD_VALUES = [
    ("certManager.enabled=false without caBundle", {"certManager": {"enabled": False}}, "caBundle"),
    ("caBundle that is not a PEM certificate", {"certManager": {"enabled": False}, "caBundle": "bm90IGEgY2VydA=="}, "caBundle"),
    ("image.tag with a space", {"image": {"tag": "0.1 .0"}}, "tag"),
    ("image.digest that is not sha256:<hex>", {"image": {"digest": "latest"}}, "digest"),
    ("an unknown top-level key (typo)", {"imag": {"tag": "x"}}, "imag"),
    ("webhook.timeoutSeconds above 10", {"webhook": {"timeoutSeconds": 30}}, "timeoutSeconds"),
    ("webhook.replicas 0", {"webhook": {"replicas": 0}}, "replicas"),
    ("webhook.logLevel not a level", {"webhook": {"logLevel": "verbose"}}, "logLevel"),
]


class Rendered:
    def __init__(self, release, created):
        self.release = release
        self.docs = [d for d in yaml.safe_load_all(release["manifest"]) if d]
        self.hooks = [(h, [d for d in yaml.safe_load_all(h["manifest"]) if d]) for h in release.get("hooks") or []]
        self.created = created

    def all_docs(self):
        return self.docs + [d for _, ds in self.hooks for d in ds]


def helm_install(values, kube_version="1.31.0", crds=("cert-manager", "prometheus-operator"), chart=CHART):
    """Installs the chart with Helm's install action into a fake API server.
    Returns (Rendered, None) or (None, error text)."""
    with FakeApiServer(kube_version=kube_version, crds=crds) as api, tempfile.TemporaryDirectory() as tmp:
        kubeconfig = os.path.join(tmp, "kubeconfig")
        with open(kubeconfig, "w", encoding="utf-8") as f:
            f.write(api.kubeconfig)
        cfg = helm_sdkpy.Configuration(namespace=NAMESPACE, kubeconfig=kubeconfig)
        try:
            asyncio.run(helm_sdkpy.Install(cfg).run(RELEASE, chart, values=values, wait=False, timeout=60))
        except helm_sdkpy.HelmError as e:
            return None, str(e)
        release = api.store.release(RELEASE)
        if release is None:
            return None, "Helm reported success but stored no release record"
        return Rendered(release, api.store.created()), None


def helm_install_upgrade(install_values, upgrade_values):
    """Installs, then upgrades with --reuse-values (as docs/KUBERNETES.md does to turn
    monitoring on). Returns (revision 2 Rendered, revision 1 status) or (None, error)."""
    with FakeApiServer() as api, tempfile.TemporaryDirectory() as tmp:
        kubeconfig = os.path.join(tmp, "kubeconfig")
        with open(kubeconfig, "w", encoding="utf-8") as f:
            f.write(api.kubeconfig)
        cfg = helm_sdkpy.Configuration(namespace=NAMESPACE, kubeconfig=kubeconfig)
        try:
            asyncio.run(helm_sdkpy.Install(cfg).run(RELEASE, CHART, values=install_values, wait=False, timeout=60))
            asyncio.run(helm_sdkpy.Upgrade(cfg).run(RELEASE, CHART, values=upgrade_values, reuse_values=True,
                                                    wait=False, timeout=60, server_side_apply=False))
        except helm_sdkpy.HelmError as e:
            return None, str(e)
        second, first = api.store.release(RELEASE, 2), api.store.release(RELEASE, 1)
        if second is None or first is None:
            return None, "Helm reported success but did not store revisions 1 and 2"
        return Rendered(second, api.store.created()), first["info"]["status"]


def helm_lint(chart):
    cfg = helm_sdkpy.Configuration(namespace=NAMESPACE)
    return asyncio.run(helm_sdkpy.Lint(cfg).run(chart))


SEVERITY = {0: "UNKNOWN", 1: "INFO", 2: "WARNING", 3: "ERROR"}


def lint_summary(result):
    msgs = result.get("Messages") or []
    return [f"{SEVERITY.get(m.get('Severity'), m.get('Severity'))} {m.get('Path')}" for m in msgs]


def kustomize(kubectl, path):
    out = subprocess.run([kubectl, "kustomize", os.path.join(REPO, path)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {path}: {out.stderr.strip()}")
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def key(doc):
    return (doc["kind"], doc["metadata"]["name"], doc["metadata"].get("namespace", ""))


def normalize(doc):
    """The object as compared with kustomize: Helm's own labels set aside, the
    dashboard's JSON parsed, a caBundle reduced to whether it is there."""
    d = copy.deepcopy(doc)
    labels = d["metadata"].get("labels") or {}
    for k in HELM_LABELS:
        labels.pop(k, None)
    if d["kind"] == "ConfigMap":
        d["data"] = {k: json.loads(v) if k.endswith(".json") else v for k, v in (d.get("data") or {}).items()}
    if d["kind"] == "MutatingWebhookConfiguration":
        for wh in d["webhooks"]:
            if wh["clientConfig"].get("caBundle"):
                wh["clientConfig"]["caBundle"] = "<a caBundle>"
    return d


def diff(a, b, path=""):
    """Paths where a and b differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            p = f"{path}.{k}" if path else k
            if k not in a or k not in b:
                out.append(p)
            else:
                out += diff(a[k], b[k], p)
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        out = []
        for i, (x, y) in enumerate(zip(a, b)):
            out += diff(x, y, f"{path}[{i}]")
        return out
    return [] if a == b else [path]


def equivalence_problems(chart_docs, kustomize_docs, ignore_kinds=()):
    problems = []
    chart = {key(d): normalize(d) for d in chart_docs if d["kind"] not in ignore_kinds}
    kust = {key(d): normalize(d) for d in kustomize_docs if d["kind"] not in ignore_kinds}
    for k in sorted(set(kust) - set(chart)):
        if (k[0], k[1], "") not in KNOWN_DIFFERENCES:
            problems.append(f"kustomize renders {k[0]}/{k[1]} (namespace {k[2] or '-'}), the chart does not")
    for k in sorted(set(chart) - set(kust)):
        problems.append(f"the chart renders {k[0]}/{k[1]} (namespace {k[2] or '-'}), kustomize does not")
    for k in sorted(set(chart) & set(kust)):
        for p in diff(chart[k], kust[k]):
            if (k[0], k[1], p) not in KNOWN_DIFFERENCES:
                problems.append(f"{k[0]}/{k[1]}: {p} differs from kustomize")
    return problems


def images(docs):
    """Every image the rendered objects set, with where."""
    out = []
    for d in docs:
        spec = None
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            spec = d["spec"]["template"]["spec"]
        elif d["kind"] == "Pod":
            spec = d["spec"]
        if spec is None:
            continue
        for c in (spec.get("initContainers") or []) + (spec.get("containers") or []):
            out.append((f"{validate.object_name(d)} container {c['name']} image", c.get("image")))
            for e in c.get("env") or []:
                if e["name"] == "FERRY_SIDECAR_IMAGE":
                    out.append((f"{validate.object_name(d)} container {c['name']} env FERRY_SIDECAR_IMAGE", e.get("value")))
    return out


def expected_image(values):
    img = (values or {}).get("image") or {}
    repo = img.get("repository", "ghcr.io/ferry-io/ferry")
    if img.get("digest"):
        return f"{repo}@{img['digest']}"
    return f"{repo}:{img.get('tag') or '0.1.0'}"


def test_hook(rendered):
    for h, docs in rendered.hooks:
        if "test" in (h.get("events") or []) and docs and docs[0]["kind"] == "Pod":
            return docs[0]
    return None


# --- the helm test script against the webhook as a process ------------------------

def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def serving_cert(tmp, dns):
    """A CA and a serving certificate for the Service's DNS name and localhost,
    as cert-manager lays them out (tls.crt, tls.key, ca.crt)."""
    tls = os.path.join(tmp, "tls")
    os.makedirs(tls)
    run = lambda *a: subprocess.run(list(a), check=True, capture_output=True)  # noqa: E731
    run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{tmp}/ca.key", "-out", f"{tls}/ca.crt", "-days", "1", "-subj", "/CN=helm test CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run("openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{tls}/tls.key", "-out", f"{tmp}/leaf.csr", "-subj", f"/CN={dns}")
    with open(f"{tmp}/ext", "w", encoding="ascii") as f:
        f.write(f"subjectAltName=DNS:{dns},DNS:localhost\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n")
    run("openssl", "x509", "-req", "-in", f"{tmp}/leaf.csr", "-CA", f"{tls}/ca.crt", "-CAkey", f"{tmp}/ca.key",
        "-CAcreateserial", "-out", f"{tls}/tls.crt", "-days", "1", "-extfile", f"{tmp}/ext")
    return tls


def run_hook_against(serve, pod, sidecar_image):
    """Starts the webhook (serve example) injecting sidecar_image and runs the hook
    Pod's script as written, with its env, the URL pointed at the process (same
    host name, resolved to 127.0.0.1) and the CA file at the test's copy.
    Returns (exit code, output)."""
    c = pod["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in c.get("env") or []}
    url = env["FERRY_WEBHOOK_URL"]
    host = url.split("//", 1)[1].rsplit(":", 1)[0]
    with tempfile.TemporaryDirectory() as tmp:
        tls = serving_cert(tmp, host)
        port = free_port()
        log = open(os.path.join(tmp, "serve.log"), "w")
        proc = subprocess.Popen([serve, "--listen", f"127.0.0.1:{port}", "--tls-dir", tls,
                                 "--sidecar-image", sidecar_image], stdout=log, stderr=subprocess.STDOUT)
        try:
            for _ in range(100):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    time.sleep(0.1)
            # curl is the hook's curl; --connect-to sends the Service's host name to
            # the process, so the certificate is still checked against that name.
            shim = os.path.join(tmp, "bin")
            os.makedirs(shim)
            real_curl = shutil.which("curl")
            with open(os.path.join(shim, "curl"), "w", encoding="ascii") as f:
                f.write(f'#!/bin/sh\nexec {real_curl} --connect-to "{host}:443:127.0.0.1:{port}" "$@"\n')
            os.chmod(os.path.join(shim, "curl"), 0o755)
            run_env = {"PATH": f"{shim}:{os.environ['PATH']}", **env,
                       "FERRY_CA_FILE": os.path.join(tls, "ca.crt")}
            assert c["command"] == ["sh", "-c"], c["command"]
            out = subprocess.run(["sh", "-c", c["args"][0]], env=run_env, capture_output=True, text=True, timeout=60)
            return out.returncode, (out.stdout + out.stderr).strip()
        finally:
            proc.terminate()
            proc.wait(timeout=20)
            log.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kubectl", default="kubectl")
    ap.add_argument("--serve", help="the ferry-inject `serve` example binary (runs the helm test script)")
    args = ap.parse_args()
    report = validate.Report()
    metrics = validate.registered_metric_names(REPO)

    # 1. lint
    result = helm_lint(CHART)
    msgs = result.get("Messages") or []
    print(f"note helm lint {CHART}: {len(msgs)} message(s): {', '.join(lint_summary(result)) or 'none'}"
          " (helm-sdkpy returns each message's severity and path; its text is lost in its JSON)")
    report.check("helm lint charts/ferry: no warning or error",
                 [f"{s}" for s in lint_summary(result) if not s.startswith(("INFO", "UNKNOWN"))]
                 + [f"lint errors: {result.get('Errors')}"] * bool(result.get("Errors")))
    with tempfile.TemporaryDirectory() as tmp:
        broken = os.path.join(tmp, "ferry")
        shutil.copytree(CHART, broken, symlinks=False)
        with open(os.path.join(broken, "templates", "service.yaml"), "a", encoding="utf-8") as f:
            f.write("\n{{ .Values.name | nosuchfunction }}\n")
        bad = helm_lint(broken)
        report.check("helm lint reports an error for a copy with a broken template",
                     [] if any(m.get("Severity") == 3 for m in bad.get("Messages") or []) else
                     [f"lint said: {lint_summary(bad)}"])

    # 2.-4. render each option combination with Helm's install action
    kust = {p: kustomize(args.kubectl, p) for p in
            ("manifests/base", "manifests/without-cert-manager", "manifests/monitoring")}
    with tempfile.TemporaryDirectory() as tmp:
        ca_pem = make_ca(tmp)
    rendered = {}
    for name, values in scenarios(ca_pem).items():
        r, err = helm_install(values)
        report.check(f"helm install ({name}) renders", [err] if err else [])
        if r is None:
            continue
        rendered[name] = r
        for d in r.all_docs():
            report.check(f"chart ({name}): {validate.object_name(d)} schema", validate.schema_problems(d))
        report.check(f"chart ({name}): cross-object checks", validate.manifest_problems(r.docs, metrics))
        hook = test_hook(r)
        if hook is None:
            report.check(f"chart ({name}): a `helm test` hook Pod", ["no hook with the test event"])
        else:
            report.check(f"chart ({name}): the helm test Pod's pod rules",
                         validate.pod_spec_problems(hook["spec"], "helm test Pod"))
        want = expected_image(values)
        imgs = images(r.all_docs())
        report.check(f"chart ({name}): every image is {want} (set once, in values.image)",
                     ([] if len(imgs) >= 2 else [f"only {len(imgs)} image fields found"]) +
                     [f"{where}: {img}" for where, img in imgs
                      if img != want and not where.startswith("Pod/ferry-inject-test container check image")] +
                     ([f"helm test Pod expects {e['value']}" for e in hook["spec"]["containers"][0]["env"]
                       if hook and e["name"] == "FERRY_SIDECAR_IMAGE" and e["value"] != want] if hook else []))
        if want != DEFAULT_IMAGE:
            stray = [d for d in r.all_docs() if "ghcr.io/ferry-io/ferry" in json.dumps(d)]
            report.check(f"chart ({name}): the default image appears nowhere",
                         [validate.object_name(d) for d in stray])
        notes = (r.release.get("info") or {}).get("notes") or ""
        report.check(f"chart ({name}): NOTES.txt names the image and `helm test`",
                     [] if want in notes and f"helm test {RELEASE}" in notes else [f"notes: {notes!r}"])

    pairs = [("defaults", "manifests/base", [], ()),
             ("own CA (certManager.enabled=false, caBundle)", "manifests/without-cert-manager", [], ()),
             ("monitoring on", "manifests/monitoring", ["manifests/base"], ())]
    for name, kpath, plus, ignore in pairs:
        if name not in rendered:
            continue
        expected = list(kust[kpath]) + [d for p in plus for d in kust[p]]
        report.check(f"chart ({name}) renders the objects of {kpath}{' + ' + ', '.join(plus) if plus else ''}"
                     " (kinds, names, namespaces, content)",
                     equivalence_problems(rendered[name].docs, expected, ignore))
    # helm upgrade --reuse-values turning monitoring on, as docs/KUBERNETES.md shows
    monitoring_on = {"monitoring": {"podMonitor": {"enabled": True}, "prometheusRule": {"enabled": True},
                                    "dashboard": {"enabled": True}}}
    r, first = helm_install_upgrade({"certManager": {"enabled": False}, "caBundle": ca_pem}, monitoring_on)
    if r is None:
        report.check("helm upgrade --reuse-values (own CA, then monitoring on)", [first])
    else:
        for d in r.all_docs():
            report.check(f"chart (upgraded): {validate.object_name(d)} schema", validate.schema_problems(d))
        report.check("helm upgrade --reuse-values keeps the own CA and adds the monitoring objects: "
                     "the objects of manifests/without-cert-manager + manifests/monitoring",
                     equivalence_problems(r.docs, kust["manifests/without-cert-manager"] + kust["manifests/monitoring"]) +
                     ([] if first == "superseded" else [f"revision 1 is {first}, not superseded"]))

    if "defaults" in rendered:
        kinds = sorted({d["kind"] for d in rendered["defaults"].docs})
        report.check("defaults render no monitoring objects",
                     [k for k in kinds if k in ("PodMonitor", "PrometheusRule", "ConfigMap")])
    full = rendered.get("own CA, monitoring on, own image, cluster label, 3 replicas")
    if full:
        pm = [d for d in full.docs if d["kind"] == "PodMonitor"]
        problems = []
        if not pm or pm[0]["spec"]["podMetricsEndpoints"][0].get("relabelings") != [
                {"action": "replace", "targetLabel": "cluster", "replacement": "eu-west"}]:
            problems.append("the PodMonitor does not add cluster=eu-west")
        for d in full.docs:
            if d["kind"] in ("PodMonitor", "PrometheusRule") and d["metadata"]["labels"].get("release") != "kube-prometheus-stack":
                problems.append(f"{validate.object_name(d)} lacks monitoring.labels")
        dep = [d for d in full.docs if d["kind"] == "Deployment"][0]
        if dep["spec"]["replicas"] != 3:
            problems.append("webhook.replicas not applied")
        report.check("chart options: cluster label, monitoring.labels, webhook.replicas applied", problems)

    # 5. values the schema refuses, and a too-old cluster
    for what, values, word in BAD_VALUES:
        r, err = helm_install(values)
        report.check(f"helm install refuses {what}",
                     ["Helm installed it"] if r else
                 ([] if word in (err or "") and "schema" in (err or "") else
                  [f"not a values.schema.json error naming {word}: {err}"]))
    r, err = helm_install(None, kube_version="1.28.0")
    report.check("helm install refuses Kubernetes 1.28 (chart kubeVersion >=1.29)",
                 ["Helm installed it"] if r else ([] if "kubeVersion" in (err or "") else [err]))
    r, err = helm_install({"monitoring": {"podMonitor": {"enabled": True}}}, crds=("cert-manager",))
    report.check("helm install with monitoring on fails where the Prometheus Operator CRDs are absent",
                 ["Helm installed it"] if r else ([] if "PodMonitor" in (err or "") else [err]))

    # 6. helm package: the archive carries the linked files' contents
    with tempfile.TemporaryDirectory() as tmp:
        cfg = helm_sdkpy.Configuration(namespace=NAMESPACE)
        try:
            archive = asyncio.run(helm_sdkpy.Package(cfg).run(CHART, dest_dir=tmp))
        except helm_sdkpy.HelmError as e:
            archive, err = None, str(e)
        if archive is None:
            report.check("helm package charts/ferry", [err])
        else:
            import tarfile
            problems = []
            with tarfile.open(archive) as tar:
                for member, source in (("ferry/files/dashboard.json", "manifests/monitoring/dashboard.json"),
                                       ("ferry/files/prometheusrule.yaml", "manifests/monitoring/prometheusrule.yaml")):
                    try:
                        info = tar.getmember(member)
                    except KeyError:
                        problems.append(f"{member} is not in the archive")
                        continue
                    with open(os.path.join(REPO, source), "rb") as f:
                        if not info.isfile() or tar.extractfile(info).read() != f.read():
                            problems.append(f"{member} in the archive is not {source}")
            report.check(f"helm package: {os.path.basename(archive)} holds the rules and dashboard as files", problems)
            values = {"monitoring": {"podMonitor": {"enabled": True}, "prometheusRule": {"enabled": True},
                                     "dashboard": {"enabled": True}}}
            r, err = helm_install(values, chart=archive)
            if r is None:
                report.check("helm install from the packaged archive", [err])
            elif "monitoring on" in rendered:
                report.check("helm install from the packaged archive renders what the directory renders",
                             equivalence_problems(r.docs, rendered["monitoring on"].docs))

    # 7. the helm test script against the webhook process
    if args.serve and "defaults" in rendered:
        hook = test_hook(rendered["defaults"])
        want = expected_image(None)
        rc, out = run_hook_against(args.serve, hook, want)
        report.check(f"helm test script passes against the webhook process injecting {want}",
                     [] if rc == 0 and out.count("ok   ") == 2 else [f"exit {rc}: {out}"])
        rc, out = run_hook_against(args.serve, hook, "registry.example.com/other/ferry:9")
        report.check("helm test script fails against a webhook injecting another image",
                     [] if rc != 0 and "does not inject" in out else [f"exit {rc}: {out}"])
    elif not args.serve:
        print("note --serve not given: the helm test script was not run")

    print(f"{report.passed} passed, {report.failed} failed")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
