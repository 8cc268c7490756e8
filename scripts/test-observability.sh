#!/usr/bin/env bash
# Observability with real parts (issue 6): promtool checks and unit-tests the
# alert rules, then a real Prometheus (Debian's package) scrapes a primary and a
# replica under a workload. Installs Prometheus if missing. Usage:
#   bash scripts/test-observability.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
    echo "test-observability: installing prometheus (Debian package)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq prometheus >/dev/null
fi
python3 -c 'import yaml' 2>/dev/null || python3 -m pip install --quiet --disable-pip-version-check --no-input pyyaml
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# PrometheusRule (a CRD) -> a plain rule file promtool reads
python3 - "$work/rules.yaml" <<'PY'
import sys, yaml
d = yaml.safe_load(open("manifests/monitoring/prometheusrule.yaml"))
yaml.safe_dump({"groups": d["spec"]["groups"]}, open(sys.argv[1], "w"), sort_keys=False)
PY
cp tests/observability/alerts.test.yaml "$work/"
# runbook_url anchors, FerrySidecarDown's selector, the dashboard's variables and panels
python3 tests/observability/rules_check.py
promtool check rules "$work/rules.yaml"
(cd "$work" && promtool test rules alerts.test.yaml)
cargo build --quiet -p ferry
# the binary cargo just built, wherever CARGO_TARGET_DIR puts it
target=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
python3 tests/observability/prom_e2e.py "$target/debug/ferry"
echo "observability: all checks passed"
