#!/usr/bin/env bash
# End-to-end engine benchmark (issue 2): time for data to become identical on a
# replica over loopback, as a ratio to `cp -a` of the same data on the same disk
# in the same run, and the lag of small appends.
# Usage: bash benches/engine.sh [--rounds N] [--quick]
# Results: printed, and written to bench-out/engine.json.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo build --release --quiet -p ferry
exec python3 benches/engine.py --ferry target/release/ferry "$@"
