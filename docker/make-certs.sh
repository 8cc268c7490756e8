#!/bin/sh
# Init step of the playground: a CA and one certificate per node, made with
# `ferry cert` into the shared certs volume. Idempotent: an existing CA or
# certificate is kept, so `docker-compose up` can be run again.
set -eu
out=${CERTS_DIR:-/certs}
names=${CERT_NAMES:-ferry-a ferry-b ferry-c}
if [ ! -f "$out/ca/ca.key" ]; then
    ferry cert init --out "$out/ca"
    echo "certs: made a CA in $out/ca"
fi
for n in $names; do
    if [ ! -f "$out/$n/tls.key" ]; then
        ferry cert issue --ca "$out/ca" --name "$n" --out "$out/$n"
        echo "certs: issued $n"
    fi
done
echo "certs: ready ($names)"
