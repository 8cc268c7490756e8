// SPDX-License-Identifier: GPL-2.0
// WAN emulation by Earliest Departure Time (EDT), for kernels without
// sch_netem: a tc-bpf egress program (cls_bpf, direct action) that stamps
// every packet with a departure time DELAY_NS in the future and drops
// LOSS_PPM per million packets. The delay only takes effect under a qdisc
// that honours skb->tstamp (fq, or etf); benches/wan/wan.sh checks for one
// and falls back to benches/wan/relay.c when the kernel has neither.
//
// Build: clang -O2 -g -target bpf -DDELAY_NS=50000000 -DLOSS_PPM=1000 \
//          -c delay.bpf.c -o delay.o
// Load:  tc qdisc add dev X root fq
//        tc qdisc add dev X clsact
//        tc filter add dev X egress bpf da obj delay.o sec tc
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

#ifndef DELAY_NS
#define DELAY_NS 50000000ULL /* one way: 50 ms, so 100 ms RTT with both ends */
#endif
#ifndef LOSS_PPM
#define LOSS_PPM 1000 /* 0.1 % */
#endif

SEC("tc")
int wan_egress(struct __sk_buff *skb)
{
	if (LOSS_PPM && bpf_get_prandom_u32() % 1000000 < LOSS_PPM)
		return TC_ACT_SHOT;
	__u64 at = bpf_ktime_get_ns() + DELAY_NS;
	// keep a later stamp (the sender's own pacing), never move one earlier
	if (skb->tstamp < at)
		skb->tstamp = at;
	return TC_ACT_OK;
}

char _license[] SEC("license") = "GPL";
