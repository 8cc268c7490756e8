#!/usr/bin/env bash
# End-to-end test of the docker-compose playground (docker/compose.yaml):
# builds the images (docker/build-image.sh), starts three "clusters", lets the
# writer app write in cluster A, checks that the replicas in B and C become
# identical to A, then injects faults while the writer keeps writing:
#   1. cluster C cut off (docker network disconnect) for 30 s
#   2. replica B killed (SIGKILL) and started again
#   3. the primary restarted (SIGTERM, then start)
# After each: time to converge, and identical trees. All the while a poller
# reads the replicas' files and fails the test on any torn file (the writer's
# files say what a whole version is). compose down -v runs on every exit.
# Needs root (reads the volumes from the host), docker and docker-compose.
# Usage: bash scripts/test-docker.sh
# About 2 minutes once the static binary is built (the first build of it takes
# about 5 minutes on 2 cores); everything after the build is cut off at
# FERRY_E2E_LIMIT_SECS (290 s) by a watchdog.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

T0=$(date +%s.%N)
LIMIT=${FERRY_E2E_LIMIT_SECS:-290}
export COMPOSE_PROJECT_NAME=${FERRY_E2E_PROJECT:-ferry-e2e}
# own subnets and ports, so the test does not collide with a running playground
export FERRY_NET=${FERRY_E2E_NET:-172.28.8}
export FERRY_PORT_BASE=${FERRY_E2E_PORT_BASE:-1919}
DC=(docker-compose -f docker/compose.yaml -p "$COMPOSE_PROJECT_NAME")
P=$COMPOSE_PROJECT_NAME
PARTITION_SECS=${FERRY_E2E_PARTITION_SECS:-30}

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }
say() { printf '\n== [%6ss] %s\n' "$(since "$T0")" "$*"; }
fail() { printf '\nFAIL: %s\n' "$*" >&2; exit 1; }
dc() { "${DC[@]}" "$@"; }

# --- prerequisites
[[ $(id -u) == 0 ]] || fail "run as root (the test reads the docker volumes from the host)"
docker info >/dev/null 2>&1 || fail "docker is not reachable"
if ! command -v docker-compose >/dev/null; then
    say "installing docker-compose (Debian)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null ||
        fail "docker-compose is missing"
fi
command -v curl >/dev/null || fail "curl is missing"

WORK=$(mktemp -d)
POLLER=
cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    [[ -n $POLLER ]] && kill "$POLLER" 2>/dev/null && wait "$POLLER" 2>/dev/null
    [[ -n ${WATCHDOG:-} ]] && kill "$WATCHDOG" 2>/dev/null
    if ((rc != 0)); then
        echo "--- logs (last 30 lines per service)"
        dc logs --no-color --tail 30 2>&1 | sed 's/^/    /'
    fi
    echo "--- compose down -v"
    dc down -v --remove-orphans -t 5 >/dev/null 2>&1 || dc down -v --remove-orphans -t 5
    rm -rf "$WORK"
    printf '\n== docker e2e: %s in %ss (%ss after the build)\n' "$( ((rc == 0)) && echo PASSED || echo "FAILED (exit $rc)")" \
        "$(since "$T0")" "$(since "${T1:-$T0}")"
    exit "$rc"
}
trap cleanup EXIT
trap 'echo "interrupted" >&2; exit 130' INT
trap 'echo "time limit (${LIMIT}s) reached" >&2; exit 124' TERM
# --- build (not under the watchdog: a first static build takes minutes on 2 cores)
say "build images"
bash docker/build-image.sh
# a watchdog: everything after the build is bounded even if docker hangs
T1=$(now)
# (its own fds are /dev/null, so a caller's pipe is not held open by its sleep,
# and killing it kills its sleep)
(
    trap 'kill "$s" 2>/dev/null; exit 0' TERM
    sleep "$LIMIT" &
    s=$!
    wait "$s" && kill -TERM $$
) </dev/null >/dev/null 2>&1 &
WATCHDOG=$!
dc down -v --remove-orphans -t 2 >/dev/null 2>&1 || true # leftovers of an aborted run

