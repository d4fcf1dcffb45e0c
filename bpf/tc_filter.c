// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * tc_filter.c - kernform's packet filter: ordered allow / deny /
 * rate-limit rules on source and destination prefixes, protocol and
 * destination port range, for one interface.
 *
 * Attach point: tc clsact, direct-action, BPF_PROG_TYPE_SCHED_CLS.
 *   kf_tc_ingress  on the ingress hook
 *   kf_tc_egress   on the egress hook
 * Both functions live in one object and share its maps, so one load per
 * interface serves both directions; a rule says in kf_rule.flags which
 * directions it applies to.
 *
 * Verdicts: TC_ACT_SHOT drops; a packet the filter lets through gets
 * TC_ACT_UNSPEC, so the next filter on the hook (another intent's, or a
 * foreign one) still runs: every intent's filter must let a packet through,
 * as with nft base chains of several tables at one hook.
 *
 * Interface matching: one object is loaded (and its maps pinned, see
 * lib/kf_maps.h) per interface. The compiler writes into an interface's
 * maps only the rules that apply to that interface; the program itself
 * never looks at ifindex.
 *
 * Maps (layouts in lib/kf_types.h, documented in bpf/README.md):
 *   src_v4, dst_v4     LPM trie  kf_lpm_v4 -> kf_rule_set
 *   src_v6, dst_v6     LPM trie  kf_lpm_v6 -> kf_rule_set
 *   rules              array     u32 index -> kf_rule        [KF_MAX_RULES]
 *   counters           percpu    u32 counter -> kf_counter   [KF_MAX_RULES + 3]
 *   ratelimit          LRU hash  kf_rl_key -> kf_rl_bucket   [KF_RL_ENTRIES]
 *   config             array     0 -> kf_filter_config       [1]
 *   local_addrs        hash      kf_addr_key -> u8 (lib/kf_local.h)
 *
 * Chains as nftables has them: at ingress a packet to a local address
 * (local_addrs, loopback, multicast, broadcast) meets the input rules and
 * default, any other the forward ones; at egress a packet from a local
 * address meets the output rules and default, and a forwarded one leaves
 * untouched.
 *
 * Per packet: candidates = src_trie(saddr) AND dst_trie(daddr); the lowest
 * candidate whose descriptor matches direction, protocol and port wins;
 * no winner means the chain's default action (counted at
 * counters[KF_MAX_RULES + chain]: 0 input, 1 forward, 2 output).
 * Packets that are not IPv4/IPv6 (ARP, LLDP) always pass, uncounted.
 *
 * Settings: KF_MAX_RULES, KF_MAX_PREFIXES, KF_RL_ENTRIES, KF_L2_HLEN,
 * KF_IPV6_MAX_EXT, KF_PIN_DIR.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

#include "lib/kf_common.h"
#include "lib/kf_local.h" /* local_addrs: which chain a packet is in */
#include "lib/kf_maps.h"
#include "lib/kf_parse.h"
#include "lib/kf_types.h"

#ifndef KF_RL_ENTRIES
#define KF_RL_ENTRIES 65536
#endif

#define KF_NSEC_PER_SEC 1000000000ULL
/* Bytes of headers to pull into the linear area when parsing came short. */
#define KF_PULL_LEN 256

KF_LPM(struct kf_lpm_v4, struct kf_rule_set, src_v4, KF_MAX_PREFIXES);
KF_LPM(struct kf_lpm_v4, struct kf_rule_set, dst_v4, KF_MAX_PREFIXES);
KF_LPM(struct kf_lpm_v6, struct kf_rule_set, src_v6, KF_MAX_PREFIXES);
KF_LPM(struct kf_lpm_v6, struct kf_rule_set, dst_v6, KF_MAX_PREFIXES);
KF_MAP("array", u32, struct kf_rule, rules, KF_MAX_RULES);
KF_MAP("percpu_array", u32, struct kf_counter, counters, KF_MAX_RULES + 3);
KF_MAP("lru_hash", struct kf_rl_key, struct kf_rl_bucket, ratelimit, KF_RL_ENTRIES);
KF_MAP("array", u32, struct kf_filter_config, config, 1);
/*
 * Internal, not filled by the compiler: the parsed packet lives in a
 * per-CPU map value rather than on the stack so that, for the verifier,
 * its fields are unknown values; every parse path (v4/v6, ports or not,
 * fragment) then reaches the rule loop in one equivalent state instead of
 * walking the loop once per path.
 */
