// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * sock_connect.c - kernform's socket-level services: load balancing of
 * virtual IPs to backends, and outbound interception to a local proxy
 * with recovery of the original destination (SO_ORIGINAL_DST).
 *
 * Attach points, all on one cgroup v2 directory (the workloads' and the
 * proxy's common ancestor), all sharing this object's maps:
 *   function         prog type               expected / attach type
 *   kf_connect4      CGROUP_SOCK_ADDR (18)   CGROUP_INET4_CONNECT (10)
 *   kf_connect6      CGROUP_SOCK_ADDR (18)   CGROUP_INET6_CONNECT (11)
 *   kf_sendmsg4      CGROUP_SOCK_ADDR (18)   CGROUP_UDP4_SENDMSG (14)
 *   kf_sendmsg6      CGROUP_SOCK_ADDR (18)   CGROUP_UDP6_SENDMSG (15)
 *   kf_recvmsg4      CGROUP_SOCK_ADDR (18)   CGROUP_UDP4_RECVMSG (19)
 *   kf_recvmsg6      CGROUP_SOCK_ADDR (18)   CGROUP_UDP6_RECVMSG (20)
 *   kf_sockops       SOCK_OPS (13)           CGROUP_SOCK_OPS (3)
 *   kf_getsockopt    CGROUP_SOCKOPT (25)     CGROUP_GETSOCKOPT (21)
 * The expected attach type must be given at load time as well.
 *
 * connect (TCP and connected UDP), in this order:
 *  1. interception: if the destination matches a REDIRECT rule of
 *     intercept_rules and the caller's uid is not in exclude_uid nor its
 *     gid in exclude_gid, the destination becomes the proxy
 *     (KF_PROXY_V4 / ::1, rule.proxy_port) and the original destination is
 *     stored in orig_dst[socket cookie]. A BYPASS rule stops here too.
 *  2. load balancing: if {destination, port, protocol} is in services_v4/6,
 *     a Maglev slot picks a backend, and the destination becomes it.
 * connect6 handles v4-mapped destinations (::ffff:a.b.c.d) with the IPv4
 * maps. So the proxy's own upstream connections are balanced but not
 * intercepted again (run the proxy under an excluded uid/gid).
 *
 * Original destination: sock_ops sees the client socket become
 * established and copies orig_dst[cookie] to orig_dst_tuple[client
 * addr/port, proxy addr/port]; the proxy's getsockopt(SOL_IP,
 * SO_ORIGINAL_DST) (or SOL_IPV6, IP6T_SO_ORIGINAL_DST) on the accepted
 * socket finds it by the same 4-tuple, seen from the other side, and gets
 * a sockaddr_in (sockaddr_in6). The cookie cannot be used directly:
 * the proxy's socket is a different socket. TCP only.
 *
 * Affinity at socket level: there is no packet, and in connect the source
 * address is usually not chosen yet; all sockets of a network namespace
 * share the addresses a backend would see as "the client". KF_LB_AFFINITY
 * therefore hashes the identity of the client namespace
 * (bpf_get_netns_cookie, KF_AFFINITY_KEY=0, the default: same as
 * source-IP affinity for a pod or host) or of the client's cgroup
 * (bpf_get_current_cgroup_id, KF_AFFINITY_KEY=1: per workload), mixed with
 * the socket's bound source address when it has one. The socket cookie is
 * never used: it differs for every connection. KF_LB_RANDOM uses
 * bpf_get_prandom_u32; the Maglev table carries the weights in both cases.
 *
 * Unconnected UDP: sendmsg4/6 balance each datagram and remember the
 * translation in rev_nat; recvmsg4/6 rewrite the reply's source back to
 * the VIP so the application sees the address it sent to.
 *
 * Maps (layouts in lib/kf_types.h, documented in bpf/README.md):
 *   services_v4      hash      kf_svc_key_v4 -> kf_service     [KF_MAX_SERVICES]
 *   services_v6      hash      kf_svc_key_v6 -> kf_service     [KF_MAX_SERVICES]
 *   maglev           hash      kf_maglev_key {id, slot / 256} -> kf_maglev_chunk: 256 slots,
 *                              each a u32 backend index + 1 (0: empty)  [KF_MAGLEV_CHUNKS]
 *   backends_v4      hash      kf_maglev_key {id, position / 16} -> kf_backend_chunk_v4:
 *                              16 kf_backend_v4, the service's backends in order  [KF_BACKEND_CHUNKS]
 *   backends_v6      hash      the same with kf_backend_chunk_v6                  [KF_BACKEND_CHUNKS]
 *   rev_nat          LRU hash  kf_rev_nat_key -> kf_rev_nat_value [KF_ORIG_DST_ENTRIES]
 *   intercept_v4/v6, intercept_rules, intercept_counters   (as in sk_lookup.c)
 *   exclude_uid      hash      u32 uid -> u8 (any value)       [KF_MAX_EXCLUDES]
 *   exclude_gid      hash      u32 gid -> u8 (any value)       [KF_MAX_EXCLUDES]
 *   local_addrs      hash      kf_addr_key -> u8: the namespace's own addresses,
 *                              never intercepted (nor is loopback) [KF_MAX_LOCAL_ADDRS]
 *   orig_dst         LRU hash  u64 socket cookie -> kf_orig_dst [KF_ORIG_DST_ENTRIES]
 *   orig_dst_tuple   LRU hash  kf_tuple_key -> kf_orig_dst      [KF_ORIG_DST_ENTRIES]
 *
 * Settings: KF_MAX_RULES, KF_MAX_PREFIXES, KF_MAX_SERVICES, KF_MAX_BACKENDS,
 * KF_MAGLEV_CHUNKS, KF_MAX_EXCLUDES, KF_ORIG_DST_ENTRIES,
 * KF_AFFINITY_KEY, KF_PROXY_V4, KF_PIN_DIR.
 */
