#!/usr/bin/env bash
# End-to-end engine benchmark (issues 2 and 4): time for data to become identical
# on a replica over loopback, as a ratio to `cp -a` and rsync of the same data
# in the same run; append lag; a small edit of a large file (W4); the app's own
# write time with ferry running (W2w); memory (M); an emulated WAN link (W6).
# Usage: bash benches/engine.sh [--rounds N] [--quick] [--only w1,w2,w5,w3,w4,w2w,m,w6] [--w6-...]
# (see `python3 benches/engine.py --help`). FERRY_BIN=path skips the cargo build.
# Results: printed, and written to bench-out/engine.json.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

need=()
command -v rsync >/dev/null || need+=(rsync)
# W6's emulated link: namespaces and veths (iproute2), offloads off (ethtool),
# ping to check the RTT, a C compiler for the relay, clang + libbpf for the EDT program
command -v ethtool >/dev/null || need+=(ethtool)
command -v ping >/dev/null || need+=(iputils-ping)
command -v cc >/dev/null || need+=(gcc)
command -v clang >/dev/null || need+=(clang)
[[ -f /usr/include/bpf/bpf_helpers.h ]] || need+=(libbpf-dev)
if ((${#need[@]})); then
    echo "installing ${need[*]} (baselines and the W6 link)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq "${need[@]}" >/dev/null 2>&1 ||
        { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq "${need[@]}" >/dev/null 2>&1; } ||
        echo "could not install ${need[*]}: the workloads needing them report so or are skipped"
fi

ferry=${FERRY_BIN:-}
if [[ -z $ferry ]]; then
    cargo build --release --quiet -p ferry
    ferry=target/release/ferry
fi

# W6 creates network namespaces, and W4 an nftables table (a UDP byte counter),
# named after this tag; whatever happens to the Python process, they (and the
# relay) are removed on the way out.
export FERRY_WAN_TAG=$$
py=
cleanup() {
    if [[ -n $py ]] && kill -0 "$py" 2>/dev/null; then
        kill -TERM "$py" 2>/dev/null || true
        wait "$py" 2>/dev/null || true
    fi
    bash benches/wan/wan.sh down "$FERRY_WAN_TAG" >/dev/null 2>&1 || true
    nft delete table inet "ferry_bench_$FERRY_WAN_TAG" >/dev/null 2>&1 || true
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
python3 benches/engine.py --ferry "$ferry" "$@" &
py=$!
wait "$py"