KF_MAP("percpu_array", u32, struct kf_pkt, scratch, 1);

KF_ALWAYS_INLINE struct kf_rule_set *kf_lookup_src(struct kf_pkt *pkt)
{
	if (pkt->family == 4) {
		struct kf_lpm_v4 k = {.prefixlen = 32};

		__builtin_memcpy(k.addr, pkt->saddr, 4);
		return src_v4.lookup(&k);
	}
	struct kf_lpm_v6 k6 = {.prefixlen = 128};

	__builtin_memcpy(k6.addr, pkt->saddr, 16);
	return src_v6.lookup(&k6);
}

KF_ALWAYS_INLINE struct kf_rule_set *kf_lookup_dst(struct kf_pkt *pkt)
{
	if (pkt->family == 4) {
		struct kf_lpm_v4 k = {.prefixlen = 32};

		__builtin_memcpy(k.addr, pkt->daddr, 4);
		return dst_v4.lookup(&k);
	}
	struct kf_lpm_v6 k6 = {.prefixlen = 128};

	__builtin_memcpy(k6.addr, pkt->daddr, 16);
	return dst_v6.lookup(&k6);
}

/* Whether addr (of pkt's family) is an address of this namespace, or local by its form. */
KF_ALWAYS_INLINE int kf_is_local_addr(struct kf_pkt *pkt, const __u8 *addr)
{
	struct kf_addr_key k = {};

	if (kf_is_local_by_form(pkt->family, addr))
		return 1;
	k.family = pkt->family;
	__builtin_memcpy(k.addr, addr, 16);
	return local_addrs.lookup(&k) != NULL;
}

KF_ALWAYS_INLINE int kf_rule_matches(struct kf_rule *r, struct kf_pkt *pkt, __u32 dir_flag)
{
	if (r->action == KF_ACT_NONE || !(r->flags & dir_flag))
		return 0;
	if (r->proto && r->proto != pkt->proto)
		return 0;
	if (r->dport_lo == 0 && r->dport_hi == 0xffff)
		return 1;
	if (!(pkt->flags & KF_PKT_HAS_PORTS))
		return 0;
	return pkt->dport >= r->dport_lo && pkt->dport <= r->dport_hi;
}

/* Returns 1 if the packet fits the bucket (and takes its tokens). */
KF_ALWAYS_INLINE int kf_rate_ok(struct kf_rule *r, struct kf_pkt *pkt, __u32 len)
{
	struct kf_rl_key key = {};
	struct kf_rl_bucket *b;
	__u64 now = bpf_ktime_get_ns();
	__u64 cap = (__u64)r->burst * KF_NSEC_PER_SEC;
	__u64 cost = (r->flags & KF_RULE_RL_BYTES) ? (__u64)len * KF_NSEC_PER_SEC : KF_NSEC_PER_SEC;
	__u64 elapsed;

	key.rule = r->counter;
	if (!(r->flags & KF_RULE_RL_SHARED)) {
		key.family = pkt->family;
		__builtin_memcpy(key.addr, pkt->saddr, 16);
	}
	b = ratelimit.lookup(&key);
	if (!b) {
		struct kf_rl_bucket fresh = {.tokens = cap, .last_ns = now};

		if (cap < cost)
			return 0;
		fresh.tokens = cap - cost;
		ratelimit.update(&key, &fresh);
		return 1;
	}
	/*
	 * Refill. Updates race between CPUs; the bucket is approximate under
	 * contention, which is the usual trade for not taking a lock per packet.
	 */
	elapsed = now > b->last_ns ? now - b->last_ns : 0;
	if (r->rate == 0 || elapsed >= cap / r->rate)
		b->tokens = r->rate ? cap : b->tokens;
	else if (b->tokens + elapsed * r->rate > cap)
		b->tokens = cap;
	else
		b->tokens += elapsed * r->rate;
	b->last_ns = now;
	if (b->tokens < cost)
		return 0;
	b->tokens -= cost;
	return 1;
}

