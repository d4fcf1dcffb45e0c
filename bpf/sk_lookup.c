// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * sk_lookup.c - kernform's inbound interception: connections (and UDP
 * datagrams) to intercepted destinations are handed to a proxy's socket.
 *
 * Attach point: BPF_PROG_TYPE_SK_LOOKUP (30), function kf_sk_lookup,
 * attached to a network namespace with bpf_link_create(prog_fd, netns_fd,
 * BPF_SK_LOOKUP (36)). The kernel runs it when it looks for a listening
 * TCP socket or an unconnected UDP socket for a packet routed to a LOCAL
 * address, including a SYN that hits a TIME_WAIT entry (the reason this
 * replaced tc + bpf_sk_assign). Non-local destinations therefore need a
 * local route: `ip route add local <prefix> dev lo` (or policy routing).
 * The proxy socket may be bound to any address and port (e.g.
 * 127.0.0.1:15006); only family and protocol must match. getsockname() on
 * the accepted socket returns the original destination.
 *
 * Maps (layouts in lib/kf_types.h, documented in bpf/README.md):
 *   intercept_v4 / intercept_v6, intercept_rules, intercept_counters
 *                      matched on the destination, see below
 *   intercept_ifs   hash      u32 ifindex -> kf_rule_set    [KF_MAX_IFACES]
 *   proxy_socks        sockmap   u32 slot -> socket for IPv4 (a TCP listener
 *                      or an unconnected UDP socket)      [KF_MAX_PROXIES]
 *   proxy_socks6       sockmap   u32 slot -> socket for IPv6  [KF_MAX_PROXIES]
 *                      8-byte values: userspace writes the fd as a u64 and
 *                      reads back the socket cookie (with 4-byte values the
 *                      kernel refuses userspace lookups, ENOSPC)
 *
 * Interfaces: a rule applies only to connections arriving on its interfaces
 * (`intercept_ifs`, ifindex -> bitmap of the rules allowed there, keyed
 * by interface name on the Python side and resolved by the reconciler).
 * A connection from a local source address (local_addrs, loopback) is the
 * namespace's own: it counts as arriving on lo, whatever interface the kernel
 * reports (a local connection to an interface's address is reported on that
 * interface), so only a rule naming lo takes it, as with the tproxy backend.
 *
 * A REDIRECT rule whose slot holds no socket of the right protocol lets
 * the packet continue to the normal lookup (counted as no_proxy), so a
 * proxy restart fails open rather than black-holing the destination.
 *
 * Settings: KF_MAX_RULES, KF_MAX_PREFIXES, KF_MAX_PROXIES, KF_PIN_DIR.
 */
#include <uapi/linux/bpf.h>

#include "lib/kf_common.h"
#include "lib/kf_local.h" /* local_addrs: the namespace's own connections are not inbound */
#include "lib/kf_maps.h"
#include "lib/kf_types.h"

#ifndef KF_MAX_PROXIES
#define KF_MAX_PROXIES 64
#endif
#ifndef KF_MAX_IFACES
#define KF_MAX_IFACES 256
#endif

/* Interception rules; the same maps and matcher as in sock_connect.c (bcc
 * rewrites map calls only in the main file, so they cannot live in a header). */
KF_LPM(struct kf_lpm_v4, struct kf_rule_set, intercept_v4, KF_MAX_PREFIXES);
KF_LPM(struct kf_lpm_v6, struct kf_rule_set, intercept_v6, KF_MAX_PREFIXES);
KF_MAP("array", u32, struct kf_intercept_rule, intercept_rules, KF_MAX_RULES);
KF_MAP("percpu_array", u32, struct kf_intercept_counter, intercept_counters, KF_MAX_RULES);
KF_MAP("hash", u32, struct kf_rule_set, intercept_ifs, KF_MAX_IFACES);

#define KF_ICPT_COUNT_REDIRECTED 0
#define KF_ICPT_COUNT_BYPASSED 1
#define KF_ICPT_COUNT_NO_PROXY 2

KF_ALWAYS_INLINE void kf_intercept_count(struct kf_intercept_rule *r, int what)
{
	__u32 idx = r->counter;
	struct kf_intercept_counter *c = intercept_counters.lookup(&idx);

	if (!c)
		return;
	if (what == KF_ICPT_COUNT_REDIRECTED)
		c->redirected++;
	else if (what == KF_ICPT_COUNT_BYPASSED)
		c->bypassed++;
	else
		c->no_proxy++;
}

/*
 * First rule (lowest index) whose interfaces, destination prefix, protocol
 * and port range match; NULL if none. family is 4 or 6, addr network order.
 * A BYPASS descriptor (an exclusion) takes its rule out of the search, and
 * later rules are still tried: the same meaning as the tproxy backend's
 * exclusions, which make only their own rule not match.
 */
