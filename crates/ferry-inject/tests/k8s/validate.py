#!/usr/bin/env python3
"""Offline validation of ferry's Kubernetes surface.

1. Renders every kustomization under manifests/ with `kubectl kustomize` and
   validates each object against the Kubernetes OpenAPI schemas bundled in the
   `kubernetes-validate` package (strict: unknown fields are errors), for the oldest
   supported and the newest Kubernetes version. cert-manager and Prometheus Operator
   objects are checked against the small schemas below (the fields ferry uses).
2. Cross-checks the objects: the webhook configuration's settings and references,
   Service and PDB selectors, Secret names, and that every ferry_* metric the
   dashboard and alerts use is one the ferry binary registers. Every PromQL
   expression parses (promql-parser) and every webhook matchCondition compiles and
   behaves as intended (cel-python).
3. Injects the pods of the rendered example workloads with the real webhook code
   (the `mutate` example binary, given with --mutate) and validates the results,
   along with the golden patched pods of the Rust tests.

Prints one line per check and a closing "N passed, N failed" line; exits 1 on failure.
"""

import argparse
import copy
import json
import os
import re
import subprocess
import sys
import tempfile

import celpy
import jsonschema
import kubernetes_validate
import promql_parser
import yaml

# Native sidecars (restartPolicy on init containers) are on by default from 1.29.
VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]

# Kustomizations that are bases with placeholders, not meant to be applied as they
# are: injecting their pods must be denied, naming these annotations.
EXPECT_DENIED = {
    "manifests/examples/notes/app": ["ferry.io/name", "ferry.io/peers"],
}

# Fields a golden fixture carries on purpose to prove unknown fields survive the
# patch; removed before strict validation only.
DELIBERATE_UNKNOWN_FIELDS = [("spec", "someFieldFromTheFuture")]

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
IANA_SVC_NAME = re.compile(r"^(?=.*[a-z])[a-z0-9]([a-z0-9]|-(?!-))*[a-z0-9]$|^[a-z]$")
ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")

# --- schemas for the custom resources ferry ships (the subset it uses) -------

def obj(props, required=(), additional=False):
    return {"type": "object", "properties": props, "required": list(required),
            "additionalProperties": additional}

STR = {"type": "string"}
INT = {"type": "integer"}
BOOL = {"type": "boolean"}
STRS = {"type": "array", "items": STR}
META = {"type": "object", "required": ["name"], "properties": {"name": STR, "namespace": STR}}
LABEL_SELECTOR = obj({"matchLabels": {"type": "object", "additionalProperties": STR},
                      "matchExpressions": {"type": "array"}})