#include <uapi/linux/bpf.h>

#include "lib/kf_common.h"
#include "lib/kf_lb_tables.h" /* services, maglev, backends: as in tc_lb.c */
#include "lib/kf_local.h"     /* local_addrs */
#include "lib/kf_maps.h"
#include "lib/kf_types.h"

#ifndef KF_MAX_EXCLUDES
#define KF_MAX_EXCLUDES 256
#endif
#ifndef KF_ORIG_DST_ENTRIES
#define KF_ORIG_DST_ENTRIES 65536
#endif
#ifndef KF_AFFINITY_KEY
#define KF_AFFINITY_KEY 0 /* 0 = network namespace, 1 = cgroup */
#endif
#ifndef KF_PROXY_V4
#define KF_PROXY_V4 0x7f000001 /* host order: 127.0.0.1 */
#endif

KF_MAP("lru_hash", struct kf_rev_nat_key, struct kf_rev_nat_value, rev_nat, KF_ORIG_DST_ENTRIES);
KF_MAP("hash", u32, u8, exclude_uid, KF_MAX_EXCLUDES);
KF_MAP("hash", u32, u8, exclude_gid, KF_MAX_EXCLUDES);
KF_MAP("lru_hash", u64, struct kf_orig_dst, orig_dst, KF_ORIG_DST_ENTRIES);
KF_MAP("lru_hash", struct kf_tuple_key, struct kf_orig_dst, orig_dst_tuple, KF_ORIG_DST_ENTRIES);

/* Interception rules; the same maps and matcher as in sk_lookup.c (bcc
 * rewrites map calls only in the main file, so they cannot live in a header). */
KF_LPM(struct kf_lpm_v4, struct kf_rule_set, intercept_v4, KF_MAX_PREFIXES);
KF_LPM(struct kf_lpm_v6, struct kf_rule_set, intercept_v6, KF_MAX_PREFIXES);
KF_MAP("array", u32, struct kf_intercept_rule, intercept_rules, KF_MAX_RULES);
KF_MAP("percpu_array", u32, struct kf_intercept_counter, intercept_counters, KF_MAX_RULES);

#define KF_ICPT_COUNT_REDIRECTED 0
#define KF_ICPT_COUNT_BYPASSED 1
#define KF_ICPT_COUNT_NO_PROXY 2

KF_ALWAYS_INLINE void kf_intercept_count(struct kf_intercept_rule *r, int what);

/*
 * First REDIRECT rule (lowest index) whose destination prefix, protocol and
 * port range match; NULL if none. family is 4 or 6, addr network order. A
 * BYPASS descriptor (an exclusion) takes its own rule out of the search;
 * later rules are still tried (as with the tproxy backend).
 */
