#!/usr/bin/env bash
# Builds the release binary to ship: target/release/ferry without debug info,
# and its debug info kept apart beside it, for gdb, addr2line and symbolizing
# crash reports:
#   ferry        stripped of DWARF (the symbol table stays: panics still name
#                their functions), with a .gnu_debuglink to ferry.debug
#   ferry.debug  what objcopy took out (std's and the C libraries' DWARF, and
#                the skeleton units that point into ferry.dwp)
#   ferry.dwp    ferry's own DWARF (Cargo.toml: split-debuginfo = "packed")
# Keep the three together to debug (`gdb target/release/ferry` finds the other
# two); ship only `ferry`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
dir=${CARGO_TARGET_DIR:-target}/release
cargo build --release --locked -p ferry "$@"
command -v objcopy >/dev/null || { echo "error: objcopy (binutils) is needed" >&2; exit 1; }
# cargo does not relink an up-to-date binary: strip only one that still has
# its debug info (a second run must not overwrite ferry.debug with nothing)
if LC_ALL=C readelf -S "$dir/ferry" | grep -q '\.debug_info'; then
    objcopy --only-keep-debug "$dir/ferry" "$dir/ferry.debug"
    objcopy --strip-debug --remove-section=.gnu_debuglink --add-gnu-debuglink="$dir/ferry.debug" "$dir/ferry"
else
    echo "$dir/ferry is already stripped; $dir/ferry.debug kept"
fi
ls -l "$dir/ferry" "$dir/ferry.debug" "$dir/ferry.dwp"