say "compose up (project $P, networks ${FERRY_NET}1-3.0/24)"
timeout 120 "${DC[@]}" up -d --quiet-pull 2>&1 | sed 's/^/    /'
vol() { docker volume inspect -f '{{.Mountpoint}}' "${P}_$1"; }
A=$(vol a-data)
B=$(vol b-data)
C=$(vol c-data)
cid() { dc ps -q "$1"; }

wait_ready() { # PORT...
    local port i
    for port in "$@"; do
        for ((i = 0; i < 120; i++)); do
            curl -fsS -m 2 "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break
            sleep 0.25
        done
        ((i < 120)) || fail "node on metrics port $port not ready after 30 s"
    done
}
PA=${FERRY_PORT_BASE}1 PB=${FERRY_PORT_BASE}2 PC=${FERRY_PORT_BASE}3
wait_ready "$PA" "$PB" "$PC"
say "three nodes ready (metrics on 127.0.0.1:$PA, :$PB, :$PC)"

# --- checks
# a tree's listing: type, path, size, mode, and mtime for non-directories;
# the node's own state dir (/data/.ferry) is left out
listing() {
    (cd "$1" && find . -path ./.ferry -prune -o -type d -printf 'd %p %m\n' \
        -o -printf '%y %p %s %m %T@ %l\n' | LC_ALL=C sort)
}
same_as_a() { # DIR
    [[ "$(listing "$A")" == "$(listing "$1")" ]] &&
        diff -rq --no-dereference -x .ferry "$A" "$1" >/dev/null 2>&1
}
# is FILE a whole version (STRICT=1) or a whole version or a prefix of one (0)?
# reads standard input; exit 0 yes, 3 no (torn)
check_file() { # NAME STRICT
    awk -v name="$1" -v strict="$2" '
        function pre(s, full) { return index(full, s) == 1 }
        NR == 1 { id = $1; t = $2 }
        { line[NR] = $0 }
        END {
            if (NR == 0) exit(strict ? 3 : 0)
            for (k = 1; k <= NR; k++) {
                want = (k < NR || substr(line[k], 1, 3) != "END") ? \
                    sprintf("%s %s %d ........................", id, t, k) : \
                    sprintf("END %s %s %d", id, t, k - 1)
                if (line[k] == want) { if (substr(want, 1, 3) == "END") ended = 1; continue }
                if (k == NR && !strict && (pre(line[k], want) || \
                    pre(line[k], sprintf("END %s %s %d", id, t, k - 1)))) continue
                print name ": line " k ": " substr(line[k], 1, 60) > "/dev/stderr"
                exit 3
            }
            if (strict && !ended) { print name ": no END line (" NR " lines)" > "/dev/stderr"; exit 3 }
        }'
}
check_log() { # NAME STRICT, reads standard input: "step N RUN.N" lines; a prefix of the last one when not strict
    awk -v name="$1" -v strict="$2" '
        /^step [0-9]+ [0-9]+\.[0-9]+$/ { next }
        { bad = NR; badl = $0 }
        END { if (bad && (strict || bad != NR)) { print name ": line " bad ": " substr(badl, 1, 60) > "/dev/stderr"; exit 3 } }'
}
# every writer file under DIR/work: whole (STRICT=1), or whole-or-prefix for
# files written in place (STRICT=0: what a reader may see while writes go on)
check_tree() { # DIR STRICT
    local f rc bad=0 n=0
    [[ -d $1/work ]] || return 0
    while IFS= read -r -d '' f; do
        # the file is opened once (the redirection) and checked through that
        # descriptor: if it is renamed or deleted meanwhile, the open fails
        # (skipped: not a torn file) or the check reads the version it opened
        case ${f##*/} in
        .w.tmp.* | .ferry.tmp.*) continue ;; # writer's / ferry's temp files
        p*.dat) { check_file "$f" "$2"; } <"$f" ;;
        *.dat) { check_file "$f" 1; } <"$f" ;;
        log.txt) { check_log "$f" "$2"; } <"$f" ;;
        *) echo "$f: unexpected file" >&2 && (exit 3) ;;
        esac 2>>"$WORK/torn" && rc=0 || rc=$?
        if ((rc == 0)); then
            n=$((n + 1))
        elif ((rc == 3)); then
            bad=$((bad + 1))
        fi # else the open failed: the file vanished between find and open
    done < <(find "$1/work" -type f -print0 2>/dev/null)
    echo "$n" >"$WORK/checked"
    return $((bad > 0))
}

