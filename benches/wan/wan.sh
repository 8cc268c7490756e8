#!/usr/bin/env bash
# An emulated WAN link between two network namespaces, for benchmark W6.
#
#   wan.sh up TAG [DELAY_MS_ONE_WAY [LOSS_PPM [RATE_MBIT [MAX_SECONDS]]]]
#                    (defaults 50, 1000, 0 = no rate limit, 21600: the relay's lifetime bound)
#   wan.sh ping TAG                                          (RTT and loss through the link)
#   wan.sh down TAG                                          (removes everything `up` made)
#
# `up` prints KEY=value lines (value unquoted, to the end of the line): NS_A, NS_B (namespaces), IP_A, IP_B,
# DEV_A (ns A's interface), MODE (edt or relay) and WHY (why that mode).
#
# Two ways, the first that this kernel allows:
#   edt    A and B joined by one veth pair; on each end an fq qdisc and the
#          tc-bpf egress program delay.bpf.c, which stamps each packet with a
#          departure time DELAY later and drops LOSS_PPM per million (needs
#          sch_fq, which honours skb->tstamp; clang and libbpf headers).
#   relay  A -- R -- B: two veth pairs into a third namespace R, where
#          relay.c bridges them through AF_PACKET sockets, holding each frame
#          DELAY and dropping LOSS_PPM per million (for kernels with neither
#          sch_netem nor sch_fq / sch_etf).
# Both: segmentation and checksum offloads off on every veth (one packet per
# skb, so loss is per packet as on a real link), IPv6 off (no stray traffic).
# Every step of `up` is undone by `down`, which is safe to run twice.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cmd=${1:?usage: wan.sh up|ping|down TAG ...}
tag=${2:?a TAG (e.g. the caller pid)}
state=/tmp/ferry-wan-$tag
NS_A=fwa-$tag NS_B=fwb-$tag NS_R=fwr-$tag
DEV_A=fwa$tag DEV_B=fwb$tag
IP_A=10.77.0.1 IP_B=10.77.0.2

down() {
    if [[ -f $state/relay.pid ]]; then
        pid=$(cat "$state/relay.pid")
        # only our own relay: check its command line before signalling
        if [[ -r /proc/$pid/cmdline ]] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q "$state/relay"; then
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 50); do [[ -d /proc/$pid ]] || break; sleep 0.1; done
        fi
    fi
    for ns in "$NS_A" "$NS_B" "$NS_R"; do
        ip netns del "$ns" 2>/dev/null || true
    done
    # a veth whose namespace is gone is gone too; these only exist if `up` died early
    for dev in "$DEV_A" "$DEV_B" "fwra$tag" "fwrb$tag"; do
        ip link del "$dev" 2>/dev/null || true
    done
    [[ -f $state/relay.log ]] && cat "$state/relay.log" >&2 || true
    rm -rf "$state"
}

offloads_off() { # ns dev
    ip netns exec "$1" ethtool -K "$2" tso off gso off gro off tx off rx off tx-udp-segmentation off >/dev/null 2>&1 ||
        ip netns exec "$1" ethtool -K "$2" tso off gso off gro off tx off rx off >/dev/null
}

ns_up() { # ns
    ip netns add "$1"
    ip netns exec "$1" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
    ip -n "$1" link set lo up
}