KF_ALWAYS_INLINE struct kf_intercept_rule *
kf_intercept_lookup(__u8 family, const __u8 *addr, __u8 proto, __u16 port)
{
	struct kf_rule_set *set;
	struct kf_intercept_rule *r;
	__u32 w, j, idx, skip = (__u32)-1;

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
		__u64 bits = set->w[w];

		for (j = 0; j < 64 && bits; j++) {
			idx = w * 64 + kf_ctz64(bits);
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

/* A destination as the socket programs see it. */
struct kf_dst {
	__u8 family; /* 4 or 6 (4 also for a v4-mapped address on a v6 socket) */
	__u8 mapped; /* v4-mapped on an AF_INET6 socket */
	__u8 proto;
	__u8 pad;
	__u16 port;  /* host order */
	__u16 pad2;
	__u8 addr[16];
};

KF_ALWAYS_INLINE void kf_read_dst4(struct bpf_sock_addr *ctx, struct kf_dst *d)
{
	__u32 a = ctx->user_ip4;

	d->family = 4;
	d->proto = (__u8)ctx->protocol;
	d->port = kf_ntohs((__u16)ctx->user_port);
	__builtin_memcpy(d->addr, &a, 4);
}

KF_ALWAYS_INLINE int kf_is_v4_mapped(const __u32 *a)
{
	return a[0] == 0 && a[1] == 0 && a[2] == bpf_htonl(0xffff);
}

KF_ALWAYS_INLINE void kf_read_dst6(struct bpf_sock_addr *ctx, struct kf_dst *d)
{
	__u32 a[4];

	a[0] = ctx->user_ip6[0];
	a[1] = ctx->user_ip6[1];
	a[2] = ctx->user_ip6[2];
	a[3] = ctx->user_ip6[3];
	d->proto = (__u8)ctx->protocol;
	d->port = kf_ntohs((__u16)ctx->user_port);
	if (kf_is_v4_mapped(a)) {
		d->family = 4;
		d->mapped = 1;
		__builtin_memcpy(d->addr, &a[3], 4);
	} else {
		d->family = 6;
		__builtin_memcpy(d->addr, a, 16);
	}
}

/* Writes addr/port (family as in d) into the socket's destination. */
KF_ALWAYS_INLINE void kf_write_dst(struct bpf_sock_addr *ctx, int is6, struct kf_dst *d,
				   const __u8 *addr, __u16 port)
{
	__u32 a[4] = {};

	if (d->family == 4) {
		__builtin_memcpy(&a[3], addr, 4);
		if (!is6) {
			ctx->user_ip4 = a[3];
		} else {
			ctx->user_ip6[0] = 0;
			ctx->user_ip6[1] = 0;
			ctx->user_ip6[2] = bpf_htonl(0xffff);
			ctx->user_ip6[3] = a[3];
		}
	} else {
		__builtin_memcpy(a, addr, 16);
		ctx->user_ip6[0] = a[0];
		ctx->user_ip6[1] = a[1];
		ctx->user_ip6[2] = a[2];
		ctx->user_ip6[3] = a[3];
	}
	ctx->user_port = kf_htons(port);
}

/*
 * Local by form (kf_local.h: loopback, multicast, broadcast) or an address of this network namespace:
 * local_addrs mirrors the namespace's addresses (the reconciler keeps it
 * equal to them; see bpf/README.md). v4-mapped destinations are IPv4 here.
 */
KF_ALWAYS_INLINE int kf_is_local(struct kf_dst *d)
{
	struct kf_addr_key k = {};

	if (kf_is_local_by_form(d->family, d->addr))
		return 1;
	k.family = d->family;
	__builtin_memcpy(k.addr, d->addr, 16);
	return local_addrs.lookup(&k) != NULL;
}

KF_ALWAYS_INLINE int kf_excluded(void)
{
	__u64 ugid = bpf_get_current_uid_gid();
	__u32 uid = (__u32)ugid, gid = (__u32)(ugid >> 32);

	return exclude_uid.lookup(&uid) || exclude_gid.lookup(&gid);
}

/*
 * Outbound interception. Returns 1 if the destination was rewritten to
 * the proxy, 0 if the connect continues to load balancing.
 */
KF_ALWAYS_INLINE int kf_intercept(struct bpf_sock_addr *ctx, int is6, struct kf_dst *d)
{
	struct kf_intercept_rule *rule;
	struct kf_orig_dst orig = {};
	__u8 proxy[16] = {};
	__u64 cookie;

	/* Local destinations are never intercepted (tproxy: `fib daddr type != local`). */
	if (kf_is_local(d))
		return 0;
	rule = kf_intercept_lookup(d->family, d->addr, d->proto, d->port);
	if (!rule)
		return 0;
	if (kf_excluded()) {
		kf_intercept_count(rule, KF_ICPT_COUNT_BYPASSED);
		return 0;
	}
	if (d->family == 4) {
		__u32 p = bpf_htonl(KF_PROXY_V4);

		__builtin_memcpy(proxy, &p, 4);
		orig.family = KF_AF_INET;
	} else {
		proxy[15] = 1; /* ::1 */
		orig.family = KF_AF_INET6;
	}
	orig.proto = d->proto;
	orig.port = d->port;
	__builtin_memcpy(orig.addr, d->addr, 16);
	cookie = kf_get_socket_cookie(ctx);
	orig_dst.update(&cookie, &orig);
	kf_write_dst(ctx, is6, d, proxy, rule->proxy_port);
	kf_intercept_count(rule, KF_ICPT_COUNT_REDIRECTED);
	return 1;
}

/* Identity that KF_LB_AFFINITY keeps on one backend (see the header). */
KF_ALWAYS_INLINE __u64 kf_affinity_id(struct bpf_sock_addr *ctx, int is6)
{
	struct bpf_sock *sk = ctx->sk;
	__u64 id;

#if KF_AFFINITY_KEY == 1
	id = bpf_get_current_cgroup_id();
#else
	id = bpf_get_netns_cookie(ctx);
#endif
	if (sk) {
		if (!is6) {
			id ^= kf_mix64(sk->src_ip4);
		} else {
			id ^= kf_mix64(((__u64)sk->src_ip6[0] << 32) | sk->src_ip6[1]);
			id ^= kf_mix64(((__u64)sk->src_ip6[2] << 32) | sk->src_ip6[3]) >> 1;
		}
	}
	return id;
}

/* A balanced (chosen = 1) or refused (0) connect()/sendmsg() of service id. */
KF_ALWAYS_INLINE void kf_lb_count(__u32 id, int chosen)
{
	struct kf_lb_counter *c = lb_counters.lookup(&id);

	if (!c) {
		struct kf_lb_counter zero = {};

		lb_counters.update(&id, &zero);
		c = lb_counters.lookup(&id);
		if (!c)
			return;
	}
	if (chosen)
		c->new_flows++;
	else
		c->dropped++;
}

KF_ALWAYS_INLINE void kf_lb_count_backend(__u32 id, __u32 pos)
{
	struct kf_maglev_key k = {.id = id, .chunk = pos};
	struct kf_lb_backend_counter *c;

	c = lb_be_counters.lookup(&k);
	if (!c) {
		struct kf_lb_backend_counter zero = {};

		lb_be_counters.update(&k, &zero);
		c = lb_be_counters.lookup(&k);
	}
	if (c)
		c->connections++;
}

/*
 * Picks a backend for d if d is a service. Returns 1 and fills addr/port
 * with the backend, 0 if d is not a service, -1 if the service has no
 * backend (the connect is refused).
 */
KF_ALWAYS_INLINE int kf_pick_backend(struct bpf_sock_addr *ctx, int is6, struct kf_dst *d,
				     __u8 *addr, __u16 *port)
{
	struct kf_maglev_key mk = {};
	struct kf_maglev_chunk *chunk;
	struct kf_service *svc;
	__u32 slot, idx, size;

	if (d->family == 4) {
		struct kf_svc_key_v4 k = {};

		__builtin_memcpy(k.vip, d->addr, 4);
		k.port = d->port;
		k.proto = d->proto;
		svc = services_v4.lookup(&k);
	} else {
		struct kf_svc_key_v6 k6 = {};

		__builtin_memcpy(k6.vip, d->addr, 16);
		k6.port = d->port;
		k6.proto = d->proto;
		svc = services_v6.lookup(&k6);
	}
	if (!svc)
		return 0;
	size = svc->maglev_size;
	if (svc->backend_count == 0 || svc->id >= KF_MAX_SERVICES || size == 0) {
		kf_lb_count(svc->id, 0);
		return -1;
	}

	if (svc->algorithm == KF_LB_AFFINITY)
		slot = (__u32)(kf_mix64(kf_affinity_id(ctx, is6) ^ ((__u64)svc->id << 40)) % size);
	else
		slot = bpf_get_prandom_u32() % size;
	mk.id = svc->id;
	mk.chunk = slot / KF_MAGLEV_CHUNK;
	chunk = maglev.lookup(&mk);
	idx = chunk ? chunk->slot[slot & (KF_MAGLEV_CHUNK - 1)] : 0;
	/* Slots hold backend index + 1, so an all-zero slot is an empty one. */
	if (idx == 0) {
		kf_lb_count(svc->id, 0);
		return -1;
	}
	idx -= 1; /* the backend's position in the service */
	kf_lb_count(svc->id, 1);
	kf_lb_count_backend(svc->id, idx);

	mk.chunk = idx / KF_BACKEND_CHUNK;
	idx &= KF_BACKEND_CHUNK - 1;
	if (d->family == 4) {
		struct kf_backend_chunk_v4 *b = backends_v4.lookup(&mk);

		if (!b)
			return -1;
		__builtin_memcpy(addr, b->b[idx].addr, 4);
		*port = b->b[idx].port;
	} else {
		struct kf_backend_chunk_v6 *b6 = backends_v6.lookup(&mk);

		if (!b6)
			return -1;
		__builtin_memcpy(addr, b6->b[idx].addr, 16);
		*port = b6->b[idx].port;
	}
	return 1;
}

KF_ALWAYS_INLINE int kf_connect(struct bpf_sock_addr *ctx, int is6)
{
	struct kf_dst d = {};
	__u8 addr[16] = {};
	__u16 port = 0;
	int ret;

	if (is6)
		kf_read_dst6(ctx, &d);
	else
		kf_read_dst4(ctx, &d);

	if (kf_intercept(ctx, is6, &d))
		return 1;
	ret = kf_pick_backend(ctx, is6, &d, addr, &port);
	if (ret < 0)
		return 0;
	if (ret > 0)
		kf_write_dst(ctx, is6, &d, addr, port);
	return 1;
}

int kf_connect4(struct bpf_sock_addr *ctx)
{
	return kf_connect(ctx, 0);
}

int kf_connect6(struct bpf_sock_addr *ctx)
{
	return kf_connect(ctx, 1);
}

/* Unconnected UDP: balance each datagram, remember it for the reply. */
KF_ALWAYS_INLINE int kf_sendmsg(struct bpf_sock_addr *ctx, int is6)
{
	struct kf_rev_nat_key rk = {};
	struct kf_rev_nat_value rv = {};
	struct kf_dst d = {};
	__u8 addr[16] = {};
	__u16 port = 0;
	int ret;

	if (is6)
		kf_read_dst6(ctx, &d);
	else
		kf_read_dst4(ctx, &d);
	ret = kf_pick_backend(ctx, is6, &d, addr, &port);
	if (ret < 0)
		return 0;
	if (ret == 0)
		return 1;

	rk.cookie = kf_get_socket_cookie(ctx);
	rk.family = d.family;
	rk.port = port;
	__builtin_memcpy(rk.addr, addr, 16);
	rv.family = d.family;
	rv.port = d.port;
	__builtin_memcpy(rv.addr, d.addr, 16);
	rev_nat.update(&rk, &rv);
	kf_write_dst(ctx, is6, &d, addr, port);
	return 1;
}

int kf_sendmsg4(struct bpf_sock_addr *ctx)
{
	return kf_sendmsg(ctx, 0);
}

int kf_sendmsg6(struct bpf_sock_addr *ctx)
{
	return kf_sendmsg(ctx, 1);
}

/* The reply's source (user_ip*, user_port) goes back to the VIP. */
KF_ALWAYS_INLINE int kf_recvmsg(struct bpf_sock_addr *ctx, int is6)
{
	struct kf_rev_nat_key rk = {};
	struct kf_rev_nat_value *rv;
	struct kf_dst d = {};

	if (is6)
		kf_read_dst6(ctx, &d);
	else
		kf_read_dst4(ctx, &d);
	rk.cookie = kf_get_socket_cookie(ctx);
	rk.family = d.family;
	rk.port = d.port;
	__builtin_memcpy(rk.addr, d.addr, 16);
	rv = rev_nat.lookup(&rk);
	if (rv)
		kf_write_dst(ctx, is6, &d, rv->addr, rv->port);
	return 1;
}

int kf_recvmsg4(struct bpf_sock_addr *ctx)
{
	return kf_recvmsg(ctx, 0);
}

int kf_recvmsg6(struct bpf_sock_addr *ctx)
{
	return kf_recvmsg(ctx, 1);
}

/* addr (4 words, network order) into key fields, v4-mapped folded to IPv4. */
KF_ALWAYS_INLINE __u8 kf_fold_addr(const __u32 *a, __u8 *out)
{
	if (kf_is_v4_mapped(a)) {
		__builtin_memcpy(out, &a[3], 4);
		return KF_AF_INET;
	}
	__builtin_memcpy(out, a, 16);
	return KF_AF_INET6;
}

/* Client socket established: index its original destination by 4-tuple. */
int kf_sockops(struct bpf_sock_ops *skops)
{
	struct kf_tuple_key k = {};
	struct kf_orig_dst *o;
	__u64 cookie;

	if (skops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)
		return 1;
	cookie = kf_get_socket_cookie(skops);
	o = orig_dst.lookup(&cookie);
	if (!o)
		return 1;

	if (skops->family == KF_AF_INET) {
		__u32 l = skops->local_ip4, r = skops->remote_ip4;

		k.family = KF_AF_INET;
		__builtin_memcpy(k.client_addr, &l, 4);
		__builtin_memcpy(k.proxy_addr, &r, 4);
	} else {
		__u32 l6[4], r6[4];

		l6[0] = skops->local_ip6[0];
		l6[1] = skops->local_ip6[1];
		l6[2] = skops->local_ip6[2];
		l6[3] = skops->local_ip6[3];
		r6[0] = skops->remote_ip6[0];
		r6[1] = skops->remote_ip6[1];
		r6[2] = skops->remote_ip6[2];
		r6[3] = skops->remote_ip6[3];
		k.family = kf_fold_addr(l6, k.client_addr);
		kf_fold_addr(r6, k.proxy_addr);
	}
	k.client_port = (__u16)skops->local_port;
	k.proxy_port = (__u16)bpf_ntohl(skops->remote_port);
	orig_dst_tuple.update(&k, o);
	return 1;
}

/* The proxy asks for the original destination of an accepted socket. */
int kf_getsockopt(struct bpf_sockopt *ctx)
{
	struct kf_tuple_key k = {};
	struct kf_orig_dst *o;
	struct bpf_sock *sk;
	__u8 *optval, *optval_end;

	if (ctx->optname != KF_SO_ORIGINAL_DST)
		return 1;
	if (ctx->level != KF_SOL_IP && ctx->level != KF_SOL_IPV6)
		return 1;
	sk = ctx->sk;
	if (!sk)
		return 1;

	/* Accepted socket: source = proxy side, destination = client side. */
	if (sk->family == KF_AF_INET) {
		__u32 c = sk->dst_ip4, p = sk->src_ip4;

		k.family = KF_AF_INET;
		__builtin_memcpy(k.client_addr, &c, 4);
		__builtin_memcpy(k.proxy_addr, &p, 4);
	} else if (sk->family == KF_AF_INET6) {
		__u32 c6[4], p6[4];

		c6[0] = sk->dst_ip6[0];
		c6[1] = sk->dst_ip6[1];
		c6[2] = sk->dst_ip6[2];
		c6[3] = sk->dst_ip6[3];
		p6[0] = sk->src_ip6[0];
		p6[1] = sk->src_ip6[1];
		p6[2] = sk->src_ip6[2];
		p6[3] = sk->src_ip6[3];
		k.family = kf_fold_addr(c6, k.client_addr);
		kf_fold_addr(p6, k.proxy_addr);
	} else {
		return 1;
	}
	k.client_port = kf_ntohs((__u16)sk->dst_port);
	k.proxy_port = (__u16)sk->src_port;
	o = orig_dst_tuple.lookup(&k);
	if (!o)
		return 1;

	optval = ctx->optval;
	optval_end = ctx->optval_end;
	if (ctx->level == KF_SOL_IP) {
		/* struct sockaddr_in */
		if (o->family != KF_AF_INET || optval + 16 > optval_end)
			return 1;
		__builtin_memset(optval, 0, 16);
		*(__u16 *)optval = KF_AF_INET; /* sin_family, host order */
		*(__u16 *)(optval + 2) = kf_htons(o->port);
		__builtin_memcpy(optval + 4, o->addr, 4);
		ctx->optlen = 16;
	} else {
		/* struct sockaddr_in6; an IPv4 original destination as v4-mapped */
		if (optval + 28 > optval_end)
			return 1;
		__builtin_memset(optval, 0, 28);
		*(__u16 *)optval = KF_AF_INET6;
		*(__u16 *)(optval + 2) = kf_htons(o->port);
		if (o->family == KF_AF_INET) {
			optval[18] = 0xff;
			optval[19] = 0xff;
			__builtin_memcpy(optval + 20, o->addr, 4);
		} else {
			__builtin_memcpy(optval + 8, o->addr, 16);
		}
		ctx->optlen = 28;
	}
	ctx->retval = 0;
	return 1;
}
