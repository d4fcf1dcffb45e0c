// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * tc_lb.c - kernform's load balancing of traffic forwarded from other
 * hosts: connections and datagrams that arrive on an interface for a
 * virtual IP are sent to a backend, with the client's address preserved,
 * like an nft `dnat` in prerouting. sock_connect.c balances the same
 * services for local processes at connect(); this file does it per packet
 * for everyone else.
 *
 * Attach point: tc clsact of ONE interface, the one where the clients'
 * packets arrive (e.g. a gateway's client-facing interface), direct-action,
 * BPF_PROG_TYPE_SCHED_CLS (3):
 *   kf_lb_ingress  on the ingress hook: client -> VIP becomes
 *                  client -> backend (DNAT), before routing, so the packet
 *                  is forwarded to the backend
 *   kf_lb_egress   on the egress hook: a backend's reply leaving through
 *                  the same interface, backend -> client, becomes
 *                  VIP -> client
 * Both functions live in one object and share its maps. Replies must leave
 * through the interface the requests came in on (the usual symmetric
 * routing of a gateway); backends must route their replies to clients via
 * this host, since the client address is not rewritten.
 *
 * Order with tc_filter.c: every packet this program does not drop gets
 * TC_ACT_UNSPEC, i.e. "continue with the next filter", so tc_lb must be
 * attached at a LOWER pref (it runs first) than tc_filter on the same hook,
 * as nft's prerouting DNAT runs before the forward filter. tc_filter's
 * ingress rules therefore see the backend as destination; its egress
 * rules see the VIP as source. Drops are TC_ACT_SHOT.
 *
 * Per ingress packet (IPv4/IPv6, extension headers walked, TCP and UDP):
 *  1. {destination, port, protocol} not in services_v4/6: untouched.
 *  2. backend_count 0: dropped, counted.
 *  3. the flow {family, proto, client addr/port, VIP addr/port} is looked
 *     up in lb_flows; if absent (or for a TCP SYN without ACK, which opens
 *     the tuple anew, as conntrack does for a reused tuple) a Maglev slot
 *     of the service picks a backend:
 *       KF_LB_AFFINITY  slot = hash(client address, service id): a client
 *                       always reaches the same backend
 *       KF_LB_RANDOM    slot = hash(5-tuple): spread per flow, and still
 *                       deterministic, so a flow evicted from the LRU lands
 *                       on the same backend while the table is unchanged.
 *     Weights are slot counts in the Maglev table, as in sock_connect.c.
 *     lb_flows and lb_rev are written.
 *  4. destination address and port are rewritten; the IPv4 header checksum
 *     with bpf_l3_csum_replace, the L4 checksum with bpf_l4_csum_replace
 *     (BPF_F_PSEUDO_HDR for the address; IPv6 addresses as a bpf_csum_diff
 *     with BPF_F_IPV6; UDP with BPF_F_MARK_MANGLED_0, so an IPv4 UDP
 *     checksum of 0 stays 0 and a computed 0 becomes 0xffff). These helpers
 *     handle CHECKSUM_PARTIAL skbs (veths, local senders: only the
 *     pseudo-header sum is updated), CHECKSUM_COMPLETE and fully computed
 *     checksums alike. A failed rewrite drops the packet (counted).
 * Existing flows keep their backend when the Maglev table changes (like
 * conntrack entries of nft DNAT); the program never deletes flow entries,
 * the LRU maps evict them.
 * Untouched: non-first fragments, ICMP (including errors about a
 * translated flow), SCTP/UDP-Lite, non-IP. A fragmented datagram to a VIP
 * is therefore not supported (only its first fragment is translated).
 *
 * Maps (layouts in lib/kf_types.h, documented in bpf/README.md):
 *   services_v4      hash      kf_svc_key_v4 -> kf_service     [KF_MAX_SERVICES]
 *   services_v6      hash      kf_svc_key_v6 -> kf_service     [KF_MAX_SERVICES]
 *   maglev           hash      kf_maglev_key {id, slot / 256} -> kf_maglev_chunk: 256 slots,
 *                              each a u32 backend index + 1 (0: empty)  [KF_MAGLEV_CHUNKS]
 *   backends_v4      hash      kf_maglev_key {id, position / 16} -> kf_backend_chunk_v4:
 *                              16 kf_backend_v4, the service's backends in order  [KF_BACKEND_CHUNKS]
 *   backends_v6      hash      the same with kf_backend_chunk_v6                  [KF_BACKEND_CHUNKS]
 *     (these five exactly as in sock_connect.c; the compiler writes the
 *     same contents into both objects)
 *   lb_flows         LRU hash  kf_lb_flow_key -> kf_lb_flow     [KF_LB_FLOWS]
 *   lb_rev           LRU hash  kf_lb_rev_key -> kf_lb_rev       [KF_LB_FLOWS]
 *   lb_counters      percpu hash u32 service id -> kf_lb_counter  [KF_MAX_SERVICES]
 *   lb_be_counters   percpu hash {service id, backend position} -> kf_lb_backend_counter
 *     (both declared in lib/kf_lb_tables.h)
 *
 * Settings: KF_MAX_SERVICES, KF_MAX_BACKENDS, KF_MAGLEV_CHUNKS,
 * KF_LB_FLOWS, KF_L2_HLEN, KF_IPV6_MAX_EXT, KF_PIN_DIR.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

#include "lib/kf_common.h"
#include "lib/kf_lb_tables.h" /* services, maglev, backends: as in sock_connect.c */
#include "lib/kf_maps.h"
#include "lib/kf_parse.h"
#include "lib/kf_types.h"

#ifndef KF_LB_FLOWS
#define KF_LB_FLOWS 65536
#endif

/* Bytes of headers to pull into the linear area when parsing came short. */
#define KF_PULL_LEN 256

/*
 * bpf_l4_csum_replace: the packet is IPv6, so a pseudo-header change must
 * not be folded into skb->csum under CHECKSUM_COMPLETE (IPv6 has no header
 * checksum that balances it). Kernel 6.16+ and stable backports (Debian's
 * 6.1.0-56 headers define it); an older kernel rejects the flag (-EINVAL),
 * and IPv6 packets to a VIP are then dropped. Defined here because the
 * headers bcc compiles against may predate it.
 */
#define KF_BPF_F_IPV6 (1ULL << 7)

#define KF_TCP_CSUM_OFF 16
#define KF_UDP_CSUM_OFF 6
#define KF_TCP_FLAGS_OFF 13
#define KF_TCP_SYN 0x02

KF_MAP("lru_hash", struct kf_lb_flow_key, struct kf_lb_flow, lb_flows, KF_LB_FLOWS);
KF_MAP("lru_hash", struct kf_lb_rev_key, struct kf_lb_rev, lb_rev, KF_LB_FLOWS);

/*
 * Parses the packet and finds its L4 header. Returns 0 for a TCP or UDP
 * packet with ports (*l4_off = offset of the L4 header from skb->data),
 * -1 for anything the load balancer leaves alone.
 */
KF_ALWAYS_INLINE int kf_lb_parse(struct __sk_buff *skb, struct kf_pkt *pkt, __u32 *l4_off)
{
	__u32 off = KF_L2_HLEN;
	__u8 b[2];
	int ret, i;

	ret = kf_parse(skb, pkt);
	if (ret == KF_PARSE_SHORT && skb->len > skb->data_end - skb->data) {
		bpf_skb_pull_data(skb, skb->len < KF_PULL_LEN ? skb->len : KF_PULL_LEN);
		__builtin_memset(pkt, 0, sizeof(*pkt));
		ret = kf_parse(skb, pkt);
	}
	if (ret != KF_PARSE_OK || !(pkt->flags & KF_PKT_HAS_PORTS))
		return -1;
	if (pkt->proto != KF_IPPROTO_TCP && pkt->proto != KF_IPPROTO_UDP)
		return -1;

	/*
	 * kf_parse validated the headers but does not report where L4 starts
	 * (struct kf_pkt is also tc_filter's pinned scratch value, so it keeps
	 * its size); walk them again, the same way, by offset.
	 */
	if (pkt->family == 4) {
		if (bpf_skb_load_bytes(skb, off, b, 1))
			return -1;
		*l4_off = off + (b[0] & 0x0f) * 4;
		return 0;
	}
	if (bpf_skb_load_bytes(skb, off + 6, b, 1))
		return -1;
	off += 40;
#pragma unroll
	for (i = 0; i < KF_IPV6_MAX_EXT; i++) {
		__u8 nexthdr = b[0];

		if (nexthdr != KF_IPPROTO_HOPOPTS && nexthdr != KF_IPPROTO_ROUTING &&
		    nexthdr != KF_IPPROTO_DSTOPTS && nexthdr != KF_IPPROTO_FRAGMENT &&
		    nexthdr != KF_IPPROTO_AH)
			break;
		if (bpf_skb_load_bytes(skb, off, b, 2))
			return -1;
		if (nexthdr == KF_IPPROTO_FRAGMENT)
			off += 8; /* a first fragment: kf_parse flagged the others */
		else if (nexthdr == KF_IPPROTO_AH)
			off += ((__u32)b[1] + 2) * 4;
		else
			off += ((__u32)b[1] + 1) * 8;
	}
	if (b[0] != pkt->proto)
		return -1;
	*l4_off = off;
	return 0;
}

/* The TCP segment opens a connection (SYN without ACK). */
KF_ALWAYS_INLINE int kf_lb_is_syn(struct __sk_buff *skb, struct kf_pkt *pkt, __u32 l4_off)
{
	__u8 flags;

	if (pkt->proto != KF_IPPROTO_TCP)
		return 0;
	if (bpf_skb_load_bytes(skb, l4_off + KF_TCP_FLAGS_OFF, &flags, 1))
		return 0;
	return (flags & (KF_TCP_SYN | KF_TCP_ACK)) == KF_TCP_SYN;
}

/* 16 address bytes folded into a well-spread 64-bit value. */
KF_ALWAYS_INLINE __u64 kf_lb_hash_addr(const __u8 *addr)
{
	__u64 w[2];

	__builtin_memcpy(w, addr, 16);
	return kf_mix64(w[0] ^ kf_mix64(w[1]));
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
 * Chooses a backend of svc for the packet's flow. Returns 0 and fills
 * *out, or -1 if the service has no backend in the chosen slot.
 */
KF_ALWAYS_INLINE int kf_lb_pick(struct kf_service *svc, struct kf_pkt *pkt, struct kf_lb_flow *out)
{
	struct kf_maglev_key mk = {};
	struct kf_maglev_chunk *chunk;
	__u32 id = svc->id, size = svc->maglev_size, slot, idx;
	__u64 h;

	if (id >= KF_MAX_SERVICES || size == 0)
		return -1;
	if (svc->algorithm == KF_LB_AFFINITY) {
		h = kf_mix64(kf_lb_hash_addr(pkt->saddr) ^ ((__u64)id << 40));
	} else {
		h = kf_lb_hash_addr(pkt->daddr) ^ ((__u64)pkt->sport << 32) ^
		    ((__u64)pkt->dport << 16) ^ pkt->proto;
		h = kf_mix64(kf_lb_hash_addr(pkt->saddr) ^ kf_mix64(h));
	}
	slot = (__u32)(h % size);
	mk.id = id;
	mk.chunk = slot / KF_MAGLEV_CHUNK;
	chunk = maglev.lookup(&mk);
	if (!chunk)
		return -1;
	idx = chunk->slot[slot & (KF_MAGLEV_CHUNK - 1)];
	/* Slots hold backend index + 1, so an all-zero slot is an empty one. */
	if (idx == 0)
		return -1;
	idx -= 1; /* the backend's position in the service */
	kf_lb_count_backend(id, idx);

	__builtin_memset(out, 0, sizeof(*out));
	out->service_id = id;
	mk.chunk = idx / KF_BACKEND_CHUNK;
	idx &= KF_BACKEND_CHUNK - 1;
	if (pkt->family == 4) {
		struct kf_backend_chunk_v4 *b = backends_v4.lookup(&mk);

		if (!b)
			return -1;
		__builtin_memcpy(out->backend_addr, b->b[idx].addr, 4);
		out->backend_port = b->b[idx].port;
	} else {
		struct kf_backend_chunk_v6 *b6 = backends_v6.lookup(&mk);

		if (!b6)
			return -1;
		__builtin_memcpy(out->backend_addr, b6->b[idx].addr, 16);
		out->backend_port = b6->b[idx].port;
	}
	return 0;
}

/*
 * Rewrites the destination (is_dst) or the source address and port of a
 * TCP/UDP packet, with its checksums. Returns 0, or -1 if a helper failed
 * (the packet may then be half rewritten: the caller drops it).
 */
KF_ALWAYS_INLINE int kf_lb_rewrite(struct __sk_buff *skb, struct kf_pkt *pkt, __u32 l4_off, int is_dst,
				   const __u8 *old_addr, __u16 old_port, const __u8 *new_addr, __u16 new_port)
{
	__u32 csum_off = l4_off + (pkt->proto == KF_IPPROTO_TCP ? KF_TCP_CSUM_OFF : KF_UDP_CSUM_OFF);
	__u64 l4_flags = pkt->proto == KF_IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
	__u16 from_port = kf_htons(old_port), to_port = kf_htons(new_port);

	if (pkt->family == 4) {
		__u32 from, to, addr_off = KF_L2_HLEN + (is_dst ? 16 : 12);

		__builtin_memcpy(&from, old_addr, 4);
		__builtin_memcpy(&to, new_addr, 4);
		if (from != to) {
			if (bpf_l4_csum_replace(skb, csum_off, from, to, l4_flags | BPF_F_PSEUDO_HDR | 4))
				return -1;
			if (bpf_l3_csum_replace(skb, KF_L2_HLEN + 10, from, to, 4))
				return -1;
			if (bpf_skb_store_bytes(skb, addr_off, &to, 4, 0))
				return -1;
		}
	} else {
		__u32 from6[4], to6[4], addr_off = KF_L2_HLEN + (is_dst ? 24 : 8);
		__s64 diff;

		__builtin_memcpy(from6, old_addr, 16);
		__builtin_memcpy(to6, new_addr, 16);
		diff = bpf_csum_diff(from6, 16, to6, 16, 0);
		if (diff < 0)
			return -1;
		if (bpf_l4_csum_replace(skb, csum_off, 0, diff, l4_flags | BPF_F_PSEUDO_HDR | KF_BPF_F_IPV6))
			return -1;
		if (bpf_skb_store_bytes(skb, addr_off, to6, 16, 0))
			return -1;
	}
	if (from_port != to_port) {
		if (bpf_l4_csum_replace(skb, csum_off, from_port, to_port, l4_flags | 2))
			return -1;
		if (bpf_skb_store_bytes(skb, l4_off + (is_dst ? 2 : 0), &to_port, 2, 0))
			return -1;
	}
	return 0;
}

_Static_assert(sizeof(struct kf_lb_flow) == 24, "kf_lb_flow is compared as three words");

KF_ALWAYS_INLINE int kf_lb_same_flow(const struct kf_lb_flow *a, const struct kf_lb_flow *b)
{
	__u64 x[3], y[3];

	/* 24 bytes with zeroed padding: compare them as three words. */
	__builtin_memcpy(x, a, sizeof(x));
	__builtin_memcpy(y, b, sizeof(y));
	return x[0] == y[0] && x[1] == y[1] && x[2] == y[2];
}

KF_ALWAYS_INLINE struct kf_service *kf_lb_service(struct kf_pkt *pkt)
{
	if (pkt->family == 4) {
		struct kf_svc_key_v4 k = {};

		__builtin_memcpy(k.vip, pkt->daddr, 4);
		k.port = pkt->dport;
		k.proto = pkt->proto;
		return services_v4.lookup(&k);
	}
	struct kf_svc_key_v6 k6 = {};

	__builtin_memcpy(k6.vip, pkt->daddr, 16);
	k6.port = pkt->dport;
	k6.proto = pkt->proto;
	return services_v6.lookup(&k6);
}

/* lb_rev entry for the replies of the flow pkt -> f. */
KF_ALWAYS_INLINE void kf_lb_rev_key_of(struct kf_pkt *pkt, struct kf_lb_flow *f, struct kf_lb_rev_key *rk)
{
	rk->family = pkt->family;
	rk->proto = pkt->proto;
	rk->backend_port = f->backend_port;
	rk->client_port = pkt->sport;
	__builtin_memcpy(rk->backend_addr, f->backend_addr, 16);
	__builtin_memcpy(rk->client_addr, pkt->saddr, 16);
}

#define KF_LB_COUNT_PACKET 0
#define KF_LB_COUNT_NEW 1
#define KF_LB_COUNT_DROP 2

KF_ALWAYS_INLINE void kf_lb_count(__u32 id, int what, __u32 len)
{
	struct kf_lb_counter *c = lb_counters.lookup(&id);

	if (!c) {
		struct kf_lb_counter zero = {};

		lb_counters.update(&id, &zero);
		c = lb_counters.lookup(&id);
		if (!c)
			return;
	}
	if (what == KF_LB_COUNT_PACKET) {
		c->packets++;
		c->bytes += len;
	} else if (what == KF_LB_COUNT_NEW) {
		c->new_flows++;
	} else {
		c->dropped++;
	}
}

int kf_lb_ingress(struct __sk_buff *skb)
{
	struct kf_pkt pkt = {};
	struct kf_lb_flow_key fk = {};
	struct kf_lb_flow target = {}, *flow;
	struct kf_lb_rev_key rk = {};
	struct kf_lb_rev rv = {};
	struct kf_service *svc;
	__u32 l4_off = 0, id;

	if (kf_lb_parse(skb, &pkt, &l4_off) < 0)
		return TC_ACT_UNSPEC;
	svc = kf_lb_service(&pkt);
	if (!svc)
		return TC_ACT_UNSPEC;
	id = svc->id;
	kf_lb_count(id, KF_LB_COUNT_PACKET, skb->len);
	if (svc->backend_count == 0)
		goto drop;

	fk.family = pkt.family;
	fk.proto = pkt.proto;
	fk.client_port = pkt.sport;
	fk.vip_port = pkt.dport;
	__builtin_memcpy(fk.client_addr, pkt.saddr, 16);
	__builtin_memcpy(fk.vip_addr, pkt.daddr, 16);
	flow = lb_flows.lookup(&fk);
	if (flow)
		__builtin_memcpy(&target, flow, sizeof(target));
	if (!flow || kf_lb_is_syn(skb, &pkt, l4_off)) {
		struct kf_lb_flow fresh = {};

		if (kf_lb_pick(svc, &pkt, &fresh) < 0)
			goto drop;
		/* A retransmitted SYN finds the same backend: not a new flow. */
		if (!flow || !kf_lb_same_flow(&fresh, &target)) {
			__builtin_memcpy(&target, &fresh, sizeof(target));
			lb_flows.update(&fk, &target);
			kf_lb_count(id, KF_LB_COUNT_NEW, 0);
		}
	}

	/* The reverse entry may have been evicted independently: renew it. */
	kf_lb_rev_key_of(&pkt, &target, &rk);
	if (!lb_rev.lookup(&rk)) {
		__builtin_memcpy(rv.vip_addr, pkt.daddr, 16);
		rv.vip_port = pkt.dport;
		lb_rev.update(&rk, &rv);
	}

	if (kf_lb_rewrite(skb, &pkt, l4_off, 1, pkt.daddr, pkt.dport, target.backend_addr, target.backend_port))
		goto drop;
	return TC_ACT_UNSPEC;

drop:
	kf_lb_count(id, KF_LB_COUNT_DROP, 0);
	return TC_ACT_SHOT;
}

int kf_lb_egress(struct __sk_buff *skb)
{
	struct kf_pkt pkt = {};
	struct kf_lb_rev_key rk = {};
	struct kf_lb_rev vip, *rv;
	__u32 l4_off = 0;

	if (kf_lb_parse(skb, &pkt, &l4_off) < 0)
		return TC_ACT_UNSPEC;
	rk.family = pkt.family;
	rk.proto = pkt.proto;
	rk.backend_port = pkt.sport;
	rk.client_port = pkt.dport;
	__builtin_memcpy(rk.backend_addr, pkt.saddr, 16);
	__builtin_memcpy(rk.client_addr, pkt.daddr, 16);
	rv = lb_rev.lookup(&rk);
	if (!rv)
		return TC_ACT_UNSPEC;
	__builtin_memcpy(&vip, rv, sizeof(vip));
	if (kf_lb_rewrite(skb, &pkt, l4_off, 0, pkt.saddr, pkt.sport, vip.vip_addr, vip.vip_port))
		return TC_ACT_SHOT;
	return TC_ACT_UNSPEC;
}
