#!/usr/bin/env bash
# End-to-end engine benchmark (issue 2): time for data to become identical on a
# replica over loopback, as a ratio to `cp -a` of the same data on the same disk
# in the same run, and the lag of small appends.
# Usage: bash benches/engine.sh [--rounds N] [--quick]
# Results: printed, and written to bench-out/engine.json.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if ! command -v rsync >/dev/null; then
    echo "installing rsync (the baseline)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rsync >/dev/null || echo "rsync could not be installed: no rsync baseline"
fi
cargo build --release --quiet -p ferry
exec python3 benches/engine.py --ferry target/release/ferry "$@"
