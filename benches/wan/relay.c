// SPDX-License-Identifier: Apache-2.0
// A userspace WAN link, for kernels with neither sch_netem nor a qdisc that
// honours EDT timestamps (fq, etf): bridges two interfaces at layer 2 through
// AF_PACKET sockets and, in each direction, holds every frame for a fixed
// one-way delay, drops IP frames at random (LOSS_PPM per million), and can
// add a bottleneck of a given rate with a tail-drop queue.
//
// Link model per direction (what netem's "delay D loss P rate R" amounts
// to): a frame arriving at t leaves the bottleneck at
// d = max(t, previous d) + len * 8 / R (d = t with no rate); if d - t exceeds
// the queue limit it is dropped; otherwise it is delivered at d + D.
// Non-IP frames (ARP) are delayed but never dropped.
//
// The endpoints' veths must have segmentation and checksum offloads off
// (ethtool -K ... tso off gso off tx off): frames are relayed as they are,
// so each must be a whole, checksummed frame no larger than the MTU.
//
// Usage: relay IF_A IF_B DELAY_MS LOSS_PPM RATE_MBIT QUEUE_MS MAX_SECONDS
// Exits on SIGTERM/SIGINT, when either interface goes away (its namespace
// was deleted), or after MAX_SECONDS; then prints one line of counters per
// direction on stderr.
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <net/if.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifndef PACKET_IGNORE_OUTGOING
#define PACKET_IGNORE_OUTGOING 23
#endif

#define SLOT 2048       /* bytes per queued frame (MTU 1500 frames fit) */
#define SLOTS (1 << 14) /* frames queued per direction: 32 MiB */

struct frame {
	uint64_t due; /* ns, CLOCK_MONOTONIC */
	uint32_t len;
	unsigned char data[SLOT];
};

struct dir {
	const char *name;
	int in, out;
	struct frame *q;
	uint32_t head, tail; /* head: next to send; tail: next free */
	uint64_t depart;     /* when the bottleneck is next free (ns) */
	uint64_t fwd, fwd_bytes, lost, qdrop, full, oversize;
	uint64_t max_queue_ns;
};

static volatile sig_atomic_t stop;
static void on_signal(int s) { (void)s; stop = 1; }

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

static uint64_t rng;
static uint64_t xorshift(void)
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return rng;
}

static int open_if(const char *name)
{
	int s = socket(AF_PACKET, SOCK_RAW | SOCK_NONBLOCK, 0);
	if (s < 0) {
		perror("socket(AF_PACKET)");
		exit(1);
	}
	int one = 1, buf = 16 << 20;
	setsockopt(s, SOL_PACKET, PACKET_IGNORE_OUTGOING, &one, sizeof one);
	setsockopt(s, SOL_SOCKET, SO_RCVBUFFORCE, &buf, sizeof buf);
	setsockopt(s, SOL_SOCKET, SO_SNDBUFFORCE, &buf, sizeof buf);
	struct sockaddr_ll sll = {0};
	sll.sll_family = AF_PACKET;
	sll.sll_protocol = htons(ETH_P_ALL);
	sll.sll_ifindex = if_nametoindex(name);
	if (!sll.sll_ifindex) {
		fprintf(stderr, "relay: no interface %s\n", name);
		exit(1);
	}
	if (bind(s, (struct sockaddr *)&sll, sizeof sll) < 0) {
		perror("bind");
		exit(1);
	}
	return s;
}

