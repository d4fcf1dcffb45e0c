// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * kf_types.h - key and value layouts of every kernform BPF map.
 *
 * Owns: the structs and constants that the Python compiler writes into
 * maps and the reconciler reads back. bpf/README.md documents the same
 * layouts for the Python side; change both together. Sizes are fixed with
 * explicit padding (see kf_common.h for byte-order conventions: addresses
 * network-order bytes, everything else host order).
 */
#ifndef KF_TYPES_H
#define KF_TYPES_H

#include "kf_common.h"

/* ---- LPM trie keys and rule bitmaps (tc_filter, sk_lookup, connect) ---- */

/*
 * LPM trie key. prefixlen counts bits of addr; lookups use 32 / 128.
 */
struct kf_lpm_v4 {
	__u32 prefixlen;
	__u8 addr[4];
};

struct kf_lpm_v6 {
	__u32 prefixlen;
	__u8 addr[16];
};

/*
 * Value of every LPM trie: the set of rule indexes whose address list
 * matches. Bit i (w[i / 64] >> (i % 64) & 1) stands for rule descriptor i.
 *
 * An LPM lookup returns only the LONGEST matching prefix, so the compiler
 * must store, for every prefix P it inserts, the OR of the bits of every
 * rule that lists P or any prefix covering P (same family, shorter or
 * equal length, containing P). A rule matching any address lists 0.0.0.0/0
 * and ::/0; a rule with no address of a family never matches that family.
 */
struct kf_rule_set {
	__u64 w[KF_BITMAP_WORDS];
};

/* ---- tc_filter -------------------------------------------------------- */

/* kf_rule.action */
#define KF_ACT_NONE 0       /* empty slot: never matches */
#define KF_ACT_ALLOW 1
#define KF_ACT_DENY 2
#define KF_ACT_RATE_LIMIT 3 /* allow within the token bucket, drop above */

/* kf_rule.flags */
#define KF_RULE_INGRESS (1U << 0) /* match in the ingress program */
#define KF_RULE_EGRESS (1U << 1)  /* match in the egress program */
#define KF_RULE_RL_BYTES (1U << 2) /* rate/burst count bytes, not packets */
#define KF_RULE_RL_SHARED (1U << 3) /* one bucket per rule, not per source */
/* The chain a rule belongs to, which a packet's addresses decide (lib/kf_local.h):
 * at ingress, a local destination is input and any other forward; at egress, a
 * local source is output, and a forwarded packet leaving meets no rule. */
#define KF_RULE_INPUT (1U << 4)
#define KF_RULE_FORWARD (1U << 5)
#define KF_RULE_OUTPUT (1U << 6)

/*
 * Array `rules`, index = rule descriptor (= bit in kf_rule_set), ordered:
 * the lowest matching index wins. Ports apply to TCP, UDP, UDP-Lite and
 * SCTP; a descriptor with dport_lo=0, dport_hi=65535 ignores ports (and
 * matches other protocols and non-first fragments); any narrower range
 * only matches packets that carry ports.
 */
struct kf_rule {
	__u32 flags;    /* KF_RULE_* */
	__u8 proto;     /* IP protocol number, 0 = any */
	__u8 action;    /* KF_ACT_* */
	__u16 counter;  /* index into `counters` and the rate-limit bucket */
	__u16 dport_lo; /* inclusive, host order */
	__u16 dport_hi; /* inclusive, host order */
	__u32 rate;     /* KF_ACT_RATE_LIMIT: tokens per second */
	__u32 burst;    /* KF_ACT_RATE_LIMIT: bucket size in tokens */
	__u32 pad;
};

/* Per-CPU array `counters`: index = kf_rule.counter; KF_MAX_RULES + 0, 1, 2
 * count packets of input, forward and output that matched no rule (each
 * chain's default action). */
struct kf_counter {
	__u64 packets; /* matched */
	__u64 bytes;   /* matched, skb->len */
	__u64 dropped; /* matched and dropped (DENY, or over rate) */
};

/* LRU hash `ratelimit`: token bucket per (counter, source address). */
struct kf_rl_key {
	__u32 rule;   /* kf_rule.counter */
	__u8 family;  /* 4 or 6; 0 with KF_RULE_RL_SHARED */
	__u8 pad[3];
	__u8 addr[16]; /* packet source; IPv4 in addr[0..3]; zero if shared */
};

struct kf_rl_bucket {
	__u64 tokens;  /* in nanotokens: tokens * 1e9 */
	__u64 last_ns; /* bpf_ktime_get_ns() of the last refill */
};

/*
 * Array `config` (one entry, key 0): per chain, its default action and
 * whether it is stateful. A stateful chain accepts packets of established
 * connections before the rules. Without connection tracking, that is TCP
 * with the ACK flag: every packet of a TCP connection but its first SYN
 * (what a stateless ACL calls "established"); other protocols have no such
 * mark, so the compiler refuses deny and rate-limit rules for them in
 * stateful chains.
 */