DURATION = {"type": "string", "pattern": r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"}
ISSUER_REF = obj({"name": STR, "kind": {"enum": ["Issuer", "ClusterIssuer"]}, "group": STR}, ["name"])
USAGES = {"type": "array", "items": {"enum": [
    "signing", "digital signature", "content commitment", "key encipherment", "key agreement",
    "data encipherment", "cert sign", "crl sign", "encipher only", "decipher only", "any",
    "server auth", "client auth", "code signing", "email protection", "s/mime", "ipsec end system",
    "ipsec tunnel", "ipsec user", "timestamping", "ocsp signing", "microsoft sgc", "netscape sgc"]}}

CRD_SCHEMAS = {
    ("cert-manager.io/v1", "Issuer"): obj({
        "apiVersion": STR, "kind": STR, "metadata": META,
        "spec": {"type": "object", "minProperties": 1, "maxProperties": 1, "additionalProperties": False,
                 "properties": {"selfSigned": obj({"crlDistributionPoints": STRS}),
                                "ca": obj({"secretName": STR, "crlDistributionPoints": STRS,
                                           "ocspServers": STRS}, ["secretName"])}},
    }, ["apiVersion", "kind", "metadata", "spec"]),
    ("cert-manager.io/v1", "Certificate"): obj({
        "apiVersion": STR, "kind": STR, "metadata": META,
        "spec": obj({
            "secretName": STR, "commonName": STR, "dnsNames": STRS, "ipAddresses": STRS,
            "uris": STRS, "isCA": BOOL, "duration": DURATION, "renewBefore": DURATION,
            "usages": USAGES, "issuerRef": ISSUER_REF,
            "privateKey": obj({"algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]}, "size": INT,
                               "encoding": {"enum": ["PKCS1", "PKCS8"]},
                               "rotationPolicy": {"enum": ["Never", "Always"]}}),
            "secretTemplate": obj({"labels": {"type": "object"}, "annotations": {"type": "object"}}),
        }, ["secretName", "issuerRef"]),
    }, ["apiVersion", "kind", "metadata", "spec"]),
    ("monitoring.coreos.com/v1", "PodMonitor"): obj({
        "apiVersion": STR, "kind": STR, "metadata": META,
        "spec": obj({
            "jobLabel": STR, "namespaceSelector": obj({"any": BOOL, "matchNames": STRS}),
            "selector": LABEL_SELECTOR,
            "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": obj({
                "port": STR, "portNumber": INT, "path": STR, "scheme": {"enum": ["http", "https"]},
                "interval": DURATION, "scrapeTimeout": DURATION, "honorLabels": BOOL,
                "relabelings": {"type": "array"}, "metricRelabelings": {"type": "array"}})},
        }, ["selector", "podMetricsEndpoints"]),
    }, ["apiVersion", "kind", "metadata", "spec"]),
    ("monitoring.coreos.com/v1", "PrometheusRule"): obj({
        "apiVersion": STR, "kind": STR, "metadata": META,
        "spec": obj({"groups": {"type": "array", "minItems": 1, "items": obj({
            "name": STR, "interval": DURATION,
            "rules": {"type": "array", "minItems": 1, "items": {
                "type": "object", "additionalProperties": False, "required": ["expr"],
                "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                "properties": {"alert": STR, "record": STR, "expr": STR, "for": DURATION,
                               "labels": {"type": "object", "additionalProperties": STR},
                               "annotations": {"type": "object", "additionalProperties": STR}}}},
        }, ["name", "rules"])}}, ["groups"]),
    }, ["apiVersion", "kind", "metadata", "spec"]),
}

# --- reporting ------------------------------------------------------------------

class Report:
    def __init__(self):
        self.passed = 0
        self.failed = 0

    def check(self, what, problems):
        if problems:
            self.failed += 1
            print(f"FAIL {what}")
            for p in problems:
                print(f"     {p}")
        else:
            self.passed += 1
            print(f"ok   {what}")


def object_name(doc):
    meta = doc.get("metadata") or {}
    return f"{doc.get('kind')}/{meta.get('name') or meta.get('generateName', '') + '*'}"

# --- schema validation ------------------------------------------------------------

