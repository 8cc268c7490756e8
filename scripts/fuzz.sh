#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for a few seconds each, starting from
# the corpus kept in fuzz/corpus/ (new inputs go to a temp dir, so the repo's
# corpus only changes on purpose). A crash fails the run and leaves its input
# in fuzz/artifacts/TARGET/. Installs what it needs, non-interactively; if
# cargo-fuzz or a nightly toolchain cannot be installed, says so and skips.
# Longer runs and corpus upkeep: docs/SECURITY.md ("Fuzzing").
# Usage: bash scripts/fuzz.sh [SECONDS_PER_TARGET]   (default 5)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
secs=${1:-5}

if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    echo "installing a nightly toolchain (cargo-fuzz needs -Z sanitizer flags)"
    if ! rustup toolchain install nightly --profile minimal >/dev/null 2>&1; then
        echo "SKIPPED fuzzing: no nightly toolchain and it could not be installed"
        exit 0
    fi
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz"
    if ! cargo install cargo-fuzz --locked --quiet; then
        echo "SKIPPED fuzzing: cargo-fuzz could not be installed"
        exit 0
    fi
fi

cargo +nightly fuzz build --fuzz-dir fuzz -O >/dev/null 2>&1 ||
    cargo +nightly fuzz build --fuzz-dir fuzz -O
for t in $(cargo +nightly fuzz list --fuzz-dir fuzz); do
    work=$(mktemp -d)
    log=$(mktemp)
    if ! cargo +nightly fuzz run --fuzz-dir fuzz -O "$t" "$work" "fuzz/corpus/$t" -- \
        -max_total_time="$secs" -max_len=65536 -print_final_stats=1 >"$log" 2>&1; then
        tail -40 "$log"
        echo "FUZZ CRASH in $t: the input is in fuzz/artifacts/$t/ (reproduce: cargo +nightly fuzz run --fuzz-dir fuzz $t fuzz/artifacts/$t/<file>)"
        rm -rf "$work" "$log"
        exit 1
    fi
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')
    printf '  %-18s %10s executions in %ss, no crash\n' "$t" "$runs" "$secs"
    rm -rf "$work" "$log"
done