KF_ALWAYS_INLINE void kf_count(__u32 idx, __u32 len, int dropped)
{
	struct kf_counter *c = counters.lookup(&idx);

	if (!c)
		return;
	c->packets++;
	c->bytes += len;
	if (dropped)
		c->dropped++;
}

KF_ALWAYS_INLINE int kf_filter(struct __sk_buff *skb, __u32 hook)
{
	struct kf_pkt *pkt;
	struct kf_rule_set *src, *dst;
	struct kf_rule *rule = NULL;
	struct kf_filter_config *cfg;
	__u32 zero = 0, w, j, idx, dir_flag, chain;
	int ret;

	pkt = scratch.lookup(&zero);
	if (!pkt)
		return TC_ACT_UNSPEC;
	__builtin_memset(pkt, 0, sizeof(*pkt));
	ret = kf_parse(skb, pkt);
	if (ret == KF_PARSE_SHORT && skb->len > skb->data_end - skb->data) {
		bpf_skb_pull_data(skb, skb->len < KF_PULL_LEN ? skb->len : KF_PULL_LEN);
		__builtin_memset(pkt, 0, sizeof(*pkt));
		ret = kf_parse(skb, pkt);
	}
	if (ret == KF_PARSE_NOT_IP)
		return TC_ACT_UNSPEC;
	if (hook == KF_RULE_EGRESS) {
		/* Only the namespace's own packets are output; forwarded ones leaving meet no chain here. */
		if (ret != KF_PARSE_OK || !kf_is_local_addr(pkt, pkt->saddr))
			return TC_ACT_UNSPEC;
		dir_flag = KF_RULE_OUTPUT;
		chain = 2;
	} else if (ret == KF_PARSE_OK && !kf_is_local_addr(pkt, pkt->daddr)) {
		dir_flag = KF_RULE_FORWARD;
		chain = 1;
	} else {
		dir_flag = KF_RULE_INPUT;
		chain = 0;
	}
	if (ret != KF_PARSE_OK)
		goto no_match; /* truncated or malformed IP: default action */

	/* A stateful chain: packets of established TCP connections pass before the rules (see kf_types.h). */
	cfg = config.lookup(&zero);
	if (cfg && (cfg->stateful & dir_flag) && pkt->proto == KF_IPPROTO_TCP &&
	    (pkt->tcp_flags & KF_TCP_ACK) && !(pkt->flags & KF_PKT_FRAGMENT))
		return TC_ACT_UNSPEC;

	src = kf_lookup_src(pkt);
	dst = kf_lookup_dst(pkt);
	if (!src || !dst)
		goto no_match;

	for (w = 0; w < KF_BITMAP_WORDS; w++) {
		__u64 bits = src->w[w] & dst->w[w];

		for (j = 0; j < 64 && bits; j++) {
			idx = w * 64 + kf_ctz64(bits);
			bits &= bits - 1;
			rule = rules.lookup(&idx);
			if (rule && kf_rule_matches(rule, pkt, dir_flag))
				goto matched;
		}
	}

no_match:;
	int deny = 0;

	cfg = config.lookup(&zero);
	if (cfg)
		deny = (chain == 0 ? cfg->default_input : chain == 1 ? cfg->default_forward : cfg->default_output) ==
		       KF_ACT_DENY;
	kf_count(KF_MAX_RULES + chain, skb->len, deny);
	return deny ? TC_ACT_SHOT : TC_ACT_UNSPEC;

matched:
	if (rule->action == KF_ACT_ALLOW) {
		kf_count(rule->counter, skb->len, 0);
		return TC_ACT_UNSPEC;
	}
	if (rule->action == KF_ACT_RATE_LIMIT && kf_rate_ok(rule, pkt, skb->len)) {
		kf_count(rule->counter, skb->len, 0);
		return TC_ACT_UNSPEC;
	}
	kf_count(rule->counter, skb->len, 1);
	return TC_ACT_SHOT;
}

int kf_tc_ingress(struct __sk_buff *skb)
{
	return kf_filter(skb, KF_RULE_INGRESS);
}

int kf_tc_egress(struct __sk_buff *skb)
{
	return kf_filter(skb, KF_RULE_EGRESS);
}