def schema_problems(doc, strict=True):
    api, kind = doc.get("apiVersion"), doc.get("kind")
    if (api, kind) in CRD_SCHEMAS:
        v = jsonschema.Draft7Validator(CRD_SCHEMAS[(api, kind)])
        return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(doc)]
    problems = []
    for version in VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict)
        except kubernetes_validate.ValidationError as e:
            problems.append(f"k8s {version}: {'/'.join(map(str, e.path))}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(f"k8s {version}: no schema for {api} {kind}")
    return problems

# --- semantic checks the API server makes but the schema does not ---------------

def pod_spec_problems(spec, where):
    problems = []
    init = spec.get("initContainers") or []
    containers = spec.get("containers") or []
    names = [c.get("name") for c in init + containers]
    if len(names) != len(set(names)):
        problems.append(f"{where}: duplicate container names {names}")
    volumes = [v.get("name") for v in spec.get("volumes") or []]
    if len(volumes) != len(set(volumes)):
        problems.append(f"{where}: duplicate volume names {volumes}")
    for v in volumes:
        if not DNS1123_LABEL.match(v or "") or len(v) > 63:
            problems.append(f"{where}: volume name {v!r} is not a DNS-1123 label")
    init_ids = {id(c) for c in init}
    for c in init + containers:
        is_init = id(c) in init_ids
        cw = f"{where}: container {c.get('name')!r}"
        if not DNS1123_LABEL.match(c.get("name") or ""):
            problems.append(f"{cw}: name is not a DNS-1123 label")
        ports = c.get("ports") or []
        port_names = [p["name"] for p in ports if "name" in p]
        if len(port_names) != len(set(port_names)):
            problems.append(f"{cw}: duplicate port names")
        for n in port_names:
            if len(n) > 15 or not IANA_SVC_NAME.match(n):
                problems.append(f"{cw}: port name {n!r} is not an IANA_SVC_NAME (max 15 chars)")
        for p in ports:
            if not 1 <= p.get("containerPort", 0) <= 65535:
                problems.append(f"{cw}: containerPort {p.get('containerPort')} out of range")
        for m in c.get("volumeMounts") or []:
            if m.get("name") not in volumes:
                problems.append(f"{cw}: mounts unknown volume {m.get('name')!r}")
        mount_paths = [m.get("mountPath") for m in c.get("volumeMounts") or []]
        if len(mount_paths) != len(set(mount_paths)):
            problems.append(f"{cw}: duplicate mountPath")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            port = ((c.get(probe) or {}).get("httpGet") or {}).get("port")
            if isinstance(port, str) and port not in port_names:
                problems.append(f"{cw}: {probe} uses port {port!r}, not a port of the container")
        for e in c.get("env") or []:
            if not ENV_NAME.match(e.get("name", "")):
                problems.append(f"{cw}: env name {e.get('name')!r} is invalid")
        rp = c.get("restartPolicy")
        if rp is not None and (not is_init or rp != "Always"):
            problems.append(f"{cw}: restartPolicy {rp!r} is only valid as Always on an init container")
        if is_init and rp != "Always":
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if probe in c:
                    problems.append(f"{cw}: a plain init container may not have a {probe}")
    return problems


def pod_problems(pod, where):
    problems = pod_spec_problems(pod.get("spec") or {}, where)
    ann = (pod.get("metadata") or {}).get("annotations") or {}
    for k, v in ann.items():
        if not isinstance(v, str):
            problems.append(f"{where}: annotation {k} is not a string")
    return problems

# --- expressions: PromQL and CEL ----------------------------------------------------

def grafana_to_promql(expr):
    """Replaces Grafana's template variables with values PromQL accepts."""
    expr = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m").replace("$__range", "6h")
    return re.sub(r"\$\{?[a-z_]+\}?", ".*", expr)


def promql_problems(expr, where):
    try:
        promql_parser.parse(expr)
    except ValueError as e:
        return [f"{where}: PromQL does not parse: {e}: {expr!r}"]
    return []


def match_condition_problems(webhook, own_namespace, where):
    """Every matchCondition compiles; together they exclude the webhook's namespace
    and admit an ordinary one."""
    problems = []
    env = celpy.Environment()
    programs = []
    for cond in webhook.get("matchConditions", []):
        try:
            programs.append(env.program(env.compile(cond["expression"])))
        except Exception as e:  # celpy raises several error types
            problems.append(f"{where}: matchCondition {cond.get('name')!r} does not compile: {e}")
    if problems:
        return problems

    def admitted(namespace):
        act = {"request": celpy.json_to_cel({"namespace": namespace, "operation": "CREATE",
                                             "kind": {"group": "", "version": "v1", "kind": "Pod"}})}
        return all(bool(p.evaluate(act)) for p in programs)

    if admitted(own_namespace):
        problems.append(f"{where}: matchConditions admit the webhook's own namespace {own_namespace!r}")
    if not admitted("an-app-namespace"):
        problems.append(f"{where}: matchConditions reject an ordinary namespace")
    return problems

# --- cross-object checks --------------------------------------------------------------

def matches(selector, labels):
    return all(labels.get(k) == v for k, v in (selector or {}).items())


def manifest_problems(docs, registered_metrics):
    problems = []
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
        meta = d.get("metadata") or {}
        if not DNS1123_SUBDOMAIN.match(meta.get("name", "")):
            problems.append(f"{object_name(d)}: name is not a DNS-1123 subdomain")
        if d["kind"] not in ("Namespace", "MutatingWebhookConfiguration") and not meta.get("namespace"):
            problems.append(f"{object_name(d)}: no namespace after rendering")

    workloads = by_kind.get("Deployment", []) + by_kind.get("StatefulSet", [])
    for w in workloads:
        tmpl = copy.deepcopy(w["spec"]["template"])
        for claim in w["spec"].get("volumeClaimTemplates", []):
            tmpl["spec"].setdefault("volumes", []).append(
                {"name": claim["metadata"]["name"], "persistentVolumeClaim": {"claimName": "x"}})
        if not matches(w["spec"]["selector"].get("matchLabels"), tmpl["metadata"].get("labels") or {}):
            problems.append(f"{object_name(w)}: selector does not match its pod template")
        problems += pod_spec_problems(tmpl["spec"], object_name(w))

    def pods_selected(selector, namespace):
        return [w for w in workloads
                if w["metadata"].get("namespace") == namespace
                and matches(selector, w["spec"]["template"]["metadata"].get("labels") or {})]

    for s in by_kind.get("Service", []):
        if not pods_selected(s["spec"].get("selector"), s["metadata"].get("namespace")):
            problems.append(f"{object_name(s)}: selects no rendered workload")
    for p in by_kind.get("PodDisruptionBudget", []):
        if not pods_selected(p["spec"]["selector"].get("matchLabels"), p["metadata"].get("namespace")):
            problems.append(f"{object_name(p)}: selects no rendered workload")

    certs = {(c["metadata"]["namespace"], c["metadata"]["name"]): c for c in by_kind.get("Certificate", [])}
    issuers = {(i["metadata"]["namespace"], i["metadata"]["name"]) for i in by_kind.get("Issuer", [])}
    for c in certs.values():
        if (c["metadata"]["namespace"], c["spec"]["issuerRef"]["name"]) not in issuers:
            problems.append(f"{object_name(c)}: issuer {c['spec']['issuerRef']['name']} is not rendered")

    for mwc in by_kind.get("MutatingWebhookConfiguration", []):
        where = object_name(mwc)
        inject_from = (mwc["metadata"].get("annotations") or {}).get("cert-manager.io/inject-ca-from")
        for wh in mwc["webhooks"]:
            if wh.get("failurePolicy") != "Fail":
                problems.append(f"{where}: failurePolicy must be Fail")
            if wh.get("sideEffects") != "None":
                problems.append(f"{where}: sideEffects must be None")
            if not 1 <= wh.get("timeoutSeconds", 10) <= 10:
                problems.append(f"{where}: timeoutSeconds must be at most 10")
            if wh.get("reinvocationPolicy") != "IfNeeded":
                problems.append(f"{where}: reinvocationPolicy must be IfNeeded")
            if wh.get("admissionReviewVersions") != ["v1"]:
                problems.append(f"{where}: admissionReviewVersions must be [v1]")
            exprs = [m["key"] for m in (wh.get("objectSelector") or {}).get("matchExpressions", [])]
            if "ferry.io/inject" not in exprs and "ferry.io/inject" not in (wh.get("objectSelector") or {}).get("matchLabels", {}):
                problems.append(f"{where}: objectSelector does not select on ferry.io/inject")
            svc_ref = wh["clientConfig"].get("service") or {}
            problems += match_condition_problems(wh, svc_ref.get("namespace", ""), where)
            if svc_ref.get("path") != "/mutate":
                problems.append(f"{where}: clientConfig path must be /mutate")
            svc = [s for s in by_kind.get("Service", [])
                   if s["metadata"]["name"] == svc_ref.get("name") and s["metadata"]["namespace"] == svc_ref.get("namespace")]
            if not svc:
                problems.append(f"{where}: clientConfig names Service {svc_ref.get('namespace')}/{svc_ref.get('name')}, not rendered")
            elif not any(p["port"] == svc_ref.get("port", 443) for p in svc[0]["spec"]["ports"]):
                problems.append(f"{where}: the Service has no port {svc_ref.get('port', 443)}")
            if inject_from:
                ns, name = inject_from.split("/", 1)
                cert = certs.get((ns, name))
                if cert is None:
                    problems.append(f"{where}: inject-ca-from names {inject_from}, not rendered")
                else:
                    dns = f"{svc_ref.get('name')}.{svc_ref.get('namespace')}.svc"
                    if dns not in cert["spec"].get("dnsNames", []):
                        problems.append(f"{where}: certificate {inject_from} lacks dnsName {dns}")
                    secret = cert["spec"]["secretName"]
                    mounted = [v for w in by_kind.get("Deployment", [])
                               for v in w["spec"]["template"]["spec"].get("volumes", [])
                               if (v.get("secret") or {}).get("secretName") == secret]
                    if not mounted:
                        problems.append(f"{where}: no Deployment mounts the serving Secret {secret}")
            elif not wh["clientConfig"].get("caBundle"):
                problems.append(f"{where}: neither inject-ca-from nor caBundle")

    # Metrics used by alerts and the dashboard must exist in the binary.
    used = set()
    for r in by_kind.get("PrometheusRule", []):
        for g in r["spec"]["groups"]:
            for rule in g["rules"]:
                used |= set(re.findall(r"\bferry_[a-z_]+", rule["expr"]))
                problems += promql_problems(rule["expr"], f"{object_name(r)} {rule.get('alert') or rule.get('record')}")
    for cm in by_kind.get("ConfigMap", []):
        for key, text in (cm.get("data") or {}).items():
            if key.endswith(".json"):
                try:
                    dash = json.loads(text)
                except ValueError as e:
                    problems.append(f"{object_name(cm)}: {key} is not JSON: {e}")
                    continue
                for panel in dash.get("panels", []):
                    for t in panel.get("targets", []):
                        used |= set(re.findall(r"\bferry_[a-z_]+", t.get("expr", "")))
                        problems += promql_problems(grafana_to_promql(t.get("expr", "")),
                                                    f"{object_name(cm)} panel {panel.get('title')!r}")
                ids = [p.get("id") for p in dash.get("panels", [])]
                if len(ids) != len(set(ids)):
                    problems.append(f"{object_name(cm)}: duplicate panel ids")
    if registered_metrics is not None:
        for m in sorted(used):
            base = re.sub(r"_(bucket|sum|count)$", "", m)
            if m not in registered_metrics and base not in registered_metrics:
                problems.append(f"metric {m} is used by an alert or the dashboard but not registered by ferry")
    return problems

# --- injection of the rendered example workloads ---------------------------------------

def review_for(workload):
    """An AdmissionReview for the first pod a controller would create."""
    tmpl = copy.deepcopy(workload["spec"]["template"])
    ns = workload["metadata"]["namespace"]
    name = workload["metadata"]["name"]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": tmpl.get("metadata") or {}, "spec": tmpl["spec"]}
    pod["metadata"]["namespace"] = ns
    if workload["kind"] == "StatefulSet":
        pod["metadata"]["name"] = f"{name}-0"
        for claim in workload["spec"].get("volumeClaimTemplates", []):
            cname = claim["metadata"]["name"]
            pod["spec"].setdefault("volumes", []).append(
                {"name": cname, "persistentVolumeClaim": {"claimName": f"{cname}-{name}-0"}})
    else:
        pod["metadata"]["generateName"] = f"{name}-"
    return {
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "00000000-0000-4000-8000-000000000000",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": ns, "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:statefulset-controller"},
            "object": pod, "dryRun": False,
        },
    }


