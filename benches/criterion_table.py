"""Prints the last `cargo bench -p ferry-core --bench core` run as a markdown table.

Reads criterion's own records (target/criterion/<group>/<bench>/new/): the
median time per iteration and the declared throughput, so the table carries
exactly what criterion measured (MB/s here is 10^6 bytes per second, per core).
Usage: python3 benches/criterion_table.py [target/criterion]
"""

import json, os, sys


def fmt_time(ns):
    for unit, div in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if ns >= div:
            return f"{ns / div:.3g} {unit}"
    return f"{ns:.3g} ns"


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else "target/criterion"
    rows = []
    for d, _, files in os.walk(root):
        if os.path.basename(d) != "new" or "benchmark.json" not in files:
            continue
        b = json.load(open(os.path.join(d, "benchmark.json")))
        est = json.load(open(os.path.join(d, "estimates.json")))
        med = est["median"]["point_estimate"]  # ns per iteration
        lo = est["median"]["confidence_interval"]["lower_bound"]
        hi = est["median"]["confidence_interval"]["upper_bound"]
        tp = b.get("throughput") or {}
        if "Bytes" in tp:
            rate = f"{tp['Bytes'] / med * 1e3:,.0f} MB/s"
        elif "Elements" in tp:
            rate = f"{tp['Elements'] / med * 1e3:,.1f} M entries/s"
        else:
            rate = ""
        rows.append((b["full_id"], fmt_time(med), f"{fmt_time(lo)} – {fmt_time(hi)}", rate))
    if not rows:
        raise SystemExit(f"no criterion results under {root}; run cargo bench -p ferry-core --bench core")
    print("| benchmark | median time | 95 % CI of the median | throughput (one core) |")
    print("|---|---|---|---|")
    for r in sorted(rows):
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