up() {
    local delay_ms=${1:-50} loss_ppm=${2:-1000} rate=${3:-0} max_s=${4:-21600}
    down 2>/dev/null
    mkdir -p "$state"
    command -v ethtool >/dev/null || { echo "wan.sh: ethtool is needed (apt-get install ethtool)" >&2; exit 1; }
    ns_up "$NS_A"; ns_up "$NS_B"
    local mode why
    # EDT needs a qdisc that honours skb->tstamp: probe for fq on ns A's loopback
    if ip netns exec "$NS_A" tc qdisc add dev lo root fq 2>"$state/fq.err"; then
        ip netns exec "$NS_A" tc qdisc del dev lo root
        if [[ $rate != 0 ]]; then
            mode=relay why="a rate limit was asked for; the EDT program has none"
        elif command -v clang >/dev/null && [[ -f /usr/include/bpf/bpf_helpers.h ]]; then
            mode=edt why="sch_fq present"
        else
            mode=relay why="sch_fq present but no clang or libbpf headers to build delay.bpf.c"
        fi
    else
        mode=relay why="no EDT qdisc: 'tc qdisc add ... fq' fails ($(tr -d '\n' <"$state/fq.err")); this kernel has neither sch_fq nor sch_etf, which are what honour skb->tstamp, nor sch_netem"
    fi
    if [[ $mode == edt ]]; then
        clang -O2 -g -target bpf -I/usr/include/"$(uname -m)"-linux-gnu \
            -DDELAY_NS="$((delay_ms * 1000000))ULL" -DLOSS_PPM="$loss_ppm" \
            -c "$here/delay.bpf.c" -o "$state/delay.o"
        ip link add "$DEV_A" type veth peer name "$DEV_B"
        ip link set "$DEV_A" netns "$NS_A"; ip link set "$DEV_B" netns "$NS_B"
        for side in A B; do
            local ns=NS_$side dev=DEV_$side
            offloads_off "${!ns}" "${!dev}"
            ip netns exec "${!ns}" tc qdisc add dev "${!dev}" root fq
            ip netns exec "${!ns}" tc qdisc add dev "${!dev}" clsact
            ip netns exec "${!ns}" tc filter add dev "${!dev}" egress bpf da obj "$state/delay.o" sec tc
        done
    else
        ns_up "$NS_R"
        ip link add "$DEV_A" type veth peer name "fwra$tag"
        ip link add "$DEV_B" type veth peer name "fwrb$tag"
        ip link set "$DEV_A" netns "$NS_A"; ip link set "$DEV_B" netns "$NS_B"
        ip link set "fwra$tag" netns "$NS_R"; ip link set "fwrb$tag" netns "$NS_R"
        for d in "fwra$tag" "fwrb$tag"; do
            offloads_off "$NS_R" "$d"
            ip -n "$NS_R" link set "$d" up
        done
        offloads_off "$NS_A" "$DEV_A"; offloads_off "$NS_B" "$DEV_B"
        cc -O2 -Wall -o "$state/relay" "$here/relay.c"
        # bounded: the relay exits by itself after max_s, or once `down` deletes A or B
        ip netns exec "$NS_R" "$state/relay" "fwra$tag" "fwrb$tag" "$delay_ms" "$loss_ppm" "$rate" 200 "$max_s" \
            </dev/null >"$state/relay.log" 2>&1 &
        echo $! >"$state/relay.pid"
    fi
    ip -n "$NS_A" addr add "$IP_A/24" dev "$DEV_A"; ip -n "$NS_B" addr add "$IP_B/24" dev "$DEV_B"
    ip -n "$NS_A" link set "$DEV_A" up; ip -n "$NS_B" link set "$DEV_B" up
    # wait (bounded) until the link passes packets: ARP resolves through it
    for _ in $(seq 50); do
        ip netns exec "$NS_A" ping -c 1 -W 1 -q "$IP_B" >/dev/null 2>&1 && break
    done
    printf 'NS_A=%s\nNS_B=%s\nIP_A=%s\nIP_B=%s\nDEV_A=%s\nMODE=%s\nWHY=%s\n' \
        "$NS_A" "$NS_B" "$IP_A" "$IP_B" "$DEV_A" "$mode" "$why"
}

case $cmd in
up) shift 2; up "$@" ;;
down) down ;;
ping) ip netns exec "$NS_A" ping -c "${3:-20}" -i 0.2 -q "$IP_B" | tail -2 ;;
*) echo "usage: wan.sh up|ping|down TAG" >&2; exit 2 ;;
esac