start_poller() { # reads B's and C's files every ~0.5 s while faults run
    rm -f "$WORK/stop"
    (
        for ((i = 0; i < 1200; i++)); do
            [[ -e $WORK/stop ]] && break
            check_tree "$B" 0 || echo "B $(date +%T.%N)" >>"$WORK/torn-at"
            check_tree "$C" 0 || echo "C $(date +%T.%N)" >>"$WORK/torn-at"
            echo $((i + 1)) >"$WORK/polls"
            sleep 0.5
        done
    ) &
    POLLER=$!
}
stop_poller() {
    touch "$WORK/stop"
    wait "$POLLER" 2>/dev/null || true
    POLLER=
    if [[ -s $WORK/torn-at ]]; then
        echo "torn files seen on a replica while writes ran:" >&2
        grep -v 'No such file' "$WORK/torn" | head -20 >&2
        fail "torn files on a replica"
    fi
    echo "    no torn file in $(cat "$WORK/polls" 2>/dev/null || echo 0) reads of B and C while writes ran"
}

writer_start() { dc start writer >/dev/null 2>&1; }
writer_stop() { # graceful: the writer finishes its current file
    timeout 60 "${DC[@]}" stop -t 30 writer >/dev/null 2>&1 || fail "writer did not stop"
    [[ "$(docker inspect -f '{{.State.ExitCode}}' "$(cid writer)")" == 0 ]] ||
        fail "writer exited with an error: $(dc logs --tail 5 writer)"
}
# wait until B and C equal A; print the time since REF (and since the writer stopped)
wait_converged() { # LABEL REF_TIME STOPPED_TIME
    local i
    for ((i = 0; i < 480; i++)); do
        same_as_a "$B" && same_as_a "$C" && break
        sleep 0.25
    done
    if ((i == 480)); then
        diff <(listing "$A") <(listing "$B") | head -5 >&2
        diff <(listing "$A") <(listing "$C") | head -5 >&2
        fail "$1: B and C not identical to A 120 s after the writer stopped"
    fi
    check_tree "$A" 1 || fail "$1: torn file on the primary?"
    check_tree "$B" 1 || fail "$1: torn file on B after convergence"
    check_tree "$C" 1 || fail "$1: torn file on C after convergence"
    local files
    files=$(cd "$A" && find . -path ./.ferry -prune -o -type f -print | wc -l)
    local bytes
    bytes=$(du -sb --exclude=.ferry "$A" | cut -f1)
    printf '    CONVERGED after %-28s %6ss after it (%ss after the writer stopped); %s files, %s bytes, identical in A, B, C\n' \
        "$1:" "$(since "$2")" "$(since "$3")" "$files" "$bytes"
}
metric() { # PORT NAME{labels} -> value or "?"
    curl -fsS -m 2 "http://127.0.0.1:$1/metrics" 2>/dev/null | awk -v m="$2" '$1 == m { print $2; f = 1 } END { if (!f) print "?" }'
}
# wait until each PEER has acked what the primary had sealed when this is
# called (the backlog the fault left), while the writer keeps writing; print
# the time since REF. The primary's metrics say it: ferry_sealed_seq, ferry_acked_seq.
wait_caught_up() { # LABEL REF_TIME PEER...
    local label=$1 ref=$2 target p i acked
    shift 2
    for ((i = 0; i < 120; i++)); do
        target=$(metric "$PA" ferry_sealed_seq)
        [[ $target != "?" ]] && break
        sleep 0.25
    done
    [[ $target != "?" ]] || fail "$label: the primary reports no ferry_sealed_seq"
    for p in "$@"; do
        for ((i = 0; i < 240; i++)); do
            acked=$(metric "$PA" "ferry_acked_seq{peer=\"$p\"}")
            [[ $acked != "?" ]] && ((acked >= target)) && break
            sleep 0.25
        done
        ((i < 240)) || fail "$label: $p did not ack seq $target within 60 s (acked: $acked)"
    done
    printf '    CAUGHT UP  after %-28s %6ss after it: %s acked seq %s (sealed when it healed), writes still running\n' \
        "$label:" "$(since "$ref")" "$*" "$target"
}