struct kf_filter_config {
	__u8 default_input;   /* KF_ACT_ALLOW (also when 0) or KF_ACT_DENY */
	__u8 default_forward;
	__u8 default_output;
	__u8 stateful;        /* KF_RULE_INPUT | KF_RULE_FORWARD | KF_RULE_OUTPUT */
	__u8 pad[4];
};

/* ---- interception (sk_lookup inbound, connect outbound) --------------- */

/* kf_intercept_rule.action */
#define KF_ICPT_NONE 0     /* empty slot: never matches */
#define KF_ICPT_REDIRECT 1 /* send to the proxy */
#define KF_ICPT_BYPASS 2   /* leave alone (an ordered exception) */

/*
 * Array `intercept_rules`: ordered descriptors, the lowest matching index
 * of the destination bitmap wins. sk_lookup uses proxy_slot (index into
 * the `proxy_socks` sockmap); the connect programs use proxy_port.
 */
struct kf_intercept_rule {
	__u8 action;     /* KF_ICPT_* */
	__u8 proto;      /* IPPROTO_TCP / IPPROTO_UDP, 0 = any */
	__u16 port_lo;   /* destination port range, inclusive, host order */
	__u16 port_hi;
	__u16 proxy_port;  /* connect: proxy port on 127.0.0.1 / ::1 */
	__u32 proxy_slot;  /* sk_lookup: key in proxy_socks */
	__u32 counter;     /* index into intercept_counters */
};

/* Per-CPU array `intercept_counters`, index = kf_intercept_rule.counter. */
struct kf_intercept_counter {
	__u64 redirected; /* steered to the proxy */
	__u64 bypassed;   /* matched a BYPASS rule or an excluded uid/gid */
	__u64 no_proxy;   /* REDIRECT matched but no proxy socket / assign failed */
};

/*
 * Hash `local_addrs` (sock_connect): an address of the network namespace,
 * written by the reconciler from the namespace's address list.
 */
struct kf_addr_key {
	__u8 family;   /* 4 or 6 */
	__u8 pad[3];
	__u8 addr[16]; /* IPv4 in addr[0..3] */
};

/*
 * Original destination of an intercepted outbound connection.
 * `orig_dst` (LRU hash): key = socket cookie (u64) of the client socket,
 * written by connect4/connect6. `orig_dst_tuple` (LRU hash): key =
 * kf_tuple_key of the established client socket, written by the sock_ops
 * program, read by the getsockopt program on the proxy's accepted socket.
 */
struct kf_orig_dst {
	__u8 family;   /* KF_AF_INET / KF_AF_INET6 */
	__u8 proto;
	__u16 port;    /* host order */
	__u8 addr[16]; /* IPv4 in addr[0..3] */
};

struct kf_tuple_key {
	__u8 family;      /* KF_AF_INET / KF_AF_INET6 */
	__u8 pad;
	__u16 client_port; /* host order */
	__u16 proxy_port;  /* host order */
	__u16 pad2;
	__u8 client_addr[16]; /* IPv4 in [0..3] */
	__u8 proxy_addr[16];
};

/* ---- socket-level load balancing (connect4/6, sendmsg4/6) ------------- */

/* kf_service.algorithm */
#define KF_LB_RANDOM 0   /* weighted random: random Maglev slot */
#define KF_LB_AFFINITY 1 /* client affinity: hashed Maglev slot */

struct kf_svc_key_v4 {
	__u8 vip[4];
	__u16 port;   /* host order */
	__u8 proto;   /* IPPROTO_TCP / IPPROTO_UDP */
	__u8 pad;
};

struct kf_svc_key_v6 {
	__u8 vip[16];
	__u16 port;
	__u8 proto;
	__u8 pad;
};

/*
 * Value of services_v4 / services_v6. The service's Maglev table has
 * maglev_size slots (a prime chosen per service by the compiler, larger
 * for more backends), stored in the `maglev` hash as chunks of
 * KF_MAGLEV_CHUNK slots: slot s is maglev[{id, s / KF_MAGLEV_CHUNK}]
 * .slot[s % KF_MAGLEV_CHUNK], each the position of a backend among the
 * service's backends (backends_v4 for a v4 VIP, backends_v6 for a v6 VIP)
 * plus one. A service grows (more backends, a larger
 * table) by map updates only: no setting depends on the size of an intent.
 */
struct kf_service {
	__u32 id;            /* < KF_MAX_SERVICES */
	__u16 backend_count; /* 0: connect fails with EPERM */
	__u8 algorithm;      /* KF_LB_* */
	__u8 flags;
	__u32 maglev_size;   /* slots of the service's Maglev table; 0: none */
};

/* Slots per value of the `maglev` hash (a power of two; 1 KiB values). */
#define KF_MAGLEV_CHUNK 256