KF_ALWAYS_INLINE struct kf_intercept_rule *
kf_intercept_lookup(__u32 ifindex, __u8 family, const __u8 *addr, __u8 proto, __u16 port)
{
	struct kf_rule_set *set, *ifset;
	struct kf_intercept_rule *r;
	__u32 w, j, idx, bit, skip = (__u32)-1;

	ifset = intercept_ifs.lookup(&ifindex);
	if (!ifset)
		return NULL;

	if (family == 4) {
		struct kf_lpm_v4 k = {.prefixlen = 32};

		__builtin_memcpy(k.addr, addr, 4);
		set = intercept_v4.lookup(&k);
	} else {
		struct kf_lpm_v6 k6 = {.prefixlen = 128};

		__builtin_memcpy(k6.addr, addr, 16);
		set = intercept_v6.lookup(&k6);
	}
	if (!set)
		return NULL;

	for (w = 0; w < KF_BITMAP_WORDS; w++) {
		__u64 bits = set->w[w] & ifset->w[w];

		for (j = 0; j < 64 && bits; j++) {
			bit = kf_ctz64(bits);
			idx = w * 64 + bit;
			bits &= bits - 1;
			r = intercept_rules.lookup(&idx);
			if (!r || r->action == KF_ICPT_NONE || r->counter == skip)
				continue;
			if (r->proto && r->proto != proto)
				continue;
			if (port < r->port_lo || port > r->port_hi)
				continue;
			if (r->action == KF_ICPT_BYPASS) {
				kf_intercept_count(r, KF_ICPT_COUNT_BYPASSED);
				skip = r->counter;
				continue;
			}
			return r;
		}
	}
	return NULL;
}

/*
 * Sockmaps declared as tables so that bcc offers .lookup(); u64 values so
 * that the reconciler can read the socket cookies back (see the header).
 * A slot has a socket per family, because proxies commonly listen on two
 * sockets (0.0.0.0:port and [::]:port with IPV6_V6ONLY): proxy_socks holds
 * the one for IPv4 (an AF_INET socket, or a dual-stack AF_INET6 one),
 * proxy_socks6 the one for IPv6 (AF_INET6). bpf_sk_assign refuses a socket
 * of the wrong family.
 */
KF_MAP("sockmap", u32, u64, proxy_socks, KF_MAX_PROXIES);
KF_MAP("sockmap", u32, u64, proxy_socks6, KF_MAX_PROXIES);

int kf_sk_lookup(struct bpf_sk_lookup *ctx)
{
	struct kf_intercept_rule *rule;
	struct kf_addr_key src = {};
	struct bpf_sock *sk;
	__u8 addr[16] = {};
	__u32 ifindex, proto, port;
	__u8 family;
	__u32 slot;
	long err;

	if (ctx->family == KF_AF_INET) {
		__u32 a = ctx->local_ip4;

		KF_BARRIER();
		__u32 r = ctx->remote_ip4;

		KF_BARRIER();
		family = 4;
		__builtin_memcpy(addr, &a, 4);
		__builtin_memcpy(src.addr, &r, 4);
	} else if (ctx->family == KF_AF_INET6) {
		__u32 a6[4];

		a6[0] = ctx->local_ip6[0];
		a6[1] = ctx->local_ip6[1];
		a6[2] = ctx->local_ip6[2];
		a6[3] = ctx->local_ip6[3];
		KF_BARRIER();
		__u32 r6[4];

		r6[0] = ctx->remote_ip6[0];
		r6[1] = ctx->remote_ip6[1];
		r6[2] = ctx->remote_ip6[2];
		r6[3] = ctx->remote_ip6[3];
		KF_BARRIER();
		family = 6;
		__builtin_memcpy(addr, a6, 16);
		__builtin_memcpy(src.addr, r6, 16);
	} else {
		return SK_PASS;
	}
	/* Each ctx field is read by its own load: the verifier refuses a ctx access through a pointer
	 * the compiler derived from ctx and kept (KF_BARRIER() keeps it from merging them). */
	proto = ctx->protocol;
	KF_BARRIER();
	port = ctx->local_port;
	KF_BARRIER();
	ifindex = ctx->ingress_ifindex;
	KF_BARRIER();

	/* The namespace's own connection arrives on lo, as the tproxy backend's prerouting sees it:
	 * captured only by a rule that names lo (1 is loopback's ifindex in every namespace). */
	src.family = family;
	if (kf_is_local_by_form(family, src.addr) || local_addrs.lookup(&src))
		ifindex = 1;
	rule = kf_intercept_lookup(ifindex, family, addr, (__u8)proto, (__u16)port);
	if (!rule)
		return SK_PASS;

	slot = rule->proxy_slot;
	if (family == 4)
		sk = (struct bpf_sock *)proxy_socks.lookup(&slot);
	else
		sk = (struct bpf_sock *)proxy_socks6.lookup(&slot);
	if (!sk) {
		kf_intercept_count(rule, KF_ICPT_COUNT_NO_PROXY);
		return SK_PASS;
	}
	err = bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	kf_intercept_count(rule, err ? KF_ICPT_COUNT_NO_PROXY : KF_ICPT_COUNT_REDIRECTED);
	return SK_PASS;
}