# --- 0. initial workload
say "workload: the writer writes in cluster A for 8 s"
sleep 8
writer_stop
t=$(now)
wait_converged "initial workload" "$t" "$t"

# --- 1. cluster C cut off while writes go on
say "fault 1: cluster C disconnected for ${PARTITION_SECS}s while the writer writes"
writer_start
start_poller
sleep 2
NETC=${P}_cluster-c
CID_C=$(cid ferry-c)
docker network disconnect "$NETC" "$CID_C"
sleep "$PARTITION_SECS"
# the partition is real: the primary lost ferry-c and C fell behind, B did not
conn_c=$(metric "$PA" 'ferry_peer_connected{peer="ferry-c"}')
conn_b=$(metric "$PA" 'ferry_peer_connected{peer="ferry-b"}')
sealed=$(metric "$PA" ferry_sealed_seq)
acked_c=$(metric "$PA" 'ferry_acked_seq{peer="ferry-c"}')
acked_b=$(metric "$PA" 'ferry_acked_seq{peer="ferry-b"}')
echo "    during the cut: primary sealed seq $sealed; ferry-b connected=$conn_b acked $acked_b;" \
    "ferry-c connected=$conn_c acked $acked_c"
[[ $conn_c == 0 && $conn_b == 1 ]] || fail "the partition did not take: ferry-c connected=$conn_c, ferry-b connected=$conn_b"
((sealed > acked_c)) || fail "ferry-c did not fall behind during the cut (sealed $sealed, acked $acked_c)"
# --alias: a reconnected container loses the service-name alias compose gave it
docker network connect --alias ferry-c "$NETC" "$CID_C"
t_heal=$(now)
wait_caught_up "reconnecting cluster C" "$t_heal" ferry-c
sleep 1
writer_stop
t_stop=$(now)
stop_poller
wait_converged "reconnecting cluster C" "$t_heal" "$t_stop"

# --- 2. a replica killed and started again
say "fault 2: replica B killed (SIGKILL) and started again while the writer writes"
writer_start
start_poller
sleep 2
docker kill "$(cid ferry-b)" >/dev/null
sleep 3
dc start ferry-b >/dev/null 2>&1
t_heal=$(now)
wait_ready "$PB"
wait_caught_up "restarting replica B" "$t_heal" ferry-b
sleep 1
writer_stop
t_stop=$(now)
stop_poller
wait_converged "restarting replica B" "$t_heal" "$t_stop"

# --- 3. the primary restarted
say "fault 3: the primary restarted (SIGTERM, start) while the writer writes"
writer_start
start_poller
sleep 2
timeout 60 "${DC[@]}" restart -t 15 ferry-a >/dev/null 2>&1 || fail "restarting the primary failed"
t_heal=$(now)
wait_ready "$PA"
wait_caught_up "restarting the primary" "$t_heal" ferry-b ferry-c
sleep 1
writer_stop
t_stop=$(now)
stop_poller
wait_converged "restarting the primary" "$t_heal" "$t_stop"

say "ferry status on each node"
for s in ferry-a ferry-b ferry-c; do
    echo "--- $s"
    # informational: exit 1 (degraded) or 2 (down) is shown, not fatal here
    docker exec "$(cid "$s")" ferry status --root /data 2>&1 | sed 's/^/    /' ||
        echo "    (ferry status exited $?: 1 degraded, 2 down)"
done