int main(int argc, char **argv)
{
	if (argc != 8) {
		fprintf(stderr, "usage: relay IF_A IF_B DELAY_MS LOSS_PPM RATE_MBIT QUEUE_MS MAX_SECONDS\n");
		return 2;
	}
	uint64_t delay = (uint64_t)(atof(argv[3]) * 1e6);
	uint64_t loss_ppm = strtoull(argv[4], 0, 10);
	double rate_bps = atof(argv[5]) * 1e6;
	uint64_t queue_ns = (uint64_t)(atof(argv[6]) * 1e6);
	uint64_t end = now_ns() + strtoull(argv[7], 0, 10) * 1000000000ull;

	signal(SIGTERM, on_signal);
	signal(SIGINT, on_signal);
	rng = now_ns() | 1;

	int a = open_if(argv[1]), b = open_if(argv[2]);
	struct dir d[2] = {
	    {.name = "a->b", .in = a, .out = b},
	    {.name = "b->a", .in = b, .out = a},
	};
	for (int i = 0; i < 2; i++) {
		d[i].q = calloc(SLOTS, sizeof(struct frame));
		if (!d[i].q) {
			perror("calloc");
			return 1;
		}
	}
	fprintf(stderr, "relay: %s <-> %s, one-way delay %.3f ms, loss %llu ppm, rate %s Mbit/s, queue %.0f ms\n",
		argv[1], argv[2], delay / 1e6, (unsigned long long)loss_ppm,
		rate_bps > 0 ? argv[5] : "unlimited", queue_ns / 1e6);

	struct pollfd pfd[2] = {{.fd = a, .events = POLLIN}, {.fd = b, .events = POLLIN}};
	uint64_t next_check = 0;
	while (!stop) {
		uint64_t now = now_ns();
		if (now >= end) {
			fprintf(stderr, "relay: MAX_SECONDS reached\n");
			break;
		}
		if (now >= next_check) {
			if (!if_nametoindex(argv[1]) || !if_nametoindex(argv[2])) {
				fprintf(stderr, "relay: an interface went away\n");
				break;
			}
			next_check = now + 1000000000ull;
		}
		// send what is due; wait until the next frame is due, or 100 ms
		uint64_t wait = 100000000ull;
		for (int i = 0; i < 2; i++) {
			struct dir *x = &d[i];
			while (x->head != x->tail) {
				struct frame *f = &x->q[x->head % SLOTS];
				if (f->due > now) {
					if (f->due - now < wait)
						wait = f->due - now;
					break;
				}
				if (send(x->out, f->data, f->len, MSG_DONTWAIT) < 0 && (errno == EAGAIN || errno == ENOBUFS)) {
					wait = 50000; /* the device is busy: retry in 50 µs */
					break;
				}
				x->fwd++;
				x->fwd_bytes += f->len;
				x->head++;
			}
		}
		struct timespec ts = {.tv_sec = wait / 1000000000ull, .tv_nsec = wait % 1000000000ull};
		int n = ppoll(pfd, 2, &ts, NULL);
		if (n < 0 && errno != EINTR) {
			perror("ppoll");
			break;
		}
		for (int i = 0; i < 2; i++) {
			if (pfd[i].revents & (POLLERR | POLLHUP | POLLNVAL))
				next_check = 0;
			if (!(pfd[i].revents & POLLIN))
				continue;
			struct dir *x = &d[i];
			for (int k = 0; k < 256; k++) {
				struct frame *f = &x->q[x->tail % SLOTS];
				ssize_t len = recv(x->in, f->data, SLOT, MSG_DONTWAIT | MSG_TRUNC);
				if (len < 0)
					break;
				uint64_t t = now_ns();
				if (len > SLOT) {
					x->oversize++;
					continue;
				}
				if (x->tail - x->head >= SLOTS) {
					x->full++;
					continue;
				}
				uint16_t proto = len >= 14 ? (uint16_t)(f->data[12] << 8 | f->data[13]) : 0;
				int ip = proto == ETH_P_IP || proto == ETH_P_IPV6;
				if (ip && loss_ppm && xorshift() % 1000000 < loss_ppm) {
					x->lost++;
					continue;
				}
				uint64_t leave = t;
				if (rate_bps > 0) {
					uint64_t start = x->depart > t ? x->depart : t;
					leave = start + (uint64_t)(len * 8 / rate_bps * 1e9);
					if (leave - t > queue_ns) {
						x->qdrop++;
						continue;
					}
					x->depart = leave;
					if (leave - t > x->max_queue_ns)
						x->max_queue_ns = leave - t;
				}
				f->due = leave + delay;
				f->len = (uint32_t)len;
				x->tail++;
			}
		}
	}
	for (int i = 0; i < 2; i++)
		fprintf(stderr,
			"relay %s: forwarded %llu frames (%llu bytes), lost %llu (random), dropped %llu (queue over limit), "
			"%llu (relay full), %llu (oversize), max queueing %.1f ms\n",
			d[i].name, (unsigned long long)d[i].fwd, (unsigned long long)d[i].fwd_bytes,
			(unsigned long long)d[i].lost, (unsigned long long)d[i].qdrop, (unsigned long long)d[i].full,
			(unsigned long long)d[i].oversize, d[i].max_queue_ns / 1e6);
	return 0;
}
