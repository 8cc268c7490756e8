#!/bin/sh
# The app of the primary-in-guest power-cut test: writes into /mnt/root and
# prints one line per write it made durable ("DURABLE <path> <len>" after the
# file's and its directory's fsync), on stdout (the guest's second serial port,
# read by the host). It starts when the host's go signal (a TCP connection to
# 10.0.2.2:$1 that says "go") arrives, so the host can first check the replica.
# Content is self-describing: "PW <name> <len>\n" then "<name>\n" repeated and
# cut to <len> bytes; the host recomputes it.
cd /mnt/root || exit 1
mkdir -p imm mut nf
reply=$(nc 10.0.2.2 "$1" </dev/null)
[ "$reply" = go ] || { echo "WRITER no go signal: $reply"; exit 1; }
echo "WRITER started"
last=$(ls imm | sed -n 's/^i//p' | sort -n | tail -n 1)
i=${last:-0}
gen() { # gen NAME LEN: the content of NAME at length LEN
    echo "PW $1 $2"
    yes "$1" | head -c "$2"
}
while :; do
    i=$((i + 1))
    # a new file, made durable: fsync it and its directory
    f=imm/i$i len=$((RANDOM % 24000 + RANDOM % 3 * 60000 + 1))
    gen "$f" "$len" >"$f"
    sync "$f" imm
    echo "DURABLE $f $len"
    # an atomic replace, made durable (temp, fsync, rename, fsync dir)
    if [ $((i % 3)) = 0 ]; then
        k=$((RANDOM % 4)) v=$i
        gen "mut/m$k.v$v" 3000 >"mut/m$k.tmp"
        sync "mut/m$k.tmp"
        mv "mut/m$k.tmp" "mut/m$k"
        sync mut
        echo "DURABLE mut/m$k.v$v 3000"
    fi
    # an in-place overwrite of a database-like page file, never fsynced:
    # what survives the cut is up to the kernel; the replica must end
    # equal to whatever did
    k=$((RANDOM % 4))
    gen "nf/p$k.v$i" 8192 >/tmp/page
    dd if=/tmp/page of="nf/p$k" bs=8192 count=1 conv=notrunc 2>/dev/null
    # an append-only log: appended every round, fsynced every fifth
    echo "L $i $(yes x | head -c $((RANDOM % 200)) | tr -d '\n')" >>log
    [ $((i % 5)) = 0 ] && sync log && echo "DURABLE-LOG $(wc -c <log)"
done