struct kf_maglev_key {
	__u32 id;    /* kf_service.id */
	__u32 chunk; /* slot / KF_MAGLEV_CHUNK */
};

struct kf_maglev_chunk {
	__u32 slot[KF_MAGLEV_CHUNK]; /* the backend's position in its service + 1; 0: empty */
};

struct kf_backend_v4 {
	__u8 addr[4];
	__u16 port; /* host order */
	__u16 pad;
};

struct kf_backend_v6 {
	__u8 addr[16];
	__u16 port;
	__u16 pad;
};

/*
 * backends_v4 / backends_v6: a service's backends, in the order of the
 * intent, as chunks of KF_BACKEND_CHUNK: backend p of service id is
 * backends[{id, p / KF_BACKEND_CHUNK}].b[p % KF_BACKEND_CHUNK]. Maglev slots
 * hold p + 1. Key: struct kf_maglev_key (same layout). A service's backends
 * are its own: adding one to a service touches no other service's entries.
 */
#define KF_BACKEND_CHUNK 16

struct kf_backend_chunk_v4 {
	struct kf_backend_v4 b[KF_BACKEND_CHUNK];
};

struct kf_backend_chunk_v6 {
	struct kf_backend_v6 b[KF_BACKEND_CHUNK];
};

/*
 * LRU hash `rev_nat`: for unconnected UDP (sendmsg), the reply from a
 * backend is rewritten back to the VIP by recvmsg4/6.
 */
struct kf_rev_nat_key {
	__u64 cookie;   /* socket cookie of the client socket */
	__u8 family;
	__u8 pad;
	__u16 port;     /* backend port, host order */
	__u32 pad2;
	__u8 addr[16];  /* backend address */
};

struct kf_rev_nat_value {
	__u8 family;
	__u8 pad;
	__u16 port;     /* VIP port, host order */
	__u32 pad2;
	__u8 addr[16];  /* VIP */
};

/* ---- load balancing of forwarded traffic at tc (tc_lb) ----------------- */

/*
 * tc_lb reads services_v4/v6, maglev and backends_v4/v6 with exactly the
 * layouts above (the compiler writes identical contents into both
 * objects); the structs below are its own flow state and counters.
 * family is 4 or 6 in all of them (the packet's IP version).
 */

/*
 * LRU hash `lb_flows`, written by kf_lb_ingress: a client's flow to a VIP,
 * as it arrives, and the backend chosen for it.
 */
struct kf_lb_flow_key {
	__u8 family;          /* 4 or 6 */
	__u8 proto;           /* IPPROTO_TCP / IPPROTO_UDP */
	__u16 client_port;    /* host order */
	__u16 vip_port;       /* host order */
	__u16 pad;
	__u8 client_addr[16]; /* IPv4 in [0..3] */
	__u8 vip_addr[16];
};

struct kf_lb_flow {
	__u8 backend_addr[16]; /* IPv4 in [0..3] */
	__u16 backend_port;    /* host order */
	__u16 pad;
	__u32 service_id;      /* kf_service.id when the flow was created */
};

/*
 * LRU hash `lb_rev`, written by kf_lb_ingress and read by kf_lb_egress: a
 * backend's reply to a client (source = backend, destination = client)
 * and the VIP its source is rewritten back to.
 */
struct kf_lb_rev_key {
	__u8 family;           /* 4 or 6 */
	__u8 proto;
	__u16 backend_port;    /* host order */
	__u16 client_port;     /* host order */
	__u16 pad;
	__u8 backend_addr[16];
	__u8 client_addr[16];
};

struct kf_lb_rev {
	__u8 vip_addr[16];
	__u16 vip_port;        /* host order */
	__u16 pad;
};

/*
 * Per-CPU hash `lb_counters`, key = u32 kf_service.id (sum over CPUs); an
 * entry is created by the program on first use.
 * tc_lb: packets/bytes count every client packet to the service at
 * ingress, dropped ones included. sock_connect: new_flows counts balanced
 * connect()/sendmsg() calls and dropped those refused (no backend);
 * packets and bytes stay 0 (there is no packet at connect).
 */
struct kf_lb_counter {
	__u64 new_flows; /* backends chosen for a new (or re-opened) flow */
	__u64 packets;
	__u64 bytes;     /* skb->len, link header included */
	__u64 dropped;   /* no backend (backend_count 0, empty slot), or a failed rewrite */
};

/*
 * Per-CPU hash `lb_be_counters` (tc_lb and sock_connect), key = struct
 * kf_maglev_key {service id, backend position}; created on first use.
 * Hashes rather than arrays: memory follows the services and backends in
 * use, not the (generous) limits times the number of CPUs.
 */
struct kf_lb_backend_counter {
	__u64 connections; /* flows (tc_lb) or connect()/sendmsg() calls (sock_connect) sent to it */
};

#endif /* KF_TYPES_H */
