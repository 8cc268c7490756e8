#!/bin/sh
# The playground's "app" in cluster A: writes self-verifying files into the
# volume it shares with the primary ferry, until SIGTERM (it then finishes the
# file it is writing and exits 0, so a stopped writer leaves no half file).
#
# Every file is a list of lines "ID TAG K ........" for K = 1..N followed by
# "END ID TAG N": a reader can tell a whole version from a torn one.
#   WORK/a*.dat  written to a temp file and renamed into place (atomic)
#   WORK/p*.dat  rewritten in place (a reader may see a prefix of a version)
#   WORK/dN/     atomic files moved into a directory; directories removed
#   WORK/log.txt one appended line per step
set -u
dir=${WRITER_DIR:-/data/work}
files=${WRITER_FILES:-24}
pause=${WRITER_PAUSE:-0.02}
start=$(date +%s)
stop=0
trap 'stop=1' TERM INT
mkdir -p "$dir"

body() { # ID TAG N
    awk -v id="$1" -v t="$2" -v n="$3" 'BEGIN {
        for (k = 1; k <= n; k++) printf "%s %s %d ........................\n", id, t, k
        printf "END %s %s %d\n", id, t, n }'
}

gen=0
echo "writer: writing into $dir (run $start)"
while [ "$stop" = 0 ]; do
    gen=$((gen + 1))
    i=$((gen % files))
    tag="$start.$gen"
    n=$((20 + (gen * 7919) % 3000))
    [ $((gen % 17)) = 0 ] && n=40000   # now and then about 1.5 MB
    if [ $((i % 3)) = 0 ]; then
        body "p$i" "$tag" "$n" > "$dir/p$i.dat"
    else
        body "a$i" "$tag" "$n" > "$dir/.w.tmp.a$i"
        mv -f "$dir/.w.tmp.a$i" "$dir/a$i.dat"
    fi
    if [ $((gen % 5)) = 4 ] && [ -f "$dir/a$((i - 1)).dat" ]; then
        d="$dir/d$((gen % 4))"
        mkdir -p "$d"
        mv -f "$dir/a$((i - 1)).dat" "$d/"
    fi
    [ $((gen % 23)) = 22 ] && rm -rf "$dir/d$((gen % 4))"
    echo "step $gen $tag" >> "$dir/log.txt"
    sleep "$pause"
done
echo "writer: stopped after $gen steps"