def strip_deliberate_unknowns(pod):
    pod = copy.deepcopy(pod)
    for path in DELIBERATE_UNKNOWN_FIELDS:
        node = pod
        for key in path[:-1]:
            node = node.get(key) or {}
        node.pop(path[-1], None)
    return pod


def validate_pod(report, pod, what):
    problems = schema_problems(strip_deliberate_unknowns(pod), strict=True)
    problems += pod_problems(pod, what)
    report.check(f"{what}: schema (strict) and pod rules", problems)


def registered_metric_names(repo):
    path = os.path.join(repo, "crates", "ferry", "src", "telemetry.rs")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return set(re.findall(r'"(ferry_[a-z_]+)"', f.read()))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repo", required=True, help="repository root")
    ap.add_argument("--kubectl", default="kubectl")
    ap.add_argument("--mutate", help="the ferry-inject `mutate` example binary")
    args = ap.parse_args()
    report = Report()

    metrics = registered_metric_names(args.repo)
    if metrics is None:
        print("note: crates/ferry/src/telemetry.rs not found; metric names not cross-checked")

    manifests = os.path.join(args.repo, "manifests")
    kustomizations = sorted(
        os.path.relpath(d, args.repo) for d, _, files in os.walk(manifests)
        if "kustomization.yaml" in files)
    workloads_to_inject = []
    for k in kustomizations:
        out = subprocess.run([args.kubectl, "kustomize", os.path.join(args.repo, k)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            report.check(f"kubectl kustomize {k}", [out.stderr.strip()])
            continue
        docs = [d for d in yaml.safe_load_all(out.stdout) if d]
        report.check(f"kubectl kustomize {k} ({len(docs)} objects)", [] if docs else ["rendered nothing"])
        for d in docs:
            report.check(f"{k}: {object_name(d)} schema", schema_problems(d))
            if d["kind"] in ("Deployment", "StatefulSet"):
                labels = d["spec"]["template"]["metadata"].get("labels") or {}
                if labels.get("ferry.io/inject") == "true":
                    workloads_to_inject.append((k, d))
        report.check(f"{k}: cross-object checks", manifest_problems(docs, metrics))

    golden = os.path.join(args.repo, "crates", "ferry-inject", "tests", "fixtures", "golden")
    golden_pods = sorted(f for f in os.listdir(golden) if f.endswith(".pod.json"))
    if not golden_pods:
        report.check("golden patched pods", ["none found"])
    for f in golden_pods:
        with open(os.path.join(golden, f), encoding="utf-8") as fh:
            validate_pod(report, json.load(fh), f"golden {f}")

    if args.mutate:
        if not workloads_to_inject:
            report.check("example workloads to inject", ["no rendered workload has ferry.io/inject=true"])
        with tempfile.TemporaryDirectory() as tmp:
            reviews = []
            for k, w in workloads_to_inject:
                path = os.path.join(tmp, f"{k.replace('/', '_')}_{w['metadata']['name']}.json")
                with open(path, "w", encoding="utf-8") as fh:
                    json.dump(review_for(w), fh)
                reviews.append(path)
            outdir = os.path.join(tmp, "out")
            os.mkdir(outdir)
            for (k, _), r in zip(workloads_to_inject, reviews):
                name = os.path.basename(r)
                run = subprocess.run([args.mutate, outdir, r], capture_output=True, text=True)
                if k in EXPECT_DENIED:
                    missing = [a for a in EXPECT_DENIED[k] if a not in run.stderr]
                    report.check(f"inject {name}: denied, naming {', '.join(EXPECT_DENIED[k])}",
                                 ([] if run.returncode != 0 else ["it was not denied"]) +
                                 [f"{a} not named in: {run.stderr.strip()}" for a in missing])
                    continue
                report.check(f"inject {name}", [] if run.returncode == 0 else [run.stderr.strip()])
                out = os.path.join(outdir, name)
                if run.returncode == 0 and os.path.exists(out):
                    with open(out, encoding="utf-8") as fh:
                        pod = json.load(fh)
                    validate_pod(report, pod, f"injected {name}")
                    names = [c["name"] for c in pod["spec"].get("initContainers", [])]
                    report.check(f"injected {name}: ferry is the first init container",
                                 [] if names[:1] == ["ferry"] else [f"init containers: {names}"])

    print(f"{report.passed} passed, {report.failed} failed")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
