#!/usr/bin/env bash
# Process-level test of the webhook server: start it as its own process with an
# OpenSSL-made certificate (SEC1 key, as cert-manager writes for ECDSA), talk to it
# with curl (an independent TLS and HTTP/2 stack) over HTTP/1.1 and HTTP/2, send a
# malformed review, then SIGTERM it and expect a clean exit.
#
# Usage: webhook-process.sh LABEL COMMAND [ARGS...]
#   COMMAND ARGS is the server, e.g. `target/debug/examples/serve` or `ferry inject`;
#   the script appends --listen, --tls-dir and --sidecar-image.
# Prints "ok"/"FAIL" lines; exits 1 on failure.
set -euo pipefail

label=$1
shift
PY=${PYTHON:-python3}
FIXTURE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/fixtures/statefulset-primary.json"
T=$(mktemp -d)
pid=""
cleanup() {
    if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
    rm -rf "$T"
}
trap cleanup EXIT

fail() {
    echo "FAIL $label: $*"
    if [[ -f "$T/server.log" ]]; then sed 's/^/     server: /' "$T/server.log" | tail -20; fi
    exit 1
}

# A CA and a serving certificate for localhost / 127.0.0.1.
mkdir -p "$T/tls"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$T/ca.key" -out "$T/tls/ca.crt" -days 1 -subj "/CN=ferry-inject test CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    >/dev/null 2>&1 || fail "openssl could not make the CA"
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$T/leaf.pkcs8" -out "$T/leaf.csr" -subj "/CN=localhost" >/dev/null 2>&1 \
    || fail "openssl could not make the key"
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n' >"$T/ext"
openssl x509 -req -in "$T/leaf.csr" -CA "$T/tls/ca.crt" -CAkey "$T/ca.key" -CAcreateserial \
    -out "$T/tls/tls.crt" -days 1 -extfile "$T/ext" >/dev/null 2>&1 || fail "openssl could not sign"
openssl ec -in "$T/leaf.pkcs8" -out "$T/tls/tls.key" >/dev/null 2>&1 || fail "openssl could not convert the key"
grep -q "BEGIN EC PRIVATE KEY" "$T/tls/tls.key" || fail "the key is not SEC1"

port=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')
"$@" --listen "127.0.0.1:$port" --tls-dir "$T/tls" --sidecar-image example.com/ferry:process-test \
    >"$T/server.log" 2>&1 &
pid=$!

CURL=(curl -sS --max-time 10 --cacert "$T/tls/ca.crt")
URL="https://localhost:$port"
for _ in $(seq 1 100); do
    if "${CURL[@]}" -o /dev/null "$URL/healthz" 2>/dev/null; then break; fi
    kill -0 "$pid" 2>/dev/null || fail "the server exited at start"
    sleep 0.1
done
[[ "$("${CURL[@]}" "$URL/healthz")" == "ok" ]] || fail "/healthz did not answer ok"
[[ "$("${CURL[@]}" "$URL/readyz")" == "ready" ]] || fail "/readyz did not answer ready"

for http in http1.1 http2; do
    version=$("${CURL[@]}" --"$http" -H "Content-Type: application/json" --data-binary "@$FIXTURE" \
        -o "$T/answer.json" -w '%{http_code} %{http_version}' "$URL/mutate?timeout=10s") \
        || fail "POST /mutate over $http failed"
    expected="200 ${http#http}"
    [[ "$version" == "$expected" ]] || fail "POST /mutate over $http: got '$version', want '$expected'"
    "$PY" - "$T/answer.json" <<'PYEOF' || fail "POST /mutate over $http: unexpected answer"
import base64, json, sys
r = json.load(open(sys.argv[1]))["response"]
assert r["allowed"] is True and r["patchType"] == "JSONPatch", r
ops = json.loads(base64.b64decode(r["patch"]))
assert ops[0]["path"] == "/spec/initContainers", ops[0]["path"]
assert ops[0]["value"][0]["image"] == "example.com/ferry:process-test"
PYEOF
    echo "ok   $label: POST /mutate over $http (curl) injects"
done

code=$("${CURL[@]}" -o "$T/bad.txt" -w '%{http_code}' --data-binary '{"kind":' "$URL/mutate")
[[ "$code" == "400" ]] || fail "a malformed review got HTTP $code, want 400"
grep -q "not JSON" "$T/bad.txt" || fail "the 400 does not say why: $(cat "$T/bad.txt")"
[[ "$("${CURL[@]}" "$URL/healthz")" == "ok" ]] || fail "not serving after a malformed review"
echo "ok   $label: malformed review is HTTP 400 with the reason; still serving"

kill -TERM "$pid"
for _ in $(seq 1 200); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
done
kill -0 "$pid" 2>/dev/null && fail "still running 20 s after SIGTERM"
rc=0
wait "$pid" || rc=$?
pid=""
[[ $rc -eq 0 ]] || fail "exited with $rc after SIGTERM"
echo "ok   $label: SIGTERM drains and exits 0"
