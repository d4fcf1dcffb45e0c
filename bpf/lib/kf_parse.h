// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * kf_parse.h - bounds-checked packet parsing for tc programs.
 *
 * Owns: turning an skb into a struct kf_pkt (family, protocol, addresses,
 * ports) with direct packet access. Every read is preceded by a check
 * against data_end, which is what the verifier demands and what keeps a
 * truncated or hostile packet from being misread.
 *
 * Settings:
 *   KF_L2_HLEN        bytes of link-layer header before IP (default 14,
 *                     Ethernet; 0 for L3 devices such as wireguard/tun).
 *   KF_IPV6_MAX_EXT   IPv6 extension headers walked before giving up on
 *                     finding ports (default 4).
 */
#ifndef KF_PARSE_H
#define KF_PARSE_H

#include <linux/ip.h>
#include <linux/ipv6.h>

#include "kf_common.h"

#ifndef KF_L2_HLEN
#define KF_L2_HLEN 14
#endif

#ifndef KF_IPV6_MAX_EXT
#define KF_IPV6_MAX_EXT 4
#endif

/* kf_pkt.flags */
#define KF_PKT_HAS_PORTS (1U << 0) /* sport/dport are valid */
#define KF_PKT_FRAGMENT (1U << 1)  /* a non-first fragment: no L4 header */

struct kf_pkt {
	__u8 family;  /* 4 or 6 */
	__u8 proto;   /* L4 protocol (after IPv6 extension headers) */
	__u8 flags;   /* KF_PKT_* */
	__u8 tcp_flags; /* TCP: the flags byte (FIN 0x01 SYN 0x02 RST 0x04 ACK 0x10) */
	__u16 sport;  /* host order */
	__u16 dport;  /* host order */
	__u8 saddr[16]; /* IPv4 uses [0..3] */
	__u8 daddr[16];
};

/* Result of kf_parse(). */
#define KF_PARSE_OK 0
#define KF_PARSE_NOT_IP 1 /* not IPv4/IPv6: the caller lets it pass */
#define KF_PARSE_SHORT 2  /* headers beyond the linear data: pull, retry */
#define KF_PARSE_BAD 3    /* malformed */

KF_ALWAYS_INLINE int kf_proto_has_ports(__u8 proto)
{
	return proto == KF_IPPROTO_TCP || proto == KF_IPPROTO_UDP ||
	       proto == KF_IPPROTO_SCTP || proto == KF_IPPROTO_UDPLITE;
}

/* Reads the two ports that start every TCP/UDP/SCTP header. */
KF_ALWAYS_INLINE int kf_parse_ports(void *l4, void *data_end, struct kf_pkt *pkt)
{
	__u16 *ports = l4;

	if ((void *)(ports + 2) > data_end)
		return KF_PARSE_SHORT;
	pkt->sport = kf_ntohs(ports[0]);
	pkt->dport = kf_ntohs(ports[1]);
	pkt->flags |= KF_PKT_HAS_PORTS;
	if (pkt->proto == KF_IPPROTO_TCP) {
		__u8 *tcp = l4;

		if ((void *)(tcp + 14) > data_end)
			return KF_PARSE_SHORT;
		pkt->tcp_flags = tcp[13];
	}
	return KF_PARSE_OK;
}

KF_ALWAYS_INLINE int kf_parse_ipv4(void *l3, void *data_end, struct kf_pkt *pkt)
{
	struct iphdr *ip = l3;
	__u32 ihl;

	if ((void *)(ip + 1) > data_end)
		return KF_PARSE_SHORT;
	if (ip->version != 4)
		return KF_PARSE_BAD;
	ihl = ip->ihl * 4;
	if (ihl < sizeof(*ip))
		return KF_PARSE_BAD;
	pkt->family = 4;
	pkt->proto = ip->protocol;
	__builtin_memcpy(pkt->saddr, &ip->saddr, 4);
	__builtin_memcpy(pkt->daddr, &ip->daddr, 4);
	if (ip->frag_off & kf_htons(0x1fff)) {
		pkt->flags |= KF_PKT_FRAGMENT;
		return KF_PARSE_OK;
	}
	if (!kf_proto_has_ports(pkt->proto))
		return KF_PARSE_OK;
	return kf_parse_ports(l3 + ihl, data_end, pkt);
}

KF_ALWAYS_INLINE int kf_parse_ipv6(void *l3, void *data_end, struct kf_pkt *pkt)
{
	struct ipv6hdr *ip6 = l3;
	void *cur;
	__u8 nexthdr;
	int i;

	if ((void *)(ip6 + 1) > data_end)
		return KF_PARSE_SHORT;
	if (ip6->version != 6)
		return KF_PARSE_BAD;
	pkt->family = 6;
	__builtin_memcpy(pkt->saddr, &ip6->saddr, 16);
	__builtin_memcpy(pkt->daddr, &ip6->daddr, 16);
	nexthdr = ip6->nexthdr;
	cur = ip6 + 1;

#pragma unroll
	for (i = 0; i < KF_IPV6_MAX_EXT; i++) {
		__u8 *ext = cur;

		if (nexthdr != KF_IPPROTO_HOPOPTS && nexthdr != KF_IPPROTO_ROUTING &&
		    nexthdr != KF_IPPROTO_DSTOPTS && nexthdr != KF_IPPROTO_FRAGMENT &&
		    nexthdr != KF_IPPROTO_AH)
			break;
		if ((void *)(ext + 8) > data_end)
			return KF_PARSE_SHORT;
		if (nexthdr == KF_IPPROTO_FRAGMENT) {
			/* offset in the upper 13 bits of bytes 2..3 */
			if ((((__u16)ext[2] << 8) | ext[3]) & 0xfff8) {
				pkt->proto = ext[0];
				pkt->flags |= KF_PKT_FRAGMENT;
				return KF_PARSE_OK;
			}
			cur = ext + 8;
		} else if (nexthdr == KF_IPPROTO_AH) {
			cur = ext + (((__u32)ext[1] + 2) * 4);
		} else {
			cur = ext + (((__u32)ext[1] + 1) * 8);
		}
		nexthdr = ext[0];
	}
	pkt->proto = nexthdr;
	if (!kf_proto_has_ports(nexthdr))
		return KF_PARSE_OK;
	return kf_parse_ports(cur, data_end, pkt);
}

/*
 * Fills *pkt from the skb. The ethertype comes from skb->protocol, which
 * is right for Ethernet and for L3 devices alike.
 */
KF_ALWAYS_INLINE int kf_parse(struct __sk_buff *skb, struct kf_pkt *pkt)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	void *l3 = data + KF_L2_HLEN;

	if (skb->protocol == kf_htons(KF_ETH_P_IP))
		return kf_parse_ipv4(l3, data_end, pkt);
	if (skb->protocol == kf_htons(KF_ETH_P_IPV6))
		return kf_parse_ipv6(l3, data_end, pkt);
	return KF_PARSE_NOT_IP;
}

#endif /* KF_PARSE_H */
